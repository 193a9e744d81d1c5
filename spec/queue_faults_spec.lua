-- Specs of Queue under faults: readers and writers SIGKILLed or SIGSTOPped at any instant of a
-- take, a put or a big message, and Ctrl-C while another process holds the queue up.
-- Risky parts run in a forked child under a generous deadline (H.bounded): a hang is a failure,
-- never a stuck suite. No spec asserts a duration.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

local error, tostring, pcall, select = error, tostring, pcall, select
local math, string, table = math, string, table

local SIGINT, SIGKILL, SIGCONT, SIGSTOP = 2, 9, 18, 19
local BIG = 128 << 20  -- a big message: copied and decoded for tens of milliseconds

local MISSED = 3  -- a child's exit code: the process it was to catch was not caught in the act

-- runs fn in a forked child (which always leaves with core._exit) and waits up to `limit`
-- seconds; on overrun kills it (its own children die with it: their lifelines). Raises what
-- the child reported, or that it hung; returns true, or false when the child exited MISSED.
local function bounded(limit, fn)
  local pid = H.spawn(fn)
  local code = core.waitpid(pid, limit)
  if code == nil then
    core.kill(pid, SIGKILL)
    core.waitpid(pid)
    error(("hung: killed after %g s"):format(limit), 2)
  end
  if code == MISSED then return false end
  if code ~= 0 then error(("failed (exit code %s): see its message above"):format(tostring(code)), 2) end
  return true
end

-- waits (up to 10 s) for process pid to end, and reaps it
local function reap(pid)
  local code = core.waitpid(pid, 10)
  if code == nil then core.kill(pid, SIGKILL); core.waitpid(pid); error("a child did not end", 2) end
  return code
end

-- a queue whose chunk exists and is empty again: its later use allocates nothing
local function warm(q, v)
  q:put(v or 0)
  q:get()
  return q
end

-- a writer stopped (SIGSTOP) 5 ms into its put of `big` on a fresh queue (not inside the
-- allocator: the checks fork): returns the queue, its pid
local function stop_writer(big)
  local q, m = warm(mp.Queue()), warm(mp.Queue())
  local w = H.spawn(function() m:put("start"); q:put(big) end)
  assert(m:get(10) == "start")
  core.sleep(0.005)
  H.stop_outside_allocator(w)
  m:close()
  return q, w
end

describe("Queue faults", function()
  H.leak_check(before_each, after_each)

  it("readers SIGKILLed at random instants of batched takes: each message is received or claimed", function()
    if os.getenv("MP_VALGRIND") then pending("many rounds of kills: too slow under valgrind") return end
    bounded(120, function()
      local M, R, SLOTS, ROUNDS = 300000, 2, 100, 12
      local kills = 0
      math.randomseed(core.getpid(), math.floor(core.now() * 1e6))
      for round = 1, ROUNDS do
        local q, res, st = mp.Queue(), mp.Queue(), core.PoolState(SLOTS)
        for v = 1, M do q:put(v) end
        -- a reader takes up to 64 messages at once (its claim covers them), reports them and
        -- marks them done; each reader has a slot (a claim) of its own
        local live, nslot, seen = {}, 0, {}
        local function start()
          nslot = nslot + 1
          local i = nslot
          live[i] = H.spawn(function()
            while true do
              local got = table.pack(st:get_task(q, i, 0.3, 64, 0))
              if got[1] == nil then
                if got[2] ~= "timeout" then error("get_task: " .. tostring(got[2])) end
                break
              end
              res:put(got)
              for _ = 1, got.n do st:done(i) end
            end
          end)
        end
        local function claimed(i)  -- what a dead reader held (a take it left half done completes first)
          local last, since, first = st:claimed(i, q)
          assert(last, since)
          if last > 0 then for v = first, last do seen[v] = true end end
        end
        for _ = 1, R do start() end
        while q:qsize() > 0 and nslot < SLOTS do
          core.sleep(math.random() * 0.002)
          local slots = {}
          for i in pairs(live) do slots[#slots + 1] = i end
          table.sort(slots)
          local i = slots[math.random(#slots)]
          core.kill(live[i], SIGKILL)
          reap(live[i])
          live[i] = nil
          kills = kills + 1
          claimed(i)
          start()
        end
        for i, pid in pairs(live) do
          local code = reap(pid)
          if code ~= 0 then error(("reader %d ended with %s (round %d)"):format(i, tostring(code), round)) end
        end
        -- what the readers received, each once
        while true do
          local got, why = res:get(0)
          if got == nil then assert(why == "empty" or why == "timeout", why) break end
          for k = 1, got.n do
            local v = got[k]
            if seen[v] == "received" then error(("message %d received twice (round %d)"):format(v, round)) end
            seen[v] = "received"
          end
        end
        for v = 1, M do
          if not seen[v] then
            error(("message %d lost: neither received nor claimed by a killed reader (round %d, %d kills)")
              :format(v, round, kills))
          end
        end
        local left, why = q:get(0)
        if left ~= nil or (why ~= "empty" and why ~= "timeout") then
          error(("the queue is not empty: %s, %s (round %d)"):format(tostring(left), tostring(why), round))
        end
        q:close(); res:close(); st:close()
      end
      if os.getenv("MP_VERBOSE") then  -- the figure, on demand: a passing `make test` prints nothing
        io.stderr:write(("(%d rounds, %d readers killed) "):format(ROUNDS, kills))
      end
    end)
  end)

  it("a writer SIGSTOPped inside a 128 MiB put: another process's get(0.5) gets a later message, or times out", function()
    if os.getenv("MP_VALGRIND") then pending("needs real speed: skipped under valgrind") return end
    local big = ("x"):rep(BIG)
    local caught = false
    for _ = 1, 5 do
      local q, w = stop_writer(big)
      caught = bounded(10, function()
        local v, why = q:get(0.5)
        if v == big then core._exit(MISSED) end  -- it was stopped after its put
        assert(v == nil and why == "timeout", "expected a timeout, got " .. tostring(v) .. ", " .. tostring(why))
        local p = H.spawn(function() q:put("small") end)
        assert(reap(p) == 0)
        v, why = q:get(0.5)
        assert(v == "small", "expected the later message, got " .. tostring(v) .. ", " .. tostring(why))
      end)
      core.kill(w, SIGCONT)
      assert.equal(0, reap(w))
      if not caught then q:get(1) end
      -- the stopped writer's message arrives whole once it goes on
      local v = q:get(10)
      assert.equal(BIG, v and #v)
      q:close()
      if caught then break end
    end
    if not caught then pending("the writer was never caught inside its put") end
  end)

  it("Ctrl-C ends a get() that waits behind a SIGSTOPped writer of a big message", function()
    if os.getenv("MP_VALGRIND") then pending("needs real speed: skipped under valgrind") return end
    local big = ("x"):rep(BIG)
    local caught = false
    for _ = 1, 5 do
      local q, w = stop_writer(big)
      local ok, err = pcall(bounded, 10, function()
        -- lua.c's SIGINT handler sets a hook; a grandchild delivers the signal
        local me = core.getpid()
        local g = H.spawn(function() core.sleep(0.2); core.kill(me, SIGINT) end)
        local r = { pcall(function() return q:get() end) }
        reap(g)
        if r[2] == big then core._exit(MISSED) end  -- it was stopped after its put
        -- the call returns nil, "interrupted" (or the hook's error reaches the pcall)
        assert((r[1] and r[2] == nil and r[3] == "interrupted") or (not r[1] and tostring(r[2]):find("interrupted")),
          "get was not interrupted: " .. tostring(r[2]) .. ", " .. tostring(r[3]))
      end)
      core.kill(w, SIGKILL)
      reap(w)
      q:close()
      if not ok and tostring(err):find("exit code %-2") then pending("SIGINT has no Lua handler here") return end
      assert(ok, err)
      caught = err
      if caught then break end
    end
    if not caught then pending("the writer was never caught inside its put") end
  end)

  it("a process SIGSTOPped at any instant of its puts never holds up another's get(timeout)", function()
    if os.getenv("MP_VALGRIND") then pending("needs real speed: skipped under valgrind") return end
    -- small messages, few in flight: the chunks are recycled, so the writer is seldom inside
    -- the arena's allocator, and never stopped there (a fork, bounded's, would wait for it)
    local q = warm(mp.Queue(32))
    local msg = ("y"):rep(512)
    local w = H.spawn(function() while true do q:put(msg); q:put(1) end end)
    local d = H.spawn(function() while true do q:get() end end)  -- keeps the writer writing
    local ok, err = pcall(function()
      for _ = 1, 40 do
        core.sleep(math.random() * 0.003)
        H.stop_outside_allocator(w)
        bounded(10, function()
          for _ = 1, 3 do
            local v, why = q:get(0.2)
            assert(v ~= nil or why == "timeout", tostring(why))
          end
        end)
        core.kill(w, SIGCONT)
      end
    end)
    core.kill(w, SIGKILL)
    core.kill(d, SIGKILL)
    reap(w); reap(d)
    q:close()
    assert(ok, err)
  end)

  it("a put SIGKILLed in the middle of a 128 MiB message leaves the arena as it was", function()
    if os.getenv("MP_VALGRIND") then pending("needs real speed: skipped under valgrind") return end
    local big = ("x"):rep(BIG)
    -- a first message of the same size: its block is reused, so the writer cannot be killed in
    -- the arena's page population of a fresh block (see docs/queue.md, "Kills")
    local q, m = warm(mp.Queue(), big), warm(mp.Queue())
    for _ = 1, 3 do
      local used = core.arena_stats().used
      local w = H.spawn(function() m:put("start"); q:put(big); m:put("done") end)
      assert.equal("start", m:get(10))
      core.sleep(0.005 + math.random() * 0.01)
      core.kill(w, SIGKILL)
      reap(w)
      bounded(10, function()
        local v, why = q:get(0.3)  -- the half-written message is dropped, a whole one received
        assert(v == nil and why == "timeout" or #v == BIG, tostring(why))
        if v then m:get(1) end
        assert(m:get(0) == nil)
        v = nil
        collectgarbage()
        local now = core.arena_stats().used
        assert(now == used, ("arena use %d bytes, was %d"):format(now, used))
      end)
      -- the same here, where the child's get did not happen
      local v = q:get(0.3)
      if v then m:get(1) end
      assert.equal(used, core.arena_stats().used)
    end
    q:close(); m:close()
  end)

  it("a get SIGKILLed while it decodes a 128 MiB message: the message is offered again, nothing leaks", function()
    if os.getenv("MP_VALGRIND") then pending("needs real speed: skipped under valgrind") return end
    local big = ("z"):rep(BIG)
    local q, m = warm(mp.Queue(), big), warm(mp.Queue())
    local caught = 0
    for _ = 1, 3 do
      local used = core.arena_stats().used
      q:put(big)
      local r = H.spawn(function() m:put("start"); local v = q:get(); m:put(#v) end)
      assert.equal("start", m:get(10))
      core.sleep(0.002 + math.random() * 0.01)
      core.kill(r, SIGKILL)
      reap(r)
      local done = m:get(0)
      local v, why = q:get(2)
      if done then  -- it got the message before the kill: nothing left
        assert.are.same({ nil, "timeout" }, { v, why })
      else
        caught = caught + 1
        assert.equal(BIG, v and #v, why)
      end
      v = nil
      assert.equal(used, core.arena_stats().used)
    end
    q:close(); m:close()
    if caught == 0 then pending("the reader was never caught inside its get") end
  end)

  -- A process asleep in a get or a put is counted (so that a put or a get wakes it); one killed
  -- asleep used to stay counted for good, and every later put made a FUTEX_WAKE for nobody
  it("takes a getter and a putter killed asleep off the queue's sleepers once they are found dead", function()
    for _, bounded_q in ipairs { false, true } do
      local q = bounded_q and mp.Queue(1) or mp.Queue()
      if bounded_q then q:put("full") end
      local pid = H.spawn(function()
        if bounded_q then q:put("waits") else q:get() end
      end)
      local k = bounded_q and 2 or 1
      assert(H.eventually(function() return select(k, core._queue_sleepers(q)) == 1 end, 20), "it never slept")
      core.kill(pid, SIGKILL)
      assert.equal(-SIGKILL, core.waitpid(pid, 20))   -- (reaped: its entry is freed)
      assert.equal(0, (select(k, core._queue_sleepers(q))), "still counted asleep")
      -- and a live sleeper is still woken
      local got = mp.Queue()
      local other = H.spawn(function()
        if bounded_q then q:put("second") got:put("put") else got:put(q:get()) end
      end)
      assert(H.eventually(function() return select(k, core._queue_sleepers(q)) == 1 end, 20), "the second never slept")
      if bounded_q then assert.equal("full", q:get(10)) else q:put("x") end
      assert.equal(bounded_q and "put" or "x", got:get(10))
      assert.equal(0, core.waitpid(other, 20))
      q:close() got:close()
    end
  end)

  -- The block of a big message always has one owner, the process that holds it or the record
  -- that names it, and passes between them in one store (docs/queue.md, "Kills"): a kill at any
  -- step of a hand-off frees it. (A kill between a get's TAKEN and its free, or between a put
  -- letting go of its block and the record naming it, used to leak the block: 61440 bytes of a
  -- 60,000-byte message in queue_stop_small.)
  describe("a process SIGKILLed as a big message's block changes hands", function()
    local MSG = ("h"):rep(60000)
    local STEPS = 3  -- of each hand-off (see core._queue_fault's "hand")

    -- runs fn in a child that kills itself at step n of its hand-offs from now
    local function killed_at(n, fn)
      local pid = H.spawn(function()
        core._queue_fault("hand", n)
        fn()
      end)
      assert.equal(-9, reap(pid), ("the child was not killed at step %d"):format(n))
    end

    -- the queue's use and the block come back once it is settled and closed
    local function back(q, s0, what)
      q:get_nowait()  -- settles the dead process's record
      assert.equal(0, q:qsize(), what)
      q:close()
      H.assert_arena_back(s0, what, 10)
    end

    it("in its put: the put never happened, the block is freed", function()
      for n = 1, STEPS do
        local s0 = H.arena_settle()
        local q = warm(mp.Queue())
        killed_at(n, function() q:put(MSG) end)
        back(q, s0, ("arena use after a put killed at step %d of its hand-off"):format(n))
      end
    end)

    it("in its get, after decoding: the message goes with it, the block is freed", function()
      for n = 1, STEPS do
        local s0 = H.arena_settle()
        local q = warm(mp.Queue())
        q:put(MSG)
        killed_at(n, function() q:get(10) end)
        back(q, s0, ("arena use after a get killed at step %d of its hand-off"):format(n))
      end
    end)

    it("settling a dead writer's record: the next settler finishes, the block is freed", function()
      for n = 1, STEPS do
        local s0 = H.arena_settle()
        local q = warm(mp.Queue())
        killed_at(2, function() q:put(MSG) end)  -- the record owns the block, unpublished
        killed_at(n, function() q:get_nowait() end)
        back(q, s0, ("arena use after a settler killed at step %d of its take"):format(n))
      end
    end)
  end)

  -- A new chunk passes from the process that made it to its queue as a big message's block
  -- does (docs/queue.md, "Kills"): held, named in the queue, handed to it, linked, let go of.
  -- (A kill between its allocation and its link used to leak it: 2 KiB, up to a chunk's 1 MiB.)
  it("a process SIGKILLed as it links a new chunk: the chunk is freed or in the queue, which goes on", function()
    local STEPS = 3  -- of a link (see core._queue_fault's "chunk")
    for n = 1, STEPS do
      local s0 = H.arena_settle()
      local q = mp.Queue()  -- (no chunk yet: the first put makes one)
      local pid = H.spawn(function()
        core._queue_fault("chunk", n)
        q:put("lost")
      end)
      assert.equal(-9, reap(pid), ("the child was not killed at step %d"):format(n))
      q:put("kept")  -- (the next locker finds the dead one's change: q_repair)
      assert.equal("kept", q:get(10))
      assert.equal(0, q:qsize())
      q:close()
      H.assert_arena_back(s0, ("arena use after a link killed at step %d"):format(n), 10)
    end
  end)

  it("a process SIGKILLed as it frees a drained chunk: the chunk is freed, the queue goes on", function()
    for n = 1, 2 do  -- (the steps of a drop: see core._queue_fault's "chunk")
      local s0 = H.arena_settle()
      local q = mp.Queue()
      local item = ("d"):rep(200)
      for i = 1, 200 do q:put(i .. item) end  -- chunks of 2, 4, 8... KiB: the first drained one
      -- is kept as the spare, the next ones are freed
      local pid = H.spawn(function()
        core._queue_fault("chunk", n)
        for _ = 1, 200 do q:get(10) end
      end)
      assert.equal(-9, reap(pid), ("the child was not killed at step %d"):format(n))
      while q:qsize() > 0 do assert(q:get(10)) end
      q:put("kept")
      assert.equal("kept", q:get(10))
      q:close()
      H.assert_arena_back(s0, ("arena use after a drop killed at step %d"):format(n), 10)
    end
  end)

  -- the writer publishes (one store, without the lock) and exits while a reader, having seen its
  -- record WRITING, asks whether the writer is gone: the record is READY then, and stays so
  it("a big message published just before its writer ends, as a reader looks whether it died, is received", function()
    local q = mp.Queue()
    bounded(60, function()
      local w = H.spawn(function()
        core._queue_pause("publish", 1)  -- its record reserved (WRITING) a second before it is published
        q:put(("w"):rep(100000))
      end)
      assert(H.eventually(function() return q:qsize() == 1 end, 30), "the writer did not reserve its record")
      core._queue_pause("settle", 30)  -- this reader: between its look at the record and its question
      local v, why = q:get(10)
      core._queue_pause("settle", 0)
      reap(w)
      assert(v and #v == 100000, "the message was lost: " .. tostring(why))
    end)
    q:close()
  end)
end)
