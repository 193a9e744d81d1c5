/* forkserver_host.c: a C host for spec/start_methods_spec.lua. It starts the
** forkserver first (lmp_forkserver_start), then grows its heap by 256 MiB and
** starts a thread that holds a mutex most of the time, then runs the Lua
** script argv[1] in a fresh lua_State. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lauxlib.h"
#include "lualib.h"
#include "multiprocessing.h"

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;

static void *busy(void *arg) {
  (void)arg;
  for (;;) {
    pthread_mutex_lock(&m);
    usleep(1000);
    pthread_mutex_unlock(&m);
    usleep(10);
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  if (lmp_forkserver_start() != 0) { perror("lmp_forkserver_start"); return 2; }
  size_t big = (size_t)256 << 20;
  char *heap = malloc(big);
  if (!heap) return 2;
  memset(heap, 1, big);
  pthread_t t;
  pthread_create(&t, NULL, busy, NULL);
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  if (luaL_dofile(L, argv[1]) != LUA_OK) {
    fprintf(stderr, "%s\n", luaL_tolstring(L, -1, NULL));
    return 1;
  }
  lua_close(L);
  free(heap);
  return 0;
}
