-- The codec's in-place paths for tables (src/codec.c, docs/codec.md "Tables in
-- place"): small tables encoded by reading their nodes, tables of a repeated
-- shape decoded from a template, array parts filled in place, and the string
-- prefetch of big messages. Each test runs with the mirrors on (when this Lua
-- allows them) and through the API, and both must give the same values.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local encode, decode = mp.encode, mp.decode

-- deep equality of plain values (tables by content, metatables by identity,
-- sharing and cycles followed)
local function same(a, b, seen)
  if type(a) == "function" then return type(b) == "function" end  -- (a new closure on arrival)
  if type(a) ~= "table" or type(b) ~= "table" then
    if a ~= a and b ~= b then return true end  -- NaN
    return a == b and math.type(a) == math.type(b)
  end
  seen = seen or {}
  if seen[a] then return seen[a] == b end
  seen[a] = b
  for k, v in pairs(a) do  -- (table keys arrive as new tables: not compared)
    if type(k) ~= "table" and not same(v, b[k], seen) then return false end
  end
  for k in pairs(b) do if type(k) ~= "table" and a[k] == nil then return false end end
  local ma, mb = getmetatable(a), getmetatable(b)
  return ma == mb or (ma ~= nil and mb ~= nil and same(ma, mb, seen))
end

local function count(t) local n = 0; for _ in pairs(t) do n = n + 1 end return n end

local function records(n, f)
  local t = {}
  for i = 1, n do t[i] = f(i) end
  return t
end

local function record(i) return { id = i, name = "item" .. i, tags = { "a", "b" }, score = i / 3 } end

describe("codec: tables in place", function()
  local view = { core._codec_view() }
  after_each(function() core._codec_view(view[1]) end)

  local function both_ways(f)
    for _, on in ipairs { true, false } do
      core._codec_view(on)
      f(on)
    end
  end

  it("uses the node and string mirrors on this Lua 5.4", function()
    local arrays, nodes, strings = core._codec_view()
    assert.is_true(arrays)
    assert.is_true(nodes)
    assert.is_true(strings)
    core._codec_view(false)
    assert.same({ false, false, false }, { core._codec_view() })
    core._codec_view(true, false)  -- strings off alone
    assert.same({ true, true, false }, { core._codec_view() })
  end)

  it("encodes small tables to the same bytes in place and through the API", function()
    local shared = { "s" }
    local big = ("B"):rep(70000)  -- referenced, not copied, while encoding
    local f = load("return function() return 1 end", "=f", "t", _G)()
    local values = {
      records(300, record),
      { 1, 2, 3, nil, 5 }, { nil, nil, 3 }, { [1] = 1, [2] = 2, [4] = 4, x = { y = { z = true } } },
      { [1.5] = 1, [true] = false, [false] = true, [shared] = 3, s = ("l"):rep(300), b = big, c = big },
      setmetatable({ a = 1 }, { __index = {} }), { [2] = 2, [1] = 1, [3] = 3 },
      { f = math.floor, g = { h = string.rep } }, { -1, -2.5, 1e300, math.mininteger, 2^53 },
      { shared, shared, { shared }, [shared] = shared }, { fn = f, again = f },
      { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, x = 1 }, { [1] = {}, [2] = {} }, { k = ("x"):rep(40), [("y"):rep(41)] = 1 },
    }
    for i, v in ipairs(values) do
      core._codec_view(true)
      local a = encode(v)
      core._codec_view(false)
      local b = encode(v)
      assert.equal(b, a, "value " .. i)
      core._codec_view(true)
      assert.is_true(same(v, decode(a)), "value " .. i)
    end
  end)

  it("names the culprit inside a small table read in place", function()
    both_ways(function()
      local co = coroutine.create(print)
      assert.has_error(function() encode({ a = { b = co } }) end, "cannot send a thread (coroutine) at value.a.b")
      assert.has_error(function() encode({ 1, 2, { co } }) end, "cannot send a thread (coroutine) at value[3][1]")
      assert.has_error(function() encode({ [7] = co }) end, "cannot send a thread (coroutine) at value[7]")
      assert.has_error(function() encode({ [2.5] = co }) end, "cannot send a thread (coroutine) at value[2.5]")
      assert.has_error(function() encode({ [co] = 1 }) end, "cannot send a thread (coroutine) at value[<thread key>]")
    end)
  end)

  it("decodes records of one shape, of shapes in turn, and of every kind of value", function()
    local shared = { x = 1 }
    local f = load("return function() return 2 end", "=f", "t", _G)()
    local sets = {
      records(1000, record),
      records(200, function(i) return i % 2 == 0 and { x = i, y = { i }, z = shared } or { x = tostring(i), w = true } end),
      records(100, function(i) return { a = shared, b = f, c = i % 3 == 0, d = -i * 1e10, e = ("L"):rep(100 + i) } end),
      records(50, function(i) return { k1 = i, k2 = i, k3 = i, k4 = i, k5 = i, k6 = i, k7 = i, k8 = i, k9 = i,
        k10 = i, k11 = i, k12 = i, k13 = i, k14 = i, k15 = i, k16 = i } end),  -- the most pairs a template takes
      records(50, function(i) return { k1 = i, k2 = i, k3 = i, k4 = i, k5 = i, k6 = i, k7 = i, k8 = i, k9 = i,
        k10 = i, k11 = i, k12 = i, k13 = i, k14 = i, k15 = i, k16 = i, k17 = i } end),  -- one more: the API
      records(30, function(i) return { [i] = "int key", s = i } end),
      records(30, function(i) return setmetatable({ p = i }, { __index = shared }) end),
    }
    both_ways(function()
      for i, v in ipairs(sets) do
        local u = decode(encode(v))
        assert.is_true(same(v, u), "set " .. i)
      end
      local u = decode(encode(sets[2]))
      assert.equal(u[2].z, u[4].z)  -- sharing kept
    end)
  end)

  it("gives tables from a template that behave as any other", function()
    both_ways(function()
      local u = decode(encode(records(20, record)))
      for i = 1, 20 do
        local r = u[i]
        assert.equal(4, count(r))
        r.extra, r.more, r.yet, r.again = 1, 2, 3, 4  -- new keys: its free slots and chains hold
        r.id = nil
        assert.equal(7, count(r))
        assert.equal("item" .. i, r.name)
        assert.equal(1, r.extra); assert.equal(4, r.again); assert.is_nil(r.id)
        for k = 1, 100 do r["k" .. k] = k end   -- a rehash
        assert.equal(107, count(r))
        assert.equal(i / 3, r.score)
      end
      -- a template copy used as a metatable finds its metamethods (no stale "absent" flags)
      local mts = decode(encode(records(5, function(i) return { __index = { foo = i }, n = i } end)))
      for i = 1, 5 do assert.equal(i, setmetatable({}, mts[i]).foo) end
      local eqs = decode(encode(records(4, function() return { __eq = function() return true end } end)))
      assert.is_true(setmetatable({}, eqs[4]) == setmetatable({}, eqs[4]))
    end)
  end)

  it("keeps decoded strings and tables alive through collections in progress", function()
    local v = records(20000, record)
    local s = encode(v)
    for _, mode in ipairs { "incremental", "generational" } do
      collectgarbage(mode)
      if mode == "incremental" then collectgarbage("setpause", 10); collectgarbage("setstepmul", 400) end
      both_ways(function()
        for _ = 1, 3 do
          collectgarbage("step", 0)
          local u = decode(s)
          collectgarbage(); collectgarbage()
          local junk = {}
          for i = 1, 20000 do junk[i] = { i, "junk" .. i } end  -- reuses freed memory
          for i = 1, 20000, 97 do
            local r = u[i]
            assert.equal("item" .. i, r.name)
            assert.equal("b", r.tags[2])
            assert.equal(i, r.id)
          end
        end
      end)
    end
    collectgarbage("incremental")
    collectgarbage("setpause", 200); collectgarbage("setstepmul", 100)
  end)

  it("survives finalizers that change the table being encoded", function()
    both_ways(function()
      for round = 1, 5 do
        local t = { a = 1 }
        for i = 1, 60 do t["big" .. i] = ("x"):rep(70000 + i) end  -- anchors: allocations while encoding
        for _ = 1, 200 do
          setmetatable({}, { __gc = function() for k = 1, 50 do t["n" .. round .. "_" .. k] = k end t.a = nil end })
        end
        local ok, s = pcall(encode, t)
        assert.is_true(ok, s)
        assert.is_table(decode(s))
        collectgarbage()
      end
    end)
  end)

  it("rejects every truncation of a records encoding, and survives its corruptions", function()
    local v = records(40, function(i) return { id = i, name = "n" .. i, ok = i % 2 == 0, sub = { i } } end)
    local s = encode(v)
    assert.is_true(#s > 1024)  -- big enough for the string prefetch
    both_ways(function()
      for i = 0, #s - 1, 3 do
        local ok, err = pcall(decode, s:sub(1, i))
        assert.is_false(ok, "prefix of length " .. i)
        assert.matches("cannot decode", err)
      end
      for i = 2, #s, 2 do
        for _, x in ipairs { 0x01, 0x80, 0x08, 0xff } do
          local bad = s:sub(1, i - 1) .. string.char(s:byte(i) ~ x) .. s:sub(i + 1)
          local ok, err = pcall(decode, bad)
          if not ok then assert.matches("cannot decode", err) end
          ok, err = pcall(decode, bad, "data")
          if not ok then assert.matches("cannot decode", err) end
        end
      end
    end)
  end)
end)
