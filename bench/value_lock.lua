-- value_lock: two processes each add 1 to a shared Value N times under its lock.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local N = tonumber(arg and arg[1]) or 100000
local v = mp.Value("d", 0)
local lock = v:get_lock()

local function work()
  for _ = 1, N do
    lock:acquire()
    v.value = v.value + 1
    lock:release()
  end
end

local t0 = core.now()
local pid = core.fork()
if pid == 0 then
  local ok = pcall(work)
  core._exit(ok and 0 or 1)
end
work()
assert(core.waitpid(pid) == 0, "child failed")
local t = core.now() - t0
assert(v.value == 2 * N, "lost updates: " .. v.value)
print(("value_lock %.3f"):format(t))
