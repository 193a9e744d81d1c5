-- host_safety_spec.lua: the library inside real C hosts (spec/hosts/host.c, built here with
-- cc against liblua5.4 and our core) that have threads, their own SIGCHLD handling, a console
-- thread, a guarded allocator and no lua.c SIGINT hook; plus Pool's start_timeout.
local H = require "helpers"
local mp = require "multiprocessing"
local core = require "multiprocessing.core"

local BUILD = os.getenv("MP_BUILD") or "build"
local PATIENCE = os.getenv("MP_VALGRIND") and 120 or 30

local host  -- the built host's path

-- Runs the host in `mode` on `script` (Lua source); returns its output and whether it said
-- "host: ok". A host still running after `patience` seconds is killed: a hang fails the spec.
local function run_host(mode, script, stdin)
  local src, out = H.tmpname(), H.tmpname()
  local f = assert(io.open(src, "w"))
  f:write(script)
  f:close()
  local cmd = ("%s timeout -k 5 %d %s %s %s > %s 2>&1 %s"):format(H.ENV, PATIENCE, host, mode, src, out,
    stdin or "< /dev/null")
  local ok, _, code = os.execute(cmd)
  local text = H.slurp(out) or ""
  assert(code ~= 124, ("the host (%s) hung:\n%s"):format(mode, text))
  return text, ok and text:find("host: ok", 1, true) ~= nil
end

local function read_pids(path)
  local pids = {}
  for p in (H.slurp(path) or ""):gmatch("%d+") do pids[#pids + 1] = tonumber(p) end
  return pids
end

describe("a C host embedding Lua", function()
  H.leak_check(before_each, after_each)

  setup(function()
    host = os.tmpname()
    local log = os.tmpname()
    -- linked by its absolute path, so that require finds the very same object loaded
    local core_so = BUILD:sub(1, 1) == "/" and BUILD or assert(os.getenv("PWD")) .. "/" .. BUILD
    local cmd = ("cc -O1 -g -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -Iinclude -I/usr/include/lua5.4"
      .. " -o %s spec/hosts/host.c %s -llua5.4 -lpthread > %s 2>&1"):format(host,
        H.quote(core_so .. "/multiprocessing/core.so"), log)
    local ok = os.execute(cmd)
    local msg = H.slurp(log)
    os.remove(log)
    assert(ok, "cannot build spec/hosts/host.c:\n" .. tostring(msg))
  end)
  teardown(function() os.remove(host) end)

  it("runs the library (the control)", function()
    local out, ok = run_host("plain", [[
      local mp = require "multiprocessing"
      local pool = mp.Pool(2)
      print("sum", pool:map(function(x) return x * 2 end, {1, 2, 3})[3])
      pool:close() pool:join()
    ]])
    assert(ok, out)
    assert.matches("sum\t6", out)
  end)

  -- a worker killed in the middle of a map, in a host that reaps children itself
  local KILLED = [[
    local mp = require "multiprocessing"
    local core = require "multiprocessing.core"
    local pool = mp.Pool(2)
    local ok, err = pcall(pool.map, pool, function(x)
      if x == 3 then core.kill(core.getpid(), 9) end
      return x
    end, {1, 2, 3, 4})
    print("map", ok, err)
    print("after", pool:apply(function(x) return x + 1 end, {1}))
    pool:close() pool:join()
  ]]

  for _, mode in ipairs { "sigign", "reaper" } do
    it(("notices a killed worker when the host %s"):format(
        mode == "sigign" and "ignores SIGCHLD" or "reaps with waitpid(-1)"), function()
      local out, ok = run_host(mode, KILLED)
      assert(ok, out)
      assert.matches("map\tfalse\tmap: worker pid %d+ died %(status unknown: the host reaped it%) while running item 3", out)
      assert.matches("after\t2", out)
    end)
  end

  -- each start method: fork, and the forkserver's and spawn's children, which have lifelines too
  for _, method in ipairs { "fork", "forkserver", "spawn" } do
    it(("keeps the workers and Processes (%s) started on a loader thread that then exits"):format(method), function()
      local out, ok = run_host("loader", ([[
        local mp = require "multiprocessing"
        local core = require "multiprocessing.core"
        local METHOD = %q
        local function pids() return pool:map(function() core.sleep(0.1) return core.getpid() end, {1, 2, 3, 4}) end
        local function set(t) local s = {} for _, p in ipairs(t) do s[p] = true end return s end
        function setup()  -- on the loader thread (the forkserver is started here too)
          pool = mp.Pool { processes = 2, start_method = METHOD }
          before = set(pids())
          proc = mp.Process { target = function() core.sleep(60) end, start_method = METHOD }
          proc:start()
        end
        function run()  -- on the main thread, the loader gone
          core.sleep(0.3)
          assert(proc:is_alive(), "the Process died with the loader thread")
          for p in pairs(set(pids())) do assert(before[p], "a worker died with the loader thread") end
          proc:kill() proc:join()
          pool:close() pool:join()
        end
      ]]):format(method))
      assert(ok, out)
    end)

    it(("has its workers (%s) die with it, while they run a long task, however it dies"):format(method), function()
      local pidfile = H.tmpname()
      local out = run_host("loader", ([[
        local mp = require "multiprocessing"
        local core = require "multiprocessing.core"
        function setup()  -- the pool is made on a loader thread
          pool = mp.Pool { processes = 2, start_method = %q }
          for i = 1, 2 do pool:apply_async(function() while true do end end) end
        end
        function run()
          local f = io.open(%q, "w")
          for _, c in ipairs(mp.active_children()) do f:write(c.pid, "\n") end
          f:close()
          core.sleep(0.5)  -- the tasks are running
          core.kill(core.getpid(), 9)
        end
      ]]):format(method, pidfile))
      local pids = read_pids(pidfile)
      assert.equal(2, #pids, out)
      assert(H.eventually(function()
        for _, p in ipairs(pids) do if H.alive(p) then return false end end
        return true
      end, 20), "a worker outlived its host")
    end)
  end

  -- the host with a thread sitting in fgets(stdin) on a fifo opened read-write: it never
  -- ends, and fgets waits forever
  local function run_console(script)
    local fifo = H.tmpname()
    os.remove(fifo)
    assert(os.execute("mkfifo " .. fifo))
    return run_host("console", script, "<> " .. fifo)
  end

  it("starts a pool while a console thread sits in fgets(stdin), flushing stdout once", function()
    local out, ok = run_console([[
      local mp = require "multiprocessing"
      io.write("before the pool; ")
      local pool = mp.Pool(2)
      print(pool:apply(function() io.write("from a worker; ") io.flush() return "done" end))
      pool:close() pool:join()
    ]])
    assert(ok, out)
    local _, n = out:gsub("before the pool; ", "")
    assert.equal(1, n, out)
    assert.matches("from a worker; done", out)
  end)

  it("a host with another thread is not single-threaded: its Pool() waits for its workers", function()
    local out, ok = run_console([[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local pool = mp.Pool(2)
      print(core.single_threaded(), pool._workers[1].ready, pool._workers[2].ready)
      pool:close() pool:join()
    ]])
    assert(ok, out)
    assert.matches("false\ttrue\ttrue", out)
  end)

  it("fails Pool() after start_timeout when a host lock was copied held by fork", function()
    local out, ok = run_host("allocmutex", [[
      local mp = require "multiprocessing"
      local ok, err = pcall(mp.Pool, { processes = 2, start_timeout = 1 })
      print(ok, err)
    ]])
    assert(ok, out)
    assert.matches("false\tPool: worker 1 %(pid %d+%) did not start within 1s %(start_timeout%)", out)
  end)

  it("lets a second host thread release a Lock its process holds, not an RLock", function()
    local out, ok = run_host("locks", [[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      function lock()  -- thread 1, its own lua_State
        L, R = mp.Lock(), mp.RLock()
        assert(L:acquire()) assert(R:acquire())
        shared = core.encode { L, R }
      end
      function release()  -- thread 2, another lua_State
        local t = core.decode(shared)
        local l, r = t[1], t[2]
        assert(l:locked())
        l:release()
        assert(not l:locked())
        local ok, err = pcall(r.release, r)
        assert(not ok and err:find("held by another thread of this process", 1, true), err)
        assert(not r:is_owned())
        assert(l:acquire(5))
      end
      function after()  -- thread 1 again
        assert(not L:acquire(0.1), "taken by thread 2")
        L:release()
        assert(L:acquire(5)) L:release()
        assert(R:is_owned()) R:release()
      end
    ]])
    assert(ok, out)
  end)

  it("ends blocking calls when the host calls lmp_interrupt() from another thread", function()
    local out, ok = run_host("interrupt", [[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local q = mp.Queue()
      started()
      print("get", pcall(q.get, q))
      local pool = mp.Pool(1)
      started()
      print("apply", pcall(pool.apply, pool, function() core.sleep(60) end))
      local l = mp.Lock()
      local p = mp.Process { target = function() l:acquire() core.sleep(60) end }
      p:start()
      core.sleep(0.3)
      started()
      print("acquire", pcall(l.acquire, l))
      p:kill() p:join()
      print("later", q:get(0.05))  -- a later call is not affected
    ]])
    assert(ok, out)
    assert.matches("get\tfalse\tinterrupted!", out)
    assert.matches("apply\tfalse\tinterrupted!", out)
    assert.matches("acquire\tfalse\tinterrupted!", out)
    assert.matches("later\tnil\ttimeout", out)
  end)
end)

describe("Pool start_timeout", function()
  H.leak_check(before_each, after_each)

  it("fails Pool() naming the worker whose initializer hangs", function()
    local err = H.raises("Pool: worker 1 (pid ", mp.Pool,
      { processes = 1, start_timeout = 0.5, initializer = function() core.sleep(60) end })
    assert.matches("did not start within 0.5s %(start_timeout%): its initializer may hang", err)
  end)

  it("kills a respawned worker that never gets ready, and breaks the pool after three", function()
    local started = mp.Value("i", 0)
    local pool = mp.Pool { processes = 1, start_timeout = 0.5, initializer = function()
      local lock = started:get_lock()
      lock:acquire()
      started.value = started.value + 1
      local n = started.value
      lock:release()
      if n > 1 then core.sleep(60) end  -- the first one starts, its replacements hang
    end }
    local pid = pool:apply(core.getpid)
    core.kill(pid, 9)
    local ok, err = pcall(pool.map, pool, function(x) return x end, { 1, 2 })
    assert.is_false(ok)
    assert.matches("did not start within 0.5s %(start_timeout%)", tostring(err))
    pool:terminate()
  end)

  it("Pool() without an initializer, in a process with no other thread, does not wait for its workers", function()
    assert.is_true(core.single_threaded())
    local pool <close> = mp.Pool(2)
    for i = 1, 2 do assert.is_false(pool._workers[i].ready) end  -- their start-up notes are still queued
    local r = pool:map(function(x) return 2 * x end, { 1, 2 }, 1)
    assert.equal(2, r[1]) assert.equal(4, r[2])
  end)

  it("refuses a start_timeout that is not a positive number", function()
    H.raises("start_timeout must be a positive number", mp.Pool, { processes = 1, start_timeout = 0 })
    H.raises("start_timeout must be a positive number", mp.Pool, { processes = 1, start_timeout = "1" })
  end)
end)
