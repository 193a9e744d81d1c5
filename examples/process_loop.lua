-- process_loop: the first tutorial's comparison of processes and threads, in Lua terms: 8
-- empty CPU loops run as 8 processes, as 8 coroutines (Lua's threads: they take turns on
-- one core, so they run no faster than the loops one after the other), and one by one.
local mp = require "multiprocessing"

local n_loop = 10000000
local n_x = 8

local function loop()
  for i = 1, n_loop do
    if i % 1000000 == 0 and coroutine.isyieldable() then coroutine.yield() end
  end
end

local function timed(label, fn)
  local t0 = mp.now()
  fn()
  local dt = mp.now() - t0
  print(("%-24s %.2f s"):format(label, dt))
  return dt
end

print("start", os.date("%H:%M:%S"))

local parallel = timed("run end (processes)", function()
  local xs = {}
  for i = 1, n_x do xs[i] = mp.Process { target = loop }:start() end
  for _, x in ipairs(xs) do x:join() end
end)

timed("run end (coroutines)", function()
  local cos = {}
  for i = 1, n_x do cos[i] = coroutine.create(loop) end
  local running = n_x
  while running > 0 do   -- a round-robin scheduler: each coroutine runs until it yields
    running = 0
    for _, co in ipairs(cos) do
      if coroutine.status(co) == "suspended" then
        assert(coroutine.resume(co))
        running = running + 1
      end
    end
  end
end)

local serial = timed("loop end (one by one)", function()
  for _ = 1, n_x do loop() end
end)

print(("processes: %.2fx the serial speed on %d cores; coroutines share one core"):format(
  serial / parallel, mp.cpu_count()))
