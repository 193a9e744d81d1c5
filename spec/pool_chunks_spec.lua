-- Specs of map's chunks in the worker: the tables a worker reuses from chunk to chunk (its
-- items and its results), and the item a failure is charged to.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- (functions sent to workers reach these as upvalues, not through busted's environment)
local error, collectgarbage, tostring, pcall = error, collectgarbage, tostring, pcall

describe("Pool map chunks", function()
  H.leak_check(before_each, after_each)

  describe("core.chunk_scratch", function()
    it("makes the next map chunk taken decode its items into a table handed back", function()
      local q, st = mp.Queue(), core.PoolState(1)
      -- two chunks (mode 0) of a map, then an apply (mode 3), all with a made-up function blob
      core.put_task(q, 1, 1, 8, 0, { 10, 20, 30, 40 }, 1, 4)
      core.put_task(q, 2, 1, 8, 0, { 50, 60 }, 1, 2)
      core.put_task(q, 3, 1, 8, 3, { 7, 8 }, 0, 1)
      local scratch = core.newtable(4)
      for k = 1, 4 do scratch[k] = -k end
      core.chunk_scratch(scratch)
      local a = st:get_task(q, 1, 5)
      st:done(1)
      assert.equal(scratch, a[5])  -- the same table
      assert.are.same({ 10, 20, 30, 40 }, a[5])
      -- taken: the next chunk gets a fresh table until the scratch is handed back
      local b = st:get_task(q, 1, 5)
      st:done(1)
      assert.are_not.equal(scratch, b[5])
      assert.are.same({ 50, 60 }, b[5])
      -- an apply's arguments never go there
      core.chunk_scratch(scratch)
      local c = st:get_task(q, 1, 5)
      st:done(1)
      assert.are_not.equal(scratch, c[5])
      assert.are.same({ 7, 8 }, c[5])
      core.chunk_scratch(nil)
      q:close()
      st:close()
    end)

    it("gives each chunk of a take of several its own scratch table, from a stack", function()
      local q, st = mp.Queue(), core.PoolState(1)
      core.put_task(q, 1, 1, 8, 0, { 1, 2 }, 1, 2)
      core.put_task(q, 2, 1, 8, 0, { 3, 4 }, 1, 2)
      core.put_task(q, 3, 1, 8, 0, { 5, 6 }, 1, 2)
      local s1, s2 = { 0, 0 }, { 0, 0, 0 }
      core.chunk_scratch(s1)
      core.chunk_scratch(s2)
      local a, b, c = st:get_task(q, 1, 5, 3)
      for _ = 1, 3 do st:done(1) end
      assert.equal(s2, a[5])  -- the last handed back first
      assert.equal(s1, b[5])
      assert.are_not.equal(s1, c[5])
      assert.are_not.equal(s2, c[5])
      assert.are.same({ 1, 2, 0 }, s2)
      assert.are.same({ 3, 4 }, s1)
      assert.are.same({ 5, 6 }, c[5])
      core.chunk_scratch(nil)
      q:close()
      st:close()
    end)

    it("leaves a scratch table too small for the chunk alone", function()
      local q, st = mp.Queue(), core.PoolState(1)
      core.put_task(q, 1, 1, 8, 0, { 1, 2, 3 }, 1, 3)
      local small = { 9 }
      core.chunk_scratch(small)
      local a = st:get_task(q, 1, 5)
      st:done(1)
      assert.are_not.equal(small, a[5])
      assert.are.same({ 1, 2, 3 }, a[5])
      assert.are.same({ 9 }, small)
      core.chunk_scratch(nil)
      q:close()
      st:close()
    end)

    it("decodes nil items, strings and tables into the scratch, past items left unread", function()
      local q, st = mp.Queue(), core.PoolState(1)
      core.put_task(q, 1, 1, 8, 1, { { 1, 2 }, "x", nil, { n = 0 }, n = 4 }, 1, 4)
      local scratch = { 1, 2, 3, 4, 5, 6 }
      core.chunk_scratch(scratch)
      local a = st:get_task(q, 1, 5)
      st:done(1)
      assert.equal(scratch, a[5])
      assert.are.same({ 1, 2 }, scratch[1])
      assert.equal("x", scratch[2])
      assert.is_nil(scratch[3])
      assert.are.same({ n = 0 }, scratch[4])
      core.chunk_scratch(nil)
      q:close()
      st:close()
    end)

    it("takes a table or nil only", function()
      assert.has_error(function() core.chunk_scratch(1) end)
      core.chunk_scratch()
    end)
  end)

  describe("in a worker", function()
    it("keeps the worker's heap flat from chunk to chunk (its items and results tables are reused)", function()
      local pool <close> = mp.Pool(1)
      local xs = {}
      for i = 1, 100000 do xs[i] = i end
      -- each item returns the worker's heap size when it ran (the worker's collector is stopped:
      -- what it allocates stays counted); one worker runs the 10 chunks one after the other
      local r = pool:map(function() return collectgarbage("count") end, xs, 10000)
      local grew = r[90001] - r[10001]  -- KiB, over 8 chunks of 10,000 items
      assert(grew < 64, ("the worker's heap grew by %.0f KiB over 8 chunks"):format(grew))
    end)

    it("sees the items of each chunk whatever the sizes of the chunks before", function()
      local pool <close> = mp.Pool(2)
      local function ident(x) return x end
      local big = {}
      for i = 1, 3000 do big[i] = i end
      pool:map(ident, big, 1000)
      -- smaller chunks after bigger ones, nil items and nil results: nothing of the chunks before
      local r = pool:map(function(x) if x == nil then return "nil" end if x % 2 == 0 then return nil end return x end,
        { 1, 2, nil, 4, 5, n = 5 }, 2)
      assert.are.same({ 1, nil, "nil", nil, 5, n = 5 }, r)
      assert.are.same({ { 1, 2 }, n = 1 }, pool:starmap(function(...) return { ... } end, { { 1, 2 } }))
      -- bigger again
      local more = {}
      for i = 1, 5000 do more[i] = -i end
      local r2 = pool:map(ident, more, 2500)
      for i = 1, 5000 do assert(r2[i] == -i) end
      assert.equal(5000, r2.n)
    end)

    it("charges a failure to its item, runs every other item of the chunk exactly once", function()
      local pool <close> = mp.Pool(1)
      local q = mp.Queue()
      local ok, err = pcall(pool.map, pool, function(x)
        q:put(x)
        if x == 13 or x == 17 then error("bad " .. x) end
        return x
      end, { 11, 12, 13, 14, 15, 16, 17, 18, 19, 20 }, 10)
      assert.is_false(ok)
      assert.matches("map failed on item 3 %(worker pid %d+%):\n.-: bad 13\nstack traceback:", tostring(err))
      local seen = {}
      for _ = 1, 10 do
        local v = q:get(20)
        seen[v] = (seen[v] or 0) + 1
      end
      assert.is_nil(q:get(0.05))
      for v = 11, 20 do assert.equal(1, seen[v]) end
      q:close()
    end)

    it("charges a failure raised deep in the task's stack to its item, every time", function()
      local pool <close> = mp.Pool(1)
      local function deep(n, x)
        if n == 0 then
          if x == 5 then error("deep " .. x) end
          return x
        end
        local v = deep(n - 1, x)  -- (not a tail call: every level stays)
        return v
      end
      local r = pool:map_async(function(x) return deep(500, x) end, { 1, 2, 3, 4, 5, 6 }, 6)
      assert.is_true(r:wait(60))
      local ok, err = pcall(r.get, r)
      assert.is_false(ok)
      assert.equal(5, err.item)
      assert.matches("deep 5", err.message)
      -- and a failure after a deep one, in the same chunk and in the next
      local ok2, err2 = pcall(pool.map, pool, function(x)
        if x == 1 then pcall(deep, 500, 5) end
        if x == 4 then error("shallow") end
        return deep(300, x)
      end, { 1, 3, 7, 4 }, 4)
      assert.is_false(ok2)
      assert.matches("map failed on item 4 ", tostring(err2))
      assert.matches("shallow", tostring(err2))
    end)

    it("yields the results before a failed item of a chunk, after bigger chunks", function()
      local pool <close> = mp.Pool(1)
      local xs = {}
      for i = 1, 50 do xs[i] = -i end
      pool:map(function(x) return x end, xs, 50)  -- the worker's results table holds 50 values
      local got = {}
      local ok, err = pcall(function()
        for i, v in pool:imap(function(x) if x == 3 then error("three") end return x * 10 end, { 1, 2, 3, 4 }, 4) do
          got[i] = v
        end
      end)
      assert.is_false(ok)
      assert.matches("imap failed on item 3", tostring(err))
      assert.are.same({ 10, 20 }, got)
    end)
  end)
end)
