/* socket.c: Listener and connect over Unix and TCP sockets, HMAC-SHA256 for their
** authentication handshake, and a poll over many descriptors (docs/connection.md).
**
** The policy (addresses, the handshake, trust, wait over objects) is in
** lua/multiprocessing/connection.lua; this file does what needs the OS:
**   core.listen(kind, a, b, backlog)     kind "unix" (a: path, "\0..." abstract) or
**                                        "tcp" (a: host, "" = any; b: port) -> Listener
**   core.connect(kind, a, b, timeout, retry) -> Connection (pipe.c's class)
**   core.hmac_sha256(key, msg), core.random_bytes(n), core.compare_digest(a, b)
**   core.need_lib(name, who)             name "crypto" or "hiredis": opens it now (dynlib.h),
**                                        or raises "<who>: cannot load <soname> (install ...)"
** Only the HMAC needs libcrypto (opened at its first use): the random bytes are the
** kernel's (getrandom), the comparison is here.
**   core.poll_fds({fd...}, timeout)      -> {i...} of the readable ones
** Every wait polls in slices of SLICE_MS and ends on Ctrl-C (mp_hook_pending)
** with nil, "interrupted", on its deadline with nil, "timeout".
**
** A Listener bound to a Unix path unlinks it on close (and __gc), in the
** process that created it only (a forked copy never does), and only if the
** path still names the socket it made (same device and inode): a path that a
** newer Listener took over is left alone.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <sys/random.h>

#include "dynlib.h"

#define LISTENER "multiprocessing.Listener"
#define SLICE_MS 50          /* blocking calls look for interrupts this often */
#define BACKLOG 64
#define MAXPATH ((int)sizeof(((struct sockaddr_un *)0)->sun_path) - 1)

typedef struct listener {
  int fd;                    /* -1 when closed */
  int tcp;
  pid_t pid;                 /* creator: the only process that unlinks */
  int unlinks;               /* bound a Unix path (not an abstract name) */
  dev_t dev;                 /* the socket file it made */
  ino_t ino;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
} listener;

typedef struct addr {
  struct sockaddr_storage sa;
  socklen_t len;
} addr;

static int listener_accept(lua_State *L);
static int listener_close(lua_State *L);
static int listener_fileno(lua_State *L);
static int listener_address(lua_State *L);
static int listener_tostring(lua_State *L);

/* ------------------------------------------------------------ helpers */

static int slice_ms(double deadline) {
  if (deadline < 0) return SLICE_MS;
  double left = deadline - mp_now();
  if (left <= 0) return -1;
  return left * 1000 < SLICE_MS ? (int)(left * 1000) + 1 : SLICE_MS;
}

static int pushword(lua_State *L, const char *word) {
  lua_pushnil(L);
  lua_pushstring(L, word);
  return 2;
}

/* The Unix address at idx into a: a path, or an abstract name ("\0..."). */
static void unix_addr(lua_State *L, int idx, addr *a) {
  size_t n;
  const char *p = luaL_checklstring(L, idx, &n);
  luaL_argcheck(L, n > 0 && !(n == 1 && p[0] == 0), idx, "empty Unix socket address");
  if (n > (size_t)MAXPATH)
    luaL_error(L, "Unix socket address too long (%d bytes, at most %d)", (int)n, MAXPATH);
  if (p[0] != 0 && memchr(p, 0, n)) luaL_argerror(L, idx, "a Unix socket path cannot contain a zero byte");
  struct sockaddr_un *u = (struct sockaddr_un *)&a->sa;
  memset(a, 0, sizeof *a);
  u->sun_family = AF_UNIX;
  memcpy(u->sun_path, p, n);
  /* an abstract name is exactly its bytes; a path ends with its zero */
  a->len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (p[0] != 0));
}

/* The TCP addresses of host:port (getaddrinfo; numeric hosts do not block).
** "" means any address for a Listener, the loopback for a Client. Pushes
** nothing; on failure pushes nil, message, "EAI" and returns NULL. */
static struct addrinfo *tcp_addrs(lua_State *L, const char *host, lua_Integer port, int passive) {
  char serv[16];
  snprintf(serv, sizeof serv, "%d", (int)port);
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  if (*host == 0) {
    hints.ai_family = AF_INET;
    hints.ai_flags |= AI_NUMERICHOST;
    host = passive ? "0.0.0.0" : "127.0.0.1";
  }
  int r = getaddrinfo(host, serv, &hints, &res);
  if (r != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot resolve '%s': %s", host, r == EAI_SYSTEM ? strerror(errno) : gai_strerror(r));
    lua_pushliteral(L, "EAI");
    return NULL;
  }
  return res;
}

static void nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* "host:port" ("[v6]:port") or a Unix name, of a socket address */
static void pushaddr(lua_State *L, const struct sockaddr_storage *sa, socklen_t len) {
  char host[INET6_ADDRSTRLEN];
  if (sa->ss_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    lua_pushfstring(L, "%s:%d", host, (int)ntohs(in->sin_port));
  } else if (sa->ss_family == AF_INET6) {
    const struct sockaddr_in6 *in = (const struct sockaddr_in6 *)sa;
    inet_ntop(AF_INET6, &in->sin6_addr, host, sizeof host);
    lua_pushfstring(L, "[%s]:%d", host, (int)ntohs(in->sin6_port));
  } else if (sa->ss_family == AF_UNIX && len > offsetof(struct sockaddr_un, sun_path)) {
    const struct sockaddr_un *u = (const struct sockaddr_un *)sa;
    size_t n = len - offsetof(struct sockaddr_un, sun_path);
    if (u->sun_path[0] != 0) n = strnlen(u->sun_path, n);
    lua_pushlstring(L, u->sun_path, n);
  } else {
    lua_pushnil(L);  /* an unnamed Unix socket (a Client's end) */
  }
}

/* ------------------------------------------------------------ Listener */

static listener *checklistener(lua_State *L, int idx) {
  listener *l = mp_toself(L, idx, MP_CLASSES(LISTENER));
  if (l->fd < 0) luaL_error(L, "attempt to use a closed Listener");
  return l;
}

/* one bound, listening socket for a: fd, or -1 with errno set */
static int bind_listen(const struct sockaddr *sa, socklen_t len, int backlog, int reuse) {
  int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -1;
  int one = 1;
  if (reuse) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, sa, len) != 0) { int e = errno; close(fd); errno = e; return -1; }
  if (listen(fd, backlog) != 0) { int e = errno; close(fd); errno = e; return -2; }
  return fd;
}

/* The arguments kind, a, b (at 1, 2, 3) of listen and connect: returns tcp;
** a Unix address goes to *a, a TCP one to *host, *port (at least minport). */
static int check_address(lua_State *L, addr *a, const char **host, lua_Integer *port, lua_Integer minport) {
  static const char *const kinds[] = { "unix", "tcp", NULL };
  int tcp = luaL_checkoption(L, 1, NULL, kinds) == 1;
  if (tcp) {
    *host = luaL_checkstring(L, 2);
    *port = luaL_checkinteger(L, 3);
    luaL_argcheck(L, *port >= minport && *port <= 65535, 3, "port out of range");
  } else {
    unix_addr(L, 2, a);
  }
  return tcp;
}

/* core.listen(kind, a, b [, backlog]) -> Listener | nil, message, code */
static int sock_listen(lua_State *L) {
  addr a;
  const char *host = NULL;
  lua_Integer port = 0;
  int tcp = check_address(L, &a, &host, &port, 0);
  lua_Integer backlog = luaL_optinteger(L, 4, BACKLOG);
  luaL_argcheck(L, backlog > 0 && backlog <= INT_MAX, 4, "backlog must be positive");
  listener *l = lua_newuserdatauv(L, sizeof(listener), 0);  /* closed until it owns the fd */
  memset(l, 0, sizeof *l);
  l->fd = -1;
  l->tcp = tcp;
  l->pid = getpid();
  luaL_setmetatable(L, LISTENER);
  if (tcp) {
    struct addrinfo *res = tcp_addrs(L, host, port, 1);
    if (!res) return 3;
    int fd = -1, e = 0;
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
      fd = bind_listen(ai->ai_addr, ai->ai_addrlen, (int)backlog, 1);
      if (fd < 0) e = errno;
    }
    freeaddrinfo(res);
    if (fd < 0) { errno = e; return mp_pusherrno(L, "bind"); }
    l->fd = fd;
    return 1;
  }
  int fd = bind_listen((struct sockaddr *)&a.sa, a.len, (int)backlog, 0);
  if (fd == -2) {  /* bound, then listen failed: the file was made */
    int e = errno;
    unlink(((struct sockaddr_un *)&a.sa)->sun_path);
    errno = e;
  }
  if (fd < 0) return mp_pusherrno(L, fd == -2 ? "listen" : "bind");
  l->fd = fd;
  const char *path = ((struct sockaddr_un *)&a.sa)->sun_path;
  struct stat st;
  if (path[0] != 0 && stat(path, &st) == 0) {
    l->unlinks = 1;
    l->dev = st.st_dev;
    l->ino = st.st_ino;
    memcpy(l->path, path, sizeof l->path);
  }
  return 1;
}

/* listener:accept([timeout]) -> Connection, peer address | nil, "timeout"|"interrupted" | nil, msg, code */
static int listener_accept(lua_State *L) {
  listener *l = checklistener(L, 1);
  double deadline = mp_deadline(L, 2);
  void *c = mp_conn_new(L, l->tcp);  /* closed until it owns the fd */
  lua_Hook h0 = lua_gethook(L);
  for (;;) {
    struct sockaddr_storage peer;
    socklen_t plen = sizeof peer;
    int fd = accept4(l->fd, (struct sockaddr *)&peer, &plen, SOCK_CLOEXEC);
    if (fd >= 0) {
      if (l->tcp) nodelay(fd);
      mp_conn_setfd(c, fd);
      pushaddr(L, &peer, plen);
      return 2;
    }
    switch (errno) {  /* accept(2): a connection that failed before we took it; try the next */
      case EINTR: case ECONNABORTED: case EPROTO: case ENETDOWN: case ENOPROTOOPT: case EHOSTDOWN:
      case ENONET: case EHOSTUNREACH: case ENETUNREACH: case EOPNOTSUPP:
        continue;
      case EAGAIN:
#if EWOULDBLOCK != EAGAIN
      case EWOULDBLOCK:
#endif
        break;
      default:
        return mp_pusherrno(L, "accept");
    }
    if (mp_hook_pending(L, h0)) return pushword(L, "interrupted");
    int ms = slice_ms(deadline);
    if (ms < 0) return pushword(L, "timeout");
    struct pollfd p = { l->fd, POLLIN, 0 };
    poll(&p, 1, ms);
  }
}

static int listener_close(lua_State *L) {
  listener *l = mp_toself(L, 1, MP_CLASSES(LISTENER));
  if (l->fd < 0) return 0;
  close(l->fd);
  l->fd = -1;
  struct stat st;
  if (l->unlinks && l->pid == getpid() && stat(l->path, &st) == 0 && S_ISSOCK(st.st_mode) &&
      st.st_dev == l->dev && st.st_ino == l->ino)
    unlink(l->path);
  l->unlinks = 0;
  return 0;
}

static int listener_fileno(lua_State *L) {
  lua_pushinteger(L, checklistener(L, 1)->fd);
  return 1;
}

/* listener:_address() -> "host:port" or the Unix name it is bound to */
static int listener_address(lua_State *L) {
  listener *l = checklistener(L, 1);
  struct sockaddr_storage sa;
  socklen_t len = sizeof sa;
  if (getsockname(l->fd, (struct sockaddr *)&sa, &len) != 0) return mp_pusherrno(L, "getsockname");
  pushaddr(L, &sa, len);
  return 1;
}

static int listener_tostring(lua_State *L) {
  listener *l = mp_toself(L, 1, MP_CLASSES(LISTENER));
  if (l->fd < 0) lua_pushliteral(L, "Listener (closed)");
  else lua_pushfstring(L, "Listener (fd %d, %s)", l->fd, l->tcp ? "tcp" : "unix");
  return 1;
}

/* ------------------------------------------------------------ connect */

/* Waits for a non-blocking connect on fd to finish: 0 connected, else an errno
** (ETIMEDOUT for the deadline, EINTR for an interrupt). */
static int connect_wait(lua_State *L, int fd, double deadline, lua_Hook h0) {
  for (;;) {
    int ms = slice_ms(deadline);
    if (ms < 0) return ETIMEDOUT;
    struct pollfd p = { fd, POLLOUT, 0 };
    int r = poll(&p, 1, ms);
    if (r > 0) {
      int e = 0;
      socklen_t n = sizeof e;
      if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &n) != 0) return errno;
      return e;
    }
    if (mp_hook_pending(L, h0)) return EINTR;
  }
}

/* one attempt at sa: the fd, or -1 with *err (ETIMEDOUT: deadline, EINTR: interrupted) */
static int try_connect(lua_State *L, const struct sockaddr *sa, socklen_t len, double deadline,
                       lua_Hook h0, int *err) {
  int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) { *err = errno; return -1; }
  int r;
  do r = connect(fd, sa, len); while (r != 0 && errno == EINTR);
  int e = r == 0 ? 0 : errno;
  if (e == EINPROGRESS) e = connect_wait(L, fd, deadline, h0);
  if (e != 0) { close(fd); *err = e; return -1; }
  return fd;
}

/* core.connect(kind, a, b [, timeout [, retry]]) -> Connection
**   | nil, "timeout"|"interrupted" | nil, message, code
** retry: a refused or missing address is tried again until the deadline (a
** Client started before its Listener). A full backlog (EAGAIN) is always waited out. */
static int sock_connect(lua_State *L) {
  addr a;
  const char *host = NULL;
  lua_Integer port = 0;
  int tcp = check_address(L, &a, &host, &port, 1);
  double deadline = mp_deadline(L, 4);
  int retry = lua_toboolean(L, 5) && deadline >= 0;
  lua_settop(L, 5);
  void *c = mp_conn_new(L, tcp);  /* closed until it owns the fd */
  lua_Hook h0 = lua_gethook(L);
  struct addrinfo *res = NULL;
  if (tcp && !(res = tcp_addrs(L, host, port, 0))) return 3;
  int fd = -1, err = 0;
  for (;;) {
    if (tcp) {
      for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
        fd = try_connect(L, ai->ai_addr, ai->ai_addrlen, deadline, h0, &err);
        if (fd < 0 && (err == ETIMEDOUT || err == EINTR)) break;
      }
    } else {
      fd = try_connect(L, (struct sockaddr *)&a.sa, a.len, deadline, h0, &err);
    }
    if (fd >= 0) break;
    int again = err == EAGAIN || (retry && (err == ENOENT || err == ECONNREFUSED));
    if (err == EINTR || (again && mp_hook_pending(L, h0))) { err = EINTR; break; }
    if (!again) break;
    int ms = slice_ms(deadline);
    if (ms < 0) { err = ETIMEDOUT; break; }
    poll(NULL, 0, ms < 10 ? ms : 10);  /* a short pause between attempts */
  }
  if (res) freeaddrinfo(res);
  if (fd < 0) {
    if (err == EINTR) return pushword(L, "interrupted");
    if (err == ETIMEDOUT && deadline >= 0 && mp_now() >= deadline) return pushword(L, "timeout");
    errno = err;
    return mp_pusherrno(L, "connect");
  }
  if (tcp) nodelay(fd);
  mp_conn_setfd(c, fd);
  return 1;
}

/* ------------------------------------------------------------ crypto */

/* core.hmac_sha256(key, msg) -> 32 bytes */
static int sock_hmac(lua_State *L) {
  size_t kn, mn;
  const char *k = luaL_checklstring(L, 1, &kn);
  const char *m = luaL_checklstring(L, 2, &mn);
  luaL_argcheck(L, kn <= INT_MAX, 1, "key too long");
  const mp_crypto_fns *cr = mp_crypto(L, "HMAC-SHA256");
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (!cr->HMAC(cr->EVP_sha256(), k, (int)kn, (const unsigned char *)m, mn, md, &n))
    return luaL_error(L, "HMAC-SHA256 failed (OpenSSL)");
  lua_pushlstring(L, (const char *)md, n);
  return 1;
}

/* core.random_bytes(n) -> n bytes from the kernel's CSPRNG (what OpenSSL seeds from) */
static int sock_random(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 0 && n <= 4096, 1, "between 0 and 4096 bytes");
  unsigned char b[4096];
  size_t got = 0;
  while (got < (size_t)n) {
    ssize_t r = getrandom(b + got, (size_t)n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return luaL_error(L, "cannot get random bytes: %s", strerror(errno));
    got += (size_t)r;
  }
  lua_pushlstring(L, (const char *)b, (size_t)n);
  return 1;
}

/* core.compare_digest(a, b) -> boolean, in a time that depends on the lengths only
** (every byte is read; the volatile keeps the compiler from stopping early) */
static int sock_compare(lua_State *L) {
  size_t an, bn;
  const unsigned char *a = (const unsigned char *)luaL_checklstring(L, 1, &an);
  const unsigned char *b = (const unsigned char *)luaL_checklstring(L, 2, &bn);
  volatile unsigned char d = an != bn;
  if (an == bn)
    for (size_t i = 0; i < an; i++) d |= (unsigned char)(a[i] ^ b[i]);
  lua_pushboolean(L, d == 0);
  return 1;
}

/* core.need_lib(name, who): opens libcrypto ("crypto") or libhiredis ("hiredis") now, so that a
** missing library is told at the user's call (who), not in the middle of a handshake */
static int sock_need_lib(lua_State *L) {
  static const char *const names[] = {"crypto", "hiredis", NULL};
  int i = luaL_checkoption(L, 1, NULL, names);
  const char *who = luaL_checkstring(L, 2);
  if (i == 0) mp_crypto(L, who);
  else mp_hiredis(L, who);
  return 0;
}

/* ------------------------------------------------------------ poll */

/* core.poll_fds({fd...}, timeout) -> {i...} (indexes of the fds readable, at
** their end or in error; empty when the timeout passed) | nil, "interrupted".
** A descriptor that is not open raises, naming its index. */
static int sock_poll_fds(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer n = luaL_len(L, 1);
  luaL_argcheck(L, n >= 0 && n <= 65536, 1, "too many descriptors");
  double deadline = mp_deadline(L, 2);
  struct pollfd *p = lua_newuserdatauv(L, (size_t)(n ? n : 1) * sizeof *p, 0);
  for (lua_Integer i = 0; i < n; i++) {
    lua_geti(L, 1, i + 1);
    int isnum;
    lua_Integer fd = lua_tointegerx(L, -1, &isnum);
    lua_pop(L, 1);
    if (!isnum || fd < 0 || fd > INT_MAX) return luaL_error(L, "wait: object #%d: not a descriptor", (int)(i + 1));
    p[i].fd = (int)fd;
    p[i].events = POLLIN;
    p[i].revents = 0;
  }
  lua_Hook h0 = lua_gethook(L);
  for (;;) {
    int ms = slice_ms(deadline);
    int r = poll(p, (nfds_t)n, ms < 0 ? 0 : ms);
    if (r > 0) {
      lua_createtable(L, r, 0);
      int k = 0;
      for (lua_Integer i = 0; i < n; i++) {
        if (p[i].revents & POLLNVAL)
          return luaL_error(L, "wait: object #%d: descriptor %d is not open", (int)(i + 1), p[i].fd);
        if (p[i].revents) { lua_pushinteger(L, i + 1); lua_rawseti(L, -2, ++k); }
      }
      return 1;
    }
    if (r < 0 && errno != EINTR) return mp_pusherrno(L, "poll");
    if (ms < 0) { lua_newtable(L); return 1; }
    if (mp_hook_pending(L, h0)) return pushword(L, "interrupted");
  }
}

/* ------------------------------------------------------------ open */

int mp_socket_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"accept", listener_accept}, {"close", listener_close}, {"fileno", listener_fileno},
    {"_address", listener_address},
    {NULL, NULL}
  };
  static const luaL_Reg meta[] = {
    {"__gc", listener_close}, {"__close", listener_close}, {"__tostring", listener_tostring},
    {NULL, NULL}
  };
  mp_newclass(L, LISTENER, methods, meta);
  static const luaL_Reg funcs[] = {
    {"listen", sock_listen}, {"connect", sock_connect}, {"hmac_sha256", sock_hmac},
    {"random_bytes", sock_random}, {"compare_digest", sock_compare}, {"need_lib", sock_need_lib}, {"poll_fds", sock_poll_fds},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
