-- stream_pool.lua: mp.Pool{backend = "redis://...", key_file = PATH}, the Pool's methods over
-- Redis Streams: tasks go to a stream read by a consumer group of mp-workers on any number of
-- machines, results come back on a stream of this client's own. The protocol is in stream.lua;
-- docs/distributed.md tells the whole story.
local core = require "multiprocessing.core"
local S = require "multiprocessing.stream"
local process = require "multiprocessing.process"
local progress = require "multiprocessing.progress"

local pack, unpack = table.pack, table.unpack
local now = core.now

local M = {}

local rcall   -- r:call, then the answers of the sends before it (below)

local MAX_CHUNK = 10000
local ITER_CHUNK = 16       -- items per task for an input read from an iterator function
local READ_COUNT = 512

-------------------------------------------------------------------- what may cross machines
-- Handles name shared memory of this machine: they cannot cross. Found here, before any byte
-- leaves, with the path to the value (the codec refuses coroutines and foreign userdata itself).
local function portable(v, path, seen)
  local t = type(v)
  if t == "userdata" then
    local mt = getmetatable(v)
    local name = type(mt) == "table" and mt.__name
    if type(name) == "string" and name:find("^multiprocessing%.") then
      error(("cannot send a %s to another machine (at %s): shared objects live in one machine's memory")
        :format(name:gsub("^multiprocessing%.", ""), path), 0)
    end
  elseif t == "table" then
    if seen[v] then return end
    seen[v] = true
    local mt = getmetatable(v)
    if type(mt) == "table" and mt.__name == "multiprocessing.Pool" then
      error(("cannot send a Pool (at %s): a Pool can only be used by the process that made it"):format(path), 0)
    end
    for k, x in next, v do
      portable(k, path .. "<key>", seen)
      portable(x, ("%s[%s]"):format(path, type(k) == "string" and ("%q"):format(k) or tostring(k)), seen)
    end
  elseif t == "function" then
    if seen[v] then return end
    seen[v] = true
    for i = 1, math.huge do
      local name, x = debug.getupvalue(v, i)
      if not name then break end
      if name ~= "_ENV" then portable(x, ("%s<upvalue %s>"):format(path, name), seen) end
    end
  end
end

-------------------------------------------------------------------- the Pool
local Pool = { __name = "multiprocessing.StreamPool" }
Pool.__index = Pool
M.StreamPool = Pool

local AsyncResult = { __name = "multiprocessing.StreamAsyncResult" }
AsyncResult.__index = AsyncResult

local function lease_loop(u, lease, fnkey)
  local r
  while true do
    if not r then
      local ok, c = pcall(S.connect, u, "Pool")
      if ok then r = c end
    end
    if r and not r:pipeline { { "SET", lease, "1", "PX", S.LEASE_TTL }, { "PEXPIRE", fnkey, S.FN_TTL } } then r = nil end
    core.sleep(S.LEASE_EVERY)
  end
end

local OPTIONS = { backend = true, key_file = true, processes = true, timeout = true }

function M.Pool(opts)
  for k in pairs(opts) do
    if not OPTIONS[k] then error(("bad argument #1 to 'Pool' (unknown option %s)"):format(tostring(k)), 3) end
  end
  local u = S.parse_url(opts.backend, "Pool")
  local key = S.read_key(opts.key_file, "Pool")
  if opts.processes ~= nil and (math.type(opts.processes) ~= "integer" or opts.processes < 1) then
    error("bad argument #1 to 'Pool' (processes must be a positive integer)", 3)
  end
  local t = opts.timeout
  if t ~= nil and (type(t) ~= "number" or not (t > 0)) then
    error("bad argument #1 to 'Pool' (timeout must be a positive number)", 3)
  end
  local keys = S.keys(u.ns)
  local r = S.connect(u, "Pool", t)
  local tmo = (t or 10) + S.BLOCK_MS / 1000
  r:settimeout(tmo)
  local ok, err = S.ensure_group(r, keys)
  if not ok then r:close() error(("Pool: Redis at %s: %s"):format(u.url, tostring(err)), 0) end
  local id = S.me() .. ":" .. (core.random_bytes(6):gsub(".", function(c) return ("%02x"):format(c:byte()) end))
  r:call("SET", keys.client(id), "1", "PX", S.LEASE_TTL)
  local lease = process.Process { target = lease_loop, args = { u, keys.client(id), keys.fn(id) }, daemon = true, name = "Pool-lease" }
  lease:start()
  return setmetatable({
    _r = r, _u = u, _key = core.signer(key), _keys = keys, _id = id, _res = keys.res(id), _last = "0-0",
    _fnkey = keys.fn(id), _fcache = setmetatable({}, { __mode = "k" }), _bytext = {}, _ring = {}, _ringk = 0, _nfid = 0,
    _lease = lease, _owner = core.getpid(), _calls = {}, _ncall = 0, _state = "running",
    _hint = opts.processes, _bad = 0, _sent = {}, _sentj = {}, _sent_lo = 1, _sent_hi = 1, _nsent = 0,
    _tmo = tmo, _tmo_now = tmo, _t = t,
  }, Pool)
end

local function check(self, fname)
  if getmetatable(self) ~= Pool then error(("bad self to '%s' (Pool expected)"):format(fname), 3) end
  if self._owner ~= core.getpid() then error(("cannot %s: a Pool can only be used by the process that made it"):format(fname), 3) end
end

local function check_running(self, fname)
  check(self, fname)
  if self._state ~= "running" then error(("cannot %s: the pool is %s"):format(fname, self._state == "closed" and "closed" or "terminated"), 3) end
end

-- a Redis fault fails every pending call and raises for the one that met it; the connection is
-- made again by the next call that needs it (reconnect)
local function redis_fault(self, fname, why)
  local text = ("%s: Redis at %s: %s"):format(fname, self._u.url, tostring(why))
  self._lost = true
  for id, c in pairs(self._calls) do
    if not c.done then c.err = c.err or text c.done = true end
    self._calls[id] = nil
  end
  error(text, 0)
end

-- a new connection after a fault: what was sent on the old one and not answered is unknown, so
-- the function cache starts again (a blob's HSET may not have arrived)
local function reconnect(self, fname)
  pcall(self._r.close, self._r)
  self._r = S.connect(self._u, fname, self._t)
  self._r:settimeout(self._tmo)
  self._tmo_now = self._tmo
  self._lost = nil
  self._sent, self._sentj, self._sent_lo, self._sent_hi, self._nsent = {}, {}, 1, 1, 0
  self._fcache, self._bytext, self._ring, self._ringk = setmetatable({}, { __mode = "k" }), {}, {}, 0
end

-- the longest a command may wait for its reply: the pool's, or (a call that waits `left` more
-- seconds) left + one blocking read + STALL, so that a stopped server ends the call soon after
-- its own timeout (a lost connection gets the pool's when it is made again)
local function bound(self, left)
  if self._lost then return end
  local want = self._tmo
  if left then want = math.min(want, math.max(left, 0) + S.BLOCK_MS / 1000 + S.STALL) end
  if math.abs(want - self._tmo_now) > 0.05 then
    self._r:settimeout(want)
    self._tmo_now = want
  end
end

-- the number of workers heard from (heartbeat keys), for automatic chunks; counted again
-- after a second
local function workers(self)
  if self._hint then return self._hint end
  if self._nworkers and now() - self._nworkers_at < 1 then return self._nworkers end
  local n, cursor = 0, "0"
  repeat
    local rep = rcall(self, "SCAN", cursor, "MATCH", self._keys.worker("*"), "COUNT", 1000)
    if not rep then break end
    cursor = rep[1]
    n = n + rep[2].n
  until cursor == "0"
  self._nworkers, self._nworkers_at = math.max(n, 1), now()
  return self._nworkers
end

-------------------------------------------------------------------- sending
-- Commands are sent without waiting for Redis's answer (a task entry's id, ...); the
-- answers are read with the next command, in order, and matched here: `_sent` holds the
-- call of a task entry (its chunk number in `_sentj`), false for a command whose answer
-- does not matter.
local function chunk_range(c, j)   -- a call's chunks hold chunksize items, but the last
  local first = (j - 1) * c.chunksize + 1
  return first, math.min(c.chunksize, c.fed - first + 1)
end

local function settle(self)
  local q, qj = self._sent, self._sentj
  if self._nsent == 0 then return end
  local reps, why = self._r:replies()
  if not reps then redis_fault(self, "Pool", why) end
  for k = 1, #reps do
    local lo = self._sent_lo
    local c, j = q[lo], qj[lo]
    q[lo], qj[lo] = nil, nil
    self._sent_lo = lo + 1
    self._nsent = self._nsent - 1
    local id = reps[k]
    if c then
      if type(id) == "string" then
        if c.chunks[j] ~= true and not c.done then c.chunks[j] = id
        elseif c.done and self._r then self._r:send("XDEL", self._keys.tasks, id) self._nsent = self._nsent + 1
          q[self._sent_hi] = false self._sent_hi = self._sent_hi + 1 end
      elseif c.chunks[j] ~= true then
        -- Redis refused the entry (out of memory, a read-only replica...): the chunk fails
        local first, count = chunk_range(c, j)
        c.chunks[j] = true
        c.nreceived = c.nreceived + 1
        for n = first, first + count - 1 do
          c.errs = c.errs or {}
          c.errs[n] = ("%s: Redis at %s refused a task: %s"):format(c.kind, self._u.url, type(id) == "table" and id.err or "no answer")
          if not c.first_err or n < c.first_err then c.first_err = n end
          if c.order then c.order[#c.order + 1] = n end
        end
      end
    end
  end
end

function rcall(self, ...)
  local a, b = self._r:call(...)
  if self._nsent > 0 then pcall(settle, self) end  -- a fault shows in a, b already
  return a, b
end

-- a command whose answer nobody waits for (none on a connection lost: see reconnect)
local function send_quiet(self, ...)
  if self._lost then return end
  local ok, why = self._r:send(...)
  if not ok then redis_fault(self, "Pool", why) end
  self._sent[self._sent_hi] = false
  self._sent_hi = self._sent_hi + 1
  self._nsent = self._nsent + 1
end

-------------------------------------------------------------------- task functions
-- A function goes to NS:fn:CLIENT once, and task messages name it by FID. Encoding it
-- again for every call keeps changed upvalues right; it is skipped when its upvalues are
-- only values that cannot have changed unseen (the local Pool's rule, pool.lua), and the
-- same bytes share one FID (a closure made anew in an apply_async loop). The FN_CACHE
-- newest stay in Redis; an older one goes once no running call needs it.
local FN_CACHE = 16
local plain_upvalues = require("multiprocessing.pool")._plain_upvalues  -- the local Pool's rule
local getupvalue = debug.getupvalue

local function blob_drop(self, b)
  b.freed = true
  self._bytext[b.s] = nil
  if self._r and not self._released then send_quiet(self, "HDEL", self._fnkey, b.fid) end
end

local function cache_blob(self, b)
  b.cached = true
  local k = self._ringk % FN_CACHE + 1
  self._ringk = k
  local old = self._ring[k]
  self._ring[k] = b
  if old and not old.freed then
    old.cached = false
    if old.refs == 0 then blob_drop(self, old) end
  end
end

local function text_blob(self, s)
  local b = self._bytext[s]
  if b then
    if not b.cached then cache_blob(self, b) end
    return b
  end
  self._nfid = self._nfid + 1
  b = { fid = self._nfid, refs = 0, s = s }
  self._bytext[s] = b
  send_quiet(self, "HSET", self._fnkey, b.fid, self._key:sign(self._fnkey .. ":" .. b.fid, s) .. s)
  send_quiet(self, "PEXPIRE", self._fnkey, S.FN_TTL)
  cache_blob(self, b)
  return b
end

local function func_blob(self, f)
  local c = self._fcache[f]
  if c and not c.b.freed and c.plain and plain_upvalues(f, c.ups) then return c.b end
  local s, carries = core.encode_function(f, "the function")
  if c and c.s == s and not c.b.freed then return c.b end
  local b = text_blob(self, s)
  c = { s = s, b = b }
  if not carries and type(f) == "function" and plain_upvalues(f) then
    local ups, i = {}, 1
    while true do
      local name, v = getupvalue(f, i)
      if name == nil then break end
      ups[i] = v
      i = i + 1
    end
    ups.n = i - 1
    c.plain, c.ups = true, ups
  end
  self._fcache[f] = c
  return b
end

local function blob_release(self, c)
  local b = c.blob
  if not b then return end
  c.blob = nil
  b.refs = b.refs - 1
  if b.refs == 0 and not b.cached and not b.freed then blob_drop(self, b) end
end

-------------------------------------------------------------------- task messages
-- the TASK frame of items src[i0 .. i0+n-1] (the call's items first .. first+n-1); an item
-- that cannot cross machines ends the input there, with the path to the value: the items
-- before it still go. Returns the frame and its item count (0: nothing to send).
local function task_frame(self, c, src, i0, n, first)
  local h = { c = self._id, k = c.id, j = c.nchunks + 1, i = first, n = n, kind = c.kind, fid = c.blob.fid, t = c.timeout }
  if c.kind == "apply" then
    local args = src
    h.n = args.n
    local ok, fr = pcall(core.stream_frame, h, args, 1, args.n)
    if ok and fr then return fr, 1 end
    for k = 1, args.n do
      local path = ("args[%d]"):format(k)
      local good, why = pcall(portable, args[k], path, {})
      if good then good, why = pcall(core.encode, args[k], path) end
      if not good then c.input_err, c.input_done = why, true return nil, 0 end
    end
    c.input_err, c.input_done = tostring(fr or "cannot send the arguments"), true
    return nil, 0
  end
  local ok, fr = pcall(core.stream_frame, h, src, i0, n)
  if ok and fr then return fr, n end
  for k = 0, n - 1 do
    local path = ("args[%d]"):format(first + k)
    local v = src[i0 + k]
    local good, why = pcall(portable, v, path, {})
    if good then good, why = pcall(core.encode, v, path) end
    if not good then
      c.input_err, c.input_done = why, true
      if k == 0 then return nil, 0 end
      h.n = k
      return core.stream_frame(h, src, i0, k), k
    end
  end
  c.input_err, c.input_done = tostring(fr or "cannot send the items"), true
  return nil, 0
end

-- reads up to `limit` more items of the call's input into task messages and sends them
local function feed(self, c, limit)
  local stream = self._keys.tasks
  local r = self._r
  while not c.input_done and (limit == nil or c.fed < limit) do
    local first = c.fed + 1
    local src, i0, n
    if c.kind == "apply" then  -- one call: its arguments are the message's payload
      src, i0, n = c.seq, 1, 1
      c.input_done = true
    elseif c.seq then   -- a list: its slices are encoded where they are
      src, i0 = c.seq, first
      n = math.min(c.chunksize, c.seqn - c.fed)
      if c.fed + n >= c.seqn then c.input_done = true end
      if c.kind == "starmap" then
        for k = i0, i0 + n - 1 do
          local tv = type(src[k])
          if tv ~= "table" then
            c.input_done = true
            c.input_err = ("bad item to 'starmap' (table of arguments expected, got %s)"):format(tv)
            n = k - i0
            break
          end
        end
      end
    else
      src, i0, n = {}, 1, 0
      for _ = 1, c.chunksize do
        local ok, more, v = pcall(c.next_item)
        if not ok and process._interrupt_of(more) then error(more, 0) end  -- Ctrl-C: the program's
        if not ok then
          c.input_done = true
          c.input_err = ("%s: the input iterator raised at item %d: %s"):format(c.kind, c.fed + n + 1, tostring(more))
          break
        end
        if not more then c.input_done = true break end
        if c.kind == "starmap" and type(v) ~= "table" then
          c.input_done = true
          c.input_err = ("bad item to 'starmap' (table of arguments expected, got %s)"):format(type(v))
          break
        end
        n = n + 1
        src[n] = v
      end
    end
    if n > 0 then
      local fr
      fr, n = task_frame(self, c, src, i0, n, first)
      if n > 0 then
        c.nchunks = c.nchunks + 1
        c.fed = c.fed + n
        local ok, why = r:send_entry(self._key, stream, fr)
        if not ok then redis_fault(self, c.kind, why) end
        local hi = self._sent_hi
        self._sent[hi], self._sentj[hi] = c, c.nchunks
        self._sent_hi = hi + 1
        self._nsent = self._nsent + 1
      end
    end
  end
  if c.input_done then c.total = c.fed end
end

-------------------------------------------------------------------- receiving
local function item_error(c, n, err)
  c.errs = c.errs or {}
  c.errs[n] = err
  if not c.first_err or n < c.first_err then c.first_err = n end
end

local function finish(self, c)
  if c.done then return end
  if c.input_err and not c.first_err then c.err = c.input_err end
  if c.first_err and c.kind ~= "imap" and c.kind ~= "unordered" then c.err = c.errs[c.first_err] end
  c.done = true
  self._calls[c.id] = nil
  blob_release(self, c)
  if c.bar then c.bar:close() end
  self._cbq = self._cbq or {}
  self._cbq[#self._cbq + 1] = c
end

-- a RESULT frame: header h, values v
local function deliver(self, h, v)
  local c = self._calls[h.k]
  if not c or c.chunks[h.j] == true then return end       -- a call abandoned, or a duplicate
  local j = math.tointeger(h.j)
  if not j or j < 1 or j > c.nchunks then return end
  local first, count = chunk_range(c, j)
  c.chunks[j] = true
  c.nreceived = c.nreceived + 1
  local n = math.min(math.tointeger(h.n) or 0, count)
  local order = c.order   -- (imap and imap_unordered only)
  if n > 0 then
    table.move(v, 1, n, first, c.results)
    if order then
      local arrived = c.arrived
      for i = first, first + n - 1 do
        arrived[i] = true
        order[#order + 1] = i
      end
    end
  end
  c.ndone = c.ndone + n
  if type(h.e) == "table" then
    local i = first + (math.tointeger(h.e.n) or 1) - 1
    item_error(c, i, h.e.err)
    if order then order[#order + 1] = i end
  end
  if h.fault then
    for i = first + n, first + count - 1 do
      if not (c.errs and c.errs[i]) then item_error(c, i, h.fault) if order then order[#order + 1] = i end end
    end
  end
  if c.bar then c.bar:update(c.ndone) end
  if c.input_done and c.nreceived == c.nchunks then finish(self, c) end
end

-- the list of a call's values: its own table the first time (no copy), a copy after
local function results_of(c)
  local n = c.total or c.fed
  if not c.handed then
    c.handed = true
    c.results.n = n
    return c.results
  end
  return table.move(c.results, 1, n, 1, { n = n })
end

local function run_callbacks(self)
  local q = self._cbq
  if not q or #q == 0 then return end
  self._cbq = {}
  for k, c in ipairs(q) do
    local f, arg
    if c.err then f, arg = c.error_callback, c.err
    elseif c.callback then
      f = c.callback
      if c.kind == "apply" then arg = c.results[1] and c.results[1][1] else arg = results_of(c) end
    end
    if f then
      local ok, e = pcall(f, arg)
      if not ok and process._interrupt_of(e) then  -- Ctrl-C: raised; the later callbacks stay queued
        local rest = table.move(q, k + 1, #q, 1, {})
        self._cbq = table.move(self._cbq, 1, #self._cbq, #rest + 1, rest)
        error(e, 0)
      end
      if not ok then io.stderr:write("Pool: a callback raised: ", tostring(e), "\n") end
    end
  end
end

-- the id just after `id` ("ms-seq"): entries before it are the ones read
local function id_after(id)
  local ms, seq = id:match("^(%d+)%-(%d+)$")
  if not ms then return nil end
  return ms .. "-" .. tostring(math.tointeger(tonumber(seq) + 1) or seq)
end

local unframe = core.stream_unframe

-- one read of the result stream, waiting at most `wait` seconds (0: a poll)
local function pump(self, fname, wait)
  if self._lost then reconnect(self, fname) end
  local ms = math.max(0, math.min(S.BLOCK_MS, math.floor((wait or 0) * 1000)))
  local r, res = self._r, self._res
  local rep, why
  if ms > 0 then rep, why = r:entries(self._key, res, "XREAD", "COUNT", READ_COUNT, "BLOCK", ms, "STREAMS", res, self._last)
  else rep, why = r:entries(self._key, res, "XREAD", "COUNT", READ_COUNT, "STREAMS", res, self._last) end
  if self._nsent > 0 then pcall(settle, self) end
  if rep == nil then redis_fault(self, fname, why) end
  if rep and rep.n > 0 then
    for k = 1, rep.n - 1, 2 do
      self._last = rep[k]
      local m, pos = rep[k + 1], 1
      if not m then self._bad = self._bad + 1 end
      while m and pos do
        local ok, h, v, nx = pcall(unframe, m, pos)
        if not ok or type(h) ~= "table" or type(v) ~= "table" then self._bad = self._bad + 1 break end
        deliver(self, h, v)
        pos = nx
      end
    end
    -- the entries read go (the stream is this client's alone)
    local after = id_after(self._last)
    if after then send_quiet(self, "XTRIM", res, "MINID", after) end
  end
  -- lazy inputs: keep the window full
  for _, c in pairs(self._calls) do
    if not c.input_done and c.window and c.fed - c.ndone < c.window then feed(self, c, c.ndone + c.window) end
    if c.input_done and c.nreceived == c.nchunks then finish(self, c) end
  end
end

-- waits until the call c is done (or, c a function, until c()) or the deadline; false on timeout
local function wait_until(self, fname, c, timeout)
  local deadline = timeout and now() + timeout
  local pred = type(c) == "function" and c
  while not (pred and pred() or not pred and c.done) do
    local left = deadline and deadline - now() or S.BLOCK_MS / 1000
    if left <= 0 then bound(self) return false end
    if deadline then bound(self, left) end
    pump(self, fname, left)
    run_callbacks(self)
  end
  bound(self)
  run_callbacks(self)
  return true
end

-------------------------------------------------------------------- calls
local CALL_OPTIONS = { chunksize = true, progress = true, desc = true, timeout = true, callback = true, error_callback = true }

-- a list's length; an iterator function's item reader
local function sequence_of(v, fname)
  if type(v) == "table" then
    local n = v.n or #v
    if n == 0 and next(v) ~= nil then
      error(("bad argument #2 to '%s' (the table has no sequence part; pass a list)"):format(fname), 4)
    end
    return n
  elseif type(v) == "function" then
    return function()
      local x = v()
      if x == nil then return nil end
      return true, x
    end
  end
  error(("bad argument #2 to '%s' (table or iterator function expected, got %s)"):format(fname, type(v)), 4)
end

local function abandon(self, c)
  if c.done then return end
  c.done = true
  self._calls[c.id] = nil
  if not self._released then pcall(blob_release, self, c) end
  if self._r then pcall(settle, self) end   -- the ids of its entries still on their way
  local ids = { "XDEL", self._keys.tasks }
  for _, id in pairs(c.chunks) do if id ~= true then ids[#ids + 1] = id end end
  if #ids > 2 and self._r then pcall(rcall, self, unpack(ids)) end
  if c.bar then c.bar:close() end
end

local NO_OPTIONS = {}

local function start_call(self, kind, fname, f, input, opts, lazy)
  check_running(self, fname)
  if self._lost then reconnect(self, fname) end
  if type(f) ~= "function" and not (getmetatable(f) or {}).__call then
    error(("bad argument #1 to '%s' (function expected, got %s)"):format(fname, type(f)), 3)
  end
  if type(opts) == "number" then opts = { chunksize = opts } end
  opts = opts or NO_OPTIONS
  if type(opts) ~= "table" then error(("bad argument #3 to '%s' (options table expected)"):format(fname), 3) end
  for k in pairs(opts) do
    if not CALL_OPTIONS[k] then error(("bad options to '%s' (unknown option %s)"):format(fname, tostring(k)), 3) end
  end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or not (opts.timeout > 0)) then
    error(("bad options to '%s' (timeout must be a positive number)"):format(fname), 3)
  end
  local cs = opts.chunksize
  if cs ~= nil and (math.type(cs) ~= "integer" or cs < 1) then
    error(("bad options to '%s' (chunksize must be a positive integer)"):format(fname), 3)
  end
  if type(f) ~= "function" or debug.getupvalue(f, 1) ~= nil then
    local ok, why = pcall(portable, f, "the function", {})
    if not ok then error(("%s: %s"):format(fname, why), 3) end
  end
  local next_item, n, seq
  if kind == "apply" then n, seq = 1, input
  elseif type(input) == "table" then n, seq = sequence_of(input, fname), input
  else next_item = sequence_of(input, fname) end
  if not cs then
    if n and n > 1 then cs = math.max(1, math.min(MAX_CHUNK, math.ceil(n / (4 * workers(self)))))
    else cs = n and 1 or ITER_CHUNK end
  end
  local good, blob = pcall(func_blob, self, f)
  if not good then error(("%s: %s"):format(fname, tostring(blob)), 3) end
  blob.refs = blob.refs + 1
  self._ncall = self._ncall + 1
  -- chunks[j]: the entry id of chunk j while it waits in the stream, true once its result came
  local c = {
    id = self._ncall, kind = kind, fname = fname, blob = blob, seq = seq, seqn = n, chunksize = cs,
    fed = 0, nchunks = 0, nreceived = 0, ndone = 0, chunks = {}, results = {},
  }
  if next_item then c.next_item = next_item end
  if opts ~= NO_OPTIONS then
    c.timeout, c.callback, c.error_callback = opts.timeout, opts.callback, opts.error_callback
  end
  if lazy then c.lazy, c.arrived, c.order = true, {}, {} end
  if opts.progress then
    c.bar = progress._bar { total = n, desc = opts.desc, force = opts.progress == "force" }
  end
  self._calls[c.id] = c
  if lazy then c.window = math.max(4 * workers(self) * cs, 1024) end
  feed(self, c, c.window)
  if c.input_done and c.nchunks == 0 then finish(self, c) end
  if c.input_err and not lazy then   -- nothing of a failed call is left to run
    abandon(self, c)
    error(c.input_err, 3)
  end
  return c
end

local function new_result(self, c)
  return setmetatable({ _pool = self, _c = c }, AsyncResult)
end

function Pool:map_async(f, xs, opts) return new_result(self, start_call(self, "map", "map_async", f, xs, opts)) end
function Pool:starmap_async(f, xs, opts) return new_result(self, start_call(self, "starmap", "starmap_async", f, xs, opts)) end
function Pool:apply_async(f, args, opts)
  if args ~= nil and type(args) ~= "table" then error(("bad argument #2 to 'apply_async' (table expected, got %s)"):format(type(args)), 2) end
  local a = args or {}
  return new_result(self, start_call(self, "apply", "apply_async", f, pack(unpack(a, 1, a.n or #a)), opts))
end

function AsyncResult:wait(timeout)
  local c = self._c
  return wait_until(self._pool, c.fname, c, timeout)
end
function AsyncResult:ready()
  local c = self._c
  if not c.done and self._pool._state ~= "terminated" then pump(self._pool, c.fname, 0) run_callbacks(self._pool) end
  return c.done
end
function AsyncResult:successful()
  if not self:ready() then error("the result is not ready", 2) end
  return not self._c.err
end
function AsyncResult:get(timeout)
  local c = self._c
  if not wait_until(self._pool, c.fname, c, timeout) then return nil, "timeout" end
  if c.err then error(c.err, 2) end
  if c.kind == "apply" then
    local r = c.results[1]
    return unpack(r, 1, r.n)
  end
  return results_of(c)
end

function Pool:map(f, xs, opts)
  local c = start_call(self, "map", "map", f, xs, opts)
  wait_until(self, "map", c)
  if c.err then error(c.err, 2) end
  return results_of(c)
end
function Pool:starmap(f, xs, opts)
  local c = start_call(self, "starmap", "starmap", f, xs, opts)
  wait_until(self, "starmap", c)
  if c.err then error(c.err, 2) end
  return results_of(c)
end
function Pool:apply(f, args, opts)
  return self:apply_async(f, args, opts):get()
end

local function iterate(self, kind, fname, f, xs, opts)
  local c = start_call(self, kind, fname, f, xs, opts, true)
  local nexti, pos = 1, 1
  local function step()
    while true do
      if kind == "imap" then
        if c.errs and c.errs[nexti] then abandon(self, c) error(c.errs[nexti], 0) end
        if c.arrived[nexti] then
          local i = nexti
          nexti = nexti + 1
          local v = c.results[i]
          c.results[i] = nil
          return i, v
        end
        if c.input_done and nexti > c.fed then
          if c.input_err then abandon(self, c) error(c.input_err, 0) end
          return nil
        end
      else
        if pos <= #c.order then
          local i = c.order[pos]
          pos = pos + 1
          if c.errs and c.errs[i] then abandon(self, c) error(c.errs[i], 0) end
          local v = c.results[i]
          c.results[i] = nil
          return i, v
        end
        if c.input_done and pos > c.fed then
          if c.input_err then abandon(self, c) error(c.input_err, 0) end
          return nil
        end
      end
      if self._state == "terminated" then error(fname .. ": the pool was terminated", 0) end
      local ok, e = pcall(pump, self, fname, S.BLOCK_MS / 1000)
      if not ok then abandon(self, c) error(e, 0) end
      run_callbacks(self)
    end
  end
  local closer = setmetatable({}, { __close = function() abandon(self, c) end })
  return step, nil, nil, closer
end

function Pool:imap(f, xs, opts) return iterate(self, "imap", "imap", f, xs, opts) end
function Pool:imap_unordered(f, xs, opts) return iterate(self, "unordered", "imap_unordered", f, xs, opts) end

-------------------------------------------------------------------- ending
local function release(self)
  if self._released then return end
  self._released = true
  if self._lease then
    pcall(self._lease.kill, self._lease)
    pcall(self._lease.join, self._lease)
    pcall(self._lease.close, self._lease)
  end
  if self._r then
    pcall(self._r.pipeline, self._r, { { "DEL", self._keys.client(self._id) }, { "DEL", self._res }, { "DEL", self._fnkey } })
    self._r:close()
  end
end

function Pool:close()
  check(self, "close")
  if self._state == "running" then self._state = "closed" end
end

function Pool:join()
  check(self, "join")
  if self._state == "running" then error("cannot join: close or terminate the pool first", 2) end
  if self._state == "closed" then
    wait_until(self, "join", function() return next(self._calls) == nil end)
  end
  release(self)
end

function Pool:terminate()
  check(self, "terminate")
  if self._released then self._state = "terminated" return end
  self._state = "terminated"
  for _, c in pairs(self._calls) do
    abandon(self, c)
    c.err = c.err or (c.fname .. ": the pool was terminated")
  end
  release(self)
end

function Pool:__close()
  if self._owner ~= core.getpid() or self._released then return end
  if self._state == "running" then self._state = "closed" end
  local ok = pcall(self.join, self)
  if not ok then self:terminate() end
end

function Pool:__gc()
  if self._owner == core.getpid() and not self._released then pcall(self.terminate, self) end
end

function Pool:__tostring()
  return ("<Pool backend=%s state=%s>"):format(self._u.url, self._state)
end

-- what the pool counted: messages dropped for a bad signature, calls pending
function Pool:stats()
  check(self, "stats")
  local n = 0
  for _ in pairs(self._calls) do n = n + 1 end
  return { bad_messages = self._bad, pending_calls = n, client = self._id }
end

return M
