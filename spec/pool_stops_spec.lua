-- Specs of Pool when things stop: exits with a pool open, terminate and Ctrl-C with calls pending,
-- close/join with work queued, failed inputs, wrappers that close, nested pools, bounded memory,
-- arena exhaustion, work nobody can deliver. Every case that could hang runs bounded: in a child
-- interpreter under `timeout`, or in a forked child that is killed when it overruns.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- (see pool_spec.lua: functions sent to workers must not reach busted's sandbox)
local _G, error, select, tostring, tonumber, type, pairs, ipairs, print =
      _G, error, select, tostring, tonumber, type, pairs, ipairs, print
local math, string, table, io, os, coroutine = math, string, table, io, os, coroutine

local function double(x) return x * 2 end
local function identity(x) return x end

local PATIENCE = os.getenv("MP_VALGRIND") and 120 or 20  -- seconds a bounded case may take before it counts as a hang (forks take seconds under valgrind)

-- assert for forked children: a plain error with the message (luassert's are tables)
local function check(cond, msg)
  if not cond then error(tostring(msg or "check failed"), 2) end
  return cond
end

-- runs fn in a forked child (it always leaves with core._exit); fails if fn raised, or if it
-- did not finish within PATIENCE seconds (then it is killed: a hang)
-- pool:map(f, { 1, ..., 6 }, chunksize 2) met by Ctrl-C (as lua.c's hook raises it) on the
-- return of its second chunk's put: pcall's results
local function map_cut_at_second_put(pool, f)
  local n = 0
  debug.sethook(function()
    if debug.getinfo(2, "f").func == core.put_task then
      n = n + 1
      if n == 2 then debug.sethook() error("interrupted!", 0) end
    end
  end, "r")
  local ok, err = pcall(pool.map, pool, f, { 1, 2, 3, 4, 5, 6 }, { chunksize = 2 })
  debug.sethook()
  return ok, err
end

local function bounded(fn)
  local pid = H.spawn(fn)
  local code = core.waitpid(pid, PATIENCE)
  if code == nil then
    core.kill(pid, 9)
    core.waitpid(pid)
    error("hung: still running after " .. PATIENCE .. " s", 2)
  end
  assert.equal(0, code, "the bounded case failed (its error is on stderr)")
end

-- runs a Lua script in a child interpreter under `timeout`, with stdin from `input` when given
-- (args: the interpreter's arguments instead of the script's name); returns its exit status and
-- its output (stdout and stderr)
local function run(script, input, args, env)
  local src, out, inp = H.tmpname(), H.tmpname(), H.tmpname()
  local f = assert(io.open(src, "w")) f:write(script or "") f:close()
  f = assert(io.open(inp, "w")) f:write(input or "") f:close()
  local cmd = ("%s %s timeout -s KILL %d %s %s < %s > %s 2>&1"):format(
    H.ENV, env or "", PATIENCE, H.LUA, args or src, inp, out)
  local _, _, status = os.execute(cmd)
  return status, H.slurp(out)
end

local interrupted = H.interrupted

-- the pids written by a child script, one line
local function pids_in(text)
  local list = {}
  for p in (text or ""):match("pids: ([%d ]+)"):gmatch("%d+") do list[#list + 1] = tonumber(p) end
  return list
end

local function none_alive(pids)
  return H.eventually(function()
    for _, p in ipairs(pids) do if H.alive(p) then return false end end
    return true
  end, 5)
end

-- a line of Lua that prints the pool's worker pids
local PRINT_PIDS = 'local t = {} for i, w in ipairs(pool:stats()) do t[i] = w.pid end '
  .. 'io.write("pids: ", table.concat(t, " "), "\\n") io.stdout:flush()'

describe("Pool stops", function()
  H.leak_check(before_each, after_each)

  describe("exiting with a pool open", function()
    for _, exit in ipairs { "os.exit(0)", "os.exit(0, false)", "os.exit(0, true)", "" } do
      it(("ends the program at once (%s) and takes the workers with it"):format(exit == "" and "the script's end" or exit), function()
        local status, out = run(([[
          local mp = require "multiprocessing"
          pool = mp.Pool(2)
          pool:map(function(x) return x end, { 1, 2 })
          %s
          %s
        ]]):format(PRINT_PIDS, exit))
        assert.equal(0, status, out)
        local pids = pids_in(out)
        assert.equal(2, #pids)
        assert.is_true(none_alive(pids))
      end)
    end

    it("at the lua5.4 -i prompt (os.exit typed there)", function()
      local status, out = run(nil, table.concat({
        'mp = require "multiprocessing"', 'pool = mp.Pool(2)', PRINT_PIDS, 'os.exit(3)' }, "\n") .. "\n", "-i")
      assert.equal(3, status, out)
      assert.is_true(none_alive(pids_in(out)))
    end)

    it("in a Process that made a pool and calls os.exit", function()
      local status, out = run([[
        local mp = require "multiprocessing"
        local p = mp.Process { target = function()
          local pool = mp.Pool(2)
          pool:map(function(x) return x end, { 1 })
          os.exit(0)
        end }
        p:start()
        assert(p:join(), "the process did not end")
        print("exitcode", p.exitcode)
      ]])
      assert.equal(0, status, out)
      assert.matches("exitcode\t0", out)
    end)

    it("in a pool task that made a pool and calls os.exit (the task fails, nothing hangs)", function()
      local status, out = run([[
        local mp = require "multiprocessing"
        local pool = mp.Pool(1)
        print(pcall(pool.apply, pool, function()
          local inner = mp.Pool(2)
          inner:map(function(x) return x end, { 1 })
          os.exit(5)
        end))
        print("next", pool:apply(function() return 42 end))
      ]])
      assert.equal(0, status, out)
      assert.matches("died %(exit code 5%)", out)
      assert.matches("next\t42", out)
    end)
  end)

  describe("terminate", function()
    it("fails pending apply_async calls: get raises, ready is true, error_callback runs", function()
      bounded(function()
        local pool = mp.Pool(2)
        local got = {}
        local rs = {}
        for i = 1, 4 do
          rs[i] = pool:apply_async(function() mp.sleep(30) end, nil, { error_callback = function(e) got[i] = e end })
        end
        local m = pool:map_async(function() mp.sleep(30) end, { 1 })
        pool:terminate()
        for i = 1, 4 do
          check(rs[i]:ready() == true, "not ready")
          check(rs[i]:successful() == false)
          local ok, err = pcall(rs[i].get, rs[i])
          check(not ok and err == "the pool was terminated", err)
          check(got[i] == "the pool was terminated", got[i])
        end
        check(select(2, pcall(m.get, m)) == "the pool was terminated")
      end)
    end)

    it("fails an imap loop at its first missing item, after the items that came", function()
      bounded(function()
        local pool = mp.Pool(2)
        local it = pool:imap(function(x) if x > 2 then mp.sleep(30) end return x end, { 1, 2, 3, 4 }, 1)
        check(it() == 1 and select(2, it()) == 2)
        pool:terminate()
        local ok, err = pcall(it)
        check(not ok and err:find("the pool was terminated", 1, true), err)
      end)
    end)

    it("on Ctrl-C: pending apply_async calls fail and their error_callback runs", function()
      local text = interrupted([[
        local pool = mp.Pool(2)
        local got
        local r1 = pool:apply_async(function() mp.sleep(30) end, nil, { error_callback = function(e) got = e end })
        local r2 = pool:apply_async(function() started() mp.sleep(30) end)
        print("get:", pcall(r2.get, r2))
        print("ready:", r1:ready(), "callback:", got)
        print("r1:", pcall(r1.get, r1))
      ]])
      assert.matches("get:\tfalse\tinterrupted!", text)
      assert.matches("ready:\ttrue\tcallback:\tthe pool was terminated", text)
      assert.matches("r1:\tfalse\tthe pool was terminated", text)
    end)

    it("on Ctrl-C in a loop polling ready(): it raises and the pool is terminated", function()
      -- (the interpreter raises "interrupted!" at the next Lua instruction: almost always one
      -- inside the pool's call, which then terminates the pool; rarely one of the loop's own,
      -- outside any pool call, and then the pool is left running, as any object would be)
      local text = interrupted([[
        local pool = mp.Pool(1)
        local r = pool:apply_async(function() started() mp.sleep(30) end)
        print("ready:", pcall(function() while not r:ready() do end end))
        if pool._state == "running" then pool:terminate() print("(interrupted outside the pool)") end
        print("pool:", pool, pcall(r.get, r))
      ]])
      assert.matches("ready:\tfalse\t[^\n]*interrupted!", text)
      assert.matches("pool:\t<Pool processes=1 state=terminated>\tfalse\tthe pool was terminated", text)
    end)
  end)

  -- The interpreter's Ctrl-C (lua.c's hook) raises "interrupted!" at the next Lua instruction:
  -- here a debug hook raises it at a chosen one, right after a message went out. The pool is
  -- left running (as when Ctrl-C comes outside its waits) and must stay true.
  describe("Ctrl-C met right after a message was sent", function()
    -- raises "interrupted!" once, on the return from the C function fn (hook "r")
    local function interrupt_after(fn)
      debug.sethook(function()
        if debug.getinfo(2, "f").func == fn then debug.sethook() error("interrupted!", 0) end
      end, "r")
    end

    it("apply_async: its record is kept, the next call gets its own values", function()
      bounded(function()
        local pool = mp.Pool(1)
        local function one() return "one" end
        local function two() return "two" end
        check(pool:apply(one) == "one")  -- (cached: the next call goes the short way)
        interrupt_after(core.put_apply)
        local ok, err = pcall(pool.apply_async, pool, one)
        debug.sethook()
        check(not ok and err == "interrupted!", err)
        local got = pool:apply(two)
        check(got == "two", "apply(two) returned " .. tostring(got))
        pool:close()
        pool:join()
      end)
    end)

    it("submit: its record and cancel word are kept, the next call gets its own values", function()
      bounded(function()
        local pool = mp.Pool(1)
        local function one() return "one" end
        local function two() return "two" end
        check(pool:submit(one):result() == "one")
        interrupt_after(core.put_call)
        local ok, err = pcall(pool.submit, pool, one)
        debug.sethook()
        check(not ok and err == "interrupted!", err)
        local f2 = pool:submit(two)
        local f3 = pool:submit(one)
        check(f2:result() == "two", "submit(two) gave " .. tostring(f2:result()))
        check(f3:result() == "one")
        check(f2.flag ~= f3.flag)
        pool:close()
        pool:join()
      end)
    end)

    it("map: met as a chunk's put returns (inside its pcall), the next call gets its own values", function()
      bounded(function()
        local pool = mp.Pool(1)
        local ok, err = map_cut_at_second_put(pool, function(x) return "map" .. x end)
        check(not ok and err == "interrupted!", err)
        for i = 1, 3 do
          local got = pool:apply(function(x) return "apply" .. x end, { i })
          check(got == "apply" .. i, "apply " .. i .. " returned " .. tostring(got))
        end
        pool:terminate()
      end)
    end)

    it("map: a chunk sent before it, whose result comes later, does not break the next call", function()
      bounded(function()
        local pool = mp.Pool(1)
        local sent = false
        debug.sethook(function(event)  -- after the first chunk went out, back in feed
          if event == "call" then
            if debug.getinfo(2, "f").func == core.put_task then sent = true end
          elseif sent and debug.getinfo(2, "n").name == "feed" then
            debug.sethook()
            error("interrupted!", 0)
          end
        end, "cl")
        local ok, err = pcall(pool.map, pool, identity, { 1, 2, 3, 4, 5, 6 }, { chunksize = 2 })
        debug.sethook()
        check(not ok and err == "interrupted!", err)
        local ok2, v = pcall(pool.apply, pool, double, { 21 })
        check(ok2 and v == 42, v)
        pool:terminate()
      end)
    end)

    it("map cut short while it sends: close and join wait only for the chunks it sent", function()
      bounded(function()
        local pool = mp.Pool(1)
        local ok, err = map_cut_at_second_put(pool, identity)
        check(not ok and err == "interrupted!", err)
        check(pool:apply(double, { 4 }) == 8)
        pool:close()
        pool:join()  -- (it waited for ever for the rest of the map)
        check(next(pool._workers) == nil, "workers left")
      end)
    end)
  end)

  describe("a stopped process holding a lock (the allocator's, the task queue's)", function()
    it("does not hold get(timeout) past its timeout while a dead worker waits to be replaced", function()
      bounded(function()
        local pool = mp.Pool(1)
        check(pool:apply(double, { 1 }) == 2)   -- (the function is in the arena: a later send makes nothing there)
        local victim = pool:stats()[1].pid
        local holder, stopped = H.stopped_arena_holder()
        check(stopped, "the holder did not stop")
        core.kill(victim, 9)
        local r = pool:apply_async(double, { 21 })
        local t0 = core.now()
        local v, why = r:get(0.3)   -- its replacement's fork would wait for the holder's lock
        local waited = core.now() - t0
        check(v == nil and why == "timeout", "get(0.3) returned " .. tostring(v) .. ", " .. tostring(why))
        check(waited < 5, ("get(0.3) took %.1f s behind a stopped allocator holder"):format(waited))
        core.kill(holder, 18)   -- continued: the replacement starts, the task runs
        check(core.waitpid(holder, 10) == 0, "the holder did not finish")
        check(r:get(10) == 42, "the task did not run once the holder went on")
        check(pool:stats()[1].pid ~= victim, "the worker was not replaced")
        pool:close()
        pool:join()
      end)
    end)
    -- a process stopped (SIGSTOP) in a put to the pool's task queue, holding its lock
    local function stopped_task_holder(pool)
      local pid = H.spawn(function()
        core._queue_fault("stop", 1)
        pool._tasks:put(0)   -- (killed before it writes anything)
      end)
      return pid, H.eventually(function() return H.state(pid) == "T" end, 20)
    end

    -- a map_async of xs over a Pool(1) while stop() makes a stopped holder: map_async and
    -- get(0.3) keep their bounds; go(holder) lets it go (a kill, or SIGCONT), then the call ends
    -- with f's results
    local function map_async_behind(stop, go, f, xs)
      bounded(function()
        local pool = mp.Pool(1)
        check(pool:apply(f, { xs[1] }) == f(xs[1]))   -- (the function is in the arena already)
        local holder, stopped = stop(pool)
        check(stopped, "the holder did not stop")
        local t0 = core.now()
        local r = pool:map_async(f, xs, 1)
        local v, why = r:get(0.3)
        local waited = core.now() - t0
        check(v == nil and why == "timeout", "get(0.3) returned " .. tostring(v) .. ", " .. tostring(why))
        check(waited < 5, ("map_async + get(0.3) took %.1f s behind a stopped lock holder"):format(waited))
        go(holder)
        check(core.waitpid(holder, 10) ~= nil, "the holder did not end")
        local out = check(r:get(20), "the map did not finish once the holder went on")
        for i = 1, #xs do check(out[i] == f(xs[i]), "item " .. i .. " differs") end
        pool:close()
        pool:join()
      end)
    end

    it("does not hold map_async or get(timeout) past its timeout while a stopped process holds the task queue's lock", function()
      local xs = {}
      for i = 1, 1000 do xs[i] = i end
      -- (killed: the lock's owner died, the queue is repaired, the feed goes on)
      map_async_behind(stopped_task_holder, function(holder) core.kill(holder, 9) end, double, xs)
    end)

    it("keeps map_async's big chunks for later while a stopped process holds the allocator's lock", function()
      local xs = {}
      for i = 1, 8 do xs[i] = string.rep(string.char(64 + i), 100000) end   -- a block each
      -- (continued: the held chunks go out)
      map_async_behind(function() return H.stopped_arena_holder() end, function(holder) core.kill(holder, 18) end,
        identity, xs)
    end)

    -- body(pool, holder) in a bounded child: a Pool(n) that ran a task, and a process stopped
    -- holding its task queue's lock
    local function behind_task_holder(n, body)
      bounded(function()
        local pool = mp.Pool(n)
        check(pool:apply(double, { 1 }) == 2)
        local holder, stopped = stopped_task_holder(pool)
        check(stopped, "the holder did not stop")
        body(pool, holder)
      end)
    end

    -- f(...)'s results; it must return within 5 s behind the stopped holder
    local function soon(what, f, ...)
      local t0 = core.now()
      local a, b, c, d = f(...)
      check(core.now() - t0 < 5, ("%s took %.1f s behind a stopped lock holder"):format(what, core.now() - t0))
      return a, b, c, d
    end

    local function kill_holder(holder)
      core.kill(holder, 9)   -- the lock's owner died: the queue is repaired
      check(core.waitpid(holder, 10) ~= nil, "the holder was not reaped")
    end

    it("does not hold close() while a stopped process holds the task queue's lock; join ends once it dies", function()
      behind_task_holder(2, function(pool, holder)
        soon("close()", pool.close, pool)   -- (the stop messages wait for the lock)
        kill_holder(holder)
        pool:join()
        check(next(pool._workers) == nil, "workers left")
      end)
    end)

    it("keeps poll(budget) and the start of imap to their bounds while a stopped process holds the task queue's lock", function()
      behind_task_holder(1, function(pool, holder)
        local n = 0
        local it, s, c, closer = soon("imap's start", pool.imap, pool, double,
          function() n = n + 1 if n <= 500 then return n end end, 1)
        soon("poll(0.01)", pool.poll, pool, 0.01)
        kill_holder(holder)
        local k = 0
        for i, v in it, s, c, closer do
          k = k + 1
          check(i == k and v == 2 * k, ("item %d: %s, %s"):format(k, tostring(i), tostring(v)))
        end
        check(k == 500, "imap gave " .. k .. " items of 500")
        pool:close()
        pool:join()
      end)
    end)

    it("apply_async, submit and apply_async with options return at once behind a stopped task-lock holder; their calls run in order once it dies", function()
      behind_task_holder(2, function(pool, holder)
        local function note(x) return x end
        local rs, fs = {}, {}
        local got = {}
        soon("300 apply_async and submit", function()
          for i = 1, 100 do rs[i] = pool:apply_async(double, { i }) end
          for i = 1, 100 do fs[i] = pool:submit(double, i) end
          for i = 101, 200 do rs[i] = pool:apply_async(note, { i }, { callback = function(v) got[#got + 1] = v end }) end
        end)
        local v, why = soon("get(0.3)", rs[1].get, rs[1], 0.3)
        check(v == nil and why == "timeout", "get(0.3) returned " .. tostring(v) .. ", " .. tostring(why))
        check(not fs[1]:running() and not fs[1]:done(), "a kept submit is pending")
        check(fs[100]:cancel() and fs[100]:cancelled(), "a kept submit could not be cancelled")
        kill_holder(holder)
        for i = 1, 100 do check(rs[i]:get(20) == 2 * i, "apply_async " .. i .. " gave " .. tostring(rs[i]:get(0))) end
        for i = 1, 99 do check(fs[i]:result(20) == 2 * i, "submit " .. i) end
        check(select(2, pcall(fs[100].result, fs[100])) == "the future was cancelled", "the cancelled submit")
        for i = 101, 200 do check(rs[i]:get(20) == i, "apply_async " .. i) end
        check(#got == 100, #got .. " callbacks of 100")
        pool:close()
        pool:join()
        check(next(pool._workers) == nil, "workers left")
      end)
    end)

    -- body(pool, holder) in a bounded child: a Pool(1) that ran identity (apply and submit: its
    -- blob and a slab of 1024 cancel words are made), and a process stopped holding the
    -- allocator's lock; a holder that body did not continue and reap is then
    local function behind_arena_holder(body)
      bounded(function()
        local pool = mp.Pool(1)
        check(pool:apply(identity, { 1 }) == 1)
        check(pool:submit(identity, 1):result() == 1)
        local holder, stopped = H.stopped_arena_holder()
        check(stopped, "the holder did not stop")
        body(pool, holder)
        if H.alive(holder) then
          core.kill(holder, 18)
          check(core.waitpid(holder, 10) == 0, "the holder did not finish")
        end
      end)
    end

    it("apply_async and submit of a function never sent before, and a 1025th Future, return at once behind a stopped allocator holder", function()
      behind_arena_holder(function(pool, holder)
        local k = 10
        local function add(x) return x + k end   -- (its blob would be made in the arena)
        local rs, fs = {}, {}
        soon("100 apply_async and submit of a new function", function()
          for i = 1, 50 do rs[i] = pool:apply_async(add, { i }) end
          for i = 1, 50 do fs[i] = pool:submit(add, i) end
        end)
        local many = {}
        soon("1100 submits (a second slab of cancel words)", function()
          for i = 1, 1100 do many[i] = pool:submit(identity, i) end
        end)
        local v, why = soon("get(0.3)", rs[1].get, rs[1], 0.3)
        check(v == nil and why == "timeout", "get(0.3) returned " .. tostring(v) .. ", " .. tostring(why))
        core.kill(holder, 18)   -- continued: the blob is made, the kept calls go out
        check(core.waitpid(holder, 10) == 0, "the holder did not finish")
        for i = 1, 50 do
          check(rs[i]:get(20) == i + 10, "apply_async " .. i .. ": " .. tostring(rs[i]:get(0)))
          check(fs[i]:result(20) == i + 10, "submit " .. i)
        end
        for i = 1, 1100 do check(many[i]:result(20) == i, "submit " .. i .. " of 1100") end
        pool:close()
        pool:join()
      end)
    end)

    it("map_async and imap of a function never sent before return at once behind a stopped allocator holder", function()
      behind_arena_holder(function(pool, holder)
        local k, xs = 3, {}
        for i = 1, 1000 do xs[i] = i end
        local r = soon("map_async of a new function", pool.map_async, pool, function(x) return x * k end, xs)
        local n = 0
        local it, s, c, closer = soon("imap of a new function", pool.imap, pool, function(x) return x + k end,
          function() n = n + 1 if n <= 100 then return n end end)
        local v, why = soon("get(0.3)", r.get, r, 0.3)
        check(v == nil and why == "timeout", "get(0.3) returned " .. tostring(v) .. ", " .. tostring(why))
        core.kill(holder, 18)   -- continued: the blobs are made, the calls are fed
        check(core.waitpid(holder, 10) == 0, "the holder did not finish")
        local out = check(r:get(20), "map_async gave nothing")
        for i = 1, 1000 do check(out[i] == 3 * i, "map_async item " .. i) end
        local got = 0
        for i, y in it, s, c, closer do got = got + 1 check(y == i + 3, "imap item " .. i) end
        check(got == 100, "imap gave " .. got .. " items of 100")
        pool:close()
        pool:join()
      end)
    end)

    it("terminate fails calls of a function whose blob could not be made behind a stopped allocator holder", function()
      behind_arena_holder(function(pool)
        local r = soon("apply_async of a new function", pool.apply_async, pool, function(x) return -x end, { 1 })
        local f = soon("submit of a new function", pool.submit, pool, function(x) return -x end, 2)
        soon("terminate", pool.terminate, pool)
        check(select(2, pcall(r.get, r)) == "the pool was terminated", "the kept apply_async's error")
        check(tostring(f:exception()) == "the pool was terminated", "the kept submit's error")
      end)
    end)

    it("apply_async with arguments that need the allocator returns at once behind a stopped allocator holder", function()
      behind_arena_holder(function(pool, holder)
        local big = string.rep("b", 200000)
        local r = soon("apply_async(identity, { 200 KB })", pool.apply_async, pool, identity, { big })
        local f = soon("submit(identity, 200 KB)", pool.submit, pool, identity, big)
        local v, why = soon("get(0.3)", r.get, r, 0.3)
        check(v == nil and why == "timeout", "get(0.3) returned " .. tostring(v) .. ", " .. tostring(why))
        core.kill(holder, 18)   -- continued: the kept calls go out
        check(core.waitpid(holder, 10) == 0, "the holder did not finish")
        check(r:get(20) == big and f:result(20) == big, "the kept calls' values differ")
        pool:close()
        pool:join()
      end)
    end)

    it("calls kept behind a stopped task-lock holder: terminate fails them, an argument that cannot be sent raises at the call", function()
      behind_task_holder(1, function(pool, holder)
        local failed
        local r = soon("apply_async", pool.apply_async, pool, double, { 1 }, { error_callback = function(e) failed = e end })
        local f = soon("submit", pool.submit, pool, double, 2)
        local err = H.error_of(pool.apply_async, pool, double, { coroutine.create(print) })
        check(err:find("cannot send a thread", 1, true) and err:find("args[1]", 1, true), "apply_async's error: " .. err)
        err = H.error_of(pool.submit, pool, double, 1, coroutine.create(print))
        check(err:find("cannot send a thread", 1, true) and err:find("args[2]", 1, true), "submit's error: " .. err)
        -- (raised at the user's line, as unkept)
        err = H.error_of(function() local x = pool:apply_async(double, { coroutine.create(print) }) return x end)
        check(err:find("pool_stops_spec%.lua:%d+: cannot send"), "apply_async's error, where: " .. err)
        err = H.error_of(function() local x = pool:submit(double, coroutine.create(print)) return x end)
        check(err:find("pool_stops_spec%.lua:%d+: cannot send"), "submit's error, where: " .. err)
        soon("terminate", pool.terminate, pool)
        check(r:ready() and not r:successful(), "the kept apply_async did not fail")
        check(select(2, pcall(r.get, r)) == "the pool was terminated", "its error")
        check(failed == "the pool was terminated", "its error_callback: " .. tostring(failed))
        check(tostring(f:exception()) == "the pool was terminated", "the kept submit's error")
        kill_holder(holder)
      end)
    end)

    it("calls kept behind a task-lock holder go out with the next call once the lock is free, without waiting for a turn of the engine", function()
      behind_task_holder(2, function(pool, holder)
        local rs = {}
        for i = 1, 10 do rs[i] = soon("apply_async", pool.apply_async, pool, double, { i }) end
        check(pool._held, "nothing was kept")
        kill_holder(holder)   -- (the lock is free again; no get, wait or poll since)
        -- each new call tries the lock once, without waiting: a worker may hold it at that
        -- instant (a short section, but a preempted one lasts a time slice), so a few calls
        -- a few ms apart, the first apply_async, the next submit, and so on
        local fs, k = {}, 0
        repeat
          k = k + 1
          if k % 2 == 1 then rs[#rs + 1] = pool:apply_async(double, { 10 + k })
          else fs[#fs + 1] = { pool:submit(double, 10 + k), 2 * (10 + k) } end
          if pool._held then core.sleep(0.005) end
        until not pool._held or k == 100
        check(not pool._held, "the kept calls are still kept after 100 more calls")
        for i = 1, 10 do check(rs[i]:get(20) == 2 * i, "apply_async " .. i) end
        for j = 11, #rs do check(rs[j]:get(20) == 2 * (10 + 2 * (j - 10) - 1), "apply_async " .. j) end
        for _, f in ipairs(fs) do check(f[1]:result(20) == f[2], "a submit") end
        pool:close()
        pool:join()
      end)
    end)

    it("close() with calls kept behind a stopped task-lock holder: join sends them, then stops the workers", function()
      behind_task_holder(2, function(pool, holder)
        local rs = {}
        for i = 1, 20 do rs[i] = soon("apply_async", pool.apply_async, pool, double, { i }) end
        soon("close()", pool.close, pool)
        kill_holder(holder)
        pool:join()
        for i = 1, 20 do check(rs[i]:get(0) == 2 * i, "apply_async " .. i .. " after join: " .. tostring(rs[i]:get(0))) end
        check(next(pool._workers) == nil, "workers left")
      end)
    end)

    it("Ctrl-C met while the engine sends calls kept behind a stopped task-lock holder terminates the pool and fails them", function()
      behind_task_holder(1, function(pool, holder)
        local f1 = soon("submit", pool.submit, pool, double, 1)
        local f2 = soon("submit", pool.submit, pool, double, 2)
        check(f1.held and f2.held, "the submits were not kept")
        check(f1:cancel(), "the kept submit could not be cancelled")  -- (the engine lets it go, then tries f2)
        -- Ctrl-C as lua.c's hook raises it: on the return from f2's put (which met the held lock)
        debug.sethook(function()
          if debug.getinfo(2, "f").func == core.put_call then debug.sethook() error("interrupted!", 0) end
        end, "r")
        local ok, err = pcall(f2.result, f2)
        debug.sethook()
        check(not ok and tostring(err):find("interrupted!", 1, true), "result(): " .. tostring(ok) .. ", " .. tostring(err))
        check(pool._state == "terminated", "the pool was left " .. pool._state)
        check(tostring(f2:exception()) == "the pool was terminated", "the kept submit's error: " .. tostring(f2:exception()))
        kill_holder(holder)
      end)
    end)

    it("pool:fileno() turns readable for a call kept behind a stopped task-lock holder, and poll sends it", function()
      behind_task_holder(1, function(pool, holder)
        local fd = pool:fileno()
        check(H.eventually(function() pool:poll(0) return #core.poll_fds({ fd }, 0) == 0 end, 5), "fd stays readable")
        local r = soon("apply_async", pool.apply_async, pool, double, { 21 })
        check(r.held, "the call was not kept")
        kill_holder(holder)
        check(#core.poll_fds({ fd }, 5) == 1, "the descriptor did not turn readable for the kept call")
        check(H.eventually(function() pool:poll(0.01) return r:ready() end, 10), "poll did not send the kept call")
        check(r:get() == 42)
        pool:terminate()
      end)
    end)

    it("an imap chunk that cannot be sent whole, sent item by item behind a stopped task-lock holder, fails only at its bad item", function()
      behind_task_holder(1, function(pool, holder)
        local xs, n = { 1, coroutine.create(print), 3 }, 0
        -- (the chunk {1, co, 3} fails to encode; then item 1 alone meets the held lock)
        local it, s, c, closer = soon("imap's start", pool.imap, pool, double,
          function() n = n + 1 return xs[n] end, 3)
        kill_holder(holder)
        local got, err = {}, nil
        local ok, e = pcall(function() for i, v in it, s, c, closer do got[i] = v end end)
        if not ok then err = tostring(e) end
        check(got[1] == 2, "item 1: " .. tostring(got[1]) .. " (" .. tostring(err) .. ")")
        check(err and err:find("cannot send a thread", 1, true), "the error: " .. tostring(err))
        pool:close()
        pool:join()
      end)
    end)
  end)

  describe("close and join", function()
    it("maxtasksperchild: workers that leave after close are replaced until the work is done", function()
      bounded(function()
        local pool = mp.Pool { processes = 3, maxtasksperchild = 1 }
        local rs = {}
        for i = 1, 6 do rs[i] = pool:apply_async(function() mp.sleep(0.05) return i end) end
        pool:close()
        pool:join()
        for i = 1, 6 do
          check(rs[i]:ready(), "result " .. i .. " did not arrive")
          check(rs[i]:get() == i)
        end
      end)
    end)

    it("a worker killed after close is replaced until the work is done", function()
      local marker = H.tmpname()
      os.remove(marker)
      bounded(function()
        local pool = mp.Pool(1)
        local victim = pool:stats()[1].pid
        local rs = {}
        for i = 1, 3 do
          rs[i] = pool:apply_async(function()
            if i == 1 then local g = io.open(marker, "w") g:close() end
            mp.sleep(0.2)
            return i
          end)
        end
        pool:close()
        check(H.eventually(function() return H.slurp(marker) ~= nil end, 10), "the task did not start")
        core.kill(victim, 9)
        pool:join()
        local ok, err = pcall(rs[1].get, rs[1])
        check(not ok and err:find("died %(killed by SIGKILL%)"), err)
        check(rs[2]:get() == 2 and rs[3]:get() == 3)
      end)
    end)

    it("an imap with a lazily fed input continued after close() and join() raises", function()
      bounded(function()
        local pool = mp.Pool(2)
        local n = 0
        local it = pool:imap(identity, function() n = n + 1 return n end, 1)
        check(it() == 1 and it() == 2)
        pool:close()
        pool:join()
        local ok, err = pcall(function() for _ in it do end end)
        check(not ok and err:find("the pool was closed before the call finished", 1, true), err)
      end)
    end)

    it("an imap continued after close() alone completes", function()
      bounded(function()
        local pool = mp.Pool(2)
        local n = 0
        local it = pool:imap(identity, function() n = n + 1 if n <= 3000 then return n end end, 1)
        check(it() == 1)
        pool:close()
        local count = 1
        for i, v in it do assert(i == v) count = count + 1 end
        check(count == 3000, count)
        pool:join()
      end)
    end)

    it("pending calls fail when the pool broke and no worker is left", function()
      bounded(function()
        local flag = os.tmpname()
        os.remove(flag)
        -- replacements fail their initializer once the flag exists
        local pool = mp.Pool { processes = 1, initializer = function()
          local f = io.open(flag) if f then f:close() error("no more workers") end
        end }
        local f = io.open(flag, "w") f:close()
        local r1 = pool:apply_async(function() os.exit(1) end)
        local r2 = pool:apply_async(function() return 2 end)
        local ok, err = pcall(r2.get, r2)
        os.remove(flag)
        check(not ok and err:find("the pool is broken", 1, true), err)
        check(not pcall(r1.get, r1))
        pool:terminate()
      end)
    end)

    it("a task message nobody holds fails its call instead of hanging, even while the pool is busy", function()
      bounded(function()
        local pool = mp.Pool(1)
        local r1 = pool:apply_async(function() mp.sleep(0.3) return 1 end)
        local r2 = pool:apply_async(function() return 2 end)
        local r3 = pool:map_async(function(x) mp.sleep(0.01) return x end, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
          11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32 }, 1)
        -- lose r2's message as a take killed before its claim would: out of the queue, held by nobody
        check(H.eventually(function() return pool._st:claimed(1) ~= 0 end, 5))
        pcall(pool._tasks.get, pool._tasks, 1)
        check(r1:get() == 1)
        local ok, err = pcall(r2.get, r2)
        check(not ok and err:find("apply: the task message of item 1 was lost", 1, true), err)
        check(#r3:get() == 32)
        check(pool:apply(function() return 3 end) == 3)
        pool:terminate()
      end)
    end)
  end)

  describe("a failed imap input", function()
    it("an iterator that raises past the first window: the items before it first, then its error", function()
      local pool <close> = mp.Pool(2)
      local before = pool:stats()
      local n, last = 0, 0
      local err = H.error_of(function()
        for i, v in pool:imap(identity, function()
          n = n + 1
          if n == 2000 then error("no more input") end
          return n
        end, 1) do
          assert.equal(last + 1, i)
          assert.equal(i, v)
          last = i
        end
      end)
      assert.equal(1999, last)
      assert.matches("imap: the input iterator raised at item 2000: .*no more input", err)
      assert.not_matches("pool%.lua", err)
      -- the pool is untouched: same workers, and the next calls do not see the old error
      assert.are.same({ 2, 4, 6, n = 3 }, pool:map(double, { 1, 2, 3 }))
      assert.are.same({ 2, 4, n = 2 }, pool:map(double, { 1, 2 }))
      for i, w in ipairs(pool:stats()) do assert.equal(before[i].pid, w.pid) end
      assert.matches("state=running", tostring(pool))
    end)

    it("an unsendable item past the first window: the items before it first, then its error", function()
      local pool <close> = mp.Pool(2)
      for _, kind in ipairs { "imap", "imap_unordered" } do
        local n, count = 0, 0
        local err = H.error_of(function()
          for _ in pool[kind](pool, identity, function()
            n = n + 1
            if n == 1500 then return coroutine.create(print) end
            if n <= 3000 then return n end
          end, 7) do count = count + 1 end
        end)
        assert.matches("cannot send a thread %(coroutine%) at args%[1500%]", err)
        if kind == "imap" then assert.equal(1499, count) end
        assert.are.same({ 2, n = 1 }, pool:map(double, { 1 }))
      end
    end)

    it("in the first window too, and in map with an iterator input", function()
      local pool <close> = mp.Pool(2)
      local n, got = 0, {}
      local err = H.error_of(function()
        for i, v in pool:imap(identity, function() n = n + 1 if n == 3 then error("third") end return n end, 1) do
          got[i] = v
        end
      end)
      assert.are.same({ 1, 2 }, got)
      assert.matches("imap: the input iterator raised at item 3: .*third", err)
      n = 0
      H.raises("map: the input iterator raised at item 5", pool.map, pool, identity, function()
        n = n + 1 if n == 5 then error("fifth") end return n
      end)
      assert.are.same({ 2, n = 1 }, pool:map(double, { 1 }))
    end)
  end)

  describe("a wrapped imap", function()
    it("mp.progress closes the imap it wraps: after a break its input is no longer read", function()
      local pool <close> = mp.Pool(2)
      local asked = 0
      local function naturals() asked = asked + 1 return asked end
      for i in mp.progress(pool:imap(double, naturals, 1)) do
        if i == 5 then break end
      end
      local after = asked
      for _ = 1, 5 do pool:map(double, { 1, 2, 3, 4 }, 1) end
      assert.equal(after, asked)
    end)

    it("the wrapper's closing value closes the imap (and nested wrappers too)", function()
      local pool <close> = mp.Pool(2)
      local asked = 0
      local f, _, _, closer = mp.progress(mp.progress(pool:imap(double, function() asked = asked + 1 return asked end, 1)))
      assert.are.same({ 1, 2 }, { f() })
      getmetatable(closer).__close(closer)
      assert.is_nil(f())
      local after = asked
      pool:map(double, { 1, 2 })
      assert.equal(after, asked)
    end)

    it("an imap loop that nobody can continue is abandoned once collected", function()
      local pool <close> = mp.Pool(2)
      local asked = 0
      do
        local f = pool:imap(double, function() asked = asked + 1 return asked end, 1)
        f()
      end
      collectgarbage() collectgarbage()
      pool:map(double, { 1 })
      assert.is_nil(next(pool._calls))  -- the engine let go of the call
      local after = asked
      pool:map(double, { 1, 2 })
      assert.equal(after, asked)
    end)
  end)

  describe("nothing piles up", function()
    it("a pool made and not closed inside a task is collected after the task", function()
      local pool <close> = mp.Pool(2)
      pool:map(function()
        local inner = mp.Pool(2)
        inner:map(function(x) return x end, { 1 })
      end, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20 }, 1)
      assert.is_true(H.eventually(function()
        for _, w in ipairs(pool:stats()) do
          if #H.children(w.pid) > 0 then return false end
        end
        return true
      end, 10), "nested pools' workers left behind")
    end)

    it("a long-lived pool keeps a bounded number of function blobs", function()
      local pool <close> = mp.Pool(2)
      local function call(i)
        local big = ("x"):rep(8192) .. i  -- each call's function is a new 8 KiB blob
        return pool:apply_async(function() return #big end)
      end
      for i = 1, 40 do call(i):get() end
      local used = core.arena_stats().used
      local rs = {}
      for i = 1, 400 do rs[#rs + 1] = call(i) if i % 50 == 0 then for _, r in ipairs(rs) do r:get() end rs = {} end end
      for i = 1, 200 do assert.equal(8192 + #tostring(i), pool:apply(function() return #(("x"):rep(8192) .. i) end)) end
      local grown = core.arena_stats().used - used
      assert.is_true(grown < 1024 * 1024, ("the arena grew by %d bytes"):format(grown))
    end)

    it("apply_async loops reuse the function's blob", function()
      local pool <close> = mp.Pool(2)
      local k = 3
      local rs = {}
      for i = 1, 200 do rs[i] = pool:apply_async(function(x) return x * k end, { i }) end
      for i = 1, 200 do assert.equal(3 * i, rs[i]:get()) end
      assert.equal(1, pool._nfid)
    end)
  end)

  describe("a program that narrowed package.path after it made the pool", function()
    it("a worker's death and a result that cannot be sent still fail their call, not the pool", function()
      local status, out = run([[
        local mp = require "multiprocessing"
        local pool = mp.Pool(1)
        print("first:", pool:apply(function(x) return x + 1 end, { 1 }))
        package.path = "./?.lua"   -- (the program's own business, after start-up)
        print("died:", pcall(pool.apply, pool, function() os.exit(3) end, {}))
        print("unsendable:", pcall(pool.apply, pool, function() return coroutine.create(print) end, {}))
        print("after:", pool:apply(function(x) return x * 2 end, { 21 }))
        pool:close() pool:join()
      ]])
      assert.equal(0, status, out)
      assert.matches("died:\tfalse\tapply: worker pid %d+ died %(exit code 3%) while running item 1", out)
      assert.matches("unsendable:\tfalse\tapply failed on item 1 %(worker pid %d+%):\ncannot send a thread", out)
      assert.matches("after:\t42", out)
    end)

    it("the calls loaded on first use (apply_async, Process) still load", function()
      local status, out = run([[
        local mp = require "multiprocessing"
        local pool = mp.Pool(1)
        package.path = "./?.lua"
        print("async:", pool:apply_async(function(x) return x + 1 end, { 1 }):get(10))
        local p = mp.Process { target = function() end }
        p:start() p:join()
        print("process:", p.exitcode)
        pool:close() pool:join()
      ]])
      assert.equal(0, status, out)
      assert.matches("async:\t2", out)
      assert.matches("process:\t0", out)
    end)
  end)

  describe("out of shared memory", function()
    it("a result too big for the arena fails its item, not the worker; a task too big fails its call", function()
      local status, out = run([[
        local mp = require "multiprocessing"
        local pool = mp.Pool(2)
        local pids = {}
        for i, w in ipairs(pool:stats()) do pids[i] = w.pid end
        local ok, err = pcall(pool.map, pool, function(x)
          if x == 2 then return ("x"):rep(100 * 1024 * 1024) end
          return x
        end, { 1, 2, 3 }, 3)
        print("result:", ok, err)
        ok, err = pcall(pool.map, pool, function(s) return #s end, { "a", ("y"):rep(100 * 1024 * 1024), "b" })
        print("task:", ok, err)
        print("after:", table.concat(pool:map(function(x) return x * 2 end, { 1, 2, 3 }), ","))
        local same = true
        for i, w in ipairs(pool:stats()) do same = same and w.pid == pids[i] end
        print("same workers:", same)
        pool:close() pool:join()
      ]], nil, nil, "LUA_MP_ARENA_SIZE=" .. 64 * 1024 * 1024)
      assert.equal(0, status, out)
      assert.matches("result:\tfalse\tmap failed on item 2 %(worker pid %d+%):\nout of shared memory: %d+ bytes wanted", out)
      assert.matches("task:\tfalse\t[^\n]*out of shared memory: %d+ bytes wanted", out)
      assert.matches("after:\t2,4,6", out)
      assert.matches("same workers:\ttrue", out)
      assert.not_matches("died", out)
    end)
  end)
end)
