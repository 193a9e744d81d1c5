-- Specs of Pool: every method and option, AsyncResult, lifetime and sending errors.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- Functions sent to workers must not reach globals through busted's sandbox environment: it would
-- be sent by value with all of busted's state. These locals make them upvalues instead (the real
-- _G is sent as "the receiver's globals").
local _G, error, select, tostring, tonumber, type, pairs, ipairs, print =
      _G, error, select, tostring, tonumber, type, pairs, ipairs, print
local math, string, table, io, os, coroutine = math, string, table, io, os, coroutine

local function double(x) return x * 2 end

describe("Pool", function()
  H.leak_check(before_each, after_each)

  describe("creation", function()
    it("takes a number of processes", function()
      local pool <close> = mp.Pool(3)
      assert.equal(3, #pool:stats())
    end)

    it("defaults to cpu_count() processes", function()
      local pool <close> = mp.Pool()
      assert.equal(mp.cpu_count(), #pool:stats())
    end)

    it("takes a table of options", function()
      local pool <close> = mp.Pool { processes = 2 }
      assert.equal(2, #pool:stats())
      assert.matches("^<Pool processes=2 state=running>$", tostring(pool))
    end)

    it("runs the initializer with initargs in every worker; its state persists like Python globals", function()
      local pool <close> = mp.Pool { processes = 2, initializer = function(a, b) _G.WORKER_STATE = a + b end,
                                     initargs = { 1, 2 } }
      local r = pool:map(function() return _G.WORKER_STATE end, { 1, 2, 3, 4 }, 1)
      assert.are.same({ 3, 3, 3, 3, n = 4 }, r)
      assert.is_nil(rawget(_G, "WORKER_STATE"))  -- the parent is untouched
    end)

    it("keeps worker-local state across calls", function()
      local pool <close> = mp.Pool(1)
      pool:map(function() _G.COUNTER = (_G.COUNTER or 0) + 1 end, { 1, 2, 3 }, 1)
      assert.equal(4, pool:apply(function() _G.COUNTER = _G.COUNTER + 1 return _G.COUNTER end))
    end)

    it("replaces a worker after maxtasksperchild tasks", function()
      local pool <close> = mp.Pool { processes = 1, maxtasksperchild = 2 }
      local pids = pool:map(function() return core.getpid() end, { 1, 2, 3, 4, 5, 6 }, 1)
      assert.equal(pids[1], pids[2])
      assert.equal(pids[3], pids[4])
      assert.equal(pids[5], pids[6])
      assert.are_not.equal(pids[1], pids[3])
      assert.are_not.equal(pids[3], pids[5])
    end)

    it("replaces a retiring worker in the same turn, not at the next health check", function()
      -- A worker that reached maxtasksperchild says so before it exits: the parent reaps and
      -- replaces it at once. Unannounced, each exit cost a whole 50 ms slice of waiting for
      -- results (a map of 200 items with maxtasksperchild = 1: 5 s). Counted in a child: the
      -- result waits that ran out while a worker of the pool was already dead.
      local script = [[
        local core = require "multiprocessing.core"
        local take, late = core.take_result, 0
        local function dead(pid)
          local f = io.open("/proc/" .. pid .. "/stat")
          if not f then return true end
          local st = f:read("a"):match("^%d+ %b() (%a)")
          f:close()
          return st == "Z" or st == "X"
        end
        core.take_result = function(results, wait, inflight, max, pool)
          local r = table.pack(take(results, wait, inflight, max, pool))
          if r[1] == nil and r[2] == "timeout" and wait > 0 then
            for _, w in pairs(pool._workers) do if dead(w.pid) then late = late + 1 break end end
          end
          return table.unpack(r, 1, r.n)
        end
        local mp = require "multiprocessing"
        local pool <close> = mp.Pool { processes = 2, maxtasksperchild = 1 }
        local pids = pool:map(function() return core.getpid() end, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 }, 1)
        local seen = {}
        for _, pid in ipairs(pids) do assert(not seen[pid], "a worker ran two tasks") seen[pid] = true end
        print("late " .. late)
      ]]
      assert.are.equal("late 0\n", H.script_output(script))
    end)

    it("rejects bad arguments", function()
      assert.has_error(function() mp.Pool("x") end, "bad argument #1 to 'Pool' (number or table expected, got string)")
      assert.has_error(function() mp.Pool(0) end, "bad argument #1 to 'Pool' (processes must be a positive integer)")
      assert.has_error(function() mp.Pool(1.5) end, "bad argument #1 to 'Pool' (processes must be a positive integer)")
      assert.has_error(function() mp.Pool { initializer = 1 } end,
        "bad argument #1 to 'Pool' (initializer must be a function)")
      assert.has_error(function() mp.Pool { maxtasksperchild = 0 } end,
        "bad argument #1 to 'Pool' (maxtasksperchild must be a positive integer)")
    end)
  end)

  describe("map", function()
    it("returns the results in order", function()
      local pool <close> = mp.Pool(2)
      assert.are.same({ 2, 4, 6, 8, n = 4 }, pool:map(double, { 1, 2, 3, 4 }))
    end)

    it("returns an empty table for an empty input", function()
      local pool <close> = mp.Pool(2)
      local r = pool:map(double, {})
      assert.equal(0, #r)
      assert.equal(0, r.n)
    end)

    it("keeps nil results: the result's n field counts them", function()
      local pool <close> = mp.Pool(2)
      local r = pool:map(function(x) if x % 2 == 0 then return nil end return x end, { 1, 2, 3, 4 })
      assert.equal(4, r.n)
      assert.equal(1, r[1]); assert.is_nil(r[2]); assert.equal(3, r[3]); assert.is_nil(r[4])
    end)

    it("honours the input's n field (nil items)", function()
      local pool <close> = mp.Pool(2)
      local r = pool:map(function(x) return x == nil end, { 1, nil, 3, n = 3 })
      assert.are.same({ false, true, false, n = 3 }, r)
    end)

    it("reads an iterator function until it returns nil", function()
      local pool <close> = mp.Pool(2)
      local i = 0
      local r = pool:map(double, function() i = i + 1 if i <= 5 then return i end end)
      assert.are.same({ 2, 4, 6, 8, 10, n = 5 }, r)
    end)

    it("works over many items", function()
      local pool <close> = mp.Pool(2)
      local xs = {}
      for i = 1, 10000 do xs[i] = i end
      local r = pool:map(double, xs)
      assert.equal(10000, r.n)
      for i = 1, 10000 do assert(r[i] == 2 * i) end
    end)

    it("takes a chunksize as a number or in the options", function()
      local pool <close> = mp.Pool(2)
      local xs = { 1, 2, 3, 4, 5, 6, 7 }
      assert.are.same({ 2, 4, 6, 8, 10, 12, 14, n = 7 }, pool:map(double, xs, 3))
      assert.are.same({ 2, 4, 6, 8, 10, 12, 14, n = 7 }, pool:map(double, xs, { chunksize = 2 }))
      local before = 0
      for _, w in ipairs(pool:stats()) do before = before + w.tasks end
      pool:map(double, xs, { chunksize = 7 })
      local after = 0
      for _, w in ipairs(pool:stats()) do after = after + w.tasks end
      assert.equal(1, after - before)  -- one chunk, one task message
    end)

    it("rejects bad options and arguments", function()
      local pool <close> = mp.Pool(1)
      H.raises("bad options to 'map' (number or table expected, got string)", pool.map, pool, double, { 1 }, "x")
      H.raises("bad option chunksize to 'map' (positive integer expected)", pool.map, pool, double, { 1 }, { chunksize = 0 })
      H.raises("bad option chunksize to 'map' (positive integer expected)", pool.map, pool, double, { 1 }, { chunksize = 1.5 })
      H.raises("bad option timeout to 'map' (positive number expected)", pool.map, pool, double, { 1 }, { timeout = -1 })
      H.raises("bad argument #1 to 'map' (function expected, got number)", pool.map, pool, 42, { 1 })
      H.raises("bad argument #2 to 'map' (table or iterator function expected, got number)", pool.map, pool, double, 42)
      H.raises("bad argument #1 to 'imap' (function expected, got nil)", pool.imap, pool, nil, { 1 })
      H.raises("bad argument #2 to 'starmap' (table or iterator function expected, got string)",
        pool.starmap, pool, double, "x")
      assert.are.same({ 2, n = 1 }, pool:map(double, { 1 }))  -- still usable
    end)

    it("rejects a chunksize number that is not a positive integer", function()
      local pool <close> = mp.Pool(1)
      H.raises("bad option chunksize to 'map' (positive integer expected)", pool.map, pool, double, { 1 }, 0)
    end)

    it("reports argument errors at the caller's line", function()
      local pool <close> = mp.Pool(1)
      local err = H.error_of(function() local r = pool:map(42, { 1 }) return r end)
      assert.matches("^spec/pool_spec.lua:%d+: bad argument", err)
    end)

    it("runs closures with their upvalues", function()
      local pool <close> = mp.Pool(2)
      local k, t = 10, { add = 5 }
      assert.are.same({ 16, 17, n = 2 }, pool:map(function(x) return x + k + t.add end, { 1, 2 }))
    end)

    it("runs functions defined after the pool started", function()
      local pool <close> = mp.Pool(2)
      local function later(x) return x .. "!" end
      assert.are.same({ "a!", "b!", n = 2 }, pool:map(later, { "a", "b" }))
      local k = 3
      local function later2(x) return x * k end
      assert.are.same({ 3, 6, n = 2 }, pool:map(later2, { 1, 2 }))
    end)

    it("sees a closure's upvalues as they are at each call", function()
      local pool <close> = mp.Pool(2)
      local k = 1
      local function f(x) return x + k end
      assert.are.same({ 2, n = 1 }, pool:map(f, { 1 }))
      k = 100
      assert.are.same({ 101, n = 1 }, pool:map(f, { 1 }))
    end)

    it("runs C functions such as math.sqrt", function()
      local pool <close> = mp.Pool(2)
      assert.are.same({ 2.0, 3.0, n = 2 }, pool:map(math.sqrt, { 4, 9 }))
      assert.are.same({ "A", "B", n = 2 }, pool:map(string.upper, { "a", "b" }))
    end)

    it("returns large results (a 10 MiB string)", function()
      local pool <close> = mp.Pool(2)
      local r = pool:map(function(n) return ("x"):rep(n) end, { 10 * 1024 * 1024, 3 })
      assert.equal(10 * 1024 * 1024, #r[1])
      assert.equal("xxx", r[2])
    end)

    it("sends large arguments", function()
      local pool <close> = mp.Pool(2)
      local big = ("y"):rep(5 * 1024 * 1024)
      assert.are.same({ #big, n = 1 }, pool:map(function(s) return #s end, { big }))
    end)

    it("names the item that cannot be sent (a coroutine as item 3 → args[3])", function()
      local pool <close> = mp.Pool(2)
      local co = coroutine.create(print)
      local ok, err = pcall(pool.map, pool, double, { 1, 2, co, 4 }, 1)
      assert.is_false(ok)
      assert.matches("cannot send a thread", err)
      assert.matches("args%[3%]", err)
    end)

    it("names an unsendable item of an iterator by its place in the whole input", function()
      local pool <close> = mp.Pool(2)
      local co = coroutine.create(print)
      local i = 0
      local input = function() i = i + 1 if i == 5 then return co elseif i <= 6 then return i end end
      local ok, err = pcall(pool.map, pool, double, input, 2)  -- item 5 is the 1st of the 3rd chunk
      assert.is_false(ok)
      assert.matches("cannot send a thread %(coroutine%) at args%[5%]", err)
    end)

    it("stays usable after an argument could not be sent", function()
      local pool <close> = mp.Pool(2)
      assert.has_error(function() pool:map(double, { 1, 2, coroutine.create(print) }) end)
      assert.are.same({ 2, 4, n = 2 }, pool:map(double, { 1, 2 }))
    end)

    it("raises when a result cannot be sent, and stays usable", function()
      local pool <close> = mp.Pool(2)
      local ok, err = pcall(pool.map, pool, function() return coroutine.create(print) end, { 1 })
      assert.is_false(ok)
      assert.matches("item 1", err)
      assert.are.same({ 2, n = 1 }, pool:map(double, { 1 }))
    end)

    it("says why a result cannot be sent", function()
      local pool <close> = mp.Pool(1)
      local ok, err = pcall(pool.map, pool, function() return coroutine.create(print) end, { 1 })
      assert.is_false(ok)
      assert.matches("cannot send a thread", err)
    end)
  end)

  describe("imap", function()
    it("yields nothing for an empty input", function()
      local pool <close> = mp.Pool(1)
      for _ in pool:imap(double, {}) do error("unreachable") end
      for _ in pool:imap_unordered(double, {}) do error("unreachable") end
      for _ in pool:imap(double, function() return nil end) do error("unreachable") end
    end)

    it("yields index and value in order", function()
      local pool <close> = mp.Pool(2)
      local got = {}
      for i, v in pool:imap(double, { 1, 2, 3, 4, 5 }) do got[#got + 1] = { i, v } end
      assert.are.same({ { 1, 2 }, { 2, 4 }, { 3, 6 }, { 4, 8 }, { 5, 10 } }, got)
    end)

    it("keeps order when later items finish first", function()
      local pool <close> = mp.Pool(3)
      local order = {}
      for i, v in pool:imap(function(s) mp.sleep(s) return s end, { 0.3, 0.05, 0.1 }, 1) do
        order[#order + 1] = i
        assert.equal(({ 0.3, 0.05, 0.1 })[i], v)
      end
      assert.are.same({ 1, 2, 3 }, order)
    end)

    it("yields nil results with their index", function()
      local pool <close> = mp.Pool(2)
      local got = {}
      for i, v in pool:imap(function(x) if x == 2 then return nil end return x end, { 1, 2, 3 }) do
        got[i] = v == nil and "nil" or v
      end
      assert.are.same({ 1, "nil", 3 }, got)
    end)

    it("reads an iterator lazily, with bounded work in flight", function()
      local pool <close> = mp.Pool(2)
      local asked = 0
      local function naturals() asked = asked + 1 return asked end  -- never ends
      local sum = 0
      for i, v in pool:imap(double, naturals) do
        sum = sum + v
        if i == 20 then break end
      end
      assert.equal(420, sum)
      -- bounded: at most max(4 * workers * chunksize, 1024) items ahead of the consumer; automatic
      -- chunks grow up to 10000 items for a function this cheap
      assert.is_true(asked < 2 * 4 * 10000 + 2048, "read " .. asked .. " items of an endless iterator")
      asked = 0
      for i in pool:imap(double, naturals, 1) do
        if i == 20 then break end
      end
      assert.is_true(asked <= 1024 + 20 + 2 * 4, "read " .. asked .. " items with chunksize 1")
    end)

    it("never waits for results with nothing in flight while it has input to send", function()
      -- Each window the loop consumed is sent again before the engine waits: the wait used to
      -- come first, and with nothing in flight it lasted its whole slice (50 ms a window, up to
      -- 2.4 s for 200,000 items). Counted in a child, through the core's result wait.
      local script = [[
        local core = require "multiprocessing.core"
        local take, idle, inside = core.take_result, 0, false
        core.take_result = function(results, wait, inflight, ...)
          if inside and wait > 0 and next(inflight) == nil then idle = idle + 1 end
          return take(results, wait, inflight, ...)
        end
        local mp = require "multiprocessing"
        local pool <close> = mp.Pool(2)
        local xs = {}
        for i = 1, 5000 do xs[i] = i end
        local double = function(x) return x * 2 end
        for _, kind in ipairs({ "imap", "imap_unordered" }) do
          local s = 0
          inside = true
          for _, v in pool[kind](pool, double, xs, 1) do s = s + v end
          inside = false
          assert(s == 5000 * 5001, kind)
        end
        print("idle waits " .. idle)
      ]]
      assert.are.equal("idle waits 0\n", H.script_output(script))
    end)

    it("returns a closing value as its 4th result; break cleans up and the pool still works", function()
      local pool <close> = mp.Pool(2)
      local f, s, c, closer = pool:imap(function(x) mp.sleep(0.05) return x end, { 1, 2, 3, 4, 5, 6, 7, 8 }, 1)
      assert.is_function(f)
      assert.is_not_nil(closer)
      assert.is_function(getmetatable(closer).__close)
      for i in pool:imap(function(x) mp.sleep(0.05) return x end, { 1, 2, 3, 4, 5, 6, 7, 8 }, 1) do
        if i == 2 then break end
      end
      getmetatable(closer).__close(closer)
      assert.are.same({ 2, 4, 6, n = 3 }, pool:map(double, { 1, 2, 3 }))
      local n = 0
      for _ in pool:imap(double, { 1, 2, 3 }) do n = n + 1 end
      assert.equal(3, n)
    end)

    it("runs alongside an unfinished imap", function()
      local pool <close> = mp.Pool(2)
      local it = pool:imap(double, { 1, 2, 3 })
      assert.are.same({ 1, 2 }, { it() })
      assert.are.same({ 10, n = 1 }, pool:map(double, { 5 }))
      assert.are.same({ 2, 4 }, { it() })
      assert.are.same({ 3, 6 }, { it() })
      assert.is_nil(it())
    end)
  end)

  describe("imap_unordered", function()
    it("yields in completion order (index tells which item)", function()
      local pool <close> = mp.Pool(2)
      local order = {}
      for i, v in pool:imap_unordered(function(s) mp.sleep(s) return s * 10 end, { 0.4, 0.05 }, 1) do
        order[#order + 1] = i
        assert.equal(({ 4, 0.5 })[i], v)
      end
      assert.are.same({ 2, 1 }, order)
    end)

    it("yields every item exactly once", function()
      local pool <close> = mp.Pool(2)
      local seen, n = {}, 0
      for i, v in pool:imap_unordered(double, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }) do
        assert.is_nil(seen[i])
        seen[i], n = v, n + 1
      end
      assert.equal(10, n)
      for i = 1, 10 do assert.equal(2 * i, seen[i]) end
    end)

    it("takes an iterator function", function()
      local pool <close> = mp.Pool(2)
      local i, sum = 0, 0
      for _, v in pool:imap_unordered(double, function() i = i + 1 if i <= 100 then return i end end) do
        sum = sum + v
      end
      assert.equal(10100, sum)
    end)
  end)

  describe("starmap", function()
    it("unpacks each argument table", function()
      local pool <close> = mp.Pool(2)
      assert.are.same({ 3, 7, n = 2 }, pool:starmap(function(a, b) return a + b end, { { 1, 2 }, { 3, 4 } }))
    end)

    it("honours each argument table's n field", function()
      local pool <close> = mp.Pool(2)
      local r = pool:starmap(function(...) return select("#", ...) end, { { n = 3 }, { 1, nil, 3, nil, n = 4 } })
      assert.are.same({ 3, 4, n = 2 }, r)
    end)

    it("takes a chunksize", function()
      local pool <close> = mp.Pool(2)
      assert.are.same({ 2, 12, 30, n = 3 }, pool:starmap(function(a, b) return a * b end,
        { { 1, 2 }, { 3, 4 }, { 5, 6 } }, 2))
    end)
  end)

  describe("apply", function()
    it("calls f with the arguments and returns all its results", function()
      local pool <close> = mp.Pool(2)
      assert.are.same({ 3, nil, "x" }, { pool:apply(function(a, b) return a + b, nil, "x" end, { 1, 2 }) })
      assert.equal(3, select("#", pool:apply(function() return 1, nil, nil end)))
    end)

    it("runs without arguments", function()
      local pool <close> = mp.Pool(1)
      assert.equal("hi", pool:apply(function() return "hi" end))
    end)

    it("rejects arguments that are not a table", function()
      local pool <close> = mp.Pool(1)
      H.raises("bad argument #2 to 'apply' (table of arguments expected, got number)", pool.apply, pool, print, 5)
    end)
  end)

  describe("apply_async and AsyncResult", function()
    it("get() waits for the values", function()
      local pool <close> = mp.Pool(2)
      local r = pool:apply_async(function(a, b) return a * b, "two" end, { 6, 7 })
      assert.are.same({ 42, "two" }, { r:get() })
      assert.is_true(r:ready())
      assert.is_true(r:successful())
    end)

    -- each value exactly: its type, integer or float, its bits (%a), its bytes
    local function describe_values(...)
      local out = { select("#", ...) }
      for i = 1, select("#", ...) do
        local v = select(i, ...)
        local mt = math.type(v)
        out[#out + 1] = type(v) .. ":" .. (mt == "float" and ("%a"):format(v) or mt == "integer" and ("%d"):format(v)
          or type(v) == "string" and ("%q"):format(v) or type(v) == "table" and "#" .. #v or tostring(v))
      end
      return table.concat(out, " ")
    end

    it("passes arguments and values of every small shape exactly (the short ways for up to 7 plain values, and beyond)", function()
      local pool <close> = mp.Pool(1)
      local s255, s256 = string.rep("s", 255), string.rep("t", 256)
      local argsets = {
        {}, { 0 }, { -0.0 }, { 1.0 }, { math.huge, -math.huge }, { math.mininteger, math.maxinteger },
        { 1 << 40, -129, 127, 300, 40000, 2 ^ 53, 0.1 }, { true, false, "", "a\0c", s255, 7, 7.5 },
        { 1, 2, 3, 4, 5, 6, 7, 8 }, { s256 }, { s255, s256 }, setmetatable({ 1, 2 }, { __index = {} }),
        { 1, 2, x = 3 }, { {} }, { { 1 } },
      }
      local describe_values = describe_values
      for k, args in ipairs(argsets) do
        local want = describe_values(table.unpack(args, 1, #args))
        assert.equal(want, pool:apply_async(describe_values, args):get(10), "arguments " .. k)
        assert.equal(want, pool:apply(describe_values, args), "arguments " .. k .. " (apply)")
        assert.equal(want, pool:submit(describe_values, table.unpack(args, 1, #args)):result(10), "arguments " .. k .. " (submit)")
      end
      -- values with holes, up to 7 and beyond, returned by the worker as they are
      local returns = { { n = 0 }, { n = 1 }, { nil, 2, n = 3 }, { 1, nil, nil, nil, nil, nil, 7, n = 7 },
        { 1, 2, 3, 4, 5, 6, 7, 8, n = 8 }, { s255, s256, n = 2 }, { -0.0, 1.0, 1, n = 3 } }
      for k, vals in ipairs(returns) do
        local give = function() return table.unpack(vals, 1, vals.n) end
        local want = describe_values(give())
        assert.equal(want, describe_values(pool:apply_async(give):get(10)), "values " .. k)
        assert.equal(want, describe_values(pool:submit(give):result(10)), "values " .. k .. " (submit)")
      end
    end)

    it("get(timeout) returns nil, \"timeout\" while the task runs", function()
      local pool <close> = mp.Pool(1)
      local r = pool:apply_async(function() mp.sleep(0.3) return 1 end)
      local v, why = r:get(0.01)
      assert.is_nil(v)
      assert.equal("timeout", why)
      assert.is_falsy(r:ready())
      assert.has_error(function() r:successful() end, "the result is not ready")
      assert.equal(1, r:get())
    end)

    it("ready() returns false, not nil, while the task runs", function()
      local pool <close> = mp.Pool(1)
      local r = pool:apply_async(function() mp.sleep(0.3) end)
      assert.is_false(r:ready())
      r:get()
    end)

    it("wait(timeout) returns false on timeout, true when ready", function()
      local pool <close> = mp.Pool(1)
      local r = pool:apply_async(function() mp.sleep(0.2) return 1 end)
      assert.same({ nil, "timeout" }, { r:wait(0.01) })
      assert.is_true(r:wait())
      assert.is_true(r:wait(0))
    end)

    it("get() raises the task's error; successful() is false", function()
      local pool <close> = mp.Pool(1)
      local r = pool:apply_async(function() error("nope") end)
      assert.is_true(r:wait(5))
      assert.is_false(r:successful())
      local ok, err = pcall(r.get, r)
      assert.is_false(ok)
      assert.matches("apply failed on item 1 %(worker pid %d+%):\n.-: nope\nstack traceback:", err)
    end)

    it("runs many tasks at once", function()
      local pool <close> = mp.Pool(2)
      local rs = {}
      for i = 1, 20 do rs[i] = pool:apply_async(function(x) return x * x end, { i }) end
      for i = 1, 20 do assert.equal(i * i, rs[i]:get()) end
    end)

    it("get returns every value of the task, nils included, however many", function()
      local pool <close> = mp.Pool(1)
      local r = pool:apply_async(function(n)
        local t = { n = n + 3 }
        for k = 3, n + 2 do t[k] = k end
        t[2] = "two"
        return table.unpack(t, 1, t.n)
      end, { 200 })
      local got = table.pack(r:get())
      assert.equal(203, got.n)
      assert.is_nil(got[1])
      assert.equal("two", got[2])
      assert.equal(202, got[202])
      assert.is_nil(got[203])
      assert.are.same(got, table.pack(r:get()))
    end)

    it("a value that cannot be sent fails the call naming the result; the worker lives on", function()
      local pool <close> = mp.Pool(1)
      local r = pool:apply_async(function() return 1, coroutine.create(print) end)
      H.raises("cannot send a thread (coroutine) at the result", r.get, r)
      assert.equal(6, pool:apply(double, { 3 }))
    end)

    it("a function the worker already has: its values, its error and a value that cannot be sent come back", function()
      -- (the worker's way for the messages of one call once it decoded their function: handle_call)
      local pool <close> = mp.Pool(1)
      local f = function(how, x)
        if how == "raise" then error("boom " .. x) end
        if how == "co" then return x, coroutine.create(print) end
        return x, nil, x + 1
      end
      assert.same({ 1, nil, 2, n = 3 }, table.pack(pool:apply(f, { "ok", 1 })))  -- (decoded here)
      local ok, err = pcall(pool.apply, pool, f, { "raise", 7 })
      assert.is_false(ok)
      assert.matches("apply failed on item 1 %(worker pid %d+%):\n.-: boom 7\nstack traceback:", tostring(err))
      assert.is_nil(tostring(err):find("multiprocessing/pool.lua", 1, true))
      H.raises("cannot send a thread (coroutine) at the result", pool.apply, pool, f, { "co", 3 })
      assert.same({ 5, nil, 6, n = 3 }, table.pack(pool:apply(f, { "ok", 5 })))
      local fut = pool:submit(f, "co", 4)
      H.raises("cannot send a thread (coroutine) at the result", fut.result, fut)
      assert.same({ 9, nil, 10, n = 3 }, table.pack(pool:submit(f, "ok", 9):result()))
      local none = function() end
      assert.equal(0, table.pack(pool:submit(none):result()).n)
      assert.equal(0, table.pack(pool:submit(none):result()).n)
      H.eventually(function() return pool:stats()[1].tasks == 8 end)
      assert.equal(8, pool:stats()[1].items)
    end)

    it("keeps a finished call's values in its own record: under 260 bytes a call, kept", function()
      -- (the record was 248 bytes and its values a table of their own: 360 bytes a call)
      local pool <close> = mp.Pool(1)
      local N = 4000
      local rs = core.newtable(N)
      pool:apply(double, { 1 })
      collectgarbage()
      collectgarbage()
      local before = collectgarbage("count")
      for i = 1, N do rs[i] = pool:apply_async(double, { i }) end
      for i = 1, N do assert.equal(2 * i, rs[i]:get()) end
      collectgarbage()
      collectgarbage()
      local per = (collectgarbage("count") - before) * 1024 / N
      assert.is_true(per < 260, ("%.0f bytes a call"):format(per))
    end)

    it("delivers callback when the parent next talks to the pool", function()
      local pool <close> = mp.Pool(1)
      local got
      local r = pool:apply_async(function(x) return x * 10 end, { 4 }, { callback = function(v) got = v end })
      mp.sleep(0.2)  -- the worker is done, but nobody asked
      assert.is_nil(got)
      assert.is_true(r:ready())  -- talking to the pool delivers it
      assert.equal(40, got)
    end)

    it("delivers callbacks during any pool call", function()
      local pool <close> = mp.Pool(2)
      local got = {}
      pool:apply_async(function() return "a" end, nil, { callback = function(v) got[#got + 1] = v end })
      pool:apply_async(function() error("b") end, nil, { error_callback = function(e) got[#got + 1] = e end })
      mp.sleep(0.2)
      pool:map(double, { 1 })
      assert.equal(2, #got)
      table.sort(got, function(a, b) return #tostring(a) < #tostring(b) end)
      assert.equal("a", got[1])
      assert.matches("apply failed on item 1 %(worker pid %d+%):\n.-: b\nstack traceback:", got[2])
    end)

    it("delivers the error to error_callback and raises it from get()", function()
      local pool <close> = mp.Pool(1)
      local got, cb
      local r = pool:apply_async(function() error("oops") end, nil, {
        callback = function() cb = true end, error_callback = function(e) got = e end })
      assert.has_error(function() r:get() end)
      assert.matches("oops", got)
      assert.is_nil(cb)
    end)

    it("survives a callback that raises (the error is reported on stderr)", function()
      local pool <close> = mp.Pool(1)
      local stderr = H.capture_stderr()
      finally(stderr)
      local r = pool:apply_async(function() return 1 end, nil, { callback = function() error("cb boom") end })
      assert.equal(1, r:get())
      assert.equal(2, pool:apply(function() return 2 end))
      assert.matches("error in a pool callback: .-cb boom\nstack traceback:", stderr())
    end)
  end)

  describe("map_async and starmap_async", function()
    it("map_async returns an AsyncResult of the whole result table", function()
      local pool <close> = mp.Pool(2)
      local got
      local r = pool:map_async(double, { 1, 2, 3 }, { callback = function(v) got = v end })
      assert.are.same({ 2, 4, 6, n = 3 }, r:get())
      assert.are.same({ 2, 4, 6, n = 3 }, got)
    end)

    it("map_async takes a chunksize", function()
      local pool <close> = mp.Pool(2)
      assert.are.same({ 2, 4, 6, n = 3 }, pool:map_async(double, { 1, 2, 3 }, 2):get())
    end)

    it("map_async's error goes to error_callback", function()
      local pool <close> = mp.Pool(2)
      local got
      local r = pool:map_async(function(x) if x == 2 then error("two") end return x end, { 1, 2, 3 },
        { chunksize = 1, error_callback = function(e) got = e end })
      assert.is_true(r:wait(5))
      assert.is_false(r:successful())
      assert.matches("map failed on item 2", got)
    end)

    it("starmap_async unpacks argument tables", function()
      local pool <close> = mp.Pool(2)
      local r = pool:starmap_async(function(a, b) return a - b end, { { 5, 1 }, { 3, 2 } })
      assert.are.same({ 4, 1, n = 2 }, r:get())
    end)
  end)

  describe("lifetime", function()
    it("closes and joins at the end of a <close> scope", function()
      local saved
      do
        local pool <close> = mp.Pool(2)
        saved = pool
        pool:map(double, { 1, 2 })
      end
      assert.matches("state=closed", tostring(saved))
      assert.are.same({}, H.children())
    end)

    it("lets queued work finish when a <close> scope ends", function()
      local r
      do
        local pool <close> = mp.Pool(2)
        r = pool:map_async(function(x) mp.sleep(0.05) return x end, { 1, 2, 3 }, 1)
      end
      assert.are.same({ 1, 2, 3, n = 3 }, r:get())
    end)

    it("terminates when a <close> scope is left by an error", function()
      local saved
      local ok, err = pcall(function()
        local pool <close> = mp.Pool(2)
        saved = pool
        pool:apply_async(function() mp.sleep(10) end)
        error("leaving", 0)
      end)
      assert.is_false(ok)
      assert.equal("leaving", err)
      assert.matches("state=terminated", tostring(saved))
      assert.are.same({}, H.children())
    end)

    it("raises when a closed pool is used", function()
      local pool = mp.Pool(1)
      pool:close()
      H.raises("cannot map: the pool is closing", pool.map, pool, double, { 1 })
      pool:join()
      H.raises("cannot apply: the pool is closed", pool.apply, pool, double, { 1 })
      H.raises("cannot imap: the pool is closed", pool.imap, pool, double, { 1 })
    end)

    it("raises when a terminated pool is used", function()
      local pool = mp.Pool(1)
      pool:terminate()
      H.raises("cannot map: the pool is terminated", pool.map, pool, double, { 1 })
      H.raises("cannot starmap_async: the pool is terminated", pool.starmap_async, pool, double, {})
    end)

    it("close() and terminate() are idempotent; join() needs close or terminate first", function()
      local pool = mp.Pool(1)
      H.raises("cannot join a running pool (close or terminate it first)", pool.join, pool)
      pool:close(); pool:close()
      pool:join(); pool:join()
      pool:terminate(); pool:terminate()
      local p2 = mp.Pool(1)
      p2:terminate(); p2:terminate()
      p2:join()
    end)

    it("close() lets pending work finish", function()
      local pool = mp.Pool(2)
      local r = pool:map_async(function(x) mp.sleep(0.05) return x * 3 end, { 1, 2, 3, 4 }, 1)
      pool:close()
      pool:join()
      assert.are.same({ 3, 6, 9, 12, n = 4 }, r:get())
    end)

    it("terminate() stops running work; its results raise", function()
      local pool = mp.Pool(2)
      local got
      local r = pool:map_async(function() mp.sleep(10) end, { 1, 2 }, { error_callback = function(e) got = e end })
      pool:terminate()
      assert.are.same({}, H.children())
      assert.has_error(function() r:get() end, "the pool was terminated")
      assert.equal("the pool was terminated", got)
    end)

    it("cannot be used in a forked child", function()
      local pool <close> = mp.Pool(1)
      local pid = H.spawn(function()
        local ok, err = pcall(pool.map, pool, double, { 1 })
        assert(not ok and err:find("a Pool can only be used by the process that made it"), err)
      end)
      assert.equal(0, core.waitpid(pid))
      assert.are.same({ 2, n = 1 }, pool:map(double, { 1 }))
    end)
  end)

  describe("stats", function()
    it("reports per worker tasks, items, busy, idle, encode and decode time and pid", function()
      local pool <close> = mp.Pool(2)
      pool:map(function(x) mp.sleep(0.01) return x end, { 1, 2, 3, 4 }, 1)
      -- a worker counts a message just after it sent its results: the last count may lag a little
      H.eventually(function()
        local n = 0
        for _, w in ipairs(pool:stats()) do n = n + w.tasks end
        return n == 4
      end)
      local st = pool:stats()
      assert.equal(2, #st)
      local tasks, items = 0, 0
      for _, w in ipairs(st) do
        assert.is_number(w.pid)
        assert.is_true(H.alive(w.pid))
        for _, k in ipairs { "busy_time", "idle_time", "encode_time", "decode_time" } do
          assert.is_number(w[k])
          assert.is_true(w[k] >= 0)
        end
        tasks, items = tasks + w.tasks, items + w.items
      end
      assert.equal(4, tasks)
      assert.equal(4, items)
    end)
  end)

  describe("progress option", function()
    it("progress = true gives the same results (no bar when stderr is not a terminal)", function()
      local pool <close> = mp.Pool(2)
      assert.are.same({ 2, 4, n = 2 }, pool:map(double, { 1, 2 }, { progress = true }))
      local n = 0
      for _ in pool:imap(double, { 1, 2, 3 }, { progress = true }) do n = n + 1 end
      assert.equal(3, n)
    end)
  end)
end)
