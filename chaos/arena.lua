-- chaos/arena.lua: running out of shared memory (LUA_MP_ARENA_SIZE = 32 MiB): the call that asked
-- too much fails with "out of shared memory" and the sizes, nothing else fails, and everything
-- works after; and what a block costs.
local L = require "chaos.lib"
local mp = require "multiprocessing"

local MB = 1 << 20
local SMALL_ARENA = "LUA_MP_ARENA_SIZE=" .. (32 * MB)

-- the error of a call that asked too much: out of shared memory, with a size in it
local function oom(err, what)
  err = tostring(err)
  L.check(err:find("out of shared memory", 1, true), "%s: the error is not \"out of shared memory\": %s", what, err:sub(1, 300))
  L.check(err:find("%d%d%d%d%d"), "%s: the error gives no size: %s", what, err:sub(1, 300))
end

local function works(pool, what)
  local ok, r = pcall(pool.map, pool, function(x) return x + 1 end, { 1, 2, 3 })
  L.check(ok and r[3] == 4, "%s: the pool does not work after: %s", what, tostring(r):sub(1, 300))
end

return {
  { name = "arena_queue_put_too_big", timeout = 40, env = SMALL_ARENA, run = function()
    local q = mp.Queue()
    q:put(0) q:get()  -- what a queue keeps while it lives is in the start
    local start = L.arena_used()
    local ok, err = pcall(q.put, q, string.rep("x", 40 * MB))
    L.check(not ok, "a 40 MiB put into a 32 MiB arena succeeded")
    oom(err, "put")
    L.check(q:put("small") and q:get(1) == "small", "the queue does not work after the failed put")
    L.check(q:put(string.rep("y", 8 * MB)) and #q:get(1) == 8 * MB, "an 8 MiB put fails after the failed put")
    L.fig("arena", ("%d->%d"):format(start, L.arena_used()))
    L.check(L.arena_used() == start, "arena use %d, was %d before the failed put", L.arena_used(), start)
  end },

  { name = "arena_queue_fill", timeout = 40, env = SMALL_ARENA, run = function()
    local q = mp.Queue()
    q:put(0) q:get()
    local start = L.arena_used()
    local item = string.rep("z", MB)
    local n, ok, err = 0, true, nil
    while ok and n < 100 do
      ok, err = pcall(q.put, q, item)
      if ok then n = n + 1 end
    end
    L.fig("items", n)
    L.check(not ok, "100 puts of 1 MiB fit into a 32 MiB arena")
    oom(err, ("put %d"):format(n + 1))
    for i = 1, n do L.check(q:get(1) == item, "item %d did not come back", i) end
    L.check(q:put(item) and q:get(1) == item, "the queue does not work after running out")
    L.fig("arena", ("%d->%d"):format(start, L.arena_used()))
    L.check(L.arena_used() == start, "arena use %d after emptying the queue, was %d", L.arena_used(), start)
  end },

  { name = "arena_map_result_too_big", timeout = 40, env = SMALL_ARENA, run = function()
    local pool <close> = mp.Pool(2)
    local ok, err = pcall(pool.map, pool, function(x) return string.rep("r", 40 * MB) end, { 1 })
    L.check(not ok, "a 40 MiB result through a 32 MiB arena succeeded")
    oom(err, "map result")
    works(pool, "after a result too big")
    ok, err = pcall(pool.apply, pool, function() return string.rep("r", 40 * MB) end)
    L.check(not ok, "a 40 MiB apply result through a 32 MiB arena succeeded")
    oom(err, "apply result")
    works(pool, "after an apply result too big")
  end },

  { name = "arena_map_args_too_big", timeout = 40, env = SMALL_ARENA, run = function()
    local pool <close> = mp.Pool(2)
    local ok, err = pcall(pool.map, pool, function(x) return #x end, { "a", string.rep("a", 40 * MB) })
    L.check(not ok, "a 40 MiB argument through a 32 MiB arena succeeded")
    oom(err, "map argument")
    works(pool, "after an argument too big")
    local big = string.rep("u", 40 * MB)
    ok, err = pcall(pool.apply, pool, function() return #big end)
    L.check(not ok, "a function with a 40 MiB upvalue went through a 32 MiB arena")
    oom(err, "function upvalue")
    works(pool, "after a function too big")
  end },

  -- "A 1 MiB item takes a 2 MiB block" (default arena): a block costs little more than its item
  { name = "arena_block_overhead", timeout = 30, run = function()
    local q = mp.Queue()
    q:put(0) q:get()
    local start = L.arena_used()
    q:put(string.rep("b", MB))
    local cost = L.arena_used() - start
    L.fig("bytes_for_1MiB", cost)
    q:get()
    L.check(cost <= MB + MB // 8, "a 1 MiB item takes %d bytes of arena", cost)
  end },
}
