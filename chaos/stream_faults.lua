-- chaos/stream_faults.lua: the Pool on Redis Streams (docs/distributed.md, "Faults") with its
-- consumers killed or stopped at random instants, and a whole worker machine (an mp-worker and
-- its consumers) gone: every call ends within its bound with every result right, exactly once.
-- Uses MP_REDIS_URL (.ci/run starts a server), else a redis-server of its own on a free port.
local L = require "chaos.lib"
local mp = require "multiprocessing"
local RS = require "spec.redis_server"
local core = L.core
local now, sleep, kill = L.now, L.sleep, core.kill
local SIGKILL, SIGSTOP, SIGTERM = 9, 19, 15

local BOUND = 20  -- seconds a call may take after a fault (a claim takes about a second, a lapsed
                  -- machine's heartbeat 3 s more)

-- a Redis to use for the case: its base URL and a function that ends what was started
-- (own: always a server of its own, whose pid is the third value)
local function redis(own)
  local url = not own and os.getenv("MP_REDIS_URL")
  if url then return url, function() end end
  local server = RS.start()
  return server.url, server.stop, server.pid()
end

-- a namespace of its own, a key file, and mp-worker machines started on demand
local function setup(own)
  local base, stop_redis, redis_pid = redis(own)
  local url = ("%s?namespace=chaos%d_%d"):format(base, core.getpid(), math.random(1, 1e9))
  local keyfile = L.tmpname("key")
  assert(os.execute("head -c 32 /dev/urandom > " .. keyfile .. " && chmod 600 " .. keyfile))
  local machines = {}
  local env = { redis_pid = redis_pid }
  function env.start_machine(n)  -- an mp-worker supervisor with n consumers: its pid
    local pidfile = L.tmpname("worker-pid")
    assert(os.execute(("%s %s bin/mp-worker %s --processes %d --key-file %s --quiet </dev/null >/dev/null 2>&1 & echo $! > %s")
      :format(L.ENV, L.LUA, L.quote(url), n, keyfile, pidfile)))
    local pid
    L.check(L.eventually(function() pid = tonumber(L.slurp(pidfile) or "") return pid end, 5), "mp-worker did not start")
    os.remove(pidfile)
    machines[#machines + 1] = pid
    -- its consumers are up once it has n children
    L.check(L.eventually(function() return #(L.children(pid)) >= n end, 10), "mp-worker %d started no consumers", pid)
    return pid
  end
  function env.consumers()  -- the live consumers of every live machine
    local out = {}
    for _, m in ipairs(machines) do
      if L.alive(m) then for _, c in ipairs((L.children(m))) do out[#out + 1] = c end end
    end
    return out
  end
  function env.pool() return mp.Pool { backend = url, key_file = keyfile } end
  function env.close()
    for _, m in ipairs(machines) do kill(m, SIGTERM) end
    for _, m in ipairs(machines) do
      if not L.eventually(function() return not L.alive(m) end, 5) then kill(m, SIGKILL) end
    end
    os.remove(keyfile)
    stop_redis()
  end
  return env
end

-- a task of a few milliseconds (so that faults land inside tasks), loaded with the real globals
local TASK = assert(load([[return function(x)
  local t = os.clock()
  while os.clock() - t < 0.002 do end
  return x * 3
end]]))()

local function inputs(n)
  local xs = {}
  for i = 1, n do xs[i] = i end
  return xs
end

-- the end of a round: get(BOUND) of the call r over n items gives every result right
local function finish_round(r, n, round, after)
  local t0 = now()
  local out, why = r:get(BOUND)
  L.check(out ~= nil, "round %d: get(%d) ended without the results (%s) %.1f s after %s", round, BOUND,
    tostring(why), now() - t0, after)
  for i = 1, n do
    if out[i] ~= 3 * i then L.fail("round %d: result %d is %s, expected %d", round, i, tostring(out[i]), 3 * i) end
  end
  L.add("results", n)
  L.round_done()
end

-- body(env) with a set-up environment (own: with a redis-server of its own), which is closed
-- however body ends
local function with_env(body, own)
  return function()
    local env = setup(own)
    local ok, err = pcall(body, env)
    env.close()
    if not ok then error(err, 0) end
  end
end

-- rounds of map_async; a consumer struck at a random instant: get(BOUND) gives every result
local function consumer_rounds(fault)
  return with_env(function(env)
    env.start_machine(2)
    local pool <close> = env.pool()
    L.fig("rounds", 0) L.fig("faults", 0) L.fig("results", 0)
    for round = 1, L.rounds(8) do
      local n = math.random(50, 300)
      local r = pool:map_async(TASK, inputs(n), math.random(1, 4))
      sleep(L.uniform(0.02, 0.3))
      local cs = env.consumers()
      if #cs > 0 then
        local victim = L.pick(cs)
        if fault == "stopkill" then kill(victim, SIGSTOP) sleep(L.uniform(0, 0.05)) end
        kill(victim, SIGKILL)
        L.add("faults")
      end
      finish_round(r, n, round, "a consumer was killed")
    end
  end)
end

return {
  { name = "stream_kill_consumer", timeout = 240, run = consumer_rounds("kill") },
  { name = "stream_stopkill_consumer", timeout = 240, run = consumer_rounds("stopkill") },

  -- a whole worker machine gone (its supervisor and consumers killed at once) while a call runs;
  -- another machine takes over its tasks once its heartbeat lapses
  { name = "stream_machine_gone", timeout = 240, run = with_env(function(env)
    local pool <close> = env.pool()
    L.fig("rounds", 0) L.fig("results", 0)
    local machine = env.start_machine(2)
    for round = 1, L.rounds(3) do
      local n = math.random(100, 300)
      local r = pool:map_async(TASK, inputs(n), 1)
      sleep(L.uniform(0.05, 0.3))
      local doomed = { machine }
      for _, c in ipairs((L.children(machine))) do doomed[#doomed + 1] = c end
      for _, p in ipairs(doomed) do kill(p, SIGKILL) end
      machine = env.start_machine(2)
      finish_round(r, n, round, "its machine was gone")
    end
  end) },

  -- Redis stopped (SIGSTOP: connected, answering nothing) for 0.1-2 s while a call runs: its
  -- get(0.5) ends within its bound (timeout + STALL), with the results or an error naming Redis;
  -- once Redis goes on, the next call works (a new connection)
  { name = "stream_redis_stopped", timeout = 240, run = with_env(function(env)
    env.start_machine(2)
    local pool <close> = env.pool()
    L.fig("rounds", 0) L.fig("stops", 0) L.fig("failed", 0) L.fig("results", 0)
    for round = 1, L.rounds(5) do
      local n = math.random(50, 200)
      local r = pool:map_async(TASK, inputs(n), 1)
      sleep(L.uniform(0, 0.1))
      kill(env.redis_pid, SIGSTOP)
      L.add("stops")
      local t0 = now()
      local ok, out = pcall(r.get, r, 0.5)
      local took = now() - t0
      sleep(L.uniform(0.1, 2) - math.min(took, 0.1))
      kill(env.redis_pid, 18)
      L.check(took < 0.5 + 1.2 + 1, "round %d: get(0.5) took %.1f s behind a stopped Redis", round, took)
      if ok then
        L.check(out == nil or type(out) == "table", "round %d: get gave a %s", round, type(out))
      else
        L.check(tostring(out):find("Redis at", 1, true), "round %d: the error does not name Redis: %s", round, tostring(out):sub(1, 300))
        L.add("failed")
      end
      finish_round(pool:map_async(TASK, inputs(n), 1), n, round, "Redis went on")
    end
  end, true) },
}
