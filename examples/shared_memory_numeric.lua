-- shared_memory_numeric: a numpy-like typed view over a named segment. The parent fills a
-- million doubles; each pool worker attaches to the segment by name (as an unrelated process
-- would) and sums its own slice; nothing is copied between processes but the name.
local mp = require "multiprocessing"

local N, PARTS = 1000000, 4
local shm <close> = assert(mp.SharedMemory { create = true, size = 8 * N })
local x = shm:view("d")
for i = 1, N do x[i] = i * 0.5 end

local function partial_sum(name, first, last)
  local seg <close> = assert(mp.SharedMemory { name = name })
  local v = seg:view("d", 1 + 8 * (first - 1), last - first + 1)
  local s = 0.0
  for i = 1, #v do s = s + v[i] end
  return s
end

local pool <close> = mp.Pool(PARTS)
local args, step = {}, N // PARTS
for p = 1, PARTS do args[p] = { shm.name, (p - 1) * step + 1, p == PARTS and N or p * step } end
local t0 = os.clock()
local sums = pool:starmap(partial_sum, args)
local total = 0
for _, s in ipairs(sums) do total = total + s end
print(("sum of %d doubles in %d slices: %.1f (expected %.1f)"):format(N, PARTS, total, 0.5 * N * (N + 1) / 2))
assert(total == 0.5 * N * (N + 1) / 2)
print(("parent CPU %.2f s"):format(os.clock() - t0))
assert(shm:unlink())
