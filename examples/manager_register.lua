-- manager_register: a type of your own held by the manager (Python's BaseManager.register): its
-- methods run in the manager process, so every process works on the same object.
local mp = require "multiprocessing"

local manager <close> = mp.Manager()

-- the constructor travels to the manager as a closure and runs there
manager:register("Stats", function(name)
  local self = { name = name, n = 0, sum = 0 }
  function self.add(s, x) s.n = s.n + 1 s.sum = s.sum + x end
  function self.mean(s) return s.sum / s.n, s.n end
  return self
end, { exposed = { "add", "mean" } })

local stats = manager:Stats("squares")
local pool <close> = mp.Pool(2)
pool:map(function(x) stats:add(x * x) end, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 })
local mean, n = stats:mean()
print(("mean of %d squares: %.1f"):format(n, mean))  --> mean of 10 squares: 38.5
