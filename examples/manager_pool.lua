-- examples/manager_pool.lua: a Pool that lives in the manager's process (Python's manager.Pool()),
-- used by the parent and by two processes that only have its proxy.
local mp = require "multiprocessing"

local function slow_square(x)
  local t = os.clock()
  while os.clock() - t < 0.01 do end  -- some work
  return x * x
end

local m <close> = mp.Manager()
local pool = m:Pool(2)

print("map:", table.concat(pool:map(slow_square, { 1, 2, 3, 4, 5 }), " "))

local ar = pool:apply_async(slow_square, { 12 })
print("apply_async ready at once?", ar:ready())
print("its result:", ar:get(30))

for i, v in pool:imap(slow_square, { 6, 7, 8 }) do print(("imap item %d -> %d"):format(i, v)) end

-- other processes use the same pool through the proxy
local results = m:dict()
local procs = {}
for n = 1, 2 do
  procs[n] = mp.Process { target = function()
    results[n] = pool:apply(function(a, b) return a + b end, { n, 100 })
  end }:start()
end
for _, p in ipairs(procs) do p:join() end
print("from the children:", results[1], results[2])

-- an error in a task comes back to the caller with the task's message
local ok, err = pcall(pool.apply, pool, function() error("no such thing") end)
print("a failed task:", ok, tostring(err):match("no such thing"))

pool:close()
pool:join()
