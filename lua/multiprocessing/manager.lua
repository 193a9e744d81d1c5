-- manager.lua: Manager, a server process holding dicts and lists that every process can use.
--
-- Proxies are plain tables with a registered metatable, so they travel through
-- the codec to any process (started before or after them). Each operation is
-- one request on the manager's queue, answered on a reply queue the call makes
-- and sends with it: operations are atomic, and the objects live as long as the
-- manager. The request message owns its reply queue until the server takes it
-- (docs/arena.md), the server closes its handle once it answered, and the call
-- closes its own: a reply queue lives as long as its call, whatever process made
-- it, and goes with a request that nobody read.
local core = require "multiprocessing.core"
local process = require "multiprocessing.process"

local M = {}

local Manager = { __name = "multiprocessing.Manager" }
Manager.__index = Manager
local DictProxy = { __name = "multiprocessing.DictProxy" }
local ListProxy = { __name = "multiprocessing.ListProxy" }
local dict_methods, list_methods = {}, {}

------------------------------------------------------------------ the server

local ops = {}
function ops.new(objs, _, kind, init)
  local id = #objs + 1
  objs[id] = { kind = kind, data = init or {} }
  return id
end
function ops.get(objs, id, k) return objs[id].data[k] end
function ops.set(objs, id, k, v)
  local o = objs[id]
  if o.kind == "list" then
    local n = #o.data
    if math.type(k) ~= "integer" or k < 1 or k > n + 1 then
      error(("list index %s out of range (length %d)"):format(tostring(k), n), 0)
    end
  end
  o.data[k] = v
end
function ops.len(objs, id) local d = objs[id].data if objs[id].kind == "list" then return #d end
  local n = 0 for _ in pairs(d) do n = n + 1 end return n end
function ops.copy(objs, id) return objs[id].data end
function ops.pop(objs, id, k, default)
  local o = objs[id]
  if o.kind == "list" then
    if #o.data == 0 then error("pop from an empty list", 0) end
    return table.remove(o.data, k)
  end
  local v = o.data[k]
  if v == nil then return default end
  o.data[k] = nil
  return v
end
function ops.append(objs, id, v) local d = objs[id].data d[#d + 1] = v end
function ops.insert(objs, id, i, v) table.insert(objs[id].data, i, v) end
function ops.update(objs, id, t) local d = objs[id].data for k, v in pairs(t) do d[k] = v end end
function ops.extend(objs, id, t) local d = objs[id].data for i = 1, #t do d[#d + 1] = t[i] end end
function ops.clear(objs, id) objs[id].data = {} end
-- f(old) -> new, atomically (f travels as a closure)
function ops.update_with(objs, id, k, f)
  local d = objs[id].data
  d[k] = f(d[k])
  return d[k]
end

local function serve(requests)
  local objs = {}
  while true do
    local req = requests:get()
    local op = req[1]
    if op == "stop" then
      if req[2] then req[2]:put { true } req[2]:close() end
      return
    end
    local f = ops[op]
    local res
    if not f then
      res = { false, "unknown manager operation " .. tostring(op) }
    elseif req[3] ~= nil and not objs[req[3]] and op ~= "new" then
      res = { false, "the manager has no object " .. tostring(req[3]) }
    else
      res = table.pack(pcall(f, objs, req[3], req[4], req[5]))
    end
    res.seq = req[6]  -- the caller matches it
    local reply = req[2]
    local ok, err = pcall(reply.put, reply, res)
    if not ok then reply:put { false, tostring(err), seq = req[6] } end
    reply:close()  -- the call holds the other handle: the queue goes with the call
  end
end

------------------------------------------------------------------ the client

-- The number of this process's last request (each reply carries the number of the request
-- it answers).
local reqno = 0

local function server_alive(pid)  -- a zombie counts as gone
  if not core.kill(pid, 0) then return false end
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("l") or ""
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

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
  -- a queue of its own, closed however the call ends (a process that exits at once, as a
  -- Process does, would never close one kept for its life)
  local reply <close> = core.Queue()
  reqno = reqno + 1
  local no = reqno
  local sent, err = pcall(mgr._requests.put, mgr._requests, { op, reply, id, a, b, no })
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
    res, why = reply:get(1)
    if res ~= nil then
      if res.seq == no then break end  -- else: the late reply of an abandoned call
    elseif why == "interrupted" then error("interrupted!", 0)
    elseif not server_alive(mgr._pid) then error("the manager process is gone", 3) end
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

local function proxy(mgr, mt, kind, init)
  if init ~= nil and type(init) ~= "table" then error("bad argument #1 (table expected, got " .. type(init) .. ")", 3) end
  local id = call(mgr, "new", nil, kind, init)
  return setmetatable({ _m = { _requests = mgr._requests, _pid = mgr._pid }, _id = id }, mt)
end

function Manager:dict(init) return proxy(self, DictProxy, "dict", init) end
function Manager:list(init) return proxy(self, ListProxy, "list", init) end
-- Our queues, locks and shared values already work across processes.
function Manager:Queue(...) return core.Queue(...) end
function Manager:Value(...) return require("multiprocessing.shared").Value(...) end
function Manager:Array(...) return require("multiprocessing.shared").Array(...) end
function Manager:Lock() return require("multiprocessing.sync").Lock() end
function Manager:Event() return require("multiprocessing.sync").Event() end

function Manager:shutdown()
  if self._pid_owner ~= core.getpid() or self._stopped then return end
  self._stopped = true
  if self._proc:is_alive() then
    -- the server's exit is the answer
    self._requests:put { "stop" }
    if not self._proc:join(2) then self._proc:kill() self._proc:join() end
  end
end
Manager.__close = Manager.shutdown
Manager.__gc = Manager.shutdown

--------------------------------------------------------------- the proxies

local function op(p, name, a, b) return call(p._m, name, p._id, a, b, p) end

-- p[k] is a method, or the server's value for k
local function indexer(methods)
  return function(p, k)
    local m = methods[k]
    if m then return m end
    return op(p, "get", k)
  end
end
local function newindex(p, k, v) op(p, "set", k, v) end
local function len(p) return op(p, "len") end

DictProxy.__index, DictProxy.__newindex, DictProxy.__len = indexer(dict_methods), newindex, len
DictProxy.__pairs = function(p) return next, op(p, "copy"), nil end
DictProxy.__tostring = function(p) return ("<DictProxy %d of a Manager>"):format(p._id) end

function dict_methods.get(p, k, default) local v = op(p, "get", k) if v == nil then return default end return v end
function dict_methods.totable(p) return op(p, "copy") end
function dict_methods.pop(p, k, default) return op(p, "pop", k, default) end
function dict_methods.update(p, t) op(p, "update", t) end
function dict_methods.clear(p) op(p, "clear") end
function dict_methods.update_with(p, k, f) return op(p, "update_with", k, f) end
function dict_methods.keys(p) local t, ks = op(p, "copy"), {} for k in pairs(t) do ks[#ks + 1] = k end return ks end
function dict_methods.values(p) local t, vs = op(p, "copy"), {} for _, v in pairs(t) do vs[#vs + 1] = v end return vs end

ListProxy.__index, ListProxy.__newindex, ListProxy.__len = indexer(list_methods), newindex, len
ListProxy.__tostring = function(p) return ("<ListProxy %d of a Manager>"):format(p._id) end

function list_methods.append(p, v) op(p, "append", v) end
function list_methods.extend(p, t) op(p, "extend", t) end
function list_methods.insert(p, i, v) op(p, "insert", i, v) end
function list_methods.pop(p, i) return op(p, "pop", i) end
function list_methods.totable(p) return op(p, "copy") end
function list_methods.clear(p) op(p, "clear") end

-- proxies travel by value with their metatable registered by name
core.register_metatable(DictProxy.__name, DictProxy)
core.register_metatable(ListProxy.__name, ListProxy)

return M
