-- Specs of the public C API (include/multiprocessing.h, docs/embedding.md): a real C
-- host is built in the run against the static library, loads the whole module with
-- no .lua file reachable, registers host C functions that tasks call, and encodes
-- and decodes from C; only public names are global in core.so and the static library.
local H = require "helpers"

local BUILD = os.getenv("MP_BUILD") or "build"
local CC = os.getenv("CC") or "cc"

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok and 0 or code, out
end

-- The host: registers Engine.Math.len before anything, opens the module with
-- luaopen_multiprocessing, gives the script Engine (host functions, some not
-- registered), C-side encode/decode and registration, then runs it.
local HOST_C = [==[
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"
#include "multiprocessing.h"

static int host_len(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer s = 0;
  for (lua_Integer i = 1; i <= (lua_Integer)lua_rawlen(L, 1); i++) { lua_rawgeti(L, 1, i); s += lua_tointeger(L, -1); lua_pop(L, 1); }
  lua_pushinteger(L, s);
  return 1;
}
static int host_other(lua_State *L) { lua_pushliteral(L, "other"); return 1; }
static int host_late(lua_State *L) { lua_pushliteral(L, "late"); return 1; }
static int host_unreg(lua_State *L) { lua_pushliteral(L, "unreg"); return 1; }

/* Engine.register(name, which): lmp_register's result and errno's name */
static int l_register(lua_State *L) {
  const char *which = luaL_checkstring(L, 2);
  lua_CFunction f = strcmp(which, "len") == 0 ? host_len : strcmp(which, "late") == 0 ? host_late :
                    strcmp(which, "null") == 0 ? NULL : host_other;
  errno = 0;
  int rc = lmp_register(lua_isnil(L, 1) ? NULL : luaL_checkstring(L, 1), f);
  lua_pushinteger(L, rc);
  lua_pushstring(L, errno == EINVAL ? "EINVAL" : errno == EEXIST ? "EEXIST" : errno ? "other" : "0");
  return 2;
}
/* Engine.registered(name, which): is `which` the function registered under name? */
static int l_registered(lua_State *L) {
  lua_CFunction f = lmp_registered(luaL_checkstring(L, 1));
  lua_pushboolean(L, f == host_len ? strcmp(luaL_checkstring(L, 2), "len") == 0 : f == host_late ?
                  strcmp(luaL_checkstring(L, 2), "late") == 0 : f == NULL && strcmp(luaL_checkstring(L, 2), "none") == 0);
  return 1;
}
/* Engine.roundtrip(v): lmp_encode then lmp_decode; the value, the byte count */
static int l_roundtrip(lua_State *L) {
  size_t n = 0;
  int top = lua_gettop(L);
  char *b = lmp_encode(L, 1, &n);
  if (!b) { lua_pushnil(L); lua_insert(L, -2); return 2; }
  if (lua_gettop(L) != top) return luaL_error(L, "lmp_encode changed the stack");
  int st = lmp_decode(L, b, n);
  free(b);
  if (st != LUA_OK) { lua_pushnil(L); lua_insert(L, -2); return 2; }
  lua_pushinteger(L, (lua_Integer)n);
  return 2;
}
/* Engine.decode(bytes [, "data"]): lmp_decode's (or lmp_decode_data's) status and value */
static int l_decode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  int data = lua_toboolean(L, 2);
  char *copy = malloc(n ? n : 1);
  memcpy(copy, s, n);
  int st = data ? lmp_decode_data(L, copy, n) : lmp_decode(L, copy, n);
  free(copy);
  lua_pushinteger(L, st);
  lua_insert(L, -2);
  return 2;
}

/* Engine.stress(nthreads, n): threads register n names each at once; how many are found */
#include <pthread.h>
static void *stress_main(void *arg) {
  char name[64];
  for (int i = 0; i < 1000; i++) {
    snprintf(name, sizeof name, "Stress.t%d.f%d", (int)(long)arg, i);
    if (lmp_register(name, i % 2 ? host_other : host_late) != 0) return (void *)1;
  }
  return NULL;
}
static int l_stress(lua_State *L) {
  int nt = (int)luaL_checkinteger(L, 1);
  pthread_t t[16];
  for (int i = 0; i < nt && i < 16; i++) pthread_create(&t[i], NULL, stress_main, (void *)(long)i);
  int failed = 0;
  for (int i = 0; i < nt && i < 16; i++) { void *r; pthread_join(t[i], &r); failed += r != NULL; }
  int found = 0;
  char name[64];
  for (int i = 0; i < nt && i < 16; i++)
    for (int j = 0; j < 1000; j++) {
      snprintf(name, sizeof name, "Stress.t%d.f%d", i, j);
      found += lmp_registered(name) == (j % 2 ? host_other : host_late);
    }
  lua_pushinteger(L, found);
  lua_pushinteger(L, failed);
  return 2;
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  if (lmp_register("Engine.Math.len", host_len) != 0) { perror("lmp_register"); return 2; }
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "multiprocessing", luaopen_multiprocessing, 0);
  lua_setglobal(L, "mp");
  lua_newtable(L);
  lua_newtable(L);
  lua_pushcfunction(L, host_len); lua_setfield(L, -2, "len");
  lua_pushcfunction(L, host_late); lua_setfield(L, -2, "late");
  lua_pushcfunction(L, host_unreg); lua_setfield(L, -2, "unreg");
  lua_setfield(L, -2, "Math");
  lua_pushcfunction(L, l_register); lua_setfield(L, -2, "register");
  lua_pushcfunction(L, l_registered); lua_setfield(L, -2, "registered");
  lua_pushcfunction(L, l_roundtrip); lua_setfield(L, -2, "roundtrip");
  lua_pushcfunction(L, l_decode); lua_setfield(L, -2, "decode");
  lua_pushcfunction(L, l_stress); lua_setfield(L, -2, "stress");
  lua_setglobal(L, "Engine");
  int st = luaL_loadfile(L, argv[1]);
  if (st == LUA_OK) st = lua_pcall(L, 0, 0, 0);
  if (st != LUA_OK) { fprintf(stderr, "host: %s\n", lua_tostring(L, -1)); lua_close(L); return 1; }
  lua_close(L);
  return 0;
}
]==]

local dir, host, lib, asan
local function setup_host()
  if host then return end
  local code, out = sh("make --no-print-directory static BUILD=" .. BUILD)
  assert(code == 0, "make static failed:\n" .. out)
  lib = BUILD .. "/libmultiprocessing.a"
  asan = sh("nm " .. lib .. " | grep -q __asan_report") == 0
  local p = assert(io.popen("mktemp -d"))
  dir = p:read("l")
  p:close()
  local f = assert(io.open(dir .. "/host.c", "w"))
  f:write(HOST_C)
  f:close()
  host = dir .. "/host"
  code, out = sh(("%s -std=gnu11 -Wall -Wextra -Werror %s -Iinclude -I/usr/include/lua5.4 -o %s %s/host.c %s -llua5.4 -lpthread -lm")
    :format(CC, asan and "-fsanitize=address,undefined" or "", host, dir, lib))
  assert(code == 0, "building the host failed:\n" .. out)
end

-- runs the host on a Lua script, from an empty directory, with no .lua file on the paths
local function run(script)
  setup_host()
  local path = dir .. "/script.lua"
  local f = assert(io.open(path, "w"))
  f:write(script)
  f:close()
  return sh(("cd %s && LUA_PATH='%s/none/?.lua' LUA_CPATH='%s/none/?.so' LUA_INIT= timeout 60 ./host script.lua")
    :format(dir, dir, dir))
end

local function public_only(list)
  local bad = {}
  for name in list:gmatch("[^\n]+") do
    if not (name:match("^luaopen_multiprocessing") or name:match("^lmp_")) then bad[#bad + 1] = name end
  end
  return bad
end

describe("embedding: the public C API", function()
  H.leak_check(before_each, after_each)
  teardown(function() if dir then os.execute("rm -rf " .. H.quote(dir)) end end)

  it("loads the whole module from the library, with no .lua file reachable", function()
    local map_line = 0  -- where Pool:map is defined: the bytecode built in keeps the lines
    for line in io.lines("lua/multiprocessing/pool.lua") do
      map_line = map_line + 1
      if line:find("^function Pool:map%(") then break end
    end
    local code, out = run([[
      assert(package.searchpath("multiprocessing", package.path) == nil, "a .lua file is reachable")
      assert(package.searchpath("multiprocessing.core", package.cpath) == nil)
      assert(debug.getinfo(mp.Pool, "S").source == "@multiprocessing/pool.lua", debug.getinfo(mp.Pool, "S").source)
      local map = require("multiprocessing.pool").Pool(1)
      local info = debug.getinfo(map.map, "S")
      map:close() map:join()
      assert(info.source == "@multiprocessing/pool.lua" and info.linedefined == ]] .. map_line .. [[, info.linedefined)
      assert(require "multiprocessing" == mp)
      assert(type(require "multiprocessing.pool".Pool) == "function")
      local pool <close> = mp.Pool(2)
      local r = pool:map(function(x) return x * 2 end, { 1, 2, 3 })
      assert(r[1] == 2 and r[3] == 6)
      print("ok " .. mp._VERSION)
    ]])
    assert.equal(0, code, out)
    assert.matches("ok %d+%.%d+%.%d+", out)
  end)

  it("runs pool:map over a registered host function, by name, however the task holds it", function()
    local code, out = run [[
      local pool <close> = mp.Pool(2)
      local items = {}
      for i = 1, 20 do items[i] = { i, i, i } end
      local len = Engine.Math.len
      local direct = pool:map(len, items)                               -- the function itself
      local up = pool:map(function(t) return len(t) + 1 end, items)     -- an upvalue
      local nested = pool:map(function(t) return { f = len } end, { 1 }) -- a result holding it
      Engine2 = { Math = { len = len } }                                -- a global made after the fork
      local glob = pool:map(function(t) return Engine2.Math.len(t) end, items)
      for i = 1, 20 do
        assert(direct[i] == 3 * i, direct[i])
        assert(up[i] == 3 * i + 1)
        assert(glob[i] == 3 * i)
      end
      assert(nested[1].f == len, "the registered function comes back as itself")
      print("ok")
    ]]
    assert.equal(0, code, out)
    assert.matches("ok", out)
  end)

  it("fails clearly for a C function registered after the workers started, or never", function()
    local code, out = run [[
      local pool <close> = mp.Pool(1)
      local late, unreg = Engine.Math.late, Engine.Math.unreg
      assert(Engine.register("Engine.Math.late", "late") == 0)
      local ok, err = pcall(pool.map, pool, function(x) return late(x) end, { 1 })
      assert(not ok)
      print(err)
      ok, err = pcall(pool.map, pool, unreg, { 1 })
      assert(not ok)
      print(err)
      local p2 <close> = mp.Pool(1)   -- a pool started after the registration has it
      assert(p2:map(function(x) return late(x) end, { 1 })[1] == "late")
      print("ok")
    ]]
    assert.equal(0, code, out)
    assert.matches("host C function 'Engine.Math.late' is not registered in this process", out, 1, true)
    assert.matches("cannot send the C function Engine.Math.unreg (neither registered with lmp_register", out, 1, true)
    assert.matches("ok\n$", out)
  end)

  it("lmp_register checks names and refuses a taken one", function()
    local code, out = run [[
      local function check(name, which, rc, e)
        local r, en = Engine.register(name, which)
        assert(r == rc and en == e, ("%s: %s %s"):format(tostring(name), r, en))
      end
      check("Engine.Math.len", "len", 0, "0")         -- again, same function: nothing to do
      check("Engine.Math.len", "other", -1, "EEXIST")
      check("Engine.Other", "len", 0, "0")            -- a second name for one function
      for _, bad in ipairs { "", ".a", "a.", "a..b", "1a", "a b", "a-b", ("x"):rep(256) } do
        check(bad, "other", -1, "EINVAL")
      end
      check(nil, "other", -1, "EINVAL")
      check("ok_name", "null", -1, "EINVAL")
      check(("x"):rep(255), "other", 0, "0")
      assert(Engine.registered("Engine.Math.len", "len") and Engine.registered("Engine.Other", "len"))
      assert(Engine.registered("nothing.here", "none"))
      local found, failed = Engine.stress(8)    -- 8 threads registering 1,000 names each at once
      assert(found == 8000 and failed == 0, ("found %d, %d threads failed"):format(found, failed))
      print("ok")
    ]]
    assert.equal(0, code, out)
    assert.matches("ok", out)
  end)

  it("encodes and decodes from C: data, functions, registered functions; bad bytes are an error", function()
    local code, out = run [[
      local t = { 1, "two", { three = 3.5 }, [true] = false }
      local v, n = Engine.roundtrip(t)
      assert(v ~= t and v[1] == 1 and v[2] == "two" and v[3].three == 3.5 and v[true] == false and n > 0)
      local k = 10
      local f = Engine.roundtrip(function(x) return x + k end)
      assert(f(1) == 11)
      assert(Engine.roundtrip(Engine.Math.len) == Engine.Math.len)
      local none, err = Engine.roundtrip(coroutine.create(print))
      assert(none == nil and err:find("cannot send a thread", 1, true), err)
      none, err = Engine.roundtrip(Engine.Math.unreg)
      assert(none == nil and err:find("Engine.Math.unreg", 1, true), err)
      local st, msg = Engine.decode("\1\2\3")
      assert(st ~= 0 and type(msg) == "string", msg)
      st, msg = Engine.decode("")
      assert(st ~= 0 and type(msg) == "string")
      local bytes = mp.encode({ x = 1 })
      st, v = Engine.decode(bytes)
      assert(st == 0 and v.x == 1)
      st, msg = Engine.decode(bytes:sub(1, -2))   -- cut short
      assert(st ~= 0 and type(msg) == "string")
      st, v = Engine.decode(bytes, "data")
      assert(st == 0 and v.x == 1)
      st, msg = Engine.decode(mp.encode({ f = Engine.Math.len }), "data")  -- bytes from anywhere: data only
      assert(st ~= 0 and msg:find("C function", 1, true), msg)
      print("ok")
    ]]
    assert.equal(0, code, out)
    assert.matches("ok", out)
  end)

  it("makes only luaopen_multiprocessing* and lmp_* global, in core.so and in the static library", function()
    setup_host()
    local code, dyn = sh("nm -D --defined-only " .. BUILD .. "/multiprocessing/core.so | awk '{ print $3 }'")
    assert.equal(0, code, dyn)
    assert.same({}, public_only(dyn))
    local static
    code, static = sh("nm -g --defined-only " .. lib .. " | awk 'NF == 3 { print $3 }'")
    assert.equal(0, code, static)
    assert.same({}, public_only(static))
    for _, name in ipairs { "luaopen_multiprocessing", "luaopen_multiprocessing_core", "lmp_register", "lmp_registered",
                            "lmp_encode", "lmp_decode", "lmp_decode_data" } do
      assert.matches("\n" .. name .. "\n", "\n" .. dyn, 1, true)
      assert.matches("\n" .. name .. "\n", "\n" .. static, 1, true)
    end
    -- the internal names are still there, local (the library works: see the host above)
    local _, all = sh("nm " .. lib .. " | grep -c ' [tTdDbBrR] mp_'")
    assert.is_true(tonumber(all) > 50)
  end)

  it("installs the static library, the header and a pkg-config file that links a host", function()
    setup_host()
    local root = dir .. "/root"
    local code, out = sh(("make --no-print-directory install BUILD=%s DESTDIR=%s PREFIX=/usr"):format(BUILD, root))
    assert.equal(0, code, out)
    for _, f in ipairs { "/usr/lib/libmultiprocessing.a", "/usr/include/multiprocessing.h", "/usr/lib/pkgconfig/multiprocessing.pc" } do
      local fh = io.open(root .. f)
      assert.is_truthy(fh, f)
      fh:close()
    end
    local pc = H.slurp(root .. "/usr/lib/pkgconfig/multiprocessing.pc")
    local vars = {}
    for k, v in pc:gmatch("\n?([%w_]+)=([^\n]*)") do vars[k] = v end
    local function expand(s) return (s:gsub("%${([%w_]+)}", function(k) return root .. vars[k] end)) end
    local cflags, libs = expand(pc:match("\nCflags: ([^\n]*)")), expand(pc:match("\nLibs: ([^\n]*)"))
    assert.matches("Requires: lua5.4", pc, 1, true)
    code, out = sh(("%s -std=gnu11 %s %s -I/usr/include/lua5.4 -o %s/host2 %s/host.c %s -llua5.4")
      :format(CC, asan and "-fsanitize=address,undefined" or "", cflags, dir, dir, libs))
    assert.equal(0, code, out)
  end)
end)
