-- Runs the benchmark pairs bench/<name>.lua (ours) and bench/<name>.py (the same
-- work in Python) and prints one table: per row our time, Python's, the ratio
-- Python/ours (above 1: we are faster) and the rates of both.
-- Each script prints lines "<row>\t<seconds>[\t<count>\t<unit>]..." (a median,
-- taken inside the script). Usage: lua5.4 bench/run.lua [name...]; or BENCH=a,b.
-- Env: LUA (lua5.4), PYTHON (python3), MP_BUILD (build), BENCH_REPEAT (7).
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

-- runs a command, returns its rows in order and by name
local function collect(cmd, what)
  local p = assert(io.popen(cmd, "r"))
  local rows = {}
  for line in p:lines() do
    local f = {}
    for field in (line .. "\t"):gmatch("([^\t]*)\t") do f[#f + 1] = field end
    local secs = tonumber(f[2])
    if f[1] and secs then
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

local env = ("LUA_PATH=%s LUA_CPATH=%s "):format(sh_quote("./lua/?.lua;./lua/?/init.lua;;"),
  sh_quote("./" .. BUILD .. "/?.so;;"))
local out = { { "row", "ours", "Python", "Python/ours", "ours rate", "Python rate" } }
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
        p and ("%.2f"):format(p.secs / r.secs) or "-", fmt_rate(r), fmt_rate(p) }
    end
    for _, p in ipairs(py) do  -- rows only Python has
      if not ours[p.name] then
        out[#out + 1] = { p.name, "-", fmt_time(p.secs), "-", "-", fmt_rate(p) }
      end
    end
  end
end

local widths = {}
for _, r in ipairs(out) do
  for i, c in ipairs(r) do widths[i] = math.max(widths[i] or 0, #c) end
end
for n, r in ipairs(out) do
  local cells = {}
  for i, c in ipairs(r) do
    cells[i] = (i == 1 or i >= 5) and c .. (" "):rep(widths[i] - #c) or (" "):rep(widths[i] - #c) .. c
  end
  print((table.concat(cells, "  "):gsub("%s+$", "")))
  if n == 1 then
    local rule = {}
    for i = 1, #widths do rule[i] = ("-"):rep(widths[i]) end
    print(table.concat(rule, "  "))
  end
end
