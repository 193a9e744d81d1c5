rockspec_format = "3.0"
package = "multiprocessing"
version = "0.1.0-1"  -- 0.1.0 is MP_VERSION in src/mp.h (the module's _VERSION); spec/build_spec.lua checks both
source = {
  url = "git+https://github.com/lua-multiprocessing/lua-multiprocessing.git",
  tag = "v0.1.0",
}
description = {
  summary = "Process-based parallelism for Lua 5.4: Pool, Process, Queue, Pipe, locks, shared memory",
  detailed = [[
    Python's multiprocessing for Lua 5.4 on Linux: fork-based Pool with map/imap/imap_unordered/
    starmap/apply_async, Process, Queue, Pipe, Lock, Event, Condition, Barrier, Value and Array,
    with a value codec that sends closures with their upvalues.
  ]],
  homepage = "https://github.com/lua-multiprocessing/lua-multiprocessing",
  license = "MIT",
}
supported_platforms = { "linux" }
dependencies = {
  "lua >= 5.4, < 5.5",
}
-- headers only: the core opens libcrypto and libhiredis itself at their first use (dlopen,
-- src/dynlib.h); at run time Debian's libssl3 and libhiredis0.14 (the -dev packages' dependencies)
external_dependencies = {
  OPENSSL = { header = "openssl/hmac.h" },
  HIREDIS = { header = "hiredis/hiredis.h" },
}
build = {
  type = "builtin",
  install = { bin = { ["mp-worker"] = "bin/mp-worker" } },
  modules = {
    ["multiprocessing"] = "lua/multiprocessing/init.lua",
    ["multiprocessing.process"] = "lua/multiprocessing/process.lua",
    ["multiprocessing.pipe"] = "lua/multiprocessing/pipe.lua",
    ["multiprocessing.queue"] = "lua/multiprocessing/queue.lua",
    ["multiprocessing.sync"] = "lua/multiprocessing/sync.lua",
    ["multiprocessing.shared"] = "lua/multiprocessing/shared.lua",
    ["multiprocessing.shared_memory"] = "lua/multiprocessing/shared_memory.lua",
    ["multiprocessing.process_class"] = "lua/multiprocessing/process_class.lua",
    ["multiprocessing.pool"] = "lua/multiprocessing/pool.lua",
    ["multiprocessing.pool_async"] = "lua/multiprocessing/pool_async.lua",
    ["multiprocessing.pool_faults"] = "lua/multiprocessing/pool_faults.lua",
    ["multiprocessing.progress"] = "lua/multiprocessing/progress.lua",
    ["multiprocessing.manager"] = "lua/multiprocessing/manager.lua",
    ["multiprocessing.parallel"] = "lua/multiprocessing/parallel.lua",
    ["multiprocessing.managers.server"] = "lua/multiprocessing/managers/server.lua",
    ["multiprocessing.managers.pool"] = "lua/multiprocessing/managers/pool.lua",
    ["multiprocessing.connection"] = "lua/multiprocessing/connection.lua",
    ["multiprocessing.stream"] = "lua/multiprocessing/stream.lua",
    ["multiprocessing.stream_pool"] = "lua/multiprocessing/stream_pool.lua",
    ["multiprocessing.stream_worker"] = "lua/multiprocessing/stream_worker.lua",
    ["multiprocessing.context"] = "lua/multiprocessing/context.lua",
    ["multiprocessing.spawn"] = "lua/multiprocessing/spawn.lua",
    ["multiprocessing.core"] = {
      sources = {
        "src/arena.c", "src/capi.c", "src/codec.c", "src/core.c", "src/dynlib.c", "src/forkserver.c", "src/pipe.c", "src/pool.c",
        "src/process.c", "src/queue.c", "src/redis.c", "src/shared.c", "src/shm.c", "src/socket.c", "src/sync.c", "src/wait.c",
      },
      -- the headers of OpenSSL's libcrypto (Debian: libssl-dev), for the HMACs of Listener/Client
      -- and the Pool on Redis, and of hiredis (Debian: libhiredis-dev), its Redis client; the
      -- libraries are not linked (a fresh require maps neither, and forks copy none of their pages)
      incdirs = { "src", "$(OPENSSL_INCDIR)", "$(HIREDIS_INCDIR)" },
    },
  },
}
test = {
  type = "busted",
}
