-- shared_value_lock: a Value and an Array updated by several processes under their locks.
local mp = require "multiprocessing"

local num = mp.Value("d", 0)
local arr = mp.Array("i", { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 })

local function work()
  for _ = 1, 1000 do
    local guard <close> = num:get_lock():hold()  -- released at the end of each turn
    num.value = num.value + 0.5
  end
  local guard <close> = arr:get_lock():hold()
  for i = 1, #arr do arr[i] = arr[i] + 1 end
end

local procs = {}
for i = 1, 4 do
  procs[i] = mp.Process { target = work }
  procs[i]:start()
end
for _, p in ipairs(procs) do
  p:join()
  assert(p.exitcode == 0)
end

print(num.value)                            --> 2000.0
print(table.concat(arr:totable(), " "))     --> 4 5 6 7 8 9 10 11 12 13
