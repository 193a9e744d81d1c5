-- chaos/run.lua: the chaos suite's runner (make chaos [CASE=name]); see docs/chaos.md.
--
-- Every case runs as `lua5.4 chaos/case.lua NAME` in a session of its own (setsid) under a hard
-- timeout (timeout -k 3), so a hang is a failure, never a stuck suite. Afterwards the runner looks
-- for anything the case left behind: a live process of its session, of a session it registered
-- in $CHAOS_SESSIONS (its victims), or any process carrying its CHAOS_TAG in its environment.
-- Those are reported as a failure and killed.
--
-- Environment: CASE (names or prefixes, comma or space separated; also argv), CHAOS_SEED,
-- CHAOS_ROUNDS (multiplies every case's rounds), CHAOS_KNOWN (the expected-failure list,
-- default chaos/known_failures; CHAOS_KNOWN=none ignores it), MP_BUILD, CHAOS_LUA.
local L = require "chaos.lib"
local core = L.core

local LUA = L.LUA
local BUILD = L.BUILD
local scale = L.SCALE
local seed = tonumber(os.getenv("CHAOS_SEED")) or (os.time() % 1000000)

------------------------------------------------------------------ the cases

local cases = {}
for _, family in ipairs(require "chaos.cases") do
  for _, c in ipairs(require("chaos." .. family)) do
    c.family = family
    cases[#cases + 1] = c
  end
end

local wanted = {}
for _, a in ipairs(arg) do wanted[#wanted + 1] = a end
for w in (os.getenv("CASE") or ""):gmatch("[^,%s]+") do wanted[#wanted + 1] = w end

local selected = {}
if #wanted == 0 then
  selected = cases
else
  for _, w in ipairs(wanted) do
    local found = false
    for _, c in ipairs(cases) do
      if c.name == w or c.family == w or (c.name:sub(1, #w) == w and not c.picked) then
        if not c.picked then selected[#selected + 1] = c c.picked = true end
        found = true
      end
    end
    if not found then
      io.stderr:write("chaos: no case named ", w, "; the cases are:\n")
      for _, c in ipairs(cases) do io.stderr:write("  ", c.name, "\n") end
      os.exit(2)
    end
  end
end

-- the expected failures: one case name per line, then "sometimes" for a case that fails on
-- some seeds only (its passes are not news); '#' starts a comment
local known, known_path = {}, os.getenv("CHAOS_KNOWN") or "chaos/known_failures"
if known_path ~= "none" then
  local f = io.open(known_path)
  if f then
    for line in f:lines() do
      local n, how = line:gsub("#.*", ""):match("^%s*(%S+)%s*(%S*)")
      if n then known[n] = how == "sometimes" and "sometimes" or "always" end
    end
    f:close()
  end
end

------------------------------------------------------------------ helpers

local function slurp(path) return L.slurp(path) or "" end

local mktemp = io.popen("mktemp -d /tmp/chaos.XXXXXX")
local tmp = mktemp:read("l")
mktemp:close()
assert(tmp and tmp ~= "", "mktemp failed")

-- the processes a finished case left: in its sessions, or carrying its tag
local function leftovers(sids, tag)
  local found = {}
  local needle = "CHAOS_TAG=" .. tag .. "\0"
  for _, pid in ipairs(L.all_pids()) do
    local st = L.stat(pid)
    if st and st.state ~= "Z" and st.state ~= "X" then
      local env = L.slurp(("/proc/%d/environ"):format(pid)) or ""
      if sids[st.sid] or env:find(needle, 1, true) then found[#found + 1] = pid end
    end
  end
  return found
end

local function kill_all(pids)
  for _ = 1, 50 do
    local any = false
    for _, p in ipairs(pids) do
      if L.alive(p) then any = true core.kill(p, 9) end
    end
    if not any then return end
    core.sleep(0.02)
  end
end

------------------------------------------------------------------ run

io.stdout:setvbuf("line")
print(("chaos: %d case%s, seed %d, CHAOS_ROUNDS=%g (replay: make chaos CHAOS_SEED=%d CASE=<name>)"):format(
  #selected, #selected == 1 and "" or "s", seed, scale, seed))

local passed, failed, unexpected, known_failed, known_passed = 0, 0, 0, 0, {}
local t_suite = core.now()
for i, c in ipairs(selected) do
  local tag = ("%d-%d-%s"):format(core.getpid(), i, c.name)
  local out, sidfile, sessions = ("%s/%s.out"):format(tmp, c.name), ("%s/%s.sid"):format(tmp, c.name),
    ("%s/%s.sessions"):format(tmp, c.name)
  local limit = math.ceil((c.timeout or 60) * math.max(1, scale))
  local env = ("%s CHAOS_TAG=%s CHAOS_SESSIONS=%s CHAOS_SEED=%d CHAOS_ROUNDS=%s CHAOS_TMP=%s MP_BUILD=%s %s"):format(
    L.ENV, tag, sessions, seed, tostring(scale), tmp, BUILD, c.env or "")
  local inner = ("echo $$ > %s; exec timeout -k 3 %d env %s %s chaos/case.lua %s"):format(
    sidfile, limit, env, LUA, c.name)
  local cmd = ("setsid sh -c %s > %s 2>&1 < /dev/null"):format(L.quote(inner), out)
  local t0 = core.now()
  local _, how, code = os.execute(cmd)
  local secs = core.now() - t0

  -- what it left behind (given two seconds to go: children die with their parent)
  local sids = {}
  local sid = tonumber(slurp(sidfile):match("%d+"))
  if sid then sids[sid] = true end
  for s in slurp(sessions):gmatch("%d+") do sids[tonumber(s)] = true end
  local left
  L.eventually(function()
    left = leftovers(sids, tag)
    return #left == 0
  end, 2)
  local left_text = #left > 0 and L.describe(left) or nil
  kill_all(left)

  local text = slurp(out)
  local figs, result = "", nil
  for line in text:gmatch("[^\n]*") do
    local f = line:match("^CHAOS%-FIG%s*(.*)$")
    if f then figs = f end
    local r = line:match("^CHAOS%-RESULT (.*)$")
    if r then result = r end
  end
  local why
  if how == "exit" and (code == 124 or code == 137) then
    why = ("hung: killed by the hard timeout (%d s)"):format(limit)
  elseif not result then
    why = ("ended without a result (%s %s%s)"):format(tostring(how), tostring(code),
      code == 141 and ": SIGPIPE, a victim's input closed under it" or "")
  elseif result ~= "pass" then
    why = result:gsub("^fail%s*", "")
    -- the rest of a multi-line reason
    local rest = text:match("CHAOS%-RESULT fail[^\n]*\n(.*)$")
    if rest and rest ~= "" then why = why .. "\n" .. rest:gsub("%s+$", "") end
  end
  if left_text then
    why = (why and why .. "\n" or "") .. ("left behind: %d process%s: %s"):format(#left, #left == 1 and "" or "es", left_text)
  end

  local status
  if not why then
    passed = passed + 1
    status = "PASS"
    if known[c.name] == "always" then
      known_passed[#known_passed + 1] = c.name
      status = "PASS (listed in " .. known_path .. ": remove it)"
    end
  else
    failed = failed + 1
    if known[c.name] then known_failed = known_failed + 1 status = "FAIL (known)"
    else unexpected = unexpected + 1 status = "FAIL" end
  end
  print(("%-4s %-30s %6.1fs  %s"):format(status:sub(1, 4), c.name, secs, figs))
  if status:sub(5) ~= "" then print("     " .. status:sub(6)) end
  if why then
    print("     " .. why:gsub("\n", "\n     "))
    if not result or os.getenv("CHAOS_VERBOSE") then
      -- the case's own last words
      local tail = {}
      for line in text:gmatch("[^\n]+") do
        if not line:match("^CHAOS%-") then tail[#tail + 1] = line end
      end
      for k = math.max(1, #tail - 8), #tail do print("     | " .. tail[k]) end
    end
  end
end

os.execute("rm -rf " .. L.quote(tmp))
print(("chaos: %.0f s in all; seed %d"):format(core.now() - t_suite, seed))
if known_failed > 0 or #known_passed > 0 then
  print(("known failures (%s): %d failed as listed; %d passed: %s"):format(known_path, known_failed,
    #known_passed, #known_passed > 0 and table.concat(known_passed, " ") or "-"))
end
print(("%d passed, %d failed"):format(passed, failed))
os.exit(unexpected == 0 and 0 or 1)
