/* host_frames.c: the C host of examples/host (60 Hz frames, a render thread
** holding a mutex, host functions by name, work every few frames) measuring
** what the library costs it: time spent in the library per frame (p50, p99,
** worst; wall clock, and the host thread's CPU time, which leaves out the time
** it waited for a core), and with a big heap, Pool()'s time and the host's writes to its own
** heap before and after Pool() (copy-on-write). Run by `make bench-host`:
**   host_frames METHOD [--header]   METHOD: fork | forkserver
** HOST_HEAP_MB: the heap (default 2048, less when memory is short; 0: none).
** HOST_FRAMES: frames (default 300, 5 s). */
#include "../examples/host/engine.h"

#include <unistd.h>

static long mem_available_mb(void) {
  FILE *f = fopen("/proc/meminfo", "r");
  if (!f) return -1;
  char line[256];
  long kb = -1;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "MemAvailable: %ld kB", &kb) == 1) break;
  fclose(f);
  return kb < 0 ? -1 : kb / 1024;
}

/* one write per page of the heap, as a host touching its world does */
static double write_heap(volatile char *heap, size_t n, char v) {
  long page = sysconf(_SC_PAGESIZE);
  double t0 = now();
  for (size_t i = 0; i < n; i += (size_t)page) heap[i] = v;
  return now() - t0;
}

int main(int argc, char **argv) {
  const char *want = argc > 1 ? argv[1] : "fork";
  int header = argc > 2 && strcmp(argv[2], "--header") == 0;
  if (header) {
    printf("\n== C host at 60 Hz (bench/host_frames.c): library time per frame, big heap\n");
    printf("%-11s %8s %9s %9s %9s %19s %9s %11s %11s %8s\n", "method", "heap MB", "p50 ms", "p99 ms", "worst ms",
           "cpu p50/p99/worst", "Pool() ms", "write-before", "write-after", "results");
  }
  long heap_mb = getenv("HOST_HEAP_MB") ? atol(getenv("HOST_HEAP_MB")) : 2048;
  long avail = mem_available_mb();
  /* the heap, and as much again for the copies that copy-on-write makes */
  if (avail > 0 && heap_mb * 3 > avail) {
    long fit = avail / 3;
    fprintf(stderr, "host_frames: %ld MB available: heap of %ld MB instead of %ld\n", avail, fit, heap_mb);
    heap_mb = fit;
  }
  int frames = getenv("HOST_FRAMES") ? atoi(getenv("HOST_FRAMES")) : 300;
  if (frames < 10) frames = 10;

  const char *method = engine_init(want);   /* before the heap grows and before threads */
  if (strcmp(method, want) != 0) { fprintf(stderr, "host_frames: asked for %s, got %s\n", want, method); return 1; }

  size_t heap_n = (size_t)heap_mb << 20;
  char *heap = heap_n ? malloc(heap_n) : NULL;
  if (heap_n && !heap) { perror("malloc"); return 1; }
  if (heap) memset(heap, 1, heap_n);
  double before = heap ? write_heap(heap, heap_n, 2) : 0;

  pthread_t render;
  if (pthread_create(&render, NULL, render_main, NULL) != 0) { perror("pthread_create"); return 1; }
  lua_State *L = engine_lua();
  driver_load(L);
  lua_pushstring(L, method);
  lua_pushinteger(L, 2);
  driver_call(L, "start", 2, 0);
  lua_getfield(L, LUA_REGISTRYINDEX, "engine.driver");
  lua_getfield(L, -1, "pool_seconds");
  double pool_s = lua_tonumber(L, -1);
  lua_pop(L, 2);
  double after = heap ? write_heap(heap, heap_n, 3) : 0;

  double *lib = calloc((size_t)frames, sizeof *lib), *cpu = calloc((size_t)frames, sizeof *cpu);
  if (!lib || !cpu) return 1;
  run_frames(L, frames, lib, cpu);
  lua_pushnumber(L, 60);
  driver_call(L, "finish", 1, 1);
  long checked = (long)lua_tointeger(L, -1);
  lua_pop(L, 1);
  atomic_store(&rendering, 0);
  pthread_join(render, NULL);
  lua_close(L);

  double p50 = percentile(lib, frames, 50), p99 = percentile(lib, frames, 99), worst = lib[frames - 1];
  double c50 = percentile(cpu, frames, 50), c99 = percentile(cpu, frames, 99), cworst = cpu[frames - 1];
  printf("%-11s %8ld %9.3f %9.3f %9.3f %5.3f/%5.3f/%5.3f %9.2f %9.1f ms %8.1f ms %8ld\n", method, heap_mb, p50 * 1e3,
         p99 * 1e3, worst * 1e3, c50 * 1e3, c99 * 1e3, cworst * 1e3, pool_s * 1e3, before * 1e3, after * 1e3, checked);
  free(lib);
  free(cpu);
  free(heap);
  return 0;
}
