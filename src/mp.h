/* mp.h: internal interfaces shared by the C files of multiprocessing.core.
**
** Concepts:
** - The arena (arena.c) is one memfd mapped MAP_SHARED at the same address in
**   every process of the program: it is created before the first fork, so all
**   descendants inherit it. Shared objects live in it and are named by their
**   offset, which is what a handle carries when it crosses a channel.
** - Waits (wait.c) sleep on futexes in slices, so that a SIGINT seen by the
**   Lua interpreter (which sets a hook) ends a blocking call promptly.
** - The codec (codec.c) turns Lua values into bytes; shared types register how
**   their handles are encoded (mp_handle_type).
*/
#ifndef MP_H
#define MP_H

#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <sys/types.h>
#include <unistd.h>

#include "lua.h"
#include "lauxlib.h"

#pragma GCC visibility push(hidden)

#define MP_VERSION "0.1.0"

/* ---------------------------------------------------------------- arena */
int mp_arena_ensure(lua_State *L);          /* creates the arena (raises on failure) */
void *mp_arena_base(void);
uint64_t mp_alloc(lua_State *L, size_t n);  /* raises mp_oom_error */
/* Raises "out of shared memory: N bytes wanted, arena limit L bytes (U in use;
** set LUA_MP_ARENA_SIZE)": every path that runs out of arena says it this way. */
int mp_oom_error(lua_State *L, size_t want);
/* whether the last allocation failed because its wait for the allocator's lock reached its
** deadline (mp_alloc_context); then forgets it (mp_oom_error would have said it) */
int mp_alloc_gave_up(void);
/* A process that sleeps counted in a shared count of sleepers (q_wait) names it in its process
** entry, so that if it dies asleep the count is made one less (entry_free) instead of staying
** one too high (a wake-up for every later put). mp_asleep_in: after the count went up; whether
** it was named (not for a count outside the arena, nor a second one: another thread's);
** mp_awake: before it goes down, when it was. */
int mp_asleep_in(uint32_t *count);
void mp_awake(void);
uint64_t mp_alloc_try(size_t n);            /* 0 on failure */
/* The Lua call about to allocate with mp_alloc_try/mp_alloc_held, and its
** deadline (< 0: none): a wait for the allocator's lock behind a stopped holder
** ends there, or on Ctrl-C; the allocation then fails and mp_oom_error says why
** ("put timed out: the shared memory allocator is held by stopped process N").
** mp_alloc sets it itself (no deadline). */
typedef struct mp_allocctx { lua_State *L; double deadline; } mp_allocctx;
extern mp_allocctx mp_alloc_ctx;

/* What a forked child writes first (fork handlers, core.fork's child): in one
** struct, so that the child copies one page of the parent's statics, not one per
** file (each copy is a page fault). Defined in process.c.
**
** So with code: each page of code a child runs is mapped by a fault of its own
** (64 KiB at a time), so what runs between fork() and the child's return to Lua
** or its _exit (the fork handlers, core.fork's two halves, core._exit) is marked
** MP_FORK_PATH, which puts it in one section (linkers place .text.hot.* together,
** next to the PLT the child calls through). Fork handlers write only what changes
** (mp_mutex_renew): a page the child only reads is not copied. */
#define MP_FORK_PATH __attribute__((hot, section(".text.hot.mp_fork_path")))
/* A child that core.fork (or forkserver.c) started, as process.c tracks it, and
** as arena.c knows it (its entry in the process table). */
typedef struct mp_kid {
  pid_t pid;
  int daemon;
  int done;     /* reaped: status holds its wait status */
  int status;
  int lifeline; /* the write end of its parent-death pipe (see proc_fork), -1 once it ended */
} mp_kid;
typedef struct mp_kid_entry { pid_t pid; uint64_t token; } mp_kid_entry;
#define MP_KIDS_HERE 8  /* the first children's records kept in mp_fk (then: malloc'd arrays) */
typedef struct mp_forkstate {
  pid_t pid;               /* getpid(), renewed in every child (arena.c, process.c) */
  uint32_t arena_slot;     /* arena.c: this process's entry, index + 1 */
  struct ledger *arena_led;/* arena.c: this process's ledger */
  pid_t proc_mainpid;      /* process.c: the process whose kids these are */
  int proc_nkids;          /* process.c: its kids */
  int proc_watch_fd;       /* process.c: its lifeline to its parent, or -1 */
  uint32_t sync_start;     /* sync.c: this process's start time (ticks), 0: not read yet */
  size_t arena_nkids;      /* arena.c: its kids' entries */
  void *_Atomic pool_forking; /* pool.c: the pool whose worker the next fork makes (st:forking):
                           ** the parent writes it back just after that fork, the worker in its handler */
  /* the first kids' records of both lists: the parent writes them just after a
  ** fork, while the child shares its pages (each write a copy), and this page
  ** is the one it writes then anyway */
  mp_kid proc_kids[MP_KIDS_HERE];
  mp_kid_entry arena_kids[MP_KIDS_HERE];
} mp_forkstate;
#define MP_FORKSTATE_ALIGN 512  /* (a power of 2 no smaller than the struct: it never straddles two pages) */
_Static_assert(sizeof(mp_forkstate) <= MP_FORKSTATE_ALIGN, "mp_forkstate must fit in one page");
extern mp_forkstate mp_fk;
/* getpid() without the system call (glibc caches it no more) */
static inline pid_t mp_getpid(void) { return mp_fk.pid ? mp_fk.pid : (mp_fk.pid = getpid()); }
static inline void mp_alloc_context(lua_State *L, double deadline) {
  mp_alloc_ctx.L = L;
  mp_alloc_ctx.deadline = deadline;
}
void mp_free(uint64_t off);
/* Blocks in hand: a block that this process holds outside every shared structure
** (a big message being copied in, or taken out and being decoded) can be recorded
** in its process entry (3 at a time), so that it is freed if the process dies.
** Its header names its owner (one word): this process, or the structure it was
** handed to, so ownership changes with one store and never lapses:
**   off = mp_alloc_held(n)   allocates it and holds it in one step (0 on failure)
**   mp_hand(off, owner)      once a structure names it: owner (a nonzero word that
**                            only that structure uses, its record's offset) owns it
**   mp_unhold(off)           after mp_hand: its hold slot is let go
**   mp_hold(off)             takes it from its structure (still named there), whose
**                            settler then leaves it to this process
**   mp_owned_by(off, owner)  a settler's question: does the structure still own it?
**   mp_free(off)             frees it and lets it go in one step
** A process found dead frees the blocks its slots name that it still owns. */
uint64_t mp_alloc_held(size_t n);
void mp_hold(uint64_t off);
void mp_unhold(uint64_t off);
void mp_hand(uint64_t off, uint64_t owner);
int mp_owned_by(uint64_t off, uint64_t owner);
size_t mp_arena_used(void);
size_t mp_arena_top(void);
size_t mp_arena_blocks(void);
void mp_arena_forked(void);                 /* note that a fork happened */
/* The lifetime of the processes that share the arena (for objects a fork may
** have copied, and blocks a dead process held). process.c calls these around
** every fork and every reap:
**   t = mp_proc_prefork(L)          in the parent, before fork() (may raise); or
**   t = mp_proc_prefork_until(L, deadline, &stopped): the same, but once the
**       deadline passed while the allocator's lock is held by a stopped
**       process, 0 with stopped = its pid (a running holder is waited for)
**   mp_proc_child(t)                in the child, first thing after fork()
**   mp_proc_parent(t, pid)          in the parent after fork(); pid < 0: it failed
**   mp_proc_reaped(pid)             in the parent, once the child's status was read */
uint64_t mp_proc_prefork(lua_State *L);
uint64_t mp_proc_prefork_until(lua_State *L, double deadline, pid_t *stopped);
void mp_proc_child(uint64_t token);
void mp_proc_parent(uint64_t token, pid_t pid);
void mp_proc_reaped(pid_t pid);
uint32_t mp_arena_forks(void);
#define MP_PTR(off) ((void *)((char *)mp_arena_base() + (off)))
#define MP_OFF(p) ((uint64_t)((char *)(p) - (char *)mp_arena_base()))  /* MP_PTR's inverse */

/* Shared objects: every object made by a shared type starts with this header. */
typedef struct mp_obj {
  uint32_t refs;      /* handles alive in the processes that counted them */
  uint32_t forks;     /* arena fork count at creation: a live later fork defers its free */
  uint32_t pinned;    /* 1 once encoded: it may be referenced by bytes in flight (kept for good) */
  uint32_t type;      /* sanity tag of the type */
} mp_obj;

/* The userdata of a handle to a shared object. */
typedef struct mp_handle {
  uint64_t off;       /* 0 when closed */
  pid_t pid;          /* process that counted this handle in refs */
} mp_handle;

typedef void (*mp_dtor)(mp_obj *o);

uint64_t mp_obj_new(lua_State *L, size_t size, uint32_t type);
void mp_obj_retain(uint64_t off);
void mp_obj_release(uint64_t off, pid_t pid);  /* drops a handle's reference */
/* same, running dtor (frees what the object owns) before the object is freed */
void mp_obj_release_with(uint64_t off, pid_t pid, void (*dtor)(mp_obj *o));
#define MP_OBJ(h, T) ((T *)MP_PTR((h)->off))

/* Messages own their handles (docs/arena.md): a queue's message counts one
** reference for each object its handles name (mp_obj_count, by the put), hands
** it to the handle decoded from it (mp_obj_adopt: while a is set, mp_obj_retain
** of an object listed in a->offs clears that entry instead of counting), and a
** message dropped unread releases the references of the entries left. */
typedef struct mp_adopt { uint64_t *offs; uint32_t n; } mp_adopt;
mp_adopt *mp_obj_adopt(mp_adopt *a);   /* sets a (NULL: none), returns the previous one */
void mp_obj_count(uint64_t off);       /* counts a reference, never adopting */
void mp_obj_drop(uint64_t off, void (*dtor)(mp_obj *o));  /* releases a message's reference */
/* A handle of this process took a message's reference (mp_obj_adopt): once the
** message is taken, the reader records it in its ledger (docs/arena.md, "Ledgers"). */
void mp_obj_adopted(uint64_t off);
/* 1 when off is the start of an object that something still owns (a counted
** handle or message, or pinned): what a decoded handle may name */
int mp_obj_alive(uint64_t off);
/* An object named by a handle being encoded (mp_handle_encode, and the encode
** callbacks of types whose payload names other objects): the encoder lists it
** with the destructor a release needs (NULL: none); outside an encoder's
** handle it is pinned. */
/* dtor is packed (mp_fn_pack): lists of mp_sent are kept in the arena (a queue
** message's), and a spawned process maps the core at another address. */
typedef struct mp_sent { uint64_t off; uint64_t dtor; } mp_sent;
void mp_obj_sent(uint64_t off, mp_dtor dtor);
/* The destructor of a type's objects (what its release needs, NULL: none), also
** what mp_handle_encode lists and what a dead process's ledger release runs.
** Every type whose objects own blocks sets one (codec.c keeps them). */
void mp_obj_set_dtor(uint32_t type, mp_dtor dtor);
mp_dtor mp_obj_dtor(uint32_t type);

/* -------------------------------------------------------------- waiting */
double mp_now(void);                              /* CLOCK_MONOTONIC seconds */
double mp_deadline(lua_State *L, int idx);        /* optional timeout arg -> deadline; -1 forever */
/* A deadline of MP_AFTER(s): s seconds from when a wait starts, so that a call that finds every
** lock free never reads the clock (the pool's lean puts, which give up after PUT_WAIT); mp_when
** makes it a deadline like the others, once a wait begins (and leaves the others as they are).
** A queue's put with MP_AFTER(0) gives up at once when its lock is busy (no GRACE: a try). */
#define MP_AFTER(s) (-2.0 - (s))
static inline double mp_when(double d) { return d <= -2.0 ? mp_now() + (-2.0 - d) : d; }
enum { MP_WOKE = 0, MP_TIMEOUT = 1, MP_INTERRUPTED = 2, MP_SHUTDOWN = 3 };  /* SHUTDOWN: a queue shut down */
/* Waits while *addr == val, until deadline (<0: forever). */
int mp_futex_wait(lua_State *L, uint32_t *addr, uint32_t val, double deadline);
void mp_futex_wake(uint32_t *addr, int n);
int mp_interrupted(lua_State *L);  /* a hook appeared since mp_wait_begin */
/* Is a Ctrl-C pending? True when the hook changed since h0 (captured when the wait
** began), or when the hook is lua.c's SIGINT hook (all four events, count 1): a
** signal that landed between two waits of one call, after h0 was taken, is seen. */
int mp_hook_pending(lua_State *L, lua_Hook h0);
/* Robust process-shared mutexes. */
void mp_mutex_init(pthread_mutex_t *m, int recursive);
/* In a fork's child: makes again a mutex the fork may have copied held (by a
** thread the child does not have); one left unlocked is not written (see
** MP_FORK_PATH). An unlocked default mutex is all zero bytes (glibc, musl). */
static inline void mp_mutex_renew(pthread_mutex_t *m) {
  const unsigned char *b = (const unsigned char *)m;
  for (size_t i = 0; i < sizeof *m; i++)
    if (b[i]) { pthread_mutex_init(m, NULL); return; }
}
enum { MP_LOCKED = 0, MP_LOCK_TIMEOUT = 1, MP_LOCK_INTERRUPTED = 2, MP_LOCK_OWNERDEAD = 3,
       MP_LOCK_DEADLOCK = 4 };
int mp_mutex_lock(lua_State *L, pthread_mutex_t *m, double deadline);
void mp_lock(pthread_mutex_t *m);   /* short internal critical sections */
void mp_unlock(pthread_mutex_t *m);
/* Same, with ways out (wait.c): MP_LOCKED, MP_LOCK_OWNERDEAD (locked; the caller
** repairs what the dead holder left, then calls pthread_mutex_consistent), or,
** without the lock, MP_LOCK_INTERRUPTED (Ctrl-C, seen through L) or
** MP_LOCK_TIMEOUT (the deadline passed and the holder is stopped), the holder's
** pid in *holder. A holder that runs is waited for past the deadline: its
** sections are short. deadline < 0 and L NULL: it waits for a stopped holder.
** owner: where each holder of m writes its pid (0 when free; NULL: unknown). */
int mp_ilock(lua_State *L, pthread_mutex_t *m, const pid_t *owner, double deadline, pid_t *holder);
int mp_pid_stopped(pid_t pid);              /* 1 if the process is stopped (SIGSTOP, a tracer) */
/* The name of the Lua call in progress (the C function at level 0, e.g. "put"), for errors. */
const char *mp_callname(lua_State *L);
/* A call that raises for a Ctrl-C (instead of returning nil, "interrupted")
** takes lua.c's SIGINT hook off first, as lua.c's own handler does: the
** interrupt is its error, and no second "interrupted!" follows it out of the
** caller's pcall. Another hook is left alone. */
void mp_take_interrupt(lua_State *L);
/* lua_pcall for a C function of ours that may fail, where a failure is an answer (a probe, a
** require): Ctrl-C's error, raised by lua.c's hook (or ours, see lmp_interrupt) on the call, goes
** on up instead, intact. Such a hook takes itself off as it raises "interrupted!": no hook after
** a failure with that text is that (the SIGINT may have landed inside the call). */
int mp_pcall(lua_State *L, int nargs, int nresults);
int mp_waitresult(lua_State *L, int r);   /* pushes nil, "timeout"/"interrupted" */
/* Host safety (hostsafe): lmp_interrupt's generation, bumped at each call (a
** wait that does not go through mp_hook_pending, such as the exit handler's,
** ends when it changes); mp_flush_std flushes stdio without waiting for a
** lock another thread holds, such as stdin's in fgets (before a fork, at _exit). */
uint32_t mp_host_interrupts(void);
void mp_flush_std(void);
int mp_pid_gone(pid_t pid);  /* 1 once process pid has exited (a zombie too): one check, in wait.c */

/* ---------------------------------------------------------------- codec */
typedef struct mp_buf {
  char *p;
  size_t n, cap;
} mp_buf;
void mp_buf_reserve(lua_State *L, mp_buf *b, size_t extra);
/* b's capacity made exactly cap (no smaller than its contents), with the state's allocator:
** 1, or 0 when there is no memory (b unchanged) */
int mp_buf_resize(lua_State *L, mp_buf *b, size_t cap);
void mp_buf_add(lua_State *L, mp_buf *b, const void *s, size_t n);
void mp_buf_free(lua_State *L, mp_buf *b);

/* A shared type: how its handles cross a channel. The payload is at most 32 bytes. */
typedef struct mp_handle_type {
  const char *name;                     /* e.g. "multiprocessing.Queue" (its metatable name) */
  size_t (*encode)(lua_State *L, int idx, unsigned char *payload);
  void (*decode)(lua_State *L, const unsigned char *payload, size_t n);  /* pushes the handle */
} mp_handle_type;
void mp_codec_register(const mp_handle_type *t);
/* Arena objects have the same handle shape; these two serve any of them. */
size_t mp_handle_encode(lua_State *L, int idx, unsigned char *payload);
uint64_t mp_handle_payload(lua_State *L, const unsigned char *payload, size_t n);
/* Same, and the object must be of `type` and lie whole (objsize bytes) below the
** arena's top: the offset of an object whose handle is made by other means (a
** Condition's lock, a Lock whose class depends on the object). */
uint64_t mp_handle_object(lua_State *L, const unsigned char *payload, size_t n, uint32_t type,
                          size_t objsize);
/* For a decode callback: pushes a new handle (a userdata of `size` bytes with `nuv`
** user values and the metatable tname) to the object the payload names, which must
** be of `type`, and counts its reference. */
mp_handle *mp_handle_attach(lua_State *L, const unsigned char *payload, size_t n, uint32_t type,
                            const char *tname, size_t size, int nuv);

/* Encoding: mp_encode leaves the bytes in an encoder owned by the Lua state
** (big strings are not copied but referenced, so the value at idx must stay
** alive and unchanged until mp_enc_done). root names the value in errors. */
typedef struct mp_enc mp_enc;
mp_enc *mp_encode(lua_State *L, int idx, const char *root);
/* Same for the array t[i0 .. i0+n-1] of the table at idx, as if it were a table. */
mp_enc *mp_encode_range(lua_State *L, int idx, lua_Integer i0, lua_Integer n, const char *root);
size_t mp_enc_size(mp_enc *e);
void mp_enc_copy(mp_enc *e, char *dst);     /* copies mp_enc_size bytes */
/* The same bytes as pieces, for writev: piece i (from 0) in *p, *n (maybe 0); 0 past the end. */
int mp_enc_piece(mp_enc *e, size_t i, const void **p, size_t *n);
void mp_enc_push(lua_State *L, mp_enc *e);  /* pushes the bytes as a string */
void mp_enc_done(lua_State *L, mp_enc *e);
/* The objects the encoding's handles name, one entry per handle met. Whoever
** sends the bytes decides who owns them: mp_enc_own (the caller counted a
** reference for each entry: its message owns them), mp_enc_unsent (the bytes
** went nowhere), or else mp_enc_done pins them (kept for good: the bytes may be
** decoded any number of times, as core.encode's strings and pipe frames). */
size_t mp_enc_handles(mp_enc *e, const mp_sent **list);
void mp_enc_own(mp_enc *e);
void mp_enc_unsent(mp_enc *e);
/* The objects core.encode_function's bytes name (its third result, a userdata),
** neither pinned nor counted: core.blob_new takes them (its blob owns them). */
typedef struct mp_owners { size_t n; mp_sent h[]; } mp_owners;
#define MP_OWNERS "multiprocessing.owners"
/* Decodes one value from s[0..n), pushes it; raises on malformed input. */
void mp_decode(lua_State *L, const char *s, size_t n);
/* Same, in a mode: MP_DECODE_ALL (as mp_decode) or MP_DECODE_DATA, which takes
** plain data only and raises on functions, modules, the globals, metatables sent
** by value and handles: safe for bytes from anywhere (docs/codec.md, Trust).
** MP_DECODE_SIGNED: bytes another program made and signed with a key both share
** (the Pool on Redis): functions are loaded without our checksum, handles refused. */
enum { MP_DECODE_ALL = 0, MP_DECODE_DATA = 1, MP_DECODE_SIGNED = 2 };
void mp_decode_mode(lua_State *L, const char *s, size_t n, int mode);
/* Same for an encoded array (a table with no other keys and no metatable), whose
** items go to t[at], t[at+1]... of the table at tidx, which is what it pushes. */
void mp_decode_into(lua_State *L, const char *s, size_t n, int tidx, lua_Integer at);
/* Host C functions by name (capi.c, lmp_register): the registered name of the
** C function at idx or NULL; the function registered under a name or NULL; on
** the error path, pushes where in the globals the function at idx is (1) or nothing (0). */
const char *mp_host_name(lua_State *L, int idx, size_t *len);
lua_CFunction mp_host_find(const char *name, size_t len);
int mp_host_guess(lua_State *L, int idx);

/* ---------------------------------------------------------------- locks */
/* Lock objects of sync.c, also used by Value/Array's get_lock and by Condition. */
uint64_t mp_sync_newlock(lua_State *L, int recursive);  /* a new lock object (1 ref) */
void mp_sync_pushlock(lua_State *L, uint64_t off);      /* pushes a Lock/RLock handle (retains) */
pthread_mutex_t *mp_sync_mutex(uint64_t off);

/* ------------------------------------------------------- typed elements */
/* The typecodes of Value and Array (shared.c), also those of SharedMemory's
** views (shm.c). Loads and stores touch memory only (no Lua call), so that a
** caller can guard them against SIGBUS; checks and pushes are Lua's side. */
typedef union mp_elem { int64_t i; uint64_t u; double d; } mp_elem;
size_t mp_tc_size(int tc);                         /* bytes per element; 0: not a typecode */
int mp_checktypecode(lua_State *L, int idx);       /* raises "unknown typecode ..." */
mp_elem mp_elem_load(int tc, const char *p, lua_Integer i);
void mp_elem_store(int tc, char *p, lua_Integer i, mp_elem e);
void mp_elem_push(lua_State *L, int tc, mp_elem e);
mp_elem mp_elem_check(lua_State *L, int tc, int idx);  /* raises on a bad value */
/* the elements of a table (or a string for 'c' and 'u') at idx, all checked;
** pushes a userdata holding them, *n of them */
mp_elem *mp_elems_check(lua_State *L, int tc, int idx, lua_Integer *n);
/* the optional (i = 1, j = n) at idx, idx + 1 as string.sub takes them, clamped to 1..n */
void mp_slice_range(lua_State *L, int idx, lua_Integer n, lua_Integer *i, lua_Integer *j);

/* ---------------------------------------------------------- self checks */
/* Every method of every class, close, __gc, __close and __tostring included,
** finds its self through one of these (liolib's tolstream): a method called with
** another self (io.stdout, another class's object, a table, nil) raises
** "bad argument #1 to 'close' (Lock or RLock expected, got FILE*)" before it
** touches anything. names: the classes' metatable names, as MP_CLASSES(A, B).
**   mp_toself(L, i, names)     the userdata, closed or not (close, __gc, __tostring)
**   mp_checkopen(L, i, names)  the mp_handle, raising "attempt to use a closed X"
**                              when it is closed (off == 0)
** Classes whose userdata is not an mp_handle (Connection) check their own
** closed state after mp_toself. */
#define MP_CLASSES(...) ((const char *const[]){ __VA_ARGS__, NULL })
void *mp_toself(lua_State *L, int idx, const char *const *names);
mp_handle *mp_checkopen(lua_State *L, int idx, const char *const *names);

/* ---------------------------------------------------------------- misc */
/* Classes and tables made at their final size: filled from empty, a table is
** rehashed at each power of two (the openers' 600 fields cost 0.2M instructions
** at every require). mp_nregs counts a luaL_Reg list; mp_newmetatable is
** luaL_newmetatable with room for n fields besides __name. */
void mp_newclass(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta);
int mp_nregs(const luaL_Reg *r);
int mp_newmetatable(lua_State *L, const char *name, int n);
int mp_pusherrno(lua_State *L, const char *what);  /* nil, "what: strerror", "EXXX" */

/* ------------------------------------------------- start methods (forkserver.c) */
/* A function of the core as stored in shared memory: its distance from a
** fixed function of the core, so that processes that loaded the same build at
** different addresses (spawn: a fresh interpreter) agree on it. 0 is NULL. */
uint64_t mp_fn_pack(mp_dtor f);
mp_dtor mp_fn_unpack(uint64_t v);
int mp_arena_fd(void);                     /* the arena's memfd (CLOEXEC), -1 before it exists */
uint64_t mp_arena_size(void);
/* In a spawned process: maps the arena from fd at addr (the parent's address)
** and takes its entry (token from the parent's mp_proc_prefork); NULL or why not. */
const char *mp_arena_attach(int fd, uint64_t addr, uint64_t size, uint64_t token);
/* process.c: a child forked elsewhere (spawn, forkserver) is tracked as
** core.fork's are: mp_proc_reserve before it starts (may fail: 0), then
** mp_proc_track once its pid is known, with the write end of its lifeline
** (see proc_fork; -1: none), which the child arms with mp_lifeline_arm (it
** _exits if its parent is gone already). mp_proc_watch: a spawned process
** takes the lifeline its parent armed before exec as its own. */
int mp_proc_reserve(void);
void mp_proc_track(pid_t pid, int daemon, int lifeline);
void mp_lifeline_arm(int fd, int sig);
void mp_proc_watch(int fd);
int mp_layer_builtin(void);                /* capi.c: the Lua layer is built into this library */
int mp_forkserver_open(lua_State *L);
int mp_layer_open(lua_State *L);            /* capi.c: core._layer_searcher, core._layer_init */
/* pthread_atfork(NULL, NULL, child), and run in a forkserver's workers too
** (cloned without glibc's fork, so its handlers do not run there): every
** child-side fork handler of the core registers through this */
void mp_atfork(void (*child)(void));
void mp_proc_reset(void);                  /* a process started outside proc_fork: no children yet */
void mp_codec_key(uint64_t k[2]);          /* codec.c: the function checksum's key ... */
void mp_codec_setkey(const uint64_t k[2]); /* ... and a spawned process taking its parent's */

/* module openers, one per concept (core.c calls them in order) */
int mp_codec_open(lua_State *L);
int mp_arena_open(lua_State *L);
int mp_process_open(lua_State *L);
int mp_pipe_open(lua_State *L);
int mp_queue_open(lua_State *L);
int mp_sync_open(lua_State *L);
int mp_shared_open(lua_State *L);
int mp_shm_open(lua_State *L);
int mp_pool_open(lua_State *L);
int mp_socket_open(lua_State *L);
int mp_redis_open(lua_State *L);

/* Connections over a socket (pipe.c, for socket.c): pushes a closed duplex
** Connection, which mp_conn_setfd then gives its descriptor. */
void *mp_conn_new(lua_State *L, int nofds);
void mp_conn_setfd(void *conn, int fd);

#pragma GCC visibility pop

#endif
