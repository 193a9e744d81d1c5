-- shared_memory_consumer: attaches to a segment by name (see shared_memory_producer.lua,
-- which starts it), reads what the producer wrote, doubles its numbers, leaves a note.
--   lua5.4 examples/shared_memory_consumer.lua <name>
local mp = require "multiprocessing"

local name = arg[1]
if not name then
  print("usage: lua5.4 shared_memory_consumer.lua <segment name> (run shared_memory_producer.lua)")
  return
end
local shm <close> = assert(mp.SharedMemory { name = name })   -- attach: no create, no size
print("consumer attached to", shm.name, shm.size, "bytes")
print("consumer read", shm:read(1, 23))
local numbers = shm:view("i", 33, 4)
for i, x in ipairs(numbers) do numbers[i] = x * 2 end
shm:write(49, "doubled by pid " .. require("multiprocessing.core").getpid())
