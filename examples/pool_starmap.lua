-- pool_starmap.lua: functions of several arguments with starmap (seeds 000 and 004).
local mp = require "multiprocessing"

local function multiply(a, b) return a * b end

local pool <close> = mp.Pool(2)
-- each argument table is unpacked: multiply(1, 2), multiply(3, 4), ...
local r = pool:starmap(multiply, { { 1, 2 }, { 3, 4 }, { 5, 6 } })
print(table.concat(r, ", "))                       --> 2, 12, 30

-- the async form returns an AsyncResult
local ar = pool:starmap_async(function(x, y) return x + y end, { { 1, 2 }, { 3, 4 } })
print(table.concat(ar:get(), ", "))                --> 3, 7
