-- spawn.lua: where a spawned interpreter and a forkserver's worker begin (see src/forkserver.c).
local M = {}

local function say(what, e)
  io.stderr:write("multiprocessing: ", what, ": ", tostring(e), "\n")
end

--- run(message): decodes the start message { module, entry, payload } and calls
--- require(module)[entry](payload), which ends the process; never returns
function M.run(bytes)
  local core = require "multiprocessing.core"
  local ok, e = xpcall(function()
    require "multiprocessing"  -- (the registered metatables, before decoding)
    local m = core._startdecode(bytes)
    bytes = nil
    return require(m.module)[m.entry](m.payload)
  end, debug.traceback)
  if not ok then say("a child could not start (pid " .. core.getpid() .. ")", e) end
  core._exit(ok and 0 or 1)
end

--- main(): the entry of `lua5.4 -e "require'multiprocessing.spawn'.main()"`
function M.main()
  local core = require "multiprocessing.core"
  local ok, s = pcall(core._attach)
  if not ok then say("a spawned interpreter could not start (pid " .. core.getpid() .. ")", s) core._exit(1) end
  M.run(s)
end

return M
