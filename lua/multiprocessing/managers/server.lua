-- managers/server.lua: what a Manager's server process holds and does (the objects and their operations).
--
-- manager.lua's serve loop takes one request at a time from the manager's queue and calls
-- ops[name](objs, id, a, b); the result is the answer, put on the reply queue of the client
-- (the process) that asked (S.clients). Synchronization objects (Lock, RLock,
-- Semaphore, BoundedSemaphore, Condition, Event, Barrier) live here too: an operation that must
-- wait returns S.DEFER, keeps the client's reply queue and the request's number in a waiter,
-- and answers later (granted, timed out, or broken). The server is single-threaded, so it never blocks: the
-- loop wakes for the nearest deadline and, while a process holds a lock or waits, every
-- TICK seconds to look for processes that died (a lock held by a dead process is released, the
-- next acquire returns true, "owner died"; a dead waiter is dropped, a dead barrier party
-- breaks the barrier).
local core = require "multiprocessing.core"

local S = { DEFER = setmetatable({}, { __name = "manager's deferred answer" }), TICK = 0.2 }
S.ops = {}
local ops = S.ops
local now = core.now

-- the state of the server (in the server process only): set by S.start
-- S.objs, S.pid, S.reply and S.seq (where the request being served is answered: nil for
-- none), S.syncs (the sync objects), S.types, S.clients
function S.start(objs)
  S.objs, S.pid, S.syncs, S.types = objs, core.getpid(), {}, {}
  S.active, S.next_tick = false, math.huge
  S.clients, S.nclients, S.next_look = {}, 0, math.huge
  S.queue_of = {}  -- pid -> the client's reply queue (what the serve loop looks up)
  S.pools = {}
end

-- a zombie counts as gone
local function pid_alive(pid)
  if not core.kill(pid, 0) then return false end
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("l") or ""
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end
S.pid_alive = pid_alive

local function new_obj(objs, o)
  local id = #objs + 1
  objs[id] = o
  return id
end
S.new_obj = new_obj

------------------------------------------------------------ dicts, lists, sets, values

function ops.new(objs, _, kind, init)
  return new_obj(objs, { kind = kind, data = init or {} })
end
function ops.get(objs, id, k) return objs[id].data[k] end
function ops.set(objs, id, k, v)
  local o = objs[id]
  if o.kind == "list" or o.kind == "Array" then
    local n = #o.data
    if math.type(k) ~= "integer" or k < 1 or k > (o.kind == "list" and n + 1 or n) then
      error(("index out of range (length %d)"):format(n), 0)
    end
  end
  o.data[k] = v
end
function ops.len(objs, id)
  local o = objs[id]
  local d = o.data
  if o.kind == "list" or o.kind == "Array" then return #d end
  local n = 0 for _ in pairs(d) do n = n + 1 end return n
end
function ops.copy(objs, id) return objs[id].data end
function ops.pop(objs, id, k, default)
  local o = objs[id]
  local d = o.data
  if o.kind == "list" then
    local n = #d
    if n == 0 then error("pop from an empty list", 0) end
    k = k or n
    if k < 0 then k = n + k + 1 end
    if k < 1 or k > n then error(("pop index out of range (length %d)"):format(n), 0) end
    return table.remove(d, k)
  elseif o.kind == "set" then
    local v = next(d)
    if v == nil then error("pop from an empty set", 0) end
    d[v] = nil
    return v
  end
  local v = d[k]
  if v == nil then
    if default == nil then error("no such key", 0) end
    return default
  end
  d[k] = nil
  return v
end
function ops.append(objs, id, v) local d = objs[id].data d[#d + 1] = v end
function ops.insert(objs, id, i, v)
  local d = objs[id].data
  local n = #d
  if i < 1 or i > n + 1 then error(("index out of range (length %d)"):format(n), 0) end
  table.insert(d, i, v)
end
function ops.update(objs, id, t)
  local o = objs[id]
  local d = o.data
  if o.kind == "set" then for _, v in ipairs(t) do d[v] = true end return end
  for k, v in pairs(t) do d[k] = v end
end
function ops.extend(objs, id, t) local d = objs[id].data for i = 1, #t do d[#d + 1] = t[i] end end
function ops.clear(objs, id) objs[id].data = {} end
-- f(old) -> new, atomically (f travels as a closure)
function ops.update_with(objs, id, k, f)
  local d = objs[id].data
  d[k] = f(d[k])
  return d[k]
end

-- i, j as string.sub takes them (1-based, inclusive, negative from the end)
local function range(n, i, j)
  i, j = i or 1, j or -1
  if i < 0 then i = math.max(n + i + 1, 1) elseif i == 0 then i = 1 end
  if j < 0 then j = n + j + 1 elseif j > n then j = n end
  return i, j
end
function ops.slice(objs, id, i, j)
  local d, t = objs[id].data, {}
  i, j = range(#d, i, j)
  for x = i, j do t[#t + 1] = d[x] end
  return t
end
function ops.count(objs, id, v)
  local c = 0
  for _, x in ipairs(objs[id].data) do if x == v then c = c + 1 end end
  return c
end
local function find(d, v, i, j)
  i, j = range(#d, i, j)
  for x = i, j do if d[x] == v then return x end end
end
function ops.index(objs, id, v, ij)
  local x = find(objs[id].data, v, ij and ij[1], ij and ij[2])
  if not x then error("the value is not in the list", 0) end
  return x
end
function ops.contains(objs, id, v)
  local o = objs[id]
  if o.kind == "list" or o.kind == "Array" then return find(o.data, v) ~= nil end
  return o.data[v] ~= nil
end
function ops.remove(objs, id, v)
  local o = objs[id]
  if o.kind == "set" then
    if o.data[v] == nil then error("the value is not in the set", 0) end
    o.data[v] = nil
    return
  end
  local x = find(o.data, v)
  if not x then error("the value is not in the list", 0) end
  table.remove(o.data, x)
end
function ops.discard(objs, id, v) objs[id].data[v] = nil end
function ops.add(objs, id, v) objs[id].data[v] = true end
function ops.reverse(objs, id)
  local d = objs[id].data
  local n = #d
  for x = 1, n // 2 do d[x], d[n - x + 1] = d[n - x + 1], d[x] end
end
function ops.sort(objs, id, cmp) table.sort(objs[id].data, cmp) end
function ops.popitem(objs, id)
  local d = objs[id].data
  local k, v = next(d)
  if k == nil then error("the dictionary is empty", 0) end
  d[k] = nil
  return { k, v }
end
function ops.setdefault(objs, id, k, default)
  local d = objs[id].data
  if d[k] == nil then d[k] = default end
  return d[k]
end
function ops.fromkeys(objs, id, keys, v)
  local d = objs[id].data
  for _, k in ipairs(keys) do d[k] = v end
end
function ops.keys(objs, id)
  local t = {}
  for k in pairs(objs[id].data) do t[#t + 1] = k end
  return t
end
function ops.values(objs, id)
  local t = {}
  for _, v in pairs(objs[id].data) do t[#t + 1] = v end
  return t
end
function ops.items(objs, id)
  local t = {}
  for k, v in pairs(objs[id].data) do t[#t + 1] = { k, v } end
  return t
end

------------------------------------------------------------ user types (Manager:register)

function ops.register(_, _, typename, t)
  local exposed
  if t.exposed then
    exposed = {}
    for _, name in ipairs(t.exposed) do exposed[name] = true end
  end
  S.types[typename] = { ctor = t.ctor, exposed = exposed }
end
function ops.new_user(objs, _, typename, args)
  local ty = S.types[typename]
  if not ty then error("no type " .. typename .. " is registered", 0) end
  local obj = ty.ctor(table.unpack(args, 1, args.n))
  if obj == nil then error("the constructor of " .. typename .. " returned nil", 0) end
  return new_obj(objs, { kind = "user", type = typename, data = obj })
end
function ops.callmethod(objs, id, name, args)
  local o = objs[id]
  local ty, obj = S.types[o.type], o.data
  if ty.exposed and not ty.exposed[name] then
    error(("%s does not expose a method %s"):format(o.type, name), 0)
  end
  local ok, f = pcall(function() return obj[name] end)
  if not ok or f == nil or name:sub(1, 1) == "_" then
    error(("%s has no method %s"):format(o.type, name), 0)
  end
  return table.pack(f(obj, table.unpack(args, 1, args.n)))
end

------------------------------------------------------------ synchronization objects

-- something to watch from now on: a holder (deadline nil) or a waiter's deadline
function S.watch(deadline)
  S.active = true
  deadline = deadline or now() + S.TICK
  if deadline < S.next_tick then S.next_tick = deadline end
end

-- a waiter for the request being served; a = { pid = ..., timeout = ... }
local function waiter(a, timeout)
  if not S.reply then error("this operation waits, so it needs an answer", 0) end
  local w = { pid = a.pid, reply = S.reply, seq = S.seq, deadline = timeout and now() + timeout }
  S.watch(w.deadline)
  return w
end

-- answers a waiter (its process may be gone, its reply queue closed: then the answer is dropped)
local function answer(w, ok, v)
  pcall(w.reply.put, w.reply, { ok, v, w.seq })
end

-- a waiter dropped unanswered (its process died, or it withdrew)
local function drop() end
S.waiter, S.answer = waiter, answer

local function new_sync(objs, o)
  local id = new_obj(objs, o)
  S.syncs[#S.syncs + 1] = o
  return id
end

-- the next live waiter of list ws, taken from it
local function next_waiter(ws)
  while #ws > 0 do
    local w = table.remove(ws, 1)
    if pid_alive(w.pid) then return w end
    drop(w)
  end
end

-- Lock and RLock: owner (a pid), count (levels), waiters; died: the last owner died holding it
local function grant(o)
  while o.owner == nil do
    local w = next_waiter(o.waiters)
    if not w then return end
    o.owner, o.count, o.grant_seq = w.pid, w.count or 1, w.seq
    local r = w.result
    if r == nil then r = true end
    if o.died and w.count == nil then r = "owner died" end
    o.died = false
    answer(w, true, r)
  end
end

local function owner_gone(o)
  o.owner, o.count, o.died = nil, 0, true
  grant(o)
end

function ops.new_lock(objs, _, kind)
  return new_sync(objs, { kind = kind, count = 0, waiters = {} })
end

local function lock_acquire(o, a)
  if o.owner ~= nil and o.owner ~= a.pid and not pid_alive(o.owner) then owner_gone(o) end
  if o.owner == nil then
    o.owner, o.count = a.pid, 1
    S.watch()
    if o.died then o.died = false return "owner died" end
    return true
  end
  if o.owner == a.pid then
    if o.kind == "RLock" then o.count = o.count + 1 return true end
    if a.blocking ~= false and a.timeout == nil then
      error("deadlock: this process already holds the Lock", 0)
    end
  end
  if a.blocking == false or (a.timeout and a.timeout <= 0) then return false end
  o.waiters[#o.waiters + 1] = waiter(a, a.timeout)
  return S.DEFER
end

local function lock_release(o, a)
  if o.owner == nil then error("release of an unlocked " .. o.kind, 0) end
  if o.owner ~= a.pid then error(("cannot release: the %s is not held by this process"):format(o.kind), 0) end
  o.count = o.count - 1
  if o.count == 0 then
    o.owner = nil
    grant(o)
  end
end

-- the lock of a Condition is a Lock or RLock object of the same manager
local function lock_of(o) return o.lock or o end

function ops.acquire(objs, id, a)
  local o = objs[id]
  if o.kind == "Semaphore" or o.kind == "BoundedSemaphore" then
    if o.value > 0 then o.value = o.value - 1 return true end
    if a.blocking == false or (a.timeout and a.timeout <= 0) then return false end
    o.waiters[#o.waiters + 1] = waiter(a, a.timeout)
    return S.DEFER
  end
  return lock_acquire(lock_of(o), a)
end

function ops.release(objs, id, a)
  local o = objs[id]
  if o.kind == "Semaphore" or o.kind == "BoundedSemaphore" then
    local n = a.n or 1
    if o.kind == "BoundedSemaphore" and o.value + n > o.initial then
      error("BoundedSemaphore released too many times", 0)
    end
    o.value = o.value + n
    while o.value > 0 do
      local w = next_waiter(o.waiters)
      if not w then break end
      o.value = o.value - 1
      answer(w, true, true)
    end
    return
  end
  lock_release(lock_of(o), a)
end

function ops.sync_state(objs, id, a)
  local o = objs[id]
  if o.kind == "Lock" or o.kind == "RLock" then
    return { locked = o.owner ~= nil, owned = o.owner == a.pid, owner = o.owner, count = o.count }
  elseif o.kind == "Semaphore" or o.kind == "BoundedSemaphore" then
    return { value = o.value }
  elseif o.kind == "Event" then
    return { set = o.flag }
  elseif o.kind == "Barrier" then
    return { parties = o.parties, n_waiting = #o.waiting, broken = o.broken }
  end
  return {}
end

-- a cancelled wait (the caller was interrupted): drop its waiter, or undo what it was given
function ops.cancel(objs, id, a)
  local o = objs[id]
  for _, ws in ipairs { o.waiters or {}, o.lock and o.lock.waiters or {}, o.waiting or {} } do
    for i, w in ipairs(ws) do
      if w.pid == a.pid and w.seq == a.seq then table.remove(ws, i) drop(w) return end
    end
  end
  local l = lock_of(o)
  if l.owner == a.pid and l.grant_seq == a.seq then lock_release(l, a) end
end

function ops.new_semaphore(objs, _, kind, value)
  return new_sync(objs, { kind = kind, value = value, initial = value, waiters = {} })
end

function ops.new_event(objs)
  return new_sync(objs, { kind = "Event", flag = false, waiters = {} })
end
function ops.event_set(objs, id)
  local o = objs[id]
  o.flag = true
  for _, w in ipairs(o.waiters) do answer(w, true, true) end
  o.waiters = {}
end
function ops.event_clear(objs, id) objs[id].flag = false end
function ops.wait(objs, id, a)
  local o = objs[id]
  if o.kind == "Event" then
    if o.flag then return true end
    if a.timeout and a.timeout <= 0 then return false end
    o.waiters[#o.waiters + 1] = waiter(a, a.timeout)
    return S.DEFER
  elseif o.kind == "Condition" then
    local l = o.lock
    if l.owner ~= a.pid then error("cannot wait on an un-acquired lock", 0) end
    local w = waiter(a, a.timeout)
    w.count = l.count
    o.waiters[#o.waiters + 1] = w
    l.owner, l.count = nil, 0
    grant(l)
    return S.DEFER
  end
  -- Barrier
  if o.broken then error(o.broken, 0) end
  local last = #o.waiting
  if last < o.parties - 1 then
    o.waiting[#o.waiting + 1] = waiter(a, a.timeout or o.timeout)
    return S.DEFER
  end
  for _, w in ipairs(o.waiting) do
    if not pid_alive(w.pid) then
      S.break_barrier(o, ("broken barrier (pid %d died while waiting)"):format(w.pid))
      error(o.broken, 0)
    end
  end
  if o.action then
    local ok, err = pcall(o.action)
    if not ok then
      S.break_barrier(o, "broken barrier")
      error(err, 0)
    end
  end
  for i, w in ipairs(o.waiting) do answer(w, true, i - 1) end
  o.waiting = {}
  return last
end

-- Condition: its lock, and its waiters (each keeps the levels of the lock it gave up)
function ops.new_condition(objs, _, lock_id)
  local l = lock_id and objs[lock_id]
  if lock_id and not (l and (l.kind == "Lock" or l.kind == "RLock")) then
    error("the lock of a Condition must be a Lock or RLock of the same manager", 0)
  end
  if not l then l = objs[ops.new_lock(objs, nil, "RLock")] end
  return new_sync(objs, { kind = "Condition", lock = l, waiters = {} })
end
-- moves a Condition waiter to its lock's queue: it answers `result` once it has the lock again
local function requeue(o, w, result)
  w.deadline, w.result = nil, result
  local l = o.lock
  l.waiters[#l.waiters + 1] = w
  grant(l)
end
function ops.notify(objs, id, a)
  local o = objs[id]
  if o.lock.owner ~= a.pid then error("cannot notify on an un-acquired lock", 0) end
  local n = a.n or 1
  while n > 0 do
    local w = next_waiter(o.waiters)
    if not w then break end
    requeue(o, w, true)
    n = n - 1
  end
end

-- Barrier: parties, action (run on the server by the last to arrive), default timeout
function ops.new_barrier(objs, _, parties, t)
  return new_sync(objs, { kind = "Barrier", parties = parties, action = t.action, timeout = t.timeout,
    waiting = {}, broken = false })
end
function S.break_barrier(o, why)
  o.broken = why
  for _, w in ipairs(o.waiting) do answer(w, false, why) end
  o.waiting = {}
end
function ops.abort(objs, id) S.break_barrier(objs[id], "broken barrier") end
function ops.reset(objs, id)
  local o = objs[id]
  S.break_barrier(o, "broken barrier")
  o.broken = false
end

------------------------------------------------------------ clients

-- A client is a process that waits for answers: its first such request carries its reply
-- queue (and its pid), the later ones its pid alone. The queue is kept, with a pidfd of the
-- client (core.sentinel) to see its death, until the client ends; then the server closes its
-- handle, and the queue is freed once the client's handle is gone too (closed, or given back
-- by the client's ledger however it ended: docs/arena.md). LOOK: how often dead clients are
-- looked for.
S.LOOK = 1

-- the reply queue of client pid, given with its request: kept from now on (a new client
-- is a moment to let go of those that ended: a program that starts a process per job
-- keeps one queue, not one per second)
function S.register(q, pid)
  if S.nclients > 0 then S.look() end
  local c = S.clients[pid]
  if c then
    if c.q == q then q:close() return c.q end  -- sent again (its first call was cut short)
    S.forget(pid)  -- the pid of a process that ended, reused by a new client
  end
  local s = core.sentinel(pid)  -- nil without pidfds (valgrind): pid_alive then
  S.clients[pid] = { q = q, sentinel = s, fd = s and s:fileno() }
  S.queue_of[pid] = q
  S.nclients = S.nclients + 1
  if S.nclients == 1 then S.next_look = now() + S.LOOK end
  return q
end

-- lets go of client pid's reply queue (the client ended, or the server stops)
function S.forget(pid)
  local c = S.clients[pid]
  S.clients[pid], S.queue_of[pid] = nil, nil
  S.nclients = S.nclients - 1
  c.q:close()
  if c.sentinel then c.sentinel:close() end
  if S.nclients == 0 then S.next_look = math.huge end
end

-- the clients that ended let go of (one poll for all)
function S.look()
  local fds, pids, dead = {}, {}, {}
  for pid, c in pairs(S.clients) do
    if c.fd then fds[#fds + 1], pids[#fds + 1] = c.fd, pid
    elseif not pid_alive(pid) then dead[#dead + 1] = pid end
  end
  if #fds > 0 then
    local ready = core.poll_fds(fds, 0)
    if type(ready) == "table" then for _, i in ipairs(ready) do dead[#dead + 1] = pids[i] end end
  end
  for _, pid in ipairs(dead) do S.forget(pid) end
  S.next_look = S.nclients > 0 and now() + S.LOOK or math.huge
end

-- the server stops: every client's reply queue let go (a live client's stays until it ends)
function S.stop()
  S.stop_pools()
  for pid in pairs(S.clients) do S.forget(pid) end
end

------------------------------------------------------------ deadlines and dead processes

-- wakes the waiters whose deadline passed and looks for dead holders and waiters; sets
-- S.active (something to watch) and S.next_tick (when to look again)
function S.tick()
  local t = now()
  local alive = {}
  local function live(pid)
    local v = alive[pid]
    if v == nil then v = pid_alive(pid) alive[pid] = v end
    return v
  end
  local active, next_tick = false, t + S.TICK
  -- removes from ws the waiters that are gone or past their deadline (calling late(w))
  local function sweep(ws, late)
    local i = 1
    while i <= #ws do
      local w = ws[i]
      if not live(w.pid) then table.remove(ws, i) drop(w)
      elseif w.deadline and w.deadline <= t then table.remove(ws, i) late(w)
      else
        if w.deadline and w.deadline < next_tick then next_tick = w.deadline end
        i = i + 1
      end
    end
    if #ws > 0 then active = true end
  end
  for _, o in ipairs(S.syncs) do
    local k = o.kind
    if k == "Lock" or k == "RLock" then
      sweep(o.waiters, function(w) answer(w, true, false) end)
      if o.owner ~= nil then
        if not live(o.owner) then owner_gone(o) end
        if o.owner ~= nil then active = true end
      end
    elseif k == "Semaphore" or k == "BoundedSemaphore" or k == "Event" then
      sweep(o.waiters, function(w) answer(w, true, false) end)
    elseif k == "Condition" then
      sweep(o.waiters, function(w) requeue(o, w, false) end)
    elseif k == "Barrier" then
      for _, w in ipairs(o.waiting) do
        if not live(w.pid) then
          S.break_barrier(o, ("broken barrier (pid %d died while waiting)"):format(w.pid))
          break
        elseif w.deadline and w.deadline <= t then
          S.break_barrier(o, "broken barrier")
          break
        elseif w.deadline and w.deadline < next_tick then next_tick = w.deadline
        end
      end
      if #o.waiting > 0 then active = true end
    end
  end
  S.active, S.next_tick = active, active and next_tick or math.huge
end

require "multiprocessing.managers.pool" (S)

return S
