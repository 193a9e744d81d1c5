/* process.c: fork, exit, wait and signal processes (the OS side of Process and Pool). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mp.h"
#include "queue.h"

/* glibc 2.32+ tells whether the process ever had another thread (__libc_single_threaded) */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
#include <sys/single_threaded.h>
#define MP_KNOWS_THREADS 1
#else
#define MP_KNOWS_THREADS 0
#endif

/* The children this process started (core.fork), by pid.
**
** A child is tracked from fork until its owner has its exit status. Whoever
** reads the status first (core.reap, core.waitpid, the exit handler, a wait
** that is then interrupted) keeps it here, so a later wait for that pid returns
** it instead of ECHILD. This matters because a Ctrl-C can land between the
** kernel's answer and Lua: lua.c's SIGINT handler sets a hook that fires when
** our C function returns, and the results it pushed are thrown away.
**
** core.reap and core.waitpid drop the status once returned, unless the caller
** passes keep (Process does, and calls core.forget once the status is stored in
** the object) or the interpreter was interrupted meanwhile (the result is about
** to be lost, so it is kept for the next ask). mp_proc_reaped is called exactly
** once per child, when its status is read.
**
** At exit (at_exit) daemons are killed and the others waited for, as Python
** does; a Ctrl-C ends that wait (see at_exit). The first MP_KIDS_HERE records
** sit in mp_fk (see mp.h), the others in a malloc'd array. */
typedef mp_kid kid;
static kid *kids = mp_fk.proc_kids;
static int capkids = MP_KIDS_HERE;
#define nkids (mp_fk.proc_nkids)
static int atexit_set;
#define mainpid (mp_fk.proc_mainpid)  /* the process whose kids these are */
/* getpid() is a system call; the pool checks its owner on every call. The
** cached value is renewed in every child by a fork handler (renew_pid), whoever forks. */
#define mypid (mp_fk.pid)
mp_forkstate mp_fk __attribute__((aligned(MP_FORKSTATE_ALIGN))) = { .proc_watch_fd = -1 };

static kid *findkid(pid_t pid) {
  for (int i = nkids - 1; i >= 0; i--)  /* recent children first */
    if (kids[i].pid == pid) return &kids[i];
  return NULL;
}

/* room for one more child, made before fork (so a child is never untracked) */
static int kids_reserve(void) {
  if (nkids < capkids) return 1;
  int cap = capkids * 2;
  kid *k = kids == mp_fk.proc_kids ? malloc((size_t)cap * sizeof *k) : realloc(kids, (size_t)cap * sizeof *k);
  if (!k) return 0;
  if (kids == mp_fk.proc_kids) memcpy(k, kids, (size_t)nkids * sizeof *k);
  kids = k, capkids = cap;
  return 1;
}

static void cut_lifeline(kid *k) {
  if (k->lifeline >= 0) { close(k->lifeline); k->lifeline = -1; }
}

MP_FORK_PATH static void track(pid_t pid, int daemon, int lifeline) {
  kid *k = findkid(pid);  /* a pid seen before was reaped: its old record is stale */
  if (k) cut_lifeline(k);
  else k = &kids[nkids++];
  *k = (kid){ pid, daemon, 0, 0, lifeline };
}

static void drop(kid *k) { cut_lifeline(k); *k = kids[--nkids]; }

/* Reads the status of k if it ended: 1 done, 0 running, -1 error (errno set;
** ECHILD: someone else reaped it, it is gone). */
static int collect(kid *k) {
  if (k->done) return 1;
  int status;
  pid_t r;
  do r = waitpid(k->pid, &status, WNOHANG); while (r < 0 && errno == EINTR);
  if (r == 0) return 0;
  if (r < 0) {
    int e = errno;
    if (e == ECHILD) { cut_lifeline(k); mp_proc_reaped(k->pid); }  /* gone, status lost to another reaper */
    errno = e;
    return -1;
  }
  k->done = 1, k->status = status;
  cut_lifeline(k);
  mp_proc_reaped(k->pid);
  return 1;
}

/* Flushes stdio, so that what is buffered is not written by both processes of
** a fork, nor lost at _exit: fflush(NULL), but never waiting on a host
** thread. fflush(NULL) takes the lock of every stream, stdin's included, which
** a host thread sitting in fgets(stdin) holds until someone types. So the
** three standard streams are try-locked first (stdout and stderr a few times,
** for FLUSH_TRIES ms in all: a thread printing lets go soon): FILE locks are recursive, so with
** all three held fflush(NULL) cannot wait on them. When one is held by another
** thread (in a child: by a thread the fork did not copy, which never lets go),
** only stdout and stderr are flushed, each if it could be locked; the other
** files are left as they are (a file another thread reads in a blocking call
** would trap fflush(NULL) the same way; hosts, see docs/process.md "Hosts").
**
** Most forks and exits have nothing to flush (the parent flushed before the
** fork; a child that printed nothing has nothing buffered): with glibc, a
** process that has no other thread first reads the list of open streams,
** without locking (no thread can open or close one meanwhile), and stops there
** when none holds output. Taking the locks would write to libc's pages, which
** after a fork costs a page copy in each process. */
#define FLUSH_TRIES 20
#if MP_KNOWS_THREADS
extern FILE *_IO_list_all;  /* glibc's open streams, chained by _chain (exported since 2.2.5) */
MP_FORK_PATH static int nothing_buffered(void) {
  if (!__libc_single_threaded) return 0;
  for (FILE *f = _IO_list_all; f; f = f->_chain)
    if (f->_mode > 0 || f->_IO_write_ptr > f->_IO_write_base) return 0;  /* (wide streams: not looked into) */
  return 1;
}
#else
static int nothing_buffered(void) { return 0; }
#endif

MP_FORK_PATH void mp_flush_std(void) {
  if (nothing_buffered()) return;
  FILE *fs[3] = { stdin, stdout, stderr };
  int got[3];
  for (int i = 0; i < 3; i++) {
    got[i] = ftrylockfile(fs[i]) == 0;
    for (int t = 0; !got[i] && i > 0 && t < FLUSH_TRIES; t++) {  /* (a reader of stdin holds it long) */
      usleep(1000);
      got[i] = ftrylockfile(fs[i]) == 0;
    }
  }
  if (got[0] && got[1] && got[2]) {
    fflush(NULL);
  } else {
    if (got[1]) fflush_unlocked(stdout);
    if (got[2]) fflush_unlocked(stderr);
  }
  for (int i = 0; i < 3; i++) if (got[i]) funlockfile(fs[i]);
}

/* ------------------------------------------------------------- at exit */

/* Waits for every tracked child to end. It never waits on anything but our
** children, and ends on Ctrl-C: a SIGINT that the program handles (lua.c's
** handler, still installed when a script calls os.exit) ends the wait; under the
** default action the signal kills us as usual; an ignored SIGINT stays ignored;
** a host's lmp_interrupt() ends it too.
** Children left then die with us (their lifelines: see proc_fork). */
static void wait_kids(void) {
  struct sigaction old;
  sigaction(SIGINT, NULL, &old);
  int trap = old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN;
  sigset_t set, mask;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);  /* blocked, so it is queued even where ignored */
  if (trap) sigaddset(&set, SIGINT);
  sigprocmask(SIG_BLOCK, &set, &mask);
  uint32_t gen = mp_host_interrupts();  /* lmp_interrupt ends it as a Ctrl-C does */
  for (;;) {
    int left = 0;
    for (int i = 0; i < nkids;) {
      int r = collect(&kids[i]);
      if (r < 0) { drop(&kids[i]); continue; }  /* reaped by another: gone */
      if (r == 0) left++;
      i++;
    }
    if (!left) break;
    struct timespec ts = { 0, 100 * 1000 * 1000 };  /* and a look now and then, whatever */
    if (sigtimedwait(&set, NULL, &ts) == SIGINT || mp_host_interrupts() != gen) break;
  }
  sigprocmask(SIG_SETMASK, &mask, NULL);
}

static void at_exit(void) {
  if (getpid() != mainpid) return;
  mp_flush_std();
  for (int i = 0; i < nkids; i++)
    if (kids[i].daemon && !kids[i].done) kill(kids[i].pid, SIGKILL);
  wait_kids();
}

/* exit code in Python's convention: the status, or -signal */
static int exitcode(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return -WTERMSIG(status);
  return -1;
}

static int fork_stop;  /* test hook (core._fork_stop): the next child stops as it registers */

/* Parent death. Every child is given a lifeline: a pipe whose write end only
** its parent process holds (closed in every other child by the fork handler,
** close-on-exec for what the host execs). The child owns the read end, in
** async mode with the parent-death signal as its SIGIO (F_SETSIG): when the
** parent process ends, whichever of its threads forked the child, the kernel
** closes the write end and signals the child at once, whatever it is doing (a
** long Lua task included). PR_SET_PDEATHSIG is not used: it fires when the
** forking *thread* ends, so a pool made on a host's loader thread would lose
** its workers when that thread returned. The parent closes the write end once
** it has the child's status (or learns another wait took it).
**
** The child arms its lifeline first of all, then checks that the parent is
** still there (the pipe hung up: it died before the arming), and only then does
** anything that may take time: registering in the arena's table locks its
** entry, and may wait for the allocator's lock. A child stopped (SIGSTOP) at
** any of its instructions after the arming thus dies with its parent (SIGKILL
** ends a stopped process too); one stopped before is left stopped if its
** parent dies then (if it is continued, the check ends it). */
#define watch_fd (mp_fk.proc_watch_fd)  /* this process's lifeline to its own parent */

MP_FORK_PATH static void arm_lifeline(int fd, int sig, pid_t self, int flags) {
  fcntl(fd, F_SETSIG, sig);
  fcntl(fd, F_SETOWN, self);
  fcntl(fd, F_SETFL, flags | O_ASYNC | O_NONBLOCK);
  struct pollfd p = { .fd = fd };
  p.events = POLLIN;
  if (poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLIN))) _exit(1);  /* the parent died already */
  watch_fd = fd;
}

/* core.fork([daemon [, deathsig = SIGKILL [, timeout]]]) -> pid in the parent, 0
** in the child (deathsig 0: the child outlives its parent). The child's entry in
** the arena's process table is taken under the allocator's lock, which a
** stopped process may hold: without a timeout the fork waits for it (Ctrl-C
** ends the wait); with one, once it passed, nil, "timeout", the stopped pid. */
MP_FORK_PATH static int proc_fork(lua_State *L) {
  int daemon = lua_toboolean(L, 1);
  int deathsig = (int)luaL_optinteger(L, 2, SIGKILL);
  double deadline = mp_deadline(L, 3);
  mp_arena_ensure(L);  /* every descendant shares the arena */
  /* the queues' check of their fast path, made here once rather than in every child
  ** (a pool's workers ran it each, with the page copies of what it allocates) */
  mp_queue_fast_ready(L);
  if (!atexit_set) { atexit_set = 1; mainpid = getpid(); atexit(at_exit); }
  if (!kids_reserve()) { errno = ENOMEM; return mp_pusherrno(L, "fork"); }
  pid_t stopped;
  uint64_t token = mp_proc_prefork_until(L, deadline, &stopped);  /* (may raise: before anything is held) */
  if (stopped) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    lua_pushinteger(L, stopped);
    return 3;
  }
  int life[2] = { -1, -1 };
  if (deathsig > 0 && pipe2(life, O_CLOEXEC) != 0) {
    int e = errno;
    mp_proc_parent(token, -1);
    errno = e;
    return mp_pusherrno(L, "fork (its lifeline pipe)");
  }
  mp_flush_std();  /* or buffered output would be printed by both processes */
  mp_arena_forked();
  pid_t pid = fork();
  if (pid != 0) mp_proc_parent(token, pid);
  if (pid < 0) {
    int e = errno;
    if (life[0] >= 0) { close(life[0]); close(life[1]); }
    errno = e;
    return mp_pusherrno(L, "fork");
  }
  if (pid == 0) {  /* (the fork handler closed the lifelines we inherited) */
    if (life[0] >= 0) {
      close(life[1]);
      arm_lifeline(life[0], deathsig, mypid, 0);  /* (pipe2 set no status flag; the fork handler set mypid) */
    }
    if (fork_stop) { fork_stop = 0; raise(SIGSTOP); }
    mp_proc_child(token);
    nkids = 0;
    mainpid = mypid;
    lua_pushinteger(L, 0);
    return 1;
  }
  if (fork_stop) fork_stop = 0;  /* (a write the parent makes after fork: only when needed) */
  if (life[0] >= 0) close(life[0]);
  track(pid, daemon, life[1]);
  lua_pushinteger(L, pid);
  return 1;
}

/* core._fork_stop(): for tests, the child of the next core.fork stops itself
** (SIGSTOP) as it registers in the arena's table (see proc_fork) */
static int proc_fork_stop(lua_State *L) {
  fork_stop = 1;
  return 0;
}

/* core._exit([code]): leaves at once, after flushing stdio (mp_flush_std); no
** finalizers run */
MP_FORK_PATH static int proc_exit(lua_State *L) {
  int code = (int)luaL_optinteger(L, 1, 0);
  mp_flush_std();
  _exit(code);
  return 0;
}

/* Pushes the exit code of k (done); drops it unless kept or interrupted (the
** hook set since h0 will throw the result away on return: the next ask gets it). */
static int push_status(lua_State *L, kid *k, int keep, lua_Hook h0) {
  int code = exitcode(k->status);
  if (!keep && !mp_hook_pending(L, h0)) drop(k);
  lua_pushinteger(L, code);
  return 1;
}

/* A pid we did not start (or already forgot): plain waitpid. 1 done, 0 running, -1 error. */
static int collect_other(pid_t pid, int *status) {
  pid_t r;
  do r = waitpid(pid, status, WNOHANG); while (r < 0 && errno == EINTR);
  return r == pid ? 1 : r == 0 ? 0 : -1;
}

/* core.waitpid(pid [, timeout [, keep]]) -> exitcode | nil, "timeout"|"interrupted" | nil, msg, code */
static int proc_waitpid(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  luaL_argcheck(L, pid > 0, 1, "pid must be positive");  /* never waitpid(-1): it would steal others' children */
  double deadline = mp_deadline(L, 2);
  int keep = lua_toboolean(L, 3);
  lua_Hook h0 = lua_gethook(L);
  int status = 0, fd = -1, r;
  kid *k;
  for (;;) {
    k = findkid(pid);
    r = k ? collect(k) : collect_other(pid, &status);
    if (r != 0) break;
    static int nopidfd;  /* the kernel (or valgrind) has no pidfd_open: poll the status */
    if (fd < 0 && !nopidfd) {
      fd = (int)syscall(SYS_pidfd_open, pid, 0);
      if (fd < 0 && errno == ENOSYS) nopidfd = 1;
    }
    double now = mp_now();
    if (deadline >= 0 && now >= deadline) { if (fd >= 0) close(fd); return mp_waitresult(L, MP_TIMEOUT); }
    if (mp_hook_pending(L, h0)) { if (fd >= 0) close(fd); return mp_waitresult(L, MP_INTERRUPTED); }
    double slice = 0.05;
    if (deadline >= 0 && deadline - now < slice) slice = deadline - now;
    if (fd >= 0) {
      struct pollfd p = { fd, POLLIN, 0 };
      poll(&p, 1, (int)(slice * 1000) + 1);
    } else {
      usleep((useconds_t)(slice * 1e6 / 10));  /* no pidfd: poll the status */
    }
  }
  if (fd >= 0) { int e = errno; close(fd); errno = e; }
  if (r < 0) {
    if (k) drop(k);
    return mp_pusherrno(L, "waitpid");
  }
  if (k) return push_status(L, k, keep, h0);
  lua_pushinteger(L, exitcode(status));
  return 1;
}

/* core.reap(pid [, keep]) -> exitcode, or nil while it runs (never blocks) */
static int proc_reap(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  luaL_argcheck(L, pid > 0, 1, "pid must be positive");  /* never waitpid(-1): it would steal others' children */
  int keep = lua_toboolean(L, 2);
  lua_Hook h0 = lua_gethook(L);
  int status = 0;
  kid *k = findkid(pid);
  int r = k ? collect(k) : collect_other(pid, &status);
  if (r == 0) { lua_pushnil(L); return 1; }
  if (r < 0) {
    if (k) drop(k);
    return mp_pusherrno(L, "waitpid");
  }
  if (k) return push_status(L, k, keep, h0);
  lua_pushinteger(L, exitcode(status));
  return 1;
}

/* core.forget(pid): the owner has the status it kept; a running child stays tracked */
static int proc_forget(lua_State *L) {
  kid *k = findkid((pid_t)luaL_checkinteger(L, 1));
  if (k && k->done) drop(k);
  return 0;
}
static int proc_kill(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  int sig = (int)luaL_optinteger(L, 2, SIGTERM);
  if (pid <= 0) return luaL_argerror(L, 1, "pid must be positive");
  if (kill(pid, sig) != 0) return mp_pusherrno(L, "kill");
  lua_pushboolean(L, 1);
  return 1;
}

/* (mypid: see the top of the file) */
MP_FORK_PATH static void renew_pid(void) {  /* (mypid: arena.c's fork handler renews it) */
  /* whoever forked (we or the host): the parent's children are not ours, nor
  ** are their lifelines, nor the parent's own (a child holding them would keep
  ** its siblings, or its parent, alive past the death of their parents) */
  for (int i = 0; i < nkids; i++) if (kids[i].lifeline >= 0) close(kids[i].lifeline);
  nkids = 0;
  if (watch_fd >= 0) { close(watch_fd); watch_fd = -1; }
}

static int proc_getpid(lua_State *L) { lua_pushinteger(L, mypid ? mypid : getpid()); return 1; }
static int proc_getppid(lua_State *L) { lua_pushinteger(L, getppid()); return 1; }

static int proc_cpu_count(lua_State *L) {
  cpu_set_t set;
  long n = 0;
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = sysconf(_SC_NPROCESSORS_ONLN);
  lua_pushinteger(L, n > 0 ? n : 1);
  return 1;
}

/* core.ignore_sigint(): workers leave Ctrl-C to their parent */
/* core.sigint(["ignore"|"default"]): a pool worker's first call, so on the fork
** path (a page of code of its own was a fault in every worker); the word is
** matched with no call and no string of ours to read */
MP_FORK_PATH static int proc_sigint(lua_State *L) {
  size_t n;
  const char *what = luaL_optlstring(L, 1, "ignore", &n);
  signal(SIGINT, n == 7 && memcmp(what, "default", 7) == 0 ? SIG_DFL : SIG_IGN);
  return 0;
}

/* Signal names, without sigabbrev_np (glibc 2.32+ only). */
static const struct { int n; const char *name; } signames[] = {
  {SIGHUP, "SIGHUP"}, {SIGINT, "SIGINT"}, {SIGQUIT, "SIGQUIT"}, {SIGILL, "SIGILL"},
  {SIGTRAP, "SIGTRAP"}, {SIGABRT, "SIGABRT"}, {SIGBUS, "SIGBUS"}, {SIGFPE, "SIGFPE"},
  {SIGKILL, "SIGKILL"}, {SIGUSR1, "SIGUSR1"}, {SIGSEGV, "SIGSEGV"}, {SIGUSR2, "SIGUSR2"},
  {SIGPIPE, "SIGPIPE"}, {SIGALRM, "SIGALRM"}, {SIGTERM, "SIGTERM"}, {SIGCHLD, "SIGCHLD"},
  {SIGCONT, "SIGCONT"}, {SIGSTOP, "SIGSTOP"}, {SIGTSTP, "SIGTSTP"}, {SIGTTIN, "SIGTTIN"},
  {SIGTTOU, "SIGTTOU"}, {SIGURG, "SIGURG"}, {SIGXCPU, "SIGXCPU"}, {SIGXFSZ, "SIGXFSZ"},
  {SIGVTALRM, "SIGVTALRM"}, {SIGPROF, "SIGPROF"}, {SIGWINCH, "SIGWINCH"}, {SIGIO, "SIGIO"},
  {SIGSYS, "SIGSYS"},
#ifdef SIGSTKFLT
  {SIGSTKFLT, "SIGSTKFLT"},
#endif
#ifdef SIGPWR
  {SIGPWR, "SIGPWR"},
#endif
};

static int proc_signame(lua_State *L) {  /* core.signame(n) -> "SIGKILL" */
  int n = (int)luaL_checkinteger(L, 1);
  for (size_t i = 0; i < sizeof signames / sizeof signames[0]; i++)
    if (signames[i].n == n) { lua_pushstring(L, signames[i].name); return 1; }
#ifdef SIGRTMIN
  if (n >= SIGRTMIN && n <= SIGRTMAX) { lua_pushfstring(L, "SIGRTMIN+%d", n - SIGRTMIN); return 1; }
#endif
  lua_pushfstring(L, "signal %d", n);
  return 1;
}

/* core.single_threaded() -> true when this process is known to have no other
** thread (so no lock can be copied held by a fork); false when it may have one */
static int proc_single_threaded(lua_State *L) {
#if MP_KNOWS_THREADS
  lua_pushboolean(L, __libc_single_threaded);
#else
  lua_pushboolean(L, 0);
#endif
  return 1;
}

static int proc_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

static int proc_now(lua_State *L) { lua_pushnumber(L, mp_now()); return 1; }

/* ------------------------------------------------------------- sentinel */

/* Process.sentinel: a descriptor readable once the process has ended (for
** mp.connection.wait and any poll loop). A pidfd while the child is not reaped
** (a zombie is still its pid, so no other process can have it); once its
** status was read, the pid may be reused already, so an eventfd that is
** readable from the start stands for it. The userdata owns the descriptor:
** close, __gc and __close close it, in each process its own copy. */
#define SENTINEL "multiprocessing.Sentinel"
typedef struct sentinel { int fd; } sentinel;

/* core.sentinel(pid [, ended]) -> Sentinel | nil, message, code
** ended: the caller has the exit status already (the pid may be reused). */
static int proc_sentinel(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  luaL_argcheck(L, pid > 0, 1, "pid must be positive");
  int ended = lua_toboolean(L, 2);
  sentinel *s = lua_newuserdatauv(L, sizeof *s, 0);  /* closed until it owns the fd */
  s->fd = -1;
  luaL_setmetatable(L, SENTINEL);
  kid *k = findkid(pid);
  int fd;
  if (ended || (k && k->done)) {
    fd = eventfd(1, EFD_CLOEXEC);
    if (fd < 0) return mp_pusherrno(L, "eventfd");
  } else {
    fd = (int)syscall(SYS_pidfd_open, pid, 0);  /* O_CLOEXEC is implied */
    if (fd < 0 && errno == ESRCH) fd = eventfd(1, EFD_CLOEXEC);  /* gone */
    if (fd < 0) return mp_pusherrno(L, "pidfd_open");
  }
  s->fd = fd;
  return 1;
}

static int sentinel_close(lua_State *L) {
  sentinel *s = mp_toself(L, 1, MP_CLASSES(SENTINEL));
  if (s->fd >= 0) { close(s->fd); s->fd = -1; }
  return 0;
}

static int sentinel_fileno(lua_State *L) {
  sentinel *s = mp_toself(L, 1, MP_CLASSES(SENTINEL));
  if (s->fd < 0) return luaL_error(L, "attempt to use a closed Sentinel");
  lua_pushinteger(L, s->fd);
  return 1;
}

static int proc_sleep(lua_State *L) {
  double d = luaL_checknumber(L, 1);
  double deadline = mp_now() + (d > 0 ? d : 0);
  uint32_t never = 0;
  int r = mp_futex_wait(L, &never, 0, deadline);
  if (r == MP_INTERRUPTED) return mp_waitresult(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

int mp_process_open(lua_State *L) {
  static int atfork_set;  /* (not by mypid: mp_getpid may have read it already) */
  if (!atfork_set) { atfork_set = 1; mp_atfork(renew_pid); }
  if (!mypid) mypid = getpid();
  static const luaL_Reg funcs[] = {
    {"fork", proc_fork}, {"_exit", proc_exit}, {"waitpid", proc_waitpid}, {"reap", proc_reap},
    {"forget", proc_forget}, {"kill", proc_kill}, {"getpid", proc_getpid}, {"getppid", proc_getppid},
    {"cpu_count", proc_cpu_count}, {"sigint", proc_sigint}, {"signame", proc_signame},
    {"now", proc_now}, {"sleep", proc_sleep}, {"isatty", proc_isatty}, {"_fork_stop", proc_fork_stop},
    {"sentinel", proc_sentinel}, {"single_threaded", proc_single_threaded},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  static const luaL_Reg smethods[] = { {"fileno", sentinel_fileno}, {"close", sentinel_close}, {NULL, NULL} };
  static const luaL_Reg smeta[] = { {"__gc", sentinel_close}, {"__close", sentinel_close}, {NULL, NULL} };
  mp_newclass(L, SENTINEL, smethods, smeta);
  return 0;
}

/* ------------------------------------------ children started elsewhere */

/* forkserver.c starts children without proc_fork (spawn, the forkserver's
** workers): they are tracked alike, so join, reap and the exit handler work. */
int mp_proc_reserve(void) {
  if (!atexit_set) { atexit_set = 1; mainpid = getpid(); atexit(at_exit); }
  return kids_reserve();
}

void mp_proc_track(pid_t pid, int daemon, int lifeline) { track(pid, daemon, lifeline); }

/* a child started elsewhere: fd is its lifeline's read end, armed already
** (mp_lifeline_arm in the child of spawn's fork, before exec) or to arm now */
void mp_proc_watch(int fd) { watch_fd = fd; }

void mp_lifeline_arm(int fd, int sig) { arm_lifeline(fd, sig, getpid(), fcntl(fd, F_GETFL)); }

void mp_proc_reset(void) { nkids = 0; mainpid = getpid(); }
