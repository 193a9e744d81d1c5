-- timeouts.lua: one convention for expected outcomes (README, "Conventions"): nil, reason,
-- and booleans only where Python's name returns one.
local mp = require "multiprocessing"

local lock, holding, finish = mp.Lock(), mp.Event(), mp.Event()
local p = mp.Process { target = function()
  local guard <close> = lock:hold()   -- the child holds the lock until told to finish
  holding:set()
  finish:wait()
end }
p:start()
holding:wait()

-- acquire returns a boolean, as Python's does
print("acquire(0.05):", lock:acquire(true, 0.05))                  --> false (the child holds it)

-- hold has no Python twin: a guard, or nil, "timeout"
do
  local guard <close>, why = lock:hold(0.05)
  print("hold(0.05):", guard and "taken" or why)                   --> timeout
end

-- a queue: a received nil is told apart from a timeout by the second value
local q = mp.Queue()
q:put(nil)
print("get:", select("#", q:get(1)), q:get(0.05))                  --> 1   nil   timeout

-- a pipe: recv_value gives true, value (a sent nil too) or nil, reason
local a, b = mp.Pipe()
a:send(nil)
print("recv_value:", b:recv_value(1))                              --> true   nil
print("recv_value:", b:recv_value(0.05))                           --> nil   timeout

-- join: true, or nil, "timeout" while the child runs
print("join(0.01):", p:join(0.01))                                 --> nil   timeout
finish:set()
print("join():", p:join(), p.exitcode)                             --> true  0
p:close(); q:close(); a:close(); b:close(); lock:close(); holding:close(); finish:close()
