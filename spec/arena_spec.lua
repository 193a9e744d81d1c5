-- Specs of the arena: memory comes back after objects, pools and processes are gone
-- (whatever was killed on the way), bounded rounding, running out, kills under its lock.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- targets must not reach globals through busted's sandbox (see pool_spec.lua)
local string, collectgarbage = string, collectgarbage

local MiB = 1 << 20
-- a fork takes over a second under valgrind: a few rounds there (a leak shows in any number)
local VALGRIND = os.getenv("MP_VALGRIND") ~= nil
local function rounds(n, under_valgrind) return VALGRIND and under_valgrind or n end

-- the arena's use once every unreachable handle was collected (arena_stats sweeps first)
local function settle()
  collectgarbage()
  collectgarbage()
  return core.arena_stats()
end

local function assert_back(s0, what)
  local s = H.eventually(function()  -- a killed process may take a moment to be gone
    local s = settle()
    return s.used == s0.used and s.blocks == s0.blocks and s.processes == s0.processes and
      s.deferred == s0.deferred and s
  end, 10) or settle()
  assert.are.same({ used = s0.used, blocks = s0.blocks, deferred = s0.deferred, processes = s0.processes },
    { used = s.used, blocks = s.blocks, deferred = s.deferred, processes = s.processes }, what)
  assert.is_true(core.arena_check())
end

-- settle() once `processes` is back to n: a grandchild whose parent was killed leaves by
-- its death signal, which may take a moment
local function settle_processes(n)
  return H.eventually(function()
    local s = settle()
    return s.processes == n and s
  end, 10) or settle()
end

-- runs a script in a child interpreter with env settings; returns its exit status and output
local function run_script(env, script)
  local src, out = H.tmpname(), H.tmpname()
  local f = assert(io.open(src, "w")) f:write(script) f:close()
  local ok = os.execute(("%s %s %s %s > %s 2>&1"):format(env, H.ENV, H.LUA, src, out))
  return ok, H.slurp(out)
end

describe("arena", function()
  H.leak_check(before_each, after_each)

  before_each(function() core.Queue():close() end)  -- the arena exists

  describe("gives memory back", function()
    -- starts and joins n Processes, closing each or leaving it to the collector
    local function processes(n, close)
      local s0 = settle()
      for i = 1, n do
        local p = mp.Process { target = function(x) return x * 2 end, args = { i } }
        p:start()
        assert.is_true(p:join(10))
        assert.equal(0, p.exitcode)
        if close then p:close() end
      end
      assert_back(s0, ("arena use after %d Processes (%s)"):format(n, close and "closed" or "collected"))
    end

    it("after 500 Processes started, joined and closed", function() processes(rounds(500, 5), true) end)

    it("after 500 Processes that were only collected", function() processes(rounds(500, 5), false) end)

    it("after 100 Pools made, used and joined", function()
      local s0 = settle()
      for i = 1, rounds(100, 2) do
        local pool = mp.Pool(2)
        local r = pool:map(function(x) return x * 2 end, { i, i + 1, i + 2 })
        assert.are.same({ 2 * i, 2 * i + 2, 2 * i + 4 }, { r[1], r[2], r[3] })
        pool:close()
        pool:join()
      end
      assert_back(s0, "arena use after 100 Pools")
    end)

    it("of queues made before a fork and closed after the child is reaped", function()
      local s0 = settle()
      local qs = {}
      for i = 1, 20 do qs[i] = mp.Queue() end
      local pid = H.spawn(function()
        for i = 1, 20 do qs[i]:put(("message %d"):format(i)) end
      end)
      assert.equal(0, core.waitpid(pid, 10))
      for i = 1, 20 do assert.equal(("message %d"):format(i), qs[i]:get(1)) end
      for i = 1, 20 do qs[i]:close() end
      assert_back(s0, "arena use after closing queues a child used")
    end)

    it("of a queue closed while a child uses it, once the child is reaped", function()
      local s0 = settle()
      local q, go = mp.Queue(), mp.Event()
      local pid = H.spawn(function()
        assert(go:wait(10), "never told to go")
        -- the parent closed its handle: our copy must still work
        q:put(string.rep("x", 100000))
        assert(#q:get(1) == 100000)
      end)
      q:close()
      local s = settle()
      assert.is_true(s.deferred >= 1)            -- kept for the child
      assert.equal(s0.processes + 1, s.processes)
      go:set()
      assert.equal(0, core.waitpid(pid, 10))     -- the child could use it all along
      go:close()
      assert_back(s0, "arena use after the child that held a closed queue")
    end)

    it("of objects whose users were SIGKILLed", function()
      local s0 = settle()
      local q, lock, v, ev = mp.Queue(), mp.Lock(), mp.Value("i", 0), mp.Event()
      local pids = {}
      for k = 1, 4 do
        pids[k] = H.spawn(function()
          if k == 1 then lock:acquire() end     -- dies holding it
          for i = 1, 1000 do q:put(i) v.value = i end
          ev:set()
          core.sleep(30)
        end)
      end
      assert.is_true(ev:wait(10))
      for k = 1, 4 do core.kill(pids[k], 9) end
      for k = 1, 4 do assert.equal(-9, core.waitpid(pids[k], 10)) end
      q:close() lock:close() v:close() ev:close()
      assert_back(s0, "arena use after SIGKILLed users")
    end)

    it("of blocks a process held when it was SIGKILLed", function()
      local s0 = settle()
      local ready = mp.Event()
      local pid = H.spawn(function()
        core._arena_hold(16 * MiB)              -- a big message being copied, say
        core._arena_hold(100)
        core.blob_free(core._blob_hold(1000))   -- freed: let go of as well
        ready:set()
        core.sleep(30)
      end)
      assert.is_true(ready:wait(10))
      assert.is_true(core.arena_stats().used > s0.used + 16 * MiB)
      core.kill(pid, 9)
      assert.equal(-9, core.waitpid(pid, 10))
      ready:close()
      assert_back(s0, "arena use after a process died holding blocks")
    end)

    it("of objects an orphan held, once the orphan dies", function()
      local s0 = settle()
      local q, r = mp.Queue(), mp.Queue()
      local pid = H.spawn(function()
        local orphan = core.fork(false, 0)      -- outlives us: no parent-death signal
        if orphan == 0 then
          q:put("held")
          core.sleep(30)
          core._exit(0)
        end
        r:put(orphan)
      end)
      local orphan = r:get(10)
      assert.equal(0, core.waitpid(pid, 10))
      assert.equal("held", q:get(10))
      q:close() r:close()
      assert.is_true(settle().deferred >= 1)    -- the orphan still lives
      core.kill(orphan, 9)                      -- init reaps it, not us
      assert_back(s0, "arena use after the orphan died")
    end)
  end)

  describe("rounding", function()
    it("stores a 1 MiB message in less than 1.25 MiB", function()
      local q = mp.Queue()
      q:put(1)   -- the queue's first chunk
      local s0 = core.arena_stats()
      q:put(string.rep("x", MiB))
      local grew = core.arena_stats().used - s0.used
      assert.is_true(grew >= MiB and grew < MiB + MiB // 4, ("a 1 MiB message took %d bytes"):format(grew))
      assert.equal(1, q:get())
      assert.equal(MiB, #q:get())
      q:close()
    end)

    it("wastes at most an eighth of any block, or a page of a big one", function()
      local s0 = settle()
      for _, n in ipairs { 1, 17, 100, 257, 1000, 4097, 65537, 300000, MiB - 40, MiB + 1, 2 * MiB, 3 * MiB + 5 } do
        local before = core.arena_stats().used
        local b = core.blob_new(string.rep("b", n))
        local took = core.arena_stats().used - before
        local want = n + 8 + 32   -- the blob's length, the block's header
        assert.is_true(took >= want and (took <= want + want // 8 + 32 or took <= want + 4096),
          ("%d bytes took a block of %d"):format(n, took))
        core.blob_free(b)
      end
      assert_back(s0, "arena use after blobs")
    end)
    it("uses the space of a freed big block again", function()
      local q = mp.Queue()
      q:put(string.rep("w", 8 * MiB))
      assert.equal(8 * MiB, #q:get())
      local top = core.arena_stats().top
      for _ = 1, 50 do
        q:put(string.rep("w", 8 * MiB))
        assert.equal(8 * MiB, #q:get())
      end
      assert.equal(top, core.arena_stats().top)
      q:close()
    end)
  end)

  describe("running out", function()
    it("says 'out of shared memory' and works again once things are freed", function()
      local ok, out = run_script("LUA_MP_ARENA_SIZE=16777216", [[
        local core = require "multiprocessing.core"
        local q = core.Queue()
        local big, n, err = string.rep("x", 1 << 20), 0
        while true do
          local ok, e = pcall(q.put, q, big)
          if not ok then err = e break end
          n = n + 1
        end
        assert(err:find("out of shared memory: ", 1, true), err)
        assert(err:find("arena limit 16777216 bytes", 1, true), err)
        assert(n >= 8, n)
        for _ = 1, n do assert(#q:get() == 1 << 20) end
        q:close()
        -- the space of many freed blocks serves one big block
        local q2 = core.Queue()
        q2:put(string.rep("y", 12 << 20))
        assert(#q2:get() == 12 << 20)
        q2:close()
        -- full of small objects, freed, then big again
        local t = {}
        while true do
          local ok, x = pcall(core.Queue)
          if not ok then err = x break end
          t[#t + 1] = x
        end
        assert(err:find("out of shared memory: ", 1, true), err)
        for _, x in ipairs(t) do x:close() end
        t = nil
        local q3 = core.Queue()
        q3:put(string.rep("z", 12 << 20))
        assert(#q3:get() == 12 << 20)
        q3:close()
        assert(core.arena_check())
        assert(core.arena_stats().used == 0, core.arena_stats().used)
        print("recovered")
      ]])
      assert.is_true(ok, out)
      assert.matches("recovered", out)
    end)
  end)

  describe("a process killed under the arena lock", function()
    it("at any store of an allocation or a free leaves the allocator whole", function()
      local s0 = settle()
      local lost = 0
      for n = 1, 40, rounds(1, 9) do
        local pid = H.spawn(function()
          core._arena_fault(n)
          for i = 1, 8 do
            local small = core.blob_new(string.rep("s", 10 * i))   -- one block held at a time
            core.blob_free(small)
            local large = core.blob_new(string.rep("l", 3 * MiB + i))
            core.blob_free(large)
          end
        end)
        assert.equal(-9, core.waitpid(pid, 10))
        assert.is_true(core.arena_check())   -- the next locker finished the journal
        local s = settle()
        assert.is_true(s.blocks - s0.blocks <= lost + 1, "more than the one block the dead process held")
        lost = s.blocks - s0.blocks
        local b = core.blob_new(string.rep("again", 1000))   -- and it still works
        core.blob_free(b)
      end
    end)

    it("inside a free loses nothing: the block being freed is held, so it goes with the process", function()
      local s0 = settle()
      for _, size in ipairs { 100, 3 * MiB } do
        for n = 1, 6 do   -- every store of the free's change
          local pid = H.spawn(function()
            local b = core.blob_new(string.rep("f", size))
            core._arena_fault(n)
            core.blob_free(b)
            core._exit(0)   -- (a free with fewer stores than n)
          end)
          local code = core.waitpid(pid, 10)
          assert.is_true(code == -9 or code == 0)
          assert.is_true(core.arena_check())
          local s = settle()
          assert.equal(s0.blocks, s.blocks, ("a kill at store %d of a free of %d bytes kept its block"):format(n, size))
          assert.equal(s0.used, s.used)
        end
      end
    end)

    it("while forking leaves no process entry behind", function()
      local s0 = settle()
      for n = 1, 6, rounds(1, 5) do
        local pid = H.spawn(function()
          core._arena_fault(n)
          local child = core.fork()
          if child == 0 then core._exit(0) end
          core.waitpid(child)
        end)
        local code = core.waitpid(pid, 10)
        assert.is_true(code == -9 or code == 0)
      end
      local s = settle_processes(s0.processes)
      assert.equal(s0.processes, s.processes)
      assert.is_true(core.arena_check())
    end)

    it("at random instants keeps the allocator whole", function()
      local s0 = settle()
      local kills = rounds(30, 3)
      for r = 1, kills do
        local pid = H.spawn(function()
          local i = 0
          while true do
            i = i + 1
            local b = core.blob_new(string.rep("r", (i * 7919) % 300000))
            core.Queue():close()
            core.blob_free(b)
          end
        end)
        core.sleep((r % 7) * 0.001)
        core.kill(pid, 9)
        assert.equal(-9, core.waitpid(pid, 10))
        assert.is_true(core.arena_check())
      end
      local s = settle()
      -- a dead process can only have lost what it held: a blob and a queue per round
      assert.is_true(s.blocks - s0.blocks <= 2 * kills)
    end)

    it("among others allocating and forking, never tells a live child its parent died", function()
      local s0 = settle()
      local kills = 0
      for r = 1, rounds(100, 2) do
        local pids = {}
        for k = 1, 4 do
          pids[k] = H.spawn(function()
            for i = 1, math.huge do
              local b = core.blob_new(string.rep("c", (i * 7919 + k) % 400000))
              local q = core.Queue()
              if i % 3 == 0 then  -- children that start while others check the table
                local c = core.fork()
                if c == 0 then core._exit(0) end
                core.waitpid(c)
              end
              q:close()
              core.blob_free(b)
            end
          end)
        end
        core.sleep((r % 10) * 0.001)
        for k = 1, 4 do core.kill(pids[k], 9) end
        -- -9 each: none left early because its entry looked dead before it started
        for k = 1, 4 do assert.equal(-9, core.waitpid(pids[k], 10)) end
        kills = kills + 4
        assert.is_true(core.arena_check())
      end
      local s = settle_processes(s0.processes)
      assert.equal(s0.processes, s.processes)
      assert.is_true(s.blocks - s0.blocks <= 2 * kills)
    end)
  end)

  describe("a process stopped under the arena lock", function()
    local SIGCONT, SIGKILL = 18, 9

    -- Runs check in a forked child once another child has stopped itself (SIGSTOP) holding
    -- the arena's lock in the middle of a change, then continues that one. Both are forked
    -- first: a fork needs the allocator too. check is bounded by 20 s: a hang is a failure,
    -- not a stuck suite. Returns the holder's pid.
    -- wait: the holder is continued only after `wait` seconds, and the check must still be
    -- waiting then (a call without a timeout), or only once the check is done (wait nil)
    local function behind_stopped_holder(check, wait, before)
      local go, ready = core.Queue(), core.Queue()
      go:put(0) go:get()   -- its chunk exists: the put below allocates nothing
      ready:put(0) ready:get()
      local checker = H.spawn(function()
        local st = before and before()   -- (in the checker, before the holder stops)
        ready:put(true)   -- before() may allocate: the holder is started only once it is done
        local holder = go:get(20)
        check(holder, st)
      end)
      assert(ready:get(20), "the checker never got ready")
      local holder, stopped = H.stopped_arena_holder()
      if stopped then go:put(holder) end
      local early
      if wait then
        core.sleep(wait)
        early = core.reap(checker, true)   -- it must still be waiting
        core.kill(holder, SIGCONT)
      end
      local code = core.waitpid(checker, 20)
      core.kill(holder, SIGCONT)   -- first: reaping needs the allocator too
      if code == nil then core.kill(checker, SIGKILL) core.waitpid(checker) end
      assert.equal(0, core.waitpid(holder, 20))
      go:close() ready:close()
      assert(stopped, "the holder never stopped")
      assert(code ~= nil, "hung behind the stopped holder: killed after 20 s")
      assert.equal(0, code, "the check failed (see its message above)")
      assert.is_nil(early, "the call did not wait for the stopped holder")
      assert.is_true(core.arena_check())
      return holder
    end

    it("ends a put(v, timeout) that must allocate at its timeout, naming the stopped process", function()
      local q1, q2 = mp.Queue(), mp.Queue()
      behind_stopped_holder(function(holder)
        local want = ("held by stopped process %d"):format(holder)
        -- a big message (a block of its own), then a queue's first chunk (under the queue's lock)
        for _, put in ipairs { function() return q1:put(string.rep("x", 100000), 0.2) end,
                               function() return q2:put("small", 0.2) end } do
          local ok, err = pcall(put)
          assert(not ok, "the put succeeded behind a stopped allocator")
          assert(tostring(err):find("timed out: the shared memory allocator is " .. want, 1, true), err)
        end
      end)
      -- nothing half done: both queues work, the failed big put left no record
      assert.is_true(q1:put("a") and q2:put("b"))
      assert.equal("a", q1:get(5))
      assert.equal("b", q2:get(5))
      assert.is_true(q1:empty())
      q1:close() q2:close()
    end)

    it("does not hold up a get or a free: they free once the holder goes on", function()
      local s0 = settle()
      local q = mp.Queue()
      q:put(0) q:get()
      local base = settle()
      q:put(string.rep("g", 200000))   -- a block of its own, freed by its get
      behind_stopped_holder(function()
        assert.equal(200000, #q:get(5))   -- its get frees the message's block
      end)
      -- the holder's unlock freed what was left pending: what the child took and freed
      local s = H.eventually(function() local s = settle() return s.used == base.used and s end, 10) or settle()
      assert.equal(base.used, s.used)
      q:close()
      assert_back(s0, "the frees made while the allocator was stopped")
    end)

    it("loses nothing when a free is killed as it puts its block on the pending stack", function()
      local s0 = settle()
      local go, ready = core.Queue(), core.Queue()
      go:put(0) go:get()   -- their chunks exist: the puts below allocate nothing
      ready:put(0) ready:get()
      local freer = H.spawn(function()
        local b = core.blob_new(string.rep("p", 1000))
        ready:put(true)
        assert(go:get(20), "the holder never stopped")
        core._arena_fault(1, "push")   -- killed between marking the block pending and pushing it
        core.blob_free(b)
        core._exit(0)
      end)
      assert(ready:get(20), "the freer never got ready")
      local holder, stopped = H.stopped_arena_holder()
      go:put(stopped)
      local code = core.waitpid(freer, 20)
      core.kill(holder, SIGCONT)
      if code == nil then core.kill(freer, SIGKILL) core.waitpid(freer) end
      assert.equal(0, core.waitpid(holder, 20))
      go:close() ready:close()
      assert(stopped, "the holder never stopped")
      assert.equal(-9, code, "the free was not killed in its push")
      -- the block it held goes with it (it was on no stack)
      assert_back(s0, "a free killed as it pushed its block")
    end)

    -- an object made before a fork: its last release needs the allocator, to see whether a
    -- later fork lives (issue 7: it waited for a stopped holder with no way out)
    local function made_before_a_fork(release_now)
      local x = core.Queue()
      local g = core.fork()
      if g == 0 then core.sleep(60) core._exit(0) end
      if release_now then x:close() end   -- g may hold it: deferred
      return { x = x, g = g }
    end

    it("does not hold up the release of an object made before a fork: it is freed once the holder goes on", function()
      local s0 = settle()
      behind_stopped_holder(function(_, st)
        st.x:close()    -- goes on the pending stack, deferred by the holder's unlock
        core.kill(st.g, SIGKILL)
        assert(core.waitpid(st.g, 20) == -9)
      end, nil, made_before_a_fork)
      local s = H.eventually(function() local s = settle() return s.used == s0.used and s end, 10) or settle()
      assert.equal(s0.used, s.used)
      assert.equal(0, s.deferred)
      assert_back(s0, "the release made while the allocator was stopped")
    end)

    it("does not hold up a sweep of the deferred list", function()
      local s0 = settle()
      behind_stopped_holder(function(_, st)
        core._arena_sweep()   -- a deferred object is listed: the sweep would need the allocator
        core.kill(st.g, SIGKILL)
        assert(core.waitpid(st.g, 20) == -9)
      end, nil, function() return made_before_a_fork(true) end)
      local s = H.eventually(function() local s = settle() return s.used == s0.used and s end, 10) or settle()
      assert.equal(s0.used, s.used)
      assert_back(s0, "the sweep tried while the allocator was stopped")
    end)

    it("lets a call without a timeout wait until the holder goes on", function()
      behind_stopped_holder(function()
        local q = core.Queue()   -- Queue() has no timeout: it waits for the allocator
        assert.is_true(q:put("made") and q:get(5) == "made")
        q:close()
      end, 0.5)
    end)

    it("Ctrl-C ends a call without a timeout that waits for it", function()
      local ok, out = run_script("timeout -k 5 30 env", [[
        local mp = require "multiprocessing"
        local core = require "multiprocessing.core"
        local q = mp.Queue()
        local me = core.getpid()
        local ctrl_c = core.fork()   -- forked first: a fork needs the allocator too
        if ctrl_c == 0 then core.sleep(1.5) core.kill(me, 2) core._exit(0) end
        local holder = core.fork()
        if holder == 0 then core._arena_fault(1, "stop") core.blob_free(core.blob_new("x")) core._exit(0) end
        repeat core.sleep(0.01)
        until io.open(("/proc/%d/stat"):format(holder)):read("a"):match("^%d+ %b() (%a)") == "T"
        local r = { pcall(function() return mp.Queue() end) }
        print("Queue", r[1], r[2])
        print("state", io.open(("/proc/%d/stat"):format(holder)):read("a"):match("^%d+ %b() (%a)"))
        core.kill(holder, 18)
        print("holder", core.waitpid(holder, 10), core.waitpid(ctrl_c, 10))
        print("check", core.arena_check(), q:put(1), q:get(1))
      ]])
      assert(out:find("Queue\tfalse\t[^\n]*interrupted[^\n]*held by stopped process"), out)
      assert(out:find("state\tT"), out)
      assert(out:find("holder\t0\t0"), out)
      assert(out:find("check\ttrue\ttrue\t1"), out)
      assert(ok, out)
    end)

    it("Ctrl-C ends a fork that waits for it, leaving no descriptor behind", function()
      local ok, out = run_script("timeout -k 5 30 env", [[
        local core = require "multiprocessing.core"
        local list = os.tmpname()
        local function fds()   -- (not io.popen: the parent holds both ends of its pipe a moment)
          assert(os.execute(("ls /proc/%d/fd > %s"):format(core.getpid(), list)))
          local n = 0
          for _ in io.lines(list) do n = n + 1 end
          return n
        end
        local me = core.getpid()
        local ctrl_c = core.fork()
        if ctrl_c == 0 then core.sleep(1.5) core.kill(me, 2) core._exit(0) end
        local holder = core.fork()
        if holder == 0 then core._arena_fault(1, "stop") core.blob_free(core.blob_new("x")) core._exit(0) end
        local function state(pid)
          local f <close> = io.open(("/proc/%d/stat"):format(pid))
          return f:read("a"):match("^%d+ %b() (%a)")
        end
        repeat core.sleep(0.01) until state(holder) == "T"
        collectgarbage()
        local before = fds()
        local r = { pcall(core.fork) }
        print("fork", r[1], r[2])
        print("fds", fds() - before)
        local t = { core.fork(false, nil, 0.2) }   -- with a timeout: nil, "timeout", the holder
        print("timed", t[1], t[2], t[3] == holder, fds() - before)
        core.kill(holder, 18)
        print("holder", core.waitpid(holder, 10), core.waitpid(ctrl_c, 10))
        os.remove(list)
      ]])
      assert(out:find("fork\tfalse\t[^\n]*interrupted[^\n]*held by stopped process"), out)
      assert(out:find("fds\t0\n"), out)
      assert(out:find("timed\tnil\ttimeout\ttrue\t0\n"), out)
      assert(out:find("holder\t0\t0"), out)
      assert(ok, out)
    end)
  end)

  describe("a child stopped as it registers in the process table", function()
    it("dies with its parent all the same (it asked for its death signal first)", function()
      local q = core.Queue()
      q:put(0) q:get()
      local middle = H.spawn(function()
        core._fork_stop()                 -- the child stops itself (SIGSTOP) as it registers
        local child = core.fork()
        if child == 0 then core._exit(0) end
        q:put(child)
        core.sleep(60)
      end)
      local child = q:get(20)
      local stopped = child and H.eventually(function() return H.state(child) == "T" end, 20)
      core.kill(middle, 9)
      assert.equal(-9, core.waitpid(middle, 20))
      local gone = child and H.eventually(function() return not H.alive(child) end, 10)
      if child and not gone then core.kill(child, 9) end
      q:close()
      assert(stopped, "the child never stopped")
      assert(gone, "the stopped child outlived its parent")
    end)
  end)
end)
