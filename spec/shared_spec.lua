-- Specs of Value and Array.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local H = require "helpers"
local spawn = H.spawn

local ranges = {  -- typecode, smallest, largest
  { "b", -128, 127 }, { "B", 0, 255 }, { "h", -32768, 32767 }, { "H", 0, 65535 },
  { "i", -2147483648, 2147483647 }, { "I", 0, 4294967295 },
  { "l", math.mininteger, math.maxinteger }, { "q", math.mininteger, math.maxinteger },
  { "L", 0, math.maxinteger }, { "Q", 0, math.maxinteger },
}

describe("shared", function()
  after_each(function()
    assert.same({}, H.children())
  end)

  describe("Value", function()
    it("holds its initial value, 0 by default", function()
      assert.equal(0, mp.Value("i").value)
      assert.equal(42, mp.Value("i", 42).value)
      assert.equal(2.5, mp.Value("d", 2.5).value)
    end)

    it("is read and written through .value", function()
      local v = mp.Value("q", 1)
      v.value = v.value + 41
      assert.equal(42, v.value)
      assert.is_true(math.type(v.value) == "integer")
    end)

    for _, r in ipairs(ranges) do
      it("accepts the whole range of typecode '" .. r[1] .. "' and no more", function()
        local v = mp.Value(r[1])
        v.value = r[2]; assert.equal(r[2], v.value)
        v.value = r[3]; assert.equal(r[3], v.value)
        if r[2] > math.mininteger then
          assert.has_error(function() v.value = r[2] - 1 end,
            ("value %d out of range for typecode '%s'"):format(r[2] - 1, r[1]))
        end
        if r[3] < math.maxinteger then
          assert.has_error(function() v.value = r[3] + 1 end,
            ("value %d out of range for typecode '%s'"):format(r[3] + 1, r[1]))
        end
      end)
    end

    it("says which value is out of range", function()
      assert.has_error(function() mp.Value("b", 300) end, "value 300 out of range for typecode 'b'")
    end)

    it("rejects non-integral numbers for integer typecodes and takes integral floats", function()
      local v = mp.Value("i")
      assert.has_error(function() v.value = 1.5 end, "value 1.5 is not an integer (typecode 'i')")
      v.value = 3.0
      assert.equal(3, v.value)
      assert.is_true(math.type(v.value) == "integer")
    end)

    it("rejects non-numbers", function()
      local v = mp.Value("d")
      assert.has_error(function() v.value = "1" end, "number expected for typecode 'd', got string")
      assert.has_error(function() v.value = nil end, "number expected for typecode 'd', got nil")
    end)

    it("stores floats with float precision for 'f'", function()
      local v = mp.Value("f", 0.1)
      assert.is_true(v.value ~= 0.1 and math.abs(v.value - 0.1) < 1e-7)
      v.value = 3
      assert.equal(3.0, v.value)
    end)

    it("lists the valid typecodes for an unknown one", function()
      assert.has_error(function() mp.Value("x", 1) end, "unknown typecode 'x' (valid: b B h H i I l L q Q f d c u)")
      assert.has_error(function() mp.Value("ii", 1) end)
    end)

    it("refuses other fields", function()
      local v = mp.Value("i")
      assert.has_error(function() v.other = 1 end)
      assert.is_nil(v.other)
    end)

    it("is shared with a forked child", function()
      local v = mp.Value("d", 1)
      local pid = spawn(function() v.value = v.value * 10 end)
      assert.equal(0, core.waitpid(pid))
      assert.equal(10, v.value)
    end)

    it("counts exactly under its lock in two processes", function()
      local v = mp.Value("i", 0)
      local n = 100000
      local function add()
        local lock = v:get_lock()
        for _ = 1, n do
          lock:acquire()
          v.value = v.value + 1
          lock:release()
        end
      end
      local pid = spawn(add)
      add()
      assert.equal(0, core.waitpid(pid))
      assert.equal(200000, v.value)
    end)

    it("prints its typecode and value", function()
      assert.matches("^multiprocessing%.Value%('i', 7%) 0x%x+$", tostring(mp.Value("i", 7)))
    end)

    it("raises when used after close, and close is idempotent", function()
      local v = mp.Value("i")
      v:close()
      v:close()
      assert.has_error(function() return v.value end, "attempt to use a closed Value")
      assert.has_error(function() v.value = 1 end, "attempt to use a closed Value")
      assert.has_error(function() v:get_lock() end, "attempt to use a closed Value")
      assert.matches("%(closed%)", tostring(v))
    end)
  end)

  describe("get_lock", function()
    it("gives a new RLock by default, the same handle each time", function()
      local v = mp.Value("i")
      local l = v:get_lock()
      assert.matches("^multiprocessing%.RLock", tostring(l))
      assert.equal(l, v:get_lock())
    end)

    it("raises for lock = false", function()
      local v = mp.Value("i", 0, { lock = false })
      assert.has_error(function() v:get_lock() end, "this Value has no lock (it was made with lock = false)")
      local a = mp.Array("i", 2, { lock = false })
      assert.has_error(function() a:get_lock() end, "this Array has no lock (it was made with lock = false)")
    end)

    it("gives the lock it was made with", function()
      local l = mp.Lock()
      local v = mp.Value("i", 0, { lock = l })
      local got = v:get_lock()
      assert.matches("^multiprocessing%.Lock", tostring(got))
      l:acquire()
      assert.is_true(got:locked())
      l:release()
    end)

    it("gives the very lock it was made with (== holds), for Value and Array, Lock and RLock", function()
      local l, r = mp.Lock(), mp.RLock()
      assert.equal(l, mp.Value("i", 5, { lock = l }):get_lock())
      assert.equal(r, mp.Value("d", 5, { lock = r }):get_lock())
      assert.equal(l, mp.Array("i", 2, { lock = l }):get_lock())
      assert.equal(r, mp.Array("i", { 1, 2 }, { lock = r }):get_lock())
    end)

    it("rejects a lock option that is not a lock", function()
      assert.has_error(function() mp.Value("i", 0, { lock = 1 }) end)
      assert.has_error(function() mp.Array("i", 1, { lock = {} }) end)
    end)

    it("works with <close> and hold", function()
      local v = mp.Value("d", 0)
      do
        local g <close> = v:get_lock():hold()
        v.value = 1
        assert.is_true(v:get_lock():is_owned())
      end
      assert.is_false(v:get_lock():is_owned())
    end)
  end)

  describe("Array", function()
    it("is made from a size, zeroed", function()
      local a = mp.Array("d", 3)
      assert.equal(3, #a)
      assert.same({ 0, 0, 0 }, a:totable())
    end)

    it("is made from a table", function()
      local a = mp.Array("i", { 5, 10, 15 })
      assert.equal(3, #a)
      assert.equal(5, a[1])
      assert.equal(15, a[3])
    end)

    it("checks the values of its table", function()
      assert.has_error(function() mp.Array("B", { 1, 256 }) end, "value 256 out of range for typecode 'B'")
      assert.has_error(function() mp.Array("i", { 1, "x" }) end)
      assert.has_error(function() mp.Array("i", -1) end)
    end)

    it("is read and written by index", function()
      local a = mp.Array("h", 4)
      for i = 1, #a do a[i] = i * 100 end
      assert.same({ 100, 200, 300, 400 }, a:totable())
      a[2.0] = 7
      assert.equal(7, a[2])
    end)

    it("walks with ipairs", function()
      local a, seen = mp.Array("i", { 3, 4, 5 }), {}
      for i, x in ipairs(a) do seen[i] = x end
      assert.same({ 3, 4, 5 }, seen)
    end)

    it("reads nil just past its end", function()
      assert.is_nil(mp.Array("i", 2)[3])
    end)

    it("raises on other indexes out of range, naming index and size", function()
      local a = mp.Array("i", 2)
      assert.has_error(function() return a[0] end, "Array index 0 out of range (size 2)")
      assert.has_error(function() return a[-1] end, "Array index -1 out of range (size 2)")
      assert.has_error(function() return a[4] end, "Array index 4 out of range (size 2)")
      assert.has_error(function() a[3] = 1 end, "Array index 3 out of range (size 2)")
      assert.has_error(function() a[0] = 1 end, "Array index 0 out of range (size 2)")
    end)

    it("raises on non-integer indexes", function()
      local a = mp.Array("i", 2)
      assert.has_error(function() return a[1.5] end, "Array index must be an integer, got 1.5")
      assert.has_error(function() a[1.5] = 1 end, "Array index must be an integer, got 1.5")
      assert.has_error(function() a.x = 1 end)
    end)

    it("fills", function()
      local a = mp.Array("d", 3)
      a:fill(2.5)
      assert.same({ 2.5, 2.5, 2.5 }, a:totable())
      assert.has_error(function() a:fill("x") end)
    end)

    it("slices like string.sub", function()
      local a = mp.Array("i", { 1, 2, 3, 4, 5 })
      assert.same({ 2, 3, 4 }, a:slice(2, 4))
      assert.same({ 4, 5 }, a:slice(-2))
      assert.same({ 1, 2, 3, 4, 5 }, a:slice())
      assert.same({}, a:slice(4, 2))
      assert.same({ 5 }, a:slice(5, 99))
    end)

    it("may be empty", function()
      local a = mp.Array("i", {})
      assert.equal(0, #a)
      assert.same({}, a:totable())
    end)

    it("is shared with forked children", function()
      local a = mp.Array("d", { 5, 10, 15 })
      local pids = {}
      for i = 1, #a do pids[i] = spawn(function() a[i] = a[i] * 2 end) end
      for _, pid in ipairs(pids) do assert.equal(0, core.waitpid(pid)) end
      assert.same({ 10, 20, 30 }, a:totable())
    end)

    it("prints its typecode and size", function()
      assert.matches("^multiprocessing%.Array%('d', 3%) 0x%x+$", tostring(mp.Array("d", 3)))
    end)

    it("raises when used after close", function()
      local a = mp.Array("i", 2)
      a:close()
      assert.has_error(function() return a[1] end, "attempt to use a closed Array")
      assert.has_error(function() a[1] = 1 end, "attempt to use a closed Array")
      assert.has_error(function() return #a end, "attempt to use a closed Array")
      assert.has_error(function() a:totable() end, "attempt to use a closed Array")
    end)
  end)

  describe("handles", function()
    it("travel through encode/decode and share memory in this process", function()
      local a = mp.Array("i", { 1, 2 })
      local b = mp.decode(mp.encode(a))
      b[1] = 9
      assert.equal(9, a[1])
      assert.equal(2, #b)
    end)

    it("travel with their lock to a forked child", function()
      local v = mp.Value("i", 0)
      local bytes = mp.encode(v)
      local n = 20000
      local function add(x)
        local lock = x:get_lock()
        for _ = 1, n do
          lock:acquire(); x.value = x.value + 1; lock:release()
        end
      end
      local pid = spawn(function() add(mp.decode(bytes)) end)
      add(v)
      assert.equal(0, core.waitpid(pid))
      assert.equal(2 * n, v.value)
    end)

    it("keep lock = false through encode/decode", function()
      local v = mp.decode(mp.encode(mp.Value("i", 3, { lock = false })))
      assert.equal(3, v.value)
      assert.has_error(function() v:get_lock() end)
    end)

    -- Bytes that name no Value or Array must fail to decode with an error, never a
    -- signal: each case decodes in a child, so a crash fails the spec, not the run.
    local function decode_error(bytes)
      local pid = spawn(function()
        local ok, err = pcall(mp.decode, bytes)
        assert(not ok, "decoded")
        assert(tostring(err):find("cannot decode", 1, true), tostring(err))
      end)
      return core.waitpid(pid)
    end
    -- v's encoding with its payload (the object's offset, the lock's offset) replaced
    local function forged(v, off, lock) return mp.encode(v):sub(1, -17) .. string.pack("<i8<i8", off, lock) end
    local function offsets(v) return string.unpack("<i8<i8", mp.encode(v), -16) end
    local function offset8(h) return (string.unpack("<i8", mp.encode(h), -8)) end

    it("fail to decode an offset beyond the arena (fuzz crasher: was a Bus error)", function()
      local s = mp.encode(mp.Value("i", 1))
      assert.equal(0, decode_error(s:sub(1, -17) .. string.pack("<i8", 1 << 40) .. string.rep("\0", 8)))
      local v = mp.Value("i", 1)
      local off, lock = offsets(v)
      assert.equal(0, decode_error(forged(v, off, 1 << 40)))
      assert.equal(0, decode_error(forged(v, 1 << 40, lock)))
      assert.equal(0, decode_error(forged(v, off + 8, lock)))
    end)

    it("fail to decode an offset that names another kind of object", function()
      local v, a, ev, l = mp.Value("i", 1), mp.Array("i", 3), mp.Event(), mp.Lock()
      local off, lock = offsets(v)
      assert.equal(0, decode_error(forged(v, offset8(l), lock)))    -- a Lock as the Value
      assert.equal(0, decode_error(forged(v, off, offset8(ev))))    -- an Event as its lock
      assert.equal(0, decode_error(forged(v, off, off)))            -- the Value as its lock
      assert.equal(0, decode_error(forged(v, (offsets(a)), lock)))  -- an Array sent as a Value
      assert.equal(0, decode_error(forged(a, off, lock)))           -- a Value sent as an Array
      assert.is_true(mp.decode(forged(v, off, offset8(l))):get_lock() ~= nil)  -- a Lock is fine
    end)

    it("fail to decode an object whose elements would reach past the arena's top", function()
      -- an Array whose elements look like the header of an Array of 2^40 doubles
      local fake = mp.Array("I", { 1, 0, 1, 0x44524853, string.byte("d"), 0, 0, 256 }, { lock = false })
      local off = offsets(fake)
      assert.equal(0, decode_error(forged(fake, off + 32, 0)))
    end)

    it("cannot be sent once closed", function()
      local v = mp.Value("i")
      v:close()
      assert.has_error(function() mp.encode(v) end, "cannot send a closed Value")
    end)
  end)
  describe("typecodes 'c' and 'u', set and get_obj", function()
    it("'c' holds bytes: a Value of one byte, an Array with .value up to the first zero and .raw", function()
      local v = mp.Value("c")
      assert.equal("\0", v.value)
      v.value = "A"
      assert.equal("A", v.value)
      assert.matches("^multiprocessing%.Value%('c', 'A'%)", tostring(v))
      H.raises("a string of 1 byte expected for typecode 'c', got a string of 2 bytes", function() v.value = "AB" end)
      H.raises("a string of 1 byte expected for typecode 'c', got number", function() v.value = 65 end)
      local a = mp.Array("c", 8)
      a.value = "abc"
      assert.equal("abc", a.value)
      assert.equal("abc\0\0\0\0\0", a.raw)
      assert.equal("b", a[2])
      a[4] = "d"
      assert.equal("abcd", a.value)
      a.raw = "12345678"
      assert.equal("12345678", a.value)
      H.raises("string of 9 bytes too long for Array('c', 8)", function() a.value = "123456789" end)
      H.raises("raw bytes of 3 bytes do not fill it for Array('c', 8)", function() a.raw = "abc" end)
      H.raises("string expected for Array('c').value, got number", function() a.value = 1 end)
    end)

    it("'c' Arrays are made from a string and take slice assignment with set", function()
      local a = mp.Array("c", "hello world")
      assert.equal(11, #a)
      a:set(7, "WORLD")
      assert.equal("hello WORLD", a.value)
      H.raises("Array:set(8, ...) of 5 elements out of range (size 11)", a.set, a, 8, "WORLD")
      a:set(12, "")  -- an empty slice just past the end
      assert.same({ "h", "e" }, a:slice(1, 2))
    end)

    it("'u' holds code points, read and written as UTF-8", function()
      local a = mp.Array("u", "héllo €")
      assert.equal(7, #a)
      assert.equal("é", a[2])
      assert.equal("€", a[7])
      assert.equal("héllo €", a.value)
      a.value = "añ"
      assert.equal("añ", a.value)
      assert.is_nil(a.raw)  -- as Python's c_wchar arrays: no raw
      H.raises("a string of one UTF-8 character expected for typecode 'u'", function() a[1] = "ab" end)
      H.raises("a string of one UTF-8 character expected for typecode 'u'", function() a[1] = "\xff" end)
      H.raises("a string of one UTF-8 character expected for typecode 'u'", function() a[1] = "\xed\xa0\x80" end)
      H.raises("invalid UTF-8 at byte 2", function() mp.Array("u", "a\xc3") end)
      local v = mp.Value("u", "ж")
      assert.equal("ж", v.value)
    end)

    it("travel to a forked child", function()
      local a = mp.Array("c", 4)
      local pid = H.spawn(function() a.value = "kid" end)
      assert.equal(0, core.waitpid(pid))
      assert.equal("kid", a.value)
      local b = mp.decode(mp.encode(mp.Array("u", "ü")))
      assert.equal("ü", b.value)
    end)

    it("set assigns a slice of any Array, checking every value before writing any", function()
      local a = mp.Array("i", 5)
      a:set(2, { 7, 8, 9 })
      assert.same({ 0, 7, 8, 9, 0 }, a:totable())
      H.raises("value 1.5 is not an integer", a.set, a, 1, { 1, 1.5 })
      assert.equal(0, a[1])
      H.raises("out of range (size 5)", a.set, a, 0, { 1 })
      H.raises("out of range (size 5)", a.set, a, 5, { 1, 2 })
      H.raises("table expected, got string", a.set, a, 1, "12")
      H.raises("number expected", a.set, a, "x", { 1 })
    end)

    it("get_obj gives the same memory without the lock", function()
      local v = mp.Value("i", 3)
      local o = v:get_obj()
      o.value = 9
      assert.equal(9, v.value)
      H.raises("has no lock", o.get_lock, o)
      assert.is_truthy(v:get_lock())
      local a = mp.Array("d", { 1, 2 })
      local ao = a:get_obj()
      ao[2] = 5
      assert.equal(5, a[2])
      o:close() ao:close()
      assert.equal(9, v.value)
      H.raises("Value or Array expected", v.get_obj, io.stdout)
    end)
  end)
end)
