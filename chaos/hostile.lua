-- chaos/hostile.lua: faults the issue implies that the other families do not strike: a call
-- left by Ctrl-C whose answer comes later, waits given a timeout no clock ever reaches.
local L = require "chaos.lib"
local mp = require "multiprocessing"
local core = L.core
local now, sleep = L.now, L.sleep

-- a Process that sends this process SIGINT (a Ctrl-C that reaches it alone) after `after` s
local function interrupt_in(after)
  local me = core.getpid()
  return mp.Process { target = function() core.sleep(after) core.kill(me, 2) end }:start()
end

return {
  -- a Manager call left by Ctrl-C while the server works on it: its answer comes later, and
  -- must never be taken as the answer of a later call (it was: every later call of the
  -- process got the answer of the call before it). One Ctrl-C per process: lua.c restores
  -- SIGINT's default action after one; the later calls of the rounds check what follows it.
  { name = "manager_interrupted_call", timeout = 90, run = function()
    L.fig("rounds", 0)
    local m <close> = mp.Manager()
    local d = m:dict()
    d.a = "A1"
    local pr = interrupt_in(L.uniform(0.05, 0.25))
    local ok, err = pcall(d.update_with, d, "slow", function()
      local t = os.clock() while os.clock() - t < 0.5 do end
      return "S1"
    end)
    pr:join(L.BOUND) pr:close()
    L.check(not ok and L.interrupted(err), "the slow call was not interrupted: %s %s", tostring(ok), tostring(err))
    L.add("interrupted")
    for round = 1, L.rounds(6) do
      local t0 = now()
      local a, missing, slow = d.a, d.missing, d:get("slow")
      L.check(a == "A1", "round %d: d.a after an interrupted call gave %s (the late answer of another call)", round, tostring(a))
      L.check(missing == nil, "round %d: d.missing gave %s", round, tostring(missing))
      L.check(slow == "S1", "round %d: d.slow gave %s: the interrupted update did not land", round, tostring(slow))
      L.max("notice_ms", math.floor((now() - t0) * 1000 + 0.5))
      L.round_done()
    end
  end },

  -- a callback that ends its pool (terminate, or close + join) while the engine delivers
  -- results: the engine went on reading the queues the callback had closed, and every call
  -- raised "attempt to use a closed Queue" instead of its own outcome
  { name = "pool_callback_ends_pool", timeout = 60, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(6) do
      local how = round % 3
      local p = mp.Pool(2)
      local function stop() if how == 0 then p:terminate() else p:close() p:join() end end
      local ran = 0
      local function cb() ran = ran + 1 if how ~= 2 then stop() end end  -- 2: stopped from inside join
      local bad = p:apply_async(function() error("boom") end, {}, { error_callback = cb })
      local good = p:map_async(function(x) return x end, { 1, 2, 3 }, { callback = cb })
      local w = L.watchdog(L.BOUND * 2)
      local ok, err = pcall(bad.get, bad, L.BOUND)
      -- (terminated: the other call's callback may have ended the pool first)
      L.check(not ok and (tostring(err):find("boom", 1, true) or how ~= 2 and tostring(err):find("terminated", 1, true)),
        "round %d: the failed call raised %s", round, tostring(err))
      if how == 2 then  -- the callbacks run inside join
        for _ = 1, 3 do p:apply_async(function() core.sleep(0.02) return 1 end, {}, { callback = function() ran = ran + 1 stop() end }) end
        p:close()
        local jok, jerr = pcall(p.join, p)
        L.check(jok, "round %d: join with a callback that ends the pool raised %s", round, tostring(jerr))
      end
      if how == 0 then  -- a worker killed as join waits: its call's error_callback ends the pool
        local p2 = mp.Pool(2)
        local dying = p2:apply_async(function() core.sleep(30) end, {}, { error_callback = function() ran = ran + 1 p2:terminate() end })
        p2:apply_async(function() core.sleep(30) end)
        p2:close()
        sleep(0.1)
        for _, wk in pairs(p2._workers) do core.kill(wk.pid, 9) end
        local jok, jerr = pcall(p2.join, p2)
        L.check(jok, "round %d: join, a worker killed, its error_callback terminating the pool, raised %s", round, tostring(jerr))
        L.check(dying:ready(), "round %d: the dead worker's call is not ready after join", round)
        local _, merr = pcall(p2.map, p2, print, { 1 })
        L.check(tostring(merr):find("terminated", 1, true), "round %d: a pool terminated by a callback inside join says: %s", round, tostring(merr))
      end
      local gok, gerr = pcall(good.get, good, L.BOUND)
      L.check(not w:disarm(), "round %d: a call waited forever", round)
      L.check(gok or tostring(gerr):find("terminated", 1, true), "round %d: the other call raised %s", round, tostring(gerr))
      L.check(ran >= 1, "round %d: no callback ran", round)
      p:terminate()
      L.round_done()
    end
  end },

  -- a worker stopped (SIGSTOP) in its initializer while Pool() waits for them all to be ready:
  -- Pool() waited forever (only Ctrl-C ended it). It must return with the others working.
  { name = "pool_start_stopped_worker", timeout = 60, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(4) do
      local flag = mp.Value("i", 0)
      local w = L.watchdog(L.BOUND * 2)
      local t0 = now()
      local ok, p = pcall(mp.Pool, { processes = 2, initializer = function()
        local l = flag:get_lock()
        l:acquire() local first = flag.value == 0 flag.value = flag.value + 1 l:release()
        if first then core.kill(core.getpid(), 19) end  -- SIGSTOP
      end })
      L.check(not w:disarm() and ok, "round %d: Pool() with a stopped starting worker: %s", round, ok and "waited forever" or tostring(p))
      L.max("notice_ms", math.floor((now() - t0) * 1000 + 0.5))
      local r = p:map_async(function(x) return x * 2 end, { 1, 2, 3, 4 })
      local res = r:get(L.BOUND * 2)
      L.check(res and res[4] == 8, "round %d: map with one worker stopped gave %s", round, tostring(res))
      for _, pid in ipairs(L.workers()) do core.kill(pid, 18) end  -- SIGCONT
      res = p:map(function(x) return x + 1 end, { 1, 2, 3 })
      L.check(res[3] == 4, "round %d: map after SIGCONT went wrong", round)
      p:close() p:join()
      flag:close()
      L.round_done()
    end
  end },

  -- a NaN timeout: no deadline ever passes. Every wait must refuse it (or return): never wait forever
  { name = "timeout_nan", timeout = 60, run = function()
    local nan = 0 / 0
    local pool <close> = mp.Pool(1)
    local r = pool:apply_async(function() core.sleep(30) end)
    local a, b = mp.Pipe()
    local calls = {
      ["AsyncResult:get"] = function() return r:get(nan) end,
      ["AsyncResult:wait"] = function() return r:wait(nan) end,
      ["Queue:get"] = function() return mp.Queue():get(nan) end,
      ["JoinableQueue:join"] = function() local q = mp.JoinableQueue() q:put(1) return q:join(nan) end,
      ["Event:wait"] = function() return mp.Event():wait(nan) end,
      ["Semaphore:acquire"] = function() return mp.Semaphore(0):acquire(nan) end,
      ["Barrier:wait"] = function() return mp.Barrier(2):wait(nan) end,
      ["Connection:recv"] = function() return a:recv(nan) end,
    }
    for what, f in pairs(calls) do
      local w = L.watchdog(L.BOUND)
      local t0 = now()
      local ok, err = pcall(f)
      local fired = w:disarm()
      L.check(not fired and not L.interrupted(err), "%s(NaN) waited forever", what)
      L.check(not ok and tostring(err):find("NaN", 1, true), "%s(NaN) returned %s, %s", what, tostring(ok), tostring(err))
      L.max("notice_ms", math.floor((now() - t0) * 1000 + 0.5))
      L.add("calls")
    end
    local ok, err = pcall(pool.map, pool, function(x) return x end, { 1 }, { timeout = nan })
    L.check(not ok and tostring(err):find("timeout", 1, true), "map{timeout = NaN}: %s %s", tostring(ok), tostring(err))
    a:close() b:close()
    pool:terminate()
  end },
}
