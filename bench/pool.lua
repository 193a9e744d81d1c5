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

-- first, while the parent is small (fork copies page tables: both sides measured alike)
print(("pool: Pool(2) + 1 task per worker + close/join\t%.6f\t1\tpool"):format(median(function()
  return timed(function()
    local pool = mp.Pool(2)
    pool:map(double, { 1, 2 }, 1)
    pool:close()
    pool:join()
  end)
end, 9)))

local N = 200000
local xs = {}
for i = 1, N do xs[i] = i end

do
  local pool <close> = mp.Pool(2)
  print(("pool: map x*2 over 200,000\t%.6f\t%d\titem"):format(median(function()
    return timed(function() assert(pool:map(double, xs)[N] == 2 * N) end)
  end, 5), N))
  print(("pool: imap chunksize=1 over 200,000\t%.6f\t%d\titem"):format(median(function()
    return timed(function()
      local s = 0
      for _, v in pool:imap(double, xs, 1) do s = s + v end
      assert(s == N * (N + 1))
    end)
  end, 3), N))
end

-- N tasks sent one by one, then their results taken: time and the Lua heap's growth
local function one_by_one(pool, send, take)
  collectgarbage()
  local before = collectgarbage("count")
  local high = before
  local t = timed(function()
    local rs = {}
    for i = 1, N do rs[i] = send(pool, i) end
    high = math.max(high, collectgarbage("count"))
    local s = 0
    for i = 1, N do s = s + take(rs[i]) end
    high = math.max(high, collectgarbage("count"))
    assert(s == N * (N + 1))
  end)
  return t, (high - before) / 1024
end

do
  local pool <close> = mp.Pool(2)
  local t, heap = one_by_one(pool, function(p, i) return p:apply_async(double, { i }) end, function(r) return r:get() end)
  print(("pool: 200,000 apply_async + get\t%.6f\t%d\ttask"):format(t, N))
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
  -- serial and parallel runs alternate, so that the machine's drifting speed hits both alike
  local pool <close> = mp.Pool(2)
  local ss, ps = {}, {}
  for r = 1, 5 do
    ss[r] = timed(function() for _, n in ipairs(items) do burn(n) end end)
    ps[r] = timed(function() pool:map(burn, items, 1) end)
  end
  table.sort(ss) table.sort(ps)
  local serial, par = ss[3], ps[3]
  print(("pool: cpu-bound 16 x 3M-iteration loop, Pool(2)\t%.6f\t16\titem"):format(par))
  print(("# cpu-bound: serial %.3f s, Pool(2) %.3f s, speedup %.2fx (goal 1.9x)"):format(serial, par, serial / par))
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
