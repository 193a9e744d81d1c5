-- manager.lua: Manager, a server process holding objects (dicts, lists, locks...) that every process can use.
--
-- Proxies are plain tables with a registered metatable, so they travel through
-- the codec to any process (started before or after them). Each operation is
-- one request on the manager's queue, answered on the reply queue of the process
-- that asked (its session, made on its first call that waits for an answer and
-- sent with that call): operations are atomic, and the objects live as long as the
-- manager. Each request carries a number that its answer repeats, so the late answer
-- of a call given up (Ctrl-C) is dropped by the next call, never taken for its own.
-- A reply queue is an ordinary Queue with two counted handles, the client's and the
-- server's, each given back by its process's close or, however it ended, by its ledger
-- (docs/arena.md); the server keeps its handle until it sees the client end (a pidfd) or it
-- stops (managers/server.lua).
-- Operations that cannot fail on the server (a dict's d[k] = v, a list's append, a set's
-- add) are sent without waiting for an answer: the manager's queue is one FIFO, so every later
-- request, of this process or of any process it tells, is served after them.
-- What the server holds and does is in managers/server.lua; the proxies are below.
local core = require "multiprocessing.core"
local process = require "multiprocessing.process"
local S = require "multiprocessing.managers.server"

local M = {}

local Manager = { __name = "multiprocessing.Manager" }
Manager.__index = Manager
local DictProxy = { __name = "multiprocessing.DictProxy" }
local ListProxy = { __name = "multiprocessing.ListProxy" }
local dict_methods, list_methods = {}, {}

------------------------------------------------------------------ the server

local ops = S.ops

-- A request: { op, client, id, a, b, seq [, pid] }. client: false (no answer wanted), the
-- pid of a client whose reply queue the server has, or the reply queue itself (the client's
-- first request, with its pid at [7]). The answer: { ok, value, seq }.
local function serve(requests)
  local objs = {}
  S.start(objs)
  local now, queue_of, DEFER, huge = core.now, S.queue_of, S.DEFER, math.huge
  local get, put = requests.get, requests.put  -- (every Queue's methods)
  local t = now()
  while true do
    -- while a process holds a lock or waits, wake for the next deadline; while clients
    -- are known, look for those that ended now and then
    local req
    local due = S.next_look
    if S.active and S.next_tick < due then due = S.next_tick end
    if S.next_poll < due then due = S.next_poll end
    if due < huge then req = get(requests, due > t and due - t or 0) else req = get(requests) end
    if type(req) == "table" then
      local op, client, id = req[1], req[2], req[3]
      if op == "stop" then S.stop() return end
      local reply
      if client then
        if math.type(client) == "integer" then
          reply = queue_of[client]
        else
          local registered, q = pcall(S.register, client, req[7])
          reply = registered and q or nil
        end
      end
      local f = ops[op]
      local ok, v
      if not f then
        ok, v = false, "unknown manager operation " .. tostring(op)
      elseif id ~= nil and not objs[id] and op ~= "new" then
        ok, v = false, "the manager has no object " .. tostring(id)
      else
        S.reply, S.seq = reply, req[6]
        ok, v = pcall(f, objs, id, req[4], req[5])
      end
      -- no reply queue: a request sent without waiting; DEFER: a waiter answers later
      if reply and v ~= DEFER then
        local sent, err = pcall(put, reply, { ok, v, req[6] })
        if not sent then pcall(put, reply, { false, tostring(err), req[6] }) end
      end
    end
    t = now()
    if S.active and t >= S.next_tick then S.tick() end
    if t >= S.next_poll then S.poll() end
    if t >= S.next_look then S.look() end
  end
end

------------------------------------------------------------------ the client

-- The number of this process's last request (each reply carries the number of the request
-- it answers).
local reqno = 0
local getpid = core.getpid

-- This process's session with each manager (by the server's pid): its reply queue, and
-- whether the server has it (it answered once on it). A forked child makes its own. A
-- session lives while a proxy of its manager does in this process (then its queue is closed
-- by the collector), or until the manager is shut down or found gone.
local sessions = setmetatable({}, { __mode = "v" })
local session_of = setmetatable({}, { __mode = "k" })  -- a proxy's manager table -> its session

local function session(mgr)
  local s = session_of[mgr]
  local pid = getpid()
  if s and s.pid == pid and s.reply then return s end
  s = sessions[mgr._pid]
  if not (s and s.pid == pid and s.requests == mgr._requests) then
    s = { pid = pid, reply = core.Queue(), requests = mgr._requests, known = false }
    sessions[mgr._pid] = s
  end
  session_of[mgr] = s
  return s
end

-- the manager is gone (its process ended): its session too. This process closes its own
-- handle of the queue, nothing more: the server's was closed by the server, or (a server
-- killed holding it) is given back by the server's ledger once it is found dead.
local function end_session(mgr)
  local s = sessions[mgr._pid]
  if s and s.pid == getpid() and s.reply then
    sessions[mgr._pid] = nil
    s.reply:close()
    s.reply = nil
  end
end

local server_alive = S.pid_alive  -- a zombie counts as gone

-- what the arguments of an operation are, for the codec's "at value[4]" and "at value[5]"
local function arg_names(op, p, a)
  local who = p and tostring(p) or "the manager"
  if op == "set" then
    local k = type(a) == "string" and ("%q"):format(a) or tostring(a)
    return "the key set in " .. who, who .. "[" .. k .. "]"
  elseif op == "new" then
    return "the kind", "the table given to the new " .. tostring(a)
  end
  return ("the first argument of %s on %s"):format(op, who), ("the second argument of %s on %s"):format(op, who)
end

local function call(mgr, op, id, a, b, p)
  local s = session_of[mgr]
  if not (s and s.reply and s.pid == getpid()) then s = session(mgr) end
  local reply = s.reply
  reqno = reqno + 1
  local no = reqno
  local req
  if s.known then req = { op, s.pid, id, a, b, no } else req = { op, reply, id, a, b, no, s.pid } end
  local sent, err = pcall(mgr._requests.put, mgr._requests, req)
  if not sent then  -- name the user's value, not our request's layout
    local n4, n5 = arg_names(op, p, a)
    err = tostring(err):gsub("^[^\n]-manager%.lua:%d+: ", "")
      :gsub("at value%[4%]", function() return "at " .. n4 end)
      :gsub("at value%[5%]", function() return "at " .. n5 end)
    error(err, 3)
  end
  local res
  while true do
    local why
    res, why = reply:get(0.25)  -- a manager that died is noticed within a second
    if res ~= nil then
      s.known = true  -- the server took the queue (the late reply of an abandoned call too)
      if res[3] == no then break end  -- else: the late reply of an abandoned call
    elseif why == "interrupted" then error("interrupted!", 0)
    elseif not server_alive(mgr._pid) then end_session(mgr) error("the manager process is gone", 3) end
  end
  if not res[1] then error(res[2], 3) end
  return res[2]
end

--- mp.Manager(): starts the manager's server process
function M.Manager()
  local requests = core.Queue()
  local proc = process.Process { target = serve, args = { requests }, daemon = true, name = "Manager" }
  proc:start()
  return setmetatable({ _requests = requests, _proc = proc, _pid = proc.pid, _pid_owner = core.getpid() }, Manager)
end

function Manager:shutdown()
  if self._pid_owner ~= core.getpid() or self._stopped then return end
  self._stopped = true
  if self._proc:is_alive() then
    -- the server's exit is the answer
    self._requests:put { "stop" }
    if not self._proc:join(2) then self._proc:kill() self._proc:join() end
  end
  end_session(self)
end
Manager.__close = Manager.shutdown
Manager.__gc = Manager.shutdown

--------------------------------------------------------------- the proxies

-- the name of a proxy in errors: dict, list, set, Namespace, Value, Array, Lock..., or a registered type
local function short(p) return rawget(p, "_kind") or rawget(p, "_type") or getmetatable(p).__short end
local function fmtkey(k)
  if type(k) == "string" then return ("'%s'"):format(k) end
  return tostring(k)
end
-- the user's call: dict['x'], dict['x']:update_with(), list:pop()
local function describe(p, meth, key)
  local who = short(p)
  if meth:sub(1, 1) == "." then return who .. meth end  -- a field: Value.value, Barrier.broken
  if who == "Namespace" and (meth == "get" or meth == "set") then return who .. "." .. tostring(key) end
  if meth == "get" or meth == "set" then return ("%s[%s]"):format(who, fmtkey(key)) end
  if key ~= nil then return ("%s[%s]:%s()"):format(who, fmtkey(key), meth) end
  return ("%s:%s()"):format(who, meth)
end

-- an operation inside the server itself (a proxy stored in a manager object, used by a function
-- that runs there: update_with, sort's cmp, a registered type's method): served directly
local function local_call(name, id, a, b)
  local reply, seq = S.reply, S.seq
  S.reply = nil  -- no reply queue: an operation that would wait raises
  local res = table.pack(pcall(S.ops[name], S.objs, id, a, b))
  S.reply, S.seq = reply, seq
  return res[1], res[2]
end

local function in_server(m) return S.pid and S.pid == m._pid and core.getpid() == S.pid end

-- ok, result or error: one operation on the server
local function try(p, name, a, b)
  local m = p._m
  if S.pid and in_server(m) then return local_call(name, p._id, a, b) end
  return pcall(call, m, name, p._id, a, b, p)
end

-- the level, for error() called here, of the first Lua function outside this file: the
-- user's call (tail calls and metamethods make a fixed level wrong)
local THIS = debug.getinfo(1, "S").source
local function user_level()
  local l = 3
  while true do
    local info = debug.getinfo(l, "S")
    if not info then return 1 end
    if info.source ~= THIS and info.what ~= "C" then return l - 1 end
    l = l + 1
  end
end

-- raises err from operation meth on p at the user's call, naming the call
local function fail(p, err, meth, key)
  if type(err) ~= "string" then error(err, 0) end  -- the user's own error value, intact
  err = err:gsub("^[^\n]-manager%.lua:%d+: ", "")
  if err == "interrupted!" then error(err, 0) end
  error(describe(p, meth, key) .. ": " .. err, user_level())
end

-- one operation, from a method or metamethod called by the user
local function op(p, name, a, b, meth, key)
  local m, ok, r = p._m
  if S.pid and in_server(m) then ok, r = local_call(name, p._id, a, b)
  else ok, r = pcall(call, m, name, p._id, a, b, p) end
  if not ok then fail(p, r, meth or name, key) end
  return r
end

-- an operation that cannot fail on the server, sent without waiting for its answer. The
-- manager's death is looked for at most every 0.1 s here (a full look reads /proc).
local checked = {}  -- manager pid -> when it was last seen alive
local function send(p, name, a, b, meth, key)
  local m = p._m
  if in_server(m) then
    local ok, r = local_call(name, p._id, a, b)
    if not ok then fail(p, r, meth, key) end
    return
  end
  local t = core.now()
  if t - (checked[m._pid] or 0) > 0.1 then
    if not server_alive(m._pid) then fail(p, "the manager process is gone", meth, key) end
    checked[m._pid] = t
  end
  local sent, err = pcall(m._requests.put, m._requests, { name, false, p._id, a, b })
  if not sent then  -- name the user's value, not our request's layout
    local n4, n5 = arg_names(name, p, a)
    err = tostring(err):gsub("^[^\n]-manager%.lua:%d+: ", "")
      :gsub("at value%[4%]", function() return "at " .. n4 end)
      :gsub("at value%[5%]", function() return "at " .. n5 end)
    fail(p, err, meth, key)
  end
end

local function bad_key(p, k)
  if k == nil then fail(p, "a key cannot be nil", "set", k) end
  if k ~= k then fail(p, "a key cannot be NaN", "set", k) end
end

-- a new proxy of class mt for object id of manager mgr (fields: extra ones, e.g. _kind)
local function mk(mgr, mt, id, fields)
  local p = fields or {}
  p._m, p._id = { _requests = mgr._requests, _pid = mgr._pid }, id
  return setmetatable(p, mt)
end

-- a class of proxies: methods, and what p[k] is when k is no method (nil: nothing)
local function class(name, short_name, methods, get)
  local mt = { __name = "multiprocessing." .. name, __short = short_name }
  mt.__index = function(p, k)
    local f = methods[k]
    if f ~= nil then return f end
    if get then return get(p, k) end
  end
  mt.__tostring = function(p) return ("<%s %d of a Manager>"):format(name, p._id) end
  core.register_metatable(mt.__name, mt)
  return mt
end

-- iterators over a copy: pairs(proxy) makes one request
local function ipairs_copy(t)
  return function(c, i) i = i + 1 local v = c[i] if v ~= nil then return i, v end end, t, 0
end

local function totable_of(x)
  local mt = getmetatable(x)
  local kind = mt and mt.__short
  if kind == "list" or kind == "Array" or kind == "dict" then return x:totable() end
  if type(x) ~= "table" then error(("attempt to concatenate a %s value"):format(type(x)), 3) end
  return x
end
-- l .. t, t .. l, l .. l2: a plain table
local function concat(a, b)
  local r, ta, tb = {}, totable_of(a), totable_of(b)
  for i = 1, #ta do r[i] = ta[i] end
  for i = 1, #tb do r[#r + 1] = tb[i] end
  return r
end

local function check_index(p, i, what)
  if math.type(i) ~= "integer" then
    error(("%s: an integer index is required, got %s"):format(describe(p, what), type(i) == "number" and tostring(i) or type(i)), 3)
  end
end

-------------------------------------------------------------------- dict

DictProxy.__short = "dict"
-- p[k]: a method, or the server's value for k
local function index_with(methods)
  return function(p, k)
    local f = methods[k]
    if f then return f end
    return op(p, "get", k, nil, "get", k)
  end
end
DictProxy.__index = index_with(dict_methods)
DictProxy.__newindex = function(p, k, v)
  bad_key(p, k)
  send(p, "set", k, v, "set", k)
end
DictProxy.__len = function(p) return op(p, "len", nil, nil, "len") end
DictProxy.__pairs = function(p) return next, op(p, "copy", nil, nil, "pairs"), nil end
DictProxy.__tostring = function(p) return ("<DictProxy %d of a Manager>"):format(p._id) end

function dict_methods.get(p, k, default)
  local v = op(p, "get", k, nil, "get", k)
  if v == nil then return default end
  return v
end
function dict_methods.set(p, k, v) bad_key(p, k) send(p, "set", k, v, "set", k) end
function dict_methods.totable(p) return op(p, "copy", nil, nil, "totable") end
function dict_methods.pop(p, k, default) return op(p, "pop", k, default, "pop", k) end
function dict_methods.popitem(p)
  local kv = op(p, "popitem", nil, nil, "popitem")
  return kv[1], kv[2]
end
function dict_methods.setdefault(p, k, default) bad_key(p, k) return op(p, "setdefault", k, default, "setdefault", k) end
function dict_methods.fromkeys(p, keys, v)
  if type(keys) ~= "table" then error(("%s: bad argument #1 (table expected, got %s)"):format(describe(p, "fromkeys"), type(keys)), 2) end
  if v == nil then v = true end
  op(p, "fromkeys", keys, v, "fromkeys")
  return p
end
function dict_methods.update(p, t)
  if type(t) ~= "table" then error(("%s: bad argument #1 (table expected, got %s)"):format(describe(p, "update"), type(t)), 2) end
  if getmetatable(t) == DictProxy then t = t:totable() end
  op(p, "update", t, nil, "update")
end
function dict_methods.clear(p) op(p, "clear", nil, nil, "clear") end
function dict_methods.update_with(p, k, f) bad_key(p, k) return op(p, "update_with", k, f, "update_with", k) end
function dict_methods.has(p, k) return op(p, "contains", k, nil, "has", k) end
function dict_methods.keys(p) return op(p, "keys", nil, nil, "keys") end
function dict_methods.values(p) return op(p, "values", nil, nil, "values") end
function dict_methods.items(p) return op(p, "items", nil, nil, "items") end

-------------------------------------------------------------------- list

ListProxy.__short = "list"
ListProxy.__index = index_with(list_methods)
ListProxy.__newindex = function(p, k, v) op(p, "set", k, v, "set", k) end
ListProxy.__len = function(p) return op(p, "len", nil, nil, "len") end
ListProxy.__pairs = function(p) return ipairs_copy(op(p, "copy", nil, nil, "pairs")) end
ListProxy.__concat = concat
ListProxy.__tostring = function(p) return ("<ListProxy %d of a Manager>"):format(p._id) end

function list_methods.append(p, v) send(p, "append", v, nil, "append") end
function list_methods.extend(p, t)
  if type(t) ~= "table" then error(("%s: bad argument #1 (table expected, got %s)"):format(describe(p, "extend"), type(t)), 2) end
  if getmetatable(t) then t = totable_of(t) end
  op(p, "extend", t, nil, "extend")
end
function list_methods.insert(p, i, v) check_index(p, i, "insert") op(p, "insert", i, v, "insert") end
function list_methods.pop(p, i)
  if i ~= nil then check_index(p, i, "pop") end
  return op(p, "pop", i, nil, "pop")
end
function list_methods.totable(p) return op(p, "copy", nil, nil, "totable") end
function list_methods.clear(p) op(p, "clear", nil, nil, "clear") end
function list_methods.slice(p, i, j) return op(p, "slice", i, j, "slice") end
function list_methods.count(p, v) return op(p, "count", v, nil, "count") end
function list_methods.index(p, v, i, j) return op(p, "index", v, { i, j }, "index") end
function list_methods.contains(p, v) return op(p, "contains", v, nil, "contains") end
function list_methods.remove(p, v) op(p, "remove", v, nil, "remove") end
function list_methods.reverse(p) op(p, "reverse", nil, nil, "reverse") end
function list_methods.sort(p, cmp)
  if cmp ~= nil and type(cmp) ~= "function" then
    error(("%s: bad argument #1 (function expected, got %s)"):format(describe(p, "sort"), type(cmp)), 2)
  end
  op(p, "sort", cmp, nil, "sort")
end

-------------------------------------------------------------------- set

local set_methods = {}
local SetProxy = class("SetProxy", "set", set_methods)
SetProxy.__len = function(p) return op(p, "len", nil, nil, "len") end
SetProxy.__pairs = function(p) return next, op(p, "copy", nil, nil, "pairs"), nil end
function set_methods.add(p, v) bad_key(p, v) send(p, "add", v, nil, "add") end
function set_methods.discard(p, v) op(p, "discard", v, nil, "discard") end
function set_methods.remove(p, v) op(p, "remove", v, nil, "remove") end
function set_methods.contains(p, v) return op(p, "contains", v, nil, "contains") end
function set_methods.pop(p) return op(p, "pop", nil, nil, "pop") end
function set_methods.clear(p) op(p, "clear", nil, nil, "clear") end
function set_methods.update(p, t) op(p, "update", t, nil, "update") end
function set_methods.totable(p) return op(p, "copy", nil, nil, "totable") end
function set_methods.values(p) return op(p, "keys", nil, nil, "values") end

-------------------------------------------------------------------- Namespace

local NamespaceProxy = class("NamespaceProxy", "Namespace", {}, function(p, k) return op(p, "get", k, nil, "get", k) end)
NamespaceProxy.__newindex = function(p, k, v) bad_key(p, k) send(p, "set", k, v, "set", k) end
NamespaceProxy.__pairs = function(p) return next, op(p, "copy", nil, nil, "pairs"), nil end
NamespaceProxy.__tostring = function(p)
  local ok, t = try(p, "copy")
  if not ok then return ("<NamespaceProxy %d of a gone Manager>"):format(p._id) end
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = ("%s=%s"):format(tostring(k), type(v) == "string" and ("%q"):format(v) or tostring(v)) end
  table.sort(parts)
  return "Namespace(" .. table.concat(parts, ", ") .. ")"
end

-------------------------------------------------------------------- Value and Array

local INT_CODES = "bBhHiIlLqQ"
local function check_typecode(tc, level)
  if type(tc) ~= "string" or #tc ~= 1 or not (INT_CODES .. "fdcu"):find(tc, 1, true) then
    error(("bad typecode %s (one of b B h H i I l L q Q f d c u)"):format(tostring(tc)), level + 1)
  end
end
-- v as typecode tc stores it; raises at level naming who
local function coerce(tc, v, who, level)
  if INT_CODES:find(tc, 1, true) then
    local i = math.tointeger(v)
    if i then return i end
    error(("%s: an integer is required (typecode '%s'), got %s"):format(who, tc, type(v) == "number" and tostring(v) or type(v)), level + 1)
  elseif tc == "f" or tc == "d" then
    if type(v) == "number" then return v + 0.0 end
    error(("%s: a number is required (typecode '%s'), got %s"):format(who, tc, type(v)), level + 1)
  end
  if type(v) == "string" then return v end
  error(("%s: a string is required (typecode '%s'), got %s"):format(who, tc, type(v)), level + 1)
end

local value_methods = {}
local ValueProxy = class("ValueProxy", "Value", value_methods, function(p, k)
  if k == "value" then return op(p, "get", 1, nil, ".value") end
end)
ValueProxy.__newindex = function(p, k, v)
  if k ~= "value" then error(("Value: no field %s to set (only .value)"):format(tostring(k)), 2) end
  op(p, "set", 1, coerce(p._tc, v, "Value.value", 2), ".value")
end
ValueProxy.__tostring = function(p)
  local ok, v = try(p, "get", 1)
  return ("<ValueProxy('%s', %s) of a Manager>"):format(p._tc, ok and tostring(v) or "?")
end
function value_methods.get(p) return op(p, "get", 1, nil, "get") end
function value_methods.set(p, v) op(p, "set", 1, coerce(p._tc, v, "Value:set()", 2), "set") end

local array_methods = {}
local ArrayProxy = class("ArrayProxy", "Array", array_methods, function(p, k) return op(p, "get", k, nil, "get", k) end)
ArrayProxy.__newindex = function(p, k, v)
  op(p, "set", k, coerce(p._tc, v, describe(p, "set", k), 2), "set", k)
end
ArrayProxy.__len = function(p) return op(p, "len", nil, nil, "len") end
ArrayProxy.__pairs = function(p) return ipairs_copy(op(p, "copy", nil, nil, "pairs")) end
ArrayProxy.__concat = concat
function array_methods.totable(p) return op(p, "copy", nil, nil, "totable") end
function array_methods.slice(p, i, j) return op(p, "slice", i, j, "slice") end
function array_methods.count(p, v) return op(p, "count", v, nil, "count") end
function array_methods.index(p, v, i, j) return op(p, "index", v, { i, j }, "index") end
function array_methods.contains(p, v) return op(p, "contains", v, nil, "contains") end

-------------------------------------------------------------------- synchronization

-- timeout as the sync module takes it: nil forever, negative 0
local function timeout_of(p, meth, t, level)
  if t == nil then return nil end
  if type(t) ~= "number" or t ~= t then
    error(("%s: bad timeout (number expected, got %s)"):format(describe(p, meth), t ~= t and "nan" or type(t)), level + 1)
  end
  return t < 0 and 0 or t
end
local function blocking_args(p, meth, blocking, timeout)
  if type(blocking) == "number" then blocking, timeout = true, blocking end
  return { pid = core.getpid(), blocking = blocking ~= false, timeout = timeout_of(p, meth, timeout, 3) }
end

-- an operation that may wait on the server: interrupted (Ctrl-C), it is cancelled there
local function wait_op(p, name, a, meth)
  a.pid = a.pid or core.getpid()
  local ok, r = try(p, name, a)
  if not ok then
    -- (lua.c's Ctrl-C hook may have raised it, with the place where it struck)
    if type(r) == "string" and r:find("interrupted!$") then pcall(send, p, "cancel", { pid = a.pid, seq = reqno }, nil, "cancel") end
    fail(p, r, meth, nil)
  end
  return r
end

local function guard(lock, ...)
  return setmetatable({ release = function(g)
    if not g.done then g.done = true lock:release() end
  end }, { __close = function(g) g:release() end }), ...
end

local lock_methods = {}
function lock_methods.acquire(p, blocking, timeout)
  local r = wait_op(p, "acquire", blocking_args(p, "acquire", blocking, timeout), "acquire")
  if r == "owner died" then return true, r end
  return r
end
function lock_methods.release(p, n)
  local ok, r = try(p, "release", { pid = core.getpid(), n = n })
  if not ok then fail(p, r, "release", nil) end
end
function lock_methods.hold(p, timeout)
  local ok, why = p:acquire(true, timeout)
  if not ok then error(describe(p, "hold") .. ": timeout", 2) end
  return guard(p, why)
end
function lock_methods.locked(p) return op(p, "sync_state", { pid = core.getpid() }, nil, "locked").locked end
function lock_methods.is_owned(p) return op(p, "sync_state", { pid = core.getpid() }, nil, "is_owned").owned end
function lock_methods.get_value(p) return op(p, "sync_state", {}, nil, "get_value").value end
local LockProxy = class("LockProxy", "Lock", lock_methods)
LockProxy.__tostring = function(p)
  local ok, st = try(p, "sync_state", { pid = core.getpid() })
  if not ok then return ("<%s proxy of a gone Manager>"):format(p._kind) end
  if st.value then return ("<%s proxy (value %d) of a Manager>"):format(p._kind, st.value) end
  return ("<%s proxy (%s) of a Manager>"):format(p._kind,
    st.locked and ("locked by pid %d"):format(st.owner) or "unlocked")
end

local cond_methods = setmetatable({}, { __index = lock_methods })
function cond_methods.wait(p, timeout)
  return wait_op(p, "wait", { timeout = timeout_of(p, "wait", timeout, 2) }, "wait")
end
function cond_methods.wait_for(p, predicate, timeout)
  timeout = timeout_of(p, "wait_for", timeout, 2)
  local deadline = timeout and core.now() + timeout
  local r = predicate()
  while not r do
    local left = deadline and deadline - core.now()
    if left and left <= 0 then break end
    p:wait(left)
    r = predicate()
  end
  return r
end
function cond_methods.notify(p, n) op(p, "notify", { pid = core.getpid(), n = n or 1 }, nil, "notify") end
function cond_methods.notify_all(p) op(p, "notify", { pid = core.getpid(), n = math.huge }, nil, "notify_all") end
local ConditionProxy = class("ConditionProxy", "Condition", cond_methods)

local event_methods = {}
function event_methods.set(p) op(p, "event_set", nil, nil, "set") end
function event_methods.clear(p) op(p, "event_clear", nil, nil, "clear") end
function event_methods.is_set(p) return op(p, "sync_state", {}, nil, "is_set").set end
function event_methods.wait(p, timeout)
  return wait_op(p, "wait", { timeout = timeout_of(p, "wait", timeout, 2) }, "wait")
end
local EventProxy = class("EventProxy", "Event", event_methods)

local barrier_methods = {}
function barrier_methods.wait(p, timeout)
  return wait_op(p, "wait", { timeout = timeout_of(p, "wait", timeout, 2) }, "wait")
end
function barrier_methods.abort(p) op(p, "abort", nil, nil, "abort") end
function barrier_methods.reset(p) op(p, "reset", nil, nil, "reset") end
local BarrierProxy = class("BarrierProxy", "Barrier", barrier_methods, function(p, k)
  if k == "parties" or k == "n_waiting" or k == "broken" then
    local v = op(p, "sync_state", {}, nil, "." .. k)[k]
    if k == "broken" then return v ~= false end
    return v
  end
end)

-------------------------------------------------------------------- Pool

-- A Pool in the server process (managers/pool.lua): its calls return at once on the server,
-- and their results come back through the manager (a get waits there, not in the server).
local pool_methods, ar_methods = {}, {}
local PoolProxy = class("PoolProxy", "Pool", pool_methods)
local AsyncResultProxy = class("AsyncResultProxy", "AsyncResult", ar_methods)
AsyncResultProxy.__tostring = function(p) return ("<AsyncResultProxy %d of a Manager>"):format(p._id) end

local function check_call(p, what, f, x, opts, xname)
  if type(f) ~= "function" then error(("%s: bad argument #1 (function expected, got %s)"):format(describe(p, what), type(f)), 4) end
  if x ~= nil and type(x) ~= "table" then
    error(("%s: bad argument #2 (table of %s expected, got %s)"):format(describe(p, what), xname, type(x)), 4)
  end
  if type(opts) == "table" and (opts.callback ~= nil or opts.error_callback ~= nil) then
    error(("%s: callbacks cannot be given through a manager (they would run in the manager process)"):format(describe(p, what)), 4)
  end
end

-- starts call `what` (apply_async, map_async, starmap_async) on the server: its AsyncResult proxy
local function pool_call(p, what, f, x, opts, xname, meth)
  meth = meth or what
  check_call(p, meth, f, x, opts, xname)
  if x ~= nil and getmetatable(x) then x = totable_of(x) end
  return mk(p._m, AsyncResultProxy, op(p, "pool_call", what, { f, x, opts }, meth))
end

-- values of a finished call, nil, "timeout", or raises its error (intact) at the user's call
local function await(p, timeout, meth, wait)
  local r = wait_op(p, "async_get", { timeout = timeout_of(p, meth, timeout, 3), wait = wait }, meth)
  if r == "timeout" then return nil, "timeout" end
  if wait then return true end
  return table.unpack(r, 1, r.n)
end

function pool_methods.apply_async(p, f, args, opts) return pool_call(p, "apply_async", f, args, opts, "arguments") end
function pool_methods.map_async(p, f, items, opts) return pool_call(p, "map_async", f, items, opts, "items") end
function pool_methods.starmap_async(p, f, list, opts) return pool_call(p, "starmap_async", f, list, opts, "argument tables") end
function pool_methods.apply(p, f, args, opts) return await(pool_call(p, "apply_async", f, args, opts, "arguments", "apply"), nil, "get") end
function pool_methods.map(p, f, items, opts) return (await(pool_call(p, "map_async", f, items, opts, "items", "map"), nil, "get")) end
function pool_methods.starmap(p, f, list, opts) return (await(pool_call(p, "starmap_async", f, list, opts, "argument tables", "starmap"), nil, "get")) end

-- imap and imap_unordered: for i, v in ...; each step takes the results ready on the server
local function iterate(p, what, f, items, opts)
  check_call(p, what, f, items, opts, "items")
  if type(items) ~= "table" then
    error(("%s: bad argument #2 (a table of items expected, got %s)"):format(describe(p, what), type(items)), 3)
  end
  if getmetatable(items) then items = totable_of(items) end
  local it = mk(p._m, AsyncResultProxy, op(p, "pool_imap", what == "imap", { f, items, opts }, what))
  local buf, at = { n = 0 }, 1
  return function()
    if at > buf.n then
      buf, at = wait_op(it, "iter_next", {}, what), 1
      if buf.n == 0 then return nil end
    end
    local i, v = buf[at], buf[at + 1]
    at = at + 2
    return i, v
  end
end
function pool_methods.imap(p, f, items, opts) return iterate(p, "imap", f, items, opts) end
function pool_methods.imap_unordered(p, f, items, opts) return iterate(p, "imap_unordered", f, items, opts) end

function pool_methods.close(p) op(p, "pool_close", nil, nil, "close") end
function pool_methods.terminate(p) op(p, "pool_terminate", nil, nil, "terminate") end
function pool_methods.join(p) wait_op(p, "pool_join", {}, "join") end

function ar_methods.get(p, timeout) return await(p, timeout, "get") end
function ar_methods.wait(p, timeout) return await(p, timeout, "wait", true) end
function ar_methods.ready(p) return op(p, "async_state", nil, nil, "ready").ready end
function ar_methods.successful(p)
  local st = op(p, "async_state", nil, nil, "successful")
  if not st.ready then fail(p, "the result is not ready", "successful") end
  return st.successful
end

-------------------------------------------------------------------- registered types

-- p:name(...) calls method name of the object on the server and returns its results
local callers = setmetatable({}, { __mode = "v" })
local UserProxy
UserProxy = class("UserProxy", "object", {}, function(_, k)
  if type(k) ~= "string" or k:sub(1, 1) == "_" then return nil end
  local f = callers[k]
  if not f then
    f = function(p, ...)
      if getmetatable(p) ~= UserProxy then
        error(("bad self for method %s (call it as proxy:%s(...))"):format(k, k), 2)
      end
      local r = op(p, "callmethod", k, table.pack(...), k)
      return table.unpack(r, 1, r.n)
    end
    callers[k] = f
  end
  return f
end)
UserProxy.__tostring = function(p) return ("<%s proxy %d of a Manager>"):format(p._type, p._id) end

-------------------------------------------------------------------- the Manager's makers

-- an operation of the manager itself (making an object), naming the user's call `what`
local function mcall(mgr, name, a, b, what)
  local ok, r = pcall(call, mgr, name, nil, a, b)
  if not ok then
    if type(r) ~= "string" then error(r, 0) end
    r = r:gsub("^[^\n]-manager%.lua:%d+: ", "")
    error(what .. ": " .. r, user_level())
  end
  return r
end

local function proxy(mgr, mt, kind, init)
  if init ~= nil and type(init) ~= "table" then
    error(("bad argument #1 to '%s' (table expected, got %s)"):format(kind, type(init)), user_level())
  end
  if init ~= nil and getmetatable(init) then init = totable_of(init) end
  return mk(mgr, mt, mcall(mgr, "new", kind, init, kind .. "()"))
end

function Manager:dict(init) return proxy(self, DictProxy, "dict", init) end
function Manager:list(init) return proxy(self, ListProxy, "list", init) end
function Manager:Namespace(init) return proxy(self, NamespaceProxy, "Namespace", init) end
function Manager:set(init)
  if init ~= nil and type(init) ~= "table" then error("bad argument #1 to 'set' (table expected, got " .. type(init) .. ")", 2) end
  local s = {}
  for _, v in ipairs(init or {}) do s[v] = true end
  return mk(self, SetProxy, mcall(self, "new", "set", s, "set()"))
end

function Manager:Value(typecode, value)
  check_typecode(typecode, 2)
  if value == nil then value = ("fd"):find(typecode, 1, true) and 0.0 or ("cu"):find(typecode, 1, true) and "" or 0 end
  value = coerce(typecode, value, "Value()", 2)
  return mk(self, ValueProxy, mcall(self, "new", "Value", { value }, "Value()"), { _tc = typecode })
end

function Manager:Array(typecode, init)
  check_typecode(typecode, 2)
  local data = {}
  if math.type(init) == "integer" and init >= 0 then
    local zero = ("fd"):find(typecode, 1, true) and 0.0 or ("cu"):find(typecode, 1, true) and "\0" or 0
    for i = 1, init do data[i] = zero end
  elseif type(init) == "table" then
    init = totable_of(init)
    for i = 1, #init do data[i] = coerce(typecode, init[i], ("Array(): item %d"):format(i), 2) end
  else
    error("bad argument #2 to 'Array' (a size >= 0 or a table expected, got " .. (type(init) == "number" and tostring(init) or type(init)) .. ")", 2)
  end
  return mk(self, ArrayProxy, mcall(self, "new", "Array", data, "Array()"), { _tc = typecode })
end

function Manager:Lock() return mk(self, LockProxy, mcall(self, "new_lock", "Lock", nil, "Lock()"), { _kind = "Lock" }) end
function Manager:RLock() return mk(self, LockProxy, mcall(self, "new_lock", "RLock", nil, "RLock()"), { _kind = "RLock" }) end

local function semaphore(self, kind, value)
  if value == nil then value = 1 end
  if math.type(value) ~= "integer" or value < 0 then
    error(("bad argument #1 to '%s' (an integer >= 0 expected, got %s)"):format(kind, tostring(value)), user_level())
  end
  return mk(self, LockProxy, mcall(self, "new_semaphore", kind, value, kind .. "()"), { _kind = kind })
end
function Manager:Semaphore(value) return semaphore(self, "Semaphore", value) end
function Manager:BoundedSemaphore(value) return semaphore(self, "BoundedSemaphore", value) end

function Manager:Condition(lock)
  local lock_id
  if lock ~= nil then
    if getmetatable(lock) ~= LockProxy or (lock._kind ~= "Lock" and lock._kind ~= "RLock") or lock._m._pid ~= self._pid then
      error("bad argument #1 to 'Condition' (a Lock or RLock of this manager expected)", 2)
    end
    lock_id = lock._id
  end
  return mk(self, ConditionProxy, mcall(self, "new_condition", lock_id, nil, "Condition()"))
end

function Manager:Event() return mk(self, EventProxy, mcall(self, "new_event", nil, nil, "Event()")) end

function Manager:Barrier(parties, action, timeout)
  if math.type(parties) ~= "integer" or parties < 1 then
    error("bad argument #1 to 'Barrier' (an integer >= 1 expected, got " .. tostring(parties) .. ")", 2)
  end
  if action ~= nil and type(action) ~= "function" then
    error("bad argument #2 to 'Barrier' (function expected, got " .. type(action) .. ")", 2)
  end
  if timeout ~= nil and type(timeout) ~= "number" then
    error("bad argument #3 to 'Barrier' (number expected, got " .. type(timeout) .. ")", 2)
  end
  return mk(self, BarrierProxy, mcall(self, "new_barrier", parties, { action = action, timeout = timeout }, "Barrier()"))
end

--- manager:Pool([n | opts]): a Pool in the manager's process (mp.Pool's arguments), used by
--- every process through its proxy
function Manager:Pool(args)
  if args ~= nil and type(args) ~= "number" and type(args) ~= "table" then
    error("bad argument #1 to 'Pool' (number or table expected, got " .. type(args) .. ")", 2)
  end
  return mk(self, PoolProxy, mcall(self, "new_pool", nil, args, "Pool()"))
end

-- Our queues are already shared between processes: the manager's are those.
function Manager:Queue(...) return core.Queue(...) end
function Manager:JoinableQueue(...) return core.JoinableQueue(...) end

--- manager:register(typename, constructor [, {exposed = {names}}]): manager:<typename>(...) then
--- makes constructor(...) on the server and returns a proxy whose methods run there
function Manager:register(typename, ctor, opts)
  if type(typename) ~= "string" or not typename:match("^[%a_][%w_]*$") then
    error("bad argument #1 to 'register' (a name expected, got " .. tostring(typename) .. ")", 2)
  end
  if Manager[typename] ~= nil then
    error(("bad argument #1 to 'register' (%s is a method of Manager)"):format(typename), 2)
  end
  if type(ctor) ~= "function" then
    error("bad argument #2 to 'register' (function expected, got " .. type(ctor) .. ")", 2)
  end
  local exposed = opts and opts.exposed
  if exposed ~= nil and type(exposed) ~= "table" then
    error("bad argument #3 to 'register' (exposed: a list of method names expected)", 2)
  end
  mcall(self, "register", typename, { ctor = ctor, exposed = exposed }, "register()")
  rawset(self, typename, function(mgr, ...)
    return mk(mgr, UserProxy, mcall(mgr, "new_user", typename, table.pack(...), typename .. "()"), { _type = typename })
  end)
end

-- proxies travel by value with their metatable registered by name
core.register_metatable(DictProxy.__name, DictProxy)
core.register_metatable(ListProxy.__name, ListProxy)

M._session = session  -- (for specs)

return M
