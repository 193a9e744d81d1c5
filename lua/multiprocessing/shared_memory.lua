-- shared_memory.lua: SharedMemory, named shared memory that unrelated processes attach by name,
-- and ShareableList, a fixed-length list in such a segment (see docs/shared_memory.md).
local core = require "multiprocessing.core"

local SharedMemory = core.SharedMemory

-- ShareableList keeps Python's layout (multiprocessing/shared_memory.py), so that either
-- language attaches to the other's lists. Native byte order; offsets in the segment:
--   0                  n, int64
--   8                  n + 1 int64: each item's offset in the data area, then the area's size
--   (n + 2) * 8        the data area: 8 bytes per number, boolean or nil; a string's capacity
--   data + area size   n formats of 8 bytes (Python struct codes, NUL padded)
--   formats + 8n       n bytes: how to read each item back (0 number/boolean, 1 str, 2 bytes, 3 None)
local ALIGN = 8
local BOOL, NONE = "xxxxxxx?", "xxxxxx?x"
local AS_VALUE, AS_STR, AS_BYTES, AS_NONE = 0, 1, 2, 3

local ShareableList = {}
local methods = {}
ShareableList.__name = "multiprocessing.ShareableList"

-- raises at the first caller outside this file: the user's line
local THIS = debug.getinfo(1, "S").source
local function fail(fmt, ...)
  local level = 2
  while true do
    local info = debug.getinfo(level, "S")
    if not info or info.source ~= THIS then break end
    level = level + 1
  end
  error(("ShareableList: " .. fmt):format(...), level)
end

-- the format, bytes (exact to the format's size) and back code of a value; cap: a string's capacity
local function encode(v, cap, where)
  local t = math.type(v) or type(v)
  if t == "integer" then return "q", string.pack("=i8", v), AS_VALUE
  elseif t == "float" then return "d", string.pack("=d", v), AS_VALUE
  elseif t == "boolean" then return BOOL, ("\0"):rep(7) .. (v and "\1" or "\0"), AS_VALUE
  elseif t == "nil" then return NONE, ("\0"):rep(8), AS_NONE
  elseif t == "string" then
    cap = cap or ALIGN * (#v // ALIGN + 1)
    if #v > cap then fail("a string of %d bytes does not fit the %d bytes of item %d", #v, cap, where) end
    return cap .. "s", v .. ("\0"):rep(cap - #v), utf8.len(v) and AS_STR or AS_BYTES
  end
  fail("cannot store a %s at item %d (numbers, strings, booleans and nil only)", t, where)
end

--- ShareableList(values [, name | {name =, track =}]) makes one from values[1 .. values.n or #values];
--- ShareableList(name) attaches to one. Returns the list, or nil, message, code as SharedMemory does.
local function new(values, opts)
  if type(values) == "string" and opts == nil then
    local shm, msg, code = SharedMemory { name = values }
    if not shm then return nil, msg, code end
    local size = shm.size
    local ok, n = pcall(function() return (string.unpack("=i8", shm:read(1, 8))) end)
    if not ok or n < 0 or (n + 2) * 8 > size then
      shm:close()
      fail("segment '%s' does not hold a ShareableList", shm.name)
    end
    local raw, offsets = shm:read(9, (n + 1) * 8), {}
    for i = 1, n + 1 do offsets[i] = string.unpack("=i8", raw, 8 * i - 7) end
    for i = 1, n + 1 do
      local o = offsets[i]
      if o < 0 or (i > 1 and (o < offsets[i - 1] + ALIGN or o - offsets[i - 1] > size)) or
         (n + 2) * 8 + o + 9 * n > size then
        shm:close()
        fail("segment '%s' does not hold a ShareableList", shm.name)
      end
    end
    return setmetatable({ shm = shm, n = n, offsets = offsets, data = (n + 2) * 8 }, ShareableList)
  end
  if type(values) ~= "table" then
    fail("bad argument #1 (table or string expected, got %s)", type(values))
  end
  local n = values.n or #values
  if math.type(n) ~= "integer" or n < 0 then fail("values.n must be a count, got %s", tostring(values.n)) end
  local name, track
  if type(opts) == "string" then name = opts
  elseif type(opts) == "table" then name, track = opts.name, opts.track
  elseif opts ~= nil then
    fail("bad argument #2 (string or table expected, got %s)", type(opts))
  end
  local formats, bytes, codes, offsets = {}, {}, {}, { 0 }
  for i = 1, n do
    formats[i], bytes[i], codes[i] = encode(values[i], nil, i)
    offsets[i + 1] = offsets[i] + #bytes[i]
  end
  local data = (n + 2) * 8
  local size = data + offsets[n + 1] + 9 * n
  local shm, msg, code = SharedMemory { name = name, create = true, size = size, track = track }
  if not shm then return nil, msg, code end
  local fmts = {}
  for i = 1, n do fmts[i] = formats[i] .. ("\0"):rep(8 - #formats[i]) end
  local head = { string.pack("=i8", n) }
  for i = 1, n + 1 do head[i + 1] = string.pack("=i8", offsets[i]) end
  shm:write(1, table.concat(head))
  shm:write(data + 1, table.concat(bytes))
  shm:write(data + offsets[n + 1] + 1, table.concat(fmts))
  for i = 1, n do codes[i] = string.char(codes[i]) end
  shm:write(data + offsets[n + 1] + 8 * n + 1, table.concat(codes))
  return setmetatable({ shm = shm, n = n, offsets = offsets, data = data }, ShareableList)
end

local function position(self, i, what)
  if math.type(i) ~= "integer" then
    if math.type(i) == "float" and i == math.floor(i) then i = math.tointeger(i)
    else fail("%sindex must be an integer, got %s", what, tostring(i)) end
  end
  if i < 0 then i = self.n + i + 1 end  -- -1 is the last, as Python's
  if i < 1 or i > self.n then fail("%sindex %d out of range (size %d)", what, i, self.n) end
  return i
end

local function format_of(self, i)
  local at = self.data + self.offsets[self.n + 1] + 8 * (i - 1)
  return (self.shm:read(at + 1, 8):gsub("%z+$", ""))
end

local function code_of(self, i)
  return (string.unpack("=i1", self.shm:read(self.data + self.offsets[self.n + 1] + 8 * self.n + i, 1)))
end

local function get(self, i)
  local fmt, at = format_of(self, i), self.data + self.offsets[i] + 1
  local code = code_of(self, i)
  if code == AS_NONE then return nil end
  if fmt == "q" then return (string.unpack("=i8", self.shm:read(at, 8)))
  elseif fmt == "d" then return (string.unpack("=d", self.shm:read(at, 8)))
  elseif fmt == BOOL then return self.shm:read(at + 7, 1) ~= "\0" end
  local len = tonumber(fmt:match("^(%d+)s$"))
  if not len or len > self.offsets[i + 1] - self.offsets[i] then
    fail("item %d of '%s' has a format we cannot read: %q", i, self.shm.name, fmt)
  end
  return (self.shm:read(at, len):gsub("%z+$", ""))
end

local function set(self, i, v)
  local cap = self.offsets[i + 1] - self.offsets[i]
  local fmt, bytes, code
  if type(v) == "string" then
    fmt, bytes, code = encode(v, cap, i)
    local cur = format_of(self, i)
    if cur:sub(-1) == "s" then fmt = cur end
  else
    fmt, bytes, code = encode(v, nil, i)
  end
  local base = self.data + self.offsets[self.n + 1]
  self.shm:write(base + 8 * (i - 1) + 1, fmt .. ("\0"):rep(8 - #fmt))
  self.shm:write(base + 8 * self.n + i, string.pack("=i1", code))
  self.shm:write(self.data + self.offsets[i] + 1, bytes)
end

function ShareableList.__index(self, k)
  if type(k) == "number" then return get(self, position(self, k, "")) end
  if k == "name" then return self.shm.name end
  if k == "format" then
    local parts = {}
    for i = 1, self.n do parts[i] = format_of(self, i) end
    return table.concat(parts)
  end
  return methods[k]
end

function ShareableList.__newindex(self, k, v)
  if type(k) ~= "number" then fail("cannot set field '%s' (indexes are integers)", tostring(k)) end
  set(self, position(self, k, ""), v)
end

function ShareableList.__len(self) return self.n end
function ShareableList.__close(self) self.shm:close() end
function ShareableList.__tostring(self)
  return ("multiprocessing.ShareableList('%s', %d items)"):format(self.shm.name, self.n)
end

local function checkself(self, name)
  if getmetatable(self) ~= ShareableList then
    fail("bad argument #1 to '%s' (ShareableList expected, got %s)", name, type(self))
  end
end

--- a new table with the items (and n, since items may be nil)
function methods.totable(self)
  checkself(self, "totable")
  local t = { n = self.n }
  for i = 1, self.n do t[i] = get(self, i) end
  return t
end

function methods.count(self, v)
  checkself(self, "count")
  local c = 0
  for i = 1, self.n do if get(self, i) == v then c = c + 1 end end
  return c
end

--- the first index holding v, or nil
function methods.index(self, v)
  checkself(self, "index")
  for i = 1, self.n do if get(self, i) == v then return i end end
  return nil
end

function methods.close(self) checkself(self, "close") self.shm:close() end
function methods.unlink(self) checkself(self, "unlink") return self.shm:unlink() end

return {
  SharedMemory = SharedMemory,
  ShareableList = new,
}
