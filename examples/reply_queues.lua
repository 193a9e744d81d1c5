-- reply_queues.lua: a server process answers requests, each on a reply queue sent with it. A
-- queue sent through a queue is owned by the message until the server takes it, and freed
-- once both sides closed it: the arena ends where it started (docs/arena.md).
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local function server(requests)
  while true do
    local req = requests:get()
    if req == "stop" then return end
    local reply = req.reply
    reply:put(req.x * req.x)
    reply:close()  -- the caller holds the other handle
  end
end

local requests = mp.Queue()
local srv = mp.Process { target = server, args = { requests } }
srv:start()

local function square(x)
  local reply <close> = mp.Queue()  -- a queue for this one answer
  requests:put { x = x, reply = reply }
  return reply:get()
end

for x = 1, 6000 do square(x) end  -- the requests queue's chunks grow to their full size first
collectgarbage()
local before = core.arena_stats().used
local sum = 0
for x = 1, 1000 do sum = sum + square(x) end
requests:put "stop"
srv:join()  -- (so that it closed its last reply queue)
collectgarbage()
print(sum)                                              --> 333833500
print("arena use as before:", core.arena_stats().used == before)  --> true
