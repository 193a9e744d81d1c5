-- chaos/queue_faults.lua: producers and consumers of a Queue killed and stopped at random instants,
-- mostly inside queue operations (issue 7, item 5 and "never lose"). Counted: every message whose
-- put returned arrives exactly once (less at most one per killed consumer, which may have taken a
-- message and died before recording it), nothing arrives twice, other processes' get(timeout)
-- return in time, and arena use is back to its start once everything is closed.
local L = require "chaos.lib"
local mp = require "multiprocessing"
local core = L.core
local now, sleep, kill = L.now, L.sleep, core.kill
local SIGKILL, SIGSTOP, SIGCONT = 9, 19, 18
local MB = 1 << 20

local GET = 0.02  -- the main consumer's get timeout

-- cfg: producers, consumers (killable ones; the case's own process is one more), max (messages
-- per producer), sizes (payload sizes, picked in turn), actions (faults), gap (seconds between),
-- lives (producers started per producer slot of the storm: a killed one is replaced while any is left)
local function storm(cfg)
  return function()
    local start_arena = L.arena_used()
    local slots = cfg.producers * (cfg.lives or 4)
    local MAX = cfg.max
    local q = mp.Queue(cfg.maxsize or 0)
    local put_done = mp.Array("q", slots)         -- per producer: the last message whose put returned
    local got = mp.Array("b", slots * MAX)         -- per message: how many times a consumer recorded it
    local stop = mp.Event()
    local payloads = {}
    for k, size in ipairs(cfg.sizes) do payloads[k] = string.rep(string.char(96 + k), size) end
    local main_got = {}

    local producers, consumers, stopped = {}, {}, {}
    local next_slot = 0
    local function new_producer()
      if next_slot >= slots then return end
      next_slot = next_slot + 1
      local slot = next_slot
      local pr = mp.Process { target = function()
        for i = 1, MAX do
          if stop:is_set() then break end
          q:put({ slot, i, payloads[i % #payloads + 1] })
          put_done[slot] = i
        end
      end }:start()
      producers[pr.pid] = { pr = pr, slot = slot }
    end
    local function new_consumer()
      local pr = mp.Process { target = function()
        while true do
          local v = q:get(0.1)
          if v then
            local at = (v[1] - 1) * MAX + v[2]
            got[at] = got[at] + 1
          elseif stop:is_set() then
            break
          end
        end
      end }:start()
      consumers[pr.pid] = { pr = pr }
    end
    local function record(v)
      local at = (v[1] - 1) * MAX + v[2]
      main_got[at] = (main_got[at] or 0) + 1
      L.add("received")
    end
    -- the case's own get: must return within its timeout and the bound, whatever the others do
    local function main_get(timeout)
      local t0 = now()
      local v = q:get(timeout)
      local late = now() - t0 - timeout
      L.max("get_late_ms", math.max(0, math.floor(late * 1000 + 0.5)))
      if late > L.BOUND then L.fail("q:get(%g) took %.1f s while others were being killed and stopped", timeout, late + timeout) end
      if v then record(v) end
      return v
    end

    for _ = 1, cfg.producers do new_producer() end
    for _ = 1, cfg.consumers do new_consumer() end
    L.fig("rounds", 0) L.fig("kills", 0) L.fig("stops", 0) L.fig("received", 0) L.fig("consumer_kills", 0)

    -- the storm: a fault every gap seconds, the case's own gets in between
    local wd
    for _ = 1, L.rounds(cfg.actions) do
      wd = L.watchdog(cfg.gap * 2 + L.BOUND + 2)
      local ok, err = pcall(function()
        local until_t = now() + L.uniform(cfg.gap / 2, cfg.gap * 1.5)
        while now() < until_t do main_get(GET) end
        -- continue or kill the stopped ones whose time is up
        for pid, s in pairs(stopped) do
          if now() >= s.till then
            kill(pid, s.then_kill and SIGKILL or SIGCONT)
            if s.then_kill then L.add("kills") end
            stopped[pid] = nil
          end
        end
        local producer = math.random() < (cfg.producer_share or 0.6)
        local group = producer and producers or consumers
        local pids = {}
        for pid in pairs(group) do if not stopped[pid] and L.alive(pid) then pids[#pids + 1] = pid end end
        table.sort(pids)
        if #pids == 0 then return end
        local pid = L.pick(pids)
        if math.random() < (cfg.kill_share or 0.6) then
          kill(pid, SIGKILL)
          L.add("kills")
          if not producer then L.add("consumer_kills") end
        else
          kill(pid, SIGSTOP)
          L.add("stops")
          stopped[pid] = { till = now() + L.uniform(0.05, cfg.stop or 0.4), then_kill = math.random() < 0.5 }
          if stopped[pid].then_kill and not producer then L.add("consumer_kills") end
        end
        -- replace the dead (a killed producer's slot is not reused: its count stays as it was),
        -- but not while a process stopped here holds the allocator's lock: a start takes an
        -- entry in the arena's process table under that lock, so it would wait (as documented)
        -- until this loop continues the holder, which it cannot do while it waits
        local holder = core._arena_holder()
        if holder and stopped[holder] then L.add("starts_put_off") return end
        for _, g in ipairs { producers, consumers } do
          local dead = {}
          for p, rec in pairs(g) do
            if not stopped[p] and not L.alive(p) and rec.pr.exitcode ~= 0 then dead[#dead + 1] = p end
          end
          for _, p in ipairs(dead) do
            g[p].pr:join(L.BOUND) g[p].pr:close()
            g[p] = nil
            if g == producers then new_producer() else new_consumer() end
          end
        end
      end)
      if wd:disarm() or (not ok and L.interrupted(err)) then
        L.fail("a get(%g) (or a process's start) hung while others were being killed and stopped (%d stopped now); the watchdog ended it", GET,
          (function() local n = 0 for _ in pairs(stopped) do n = n + 1 end return n end)())
      end
      if not ok then error(err, 0) end
      L.round_done()
    end

    -- the end: everything continued, producers told to stop and joined, the queue drained
    for pid, s in pairs(stopped) do kill(pid, s.then_kill and SIGKILL or SIGCONT) if s.then_kill then L.add("kills") end end
    stop:set()
    wd = L.watchdog(30)
    local ok, err = pcall(function()
      for _, rec in pairs(producers) do
        local t0 = now()
        while not rec.pr:join(0) and now() - t0 < L.BOUND * 2 do main_get(GET) end
        L.check(rec.pr:join(0), "producer %d did not finish within %d s of being told to stop", rec.slot, L.BOUND * 2)
      end
      for _, rec in pairs(consumers) do
        local t0 = now()
        while not rec.pr:join(0) and now() - t0 < L.BOUND * 2 do main_get(GET) end
        L.check(rec.pr:join(0), "a consumer did not finish within %d s after the producers stopped", L.BOUND * 2)
      end
      while main_get(0.2) do end
    end)
    if wd:disarm() or (not ok and L.interrupted(err)) then L.fail("the final drain hung (30 s)") end
    if not ok then error(err, 0) end

    -- the count
    local sent, lost, dups, extra = 0, 0, 0, 0
    for slot = 1, next_slot do
      local done = put_done[slot]
      sent = sent + done
      for i = 1, MAX do
        local at = (slot - 1) * MAX + i
        local c = got[at] + (main_got[at] or 0)
        if c > 1 then dups = dups + 1
        elseif i <= done and c == 0 then lost = lost + 1
        elseif i == done + 1 and c == 1 then extra = extra + 1   -- its put returned; the producer died before it counted
        elseif i > done + 1 and c > 0 then L.fail("producer %d: message %d arrived but was never put (last put %d)", slot, i, done) end
      end
    end
    local arrived = 0
    for at = 1, slots * MAX do arrived = arrived + got[at] end
    for _, c in pairs(main_got) do arrived = arrived + c end
    L.fig("sent", sent) L.fig("arrived", arrived) L.fig("lost", lost) L.fig("dups", dups)
    L.check(dups == 0, "%d messages arrived twice", dups)
    L.check(lost <= L.get("consumer_kills"), "%d messages whose put returned never arrived (%d consumers were killed, %d sent)",
      lost, L.get("consumer_kills"), sent)

    for _, group in ipairs { producers, consumers } do
      for _, rec in pairs(group) do rec.pr:close() end
    end
    q:close() put_done:close() got:close() stop:close()
    collectgarbage() collectgarbage()
    L.fig("arena", ("%d->%d"):format(start_arena, L.arena_used()))
    L.check(L.arena_used() == start_arena, "arena use %d bytes after everything was closed, %d at the start (%+d)",
      L.arena_used(), start_arena, L.arena_used() - start_arena)
  end
end

return {
  -- kills only: nothing lost, nothing twice
  { name = "queue_kill_small", timeout = 30, run = storm {
    producers = 3, consumers = 2, max = 20000, actions = 40, gap = 0.05, kill_share = 1,
    sizes = { 16, 200, 40, 3000, 8, 20000, 100, 60000 } } },
  { name = "queue_kill_bounded", timeout = 30, run = storm {
    producers = 3, consumers = 2, max = 20000, actions = 30, gap = 0.05, maxsize = 50, kill_share = 1,
    sizes = { 16, 200, 3000, 60000 } } },
  { name = "queue_kill_64MiB", timeout = 40, run = storm {
    producers = 2, consumers = 1, max = 6, actions = 10, gap = 0.1, producer_share = 0.7, kill_share = 1,
    sizes = { 64 * MB } } },
  -- big messages only, a kill every ~10 ms: each kill lands somewhere in a put or a get of a
  -- block of its own, so the hand-offs of those blocks between processes and records are hit
  -- often (kills between a record letting go of a block and a process holding it, or back, left
  -- 61440-byte blocks behind in 12 of 30 runs here before blocks named their owner)
  { name = "queue_kill_big", timeout = 30, run = storm {
    producers = 3, consumers = 3, max = 20000, actions = 200, gap = 0.01, kill_share = 1, lives = 40,
    sizes = { 60000 } } },
  -- stops too (then continued or killed): other processes' gets must not wait on a stopped one
  { name = "queue_stop_small", timeout = 20, run = storm {
    producers = 3, consumers = 2, max = 20000, actions = 40, gap = 0.05,
    sizes = { 16, 200, 40, 3000, 8, 20000, 100, 60000 } } },
  { name = "queue_stop_64MiB", timeout = 30, run = storm {
    producers = 2, consumers = 1, max = 6, actions = 10, gap = 0.1, stop = 0.6, producer_share = 0.7,
    sizes = { 64 * MB } } },

  -- item 5: a producer stopped inside a 64 MiB put must not block another process's get(timeout)
  { name = "queue_stopped_in_put", timeout = 25, run = function()
    local big = string.rep("s", 64 * MB)
    L.fig("rounds", 0)
    for round = 1, L.rounds(6) do
      local q = mp.Queue()
      local started = mp.Event()
      local pr = mp.Process { target = function() started:set() for _ = 1, 4 do q:put(big) end end }:start()
      started:wait(10)
      sleep(L.uniform(0, 0.03))
      kill(pr.pid, SIGSTOP)
      L.fig("at", ("round_%d:get(0.2)_while_a_producer_is_stopped_in_put"):format(round))
      L.emit()
      local wd = L.watchdog(L.BOUND + 5)
      local t0 = now()
      local ok, v, why = pcall(q.get, q, 0.2)
      local dt = now() - t0
      local fired = wd:disarm()
      L.check(not fired and not (not ok and L.interrupted(v)), "round %d: q:get(0.2) hung while a producer was stopped inside a 64 MiB put", round)
      L.check(dt <= 0.2 + L.BOUND, "round %d: q:get(0.2) took %.1f s while a producer was stopped inside a put", round, dt)
      L.max("get_ms", math.floor(dt * 1000 + 0.5))
      L.fig("last", v and "value" or tostring(why))
      L.fig("at", "-")
      kill(pr.pid, SIGKILL)
      kill(pr.pid, SIGCONT)
      pr:join(L.BOUND)
      pr:close()
      q:close()
      L.round_done()
    end
  end },
}
