-- multiprocessing: process-based parallelism for Lua 5.4 (the public module).
local core = require "multiprocessing.core"

local M = {
  _VERSION = core._VERSION,
  encode = core.encode,
  decode = core.decode,
  register_metatable = core.register_metatable,
}

-- The parts of the Lua layer each return a table of public names.
for _, part in ipairs { "process", "pipe", "queue", "sync", "shared", "shared_memory", "pool", "progress", "manager", "parallel" } do
  for k, v in pairs(require("multiprocessing." .. part)) do
    if not k:find("^_") then M[k] = v end
  end
end

require("multiprocessing.context")._install(M)  -- start methods, get_context
M.connection = require "multiprocessing.connection"  -- Listener, Client, wait: as Python's, not at the top

return M
