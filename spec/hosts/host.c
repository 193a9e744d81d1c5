/* host.c: a small C program embedding Lua as a game or tool host does, for
** spec/host_safety_spec.lua. It links liblua5.4 and our core, runs a Lua
** script in a lua_State of its own, and does one of the things real hosts do
** that a fork-based library must survive (argv[1]):
**
**   plain       nothing special (the control)
**   sigign      SIGCHLD ignored: the kernel reaps every child itself
**   reaper      a thread reaps every child with waitpid(-1) (its own SIGCHLD handling)
**   loader      the script's setup runs on a loader thread that then exits;
**               the main thread goes on with the same lua_State (run())
**   locks       two threads, each with its own lua_State, share one Lock:
**               the script's lock() runs in the first, release() in the second
**   console     a thread sits in fgets(stdin) while the script runs
**   allocmutex  lua_Alloc is guarded by a mutex, which another thread holds
**               at every fork (the child's copy stays held)
**   interrupt   a thread calls lmp_interrupt() once the script calls started()
**
** The script is argv[2]. In "loader" it defines the globals setup and run; in
** "locks" lock and release. Output: whatever the script prints, then "host:
** ok" or "host: error: <message>"; the exit code is 0 only for ok. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"
#include "multiprocessing.h"

static const char *script;

static int traceback(lua_State *L) {
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

/* calls global fn (or runs the script when fn is NULL); 0 ok */
static int run(lua_State *L, const char *fn) {
  lua_pushcfunction(L, traceback);
  int h = lua_gettop(L);
  int r;
  if (fn) {
    lua_getglobal(L, fn);
    r = lua_pcall(L, 0, 0, h);
  } else {
    r = luaL_loadfile(L, script);
    if (r == LUA_OK) r = lua_pcall(L, 0, 0, h);
  }
  if (r != LUA_OK) {
    printf("host: error: %s\n", lua_tostring(L, -1));
    fflush(stdout);
  }
  lua_settop(L, h - 1);
  return r != LUA_OK;
}

static lua_State *newstate(lua_Alloc f) {
  lua_State *L = f ? lua_newstate(f, NULL) : luaL_newstate();
  luaL_openlibs(L);
  return L;
}

static int finish(lua_State *L, int failed) {
  lua_close(L);
  puts(failed ? "host: failed" : "host: ok");
  return failed;
}

/* ------------------------------------------------------------- reaper */
static void *reaper(void *arg) {
  for (;;) {
    int st;
    if (waitpid(-1, &st, 0) < 0) usleep(1000);
  }
  return NULL;
}

/* ------------------------------------------------------------- loader */
static lua_State *loaded;
static int loader_failed;
static void *loader(void *arg) {
  loaded = newstate(NULL);
  loader_failed = run(loaded, NULL) || run(loaded, "setup");
  return NULL;  /* the thread that forked the workers ends here */
}

/* -------------------------------------------------------------- locks */
static lua_State *second;
static void *releaser(void *arg) {
  *(int *)arg = run(second, "release");
  return NULL;
}

/* ------------------------------------------------------------ console */
static void *console(void *arg) {
  char line[256];
  while (fgets(line, sizeof line, stdin)) {}
  return NULL;
}

/* --------------------------------------------------------- allocmutex */
static pthread_mutex_t heap = PTHREAD_MUTEX_INITIALIZER;
static void *guarded_alloc(void *ud, void *p, size_t osize, size_t nsize) {
  pthread_mutex_lock(&heap);
  void *r = NULL;
  if (nsize == 0) free(p);
  else r = realloc(p, nsize);
  pthread_mutex_unlock(&heap);
  return r;
}
/* Another thread of the host that uses the heap too. To make "held at the
** instant of the fork" certain rather than likely, fork handlers have it take
** the heap's mutex just before each fork and let go just after, in the parent:
** the child gets a copy of the mutex held by a thread it does not have. */
static int grab, holding;
static void *heap_user(void *arg) {
  for (;;) {
    if (__atomic_load_n(&grab, __ATOMIC_SEQ_CST)) {
      pthread_mutex_lock(&heap);
      __atomic_store_n(&holding, 1, __ATOMIC_SEQ_CST);
      while (__atomic_load_n(&grab, __ATOMIC_SEQ_CST)) usleep(100);
      __atomic_store_n(&holding, 0, __ATOMIC_SEQ_CST);
      pthread_mutex_unlock(&heap);
    }
    usleep(100);
  }
  return NULL;
}
static void heap_prepare(void) {
  __atomic_store_n(&grab, 1, __ATOMIC_SEQ_CST);
  while (!__atomic_load_n(&holding, __ATOMIC_SEQ_CST)) usleep(100);
}
static void heap_parent(void) { __atomic_store_n(&grab, 0, __ATOMIC_SEQ_CST); }

/* ---------------------------------------------------------- interrupt */
static volatile int started_flag;
static int l_started(lua_State *L) {
  __atomic_store_n(&started_flag, 1, __ATOMIC_SEQ_CST);
  return 0;
}
static void *interrupter(void *arg) {  /* after each started(): the next blocking call is interrupted */
  for (;;) {
    while (!__atomic_exchange_n(&started_flag, 0, __ATOMIC_SEQ_CST)) usleep(1000);
    usleep(300 * 1000);  /* let the call block */
    lmp_interrupt();
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: host MODE script.lua\n"); return 2; }
  const char *mode = argv[1];
  script = argv[2];
  setvbuf(stdout, NULL, _IOLBF, 0);
  pthread_t t;
  if (strcmp(mode, "plain") == 0) {
    lua_State *L = newstate(NULL);
    return finish(L, run(L, NULL));
  }
  if (strcmp(mode, "sigign") == 0) {
    signal(SIGCHLD, SIG_IGN);
    lua_State *L = newstate(NULL);
    return finish(L, run(L, NULL));
  }
  if (strcmp(mode, "reaper") == 0) {
    pthread_create(&t, NULL, reaper, NULL);
    lua_State *L = newstate(NULL);
    return finish(L, run(L, NULL));
  }
  if (strcmp(mode, "loader") == 0) {
    pthread_create(&t, NULL, loader, NULL);
    pthread_join(t, NULL);
    if (loader_failed) return finish(loaded, 1);
    return finish(loaded, run(loaded, "run"));
  }
  if (strcmp(mode, "locks") == 0) {
    lua_State *L = newstate(NULL);
    second = newstate(NULL);
    if (run(L, NULL) || run(second, NULL)) return finish(L, 1);
    /* the lock travels between the states as bytes (the library's codec) */
    if (run(L, "lock")) return finish(L, 1);
    lua_getglobal(L, "shared");
    size_t n;
    const char *s = lua_tolstring(L, -1, &n);
    lua_pushlstring(second, s, n);
    lua_setglobal(second, "shared");
    lua_pop(L, 1);
    int failed = 0;
    pthread_create(&t, NULL, releaser, &failed);
    pthread_join(t, NULL);
    if (!failed) failed = run(L, "after");
    lua_close(second);
    return finish(L, failed);
  }
  if (strcmp(mode, "console") == 0) {
    pthread_create(&t, NULL, console, NULL);
    usleep(100 * 1000);  /* let it block in fgets, holding stdin's lock */
    lua_State *L = newstate(NULL);
    int failed = run(L, NULL);
    lua_close(L);
    puts(failed ? "host: failed" : "host: ok");
    fflush(stdout);
    _exit(failed);  /* the console thread still reads */
  }
  if (strcmp(mode, "allocmutex") == 0) {
    lua_State *L = newstate(guarded_alloc);
    pthread_create(&t, NULL, heap_user, NULL);
    pthread_atfork(heap_prepare, heap_parent, NULL);
    int failed = run(L, NULL);
    puts(failed ? "host: failed" : "host: ok");
    fflush(stdout);
    _exit(failed);  /* the heap thread runs on */
  }
  if (strcmp(mode, "interrupt") == 0) {
    lua_State *L = newstate(NULL);
    lua_pushcfunction(L, l_started);
    lua_setglobal(L, "started");
    pthread_create(&t, NULL, interrupter, NULL);
    return finish(L, run(L, NULL));
  }
  fprintf(stderr, "host: unknown mode %s\n", mode);
  return 2;
}
