/* arena.c: the shared-memory arena and its allocator. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mp.h"

/* Size classes are powers of two from 2^MINSHIFT to 2^MAXSHIFT bytes (header
** included); bigger blocks are "large": rounded to LARGE_ROUND, kept on a
** first-fit list, and their pages are given back to the kernel when freed. */
#define MINSHIFT 5
#define MAXSHIFT 21
#define NCLASS (MAXSHIFT - MINSHIFT + 1)
#define LARGE_ROUND ((uint64_t)1 << 20)
#define DEFAULT_SIZE ((uint64_t)64 << 30)
#define MAGIC 0x6c75614d50617261ULL
#define BLOCK_MAGIC 0x424cU

typedef struct arena_hdr {
  uint64_t magic, size;
  pthread_mutex_t lock;
  uint64_t top;               /* bump pointer */
  uint64_t freelist[NCLASS];  /* small blocks by class */
  uint64_t large;             /* free large blocks */
  uint64_t used, blocks;      /* statistics */
  uint32_t forks;
} arena_hdr;

typedef struct block {
  uint64_t size;   /* whole block, header included */
  uint32_t magic;
  uint32_t free;
  uint64_t next;   /* free list link (only while free) */
  uint64_t pad;
} block;           /* 32 bytes: keeps payloads 16-aligned */

static arena_hdr *arena;

void *mp_arena_base(void) { return arena; }

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
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  int e = errno;
  close(fd);  /* the mapping keeps the memory alive; nothing to unlink, ever */
  if (p == MAP_FAILED) return luaL_error(L, "cannot map shared memory: %s", strerror(e));
  arena_hdr *a = p;
  a->magic = MAGIC;
  a->size = size;
  mp_mutex_init(&a->lock, 0);
  a->top = (sizeof(arena_hdr) + 63) & ~(uint64_t)63;
  arena = a;
  return 0;
}

static int size_class(uint64_t n) {
  int c = 0;
  uint64_t s = (uint64_t)1 << MINSHIFT;
  while (s < n) { s <<= 1; c++; }
  return c;
}

static void give_back(block *b) {  /* return a large block's pages to the kernel */
  uintptr_t start = ((uintptr_t)b + sizeof(block) + 4095) & ~(uintptr_t)4095;
  uintptr_t end = ((uintptr_t)b + b->size) & ~(uintptr_t)4095;
  if (end > start) madvise((void *)start, end - start, MADV_REMOVE);
}

uint64_t mp_alloc_try(size_t want) {
  if (!arena || want > arena->size) return 0;
  uint64_t n = (uint64_t)want + sizeof(block), off = 0;
  mp_lock(&arena->lock);
  if (n <= ((uint64_t)1 << MAXSHIFT)) {
    int c = size_class(n);
    n = (uint64_t)1 << (c + MINSHIFT);
    if (arena->freelist[c]) {
      off = arena->freelist[c];
      arena->freelist[c] = ((block *)MP_PTR(off))->next;
    }
  } else {
    n = (n + LARGE_ROUND - 1) & ~(LARGE_ROUND - 1);
    uint64_t *link = &arena->large;
    while (*link) {
      block *b = MP_PTR(*link);
      if (b->size >= n) {
        off = *link;
        *link = b->next;
        if (b->size - n >= LARGE_ROUND) {  /* split: the tail goes back on the list */
          block *t = MP_PTR(off + n);
          t->size = b->size - n; t->magic = BLOCK_MAGIC; t->free = 1;
          t->next = arena->large; arena->large = off + n;
        } else {
          n = b->size;
        }
        break;
      }
      link = &b->next;
    }
  }
  int fresh = 0;
  if (!off) {
    uint64_t align = n <= 4096 ? 32 : 4096;
    uint64_t start = (arena->top + align - 1) & ~(align - 1);
    if (start + n <= arena->size) { off = start; arena->top = start + n; fresh = n >= 65536; }
  }
  if (off) {
    block *b = MP_PTR(off);
    b->size = n; b->magic = BLOCK_MAGIC; b->free = 0;
    arena->used += n; arena->blocks++;
  }
  mp_unlock(&arena->lock);
  /* fresh pages: one call to fault them all in is much cheaper than a fault per page */
  if (fresh) madvise(MP_PTR(off), n, MADV_POPULATE_WRITE);
  return off ? off + sizeof(block) : 0;
}

uint64_t mp_alloc(lua_State *L, size_t n) {
  mp_arena_ensure(L);
  uint64_t off = mp_alloc_try(n);
  if (!off) mp_oom_error(L, n);
  return off;
}

int mp_oom_error(lua_State *L, size_t want) {
  return luaL_error(L, "out of shared memory: %I bytes wanted, arena limit %I bytes (%I in use; set LUA_MP_ARENA_SIZE)",
                    (lua_Integer)want, (lua_Integer)(arena ? arena->size : 0), (lua_Integer)mp_arena_used());
}

/* ------------------------------------------------- processes (stubs for now) */

uint64_t mp_proc_prefork(lua_State *L) { (void)L; return 0; }
void mp_proc_child(uint64_t token) { (void)token; }
void mp_proc_parent(uint64_t token, pid_t pid) { (void)token; (void)pid; }
void mp_proc_reaped(pid_t pid) { (void)pid; }

void mp_free(uint64_t off) {
  if (!off) return;
  block *b = MP_PTR(off - sizeof(block));
  if (b->magic != BLOCK_MAGIC || b->free) abort();  /* double free: a bug of ours */
  mp_lock(&arena->lock);
  b->free = 1;
  arena->used -= b->size; arena->blocks--;
  if (b->size <= ((uint64_t)1 << MAXSHIFT)) {
    int c = size_class(b->size);
    b->next = arena->freelist[c];
    arena->freelist[c] = off - sizeof(block);
  } else {
    give_back(b);
    b->next = arena->large;
    arena->large = off - sizeof(block);
  }
  mp_unlock(&arena->lock);
}

size_t mp_arena_used(void) { return arena ? arena->used : 0; }
/* the part of the arena handed out so far: a valid object lies below it */
size_t mp_arena_top(void) { return arena ? arena->top : 0; }
size_t mp_arena_blocks(void) { return arena ? arena->blocks : 0; }
void mp_arena_forked(void) { if (arena) __atomic_add_fetch(&arena->forks, 1, __ATOMIC_SEQ_CST); }
uint32_t mp_arena_forks(void) { return arena ? __atomic_load_n(&arena->forks, __ATOMIC_SEQ_CST) : 0; }

/* ------------------------------------------------------- shared objects */

uint64_t mp_obj_new(lua_State *L, size_t size, uint32_t type) {
  uint64_t off = mp_alloc(L, size);
  mp_obj *o = MP_PTR(off);
  memset(o, 0, size);
  o->refs = 1;
  o->forks = mp_arena_forks();
  o->type = type;
  return off;
}

void mp_obj_retain(uint64_t off) {
  mp_obj *o = MP_PTR(off);
  __atomic_add_fetch(&o->refs, 1, __ATOMIC_SEQ_CST);
}

/* An object is freed when its last counted handle goes, unless it may still
** be reached another way: it was encoded (bytes may be in flight) or a fork
** happened since it was made (a child holds an uncounted copy of a handle). */
void mp_obj_release_with(uint64_t off, pid_t pid, void (*dtor)(mp_obj *o)) {
  if (!off || pid != getpid()) return;
  mp_obj *o = MP_PTR(off);
  if (__atomic_sub_fetch(&o->refs, 1, __ATOMIC_SEQ_CST) == 0 &&
      !__atomic_load_n(&o->pinned, __ATOMIC_SEQ_CST) && o->forks == mp_arena_forks()) {
    if (dtor) dtor(o);
    mp_free(off);
  }
}

void mp_obj_release(uint64_t off, pid_t pid) { mp_obj_release_with(off, pid, NULL); }

/* ------------------------------------------------------------- Lua API */

static int arena_stats(lua_State *L) {
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)mp_arena_used()); lua_setfield(L, -2, "used");
  lua_pushinteger(L, (lua_Integer)mp_arena_blocks()); lua_setfield(L, -2, "blocks");
  lua_pushinteger(L, arena ? (lua_Integer)arena->size : 0); lua_setfield(L, -2, "size");
  return 1;
}

int mp_arena_open(lua_State *L) {
  lua_pushcfunction(L, arena_stats);
  lua_setfield(L, -2, "arena_stats");
  return 0;
}
