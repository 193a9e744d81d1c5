-- chaos/case.lua: runs one chaos case (lua5.4 chaos/case.lua NAME), in the session the runner made.
-- Prints the case's figures as CHAOS-FIG lines and ends with "CHAOS-RESULT pass" or
-- "CHAOS-RESULT fail <why>"; the exit status says the same.
local name = arg[1]
local L = require "chaos.lib"

local case
for _, family in ipairs(require "chaos.cases") do
  for _, c in ipairs(require("chaos." .. family)) do
    if c.name == name then case = c end
  end
end
if not case then
  io.stdout:write("CHAOS-RESULT fail no case named ", tostring(name), "\n")
  os.exit(2)
end

L.seed(name)
local ok, err = xpcall(case.run, function(e)
  if type(e) == "table" and e.msg then return e.msg end  -- a case failure: its message says it all
  return debug.traceback(tostring(e), 2)
end, L)
local cok, cerr = pcall(L.cleanup_victims)
if ok and not cok then ok, err = false, "cleanup failed: " .. tostring(cerr) end
L.emit()
io.stdout:write("CHAOS-RESULT ", ok and "pass" or ("fail " .. tostring(err):gsub("\n", "\n  ")), "\n")
io.stdout:flush()
-- leave without finalizers: what the case left open is the runner's to find, not ours to hide
L.core._exit(ok and 0 or 1)
