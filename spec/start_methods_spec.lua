-- Specs of the start methods: Process and Pool under fork, forkserver and spawn,
-- contexts, set_start_method, set_executable, and what a forkserver's workers do not inherit.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local context = require "multiprocessing.context"
local H = require "helpers"

-- Functions sent to a spawned interpreter or a forkserver worker must not reach busted's
-- sandbox environment (it would be sent by value): these locals make them upvalues.
local _G, error, tostring, tonumber, type, pairs, ipairs, rawget =
      _G, error, tostring, tonumber, type, pairs, ipairs, rawget
local string, io, coroutine = string, io, coroutine

local function double(x) return x * 2 end

local function list(t)  -- (a Pool's results carry n)
  local out = {}
  for i = 1, #t do out[i] = t[i] end
  return out
end

local function worker_pids(pool)
  local pids = {}
  for i, w in ipairs(pool:stats()) do pids[i] = w.pid end
  return pids
end

-- the value of a field of /proc/<pid>/status, in kB for sizes
local function status(field, pid)
  local s = H.slurp(("/proc/%s/status"):format(pid or "self")) or ""
  return tonumber(s:match(field .. ":%s*(%d+)"))
end

describe("start methods", function()
  after_each(function()
    context._forkserver_stop()
    mp.set_start_method(nil, true)
  end)
  H.leak_check(before_each, after_each)

  for _, method in ipairs { "fork", "forkserver", "spawn" } do
    describe(method, function()
      it("Process: runs the target with its args, returns its values, exit code 0", function()
        local p = mp.Process { target = function(a, b) return a + b, "done" end, args = { 2, 3 }, start_method = method }
        p:start()
        assert.is_true(p:join(20))
        assert.equal(0, p.exitcode)
        local x, y = p:result()
        assert.equal(5, x)
        assert.equal("done", y)
      end)

      it("Process: a raising target fails its result with the child's traceback", function()
        local p = mp.Process { target = function() error({ code = 7 }) end, start_method = method }
        local restore = H.capture_stderr()
        p:start()
        p:join(20)
        restore()
        assert.equal(1, p.exitcode)
        local ok, e = pcall(p.result, p)
        assert.is_false(ok)
        assert.equal(7, e.value.code)
        assert.matches("start_methods_spec.lua", e.traceback)
      end)

      it("Process: Queue, Lock and Value handles reach the child; current and parent process", function()
        local q, lock, v = mp.Queue(), mp.Lock(), mp.Value("i", 1)
        local p = mp.Process { target = function(qq, l, vv)
          l:acquire()
          vv.value = vv.value + 41
          l:release()
          local me, parent = mp.current_process(), mp.parent_process()
          qq:put { me.name, me.pid, parent.pid }
        end, args = { q, lock, v }, name = "Child-" .. method, start_method = method }
        p:start()
        local got = q:get(20)
        assert.is_true(p:join(20))
        assert.equal(42, v.value)
        assert.same({ "Child-" .. method, p.pid, core.getpid() }, got)
        assert.is_true(lock:acquire(false))
        lock:release()
      end)

      it("Pool: map, imap, starmap, apply_async, an error keeps the pool usable", function()
        local pool = mp.Pool { processes = 2, start_method = method }
        assert.same({ 2, 4, 6, 8, 10 }, list(pool:map(double, { 1, 2, 3, 4, 5 })))
        local seen = {}
        for _, x in pool:imap(double, { 1, 2, 3 }) do seen[#seen + 1] = x end
        assert.same({ 2, 4, 6 }, seen)
        assert.same({ 3, 7 }, list(pool:starmap(function(a, b) return a + b end, { { 1, 2 }, { 3, 4 } })))
        assert.equal(12, pool:apply_async(double, { 6 }):get(20))
        local ok, err = pcall(pool.map, pool, function(x) if x == 2 then error("bad two") end return x end, { 1, 2, 3 })
        assert.is_false(ok)
        assert.matches("map failed on item 2", tostring(err))
        assert.matches("bad two", tostring(err))
        assert.same({ 1, 2 }, list(pool:map(function(x) return x end, { 1, 2 })))
        pool:close()
        pool:join()
      end)

      it("Pool: a killed worker fails its call and is replaced; terminate leaves no zombie", function()
        local pool = mp.Pool { processes = 2, start_method = method }
        local path = H.tmpname()
        local ar = pool:apply_async(function(p)
          local f = io.open(p, "w") f:write(core.getpid()) f:close()
          while true do end
        end, { path })
        local busy = H.eventually(function() return tonumber(H.slurp(path) or "") end, 20)
        assert.is_truthy(busy)
        core.kill(busy, 9)
        local ok, err = pcall(ar.get, ar, 20)
        assert.is_false(ok)
        assert.matches(("worker pid %d died %%(killed by SIGKILL%%)"):format(busy), tostring(err))
        assert.same({ 1, 2, 3 }, list(pool:map(function(x) return x end, { 1, 2, 3 })))
        local now = worker_pids(pool)
        assert.is_true(now[1] ~= busy and now[2] ~= busy)
        pool:terminate()
        for _, pid in ipairs(worker_pids(pool)) do assert.is_false(H.alive(pid)) end
      end)

      it("Pool: an initializer runs in each worker; one that raises fails Pool()", function()
        local pool = mp.Pool { processes = 2, start_method = method,
          initializer = function(t) _G.INIT = t.n end, initargs = { { n = 9 } } }
        assert.same({ 9, 9 }, list(pool:map(function() return _G.INIT end, { 1, 2 })))
        pool:close()
        pool:join()
        local restore = H.capture_stderr()
        local ok, err = pcall(mp.Pool, { processes = 1, start_method = method, initializer = function() error("no init") end })
        restore()
        assert.is_false(ok)
        assert.matches("no init", tostring(err))
      end)

      it("a context's Process and Pool use its method", function()
        local ctx = mp.get_context(method)
        assert.equal(method, ctx.get_start_method())
        assert.equal(ctx, mp.get_context(method))
        local q = ctx.Queue()
        local p = ctx.Process { target = function(qq) qq:put(core.getppid()) end, args = { q } }
        p:start()
        assert.equal(core.getpid(), q:get(20))
        p:join(20)
        local pool = ctx.Pool(1)
        assert.same({ 2 }, list(pool:map(double, { 1 })))
        pool:terminate()
      end)
    end)
  end

  describe("spawn", function()
    it("sends a function whose upvalues include a table and a queue", function()
      local t, q = { base = 100, list = { 1, 2 } }, mp.Queue()
      local function task(k) q:put(t.base + t.list[k]) return k end
      local p = mp.Process { target = task, args = { 2 }, start_method = "spawn" }
      p:start()
      assert.equal(102, q:get(20))
      p:join(20)
      assert.equal(2, p:result())
    end)

    it("runs a fresh interpreter: the parent's globals are not there", function()
      _G.SPAWN_SPEC_GLOBAL = "parent's"
      local pool = mp.Pool { processes = 1, start_method = "spawn" }
      local got = pool:apply(function() return rawget(_G, "SPAWN_SPEC_GLOBAL") or "none" end)
      pool:terminate()
      _G.SPAWN_SPEC_GLOBAL = nil
      assert.equal("none", got)
    end)

    it("fails clearly when the executable cannot be found", function()
      mp.set_executable("/nonexistent/lua-interpreter")
      local ok, err = pcall(function()
        local p = mp.Process { target = function() end, start_method = "spawn" }
        p:start()
      end)
      mp.set_executable(mp.get_executable() == "/nonexistent/lua-interpreter" and "lua5.4" or mp.get_executable())
      context._state.exe = nil
      assert.is_false(ok)
      assert.matches("cannot start process: cannot spawn: executable '/nonexistent/lua%-interpreter' not found", err)
    end)
  end)

  describe("forkserver", function()
    it("its workers do not inherit the heap grown after it started", function()
      mp.forkserver_start()
      local function worker_rss()
        local pool = mp.Pool { processes = 1, start_method = "forkserver" }
        local kb = pool:apply(function()
          local s = io.open("/proc/self/status"):read("a")
          return tonumber(s:match("VmRSS:%s*(%d+)"))
        end)
        pool:terminate()
        return kb
      end
      local before = worker_rss()
      local big = string.rep("x", 256 * 1024 * 1024)  -- touched pages: in RSS, and in any fork's
      assert.is_true(status("VmRSS") > 256 * 1024)
      local after = worker_rss()
      assert.is_true(after - before < 64 * 1024, ("a forkserver worker's RSS went from %d to %d kB"):format(before, after))
      big = nil
    end)

    it("is one server per process, a daemon child reaped at stop; it restarts after a kill", function()
      local pid = mp.forkserver_start()
      assert.equal(pid, mp.forkserver_start())
      assert.equal(pid, core._forkserver_pid())
      core.kill(pid, 9)
      core.waitpid(pid, 20)
      local pool = mp.Pool { processes = 1, start_method = "forkserver" }
      assert.same({ 4 }, list(pool:map(double, { 2 })))
      pool:terminate()
      assert.are_not.equal(pid, core._forkserver_pid())
    end)

    it("dies with the process that started it, and so do its workers (SIGKILL)", function()
      local src, pids = H.tmpname(), H.tmpname()
      local f = io.open(src, "w")
      f:write(([[
        local mp = require "multiprocessing"
        local server = mp.forkserver_start()
        local pool = mp.Pool { processes = 1, start_method = "forkserver" }
        local f = io.open(%q, "w")
        f:write(server, " ", pool:stats()[1].pid, "\n")
        f:close()
        mp.sleep(60)
      ]]):format(pids))
      f:close()
      assert(os.execute(("%s %s %s > /dev/null 2>&1 & echo $! > %s.starter"):format(H.ENV, H.LUA, src, pids)))
      local line = H.eventually(function() return (H.slurp(pids) or ""):match("\n") and H.slurp(pids) end, 20)
      assert.is_truthy(line)
      local server, worker = line:match("(%d+) (%d+)")
      local starter = tonumber(H.slurp(pids .. ".starter"))
      os.remove(pids .. ".starter")
      assert.is_true(H.alive(server) and H.alive(worker))
      core.kill(starter, 9)
      assert.is_true(H.eventually(function() return not H.alive(server) and not H.alive(worker) end, 20))
    end)

    it("workers are children of the requester, not of the server", function()
      local server = mp.forkserver_start()
      local pool = mp.Pool { processes = 2, start_method = "forkserver" }
      for _, pid in ipairs(worker_pids(pool)) do
        local ppid = tonumber((H.slurp("/proc/" .. pid .. "/stat") or ""):match("^%d+ %b() %a (%d+)"))
        assert.equal(core.getpid(), ppid)
      end
      assert.same({}, H.children(server))
      pool:terminate()
    end)
  end)

  describe("start messages: their references, and the forkserver's socket", function()
    -- arena bytes in use, once garbage and dead processes' ledgers are released
    local function settled_use(want)
      local used
      H.eventually(function()
        collectgarbage() collectgarbage() core._arena_sweep()
        used = core.arena_stats().used
        return used == want
      end, 20)
      return used
    end

    -- one Process started and joined (what a first start makes once is then made)
    local function warm(method)
      local p = mp.Process { target = function() end, start_method = method }
      p:start()
      assert.is_true(p:join(20))
      p:close()
    end

    -- a spawn executable: a shell script running lua5.4 with `pre` (a -e chunk) first
    local function wrapper(pre)
      local exe = H.tmpname()
      local f = assert(io.open(exe, "w"))
      f:write("#!/bin/sh\n", pre, "\n")
      f:close()
      assert(os.execute("chmod +x " .. exe))
      return exe
    end

    for _, method in ipairs { "spawn", "forkserver" } do
      it(method .. ": Processes and a Pool leave the arena's use where it was", function()
        local function once()
          local q = mp.Queue()
          local p = mp.Process { target = function(x) q:put(x) end, args = { 1 }, start_method = method }
          p:start()
          assert.equal(1, q:get(20))
          assert.is_true(p:join(20))
          p:close()
        end
        once()  -- (a forkserver, the codec's tables: made once)
        local before = settled_use(-1)
        for _ = 1, 3 do once() end
        local pool = mp.Pool { processes = 2, start_method = method }
        assert.same({ 2, 4 }, list(pool:map(double, { 1, 2 })))
        pool:close()
        pool:join()
        pool = nil
        assert.equal(before, settled_use(before))
      end)
    end

    it("spawn: a child that cannot map the arena fails start(); the message's references go", function()
      local exe = wrapper([[exec lua5.4 -e "require('multiprocessing.core').Queue():close()" "$@" 2>/dev/null]])
      warm("spawn")
      local q = mp.Queue()
      local before = settled_use(-1)
      mp.set_executable(exe)
      local p = mp.Process { target = function() q:put(1) end, start_method = "spawn" }
      local ok, err = pcall(p.start, p)
      context._state.exe = nil
      assert.is_false(ok)
      assert.matches("cannot map the parent's shared memory: the arena is already mapped in this process", err, 1, true)
      p = nil
      assert.equal(before, settled_use(before))
    end)

    it("spawn: a child that took its message and dies before decoding it releases its references", function()
      local exe = wrapper([[exec lua5.4 -e "package.preload.multiprocessing = function() error('no layer') end" "$@" 2>/dev/null]])
      warm("spawn")
      local q = mp.Queue()
      local before = settled_use(-1)
      mp.set_executable(exe)
      local p = mp.Process { target = function() q:put(1) end, start_method = "spawn" }
      p:start()
      context._state.exe = nil
      assert.is_true(p:join(20))
      assert.equal(1, p.exitcode)
      p:close()
      p = nil
      assert.equal(before, settled_use(before))
    end)

    it("forkserver: Ctrl-C while the server does not answer fails that start only; the next one is right", function()
      local out = H.interrupted([[
        local core = require "multiprocessing.core"
        local server = mp.forkserver_start()
        local q = mp.Queue()
        local w = mp.Process { target = function() q:put(0) end, start_method = "forkserver" }
        w:start() q:get(20) w:join(20) w:close() w = nil  -- (what a first start and put make once)
        local function used()
          for _ = 1, 200 do
            collectgarbage() collectgarbage() core._arena_sweep()
            if core.arena_stats().used == BEFORE then break end
            core.sleep(0.05)
          end
          return core.arena_stats().used
        end
        BEFORE = -1
        BEFORE = used()
        core.kill(server, 19)  -- stopped: it reads no request
        local p1 = mp.Process { target = function() q:put("first") end, start_method = "forkserver" }
        started()
        print("p1", pcall(p1.start, p1))
        core.kill(server, 18)
        local p2 = mp.Process { target = function() q:put(core.getpid()) end, start_method = "forkserver" }
        p2:start()
        print("got", q:get(20) == p2.pid, q:get(1))
        print("join", p2:join(20), p2.exitcode)
        p1 = nil
        p2:close() p2 = nil
        print("leaked", used() - BEFORE)
      ]])
      assert.matches("p1\tfalse\t[^\n]*interrupted", out)
      assert.matches("got\ttrue\tnil\ttimeout", out)
      assert.matches("join\ttrue\t0", out)
      assert.matches("leaked\t0\n", out)
    end)

    it("spawn: Ctrl-C while the new interpreter has not taken its message fails start; nothing left", function()
      local exe = wrapper([[sleep 30; exec lua5.4 "$@"]])
      local out = H.interrupted(([[
        local core = require "multiprocessing.core"
        local q = mp.Queue()
        local function used(want)
          for _ = 1, 200 do
            collectgarbage() collectgarbage() core._arena_sweep()
            if core.arena_stats().used == want then break end
            core.sleep(0.05)
          end
          return core.arena_stats().used
        end
        local w = mp.Process { target = function() end, start_method = "spawn" }
        w:start() w:join(20) w:close() w = nil  -- (what a first start makes once)
        local before = used(-1)
        mp.set_executable(%q)
        local p = mp.Process { target = function() q:put(1) end, start_method = "spawn" }
        started()
        print("start", pcall(p.start, p))
        p = nil
        print("leaked", used(before) - before, #mp.active_children())
      ]]):format(exe))
      assert.matches("start\tfalse\t[^\n]*interrupted", out)
      assert.matches("leaked\t0\t0\n", out)
    end)

    it("a child forked with fork does not keep its parent's forkserver alive", function()
      local server = mp.forkserver_start()
      local p = mp.Process { target = function() core.sleep(30) end, start_method = "fork" }
      p:start()
      context._forkserver_stop()
      assert.is_false(H.alive(server))
      p:kill()
      p:join(20)
    end)
  end)

  describe("in a C host with a thread and a big heap (spec/c/forkserver_host.c)", function()
    local SCRIPT = [[
      local mp = require "multiprocessing"
      local method = os.getenv("METHOD")
      local pool = mp.Pool { processes = 2, start_method = method }
      local rss = pool:map(function()
        local s = io.open("/proc/self/status"):read("a")
        return tonumber(s:match("VmRSS:%s*(%d+)"))
      end, { 1, 2 })
      pool:close() pool:join()
      local p = mp.Process { target = function() end, start_method = method }
      p:start() p:join()
      print("result", rss[1], rss[2], p.exitcode)
    ]]
    -- builds the host against this checkout's core and runs SCRIPT in it: its output
    local function run_host(method)
      local exe, src, out = H.tmpname(), H.tmpname(), H.tmpname()
      local build = os.getenv("MP_BUILD") or "build"
      assert(os.execute(("env -u LD_PRELOAD cc -o %s spec/c/forkserver_host.c -Iinclude -I/usr/include/lua5.4 -llua5.4 -lpthread "
        .. "./%s/multiprocessing/core.so"):format(exe, build)))
      local f = io.open(src, "w") f:write(SCRIPT) f:close()
      os.execute(("%s METHOD=%s timeout 60 %s %s > %s 2>&1"):format(H.ENV, method, exe, src, out))
      return H.slurp(out)
    end

    it("lmp_forkserver_start before the heap grew: workers have neither the heap nor a warning", function()
      local out = run_host("forkserver")
      local a, b, code = out:match("result%s+(%d+)%s+(%d+)%s+(%d+)")
      assert.is_truthy(a, out)
      assert.is_true(tonumber(a) < 128 * 1024 and tonumber(b) < 128 * 1024, out)
      assert.equal("0", code)
      assert.is_nil(out:find("threads", 1, true), out)
    end)

    it("a thread holding stdout's lock does not stop the forkserver from starting (spec/c/stdout_host.c)", function()
      local exe, src, out = H.tmpname(), H.tmpname(), H.tmpname()
      assert(os.execute(("env -u LD_PRELOAD cc -o %s spec/c/stdout_host.c -I/usr/include/lua5.4 -llua5.4 -lpthread")
        :format(exe)))
      local f = io.open(src, "w")
      f:write([[
        local mp = require "multiprocessing"
        local pool = mp.Pool { processes = 1, start_method = "forkserver" }
        io.stderr:write("result ", pool:apply(function() return 6 * 7 end), "\n")
        pool:close() pool:join()
      ]])
      f:close()
      os.execute(("%s timeout 60 %s %s > /dev/null 2> %s"):format(H.ENV, exe, src, out))
      assert.matches("result 42", H.slurp(out))
    end)

    it("fork in a process with threads warns once, pointing at forkserver", function()
      local out = run_host("fork")
      assert.matches("result%s+%d+%s+%d+%s+0", out)
      local _, n = out:gsub("multiprocessing: this process has 2 threads: fork copies only the calling one", "")
      assert.equal(1, n, out)
      assert.matches('Use the "forkserver" start method', out)
    end)
  end)

  describe("choosing", function()
    it("set_start_method sets the default once (force to change); get_start_method", function()
      assert.is_nil(mp.get_start_method(true))
      assert.equal("fork", mp.get_start_method())
      assert.has_error(function() mp.set_start_method("spawn") end,
        "set_start_method: the start method is already set ('fork'); pass force = true to change it")
      mp.set_start_method("spawn", true)
      assert.equal("spawn", mp.get_start_method())
      local q = mp.Queue()
      local p = mp.Process { target = function(qq) qq:put(rawget(_G, "describe") == nil) end, args = { q } }
      p:start()
      assert.is_true(q:get(20))  -- a fresh interpreter: no busted there
      p:join(20)
    end)

    it("refuses unknown methods, naming the call", function()
      assert.has_error(function() mp.set_start_method("thread") end,
        "bad argument #1 to 'set_start_method' (start method must be 'fork', 'forkserver' or 'spawn', got 'thread')")
      assert.has_error(function() mp.get_context(3) end,
        "bad argument #1 to 'get_context' (start method must be 'fork', 'forkserver' or 'spawn', got number)")
      assert.has_error(function() mp.Pool { start_method = "vfork" } end,
        "bad argument #1 to 'Pool' (start method must be 'fork', 'forkserver' or 'spawn', got 'vfork')")
      assert.has_error(function() mp.Process { target = print, start_method = true } end,
        "bad argument #1 to 'Process' (start method must be 'fork', 'forkserver' or 'spawn', got boolean)")
      assert.has_error(function() mp.set_executable(nil) end,
        "bad argument #1 to 'set_executable' (string expected, got nil)")
    end)

    it("a function that cannot be sent fails start with the codec's reason", function()
      local co = coroutine.create(function() end)
      local p = mp.Process { target = function() return co end, start_method = "spawn" }
      assert.has_error(function() p:start() end)
      local ok, err = pcall(p.start, p)
      assert.is_false(ok)
      assert.matches("cannot send a thread", tostring(err))
    end)
  end)
end)
