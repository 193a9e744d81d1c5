/* queue.h: the shared queue, for the C parts that move messages (Queue, Pool). */
#ifndef MP_QUEUE_H
#define MP_QUEUE_H

#include "mp.h"

#pragma GCC visibility push(hidden)

/* A queue is a list of chunks in the arena holding length-prefixed messages;
** a big message gets a block of its own that the reader decodes in place.
** put never blocks unless maxsize is set; sleepers wait on sequence counters
** and are woken only when someone sleeps, so no system call is made otherwise. */
typedef struct mp_queue {
  mp_obj h;
  pthread_mutex_t lock;
  uint64_t head, tail, spare;  /* chunks */
  uint64_t count;              /* messages */
  uint64_t bytes;              /* their encoded size */
  uint64_t taken;              /* messages ever taken: the number of the last one */
  int64_t maxsize;             /* 0: unbounded */
  uint64_t unfinished;         /* JoinableQueue: puts not yet task_done */
  uint32_t put_seq, get_seq, done_seq;
  uint32_t getters, putters;   /* processes sleeping in get / put */
  uint32_t joinable;
  uint32_t nopace;
  uint32_t chunkcap;           /* capacity of the next chunk: grows to CHUNK */             /* a pacing wait timed out: no pacing until the next get */
} mp_queue;

/* Both return MP_WOKE (done), MP_TIMEOUT or MP_INTERRUPTED; get pushes the value. */
int mp_queue_put(lua_State *L, mp_queue *q, mp_enc *e, double deadline);
/* put, with plen bytes of pre before the encoding (for a reader with its own decoder) */
int mp_queue_put_prefixed(lua_State *L, mp_queue *q, const void *pre, size_t plen, mp_enc *e, double deadline);
typedef void (*mp_decoder)(lua_State *L, const char *s, size_t n);  /* pushes one value */
int mp_queue_get(lua_State *L, mp_queue *q, mp_buf *buf, double deadline);
/* A reader's claim: while the queue is locked, get_many writes the numbers of
** the messages it takes (and the time), so that a reader killed right after
** taking them is known to have them. */
typedef struct mp_claim { uint64_t seq; double start; uint64_t first; } mp_claim;
/* Takes up to maxk small messages at once, while more than `keep` stay queued; pushes
** *count values. The claim covers messages claim->first .. claim->seq. */
int mp_queue_get_many(lua_State *L, mp_queue *q, mp_buf *buf, double deadline, mp_claim *claim,
                      int maxk, uint64_t keep, int *count, mp_decoder decode);
mp_queue *mp_queue_check(lua_State *L, int idx, mp_buf **buf);  /* the queue of a handle */

#pragma GCC visibility pop

#endif
