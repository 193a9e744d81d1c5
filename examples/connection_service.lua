-- connection_service: a long-running service that unrelated programs reach by address
-- (mp.connection.Listener), serving many clients at once with mp.connection.wait.
--   lua5.4 examples/connection_service.lua ADDRESS   serves until a client asks it to stop
--   lua5.4 examples/connection_service.lua           also starts examples/connection_client.lua
--                                                    as a separate program and serves it
-- The authkey comes from the environment (MP_AUTHKEY), as a real service would read it
-- from a file only its clients can read.
local mp = require "multiprocessing"
local C = mp.connection

local key = os.getenv("MP_AUTHKEY") or "demo key: set MP_AUTHKEY"
local address = arg and arg[1]
local client  -- the client program we started ourselves, if any
local l = assert(C.Listener(address, { authkey = key }))
print(("service: listening on %s (pid %d)"):format(l.address, mp.current_process().pid))

if not address then  -- a demo on its own: run the client as another program, sharing nothing but the address
  local here = (arg and arg[0] or ""):match("^(.*/)") or "./"
  local cmd = ("MP_AUTHKEY=%q %s %sconnection_client.lua %q"):format(key, arg and arg[-1] or "lua5.4", here, l.address)
  client = assert(io.popen(cmd))
end

local function handle(req)
  if req.op == "sum" then
    local s = 0
    for _, v in ipairs(req.args) do s = s + v end
    return { ok = true, value = s }
  elseif req.op == "upper" then
    return { ok = true, value = tostring(req.args[1]):upper() }
  end
  return { ok = false, error = "unknown op " .. tostring(req.op) }
end

local conns, served, stop = {}, 0, false
while not stop do
  local ready = C.wait({ l, table.unpack(conns) }, 30)
  if not ready then break end                 -- interrupted (Ctrl-C)
  if #ready == 0 then print("service: idle for 30 s, stopping") break end
  for _, o in ipairs(ready) do
    if o == l then
      local c, why = l:accept(5)
      if c then conns[#conns + 1] = c else print("service: refused a client: " .. tostring(why)) end
    else
      local req, why = o:recv(5)
      if req == nil then                      -- the client left ("closed")
        o:close()
        for i, c in ipairs(conns) do if c == o then table.remove(conns, i) break end end
      elseif req.op == "stop" then
        stop = true
        o:send({ ok = true, value = ("served %d requests"):format(served) })
      else
        served = served + 1
        o:send(handle(req))
      end
    end
  end
end

for _, c in ipairs(conns) do c:close() end
l:close()  -- unlinks the socket path
if client then
  io.write(client:read("a"))
  assert(client:close(), "the client failed")
end
print("service: stopped after " .. served .. " requests")
