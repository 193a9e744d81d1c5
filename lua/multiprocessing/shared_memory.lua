-- shared_memory.lua: SharedMemory, named shared memory that unrelated processes attach by name
-- (see docs/shared_memory.md).
local core = require "multiprocessing.core"

return {
  SharedMemory = core.SharedMemory,
}
