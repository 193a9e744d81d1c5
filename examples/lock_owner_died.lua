-- lock_owner_died: a process dies holding a Lock; the next acquire gets it and is told.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local lock, held = mp.Lock(), mp.Event()
local pid = core.fork()
if pid == 0 then
  lock:acquire()
  held:set()
  core.sleep(60)   -- killed before it can release
  core._exit(0)
end
held:wait()
core.kill(pid, 9)
print("child exit code", core.waitpid(pid))   --> -9
print("acquire", lock:acquire(5))             --> true   owner died
lock:release()
print("acquire", lock:acquire())              --> true
lock:release()
