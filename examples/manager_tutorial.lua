-- manager_tutorial: Python's documentation example for Manager, in Lua: a child process changes a
-- dict and a list held by the manager, and the parent sees the changes.
local mp = require "multiprocessing"

local function f(d, l)
  d[1] = "1"
  d["2"] = 2
  d[0.25] = false
  l:reverse()
end

local manager <close> = mp.Manager()
local d = manager:dict()
local l = manager:list { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 }

local p = mp.Process { target = f, args = { d, l } }
p:start()
p:join()

local items = {}
local function show(x) return type(x) == "string" and ("%q"):format(x) or tostring(x) end
for k, v in pairs(d) do items[#items + 1] = ("[%s] = %s"):format(show(k), show(v)) end
table.sort(items)
print("{" .. table.concat(items, ", ") .. "}")
print("{" .. table.concat(l:totable(), ", ") .. "}")
print("first three:", table.concat(l:slice(1, 3), " "), "last two:", table.concat(l:slice(-2), " "))
