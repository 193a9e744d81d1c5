-- process.lua: the current process and its parent (current_process, parent_process), TaskError,
-- cpu_count, sleep, now. Process and active_children are in process_class.lua, loaded on the
-- first use of one of them (see the end of this file): a Pool and its workers never need them.
local core = require "multiprocessing.core"

local M = {}

local me = { name = "MainProcess", pid = core.getpid(), daemon = false, ident = core.getpid() }
local parent = nil

------------------------------------------------------------- TaskError
-- The error of a task, a Process target or a Pool initializer that raised: the
-- raised value intact (`value`), its text (`message`), the `traceback`, the
-- worker's `pid`, the `call` (map, apply, Process, Pool initializer...) and the
-- `item`. Registered by name, so it travels through the codec; tostring gives
-- the text errors had before, and string methods and `..` work on that text.
local TaskError = core.register_metatable("multiprocessing.TaskError", { __name = "multiprocessing.TaskError" })

local function error_text(e)
  local head
  if e.item then
    head = ("%s failed on item %d (worker pid %s):\n"):format(e.call, e.item, tostring(e.pid))
  elseif e.call == "Pool initializer" then
    head = ("Pool initializer failed: in worker (pid %s):\n"):format(tostring(e.pid))
  else
    head = ""
  end
  return head .. tostring(e.message) .. (e.traceback and "\n" .. e.traceback or "")
end
TaskError.__tostring = error_text
TaskError.__concat = function(a, b)
  return (getmetatable(a) == TaskError and error_text(a) or a) .. (getmetatable(b) == TaskError and error_text(b) or b)
end
TaskError.__index = function(e, k)  -- e:match(...), e:find(...): on the text
  local f = string[k]
  if f then return function(self, ...) return f(error_text(self), ...) end end
end

-- what a raised value says: lua.c's wording for values without a text
local function value_text(v)
  local t = type(v)
  if t == "string" or t == "number" then return tostring(v) end
  local mt = getmetatable(v)
  if type(mt) == "table" and mt.__tostring then
    local ok, s = pcall(tostring, v)
    if ok and type(s) == "string" then return s end
  end
  return ("(error object is a %s value)"):format(t)
end

-- An xpcall handler (in a child or a worker): the raised value made a TaskError,
-- with the traceback, without the parent's frames inherited at fork. A value that
-- cannot be sent is replaced by its text (the codec's reason said).
local function capture(v)
  local tb = debug.traceback(nil, 2):gsub("\n%s*%[C%]: in function 'xpcall'.*$", "")
  local e = setmetatable({ value = v, message = value_text(v), traceback = tb, pid = core.getpid() }, TaskError)
  local t = type(v)
  if t ~= "string" and t ~= "number" and t ~= "nil" and t ~= "boolean" then
    local ok, why = pcall(core.encode, v)
    if not ok then e.value = e.message .. " (the raised value cannot be sent: " .. tostring(why) .. ")" end
  end
  return e
end
M._TaskError, M._capture = TaskError, capture

-- Whether v (raised, or captured as a TaskError) is Ctrl-C's error: lua.c's hook, a host's
-- lmp_interrupt or a wait's "interrupted! (...)". Met in the parent's own code that the library
-- runs for it (an input iterator, a callback), it is the program's interrupt: raised on, never
-- kept as that code's failure.
function M._interrupt_of(v)
  if getmetatable(v) == TaskError then v = v.value end
  return type(v) == "string" and v:find("interrupted!", 1, true) ~= nil
end
M.TaskError = TaskError

-- A forked Process child makes its `me` only when asked: a fork's child writes
-- as few of the pages it shares with its parent as it can (each costs a copy,
-- and a new table several: the allocator's, the collector's). The parent notes
-- the Process it is starting (`starting`, process_class.lua's start) before
-- core.fork and forgets it after; the child keeps it, and whoami() makes `me`
-- from it: the current process, its parent the one that forked it (the old
-- `me`). In the parent (whose `me` is its own pid's) whoami() forgets a
-- `starting` left by a fork that raised, before start or a pool forks again. A
-- process forked from such a child by other means than ours (whose `me` was not
-- made then) is named after that Process with its own pid, as Python names it.
local starting = nil

local function whoami()
  local p = starting
  if p then
    starting = nil
    local pid = core.getpid()
    if me.pid ~= pid then
      parent = me
      me = { name = p.name, pid = pid, daemon = p.daemon, ident = pid }
    end
  end
  return me
end
M._whoami = whoami  -- (pool.lua: before it forks a worker, whose parent this process is)

-- in a freshly forked pool worker: it becomes the current process, its parent the
-- one that forked it (process_class.lua's cleanup() finds children_pid stale and
-- empties children when it is used, so it has no children yet)
local function become(name, daemon)
  local pid = core.getpid()
  parent = whoami()
  me = { name = name, pid = pid, daemon = daemon, ident = pid }
end
M._become = become

-- (a pool worker's: pool.lua)
function M._from_parent(info)
  me = { name = info[1], pid = info[2], daemon = false, ident = info[2] }
end

-- What current_process() and parent_process() return: a name and a pid, with is_alive() and,
-- for the parent, join([timeout]) (as Python's _ParentProcess: it waits for the parent's end).
local function running(pid)  -- a child that has not ended (a zombie has)
  local f = io.open("/proc/" .. pid .. "/stat")
  local st = f and f:read("l") or ""
  if f then f:close() end
  local state = st:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

local Info = { __name = "multiprocessing.ProcessInfo" }
Info.__index = Info
Info.__tostring = function(i) return ("<Process name='%s' pid=%d %s>"):format(i.name, i.pid, i:is_alive() and "started" or "stopped") end

function Info:is_alive()
  if self.pid == core.getpid() then return true end
  -- our parent while it lives; once it is gone we are re-parented, whatever reuses its pid
  whoami()  -- (which makes `parent` in a forked child)
  if parent and self.pid == parent.pid then return core.getppid() == self.pid end
  return running(self.pid)  -- a pool worker
end

function Info:join(timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout) then
    error(("bad argument #1 to 'join' (number expected, got %s)"):format(timeout ~= timeout and "NaN" or type(timeout)), 2)
  end
  if self.pid == core.getpid() then error("cannot join the current process", 2) end
  local deadline = timeout and core.now() + timeout
  while self:is_alive() do
    local left = deadline and deadline - core.now()
    if left and left <= 0 then return nil, "timeout" end
    local slice = left and math.min(left, 0.05) or 0.05
    -- a child of ours (a pool worker): a wait on its exit (a pidfd) ends as it exits; keep
    -- leaves its status to its pool. Our parent, or no child of ours: polled.
    local code, why
    if not (parent and self.pid == parent.pid) then code, why = core.waitpid(self.pid, slice, true) end
    if why == "interrupted" then return nil, why end
    if code == nil and why ~= "timeout" then
      local ok, why2 = core.sleep(slice)
      if not ok then return nil, why2 end
    end
  end
  return true
end

function M.current_process() return setmetatable(whoami(), Info) end
function M.parent_process()
  whoami()
  return parent and setmetatable(parent, Info)
end

-- the pools this process made (pool.lua registers them): their workers are children too
M._pools = setmetatable({}, { __mode = "k" })

M.cpu_count = core.cpu_count
--- conveniences the examples need and Lua lacks: sleep(seconds), now() (monotonic seconds)
M.sleep = core.sleep
M.now = core.now

-- process_class.lua holds Process and active_children. Until it is loaded, their names here
-- are stand-ins that load it, then call the real one (a tail call: errors still name the
-- user's line); it puts its functions in M in their place, and reaches what it shares with
-- this file (the current process) through M._internals.
M._internals = {
  me = function() return me end,
  set_me = function(t, par) me, parent = t, par end,
  set_starting = function(p) starting = p end,
  whoami = whoami, capture = capture, Info = Info, running = running,
}
-- require(name), for the layer's files loaded on first use (process_class.lua here, pool.lua's
-- pool_async.lua and pool_faults.lua): a program (or a task, in a worker) may have changed
-- package.path since the library loaded, so one not found is looked for along the path of then
local path_at_load = package.path
function M._late_require(name)
  local m = package.loaded[name]
  if m ~= nil then return m end
  local ok, r = pcall(require, name)
  if ok then return r end
  local path = package.path
  package.path = path_at_load
  local ok2, m2 = pcall(require, name)
  package.path = path
  if not ok2 then error(r, 0) end
  return m2
end

for _, name in ipairs { "Process", "active_children", "_child_main", "_call_args" } do
  local f
  f = function(...)
    M._late_require "multiprocessing.process_class"
    if M[name] == f then error("multiprocessing.process_class did not define " .. name, 2) end
    return M[name](...)
  end
  M[name] = f
end

return M
