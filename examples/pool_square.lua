-- pool_square.lua: seed 001's square over 1..4 and seed 002's job x*x over range(10).
local mp = require "multiprocessing"

local function square(n) return n * n end
local function job(x) return x * x end

local pool <close> = mp.Pool()   -- one worker per CPU

-- for item in pool:map(...) as in seed 003: map returns a table, in order
for _, v in ipairs(pool:map(square, { 1, 2, 3, 4 })) do print(v) end

-- range(10) as an iterator function: it ends when it returns nil
local i = -1
local res = pool:map(job, function() i = i + 1 if i < 10 then return i end end)
print(table.concat(res, ", "))   --> 0, 1, 4, 9, 16, 25, 36, 49, 64, 81
