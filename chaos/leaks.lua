-- chaos/leaks.lua: leak loops (issue 7, "Shared memory that is never given back"): make and drop
-- many objects, some calls failing, some processes killed; descriptors, mappings, zombies and
-- arena use must come back to their start, RSS within a generous bound.
local L = require "chaos.lib"
local mp = require "multiprocessing"
local core = L.core

local function square(x) return x * x end

-- measures around body(n): a warm-up round first, so that what is made once (the arena, caches)
-- is in the starting figures
local function loop(count, body, rss_mb)
  return function()
    local n = L.rounds(count)
    body(1)
    local before = L.resources()
    local t0 = L.now()
    for i = 1, n do
      body(i)
      if i % 100 == 0 then L.fig("done", i) L.emit() end
    end
    L.fig("done", n)
    L.fig("secs", ("%.1f"):format(L.now() - t0))
    L.check_resources(before, L.resources(), rss_mb)
  end
end

local MB = 1 << 20

return {
  { name = "leak_pools", timeout = 120, run = loop(300, function()
    local p = mp.Pool(2)
    p:map(square, { 1, 2, 3, 4 })
    p:close()
    p:join()
  end) },

  { name = "leak_queues", timeout = 60, run = loop(2000, function(i)
    local q = (i % 3 == 0 and mp.JoinableQueue or i % 3 == 1 and mp.Queue or mp.SimpleQueue)()
    q:put({ i, "x" })
    if i % 5 == 0 then q:put(string.rep("q", 40000)) end  -- a block of its own
    q:get()
    q:close()
  end) },

  { name = "leak_pipes", timeout = 60, run = loop(2000, function(i)
    local a, b = mp.Pipe(i % 2 == 0)
    if i % 2 == 0 then b:send({ i }) a:recv() else b:send_bytes("x") a:recv_bytes() end
    a:close() b:close()
  end) },

  { name = "leak_locks", timeout = 60, run = loop(2000, function(i)
    local l, r, s, e, c, b = mp.Lock(), mp.RLock(), mp.Semaphore(2), mp.Event(), mp.Condition(), mp.Barrier(1)
    local v, a = mp.Value("i", i), mp.Array("d", 8)
    l:acquire() l:release() r:acquire() r:release() s:acquire() s:release() e:set()
    c:acquire() c:notify() c:release() b:wait() v.value = 1 a[1] = 2
    for _, o in ipairs { l, r, s, e, c, b, v, a } do o:close() end
  end) },

  -- one pool, many calls of every kind, some failing, some abandoned: arena use back to its
  -- start while the pool lives, and again once it is joined
  { name = "leak_pool_calls", timeout = 120, run = function()
    local start = L.resources()
    local p = mp.Pool(2)
    local xs = {}
    for i = 1, 20 do xs[i] = i end
    local kinds = {
      function() p:map(square, xs) end,
      function() p:map(square, xs, 1) end,
      function() for _ in p:imap(square, xs) do end end,
      function() for _ in p:imap_unordered(square, xs, 3) do end end,
      function() for i in p:imap(square, xs, 1) do if i == 3 then break end end end,
      function() p:starmap(function(a, b) return a + b end, { { 1, 2 }, { 3, 4 } }) end,
      function() p:apply(square, { 3 }) end,
      function() p:apply_async(square, { 3 }):get() end,
      function() p:map_async(square, xs):get() end,
      function() pcall(p.map, p, function(x) if x == 7 then error("chaos") end return x end, xs) end,
      function() pcall(p.apply, p, error, { "chaos" }) end,
      function() p:map(function(x) return string.rep("r", 50000) end, { 1, 2 }) end,
    }
    for k = 1, #kinds do kinds[k]() end  -- warm up every kind once
    local before = L.resources()
    local n = L.rounds(4000)
    for i = 1, n do
      kinds[i % #kinds + 1]()
      if i % 500 == 0 then L.fig("calls", i) L.emit() end
    end
    L.fig("calls", n)
    local during = L.resources()
    L.fig("arena_live_pool", ("%d->%d"):format(before.arena, during.arena))
    p:close()
    p:join()
    L.check(during.arena == before.arena, "a live pool's arena use grew from %d to %d bytes over %d calls",
      before.arena, during.arena, n)
    L.check_resources(start, L.resources())
  end },

  { name = "leak_processes", timeout = 120, run = loop(500, function(i)
    local pr = mp.Process { target = function(x) return x + 1 end, args = { i } }:start()
    pr:join()
    if i % 2 == 0 then pr:result() end
    pr:close()
  end) },

  -- a Queue made before a fork, freed after it
  { name = "leak_made_before_fork", timeout = 60, run = loop(200, function(i)
    local q = mp.Queue()
    q:put(i)
    local pr = mp.Process { target = function() q:put(i + 1) end }:start()
    pr:join()
    pr:close()
    q:get() q:get()
    q:close()
  end) },

  -- a put killed in the middle of a 64 MiB message, a get killed likewise: nothing stays
  { name = "leak_killed_big_messages", timeout = 90, run = function()
    local big = string.rep("k", 64 * MB)
    local before = L.resources()
    L.fig("kills", 0)
    for round = 1, L.rounds(6) do
      local q = mp.Queue()
      local putter = round % 2 == 1
      if not putter then q:put(big) end
      local pr = mp.Process { target = function()
        if putter then q:put(big) else q:get() end
        core.sleep(60)
      end }:start()
      L.sleep(L.uniform(0, 0.04))
      pr:kill()
      L.add("kills")
      L.check(pr:join(L.BOUND), "a killed process was not reaped")
      pr:close()
      while q:get_nowait() ~= nil do end
      q:close()
      L.emit()
    end
    L.check_resources(before, L.resources())
  end },

  -- Managers shut down, or dropped to the collector, some with their server killed
  { name = "leak_managers", timeout = 90, run = loop(40, function(i)
    local m = mp.Manager()
    local d, l = m:dict(), m:list()
    d.x = i
    l:append(d.x)
    if i % 4 == 0 then m._proc:kill() end
    if i % 2 == 0 then m:shutdown() end
  end) },

  -- Processes that end without running a finalizer while holding handles they received (issue 7:
  -- their references were never released; now their ledgers are, docs/arena.md "Ledgers")
  { name = "leak_exit_with_handles", timeout = 90, run = loop(150, function(i)
      local carrier = mp.Queue()  -- (one per round: a queue's chunks grow with use)
      local q, v = mp.Queue(), mp.Value("i", i)
      q:put(i)
      carrier:put { q, v }
      q:close() v:close()
      local pr = mp.Process { target = function()
        local m = carrier:get(20)
        assert(m[1]:get(20) == i and m[2].value == i)
        if i % 3 == 0 then m[1]:put { m[2] } end  -- one of them also in a message it leaves behind
        core._exit(0)
      end }:start()
      L.check(pr:join(L.BOUND * 5), "a process that left with _exit was not reaped")
      L.check(pr.exitcode == 0, "the process ended with %s", tostring(pr.exitcode))
      pr:close()
      carrier:close()
    end) },

  -- children SIGKILLed at random instants (in their get, while decoding, while holding) with
  -- handles received, made and copied by the fork
  { name = "leak_killed_holding_handles", timeout = 120, run = function()
    local inherited = mp.RLock()
    L.fig("kills", 0)
    loop(120, function(i)
      local carrier = mp.Queue()
      local objs = { mp.Queue(), mp.Lock(), mp.Value("d", i), mp.Array("i", 32), mp.Event(), mp.Condition(),
                     mp.Semaphore(1), mp.JoinableQueue() }
      objs[1]:put(string.rep("m", i % 2 == 0 and 40000 or 10))
      carrier:put(objs)
      for _, o in ipairs(objs) do o:close() end
      local pr = mp.Process { target = function()
        local m = carrier:get(20)
        local mine = { mp.Queue(), mp.Lock(), m[3]:get_lock(), m }
        mine[1]:put { m[1], m[5] }
        inherited:acquire() inherited:release()
        core.sleep(60)
        return mine
      end }:start()
      L.sleep(L.uniform(0, 0.03))
      pr:kill()
      L.add("kills")
      L.check(pr:join(L.BOUND * 5), "a killed process was not reaped")
      pr:close()
      local m = carrier:get_nowait()  -- killed before its get took it: the message is still there
      if m then L.add("untaken") end
      m = nil
      carrier:close()
    end)()
    inherited:close()
  end },

  -- a Process whose target captured a Lock (a copy of its parent's handle) and holds it, and
  -- handles it made and sent, SIGKILLed: the lock is taken again (its owner died), nothing stays
  { name = "leak_killed_process_lock", timeout = 90, run = function()
    local lock, q = mp.Lock(), mp.Queue()
    loop(100, function(i)
      local pr = mp.Process { target = function()
        lock:acquire()
        local mine = { mp.Queue(), mp.Value("i", i) }
        q:put(mine)
        core.sleep(60)
        return mine
      end }:start()
      local m = q:get(20)
      L.check(m and m[2].value == i, "round %d: the target's message did not come", i)
      L.sleep(L.uniform(0, 0.01))
      pr:kill()
      L.check(pr:join(L.BOUND * 5), "a killed process was not reaped")
      pr:close()
      L.check(lock:acquire(L.BOUND), "round %d: the lock its killed holder held was not taken again", i)
      lock:release()
      m = nil
    end)()
    lock:close() q:close()
  end },

  -- pools whose task functions capture queues and values (issue 7: the function's blob pinned
  -- them for good), ended by join or terminate, some workers killed while they hold them
  { name = "leak_pool_captured", timeout = 120, run = loop(60, function(i)
    local p = mp.Pool(2)
    local q, v = mp.Queue(), mp.Value("i", i)
    local got = p:map(function(x) q:put(x) return v.value + x end, { 1, 2, 3, 4 })
    assert(got[4] == i + 4)
    for _ = 1, 4 do q:get(5) end
    local w = i % 3 == 0 and p._workers[1]
    if w then core.kill(w.pid, 9) end  -- it holds the function it decoded, and q and v in it
    q:close() v:close()
    if i % 2 == 0 then p:close() p:join() else p:terminate() end
  end) },

  -- Processes that use a Manager: each call sends a reply queue of its own with its request
  -- (owned by the message, then by the server's handle), closed by both ends
  { name = "leak_manager_users", timeout = 90, run = function()
    local m <close> = mp.Manager()
    local d = m:dict()
    loop(40, function(i)
      -- a read waits for its answer, so it makes a reply queue (d[i] = i is sent without one)
      local pr = mp.Process { target = function() d[i] = i assert(d[i] == i) end }:start()
      pr:join()
      pr:close()
    end)()
  end },

  -- queues, locks and values sent through another queue and dropped (issue 7: sent objects
  -- were pinned for good); half of them closed, half left to the collector
  { name = "leak_sent_objects", timeout = 60, run = function()
    local carrier = mp.Queue()  -- (one message at a time: it keeps its first chunk, see q_room)
    loop(2000, function(i)
      local q = mp.Queue()
      q:put(i)
      carrier:put { q, i % 7 == 0 and mp.Lock() or nil, i % 11 == 0 and mp.Value("i", i) or nil }
      q:close()
      local m = carrier:get()
      assert(m[1]:get() == i)
      if i % 2 == 0 then m[1]:close() end
    end)()
    carrier:close()
  end },

  -- queues closed (or collected) with messages in them that carry handles to other objects
  { name = "leak_closed_with_handles", timeout = 60, run = loop(2000, function(i)
    local q, inner = mp.Queue(), mp.Queue()
    inner:put(i)
    q:put { inner, mp.Event() }
    if i % 3 == 0 then q:put { inner, string.rep("h", 40000) } end
    inner:close()
    if i % 2 == 0 then q:close() end
  end) },

  -- a receiver SIGKILLed in its get, after decoding a message that carries a queue: the
  -- message is offered again and the next get takes it; a writer SIGKILLed while its message
  -- counted its references: the message is dropped and they are released
  { name = "leak_killed_handle_messages", timeout = 120, run = loop(100, function(i)
    local carrier, q = mp.Queue(), mp.Queue()
    local getter = i % 2 == 0
    if getter then carrier:put { q } end
    local pr = mp.Process { target = function()
      core._queue_fault(getter and "get" or "put", 1)
      if getter then carrier:get() else carrier:put { q, q } end
    end }:start()
    L.check(pr:join(L.BOUND), "a killed process was not reaped")
    L.check(pr.exitcode == -9, "the process was not killed in its %s", getter and "get" or "put")
    pr:close()
    local m = carrier:get_nowait()
    L.check((m ~= nil) == getter, getter and "the message was not offered again" or "a half-put message was taken")
    if m then m[1]:close() end
    q:close()
    carrier:close()
  end) },

  -- a producer or a consumer SIGKILLed at a random step of linking a new chunk or dropping a
  -- drained one (core._queue_fault "chunk"), among messages of random sizes: the queue goes on,
  -- every message put whole is got once, and the arena comes back
  { name = "leak_killed_chunk_links", timeout = 120, run = loop(100, function(i)
    local q = mp.Queue()
    local size = math.random(1, 3000)
    local n = math.random(20, 120)
    local producer = i % 2 == 0
    if not producer then for k = 1, n do q:put(k .. ("c"):rep(size)) end end
    local pr = mp.Process { target = function()
      core._queue_fault("chunk", math.random(1, 6))
      if producer then
        for k = 1, n do q:put(k .. ("c"):rep(size)) end
      else
        for _ = 1, n do q:get(10) end
      end
    end }:start()
    L.check(pr:join(L.BOUND), "a killed process was not reaped")
    pr:close()
    local last = 0
    while true do
      local v = q:get_nowait()
      if v == nil then break end
      local k = tonumber(v:match("^%d+"))
      L.check(k and k > last, "message %s out of order or again after %d", tostring(k), last)
      last = k
    end
    q:put("after")
    L.check(q:get(L.BOUND) == "after", "the queue does not go on after a kill in a chunk's link")
    q:close()
  end) },
}
