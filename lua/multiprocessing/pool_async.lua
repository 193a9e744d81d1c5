-- pool_async.lua: the Pool's calls that return before their results (apply_async, submit,
-- map_async, starmap_async, imap, imap_unordered) and apply, the records they return
-- (Future, AsyncResult), what waits on them (as_completed, wait), and the driving of a
-- pool from a frame loop (poll, fileno); with stats. Loaded by pool.lua on the first use
-- of one of these names (see ASYNC there): a program that only maps never parses it.
-- It puts its methods in Pool and its functions in pool.lua's module table, in place of
-- the stand-ins there, and returns nothing.
local P = require("multiprocessing.pool")._internals  -- what pool.lua shares with this file
local core, M, Pool, progress = P.core, P.M, P.Pool, P.progress
local SLICE, AHEAD, POLL_BUDGET, STEP_RESULTS, FEED_TIME = P.SLICE, P.AHEAD, P.POLL_BUDGET, P.STEP_RESULTS, P.FEED_TIME
local PUT_WAIT, unref, make_pending = P.PUT_WAIT, P.unref, P.make_pending
local clean, engine, wait_call, results_of, check_usable = P.clean, P.engine, P.wait_call, P.results_of, P.check_usable
local parse_opts, key_text, new_call, feed, sized_results = P.parse_opts, P.key_text, P.new_call, P.feed, P.sized_results
local first_feed, interrupt_of = P.first_feed, P.interrupt_of
local call_blob, plain_upvalues = P.call_blob, P.plain_upvalues
local abandon, finish, run_callback, note, on_result = P.abandon, P.finish, P.run_callback, P.note, P.on_result
local check_workers, stop_workers, spawn_pending = P.check_workers, P.stop_workers, P.spawn_pending
local now, newtable, getpid, take_result = core.now, core.newtable, core.getpid, core.take_result
local put_call, put_apply, flag_cas, flag_get = core.put_call, core.put_apply, core.flag_cas, core.flag_get
local lean_puts = core.lean_puts
local unpack, pack, setmetatable = table.unpack, table.pack, setmetatable
local encode_unowned = core._encode_unowned

-- A call's record is what the user holds: a Future (submit) or an AsyncResult (the
-- _async methods), which is a Future too (see the end of this file). A lean record
-- (apply_async, submit: one task message) is its own entry in the pool's inflight
-- table and receives the task's values at [1 .. n]; a map call's record keeps results.
local Future = { __name = "multiprocessing.Future", kind = "submit" }
Future.__index = Future
local AsyncResult = setmetatable({ __name = "multiprocessing.AsyncResult", kind = "apply" }, { __index = Future })
AsyncResult.__index = AsyncResult
-- The fields a record may lack, so that looking one up stops at its class (a lean
-- record has only finished, n, brec, and flag for a Future; lean records are many).
local DEFAULTS = { "call", "err", "callback", "error_callback", "timeout", "id", "bar", "_cbs", "flag", "_cancelled",
  "held" }
for _, class in ipairs { Future, AsyncResult } do
  class.__future = class
  for _, k in ipairs(DEFAULTS) do class[k] = false end
end

-- A pool's own class of lean records: a flat copy of base (its methods and defaults, so
-- that every look-up ends in one step) with _pool, so that a lean record need not hold its
-- pool (its four fields fit the smallest hash part).
local CLASS_SIZE = 32  -- (the fields of a class, AsyncResult's 30: made at their size, not grown 1, 2, 4...)
local function pool_class(pool, base)
  local c = newtable(0, CLASS_SIZE)
  for k, v in pairs(Future) do c[k] = v end
  if base ~= Future then for k, v in pairs(base) do c[k] = v end end
  c._pool, c.__index, c.__future = pool, c, base
  return c
end
-- the pool's classes, made at its first lean call (self is a Pool: lean_ready or check_usable said so)
local function lean_classes(self)
  self._A, self._F = pool_class(self, AsyncResult), pool_class(self, Future)
  return self
end
local CANCELLED = "the future was cancelled"

-- Cancel words of Futures: slabs of FLAG_SLAB words in the arena, each word in use from
-- its Future's submit until its message ended (lean_end), then reused.
local FLAG_SLAB = 1024
-- (the last free word, made when none is: put_call takes it once its message is out); nil when
-- none is and a slab could not be made within wait (default PUT_WAIT: a stopped process holds
-- the allocator)
local function free_flag(self, wait)
  local n = self._nfree
  local free = self._free
  if n == 0 then
    local blob, base = core.flags_new(FLAG_SLAB, wait or PUT_WAIT)
    if not blob then return nil end
    local slabs = self._slabs
    slabs[#slabs + 1] = blob
    for k = 1, FLAG_SLAB do free[k] = base + 4 * (FLAG_SLAB - k) end
    n = FLAG_SLAB
    self._nfree = n
  end
  return free[n]
end

-- Lean calls kept unsent. A lean call's put waits PUT_WAIT at most for the task queue's lock and
-- the allocator's; one that met a lock held that long (a process stopped holding it: SIGSTOP, a
-- debugger) is kept in self._held, unsent, and the call returns its record as usual. So are the
-- lean calls made while any is kept (they keep their order). The engine sends them at its later
-- turns (send_held), before it feeds map calls: get(timeout) ends at its timeout, a cancel()
-- drops one, terminate() or a pool left without workers fails them. What is kept is the record,
-- its blob (one reference more while kept) and the arguments themselves, sent as they are then.
-- e: { rec = the record, args = the apply's table of arguments, or the call's packed ones, call = true }
local function hold(self, e)
  local held = self._held
  if not held then
    held = { first = 1, last = 0 }
    self._held = held
    lean_puts(self._tasks, PUT_WAIT, true)  -- (the lean calls made from now on say "kept")
  end
  local k = held.last + 1
  held[k], held.last = e, k
  local rec = e.rec
  rec.held = true
  local b = rec.brec
  b.refs = b.refs + 1
  -- (a frame loop waiting on pool:fileno() polls once the timer fires: nothing else would
  -- make it readable for a call that is not in flight)
  if self._epfd then self._st:signal(SLICE) end
  return rec
end

-- sends the kept lean calls, in order, until one meets a held lock again: wait is how long each
-- put may wait for it (default PUT_WAIT: the engine's turns; 0, a lean call made while calls are
-- kept: only if the locks are free at once, so that a lock held a while by a process that runs
-- (preempted on a busy machine) does not keep every later call of a loop from the workers
-- until its next wait)
local send_kept
local function send_held(self, wait)
  local tasks = self._tasks
  lean_puts(tasks, wait or PUT_WAIT, false)  -- (this turn's wait, for its own puts)
  local ok, err = pcall(send_kept, self, tasks, wait or PUT_WAIT)
  lean_puts(tasks, PUT_WAIT, self._held and true or false)
  if not ok then error(err, 0) end
end
send_kept = function(self, tasks, wait)
  local held = self._held
  for k = held.first, held.last do
    held.first = k  -- (what is left, whatever raises below: fail_held starts here)
    local e = held[k]
    local rec = e.rec
    local b = rec.brec
    local sent, ok, why = true, true, nil
    if not rec.finished then  -- (else: cancelled while kept)
      local args = e.args
      -- (its function's blob, or a cancel word, that could not be made within wait: the
      -- allocator is still held; the next turn tries again from here)
      if b.pending and not make_pending(self, b, wait) then return end
      if e.call then
        rec.flag = free_flag(self, wait)  -- (taken by put_call once the message is out)
        if not rec.flag then return end
        sent, ok, why = pcall(put_call, tasks, self._seq + 1, b.fid, b.off, rec.flag, self, rec, unpack(args, 1, args.n))
        if not (sent and ok) then rec.flag = false end
      else
        sent, ok, why = pcall(put_apply, tasks, self._seq + 1, b.fid, b.off, args, self, rec, b)
      end
      -- Ctrl-C: its put returned "interrupted", or lua.c's hook raised "interrupted!" on its
      -- return (caught by the pcall), or the allocator's wait raised it. The call stays kept
      -- (from k on: the ones before are out or let go), and the engine terminates the pool.
      local interrupted = (sent and not ok and why ~= "timeout")
        or (not sent and tostring(ok):find("interrupted!", 1, true))
      if interrupted then
        held.first = k
        error(sent and "interrupted!" or ok, 0)
      end
      if not sent then  -- its arguments changed since the call, and cannot be sent now
        rec.err = clean(tostring(ok))
        finish(self, rec)
      elseif not ok then  -- "timeout": a lock is still held; the next turn tries again from here
        held.first = k
        return
      end
    end
    held[k] = nil
    rec.held = false
    unref(self, b)
  end
  self._held = false
end
M._send_held = send_held

------------------------------------------------- driving from a frame loop
--
-- A bounded step (get(0), wait(0), ready(), done(), and the unit of pool:poll): up to
-- STEP_RESULTS messages from workers (results, and rare start-up notes), the health check
-- when SLICE has passed since the last one (its drains take STEP_RESULTS more at most),
-- lazy input until feed_until (results and input: at least one message each); it never
-- waits. Returns the messages it handled and whether it left work that a next step could
-- do at once.
local function step(self, feed_until)
  local inflight, results = self._inflight, self._results
  local n, more = 0, false
  local t0 = now()
  while true do
    if n >= STEP_RESULTS or (n > 0 and t0 >= feed_until) then more = true break end
    local seq, out, pid, busy, done = take_result(results, 0, inflight, STEP_RESULTS - n, self)
    if seq == nil then break end
    n = n + done  -- (lean results that take_result finished itself)
    if seq then
      if not note(seq) then n = n + 1 end
      local inf = type(seq) == "number" and inflight[seq]
      on_result(self, seq, out, pid, busy)
      local t1 = now()
      local call = inf and inf.call
      if call and call.async then call.dec_item = (t1 - t0) / inf.n end  -- (sizes its next chunks)
      t0 = t1
    end
  end
  self._leaving = nil  -- (workers that leave: the health check finds them, see pump)
  -- the health check takes what came meanwhile (see find_lost in pool_faults.lua): it waits for a step
  -- that emptied the queue, unless results have kept it busy for a while
  local since = now() - self._checked
  if since >= SLICE and (not more or since >= 10 * SLICE) then
    self._bounded = STEP_RESULTS
    check_workers(self)
    n = n + STEP_RESULTS - self._bounded  -- (the messages its drains took)
    self._bounded = nil
  end
  if self._held then send_held(self) end
  for _, call in pairs(self._calls) do
    if call.window or call.stalled then
      if call.dropped then abandon(self, call)
      elseif feed(self, call, feed_until) then more = true end
    end
  end
  if self._state == "closing" and not self._stopping then stop_workers(self) end
  return n, more
end

-- get(0), wait(0), ready(): one step; deferred respawns only when no worker is left
local function drive_once(self)
  if self._respawns and not next(self._workers) then spawn_pending(self, math.huge) end
  step(self, now() + FEED_TIME)
end

local function live(self)
  local state = self._state
  return state == "running" or state == "closing"
end

-- Waits for a record as wait_call does; get(0), wait(0): one bounded step
local function wait_for(self, call, timeout)
  if timeout and timeout <= 0 and not call.finished then
    if live(self) then engine(self, 0, drive_once) end
    return call.finished == true
  end
  return wait_call(self, call, timeout)
end

-- pool:poll(budget): steps until one leaves nothing to do at once or the budget is
-- spent; then the descriptor of pool:fileno() is made true (readable while work is
-- left, its timer set for the next health check while messages are in flight).
local function drive_poll(self, budget)
  local deadline = now() + budget
  local st, watching = self._st, self._epfd
  if watching then st:clear() end
  if self._respawns then spawn_pending(self, next(self._workers) and 1 or math.huge) end
  local total, n, more = 0, 0, false
  repeat
    n, more = step(self, deadline)
    total = total + n
  until not more or now() >= deadline or not live(self)
  more = more or self._respawns ~= nil
  self._polled, self._more = total, more
  if watching and live(self) then
    if more then st:signal() end
    st:signal((next(self._inflight) or self._held) and SLICE or 0)
  end
end


--- pool:poll([budget]) -> results delivered, more: drives the pool for about budget seconds
--- (default POLL_BUDGET; 0: one bounded step) without waiting (see docs/pool.md)
function Pool:poll(budget)
  if getmetatable(self) ~= Pool then error("bad self to 'poll' (Pool expected)", 2) end
  if budget == nil then
    budget = POLL_BUDGET
  elseif type(budget) ~= "number" or budget ~= budget or budget < 0 then
    error(("bad argument #1 to 'poll' (non-negative number of seconds expected, got %s)"):format(
      type(budget) == "number" and tostring(budget) or type(budget)), 2)
  end
  if self._owner ~= core.getpid() then error("a Pool can only be used by the process that made it", 2) end
  if not live(self) then return 0, false end
  self._polled, self._more = 0, false
  engine(self, budget, drive_poll)
  return self._polled, self._more
end

--- pool:fileno() -> fd: readable while pool:poll() has something to do (see docs/pool.md)
function Pool:fileno()
  if getmetatable(self) ~= Pool then error("bad self to 'fileno' (Pool expected)", 2) end
  if self._owner ~= core.getpid() then error("a Pool can only be used by the process that made it", 2) end
  if not live(self) then error(("cannot fileno: the pool is %s"):format(self._state), 2) end
  local fd = self._epfd
  if fd then return fd end
  local st = self._st
  local err, code
  fd, err, code = st:watch()
  if not fd then return nil, err, code end
  self._epfd = fd
  for i, w in pairs(self._workers) do st:watch_pid(i, w.pid) end
  if next(self._inflight) then st:signal(SLICE) end
  return fd
end


-- map_async, starmap_async: the input is fed as imap's is, a window of items in flight
-- ahead of the results, so that submission costs one bounded step (see drive)
local function async(self, call)
  call.window, call.async = self._n * AHEAD, true
  first_feed(self, call, now() + FEED_TIME)
  sized_results(call)
  call._pool = self
  return setmetatable(call, AsyncResult)
end

function Pool:map_async(f, iterable, opts)
  return async(self, new_call(self, "map", f, iterable, opts, "map_async"))
end

function Pool:starmap_async(f, list, opts)
  local call = new_call(self, "starmap", f, list, opts, "starmap_async")
  call.star = true
  return async(self, call)
end


-- hold's, for a call made while others are kept: its arguments are checked as a put checks
-- them (an error at level lvl, seen from here); args: what to check
local function keep(self, e, args, lvl)
  local ok, err = pcall(encode_unowned, args or {}, "args")
  if not ok then error(clean(tostring(err)), lvl + 1) end
  return hold(self, e)
end

-- what: the user's method (apply or apply_async); errors at level 3 from here
local function send_apply(self, f, args, opts, what)
  -- (check_usable's tests, inline: it raises the error when one fails)
  if getmetatable(self) ~= Pool or self._owner ~= getpid() or self._state ~= "running" or self._broken then
    check_usable(self, what, 4)
  end
  if type(f) ~= "function" then error(("bad argument #1 to '%s' (function expected, got %s)"):format(what, type(f)), 3) end
  if args ~= nil and type(args) ~= "table" then
    error(("bad argument #2 to '%s' (table of arguments expected, got %s)"):format(what, type(args)), 3)
  end
  -- a lean call: the AsyncResult is its own record, its one task is sent at once
  -- (no array part: its one value has a slot of the hash part, one allocation less)
  local call = setmetatable({ [1] = false, finished = false, n = false, brec = false }, (self._A or lean_classes(self)._A))
  if opts ~= nil then
    opts = parse_opts(opts, what, 4)
    call.callback, call.error_callback, call.timeout = opts.callback, opts.error_callback, opts.timeout
  end
  local b = call_blob(self, f, 3, PUT_WAIT)
  call.brec = b
  if self._held then send_held(self, 0) end  -- (a try: see send_held)
  if self._held or b.pending then  -- (not a tail call: keep's errors name the user's line, counting this frame)
    keep(self, { rec = call, args = args }, args, 3)
    return call
  end
  -- (recorded by put_apply once sent: see lean_apply)
  local sent, ok, why = pcall(put_apply, self._tasks, self._seq + 1, b.fid, b.off, args, self, call, b)
  if not sent then error(clean(tostring(ok)), 3) end
  if not ok then
    if why ~= "timeout" then error("interrupted!", 0) end  -- (the put was: nothing sent)
    hold(self, { rec = call, args = args })
  end
  return call
end

-- The common case, under pcall: self is a running Pool of this process and f's blob still
-- holds as cached (cached_blob's test); anything else returns nothing, and any error (a self
-- that cannot be indexed, arguments that cannot be sent) is caught: the way above then runs,
-- and names the user's error. Nothing is changed until the message is out.
local function lean_ready(self, f)
  if self.__index ~= Pool or self._owner ~= getpid() or self._state ~= "running" or self._broken then return end
  local c = self._fcache[f]
  if not c or not c.plain or not (c.bare or plain_upvalues(f, c.ups)) then return end
  local b = c.b
  if not b.freed then return b end
end

-- (put_apply and put_call record the call themselves once its message is out: the seq, the
-- inflight record, the blob's reference, the cancel word taken. A Ctrl-C met between the put
-- and that bookkeeping in Lua left a message with no record and its seq to be used again.)
-- (lean_ready's tests, inline: the call costs a tenth of an apply_async)
local function lean_apply(self, f, args)
  if self.__index ~= Pool or self._owner ~= getpid() or self._state ~= "running" or self._broken then return end
  local c = self._fcache[f]
  if not c or not c.plain or not (c.bare or plain_upvalues(f, c.ups)) then return end
  local b = c.b
  if b.freed then return end
  local call = setmetatable({ [1] = false, finished = false, n = false, brec = b }, (self._A or lean_classes(self)._A))
  -- (args that are no table: put_apply raises)
  local ok, why = put_apply(self._tasks, self._seq + 1, b.fid, b.off, args, self, call, b, self._inflight)
  if ok then return call end
  if why == "timeout" then return hold(self, { rec = call, args = args }) end
  if why == "kept" then return end  -- (calls are kept: the general way checks the arguments, keeps it too)
  error("interrupted!", 0)  -- (the put was, and sent nothing: not a reason to try the general way)
end

local function lean_submit(self, f, ...)
  local b = lean_ready(self, f)
  local n = self._nfree
  if not b or n == 0 then return end
  local flag = self._free[n]
  local fut = setmetatable({ false, finished = false, n = false, flag = flag, brec = b }, (self._F or lean_classes(self)._F))
  local ok, why = put_call(self._tasks, self._seq + 1, b.fid, b.off, flag, self, fut, ...)
  if ok then return fut end
  if why == "kept" then return end  -- (as lean_apply)
  if why == "timeout" then
    fut.flag = false  -- (not taken: send_held takes one when it sends)
    return hold(self, { rec = fut, args = pack(...), call = true })
  end
  error("interrupted!", 0)  -- (as lean_apply)
end

-- what pcall(lean_apply or lean_submit, ...) returned: the record, or nothing (the general
-- way then runs). Ctrl-C's "interrupted!" (lua.c's hook, a host's lmp_interrupt, a wait's
-- own) is raised again: it is the user's, not a failure of the short way.
local function lean_result(ok, r)
  if ok then return r end
  if interrupt_of(r) then error(r, 0) end
end

function Pool:apply_async(f, args, opts)
  if opts == nil then
    local ok, call = pcall(lean_apply, self, f, args)
    if ok then  -- (lean_result's way, inline)
      if call then return call end
    else
      lean_result(ok, call)
    end
  end
  local call = send_apply(self, f, args, opts, "apply_async")  -- (not a tail call: errors name the user's line)
  return call
end

function Pool:apply(f, args, opts)
  local call = opts == nil and lean_result(pcall(lean_apply, self, f, args))
  if not call then call = send_apply(self, f, args, opts, "apply") end
  wait_for(self, call)
  if call.err then error(call.err, 2) end
  return unpack(call, 1, call.n)
end

--- pool:submit(f, ...) -> Future: runs f(...) in a worker (concurrent.futures' submit)
function Pool:submit(f, ...)
  local fut = lean_result(pcall(lean_submit, self, f, ...))
  if fut then return fut end
  if getmetatable(self) ~= Pool or self._owner ~= getpid() or self._state ~= "running" or self._broken then
    check_usable(self, "submit", 3)
  end
  if type(f) ~= "function" then error(("bad argument #1 to 'submit' (function expected, got %s)"):format(type(f)), 2) end
  local b = call_blob(self, f, 2, PUT_WAIT)
  if self._held then send_held(self, 0) end  -- (a try: see send_held)
  -- (kept: behind kept calls, or a blob or a slab of cancel words the allocator could not make)
  local flag = not (self._held or b.pending) and free_flag(self)
  if not flag then
    local args = pack(...)
    local fut = setmetatable({ false, finished = false, n = false, brec = b }, (self._F or lean_classes(self)._F))
    keep(self, { rec = fut, args = args, call = true }, args, 2)  -- (not a tail call: see send_apply)
    return fut
  end
  local fut = setmetatable({ false, finished = false, n = false, flag = flag, brec = b }, (self._F or lean_classes(self)._F))
  local sent, ok, why = pcall(put_call, self._tasks, self._seq + 1, b.fid, b.off, flag, self, fut, ...)
  if not sent then error(clean(tostring(ok)), 2) end
  if not ok then
    if why ~= "timeout" then error("interrupted!", 0) end  -- (the put was: nothing sent)
    fut.flag = false
    hold(self, { rec = fut, args = pack(...), call = true })
  end
  return fut
end

-- The closing value of an imap loop. It is also an upvalue of the loop's
-- function, so when nothing can continue the loop any more it is collected
-- and the engine abandons the call (a loop left without closing it).
local Closer = {
  __close = function(c) abandon(c.pool, c.call) end,
  __gc = function(c) c.call.dropped = true end,
}

local function iterate(self, kind, f, iterable, opts, what)
  local call = new_call(self, kind, f, iterable, opts, what)  -- (Pool:imap's is a tail call)
  call.window = self._n * AHEAD
  if kind == "unordered" then call.arrived, call.next_arrived, call.narrived = {}, 1, 0 else call.have = {} end
  first_feed(self, call)
  local yielded = 0
  local cur, last = 1, 0   -- the range of ended items being handed out
  local closer = setmetatable({ pool = self, call = call }, Closer)
  local function step()
    while true do
      if call.abandoned then return nil end
      local idx
      if kind == "unordered" then
        if cur <= last then
          idx, cur = cur, cur + 1
        elseif call.next_arrived <= call.narrived then
          local a, j = call.arrived, call.next_arrived
          idx, last = a[j], a[j] + a[j + 1] - 1
          cur = idx + 1
          a[j], a[j + 1] = nil, nil
          call.next_arrived = j + 2
        end
      elseif yielded < last then
        idx = yielded + 1
      else
        local n = call.have[yielded + 1]
        if n then
          call.have[yielded + 1] = nil
          idx, last = yielded + 1, yielded + n
        end
      end
      if idx then
        yielded = yielded + 1
        local e = call.errors[idx]
        local v = call.results[idx]
        call.results[idx], call.errors[idx] = nil, nil
        call.consumed = yielded
        if e then
          abandon(self, closer.call)  -- (closer is an upvalue: it lives as long as the loop)
          error(e, 2)
        end
        return idx, v
      end
      if call.fed_all and yielded >= call.total then
        call.finished = true
        self._calls[call.id] = nil
        if call.bar then call.bar:close() end
        return nil
      end
      local state = self._state
      if state == "terminated" or state == "closed" then  -- (they cut every call: not reached)
        abandon(self, call)
        error(("%s: the pool is %s"):format(kind, state), 2)
      end
      engine(self, SLICE)
    end
  end
  progress()._closers[step] = closer
  return step, nil, nil, closer
end

--- for i, v in pool:imap(f, iterable [, opts]): results in order, i is the item's index
function Pool:imap(f, iterable, opts) return iterate(self, "imap", f, iterable, opts, "imap") end
--- for i, v in pool:imap_unordered(f, iterable [, opts]): results as they come
function Pool:imap_unordered(f, iterable, opts) return iterate(self, "unordered", f, iterable, opts, "imap_unordered") end


--- pool:stats(): per worker insights, MPIRE style
function Pool:stats()
  if getmetatable(self) ~= Pool then error("bad self to 'stats' (Pool expected, got " .. type(self) .. ")", 2) end
  local out = {}
  for i = 1, self._n do
    local info = self._final_stats and {} or self._st:info(i)
    if self._final_stats then for k, v in pairs(self._final_stats[i]) do info[k] = v end end
    info.pid = self._workers[i] and self._workers[i].pid
    out[i] = info
  end
  return out
end


------------------------------------------------------ Future, AsyncResult

-- A record's state, delivering what came first (as AsyncResult:ready always did).
local function poll(call)
  local pool = call._pool
  if not rawget(call, "finished") and live(pool) then
    engine(pool, 0, drive_once)
  end
  return rawget(call, "finished") == true
end

-- A timeout as the core's waits take it: nil (forever) or a number, never NaN (no deadline
-- would ever pass: the wait would never end).
local function check_timeout(timeout, what, arg, lvl)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout) then
    error(("bad argument #%d to '%s' (%s)"):format(arg or 1, what,
      type(timeout) == "number" and "timeout is NaN" or "number expected, got " .. type(timeout)), lvl or 3)
  end
end

-- all the values of a record that succeeded: a lean call's, or a map call's results table
local function values_of(call)
  if call.n ~= nil then return unpack(call, 1, call.n) end
  return results_of(call)
end

-- waits for a Future as result() and exception() do: false on timeout; raises, at the
-- user's call, when it was cancelled
local function await(self, timeout, what)
  check_timeout(timeout, what, 1, 4)
  if not wait_for(self._pool, self, timeout) then return false end
  if self._cancelled then error(CANCELLED, 3) end
  return true
end

--- f:result([timeout]) -> f's values; raises its error; nil, "timeout"
function Future:result(timeout)
  local n = self.n
  if n == 1 and timeout == nil then return self[1] end  -- (a lean call that succeeded, with one value)
  if n and timeout == nil then return unpack(self, 1, n) end
  if not await(self, timeout, "result") then return nil, "timeout" end
  if self.err then error(self.err, 2) end
  return values_of(self)
end

--- f:exception([timeout]) -> the error (a TaskError or a text), or nil when f succeeded; nil, "timeout"
function Future:exception(timeout)
  if not await(self, timeout, "exception") then return nil, "timeout" end
  return self.err or nil
end

--- f:done() -> whether f finished (a result, an error, or cancelled)
function Future:done() return poll(self) end

--- f:cancelled() -> whether cancel() succeeded
function Future:cancelled() return self._cancelled end

--- f:running() -> whether a worker runs it now (a record that cannot be cancelled counts as
--- running until it is done: apply_async and map_async results)
function Future:running()
  if poll(self) or self.held then return false end
  local flag = self.flag
  return not flag or flag_get(flag) == 1
end

--- f:cancel() -> true when f will not run (it was still queued, or already cancelled)
function Future:cancel()
  if self.finished then return self._cancelled end
  if self._pool._owner ~= core.getpid() then return false end  -- (a forked copy cannot)
  if self.held and self.kind == "submit" then  -- kept unsent (see hold): it never will be (send_held lets it go)
    self._cancelled, self.err = true, CANCELLED
    finish(self._pool, self)
    return true
  end
  local flag = self.flag
  if not flag then return false end
  if not flag_cas(flag, 0, 2) then return false end  -- a worker started it
  -- its message stays in flight until a worker skips it (or it is lost): its word stays in use
  self._cancelled, self.err = true, CANCELLED
  finish(self._pool, self)
  return true
end

--- f:add_done_callback(fn): fn(f) once f is done, in this process (at once if it is)
function Future:add_done_callback(fn)
  if type(fn) ~= "function" then
    error(("bad argument #1 to 'add_done_callback' (function expected, got %s)"):format(type(fn)), 2)
  end
  if self.finished then run_callback(fn, self) return end
  local cbs = self._cbs
  if not cbs then cbs = {} self._cbs = cbs end
  cbs[#cbs + 1] = fn
end

-- mp.connection.wait's protocol (docs/connection.md): the pool's descriptor, and a step that
-- clears it (pool:poll(0)), so that a descriptor left readable always has work behind it
function Future:_wait_fd()
  local pool = self._pool
  if not self.finished and live(pool) and pool._owner == core.getpid() then return (pool:fileno()) end
end

function Future:_wait_ready()
  local pool = self._pool
  if not rawget(self, "finished") and live(pool) then engine(pool, 0, drive_poll) end
  return rawget(self, "finished") == true
end

Future.__tostring = function(self)
  local state = self._cancelled and "cancelled" or self.finished and (self.err and "raised" or "finished") or "pending"
  return ("<%s %s>"):format(getmetatable(self).__future == Future and "Future" or "AsyncResult", state)
end
AsyncResult.__tostring = Future.__tostring

function AsyncResult:ready()
  return poll(self)
end

function AsyncResult:wait(timeout)
  check_timeout(timeout, "wait")
  if wait_for(self._pool, self, timeout) then return true end
  return nil, "timeout"
end

function AsyncResult:successful()
  if not poll(self) then error("the result is not ready", 2) end
  return not self.err
end

function AsyncResult:get(timeout)
  local n = self.n
  if n == 1 and timeout == nil then return self[1] end  -- (a lean call that succeeded, with one value)
  if n and timeout == nil then return unpack(self, 1, n) end
  check_timeout(timeout, "get")
  if not wait_for(self._pool, self, timeout) then return nil, "timeout" end
  if self.err then error(self.err, 2) end
  return values_of(self)
end

------------------------------------------------------ as_completed, wait

-- the futures of a sequence, checked, each once, in order; and the pools they belong to
local function future_list(fs, what)
  if type(fs) ~= "table" then
    error(("bad argument #1 to '%s' (table of futures expected, got %s)"):format(what, type(fs)), 3)
  end
  local list, seen, pools = {}, {}, {}
  for i = 1, fs.n or #fs do
    local f = fs[i]
    local mt = getmetatable(f)
    if type(mt) ~= "table" or (rawget(mt, "__future") ~= Future and rawget(mt, "__future") ~= AsyncResult) then
      error(("bad argument #1 to '%s' (item %d is not a Future, got %s)"):format(what, i, type(f)), 3)
    end
    if not seen[f] then
      seen[f] = true
      list[#list + 1] = f
      pools[f._pool] = true
    end
  end
  if #list == 0 and next(fs) ~= nil and fs.n == nil then
    error(("bad argument #1 to '%s' (the table has no sequence part: pass a list of futures)"):format(what), 3)
  end
  return list, pools
end

-- A waiter: a list that receives the futures of `list` as they finish, the finished ones
-- first. Each unfinished future holds it (in its done callbacks) until unwatch.
local function watch(list, pools)
  for pool in pairs(pools) do
    local st = pool._state
    if st == "running" or st == "closing" then engine(pool, 0) end  -- what came is delivered
  end
  local w = {}
  for _, f in ipairs(list) do
    if f.finished then
      w[#w + 1] = f
    else
      local cbs = f._cbs
      if not cbs then cbs = {} f._cbs = cbs end
      cbs[#cbs + 1] = w
    end
  end
  return w
end

local function unwatch(list, w)
  for _, f in ipairs(list) do
    local cbs = f._cbs
    if cbs then
      for k = #cbs, 1, -1 do
        if cbs[k] == w then table.remove(cbs, k) end
      end
    end
  end
end

-- one turn of the engines of these pools, up to `wait` seconds in all
local function turn(pools, wait)
  local live = {}
  for pool in pairs(pools) do
    local st = pool._state
    if st == "running" or st == "closing" then live[#live + 1] = pool end
  end
  if #live == 0 then core.sleep(math.min(wait, SLICE)) return end  -- (unreached: stopped pools finish their calls)
  for _, pool in ipairs(live) do engine(pool, wait / #live) end
end

local function deadline_of(timeout) return timeout and now() + math.max(timeout, 0) end

--- for f in mp.as_completed(futures [, timeout]): the futures as they finish (the finished
--- ones first); raises when timeout seconds (counted from the call) pass before the last
function M.as_completed(fs, timeout)
  local list, pools = future_list(fs, "as_completed")
  check_timeout(timeout, "as_completed", 2)
  local deadline = deadline_of(timeout)
  local w = watch(list, pools)
  local k, total = 0, #list
  local function step()
    while true do
      if k < #w then
        k = k + 1
        local f = w[k]
        w[k] = false  -- (the loop holds what it yielded, not the waiter)
        return f
      end
      if k >= total then return nil end
      local left = deadline and deadline - now()
      if left and left <= 0 then
        unwatch(list, w)
        error(("as_completed: %d (of %d) futures unfinished after %gs"):format(total - k, total, timeout), 2)
      end
      turn(pools, left and math.min(left, SLICE) or SLICE)
    end
  end
  -- break out of the loop: the unfinished futures let go of the waiter
  local closer = setmetatable({}, { __close = function() unwatch(list, w) end })
  return step, nil, nil, closer
end

local RETURN_WHEN = { FIRST_COMPLETED = true, FIRST_EXCEPTION = true, ALL_COMPLETED = true }
local WAIT_OPTIONS = { timeout = true, return_when = true }

--- mp.wait(futures [, {timeout = s, return_when = ...}]) -> done, not_done (lists, in the
--- order of futures); a number in place of the options is the timeout
function M.wait(fs, opts)
  local list, pools = future_list(fs, "wait")
  local timeout, when = nil, "ALL_COMPLETED"
  if type(opts) == "number" then
    timeout = opts
  elseif type(opts) == "table" then
    for k in pairs(opts) do
      if not WAIT_OPTIONS[k] then error(("bad argument #2 to 'wait' (unknown option %s)"):format(key_text(k)), 2) end
    end
    timeout, when = opts.timeout, opts.return_when or when
  elseif opts ~= nil then
    error(("bad argument #2 to 'wait' (table or number expected, got %s)"):format(type(opts)), 2)
  end
  check_timeout(timeout, "wait", 2)
  if not RETURN_WHEN[when] then
    error(("bad argument #2 to 'wait' (return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED, got %s)")
      :format(tostring(when)), 2)
  end
  local deadline = deadline_of(timeout)
  local w = watch(list, pools)
  local scanned, total = 0, #list
  local function satisfied()
    if #w >= total then return true end
    if when == "FIRST_COMPLETED" then return #w > 0 end
    if when == "FIRST_EXCEPTION" then
      for k = scanned + 1, #w do
        if w[k].err and not w[k]._cancelled then return true end
      end
      scanned = #w
    end
    return false
  end
  local ok, err = pcall(function()
    while not satisfied() do
      local left = deadline and deadline - now()
      if left and left <= 0 then break end
      turn(pools, left and math.min(left, SLICE) or SLICE)
    end
  end)
  unwatch(list, w)
  if not ok then error(err, 0) end  -- (Ctrl-C: interrupted!)
  local done, not_done = {}, {}
  for _, f in ipairs(list) do
    if f.finished then done[#done + 1] = f else not_done[#not_done + 1] = f end
  end
  return done, not_done
end
