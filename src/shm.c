/* shm.c: SharedMemory, named POSIX shared memory (shm_open) that unrelated processes attach by name. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mp.h"

/* Every OS call about named segments is in this file (docs/shared_memory.md).
**
** A segment is a file of /dev/shm (shm_open), mapped MAP_SHARED once per handle;
** the descriptor is closed right after mapping. Its bytes are raw (no header), so
** a Python process can attach to it by the same name.
**
** Truncation. Another process may ftruncate the file below our mapping; touching
** a page past the new end raises SIGBUS (so does writing a new page when /dev/shm
** is full). Every access to a mapping is therefore guarded: a SIGBUS handler
** (installed with the first mapping, SA_NODEFER) jumps back to the guarded access
** when this thread is inside one, which then raises a Lua error; any other SIGBUS
** goes to the handler that was there before. A guarded section touches memory
** only: values are checked before it and pushed after it, so the jump never
** crosses a Lua call.
**
** The tracker. A segment made with track = true (the default) is unlinked when
** the process that made it ends, however it ends (SIGKILL included), unless it was
** unlinked before. The first tracked segment of a process starts its tracker: a
** grandchild (double fork, so it is nobody's zombie) in a session of its own (so
** Ctrl-C and a kill of the process group spare it), holding a pidfd of its creator
** and one end of a SOCK_SEQPACKET socket, with every other descriptor closed. The
** creator sends it REGISTER (name, device, inode) as it makes a segment (see
** create_segment: no instant is left unregistered) and UNREGISTER from unlink();
** when the pidfd polls readable (the creator is gone),
** the tracker reads what is left on the socket, unlinks every name still
** registered whose inode is still the one registered (a segment another process
** unlinked and made again under that name is left alone), and exits. The tracker
** runs no Lua and allocates nothing but its table of names (mmap). A tracker
** killed by someone leaves its segments to their creator. */

#define SHM "multiprocessing.SharedMemory"
#define VIEW "multiprocessing.SharedMemoryView"
#define NAME_LEN 248         /* longest name (without the '/'), as Python allows on Linux less its prefix */
#define SEND_PATIENCE 10000  /* ms a full tracker socket is waited for before giving up */

typedef struct shm_handle {
  char *base;        /* the mapping; NULL when closed */
  size_t size;
  pid_t pid;         /* the process whose mapping this is */
  pid_t tracked_by;  /* the creator, when it registered the segment with its tracker; else 0 */
  uint64_t dev, ino;
  char name[NAME_LEN + 1];  /* without the leading '/' */
} shm_handle;

typedef struct view_t {
  shm_handle *shm;   /* kept alive by user value 1 */
  char *data;        /* shm->base + the view's offset, while shm is open */
  size_t off;        /* byte offset in the segment (0-based) */
  lua_Integer n;
  int tc;
} view_t;

/* ----------------------------------------------------------- SIGBUS guard */

static __thread sigjmp_buf *volatile guard;
/* the compiler must neither drop nor move the stores around the access: the
** handler reads them (a memcpy between two stores of guard would let both go) */
#define GUARD_ON(jb) (guard = &(jb), __atomic_signal_fence(__ATOMIC_SEQ_CST))
#define GUARD_OFF() (__atomic_signal_fence(__ATOMIC_SEQ_CST), guard = NULL)
static struct sigaction old_bus;
static int bus_installed;

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
  sigjmp_buf *jb = guard;
  (void)uc;
  if (jb && si->si_code > 0) siglongjmp(*jb, 1);  /* a fault inside a guarded access */
  sigaction(SIGBUS, &old_bus, NULL);  /* not ours: as if we had never been here */
  if (si->si_code <= 0) raise(sig);   /* sent by kill(): send it again; a fault repeats by itself */
}

static void install_guard(void) {
  if (bus_installed) return;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;  /* NODEFER: leaving by siglongjmp keeps SIGBUS unblocked */
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, &sa, &old_bus) == 0) bus_installed = 1;
}

/* The guarded accesses: 0, or -1 when the mapping could not be touched. */
static int g_copy(void *dst, const void *src, size_t n) {
  sigjmp_buf jb;
  if (sigsetjmp(jb, 0)) { guard = NULL; return -1; }
  GUARD_ON(jb);
  memcpy(dst, src, n);
  GUARD_OFF();
  return 0;
}

static int g_load(int tc, const char *p, lua_Integer i, mp_elem *out) {
  sigjmp_buf jb;
  if (sigsetjmp(jb, 0)) { guard = NULL; return -1; }
  GUARD_ON(jb);
  *out = mp_elem_load(tc, p, i);
  GUARD_OFF();
  return 0;
}

static int g_loads(int tc, const char *p, lua_Integer i, lua_Integer n, mp_elem *out) {
  sigjmp_buf jb;
  if (sigsetjmp(jb, 0)) { guard = NULL; return -1; }
  GUARD_ON(jb);
  for (lua_Integer k = 0; k < n; k++) out[k] = mp_elem_load(tc, p, i + k);
  GUARD_OFF();
  return 0;
}

static int g_stores(int tc, char *p, lua_Integer i, lua_Integer n, const mp_elem *e, int same) {
  sigjmp_buf jb;
  if (sigsetjmp(jb, 0)) { guard = NULL; return -1; }
  GUARD_ON(jb);
  for (lua_Integer k = 0; k < n; k++) mp_elem_store(tc, p, i + k, e[same ? 0 : k]);
  GUARD_OFF();
  return 0;
}

static int fault_error(lua_State *L, const shm_handle *s, size_t at) {
  return luaL_error(L, "SharedMemory '%s': byte %I cannot be accessed: the segment was truncated by "
                    "another process (or /dev/shm is full)", s->name, (lua_Integer)at + 1);
}

/* ---------------------------------------------------------------- tracker */

enum { TRK_REGISTER = 1, TRK_UNREGISTER = 2 };
typedef struct trk_msg {
  uint32_t op, pad;
  uint64_t dev, ino;
  char name[NAME_LEN + 1];
} trk_msg;

static int trk_fd = -1;     /* our end of the socket to our tracker */
static pid_t trk_pid = 0;   /* the process that started it (a fork's copy is not ours) */

static int open_named(const char *name, int flags, mode_t mode) {
  char path[NAME_LEN + 2];
  path[0] = '/';
  strcpy(path + 1, name);
  return shm_open(path, flags, mode);
}

static int unlink_named(const char *name) {
  char path[NAME_LEN + 2];
  path[0] = '/';
  strcpy(path + 1, name);
  return shm_unlink(path);
}

/* The tracker's table: entries in an anonymous mapping that grows by doubling. */
static trk_msg *tab;
static size_t ntab, captab;

/* Entries are keyed by name: a REGISTER of a name already there sets its inode
** (0: not known yet, the name is ours by construction), an UNREGISTER drops it. */
static void trk_apply(const trk_msg *m) {
  size_t i;
  for (i = 0; i < ntab; i++)
    if (strcmp(tab[i].name, m->name) == 0) break;
  if (m->op == TRK_UNREGISTER) {
    if (i < ntab) tab[i] = tab[--ntab];
    return;
  }
  if (i < ntab) { tab[i] = *m; return; }
  if (ntab == captab) {
    size_t cap = captab ? captab * 2 : 64;
    void *p = tab ? mremap(tab, captab * sizeof *tab, cap * sizeof *tab, MREMAP_MAYMOVE)
                  : mmap(NULL, cap * sizeof *tab, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;  /* out of memory: that segment is not tracked */
    tab = p;
    captab = cap;
  }
  tab[ntab++] = *m;
}

static int trk_drain(int sock) {  /* 0 at the end of the socket */
  trk_msg m;
  for (;;) {
    ssize_t r = recv(sock, &m, sizeof m, MSG_DONTWAIT);
    if (r == (ssize_t)sizeof m) {
      m.name[NAME_LEN] = 0;
      trk_apply(&m);
    } else if (r == 0) return 0;
    else if (r < 0 && errno == EINTR) continue;
    else return 1;  /* EAGAIN, or a short message (ignored) */
  }
}

static void trk_unlink_all(void) {
  for (size_t i = 0; i < ntab; i++) {
    if (!tab[i].ino) { unlink_named(tab[i].name); continue; }  /* a temporary name of ours */
    int fd = open_named(tab[i].name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW, 0);
    if (fd < 0) continue;  /* unlinked already */
    struct stat st;
    int same = fstat(fd, &st) == 0 && (uint64_t)st.st_dev == tab[i].dev && (uint64_t)st.st_ino == tab[i].ino;
    close(fd);
    if (same) unlink_named(tab[i].name);
  }
}

static void close_others(int a, int b) {  /* every descriptor from 3 up but a and b */
  int lo = a < b ? a : b, hi = a < b ? b : a;
#ifdef SYS_close_range
  if (syscall(SYS_close_range, 3u, (unsigned)lo - 1, 0) == 0 || lo <= 3) {
    if (hi - lo > 1) syscall(SYS_close_range, (unsigned)lo + 1, (unsigned)hi - 1, 0);
    if (syscall(SYS_close_range, (unsigned)hi + 1, ~0u, 0) == 0) return;
  }
#endif
  struct rlimit rl;
  long max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY ? (long)rl.rlim_cur : 65536;
  if (max > 65536) max = 65536;
  for (long fd = 3; fd < max; fd++)
    if (fd != a && fd != b) close((int)fd);
}

static void tracker_main(int sock, int pidfd, pid_t creator) {
  sigset_t all;
  sigemptyset(&all);
  sigprocmask(SIG_SETMASK, &all, NULL);
  signal(SIGINT, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  signal(SIGQUIT, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  signal(SIGTERM, SIG_DFL);
  signal(SIGBUS, SIG_DFL);
  prctl(PR_SET_NAME, "lua-mp-shm-trk", 0, 0, 0);
  /* a host that closed its stdio may have given us 0..2: move them above, stdio gets /dev/null */
  if (sock < 3) { int fd = fcntl(sock, F_DUPFD_CLOEXEC, 3); close(sock); sock = fd; }
  if (pidfd >= 0 && pidfd < 3) { int fd = fcntl(pidfd, F_DUPFD_CLOEXEC, 3); close(pidfd); pidfd = fd; }
  int null = open("/dev/null", O_RDWR);
  if (null >= 0) {
    dup2(null, 0); dup2(null, 1); dup2(null, 2);
    if (null > 2) close(null);
  }
  close_others(sock, pidfd >= 0 ? pidfd : sock);
  int open_sock = 1;
  for (;;) {
    struct pollfd p[2] = { { open_sock ? sock : -1, POLLIN, 0 }, { pidfd, POLLIN, 0 } };
    int r = poll(p, 2, pidfd >= 0 ? -1 : 200);
    if (r < 0 && errno != EINTR) break;
    if (r > 0 && p[0].revents) open_sock = trk_drain(sock);
    if (pidfd >= 0 ? (r > 0 && p[1].revents) : (kill(creator, 0) < 0 && errno == ESRCH)) break;
  }
  trk_drain(sock);  /* what the creator sent before it went */
  trk_unlink_all();
  _exit(0);
}

/* Starts this process's tracker: 0, or -1 with errno. */
static int tracker_start(void) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return -1;
  pid_t self = getpid();
  int pidfd = -1;
#ifdef SYS_pidfd_open
  pidfd = (int)syscall(SYS_pidfd_open, self, 0);  /* our own: readable once we have exited */
#endif
  pid_t mid = fork();
  if (mid == 0) {
    close(sv[0]);
    setsid();
    pid_t t = fork();
    if (t == 0) tracker_main(sv[1], pidfd, self);
    _exit(t < 0 ? 1 : 0);
  }
  int e = errno, status = 0;
  close(sv[1]);
  if (pidfd >= 0) close(pidfd);
  if (mid < 0) { close(sv[0]); errno = e; return -1; }
  while (waitpid(mid, &status, 0) < 0 && errno == EINTR) {}
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) { close(sv[0]); errno = EAGAIN; return -1; }
  if (trk_fd >= 0) close(trk_fd);  /* a forked copy of our parent's: not ours */
  trk_fd = sv[0];
  trk_pid = self;
  return 0;
}

static int tracker_send1(const trk_msg *m) {
  double until = mp_now() + SEND_PATIENCE / 1000.0;
  for (;;) {
    if (send(trk_fd, m, sizeof *m, MSG_DONTWAIT | MSG_NOSIGNAL) == (ssize_t)sizeof *m) return 0;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    if (mp_now() > until) { errno = ETIMEDOUT; return -1; }
    struct pollfd p = { trk_fd, POLLOUT, 0 };
    poll(&p, 1, 50);
  }
}

/* Sends one message to this process's tracker (started if needed, and again
** if it was killed): 0, or -1 with errno. */
static int tracker_send(int op, const char *name, uint64_t dev, uint64_t ino) {
  trk_msg m;
  memset(&m, 0, sizeof m);
  m.op = (uint32_t)op;
  m.dev = dev;
  m.ino = ino;
  strcpy(m.name, name);
  if (trk_pid != getpid()) {
    if (op == TRK_UNREGISTER) return 0;  /* it was never registered by us */
    if (tracker_start() < 0) return -1;
  }
  if (tracker_send1(&m) == 0) return 0;
  if (op == TRK_UNREGISTER || errno == ETIMEDOUT) return -1;
  if (tracker_start() < 0) return -1;  /* it was killed: a new one */
  return tracker_send1(&m);
}

/* ----------------------------------------------------------------- handles */

static shm_handle *toshm(lua_State *L, int idx) {
  return mp_toself(L, idx, MP_CLASSES(SHM));
}

static shm_handle *checkshm(lua_State *L, int idx) {
  shm_handle *s = toshm(L, idx);
  if (!s->base) luaL_error(L, "attempt to use a closed SharedMemory '%s'", s->name);
  return s;
}

static int shm_close(lua_State *L) {
  shm_handle *s = toshm(L, 1);
  if (s->base) {
    munmap(s->base, s->size);  /* ours in this process, also in a fork's copy */
    s->base = NULL;
  }
  return 0;
}

/* name -> the stored form (no leading '/'), or raises */
static void setname(lua_State *L, shm_handle *s, const char *name, size_t len) {
  if (len > 0 && name[0] == '/') { name++; len--; }
  if (len == 0 || len > NAME_LEN || memchr(name, '/', len) || memchr(name, 0, len) ||
      strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
    luaL_error(L, "SharedMemory: bad name '%s' (1 to %d characters, no '/' but a leading one, not '.' or '..')",
               name, NAME_LEN);
  memcpy(s->name, name, len);
  s->name[len] = 0;
}

static int os_error(lua_State *L, const shm_handle *s, const char *what) {
  char buf[NAME_LEN + 64];
  snprintf(buf, sizeof buf, "SharedMemory '%s': %s", s->name, what);
  return mp_pusherrno(L, buf);
}

/* A name of ours: lmp_<pid>_<n><8 random hex digits>, or lmp_tmp_...; n (hex) counts the
** names this process made, so that it never makes one of its own names again: a random
** name that met one of its own live segments used to be registered over that segment's
** entry, then unregistered when the create found the name taken, and that segment was left
** behind by a kill (shm_creator_killed, about one round in 100: thousands of live names). */
static uint32_t name_seq;
static int fixed_random = -1;  /* core._shm_random(n): the random part forced (specs) */

static void random_name(char *out, const char *kind, int salt) {
  uint32_t r = 0;
  if (fixed_random >= 0) r = (uint32_t)fixed_random;
  else if (getrandom(&r, sizeof r, GRND_NONBLOCK) != sizeof r) r = (uint32_t)(mp_now() * 1e9) ^ (uint32_t)salt;
  snprintf(out, NAME_LEN + 1, "lmp_%s%d_%x%08x", kind, (int)getpid(), ++name_seq, r);
}

/* core._shm_random([n]): for specs, the random part of the next names is n (nil: random again) */
static int shm_fix_random(lua_State *L) {
  fixed_random = lua_isnoneornil(L, 1) ? -1 : (int)(luaL_checkinteger(L, 1) & 0x7fffffff);
  return 0;
}

static const char *create_failed;

static int dev_shm_path(char *out, size_t n, const char *name) {
  return snprintf(out, n, "/dev/shm/%s", name) < (int)n ? 0 : -1;
}

/* Makes the segment s->name (named) or a new random name (s->name is set),
** sized, registered with the tracker when track: its descriptor, or -1 with errno
** and create_failed. The segment is made under a random name of ours, registered
** first (inode 0: the tracker unlinks it by name), sized, then (named) linked to
** its name, which fails if the name exists: no instant of a kill leaves it
** behind, and no attacher ever sees it empty. Untracked, a named segment is
** made under its name directly. */
static int create_segment(shm_handle *s, int named, size_t size, mode_t mode, int track) {
  char tmp[NAME_LEN + 1];
  if (!track && named) {
    /* untracked: made under its own name at once, as Python does (a temporary name
    ** that nobody tracks could be left behind by a kill, where the user cannot see it) */
    int fd = open_named(s->name, O_RDWR | O_CLOEXEC | O_CREAT | O_EXCL, mode);
    struct stat st;
    if (fd < 0) { create_failed = "cannot create"; return -1; }
    if (fstat(fd, &st) < 0 || ftruncate(fd, (off_t)size) < 0) {
      int e = errno;
      close(fd);
      unlink_named(s->name);
      errno = e;
      create_failed = "cannot set its size";
      return -1;
    }
    s->dev = (uint64_t)st.st_dev;
    s->ino = (uint64_t)st.st_ino;
    return fd;
  }
  char *fresh = named ? tmp : s->name;
  int fd = -1, e;
  create_failed = "cannot create";
  if (track && trk_pid != getpid() && tracker_start() < 0) { create_failed = "cannot start its tracker"; return -1; }
  for (int tries = 0; fd < 0 && tries < 100; tries++) {  /* as Python: random until one is free */
    random_name(fresh, named ? "tmp_" : "", tries);
    if (track && tracker_send(TRK_REGISTER, fresh, 0, 0) < 0) { create_failed = "cannot start its tracker"; return -1; }
    fd = open_named(fresh, O_RDWR | O_CLOEXEC | O_CREAT | O_EXCL, mode);
    if (fd < 0) {
      e = errno;
      if (track) tracker_send(TRK_UNREGISTER, fresh, 0, 0);
      errno = e;
      if (e != EEXIST) return -1;
    }
  }
  if (fd < 0) return -1;
  struct stat st;
  const char *failed = NULL;
  if (fstat(fd, &st) < 0) failed = "fstat";
  else if (ftruncate(fd, (off_t)size) < 0) failed = "cannot set its size";
  else {
    s->dev = (uint64_t)st.st_dev;
    s->ino = (uint64_t)st.st_ino;
    if (track && tracker_send(TRK_REGISTER, s->name, s->dev, s->ino) < 0) failed = "cannot start its tracker";
    else if (named) {
      char from[NAME_LEN + 16], to[NAME_LEN + 16];
      dev_shm_path(from, sizeof from, tmp);
      dev_shm_path(to, sizeof to, s->name);
      if (link(from, to) < 0) failed = "cannot create";  /* EEXIST: the name is taken */
      else {
        unlink_named(tmp);
        if (track) tracker_send(TRK_UNREGISTER, tmp, 0, 0);
      }
    }
  }
  if (failed) {
    e = errno;
    close(fd);
    unlink_named(fresh);
    if (track) {
      tracker_send(TRK_UNREGISTER, fresh, 0, 0);
      if (named) tracker_send(TRK_UNREGISTER, s->name, 0, 0);
    }
    errno = e;
    create_failed = failed;
    return -1;
  }
  if (track) s->tracked_by = getpid();
  return fd;
}

/* Maps size bytes of fd into s and closes fd: 1 (s at the top), or nil, message, code. */
static int map_segment(lua_State *L, shm_handle *s, int fd, size_t size, int made) {
  install_guard();
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED) {
    if (made) {  /* made by this call: nothing may be left */
      unlink_named(s->name);
      if (s->tracked_by) tracker_send(TRK_UNREGISTER, s->name, 0, 0);
      s->tracked_by = 0;
    }
    errno = e;
    return os_error(L, s, "cannot map it");
  }
  s->base = p;
  s->size = size;
  return 1;
}

/* mp.SharedMemory{name = , create = false, size = , track = true, mode = 0600}
** or mp.SharedMemory(name) -> handle, or nil, message, code on an OS failure */
static int shm_new(lua_State *L) {
  size_t namelen = 0;
  const char *name = NULL;
  int create = 0, track = 1;
  lua_Integer size = 0, mode = 0600;
  int hassize = 0;
  if (lua_type(L, 1) == LUA_TSTRING) name = lua_tolstring(L, 1, &namelen);
  else {
    luaL_argexpected(L, lua_type(L, 1) == LUA_TTABLE, 1, "table or string");
    lua_pushnil(L);
    while (lua_next(L, 1)) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
      if (!k) luaL_error(L, "SharedMemory: unknown option %s", luaL_tolstring(L, -2, NULL));
      if (strcmp(k, "name") == 0) {
        if (lua_type(L, -1) != LUA_TSTRING)
          luaL_error(L, "SharedMemory: option 'name' must be a string, got %s", luaL_typename(L, -1));
        name = lua_tolstring(L, -1, &namelen);
      } else if (strcmp(k, "create") == 0 || strcmp(k, "track") == 0) {
        if (!lua_isboolean(L, -1))
          luaL_error(L, "SharedMemory: option '%s' must be a boolean, got %s", k, luaL_typename(L, -1));
        if (k[0] == 'c') create = lua_toboolean(L, -1); else track = lua_toboolean(L, -1);
      } else if (strcmp(k, "size") == 0 || strcmp(k, "mode") == 0) {
        int isint;
        lua_Integer v = lua_tointegerx(L, -1, &isint);
        if (!isint || lua_type(L, -1) != LUA_TNUMBER)
          luaL_error(L, "SharedMemory: option '%s' must be an integer, got %s", k,
                     lua_type(L, -1) == LUA_TNUMBER ? lua_tostring(L, -1) : luaL_typename(L, -1));
        if (k[0] == 's') { size = v; hassize = 1; } else mode = v;
      } else luaL_error(L, "SharedMemory: unknown option '%s'", k);
      lua_pop(L, 1);
    }
  }
  if (hassize && (size <= 0 || (lua_Unsigned)size > (lua_Unsigned)PTRDIFF_MAX))
    luaL_error(L, "SharedMemory: size must be a positive number of bytes, got %I", size);
  if (create && !hassize) luaL_error(L, "SharedMemory: size is required with create = true");
  if (!create && !name) luaL_error(L, "SharedMemory: name is required to attach (create = false)");
  if (mode < 0 || mode > 07777) luaL_error(L, "SharedMemory: mode must be 0 to 07777 (octal), got %I", mode);

  shm_handle *s = lua_newuserdatauv(L, sizeof *s, 1);  /* closed until mapped */
  memset(s, 0, sizeof *s);
  luaL_setmetatable(L, SHM);
  s->pid = getpid();
  if (name) setname(L, s, name, namelen);
  if (create) {
    int fd = create_segment(s, name != NULL, (size_t)size, (mode_t)mode, track);
    if (fd < 0) return os_error(L, s, create_failed);
    return map_segment(L, s, fd, (size_t)size, 1);
  }
  int fd = open_named(s->name, O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) return os_error(L, s, "cannot attach");
  struct stat st;
  if (fstat(fd, &st) < 0) { int e = errno; close(fd); errno = e; return os_error(L, s, "fstat"); }
  s->dev = (uint64_t)st.st_dev;
  s->ino = (uint64_t)st.st_ino;
  if (st.st_size == 0) { close(fd); errno = EINVAL; return os_error(L, s, "is empty (size 0)"); }
  if (hassize && (uint64_t)size > (uint64_t)st.st_size) {
    close(fd);
    lua_pushnil(L);
    lua_pushfstring(L, "SharedMemory '%s': has %I bytes, fewer than size = %I", s->name,
                    (lua_Integer)st.st_size, size);
    lua_pushliteral(L, "EINVAL");
    return 3;
  }
  return map_segment(L, s, fd, hassize ? (size_t)size : (size_t)st.st_size, 0);
}

/* shm:unlink() -> true, or nil, message, code (ENOENT: unlinked already) */
static int shm_unlink_m(lua_State *L) {
  shm_handle *s = toshm(L, 1);
  if (!s->name[0]) return luaL_error(L, "attempt to unlink a SharedMemory that has no name");
  if (unlink_named(s->name) < 0) return os_error(L, s, "cannot unlink");
  if (s->tracked_by == getpid()) tracker_send(TRK_UNREGISTER, s->name, 0, 0);
  s->tracked_by = 0;
  lua_pushboolean(L, 1);
  return 1;
}

/* the 0-based start of [offset, offset + len) (offset 1-based), checked */
static size_t checkrange(lua_State *L, shm_handle *s, lua_Integer off, lua_Integer len, const char *fn) {
  if (off < 1 || (lua_Unsigned)off > (lua_Unsigned)s->size + 1)
    luaL_error(L, "SharedMemory:%s: offset %I out of range (1 to %I)", fn, off, (lua_Integer)s->size + 1);
  if (len < 0 || (lua_Unsigned)len > (lua_Unsigned)s->size - (lua_Unsigned)(off - 1))
    luaL_error(L, "SharedMemory:%s: %I bytes at offset %I are out of range (size %I)", fn, len, off,
               (lua_Integer)s->size);
  return (size_t)(off - 1);
}

/* shm:read([offset = 1 [, len = to the end]]) -> string */
static int shm_read(lua_State *L) {
  shm_handle *s = checkshm(L, 1);
  lua_Integer off = luaL_optinteger(L, 2, 1);
  lua_Integer len = luaL_optinteger(L, 3, off >= 1 && (lua_Unsigned)off <= s->size + 1 ? (lua_Integer)s->size - off + 1 : 0);
  size_t at = checkrange(L, s, off, len, "read");
  luaL_Buffer b;
  char *p = luaL_buffinitsize(L, &b, (size_t)len);
  if (g_copy(p, s->base + at, (size_t)len) < 0) return fault_error(L, s, at);
  luaL_pushresultsize(&b, (size_t)len);
  return 1;
}

/* shm:write(offset, string) */
static int shm_write(lua_State *L) {
  shm_handle *s = checkshm(L, 1);
  lua_Integer off = luaL_checkinteger(L, 2);
  size_t len;
  const char *str = luaL_checklstring(L, 3, &len);
  size_t at = checkrange(L, s, off, (lua_Integer)len, "write");
  if (g_copy(s->base + at, str, len) < 0) return fault_error(L, s, at);
  return 0;
}

static int shm_index(lua_State *L) {
  shm_handle *s = toshm(L, 1);
  const char *k = lua_tostring(L, 2);
  if (k && strcmp(k, "name") == 0) { lua_pushstring(L, s->name); return 1; }
  if (k && strcmp(k, "size") == 0) {
    if (!s->base) return luaL_error(L, "attempt to use a closed SharedMemory '%s'", s->name);
    lua_pushinteger(L, (lua_Integer)s->size);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int shm_tostring(lua_State *L) {
  shm_handle *s = toshm(L, 1);
  if (!s->base) lua_pushfstring(L, "%s('%s', closed) %p", SHM, s->name, (void *)s);
  else lua_pushfstring(L, "%s('%s', %I bytes) %p", SHM, s->name, (lua_Integer)s->size, (void *)s);
  return 1;
}

/* ------------------------------------------------------------------- views */

/* shm:view(typecode [, offset = 1 [, count = as many as fit]]) */
static int shm_view(lua_State *L) {
  shm_handle *s = checkshm(L, 1);
  int tc = mp_checktypecode(L, 2);
  size_t es = mp_tc_size(tc);
  lua_Integer off = luaL_optinteger(L, 3, 1);
  if (off < 1 || (lua_Unsigned)off > (lua_Unsigned)s->size + 1)
    return luaL_error(L, "SharedMemory:view: offset %I out of range (1 to %I)", off, (lua_Integer)s->size + 1);
  if ((size_t)(off - 1) % es)
    return luaL_error(L, "SharedMemory:view: offset %I is not aligned for typecode '%c' (offset - 1 must be a "
                      "multiple of %d)", off, tc, (int)es);
  lua_Integer fit = (lua_Integer)((s->size - (size_t)(off - 1)) / es);
  lua_Integer n = luaL_optinteger(L, 4, fit);
  if (n < 0 || n > fit)
    return luaL_error(L, "SharedMemory:view: %I elements of typecode '%c' at offset %I do not fit (at most %I)",
                      n, tc, off, fit);
  view_t *v = lua_newuserdatauv(L, sizeof *v, 1);
  v->shm = s;
  v->off = (size_t)(off - 1);
  v->data = s->base + v->off;
  v->n = n;
  v->tc = tc;
  luaL_setmetatable(L, VIEW);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  return 1;
}

/* the view at 1, checked through its metatable (upvalue 2 of __index/__newindex,
** or the registry), its segment open */
static view_t *checkview_mt(lua_State *L, int mtidx) {
  view_t *v = lua_touserdata(L, 1);
  if (!v || !lua_getmetatable(L, 1) || !lua_rawequal(L, -1, mtidx)) luaL_typeerror(L, 1, "SharedMemoryView");
  lua_pop(L, 1);
  if (!v->shm->base) luaL_error(L, "attempt to use a view of a closed SharedMemory '%s'", v->shm->name);
  v->data = v->shm->base + v->off;
  return v;
}

static view_t *checkview(lua_State *L) {
  view_t *v = mp_toself(L, 1, MP_CLASSES(VIEW));
  if (!v->shm->base) luaL_error(L, "attempt to use a view of a closed SharedMemory '%s'", v->shm->name);
  v->data = v->shm->base + v->off;
  return v;
}

static lua_Integer view_index_of(lua_State *L, int idx) {
  int isint;
  lua_Integer i = lua_tointegerx(L, idx, &isint);
  if (!isint) luaL_error(L, "view index must be an integer, got %s", lua_tostring(L, idx));
  return i;
}

static int view_index(lua_State *L) {
  if (lua_type(L, 2) == LUA_TNUMBER) {
    view_t *v = checkview_mt(L, lua_upvalueindex(2));
    lua_Integer i = view_index_of(L, 2);
    if ((lua_Unsigned)i - 1 < (lua_Unsigned)v->n) {
      mp_elem e;
      if (g_load(v->tc, v->data, i - 1, &e) < 0) return fault_error(L, v->shm, v->off + (size_t)(i - 1) * mp_tc_size(v->tc));
      mp_elem_push(L, v->tc, e);
      return 1;
    }
    if (i == v->n + 1) { lua_pushnil(L); return 1; }
    return luaL_error(L, "view index %I out of range (size %I)", i, v->n);
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int view_newindex(lua_State *L) {
  view_t *v = checkview_mt(L, lua_upvalueindex(2));
  if (lua_type(L, 2) != LUA_TNUMBER)
    return luaL_error(L, "cannot set field '%s' of a SharedMemory view (indexes are integers)", luaL_tolstring(L, 2, NULL));
  lua_Integer i = view_index_of(L, 2);
  if ((lua_Unsigned)i - 1 >= (lua_Unsigned)v->n) return luaL_error(L, "view index %I out of range (size %I)", i, v->n);
  mp_elem e = mp_elem_check(L, v->tc, 3);
  if (g_stores(v->tc, v->data, i - 1, 1, &e, 1) < 0)
    return fault_error(L, v->shm, v->off + (size_t)(i - 1) * mp_tc_size(v->tc));
  return 0;
}

static int view_len(lua_State *L) {
  view_t *v = checkview(L);
  lua_pushinteger(L, v->n);
  return 1;
}

/* the elements i..j (1-based, within the view) as a new table */
static int view_push_range(lua_State *L, view_t *v, lua_Integer i, lua_Integer j) {
  lua_Integer n = j >= i ? j - i + 1 : 0;
  lua_createtable(L, n < INT32_MAX ? (int)n : 0, 0);
  mp_elem buf[256];
  for (lua_Integer k = 0; k < n; k += 256) {
    lua_Integer m = n - k < 256 ? n - k : 256;
    if (g_loads(v->tc, v->data, i - 1 + k, m, buf) < 0)
      return fault_error(L, v->shm, v->off + (size_t)(i - 1 + k) * mp_tc_size(v->tc));
    for (lua_Integer q = 0; q < m; q++) {
      mp_elem_push(L, v->tc, buf[q]);
      lua_rawseti(L, -2, k + q + 1);
    }
  }
  return 1;
}

static int view_totable(lua_State *L) {
  view_t *v = checkview(L);
  return view_push_range(L, v, 1, v->n);
}

/* v:slice([i = 1 [, j = #v]]), indexes as string.sub takes them */
static int view_slice(lua_State *L) {
  view_t *v = checkview(L);
  lua_Integer i, j;
  mp_slice_range(L, 2, v->n, &i, &j);
  return view_push_range(L, v, i, j);
}

static int view_fill(lua_State *L) {
  view_t *v = checkview(L);
  mp_elem e = mp_elem_check(L, v->tc, 2);
  if (g_stores(v->tc, v->data, 0, v->n, &e, 1) < 0) return fault_error(L, v->shm, v->off);
  return 0;
}

/* v:set(i, values): a table, or a string for 'c' and 'u'; all checked first */
static int view_set(lua_State *L) {
  view_t *v = checkview(L);
  lua_Integer i = luaL_checkinteger(L, 2), n;
  mp_elem *e = mp_elems_check(L, v->tc, 3, &n);
  if (i < 1 || i > v->n + 1 || n > v->n - (i - 1))
    return luaL_error(L, "view:set(%I, ...) of %I elements out of range (size %I)", i, n, v->n);
  if (g_stores(v->tc, v->data, i - 1, n, e, 0) < 0)
    return fault_error(L, v->shm, v->off + (size_t)(i - 1) * mp_tc_size(v->tc));
  return 0;
}

static int view_tostring(lua_State *L) {
  view_t *v = mp_toself(L, 1, MP_CLASSES(VIEW));
  lua_pushfstring(L, "%s('%c', %I at byte %I of '%s'%s) %p", VIEW, v->tc, v->n, (lua_Integer)v->off + 1,
                  v->shm->name, v->shm->base ? "" : ", closed", (void *)v);
  return 1;
}

/* ------------------------------------------------------------------ classes */

static void newindexed(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta,
                       lua_CFunction index, lua_CFunction newindex) {
  mp_newmetatable(L, name, mp_nregs(meta) + 2);  /* (+ __index, __newindex) */
  luaL_setfuncs(L, meta, 0);
  lua_createtable(L, 0, mp_nregs(methods));
  luaL_setfuncs(L, methods, 0);
  lua_pushvalue(L, -2);
  lua_pushcclosure(L, index, 2);
  lua_setfield(L, -2, "__index");
  if (newindex) {
    lua_newtable(L);
    lua_pushvalue(L, -2);
    lua_pushcclosure(L, newindex, 2);
    lua_setfield(L, -2, "__newindex");
  }
  lua_pop(L, 1);
}

static int shm_newindex(lua_State *L) {
  toshm(L, 1);
  return luaL_error(L, "cannot set field '%s' of a SharedMemory", luaL_tolstring(L, 2, NULL));
}

int mp_shm_open(lua_State *L) {
  static const luaL_Reg shm_methods[] = {
    {"read", shm_read}, {"write", shm_write}, {"view", shm_view}, {"close", shm_close},
    {"unlink", shm_unlink_m}, {NULL, NULL}
  };
  static const luaL_Reg shm_meta[] = {
    {"__gc", shm_close}, {"__close", shm_close}, {"__tostring", shm_tostring},
    {"__newindex", shm_newindex}, {NULL, NULL}
  };
  static const luaL_Reg view_methods[] = {
    {"totable", view_totable}, {"slice", view_slice}, {"fill", view_fill}, {"set", view_set}, {NULL, NULL}
  };
  static const luaL_Reg view_meta[] = {
    {"__len", view_len}, {"__tostring", view_tostring}, {NULL, NULL}
  };
  newindexed(L, SHM, shm_methods, shm_meta, shm_index, NULL);
  newindexed(L, VIEW, view_methods, view_meta, view_index, view_newindex);
  lua_pushcfunction(L, shm_new);
  lua_setfield(L, -2, "SharedMemory");
  lua_pushcfunction(L, shm_fix_random);
  lua_setfield(L, -2, "_shm_random");
  return 0;
}
