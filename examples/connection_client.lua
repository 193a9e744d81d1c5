-- connection_client: a program that talks to a running service by its address only
-- (mp.connection.Client), with no common parent and nothing shared but the authkey.
--   lua5.4 examples/connection_client.lua ADDRESS   talks to the service at ADDRESS
--   lua5.4 examples/connection_client.lua           also starts examples/connection_service.lua
--                                                   as a separate program and talks to it
-- The authkey comes from the environment (MP_AUTHKEY), as for the service.
local mp = require "multiprocessing"
local C = mp.connection

local key = os.getenv("MP_AUTHKEY") or "demo key: set MP_AUTHKEY"
local address = arg and arg[1]
local service
if not address then  -- start the service ourselves, in the background (a name cannot hold "\0": a path)
  address = ("%s/lua-mp-demo-%d.sock"):format(os.getenv("TMPDIR") or "/tmp", mp.current_process().pid)
  local here = (arg and arg[0] or ""):match("^(.*/)") or "./"
  local out = os.tmpname()
  assert(os.execute(("MP_AUTHKEY=%q %s %sconnection_service.lua %q > %s 2>&1 &"):format(
    key, arg and arg[-1] or "lua5.4", here, address, out)))
  service = out
end

-- the service may not be up yet: Client tries again until its timeout
local conn, why = C.Client(address, { authkey = key, timeout = 20 })
assert(conn, "client: cannot reach the service: " .. tostring(why))

local function call(op, ...)
  assert(conn:send({ op = op, args = { ... } }))
  local r = assert(conn:recv(20))
  if not r.ok then error("service: " .. r.error) end
  return r.value
end

print("client: sum(1..100) =", call("sum", table.unpack((function()
  local t = {} for i = 1, 100 do t[i] = i end return t end)())))
print("client: upper =", call("upper", "hello from an unrelated process"))
print("client: " .. call("stop"))
conn:close()

if service then  -- the service stops once asked: show what it said
  local f
  for _ = 1, 200 do
    f = io.open(service)
    local text = f and f:read("a") or ""
    if f then f:close() end
    if text:find("stopped") then io.write(text) break end
    mp.sleep(0.05)
  end
  os.remove(service)
end
