-- Specs of errors that tell the truth: the user's raised value intact (TaskError), error texts that
-- name the user's call and value, options that are never silently ignored, current_process in workers.
local mp = require "multiprocessing"
local H = require "helpers"

-- (see pool_spec.lua: functions sent to workers reach these as upvalues, not through busted's _ENV)
local _G, error, select, tostring, tonumber, type, pairs, ipairs, print, setmetatable, getmetatable =
      _G, error, select, tostring, tonumber, type, pairs, ipairs, print, setmetatable, getmetatable
local math, string, table, io, os, coroutine, package = math, string, table, io, os, coroutine, package

local function double(x) return x * 2 end

-- a table with a __tostring, as libraries raise them. Tasks reach it through package.loaded (an
-- upvalue holding it would travel by value: only its use as a metatable travels by name).
local Oops = mp.register_metatable("errors_spec.Oops", { __tostring = function(e) return "oops #" .. e.code end })
package.loaded.errors_spec_oops = Oops
local function oops(code) error(setmetatable({ code = code }, package.loaded.errors_spec_oops)) end

describe("errors", function()
  H.leak_check(before_each, after_each)

  describe("a task that raises", function()
    it("gives the raised table intact, with the item, the worker, the call and the traceback", function()
      local pool <close> = mp.Pool(2)
      local ok, e = pcall(pool.map, pool, function(x)
        if x == 3 then error({ code = 42, list = { 1, 2 } }) end
        return x
      end, { 1, 2, 3, 4 })
      assert.is_false(ok)
      assert.equal(mp.TaskError, getmetatable(e))
      assert.are.same({ code = 42, list = { 1, 2 } }, e.value)
      assert.equal(3, e.item)
      assert.equal("map", e.call)
      assert.is_true(math.type(e.pid) == "integer" and e.pid ~= mp.current_process().pid)
      assert.matches("^stack traceback:\n", e.traceback)
      assert.matches("^map failed on item 3 %(worker pid %d+%):\n%(error object is a table value%)\nstack traceback:", tostring(e))
    end)

    it("keeps __tostring's text and the value's metatable", function()
      local pool <close> = mp.Pool(1)
      local ok, e = pcall(pool.map, pool, oops, { 7 })
      assert.is_false(ok)
      assert.equal(Oops, getmetatable(e.value))
      assert.equal(7, e.value.code)
      assert.equal("oops #7", e.message)
      assert.matches("^map failed on item 1 %(worker pid %d+%):\noops #7\nstack traceback:", tostring(e))
    end)

    it("says what error() with no value raised", function()
      local pool <close> = mp.Pool(1)
      local ok, e = pcall(pool.apply, pool, function() error() end)
      assert.is_false(ok)
      assert.is_nil(e.value)
      assert.matches("^apply failed on item 1 %(worker pid %d+%):\n%(error object is a nil value%)", tostring(e))
    end)

    it("reads like its text: string methods and .. work", function()
      local pool <close> = mp.Pool(1)
      local ok, e = pcall(pool.apply, pool, function() error("plain", 0) end)
      assert.is_false(ok)
      assert.equal("plain", e.value)
      assert.truthy(e:find("plain", 1, true))
      assert.equal("x: " .. tostring(e), "x: " .. e)
    end)

    it("shows the user's frames, not the worker's loop", function()
      local pool <close> = mp.Pool(1)
      local ok, e = pcall(pool.map, pool, function(x) error("deep") end, { 1 })
      assert.is_false(ok)
      assert.is_nil(e.traceback:find("multiprocessing/pool.lua", 1, true))
    end)

    it("reaches error_callback and imap as the same object", function()
      local pool <close> = mp.Pool(1)
      local got
      local r = pool:apply_async(function() error({ why = "cb" }) end, nil, { error_callback = function(e) got = e end })
      assert.is_false(pcall(r.get, r))
      assert.equal("cb", got.value.why)
      local ok, e = pcall(function()
        for _ in pool:imap(function(x) if x == 2 then error({ at = x }) end return x end, { 1, 2, 3 }) do end
      end)
      assert.is_false(ok)
      assert.equal(2, e.value.at)
      assert.equal(2, e.item)
      assert.equal("imap", e.call)
    end)

    it("an unsendable raised value arrives as its text, with the codec's reason", function()
      local pool <close> = mp.Pool(1)
      local ok, e = pcall(pool.apply, pool, function() error({ co = coroutine.create(print) }) end)
      assert.is_false(ok)
      assert.equal("string", type(e.value))
      assert.matches("cannot send a thread", e.value)
      assert.equal(1, #pool:map(double, { 1 }))  -- the worker lives on
    end)

    it("of an initializer: Pool raises the value intact", function()
      local ok, e = pcall(mp.Pool, { processes = 1, initializer = function() error({ init = true }) end })
      assert.is_false(ok)
      assert.is_true(e.value.init)
      assert.equal("Pool initializer", e.call)
      assert.matches("^Pool initializer failed: in worker %(pid %d+%):\n%(error object is a table value%)", tostring(e))
    end)
  end)

  describe("a Process target that raises", function()
    it("gives result() the raised value intact", function()
      local p = mp.Process { target = oops, args = { 5 } }
      local stderr = H.capture_stderr()
      finally(stderr)
      p:start()
      p:join()
      local ok, e = pcall(p.result, p)
      assert.matches("oops #5", stderr())
      assert.is_false(ok)
      assert.equal(5, e.value.code)
      assert.equal(Oops, getmetatable(e.value))
      assert.equal("Process", e.call)
      assert.equal(p.pid, e.pid)
      assert.matches("^oops #5\nstack traceback:", tostring(e))
      p:close()
    end)
  end)

  describe("a task that cannot travel", function()
    it("a function the worker cannot decode fails its call with the reason, the worker lives", function()
      local pool <close> = mp.Pool(1)
      local pid = pool:stats()[1].pid
      -- a C function found by no name in the workers: made after they started
      local f = package.loadlib(package.searchpath("multiprocessing.core", package.cpath), "luaopen_multiprocessing_core")
      package.loaded.errors_spec_late = { f = f }
      finally(function() package.loaded.errors_spec_late = nil end)
      local stderr = H.capture_stderr()
      finally(stderr)
      local ok, e = pcall(pool.map, pool, f, { 1 })
      assert.is_false(ok)
      assert.matches("^map failed on item 1 %(worker pid %d+%):\nthe task function cannot be received by the worker: .*errors_spec_late", tostring(e))
      assert.equal("", stderr())
      assert.equal(pid, pool:stats()[1].pid)
      assert.are.same({ 2, n = 1 }, pool:map(double, { 1 }))
    end)

    it("a result nested deeper than the codec's limit fails its item, the worker lives", function()
      local pool <close> = mp.Pool(1)
      local pid = pool:stats()[1].pid
      local ok, e = pcall(pool.map, pool, function(x)
        local t = {}
        for _ = 1, (x == 2 and 100000 or 3) do t = { t } end
        return t
      end, { 1, 2, 3 }, 3)
      assert.is_false(ok)
      assert.matches("^map failed on item 2 %(worker pid %d+%):\ncannot send a value nested deeper than", tostring(e))
      assert.equal(pid, pool:stats()[1].pid)
    end)
  end)

  describe("current_process in a pool worker", function()
    it("describes the worker, and parent_process the pool's owner", function()
      local pool <close> = mp.Pool(2)
      local r = pool:map(function()
        local me, parent = mp.current_process(), mp.parent_process()
        return { me.name, me.pid, me.daemon, parent and parent.pid, parent and parent.name }
      end, { 1, 2, 3, 4 }, 1)
      local pids = {}
      for _, w in ipairs(pool:stats()) do pids[w.pid] = true end
      for _, v in ipairs(r) do
        assert.matches("^PoolWorker%-%d$", v[1])
        assert.is_true(pids[v[2]])
        assert.is_true(v[3])
        assert.equal(mp.current_process().pid, v[4])
        assert.equal("MainProcess", v[5])
      end
      assert.equal("MainProcess", mp.current_process().name)
    end)
  end)

  describe("texts name the user's call and value", function()
    local co = coroutine.create(print)

    it("apply is apply, without a place in the library", function()
      local pool <close> = mp.Pool(1)
      local e = H.raises("bad argument #1 to 'apply' (function expected, got number)", pool.apply, pool, 5)
      assert.is_nil(e:find("pool.lua", 1, true))
      e = H.raises("cannot send a thread (coroutine) at the function<upvalue co>", pool.apply, pool, function() return co end)
      assert.is_nil(e:find("pool.lua", 1, true))
    end)

    it("an unsendable upvalue is named once, for every kind of call", function()
      local pool <close> = mp.Pool(1)
      local f = function() return co end
      for _, call in ipairs {  -- (none is a tail call: the error names the line)
        function() local r = pool:map(f, { 1 }) return r end,
        function() local r = pool:apply_async(f) return r end,
        function() for _ in pool:imap(f, { 1 }) do end end,
        function() for _ in pool:imap_unordered(f, { 1 }) do end end,
      } do
        local e = H.raises("cannot send a thread (coroutine) at the function<upvalue co>", call)
        assert.is_nil(e:find("pool.lua", 1, true), e)
        assert.matches("^[^\n]-errors_spec.lua:%d+: cannot send", e, 1, "call " .. _)  -- the user's line
      end
    end)

    it("capturing a pool in a task says that a Pool cannot be sent", function()
      local pool <close> = mp.Pool(1)
      H.raises("cannot send a Pool (at the function<upvalue pool>)", pool.map, pool, function(x) return pool end, { 1 })
      local holder = { p = pool }
      H.raises("cannot send a Pool (at the function<upvalue holder>.p)", pool.apply, pool, function() return holder end)
      H.raises("cannot send a Pool at args[2] (a Pool can only be used", pool.map, pool, double, { 1, pool })
      H.raises("cannot send a Pool at args[2].p (a Pool can only be used", pool.apply, pool, print, { 1, holder })
      assert.equal(1, #pool:map(double, { 1 }))
    end)

    it("map over ipairs(t), starmap over plain items and stats on a non-pool say what is wrong", function()
      local pool <close> = mp.Pool(1)
      H.raises("bad argument #2 to 'map' (pass the table itself, not ipairs(t) or pairs(t))", pool.map, pool, double, ipairs({ 1, 2 }))
      H.raises("bad argument #2 to 'map' (pass the table itself", pool.map, pool, double, pairs({ 1, 2 }))
      local e = H.raises("bad item to 'starmap' (table of arguments expected, got number)", pool.starmap, pool, math.max, { 1, 2 })
      assert.is_nil(e:find("pool.lua", 1, true))
      H.raises("bad self to 'stats' (Pool expected, got number)", pool.stats, 5)
    end)

    it("an iterator that raises is named without the library's place", function()
      local pool <close> = mp.Pool(1)
      local e = H.raises("map: the input iterator raised at item 1: ", pool.map, pool, double, function() error("mine", 0) end)
      assert.is_nil(e:find("pool.lua", 1, true))
    end)

    it("a Manager dict names the key and the dict", function()
      local m <close> = mp.Manager()
      local d = m:dict()
      local e = H.raises('cannot send a thread (coroutine) at <DictProxy', function() d.key = { 1, 2, co } end)
      assert.truthy(e:find('["key"][3]', 1, true), e)
      assert.is_nil(e:find("value[5]", 1, true))
    end)
  end)

  describe("nothing silently ignored", function()
    it("unknown option keys raise and name the key", function()
      local pool <close> = mp.Pool(1)
      H.raises("bad options to 'map' (unknown option chunk_size)", pool.map, pool, double, { 1 }, { chunk_size = 2 })
      H.raises("bad options to 'apply_async' (unknown option time_out)", pool.apply_async, pool, double, { 1 }, { time_out = 1 })
      H.raises("bad option callback to 'map_async' (function expected, got string)", pool.map_async, pool, double, { 1 }, { callback = "x" })
      H.raises("bad argument #1 to 'Pool' (unknown option procesess)", mp.Pool, { procesess = 1 })
      H.raises("bad argument #1 to 'Process' (unknown option kwarg)", mp.Process, { target = print, kwarg = {} })
    end)

    it("a NaN timeout and initargs that are not a table are rejected", function()
      local pool <close> = mp.Pool(1)
      H.raises("bad option timeout to 'map' (positive number expected)", pool.map, pool, double, { 1 }, { timeout = 0 / 0 })
      H.raises("bad argument #1 to 'Pool' (initargs must be a table, got string)", mp.Pool, { processes = 1, initargs = "abc" })
    end)

    it("a map over a table with no sequence part says so", function()
      local pool <close> = mp.Pool(1)
      H.raises("bad argument #2 to 'map' (the table has no sequence part", pool.map, pool, double, { a = 1, b = 2 })
      assert.are.same({ n = 0 }, pool:map(double, {}))
      assert.are.same({ n = 2 }, pool:map(function(x) return x end, { n = 2, a = 1 }))
    end)

    it("a Process's run override is honoured", function()
      local p = mp.Process { name = "Sub", run = function(self) return "ran " .. self.name end }
      p:start()
      p:join()
      assert.equal("ran Sub", p:result())
      local q = mp.Process { target = print }
      q.run = function(self) return "overridden" end  -- Python's subclass style
      q:start()
      q:join()
      assert.equal("overridden", q:result())
      p:close()
      q:close()
    end)
  end)

  describe("Process:close", function()
    it("makes is_alive, join, terminate and kill raise, as Python's ValueError", function()
      local p = mp.Process { target = function() end }
      p:start()
      p:join()
      p:close()
      p:close()  -- idempotent
      for _, m in ipairs { "is_alive", "join", "terminate", "kill" } do
        local e = H.raises("cannot " .. m .. ": the process object is closed", p[m], p)
        assert.is_nil(e:find("process.lua", 1, true))
      end
      assert.equal(0, p.exitcode)
    end)

    it("a started Process lets go of its target and args", function()
      local big = { "payload" }
      local weak = setmetatable({ big }, { __mode = "v" })
      local p = mp.Process { target = function(t) return #t end, args = { big } }
      big = nil
      p:start()
      collectgarbage()
      collectgarbage()
      assert.is_nil(weak[1])
      p:join()
      assert.equal(1, p:result())
      H.raises("cannot run a process that was started", p.run, p)
      p:close()
    end)
  end)

  describe("OS failures", function()
    local core = require "multiprocessing.core"

    it("return nil, the call's text and the errno's name from our own table", function()
      local v, msg, code = core.kill(2 ^ 22 + 12345, 0)  -- above any pid_max: nobody has it
      assert.is_nil(v)
      assert.equal("kill: No such process", msg)
      assert.equal("ESRCH", code)
      v, msg, code = core.waitpid(1)  -- init is not our child
      assert.is_nil(v)
      assert.equal("waitpid: No child processes", msg)
      assert.equal("ECHILD", code)
    end)

    it("need no glibc 2.32 name functions, so the module loads on older C libraries", function()
      local so = (os.getenv("MP_BUILD") or "build") .. "/multiprocessing/core.so"
      local f = assert(io.popen("nm -D --undefined-only " .. H.quote(so) .. " 2>&1"))
      local syms = f:read("a")
      f:close()
      assert.truthy(syms:find("strerror", 1, true), "nm listed nothing: " .. syms)
      assert.is_nil(syms:find("strerrorname_np", 1, true))
      assert.is_nil(syms:find("sigabbrev_np", 1, true))
    end)
  end)

  describe("error texts of the Lua layer name the user's call, never our files", function()
    local function clean(e)
      assert.is_nil(e:find("multiprocessing/[%w_]+%.lua:%d+:"), "an internal position: " .. e)
      return e
    end

    it("Process methods with a wrong self say which call and what they got", function()
      local p = mp.Process { target = function() end }
      for _, m in ipairs { "start", "join", "is_alive", "terminate", "kill", "result", "run", "close" } do
        clean(H.raises(("bad argument #1 to '%s' (Process expected, got nil)"):format(m), p[m]))
        clean(H.raises(("bad argument #1 to '%s' (Process expected, got table)"):format(m), p[m], {}))
      end
    end)

    it("Process rejects a bad args.n instead of failing in the child", function()
      clean(H.raises("bad argument #1 to 'Process' (args.n must be a non-negative integer, got string)",
        mp.Process, { target = print, args = { n = "x" } }))
      clean(H.raises("args.n must be a non-negative integer, got float", mp.Process, { args = { n = 1.5 } }))
      clean(H.raises("args.n must be a non-negative integer", mp.Process, { args = { n = -1 } }))
    end)

    it("Pipe takes a boolean or nothing", function()
      clean(H.raises("bad argument #1 to 'Pipe' (boolean expected, got number)", mp.Pipe, 1))
      clean(H.raises("bad argument #1 to 'Pipe' (boolean expected, got string)", mp.Pipe, "false"))
    end)

    it("hold: a wrong self or timeout, and the core's own errors, without sync.lua's position", function()
      local l, hold = mp.Lock(), mp.Lock().hold
      local kinds = "Lock, RLock, Semaphore, BoundedSemaphore or Condition expected"
      clean(H.raises("bad argument #1 to 'hold' (" .. kinds .. ", got nil)", hold))
      clean(H.raises("bad argument #1 to 'hold' (" .. kinds .. ", got table)", hold, {}))
      clean(H.raises("bad argument #1 to 'hold' (" .. kinds .. ", got Event)", hold, mp.Event()))
      clean(H.raises("bad argument #1 to 'hold' (number expected, got string)", hold, l, "x"))
      clean(H.raises("bad argument #1 to 'hold' (timeout is NaN)", hold, l, 0 / 0))
      local g <close> = l:hold()
      clean(H.raises("deadlock: this process already holds the Lock", hold, l))
      local closed = mp.Lock()
      closed:close()
      clean(H.raises("attempt to use a closed Lock", hold, closed))
    end)

    it("wait_for: a wrong self, predicate or timeout, and a missing lock, without sync.lua's position", function()
      local c = mp.Condition()
      local wait_for = c.wait_for
      local no = function() return false end
      clean(H.raises("bad argument #1 to 'wait_for' (Condition expected, got nil)", wait_for, nil, no))
      clean(H.raises("bad argument #1 to 'wait_for' (Condition expected, got Lock)", wait_for, mp.Lock(), no))
      clean(H.raises("bad argument #1 to 'wait_for' (function expected, got nil)", wait_for, c))
      clean(H.raises("bad argument #1 to 'wait_for' (function expected, got number)", wait_for, c, 1))
      clean(H.raises("bad argument #2 to 'wait_for' (number expected, got string)", wait_for, c, no, "x"))
      clean(H.raises("bad argument #2 to 'wait_for' (timeout is NaN)", wait_for, c, no, 0 / 0))
      clean(H.raises("cannot wait on an un-acquired lock", wait_for, c, no, 0.01))
      local callable = setmetatable({}, { __call = function() return "yes" end })
      assert.equal("yes", c:wait_for(callable))
    end)

    it("progress checks its total and options (unknown keys raise)", function()
      local progress = mp.progress
      clean(H.raises("bad argument #2 to 'progress' (non-negative number expected, got string)", progress, { 1 }, "x"))
      clean(H.raises("bad argument #2 to 'progress' (non-negative number expected, got -1)", progress, { 1 }, -1))
      clean(H.raises("bad argument #3 to 'progress' (table expected, got number)", progress, { 1 }, nil, 5))
      clean(H.raises("bad argument #3 to 'progress' (unknown option desk)", progress, { 1 }, nil, { desk = "x" }))
      clean(H.raises("bad argument #3 to 'progress' (desc must be a string, got number)", progress, { 1 }, nil, { desc = 1 }))
      clean(H.raises("bad argument #3 to 'progress' (out must be an open file, got number)", progress, { 1 }, nil,
        { out = 1, force = true }))
    end)
  end)
end)
