-- Specs of Pool under faults: raising tasks, killed and exiting workers, initializers, timeouts,
-- parent death, Ctrl-C (in a script and at the lua5.4 -i prompt) and a REPL session.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- Functions sent to workers must not reach globals through busted's sandbox environment: it would
-- be sent by value with all of busted's state. These locals make them upvalues instead (the real
-- _G is sent as "the receiver's globals").
local _G, error, select, tostring, tonumber, type, pairs, ipairs, print =
      _G, error, select, tostring, tonumber, type, pairs, ipairs, print
local math, string, table, io, os, coroutine = math, string, table, io, os, coroutine

local function double(x) return x * 2 end

-- writes `text` to `path` (from a worker: the parent polls for it)
local function mark(path, text)
  local f = io.open(path, "w")
  f:write(text or "")
  f:close()
end

local function worker_pids(pool)
  local pids = {}
  for i, w in ipairs(pool:stats()) do pids[i] = w.pid end
  return pids
end

-- runs `script` (Lua source) with lua5.4 in the background, in a session of its own, with stdin
-- from `input` (a string, or nothing); returns its pid (also its process group) and the output file
local function run_detached(script, input, args)
  local src, out, pidf = H.tmpname(), H.tmpname(), H.tmpname()
  mark(src, script)
  local inp = H.tmpname()
  mark(inp, input or "")
  local cmd = ("%s setsid sh -c 'echo $$ > %s; exec %s %s' < %s > %s 2>&1 &"):format(
    H.ENV, pidf, H.LUA, args or src, inp, out)
  assert(os.execute(cmd))
  local pid = H.eventually(function()
    local s = H.slurp(pidf)
    return s and tonumber(s:match("%d+"))
  end, 5)
  assert(pid, "the detached interpreter did not start")
  return pid, out, src
end

describe("Pool faults", function()
  H.leak_check(before_each, after_each)

  describe("a task that raises", function()
    it("makes map raise with the worker's message, traceback and the failing item", function()
      local pool <close> = mp.Pool(2)
      local err = H.error_of(pool.map, pool, function(x)
        if x == 3 then error("bad item " .. x) end
        return x
      end, { 1, 2, 3, 4 }, 1)
      assert.matches("^map failed on item 3 %(worker pid %d+%):\n", err)
      assert.matches("bad item 3", err)
      assert.matches("stack traceback:", err)
      assert.matches("pool_faults_spec.lua:%d+: in ", err)
    end)

    it("keeps non-string error values readable", function()
      local pool <close> = mp.Pool(1)
      local err = H.error_of(pool.map, pool, function() error({ code = 1 }) end, { 1 })
      assert.matches("map failed on item 1", err)
      err = H.error_of(pool.map, pool, function() error(42, 0) end, { 1 })
      assert.matches("\n42", err)
    end)

    it("leaves the pool usable, with the same workers", function()
      local pool <close> = mp.Pool(2)
      local before = worker_pids(pool)
      assert.has_error(function() pool:map(function() error("x") end, { 1, 2, 3 }) end)
      assert.are.same({ 2, 4, 6, n = 3 }, pool:map(double, { 1, 2, 3 }))
      assert.are.same(before, worker_pids(pool))
    end)

    it("names the item in starmap, imap and imap_unordered", function()
      local pool <close> = mp.Pool(2)
      local function f(x) if x == 2 then error("two") end return x end
      H.raises("starmap failed on item 2", pool.starmap, pool, f, { { 1 }, { 2 }, { 3 } })
      local got = {}
      local err = H.error_of(function()
        for i, v in pool:imap(f, { 1, 2, 3 }, 1) do got[i] = v end
      end)
      assert.matches("imap failed on item 2", err)
      assert.are.same({ 1 }, got)  -- the items before the failure were yielded
      H.raises("unordered failed on item 2", function()
        for _ in pool:imap_unordered(f, { 1, 2, 3 }, 1) do end
      end)
      assert.are.same({ 1, 2, n = 2 }, pool:map(tonumber, { "1", "2" }))
    end)

    it("gives error_callback the same error", function()
      local pool <close> = mp.Pool(2)
      local got
      local r = pool:map_async(function(x) if x == 2 then error("two!") end return x end, { 1, 2, 3 },
        { chunksize = 1, error_callback = function(e) got = e end })
      local err = H.error_of(r.get, r)
      assert.equal(err:gsub("^.-:%d+: ", ""), got:gsub("^.-:%d+: ", ""))
      assert.matches("^map failed on item 2 %(worker pid %d+%):\n.-two!\nstack traceback:", got)
    end)
  end)

  describe("a worker that dies", function()
    it("killed with SIGKILL mid-task: map raises naming pid, signal and item; the worker is replaced", function()
      local pool <close> = mp.Pool(2)
      local before = worker_pids(pool)
      local flag = H.tmpname()
      os.remove(flag)
      local r = pool:map_async(function(x)
        if x == 3 then mark(flag, tostring(core.getpid())) mp.sleep(10) end
        return x
      end, { 1, 2, 3, 4 }, 1)
      local victim = H.eventually(function() local s = H.slurp(flag) return s and tonumber(s) end, 5)
      assert.is_number(victim)
      core.kill(victim, 9)
      local err = H.error_of(r.get, r)
      assert.matches(("map: worker pid %d died %%(killed by SIGKILL%%) while running item 3"):format(victim), err)
      -- replaced: still two live workers, the victim is not one of them
      local after = worker_pids(pool)
      assert.equal(2, #after)
      for _, pid in ipairs(after) do
        assert.are_not.equal(victim, pid)
        assert.is_true(H.alive(pid))
      end
      assert.is_true(before[1] == victim or before[2] == victim)
      assert.are.same({ 2, 4, 6, 8, n = 4 }, pool:map(double, { 1, 2, 3, 4 }, 1))
    end)

    it("killing itself: map raises within the test's patience", function()
      local pool <close> = mp.Pool(2)
      local t0 = mp.now()
      local err = H.error_of(pool.map, pool, function(x)
        if x == 2 then core.kill(core.getpid(), 9) mp.sleep(10) end
        return x
      end, { 1, 2, 3 }, 1)
      assert.is_true(mp.now() - t0 < 5)  -- patience, not a timing claim: the task would sleep 10 s
      assert.matches("worker pid %d+ died %(killed by SIGKILL%) while running item 2", err)
      assert.are.same({ 2, n = 1 }, pool:map(double, { 1 }))
    end)

    it("calling os.exit: map raises naming the exit code", function()
      local pool <close> = mp.Pool(2)
      local err = H.error_of(pool.map, pool, function(x)
        if x == 2 then os.exit(3) end
        return x
      end, { 1, 2, 3 }, 1)
      assert.matches("map: worker pid %d+ died %(exit code 3%) while running item 2", err)
      assert.are.same({ 1, 2, 3, n = 3 }, pool:map(function(x) return x end, { 1, 2, 3 }))
    end)

    it("names the whole chunk that was lost", function()
      local pool <close> = mp.Pool(1)
      local err = H.error_of(pool.map, pool, function(x)
        if x == 5 then os.exit(7) end
        return x
      end, { 1, 2, 3, 4, 5, 6 }, 3)
      assert.matches("died %(exit code 7%) while running items 4%-6", err)
    end)

    it("apply_async: error_callback gets the death", function()
      local pool <close> = mp.Pool(1)
      local got
      local r = pool:apply_async(function() os.exit(5) end, nil, { error_callback = function(e) got = e end })
      assert.is_true(r:wait(5))
      assert.is_false(r:successful())
      assert.matches("apply: worker pid %d+ died %(exit code 5%) while running item 1", got)
    end)

    it("when idle: it is replaced quietly", function()
      local pool <close> = mp.Pool(2)
      local victim = worker_pids(pool)[1]
      core.kill(victim, 9)
      assert.is_true(H.eventually(function() return not H.alive(victim) end, 5))
      assert.are.same({ 2, 4, 6, n = 3 }, pool:map(double, { 1, 2, 3 }))
      assert.is_true(H.eventually(function()
        pool:map(double, { 1 })
        local pids = worker_pids(pool)
        return pids[1] and pids[1] ~= victim and H.alive(pids[1])
      end, 5))
    end)

    for _, how in ipairs({ "killed", "stopped" }) do
      it("is " .. how .. " between its maxtasksperchild note and its exit: the pool goes on", function()
        -- (its note says it leaves; the parent waits for its exit a moment only, then leaves a
        -- worker that did not exit to the health check, as one that never said anything)
        local script = ([[
          local mp = require "multiprocessing"
          local core = require "multiprocessing.core"
          local pool = mp.Pool { processes = 2, maxtasksperchild = 2 }
          local victim = pool:apply(function(sig)
            local c = require "multiprocessing.core"
            local exit = c._exit
            c._exit = function(code) c.kill(c.getpid(), sig) return exit(code) end
            return c.getpid()
          end, { %d })
          local xs = {}
          for i = 1, 40 do xs[i] = i end
          local out = pool:map(function(x) return x * 2 end, xs, 1)
          assert(#out == 40 and out[40] == 80)
          core.kill(victim, 18)  -- (a stopped one goes on to its exit)
          pool:close()
          pool:join()
          print("done " .. #mp.active_children())
        ]]):format(how == "killed" and 9 or 19)
        assert.are.equal("done 0\n", H.script_output(script))
      end)
    end
  end)

  describe("an initializer that raises", function()
    it("makes Pool creation fail with its error, without respawning", function()
      local runs = H.tmpname()
      os.remove(runs)
      local err = H.error_of(mp.Pool, { processes = 2, initializer = function()
        local f = io.open(runs, "a") f:write("x\n") f:close()
        error("init failed here")
      end })
      assert.matches("^Pool initializer failed: in worker %(pid %d+%):\n", err)
      assert.matches("init failed here", err)
      assert.matches("stack traceback:", err)
      mp.sleep(0.2)  -- a respawn storm would go on writing
      local n = 0
      for _ in io.lines(runs) do n = n + 1 end
      assert.is_true(n >= 1 and n <= 2, n .. " initializer runs")
      assert.are.same({}, H.children())
    end)

    it("that exits: Pool creation fails", function()
      local err = H.error_of(mp.Pool, { processes = 2, initializer = function() os.exit(4) end })
      assert.matches("Pool initializer failed", err)
      assert.matches("exit code 4", err)
      assert.are.same({}, H.children())
    end)
  end)

  describe("timeout option", function()
    it("kills the overdue worker, raises naming the task, and replaces the worker", function()
      local pool <close> = mp.Pool(2)
      local err = H.error_of(pool.map, pool, function(x)
        if x == 2 then mp.sleep(10) end
        return x
      end, { 1, 2, 3, 4 }, { chunksize = 1, timeout = 0.2 })
      assert.matches("^map: task timed out after 0.2s %(item 2%); worker pid %d+ was killed$", err)
      local victim = tonumber(err:match("worker pid (%d+)"))
      assert.is_true(H.eventually(function() return not H.alive(victim) end, 5))
      assert.are.same({ 2, 4, n = 2 }, pool:map(double, { 1, 2 }, { timeout = 5 }))
      assert.equal(2, #worker_pids(pool))
    end)

    it("applies to apply_async", function()
      local pool <close> = mp.Pool(1)
      local r = pool:apply_async(function() mp.sleep(10) end, nil, { timeout = 0.1 })
      H.raises("apply: task timed out after 0.1s (item 1)", r.get, r)
      assert.equal(7, pool:apply(function() return 7 end))
    end)

    it("does not fire for tasks that finish in time", function()
      local pool <close> = mp.Pool(2)
      assert.are.same({ 1, 2, n = 2 }, pool:map(function(x) mp.sleep(0.02) return x end, { 1, 2 }, { timeout = 5 }))
    end)
  end)

  describe("parent death", function()
    it("takes the workers with it (the parent killed with SIGKILL)", function()
      local pidfile = H.tmpname()
      os.remove(pidfile)
      local parent = H.spawn(function()
        local pool = mp.Pool(2)
        pool:map(double, { 1, 2 })
        local pids = worker_pids(pool)
        mark(pidfile .. ".tmp", table.concat(pids, " "))
        os.rename(pidfile .. ".tmp", pidfile)
        mp.sleep(30)
      end)
      local s = H.eventually(function() return H.slurp(pidfile) end, 5)
      assert.is_string(s)
      local workers = {}
      for p in s:gmatch("%d+") do workers[#workers + 1] = tonumber(p) end
      assert.equal(2, #workers)
      for _, p in ipairs(workers) do assert.is_true(H.alive(p)) end
      core.kill(parent, 9)
      assert.equal(-9, core.waitpid(parent))
      for _, p in ipairs(workers) do
        assert.is_true(H.eventually(function() return not H.alive(p) end, 5), "worker " .. p .. " outlived its parent")
      end
    end)
  end)

  describe("Ctrl-C", function()
    -- Ctrl-C lands in the user's own code that the pool runs in the parent: an input
    -- iterator read while another call waits, a callback. It is the program's interrupt, not
    -- that code's error: it is raised (and the pool terminated), never kept as a call's failure
    -- or printed as a callback's error while the wait goes on.
    it("in an input iterator read during another call's wait: raises interrupted!, not an input error", function()
      local text = H.interrupted([[
        local pool = mp.Pool(2)
        local n = 0
        print("run:", pcall(function()
          local r = pool:map_async(function(x) return x end, function()
            n = n + 1
            if n == 3 then started() end
            if n >= 3 then local t0 = os.clock() repeat until os.clock() - t0 > 0.02 end
            if n < 5000 then return n end
          end)
          pool:apply(function() mp.sleep(30) return 1 end)
        end))
        print("pool:", pool)
      ]])
      assert.matches("run:\tfalse\t[^\n]*interrupted!", text)
      assert.not_matches("input iterator raised", text)
    end)

    it("in a callback run during a wait: raises interrupted! and terminates the pool", function()
      local text = H.interrupted([[
        local pool = mp.Pool(2)
        print("run:", pcall(function()
          pool:apply_async(function() return 1 end, nil, { callback = function()
            started()
            local t0 = os.clock() repeat until os.clock() - t0 > 30
          end })
          pool:apply(function() mp.sleep(30) return 1 end)
        end))
        print("pool:", pool)
      ]])
      assert.matches("run:\tfalse\t[^\n]*interrupted!", text)
      assert.not_matches("error in a pool callback", text)
      assert.matches("pool:\t<Pool processes=2 state=terminated>", text)
    end)

    it("in a script: the parent raises \"interrupted!\" and exits, no worker remains", function()
      local marker, pidfile = H.tmpname(), H.tmpname()
      os.remove(marker)
      local script = ([[
        local mp = require "multiprocessing"
        local pool = mp.Pool(2)
        local pids = {}
        for i, w in ipairs(pool:stats()) do pids[i] = w.pid end
        local f = io.open(%q, "w") f:write(table.concat(pids, " ")) f:close()
        pool:map(function(x)
          local g = io.open(%q, "w") g:close()
          mp.sleep(30)
          return x
        end, { 1, 2, 3, 4 }, 1)
        print("not reached")
      ]]):format(pidfile, marker)
      local pid, out = run_detached(script)
      assert.is_true(H.eventually(function() return H.slurp(marker) ~= nil end, 10), "the map did not start")
      local workers = {}
      for p in H.slurp(pidfile):gmatch("%d+") do workers[#workers + 1] = tonumber(p) end
      assert.equal(2, #workers)
      assert(os.execute("kill -INT -" .. pid))
      assert.is_true(H.eventually(function() return not H.alive(pid) end, 5), "the interpreter did not exit")
      local text = H.slurp(out)
      assert.matches("interrupted!", text)
      assert.not_matches("not reached", text)
      for _, p in ipairs(workers) do
        assert.is_true(H.eventually(function() return not H.alive(p) end, 5), "worker " .. p .. " remains")
      end
    end)

    it("at the lua5.4 -i prompt: the session survives and a new pool works", function()
      local marker, pidfile = H.tmpname(), H.tmpname()
      os.remove(marker)
      local input = table.concat({
        'mp = require "multiprocessing"',
        'pool = mp.Pool(2)',
        ('pids = {} for i, w in ipairs(pool:stats()) do pids[i] = w.pid end '
          .. 'f = io.open(%q, "w") f:write(table.concat(pids, " ")) f:close()'):format(pidfile),
        ('pool:map(function(x) local g = io.open(%q, "w") g:close() mp.sleep(30) return x end, {1, 2, 3, 4}, 1)')
          :format(marker),
        'print("pool after Ctrl-C: " .. tostring(pool))',
        'pool2 = mp.Pool(2)',
        'print("new pool: " .. table.concat(pool2:map(function(x) return x * x end, {1, 2, 3}), ","))',
        'pool2:close() pool2:join()',
        'print("bye")',
      }, "\n") .. "\n"
      local pid, out = run_detached(nil, input, "-i")
      assert.is_true(H.eventually(function() return H.slurp(marker) ~= nil end, 10), "the map did not start")
      assert(os.execute("kill -INT -" .. pid))
      assert.is_true(H.eventually(function() return not H.alive(pid) end, 10), "the session did not finish")
      local text = H.slurp(out)
      assert.matches("interrupted!", text)
      assert.matches("pool after Ctrl%-C: <Pool processes=2 state=terminated>", text)
      assert.matches("new pool: 1,4,9", text)
      assert.matches("bye", text)
      for p in H.slurp(pidfile):gmatch("%d+") do
        assert.is_true(H.eventually(function() return not H.alive(tonumber(p)) end, 5), "worker " .. p .. " remains")
      end
    end)
  end)

  describe("at the lua5.4 -i prompt", function()
    it("maps a function typed at the prompt", function()
      local out = H.tmpname()
      local input = 'mp = require "multiprocessing"\n'
        .. 'pool = mp.Pool(2)\n'
        .. 'function sq(x) return x * x end\n'
        .. 'print("result: " .. table.concat(pool:map(sq, {1, 2, 3, 4}), ","))\n'
        .. 'local k = 10 print("closure: " .. table.concat(pool:map(function(x) return x + k end, {1, 2}), ","))\n'
        .. 'pool:close() pool:join()\n'
      local cmd = ("printf '%%s' %s | %s %s -i > %s 2>&1"):format(H.quote(input), H.ENV, H.LUA, out)
      assert.is_true(os.execute(cmd))
      local text = H.slurp(out)
      assert.matches("result: 1,4,9,16", text)
      assert.matches("closure: 11,12", text)
    end)
  end)
end)
