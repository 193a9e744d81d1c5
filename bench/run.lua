-- Runs the benchmark pairs bench/<name>.lua (ours) and bench/<name>.py (the same
-- work in Python) and prints one table: per row our time, Python's, the ratio
-- Python/ours (above 1: we are faster) and the rates of both.
-- Each script prints lines "<row>\t<seconds>[\t<count>\t<unit>]..." (a median,
-- taken inside the script), and may say what a row's floor is with
-- "limit\t<row>\t<kind>\t<amount>" (kinds below). Usage: lua5.4 bench/run.lua [name...];
-- or BENCH=a,b. Env: LUA (lua5.4), PYTHON (python3), MP_BUILD (build), CC (cc), BENCH_REPEAT (7).
local LUA = os.getenv("LUA") or "lua5.4"
local PYTHON = os.getenv("PYTHON") or "python3"
local BUILD = os.getenv("MP_BUILD") or "build"

local function sh_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() return true end
  return false
end

-- which workloads: arguments, else $BENCH (comma or space separated), else all
local wanted = {}
for _, a in ipairs(arg) do wanted[#wanted + 1] = a end
if #wanted == 0 and os.getenv("BENCH") and os.getenv("BENCH") ~= "" then
  for w in os.getenv("BENCH"):gmatch("[^,%s]+") do wanted[#wanted + 1] = w end
end
if #wanted == 0 then
  local p = assert(io.popen("ls -1 bench/*.lua 2>/dev/null"))
  for path in p:lines() do
    local name = path:match("^bench/([%w_%-]+)%.lua$")
    if name and name ~= "run" and name ~= "lib" then wanted[#wanted + 1] = name end
  end
  p:close()
  table.sort(wanted)
end

-- The machine's limits (bench/limits.c, docs/benchmarks.md), measured at the start and at the
-- end of the run: seconds per fork+exit+wait, futex round trip, spinning round trip, memcpy'd byte.
local LIMIT_NAMES = { fork = "fork+exit+wait", fork2 = "two forks at once", futex = "futex round trip", spin = "spinning round trip",
  memcpy = "memcpy" }
local limits_runs = {}
local function measure_limits()
  local exe = BUILD .. "/bench-limits"
  if #limits_runs == 0 then
    local cc = os.getenv("CC") or "cc"
    if not os.execute(("%s -O2 -std=gnu11 -o %s bench/limits.c"):format(cc, sh_quote(exe))) then
      io.stderr:write("bench/limits.c did not build: no limits\n")
      return
    end
  end
  local p = io.popen(sh_quote(exe))
  if not p then return end
  local got = {}
  for line in p:lines() do
    local k, v = line:match("^(%w+)\t(%S+)$")
    if k and tonumber(v) and tonumber(v) > 0 then got[k] = tonumber(v) end
  end
  p:close()
  limits_runs[#limits_runs + 1] = got
end
-- a limit: the lower of the two measurements (the machine at its least busy)
local function limit(kind)
  local best
  for _, got in ipairs(limits_runs) do
    if got[kind] and (not best or got[kind] < best) then best = got[kind] end
  end
  return best
end

-- Floors of rows whose scripts do not print them: kind and amount per operation.
local DEFAULT_LIMITS = {
  ["process: start + join"] = { "fork", 1 },
  ["queue: 1000 x 1 MiB"] = { "memcpy", 1000 * 2 * (1 << 20) },  -- (the row's time is for all 1000) into the queue and out
}

-- runs a command, returns its rows in order and by name (and their limits in rows.limits)
local function collect(cmd, what)
  local p = assert(io.popen(cmd, "r"))
  local rows = { limits = {} }
  for line in p:lines() do
    local f = {}
    for field in (line .. "\t"):gmatch("([^\t]*)\t") do f[#f + 1] = field end
    local secs = tonumber(f[2])
    if f[1] == "limit" and f[2] and f[3] and tonumber(f[4]) then
      rows.limits[f[2]] = { f[3], tonumber(f[4]) }
    elseif f[1] and secs then
      local units = {}
      for i = 3, #f - 1, 2 do units[#units + 1] = { tonumber(f[i]), f[i + 1] } end
      rows[#rows + 1] = { name = f[1], secs = secs, units = units }
      rows[f[1]] = rows[#rows]
    elseif line ~= "" then
      io.stderr:write(what, ": ", line, "\n")
    end
  end
  local ok, how, code = p:close()
  if not ok then io.stderr:write(("%s failed (%s %s)\n"):format(what, how, code)) end
  return rows
end

local function fmt_time(s)
  if not s then return "-" end
  if s >= 1 then return ("%.3f s"):format(s) end
  if s >= 1e-3 then return ("%.2f ms"):format(s * 1e3) end
  return ("%.2f us"):format(s * 1e6)
end

local function fmt_rate(r)
  if not r then return "-" end
  local parts = {}
  for _, u in ipairs(r.units) do
    local rate, unit = u[1] and u[1] / r.secs, u[2]
    if rate then
      if unit == "MB" then parts[#parts + 1] = ("%.0f MB/s"):format(rate)
      elseif rate >= 1e6 then parts[#parts + 1] = ("%.1f M%s/s"):format(rate / 1e6, unit)
      elseif rate >= 1e3 then parts[#parts + 1] = ("%.1f k%s/s"):format(rate / 1e3, unit)
      else parts[#parts + 1] = ("%.1f %s/s"):format(rate, unit) end
    end
  end
  return #parts > 0 and table.concat(parts, ", ") or "-"
end

-- how far a row is from its floor: "3.2x fork+exit+wait" (times the floor), or for the
-- capacity kind (amount = seconds two plain interpreters took) the fraction of it reached
local function fmt_limit(r, lim)
  if not lim then return "-" end
  local kind, amount = lim[1], lim[2]
  if kind == "capacity" then return ("%.2f of capacity"):format(amount / r.secs) end
  local per = limit(kind)
  if not per then return "-" end
  return ("%.1fx %s"):format(r.secs / (per * amount), LIMIT_NAMES[kind] or kind)
end

local env = ("LUA_PATH=%s LUA_CPATH=%s "):format(sh_quote("./lua/?.lua;./lua/?/init.lua;;"),
  sh_quote("./" .. BUILD .. "/?.so;;"))
io.stderr:write("measuring the limits...\n")
measure_limits()
local out = { { "row", "ours", "Python", "Python/ours", "ours vs limit", "ours rate", "Python rate" } }
local pending = {}  -- rows whose limit is printed once the limits are measured again at the end
for _, name in ipairs(wanted) do
  local lua_file, py_file = "bench/" .. name .. ".lua", "bench/" .. name .. ".py"
  if not exists(lua_file) then
    io.stderr:write("no ", lua_file, "\n")
  else
    io.stderr:write("running ", name, "...\n")
    local ours = collect(env .. LUA .. " " .. lua_file, lua_file)
    local py = exists(py_file) and collect(PYTHON .. " " .. py_file, py_file) or {}
    for _, r in ipairs(ours) do
      local p = py[r.name]
      out[#out + 1] = { r.name, fmt_time(r.secs), fmt_time(p and p.secs),
        p and ("%.2f"):format(p.secs / r.secs) or "-", "-", fmt_rate(r), fmt_rate(p) }
      pending[#pending + 1] = { out[#out], r, ours.limits[r.name] or DEFAULT_LIMITS[r.name] }
    end
    for _, p in ipairs(py) do  -- rows only Python has
      if not ours[p.name] then
        out[#out + 1] = { p.name, "-", fmt_time(p.secs), "-", "-", "-", fmt_rate(p) }
      end
    end
  end
end
measure_limits()
for _, e in ipairs(pending) do e[1][5] = fmt_limit(e[2], e[3]) end

local widths = {}
for _, r in ipairs(out) do
  for i, c in ipairs(r) do widths[i] = math.max(widths[i] or 0, #c) end
end
for n, r in ipairs(out) do
  local cells = {}
  for i, c in ipairs(r) do
    cells[i] = (i == 1 or i >= 6) and c .. (" "):rep(widths[i] - #c) or (" "):rep(widths[i] - #c) .. c
  end
  print((table.concat(cells, "  "):gsub("%s+$", "")))
  if n == 1 then
    local rule = {}
    for i = 1, #widths do rule[i] = ("-"):rep(widths[i]) end
    print(table.concat(rule, "  "))
  end
end

-- the limits, as measured at the start and at the end of this run
local parts = {}
for _, k in ipairs { "futex", "spin", "memcpy", "fork", "fork2" } do
  local a, b = limits_runs[1] and limits_runs[1][k], limits_runs[2] and limits_runs[2][k]
  local f = k == "memcpy" and function(v) return ("%.1f GB/s"):format(1e-9 / v) end
    or function(v) return ("%.2f us"):format(v * 1e6) end
  if a or b then parts[#parts + 1] = ("%s %s / %s"):format(LIMIT_NAMES[k], a and f(a) or "-", b and f(b) or "-") end
end
if #parts > 0 then print("\nlimits (start / end of the run): " .. table.concat(parts, "; ")) end
