-- The fuzz target's shared objects and seed corpus. fuzz/codec_fuzz.c runs this
-- inside the target, before fuzzing, with the seed directory as argument (or ""):
-- it returns the live objects (the target keeps them for the whole run, so the
-- handles in the seeds name real objects of every type) and writes encodings of
-- varied values there, handles and functions included (functions carry a keyed
-- checksum that only this process and its descendants accept).
local dir = ...
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local Point = mp.register_metatable("Point", { __name = "Point" })
local shared = { "shared" }
local cyc = { name = "cycle" }; cyc.self = cyc
local up = 1
local function inc() up = up + 1; return up end
local function get() return up end
local function fact(n) if n <= 1 then return 1 end return n * fact(n - 1) end

local lock = mp.Lock()
local objects = {
  mp.Queue(), mp.SimpleQueue(), mp.JoinableQueue(), lock, mp.RLock(), mp.Semaphore(2),
  mp.BoundedSemaphore(3), mp.Event(), mp.Condition(), mp.Condition(lock), mp.Barrier(2),
  mp.Value("i", 7), mp.Value("d", 1.5, { lock = false }), mp.Array("i", { 1, 2, 3 }),
  mp.Array("b", 100), core.PoolState(2),
}

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
-- functions that carry globals (UP_ENV in docs/codec.md): the globals exist only
-- while the seeds are encoded, so that a decoded copy reading the globals of this
-- process finds none (the round trip then sends on exactly what came)
local seed_globals = { "SEED_K", "SEED_T", "SEED_fib", "SEED_even", "SEED_odd" }
local function carry(x) return x + SEED_K + #SEED_T end
local function writer(v) SEED_K = v end
values[#values + 1] = carry
values[#values + 1] = { carry, writer, function() return SEED_fib end }
values[#values + 1] = { writer, carry }
values[#values + 1] = function(n) return SEED_even(n) end
-- packed arrays (T_INTS of each width, T_FLOATS), one of them shared
local packed = {}
for w, f in ipairs { function(i) return i end, function(i) return i * 300 end,
                     function(i) return -i * 70000 end, function(i) return i * 2^40 end,
                     function(i) return i / 8 end } do
  local t = {}
  for i = 1, 20 do t[i] = f(i) end
  packed[w] = t
end
packed[#packed + 1] = packed[1]
values[#values + 1] = packed
-- records: tables of one shape (filled from a template on arrival), of two
-- shapes in turn, with values of every kind; a long array of them (over 1 KiB:
-- its strings are prefetched)
local recs, mixed = {}, {}
for i = 1, 40 do
  recs[i] = { id = i, name = "item" .. i, tags = { "a", "b" }, score = i / 3, ok = i % 2 == 0 }
  mixed[i] = i % 2 == 0 and { x = i, y = { i }, z = shared } or { x = tostring(i), w = true, [i] = i }
end
values[#values + 1] = recs
values[#values + 1] = mixed
values[#values + 1] = { { k = 1, v = "a" }, { k = 2, v = "b" }, setmetatable({ k = 3, v = "c" }, Point), { k = 4, v = inc } }
local deep = {}
do local t = deep; for _ = 1, 150 do t[1] = {}; t = t[1] end end
values[#values + 1] = deep
for _, o in ipairs(objects) do values[#values + 1] = o end
values[#values + 1] = objects
values[#values + 1] = { q = objects[1], lock = lock, again = lock, f = function() return objects[12].value end }

if dir ~= nil and dir ~= "" then
  SEED_K, SEED_T = 7, { 1, 2, shared }
  function SEED_fib(n) if n < 2 then return n end return SEED_fib(n - 1) + SEED_fib(n - 2) end
  function SEED_even(n) if n == 0 then return true end return SEED_odd(n - 1) end
  function SEED_odd(n) if n == 0 then return false end return SEED_even(n - 1) end
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
  local f = assert(io.open(dir .. "/seed-all", "wb"))
  f:write(mp.encode(values))
  f:close()
  io.stderr:write(("wrote %d seeds to %s\n"):format(n + 1, dir))
  for _, name in ipairs(seed_globals) do _G[name] = nil end
end
return objects
