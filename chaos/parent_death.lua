-- chaos/parent_death.lua: the parent killed (SIGKILL, SIGTERM, SIGHUP) with pools, processes and
-- nested pools alive, or at a random instant while it makes them: every descendant must be gone
-- within the bound (issue 7: "all descendants gone within 1 s"), seen in /proc by session.
local L = require "chaos.lib"
local sleep, now = L.sleep, L.now

-- a parent with a busy pool, a pool made in a pool task, a pool made in a Process, a plain
-- Process: 1 + 3 + 2 + 1 + 2 + 1 = 10 processes once all are up; then it waits in the pool
local FAMILY = [[
local function nap(x) core.sleep(60) return x end
local p = mp.Pool(3)
local busy = p:map_async(nap, { 1, 2 }, 1)
local nested = p:apply_async(function() local q = mp.Pool(2) return q:map(nap, { 1, 2 }, 1) end)
local pr = mp.Process { target = function() local q = mp.Pool(2) q:map(nap, { 1, 2 }, 1) end }:start()
local pr2 = mp.Process { target = function() core.sleep(60) end }:start()
ready()
busy:get()
]]
local FAMILY_SIZE = 10

local function parent_dies(sig, signame, random_instant)
  return function()
    L.fig("rounds", 0)
    for round = 1, L.rounds(random_instant and 6 or 2) do
      local v = L.victim { code = FAMILY }
      if random_instant then
        sleep(L.uniform(0, 0.4))  -- anywhere in its start-up, while it forks
      else
        v:wait_for("^READY$", 15, "start-up")
        local n
        local up = L.eventually(function() n = #L.session(v.sid) return n >= FAMILY_SIZE end, 10)
        L.check(up, "round %d: only %d of the %d processes came up", round, n, FAMILY_SIZE)
        L.max("processes", n)
        sleep(L.uniform(0, 0.2))
      end
      local t0 = now()
      v:signal(sig)
      local code = v:wait_exit(L.BOUND)
      L.check(code ~= nil, "round %d: the parent did not die of %s", round, signame)
      local empty, dt, live = L.wait_session_empty(v.sid, L.BOUND)
      L.check(empty, "round %d: %d s after the parent's %s, left: %s", round, L.BOUND, signame, L.describe(live))
      L.max("gone_ms", math.floor((now() - t0) * 1000 + 0.5))
      v:cleanup()
      L.round_done()
    end
  end
end

return {
  { name = "parent_sigkill", timeout = 60, run = parent_dies(9, "SIGKILL") },
  { name = "parent_sigterm", timeout = 60, run = parent_dies(15, "SIGTERM") },
  { name = "parent_sighup", timeout = 60, run = parent_dies(1, "SIGHUP") },
  { name = "parent_sigkill_startup", timeout = 60, run = parent_dies(9, "SIGKILL", true) },
}
