-- chaos/sigint.lua: Ctrl-C (SIGINT to the victim's process group, as a terminal sends it) in
-- every blocking call, and at a `lua5.4 -i` prompt. The call must end within the bound with an
-- "interrupted" error, the script go on and exit cleanly, and nothing be left in its session.
local L = require "chaos.lib"
local now, sleep = L.now, L.sleep
local SIGINT = 2

-- name -> the victim's setup, then the blocking call (an expression or a statement)
local CALLS = {
  { "pool_map", "local p = mp.Pool(2)", "p:map(slow, range(40), 1)" },
  { "pool_imap", "local p = mp.Pool(2)", "for _ in p:imap(slow, range(40), 1) do end" },
  { "pool_imap_unordered", "local p = mp.Pool(2)", "for _ in p:imap_unordered(slow, range(40), 1) do end" },
  { "apply_async_get", "local p = mp.Pool(2)", "p:apply_async(slow, { 1, 30 }):get()" },
  { "map_async_wait", "local p = mp.Pool(2)", "p:map_async(slow, range(40), 1):wait()" },
  { "pool_join", "local p = mp.Pool(2) p:apply_async(slow, { 1, 30 }) p:close()", "p:join()" },
  { "queue_get", "local q = mp.Queue()", "q:get()" },
  { "queue_get_timeout", "local q = mp.Queue()", "q:get(30)" },
  { "queue_put_full", "local q = mp.Queue(1) q:put(1)", "q:put(2)" },
  { "joinable_join", "local q = mp.JoinableQueue() q:put(1)", "q:join()" },
  { "process_join", "local pr = mp.Process { target = function() core.sleep(30) end }:start()", "pr:join()" },
  { "lock_acquire", [[local l = mp.Lock()
    local pr = mp.Process { target = function() l:acquire() core.sleep(30) end }:start()
    while not l:locked() do core.sleep(0.01) end]], "l:acquire()" },
  { "rlock_acquire", [[local l = mp.RLock()
    local ev = mp.Event()
    local pr = mp.Process { target = function() l:acquire() ev:set() core.sleep(30) end }:start()
    ev:wait(10)]], "l:acquire()" },
  { "semaphore_acquire", "local s = mp.Semaphore(0)", "s:acquire()" },
  { "event_wait", "local e = mp.Event()", "e:wait()" },
  { "condition_wait", "local c = mp.Condition() c:acquire()", "c:wait()" },
  { "barrier_wait", "local b = mp.Barrier(2)", "b:wait()" },
  { "pipe_recv", "local a, b = mp.Pipe()", "a:recv()" },
  { "sleep", "", "mp.sleep(30)" },
  -- the user's own code that the library runs in the parent: Ctrl-C lands there as often as in
  -- the wait (an input iterator, a callback, a Parallel task iterator, each spinning in Lua)
  { "imap_iterator", "local p = mp.Pool(2)", "for _ in p:imap(slow, spin_iter(400), 1) do end" },
  { "map_async_iterator_in_wait", "local p = mp.Pool(2)",
    "local r = p:map_async(function(x) return x end, spin_iter(400), 1) p:apply(slow, { 1, 30 })" },
  { "callback_in_wait", "local p = mp.Pool(2)",
    "p:apply_async(function() return 1 end, nil, { callback = function() spin(30) end }) p:apply(slow, { 1, 30 })" },
  { "parallel_iterator", "",
    "local n = 0 mp.Parallel { n_jobs = 2 } (function() n = n + 1 spin(0.05) if n < 400 then return mp.delayed(slow)(n, 30) end end)" },
}

local VICTIM = [[
local function range(n) local t = {} for i = 1, n do t[i] = i end return t end
local function slow(x, secs) core.sleep(secs or 0.5) return x end
local function spin(secs) local t0 = os.clock() repeat until os.clock() - t0 > secs end
local function spin_iter(n) local i = 0 return function() i = i + 1 spin(0.02) if i <= n then return i end end end
%s
ready()
local ok, e = pcall(function() %s end)
io.stdout:write(("CAUGHT %%.6f %%s %%s\n"):format(core.now(), tostring(ok), (tostring(e):gsub("%%s+", " "))))
]]

local function sigint_case(name, setup, call)
  return { name = "sigint_" .. name, timeout = 40, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(2) do
      local v = L.victim { code = VICTIM:format(setup, call) }
      v:wait_for("^READY$", 15, "start-up")
      sleep(L.uniform(0.05, 0.35))  -- well inside the call
      local t_sig = now()
      v:signal_group(SIGINT)
      local at, ok, err = v:wait_for("^CAUGHT (%S+) (%S+) (.*)$", L.BOUND + 1, "Ctrl-C")
      local ms = math.floor((tonumber(at) - t_sig) * 1000 + 0.5)
      L.max("notice_ms", ms)
      L.check(ok == "false", "round %d: %s returned instead of raising the interrupt (%s)", round, call, err)
      L.check(err:find("interrupted", 1, true), "round %d: %s raised %q, not an interrupted error", round, call, err:sub(1, 200))
      L.check(ms <= L.BOUND * 1000, "round %d: %s ended %d ms after Ctrl-C", round, call, ms)
      local code, dt = v:wait_exit(L.BOUND)
      L.check(code ~= nil, "round %d: the script did not exit within %d s after the interrupted %s (%s)", round, L.BOUND, call,
        L.describe((L.session(v.sid))))
      L.check(code == 0, "round %d: the script exited with %s after the interrupted call; stderr: %s", round, tostring(code), v:errors():sub(-300))
      local empty, _, live = L.wait_session_empty(v.sid, L.BOUND)
      L.check(empty, "round %d: left behind after the interrupted %s: %s", round, call, L.describe(live))
      L.max("exit_ms", math.floor(dt * 1000 + 0.5))
      v:cleanup()
      L.round_done()
    end
  end }
end

local cases = {}
for _, c in ipairs(CALLS) do cases[#cases + 1] = sigint_case(c[1], c[2], c[3]) end

-- at the lua5.4 -i prompt (driven through a pipe): Ctrl-C in a map, then the session goes on,
-- a new pool works, and end of input leaves nothing behind
cases[#cases + 1] = { name = "sigint_repl", timeout = 40, run = function()
  L.fig("rounds", 0)
  for round = 1, L.rounds(2) do
    local v = L.victim { args = "-i", stdin = true }
    v:send([[
mp = require "multiprocessing"; core = require "multiprocessing.core"
p = mp.Pool(2)
print("READY" .. "!")
r = p:map(function(x) core.sleep(0.5) return x end, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 }, 1)
]])
    v:wait_for("READY!", 15, "start-up")
    sleep(L.uniform(0.1, 0.4))
    local t_sig = now()
    v:signal_group(SIGINT)
    v:send([[print(("AFTER %.6f"):format(core.now()))
q = mp.Pool(2) print("AGAIN " .. q:map(function(x) return x + 1 end, { 1, 2 })[2]) q:close() q:join()
]])
    local at = v:wait_for("AFTER (%d+%.%d+)", L.BOUND + 1, "the prompt after Ctrl-C")
    L.max("notice_ms", math.floor((tonumber(at) - t_sig) * 1000 + 0.5))
    v:wait_for("AGAIN 3", L.BOUND + 5, "a new pool at the prompt after Ctrl-C")
    L.check(v:errors():find("interrupted", 1, true), "round %d: no interrupted error at the prompt; stderr: %s", round, v:errors():sub(-200))
    v:close_input()  -- end of input: the session ends
    local code = v:wait_exit(L.BOUND)
    L.check(code ~= nil, "round %d: lua5.4 -i did not exit within %d s of the end of its input", round, L.BOUND)
    local empty, _, live = L.wait_session_empty(v.sid, L.BOUND)
    L.check(empty, "round %d: left behind after the prompt's session: %s", round, L.describe(live))
    v:cleanup()
    L.round_done()
  end
end }

-- item 3: calls pending when Ctrl-C ends another call of the same pool fail at once
cases[#cases + 1] = { name = "sigint_pending_async", timeout = 40, run = function()
  L.fig("rounds", 0)
  for round = 1, L.rounds(2) do
    local v = L.victim { code = [[
local p = mp.Pool(2)
local a = p:apply_async(function() core.sleep(30) return 1 end)
local m = p:map_async(function(x) core.sleep(30) return x end, { 1, 2 })
ready()
print("FIRST", (pcall(function() p:map(function(x) core.sleep(30) return x end, { 1, 2, 3 }) end)))
for name, r in pairs { apply_async = a, map_async = m } do
  local t0 = core.now()
  local ok, v, why = pcall(r.get, r, 3)
  print(("PENDING %s %s %s %s %d"):format(name, tostring(ok), tostring(v):gsub("%s+", " "), tostring(why),
    math.floor((core.now() - t0) * 1000)))
end
print("DONE")
]] }
    v:wait_for("^READY$", 15, "start-up")
    sleep(L.uniform(0.05, 0.3))
    v:signal_group(SIGINT)
    v:wait_for("^DONE$", 10, "the pending calls after Ctrl-C")
    for name, ok, val, why, ms in v:output():gmatch("PENDING (%S+) (%S+) (.-) (%S+) (%d+)\n") do
      L.max("notice_ms", tonumber(ms))
      L.check(ok == "false" and val:find("terminated", 1, true), "round %d: %s pending when Ctrl-C ended another call of its pool: get(3) gave %s %s %s",
        round, name, ok, val:sub(1, 100), why)
    end
    local code = v:wait_exit(L.BOUND)
    L.check(code == 0, "round %d: the script exited with %s", round, tostring(code))
    v:cleanup()
    L.round_done()
  end
end }

-- item 6: Ctrl-C landing while a child ends must not lose its exit status. Each -e chunk is
-- its own protected call with a fresh SIGINT handler. The child leaves a grandchild (without a
-- parent-death signal) that interrupts the parent the moment the child is gone, so the
-- interrupt and the child's end reach join together. The grandchild sets a flag once its
-- signal is sent, and the round's first pcall waits for it (then a little longer, for the
-- signal's hook to run): a grandchild delayed on a busy machine interrupts that pcall all the
-- same, never the round's report (a late one once cost a round its ROUND line). The flag is a
-- Value without a lock: 1 once the grandchild runs (the child waits for that before it ends: a
-- grandchild whose parent ended before it registered leaves at once, docs/arena.md), 2 once
-- its Ctrl-C is sent, -1 when the child's fork failed (no Ctrl-C will come). The child also
-- waits until the parent is inside that pcall, about to join (`go`): a Ctrl-C that came while
-- the parent was still in `start` cost a round its report too.
cases[#cases + 1] = { name = "sigint_join_race", timeout = 60, run = function()
  local rounds = L.rounds(60)
  local setup = L.PRELUDE .. [[
    function R(spin)
      local parent = core.getpid()
      local sent, go = mp.Value("i", 0, { lock = false }), mp.Value("i", 0, { lock = false })
      local p = mp.Process { target = function()
        local child = core.getpid()
        local g = core.fork(false, 0)
        if not g then sent.value = -1 end  -- (no grandchild, no Ctrl-C: the round waits for none)
        if g == 0 then
          sent.value = 1
          while core.getppid() == child do end
          local t = os.clock() while os.clock() - t < spin do end
          core.kill(parent, 2)
          sent.value = 2
          core._exit(0)
        end
        local t = core.now() while (sent.value == 0 or go.value == 0) and core.now() - t < 10 do end
      end }:start()
      local ok, e = pcall(function()
        go.value = 1
        p:join()
        -- the interrupt lands here if not before: busy (no call that could take it as its own)
        -- until the grandchild has sent it, then 0.2 s more
        local t = core.now() while sent.value >= 0 and sent.value < 2 and core.now() - t < 10 do end
        t = core.now() while core.now() - t < 0.2 do end
      end)
      local ok2, e2 = pcall(p.join, p, 3)
      local alive = p:is_alive()
      sent:close() go:close()
      print(("ROUND %s %s %s %s"):format(tostring(ok), tostring(ok2), tostring(e2):gsub("%s+", " "), tostring(alive)))
    end
  ]]
  local chunks = { "-e " .. L.quote(setup) }
  for _ = 1, rounds do
    chunks[#chunks + 1] = "-e " .. L.quote(("pcall(R, %g)"):format(L.pick { 0, 0, 0, 1e-6, 1e-5, 3e-5, 1e-4 }))
  end
  chunks[#chunks + 1] = "-e " .. L.quote("print('DONE')")
  local v = L.victim { args = table.concat(chunks, " ") }
  v:wait_for("^DONE$", 40, "the join rounds")
  local n, interrupted = 0, 0
  for ok, ok2, e2, alive in v:output():gmatch("ROUND (%S+) (%S+) (.-) (%S+)\n") do
    n = n + 1
    if ok == "false" then interrupted = interrupted + 1 end
    L.fig("rounds", n) L.fig("interrupted", interrupted)
    L.check(ok2 == "true", "round %d: join after a Ctrl-C that landed as the child ended: %s", n, e2)
    L.check(alive == "false", "round %d: is_alive() is still true after the child ended", n)
  end
  L.fig("rounds", n)
  L.check(n == rounds, "%d of %d rounds ran; stderr: %s", n, rounds, v:errors():sub(-300))
end }

return cases
