-- bench/lib.lua: what the Lua side of the benchmarks shares (loaded with dofile from the checkout).
local mp = require "multiprocessing"

local lib = {}

--- the median of reps runs of f, which returns seconds
function lib.median(f, reps)
  local ts = {}
  for i = 1, reps do ts[i] = f() end
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
