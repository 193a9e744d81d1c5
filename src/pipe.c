/* pipe.c: Pipe and Connection, framed messages over a Unix socket pair (see docs/pipe.md).
**
** A message is a frame: an 8-byte header, then the payload. The header is a
** native u64: payload length (low 48 bits), number of descriptors passed with
** the frame (bits 48-55), kind (bits 56-63: K_VALUE from send, K_BYTES from
** send_bytes, which never passes descriptors). As in Python's Connection, where
** send is send_bytes of the pickle and recv is the unpickling of recv_bytes,
** the payload of either kind is the same thing to the receiver: recv decodes it
** with the codec, recv_bytes returns it raw. So a relay works:
** b:send_bytes(b:recv_bytes()) passes a value on, and the far end's recv gives
** the value back (its Connections excepted: recv_bytes closes their descriptors).
** Descriptors (Connections inside a value) ride as SCM_RIGHTS on the first
** sendmsg of their frame, so they arrive with its header; the receiver queues
** them in order and each frame takes its count from the queue.
**
** Reads go through a per-connection buffer: small frames are read ahead many
** at a time, a big frame grows the buffer to hold it whole. A recv that times
** out or is interrupted keeps what it read, so the stream never loses its
** place. A send interrupted after part of its frame went out cannot take it
** back: the connection is marked broken and its write side shut down, so the
** peer sees the end of the stream instead of a truncated frame followed by
** garbage.
**
** Fork: the child gets a copy of every fd and of every Connection object.
** Each process closes its own copy (close, __gc), which is right and needed:
** the peer sees EOF only when every copy is closed. Bytes read ahead before a
** fork belong to the process that read them: the other copy refuses to read.
**
** Connections made by Listener and Client (socket.c) are the same objects over
** a connected stream socket: a Unix one carries descriptors like a Pipe, a TCP
** one cannot (C_NOFDS: sending a Connection raises). Their peer may be another
** program: C_DATA makes recv decode in the codec's data-only mode.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "mp.h"

#define CONN "multiprocessing.Connection"
#define SLICE_MS 50                 /* blocking calls look for interrupts this often */
#define BUF_MIN ((size_t)65536)     /* read-ahead buffer */
#define BUF_KEEP ((size_t)8 << 20)  /* a bigger buffer is freed once drained */
#define MAXLEN (((uint64_t)1 << 48) - 1)
#define MAXFDS 253                  /* the kernel's SCM_MAX_FD */
#define NIOV 64                     /* iovecs per sendmsg */

enum { K_VALUE = 1, K_BYTES = 2 };
enum { C_READ = 1, C_WRITE = 2 };
enum { C_DATA = 1, C_NOFDS = 2 };  /* conn.flags */
enum { IO_OK = 0, IO_TIMEOUT, IO_INTERRUPTED, IO_CLOSED, IO_ERROR };

typedef struct conn {
  int fd;                 /* -1 when closed */
  int mode;               /* C_READ | C_WRITE */
  int busy;               /* decoding from buf: no re-entrant recv */
  int flags;              /* C_DATA | C_NOFDS */
  pid_t pid;              /* creating process (documentation, tostring) */
  pid_t bufpid;           /* process that read the buffered bytes */
  const char *broken;     /* why the connection cannot be used, or NULL */
  char *buf;              /* buffered bytes are buf[r..w) */
  size_t cap, r, w;
  int *q, qn, qcap;       /* received descriptors not yet claimed by a frame */
} conn;

static int conn_send(lua_State *L);
static int conn_recv(lua_State *L);
static int conn_recv_value(lua_State *L);
static int conn_send_bytes(lua_State *L);
static int conn_recv_bytes(lua_State *L);
static int conn_poll(lua_State *L);
static int conn_close(lua_State *L);
static int conn_fileno(lua_State *L);
static int conn_index(lua_State *L);
static int conn_tostring(lua_State *L);

/* ------------------------------------------------------------ helpers */

#define mypid mp_getpid()  /* (renewed in every child by arena.c's fork handler) */

static conn *newconn(lua_State *L, int mode) {
  conn *c = lua_newuserdatauv(L, sizeof(conn), 0);
  memset(c, 0, sizeof(*c));
  c->fd = -1;
  c->mode = mode;
  c->pid = mypid;
  luaL_setmetatable(L, CONN);
  return c;
}

static void drop_queue(conn *c) {
  for (int i = 0; i < c->qn; i++) close(c->q[i]);
  c->qn = 0;
}

static void free_buffers(conn *c) {
  free(c->buf); c->buf = NULL; c->cap = c->r = c->w = 0;
  drop_queue(c);
  free(c->q); c->q = NULL; c->qcap = 0;
}

static conn *checkconn(lua_State *L, int idx) {
  conn *c = mp_toself(L, idx, MP_CLASSES(CONN));
  if (c->fd < 0) luaL_error(L, "attempt to use a closed Connection");
  return c;
}

static conn *checkmode(lua_State *L, const char *what, int mode) {
  conn *c = checkconn(L, 1);
  if (!(c->mode & mode))
    luaL_error(L, "%s: this Connection is %s", what,
               mode == C_WRITE ? "read-only (the read end of a one-way Pipe)"
                               : "write-only (the write end of a one-way Pipe)");
  if (c->broken) luaL_error(L, "%s: the Connection is broken (%s)", what, c->broken);
  return c;
}

static conn *checkreader(lua_State *L, const char *what) {
  conn *c = checkmode(L, what, C_READ);
  if (c->busy) luaL_error(L, "%s: the Connection is busy decoding a message (re-entered?)", what);
  if (c->w > c->r && c->bufpid != mypid)
    luaL_error(L, "%s: this Connection was read by process %d before a fork: its copy in process %d "
               "cannot read (one end must be read by one process)", what, (int)c->bufpid, (int)mypid);
  return c;
}

/* nil, "timeout"|"interrupted"|"closed", or nil, "what: strerror", "EXXX" */
static int pushfail(lua_State *L, int r, int err, const char *what) {
  if (r == IO_ERROR) { errno = err; return mp_pusherrno(L, what); }
  lua_pushnil(L);
  lua_pushstring(L, r == IO_TIMEOUT ? "timeout" : r == IO_INTERRUPTED ? "interrupted" : "closed");
  return 2;
}

/* milliseconds to sleep in one slice, -1 when the deadline passed */
static int slice_ms(double deadline) {
  if (deadline < 0) return SLICE_MS;
  double left = deadline - mp_now();
  if (left <= 0) return -1;
  return left * 1000 < SLICE_MS ? (int)(left * 1000) + 1 : SLICE_MS;
}

/* ------------------------------------------------------------ reading */

/* One recvmsg into the buffer (room for at least `need` bytes from r),
** queueing the descriptors that come along. >0 bytes, 0 at EOF, -1 errno. */
static ssize_t fill(conn *c, size_t need) {
  if (c->cap - c->r < need || (c->r > 0 && c->cap - c->w < 4096)) {
    size_t have = c->w - c->r;
    if (c->r > 0) { memmove(c->buf, c->buf + c->r, have); c->r = 0; c->w = have; }
    if (c->cap < need || c->cap < BUF_MIN) {
      size_t cap = c->cap < BUF_MIN ? BUF_MIN : c->cap;
      if (need > BUF_KEEP) cap = need;  /* a big frame: exactly its size */
      while (cap < need) cap *= 2;
      char *p = realloc(c->buf, cap);
      if (!p) { errno = ENOMEM; return -1; }
      c->buf = p; c->cap = cap;
    }
  }
  union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int) * MAXFDS)]; } ctl;
  struct iovec iov = { c->buf + c->w, c->cap - c->w };
  struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl };
  ssize_t n = recvmsg(c->fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0) return -1;
  for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
    if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
    int k = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    int *fds = (int *)CMSG_DATA(h);
    if (k <= 0) continue;
    if (c->qn + k > c->qcap) {
      int qcap = c->qn + k + 8;
      int *q = realloc(c->q, (size_t)qcap * sizeof(int));
      if (!q) { for (int i = 0; i < k; i++) close(fds[i]); c->broken = "out of memory for passed descriptors"; continue; }
      c->q = q; c->qcap = qcap;
    }
    memcpy(c->q + c->qn, fds, (size_t)k * sizeof(int));
    c->qn += k;
  }
  if (m.msg_flags & MSG_CTRUNC) c->broken = "passed descriptors were lost";
  if (n > 0) { c->w += (size_t)n; c->bufpid = mypid; }
  return n;
}

/* Waits until `need` bytes are buffered. */
static int await(lua_State *L, conn *c, size_t need, double deadline, lua_Hook h0, int *err) {
  while (c->w - c->r < need) {
    ssize_t n = fill(c, need);
    if (n > 0) continue;
    if (n == 0) return IO_CLOSED;
    if (errno == EINTR) continue;
    if (errno == ECONNRESET) return IO_CLOSED;
    if (errno != EAGAIN && errno != EWOULDBLOCK) { *err = errno; return IO_ERROR; }
    if (mp_hook_pending(L, h0)) return IO_INTERRUPTED;
    int ms = slice_ms(deadline);
    if (ms < 0) return IO_TIMEOUT;
    struct pollfd p = { c->fd, POLLIN, 0 };
    poll(&p, 1, ms);
  }
  return IO_OK;
}

/* A frame's header once it is buffered (IO_OK), with kind, length and fds. */
static int read_header(lua_State *L, conn *c, double deadline, lua_Hook h0, int *err,
                       int *kind, size_t *len, int *nfds) {
  int r = await(L, c, 8, deadline, h0, err);
  if (r != IO_OK) return r;
  uint64_t h;
  memcpy(&h, c->buf + c->r, 8);
  *kind = (int)(h >> 56);
  *nfds = (int)((h >> 48) & 0xff);
  *len = (size_t)(h & MAXLEN);
  if ((*kind != K_VALUE && *kind != K_BYTES) || *nfds > MAXFDS || (*kind == K_BYTES && *nfds)) {
    c->broken = "received a malformed frame";
    luaL_error(L, "recv: the Connection is broken (%s)", c->broken);
  }
  if (c->qn < *nfds) {
    c->broken = "a frame came without its descriptors";
    luaL_error(L, "recv: the Connection is broken (%s)", c->broken);
  }
  return IO_OK;
}

/* after a frame was used: drop it, and a big buffer once drained */
static void consume(conn *c, size_t n) {
  c->r += n;
  if (c->r == c->w) {
    c->r = c->w = 0;
    if (c->cap > BUF_KEEP) { free(c->buf); c->buf = NULL; c->cap = 0; }
  }
}

static void take_fds(conn *c, int *to, int n) {
  if (n == 0) return;
  if (to) memcpy(to, c->q, (size_t)n * sizeof(int));
  c->qn -= n;
  memmove(c->q, c->q + n, (size_t)c->qn * sizeof(int));
}

/* The frame's descriptors, while its payload is decoded. Handles pick theirs
** by index; the ones left are closed. */
typedef struct fdsource { int fds[MAXFDS]; int n; } fdsource;
static fdsource *cur_source;

static int decode_frame(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t n = (size_t)lua_tointeger(L, 2);
  int mode = (int)lua_tointeger(L, 3);
  lua_settop(L, 0);
  mp_decode_mode(L, p, n, mode);
  return 1;
}

/* Reads one frame (any kind) and pushes its payload decoded, or as a string if
** raw. Returns the number of results. */
static int recv_frame(lua_State *L, conn *c, int raw, double deadline) {
  lua_Hook h0 = lua_gethook(L);
  int err = 0, kind, nfds;
  size_t len;
  int r = read_header(L, c, deadline, h0, &err, &kind, &len, &nfds);
  if (r == IO_OK) {
    if (len > (size_t)-1 - 8) return luaL_error(L, "recv: message too large");
    r = await(L, c, 8 + len, deadline, h0, &err);
    if (r == IO_ERROR && err == ENOMEM)
      return luaL_error(L, "recv: not enough memory for a message of %I bytes", (lua_Integer)len);
  }
  if (r != IO_OK) return pushfail(L, r, err, "recv");
  const char *p = c->buf + c->r + 8;
  if (raw) {
    lua_pushlstring(L, p, len);  /* on a memory error the frame is kept for a retry */
    for (int i = 0; i < nfds; i++) close(c->q[i]);  /* Connections in raw bytes are lost */
    take_fds(c, NULL, nfds);
    consume(c, 8 + len);
    return 1;
  }
  fdsource src;
  src.n = nfds;
  take_fds(c, src.fds, nfds);
  /* decoding may run Lua (require): protected, so the descriptors and the
  ** buffer are settled whatever happens */
  fdsource *saved = cur_source;
  cur_source = &src;
  c->busy = 1;
  lua_pushcfunction(L, decode_frame);
  lua_pushlightuserdata(L, (void *)p);
  lua_pushinteger(L, (lua_Integer)len);
  lua_pushinteger(L, c->flags & C_DATA ? MP_DECODE_DATA : MP_DECODE_ALL);
  int st = lua_pcall(L, 3, 1, 0);
  c->busy = 0;
  cur_source = saved;
  for (int i = 0; i < src.n; i++) if (src.fds[i] >= 0) close(src.fds[i]);
  if (c->fd < 0) free_buffers(c);  /* closed while decoding */
  else consume(c, 8 + len);
  if (st != LUA_OK) return lua_error(L);
  return 1;
}

/* conn:recv([timeout]) -> value | nil, "timeout"|"closed"|"interrupted" */
static int conn_recv(lua_State *L) {
  conn *c = checkreader(L, "recv");
  double deadline = mp_deadline(L, 2);
  return recv_frame(L, c, 0, deadline);
}

/* conn:recv_value([timeout]) -> true, value | nil, "timeout"|"closed"|"interrupted" | nil, msg, code
** (the library's convention: nil, reason for an expected outcome) */
static int conn_recv_value(lua_State *L) {
  conn *c = checkreader(L, "recv_value");
  double deadline = mp_deadline(L, 2);
  int n = recv_frame(L, c, 0, deadline);
  if (n == 1) { lua_pushboolean(L, 1); lua_insert(L, -2); return 2; }
  return n;  /* recv's nil, reason */
}

/* conn:recv_bytes([timeout]) -> string | nil, "timeout"|"closed"|"interrupted" */
static int conn_recv_bytes(lua_State *L) {
  conn *c = checkreader(L, "recv_bytes");
  double deadline = mp_deadline(L, 2);
  return recv_frame(L, c, 1, deadline);
}

/* conn:poll([timeout]) -> true when recv would find data (or the end) */
static int conn_poll(lua_State *L) {
  conn *c = checkreader(L, "poll");
  double deadline = lua_isnoneornil(L, 2) ? mp_now() : mp_deadline(L, 2);
  lua_Hook h0 = lua_gethook(L);
  for (;;) {
    if (c->w > c->r) { lua_pushboolean(L, 1); return 1; }
    struct pollfd p = { c->fd, POLLIN, 0 };
    int ms = slice_ms(deadline);
    int r = poll(&p, 1, ms < 0 ? 0 : ms);
    if (r > 0) { lua_pushboolean(L, 1); return 1; }
    if (r < 0 && errno != EINTR) return mp_pusherrno(L, "poll");
    if (ms < 0) { lua_pushboolean(L, 0); return 1; }
    if (mp_hook_pending(L, h0)) return pushfail(L, IO_INTERRUPTED, 0, "poll");
  }
}

/* ------------------------------------------------------------ writing */

/* Sends the pieces (the header first) with the descriptors on the first
** sendmsg, going round partial writes. */
static int write_frame(lua_State *L, conn *c, struct iovec *iov, int niov,
                       const int *fds, int nfds, int *err) {
  lua_Hook h0 = lua_gethook(L);
  union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int) * MAXFDS)]; } ctl;
  size_t sent = 0;
  int i = 0;
  for (;;) {
    while (i < niov && iov[i].iov_len == 0) i++;
    if (i == niov) return IO_OK;
    struct msghdr m = { .msg_iov = iov + i, .msg_iovlen = (size_t)(niov - i > IOV_MAX ? IOV_MAX : niov - i) };
    if (nfds && sent == 0) {
      memset(&ctl, 0, sizeof ctl);
      m.msg_control = ctl.b;
      m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
      struct cmsghdr *h = CMSG_FIRSTHDR(&m);
      h->cmsg_level = SOL_SOCKET;
      h->cmsg_type = SCM_RIGHTS;
      h->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
      memcpy(CMSG_DATA(h), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n = sendmsg(c->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      sent += (size_t)n;
      for (size_t k = (size_t)n; k > 0; ) {
        size_t d = k < iov[i].iov_len ? k : iov[i].iov_len;
        iov[i].iov_base = (char *)iov[i].iov_base + d;
        iov[i].iov_len -= d;
        k -= d;
        if (iov[i].iov_len == 0) i++;
      }
      continue;
    }
    int r;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!mp_hook_pending(L, h0)) {
        struct pollfd p = { c->fd, POLLOUT, 0 };
        poll(&p, 1, SLICE_MS);
        continue;
      }
      r = IO_INTERRUPTED;
    } else if (n < 0 && (errno == EPIPE || errno == ECONNRESET)) {
      r = IO_CLOSED;
    } else {
      *err = n < 0 ? errno : EIO;
      r = IO_ERROR;
    }
    if (sent > 0) {  /* a frame half sent: the stream cannot go on */
      c->broken = r == IO_INTERRUPTED ? "a send was interrupted in the middle of a message"
                                     : "a send failed in the middle of a message";
      shutdown(c->fd, SHUT_WR);
    }
    return r;
  }
}

static int sent_result(lua_State *L, int r, int err, const char *what) {
  if (r == IO_OK) { lua_pushboolean(L, 1); return 1; }
  return pushfail(L, r, err, what);
}

/* The Connections met while encoding a value for conn:send. */
typedef struct fdsink { int fds[MAXFDS]; int n; int nofds; } fdsink;
static fdsink *cur_sink;

static int encode_frame(lua_State *L) {
  mp_enc *e = mp_encode(L, 1, "value");  /* leaves the encoder on the stack */
  lua_pushlightuserdata(L, e);
  return 2;
}

/* conn:send(v) -> true | nil, "closed"|"interrupted" */
static int conn_send(lua_State *L) {
  conn *c = checkmode(L, "send", C_WRITE);
  luaL_checkany(L, 2);
  lua_settop(L, 2);
  fdsink sink;
  sink.n = 0;
  sink.nofds = (c->flags & C_NOFDS) != 0;
  fdsink *saved = cur_sink;
  cur_sink = &sink;
  lua_pushcfunction(L, encode_frame);
  lua_pushvalue(L, 2);
  int st = lua_pcall(L, 1, 2, 0);  /* protected: cur_sink is restored on errors */
  cur_sink = saved;
  if (st != LUA_OK) return lua_error(L);
  mp_enc *e = lua_touserdata(L, -1);  /* the encoder (at -2) stays referenced until done */
  size_t size = mp_enc_size(e);
  /* the frame's handles are pinned by mp_enc_done once it is out: a pipe's unread bytes
  ** cannot be scanned when its last end closes (docs/arena.md); a frame never sent pins nothing */
  if (size > MAXLEN) { mp_enc_unsent(e); mp_enc_done(L, e); return luaL_error(L, "send: message too large"); }
  struct iovec small[NIOV], *iov = small;
  size_t np = 0;
  const void *p;
  size_t n;
  while (mp_enc_piece(e, np, &p, &n)) np++;
  if (np + 1 > NIOV) {
    iov = malloc((np + 1) * sizeof(*iov));
    if (!iov) { mp_enc_unsent(e); mp_enc_done(L, e); return luaL_error(L, "send: not enough memory"); }
  }
  for (size_t i = 0; i < np; i++) {
    mp_enc_piece(e, i, &p, &n);
    iov[i + 1].iov_base = (void *)p;
    iov[i + 1].iov_len = n;
  }
  int err = 0;
  uint64_t h = (uint64_t)size | ((uint64_t)sink.n << 48) | ((uint64_t)K_VALUE << 56);
  iov[0].iov_base = &h;
  iov[0].iov_len = 8;
  int r = write_frame(L, c, iov, (int)(np + 1), sink.fds, sink.n, &err);
  if (iov != small) free(iov);
  mp_enc_done(L, e);
  return sent_result(L, r, err, "send");
}

/* conn:send_bytes(s [, offset = 0 [, size = #s - offset]]) -> true | nil, "closed"|"interrupted"
** Sends s:sub(offset + 1, offset + size): Python's offset, the bytes skipped. */
static int conn_send_bytes(lua_State *L) {
  conn *c = checkmode(L, "send_bytes", C_WRITE);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  lua_Integer off = luaL_optinteger(L, 3, 0);
  luaL_argcheck(L, off >= 0, 3, "offset is negative");
  luaL_argcheck(L, (lua_Unsigned)off <= len, 3, "offset is past the end of the string");
  lua_Integer size = luaL_optinteger(L, 4, (lua_Integer)(len - (size_t)off));
  luaL_argcheck(L, size >= 0, 4, "size is negative");
  luaL_argcheck(L, (lua_Unsigned)size <= len - (size_t)off, 4, "offset + size is past the end of the string");
  size_t n = (size_t)size;
  s += off;
  if (n > MAXLEN) return luaL_error(L, "send_bytes: message too large");
  uint64_t h = (uint64_t)n | ((uint64_t)K_BYTES << 56);
  struct iovec iov[2] = { { &h, 8 }, { (void *)s, n } };
  int err = 0;
  int r = write_frame(L, c, iov, 2, NULL, 0, &err);
  return sent_result(L, r, err, "send_bytes");
}

/* ------------------------------------------------------------ the rest */

static int conn_close(lua_State *L) {
  conn *c = mp_toself(L, 1, MP_CLASSES(CONN));
  if (c->fd >= 0) {
    close(c->fd);  /* this process's copy, whoever created it */
    c->fd = -1;
    drop_queue(c);
    if (!c->busy) free_buffers(c);  /* else recv_frame frees them */
  }
  return 0;
}

static int conn_fileno(lua_State *L) {
  conn *c = checkconn(L, 1);
  lua_pushinteger(L, c->fd);
  return 1;
}

static int conn_index(lua_State *L) {
  conn *c = mp_toself(L, 1, MP_CLASSES(CONN));
  const char *k = lua_tostring(L, 2);
  if (k && strcmp(k, "closed") == 0) { lua_pushboolean(L, c->fd < 0); return 1; }
  if (k && strcmp(k, "readable") == 0) { lua_pushboolean(L, (c->mode & C_READ) != 0); return 1; }
  if (k && strcmp(k, "writable") == 0) { lua_pushboolean(L, (c->mode & C_WRITE) != 0); return 1; }
  if (k && strcmp(k, "trust") == 0) { lua_pushstring(L, c->flags & C_DATA ? "data" : "all"); return 1; }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int conn_tostring(lua_State *L) {
  conn *c = mp_toself(L, 1, MP_CLASSES(CONN));
  const char *m = c->mode == (C_READ | C_WRITE) ? "duplex" : c->mode == C_READ ? "read" : "write";
  if (c->fd < 0) lua_pushfstring(L, "Connection (closed)");
  else lua_pushfstring(L, "Connection (fd %d, %s)", c->fd, m);
  return 1;
}

/* core.pipe(duplex) -> conn1, conn2; one-way: read end, write end */
static int pipe_new(lua_State *L) {
  int duplex = lua_isnoneornil(L, 1) ? 1 : lua_toboolean(L, 1);
  conn *a = newconn(L, duplex ? C_READ | C_WRITE : C_READ);
  conn *b = newconn(L, duplex ? C_READ | C_WRITE : C_WRITE);
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return mp_pusherrno(L, "socketpair");
  a->fd = sv[0];
  b->fd = sv[1];
  if (!duplex) { shutdown(sv[0], SHUT_WR); shutdown(sv[1], SHUT_RD); }
  return 2;
}

/* ------------------------------------------------------------ sockets */

/* For socket.c: a duplex Connection, closed until mp_conn_setfd gives it its
** descriptor (made first, so that an error between the two leaks nothing).
** nofds: a TCP socket, which cannot carry descriptors. */
void *mp_conn_new(lua_State *L, int nofds) {
  conn *c = newconn(L, C_READ | C_WRITE);
  if (nofds) c->flags |= C_NOFDS;
  return c;
}

void mp_conn_setfd(void *c, int fd) { ((conn *)c)->fd = fd; }

/* core.conn_trust(conn, "data"|"all"): how recv decodes (docs/codec.md, Trust) */
static int conn_trust(lua_State *L) {
  conn *c = checkconn(L, 1);
  static const char *const modes[] = { "all", "data", NULL };
  if (luaL_checkoption(L, 2, NULL, modes) == 1) c->flags |= C_DATA;
  else c->flags &= ~C_DATA;
  return 0;
}

/* core.conn_recv_limited(conn, maxlen, timeout) -> string | nil, word
** recv_bytes that refuses a message longer than maxlen (before reading it): for
** the authentication handshake, where the peer is not trusted yet. Too long:
** nil, "too long" and the connection is broken. */
static int conn_recv_limited(lua_State *L) {
  conn *c = checkreader(L, "recv");
  lua_Integer max = luaL_checkinteger(L, 2);
  double deadline = mp_deadline(L, 3);
  lua_Hook h0 = lua_gethook(L);
  int err = 0, kind, nfds;
  size_t len;
  int r = read_header(L, c, deadline, h0, &err, &kind, &len, &nfds);
  if (r != IO_OK) return pushfail(L, r, err, "recv");
  if (kind != K_BYTES || len > (size_t)max) {
    c->broken = "the peer sent an unexpected message during authentication";
    lua_pushnil(L);
    lua_pushstring(L, kind != K_BYTES ? "unexpected" : "too long");
    return 2;
  }
  return recv_frame(L, c, 1, deadline);
}

/* ------------------------------------------------------------ codec */

static int running(lua_State *L, lua_CFunction f) {
  lua_Debug ar;
  if (!lua_getstack(L, 0, &ar) || !lua_getinfo(L, "f", &ar)) return 0;
  int yes = lua_tocfunction(L, -1) == f;
  lua_pop(L, 1);
  return yes;
}

static size_t conn_encode(lua_State *L, int idx, unsigned char *payload) {
  conn *c = lua_touserdata(L, idx);
  if (!cur_sink || !running(L, encode_frame))
    luaL_error(L, "cannot send a Connection this way: a Connection can only be sent through a Pipe "
               "(or passed to a Process at start)");
  if (c->fd < 0) luaL_error(L, "cannot send a closed Connection");
  if (cur_sink->nofds)
    luaL_error(L, "cannot send a Connection over a TCP Connection (descriptors travel only over "
               "Unix sockets: a Pipe, or a Listener/Client with a Unix address)");
  if (cur_sink->n >= MAXFDS) luaL_error(L, "cannot send more than %d Connections in one message", MAXFDS);
  payload[0] = (unsigned char)cur_sink->n;
  payload[1] = (unsigned char)c->mode;
  cur_sink->fds[cur_sink->n++] = c->fd;
  return 2;
}

static void conn_decode(lua_State *L, const unsigned char *payload, size_t n) {
  if (!cur_source || !running(L, decode_frame))
    luaL_error(L, "cannot decode: a Connection can only be received through a Pipe");
  if (n != 2 || payload[0] >= cur_source->n || cur_source->fds[payload[0]] < 0 ||
      !(payload[1] & (C_READ | C_WRITE)) || (payload[1] & ~(C_READ | C_WRITE)))
    luaL_error(L, "cannot decode: bad Connection");
  conn *c = newconn(L, payload[1]);  /* closed until it owns the fd */
  c->fd = cur_source->fds[payload[0]];
  cur_source->fds[payload[0]] = -1;
}

static const mp_handle_type conn_type = { CONN, conn_encode, conn_decode };

int mp_pipe_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"send", conn_send}, {"recv", conn_recv}, {"recv_value", conn_recv_value},
    {"send_bytes", conn_send_bytes}, {"recv_bytes", conn_recv_bytes}, {"poll", conn_poll},
    {"close", conn_close}, {"fileno", conn_fileno},
    {NULL, NULL}
  };
  static const luaL_Reg meta[] = {
    {"__gc", conn_close}, {"__close", conn_close}, {"__tostring", conn_tostring},
    {NULL, NULL}
  };
  mp_newmetatable(L, CONN, mp_nregs(meta) + 1);  /* (+ __index) */
  luaL_setfuncs(L, meta, 0);
  luaL_newlib(L, methods);
  lua_pushcclosure(L, conn_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  mp_codec_register(&conn_type);
  lua_pushcfunction(L, pipe_new);
  lua_setfield(L, -2, "pipe");
  lua_pushcfunction(L, conn_trust);
  lua_setfield(L, -2, "conn_trust");
  lua_pushcfunction(L, conn_recv_limited);
  lua_setfield(L, -2, "conn_recv_limited");
  return 0;
}
