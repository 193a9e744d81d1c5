/* arena.c: the shared-memory arena, its allocator, and the table of the
** processes that share it (which tells when a forked copy of a handle is gone).
**
** Layout: the header (allocator state, an undo journal), the process table
** (MAXPROCS entries, reserved address space: pages are touched only as entries
** are used), then blocks from `start` up to the bump pointer `top`. Blocks lie
** end to end: each starts with a 32-byte header whose size leads to the next
** (alignment gaps are free "filler" blocks), so the heap can be walked.
**
** Size classes: 32-byte steps up to 256 bytes, then eight classes per power of
** two up to MAXSMALL (at most 12.5% rounding); bigger blocks are "large": page
** rounded, first fit from one list of free blocks of any size, their pages
** given back to the kernel when freed. When an allocation fails, deferred
** objects are swept and the free blocks are coalesced (compact) before giving up.
**
** Kills: every store that changes allocator state under the lock is logged
** first (offset, old value) in an undo journal in the arena, and the change
** ends by emptying the journal. A process killed while it holds the lock leaves
** an unfinished change, which the next locker (EOWNERDEAD) undoes: the
** allocator never sees half a change. The only losses are blocks the dead
** process held and could not give back: one it had been given (unless it was
** held: mp_alloc_held, freed when the process is found dead), or deferred
** objects it had taken off the list (sweep). One it was freeing is held by
** mp_free first, so it goes with the process (the undone free included).
**
** Owners: a block in use names its owner in its header (aux): the process of
** a hold slot (HELD_BY its entry), the structure it was handed to (mp_hand: a
** queue record), or nobody. It passes between a process and a structure with
** one store of that word while both name it, so a kill never leaves it without
** an owner, and only its owner frees it: a process found dead, the blocks its
** slots name that it still owns (entry_free); a queue, those its records own.
**
** Objects a fork may have copied: a fork copies every handle of the parent
** without counting it, so an object whose count reaches 0 may still be used by
** a process forked after the object was made. Every fork through core.fork
** reserves an entry in the process table before fork() (mp_proc_prefork) with
** a fork serial; the child holds a robust mutex of its entry for its whole life
** (mp_proc_child), so its death is seen by anyone (EOWNERDEAD), even when it
** was an orphan reaped by init; its parent frees the entry when it reaps it.
** A released object that a live process with a later serial may hold goes on
** a deferred list, freed by a sweep once no such process is alive (on reap,
** when a dead entry is found, and before reporting that the arena is full).
** A message in a queue owns a reference to each object its handles name (the
** put counts them, the get hands them to the decoded handles, a dropped message
** releases them: queue.c); objects named by bytes nobody owns (a pipe, a Lua
** string from core.encode) are pinned instead: they are never freed. What a
** process itself holds is also written in its ledger (see ledgers), released
** when it is found dead: processes leave with _exit, which runs no finalizer. A
** deferred object keeps its destructor in its block header, packed
** (mp_fn_pack): a spawned process maps the same build of the core at another
** address. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include "mp.h"

#define MAXSMALL ((uint64_t)1 << 21)
#define NCLASS 112                 /* size_class(MAXSMALL) + 1 */
#define PAGE ((uint64_t)4096)
#define POPULATE ((uint64_t)65536)  /* fresh blocks this big are faulted in at once, page aligned */
#define DEFAULT_SIZE ((uint64_t)64 << 30)
#define MAGIC 0x6c75614d50617262ULL
#define BLOCK_MAGIC 0x424cU
#define MAXPROCS 16384
#define JMAX 16
#define HOLDS 3

enum { B_USED = 0, B_FREE = 1, B_DEFERRED = 2, B_PENDING = 3, B_RELEASED = 4 };  /* block states */
enum { P_FREE = 0, P_USED = 1, P_BROKEN = 2 };                      /* process entries */

typedef struct jent { uint64_t off, val; } jent;

typedef struct arena_hdr {
  uint64_t magic, size;
  pthread_mutex_t lock;
  uint64_t start, top;        /* first block; bump pointer */
  uint64_t freelist[NCLASS];  /* small blocks by class */
  uint64_t large;             /* free blocks of other sizes, first fit */
  uint64_t used, blocks;      /* statistics */
  uint64_t deferred;          /* released objects a live fork may still use */
  uint64_t ndeferred;
  uint64_t procs;             /* offset of the process table */
  uint64_t procfree;          /* free entries: index + 1, linked */
  uint64_t prochwm;           /* entries ever used */
  uint32_t forks;             /* fork serial */
  uint32_t compacting;        /* a compaction was under way (rerun it) */
  uint64_t pending;           /* blocks freed while the lock was held by a stopped process */
  uint64_t draining;          /* the pending block being freed (see drain) */
  pid_t holder;               /* the lock's holder (0 when free), for waiters to name */
  uint32_t pad2;
  uint64_t orphans;           /* ledgers of dead processes, their references to release (block next links) */
  uint64_t jn, pad;           /* the undo journal: entries of an unfinished change */
  jent j[JMAX];
} arena_hdr;

typedef struct block {
  uint64_t size;   /* whole block, header included (a multiple of 32) */
  uint64_t tag;    /* BLOCK_MAGIC | state << 32 */
  uint64_t next;   /* list link (free or deferred) */
  uint64_t aux;    /* deferred: its destructor; in use: its owner (see owners) */
} block;           /* 32 bytes: keeps payloads 16-aligned */

#define TAG(st) ((uint64_t)BLOCK_MAGIC | (uint64_t)(st) << 32)
/* The owner word of a block in use: held by the process of entry slot (index
** + 1), or what mp_hand named (a queue record's offset, below HELD_BY(0)), or 0. */
#define HELD_BY(slot) (0x48454c44ULL << 32 | (uint64_t)(slot))

/* An entry of the process table: `alive` is held by the process all its life. */
typedef struct proc_entry {
  pthread_mutex_t alive;
  uint64_t word;   /* serial << 32 | state */
  uint64_t ids;    /* parent entry index + 1 */
  uint64_t link;   /* parent's serial << 32 | next free entry (index + 1) */
  uint64_t held[HOLDS];  /* blocks in the process's hands (payload offsets), freed if it dies */
  uint64_t started;      /* the serial of the occupant once it holds `alive` */
  uint64_t refs;         /* its ledger (payload offset, 0: none): the references it holds */
  uint64_t releasing;    /* a dead process's ledger it is releasing (see release_orphans) */
  uint64_t fresh;        /* its memory holds no handle copied from its parent (spawn, forkserver: see live_max_serial) */
  uint64_t asleep;       /* while it sleeps counted in a count of sleepers (q_wait): that count's offset */
} proc_entry;

static arena_hdr *arena;
static int arena_fd = -1;  /* the memfd, kept (CLOEXEC) for spawned processes (forkserver.c) */
#define myslot (mp_fk.arena_slot)  /* this process's entry, index + 1 */
#define mypid (mp_fk.pid)          /* getpid(), renewed in every child by a fork handler */
static int nocopies;       /* set in the forkserver's server: the processes it forks use no handle of its memory */
typedef struct ledger ledger;
#define led (mp_fk.arena_led)      /* this process's ledger (see ledgers; NULL: none yet) */
#define locked_here (arena->holder == mypid)  /* this process holds the arena lock */
#define MINE HELD_BY(myslot)       /* the owner word of the blocks this process holds */

#define OFF(p) ((uint64_t)((char *)(p) - (char *)arena))
#define BLK(off) ((block *)((char *)arena + (off)))
#define ENTRY(i) (&((proc_entry *)((char *)arena + arena->procs))[i])

void *mp_arena_base(void) { return arena; }

/* ------------------------------------------------------- journal, lock */

static uint32_t jcount;  /* entries of the open change (this process holds the lock) */
static uint32_t fault;   /* test hook (core._arena_fault): die at this store */
static int fault_sig = SIGKILL;  /* (or stop there: SIGSTOP) */
static uint32_t push_fault;  /* (or die in this push on the pending stack, see push_pending) */

/* Undoes an unfinished change of a process that died holding the lock. */
static void jundo(void) {
  char *base = (char *)arena;
  for (uint64_t i = arena->jn; i-- > 0;) *(uint64_t *)(base + arena->j[i].off) = arena->j[i].val;
  __atomic_store_n(&arena->jn, 0, __ATOMIC_RELEASE);
}

/* *p = v, its old value logged first: a kill after the log entry is undone */
static inline void jset(uint64_t *p, uint64_t v) {
  jent *e = &arena->j[jcount++];
  e->off = (uint64_t)((char *)p - (char *)arena);
  e->val = *p;
  arena->jn = jcount;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);  /* the log before the store, in program order */
  if (__builtin_expect(fault != 0, 0) && --fault == 0) raise(fault_sig);
  *p = v;
}

static inline void jcommit(void) {  /* the commit point: the log is emptied */
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  arena->jn = 0;
  jcount = 0;
}

static void compact(void);
static uint64_t *held_slot(uint64_t off);
static inline void free_locked(uint64_t off, uint64_t *hold) __attribute__((always_inline));
static void defer_locked(uint64_t off, uint64_t *hold);

/* A block popped off the pending stack (arena locked, its offset in `draining`):
** a freed block is freed; a released object (B_RELEASED, see release_last)
** joins the deferred list, for the next sweep to free. */
static void settle_pending(uint64_t h) {
  if (BLK(h)->tag == TAG(B_RELEASED)) defer_locked(h, &arena->draining);
  else free_locked(h, &arena->draining);
}

/* Waits on the lock. Its holder is in a section of a few microseconds, unless
** it was stopped (SIGSTOP, a debugger) in one: a stopped process cannot be
** robbed, so the wait has ways out instead (mp_ilock): Ctrl-C, and the
** deadline of the Lua call allocating (mp_alloc_context), which ends it once
** the holder is stopped. A free never waits for a stopped holder: it leaves its
** block on the pending stack, which the next unlock drains (mp_free).
**
** A release of the last reference to an object that a later fork may hold
** (release_last) does not wait either: the object goes on the same stack,
** marked B_RELEASED, and the unlock moves it to the deferred list.
**
** The pending stack: pushed without the lock (a CAS on `pending`), popped only
** by the lock's holder, so a pop cannot be confused by a push (no ABA). A pop
** names its block in `draining` first, and the free that follows clears it in
** the same journaled change: a holder killed in between leaves `draining` set
** to a block that is no longer on the stack, which the next locker frees. */
static void drain(void) {
  uint64_t h;
  while ((h = __atomic_load_n(&arena->pending, __ATOMIC_ACQUIRE)) != 0) {
    __atomic_store_n(&arena->draining, h, __ATOMIC_SEQ_CST);
    if (!__atomic_compare_exchange_n(&arena->pending, &h, BLK(h)->next, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
      continue;  /* a block was pushed meanwhile */
    settle_pending(h);
  }
}

/* after a holder's death: the block it was draining, if it left the stack */
static void undrain(void) {
  uint64_t d = arena->draining;
  if (!d) return;
  for (uint64_t o = __atomic_load_n(&arena->pending, __ATOMIC_ACQUIRE); o; o = BLK(o)->next)
    if (o == d) { arena->draining = 0; return; }  /* still stacked: drained as any other */
  settle_pending(d);
}

/* 1 locked; 0 not (the wait was given up: *why is MP_LOCK_TIMEOUT or
** MP_LOCK_INTERRUPTED, *who the holder). The fast path is one trylock. */
static int arena_lock_slow(lua_State *L, double deadline, int r, int *why, pid_t *who) {
  pid_t h = 0;
  deadline = mp_when(deadline);  /* (a put's MP_AFTER: from now) */
  int k = r == EOWNERDEAD ? MP_LOCK_OWNERDEAD : mp_ilock(L, &arena->lock, &arena->holder, deadline, &h);
  if (k == MP_LOCK_TIMEOUT || k == MP_LOCK_INTERRUPTED) {
    if (why) *why = k;
    if (who) *who = h;
    return 0;
  }
  if (k == MP_LOCK_DEADLOCK) abort();  /* held by this process, or unrecoverable: a bug of ours */
  if (k == MP_LOCK_OWNERDEAD) {  /* its holder died: undo what it left unfinished */
    jundo();
    if (arena->compacting) compact();
    undrain();
    pthread_mutex_consistent(&arena->lock);
  }
  return 1;
}

static inline int arena_lock_until(lua_State *L, double deadline, int *why, pid_t *who) {
  int r = pthread_mutex_trylock(&arena->lock);
  if (__builtin_expect(r != 0, 0) && !arena_lock_slow(L, deadline, r, why, who)) return 0;
  arena->holder = mypid;
  return 1;
}

/* for the callers that cannot give up: waits as long as it takes */
static void arena_lock(void) { arena_lock_until(NULL, -1, NULL, NULL); }

static void arena_unlock(void) {
  if (__builtin_expect(__atomic_load_n(&arena->pending, __ATOMIC_RELAXED) != 0, 0)) drain();
  arena->holder = 0;
  pthread_mutex_unlock(&arena->lock);
}

/* The allocating call (mp_alloc_context) and why the last allocation failed
** other than for want of space (0: it did not). */
mp_allocctx mp_alloc_ctx = { NULL, -1 };
#define ctx_L mp_alloc_ctx.L
#define ctx_deadline mp_alloc_ctx.deadline
static int fail_why;
static pid_t fail_pid;

/* ---------------------------------------------------------- creation */

int mp_arena_ensure(lua_State *L) {
  if (arena) return 0;
  uint64_t size = DEFAULT_SIZE;
  const char *env = getenv("LUA_MP_ARENA_SIZE");
  if (env && *env) size = (uint64_t)strtoull(env, NULL, 0) & ~(uint64_t)0xfffff;
  if (size < ((uint64_t)16 << 20)) size = (uint64_t)16 << 20;
  int fd = memfd_create("lua-multiprocessing", MFD_CLOEXEC);
  if (fd < 0) return luaL_error(L, "cannot create shared memory: %s", strerror(errno));
  if (ftruncate(fd, (off_t)size) != 0) {
    int e = errno; close(fd);
    return luaL_error(L, "cannot size shared memory: %s", strerror(e));
  }
  /* placed away from where the kernel puts libraries and heaps (a hint, at a
  ** random GiB of 16-20 TiB), so that a spawned interpreter, whose libraries
  ** lie elsewhere, finds the same address free (mp_arena_attach) */
  uint64_t r = 0;
  if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) r = (uint64_t)getpid() * 2654435761u;
  void *hint = (void *)(uintptr_t)(((uint64_t)16 << 40) + (r % 4096) * ((uint64_t)1 << 30));
  void *p = mmap(hint, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  int e = errno;
  /* the mapping keeps the memory alive; nothing to unlink, ever. The descriptor
  ** stays open (close-on-exec) only to hand the arena to spawned interpreters */
  if (p == MAP_FAILED) { close(fd); return luaL_error(L, "cannot map shared memory: %s", strerror(e)); }
  arena_fd = fd;
  arena_hdr *a = p;
  a->magic = MAGIC;
  a->size = size;
  mp_mutex_init(&a->lock, 0);
  a->procs = (sizeof(arena_hdr) + 63) & ~(uint64_t)63;
  a->start = a->top = (a->procs + MAXPROCS * sizeof(proc_entry) + PAGE - 1) & ~(PAGE - 1);
  arena = a;
  mypid = getpid();
  /* this process is entry 0, serial 0: it never holds back a free */
  proc_entry *me = ENTRY(0);
  mp_mutex_init(&me->alive, 0);
  pthread_mutex_lock(&me->alive);
  me->word = P_USED;
  me->started = 0;
  a->prochwm = 1;
  myslot = 1;
  return 0;
}

/* ------------------------------------------------------- size classes */

static inline int size_class(uint64_t n) {  /* 1 <= n <= MAXSMALL */
  if (n <= 256) return (int)((n + 31) >> 5) - 1;
  int p = 63 - __builtin_clzll(n - 1);  /* 2^p < n <= 2^(p+1) */
  return 8 + (p - 8) * 8 + (int)(((n - 1) >> (p - 3)) & 7);
}

static inline uint64_t class_size(int c) {
  if (c < 8) return (uint64_t)(c + 1) << 5;
  int p = 8 + (c - 8) / 8, k = (c - 8) % 8;
  return ((uint64_t)1 << p) + ((uint64_t)(k + 1) << (p - 3));
}

/* the list a free block of this size belongs on */
static inline uint64_t *list_of(uint64_t size) {
  if (size <= MAXSMALL) {
    int c = size_class(size);
    if (class_size(c) == size) return &arena->freelist[c];
  }
  return &arena->large;
}

static void give_back(uint64_t off, uint64_t size) {  /* a free range's whole pages to the kernel */
  uint64_t start = (off + sizeof(block) + PAGE - 1) & ~(PAGE - 1);
  uint64_t end = (off + size) & ~(PAGE - 1);
  if (end > start) madvise((char *)arena + start, end - start, MADV_REMOVE);
}

/* ------------------------------------------------------------ allocation */

/* First fit among the free blocks of other sizes (arena locked, journal open):
** the block's offset and its size in *n (the whole block if the rest is too small). */
static uint64_t from_large(uint64_t *n) {
  for (uint64_t *link = &arena->large; *link; link = &BLK(*link)->next) {
    block *b = BLK(*link);
    if (b->size < *n) continue;
    uint64_t off = *link;
    jset(link, b->next);
    if (b->size - *n >= 64) {  /* split: the tail goes back */
      uint64_t t = off + *n, ts = b->size - *n;
      jset(&BLK(t)->size, ts);
      jset(&BLK(t)->tag, TAG(B_FREE));
      uint64_t *tl = list_of(ts);
      jset(&BLK(t)->next, tl == link ? b->next : *tl);
      jset(tl, t);
    } else {
      *n = b->size;
    }
    return off;
  }
  return 0;
}

/* Fresh space at the top (arena locked, journal open), or 0. */
static uint64_t from_top(uint64_t n, int *fresh) {
  uint64_t align = n >= POPULATE ? PAGE : 32;
  uint64_t top = arena->top, at = (top + align - 1) & ~(align - 1);
  if (at + n > arena->size) return 0;
  if (at > top) {  /* the gap becomes a free filler block, found again by compact */
    jset(&BLK(top)->size, at - top);
    jset(&BLK(top)->tag, TAG(B_FREE));
  }
  jset(&arena->top, at + n);
  *fresh = n >= POPULATE;
  return at;
}

/* One attempt (arena locked): a block of n bytes (or a little more), or 0.
** Small: its class's list, else fresh space, else a piece of a free block.
** Large: a free block first, so that freed address space is used again. */
static uint64_t alloc_locked(uint64_t n, int *fresh, uint64_t *hold) {
  uint64_t off = 0;
  if (n <= MAXSMALL) {
    uint64_t *head = &arena->freelist[size_class(n)];
    if (*head) {
      off = *head;
      jset(head, BLK(off)->next);
    } else if (!(off = from_top(n, fresh))) {
      off = from_large(&n);
    }
  } else if (!(off = from_large(&n))) {
    off = from_top(n, fresh);
  }
  if (!off) return 0;
  jset(&BLK(off)->size, n);
  jset(&BLK(off)->tag, TAG(B_USED));
  jset(&arena->used, arena->used + n);
  jset(&arena->blocks, arena->blocks + 1);
  if (hold) {
    jset(hold, off + sizeof(block));
    jset(&BLK(off)->aux, MINE);
  } else {
    BLK(off)->aux = 0;  /* nobody's (an undone change leaves it on a free block: harmless) */
  }
  jcommit();
  return off;
}

static uint64_t alloc_once(uint64_t n, int hold) {
  int fresh = 0;
  /* a big block is held while its fresh pages are faulted in (a long time, for a
  ** kill to land in and leak it), and let go of just before it is returned */
  int brief = !hold && n >= POPULATE;
  if (!arena_lock_until(ctx_L, ctx_deadline, &fail_why, &fail_pid)) return 0;
  uint64_t off = alloc_locked(n, &fresh, hold || brief ? held_slot(0) : NULL);
  arena_unlock();
  /* fresh pages: one call to fault them all in is much cheaper than a fault per page */
  if (fresh) madvise(BLK(off), n, MADV_POPULATE_WRITE);
  if (brief && off) mp_unhold(off + sizeof(block));
  return off;
}

static void sweep(void);

static uint64_t alloc(size_t want, int hold) {
  fail_why = 0;
  if (!arena || want > arena->size - arena->start) return 0;
  uint64_t n = (uint64_t)want + sizeof(block);
  n = n <= MAXSMALL ? class_size(size_class(n)) : (n + PAGE - 1) & ~(PAGE - 1);
  uint64_t off = alloc_once(n, hold);
  if (!off && !fail_why) {  /* full: free what can be, coalesce, try again */
    sweep();
    if (!arena_lock_until(ctx_L, ctx_deadline, &fail_why, &fail_pid)) return 0;
    compact();
    arena_unlock();
    off = alloc_once(n, hold);
  }
  return off ? off + sizeof(block) : 0;
}

uint64_t mp_alloc_try(size_t want) { return alloc(want, 0); }
uint64_t mp_alloc_held(size_t want) { return alloc(want, 1); }

uint64_t mp_alloc(lua_State *L, size_t n) {
  mp_arena_ensure(L);
  mp_alloc_context(L, -1);  /* a call without a timeout: only Ctrl-C ends its wait */
  uint64_t off = mp_alloc_try(n);
  mp_alloc_context(NULL, -1);
  if (!off) mp_oom_error(L, n);
  return off;
}

/* The lock's wait was given up: "put timed out: the shared memory allocator is
** held by stopped process 1234" (the call named as the user made it). */
static int lockfail_error(lua_State *L) {
  int why = fail_why;
  pid_t who = fail_pid;
  fail_why = 0;
  const char *stopped = mp_pid_stopped(who) ? "stopped " : "";
  if (why == MP_LOCK_TIMEOUT)
    return luaL_error(L, "%s timed out: the shared memory allocator is held by %sprocess %d", mp_callname(L),
                      stopped, (int)who);
  mp_take_interrupt(L);
  if (who)
    return luaL_error(L, "interrupted! (%s waited for the shared memory allocator, held by %sprocess %d)",
                      mp_callname(L), stopped, (int)who);
  return luaL_error(L, "interrupted! (%s waited for the shared memory allocator)", mp_callname(L));
}

int mp_alloc_gave_up(void) {
  if (fail_why != MP_LOCK_TIMEOUT) return 0;
  fail_why = 0;
  return 1;
}

int mp_oom_error(lua_State *L, size_t want) {
  if (fail_why) return lockfail_error(L);
  return luaL_error(L, "out of shared memory: %I bytes wanted, arena limit %I bytes (%I in use; set LUA_MP_ARENA_SIZE)",
                    (lua_Integer)want, (lua_Integer)(arena ? arena->size : 0), (lua_Integer)mp_arena_used());
}

/* Frees the block at off and empties *hold in the same step (arena locked). */
static inline void free_locked(uint64_t off, uint64_t *hold) {
  block *b = BLK(off);
  uint64_t *head = list_of(b->size);
  jset(&b->next, *head);
  jset(&b->tag, TAG(B_FREE));
  jset(head, off);
  jset(&arena->used, arena->used - b->size);
  jset(&arena->blocks, arena->blocks - 1);
  if (hold) jset(hold, 0);
  jcommit();
}

/* Puts the released object whose block is at off on the deferred list and
** empties *hold in the same step (arena locked); its destructor is in aux. */
static void defer_locked(uint64_t off, uint64_t *hold) {
  block *b = BLK(off);
  jset(&b->next, arena->deferred);
  jset(&b->tag, TAG(B_DEFERRED));
  jset(&arena->deferred, off);
  jset(&arena->ndeferred, arena->ndeferred + 1);
  if (hold) jset(hold, 0);
  jcommit();
}

/* this process's hold slot for the block at payload offset off, or NULL */
static uint64_t *held_slot(uint64_t off) {
  if (!myslot) return NULL;
  uint64_t *h = ENTRY(myslot - 1)->held;
  for (int k = 0; k < HOLDS; k++) if (__atomic_load_n(&h[k], __ATOMIC_RELAXED) == off) return &h[k];
  return NULL;
}

/* marks the block st (B_PENDING, B_RELEASED) and pushes it on the pending stack */
static void push_pending(uint64_t bo, int st) {
  block *b = BLK(bo);
  __atomic_store_n(&b->tag, TAG(st), __ATOMIC_SEQ_CST);
  if (__builtin_expect(push_fault != 0, 0) && --push_fault == 0) raise(SIGKILL);
  uint64_t head = __atomic_load_n(&arena->pending, __ATOMIC_ACQUIRE);
  do b->next = head;
  while (!__atomic_compare_exchange_n(&arena->pending, &head, bo, 1, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE));
}

void mp_free(uint64_t off) {
  if (!off) return;
  block *b = BLK(off - sizeof(block));
  if (b->tag != TAG(B_USED)) abort();  /* double free: a bug of ours */
  /* ours alone from here: held, so that a kill inside the free (giving its pages
  ** back, waiting for the lock: long for a big block or a busy arena) frees it
  ** with the process instead of leaking it; free_locked lets go of it */
  uint64_t *hold = b->aux == MINE ? held_slot(off) : NULL;
  if (!hold) { mp_hold(off); hold = held_slot(off); }
  /* still ours alone: its pages can go before anyone can take it again */
  if (b->size > MAXSMALL) give_back(off - sizeof(block), b->size);
  if (!arena_lock_until(NULL, 0, NULL, NULL)) {
    /* the lock's holder is stopped: the block goes on the pending stack, freed
    ** by the next unlock; a kill before it is pushed leaves it held, and
    ** entry_free frees it when it is not on the stack */
    push_pending(off - sizeof(block), B_PENDING);
    if (hold) __atomic_store_n(hold, 0, __ATOMIC_SEQ_CST);
    return;
  }
  free_locked(off - sizeof(block), hold);
  arena_unlock();
}

/* The block becomes this process's: named in a hold slot first, then owned
** from the one store of its owner word, so that whoever settles the structure
** it came from sees who owns it (see owners). */
void mp_hold(uint64_t off) {
  uint64_t *h = held_slot(0);  /* a free slot; none: it stays its structure's */
  if (!h) return;
  __atomic_store_n(h, off, __ATOMIC_RELEASE);
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(&BLK(off - sizeof(block))->aux, MINE, __ATOMIC_RELEASE);
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

/* The block passes to the structure that names it (owner: its record's offset),
** in one store; its hold slot is let go after (mp_unhold). */
void mp_hand(uint64_t off, uint64_t owner) {
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(&BLK(off - sizeof(block))->aux, owner, __ATOMIC_RELEASE);
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

int mp_owned_by(uint64_t off, uint64_t owner) {
  block *b = BLK(off - sizeof(block));
  return __atomic_load_n(&b->tag, __ATOMIC_ACQUIRE) == TAG(B_USED) && __atomic_load_n(&b->aux, __ATOMIC_ACQUIRE) == owner;
}

void mp_unhold(uint64_t off) {
  uint64_t *h = off ? held_slot(off) : NULL;
  if (h) __atomic_store_n(h, 0, __ATOMIC_SEQ_CST);
}

/* Coalesces runs of free blocks, rebuilds the free lists from the block
** headers alone and lowers top over a free end (arena locked). Every step is
** a single store that leaves the heap walkable, and the lists are rebuilt
** from scratch: a compaction cut short by a kill is simply run again. */
static void compact(void) {
  __atomic_store_n(&arena->compacting, 1, __ATOMIC_RELEASE);
  for (int c = 0; c < NCLASS; c++) arena->freelist[c] = 0;
  arena->large = 0;
  uint64_t off = arena->start, top = arena->top;
  while (off < top) {
    block *b = BLK(off);
    if (b->tag == TAG(B_FREE)) {
      while (off + b->size < top && BLK(off + b->size)->tag == TAG(B_FREE))
        b->size += BLK(off + b->size)->size;
      if (off + b->size == top) {  /* the free end goes back to the kernel */
        give_back(off, b->size);
        __atomic_store_n(&arena->top, off, __ATOMIC_RELEASE);
        break;
      }
      uint64_t *head = list_of(b->size);
      b->next = *head;
      *head = off;
    }
    off += b->size;
  }
  __atomic_store_n(&arena->compacting, 0, __ATOMIC_RELEASE);
}

size_t mp_arena_used(void) { return arena ? arena->used : 0; }
/* the part of the arena handed out so far: a valid object lies below it */
size_t mp_arena_top(void) { return arena ? arena->top : 0; }
size_t mp_arena_blocks(void) { return arena ? arena->blocks : 0; }
void mp_arena_forked(void) { if (arena) __atomic_add_fetch(&arena->forks, 1, __ATOMIC_SEQ_CST); }
uint32_t mp_arena_forks(void) { return arena ? __atomic_load_n(&arena->forks, __ATOMIC_SEQ_CST) : 0; }

/* ------------------------------------------------------------ processes */

/* An entry is used from the parent's prefork until the process is known dead.
** Its mutex held: the process is alive. Not held (free, or its last holder
** died): if the process had started (`started` is its serial) it is dead; if
** not, it lives while its parent does (an unstarted child whose parent died
** finds its entry gone when it starts, and leaves). `started` matters because
** the last holder may be a checker killed while it held the mutex. */

/* Is the block at bo on the pending stack, or being drained? (arena locked) */
static int stacked(uint64_t bo) {
  if (bo == arena->draining) return 1;
  for (uint64_t o = __atomic_load_n(&arena->pending, __ATOMIC_ACQUIRE); o; o = BLK(o)->next)
    if (o == bo) return 1;
  return 0;
}

static void entry_free(uint32_t i) {  /* arena locked; the process is dead */
  proc_entry *e = ENTRY(i);
  /* what it owned goes with it: a slot may name a block it handed on (owned by
  ** another now), or one it marked pending (mp_free) and died before pushing */
  for (int k = 0; k < HOLDS; k++) {
    uint64_t h = e->held[k];
    if (!h) continue;
    block *b = BLK(h - sizeof(block));
    if (h >= arena->start + sizeof(block) && h < arena->top && h % 32 == 0 && b->aux == HELD_BY(i + 1) &&
        (b->tag == TAG(B_USED) || (b->tag == TAG(B_PENDING) && !stacked(h - sizeof(block))))) {
      if (b->size > MAXSMALL) give_back(h - sizeof(block), b->size);
      free_locked(h - sizeof(block), &e->held[k]);
    } else {
      e->held[k] = 0;
    }
  }
  /* its references, and those of a dead process it was releasing, for the next sweep */
  for (int k = 0; k < 2; k++) {
    uint64_t *lp = k ? &e->releasing : &e->refs, l = *lp;
    if (!l) continue;
    block *b = BLK(l - sizeof(block));
    if (l >= arena->start + sizeof(block) && l < arena->top && l % 32 == 0 && b->tag == TAG(B_USED)) {
      jset(&b->next, arena->orphans);
      jset(&arena->orphans, l - sizeof(block));
    }
    jset(lp, 0);
  }
  /* a count of sleepers it died counted in: one less, once the entry is free (a kill of
  ** this process in between leaves the count one too high: wake-ups no one needs, never
  ** one missed) */
  uint64_t slept = e->asleep;
  jset(&e->asleep, 0);
  jset(&e->link, arena->procfree);
  jset(&e->word, P_FREE);
  jset(&arena->procfree, i + 1);
  jcommit();
  if (slept >= arena->start && slept + 4 <= arena->top && slept % 4 == 0) {
    uint32_t *n = (uint32_t *)((char *)arena + slept), v = __atomic_load_n(n, __ATOMIC_SEQ_CST);
    while (v && !__atomic_compare_exchange_n(n, &v, v - 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
  }
}

int mp_asleep_in(uint32_t *count) {
  if (!arena || !myslot) return 0;
  uint64_t off = (uint64_t)((char *)count - (char *)arena), none = 0;
  if ((char *)count < (char *)arena || off < arena->start || off + 4 > arena->top) return 0;  /* (not shared) */
  return __atomic_compare_exchange_n(&ENTRY(myslot - 1)->asleep, &none, off, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

void mp_awake(void) { __atomic_store_n(&ENTRY(myslot - 1)->asleep, 0, __ATOMIC_SEQ_CST); }

/* Is the process of used entry i alive? A dead one's entry is freed, its mutex
** left unlocked and consistent for the next occupant (arena locked). */
static int entry_alive(uint32_t i) {
  /* entry 0, the arena's creator, is never taken for dead: its mutex is held by
  ** the thread that made the arena, which in a host may end (a loader thread)
  ** while the process lives on; its children die with it (lifelines) */
  if (i + 1 == myslot || i == 0) return 1;
  proc_entry *e = ENTRY(i);
  int r = pthread_mutex_trylock(&e->alive);
  if (r == EBUSY) return 1;
  if (r == EOWNERDEAD) pthread_mutex_consistent(&e->alive);
  else if (r != 0) return 1;  /* not recoverable: count it alive */
  int alive = 0;
  if (e->started != e->word >> 32) {  /* not started: alive while its parent is */
    uint32_t pi = (uint32_t)e->ids - 1;
    proc_entry *pe = ENTRY(pi);
    alive = pe->word == (e->link & ~(uint64_t)0xffffffff) + P_USED && entry_alive(pi);
  }
  if (!alive) entry_free(i);  /* while we hold its mutex: a child starting now sees it */
  pthread_mutex_unlock(&e->alive);
  return alive;
}

/* The highest fork serial of a live process that may hold uncounted copies of
** handles (arena locked): not a fresh interpreter (a spawned one, a forkserver's
** worker), which holds only the handles it decoded, counted; it is counted
** from its parent's prefork until it marks its entry (mp_proc_child). *died
** tells whether a dead one was found (and its entry freed). */
static uint32_t live_max_serial(int *died) {
  uint32_t max = 0;
  for (uint32_t i = 0; i < arena->prochwm; i++) {
    uint64_t w = ENTRY(i)->word;
    if ((uint32_t)w != P_USED) continue;
    if (!entry_alive(i)) { *died = 1; continue; }
    if (__atomic_load_n(&ENTRY(i)->fresh, __ATOMIC_ACQUIRE)) continue;  /* it holds no uncounted copy */
    if ((uint32_t)(w >> 32) > max) max = (uint32_t)(w >> 32);
  }
  return max;
}

/* The children this process started and has not reaped: pid -> token (the
** first MP_KIDS_HERE in mp_fk: see mp.h). */
static mp_kid_entry *kids = mp_fk.arena_kids;
static size_t capkids = MP_KIDS_HERE;
#define nkids (mp_fk.arena_nkids)

uint64_t mp_proc_prefork(lua_State *L) { return mp_proc_prefork_until(L, -1, NULL); }

uint64_t mp_proc_prefork_until(lua_State *L, double deadline, pid_t *stopped) {
  if (stopped) *stopped = 0;
  if (!arena || !myslot) return 0;
  if (nkids == capkids) {  /* room first: the parent hook cannot fail */
    size_t cap = capkids * 2;
    mp_kid_entry *k = kids == mp_fk.arena_kids ? malloc(cap * sizeof *k) : realloc(kids, cap * sizeof *k);
    if (!k) return luaL_error(L, "cannot start a process: out of memory");
    if (kids == mp_fk.arena_kids) memcpy(k, kids, nkids * sizeof *k);
    kids = k;
    capkids = cap;
  }
  int why;
  pid_t who;
  if (!arena_lock_until(L, deadline, &why, &who)) {  /* Ctrl-C, or the deadline passed with the holder stopped */
    if (why == MP_LOCK_TIMEOUT && stopped) { *stopped = who ? who : -1; return 0; }
    mp_take_interrupt(L);
    if (who) return luaL_error(L, "interrupted! (cannot start a process: the shared memory allocator is held by %sprocess %d)",
                               mp_pid_stopped(who) ? "stopped " : "", (int)who);
    return luaL_error(L, "interrupted! (cannot start a process: waited for the shared memory allocator)");
  }
  if (!arena->procfree && arena->prochwm == MAXPROCS) { int d = 0; live_max_serial(&d); }
  uint32_t i;
  if (arena->procfree) {
    i = (uint32_t)arena->procfree - 1;
    jset(&arena->procfree, (uint32_t)ENTRY(i)->link);
  } else if (arena->prochwm < MAXPROCS) {
    i = (uint32_t)arena->prochwm;
    mp_mutex_init(&ENTRY(i)->alive, 0);
    jset(&arena->prochwm, i + 1);
  } else {
    arena_unlock();
    return luaL_error(L, "cannot start a process: %d processes already share the arena", MAXPROCS);
  }
  proc_entry *e = ENTRY(i), *me = ENTRY(myslot - 1);
  uint64_t serial = __atomic_add_fetch(&arena->forks, 1, __ATOMIC_SEQ_CST);
  jset(&e->ids, myslot);
  jset(&e->fresh, 0);
  jset(&e->link, me->word & ~(uint64_t)0xffffffff);  /* the parent's serial, to know it again */
  jset(&e->word, serial << 32 | P_USED);
  jcommit();
  arena_unlock();
  return serial << 32 | (i + 1);
}

MP_FORK_PATH void mp_proc_child(uint64_t token) {  /* (mypid: renew_pid set it) */
  led = NULL;  /* the parent's ledger is not ours: ours starts empty */
  nkids = 0;  /* the parent's children are not ours (their array, our copy, is reused:
              ** freeing it would write to heap pages shared with the parent) */
  myslot = 0;
  /* token 0: no entry (the forkserver's server, a child of a process outside the
  ** table). The server's workers, forked from it with their requester's token,
  ** run a fresh interpreter: the handles in their memory are the server's copies,
  ** never used */
  int fresh = nocopies;
  nocopies = !token;
  if (!token) return;
  proc_entry *e = ENTRY((uint32_t)token - 1);
  int ok;
  if (pthread_mutex_lock(&e->alive) == EOWNERDEAD) {
    /* a previous occupant died unseen, or a checker died holding it: ask under the lock */
    pthread_mutex_consistent(&e->alive);
    arena_lock();
    ok = e->word == ((token & ~(uint64_t)0xffffffff) | P_USED);
    arena_unlock();
  } else {  /* whoever held it finished what it wrote before letting go */
    ok = __atomic_load_n(&e->word, __ATOMIC_ACQUIRE) == ((token & ~(uint64_t)0xffffffff) | P_USED);
  }
  /* our parent died before we could hold our entry: what it held may be gone */
  if (!ok) _exit(1);
  __atomic_store_n(&e->started, token >> 32, __ATOMIC_SEQ_CST);
  myslot = (uint32_t)token;
  if (fresh) __atomic_store_n(&e->fresh, 1, __ATOMIC_RELEASE);
}

MP_FORK_PATH void mp_proc_parent(uint64_t token, pid_t pid) {
  if (!token) return;
  if (pid >= 0) { kids[nkids++] = (mp_kid_entry){ pid, token }; return; }
  uint32_t i = (uint32_t)token - 1;
  arena_lock();  /* the fork failed: the entry goes */
  if ((ENTRY(i)->word >> 32) == (token >> 32)) entry_free(i);
  arena_unlock();
}

void mp_proc_reaped(pid_t pid) {
  size_t k = 0;
  while (k < nkids && kids[k].pid != pid) k++;
  if (k == nkids) return;
  uint64_t token = kids[k].token;
  kids[k] = kids[--nkids];
  uint32_t i = (uint32_t)token - 1;
  proc_entry *e = ENTRY(i);
  /* a stopped holder is not waited for: the entry of a dead process is freed
  ** by whoever next finds it (entry_alive) */
  if (!arena_lock_until(NULL, 0, NULL, NULL)) return;
  if (e->word == ((token & ~(uint64_t)0xffffffff) | P_USED)) {
    int r = pthread_mutex_trylock(&e->alive);
    if (r == EOWNERDEAD) pthread_mutex_consistent(&e->alive);
    if (r == 0 || r == EOWNERDEAD) {
      entry_free(i);
      pthread_mutex_unlock(&e->alive);
    } else {  /* a mutex nobody can take again: never reused */
      jset(&e->word, P_BROKEN);
      jcommit();
    }
  }
  arena_unlock();
  sweep();
}

/* ------------------------------------------------------------ ledgers */

/* A process's ledger: the references it holds, object by object, in a block of
** the arena named by its process entry (`refs`), so that they are released
** when it is found dead, whatever it died of (_exit runs no finalizer; a kill
** runs nothing). Counted here: what mp_obj_new and mp_obj_retain count for this
** process (a handle made or decoded, a lock a Value keeps), and the message
** references its decoded handles adopted; not what messages own (mp_obj_count,
** mp_obj_drop). Only its process writes it; it is read once that process is dead.
**
** An open-addressed table of (offset, count), linear probing, at most half full.
** A key is never removed: a count that falls to 0 leaves its key, reused when
** the same offset is counted again, and dropped when the table is rebuilt
** (when half its keys are used, or when fewer than 1/16 of its entries count);
** an empty one of the smallest size stays until arena_stats. A
** ledger may count less than the process holds, never more: a count goes up
** after the object's (a kill between the two leaks that reference), down before
** it (the same), and a reference the ledger could not record (no arena for a
** bigger table) is simply not released at death. A dead process's ledger goes
** on the arena's orphan list (entry_free, under the lock); the next sweep, by
** any process, takes it (recorded in its own entry's `releasing`, so that its
** death hands the rest on), zeroes each count before releasing it, and frees it. */
typedef struct lent { uint64_t off, n; } lent;
struct ledger { uint32_t cap, shift, used, live; lent e[]; };  /* cap: a power of 2; used: keys; live: counts > 0 */
#define LMIN 16

static inline uint64_t led_slot(const ledger *l, uint64_t off) {
  return (off * 0x9e3779b97f4a7c15ULL) >> l->shift;
}

/* A new ledger with this ledger's live entries (room for 4 times as many, at
** least LMIN), published in this process's entry; the old one is freed. 0 when there is no room (or the allocator's lock
** is held by a stopped process: never waited for). */
static int led_grow(void) {
  static int growing;  /* (nothing an allocation runs counts for this process: a guard all the same) */
  if (growing) return 0;
  ledger *old = led;
  uint64_t live = old ? old->live : 0;
  uint32_t cap = LMIN, shift = 64 - 4;
  while ((uint64_t)cap < live * 4) { cap *= 2; shift--; }
  mp_allocctx ctx = mp_alloc_ctx;
  int why = fail_why;
  pid_t who = fail_pid;
  mp_alloc_context(NULL, 0);
  growing = 1;
  uint64_t off = alloc(sizeof(ledger) + (size_t)cap * sizeof(lent), 1);  /* held: freed if we die now */
  growing = 0;
  mp_alloc_ctx = ctx;
  fail_why = why;
  fail_pid = who;
  if (!off) return 0;
  ledger *l = MP_PTR(off);
  memset(l, 0, sizeof(ledger) + (size_t)cap * sizeof(lent));
  l->cap = cap;
  l->shift = shift;
  if (old)
    for (uint32_t i = 0; i < old->cap; i++) {
      if (!old->e[i].off || !old->e[i].n) continue;
      uint64_t k = led_slot(l, old->e[i].off);
      while (l->e[k].off) k = (k + 1) & (cap - 1);
      l->e[k] = old->e[i];
      l->used++;
    }
  l->live = l->used;
  proc_entry *me = ENTRY(myslot - 1);
  /* let go, then publish: a kill between the two leaks the new table (the
  ** old one, still published, counts the same) */
  mp_unhold(off);
  __atomic_store_n(&me->refs, off, __ATOMIC_SEQ_CST);
  led = l;
  if (old) mp_free(OFF(old));
  return 1;
}

/* one more reference of this process to the object at off */
static inline void led_add(uint64_t off) {
  if (!myslot) return;  /* a process outside the table (see mp_proc_child) */
  ledger *l = led;
  if (__builtin_expect(!l || l->used * 2 >= l->cap, 0)) {
    if (!led_grow() && (!l || l->used + 1 >= l->cap)) return;  /* not recorded */
    l = led;
  }
  uint64_t m = l->cap - 1, k = led_slot(l, off);
  for (;;) {
    uint64_t key = l->e[k].off;
    if (key == off) { l->live += l->e[k].n++ == 0; return; }
    if (!key) break;
    k = (k + 1) & m;
  }
  l->e[k].n = 1;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);  /* (a key without its count is read as 0) */
  l->e[k].off = off;
  l->used++;
  l->live++;
}

/* one reference fewer (a reference it did not record: nothing) */
static inline void led_sub(uint64_t off) {
  ledger *l = led;
  if (!l) return;
  uint64_t m = l->cap - 1, k = led_slot(l, off);
  for (;;) {
    uint64_t key = l->e[k].off;
    if (key == off) break;
    if (!key) return;
    k = (k + 1) & m;
  }
  if (!l->e[k].n || --l->e[k].n) return;
  /* a table mostly empty is rebuilt smaller (an empty one of the smallest size
  ** stays, for the next object: arena_stats frees it) */
  if (--l->live * 16 < l->cap && l->cap > LMIN) led_grow();
}

/* this process's ledger goes (it counts nothing) */
static void led_free(void) {
  __atomic_store_n(&ENTRY(myslot - 1)->refs, 0, __ATOMIC_SEQ_CST);  /* (a kill before the free leaks it) */
  mp_free(OFF(led));
  led = NULL;
}

/* ------------------------------------------------------- shared objects */

uint64_t mp_obj_new(lua_State *L, size_t size, uint32_t type) {
  uint64_t off = mp_alloc(L, size);
  mp_obj *o = MP_PTR(off);
  memset(o, 0, size);
  o->refs = 1;
  o->forks = mp_arena_forks();
  o->type = type;
  __atomic_signal_fence(__ATOMIC_SEQ_CST);
  led_add(off);
  return off;
}

/* The message whose handles are being decoded (see mp_obj_adopt): a retain of
** one of its objects takes the message's reference instead of counting one. */
static mp_adopt *adopting;

mp_adopt *mp_obj_adopt(mp_adopt *a) {
  mp_adopt *prev = adopting;
  adopting = a;
  return prev;
}

void mp_obj_retain(uint64_t off) {
  mp_adopt *a = adopting;
  if (a)
    for (uint32_t i = 0; i < a->n; i++)
      if (a->offs[i] == off) { a->offs[i] = 0; return; }
  mp_obj *o = MP_PTR(off);
  __atomic_add_fetch(&o->refs, 1, __ATOMIC_SEQ_CST);
  led_add(off);
}

void mp_obj_adopted(uint64_t off) { led_add(off); }

void mp_obj_count(uint64_t off) {
  __atomic_add_fetch(&((mp_obj *)MP_PTR(off))->refs, 1, __ATOMIC_SEQ_CST);
}

int mp_obj_alive(uint64_t off) {
  if (!arena || off < arena->start + sizeof(block) || off >= arena->top) return 0;
  block *b = BLK(off - sizeof(block));
  uint64_t tag = __atomic_load_n(&b->tag, __ATOMIC_ACQUIRE);
  if (tag != TAG(B_USED) && tag != TAG(B_DEFERRED)) return 0;
  if (b->size < sizeof(block) + sizeof(mp_obj) || b->size > arena->top - (off - sizeof(block))) return 0;
  mp_obj *o = MP_PTR(off);
  return __atomic_load_n(&o->refs, __ATOMIC_SEQ_CST) > 0 || __atomic_load_n(&o->pinned, __ATOMIC_SEQ_CST);
}

typedef void (*dtor_fn)(mp_obj *o);

static void obj_free(uint64_t off, dtor_fn dtor) {
  if (dtor) dtor(MP_PTR(off));
  mp_free(off);
}

static void release_orphans(void);

/* Frees the deferred objects that no live process can reach any more. Each is
** taken off the list under the lock and freed outside it (its destructor
** frees blocks); a kill between the two leaks that object. The ledgers of dead
** processes are released first. A lock held by a stopped process is not waited
** for: the sweep is left to the next one. */
static void sweep(void) {
  if (!arena || locked_here) return;
  if (__atomic_load_n(&arena->orphans, __ATOMIC_ACQUIRE)) release_orphans();
  if (!__atomic_load_n(&arena->ndeferred, __ATOMIC_ACQUIRE)) return;
  for (;;) {
    uint64_t take[32];
    dtor_fn fns[32];
    int n = 0, died = 0;
    if (!arena_lock_until(NULL, 0, NULL, NULL)) return;
    uint32_t max = live_max_serial(&died);
    uint64_t *link = &arena->deferred;
    while (*link && n < 32) {
      block *b = BLK(*link);
      mp_obj *o = (mp_obj *)(b + 1);
      int pinned = __atomic_load_n(&o->pinned, __ATOMIC_SEQ_CST);
      if (pinned || (__atomic_load_n(&o->refs, __ATOMIC_SEQ_CST) == 0 && o->forks >= max)) {
        uint64_t off = *link;
        jset(link, b->next);
        jset(&b->tag, TAG(B_USED));
        jset(&arena->ndeferred, arena->ndeferred - 1);
        jcommit();
        if (!pinned) { take[n] = off + sizeof(block); fns[n] = mp_fn_unpack(b->aux); n++; }
        continue;  /* a pinned one is off the list, and kept for good */
      }
      link = &b->next;
    }
    int more = *link != 0 && n == 32;
    arena_unlock();
    for (int k = 0; k < n; k++) obj_free(take[k], fns[k]);
    if (died && __atomic_load_n(&arena->orphans, __ATOMIC_ACQUIRE)) release_orphans();
    if (!more) return;
  }
}

/* The last reference to the object at off is gone: it is freed, unless a live
** process forked after it was made may hold an uncounted copy of a handle
** (deferred until no such process lives). A lock held by a stopped process is
** not waited for: the object goes on the pending stack (B_RELEASED), and the
** next unlock puts it on the deferred list, for a sweep to free. */
static void release_last(uint64_t off, dtor_fn dtor) {
  mp_obj *o = MP_PTR(off);
  if (o->forks == mp_arena_forks()) { obj_free(off, dtor); return; }
  int died = 0, now = 0;
  block *b = BLK(off - sizeof(block));
  if (!arena_lock_until(NULL, 0, NULL, NULL)) {
    if (b->tag == TAG(B_USED)) {
      b->aux = mp_fn_pack(dtor);
      push_pending(off - sizeof(block), B_RELEASED);  /* (a kill between the two leaks it) */
    }
    return;
  }
  if (b->tag == TAG(B_USED)) {  /* (a deferred one is on the list already) */
    if (live_max_serial(&died) <= o->forks) now = 1;
    else {
      jset(&b->aux, mp_fn_pack(dtor));
      defer_locked(off - sizeof(block), NULL);
    }
  }
  arena_unlock();
  if (now) obj_free(off, dtor);
  if (died) sweep();
}

/* k references fewer (the caller holds them; k <= refs): the last one released.
** The block's state is read before the count goes down: while a reference is
** held, a block in use stays in use, and a released one (B_DEFERRED, on the
** deferred list; B_RELEASED, on the pending stack, bound for that list) stays
** where it is. Once its count is 0 a released one belongs to the sweep, which
** frees it when nothing counts it (it may be freed and reused at once: it is
** not touched again here). A released object counted again is one a fork's
** uncounted copy of a handle sent on. */
static inline void unref(uint64_t off, uint32_t k, dtor_fn dtor) {
  mp_obj *o = MP_PTR(off);
  uint64_t tag = __atomic_load_n(&BLK(off - sizeof(block))->tag, __ATOMIC_ACQUIRE);
  if (__atomic_sub_fetch(&o->refs, k, __ATOMIC_SEQ_CST) != 0 || __atomic_load_n(&o->pinned, __ATOMIC_SEQ_CST))
    return;
  if (tag == TAG(B_USED)) release_last(off, dtor);
}

/* An object is freed when its last counted handle goes, unless it may still
** be reached another way: it was encoded (bytes may be in flight: kept for
** good), or a live process forked after it was made holds an uncounted copy
** of a handle (release_last). */
void mp_obj_release_with(uint64_t off, pid_t pid, void (*dtor)(mp_obj *o)) {
  if (!off || pid != mypid) return;
  led_sub(off);
  unref(off, 1, dtor);
}

void mp_obj_release(uint64_t off, pid_t pid) { mp_obj_release_with(off, pid, NULL); }

void mp_obj_drop(uint64_t off, void (*dtor)(mp_obj *o)) { unref(off, 1, dtor); }

/* n references of a dead process to what may be an object (its ledger says
** so; checked all the same, as a decoded handle is): never more than it has.
** An object in use or released (deferred, or pending for the deferred list:
** counted again after its release, see unref); a free block is no object. */
static void drop_many(uint64_t off, uint64_t n) {
  if (off < arena->start + sizeof(block) || off >= arena->top || off % 32) return;
  block *b = BLK(off - sizeof(block));
  uint64_t tag = __atomic_load_n(&b->tag, __ATOMIC_ACQUIRE);
  if ((tag != TAG(B_USED) && tag != TAG(B_DEFERRED) && tag != TAG(B_RELEASED)) || b->size < sizeof(block) + sizeof(mp_obj))
    return;
  mp_obj *o = MP_PTR(off);
  uint32_t r = __atomic_load_n(&o->refs, __ATOMIC_SEQ_CST), k;
  do {
    if (!r) return;
    k = n < r ? (uint32_t)n : r;
  } while (!__atomic_compare_exchange_n(&o->refs, &r, r - k, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  if (r - k || __atomic_load_n(&o->pinned, __ATOMIC_SEQ_CST)) return;
  if (tag == TAG(B_USED)) release_last(off, mp_obj_dtor(o->type));
}

/* Releases the references of the dead processes' ledgers (see ledgers). */
static void release_orphans(void) {
  static int busy;  /* (a destructor's release may sweep: one pass at a time) */
  if (busy) return;
  busy = 1;
  uint64_t *mine = myslot ? &ENTRY(myslot - 1)->releasing : NULL;
  while (__atomic_load_n(&arena->orphans, __ATOMIC_ACQUIRE)) {
    if (!arena_lock_until(NULL, 0, NULL, NULL)) break;
    uint64_t bo = arena->orphans;
    if (!bo) { arena_unlock(); break; }
    jset(&arena->orphans, BLK(bo)->next);
    if (mine) jset(mine, bo + sizeof(block));
    jcommit();
    arena_unlock();
    ledger *l = (ledger *)(BLK(bo) + 1);
    uint64_t room = (BLK(bo)->size - sizeof(block) - sizeof(ledger)) / sizeof(lent);
    if (l->cap <= room && l->cap && !(l->cap & (l->cap - 1)))
      for (uint32_t i = 0; i < l->cap; i++) {
        uint64_t off = l->e[i].off, n = l->e[i].n;
        if (!off || !n) continue;
        __atomic_store_n(&l->e[i].n, 0, __ATOMIC_SEQ_CST);  /* (a kill right here leaks these n) */
        drop_many(off, n);
      }
    if (mine) __atomic_store_n(mine, 0, __ATOMIC_SEQ_CST);  /* (a kill between the two leaks the table) */
    mp_free(bo + sizeof(block));
  }
  busy = 0;
}

/* ------------------------------------------------------------- Lua API */

/* core.arena_stats() -> { used, blocks, size, top, deferred, processes }, after a sweep
** (and with this process's ledger rebuilt to the size its entries call for, or
** freed when it counts nothing) */
static int arena_stats(lua_State *L) {
  int n = 0;
  /* this process's ledger at the size its live entries call for, so that the
  ** same objects show the same use whatever the ledger held before */
  if (led && !led->live) {
    led_free();
  } else if (led) {
    uint32_t cap = LMIN;
    while ((uint64_t)cap < (uint64_t)led->live * 4) cap *= 2;
    if (cap != led->cap) led_grow();
  }
  if (arena) {  /* the dead found here are released by the sweep that follows */
    if (!arena_lock_until(L, -1, &fail_why, &fail_pid)) return lockfail_error(L);
    for (uint32_t i = 0; i < arena->prochwm; i++) n += (uint32_t)ENTRY(i)->word == P_USED && entry_alive(i);
    arena_unlock();
  }
  sweep();
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)mp_arena_used()); lua_setfield(L, -2, "used");
  lua_pushinteger(L, (lua_Integer)mp_arena_blocks()); lua_setfield(L, -2, "blocks");
  lua_pushinteger(L, arena ? (lua_Integer)arena->size : 0); lua_setfield(L, -2, "size");
  lua_pushinteger(L, arena ? (lua_Integer)(arena->top - arena->start) : 0); lua_setfield(L, -2, "top");
  lua_pushinteger(L, arena ? (lua_Integer)arena->ndeferred : 0); lua_setfield(L, -2, "deferred");
  lua_pushinteger(L, n); lua_setfield(L, -2, "processes");
  return 1;
}

/* core._arena_holder() -> the pid of the process that holds the allocator's
** lock, or nil: read without the lock, so it may be out of date at once (for
** tests and diagnostics: never waits, even on a stopped holder) */
static int arena_holder(lua_State *L) {
  pid_t h = arena ? __atomic_load_n(&arena->holder, __ATOMIC_RELAXED) : 0;
  if (h) lua_pushinteger(L, h); else lua_pushnil(L);
  return 1;
}

/* core.arena_check() -> true: walks every block and list, raises at the first
** broken rule (for tests: it holds the arena lock for the whole walk) */
static const char *check(void) {
  uint64_t used = 0, blocks = 0, nfree = 0, off = arena->start, top = arena->top;
  while (off < top) {
    block *b = BLK(off);
    if ((uint32_t)b->tag != BLOCK_MAGIC || b->tag >> 32 > B_RELEASED) return "a block header is damaged";
    if (b->size < sizeof(block) || b->size % 32 || off + b->size > top) return "a block size is wrong";
    if (b->tag != TAG(B_FREE)) { used += b->size; blocks++; } else nfree++;
    off += b->size;
  }
  if (used != arena->used || blocks != arena->blocks) return "the statistics do not match the blocks";
  uint64_t listed = 0;
  for (int c = 0; c <= NCLASS; c++) {
    for (uint64_t o = c < NCLASS ? arena->freelist[c] : arena->large; o; o = BLK(o)->next) {
      if (o < arena->start || o >= top || o % 32 || BLK(o)->tag != TAG(B_FREE)) return "a free list holds a block that is not free";
      if (c < NCLASS && BLK(o)->size != class_size(c)) return "a free list holds a block of another class";
      if (++listed > nfree) return "a free list is longer than the free blocks (a cycle?)";
    }
  }
  uint64_t nd = 0;
  for (uint64_t o = arena->deferred; o; o = BLK(o)->next) {
    if (o < arena->start || o >= top || BLK(o)->tag != TAG(B_DEFERRED)) return "the deferred list holds a block that is not deferred";
    if (++nd > blocks) return "the deferred list is too long (a cycle?)";
  }
  if (nd != arena->ndeferred) return "the deferred count is wrong";
  uint64_t np = 0;
  for (uint64_t o = __atomic_load_n(&arena->pending, __ATOMIC_ACQUIRE); o; o = BLK(o)->next) {
    if (o < arena->start || o >= top || (BLK(o)->tag != TAG(B_PENDING) && BLK(o)->tag != TAG(B_RELEASED)))
      return "the pending stack holds a block that is not pending";
    if (++np > blocks) return "the pending stack is too long (a cycle?)";
  }
  if (arena->jn || arena->compacting || arena->draining) return "a change was left half done";
  return NULL;
}

static int arena_check(lua_State *L) {
  if (!arena) { lua_pushboolean(L, 1); return 1; }
  if (!arena_lock_until(L, -1, &fail_why, &fail_pid)) return lockfail_error(L);
  const char *why = check();
  arena_unlock();
  if (why) return luaL_error(L, "arena damaged: %s", why);
  lua_pushboolean(L, 1);
  return 1;
}

/* core._arena_fault(n [, "stop" | "push"]): this process kills itself (SIGKILL)
** at the n-th store of the allocator's journal it applies from now on, or stops
** itself there (SIGSTOP: it goes on when continued), holding the lock; or
** ("push") kills itself in its n-th push of a block on the pending stack (a
** free behind a stopped holder), between marking the block and pushing it (for
** tests of kills and stops) */
static int arena_fault(lua_State *L) {
  uint32_t n = (uint32_t)luaL_checkinteger(L, 1);
  static const char *const how[] = { "kill", "stop", "push", NULL };
  int h = luaL_checkoption(L, 2, "kill", how);
  if (h == 2) { push_fault = n; return 0; }
  fault = n;
  fault_sig = h ? SIGSTOP : SIGKILL;
  return 0;
}

/* core._arena_hold(n) -> offset: n bytes held by this process (see mp_alloc_held),
** for tests; core.blob_free(offset) frees them */
static int arena_hold(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  luaL_argcheck(L, n >= 0, 1, "negative size");
  mp_arena_ensure(L);
  mp_alloc_context(L, -1);
  uint64_t off = mp_alloc_held((size_t)n);
  mp_alloc_context(NULL, -1);
  if (!off) return mp_oom_error(L, (size_t)n);
  lua_pushinteger(L, (lua_Integer)off);
  return 1;
}

/* core._arena_sweep(): sweeps the deferred list and the dead processes' ledgers
** now (as a reap does), for tests */
static int arena_sweep(lua_State *L) {
  (void)L;
  sweep();
  return 0;
}

/* In every forked child: its pid; and until mp_proc_child gives it an entry
** (core.fork), none, so that a process forked by other means writes nothing
** in its parent's entry (hold slots, ledger). */
MP_FORK_PATH static void renew_pid(void) {
  mypid = getpid();
  myslot = 0;
  led = NULL;
}

int mp_arena_open(lua_State *L) {
  static int atfork_set;
  if (!atfork_set) { atfork_set = 1; mp_atfork(renew_pid); }
  static const luaL_Reg funcs[] = {
    {"arena_stats", arena_stats}, {"arena_check", arena_check}, {"_arena_fault", arena_fault},
    {"_arena_hold", arena_hold}, {"_arena_sweep", arena_sweep},
    {"_arena_holder", arena_holder},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}

/* ------------------------------------------------- spawned processes */

int mp_arena_fd(void) { return arena ? arena_fd : -1; }
uint64_t mp_arena_size(void) { return arena ? arena->size : 0; }

/* A spawned interpreter (forkserver.c) maps its parent's arena at the same
** address, so that whatever a pointer into it means (a robust mutex's list
** link in the kernel's eyes, a futex word) means the same in both. */
const char *mp_arena_attach(int fd, uint64_t addr, uint64_t size, uint64_t token) {
  if (arena) return "the arena is already mapped in this process";
  void *want = (void *)(uintptr_t)addr;
  void *p = mmap(want, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE | MAP_FIXED_NOREPLACE, fd, 0);
  if (p == MAP_FAILED)
    return errno == EEXIST ? "the parent's arena address is taken in this process (try again, or use forkserver)"
                           : strerror(errno);
  if (p != want) {  /* a kernel before 4.17 takes the address as a hint */
    munmap(p, size);
    return "the parent's arena address is taken in this process (try again, or use forkserver)";
  }
  arena_hdr *a = p;
  if (a->magic != MAGIC || a->size != size) { munmap(p, size); return "the descriptor is not the parent's arena"; }
  arena = a;
  arena_fd = fd;
  nocopies = 1;  /* a new interpreter: it holds only what it decodes */
  mp_proc_child(token);  /* takes its entry, or leaves: the parent died meanwhile */
  return NULL;
}
