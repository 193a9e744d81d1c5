-- multiprocessing.parallel: joblib's one-liner, `mp.Parallel{n_jobs = -1}(tasks)` where each
-- task is `mp.delayed(f)(args...)`. Tasks travel in batches whose size adapts to the measured
-- time per batch (joblib's automatic batching), over a Pool made for the call (or one the
-- user passes). See docs/parallel.md.
local core = require "multiprocessing.core"
local process = require "multiprocessing.process"
local pool_mod = require "multiprocessing.pool"

local pack, unpack = table.pack, table.unpack

local M = {}

-- Batch sizing (automatic mode). A batch should run long enough that its message costs
-- little beside it, and short enough that the workers stay balanced and the progress
-- lines move: between MIN_BATCH_TIME and MAX_BATCH_TIME seconds of measured work.
local MIN_BATCH_TIME = 0.02
local MAX_BATCH_TIME = 0.5
local MAX_BATCH = 65536
local SMOOTHING = 0.8    -- weight of the past in the smoothed batch time

------------------------------------------------------------------ delayed
local Delayed = core.register_metatable("multiprocessing.Delayed", { __name = "multiprocessing.Delayed" })

local function callable(f)
  if type(f) == "function" then return true end
  local mt = getmetatable(f)
  return type(mt) == "table" and mt.__call ~= nil
end

-- mp.delayed(f)(...) -> a task: f and its arguments, to be called later by Parallel.
function M.delayed(f)
  if not callable(f) then
    error(("bad argument #1 to 'delayed' (function expected, got %s)"):format(type(f)), 2)
  end
  return function(...)
    return setmetatable({ f = f, args = pack(...) }, Delayed)
  end
end

Delayed.__tostring = function(d) return ("delayed(%s)(%d arguments)"):format(tostring(d.f), d.args.n) end

------------------------------------------------------------------ the worker's side
-- Runs one batch in a worker: `fns` the batch's distinct functions, `calls[k]` = { fn index,
-- args... , n = }. Returns the values (first value of each call) and the batch's time; a call
-- that raised stops the batch: its TaskError (call "Parallel", item = the task's index).
local function run_batch(fns, calls, first)
  local t0 = core.now()
  local capture = process._capture
  local out = { n = calls.n }
  for k = 1, calls.n do
    local c = calls[k]
    local ok, v = xpcall(fns[c[1]], capture, unpack(c, 2, c.n))
    if not ok then
      v.call, v.item = "Parallel", first + k - 1
      out.failed, out.err, out.time = k, v, core.now() - t0   -- the values before it travel too
      return out
    end
    out[k] = v
  end
  out.time = core.now() - t0
  return out
end
M._run_batch = run_batch

------------------------------------------------------------------ options
local OPTIONS = {
  n_jobs = true, batch_size = true, verbose = true, return_as = true, pre_dispatch = true,
  timeout = true, pool = true,
}
local RETURN_AS = { list = true, generator = true, generator_unordered = true }

local function opt_error(fmt, ...) error("bad options to 'Parallel' (" .. fmt:format(...) .. ")", 3) end

local function is_integer(v) return math.type(v) == "integer" or (type(v) == "number" and v == math.floor(v) and v == v) end

local function check_options(o)
  if o == nil then o = {} end
  if type(o) ~= "table" then error(("bad argument #1 to 'Parallel' (table expected, got %s)"):format(type(o)), 3) end
  for k in pairs(o) do
    if not OPTIONS[k] then opt_error("unknown option %s", tostring(k)) end
  end
  local n = o.n_jobs
  local cpus = core.cpu_count()
  if o.pool ~= nil then
    local mt = getmetatable(o.pool)
    if type(mt) ~= "table" or mt.__name ~= "multiprocessing.Pool" then
      opt_error("pool must be a Pool, got %s", type(o.pool))
    end
    n = n or o.pool._n
  elseif n == nil then
    n = 1                       -- joblib's default: sequential
  elseif not is_integer(n) or n == 0 then
    opt_error("n_jobs must be a non-zero integer, got %s", tostring(n))
  elseif n < 0 then
    n = math.max(1, cpus + 1 + math.tointeger(n))   -- -1: all cores, -2: all but one...
  end
  local bs = o.batch_size
  if bs == nil then bs = "auto" end
  if bs ~= "auto" and (not is_integer(bs) or bs < 1) then
    opt_error("batch_size must be \"auto\" or a positive integer, got %s", tostring(bs))
  end
  local v = o.verbose or 0
  if type(v) ~= "number" or v ~= v then opt_error("verbose must be a number, got %s", tostring(v)) end
  local ra = o.return_as or "list"
  if not RETURN_AS[ra] then
    opt_error("return_as must be \"list\", \"generator\" or \"generator_unordered\", got %s", tostring(ra))
  end
  local pd = o.pre_dispatch
  if pd ~= nil and (not is_integer(pd) or pd < 1) then
    opt_error("pre_dispatch must be a positive integer (batches in flight), got %s", tostring(pd))
  end
  local t = o.timeout
  if t ~= nil and (type(t) ~= "number" or not (t > 0)) then
    opt_error("timeout must be a positive number, got %s", tostring(t))
  end
  return {
    n_jobs = math.tointeger(n), batch_size = bs, verbose = v, return_as = ra,
    pre_dispatch = pd and math.tointeger(pd) or 2 * math.tointeger(n), timeout = t, pool = o.pool,
  }
end

------------------------------------------------------------------ progress lines
-- joblib's lines on stderr: at 1, 2, 4, 8... tasks done (every batch with verbose >= 10),
-- and when finished.
local function reporter(opts, t0)
  local v = opts.verbose
  if v <= 0 then return function() end end
  local head = ("[Parallel(n_jobs=%d)]: "):format(opts.n_jobs)
  io.stderr:write(head, ("Using %s with %d concurrent workers.\n"):format(
    opts.n_jobs == 1 and "the calling process" or "a Pool", opts.n_jobs))
  local next_at = 1
  return function(done, total, finished)
    if not finished and v < 10 and done < next_at then return end
    while next_at <= done do next_at = next_at * 2 end
    local elapsed = core.now() - t0
    if finished then
      io.stderr:write(head, ("Done %4d out of %4d | elapsed: %8.3fs finished\n"):format(done, total, elapsed))
    else
      io.stderr:write(head, ("Done %4d tasks      | elapsed: %8.3fs\n"):format(done, elapsed))
    end
  end
end

------------------------------------------------------------------ the task source
-- Tasks come from a sequence (its `n` honoured) or an iterator function. Returns
-- next_task() -> index, Delayed (nil at the end) and the count if known.
local function task_source(tasks)
  local function check(i, d)
    if getmetatable(d) ~= Delayed then
      error(("bad task %d to 'Parallel' (mp.delayed(f)(...) expected, got %s)"):format(i, type(d)), 0)
    end
    return i, d
  end
  local i = 0
  if type(tasks) == "table" and not callable(tasks) then
    local n = tasks.n or #tasks
    if n == 0 and next(tasks) ~= nil then
      error("bad argument #1 to 'Parallel' (the table has no sequence part; pass a list of mp.delayed calls)", 3)
    end
    return function()
      if i >= n then return nil end
      i = i + 1
      return check(i, tasks[i])
    end, n
  elseif callable(tasks) then
    local done = false
    return function()
      if done then return nil end
      local ok, d = pcall(tasks)
      if not ok then
        done = true
        if process._interrupt_of(d) then error(d, 0) end  -- Ctrl-C: the program's, not the iterator's
        error(("Parallel: the task iterator raised at task %d: %s"):format(i + 1, tostring(d)), 0)
      end
      if d == nil then done = true return nil end
      i = i + 1
      return check(i, d)
    end, nil
  end
  error(("bad argument #1 to 'Parallel' (table or iterator function expected, got %s)"):format(type(tasks)), 3)
end

------------------------------------------------------------------ sequential (n_jobs = 1)
local function run_sequential(opts, next_task, total)
  local t0 = core.now()
  local report = reporter(opts, t0)
  local capture = process._capture
  local function step()
    local i, d = next_task()
    if not i then return nil end
    local ok, v = xpcall(d.f, capture, unpack(d.args, 1, d.args.n))
    if not ok then v.call, v.item, v.pid = "Parallel", i, core.getpid() error(v, 0) end
    report(i, total)
    return i, v
  end
  if opts.return_as == "list" then
    local out, n = {}, 0
    for i, v in step do out[i], n = v, i end
    out.n = n
    report(n, n, true)
    return out
  end
  return step
end

------------------------------------------------------------------ parallel
-- The dispatcher: keeps up to pre_dispatch batches in flight, sizes the next batch from
-- the smoothed time of the finished ones, and hands results over in order (or as they come).
local function run_pool(opts, next_task, total)
  local own = opts.pool == nil
  local pool = opts.pool or pool_mod.Pool(opts.n_jobs)
  local t0 = core.now()
  local report = reporter(opts, t0)
  local fixed = opts.batch_size ~= "auto" and opts.batch_size or nil
  local size = fixed or 1
  local smoothed           -- smoothed time of a batch of the current size
  local cap = MAX_BATCH
  if opts.timeout and not fixed then cap = 1 end      -- the timeout is per message
  if total then cap = math.min(cap, math.max(1, math.ceil(total / (4 * opts.n_jobs)))) end

  local batches = {}       -- by number: { first =, count =, r = AsyncResult, out = result or nil }
  local nsent, nread = 0, 0    -- batches dispatched; batches handed over
  local unfinished = {}        -- the batches sent whose callback has not run: batch -> true
  local inflight = 0
  local input_done = false
  local ready = {}          -- batch numbers finished, not yet handed over (unordered mode)
  local done_tasks = 0
  local failure             -- the first error seen (raised to the caller)
  local closed = false
  local ordered = opts.return_as ~= "generator_unordered"

  local function finish_batch(b, out)
    if b.out then return end
    b.out = out
    unfinished[b] = nil
    inflight = inflight - 1
    if out.failed == nil then
      done_tasks = done_tasks + b.count
      if not fixed and b.count == size and out.time then
        smoothed = smoothed and SMOOTHING * smoothed + (1 - SMOOTHING) * out.time or out.time
        if smoothed < MIN_BATCH_TIME then
          local ideal = smoothed > 0 and math.floor(size * MIN_BATCH_TIME / smoothed) * 2 or 2 * size
          local new = math.max(1, math.min(2 * size, ideal, cap))
          if new ~= size then size, smoothed = new, nil end
        elseif smoothed > MAX_BATCH_TIME and size >= 2 then
          size, smoothed = math.max(1, math.floor(size * MAX_BATCH_TIME / smoothed)), nil
        end
      end
      report(done_tasks, total)
    end
    if not ordered then ready[#ready + 1] = b.num end
  end

  local function dispatch()
    while not input_done and not failure and inflight < opts.pre_dispatch do
      local fns, index = {}, {}
      local calls = { n = 0 }
      local first
      for _ = 1, size do
        local ok, i, d = pcall(next_task)
        if not ok and process._interrupt_of(i) then error(i, 0) end  -- Ctrl-C: at once (see fail)
        if not ok then failure = i input_done = true break end
        if not i then input_done = true break end
        first = first or i
        local fi = index[d.f]
        if not fi then fi = #fns + 1; fns[fi], index[d.f] = d.f, fi end
        local a = d.args
        local c = { fi, n = a.n + 1 }
        for k = 1, a.n do c[k + 1] = a[k] end
        calls.n = calls.n + 1
        calls[calls.n] = c
      end
      if calls.n == 0 then break end
      nsent = nsent + 1
      local b = { num = nsent, first = first, count = calls.n }
      batches[nsent] = b
      inflight = inflight + 1
      local ok, r = pcall(pool.apply_async, pool, run_batch, { fns, calls, first }, {
        timeout = opts.timeout,
        callback = function(out) finish_batch(b, out) end,
        error_callback = function(e) finish_batch(b, { failed = 1, err = e }) end,
      })
      if not ok then
        inflight = inflight - 1
        batches[nsent] = nil
        nsent = nsent - 1
        failure = ("Parallel: tasks %d-%d cannot be sent: %s"):format(first, first + calls.n - 1, tostring(r))
        input_done = true
        break
      end
      b.r = r
      if not b.out then unfinished[b] = true end
    end
  end

  local function shut(abort)
    if closed then return end
    closed = true
    if own then
      if abort then pool:terminate() else pool:close() pool:join() end
    end
  end

  local function fail(e)
    shut(true)
    error(e, 0)
  end

  -- waits until batch b (or, with b nil, any batch) has finished
  local function wait_for(b)
    while true do
      if b and b.out then return end
      if not b and #ready > 0 then return end
      -- the unfinished batches: the first of them to finish ends the wait (its callback has
      -- run), so a worker that is done gets its next batch at once, whichever batch it ran
      local open, rs = {}, {}
      -- (a set, not a scan from the oldest held batch: behind a long one, that scan grew with
      -- every batch sent since)
      for x in pairs(unfinished) do open[#open + 1] = x end
      if not open[1] then return end
      table.sort(open, function(x, y) return x.num < y.num end)  -- (faults are taken in order)
      for k, x in ipairs(open) do rs[k] = x.r end
      local ok, e = pcall(pool_mod.wait, rs, { timeout = 0.05, return_when = "FIRST_COMPLETED" })
      if not ok then fail(e) end
      for _, x in ipairs(open) do
        if not x.out and x.r.finished then
          -- the call ended without its callback (a fault): take its error
          local ok2, v = pcall(x.r.get, x.r, 0)
          if ok2 then finish_batch(x, v) else finish_batch(x, { failed = 1, err = v }) end
        end
      end
      dispatch()
    end
  end

  local pending = {}        -- values of the batch being handed over: { i, v }...
  local pi = 1
  local function take_batch(b)
    batches[b.num] = nil
    local out = b.out
    if out.failed then
      -- the values before the failure are handed over first (as the pool's imap does)
      local vals = {}
      for k = 1, (out.failed or 1) - 1 do vals[#vals + 1] = { b.first + k - 1, out[k] } end
      vals[#vals + 1] = { err = out.err }
      return vals
    end
    local vals = {}
    for k = 1, b.count do vals[k] = { b.first + k - 1, out[k] } end
    return vals
  end

  local function step()
    while true do
      if pi <= #pending then
        local p = pending[pi]
        pi = pi + 1
        if p.err ~= nil then fail(p.err) end
        return p[1], p[2]
      end
      if failure then fail(failure) end
      dispatch()
      if failure and inflight == 0 then fail(failure) end
      local b
      if ordered then
        b = batches[nread + 1]
        if not b then
          if input_done then
            report(done_tasks, done_tasks, true)
            shut(false)
            return nil
          end
        else
          wait_for(b)
          nread = nread + 1
        end
      else
        if nread == nsent and input_done then
          report(done_tasks, done_tasks, true)
          shut(false)
          return nil
        end
        wait_for(nil)
        local num = table.remove(ready, 1)
        if num then b = batches[num] nread = nread + 1 end
      end
      if b then pending, pi = take_batch(b), 1 end
    end
  end

  local ok0, e0 = pcall(dispatch)
  if not ok0 then fail(e0) end
  if opts.return_as == "list" then
    local out, n = {}, 0
    local ok, e = pcall(function()
      for i, v in step do out[i] = v if i > n then n = i end end
    end)
    if not ok then shut(true) error(e, 0) end
    out.n = n
    return out
  end
  -- a generator: the 4th value closes it (a `break` abandons the call)
  local closer = setmetatable({}, { __close = function() shut(true) end })
  return step, nil, nil, closer
end

------------------------------------------------------------------ Parallel
local Parallel = { __name = "multiprocessing.Parallel" }
Parallel.__index = Parallel

function M.Parallel(o)
  return setmetatable({ _opts = check_options(o) }, Parallel)
end

-- par(tasks) -> results (a list with n) or, with return_as = "generator"..., an iterator of i, v
function Parallel.__call(self, tasks)
  local next_task, total = task_source(tasks)
  local opts = self._opts
  if opts.n_jobs == 1 and not opts.pool then return run_sequential(opts, next_task, total) end
  return run_pool(opts, next_task, total)
end

Parallel.__tostring = function(self)
  return ("Parallel(n_jobs=%d)"):format(self._opts.n_jobs)
end

return M
