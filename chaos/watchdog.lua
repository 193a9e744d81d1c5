-- chaos/watchdog.lua: the process behind L.watchdog (chaos/lib.lua):
--   lua5.4 chaos/watchdog.lua SECS PARENT SID
-- started by io.popen, never by core.fork: a fork takes an entry in the arena's process table,
-- and so waits for the allocator's lock, which a process the case stopped may hold; a watchdog
-- forked then would never start, and the case would hang with nothing to end it.
-- Prints its pid, sleeps SECS, sends PARENT SIGINT (lua.c turns it into an "interrupted!" error),
-- and two seconds later continues every stopped process of session SID. It leaves as soon as
-- PARENT is gone (its parent changes), so it never outlives the case.
local core = require "multiprocessing.core"
local L = require "chaos.lib"
local secs, parent, sid = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3])

io.stdout:write(core.getpid(), "\n")
io.stdout:flush()

local function wait(d)
  local till = core.now() + d
  while true do
    if core.getppid() ~= parent then os.exit(0) end
    local left = till - core.now()
    if left <= 0 then return end
    core.sleep(math.min(0.01, left))
  end
end

wait(secs)
core.kill(parent, 2)
wait(2)
for _, p in ipairs((L.session(sid))) do
  local st = L.stat(p)
  if st and st.state == "T" then core.kill(p, 18) end
end
