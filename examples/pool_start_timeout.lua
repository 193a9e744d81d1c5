-- pool_start_timeout.lua: a Pool whose workers never get ready fails, naming the worker,
-- instead of hanging (start_timeout, default 60 s; here 1 s).
local mp = require "multiprocessing"

-- an initializer that waits for something that never comes (in a threaded C host: a mutex
-- another thread held when the worker was forked)
local function init() mp.sleep(3600) end

local ok, err = pcall(mp.Pool, { processes = 2, initializer = init, start_timeout = 1 })
print(ok, err)  --> false  Pool: worker 1 (pid N) did not start within 1s (start_timeout): ...

-- a pool that starts in time is unaffected
local pool <close> = mp.Pool { processes = 2, initializer = function() end, start_timeout = 10 }
print(table.concat(pool:map(function(x) return x * x end, { 1, 2, 3 }), " "))  --> 1 4 9
