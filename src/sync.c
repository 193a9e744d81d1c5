/* sync.c: process-shared Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition, Barrier. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mp.h"

/* An RLock is a robust process-shared pthread mutex, so that a process dying
** with one held does not block the others forever: the next acquirer gets it
** and is told ("owner died"). Its owner is a thread, as Python's RLock's is.
** A Lock is held by a process, not a thread (Python's may be released by any
** thread): a pthread mutex cannot be unlocked by another thread than the one
** that locked it, so a Lock is a word of its own (see "Lock" below) and a dead
** holder is noticed by its pid. Semaphore, Event, Condition and Barrier
** keep their state in words of the object and sleep on them with futexes;
** their fast paths are atomic operations that make no system call. */

#define T_LOCK    0x4b434f4cu  /* "LOCK" */
#define T_SEM     0x414d4553u  /* "SEMA" */
#define T_EVENT   0x544e5645u  /* "EVNT" */
#define T_COND    0x444e4f43u  /* "COND" */
#define T_BARRIER 0x52524142u  /* "BARR" */

#define LOCK      "multiprocessing.Lock"
#define RLOCK     "multiprocessing.RLock"
#define SEMAPHORE "multiprocessing.Semaphore"
#define BSEMAPHORE "multiprocessing.BoundedSemaphore"
#define EVENT     "multiprocessing.Event"
#define CONDITION "multiprocessing.Condition"
#define BARRIER   "multiprocessing.Barrier"

#define SEM_MAX 0x7fffffffu

typedef struct lock_obj {
  mp_obj o;
  pthread_mutex_t m;    /* an RLock's (a Lock's is unused) */
  uint32_t recursive;
  uint32_t depth;       /* RLock recursion depth; written by the owner only */
  pid_t owner;          /* the holder's thread id, 0 when free; written by the owner only */
  uint32_t pad;
  uint64_t word;        /* a Lock's state: 0 free, else the holder (see "Lock" below) */
} lock_obj;

typedef struct sem_obj {
  mp_obj o;
  uint32_t value;       /* the futex word */
  uint32_t waiters;     /* sleepers: release makes a syscall only if some */
  uint32_t max;         /* bound of a BoundedSemaphore */
  uint32_t bounded;
} sem_obj;

typedef struct event_obj {
  mp_obj o;
  uint32_t word;        /* bit 0: the flag; above: a count of set() calls (futex word) */
  uint32_t waiters;
} event_obj;

/* A Condition keeps one slot per process inside wait(): notify marks the oldest
** waiting slots and wakes each on its own word, so exactly the processes
** notified return true. A waiter holds its slot's robust mutex, so a waiter that
** died is seen (like a Lock's dead holder) and never takes a wake-up. Slots live
** in the object, then in blocks chained from it as more processes wait at once. */
#define C_SLOTS 8       /* slots in the object */
#define C_BLOCK 32      /* slots in each further block */

typedef struct c_slot {
  pthread_mutex_t m;    /* held by the waiter in the slot */
  pid_t pid;            /* the waiter; 0 when free */
  uint32_t ticket;      /* arrival order: notify wakes the oldest first */
  uint32_t woken;       /* set by notify (the waiter's futex word) */
  uint32_t pad;
} c_slot;

typedef struct c_block {
  uint64_t next;        /* the next block, 0 at the end */
  uint64_t n;
  c_slot s[];
} c_block;

typedef struct cond_obj {
  mp_obj o;
  pthread_mutex_t m;    /* guards the slots */
  uint32_t ticket;      /* the next arrival's */
  pid_t holder;         /* the holder of m (0 when free), for waiters to name */
  uint64_t more;        /* the first block of further slots, 0 if none */
  uint64_t loose;       /* a block on its way into the chain (c_claim), else 0 */
  c_slot s[C_SLOTS];
} cond_obj;

typedef struct cond_handle {
  mp_handle h;
  uint64_t lock;        /* the Condition's lock object, counted by this handle */
} cond_handle;

enum { B_FILLING = 0, B_DRAINING = 1, B_ACTION = 2, B_RESETTING = -1, B_BROKEN = -2 };

/* A Barrier notices a party that dies inside wait(), as a Lock notices a dead
** holder: the process that arrives i-th in a round holds slot i's robust mutex
** until it leaves, so the kernel marks the slot when it dies (even before it is
** reaped). The last to arrive checks every slot before it lets the others go, a
** sleeper checks the next slot at each slice (a ring: some live sleeper sees any
** death), and processes waiting for a round to drain check them all. A dead
** party breaks a round in progress (waiters raise "broken barrier (pid N died
** while waiting)") and is counted out of a round that is draining. */
typedef struct b_slot {
  pthread_mutex_t m;    /* held by the party in the slot */
  pid_t pid;            /* that party; 0 when free */
  uint32_t left;        /* it left without the Barrier's lock (b_abandon), alive */
} b_slot;

typedef struct barrier_obj {
  mp_obj o;
  pthread_mutex_t m;
  uint32_t seq;         /* bumped at each change of state (futex word) */
  int32_t state;        /* Python's Barrier states, plus B_ACTION */
  uint32_t count;       /* processes inside wait() */
  uint32_t parties;
  double timeout;       /* default timeout of wait(); <0 for none */
  pid_t dead;           /* a party that died in wait() and broke it; 0 after reset */
  pid_t holder;         /* the holder of m (0 when free), for waiters to name */
  b_slot slot[];        /* parties slots */
} barrier_obj;

/* ------------------------------------------------------------- helpers */

/* Who holds a Lock: the holder writes its thread id in the lock object once it
** has the mutex and clears it before letting go (POSIX says nothing public about
** a mutex's owner; glibc keeps it in private fields). A holder that died leaves
** its id behind until the next acquire recovers the lock ("owner died"); it no
** longer counts once the kernel says it is gone (a dead holder not yet reaped
** still counts, as a pid that was reused would). */
/* per thread: a host may call us from several. With the pid it was read in: a
** fork's child finds its parent's here and reads its own, so that the fork
** handler need not touch this thread-local block (a dlopened library's, the
** child's first touch of it costs two page faults) */
static __thread struct { pid_t tid, pid; } cached_tid;
MP_FORK_PATH static void forget_tid(void) { mp_fk.sync_start = 0; }  /* (mp_fk.pid: renewed by arena.c, process.c) */
static pid_t self_pid(void) { return mp_getpid(); }
static pid_t self_tid(void) {
  pid_t pid = self_pid();
  if (cached_tid.pid != pid) { cached_tid.tid = gettid(); cached_tid.pid = pid; }
  return cached_tid.tid;
}
static void set_owner(lock_obj *k, pid_t tid) { __atomic_store_n(&k->owner, tid, __ATOMIC_RELEASE); }

/* --------------------------------------------------------------- Lock
** A Lock's word: the holder's pid in the low 30 bits (Linux pids stay below
** 2^22), LK_WAITERS when some may sleep on it (the low half is the futex
** word), and in the high half the holder's start time (/proc/<pid>/stat,
** field 22, low 32 bits), so that a pid reused by another process is not
** taken for the holder. It is set by one compare-and-swap from 0, so a holder
** is never half written. Any thread of the holder process may release it. A
** waiter looks whether the holder still lives when a slice passes without a
** wake-up (and at once for a non-blocking acquire): a holder gone (exited,
** killed; a zombie too) leaves the lock to the first waiter that sees it, who
** is told "owner died", as with an RLock. */
#define LK_PID     0x3fffffffu
#define LK_WAITERS 0x40000000u
#define LK_SLICE   0.05

static uint32_t *lk_futex(lock_obj *k) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return (uint32_t *)&k->word + 1;
#else
  return (uint32_t *)&k->word;
#endif
}

/* the low 32 bits of process pid's start time (clock ticks since boot); 0 if unknown */
static uint32_t proc_start(pid_t pid) {
  char path[40], st[512];
  snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
  int f = open(path, O_RDONLY | O_CLOEXEC);
  if (f < 0) return 0;
  ssize_t n = read(f, st, sizeof st - 1);
  close(f);
  if (n <= 0) return 0;
  st[n] = 0;
  const char *e = strrchr(st, ')');  /* the name may hold anything, even ')' */
  if (!e) return 0;
  for (int field = 2; field < 22 && e; field++) e = strchr(e + 1, ' ');
  return e ? (uint32_t)strtoull(e + 1, NULL, 10) : 0;
}

static uint64_t lk_me(void) {
  if (!mp_fk.sync_start) mp_fk.sync_start = proc_start(self_pid());
  return (uint64_t)mp_fk.sync_start << 32 | (uint32_t)self_pid();
}

/* has the holder recorded in word w ended? */
static int lk_gone(uint64_t w) {
  pid_t pid = (pid_t)(w & LK_PID);
  if (mp_pid_gone(pid)) return 1;
  uint32_t st = (uint32_t)(w >> 32), now = st ? proc_start(pid) : 0;
  return st && now && now != st;
}

static int lk_cas(lock_obj *k, uint64_t *old, uint64_t new) {
  return __atomic_compare_exchange_n(&k->word, old, new, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

/* MP_LOCKED, MP_LOCK_OWNERDEAD (locked), MP_LOCK_TIMEOUT, MP_LOCK_INTERRUPTED
** (through L; NULL: none) or MP_LOCK_DEADLOCK (this thread holds it) */
static int lk_take(lua_State *L, lock_obj *k, double deadline) {
  uint64_t me = lk_me(), w = 0;
  if (__builtin_expect(lk_cas(k, &w, me), 1)) return MP_LOCKED;
  for (int spin = 0; spin < 100 && deadline != 0; spin++) {  /* sections are usually short */
    w = 0;
    if (lk_cas(k, &w, me)) return MP_LOCKED;
  }
  int look = deadline == 0;  /* look whether the holder lives: at once for a try */
  for (;;) {
    w = __atomic_load_n(&k->word, __ATOMIC_RELAXED);
    if (w == 0) {  /* a waiter takes it marked contended: others may sleep */
      if (lk_cas(k, &w, me | LK_WAITERS)) return MP_LOCKED;
      continue;
    }
    pid_t pid = (pid_t)(w & LK_PID);
    if (pid == self_pid()) {
      if (__atomic_load_n(&k->owner, __ATOMIC_ACQUIRE) == self_tid()) return MP_LOCK_DEADLOCK;
    } else if (look) {
      look = 0;
      if (lk_gone(w)) {
        if (lk_cas(k, &w, me | (w & LK_WAITERS))) return MP_LOCK_OWNERDEAD;
        continue;
      }
    }
    double now = mp_now();
    if (deadline >= 0 && now >= deadline) {
      if (pid != self_pid() && lk_gone(w)) { look = 1; continue; }  /* a last look */
      return MP_LOCK_TIMEOUT;
    }
    if (!(w & LK_WAITERS) && !lk_cas(k, &w, w | LK_WAITERS)) continue;
    double until = now + LK_SLICE;
    if (deadline >= 0 && deadline < until) until = deadline;
    int r = mp_futex_wait(L, lk_futex(k), (uint32_t)(w | LK_WAITERS), until);
    if (r == MP_INTERRUPTED) return MP_LOCK_INTERRUPTED;
    if (r == MP_TIMEOUT) look = 1;  /* a slice with no release: does the holder live? */
  }
}

static void lk_give(lock_obj *k) {
  uint64_t w = __atomic_exchange_n(&k->word, 0, __ATOMIC_RELEASE);
  if (w & LK_WAITERS) mp_futex_wake(lk_futex(k), 1);
}

/* Is the lock held by this thread (RLock) or by this process (Lock)? */
static int lock_mine(lock_obj *k) {
  if (k->recursive) return __atomic_load_n(&k->owner, __ATOMIC_ACQUIRE) == self_tid();
  return (pid_t)(__atomic_load_n(&k->word, __ATOMIC_ACQUIRE) & LK_PID) == self_pid();
}

/* Who holds a lock, for messages: its thread id (a Lock's holder process's pid
** until that thread wrote its id), 0 when free or when its holder is gone. */
static pid_t lock_holder(lock_obj *k) {
  if (!k->recursive) {
    uint64_t w = __atomic_load_n(&k->word, __ATOMIC_ACQUIRE);
    if (!w) return 0;
    pid_t pid = (pid_t)(w & LK_PID), tid = __atomic_load_n(&k->owner, __ATOMIC_ACQUIRE);
    if (pid != self_pid() && lk_gone(w)) return 0;
    return tid ? tid : pid;
  }
  pid_t tid = __atomic_load_n(&k->owner, __ATOMIC_ACQUIRE);
  if (tid && tid != self_tid() && kill(tid, 0) != 0 && errno == ESRCH) return 0;
  return tid;
}

/* The internal lock of a Barrier or Condition (short sections, mp_ilock):
** MP_LOCKED, or MP_LOCK_TIMEOUT / MP_LOCK_INTERRUPTED without it (*who: the
** holder). A holder that died is recovered silently (its section moved plain
** data, each store leaving the object usable). */
static int ilock(lua_State *L, pthread_mutex_t *m, pid_t *holder, double deadline, pid_t *who) {
  int r = mp_ilock(L, m, holder, deadline, who);
  if (r == MP_LOCK_OWNERDEAD) { pthread_mutex_consistent(m); r = MP_LOCKED; }
  if (r == MP_LOCK_DEADLOCK) r = MP_LOCK_INTERRUPTED;  /* (not reached: no section calls out) */
  if (r == MP_LOCKED) __atomic_store_n(holder, self_tid(), __ATOMIC_RELAXED);
  return r;
}

static void iunlock(pthread_mutex_t *m, pid_t *holder) {
  __atomic_store_n(holder, 0, __ATOMIC_RELAXED);
  pthread_mutex_unlock(m);
}

/* Raises for a wait on an internal lock that was given up: "wait timed out:
** the Barrier is held by stopped process 1234 (inside one of its calls)". */
static int ilock_error(lua_State *L, int r, const char *what, pid_t who) {
  const char *stopped = mp_pid_stopped(who) ? "stopped " : "";
  if (r == MP_LOCK_TIMEOUT)
    return luaL_error(L, "%s timed out: the %s is held by %sprocess %d (inside one of its calls)",
                      mp_callname(L), what, stopped, (int)who);
  mp_take_interrupt(L);
  return luaL_error(L, "interrupted! (%s waited while the %s was held by %sprocess %d, inside one of its calls)",
                    mp_callname(L), what, stopped, (int)who);
}

/* the classes of each kind of self (mp.h's self checks) */
#define LOCKS    MP_CLASSES(LOCK, RLOCK)
#define SEMS     MP_CLASSES(SEMAPHORE, BSEMAPHORE)
#define EVENTS   MP_CLASSES(EVENT)
#define CONDS    MP_CLASSES(CONDITION)
#define BARRIERS MP_CLASSES(BARRIER)

static mp_handle *newhandle(lua_State *L, size_t size, const char *tname, int nuv) {
  mp_handle *h = lua_newuserdatauv(L, size, nuv);
  memset(h, 0, size);  /* closed until its object exists */
  luaL_setmetatable(L, tname);
  return h;
}

/* acquire([blocking=true [, timeout]]) or acquire(timeout): a deadline,
** already past for a non-blocking call, <0 for none. */
static double acquire_deadline(lua_State *L, int i) {
  if (lua_type(L, i) == LUA_TNUMBER) return mp_deadline(L, i);
  if (!lua_isnoneornil(L, i) && !lua_toboolean(L, i)) return 0;
  return mp_deadline(L, i + 1);
}

/* an object a Condition's handle names, listed by the encoder: owned by a queue's
** message, or pinned (docs/arena.md, "Messages own their handles") */
static void c_blocks_free(mp_obj *o);
static void pin(uint64_t off) {
  mp_obj *o = MP_PTR(off);
  mp_obj_sent(off, o->type == T_COND ? c_blocks_free : NULL);
}

/* close of the classes whose object owns nothing outside itself */
static int close_handle(lua_State *L, const char *const *names) {
  mp_handle *h = mp_toself(L, 1, names);
  if (h->off) { mp_obj_release(h->off, h->pid); h->off = 0; }
  return 0;
}
static int lock_close(lua_State *L) { return close_handle(L, LOCKS); }
static int sem_close(lua_State *L) { return close_handle(L, SEMS); }
static int event_close(lua_State *L) { return close_handle(L, EVENTS); }
static int barrier_close(lua_State *L) { return close_handle(L, BARRIERS); }

/* ------------------------------------------------------- Lock, RLock */

static const char *lock_tname(lock_obj *k) { return k->recursive ? RLOCK : LOCK; }
static const char *lock_short(lock_obj *k) { return k->recursive ? "RLock" : "Lock"; }

uint64_t mp_sync_newlock(lua_State *L, int recursive) {
  uint64_t off = mp_obj_new(L, sizeof(lock_obj), T_LOCK);
  lock_obj *k = MP_PTR(off);
  mp_mutex_init(&k->m, recursive);
  k->recursive = recursive != 0;
  return off;
}

pthread_mutex_t *mp_sync_mutex(uint64_t off) { return &((lock_obj *)MP_PTR(off))->m; }

void mp_sync_pushlock(lua_State *L, uint64_t off) {
  lock_obj *k = MP_PTR(off);
  mp_handle *h = newhandle(L, sizeof(mp_handle), lock_tname(k), 0);
  mp_obj_retain(off);
  h->off = off;
  h->pid = mp_getpid();
}

static lock_obj *tolock(lua_State *L, int idx) {
  return MP_PTR(mp_checkopen(L, idx, LOCKS)->off);
}

/* Pushes the results of acquire: true [, "owner died"] | false | nil, "interrupted". */
static int lock_take(lua_State *L, lock_obj *k, double deadline) {
  switch (k->recursive ? mp_mutex_lock(L, &k->m, deadline) : lk_take(L, k, deadline)) {
    case MP_LOCKED:
      k->depth++;
      set_owner(k, self_tid());
      lua_pushboolean(L, 1);
      return 1;
    case MP_LOCK_OWNERDEAD:  /* the dead owner's depth went with it */
      k->depth = 1;
      set_owner(k, self_tid());
      lua_pushboolean(L, 1);
      lua_pushliteral(L, "owner died");
      return 2;
    case MP_LOCK_TIMEOUT:
      lua_pushboolean(L, 0);
      return 1;
    case MP_LOCK_INTERRUPTED:
      return mp_waitresult(L, MP_INTERRUPTED);
    default: {  /* a Lock taken again by its holder thread: it can only time out */
      if (deadline < 0) return luaL_error(L, "deadlock: this process already holds the %s", lock_short(k));
      uint32_t never = 0;
      if (mp_futex_wait(L, &never, 0, deadline) == MP_INTERRUPTED) return mp_waitresult(L, MP_INTERRUPTED);
      lua_pushboolean(L, 0);
      return 1;
    }
  }
}

static int my_thread(pid_t tid) {  /* is tid a thread of this process? */
  char path[48];
  snprintf(path, sizeof path, "/proc/self/task/%d", (int)tid);
  return access(path, F_OK) == 0;
}

static void lock_give(lua_State *L, lock_obj *k) {
  if (!k->recursive) {  /* the fast path: a Lock this process holds */
    uint64_t w = __atomic_load_n(&k->word, __ATOMIC_RELAXED);
    if (w && (pid_t)(w & LK_PID) == self_pid()) {
      k->depth = 0;
      set_owner(k, 0);
      lk_give(k);
      return;
    }
  }
  pid_t tid = lock_holder(k);
  if (tid == 0) luaL_error(L, "release of an unlocked %s", lock_short(k));
  if (!lock_mine(k)) {
    if (k->recursive && tid != self_tid() && my_thread(tid))
      luaL_error(L, "cannot release: the RLock is held by another thread of this process (thread %d)", (int)tid);
    luaL_error(L, "cannot release: the %s is not held by this process", lock_short(k));
  }
  if (k->depth > 0) k->depth--;
  if (k->depth == 0) set_owner(k, 0);
  if (k->recursive) pthread_mutex_unlock(&k->m);
  else lk_give(k);
}

static int lock_acquire(lua_State *L) {
  lock_obj *k = tolock(L, 1);
  return lock_take(L, k, acquire_deadline(L, 2));
}

static int lock_release(lua_State *L) {
  lock_give(L, tolock(L, 1));
  return 0;
}

static int lock_locked(lua_State *L) {
  lua_pushboolean(L, lock_holder(MP_PTR(mp_checkopen(L, 1, LOCKS)->off)) != 0);
  return 1;
}

/* RLock: is it held by this process, at which depth */
static int lock_is_owned(lua_State *L) {
  lock_obj *k = MP_PTR(mp_checkopen(L, 1, MP_CLASSES(RLOCK))->off);
  lua_pushboolean(L, lock_mine(k));
  return 1;
}

static int lock_tostring(lua_State *L) {
  mp_handle *h = mp_toself(L, 1, LOCKS);
  const char *tname = luaL_testudata(L, 1, LOCK) ? LOCK : RLOCK;
  pid_t holder = h->off ? lock_holder(MP_PTR(h->off)) : 0;
  if (holder)  /* the owner, as Python 3.13's repr shows it: a thread id, the process's pid when single-threaded */
    lua_pushfstring(L, "%s (locked by %d) %p", tname, (int)holder, (void *)h);
  else
    lua_pushfstring(L, "%s (%s) %p", tname, h->off ? "unlocked" : "closed", (void *)h);
  return 1;
}

static int new_lock(lua_State *L, int recursive) {
  mp_handle *h = newhandle(L, sizeof(mp_handle), recursive ? RLOCK : LOCK, 0);
  h->off = mp_sync_newlock(L, recursive);
  h->pid = mp_getpid();
  return 1;
}
static int sync_Lock(lua_State *L) { return new_lock(L, 0); }
static int sync_RLock(lua_State *L) { return new_lock(L, 1); }

static void lock_decode(lua_State *L, const unsigned char *p, size_t n) {
  mp_sync_pushlock(L, mp_handle_object(L, p, n, T_LOCK, sizeof(lock_obj)));
}

static const mp_handle_type lock_type = { LOCK, mp_handle_encode, lock_decode };
static const mp_handle_type rlock_type = { RLOCK, mp_handle_encode, lock_decode };

/* ------------------------------------------ Semaphore, BoundedSemaphore */

static sem_obj *tosem(lua_State *L, int idx) {
  return MP_PTR(mp_checkopen(L, idx, SEMS)->off);
}

static int sem_trytake(sem_obj *s) {
  uint32_t v = __atomic_load_n(&s->value, __ATOMIC_RELAXED);
  while (v > 0)
    if (__atomic_compare_exchange_n(&s->value, &v, v - 1, 1, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
      return 1;
  return 0;
}

static int sem_acquire(lua_State *L) {
  sem_obj *s = tosem(L, 1);
  double deadline = acquire_deadline(L, 2);
  for (;;) {
    if (sem_trytake(s)) { lua_pushboolean(L, 1); return 1; }
    __atomic_add_fetch(&s->waiters, 1, __ATOMIC_SEQ_CST);
    int r = mp_futex_wait(L, &s->value, 0, deadline);
    __atomic_sub_fetch(&s->waiters, 1, __ATOMIC_SEQ_CST);
    if (r == MP_INTERRUPTED) return mp_waitresult(L, r);
    if (r == MP_TIMEOUT) { lua_pushboolean(L, sem_trytake(s)); return 1; }
  }
}

static int sem_release(lua_State *L) {
  sem_obj *s = tosem(L, 1);
  lua_Integer n = luaL_optinteger(L, 2, 1);
  luaL_argcheck(L, n >= 1 && n <= SEM_MAX, 2, "must be a positive count");
  uint32_t v = __atomic_load_n(&s->value, __ATOMIC_RELAXED);
  for (;;) {
    uint32_t lim = s->bounded ? s->max : SEM_MAX;
    if ((uint64_t)v + (uint64_t)n > lim) {
      if (s->bounded) return luaL_error(L, "BoundedSemaphore released too many times");
      return luaL_error(L, "Semaphore value would exceed %d", (int)SEM_MAX);
    }
    if (__atomic_compare_exchange_n(&s->value, &v, v + (uint32_t)n, 1, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
      break;
  }
  if (__atomic_load_n(&s->waiters, __ATOMIC_SEQ_CST)) mp_futex_wake(&s->value, (int)n);
  return 0;
}

static int sem_get_value(lua_State *L) {
  lua_pushinteger(L, __atomic_load_n(&tosem(L, 1)->value, __ATOMIC_RELAXED));
  return 1;
}

static int sem_tostring(lua_State *L) {
  mp_handle *h = mp_toself(L, 1, SEMS);
  const char *tname = luaL_testudata(L, 1, SEMAPHORE) ? SEMAPHORE : BSEMAPHORE;
  if (!h->off) { lua_pushfstring(L, "%s (closed) %p", tname, (void *)h); return 1; }
  sem_obj *s = MP_PTR(h->off);
  if (s->bounded)
    lua_pushfstring(L, "%s (value=%d, max=%d) %p", tname, (int)s->value, (int)s->max, (void *)h);
  else
    lua_pushfstring(L, "%s (value=%d) %p", tname, (int)s->value, (void *)h);
  return 1;
}

static int new_sem(lua_State *L, int bounded) {
  lua_Integer n = luaL_optinteger(L, 1, 1);
  luaL_argcheck(L, n >= 0 && n <= SEM_MAX, 1, "initial value must be >= 0");
  mp_handle *h = newhandle(L, sizeof(mp_handle), bounded ? BSEMAPHORE : SEMAPHORE, 0);
  h->off = mp_obj_new(L, sizeof(sem_obj), T_SEM);
  h->pid = mp_getpid();
  sem_obj *s = MP_PTR(h->off);
  s->value = s->max = (uint32_t)n;
  s->bounded = bounded;
  return 1;
}
static int sync_Semaphore(lua_State *L) { return new_sem(L, 0); }
static int sync_BoundedSemaphore(lua_State *L) { return new_sem(L, 1); }

static void sem_decode(lua_State *L, const unsigned char *p, size_t n) {
  uint64_t off = mp_handle_object(L, p, n, T_SEM, sizeof(sem_obj));
  sem_obj *s = MP_PTR(off);
  mp_handle *h = newhandle(L, sizeof(mp_handle), s->bounded ? BSEMAPHORE : SEMAPHORE, 0);
  mp_obj_retain(off);
  h->off = off;
  h->pid = mp_getpid();
}

static const mp_handle_type sem_type = { SEMAPHORE, mp_handle_encode, sem_decode };
static const mp_handle_type bsem_type = { BSEMAPHORE, mp_handle_encode, sem_decode };

/* --------------------------------------------------------------- Event */

static event_obj *toevent(lua_State *L, int idx) {
  return MP_PTR(mp_checkopen(L, idx, EVENTS)->off);
}

static int event_set(lua_State *L) {
  event_obj *e = toevent(L, 1);
  uint32_t w = __atomic_load_n(&e->word, __ATOMIC_RELAXED);
  do {
    if (w & 1) return 0;
  } while (!__atomic_compare_exchange_n(&e->word, &w, (w + 2) | 1, 1, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
  if (__atomic_load_n(&e->waiters, __ATOMIC_SEQ_CST)) mp_futex_wake(&e->word, INT_MAX);
  return 0;
}

static int event_clear(lua_State *L) {
  __atomic_and_fetch(&toevent(L, 1)->word, ~1u, __ATOMIC_SEQ_CST);
  return 0;
}

static int event_is_set(lua_State *L) {
  lua_pushboolean(L, __atomic_load_n(&toevent(L, 1)->word, __ATOMIC_ACQUIRE) & 1);
  return 1;
}

/* Any change of the word seen while waiting means a set() happened: wait
** returns true then even if the flag was cleared again (as Python does). */
static int event_wait(lua_State *L) {
  event_obj *e = toevent(L, 1);
  double deadline = mp_deadline(L, 2);
  uint32_t w = __atomic_load_n(&e->word, __ATOMIC_ACQUIRE);
  if (w & 1) { lua_pushboolean(L, 1); return 1; }
  __atomic_add_fetch(&e->waiters, 1, __ATOMIC_SEQ_CST);
  int r;
  for (;;) {
    r = mp_futex_wait(L, &e->word, w, deadline);
    if (__atomic_load_n(&e->word, __ATOMIC_ACQUIRE) != w) { r = MP_WOKE; break; }
    if (r != MP_WOKE) break;
  }
  __atomic_sub_fetch(&e->waiters, 1, __ATOMIC_SEQ_CST);
  if (r == MP_INTERRUPTED) return mp_waitresult(L, r);
  lua_pushboolean(L, r == MP_WOKE);
  return 1;
}

static int event_tostring(lua_State *L) {
  mp_handle *h = mp_toself(L, 1, EVENTS);
  const char *state = !h->off ? "closed" : (((event_obj *)MP_PTR(h->off))->word & 1) ? "set" : "unset";
  lua_pushfstring(L, "%s (%s) %p", EVENT, state, (void *)h);
  return 1;
}

static int sync_Event(lua_State *L) {
  mp_handle *h = newhandle(L, sizeof(mp_handle), EVENT, 0);
  h->off = mp_obj_new(L, sizeof(event_obj), T_EVENT);
  h->pid = mp_getpid();
  return 1;
}

static void event_decode(lua_State *L, const unsigned char *p, size_t n) {
  mp_handle_attach(L, p, n, T_EVENT, EVENT, sizeof(mp_handle), 0);
}

static const mp_handle_type event_type = { EVENT, mp_handle_encode, event_decode };

/* ----------------------------------------------------------- Condition */

static cond_handle *tocond(lua_State *L, int idx) { return (cond_handle *)mp_checkopen(L, idx, CONDS); }

static int cond_acquire(lua_State *L) {
  cond_handle *c = tocond(L, 1);
  return lock_take(L, MP_PTR(c->lock), acquire_deadline(L, 2));
}

static int cond_release(lua_State *L) {
  lock_give(L, MP_PTR(tocond(L, 1)->lock));
  return 0;
}

/* The slots of c, a run at a time: c_first, then c_step until it returns 0. */
typedef struct c_run { c_slot *s; uint64_t n, next; } c_run;
static c_run c_first(cond_obj *c) { return (c_run){ c->s, C_SLOTS, c->more }; }
static int c_step(c_run *r) {
  if (!r->next) return 0;
  c_block *b = MP_PTR(r->next);
  *r = (c_run){ b->s, b->n, b->next };
  return 1;
}

/* core._sync_fault("slots", n), for tests: this process SIGKILLs itself at the n-th step from
** now of its additions of slot blocks to a Condition (named loose, handed to it, chained) */
static int slots_fault;
#define SLOTS_STEP() do { if (__builtin_expect(slots_fault != 0, 0) && --slots_fault == 0) raise(SIGKILL); } while (0)

/* A block the Condition owns that a process died with before chaining it (c->m held: whoever
** takes the lock next finds c->loose set, as no live holder lets go of it set): freed. One still
** its maker's is freed with the dead maker. */
static void c_settle_loose(cond_obj *c) {
  uint64_t a = c->loose;
  c->loose = 0;
  if (!mp_owned_by(a, MP_OFF(c))) return;
  for (uint64_t off = c->more; off; off = ((c_block *)MP_PTR(off))->next) if (off == a) return;
  mp_free(a);
}

/* A free slot for this process (c->m held); NULL when the arena is full. A new block is held by
** this process while it is made (mp_alloc_held: freed if it dies), named in c->loose, handed to
** the Condition (its owner word), chained and let go of: a kill at any step leaves it one owner,
** the dead process or the Condition (c_settle_loose, or c_blocks_free once it is released). */
static c_slot *c_claim(cond_obj *c) {
  c_slot *sl = NULL;
  c_run r = c_first(c);
  do {
    for (uint64_t i = 0; i < r.n && !sl; i++) if (!r.s[i].pid) sl = &r.s[i];
  } while (!sl && c_step(&r));
  if (!sl) {
    size_t size = sizeof(c_block) + C_BLOCK * sizeof(c_slot);
    uint64_t off = mp_alloc_held(size);
    if (!off) return NULL;
    c_block *b = MP_PTR(off);
    memset(b, 0, size);
    b->n = C_BLOCK;
    for (int i = 0; i < C_BLOCK; i++) mp_mutex_init(&b->s[i].m, 0);
    b->next = c->more;
    __atomic_store_n(&c->loose, off, __ATOMIC_RELEASE);
    SLOTS_STEP();
    mp_hand(off, MP_OFF(c));
    SLOTS_STEP();
    __atomic_store_n(&c->more, off, __ATOMIC_RELEASE);
    SLOTS_STEP();
    mp_unhold(off);
    __atomic_store_n(&c->loose, 0, __ATOMIC_RELEASE);
    sl = &b->s[0];
  }
  if (pthread_mutex_trylock(&sl->m) == EOWNERDEAD) pthread_mutex_consistent(&sl->m);
  sl->pid = mp_getpid();
  sl->ticket = c->ticket++;
  __atomic_store_n(&sl->woken, 0, __ATOMIC_SEQ_CST);
  return sl;
}

static void c_free(c_slot *sl) {
  sl->pid = 0;
  pthread_mutex_unlock(&sl->m);
}

/* Is the waiter in sl alive? A dead one's slot is freed (c->m held). */
static int c_alive(c_slot *sl) {
  int r = pthread_mutex_trylock(&sl->m);
  if (r == EBUSY) return 1;
  if (r == EOWNERDEAD) pthread_mutex_consistent(&sl->m);
  if (r != 0 && r != EOWNERDEAD) return 1;
  c_free(sl);
  return 0;
}

static void c_blocks_free(mp_obj *o) {
  if (((cond_obj *)o)->loose) c_settle_loose((cond_obj *)o);
  uint64_t off = ((cond_obj *)o)->more;
  while (off) {
    uint64_t next = ((c_block *)MP_PTR(off))->next;
    mp_free(off);
    off = next;
  }
}

static int cond_wait(lua_State *L) {
  cond_handle *ch = tocond(L, 1);
  cond_obj *c = MP_PTR(ch->h.off);
  lock_obj *k = MP_PTR(ch->lock);
  double deadline = mp_deadline(L, 2);
  if (!lock_mine(k)) return luaL_error(L, "cannot wait on an un-acquired lock");
  pid_t who = 0;
  int lr = ilock(L, &c->m, &c->holder, deadline, &who);
  if (lr == MP_LOCK_INTERRUPTED) return mp_waitresult(L, MP_INTERRUPTED);
  if (lr != MP_LOCKED) return ilock_error(L, lr, "Condition", who);
  if (c->loose) c_settle_loose(c);  /* (its holder died adding a block) */
  mp_alloc_context(L, deadline);  /* more slots: the allocator's wait ends as ours does */
  c_slot *sl = c_claim(c);
  mp_alloc_context(NULL, -1);
  iunlock(&c->m, &c->holder);
  if (!sl) return mp_oom_error(L, sizeof(c_block) + C_BLOCK * sizeof(c_slot));
  uint32_t depth = k->depth ? k->depth : 1;  /* release every level of an RLock */
  k->depth = 0;
  set_owner(k, 0);
  if (!k->recursive) lk_give(k);
  else for (uint32_t i = 0; i < depth; i++) pthread_mutex_unlock(&k->m);
  int r;
  do r = mp_futex_wait(L, &sl->woken, 0, deadline);
  while (r == MP_WOKE && !__atomic_load_n(&sl->woken, __ATOMIC_SEQ_CST));
  int notified;
  if (ilock(NULL, &c->m, &c->holder, 0, NULL) == MP_LOCKED) {  /* (a stopped holder is not waited for) */
    if (c->loose) c_settle_loose(c);
    notified = sl->woken != 0;  /* a notify that came with the timeout counts */
    c_free(sl);
    iunlock(&c->m, &c->holder);
  } else {  /* its holder is stopped: the slot is let go without the lock (see c_wake) */
    notified = __atomic_exchange_n(&sl->woken, 1, __ATOMIC_SEQ_CST) != 0;
    pthread_mutex_unlock(&sl->m);
    pid_t mine = mp_getpid();
    __atomic_compare_exchange_n(&sl->pid, &mine, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  }
  if (!k->recursive) {
    lk_take(NULL, k, -1);  /* retaken whatever happened, as Python does */
  } else {
    mp_mutex_lock(NULL, &k->m, -1);
    for (uint32_t i = 1; i < depth; i++) pthread_mutex_lock(&k->m);
  }
  k->depth = depth;
  set_owner(k, self_tid());
  if (!notified && r == MP_INTERRUPTED) return mp_waitresult(L, r);
  lua_pushboolean(L, notified);
  return 1;
}

/* 1 if it woke sl's waiter; 0 if that waiter had let its slot go on its own
** (cond_wait, when the Condition's lock is held by a stopped process) */
static int c_wake(c_slot *sl) {
  uint32_t zero = 0;
  if (!__atomic_compare_exchange_n(&sl->woken, &zero, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return 0;
  mp_futex_wake(&sl->woken, 1);
  return 1;
}

/* Wakes the n oldest live waiters not yet notified (all of them for notify_all). */
static int cond_notify_n(lua_State *L, cond_handle *ch, lua_Integer n) {
  cond_obj *c = MP_PTR(ch->h.off);
  lock_obj *k = MP_PTR(ch->lock);
  if (!lock_mine(k)) return luaL_error(L, "cannot notify on an un-acquired lock");
  pid_t who = 0;
  int lr = ilock(L, &c->m, &c->holder, -1, &who);  /* no timeout: only Ctrl-C ends the wait */
  if (lr != MP_LOCKED) return ilock_error(L, lr, "Condition", who);
  if (c->loose) c_settle_loose(c);  /* (its holder died adding a block) */
  if (n == LUA_MAXINTEGER) {  /* notify_all: in one pass, no order to keep */
    c_run r = c_first(c);
    do {
      for (uint64_t i = 0; i < r.n; i++) {
        c_slot *sl = &r.s[i];
        if (sl->pid && !sl->woken && c_alive(sl)) c_wake(sl);
      }
    } while (c_step(&r));
    n = 0;
  }
  while (n > 0) {
    c_slot *oldest = NULL;
    c_run r = c_first(c);
    do {
      for (uint64_t i = 0; i < r.n; i++) {
        c_slot *sl = &r.s[i];
        if (sl->pid && !sl->woken && (!oldest || (int32_t)(sl->ticket - oldest->ticket) < 0)) oldest = sl;
      }
    } while (c_step(&r));
    if (!oldest) break;
    if (!c_alive(oldest)) continue;  /* a dead waiter takes no wake-up */
    if (c_wake(oldest)) n--;
  }
  iunlock(&c->m, &c->holder);
  return 0;
}

static int cond_notify(lua_State *L) {
  cond_handle *ch = tocond(L, 1);
  lua_Integer n = luaL_optinteger(L, 2, 1);
  luaL_argcheck(L, n >= 0, 2, "must be >= 0");
  return cond_notify_n(L, ch, n);
}

static int cond_notify_all(lua_State *L) {
  return cond_notify_n(L, tocond(L, 1), LUA_MAXINTEGER);
}

static int cond_close(lua_State *L) {
  cond_handle *ch = mp_toself(L, 1, CONDS);
  {  /* each part on its own: a failed constructor may leave only the lock */
    if (ch->h.off) mp_obj_release_with(ch->h.off, ch->h.pid, c_blocks_free);
    if (ch->lock) mp_obj_release(ch->lock, ch->h.pid);
    ch->h.off = ch->lock = 0;
  }
  return 0;
}

static int cond_tostring(lua_State *L) {
  cond_handle *ch = mp_toself(L, 1, CONDS);
  if (!ch->h.off) { lua_pushfstring(L, "%s (closed) %p", CONDITION, (void *)ch); return 1; }
  lock_obj *k = MP_PTR(ch->lock);
  lua_pushfstring(L, "%s (%s, %s) %p", CONDITION, lock_short(k),
                  lock_holder(k) ? "locked" : "unlocked", (void *)ch);
  return 1;
}

static cond_handle *push_cond(lua_State *L, uint64_t off, uint64_t lock) {
  cond_handle *ch = (cond_handle *)newhandle(L, sizeof(cond_handle), CONDITION, 0);
  ch->h.off = off;
  ch->lock = lock;
  ch->h.pid = mp_getpid();
  return ch;
}

/* Condition([lock]): a new RLock unless a Lock or RLock is given */
static int sync_Condition(lua_State *L) {
  uint64_t lock;
  if (lua_isnoneornil(L, 1)) {
    lua_settop(L, 0);
    cond_handle *ch = push_cond(L, 0, 0);
    ch->lock = mp_sync_newlock(L, 1);
    ch->h.off = mp_obj_new(L, sizeof(cond_obj), T_COND);
  } else {
    mp_handle *h = mp_toself(L, 1, LOCKS);
    if (!h->off) return luaL_argerror(L, 1, "the lock is closed");
    lock = h->off;
    cond_handle *ch = push_cond(L, 0, 0);
    ch->h.off = mp_obj_new(L, sizeof(cond_obj), T_COND);
    mp_obj_retain(lock);
    ch->lock = lock;
  }
  cond_obj *c = MP_PTR(((mp_handle *)lua_touserdata(L, -1))->off);
  mp_mutex_init(&c->m, 0);
  for (int i = 0; i < C_SLOTS; i++) mp_mutex_init(&c->s[i].m, 0);
  return 1;
}

static size_t cond_encode(lua_State *L, int idx, unsigned char *payload) {
  cond_handle *ch = lua_touserdata(L, idx);
  if (!ch->h.off) luaL_error(L, "cannot send a closed Condition");
  pin(ch->h.off);
  pin(ch->lock);
  memcpy(payload, &ch->h.off, 8);
  memcpy(payload + 8, &ch->lock, 8);
  return 16;
}

/* Both offsets go through the codec's checked path (mp_handle_object: aligned,
** of the right type, whole below the arena's top) before anything is counted. */
static void cond_decode(lua_State *L, const unsigned char *p, size_t n) {
  if (n != 16) luaL_error(L, "cannot decode: bad %s handle", CONDITION);
  mp_handle_object(L, p, 8, T_COND, sizeof(cond_obj));
  uint64_t lock = mp_handle_object(L, p + 8, 8, T_LOCK, sizeof(lock_obj));
  cond_handle *ch = (cond_handle *)mp_handle_attach(L, p, 8, T_COND, CONDITION, sizeof(cond_handle), 0);
  mp_obj_retain(lock);
  ch->lock = lock;
}

static const mp_handle_type cond_type = { CONDITION, cond_encode, cond_decode };

/* ------------------------------------------------------------- Barrier */

static barrier_obj *tobarrier(lua_State *L, int idx) {
  return MP_PTR(mp_checkopen(L, idx, BARRIERS)->off);
}

static void b_bump(barrier_obj *b) {
  __atomic_add_fetch(&b->seq, 1, __ATOMIC_SEQ_CST);
  mp_futex_wake(&b->seq, INT_MAX);
}

static void b_break(barrier_obj *b) { b->state = B_BROKEN; b_bump(b); }

/* A process leaves wait(): the last one out ends a drain or a reset. */
static void b_exit(barrier_obj *b) {
  b->count--;
  if (b->count == 0 && (b->state == B_RESETTING || b->state == B_DRAINING)) {
    b->state = B_FILLING;
    b_bump(b);
  }
}

#define NOSLOT UINT32_MAX
#define B_SLICE 0.05  /* how often a sleeper looks for dead parties */

static void b_take(barrier_obj *b, uint32_t i) {
  b_slot *s = &b->slot[i];
  if (pthread_mutex_trylock(&s->m) == EOWNERDEAD) pthread_mutex_consistent(&s->m);
  s->left = 0;
  s->pid = mp_getpid();
}

/* A party leaves wait() without the Barrier's lock (held by a stopped
** process): it lets go of its slot's mutex, so the next process that looks at
** the slot (b_gone) counts it out and breaks the round, as for a death. */
static void b_abandon(barrier_obj *b, uint32_t i) {
  __atomic_store_n(&b->slot[i].left, 1, __ATOMIC_SEQ_CST);
  pthread_mutex_unlock(&b->slot[i].m);
}

static void b_leave(barrier_obj *b, uint32_t i) {
  b->slot[i].pid = 0;
  pthread_mutex_unlock(&b->slot[i].m);
  b_exit(b);
}

/* Is the party in slot i dead? Then it is counted out (and breaks a round in
** progress); its pid is returned. The mutex b->m is held. */
static pid_t b_gone(barrier_obj *b, uint32_t i) {
  b_slot *s = &b->slot[i];
  pid_t pid = s->pid;
  if (!pid) return 0;
  int r = pthread_mutex_trylock(&s->m);
  if (r == EBUSY) return 0;  /* alive */
  if (r == EOWNERDEAD) pthread_mutex_consistent(&s->m);
  if (r != 0 && r != EOWNERDEAD) return 0;
  s->pid = 0;
  pthread_mutex_unlock(&s->m);
  if (b->state == B_FILLING || b->state == B_ACTION) {
    if (!s->left) b->dead = pid;  /* (one that left is no death to report) */
    b_break(b);
  }
  b_exit(b);
  return pid;
}

static void b_gone_all(barrier_obj *b, uint32_t me) {
  for (uint32_t i = 0; i < b->parties; i++) if (i != me) b_gone(b, i);
}

#define B_UNLOCKED 10  /* b_sleep: the mutex could not be taken again */

/* Sleeps until the state changes, a slice passes or the deadline; the mutex is
** held before, and after unless B_UNLOCKED is returned (its holder is stopped
** and the deadline passed, or Ctrl-C: *lr says which, *who the holder).
** Otherwise MP_WOKE unless the deadline passed or interrupted. */
static int b_sleep(lua_State *L, barrier_obj *b, double deadline, int *lr, pid_t *who) {
  uint32_t s = __atomic_load_n(&b->seq, __ATOMIC_SEQ_CST);
  double until = mp_now() + B_SLICE;
  int last = deadline >= 0 && deadline <= until;
  iunlock(&b->m, &b->holder);
  int r = mp_futex_wait(L, &b->seq, s, last ? deadline : until);
  /* interrupted already: a stopped holder is not waited for */
  *lr = r == MP_INTERRUPTED ? ilock(NULL, &b->m, &b->holder, 0, who) : ilock(L, &b->m, &b->holder, deadline, who);
  if (*lr != MP_LOCKED) {
    if (r == MP_INTERRUPTED) *lr = MP_LOCK_INTERRUPTED;
    return B_UNLOCKED;
  }
  return r == MP_TIMEOUT && !last ? MP_WOKE : r;
}

/* the outcome of a wait that could not take the Barrier's lock again */
static int b_lost(lua_State *L, int lr, pid_t who) {
  if (lr == MP_LOCK_INTERRUPTED) return mp_waitresult(L, MP_INTERRUPTED);
  return ilock_error(L, lr, "Barrier", who);
}

static int b_broken(lua_State *L, pid_t dead) {
  if (dead) return luaL_error(L, "broken barrier (pid %d died while waiting)", (int)dead);
  return luaL_error(L, "broken barrier");
}

static int barrier_wait(lua_State *L) {
  barrier_obj *b = tobarrier(L, 1);
  double deadline = !lua_isnoneornil(L, 2) ? mp_deadline(L, 2) : b->timeout < 0 ? -1 : mp_now() + b->timeout;
  pid_t who = 0;
  int lr = ilock(L, &b->m, &b->holder, deadline, &who);
  if (lr != MP_LOCKED) return b_lost(L, lr, who);
  while (b->state == B_DRAINING || b->state == B_RESETTING || b->state == B_ACTION) {
    int r = b_sleep(L, b, deadline, &lr, &who);  /* the previous round is still leaving */
    if (r == B_UNLOCKED) return b_lost(L, lr, who);
    b_gone_all(b, NOSLOT);            /* and may wait for a dead party */
    if (r == MP_TIMEOUT) { iunlock(&b->m, &b->holder); return b_broken(L, 0); }
    if (r == MP_INTERRUPTED) { iunlock(&b->m, &b->holder); return mp_waitresult(L, r); }
  }
  if (b->state != B_FILLING) { pid_t d = b->dead; iunlock(&b->m, &b->holder); return b_broken(L, d); }
  uint32_t index = b->count++;
  b_take(b, index);
  if (b->count == b->parties) {  /* the last to arrive runs the action and lets all go */
    b_gone_all(b, index);        /* unless a party died: then the round is broken */
    if (b->state != B_FILLING) { pid_t d = b->dead; b_leave(b, index); iunlock(&b->m, &b->holder); return b_broken(L, d); }
    if (lua_getiuservalue(L, 1, 1) != LUA_TNIL) {
      b->state = B_ACTION;
      iunlock(&b->m, &b->holder);
      int st = lua_pcall(L, 0, 0, 0);
      lr = ilock(L, &b->m, &b->holder, deadline, &who);
      if (lr != MP_LOCKED) {  /* the others see this party leave: the round breaks */
        b_abandon(b, index);
        if (st != LUA_OK) return lua_error(L);
        return b_lost(L, lr, who);
      }
      if (st != LUA_OK) { b_break(b); b_leave(b, index); iunlock(&b->m, &b->holder); return lua_error(L); }
      if (b->state != B_ACTION) { pid_t d = b->dead; b_leave(b, index); iunlock(&b->m, &b->holder); return b_broken(L, d); }
    }
    b->state = B_DRAINING;
    b_bump(b);
    b_leave(b, index);
    iunlock(&b->m, &b->holder);
    lua_pushinteger(L, index);
    return 1;
  }
  int r = MP_WOKE;
  while (b->state == B_FILLING || b->state == B_ACTION) {
    r = b_sleep(L, b, deadline, &lr, &who);
    if (r == B_UNLOCKED) {  /* the others see this party leave: the round breaks */
      b_abandon(b, index);
      return b_lost(L, lr, who);
    }
    if (b->state == B_FILLING || b->state == B_ACTION)  /* the next party in the ring */
      b_gone(b, index + 1 < b->count ? index + 1 : 0);
    if (r != MP_WOKE && (b->state == B_FILLING || b->state == B_ACTION)) { b_break(b); break; }
    r = MP_WOKE;
  }
  int passed = b->state == B_DRAINING;
  pid_t dead = b->dead;
  b_leave(b, index);
  iunlock(&b->m, &b->holder);
  if (r == MP_INTERRUPTED) return mp_waitresult(L, r);
  if (!passed) return b_broken(L, dead);
  lua_pushinteger(L, index);
  return 1;
}

/* the Barrier's lock for abort and reset: no timeout, only Ctrl-C ends the wait */
static void b_lock(lua_State *L, barrier_obj *b) {
  pid_t who = 0;
  int lr = ilock(L, &b->m, &b->holder, -1, &who);
  if (lr != MP_LOCKED) ilock_error(L, lr, "Barrier", who);
}

static int barrier_abort(lua_State *L) {
  barrier_obj *b = tobarrier(L, 1);
  b_lock(L, b);
  b->dead = 0;
  b_break(b);
  iunlock(&b->m, &b->holder);
  return 0;
}

static int barrier_reset(lua_State *L) {
  barrier_obj *b = tobarrier(L, 1);
  b_lock(L, b);
  b_gone_all(b, NOSLOT);  /* the dead would never leave */
  b->dead = 0;
  if (b->count > 0) {
    if (b->state == B_FILLING || b->state == B_ACTION || b->state == B_BROKEN) b->state = B_RESETTING;
  } else {
    b->state = B_FILLING;
  }
  b_bump(b);
  iunlock(&b->m, &b->holder);
  return 0;
}

static const luaL_Reg barrier_methods[] = {
  {"wait", barrier_wait}, {"abort", barrier_abort}, {"reset", barrier_reset},
  {"close", barrier_close}, {NULL, NULL}
};

/* fields parties, n_waiting, broken; then the methods */
static int barrier_index(lua_State *L) {
  const char *k = lua_tostring(L, 2);
  if (k && (!strcmp(k, "parties") || !strcmp(k, "n_waiting") || !strcmp(k, "broken"))) {
    barrier_obj *b = tobarrier(L, 1);
    int32_t state = __atomic_load_n(&b->state, __ATOMIC_ACQUIRE);
    if (k[0] == 'p') lua_pushinteger(L, b->parties);
    else if (k[0] == 'n') lua_pushinteger(L, state == B_FILLING ? __atomic_load_n(&b->count, __ATOMIC_ACQUIRE) : 0);
    else lua_pushboolean(L, state == B_BROKEN);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int barrier_tostring(lua_State *L) {
  mp_handle *h = mp_toself(L, 1, BARRIERS);
  if (!h->off) { lua_pushfstring(L, "%s (closed) %p", BARRIER, (void *)h); return 1; }
  barrier_obj *b = MP_PTR(h->off);
  if (b->state == B_BROKEN)
    lua_pushfstring(L, "%s (parties=%d, broken) %p", BARRIER, (int)b->parties, (void *)h);
  else
    lua_pushfstring(L, "%s (parties=%d, waiting=%d) %p", BARRIER, (int)b->parties,
                    b->state == B_FILLING ? (int)b->count : 0, (void *)h);
  return 1;
}

/* Barrier(parties [, action [, timeout]]) */
static int sync_Barrier(lua_State *L) {
  lua_settop(L, 3);
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 1 && n <= INT_MAX, 1, "parties must be >= 1");
  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  double timeout = -1;
  if (!lua_isnoneornil(L, 3)) {
    timeout = luaL_checknumber(L, 3);
    luaL_argcheck(L, timeout == timeout, 3, "timeout is NaN");
    if (timeout < 0) timeout = 0;
  }
  mp_handle *h = newhandle(L, sizeof(mp_handle), BARRIER, 1);
  lua_pushvalue(L, 2);
  lua_setiuservalue(L, -2, 1);
  h->off = mp_obj_new(L, sizeof(barrier_obj) + (size_t)n * sizeof(b_slot), T_BARRIER);
  h->pid = mp_getpid();
  barrier_obj *b = MP_PTR(h->off);
  mp_mutex_init(&b->m, 0);
  for (lua_Integer i = 0; i < n; i++) mp_mutex_init(&b->slot[i].m, 0);
  b->parties = (uint32_t)n;
  b->timeout = timeout;
  return 1;
}

static void barrier_decode(lua_State *L, const unsigned char *p, size_t n) {
  mp_handle_attach(L, p, n, T_BARRIER, BARRIER, sizeof(mp_handle), 1);
}

static const mp_handle_type barrier_type = { BARRIER, mp_handle_encode, barrier_decode };

/* core._sync_stop(barrier_or_condition): takes the object's internal lock,
** stops this process (SIGSTOP) and lets the lock go once continued: for tests
** of a process stopped inside one of the object's sections. */
static int sync_stop(lua_State *L) {
  pthread_mutex_t *m;
  pid_t *holder;
  if (luaL_testudata(L, 1, BARRIER)) { barrier_obj *b = tobarrier(L, 1); m = &b->m; holder = &b->holder; }
  else { cond_obj *c = MP_PTR(tocond(L, 1)->h.off); m = &c->m; holder = &c->holder; }
  ilock(NULL, m, holder, -1, NULL);
  raise(SIGSTOP);
  iunlock(m, holder);
  return 0;
}

static int sync_fault(lua_State *L) {
  static const char *const where[] = { "slots", NULL };
  luaL_checkoption(L, 1, NULL, where);
  slots_fault = (int)luaL_checkinteger(L, 2);
  return 0;
}

/* ------------------------------------------------------------- classes */

static const luaL_Reg lock_methods[] = {
  {"acquire", lock_acquire}, {"release", lock_release}, {"locked", lock_locked},
  {"close", lock_close}, {NULL, NULL}
};
static const luaL_Reg rlock_methods[] = {
  {"acquire", lock_acquire}, {"release", lock_release}, {"is_owned", lock_is_owned}, {"locked", lock_locked},
  {"close", lock_close}, {NULL, NULL}
};
static const luaL_Reg lock_meta[] = {
  {"__gc", lock_close}, {"__close", lock_close}, {"__tostring", lock_tostring}, {NULL, NULL}
};
static const luaL_Reg sem_methods[] = {
  {"acquire", sem_acquire}, {"release", sem_release}, {"get_value", sem_get_value},
  {"close", sem_close}, {NULL, NULL}
};
static const luaL_Reg sem_meta[] = {
  {"__gc", sem_close}, {"__close", sem_close}, {"__tostring", sem_tostring}, {NULL, NULL}
};
static const luaL_Reg event_methods[] = {
  {"set", event_set}, {"clear", event_clear}, {"is_set", event_is_set}, {"wait", event_wait},
  {"close", event_close}, {NULL, NULL}
};
static const luaL_Reg event_meta[] = {
  {"__gc", event_close}, {"__close", event_close}, {"__tostring", event_tostring}, {NULL, NULL}
};
static const luaL_Reg cond_methods[] = {
  {"acquire", cond_acquire}, {"release", cond_release}, {"wait", cond_wait},
  {"notify", cond_notify}, {"notify_all", cond_notify_all}, {"close", cond_close}, {NULL, NULL}
};
static const luaL_Reg cond_meta[] = {
  {"__gc", cond_close}, {"__close", cond_close}, {"__tostring", cond_tostring}, {NULL, NULL}
};
static const luaL_Reg barrier_meta[] = {
  {"__gc", barrier_close}, {"__close", barrier_close}, {"__tostring", barrier_tostring}, {NULL, NULL}
};

int mp_sync_open(lua_State *L) {
  static int atfork_set;
  if (!atfork_set) { atfork_set = 1; mp_atfork(forget_tid); }
  mp_obj_set_dtor(T_COND, c_blocks_free);  /* what a dead process's release of a Condition runs */
  static const struct { const char *name, *shortname; const luaL_Reg *methods, *meta; const mp_handle_type *type; } classes[] = {
    {LOCK, "Lock", lock_methods, lock_meta, &lock_type},
    {RLOCK, "RLock", rlock_methods, lock_meta, &rlock_type},
    {SEMAPHORE, "Semaphore", sem_methods, sem_meta, &sem_type},
    {BSEMAPHORE, "BoundedSemaphore", sem_methods, sem_meta, &bsem_type},
    {EVENT, "Event", event_methods, event_meta, &event_type},
    {CONDITION, "Condition", cond_methods, cond_meta, &cond_type},
  };
  /* core.sync_methods: the method tables, for the methods sync.lua adds */
  lua_createtable(L, 0, (int)(sizeof classes / sizeof classes[0]));
  for (size_t i = 0; i < sizeof classes / sizeof classes[0]; i++) {
    mp_newclass(L, classes[i].name, classes[i].methods, classes[i].meta);
    mp_codec_register(classes[i].type);
    luaL_getmetatable(L, classes[i].name);
    lua_getfield(L, -1, "__index");
    lua_setfield(L, -3, classes[i].shortname);
    lua_pop(L, 1);
  }
  lua_setfield(L, -2, "sync_methods");
  mp_newmetatable(L, BARRIER, mp_nregs(barrier_meta) + 1);  /* (+ __index) */
  luaL_setfuncs(L, barrier_meta, 0);
  luaL_newlib(L, barrier_methods);
  lua_pushcclosure(L, barrier_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  mp_codec_register(&barrier_type);
  static const luaL_Reg funcs[] = {
    {"Lock", sync_Lock}, {"RLock", sync_RLock}, {"Semaphore", sync_Semaphore},
    {"BoundedSemaphore", sync_BoundedSemaphore}, {"Event", sync_Event},
    {"Condition", sync_Condition}, {"Barrier", sync_Barrier}, {"_sync_stop", sync_stop},
    {"_sync_fault", sync_fault}, {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
