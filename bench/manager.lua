-- bench/manager.lua: a Manager dict's set/get loop and a Manager list's append loop, from the
-- parent; prints "<row>\t<seconds>\t<count>\t<unit>" (median of 5) for bench/run.lua.
local mp = require "multiprocessing"
local lib = dofile("bench/lib.lua")

local N = tonumber(arg and arg[1]) or 20000

local m <close> = mp.Manager()

local d = m:dict()
local t = lib.median(function()
  return lib.timed(function()
    for i = 1, N do
      d[i] = i
      assert(d[i] == i)
    end
  end)
end, 5)
print(("manager: dict set+get x %d\t%.6f\t%d\top"):format(N, t, 2 * N))

t = lib.median(function()
  local l = m:list()
  return lib.timed(function()
    for i = 1, N do l:append(i) end
    assert(#l == N)
  end)
end, 5)
print(("manager: list append x %d\t%.6f\t%d\top"):format(N, t, N))
