-- process_queue_job.lua: seed 002's job: two processes put their sums on a Queue.
local mp = require "multiprocessing"

local function job(q)
  local res = 0
  for i = 0, 999 do res = res + i + i ^ 2 + i ^ 3 end
  q:put(res)  -- never blocks: the value is in shared memory at once
end

local q = mp.Queue()
local p1 = mp.Process { target = job, args = { q } }
local p2 = mp.Process { target = job, args = { q } }
p1:start()
p2:start()
p1:join()
p2:join()
local res1, res2 = q:get(), q:get()
print(math.tointeger(res1 + res2) or res1 + res2)   --> 499667166000
