-- start_methods.lua: the same work under fork, forkserver and spawn, and what a child sees of
-- its parent under each (globals, upvalues, handles).
local mp = require "multiprocessing"

mp.forkserver_start()  -- early, while this process is small (and has no threads)

GREETING = "a global set by the parent"
local settings = { scale = 10 }        -- an upvalue: it travels with the function
local results = mp.Queue()             -- a handle: it travels too

local function work(x)
  -- (rawget: a function that reads GREETING by name carries its value along, under any method)
  results:put { x = x, global = rawget(_G, "GREETING") or "(no such global here)" }
  return x * settings.scale
end

for _, method in ipairs(mp.get_all_start_methods()) do
  local ctx = mp.get_context(method)
  local pool = ctx.Pool(2)
  local out = pool:map(work, { 1, 2, 3 })
  pool:close()
  pool:join()
  local seen = results:get(20)
  print(("%-10s map -> %s; a worker saw GREETING = %s"):format(method, table.concat(out, " "), seen.global))
  for _ = 2, 3 do results:get(20) end

  local p = ctx.Process { target = function(name) return "hello from " .. name end, args = { method } }
  p:start()
  p:join()
  print(("%-10s Process -> %s (exit code %d)"):format(method, p:result(), p.exitcode))
end
