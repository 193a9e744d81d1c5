-- Specs of message ownership (docs/arena.md, "Messages own their handles"): a shared object sent
-- through a queue is owned by the message until a get hands it to the decoded handle, and is
-- freed when its last handle and its last message are gone, whoever was killed on the way.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

local collectgarbage = collectgarbage

local settle = H.arena_settle
local function assert_back(s0, what) return H.assert_arena_back(s0, what, 10) end

describe("a shared object sent through a queue", function()
  -- each spec makes its carrier after taking s0 and closes it before the check: a queue's own
  -- chunks grow with use, and go with it
  local carrier
  before_each(function() carrier = nil end)
  after_each(function() if carrier then carrier:close() end end)

  it("is freed once its handles and its messages are gone: 2,000 queues sent and dropped", function()
    local s0 = settle()
    carrier = mp.Queue()
    for i = 1, 2000 do
      local q = mp.Queue()
      q:put(i)
      carrier:put { q, i }
      q:close()                   -- the message alone holds it now
      local m = carrier:get()
      assert.equal(i, m[1]:get())  -- and hands it to the decoded handle
      if i % 2 == 0 then m[1]:close() end  -- (the others are collected)
    end
    carrier:close()
    assert_back(s0, "arena use after 2,000 queues sent and dropped")
  end)

  it("of every shared kind is freed, each kind counted (Lock, Semaphore, Event, Barrier, Condition, Value, Array, queues)", function()
    local s0 = settle()
    carrier = mp.Queue()
    for _ = 1, 50 do
      local objs = { mp.Lock(), mp.RLock(), mp.Semaphore(2), mp.Event(), mp.Barrier(1), mp.Value("i", 7),
                     mp.Array("d", 4), mp.JoinableQueue(), mp.SimpleQueue(), mp.Condition(),
                     mp.Condition(mp.RLock()) }
      carrier:put(objs)
      for _, o in ipairs(objs) do o:close() end
      local got = carrier:get()
      assert.equal(7, got[6].value)
      got[4]:set()
      assert.is_true(got[4]:is_set())
      got[10]:acquire() got[10]:notify() got[10]:release()
    end
    carrier:close()
    assert_back(s0, "arena use after objects of every kind were sent and dropped")
  end)

  it("that stays in a queue which is closed is freed with that queue", function()
    local s0 = settle()
    carrier = mp.Queue()
    for i = 1, 200 do
      local q, inner = mp.Queue(), mp.Queue()
      inner:put(string.rep("x", i))
      q:put { inner, mp.Lock(), mp.Value("i", i) }
      q:put { inner }            -- twice in the queue: two references
      q:put(string.rep("big", 20000))
      inner:close()
      q:close()
    end
    carrier:close()
    assert_back(s0, "arena use after queues closed with handle-carrying messages in them")
  end)

  it("counts each of its handles when it appears twice in one message", function()
    local s0 = settle()
    carrier = mp.Queue()
    local q = mp.Queue()
    carrier:put { q, q, { q } }
    q:close()
    local m = carrier:get()
    m[1]:close() m[2]:close()
    m[3][1]:put("still here")          -- the third handle still holds it
    assert.equal("still here", m[3][1]:get())
    m = nil
    carrier:close()
    assert_back(s0, "arena use after a queue sent three times in one message")
  end)

  it("relayed: decoded, put again and dropped at every step, arrives whole", function()
    local s0 = settle()
    carrier = mp.Queue()
    local a, b, c = mp.Queue(), mp.Queue(), mp.Queue()
    local q = mp.Queue()
    q:put("payload")
    a:put { q }
    q:close()
    for _ = 1, 3 do
      local m = a:get()
      b:put(m)                  -- the same decoded object, sent again
      m[1]:close()
      m = b:get()
      c:put(m[1])
      m[1]:close()
      a:put { c:get() }
    end
    local last = a:get()[1]
    assert.equal("payload", last:get())
    last:close()
    a:close() b:close() c:close()
    carrier:close()
    assert_back(s0, "arena use after a relay")
  end)

  it("sent to a child, which uses it and exits, is freed", function()
    local s0 = settle()
    carrier = mp.Queue()
    local pids = {}
    for k = 1, 5 do
      local q = mp.Queue()
      carrier:put { q }
      q:close()
      pids[k] = H.spawn(function()
        local m = carrier:get(20)
        m[1]:put(k)
        m[1]:close()
      end)
    end
    for k = 1, 5 do assert.equal(0, core.waitpid(pids[k], 20)) end
    carrier:close()
    assert_back(s0, "arena use after queues sent to children")
  end)

  it("is not pinned by a put that timed out on a full queue", function()
    local s0 = settle()
    carrier = mp.Queue()
    local full = mp.Queue(1)
    full:put(0)
    local q = mp.Queue()
    assert.same({ nil, "full" }, { full:put({ q }, 0.01) })
    q:close()
    full:close()
    carrier:close()
    assert_back(s0, "arena use after a put that timed out")
  end)
end)

describe("a message carrying handles, when a process is killed", function()
  local carrier
  before_each(function() carrier = nil end)
  after_each(function() if carrier then carrier:close() end end)

  it("in a get, after decoding and before taking it: the message is offered again", function()
    local s0 = settle()
    carrier = mp.Queue()
    local q = mp.Queue()
    q:put("inside")
    carrier:put { q }
    q:close()
    local pid = H.spawn(function()
      core._queue_fault("get", 1)
      carrier:get(20)
    end)
    assert.equal(-9, core.waitpid(pid, 20))
    local m = carrier:get(20)                 -- offered again, its reference intact
    assert.is_table(m)
    assert.equal("inside", m[1]:get(5))
    m = nil
    carrier:close()
    assert_back(s0, "arena use after a reader was killed in a get")
  end)

  it("in a put, after counting a reference: the message is dropped and its references released", function()
    local s0 = settle()
    carrier = mp.Queue()
    local q, lock = mp.Queue(), mp.Lock()
    local pid = H.spawn(function()
      core._queue_fault("put", 1)
      carrier:put { q, lock }        -- (built first, counted under the queue's lock)
    end)
    assert.equal(-9, core.waitpid(pid, 20))
    assert.is_nil(carrier:get_nowait())
    pid = H.spawn(function()
      core._queue_fault("put", 1)
      carrier:put { q, lock, string.rep("b", 100000) }  -- (a big one: counted after its copy)
    end)
    assert.equal(-9, core.waitpid(pid, 20))
    assert.is_nil(carrier:get_nowait())  -- the half-put message is settled
    assert.equal(0, carrier:qsize())
    q:close() lock:close()
    carrier:close()
    assert_back(s0, "arena use after a writer was killed in a put")
  end)

  it("in a Pool task that carries a queue: the task's references are released", function()
    local s0 = settle()
    carrier = mp.Queue()
    local p = mp.Pool(1)
    local q = mp.Queue()
    -- (the worker closes its handle: one that a process still holds when it exits is not
    -- given back, docs/arena.md)
    assert.is_true(p:apply(function(qq) qq:put("from the worker") qq:close() return true end, { q }))
    assert.equal("from the worker", q:get(5))
    q:close()
    p:close() p:join()
    p = nil
    carrier:close()
    assert_back(s0, "arena use after a Pool task that carried a queue")
  end)
end)

-- A process that ends without running its finalizers (_exit, a kill) still gives back what it
-- held: its references are in its ledger in the arena (docs/arena.md, "Ledgers"), released when
-- it is found dead.
describe("a process that ends holding handles", function()
  local carrier
  before_each(function() carrier = nil end)
  after_each(function() if carrier then carrier:close() end end)

  it("received through a queue, and leaves with _exit: they are released", function()
    local s0 = settle()
    carrier = mp.Queue()
    for k = 1, 5 do
      local q, v = mp.Queue(), mp.Value("i", k)
      q:put(k)
      carrier:put { q, v, mp.JoinableQueue() }
      q:close() v:close()
      local pid = H.spawn(function()
        local m = carrier:get(20)
        assert(m[1]:get(20) == k and m[2].value == k)
        core._exit(0)  -- no finalizer runs: m's handles stay counted
      end)
      assert.equal(0, core.waitpid(pid, 20))
    end
    carrier:close()
    assert_back(s0, "arena use after children left with _exit holding handles")
  end)

  it("received, made and copied, and is SIGKILLed: they are released", function()
    local s0 = settle()
    carrier = mp.Queue()
    local ready = mp.Queue()
    local inherited = mp.Lock()  -- a copy made by the fork: counted by the parent only
    for _ = 1, 3 do
      local objs = { mp.Queue(), mp.Lock(), mp.Value("d", 1.5), mp.Array("i", 16), mp.Event(),
                     mp.Condition(), mp.Semaphore(1), mp.Barrier(2) }
      carrier:put(objs)
      for _, o in ipairs(objs) do o:close() end
      local pid = H.spawn(function()
        local m = carrier:get(20)
        local mine = { mp.Queue(), mp.RLock(), m[3]:get_lock(), m[1] }  -- made, and more handles
        mine[1]:put(m)          -- a queue of its own holding a message with the others
        inherited:acquire() inherited:release()
        ready:put(true)
        core.sleep(60)
        return mine
      end)
      assert.is_true(ready:get(20))
      core.kill(pid, 9)
      assert.equal(-9, core.waitpid(pid, 20))
    end
    inherited:close()
    ready:close()
    carrier:close()
    assert_back(s0, "arena use after children were killed holding handles")
  end)

  it("in a Process whose target captured a Lock, killed: nothing stays", function()
    local s0 = settle()
    local lock = mp.Lock()
    local started = mp.Event()
    local q = mp.Queue()
    local p = mp.Process { target = function()
      lock:acquire()
      local mine = { mp.Queue(), mp.Value("i", 1), q }
      q:put { mine[1], mine[2] }  -- sent: the message now holds them too
      started:set()
      core.sleep(60)
      return mine
    end }:start()
    assert.is_true(started:wait(20))
    p:kill()
    p:join(20)
    assert.equal(-9, p.exitcode)
    p:close()
    local m = q:get(5)
    assert.equal(1, m[2].value)
    m = nil
    -- the lock its holder died with: acquired again (and reported), then closed
    assert.is_true(lock:acquire(5))
    lock:release()
    lock:close() started:close() q:close()
    assert_back(s0, "arena use after a killed Process that held handles")
  end)

  -- a released object a live fork may use waits on the deferred list; the fork's uncounted
  -- copy of a handle can still send it (counted by the message, then by the receiver)
  it("whose object was released and deferred, sent on by a fork's copy, then SIGKILLed: it is freed", function()
    local s0 = settle()
    carrier = mp.Queue()
    local go, got = mp.Event(), mp.Event()
    local x = mp.Queue()
    x:put("x")
    local sender = H.spawn(function()  -- its copy of x is uncounted
      assert(go:wait(20))
      carrier:put(x)
      core.sleep(60)
    end)
    x:close()  -- the last counted handle: deferred while the sender lives
    assert.equal(s0.deferred + 1, settle().deferred)
    go:set()
    local holder = H.spawn(function()
      local xx = carrier:get(20)  -- counted by this process (its ledger)
      assert(xx:get(20) == "x")
      got:set()
      core.sleep(60)
      return xx
    end)
    assert.is_true(got:wait(20))
    core.kill(holder, 9)
    assert.equal(-9, core.waitpid(holder, 20))
    core.kill(sender, 9)
    assert.equal(-9, core.waitpid(sender, 20))
    go:close() got:close() carrier:close()
    assert_back(s0, "arena use after a process was killed holding a deferred object")
  end)

  it("as a Pool worker that keeps a task's queue: released once the pool is joined", function()
    local s0 = settle()
    local p = mp.Pool(2)
    local q = mp.Queue()
    -- each worker keeps the decoded handles in its copy of kept (with its cached function),
    -- never closed
    local kept = {}
    p:map(function(qq) kept[#kept + 1] = qq qq:put(1) return true end, { q, q, q, q })
    for _ = 1, 4 do assert.equal(1, q:get(5)) end
    q:close()
    p:close() p:join()
    p = nil
    assert_back(s0, "arena use after pool workers kept handles")
  end)
end)

-- An object released while a process started after it was made lives waits until that process
-- ends (it may hold an uncounted copy of a handle), unless that process is a fresh interpreter
-- (docs/arena.md, "Objects a fork may have copied").
describe("a shared object released while a process started after it lives", function()
  after_each(function() require("multiprocessing.context")._forkserver_stop() end)
  for _, method in ipairs { "spawn", "forkserver" } do
    it("is freed at once when that process was started with " .. method, function()
      local s0 = settle()
      local ready, stop = mp.Event(), mp.Event()
      local q = mp.Queue()
      q:put("x")
      local p = mp.Process { target = function(r, s) r:set() s:wait(60) end, args = { ready, stop },
                             start_method = method }:start()
      assert.is_true(ready:wait(20))
      q:close()
      assert.equal(s0.deferred, settle().deferred)
      stop:set()
      p:join(30)
      assert.equal(0, p.exitcode)
      p:close()
      ready:close() stop:close()
    end)
  end

  it("waits for it when it was forked", function()
    local s0 = settle()
    local ready, stop = mp.Event(), mp.Event()
    local q = mp.Queue()
    local p = mp.Process { target = function() ready:set() stop:wait(60) end, start_method = "fork" }:start()
    assert.is_true(ready:wait(20))
    q:close()
    assert.equal(s0.deferred + 1, settle().deferred)
    stop:set()
    p:join(30)
    p:close()
    assert.is_true(H.eventually(function() return settle().deferred == s0.deferred end, 20))
    ready:close() stop:close()
  end)
end)

describe("a shared object a Pool's task function captures", function()
  -- (issue 7: the function's blob pinned it for good)
  for _, ending in ipairs { "join", "terminate" } do
    it("is freed once the pool ends (" .. ending .. "), its handles closed", function()
      local s0 = settle()
      local p = mp.Pool(2)
      for i = 1, 6 do
        local q, v = mp.Queue(), mp.Value("i", i)
        local got = p:map(function(x) q:put(x) return v.value end, { 1, 2, 3 })
        assert.same({ i, i, i }, { got[1], got[2], got[3] })
        for _ = 1, 3 do q:get(5) end
        q:close() v:close()   -- the blob (and workers' cached functions) hold them now
      end
      local r = p:apply_async(function() return 1 end)
      assert.equal(1, r:get(20))
      if ending == "join" then p:close() p:join() else p:terminate() end
      p = nil
      assert_back(s0, "arena use after a pool whose task functions captured queues ended by " .. ending)
    end)
  end

  it("stays usable by the workers while its blob lives, after the maker closed its handle", function()
    local p = mp.Pool(1)
    local q = mp.Queue()
    local gate = mp.Event()
    local r = p:apply_async(function() gate:wait(20) q:put("late") return true end)
    local r2 = p:apply_async(function() q:put("second") return true end)  -- decoded later
    q:close()
    gate:set()
    assert.is_true(r:get(20))
    assert.is_true(r2:get(20))
    p:close() p:join()
    gate:close()
  end)
end)

describe("bytes that name a freed object", function()
  it("raise when decoded, and never reach the freed memory", function()
    local q = mp.Queue()
    local s = core._encode_unowned { q }  -- as the bytes of a message whose references are gone
    q:close()
    settle()
    H.raises("cannot decode: the shared object this handle names was freed", core.decode, s)
    local l = mp.Lock()
    local sl = core._encode_unowned(l)
    l:close()
    settle()
    H.raises("was freed", core.decode, sl)
    local v = mp.Value("i", 1)
    local sv = core._encode_unowned(v)
    v:close()
    settle()
    H.raises("was freed", core.decode, sv)
  end)

  it("from core.encode are pinned: they decode any number of times, after every handle is gone", function()
    local q = mp.Queue()
    local s = core.encode(q)
    q:close()
    settle()
    local a, b = core.decode(s), core.decode(s)
    a:put("one")
    assert.equal("one", b:get())
    a:close() b:close()
  end)
end)
