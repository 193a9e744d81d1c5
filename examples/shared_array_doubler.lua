-- shared_array_doubler: one child per index doubles a shared Array in place.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local arr = mp.Array("d", { 5, 10, 15, 20, 25 })
print("before", table.concat(arr:totable(), " "))

local pids = {}
for i = 1, #arr do
  local pid = core.fork()
  if pid == 0 then
    local ok = pcall(function() arr[i] = arr[i] * 2 end)
    core._exit(ok and 0 or 1)
  end
  pids[i] = pid
end
for _, pid in ipairs(pids) do assert(core.waitpid(pid) == 0) end

print("after ", table.concat(arr:totable(), " "))
