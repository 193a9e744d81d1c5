-- Specs of driving a Pool from a frame loop: pool:poll, pool:fileno, get(0)/wait(0)/ready()
-- as bounded steps, map_async fed lazily, respawn = "poll" (docs/pool.md). Work per call is
-- checked by counting results, never by timing.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- (locals: functions sent to workers must not reach busted's sandbox through globals)
local error, io, tostring = error, io, tostring

local function double(x) return x * 2 end

local PATIENCE = 30  -- seconds a frame loop may run before a spec gives up

-- calls frame() (a frame's work) until done() is true; false if PATIENCE passed first
local function frames(frame, done)
  local deadline = core.now() + PATIENCE
  while not done() do
    if core.now() > deadline then return false end
    frame()
  end
  return true
end

local function readable(fd, timeout) return #core.poll_fds({ fd }, timeout or 0) == 1 end

-- waits until every one of n apply_async tasks of the pool was counted by its worker
-- (a worker counts a message just after it sent its result)
local function all_sent(pool, n)
  return H.eventually(function()
    local items = 0
    for _, w in ipairs(pool:stats()) do items = items + w.items end
    return items >= n
  end, PATIENCE)
end

-- apply_async of a task that runs for a minute; returns once a worker has started it
local function start_sleeper(pool)
  local started = H.tmpname()
  os.remove(started)
  local a = pool:apply_async(function(path)
    io.open(path, "w"):close()
    core.sleep(60)
  end, { started })
  assert(H.eventually(function()
    local f = io.open(started)
    if f then f:close() end
    return f ~= nil
  end, PATIENCE), "the task did not start")
  return a
end

describe("Pool driven from a frame loop", function()
  H.leak_check(before_each, after_each)

  describe("pool:poll", function()
    it("collects every result of apply_async and map_async, with their callbacks", function()
      local pool <close> = mp.Pool(2)
      local got, mapped = {}, nil
      for i = 1, 40 do
        pool:apply_async(double, { i }, { callback = function(v) got[i] = v end })
      end
      local input = {}
      for i = 1, 3000 do input[i] = i end
      local ar = pool:map_async(double, input, { callback = function(r) mapped = r end })
      assert.is_true(frames(function() pool:poll(0.002) end, function()
        for i = 1, 40 do if not got[i] then return false end end
        return mapped ~= nil
      end))
      for i = 1, 40 do assert.equal(2 * i, got[i]) end
      assert.equal(3000, #mapped)
      for i = 1, 3000 do assert.equal(2 * i, mapped[i]) end
      assert.is_true(ar:ready())
    end)

    it("does bounded work per call: a few results, and says when more are waiting", function()
      local pool <close> = mp.Pool(2)
      local delivered = 0
      for i = 1, 500 do
        pool:apply_async(double, { i }, { callback = function() delivered = delivered + 1 end })
      end
      assert.truthy(all_sent(pool, 500))
      core.sleep(0.6)  -- (long enough for the health check to be due in the first call)
      local n, more = pool:poll(0)
      assert.is_true(n >= 1 and n <= 16, "results delivered by poll(0): " .. n)
      assert.equal(n, delivered)
      assert.is_true(more)
      local calls = 1
      repeat
        local before = delivered
        n, more = pool:poll(0)
        assert.equal(delivered - before, n)
        assert.is_true(n <= 16)
        calls = calls + 1
      until not more or calls > 1000
      assert.equal(500, delivered)
      assert.is_true(calls >= 500 / 16)
      assert.same({ 0, false }, { pool:poll(0) })
    end)

    it("counts and bounds the results it finishes without Lua (no callbacks: apply_async, submit)", function()
      local pool <close> = mp.Pool(2)
      local rs = {}
      for i = 1, 300 do rs[i] = pool:apply_async(double, { i }) end
      for i = 301, 500 do rs[i] = pool:submit(double, i) end
      assert.truthy(all_sent(pool, 500))
      core.sleep(0.6)
      local function finished()
        local k = 0
        for i = 1, 500 do if rawget(rs[i], "finished") then k = k + 1 end end
        return k
      end
      local total, calls, n, more = 0, 0, 0, true
      repeat
        n, more = pool:poll(0)
        assert.is_true(n <= 16, "results delivered by poll(0): " .. n)
        total, calls = total + n, calls + 1
        assert.equal(total, finished())
      until not more or calls > 1000
      assert.equal(500, total)
      assert.is_true(calls >= 500 / 16)
      for i = 1, 500 do assert.equal(2 * i, rs[i]:result(0)) end
      assert.same({ 0, false }, { pool:poll(0) })
    end)

    it("returns 0, false on a pool that is closed or terminated; raises on bad budgets", function()
      local pool = mp.Pool(1)
      H.raises("bad argument #1 to 'poll' (non-negative number of seconds expected, got string)", pool.poll, pool, "x")
      H.raises("bad argument #1 to 'poll' (non-negative number of seconds expected, got -1)", pool.poll, pool, -1)
      H.raises("non-negative number of seconds expected, got", pool.poll, pool, 0 / 0)
      pool:close()
      pool:join()
      assert.same({ 0, false }, { pool:poll() })
      pool:terminate()
      assert.same({ 0, false }, { pool:poll(0) })
      H.raises("cannot fileno: the pool is terminated", pool.fileno, pool)
    end)
  end)

  describe("AsyncResult in a frame", function()
    it("get(0) and wait(0) drive the pool: polling them alone collects the result", function()
      local pool <close> = mp.Pool(1)
      local a = pool:apply_async(double, { 21 })
      local v
      assert.is_true(frames(function() v = a:get(0) end, function() return v ~= nil end))
      assert.equal(42, v)
      local b = pool:apply_async(double, { 5 })
      assert.is_true(frames(function() end, function() return b:wait(0) == true end))
      assert.equal(10, b:get())
    end)

    it("ready() delivers a bounded number of results per call", function()
      local pool <close> = mp.Pool(2)
      local delivered = 0
      local ars = {}
      for i = 1, 500 do
        ars[i] = pool:apply_async(double, { i }, { callback = function() delivered = delivered + 1 end })
      end
      assert.truthy(all_sent(pool, 500))
      core.sleep(0.6)  -- (long enough for the health check to be due in the first call)
      local calls = 0
      while not ars[500]:ready() do
        calls = calls + 1
        assert.is_true(delivered <= 16 * calls, "delivered " .. delivered .. " in " .. calls .. " calls")
      end
      assert.is_true(calls >= 500 / 16 - 1)
      for i = 1, 500 do assert.equal(2 * i, ars[i]:get()) end
    end)
  end)

  describe("pool:fileno", function()
    it("is readable once a result waits, and poll clears it", function()
      local pool <close> = mp.Pool(2)
      local fd = pool:fileno()
      assert.equal(fd, pool:fileno())
      assert.is_true(frames(function() pool:poll(0.002) end, function() return not readable(fd) end))
      local a = pool:apply_async(double, { 4 })
      assert.is_true(readable(fd, PATIENCE))
      assert.is_true(frames(function() pool:poll(0.002) end, function() return a:wait(0) end))
      assert.equal(8, a:get())
      -- nothing in flight, nothing waiting: not readable until the next result
      assert.is_true(frames(function() pool:poll(0.002) end, function() return not readable(fd) end))
      local b = pool:apply_async(double, { 5 })
      assert.is_true(readable(fd, PATIENCE))
      pool:poll(0.002)
      assert.truthy(H.eventually(function() return readable(fd) or b:wait(0) end, PATIENCE))
    end)

    it("stays readable while poll leaves results for its next call", function()
      local pool <close> = mp.Pool(2)
      local fd = pool:fileno()
      for i = 1, 100 do pool:apply_async(double, { i }) end
      assert.truthy(all_sent(pool, 100))
      local n, more = pool:poll(0)
      assert.is_true(more and n < 100)
      assert.is_true(readable(fd))
    end)

    it("becomes readable when a worker is killed mid-task; poll fails the task and replaces it", function()
      local pool <close> = mp.Pool(1)
      local fd = pool:fileno()
      local a = start_sleeper(pool)
      local pid = pool:stats()[1].pid
      pool:poll(0)
      assert.truthy(H.eventually(function() pool:poll(0) return not readable(fd) end, PATIENCE))
      core.kill(pid, 9)
      assert.is_true(readable(fd, PATIENCE))
      assert.is_true(frames(function()
        core.poll_fds({ fd }, 1)
        pool:poll(0.002)
      end, function() return a:ready() end))
      H.raises("worker pid " .. pid .. " died (killed by SIGKILL) while running", a.get, a)
      local new = pool:stats()[1].pid
      assert.truthy(new and new ~= pid)
      assert.equal(6, pool:apply(double, { 3 }))
    end)

    it("lets mp.connection.wait wait on AsyncResults and Futures", function()
      local pool <close> = mp.Pool(2)
      local a = pool:apply_async(double, { 1 })
      local f = pool:submit(double, 2)
      local ready = mp.connection.wait({ a }, PATIENCE)
      assert.same({ a }, ready)
      assert.is_true(frames(function() mp.connection.wait({ a, f }, 1) end, function() return f:done() end))
      assert.equal(4, f:result())
      local slow = pool:apply_async(function() core.sleep(60) end)
      assert.same({}, mp.connection.wait({ slow }, 0.1))
      pool:terminate()
    end)

    -- the descriptors of anon_inode kinds (eventfd, eventpoll, timerfd) this process holds;
    -- loaded from source so that it has no upvalue (it runs in workers and children)
    local anon_fds = assert(load([[
      local core = require "multiprocessing.core"
      local n, p = 0, io.popen("ls -l /proc/" .. core.getpid() .. "/fd 2>/dev/null")
      for line in p:lines() do
        for _, kind in ipairs { ... } do
          if line:find("anon_inode:[" .. kind .. "]", 1, true) then n = n + 1 end
        end
      end
      p:close()
      return n
    ]]))

    for _, method in ipairs { "fork", "forkserver", "spawn" } do
      it(("is signalled by workers started by %s: they hold the pool's eventfd"):format(method), function()
        finally(function() require("multiprocessing.context")._forkserver_stop() end)
        local pool <close> = mp.Pool { processes = 1, start_method = method }
        local fd = pool:fileno()
        assert.equal(1, pool:apply(anon_fds, { "eventfd" }))
        local a = pool:apply_async(double, { 4 })
        assert.is_true(readable(fd, PATIENCE))
        assert.is_true(frames(function() pool:poll(0.002) end, function() return a:wait(0) end))
        assert.equal(8, a:get())
      end)
    end

    it("is not inherited by other children: an mp.Process closes the pools' descriptors", function()
      local pool <close> = mp.Pool(1)
      pool:fileno()
      assert.is_true(anon_fds("eventfd", "eventpoll", "timerfd") >= 3)
      local p = mp.Process { target = function() core._exit(anon_fds("eventfd", "eventpoll", "timerfd")) end }
      p:start()
      p:join(PATIENCE)
      assert.equal(0, p.exitcode)
    end)

    it("is closed with the pool", function()
      local fds = H.fd_count()
      local pool = mp.Pool(2)
      pool:fileno()
      assert.is_true(H.fd_count() > fds)
      pool:close()
      pool:join()
      assert.equal(fds, H.fd_count())
    end)
  end)

  describe("map_async", function()
    it("sends a bounded part of a big input at submission, and completes in order", function()
      local pool <close> = mp.Pool(2)
      local input = {}
      for i = 1, 50000 do
        local t = {}
        for k = 1, 20 do t[k] = i end
        input[i] = t
      end
      local ar = pool:map_async(function(t) return t[1] * 2 end, input)
      -- (internal: items sent so far) what fits in a step, not the whole input
      assert.is_true(ar.next_index - 1 < 50000, "items sent at submission: " .. ar.next_index - 1)
      assert.is_true(frames(function() pool:poll(0.002) end, function() return ar:ready() end))
      local r = ar:get()
      assert.equal(50000, #r)
      for i = 1, 50000 do
        if r[i] ~= 2 * i then error(("result %d is %s"):format(i, tostring(r[i]))) end
      end
    end)

    it("keeps its error semantics: the first failure fails the call, the pool goes on", function()
      local pool <close> = mp.Pool(2)
      local input = {}
      for i = 1, 20000 do input[i] = i end
      local failed
      local ar = pool:map_async(function(x)
        if x == 15000 then error("bad item") end
        return x
      end, input, { error_callback = function(e) failed = e end })
      assert.is_true(frames(function() pool:poll(0.002) end, function() return failed ~= nil end))
      assert.matches("map failed on item 15000", tostring(failed))
      H.raises("bad item", ar.get, ar)
      assert.equal(4, pool:apply(double, { 2 }))
    end)

    it("is delivered whole by close() and join()", function()
      local pool = mp.Pool(2)
      local input = {}
      for i = 1, 20000 do input[i] = i end
      local ar = pool:map_async(double, input)
      pool:close()
      pool:join()
      local r = ar:get()
      assert.equal(20000, #r)
      assert.equal(40000, r[20000])
    end)

    it("fails with the pool's reason when terminated before it was fed", function()
      local pool = mp.Pool(2)
      local input = {}
      for i = 1, 50000 do input[i] = i end
      local ar = pool:map_async(function(x) core.sleep(0.001) return x end, input)
      pool:terminate()
      assert.is_true(ar:ready())
      H.raises("the pool was terminated", ar.get, ar)
    end)
  end)

  describe("respawn = \"poll\"", function()
    it("replaces a dead worker in a later poll, not in the one that noticed", function()
      local pool <close> = mp.Pool { processes = 1, respawn = "poll" }
      local pid = pool:stats()[1].pid
      core.kill(pid, 9)
      local saw_gap = false
      assert.is_true(frames(function()
        pool:poll(0)
        if pool:stats()[1].pid == nil then saw_gap = true end
      end, function()
        local p = pool:stats()[1].pid
        return p ~= nil and p ~= pid
      end))
      assert.is_true(saw_gap)
      assert.equal(8, pool:apply(double, { 4 }))
    end)

    it("spawns at once when a blocking call needs a worker", function()
      local pool <close> = mp.Pool { processes = 1, respawn = "poll" }
      local a = pool:apply_async(function(x) core.sleep(60) return x end, { 1 })
      assert.truthy(H.eventually(function() a:ready() return pool:stats()[1].tasks == 0 and core.now() end, 1))
      core.sleep(0.2)
      core.kill(pool:stats()[1].pid, 9)
      H.raises("died", a.get, a, PATIENCE)
      assert.equal(6, pool:apply(double, { 3 }))
    end)

    it("lets join() finish the work of workers that died after close()", function()
      local pool = mp.Pool { processes = 1, respawn = "poll" }
      local a = start_sleeper(pool)
      local b = pool:apply_async(double, { 7 })
      pool:close()
      core.kill(pool:stats()[1].pid, 9)
      pool:join()
      H.raises("died", a.get, a)
      assert.equal(14, b:get())
    end)

    it("rejects other values", function()
      H.raises([[bad argument #1 to 'Pool' (respawn must be "now" or "poll", got "later")]], mp.Pool,
        { processes = 1, respawn = "later" })
    end)
  end)
end)
