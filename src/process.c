/* process.c: fork, exit, wait and signal processes (the OS side of Process and Pool). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mp.h"

/* Children this process started and has not reaped, for the exit handler:
** daemons are killed, the others waited for (as Python does at exit). */
#define MAXKIDS 4096
static struct kid { pid_t pid; int daemon; } kids[MAXKIDS];
static int nkids;
static int atexit_set;
static pid_t mainpid;  /* the process that registered the exit handler */

static void track(pid_t pid, int daemon) {
  if (nkids < MAXKIDS) kids[nkids++] = (struct kid){ pid, daemon };
}

static void untrack(pid_t pid) {
  mp_proc_reaped(pid);
  for (int i = 0; i < nkids; i++)
    if (kids[i].pid == pid) { kids[i] = kids[--nkids]; return; }
}

static void at_exit(void) {
  if (getpid() != mainpid) return;
  for (int i = 0; i < nkids; i++) if (kids[i].daemon) kill(kids[i].pid, SIGKILL);
  for (int i = 0; i < nkids; i++) {
    fflush(NULL);
    while (waitpid(kids[i].pid, NULL, 0) < 0 && errno == EINTR) {}
  }
  nkids = 0;
}

/* exit code in Python's convention: the status, or -signal */
static int exitcode(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return -WTERMSIG(status);
  return -1;
}

/* core.fork([daemon [, pdeathsig]]) -> pid in the parent, 0 in the child */
static int proc_fork(lua_State *L) {
  int daemon = lua_toboolean(L, 1);
  int deathsig = luaL_optinteger(L, 2, SIGKILL);
  mp_arena_ensure(L);  /* every descendant shares the arena */
  if (!atexit_set) { atexit_set = 1; mainpid = getpid(); atexit(at_exit); }
  pid_t parent = getpid();
  fflush(NULL);  /* or buffered output would be printed by both processes */
  uint64_t token = mp_proc_prefork(L);
  mp_arena_forked();
  pid_t pid = fork();
  if (pid != 0) mp_proc_parent(token, pid);
  if (pid < 0) return mp_pusherrno(L, "fork");
  if (pid == 0) {
    mp_proc_child(token);
    nkids = 0;
    mainpid = getpid();
    if (deathsig > 0) {
      prctl(PR_SET_PDEATHSIG, deathsig);
      if (getppid() != parent) _exit(1);  /* the parent died before we could ask */
    }
    lua_pushinteger(L, 0);
    return 1;
  }
  track(pid, daemon);
  lua_pushinteger(L, pid);
  return 1;
}

/* core._exit([code]): leaves at once, after flushing stdio; no finalizers run */
static int proc_exit(lua_State *L) {
  int code = (int)luaL_optinteger(L, 1, 0);
  fflush(NULL);
  _exit(code);
  return 0;
}

/* core.waitpid(pid [, timeout]) -> exitcode | nil, "timeout"|"interrupted" */
static int proc_waitpid(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  double deadline = mp_deadline(L, 2);
  lua_Hook h0 = lua_gethook(L);
  int status, fd = -1;
  for (;;) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) {
      if (fd >= 0) close(fd);
      untrack(pid);
      return mp_pusherrno(L, "waitpid");
    }
    static int nopidfd;  /* the kernel (or valgrind) has no pidfd_open: poll the status */
    if (fd < 0 && !nopidfd) {
      fd = (int)syscall(SYS_pidfd_open, pid, 0);
      if (fd < 0 && errno == ENOSYS) nopidfd = 1;
    }
    double now = mp_now();
    if (deadline >= 0 && now >= deadline) { if (fd >= 0) close(fd); return mp_waitresult(L, MP_TIMEOUT); }
    if (lua_gethook(L) != h0) { if (fd >= 0) close(fd); return mp_waitresult(L, MP_INTERRUPTED); }
    double slice = 0.05;
    if (deadline >= 0 && deadline - now < slice) slice = deadline - now;
    if (fd >= 0) {
      struct pollfd p = { fd, POLLIN, 0 };
      poll(&p, 1, (int)(slice * 1000) + 1);
    } else {
      usleep((useconds_t)(slice * 1e6 / 10));  /* no pidfd: poll the status */
    }
  }
  if (fd >= 0) close(fd);
  untrack(pid);
  lua_pushinteger(L, exitcode(status));
  return 1;
}

/* core.reap(pid) -> exitcode, or nil while it runs (never blocks) */
static int proc_reap(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  int status;
  pid_t r = waitpid(pid, &status, WNOHANG);
  if (r == pid) { untrack(pid); lua_pushinteger(L, exitcode(status)); return 1; }
  if (r < 0 && errno == ECHILD) { untrack(pid); return mp_pusherrno(L, "waitpid"); }
  lua_pushnil(L);
  return 1;
}

static int proc_kill(lua_State *L) {
  pid_t pid = (pid_t)luaL_checkinteger(L, 1);
  int sig = (int)luaL_optinteger(L, 2, SIGTERM);
  if (pid <= 0) return luaL_argerror(L, 1, "pid must be positive");
  if (kill(pid, sig) != 0) return mp_pusherrno(L, "kill");
  lua_pushboolean(L, 1);
  return 1;
}

/* getpid() is a system call; the pool checks its owner on every call. The
** cached value is renewed in every child by a fork handler, whoever forks. */
static pid_t mypid;
static void renew_pid(void) { mypid = getpid(); }

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
static int proc_sigint(lua_State *L) {
  const char *what = luaL_optstring(L, 1, "ignore");
  signal(SIGINT, strcmp(what, "default") == 0 ? SIG_DFL : SIG_IGN);
  return 0;
}

static int proc_signum(lua_State *L) {  /* core.signame(n) -> "SIGKILL" */
  int n = (int)luaL_checkinteger(L, 1);
  const char *s = sigabbrev_np(n);
  if (s) lua_pushfstring(L, "SIG%s", s); else lua_pushfstring(L, "signal %d", n);
  return 1;
}

static int proc_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

static int proc_now(lua_State *L) { lua_pushnumber(L, mp_now()); return 1; }

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
  if (!mypid) {
    mypid = getpid();
    pthread_atfork(NULL, NULL, renew_pid);
  }
  static const luaL_Reg funcs[] = {
    {"fork", proc_fork}, {"_exit", proc_exit}, {"waitpid", proc_waitpid}, {"reap", proc_reap},
    {"kill", proc_kill}, {"getpid", proc_getpid}, {"getppid", proc_getppid},
    {"cpu_count", proc_cpu_count}, {"sigint", proc_sigint}, {"signame", proc_signum},
    {"now", proc_now}, {"sleep", proc_sleep}, {"isatty", proc_isatty},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
