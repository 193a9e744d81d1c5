/* wait.c: clocks, futex waits in interruptible slices, robust shared mutexes. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "mp.h"
#include "../include/multiprocessing.h"

/* A blocking call sleeps at most this long at a time, then looks whether the
** interpreter was interrupted (lua.c's SIGINT handler installs a hook). */
#define SLICE 0.05

/* a hint to the CPU inside a spin loop */
#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

/* ------------------------------------------------- lmp_interrupt
** A host without lua.c's SIGINT handler (a game, a tool) calls lmp_interrupt()
** from any thread or a signal handler. It stores a generation and its time
** (two atomic stores: async-signal-safe). Every wait of the library checks for
** Ctrl-C at each slice (mp_hook_pending); a thread that sees a new generation
** while it was waiting (its previous check at most INTR_RECENT before the
** interrupt: the same wait, or the next slice of a Lua loop of waits) sets
** lua.c's own hook on its lua_State, from its own thread, so the call ends
** exactly as at Ctrl-C: nil, "interrupted" and then "interrupted!" raised at
** the next instruction, or the call's own "interrupted! (...)" error. A thread
** that was not waiting then only takes note: later calls are not affected.
** The time of a thread's last check is noted only when it moved by INTR_NOTE
** (so "at most INTR_RECENT" is to within that): it lives in the dynamic TLS
** block, in the heap, and a wait just after a fork (a join) would otherwise
** write its page while the child shares it, a page copy at each fork. */
#define INTR_RECENT 0.25
#define INTR_NOTE 0.01
static uint32_t intr_gen;
static int64_t intr_ns;
static __thread uint32_t seen_gen;
static __thread double last_check = -1e9;

LMP_API void lmp_interrupt(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  /* async-signal-safe */
  __atomic_store_n(&intr_ns, (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&intr_gen, 1, __ATOMIC_SEQ_CST);
}

static void stop_hook(lua_State *L, lua_Debug *ar) {  /* lua.c's lstop */
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

static void host_interrupt(lua_State *L) {
  uint32_t g = __atomic_load_n(&intr_gen, __ATOMIC_SEQ_CST);
  double now = mp_now();
  if (g != seen_gen) {
    double at = (double)__atomic_load_n(&intr_ns, __ATOMIC_SEQ_CST) * 1e-9;
    seen_gen = g;
    if (at - last_check <= INTR_RECENT + INTR_NOTE)
      lua_sethook(L, stop_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT, 1);
  }
  if (now - last_check >= INTR_NOTE) last_check = now;
}

uint32_t mp_host_interrupts(void) { return __atomic_load_n(&intr_gen, __ATOMIC_SEQ_CST); }

int mp_hook_pending(lua_State *L, lua_Hook h0) {
  host_interrupt(L);
  lua_Hook h = lua_gethook(L);
  if (h != h0) return 1;
  return h && lua_gethookmask(L) == (LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT) &&
         lua_gethookcount(L) == 1;
}

double mp_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double mp_deadline(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  lua_Number t = luaL_checknumber(L, idx);
  luaL_argcheck(L, t == t, idx, "timeout is NaN");
  if (t < 0) t = 0;
  if (isinf(t)) return -1;
  return mp_now() + t;
}

static double slice_until(double deadline, int *last) {
  double now = mp_now(), until = now + SLICE;
  *last = 0;
  if (deadline >= 0 && deadline <= until) { until = deadline; *last = 1; }
  return until - now;
}

static struct timespec to_ts(double d) {
  struct timespec ts;
  if (d < 0) d = 0;
  ts.tv_sec = (time_t)d;
  ts.tv_nsec = (long)((d - (double)ts.tv_sec) * 1e9);
  return ts;
}

int mp_futex_wait(lua_State *L, uint32_t *addr, uint32_t val, double deadline) {
  lua_Hook h0 = L ? lua_gethook(L) : NULL;
  for (;;) {
    if (__atomic_load_n(addr, __ATOMIC_SEQ_CST) != val) return MP_WOKE;
    int last;
    double d = slice_until(deadline, &last);
    if (d <= 0) return MP_TIMEOUT;
    struct timespec ts = to_ts(d);
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, val, &ts, NULL, 0);
    if (r == 0) return MP_WOKE;
    if (errno == EAGAIN) return MP_WOKE;
    if (L && mp_hook_pending(L, h0)) return MP_INTERRUPTED;
    if (errno == ETIMEDOUT && last) return MP_TIMEOUT;
  }
}

void mp_futex_wake(uint32_t *addr, int n) {
  syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

void mp_mutex_init(pthread_mutex_t *m, int recursive) {
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutexattr_settype(&a, recursive ? PTHREAD_MUTEX_RECURSIVE : PTHREAD_MUTEX_ERRORCHECK);
  pthread_mutex_init(m, &a);
  pthread_mutexattr_destroy(&a);
}

/* For the library's own short critical sections: an owner that died is
** recovered silently (its section only moved plain data). */
void mp_lock(pthread_mutex_t *m) {
  if (pthread_mutex_lock(m) == EOWNERDEAD) pthread_mutex_consistent(m);
}

/* Is process pid stopped (SIGSTOP, job control, a tracer)? /proc/<pid>/stat
** says T or t. When it cannot tell, the answer is no: a holder is waited for. */
int mp_pid_stopped(pid_t pid) {
  if (pid <= 0) return 0;
  char path[40], st[256];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  int f = open(path, O_RDONLY | O_CLOEXEC);
  if (f < 0) return 0;
  ssize_t n = read(f, st, sizeof st - 1);
  close(f);
  if (n <= 0) return 0;
  st[n] = 0;
  const char *e = strrchr(st, ')');
  return e && e[1] == ' ' && (e[2] == 'T' || e[2] == 't');
}

/* An internal lock (the arena's, a Barrier's or a Condition's own): its
** sections are a few instructions long, so a holder that runs is waited for,
** whatever the deadline (a preempted holder on a busy machine is no fault).
** The wait ends without the lock only on Ctrl-C (L) or, once the deadline
** passed, when the holder is stopped: a stopped process can be continued but
** not robbed. The holder writes its pid at *owner once it has the lock and
** clears it before letting go (POSIX tells no mutex's owner). The fast path
** is one trylock. */
int mp_ilock(lua_State *L, pthread_mutex_t *m, const pid_t *owner, double deadline, pid_t *holder) {
  int r = pthread_mutex_trylock(m);
  if (__builtin_expect(r == 0, 1)) return MP_LOCKED;
  lua_Hook h0 = L ? lua_gethook(L) : NULL;
  for (int spin = 0; r == EBUSY && spin < 100; spin++) {
    cpu_relax();
    r = pthread_mutex_trylock(m);
  }
  for (;;) {
    if (r == 0) return MP_LOCKED;
    if (r == EOWNERDEAD) return MP_LOCK_OWNERDEAD;  /* the caller repairs, then makes it consistent */
    if (r != EBUSY && r != ETIMEDOUT && r != EINTR) return MP_LOCK_DEADLOCK;
    if (L && mp_hook_pending(L, h0)) {
      if (holder) *holder = owner ? __atomic_load_n(owner, __ATOMIC_RELAXED) : 0;
      return MP_LOCK_INTERRUPTED;
    }
    double until = mp_now() + SLICE;
    if (deadline >= 0 && mp_now() >= deadline) {
      pid_t h = owner ? __atomic_load_n(owner, __ATOMIC_RELAXED) : 0;
      if (h && mp_pid_stopped(h)) {
        if (holder) *holder = h;
        return MP_LOCK_TIMEOUT;
      }
    } else if (deadline >= 0 && deadline < until) {
      until = deadline;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    struct timespec dt = to_ts(until - mp_now());
    ts.tv_sec += dt.tv_sec; ts.tv_nsec += dt.tv_nsec;
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    r = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
  }
}

void mp_unlock(pthread_mutex_t *m) { pthread_mutex_unlock(m); }

int mp_mutex_lock(lua_State *L, pthread_mutex_t *m, double deadline) {
  lua_Hook h0 = L ? lua_gethook(L) : NULL;
  int r = pthread_mutex_trylock(m);
  /* a short spin first: critical sections are usually a few instructions long,
  ** and sleeping in the kernel costs far more than waiting them out */
  for (int spin = 0; r == EBUSY && spin < 100 && deadline != 0; spin++) {
    cpu_relax();
    r = pthread_mutex_trylock(m);
  }
  for (;;) {
    if (r == 0) return MP_LOCKED;
    if (r == EOWNERDEAD) { pthread_mutex_consistent(m); return MP_LOCK_OWNERDEAD; }
    if (r == EDEADLK) return MP_LOCK_DEADLOCK;
    if (r != EBUSY && r != ETIMEDOUT && r != EINTR) return MP_LOCK_DEADLOCK;
    int last;
    double d = slice_until(deadline, &last);
    if (d <= 0) return MP_LOCK_TIMEOUT;
    if (r == ETIMEDOUT && last) return MP_LOCK_TIMEOUT;
    if (L && mp_hook_pending(L, h0)) return MP_LOCK_INTERRUPTED;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    struct timespec dt = to_ts(d);
    ts.tv_sec += dt.tv_sec; ts.tv_nsec += dt.tv_nsec;
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    r = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
    if (r == ETIMEDOUT && !last) r = EBUSY;
  }
}

/* Has process pid ended? A zombie has (its parent has not read its status yet).
** pidfd_open finds it even then: its descriptor polls readable once the process
** has exited. Without pidfd_open (Linux < 5.3), /proc/<pid>/stat says Z or X.
** When it cannot tell (no /proc), the answer is no: nothing is taken from a
** process that may be alive. */
int mp_pid_gone(pid_t pid) {
  if (pid <= 0) return 0;
#ifdef SYS_pidfd_open
  int fd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (fd >= 0) {
    struct pollfd p = { fd, POLLIN, 0 };
    int r = poll(&p, 1, 0);
    close(fd);
    return r > 0;
  }
  if (errno == ESRCH) return 1;
#endif
  char path[40], st[256];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  int f = open(path, O_RDONLY | O_CLOEXEC);
  if (f < 0) return errno == ENOENT || errno == ESRCH;
  ssize_t n = read(f, st, sizeof st - 1);
  close(f);
  if (n <= 0) return 0;
  st[n] = 0;
  const char *e = strrchr(st, ')');  /* the name may hold anything, even ')' */
  return e && e[1] == ' ' && (e[2] == 'Z' || e[2] == 'X');
}

void mp_take_interrupt(lua_State *L) {
  if (L && lua_gethook(L) && mp_hook_pending(L, lua_gethook(L))) lua_sethook(L, NULL, 0, 0);
}

int mp_pcall(lua_State *L, int nargs, int nresults) {
  int st = lua_pcall(L, nargs, nresults, 0);
  /* Ctrl-C: the hook took itself off as it raised (set before the call, or during it:
  ** a SIGINT may land anywhere, so the error's text says it, not the hook seen before) */
  if (st == LUA_ERRRUN && !lua_gethook(L) && lua_type(L, -1) == LUA_TSTRING &&
      strstr(lua_tostring(L, -1), "interrupted!"))
    lua_error(L);
  return st;
}

const char *mp_callname(lua_State *L) {
  lua_Debug ar;
  if (L && lua_getstack(L, 0, &ar) && lua_getinfo(L, "n", &ar) && ar.name) return ar.name;
  return "the call";
}

int mp_waitresult(lua_State *L, int r) {
  lua_pushnil(L);
  lua_pushstring(L, r == MP_TIMEOUT ? "timeout" : r == MP_SHUTDOWN ? "shutdown" : "interrupted");
  return 2;
}

/* Errno names, without strerrorname_np (glibc 2.32+ only): the module loads on
** older C libraries. EWOULDBLOCK and ENOTSUP are EAGAIN and EOPNOTSUPP on Linux. */
static const struct { int n; const char *name; } errnames[] = {
  {EPERM, "EPERM"}, {ENOENT, "ENOENT"}, {ESRCH, "ESRCH"}, {EINTR, "EINTR"},
  {EIO, "EIO"}, {ENXIO, "ENXIO"}, {E2BIG, "E2BIG"}, {ENOEXEC, "ENOEXEC"},
  {EBADF, "EBADF"}, {ECHILD, "ECHILD"}, {EAGAIN, "EAGAIN"}, {ENOMEM, "ENOMEM"},
  {EACCES, "EACCES"}, {EFAULT, "EFAULT"}, {EBUSY, "EBUSY"}, {EEXIST, "EEXIST"},
  {EXDEV, "EXDEV"}, {ENODEV, "ENODEV"}, {ENOTDIR, "ENOTDIR"}, {EISDIR, "EISDIR"},
  {EINVAL, "EINVAL"}, {ENFILE, "ENFILE"}, {EMFILE, "EMFILE"}, {ENOTTY, "ENOTTY"},
  {ETXTBSY, "ETXTBSY"}, {EFBIG, "EFBIG"}, {ENOSPC, "ENOSPC"}, {ESPIPE, "ESPIPE"},
  {EROFS, "EROFS"}, {EMLINK, "EMLINK"}, {EPIPE, "EPIPE"}, {EDOM, "EDOM"},
  {ERANGE, "ERANGE"}, {EDEADLK, "EDEADLK"}, {ENAMETOOLONG, "ENAMETOOLONG"}, {ENOLCK, "ENOLCK"},
  {ENOSYS, "ENOSYS"}, {ENOTEMPTY, "ENOTEMPTY"}, {ELOOP, "ELOOP"}, {ENOMSG, "ENOMSG"},
  {EIDRM, "EIDRM"}, {EOVERFLOW, "EOVERFLOW"}, {EILSEQ, "EILSEQ"}, {ENOTSOCK, "ENOTSOCK"},
  {EDESTADDRREQ, "EDESTADDRREQ"}, {EMSGSIZE, "EMSGSIZE"}, {EPROTOTYPE, "EPROTOTYPE"}, {ENOPROTOOPT, "ENOPROTOOPT"},
  {EPROTONOSUPPORT, "EPROTONOSUPPORT"}, {EOPNOTSUPP, "EOPNOTSUPP"}, {EAFNOSUPPORT, "EAFNOSUPPORT"}, {EADDRINUSE, "EADDRINUSE"},
  {EADDRNOTAVAIL, "EADDRNOTAVAIL"}, {ENETDOWN, "ENETDOWN"}, {ENETUNREACH, "ENETUNREACH"}, {ECONNABORTED, "ECONNABORTED"},
  {ECONNRESET, "ECONNRESET"}, {ENOBUFS, "ENOBUFS"}, {EISCONN, "EISCONN"}, {ENOTCONN, "ENOTCONN"},
  {ETIMEDOUT, "ETIMEDOUT"}, {ECONNREFUSED, "ECONNREFUSED"}, {EHOSTUNREACH, "EHOSTUNREACH"}, {EALREADY, "EALREADY"},
  {EINPROGRESS, "EINPROGRESS"}, {ECANCELED, "ECANCELED"}, {EOWNERDEAD, "EOWNERDEAD"}, {ENOTRECOVERABLE, "ENOTRECOVERABLE"},
  {EDQUOT, "EDQUOT"}, {ESTALE, "ESTALE"}, {EPROTO, "EPROTO"}, {EBADMSG, "EBADMSG"},
  {ENOLINK, "ENOLINK"},
#ifdef ENODATA
  {ENODATA, "ENODATA"},
#endif
#ifdef ETIME
  {ETIME, "ETIME"},
#endif
#ifdef ENOSR
  {ENOSR, "ENOSR"},
#endif
#ifdef ENOSTR
  {ENOSTR, "ENOSTR"},
#endif
#ifdef ESHUTDOWN
  {ESHUTDOWN, "ESHUTDOWN"},
#endif
#ifdef ETOOMANYREFS
  {ETOOMANYREFS, "ETOOMANYREFS"},
#endif
#ifdef EHOSTDOWN
  {EHOSTDOWN, "EHOSTDOWN"},
#endif
#ifdef EUSERS
  {EUSERS, "EUSERS"},
#endif
#ifdef ENOMEDIUM
  {ENOMEDIUM, "ENOMEDIUM"},
#endif
#ifdef EMEDIUMTYPE
  {EMEDIUMTYPE, "EMEDIUMTYPE"},
#endif
#ifdef ERFKILL
  {ERFKILL, "ERFKILL"},
#endif
};

int mp_pusherrno(lua_State *L, const char *what) {
  int e = errno;
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s", what, strerror(e));
  for (size_t i = 0; i < sizeof errnames / sizeof errnames[0]; i++)
    if (errnames[i].n == e) { lua_pushstring(L, errnames[i].name); return 3; }
  lua_pushfstring(L, "errno %d", e);  /* one this table lacks: its number, never another's name */
  return 3;
}

int mp_nregs(const luaL_Reg *r) {
  int n = 0;
  while (r && r[n].name) n++;
  return n;
}

int mp_newmetatable(lua_State *L, const char *name, int n) {
  if (luaL_getmetatable(L, name) != LUA_TNIL) return 0;  /* (as luaL_newmetatable: left on the stack) */
  lua_pop(L, 1);
  lua_createtable(L, 0, n + 1);
  lua_pushstring(L, name);
  lua_setfield(L, -2, "__name");
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, name);
  return 1;
}

void mp_newclass(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta) {
  mp_newmetatable(L, name, mp_nregs(meta) + 1);  /* (+ __index) */
  if (meta) luaL_setfuncs(L, meta, 0);
  lua_createtable(L, 0, mp_nregs(methods));
  if (methods) luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}
