-- stream_worker.lua: mp-worker, the workers of the Pool on Redis Streams. A supervisor
-- (this process) keeps N consumer processes, beats their hearts in Redis while they live,
-- kills one whose task overran its timeout and replaces any that died. Each consumer reads
-- TASK messages from the group, checks signatures, runs the items and writes RESULT
-- messages; it also takes over the tasks of consumers whose heartbeat lapsed. The protocol
-- is in stream.lua; docs/distributed.md tells the whole story.
local core = require "multiprocessing.core"
local S = require "multiprocessing.stream"
local process = require "multiprocessing.process"
local shared = require "multiprocessing.shared"

local pack, unpack = table.pack, table.unpack
local now = core.now

local M = {}

local function log(opts, fmt, ...)
  if not opts.quiet then io.stderr:write(("mp-worker %s: "):format(S.me()), fmt:format(...), "\n") end
end

-------------------------------------------------------------------- a consumer
-- Runs the items of one task; returns the RESULT message (a table)
local function run_task(t, f, me)
  local capture = process._capture
  local out = { n = 0 }
  local msg = { k = t.k, j = t.j, w = me, v = out }
  local items = t.a
  for n = 1, items.n do
    local item = items[n]
    local ok, v
    if t.kind == "apply" then
      local r = pack(xpcall(f, capture, unpack(item, 1, item.n or #item)))
      ok = r[1]
      if ok then v = pack(unpack(r, 2, r.n)) else v = r[2] end
    elseif t.kind == "starmap" then
      ok, v = xpcall(f, capture, unpack(item, 1, item.n or #item))
    else
      ok, v = xpcall(f, capture, item)
    end
    if not ok then
      if type(v) == "table" then v.call, v.item, v.pid = t.kind, t.i + n - 1, me end
      msg.e = { n = n, err = v }
      return msg
    end
    out[n], out.n = v, n
  end
  return msg
end

-- the message's bytes; a value that cannot be sent fails its item (not the worker)
local function encode_result(msg, t)
  local ok, m = pcall(core.encode, msg)
  if ok then return m end
  local v = msg.v
  for n = 1, v.n do
    local good, why = pcall(core.encode, v[n])
    if not good then
      local e = ("%s failed on item %d (worker %s):\n%s at the result"):format(t.kind, t.i + n - 1, msg.w, tostring(why))
      v.n = n - 1
      for k = n, #v do v[k] = nil end
      msg.e = { n = n, err = e }
      break
    end
  end
  ok, m = pcall(core.encode, msg)
  if ok then return m end
  msg.v, msg.e = { n = 0 }, nil
  msg.fault = "the results cannot be sent: " .. tostring(m)
  return core.encode(msg)
end

local function consume(u, key, ns, deadline_cell, opts)
  local keys = S.keys(ns)
  local r = S.connect(u, "mp-worker")
  r:settimeout(S.BLOCK_MS / 1000 + 10)
  local me = S.me()
  -- our own heartbeat first: a task read before the supervisor's first beat is not taken from us
  r:call("SET", keys.worker(me), "1", "PX", S.HEARTBEAT_TTL)
  local fcache, fcount = {}, 0
  local warned = false
  local leases = {}          -- client -> time its lease was last seen (looked at again after a second)
  local count = 1            -- task messages read at once: more while they run fast

  local function must(rep, err)
    if rep == nil and err and not tostring(err):find("^%u+") then
      error(("mp-worker: Redis at %s: %s"):format(u.url, tostring(err)), 0)
    end
    return rep, err
  end

  local function reply(client, msg_bytes, id, extra)
    local res = keys.res(client)
    local cmds = {
      { "XADD", res, "*", "m", msg_bytes, "s", S.sign(key, res, msg_bytes) },
      { "PEXPIRE", res, S.RESULT_TTL },
      { "XACK", keys.tasks, S.GROUP, id },
      { "XDEL", keys.tasks, id },
    }
    if extra then cmds[#cmds + 1] = extra end
    must(r:pipeline(cmds))
  end

  local function drop(id)
    must(r:pipeline { { "XACK", keys.tasks, S.GROUP, id }, { "XDEL", keys.tasks, id } })
  end

  local function fault(t, id, text)
    reply(t.c, core.encode { k = t.k, j = t.j, w = me, v = { n = 0 }, fault = text }, id)
  end

  local function handle(id, fields, deliveries)
    local m = S.verify(key, keys.tasks, fields)
    if not m then
      must(r:call("INCR", keys.bad))
      if not warned then log(opts, "dropped a task message with a missing or wrong signature (counted in %s)", keys.bad) end
      warned = true
      return drop(id)
    end
    local ok, t = pcall(core.decode, m, "signed")
    if not ok or type(t) ~= "table" or type(t.a) ~= "table" then return drop(id) end
    local seen = leases[t.c]
    if not seen or now() - seen > 1 then
      if must(r:call("EXISTS", keys.client(t.c))) == 0 then leases[t.c] = nil return drop(id) end  -- its client is gone
      leases[t.c] = now()
    end
    if deliveries > S.MAX_DELIVERIES then
      return fault(t, id, ("%s: item %d was delivered %d times and each worker that took it died; it is not run again")
        :format(t.kind, t.i, deliveries - 1))
    end
    local f = fcache[t.f]
    if not f then
      local good, g = pcall(core.decode, t.f, "signed")
      if not good then
        return fault(t, id, ("%s: the task function cannot be received by worker %s: %s"):format(t.kind, me, tostring(g)))
      end
      if fcount >= 64 then fcache, fcount = {}, 0 end
      f, fcache[t.f], fcount = g, g, fcount + 1
    end
    if t.t then
      must(r:call("HSET", keys.running(me), "id", id, "m", m, "s", S.sign(key, keys.running(me), m)))
      deadline_cell[1] = now() + t.t
    end
    local t0 = now()
    local msg = run_task(t, f, me)
    deadline_cell[1] = 0
    -- messages that run in under a millisecond are read 16 at a time (a message that runs
    -- longer is read alone, so that the others go to idle consumers)
    count = (now() - t0 < 0.001 and not t.t) and 16 or 1
    reply(t.c, encode_result(msg, t), id, t.t and { "DEL", keys.running(me) } or nil)
  end

  -- tasks held by consumers whose heartbeat lapsed: claimed and run here
  local function reclaim()
    local p = must(r:call("XPENDING", keys.tasks, S.GROUP, "IDLE", 500, "-", "+", 100))
    if not p or p.n == 0 then return end
    local alive = {}
    for i = 1, p.n do
      local e = p[i]
      local id, owner, deliveries = e[1], e[2], e[4]
      if owner ~= me then
        if alive[owner] == nil then alive[owner] = must(r:call("EXISTS", keys.worker(owner))) == 1 end
        if not alive[owner] then
          local c = must(r:call("XCLAIM", keys.tasks, S.GROUP, me, 500, id))
          if c and c.n and c.n > 0 and c[1] then handle(c[1][1], c[1][2], deliveries + 1) end
        end
      end
    end
  end

  local last_reclaim = 0
  while true do
    if now() - last_reclaim >= S.RECLAIM_EVERY then
      last_reclaim = now()
      reclaim()
    end
    local rep = must(r:call("XREADGROUP", "GROUP", S.GROUP, me, "COUNT", count, "BLOCK", S.BLOCK_MS,
      "STREAMS", keys.tasks, ">"))
    if rep == nil then
      -- the group is gone (the stream was deleted): make it again
      S.ensure_group(r, keys)
    elseif rep then
      for _, stream in ipairs(rep) do
        for _, e in ipairs(stream[2]) do handle(e[1], e[2], 1) end
      end
    end
  end
end

-------------------------------------------------------------------- the supervisor
local OPTIONS = { url = true, key_file = true, processes = true, quiet = true }

function M.run(opts)
  for k in pairs(opts) do
    if not OPTIONS[k] then error(("bad options to 'mp-worker' (unknown option %s)"):format(tostring(k)), 2) end
  end
  local u = S.parse_url(opts.url, "mp-worker")
  local key = S.read_key(opts.key_file, "mp-worker")
  local n = opts.processes or core.cpu_count()
  if math.type(n) ~= "integer" or n < 1 then error("bad options to 'mp-worker' (processes must be a positive integer)", 2) end
  local keys = S.keys(u.ns)
  local r = S.connect(u, "mp-worker")
  local ok, err = S.ensure_group(r, keys)
  if not ok then error(("mp-worker: Redis at %s: %s"):format(u.url, tostring(err)), 0) end
  local host = S.me():match("^(.*):%d+$")

  local slots = {}
  local function spawn(i)
    local cell = shared.Array("d", 1)
    local p = process.Process { target = consume, args = { u, key, u.ns, cell, opts }, daemon = true, name = "mp-worker-" .. i }
    p:start()
    local name = host .. ":" .. p.pid
    r:call("SET", keys.worker(name), "1", "PX", S.HEARTBEAT_TTL)
    slots[i] = { p = p, name = name, cell = cell, started = now() }
  end

  local function timed_out(s)
    -- its task fails with a timeout; the consumer is gone, so its entry is settled here
    local h = r:call("HGETALL", keys.running(s.name))
    local f = {}
    for i = 1, (h and h.n or 0) - 1, 2 do f[h[i]] = h[i + 1] end
    if f.m and f.s and core.compare_digest(S.sign(key, keys.running(s.name), f.m), f.s) then
      local good, t = pcall(core.decode, f.m, "signed")
      if good and type(t) == "table" then
        local text = ("%s: task timed out after %gs (item %d); worker %s was killed"):format(t.kind, t.t, t.i, s.name)
        local m = core.encode { k = t.k, j = t.j, w = s.name, v = { n = 0 }, fault = text }
        local res = keys.res(t.c)
        r:pipeline {
          { "XADD", res, "*", "m", m, "s", S.sign(key, res, m) }, { "PEXPIRE", res, S.RESULT_TTL },
          { "XACK", keys.tasks, S.GROUP, f.id }, { "XDEL", keys.tasks, f.id },
        }
      end
    end
    r:call("DEL", keys.running(s.name))
  end

  for i = 1, n do spawn(i) end
  log(opts, "%d consumers on %s (namespace %s)", n, u.url, u.ns)
  local last_beat = 0
  local deaths = 0
  local ok2, e = pcall(function()
    while true do
      for i = 1, n do
        local s = slots[i]
        local dl = s.cell[1]
        if dl > 0 and now() > dl then
          s.p:kill()
          s.p:join()
          timed_out(s)
          r:call("DEL", keys.worker(s.name))
          s.p:close()
          spawn(i)
        elseif not s.p:is_alive() then
          s.p:join()
          -- its tasks go to the others at once: no waiting for the heartbeat to lapse
          r:call("DEL", keys.worker(s.name))
          if s.p.exitcode ~= 0 then log(opts, "consumer %s ended (%s); replaced", s.name, tostring(s.p.exitcode)) end
          s.p:close()
          deaths = (now() - s.started < 1) and deaths + 1 or 0
          if deaths > 2 * n then core.sleep(1) end   -- Redis gone or a start-up fault: not a hot loop
          spawn(i)
        end
      end
      if now() - last_beat >= S.HEARTBEAT_EVERY then
        last_beat = now()
        local cmds = {}
        for i = 1, n do cmds[i] = { "SET", keys.worker(slots[i].name), "1", "PX", S.HEARTBEAT_TTL } end
        local good, why = r:pipeline(cmds)
        if not good then
          log(opts, "Redis at %s: %s; reconnecting", u.url, tostring(why))
          core.sleep(0.5)
          local c, w = pcall(S.connect, u, "mp-worker")
          if c then r = w end
        end
      end
      core.sleep(0.05)
    end
  end)
  -- Ctrl-C, SIGTERM through an error, or a fault: the consumers go, their heartbeats too
  for i = 1, n do
    local s = slots[i]
    if s then
      pcall(s.p.kill, s.p)
      pcall(s.p.join, s.p)
      pcall(r.call, r, "DEL", keys.worker(s.name))
    end
  end
  if not ok2 then error(e, 0) end
end

return M
