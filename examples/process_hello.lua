-- process_hello: the smallest Process, as in the tutorials: f('Bob') in a child process.
local mp = require "multiprocessing"

local function f(name)
  print("Hello", name)
end

local p = mp.Process { target = f, args = { "Bob" } }
p:start()
p:join()
print("exit code", p.exitcode)  --> 0
