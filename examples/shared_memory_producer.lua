-- shared_memory_producer: makes a named segment, writes into it, and lets an unrelated
-- process (another lua5.4 started from a shell, not a fork) attach to it by name and
-- answer in it: Python's shared_memory docs example, across two interpreters.
local mp = require "multiprocessing"

local shm <close> = assert(mp.SharedMemory { create = true, size = 128 })
shm:write(1, "hello from the producer")
local numbers = shm:view("i", 33, 4)          -- 4 int32 from byte 33
numbers:set(1, { 1, 2, 3, 4 })
print("producer made", shm.name)

-- the consumer: this directory's shared_memory_consumer.lua, run by the same interpreter
local here = arg[0]:match("^(.*)/") or "."
local lua = arg[-1] or "lua5.4"
local p = io.popen(("%s %s/shared_memory_consumer.lua %s"):format(lua, here, shm.name))
io.write(p:read("a"))
assert(p:close(), "the consumer failed")

print("producer reads back", table.concat(numbers:totable(), " "))   --> 2 4 6 8
print("consumer's note:", shm:read(49):match("^%Z*"))

-- the creator unlinks it; had this process been killed, its tracker would have
assert(shm:unlink())
