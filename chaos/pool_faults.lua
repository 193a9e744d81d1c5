-- chaos/pool_faults.lua: pool workers killed, stopped and continued at random instants; calls
-- after terminate/close; the pool's own failure paths (issue 7, items 1, 3, 4, 7, 8, 9, 10).
local L = require "chaos.lib"
local mp = require "multiprocessing"
local now, sleep, kill = L.now, L.sleep, L.core.kill
local SIGKILL, SIGSTOP, SIGCONT = 9, 19, 18

local N = 3000  -- small tasks per call
local BOUND = 10 -- a call must end within this after a fault (get(10))

local function inputs(n)
  local xs = {}
  for i = 1, n do xs[i] = i end
  return xs
end

local function task(x)  -- a few microseconds
  local s = 0
  for k = 1, 40 do s = s + k end
  return x * 2 + (s - 820)
end

-- tasks of three weights (loop counts: about 0.5, 5 and 20 microseconds); rounds pick one
local WEIGHTS = { 40, 400, 2000 }
local function weighted(w)
  return function(x)
    local s = 0
    for k = 1, w do s = s + k end
    return x * 2 + (s - w * (w + 1) // 2)
  end
end

local CHUNKS = { false, 1, 7, 50 }  -- false: automatic

local function chunk() local c = L.pick(CHUNKS) return c or nil end
-- the dead worker a call's error must name (any of them: several may have died)
local function names_dead(err, killed)
  err = tostring(err)
  if err:find("pool is broken", 1, true) then return false end  -- one kill must not break the pool
  for pid in pairs(killed) do
    if err:find(("pid %d) died"):format(pid), 1, true) or err:find(("pid %d died"):format(pid), 1, true) then return true end
  end
  return false
end

-- a process stopped (SIGSTOP) in a put to the pool's task queue, holding its lock (killed, never
-- continued: it would write its message)
local function stopped_task_holder(pool, round)
  local holder = L.core.fork()
  if holder == 0 then
    L.core._queue_fault("stop", 1)
    pool._tasks:put(0)   -- (killed before it writes anything)
    L.core._exit(1)
  end
  L.check(L.eventually(function() local st = L.stat(holder) return st and st.state == "T" end, BOUND), "round %d: the holder did not stop", round)
  L.add("stops")
  return holder
end

local function check_results(res, n, what)
  L.check(type(res) == "table", "%s: results are a %s", what, type(res))
  for i = 1, n do
    if res[i] ~= i * 2 then L.fail("%s: result %d is %s, expected %d", what, i, tostring(res[i]), i * 2) end
  end
end

-- when each worker was first seen: the rounds strike workers that are past their start-up (a
-- worker killed while it starts is pool_kill_starting_worker's matter)
local first_seen = {}
local function established()
  local t, out = now(), {}
  for _, pid in ipairs(L.workers()) do
    first_seen[pid] = first_seen[pid] or t
    if t - first_seen[pid] >= 0.05 then out[#out + 1] = pid end
  end
  return out
end

-- lets the pool replace its dead (it does while it pumps) until n workers are established
local function settle(pool, n)
  L.eventually(function()
    pool:map(task, { 1 })
    return #established() >= n
  end, 1)
end

-- faults: "kill" (SIGKILL), "stopkill" (SIGSTOP, a pause, SIGKILL), "mixed" (either),
-- "stopcont" (SIGSTOP for 50-300 ms, then SIGCONT: nothing may fail)
local function strike(fault, killed)
  local ws = established()
  if #ws == 0 then return nil end
  local pid = L.pick(ws)
  if fault == "mixed" then fault = L.pick { "kill", "stopkill" } end
  if fault == "stopcont" then
    kill(pid, SIGSTOP)
    L.add("stops")
    sleep(L.uniform(0.05, 0.3))
    kill(pid, SIGCONT)
    return now()
  end
  if fault == "stopkill" then
    kill(pid, SIGSTOP)
    sleep(L.uniform(0, 0.03))
  end
  kill(pid, SIGKILL)
  killed[pid] = true
  L.add("kills")
  return now()
end

-- The calls the map rounds make: N small tasks of a weight and a chunksize ...
local function small_calls(weights, chunks)
  local xs, out = inputs(N), {}
  for _, w in ipairs(weights or WEIGHTS) do
    for _, c in ipairs(chunks or CHUNKS) do
      out[#out + 1] = { f = weighted(w), xs = xs, opts = c or nil, n = N, want = function(i) return i * 2 end }
    end
  end
  return out
end

-- ... or 1,000 items of 20 KB, one per message (a timeout keeps chunks from being grouped) and
-- trivial tasks: workers take 16 messages at once, copying 320 KB under the queue's lock, so a
-- kill lands between the take and the claim often (issue 7, item 1)
local function big_item_calls()
  local xs = {}
  for i = 1, 1000 do xs[i] = string.rep(string.char(97 + i % 26), 20000) end
  -- (the workers are stopped while the parent feeds the call, so that faults land while they take)
  return { { f = function(x) return #x end, xs = xs, opts = { chunksize = 1, timeout = 60 }, n = 1000,
    want = function() return 20000 end, prefeed = true } }
end

-- map_async of a call; a worker struck at a random instant within its measured duration;
-- get(BOUND) must end with every result right, or an error naming the dead worker
local function map_rounds(fault, default_rounds, make_calls)
  return function()
    local pool <close> = mp.Pool(2)
    local calls = (make_calls or small_calls)()
    -- starts a call; with prefeed, its workers are stopped while the parent feeds it
    local function start(c)
      local ws = c.prefeed and L.workers() or {}
      for _, p in ipairs(ws) do kill(p, SIGSTOP) end
      local ok, r = pcall(pool.map_async, pool, c.f, c.xs, c.opts)
      for _, p in ipairs(ws) do kill(p, SIGCONT) end
      return ok, r
    end
    for _, c in ipairs(calls) do  -- how long each takes here, so that faults land inside calls
      pool:map(c.f, c.xs, c.opts)
      local _, r = start(c)
      local t0 = now()
      r:get()
      c.took = math.max(0.003, now() - t0)
    end
    established()
    sleep(0.1)
    L.fig("rounds", 0) L.fig(fault == "stopcont" and "stops" or "kills", 0) L.fig("results", 0) L.fig("errors", 0)
    for round = 1, L.rounds(default_rounds) do
      settle(pool, 2)
      local c = L.pick(calls)
      local mok, r = start(c)
      L.check(mok, "round %d: map_async raised after the kills of earlier rounds: %s", round, tostring(r):sub(1, 300))
      sleep(L.uniform(0, c.took))
      local killed = {}
      local t_fault = strike(fault, killed)
      local ok, res, why = pcall(r.get, r, BOUND)
      if ok and res == nil then
        L.fail("round %d: map_async(...):get(%d) timed out at %s/%d results after a %s (%s)", round, BOUND,
          tostring(rawget(r, "ndone")), c.n, fault, why)
      elseif ok then
        for i = 1, c.n do
          if res[i] ~= c.want(i) then L.fail("round %d: result %d is %s, expected %s", round, i, tostring(res[i]), tostring(c.want(i))) end
        end
        L.add("results", c.n)
      else
        L.check(fault ~= "stopcont", "round %d: a worker stopped and continued failed the call: %s", round, tostring(res):sub(1, 300))
        L.check(names_dead(res, killed), "round %d: the error does not name the dead worker: %s", round, tostring(res):sub(1, 300))
        L.add("errors")
        L.add("results", tonumber(rawget(r, "ndone")) or 0)
        if t_fault then L.notice("notice_ms", t_fault) end
      end
      L.round_done()
    end
    -- the pool still works
    check_results(pool:map(task, inputs(N)), N, "after the rounds")
  end
end

-- imap over N small tasks, a worker struck from inside the loop at a random item
local function imap_rounds(kind)
  return function()
    local pool <close> = mp.Pool(2)
    local xs = inputs(N)
    L.fig("rounds", 0) L.fig("kills", 0) L.fig("results", 0) L.fig("errors", 0)
    for round = 1, L.rounds(25) do
      settle(pool, 2)
      local at, got, killed, t_fault = math.random(1, N), 0, {}, nil
      local wd = L.watchdog(BOUND)
      local ok, err = pcall(function()
        for i, v in pool[kind](pool, weighted(L.pick(WEIGHTS)), xs, chunk()) do
          if v ~= i * 2 then L.fail("round %d: %s item %d gave %s", round, kind, i, tostring(v)) end
          got = got + 1
          if got == at then t_fault = strike(L.pick { "kill", "stopkill" }, killed) end
        end
      end)
      local fired = wd:disarm()
      if fired or (not ok and L.interrupted(err)) then
        L.fail("round %d: %s did not end within %d s of a kill (%d/%d results)", round, kind, BOUND, got, N)
      end
      if ok then
        L.check(got == N, "round %d: %s ended after %d of %d results without an error", round, kind, got, N)
      else
        if type(err) == "table" then error(err, 0) end
        L.check(names_dead(err, killed), "round %d: the error does not name the dead worker: %s", round, tostring(err):sub(1, 300))
        L.add("errors")
        if t_fault then L.notice("notice_ms", t_fault) end
      end
      L.add("results", got)
      L.round_done()
    end
    check_results(pool:map(task, xs), N, "after the rounds")
  end
end

return {
  { name = "pool_kill_map", timeout = 90, run = map_rounds("kill", 40) },
  { name = "pool_stopkill_map", timeout = 90, run = map_rounds("stopkill", 40) },
  -- the tiniest tasks one at a time: workers spend most of their time taking messages, where
  -- a kill between the take and the claim loses messages (issue 7, item 1)
  { name = "pool_stopkill_tiny", timeout = 90, run = map_rounds("stopkill", 80, function() return small_calls({ 40 }, { 1, 2 }) end) },
  { name = "pool_kill_big_items", timeout = 90, run = map_rounds("mixed", 80, big_item_calls) },
  -- a worker killed while it starts (a replacement, before it said it was ready): the pool
  -- must go on (a starting worker that is killed is not an initializer that fails)
  { name = "pool_kill_starting_worker", timeout = 60, run = function()
    local pool <close> = mp.Pool(2)
    L.fig("rounds", 0) L.fig("kills", 0)
    for round = 1, L.rounds(8) do
      local old = L.workers()
      local known = {}
      for _, p in ipairs(old) do known[p] = true end
      kill(L.pick(old), SIGKILL)
      L.add("kills")
      -- the engine notices and forks a replacement while it pumps: kill that one as it starts
      local r = pool:map_async(function(x) L.core.sleep(0.02) return x * 2 end, inputs(20), 1)
      local fresh = L.eventually(function()
        r:wait(0.002)
        for _, p in ipairs(L.workers()) do if not known[p] then return p end end
      end, L.BOUND)
      L.check(fresh, "round %d: no replacement worker within %d s of a kill", round, L.BOUND)
      kill(fresh, SIGKILL)
      L.add("kills")
      pcall(r.get, r, BOUND)
      local ok, res = pcall(pool.map, pool, task, inputs(200))
      L.check(ok, "round %d: after a worker was killed during its start-up: %s", round, tostring(res):sub(1, 300))
      check_results(res, 200, ("round %d"):format(round))
      L.round_done()
    end
  end },
  { name = "pool_kill_imap", timeout = 90, run = imap_rounds("imap") },
  { name = "pool_kill_imap_unordered", timeout = 90, run = imap_rounds("imap_unordered") },

  -- many apply_async calls, a worker struck at a random instant: every get(BOUND) ends
  { name = "pool_kill_apply_async", timeout = 90, run = function()
    local pool <close> = mp.Pool(2)
    L.fig("rounds", 0) L.fig("kills", 0) L.fig("results", 0) L.fig("errors", 0)
    for round = 1, L.rounds(25) do
      settle(pool, 2)
      local rs = {}
      local f = weighted(L.pick(WEIGHTS))
      for i = 1, 300 do rs[i] = pool:apply_async(f, { i }) end
      sleep(L.uniform(0, 0.02))
      local killed = {}
      local t_fault = strike(L.pick { "kill", "stopkill" }, killed)
      local t_end = now() + BOUND
      for i, r in ipairs(rs) do
        local ok, v, why = pcall(r.get, r, math.max(0.1, t_end - now()))
        if ok and v == nil then
          L.fail("round %d: apply_async %d: get() timed out %d s after a kill (%s)", round, i, BOUND, tostring(why))
        elseif ok then
          L.check(v == i * 2, "round %d: apply_async %d gave %s", round, i, tostring(v))
          L.add("results")
        else
          L.check(names_dead(v, killed), "round %d: apply_async %d: the error does not name the dead worker: %s",
            round, i, tostring(v):sub(1, 300))
          L.add("errors")
          if t_fault then L.notice("notice_ms", t_fault) end
        end
      end
      L.round_done()
    end
    L.check(pool:apply(task, { 5 }) == 10, "the pool does not work after the rounds")
  end },

  -- futures under kills: 300 submits, a random third cancelled while workers take them, a
  -- worker struck at a random instant; as_completed must end within BOUND with each future
  -- cancelled (and cancel() said so), right, or failed naming the dead worker
  { name = "pool_kill_futures", timeout = 90, run = function()
    local pool <close> = mp.Pool(2)
    L.fig("rounds", 0) L.fig("kills", 0) L.fig("results", 0) L.fig("errors", 0) L.fig("cancelled", 0)
    for round = 1, L.rounds(25) do
      settle(pool, 2)
      local fs, want = {}, {}
      local f = weighted(L.pick(WEIGHTS))
      for i = 1, 300 do
        fs[i] = pool:submit(f, i)
        want[fs[i]] = i * 2
      end
      local cancelled = {}
      local killed, t_fault = {}, nil
      local strike_at = math.random(1, 300)
      for i = 300, 1, -1 do
        if math.random(3) == 1 and fs[i]:cancel() then cancelled[fs[i]] = true end
        if i == strike_at then t_fault = strike(L.pick { "kill", "stopkill" }, killed) end
      end
      local n = 0
      local ok, err = pcall(function()
        for fut in mp.as_completed(fs, BOUND) do
          n = n + 1
          if cancelled[fut] then
            L.check(fut:cancelled(), "round %d: a future whose cancel() succeeded is not cancelled", round)
            L.add("cancelled")
          else
            L.check(not fut:cancelled(), "round %d: a future was cancelled though cancel() said no", round)
            local e = fut:exception()
            if e == nil then
              L.check(fut:result() == want[fut], "round %d: future of %d gave %s", round, want[fut] // 2, tostring(fut:result()))
              L.add("results")
            else
              L.check(names_dead(e, killed), "round %d: the future's error does not name the dead worker: %s",
                round, tostring(e):sub(1, 300))
              L.add("errors")
              if t_fault then L.notice("notice_ms", t_fault) end
            end
          end
        end
      end)
      if not ok then
        if type(err) == "table" then error(err, 0) end
        L.fail("round %d: as_completed after a kill: %s (%d of 300 came)", round, tostring(err):sub(1, 300), n)
      end
      L.check(n == 300, "round %d: as_completed yielded %d of 300 futures", round, n)
      L.round_done()
    end
    L.check(pool:submit(task, 5):result(BOUND) == 10, "the pool does not work after the rounds")
    L.fig("cancel_slabs", #pool._slabs)
  end },

  -- a worker stopped for a while, then continued: the call completes, all results right
  { name = "pool_stop_cont", timeout = 90, run = map_rounds("stopcont", 20) },

  -- a process stopped in a put to the pool's task queue (holding its lock) while the parent
  -- feeds calls of every kind (map_async, imap, a blocking map, poll): the parent's waits keep
  -- their bounds, and once the holder is killed every call ends with all its results
  { name = "pool_stop_task_lock", timeout = 90, run = function()
    local pool <close> = mp.Pool(2)
    L.fig("rounds", 0) L.fig("stops", 0) L.fig("results", 0)
    for round = 1, L.rounds(12) do
      local n = math.random(200, 3000)
      local xs = inputs(n)
      local c = chunk()
      local r = pool:map_async(task, xs, c)   -- (running when the holder stops, or not yet)
      local holder = stopped_task_holder(pool, round)
      local t0 = now()
      local r2 = pool:map_async(task, xs, c)
      local k = 0
      local it = pool:imap(task, function() k = k + 1 if k <= n then return k end end, c)
      pool:poll(0.01)
      local v, why = r2:get(0.2)
      L.check(now() - t0 < BOUND, "round %d: map_async, imap and get(0.2) took %.1f s behind a stopped lock holder", round, now() - t0)
      L.check(v ~= nil or why == "timeout", "round %d: get(0.2) gave %s, %s", round, tostring(v), tostring(why))
      sleep(L.uniform(0, 0.05))
      kill(holder, SIGKILL)
      L.core.waitpid(holder, BOUND)
      for _, call in ipairs { r, r2 } do
        local ok, res = pcall(call.get, call, BOUND)
        L.check(ok and res, "round %d: a call did not end with its results once the holder died: %s", round, tostring(res):sub(1, 300))
        check_results(res, n, ("round %d"):format(round))
      end
      local got = 0
      for i, y in it do L.check(y == i * 2, "round %d: imap item %d gave %s", round, i, tostring(y)) got = got + 1 end
      L.check(got == n, "round %d: imap gave %d of %d", round, got, n)
      check_results(pool:map(task, xs, c), n, ("round %d, map"):format(round))
      L.add("results", 4 * n)
      L.round_done()
    end
  end },

  -- apply_async and submit behind a process stopped holding the task queue's lock: the calls
  -- return at once (kept unsent), get(0.2) ends at its timeout, cancels of kept submits hold;
  -- once the holder dies every call runs, in order, and nothing is lost or run twice
  { name = "pool_stop_task_lock_apply", timeout = 90, run = function()
    local pool <close> = mp.Pool(2)
    L.fig("rounds", 0) L.fig("stops", 0) L.fig("calls", 0) L.fig("cancelled", 0)
    for round = 1, L.rounds(12) do
      local before, after = {}, {}
      for i = 1, math.random(0, 200) do before[i] = pool:apply_async(task, { i }) end
      local holder = stopped_task_holder(pool, round)
      local t0 = now()
      local m = math.random(50, 2000)
      for i = 1, m do
        if i % 2 == 0 then after[i] = pool:submit(task, i) else after[i] = pool:apply_async(task, { i }) end
      end
      local cancelled = {}
      for _ = 1, math.random(0, 5) do
        local i = 2 * math.random(1, m // 2)
        if after[i]:cancel() then cancelled[i] = true end
      end
      local last = after[m]
      local ok, v, why = pcall(last.get or last.result, last, 0.2)   -- (raises if it was cancelled)
      L.check(now() - t0 < BOUND, "round %d: %d apply_async/submit and get(0.2) took %.1f s behind a stopped lock holder", round, m, now() - t0)
      L.check(ok and (v ~= nil or why == "timeout") or (not ok and cancelled[m]), "round %d: get(0.2) gave %s, %s", round, tostring(v), tostring(why))
      sleep(L.uniform(0, 0.05))
      kill(holder, SIGKILL)
      L.core.waitpid(holder, BOUND)
      for i, r in ipairs(before) do
        local ok, y = pcall(r.get, r, BOUND)
        L.check(ok and y == i * 2, "round %d: apply_async %d made before the stop gave %s", round, i, tostring(y))
      end
      for i = 1, m do
        local r = after[i]
        local ok, y = pcall(r.get or r.result, r, BOUND)
        if cancelled[i] then
          L.check(not ok and tostring(y):find("cancelled", 1, true), "round %d: cancelled call %d gave %s", round, i, tostring(y))
          L.add("cancelled")
        else
          L.check(ok and y == i * 2, "round %d: call %d made behind the stopped holder gave %s", round, i, tostring(y))
        end
      end
      L.check(not pool._held, "round %d: calls still kept", round)
      L.add("calls", #before + m)
      L.round_done()
    end
  end },

  -- apply_async and submit of new closures (their blobs, and cancel words, are made in the arena)
  -- behind a process stopped holding the allocator's lock: they return at once, get(0.2) ends
  -- at its timeout; continued, every call runs once with its own upvalue; or terminate fails them
  { name = "pool_stop_alloc_apply", timeout = 90, run = function()
    L.fig("rounds", 0) L.fig("stops", 0) L.fig("calls", 0) L.fig("terminated", 0)
    for round = 1, L.rounds(10) do
      local pool <close> = mp.Pool(2)
      L.check(pool:apply(task, { 1 }) == 2, "round %d: the first apply", round)
      local holder = L.core.fork()
      if holder == 0 then
        L.core._arena_fault(1, "stop")
        L.core.blob_free(L.core.blob_new("h"))
        L.core._exit(0)
      end
      L.check(L.eventually(function() local st = L.stat(holder) return st and st.state == "T" end, BOUND), "round %d: the holder did not stop", round)
      L.add("stops")
      local t0 = now()
      local m = math.random(20, 1500)
      local calls = {}
      for i = 1, m do
        local k = i % 7   -- (a few distinct closures: a blob each)
        local f = function(x) return x * 2 + k end
        if i % 2 == 0 then calls[i] = pool:submit(f, i) else calls[i] = pool:apply_async(f, { i }) end
      end
      local j = round   -- (a map_async of a new closure too)
      local xs = inputs(math.random(1, 3000))
      local mapped = pool:map_async(function(x) return x * 2 + j end, xs)
      local last = calls[m]
      local v, why = (last.get or last.result)(last, 0.2)
      L.check(now() - t0 < BOUND, "round %d: %d calls, a map_async and get(0.2) took %.1f s behind a stopped allocator holder", round, m, now() - t0)
      L.check(v ~= nil or why == "timeout", "round %d: get(0.2) gave %s, %s", round, tostring(v), tostring(why))
      local terminate = math.random() < 0.3
      if terminate then pool:terminate() end
      sleep(L.uniform(0, 0.05))
      kill(holder, 18)
      L.check(L.core.waitpid(holder, BOUND) == 0, "round %d: the holder did not finish", round)
      for i = 1, m do
        local r = calls[i]
        local ok, y = pcall(r.get or r.result, r, BOUND)
        if terminate then
          L.check(not ok and tostring(y):find("terminated", 1, true), "round %d: call %d after terminate gave %s", round, i, tostring(y))
        else
          L.check(ok and y == i * 2 + i % 7, "round %d: call %d gave %s", round, i, tostring(y))
        end
      end
      local ok, res = pcall(mapped.get, mapped, BOUND)
      if terminate then
        L.check(not ok and tostring(res):find("terminated", 1, true), "round %d: map_async after terminate gave %s", round, tostring(res))
      else
        L.check(ok and type(res) == "table", "round %d: map_async gave %s", round, tostring(res))
        for i = 1, #xs do L.check(res[i] == i * 2 + j, "round %d: map_async item %d gave %s", round, i, tostring(res[i])) end
      end
      L.add(terminate and "terminated" or "calls", m)
      L.round_done()
    end
  end },

  -- a worker stopped while its task has a timeout: the call fails with the timeout, in time
  { name = "pool_stop_task_timeout", timeout = 60, run = function()
    L.fig("rounds", 0) L.fig("stops", 0)
    for round = 1, L.rounds(6) do
      -- a fresh pool: four tasks of 0.2 s for two workers; each says who runs it, and one
      -- that does is stopped
      local pool <close> = mp.Pool(2)
      local started = mp.Queue()
      local r = pool:map_async(function(x)
        started:put(L.core.getpid())
        local t = os.clock() while os.clock() - t < 0.2 do end
        return x
      end, inputs(4), { chunksize = 1, timeout = 0.6 })
      local pid = started:get(BOUND)
      L.check(pid, "round %d: no task started within %d s", round, BOUND)
      sleep(L.uniform(0, 0.05))
      kill(pid, SIGSTOP)
      L.add("stops")
      local t0 = now()
      local ok, res, why = pcall(r.get, r, BOUND)
      L.check(not (ok and res == nil), "round %d: get(%d) timed out (%s): the stopped worker's task timeout never fired", round, BOUND, tostring(why))
      L.check(not ok, "round %d: a call whose worker was stopped past its timeout succeeded", round)
      L.check(tostring(res):find("timed out", 1, true), "round %d: the error is not the timeout: %s", round, tostring(res):sub(1, 300))
      L.notice("notice_ms", t0)
      kill(pid, SIGCONT)  -- (it was killed by then; harmless)
      pool:terminate()
      started:close()
      L.round_done()
    end
  end },

  -- item 5 in the pool: a worker stopped at a random instant while tasks return 16 MiB results
  -- (maybe inside its put, holding the results queue's lock): the call must still end, with its
  -- results or the task timeout, never wait on the stopped worker
  { name = "pool_stop_big_result", timeout = 60, run = function()
    L.fig("rounds", 0) L.fig("stops", 0)
    for round = 1, L.rounds(5) do
      local pool <close> = mp.Pool(2)
      pool:map(task, { 1, 2 })
      local r = pool:map_async(function(x) return string.rep("r", 16 << 20) end, inputs(8), { chunksize = 1, timeout = 1 })
      sleep(L.uniform(0, 0.08))
      local pid = L.pick(L.workers())
      kill(pid, SIGSTOP)
      L.add("stops")
      local t0 = now()
      local wd = L.watchdog(BOUND + 2)
      local ok, res, why = pcall(r.get, r, BOUND)
      local fired = wd:disarm()
      local dt = now() - t0
      L.check(not fired and not (not ok and L.interrupted(res)), "round %d: get(%d) hung %.1f s on a worker stopped while tasks return 16 MiB (the watchdog ended it)", round, BOUND, dt)
      L.check(not (ok and res == nil), "round %d: get(%d) timed out (%s): the stopped worker's task timeout never fired", round, BOUND, tostring(why))
      L.check(ok or tostring(res):find("timed out", 1, true), "round %d: the error is not the task timeout: %s", round, tostring(res):sub(1, 300))
      L.fig("last", ok and "results" or "timed_out")
      L.max("notice_ms", math.floor(dt * 1000 + 0.5))
      kill(pid, SIGKILL)
      kill(pid, SIGCONT)
      pool:terminate()
      L.round_done()
    end
  end },

  -- a task that calls os.exit, one that raises: the call fails naming it, the pool goes on
  { name = "pool_task_exits", timeout = 60, run = function()
    local pool <close> = mp.Pool(2)
    L.fig("rounds", 0)
    for round = 1, L.rounds(10) do
      local bad = math.random(1, 500)
      local ok, err = pcall(pool.map, pool, function(x) if x == bad then os.exit(3) end return x * 2 end, inputs(500))
      L.check(not ok, "round %d: a task called os.exit(3) and the map succeeded", round)
      L.check(tostring(err):find("exit code 3", 1, true), "round %d: the error does not say exit code 3: %s", round, tostring(err):sub(1, 300))
      ok, err = pcall(pool.map, pool, function(x) if x == bad then error("boom") end return x * 2 end, inputs(500))
      L.check(not ok and tostring(err):find("boom", 1, true), "round %d: a raising task: %s", round, tostring(err):sub(1, 300))
      check_results(pool:map(task, inputs(500)), 500, ("round %d, after"):format(round))
      L.round_done()
    end
  end },

  -- item 3: apply_async, map_async and starmap_async pending at terminate() fail at once
  { name = "pool_terminate_pending", timeout = 40, run = function()
    local pool = mp.Pool(2)
    local called = 0
    local opts = { error_callback = function() called = called + 1 end }
    local slow = function(x) local t = os.clock() while os.clock() - t < 0.3 do end return x end
    local rs = {}
    for i = 1, 4 do rs[#rs + 1] = { "apply_async", pool:apply_async(slow, { i }, opts) } end
    rs[#rs + 1] = { "map_async", pool:map_async(slow, { 1, 2, 3 }, opts) }
    rs[#rs + 1] = { "starmap_async", pool:starmap_async(slow, { { 1 }, { 2 } }, opts) }
    sleep(0.05)
    pool:terminate()
    for _, kr in ipairs(rs) do
      local kind, r = kr[1], kr[2]
      local t0 = now()
      local ok, v, why = pcall(r.get, r, 2)
      L.check(not (ok and v == nil), "%s: get(2) after terminate() timed out (%s)", kind, tostring(why))
      L.check(not ok and tostring(v):find("terminated", 1, true), "%s: after terminate() get() gave: %s", kind, tostring(v):sub(1, 200))
      L.check(r:ready(), "%s: ready() is false after terminate()", kind)
      L.notice("notice_ms", t0)
    end
    L.fig("error_callbacks", called)
    L.check(called == #rs, "error_callback ran %d times for %d calls", called, #rs)
  end },

  -- item 4: an imap over a lazy input, continued after close() + join(): must raise
  { name = "pool_imap_after_join", timeout = 30, run = function()
    local BOUND = 5
    local pool = mp.Pool(2)
    local i = 0
    local it, s, c, closing = pool:imap(task, function() i = i + 1 if i <= 100000 then return i end end)
    for _ = 1, 10 do it(s, c) end
    pool:close()
    local wd = L.watchdog(BOUND)
    local ok, err = pcall(function()
      pool:join()
      local k, v
      for _ = 1, 100000 do
        k, v = it(s, c)
        if k == nil then break end
      end
      return k
    end)
    local fired = wd:disarm()
    if closing then pcall(function() local x <close> = closing end) end
    L.check(not fired and not (not ok and L.interrupted(err)), "join() or the imap after close()+join() hung (%d s)", BOUND)
    L.check(not ok, "the imap went on after close()+join() without an error")
    L.fig("error", (tostring(err):sub(1, 60):gsub("%s", "_")))
  end },

  -- item 9: maxtasksperchild with an early close(): every result arrives
  { name = "pool_maxtasks_close", timeout = 40, run = function()
    local pool = mp.Pool { processes = 3, maxtasksperchild = 1 }
    local rs = {}
    for i = 1, 6 do rs[i] = pool:apply_async(function(x) local t = os.clock() while os.clock() - t < 0.05 do end return x end, { i }) end
    pool:close()
    local wd = L.watchdog(BOUND)
    local ok, err = pcall(pool.join, pool)
    L.check(not wd:disarm() and ok, "join() failed or hung: %s", tostring(err))
    local got = 0
    for i, r in ipairs(rs) do
      local gok, v, why = pcall(r.get, r, 2)
      if gok and v == i then got = got + 1
      elseif gok then L.fig("missing", i) L.fig("results", got) L.fail("apply_async %d: get(2) gave %s, %s after close()+join()", i, tostring(v), tostring(why))
      else L.fail("apply_async %d failed: %s", i, tostring(v):sub(1, 200)) end
    end
    L.fig("results", got)
  end },

  -- item 8: an imap input that raises past the first window fails that call only, after
  -- yielding what was read before; the next call works
  { name = "pool_imap_input_fails", timeout = 40, run = function()
    local pool <close> = mp.Pool(2)
    for _, how in ipairs { "raises", "unsendable" } do
      local i, seen = 0, 0
      local ok, err = pcall(function()
        for k, v in pool:imap(task, function()
          i = i + 1
          if i == 1500 then
            if how == "raises" then error("input broke") end
            return coroutine.create(print)
          end
          if i <= 3000 then return i end
        end) do
          L.check(v == k * 2, "%s: item %d gave %s", how, k, tostring(v))
          seen = seen + 1
        end
      end)
      L.check(not ok, "%s: the imap did not fail", how)
      L.fig(how .. "_yielded", seen)
      local ok2, err2 = pcall(pool.map, pool, task, { 1, 2, 3 })
      L.check(ok2, "%s: the next map failed: %s (the input error was: %s)", how, tostring(err2):sub(1, 200), tostring(err):sub(1, 100))
      L.check(seen == 1499, "%s: %d results yielded before the failure, expected the 1499 read before it", how, seen)
    end
  end },

  -- item 7: breaking out of mp.progress(pool:imap(...)) closes the imap: its input is not read again
  { name = "pool_progress_break", timeout = 30, run = function()
    local pool <close> = mp.Pool(2)
    local reads = 0
    local input = function() reads = reads + 1 if reads <= 100000 then return reads end end
    for i in mp.progress(pool:imap(task, input, 1), nil, { desc = "chaos" }) do
      if i == 5 then break end
    end
    collectgarbage()
    local after_break = reads
    for _ = 1, 5 do pool:map(task, inputs(200)) pool:apply(task, { 1 }) sleep(0.02) end
    L.fig("reads_at_break", after_break)
    L.fig("reads_after", reads)
    L.check(reads == after_break, "the abandoned imap's input was read %d more times during later calls", reads - after_break)
  end },

  -- item 10: pools made in pool tasks and never closed must not pile up
  { name = "pool_nested_unclosed", timeout = 60, run = function()
    local pool <close> = mp.Pool(2)
    local r = pool:map(function(x)
      local p = mp.Pool(2)
      return p:apply(function(y) return y + 1 end, { x })
    end, inputs(20), 1)
    for i = 1, 20 do L.check(r[i] == i + 1, "nested pool: task %d gave %s", i, tostring(r[i])) end
    local n
    local ok = L.eventually(function() n = #L.descendants() return n <= 2 end, L.BOUND)
    L.fig("processes", n)
    L.check(ok, "%d processes under the parent after 20 tasks that each made an unclosed Pool(2) (expected the pool's 2)", n)
  end },
}
