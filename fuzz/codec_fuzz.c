/* codec_fuzz.c: libFuzzer target for the codec's decoder (see scripts/fuzz.sh).
**
** The target creates the arena and a live object of every shared type (Queues,
** locks, Semaphores, Event, Condition, Barrier, Value, Array, PoolState) before
** fuzzing, so handles in the input name real objects (a decoder that skips a
** check crashes only then). With FUZZ_SEEDS=dir it first writes seeds there,
** encoded by this process: handles to those objects, and functions whose keyed
** checksum this process accepts (fuzz/make_seeds.lua).
**
** FUZZ_MODE=both (default): decodes each input in data-only mode, then in full
** mode, under lua_pcall; an error is fine, a crash or a sanitizer report is a bug.
** FUZZ_MODE=data or decode: one of the two.
** FUZZ_MODE=roundtrip: when an input decodes, the value is encoded again, that
** is decoded, and the two values must be alike (fuzz/roundtrip.lua). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lua.h"
#include "lualib.h"
#include "lauxlib.h"

int luaopen_multiprocessing_core(lua_State *L);

static lua_State *L;
static int roundtrip, mode_data = 1, mode_all = 1;
static unsigned long runs;

/* The decoder resolves C functions and modules by name and may call require;
** a decoded metatable's __gc runs at collection. Nothing reachable that way may
** touch files, processes or stdin. */
static const char *sandbox =
  "local loaded = package.loaded\n"
  "for _, m in ipairs { 'io', 'os', 'debug', 'package' } do loaded[m] = nil; _G[m] = nil end\n"
  "require, dofile, loadfile, print = nil, nil, nil, nil\n";

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc; (void)argv;
  const char *mode = getenv("FUZZ_MODE");
  roundtrip = mode && strcmp(mode, "roundtrip") == 0;
  if (mode && strcmp(mode, "data") == 0) mode_all = 0;
  if (mode && strcmp(mode, "decode") == 0) mode_data = 0;
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "multiprocessing.core", luaopen_multiprocessing_core, 0);  /* in package.loaded */
  lua_setglobal(L, "core");
  /* the shared objects (kept for the whole run) and, if asked, the seeds */
  const char *seeds = getenv("FUZZ_SEEDS");
  const char *script = getenv("FUZZ_MAKE_SEEDS");
  if (luaL_loadfile(L, script ? script : "fuzz/make_seeds.lua") != LUA_OK) {
    fprintf(stderr, "%s\n", lua_tostring(L, -1));
    abort();
  }
  lua_pushstring(L, seeds ? seeds : "");
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) { fprintf(stderr, "%s\n", lua_tostring(L, -1)); abort(); }
  lua_setfield(L, LUA_REGISTRYINDEX, "fuzz.objects");
  if (roundtrip) {  /* loaded before the sandbox: it uses the debug library */
    const char *path = getenv("FUZZ_ROUNDTRIP");
    if (luaL_loadfile(L, path ? path : "fuzz/roundtrip.lua") != LUA_OK) {
      fprintf(stderr, "%s\n", lua_tostring(L, -1));
      abort();
    }
    lua_call(L, 0, 1);
  } else {
    lua_getglobal(L, "core");
    lua_getfield(L, -1, "decode");
    lua_remove(L, -2);
  }
  lua_getglobal(L, "core");
  lua_getfield(L, -1, "decode");
  lua_setfield(L, LUA_REGISTRYINDEX, "fuzz.decode");
  lua_pop(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, "fuzz.target");
  if (luaL_dostring(L, sandbox) != LUA_OK) { fprintf(stderr, "%s\n", lua_tostring(L, -1)); abort(); }
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_settop(L, 0);
  if (!roundtrip && mode_data) {  /* the mode for bytes from anywhere: fuzzed on every input */
    lua_getfield(L, LUA_REGISTRYINDEX, "fuzz.decode");
    lua_pushlstring(L, (const char *)data, size);
    lua_pushliteral(L, "data");
    lua_pcall(L, 2, 0, 0);
    lua_settop(L, 0);
    if (!mode_all) goto done;
  }
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz.target");
  lua_pushlstring(L, (const char *)data, size);
  if (roundtrip) lua_gc(L, LUA_GCSTOP);  /* weak tables must not change during the check */
  int status = lua_pcall(L, 1, 0, 0);
  if (roundtrip) lua_gc(L, LUA_GCRESTART);
  if (status != LUA_OK && roundtrip) {
    const char *msg = lua_tostring(L, -1);
    if (msg && strstr(msg, "ROUNDTRIP:")) {  /* a real failure of the round trip */
      fprintf(stderr, "%s\n", msg);
      abort();
    }
  }
  lua_settop(L, 0);
done:
  if (++runs % 256 == 0) lua_gc(L, LUA_GCCOLLECT);  /* runs finalizers of decoded metatables */
  return 0;
}
