-- examples/pipe_ping_pong.lua: a parent and a child exchange "ping"/"pong" over a Pipe.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local N = tonumber(arg and arg[1]) or 1000
local parent_end, child_end = mp.Pipe()

local pid = core.fork()
if pid == 0 then
  local ok, err = pcall(function()
    parent_end:close()  -- the child keeps only its own end
    while true do
      local msg = child_end:recv()
      if msg == nil then break end  -- a sent nil (or "closed"): we are done
      assert(child_end:send(msg == "ping" and "pong" or "what?"))
    end
    child_end:close()
  end)
  if not ok then io.stderr:write("child: ", tostring(err), "\n") end
  core._exit(ok and 0 or 1)
end

child_end:close()  -- so that the parent sees "closed" when the child leaves
local t0 = core.now()
for _ = 1, N do
  assert(parent_end:send("ping"))
  local reply, why = parent_end:recv(5)
  assert(reply == "pong", why)
end
local dt = core.now() - t0
parent_end:send(nil)
assert(core.waitpid(pid) == 0)
print(("%d round trips in %.3f s (%.1f us each)"):format(N, dt, dt / N * 1e6))
parent_end:close()
