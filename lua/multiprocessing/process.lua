-- process.lua: Process, current_process, parent_process, active_children, cpu_count.
local core = require "multiprocessing.core"

local M = {}

local Process = { __name = "multiprocessing.Process" }
local methods = {}

local counter = 0
local me = { name = "MainProcess", pid = core.getpid(), daemon = false, ident = core.getpid() }
local parent = nil
local children = {}   -- pid -> Process, started here and not yet reaped
local children_pid = core.getpid()  -- whose they are: a forked copy starts with none

-- The exit status of a child is kept by the core from the moment it is read
-- until the Process has stored it (core.forget): a Ctrl-C landing as a wait
-- returns cannot lose it (see src/process.c).
local function settle(p, code)
  rawset(p, "_exitcode", code)
  children[p.pid] = nil
  core.forget(p.pid)
end

-- the exit code, reaping the child if it ended; nil while it runs
local function poll(p)
  local code = rawget(p, "_exitcode")
  if code == nil and p.pid and p._pid_owner == core.getpid() then
    code = core.reap(p.pid, true)
    if code ~= nil then settle(p, code) end
  end
  return code
end

-- Python's _cleanup: children that ended are reaped (their status kept in their
-- Process) at each start and in active_children, so unjoined ones leave no zombies.
local function cleanup()
  if children_pid ~= core.getpid() then children, children_pid = {}, core.getpid() end
  for _, p in pairs(children) do poll(p) end
end

-- exitcode is read live: nil while the process runs
function Process.__index(p, k)
  if k == "exitcode" then return poll(p) end
  return methods[k]
end

function Process.__tostring(p)
  local state
  if not p.pid then state = "initial"
  elseif p.exitcode == nil then state = "started"
  else state = "stopped exitcode=" .. tostring(p.exitcode) end
  return ("<Process name='%s' pid=%s %s%s>"):format(p.name, tostring(p.pid), state, p.daemon and " daemon" or "")
end

local function traceback(msg)  -- without the parent's frames inherited at fork
  local tb = debug.traceback(msg, 2)
  return (tb:gsub("\n%s*%[C%]: in function 'xpcall'.*$", ""))
end

local function run_child(p)
  -- in the child: it becomes the current process, with no children of its own yet
  parent = { name = me.name, pid = me.pid }
  me = { name = p.name, pid = core.getpid(), daemon = p.daemon, ident = core.getpid() }
  children, children_pid = {}, core.getpid()
  local args = p.args
  local res = table.pack(xpcall(p.target, traceback, table.unpack(args, 1, args.n or #args)))
  local ok = res[1]
  local code = 0
  if ok and res.n > 1 then  -- nothing to send when the target returned nothing
    local sent, err = pcall(p._results.put, p._results, table.move(res, 2, res.n, 1, { n = res.n - 1 }))
    if not sent then
      io.stderr:write(("Process %s: cannot return its results: %s\n"):format(p.name, tostring(err)))
      code = 1
    end
  elseif not ok then
    local msg = tostring(res[2])
    io.stderr:write(("Process %s (pid %d):\n%s\n"):format(p.name, core.getpid(), msg))
    pcall(p._results.put, p._results, { err = msg })
    code = 1
  end
  core._exit(code)
end

--- Process{target = f, args = {...}, name = "Test", daemon = false}
function M.Process(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'Process' (table expected, got " .. type(opts) .. ")", 2) end
  local target = opts.target or opts[1]
  if target ~= nil and type(target) ~= "function" and not (getmetatable(target) or {}).__call then
    error("bad argument #1 to 'Process' (target must be callable, got " .. type(target) .. ")", 2)
  end
  local args = opts.args or {}
  if type(args) ~= "table" then error("bad argument #1 to 'Process' (args must be a table)", 2) end
  counter = counter + 1
  if opts.name ~= nil and type(opts.name) ~= "string" then error("bad argument #1 to 'Process' (name must be a string)", 2) end
  return setmetatable({
    target = target or function() end,
    args = args,
    name = opts.name or ("Process-" .. counter),
    daemon = not not opts.daemon,
  }, Process)
end

local function check(p, fname)
  if getmetatable(p) ~= Process then error(("bad self to '%s' (Process expected)"):format(fname), 3) end
end

local function check_started(p, fname)
  check(p, fname)
  if not p.pid then error(("cannot %s a process that was not started"):format(fname), 3) end
  if p._pid_owner ~= core.getpid() then error(("can only %s a child process"):format(fname), 3) end
end

function methods.start(p)
  check(p, "start")
  if p.pid then error("cannot start a process twice", 2) end
  cleanup()
  p._results = core.Queue()
  local pid, err = core.fork(p.daemon)
  if not pid then error("cannot start process: " .. tostring(err), 2) end
  if pid == 0 then
    local ok, e = pcall(run_child, p)  -- run_child never returns normally
    io.stderr:write(tostring(e), "\n")
    core._exit(ok and 0 or 1)
  end
  p.pid, p.ident, p._pid_owner = pid, pid, core.getpid()
  p.sentinel = pid
  children[pid] = p
  return p
end

methods.run = function(p)  -- what the child does; may be called directly, as in Python
  check(p, "run")
  local args = p.args
  return p.target(table.unpack(args, 1, args.n or #args))
end

--- join([timeout]): waits for the process; returns true, or nil, "timeout"
function methods.join(p, timeout)
  check_started(p, "join")
  if rawget(p, "_exitcode") ~= nil then return true end
  local code, why = core.waitpid(p.pid, timeout, true)
  if code == nil then
    if why == "timeout" or why == "interrupted" then return nil, why end
    error("join: " .. tostring(why), 2)
  end
  settle(p, code)
  return true
end

function methods.is_alive(p)
  check(p, "is_alive")
  if not p.pid then return false end
  if p.pid == core.getpid() then return true end
  return p.exitcode == nil
end

function methods.terminate(p)
  check_started(p, "terminate")
  if p.exitcode == nil then core.kill(p.pid, 15) end
end

function methods.kill(p)
  check_started(p, "kill")
  if p.exitcode == nil then core.kill(p.pid, 9) end
end

function methods.close(p)
  check(p, "close")
  if p.pid and p.exitcode == nil then error("cannot close a process while it is still running", 2) end
  if p._results then p._results:close() end
end

--- result(): the target's return values, or its error with the child's traceback
function methods.result(p)
  check_started(p, "get the result of")
  local code = p.exitcode
  if code == nil then error("process " .. p.name .. " has not finished (join it first)", 2) end
  if not p._fetched then
    local r = p._results:get_nowait()
    if r == nil and code == 0 then r = { n = 0 } end  -- it returned nothing
    p._fetched, p._result = true, r
  end
  local r = p._result
  if type(r) == "table" and r.err then error(r.err, 0) end
  if type(r) == "table" then return table.unpack(r, 1, r.n) end
  if code < 0 then
    error(("process %s (pid %d) was killed by %s"):format(p.name, p.pid, core.signame(-code)), 2)
  end
  error(("process %s (pid %d) exited with code %d before returning"):format(p.name, p.pid, code), 2)
end

function M.current_process() return me end
function M.parent_process() return parent end

function M.active_children()
  cleanup()  -- what is left in children runs
  local list = {}
  for _, p in pairs(children) do list[#list + 1] = p end
  table.sort(list, function(a, b) return a.pid < b.pid end)
  return list
end

M.cpu_count = core.cpu_count
--- conveniences the examples need and Lua lacks: sleep(seconds), now() (monotonic seconds)
M.sleep = core.sleep
M.now = core.now

return M
