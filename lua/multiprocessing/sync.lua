-- sync.lua: Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition, Barrier (see docs/sync.md).
local core = require "multiprocessing.core"

local error, setmetatable, getmetatable, pcall, type = error, setmetatable, getmetatable, pcall, type
local now = core.now

-- lock:hold([timeout]) acquires and returns a guard that releases at __close:
--   local guard <close> = lock:hold()
-- or nil, "timeout" | nil, "interrupted" (a nil guard is fine for <close>)
local guard_mt = {
  __name = "multiprocessing.guard",
  __close = function(g)
    local obj = g[1]
    if obj then g[1] = nil; obj:release() end
  end,
}
guard_mt.__index = { release = guard_mt.__close }

-- The classes' metatables, to check a self the way the core does (src/mp.h, "self checks").
local HOLDERS = { "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition" }
local class_of = {}
for _, name in ipairs(HOLDERS) do
  class_of[debug.getregistry()["multiprocessing." .. name] or name] = name
end

-- Errors name the user's call and value: a wrong self or timeout is checked here, and
-- an error of the core's methods called from here loses the position inside this file.
local function check_self(self, fname, want, ok)
  if not ok then
    local mt = type(self) == "userdata" and getmetatable(self)
    local got = type(mt) == "table" and type(mt.__name) == "string" and mt.__name:gsub("^multiprocessing%.", "")
    error(("bad argument #1 to '%s' (%s expected, got %s)"):format(fname, want, got or type(self)), 3)
  end
end

local function check_timeout(timeout, fname, arg)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout) then
    error(("bad argument #%d to '%s' (%s)"):format(arg, fname,
      type(timeout) == "number" and "timeout is NaN" or "number expected, got " .. type(timeout)), 3)
  end
end

local function rethrow(e)
  if type(e) == "string" then e = e:gsub("^[^\n]-sync%.lua:%d+: ", "") end
  error(e, 3)
end

local function hold(self, timeout)
  check_self(self, "hold", "Lock, RLock, Semaphore, BoundedSemaphore or Condition",
             class_of[getmetatable(self)] ~= nil)
  check_timeout(timeout, "hold", 1)
  local done, ok, why = pcall(self.acquire, self, true, timeout)
  if not done then rethrow(ok) end
  if not ok then return nil, why or "timeout" end  -- acquire's false: the timeout passed
  return setmetatable({ self }, guard_mt), why
end

for _, name in ipairs(HOLDERS) do
  core.sync_methods[name].hold = hold
end

-- cond:wait_for(predicate [, timeout]) -> the predicate's last result
function core.sync_methods.Condition.wait_for(self, predicate, timeout)
  check_self(self, "wait_for", "Condition", class_of[getmetatable(self)] == "Condition")
  if type(predicate) ~= "function" and not (type(getmetatable(predicate)) == "table" and getmetatable(predicate).__call) then
    error("bad argument #1 to 'wait_for' (function expected, got " .. type(predicate) .. ")", 2)
  end
  check_timeout(timeout, "wait_for", 2)
  local result = predicate()
  if result then return result end
  local deadline = timeout and now() + timeout
  local wait = self.wait
  while not result do
    local left
    if deadline then
      left = deadline - now()
      if left <= 0 then break end
    end
    local done, ok, why = pcall(wait, self, left)
    if not done then rethrow(ok) end
    if ok == nil and why == "interrupted" then return nil, why end
    result = predicate()
  end
  return result
end

return {
  Lock = core.Lock,
  RLock = core.RLock,
  Semaphore = core.Semaphore,
  BoundedSemaphore = core.BoundedSemaphore,
  Event = core.Event,
  Condition = core.Condition,
  Barrier = core.Barrier,
}
