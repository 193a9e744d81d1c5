/* stdout_host.c: a C host for spec/start_methods_spec.lua whose other thread
** holds stdout's lock for good (as one blocked writing to a full pipe would),
** then runs the Lua script argv[1] in a fresh lua_State. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

#include "lauxlib.h"
#include "lualib.h"

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c = PTHREAD_COND_INITIALIZER;
static int held;

static void *hold(void *arg) {
  (void)arg;
  flockfile(stdout);
  pthread_mutex_lock(&m);
  held = 1;
  pthread_cond_signal(&c);
  pthread_mutex_unlock(&m);
  for (;;) pause();
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  pthread_t t;
  pthread_create(&t, NULL, hold, NULL);
  pthread_mutex_lock(&m);
  while (!held) pthread_cond_wait(&c, &m);
  pthread_mutex_unlock(&m);
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  if (luaL_dofile(L, argv[1]) != LUA_OK) {
    fprintf(stderr, "%s\n", luaL_tolstring(L, -1, NULL));
    return 1;
  }
  lua_close(L);
  return 0;
}
