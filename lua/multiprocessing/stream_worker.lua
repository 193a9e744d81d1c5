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
-- The items of one task run under one xpcall (not one per item): F, ITEMS, N, KIND, OUT
-- and CUR, the item being run, are what `run` reads and writes.
local F, ITEMS, N, KIND, OUT, CUR
local function run()
  if KIND == "apply" then
    CUR = 1
    OUT[1] = pack(F(unpack(ITEMS, 1, N)))
  elseif KIND == "starmap" then
    for k = CUR + 1, N do CUR = k local a = ITEMS[k] OUT[k] = F(unpack(a, 1, a.n or #a)) end
  else
    for k = CUR + 1, N do CUR = k OUT[k] = F(ITEMS[k]) end
  end
end

-- Runs the items of task t (header) with function f; returns the RESULT header and values
local function run_task(t, items, f, me)
  local out = {}
  local h = { k = t.k, j = t.j, w = me, n = 0 }
  F, ITEMS, N, KIND, OUT, CUR = f, items, t.n, t.kind, out, 0
  local ok, e = xpcall(run, process._capture)
  F, ITEMS, OUT = nil, nil, nil
  if ok then
    h.n = t.kind == "apply" and 1 or t.n
  else
    if type(e) == "table" then
      e.call, e.item, e.pid = t.kind, t.i + CUR - 1, me
      if type(e.traceback) == "string" then  -- the user's frames only
        e.traceback = e.traceback:gsub("\n[^\n]*multiprocessing/stream_worker%.lua:[^\n]*", "")
      end
    end
    out[CUR] = nil
    h.n = CUR - 1
    h.e = { n = CUR, err = e }
  end
  return h, out
end

-- the RESULT frame; a value that cannot be sent fails its item (not the worker)
local function result_frame(h, out, kind, first)
  local ok, fr = pcall(core.stream_frame, h, out, 1, h.n)
  if ok and fr then return fr end
  for n = 1, h.n do   -- the value that cannot be sent: the ones before it go back
    local good, one = pcall(core.stream_frame, 0, out, n, 1)
    if not good or not one then
      local why = good and "cannot send a shared object to another machine" or tostring(one)
      h.e = { n = n, err = ("%s failed on item %d (worker %s):\n%s at the result"):format(kind, first + n - 1, h.w, why) }
      h.n = n - 1
      break
    end
  end
  ok, fr = pcall(core.stream_frame, h, out, 1, h.n)
  if ok and fr then return fr end
  h.n, h.e = 0, nil
  h.fault = "the results cannot be sent: " .. tostring(fr or "a shared object cannot cross machines")
  return core.stream_frame(h, {}, 1, 0)
end

local function consume(u, key, ns, deadline_cell, opts)
  local keys = S.keys(ns)
  local signer = core.signer(key)
  local r = S.connect(u, "mp-worker")
  r:settimeout(S.BLOCK_MS / 1000 + 10)
  local me = S.me()
  -- our own heartbeat first: a task read before the supervisor's first beat is not taken from us
  r:call("SET", keys.worker(me), "1", "PX", S.HEARTBEAT_TTL)
  local fcache, fcount = {}, 0
  local warned = false
  local leases = {}          -- client -> time its lease was last seen (looked at again after a second)
  -- How much to take at once: a task message's run time is guessed from its size (seconds
  -- per byte, a moving average of what ran); messages are read, and kept, up to about
  -- BATCH_TIME seconds of guessed work (one, while they run long)
  local per_byte, size = S.BATCH_TIME / 64, 64

  local function must(rep, err)
    if rep == nil and err and not tostring(err):find("^%u+") then
      error(("mp-worker: Redis at %s: %s"):format(u.url, tostring(err)), 0)
    end
    return rep, err
  end

  -- Results wait here, and the task entries they settle, until flush writes them back in
  -- one round trip: per client one XADD of all its frames (and its PEXPIRE), then one XACK
  -- and one XDEL of the entries. The results go first: a crash in between can only repeat
  -- a task, never lose one.
  local frames, acks, nacks = {}, {}, 0
  local function add(client, frame, id)
    if frame then
      local l = frames[client]
      if not l then l = {} frames[client] = l end
      l[#l + 1] = frame
    end
    nacks = nacks + 1
    acks[nacks] = id
  end
  local function flush(extra)
    if nacks == 0 and not extra then return end
    local cmds = {}
    for client, l in pairs(frames) do
      local res = keys.res(client)
      local m = table.concat(l)
      cmds[#cmds + 1] = { "XADD", res, "*", "m", m, "s", signer:sign(res, m) }
      cmds[#cmds + 1] = { "PEXPIRE", res, S.RESULT_TTL }
    end
    if nacks > 0 then
      cmds[#cmds + 1] = { "XACK", keys.tasks, S.GROUP, unpack(acks, 1, nacks) }
      cmds[#cmds + 1] = { "XDEL", keys.tasks, unpack(acks, 1, nacks) }
    end
    if extra then cmds[#cmds + 1] = extra end
    frames, acks, nacks = {}, {}, 0
    must(r:pipeline(cmds))
  end

  local function fault(t, id, text)
    add(t.c, core.stream_frame({ k = t.k, j = t.j, w = me, n = 0, fault = text }, {}, 1, 0), id)
  end

  -- the task function FID of client c: from the cache, or fetched once (signed, checked)
  local function function_of(t)
    local cf = fcache[t.c]
    local f = cf and cf[t.fid]
    if f then return f end
    local fk = keys.fn(t.c)
    local v = must(r:call("HGET", fk, tostring(t.fid)))
    if type(v) ~= "string" then return nil, "it is not in Redis (its client is gone?)" end
    local sig, bytes = v:sub(1, 32), v:sub(33)
    if not signer:verify(fk .. ":" .. tostring(t.fid), bytes, sig) then
      must(r:call("INCR", keys.bad))
      return nil, "its signature is wrong"
    end
    local good, g = pcall(core.decode, bytes, "signed")
    if not good then return nil, tostring(g) end
    if fcount >= 64 then fcache, fcount = {}, 0 end
    cf = fcache[t.c]
    if not cf then cf = {} fcache[t.c] = cf end
    cf[t.fid], fcount = g, fcount + 1
    return g
  end

  -- one task entry (m: its message, false when its signature was wrong)
  local function handle(id, m, deliveries)
    if not m then
      must(r:call("INCR", keys.bad))
      if not warned then log(opts, "dropped a task message with a missing or wrong signature (counted in %s)", keys.bad) end
      warned = true
      return add(nil, nil, id)
    end
    local ok, t, items = pcall(core.stream_unframe, m)
    if not ok or type(t) ~= "table" or type(items) ~= "table" or type(t.c) ~= "string" or math.type(t.n) ~= "integer" then
      return add(nil, nil, id)
    end
    local seen = leases[t.c]
    if not seen or now() - seen > 1 then
      if must(r:call("EXISTS", keys.client(t.c))) == 0 then leases[t.c] = nil return add(nil, nil, id) end  -- its client is gone
      leases[t.c] = now()
    end
    if deliveries > S.MAX_DELIVERIES then
      return fault(t, id, ("%s: item %d was delivered %d times and each worker that took it died; it is not run again")
        :format(t.kind, t.i, deliveries - 1))
    end
    local f, why = function_of(t)
    if not f then
      return fault(t, id, ("%s: the task function cannot be received by worker %s: %s"):format(t.kind, me, why))
    end
    if t.t then  -- alone, under its timeout: the supervisor reads what it runs from NS:running
      flush()
      must(r:call("HSET", keys.running(me), "id", id, "m", m, "s", signer:sign(keys.running(me), m)))
      deadline_cell[1] = now() + t.t
    end
    local h, out = run_task(t, items, f, me)
    deadline_cell[1] = 0
    add(t.c, result_frame(h, out, t.kind, t.i), id)
    if t.t then flush { "DEL", keys.running(me) } end
  end

  -- tasks held by consumers whose heartbeat lapsed: claimed and run here, one at a time
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
          local c = must(r:entries(signer, keys.tasks, "XCLAIM", keys.tasks, S.GROUP, me, 500, id))
          if c and c.n >= 2 and c[1] then
            handle(c[1], c[2], deliveries + 1)
            flush()
          end
        end
      end
    end
  end

  -- entries this consumer read but will not start (its batch ran long): back to the
  -- stream for the others, as new entries (the copy first: a crash between repeats them)
  local function give_back(rep, from)
    local cmds, ids = {}, {}
    for k = from, rep.n - 1, 2 do
      local id, m = rep[k], rep[k + 1]
      if m then cmds[#cmds + 1] = { "XADD", keys.tasks, "*", "m", m, "s", signer:sign(keys.tasks, m) }
      else cmds[#cmds + 1] = { "INCR", keys.bad } end   -- (a bad one is dropped, and counted)
      ids[#ids + 1] = id
    end
    cmds[#cmds + 1] = { "XACK", keys.tasks, S.GROUP, unpack(ids) }
    cmds[#cmds + 1] = { "XDEL", keys.tasks, unpack(ids) }
    must(r:pipeline(cmds))
  end

  local last_reclaim = 0
  while true do
    if now() - last_reclaim >= S.RECLAIM_EVERY then
      last_reclaim = now()
      reclaim()
    end
    local count = math.max(1, math.min(S.BATCH_MAX, math.floor(S.BATCH_TIME / (per_byte * size))))
    local rep = must(r:entries(signer, keys.tasks, "XREADGROUP", "GROUP", S.GROUP, me, "COUNT", count,
      "BLOCK", S.BLOCK_MS, "STREAMS", keys.tasks, ">"))
    if rep == nil then
      -- the group is gone (the stream was deleted): make it again
      S.ensure_group(r, keys)
    elseif rep and rep.n > 0 then
      -- more than BATCH_TIME of guessed work (big messages after small ones): the rest goes
      -- back at once, for idle consumers
      local guess, keep = 0, rep.n
      for k = 1, rep.n - 1, 2 do
        local m = rep[k + 1]
        if m then
          if guess > 0 and guess + per_byte * #m > S.BATCH_TIME then
            give_back(rep, k)
            keep = k - 1
            size = #m
            break
          end
          guess = guess + per_byte * #m
        end
      end
      local t0 = now()
      local last = t0
      for k = 1, keep - 1, 2 do
        if k > 1 and now() - t0 > S.BATCH_TIME then
          flush()  -- results wait at most about BATCH_TIME
          -- guessed wrong (small messages that run long): the rest goes back
          if now() - t0 > 2 * S.BATCH_TIME then give_back(rep, k) break end
          t0 = now()
        end
        local m = rep[k + 1]
        handle(rep[k], m, 1)
        local t = now()
        if m then
          per_byte = 0.7 * per_byte + 0.3 * (t - last) / #m
          size = 0.7 * size + 0.3 * #m
        end
        last = t
      end
      flush()
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
  local signer = core.signer(key)
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
    if f.m and f.s and signer:verify(keys.running(s.name), f.m, f.s) then
      local good, t = pcall(core.stream_unframe, f.m)
      if good and type(t) == "table" and type(t.c) == "string" then
        local text = ("%s: task timed out after %gs (item %d); worker %s was killed"):format(t.kind, t.t, t.i, s.name)
        local m = core.stream_frame({ k = t.k, j = t.j, w = s.name, n = 0, fault = text }, {}, 1, 0)
        local res = keys.res(t.c)
        r:pipeline {
          { "XADD", res, "*", "m", m, "s", signer:sign(res, m) }, { "PEXPIRE", res, S.RESULT_TTL },
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
