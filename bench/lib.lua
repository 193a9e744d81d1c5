-- bench/lib.lua: what the Lua side of the benchmarks shares (loaded with dofile from the checkout).
local mp = require "multiprocessing"

local lib = {}

--- the median of reps runs of f, which returns seconds. Each run starts from a collected heap
--- (the Python side collects too): garbage a run or an earlier row left would otherwise be
--- copied-on-write by every fork of the next, a cost of the harness, not of the row.
function lib.median(f, reps)
  local ts = {}
  for i = 1, reps do
    collectgarbage()
    ts[i] = f()
  end
  table.sort(ts)
  return ts[(reps + 1) // 2]
end

--- seconds f takes
function lib.timed(f)
  local t0 = mp.now()
  f()
  return mp.now() - t0
end

return lib
