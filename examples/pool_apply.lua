-- pool_apply.lua: one call in a worker with apply, and apply_async with callbacks (seeds 000, 004).
local mp = require "multiprocessing"

local function add(a, b) return a + b end

local pool <close> = mp.Pool(2)

print(pool:apply(add, { 5, 6 }))                    --> 11

-- apply_async returns at once; get([timeout]) waits for the values
local r = pool:apply_async(add, { 7, 8 })
print(r:get(2))                                     --> 15

-- callbacks run in the parent, whenever it next talks to the pool
-- (any pool call, or get/wait/ready on an AsyncResult)
local got = {}
local a = pool:apply_async(function(x) return x * x end, { 9 }, {
  callback = function(v) got[#got + 1] = "square: " .. v end })
local b = pool:apply_async(function() error("no luck") end, nil, {
  error_callback = function(e) got[#got + 1] = "error: " .. e:match("[^\n]*\n([^\n]*)") end })
a:wait() b:wait()
for _, line in ipairs(got) do print(line) end
print("successful:", a:successful(), b:successful())  --> true false
