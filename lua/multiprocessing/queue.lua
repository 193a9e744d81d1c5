-- queue.lua: the queues are in C (src/queue.c); this names them.
local core = require "multiprocessing.core"

return {
  Queue = core.Queue,
  SimpleQueue = core.SimpleQueue,
  JoinableQueue = core.JoinableQueue,
}
