/* pool.c: the shared state of a Pool (one record per worker) and shared blobs. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "mp.h"
#include "queue.h"

#define POOLSTATE "multiprocessing.PoolState"
#define TASKMAGIC 0x4b534154u  /* "TASK": not the codec's first byte */

/* A task message: this header, then the codec's bytes of its items (a range of
** the caller's table, encoded in place) or of the arguments of an apply. flag is
** the arena offset of the message's cancel word (a Future's, see FLAG_*), or 0. */
typedef struct taskhdr {
  uint32_t magic, fid;
  uint64_t seq;
  int64_t blob;
  uint32_t n, mode;
  uint64_t flag;
} taskhdr;

/* A Future's cancel word, one uint32 in the arena: QUEUED when its message is
** sent; the worker that is about to run it swaps QUEUED for RUNNING, the parent
** that cancels it swaps QUEUED for CANCELLED. Exactly one swap succeeds, so a
** message is either run or skipped (the worker then sends an empty result), and
** the parent knows which. The word is the parent's again once the message's
** result came or it was lost (its worker is dead). */
enum { FLAG_QUEUED = 0, FLAG_RUNNING = 1, FLAG_CANCELLED = 2 };
#define BLOB "multiprocessing.Blob"

/* What the parent needs to see of a worker without asking it: which task
** message it holds (claimed, 0 when idle) since when, and its insights. */
typedef struct wrec {
  mp_claim claim;
  uint64_t tasks, items;
  double busy, idle, enc, dec;
} wrec;

/* The readiness protocol of pool:fileno() (docs/pool.md, "Driving a pool from a
** frame loop"). Each PoolState handle holds an eventfd made with it (inherited by
** forked workers) and, once the parent watches, an epoll set of: the eventfd, a
** timerfd (the parent's next health check) and a pidfd per worker (readable once
** it exits). The epoll fd is what the host polls; it stays readable (level) until
** the parent's poll clears what made it so.
** - watching (shared) is 0 until the parent first asks for its descriptor; until
**   then a worker's only cost is one load of it per result message.
** - signalled (shared) is 1 from the first worker that wrote the eventfd since the
**   parent last cleared it: a worker writes only when it swaps it from 0 to 1, so
**   one write per parent poll at most, however many results come.
** - The parent clears in this order: read the eventfd (and timerfd), then set
**   signalled to 0, then take results. A worker puts its result, then swaps. So a
**   result put after the parent's last look finds signalled 0, or 1 from a worker
**   whose write comes after the parent's read: the eventfd is readable again.
** A parent that stops with work left writes the eventfd itself (st:signal). */
typedef struct pstate {
  mp_obj h;
  uint32_t n, watching;
  uint32_t signalled, pad;
  wrec w[];
} pstate;

/* A PoolState handle: the shared record's, plus this process's descriptors (-1: none).
** A handle decoded from a message (not inherited by fork) has no eventfd and no slots. */
typedef struct pshandle {
  mp_handle h;
  int efd, epfd, tfd, nslots;
  int pidfd[];  /* per worker slot, in the parent's epoll set */
} pshandle;

static mp_handle *ps_check(lua_State *L) { return mp_checkopen(L, 1, MP_CLASSES(POOLSTATE)); }

static void close_fd(int *fd) {
  if (*fd >= 0) { close(*fd); *fd = -1; }
}

/* The handles of this process that hold descriptors, so that a child (forked by
** anyone: mp.Process, the host) closes its copies of them: a pool's eventfd,
** epoll set, timer and pidfds are its parent's. A pool's own forked worker keeps
** its pool's eventfd (it signals through it): pool.lua names that pool with
** st:forking(true) just before forking. Slots are written under reg_lock; the
** child's handler reads them without it (a copy, single-threaded). */
#define MAXREG 256
static pshandle *_Atomic reg[MAXREG];
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
#define forking (mp_fk.pool_forking)  /* (a pshandle: on the page of statics a fork's both sides write anyway) */
static int reg_set;

MP_FORK_PATH static void ps_after_fork(void) {
  pshandle *keep = (pshandle *)forking;
  if (keep) forking = NULL;
  for (int i = 0; i < MAXREG; i++) {
    pshandle *ph = reg[i];
    if (!ph) continue;
    close_fd(&ph->epfd);
    close_fd(&ph->tfd);
    for (int k = 0; k < ph->nslots; k++) close_fd(&ph->pidfd[k]);
    if (ph != keep) close_fd(&ph->efd);
  }
  mp_mutex_renew(&reg_lock);
}

static void ps_register(pshandle *ph) {
  if (!reg_set) { reg_set = 1; mp_atfork(ps_after_fork); }
  pthread_mutex_lock(&reg_lock);
  for (int i = 0; i < MAXREG; i++) if (!reg[i]) { reg[i] = ph; break; }  /* (full: not closed in children) */
  pthread_mutex_unlock(&reg_lock);
}

static void ps_unregister(pshandle *ph) {
  pthread_mutex_lock(&reg_lock);
  for (int i = 0; i < MAXREG; i++) if (reg[i] == ph) { reg[i] = NULL; break; }
  if (forking == ph) forking = NULL;
  pthread_mutex_unlock(&reg_lock);
}

static wrec *ps_rec(lua_State *L, mp_handle *h, int arg) {
  pstate *ps = MP_PTR(h->off);
  lua_Integer i = luaL_checkinteger(L, arg);
  luaL_argcheck(L, i >= 1 && i <= (lua_Integer)ps->n, arg, "no such worker");
  return &ps->w[i - 1];
}

static int ps_new(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 1 && n <= 4096, 1, "1 to 4096 workers");
  mp_arena_ensure(L);
  pshandle *ph = lua_newuserdatauv(L, sizeof(pshandle) + (size_t)n * sizeof(int), 0);
  mp_handle *h = &ph->h;
  h->off = 0;
  ph->efd = ph->epfd = ph->tfd = -1;
  ph->nslots = (int)n;
  for (int k = 0; k < n; k++) ph->pidfd[k] = -1;
  luaL_setmetatable(L, POOLSTATE);
  uint64_t off = mp_obj_new(L, sizeof(pstate) + (size_t)n * sizeof(wrec), 0x50);
  ((pstate *)MP_PTR(off))->n = (uint32_t)n;
  h->off = off;
  h->pid = getpid();
  /* (without it, pool:fileno() fails; everything else works) */
  ph->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (ph->efd >= 0) ps_register(ph);
  return 1;
}

/* st:forking(on): the next fork (core.fork, on this thread) makes a worker of
** this pool, which keeps its eventfd; every other child closes it */
static int ps_forking(lua_State *L) {
  pshandle *ph = (pshandle *)ps_check(L);
  forking = lua_toboolean(L, 2) ? ph : NULL;
  return 0;
}

/* st:eventfd() -> fd | nil: the eventfd a worker started by spawn or the
** forkserver gets with its start (see forkserver.c: the descriptor is passed) */
static int ps_eventfd(lua_State *L) {
  pshandle *ph = (pshandle *)ps_check(L);
  if (ph->efd >= 0 && ph->h.pid == getpid()) lua_pushinteger(L, ph->efd);
  else lua_pushnil(L);
  return 1;
}

/* st:adopt_eventfd(fd): in such a worker, the decoded handle takes the passed
** eventfd as its own (closed with it, and in its children) */
static int ps_adopt_eventfd(lua_State *L) {
  pshandle *ph = (pshandle *)ps_check(L);
  int fd = (int)luaL_checkinteger(L, 2);
  luaL_argcheck(L, fd >= 0 && ph->efd < 0, 2, "no descriptor to adopt");
  fcntl(fd, F_SETFD, FD_CLOEXEC);
  ph->efd = fd;
  ps_register(ph);
  return 0;
}

static uint32_t *flag_at(lua_State *L, int arg) {
  lua_Integer off = luaL_checkinteger(L, arg);
  luaL_argcheck(L, mp_arena_base() && off > 0 && off % 4 == 0 && (uint64_t)off + 4 <= mp_arena_top(), arg, "bad flag");
  return MP_PTR(off);
}

/* put of pre and the encoding e, which is let go once it is out (or not sent); soft: the put's
** waits for the queue's lock and the allocator's end at deadline, see mp_queue_put_soft */
static int put_encoded(lua_State *L, mp_queue *q, const void *pre, size_t plen, mp_enc *e, double deadline,
                       int soft) {
  int r = soft ? mp_queue_put_soft(L, q, pre, plen, e, deadline) : mp_queue_put_prefixed(L, q, pre, plen, e, deadline);
  mp_enc_done(L, e);
  return r;
}

/* A lean put's deadline: wait (the argument at idx) seconds from when it first waits (MP_AFTER:
** a put that finds the locks free reads no clock), or none (-1) without one */
static double lean_deadline(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  lua_Number wait = luaL_checknumber(L, idx);
  luaL_argcheck(L, wait >= 0, idx, "negative wait");
  return MP_AFTER(wait);
}

/* core.put_task(queue, seq, fid, blob, mode, src, i0, n [, pool [, deadline]]) -> true |
** nil, "interrupted" | "timeout": sends src[i0 .. i0+n-1] as the items of task message seq, or
** src itself (the arguments of an apply) when i0 is 0; once it is out, pool._seq = seq (here: a
** Ctrl-C met in Lua between the put and that left seq behind the queue's numbering, and the next
** message with the seq of this one). Its waits for the queue's lock and the allocator's end at
** deadline (mp.now()'s clock; none without it): then nothing was sent. Unsendable items raise
** the codec's error, naming args[i]. */
static int pool_put_task(lua_State *L) {
  mp_buf *buf;
  mp_queue *q = mp_queue_check(L, 1, &buf);
  taskhdr h = { TASKMAGIC, (uint32_t)luaL_checkinteger(L, 3), (uint64_t)luaL_checkinteger(L, 2),
                luaL_checkinteger(L, 4), 0, (uint32_t)luaL_checkinteger(L, 5), 0 };
  luaL_checktype(L, 6, LUA_TTABLE);
  lua_Integer i0 = luaL_checkinteger(L, 7), n = luaL_checkinteger(L, 8);
  luaL_argcheck(L, n >= 0 && n <= 0x7fffffff, 8, "bad count");
  h.n = (uint32_t)n;
  double deadline = luaL_optnumber(L, 10, -1);
  mp_enc *e = i0 > 0 ? mp_encode_range(L, 6, i0, n, "args") : mp_encode(L, 6, "args");
  int r = mp_queue_put_soft(L, q, &h, sizeof h, e, deadline);
  mp_enc_done(L, e);
  if (r != MP_WOKE) return mp_waitresult(L, r);  /* nil, "interrupted" | "timeout" */
  if (lua_istable(L, 9)) {
    lua_pushvalue(L, 2);
    lua_setfield(L, 9, "_seq");
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* core.put_stop(queue, pool, deadline) -> true | nil, "timeout" | "interrupted": sends a
** worker's stop message (false) as put_task sends a task: its waits for the queue's lock and
** the allocator's end at deadline, and once it is out pool._seq is one more */
static int pool_put_stop(lua_State *L) {
  mp_buf *buf;
  mp_queue *q = mp_queue_check(L, 1, &buf);
  luaL_checktype(L, 2, LUA_TTABLE);
  double deadline = luaL_checknumber(L, 3);
  lua_getfield(L, 2, "_seq");
  lua_Integer seq = lua_tointeger(L, -1) + 1;
  lua_pushboolean(L, 0);
  mp_enc *e = mp_encode(L, lua_gettop(L), "value");
  int r = mp_queue_put_soft(L, q, NULL, 0, e, deadline);
  mp_enc_done(L, e);
  if (r != MP_WOKE) return mp_waitresult(L, r);
  lua_pushinteger(L, seq);
  lua_setfield(L, 2, "_seq");
  lua_pushboolean(L, 1);
  return 1;
}

/* The context of the pool's C bookkeeping: { inflight, pool, "call", "finished", ... }, the
** names it looks up in the pool's tables, ready (lua_getfield makes each name anew: 1.5x the
** cost of a raw look-up by a ready name), and, while take_result runs, the pool's inflight
** table and the pool. It is take_result's upvalue (and in the registry, for result_decode),
** and put_apply's and put_call's. Every field looked up by name here is a raw field of its
** table (a Pool's, a record's, a blob record's), so raw look-ups find what lua_getfield did. */
static const char inflight_key = 'i';
enum { CTX_INFLIGHT = 1, CTX_POOL, CTX_CALL, CTX_FINISHED, CTX_CALLBACK, CTX_CBS, CTX_CACHED, CTX_FLAG,
       CTX_BREC, CTX_REFS, CTX_N, CTX_RESULTS, CTX_I0, CTX_FREE, CTX_NFREE, CTX_INFLIGHTK, CTX_SEQ,
       CTX_NKEYS = CTX_SEQ };
static const char *const ctx_keys[] = { NULL, NULL, NULL, "call", "finished", "callback", "_cbs", "cached", "flag",
  "brec", "refs", "n", "results", "i0", "_free", "_nfree", "_inflight", "_seq" };

static int ctx_get(lua_State *L, int ctx, int t, int key) {  /* pushes t[key], raw; its type */
  lua_rawgeti(L, ctx, key);
  return lua_rawget(L, t);
}

static void ctx_set_int(lua_State *L, int ctx, int t, int key, lua_Integer v) {  /* t[key] = v, raw */
  lua_rawgeti(L, ctx, key);
  lua_pushinteger(L, v);
  lua_rawset(L, t);
}

/* The bookkeeping of a lean record rec (at its index) whose message seq just went out, done
** here in C, where no hook can come between the put and it: Ctrl-C (lua.c's hook raises at the
** next Lua instruction) met between them in Lua left a message out with no record, and its
** seq to be used again, so that its result finished the next call (with the wrong values).
** pool._inflight[seq] = rec, pool._seq = seq, rec.brec.refs + 1; with a cancel word, taken
** from pool._free: pool._nfree - 1. brec, inflight: the slots of rec.brec and pool._inflight
** when the caller passed them (Lua has them for less), else 0. */
static void lean_record(lua_State *L, int pool, int rec, lua_Integer seq, int flag, int brec, int inflight) {
  int ctx = lua_upvalueindex(2);
  if (inflight) lua_pushvalue(L, inflight); else ctx_get(L, ctx, pool, CTX_INFLIGHTK);
  lua_pushvalue(L, rec);
  lua_rawseti(L, -2, seq);
  ctx_set_int(L, ctx, pool, CTX_SEQ, seq);
  if (brec) lua_pushvalue(L, brec); else ctx_get(L, ctx, rec, CTX_BREC);
  int b = lua_gettop(L);
  ctx_get(L, ctx, b, CTX_REFS);
  ctx_set_int(L, ctx, b, CTX_REFS, lua_tointeger(L, -1) + 1);
  if (flag) {
    ctx_get(L, ctx, pool, CTX_NFREE);
    ctx_set_int(L, ctx, pool, CTX_NFREE, lua_tointeger(L, -1) - 1);
  }
}

/* The deadline of a lean put through a handle with these settings (see mp_qlean), or, for a
** handle that keeps calls, none: it pushes nil, "kept" and returns 0 */
static int lean_put_deadline(lua_State *L, const mp_qlean *ln, double *deadline) {
  if (ln->kept) {
    lua_pushnil(L);
    lua_pushliteral(L, "kept");
    return 0;
  }
  *deadline = ln->soft ? MP_AFTER(ln->wait) : -1;
  return 1;
}

/* core.lean_puts(queue, wait, kept): the lean puts through this handle (see mp_qlean) wait
** wait seconds at most (nil: as long as it takes), or, kept, send nothing */
static int pool_lean_puts(lua_State *L) {
  mp_buf *buf;
  mp_qlean *ln;
  mp_queue_lean(L, 1, &buf, &ln);
  if (lua_isnoneornil(L, 2)) {
    ln->soft = 0;
  } else {
    lua_Number wait = luaL_checknumber(L, 2);
    luaL_argcheck(L, wait >= 0, 2, "negative wait");
    ln->soft = 1;
    ln->wait = wait;
  }
  ln->kept = lua_toboolean(L, 3);
  return 0;
}

/* core.put_apply(queue, seq, fid, blob, args, pool, rec [, brec, inflight]) -> true | nil,
** "interrupted" | "timeout" | "kept": put_task's apply message (mode 3) of the table args (nil:
** none), in fewer arguments, recorded as rec's once it is out (lean_record: brec is rec.brec,
** inflight pool._inflight). Its waits follow the handle's lean settings (core.lean_puts):
** "timeout" when they ended, "kept" when the handle keeps calls; nothing is sent or recorded
** then, nor when interrupted. */
static int pool_put_apply(lua_State *L) {
  mp_buf *buf;
  mp_qlean *ln;
  mp_queue *q = mp_queue_lean(L, 1, &buf, &ln);
  lua_Integer seq = luaL_checkinteger(L, 2);
  taskhdr h = { TASKMAGIC, (uint32_t)luaL_checkinteger(L, 3), (uint64_t)seq,
                luaL_checkinteger(L, 4), 1, 3, 0 };
  luaL_checktype(L, 6, LUA_TTABLE);
  luaL_checktype(L, 7, LUA_TTABLE);
  int brec = lua_istable(L, 8) ? 8 : 0, inflight = lua_istable(L, 9) ? 9 : 0;
  if (lua_isnoneornil(L, 5)) {
    lua_pushvalue(L, lua_upvalueindex(1));  /* an empty table */
    lua_replace(L, 5);
  }
  luaL_checktype(L, 5, LUA_TTABLE);
  double deadline;
  if (!lean_put_deadline(L, ln, &deadline)) return 2;
  int soft = ln->soft;
  char few[MP_FAST_ARRAY];  /* (a few plain arguments: without the encoder) */
  uint32_t len = mp_fast_encode_array(L, 5, few);
  int r = len ? mp_queue_put_small(L, q, &h, sizeof h, few, len, deadline, soft)
              : put_encoded(L, q, &h, sizeof h, mp_encode(L, 5, "args"), deadline, soft);
  if (r != MP_WOKE) return mp_waitresult(L, r);
  lean_record(L, 6, 7, seq, 0, brec, inflight);
  lua_pushboolean(L, 1);
  return 1;
}

/* core.put_call(queue, seq, fid, blob, flag, pool, rec, ...) -> true | nil, "interrupted" |
** "timeout" | "kept": sends the arguments ... as one call message (mode 4: its n is the number
** of arguments, its items the arguments), with cancel word flag (0: none), which is set to
** QUEUED first, recorded as rec's once it is out (lean_record; a flag is the last of
** pool._free). Its waits follow the handle's lean settings, as put_apply's; nothing is sent or
** recorded unless it returns true. Unsendable arguments raise the codec's error, naming args[i]. */
static int pool_put_call(lua_State *L) {
  mp_buf *buf;
  mp_qlean *ln;
  mp_queue *q = mp_queue_lean(L, 1, &buf, &ln);
  lua_Integer seq = luaL_checkinteger(L, 2);
  taskhdr h = { TASKMAGIC, (uint32_t)luaL_checkinteger(L, 3), (uint64_t)seq,
                luaL_checkinteger(L, 4), 0, 4, 0 };
  lua_Integer flag = luaL_checkinteger(L, 5);
  luaL_checktype(L, 6, LUA_TTABLE);
  luaL_checktype(L, 7, LUA_TTABLE);
  if (flag) {
    __atomic_store_n(flag_at(L, 5), FLAG_QUEUED, __ATOMIC_SEQ_CST);
    h.flag = (uint64_t)flag;
  }
  double deadline;
  if (!lean_put_deadline(L, ln, &deadline)) return 2;
  int soft = ln->soft;
  int top = lua_gettop(L), nargs = top - 7;
  h.n = (uint32_t)nargs;
  char few[MP_FAST_ARRAY];  /* (a few plain arguments: without the encoder) */
  uint32_t len = mp_fast_encode_values(L, 8, nargs, few);
  int r;
  if (len) {
    r = mp_queue_put_small(L, q, &h, sizeof h, few, len, deadline, soft);
  } else {
    lua_createtable(L, nargs, 0);
    for (int k = 1; k <= nargs; k++) {
      lua_pushvalue(L, 7 + k);
      lua_rawseti(L, -2, k);
    }
    r = put_encoded(L, q, &h, sizeof h, mp_encode_range(L, top + 1, 1, nargs, "args"), deadline, soft);
  }
  if (r != MP_WOKE) return mp_waitresult(L, r);
  lean_record(L, 6, 7, seq, flag != 0, 0, 0);
  lua_pushboolean(L, 1);
  return 1;
}

/* core.flag_cas(flag, from, to) -> true, or false and the word's value */
static int pool_flag_cas(lua_State *L) {
  uint32_t *w = flag_at(L, 1);
  uint32_t from = (uint32_t)luaL_checkinteger(L, 2), to = (uint32_t)luaL_checkinteger(L, 3);
  if (__atomic_compare_exchange_n(w, &from, to, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, 0);
  lua_pushinteger(L, from);
  return 2;
}

/* core.flag_get(flag) -> the word's value */
static int pool_flag_get(lua_State *L) {
  lua_pushinteger(L, __atomic_load_n(flag_at(L, 1), __ATOMIC_SEQ_CST));
  return 1;
}

static void chunk_items(lua_State *L, const char *s, size_t len, uint32_t n);

/* The tables of task messages: a ring of MSGRING reused in turn (no table made per message).
** A worker handles the messages of one get_task (at most 256) before it takes more, and keeps
** none: a table is refilled MSGRING messages later, long after its message was handled. The
** next get_task lets go of the items of the messages the last one took (msg_taken of them). */
#define MSGRING 512
static const char msgs_key = 'm';
static int msg_next, msg_taken;

static void msgs_release(lua_State *L) {
  if (!msg_taken) return;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &msgs_key) == LUA_TTABLE) {
    for (int k = 0, at = msg_next; k < msg_taken; k++, at = at > 1 ? at - 1 : MSGRING) {
      if (lua_rawgeti(L, -1, at) == LUA_TTABLE) {
        lua_pushnil(L);
        lua_rawseti(L, -2, 5);
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  msg_taken = 0;
}

/* pushes a task message as the table { seq, fid, blob, n, items, mode [, flag] },
** or the plain value of another message (false: stop) */
static void task_decode(lua_State *L, const char *s, size_t n) {
  taskhdr h;
  if (n < sizeof h || (memcpy(&h, s, sizeof h), h.magic != TASKMAGIC)) { mp_decode(L, s, n); return; }
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &msgs_key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_createtable(L, MSGRING, 0);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &msgs_key);
  }
  msg_next = msg_next % MSGRING + 1;
  if (msg_taken < MSGRING) msg_taken++;
  if (lua_rawgeti(L, -1, msg_next) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_createtable(L, 7, 0);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, msg_next);
  }
  lua_remove(L, -2);
  lua_pushinteger(L, (lua_Integer)h.seq); lua_rawseti(L, -2, 1);
  lua_pushinteger(L, (lua_Integer)h.fid); lua_rawseti(L, -2, 2);
  lua_pushinteger(L, (lua_Integer)h.blob); lua_rawseti(L, -2, 3);
  lua_pushinteger(L, (lua_Integer)h.n); lua_rawseti(L, -2, 4);
  if (h.mode < 3) chunk_items(L, s + sizeof h, n - sizeof h, h.n);
  else if (!mp_fast_decode(L, s + sizeof h, n - sizeof h)) mp_decode(L, s + sizeof h, n - sizeof h);
  lua_rawseti(L, -2, 5);
  lua_pushinteger(L, (lua_Integer)h.mode); lua_rawseti(L, -2, 6);
  if (h.flag) lua_pushinteger(L, (lua_Integer)h.flag); else lua_pushnil(L);
  lua_rawseti(L, -2, 7);
}

/* ---------------------------------------------------------------- results */
/* A result message: this header, then the codec's bytes of the results as an
** array. The parent decodes them straight into the call's result table. */
#define RESULTMAGIC 0x544c5352u  /* "RSLT" */
typedef struct resulthdr {
  uint32_t magic, pid;
  uint64_t seq;
  uint32_t n, lean;  /* lean: the values of a call (apply, submit), for its record (st:reply) */
  double busy;
} resulthdr;

/* core.put_result(queue, seq, pid, busy, out, n): raises the codec's error
** (at result[i]) when a result cannot be sent */
static int pool_put_result(lua_State *L) {
  mp_buf *buf;
  mp_queue *q = mp_queue_check(L, 1, &buf);
  resulthdr h = { RESULTMAGIC, (uint32_t)luaL_checkinteger(L, 3), (uint64_t)luaL_checkinteger(L, 2), 0, 0,
                  luaL_checknumber(L, 4) };
  luaL_checktype(L, 5, LUA_TTABLE);
  lua_Integer n = luaL_checkinteger(L, 6);
  luaL_argcheck(L, n >= 0 && n <= 0x7fffffff, 6, "bad count");
  h.n = (uint32_t)n;
  put_encoded(L, q, &h, sizeof h, mp_encode_range(L, 5, 1, n, "result"), -1, 0);
  return 0;
}

#define CTXSLOT 6  /* the context's slot in take_result's frame */

/* the header of the result message take_result is taking (result_decode fills it);
** done: its record was finished here (see lean_done), as finish asks */
typedef struct rinfo { int valid, done, finish; resulthdr h; const void *ctx; } rinfo;
static rinfo *taking;

/* Where result_decode finds what it looks up, on the stack: the inflight table, the pool and
** the context's names (name k at base + k). In take_result's frame they are its own slots
** (KEYBASE: pushed once a call, not once a message); elsewhere result_decode pushes them. */
typedef struct rkeys { int inflight, pool, base; } rkeys;
#define KEYBASE (CTXSLOT + 1 - CTX_CALL)
#define KEYTOP (KEYBASE + CTX_NKEYS)

static int key_get(lua_State *L, const rkeys *k, int t, int key) {  /* pushes t[key], raw; its type */
  lua_pushvalue(L, k->base + key);
  return lua_rawget(L, t);
}

static void key_set_int(lua_State *L, const rkeys *k, int t, int key, lua_Integer v) {  /* t[key] = v, raw */
  lua_pushvalue(L, k->base + key);
  lua_pushinteger(L, v);
  lua_rawset(L, t);
}

/* The bookkeeping of a lean record rec whose values came (on_result's, for the common case),
** done here when the record needs nothing more: no callback or done callbacks to run, its
** blob still needed or cached. Then the record leaves inflight (at slot inflight), lets go of
** its blob's reference and of its cancel word (back to pool._free), is finished, and this
** returns 1; else 0, and on_result sees the message. */
static int lean_done(lua_State *L, const rkeys *k, int rec, uint64_t seq) {
  int top = lua_gettop(L), ok = 0;
  /* (fields a record always has: by name; others raw, its class has them false) */
  if (key_get(L, k, rec, CTX_CALLBACK) != LUA_TNIL || key_get(L, k, rec, CTX_CBS) != LUA_TNIL ||
      key_get(L, k, rec, CTX_BREC) != LUA_TTABLE)  /* (a record has a callback only when given) */
    goto out;
  int b = top + 3;
  key_get(L, k, b, CTX_REFS);
  int isint;
  lua_Integer refs = lua_tointegerx(L, -1, &isint);
  if (!isint || (refs <= 1 && (key_get(L, k, b, CTX_CACHED), !lua_toboolean(L, -1))))
    goto out;  /* its last reference, and not cached: on_result frees it */
  if (key_get(L, k, rec, CTX_FLAG) != LUA_TNIL) {  /* a Future's cancel word: free for reuse */
    int flag = lua_gettop(L), pool = k->pool;
    if (!lua_isinteger(L, flag) || !lua_istable(L, pool) || key_get(L, k, pool, CTX_FREE) != LUA_TTABLE) goto out;
    int free = flag + 1;
    key_get(L, k, pool, CTX_NFREE);
    lua_Integer nf = lua_tointegerx(L, -1, &isint) + 1;
    if (!isint) goto out;
    lua_pushvalue(L, flag);
    lua_rawseti(L, free, nf);
    key_set_int(L, k, pool, CTX_NFREE, nf);
  }
  key_set_int(L, k, b, CTX_REFS, refs - 1);
  lua_pushnil(L);
  lua_rawseti(L, k->inflight, (lua_Integer)seq);
  lua_pushvalue(L, k->base + CTX_FINISHED);
  lua_pushboolean(L, 1);
  lua_rawset(L, rec);
  ok = 1;
out:
  lua_settop(L, top);
  return ok;
}

/* Pushes true when the results went straight where they belong, else the decoded
** results array; other messages are decoded as they are. Where results belong:
** inflight[seq].call.results from inflight[seq].i0 on (a chunk of a map call),
** or the record inflight[seq] itself, at 1 .. n with its field n set (a lean call:
** apply_async, submit; nothing is decoded once it is finished: cancelled). A lean
** message (st:reply's) goes to a lean record, which is finished here when it can be
** (lean_done, given the pool). */
static void result_decode(lua_State *L, const char *s, size_t n) {
  resulthdr h;
  if (n < sizeof h || (memcpy(&h, s, sizeof h), h.magic != RESULTMAGIC)) { mp_decode(L, s, n); return; }
  int top = lua_gettop(L);
  int placed = 0, done = 0;
  rkeys k = { 3, 5, KEYBASE };
  /* the context: in take_result's frame, else (decoding may run in a frame of
  ** its own, for a message out of line) in the registry */
  if (!(taking && top >= KEYTOP && lua_topointer(L, CTXSLOT) == taking->ctx)) {
    luaL_checkstack(L, CTX_NKEYS + 24, "cannot decode a result");
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &inflight_key) != LUA_TTABLE) goto out;
    lua_rawgeti(L, top + 1, CTX_INFLIGHT);
    lua_rawgeti(L, top + 1, CTX_POOL);
    k.inflight = top + 2;
    k.pool = top + 3;
    k.base = top + 4 - CTX_CALL;
    for (int key = CTX_CALL; key <= CTX_NKEYS; key++) lua_rawgeti(L, top + 1, key);
  }
  int base = lua_gettop(L);
  if (lua_type(L, k.inflight) == LUA_TTABLE && lua_rawgeti(L, k.inflight, (lua_Integer)h.seq) == LUA_TTABLE) {
    int rec = base + 1;
    if (!h.lean && key_get(L, &k, rec, CTX_CALL) == LUA_TTABLE) {
      if (key_get(L, &k, base + 2, CTX_RESULTS) == LUA_TTABLE && key_get(L, &k, rec, CTX_I0) == LUA_TNUMBER &&
          lua_isinteger(L, -1)) {
        lua_Integer at = lua_tointeger(L, -1);
        mp_decode_into(L, s + sizeof h, n - sizeof h, base + 3, at);
        placed = 1;
      }
    } else if (key_get(L, &k, rec, CTX_FINISHED) == LUA_TBOOLEAN) {  /* a lean record */
      if (!lua_toboolean(L, -1)) {
        if (mp_fast_decode_into(L, s + sizeof h, n - sizeof h, rec, 1) < 0)
          mp_decode_into(L, s + sizeof h, n - sizeof h, rec, 1);
        key_set_int(L, &k, rec, CTX_N, (lua_Integer)h.n);  /* (a lean record has it, false: set in place) */
        if (taking && taking->finish) done = lean_done(L, &k, rec, h.seq);
      }
      placed = 1;
    }
  }
out:
  lua_settop(L, top);
  if (placed) lua_pushboolean(L, 1); else mp_decode(L, s + sizeof h, n - sizeof h);
  if (taking) { taking->valid = 1; taking->done = done; taking->h = h; }
}

/* core.take_result(queue, timeout, inflight [, max, pool]) -> seq, out, pid, busy, done for a
** result message (out: true when its results were placed, see result_decode), or the value
** of another message, nil, nil, nil, done; false, nil, nil, nil, done when only lean results
** came; or nil, "timeout"|"interrupted". With pool, the lean results that need nothing more
** (see lean_done) are finished here, up to max messages in all (done: how many), before the
** message returned. */
static int pool_take_result(lua_State *L) {
  mp_buf *buf;
  mp_queue *q = mp_queue_check(L, 1, &buf);
  /* a timeout of 0 is a poll: exactly 0, so that the queue does not spin */
  double deadline = lua_type(L, 2) == LUA_TNUMBER && lua_tonumber(L, 2) <= 0 ? 0 : mp_deadline(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_Integer max = luaL_optinteger(L, 4, 0);
  if (!lua_istable(L, 5)) max = 0;  /* (no pool: one message, as it is) */
  lua_settop(L, 5);
  lua_pushvalue(L, lua_upvalueindex(1));  /* the context (also in the registry), at CTXSLOT */
  lua_pushvalue(L, 3);
  lua_rawseti(L, CTXSLOT, CTX_INFLIGHT);  /* (an error leaves them until the next call) */
  lua_pushvalue(L, 5);
  lua_rawseti(L, CTXSLOT, CTX_POOL);
  luaL_checkstack(L, CTX_NKEYS + 24, "cannot take a result");
  for (int k = CTX_CALL; k <= CTX_NKEYS; k++) lua_rawgeti(L, CTXSLOT, k);  /* (at KEYBASE + k) */
  int n;
  lua_Integer done = 0;
  rinfo info = { 0, 0, max > 0, { 0 }, lua_topointer(L, CTXSLOT) }, *outer = taking;
  int r, got = 0;  /* got: a message for the caller is on the stack */
  for (;;) {
    info.valid = info.done = 0;
    taking = &info;  /* (only result_decode, called below, reads it) */
    r = mp_queue_get_many(L, q, buf, deadline, NULL, 1, 0, &n, result_decode);
    taking = outer;
    if (r != MP_WOKE) break;
    if (!info.done) { got = 1; break; }
    lua_pop(L, 1);
    deadline = 0;
    if (++done >= max) break;
  }
  lua_pushnil(L);
  lua_rawseti(L, CTXSLOT, CTX_INFLIGHT);
  lua_pushnil(L);
  lua_rawseti(L, CTXSLOT, CTX_POOL);
  if (got) {
    if (!info.valid) {
      lua_pushnil(L); lua_pushnil(L); lua_pushnil(L);
    } else {
      lua_pushinteger(L, (lua_Integer)info.h.seq);
      lua_insert(L, -2);
      lua_pushinteger(L, info.h.pid);
      lua_pushnumber(L, info.h.busy);
    }
    lua_pushinteger(L, done);
    return 5;
  }
  if (done) {
    lua_pushboolean(L, 0);
    lua_pushnil(L); lua_pushnil(L); lua_pushnil(L);
    lua_pushinteger(L, done);
    return 5;
  }
  lua_pushnil(L);
  lua_pushstring(L, r == MP_TIMEOUT ? "timeout" : "interrupted");
  return 2;
}

/* st:get_task(queue, i [, timeout [, maxk [, keep]]]) -> message... | nil, "timeout"|"interrupted"
** Takes up to maxk messages while more than keep stay queued; the worker's
** claim covers them all until st:done has been called for each. */
static int ps_get_task(lua_State *L) {
  mp_handle *h = ps_check(L);
  mp_buf *buf;
  mp_queue *q = mp_queue_check(L, 2, &buf);
  wrec *w = ps_rec(L, h, 3);
  double deadline = mp_deadline(L, 4);
  int maxk = (int)luaL_optinteger(L, 5, 1);
  lua_Integer keep = luaL_optinteger(L, 6, 0);
  luaL_argcheck(L, maxk >= 1 && maxk <= 256, 5, "1 to 256 messages");
  msgs_release(L);
  int n;
  int r = mp_queue_get_many(L, q, buf, deadline, &w->claim, maxk, keep < 0 ? 0 : (uint64_t)keep, &n,
                            task_decode);
  if (r == MP_WOKE) return n;
  return mp_waitresult(L, r);
}

/* the worker of record w finished its message (its result is out) */
static void done_rec(mp_handle *h, wrec *w, uint64_t items, double busy, double idle, double enc, double dec) {
  w->tasks++;
  w->items += items;
  w->busy += busy;
  w->idle += idle;
  w->enc += enc;
  w->dec += dec;
  if (w->claim.first < w->claim.seq) {  /* the next message of its batch starts now */
    w->claim.start = mp_now();
    __atomic_add_fetch(&w->claim.first, 1, __ATOMIC_SEQ_CST);
  } else {
    __atomic_store_n(&w->claim.seq, 0, __ATOMIC_SEQ_CST);
  }
  /* its result is out: tell a watching parent (see the readiness protocol) */
  pstate *ps = MP_PTR(h->off);
  int efd = ((pshandle *)h)->efd;
  if (__atomic_load_n(&ps->watching, __ATOMIC_SEQ_CST) && efd >= 0 &&
      !__atomic_exchange_n(&ps->signalled, 1, __ATOMIC_SEQ_CST)) {
    uint64_t one = 1;
    ssize_t r = write(efd, &one, sizeof one);  /* (EAGAIN: the counter is full, readable anyway) */
    (void)r;
  }
}

/* st:done(i, items, busy, idle, enc, dec): the worker finished its message */
static int ps_done(lua_State *L) {
  mp_handle *h = ps_check(L);
  wrec *w = ps_rec(L, h, 2);
  done_rec(h, w, (uint64_t)luaL_optinteger(L, 3, 1), luaL_optnumber(L, 4, 0), luaL_optnumber(L, 5, 0),
           luaL_optnumber(L, 6, 0), luaL_optnumber(L, 7, 0));
  return 0;
}

/* The values of a call that st:reply sends: a table reused from call to call (no table
** made per task), emptied once they are out. A reply that raised (a value cannot be sent)
** leaves them there, for core.reply_values. */
static const char values_key = 'v';
static int values_n = -1;  /* the values left by a reply that raised (-1: none) */

static void push_values(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &values_key) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &values_key);
}

/* st:reply(i, queue, seq, pid, t1, idle, dec, ok, ...) -> true, busy | false, busy, t2, err: put_result
** and done in one, for a message of one call (apply, submit), given what xpcall(f, ...)
** returned, f having started at t1: when ok, its values ... are sent as the result of message
** seq, then the worker is done with it (the encoding timed here); else nothing is done and
** the error err comes back, with the time it ran (busy) and when it ended (t2). Raises the
** codec's error when a value cannot be sent, before anything is put or done: the values
** then wait for core.reply_values. */
static int ps_reply(lua_State *L) {
  double t2 = mp_now();
  mp_handle *h = ps_check(L);
  wrec *w = ps_rec(L, h, 2);
  mp_buf *buf;
  mp_queue *q = mp_queue_check(L, 3, &buf);
  double t1 = luaL_checknumber(L, 6), busy = t2 - t1;
  resulthdr hd = { RESULTMAGIC, (uint32_t)luaL_checkinteger(L, 5), (uint64_t)luaL_checkinteger(L, 4), 0, 0, busy };
  double idle = luaL_checknumber(L, 7), dec = luaL_checknumber(L, 8);
  int top = lua_gettop(L), n = top - 9;
  if (n < 0) n = 0;
  if (!lua_toboolean(L, 9)) {
    lua_pushboolean(L, 0);
    lua_pushnumber(L, busy);
    lua_pushnumber(L, t2);
    lua_pushvalue(L, 10);
    return 4;
  }
  push_values(L);
  int v = top + 1;
  for (int k = 1; k <= n; k++) {
    lua_pushvalue(L, 9 + k);
    lua_rawseti(L, v, k);
  }
  hd.n = (uint32_t)n;
  hd.lean = 1;
  values_n = n;  /* (until they are out) */
  char few[MP_FAST_ARRAY];  /* (a few plain values: without the encoder) */
  uint32_t len = mp_fast_encode_values(L, 10, n, few);
  if (len) mp_queue_put_small(L, q, &hd, sizeof hd, few, len, -1, 0);
  else put_encoded(L, q, &hd, sizeof hd, mp_encode_range(L, v, 1, n, "result"), -1, 0);
  values_n = -1;
  for (int k = 1; k <= n; k++) {
    lua_pushnil(L);
    lua_rawseti(L, v, k);
  }
  done_rec(h, w, 1, busy, idle, mp_now() - t2, dec);
  lua_pushboolean(L, 1);
  lua_pushnumber(L, busy);
  return 2;
}

/* core.reply_values() -> the values of the reply that raised, as an array with n (moved
** out: the reused table starts anew) */
static int pool_reply_values(lua_State *L) {
  push_values(L);
  lua_pushinteger(L, values_n < 0 ? 0 : values_n);
  lua_setfield(L, -2, "n");
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &values_key);
  values_n = -1;
  return 1;
}

/* st:claimed(i [, tasks]) -> last message number (0 when idle), since, first message number:
** the worker holds messages first .. last and runs `first` since `since`. Given the
** task queue, a take that a dead worker left half done is completed first (with its
** claim), so that the claim of a worker known to be dead is final; then nil, "busy"
** when the queue's lock could not be had (its holder is stopped: ask again later). */
static int ps_claimed(lua_State *L) {
  mp_handle *h = ps_check(L);
  wrec *w = ps_rec(L, h, 2);
  if (!lua_isnoneornil(L, 3)) {
    mp_buf *buf;
    mp_queue *q = mp_queue_check(L, 3, &buf);
    int r = mp_queue_settle(L, q, 0);
    if (r != MP_WOKE) {
      lua_pushnil(L);
      lua_pushstring(L, r == MP_TIMEOUT ? "busy" : "interrupted");
      return 2;
    }
  }
  uint64_t seq = __atomic_load_n(&w->claim.seq, __ATOMIC_SEQ_CST);
  lua_pushinteger(L, (lua_Integer)seq);
  lua_pushnumber(L, w->claim.start);
  lua_pushinteger(L, (lua_Integer)(seq ? w->claim.first : 0));
  return 3;
}

static int ps_release(lua_State *L) {  /* a respawned worker starts with a clean claim */
  mp_handle *h = ps_check(L);
  wrec *w = ps_rec(L, h, 2);
  __atomic_store_n(&w->claim.seq, 0, __ATOMIC_SEQ_CST);
  return 0;
}

static int ps_info(lua_State *L) {
  mp_handle *h = ps_check(L);
  wrec *w = ps_rec(L, h, 2);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)w->tasks); lua_setfield(L, -2, "tasks");
  lua_pushinteger(L, (lua_Integer)w->items); lua_setfield(L, -2, "items");
  lua_pushnumber(L, w->busy); lua_setfield(L, -2, "busy_time");
  lua_pushnumber(L, w->idle); lua_setfield(L, -2, "idle_time");
  lua_pushnumber(L, w->enc); lua_setfield(L, -2, "encode_time");
  lua_pushnumber(L, w->dec); lua_setfield(L, -2, "decode_time");
  return 1;
}

/* ------------------------------------------------------------ readiness */


static void ps_write(int fd) {
  uint64_t one = 1;
  ssize_t r = write(fd, &one, sizeof one);
  (void)r;
}

/* st:watch() -> fd | nil, message, code: the epoll descriptor (made once) that polls
** readable when the parent has something to do; from now on workers signal */
static int ps_watch(lua_State *L) {
  pshandle *ph = (pshandle *)ps_check(L);
  pstate *ps = MP_PTR(ph->h.off);
  if (ph->epfd < 0) {
    if (ph->efd < 0 || ph->h.pid != getpid()) {
      errno = ph->efd < 0 ? EBADF : EPERM;
      return mp_pusherrno(L, "fileno");
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) return mp_pusherrno(L, "fileno: epoll_create1");
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    struct epoll_event ev = { EPOLLIN, { .u64 = 0 } };
    if (tfd < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, ph->efd, &ev) < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev) < 0) {
      int e = errno;
      close(ep);
      if (tfd >= 0) close(tfd);
      errno = e;
      return mp_pusherrno(L, "fileno: epoll_ctl");
    }
    ph->epfd = ep;
    ph->tfd = tfd;
    __atomic_store_n(&ps->watching, 1, __ATOMIC_SEQ_CST);
    ps_write(ph->efd);  /* what came before the parent watched: one poll takes it */
  }
  lua_pushinteger(L, ph->epfd);
  return 1;
}

static int *ps_slot(lua_State *L, pshandle *ph, int arg) {
  lua_Integer i = luaL_checkinteger(L, arg);
  luaL_argcheck(L, i >= 1 && i <= ph->nslots, arg, "no such worker");
  return &ph->pidfd[i - 1];
}

/* st:unwatch_pid(i): worker slot i's pidfd leaves the epoll set (explicitly: forked
** workers hold copies of it, so closing ours alone would leave it there) */
static int ps_unwatch_pid(lua_State *L) {
  pshandle *ph = (pshandle *)ps_check(L);
  int *fd = ps_slot(L, ph, 2);
  if (*fd >= 0 && ph->epfd >= 0) epoll_ctl(ph->epfd, EPOLL_CTL_DEL, *fd, NULL);
  close_fd(fd);
  return 0;
}

/* st:watch_pid(i, pid) -> true | false: worker slot i is process pid; its exit makes
** the epoll set readable. false (no pidfd: Linux < 5.3, or pid is gone): the parent
** is asked to poll now, and its timer finds the exit. */
static int ps_watch_pid(lua_State *L) {
  pshandle *ph = (pshandle *)ps_check(L);
  ps_unwatch_pid(L);
  int *fd = ps_slot(L, ph, 2);
  pid_t pid = (pid_t)luaL_checkinteger(L, 3);
  int ok = 0;
  if (ph->epfd >= 0) {
#ifdef SYS_pidfd_open
    int p = (int)syscall(SYS_pidfd_open, pid, 0);  /* (close-on-exec) */
    struct epoll_event ev = { EPOLLIN, { .u64 = 0 } };
    if (p >= 0 && epoll_ctl(ph->epfd, EPOLL_CTL_ADD, p, &ev) == 0) *fd = p, ok = 1;
    else if (p >= 0) close(p);
#endif
    if (!ok) ps_write(ph->efd);
  }
  lua_pushboolean(L, ok);
  return 1;
}

/* st:clear(): the parent is about to look: the eventfd and the timer are read, then
** workers may signal again (this order: see the readiness protocol) */
static int ps_clear(lua_State *L) {
  pshandle *ph = (pshandle *)ps_check(L);
  pstate *ps = MP_PTR(ph->h.off);
  uint64_t v;
  if (ph->efd >= 0 && read(ph->efd, &v, sizeof v) < 0) v = 0;
  if (ph->tfd >= 0 && read(ph->tfd, &v, sizeof v) < 0) v = 0;
  __atomic_store_n(&ps->signalled, 0, __ATOMIC_SEQ_CST);
  return 0;
}

/* st:signal([seconds]): without seconds, the epoll set is readable now (the parent left
** work for its next poll); with seconds, it becomes readable then (0: never, by the timer) */
static int ps_signal(lua_State *L) {
  pshandle *ph = (pshandle *)ps_check(L);
  if (lua_isnoneornil(L, 2)) {
    if (ph->efd >= 0) ps_write(ph->efd);
    return 0;
  }
  double s = luaL_checknumber(L, 2);
  if (ph->tfd >= 0) {
    struct itimerspec its = { { 0, 0 }, { 0, 0 } };
    if (s > 0) {
      if (s > 1e6) s = 1e6;
      its.it_value.tv_sec = (time_t)s;
      its.it_value.tv_nsec = (long)((s - (double)its.it_value.tv_sec) * 1e9);
      if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    }
    timerfd_settime(ph->tfd, 0, &its, NULL);
  }
  return 0;
}

/* st:forget(): in a worker, the parent's epoll set, timer and pidfds are closed (its
** copies; the eventfd stays: the worker signals through it) */
static int ps_forget(lua_State *L) {
  pshandle *ph = (pshandle *)ps_check(L);
  close_fd(&ph->epfd);
  close_fd(&ph->tfd);
  for (int k = 0; k < ph->nslots; k++) close_fd(&ph->pidfd[k]);
  return 0;
}

static int ps_close(lua_State *L) {
  mp_handle *h = mp_toself(L, 1, MP_CLASSES(POOLSTATE));
  pshandle *ph = (pshandle *)h;
  uint64_t off = h->off;
  h->off = 0;
  ps_unregister(ph);
  close_fd(&ph->epfd);  /* (first: the set goes, and with it what it watched) */
  close_fd(&ph->tfd);
  close_fd(&ph->efd);
  for (int k = 0; k < ph->nslots; k++) close_fd(&ph->pidfd[k]);
  if (off) mp_obj_release(off, h->pid);
  return 0;
}

static void ps_decode(lua_State *L, const unsigned char *payload, size_t n) {
  pshandle *ph = (pshandle *)mp_handle_attach(L, payload, n, 0x50, POOLSTATE, sizeof(pshandle), 0);
  ph->efd = ph->epfd = ph->tfd = -1;
  ph->nslots = 0;
}

/* ------------------------------------------------------------------ blobs */
/* A Blob is immutable bytes in the arena, freed explicitly by its maker once
** no reader can need it any more (the pool sends a function once per call
** this way: each worker reads it once, on its first task of the call). */

/* A blob starts with an object header tagged T_BLOB (its refs are unused: the
** maker frees it), so that an offset from anywhere goes through the codec's
** checked handle path (mp_handle_object) before anything is read: a bad offset
** raises, it never reads outside the arena. A freed blob loses its tag. Only its
** maker frees it: each process keeps the offsets of the blobs it made and has
** not freed (reset in a forked child), and blob_free takes no other, so that no
** offset (a stale one, one inside a blob's bytes that look like a header) can
** reach the allocator's free. */
/* A blob whose bytes name shared objects (a task function's upvalues) owns a
** reference to each, counted by its maker when it is made (core.blob_new with
** encode_function's owners) and released when it is freed, listed after its
** bytes: a handle a worker decodes from it always names a live object, and a
** queue the function captured is freed once no blob and no handle needs it. */
#define T_BLOB 0x424f4c42u  /* "BLOB" */
typedef struct blobhdr { mp_obj h; uint64_t len, nown; } blobhdr;  /* nown: objects it owns */

static mp_sent *blob_owned(blobhdr *b) {
  return (mp_sent *)(void *)((char *)b + sizeof(blobhdr) + ((b->len + 7) & ~(uint64_t)7));
}

static const char blobs_key = 'b';  /* registry: { [offset] = true } of this process's blobs */
static pid_t blobs_pid;

static void push_blobs(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &blobs_key) == LUA_TTABLE && blobs_pid == getpid()) return;
  lua_pop(L, 1);
  lua_newtable(L);  /* (in a forked child: the parent's blobs are not its own) */
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &blobs_key);
  blobs_pid = getpid();
}

/* the blob at argument arg: in the arena, tagged, its bytes below the arena's top */
static blobhdr *blob_check(lua_State *L, int arg) {
  lua_Integer off = luaL_checkinteger(L, arg);
  luaL_argcheck(L, mp_arena_base() != NULL, arg, "not a blob (no shared memory yet)");
  unsigned char payload[8];
  memcpy(payload, &off, 8);
  uint64_t o = mp_handle_object(L, payload, 8, T_BLOB, sizeof(blobhdr));
  blobhdr *b = MP_PTR(o);
  luaL_argcheck(L, mp_arena_top() - o - sizeof(blobhdr) >= b->len, arg, "not a blob (bad length)");
  return b;
}

/* a new blob of n bytes (uninitialised), recorded as this process's */
/* A blob of n bytes, its offset pushed; held: see blob_hold; deadline: its wait for the
** allocator's lock ends then (MP_AFTER, as a lean put's), and NULL is returned, nothing pushed
** (-1: no end; Ctrl-C raises) */
static blobhdr *blob_make(lua_State *L, size_t n, int held, double deadline) {
  mp_arena_ensure(L);
  uint64_t off;
  if (held) {
    off = mp_alloc_held(sizeof(blobhdr) + n);
  } else {
    mp_alloc_context(L, deadline);
    off = mp_alloc_try(sizeof(blobhdr) + n);
    mp_alloc_context(NULL, -1);
    if (!off && deadline != -1 && mp_alloc_gave_up()) return NULL;
  }
  if (!off) mp_oom_error(L, sizeof(blobhdr) + n);
  blobhdr *b = MP_PTR(off);
  memset(b, 0, sizeof *b);
  b->h.type = T_BLOB;
  b->h.refs = 1;  /* its maker's, until blob_free: a live object to the handle checks */
  b->len = n;
  push_blobs(L);
  lua_pushboolean(L, 1);
  lua_rawseti(L, -2, (lua_Integer)off);
  lua_pop(L, 1);
  lua_pushinteger(L, (lua_Integer)off);
  return b;
}

/* core.blob_new(s [, owners [, wait]]) -> offset | nil, "timeout"; owners: encode_function's
** third result for s, whose objects the blob then owns until blob_free; wait: seconds its wait
** for the allocator's lock may last (from when it begins, as a lean put's: a stopped holder),
** then nothing is made */
static int blob_new(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  mp_owners *o = NULL;
  if (!lua_isnoneornil(L, 2)) o = luaL_checkudata(L, 2, MP_OWNERS);
  size_t room = (n + 7) & ~(size_t)7;
  blobhdr *b = blob_make(L, o ? room + o->n * sizeof(mp_sent) : n, 0, lean_deadline(L, 3));
  if (!b) return mp_waitresult(L, MP_TIMEOUT);
  b->len = n;
  memcpy((char *)b + sizeof(blobhdr), s, n);
  if (o) {  /* its references: counted by this process (freed with it if it dies) */
    mp_sent *l = blob_owned(b);
    for (size_t i = 0; i < o->n; i++) {
      if (!mp_obj_alive(o->h[i].off)) return luaL_error(L, "cannot make a blob: a shared object its function names was freed");
      l[i] = o->h[i];
      mp_obj_retain(l[i].off);
      b->nown = i + 1;
    }
  }
  return 1;
}

/* core._blob_hold(n) -> offset: for tests, a blob of n bytes held by this process
** (freed if it dies with it, see mp_alloc_held) until core.blob_free */
static int blob_hold(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 0 && n <= 0x7fffffff, 1, "0 to 2^31 - 1 bytes");
  blob_make(L, (size_t)n, 1, -1);
  return 1;
}

/* core.blob_get(offset) -> the bytes; raises on an offset that names no blob */
static int blob_get(lua_State *L) {
  blobhdr *b = blob_check(L, 1);
  lua_pushlstring(L, (char *)b + sizeof(blobhdr), b->len);
  return 1;
}

/* core.blob_free(offset): by its maker, once no reader can need it; raises on any
** other offset (a freed one, another process's, one that names no blob) */
static int blob_free(lua_State *L) {
  lua_Integer off = luaL_checkinteger(L, 1);
  push_blobs(L);
  luaL_argcheck(L, lua_rawgeti(L, -1, off) == LUA_TBOOLEAN, 1,
                "not a blob this process made and has not freed");
  lua_pop(L, 1);
  blobhdr *b = blob_check(L, 1);
  lua_pushnil(L);
  lua_rawseti(L, -2, off);
  b->h.type = 0;
  mp_sent *l = blob_owned(b);
  pid_t me = getpid();
  for (uint64_t i = 0; i < b->nown; i++) mp_obj_release_with(l[i].off, me, mp_fn_unpack(l[i].dtor));
  mp_free((uint64_t)off);
  return 0;
}

/* core.place(src, n, dst, at): dst[at .. at+n-1] = src[1 .. n], raw (table.move
** goes through metamethod checks for every item) */
static int pool_place(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_Integer n = luaL_checkinteger(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_Integer at = luaL_checkinteger(L, 4);
  for (lua_Integer k = 1; k <= n; k++) {
    lua_rawgeti(L, 1, k);
    lua_rawseti(L, 3, at + k - 1);
  }
  return 0;
}

/* core.newtable(narr [, nhash]) -> a table with room for narr items */
static int pool_newtable(lua_State *L) {
  lua_Integer a = luaL_optinteger(L, 1, 0), h = luaL_optinteger(L, 2, 0);
  luaL_argcheck(L, a >= 0 && a <= 0x7fffffff, 1, "bad size");
  luaL_argcheck(L, h >= 0 && h <= 0x7fffffff, 2, "bad size");
  lua_createtable(L, (int)a, (int)h);
  return 1;
}

/* ------------------------------------------------------------- map chunks */
/* A worker decodes the items of a map chunk (modes 0 to 2) into a table it reuses, a
** scratch table: a fresh table for every chunk would cost more than its decoding, in
** page faults (a worker's collector is stopped, see pool.lua's worker_main, so the
** memory of the tables it drops is not reused). Its scratch tables wait on a stack (a
** take of several messages decodes each into one of them); the chunk decoded into
** one holds it until the worker hands it back with core.chunk_scratch once the chunk
** ran. Items past the chunk's count are the previous chunks' and are never read. */
#define SCRATCH_MAX 64  /* tables on the stack: a take holds up to 16 messages */
static const char scratch_key = 's';  /* registry: this state's stack of scratch tables */

/* core.chunk_scratch(t): t goes on the stack of scratch tables (unless it is full);
** core.chunk_scratch(nil) empties it */
static int pool_chunk_scratch(lua_State *L) {
  if (lua_isnoneornil(L, 1)) {
    lua_pushnil(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &scratch_key);
    return 0;
  }
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &scratch_key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_createtable(L, SCRATCH_MAX, 0);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &scratch_key);
  }
  lua_Unsigned k = lua_rawlen(L, -1);
  if (k < SCRATCH_MAX) {
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, (lua_Integer)k + 1);
  }
  return 0;
}

/* pushes the n items of a map chunk, decoded from s: into the scratch table on top of
** the stack, taken off it, when it holds n items already, else into a fresh table */
static void chunk_items(lua_State *L, const char *s, size_t len, uint32_t n) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &scratch_key) == LUA_TTABLE) {
    lua_Unsigned k = lua_rawlen(L, -1);
    if (k > 0) {
      lua_rawgeti(L, -1, (lua_Integer)k);
      lua_pushnil(L);
      lua_rawseti(L, -3, (lua_Integer)k);  /* taken (a table too small is dropped) */
      if (lua_type(L, -1) == LUA_TTABLE && lua_rawlen(L, -1) >= n) {
        lua_remove(L, -2);
        mp_decode_into(L, s, len, lua_gettop(L), 1);  /* (pushes the table again) */
        lua_remove(L, -2);
        return;
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  mp_decode(L, s, len);
}

static const mp_handle_type t_ps = { POOLSTATE, mp_handle_encode, ps_decode };

/* core.flags_new(n [, wait]) -> blob, base | nil, "timeout": n zeroed cancel words in a blob
** (free it with blob_free); base is the offset of the first word; wait: as blob_new's */
static int pool_flags_new(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 1 && n <= 1 << 20, 1, "1 to 2^20 words");
  blobhdr *b = blob_make(L, (size_t)n * sizeof(uint32_t), 0, lean_deadline(L, 2));
  if (!b) return mp_waitresult(L, MP_TIMEOUT);
  memset((char *)b + sizeof *b, 0, (size_t)n * sizeof(uint32_t));
  lua_pushinteger(L, (lua_Integer)((char *)b + sizeof *b - (char *)MP_PTR(0)));
  return 2;
}

int mp_pool_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"get_task", ps_get_task}, {"done", ps_done}, {"reply", ps_reply}, {"claimed", ps_claimed},
    {"release", ps_release}, {"info", ps_info}, {"close", ps_close},
    {"watch", ps_watch}, {"watch_pid", ps_watch_pid}, {"unwatch_pid", ps_unwatch_pid},
    {"clear", ps_clear}, {"signal", ps_signal}, {"forget", ps_forget},
    {"forking", ps_forking}, {"eventfd", ps_eventfd}, {"adopt_eventfd", ps_adopt_eventfd}, {NULL, NULL}
  };
  static const luaL_Reg meta[] = { {"__gc", ps_close}, {"__close", ps_close}, {NULL, NULL} };
  mp_newclass(L, POOLSTATE, methods, meta);
  mp_codec_register(&t_ps);
  static const luaL_Reg funcs[] = {
    {"PoolState", ps_new}, {"put_task", pool_put_task}, {"put_stop", pool_put_stop}, {"put_result", pool_put_result}, {"place", pool_place}, {"newtable", pool_newtable}, {"blob_new", blob_new}, {"blob_get", blob_get}, {"blob_free", blob_free}, {"_blob_hold", blob_hold},
    {"reply_values", pool_reply_values}, {"lean_puts", pool_lean_puts}, {"flag_cas", pool_flag_cas}, {"flag_get", pool_flag_get}, {"flags_new", pool_flags_new},
    {"chunk_scratch", pool_chunk_scratch},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  lua_createtable(L, CTX_NKEYS, 0);  /* take_result's context, its upvalue */
  for (int k = CTX_CALL; k <= CTX_NKEYS; k++) { lua_pushstring(L, ctx_keys[k]); lua_rawseti(L, -2, k); }
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &inflight_key);
  lua_pushcclosure(L, pool_take_result, 1);
  lua_setfield(L, -2, "take_result");
  lua_newtable(L);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &inflight_key);
  lua_pushcclosure(L, pool_put_apply, 2);
  lua_setfield(L, -2, "put_apply");
  lua_pushnil(L);  /* (put_call has no upvalue 1) */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &inflight_key);
  lua_pushcclosure(L, pool_put_call, 2);
  lua_setfield(L, -2, "put_call");

  return 0;
}
