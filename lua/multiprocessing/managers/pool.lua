-- managers/pool.lua: the manager's Pool (Python's manager.Pool()): an mp.Pool living in the server process.
--
-- The server never blocks on it: a call starts the pool's asynchronous version (apply_async,
-- map_async, starmap_async; imap and imap_unordered as one apply_async per item) and keeps
-- its AsyncResult as an object of the manager; a get, a wait, the next items of an imap or a
-- join that cannot be answered yet becomes a pending waiter (S.pending), which the serve loop
-- looks at every S.POLL seconds: each look drives the pools (AsyncResult:ready() reads their
-- results) and answers the waiters whose calls finished or whose timeout passed.
return function(S)
  local core = require "multiprocessing.core"
  local ops, now = S.ops, core.now
  local mp  -- the library, loaded in the server on the first Pool

  S.POLL = 0.005
  S.pending, S.next_poll = {}, math.huge

  -- a waiter of the request being served, answered once check() says done (done, ok, value)
  local function pend(a, check)
    local w = S.waiter(a, a.timeout)
    S.pending[#S.pending + 1] = { w = w, check = check }
    if S.next_poll == math.huge then S.next_poll = now() + S.POLL end
    return S.DEFER
  end

  -- answers the pending waiters whose call is done or whose timeout passed
  function S.poll()
    local t, keep = now(), {}
    for _, p in ipairs(S.pending) do
      local ok, done, good, v = pcall(p.check)
      if not ok then S.answer(p.w, false, done)
      elseif done then S.answer(p.w, good, v)
      elseif p.w.deadline and p.w.deadline <= t then S.answer(p.w, true, "timeout")
      else keep[#keep + 1] = p end
    end
    S.pending = keep
    S.next_poll = #keep > 0 and t + S.POLL or math.huge
  end

  -- the outcome of a finished AsyncResult: true, its values packed; or false, its error
  local function outcome(ar)
    local r = table.pack(pcall(ar.get, ar, 0))
    if r[1] then return true, table.move(r, 2, r.n, 1, { n = r.n - 1 }) end
    return false, r[2]
  end

  local function pool_of(objs, id)
    local o = objs[id]
    if o.kind ~= "Pool" then error("not a Pool", 0) end
    return o
  end

  function ops.new_pool(objs, _, _, args)
    mp = mp or require "multiprocessing"
    local pool = mp.Pool(args)
    local o = { kind = "Pool", data = pool, calls = {} }
    S.pools[#S.pools + 1] = pool
    return S.new_obj(objs, o)
  end

  -- what: apply_async, map_async or starmap_async; t = { f, args or items, opts }
  function ops.pool_call(objs, id, what, t)
    local o = pool_of(objs, id)
    local ok, ar = pcall(o.data[what], o.data, t[1], t[2], t[3])
    if not ok then error(type(ar) == "string" and (ar:gsub("^[^\n]-%.lua:%d+: ", "")) or ar, 0) end
    o.calls[#o.calls + 1] = ar
    return S.new_obj(objs, { kind = "AsyncResult", data = ar })
  end

  -- a = { pid, timeout, wait }: the values (packed), or true for a wait; "timeout"
  function ops.async_get(objs, id, a)
    local ar = objs[id].data
    local function check()
      if not ar:ready() then return false end
      if a.wait then return true, true, true end
      return true, outcome(ar)
    end
    local done, ok, v = check()
    if done then
      if not ok then error(v, 0) end
      return v
    end
    if a.timeout and a.timeout <= 0 then return "timeout" end
    return pend(a, check)
  end

  function ops.async_state(objs, id)
    local ar = objs[id].data
    if not ar:ready() then return { ready = false } end
    return { ready = true, successful = ar:successful() }
  end

  -- imap and imap_unordered: one apply_async per item (items: a sequence, n honoured)
  function ops.pool_imap(objs, id, ordered, t)
    local o = pool_of(objs, id)
    local f, items, opts = t[1], t[2], t[3]
    local n = items.n or #items
    local ars = {}
    for i = 1, n do
      local ar = o.data:apply_async(f, { items[i], n = 1 }, opts)
      ars[i] = ar
      o.calls[#o.calls + 1] = ar
    end
    return S.new_obj(objs, { kind = "imap", data = { ars = ars, n = n, next = 1, left = n, ordered = ordered } })
  end

  -- the next results of an imap: { i1, v1, i2, v2, ..., n = } (those ready now, at least one;
  -- in order for imap), {} once all were given; a failed item raises its error
  function ops.iter_next(objs, id, a)
    local it = objs[id].data
    local function check()
      local out = { n = 0 }
      if it.left == 0 then return true, true, out end
      local function give(i)
        local ok, v = outcome(it.ars[i])
        it.ars[i], it.left = false, it.left - 1
        if not ok then error(v, 0) end
        out[out.n + 1], out[out.n + 2], out.n = i, v[1], out.n + 2
      end
      if it.ordered then
        while it.next <= it.n and it.ars[it.next]:ready() do
          local i = it.next
          if out.n > 0 and not outcome(it.ars[i]) then break end  -- its error in its own turn
          it.next = i + 1
          give(i)
        end
      else
        for i = 1, it.n do
          local ar = it.ars[i]
          if ar and ar:ready() then
            if out.n > 0 and not outcome(ar) then break end  -- its error in its own turn
            give(i)
          end
        end
      end
      if out.n == 0 then return false end
      return true, true, out
    end
    local done, ok, v = check()
    if done then return ok and v end
    return pend(a, check)
  end

  function ops.pool_close(objs, id)
    local o = pool_of(objs, id)
    o.closed = true
    o.data:close()
  end

  function ops.pool_terminate(objs, id)
    local o = pool_of(objs, id)
    o.closed = true
    o.data:terminate()
  end

  -- answered once every call of the pool finished and its workers left
  function ops.pool_join(objs, id, a)
    local o = pool_of(objs, id)
    if not o.closed then error("cannot join a running pool", 0) end
    local function check()
      for _, ar in ipairs(o.calls) do if not ar:ready() then return false end end
      o.data:join()
      o.calls = {}
      return true, true, true
    end
    local done = check()
    if done then return true end
    return pend(a, check)
  end

  -- the server stops: its pools are terminated (their workers killed and reaped)
  function S.stop_pools()
    for _, pool in ipairs(S.pools) do pcall(pool.terminate, pool) end
    S.pools = {}
  end
end
