/* host.c: a C host embedding Lua with lua-multiprocessing, as a game engine
** would (docs/embedding.md): host functions registered by name before anything
** else, the forkserver started before any thread, a render thread holding the
** scene's mutex most of the time, and a 60 Hz frame loop that submits work every
** few frames and drives the pool every frame without blocking.
** Built and run by `make examples` (static library, no .lua file needed). */
#include "engine.h"

#define FRAMES 180   /* 3 seconds at 60 Hz */

int main(void) {
  /* 1. Before threads and before the heap grows: register the host functions
  **    tasks may call, and start the forkserver (HOST_START_METHOD=fork: none). */
  const char *method = engine_init(getenv("HOST_START_METHOD"));

  /* 2. The host's threads. */
  pthread_t render;
  if (pthread_create(&render, NULL, render_main, NULL) != 0) { perror("pthread_create"); return 1; }

  /* 3. Lua with the whole module built in, and the driver (examples/host/engine.h). */
  lua_State *L = engine_lua();
  driver_load(L);

  /* lmp_encode/lmp_decode: the host keeps Lua values as bytes, e.g. a job's
  ** settings saved from one lua_State and restored in another (or a later frame). */
  lua_newtable(L);
  lua_pushinteger(L, 2);
  lua_setfield(L, -2, "processes");
  size_t n;
  char *saved = lmp_encode(L, -1, &n);
  lua_pop(L, 1);
  if (!saved) { fprintf(stderr, "host: lmp_encode: %s\n", lua_tostring(L, -1)); return 1; }
  if (lmp_decode(L, saved, n) != LUA_OK) { fprintf(stderr, "host: lmp_decode: %s\n", lua_tostring(L, -1)); return 1; }
  free(saved);  /* the caller owns lmp_encode's buffer */
  lua_getfield(L, -1, "processes");
  lua_Integer processes = lua_tointeger(L, -1);
  lua_pop(L, 2);

  lua_pushstring(L, method);
  lua_pushinteger(L, processes);
  driver_call(L, "start", 2, 0);

  /* 4. The frame loop. */
  double lib[FRAMES];
  run_frames(L, FRAMES, lib, NULL);
  lua_pushnumber(L, 20);
  driver_call(L, "finish", 1, 1);
  long checked = (long)lua_tointeger(L, -1);
  lua_pop(L, 1);

  atomic_store(&rendering, 0);
  pthread_join(render, NULL);
  lua_close(L);  /* closes the pool's leftovers too, before exit */

  double p50 = percentile(lib, FRAMES, 50), p99 = percentile(lib, FRAMES, 99), worst = lib[FRAMES - 1];
  printf("host: %d frames, start method %s, %ld results of 2,000 integers checked; "
         "library per frame: p50 %.3f ms, p99 %.3f ms, worst %.3f ms\n",
         FRAMES, method, checked, p50 * 1e3, p99 * 1e3, worst * 1e3);
  return 0;
}
