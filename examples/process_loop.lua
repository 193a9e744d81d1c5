-- process_loop: the first tutorial's comparison: 8 processes each running an empty loop,
-- against the same 8 loops run one after the other (Lua has no threads to compare).
local mp = require "multiprocessing"

local n_loop = 10000000
local n_x = 8

local function loop()
  for _ = 1, n_loop do end
end

print("start", os.date("%H:%M:%S"))
local t0 = mp.now()
local xs = {}
for i = 1, n_x do
  xs[i] = mp.Process { target = loop }
  xs[i]:start()
end
for _, x in ipairs(xs) do x:join() end
local parallel = mp.now() - t0
print(("run end (processes) %.2f s"):format(parallel))

t0 = mp.now()
for _ = 1, n_x do loop() end
local serial = mp.now() - t0
print(("loop end (serial)   %.2f s"):format(serial))
print(("speedup %.2fx on %d cores"):format(serial / parallel, mp.cpu_count()))
