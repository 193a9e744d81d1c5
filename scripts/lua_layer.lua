-- lua_layer.lua OUT.c FILE.lua...: writes the C source of the Lua layer built into
-- the library (src/capi.c): each file's source text under its module name
-- (lua/multiprocessing/pool.lua: multiprocessing.pool, lua/multiprocessing/init.lua:
-- multiprocessing), and its bytecode, compiled here by this interpreter, less its
-- chunk name: the loader puts the name of the file it stands for there (src/capi.c,
-- load_layer_file). The bytecode keeps the line information (tracebacks and error
-- positions keep their lines) and the upvalues' names (errors name upvalues and
-- globals), not the names of local variables: loading them cost a quarter of the
-- load (0.6M instructions for pool.lua, process.lua and context.lua), for messages
-- about the layer's own locals. The bytecode is used only by a Lua of this release
-- (the generated C checks lua.h's); a Lua that refuses it (another build) gets the source.
local out = assert(arg[1], "usage: lua_layer.lua OUT.c FILE.lua...")
local files = {}
for i = 2, #arg do files[#files + 1] = arg[i] end
table.sort(files)

local function module_of(path)
  local rel = assert(path:match("^.-lua/(multiprocessing/.*)%.lua$"), path .. ": not under lua/multiprocessing/")
  rel = rel:gsub("/init$", "")
  return (rel:gsub("/", "."))
end

local SAFE = '[^%w %-_.,;:(){}%[%]=+*/<>&|!~^#%%@\'`$]'  -- what is written as an octal escape

local function cstring(s)
  local parts = {}
  for line in (s .. (s:sub(-1) == "\n" and "" or "\n")):gmatch("([^\n]*)\n") do
    line = line:gsub(SAFE, function(c)
      return string.format("\\%03o", c:byte())
    end)
    parts[#parts + 1] = '  "' .. line .. '\\n"'
  end
  if s:sub(-1) ~= "\n" and #parts > 0 then  -- the last line had no newline: drop the one added
    parts[#parts] = parts[#parts]:sub(1, -4) .. '"'
  end
  return table.concat(parts, "\n")
end

local function cbytes(s)  -- binary: 64 bytes a line
  local parts = {}
  for i = 1, #s, 64 do
    parts[#parts + 1] = '  "' .. s:sub(i, i + 63):gsub(SAFE, function(c) return string.format("\\%03o", c:byte()) end) .. '"'
  end
  return #parts > 0 and table.concat(parts, "\n") or '  ""'
end

-- a string as lundump reads it (ldump.c, dumpString): its size + 1, 7 bits a byte, most
-- significant first, the last byte marked with 0x80; then its bytes
local function dumped_string(s)
  local n, b = #s + 1, {}
  repeat
    table.insert(b, 1, n & 0x7f)
    n = n >> 7
  until n == 0
  b[#b] = b[#b] | 0x80
  return string.char(table.unpack(b)) .. s
end

-- where the main function's source name starts in a dump: after the header and the
-- byte of its upvalue count (lundump.c, luaU_undump)
local NAME_AT = assert(string.dump(load("", "@probe"), false):find(dumped_string("@probe"), 1, true))

-- A dump (ldump.c of Lua 5.4) without its functions' local variable names: the
-- debug section of each function is its line information (kept), then its local
-- variables (dropped), then its upvalues' names (kept). Integers and sizes are
-- written 7 bits a byte, most significant first, the last byte marked with 0x80.
local function without_locals(d)
  local pos, out = 1, {}
  local function byte() pos = pos + 1 return d:byte(pos - 1) end
  local function int()
    local x, b = 0, nil
    repeat b = byte() x = (x << 7) | (b & 0x7f) until b & 0x80 ~= 0
    return x
  end
  local function skip_string() local n = int() if n > 0 then pos = pos + n - 1 end end
  local function keep(from) out[#out + 1] = d:sub(from, pos - 1) end
  local function func()
    local at = pos
    skip_string()                      -- source
    int() int() pos = pos + 3          -- linedefined, lastlinedefined, numparams, is_vararg, maxstacksize
    local n = int()                    -- code
    pos = pos + 4 * n
    for _ = 1, int() do                -- constants
      local t = byte()
      if t == 0x03 or t == 0x13 then pos = pos + 8  -- integer, float
      elseif t == 0x04 or t == 0x14 then skip_string() end
    end
    n = int()                          -- upvalues
    pos = pos + 3 * n
    n = int()                          -- nested functions
    keep(at)
    for _ = 1, n do func() end
    at = pos
    n = int()                          -- line information
    pos = pos + n
    for _ = 1, int() do int() int() end  -- absolute line information
    keep(at)
    for _ = 1, int() do skip_string() int() int() end  -- local variables
    out[#out + 1] = string.char(0x80)  -- none
    at = pos
    for _ = 1, int() do skip_string() end  -- upvalues' names
    keep(at)
  end
  pos = NAME_AT  -- after the header and the main function's upvalue count
  keep(1)
  func()
  assert(pos == #d + 1, "a dump of another format")
  return table.concat(out)
end

-- Lua's release ("5.4.4"), to compare with the lua.h the library is built with
local release
do
  local p = io.popen((arg[-1] or "lua5.4") .. " -v 2>&1")
  local v = p and p:read("a") or ""
  if p then p:close() end
  release = v:match("^Lua (5%.4%.%d+)")
end
local rnum = release and (function()
  local a, b, c = release:match("(%d+)%.(%d+)%.(%d+)")
  return tonumber(a) * 10000 + tonumber(b) * 100 + tonumber(c)
end)()

local o = { "/* Generated by scripts/lua_layer.lua from lua/multiprocessing/: do not edit. */",
  "#include <stddef.h>",
  '#include "lua.h"',
  "typedef struct mp_lua_file {",
  "  const char *module, *chunkname, *source;",
  "  size_t size;",
  "  const char *code;             /* the bytecode less its chunk name, or NULL */",
  "  size_t code_size, name_at;    /* the name goes before code[name_at] */",
  "} mp_lua_file;",
  "__attribute__((visibility(\"hidden\"))) extern const mp_lua_file mp_lua_layer[];",
  -- the bytecode is this release's: another lua.h gets the sources alone
  ("#if LUA_VERSION_RELEASE_NUM == %d && !defined(MP_LAYER_NO_BYTECODE)"):format(rnum or -1),
  "#define CODE(c) c, sizeof c - 1",
  "#else",
  "#define CODE(c) NULL, 0",
  "#endif",
}
local entries = {}
for i, path in ipairs(files) do
  local f = assert(io.open(path, "rb"))
  local src = f:read("a")
  f:close()
  local chunkname = "@" .. path:match("(multiprocessing/.*)$")
  local fn = assert(load(src, chunkname, "t"))  -- a syntax error fails the build, not the host
  local full = string.dump(fn, false)
  local code = without_locals(full)
  -- only the local variables' names went: the same function without debug information, the
  -- same lines, and a dump of what it loads is itself
  local back = assert(load(code, chunkname, "b"))
  assert(string.dump(back, true) == string.dump(fn, true), path .. ": the bytecode changed")
  assert(string.dump(back, false) == code, path .. ": the bytecode does not load as written")
  local name = dumped_string(chunkname)
  assert(code:sub(NAME_AT, NAME_AT + #name - 1) == name, path .. ": the chunk name is not where lundump reads it")
  code = code:sub(1, NAME_AT - 1) .. code:sub(NAME_AT + #name)
  assert(load(code:sub(1, NAME_AT - 1) .. name .. code:sub(NAME_AT), chunkname, "b"))
  o[#o + 1] = string.format("static const char src%d[] =\n%s;", i, #src > 0 and cstring(src) or '  ""')
  o[#o + 1] = string.format("static const char code%d[] =\n%s;", i, cbytes(code))
  entries[#entries + 1] = string.format('  { "%s", "%s", src%d, sizeof src%d - 1, CODE(code%d), %d },',
    module_of(path), chunkname, i, i, i, NAME_AT - 1)
end
o[#o + 1] = "const mp_lua_file mp_lua_layer[] = {"
for _, e in ipairs(entries) do o[#o + 1] = e end
o[#o + 1] = "  { NULL, NULL, NULL, 0, NULL, 0, 0 }"
o[#o + 1] = "};"
local tmp = out .. ".tmp"
local f = assert(io.open(tmp, "wb"))
f:write(table.concat(o, "\n"), "\n")
f:close()
assert(os.rename(tmp, out))
