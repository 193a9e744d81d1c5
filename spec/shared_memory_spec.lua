-- Specs of SharedMemory: named segments, byte access, typed views, truncation, the tracker.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

local function exists(name)
  local f = io.open("/dev/shm/" .. name)
  if f then f:close() end
  return f ~= nil
end

-- runs a lua5.4 script in an unrelated process (a shell's child, not a fork); its output
local function run(script)
  local path = H.tmpname()
  local f = assert(io.open(path, "w"))
  f:write('local mp = require "multiprocessing"\n', script)
  f:close()
  local p = io.popen(H.ENV .. " " .. H.LUA .. " " .. path .. " 2>&1")
  local out = p:read("a")
  p:close()
  return out
end

-- every segment a spec made, unlinked after it (a failing spec leaves nothing in /dev/shm)
local made = {}
local function remove_made()
  for _, name in ipairs(made) do os.remove("/dev/shm/" .. name) end
  made = {}
  collectgarbage()
end
local function new(opts)
  local s = assert(mp.SharedMemory(opts))
  made[#made + 1] = s.name
  return s
end

describe("SharedMemory", function()
  setup(function()
    -- this process's tracker (and its descriptor) exists from here on: not a leak of a test
    new { create = true, size = 1 }:unlink()
  end)
  H.leak_check(before_each, after_each)
  after_each(remove_made)

  describe("creating and attaching", function()
    it("creates a segment with a generated name, zeroed, that another handle attaches by name", function()
      local s = new { create = true, size = 100 }
      assert.matches("^lmp_%d+_%x+$", s.name)
      assert.equal(100, s.size)
      assert.is_true(exists(s.name))
      assert.equal(("\0"):rep(100), s:read())
      local b <close> = assert(mp.SharedMemory { name = s.name })
      assert.equal(100, b.size)
      s:write(1, "hello")
      assert.equal("hello", b:read(1, 5))
      assert.is_true(s:unlink())
      s:close()
    end)

    it("takes a name of its own, with or without the leading slash", function()
      local name = "lmp_spec_" .. core.getpid()
      local s = new { name = "/" .. name, create = true, size = 10 }
      assert.equal(name, s.name)
      local b = assert(mp.SharedMemory("/" .. name))
      assert.equal(10, b.size)
      b:close()
      s:unlink()
    end)

    it("returns nil, message, code for OS failures: a missing name, a name taken", function()
      local s, msg, code = mp.SharedMemory { name = "lmp_no_such_" .. core.getpid() }
      assert.is_nil(s)
      assert.equal("ENOENT", code)
      assert.matches("cannot attach: No such file", msg)
      local a = new { create = true, size = 8 }
      local b, msg2, code2 = mp.SharedMemory { name = a.name, create = true, size = 8 }
      assert.is_nil(b)
      assert.equal("EEXIST", code2)
      assert.matches(a.name, msg2, 1, true)
      a:unlink()
    end)

    it("attaches to a prefix with size, and refuses more than there is", function()
      local s = new { create = true, size = 4096 }
      local b = assert(mp.SharedMemory { name = s.name, size = 10 })
      assert.equal(10, b.size)
      local c, msg, code = mp.SharedMemory { name = s.name, size = 5000 }
      assert.is_nil(c)
      assert.equal("EINVAL", code)
      assert.matches("has 4096 bytes, fewer than size = 5000", msg, 1, true)
      s:unlink()
    end)

    it("raises on bad arguments", function()
      H.raises("table or string expected", mp.SharedMemory)
      H.raises("table or string expected", mp.SharedMemory, 42)
      H.raises("size is required", mp.SharedMemory, { create = true })
      H.raises("size must be a positive number", mp.SharedMemory, { create = true, size = 0 })
      H.raises("size must be a positive number", mp.SharedMemory, { create = true, size = -1 })
      H.raises("option 'size' must be an integer, got 1.5", mp.SharedMemory, { create = true, size = 1.5 })
      H.raises("option 'size' must be an integer, got string", mp.SharedMemory, { create = true, size = "1" })
      H.raises("name is required", mp.SharedMemory, {})
      H.raises("option 'name' must be a string", mp.SharedMemory, { name = 1 })
      H.raises("option 'create' must be a boolean", mp.SharedMemory, { name = "x", create = 1 })
      H.raises("option 'track' must be a boolean", mp.SharedMemory, { name = "x", track = "no" })
      H.raises("unknown option 'sise'", mp.SharedMemory, { name = "x", sise = 1 })
      H.raises("unknown option", mp.SharedMemory, { "x" })
      H.raises("mode must be", mp.SharedMemory, { create = true, size = 1, mode = -1 })
      for _, bad in ipairs { "", "/", "a/b", ".", "..", ("x"):rep(249), "a\0b" } do
        H.raises("bad name", mp.SharedMemory, { name = bad, create = true, size = 1 })
      end
    end)
  end)

  describe("bytes", function()
    it("reads and writes with 1-based offsets, bounds checked", function()
      local s = new { create = true, size = 16 }
      s:write(1, "abc")
      s:write(14, "xyz")
      assert.equal("abc", s:read(1, 3))
      assert.equal("xyz", s:read(14))
      assert.equal("", s:read(17))
      assert.equal("", s:read(5, 0))
      assert.equal(16, #s:read())
      H.raises("offset 0 out of range (1 to 17)", s.read, s, 0)
      H.raises("offset 18 out of range", s.read, s, 18)
      H.raises("4 bytes at offset 14 are out of range (size 16)", s.read, s, 14, 4)
      H.raises("bytes at offset 15 are out of range", s.write, s, 15, "abc")
      H.raises("out of range", s.read, s, 1, -1)
      H.raises("number expected", s.write, s, "x", "a")
      H.raises("string expected", s.write, s, 1, {})
      H.raises("number has no integer representation", s.read, s, 1.5)
      s:unlink()
    end)

    it("is shared with a forked child", function()
      local s = new { create = true, size = 8 }
      local pid = H.spawn(function() s:write(1, "child") end)
      assert.equal(0, core.waitpid(pid))
      assert.equal("child", s:read(1, 5))
      s:unlink()
    end)

    it("is shared with an unrelated process that attaches by name", function()
      local s = new { create = true, size = 64 }
      s:write(1, "from the creator")
      local out = run(([[
        local shm = assert(mp.SharedMemory { name = %q })
        io.write(shm:read(1, 16))
        shm:view("i", 33)[1] = 4242
        shm:close()
      ]]):format(s.name))
      assert.equal("from the creator", out)
      assert.equal(4242, s:view("i", 33)[1])
      s:unlink()
    end)
  end)

  describe("views", function()
    it("index elements from 1, with #, ipairs, totable, slice, fill, set", function()
      local s = new { create = true, size = 64 }
      local d = s:view("d")
      assert.equal(8, #d)
      for i = 1, #d do d[i] = i / 2 end
      local seen = {}
      for i, x in ipairs(d) do seen[i] = x end
      assert.same({ 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4 }, seen)
      assert.same(seen, d:totable())
      assert.same({ 3.5, 4 }, d:slice(-2))
      d:set(2, { 10, 20 })
      assert.same({ 0.5, 10, 20, 2 }, d:slice(1, 4))
      d:fill(0)
      assert.same({ 0, 0 }, d:slice(7, 8))
      assert.is_nil(d[9])
      s:unlink()
    end)

    it("take an offset and a count, aligned to their typecode", function()
      local s = new { create = true, size = 32 }
      local i = s:view("i", 5, 2)
      assert.equal(2, #i)
      i[1] = 0x01020304
      assert.equal("\4\3\2\1", s:read(5, 4))
      H.raises("not aligned for typecode 'i'", s.view, s, "i", 3)
      H.raises("3 elements of typecode 'd' at offset 17 do not fit (at most 2)", s.view, s, "d", 17, 3)
      H.raises("offset 0 out of range", s.view, s, "d", 0)
      H.raises("unknown typecode 'x'", s.view, s, "x")
      assert.equal(0, #s:view("d", 33))
      s:unlink()
    end)

    it("check their values and indexes as Array does", function()
      local s = new { create = true, size = 16 }
      local b = s:view("b")
      H.raises("value 200 out of range for typecode 'b'", function() b[1] = 200 end)
      H.raises("view index 17 out of range (size 16)", function() b[17] = 1 end)
      H.raises("view index 0 out of range", function() return b[0] end)
      H.raises("view index must be an integer", function() return b[1.5] end)
      H.raises("cannot set field 'x'", function() b.x = 1 end)
      H.raises("out of range (size 16)", b.set, b, 16, { 1, 2 })
      H.raises("number expected", b.set, b, 1, { 1, "x" })
      assert.equal(0, b[1])  -- nothing written by the failed set
      s:unlink()
    end)

    it("of typecode 'c' and 'u' read and write strings", function()
      local s = new { create = true, size = 16 }
      local c = s:view("c")
      c:set(1, "hi")
      assert.equal("h", c[1])
      assert.equal("hi", s:read(1, 2))
      local u = s:view("u", 9)
      u:set(1, "é€")
      assert.equal("€", u[2])
      s:unlink()
    end)

    it("raise once their segment is closed", function()
      local s = new { create = true, size = 8 }
      local v = s:view("B")
      s:close()
      H.raises("attempt to use a view of a closed SharedMemory", function() return v[1] end)
      H.raises("attempt to use a view of a closed SharedMemory", function() v[1] = 1 end)
      H.raises("attempt to use a view of a closed SharedMemory", function() return #v end)
      assert.matches("closed", tostring(v))
      s:unlink()
    end)
  end)

  describe("truncated by another process", function()
    it("raises instead of a SIGBUS, on every access", function()
      local s = new { create = true, size = 3 * 4096 }
      local v = s:view("d")
      assert(os.execute("truncate -s 4096 /dev/shm/" .. s.name))
      assert.equal(0, v[1])  -- the first page is still there
      local function bus(fn, ...) H.raises("truncated by another process", fn, ...) end
      bus(function() return v[1000] end)
      bus(function() v[1000] = 1 end)
      bus(v.totable, v)
      bus(v.fill, v, 1)
      bus(v.set, v, 1000, { 1, 2 })
      bus(s.read, s, 5000, 10)
      bus(s.write, s, 5000, "x")
      bus(s.read, s)
      s:unlink()
    end)

    it("leaves a SIGBUS that is not a fault of a guarded access to its default action", function()
      local pid = H.spawn(function()
        local s = mp.SharedMemory { create = true, size = 8192, track = false }
        s:unlink()
        core.kill(core.getpid(), 7)  -- SIGBUS sent by kill(): the process dies of it, as without us
        core.sleep(5)
      end)
      local code = core.waitpid(pid, 20)
      if (os.getenv("LD_PRELOAD") or ""):find("asan") then
        assert.is_true(code ~= 0)  -- the handler before ours is AddressSanitizer's: it reports and exits
      else
        assert.equal(-7, code)
      end
    end)
  end)

  describe("close and unlink", function()
    it("close is idempotent; a closed handle raises and prints as closed; unlink still works", function()
      local s = new { create = true, size = 8 }
      s:close()
      s:close()
      H.raises("attempt to use a closed SharedMemory", s.read, s)
      H.raises("attempt to use a closed SharedMemory", s.write, s, 1, "a")
      H.raises("attempt to use a closed SharedMemory", s.view, s, "B")
      H.raises("attempt to use a closed SharedMemory", function() return s.size end)
      assert.matches("closed", tostring(s))
      assert.is_true(s:unlink())
      local ok, msg, code = s:unlink()
      assert.is_nil(ok)
      assert.equal("ENOENT", code)
      assert.matches("cannot unlink", msg)
    end)

    it("closes with <close>, which does not unlink", function()
      local name
      do
        local s <close> = new { create = true, size = 8 }
        name = s.name
      end
      assert.is_true(exists(name))
      os.remove("/dev/shm/" .. name)
    end)

    it("refuses other fields and wrong selves", function()
      local s = new { create = true, size = 8 }
      H.raises("cannot set field 'size'", function() s.size = 1 end)
      H.raises("SharedMemory expected", s.read, io.stdout)
      H.raises("SharedMemory expected", s.close, {})
      H.raises("SharedMemory expected", s.unlink, mp.Value("i"))
      local v = s:view("B")
      H.raises("SharedMemoryView expected", v.totable, s)
      H.raises("SharedMemoryView expected", getmetatable(v).__len, s)
      H.raises("cannot send a userdata (multiprocessing.SharedMemory)", mp.encode, { s })  -- send its name
      s:unlink()
    end)
  end)

  describe("hostile arguments", function()
    it("every method with every kind of argument raises or works, never crashes", function()
      -- in a child, so that a crash fails this spec instead of ending the run
      local pid = H.spawn(function()
        local values = { nil, true, 0, 1, -1, 2, 7, 8, 9, 4096, 4097, math.maxinteger, math.mininteger,
          1.5, -0.0, 1 / 0, 0 / 0, 2 ^ 63, "", "x", "d", "c", "u", "12", ("y"):rep(5000), {}, { 1, 2 },
          { n = -1 }, io.stdout, print, coroutine.create(print) }
        local s = mp.SharedMemory { create = true, size = 4096 }
        s:unlink()
        local objs = { s, s:view("d"), s:view("c"), s:view("u", 1, 3), s:view("B", 4097) }
        local calls = 0
        for _, o in ipairs(objs) do
          local mt = getmetatable(o)
          local fns = {}
          for k, f in pairs(mt.__index == nil and {} or (type(mt.__index) == "table" and mt.__index or {})) do fns[k] = f end
          for _, k in ipairs { "read", "write", "view", "totable", "slice", "fill", "set", "close", "unlink" } do
            local ok, f = pcall(function() return o[k] end)
            if ok and type(f) == "function" then fns[k] = f end
          end
          for _, k in ipairs { "__len", "__tostring", "__index", "__newindex", "__gc", "__close" } do
            if mt[k] then fns[k] = mt[k] end
          end
          for k, f in pairs(fns) do
            if k ~= "close" and k ~= "unlink" and k ~= "__gc" and k ~= "__close" then
              for i = 1, #values + 1 do
                for j = 1, #values + 1, 3 do
                  calls = calls + 1
                  local ok, err = pcall(f, o, values[i], values[j])
                  if not ok then assert(type(err) == "string", k) end
                  pcall(f, values[i], values[j])          -- a wrong self
                end
              end
            end
          end
        end
        for _, o in ipairs(objs) do
          local mt = getmetatable(o)
          for _, k in ipairs { "__len", "__tostring", "__index", "__newindex", "__gc", "__close" } do
            if mt[k] then for i = 1, #values do pcall(mt[k], values[i], 1, 1) end end
          end
        end
        s:close()
        for _, o in ipairs(objs) do pcall(tostring, o) pcall(function() return o[1] end) end
        assert(calls > 1000)
      end)
      assert.equal(0, core.waitpid(pid, 120))
    end)
  end)

  describe("the tracker", function()
    it("unlinks a tracked segment when its creator is killed", function()
      local out = run([[
        local s = mp.SharedMemory { create = true, size = 4096 }
        io.write(s.name, "\n") io.stdout:flush()
        os.execute("kill -9 " .. require("multiprocessing.core").getpid())
      ]])
      local name = out:match("(lmp_[%w_]+)")
      assert.is_truthy(name, out)
      assert.is_true(H.eventually(function() return not exists(name) end, 20))
    end)

    it("unlinks every segment of a killed creator even when its random names repeat", function()
      -- (a random name that met one of the creator's own live names took that segment's
      -- entry in the tracker: the segment was left behind, about one kill in 100)
      local out = run([[
        local core = require "multiprocessing.core"
        core._shm_random(0x1234)
        local a = mp.SharedMemory { create = true, size = 4096 }
        local b = mp.SharedMemory { create = true, size = 4096 }
        local c = mp.SharedMemory { name = "lmp_spec_rep_" .. core.getpid(), create = true, size = 4096 }
        io.write(a.name, " ", b.name, " ", c.name, "\n") io.stdout:flush()
        os.execute("kill -9 " .. core.getpid())
      ]])
      local names = {}
      for name in out:gmatch("lmp_[%w_]+") do names[#names + 1] = name end
      assert.equal(3, #names, out)
      assert.not_equal(names[1], names[2])
      for _, name in ipairs(names) do
        assert.is_true(H.eventually(function() return not exists(name) end, 20), name)
      end
    end)

    it("unlinks it when its creator exits without unlinking, unless track = false", function()
      local out = run([[
        local a = mp.SharedMemory { create = true, size = 10 }
        local b = mp.SharedMemory { create = true, size = 10, track = false }
        io.write(a.name, " ", b.name)
      ]])
      local a, b = out:match("^(%S+) (%S+)$")
      assert.is_truthy(a, out)
      assert.is_true(H.eventually(function() return not exists(a) end, 20))
      assert.is_true(exists(b))
      os.remove("/dev/shm/" .. b)
    end)

    it("unlinks a segment made in a forked child when that child dies, not its parent", function()
      local r, w = mp.Pipe(false)
      local pid = H.spawn(function()
        local s = mp.SharedMemory { create = true, size = 10 }
        w:send(s.name)
        core.sleep(60)
      end)
      local name = r:recv(20)
      assert.is_true(exists(name))
      core.kill(pid, 9)
      core.waitpid(pid)
      assert.is_true(H.eventually(function() return not exists(name) end, 20))
      r:close() w:close()
    end)

    it("leaves alone a name that was unlinked and made again by another process", function()
      local name = "lmp_spec_again_" .. core.getpid()
      local out = run(([[
        local s = mp.SharedMemory { name = %q, create = true, size = 10 }
        os.execute("rm /dev/shm/%s")   -- unlinked behind its back...
        local again = mp.SharedMemory { name = %q, create = true, size = 20, track = false }
        io.write("made")                 -- ...and made again: the creator's tracker must spare it
      ]]):format(name, name, name))
      assert.equal("made", out)
      core.sleep(0.3)
      local s = assert(mp.SharedMemory { name = name })
      assert.equal(20, s.size)
      s:close()
      assert.is_true(s:unlink())
    end)

    it("forgets a segment its creator unlinked", function()
      local s = new { create = true, size = 10 }
      s:unlink()
      -- made again by this process without tracking: the tracker must not take it at exit
      local name = s.name
      local t = new { name = name, create = true, size = 10, track = false }
      assert.equal(name, t.name)
      t:unlink()
    end)
  end)
end)

describe("ShareableList", function()
  H.leak_check(before_each, after_each)
  after_each(remove_made)

  local function newlist(values, opts)
    local sl = assert(mp.ShareableList(values, opts))
    made[#made + 1] = sl.name
    return sl
  end

  it("holds numbers, strings, booleans and nil, read and written by index from 1", function()
    local sl = newlist { n = 6, 1, 2.5, "hello", true, nil, "\xff" }
    assert.equal(6, #sl)
    assert.equal(1, sl[1])
    assert.is_true(math.type(sl[1]) == "integer")
    assert.equal(2.5, sl[2])
    assert.equal("hello", sl[3])
    assert.is_true(sl[4])
    assert.is_nil(sl[5])
    assert.equal("\xff", sl[-1])
    assert.equal("qd8sxxxxxxx?xxxxxx?x8s", sl.format)
    sl[1] = "eight ch"   -- a number's 8 bytes hold a string of up to 8
    sl[5] = false
    sl[3] = "hi"
    assert.same({ n = 6, "eight ch", 2.5, "hi", true, false, "\xff" }, sl:totable())
    assert.equal(3, sl:index("hi"))
    assert.is_nil(sl:index("nope"))
    assert.equal(1, sl:count(2.5))
    assert.matches("^multiprocessing%.ShareableList%('lmp_%d+_%x+', 6 items%)$", tostring(sl))
    sl:unlink()
  end)

  it("is attached by name, here and in an unrelated process", function()
    local sl = newlist({ 10, "x" }, { name = "lmp_spec_sl_" .. core.getpid() })
    local other = assert(mp.ShareableList(sl.name))
    other[1] = 11
    assert.equal(11, sl[1])
    local out = run(([[
      local sl = assert(mp.ShareableList(%q))
      sl[2] = "far away"
      io.write(#sl, " ", sl[1])
    ]]):format(sl.name))
    assert.equal("2 11", out)
    assert.equal("far away", sl[2])
    other:close()
    sl:unlink()
  end)

  it("checks indexes, capacities and values", function()
    local sl = newlist { 1, "ab" }
    H.raises("ShareableList: a string of 9 bytes does not fit the 8 bytes of item 2", function() sl[2] = "abcdefghi" end)
    H.raises("ShareableList: index 3 out of range (size 2)", function() sl[3] = 1 end)
    H.raises("ShareableList: index 0 out of range", function() return sl[0] end)
    H.raises("ShareableList: index must be an integer, got 1.5", function() return sl[1.5] end)
    H.raises("cannot set field 'x'", function() sl.x = 1 end)
    H.raises("cannot store a table at item 1", mp.ShareableList, { {} })
    H.raises("cannot store a table at item 1", function() sl[1] = {} end)
    H.raises("table or string expected, got number", mp.ShareableList, 1)
    H.raises("string or table expected, got number", mp.ShareableList, {}, 1)
    H.raises("ShareableList expected", sl.totable, {})
    assert.equal(1, sl[1])
    sl:unlink()
  end)

  it("refuses to attach to a segment that holds no list", function()
    local s = new { create = true, size = 64 }
    s:write(1, string.pack("=i8", 1000))
    H.raises("does not hold a ShareableList", mp.ShareableList, s.name)
    s:unlink()
    local none, msg, code = mp.ShareableList("lmp_no_such_list_" .. core.getpid())
    assert.is_nil(none)
    assert.equal("ENOENT", code)
  end)

  it("closes with <close>; an empty list works", function()
    local name
    do
      local sl <close> = newlist {}
      name = sl.name
      assert.equal(0, #sl)
      assert.same({ n = 0 }, sl:totable())
    end
    local again = assert(mp.ShareableList(name))
    assert.equal(0, #again)
    again:close()
    assert.is_true(again:unlink())
  end)

  local has_python = os.execute("python3 -c 'import multiprocessing.shared_memory' >/dev/null 2>&1")
  it("has Python's layout: python3 reads and writes a list made here" .. (has_python and "" or " (no python3: not run)"), function()
    if not has_python then return end
    local sl = newlist { n = 5, 7, 1.5, "héllo", false, nil }
    local p = io.popen(("python3 -c %s 2>/dev/null"):format(H.quote(([[
from multiprocessing import shared_memory as m
sl = m.ShareableList(name=%q)
print(list(sl), sl.format)
sl[0] = 8; sl[2] = 'bye'; sl[4] = True
sl.shm.close()
]]):format(sl.name))))
    local out = p:read("a")
    p:close()
    assert.equal("[7, 1.5, 'héllo', False, None] qd8sxxxxxxx?xxxxxx?x\n", out)
    assert.same({ n = 5, 8, 1.5, "bye", false, true }, sl:totable())
    sl:close()  -- Python before 3.13 unlinks what it attached to when it exits: the name may be gone
    sl.shm:unlink()
  end)
end)

