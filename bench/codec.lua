-- Codec workloads (the Python twin is bench/codec.py): encode, decode and round
-- trip of a list of integers, a list of small records, and one big string.
-- Prints "<row>\t<seconds>\t<units>\t<unit>..." lines, medians of BENCH_REPEAT runs.
local mp = require "multiprocessing"
local now = require("multiprocessing.core").now
local encode, decode = mp.encode, mp.decode
local REPEAT = tonumber(os.getenv("BENCH_REPEAT")) or 7

local function median(f, arg)
  local ts = {}
  for i = 1, REPEAT do
    collectgarbage(); collectgarbage()
    local t0 = now()
    f(arg)
    ts[i] = now() - t0
  end
  table.sort(ts)
  return ts[(REPEAT + 1) // 2]
end

local function row(name, seconds, ...)
  io.write(table.concat({ name, ("%.6f"):format(seconds), ... }, "\t"), "\n")
  io.flush()
end

-- each data set is made just before its rows and dropped after them
local datasets = {
  { "1M ints", function()
    local t = {}
    for i = 1, 1000000 do t[i] = i end
    return t, #t
  end },
  { "100k records", function()
    local t = {}
    for i = 1, 100000 do t[i] = { id = i, name = "item" .. i, tags = { "a", "b" }, score = i / 3 } end
    return t, #t
  end },
  { "16MiB string", function() return ("0123456789abcdef"):rep(1 << 20), 1 end },
}

for _, d in ipairs(datasets) do
  local name, value, n = d[1], d[2]()
  local s = encode(value)
  local mb = ("%.3f"):format(#s / 1e6)
  row("codec encode " .. name, median(encode, value), n, "values", mb, "MB")
  row("codec decode " .. name, median(decode, s), n, "values", mb, "MB")
  row("codec roundtrip " .. name, median(function(v) return decode(encode(v)) end, value), n, "values", mb, "MB")
end
