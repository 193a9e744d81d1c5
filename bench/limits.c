/* bench/limits.c: the machine's limits the benchmark rows are compared with (docs/benchmarks.md).
** Built and run by bench/run.lua at the start and at the end of each run; prints
** "<limit>\t<seconds>" lines, each the median of 7 batches:
**   futex   one round trip between two processes that sleep in futex_wait (a shared word,
**           FUTEX_WAKE after each store): the floor of a message answered by a sleeping peer
**   spin    one round trip between two processes that spin on a shared word: the floor of
**           any request and answer between two processes
**   memcpy  seconds per byte of memcpy of 64 MiB (buffers touched first)
**   fork    fork + _exit(0) in the child + waitpid in the parent, from this small process
**   fork2   two such forks at once, then both waits: the floor of starting and ending a pool of
**           two processes (their exits overlap, on two cores)
** Every wait is bounded: a peer that does not answer within 10 s ends the probe. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BATCHES 7

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v) {
  qsort(v, BATCHES, sizeof *v, cmp);
  return v[BATCHES / 2];
}

static void futex_wait(_Atomic uint32_t *w, uint32_t val) {
  struct timespec ts = { 1, 0 };
  syscall(SYS_futex, w, FUTEX_WAIT, val, &ts, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *w) { syscall(SYS_futex, w, FUTEX_WAKE, 1, NULL, NULL, 0); }

/* waits until *w == want; sleeping (futex) or spinning; 0 once the deadline passed */
static int await(_Atomic uint32_t *w, uint32_t want, int sleep, double deadline) {
  for (unsigned spins = 0;; spins++) {
    uint32_t v = atomic_load_explicit(w, memory_order_acquire);
    if (v == want) return 1;
    if (sleep) futex_wait(w, v);
    else __builtin_ia32_pause();
    if ((spins & 1023) == 0 && now() > deadline) return 0;
  }
}

/* seconds per round trip, median of BATCHES batches of n; -1 if the peer failed */
static double pingpong(int sleep, int n) {
  _Atomic uint32_t *w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (w == MAP_FAILED) return -1;
  atomic_store(w, 0);
  double deadline = now() + 10;
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {  /* answers odd values with the next even one */
    for (uint32_t k = 1;; k += 2) {
      if (!await(w, k, sleep, deadline)) _exit(1);
      atomic_store_explicit(w, k + 1, memory_order_release);
      if (sleep) futex_wake(w);
      if (k + 1 == (uint32_t)(2 * n * BATCHES)) _exit(0);
    }
  }
  double t[BATCHES];
  uint32_t k = 0;
  int ok = 1;
  for (int b = 0; b < BATCHES && ok; b++) {
    double t0 = now();
    for (int i = 0; i < n && ok; i++) {
      atomic_store_explicit(w, ++k, memory_order_release);
      if (sleep) futex_wake(w);
      ok = await(w, ++k, sleep, deadline);
    }
    t[b] = (now() - t0) / n;
  }
  if (!ok) kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
  munmap((void *)w, 4096);
  return ok ? median(t) : -1;
}

static double copy_rate(void) {
  size_t n = (size_t)64 << 20;
  char *a = malloc(n), *b = malloc(n);
  if (!a || !b) return -1;
  memset(a, 1, n);
  memset(b, 2, n);
  double t[BATCHES];
  for (int i = 0; i < BATCHES; i++) {
    double t0 = now();
    memcpy(i & 1 ? a : b, i & 1 ? b : a, n);
    t[i] = (now() - t0) / (double)n;
  }
  volatile char sink = a[n / 2] + b[n / 3];
  (void)sink;
  free(a);
  free(b);
  return median(t);
}

/* seconds to fork n children at once (each leaves at once) and wait for them all */
static double fork_cost(int n) {
  double t[BATCHES];
  for (int i = 0; i < BATCHES; i++) {
    double t0 = now();
    for (int j = 0; j < 20; j++) {
      pid_t pids[2];
      for (int k = 0; k < n; k++) {
        pids[k] = fork();
        if (pids[k] < 0) return -1;
        if (pids[k] == 0) _exit(0);
      }
      for (int k = 0; k < n; k++) waitpid(pids[k], NULL, 0);
    }
    t[i] = (now() - t0) / 20;
  }
  return median(t);
}

int main(void) {
  printf("futex\t%.9f\n", pingpong(1, 2000));
  printf("spin\t%.9f\n", pingpong(0, 20000));
  printf("memcpy\t%.12f\n", copy_rate());
  printf("fork\t%.9f\n", fork_cost(1));
  printf("fork2\t%.9f\n", fork_cost(2));
  return 0;
}
