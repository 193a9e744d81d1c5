-- stream.lua: the protocol of the Pool on Redis Streams, written down once: key names,
-- message kinds and fields, signing, the URL and the key file. Used by the client
-- (stream_pool.lua) and the workers (stream_worker.lua). See docs/distributed.md.
local core = require "multiprocessing.core"

local M = {}

--[[ Keys, under a namespace NS (default "mp"):
  NS:tasks            stream of TASK messages; consumer group GROUP; every worker process
                      is a consumer named "host:pid"
  NS:res:CLIENT       stream of RESULT messages for one client; it expires RESULT_TTL ms after
                      the last write (a dead client's results do not pile up)
  NS:client:CLIENT    the client's lease: set with PX LEASE_TTL, refreshed every LEASE_EVERY s
                      by the client's lease process; workers drop tasks of a client without one
  NS:worker:CONSUMER  a consumer's heartbeat: PX HEARTBEAT_TTL, refreshed by its supervisor
                      (mp-worker) every HEARTBEAT_EVERY s while the consumer process lives
  NS:running:CONSUMER hash: the task a consumer runs under a per-task timeout (for the
                      supervisor that kills it when overdue)
  NS:fn:CLIENT        hash: the client's task functions, field FID -> signature .. codec
                      bytes (signed under the context "NS:fn:CLIENT:FID"); a function is sent
                      once, and task messages name it by FID. It expires FN_TTL ms after the
                      client's last renewal (the lease process renews it with the lease)
  NS:bad              counter of messages dropped for a missing or wrong signature

  Every stream entry has two fields: "m" the message and "s" its signature,
  HMAC-SHA256(key, stream name .. "\n" .. m); nothing is decoded before the signature is
  checked (constant time, in C: r:entries). The stream name in the signed text stops a
  result from being replayed as a task, or one client's result from being fed to another.

  A message is one or more frames (core.stream_frame): a header table and a payload array,
  each as codec bytes with a u32 size before them. ]]
M.GROUP = "workers"
M.LEASE_TTL, M.LEASE_EVERY = 5000, 1.0
M.HEARTBEAT_TTL, M.HEARTBEAT_EVERY = 3000, 0.5
M.RESULT_TTL = 600000
M.MAX_DELIVERIES = 3       -- a task delivered this many times, each to a worker that died, fails
M.RECLAIM_EVERY = 0.5      -- how often a consumer looks for tasks held by dead consumers
M.BLOCK_MS = 200           -- longest blocking read: Ctrl-C and leases are looked at in between
M.STALL = 1.0              -- seconds a Redis that answers nothing may take beyond the wait a call
                           -- asked for: then the connection counts as broken (a stopped server)
M.FN_TTL = 2 * M.LEASE_TTL
M.BATCH_MAX = 64           -- task messages a consumer reads at once, at most
M.BATCH_TIME = 0.005       -- a consumer reads about this many seconds of work at once, and
                           -- writes its results back at least this often

-- TASK message, one frame: header { c = client id, k = call id, j = chunk number, i = index
--   of the chunk's first item, n = number of items, kind = "map" | "starmap" | "apply" |
--   "imap" | "unordered", fid = the function's FID in NS:fn:CLIENT, t = per-task timeout in
--   seconds or nil }, payload the items (for "apply": the arguments, n of them, one call)
-- RESULT message, one frame per task (a consumer sends the results of the tasks it ran
--   together, for one client, in one entry): header { k = call id, j = chunk number, w =
--   "host:pid" of the worker, n = number of values, e = { n = item, err = TaskError or text }
--   for the first failed item (the values before it in the payload), or fault = text for a
--   chunk that could not run (timed out, delivered too often, function not receivable) },
--   payload the values (for "apply": one packed list)

function M.keys(ns)
  return {
    tasks = ns .. ":tasks",
    res = function(client) return ns .. ":res:" .. client end,
    client = function(client) return ns .. ":client:" .. client end,
    worker = function(consumer) return ns .. ":worker:" .. consumer end,
    running = function(consumer) return ns .. ":running:" .. consumer end,
    fn = function(client) return ns .. ":fn:" .. client end,
    bad = ns .. ":bad",
  }
end

-------------------------------------------------------------------- signing
-- key: the key's bytes, or a core.signer of them (one keyed OpenSSL context: what the
-- client and the workers use; the bytes, for tests that sign with another key)
function M.sign(key, stream, m)
  if type(key) == "string" then return core.hmac_sha256(key, stream .. "\n" .. m) end
  return key:sign(stream, m)
end

-------------------------------------------------------------------- the key file
-- At least 32 bytes, readable by its owner only (0600 or stricter): it grants running code
-- on every worker, so it is never sent and never read from a file others can read.
function M.read_key(path, fname)
  if type(path) ~= "string" then
    error(("bad argument to '%s' (key_file must be a path, got %s)"):format(fname, type(path)), 3)
  end
  local key, why = core.read_key_file(path)
  if not key then error(("%s: key_file %s: %s"):format(fname, path, why), 3) end
  return key
end

-------------------------------------------------------------------- the URL
-- redis://[[user]:password@]host[:port][/db][?namespace=NS]  or  unix:///path/to/sock
function M.parse_url(url, fname)
  if type(url) ~= "string" then
    error(("bad argument to '%s' (backend must be a redis:// URL, got %s)"):format(fname, type(url)), 3)
  end
  local u = { port = 6379, host = "127.0.0.1", db = 0, ns = "mp", url = url }
  local rest = url:match("^redis://(.*)$")
  local query
  if not rest then
    local path = url:match("^unix://(/[^?]*)")
    if not path then
      error(("bad argument to '%s' (backend must be redis://host:port or unix:///path, got %s)"):format(fname, url), 3)
    end
    u.unix = path
    query = url:match("%?(.*)$")
  else
    rest, query = rest:match("^([^?]*)%??(.*)$")
    local auth, hostpart = rest:match("^(.*)@(.*)$")
    if auth then
      local user, pass = auth:match("^(.-):(.*)$")
      if user then u.user, u.password = (user ~= "" and user or nil), pass else u.password = auth end
      rest = hostpart
    end
    local hostport, db = rest:match("^([^/]*)/?(%d*)$")
    if not hostport then error(("bad argument to '%s' (cannot read the URL %s)"):format(fname, url), 3) end
    local h, p = hostport:match("^%[(.*)%]:?(%d*)$")
    if not h then h, p = hostport:match("^([^:]*):?(%d*)$") end
    if h and h ~= "" then u.host = h end
    if p and p ~= "" then u.port = math.tointeger(tonumber(p)) end
    if db and db ~= "" then u.db = math.tointeger(tonumber(db)) end
  end
  for k, v in (query or ""):gmatch("([^&=]+)=([^&]*)") do
    if k == "namespace" then u.ns = v
    else error(("bad argument to '%s' (unknown URL option %s in %s)"):format(fname, k, url), 3) end
  end
  return u
end

-- a connection, authenticated and on its database; raises a clear error naming `fname`
function M.connect(u, fname, timeout)
  -- hiredis and libcrypto (the signatures) are opened at their first use: told here if missing
  core.need_lib("hiredis", fname)
  core.need_lib("crypto", fname)
  local r, why = core.redis_connect(u.host, u.port, timeout or 5, u.unix)
  if not r then error(("%s: cannot reach Redis at %s: %s"):format(fname, u.url, why), 0) end
  local function must(...)
    local ok, err = r:call(...)
    if not ok then
      r:close()
      error(("%s: Redis at %s refused %s: %s"):format(fname, u.url, (...), tostring(err)), 0)
    end
    return ok
  end
  if u.password then
    if u.user then must("AUTH", u.user, u.password) else must("AUTH", u.password) end
  end
  if u.db ~= 0 then must("SELECT", u.db) end
  return r
end

-- makes the task stream and its group (from the start of the stream: entries written before
-- the first worker came are not missed); a group that exists is fine
function M.ensure_group(r, keys)
  local ok, err = r:call("XGROUP", "CREATE", keys.tasks, M.GROUP, "0", "MKSTREAM")
  if not ok and not tostring(err):find("BUSYGROUP", 1, true) then return nil, err end
  return true
end

-- "host:pid" of this process
local host
function M.me()
  if not host then
    local f = io.open("/proc/sys/kernel/hostname")
    host = f and f:read("l") or "localhost"
    if f then f:close() end
  end
  return host .. ":" .. core.getpid()
end

return M
