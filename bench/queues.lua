-- bench/queues.lua: Queue throughput between two processes, and Process start+join.
-- Prints "<row>\t<seconds>\t<units>\t<unit>" lines (median of repeats) for bench/run.lua.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local lib = dofile("bench/lib.lua")
local median = lib.median

local function transfer(n, item)
  local q = mp.Queue()
  local t0 = mp.now()
  local p = mp.Process { target = function() for _ = 1, n do q:put(item) end end }
  p:start()
  for _ = 1, n do q:get() end
  local t = mp.now() - t0
  p:join()
  q:close()
  return t
end

local N = 100000
print(("queue: %d small messages\t%.6f\t%d\tmsg"):format(N, median(function() return transfer(N, 12345) end, 5), N))
local MiB = ("x"):rep(1 << 20)
print(("queue: 1000 x 1 MiB\t%.6f\t%g\tMB"):format(median(function() return transfer(1000, MiB) end, 3), 1000 * 1.048576))

print(("process: start + join\t%.6f\t1\tproc"):format(median(function()
  local t0 = mp.now()
  for _ = 1, 50 do
    local p = mp.Process { target = function() end }
    p:start()
    p:join()
  end
  return (mp.now() - t0) / 50
end, 5)))
