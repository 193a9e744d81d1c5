/* queue.h: the shared queue, for the C parts that move messages (Queue, Pool). */
#ifndef MP_QUEUE_H
#define MP_QUEUE_H

#include "mp.h"

#pragma GCC visibility push(hidden)

/* A queue is a list of chunks in the arena holding records: a small message is
** copied into its record; a big one gets a block of its own, reserved under the
** lock, copied with the lock released and published with one store; a reader
** decodes it in place, also outside the lock. put never blocks unless maxsize
** is set; sleepers wait on sequence counters and are woken only when someone
** sleeps, so no system call is made otherwise.
**
** Kills. Every change made under the lock survives a SIGKILL at any instruction:
** a change of more than one word is first written to the queue's redo log (the
** words to store and their values), committed by storing the log's length, then
** applied; whoever next takes the lock and finds its owner dead applies a
** committed log again (the stores are idempotent) and recounts what is derived
** (count, bytes, tail). A take and the claim of its taker are one logged change.
** Records that a process left half written or half read are settled by a reader
** that finds their process gone (see queue.c and docs/queue.md). */
#define MP_QLOG 8
typedef struct mp_qlog {
  uint32_t n, pad;                          /* entries to apply; 0: nothing pending */
  struct { uint64_t at, val; } w[MP_QLOG];  /* arena offset (| 1: a 32-bit word), value */
} mp_qlog;

typedef struct mp_queue {
  mp_obj h;
  /* what every put and get writes, beside the lock: one or two cache lines
  ** move between the processes per message, not five */
  uint64_t count;              /* messages that a reader may still take (derived) */
  uint64_t bytes;              /* their encoded size (derived) */
  uint32_t put_seq, get_seq;
  pthread_mutex_t lock;
  uint32_t getters, putters;   /* processes sleeping in get / put (atomic) */
  uint64_t head, tail;         /* chunks (tail: derived from head) */
  uint32_t shut;               /* Queue:shutdown(): SHUT_DRAIN, or SHUT_NOW (immediate) */
  uint32_t nopace;             /* a pacing wait timed out: no pacing until the next get */
  int64_t maxsize;             /* 0: unbounded */
  uint32_t joinable;
  uint32_t chunkcap;           /* capacity of the next chunk: grows to CHUNK */
  uint64_t spare;              /* a drained chunk kept for the next */
  uint64_t taken;              /* messages taken with a claim: the number of the last one */
  uint64_t unfinished;         /* JoinableQueue: puts not yet task_done */
  uint32_t done_seq, pad;
  uint64_t loose;              /* a chunk of the queue's outside its list, on its way in (q_room)
                               ** or out (q_tidy); 0 when none: see q_settle_loose */
  mp_qlog log;
} mp_queue;

/* Queue:shutdown (Python 3.13's): puts end with MP_SHUTDOWN at once; gets take what is
** left, then end with MP_SHUTDOWN (SHUT_DRAIN), or end at once (SHUT_NOW). */
enum { SHUT_NONE = 0, SHUT_DRAIN = 1, SHUT_NOW = 2 };

/* All return MP_WOKE (done), MP_TIMEOUT, MP_INTERRUPTED or MP_SHUTDOWN; get pushes the value.
** A deadline bounds the wait for the queue's lock too, and Ctrl-C ends it. */
int mp_queue_put(lua_State *L, mp_queue *q, mp_enc *e, double deadline);
/* put, with plen bytes of pre before the encoding (for a reader with its own decoder) */
int mp_queue_put_prefixed(lua_State *L, mp_queue *q, const void *pre, size_t plen, mp_enc *e, double deadline);
/* the same, except that an allocation whose wait for the allocator's lock reached deadline
** returns MP_TIMEOUT (nothing sent) instead of raising */
int mp_queue_put_soft(lua_State *L, mp_queue *q, const void *pre, size_t plen, mp_enc *e, double deadline);
/* put of the bytes of a small message (pre, then s: fewer than MP_QSMALL bytes in all), such as
** mp_fast_encode_array's; soft: as mp_queue_put_soft's (a new chunk's allocation) */
#define MP_QSMALL (32 * 1024)
int mp_queue_put_small(lua_State *L, mp_queue *q, const void *pre, size_t plen, const char *s, size_t n,
                       double deadline, int soft);
/* The lean puts of a pool's task queue (pool.c's put_apply and put_call), set on its owner's
** handle by core.lean_puts: soft, their waits for the queue's lock and the allocator's end wait
** seconds after they begin (MP_AFTER; 0: a try), and then nothing is sent ("timeout"); kept, they
** send nothing at all ("kept": the pool keeps calls, which go first). Process-local; a handle
** is made with neither. */
typedef struct mp_qlean { int soft, kept; double wait; } mp_qlean;
/* mp_queue_check's, with the handle's lean settings */
mp_queue *mp_queue_lean(lua_State *L, int idx, mp_buf **buf, mp_qlean **lean);
typedef void (*mp_decoder)(lua_State *L, const char *s, size_t n);  /* pushes one value */
int mp_queue_get(lua_State *L, mp_queue *q, mp_buf *buf, double deadline);
/* A reader's claim, in the arena: get_many writes the numbers of the messages
** it takes (and the time) in the same logged change that takes them, so a
** reader killed at any instant is known to hold exactly what it took. Message
** numbers count claimed takes (1, 2, ...): on a queue read only by claimed
** takes and written by one producer, they are its put order. */
typedef struct mp_claim { uint64_t seq; double start; uint64_t first; } mp_claim;
/* Takes up to maxk small messages at once, while more than `keep` stay queued; pushes
** *count values. The claim covers messages claim->first .. claim->seq. */
int mp_queue_get_many(lua_State *L, mp_queue *q, mp_buf *buf, double deadline, mp_claim *claim,
                      int maxk, uint64_t keep, int *count, mp_decoder decode);
/* Takes and releases the lock: a change that a dead process left half done is
** completed (with its claim) before this returns MP_WOKE. */
int mp_queue_settle(lua_State *L, mp_queue *q, double deadline);
mp_queue *mp_queue_check(lua_State *L, int idx, mp_buf **buf);  /* the queue of a handle */
/* Small plain arrays (a pool call's arguments and values, most often): up to MP_FAST_ITEMS
** nils, booleans, numbers and strings of up to 255 bytes, written into o (MP_FAST_ARRAY bytes)
** as the codec's table of them, without the encoder's setup; each returns the length, or 0
** when the values are not such (then mp_encode). _array: the table at idx, with no metatable,
** keys 1 .. n and no other; _values: the n stack values from first on.
** mp_fast_decode_into: the items of such bytes into the table at t from index at on, their
** count; -1 when s is not such an array (nothing written: then mp_decode_into). A process
** reads them once one of its puts checked the fast path (see fast_check). */
#define MP_FAST_ITEMS 7
#define MP_FAST_ARRAY (10 + MP_FAST_ITEMS * 257)
uint32_t mp_fast_encode_array(lua_State *L, int idx, char *o);
uint32_t mp_fast_encode_values(lua_State *L, int first, int n, char *o);
int mp_fast_decode_into(lua_State *L, const char *s, size_t n, int t, lua_Integer at);
int mp_fast_decode(lua_State *L, const char *s, size_t n);  /* pushes a new table: 1; else 0, nothing */
/* Checks the fast path of small plain values now (once a process; it may raise):
** a forked child inherits the result instead of checking again (see fork in process.c). */
void mp_queue_fast_ready(lua_State *L);

#pragma GCC visibility pop

#endif
