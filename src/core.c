/* core.c: luaopen_multiprocessing_core, which assembles the C core. */
#include "mp.h"

static int (*const openers[])(lua_State *L) = {
  mp_codec_open, mp_arena_open, mp_process_open, mp_pipe_open,
  mp_queue_open, mp_sync_open, mp_shared_open, mp_shm_open, mp_pool_open, mp_socket_open, mp_redis_open, mp_forkserver_open, mp_layer_open,
};

/* the fields the openers put in the core table (about 95): made at its size, not
** rehashed at each power of two on the way */
#define CORE_FIELDS 100

#pragma GCC visibility push(default)
int luaopen_multiprocessing_core(lua_State *L);
#pragma GCC visibility pop

int luaopen_multiprocessing_core(lua_State *L) {
  luaL_checkversion(L);
  lua_createtable(L, 0, CORE_FIELDS);
  for (size_t i = 0; i < sizeof(openers) / sizeof(openers[0]); i++) openers[i](L);
  lua_pushliteral(L, MP_VERSION);
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
