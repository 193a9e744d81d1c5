-- Specs of the Manager's proxies beyond dict and list basics: list and dict methods, set,
-- Namespace, Value, Array, nested proxies, register, the sync proxies and their fault paths.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- runs fn(...) in a Process and returns its exit code (fn raising: 1)
local function in_child(fn, ...)
  local p = mp.Process { target = fn, args = table.pack(...) }
  p:start()
  p:join(60)
  assert.is_false(p:is_alive(), "the child hung")
  return p.exitcode
end

describe("Manager proxies", function()
  local m
  before_each(function() m = mp.Manager() end)
  after_each(function()
    m:shutdown()
    assert.same({}, H.children())
  end)

  describe("list", function()
    it("slices as string.sub does, 1-based, inclusive, negative from the end", function()
      local l = m:list { 10, 20, 30, 40, 50 }
      assert.same({ 20, 30, 40 }, l:slice(2, 4))
      assert.same({ 40, 50 }, l:slice(-2))
      assert.same({ 10, 20, 30, 40 }, l:slice(1, -2))
      assert.same({ 10, 20, 30, 40, 50 }, l:slice())
      assert.same({}, l:slice(4, 2))
      assert.same({ 50 }, l:slice(5, 99))
    end)

    it("counts, finds, removes, reverses and sorts", function()
      local l = m:list { 3, 1, 2, 3 }
      assert.equal(2, l:count(3))
      assert.equal(0, l:count(9))
      assert.equal(1, l:index(3))
      assert.equal(4, l:index(3, 2))
      assert.is_true(l:contains(2))
      H.raises("list:index(): the value is not in the list", l.index, l, 9)
      l:remove(3)
      assert.same({ 1, 2, 3 }, l:totable())
      H.raises("list:remove(): the value is not in the list", l.remove, l, 9)
      l:reverse()
      assert.same({ 3, 2, 1 }, l:totable())
      l:sort()
      assert.same({ 1, 2, 3 }, l:totable())
    end)

    it("sorts with a comparison function that travels to the manager", function()
      local l = m:list { "bb", "a", "ccc" }
      local key = "len"
      l:sort(function(x, y) if key == "len" then return #x > #y end return x < y end)
      assert.same({ "ccc", "bb", "a" }, l:totable())
      H.raises("list:sort(): ", l.sort, l, function(x) return x < 1 end)  -- compares strings with 1
    end)

    it("inserts, pops with negative indexes and names bad ones", function()
      local l = m:list { 1, 2, 3 }
      l:insert(4, 4)
      assert.equal(4, l:pop(-1))
      assert.equal(1, l:pop(1))
      H.raises("list:insert(): index out of range (length 2)", l.insert, l, 9, 1)
      H.raises("list:pop(): pop index out of range (length 2)", l.pop, l, 5)
      H.raises("list:pop(): an integer index is required, got 1.5", l.pop, l, 1.5)
    end)

    it("concatenates with .. into a plain table, and extends from a proxy", function()
      local a, b = m:list { 1, 2 }, m:list { 3 }
      local t = a .. b
      assert.same({ 1, 2, 3 }, t)
      assert.is_nil(getmetatable(t))
      assert.same({ 0, 1, 2 }, { 0 } .. a)
      a:extend(b)
      assert.same({ 1, 2, 3 }, a:totable())
    end)

    it("iterates with pairs (one request) and ipairs", function()
      local l = m:list { "x", "y" }
      local seen = {}
      for i, v in pairs(l) do seen[#seen + 1] = i .. v end
      assert.same({ "1x", "2y" }, seen)
      seen = {}
      for i, v in ipairs(l) do seen[#seen + 1] = i .. v end
      assert.same({ "1x", "2y" }, seen)
    end)

    it("appends from several processes without losing any", function()
      local l = m:list()
      local procs = {}
      for w = 1, 3 do
        procs[w] = mp.Process { target = function() for i = 1, 50 do l:append(w * 1000 + i) end end }
        procs[w]:start()
      end
      for _, p in ipairs(procs) do p:join() assert.equal(0, p.exitcode) end
      assert.equal(150, #l)
    end)
  end)

  describe("dict", function()
    it("has popitem, setdefault, fromkeys, items and has", function()
      local d = m:dict { a = 1 }
      assert.equal(1, d:setdefault("a", 5))
      assert.equal(7, d:setdefault("b", 7))
      local k, v = d:popitem()
      assert.truthy((k == "a" and v == 1) or (k == "b" and v == 7))
      d:popitem()
      H.raises("dict:popitem(): the dictionary is empty", d.popitem, d)
      d:fromkeys({ "x", "y" }, 0)
      assert.same({ x = 0, y = 0 }, d:totable())
      local items = d:items()
      table.sort(items, function(p, q) return p[1] < q[1] end)
      assert.same({ { "x", 0 }, { "y", 0 } }, items)
      assert.is_true(d:has("x"))
      assert.is_false(d:has("z"))
    end)

    it("pop of a missing key without a default raises, naming the key", function()
      local d = m:dict()
      H.raises("dict['k']:pop(): no such key", d.pop, d, "k")
    end)

    it("refuses nil and NaN keys at the call", function()
      local d = m:dict()
      H.raises("dict[nil]: a key cannot be nil", function() d[nil] = 1 end)
      H.raises("a key cannot be NaN", function() d[0 / 0] = 1 end)
    end)

    it("names the key and the call of an update_with that raises, keeping error values intact", function()
      local d = m:dict()
      H.raises("dict['n']:update_with(): ", d.update_with, d, "n", function(v) return v + 1 end)
      -- (made by load: its _ENV is the global table, not busted's)
      local ok, e = pcall(d.update_with, d, "n", load("error({ code = 42 })"))
      assert.is_false(ok)
      assert.same({ code = 42 }, e)
    end)

    it("sees a set made just before by another process (requests are served in order)", function()
      local d = m:dict()
      local q = mp.Queue()
      local p = mp.Process { target = function() d.x = "late" q:put("done") end }
      p:start()
      assert.equal("done", q:get(30))
      assert.equal("late", d.x)
      p:join()
    end)
  end)

  describe("nested proxies", function()
    it("a list inside a dict stays shared", function()
      local d = m:dict()
      d.sub = m:list()
      assert.equal(0, in_child(function() d.sub:append(1) d.sub:append(2) end))
      assert.same({ 1, 2 }, d.sub:totable())
    end)

    it("a proxy used by a function that runs on the server is served there", function()
      local d, l = m:dict(), m:list { 1, 2, 3 }
      d.l = l
      assert.equal(3, d:update_with("n", function() return #d.l end))
      local lk = m:Lock()
      lk:acquire()  -- so that the server's acquire would wait
      H.raises("this operation waits", d.update_with, d, "x", function() lk:acquire() end)
      lk:release()
    end)
  end)

  describe("set, Namespace, Value, Array", function()
    it("set: add, discard, remove, contains, pop, #, pairs", function()
      local s = m:set { "a", "b" }
      s:add("c") s:add("a")
      assert.equal(3, #s)
      assert.is_true(s:contains("c"))
      s:discard("c") s:discard("zz")
      H.raises("set:remove(): the value is not in the set", s.remove, s, "zz")
      local seen = {}
      for v in pairs(s) do seen[#seen + 1] = v end
      table.sort(seen)
      assert.same({ "a", "b" }, seen)
      assert.truthy(s:pop())
      assert.equal(1, #s)
    end)

    it("Namespace: fields set by a child are seen by the parent", function()
      local ns = m:Namespace { x = 1 }
      assert.equal(0, in_child(function() ns.y = ns.x + 1 end))
      assert.equal(2, ns.y)
      assert.equal("Namespace(x=1, y=2)", tostring(ns))
    end)

    it("Value: .value, get and set, typecode checked", function()
      local v = m:Value("i", 5)
      assert.equal(0, in_child(function() v.value = v.value * 2 end))
      assert.equal(10, v:get())
      v:set(3)
      assert.equal(3, v.value)
      H.raises("Value.value: an integer is required (typecode 'i'), got 1.5", function() v.value = 1.5 end)
      assert.equal(0.0, m:Value("d").value)
      H.raises("bad typecode x", m.Value, m, "x", 1)
    end)

    it("Array: fixed length, typed items", function()
      local a = m:Array("d", 3)
      a[2] = 1
      assert.same({ 0.0, 1.0, 0.0 }, a:totable())
      assert.equal(3, #a)
      H.raises("Array[4]: index out of range (length 3)", function() a[4] = 1 end)
      H.raises("Array[1]: a number is required", function() a[1] = "x" end)
      local b = m:Array("i", { 1, 2, 3 })
      assert.same({ 2, 3 }, b:slice(2))
      assert.same({ 1, 2, 3, 0.0, 1.0, 0.0 }, b .. a)
    end)
  end)

  describe("register", function()
    it("makes objects on the server whose methods run there", function()
      m:register("Counter", function(start)
        return { n = start, incr = function(self, k) self.n = self.n + (k or 1) return self.n end,
          get = function(self) return self.n, "n" end }
      end)
      local c = m:Counter(10)
      assert.equal(0, in_child(function() c:incr(5) end))
      assert.equal(16, c:incr())
      assert.same({ 16, "n" }, { c:get() })
      H.raises("Counter:nope(): Counter has no method nope", function() c:nope() end)
      assert.equal("<Counter proxy 1 of a Manager>", tostring(c))
    end)

    it("limits calls to the exposed methods and names a bad registration", function()
      m:register("Box", function() return { v = 1, get = function(s) return s.v end, set = function(s, v) s.v = v end } end,
        { exposed = { "get" } })
      local b = m:Box()
      assert.equal(1, b:get())
      H.raises("Box does not expose a method set", b.set, b, 2)
      H.raises("dict is a method of Manager", m.register, m, "dict", function() end)
      H.raises("function expected", m.register, m, "X", 1)
    end)
  end)

  describe("Lock and RLock", function()
    it("excludes other processes and counts RLock levels", function()
      local lk, r = m:Lock(), m:RLock()
      assert.is_true(lk:acquire())
      assert.is_true(lk:locked())
      assert.equal(0, in_child(function() assert(lk:acquire(0.2) == false) assert(lk:locked()) end))
      H.raises("deadlock: this process already holds the Lock", lk.acquire, lk)
      assert.is_false(lk:acquire(false))
      lk:release()
      H.raises("Lock:release(): release of an unlocked Lock", lk.release, lk)
      assert.is_true(r:acquire()) assert.is_true(r:acquire())
      assert.is_true(r:is_owned())
      r:release() r:release()
      assert.is_false(r:is_owned())
      assert.equal(0, in_child(function() assert(r:acquire()) r:release() end))
    end)

    it("a waiting acquire is granted when the holder releases", function()
      local lk = m:Lock()
      local d = m:dict()
      lk:acquire()
      local p = mp.Process { target = function() assert(lk:acquire(30)) d.got = true lk:release() end }
      p:start()
      core.sleep(0.2)
      assert.is_nil(d.got)
      lk:release()
      p:join(60)
      assert.equal(0, p.exitcode)
      assert.is_true(d.got)
    end)

    it("a lock held by a process that dies is released, the next acquire says so", function()
      local lk = m:Lock()
      local p = mp.Process { target = function() lk:acquire() core._exit(0) end }
      p:start()
      p:join(60)
      local ok, why = lk:acquire(30)
      assert.is_true(ok)
      assert.equal("owner died", why)
      lk:release()
      assert.is_true(lk:acquire(5))
    end)

    it("a waiter is granted the lock when its holder is killed", function()
      local lk = m:Lock()
      local held = mp.Event()
      local p = mp.Process { target = function() lk:acquire() held:set() core.sleep(60) end }
      p:start()
      assert.is_true(held:wait(30))
      local killer = mp.Process { target = function() core.sleep(0.3) core.kill(p.pid, 9) end }
      killer:start()
      local ok, why = lk:acquire(30)
      assert.is_true(ok)
      assert.equal("owner died", why)
      killer:join() p:join()
    end)

    it("hold gives a guard for <close>", function()
      local lk = m:Lock()
      do
        local g <close> = lk:hold()
        assert.is_true(lk:locked())
      end
      assert.is_false(lk:locked())
    end)
  end)

  describe("Semaphore, Event, Condition, Barrier", function()
    it("Semaphore counts; BoundedSemaphore refuses too many releases", function()
      local s = m:Semaphore(2)
      assert.is_true(s:acquire()) assert.is_true(s:acquire())
      assert.is_false(s:acquire(0.1))
      assert.equal(0, s:get_value())
      s:release(2)
      assert.equal(2, s:get_value())
      local b = m:BoundedSemaphore(1)
      H.raises("BoundedSemaphore:release(): BoundedSemaphore released too many times", b.release, b)
    end)

    it("Event wakes a waiting process; wait times out with false", function()
      local e = m:Event()
      assert.is_false(e:wait(0.1))
      local p = mp.Process { target = function() core.sleep(0.2) e:set() end }
      p:start()
      assert.is_true(e:wait(30))
      assert.is_true(e:is_set())
      e:clear()
      assert.is_false(e:is_set())
      p:join()
    end)

    it("Condition: wait releases the lock, notify wakes, wait_for checks a predicate", function()
      local c = m:Condition()
      local d = m:dict()
      H.raises("cannot wait on an un-acquired lock", c.wait, c, 1)
      local p = mp.Process { target = function()
        c:acquire()
        d.ready = true
        c:notify()
        c:release()
      end }
      c:acquire()
      p:start()
      assert.truthy(c:wait_for(function() return d.ready end, 30))
      c:release()
      p:join()
      c:acquire()
      assert.is_false(c:wait(0.1))
      c:release()
    end)

    it("Barrier lets its parties through together, with their indexes", function()
      local b = m:Barrier(2)
      local idx = m:list()
      local p = mp.Process { target = function() idx:append(b:wait(30)) end }
      p:start()
      idx:append(b:wait(30))
      p:join()
      local t = idx:totable() table.sort(t)
      assert.same({ 0, 1 }, t)
      assert.equal(2, b.parties)
      assert.is_false(b.broken)
    end)

    it("Barrier breaks on a timeout and when a party dies while waiting", function()
      local b = m:Barrier(3)
      H.raises("broken barrier", b.wait, b, 0.1)
      assert.is_true(b.broken)
      b:reset()
      local p = mp.Process { target = function() b:wait() end }
      p:start()
      H.eventually(function() return b.n_waiting == 1 end, 30)
      p:kill() p:join()
      H.raises("broken barrier (pid " .. p.pid .. " died while waiting)", function()
        H.eventually(function() return b.broken end, 30)
        b:wait(30)
      end)
    end)
  end)

  describe("faults", function()
    it("errors point at the user's call, not the library", function()
      local d, ns, v, l = m:dict(), m:Namespace(), m:Value("i"), m:list()
      -- (no tail calls: a tail call leaves no place of its caller, in Lua's own errors too)
      local e = H.raises("manager_proxies_spec.lua:", function() local t = l:totable() .. 1 return t end)
      m._proc:kill()
      m._proc:join()
      for _, f in ipairs {
        function() local x = d.x return x end, function() local x = d:totable() return x end,
        function() local x = ns.x return x end, function() local x = v.value return x end,
        function() l:append(1) end, function() local x = m:list() return x end,
      } do
        e = H.raises("manager_proxies_spec.lua:", f)
        assert.truthy(e:find("the manager process is gone", 1, true), e)
        assert.is_nil(e:find("manager.lua", 1, true), e)
      end
      H.raises("Namespace.x: the manager process is gone", function() return ns.x end)
      H.raises("Value.value: the manager process is gone", function() return v.value end)
    end)

    it("a killed manager makes a waiting acquire raise, never hang", function()
      local lk = m:Lock()
      lk:acquire()
      local p = mp.Process { target = function()
        local ok, e = pcall(lk.acquire, lk)
        core._exit(not ok and e:find("Lock:acquire(): the manager process is gone", 1, true) and 0 or 1)
      end }
      p:start()
      core.sleep(0.2)
      m._proc:kill()
      p:join(60)
      assert.is_false(p:is_alive())
      assert.equal(0, p.exitcode)
      H.raises("the manager process is gone", lk.release, lk)
    end)

    it("a client killed in the middle of its requests leaves the manager serving others", function()
      local d = m:dict()
      local p = mp.Process { target = function() for i = 1, 1e9 do d:update_with("n", function(v) return (v or 0) + 1 end) d[i] = i end end }
      p:start()
      H.eventually(function() return (d.n or 0) > 10 end, 30)
      p:kill() p:join()
      d.after = 1
      assert.equal(1, d.after)
    end)
  end)
end)
