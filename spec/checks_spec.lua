-- Self checks: every method of every class, close, __gc, __close, __tostring and the
-- other metamethods included, raises when called with a self of the wrong kind
-- (io.stdout, another class's object, a table, nil...) and never touches it
-- (src/mp.h, "self checks"). Each method is tried in a forked child, so that a
-- crash fails the spec instead of ending the run.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- one object of each class, made fresh in the child
local classes = {
  { "Queue", function() return mp.Queue() end },
  { "SimpleQueue", function() return mp.SimpleQueue() end },
  { "JoinableQueue", function() return mp.JoinableQueue() end },
  { "Lock", function() return mp.Lock() end },
  { "RLock", function() return mp.RLock() end },
  { "Semaphore", function() return mp.Semaphore(1) end },
  { "BoundedSemaphore", function() return mp.BoundedSemaphore(1) end },
  { "Event", function() return mp.Event() end },
  { "Condition", function() return mp.Condition() end },
  { "Barrier", function() return mp.Barrier(2) end },
  { "Value", function() return mp.Value("i", 1) end },
  { "Array", function() return mp.Array("i", 3) end },
  { "Connection", function() return (mp.Pipe()) end },
  { "PoolState", function() return core.PoolState(1) end },
}

-- the C methods of an object: its __index table, or (for classes whose __index is a
-- function) the names it answers
local metamethods = { "__gc", "__close", "__tostring", "__eq", "__len", "__index", "__newindex" }
local extra = {
  Value = { "get_lock", "close" }, Array = { "get_lock", "totable", "fill", "slice", "close" },
  Barrier = { "wait", "abort", "reset", "close" },
  Connection = { "send", "recv", "recv_value", "send_bytes", "recv_bytes", "poll", "close", "fileno" },
}
local function methods(name, obj)
  local mt = getmetatable(obj)
  local list = {}
  if type(mt.__index) == "table" then
    for k, v in pairs(mt.__index) do
      if type(v) == "function" then list[#list + 1] = { k, v } end
    end
  end
  for _, k in ipairs(extra[name] or {}) do list[#list + 1] = { k, obj[k] } end
  for _, k in ipairs(metamethods) do
    if type(mt[k]) == "function" then list[#list + 1] = { k, mt[k] } end
  end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  return list
end

-- the wrong selves for class i: not userdata, a foreign userdata, and every other class's object
local function wrong_selves(i)
  local list = { { "io.stdout", io.stdout }, { "a table", {} }, { "nil", nil }, { "a number", 42 },
                 { "a string", "x" } }
  for j, c in ipairs(classes) do
    if j ~= i then list[#list + 1] = { c[1], c[2]() } end
  end
  return list
end

-- true when f is also w's own method k: siblings (Queue and SimpleQueue, Lock and
-- RLock, Value and Array...) share C functions, which then serve both classes
local function own_method(w, k, f)
  if type(w) ~= "userdata" then return false end
  local mt = getmetatable(w)
  if type(mt) ~= "table" then return false end
  if mt[k] == f then return true end
  if type(mt.__index) == "table" then return mt.__index[k] == f end
  local ok, v = pcall(function() return w[k] end)
  return ok and v == f
end

local queue_class = { Queue = true, SimpleQueue = true, JoinableQueue = true }

-- the key __index and __newindex are tried with: one that reads or writes the object
local fieldkey = { Value = "value", Array = 1, Barrier = "parties", Connection = "closed" }

-- in a child: every method of class i with every wrong self must raise (__eq must
-- give false) and leave the self alone; 0 when all did, else 1 with the culprits
-- on stderr, or the negative number of the signal that ended it
local function check_class(i)
  return core.waitpid(H.spawn(function()
    local name = classes[i][1]
    local obj = classes[i][2]()
    local bad = {}
    for _, m in ipairs(methods(name, obj)) do
      local k, f = m[1], m[2]
      for _, w in ipairs(wrong_selves(i)) do
        -- the queues are one object type: SimpleQueue lists fewer of the same methods
        local queues = queue_class[name] and queue_class[w[1]]
        if not queues and not own_method(w[2], k, f) then
          io.stderr:write("") -- (a crash here names nothing: the next line would)
          local ok, res = pcall(f, w[2], fieldkey[name] or w[2])
          if k == "__eq" then ok = res ~= false end
          if ok then bad[#bad + 1] = ("%s.%s(%s)"):format(name, k, w[1]) end
        end
      end
    end
    assert(io.stdout:write(""))  -- nothing was written over
    assert(#bad == 0, "accepted a wrong self: " .. table.concat(bad, ", "))
  end))
end

describe("every method checks its self", function()
  H.leak_check(before_each, after_each)

  for i, c in ipairs(classes) do
    it(c[1] .. ": every method raises with a wrong self, never crashes", function()
      assert.equal(0, check_class(i))
    end)
  end

  it("lock.close(io.stdout) and lock.close(q) raise, naming the class", function()
    local l, q = mp.Lock(), mp.Queue()
    local close = l.close
    H.raises("Lock or RLock expected, got FILE*", close, io.stdout)
    H.raises("Lock or RLock expected, got multiprocessing.Queue", close, q)
    H.raises("Lock or RLock expected, got table", close, {})
    local ok, err = pcall(close)
    assert.is_false(ok)
    assert.matches("Lock or RLock expected, got no value", err, 1, true)
    -- q was not released: it still works
    q:put(5)
    assert.equal(5, q:get())
    q:close(); l:close()
  end)

  it("a closed object: close and __gc are no-ops, methods raise 'closed'", function()
    for _, c in ipairs(classes) do
      local obj = c[2]()
      obj:close()
      assert.has_no_error(function() obj:close() end)
      assert.has_no_error(function() getmetatable(obj).__gc(obj) end)
      assert.is_string(tostring(obj))
    end
    local l = mp.Lock(); l:close()
    H.raises("attempt to use a closed Lock", l.acquire, l)
    local s = mp.BoundedSemaphore(); s:close()
    H.raises("attempt to use a closed BoundedSemaphore", s.release, s)
    collectgarbage()  -- the other ends of the Pipes
  end)
end)

describe("core functions that take an offset", function()
  H.leak_check(before_each, after_each)

  -- in a child: any offset must raise, never crash; 0 when all did
  local function hostile(f)
    return core.waitpid(H.spawn(function()
      local q = mp.Queue()  -- the arena exists and holds objects of other types
      local good = core.blob_new("abc")
      assert(core.blob_get(good) == "abc")
      local top = core.arena_stats().top or 1 << 20
      local offs = { 0, -16, 1, 15, 16, 48, 64, good + 8, good + 16, good - 16, 1 << 40, -(1 << 62),
                     math.maxinteger, math.mininteger, top, top - 16, top + 16 }
      local bad = {}
      for _, off in ipairs(offs) do
        if off ~= good then
          local ok = pcall(f, off)
          if ok then bad[#bad + 1] = tostring(off) end
        end
      end
      for _, v in ipairs { "x", {}, 1.5, io.stdout } do
        if pcall(f, v) then bad[#bad + 1] = tostring(v) end
      end
      if not pcall(f) then else bad[#bad + 1] = "no value" end
      core.blob_free(good)
      if pcall(core.blob_get, good) then bad[#bad + 1] = "a freed blob" end
      q:close()
      assert(#bad == 0, "accepted: " .. table.concat(bad, ", "))
    end))
  end

  it("core.blob_get raises on an offset that names no blob, never crashes", function()
    assert.equal(0, hostile(core.blob_get))
  end)

  it("core.blob_free raises on an offset that names no blob, never frees it", function()
    assert.equal(0, hostile(core.blob_free))
  end)

  it("core.blob_free takes only a blob its process made: not bytes that look like one, not another's", function()
    assert.equal(0, core.waitpid(H.spawn(function()
      -- a blob whose bytes hold a blob header (tag "BLOB", length 0) at its first 16-aligned byte
      local fake = core.blob_new(string.pack("<I4I4I4I4I8I8", 0, 0, 0, 0x424f4c42, 0, 0))
      local inner = fake + 32
      -- in bounds, but not a live block: reading it raises (never a crash)
      assert(not pcall(core.blob_get, inner))
      local ok, err = pcall(core.blob_free, inner)
      assert(not ok and err:find("not a blob this process made", 1, true), err)
      local theirs = core.blob_new("parent's")
      assert(core.waitpid(H.spawn(function()
        assert(core.blob_get(theirs) == "parent's")  -- a child reads it, never frees it
        assert(not pcall(core.blob_free, theirs))
      end)) == 0)
      core.blob_free(theirs)
      assert(not pcall(core.blob_free, theirs))  -- twice
      core.blob_free(fake)
    end)))
  end)
end)
