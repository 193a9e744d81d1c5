-- bench/pipe.lua: Pipe throughput between a parent and a forked child (pairs with bench/pipe.py).
-- Prints "<workload>\t<seconds>" (median of 3 runs) per workload, then a rate on stderr.
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path
package.cpath = "./" .. (os.getenv("MP_BUILD") or "build") .. "/?.so;" .. package.cpath
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

-- The child sends n messages made by make(i); the parent receives them all.
local function run(n, make)
  local r, w = mp.Pipe(false)
  local pid = core.fork()
  if pid == 0 then
    local ok = pcall(function()
      r:close()
      for i = 1, n do assert(w:send(make(i))) end
      w:close()
    end)
    core._exit(ok and 0 or 1)
  end
  w:close()
  local t0 = core.now()
  for _ = 1, n do assert(r:recv() ~= nil) end
  local dt = core.now() - t0
  r:close()
  assert(core.waitpid(pid) == 0)
  return dt
end

local function median3(f)
  local t = { f(), f(), f() }
  table.sort(t)
  return t[2]
end

local N_SMALL, N_BIG, MiB = 100000, 1000, 1 << 20
local big = ("x"):rep(MiB)
local small = median3(function() return run(N_SMALL, function(i) return i end) end)
print(("small_messages\t%.4f"):format(small))
io.stderr:write(("  %.0f messages/s\n"):format(N_SMALL / small))
local large = median3(function() return run(N_BIG, function() return big end) end)
print(("1MiB_messages\t%.4f"):format(large))
io.stderr:write(("  %.0f MB/s\n"):format(N_BIG * MiB / 1e6 / large))
