-- pool_matrix.lua: matrix multiplication single vs multi (seed 004's matrix.py), rows in parallel.
local mp = require "multiprocessing"

local N = tonumber(arg[1]) or 320

local function random_matrix(n)
  local m = {}
  for i = 1, n do
    local row = {}
    for j = 1, n do row[j] = math.random() end
    m[i] = row
  end
  return m
end

-- row i of a * b
local function mul_row(a_row, b)
  local n, out = #b[1], {}
  for j = 1, n do
    local s = 0
    for k = 1, #a_row do s = s + a_row[k] * b[k][j] end
    out[j] = s
  end
  return out
end

math.randomseed(42)
local a, b = random_matrix(N), random_matrix(N)

local t0 = mp.now()
local single = {}
for i = 1, N do single[i] = mul_row(a[i], b) end
local t_single = mp.now() - t0

local pool <close> = mp.Pool()
t0 = mp.now()
-- b travels as an upvalue of the function: sent once per call, not once per row
local multi = pool:map(function(row) return mul_row(row, b) end, a)
local t_multi = mp.now() - t0

for i = 1, N do for j = 1, N do assert(math.abs(single[i][j] - multi[i][j]) < 1e-9) end end
print(("mulMat %dx%d - Single: %.3f s"):format(N, N, t_single))
print(("mulMat %dx%d - Multi:  %.3f s (%d workers)"):format(N, N, t_multi, mp.cpu_count()))
