-- joblib_parallel: the first tutorial's joblib snippet. joblib.Parallel(n_jobs=...)(
-- joblib.delayed(time.sleep)(0.1) for i in range(100)) timed with one job, with every core,
-- and as a plain loop; then delayed calls with several arguments.
local mp = require "multiprocessing"
local delayed = mp.delayed

local N, NAP = 40, 0.05

local function sleeps()
  local t = {}
  for i = 1, N do t[i] = delayed(mp.sleep)(NAP) end
  return t
end

local function timed(label, fn)
  local t0 = mp.now()
  fn()
  print(("%-28s %.2f s"):format(label, mp.now() - t0))
end

timed("Parallel{n_jobs = 1}", function() mp.Parallel { n_jobs = 1 } (sleeps()) end)
timed("Parallel{n_jobs = -1}", function() mp.Parallel { n_jobs = -1 } (sleeps()) end)
timed("a plain loop", function() for _ = 1, N do mp.sleep(NAP) end end)

-- Python's print_args(arg1, arg2, kwarg1=3, kwarg2=4, **kwargs): Lua passes the keyword
-- arguments as a table
local function print_args(arg1, arg2, kw)
  kw = kw or {}
  print(arg1, arg2, kw.kwarg1 or 3, kw.kwarg2 or 4)
  return arg1 + arg2
end

-- an iterator of tasks stands for Python's generator expression
local i = -1
local r = mp.Parallel { n_jobs = -1, verbose = 1 } (function()
  i = i + 1
  if i < 3 then return delayed(print_args)(i, 2, { kwarg1 = 5, kwarg100 = 100 }) end
end)
print(table.concat(r, ", ", 1, r.n))   --> 2, 3, 4
