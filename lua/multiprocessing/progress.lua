-- progress.lua: a tqdm-like progress bar on stderr, and mp.progress(iter [, total]).
local core = require "multiprocessing.core"

local now = core.now
local M = {}

local Bar = {}
Bar.__index = Bar

local REDRAW = 0.1  -- seconds between redraws: about ten a second at most

local function hms(t)
  if t ~= t or t == math.huge or t < 0 then return "?" end
  t = math.floor(t + 0.5)
  if t >= 3600 then return ("%d:%02d:%02d"):format(t // 3600, t % 3600 // 60, t % 60) end
  return ("%02d:%02d"):format(t // 60, t % 60)
end

local function rate_text(r)
  if r >= 1 or r == 0 then return ("%.2fit/s"):format(r) end
  return ("%.2fs/it"):format(1 / r)
end

--- Renders the bar's line for `done` items at `t` seconds elapsed (no I/O: testable).
function M.format(done, total, elapsed, desc, width)
  width = width or 20
  local rate = elapsed > 0 and done / elapsed or 0
  local head = desc and (desc .. ": ") or ""
  if total and total > 0 then
    local frac = math.min(1, done / total)
    local filled = math.floor(frac * width + 1e-9)
    local eta = rate > 0 and (total - done) / rate or math.huge
    return ("%s%3d%%|%s%s| %d/%d [%s<%s, %s]"):format(head, math.floor(frac * 100), ("#"):rep(filled),
      (" "):rep(width - filled), done, total, hms(elapsed), hms(eta), rate_text(rate))
  end
  return ("%s%d [%s, %s]"):format(head, done, hms(elapsed), rate_text(rate))
end

--- progress.bar{total = n, desc = "...", force = bool, out = file}
function M.bar(opts)
  opts = opts or {}
  local out = opts.out or io.stderr
  local show = opts.force or (out == io.stderr and core.isatty(2))
  local b = setmetatable({ total = opts.total, desc = opts.desc, out = out, show = show,
                           start = now(), last = -math.huge, done = 0 }, Bar)
  return b
end

function Bar:draw()
  if not self.show then return end
  self.out:write("\r", M.format(self.done, self.total, now() - self.start, self.desc), "\27[K")
  self.out:flush()
end

function Bar:update(done)
  self.done = done
  local t = now()
  if t - self.last >= REDRAW then
    self.last = t
    self:draw()
  end
end

function Bar:close()
  if self.closed then return end
  self.closed = true
  if self.show then self:draw() self.out:write("\n") self.out:flush() end
end
Bar.__close = Bar.close

-- Iterators that hold resources (imap's) register their closing value here,
-- keyed by the iterator function: a wrapper receives only that function (in
-- mp.progress(pool:imap(f, xs)) the call's other values are cut off), and must
-- close what it wraps when it is closed itself.
local closers = setmetatable({}, { __mode = "k" })

local function close_value(c)
  local mt = getmetatable(c)
  local close = mt and mt.__close
  if close then close(c) end
end

local PROGRESS_OPTIONS = { desc = true, force = true, out = true }

--- for v in mp.progress(iter_or_table [, total [, {desc =, force =, out =}]]) do ... end
function M.progress(iter, total, opts)
  if total ~= nil and (type(total) ~= "number" or not (total >= 0)) then
    error("bad argument #2 to 'progress' (non-negative number expected, got " ..
      (type(total) == "number" and tostring(total) or type(total)) .. ")", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("bad argument #3 to 'progress' (table expected, got " .. type(opts) .. ")", 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not PROGRESS_OPTIONS[k] then error(("bad argument #3 to 'progress' (unknown option %s)"):format(tostring(k)), 2) end
  end
  if opts.desc ~= nil and type(opts.desc) ~= "string" then
    error("bad argument #3 to 'progress' (desc must be a string, got " .. type(opts.desc) .. ")", 2)
  end
  local out = opts.out
  if out ~= nil and io.type(out) ~= "file" and not (type(out) == "table" and type(out.write) == "function") then
    error("bad argument #3 to 'progress' (out must be an open file, got " .. (io.type(out) or type(out)) .. ")", 2)
  end
  local inner
  if type(iter) == "table" then
    local t, i = iter, 0
    total = total or #t
    iter = function() i = i + 1 return t[i] end
  elseif type(iter) == "function" then
    inner = closers[iter]
  else
    error("bad argument #1 to 'progress' (table or iterator function expected, got " .. type(iter) .. ")", 2)
  end
  local bar = M.bar { total = total, desc = opts.desc, force = opts.force, out = opts.out }
  local closer = bar
  if inner then  -- closing the wrapper closes the bar and what it wraps
    closer = setmetatable({}, { __close = function() bar:close() close_value(inner) end })
  end
  local n = 0
  local function step(...)
    local v = table.pack(iter(...))
    if v[1] == nil then bar:close() return nil end
    n = n + 1
    bar:update(n)
    return table.unpack(v, 1, v.n)
  end
  if inner then closers[step] = closer end
  return step, nil, nil, closer
end

-- names starting with "_" are for the library's own use (init.lua does not export them)
return { progress = M.progress, _bar = M.bar, _format = M.format, _closers = closers }
