-- lock_owner_died: a process dies holding a Lock; the next acquire gets it and is told.
-- (Python's multiprocessing.Lock hangs forever here.)
local mp = require "multiprocessing"

local lock, held = mp.Lock(), mp.Event()
local p = mp.Process { target = function()
  lock:acquire()
  held:set()
  mp.sleep(60)   -- killed before it can release
end }
p:start()
held:wait()
p:kill()
p:join()
print("child exit code", p.exitcode)          --> -9
print("acquire", lock:acquire(5))             --> true   owner died
lock:release()
print("acquire", lock:acquire())              --> true
lock:release()
