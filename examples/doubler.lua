-- The doubler of the tutorials: one process per number, each printing its name.
local mp = require "multiprocessing"

local function doubler(number)
  local result = number * 2
  print(("%d doubled to %d by: %s (pid %d)"):format(number, result, mp.current_process().name,
    mp.current_process().pid))
  return result
end

local procs = {}
for _, number in ipairs { 5, 10, 15, 20, 25 } do
  local proc = mp.Process { target = doubler, args = { number } }
  procs[#procs + 1] = proc
  proc:start()
end
local proc = mp.Process { target = doubler, name = "Test", args = { 2 } }
proc:start()
procs[#procs + 1] = proc

local results = {}
for _, p in ipairs(procs) do
  p:join()
  results[#results + 1] = p:result()  -- beyond Python: the target's return value
end
print("results: " .. table.concat(results, " "))
