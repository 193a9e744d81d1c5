-- pipe.lua: Pipe, a pair of Connections (the C side is src/pipe.c; see docs/pipe.md).
local core = require "multiprocessing.core"

local M = {}

-- Pipe([duplex = true]) -> a, b. Duplex: both ends send and receive.
-- One-way (duplex = false): a is the read end, b the write end.
function M.Pipe(duplex)
  if duplex == nil then duplex = true end
  return core.pipe(duplex and true or false)
end

return M
