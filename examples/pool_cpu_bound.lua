-- pool_cpu_bound.lua: a CPU-bound loop, serial vs parallel, with the speedup.
local mp = require "multiprocessing"

local function burn(n)  -- sum of i % 7 for i up to n: pure CPU
  local s = 0
  for i = 1, n do s = s + i % 7 end
  return s
end

local jobs = {}
for i = 1, 16 do jobs[i] = 8000000 end

local t0 = mp.now()
local serial = {}
for i, n in ipairs(jobs) do serial[i] = burn(n) end
local t_serial = mp.now() - t0

local pool <close> = mp.Pool()
t0 = mp.now()
local parallel = pool:map(burn, jobs, 1)
local t_parallel = mp.now() - t0

for i = 1, #jobs do assert(serial[i] == parallel[i]) end
print(("serial   %.2f s"):format(t_serial))
print(("parallel %.2f s on %d workers"):format(t_parallel, mp.cpu_count()))
print(("speedup  %.2fx"):format(t_serial / t_parallel))
