-- chaos/shared_memory.lua: named segments (SharedMemory) against kills and truncation: a creator
-- killed at any instant leaves nothing in /dev/shm within the bound; a segment truncated under a
-- reader makes its accesses raise, never SIGBUS; making and dropping many leaks nothing.
local L = require "chaos.lib"
local mp = require "multiprocessing"
local core = L.core
local now, sleep = L.now, L.sleep

-- the names in /dev/shm (one ls: popen's own pipe is not a leak here)
local function shm_names()
  local f = io.popen("exec ls /dev/shm")
  local set = {}
  for name in f:lines() do set[name] = true end
  f:close()
  return set
end

-- what is left in /dev/shm of a process pid: its generated names, its temporary ones, or names
-- starting with prefix (but for its untracked ones, prefix .. "u", which are listed apart)
local function left_of(pid, prefix)
  local left, untracked = {}, {}
  for name in pairs(shm_names()) do
    if name:sub(1, #prefix + 1) == prefix .. "u" then untracked[#untracked + 1] = name
    elseif name:find("^lmp_" .. pid .. "_") or name:find("^lmp_tmp_" .. pid .. "_")
       or name:sub(1, #prefix) == prefix then
      left[#left + 1] = name
    end
  end
  table.sort(left)
  return left, untracked
end

-- the victim: makes segments as fast as it can, of every kind (generated names, its own names,
-- untracked ones it unlinks itself), closing and unlinking some, with views written; prints
-- READY after the first few. Its own names start with arg[1].
local MAKER = [[
local prefix = arg[1]
local kept, n = {}, 0
while true do
  n = n + 1
  local track = n % 7 ~= 0
  local named = n % 3 == 0 or not track   -- untracked ones are named "<prefix>u<n>": its own to unlink
  local s = assert(mp.SharedMemory { create = true, size = 4096 * (1 + n % 5), track = track,
    name = named and (prefix .. (track and "" or "u") .. n) or nil })
  s:view("d")[1] = n
  if n % 7 == 0 then s:unlink() s:close()        -- untracked: its own to unlink
  elseif n % 4 == 0 then s:unlink()              -- tracked and unlinked: forgotten
  elseif n % 5 == 0 then s:close()               -- closed, not unlinked: the tracker's
  else kept[#kept + 1] = s end
  if #kept > 50 then table.remove(kept, 1):close() end
  if n == 20 then ready() end
end
]]

return {
  -- the creator killed at a random instant, SIGKILL (or SIGTERM, SIGINT to its group): every
  -- segment it made with track = true is gone within the bound (an untracked one killed before
  -- its own unlink is left, by definition: counted as untracked_left, and removed)
  { name = "shm_creator_killed", timeout = 120, run = function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(20) do
      local prefix = ("lmp_chaos_%d_%d_"):format(core.getpid(), round)
      local v = L.victim { code = MAKER, script_args = prefix }
      v:wait_for("^PID", 15, "start-up")
      v:wait_for("^READY$", 15, "start-up")
      sleep(L.uniform(0, 0.3))
      local sig = L.pick { 9, 9, 9, 15, 2 }
      if sig == 2 then v:signal_group(2) else v:signal(sig) end
      local t0 = now()
      local code = v:wait_exit(L.BOUND)
      L.check(code ~= nil, "round %d: the creator did not die of signal %d", round, sig)
      local gone, dt = L.eventually(function() return #left_of(v.pid, prefix) == 0 end, L.BOUND)
      local left, untracked = left_of(v.pid, prefix)
      for _, name in ipairs(left) do os.remove("/dev/shm/" .. name) end
      for _, name in ipairs(untracked) do os.remove("/dev/shm/" .. name) L.add("untracked_left") end
      L.check(gone, "round %d: %.1f s after signal %d to the creator, left in /dev/shm: %s", round, dt, sig,
        table.concat(left, " "))
      L.max("gone_ms", math.floor((now() - t0) * 1000 + 0.5))
      L.add("kills")
      v:cleanup()
      L.round_done()
    end
  end },

  -- a reader of a view whose segment another process truncates and regrows under it: every
  -- access gives a value or raises "truncated", the reader never dies of SIGBUS
  { name = "shm_truncated_under_reader", timeout = 120, run = function()
    local s = assert(mp.SharedMemory { create = true, size = 64 * 4096 })
    local v = L.victim { code = ([[
      local s = assert(mp.SharedMemory { name = %q })
      local d = s:view("d")
      local ok, errs = 0, 0
      ready()
      local t0 = core.now()
      while core.now() - t0 < 3 do
        for i = 1, #d, 97 do
          local good, err = pcall(function() d[i] = d[i] + 1 end)
          if good then ok = ok + 1
          elseif tostring(err):find("truncated", 1, true) then errs = errs + 1
          else error(err) end
        end
        local good, err = pcall(s.read, s, 1)
        if not good and not tostring(err):find("truncated", 1, true) then error(err) end
      end
      io.stdout:write("DONE ", ok, " ", errs, "\n")
    ]]):format(s.name) }
    v:wait_for("^READY$", 15, "start-up")
    local path = "/dev/shm/" .. s.name
    local t0 = now()
    while now() - t0 < 2.5 do
      assert(os.execute(("truncate -s %d %s"):format(math.random(0, 64) * 4096 - (math.random(0, 1) * 100), path)))
      sleep(L.uniform(0, 0.02))
      L.add("truncations")
    end
    assert(os.execute(("truncate -s %d %s"):format(64 * 4096, path)))
    local ok, errs = v:wait_for("^DONE (%d+) (%d+)$", 15, "the reader")
    local code = v:wait_exit(10)
    L.check(code == 0, "the reader exited with %s (-7: SIGBUS): %s", tostring(code), v:errors():sub(-300))
    L.fig("accesses", tonumber(ok))
    L.fig("raised", tonumber(errs))
    L.check(tonumber(errs) > 0, "no access met a truncated page (%s accesses): the case did not test anything", ok)
    v:cleanup()
    s:unlink()
    s:close()
    L.round_done()
  end },

  -- make, attach, view, close and unlink 2,000 segments (some left to the collector, some to
  -- the tracker via a forked child that exits): descriptors, mappings, /dev/shm back to the start
  { name = "shm_leak_loop", timeout = 120, run = function()
    local function body(i)
      local s = assert(mp.SharedMemory { create = true, size = 4096 * (1 + i % 4) })
      local b = assert(mp.SharedMemory { name = s.name })
      b:view("i")[1] = i
      L.check(s:view("i")[1] == i, "a value written through one handle is not seen through the other")
      if i % 50 == 0 then
        local pid = core.fork()
        if pid == 0 then
          mp.SharedMemory { create = true, size = 100 }  -- left to the child's tracker
          core._exit(0)
        end
        core.waitpid(pid)
      end
      s:unlink()
      if i % 2 == 0 then s:close() b:close() end     -- the others are collected
    end
    local n = L.rounds(2000)
    body(1)
    local before = L.resources()
    local shm_before = 0
    for _ in pairs(shm_names()) do shm_before = shm_before + 1 end
    for i = 1, n do
      body(i)
      if i % 200 == 0 then L.fig("done", i) L.emit() end
    end
    L.check_resources(before, L.resources())
    local ok = L.eventually(function()
      local k = 0
      for _ in pairs(shm_names()) do k = k + 1 end
      L.fig("dev_shm", ("%d->%d"):format(shm_before, k))
      return k <= shm_before
    end, L.BOUND)
    L.check(ok, "/dev/shm grew: %s", L.get("dev_shm"))
  end },
}
