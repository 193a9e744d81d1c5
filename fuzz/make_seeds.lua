-- Writes encodings of varied values into the directory given as argument: the
-- seed corpus of the fuzz target (run by scripts/fuzz.sh with the normal build).
local dir = assert(arg[1], "usage: make_seeds.lua DIR")
local mp = require "multiprocessing"

local Point = mp.register_metatable("Point", { __name = "Point" })
local shared = { "shared" }
local cyc = { name = "cycle" }; cyc.self = cyc
local up = 1
local function inc() up = up + 1; return up end
local function get() return up end
local function fact(n) if n <= 1 then return 1 end return n * fact(n - 1) end

local values = {
  nil, true, false, 0, 1, -1, 127, 128, -129, 32767, 40000, 2^31, math.maxinteger, math.mininteger,
  0.5, -0.0, 1 / 0, -1 / 0, 0 / 0, string.unpack("<d", string.pack("<i8", 0x7ff8000000000abc)),
  "", "a", ("x"):rep(255), ("y"):rep(256), ("z"):rep(300),
  {}, { 1, 2, 3 }, { 1, nil, 3 }, { a = 1, b = { c = { d = "e" } } },
  { [1.5] = 1, [true] = false, [-1] = "neg", [shared] = shared, [2^53] = 0 },
  { shared, shared, shared }, cyc,
  setmetatable({ x = 1, y = 2 }, Point),
  setmetatable({ 1 }, { __index = { z = 3 } }),
  { inc, get }, fact, function(...) return select("#", ...) end,
  math.sqrt, string.format, { string.rep, table.concat },
  string, math, { m = table },
  _G, { env = _G },
  { id = 1, name = "item1", tags = { "a", "b" }, score = 1 / 3 },
}
local deep = {}
do local t = deep; for _ = 1, 150 do t[1] = {}; t = t[1] end end
values[#values + 1] = deep

local n = 0
for i = 1, #values + 1 do  -- values has holes (nil is one of them)
  local ok, s = pcall(mp.encode, values[i])
  if ok then
    n = n + 1
    local f = assert(io.open(("%s/seed-%03d"):format(dir, i), "wb"))
    f:write(s)
    f:close()
  end
end
local all = mp.encode(values)
local f = assert(io.open(dir .. "/seed-all", "wb"))
f:write(all)
f:close()
print(("wrote %d seeds to %s"):format(n + 1, dir))
