-- bench/value_lock.lua: two processes each add 1 to a shared Value 100,000 times under its
-- lock; prints "<row>\t<seconds>\t<count>\t<unit>" (median of 5) for bench/run.lua.
local mp = require "multiprocessing"

local N = tonumber(arg and arg[1]) or 100000

local function run()
  local v = mp.Value("d", 0)
  local lock = v:get_lock()
  local function work()
    for _ = 1, N do
      lock:acquire()
      v.value = v.value + 1
      lock:release()
    end
  end
  local t0 = mp.now()
  local p = mp.Process { target = work }
  p:start()
  work()
  p:join()
  local t = mp.now() - t0
  assert(p.exitcode == 0, "child failed")
  assert(v.value == 2 * N, "lost updates: " .. v.value)
  return t
end

local ts = {}
for i = 1, 5 do ts[i] = run() end
table.sort(ts)
print(("value: 2 processes x 100,000 locked increments\t%.6f\t%d\tincrement"):format(ts[3], 2 * N))
