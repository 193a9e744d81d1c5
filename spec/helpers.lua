-- helpers.lua: what the specs share: leak checks (children, descriptors), forking, polling, shell runs.
local core = require "multiprocessing.core"

local H = {}

H.LUA = "lua5.4"
-- the environment that lets a child interpreter find this checkout's modules
H.ENV = ([[LUA_PATH='./lua/?.lua;./lua/?/init.lua;;' LUA_CPATH='./%s/?.so;;']]):format(os.getenv("MP_BUILD") or "build")

local function slurp(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end
H.slurp = slurp

--- the pids of this process's children (read from /proc without forking), sorted
function H.children(pid)
  pid = pid or core.getpid()
  local s = slurp(("/proc/%d/task/%d/children"):format(pid, pid)) or ""
  local list = {}
  for p in s:gmatch("%d+") do list[#list + 1] = tonumber(p) end
  table.sort(list)
  return list
end

--- the number of open descriptors of this process. os.execute rather than io.popen:
--- system() opens nothing in the caller, so the count is exact.
local tmp = os.tmpname()
function H.fd_count()
  assert(os.execute(("ls /proc/%d/fd > %s"):format(core.getpid(), tmp)))
  local n = 0
  for _ in io.lines(tmp) do n = n + 1 end
  return n
end

--- pid's state letter in /proc (R, S, T, Z...), or nil when it is gone
function H.state(pid)
  local s = slurp(("/proc/%d/stat"):format(pid))
  return s and s:match("^%d+ %b() (%a)")
end

--- true while pid exists and is not a zombie
function H.alive(pid)
  local state = H.state(pid)
  return state ~= nil and state ~= "Z" and state ~= "X"
end

--- polls pred every 20 ms for up to `patience` seconds; returns its last value
function H.eventually(pred, patience)
  local deadline = core.now() + (patience or 5)
  local v = pred()
  while not v and core.now() < deadline do
    core.sleep(0.02)
    v = pred()
  end
  return v
end

--- runs fn in a forked child that always leaves with core._exit: 0 if fn returned, 1 if it raised
function H.spawn(fn)
  local pid = core.fork()
  if pid == 0 then
    local ok, err = pcall(fn)
    if not ok then io.stderr:write("child: ", tostring(err), "\n") end
    core._exit(ok and 0 or 1)
  end
  return pid
end

--- stops pid (SIGSTOP) where it is, but not inside the arena's allocator: a process stopped
--- holding its lock holds every fork (a spec's own checks too) until it goes on, as documented;
--- then it is let go on a moment and stopped again. Returns once it is stopped (or gone).
function H.stop_outside_allocator(pid)
  for _ = 1, 200 do
    core.kill(pid, 19)
    assert(H.eventually(function() local s = H.state(pid) return s == nil or s == "T" or s == "Z" end, 10),
      "the process did not stop")
    if core._arena_holder() ~= pid then return end
    core.kill(pid, 18)
    core.sleep(0.0005)
  end
  error("the process was always stopped inside the allocator", 2)
end

--- a child that stops itself (SIGSTOP) holding the arena allocator's lock in the middle of a
--- change (core._arena_fault), as a debugger may leave one: its pid, and whether it stopped
--- within `patience` seconds. Continued (SIGCONT), it finishes and exits 0.
function H.stopped_arena_holder(patience)
  local pid = H.spawn(function()
    core._arena_fault(1, "stop")
    core.blob_free(core.blob_new("held"))
  end)
  return pid, H.eventually(function() return H.state(pid) == "T" end, patience or 20)
end

--- a fresh temporary file name (removed by H.cleanup)
local temps = {}
function H.tmpname()
  local name = os.tmpname()
  temps[#temps + 1] = name
  return name
end
function H.cleanup()
  for _, name in ipairs(temps) do os.remove(name) end
  temps = {}
end

--- the error that fn(...) raises, as a string (raises itself if fn returns)
function H.error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  if ok then error("expected an error, got none", 2) end
  return tostring(err)
end

--- asserts that fn raises an error containing `text` (plain text, not a pattern)
function H.raises(text, fn, ...)
  local err = H.error_of(fn, ...)
  if not err:find(text, 1, true) then
    error(("expected an error containing %q, got %q"):format(text, err), 2)
  end
  return err
end

--- quotes s for sh
function H.quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

--- the leak check every spec file runs around each test: no child left, no descriptor leaked.
--- Call it as H.leak_check(before_each, after_each) (busted's hooks live in the spec's environment).
function H.leak_check(before_each, after_each)
  local assert = require "luassert"
  local fds
  before_each(function()
    if core.arena_stats().size == 0 then core.Queue():close() end  -- (the arena's descriptor, kept for spawn, predates the count)
    fds = H.fd_count()
  end)
  after_each(function()
    -- a worker being reaped is given a moment; a left-behind one is not
    H.eventually(function() return #H.children() == 0 end, 2)
    assert.are.same({}, H.children(), "child processes left behind")
    assert.equal(fds, H.fd_count(), "descriptors leaked")
    H.cleanup()
  end)
end

--- sends io.stderr (where the library reports, in this process and in the children it
--- forks) to a temporary file until the returned function is called, which gives back
--- what was written. Pass that function to finally() too, so a failing spec restores
--- stderr. A spec that expects a report checks its text instead of letting it print.
function H.capture_stderr()
  local saved, f, text = io.stderr, io.tmpfile(), nil
  io.stderr = f
  return function()
    if not text then
      io.stderr = saved
      f:seek("set")
      text = f:read("a")
      f:close()
    end
    return text
  end
end

--- Runs a Lua script in a new interpreter, under a hard timeout (default 60 s); returns ok, output.
function H.run_script(script, limit)
  local src, out = H.tmpname(), H.tmpname()
  local f = assert(io.open(src, "w")) f:write(script) f:close()
  local ok = os.execute(("%s timeout -s KILL %d %s %s > %s 2>&1"):format(H.ENV, limit or 60, H.LUA, src, out))
  return ok, H.slurp(out)
end

--- The output of a Lua script run as run_script does; an error (with that output) if it failed.
function H.script_output(script, limit)
  local ok, out = H.run_script(script, limit)
  assert(ok, "the script failed: " .. tostring(out))
  return out
end

--- Runs `script` (after `local mp = require "multiprocessing"`) in a child interpreter in a
--- session of its own; once a task calls started(), sends SIGINT to the session (Ctrl-C);
--- returns the output. A script still running `patience` seconds (default 20, 120 under
--- valgrind) later is killed and the spec fails: a hang.
function H.interrupted(script, patience)
  patience = patience or (os.getenv("MP_VALGRIND") and 120 or 20)
  local marker, src, out, pidf = H.tmpname(), H.tmpname(), H.tmpname(), H.tmpname()
  os.remove(marker)
  local f = assert(io.open(src, "w"))
  f:write(('local mp = require "multiprocessing"\n'
    .. 'local function started() local g = io.open(%q, "w") g:close() end\n'):format(marker), script)
  f:close()
  assert(os.execute(("%s setsid sh -c 'echo $$ > %s; exec %s %s' < /dev/null > %s 2>&1 &")
    :format(H.ENV, pidf, H.LUA, src, out)))
  local pid = H.eventually(function() local s = H.slurp(pidf) return s and tonumber(s:match("%d+")) end, 5)
  assert(pid, "the script did not start")
  local began = H.eventually(function() return H.slurp(marker) ~= nil end, patience)
  if began then assert(os.execute("kill -INT -" .. pid)) end
  local ended = H.eventually(function() return not H.alive(pid) end, patience)
  if not ended then os.execute("kill -KILL -" .. pid) end
  assert(began, "the task did not start: " .. tostring(H.slurp(out)))
  assert(ended, "the script hung after Ctrl-C: " .. tostring(H.slurp(out)))
  return H.slurp(out)
end


--- The arena's figures once the collector ran (what unreachable handles held is given back).
function H.arena_settle()
  collectgarbage()
  collectgarbage()
  return core.arena_stats()
end

--- Asserts that arena use comes back to s0 (H.arena_settle's figures) within `patience` seconds
--- (default 20: a killed process may take a moment to be seen), and that the arena is consistent.
function H.assert_arena_back(s0, what, patience)
  local assert = require "luassert"
  local s = H.eventually(function()
    local s = H.arena_settle()
    return s.used == s0.used and s.blocks == s0.blocks and s.deferred == s0.deferred and s
  end, patience or 20) or H.arena_settle()
  assert.are.same({ used = s0.used, blocks = s0.blocks, deferred = s0.deferred },
    { used = s.used, blocks = s.blocks, deferred = s.deferred }, what)
  assert.is_true(core.arena_check())
end

return H
