-- chaos/lib.lua: what the chaos cases share: figures, seeded randomness, /proc scans, victims.
--
-- A case runs in its own lua5.4 process (chaos/case.lua) in its own session, under a hard
-- timeout set by the runner (chaos/run.lua). Cases that need a process to die, exit or be
-- interrupted run it as a *victim*: another lua5.4 in a session of its own, so that "all its
-- descendants are gone" is a question about that session. Every session a case makes is written
-- to $CHAOS_SESSIONS, so the runner can check and kill it even when the case itself was killed.
local core = require "multiprocessing.core"

local L = { core = core }

L.LUA = os.getenv("CHAOS_LUA") or "lua5.4"
L.BUILD = os.getenv("MP_BUILD") or "build"
-- what lets a child interpreter find this checkout's modules (as spec/helpers.lua's H.ENV)
L.ENV = ("LUA_PATH='./?.lua;./lua/?.lua;./lua/?/init.lua;;' LUA_CPATH='./%s/?.so;;'"):format(L.BUILD)
-- the fault bounds of issue 7 ("within 1 s"), with room for two shared, noisy cores
L.BOUND = tonumber(os.getenv("CHAOS_BOUND")) or 3

local now, sleep = core.now, core.sleep
L.now, L.sleep = now, sleep

------------------------------------------------------------------ figures

-- The figures of the running case: printed after every round as one CHAOS-FIG line,
-- so the runner still has them when the case hangs and is killed.
local figs, order = {}, {}
function L.fig(k, v)
  if figs[k] == nil then order[#order + 1] = k end
  figs[k] = v
end
function L.add(k, n) L.fig(k, (figs[k] or 0) + (n or 1)) end
function L.max(k, v) if figs[k] == nil or v > figs[k] then L.fig(k, v) end end
function L.get(k) return figs[k] end
--- the time since t0 in whole milliseconds, kept as the figure's maximum
function L.notice(k, t0)
  local ms = math.floor((now() - t0) * 1000 + 0.5)
  L.max(k, ms)
  return ms
end
--- ends a round: counts it and prints the figures
function L.round_done()
  L.add("rounds")
  L.emit()
end
function L.emit()
  local parts = {}
  for _, k in ipairs(order) do parts[#parts + 1] = k .. "=" .. tostring(figs[k]) end
  io.stdout:write("CHAOS-FIG ", table.concat(parts, " "), "\n")
  io.stdout:flush()
end

------------------------------------------------------------------ rounds, randomness, checks

L.SCALE = tonumber(os.getenv("CHAOS_ROUNDS")) or 1
--- a case's number of rounds: its default scaled by CHAOS_ROUNDS (at least 1)
function L.rounds(n) return math.max(1, math.floor(n * L.SCALE + 0.5)) end

--- seeds math.random from CHAOS_SEED and the case's name: one seed replays every case
function L.seed(name)
  local seed = tonumber(os.getenv("CHAOS_SEED")) or 1
  local h = 0
  for i = 1, #name do h = (h * 31 + name:byte(i)) % 2147483647 end
  math.randomseed(seed, h)
end

--- a random number of seconds in [a, b)
function L.uniform(a, b) return a + (b - a) * math.random() end
function L.pick(t) return t[math.random(#t)] end

--- raises a case failure (the message is what the runner prints)
function L.fail(fmt, ...)
  error(setmetatable({ msg = fmt:format(...) }, { __tostring = function(e) return e.msg end }), 2)
end
function L.check(cond, fmt, ...)
  if not cond then L.fail(fmt, ...) end
  return cond
end


------------------------------------------------------------------ /proc

--- the contents of a file, or nil
local function slurp(path)
  local f <close> = io.open(path, "rb")
  return f and f:read("a")
end
L.slurp = slurp

--- state, ppid, pgrp, session of pid, or nil when it is gone
function L.stat(pid)
  local s = slurp(("/proc/%d/stat"):format(pid))
  if not s then return nil end
  local rest = s:match("^.*%)%s+(.*)$")
  if not rest then return nil end
  local state, ppid, pgrp, sid = rest:match("^(%S+)%s+(%-?%d+)%s+(%-?%d+)%s+(%-?%d+)")
  return { state = state, ppid = tonumber(ppid), pgrp = tonumber(pgrp), sid = tonumber(sid) }
end

--- true while pid runs (a zombie counts as gone)
function L.alive(pid)
  local st = L.stat(pid)
  return st ~= nil and st.state ~= "Z" and st.state ~= "X"
end

--- every pid on the machine (one ls: system() and popen open nothing that outlives them)
function L.all_pids()
  local f = io.popen("exec ls /proc")
  local list = {}
  for name in f:lines() do
    local pid = tonumber(name)
    if pid then list[#list + 1] = pid end
  end
  f:close()
  return list
end

--- the live (non-zombie) processes of session sid, and its zombies
function L.session(sid)
  local live, zombies = {}, {}
  for _, pid in ipairs(L.all_pids()) do
    local st = L.stat(pid)
    if st and st.sid == sid then
      if st.state == "Z" or st.state == "X" then zombies[#zombies + 1] = pid else live[#live + 1] = pid end
    end
  end
  return live, zombies
end

--- the direct children of pid (default: this process), live ones and zombies
function L.children(pid)
  pid = pid or core.getpid()
  local s = slurp(("/proc/%d/task/%d/children"):format(pid, pid)) or ""
  local live, zombies = {}, {}
  for p in s:gmatch("%d+") do
    p = tonumber(p)
    local st = L.stat(p)
    if st and (st.state == "Z" or st.state == "X") then zombies[#zombies + 1] = p
    elseif st then live[#live + 1] = p end
  end
  table.sort(live)
  return live, zombies
end

--- every live descendant of pid (walks the tree: orphans re-parented elsewhere are not seen)
function L.descendants(pid)
  local out = {}
  local function walk(p)
    for _, c in ipairs((L.children(p))) do out[#out + 1] = c walk(c) end
  end
  walk(pid or core.getpid())
  return out
end

function L.cmdline(pid)
  local s = slurp(("/proc/%d/cmdline"):format(pid)) or ""
  return (s:gsub("%z", " "):gsub("%s+$", ""))
end

--- polls pred every 10 ms for up to secs seconds; returns its last value and the time taken
function L.eventually(pred, secs)
  local t0 = now()
  local v = pred()
  while not v and now() - t0 < secs do
    sleep(0.01)
    v = pred()
  end
  return v, now() - t0
end

--- waits until no live process is left in session sid: ok, seconds, the live pids
function L.wait_session_empty(sid, secs)
  local live
  local ok, dt = L.eventually(function()
    live = L.session(sid)
    return #live == 0
  end, secs)
  return ok, dt, live
end

--- a short description of processes, for failure messages
function L.describe(pids)
  local parts = {}
  for i, p in ipairs(pids) do
    if i > 6 then parts[#parts + 1] = ("... (%d in all)"):format(#pids) break end
    local st = L.stat(p)
    parts[#parts + 1] = ("%d[%s %s]"):format(p, st and st.state or "?", L.cmdline(p):sub(1, 40))
  end
  return table.concat(parts, ", ")
end

--- SIGKILLs every process of session sid until none is left (a sure cleanup)
function L.kill_session(sid)
  for _ = 1, 50 do
    local live = L.session(sid)
    if #live == 0 then return end
    for _, p in ipairs(live) do core.kill(p, 9) end
    sleep(0.02)
  end
end

------------------------------------------------------------------ resources of this process

--- the number of open descriptors: system() rather than popen, whose pipe would be counted
--- (or not, as the child runs before or after the parent closes its copy of the write end)
function L.fd_count()
  local list = L.tmpname("fds")
  assert(os.execute(("ls /proc/%d/fd > %s"):format(core.getpid(), list)))
  local n = 0
  for _ in io.lines(list) do n = n + 1 end
  os.remove(list)
  return n
end

function L.maps_count()
  local n = 0
  for _ in io.lines("/proc/self/maps") do n = n + 1 end
  return n
end

function L.rss_kb()
  local s = slurp("/proc/self/status") or ""
  return tonumber(s:match("VmRSS:%s*(%d+)")) or 0
end

function L.arena_used() return core.arena_stats().used end

--- a snapshot of what a leak loop must give back
function L.resources()
  if core.arena_stats().size == 0 then core.Queue():close() end  -- (the arena's descriptor, kept for spawn, predates the count)
  collectgarbage() collectgarbage()
  return { fds = L.fd_count(), maps = L.maps_count(), rss = L.rss_kb(), arena = L.arena_used(),
    zombies = #select(2, L.children()) }
end

--- compares two snapshots: fds, arena and zombies exactly, mappings within a few lines
--- (malloc maps and unmaps big blocks), RSS within rss_mb.
function L.check_resources(before, after, rss_mb)
  L.fig("fds", ("%d->%d"):format(before.fds, after.fds))
  L.fig("maps", ("%d->%d"):format(before.maps, after.maps))
  L.fig("rss_kb", ("%d->%d"):format(before.rss, after.rss))
  L.fig("arena", ("%d->%d"):format(before.arena, after.arena))
  local bad = {}
  if after.fds ~= before.fds then bad[#bad + 1] = ("descriptors %d -> %d"):format(before.fds, after.fds) end
  if after.maps > before.maps + 4 then bad[#bad + 1] = ("mappings %d -> %d"):format(before.maps, after.maps) end
  if after.rss > before.rss + (rss_mb or 32) * 1024 then
    bad[#bad + 1] = ("RSS %d kB -> %d kB"):format(before.rss, after.rss)
  end
  if after.arena ~= before.arena then
    bad[#bad + 1] = ("arena use %d -> %d bytes (%+d)"):format(before.arena, after.arena, after.arena - before.arena)
  end
  if after.zombies > before.zombies then bad[#bad + 1] = ("%d zombie children"):format(after.zombies) end
  if #bad > 0 then L.fail("not back to the start: %s", table.concat(bad, "; ")) end
end

------------------------------------------------------------------ temporary files

local tmpdir = os.getenv("CHAOS_TMP") or "/tmp"
local ntmp = 0
function L.tmpname(tag)
  ntmp = ntmp + 1
  return ("%s/%s-%d-%d"):format(tmpdir, tag or "t", core.getpid(), ntmp)
end

function L.write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

--- quotes s for sh
function L.quote(s) return "'" .. tostring(s):gsub("'", [['\'']]) .. "'" end

------------------------------------------------------------------ victims

-- What every victim script starts with: its pid on the first line, line-buffered output,
-- and ready(tag) to tell the case where it is.
local PRELUDE = [[
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
io.stdout:setvbuf("line")
io.stdout:write("PID ", core.getpid(), "\n")
local function ready(tag) io.stdout:write(tag or "READY", "\n") end
]]
L.PRELUDE = PRELUDE

local function register_session(sid)
  local path = os.getenv("CHAOS_SESSIONS")
  if not path then return end
  local f = io.open(path, "a")
  if f then f:write(sid, "\n") f:close() end
end

local Victim = {}
Victim.__index = Victim
local victims = {}

--- starts `lua5.4 <args> <script>` in a session of its own, its output in files.
--- opts: code (the script, after the prelude), args (interpreter arguments, e.g. "-i"),
--- env (extra "K=V ..." text), stdin (true: keep a pipe to its stdin, for -i).
--- When code is nil the script is not run (use args, e.g. -e chunks).
function L.victim(opts)
  local v = setmetatable({ out = L.tmpname("out"), err = L.tmpname("err") }, Victim)
  local script = ""
  if opts.code then
    v.script = L.tmpname("victim") .. ".lua"
    L.write(v.script, PRELUDE .. opts.code)
    script = L.quote(v.script)
  end
  local input = "/dev/null"
  if opts.stdin then  -- a fifo, so that closing our end is not pclose (which would wait for it)
    v.fifo = L.tmpname("in")
    assert(os.execute("mkfifo " .. v.fifo))
    input = v.fifo
  end
  local cmd = ("exec env %s %s setsid %s %s %s %s < %s > %s 2> %s"):format(
    L.ENV, opts.env or "", opts.cmd or L.LUA, opts.args or "", script, opts.script_args or "", input, v.out, v.err)
  local before = {}
  for _, p in ipairs((L.children())) do before[p] = true end
  v.pipe = io.popen(cmd, "r")
  if v.fifo then v.input = assert(io.open(v.fifo, "w")) end
  -- the victim is the one new child (popen's sh execs setsid, which execs lua in place)
  local pid = L.eventually(function()
    for _, p in ipairs((L.children())) do
      if not before[p] then return p end
    end
    for _, p in ipairs(select(2, L.children())) do
      if not before[p] then return p end
    end
  end, 5)
  if not pid then L.fail("cannot start a victim: %s", cmd) end
  v.pid = pid
  -- setsid runs in place (popen's child is no group leader): the victim's pid is its session
  L.eventually(function() local st = L.stat(pid) return not st or st.sid == pid end, 5)
  v.sid = pid
  register_session(pid)
  victims[#victims + 1] = v
  return v
end

--- what the victim wrote so far
function Victim:output() return slurp(self.out) or "" end
function Victim:errors() return slurp(self.err) or "" end

--- waits until its output has a line matching pattern: the captures (or true), or fails
function Victim:wait_for(pattern, secs, what)
  local caps
  local function scan()
    for line in self:output():gmatch("[^\n]+") do
      local c = table.pack(line:match(pattern))
      if c[1] ~= nil then caps = c return true end
    end
    return false
  end
  -- (a victim that prints and exits between a scan and the exit check is scanned once more)
  local ok = L.eventually(function() return scan() or (self:exited() and (scan() or true)) end, secs or 10)
  if not ok or not caps then
    L.fail("%s: victim never printed %q (%s)%s%s", what or "victim", pattern,
      self.code and ("it exited: " .. tostring(self.code)) or "still running",
      self:errors() ~= "" and "; stderr: " or "", self:errors():sub(-400))
  end
  return table.unpack(caps, 1, caps.n)
end

--- reaps it if it ended: true when it did (self.code is its exit code, -signal if killed)
function Victim:exited()
  if self.code ~= nil then return true end
  local code = core.reap(self.pid)
  if code then self.code = code return true end
  return false
end

--- waits up to secs for it to end; returns its exit code (or nil on timeout) and the time taken
function Victim:wait_exit(secs)
  local t0 = now()
  if self.code == nil then
    local code = core.waitpid(self.pid, secs)
    if type(code) == "number" then self.code = code end
  end
  return self.code, now() - t0
end

--- sends text to its stdin (opts.stdin)
function Victim:send(text)
  self.input:write(text)
  self.input:flush()
end

--- closes its stdin: the end of its input
function Victim:close_input()
  if self.input then self.input:close() self.input = nil end
end

function Victim:signal(sig) return core.kill(self.pid, sig) end
--- signals its whole process group (what the terminal does for Ctrl-C)
function Victim:signal_group(sig) return os.execute(("kill -%d -%d 2>/dev/null"):format(sig, self.pid)) end

--- kills what is left of it and its session, reaps it, closes its pipe
function Victim:cleanup()
  if self.done then return end
  self.done = true
  L.kill_session(self.sid)
  if self.code == nil then
    core.kill(self.pid, 9)
    local code = core.waitpid(self.pid, 5)
    if type(code) == "number" then self.code = code end
  end
  self:close_input()
  if self.fifo then os.remove(self.fifo) end
  if self.pipe then pcall(self.pipe.close, self.pipe) end  -- reaped already: pclose returns at once
end

function L.cleanup_victims()
  for _, v in ipairs(victims) do pcall(v.cleanup, v) end
end

------------------------------------------------------------------ watchdog

-- A call that has no timeout of its own (an imap loop, join) is bounded by a watchdog: a process
-- (chaos/watchdog.lua) that sends this process SIGINT after secs seconds, which lua.c turns into an
-- "interrupted!" error, so the case can report the hang itself. A call that ignores Ctrl-C
-- while it waits for a stopped process (a lock holder) is freed two seconds later: the watchdog
-- continues every stopped process of the session. (If even that does not end the call, the
-- runner's hard timeout does.) The watchdog is started with io.popen, not core.fork: a fork
-- waits for the allocator's lock, which a stopped process may hold.
local Watchdog = {}
Watchdog.__index = Watchdog
L.watchdogs = {}

function L.watchdog(secs)
  local parent = core.getpid()
  local sid = L.stat(parent).sid
  local f = assert(io.popen(("exec %s chaos/watchdog.lua %.17g %d %d"):format(L.LUA, secs, parent, sid)))
  local pid = tonumber(f:read("l"))
  if not pid then f:close() error("the watchdog did not start", 2) end
  local w = setmetatable({ pid = pid, f = f, t0 = now(), secs = secs }, Watchdog)
  L.watchdogs[pid] = w
  return w
end

--- stops it; returns true if it had already fired
function Watchdog:disarm()
  if self.disarmed then return self.fired end
  self.disarmed = true
  L.watchdogs[self.pid] = nil
  self.fired = now() - self.t0 >= self.secs
  core.kill(self.pid, 9)
  self.f:close()   -- reaps it
  return self.fired
end

--- true when the error e came from a watchdog (or another Ctrl-C)
function L.interrupted(e) return tostring(e):find("interrupted", 1, true) ~= nil end

--- the live children of this process that are not watchdogs (pool workers, processes)
function L.workers()
  local out = {}
  for _, p in ipairs((L.children())) do
    if not L.watchdogs[p] then out[#out + 1] = p end
  end
  return out
end

return L
