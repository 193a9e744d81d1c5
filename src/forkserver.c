/* forkserver.c: the start methods other than fork: spawn (a fresh interpreter)
** and forkserver (workers forked from a small server started early).
**
** The start message. What a child needs (its entry point, the target with its
** upvalues, the args, a pool's queues...) is one Lua value encoded by the codec
** (lua/multiprocessing/context.lua builds it). Its handles own a counted
** reference each, as a queue message's do, so nothing is pinned for good: the
** parent's message (a userdata) owns them until the child takes them (a
** spawned child's answer, a forkserver worker's go: see each), then the
** child's ledger does, then its decoded handles (mp_obj_adopt). Framed as
**   "LMPS" | u32 nhandles | u64 image | nhandles x u64 offset | codec bytes
** image: a fingerprint of this build of the core (where its functions lie
** relative to each other): a spawned interpreter that loaded another build
** refuses the message instead of calling a destructor at a wrong address.
**
** spawn. The parent forks and at once execs the executable (mp.set_executable)
** with `-e "require'multiprocessing.spawn'.main()"`; the child does only
** async-signal-safe calls between fork and exec, so host threads holding locks
** do not matter. Its environment carries LUA_PATH_5_4/LUA_CPATH_5_4 (the
** parent's package.path and cpath) and LUA_MP_SPAWN=<fd> of a socket on which
** the parent writes a spawn header (the arena's descriptor number, address,
** size, the child's arena token, the codec's key) and the start message. The
** arena's memfd crosses exec as an open descriptor (its close-on-exec flag
** cleared in the child only); the child maps it at the parent's address
** (MAP_FIXED_NOREPLACE) or fails saying so. Every other descriptor is closed
** at exec.
**
** forkserver. A server process, forked from the process that uses it (at its
** first use, or by mp.forkserver_start / lmp_forkserver_start), closes every
** descriptor but stdio, its socket and the arena's, and makes its own lua_State
** with the modules loaded; it never runs user code and holds no lock. For each
** request (the child's arena token, its daemon flag, the start message) it
** clones a worker with CLONE_PARENT: the worker is the requester's child, not
** the server's, so the requester's waitpid, reap, exit handler and pidfds work
** as for fork, the server never has zombies, and a worker dies with the
** requester process: the requester makes the worker's lifeline (see proc_fork
** in process.c), sends its read end with the request (SCM_RIGHTS) and keeps the
** write end; the worker arms it first of all. glibc's fork() cannot make a sibling, so the
** clone is raw; the worker then does what glibc's fork does in a child: its
** thread id is written where glibc keeps it (CLONE_CHILD_SETTID at the
** address PR_GET_TID_ADDRESS gives, so robust mutexes record the right owner),
** its robust list (the server's, empty) is registered with the kernel again,
** and the core's own fork handlers run (mp_atfork). The server dies with the process
** that started it (its own lifeline, and EOF on its socket), and is a daemon
** child of it: killed and reaped at exit. A process forked from the one that
** started a server starts its own on first use (CLONE_PARENT makes children
** of the server's parent only). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lualib.h"
#include "mp.h"
#include "../include/multiprocessing.h"

extern char **environ;

#define SMAGIC 0x53504d4cU  /* "LMPS": a start message */
#define HMAGIC 0x48504d4cU  /* "LMPH": a spawn header, or a forkserver request */
#define WAIT_START 30.0     /* seconds a child or the server may take to answer */

/* ------------------------------------------------ functions in the arena */

static void anchor(void) {}

uint64_t mp_fn_pack(mp_dtor f) {
  return f ? (uint64_t)((uintptr_t)f - (uintptr_t)&anchor) : 0;
}

mp_dtor mp_fn_unpack(uint64_t v) {
  return v ? (mp_dtor)((uintptr_t)&anchor + (uintptr_t)v) : NULL;
}

/* this build of the core: where some of its functions lie relative to one
** another, mixed with the version */
static uint64_t image_id(void) {
  uintptr_t fns[] = { (uintptr_t)&mp_arena_attach, (uintptr_t)&mp_decode, (uintptr_t)&mp_encode,
                      (uintptr_t)&mp_obj_release_with, (uintptr_t)&luaopen_multiprocessing_core };
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    h ^= (uint64_t)(fns[i] - (uintptr_t)&anchor);
    h *= 0x100000001b3ULL;
  }
  for (const char *v = MP_VERSION; *v; v++) { h ^= (unsigned char)*v; h *= 0x100000001b3ULL; }
  return h;
}

/* ---------------------------------------------------- the start message */

/* A start message made by core._startmsg: a userdata that owns the message's
** references until a child takes them (core._spawn, core._forkserver_fork set
** `owned` to 0 once one did) or they are released (a failed start does it at
** once; a message dropped unused, by an error or a Ctrl-C anywhere on the
** way, when it is collected or closed). */
#define STARTMSG "multiprocessing.StartMessage"
typedef struct startmsg { size_t len; pid_t pid; int owned; char bytes[]; } startmsg;

/* the handles' offsets of a start message (checked by its taker) */
static size_t msg_handles(const char *s, size_t n, const char **offs) {
  uint32_t w[2];
  if (n < 16) return 0;
  memcpy(w, s, 8);
  if (w[0] != SMAGIC || n < 16 + 8 * (size_t)w[1]) return 0;
  *offs = s + 16;
  return w[1];
}

static uint64_t msg_off(const char *offs, size_t i) {
  uint64_t off;
  memcpy(&off, offs + 8 * i, 8);  /* (unaligned in a Lua string) */
  return off;
}

/* the message's references released, in the process that counted them */
static void msg_release(startmsg *m) {
  if (!m->owned || m->pid != getpid()) return;
  m->owned = 0;
  const char *offs;
  size_t nh = msg_handles(m->bytes, m->len, &offs);
  for (size_t i = 0; i < nh; i++) {
    uint64_t off = msg_off(offs, i);
    mp_obj_drop(off, mp_obj_dtor(((mp_obj *)MP_PTR(off))->type));
  }
}

/* a child took them: from now they are in its ledger (released at its death),
** then its decoded handles' (fs_startdecode). Called once the parent can no
** longer release them (spawn: after the child said so; forkserver: after the
** requester's go). */
static void msg_take(const char *s, size_t n) {
  const char *offs;
  size_t nh = msg_handles(s, n, &offs);
  for (size_t i = 0; i < nh; i++) mp_obj_adopted(msg_off(offs, i));
}

static int startmsg_gc(lua_State *L) {
  msg_release(luaL_checkudata(L, 1, STARTMSG));
  return 0;
}

/* core._startmsg(value) -> a start message: the value encoded, a reference
** counted for each handle (the message owns them until a child takes them) */
static int fs_startmsg(lua_State *L) {
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  mp_enc *e = mp_encode(L, 1, "start message");
  const mp_sent *hl;
  size_t nh = mp_enc_handles(e, &hl);
  size_t n = mp_enc_size(e), head = 16 + 8 * nh;
  startmsg *m = lua_newuserdatauv(L, sizeof(startmsg) + head + n, 0);
  m->len = head + n, m->pid = getpid(), m->owned = 0;
  luaL_setmetatable(L, STARTMSG);
  char *p = m->bytes;
  uint32_t w[2] = { SMAGIC, (uint32_t)nh };
  uint64_t img = image_id();
  memcpy(p, w, 8);
  memcpy(p + 8, &img, 8);
  for (size_t i = 0; i < nh; i++) memcpy(p + 16 + 8 * i, &hl[i].off, 8);
  mp_enc_copy(e, p + head);
  for (size_t i = 0; i < nh; i++) mp_obj_count(hl[i].off);  /* (nothing raises from here) */
  m->owned = 1;
  mp_enc_own(e);
  mp_enc_done(L, e);
  return 1;
}

static int decode_protected(lua_State *L) {
  mp_decode(L, lua_touserdata(L, 1), (size_t)lua_tointeger(L, 2));
  return 1;
}

/* core._startdecode(bytes) -> value: in the child that took the message
** (msg_take: its references are in this process's ledger), once: the decoded
** handles take them; those no handle took (a decoding that failed half way)
** are released */
static int fs_startdecode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  uint32_t w[2];
  uint64_t img;
  if (n < 16) return luaL_error(L, "not a start message");
  memcpy(w, s, 8);
  memcpy(&img, s + 8, 8);
  if (w[0] != SMAGIC || n < 16 + 8 * (size_t)w[1]) return luaL_error(L, "not a start message");
  if (img != image_id())
    return luaL_error(L, "this process loaded another build of multiprocessing.core than its parent "
                         "(package.cpath must find the same core.so)");
  size_t nh = w[1], head = 16 + 8 * nh;
  uint64_t *offs = lua_newuserdatauv(L, nh ? 8 * nh : 1, 0);
  memcpy(offs, s + 16, 8 * nh);
  lua_pushcfunction(L, decode_protected);
  lua_pushlightuserdata(L, (void *)(s + head));
  lua_pushinteger(L, (lua_Integer)(n - head));
  mp_adopt a = { offs, (uint32_t)nh }, *prev = mp_obj_adopt(&a);
  int r = lua_pcall(L, 2, 1, 0);
  mp_obj_adopt(prev);
  pid_t me = getpid();
  for (size_t i = 0; i < nh; i++)
    if (offs[i]) mp_obj_release_with(offs[i], me, mp_obj_dtor(((mp_obj *)MP_PTR(offs[i]))->type));
  if (r != LUA_OK) return lua_error(L);
  return 1;
}

/* ------------------------------------------------------------- helpers */

static int send_all(int fd, const char *p, size_t n, lua_State *L, pid_t peer, const char **why) {
  double deadline = mp_now() + WAIT_START;
  lua_Hook h0 = L ? lua_gethook(L) : NULL;
  while (n) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r > 0) { p += r, n -= (size_t)r; continue; }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno != EAGAIN) { *why = strerror(errno); return -1; }
    if (L && mp_hook_pending(L, h0)) { *why = "interrupted"; return -1; }
    if (peer && mp_pid_gone(peer)) { *why = "it died before reading its start message"; return -1; }
    if (mp_now() > deadline) { *why = "it did not read its start message in 30 s"; return -1; }
    struct pollfd pf = { fd, POLLOUT, 0 };
    poll(&pf, 1, 50);
  }
  return 0;
}

/* reads n bytes; 0 ok, -1 (errno; EPIPE at end of file) */
static int recv_all(int fd, void *buf, size_t n) {
  char *p = buf;
  while (n) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) { if (r == 0) errno = EPIPE; return -1; }
    p += r, n -= (size_t)r;
  }
  return 0;
}

/* waits until fd is readable; 0 ready, or why not */
static const char *wait_readable(int fd, lua_State *L, pid_t peer, double seconds) {
  double deadline = mp_now() + seconds;
  lua_Hook h0 = L ? lua_gethook(L) : NULL;
  for (;;) {
    struct pollfd pf = { fd, POLLIN, 0 };
    int r = poll(&pf, 1, 50);
    if (r > 0) return NULL;
    if (L && mp_hook_pending(L, h0)) return "interrupted";
    if (peer && mp_pid_gone(peer)) {  /* (what it wrote before dying is still there) */
      if (poll(&pf, 1, 0) > 0) return NULL;
      return "it died";
    }
    if (mp_now() > deadline) return "no answer in 30 s";
  }
}

/* closes every descriptor from 3 up but keep[0..n) */
static void close_others(const int *keep, int n) {
  DIR *d = opendir("/proc/self/fd");
  if (!d) return;
  int dfd = dirfd(d);
  int fds[1024], k = 0;
  struct dirent *de;
  while ((de = readdir(d)) && k < 1024) {
    int fd = atoi(de->d_name);
    if (fd < 3 || fd == dfd || de->d_name[0] == '.') continue;
    int kept = 0;
    for (int i = 0; i < n; i++) if (keep[i] == fd) kept = 1;
    if (!kept) fds[k++] = fd;
  }
  closedir(d);
  for (int i = 0; i < k; i++) close(fds[i]);
}

/* PATH search, in the parent (execvp is not async-signal-safe) */
static char *find_exe(const char *exe) {
  if (strchr(exe, '/')) return access(exe, X_OK) == 0 ? strdup(exe) : NULL;
  const char *path = getenv("PATH");
  if (!path || !*path) path = "/usr/local/bin:/usr/bin:/bin";
  size_t el = strlen(exe);
  while (*path) {
    const char *c = strchr(path, ':');
    size_t dl = c ? (size_t)(c - path) : strlen(path);
    char *full = malloc(dl + el + 2);
    if (!full) return NULL;
    memcpy(full, path, dl);
    full[dl] = '/';
    memcpy(full + dl + 1, exe, el + 1);
    if (dl && access(full, X_OK) == 0) return full;
    free(full);
    path += dl + (c ? 1 : 0);
  }
  return NULL;
}

/* ----------------------------------------------------------------- spawn */

/* The spawn handshake: the parent writes a spawnhdr and the start message;
** the child answers an fsans once it has mapped the arena and read the message
** (len 0: from now the message's references are the child's), or says why it
** cannot (len bytes of reason follow) and leaves. Without that answer (the
** child died, refused, or the parent gave up: Ctrl-C, no answer in 30 s, and
** then killed it) the parent releases them. */
typedef struct spawnhdr {
  uint32_t magic, arenafd;
  uint64_t addr, size, token, key[2], len, image;
  int32_t lifeline, passfd;
} spawnhdr;

/* in a child started by spawn or the forkserver: the descriptor its parent
** passed with its start (a pool's eventfd), or -1; core._passed_fd() */
static int passed_fd = -1;

typedef struct fsans { uint32_t magic, len; } fsans;

/* kills a child that will not be used and waits (5 s at most) until it is gone */
static void kill_gone(pid_t pid) {
  kill(pid, SIGKILL);
  for (int i = 0; i < 5000 && !mp_pid_gone(pid); i++) usleep(1000);
}

/* the spawned child's answer: NULL (it took the message) or why not (in err) */
static const char *spawn_answer(lua_State *L, int sv, int ep, pid_t pid, char *err, size_t errn) {
  double deadline = mp_now() + WAIT_START;
  lua_Hook h0 = lua_gethook(L);
  for (;;) {
    struct pollfd pf[2] = { { sv, POLLIN, 0 }, { ep, POLLIN, 0 } };
    int r = poll(pf, ep >= 0 ? 2 : 1, 50);
    if (r > 0 && ep >= 0 && pf[1].revents) {  /* exec failed (its errno), or EOF: it ran */
      int e;
      ssize_t k;
      do k = read(ep, &e, sizeof e); while (k < 0 && errno == EINTR);
      if (k == (ssize_t)sizeof e) { snprintf(err, errn, "cannot run it: %s", strerror(e)); return err; }
      ep = -1;
    }
    if (r > 0 && pf[0].revents) {
      fsans a;
      if (recv_all(sv, &a, sizeof a) != 0 || a.magic != HMAGIC) return "it died before taking its start message";
      if (!a.len) return NULL;
      size_t n = a.len < errn - 1 ? a.len : errn - 1;
      if (recv_all(sv, err, n) != 0) n = 0;
      err[n] = 0;
      return err;
    }
    if (r > 0) continue;
    if (mp_hook_pending(L, h0)) return "interrupted";
    if (mp_pid_gone(pid)) {
      struct pollfd p2[2] = { { sv, POLLIN, 0 }, { ep, POLLIN, 0 } };
      if (poll(p2, ep >= 0 ? 2 : 1, 0) > 0) continue;  /* (what it wrote before dying) */
      return "it died before taking its start message";
    }
    if (mp_now() > deadline) return "it did not take its start message in 30 s";
  }
}

/* did exec fail? (its errno is written before it exits) */
static int exec_error(int ep, char *err, size_t errn) {
  int e;
  struct pollfd pf = { ep, POLLIN, 0 };
  if (poll(&pf, 1, 0) <= 0 || read(ep, &e, sizeof e) != (ssize_t)sizeof e) return 0;
  snprintf(err, errn, "cannot run it: %s", strerror(e));
  return 1;
}

/* after a failed handshake, the child killed: did it take the message all the same? */
static int spawn_took(int sv) {
  fsans a;
  struct pollfd pf = { sv, POLLIN, 0 };
  return poll(&pf, 1, 0) > 0 && recv(sv, &a, sizeof a, MSG_DONTWAIT) == (ssize_t)sizeof a &&
         a.magic == HMAGIC && a.len == 0;
}

/* core._spawn(exe, startmsg, daemon, path, cpath [, fd]) -> pid | nil, message
** (fd: a descriptor the child gets too, core._passed_fd() there; a child
** started that could not take its message is killed and reaped) */
static int fs_spawn(lua_State *L) {
  const char *exe = luaL_checkstring(L, 1);
  startmsg *sm = luaL_checkudata(L, 2, STARTMSG);
  luaL_argcheck(L, sm->owned && sm->pid == getpid(), 2, "start message already used");
  size_t mlen = sm->len;
  const char *msg = sm->bytes;
  int daemon = lua_toboolean(L, 3);
  const char *path = luaL_checkstring(L, 4), *cpath = luaL_checkstring(L, 5);
  int passfd = (int)luaL_optinteger(L, 6, -1);
  mp_arena_ensure(L);
  if (!mp_proc_reserve()) return luaL_error(L, "cannot spawn: out of memory");
  uint64_t token = mp_proc_prefork(L);  /* (may raise: before anything is held) */
  char *full = find_exe(exe);
  if (!full) {
    msg_release(sm);
    mp_proc_parent(token, -1);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot spawn: executable '%s' not found or not executable", exe);
    return 2;
  }
  int sv[2], ep[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    msg_release(sm), mp_proc_parent(token, -1), free(full);
    return mp_pusherrno(L, "cannot spawn");
  }
  if (pipe2(ep, O_CLOEXEC) != 0) {
    msg_release(sm), mp_proc_parent(token, -1), close(sv[0]), close(sv[1]), free(full);
    return mp_pusherrno(L, "cannot spawn");
  }
  int life[2];  /* the child's lifeline (see proc_fork in process.c) */
  if (pipe2(life, O_CLOEXEC) != 0) {
    msg_release(sm), mp_proc_parent(token, -1), close(sv[0]), close(sv[1]), close(ep[0]), close(ep[1]), free(full);
    return mp_pusherrno(L, "cannot spawn");
  }
  /* the environment: the parent's, with our variables in front */
  size_t ne = 0;
  while (environ[ne]) ne++;
  char **envp = malloc((ne + 4) * sizeof *envp);
  char *ev[3] = { NULL, NULL, NULL };
  if (envp) {
    size_t k = 0;
    ev[0] = malloc(strlen(path) + 16), ev[1] = malloc(strlen(cpath) + 16), ev[2] = malloc(32);
    if (ev[0] && ev[1] && ev[2]) {
      sprintf(ev[0], "LUA_PATH_5_4=%s", path);
      sprintf(ev[1], "LUA_CPATH_5_4=%s", cpath);
      sprintf(ev[2], "LUA_MP_SPAWN=%d", sv[1]);
      envp[k++] = ev[0], envp[k++] = ev[1], envp[k++] = ev[2];
      for (size_t i = 0; i < ne; i++)
        if (strncmp(environ[i], "LUA_PATH_5_4=", 13) && strncmp(environ[i], "LUA_CPATH_5_4=", 14) &&
            strncmp(environ[i], "LUA_MP_SPAWN=", 13))
          envp[k++] = environ[i];
      envp[k] = NULL;
    }
  }
  if (!envp || !ev[0] || !ev[1] || !ev[2]) {
    free(ev[0]), free(ev[1]), free(ev[2]), free(envp), free(full);
    close(sv[0]), close(sv[1]), close(ep[0]), close(ep[1]), close(life[0]), close(life[1]);
    msg_release(sm), mp_proc_parent(token, -1);
    return luaL_error(L, "cannot spawn: out of memory");
  }
  char *argv[] = { full, "-e", "require'multiprocessing.spawn'.main()", NULL };
  int afd = mp_arena_fd();
  pid_t parent = getpid();
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);  /* no handler of ours runs in the child */
  pid_t pid = fork();
  if (pid == 0) {  /* async-signal-safe calls only, until exec */
    /* the lifeline first: armed here, its state (owner, signal, async) belongs
    ** to the open pipe and so crosses exec; _exits if the parent is gone */
    close(life[1]);
    mp_lifeline_arm(life[0], SIGKILL);
    if (getppid() != parent) _exit(1);
    fcntl(life[0], F_SETFD, 0);
    if (passfd >= 0) fcntl(passfd, F_SETFD, 0);
    int fl = fcntl(afd, F_GETFD);
    fcntl(afd, F_SETFD, fl & ~FD_CLOEXEC);
    fl = fcntl(sv[1], F_GETFD);
    fcntl(sv[1], F_SETFD, fl & ~FD_CLOEXEC);
    signal(SIGPIPE, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(full, argv, envp);
    int e = errno;
    if (write(ep[1], &e, sizeof e) < 0) _exit(127);
    _exit(127);
  }
  int fe = errno;
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  mp_proc_parent(token, pid);
  free(ev[0]), free(ev[1]), free(ev[2]), free(envp);
  close(sv[1]), close(ep[1]), close(life[0]);
  if (pid < 0) {
    free(full), close(sv[0]), close(ep[0]), close(life[1]);
    msg_release(sm);
    errno = fe;
    return mp_pusherrno(L, "cannot spawn");
  }
  spawnhdr h = { HMAGIC, (uint32_t)afd, (uint64_t)(uintptr_t)mp_arena_base(), mp_arena_size(), token, { 0, 0 },
                 mlen, image_id(), life[0], passfd };
  mp_codec_key(h.key);
  char err[256];
  const char *why = NULL;
  if (send_all(sv[0], (const char *)&h, sizeof h, L, pid, &why) == 0 && send_all(sv[0], msg, mlen, L, pid, &why) == 0)
    why = spawn_answer(L, sv[0], ep[0], pid, err, sizeof err);
  else if (exec_error(ep[0], err, sizeof err))  /* (it closed its end) */
    why = err;
  close(ep[0]);
  if (!why) {
    close(sv[0]), free(full);
    sm->owned = 0;  /* the child's now */
    mp_proc_track(pid, daemon, life[1]);
    lua_pushinteger(L, pid);
    return 1;
  }
  if (why != err) snprintf(err, sizeof err, "%s", why);
  close(life[1]);
  kill_gone(pid);
  if (spawn_took(sv[0])) sm->owned = 0;  /* (its death releases them) */
  else msg_release(sm);
  close(sv[0]);
  int st;  /* reaped here (or, if it is not gone yet, by its owner later) */
  if (waitpid(pid, &st, WNOHANG) == pid) mp_proc_reaped(pid);
  else mp_proc_track(pid, 1, -1);
  lua_pushnil(L);
  lua_pushfstring(L, "cannot spawn: the new interpreter '%s' (pid %d): %s", full, (int)pid, err);
  free(full);
  return 2;
}

/* the child's answer to its parent: 0 (it took the message) or why not */
static void answer(int fd, const char *why) {
  size_t n = why ? strlen(why) : 0;
  fsans a = { HMAGIC, (uint32_t)n };
  if (send(fd, &a, sizeof a, MSG_NOSIGNAL) == (ssize_t)sizeof a && n) send(fd, why, n, MSG_NOSIGNAL);
}

/* core._attach() -> start message: in a spawned interpreter, maps the arena,
** reads what its parent sent and takes the message's references (msg_take) */
static int fs_attach(lua_State *L) {
  const char *v = getenv("LUA_MP_SPAWN");
  if (!v) return luaL_error(L, "multiprocessing.spawn: not started by a spawning parent (no LUA_MP_SPAWN)");
  int fd = atoi(v);
  unsetenv("LUA_MP_SPAWN");
  fcntl(fd, F_SETFD, FD_CLOEXEC);
  spawnhdr h;
  if (recv_all(fd, &h, sizeof h) != 0 || h.magic != HMAGIC)
    return luaL_error(L, "multiprocessing.spawn: no spawn header from the parent (%s)", strerror(errno));
  fcntl((int)h.arenafd, F_SETFD, FD_CLOEXEC);
  char err[200];
  const char *why = NULL;
  if (h.image != image_id())
    why = "this process loaded another build of multiprocessing.core than its parent "
          "(package.cpath must find the same core.so)";
  else if ((why = mp_arena_attach((int)h.arenafd, h.addr, h.size, h.token)) != NULL)
    why = (snprintf(err, sizeof err, "cannot map the parent's shared memory: %s", why), err);
  if (why) { answer(fd, why); return luaL_error(L, "multiprocessing.spawn: %s", why); }
  mp_codec_setkey(h.key);
  mp_proc_reset();
  if (h.lifeline >= 0) {  /* armed before exec: now ours, closed in our children */
    fcntl(h.lifeline, F_SETFD, FD_CLOEXEC);
    mp_proc_watch(h.lifeline);
  }
  if (h.passfd >= 0) fcntl(h.passfd, F_SETFD, FD_CLOEXEC);
  passed_fd = h.passfd;
  char *buf = lua_newuserdatauv(L, h.len ? h.len : 1, 0);
  if (recv_all(fd, buf, h.len) != 0)  /* (the parent failed: it keeps the references) */
    return luaL_error(L, "multiprocessing.spawn: the start message was cut (%s)", strerror(errno));
  answer(fd, NULL);  /* then take them: a kill between the two leaks them, never releases them twice */
  close(fd);
  msg_take(buf, h.len);
  lua_pushlstring(L, buf, h.len);
  return 1;
}

/* ------------------------------------------------------------ forkserver */

/* A request: this header, with the requester's descriptors 0, 1 and 2 (those
** open: bits 0-2 of `stdio` say which) in its control message, so that a worker
** writes where its requester writes now, not where it wrote when the server
** started, the read end of the worker's lifeline (bit 3; see proc_fork in
** process.c: the requester keeps the write end), a descriptor to pass (bit 4:
** a pool's eventfd) and the worker's end of a socket pair (bit 5): its go;
** then len bytes of start message. The answer: an fsrep. The worker waits for
** one byte of go before it touches the arena: the requester sends it once it
** has read the worker's pid, so the message's references are either the
** worker's (go sent) or still the requester's (no go: the worker leaves at end
** of file). A request that failed half way (Ctrl-C, no answer) leaves the
** socket out of step: that server is killed and not used again
** (fs_drop_server). */
enum { NIO = 6 };  /* a request's descriptors at most: stdio, lifeline, passed, go */

typedef struct fsreq {
  uint32_t magic, daemon;
  uint64_t token, len;
  int32_t requester, stdio;
} fsreq;

typedef struct fsrep { int32_t pid, err; } fsrep;

static struct {
  pid_t pid, owner;  /* the server, and the process that started it */
  int fd;
  pthread_mutex_t lock;  /* one request at a time (hosts with threads) */
  int go;                /* during a request: the requester's end of its go */
} fs = { 0, 0, -1, PTHREAD_MUTEX_INITIALIZER, -1 };

static uint32_t *tidaddr;   /* in the server: where glibc keeps the thread id */
static void *rhead;         /* ... and its robust list head */
static size_t rlen;

static pid_t clone_sibling(void) {
  struct clone_args ca;
  memset(&ca, 0, sizeof ca);
  ca.flags = CLONE_PARENT | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID;
  ca.child_tid = (uint64_t)(uintptr_t)tidaddr;
  ca.exit_signal = 0;  /* (with CLONE_PARENT: the server's own, SIGCHLD) */
  long r = syscall(SYS_clone3, &ca, sizeof ca);
  if (r < 0 && errno == ENOSYS)  /* (Linux < 5.3: the order of x86_64 and arm64) */
    r = syscall(SYS_clone, CLONE_PARENT | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD, NULL, NULL, tidaddr, NULL);
  return (pid_t)r;
}

static void (*child_handlers[16])(void);
static int nchild_handlers;

void mp_atfork(void (*child)(void)) {
  for (int i = 0; i < nchild_handlers; i++) if (child_handlers[i] == child) return;
  if (nchild_handlers < 16) child_handlers[nchild_handlers++] = child;
  pthread_atfork(NULL, NULL, child);
}

/* in a new worker, first thing: what glibc's fork does for its child, and the
** core's own fork handlers (a host's or another library's do not run) */
static void worker_fixup(void) {
  /* the kernel gives a clone no robust list: the server's, empty (it holds no
  ** robust mutex), is registered again, as glibc's fork does */
  if (rhead) syscall(SYS_set_robust_list, rhead, rlen);
  for (int i = 0; i < nchild_handlers; i++) child_handlers[i]();
}

static void reply(int fd, pid_t pid, int err) {
  fsrep r = { pid, err };
  if (send(fd, &r, sizeof r, MSG_NOSIGNAL) < 0) _exit(0);
}

/* the header of a request and the descriptors that came with it; -1 at the end */
static int recv_request(int fd, fsreq *q, int io[NIO]) {
  union { struct cmsghdr h; char buf[CMSG_SPACE(NIO * sizeof(int))]; } cm;
  struct iovec iov = { q, sizeof *q };
  struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf };
  ssize_t r;
  do r = recvmsg(fd, &m, MSG_CMSG_CLOEXEC); while (r < 0 && errno == EINTR);
  if (r <= 0) return -1;
  int got[NIO], n = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
      for (size_t k = 0; k < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); k++) {
        int d;
        memcpy(&d, CMSG_DATA(c) + k * sizeof(int), sizeof(int));
        if (n < NIO) got[n++] = d; else close(d);
      }
  for (int i = 0, k = 0; i < NIO; i++) io[i] = (q->stdio >> i & 1) && k < n ? got[k++] : -1;
  if (((size_t)r < sizeof *q && recv_all(fd, (char *)q + r, sizeof *q - (size_t)r) != 0) || q->magic != HMAGIC) {
    for (int i = 0; i < n; i++) close(got[i]);
    return -1;
  }
  return 0;
}

static void close_io(int io[NIO]) { for (int i = 0; i < NIO; i++) if (io[i] >= 0) close(io[i]); }

static void server_loop(lua_State *S, int fd) {
  for (;;) {
    fsreq q;
    int io[NIO];
    if (recv_request(fd, &q, io) != 0) _exit(0);  /* its starter is gone */
    char *msg = malloc(q.len ? q.len : 1);
    if (!msg) _exit(1);
    if (recv_all(fd, msg, q.len) != 0) _exit(0);
    pid_t pid = clone_sibling();
    if (pid < 0) { reply(fd, -1, errno); free(msg); close_io(io); continue; }
    if (pid > 0) { reply(fd, pid, 0); free(msg); close_io(io); continue; }
    /* the worker: the requester's child; its lifeline armed once the fork
    ** handlers (which close the server's own) have run, before anything else */
    worker_fixup();
    if (io[3] >= 0) mp_lifeline_arm(io[3], SIGKILL);
    if (getppid() != q.requester) _exit(1);
    for (int i = 0; i < 3; i++) if (io[i] >= 0) { dup2(io[i], i); close(io[i]); }
    passed_fd = io[4];
    close(fd);
    char go = 0;  /* (see fsreq: nothing of the arena touched without it) */
    ssize_t k = -1;
    if (io[5] >= 0) do k = read(io[5], &go, 1); while (k < 0 && errno == EINTR);
    if (k != 1) _exit(1);
    close(io[5]);
    signal(SIGINT, SIG_DFL);
    mp_proc_reset();
    mp_proc_child(q.token);
    msg_take(msg, q.len);
    lua_getglobal(S, "require");
    lua_pushliteral(S, "multiprocessing.spawn");
    if (lua_pcall(S, 1, 1, 0) == LUA_OK) {
      lua_getfield(S, -1, "run");
      lua_pushlstring(S, msg, q.len);
      lua_pushboolean(S, q.daemon);
      lua_pcall(S, 2, 0, 0);  /* (run leaves with _exit) */
    }
    fprintf(stderr, "multiprocessing: forkserver worker: %s\n", lua_tostring(S, -1));
    fflush(NULL);
    _exit(1);
  }
}

/* the server's own state: the modules loaded, the core the one already in this
** process; the Lua layer built in (luaopen_multiprocessing) when its starter
** uses it so (a host linking the static library has no .lua file), else the
** files on package.path */
static const char *server_state(lua_State **out, const char *path, const char *cpath, int builtin) {
  lua_State *S = luaL_newstate();
  if (!S) return "out of memory";
  luaL_openlibs(S);
  lua_getglobal(S, "package");
  if (path) { lua_pushstring(S, path); lua_setfield(S, -2, "path"); }
  if (cpath) { lua_pushstring(S, cpath); lua_setfield(S, -2, "cpath"); }
  lua_getfield(S, -1, "preload");
  lua_pushcfunction(S, luaopen_multiprocessing_core);
  lua_setfield(S, -2, "multiprocessing.core");
  lua_settop(S, 0);
  if (builtin) {
    lua_pushcfunction(S, luaopen_multiprocessing);
    lua_pushliteral(S, "multiprocessing");
    if (lua_pcall(S, 1, 1, 0) != LUA_OK) return lua_tostring(S, -1);
    lua_getglobal(S, "package");
    lua_getfield(S, -1, "loaded");
    lua_pushvalue(S, -3);
    lua_setfield(S, -2, "multiprocessing");
    lua_settop(S, 0);
  } else {
    lua_getglobal(S, "require");
    lua_pushliteral(S, "multiprocessing");
    if (lua_pcall(S, 1, 0, 0) != LUA_OK) return lua_tostring(S, -1);
  }
  /* what every worker runs, loaded once here rather than compiled in each */
  static const char *const mods[] = { "multiprocessing.spawn", "multiprocessing.process", "multiprocessing.process_class",
    "multiprocessing.pool", NULL };
  for (int i = 0; mods[i]; i++) {
    lua_getglobal(S, "require");
    lua_pushstring(S, mods[i]);
    if (lua_pcall(S, 1, 0, 0) != LUA_OK) return lua_tostring(S, -1);
  }
  *out = S;
  return NULL;
}

static void server_main(int fd, int life, pid_t parent, const char *path, const char *cpath, int builtin) {
  mp_lifeline_arm(life, SIGKILL);  /* it dies with its starter, whichever thread started it */
  if (getppid() != parent) _exit(1);
  signal(SIGINT, SIG_IGN);   /* Ctrl-C is its starter's */
  signal(SIGPIPE, SIG_IGN);
  signal(SIGCHLD, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  int keep[3] = { fd, mp_arena_fd(), life };
  close_others(keep, 3);
  prctl(PR_SET_NAME, "lua-mp-forksrv");
  mp_proc_child(0);  /* no arena entry: it holds no handle it would use */
  mp_proc_reset();
  const char *why = NULL;
  if (prctl(PR_GET_TID_ADDRESS, &tidaddr) != 0 || !tidaddr) why = "the kernel does not give the thread id address (PR_GET_TID_ADDRESS)";
  if (syscall(SYS_get_robust_list, 0, &rhead, &rlen) != 0) rhead = NULL;
  if (rhead && *(void **)rhead != rhead) why = "the server holds a robust mutex (a bug)";
  lua_State *S = NULL;
  if (!why) why = server_state(&S, path, cpath, builtin);
  if (why) {
    size_t n = strlen(why);
    uint32_t w[2] = { HMAGIC, (uint32_t)n };
    if (send(fd, w, 8, MSG_NOSIGNAL) == 8) send(fd, why, n, MSG_NOSIGNAL);
    _exit(1);
  }
  uint32_t w[2] = { HMAGIC, 0 };
  if (send(fd, w, 8, MSG_NOSIGNAL) != 8) _exit(0);
  server_loop(S, fd);
}

static void fs_forget(void) {  /* (lock held) the server is gone or not ours */
  if (fs.fd >= 0) close(fs.fd);
  fs.fd = -1, fs.pid = 0, fs.owner = 0;
}

/* whether L loaded the Lua layer built in (luaopen_multiprocessing preloads
** its modules); with no L (lmp_forkserver_start): whether the library has it */
static int uses_builtin(lua_State *L) {
  if (!mp_layer_builtin()) return 0;
  if (!L) return 1;
  int top = lua_gettop(L);
  int r = lua_getfield(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE) == LUA_TTABLE &&
          lua_getfield(L, -1, "multiprocessing.spawn") != LUA_TNIL;
  lua_settop(L, top);
  return r;
}

/* starts the server (lock held); NULL or why not. L may be NULL. builtin:
** uses_builtin(L), taken before the lock (it may raise) */
static const char *fs_start_locked(lua_State *L, const char *path, const char *cpath, int builtin, char *err,
                                   size_t errn) {
  if (fs.fd >= 0 && fs.owner == getpid()) return NULL;
  if (fs.fd >= 0) fs_forget();  /* inherited from the process that started it */
  if (!mp_proc_reserve()) return "out of memory";
  int sv[2], life[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) { snprintf(err, errn, "%s", strerror(errno)); return err; }
  if (pipe2(life, O_CLOEXEC) != 0) {
    snprintf(err, errn, "%s", strerror(errno));
    close(sv[0]), close(sv[1]);
    return err;
  }
  uint64_t key[2];
  mp_codec_key(key);  /* drawn now, before the fork, so that both sides have the same */
  pid_t parent = getpid();
  mp_flush_std();  /* (not fflush(NULL): stdin's lock may be held by a reading thread) */
  pid_t pid = fork();
  if (pid == 0) { close(sv[0]), close(life[1]); server_main(sv[1], life[0], parent, path, cpath, builtin); _exit(1); }
  int e = errno;
  close(sv[1]), close(life[0]);
  if (pid < 0) { close(sv[0]), close(life[1]); snprintf(err, errn, "fork: %s", strerror(e)); return err; }
  mp_proc_track(pid, 1, life[1]);
  const char *w8 = wait_readable(sv[0], L, pid, WAIT_START);
  uint32_t w[2];
  if (!w8 && recv_all(sv[0], w, 8) != 0) w8 = "it died";
  if (!w8 && w[0] != HMAGIC) w8 = "bad answer";
  if (!w8 && w[1]) {
    size_t n = w[1] < errn - 1 ? w[1] : errn - 1;
    if (recv_all(sv[0], err, n) != 0) n = 0;
    err[n] = 0;
    w8 = err;
  }
  if (w8) {
    close(sv[0]);
    kill(pid, SIGKILL);
    if (w8 != err) snprintf(err, errn, "%s", w8);
    return err;
  }
  fs.pid = pid, fs.owner = getpid(), fs.fd = sv[0];
  return NULL;
}

/* core._forkserver_start(path, cpath) -> pid | nil, message */
static int fs_start(lua_State *L) {
  const char *path = luaL_optstring(L, 1, NULL), *cpath = luaL_optstring(L, 2, NULL);
  mp_arena_ensure(L);
  char err[256];
  int builtin = uses_builtin(L);
  pthread_mutex_lock(&fs.lock);
  const char *why = fs_start_locked(L, path, cpath, builtin, err, sizeof err);
  pid_t pid = fs.pid;
  pthread_mutex_unlock(&fs.lock);
  if (why) { lua_pushnil(L); lua_pushfstring(L, "cannot start the forkserver: %s", why); return 2; }
  lua_pushinteger(L, pid);
  return 1;
}

/* core._forkserver_pid() -> the server's pid, or nil when none runs for this process */
static int fs_pid(lua_State *L) {
  if (fs.fd >= 0 && fs.owner == getpid() && !mp_pid_gone(fs.pid)) lua_pushinteger(L, fs.pid);
  else lua_pushnil(L);
  return 1;
}

/* core._forkserver_stop() -> the server's pid (its owner reaps it) or nil: the
** server sees its socket close and leaves; the next use starts another */
static int fs_stop(lua_State *L) {
  pthread_mutex_lock(&fs.lock);
  pid_t pid = fs.fd >= 0 && fs.owner == getpid() ? fs.pid : 0;
  if (fs.fd >= 0) fs_forget();
  pthread_mutex_unlock(&fs.lock);
  if (pid) lua_pushinteger(L, pid);
  else lua_pushnil(L);
  return 1;
}

/* one request (lifeline: the read end of the worker's lifeline; passfd: a
** descriptor it gets too, or -1; go: the worker's end of its go); 1 done
** (*pid), 0 the server is gone (a new one may be tried), -1 failed and the
** socket is out of step, -2 failed (the server could not clone: why) */
static int fs_request(lua_State *L, const char *msg, size_t mlen, int daemon, uint64_t token, int lifeline,
                      int passfd, int go, pid_t *pid, const char **why) {
  fsreq q = { HMAGIC, (uint32_t)daemon, token, mlen, (int32_t)getpid(), 0 };
  int io[NIO], n = 0;
  for (int i = 0; i < 3; i++) if (fcntl(i, F_GETFD) >= 0) { io[n++] = i; q.stdio |= 1 << i; }
  io[n++] = lifeline, q.stdio |= 1 << 3;
  if (passfd >= 0 && fcntl(passfd, F_GETFD) >= 0) io[n++] = passfd, q.stdio |= 1 << 4;
  io[n++] = go, q.stdio |= 1 << 5;
  union { struct cmsghdr h; char buf[CMSG_SPACE(NIO * sizeof(int))]; } cm;
  memset(&cm, 0, sizeof cm);
  struct iovec iov = { &q, sizeof q };
  struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
  m.msg_control = cm.buf, m.msg_controllen = CMSG_SPACE(n * sizeof(int));
  struct cmsghdr *c = CMSG_FIRSTHDR(&m);
  c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS, c->cmsg_len = CMSG_LEN(n * sizeof(int));
  memcpy(CMSG_DATA(c), io, n * sizeof(int));
  ssize_t r;  /* the header and its descriptors at once (the socket's buffer is empty between requests) */
  do r = sendmsg(fs.fd, &m, MSG_NOSIGNAL); while (r < 0 && errno == EINTR);
  if (r < 0) { *why = strerror(errno); return 0; }
  /* (a Ctrl-C or a server that reads nothing for 30 s: failed; another failure: it is gone) */
  if ((size_t)r < sizeof q && send_all(fs.fd, (const char *)&q + r, sizeof q - (size_t)r, L, fs.pid, why))
    return !strcmp(*why, "interrupted") || !strncmp(*why, "it did not", 10) ? -1 : 0;
  if (send_all(fs.fd, msg, mlen, L, fs.pid, why))
    return !strcmp(*why, "interrupted") || !strncmp(*why, "it did not", 10) ? -1 : 0;
  *why = wait_readable(fs.fd, L, fs.pid, WAIT_START);
  if (*why) return strcmp(*why, "it died") ? -1 : 0;
  fsrep a;
  if (recv_all(fs.fd, &a, sizeof a) != 0) return 0;
  if (a.pid < 0) { *why = strerror(a.err); return -2; }
  *pid = a.pid;
  return 1;
}

/* (lock held) the server after a request that failed half way: killed, and the
** worker its last answer names (if it sent one: that worker got no go and
** leaves at once) tracked, so that it is reaped */
static void fs_drop_server(void) {
  kill_gone(fs.pid);
  fsrep a;
  struct pollfd pf = { fs.fd, POLLIN, 0 };
  if (poll(&pf, 1, 0) > 0 && recv(fs.fd, &a, sizeof a, MSG_DONTWAIT) == (ssize_t)sizeof a && a.pid > 0 &&
      mp_proc_reserve())
    mp_proc_track(a.pid, 1, -1);
  fs_forget();
}

/* core._forkserver_fork(startmsg, daemon, path, cpath [, fd]) -> pid | nil, message
** (fd: a descriptor the worker gets too, core._passed_fd() there) */
static int fs_fork(lua_State *L) {
  startmsg *sm = luaL_checkudata(L, 1, STARTMSG);
  luaL_argcheck(L, sm->owned && sm->pid == getpid(), 1, "start message already used");
  int daemon = lua_toboolean(L, 2);
  const char *path = luaL_optstring(L, 3, NULL), *cpath = luaL_optstring(L, 4, NULL);
  int passfd = (int)luaL_optinteger(L, 5, -1);
  mp_arena_ensure(L);
  if (!mp_proc_reserve()) return luaL_error(L, "cannot start a process: out of memory");
  uint64_t token = mp_proc_prefork(L);  /* (may raise: before the lock) */
  char err[256];
  const char *why = NULL;
  pid_t pid = -1;
  int builtin = uses_builtin(L);
  int life[2];  /* the worker's lifeline: the read end goes with the request */
  if (pipe2(life, O_CLOEXEC) != 0) {
    msg_release(sm), mp_proc_parent(token, -1);
    return mp_pusherrno(L, "cannot start a process with the forkserver (its lifeline pipe)");
  }
  pthread_mutex_lock(&fs.lock);
  /* a second server only when the first was found gone: its worker, if it
  ** made one, got no go (never two workers for one message) */
  for (int attempt = 0; attempt < 2; attempt++) {
    why = fs_start_locked(L, path, cpath, builtin, err, sizeof err);
    if (why) break;
    int gp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, gp) != 0) { why = strerror(errno); break; }
    fs.go = gp[0];
    int r = fs_request(L, sm->bytes, sm->len, daemon, token, life[0], passfd, gp[1], &pid, &why);
    close(gp[1]);
    if (r == 1) {
      char g = 1;
      if (send(gp[0], &g, 1, MSG_NOSIGNAL) == 1) why = NULL;
      else {  /* it died before its go: the message was never its */
        why = "the new worker died at once";
        mp_proc_track(pid, 1, -1);
        r = -2;
      }
    }
    close(gp[0]);
    fs.go = -1;
    if (r == 1 || r == -2) break;
    fs_drop_server();
    if (r < 0) break;
    why = why ? why : "the forkserver died";
  }
  close(life[0]);
  if (!why) {
    mp_proc_track(pid, daemon, life[1]);
    sm->owned = 0;  /* the worker's now */
  } else close(life[1]);
  pthread_mutex_unlock(&fs.lock);
  mp_proc_parent(token, why ? -1 : pid);
  if (why) {
    msg_release(sm);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot start a process with the forkserver: %s", why);
    return 2;
  }
  lua_pushinteger(L, pid);
  return 1;
}

/* core._passed_fd() -> fd | nil: what the parent passed with this child's start
** (once: the caller owns it) */
static int fs_passed_fd(lua_State *L) {
  if (passed_fd < 0) { lua_pushnil(L); return 1; }
  lua_pushinteger(L, passed_fd);
  passed_fd = -1;
  return 1;
}

/* core._threads() -> the number of threads of this process */
static int fs_threads(lua_State *L) {
  FILE *f = fopen("/proc/self/stat", "r");
  long n = 0;
  if (f) {
    char buf[1024];
    size_t k = fread(buf, 1, sizeof buf - 1, f);
    buf[k] = 0;
    fclose(f);
    char *p = strrchr(buf, ')');
    /* fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt
    ** majflt cmajflt utime stime cutime cstime priority nice num_threads */
    for (int i = 0; p && i < 18; i++) p = strchr(p + 1, ' ');
    if (p) n = strtol(p + 1, NULL, 10);
  }
  lua_pushinteger(L, n);
  return 1;
}

/* The public C entry: the forkserver started now, before the host starts
** threads or grows its heap. The modules are found through LUA_PATH/LUA_CPATH
** (or Lua's defaults), the core is this one. */
static int start_protected(lua_State *L) {
  mp_arena_ensure(L);
  return 0;
}

LMP_API int lmp_forkserver_start(void) {
  lua_State *L = luaL_newstate();
  if (!L) { errno = ENOMEM; return -1; }
  lua_pushcfunction(L, start_protected);
  int r = lua_pcall(L, 0, 0, 0);
  lua_close(L);
  if (r != LUA_OK) { errno = ENOMEM; return -1; }
  char err[256];
  pthread_mutex_lock(&fs.lock);
  const char *why = fs_start_locked(NULL, NULL, NULL, uses_builtin(NULL), err, sizeof err);
  pthread_mutex_unlock(&fs.lock);
  if (why) { fprintf(stderr, "lmp_forkserver_start: %s\n", why); errno = ECHILD; return -1; }
  return 0;
}

/* in every child (fork, the server, its workers): the server is its parent's,
** and the lock may have been copied held (the server is forked under it) */
MP_FORK_PATH static void fs_after_fork(void) {  /* (writes only what changes: see MP_FORK_PATH) */
  if (fs.fd >= 0) { close(fs.fd); fs.fd = -1; }
  if (fs.go >= 0) { close(fs.go); fs.go = -1; }  /* (a worker waits for its end of file) */
  if (fs.pid || fs.owner) fs.pid = 0, fs.owner = 0;
  mp_mutex_renew(&fs.lock);
  if (passed_fd != -1) passed_fd = -1;  /* (a forkserver worker's is set after this) */
}

int mp_forkserver_open(lua_State *L) {
  mp_atfork(fs_after_fork);
  if (mp_newmetatable(L, STARTMSG, 2)) {
    lua_pushcfunction(L, startmsg_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, startmsg_gc);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  static const luaL_Reg fns[] = {
    {"_startmsg", fs_startmsg}, {"_startdecode", fs_startdecode}, {"_spawn", fs_spawn},
    {"_attach", fs_attach}, {"_forkserver_start", fs_start}, {"_forkserver_fork", fs_fork},
    {"_forkserver_pid", fs_pid}, {"_forkserver_stop", fs_stop}, {"_threads", fs_threads}, {"_passed_fd", fs_passed_fd}, {NULL, NULL}
  };
  luaL_setfuncs(L, fns, 0);
  return 0;
}
