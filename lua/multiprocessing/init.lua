-- multiprocessing: process-based parallelism for Lua 5.4 (the public module).
-- The parts of the Lua layer are loaded on first use of one of their names: loading all of them
-- (parsing about 200 KB of Lua) cost milliseconds at every `require "multiprocessing"`.
local core = require "multiprocessing.core"

-- The other files of the layer load from the bytecode built into the core when they are the very
-- files it was built from (src/capi.c, layer_searcher), else from their sources: parsing them cost
-- milliseconds. (Loaded by luaopen_multiprocessing, the layer is in package.preload already.)
if select(2, ...) ~= ":preload:" then core._layer_searcher(package) end

local M = {
  _VERSION = core._VERSION,
  encode = core.encode,
  decode = core.decode,
  register_metatable = core.register_metatable,
}

-- The parts, each returning a table of public names; a name found in two parts is the later one's.
local PARTS = { "process", "pipe", "queue", "sync", "shared", "shared_memory", "pool", "progress", "manager", "parallel" }

-- Which part holds each public name. A name missing here is still found: looking it up loads
-- every part (spec/init_spec.lua checks that this table is complete). Written out: split from
-- strings at each start, it and _metatable_modules cost 0.2M instructions.
local WHERE = {
  Process = "process", TaskError = "process", active_children = "process", cpu_count = "process",
  current_process = "process", now = "process", parent_process = "process", sleep = "process",
  Pipe = "pipe",
  JoinableQueue = "queue", Queue = "queue", SimpleQueue = "queue",
  Barrier = "sync", BoundedSemaphore = "sync", Condition = "sync", Event = "sync", Lock = "sync", RLock = "sync",
  Semaphore = "sync",
  Array = "shared", Value = "shared",
  ShareableList = "shared_memory", SharedMemory = "shared_memory",
  ALL_COMPLETED = "pool", FIRST_COMPLETED = "pool", FIRST_EXCEPTION = "pool", Pool = "pool", as_completed = "pool",
  wait = "pool",
  progress = "progress",
  Manager = "manager",
  Parallel = "parallel", delayed = "parallel",
  forkserver_start = "context", get_all_start_methods = "context", get_context = "context",
  get_executable = "context", get_start_method = "context", set_executable = "context",
  set_start_method = "context",
}

-- Metatables a part registers with the codec (core.register_metatable), by name, and the part:
-- a process that receives such a value before loading the part has the codec load it
-- (src/codec.c, T_NAMEDMT). A name not listed here loads every part.
M._metatable_modules = {
  ["multiprocessing.TaskError"] = "multiprocessing.process",
  ["multiprocessing.DictProxy"] = "multiprocessing.manager", ["multiprocessing.ListProxy"] = "multiprocessing.manager",
  ["multiprocessing.SetProxy"] = "multiprocessing.manager", ["multiprocessing.NamespaceProxy"] = "multiprocessing.manager",
  ["multiprocessing.ValueProxy"] = "multiprocessing.manager", ["multiprocessing.ArrayProxy"] = "multiprocessing.manager",
  ["multiprocessing.LockProxy"] = "multiprocessing.manager", ["multiprocessing.ConditionProxy"] = "multiprocessing.manager",
  ["multiprocessing.EventProxy"] = "multiprocessing.manager", ["multiprocessing.BarrierProxy"] = "multiprocessing.manager",
  ["multiprocessing.UserProxy"] = "multiprocessing.manager", ["multiprocessing.PoolProxy"] = "multiprocessing.manager",
  ["multiprocessing.AsyncResultProxy"] = "multiprocessing.manager",
  ["multiprocessing.Delayed"] = "multiprocessing.parallel",
}

local loaded = {}  -- part -> true once its names are in M

local function load(part)
  loaded[part] = true
  if part == "context" then return require("multiprocessing.context")._install(M) end  -- start methods
  for k, v in pairs(require("multiprocessing." .. part)) do
    -- a name WHERE gives to another part is that part's (load_all settles names it does not know)
    if not k:find("^_") and (WHERE[k] == part or WHERE[k] == nil and rawget(M, k) == nil) then rawset(M, k, v) end
  end
end

local function load_all()
  for _, part in ipairs(PARTS) do
    if not loaded[part] then load(part) end
  end
  if not loaded.context then load("context") end
  for _, part in ipairs(PARTS) do  -- again, in order: later parts' names win
    for k, v in pairs(require("multiprocessing." .. part)) do
      if not k:find("^_") then rawset(M, k, v) end
    end
  end
  if rawget(M, "connection") == nil then rawset(M, "connection", require "multiprocessing.connection") end
  setmetatable(M, nil)
end

-- sync.lua adds methods to the core's lock classes (hold, Condition:wait_for), which other
-- parts hand out (Value:get_lock(), Array:get_lock()...). Until it is loaded, those methods
-- are stand-ins that load it and call its own (a tail call: its errors still name the user's
-- line). They hold nothing but the methods' table: the codec may walk the core's tables by
-- value before it sends the core by name, and must meet nothing unsendable there.
if not package.loaded["multiprocessing.sync"] then
  local sync_methods = core.sync_methods
  for class, names in pairs { Lock = "hold", RLock = "hold", Semaphore = "hold", BoundedSemaphore = "hold",
    Condition = "hold wait_for" } do
    for name in names:gmatch("%S+") do
      local stand_in
      stand_in = function(...)
        require "multiprocessing.sync"  -- replaces every stand-in
        local f = sync_methods[class][name]
        if f == stand_in then error("multiprocessing.sync did not load", 2) end
        return f(...)
      end
      sync_methods[class][name] = stand_in
    end
  end
end

setmetatable(M._metatable_modules, {
  __index = function(_, name)
    if type(name) == "string" and name:find("^multiprocessing%.") then
      load_all()
      return "multiprocessing"
    end
  end,
})

setmetatable(M, {
  __index = function(_, k)
    if k == "connection" then  -- Listener, Client, wait: as Python's, not at the top
      local c = require "multiprocessing.connection"
      rawset(M, k, c)
      return c
    end
    local part = WHERE[k]
    if part and not loaded[part] then
      load(part)
      return rawget(M, k)
    end
    if type(k) ~= "string" or k:find("^_") then return nil end
    load_all()  -- a name this table does not know yet, or none at all
    return rawget(M, k)
  end,
  __pairs = function()
    load_all()
    return next, M, nil
  end,
})

return M
