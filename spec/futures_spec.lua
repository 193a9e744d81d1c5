-- Specs of futures: pool:submit and the Future, mp.as_completed, mp.wait, AsyncResult as a
-- Future, and their fault paths (a worker killed under a future, terminate, Ctrl-C, cancel races).
-- Ordering is made deterministic with gates (a task waits on a Queue the test fills), never timing.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- (see pool_spec.lua: functions sent to workers must not reach busted's sandbox)
local error, select, tostring, tonumber, type, pairs, ipairs, print, getmetatable =
      error, select, tostring, tonumber, type, pairs, ipairs, print, getmetatable
local math, string, table, io, os, coroutine = math, string, table, io, os, coroutine

local PATIENCE = os.getenv("MP_VALGRIND") and 120 or 20

local function double(x) return x * 2 end
-- a task that waits until the test opens its gate (a Queue), then returns what it was given
local function gated(gate, v) gate:get() return v end

local function mark(path, text)  -- (runs in workers: no busted's assert, nothing of its _ENV)
  local f = io.open(path, "w")
  f:write(text)
  f:close()
end

local interrupted = H.interrupted

describe("Futures", function()
  H.leak_check(before_each, after_each)

  describe("pool:submit", function()
    it("runs f(...) and result() returns all its values, nils included", function()
      local pool <close> = mp.Pool(2)
      local f = pool:submit(function(a, b, c, d) return a + b, c, d, nil end, 1, 2, nil, "x")
      assert.are.same({ 3, nil, "x", nil, n = 4 }, table.pack(f:result()))
      assert.is_true(f:done())
      assert.is_false(f:running())
      assert.is_false(f:cancelled())
      assert.is_nil(f:exception())
      assert.equal("<Future finished>", tostring(f))
    end)

    it("with no arguments, and many futures at once, each gets its own result", function()
      local pool <close> = mp.Pool(2)
      assert.equal(42, pool:submit(function() return 42 end):result())
      local fs = {}
      for i = 1, 2000 do fs[i] = pool:submit(double, i) end
      for i = 2000, 1, -1 do assert.equal(2 * i, fs[i]:result()) end
    end)

    it("a raising task: result() raises the TaskError, exception() returns it, value intact", function()
      local pool <close> = mp.Pool(1)
      local f = pool:submit(function() error({ code = 7 }) end)
      local e = f:exception()
      assert.equal(mp.TaskError, getmetatable(e))
      assert.equal(7, e.value.code)
      assert.equal("submit", e.call)
      local ok, err = pcall(f.result, f)
      assert.is_false(ok)
      assert.equal(e, err)
      assert.matches("^submit failed on item 1 %(worker pid %d+%):", tostring(err))
      assert.equal("<Future raised>", tostring(f))
    end)

    it("result(timeout) and exception(timeout) return nil, \"timeout\" while not done", function()
      local pool <close> = mp.Pool(1)
      local gate = mp.Queue()
      local f = pool:submit(gated, gate, "v")
      assert.are.same({ nil, "timeout" }, { f:result(0.05) })
      assert.are.same({ nil, "timeout" }, { f:exception(0) })
      gate:put(true)
      assert.equal("v", f:result(PATIENCE))
    end)

    it("misuse raises, naming the call", function()
      local pool <close> = mp.Pool(1)
      H.raises("bad argument #1 to 'submit' (function expected, got number)", pool.submit, pool, 3)
      H.raises("cannot send a thread (coroutine) at args[2]", pool.submit, pool, double, 1, coroutine.create(print))
      local f = pool:submit(double, 1)
      H.raises("bad argument #1 to 'result' (timeout is NaN)", f.result, f, 0 / 0)
      H.raises("bad argument #1 to 'add_done_callback' (function expected, got nil)", f.add_done_callback, f)
      pool:close()
      pool:join()
      H.raises("cannot submit: the pool is closed", pool.submit, pool, double, 1)
    end)
  end)

  describe("cancel", function()
    it("a task still queued is cancelled: it never runs, result() raises, done callbacks run", function()
      local pool <close> = mp.Pool(1)
      local gate, ran = mp.Queue(), mp.Queue()
      local blocker = pool:submit(gated, gate, 1)
      local f = pool:submit(function() ran:put("ran") return 2 end)
      local seen
      f:add_done_callback(function(x) seen = x end)
      assert.is_true(f:cancel())
      assert.is_true(f:cancelled())
      assert.is_true(f:done())
      assert.is_false(f:running())
      assert.equal(f, seen)
      assert.is_true(f:cancel())  -- again: still cancelled
      H.raises("the future was cancelled", f.result, f)
      H.raises("the future was cancelled", f.exception, f)
      gate:put(true)
      assert.equal(1, blocker:result(PATIENCE))
      -- the worker skipped it: after the next task nothing was run
      assert.equal(4, pool:submit(double, 2):result(PATIENCE))
      assert.are.same({ nil, "empty" }, { ran:get(false) })
      assert.equal("<Future cancelled>", tostring(f))
    end)

    it("a running or finished task cannot be cancelled", function()
      local pool <close> = mp.Pool(1)
      local gate, started = mp.Queue(), mp.Queue()
      local f = pool:submit(function() started:put(true) return gated(gate, "r") end)
      started:get(PATIENCE)
      assert.is_true(f:running())
      assert.is_false(f:cancel())
      assert.is_false(f:cancelled())
      gate:put(true)
      assert.equal("r", f:result(PATIENCE))
      assert.is_false(f:cancel())
      assert.is_false(pool:apply_async(double, { 1 }):cancel())  -- AsyncResults cannot be cancelled
    end)

    it("races with the workers: every future is either cancelled and never ran, or ran to its result", function()
      local pool <close> = mp.Pool(2)
      local ran = mp.Queue()
      local task = function(i) ran:put(i) return i end
      for round = 1, 5 do
        local fs = {}
        for i = 1, 400 do fs[i] = pool:submit(task, i) end
        local cancelled = {}
        for i = 400, 1, -1 do if fs[i]:cancel() then cancelled[i] = true end end
        for i = 1, 400 do
          if cancelled[i] then
            assert.is_true(fs[i]:cancelled())
          else
            assert.equal(i, fs[i]:result(PATIENCE))
          end
        end
        pool:submit(double, 0):result(PATIENCE)  -- (every worker has moved past the round)
        pool:submit(double, 0):result(PATIENCE)
        local n = 0
        while true do
          local i = ran:get(false)
          if i == nil then break end
          assert.is_nil(cancelled[i], "a cancelled task ran: " .. i)
          n = n + 1
        end
        local nc = 0
        for _ in pairs(cancelled) do nc = nc + 1 end
        assert.equal(400, n + nc)
      end
    end)

    it("cancel words are reused: many rounds leave the pool's arena use flat", function()
      local pool <close> = mp.Pool(2)
      for _ = 1, 5 do  -- (15 slabs of words without reuse)
        local fs = {}
        for i = 1, 3000 do fs[i] = pool:submit(double, i) end
        for i = 1, 3000, 2 do fs[i]:cancel() end
        for i = 2, 3000, 2 do fs[i]:result(PATIENCE) end
      end
      mp.wait({ pool:submit(double, 1) })
      assert.is_true(#pool._slabs <= 6, #pool._slabs .. " slabs")
    end)
  end)

  describe("shared memory", function()
    it("cancel words and function blobs go back to the arena with the pool (join, terminate)", function()
      local function settled()  -- what earlier specs left for the collector and the sweep goes first
        collectgarbage() collectgarbage()
        core._arena_sweep()
        return core.arena_stats().used
      end
      for _, stop in ipairs { "join", "terminate" } do
        local before = settled()
        local pool = mp.Pool(2)
        for _ = 1, 3 do
          local fs = {}
          for i = 1, 2000 do fs[i] = pool:submit(function(x) return x + 1 end, i) end  -- (new closures: new blobs)
          for i = 1, 2000, 3 do fs[i]:cancel() end
          mp.wait(fs)
        end
        local pending = pool:submit(double, 1)
        if stop == "join" then pool:close() pool:join() else pool:terminate() end
        assert.is_true(pending:done())
        assert.equal(before, settled(), stop)
      end
    end)
  end)

  describe("add_done_callback", function()
    it("runs at once when done, else when it finishes, in this process, with the future", function()
      local pool <close> = mp.Pool(1)
      local gate = mp.Queue()
      local f = pool:submit(gated, gate, 5)
      local calls = {}
      f:add_done_callback(function(x) calls[#calls + 1] = { "a", x:result() } end)
      f:add_done_callback(function(x) calls[#calls + 1] = { "b", core.getpid() } end)
      assert.equal(0, #calls)
      gate:put(true)
      f:result(PATIENCE)
      assert.are.same({ { "a", 5 }, { "b", core.getpid() } }, calls)
      f:add_done_callback(function() calls[#calls + 1] = "late" end)
      assert.equal("late", calls[3])
    end)

    it("an error in a callback is reported on stderr and the pool goes on", function()
      local pool <close> = mp.Pool(1)
      local restore = H.capture_stderr()
      local ok, err = pcall(function()
        local f = pool:submit(double, 1)
        f:add_done_callback(function() error("boom") end)
        assert.equal(2, f:result(PATIENCE))
        assert.equal(6, pool:submit(double, 3):result(PATIENCE))
      end)
      local text = restore()
      assert(ok, err)
      assert.matches("error in a pool callback: .*boom", text)
    end)
  end)

  describe("mp.as_completed", function()
    it("yields the futures as they finish, the finished ones first", function()
      local pool <close> = mp.Pool(2)
      local gate = mp.Queue()
      local done0 = pool:submit(double, 1)
      done0:result()
      local slow = pool:submit(gated, gate, "slow")
      local fast = pool:submit(double, 21)
      local order = {}
      for f in mp.as_completed({ done0, slow, fast, fast }) do
        order[#order + 1] = f
        if f == fast then gate:put(true) end
      end
      assert.are.same({ done0, fast, slow }, order)
    end)

    it("raises after timeout seconds, saying how many were unfinished", function()
      local pool <close> = mp.Pool(1)
      local gate = mp.Queue()
      local fs = { pool:submit(double, 1), pool:submit(gated, gate, 1), pool:submit(double, 2) }
      local got = 0
      local ok, err = pcall(function()
        for _ in mp.as_completed(fs, 0.2) do got = got + 1 end
      end)
      assert.is_false(ok)
      assert.equal(1, got)
      assert.matches("as_completed: 2 %(of 3%) futures unfinished after 0.2s", err)
      gate:put(true)
      assert.equal(4, fs[3]:result(PATIENCE))
      assert.are.same({}, fs[2]._cbs or {})  -- the waiter was let go
    end)

    it("works across pools and with AsyncResults", function()
      local p1 <close> = mp.Pool(1)
      local p2 <close> = mp.Pool(1)
      local fs = { p1:submit(double, 1), p2:apply_async(double, { 2 }), p1:map_async(double, { 1, 2 }) }
      local n = 0
      for f in mp.as_completed(fs, PATIENCE) do
        assert.is_true(f:done())
        n = n + 1
      end
      assert.equal(3, n)
      assert.equal(4, fs[2]:result())
      assert.are.same({ 2, 4, n = 2 }, fs[3]:result())
    end)

    it("a break lets go of the waiter; bad arguments raise", function()
      local pool <close> = mp.Pool(1)
      local gate = mp.Queue()
      local fs = { pool:submit(double, 1), pool:submit(gated, gate, 1) }
      for _ in mp.as_completed(fs) do break end
      assert.are.same({}, fs[2]._cbs or {})
      gate:put(true)
      H.raises("bad argument #1 to 'as_completed' (table of futures expected, got nil)", mp.as_completed)
      H.raises("bad argument #1 to 'as_completed' (item 2 is not a Future, got number)", mp.as_completed, { fs[1], 3 })
      H.raises("bad argument #2 to 'as_completed' (timeout is NaN)", mp.as_completed, fs, 0 / 0)
      for _ in mp.as_completed({}) do error("nothing to yield") end
    end)
  end)

  describe("mp.wait", function()
    it("ALL_COMPLETED (the default) returns done and not_done lists in the given order", function()
      local pool <close> = mp.Pool(2)
      local fs = {}
      for i = 1, 20 do fs[i] = pool:submit(double, i) end
      local done, not_done = mp.wait(fs)
      assert.are.same(fs, done)
      assert.are.same({}, not_done)
    end)

    it("FIRST_COMPLETED returns once one is done; a timeout returns what is done then", function()
      local pool <close> = mp.Pool(2)
      local gate = mp.Queue()
      local fs = { pool:submit(gated, gate, 1), pool:submit(double, 2), pool:submit(gated, gate, 3) }
      local done, not_done = mp.wait(fs, { return_when = mp.FIRST_COMPLETED, timeout = PATIENCE })
      assert.are.same({ fs[2] }, done)
      assert.are.same({ fs[1], fs[3] }, not_done)
      done, not_done = mp.wait(fs, 0.05)
      assert.are.same({ fs[2] }, done)
      assert.equal(2, #not_done)
      gate:put(true) gate:put(true)
      done = mp.wait(fs, { timeout = PATIENCE })
      assert.equal(3, #done)
    end)

    it("FIRST_EXCEPTION returns at the first error (cancelled futures do not count)", function()
      local pool <close> = mp.Pool(1)
      local gate = mp.Queue()
      local fs = { pool:submit(gated, gate, 1), pool:submit(error, "bad"), pool:submit(gated, gate, 3) }
      local c = pool:submit(double, 1)
      assert.is_true(c:cancel())
      gate:put(true)
      local done, not_done = mp.wait({ c, fs[1], fs[2], fs[3] }, { return_when = "FIRST_EXCEPTION" })
      assert.are.same({ c, fs[1], fs[2] }, done)
      assert.are.same({ fs[3] }, not_done)
      assert.matches("bad", tostring(fs[2]:exception()))
      gate:put(true)
      fs[3]:result(PATIENCE)
    end)

    it("misuse raises", function()
      local pool <close> = mp.Pool(1)
      local fs = { pool:submit(double, 1) }
      H.raises("bad argument #2 to 'wait' (return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED, got FIRST)",
        mp.wait, fs, { return_when = "FIRST" })
      H.raises("bad argument #2 to 'wait' (unknown option timout)", mp.wait, fs, { timout = 1 })
      H.raises("bad argument #2 to 'wait' (timeout is NaN)", mp.wait, fs, 0 / 0)
      H.raises("bad argument #1 to 'wait' (table of futures expected, got string)", mp.wait, "x")
    end)
  end)

  describe("AsyncResult is a Future", function()
    it("apply_async and map_async results answer the Future methods", function()
      local pool <close> = mp.Pool(2)
      local a = pool:apply_async(function(x) return x, x + 1 end, { 5 })
      assert.are.same({ 5, 6 }, { a:result(PATIENCE) })
      assert.are.same({ 5, 6 }, { a:get() })
      assert.is_true(a:done())
      assert.is_nil(a:exception())
      local seen
      a:add_done_callback(function(x) seen = x end)
      assert.equal(a, seen)
      local m = pool:map_async(double, { 1, 2, 3 })
      assert.are.same({ 2, 4, 6, n = 3 }, m:result(PATIENCE))
      local e = pool:apply_async(error, { "oops" })
      assert.matches("oops", tostring(e:exception(PATIENCE)))
      assert.is_false(e:successful())
    end)
  end)

  describe("faults", function()
    it("a worker SIGKILLed while it runs a future's task fails that future, naming the worker", function()
      local pool <close> = mp.Pool(2)
      local flag = H.tmpname()
      os.remove(flag)
      local f = pool:submit(function() mark(flag, tostring(core.getpid())) mp.sleep(30) end)
      local others = {}
      for i = 1, 20 do others[i] = pool:submit(double, i) end
      local victim = H.eventually(function() local s = H.slurp(flag) return s and tonumber(s) end, PATIENCE)
      assert.is_number(victim)
      core.kill(victim, 9)
      local e = f:exception(PATIENCE)
      assert.matches(("^submit: worker pid %d died %%(killed by SIGKILL%%) while running item 1$"):format(victim), e)
      H.raises("worker pid " .. victim .. " died", f.result, f)
      for i = 1, 20 do assert.equal(2 * i, others[i]:result(PATIENCE)) end
      assert.equal(10, pool:submit(double, 5):result(PATIENCE))  -- replaced
    end)

    it("terminate fails every pending future (queued, running, cancelled ones stay cancelled)", function()
      local pool = mp.Pool(1)
      local gate = mp.Queue()
      local running = pool:submit(gated, gate, 1)
      local queued = pool:submit(double, 2)
      local c = pool:submit(double, 3)
      assert.is_true(c:cancel())
      local cb
      queued:add_done_callback(function(x) cb = x:exception() end)
      pool:terminate()
      for _, f in ipairs { running, queued } do
        assert.is_true(f:done())
        assert.equal("the pool was terminated", f:exception())
        H.raises("the pool was terminated", f.result, f)
      end
      assert.equal("the pool was terminated", cb)
      assert.is_true(c:cancelled())
      local done, not_done = mp.wait({ running, queued, c })
      assert.equal(3, #done)
      assert.equal(0, #not_done)
      assert.is_false(queued:cancel())
    end)

    it("close and join deliver submitted futures; a cancelled queued one does not hold join", function()
      local pool = mp.Pool(1)
      local gate = mp.Queue()
      local a = pool:submit(gated, gate, 1)
      local b = pool:submit(double, 2)
      local c = pool:submit(double, 3)
      assert.is_true(c:cancel())
      pool:close()
      gate:put(true)
      pool:join()
      assert.equal(1, a:result())
      assert.equal(4, b:result())
      assert.is_true(c:cancelled())
    end)

    it("Ctrl-C in result() raises interrupted! and fails the other pending futures", function()
      local text = interrupted([[
        local pool = mp.Pool(2)
        local other = pool:submit(function() mp.sleep(30) end)
        local f = pool:submit(function() started() mp.sleep(30) end)
        print("result:", pcall(f.result, f))
        print("other:", other:done(), other:exception())
        print("pool:", pool)
      ]])
      assert.matches("result:\tfalse\tinterrupted!", text)
      assert.matches("other:\ttrue\tthe pool was terminated", text)
      assert.matches("pool:\t<Pool processes=2 state=terminated>", text)
    end)

    it("Ctrl-C in an as_completed loop and in wait raises interrupted!", function()
      local text = interrupted([[
        local pool = mp.Pool(1)
        local fs = { pool:submit(function() started() mp.sleep(30) end) }
        print("as_completed:", pcall(function() for _ in mp.as_completed(fs) do end end))
        print("done:", fs[1]:done())
      ]])
      assert.matches("as_completed:\tfalse\tinterrupted!", text)
      assert.matches("done:\ttrue", text)
      text = interrupted([[
        local pool = mp.Pool(1)
        local fs = { pool:submit(function() started() mp.sleep(30) end) }
        print("wait:", pcall(mp.wait, fs))
      ]])
      assert.matches("wait:\tfalse\tinterrupted!", text)
    end)
  end)
end)
