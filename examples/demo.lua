-- demo.lua: the README demo: a CPU-bound function mapped over a pool, serial vs parallel.
-- Run it with `make demo`, or from a checkout:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;;" LUA_CPATH="./build/?.so;;" lua5.4 examples/demo.lua
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./build/?.so;" .. package.cpath
local mp = require "multiprocessing"

-- How many primes are there below n? (deliberately naive: pure CPU)
local function count_primes(n)
  local count = 0
  for k = 2, n do
    local prime = true
    for d = 2, math.floor(math.sqrt(k)) do
      if k % d == 0 then prime = false break end
    end
    if prime then count = count + 1 end
  end
  return count
end

local xs = {}
for i = 1, 24 do xs[i] = 84000 + 6000 * i end

local t0 = mp.now()
local serial = {}
for i, n in ipairs(xs) do serial[i] = count_primes(n) end
local t_serial = mp.now() - t0

local pool <close> = mp.Pool()
t0 = mp.now()
local parallel = pool:map(count_primes, xs)
local t_parallel = mp.now() - t0

local same = true
for i = 1, #xs do same = same and serial[i] == parallel[i] end
print(("results: %d items, %s (primes below %d: %d)"):format(#xs, same and "identical" or "DIFFERENT",
  xs[#xs], parallel[#xs]))
print(("serial:   %.2f s"):format(t_serial))
print(("parallel: %.2f s with %d workers"):format(t_parallel, mp.cpu_count()))
print(("speedup:  %.2fx"):format(t_serial / t_parallel))
