/* queue.c: Queue, SimpleQueue and JoinableQueue in shared memory. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include "mp.h"
#include "queue.h"

#define QUEUE "multiprocessing.Queue"
#define SIMPLEQUEUE "multiprocessing.SimpleQueue"
#define JOINABLEQUEUE "multiprocessing.JoinableQueue"
#define CHUNK (64 * 1024 - 64)   /* data bytes of a chunk of small messages */
#define EXTERNAL 0xffffffffu      /* record length marking a message in its own block */
#define BIGMSG (32 * 1024)        /* messages this long get their own block */
#define SPIN 200                  /* polls of an empty queue before sleeping */
#define PACE_BYTES (8u << 20)     /* a put beyond this many queued bytes lets readers catch up */
#define PACE_WAIT 0.002

typedef struct chunk {
  uint64_t next;
  uint32_t cap, wpos, rpos, pad;
  char data[];
} chunk;

/* ------------------------------------------------------- the shared part */

static void q_init(mp_queue *q, int64_t maxsize, int joinable) {
  mp_mutex_init(&q->lock, 0);
  q->maxsize = maxsize;
  q->joinable = (uint32_t)joinable;
}

static void q_dtor(mp_obj *o) {  /* frees what the queue still holds */
  mp_queue *q = (mp_queue *)o;
  uint64_t c = q->head;
  while (c) {
    chunk *ch = MP_PTR(c);
    for (uint32_t r = ch->rpos; r < ch->wpos;) {
      uint32_t len;
      memcpy(&len, ch->data + r, 4);
      if (len == EXTERNAL) {
        uint64_t off;
        memcpy(&off, ch->data + r + 8, 8);
        mp_free(off);
        r += 24;
      } else {
        r += (4 + len + 7) & ~7u;
      }
    }
    uint64_t next = ch->next;
    mp_free(c);
    c = next;
  }
  if (q->spare) mp_free(q->spare);
  q->head = q->tail = q->spare = 0;
}

static uint64_t new_chunk(lua_State *L, mp_queue *q, uint32_t need) {
  uint64_t off;
  if (q->spare && need <= ((chunk *)MP_PTR(q->spare))->cap) { off = q->spare; q->spare = 0; }
  else {
    /* small first chunks: a queue that carries a few messages stays small */
    if (q->chunkcap < 2048) q->chunkcap = 2048 - sizeof(chunk);
    uint32_t cap = need > q->chunkcap ? need : q->chunkcap;
    if (q->chunkcap < CHUNK) q->chunkcap = q->chunkcap * 2 + (uint32_t)sizeof(chunk) > CHUNK ? CHUNK : q->chunkcap * 2 + (uint32_t)sizeof(chunk);
    off = mp_alloc_try(sizeof(chunk) + cap);
    if (!off) { mp_unlock(&q->lock); mp_oom_error(L, sizeof(chunk) + cap); }
    ((chunk *)MP_PTR(off))->cap = cap;
  }
  chunk *c = MP_PTR(off);
  c->next = 0; c->wpos = c->rpos = 0;
  if (q->tail) ((chunk *)MP_PTR(q->tail))->next = off;
  else q->head = off;
  q->tail = off;
  return off;
}

/* Appends the encoded message (queue locked). */
static void q_append(lua_State *L, mp_queue *q, const void *pre, size_t plen, mp_enc *e) {
  size_t n = plen + mp_enc_size(e);
  uint64_t ext = 0;
  uint32_t rec;
  if (n >= BIGMSG) {  /* copied outside the chunk, so a reader can decode it in place */
    ext = mp_alloc_try(n);
    if (!ext) { mp_unlock(&q->lock); mp_oom_error(L, n); }
    rec = 24;
  } else {
    rec = (uint32_t)((4 + n + 7) & ~(size_t)7);
  }
  chunk *c = q->tail ? MP_PTR(q->tail) : NULL;
  if (!c || c->cap - c->wpos < rec) c = MP_PTR(new_chunk(L, q, rec));
  char *p = c->data + c->wpos;
  if (ext) {
    uint32_t len = EXTERNAL;
    uint64_t n64 = n;
    memcpy(p, &len, 4);
    memcpy(p + 8, &ext, 8);
    memcpy(p + 16, &n64, 8);
    if (plen) memcpy(MP_PTR(ext), pre, plen);
    mp_enc_copy(e, (char *)MP_PTR(ext) + plen);
  } else {
    uint32_t len = (uint32_t)n;
    memcpy(p, &len, 4);
    if (plen) memcpy(p + 4, pre, plen);
    mp_enc_copy(e, p + 4 + plen);
  }
  c->wpos += rec;
  q->count++;
  q->bytes += n;
  if (q->joinable) q->unfinished++;
  __atomic_add_fetch(&q->put_seq, 1, __ATOMIC_SEQ_CST);
  if (q->getters) mp_futex_wake(&q->put_seq, 1);
}

/* Takes the first message (queue locked, not empty). Small messages are copied
** into buf; a big one is returned as its block (*ext), which the caller frees. */
static void q_take(lua_State *L, mp_queue *q, mp_buf *buf, uint64_t *ext, size_t *extn) {
  chunk *c = MP_PTR(q->head);
  while (c->rpos == c->wpos) {  /* drained chunks before the tail */
    uint64_t off = q->head;
    q->head = c->next;
    if (!q->spare && c->cap <= CHUNK) q->spare = off; else mp_free(off);
    c = MP_PTR(q->head);
  }
  char *p = c->data + c->rpos;
  uint32_t len;
  memcpy(&len, p, 4);
  *ext = 0;
  if (len == EXTERNAL) {
    uint64_t n64;
    memcpy(ext, p + 8, 8);
    memcpy(&n64, p + 16, 8);
    *extn = (size_t)n64;
    q->bytes -= n64;
    c->rpos += 24;
  } else {  /* appended to buf as [u32 len][bytes] */
    mp_buf_reserve(L, buf, 4 + (size_t)len);  /* small: cannot fail in practice */
    memcpy(buf->p + buf->n, &len, 4);
    memcpy(buf->p + buf->n + 4, p + 4, len);
    buf->n += 4 + (size_t)len;
    q->bytes -= len;
    c->rpos += (4 + len + 7) & ~7u;
  }
  if (c->rpos == c->wpos && q->head == q->tail) c->rpos = c->wpos = 0;  /* reuse in place */
  q->count--;
  q->nopace = 0;
  __atomic_add_fetch(&q->get_seq, 1, __ATOMIC_SEQ_CST);
  if (q->putters) mp_futex_wake(&q->get_seq, 1);
}

/* Waits (queue locked on entry and exit) until cond holds; returns MP_WOKE or why not. */
static int q_wait(lua_State *L, mp_queue *q, uint32_t *seq, uint32_t *sleepers, double deadline) {
  uint32_t s = __atomic_load_n(seq, __ATOMIC_SEQ_CST);
  (*sleepers)++;
  mp_unlock(&q->lock);
  int r = mp_futex_wait(L, seq, s, deadline);
  mp_lock(&q->lock);
  (*sleepers)--;
  return r;
}

/* ------------------------------------------------------------ internal API */

int mp_queue_put(lua_State *L, mp_queue *q, mp_enc *e, double deadline) {
  return mp_queue_put_prefixed(L, q, NULL, 0, e, deadline);
}

int mp_queue_put_prefixed(lua_State *L, mp_queue *q, const void *pre, size_t plen, mp_enc *e, double deadline) {
  mp_lock(&q->lock);
  while (q->maxsize > 0 && q->count >= (uint64_t)q->maxsize) {
    if (deadline >= 0 && mp_now() >= deadline) { mp_unlock(&q->lock); return MP_TIMEOUT; }
    int r = q_wait(L, q, &q->get_seq, &q->putters, deadline);
    if (r == MP_INTERRUPTED) { mp_unlock(&q->lock); return r; }
  }
  /* Pacing: a writer far ahead of its readers would touch fresh pages for
  ** every message, which costs far more than the copy; while readers make
  ** progress, wait for them a little. Never blocks for long: a reader that
  ** does not take a message within PACE_WAIT turns pacing off until it does. */
  while (q->bytes > PACE_BYTES && !q->nopace) {
    int r = q_wait(L, q, &q->get_seq, &q->putters, mp_now() + PACE_WAIT);
    if (r == MP_INTERRUPTED) { mp_unlock(&q->lock); return r; }
    if (r == MP_TIMEOUT) q->nopace = 1;
  }
  q_append(L, q, pre, plen, e);
  mp_unlock(&q->lock);
  return MP_WOKE;
}

typedef struct extmsg { uint64_t off; size_t n; mp_decoder decode; } extmsg;

static int decode_ext(lua_State *L) {
  extmsg *m = lua_touserdata(L, 1);
  m->decode(L, MP_PTR(m->off), m->n);
  return 1;
}

int mp_queue_get(lua_State *L, mp_queue *q, mp_buf *buf, double deadline) {
  int n;
  return mp_queue_get_many(L, q, buf, deadline, NULL, 1, 0, &n, NULL);
}

/* Is the next message one with a block of its own? (queue locked, not empty) */
static int q_next_is_ext(mp_queue *q) {
  chunk *c = MP_PTR(q->head);
  while (c->rpos == c->wpos && c->next) c = MP_PTR(c->next);
  uint32_t len;
  memcpy(&len, c->data + c->rpos, 4);
  return len == EXTERNAL;
}

int mp_queue_get_many(lua_State *L, mp_queue *q, mp_buf *buf, double deadline, mp_claim *claim,
                      int maxk, uint64_t keep, int *count, mp_decoder decode) {
  *count = 0;
  if (!decode) decode = mp_decode;
  for (int spin = 0; spin < SPIN && !__atomic_load_n(&q->count, __ATOMIC_ACQUIRE) && deadline != 0; spin++)
    if (spin > 20) sched_yield();
  mp_lock(&q->lock);
  while (q->count == 0) {
    if (deadline >= 0 && mp_now() >= deadline) { mp_unlock(&q->lock); return MP_TIMEOUT; }
    int r = q_wait(L, q, &q->put_seq, &q->getters, deadline);
    if (r == MP_INTERRUPTED) { mp_unlock(&q->lock); return r; }
  }
  uint64_t ext;
  size_t extn = 0;
  buf->n = 0;
  q_take(L, q, buf, &ext, &extn);
  q->taken++;
  int k = 1;
  /* more small messages while others are left for the other readers */
  while (!ext && k < maxk && q->count > keep && !q_next_is_ext(q)) {
    uint64_t e2;
    size_t n2;
    q_take(L, q, buf, &e2, &n2);
    q->taken++;
    k++;
  }
  if (claim) {
    claim->start = mp_now();
    claim->first = q->taken - (uint64_t)k + 1;
    __atomic_store_n(&claim->seq, q->taken, __ATOMIC_SEQ_CST);
  }
  mp_unlock(&q->lock);
  if (ext) {  /* decode in place, then free the block even if decoding fails */
    lua_pushcfunction(L, decode_ext);
    extmsg m = { ext, extn, decode };
    lua_pushlightuserdata(L, &m);
    int st = lua_pcall(L, 1, 1, 0);
    mp_free(ext);
    if (st != LUA_OK) lua_error(L);
    *count = 1;
    return MP_WOKE;
  }
  luaL_checkstack(L, k, "too many messages");
  size_t at = 0;
  for (int i = 0; i < k; i++) {
    uint32_t len;
    memcpy(&len, buf->p + at, 4);
    decode(L, buf->p + at + 4, len);
    at += 4 + (size_t)len;
  }
  *count = k;
  return MP_WOKE;
}

/* ---------------------------------------------------------------- handles */

typedef struct qhandle {
  mp_handle h;
  mp_buf buf;  /* receive buffer, local to this process */
} qhandle;

/* methods carry the three queue metatables as upvalues, for a cheap check */
static qhandle *q_check(lua_State *L, int idx) {
  qhandle *qh = lua_touserdata(L, idx);
  if (!qh || !lua_getmetatable(L, idx)) luaL_typeerror(L, idx, "Queue");
  int ok = lua_rawequal(L, -1, lua_upvalueindex(1)) || lua_rawequal(L, -1, lua_upvalueindex(2)) ||
           lua_rawequal(L, -1, lua_upvalueindex(3));
  lua_pop(L, 1);
  if (!ok) luaL_typeerror(L, idx, "Queue");
  if (!qh->h.off) luaL_error(L, "attempt to use a closed Queue");
  return qh;
}

#define QOF(qh) ((mp_queue *)MP_PTR((qh)->h.off))

mp_queue *mp_queue_check(lua_State *L, int idx, mp_buf **buf) {
  qhandle *qh = luaL_testudata(L, idx, QUEUE);
  if (!qh) luaL_typeerror(L, idx, "Queue");
  if (!qh->h.off) luaL_error(L, "attempt to use a closed Queue");
  *buf = &qh->buf;
  return QOF(qh);
}

static qhandle *q_push(lua_State *L, uint64_t off, const char *tname) {
  qhandle *qh = lua_newuserdatauv(L, sizeof(qhandle), 0);
  memset(qh, 0, sizeof(*qh));
  luaL_setmetatable(L, tname);
  qh->h.off = off;
  qh->h.pid = getpid();
  return qh;
}

static int q_new(lua_State *L, const char *tname, int joinable) {
  lua_Integer maxsize = luaL_optinteger(L, 1, 0);
  luaL_argcheck(L, maxsize >= 0, 1, "maxsize must not be negative");
  mp_arena_ensure(L);
  qhandle *qh = q_push(L, 0, tname);  /* closed until the object exists */
  uint64_t off = mp_obj_new(L, sizeof(mp_queue), 0x51);
  q_init(MP_PTR(off), maxsize, joinable);
  qh->h.off = off;
  qh->h.pid = getpid();
  return 1;
}

static int queue_new(lua_State *L) { return q_new(L, QUEUE, 0); }
static int joinable_new(lua_State *L) { return q_new(L, JOINABLEQUEUE, 1); }
static int simple_new(lua_State *L) { lua_settop(L, 0); return q_new(L, SIMPLEQUEUE, 0); }

/* put(v [, timeout]) / put(v, block [, timeout]) -> true | nil, "full" */
static double put_deadline(lua_State *L, int idx) {
  if (lua_isboolean(L, idx)) return lua_toboolean(L, idx) ? mp_deadline(L, idx + 1) : 0;
  return mp_deadline(L, idx);
}

static int q_doput(lua_State *L, double deadline) {
  qhandle *qh = q_check(L, 1);
  luaL_checkany(L, 2);
  mp_enc *e = mp_encode(L, 2, "value");
  int r = mp_queue_put(L, QOF(qh), e, deadline);
  mp_enc_done(L, e);
  if (r == MP_WOKE) { lua_pushboolean(L, 1); return 1; }
  lua_pushnil(L);
  lua_pushstring(L, r == MP_TIMEOUT ? "full" : "interrupted");
  return 2;
}

static int queue_put(lua_State *L) { return q_doput(L, put_deadline(L, 3)); }
static int queue_put_nowait(lua_State *L) { return q_doput(L, 0); }

static int q_doget(lua_State *L, double deadline, const char *why) {
  qhandle *qh = q_check(L, 1);
  int r = mp_queue_get(L, QOF(qh), &qh->buf, deadline);
  if (r == MP_WOKE) {
    if (qh->buf.cap > (1u << 16)) mp_buf_free(L, &qh->buf);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, r == MP_TIMEOUT ? why : "interrupted");
  return 2;
}

static int queue_get(lua_State *L) {
  double deadline = put_deadline(L, 2);
  return q_doget(L, deadline, deadline == 0 ? "empty" : "timeout");
}
static int queue_get_nowait(lua_State *L) { return q_doget(L, 0, "empty"); }

static int queue_qsize(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  lua_pushinteger(L, (lua_Integer)__atomic_load_n(&QOF(qh)->count, __ATOMIC_SEQ_CST));
  return 1;
}

static int queue_empty(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  lua_pushboolean(L, __atomic_load_n(&QOF(qh)->count, __ATOMIC_SEQ_CST) == 0);
  return 1;
}

static int queue_full(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  mp_queue *q = QOF(qh);
  lua_pushboolean(L, q->maxsize > 0 && __atomic_load_n(&q->count, __ATOMIC_SEQ_CST) >= (uint64_t)q->maxsize);
  return 1;
}

static int queue_maxsize(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  lua_pushinteger(L, (lua_Integer)QOF(qh)->maxsize);
  return 1;
}

static int queue_task_done(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  mp_queue *q = QOF(qh);
  mp_lock(&q->lock);
  if (q->unfinished == 0) { mp_unlock(&q->lock); return luaL_error(L, "task_done() called too many times"); }
  if (--q->unfinished == 0) {
    __atomic_add_fetch(&q->done_seq, 1, __ATOMIC_SEQ_CST);
    mp_futex_wake(&q->done_seq, 0x7fffffff);
  }
  mp_unlock(&q->lock);
  return 0;
}

/* join([timeout]) -> true | nil, "timeout" */
static int queue_join(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  mp_queue *q = QOF(qh);
  double deadline = mp_deadline(L, 2);
  uint32_t dummy = 0;
  mp_lock(&q->lock);
  while (q->unfinished > 0) {
    if (deadline >= 0 && mp_now() >= deadline) { mp_unlock(&q->lock); return mp_waitresult(L, MP_TIMEOUT); }
    int r = q_wait(L, q, &q->done_seq, &dummy, deadline);
    if (r == MP_INTERRUPTED) { mp_unlock(&q->lock); return mp_waitresult(L, r); }
  }
  mp_unlock(&q->lock);
  lua_pushboolean(L, 1);
  return 1;
}

static int queue_close(lua_State *L) {
  qhandle *qh = lua_touserdata(L, 1);
  if (qh && qh->h.off) {
    uint64_t off = qh->h.off;
    qh->h.off = 0;
    mp_obj_release_with(off, qh->h.pid, q_dtor);
  }
  if (qh) mp_buf_free(L, &qh->buf);
  return 0;
}

static int queue_tostring(lua_State *L) {
  qhandle *qh = lua_touserdata(L, 1);
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "__name");
  const char *name = lua_tostring(L, -1);
  if (!qh->h.off) lua_pushfstring(L, "%s (closed)", name);
  else lua_pushfstring(L, "%s (%I items) %p", name, (lua_Integer)QOF(qh)->count, (void *)qh);
  return 1;
}

static int queue_eq(lua_State *L) {
  qhandle *a = lua_touserdata(L, 1), *b = lua_touserdata(L, 2);
  lua_pushboolean(L, a && b && a->h.off && a->h.off == b->h.off);
  return 1;
}

/* ------------------------------------------------------------- the codec */

static void queue_decode(lua_State *L, const unsigned char *payload, size_t n, const char *tname) {
  mp_handle_attach(L, payload, n, 0x51, tname, sizeof(qhandle), 0);
}
static void dec_q(lua_State *L, const unsigned char *p, size_t n) { queue_decode(L, p, n, QUEUE); }
static void dec_s(lua_State *L, const unsigned char *p, size_t n) { queue_decode(L, p, n, SIMPLEQUEUE); }
static void dec_j(lua_State *L, const unsigned char *p, size_t n) { queue_decode(L, p, n, JOINABLEQUEUE); }

static const mp_handle_type t_queue = { QUEUE, mp_handle_encode, dec_q };
static const mp_handle_type t_simple = { SIMPLEQUEUE, mp_handle_encode, dec_s };
static const mp_handle_type t_joinable = { JOINABLEQUEUE, mp_handle_encode, dec_j };

int mp_queue_open(lua_State *L) {
  static const luaL_Reg common[] = {
    {"put", queue_put}, {"get", queue_get}, {"put_nowait", queue_put_nowait},
    {"get_nowait", queue_get_nowait}, {"qsize", queue_qsize}, {"empty", queue_empty},
    {"full", queue_full}, {"maxsize", queue_maxsize}, {"close", queue_close},
    {"task_done", queue_task_done}, {"join", queue_join},
    {NULL, NULL}
  };
  static const luaL_Reg meta[] = {
    {"__gc", queue_close}, {"__close", queue_close}, {"__tostring", queue_tostring},
    {"__eq", queue_eq}, {NULL, NULL}
  };
  const char *names[] = { QUEUE, SIMPLEQUEUE, JOINABLEQUEUE };
  for (int i = 0; i < 3; i++) {
    luaL_newmetatable(L, names[i]);
    luaL_setfuncs(L, meta, 0);
    lua_pop(L, 1);
  }
  for (int i = 0; i < 3; i++) {
    luaL_getmetatable(L, names[i]);
    lua_newtable(L);
    for (int k = 0; k < 3; k++) luaL_getmetatable(L, names[k]);
    luaL_setfuncs(L, common, 3);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "__index");
    if (i != 2) {  /* only a JoinableQueue counts tasks */
      lua_pushnil(L); lua_setfield(L, -2, "task_done");
      lua_pushnil(L); lua_setfield(L, -2, "join");
    }
    if (i == 1) {  /* a SimpleQueue has Python's short interface */
      const char *drop[] = { "put_nowait", "get_nowait", "qsize", "full", "maxsize" };
      for (int k = 0; k < 5; k++) { lua_pushnil(L); lua_setfield(L, -2, drop[k]); }
    }
    lua_pop(L, 2);
  }
  mp_codec_register(&t_queue);
  mp_codec_register(&t_simple);
  mp_codec_register(&t_joinable);
  static const luaL_Reg funcs[] = {
    {"Queue", queue_new}, {"SimpleQueue", simple_new}, {"JoinableQueue", joinable_new},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
