-- Specs of Process, current_process, parent_process, active_children, cpu_count.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- targets must not reach globals through busted's sandbox (see pool_spec.lua)
local error, select, tostring, os, io = error, select, tostring, os, io

local run_script = H.run_script

-- the state letter of a process ("S", "T", "Z"...), nil if gone
local function pstate(pid)
  local s = H.slurp(("/proc/%d/stat"):format(pid))
  return s and s:match("^%d+ %b() (%a)")
end

-- a script's first lines: the library, and the state of a process
local PRELUDE = [[
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local function state(pid)
  local f = io.open(("/proc/%d/stat"):format(pid)) if not f then return nil end
  local s = f:read("a") f:close()
  return s:match("^%d+ %b() (%a)")
end
]]

describe("Process", function()
  H.leak_check(before_each, after_each)

  it("starts, joins and reports exit code 0", function()
    local p = mp.Process { target = function() end }
    assert.is_false(p:is_alive())
    assert.is_nil(p.exitcode)
    assert.equal(p, p:start())
    assert.is_number(p.pid)
    assert.is_true(p:join())
    assert.equal(0, p.exitcode)
    assert.is_false(p:is_alive())
  end)

  it("takes the target as the first array item too", function()
    local p = mp.Process { function(a) return a end, args = { 5 } }
    p:start() p:join()
    assert.equal(5, p:result())
  end)

  it("join(timeout) returns nil, \"timeout\" while the child runs", function()
    local p = mp.Process { target = function() mp.sleep(0.3) end }
    p:start()
    assert.is_true(p:is_alive())
    local ok, why = p:join(0.02)
    assert.is_nil(ok)
    assert.equal("timeout", why)
    assert.is_nil(p.exitcode)
    assert.is_true(p:join())
    assert.equal(0, p.exitcode)
  end)

  it("reports exit code 1 when the target raises, with the error from result()", function()
    local stderr = H.capture_stderr()
    finally(stderr)
    local p = mp.Process { target = function() error("child failed") end, name = "Failing" }
    p:start() p:join()
    assert.matches("^Process Failing %(pid " .. p.pid .. "%):\n.-child failed\nstack traceback:", stderr())
    assert.equal(1, p.exitcode)
    local err = H.error_of(p.result, p)
    assert.matches("child failed", err)
    assert.matches("stack traceback:", err)
  end)

  it("reports the code given to os.exit", function()
    local p = mp.Process { target = function() os.exit(7) end }
    p:start() p:join()
    assert.equal(7, p.exitcode)
    H.raises("exited with code 7 before returning", p.result, p)
  end)

  it("terminate() gives exit code -15, kill() -9", function()
    local p = mp.Process { target = function() mp.sleep(30) end }
    local q = mp.Process { target = function() mp.sleep(30) end }
    p:start() q:start()
    p:terminate() q:kill()
    p:join() q:join()
    assert.equal(-15, p.exitcode)
    assert.equal(-9, q.exitcode)
    H.raises("was killed by SIGKILL", q.result, q)
    -- on a finished process they do nothing
    p:terminate() q:kill()
  end)

  it("is named Process-N by default", function()
    local a, b = mp.Process {}, mp.Process {}
    local na, nb = tonumber(a.name:match("^Process%-(%d+)$")), tonumber(b.name:match("^Process%-(%d+)$"))
    assert.is_number(na)
    assert.equal(na + 1, nb)
    assert.equal("Worker", mp.Process { name = "Worker" }.name)
  end)

  it("result() returns the target's values, nils included (args.n honoured)", function()
    local p = mp.Process { target = function(...) return select("#", ...), ... end, args = { 1, nil, 3, nil, n = 4 } }
    p:start() p:join()
    local r = table.pack(p:result())
    assert.equal(5, r.n)
    assert.are.same({ 4, 1, nil, 3, nil, n = 5 }, r)
    assert.are.same({ 4, 1, nil, 3, nil, n = 5 }, table.pack(p:result()))  -- again: same values
  end)

  it("result() before join raises", function()
    local p = mp.Process { target = function() mp.sleep(0.2) end }
    H.raises("cannot get the result of a process that was not started", p.result, p)
    p:start()
    H.raises("has not finished (join it first)", p.result, p)
    p:join()
    assert.equal(0, select("#", p:result()))
  end)

  it("rejects bad arguments and misuse", function()
    H.raises("bad argument #1 to 'Process' (table expected, got number)", mp.Process, 1)
    H.raises("target must be callable", mp.Process, { target = 1 })
    H.raises("args must be a table", mp.Process, { target = print, args = 1 })
    local p = mp.Process {}
    H.raises("cannot join a process that was not started", p.join, p)
    p:start()
    H.raises("cannot start a process twice", p.start, p)
    p:join()
    -- the core never waits for "any child": it would steal the status of others' children
    H.raises("pid must be positive", core.waitpid, -1)
    H.raises("pid must be positive", core.reap, 0)
  end)

  it("a status another wait took makes exitcode, is_alive, join and kill raise, never 'running' forever", function()
    local p = mp.Process { name = "Taken", target = function() end }
    p:start()
    assert.equal(0, core.waitpid(p.pid))  -- the status goes to another wait: core.reap gets nil, msg, code
    local text = ("the exit status of process Taken (pid %d) was taken by another wait"):format(p.pid)
    H.raises("cannot read exitcode: " .. text, function() return p.exitcode end)
    H.raises("cannot is_alive: " .. text, p.is_alive, p)
    H.raises("cannot join: " .. text, p.join, p)
    H.raises("cannot kill: " .. text, p.kill, p)  -- (its pid may be another process's by now)
    H.raises("cannot get the result of: " .. text, p.result, p)
    assert.matches("status lost", tostring(p), nil, true)
    local e = H.error_of(p.join, p)
    assert.is_nil(e:find("process.lua", 1, true))
    assert.same({}, mp.active_children())  -- not ours to wait for any more
    p:close()
  end)

  it("has a readable tostring", function()
    local p = mp.Process { name = "T" }
    assert.matches("<Process name='T' pid=nil initial>", tostring(p), nil, true)
    p:start() p:join()
    assert.matches("stopped exitcode=0", tostring(p))
  end)

  describe("current_process and parent_process", function()
    it("are MainProcess and nil in the parent", function()
      assert.equal("MainProcess", mp.current_process().name)
      assert.equal(core.getpid(), mp.current_process().pid)
      assert.is_nil(mp.parent_process())
    end)

    it("are the child's name and the parent in the child", function()
      local cp, pp = mp.current_process, mp.parent_process
      local p = mp.Process { name = "Kid", target = function()
        return cp().name, cp().pid, pp().name, pp().pid
      end }
      p:start() p:join()
      local name, pid, pname, ppid = p:result()
      assert.equal("Kid", name)
      assert.equal(p.pid, pid)
      assert.equal("MainProcess", pname)
      assert.equal(core.getpid(), ppid)
    end)
  end)

  it("active_children() lists the running children", function()
    local ps = {}
    for i = 1, 2 do ps[i] = mp.Process { target = function() mp.sleep(0.3) end }:start() end
    local kids = mp.active_children()
    assert.equal(2, #kids)
    for _, p in ipairs(ps) do p:join() end
    assert.equal(0, #mp.active_children())
  end)

  it("keeps the exit status when a Ctrl-C lands as join returns", function()
    -- The parent is stopped inside join, its child ends, and a SIGINT arrives as it
    -- resumes: the wait reaps the child and returns, and lua.c's hook throws the
    -- result away. A later join must still find the status (not ECHILD).
    local ok, out = run_script(PRELUDE .. [[
      local me = core.getpid()
      local go = mp.Event()
      local p = mp.Process { target = function() go:wait(30) end }:start()
      local helper = core.fork()
      if helper == 0 then
        while state(me) ~= "S" do core.sleep(0.01) end  -- asleep in join
        core.kill(me, 19)
        go:set()
        while state(p.pid) ~= "Z" do core.sleep(0.01) end
        core.kill(me, 2)
        core.kill(me, 18)
        core._exit(0)
      end
      local ok, err = pcall(p.join, p)
      print("first", ok, err)
      print("second", pcall(p.join, p))
      print("exitcode", p.exitcode, p:is_alive())
      print("helper", core.waitpid(helper))
    ]])
    assert.is_true(ok, out)
    assert.matches("first\tfalse\t[^\n]*interrupted!", out)
    assert.matches("second\ttrue\ttrue", out)
    assert.matches("exitcode\t0\tfalse", out)
    assert.matches("helper\t0", out)
  end)

  it("reaps children that ended at the next start (no zombies pile up)", function()
    local ps, n = {}, os.getenv("MP_VALGRIND") and 10 or 100
    for i = 1, n do ps[i] = mp.Process { target = function() return i end }:start() end
    for i = 1, n do
      assert.is_true(H.eventually(function() return not H.alive(ps[i].pid) end, 60))
    end
    local go = mp.Event()
    local last = mp.Process { target = function() go:wait(30) end }:start()
    assert.same({ last.pid }, H.children())  -- the 100 ended ones were reaped
    for i = 1, n do
      assert.equal(0, ps[i].exitcode)
      assert.is_true(ps[i]:join())
      assert.equal(i, ps[i]:result())
    end
    go:set()
    last:join()
  end)

  it("keeps track of many children alive at once (more than its first records hold)", function()
    local go, ps = mp.Event(), {}
    for i = 1, 20 do ps[i] = mp.Process { target = function() go:wait(30) return i end }:start() end
    assert.equal(20, #mp.active_children())
    go:set()
    for i = 20, 1, -1 do  -- (the latest first: records are found and dropped out of order)
      assert.is_true(ps[i]:join(30))
      assert.equal(0, ps[i].exitcode)
      assert.equal(i, ps[i]:result())
    end
    assert.same({}, H.children())
    go:close()
  end)

  it("active_children() reaps the children that ended", function()
    local p = mp.Process { target = function() end }:start()
    assert.is_true(H.eventually(function() return not H.alive(p.pid) end, 60))
    assert.same({}, mp.active_children())
    assert.same({}, H.children())
    assert.equal(0, p.exitcode)
  end)

  it("keeps what a child left in stdio buffers at its exit, and prints nothing twice", function()
    local ok, out = run_script(PRELUDE .. [[
io.write("before ")  -- (a file, fully buffered: flushed before the fork, printed once)
local path = os.tmpname()
local f = assert(io.open(path, "w"))
local p = mp.Process { target = function() io.write("child ") f:write("in a file") end }
p:start() p:join()
local q = mp.Process { target = function() end }  -- a child with nothing to flush
q:start() q:join()
local pool = mp.Pool(1)
pool:apply(function() io.write("worker ") end)
pool:close() pool:join()
local g = io.open(path) local s = g:read("a") g:close() os.remove(path)
io.write("after: ", s, "\n")
]])
    assert.is_true(ok)
    assert.equal("before child worker after: in a file\n", out)
  end)

  it("cpu_count() is a positive integer", function()
    assert.equal("integer", math.type(mp.cpu_count()))
    assert.is_true(mp.cpu_count() >= 1)
  end)

  describe("at the parent's end", function()
    it("daemon children are killed when the parent exits; others are waited for", function()
      local dpid, done = H.tmpname(), H.tmpname()
      os.remove(done)
      local ok, out = run_script(([[
        local mp = require "multiprocessing"
        local d = mp.Process { daemon = true, target = function() mp.sleep(30) end }:start()
        local f = io.open(%q, "w") f:write(d.pid) f:close()
        mp.Process { target = function() mp.sleep(0.1) local g = io.open(%q, "w") g:write("done") g:close() end }:start()
        print("main exits")
      ]]):format(dpid, done))
      assert.is_true(ok, out)
      assert.matches("main exits", out)
      assert.equal("done", H.slurp(done))  -- the non-daemon child ran to the end
      local pid = tonumber(H.slurp(dpid))
      assert.is_true(H.eventually(function() return not H.alive(pid) end, 5))
    end)

    it("a Ctrl-C ends the wait for non-daemon children at exit", function()
      -- a stopped child would be waited for forever; the Ctrl-C must end that wait
      local marker = H.tmpname()
      os.remove(marker)
      local ok, out = run_script(PRELUDE .. ([[
        local me = core.getpid()
        local running = mp.Event()  -- (stopped before it runs, it could not yet arm its lifeline)
        local p = mp.Process { target = function() running:set() mp.sleep(60) end }:start()
        assert(running:wait(30))
        print("child", p.pid)
        local helper = core.fork()
        if helper == 0 then
          while not io.open(%q) do core.sleep(0.01) end
          while state(me) ~= "S" do core.sleep(0.01) end  -- asleep in the exit handler
          core.kill(p.pid, 19)
          core.kill(me, 2)
          core._exit(0)
        end
        io.open(%q, "w"):close()
        os.exit(0)
      ]]):format(marker, marker), 30)
      assert.is_true(ok, out)
      local pid = tonumber(out:match("child%s+(%d+)"))
      assert.is_true(H.eventually(function() return not H.alive(pid) end, 30), "the stopped child survived")
    end)

    it("a Process whose target calls os.exit waits for its own children, kills its daemons", function()
      local ok, out = run_script(PRELUDE .. [[
        local p = mp.Process { target = function()
          local d = mp.Process { daemon = true, target = function() mp.sleep(60) end }:start()
          local n = mp.Process { target = function() mp.sleep(0.1) io.stdout:write("grandchild done\n") end }:start()
          io.stdout:write("daemon ", d.pid, "\n")
          os.exit(3)
        end }:start()
        print("join", p:join(), p.exitcode)
      ]], 30)
      assert.is_true(ok, out)
      assert.matches("grandchild done", out)
      assert.matches("join\ttrue\t3", out)
      local pid = tonumber(out:match("daemon (%d+)"))
      assert.is_true(H.eventually(function() return not H.alive(pid) end, 30), "the daemon survived")
    end)

    it("children die with a parent killed by SIGKILL", function()
      local pidfile = H.tmpname()
      os.remove(pidfile)
      local parent = H.spawn(function()
        local d = mp.Process { daemon = true, target = function() mp.sleep(30) end }:start()
        local n = mp.Process { target = function() mp.sleep(30) end }:start()
        local f = io.open(pidfile .. ".tmp", "w") f:write(d.pid, " ", n.pid) f:close()
        os.rename(pidfile .. ".tmp", pidfile)
        mp.sleep(30)
      end)
      local s = H.eventually(function() return H.slurp(pidfile) end, 5)
      assert.is_string(s)
      core.kill(parent, 9)
      assert.equal(-9, core.waitpid(parent))
      for p in s:gmatch("%d+") do
        assert.is_true(H.eventually(function() return not H.alive(tonumber(p)) end, 5), "child " .. p .. " survived")
      end
    end)

    for _, sig in ipairs { 9, 15, 1 } do
      it(("all descendants die with a parent killed by %s, stopped ones too"):format(core.signame(sig)), function()
        local pidfile = H.tmpname()
        os.remove(pidfile)
        local parent = H.spawn(function()
          local c = mp.Process { target = function()
            local g = mp.Process { target = function() mp.sleep(60) end }:start()
            local f = io.open(pidfile .. ".gtmp", "w") f:write(g.pid) f:close()
            os.rename(pidfile .. ".gtmp", pidfile .. ".g")
            mp.sleep(60)
          end }:start()
          -- stopped once it runs (stopped before its first instruction, it could not
          -- yet have armed its lifeline: see docs/process.md)
          local running = mp.Event()
          local d = mp.Process { daemon = true, target = function() running:set() mp.sleep(60) end }:start()
          assert(running:wait(30))
          core.kill(d.pid, 19)
          while not H.slurp(pidfile .. ".g") do mp.sleep(0.01) end
          local f = io.open(pidfile .. ".tmp", "w")
          f:write(c.pid, " ", d.pid, " ", H.slurp(pidfile .. ".g")) f:close()
          os.rename(pidfile .. ".tmp", pidfile)
          mp.sleep(60)
        end)
        local s = H.eventually(function() return H.slurp(pidfile) end, 60)
        os.remove(pidfile .. ".g")
        assert.is_string(s)
        core.kill(parent, sig)
        assert.equal(-sig, core.waitpid(parent, 120))  -- (valgrind checks for leaks as it dies)
        local n = 0
        for p in s:gmatch("%d+") do
          n = n + 1
          assert.is_true(H.eventually(function() return not H.alive(tonumber(p)) end, 30), "descendant " .. p .. " survived")
        end
        assert.equal(3, n)
      end)
    end
  end)

  it("join names its own argument when the timeout is not a number", function()
    local p = mp.Process { target = function() end }:start()
    local err = H.error_of(p.join, p, 0 / 0)
    assert.matches("bad argument #1 to 'join' %(number expected, got NaN%)", err)
    assert.not_matches("process%.lua", err)
    assert.is_true(p:join(10))
  end)

  describe("current_process() and parent_process()", function()
    it("in a grandchild are the grandchild and the child, and a child lists none of its parent's children", function()
      local q = mp.Queue()
      local sibling = mp.Process { target = function() q:get(20) end }:start()  -- running at the next fork
      local p = mp.Process { name = "Kid", target = function()
        local mine = #mp.active_children()
        local g = mp.Process { name = "Grandkid", target = function()
          return mp.current_process().name, mp.current_process().pid, mp.parent_process().name, mp.parent_process().pid
        end }:start()
        g:join()
        local gname, gpid, pname, ppid = g:result()
        return mine, gname, gpid == g.pid, pname, ppid == mp.current_process().pid, mp.parent_process().name
      end }:start()
      assert.is_true(p:join(20))
      assert.same({ 0, "Grandkid", true, "Kid", true, "MainProcess" }, { p:result() })
      q:put("go")
      assert.is_true(sibling:join(20))
      q:close()
    end)

    it("in a pool worker of a child that never asked who it is, name that child as the parent", function()
      local p = mp.Process { name = "Kid", target = function()
        local pool = mp.Pool(1)  -- (the child has not called current_process() yet)
        local name, pid = pool:apply(function() return mp.parent_process().name, mp.parent_process().pid end)
        pool:terminate()
        return name, pid
      end }:start()
      assert.is_true(p:join(20))
      assert.same({ "Kid", p.pid }, { p:result() })
    end)

    it("in a fork the library did not make, of a child that never asked, are its Process's name and its own pid", function()
      local q = mp.Queue()
      local p = mp.Process { name = "Kid", target = function()
        local pid = core.fork(false)  -- (as a host's or another library's fork: no start)
        if pid == 0 then
          q:put { mp.current_process().name, mp.current_process().pid == core.getpid(), mp.parent_process().name }
          core._exit(0)
        end
        core.waitpid(pid, 20)
      end }:start()
      assert.same({ "Kid", true, "MainProcess" }, q:get(20))
      assert.is_true(p:join(20))
      q:close()
    end)

    it("tell whether they live, and a child can join its parent", function()
      assert.is_true(mp.current_process():is_alive())
      assert.is_nil(mp.parent_process())
      local q = mp.Queue()
      local p = mp.Process { target = function()
        local pp = mp.parent_process()
        q:put { pp:is_alive(), pp.pid, select(2, pp:join(0.1)), pcall(mp.current_process().join, mp.current_process()) }
      end }:start()
      local r = q:get(20)
      assert.is_true(r[1])
      assert.equal(core.getpid(), r[2])
      assert.equal("timeout", r[3])
      assert.is_false(r[4])
      assert.is_true(p:join(20))
      q:close()
    end)

    it("parent_process():is_alive() turns false and join returns once the parent is gone", function()
      local q = mp.Queue()
      local pid = H.spawn(function()
        local child = mp.Process { target = function()
          local pp = mp.parent_process()
          q:put("ready")
          local ok = pp:join(20)
          q:put { ok, pp:is_alive() }
        end }:start()
        q:get(20)   -- the grandchild is waiting: leave at once (it is re-parented)
        core._exit(0)
        return child
      end)
      assert.equal(0, core.waitpid(pid, 20))
      local r = q:get(20)
      assert.same({ true, false }, r)
      q:close()
    end)
  end)

  it("interrupt() raises interrupted! in the child, where it is", function()
    local q = mp.Queue()
    local p = mp.Process { target = function()
      q:put("ready")
      local ok, e = pcall(mp.sleep, 30)
      q:put(tostring(e))
    end }:start()
    assert.equal("ready", q:get(20))
    mp.sleep(0.2)
    p:interrupt()
    assert.matches("interrupted!", q:get(20))
    assert.is_true(p:join(20))
    q:close()
  end)

  it("active_children() lists pool workers too, until the pool is joined", function()
    local pool = mp.Pool(2)
    local names = {}
    for _, c in ipairs(mp.active_children()) do
      if c.name:find("^PoolWorker%-") then names[#names + 1] = c.name assert.is_true(c:is_alive()) end
    end
    table.sort(names)
    assert.same({ "PoolWorker-1", "PoolWorker-2" }, names)
    pool:close()
    pool:join()
    for _, c in ipairs(mp.active_children()) do assert.not_matches("^PoolWorker", c.name) end
  end)

  it("join() on a pool worker of active_children() returns as it exits, and the pool replaces it", function()
    -- It waits on the worker's exit (leaving its status to the pool), where it slept in 50 ms
    -- slices. Counted in a child: the sleeps of the join.
    local script = [[
      local core = require "multiprocessing.core"
      local sleep, naps, joining = core.sleep, 0, false
      core.sleep = function(...) if joining then naps = naps + 1 end return sleep(...) end
      local mp = require "multiprocessing"
      local pool <close> = mp.Pool(1)
      local worker
      for _, c in ipairs(mp.active_children()) do if c.name == "PoolWorker-1" then worker = c end end
      local r = pool:apply_async(function() local t = core.now() + 0.3 while core.now() < t do end core._exit(0) end)
      joining = true
      assert(worker:join(30))
      joining = false
      assert(not worker:is_alive())
      assert(pool:apply(function() return 7 end) == 7)  -- replaced
      print("naps " .. naps .. " " .. tostring(pcall(r.get, r, 30)))
    ]]
    assert.are.equal("naps 0 false\n", H.script_output(script))
  end)
end)

describe("Process kwargs", function()
  it("passes kwargs as one table after the positional arguments, nils in args kept", function()
    local p = mp.Process { target = function(a, b, kw) return a, b, kw.greeting, kw.n end,
      args = { "x", n = 2 }, kwargs = { greeting = "hi", n = 3 } }
    p:start()
    assert.is_true(p:join(30))
    assert.same({ "x", nil, "hi", 3 }, { p:result() })
  end)

  it("passes kwargs alone when there are no args, and nothing extra without kwargs", function()
    local p = mp.Process { target = function(...) return select("#", ...), (...).k end, kwargs = { k = "v" } }
    assert.same({ 1, "v" }, { p:run() })
    p = mp.Process { target = function(...) return select("#", ...) end, args = { 1 } }
    assert.same({ 1 }, { p:run() })
  end)

  it("refuses a kwargs that is not a table", function()
    H.raises("bad argument #1 to 'Process' (kwargs must be a table, got string)", mp.Process, { target = print, kwargs = "x" })
  end)
end)

describe("core.sigint", function()
  it("ignores Ctrl-C's signal (as a pool worker does), and \"default\" lets it end the process again", function()
    local pid = H.spawn(function()
      core.sigint("ignore")
      core.kill(core.getpid(), 2)
      core.sigint("default")
      core.kill(core.getpid(), 2)
      core.sleep(20)
    end)
    assert.equal(-2, core.waitpid(pid, 30))
    pid = H.spawn(function()
      core.sigint()  -- (ignore, by default)
      core.kill(core.getpid(), 2)
    end)
    assert.equal(0, core.waitpid(pid, 30))
  end)
end)
