-- bench/pool.lua: Pool workloads, the same as bench/pool.py does with Python's Pool.
-- Prints "<row>\t<seconds>[\t<units>\t<unit>]" lines (median of repeats) for bench/run.lua,
-- and "#" lines with notes (memory, speedups, seed timings).
local mp = require "multiprocessing"

local lib = dofile("bench/lib.lua")
local median, timed = lib.median, lib.timed

local function peak_kib()
  for line in io.lines("/proc/self/status") do
    local v = line:match("^VmHWM:%s*(%d+)")
    if v then return tonumber(v) end
  end
end

local mode = arg[1]
if mode == "imap-iter" then  -- a child run: imap over an iterator of n items, then peak memory
  local n = tonumber(arg[2])
  local pool <close> = mp.Pool(2)
  local i = 0
  local s = 0
  for _, v in pool:imap(function(x) return x * 2 end, function() i = i + 1 if i <= n then return i end end) do
    s = s + v
  end
  assert(s == n * (n + 1))
  print(peak_kib())
  return
end

local double = function(x) return x * 2 end

-- the parent's own CPU time (os.clock: this process, not its children) and wall time of f
local function cpu_timed(f)
  local c0, t0 = os.clock(), mp.now()
  f()
  return os.clock() - c0, mp.now() - t0
end

-- Cold start: a fresh interpreter that requires the library, starts Pool(2), runs 2 tasks and
-- closes and joins it, less the same interpreter started with nothing to do (both through
-- the shell, alternating; medians of 11).
local LUA = arg[-1] or "lua5.4"
local COLD = [[local mp = require "multiprocessing" local p = mp.Pool(2) ]]
  .. [[assert(p:map(function(x) return x * 2 end, { 1, 2 }, 1)[2] == 4) p:close() p:join()]]
do
  local work, base = {}, {}
  for r = 1, 11 do
    base[r] = timed(function() assert(os.execute(LUA .. " -e ''")) end)
    work[r] = timed(function() assert(os.execute(LUA .. " -e '" .. COLD .. "'")) end)
  end
  table.sort(work) table.sort(base)
  print(("pool: cold start (fresh interpreter: require + Pool(2) + 2 tasks + close/join)\t%.6f\t1\tpool"):format(work[6] - base[6]))
  print("limit\tpool: cold start (fresh interpreter: require + Pool(2) + 2 tasks + close/join)\tfork2\t1")
end

-- Warm start, while the parent is small (fork copies page tables: both sides measured alike)
print(("pool: warm start (Pool(2) + 2 tasks + close/join)\t%.6f\t1\tpool"):format(median(function()
  return timed(function()
    local pool = mp.Pool(2)
    pool:map(double, { 1, 2 }, 1)
    pool:close()
    pool:join()
  end)
end, 11)))
print("limit\tpool: warm start (Pool(2) + 2 tasks + close/join)\tfork2\t1")

local N = 200000
local xs = {}
for i = 1, N do xs[i] = i end

do
  local pool <close> = mp.Pool(2)
  local bytes = 2 * #mp.encode(xs)  -- the items out and the results back: the memcpy floor
  local walls, cpus = {}, {}
  for r = 1, 7 do
    cpus[r], walls[r] = cpu_timed(function() assert(pool:map(double, xs)[N] == 2 * N) end)
  end
  table.sort(walls) table.sort(cpus)
  print(("pool: map x*2 over 200,000\t%.6f\t%d\titem"):format(walls[4], N))
  print(("limit\tpool: map x*2 over 200,000\tmemcpy\t%d"):format(bytes))
  print(("pool: parent CPU per item in map x*2 over 200,000\t%.9f\t1\titem"):format(cpus[4] / N))
  print(("pool: map x*2 over 200,000, chunksize 1000\t%.6f\t%d\titem"):format(median(function()
    return timed(function() assert(pool:map(double, xs, 1000)[N] == 2 * N) end)
  end, 7), N))
  print(("limit\tpool: map x*2 over 200,000, chunksize 1000\tmemcpy\t%d"):format(bytes))
  print(("pool: imap chunksize=1 over 200,000\t%.6f\t%d\titem"):format(median(function()
    return timed(function()
      local s = 0
      for _, v in pool:imap(double, xs, 1) do s = s + v end
      assert(s == N * (N + 1))
    end)
  end, 3), N))
  print(("limit\tpool: imap chunksize=1 over 200,000\tspin\t%d"):format(N))
end

-- N tasks sent one by one, then their results taken: wall time, the parent's CPU time and the
-- Lua heap's growth
local function one_by_one(pool, send, take)
  collectgarbage()
  local before = collectgarbage("count")
  local high = before
  local cpu, t = cpu_timed(function()
    local rs = {}
    for i = 1, N do rs[i] = send(pool, i) end
    high = math.max(high, collectgarbage("count"))
    local s = 0
    for i = 1, N do s = s + take(rs[i]) end
    high = math.max(high, collectgarbage("count"))
    assert(s == N * (N + 1))
  end)
  return t, (high - before) / 1024, cpu
end

do
  local pool <close> = mp.Pool(2)
  local ts, cpus, heap = {}, {}, 0
  for r = 1, 3 do
    local h
    ts[r], h, cpus[r] = one_by_one(pool, function(p, i) return p:apply_async(double, { i }) end, function(r) return r:get() end)
    heap = math.max(heap, h)
  end
  table.sort(ts) table.sort(cpus)
  print(("pool: 200,000 apply_async + get\t%.6f\t%d\ttask"):format(ts[2], N))
  print(("limit\tpool: 200,000 apply_async + get\tspin\t%d"):format(N))
  print(("pool: parent CPU per task in apply_async + get\t%.9f\t1\ttask"):format(cpus[2] / N))
  print(("# apply_async: Lua heap grew by %.1f MiB at most (peak RSS %.1f MiB)"):format(heap, peak_kib() / 1024))
end

do  -- the same work as futures: submit + result (submit must be at least as fast as apply_async)
  local pool <close> = mp.Pool(2)
  local t, heap = one_by_one(pool, function(p, i) return p:submit(double, i) end, function(f) return f:result() end)
  print(("pool: 200,000 submit + result\t%.6f\t%d\ttask"):format(t, N))
  print(("# submit: Lua heap grew by %.1f MiB at most"):format(heap))
  -- against concurrent.futures.ProcessPoolExecutor (a smaller count: it takes ~0.2 ms a task)
  local M = 20000
  t = median(function()
    return timed(function()
      local fs = {}
      for i = 1, M do fs[i] = pool:submit(double, i) end
      local s = 0
      for f in mp.as_completed(fs) do s = s + f:result() end
      assert(s == M * (M + 1))
    end)
  end, 3)
  print(("pool: 20,000 submit + as_completed/result\t%.6f\t%d\ttask"):format(t, M))
end

local function burn(n)
  local x = 0
  for i = 1, n do x = (x + i * i) % 1000003 end
  return x
end

do
  local items = {}
  for i = 1, 16 do items[i] = 3000000 end
  -- The machine's capacity: two plain interpreters, each running half of the items, started
  -- together. Serial, two-interpreter and Pool(2) runs alternate, so that the machine's
  -- drifting speed hits all three alike; each figure is a median of 5.
  local half = ("local function burn(n) local x = 0 for i = 1, n do x = (x + i * i) %% 1000003 end return x end "
    .. "for _ = 1, %d do burn(%d) end"):format(#items // 2, items[1])
  local function two_interpreters()
    local a = assert(io.popen(LUA .. " -e '" .. half .. "'"))
    local b = assert(io.popen(LUA .. " -e '" .. half .. "'"))
    a:read("a") b:read("a")
    assert(a:close()) assert(b:close())
  end
  local pool <close> = mp.Pool(2)
  local ss, cs, ps = {}, {}, {}
  for r = 1, 5 do
    ss[r] = timed(function() for _, n in ipairs(items) do burn(n) end end)
    cs[r] = timed(two_interpreters)
    ps[r] = timed(function() pool:map(burn, items, 1) end)
  end
  table.sort(ss) table.sort(cs) table.sort(ps)
  local serial, cap, par = ss[3], cs[3], ps[3]
  print(("pool: cpu-bound 16 x 3M-iteration loop, Pool(2)\t%.6f\t16\titem"):format(par))
  print(("limit\tpool: cpu-bound 16 x 3M-iteration loop, Pool(2)\tcapacity\t%.6f"):format(cap))
  print(("# cpu-bound: serial %.3f s, two lua5.4 %.3f s (capacity %.2fx), Pool(2) %.3f s (speedup %.2fx):"
    .. " %.2f of capacity (goal 0.95)"):format(serial, cap, serial / cap, par, serial / par, cap / par))
end


do
  local function child_peak(n)
    local cmd = ('%s bench/pool.lua imap-iter %d'):format(arg[-1] or "lua5.4", n)
    local h = io.popen(cmd)
    local out = h:read("a")
    h:close()
    return tonumber(out:match("(%d+)")) or 0
  end
  local m1, t1 = 0, timed(function() end)
  t1 = timed(function() m1 = child_peak(1000000) end)
  local m10
  local t10 = timed(function() m10 = child_peak(10000000) end)
  print(("# imap over an iterator: 1,000,000 items peak %.1f MiB (%.2f s); 10,000,000 items peak %.1f MiB (%.2f s)")
    :format(m1 / 1024, t1, m10 / 1024, t10))
end

do  -- the seed's timings: Pool(3) over sleeps of 0.1, 0.5, 0.3 s
  local pool <close> = mp.Pool(3)
  local secs = { 0.1, 0.5, 0.3 }
  local wait_sec = function(s) mp.sleep(s) return s * s end
  local t0 = mp.now()
  pool:map(wait_sec, secs)
  local line = ("# seed timings: map %.2f s; imap"):format(mp.now() - t0)
  t0 = mp.now()
  for _ in pool:imap(wait_sec, secs) do line = line .. (" %.2f"):format(mp.now() - t0) end
  line = line .. "; imap_unordered"
  t0 = mp.now()
  for _ in pool:imap_unordered(wait_sec, secs) do line = line .. (" %.2f"):format(mp.now() - t0) end
  print(line .. " (expected 0.5; 0.1 0.5 0.5; 0.1 0.3 0.5)")
end
