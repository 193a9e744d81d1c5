-- lua_layer.lua OUT.c FILE.lua...: writes the C source of the Lua layer built into
-- the library (src/capi.c): each file's source text under its module name
-- (lua/multiprocessing/pool.lua: multiprocessing.pool, lua/multiprocessing/init.lua:
-- multiprocessing), and its bytecode, compiled here by this interpreter, less its
-- chunk name: the loader puts the name of the file it stands for there (src/capi.c,
-- load_layer_file). The bytecode keeps its debug information: lines (tracebacks
-- and error positions), upvalues' and locals' names (errors and tracebacks name them, and
-- the pool's chunk loop finds its item number by its name: pool.lua, chunk_capture), all
-- but the names of the main function's own locals (see main_locals_dropped). The bytecode
-- is used only by a Lua of this release (the generated C checks lua.h's); a Lua that refuses it (another build) gets the source.
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

-- The dump less its main function's local variables' names (ldump.c, dumpFunction): the file's
-- own locals (its `local function`s, constants, modules) are named only while the main function
-- runs, which is once, at load; every function a program can call or see in a traceback keeps its
-- names. They were a sixth of pool.lua's locals, each a string to intern at every load.
local function main_locals_dropped(code)
  local at = NAME_AT
  local isize, nsize = code:byte(13), code:byte(15)  -- sizeof(Instruction), sizeof(lua_Number)
  local function size()  -- dumpSize: 7 bits a byte, most significant first, the last marked with 0x80
    local x, b = 0, nil
    repeat b = code:byte(at) at = at + 1 x = (x << 7) | (b & 0x7f) until b & 0x80 ~= 0
    return x
  end
  local function str() local n = size() if n > 0 then at = at + n - 1 end end
  local function func()  -- skips a function; returns where its locals start and end
    str() size() size()  -- source, linedefined, lastlinedefined
    at = at + 3  -- numparams, is_vararg, maxstacksize
    local ncode = size()
    at = at + isize * ncode
    for _ = 1, size() do  -- constants: a tag (lobject.h's variants), then the value
      local tag = code:byte(at)
      at = at + 1
      if tag == 3 then at = at + code:byte(14)  -- integer: sizeof(lua_Integer)
      elseif tag == 19 then at = at + nsize
      elseif tag == 4 or tag == 20 then str()
      else assert(tag == 0 or tag == 1 or tag == 17, "unknown constant in a dump") end
    end
    local nup = size()
    at = at + 3 * nup  -- upvalues: instack, idx, kind
    for _ = 1, size() do func() end
    local nline = size()
    at = at + nline  -- lineinfo
    for _ = 1, size() do size() size() end  -- abslineinfo
    local from = at
    for _ = 1, size() do str() size() size() end
    local to = at
    for _ = 1, size() do str() end  -- upvalues' names
    return from, to
  end
  local from, to = func()
  assert(at == #code + 1, "a dump not read to its end")
  return code:sub(1, from - 1) .. "\x80" .. code:sub(to)  -- (no locals: a count of 0)
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
  local code = main_locals_dropped(string.dump(fn, false))
  -- a dump of what it loads is itself, and the same code as the source's
  local back = assert(load(code, chunkname, "b"))
  assert(string.dump(back, false) == code, path .. ": the bytecode does not load as written")
  assert(string.dump(back, true) == string.dump(fn, true), path .. ": the bytecode is not the source's")
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
