-- A redis-server of a spec's or chaos case's own: persistence off, daemonized, on a port no
-- other socket holds. Used by spec/distributed_spec.lua and chaos/stream_faults.lua.
--
-- The port is drawn below the kernel's ephemeral range (ip_local_port_range): a port drawn in it
-- may be the local end of one of the many connections the specs make, which refuses redis's
-- bind while nothing listens there to answer a probe. A server that does not answer within its
-- patience (its bind refused, or gone) is stopped and another port is drawn; after the last try
-- the error carries the server's own log.
local core = require "multiprocessing.core"

local M = {}

local TRIES = 5

local function slurp(path)
  local f <close> = io.open(path)
  return f and f:read("a")
end

local function alive(pid)
  local s = slurp(("/proc/%d/stat"):format(pid))
  local state = s and s:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- a port from 20000 up to the ephemeral range's first (or, were that too low, above its last)
local function draw_port()
  local lo, hi = (slurp("/proc/sys/net/ipv4/ip_local_port_range") or ""):match("(%d+)%s+(%d+)")
  lo, hi = tonumber(lo) or 32768, tonumber(hi) or 60999
  if lo - 20000 >= 1000 then return math.random(20000, lo - 1) end
  return math.random(hi + 1, 65535)
end

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- a port on `host` that answers nothing now
function M.free_port(host)
  for _ = 1, 50 do
    local p = draw_port()
    local r = core.redis_connect(host or "127.0.0.1", p, 0.2)
    if not r then return p end
    r:close()
  end
  error("no free port")
end

--- starts a server; opts: bind (default "127.0.0.1"), password, patience (seconds per try,
-- default 10), run (how to run a shell command; default os.execute).
-- Returns { url, host, port, pid = function, stop = function }.
function M.start(opts)
  opts = opts or {}
  local host = opts.bind or "127.0.0.1"
  local run = opts.run or os.execute
  local pidfile, logfile = os.tmpname(), os.tmpname()
  local log
  for _ = 1, TRIES do
    local port = M.free_port(host)
    os.remove(pidfile)
    assert(run(("redis-server --port %d --bind %s %s--save '' --appendonly no --daemonize yes --pidfile %s --logfile %s")
      :format(port, host, opts.password and ("--requirepass %s "):format(quote(opts.password)) or "", pidfile, logfile)),
      "redis-server would not run (install it, or set MP_REDIS_URL)")
    local deadline = core.now() + (opts.patience or 10)
    local pid, up
    repeat
      pid = pid or tonumber(slurp(pidfile) or "")
      local r = pid and core.redis_connect(host, port, 0.2)  -- (up: answering, its pid known)
      if r then r:close() up = true break end
      -- it could not listen there: it says so, takes its pid file away and is gone
      if (slurp(logfile) or ""):find("aborting", 1, true) or pid and not alive(pid) then break end
      core.sleep(0.02)
    until core.now() > deadline
    if up then
      os.remove(logfile)
      local server = { host = host, port = port }
      server.url = opts.password and ("redis://:%s@%s:%d"):format(opts.password, host, port)
        or ("redis://%s:%d"):format(host, port)
      function server.pid() return pid or tonumber(slurp(pidfile) or "") end
      function server.stop()
        local p = server.pid()
        if p then core.kill(p, 9) end
        os.remove(pidfile)
      end
      return server
    end
    pid = pid or tonumber(slurp(pidfile) or "")
    if pid then core.kill(pid, 9) end
    log = slurp(logfile)
  end
  os.remove(pidfile)
  os.remove(logfile)
  error(("redis-server did not start on %s in %d tries; its log:\n%s"):format(host, TRIES, log or "(none)"), 2)
end

return M
