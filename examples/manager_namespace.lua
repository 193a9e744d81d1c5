-- manager_namespace: workers share a Namespace of settings and results, take turns with a manager
-- Lock, and meet at a manager Barrier before the parent reads what they wrote.
local mp = require "multiprocessing"

local manager <close> = mp.Manager()
local ns = manager:Namespace { scale = 3, total = 0 }
local lock = manager:Lock()
local done = manager:Barrier(4)  -- three workers and the parent

local function worker(n)
  local part = n * ns.scale
  do
    local guard <close> = lock:hold()  -- read-modify-write of ns.total, one worker at a time
    ns.total = ns.total + part
  end
  ns["worker" .. n] = part
  done:wait(30)
end

local procs = {}
for n = 1, 3 do
  procs[n] = mp.Process { target = worker, args = { n } }
  procs[n]:start()
end
done:wait(30)
for _, p in ipairs(procs) do p:join() end
print(ns)
print("total:", ns.total)  --> 18
