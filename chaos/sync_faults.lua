-- chaos/sync_faults.lua: a party of a lock, barrier, condition or pipe killed (issue 7, item 11):
-- the others must notice within the bound, never pass on a miscount nor wait forever.
local L = require "chaos.lib"
local mp = require "multiprocessing"
local core = L.core
local now, sleep = L.now, L.sleep

-- starts a Process running fn, waits until it says it is in place (ev), then a random pause
local function in_place(fn)
  local ev = mp.Event()
  local pr = mp.Process { target = function() fn(ev) end }:start()
  L.check(ev:wait(10), "the other process never got in place")
  sleep(L.uniform(0.05, 0.15))  -- it is now inside its blocking call
  return pr, ev
end

local function reap(pr)
  L.check(pr:join(L.BOUND), "a killed process was not reaped within %d s", L.BOUND)
  pr:close()
end

local LOCKS = {
  Lock = function() return mp.Lock() end,
  RLock = function() return mp.RLock() end,
  Condition = function() return mp.Condition() end,
  ValueLock = function() local v = mp.Value("i", 0) return v:get_lock(), v end,
}

return {
  -- a waiter of Barrier(2) killed: the other gets a broken barrier, does not pass
  { name = "barrier_killed_waiter", timeout = 60, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(4) do
      local b = mp.Barrier(2)
      local pr = in_place(function(ev) ev:set() b:wait() end)
      pr:kill()
      local t0 = now()
      reap(pr)
      local ok, r = pcall(b.wait, b, L.BOUND * 2)
      local dt = now() - t0
      L.check(not ok, "round %d: the live party passed Barrier(2) (arrival index %s) after the other was killed", round, tostring(r))
      L.check(tostring(r):find("broken", 1, true), "round %d: the error is not a broken barrier: %s", round, tostring(r))
      L.check(dt <= L.BOUND, "round %d: the barrier broke only by the timeout, %.1f s later: the dead party was not noticed", round, dt)
      L.max("notice_ms", math.floor(dt * 1000 + 0.5))
      b:close()
      L.round_done()
    end
  end },

  -- a lock's holder killed (or gone with _exit): the next acquire succeeds with "owner died"
  { name = "lock_owner_killed", timeout = 60, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(3) do
      for kind, make in pairs(LOCKS) do
        local lock, keep = make()
        local how = L.pick { "kill", "exit" }
        local pr = in_place(function(ev)
          lock:acquire()
          ev:set()
          if how == "exit" then core._exit(0) end
          core.sleep(60)
        end)
        if how == "kill" then pr:kill() end
        reap(pr)
        local t0 = now()
        local ok, why = lock:acquire(L.BOUND)
        L.check(ok == true, "round %d: %s held by a process that %s: acquire(%d) gave %s", round, kind,
          how == "kill" and "was killed" or "exited", L.BOUND, tostring(ok))
        L.check(why == "owner died", "round %d: %s: acquire after its holder %s gave %s, %s (expected true, \"owner died\")",
          round, kind, how == "kill" and "was killed" or "exited", tostring(ok), tostring(why))
        L.max("notice_ms", math.floor((now() - t0) * 1000 + 0.5))
        lock:release()
        lock:close()
        if keep then keep:close() end
      end
      L.round_done()
    end
  end },

  -- two waiters on a Condition, one killed: notify(1) still wakes the live one
  { name = "condition_dead_waiter", timeout = 60, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(3) do
      local c = mp.Condition()
      local woke = mp.Event()
      local dead = in_place(function(ev) c:acquire() ev:set() c:wait() end)
      local live = in_place(function(ev) c:acquire() ev:set() if c:wait(30) then woke:set() end c:release() end)
      dead:kill()
      reap(dead)
      c:acquire() c:notify(1) c:release()
      local t0 = now()
      local ok = woke:wait(L.BOUND)
      L.check(ok, "round %d: notify(1) woke nobody: the killed waiter took the wake-up", round)
      L.max("notice_ms", math.floor((now() - t0) * 1000 + 0.5))
      reap(live)
      c:close() woke:close()
      L.round_done()
    end
  end },

  -- a Manager's server killed at a random instant while requests stream to it: the next
  -- operation raises "the manager process is gone" in time, never hangs
  { name = "manager_server_killed", timeout = 60, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(4) do
      local before = {}
      for _, p in ipairs((L.children())) do before[p] = true end
      local m = mp.Manager()
      local server
      for _, p in ipairs((L.children())) do if not before[p] then server = p end end
      L.check(server, "round %d: cannot find the manager's server process", round)
      local d = m:dict()
      d.n = 0
      local killer = mp.Process { target = function() core.sleep(L.uniform(0.01, 0.1)) core.kill(server, 9) end }:start()
      local wd = L.watchdog(L.BOUND + 10)
      local t_end, ok, err, ops = nil, true, nil, 0
      ok, err = pcall(function()
        while true do
          d:update_with("n", function(x) return x + 1 end)
          ops = ops + 1
          if not L.alive(server) and not t_end then t_end = now() end
        end
      end)
      local fired = wd:disarm()
      L.check(not fired and not L.interrupted(err), "round %d: a request to a killed manager hung", round)
      L.check(tostring(err):find("gone", 1, true), "round %d: a request to a killed manager raised: %s", round, tostring(err):sub(1, 200))
      if t_end then L.max("notice_ms", math.floor((now() - t_end) * 1000 + 0.5)) end
      L.add("ops", ops)
      reap(killer)
      pcall(m.shutdown, m)
      L.round_done()
    end
  end },

  -- a Process killed at a random instant while it sends back a big result: join ends, and
  -- result() gives the value or says it was killed
  { name = "process_killed_returning", timeout = 60, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(6) do
      local pr = mp.Process { target = function() local t = {} for i = 1, 1000000 do t[i] = i end return t end }:start()
      sleep(L.uniform(0, 0.12))
      pr:kill()
      L.check(pr:join(L.BOUND), "round %d: join did not end within %d s of a kill", round, L.BOUND)
      local ok, r = pcall(pr.result, pr)
      L.check(ok and type(r) == "table" and #r == 1000000 or tostring(r):find("SIGKILL", 1, true),
        "round %d: result() of a killed process: %s", round, tostring(r):sub(1, 200))
      L.fig("last", ok and "value" or "killed")
      pr:close()
      L.round_done()
    end
  end },

  -- a Pipe's sender killed in the middle of a 64 MiB message: recv ends (value or closed), in time
  { name = "pipe_sender_killed", timeout = 60, run = function()
    L.fig("rounds", 0)
    local big = string.rep("p", 64 << 20)
    for round = 1, L.rounds(4) do
      local a, b = mp.Pipe()
      local pr = mp.Process { target = function() a:close() b:send(big) core.sleep(60) end }:start()
      b:close()
      sleep(L.uniform(0, 0.05))
      pr:kill()
      local t0 = now()
      local ok, v, why = pcall(a.recv, a, L.BOUND * 2)
      local dt = now() - t0
      L.check(not (ok and v == nil and why == "timeout"), "round %d: recv timed out after the sender was killed mid-message", round)
      L.check(dt <= L.BOUND, "round %d: recv took %.1f s to notice the killed sender", round, dt)
      L.fig("last", ok and (v == big and "whole" or tostring(why)) or "raised")
      L.max("notice_ms", math.floor(dt * 1000 + 0.5))
      reap(pr)
      a:close()
      L.round_done()
    end
  end },
  -- a process stopped inside an internal section (the allocator's lock, a Barrier's or a
  -- Condition's own lock): another process's calls end at their timeout naming it, and Ctrl-C
  -- (SIGINT to the victim's group) ends the calls without one; after SIGCONT all goes on
  { name = "stopped_internal_holder", timeout = 90, run = function()
    L.fig("rounds", 0)
    local CALLS = {  -- what stops, the call with a timeout, the call without one
      { "arena", "local q = mp.Queue() local big = string.rep('x', 100000)", "q:put(big, 0.3)", "mp.Queue()" },
      { "barrier", "local b = mp.Barrier(2)", "b:wait(0.3)", "b:wait()" },
      { "condition", "local c = mp.Condition() c:acquire()", "c:wait(0.3)", "c:notify()" },
    }
    local STOP = {
      arena = "core._arena_fault(1, 'stop') core.blob_free(core.blob_new('h'))",
      barrier = "core._sync_stop(b)",
      condition = "core._sync_stop(c)",
    }
    for round = 1, L.rounds(2) do
      for _, c in ipairs(CALLS) do
        local kind, setup, timed, untimed = c[1], c[2], c[3], c[4]
        local v = L.victim { code = ([[
%s
local holder = core.fork()
if holder == 0 then %s core._exit(0) end
repeat core.sleep(0.01)
until io.open(("/proc/%%d/stat"):format(holder)):read("a"):match("^%%d+ %%b() (%%a)") == "T"
local t0 = core.now()
local ok, e = pcall(function() return %s end)
io.stdout:write(("TIMED %%.3f %%s %%s\n"):format(core.now() - t0, tostring(ok), (tostring(e):gsub("%%s+", " "))))
ready()
ok, e = pcall(function() local r1, r2 = %s return r2 end)
io.stdout:write(("CAUGHT %%.6f %%s %%s\n"):format(core.now(), tostring(ok), (tostring(e):gsub("%%s+", " "))))
core.kill(holder, 18)
io.stdout:write(("HOLDER %%s\n"):format(tostring(core.waitpid(holder, 10))))
]]):format(setup, STOP[kind], timed, untimed) }
        local dt, tok, terr = v:wait_for("^TIMED (%S+) (%S+) (.*)$", L.BOUND + 5, kind .. " timed call")
        L.check(tok == "false" and terr:find("held by stopped process", 1, true),
          "round %d: %s: %s behind a stopped holder gave %s %s", round, kind, timed, tok, terr:sub(1, 200))
        L.check(tonumber(dt) <= 0.3 + L.BOUND, "round %d: %s: %s took %s s", round, kind, timed, dt)
        L.max("timed_late_ms", math.floor((tonumber(dt) - 0.3) * 1000 + 0.5))
        v:wait_for("^READY$", 15, "start-up")
        sleep(L.uniform(0.1, 0.3))  -- well inside the call
        local t_sig = now()
        v:signal_group(2)
        local at, ok, err = v:wait_for("^CAUGHT (%S+) (%S+) (.*)$", L.BOUND + 1, kind .. " Ctrl-C")
        local ms = math.floor((tonumber(at) - t_sig) * 1000 + 0.5)
        L.max("notice_ms", ms)
        L.check(L.interrupted(err), "round %d: %s: %s behind a stopped holder was not interrupted: %s %s", round, kind,
          untimed, ok, err:sub(1, 200))
        L.check(ms <= L.BOUND * 1000, "round %d: %s: %s ended %d ms after Ctrl-C", round, kind, untimed, ms)
        local code = v:wait_exit(L.BOUND + 10)
        L.check(code ~= nil, "round %d: %s: the victim did not exit after the holder went on", round, kind)
        L.add("calls", 2)
        v:cleanup()
      end
      L.round_done()
    end
  end },
}
