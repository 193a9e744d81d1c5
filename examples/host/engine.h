/* engine.h: the pieces of a game-engine-like host shared by examples/host/host.c
** and bench/host_frames.c: a render thread that holds the scene's mutex most of
** the time, host C functions that tasks call (registered with lmp_register), the
** forkserver (lmp_forkserver_start), and a Lua driver that submits work every few
** frames and drives the pool every frame with pool:poll. See docs/embedding.md. */
#ifndef ENGINE_H
#define ENGINE_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"
#include "multiprocessing.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_until(double t) {
  double d = t - now();
  if (d <= 0) return;
  struct timespec ts = { (time_t)d, (long)((d - (double)(time_t)d) * 1e9) };
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* ------------------------------------------------------------ the scene */
static pthread_mutex_t scene_lock = PTHREAD_MUTEX_INITIALIZER;
static long scene_frames;            /* written by the render thread, under scene_lock */
static const lua_Integer scene_scale = 3;
static atomic_int rendering = 1;

/* The render thread: holds scene_lock about 90% of the time, as a renderer
** walking the scene does. A worker forked while it held the lock would find it
** held forever: the forkserver (or the atfork handlers below) prevents that. */
static void *render_main(void *arg) {
  (void)arg;
  while (atomic_load(&rendering)) {
    pthread_mutex_lock(&scene_lock);
    double until = now() + 0.0018;
    while (now() < until) scene_frames++;
    pthread_mutex_unlock(&scene_lock);
    sleep_until(now() + 0.0002);
  }
  return NULL;
}

/* With the fork start method, fork() copies only the thread that calls it: the
** host's own atfork handlers make sure no host lock is held in the child. */
static void scene_prepare(void) { pthread_mutex_lock(&scene_lock); }
static void scene_release(void) { pthread_mutex_unlock(&scene_lock); }

/* ------------------------------------------------ host functions (tasks call them) */
/* Engine.Math.sum(t): the sum of the integers t[1..#t] */
static int math_sum(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer s = 0, n = (lua_Integer)lua_rawlen(L, 1);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    s += lua_tointeger(L, -1);
    lua_pop(L, 1);
  }
  lua_pushinteger(L, s);
  return 1;
}

/* Engine.Scene.scale(): read under the scene's lock, as real bindings do */
static int scene_scale_get(lua_State *L) {
  pthread_mutex_lock(&scene_lock);
  lua_Integer k = scene_scale;
  pthread_mutex_unlock(&scene_lock);
  lua_pushinteger(L, k);
  return 1;
}

/* Engine.now(): seconds, monotonic (the driver times the library's calls with it) */
static int engine_now(lua_State *L) {
  lua_pushnumber(L, now());
  return 1;
}

/* Engine.cpu(): this thread's CPU seconds (the library's calls without the time the
** thread waited for a core: the machine may have fewer cores than busy threads) */
static int engine_cpu(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
  return 1;
}

/* Registers the host functions (before any Pool) and starts the forkserver (before
** any thread); want "fork": no forkserver, the atfork handlers instead. Returns
** the start method the Lua driver should use. */
static const char *engine_init(const char *want) {
  /* every C function of the Engine table: a task that reads Engine gets the whole
  ** table sent (with the forkserver or spawn it has no copy of its own) */
  if (lmp_register("Engine.Math.sum", math_sum) != 0 || lmp_register("Engine.Scene.scale", scene_scale_get) != 0 ||
      lmp_register("Engine.now", engine_now) != 0 || lmp_register("Engine.cpu", engine_cpu) != 0) {
    perror("lmp_register");
    exit(1);
  }
  if (want && strcmp(want, "fork") == 0) {
    pthread_atfork(scene_prepare, scene_release, scene_release);
    return "fork";
  }
  if (lmp_forkserver_start() != 0) {
    perror("lmp_forkserver_start");
    exit(1);
  }
  return "forkserver";
}

/* A Lua state with the library (no .lua file needed) and the global Engine. */
static lua_State *engine_lua(void) {
  lua_State *L = luaL_newstate();
  if (!L) { fprintf(stderr, "no memory for Lua\n"); exit(1); }
  luaL_openlibs(L);
  luaL_requiref(L, "multiprocessing", luaopen_multiprocessing, 0);
  lua_pop(L, 1);
  lua_newtable(L);                                               /* Engine */
  lua_newtable(L);
  lua_pushcfunction(L, math_sum); lua_setfield(L, -2, "sum");
  lua_setfield(L, -2, "Math");
  lua_newtable(L);
  lua_pushcfunction(L, scene_scale_get); lua_setfield(L, -2, "scale");
  lua_setfield(L, -2, "Scene");
  lua_pushcfunction(L, engine_now); lua_setfield(L, -2, "now");
  lua_pushcfunction(L, engine_cpu); lua_setfield(L, -2, "cpu");
  lua_setglobal(L, "Engine");
  return L;
}

/* The Lua side: D.start(method, processes), D.frame(i) -> seconds spent in the
** library this frame (wall, and this thread's CPU), D.finish(timeout) -> results
** checked, D.pool_seconds. */
static const char DRIVER[] =
  "local mp = require 'multiprocessing'\n"
  "local D, pool, pending, head = {}, nil, {}, 1\n"
  "local N, checked, submitted = 2000, 0, 0\n"
  "local APPLY_EVERY, MAP_EVERY, MAP_ITEMS = 6, 12, 5\n"
  "local function task(t)  -- runs in a worker: host functions by their registered names\n"
  "  local s, k, r = Engine.Math.sum(t), Engine.Scene.scale(), {}\n"
  "  for i = 1, #t do r[i] = t[i] * k end\n"
  "  r.sum = s\n"
  "  return r\n"
  "end\n"
  "local function input(seed)\n"
  "  local t = {}\n"
  "  for i = 1, N do t[i] = seed + i end\n"
  "  return t\n"
  "end\n"
  "local function check(r, seed)\n"
  "  assert(type(r) == 'table' and #r == N, 'a result of the wrong size')\n"
  "  assert(r.sum == N * seed + N * (N + 1) // 2, 'a wrong sum from Engine.Math.sum')\n"
  "  assert(r[1] == 3 * (seed + 1) and r[N] == 3 * (seed + N), 'a wrong item')\n"
  "  checked = checked + 1\n"
  "end\n"
  "function D.start(method, processes)\n"
  "  local opts = { processes = processes }\n"
  "  if method ~= 'fork' then opts.start_method = method end\n"
  "  local t0 = Engine.now()\n"
  "  pool = mp.Pool(opts)\n"
  "  D.pool_seconds = Engine.now() - t0\n"
  "end\n"
  "-- results arrive through callbacks, delivered by pool:poll within its budget: the\n"
  "-- library gets FRAME_BUDGET seconds a frame, less what submitting took already\n"
  "local FRAME_BUDGET, MIN_POLL = 0.0004, 0.0001\n"
  "local function drive(spent)\n"
  "  pool:poll(math.max(MIN_POLL, FRAME_BUDGET - (spent or 0)))\n"
  "  while pending[head] and pending[head].done do pending[head] = nil; head = head + 1 end\n"
  "end\n"
  "local errs = {}\n"
  "local function settle(p, ok, e) if not ok then errs[#errs + 1] = tostring(e) end; p.done = true end\n"
  "local function failed(p) return function(e) settle(p, false, 'a task failed: ' .. tostring(e)) end end\n"
  "function D.frame(i)\n"
  "  local lib, cpu = 0, 0\n"
  "  if i % APPLY_EVERY == 0 then\n"
  "    local t, p = input(i), { seed = i }\n"
  "    local t0, c0 = Engine.now(), Engine.cpu()\n"
  "    p.ar = pool:apply_async(task, { t }, { error_callback = failed(p),\n"
  "      callback = function(r) settle(p, pcall(check, r, p.seed)) end })\n"
  "    lib, cpu = lib + Engine.now() - t0, cpu + Engine.cpu() - c0\n"
  "    pending[#pending + 1] = p\n"
  "    submitted = submitted + 1\n"
  "  end\n"
  "  if i % MAP_EVERY == 0 then\n"
  "    local items, p = {}, { seeds = {} }\n"
  "    for j = 1, MAP_ITEMS do p.seeds[j] = i * 100 + j; items[j] = input(p.seeds[j]) end\n"
  "    local t0, c0 = Engine.now(), Engine.cpu()\n"
  "    p.ar = pool:map_async(task, items, { chunksize = 1, error_callback = failed(p), callback = function(rs)\n"
  "      settle(p, pcall(function() for j = 1, MAP_ITEMS do check(rs[j], p.seeds[j]) end end))\n"
  "    end })\n"
  "    lib, cpu = lib + Engine.now() - t0, cpu + Engine.cpu() - c0\n"
  "    pending[#pending + 1] = p\n"
  "    submitted = submitted + MAP_ITEMS\n"
  "  end\n"
  "  local t0, c0 = Engine.now(), Engine.cpu()\n"
  "  drive(cpu)\n"
  "  return lib + Engine.now() - t0, cpu + Engine.cpu() - c0\n"
  "end\n"
  "function D.finish(timeout)\n"
  "  local deadline = Engine.now() + timeout\n"
  "  while pending[head] and Engine.now() < deadline do\n"
  "    drive()\n"
  "    if pending[head] then pending[head].ar:wait(0.01); pending[head].ar:ready() end\n"
  "  end\n"
  "  pool:close()\n"
  "  pool:join()\n"
  "  assert(not errs[1], errs[1])\n"
  "  assert(not pending[head], 'results still pending at the deadline')\n"
  "  assert(checked == submitted, ('checked %d of %d results'):format(checked, submitted))\n"
  "  return checked\n"
  "end\n"
  "return D\n";

/* Calls D[name] with the arguments already pushed (nargs), leaving nres results;
** exits on an error, with its message. */
static void driver_call(lua_State *L, const char *name, int nargs, int nres) {
  lua_getfield(L, LUA_REGISTRYINDEX, "engine.driver");
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
  lua_insert(L, -1 - nargs);
  if (lua_pcall(L, nargs, nres, 0) != LUA_OK) {
    fprintf(stderr, "host: %s: %s\n", name, lua_tostring(L, -1));
    exit(1);
  }
}

static void driver_load(lua_State *L) {
  if (luaL_loadbuffer(L, DRIVER, sizeof DRIVER - 1, "=driver") != LUA_OK || lua_pcall(L, 0, 1, 0) != LUA_OK) {
    fprintf(stderr, "host: driver: %s\n", lua_tostring(L, -1));
    exit(1);
  }
  lua_setfield(L, LUA_REGISTRYINDEX, "engine.driver");
}

/* Runs nframes frames at 60 Hz; lib[i], cpu[i]: seconds spent in the library in
** frame i, wall and this thread's CPU (cpu may be NULL). */
static void run_frames(lua_State *L, int nframes, double *lib, double *cpu) {
  double next = now();
  for (int i = 1; i <= nframes; i++) {
    next += 1.0 / 60;
    lua_pushinteger(L, i);
    driver_call(L, "frame", 1, 2);
    lib[i - 1] = lua_tonumber(L, -2);
    if (cpu) cpu[i - 1] = lua_tonumber(L, -1);
    lua_pop(L, 2);
    sleep_until(next);  /* the rest of the frame is the host's */
  }
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* sorts v and gives its p-th percentile (0..100) */
static double percentile(double *v, int n, double p) {
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  int i = (int)(p / 100.0 * (n - 1) + 0.5);
  return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

#endif
