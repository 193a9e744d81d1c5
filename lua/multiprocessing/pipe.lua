-- pipe.lua: Pipe, a pair of Connections (the C side is src/pipe.c; see docs/pipe.md).
local core = require "multiprocessing.core"

local M = {}

-- Pipe([duplex = true]) -> a, b. Duplex: both ends send and receive.
-- One-way (duplex = false): a is the read end, b the write end.
function M.Pipe(duplex)
  if duplex == nil then duplex = true end
  if type(duplex) ~= "boolean" then
    error("bad argument #1 to 'Pipe' (boolean expected, got " .. type(duplex) .. ")", 2)
  end
  return core.pipe(duplex)
end

return M
