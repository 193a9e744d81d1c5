-- A tour of mp.encode / mp.decode: what survives the trip, and what cannot go.
-- Run from the checkout:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;;" LUA_CPATH="./build/?.so;;" lua5.4 examples/codec_roundtrip.lua
local mp = require "multiprocessing"

-- A metatable registered by name arrives as the very same table.
local Point = mp.register_metatable("example.Point", {
  __tostring = function(p) return ("Point(%g, %g)"):format(p.x, p.y) end,
})

local counter = 0
local function bump() counter = counter + 1; return counter end
local function peek() return counter end

local job = {
  id = math.maxinteger,                  -- all 64 bits
  ratio = -0.0,                          -- bit for bit
  blob = "bytes\0with\255anything",      -- binary-safe
  origin = setmetatable({ x = 1, y = 2 }, Point),
  fns = { bump = bump, peek = peek },    -- closures sharing an upvalue
  sqrt = math.sqrt,                      -- a C function, by name
  str = string,                          -- a module, by name
}
job.self = job                           -- cycles survive

local bytes = mp.encode(job)
print(("encoded into %d bytes"):format(#bytes))

local copy = mp.decode(bytes)
print("id", copy.id, math.type(copy.id))
print("ratio", copy.ratio, 1 / copy.ratio)
print("blob intact", copy.blob == job.blob)
print("origin", tostring(copy.origin), getmetatable(copy.origin) == Point)
copy.fns.bump(); copy.fns.bump()
print("shared upvalue", copy.fns.peek(), "(sender's counter is still " .. counter .. ")")
print("sqrt is ours", copy.sqrt == math.sqrt, "string is ours", copy.str == string)
print("cycle", copy.self == copy)

-- What cannot be sent says what and where.
local ok, err = pcall(mp.encode, { tasks = { 1, 2, coroutine.create(print) } }, "args")
print(ok, err)
ok, err = pcall(mp.encode, { log = io.stderr })
print(ok, err)
-- Bad bytes give an error, never a crash.
ok, err = pcall(mp.decode, bytes:sub(1, 20))
print(ok, err)
