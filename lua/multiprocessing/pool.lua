-- pool.lua: Pool, its map family and the engine under every call (see docs/pool.md).
-- The calls that return before their results (apply_async, submit, map_async, imap...),
-- Future and AsyncResult, as_completed and wait are in pool_async.lua, loaded on the
-- first use of one of them (see ASYNC at the end of this file).
--
-- The parent puts task messages (a chunk of items, the call's function as a
-- shared blob) on one shared queue; workers take them, recording which message
-- they hold in the pool's shared state, and put results on a second queue.
-- Everything the parent does happens when it talks to the pool (no threads):
-- it reads results, checks its workers every SLICE seconds (death, timeouts),
-- respawns them, feeds lazy inputs and runs callbacks.
local core = require "multiprocessing.core"
-- progress.lua is loaded by the first call that needs it (a bar, an imap loop): not by Pool()
local function progress() return require "multiprocessing.progress" end
local process = require "multiprocessing.process"
local context = require "multiprocessing.context"
-- pool_faults.lua: the rare paths (a value that cannot be sent, a worker's death or timeout, a
-- lost message), loaded the first time one is taken: a map that goes well never parses it
local late_require = process._late_require
local function faults() return late_require "multiprocessing.pool_faults" end

local encode, decode, now, place = core.encode, core.decode, core.now, core.place
local put_raw, put_result, take_result, put_stop = core.put_task, core.put_result, core.take_result, core.put_stop
local flag_cas = core.flag_cas
local pack, unpack = table.pack, table.unpack
local maxinteger = math.maxinteger
local newtable, chunk_scratch = core.newtable, core.chunk_scratch
-- the xpcall handler of tasks: the raised value, intact, in a TaskError with
-- the traceback (without the frames the worker inherited at fork time)
local capture, TaskError, interrupt_of = process._capture, process._TaskError, process._interrupt_of

-- an error raised here, as the user should read it: without the places in
-- this file that it went through
local function clean(err)
  if type(err) ~= "string" then return err end
  local n
  repeat err, n = err:gsub("^[^\n]-multiprocessing/pool[%w_]*%.lua:%d+: ", "") until n == 0
  -- a Pool met in arguments: its guard (see pool_faults.lua, find_pool) is what the codec refused
  return (err:gsub("cannot send a thread %(coroutine%) at ([^\n]-)%._nosend$",
    "cannot send a Pool at %1 (a Pool can only be used by the process that made it)"))
end

local SLICE = 0.05      -- seconds between health checks while waiting
local AHEAD = 4         -- chunks in flight per worker for lazy inputs
local WINDOW_ITEMS = 1024 -- and at least this many items
local PACK = 64          -- at most this many chunks of tiny tasks in one message
local TINY, TAKE = 1e-4, 16 -- a worker takes up to TAKE messages at once after one shorter than TINY
local GC_STEP = 32 * 1024   -- kilobytes a worker allocates between its full collections
local CHUNK_TIME = 0.005 -- target seconds of work per chunk when chunksize is automatic
local BLOB_CACHE = 16    -- function blobs kept for reuse once no message needs them
local LOST_AFTER = 1     -- seconds a message may be out of the queue, unclaimed and unanswered
local START_TIMEOUT = 60  -- default start_timeout: seconds a new worker may take to be ready
-- driving from a frame loop (pool:poll, get(0), wait(0), ready()): see drive
local POLL_BUDGET = 0.001 -- seconds of pool:poll() without a budget
local STEP_RESULTS = 8   -- result messages one bounded step takes at most
local TAKE_RESULTS = 256  -- result messages one take_result call handles at most (back in Lua between)
local FEED_TIME = 0.0005 -- seconds a bounded step spends sending lazy input (at least one chunk)
local FIRST_CHUNK = 16  -- items of map_async's first chunk (automatic chunksize), before its encoding is timed
local LEAVE_WAIT = 0.005 -- seconds a turn waits for a worker that said it leaves to exit
local PUT_WAIT = SLICE  -- seconds a feed's put waits for the task queue's lock or the allocator's: a
                        -- stopped process holding one (a worker stopped taking tasks) holds back a
                        -- turn of the engine this long, then the chunk waits for the next turn
-- A worker's notes on the results queue, { NOTE, worker, pid [, error] } (no results: see note)
local READY, INIT_FAILED, LEAVING = -1, -2, -3  -- started; its initializer raised (the error);
                                                -- it leaves (maxtasksperchild), exiting now
-- what unfinished calls fail with when their pool stops
local TERMINATED, CLOSED = "the pool was terminated", "the pool was closed before the call finished"

local M = {}
local Pool = { __name = "multiprocessing.Pool" }
Pool.__index = Pool

-- Pools this process made: a worker whose task made one collects garbage after
-- it, so that a pool the task did not close is terminated (its collector is
-- otherwise stopped, see worker_main).
local made = 0

------------------------------------------------------------------ the worker

local function blob_decode(off) return decode(core.blob_get(off)) end

-- "PoolWorker-<i>", made once in the parent (see spawn): a forked worker finds
-- its name made, and writes nothing to make it
local worker_names = setmetatable({}, { __index = function(t, i)
  local name = "PoolWorker-" .. i
  t[i] = name
  return name
end })

local function worker_main(pool, i)
  core.sigint("ignore")  -- Ctrl-C is the parent's to handle
  process._become(worker_names[i], true)
  local tasks, results, st = pool._tasks, pool._results, pool._st
  local reply, reply_values = st.reply, core.reply_values
  st:forget()  -- the parent's epoll set and pidfds (pool:fileno) are not the worker's
  local me = core.getpid()
  if pool._initializer then
    local a = pool._initargs
    local ok, err = xpcall(pool._initializer, capture, unpack(a, 1, a.n or #a))
    if not ok then
      err.call = "Pool initializer"
      if not pcall(results.put, results, { INIT_FAILED, i, me, err }) then
        err.value = err.message
        results:put { INIT_FAILED, i, me, err }
      end
      core._exit(1)
    end
  end
  results:put { READY, i, me }
  local funcs, nfuncs, done = {}, 0, 0
  local maxtasks = pool._maxtasks
  local made0 = made
  -- one protected call runs a whole message; after an error it resumes past the failed item
  local F, ITEMS, OUT, N, CUR, MODE
  -- (a map chunk's loop keeps all in locals, its item number too: upvalues cost a sixth of
  -- the call per item. chunk_capture, its error handler, reads the failed item's number.)
  local function run()
    if MODE == 0 then
      local f, items, out = F, ITEMS, OUT
      for k = CUR + 1, N do out[k] = f(items[k]) end
    elseif MODE == 1 then
      local f, items, out = F, ITEMS, OUT
      for k = CUR + 1, N do local a = items[k] out[k] = f(unpack(a, 1, a.n or #a)) end
    elseif MODE == 2 then
      local f, items, out = F, ITEMS, OUT
      for k = CUR + 1, N do local a = items[k] out[k] = pack(f(unpack(a, 1, a.n or #a))) end
    elseif CUR == 0 then  -- apply, submit: ITEMS are the arguments of the one call, OUT all its values
      CUR = 1
      if MODE == 4 then OUT = pack(F(unpack(ITEMS, 1, N)))
      else OUT = pack(F(unpack(ITEMS, 1, ITEMS.n or #ITEMS))) end
    end
  end
  local SKIPPED = {}
  -- the error handler of a chunk's loop: CUR becomes the failed item's number, the
  -- loop's variable k in run's frame (always there: nothing else in run can raise)
  local getinfo, getlocal = debug.getinfo, debug.getlocal
  -- (A frame's look-up walks every level above it, so in a deep stack (a stack overflow in
  -- the task) run's frame, near the bottom, is found from the depth (found by halving) and
  -- its distance to the bottom, the same in every chunk: remembered once seen.)
  local run_depth
  local function depth()  -- the deepest level, seen from chunk_capture
    local lo, hi = 1, 2  -- (lo is a level; hi, once the loops end, is past the bottom)
    while getinfo(hi + 1, "l") do lo, hi = hi, hi * 2 end
    while hi - lo > 1 do
      local mid = (lo + hi) // 2
      if getinfo(mid + 1, "l") then lo = mid else hi = mid end
    end
    return lo
  end
  local function chunk_capture(e)
    local level  -- run's, seen from here
    for l = 2, 64 do
      local info = getinfo(l, "f")
      if not info then break end
      if info.func == run then level = l break end
    end
    if level then
      run_depth = run_depth or depth() - level
    elseif getinfo(65, "l") then
      local bottom = depth()
      local guess = run_depth and getinfo(bottom - run_depth, "f")
      if guess and guess.func == run then
        level = bottom - run_depth
      else
        for l = bottom, math.max(bottom - 64, 65), -1 do
          if getinfo(l, "f").func == run then level, run_depth = l, bottom - l break end
        end
      end
    end
    local at = CUR + 1  -- (no frame found: at least the loop moves on)
    if level then
      local j = 1
      while true do
        local name, v = getlocal(level, j)
        if not name then break end
        if name == "k" then at = v end
        j = j + 1
      end
    end
    CUR = at
    return capture(e)
  end
  -- A map chunk's results go to one table the worker reuses (see chunk_items in
  -- pool.c: fresh tables would cost page faults); only 1 .. n of it is sent.
  local outs, outs_n = nil, 0
  local function chunk_out(n)
    if n + 1 > outs_n then outs, outs_n = newtable(n + 1), n + 1 end  -- (a spare slot: see below)
    return outs
  end
  local function handle(msg, t0, idle)
    local flag = msg[7]
    if flag and not flag_cas(flag, 0, 1) then  -- its Future was cancelled: skipped, said so
      put_result(results, msg[1], me, 0, SKIPPED, 0)
      st:done(i, 0, 0, idle, 0, 0)
      return 0
    end
    local fid = msg[2]
    local f = funcs[fid]
    local n, mode = msg[4], msg[6]
    local nargs = n  -- (submit's message: its n counts the arguments of its one call)
    if mode == 4 then n = 1 end
    -- (a spare slot keeps the codec on its array fast path; an apply packs its own)
    local out, errs = mode < 3 and chunk_out(n) or nil, nil
    if not f then
      if nfuncs >= 64 then funcs, nfuncs = {}, 0 end
      local ok, g = pcall(blob_decode, msg[3])
      if ok then
        f = g
        funcs[fid], nfuncs = f, nfuncs + 1
      else  -- (a C function registered after the pool started...): every item fails with the reason
        local why = "the task function cannot be received by the worker: " .. tostring(g)
        errs = {}
        for k = 1, n do errs[k] = why end
        f = nil
      end
    end
    local t1 = now()
    F, ITEMS, N, MODE, CUR = f, msg[5], nargs, mode, 0
    OUT = out
    while f do
      local ok, e = xpcall(run, mode < 3 and chunk_capture or capture)
      if ok then break end
      errs = errs or {}
      if (MODE == 1 or MODE == 2) and type(ITEMS[CUR]) ~= "table" then  -- (only on the error path)
        e.value = ("bad item to 'starmap' (table of arguments expected, got %s)"):format(type(ITEMS[CUR]))
        e.message, e.traceback = e.value, nil
      else  -- the user's frames only
        e.traceback = e.traceback:gsub("\n[^\n]*multiprocessing/pool[%w_]*%.lua:[^\n]*", "")
      end
      errs[CUR] = e
      if out then out[CUR] = nil end
    end
    local items = n
    if mode >= 3 then  -- an apply's result message carries its values: { v1, ..., vn }
      out = OUT or {}
      if not errs then n = out.n end
    else
      chunk_scratch(ITEMS)  -- a next chunk's items go there (see chunk_items in pool.c)
      if errs then out = table.move(out, 1, n, 1, {}) end  -- (the reused table holds more)
    end
    F, ITEMS, OUT = nil, nil, nil
    local t2 = now()
    -- a result message: { seq, out, errs, pid, busy }
    local sent, why = true, nil
    if errs then
      sent, why = pcall(results.put, results, { msg[1], out, errs, me, t2 - t1 })
    else  -- the common case: a header and the results as one array
      sent, why = pcall(put_result, results, msg[1], me, t2 - t1, out, n)
    end
    if not sent then faults().send_failed(results, msg[1], out, errs, n, me, t2 - t1, why) end
    local t3 = now()
    st:done(i, items, t2 - t1, idle, t3 - t2, t1 - t0)
    return t2 - t1
  end
  -- A message of one call (apply, submit), the common case of handle without its general
  -- machinery: f runs under its own xpcall, whose values st:reply sends straight (no table
  -- per task) with the worker's done. A function not yet decoded, a cancelled Future: handle's
  -- way. A value that cannot be sent: send_failed, with the values st:reply kept.
  local function handle_call(msg, t0, idle)
    local f, flag = funcs[msg[2]], msg[7]
    if not f or (flag and not flag_cas(flag, 0, 1)) then return handle(msg, t0, idle) end
    local args, n = msg[5], msg[4]
    if msg[6] ~= 4 then n = args.n or #args end
    local seq = msg[1]
    local t1 = now()
    local sent, ok, busy, t2, e = pcall(reply, st, i, results, seq, me, t1, idle, t1 - t0,
      xpcall(f, capture, unpack(args, 1, n)))
    if sent and ok then return busy end
    if not sent then  -- (ok: why)
      t2 = now()
      busy = t2 - t1
      local out = reply_values()
      faults().send_failed(results, seq, out, nil, out.n, me, busy, ok)
    else
      if type(e) == "table" and type(e.traceback) == "string" then  -- the user's frames only
        e.traceback = e.traceback:gsub("\n[^\n]*multiprocessing/pool[%w_]*%.lua:[^\n]*", "")
      end
      local errs = { e }
      local put, why = pcall(results.put, results, { seq, {}, errs, me, busy })
      if not put then faults().send_failed(results, seq, {}, errs, 1, me, busy, why) end
    end
    st:done(i, 1, busy, idle, now() - t2, t1 - t0)
    return busy
  end
  -- Messages are taken one at a time, or several at once while the last one took
  -- under TINY seconds and enough are queued for the other workers (see get_task).
  local idle_since, busy, nw = now(), math.huge, pool._n
  -- The worker's heap is the parent's, shared copy-on-write: a collection cycle
  -- would write to every page of it (and copy them all) to mark what it inherited.
  -- So the collector waits until the worker itself has allocated GC_STEP kilobytes.
  collectgarbage("stop")
  local gc_base = collectgarbage("count")
  while true do
    local want = busy < TINY and TAKE or 1
    if maxtasks then want = math.min(want, maxtasks - done) end
    -- a task message: { seq, fid, blob, n, items, mode }; false asks the worker to stop
    local batch = pack(st:get_task(tasks, i, nil, want, nw))
    local t0 = now()
    if batch[1] == false then break end
    if batch[1] ~= nil then
      local idle = t0 - idle_since
      for b = 1, batch.n do
        local msg = batch[b]
        if msg[6] >= 3 then busy = handle_call(msg, t0, idle) else busy = handle(msg, t0, idle) end
        t0, idle = now(), 0
      end
      done = done + batch.n
      if maxtasks and done >= maxtasks then
        -- a note wakes the parent, which reaps and replaces this worker at once: unannounced,
        -- its exit was seen only at the engine's next health check (a whole SLICE away)
        pcall(results.put, results, { LEAVING, i, me })
        core._exit(0)
      end
      if made ~= made0 or collectgarbage("count") - gc_base > GC_STEP then
        made0 = made  -- a pool the task made and dropped is terminated now
        collectgarbage()
        gc_base = collectgarbage("count")
      end
      idle_since = now()
    end
  end
  core._exit(0)
end

-- A worker started by spawn or the forkserver (context.lua): its start message
-- carries what worker_main reads of its pool
function M._worker_main(pl)
  process._from_parent(pl.parent)
  local efd = core._passed_fd()  -- the pool's eventfd (pool:fileno), passed with the start
  if efd then pl.st:adopt_eventfd(efd) end
  worker_main({ _tasks = pl.tasks, _results = pl.results, _st = pl.st, _initializer = pl.initializer,
    _initargs = pl.initargs, _maxtasks = pl.maxtasks, _n = pl.n }, pl.i)
end

------------------------------------------------------------------ the parent
--
-- The life of a call. A call's input is fed as task messages (all at once, or
-- a window ahead of an imap loop); self._inflight maps each message number to
-- what it carries until its result comes or it is lost (lose). A call whose
-- input cannot be read or sent, or that its pool stops before it was fed, is
-- cut: its next item fails with the reason and ends it, so an imap loop first
-- yields what came before (as Python's does) and no call ever waits on a
-- message that was not sent. When no worker is left to deliver (terminate,
-- join, a broken pool), every message still in flight is lost (abort_all).

-- Workers are daemons: the exit handler kills them instead of waiting for them
-- (they wait for work, so a waiting exit would hang forever).
local function start_worker(self, i)
  local me = process.current_process()
  self._st:forking(true)  -- (spawn's child keeps the eventfd until exec)
  local pid, err = context._start(self._method, { module = "multiprocessing.pool", entry = "_worker_main", payload = {
    i = i, tasks = self._tasks, results = self._results, st = self._st, initializer = self._initializer,
    initargs = self._initargs, maxtasks = self._maxtasks, n = self._n, parent = { me.name, me.pid } } }, true,
    self._st:eventfd())
  self._st:forking(false)
  if not pid then error("cannot start a pool worker: " .. tostring(err), 0) end
  self._workers[i] = { pid = pid, ready = false }
  return true
end

-- respawn: a worker replaced during a call, which may have a timeout of its own; its
-- fork does not wait for a stopped process holding the allocator's lock (the fork
-- takes a process-table entry under it): spawn returns false, and the slot waits in
-- _respawns for a later turn, so get(timeout) still ends at its timeout.
local function spawn(self, i, respawn)
  self._st:release(i)
  if self._method then return start_worker(self, i) end
  local _ = worker_names[i]  -- (made here, before the fork)
  process._whoami()  -- (so is this process's `me`, the worker's parent)
  self._st:forking(true)  -- this child keeps the pool's eventfd; other children close it
  local pid, err = core.fork(true, nil, respawn and 0 or nil)
  if pid ~= 0 then self._st:forking(false) end
  if not pid and err == "timeout" then return false end
  if not pid then error("cannot start a pool worker: " .. tostring(err), 0) end
  if pid == 0 then
    local ok, e = pcall(worker_main, self, i)
    io.stderr:write("pool worker ", i, ": ", tostring(ok and "returned" or e), "\n")
    core._exit(1)
  end
  self._workers[i] = { pid = pid, ready = false }
  return true
end

-- runs a callback; its error is printed, but Ctrl-C's, which is raised (intact)
local function run_callback(fn, arg)
  local ok, err = xpcall(fn, capture, arg)
  if ok then return end
  if interrupt_of(err) then error(err.value, 0) end
  io.stderr:write("multiprocessing: error in a pool callback: ", tostring(err), "\n")
end

local function run_callbacks(later)
  for i = 1, #later do run_callback(later[i][1], later[i][2]) end
end

-- Function blobs: { fid, off, refs, cached }. refs counts the messages in flight
-- that carry it (plus one while a call may still send more); a blob is freed
-- when it is neither needed nor among the BLOB_CACHE newest.
local function blob_drop(self, b)
  b.freed = true
  self._blobs[b] = nil
  if self._bytext[b.s] == b then self._bytext[b.s] = nil end
  if b.pending then self._pending[b.s] = nil return end  -- (never made: see text_blob)
  core.blob_free(b.off)
end

local function unref(self, b)
  local r = b.refs - 1
  b.refs = r
  if r == 0 and not b.cached then blob_drop(self, b) end
end

-- makes pending blob b (see text_blob) if the allocator's lock comes within wait (default
-- PUT_WAIT); whether it did
local function make_pending(self, b, wait)
  local off = core.blob_new(b.s, b.owners, wait or PUT_WAIT)
  if not off then return false end
  self._pending[b.s] = nil
  self._nfid = self._nfid + 1
  b.fid, b.off, b.pending, b.owners, b.f = self._nfid, off, nil, nil, nil
  self._blobs[b] = true
  return true
end

local function free_blobs(self)
  for b in pairs(self._blobs) do b.freed = true core.blob_free(b.off) end
  self._blobs, self._ring, self._bytext = {}, {}, {}
  -- the Futures' cancel words (no message needs them: every one ended)
  for _, off in ipairs(self._slabs) do core.blob_free(off) end
  self._slabs, self._free, self._nfree = {}, {}, 0
end

-- the call will send no more messages: it lets go of its blob
local function fed(self, call)
  if call.feeding then
    call.feeding = false
    unref(self, call.brec)
  end
end

-- A call's callback runs at once, or, when the call finishes inside a turn of the engine,
-- after the turn (engine): a callback may use, close, join or terminate the pool, which the
-- turn must not find changed under it (it went on reading the queues terminate had closed).
-- The done callbacks of a Future (add_done_callback) follow the same rule; the waiters of
-- as_completed and wait (tables) get the record appended at once.
local function finish(self, call)
  if call.finished then return end
  call.finished = true
  if call.id then self._calls[call.id] = nil end
  if call.bar then call.bar:close() end
  local fn, v
  if call._cancelled then  -- (no callback: Python's cancelled futures run done callbacks only)
  elseif call.err then
    fn, v = call.error_callback, call.err
  elseif call.callback then
    fn, v = call.callback, call.results
    if call.n ~= nil then v = call[1] end  -- a lean call: its first value
  end
  local later = self._later
  if fn then
    if later then later[#later + 1] = { fn, v } else run_callback(fn, v) end
  end
  local cbs = call._cbs
  if cbs then
    call._cbs = false
    for k = 1, #cbs do
      local cb = cbs[k]
      if type(cb) == "table" then cb[#cb + 1] = call  -- a waiter
      elseif later then later[#later + 1] = { cb, call }
      else run_callback(cb, call) end
    end
  end
end

local function lazy(call) return call.kind == "imap" or call.kind == "unordered" end

local function fail(self, call, idx, text)
  if call.finished then return end
  local errs = call.errors
  if not errs then errs = {} call.errors = errs end
  errs[idx] = text
  if not call.err then
    call.err = text
    if not lazy(call) then
      if not call.fed_all then  -- (map_async, fed lazily: no more of its input is sent)
        call.fed_all = true
        fed(self, call)
      end
      finish(self, call)
    end
  end
end

local function settle(self, call)  -- after a chunk ends: is the call complete?
  if call.bar then call.bar:update(call.ndone) end
  if call.fed_all and call.pending == 0 and not lazy(call) then
    finish(self, call)
  end
end

-- records that items i0 .. i0+n-1 ended, for the iterators of imap and imap_unordered
local function mark_done(call, i0, n)
  if call.have then
    call.have[i0] = n
  elseif call.arrived then
    local a = call.narrived
    call.arrived[a + 1], call.arrived[a + 2] = i0, n
    call.narrived = a + 2
  end
end

-- Ends the call's input at its next item, which fails with `text`.
local function cut(self, call, text)
  if call.fed_all then return end
  local i = call.next_index
  call.next_index = i + 1
  call.fed_all = true
  call.total = i
  if call.bar then call.bar.total = i end
  fed(self, call)
  fail(self, call, i, text)
  mark_done(call, i, 1)
  call.ndone = call.ndone + 1
  settle(self, call)
end

-- the loop of an imap call was left: its results are dropped as they come
local function abandon(self, call)
  if call.finished then return end
  call.abandoned, call.finished = true, true
  self._calls[call.id] = nil
  fed(self, call)
  if call.bar then call.bar:close() end
end

-- the error of item `item` of a call of this kind, as the worker pid sent it:
-- a TaskError (the task raised), or a text (its result or function could not travel)
local function task_error(e, kind, item, pid)
  if getmetatable(e) ~= TaskError then
    e = setmetatable({ value = e, message = e, pid = pid }, TaskError)
  end
  e.call, e.item, e.pid = kind, item, pid
  return e
end

-- a lean call's message ended (its result came, or it was lost): its blob and its
-- cancel word are let go (the worker is done with the word, or dead)
local function lean_end(self, rec)
  local b = rec.brec  -- (unref, inlined: this runs for every result)
  local r = b.refs - 1
  b.refs = r
  if r == 0 and not b.cached then blob_drop(self, b) end
  local flag = rec.flag
  if flag then
    local n = self._nfree + 1
    self._free[n], self._nfree = flag, n
  end
end

-- A sequence's result table, made after the call's first chunks went out, so that the workers
-- start while the parent makes it (making 200,000 slots costs a third of a millisecond in page
-- faults). Results are only taken after this (feed sends, it never takes), unless the call was
-- cut short in feed (Ctrl-C raised in it): then on_result makes it for the chunks that were sent.
local function sized_results(call)
  local r = call.results
  if not r then r = newtable(call.total) call.results = r end
  return r
end

-- A result message: seq, out, pid, busy as take_result returns them (out is true when
-- the results were placed), or a table (other messages, and results with errors:
-- { seq, out, errs, pid, busy }). (Given the pool, take_result does the lean path below
-- itself for a record that needs nothing more: no callback, its blob still needed.)
-- whether a message of the results queue is a worker's note (READY, INIT_FAILED, LEAVING): no
-- result, so poll's counts leave it out
local function note(seq) return type(seq) == "table" and seq[1] < 0 end

local function on_result(self, seq, out, pid, busy)
  local errs
  if type(seq) == "table" then
    local msg = seq
    seq = msg[1]
    if seq == READY then
      local w = self._workers[msg[2]]
      if w and w.pid == msg[3] then w.ready, self._startfails = true, 0 end
      return
    elseif seq == LEAVING then  -- (a blocking turn waits for its exit: see pump)
      local w = self._workers[msg[2]]
      if w and w.pid == msg[3] and w.code == nil then
        local leaving = self._leaving or {}
        w.leave_at = now()
        leaving[#leaving + 1] = w
        self._leaving = leaving
      end
      return
    elseif seq == INIT_FAILED then
      local e = msg[4]
      self._broken = ("the initializer failed in a new worker (pid %d):\n%s"):format(msg[3], e.message .. "\n" .. e.traceback)
      self._initerror = e
      return
    end
    out, errs, pid, busy = msg[2], msg[3], msg[4], msg[5]
  end
  local inflight = self._inflight
  local inf = inflight[seq]
  if not inf then return end  -- a message already lost
  inflight[seq] = nil
  local call = inf.call
  if not call then  -- a lean call is its own inflight record; its values came to [1 .. n]
    lean_end(self, inf)  -- (the results with no callback take_result finished in C)
    if inf.finished then return end  -- (cancelled, or its pool stopped)
    if errs then
      local _, e = next(errs)
      inf.err = task_error(e, inf.kind, 1, pid)
      finish(self, inf)
      return
    elseif out ~= true then
      local n = out.n or #out
      place(out, n, inf, 1)
      inf.n = n
    end
    -- (finish, without the look-ups it makes for nothing: a lean record with no
    -- callback and no done callbacks only becomes finished)
    if inf.callback or inf._cbs then finish(self, inf) else inf.finished = true end
    return
  end
  unref(self, call.brec)
  call.pending = call.pending - 1
  local i0, n = inf.i0, inf.n
  if out ~= true then place(out, n, call.results or sized_results(call), i0) end  -- true: take_result placed them
  if errs then
    for k, e in pairs(errs) do
      fail(self, call, i0 + k - 1, task_error(e, call.kind, i0 + k - 1, pid))
    end
  end
  mark_done(call, i0, n)
  call.ndone = call.ndone + n
  if n > 0 then call.per_item = busy / n end
  settle(self, call)
end

-- Fails task message seq, unless its result came: why(call, i0, n) says why.
local function lose(self, seq, why)
  local inf = self._inflight[seq]
  if not inf then return end
  self._inflight[seq] = nil
  local call = inf.call
  if not call then  -- a lean call is its own record
    lean_end(self, inf)
    if not inf.finished then
      inf.err = inf.err or why(inf, 1, 1)
      finish(self, inf)
    end
    return
  end
  unref(self, call.brec)
  call.pending = call.pending - 1
  local text = why(call, inf.i0, inf.n)
  for k = 0, inf.n - 1 do fail(self, call, inf.i0 + k, text) end
  mark_done(call, inf.i0, inf.n)
  call.ndone = call.ndone + inf.n
  settle(self, call)
end

-- handles the results that came (never waits); true when it took them all. In a bounded
-- step's health check, self._bounded counts down the messages it may still take (see step).
local function drain(self)
  local inflight, results = self._inflight, self._results
  local bounded = self._bounded
  local left = bounded or maxinteger
  while true do
    if left <= 0 then return false end
    local seq, out, pid, busy, done = take_result(results, 0, inflight, left < TAKE_RESULTS and left or TAKE_RESULTS, self)
    if seq == nil then break end
    if seq then
      on_result(self, seq, out, pid, busy)
      if not note(seq) then left = left - 1 end
    end
    left = left - done
    if bounded then self._bounded = left end
  end
  return true
end

-- Lean calls (apply_async, submit) kept unsent behind a held lock (see hold in pool_async.lua)
-- fail with text, in the order they were made
local function fail_held(self, text)
  local held = self._held
  self._held = false
  core.lean_puts(self._tasks, PUT_WAIT, false)
  for k = held.first, held.last do
    local rec = held[k].rec
    rec.held = false
    unref(self, rec.brec)
    if not rec.finished then
      rec.err = text
      finish(self, rec)
    end
  end
end

-- Nobody is left to deliver: every message in flight is lost, every call that
-- may still send is cut, every call fails with `text`.
local function abort_all(self, text)
  local why = function() return text end
  local seqs = {}
  for seq in pairs(self._inflight) do seqs[#seqs + 1] = seq end
  table.sort(seqs)  -- a call's first failed item is its first in order
  for _, seq in ipairs(seqs) do lose(self, seq, why) end
  if self._held then fail_held(self, text) end
  for _, call in pairs(self._calls) do
    if not call.fed_all then cut(self, call, text) end
  end
  for _, call in pairs(self._calls) do
    if not lazy(call) and not call.finished then
      call.err = call.err or text
      finish(self, call)
    end
  end
end

-- is there work a worker must still take or finish (closing pools keep workers for it)?
local function work_left(self)
  if next(self._inflight) or self._held then return true end
  for _, call in pairs(self._calls) do
    if not call.fed_all then return true end
  end
  return false
end

-- A closing pool asks its workers to leave once its work is done: one stop
-- message each, at the end of the queue. A send that waited PUT_WAIT for a lock (a
-- stopped process holds it) leaves the rest to the next turn of the engine.
local function stop_workers(self)
  if self._stopping or work_left(self) then return end
  local left = self._stops_left
  if not left then
    left = 0
    for _ in pairs(self._workers) do left = left + 1 end
  end
  while left > 0 do
    if not put_stop(self._tasks, self, now() + PUT_WAIT) then self._stops_left = left return end
    left = left - 1
  end
  self._stops_left = nil
  self._stopping = true
end

-- Replacing dead workers: at once (respawn = "now", the default), or (respawn = "poll")
-- in a later pool:poll(), one worker per call, so that a frame that notices a death does
-- not also pay for a fork; a blocking call (get(), join()...) or a driver that finds no
-- worker left spawns the pending ones itself, so that nothing waits on a deferral.
local function spawn_worker(self, i)
  if not spawn(self, i, true) then return false end
  if self._epfd then self._st:watch_pid(i, self._workers[i].pid) end
  return true
end

local function respawn_workers(self, slots)
  local q = self._respawns or {}
  for _, i in ipairs(slots) do
    if self._respawn == "poll" or not spawn_worker(self, i) then q[#q + 1] = i end
  end
  self._respawns = q[1] and q or nil
end

-- spawns up to max pending respawns, while the pool still wants them (as check_workers)
local function spawn_pending(self, max)
  local q = self._respawns
  local state = self._state
  if self._broken or not (state == "running" or (state == "closing" and not self._stopping and work_left(self))) then
    self._respawns = nil  -- (a pool left with no worker fails its work at its next check)
    self._checked = 0
    return
  end
  while max > 0 and #q > 0 do
    if not spawn_worker(self, q[1]) then return end  -- (a stopped process holds the allocator: later)
    table.remove(q, 1)
    max = max - 1
  end
  if #q == 0 then self._respawns = nil end
end

local function stopped(pid)  -- by a signal (T) or a tracer (t)
  local f = io.open("/proc/" .. pid .. "/stat")
  local st = f and f:read("l") or ""
  if f then f:close() end
  local state = st:match("^%d+ %b() (%a)")
  return state == "T" or state == "t"
end

-- Reaps dead workers (failing what they held), enforces timeouts, replaces
-- workers while there is work for them, and fails what nobody can deliver.
-- idle: the engine waited a whole slice for nothing.
local function check_workers(self, idle)
  local t = now()
  self._checked = t
  local st = self._st
  local respawn
  for i, w in pairs(self._workers) do
    local code = w.code
    if code == nil then
      local why
      code, why = core.reap(w.pid)
      if code == nil and why then code = false end  -- reaped elsewhere (by the host): the status is gone
    end
    if code == nil and not w.ready then
      -- start_timeout: a new worker that never gets ready (an initializer that hangs, a host
      -- lock that fork copied held) is killed, and counts as a start-up death
      local born = w.born or t
      w.born = born
      if t - born > self._start_timeout and not w.late and not stopped(w.pid) then
        w.late = ("did not start within %gs (start_timeout)"):format(self._start_timeout)
        core.kill(w.pid, 9)
      end
    end
    -- (for a dead worker, claimed first completes a take it left half done)
    local last, since, first = st:claimed(i, code ~= nil and self._tasks or nil)
    -- what a dead worker sent before it died (its results, its "ready") counts: taken first
    if last == nil or (code ~= nil and not drain(self)) then
      -- the task queue's lock is held (by a stopped process?), or a bounded step left
      -- results queued: settle it later
      w.code = code
    elseif code ~= nil then
      -- it held messages first .. last (none when last is 0): those still in flight are lost,
      -- and a death before it was ready counts (pool_faults.lua); a worker that ends at its
      -- stop message (in flight no more: a stop has no result) or that held nothing is no fault
      local lost = false
      for seq = first, last do lost = lost or self._inflight[seq] ~= nil end
      if lost or (not w.ready and code ~= 0) then faults().worker_died(self, w, code, first, last) end
      self._workers[i] = nil
      if self._epfd then st:unwatch_pid(i) end
      respawn = respawn or {}
      respawn[#respawn + 1] = i
    elseif last ~= 0 then
      local inf = self._inflight[first]
      local limit = inf and (inf.call or inf).timeout
      if limit and t - since > limit then faults().timed_out(self, w, first, limit) end
    end
  end
  if respawn and not self._broken then
    -- a closing pool replaces workers (maxtasksperchild, deaths) until its work is done
    local state = self._state
    if state == "running" or (state == "closing" and not self._stopping and work_left(self)) then
      respawn_workers(self, respawn)
    end
  end
  if not next(self._workers) and not self._respawns then
    if work_left(self) then
      abort_all(self, self._broken and "the pool is broken: " .. self._broken or CLOSED)
    end
  elseif next(self._inflight) and (idle or self._suspects or t - self._lostcheck >= LOST_AFTER / 2) then
    faults().find_lost(self, t)
  end
end

-- sends items i0 .. i0+n-1 of the call: src[j0 .. j0+n-1] (the input itself, or a chunk
-- read from an iterator, then j0 is 1); returns false and the error if it cannot, or false
-- and "timeout" when the locks it needs were held for PUT_WAIT (nothing sent: try again)
local function put_task(self, call, i0, src, j0, n)
  local seq = self._seq + 1
  local b = call.brec
  -- (self._seq = seq: put_raw's, once the message is out, see pool.c)
  local ok, err, why = pcall(put_raw, self._tasks, seq, b.fid, b.off, call.star and 1 or 0, src, j0, n, self,
    now() + PUT_WAIT)
  if not ok then
    err = clean(tostring(err))
    if j0 ~= i0 then  -- name the item by its place in the whole input
      err = err:gsub("at args%[(%d+)%]", function(k) return ("at args[%d]"):format(i0 + k - j0) end)
    end
    -- (sent, then Ctrl-C raised: the call stops there; Ctrl-C before it was sent, met in an
    -- encoding that ran Lua: the program's interrupt, not the input's fault)
    if self._seq == seq or interrupt_of(err) then error(err, 0) end
    return false, err
  end
  if not err then  -- "interrupted" or "timeout": nothing sent
    if why == "interrupted" then error("interrupted!", 0) end
    return false, why
  end
  self._inflight[seq] = { call = call, i0 = i0, n = n }
  b.refs = b.refs + 1
  call.pending = call.pending + 1
  return true
end

local function chunk_size(self, call, bounded)
  local c = call.chunksize
  if c then
    -- An explicit chunksize is kept while tasks take long enough for it to
    -- matter; tasks of microseconds travel several chunks to a message (each
    -- item still gets its own result or error, in order).
    local per = call.per_item
    if per and not call.timeout then
      local pack = math.floor(CHUNK_TIME / math.max(per * c, 1e-7))
      if pack > 1 then return c * math.min(pack, PACK) end
    end
    return c
  end
  if call.total then
    local c = math.max(1, math.ceil(call.total / (self._n * 4)))
    if call.async and bounded then  -- map_async fed by a bounded step: chunks that take about
      -- FEED_TIME to encode, and (once a step timed them, see step) their results to take
      local e = call.enc_item
      if not e then return math.min(c, FIRST_CHUNK) end
      return math.min(c, math.max(1, math.floor(FEED_TIME / math.max(e, call.dec_item or 0, 1e-8))))
    end
    return c
  end
  if not call.per_item then return 1 end  -- lazy input: grow once timings come back
  return math.max(1, math.min(10000, math.floor(CHUNK_TIME / math.max(call.per_item, 1e-7))))
end

-- reads up to k items of an iterator into items; returns the count and whether it ended
local function read_chunk(nextf, items, k)
  local n = 0
  while n < k do
    local v = nextf()
    if v == nil then return n, true end
    n = n + 1
    items[n] = v
  end
  return n, false
end

-- Sends a chunk that could not be sent whole one item at a time, so that the
-- items before the one that fails still run (imap yields them first).
local function put_each(self, call, i0, src, j0, n)
  for k = 0, n - 1 do
    local ok, err = put_task(self, call, i0 + k, src, j0 + k, 1)
    if not ok then return k, err end
  end
  return n
end

-- A chunk whose put timed out (a stopped process holds a lock it needs) is kept for the next
-- turn: items read from an iterator are gone from it. Later turns of the engine feed the call.
local function hold_back(call, src, j0, n, failure)
  if src ~= call.seq_input then call.held = { src = src, j0 = j0, n = n, failure = failure } end
  call.stalled = true
end

-- Feeds the call's input: all of it, or up to the window for lazy calls (imap: items
-- ahead of the loop; map_async in bounded steps: items in flight). An input that cannot
-- be read or sent cuts the call there. With a deadline, it stops after the chunk that
-- reaches it and returns true when the window has room for more (a bounded step, see step).
local function feed(self, call, deadline)
  if call.fed_all or call.finished then return end
  -- (a function whose blob the allocator, held by a stopped process, could not make at the
  -- call: made here first, or the call waits for a later turn, as a chunk held back does)
  local b = call.brec
  if b.pending and not make_pending(self, b) then call.stalled = true return end
  if call.seq_input and call.total == 0 then call.fed_all = true end
  local more = false
  while not call.fed_all do
    local k = chunk_size(self, call, deadline ~= nil)
    -- (map_async's window holds in bounded steps only: a blocking wait feeds it all)
    if call.window and (deadline or not call.async)
      and call.next_index - 1 - (call.async and call.ndone or call.consumed) >= math.max(call.window * k, WINDOW_ITEMS) then
      more = false
      break
    end
    if more then break end
    local i0 = call.next_index
    local src, j0, n, failure = call.seq_input, i0, nil, nil
    local held = call.held
    if held then
      src, j0, n, failure, call.held = held.src, held.j0, held.n, held.failure, nil
    elseif src then
      n = math.min(call.total, i0 + k - 1) - i0 + 1
    else
      src, j0 = {}, 1
      local ok, got, ended = pcall(read_chunk, call.iter, src, k)
      if ok then
        n, call.exhausted = got, ended
      elseif interrupt_of(got) then  -- Ctrl-C while the iterator ran
        error(got, 0)
      else
        n = #src
        failure = ("%s: the input iterator raised at item %d: %s"):format(call.kind, i0 + n, tostring(clean(got)))
      end
    end
    if n > 0 then
      local t0 = call.async and now()
      local ok, err = put_task(self, call, i0, src, j0, n)
      if t0 and ok then call.enc_item = (now() - t0) / n end
      if err == "timeout" then hold_back(call, src, j0, n, failure) break end
      call.stalled = nil
      if not ok then
        local sent = 0
        if n > 1 and lazy(call) then sent, err = put_each(self, call, i0, src, j0, n) end
        call.next_index = i0 + sent
        -- (an item sent alone met a held lock: the rest waits for a later turn, as a chunk does)
        if err == "timeout" then hold_back(call, src, j0 + sent, n - sent, failure) break end
        cut(self, call, err)
        break
      end
      call.next_index = i0 + n
    end
    if failure then cut(self, call, failure) break end
    if (call.seq_input and call.next_index > call.total) or call.exhausted then
      call.fed_all = true
      call.total = call.next_index - 1
      if call.bar then call.bar.total = call.total end
    end
    if deadline and now() >= deadline then more = true end
  end
  if call.fed_all then fed(self, call) end
  settle(self, call)
  return more and not call.fed_all
end

-- The first feed of a lazily fed call, made in the user's call (imap, map_async): an error out
-- of it (Ctrl-C in the input iterator or its encoding) abandons the call, which nobody will
-- have, as map's run_blocking does.
local function first_feed(self, call, deadline)
  local ok, err = pcall(feed, self, call, deadline)
  if not ok then
    abandon(self, call)
    error(err, 0)
  end
end

-- One turn of the engine: waits up to `wait` seconds for results.
local function pump(self, wait)
  if self._respawns then spawn_pending(self, math.huge) end  -- (a blocking wait needs its workers)
  local results = self._results
  local deadline = now() + math.min(wait or SLICE, SLICE)
  if self._leaving then deadline = math.min(deadline, now() + LEAVE_WAIT) end  -- (see below)
  local inflight = self._inflight
  -- Calls with room in their window (an imap loop consumed what came) are fed before the
  -- wait: with nothing in flight, it would wait out its whole slice for results that never come.
  if wait ~= 0 then
    for _, call in pairs(self._calls) do
      if call.window and not call.fed_all and not call.dropped and not call.stalled then feed(self, call) end
    end
  end
  local seq, out, pid, busy = take_result(results, math.max(0, deadline - now()), inflight, TAKE_RESULTS, self)
  local why = seq == nil and out
  if why == "interrupted" then return end
  while seq ~= nil do
    if seq then on_result(self, seq, out, pid, busy) end
    seq, out, pid, busy = take_result(results, 0, inflight, TAKE_RESULTS, self)
  end
  -- Workers that said they leave are waited for (they are exiting) and replaced in this turn:
  -- unannounced, an exit was seen at the next health check, a whole slice later. (A bounded
  -- step does not wait: its health check finds them, the frame loop woken by their pidfds.)
  -- (For LEAVE_WAIT at most: one still there then, slow to exit or stopped, is looked at
  -- without a wait at the next turns, which wait LEAVE_WAIT at most for results, for a SLICE
  -- after its note; then the health check deals with it.)
  local leaving = self._leaving
  if leaving then
    local still = {}
    for _, w in ipairs(leaving) do
      if w.code == nil then
        local code, lost = core.waitpid(w.pid, w.leave_seen and 0 or LEAVE_WAIT)
        w.leave_seen = true
        if code ~= nil then w.code = code
        elseif lost == "interrupted" then error("interrupted!", 0)
        elseif lost ~= "timeout" then w.code = false  -- reaped elsewhere: the status is gone
        elseif now() - w.leave_at < SLICE then still[#still + 1] = w end
        if w.code ~= nil then self._checked = -math.huge end
      end
    end
    self._leaving = still[1] and still or nil
  end
  if now() - self._checked >= SLICE or why == "timeout" then check_workers(self, why == "timeout") end
  if self._held then M._send_held(self) end
  for _, call in pairs(self._calls) do
    if call.window or call.stalled then
      if call.dropped then abandon(self, call) else feed(self, call) end
    end
  end
  if self._state == "closing" and not self._stopping then stop_workers(self) end
end

-- The engine, from a public method: a turn (pump, or `work`), then the callbacks of the
-- calls it finished. An error (Ctrl-C's "interrupted!") terminates the pool, and is raised
-- without the place in this file where it landed.
local function engine(self, wait, work)
  local outer = self._later
  local later = {}
  self._later = later
  local ok, err = pcall(work or pump, self, wait)
  self._later = outer
  if not ok then self:terminate() end
  if later[1] then
    local cb_ok, cb_err = pcall(run_callbacks, later)  -- (Ctrl-C in one: the pool ends as above)
    if not cb_ok then
      if ok then self:terminate() end
      ok, err = false, cb_err
    end
  end
  if not ok then
    if type(err) == "string" then err = err:gsub("^[^\n]-multiprocessing/pool[%w_]*%.lua:%d+: ", "") end
    error(err, 0)
  end
end

-- lvl: the level of the user's call, seen from here
local function check_usable(self, what, lvl)
  lvl = lvl or 4
  if getmetatable(self) ~= Pool then error(("bad self to '%s' (Pool expected)"):format(what), lvl) end
  if self._owner ~= core.getpid() then error("a Pool can only be used by the process that made it", lvl) end
  if self._state ~= "running" then error(("cannot %s: the pool is %s"):format(what, self._state), lvl) end
  if self._broken then error("the pool is broken: " .. self._broken, lvl) end
end

-- A function is sent once per call as a shared blob. Encoding it again for
-- every call keeps changed upvalues right; it is skipped when its upvalues are
-- only values that cannot have changed unseen (same numbers, strings,
-- booleans, C functions, the globals), as for most apply_async loops.
local getupvalue, getinfo = debug.getupvalue, debug.getinfo
local globals = _G

local function plain_upvalues(f, saved)
  local i = 1
  while true do
    local name, v = getupvalue(f, i)
    if name == nil then return saved == nil or saved.n == i - 1 end
    local t = type(v)
    if (t == "table" and v ~= globals) or (t == "function" and getinfo(v, "S").what ~= "C")
      or t == "userdata" or t == "thread" then return false end
    if saved and saved[i] ~= v then return false end
    i = i + 1
  end
end

-- puts b among the BLOB_CACHE newest blobs; the oldest leaves, and is freed unless needed
local function cache_blob(self, b)
  b.cached = true
  local ring, k = self._ring, self._ringk % BLOB_CACHE + 1
  self._ringk = k
  local old = ring[k]
  ring[k] = b
  if old and not old.freed then
    old.cached = false
    if old.refs == 0 then blob_drop(self, old) end
  end
end

-- the blob of encoded function s: the same bytes share one blob (a closure
-- made anew in an apply_async loop), which workers then decode only once. wait (lean calls:
-- PUT_WAIT): how long making it may wait for the allocator's lock (not at all while calls are
-- kept), else (a process stopped holding it) the blob is pending: a record that names no blob
-- yet, in self._pending, neither cached nor shared with map calls; send_held makes it
-- (make_pending) before it sends the kept calls that need it. It keeps f: the objects its
-- upvalues name stay alive until then.
local function text_blob(self, s, owners, f, wait)
  local b = self._bytext[s]
  if b then
    if not b.cached then cache_blob(self, b) end  -- needed again: back among the newest
    return b
  end
  local pending = self._pending
  if pending and pending[s] then return pending[s] end
  local off = core.blob_new(s, owners, wait and (self._held and 0 or wait))
  if not off then
    b = { fid = false, off = false, refs = 0, s = s, owners = owners, f = f, pending = true }
    if not pending then pending = {} self._pending = pending end
    pending[s] = b
    return b
  end
  self._nfid = self._nfid + 1
  b = { fid = self._nfid, off = off, refs = 0, s = s }  -- (it owns the objects s names)
  self._blobs[b] = true
  self._bytext[s] = b
  cache_blob(self, b)
  return b
end

-- the blob record of f when the one cached for it still holds (this never raises), else nil
local function cached_blob(self, f)
  local c = self._fcache[f]
  if c then
    local b = c.b
    -- (a closure without upvalues has nothing that may change: no look at them)
    if not b.freed and c.plain and (c.bare or plain_upvalues(f, c.ups)) then return b end
  end
end

-- the blob record of f (see blob_drop); wait: text_blob's
local function func_blob(self, f, wait)
  local b = cached_blob(self, f)
  if b then return b end
  local c = self._fcache[f]
  local s, globals, owners = core.encode_function(f, "function")  -- globals: it carries some, which may change unseen
  if c and c.s == s and not c.b.freed then return c.b end
  b = text_blob(self, s, owners, f, wait)
  if b.pending then return b end  -- (not remembered for f: made later, once)
  c = { s = s, b = b }
  if not globals and plain_upvalues(f) then
    local ups, i = {}, 1
    while true do
      local name, v = getupvalue(f, i)
      if name == nil then break end
      ups[i] = v
      i = i + 1
    end
    ups.n = i - 1
    c.plain, c.ups, c.bare = true, ups, i == 1
  end
  self._fcache[f] = c
  return b
end

local OPTIONS = { chunksize = "number", progress = "any", desc = "any", timeout = "number",
  callback = "function", error_callback = "function" }

local function key_text(k)
  return type(k) == "string" and k or "[" .. tostring(k) .. "]"
end

local function parse_opts(opts, what, lvl)
  lvl = lvl or 4
  if opts == nil then return {} end
  if type(opts) == "number" then opts = { chunksize = opts } end
  if type(opts) ~= "table" then error(("bad options to '%s' (number or table expected, got %s)"):format(what, type(opts)), lvl) end
  for k, v in pairs(opts) do
    local want = OPTIONS[k]
    if not want then error(("bad options to '%s' (unknown option %s)"):format(what, key_text(k)), lvl) end
    if want ~= "any" and type(v) ~= want then
      error(("bad option %s to '%s' (%s expected, got %s)"):format(k, what, want, type(v)), lvl)
    end
  end
  if opts.chunksize ~= nil and (math.type(opts.chunksize) ~= "integer" or opts.chunksize < 1) then
    error(("bad option chunksize to '%s' (positive integer expected)"):format(what), lvl)
  end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or not (opts.timeout > 0)) then
    error(("bad option timeout to '%s' (positive number expected)"):format(what), lvl)
  end
  return opts
end

-- the blob record of the function f of a call; a function that cannot be sent raises
-- func_error at level lvl, seen from the caller (the cached record costs no pcall); wait: text_blob's
local function call_blob(self, f, lvl, wait)
  local b = cached_blob(self, f)
  if b then return b end
  local ok
  ok, b = pcall(func_blob, self, f, wait)
  if not ok then error(faults().func_error(self, f, b), lvl + 1) end
  return b
end

local ipairs_iter = ipairs({})

local function new_call(self, kind, f, input, opts, what, lvl)
  lvl = lvl or 3  -- the user's call, seen from here
  check_usable(self, what, lvl + 1)
  if type(f) ~= "function" then error(("bad argument #1 to '%s' (function expected, got %s)"):format(what, type(f)), lvl) end
  if input == ipairs_iter or input == next then
    error(("bad argument #2 to '%s' (pass the table itself, not ipairs(t) or pairs(t))"):format(what), lvl)
  end
  opts = parse_opts(opts, what, lvl + 1)
  local call = {
    kind = kind, results = {}, errors = {}, ndone = 0, pending = 0,
    consumed = 0, next_index = 1,
    chunksize = opts.chunksize, timeout = opts.timeout,
    callback = opts.callback, error_callback = opts.error_callback,
  }
  if type(input) == "table" then
    call.seq_input, call.total = input, (input.n or #input)
    if call.total == 0 and next(input) ~= nil and input.n == nil then
      error(("bad argument #2 to '%s' (the table has no sequence part: its items must be at 1, 2, ... or counted by n)"):format(what), lvl)
    end
    -- (map's result table, sized, is made once its first chunks are sent: see sized_results)
    if not lazy(call) then call.results = call.total == 0 and {} or false end
  elseif type(input) == "function" then
    call.iter = input
  else
    error(("bad argument #2 to '%s' (table or iterator function expected, got %s)"):format(what, type(input)), lvl)
  end
  local b = call_blob(self, f, lvl, PUT_WAIT)
  b.refs = b.refs + 1  -- until the call is fed
  call.brec, call.feeding = b, true
  if opts.progress then
    call.bar = progress()._bar { total = call.total, force = opts.progress == "force", desc = opts.desc }
  end
  self._ncid = self._ncid + 1
  call.id = self._ncid
  self._calls[call.id] = call
  return call
end

-- Waits for a call to be ready; returns false on timeout (get(0) and wait(0) take
-- one bounded step instead: pool_async.lua, wait_for).
local function wait_call(self, call, timeout)
  local deadline = timeout and now() + timeout
  while not call.finished do
    local left = deadline and deadline - now()
    if left and left <= 0 then return false end
    engine(self, left or SLICE)
  end
  return true
end

local function results_of(call)
  call.results.n = call.total
  return call.results
end

--------------------------------------------------------------- public API

-- a value the codec cannot send, held by every Pool
local NOSEND = coroutine.create(function() end)
local POOL_OPTIONS = { processes = true, initializer = true, initargs = true, maxtasksperchild = true,
  start_timeout = true, start_method = true,
  respawn = true }
local RESPAWN = { now = true, poll = true }


function M.Pool(opts)
  -- the same Pool over Redis Streams (docs/distributed.md)
  if type(opts) == "table" and opts.backend ~= nil then return require("multiprocessing.stream_pool").Pool(opts) end
  local n, init, initargs, maxtasks, start_timeout, method, respawn
  if type(opts) == "table" then
    for k in pairs(opts) do
      if not POOL_OPTIONS[k] then error(("bad argument #1 to 'Pool' (unknown option %s)"):format(key_text(k)), 2) end
    end
    n, init, initargs, maxtasks = opts.processes, opts.initializer, opts.initargs, opts.maxtasksperchild
    start_timeout = opts.start_timeout
    if start_timeout ~= nil and (type(start_timeout) ~= "number" or not (start_timeout > 0)) then
      error("bad argument #1 to 'Pool' (start_timeout must be a positive number of seconds)", 2)
    end
    method = opts.start_method
    if method ~= nil then context._check(method, "Pool", 1, 2) end
    respawn = opts.respawn
    if respawn ~= nil and not RESPAWN[respawn] then
      error(("bad argument #1 to 'Pool' (respawn must be \"now\" or \"poll\", got %s)"):format(
        type(respawn) == "string" and '"' .. respawn .. '"' or tostring(respawn)), 2)
    end
    if initargs ~= nil and type(initargs) ~= "table" then
      error("bad argument #1 to 'Pool' (initargs must be a table, got " .. type(initargs) .. ")", 2)
    end
  elseif opts ~= nil and type(opts) ~= "number" then
    error("bad argument #1 to 'Pool' (number or table expected, got " .. type(opts) .. ")", 2)
  else
    n = opts
  end
  n = n or core.cpu_count()
  if math.type(n) ~= "integer" or n < 1 then error("bad argument #1 to 'Pool' (processes must be a positive integer)", 2) end
  if init ~= nil and type(init) ~= "function" then error("bad argument #1 to 'Pool' (initializer must be a function)", 2) end
  if maxtasks ~= nil and (math.type(maxtasks) ~= "integer" or maxtasks < 1) then
    error("bad argument #1 to 'Pool' (maxtasksperchild must be a positive integer)", 2)
  end
  local self = setmetatable({
    _n = n, _tasks = core.Queue(), _results = core.Queue(), _st = core.PoolState(n),
    _workers = {}, _calls = {}, _inflight = {}, _seq = 0, _ncid = 0, _nfid = 0,
    _fcache = setmetatable({}, { __mode = "k" }), _blobs = {}, _ring = {}, _ringk = 0, _bytext = {}, _state = "running",
    _slabs = {}, _free = {}, _nfree = 0,  -- Futures' cancel words
    _owner = core.getpid(), _checked = now(), _lostcheck = now(), _startfails = 0,
    _initializer = init, _initargs = initargs or {}, _maxtasks = maxtasks,
    _start_timeout = start_timeout or START_TIMEOUT,
    _method = method or context._state.method,  -- nil or "fork": forked here
    _initializer = init, _initargs = initargs or {}, _maxtasks = maxtasks, _respawn = respawn or "now",
    _nosend = NOSEND,  -- the codec refuses it: a Pool is never sent (see pool_faults.lua, find_pool)
    _broken = false,  -- (or why the pool is broken; a field of its own: tested for every task)
    _held = false,  -- (or the lean calls kept unsent, see hold in pool_async.lua)
  }, Pool)
  -- its lean puts (apply_async, submit) give up after PUT_WAIT, and send nothing while calls are kept
  core.lean_puts(self._tasks, PUT_WAIT, false)
  made = made + 1
  process._pools[self] = true  -- for active_children(), which lists pool workers too
  if self._method == "fork" then self._method = nil end
  if not self._method then
    context._warn_fork()
    core._queue_reserve(self._tasks)  -- the workers' receive buffer, made once, before the forks
  end
  for i = 1, n do spawn(self, i) end
  -- wait until every worker ran its initializer: a failing one fails the Pool. A worker
  -- stopped (SIGSTOP, a debugger) before it is ready is not waited for: nothing would end
  -- that wait; the pool starts with the others, and the stopped one joins them if continued.
  -- One not ready after start_timeout seconds fails the Pool, named.
  -- (/proc is asked only once a slice has passed: reading it costs more than a worker's start.)
  -- Without an initializer, a worker forked from a process with no other thread cannot fail to
  -- start (no lock can have been copied held): the pool is returned at once, as Python's, and
  -- its workers' starts overlap what the caller does next. They say they are ready as
  -- replacements do, through the engine, which keeps start_timeout and start-up deaths.
  local t0 = now()
  while init or self._method or not core.single_threaded() do
    local all, late, slow = true, nil, now() - t0 >= SLICE
    for i = 1, n do
      local w = self._workers[i]
      if not (w and (w.ready or slow and stopped(w.pid))) then all, late = false, late or (w and i) end
    end
    if all then break end
    if late and now() - t0 > self._start_timeout then
      local pid = self._workers[late].pid
      self:terminate()
      error(("Pool: worker %d (pid %d) did not start within %gs (start_timeout)%s"):format(late, pid,
        self._start_timeout, init and ": its initializer may hang" or "")
        .. " (a host lock held by another thread at fork? see docs/process.md, Hosts)", 2)
    end
    engine(self, SLICE)
    if self._broken then
      local why = self._broken
      local e = self._initerror
      self:terminate()
      if e then error(e, 2) end
      error("Pool initializer failed: " .. why:gsub("^the initializer failed in a new worker", "in worker"), 2)
    end
  end
  return self
end

-- map and starmap: a call cut short by an error while its input goes out or its results
-- come (Ctrl-C) is abandoned: nobody can have its results, so the rest of its input is never
-- sent, and close + join wait only for the chunks already out
local function run_blocking(self, call)
  local ok, err = pcall(function()
    feed(self, call)
    sized_results(call)
    wait_call(self, call)
  end)
  if not ok then
    abandon(self, call)
    error(err, 0)
  end
end

function Pool:map(f, iterable, opts)
  local call = new_call(self, "map", f, iterable, opts, "map")
  run_blocking(self, call)
  if call.err then error(call.err, 2) end
  return results_of(call)
end

function Pool:starmap(f, list, opts)
  local call = new_call(self, "starmap", f, list, opts, "starmap")
  call.star = true
  run_blocking(self, call)
  if call.err then error(call.err, 2) end
  return results_of(call)
end

function Pool:close()
  if self._owner ~= core.getpid() then return end
  if self._state ~= "running" then return end
  self._state = "closing"
  stop_workers(self)  -- now, or once the queued work is done
end

-- Once its workers are gone, a pool needs its queues and shared state no more:
-- they go back to the arena now, not when the Pool is collected (stats() keeps
-- working on a copy).
local function release_shared(self)
  if self._final_stats then return end
  local final = {}
  for i = 1, self._n do final[i] = self._st:info(i) end
  self._final_stats = final
  self._tasks:close()
  self._results:close()
  self._st:close()
end

local function cut_unfed(self)
  for _, call in pairs(self._calls) do
    if not call.fed_all and lazy(call) then cut(self, call, CLOSED) end  -- (map_async goes on)
  end
end
local function check_now(self) check_workers(self) end
local function interrupted() error("interrupted!", 0) end

-- Waits up to SLICE for one worker to exit, keeping its status for check_workers.
local function wait_exit(self)
  local _, w = next(self._workers)
  if w.code ~= nil then return end
  local code, why = core.waitpid(w.pid, SLICE)
  if code ~= nil then w.code = code
  elseif why == "interrupted" then engine(self, 0, interrupted)  -- terminates, raises
  elseif why ~= "timeout" then w.code = false end  -- reaped elsewhere: the status is gone
end

function Pool:join()
  if self._owner ~= core.getpid() then return end
  if self._state == "running" then error("cannot join a running pool (close or terminate it first)", 2) end
  if self._state ~= "closing" then return end
  -- lazily fed calls read no more input; what was sent is delivered
  engine(self, 0, cut_unfed)
  while (next(self._workers) or self._respawns) and self._state == "closing" do  -- (respawn = "poll": pump spawns them)
    if self._stopping and next(self._workers) then
      -- the stop messages are out: a worker's exit, not a result, ends this wait
      wait_exit(self)
      engine(self, 0)
    else
      engine(self, SLICE)
    end
    engine(self, 0, check_now)
  end
  if self._state ~= "closing" then return end  -- a callback terminated or joined it
  abort_all(self, CLOSED)
  self._state = "closed"
  free_blobs(self)
  release_shared(self)
end

function Pool:terminate()
  if self._owner ~= core.getpid() or self._state == "terminated" then return end
  self._state = "terminated"
  for _, w in pairs(self._workers) do core.kill(w.pid, 9) end
  for _, w in pairs(self._workers) do core.waitpid(w.pid) end
  self._workers = {}
  abort_all(self, TERMINATED)
  free_blobs(self)
  release_shared(self)
end

Pool.__gc = function(self)
  if rawget(self, "_owner") == core.getpid() and self._state ~= "terminated" then self:terminate() end
end

Pool.__close = function(self, err)
  if err ~= nil then self:terminate() else self:close() self:join() end
end

Pool.__tostring = function(self)
  return ("<Pool processes=%d state=%s>"):format(self._n, self._state)
end

------------------------------------------------------ the asynchronous calls
--
-- pool_async.lua holds the calls that return before their results and what waits on
-- them: most programs that map never use them, and loading them cost a third of the
-- pool's start in a fresh process. Until it is loaded, each of their names here is a
-- stand-in that loads it, then calls the real one (a tail call: errors still name the
-- user's line). pool_async.lua puts its methods in Pool, and its functions in M, in
-- place of the stand-ins; it reaches what it shares with this file through M._internals.
local ASYNC = { "apply_async", "apply", "submit", "map_async", "starmap_async", "imap", "imap_unordered",
  "poll", "fileno", "stats" }
local ASYNC_M = { "as_completed", "wait" }
local P = {
  core = core, M = M, Pool = Pool, progress = progress,
  SLICE = SLICE, AHEAD = AHEAD, PUT_WAIT = PUT_WAIT, unref = unref, make_pending = make_pending, POLL_BUDGET = POLL_BUDGET, STEP_RESULTS = STEP_RESULTS, FEED_TIME = FEED_TIME,
  clean = clean, interrupt_of = interrupt_of, engine = engine, wait_call = wait_call, results_of = results_of, check_usable = check_usable,
  parse_opts = parse_opts, key_text = key_text, new_call = new_call, feed = feed, first_feed = first_feed, sized_results = sized_results,
  call_blob = call_blob, plain_upvalues = plain_upvalues, globals = globals,
  drain = drain, lose = lose, LOST_AFTER = LOST_AFTER,
  abandon = abandon, finish = finish, run_callback = run_callback, note = note, on_result = on_result,
  check_workers = check_workers, stop_workers = stop_workers, spawn_pending = spawn_pending,
}
M._internals = P
local function load_async() late_require "multiprocessing.pool_async" end
local function stand_in(t, name)
  local f
  f = function(...)
    load_async()
    if t[name] == f then error("multiprocessing.pool_async did not define " .. name, 2) end
    return t[name](...)
  end
  t[name] = f
end
for _, name in ipairs(ASYNC) do stand_in(Pool, name) end
for _, name in ipairs(ASYNC_M) do stand_in(M, name) end

M.FIRST_COMPLETED, M.FIRST_EXCEPTION, M.ALL_COMPLETED = "FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"
M._plain_upvalues = plain_upvalues  -- (the Redis-backed Pool follows the same rule: stream_pool.lua)

return M
