-- The value codec: mp.encode / mp.decode (src/codec.c, docs/codec.md).
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local encode, decode = mp.encode, mp.decode
-- busted runs this file with its own _ENV table, which cannot be sent: the
-- functions sent here use locals, or are loaded with the real globals.
local select, floor = select, math.floor
local function global_fn(src) return assert(load("return " .. src, "=spec", "t", _G))() end
local function rt(v) return decode(encode(v)) end
local function bits(x) return string.pack("<d", x) end
local function float_of_bits(u) return (string.unpack("<d", string.pack("<i8", u))) end

-- the exact error message of encoding v (with root name `root`)
local function send_error(v, root)
  local ok, err = pcall(encode, v, root)
  assert.is_false(ok, "expected an error")
  return err:gsub("^[^:]*:%d+: ", "")
end

-- A rich value for the corruption tests: every tag of the format appears.
local Point = mp.register_metatable("spec.Point", { __name = "spec.Point" })
local function rich()
  local shared = { "shared" }
  local up = 0
  local function inc() up = up + 1; return up end
  local function get() return up end
  local t = {
    1, -2, 300, 70000, 2^40, 0.5, -0.0, "s", ("L"):rep(300), true, false,
    { shared, shared, [shared] = "k" },
    setmetatable({ x = 1 }, Point),
    setmetatable({ y = 2 }, { __index = { z = 3 } }),
    inc, get, math.sqrt, string, _G,
    deep = { a = { b = { c = "d" } } },
  }
  local ints, floats = {}, {}  -- packed arrays (T_INTS, T_FLOATS), one of them shared
  for i = 1, 20 do ints[i], floats[i] = i * 1000, i / 4 end
  t.ints, t.ints2, t.floats = ints, ints, floats
  t.self = t
  return t
end

-- an array of n numbers made by f(i)
local function array(n, f)
  local t = {}
  for i = 1, n do t[i] = f(i) end
  return t
end

-- are a and b arrays of the same numbers, of the same math.type, bit for bit?
local function same_numbers(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do
    if math.type(a[i]) ~= math.type(b[i]) then return false end
    if math.type(a[i]) == "float" then
      if bits(a[i]) ~= bits(b[i]) then return false end
    elseif a[i] ~= b[i] then
      return false
    end
  end
  return next(b, #b > 0 and #b or nil) == nil
end

describe("codec", function()
  describe("scalars", function()
    it("round-trips nil and booleans", function()
      assert.is_nil(rt(nil))
      assert.is_true(rt(true))
      assert.is_false(rt(false))
    end)

    it("round-trips integers of every size, keeping math.type", function()
      local cases = { 0, 1, -1, 127, 128, -128, -129, 255, 256, 32767, 32768, -32768, -32769,
        65535, 65536, 2^31 - 1, -2^31, 2^31, -2^31 - 1, 2^32, 2^53 + 1, math.maxinteger, math.mininteger }
      for _, v in ipairs(cases) do
        v = math.tointeger(v) or v
        local r = rt(v)
        assert.are.equal("integer", math.type(r), tostring(v))
        assert.are.equal(v, r)
      end
      for shift = 0, 63 do  -- every single bit and its neighbours
        for _, v in ipairs { 1 << shift, (1 << shift) - 1, -(1 << shift), ~(1 << shift) } do
          assert.are.equal(v, rt(v))
          assert.are.equal("integer", math.type(rt(v)))
        end
      end
    end)

    it("keeps floats with integral values floats", function()
      for _, v in ipairs { 0.0, 1.0, -1.0, 2.0^53, 2.0^63, -2.0^63, 1e300 } do
        local r = rt(v)
        assert.are.equal("float", math.type(r))
        assert.are.equal(bits(v), bits(r))
      end
    end)

    it("round-trips floats bit for bit: -0.0, infinities, NaN payloads, subnormals", function()
      local cases = { -0.0, 1 / 0, -1 / 0, 0 / 0, -(0 / 0), math.pi, -math.huge, 5e-324, 2.2250738585072014e-308,
        float_of_bits(0x7ff8000000000abc), float_of_bits(0x7ff0000000000001), float_of_bits(-0x0007ffffffffffff),
        1 / 3, 0.1, 1.7976931348623157e308 }
      for _, v in ipairs(cases) do
        local r = rt(v)
        assert.are.equal("float", math.type(r))
        assert.are.equal(bits(v), bits(r))
      end
      assert.are.equal(-1 / 0, 1 / rt(-0.0))  -- the sign of zero
    end)

    it("round-trips binary-safe strings of many lengths", function()
      for _, n in ipairs { 0, 1, 2, 254, 255, 256, 257, 65535, 65536, 65537, 100000 } do
        local s = {}
        for i = 1, n do s[i] = string.char((i * 7 + n) % 256) end
        s = table.concat(s)
        assert.are.equal(s, rt(s), "length " .. n)
      end
      assert.are.equal("\0", rt("\0"))
      assert.are.equal("a\0b\255\0", rt("a\0b\255\0"))
    end)

    it("round-trips a 10 MiB string, alone and inside a table", function()
      local big = ("0123456789abcdef"):rep(655360)
      assert.are.equal(10 * 1024 * 1024, #big)
      assert.are.equal(big, rt(big))
      local t = rt { "before", big, ("x"):rep(70000), after = big }
      assert.are.equal("before", t[1])
      assert.are.equal(big, t[2])
      assert.are.equal(("x"):rep(70000), t[3])
      assert.are.equal(big, t.after)
    end)

    it("encodes small integers compactly", function()
      assert.are.equal(3, #encode(5))
      assert.are.equal(10, #encode(math.maxinteger))
    end)
  end)

  describe("tables", function()
    it("round-trips nested tables", function()
      local v = { 1, 2, { 3, { 4, { 5 } } }, a = { b = { c = { d = "e" } } }, [10] = "ten" }
      assert.are.same(v, rt(v))
    end)

    -- Records of one shape are filled from a template (decode_pairs); the nested records
    -- decoded meanwhile make templates of their own, some in the outer one's slot (8 of
    -- them): the decoder read a template those had emptied (a segfault) on such input.
    it("round-trips records whose nested records have many shapes", function()
      local list = {}
      for i = 1, 400 do
        local inner = { ["k" .. (i % 50)] = i, ["z" .. (i % 7)] = true }
        list[i] = { id = i, name = "n" .. i, inner = inner }
      end
      for _ = 1, 5 do assert.are.same(list, rt(list)) end
    end)

    it("round-trips keys of every sendable type", function()
      local tk, fk = { "table key" }, function() return "function key" end
      local v = { [true] = "t", [false] = "f", [1.5] = "float", [-0.5] = "neg", [2^63] = "big float",
        [math.mininteger] = "minint", [""] = "empty", ["\0"] = "nul", [tk] = "tk", [fk] = "fk", [math.sqrt] = "cf" }
      local r = rt(v)
      assert.are.equal("t", r[true])
      assert.are.equal("f", r[false])
      assert.are.equal("float", r[1.5])
      assert.are.equal("neg", r[-0.5])
      assert.are.equal("big float", r[2^63])
      assert.are.equal("minint", r[math.mininteger])
      assert.are.equal("empty", r[""])
      assert.are.equal("nul", r["\0"])
      assert.are.equal("cf", r[math.sqrt])
      local n, gotk, gotf = 0
      for k, val in pairs(r) do
        n = n + 1
        if type(k) == "table" then gotk = { k, val } end
        if type(k) == "function" and k ~= math.sqrt then gotf = { k, val } end
      end
      assert.are.equal(11, n)
      assert.are.equal("table key", gotk[1][1])
      assert.are.equal("tk", gotk[2])
      assert.are.equal("function key", gotf[1]())
      assert.are.equal("fk", gotf[2])
    end)

    it("keeps holes", function()
      local v = { 1, nil, 3, nil, nil, 6, [100] = 100 }
      local r = rt(v)
      assert.are.equal(1, r[1]); assert.is_nil(r[2]); assert.are.equal(3, r[3])
      assert.is_nil(r[4]); assert.is_nil(r[5]); assert.are.equal(6, r[6]); assert.are.equal(100, r[100])
      local n = 0
      for _ in pairs(r) do n = n + 1 end
      assert.are.equal(4, n)
    end)

    it("sends a table referenced twice as one table twice", function()
      local s = { "x" }
      local r = rt { s, s, k = s, [s] = s }
      assert.are.equal(r[1], r[2])
      assert.are.equal(r[1], r.k)
      assert.are.equal(r[1], r[r[1]])
      r[1][1] = "changed"
      assert.are.equal("changed", r.k[1])
    end)

    it("keeps cycles", function()
      local a, b = {}, {}
      a.b, b.a, a.self = b, a, a
      local r = rt(a)
      assert.are.equal(r, r.self)
      assert.are.equal(r, r.b.a)
      assert.are_not.equal(a, r)
      local ring = { n = 1 }
      local cur = ring
      for i = 2, 150 do cur.next = { n = i }; cur = cur.next end
      cur.next = ring
      local rr = rt { ring }
      local x, count = rr[1], 0
      repeat x = x.next; count = count + 1 until x == rr[1]
      assert.are.equal(150, count)
    end)

    it("round-trips arrays of every shape (array part, hash part, holes, mixed keys)", function()
      local shapes = {}
      local function add(name, t) shapes[#shapes + 1] = { name, t } end
      for _, n in ipairs { 15, 16, 17, 31, 32, 33, 64, 100, 1000 } do
        local grown = {}
        for i = 1, n do grown[i] = i end
        add("grown " .. n, grown)
        local built = load("return {" .. ("1,"):rep(n) .. "}")()  -- an exact array part
        add("constructor " .. n, built)
        local backwards = {}
        for i = n, 1, -1 do backwards[i] = "v" .. i end  -- integer keys in the hash part
        add("backwards " .. n, backwards)
        local mixed = { x = 1, y = { 2 } }
        for i = 1, n do mixed[i] = i % 3 == 0 and { i } or i / 2 end
        mixed[n + 2] = "after a hole"
        add("mixed " .. n, mixed)
        local holes = {}
        for i = 1, n do holes[i] = i end
        holes[n // 2] = nil
        add("hole " .. n, holes)
        local nested = setmetatable({}, { __index = function() return "meta" end })
        for i = 1, n do nested[i] = { i, tostring(i) } end
        add("nested " .. n, nested)
      end
      for _, case in ipairs(shapes) do
        local r = rt(case[2])
        assert.are.same(case[2], r, case[1])
        local n1, n2 = 0, 0
        for _ in pairs(case[2]) do n1 = n1 + 1 end
        for _ in pairs(r) do n2 = n2 + 1 end
        assert.are.equal(n1, n2, case[1])
      end
    end)

    it("decodes string keys right whatever the decoder's key cache holds (same lengths and ends, long, empty)", function()
      local recs = {}
      for i = 1, 300 do
        local r = { [""] = i, ["k" .. ("x"):rep(200) .. "k"] = -i }
        r[("a%03dz"):format(i % 97)] = i               -- same length and ends: one cache slot, many keys
        r[("a%03dz"):format((i * 7) % 97)] = { i }
        r[string.char(i % 256) .. "mid" .. string.char(i % 256)] = i % 256
        recs[i] = r
      end
      local u = decode(encode(recs))
      for i = 1, 300 do
        for k, v in pairs(recs[i]) do
          if type(v) == "table" then assert.same(v, u[i][k]) else assert.equal(v, u[i][k]) end
        end
        for k in pairs(u[i]) do assert.is_not_nil(recs[i][k]) end
      end
    end)

    it("names the right index of a big array in errors", function()
      local t = {}
      for i = 1, 100 do t[i] = i end
      t[77] = coroutine.create(print)
      assert.are.equal("cannot send a thread (coroutine) at value[77]", send_error(t))
    end)

    it("round-trips a large array and a large hash", function()
      local arr, hash = {}, {}
      for i = 1, 100000 do arr[i] = i * 3 - 50000; hash["k" .. i] = i / 7 end
      assert.are.same(arr, rt(arr))
      assert.are.same(hash, rt(hash))
    end)
  end)

  describe("packed arrays of numbers", function()
    local T_INTS, T_FLOATS, T_TABLE = 20, 21, 11
    local view = core._codec_view()
    after_each(function() core._codec_view(view) end)

    -- runs f with arrays read and filled in place (when this Lua allows it), then through the API
    local function both_ways(f)
      for _, on in ipairs { true, false } do
        core._codec_view(on)
        f(on)
      end
    end

    it("packs integers in the narrowest width that holds them all, widening as it goes", function()
      both_ways(function()
        for _, case in ipairs {
          { 1, function(i) return i - 50 end },           -- int8
          { 2, function(i) return i * 300 end },          -- int16
          { 2, function(i) return i == 100 and -30000 or i end },  -- int8 widened late
          { 4, function(i) return i * 100000 end },       -- int32
          { 4, function(i) return i < 50 and i or -i * 70000 end },
          { 8, function(i) return i == 2 and math.mininteger or i end },
          { 8, function(i) return i == 100 and math.maxinteger or i * 1000 end },
        } do
          local t = array(100, case[2])
          local s = encode(t)
          assert.equal(T_INTS, s:byte(2))
          assert.equal(case[1], s:byte(7))
          assert.equal(1 + 6 + 100 * case[1], #s)
          assert.is_true(same_numbers(t, decode(s)))
          assert.is_true(same_numbers(t, decode(s, "data")))
        end
      end)
    end)

    it("packs floats bit for bit: -0.0, infinities, NaN payloads", function()
      both_ways(function()
        local specials = { -0.0, math.huge, -math.huge, 0 / 0, float_of_bits(0x7ff0000000000123), 1.0, 2^-1074 }
        local t = array(60, function(i) return specials[i] or i / 7 end)
        local s = encode(t)
        assert.equal(T_FLOATS, s:byte(2))
        assert.equal(1 + 5 + 60 * 8, #s)
        assert.is_true(same_numbers(t, decode(s)))
      end)
    end)

    it("sends arrays of another shape as tables: mixed numbers, other values, other keys, a metatable, holes", function()
      both_ways(function()
        local mixed = array(40, function(i) return i == 30 and 0.5 or i end)
        local mixed2 = array(40, function(i) return i == 30 and 3 or i + 0.5 end)
        local str = array(40, function(i) return i == 40 and "40" or i end)
        local keyed = array(40, function(i) return i end); keyed.n = 40
        local withmt = setmetatable(array(40, function(i) return i end), { __index = {} })
        local holes = array(40, function(i) return i end); holes[20] = nil
        for _, t in ipairs { mixed, mixed2, str, keyed, holes } do
          local s = encode(t)
          assert.equal(T_TABLE, s:byte(2))
          local u = decode(s)
          for k, v in pairs(t) do assert.equal(math.type(v) or type(v), math.type(u[k]) or type(u[k])); assert.equal(v, u[k]) end
          for k in pairs(u) do assert.is_not_nil(t[k]) end
        end
        local u = decode(encode(withmt))
        assert.is_true(same_numbers(withmt, setmetatable(u, nil)))
      end)
    end)

    it("makes the same bytes in place and through the API, and keeps sharing", function()
      local ints = array(1000, function(i) return i * i end)
      local value = { ints, ints, array(300, function(i) return i / 3 end), { ints } }
      core._codec_view(true)
      local a = encode(value)
      core._codec_view(false)
      local b = encode(value)
      assert.equal(a, b)
      both_ways(function()
        local u = decode(a)
        assert.equal(u[1], u[2])
        assert.equal(u[1], u[4][1])
        assert.is_true(same_numbers(ints, u[1]))
        assert.equal(1 / 3, u[3][1])
      end)
    end)

    it("packs a million integers in four bytes each", function()
      local t = array(1000000, function(i) return i end)
      local s = encode(t)
      assert.equal(1 + 6 + 4000000, #s)
      assert.is_true(same_numbers(t, decode(s)))
    end)

    it("rejects truncated, lying and malformed packed arrays", function()
      both_ways(function()
        local function bad(s, why) assert.has_error(function() decode(s) end, "cannot decode: " .. why) end
        bad("\xB3\x14", "truncated data")
        bad("\xB3\x14\1\0\0\0", "truncated data")
        bad("\xB3\x14\2\0\0\0\1\5", "truncated data")
        bad("\xB3\x14\xff\xff\xff\xff\8" .. ("\0"):rep(64), "truncated data")   -- a huge count
        bad("\xB3\x15\xff\xff\xff\x7f" .. ("\0"):rep(64), "truncated data")
        bad("\xB3\x14\1\0\0\0\3\0\0\0", "bad packed array width")
        bad("\xB3\x14\1\0\0\0\0", "bad packed array width")
        bad("\xB3\x14\1\0\0\0\1\5\0", "trailing bytes")
        bad("\xB3\x15\1\0\0\0" .. ("\0"):rep(7), "truncated data")
        -- as a table's value, a table key and a reference
        local t = decode("\xB3\x0b\1\0\0\0\0\0\0\0\x94\2\0\0\0\2\1\0\2\0")
        assert.same({ { 1, 2 } }, t)
        assert.same({}, decode("\xB3\x14\0\0\0\0\1"))
        assert.same({ 0.5 }, decode("\xB3\x15\1\0\0\0\0\0\0\0\0\0\xe0\x3f"))
        local k = decode("\xB3\x0b\0\0\0\0\1\0\0\0\x94\1\0\0\0\1\7\x0d\2\0\0\0")
        local key, v = next(k)
        assert.same({ 7 }, key)
        assert.equal(key, v)
      end)
    end)

    it("carries a pool's chunks of numbers and their results packed (mp_encode_range, mp_decode_into)", function()
      both_ways(function()
        local pool <close> = mp.Pool(2)
        local half = function(x) return x / 2 end
        local ints = array(1000, function(i) return i * 3 end)
        local r = pool:map(half, ints, 100)
        assert.equal(1000, r.n)
        for i = 1, 1000 do assert.equal("float", math.type(r[i])); assert.equal(i * 1.5, r[i]) end
        local big = array(999, function(i) return i == 500 and math.maxinteger or i end)
        local same = pool:map(function(x) return x end, big, 111)
        for i = 1, 999 do assert.equal("integer", math.type(same[i])); assert.equal(big[i], same[i]) end
        local mixed = pool:map(function(x) return x % 2 == 0 and x or x + 0.5 end, array(300, function(i) return i end), 50)
        for i = 1, 300 do assert.equal(i % 2 == 0 and i or i + 0.5, mixed[i]) end
      end)
    end)

    it("still decodes the previous format version (0xB2), which had no packed arrays", function()
      assert.same({ 1, 2 }, decode("\xB2\x0b\2\0\0\0\0\0\0\0\3\1\3\2"))
    end)
  end)

  describe("functions", function()
    it("sends Lua functions with their upvalues", function()
      local a, b = 10, { 20 }
      local f = function(x) return a + b[1] + x end
      assert.are.equal(33, rt(f)(3))
    end)

    it("keeps an upvalue shared by two closures shared", function()
      local n = 0
      local function inc() n = n + 1; return n end
      local function get() return n end
      local r = rt { inc, get }
      r[1](); r[1]()
      assert.are.equal(2, r[2]())
      assert.are.equal(0, n)  -- the sender's upvalue is untouched
    end)

    it("keeps upvalues shared by closures sent in separate places of one value", function()
      local function make()
        local c = 0
        return function() c = c + 1 return c end, function() return c end
      end
      local i1, g1 = make()
      local i2, g2 = make()
      local r = rt { a = { i1, i2 }, b = { g1, g2 } }
      r.a[1](); r.a[1](); r.a[2]()
      assert.are.equal(2, r.b[1]())
      assert.are.equal(1, r.b[2]())
    end)

    it("sends recursive local functions", function()
      local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
      local r = rt(fib)
      assert.are.equal(55, r(10))
      local _, self = debug.getupvalue(r, 1)
      assert.are.equal(r, self)
    end)

    it("binds _ENV to the receiver's globals", function()
      local f = global_fn 'function() return tostring, string.format("%d", 42) end'
      local r = rt(f)
      local ts, s = r()
      assert.are.equal(tostring, ts)
      assert.are.equal("42", s)
      local name, env = debug.getupvalue(r, 1)
      assert.are.equal("_ENV", name)
      assert.are.equal(_G, env)
      assert.are.equal(_G, rt(_G))
    end)

    it("sends a function with a custom _ENV by value", function()
      local f
      do
        local _ENV = { x = 5 }
        f = function() return x end
      end
      assert.are.equal(5, rt(f)())
    end)

    it("sends C functions by name, resolving to the receiver's own", function()
      assert.are.equal(math.sqrt, rt(math.sqrt))
      assert.are.equal(string.format, rt(string.format))
      assert.are.equal(io.write, rt(io.write))
      assert.are.equal(print, rt(print))
      local r = rt { f = table.concat, g = mp.encode }
      assert.are.equal(table.concat, r.f)
      assert.are.equal(mp.encode, r.g)
      local up = rt(function(x) return floor(x) end)
      assert.are.equal(3, up(3.7))
    end)

    it("sends varargs functions and functions with many upvalues", function()
      local u1, u2, u3, u4, u5 = 1, 2, 3, 4, 5
      local f = function(...) return select("#", ...) + u1 + u2 + u3 + u4 + u5 end
      assert.are.equal(17, rt(f)(nil, nil))
    end)
  end)

  describe("modules and metatables", function()
    it("sends module tables by name", function()
      assert.are.equal(string, rt(string))
      assert.are.equal(math, rt(math))
      local r = rt { s = string, t = table, n = { m = math } }
      assert.are.equal(string, r.s)
      assert.are.equal(table, r.t)
      assert.are.equal(math, r.n.m)
    end)

    it("sends a user module in package.loaded by name", function()
      local mod = { answer = 42, ask = function() return 42 end }
      package.loaded["spec.codec.usermod"] = mod
      local ok, r = pcall(rt, { m = mod, again = mod })
      package.loaded["spec.codec.usermod"] = nil
      assert.is_true(ok, r)
      assert.are.equal(mod, r.m)
      assert.are.equal(mod, r.again)
      local copy = rt(mod)  -- no longer a module: by value
      assert.are_not.equal(mod, copy)
      assert.are.equal(42, copy.ask())
    end)

    it("sends a module by name even when its fields could not be sent by value", function()
      assert.are.equal(io, rt(io))  -- io.stdout is a foreign userdata
      local r = rt { 1, { x = io, y = os } }
      assert.are.equal(io, r[2].x)
      assert.are.equal(os, r[2].y)
    end)

    it("sends a module by name even when it holds a closed handle (a queue an earlier call closed)", function()
      local q = mp.Queue()
      q:close()
      local mod = { q = q, f = function() return 1 end }
      package.loaded["spec.codec.closedmod"] = mod
      local ok, r = pcall(rt, { m = mod })
      local okf, rf = pcall(rt, function() return mod.f() end)
      package.loaded["spec.codec.closedmod"] = nil
      assert.is_true(ok, r)
      assert.are.equal(mod, r.m)
      assert.is_true(okf, rf)
      assert.are.equal(1, rf())
      local okv, why = pcall(rt, mod)  -- no longer a module: by value
      assert.is_false(okv)
      assert.matches("cannot send a closed userdata", why, 1, true)
    end)

    it("sends a table of data stored in package.loaded by value", function()
      local config = { workers = 4 }
      package.loaded["spec.codec.config"] = config
      local ok, r = pcall(rt, config)
      package.loaded["spec.codec.config"] = nil
      assert.is_true(ok, r)
      assert.are.same(config, r)
      assert.are_not.equal(config, r)
    end)

    it("sends metatables by value", function()
      local mt = { __index = function(_, k) return k .. "!" end }
      local r = rt(setmetatable({}, mt))
      assert.are.equal("hi!", r.hi)
      assert.are_not.equal(mt, getmetatable(r))
      local a, b = setmetatable({}, mt), setmetatable({}, mt)
      local rr = rt { a, b }
      assert.are.equal(getmetatable(rr[1]), getmetatable(rr[2]))
    end)

    it("sends registered metatables by name, so identity holds", function()
      local P = {}
      P.__index = P
      function P.norm(p) return math.sqrt(p.x * p.x + p.y * p.y) end
      assert.are.equal(P, mp.register_metatable("spec.codec.P", P))
      assert.are.equal(P, mp.register_metatable("spec.codec.P", P))  -- again: fine
      local r = rt(setmetatable({ x = 3, y = 4 }, P))
      assert.are.equal(P, getmetatable(r))
      assert.are.equal(5, r:norm())
      assert.has_error(function() mp.register_metatable("", {}) end)
      assert.has_error(function() mp.register_metatable("x", 1) end)
    end)

    it("lets a name be registered again with a new table (a module loaded again)", function()
      local old, new = { v = "old" }, { v = "new" }
      mp.register_metatable("spec.codec.Re", old)
      assert.are.equal(new, mp.register_metatable("spec.codec.Re", new))
      assert.are.equal(new, getmetatable(rt(setmetatable({}, new))))
      local r = rt(setmetatable({}, old))  -- the old table lost its name: by value
      assert.are_not.equal(old, getmetatable(r))
      assert.are.equal("old", getmetatable(r).v)
      mp.register_metatable("spec.codec.Re2", new)  -- one name per table: the last one
      local s = encode(setmetatable({}, new))
      assert.is_truthy(s:find("spec.codec.Re2", 1, true))
    end)

    it("fails to decode a metatable name that is not registered here", function()
      local s = encode(setmetatable({}, Point)):gsub("spec%.Point", "spec.Poinx")
      assert.has_error(function() decode(s) end, "cannot decode: no metatable registered as 'spec.Poinx' here")
    end)
  end)

  describe("values that cannot be sent", function()
    it("names a coroutine and its path", function()
      local co = coroutine.create(print)
      assert.are.equal("cannot send a thread (coroutine) at args[2].jobs[3]",
        send_error({ 1, { jobs = { 1, 2, co } } }, "args"))
      assert.are.equal("cannot send a thread (coroutine) at value", send_error(co))
      assert.are.equal('cannot send a thread (coroutine) at value["a key"][1.5]', send_error({ ["a key"] = { [1.5] = co } }))
      assert.are.equal("cannot send a thread (coroutine) at value[<table key>]", send_error({ [{}] = co }))
      assert.are.equal("cannot send a thread (coroutine) at value.k[<thread key>]", send_error({ k = { [co] = 1 } }))
    end)

    it("names a coroutine in an upvalue or a metatable", function()
      local co = coroutine.create(print)
      local f = function() return co end
      assert.are.equal("cannot send a thread (coroutine) at value.f<upvalue co>", send_error({ f = f }))
      assert.are.equal("cannot send a thread (coroutine) at value<metatable>.x",
        send_error(setmetatable({}, { x = co })))
    end)

    it("refuses foreign userdata", function()
      assert.are.equal("cannot send a userdata (FILE*) at value.out", send_error({ out = io.stdout }))
    end)

    it("refuses light userdata", function()
      local lud = debug.upvalueid(function() return rt end, 1)
      assert.are.equal("userdata", type(lud))
      assert.are.equal("cannot send a light userdata at value[1]", send_error({ lud }))
    end)

    it("refuses C functions with no name", function()
      local cclosure = string.gmatch("a", "a")
      assert.are.equal("cannot send a C function with no name (not found in package.loaded) at value.it",
        send_error({ it = cclosure }))
    end)

    it("refuses nesting deeper than 200 levels, and accepts 200", function()
      local function nest(n) local t = {} for _ = 1, n do t = { t } end return t end
      assert.has_no_error(function() rt(nest(200)) end)
      local msg = send_error(nest(201))
      assert.matches("^cannot send a value nested deeper than 200 levels at value%[1%]%[1%]", msg)
      assert.matches("%.%.%.", msg)
    end)

    it("refuses a 100,000-deep nesting with an error, not a crash", function()
      local t = {}
      for _ = 1, 100000 do t = { t } end
      assert.matches("nested deeper than 200", send_error(t))
      local f = function() return 1 end
      for _ = 1, 100000 do local g = f; f = function() return g end end
      assert.matches("nested deeper than 200", send_error(f))
    end)

    it("keeps working when the core module is opened again", function()
      local saved = package.loaded["multiprocessing.core"]
      package.loaded["multiprocessing.core"] = nil
      local again = require "multiprocessing.core"
      package.loaded["multiprocessing.core"] = saved
      assert.are.same({ 1, "two" }, again.decode(encode { 1, "two" }))
      assert.are.same({ 3 }, decode(again.encode { 3 }))
    end)

    it("leaves the encoder usable after an error", function()
      for _ = 1, 3 do pcall(encode, { coroutine.create(print) }) end
      assert.are.same({ 1, { 2 } }, rt { 1, { 2 } })
    end)
  end)

  describe("bad input", function()
    it("rejects empty, short and foreign strings", function()
      assert.has_error(function() decode("") end, "cannot decode: truncated data")
      assert.has_error(function() decode("\xB2") end, "cannot decode: truncated data")
      assert.has_error(function() decode("hello") end, "cannot decode: not an encoded value (or another format version)")
      assert.has_error(function() decode("\xB1\0") end, "cannot decode: not an encoded value (or another format version)")
      assert.has_error(function() decode(nil) end)
    end)

    it("rejects trailing bytes", function()
      assert.has_error(function() decode(encode(1) .. "x") end, "cannot decode: trailing bytes")
      assert.has_error(function() decode(encode { 1 } .. "\0") end, "cannot decode: trailing bytes")
    end)

    it("rejects every truncation of a rich encoding", function()
      local s = encode(rich())
      for i = 0, #s - 1 do
        local ok, err = pcall(decode, s:sub(1, i))
        assert.is_false(ok, "prefix of length " .. i)
        assert.matches("cannot decode", err)
      end
      assert.is_table(decode(s))
    end)

    it("survives every single-byte corruption of a rich encoding", function()
      local s = encode(rich())
      local errors, values = 0, 0
      for i = 1, #s do
        for _, x in ipairs { 0x01, 0x80, 0xff } do
          local c = string.char(s:byte(i) ~ x)
          local ok = pcall(decode, s:sub(1, i - 1) .. c .. s:sub(i + 1))
          if ok then values = values + 1 else errors = errors + 1 end
        end
        for _, b in ipairs { 0x00, 0x0c, 0x0d, 0x8b } do  -- nil, a reference, a function, a shared table
          pcall(decode, s:sub(1, i - 1) .. string.char(b) .. s:sub(i + 1))
        end
      end
      assert.is_true(errors > 0 and values > 0)
    end)

    it("rejects lying counts without allocating for them", function()
      local huge = "\xB3\x0b\xff\xff\xff\x7f\xff\xff\xff\x7f"
      assert.has_error(function() decode(huge) end, "cannot decode: truncated data")
      local str = "\xB2\x09\xff\xff\xff\xff"
      assert.has_error(function() decode(str) end, "cannot decode: truncated data")
    end)

    it("rejects deep nesting in the input", function()
      local s = "\xB2" .. ("\x0b\x01\0\0\0\0\0\0\0"):rep(100000) .. "\0"
      assert.has_error(function() decode(s) end, "cannot decode: nesting too deep")
    end)

    it("rejects a damaged function", function()
      local s = encode(function() return 1 end)
      local at = #s - 10  -- inside the dump
      local bad = s:sub(1, at - 1) .. string.char(s:byte(at) ~ 1) .. s:sub(at + 1)
      assert.has_error(function() decode(bad) end, "cannot decode: bad function (checksum mismatch)")
    end)

    it("rejects references to nothing", function()
      assert.has_error(function() decode("\xB2\x0d\1\0\0\0") end, "cannot decode: bad reference")
      assert.has_error(function() decode("\xB2\x0b\1\0\0\0\0\0\0\0\x0d\1\0\0\0") end, "cannot decode: bad reference")
    end)
  end)

  describe("Ctrl-C", function()
    -- the encoder's probe of an array's length runs under lua_pcall (on a Lua whose tables it
    -- cannot read in place: _codec_view(false)); lua.c's hook raises Ctrl-C on that call, which
    -- must go on up, not be taken for the probe's answer while the encoding goes on
    it("during an encode goes on up as interrupted!, even from the encoder's own probes", function()
      local H = require "helpers"
      local text = H.interrupted([[
        local core = require "multiprocessing.core"
        core._codec_view(false)
        local t = {}
        for i = 1, 2000 do local r = {} for j = 1, 20 do r[j] = j end r.x = 1 t[i] = r end
        started()
        print("run:", pcall(function() while true do mp.encode(t) end end))
      ]])
      assert.matches("run:\tfalse\t[^\n]*interrupted!", text)
    end)
  end)

  describe("across processes", function()
    it("decodes in the parent what a forked child encoded", function()
      local path = os.tmpname()
      local pid = core.fork()
      if pid == 0 then
        local ok = pcall(function()
          local up = 7
          local v = { n = math.maxinteger, f = -0.0, s = ("z"):rep(70000), fn = function() return up end,
            c = math.sqrt, m = string, p = setmetatable({}, Point) }
          v.self = v
          local f = assert(io.open(path, "wb"))
          f:write(encode(v))
          f:close()
        end)
        core._exit(ok and 0 or 1)
      end
      assert.are.equal(0, core.waitpid(pid))
      local f = assert(io.open(path, "rb"))
      local s = f:read("a")
      f:close()
      os.remove(path)
      local v = decode(s)
      assert.are.equal(math.maxinteger, v.n)
      assert.are.equal(bits(-0.0), bits(v.f))
      assert.are.equal(("z"):rep(70000), v.s)
      assert.are.equal(7, v.fn())
      assert.are.equal(math.sqrt, v.c)
      assert.are.equal(string, v.m)
      assert.are.equal(Point, getmetatable(v.p))
      assert.are.equal(v, v.self)
    end)
  end)
end)

-- A decode that may crash runs in a forked child: a signal fails the spec, not the run.
local H = require "helpers"
local function in_child(fn) return core.waitpid(H.spawn(fn)) end

describe("Condition handles", function()
  -- c's encoding with its payload (the Condition's offset, its lock's offset) replaced
  local function forged(c, off, lock) return encode(c):sub(1, -17) .. string.pack("<i8<i8", off, lock) end
  local function offsets(c) return string.unpack("<i8<i8", encode(c), -16) end
  local function offset8(h) return (string.unpack("<i8", encode(h), -8)) end
  local function decode_error(bytes)
    return in_child(function()
      local ok, err = pcall(decode, bytes)
      assert(not ok, "decoded")
      assert(tostring(err):find("cannot decode", 1, true), tostring(err))
    end)
  end

  it("decode as they were sent", function()
    local c = mp.Condition()
    local d = decode(encode(c))
    assert.is_true(d:acquire())
    d:release()
  end)

  it("fail to decode offsets beyond the arena or unaligned", function()
    local c = mp.Condition()
    local off, lock = offsets(c)
    assert.equal(0, decode_error(forged(c, 1 << 40, lock)))
    assert.equal(0, decode_error(forged(c, off, 1 << 40)))
    assert.equal(0, decode_error(forged(c, off, lock + 8)))
    assert.equal(0, decode_error(forged(c, off + 8, lock)))
    assert.equal(0, decode_error(forged(c, off, -16)))
  end)

  it("fail to decode a lock offset that names another kind of object", function()
    local c, ev, v = mp.Condition(), mp.Event(), mp.Value("i", 1)
    local off, lock = offsets(c)
    assert.equal(0, decode_error(forged(c, off, offset8(ev))))   -- an Event as the lock
    assert.equal(0, decode_error(forged(c, off, off)))           -- the Condition as its lock
    assert.equal(0, decode_error(forged(c, off, (offsets(v)))))  -- a Value as its lock
    assert.equal(0, decode_error(forged(c, lock, lock)))         -- a Lock as the Condition
    assert.is_true(decode(forged(c, off, offset8(mp.Lock()))):acquire())  -- another Lock is fine
  end)
end)

describe("data-only decoding (mp.decode(s, 'data'))", function()
  local function refused(v, what)
    local ok, err = pcall(decode, encode(v), "data")
    assert.is_false(ok)
    assert.matches(what .. " refused in data%-only mode %(at byte %d+%)", err)
  end

  it("takes plain data: nil, booleans, numbers, strings, tables, cycles", function()
    local t = { 1, 2.5, "x", true, { a = { b = "c" } }, [false] = 0 / 0 }
    t.self = t
    local v = decode(encode(t), "data")
    assert.equal(2.5, v[2])
    assert.equal("c", v[5].a.b)
    assert.equal(v, v.self)
    assert.equal(7, decode(encode(7), "data"))
    assert.is_nil(decode(encode(nil), "data"))
  end)

  it("refuses Lua functions, C functions, modules and the globals", function()
    refused({ 1, { f = function() return 1 end } }, "a Lua function")
    refused({ string.rep }, "a C function")
    refused({ m = string }, "a module")
    refused(_G, "the global table")
  end)

  it("refuses metatables sent by value (a __gc would run sender code) but takes registered ones", function()
    refused(setmetatable({}, { __gc = function() end }), "a metatable sent by value")
    refused(setmetatable({}, {}), "a metatable sent by value")
    local v = decode(encode(setmetatable({ x = 1 }, Point)), "data")
    assert.equal(Point, getmetatable(v))
    -- a bare name (the encoder sends one only as a metatable) would hand out the receiver's table
    local bare = "\xB2\x12" .. string.char(#"spec.Point") .. "spec.Point"
    assert.equal(Point, decode(bare))
    local ok, err = pcall(decode, bare, "data")
    assert.is_false(ok)
    assert.matches("a registered metatable as a value refused in data%-only mode %(at byte 1%)", err)
  end)

  it("refuses handles of shared objects", function()
    refused({ q = mp.Queue() }, "a shared object's handle")
    refused(mp.Lock(), "a shared object's handle")
    refused(mp.Value("i", 1), "a shared object's handle")
  end)

  it("names the byte where it refused", function()
    local s = encode({ 1, 2, print })
    local at = tonumber(select(2, pcall(decode, s, "data")):match("at byte (%d+)"))
    assert.equal(s:byte(at + 1) & 0x7f, s:byte(at + 1))  -- a tag byte
    assert.equal(#s - 2 - #"print" - #"_G" - 1, at)       -- the C function's tag: then its two names
  end)

  it("rejects an unknown mode", function()
    assert.has_error(function() decode(encode(1), "everything") end)
  end)
end)

describe("function checksums", function()
  it("refuse edited bytecode before loading it", function()
    local s = encode(function() return 42 end)
    assert.equal(42, decode(s)())
    for i = 12, #s - 12, 7 do  -- any byte of the dump
      local bad = s:sub(1, i - 1) .. string.char((s:byte(i) + 1) % 256) .. s:sub(i + 1)
      local ok, err = pcall(decode, bad)
      assert.is_false(ok)
      assert.matches("cannot decode", err)
    end
  end)

  it("refuse functions encoded by another program (a key made at start, inherited by children)", function()
    local s = encode(function() return 42 end)
    -- a child of this program accepts the bytes
    assert.equal(0, in_child(function() assert(decode(s)() == 42) end))
    -- another run of the interpreter does not, and its bytes are refused here
    local tmp = os.tmpname()
    local f = assert(io.open(tmp, "wb")); f:write(s); f:close()
    local cmd = ([[LUA_PATH='./lua/?.lua;./lua/?/init.lua;;' LUA_CPATH='./%s/?.so;;' lua5.4 -e '
      local mp = require "multiprocessing"
      local f = io.open(%q, "rb"); local s = f:read("a"); f:close()
      local ok, err = pcall(mp.decode, s)
      io.write(ok and "decoded" or err, "\n")
      f = io.open(%q, "wb"); f:write(mp.encode(function() return 7 end)); f:close()']]):format(
      os.getenv("MP_BUILD") or "build", tmp, tmp)
    local p = assert(io.popen(cmd))
    local out = p:read("a")
    p:close()
    assert.matches("checksum mismatch", out)
    f = assert(io.open(tmp, "rb")); local theirs = f:read("a"); f:close()
    os.remove(tmp)
    local ok, err = pcall(decode, theirs)
    assert.is_false(ok)
    assert.matches("checksum mismatch", err)
  end)
end)

describe("globals sent with functions", function()
  local function clear()
    for k in pairs(_G) do
      if type(k) == "string" and k:match("^REPL_") then rawset(_G, k, nil) end
    end
  end
  before_each(clear)
  after_each(clear)
  local function env_of(f)
    for i = 1, 255 do
      local name, v = debug.getupvalue(f, i)
      if name == "_ENV" then return v end
      if not name then return nil end
    end
  end

  it("sends the non-library globals a function reads, as they are when encoded", function()
    _G.REPL_X = 5
    local f = global_fn "function(a) return a + REPL_X, math.pi, function() return REPL_Y end end"
    _G.REPL_Y = "inner"  -- read by a nested function only
    local s, carries = core.encode_function(f)
    assert.is_true(carries)
    _G.REPL_X, _G.REPL_Y = 6, nil
    local n, pi, inner = decode(s)(1)
    assert.are.equal(6, n)  -- the sender's value at encoding wins
    assert.are.equal(math.pi, pi)
    assert.are.equal("inner", inner())
  end)

  it("sends nothing with a function that reads library globals only, or none", function()
    local f = global_fn "function(x) return math.floor(x) + select('#', x), string.format('%d', 1), print, _G end"
    assert.is_false(select(2, core.encode_function(f)))
    assert.are.equal(_G, env_of(rt(f)))  -- the receiver's globals, exactly as before
    assert.is_false(select(2, core.encode_function(function(x) return x end)))
    _G.REPL_X = 1
    local ok = global_fn "function() return REPL_X end"
    assert.are_not.equal(_G, env_of(rt(ok)))
    assert.is_true(#encode(ok) < #encode(f) + 40)
  end)

  it("sends library values under other names by name, and library names given other values", function()
    _G.REPL_str, _G.REPL_sqrt = string, math.sqrt
    local real_type = type
    local f = global_fn "function() return REPL_str, REPL_sqrt, type end"
    _G.type = function() return "mine" end
    local ok, s = pcall(encode, f)
    _G.type = real_type
    assert.is_true(ok, s)
    local a, b, c = decode(s)()
    assert.are.equal(string, a)
    assert.are.equal(math.sqrt, b)
    assert.are.equal("mine", c())
  end)

  it("skips globals whose values cannot be sent", function()
    _G.REPL_CO, _G.REPL_X = coroutine.create(print), 3
    local s, carries = core.encode_function(global_fn "function() return REPL_CO, REPL_X end")
    assert.is_true(carries)
    _G.REPL_CO = nil
    assert.are.same({ nil, 3 }, { decode(s)() })
    _G.REPL_X = nil
    _G.REPL_CO = coroutine.create(print)
    assert.is_false(select(2, core.encode_function(global_fn "function() return REPL_CO end")))
  end)

  it("reads the receiver's globals for the rest, and writes there (reading its own writes)", function()
    _G.REPL_X = 1
    local f = decode(encode(global_fn "function(v) REPL_W = REPL_X + v; REPL_X = v; return REPL_X, REPL_Z end"))
    _G.REPL_Z, _G.REPL_X = "here", 100
    local x, z = f(7)
    assert.are.same({ 7, "here" }, { x, z })
    assert.are.equal(8, _G.REPL_W)
    assert.are.equal(7, _G.REPL_X)
  end)

  it("gives the functions of one message one environment, writers included", function()
    _G.REPL_X = 1
    local set, get = global_fn "function(v) REPL_X = v end", global_fn "function() return REPL_X end"
    local a, b, c = rt { set = set, get = get, 1 }, rt { get, set }, rt { { set }, get }
    for _, pair in ipairs { { a.set, a.get }, { b[2], b[1] }, { c[1][1], c[2] } } do
      local s, g = pair[1], pair[2]
      assert.are.equal(env_of(s), env_of(g))
      s(42)
      assert.are.equal(42, g())
    end
    -- a writer alone keeps the receiver's globals
    assert.are.equal(_G, env_of(rt(set)))
    assert.is_false(select(2, core.encode_function(set)))
  end)

  it("sends a recursive global function and a cycle of them", function()
    rawset(_G, "REPL_fib", global_fn "function(n) if n < 2 then return n end return REPL_fib(n - 1) + REPL_fib(n - 2) end")
    rawset(_G, "REPL_a", global_fn "function(n) if n == 0 then return 'a' end return REPL_b(n - 1) end")
    rawset(_G, "REPL_b", global_fn "function(n) if n == 0 then return 'b' end return REPL_a(n - 1) end")
    local fib, a = rt(_G.REPL_fib), rt(_G.REPL_a)
    clear()
    assert.are.equal(6765, fib(20))
    assert.are.same({ "b", "a" }, { a(5), a(4) })
  end)

  it("sends a received function on with the globals it came with", function()
    _G.REPL_X = "first"
    local f = rt(global_fn "function() return REPL_X end")
    _G.REPL_X = "second"
    local s, carries = core.encode_function(f)
    assert.is_true(carries)
    assert.are.equal("first", decode(s)())
  end)

  it("rejects malformed environments without crashing", function()
    _G.REPL_X = 1
    local s = encode(global_fn "function() return REPL_X end")
    local tail = "\2\0\0\0\0\1\0\0\0\6REPL_X\3\1"
    assert.are.equal(tail, s:sub(-#tail))
    local head = s:sub(1, -#tail - 1)
    assert.has_error(function() decode(head .. "\2\5\0\0\0\1\0\0\0\6REPL_X\3\1") end,
      "cannot decode: bad environment number")
    assert.has_error(function() decode(head .. "\2\0\0\0\0\xff\xff\xff\xff\6REPL_X\3\1") end,
      "cannot decode: truncated data")
    local g = encode(assert(load("local a = ... return function() return a + REPL_X end", "=spec", "t", _G))(5))
    local at = g:find("\2\0\3\5\2", 1, true)
    assert.is_truthy(at)
    assert.has_error(function() decode(g:sub(1, at) .. "\2\0\0\0\0\0\0\0\0" .. g:sub(at + 4)) end,
      "cannot decode: environment for an upvalue that is not _ENV")
    for i = 0, #s - 1 do
      local ok, err = pcall(decode, s:sub(1, i))
      assert.is_false(ok)
      assert.matches("cannot decode", err)
    end
    local m = encode { global_fn "function() return REPL_X end", global_fn "function(v) REPL_X = v end" }
    for i = #m - 40, #m do
      for _, x in ipairs { 0x01, 0x02, 0x80, 0xff } do
        pcall(decode, m:sub(1, i - 1) .. string.char(m:byte(i) ~ x) .. m:sub(i + 1))
      end
    end
  end)
end)
