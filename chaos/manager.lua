-- chaos/manager.lua: a Manager's clients killed holding or waiting on its Lock, and the manager
-- killed while clients call it: the others must go on (a dead holder's lock released), and every
-- call to a dead manager must raise within the bound, never hang.
local L = require "chaos.lib"
local mp = require "multiprocessing"
local core = L.core
local now, sleep = L.now, L.sleep

local function reap(pr)
  L.check(pr:join(L.BOUND * 2), "a killed process was not reaped within %d s", L.BOUND * 2)
  pr:close()
end

-- three clients calling step(n, i) for i = 1, 2, ... until they are killed at a random instant
local function kill_clients(step)
  local prs = {}
  for n = 1, 3 do
    prs[n] = mp.Process { target = function() for i = 1, 1e9 do step(n, i) end end }:start()
  end
  sleep(L.uniform(0.1, 0.5))
  for _, pr in ipairs(prs) do pr:kill() end
  for _, pr in ipairs(prs) do reap(pr) end
end

return {
  -- Ctrl-C (SIGINT to the case alone) while it waits for a manager Lock another process holds:
  -- the wait is withdrawn on the server, so the lock is free once the holder releases it (it
  -- was not: the server granted it to the interrupted caller, which never knew it held it).
  -- One Ctrl-C per process: lua.c restores SIGINT's default action after one.
  { name = "manager_lock_wait_interrupted", timeout = 60, run = function()
    L.fig("rounds", 0)
    local m <close> = mp.Manager()
    local lock, placed = m:Lock(), m:Event()
    local holder = mp.Process { target = function() lock:acquire() placed:set() sleep(0.6) lock:release() end }:start()
    L.check(placed:wait(L.BOUND * 2), "the holder never took the lock")
    local me = core.getpid()
    local intr = mp.Process { target = function() core.sleep(L.uniform(0.05, 0.3)) core.kill(me, 2) end }:start()
    local ok, err = pcall(lock.acquire, lock, L.BOUND * 4)
    L.check(not ok and L.interrupted(err), "the wait was not interrupted: %s %s", tostring(ok), tostring(err))
    reap(intr)
    reap(holder)
    local t0 = now()
    local free = L.eventually(function() return not lock:locked() end, L.BOUND)
    L.check(free, "the lock stayed held after its holder released it: granted to the interrupted wait")
    L.check(lock:acquire(L.BOUND), "the lock could not be taken again")
    lock:release()
    L.max("notice_ms", math.floor((now() - t0) * 1000 + 0.5))
    L.round_done()
  end },

  -- a client killed (or gone with _exit) while it holds a manager Lock or RLock (two levels), or
  -- while it waits for one: the parent's acquire succeeds within the bound, with "owner died"
  -- when the dead one held it; a killed waiter never takes the lock from a live one
  { name = "manager_lock_holder_killed", timeout = 90, run = function()
    L.fig("rounds", 0)
    local m <close> = mp.Manager()
    for round = 1, L.rounds(4) do
      for _, kind in ipairs { "Lock", "RLock" } do
        local lock = m[kind](m)
        local placed = m:Event()
        local how = L.pick { "kill", "exit", "kill_waiting" }
        if how == "kill_waiting" then lock:acquire() end
        local pr = mp.Process { target = function()
          if how == "kill_waiting" then placed:set() lock:acquire() return end
          lock:acquire()
          if kind == "RLock" then lock:acquire() end
          placed:set()
          if how == "exit" then core._exit(0) end
          sleep(60)
        end }:start()
        L.check(placed:wait(L.BOUND * 2), "round %d: the client never got in place", round)
        sleep(L.uniform(0.02, 0.15))
        if how ~= "exit" then pr:kill() end
        reap(pr)
        local w = L.watchdog(L.BOUND * 4)
        local t0 = now()
        if how == "kill_waiting" then lock:release() end
        local ok, why = lock:acquire(L.BOUND * 2)
        local dt = now() - t0
        local fired = w:disarm()
        L.check(not fired, "round %d (%s, %s): the acquire hung", round, kind, how)
        L.check(ok == true, "round %d (%s, %s): the acquire gave %s, %s after %.1f s", round, kind, how,
          tostring(ok), tostring(why), dt)
        L.check((why == "owner died") == (how ~= "kill_waiting"), "round %d (%s, %s): the acquire said %s",
          round, kind, how, tostring(why))
        L.max("notice_ms", math.floor(dt * 1000 + 0.5))
        lock:release()
        L.check(not lock:locked(), "round %d (%s, %s): still locked after release", round, kind, how)
        L.add("acquired")
      end
      L.round_done()
    end
  end },

  -- the manager killed at a random instant while three clients call it (dict sets and gets,
  -- list appends, a Lock's acquire and release, an Event's wait): each client's calls raise
  -- "the manager process is gone" within the bound; none hangs
  { name = "manager_killed_during_calls", timeout = 120, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(3) do
      local m = mp.Manager()
      local d, l, lock, ev = m:dict(), m:list(), m:Lock(), m:Event()
      local res = mp.Queue()
      local function client(n)
        local ok, err = pcall(function()
          local i = 0
          while true do
            i = i + 1
            if n == 1 then d[i] = i assert(d[i] == i)
            elseif n == 2 then l:append(i) lock:acquire() lock:release()
            else ev:wait(0.05) end
          end
        end)
        res:put { n, tostring(err), now() }
      end
      local prs = {}
      for n = 1, 3 do prs[n] = mp.Process { target = client, args = { n } }:start() end
      sleep(L.uniform(0.1, 0.4))
      local t_kill = now()
      m._proc:kill()
      local w = L.watchdog(L.BOUND * 4)
      for _ = 1, 3 do
        local r = res:get(L.BOUND * 3)
        L.check(r, "round %d: a client's call to the killed manager hung", round)
        L.check(r[2]:find("the manager process is gone", 1, true), "round %d: client %d raised: %s", round, r[1], r[2]:sub(1, 200))
        L.max("notice_ms", math.floor((r[3] - t_kill) * 1000 + 0.5))
      end
      L.check(not w:disarm(), "round %d: the clients did not all stop", round)
      for _, pr in ipairs(prs) do reap(pr) end
      pcall(m.shutdown, m)
      L.round_done()
    end
  end },

  -- clients killed at random instants in the middle of their requests (small and 100 KB values,
  -- calls that wait for an answer and sends that do not, a Lock taken and given back): the
  -- manager goes on serving the parent, its lock is free again, and no answer is mixed up
  { name = "manager_client_killed", timeout = 120, run = function()
    L.fig("rounds", 0)
    local m <close> = mp.Manager()
    local d, l, lock = m:dict(), m:list(), m:Lock()
    local big = ("x"):rep(100000)
    for round = 1, L.rounds(4) do
      kill_clients(function(n, i)
        if n == 1 then d[i % 50] = big assert(#d:get(i % 50) == #big)
        elseif n == 2 then l:append(i) d:update_with("n", function(v) return (v or 0) + 1 end)
        else lock:acquire() d.held = i lock:release() end
      end)
      local w = L.watchdog(L.BOUND * 4)
      local t0 = now()
      d.check = round
      local ok = d.check == round and d:get("missing", "none") == "none"
      local got = lock:acquire(L.BOUND * 2)
      if got then lock:release() end
      local fired = w:disarm()
      L.check(not fired, "round %d: the manager stopped serving after its clients were killed", round)
      L.check(ok, "round %d: the manager gave wrong answers after its clients were killed", round)
      L.check(got, "round %d: the Lock stayed held by a killed client", round)
      L.max("notice_ms", math.floor((now() - t0) * 1000 + 0.5))
      L.add("appends", #l)
      l:clear()
      L.round_done()
    end
  end },

  -- a manager's Pool used by clients killed at random instants while they wait for its results
  -- (apply, map, an imap loop, a get with a timeout): the pool and the manager go on serving the
  -- parent, with the right results, and the killed clients' reply queues are freed
  { name = "manager_pool_client_killed", timeout = 120, run = function()
    L.fig("rounds", 0)
    local m <close> = mp.Manager()
    local pool = m:Pool(2)
    local function spin(x)
      local t = os.clock()
      while os.clock() - t < 0.002 do end
      return x * 2
    end
    local used, blocks
    for round = 0, L.rounds(4) do  -- (round 0 warms up: the queues' chunks grow to their size)
      kill_clients(function(n, i)
        if n == 1 then assert(pool:apply(spin, { i }) == 2 * i)
        elseif n == 2 then assert(pool:map(spin, { i, i + 1, i + 2 })[3] == 2 * (i + 2))
        else
          for _, v in pool:imap(spin, { i, i + 1 }) do assert(v >= 2 * i) end
          pool:apply_async(spin, { i }):get(0.001)
        end
      end)
      local w = L.watchdog(L.BOUND * 4)
      local t0 = now()
      local r = pool:map(spin, { 1, 2, 3 })
      local one = pool:apply(spin, { 21 })
      local fired = w:disarm()
      L.check(not fired, "round %d: the manager's Pool stopped serving after its clients were killed", round)
      L.check(r[1] == 2 and r[2] == 4 and r[3] == 6 and one == 42, "round %d: wrong results after the kills", round)
      L.max("notice_ms", math.floor((now() - t0) * 1000 + 0.5))
      if round == 0 then
        L.eventually(function() collectgarbage() return false end, 1.5)  -- (the server looks every second)
        local st = core.arena_stats()
        used, blocks = st.used, st.blocks
      else
        L.round_done()
      end
    end
    -- the pool's pending results and the clients' queues: once the server has looked (every
    -- second). A leaked queue is a block more (and 64 KiB of chunk); the server's ledger may have
    -- been rebuilt bigger meanwhile, for as many live references as it held then (its clients'
    -- queues: 16 entries of 16 bytes more, once, kept while it holds few: docs/arena.md "Ledgers")
    collectgarbage() collectgarbage()
    local back = L.eventually(function()
      local st = core.arena_stats()
      return st.blocks <= blocks and st.used <= used + 512
    end, L.BOUND * 2)
    local st = core.arena_stats()
    L.check(back, "the killed clients' reply queues were not freed: arena use %d -> %d, blocks %d -> %d",
      used, st.used, blocks, st.blocks)
  end },
}
