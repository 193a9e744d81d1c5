-- context.lua: the start methods (fork, forkserver, spawn), contexts, the executable.
local core = require "multiprocessing.core"

local M = {}

local METHODS = { fork = true, forkserver = true, spawn = true }
-- method: the default set by set_start_method (nil: not set, fork); exe: set_executable's
local state = { method = nil, exe = nil }
M._state = state

-- the interpreter running us (lua.c puts it at the lowest index of arg), when it is one
local function running_interpreter()
  if type(arg) ~= "table" then return nil end
  local i = -1
  while arg[i - 1] ~= nil do i = i - 1 end
  local exe = arg[i]
  if i < 0 and type(exe) == "string" and exe:match("([^/]*)$"):match("^lua") then return exe end
  return nil
end

--- check(method, fname): the method, or an error naming the caller's argument
function M._check(method, fname, argn, lvl)
  if not METHODS[method] then
    error(("bad argument #%d to '%s' (start method must be 'fork', 'forkserver' or 'spawn', got %s)"):format(
      argn or 1, fname, type(method) == "string" and ("'" .. method .. "'") or type(method)), (lvl or 2) + 1)
  end
  return method
end

function M.set_start_method(method, force)
  if method == nil and force then state.method = nil return end  -- as Python's: unset
  M._check(method, "set_start_method", 1, 2)
  if state.method ~= nil and not force then
    error(("set_start_method: the start method is already set ('%s'); pass force = true to change it"):format(state.method), 2)
  end
  state.method = method
end

function M.get_start_method(allow_none)
  if state.method == nil and not allow_none then state.method = "fork" end
  return state.method
end

function M.get_all_start_methods() return { "fork", "spawn", "forkserver" } end

function M.set_executable(path)
  if type(path) ~= "string" or path == "" then
    error("bad argument #1 to 'set_executable' (string expected, got " .. type(path) .. ")", 2)
  end
  state.exe = path
end

function M.get_executable() return state.exe or running_interpreter() or "lua5.4" end

function M.forkserver_start()
  local pid, err = core._forkserver_start(package.path, package.cpath)
  if not pid then error(err, 2) end
  return pid
end

-- stops this process's forkserver (the next use starts another); for tests
function M._forkserver_stop()
  local pid = core._forkserver_stop()
  if pid then core.waitpid(pid, 20) end
end

-- Python 3.12's warning: a fork in a process with threads copies only the calling
-- one; a lock another held stays held in the child. Looked at most twice a second,
-- and never in a process that never had another thread (reading /proc cost five
-- system calls at every cold start).
local warned, looked = false, -1
local single_threaded = core.single_threaded
function M._warn_fork()
  if warned or single_threaded() then return end
  local t = core.now()
  if t - looked < 0.5 then return end
  looked = t
  local n = core._threads()
  if n > 1 then
    warned = true
    io.stderr:write(("multiprocessing: this process has %d threads: fork copies only the calling one, so a lock "
      .. "another thread holds stays held in the child (it may hang). Use the \"forkserver\" start method "
      .. "(mp.set_start_method(\"forkserver\"), or start_method = \"forkserver\").\n"):format(n))
  end
end

-- Starts a child by method (not fork) with the start message v: { module, entry,
-- payload } (multiprocessing.spawn calls require(module)[entry](payload)).
-- fd: a descriptor the child gets too (core._passed_fd() there). The pid, or nil and the reason (a value that cannot be sent, an OS failure).
-- The message owns its handles' references until a child takes them: a failed
-- start releases them, and so does its collection after an error here (Ctrl-C).
function M._start(method, v, daemon, fd)
  local ok, msg = pcall(core._startmsg, v)
  if not ok then return nil, (tostring(msg):gsub("^[^\n]-:%d+: ", "")) end
  local pid, err
  if method == "spawn" then
    pid, err = core._spawn(M.get_executable(), msg, daemon, package.path, package.cpath, fd)
  else
    pid, err = core._forkserver_fork(msg, daemon, package.path, package.cpath, fd)
  end
  return pid, err
end

------------------------------------------------------------ contexts

local Context = { __name = "multiprocessing.Context" }

-- mp.get_context(method): the module's names, with Process and Pool using method
-- (and get_start_method saying it); nil: the default context
function M._install(mp)
  mp.set_start_method, mp.get_start_method, mp.get_all_start_methods = M.set_start_method, M.get_start_method, M.get_all_start_methods
  mp.set_executable, mp.get_executable, mp.forkserver_start = M.set_executable, M.get_executable, M.forkserver_start
  local contexts = {}
  function mp.get_context(method)
    if method == nil then method = M.get_start_method() end
    M._check(method, "get_context", 1, 2)
    if contexts[method] then return contexts[method] end
    local ctx = setmetatable({ _method = method }, {
      __index = mp, __name = "multiprocessing.Context",
      __tostring = function() return "<multiprocessing context '" .. method .. "'>" end,
    })
    function ctx.get_start_method() return method end
    function ctx.Process(opts)
      if type(opts) == "table" and opts.start_method == nil then
        local o = {}
        for k, x in pairs(opts) do o[k] = x end
        o.start_method = method
        opts = o
      end
      return mp.Process(opts)
    end
    function ctx.Pool(opts)
      if type(opts) == "table" then
        if opts.backend ~= nil or opts.start_method ~= nil then return mp.Pool(opts) end
        local o = {}
        for k, x in pairs(opts) do o[k] = x end
        o.start_method = method
        return mp.Pool(o)
      elseif opts == nil or type(opts) == "number" then
        return mp.Pool { processes = opts, start_method = method }
      end
      return mp.Pool(opts)  -- (its error)
    end
    contexts[method] = ctx
    return ctx
  end
end
M.Context = Context

return M
