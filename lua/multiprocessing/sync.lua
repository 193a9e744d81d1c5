-- sync.lua: Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition, Barrier (see docs/sync.md).
local core = require "multiprocessing.core"

local error, setmetatable = error, setmetatable
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

local function hold(self, timeout)
  local ok, why = self:acquire(true, timeout)
  if not ok then return nil, why or "timeout" end  -- acquire's false: the timeout passed
  return setmetatable({ self }, guard_mt), why
end

for _, name in ipairs { "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition" } do
  core.sync_methods[name].hold = hold
end

-- cond:wait_for(predicate [, timeout]) -> the predicate's last result
function core.sync_methods.Condition.wait_for(self, predicate, timeout)
  local result = predicate()
  if result then return result end
  local deadline = timeout and now() + timeout
  while not result do
    local left
    if deadline then
      left = deadline - now()
      if left <= 0 then break end
    end
    local ok, why = self:wait(left)
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
