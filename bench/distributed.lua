-- bench/distributed.lua: the Pool on Redis Streams on loopback, 2 worker processes (one
-- mp-worker), against bench/distributed.py (Python's BaseManager over TCP) and against the
-- local Pool. Starts its own redis-server (persistence off) unless MP_REDIS_URL is set.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local lib = dofile("bench/lib.lua")
local median, timed = lib.median, lib.timed

local N_TASKS, N_ITEMS = 2000, 200000

local function sh(cmd) return os.execute(cmd) end
if not os.getenv("MP_REDIS_URL") and not sh("command -v redis-server >/dev/null 2>&1") then
  io.stderr:write("distributed: no redis-server; rows skipped\n")
  return
end

local url, stop = os.getenv("MP_REDIS_URL"), nil
if not url then
  local port = 20000 + (core.getpid() % 12000)  -- (below the ephemeral ports)
  local pidfile = os.tmpname()
  assert(sh(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --pidfile %s --logfile /dev/null")
    :format(port, pidfile)))
  for _ = 1, 100 do
    local r = core.redis_connect("127.0.0.1", port, 0.2)
    if r then r:close() break end
    core.sleep(0.05)
  end
  url = "redis://127.0.0.1:" .. port
  stop = function()
    local f = io.open(pidfile)
    local pid = f and tonumber(f:read("a"))
    if f then f:close() end
    if pid then core.kill(pid, 9) end
    os.remove(pidfile)
  end
end
url = url .. "?namespace=bench" .. core.getpid()

local key = os.tmpname()
assert(sh("head -c 32 /dev/urandom > " .. key .. " && chmod 600 " .. key))
local worker = mp.Process { target = function()
  require("multiprocessing.stream_worker").run { url = url, key_file = key, processes = 2, quiet = true }
end }
worker:start()

local double = load("return function(x) return x * 2 end")()
local xs = {}
for i = 1, N_ITEMS do xs[i] = i end

local pool = mp.Pool { backend = url, key_file = key, processes = 2 }
pool:map(double, { 1, 2, 3, 4 }, 1)   -- the workers are up
local function apply_run()
  local rs = {}
  for i = 1, N_TASKS do rs[i] = pool:apply_async(double, { i }) end
  for i = 1, N_TASKS do assert(rs[i]:get() == 2 * i) end
end
local function map_run() assert(pool:map(double, xs).n == N_ITEMS) end
print(("distributed: %d tasks, one message each\t%.6f\t%d\ttask"):format(N_TASKS, median(function() return timed(apply_run) end, 3), N_TASKS))
print(("distributed: map x*2 over 200,000\t%.6f\t%d\titem"):format(median(function() return timed(map_run) end, 3), N_ITEMS))
pool:close()
pool:join()

local lp <close> = mp.Pool(2)
print(("distributed: the local Pool's map x*2 over 200,000 (for the 4x goal)\t%.6f\t%d\titem")
  :format(median(function() return timed(function() lp:map(double, xs) end) end, 3), N_ITEMS))

worker:terminate()
worker:join()
os.remove(key)
if stop then stop() end
