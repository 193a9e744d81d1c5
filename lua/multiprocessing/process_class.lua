-- process_class.lua: Process (made, started by fork, forkserver or spawn, joined, its
-- result) and active_children. Loaded by process.lua at the first use of one of them, in
-- place of its stand-ins; the current process (me) is process.lua's.
local core = require "multiprocessing.core"
local context = require "multiprocessing.context"
local M = require "multiprocessing.process"
local P = M._internals
local capture, Info, running, whoami, set_starting = P.capture, P.Info, P.running, P.whoami, P.set_starting

local Process = { __name = "multiprocessing.Process" }
local methods = {}

local counter = 0
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

-- the exit code, reaping the child if it ended; nil while it runs. core.reap
-- returns nil alone while the child runs, and nil, message, code when its status
-- cannot be had (another wait took it: SIGCHLD ignored, a core.waitpid of the
-- pid): poll returns nil, message then, never a "still running" that would last.
local function poll(p)
  local code = rawget(p, "_exitcode")
  if code == nil and p.pid and p._pid_owner == core.getpid() then
    local why
    code, why = core.reap(p.pid, true)
    if code ~= nil then settle(p, code)
    elseif why then return nil, why end
  end
  return code
end

-- the error of a call (exitcode, is_alive, join...) on a child whose status is gone
local function lost(p, fname, why, lvl)
  error(("cannot %s: the exit status of process %s (pid %d) was taken by another wait (%s)"):format(
    fname, p.name, p.pid, tostring(why)), lvl + 1)
end

-- Python's _cleanup: children that ended are reaped (their status kept in their
-- Process) at each start and in active_children, so unjoined ones leave no zombies.
-- One whose status another wait took is not ours to wait for any more.
local function cleanup()
  if children_pid ~= core.getpid() then children, children_pid = {}, core.getpid() end
  for pid, p in pairs(children) do
    local _, why = poll(p)
    if why then children[pid] = nil end
  end
end

-- The sentinel: a descriptor readable once the process has ended (a pidfd, see
-- src/process.c), made on first use and owned by the object (close or GC closes it).
-- soft: nil instead of an error when the kernel has no pidfd_open (Linux < 5.3, valgrind).
local function sentinel(p, soft)
  if rawget(p, "_closed") then error("cannot get the sentinel: the process object is closed", 3) end
  if not p.pid then error("cannot get the sentinel of a process that was not started", 3) end
  if p._pid_owner ~= core.getpid() then error("can only get the sentinel of a child process", 3) end
  local s = rawget(p, "_sentinel")
  if not s then
    local err, code
    s, err, code = core.sentinel(p.pid, poll(p) ~= nil)
    if not s and soft and code == "ENOSYS" then return nil end
    if not s then error("cannot get the sentinel: " .. tostring(err), 3) end
    rawset(p, "_sentinel", s)
  end
  return s:fileno()
end

-- mp.connection.wait's protocol (docs/connection.md): the sentinel wakes the wait,
-- the exit code confirms (and reaps); without pidfds, the exit code is polled
function methods._wait_fd(p) return sentinel(p, true) end
function methods._wait_ready(p) return p.exitcode ~= nil end

-- exitcode is read live: nil while the process runs
function Process.__index(p, k)
  if k == "exitcode" then
    local code, why = poll(p)
    if why then lost(p, "read exitcode", why, 2) end
    return code
  end
  if k == "sentinel" then return sentinel(p) end
  return methods[k]
end

function Process.__tostring(p)
  local state
  local code, why = poll(p)
  if not p.pid then state = "initial"
  elseif why then state = "status lost"
  elseif code == nil then state = "started"
  else state = "stopped exitcode=" .. tostring(code) end
  return ("<Process name='%s' pid=%s %s%s>"):format(p.name, tostring(p.pid), state, p.daemon and " daemon" or "")
end

-- what the child does once its target returned (ok) or raised: sends the values
-- or the error, and leaves
local function child_done(p, ok, ...)
  local code = 0
  if ok and select("#", ...) > 0 then  -- nothing to send when the target returned nothing
    local sent, err = pcall(p._results.put, p._results, table.pack(...))
    if not sent then
      io.stderr:write(("Process %s: cannot return its results: %s\n"):format(p.name, tostring(err)))
      code = 1
    end
  elseif not ok then
    local e = ...
    e.call, e.name = "Process", p.name
    io.stderr:write(("Process %s (pid %d):\n%s\n"):format(p.name, core.getpid(), tostring(e)))
    if not pcall(p._results.put, p._results, { err = e }) then
      e.value = e.message  -- (what the encoder cannot send, the parent gets as text)
      pcall(p._results.put, p._results, { err = e })
    end
    code = 1
  end
  core._exit(code)
end

-- in the child: run(p), a subclass-style override (as Python calls it), or the
-- target with its arguments; n: how many (0: none, nil: see _call_args). A fork's
-- parent reads run and n before the fork, so that the child looks up no missing
-- key (that reads a constant of the interpreter's: one more page to map) and
-- calls no table.unpack for no arguments. The child is the current process
-- without making anything for it (process.lua's whoami).
local function run_child(p, run, n)
  if run then
    child_done(p, xpcall(run, capture, p))
  elseif n == 0 then
    child_done(p, xpcall(p.target, capture))
  else
    child_done(p, xpcall(p.target, capture, M._call_args(p)))
  end
end

-- A child started by spawn or the forkserver: the start message's payload
-- (see start) made a Process again, its parent the one that started it
function M._child_main(pl)
  local pid = core.getpid()
  P.set_me({ name = pl.name, pid = pid, daemon = pl.daemon, ident = pid },
    { name = pl.parent[1], pid = pl.parent[2], daemon = false, ident = pl.parent[2] })
  run_child(setmetatable({ target = pl.target, args = pl.args, kwargs = pl.kwargs, run = pl.run, name = pl.name,
    daemon = pl.daemon, _results = pl.results }, Process), pl.run)
end

local OPTIONS = { target = true, args = true, kwargs = true, name = true, daemon = true, run = true, start_method = true }

-- what the target is called with: args, then kwargs (Python's named arguments) as one table
function M._call_args(p)
  local args, kw = p.args, p.kwargs
  local n = args.n or #args
  if kw == nil then return table.unpack(args, 1, n) end
  local t = table.move(args, 1, n, 1, {})
  t[n + 1] = kw
  return table.unpack(t, 1, n + 1)
end

--- Process{target = f, args = {...}, kwargs = {...}, name = "Test", daemon = false [, run = function(self) end]}
function M.Process(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'Process' (table expected, got " .. type(opts) .. ")", 2) end
  for k in pairs(opts) do
    if not OPTIONS[k] and k ~= 1 then
      error(("bad argument #1 to 'Process' (unknown option %s)"):format(type(k) == "string" and k or "[" .. tostring(k) .. "]"), 2)
    end
  end
  local target = opts.target or opts[1]
  if target ~= nil and type(target) ~= "function" and not (getmetatable(target) or {}).__call then
    error("bad argument #1 to 'Process' (target must be callable, got " .. type(target) .. ")", 2)
  end
  if opts.run ~= nil and type(opts.run) ~= "function" then
    error("bad argument #1 to 'Process' (run must be a function, got " .. type(opts.run) .. ")", 2)
  end
  local args = opts.args or {}
  if type(args) ~= "table" then error("bad argument #1 to 'Process' (args must be a table)", 2) end
  local n = rawget(args, "n")
  if n ~= nil and (math.type(n) ~= "integer" or n < 0) then
    error("bad argument #1 to 'Process' (args.n must be a non-negative integer, got " ..
      (math.type(n) or type(n)) .. ")", 2)
  end
  if opts.start_method ~= nil then context._check(opts.start_method, "Process", 1, 2) end
  if opts.kwargs ~= nil and type(opts.kwargs) ~= "table" then
    error("bad argument #1 to 'Process' (kwargs must be a table, got " .. type(opts.kwargs) .. ")", 2)
  end
  counter = counter + 1
  if opts.name ~= nil and type(opts.name) ~= "string" then error("bad argument #1 to 'Process' (name must be a string)", 2) end
  return setmetatable({
    target = target or function() end,
    args = args,
    kwargs = opts.kwargs,
    run = opts.run,
    name = opts.name or ("Process-" .. counter),
    daemon = not not opts.daemon,
    _method = opts.start_method,
    -- (room for what start and join add: a constructor's nil fields size the table,
    -- so that join does not grow it, an allocation and a rehash, once the child ended)
    _results = nil, pid = nil, ident = nil, _pid_owner = nil, _exitcode = nil,
  }, Process)
end

-- the method's name for a wrong self (Lua's and the core's wording), from the verb of the others
local CALL = { ["get the result of"] = "result" }
local function bad_self(p, fname, lvl)
  error(("bad argument #1 to '%s' (Process expected, got %s)"):format(CALL[fname] or fname,
    type(p) == "table" and (getmetatable(p) or {}).__name or type(p)), lvl + 1)
end

local function check(p, fname, lvl)
  lvl = lvl or 3
  if getmetatable(p) ~= Process then bad_self(p, fname, lvl) end
  if rawget(p, "_closed") then error(("cannot %s: the process object is closed"):format(fname), lvl) end
end

local function check_started(p, fname)
  check(p, fname, 4)
  if not p.pid then error(("cannot %s a process that was not started"):format(fname), 3) end
  if p._pid_owner ~= core.getpid() then error(("can only %s a child process"):format(fname), 3) end
end

function methods.start(p)
  check(p, "start")
  if p.pid then error("cannot start a process twice", 2) end
  cleanup()
  p._results = core.Queue()
  local method = rawget(p, "_method") or context._state.method
  local pid, err, run, n
  local self = whoami()  -- (made before the fork: the child's parent)
  if method and method ~= "fork" then  -- the start message: what run_child needs
    pid, err = context._start(method, { module = "multiprocessing.process", entry = "_child_main", payload = {
      target = p.target, args = p.args, kwargs = p.kwargs, run = rawget(p, "run"), name = p.name, daemon = p.daemon,
      results = p._results, parent = { self.name, self.pid } } }, p.daemon)
  else
    context._warn_fork()
    run = rawget(p, "run")  -- (what the child calls, read here: see run_child)
    if not run and rawget(p, "kwargs") == nil then
      local args = p.args
      n = args.n or #args
    end
    set_starting(p)  -- (what the child is: see process.lua's whoami)
    pid, err = core.fork(p.daemon)
    if pid ~= 0 then set_starting(nil) end
  end
  if not pid then error("cannot start process: " .. tostring(err), 2) end
  if pid == 0 then
    local ok, e = pcall(run_child, p, run, n)  -- run_child never returns normally
    io.stderr:write(tostring(e), "\n")
    core._exit(ok and 0 or 1)
  end
  p.pid, p.ident, p._pid_owner = pid, pid, core.getpid()
  p.target, p.args, p.kwargs, p.run = nil, nil, nil, nil  -- the child has them: let them be collected (as Python does)
  children[pid] = p
  return p
end

methods.run = function(p)  -- what the child does; may be called directly, as in Python
  check(p, "run")
  if p.pid then error("cannot run a process that was started (its target was let go)", 2) end
  return p.target(M._call_args(p))
end

--- join([timeout]): waits for the process; returns true, or nil, "timeout"
function methods.join(p, timeout)
  check_started(p, "join")
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout) then
    error(("bad argument #1 to 'join' (number expected, got %s)"):format(
      type(timeout) == "number" and "NaN" or type(timeout)), 2)
  end
  if rawget(p, "_exitcode") ~= nil then return true end
  local code, why = core.waitpid(p.pid, timeout, true)
  if code == nil then
    if why == "timeout" or why == "interrupted" then return nil, why end
    lost(p, "join", why, 2)
  end
  settle(p, code)
  return true
end

function methods.is_alive(p)
  check(p, "is_alive")
  if not p.pid then return false end
  if p.pid == core.getpid() then return true end
  local code, why = poll(p)
  if why then lost(p, "is_alive", why, 2) end
  return code == nil
end

-- (a child whose status is gone may have a recycled pid: it is never signalled)
local function signal(p, fname, sig)
  local code, why = poll(p)
  if why then lost(p, fname, why, 3) end
  if code == nil then core.kill(p.pid, sig) end
end

function methods.terminate(p)
  check_started(p, "terminate")
  signal(p, "terminate", 15)
end

function methods.kill(p)
  check_started(p, "kill")
  signal(p, "kill", 9)
end

-- as Python 3.14's: SIGINT, so that the child's Lua raises "interrupted!" where it is
function methods.interrupt(p)
  check_started(p, "interrupt")
  signal(p, "interrupt", 2)
end

function methods.close(p)
  if getmetatable(p) ~= Process then bad_self(p, "close", 2) end
  if rawget(p, "_closed") then return end
  local code, why = poll(p)  -- (one whose status is gone can be closed: nothing is left to wait for)
  if p.pid and code == nil and not why then error("cannot close a process while it is still running", 2) end
  if p._results then p._results:close() end
  if rawget(p, "_sentinel") then p._sentinel:close() end
  p._closed = true
end

--- result(): the target's return values, or its error with the child's traceback
function methods.result(p)
  check_started(p, "get the result of")
  local code, why = poll(p)
  if why then lost(p, "get the result of", why, 2) end
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

function M.active_children()
  cleanup()  -- what is left in children runs
  local list = {}
  for _, p in pairs(children) do list[#list + 1] = p end
  -- pool workers, as Python lists them: described (name, pid, daemon, is_alive), not Processes
  for pool in pairs(M._pools) do
    if pool._owner == core.getpid() then
      for i, w in pairs(pool._workers) do
        if w.code == nil and running(w.pid) then
          list[#list + 1] = setmetatable({ name = "PoolWorker-" .. i, pid = w.pid, daemon = true, ident = w.pid }, Info)
        end
      end
    end
  end
  table.sort(list, function(a, b) return a.pid < b.pid end)
  return list
end
