-- Specs of Queue, JoinableQueue and SimpleQueue.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

local error, select, tostring, string = error, select, tostring, string

describe("Queue", function()
  H.leak_check(before_each, after_each)

  it("passes values in FIFO order", function()
    local q = mp.Queue()
    for i = 1, 5 do assert.is_true(q:put(i)) end
    for i = 1, 5 do assert.equal(i, q:get()) end
    q:close()
  end)

  it("does not grow while it holds one message with handles at a time, each read after its put", function()
    -- a reader marks a big record taken without the lock: it stays until a tidy, which used to
    -- come only from a get that found the queue empty; a reader that always came after the
    -- writer left the chunk full of taken records, and a put grew a second chunk (chaos
    -- leak_killed_process_lock: 4,608 bytes more than at the start, now and then)
    local q, v = mp.Queue(), mp.Value("i", 7)
    q:put { v } q:get()  -- its first chunk
    local s0 = H.arena_settle()
    for _ = 1, 200 do
      q:put { v }
      assert.equal(7, q:get()[1].value)
    end
    local s = H.arena_settle()
    assert.are.same({ used = s0.used, blocks = s0.blocks }, { used = s.used, blocks = s.blocks })
    q:close() v:close()
  end)

  it("carries tables, strings, booleans, nested values", function()
    local q = mp.Queue()
    local v = { 1, "two", { three = 3.5 }, true, n = 4 }
    q:put(v)
    assert.are.same(v, q:get())
    q:close()
  end)

  it("small plain values keep their exact type and value across processes (the fast path)", function()
    assert.is_true(core._queue_fast())   -- the codec's format is the one queue.c writes for these
    local s255, s256 = ("\0x"):rep(127) .. "y", ("z"):rep(256)
    local vals = { false, true, 0, -1, 127, -128, 128, -129, 32767, -32768, 32768, 2^31 // 1, -(2^31 // 1) - 1,
                   1 << 40, math.maxinteger, math.mininteger, 0.0, -0.0, 3.0, 1.5, -2.5e300, 1/0, -1/0,
                   "", "a", s255, s256, "\255\0" }
    local q, back = mp.Queue(), mp.Queue()
    local p = mp.Process { target = function()
      for _ = 1, #vals + 2 do
        local v = q:get()
        back:put(v)
      end
    end }
    p:start()
    for i = 1, #vals do q:put(vals[i]) end
    q:put(nil)
    q:put(0/0)
    for i = 1, #vals do
      local v = back:get()
      assert.equal(math.type(vals[i]) or type(vals[i]), math.type(v) or type(v))
      assert.equal(vals[i], v)
      if vals[i] == 0 and math.type(vals[i]) == "float" then assert.equal(1 / vals[i], 1 / v) end  -- -0.0
    end
    local none, why = back:get(20)
    assert.is_nil(none); assert.is_nil(why)      -- a sent nil, not a timeout
    local nan = back:get(20)
    assert.is_true(nan ~= nan)
    assert.is_true(p:join(20))
    q:close(); back:close()
  end)

  it("qsize, empty, full and maxsize", function()
    local q = mp.Queue(2)
    assert.equal(2, q:maxsize())
    assert.equal(0, q:qsize())
    assert.is_true(q:empty())
    assert.is_false(q:full())
    q:put("a") q:put("b")
    assert.equal(2, q:qsize())
    assert.is_false(q:empty())
    assert.is_true(q:full())
    assert.equal(0, mp.Queue():maxsize())
    q:close()
  end)

  it("put_nowait and a bounded put with a timeout return nil, \"full\"", function()
    local q = mp.Queue(1)
    assert.is_true(q:put_nowait(1))
    assert.are.same({ nil, "full" }, { q:put_nowait(2) })
    assert.are.same({ nil, "full" }, { q:put(2, 0.05) })
    assert.are.same({ nil, "full" }, { q:put(2, true, 0.05) })
    assert.are.same({ nil, "full" }, { q:put(2, false) })
    assert.equal(1, q:get())
    assert.is_true(q:put(2, 0.05))
    q:close()
  end)

  it("a bounded put waits for room made by another process", function()
    local q = mp.Queue(1)
    q:put("first")
    local p = mp.Process { target = function() mp.sleep(0.1) return q:get() end }:start()
    assert.is_true(q:put("second", 5))
    p:join()
    assert.equal("first", p:result())
    assert.equal("second", q:get())
    q:close()
  end)

  it("get_nowait returns nil, \"empty\"; get(timeout) returns nil, \"timeout\"", function()
    local q = mp.Queue()
    assert.are.same({ nil, "empty" }, { q:get_nowait() })
    assert.are.same({ nil, "timeout" }, { q:get(0.02) })
    q:close()
  end)

  it("get(false) is get_nowait: nil, \"empty\"", function()
    local q = mp.Queue()
    assert.are.same({ nil, "empty" }, { q:get(false) })
    q:close()
  end)

  it("tells a sent nil from a timeout", function()
    local q = mp.Queue()
    q:put(nil)
    local n = select("#", q:get(1))
    assert.equal(1, n)                   -- a sent nil: one value
    local v, why = q:get(0.02)
    assert.is_nil(v)
    assert.equal("timeout", why)         -- a timeout: nil and a reason
    q:close()
  end)

  it("raises when used after close; close is idempotent", function()
    local q = mp.Queue()
    q:close()
    q:close()
    H.raises("attempt to use a closed Queue", q.put, q, 1)
    H.raises("attempt to use a closed Queue", q.get, q)
    H.raises("attempt to use a closed Queue", q.qsize, q)
    assert.matches("closed", tostring(q))
  end)

  it("checks its self: another object, even one given a queue's metatable, raises naming the call", function()
    local q, other = mp.Queue(), mp.SimpleQueue()
    H.raises("bad argument #1 to 'put' (Queue or JoinableQueue or SimpleQueue expected, got FILE*)",
             function() return q.put(io.stdout, 1) end)
    H.raises("bad argument #1 to 'get' (Queue or JoinableQueue or SimpleQueue expected, got no value)",
             function() return q.get() end)
    -- a userdata that is no queue, with a queue's metatable (debug.setmetatable): an error, never a crash
    local f = io.tmpfile()
    local fmt = debug.getmetatable(f)
    debug.setmetatable(f, debug.getmetatable(q))
    local ok, err = pcall(function() return f:put(1) end)
    local ok2, err2 = pcall(function() return f:get() end)
    local ok3, err3 = pcall(function() return f:qsize() end)
    -- close and __tostring take their self closed or not: the word is not read past the
    -- end of a smaller userdata (a FILE* is 16 bytes; make asan caught the read)
    local ok4, err4 = pcall(tostring, f)
    local ok5, err5 = pcall(function() return f:close() end)
    debug.setmetatable(f, fmt)
    f:close()
    assert.is_false(ok); assert.matches("'put'.*Queue expected, got another userdata with a queue's metatable", err)
    assert.is_false(ok2); assert.matches("'get'.*Queue expected, got another userdata with a queue's metatable", err2)
    assert.is_false(ok3); assert.matches("'qsize'.*Queue expected, got another userdata with a queue's metatable", err3)
    assert.is_false(ok4); assert.matches("Queue expected, got another userdata with a queue's metatable", err4)
    assert.is_false(ok5); assert.matches("'close'.*Queue expected, got another userdata with a queue's metatable", err5)
    -- the classes share their methods' checks; a handle decoded from a message is checked the same way
    assert.is_true(q:put(other))
    local back = q:get()
    assert.is_true(back:put(7)); assert.equal(7, back:get())
    assert.is_true(q.put(back, 8)); assert.equal(8, other:get())
    back:close(); other:close(); q:close()
  end)

  it("checks its self by more than a fixed word: a userdata of a queue's size whose bytes Lua chose raises", function()
    -- An Array's elements are checked into a userdata of n * 8 bytes (a C temporary that
    -- debug.getlocal reaches from the init table's __index): 6 of them are a queue handle's
    -- size, with a chosen offset at 0 and the old constant word at 16. Taken for a queue,
    -- a put wrote into the arena at that offset (or crashed).
    local q = mp.Queue()
    local tried, errs = 0, {}
    local init = setmetatable({}, { __len = function() return 6 end, __index = function(_, k)
      if k == 1 then return 0x41414140 elseif k == 3 then return 0x7175e0e0 end
      if k == 4 then
        for level = 2, 4 do
          if not debug.getinfo(level) then break end
          for i = 1, 10 do
            local name, v = debug.getlocal(level, i)
            if not name then break end
            if type(v) == "userdata" and not debug.getmetatable(v) then
              tried = tried + 1
              local ok, err = pcall(q.put, v, 1)
              errs[#errs + 1] = ok and "put returned " .. tostring(err) or tostring(err)
              local ok2, err2 = pcall(q.get, v, 0)
              errs[#errs + 1] = ok2 and "get returned " .. tostring(err2) or tostring(err2)
            end
          end
        end
      end
      return 0
    end })
    local a = mp.Array("q", init)
    assert.is_true(tried >= 1)
    for _, e in ipairs(errs) do assert.matches("Queue or JoinableQueue or SimpleQueue expected, got userdata", e, 1, true) end
    assert.is_true(q:empty())
    a = nil
    q:close()
  end)

  it("raises on values that cannot be sent, naming where", function()
    local q = mp.Queue()
    H.raises("cannot send a thread (coroutine) at value[2]", q.put, q, { 1, coroutine.create(print) })
    assert.is_true(q:empty())
    q:close()
  end)

  it("reaches a process started before the queue was created, through another queue", function()
    local inbox = mp.Queue()
    local p = mp.Process { target = function()
      local reply = inbox:get()
      reply:put("hello from the child")
    end }:start()
    local reply = mp.Queue()  -- made after the fork
    inbox:put(reply)
    assert.equal("hello from the child", reply:get(5))
    p:join()
    assert.equal(0, p.exitcode)
    inbox:close() reply:close()
  end)

  it("multi-producer multi-consumer: every item arrives exactly once", function()
    local q, out = mp.Queue(), mp.Queue()
    local N = 500
    local procs = {}
    for k = 1, 2 do  -- producers
      procs[#procs + 1] = mp.Process { target = function()
        for i = 1, N do q:put(k * 100000 + i) end
      end }:start()
    end
    for _ = 1, 2 do  -- consumers: stop at the sentinel
      procs[#procs + 1] = mp.Process { target = function()
        local n = 0
        while true do
          local v = q:get()
          if v == false then break end
          out:put(v)
          n = n + 1
        end
        return n
      end }:start()
    end
    procs[1]:join() procs[2]:join()
    q:put(false) q:put(false)
    procs[3]:join() procs[4]:join()
    assert.equal(2 * N, procs[3]:result() + procs[4]:result())
    local seen = {}
    for _ = 1, 2 * N do
      local v = assert(out:get(5))
      assert.is_nil(seen[v])
      seen[v] = true
    end
    for k = 1, 2 do for i = 1, N do assert(seen[k * 100000 + i], "missing item") end end
    assert.is_true(out:empty())
    q:close() out:close()
  end)

  it("wakes sleepers on both sides: ping-pong and a bounded queue, many handoffs, none lost", function()
    -- each get finds the queue empty and sleeps, each bounded put finds it full: a wake-up
    -- that went missing would leave a side asleep until its 20 s timeout
    local ping, pong, bounded = mp.Queue(), mp.Queue(), mp.Queue(1)
    local N = 2000
    local p = mp.Process { target = function()
      for i = 1, N do assert(pong:put(assert(ping:get(20)) + 1)) end
      for i = 1, N do assert(bounded:put(i, 20)) end
    end }:start()
    for i = 1, N do
      assert.is_true(ping:put(i))
      assert.equal(i + 1, pong:get(20))
    end
    for i = 1, N do
      if i % 500 == 0 then mp.sleep(0.01) end  -- the writer sleeps on a full queue
      assert.equal(i, bounded:get(20))
    end
    assert.is_true(p:join(20))
    assert.equal(0, p.exitcode)
    ping:close() pong:close() bounded:close()
  end)

  it("keeps the items of a producer that exited", function()
    local q = mp.Queue()
    local p = mp.Process { target = function() for i = 1, 1000 do q:put(i) end end }:start()
    p:join()
    assert.equal(0, p.exitcode)
    assert.equal(1000, q:qsize())
    for i = 1, 1000 do assert(q:get_nowait() == i) end
    q:close()
  end)

  it("carries 1 MiB messages", function()
    local q = mp.Queue()
    local big = string.rep("abcdefgh", 128 * 1024)
    local p = mp.Process { target = function() for _ = 1, 3 do q:put(big) end end }:start()
    for _ = 1, 3 do assert.equal(big, q:get(5)) end
    p:join()
    q:close()
  end)
end)

describe("JoinableQueue", function()
  H.leak_check(before_each, after_each)

  it("join waits until every item is task_done", function()
    local q = mp.JoinableQueue()
    for i = 1, 3 do q:put(i) end
    assert.are.same({ nil, "timeout" }, { q:join(0.02) })
    local p = mp.Process { target = function()
      for _ = 1, 3 do q:get() mp.sleep(0.01) q:task_done() end
    end }:start()
    assert.is_true(q:join(5))
    p:join()
    q:close()
  end)

  it("join returns at once when nothing is unfinished", function()
    local q = mp.JoinableQueue()
    assert.is_true(q:join(0))
    q:close()
  end)

  it("raises when task_done is called too many times", function()
    local q = mp.JoinableQueue()
    q:put(1)
    q:get()
    q:task_done()
    H.raises("task_done() called too many times", q.task_done, q)
    q:close()
  end)

  it("has the Queue methods", function()
    local q = mp.JoinableQueue(1)
    assert.is_true(q:put_nowait(1))
    assert.are.same({ nil, "full" }, { q:put_nowait(2) })
    assert.equal(1, q:qsize())
    q:close()
  end)
end)

describe("SimpleQueue", function()
  H.leak_check(before_each, after_each)

  it("has put, get and empty", function()
    local q = mp.SimpleQueue()
    assert.is_true(q:empty())
    q:put("x")
    assert.is_false(q:empty())
    assert.equal("x", q:get())
    q:close()
  end)

  it("has Python's short interface only", function()
    local q = mp.SimpleQueue()
    assert.is_nil(q.qsize)
    assert.is_nil(q.put_nowait)
    assert.is_nil(q.get_nowait)
    assert.is_nil(q.task_done)
    assert.is_nil(q.join)
    assert.is_nil(mp.Queue().task_done)
    q:close()
  end)

  it("works across processes", function()
    local q = mp.SimpleQueue()
    local p = mp.Process { target = function() q:put(core.getpid()) end }:start()
    assert.equal(p.pid, q:get(5))
    p:join()
    q:close()
  end)

  describe("shutdown", function()
    it("ends puts at once, and gets once the queue is drained, in every process", function()
      local q = mp.Queue()
      q:put(1) q:put(2)
      assert.is_false(q:is_shutdown())
      local got = mp.Queue()
      local waiter = H.spawn(function()   -- waits in get on an empty queue of its own
        local v, why = got:get(20)
        assert(v == nil and why == "shutdown", tostring(why))
      end)
      mp.sleep(0.2)
      q:shutdown()
      got:shutdown()
      assert.equal(0, core.waitpid(waiter, 20))
      assert.is_true(q:is_shutdown())
      assert.same({ nil, "shutdown" }, { q:put(3) })
      assert.equal(1, q:get(5))
      assert.equal(2, q:get(5))
      assert.same({ nil, "shutdown" }, { q:get() })   -- no timeout: it does not wait
      q:close() got:close()
    end)

    it("with immediate, gets end at once and join returns", function()
      local q = mp.JoinableQueue()
      q:put(1)
      q:shutdown(true)
      assert.same({ nil, "shutdown" }, { q:get() })
      assert.is_true(q:join(5))
      q:close()
    end)

    it("wakes a put that waits for room", function()
      local q = mp.Queue(1)
      q:put(1)
      local pid = H.spawn(function()
        local ok, why = q:put(2, 20)
        assert(ok == nil and why == "shutdown", tostring(why))
      end)
      mp.sleep(0.2)
      q:shutdown()
      assert.equal(0, core.waitpid(pid, 20))
      q:close()
    end)
  end)
end)
