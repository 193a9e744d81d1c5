-- manager_dict: the tutorial's Manager().dict() filled by several processes.
-- A plain table would stay empty in the parent: each child changes its own copy.
local mp = require "multiprocessing"

local manager <close> = mp.Manager()
local results = manager:dict()

local function doubler(number, res)
  local result = number * 2
  local pid = mp.current_process().pid
  res[pid] = result
  print(("%d doubled to %d by process id: %d"):format(number, result, pid))
end

local procs = {}
for _, number in ipairs { 5, 10, 15, 20, 25 } do
  local proc = mp.Process { target = doubler, args = { number, results } }
  procs[#procs + 1] = proc
  proc:start()
end
for _, proc in ipairs(procs) do proc:join() end

local pids = {}
for pid, v in pairs(results) do pids[#pids + 1] = ("%d: %d"):format(pid, v) end
table.sort(pids)
print("{" .. table.concat(pids, ", ") .. "}")
print("entries:", #results)
