-- pool_frame_loop.lua: a 60 Hz frame loop that drives a Pool with pool:poll() and sleeps on
-- pool:fileno() between frames (docs/pool.md, "Driving a pool from a frame loop").
local mp = require "multiprocessing"
local core = require "multiprocessing.core"  -- (poll_fds: a select() on descriptors, for the demo)

local function checksum(n)  -- a task: some work on a table of n integers
  local t, s = {}, 0
  for i = 1, n do t[i] = i * 7 % 1000 end
  for i = 1, n do s = s + t[i] end
  return s
end

local pool <close> = mp.Pool { processes = 2, respawn = "poll" }  -- respawns wait for a poll
local fd = pool:fileno()  -- readable while pool:poll() has something to do

local done, expected, mapped = 0, 0, nil
local frame, worst, busiest = 0, 0, 0
local FRAME = 1 / 60

while frame < 600 do
  frame = frame + 1
  local start = mp.now()
  -- the game's work: every few frames, ask for some results
  if frame % 5 == 0 and frame <= 60 then
    for _ = 1, 10 do
      expected = expected + 1
      pool:apply_async(checksum, { 2000 }, { callback = function() done = done + 1 end })
    end
  end
  if frame == 10 then  -- a big batch: submission sends only a window of it
    local items = {}
    for i = 1, 20000 do items[i] = 100 + i % 50 end
    pool:map_async(checksum, items, { callback = function(r) mapped = #r end })
  end
  -- the rest of the frame: the pool's turn whenever its descriptor is readable (a host would
  -- put fd in its epoll set or libuv loop), each turn at most about 2 ms
  while true do
    local left = start + FRAME - mp.now()
    if left <= 0 then break end
    if #core.poll_fds({ fd }, left) > 0 then
      local t = mp.now()
      local handled = pool:poll(0.002)
      local spent = mp.now() - t
      if spent > worst then worst = spent end
      if handled > busiest then busiest = handled end
    end
  end
  if done == expected and mapped and frame > 60 then break end
end

print(("frames: %d, apply_async results: %d of %d, map_async: %s items"):format(
  frame, done, expected, tostring(mapped)))
print(("poll: at most %d messages in a call, worst %.2f ms"):format(busiest, worst * 1000))
assert(done == expected and mapped == 20000)
