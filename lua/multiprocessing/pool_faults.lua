-- pool_faults.lua: the Pool's rare paths, loaded by pool.lua the first time one is taken
-- (see faults there): a task function that cannot be sent (which Pool it reaches), a result
-- that cannot be sent (the worker fails those items instead), a worker that died or ran past
-- its task's timeout (what it held is lost), and messages lost on the way (find_lost). A map
-- that goes well never parses it. It reaches what it shares with pool.lua through
-- M._internals, and returns its functions.
local P = require("multiprocessing.pool")._internals  -- what pool.lua shares with this file
local core, Pool, globals, clean = P.core, P.Pool, P.globals, P.clean
local drain, lose, LOST_AFTER = P.drain, P.lose, P.LOST_AFTER
local encode, getupvalue = core.encode, debug.getupvalue

local START_TRIES = 3   -- new workers dying in a row during start-up that break the pool

-- A result message could not be put (why): its results that cannot be sent,
-- then (out of shared memory) its biggest results, fail their items instead,
-- so that the message still arrives and the worker lives on.
local function send_failed(results, seq, out, errs, n, me, busy, why)
  errs = errs or {}
  local sizes = {}
  for k = 1, n do
    if out[k] ~= nil then
      local ok, s = pcall(encode, out[k])
      if ok then sizes[k] = #s else errs[k], out[k] = (tostring(s):gsub("at value", "at the result")), nil end
    end
  end
  while true do
    local sent, e = pcall(results.put, results, { seq, out, errs, me, busy })
    if sent then return end
    why = tostring(e)
    local big, at = -1, nil
    for k, size in pairs(sizes) do
      if out[k] ~= nil and size > big then big, at = size, k end
    end
    if not at then  -- only errors left, and still no room: say so in the fewest bytes
      for k = 1, n do errs[k] = errs[k] and why end
      results:put { seq, {}, errs, me, busy }
      return
    end
    errs[at], out[at] = why, nil
  end
end

local function exit_text(code)
  if not code then return "status unknown: the host reaped it" end
  if code < 0 then return "killed by " .. core.signame(-code) end
  return "exit code " .. code
end

local function item_text(i0, n)
  if n == 1 then return ("item %d"):format(i0) end
  return ("items %d-%d"):format(i0, i0 + n - 1)
end

-- Messages in flight that have left the queue, that no live worker claims and
-- whose result has not come are lost (a take and its claim are one atomic step
-- in the queue; this guards the engine against waiting for them forever). The
-- queue numbers messages as they are put, and so do we: messages 1 .. _seq -
-- qsize have been taken. One still unheld LOST_AFTER seconds later fails.
local function find_lost(self, t)
  self._lostcheck = t
  local st, claims = self._st, {}
  local taken = self._seq - self._tasks:qsize()
  for i in pairs(self._workers) do
    local last, _, first = st:claimed(i)
    if last ~= 0 then claims[#claims + 1], claims[#claims + 2] = first, last end
  end
  -- results that came meanwhile (and their callbacks, which may send more); with results
  -- still queued (a bounded step), nothing can be judged lost yet
  if not drain(self) then return end
  local prev, suspects, lost = self._suspects, {}, nil
  for seq in pairs(self._inflight) do
    local held = seq > taken
    for k = 1, #claims, 2 do
      if seq >= claims[k] and seq <= claims[k + 1] then held = true break end
    end
    if not held then
      local since = prev and prev[seq] or t
      suspects[seq] = since
      if t - since >= LOST_AFTER then lost = lost or {} lost[#lost + 1] = seq end
    end
  end
  self._suspects = next(suspects) and suspects or nil
  if lost then
    table.sort(lost)
    for _, seq in ipairs(lost) do
      lose(self, seq, function(call, i0, n)
        return ("%s: the task message of %s was lost (no worker holds it)"):format(call.kind, item_text(i0, n))
      end)
    end
  end
end

-- After a function failed to encode: the path to a Pool it reaches through its
-- upvalues and tables, if any (a Pool holds a value the codec refuses, _nosend).
local function find_pool(f)
  -- the globals and modules travel by name (docs/codec.md): a Pool in them is not sent
  local seen, budget = { [globals] = true }, 100000
  for _, m in pairs(package.loaded) do seen[m] = true end
  local function walk(v, path)
    budget = budget - 1
    if budget < 0 or seen[v] then return nil end
    seen[v] = true
    if type(v) == "function" then
      for i = 1, math.huge do
        local name, u = getupvalue(v, i)
        if name == nil then break end
        local t = type(u)
        if t == "table" or t == "function" then
          local found = walk(u, ("%s<upvalue %s>"):format(path, name))
          if found then return found end
        end
      end
    elseif getmetatable(v) == Pool then
      return path
    else
      for k, u in next, v do
        local t = type(u)
        if t == "table" or t == "function" then
          local found = walk(u, path .. (type(k) == "string" and k:match("^[%a_][%w_]*$") and "." .. k or "[" .. tostring(k) .. "]"))
          if found then return found end
        end
      end
    end
  end
  return walk(f, "at the function")
end

-- the error of a function that cannot be sent, as the user should read it
local function func_error(self, f, err)
  err = clean(tostring(err)):gsub("at function", "at the function")
  local where = find_pool(f)
  if where then return ("cannot send a Pool (%s): a Pool can only be used by the process that made it"):format(where) end
  return err
end

-- Worker w died with exit code `code` (false: unknown) holding messages first .. last
-- (none when last is 0): the first was running, the others waiting. (check_workers
-- drops it and replaces it.)
local function worker_died(self, w, code, first, last)
  for seq = first, last do
    lose(self, seq, function(call, i0, n)
      return ("%s: worker pid %d died (%s) %s %s"):format(call.kind, w.pid, exit_text(code),
        seq == first and "while running" or "before running", item_text(i0, n))
    end)
  end
  if not w.ready and code ~= 0 then
    -- it died before it was ready. One death is a death (a kill from outside): it is
    -- replaced. START_TRIES in a row, with no worker ready between, is a start-up
    -- that cannot succeed (an initializer that exits): the pool breaks instead of
    -- respawning forever. An initializer that raises breaks it at once (on_result).
    self._startfails = self._startfails + 1
    if self._startfails >= START_TRIES and not self._broken then
      self._broken = ("%d new workers in a row died during start-up, the last (pid %d) %s"):format(
        self._startfails, w.pid, w.late or exit_text(code))
    end
  end
end

-- the task message `first` that worker w runs took longer than its call's timeout (limit)
local function timed_out(self, w, first, limit)
  core.kill(w.pid, 9)  -- reaped, and its other messages lost, on a next check
  lose(self, first, function(call, i0, n)
    return ("%s: task timed out after %gs (%s); worker pid %d was killed"):format(
      call.kind, limit, item_text(i0, n), w.pid)
  end)
end

return { send_failed = send_failed, find_lost = find_lost, func_error = func_error, worker_died = worker_died,
  timed_out = timed_out }
