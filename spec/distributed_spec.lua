-- Specs of the Pool on Redis Streams, against a real redis-server and real mp-worker processes.
-- MP_REDIS_URL names a server to use (.ci/run starts one); without it a server is started
-- here on a free loopback port, with persistence off. Every spec uses its own namespace.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local S = require "multiprocessing.stream"
local H = require "helpers"
local RS = require "redis_server"

local function sh(cmd) return os.execute(cmd) end

-- A task function with the real global table as its _ENV: functions written in a spec file
-- see busted's environment, a table the codec would send by value (with modules, such as
-- spec/helpers, that a worker on another machine does not have). The chunk gets `...`.
local function task(src, ...) return assert(load(src, "=task"))(...) end

local free_port = RS.free_port

-- a redis-server of our own; returns its URL, a function that stops it, its port and a function
-- that gives its pid
local function start_redis()
  local server = RS.start()
  return server.url, server.stop, server.port, server.pid
end

local have_redis = os.getenv("MP_REDIS_URL") or sh("command -v redis-server >/dev/null 2>&1")
local describe_redis = have_redis and describe or function(name) pending(name .. ": no redis-server (install it or set MP_REDIS_URL)") end

describe_redis("Pool on Redis Streams", function()
  local base, stop_redis
  local keyfile
  local workers = {}   -- pid files of the mp-workers this file started

  setup(function()
    math.randomseed(core.getpid() + math.floor(core.now() * 1000))
    base = os.getenv("MP_REDIS_URL")
    if not base then base, stop_redis = start_redis() end
    keyfile = os.tmpname()
    assert(sh("head -c 32 /dev/urandom > " .. keyfile .. " && chmod 600 " .. keyfile))
  end)

  teardown(function()
    os.remove(keyfile)
    if stop_redis then stop_redis() end
  end)

  local ns
  local function url() return base .. "?namespace=" .. ns end

  -- starts an mp-worker with n consumers (a process outside this one's children)
  local function start_worker(n, extra)
    local pidfile = os.tmpname()
    assert(sh(("%s %s bin/mp-worker %s --processes %d --key-file %s --quiet %s </dev/null >/dev/null 2>&1 & echo $! > %s")
      :format(H.ENV, H.LUA, H.quote(url()), n, keyfile, extra or "", pidfile)))
    local pid
    assert(H.eventually(function()
      local f = io.open(pidfile)
      pid = f and tonumber(f:read("a"))
      if f then f:close() end
      return pid
    end, 5))
    os.remove(pidfile)
    workers[#workers + 1] = pid
    return pid
  end

  local function redis()
    local u = S.parse_url(url(), "spec")
    return S.connect(u, "spec")
  end

  before_each(function()
    ns = ("t%d_%d"):format(core.getpid(), math.random(1, 1e9))
  end)

  after_each(function()
    for _, pid in ipairs(workers) do core.kill(pid, 15) end
    for _, pid in ipairs(workers) do H.eventually(function() return not H.alive(pid) end, 5) end
    workers = {}
  end)

  local function pool()
    return mp.Pool { backend = url(), key_file = keyfile }
  end

  it("gives the same results as a local pool, for every method", function()
    start_worker(2)
    local p <close> = pool()
    local xs = {}
    for i = 1, 1000 do xs[i] = i end
    local double = task "return function(x) return x * 2 end"
    local local_pool <close> = mp.Pool(2)
    assert.same(local_pool:map(double, xs), p:map(double, xs))
    assert.same({ 3, 7, n = 2 }, p:starmap(task "return function(a, b) return a + b end", { { 1, 2 }, { 3, 4 } }))
    assert.same({ 3, "two", nil, n = 3 }, table.pack(p:apply(task 'return function(a, b) return a + b, "two", nil end', { 1, 2 })))
    local got = {}
    for i, v in p:imap(double, xs, 7) do got[#got + 1] = i assert.equal(2 * i, v) end
    assert.equal(1000, #got)
    assert.equal(1000, got[1000])
    local sum = 0
    for _, v in p:imap_unordered(double, xs) do sum = sum + v end
    assert.equal(1001000, sum)
    local cb
    local r = p:map_async(double, { 1, 2 }, { callback = function(v) cb = v end })
    assert.same({ 2, 4, n = 2 }, r:get(30))
    assert.same({ 2, 4, n = 2 }, cb)
    local plus = task("local up = ... return function(x) return x + up end", 10)
    assert.same({ 11, n = 1 }, p:map(plus, { 1 }))   -- upvalues travel
  end)

  it("reads a lazy input and names the item and the worker of a failure", function()
    start_worker(2)
    local p <close> = pool()
    local i = 0
    local n = 0
    for _, v in p:imap(task "return function(x) return -x end", function() i = i + 1 if i <= 3000 then return i end end) do
      n = n + 1
      assert.equal(-n, v)
    end
    assert.equal(3000, n)
    local ok, e = pcall(p.map, p, task "return function(x) if x == 5 then error({ code = x }) end return x end", { 1, 2, 3, 4, 5, 6 })
    assert.is_false(ok)
    assert.equal(mp.TaskError, getmetatable(e))
    assert.same({ code = 5 }, e.value)
    assert.equal(5, e.item)
    assert.matches("^[^:]+:%d+$", e.pid)   -- host:pid
  end)

  it("refuses at submission what cannot cross machines, with the path to the value", function()
    local p <close> = pool()
    local q = mp.Queue()
    H.raises("cannot send a Queue to another machine (at args[2])", p.map, p, task "return function(x) return x end", { 1, q })
    local l = mp.Lock()
    H.raises("map: cannot send a Lock to another machine (at the function<upvalue l>)", p.map, p,
      function() local _ = l end, { 1 })
    q:close()
    -- nothing of the failed calls was left in the stream
    local r = redis()
    assert.equal(0, r:call("XLEN", S.keys(ns).tasks))
    r:close()
  end)

  it("runs a task again when the worker holding it is killed, and the caller sees each result once", function()
    start_worker(2)
    local p <close> = pool()
    local marks = H.tmpname()
    local r = p:map_async(task([[
      local marks = ...
      return function(x)
        local f = io.open(marks, "a")
        f:write(x, " ", require("multiprocessing.core").getpid(), "\n")
        f:close()
        if x == 3 then require("multiprocessing.core").sleep(1.5) end
        return x * 10
      end]], marks), { 1, 2, 3, 4, 5, 6 }, 1)
    -- find the consumer that runs item 3 and kill it mid-task
    local victim
    assert(H.eventually(function()
      for line in io.lines(marks) do
        local x, pid = line:match("^(%d+) (%d+)$")
        if x == "3" then victim = tonumber(pid) end
      end
      return victim
    end, 20))
    core.kill(victim, 9)
    local out = r:get(30)
    assert.same({ 10, 20, 30, 40, 50, 60, n = 6 }, out)
    local runs = 0
    for line in io.lines(marks) do if line:match("^3 ") then runs = runs + 1 end end
    assert.equal(2, runs)
  end)

  it("fails a task that kills every worker it lands on after 3 deliveries, naming the item", function()
    start_worker(2)
    local p <close> = pool()
    local ok, e = pcall(p.map, p, task [[return function(x)
      if x == 2 then require("multiprocessing.core")._exit(7) end
      return x
    end]], { 1, 2, 3 }, 1)
    assert.is_false(ok)
    assert.matches("item 2 was delivered 3 times", tostring(e))
    -- the pool and the workers go on
    assert.same({ 1, n = 1 }, p:map(task "return function(x) return x end", { 1 }))
  end)

  it("never runs a forged, tampered or wrongly keyed task", function()
    start_worker(1)
    local p <close> = pool()   -- a live client, so that only the signature stops the tasks
    local sentinel = H.tmpname()
    os.remove(sentinel)
    local keys = S.keys(ns)
    local r = redis()
    local other = core.random_bytes(32)
    -- the function that would make the sentinel, in the client's function hash: signed with
    -- another key (FID 999), and signed with the right key but for another FID (998)
    local fk = keys.fn(p._id)
    local evil = core.encode(task("local s = ... return function() io.open(s, 'w'):close() end", sentinel))
    assert(r:call("HSET", fk, "999", S.sign(other, fk .. ":999", evil) .. evil))
    assert(r:call("HSET", fk, "998", S.sign(p._key, fk .. ":1", evil) .. evil))
    local function msg(fid)
      return core.stream_frame({ c = p._id, k = 1000, j = 1, i = 1, n = 1, kind = "map", fid = fid }, { 1 })
    end
    local m = msg(999)
    local good = S.sign(p._key, keys.tasks, m)
    assert(r:call("XADD", keys.tasks, "*", "m", m))                                         -- unsigned
    assert(r:call("XADD", keys.tasks, "*", "m", m, "s", core.random_bytes(32)))             -- forged
    assert(r:call("XADD", keys.tasks, "*", "m", m .. "x", "s", good))                       -- tampered
    assert(r:call("XADD", keys.tasks, "*", "m", m, "s", S.sign(other, keys.tasks, m)))      -- wrong key
    assert(r:call("XADD", keys.tasks, "*", "m", m, "s", good))                              -- its function's key is wrong
    assert(r:call("XADD", keys.tasks, "*", "m", msg(998), "s", S.sign(p._key, keys.tasks, msg(998)))) -- its function moved
    assert(H.eventually(function() return tonumber(r:call("GET", keys.bad)) == 6 end, 20))
    -- a real call still runs after them (the worker lives), and the sentinel never appears
    assert.same({ 1, n = 1 }, p:map(task "return function(x) return x end", { 1 }))
    assert.is_nil(io.open(sentinel))
    r:close()
  end)

  it("kills an overdue task with timeout and says so", function()
    start_worker(1)
    local p <close> = pool()
    local e = H.error_of(p.map, p, task 'return function(x) require("multiprocessing.core").sleep(x) return x end', { 30 }, { timeout = 0.5 })
    assert.matches("task timed out after 0.5s %(item 1%)", e)
    assert.same({ 0, n = 1 }, p:map(task "return function(x) return x end", { 0 }))
  end)

  it("drops the tasks of a client that died once its lease lapses", function()
    start_worker(1)
    local marks = H.tmpname()
    local script = H.tmpname()
    local f = io.open(script, "w")
    f:write(([[
      local mp = require "multiprocessing"
      local p = mp.Pool { backend = %q, key_file = %q }
      p:map_async(function(x)
        local f = io.open(%q, "a") f:write(x, "\n") f:close()
        require("multiprocessing.core").sleep(0.25)
      end, (function() local t = {} for i = 1, 200 do t[i] = i end return t end)(), 1)
      require("multiprocessing.core").kill(require("multiprocessing.core").getpid(), 9)
    ]]):format(url(), keyfile, marks))
    f:close()
    sh(("%s %s %s >/dev/null 2>&1"):format(H.ENV, H.LUA, script))
    local function count()
      local n = 0
      local g = io.open(marks)
      if g then for _ in g:lines() do n = n + 1 end g:close() end
      return n
    end
    -- the lease lapses after 5 s; then the rest is dropped quickly and the stream empties
    local r = redis()
    assert(H.eventually(function() return r:call("XLEN", S.keys(ns).tasks) == 0 end, 40))
    assert.is_true(count() < 100, "the dead client's tasks kept running: " .. count())
    r:close()
  end)

  it("refuses to start without a good key", function()
    H.raises("key_file must be a path", mp.Pool, { backend = url() })
    local loose = H.tmpname()
    assert(sh("head -c 32 /dev/urandom > " .. loose .. " && chmod 644 " .. loose))
    H.raises("others may read or write it", mp.Pool, { backend = url(), key_file = loose })
    local short = H.tmpname()
    assert(sh("head -c 8 /dev/urandom > " .. short .. " && chmod 600 " .. short))
    H.raises("fewer than 32 bytes", mp.Pool, { backend = url(), key_file = short })
    H.raises("No such file", mp.Pool, { backend = url(), key_file = "/nonexistent/key" })
    H.raises("unknown option", mp.Pool, { backend = url(), key_file = keyfile, procesess = 2 })
    H.raises("backend must be redis://", mp.Pool, { backend = "http://x", key_file = keyfile })
  end)

  it("says clearly when Redis cannot be reached, or goes away during a call", function()
    local port = free_port()
    H.raises("cannot reach Redis at redis://127.0.0.1:" .. port, mp.Pool,
      { backend = "redis://127.0.0.1:" .. port, key_file = keyfile, timeout = 1 })
    if os.getenv("MP_REDIS_URL") and not sh("command -v redis-server >/dev/null 2>&1") then return end
    local own, stop = start_redis()
    local p = mp.Pool { backend = own, key_file = keyfile }
    local r = p:map_async(task "return function(x) return x end", { 1 })
    stop()
    local t0 = core.now()
    local e = H.error_of(r.get, r, 30)
    assert.matches("Redis at " .. own:gsub("%p", "%%%0"), e)
    assert.is_true(core.now() - t0 < 25)
    p:terminate()
  end)

  it("ends get(timeout) soon after its timeout behind a stopped Redis, and works again once it goes on", function()
    if os.getenv("MP_REDIS_URL") and not sh("command -v redis-server >/dev/null 2>&1") then return end
    local own, stop, _, pid_of = start_redis()
    local shared = base
    base = own   -- (this spec's workers and pool use the server it stops)
    local ok, err = pcall(function()
      start_worker(2)
      local p <close> = pool()
      local f = task "return function(x) return x * 3 end"
      assert.same({ 3, n = 1 }, p:map(f, { 1 }))
      local r = p:map_async(f, { 1, 2, 3 }, 1)
      local rpid = assert(pid_of(), "no redis-server pid")
      core.kill(rpid, 19)   -- SIGSTOP: connected, answering nothing
      local t0 = core.now()
      local e = H.error_of(r.get, r, 0.5)
      local took = core.now() - t0
      core.kill(rpid, 18)
      assert.matches("map_async: Redis at " .. own:gsub("%p", "%%%0") .. "[^:]*: timed out waiting for Redis", e)
      assert.is_true(took < 5, ("get(0.5) took %.1f s behind a stopped Redis"):format(took))
      -- a new connection for the next call: no error about a closed one
      assert.same({ 3, 6, n = 2 }, p:map(f, { 1, 2 }))
      p:close()
      p:join()
    end)
    base = shared
    stop()
    assert(ok, err)
  end)

  it("terminates: pending calls fail, its tasks and keys are gone", function()
    local p = pool()
    local r = p:map_async(task "return function(x) return x end", { 1, 2, 3 }, 1)   -- no worker: they stay queued
    local rr = redis()
    assert.equal(3, rr:call("XLEN", S.keys(ns).tasks))
    p:terminate()
    assert.equal(0, rr:call("XLEN", S.keys(ns).tasks))
    assert.equal(0, rr:call("EXISTS", S.keys(ns).client(p._id)))
    H.raises("the pool was terminated", r.get, r, 1)
    rr:close()
  end)
end)

-- Workers in a network namespace of their own, joined to this one by a veth pair: the
-- tasks and results cross a real interface (Redis listens on the veth address only). It
-- needs root, iproute2 (`ip netns`, veth) and redis-server; elsewhere it is pending, and
-- says why. The addresses are in 198.18.0.0/15 (RFC 2544, for tests), on links made here.
local function netns_blocker()
  if not sh("command -v redis-server >/dev/null 2>&1") then return "no redis-server" end
  if not sh("command -v ip >/dev/null 2>&1") then return "no ip command (install iproute2)" end
  local p = io.popen("id -u")
  local uid = p and p:read("l")
  if p then p:close() end
  if uid ~= "0" then return "not root (ip netns needs root)" end
  local probe = ("mpprobe%d"):format(core.getpid())
  if not sh(("ip netns add %s >/dev/null 2>&1"):format(probe)) then return "ip netns add is refused here" end
  sh(("ip netns del %s >/dev/null 2>&1"):format(probe))
  return nil
end
local blocker = netns_blocker()
local describe_netns = not blocker and describe
  or function(name) pending(name .. ": skipped, " .. blocker) end

describe_netns("Pool on Redis Streams across a network namespace", function()
  it("runs a map on workers in another network namespace, over a veth pair", function()
    local id = core.getpid() % 100000
    local nsname, host_if, ns_if = "mpns" .. id, "mpv" .. id .. "a", "mpv" .. id .. "b"
    local net = math.random(0, 511) * 4   -- a /30 of 198.18.0.0/15
    local a = ("198.%d.%d.%d"):format(18 + net // 65536, (net // 256) % 256, net % 256 + 1)
    local b = ("198.%d.%d.%d"):format(18 + net // 65536, (net // 256) % 256, net % 256 + 2)
    local keyfile = os.tmpname()
    local workerpid = os.tmpname()
    local worker, server
    local function cleanup()
      if worker then core.kill(worker, 15) H.eventually(function() return not H.alive(worker) end, 10) end
      if server then server.stop() end
      sh(("ip netns del %s >/dev/null 2>&1; ip link del %s >/dev/null 2>&1"):format(nsname, host_if))
      os.remove(keyfile) os.remove(workerpid)
    end
    finally(cleanup)
    local function run(cmd) assert(sh(cmd .. " >/dev/null 2>&1"), "failed: " .. cmd) end
    run(("ip netns add %s"):format(nsname))
    run(("ip link add %s type veth peer name %s"):format(host_if, ns_if))
    run(("ip link set %s netns %s"):format(ns_if, nsname))
    run(("ip addr add %s/30 dev %s && ip link set %s up"):format(a, host_if, host_if))
    run(("ip netns exec %s ip addr add %s/30 dev %s"):format(nsname, b, ns_if))
    run(("ip netns exec %s ip link set %s up && ip netns exec %s ip link set lo up"):format(nsname, ns_if, nsname))
    -- Redis on the veth address of this side only, with a password (not on loopback, it
    -- takes no connection without one), which the URL carries
    local password = core.random_bytes(12):gsub(".", function(c) return ("%02x"):format(c:byte()) end)
    server = RS.start { bind = a, password = password, patience = 20 }
    local port = server.port
    -- the other side reaches it across the link
    assert(H.eventually(function() return sh(("ip netns exec %s env %s %s -e %s >/dev/null 2>&1"):format(nsname, H.ENV, H.LUA,
      H.quote(("assert(require('multiprocessing.core').redis_connect('%s', %d, 0.5))"):format(a, port)))) end, 20),
      "the namespace cannot reach " .. a)
    assert(sh("head -c 32 /dev/urandom > " .. keyfile .. " && chmod 600 " .. keyfile))
    local url = ("redis://:%s@%s:%d?namespace=netns"):format(password, a, port)
    assert(sh(("ip netns exec %s env %s %s bin/mp-worker %s --processes 2 --key-file %s --quiet </dev/null >/dev/null 2>&1 & echo $! > %s")
      :format(nsname, H.ENV, H.LUA, H.quote(url), keyfile, workerpid)))
    assert(H.eventually(function()
      local f = io.open(workerpid)
      worker = f and tonumber(f:read("a"))
      if f then f:close() end
      return worker
    end, 5))
    local function bytes(dir)
      local f = assert(io.open(("/sys/class/net/%s/statistics/%s_bytes"):format(host_if, dir)))
      local n = tonumber(f:read("a"))
      f:close()
      return n
    end
    local rx0, tx0 = bytes("rx"), bytes("tx")
    local p <close> = mp.Pool { backend = url, key_file = keyfile, timeout = 20 }
    local xs = {}
    for i = 1, 2000 do xs[i] = i end
    -- each item also says which interfaces its worker sees: the namespace's link, not ours
    local out = p:map_async(task([[
      local ns_if = ...
      return function(x)
        local f = io.open("/proc/net/dev")
        local seen = f:read("a")
        f:close()
        return { x * 2, seen:find(ns_if, 1, true) ~= nil }
      end]], ns_if), xs, 50):get(60)
    assert.is_table(out, "the call did not finish")
    for i = 1, 2000 do assert.same({ 2 * i, true }, out[i]) end
    -- the tasks went out and the results came in through the veth pair
    assert.is_true(bytes("tx") - tx0 > 2000 * 3, "no task bytes crossed " .. host_if)
    assert.is_true(bytes("rx") - rx0 > 2000 * 3, "no result bytes crossed " .. host_if)
  end)
end)
