-- distributed_pool: the same pool:map on Redis Streams (docs/distributed.md). This example is
-- self-contained: it starts a throwaway redis-server on loopback (or uses MP_REDIS_URL), makes
-- a key, starts one mp-worker with 2 consumers, and maps over them. On real machines you run
-- `mp-worker redis://HOST:6379 --key-file KEY` on each worker machine instead.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local url = os.getenv("MP_REDIS_URL")
local stop_redis
if not url then
  if not os.execute("command -v redis-server >/dev/null 2>&1") then
    print("no redis-server here (apt-get install redis-server), nothing to show")
    return
  end
  local port = 20000 + core.getpid() % 12000  -- (below the ephemeral ports: none of them is bound)
  local pidfile = os.tmpname()
  assert(os.execute(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --pidfile %s --logfile /dev/null")
    :format(port, pidfile)))
  for _ = 1, 100 do
    local r = core.redis_connect("127.0.0.1", port, 0.2)
    if r then r:close() break end
    mp.sleep(0.05)
  end
  url = "redis://127.0.0.1:" .. port
  stop_redis = function()
    local f = io.open(pidfile)
    local pid = f and tonumber(f:read("a"))
    if f then f:close() end
    if pid then core.kill(pid, 9) end
    os.remove(pidfile)
  end
end
url = url .. "?namespace=example" .. core.getpid()

-- the shared key: 32 random bytes, readable by its owner only
local key = os.tmpname()
assert(os.execute("head -c 32 /dev/urandom > " .. key .. " && chmod 600 " .. key))

-- a worker "machine": here a child process running what mp-worker runs
local worker = mp.Process { target = function()
  require("multiprocessing.stream_worker").run { url = url, key_file = key, processes = 2, quiet = true }
end }
worker:start()

do
  local pool <close> = mp.Pool { backend = url, key_file = key }
  local squares = pool:map(function(x) return x * x end, { 1, 2, 3, 4, 5 })
  print(table.concat(squares, " ", 1, squares.n))            --> 1 4 9 16 25
  local total = 0
  for _, v in pool:imap_unordered(function(x) return x * 2 end, { 10, 20, 30 }) do total = total + v end
  print("sum of doubles", total)                             --> 120
  local ok, err = pcall(pool.map, pool, function(q) return q end, { mp.Queue() })
  print(ok, err)    --> false  cannot send a Queue to another machine (at args[1]) ...
end

worker:terminate()
worker:join()
os.remove(key)
if stop_redis then stop_redis() end
