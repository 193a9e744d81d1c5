-- Specs of mp.Parallel and mp.delayed (joblib's one-liner).
local mp = require "multiprocessing"
local parallel = require "multiprocessing.parallel"
local H = require "helpers"

local delayed = mp.delayed
local core = require "multiprocessing.core"
-- task functions read no globals: a spec file's functions have busted's environment as
-- their _ENV, which the codec would send by value
local getpid = function() return core.getpid() end

local function squares(n)
  local t = {}
  for i = 1, n do t[i] = delayed(function(x) return x * x end)(i) end
  return t
end

describe("Parallel", function()
  H.leak_check(before_each, after_each)

  it("runs delayed calls in workers and returns their first values in order", function()
    local pids = mp.Parallel { n_jobs = 2 } {
      delayed(getpid)(), delayed(getpid)(), delayed(getpid)(),
    }
    assert.equal(3, pids.n)
    for i = 1, 3 do assert.are_not.equal(core.getpid(), pids[i]) end
    local r = mp.Parallel { n_jobs = 2 } (squares(1000))
    assert.equal(1000, r.n)
    for i = 1, 1000 do assert.equal(i * i, r[i]) end
  end)

  it("passes every argument, nils included, and keeps holes for nil results", function()
    local select = select
    local f = function(a, b, c) return select("#", a, b, c) == 3 and (c or "none") or nil end
    local r = mp.Parallel { n_jobs = 2 } { delayed(f)(1, nil, 3), delayed(f)(nil, nil, nil), delayed(function() end)() }
    assert.equal(3, r.n)
    assert.equal(3, r[1])
    assert.equal("none", r[2])
    assert.is_nil(r[3])
  end)

  it("mixes functions in one call", function()
    local r = mp.Parallel { n_jobs = 2, batch_size = 4 } {
      delayed(math.max)(3, 9), delayed(string.rep)("ab", 2), delayed(function(t) return #t end)({ 1, 2, 3 }),
    }
    assert.same({ 9, "abab", 3, n = 3 }, r)
  end)

  it("takes an iterator function of tasks", function()
    local i = 0
    local r = mp.Parallel { n_jobs = 2 } (function()
      i = i + 1
      if i <= 50 then return delayed(function(x) return -x end)(i) end
    end)
    assert.equal(50, r.n)
    assert.equal(-50, r[50])
  end)

  it("grows its batches for tiny tasks (joblib's automatic batching)", function()
    local sizes = {}
    local r = mp.Parallel { n_jobs = 2, return_as = "generator" } (function()
      local n = #sizes
      if n >= 20000 then return nil end
      sizes[n + 1] = true
      return delayed(getpid)()
    end)
    -- count how many tasks each distinct batch (run in one worker, back to back) held: with
    -- batch_size 1 every task would be its own message; automatic batching groups them
    local n, runs, last = 0, 0, nil
    for _, pid in r do
      n = n + 1
      if pid ~= last then runs = runs + 1 last = pid end
    end
    assert.equal(20000, n)
    assert.is_true(runs < n / 20, "batches were not grown: " .. runs .. " runs of the same worker")
  end)

  it("keeps the batch size it is given", function()
    local r = mp.Parallel { n_jobs = 2, batch_size = 1, return_as = "generator" } (squares(10))
    local got = {}
    for i, v in r do got[i] = v end
    assert.same({ 1, 4, 9, 16, 25, 36, 49, 64, 81, 100 }, got)
  end)

  it("yields results as they come with generator_unordered", function()
    local tasks = {}
    local sleep = mp.sleep
    for i = 1, 6 do tasks[i] = delayed(function(x) sleep(x == 1 and 0.3 or 0) return x end)(i) end
    local order = {}
    for i, v in mp.Parallel { n_jobs = 2, batch_size = 1, return_as = "generator_unordered" } (tasks) do
      assert.equal(i, v)
      order[#order + 1] = i
    end
    assert.equal(6, #order)
    table.sort(order)
    assert.same({ 1, 2, 3, 4, 5, 6 }, order)
  end)

  it("gives a worker that finished a batch its next one at once, whichever batch is oldest", function()
    -- Task 1 runs until the parent got the 12 others; the other worker runs them one by one.
    -- The parent used to wait for its oldest batch (task 1) in 50 ms slices, so the free worker
    -- sat idle that long between batches. Counted in a child: the result waits that ran out
    -- while fewer batches than workers were in flight and tasks were left to send.
    local script = [[
      local core = require "multiprocessing.core"
      local take, idle, left = core.take_result, 0, 12
      core.take_result = function(results, wait, inflight, ...)
        local r = table.pack(take(results, wait, inflight, ...))
        if r[1] == nil and r[2] == "timeout" and wait > 0 and left > 1 then
          local n = 0
          for _ in pairs(inflight) do n = n + 1 end
          if n < 2 then idle = idle + 1 end
        end
        return table.unpack(r, 1, r.n)
      end
      local mp = require "multiprocessing"
      local q = mp.Queue()
      local tasks = {}
      tasks[1] = mp.delayed(function() return q:get() end)()
      for i = 2, 13 do tasks[i] = mp.delayed(function(x) return x end)(i) end
      for i, v in mp.Parallel { n_jobs = 2, batch_size = 1, return_as = "generator_unordered" } (tasks) do
        if i ~= 1 then
          left = left - 1
          if left == 0 then q:put(1) end
        end
      end
      print("idle " .. idle)
    ]]
    assert.are.equal("idle 0\n", H.script_output(script))
  end)

  it("runs in the calling process with n_jobs = 1 (joblib's default)", function()
    local r = mp.Parallel {} { delayed(getpid)() }
    assert.equal(core.getpid(), r[1])
    r = mp.Parallel { n_jobs = 1 } (squares(5))
    assert.same({ 1, 4, 9, 16, 25, n = 5 }, r)
  end)

  it("counts n_jobs = -1 as all cores and -2 as all but one", function()
    assert.equal("Parallel(n_jobs=" .. mp.cpu_count() .. ")", tostring(mp.Parallel { n_jobs = -1 }))
    assert.equal("Parallel(n_jobs=" .. math.max(1, mp.cpu_count() - 1) .. ")", tostring(mp.Parallel { n_jobs = -2 }))
  end)

  it("raises the task's error as a TaskError naming the task", function()
    local tasks = squares(40)
    local raise = error
    tasks[17] = delayed(function() raise({ code = 7 }) end)()
    for _, n_jobs in ipairs { 1, 2 } do
      local ok, e = pcall(mp.Parallel { n_jobs = n_jobs }, tasks)
      assert.is_false(ok)
      assert.equal(mp.TaskError, getmetatable(e))
      assert.equal("Parallel", e.call)
      assert.equal(17, e.item)
      assert.same({ code = 7 }, e.value)
    end
  end)

  it("a generator yields the results before a failed task, then raises", function()
    local tasks = squares(10)
    tasks[6] = delayed(error)("six")
    local got = {}
    local ok, e = pcall(function()
      for i, v in mp.Parallel { n_jobs = 2, batch_size = 2, return_as = "generator" } (tasks) do got[i] = v end
    end)
    assert.is_false(ok)
    assert.matches("six", tostring(e))
    assert.same({ 1, 4, 9, 16, 25 }, got)
  end)

  it("a break out of a generator ends the call and its workers", function()
    for i in mp.Parallel { n_jobs = 2, return_as = "generator" } (squares(1000)) do
      if i == 3 then break end
    end
    -- the leak check (after_each) sees no worker left
  end)

  it("reports a worker that died", function()
    local tasks = squares(4)
    tasks[2] = delayed(function() core._exit(3) end)()
    local e = H.error_of(mp.Parallel { n_jobs = 2, batch_size = 1 }, tasks)
    assert.matches("died", e)
    assert.matches("exit code 3", e)
  end)

  it("uses a pool it is given, and leaves it open", function()
    local pool <close> = mp.Pool(2)
    local par = mp.Parallel { pool = pool }
    assert.same({ 1, 4, 9, n = 3 }, par(squares(3)))
    assert.same({ 1, 4, n = 2 }, par(squares(2)))
    assert.same({ 2, n = 1 }, pool:map(function(x) return x * 2 end, { 1 }))
  end)

  it("prints joblib's progress lines with verbose", function()
    local text = H.capture_stderr()
    finally(text)
    mp.Parallel { n_jobs = 2, verbose = 10, batch_size = 1 } (squares(4))
    local s = text()
    assert.matches("%[Parallel%(n_jobs=2%)%]: Using a Pool with 2 concurrent workers", s)
    assert.matches("Done    4 out of    4 | elapsed: +[%d.]+s finished", s)
  end)

  it("is quiet without verbose", function()
    local text = H.capture_stderr()
    finally(text)
    mp.Parallel { n_jobs = 2 } (squares(4))
    assert.equal("", text())
  end)

  it("refuses what is not a delayed call, bad options and bad inputs, naming them", function()
    H.raises("bad task 2 to 'Parallel' (mp.delayed(f)(...) expected, got number)",
      mp.Parallel { n_jobs = 2 }, { delayed(print)(), 5 })
    H.raises("bad task 1 to 'Parallel'", mp.Parallel {}, { 5 })
    H.raises("bad options to 'Parallel' (unknown option njobs)", mp.Parallel, { njobs = 2 })
    H.raises("n_jobs must be a non-zero integer", mp.Parallel, { n_jobs = 0 })
    H.raises("n_jobs must be a non-zero integer", mp.Parallel, { n_jobs = 1.5 })
    H.raises("batch_size must be", mp.Parallel, { batch_size = 0 })
    H.raises("return_as must be", mp.Parallel, { return_as = "set" })
    H.raises("timeout must be a positive number", mp.Parallel, { timeout = 0 / 0 })
    H.raises("pool must be a Pool", mp.Parallel, { pool = {} })
    H.raises("bad argument #1 to 'delayed' (function expected, got nil)", delayed, nil)
    H.raises("bad argument #1 to 'Parallel' (table or iterator function expected, got number)",
      mp.Parallel { n_jobs = 2 }, 5)
    H.raises("has no sequence part", mp.Parallel { n_jobs = 2 }, { a = delayed(print)() })
    H.raises("Parallel: the task iterator raised at task 1: nope",
      mp.Parallel { n_jobs = 2 }, function() error("nope", 0) end)
  end)

  it("fails the call, not the caller's pool, when an argument cannot be sent", function()
    local pool <close> = mp.Pool(2)
    local co = coroutine.create(function() end)
    H.raises("cannot be sent", mp.Parallel { pool = pool }, { delayed(print)(co) })
    assert.same({ 1, n = 1 }, mp.Parallel { pool = pool } (squares(1)))
  end)

  it("kills an overdue task with timeout", function()
    local e = H.error_of(mp.Parallel { n_jobs = 2, timeout = 0.3 }, { delayed(mp.sleep)(30) })
    assert.matches("timed out", e)
  end)

  it("exposes the batch runner for the worker only", function()
    assert.is_function(parallel._run_batch)
    assert.is_nil(mp._run_batch)
  end)

  it("Ctrl-C in its task iterator raises interrupted! at once, not after the tasks in flight", function()
    local text = H.interrupted([[
      local n = 0
      print("run:", pcall(mp.Parallel { n_jobs = 2, pre_dispatch = 4, batch_size = 1 }, function()
        n = n + 1
        if n == 3 then started() end
        if n >= 3 then local t0 = os.clock() repeat until os.clock() - t0 > 30 end
        return mp.delayed(mp.sleep)(30)
      end))
    ]])
    assert.matches("run:\tfalse\t[^\n]*interrupted!", text)
    assert.not_matches("task iterator raised", text)
  end)
end)
