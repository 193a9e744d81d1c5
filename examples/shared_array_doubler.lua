-- shared_array_doubler: one process per index doubles a shared Array in place
-- (the tutorial's Array('d', numbers) example: the memory is shared, not copied).
local mp = require "multiprocessing"

local function doubler(index, arr)
  arr[index] = arr[index] * 2
end

local arr = mp.Array("d", { 5, 10, 15, 20, 25 })
print("before", table.concat(arr:totable(), " "))

local procs = {}
for index = 1, #arr do
  local proc = mp.Process { target = doubler, args = { index, arr } }
  procs[#procs + 1] = proc
  proc:start()
end
for _, proc in ipairs(procs) do proc:join() end

print("after ", table.concat(arr:totable(), " "))  --> 10.0 20.0 30.0 40.0 50.0
