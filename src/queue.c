/* queue.c: Queue, SimpleQueue and JoinableQueue in shared memory. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "mp.h"
#include "queue.h"
#include "codec.h"

#define QUEUE "multiprocessing.Queue"
#define SIMPLEQUEUE "multiprocessing.SimpleQueue"
#define JOINABLEQUEUE "multiprocessing.JoinableQueue"
#define CHUNK (64 * 1024 - 64)   /* data bytes of a chunk of small messages */
#define BIGMSG MP_QSMALL           /* messages this long get their own block */
#define SPIN 200                  /* polls of an empty queue before sleeping */
#define PACE_BYTES (8u << 20)     /* a put beyond this many queued bytes lets readers catch up */
#define PACE_WAIT 0.002
#define GRACE 0.05                /* a lock wait lasts at least this long, even for a poll */
#define RECHECK 0.1               /* a reader waiting behind others' records looks whether they died */

/* Records, 8-aligned in a chunk, start with a 32-bit tag.
** - A small message: tag = its length (< BIGMSG), then its bytes. A reader that
**   takes it out of order (behind a record still being written or read) sets
**   TAKEN_BIT instead of moving the chunk's read position.
** - A big message: a bigrec, whose block holds the bytes, and whose tag is its
**   state. Only the process named by pid moves it out of WRITING (publish) or
**   READING/CLAIMED (done), with one store and without the lock; a reader that
**   finds that process gone settles the record under the lock:
**     WRITING  -> TAKEN, block freed   (the put never happened)
**     READING  -> READY                (a plain get died: the message is offered again)
**     CLAIMED  -> TAKEN, block freed   (a claimed take died: its claim reports it)
**   Its block always has one owner (the arena's owner word, mp.h): the writer
**   (held) while it copies; the record from mp_hand, once b->off names it,
**   until a reader takes it with mp_hold, before it marks the record TAKEN. A
**   settler frees only a block its record still owns (mp_owned_by), taking it
**   first; one the dead process owned goes with that process. A READING
**   record whose reader had taken the block goes to TAKEN instead (the reader
**   died inside get after the take: the message is lost with it, as a small one).
** The read position of a chunk moves past taken records only; records are
** never moved, so a record's address stays valid while its owner works on it.
**
** Handles. A message that carries handles owns a reference to each object
** they name (docs/arena.md): it always takes the big path, and its block starts
** with an msgown (the objects, and how many of them it counted so far) before
** the bytes; OWNS is set in its record's n. The put lists them, and counts
** each (counted follows one by one) while its record is WRITING with the block
** in it: under the lock for a short one, built before the lock is taken and
** READY before it is let go; after the copy for a big one;
** the reader decodes with the list as its adopt set (a decoded handle takes the
** message's reference instead of counting one), stores TAKEN, then releases
** the entries no handle took (a decode that failed half way). Whoever settles
** or destroys a record that still holds its block releases its counted
** entries: a writer that died (WRITING), a claimed reader that died (CLAIMED),
** a queue destroyed with messages in it. A plain reader that died while
** decoding left nothing counted in its handles: the message is offered again. */
#define TAKEN_BIT 0x80000000u
#define BIG_WRITING 0xfffffff1u
#define BIG_READY 0xfffffff2u
#define BIG_READING 0xfffffff3u
#define BIG_CLAIMED 0xfffffff4u
#define BIG_TAKEN 0xfffffff5u
#define IS_BIG(t) ((t) >= BIG_WRITING)
#define IS_GONE(t) ((t) == BIG_TAKEN || (!IS_BIG(t) && ((t) & TAKEN_BIT)))  /* taken for good */
#define IS_OPEN(t) ((t) == BIG_READY || !((t) & TAKEN_BIT))                  /* a reader may take it */

typedef struct bigrec { uint32_t tag, pid; uint64_t off, n; } bigrec;
#define BIGREC ((uint32_t)sizeof(bigrec))
#define OWNS ((uint64_t)1 << 63)  /* in bigrec.n: the block starts with an msgown */
typedef struct msgown { uint32_t n, counted; mp_sent h[]; } msgown;

/* core._queue_fault(where, n), for tests: this process SIGKILLs itself in its
** n-th put ("put": after counting the first reference) or get ("get": after
** decoding, before the message is taken) of a message that carries handles,
** or ("hand") at the n-th step from now of its hand-offs of big messages'
** blocks: a put's (the record names it, owns it, the hold goes), a get's or a
** settling's (the block is taken, the record marked TAKEN, the block freed);
** or stops itself (SIGSTOP, "stop") in its n-th put, holding the queue's lock,
** before it writes anything; or ("chunk") at the n-th step from now of its
** links of new chunks (named in q->loose, handed to the queue, linked) and
** drops of drained ones (unlinked as q->loose, freed) */
static int put_fault, get_fault, hand_fault, stop_fault, chunk_fault;
static void fault_here(int *n) {
  if (*n && --*n == 0) kill(getpid(), SIGKILL);
}
#define HAND_STEP() do { if (__builtin_expect(hand_fault != 0, 0)) fault_here(&hand_fault); } while (0)
#define CHUNK_STEP() do { if (__builtin_expect(chunk_fault != 0, 0)) fault_here(&chunk_fault); } while (0)

/* core._queue_pause(where, seconds), for tests: "publish": this process's next
** big put waits that long with its record reserved (WRITING) before it copies
** and publishes; "settle": a reader that looks whether the owner of a busy big
** record died waits, after its look at the record's state, until that owner
** is gone (at most that long) */
static double publish_pause, settle_pause;
static void pause_until_gone(pid_t pid) {
  double until = mp_now() + settle_pause;
  while (!mp_pid_gone(pid) && mp_now() < until) usleep(1000);
}

static inline uint64_t big_len(const bigrec *b) { return b->n & ~OWNS; }
static inline size_t own_size(size_t n) { return n ? 8 + n * sizeof(mp_sent) : 0; }

/* releases the references a message counted (its record is already TAKEN or
** its queue gone, so this happens once; a kill half way leaks the rest) */
static void own_release(msgown *m) {
  uint32_t k = __atomic_load_n(&m->counted, __ATOMIC_ACQUIRE);
  for (uint32_t i = 0; i < k && i < m->n; i++) mp_obj_drop(m->h[i].off, mp_fn_unpack(m->h[i].dtor));
}

/* once a message with handles was decoded and taken: what no handle took (a
** decoding that failed half way; all, without offs) is released; what one took
** (its entry cleared in offs) is this process's from now on: its ledger records it */
static __attribute__((noinline)) void own_settle(msgown *mo, const uint64_t *offs) {
  for (uint32_t i = 0; i < mo->n; i++)
    if (!offs || offs[i]) mp_obj_drop(mo->h[i].off, mp_fn_unpack(mo->h[i].dtor));
    else mp_obj_adopted(mo->h[i].off);
}

/* frees the block of a big record that will not be read: its references first */
static void big_drop(const bigrec *b, uint64_t block) {
  if (!block) return;
  if (b->n & OWNS) own_release(MP_PTR(block));
  mp_free(block);
}

typedef struct chunk {
  uint64_t next;
  uint32_t wpos, rpos;  /* one aligned word: a drained chunk is reset with one store */
  uint32_t cap, pad;
  char data[];
} chunk;

static inline void reset_word(chunk *c) {  /* wpos = rpos = 0 */
  __atomic_store_n((uint64_t *)(void *)&c->wpos, 0, __ATOMIC_RELEASE);
}

#define CH(off) ((chunk *)MP_PTR(off))
#define OFF(p) MP_OFF(p)
/* a compiler barrier: a kill sees this process's stores in program order */
#define ORDER() __atomic_signal_fence(__ATOMIC_SEQ_CST)

static inline uint32_t tag_of(const char *rec) { return __atomic_load_n((const uint32_t *)rec, __ATOMIC_ACQUIRE); }
static inline uint32_t rec_size(uint32_t t) { return IS_BIG(t) ? BIGREC : (((t & ~TAKEN_BIT) + 4 + 7) & ~7u); }

/* ------------------------------------------------------------ the redo log */

static inline void lg(mp_queue *q, uint32_t *k, void *word, uint64_t val) {
  q->log.w[*k].at = OFF(word);
  q->log.w[*k].val = val;
  (*k)++;
}
static inline void lg32(mp_queue *q, uint32_t *k, uint32_t *word, uint32_t val) {
  q->log.w[*k].at = OFF(word) | 1;
  q->log.w[*k].val = val;
  (*k)++;
}
static inline void lgd(mp_queue *q, uint32_t *k, double *word, double val) {
  uint64_t v;
  memcpy(&v, &val, 8);
  lg(q, k, word, v);
}

static void log_apply(mp_queue *q) {
  uint32_t n = q->log.n;
  for (uint32_t i = 0; i < n && i < MP_QLOG; i++) {
    uint64_t at = q->log.w[i].at, v = q->log.w[i].val;
    if (at & 1) __atomic_store_n((uint32_t *)MP_PTR(at & ~(uint64_t)1), (uint32_t)v, __ATOMIC_RELEASE);
    else __atomic_store_n((uint64_t *)MP_PTR(at), v, __ATOMIC_RELEASE);
  }
  ORDER();
  __atomic_store_n(&q->log.n, 0, __ATOMIC_RELEASE);
  ORDER();
}

/* The k entries written since the last commit take effect: one store commits them. */
static void log_commit(mp_queue *q, uint32_t k) {
  ORDER();
  __atomic_store_n(&q->log.n, k, __ATOMIC_RELEASE);
  ORDER();
  log_apply(q);
}

/* What count, bytes and tail must be, from the chunks themselves. */
static void q_recount(mp_queue *q) {
  uint64_t count = 0, bytes = 0, tail = 0;
  for (uint64_t off = q->head; off; off = CH(off)->next) {
    chunk *c = CH(off);
    tail = off;
    for (uint32_t r = c->rpos; r < c->wpos;) {
      const char *p = c->data + r;
      uint32_t t = tag_of(p);
      if (t == BIG_WRITING || t == BIG_READY) { count++; bytes += big_len((const bigrec *)p); }
      else if (!IS_BIG(t) && !(t & TAKEN_BIT)) { count++; bytes += t; }
      r += rec_size(t);
    }
  }
  q->count = count;
  q->bytes = bytes;
  q->tail = tail;
}

/* A chunk the queue owns outside its list (q->loose) is one a process died with, after it was
** handed to the queue and before it was linked (q_room), or after it was unlinked and before it
** was freed (q_tidy): freed here (queue locked, or nobody's). One still its maker's is freed with
** the dead maker; one the arena has back is no longer the queue's. */
static void q_settle_loose(mp_queue *q) {
  uint64_t a = q->loose;
  if (!a) return;
  q->loose = 0;
  if (!mp_owned_by(a, OFF(q))) return;
  for (uint64_t off = q->head; off; off = CH(off)->next) if (off == a) return;
  if (a == q->spare) return;
  mp_free(a);
}

/* The lock's owner died: finish its change, if it committed one, and recount. */
static void q_repair(mp_queue *q) {
  if (q->log.n) log_apply(q);
  q_settle_loose(q);
  q_recount(q);
}

/* Locks q: MP_WOKE (locked), MP_TIMEOUT or MP_INTERRUPTED (not locked). The
** wait lasts at least GRACE, so that a poll is not failed by a short section. */
static __attribute__((noinline)) int q_lock_slow(lua_State *L, mp_queue *q, double deadline, int r) {
  if (r != EOWNERDEAD) {
    deadline = mp_when(deadline);
    if (deadline >= 0) {
      double soon = mp_now() + GRACE;
      if (deadline < soon) deadline = soon;
    }
    r = mp_mutex_lock(L, &q->lock, deadline);
    if (r == MP_LOCKED) return MP_WOKE;
    if (r == MP_LOCK_TIMEOUT) return MP_TIMEOUT;
    if (r != MP_LOCK_OWNERDEAD) return MP_INTERRUPTED;  /* (or held by us: a bug) */
  } else {
    pthread_mutex_consistent(&q->lock);
  }
  q_repair(q);
  return MP_WOKE;
}

static inline int q_lock(lua_State *L, mp_queue *q, double deadline) {
  int r = pthread_mutex_trylock(&q->lock);
  if (__builtin_expect(r == 0, 1)) return MP_WOKE;
  return q_lock_slow(L, q, deadline, r);
}

static inline void q_unlock(mp_queue *q) { pthread_mutex_unlock(&q->lock); }

/* ------------------------------------------------------- the shared part */

static void q_init(mp_queue *q, int64_t maxsize, int joinable) {
  mp_mutex_init(&q->lock, 0);
  q->maxsize = maxsize;
  q->joinable = (uint32_t)joinable;
}

static void q_dtor(mp_obj *o) {  /* frees what the queue still holds (no process uses it) */
  mp_queue *q = (mp_queue *)o;
  if (q->log.n) log_apply(q);
  q_settle_loose(q);
  uint64_t c = q->head;
  while (c) {
    chunk *ch = CH(c);
    for (uint32_t r = ch->rpos; r < ch->wpos;) {
      uint32_t t = tag_of(ch->data + r);
      bigrec *b = (bigrec *)(ch->data + r);
      /* (a block its record does not own is a dead process's: freed with it) */
      if (IS_BIG(t) && t != BIG_TAKEN && b->off && mp_owned_by(b->off, OFF(b))) big_drop(b, b->off);
      r += rec_size(t);
    }
    uint64_t next = ch->next;
    mp_free(c);
    c = next;
  }
  if (q->spare) mp_free(q->spare);
  q->head = q->tail = q->spare = 0;
}

static void q_tidy(mp_queue *q);

/* A chunk at the tail with room for rec bytes (queue locked), or NULL when the
** arena is full. A full tail is tidied first: a big message's reader marks its
** record taken without the lock, so the record stays until the next tidy, and
** a queue whose reader always comes after the writer (never finding it empty)
** would fill its chunk with taken records and grow one while holding nothing.
** A new chunk is linked empty, with one store (or a logged pair when it is the
** spare). Made, it is held by this process (mp_alloc_held: freed if we die), named in
** q->loose, then handed to the queue (its owner word: OFF(q)), linked, and let go of:
** a kill at any step leaves it with one owner, the dead process (freed with it) or the
** queue (q_repair, by the next locker, frees it unless it was linked). A drained chunk
** leaves the list and becomes q->loose in one logged change, then is freed (q_tidy). */
static chunk *q_room(mp_queue *q, uint32_t rec) {
  chunk *c = q->tail ? CH(q->tail) : NULL;
  if (c && c->cap - c->wpos >= rec) return c;
  if (c) {  /* (the tail stays: only chunks before it are dropped) */
    q_tidy(q);
    if (c->cap - c->wpos >= rec) return c;
  }
  uint64_t *link = c ? &c->next : &q->head, off;
  if (q->spare && rec <= CH(q->spare)->cap) {
    off = q->spare;
    c = CH(off);
    c->next = 0; c->wpos = c->rpos = 0;
    uint32_t k = 0;
    lg(q, &k, &q->spare, 0);
    lg(q, &k, link, off);
    log_commit(q, k);
  } else {
    /* small first chunks: a queue that carries a few messages stays small */
    if (q->chunkcap < 2048) q->chunkcap = 2048 - sizeof(chunk);
    uint32_t cap = rec > q->chunkcap ? rec : q->chunkcap;
    if (q->chunkcap < CHUNK) q->chunkcap = q->chunkcap * 2 + (uint32_t)sizeof(chunk) > CHUNK ? CHUNK : q->chunkcap * 2 + (uint32_t)sizeof(chunk);
    off = mp_alloc_held(sizeof(chunk) + cap);
    if (!off) return NULL;
    c = CH(off);
    c->cap = cap; c->next = 0; c->wpos = c->rpos = 0;
    __atomic_store_n(&q->loose, off, __ATOMIC_RELEASE);
    CHUNK_STEP();
    mp_hand(off, OFF(q));
    CHUNK_STEP();
    ORDER();
    __atomic_store_n(link, off, __ATOMIC_RELEASE);
    CHUNK_STEP();
    mp_unhold(off);
    __atomic_store_n(&q->loose, 0, __ATOMIC_RELEASE);
  }
  q->tail = off;
  return c;
}

/* Makes the record that was written at c->wpos part of the queue (locked):
** one store, or a logged pair for a JoinableQueue. */
static void q_commit_append(mp_queue *q, chunk *c, uint32_t rec) {
  if (q->joinable) {
    uint32_t k = 0;
    lg32(q, &k, &c->wpos, c->wpos + rec);
    lg(q, &k, &q->unfinished, q->unfinished + 1);
    log_commit(q, k);
  } else {
    ORDER();
    __atomic_store_n(&c->wpos, c->wpos + rec, __ATOMIC_RELEASE);
    ORDER();
  }
}

static void q_wake_getters(mp_queue *q) {
  __atomic_add_fetch(&q->put_seq, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&q->getters, __ATOMIC_SEQ_CST)) mp_futex_wake(&q->put_seq, 1);
}

static void q_wake_putters(mp_queue *q) {
  __atomic_add_fetch(&q->get_seq, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&q->putters, __ATOMIC_SEQ_CST)) mp_futex_wake(&q->get_seq, 1);
}

/* The same, from a change made under the lock: a sleeper counts itself and
** reads the sequence under the lock (q_wait), so with nobody counted the
** sequence need not move (one locked instruction less a message). Publishing a
** big message happens without the lock: it always moves put_seq. */
static inline void q_wake_getters_locked(mp_queue *q) {
  if (__atomic_load_n(&q->getters, __ATOMIC_SEQ_CST)) q_wake_getters(q);
}
static inline void q_wake_putters_locked(mp_queue *q) {
  if (__atomic_load_n(&q->putters, __ATOMIC_SEQ_CST)) q_wake_putters(q);
}

/* Moves the head past taken records, and drops drained chunks (queue locked). */
static void q_tidy(mp_queue *q) {
  while (q->head) {
    chunk *c = CH(q->head);
    uint32_t r = c->rpos;
    while (r < c->wpos) {
      uint32_t t = tag_of(c->data + r);
      if (!IS_GONE(t)) break;
      r += rec_size(t);
    }
    if (r < c->wpos) {
      if (r != c->rpos) __atomic_store_n(&c->rpos, r, __ATOMIC_RELEASE);
      return;
    }
    uint32_t k = 0;
    if (q->head == q->tail) {  /* drained: reuse it in place */
      if (r) reset_word(c);
      return;
    }
    uint64_t off = q->head;
    int keep = !q->spare && c->cap <= CHUNK;
    lg(q, &k, &q->head, c->next);
    lg(q, &k, keep ? &q->spare : &q->loose, off);
    log_commit(q, k);
    if (!keep) {  /* (a kill from here: q_settle_loose frees it, unless the arena has it) */
      CHUNK_STEP();
      mp_free(off);
      CHUNK_STEP();
      __atomic_store_n(&q->loose, 0, __ATOMIC_RELEASE);
    }
  }
}

/* The first record a reader may take (queue locked): 1 and its place, or 0.
** *busy counts the records that others are writing or reading. */
static int q_find(mp_queue *q, chunk **pc, uint32_t *pr, int *busy) {
  *busy = 0;
  for (uint64_t off = q->head; off; off = CH(off)->next) {
    chunk *c = CH(off);
    for (uint32_t r = c->rpos; r < c->wpos;) {
      uint32_t t = tag_of(c->data + r);
      if (IS_OPEN(t)) { *pc = c; *pr = r; return 1; }
      if (t == BIG_WRITING || t == BIG_READING || t == BIG_CLAIMED) (*busy)++;
      r += rec_size(t);
    }
  }
  return 0;
}

/* Settles the big records whose writer or reader is gone (queue locked, see
** the states above); returns how many, and how many moved on meanwhile. The
** owner of a record moves it without the lock (publish, done), so its state is
** read again once the owner is known to be gone (then it is final): a writer
** that published and exited between the first look and the question would
** otherwise have its message dropped, a reader's finished take offered again. */
static int q_settle_dead(mp_queue *q) {
  int n = 0, moved = 0;
  for (uint64_t off = q->head; off; off = CH(off)->next) {
    chunk *c = CH(off);
    for (uint32_t r = c->rpos; r < c->wpos;) {
      bigrec *b = (bigrec *)(c->data + r);
      uint32_t t = tag_of(c->data + r), k = 0;
      r += rec_size(t);
      if (t != BIG_WRITING && t != BIG_READING && t != BIG_CLAIMED) continue;
      if (settle_pause > 0) pause_until_gone((pid_t)b->pid);
      if (!mp_pid_gone((pid_t)b->pid)) continue;
      t = __atomic_load_n(&b->tag, __ATOMIC_SEQ_CST);  /* (final now: see above) */
      if (t != BIG_WRITING && t != BIG_READING && t != BIG_CLAIMED) { moved++; continue; }
      n++;
      uint64_t block = b->off;
      int owns = block && mp_owned_by(block, OFF(b));  /* (else the dead process's: freed with it) */
      if (t == BIG_READING && owns) {  /* offered again */
        lg32(q, &k, &b->tag, BIG_READY);
        log_commit(q, k);
        q->count++;
        q->bytes += big_len(b);
        continue;
      }
      if (owns) mp_hold(block);  /* ours before the record lets go of it */
      HAND_STEP();
      lg32(q, &k, &b->tag, BIG_TAKEN);
      if (t == BIG_WRITING && q->joinable && q->unfinished) lg(q, &k, &q->unfinished, q->unfinished - 1);
      log_commit(q, k);
      HAND_STEP();
      if (owns) big_drop(b, block);  /* (a kill in it leaks the references not released yet) */
      HAND_STEP();
      if (t == BIG_WRITING) {
        q->count--;
        q->bytes -= big_len(b);
        if (q->joinable && !q->unfinished) {
          __atomic_add_fetch(&q->done_seq, 1, __ATOMIC_SEQ_CST);
          mp_futex_wake(&q->done_seq, 0x7fffffff);
        }
      }
    }
  }
  if (n) { q_tidy(q); q_wake_getters(q); q_wake_putters(q); }
  return n + moved;
}

/* Sleeps while *seq == s (queue locked on entry), until `until`; then locks
** again, waiting no later than deadline. MP_WOKE: locked again (*slept says
** whether the sleep timed out); otherwise MP_TIMEOUT or MP_INTERRUPTED, not locked. */
static int q_wait(lua_State *L, mp_queue *q, uint32_t *seq, uint32_t s, uint32_t *sleepers,
                  double until, double deadline, int *slept) {
  __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
  int named = mp_asleep_in(sleepers);  /* (a death asleep takes it off: entry_free) */
  q_unlock(q);
  int r = mp_futex_wait(L, seq, s, until);
  if (named) mp_awake();
  __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
  if (slept) *slept = r == MP_TIMEOUT;
  if (r == MP_INTERRUPTED) return r;
  return q_lock(L, q, deadline);
}

/* ------------------------------------------------ small plain values */

/* nil, booleans, numbers and strings of up to 255 bytes have short fixed
** encodings in the codec's format (docs/codec.md): put writes them and get
** reads them here, without the encoder's or decoder's setup (~550 and ~150
** instructions a message), with the format's names (codec.h). The first fast
** put or get of a process checks these functions against mp_encode and
** mp_decode, and a codec that encodes otherwise turns the fast path off
** (fast < 0), so a change there costs speed, never a wrong value. */
#define FAST_MAX (3 + 255)
static int fast;  /* 0: not checked yet; 1: on; -1: off */

/* the encoding of the value at idx into o, without the format byte: its length, or 0
** when it has none here */
static inline uint32_t fast_item(lua_State *L, int idx, char *o) {
  switch (lua_type(L, idx)) {
    case LUA_TNUMBER: {
      if (!lua_isinteger(L, idx)) {  /* (a float with an integral value stays a float) */
        lua_Number d = lua_tonumber(L, idx);
        o[0] = T_FLOAT; memcpy(o + 1, &d, 8); return 9;
      }
      lua_Integer v = lua_tointeger(L, idx);
      if (v >= INT8_MIN && v <= INT8_MAX) { int8_t x = (int8_t)v; o[0] = T_INT8; memcpy(o + 1, &x, 1); return 2; }
      if (v >= INT16_MIN && v <= INT16_MAX) { int16_t x = (int16_t)v; o[0] = T_INT16; memcpy(o + 1, &x, 2); return 3; }
      if (v >= INT32_MIN && v <= INT32_MAX) { int32_t x = (int32_t)v; o[0] = T_INT32; memcpy(o + 1, &x, 4); return 5; }
      int64_t x = (int64_t)v; o[0] = T_INT64; memcpy(o + 1, &x, 8); return 9;
    }
    case LUA_TSTRING: {
      size_t n;
      const char *p = lua_tolstring(L, idx, &n);
      if (n > 255) return 0;
      o[0] = T_STR8; o[1] = (char)n; memcpy(o + 2, p, n);
      return (uint32_t)n + 2;
    }
    case LUA_TBOOLEAN: o[0] = lua_toboolean(L, idx) ? T_TRUE : T_FALSE; return 1;
    case LUA_TNIL: o[0] = T_NIL; return 1;
    default: return 0;  /* (none: the slow path raises) */
  }
}

/* the encoding of the value at idx into o: its length, or 0 when it has none here */
static inline uint32_t fast_encode(lua_State *L, int idx, char *o) {
  o[0] = (char)FORMAT;
  uint32_t n = fast_item(L, idx, o + 1);
  return n ? n + 1 : 0;
}

/* the length of the item that s[0..n) starts with, as fast_item writes it, or 0 */
static inline uint32_t fast_item_len(const char *s, size_t n) {
  if (n < 1) return 0;
  uint32_t k;
  switch (s[0]) {
    case T_INT8: k = 2; break;
    case T_INT16: k = 3; break;
    case T_INT32: k = 5; break;
    case T_INT64: case T_FLOAT: k = 9; break;
    case T_STR8: k = n < 2 ? 0 : 2u + (unsigned char)s[1]; break;
    case T_NIL: case T_FALSE: case T_TRUE: k = 1; break;
    default: return 0;
  }
  return k <= n ? k : 0;
}

/* pushes the item s[0..k) (k: fast_item_len's, not 0) */
static inline void fast_push_item(lua_State *L, const char *s, uint32_t k) {
  switch (s[0]) {
    case T_INT8: lua_pushinteger(L, (int8_t)s[1]); break;
    case T_INT16: { int16_t v; memcpy(&v, s + 1, 2); lua_pushinteger(L, v); break; }
    case T_INT32: { int32_t v; memcpy(&v, s + 1, 4); lua_pushinteger(L, v); break; }
    case T_INT64: { int64_t v; memcpy(&v, s + 1, 8); lua_pushinteger(L, (lua_Integer)v); break; }
    case T_FLOAT: { double v; memcpy(&v, s + 1, 8); lua_pushnumber(L, v); break; }
    case T_STR8: lua_pushlstring(L, s + 2, k - 2); break;
    case T_NIL: lua_pushnil(L); break;
    default: lua_pushboolean(L, s[0] == T_TRUE); break;
  }
}

/* pushes the value s[0..n) encodes and returns 1, or returns 0 (mp_decode's) */
static inline int fast_decode(lua_State *L, const char *s, uint32_t n) {
  if (n < 2 || (unsigned char)s[0] != FORMAT) return 0;
  uint32_t k = fast_item_len(s + 1, n - 1);
  if (!k || k != n - 1) return 0;
  fast_push_item(L, s + 1, k);
  return 1;
}

/* ------------------------------------------------ small plain arrays */
/* A pool's call most often takes and returns a few plain values: an array of up to
** MP_FAST_ITEMS of them, in the codec's format as mp_encode writes such a table (T_TABLE,
** n items, no pairs), made and read here without the encoder's or decoder's setup. */

/* the items of an array whose header is at o: o[0 .. 10) is FORMAT, T_TABLE, n, 0 */
static void fast_array_header(char *o, uint32_t n) {
  uint32_t zero = 0;
  o[0] = (char)FORMAT;
  o[1] = T_TABLE;
  memcpy(o + 2, &n, 4);
  memcpy(o + 6, &zero, 4);
}

static uint32_t encode_array(lua_State *L, int idx, char *o) {
  if (lua_type(L, idx) != LUA_TTABLE) return 0;
  idx = lua_absindex(L, idx);
  if (lua_getmetatable(L, idx)) { lua_pop(L, 1); return 0; }
  uint32_t at = 10, n = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {  /* keys 1 .. n in order, and nothing else */
    uint32_t k = 0;
    if (n < MP_FAST_ITEMS && lua_isinteger(L, -2) && lua_tointeger(L, -2) == (lua_Integer)n + 1)
      k = fast_item(L, -1, o + at);
    lua_pop(L, 1);
    if (!k) { lua_pop(L, 1); return 0; }
    at += k;
    n++;
  }
  fast_array_header(o, n);
  return at;
}

static int decode_array_into(lua_State *L, const char *s, size_t n, int t, lua_Integer at) {
  uint32_t narr, npairs;
  if (n < 10 || (unsigned char)s[0] != FORMAT || s[1] != T_TABLE) return -1;
  memcpy(&narr, s + 2, 4);
  memcpy(&npairs, s + 6, 4);
  if (npairs || narr > MP_FAST_ITEMS) return -1;
  uint32_t len[MP_FAST_ITEMS];
  size_t p = 10;
  for (uint32_t i = 0; i < narr; i++) {  /* all of them first: nothing is written unless all are plain */
    len[i] = fast_item_len(s + p, n - p);
    if (!len[i]) return -1;
    p += len[i];
  }
  if (p != n) return -1;
  t = lua_absindex(L, t);
  p = 10;
  for (uint32_t i = 0; i < narr; i++) {
    fast_push_item(L, s + p, len[i]);
    lua_rawseti(L, t, at + (lua_Integer)i);
    p += len[i];
  }
  return (int)narr;
}

/* whether encode_array's bytes are mp_encode's, and the values read back, for a table of some of
** fast_check's values (at top + 2 ...) and for an empty one */
static int fast_check_arrays(lua_State *L, int top) {
  static const int at[MP_FAST_ITEMS] = { 2, 3, 4, 9, 20, 23, 30 };  /* false, true, 0, 300, 2^40, 1.5, "a\0c" */
  char o[MP_FAST_ARRAY], e2[MP_FAST_ARRAY];
  int ok = 1;
  for (int n = 0; ok && n <= MP_FAST_ITEMS; n += MP_FAST_ITEMS) {
    int base = lua_gettop(L);
    lua_createtable(L, n, 0);
    int t = base + 1;
    for (int k = 0; k < n; k++) { lua_pushvalue(L, top + at[k]); lua_rawseti(L, t, k + 1); }
    uint32_t len = encode_array(L, t, o);
    mp_enc *e = mp_encode(L, t, "value");
    ok = len && mp_enc_size(e) == len && !mp_enc_handles(e, &(const mp_sent *){ NULL });
    if (ok) { mp_enc_copy(e, e2); ok = !memcmp(o, e2, len); }
    mp_enc_done(L, e);
    lua_settop(L, t);
    lua_createtable(L, n, 0);
    ok = ok && decode_array_into(L, o, len, t + 1, 1) == n;
    for (int k = 1; ok && k <= n; k++) {
      lua_rawgeti(L, t, k);
      lua_rawgeti(L, t + 1, k);
      ok = lua_rawequal(L, -1, -2) && lua_type(L, -1) == lua_type(L, -2) && lua_isinteger(L, -1) == lua_isinteger(L, -2);
      lua_pop(L, 2);
    }
    lua_settop(L, base);
  }
  return ok;
}

/* whether fast_encode's bytes are mp_encode's and fast_decode reads them as mp_decode does */
static __attribute__((noinline)) int fast_check(lua_State *L) {
  /* (pushed from C: no Lua code runs, so no hook, such as a Ctrl-C's, is met here) */
  static const lua_Integer ints[] = { 0, -128, 127, 128, -129, 300, 32767, -32768, 32768, -32769, 40000,
                                      -40000, INT32_MAX, INT32_MIN, (lua_Integer)INT32_MAX + 1,
                                      (lua_Integer)INT32_MIN - 1, (lua_Integer)1 << 40,
                                      LUA_MININTEGER, LUA_MAXINTEGER };  /* (each width's edges) */
  static const lua_Number floats[] = { 1.5, -0.0, 3.0, 1e300, HUGE_VAL, -HUGE_VAL };
  int top = lua_gettop(L), ok = 1;
  luaL_checkstack(L, 40, NULL);
  lua_pushnil(L);
  lua_pushboolean(L, 0);
  lua_pushboolean(L, 1);
  for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) lua_pushinteger(L, ints[i]);
  for (size_t i = 0; i < sizeof floats / sizeof floats[0]; i++) lua_pushnumber(L, floats[i]);
  lua_pushliteral(L, "");
  lua_pushlstring(L, "a\0c", 3);
  char s255[255];
  memset(s255, 's', sizeof s255);
  lua_pushlstring(L, s255, sizeof s255);
  char o[FAST_MAX], e2[FAST_MAX];
  int last = lua_gettop(L);  /* (mp_encode leaves its encoder above) */
  for (int i = top + 1; ok && i <= last; i++) {
    uint32_t n = fast_encode(L, i, o);
    mp_enc *e = mp_encode(L, i, "value");
    ok = n && mp_enc_size(e) == n && !mp_enc_handles(e, &(const mp_sent *){ NULL });
    if (ok) { mp_enc_copy(e, e2); ok = !memcmp(o, e2, n); }
    mp_enc_done(L, e);
    if (!ok) break;
    int t = lua_gettop(L);
    mp_decode(L, o, n);
    ok = fast_decode(L, o, n) && lua_rawequal(L, -1, -2) && lua_type(L, -1) == lua_type(L, i) &&
         lua_isinteger(L, -1) == lua_isinteger(L, i) && lua_rawequal(L, -1, i);
    lua_settop(L, t);
  }
  if (ok) ok = fast_check_arrays(L, top);
  lua_settop(L, top);
  return ok ? 1 : -1;
}

static inline int fast_on(lua_State *L) {
  if (__builtin_expect(fast == 0, 0)) fast = fast_check(L);
  return fast > 0;
}

void mp_queue_fast_ready(lua_State *L) { fast_on(L); }

uint32_t mp_fast_encode_array(lua_State *L, int idx, char *o) {
  return fast_on(L) ? encode_array(L, idx, o) : 0;
}

uint32_t mp_fast_encode_values(lua_State *L, int first, int n, char *o) {
  if (!fast_on(L) || n < 0 || n > MP_FAST_ITEMS) return 0;
  uint32_t at = 10;
  for (int i = 0; i < n; i++) {
    uint32_t k = fast_item(L, first + i, o + at);
    if (!k) return 0;
    at += k;
  }
  fast_array_header(o, (uint32_t)n);
  return at;
}

int mp_fast_decode_into(lua_State *L, const char *s, size_t n, int t, lua_Integer at) {
  return fast > 0 ? decode_array_into(L, s, n, t, at) : -1;  /* (a put checked the fast path first) */
}

int mp_fast_decode(lua_State *L, const char *s, size_t n) {
  uint32_t narr;
  if (fast <= 0 || n < 10 || (unsigned char)s[0] != FORMAT || s[1] != T_TABLE) return 0;
  memcpy(&narr, s + 2, 4);
  if (narr > MP_FAST_ITEMS) return 0;
  lua_createtable(L, (int)narr, 0);
  if (decode_array_into(L, s, n, -1, 1) >= 0) return 1;
  lua_pop(L, 1);
  return 0;
}

/* ------------------------------------------------------------ internal API */

int mp_queue_put(lua_State *L, mp_queue *q, mp_enc *e, double deadline) {
  return mp_queue_put_prefixed(L, q, NULL, 0, e, deadline);
}

static int put_failed(mp_enc *e, uint64_t built, int r) {
  mp_enc_unsent(e);  /* nothing went out: its handles are not pinned */
  if (built) mp_free(built);  /* (held: a kill before this frees it too) */
  return r;
}

/* The block of a message with handles: its msgown (nothing counted yet), then
** pre and the encoding. Held by this process (0 when the arena is full). */
static uint64_t build_owned(mp_enc *e, const mp_sent *hl, size_t nh, const void *pre, size_t plen,
                            size_t n) {
  size_t skip = own_size(nh);
  uint64_t ext = mp_alloc_held(skip + n);
  if (!ext) return 0;
  msgown *mo = MP_PTR(ext);
  mo->n = (uint32_t)nh;
  mo->counted = 0;
  memcpy(mo->h, hl, nh * sizeof(mp_sent));
  if (plen) memcpy((char *)MP_PTR(ext) + skip, pre, plen);
  mp_enc_copy(e, (char *)MP_PTR(ext) + skip + plen);
  return ext;
}

/* Counts the references of the message whose block is ext, once it is in a
** WRITING record: `counted` follows each, so a settler releases those. */
static void count_owned(uint64_t ext) {
  msgown *mo = MP_PTR(ext);
  for (uint32_t i = 0; i < mo->n; i++) {
    mp_obj_count(mo->h[i].off);
    __atomic_store_n(&mo->counted, i + 1, __ATOMIC_SEQ_CST);
    ORDER();
    if (i == 0) fault_here(&put_fault);
  }
}

/* A put whose allocation failed: raises mp_oom_error's error (no room, or the allocator's lock
** not had by the deadline: "put timed out: ... held by stopped process N"), or, for a soft put
** (mp_queue_put_soft's), MP_TIMEOUT for the second (nothing was sent). */
static int put_oom(lua_State *L, size_t want, int soft) {
  if (soft && mp_alloc_gave_up()) return MP_TIMEOUT;
  return mp_oom_error(L, want);
}

/* Locks q for a put, once there is room (maxsize) and pacing lets it go on:
** MP_WOKE (locked), or MP_TIMEOUT, MP_INTERRUPTED, MP_SHUTDOWN (not locked). */
static int q_put_enter(lua_State *L, mp_queue *q, double deadline) {
  int r = pthread_mutex_trylock(&q->lock);
  if (__builtin_expect(r != 0, 0)) {  /* (q_lock's, with the deadline made absolute once: MP_AFTER) */
    if (r == EBUSY && deadline == MP_AFTER(0)) return MP_TIMEOUT;  /* a try (see mp.h) */
    deadline = mp_when(deadline);
    if ((r = q_lock_slow(L, q, deadline, r)) != MP_WOKE) return r;
  }
  if (__builtin_expect(stop_fault != 0, 0) && --stop_fault == 0) kill(getpid(), SIGSTOP);
  if (q->shut) { q_unlock(q); return MP_SHUTDOWN; }
  while (q->maxsize > 0 && q->count >= (uint64_t)q->maxsize) {
    uint32_t s = __atomic_load_n(&q->get_seq, __ATOMIC_SEQ_CST);
    deadline = mp_when(deadline);
    if (q->shut) { q_unlock(q); return MP_SHUTDOWN; }
    if (deadline >= 0 && mp_now() >= deadline) { q_unlock(q); return MP_TIMEOUT; }
    r = q_wait(L, q, &q->get_seq, s, &q->putters, deadline, deadline, NULL);
    if (r != MP_WOKE) return r;
  }
  /* Pacing: a writer far ahead of its readers would touch fresh pages for
  ** every message, which costs far more than the copy; while readers make
  ** progress, wait for them a little. Never blocks for long: a reader that
  ** does not take a message within PACE_WAIT turns pacing off until it does. */
  while (q->bytes > PACE_BYTES && !q->nopace) {
    int slept;
    uint32_t s = __atomic_load_n(&q->get_seq, __ATOMIC_SEQ_CST);
    deadline = mp_when(deadline);
    r = q_wait(L, q, &q->get_seq, s, &q->putters, mp_now() + PACE_WAIT, deadline, &slept);
    if (r != MP_WOKE) return r;
    if (slept) q->nopace = 1;
  }
  return MP_WOKE;
}

/* A small record was written at c->wpos (locked): it joins the queue, the lock goes. */
static void q_small_done(mp_queue *q, chunk *c, uint32_t rec, uint32_t n) {
  q_commit_append(q, c, rec);
  q->count++;
  q->bytes += n;
  q_wake_getters_locked(q);
  q_unlock(q);
}

/* put of a message without handles: plen bytes of pre, then s[0..n), plen + n < BIGMSG
** (fast_encode's, mp_fast_encode_array's) */
static inline __attribute__((always_inline)) int q_put_small(lua_State *L, mp_queue *q, const void *pre, uint32_t plen, const char *s, uint32_t n,
                       double deadline, int soft) {
  mp_alloc_context(L, deadline);
  int r = q_put_enter(L, q, deadline);
  if (r != MP_WOKE) return r;
  uint32_t len = plen + n, rec = (4 + len + 7) & ~7u;
  chunk *c = q_room(q, rec);
  if (!c) { q_unlock(q); return put_oom(L, sizeof(chunk) + rec, soft); }
  char *p = c->data + c->wpos;
  memcpy(p, &len, 4);
  if (plen) memcpy(p + 4, pre, plen);
  memcpy(p + 4 + plen, s, n);
  q_small_done(q, c, rec, len);
  return MP_WOKE;
}

int mp_queue_put_small(lua_State *L, mp_queue *q, const void *pre, size_t plen, const char *s, size_t n,
                       double deadline, int soft) {
  return q_put_small(L, q, pre, (uint32_t)plen, s, (uint32_t)n, deadline, soft);
}

static int put_prefixed(lua_State *L, mp_queue *q, const void *pre, size_t plen, mp_enc *e, double deadline,
                        int soft) {
  const mp_sent *hl;
  size_t nh = mp_enc_handles(e, &hl);
  size_t n = plen + mp_enc_size(e);
  int big = n >= BIGMSG || nh;
  pid_t me = big ? mp_getpid() : 0;
  mp_alloc_context(L, deadline);  /* the allocator's lock wait ends at our deadline, or on Ctrl-C */
  /* A short message with handles is built in its block first, and goes in
  ** whole under the lock: a reader never waits for it to be published. */
  uint64_t built = 0;
  if (nh && n < BIGMSG && !(built = build_owned(e, hl, nh, pre, plen, n))) {
    mp_enc_unsent(e);
    return put_oom(L, own_size(nh) + n, soft);
  }
  int r = q_put_enter(L, q, deadline);
  if (r != MP_WOKE) return put_failed(e, built, r);
  uint32_t rec = big ? BIGREC : (uint32_t)((4 + n + 7) & ~(size_t)7);
  chunk *c = q_room(q, rec);
  if (!c) { q_unlock(q); put_failed(e, built, 0); return put_oom(L, sizeof(chunk) + rec, soft); }
  char *p = c->data + c->wpos;
  if (built) {  /* in WRITING while its references are counted, READY before the lock goes */
    bigrec *b = (bigrec *)p;
    b->pid = (uint32_t)me;
    b->off = built;
    b->n = n | OWNS;
    b->tag = BIG_WRITING;
    q_commit_append(q, c, rec);
    HAND_STEP();
    mp_hand(built, OFF(b));  /* the record's from here on (see Records), nothing counted yet */
    HAND_STEP();
    mp_unhold(built);
    HAND_STEP();
    q->count++;
    q->bytes += n;
    count_owned(built);
    mp_enc_own(e);
    __atomic_store_n(&b->tag, BIG_READY, __ATOMIC_SEQ_CST);
    q_wake_getters(q);
    q_unlock(q);
    return MP_WOKE;
  }
  if (!big) {  /* copied under the lock: a few instructions */
    uint32_t len = (uint32_t)n;
    memcpy(p, &len, 4);
    if (plen) memcpy(p + 4, pre, plen);
    mp_enc_copy(e, p + 4 + plen);
    q_small_done(q, c, rec, len);
    return MP_WOKE;
  }
  /* Big: reserve a record that names us; allocate, copy with the lock released; publish. */
  bigrec *b = (bigrec *)p;
  b->pid = (uint32_t)me;
  b->off = 0;
  b->n = n | (nh ? OWNS : 0);
  b->tag = BIG_WRITING;
  q_commit_append(q, c, rec);
  q->count++;
  q->bytes += n;
  q_unlock(q);
  if (publish_pause > 0) { usleep((useconds_t)(publish_pause * 1e6)); publish_pause = 0; }
  size_t skip = own_size(nh);
  uint64_t ext = mp_alloc_held(skip + n);  /* ours until published: freed if we die copying */
  if (!ext) {  /* the reservation goes (if we cannot lock, it is settled once we exit) */
    if (q_lock(L, q, -1) == MP_WOKE) {
      uint32_t k = 0;
      lg32(q, &k, &b->tag, BIG_TAKEN);
      if (q->joinable && q->unfinished) lg(q, &k, &q->unfinished, q->unfinished - 1);
      log_commit(q, k);
      q->count--;
      q->bytes -= n;
      q_tidy(q);
      q_wake_putters(q);
      q_unlock(q);
    }
    mp_enc_unsent(e);
    return put_oom(L, skip + n, soft);
  }
  msgown *mo = nh ? MP_PTR(ext) : NULL;
  if (mo) {
    mo->n = (uint32_t)nh;
    mo->counted = 0;
    memcpy(mo->h, hl, nh * sizeof(mp_sent));
  }
  if (plen) memcpy((char *)MP_PTR(ext) + skip, pre, plen);
  mp_enc_copy(e, (char *)MP_PTR(ext) + skip + plen);
  /* The block passes from this process to the record: the record names it,
  ** then owns it from mp_hand's one store (a settler of the record frees it
  ** from then on, the process's death before), then the hold slot goes. */
  __atomic_store_n(&b->off, ext, __ATOMIC_RELEASE);
  HAND_STEP();
  mp_hand(ext, OFF(b));
  HAND_STEP();
  mp_unhold(ext);
  HAND_STEP();
  if (mo) {  /* the message's references */
    count_owned(ext);
    mp_enc_own(e);
  }
  __atomic_store_n(&b->tag, BIG_READY, __ATOMIC_SEQ_CST);  /* published */
  q_wake_getters(q);
  return MP_WOKE;
}

int mp_queue_put_prefixed(lua_State *L, mp_queue *q, const void *pre, size_t plen, mp_enc *e, double deadline) {
  return put_prefixed(L, q, pre, plen, e, deadline, 0);
}

int mp_queue_put_soft(lua_State *L, mp_queue *q, const void *pre, size_t plen, mp_enc *e, double deadline) {
  return put_prefixed(L, q, pre, plen, e, deadline, 1);
}

typedef struct extmsg { uint64_t off; size_t n; mp_decoder decode; } extmsg;

static int decode_ext(lua_State *L) {
  extmsg *m = lua_touserdata(L, 1);
  m->decode(L, MP_PTR(m->off), m->n);
  return 1;
}

static int q_get_fast(lua_State *L, mp_queue *q, mp_buf *buf, double deadline);
static int q_get_many(lua_State *L, mp_queue *q, mp_buf *buf, double deadline, mp_claim *claim,
                      int maxk, uint64_t keep, int *count, mp_decoder decode, int locked);
enum { NOT_FAST = -1, NOT_FAST_LOCKED = -2 };

int mp_queue_get(lua_State *L, mp_queue *q, mp_buf *buf, double deadline) {
  int n, r = q_get_fast(L, q, buf, deadline);
  if (r >= 0) return r;
  return q_get_many(L, q, buf, deadline, NULL, 1, 0, &n, NULL, r == NOT_FAST_LOCKED);
}

/* get of the first message when it is small and in order, the common case:
** get_many's work for it, less the batch. Returns as mp_queue_get, or
** NOT_FAST (not locked: the queue looked empty) or NOT_FAST_LOCKED (locked:
** the message is big, or taken, or the queue is shut: get_many goes on). */
static inline __attribute__((always_inline)) int q_get_fast(lua_State *L, mp_queue *q, mp_buf *buf, double deadline) {
  if (!__atomic_load_n(&q->count, __ATOMIC_ACQUIRE)) return NOT_FAST;  /* (get_many waits) */
  if (buf->cap < BIGMSG + 8) mp_buf_reserve(L, buf, BIGMSG + 8);  /* nothing may raise under the lock */
  int r = q_lock(L, q, deadline);
  if (r != MP_WOKE) return r;
  chunk *c = q->head ? CH(q->head) : NULL;
  uint32_t at = c ? c->rpos : 0, t = c && at < c->wpos ? tag_of(c->data + at) : UINT32_MAX;
  if (t >= TAKEN_BIT || q->shut == SHUT_NOW) return NOT_FAST_LOCKED;  /* (big, taken, none) */
  char few[FAST_MAX], *o = t <= FAST_MAX ? few : buf->p;
  memcpy(o, c->data + at + 4, t);
  uint32_t r2 = at + rec_size(t);
  while (r2 < c->wpos && IS_GONE(tag_of(c->data + r2))) r2 += rec_size(tag_of(c->data + r2));
  ORDER();  /* one store is the whole change */
  if (r2 == c->wpos && q->head == q->tail) reset_word(c); else __atomic_store_n(&c->rpos, r2, __ATOMIC_RELEASE);
  ORDER();
  q->count--;
  q->bytes -= t;
  if (q->nopace) q->nopace = 0;
  q_wake_putters_locked(q);
  q_unlock(q);
  if (fast <= 0 || !fast_decode(L, o, t)) mp_decode(L, o, t);  /* (fast == 0: a C caller that never ran fast_on) */
  return MP_WOKE;
}

int mp_queue_settle(lua_State *L, mp_queue *q, double deadline) {
  int r = q_lock(L, q, deadline);
  if (r == MP_WOKE) q_unlock(q);
  return r;
}

/* adds the claim of messages taken+1 .. taken+n to a logged change */
static void lg_claim(mp_queue *q, uint32_t *k, mp_claim *claim, uint64_t n) {
  lg(q, k, &q->taken, q->taken + n);
  lgd(q, k, &claim->start, mp_now());
  lg(q, k, &claim->first, q->taken + 1);
  lg(q, k, &claim->seq, q->taken + n);
}

int mp_queue_get_many(lua_State *L, mp_queue *q, mp_buf *buf, double deadline, mp_claim *claim,
                      int maxk, uint64_t keep, int *count, mp_decoder decode) {
  return q_get_many(L, q, buf, deadline, claim, maxk, keep, count, decode, 0);
}

/* locked: q_get_fast left the queue locked */
static int q_get_many(lua_State *L, mp_queue *q, mp_buf *buf, double deadline, mp_claim *claim,
                      int maxk, uint64_t keep, int *count, mp_decoder decode, int locked) {
  *count = 0;
  int plain = !decode && fast > 0;  /* (a queue's get ran fast_on before) */
  if (!decode) decode = mp_decode;
  buf->n = 0;
  if (!locked) {
    for (int spin = 0; spin < SPIN && !__atomic_load_n(&q->count, __ATOMIC_ACQUIRE) && deadline != 0; spin++)
      if (spin > 20) sched_yield();
    if (buf->cap < BIGMSG + 8) mp_buf_reserve(L, buf, BIGMSG + 8);  /* nothing may raise under the lock */
    int r = q_lock(L, q, deadline);
    if (r != MP_WOKE) return r;
  }
  int r;
  chunk *c;
  uint32_t at;
  for (;;) {
    uint32_t s = __atomic_load_n(&q->put_seq, __ATOMIC_SEQ_CST);  /* before looking: publish needs no lock */
    int busy = 0;
    if (q->shut == SHUT_NOW) { q_unlock(q); return MP_SHUTDOWN; }
    if (q->head) {
      c = CH(q->head);  /* the common case: the first record is there to take */
      if (c->rpos < c->wpos && IS_OPEN(tag_of(c->data + c->rpos))) { at = c->rpos; break; }
      q_tidy(q);
      if (q_find(q, &c, &at, &busy)) break;
    }
    if (busy && q_settle_dead(q)) continue;
    if (q->shut && !busy) { q_unlock(q); return MP_SHUTDOWN; }  /* drained: nothing more will come */
    double now = -1;
    if (deadline >= 0 && (now = mp_now()) >= deadline) { q_unlock(q); return MP_TIMEOUT; }
    double until = deadline;
    if (busy) {  /* nobody wakes us if they die: look again now and then */
      double again = (now >= 0 ? now : mp_now()) + RECHECK;
      if (until < 0 || until > again) until = again;
    }
    r = q_wait(L, q, &q->put_seq, s, &q->getters, until, deadline, NULL);
    if (r != MP_WOKE) return r;
  }
  char *p = c->data + at;
  uint32_t t = tag_of(p), k = 0;
  if (t == BIG_READY) {  /* decoded in place, outside the lock */
    bigrec *b = (bigrec *)p;
    struct { uint32_t tag, pid; } w = { claim ? BIG_CLAIMED : BIG_READING, (uint32_t)mp_getpid() };
    uint64_t word;
    memcpy(&word, &w, 8);
    if (claim) {
      lg(q, &k, b, word);  /* tag and pid: one word */
      lg_claim(q, &k, claim, 1);
      log_commit(q, k);
    } else {
      __atomic_store_n((uint64_t *)(void *)b, word, __ATOMIC_RELEASE);
    }
    q->count--;
    q->bytes -= big_len(b);
    if (q->nopace) q->nopace = 0;
    q_wake_putters(q);
    q_unlock(q);
    uint64_t block = b->off;
    msgown *mo = b->n & OWNS ? MP_PTR(block) : NULL;
    uint64_t few[8], *offs = NULL;
    mp_adopt ad = { NULL, 0 }, *prev = NULL;
    if (mo) {  /* the decoded handles take the message's references */
      offs = mo->n <= 8 ? few : malloc(mo->n * sizeof(uint64_t));
      if (offs) {  /* (without memory, they count their own and the message's all go) */
        for (uint32_t i = 0; i < mo->n; i++) offs[i] = mo->h[i].off;
        ad.offs = offs;
        ad.n = mo->n;
      }
      prev = mp_obj_adopt(&ad);
    }
    lua_pushcfunction(L, decode_ext);
    extmsg m = { block + own_size(mo ? mo->n : 0), (size_t)big_len(b), decode };
    lua_pushlightuserdata(L, &m);
    int st = lua_pcall(L, 1, 1, 0);
    if (mo) {
      mp_obj_adopt(prev);
      fault_here(&get_fault);
    }
    /* done, whatever the decoding did: the block is taken from the record
    ** (mp_hold: a kill from here frees it with us, and the record, READING,
    ** is settled as TAKEN), the record marked taken, the block freed */
    mp_hold(block);
    HAND_STEP();
    __atomic_store_n(&b->tag, BIG_TAKEN, __ATOMIC_SEQ_CST);
    ORDER();
    HAND_STEP();
    if (mo) {
      own_settle(mo, offs);
      if (offs != few) free(offs);
    }
    mp_free(block);
    HAND_STEP();
    if (st != LUA_OK) lua_error(L);
    *count = 1;
    return MP_WOKE;
  }
  /* small messages: copied into buf as [u32 len][bytes]... */
  int n = 0;
  uint64_t bytes = 0;
  if (c == CH(q->head) && at == c->rpos) {  /* in order: a batch, then the read position moves */
    uint32_t r2 = at;
    do {
      uint32_t len = t;
      memcpy(buf->p + buf->n, &len, 4);
      memcpy(buf->p + buf->n + 4, p + 4, len);
      buf->n += 4 + (size_t)len;
      bytes += len;
      n++;
      r2 += rec_size(t);
      if (r2 >= c->wpos || n >= maxk || q->count - (uint64_t)n <= keep) break;
      p = c->data + r2;
      t = tag_of(p);
    } while (!IS_BIG(t) && !(t & TAKEN_BIT) && buf->n + 4 + t <= buf->cap);
    while (r2 < c->wpos && IS_GONE(tag_of(c->data + r2))) r2 += rec_size(tag_of(c->data + r2));
    int reset = r2 == c->wpos && q->head == q->tail;  /* drained: reuse in place */
    if (claim) {
      if (reset) lg(q, &k, &c->wpos, 0); else lg32(q, &k, &c->rpos, r2);
    } else {  /* no claim: one store is the whole change */
      ORDER();
      if (reset) reset_word(c); else __atomic_store_n(&c->rpos, r2, __ATOMIC_RELEASE);
      ORDER();
    }
  } else {  /* behind a record still in work: this one only, marked taken */
    memcpy(buf->p, &t, 4);
    memcpy(buf->p + 4, p + 4, t);
    buf->n = 4 + (size_t)t;
    bytes = t;
    n = 1;
    if (claim) lg32(q, &k, (uint32_t *)p, t | TAKEN_BIT);
    else __atomic_store_n((uint32_t *)p, t | TAKEN_BIT, __ATOMIC_RELEASE);
  }
  if (claim) {
    lg_claim(q, &k, claim, (uint64_t)n);
    log_commit(q, k);
  }
  q->count -= (uint64_t)n;
  q->bytes -= bytes;
  if (q->nopace) q->nopace = 0;
  q_wake_putters_locked(q);
  q_unlock(q);
  luaL_checkstack(L, n, "too many messages");
  size_t pos = 0;
  for (int i = 0; i < n; i++) {
    uint32_t len;
    memcpy(&len, buf->p + pos, 4);
    if (!plain || !fast_decode(L, buf->p + pos + 4, len)) decode(L, buf->p + pos + 4, len);
    pos += 4 + (size_t)len;
  }
  *count = n;
  return MP_WOKE;
}

/* ---------------------------------------------------------------- handles */

typedef struct qhandle {
  mp_handle h;
  uint64_t magic;  /* q_word(this handle) + the class (QK_*): set where the userdata is made */
  mp_buf buf;      /* receive buffer, local to this process */
  mp_qlean lean;   /* a pool's task queue, in its owner: see queue.h */
} qhandle;

/* The self check of the hot calls (put, get, and pool.c's mp_queue_check, twice
** a task) reads a word that only this file writes, in a userdata of the
** qhandle's size: ~80 instructions, against ~410 for mp_checkopen's
** metatable comparison. The word is a keyed mix of the handle's own address
** (the key drawn from getrandom once per process family, forked children
** inheriting it with their handles): a constant word was not enough, as C code
** does write a userdata's bytes from Lua values (an Array's elements while they
** are checked, which debug.getlocal can reach as a C temporary), and such a
** userdata of the same size then passed as a queue with any offset. Lua code
** never reads a userdata's bytes, so it cannot learn the word of any address.
** Anything else takes mp_checkopen's path, whose errors name the user's call
** ("bad argument #1 to 'put' (Queue or JoinableQueue or SimpleQueue expected,
** got FILE*)"), or "attempt to use a closed Queue". */
static uint64_t qkey;
enum { QK_QUEUE, QK_JOINABLE, QK_SIMPLE };  /* the order of QUEUES */

static inline uint64_t q_word(const qhandle *qh) {
  uint64_t x = ((uint64_t)(uintptr_t)qh ^ qkey) * 0x9e3779b97f4a7c15u;
  return x ^ (x >> 29);
}

static void q_makekey(void) {
  uint64_t k = 0, zero = 0;
  while (!k) {
    ssize_t r = getrandom(&k, sizeof k, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r != (ssize_t)sizeof k) abort();  /* no entropy source: nothing safe to fall back on */
  }
  __atomic_compare_exchange_n(&qkey, &zero, k, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  /* (two states at once: one key) */
}

/* every method, close and __gc included, checks its self (mp.h's self checks) */
#define QUEUES MP_CLASSES(QUEUE, JOINABLEQUEUE, SIMPLEQUEUE)

static inline qhandle *q_mine(lua_State *L, int idx) {
  qhandle *qh = lua_touserdata(L, idx);
  return qh && lua_rawlen(L, idx) == sizeof(qhandle) ? qh : NULL;
}

static inline int q_genuine(const qhandle *qh) { return qh->magic - q_word(qh) <= QK_SIMPLE; }

static void q_forged(lua_State *L, int idx) {
  luaL_argerror(L, idx, "Queue expected, got another userdata with a queue's metatable");
}

/* the slow path: mp_checkopen's errors; then the word, for a userdata that was
** given a queue's metatable by debug.setmetatable */
static __attribute__((noinline)) qhandle *q_checkslow(lua_State *L, int idx, const char *const *names) {
  mp_checkopen(L, idx, names);
  qhandle *qh = q_mine(L, idx);
  if (!qh || !q_genuine(qh)) q_forged(L, idx);
  return qh;
}

static inline qhandle *q_check(lua_State *L, int idx) {
  qhandle *qh = q_mine(L, idx);
  if (qh && q_genuine(qh) && qh->h.off) return qh;
  return q_checkslow(L, idx, QUEUES);
}

/* the userdata, closed or not (close, __gc, __tostring) */
static qhandle *q_self(lua_State *L, int idx) {
  qhandle *qh = mp_toself(L, idx, QUEUES);
  if (lua_rawlen(L, idx) != sizeof(qhandle) || !q_genuine(qh)) q_forged(L, idx);
  return qh;
}

#define QOF(qh) ((mp_queue *)MP_PTR((qh)->h.off))

mp_queue *mp_queue_check(lua_State *L, int idx, mp_buf **buf) {
  qhandle *qh = q_mine(L, idx);
  if (!qh || qh->magic != q_word(qh) + QK_QUEUE || !qh->h.off) qh = q_checkslow(L, idx, MP_CLASSES(QUEUE));
  *buf = &qh->buf;
  return QOF(qh);
}

mp_queue *mp_queue_lean(lua_State *L, int idx, mp_buf **buf, mp_qlean **lean) {
  qhandle *qh = q_mine(L, idx);
  if (!qh || qh->magic != q_word(qh) + QK_QUEUE || !qh->h.off) qh = q_checkslow(L, idx, MP_CLASSES(QUEUE));
  *buf = &qh->buf;
  *lean = &qh->lean;
  return QOF(qh);
}

static int q_kind(const char *tname) {
  return !strcmp(tname, QUEUE) ? QK_QUEUE : !strcmp(tname, JOINABLEQUEUE) ? QK_JOINABLE : QK_SIMPLE;
}

static qhandle *q_push(lua_State *L, uint64_t off, const char *tname) {
  qhandle *qh = lua_newuserdatauv(L, sizeof(qhandle), 0);
  memset(qh, 0, sizeof(*qh));
  luaL_setmetatable(L, tname);
  qh->magic = q_word(qh) + (uint64_t)q_kind(tname);
  qh->h.off = off;
  qh->h.pid = mp_getpid();
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
  qh->h.pid = mp_getpid();
  return 1;
}

/* core._queue_reserve(q): makes q's receive buffer now. A pool reserves its task
** queue's before forking its workers: each inherits it instead of allocating it
** on its first task (a malloc in a fresh child writes the parent's heap pages,
** each a copy-on-write fault: ~4.5 of them a worker). It is made at the size a
** receive needs, not rounded up to 64 KB as mp_buf_reserve would: the parent never
** reads it, and a free of 64 KB is glibc's threshold for consolidating its fast
** bins. Freed at the pool's join, it left a hole that the frees of lua_close at
** exit merged into, and malloc then consolidated every small chunk lua_close had
** freed: 0.15M instructions for a script that maps two items, 3M with 20,000
** tables in its heap. */
static int queue_reserve(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  if (qh->buf.cap < BIGMSG + 8 && !mp_buf_resize(L, &qh->buf, BIGMSG + 8))
    return luaL_error(L, "not enough memory for a queue's receive buffer");
  return 0;
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
  char o[FAST_MAX];
  uint32_t n;
  int r;
  if (fast_on(L) && (n = fast_encode(L, 2, o))) {
    r = q_put_small(L, QOF(qh), NULL, 0, o, n, deadline, 0);
  } else {
    luaL_checkany(L, 2);
    mp_enc *e = mp_encode(L, 2, "value");
    r = mp_queue_put(L, QOF(qh), e, deadline);
    mp_enc_done(L, e);
  }
  if (r == MP_WOKE) { lua_pushboolean(L, 1); return 1; }
  lua_pushnil(L);
  lua_pushstring(L, r == MP_TIMEOUT ? "full" : r == MP_SHUTDOWN ? "shutdown" : "interrupted");
  return 2;
}

/* q:shutdown([immediate]): puts end with nil, "shutdown" from now on; gets take what is
** left, then return nil, "shutdown" (immediate: at once, and join() returns). Every
** process waiting on the queue is woken. */
static int queue_shutdown(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  int now = lua_toboolean(L, 2);
  mp_queue *q = QOF(qh);
  int r = q_lock(L, q, -1);
  if (r != MP_WOKE) return mp_waitresult(L, r);
  if (q->shut != SHUT_NOW) q->shut = now ? SHUT_NOW : SHUT_DRAIN;
  if (now) q->unfinished = 0;
  __atomic_add_fetch(&q->put_seq, 1, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&q->get_seq, 1, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&q->done_seq, 1, __ATOMIC_SEQ_CST);
  q_unlock(q);
  mp_futex_wake(&q->put_seq, INT32_MAX);
  mp_futex_wake(&q->get_seq, INT32_MAX);
  mp_futex_wake(&q->done_seq, INT32_MAX);
  lua_pushboolean(L, 1);
  return 1;
}

static int queue_is_shutdown(lua_State *L) {
  lua_pushboolean(L, QOF(q_check(L, 1))->shut != SHUT_NONE);
  return 1;
}

static int queue_put(lua_State *L) {
  return q_doput(L, lua_gettop(L) < 3 || lua_isnil(L, 3) ? -1 : put_deadline(L, 3));
}
static int queue_put_nowait(lua_State *L) { return q_doput(L, 0); }

static int q_doget(lua_State *L, double deadline, const char *why) {
  qhandle *qh = q_check(L, 1);
  fast_on(L);  /* (before the take: its check may raise) */
  int r = mp_queue_get(L, QOF(qh), &qh->buf, deadline);
  if (r == MP_WOKE) {
    if (qh->buf.cap > (1u << 16)) mp_buf_free(L, &qh->buf);
    return 1;
  }
  lua_pushnil(L);
  lua_pushstring(L, r == MP_TIMEOUT ? why : r == MP_SHUTDOWN ? "shutdown" : "interrupted");
  return 2;
}

static int queue_get(lua_State *L) {
  double deadline = lua_gettop(L) < 2 || lua_isnil(L, 2) ? -1 : put_deadline(L, 2);
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

/* task_done() -> nothing | nil, "interrupted" (while waiting for the queue's lock) */
static int queue_task_done(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  mp_queue *q = QOF(qh);
  int r = q_lock(L, q, -1);
  if (r != MP_WOKE) return mp_waitresult(L, r);
  if (q->unfinished == 0) { q_unlock(q); return luaL_error(L, "task_done() called too many times"); }
  __atomic_store_n(&q->unfinished, q->unfinished - 1, __ATOMIC_RELEASE);  /* one store */
  if (q->unfinished == 0) {
    __atomic_add_fetch(&q->done_seq, 1, __ATOMIC_SEQ_CST);
    mp_futex_wake(&q->done_seq, 0x7fffffff);
  }
  q_unlock(q);
  return 0;
}

/* join([timeout]) -> true | nil, "timeout" | nil, "interrupted" */
static int queue_join(lua_State *L) {
  qhandle *qh = q_check(L, 1);
  mp_queue *q = QOF(qh);
  double deadline = mp_deadline(L, 2);
  uint32_t sleepers = 0;  /* task_done always wakes */
  int r = q_lock(L, q, deadline);
  if (r != MP_WOKE) return mp_waitresult(L, r);
  while (q->unfinished > 0) {
    uint32_t s = __atomic_load_n(&q->done_seq, __ATOMIC_SEQ_CST);
    if (deadline >= 0 && mp_now() >= deadline) { q_unlock(q); return mp_waitresult(L, MP_TIMEOUT); }
    r = q_wait(L, q, &q->done_seq, s, &sleepers, deadline, deadline, NULL);
    if (r != MP_WOKE) return mp_waitresult(L, r);
  }
  q_unlock(q);
  lua_pushboolean(L, 1);
  return 1;
}

static int queue_close(lua_State *L) {
  qhandle *qh = q_self(L, 1);
  if (qh->h.off) {
    uint64_t off = qh->h.off;
    qh->h.off = 0;
    mp_obj_release_with(off, qh->h.pid, q_dtor);
  }
  mp_buf_free(L, &qh->buf);
  return 0;
}

static int queue_fault(lua_State *L) {
  static const char *const where[] = { "put", "get", "hand", "stop", "chunk", NULL };
  int w = luaL_checkoption(L, 1, NULL, where);
  int n = (int)luaL_checkinteger(L, 2);
  if (w == 0) put_fault = n; else if (w == 1) get_fault = n; else if (w == 2) hand_fault = n;
  else if (w == 3) stop_fault = n; else chunk_fault = n;
  return 0;
}

static int queue_pause(lua_State *L) {
  static const char *const where[] = { "publish", "settle", NULL };
  int w = luaL_checkoption(L, 1, NULL, where);
  double secs = luaL_checknumber(L, 2);
  if (w == 0) publish_pause = secs; else settle_pause = secs;
  return 0;
}

/* core._queue_sleepers(q) -> the processes counted asleep in its gets, and in its puts (tests) */
static int queue_sleepers(lua_State *L) {
  mp_queue *q = QOF(q_check(L, 1));
  lua_pushinteger(L, __atomic_load_n(&q->getters, __ATOMIC_SEQ_CST));
  lua_pushinteger(L, __atomic_load_n(&q->putters, __ATOMIC_SEQ_CST));
  return 2;
}

/* core._queue_fast() -> whether this process's puts and gets of small plain values
** take the fast path (the codec's format matched fast_encode's), for tests */
static int queue_fast(lua_State *L) {
  lua_pushboolean(L, fast_on(L));
  return 1;
}

static int queue_tostring(lua_State *L) {
  qhandle *qh = q_self(L, 1);
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "__name");
  const char *name = lua_tostring(L, -1);
  if (!qh->h.off) lua_pushfstring(L, "%s (closed)", name);
  else lua_pushfstring(L, "%s (%I items) %p", name, (lua_Integer)QOF(qh)->count, (void *)qh);
  return 1;
}

/* Lua calls __eq for io.stdout == q too: a side that is no queue is unequal */
static int queue_eq(lua_State *L) {
  qhandle *a = NULL, *b = NULL;
  for (int i = 0; QUEUES[i]; i++) {
    if (!a) a = luaL_testudata(L, 1, QUEUES[i]);
    if (!b) b = luaL_testudata(L, 2, QUEUES[i]);
  }
  lua_pushboolean(L, a && b && a->h.off && a->h.off == b->h.off);
  return 1;
}

/* ------------------------------------------------------------- the codec */

static void queue_decode(lua_State *L, const unsigned char *payload, size_t n, const char *tname) {
  qhandle *qh = (qhandle *)mp_handle_attach(L, payload, n, 0x51, tname, sizeof(qhandle), 0);
  qh->magic = q_word(qh) + (uint64_t)q_kind(tname);
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
    {"shutdown", queue_shutdown}, {"is_shutdown", queue_is_shutdown},
    {NULL, NULL}
  };
  static const luaL_Reg meta[] = {
    {"__gc", queue_close}, {"__close", queue_close}, {"__tostring", queue_tostring},
    {"__eq", queue_eq}, {NULL, NULL}
  };
  const char *names[] = { QUEUE, SIMPLEQUEUE, JOINABLEQUEUE };
  for (int i = 0; i < 3; i++) {
    mp_newmetatable(L, names[i], mp_nregs(meta) + 1);  /* (+ __index) */
    luaL_setfuncs(L, meta, 0);
    lua_pop(L, 1);
  }
  for (int i = 0; i < 3; i++) {
    luaL_getmetatable(L, names[i]);
    lua_createtable(L, 0, mp_nregs(common));
    luaL_setfuncs(L, common, 0);
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
  if (!__atomic_load_n(&qkey, __ATOMIC_SEQ_CST)) q_makekey();
  mp_obj_set_dtor(0x51, q_dtor);  /* what a message's release of a queue needs */
  mp_codec_register(&t_queue);
  mp_codec_register(&t_simple);
  mp_codec_register(&t_joinable);
  static const luaL_Reg funcs[] = {
    {"Queue", queue_new}, {"SimpleQueue", simple_new}, {"JoinableQueue", joinable_new},
    {"_queue_fault", queue_fault}, {"_queue_pause", queue_pause}, {"_queue_fast", queue_fast},
    {"_queue_sleepers", queue_sleepers},
    {"_queue_reserve", queue_reserve},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
