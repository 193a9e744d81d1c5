local mp = require "multiprocessing"
local H = require "helpers"

-- functions sent to processes must not reach globals through busted's sandbox (see pool_spec.lua)
local error, os = error, os

describe("Manager", function()
  local manager
  before_each(function() manager = mp.Manager() end)
  after_each(function() manager:shutdown() end)

  it("runs its server in a daemon process that shutdown stops", function()
    local m = mp.Manager()
    assert.is_true(m._proc:is_alive())
    m:shutdown()
    assert.is_false(m._proc:is_alive())
    m:shutdown()  -- idempotent
  end)

  it("gives dicts that child processes fill", function()
    local d = manager:dict()
    local procs = {}
    for i = 1, 4 do
      procs[i] = mp.Process { target = function(dd, n) dd[n] = n * 2 end, args = { d, i } }
      procs[i]:start()
    end
    for _, p in ipairs(procs) do p:join() assert.equal(0, p.exitcode) end
    assert.same({ 2, 4, 6, 8 }, d:totable())
    assert.equal(4, #d)
  end)

  it("supports get with a default, pop, update, keys, values, clear and pairs", function()
    local d = manager:dict { a = 1 }
    assert.equal(1, d.a)
    assert.equal("x", d:get("missing", "x"))
    d:update { b = 2, c = 3 }
    assert.equal(3, d:pop("c"))
    assert.equal("none", d:pop("c", "none"))
    local ks = d:keys() table.sort(ks)
    assert.same({ "a", "b" }, ks)
    local vs = d:values() table.sort(vs)
    assert.same({ 1, 2 }, vs)
    local seen = {}
    for k, v in pairs(d) do seen[k] = v end
    assert.same({ a = 1, b = 2 }, seen)
    d.a = nil
    assert.is_nil(d.a)
    d:clear()
    assert.equal(0, #d)
  end)

  it("gives lists with append, extend, insert, pop and bounds checks", function()
    local l = manager:list { 1, 2 }
    l:append(3)
    l:extend { 4, 5 }
    l:insert(1, 0)
    assert.same({ 0, 1, 2, 3, 4, 5 }, l:totable())
    assert.equal(5, l:pop())
    assert.equal(0, l:pop(1))
    assert.equal(4, #l)
    assert.equal(2, l[2])
    local ok, err = pcall(function() l[9] = 1 end)
    assert.is_false(ok)
    assert.matches("list%[9%]: index out of range %(length 4%)", err)
    l:clear()
    assert.has_error(function() l:pop() end, "list:pop(): pop from an empty list")
  end)

  it("updates atomically with update_with from pool workers", function()
    local d = manager:dict()
    local pool <close> = mp.Pool(2)
    pool:map(function(x) d:update_with("sum", function(v) return (v or 0) + x end) end, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 })
    assert.equal(55, d.sum)
  end)

  it("raises when its server is gone", function()
    local m = mp.Manager()
    local d = m:dict()
    m._proc:kill()
    m._proc:join()
    assert.has_error(function() d.x = 1 end, "dict['x']: the manager process is gone")
    m:shutdown()
  end)

  describe("reply queues", function()
    local core = require "multiprocessing.core"

    it("answers each process on one reply queue of its own, made on its first call", function()
      local d = manager:dict { x = 1 }
      assert.equal(1, d.x)  -- the first call: the server has this process's queue from now on
      local used = core.arena_stats().used
      local n0 = manager._requests:qsize()
      for i = 1, 200 do d[i] = i assert.equal(i, d[i]) end
      -- a queue made and freed per call would be seen as messages owning handles: none here
      -- (less: what earlier specs' processes left may be swept meanwhile)
      assert.is_true(core.arena_stats().used <= used)
      assert.equal(n0, manager._requests:qsize())
      local reply = require("multiprocessing.manager")._session(manager).reply
      assert.equal(reply, require("multiprocessing.manager")._session(manager).reply)
    end)

    it("frees the reply queue of a client killed while it waits, or gone with _exit", function()
      local lock, d = manager:Lock(), manager:dict()
      assert.is_nil(d.warm)
      local before = core.arena_stats().used
      lock:acquire()
      local p = mp.Process { target = function() d.started = true lock:acquire() end }:start()
      assert.truthy(H.eventually(function() return d.started end, 20))
      core.sleep(0.3)  -- (its acquire is waiting on the server by then)
      p:kill()
      p:join()
      p:close()
      lock:release()
      for i = 1, 3 do
        p = mp.Process { target = function() assert(d[i] == nil) core._exit(0) end }:start()
        p:join()
        p:close()
      end
      assert.is_true(H.eventually(function() return core.arena_stats().used <= before end, 20))
    end)
  end)

  it("frees its reply queue when its server was SIGKILLed holding it", function()
    local core = require "multiprocessing.core"
    collectgarbage() collectgarbage()
    local before = core.arena_stats().used
    local m = mp.Manager()
    local d = m:dict()
    d.x = 1
    assert.equal(1, d.x)  -- the server took this process's reply queue
    m._proc:kill()
    m._proc:join()
    m:shutdown()
    d, m = nil, nil
    collectgarbage() collectgarbage()
    assert.equal(before, core.arena_stats().used)
  end)

  -- A reply queue has two counted handles, the client's and the server's, each given back once:
  -- by its process's close, or by the ledger of a process that died (docs/arena.md).
  describe("when a process holding a reply queue is SIGKILLed", function()
    local core = require "multiprocessing.core"
    local settle, assert_back = H.arena_settle, H.assert_arena_back
    -- a Manager made, used by this process and shut down: what a first use leaves for good
    local function warm()
      local m = mp.Manager()
      local d = m:dict()
      d.x = 1
      assert.equal(1, d.x)
      m:shutdown()
    end

    it("its server: the queue is released once, a second handle of it sees that queue", function()
      warm()
      local m = mp.Manager()
      local d = m:dict()
      d.x = 1
      assert.equal(1, d.x)  -- the server holds this process's reply queue
      local reply = require("multiprocessing.manager")._session(m).reply
      local carrier = mp.Queue()
      carrier:put(reply)
      local copy = carrier:get(20)  -- a second counted handle of the reply queue
      m._proc:kill()
      m._proc:join()
      core._arena_sweep()  -- the server's ledger given back
      m:shutdown()         -- this process's session closed
      collectgarbage() collectgarbage() core._arena_sweep()
      local fresh = {}
      for i = 1, 8 do fresh[i] = mp.Queue() fresh[i]:put("fresh" .. i) end
      assert.same({ nil, "empty" }, { copy:get_nowait() })  -- the reply queue, not a new one
      assert.is_true(core.arena_check())
      copy:put("mine")
      assert.equal("mine", copy:get(20))
      for i = 1, 8 do assert.equal("fresh" .. i, fresh[i]:get(20)) end
      carrier:close()
      copy:close()
    end)

    it("its server, before it answered a client: arena use comes back to its start", function()
      warm()
      local s0 = settle()
      local m = mp.Manager()
      local lock, d = m:Lock(), m:dict()
      lock:acquire()
      -- the client's first call that waits (an acquire the server defers) carries its queue
      local p = mp.Process { target = function()
        d.started = true
        local ok, err = pcall(lock.acquire, lock)
        os.exit(not ok and tostring(err):find("the manager process is gone", 1, true) and 3 or 4)
      end }:start()
      assert.truthy(H.eventually(function() return d.started end, 20))
      assert.truthy(H.eventually(function() return m._requests:qsize() == 0 end, 20))
      core.sleep(0.3)  -- (the server took the acquire by then)
      m._proc:kill()
      m._proc:join()
      p:join(30)
      assert.equal(3, p.exitcode)  -- its acquire raised "the manager process is gone"
      p:close()
      m:shutdown()
      m, lock, d, p = nil, nil, nil, nil
      assert_back(s0, "arena use after the manager was killed holding a client's queue")
    end)

    it("a client: its queue is freed, not kept for the processes started after it", function()
      warm()
      local s0 = settle()
      local m = mp.Manager()
      local d = m:dict()
      assert.is_nil(d.warm)
      local go, go2 = mp.Event(), mp.Event()
      local p = mp.Process { target = function() go:wait(20) assert(d.warm == nil) d.started = true core.sleep(60) end }:start()
      -- started before p made its queue (so it cannot hold a copy of it), alive when it is freed
      local r = mp.Process { target = function() go2:wait(20) assert(d.warm == nil) d.done = true go:wait(60) end }:start()
      go:set()
      assert.truthy(H.eventually(function() return d.started end, 20))
      p:kill()
      p:join()
      p:close()
      -- r's first call: the server looks for clients that ended (p) before it registers r
      go2:set()
      assert.truthy(H.eventually(function() return d.done end, 20))
      -- p's queue was freed (p's ledger gave back p's handle, the server closed its own); r's
      -- queue is counted by r and the server: nothing waits on the deferred list
      -- (at once where the server has pidfds; under valgrind, which lacks pidfd_open, by its
      -- next look at its clients)
      local s = H.eventually(function() local s = settle() return s.deferred == s0.deferred and s end, 20) or settle()
      assert.equal(s0.deferred, s.deferred)
      assert.is_true(core.arena_check())
      r:join(30)
      r:close()
      m:shutdown()
      m, d, p, r, go, go2 = nil, nil, nil, nil, nil, nil
      assert_back(s0, "arena use after a client was killed")
    end)
  end)

  describe("Pool", function()
    local pool
    before_each(function() pool = manager:Pool(2) end)

    it("runs apply, map, starmap and their async versions in the manager's process", function()
      assert.same({ 7, 12 }, { pool:apply(function(a, b) return a + b, a * b end, { 3, 4 }) })
      local r = pool:map(function(x) return x * x end, { 1, 2, 3 })
      assert.same({ 1, 4, 9, n = 3 }, r)
      assert.equal(2, pool:starmap(function(a, b) return a - b end, { { 5, 1 }, { 9, 7 } })[2])
      local ar = pool:map_async(function(x) return -x end, { 1, 2 })
      assert.same({ -1, -2, n = 2 }, ar:get(30))
      assert.is_true(ar:ready())
      assert.is_true(ar:successful())
      assert.is_true(ar:wait(1))
    end)

    it("gives nil, 'timeout' from get and wait while a call runs", function()
      local ar = pool:apply_async(function() local t = os.clock() while os.clock() - t < 0.5 do end return "done" end)
      assert.same({ nil, "timeout" }, { ar:get(0.01) })
      assert.same({ nil, "timeout" }, { ar:wait(0) })
      assert.is_false(ar:ready())
      assert.has_error(function() ar:successful() end, "AsyncResult:successful(): the result is not ready")
      assert.equal("done", ar:get(30))
    end)

    it("yields i, v from imap in order and from imap_unordered as they finish", function()
      local got = {}
      for i, v in pool:imap(function(x) return x * 10 end, { 1, 2, 3, 4, 5 }) do got[#got + 1] = i .. "=" .. v end
      assert.same({ "1=10", "2=20", "3=30", "4=40", "5=50" }, got)
      local seen = {}
      for i, v in pool:imap_unordered(function(x) return x + 1 end, { 1, 2, 3 }) do seen[i] = v end
      assert.same({ 2, 3, 4 }, seen)
    end)

    it("raises a task's error value intact, and imap after the items before it", function()
      local ar = pool:apply_async(function() error({ code = 7 }) end)
      local ok, err = pcall(ar.get, ar)
      assert.is_false(ok)
      assert.equal(7, err.value.code)
      local got = {}
      ok, err = pcall(function()
        for i, v in pool:imap(function(x) if x == 3 then error("bad item") end return x end, { 1, 2, 3, 4 }) do got[i] = v end
      end)
      assert.is_false(ok)
      assert.matches("bad item", tostring(err))
      assert.same({ 1, 2 }, got)
    end)

    it("is used by other processes through its proxy", function()
      local p = mp.Process { target = function() return pool:apply(function() return "from a worker" end) end }:start()
      assert.is_true(p:join(30))
      assert.equal("from a worker", p:result())
    end)

    it("closes and joins, then refuses calls; refuses callbacks and non-functions", function()
      assert.has_error(function() pool:join() end, "Pool:join(): cannot join a running pool")
      assert.has_error(function() pool:apply_async(function() end, nil, { callback = print }) end,
        "Pool:apply_async(): callbacks cannot be given through a manager (they would run in the manager process)")
      assert.has_error(function() pool:map(42, {}) end, "Pool:map(): bad argument #1 (function expected, got number)")
      local ar = pool:apply_async(function() return 1 end)
      pool:close()
      pool:join()
      assert.equal(1, ar:get())
      assert.has_error(function() pool:apply(function() end) end, "Pool:apply(): cannot apply_async: the pool is closed")
    end)
  end)
end)
