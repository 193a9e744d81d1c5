-- pool_progress.lua: a progress bar like tqdm (seed 001), on stderr when it is a terminal.
local mp = require "multiprocessing"

local function work(x)
  mp.sleep(0.01)
  return x * x
end

local xs = {}
for i = 1, 200 do xs[i] = i end

local pool <close> = mp.Pool(4)

-- progress = true: the pool draws the bar while map runs (use progress = "force" when stderr
-- is not a terminal)
local r = pool:map(work, xs, { progress = true, chunksize = 2 })
print("map:", r[200])

-- mp.progress(iter [, total]) wraps any iterator, here imap's
local sum = 0
for _, v in mp.progress(pool:imap(work, xs, 2), #xs) do sum = sum + v end
print("imap sum:", sum)
