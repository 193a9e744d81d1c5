/* codec.c: the value codec, Lua values to bytes and back (see docs/codec.md). */
#include <math.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/random.h>
#include <unistd.h>

#include "mp.h"

#include "codec.h"

#define MAXDEPTH 200
#define BIGSTR 65536      /* strings this long are referenced, not copied, while encoding */
#define MAXTYPES 32

#if defined(__clang__)
#define NO_COVERAGE __attribute__((no_sanitize("coverage")))  /* see dump_ok */
#else
#define NO_COVERAGE
#endif

static const mp_handle_type *types[MAXTYPES];
static int ntypes;

void mp_codec_register(const mp_handle_type *t) {
  for (int i = 0; i < ntypes; i++) if (types[i] == t) return;
  if (ntypes < MAXTYPES) types[ntypes++] = t;
}

static const mp_handle_type *find_type(const char *name, size_t n) {
  for (int i = 0; i < ntypes; i++)
    if (strlen(types[i]->name) == n && memcmp(types[i]->name, name, n) == 0) return types[i];
  return NULL;
}

/* A keyed checksum of function dumps (SipHash-2-4): lua_load trusts bytecode,
** so a dump must never reach it unless this program family made it. The key is
** drawn from getrandom once per program, when the module is first loaded, and
** every forked descendant inherits it: bytes made elsewhere (another run, another
** program, a hand edit) fail the check before lua_load (see docs/codec.md). */
static uint64_t sipkey[2];
static int sipkeyed;

static void make_key(void) {
  if (sipkeyed) return;
  unsigned char k[16];
  size_t got = 0;
  while (got < sizeof k) {
    ssize_t r = getrandom(k + got, sizeof k - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) abort();  /* no entropy source: nothing safe to fall back on */
    got += (size_t)r;
  }
  memcpy(sipkey, k, 16);
  sipkeyed = 1;
}

/* the key, for a spawned interpreter (forkserver.c): it gets its parent's */
void mp_codec_key(uint64_t k[2]) { make_key(); k[0] = sipkey[0], k[1] = sipkey[1]; }
void mp_codec_setkey(const uint64_t k[2]) { sipkey[0] = k[0], sipkey[1] = k[1]; sipkeyed = 1; }

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND do { \
    v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32); \
    v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2; \
    v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0; \
    v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32); \
  } while (0)

static uint64_t checksum(const unsigned char *p, size_t n) {
  uint64_t k0 = sipkey[0], k1 = sipkey[1];
  uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
  uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
  uint64_t b = (uint64_t)n << 56, m;
  for (; n >= 8; p += 8, n -= 8) {
    memcpy(&m, p, 8);  /* little-endian hosts; the key is never shared across hosts */
    v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
  }
  m = 0;
  memcpy(&m, p, n);
  b |= m;
  v3 ^= b; SIPROUND; SIPROUND; v0 ^= b;
  v2 ^= 0xff;
  SIPROUND; SIPROUND; SIPROUND; SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}

/* Compared byte by byte, without coverage: a fuzzer that watches comparisons
** must not learn the expected checksum and feed forged bytecode to lua_load. */
static NO_COVERAGE int dump_ok(const unsigned char *p, size_t n, const unsigned char *sum) {
  uint64_t h = checksum(p, n);
  unsigned char hb[8];
  unsigned diff = 0;
  memcpy(hb, &h, 8);
  for (int i = 0; i < 8; i++) diff |= (unsigned)(hb[i] ^ sum[i]);
  return diff == 0;
}

/* ------------------------------------------------------------ buffers */

int mp_buf_resize(lua_State *L, mp_buf *b, size_t cap) {
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  char *p = f(ud, b->p, b->cap, cap);
  if (!p) return 0;
  b->p = p; b->cap = cap;
  return 1;
}

void mp_buf_reserve(lua_State *L, mp_buf *b, size_t extra) {
  if (b->cap - b->n >= extra) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap - b->n < extra) {
    if (cap > ((size_t)-1) / 2) luaL_error(L, "value too large to encode");
    cap *= 2;
  }
  if (!mp_buf_resize(L, b, cap)) luaL_error(L, "not enough memory to encode");
}

static inline void reserve(lua_State *L, mp_buf *b, size_t extra) {
  if (b->cap - b->n < extra) mp_buf_reserve(L, b, extra);
}

void mp_buf_add(lua_State *L, mp_buf *b, const void *s, size_t n) {
  reserve(L, b, n);
  memcpy(b->p + b->n, s, n);
  b->n += n;
}

void mp_buf_free(lua_State *L, mp_buf *b) {
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  if (b->p) f(ud, b->p, b->cap, 0);
  b->p = NULL; b->n = b->cap = 0;
}

/* ---------------------------------------------- array parts, in place */

/* Arrays of numbers are the big messages (a list of ids, a vector): through the
** API, each element costs a lua_rawgeti, a lua_isinteger and a lua_tointeger
** (about 90 instructions); read in place, a few. So the packed arrays (T_INTS,
** T_FLOATS) read and fill a table's array part directly, through this mirror of
** Lua 5.4's Table and TValue (ltable.h, lobject.h: the same in every 5.4 release).
** view_check proves the mirror right on this very Lua when the module loads (a
** table made and read through the API both ways); if it is not, or on another
** Lua, every array goes through the API. Only numbers are read or written this
** way: they need no GC barrier, and nothing here calls Lua while it reads. */
typedef union view_raw { void *p; lua_Integer i; lua_Number n; } view_raw;  /* Value */
typedef struct view_value { view_raw v; unsigned char tt; } view_value;      /* TValue */
typedef struct view_node {              /* Node: a value, its key's type and the key */
  view_raw v; unsigned char tt, key_tt;
  int next;
  view_raw k;
} view_node;
typedef struct view_table {
  void *next; unsigned char tt, marked;  /* CommonHeader */
  unsigned char flags, lsizenode;
  unsigned int alimit;                   /* array[0 .. alimit-1] is in the array part */
  view_value *array;
  view_node *node;                       /* 1 << lsizenode nodes */
  view_node *lastfree;
} view_table;
typedef struct view_string {             /* TString */
  void *next; unsigned char tt, marked;
  unsigned char extra, shrlen;           /* shrlen: a short string's length */
  unsigned int hash;
  union {
    size_t lnglen;                       /* a long string's length */
    const struct view_string *hnext;     /* a short string's next in its string table bucket */
  } u;
  char contents[1];
} view_string;
typedef struct view_strt { const view_string **hash; int nuse, size; } view_strt;  /* stringtable */
typedef struct view_state {              /* the head of a lua_State */
  void *next; unsigned char tt, marked, status, allowhook; unsigned short nci;
  void *top;
  const struct view_global *l_G;
} view_state;
typedef struct view_global {             /* the head of a global_State */
  lua_Alloc frealloc; void *ud;
  ptrdiff_t totalbytes, GCdebt; size_t GCestimate, lastatomic;
  view_strt strt;                        /* the short strings */
} view_global;
#define VIEW_INT 0x03    /* LUA_VNUMINT */
#define VIEW_FLOAT 0x13  /* LUA_VNUMFLT */
#define VIEW_FALSE 0x01  /* LUA_VFALSE */
#define VIEW_TRUE 0x11   /* LUA_VTRUE */
#define VIEW_SHRSTR 0x44 /* LUA_VSHRSTR, collectable */
#define VIEW_LNGSTR 0x54 /* LUA_VLNGSTR, collectable */
#define VIEW_TABLE 0x45  /* LUA_VTABLE, collectable */
#define VIEW_EMPTY(tt) (((tt) & 0x0f) == 0)  /* nil, empty slot, absent key */
#define VIEW_REALASIZE 0x80  /* flags: BITRAS, set when alimit is not the array's size */
#define VIEW_BLACK 0x20      /* marked: BLACKBIT */
#define TPL_MAX 16   /* pairs of a table that may be filled from a template (see decode_pairs) */
#define TPLS 8       /* templates remembered by a decoder */

/* A template: the keys of a kind of table seen before in the message (its
** shape), and a table of that shape, filled through the API, whose nodes
** the next ones copy (see decode_pairs). */
typedef struct tpl {
  const view_string *keys[TPL_MAX];  /* in the order of the input */
  const view_table *t;               /* NULL: the shape was seen once */
  view_node *node;                   /* t's nodes when it became the template */
  ptrdiff_t lastfree;                /* t's lastfree, from node */
  unsigned char pos[TPL_MAX];        /* t's node of each key */
  unsigned char npairs, lsizenode;
} tpl;

/* Fills the new table t (lua_createtable(L, 0, npairs): as many nodes as the
** template, all empty) with the template's nodes (its keys, their chains, its
** free pointer), then writes the values. The caller checks that t is not black
** (a black table would need a GC barrier for the values and keys it gets) and
** that nothing may collect in between. */
static void tpl_fill(view_table *t, const tpl *tp, const view_value *vals) {
  memcpy(t->node, tp->t->node, sizeof(view_node) << tp->lsizenode);
  t->lastfree = t->node + tp->lastfree;
  t->flags &= VIEW_REALASIZE;  /* no metamethod known absent (it may have come as a key) */
  for (int j = 0; j < tp->npairs; j++) {
    view_node *n = &t->node[tp->pos[j]];
    n->v = vals[j].v;
    n->tt = vals[j].tt;
  }
}

/* Makes the table t, filled through the API with the keys of tp (whose nodes
** it has, all of them), tp's template; returns 0 when a key is not found among
** its short strings (a template's keys are short strings: see decode_pairs). */
static int tpl_make(tpl *tp, const view_table *t) {
  int size = 1 << t->lsizenode;
  if (!t->node || size > 256) return 0;
  for (int j = 0; j < tp->npairs; j++) {
    int i = 0;
    while (i < size && !(t->node[i].key_tt == VIEW_SHRSTR && t->node[i].k.p == tp->keys[j]))
      i++;
    if (i == size) return 0;
    tp->pos[j] = (unsigned char)i;
  }
  tp->t = t;
  tp->node = t->node;
  tp->lastfree = t->lastfree - t->node;
  tp->lsizenode = t->lsizenode;
  return 1;
}

/* Is tp's template fit to fill t: unchanged since it became one, with as
** many nodes as t, and t not black? */
static inline int tpl_fits(const tpl *tp, const view_table *t) {
  return tp->t->node == tp->node && tp->t->lsizenode == tp->lsizenode && t->lsizenode == tp->lsizenode &&
         t->node != tp->node && !(t->marked & VIEW_BLACK);
}

/* Short strings are interned: decoding one looks it up in Lua's string table,
** where its bucket and the strings chained there are cache misses, the main
** cost of decoding many distinct strings. The decoder prefetches them (see
** str_prefetch) through this mirror of the string table and of Lua 5.4's
** string hash, which view_check_strings proves right when the module loads.
** Prefetches are hints: a wrong address costs nothing but time. */
static int view_strs;       /* the string table's mirror works */

static inline unsigned view_hash(const unsigned char *str, size_t l, unsigned seed) {
  unsigned h = seed ^ (unsigned)l;
  for (; l > 0; l--) h ^= ((h << 5) + (h >> 2) + str[l - 1]);
  return h;
}

#if LUA_VERSION_NUM == 504
static int view_works;   /* set by view_check */
static int view_nodes;   /* the hash part's mirror works too (view_check) */

/* the array part of the table at idx, and how many of its first slots may be read */
static inline view_value *view_array(lua_State *L, int idx, lua_Integer *len) {
  const view_table *t = lua_topointer(L, idx);
  if (!view_works || !t || !t->array) { *len = 0; return NULL; }
  *len = (lua_Integer)t->alimit;
  return t->array;
}

/* the array part of the new table at idx, when it has room for n (lua_createtable) */
static inline view_value *view_fresh(lua_State *L, int idx, lua_Integer n) {
  const view_table *t = lua_topointer(L, idx);
  return view_works && t && t->array && (lua_Integer)t->alimit >= n ? t->array : NULL;
}


/* A table filled from a template (tpl_fill), read through the API, and given
** one key more through the API (its free pointer and chains must hold). */
static int view_check_fill(lua_State *L) {
  static const char *const names[] = { "id", "name", "tags" };
  tpl tp;
  memset(&tp, 0, sizeof tp);
  tp.npairs = 3;
  lua_createtable(L, 0, 3);  /* the template */
  int src = lua_gettop(L);
  for (int j = 0; j < 3; j++) {
    lua_pushstring(L, names[j]);
    tp.keys[j] = lua_topointer(L, -1);
    lua_pushinteger(L, j);
    lua_rawset(L, src);
  }
  lua_createtable(L, 0, 3);
  int dst = lua_gettop(L);
  lua_pushliteral(L, "item2");
  view_value vals[3];
  vals[0].v.i = 42; vals[0].tt = VIEW_INT;
  vals[1].v.p = (void *)lua_topointer(L, -1); vals[1].tt = VIEW_SHRSTR;
  vals[2].v.p = (void *)lua_topointer(L, src); vals[2].tt = VIEW_TABLE;
  view_table *t = (view_table *)lua_topointer(L, dst);
  int ok = tpl_make(&tp, lua_topointer(L, src)) && tpl_fits(&tp, t);
  if (ok) {
    tpl_fill(t, &tp, vals);
    lua_pushliteral(L, "extra"); lua_pushinteger(L, 7); lua_rawset(L, dst);
    ok = lua_getfield(L, dst, "id") == LUA_TNUMBER && lua_isinteger(L, -1) && lua_tointeger(L, -1) == 42 &&
         lua_getfield(L, dst, "name") == LUA_TSTRING && strcmp(lua_tostring(L, -1), "item2") == 0 &&
         lua_getfield(L, dst, "tags") == LUA_TTABLE && lua_topointer(L, -1) == lua_topointer(L, src) &&
         lua_getfield(L, dst, "extra") == LUA_TNUMBER && lua_tointeger(L, -1) == 7;
    lua_settop(L, dst);
    int count = 0;
    lua_pushnil(L);
    while (lua_next(L, dst)) { count++; lua_pop(L, 1); }
    ok = ok && count == 4;
  }
  lua_settop(L, src - 1);
  return ok;
}

/* The hash part: a table of every kind of key and leaf value, filled through
** the API, read through the mirror (nodes, string headers, type tags); and the
** flag that says the array part is smaller than alimit. */
static int view_check_nodes(lua_State *L) {
  static const char lk[] = "a long key, longer than the 40 bytes of short strings";
  static const char lv[] = "a long value, longer than the 40 bytes of short strings";
  lua_createtable(L, 0, 7);
  int t = lua_gettop(L);
  lua_pushliteral(L, "id"); lua_pushinteger(L, -7); lua_rawset(L, t);
  lua_pushliteral(L, "score"); lua_pushnumber(L, 2.5); lua_rawset(L, t);
  lua_pushliteral(L, "name"); lua_pushliteral(L, "item1"); lua_rawset(L, t);
  lua_pushstring(L, lk); lua_pushstring(L, lv); lua_rawset(L, t);
  lua_pushboolean(L, 1); lua_pushboolean(L, 0); lua_rawset(L, t);
  lua_pushnumber(L, 3.5); lua_pushvalue(L, t); lua_rawset(L, t);
  lua_pushinteger(L, 9); lua_pushboolean(L, 1); lua_rawset(L, t);
  const view_table *v = lua_topointer(L, t);
  lua_pushliteral(L, "name");
  const view_string *name = lua_topointer(L, -1);
  int ok = v && !v->array && v->alimit == 0 && v->node && v->lsizenode == 3 && name &&
           name->tt == (VIEW_SHRSTR & 0x3f) && name->contents == lua_tostring(L, -1);
  lua_pop(L, 1);
  int seen = 0, count = 0;
  for (int i = 0; ok && i < 1 << v->lsizenode; i++) {
    const view_node *n = &v->node[i];
    if (VIEW_EMPTY(n->tt)) continue;
    const view_string *k = n->k.p, *s = n->v.p;
    count++;
    if (n->key_tt == VIEW_SHRSTR && k->shrlen == 2 && memcmp(k->contents, "id", 3) == 0)
      seen |= 1, ok = n->tt == VIEW_INT && n->v.i == -7;
    else if (n->key_tt == VIEW_SHRSTR && k->shrlen == 5 && memcmp(k->contents, "score", 6) == 0)
      seen |= 2, ok = n->tt == VIEW_FLOAT && n->v.n == 2.5;
    else if (n->key_tt == VIEW_SHRSTR && k == name)
      seen |= 4, ok = n->tt == VIEW_SHRSTR && s->shrlen == 5 && memcmp(s->contents, "item1", 6) == 0;
    else if (n->key_tt == VIEW_LNGSTR && k->tt == (VIEW_LNGSTR & 0x3f) && k->u.lnglen == sizeof lk - 1 &&
             memcmp(k->contents, lk, sizeof lk) == 0)
      seen |= 8, ok = n->tt == VIEW_LNGSTR && s->u.lnglen == sizeof lv - 1 && memcmp(s->contents, lv, sizeof lv) == 0;
    else if (n->key_tt == VIEW_TRUE)
      seen |= 16, ok = n->tt == VIEW_FALSE;
    else if (n->key_tt == VIEW_FLOAT && n->k.n == 3.5)
      seen |= 32, ok = n->tt == VIEW_TABLE && n->v.p == v;
    else if (n->key_tt == VIEW_INT && n->k.i == 9)
      seen |= 64, ok = n->tt == VIEW_TRUE;
    else
      ok = 0;
  }
  ok = ok && seen == 127 && count == 7;
  lua_pop(L, 1);
  /* a border found below alimit makes alimit the border and sets the flag */
  lua_createtable(L, 4, 0);
  lua_pushinteger(L, 1); lua_rawseti(L, -2, 1);
  lua_pushinteger(L, 2); lua_rawseti(L, -2, 2);
  v = lua_topointer(L, -1);
  ok = ok && v->alimit == 4 && !(v->flags & VIEW_REALASIZE) && lua_rawlen(L, -1) == 2 &&
       (v->alimit == 4 ? !(v->flags & VIEW_REALASIZE) : (v->flags & VIEW_REALASIZE) != 0);
  lua_pop(L, 1);
  return ok && view_check_fill(L);
}

/* The string table: found from the lua_State through its global_State (whose
** allocator is the one lua_getallocf gives), strings hashed as Lua does and
** found in their bucket. */
static int view_check_strings(lua_State *L) {
  static const char *const probes[] = { "multiprocessing.codec", "id", "item12345" };
  void *ud;
  lua_Alloc f = lua_getallocf(L, &ud);
  const view_global *g = ((const view_state *)(const void *)L)->l_G;
  if (!g || g->frealloc != f || g->ud != ud) return 0;
  const view_strt *st = &g->strt;
  if (!st->hash || st->size < 1 || (st->size & (st->size - 1)) || st->nuse < 1) return 0;
  lua_pushliteral(L, "");
  unsigned seed = ((const view_string *)lua_topointer(L, -1))->hash;
  lua_pop(L, 1);
  for (int i = 0; i < 3; i++) {
    size_t n = strlen(probes[i]);
    lua_pushlstring(L, probes[i], n);
    const view_string *str = lua_topointer(L, -1), *c = NULL;
    if (str->shrlen == n && str->hash == view_hash((const unsigned char *)probes[i], n, seed)) {
      c = st->hash[str->hash & (unsigned)(st->size - 1)];
      for (int k = 0; c && c != str && k < 1000000; k++) c = c->u.hnext;
    }
    lua_pop(L, 1);
    if (c != str) return 0;
  }
  return 1;
}

static void view_check(lua_State *L) {
  static const lua_Integer ints[] = { 7, -1, INT64_MIN, INT64_MAX };
  static int checked;
  if (checked) return;  /* once per program, as the checksum's key */
  checked = 1;
  int ok = sizeof(view_value) == 16 && sizeof(lua_Integer) == 8 && sizeof(lua_Number) == 8;
  if (!ok) return;
  /* read: a table filled through the API */
  lua_createtable(L, 6, 0);
  for (int i = 0; i < 4; i++) { lua_pushinteger(L, ints[i]); lua_rawseti(L, -2, i + 1); }
  lua_pushnumber(L, 2.5); lua_rawseti(L, -2, 5);
  lua_pushnumber(L, 3.0); lua_rawseti(L, -2, 6);
  const view_table *t = lua_topointer(L, -1);
  ok = t && t->array && t->alimit == 6;
  for (int i = 0; ok && i < 4; i++) ok = t->array[i].tt == VIEW_INT && t->array[i].v.i == ints[i];
  ok = ok && t->array[4].tt == VIEW_FLOAT && t->array[4].v.n == 2.5 &&
       t->array[5].tt == VIEW_FLOAT && t->array[5].v.n == 3.0;
  lua_pop(L, 1);
  if (!ok) return;
  /* write: a new table filled in place, read through the API */
  lua_createtable(L, 3, 0);
  view_table *w = (view_table *)lua_topointer(L, -1);
  ok = w && w->array && w->alimit == 3;
  if (ok) {
    w->array[0].v.i = INT64_MIN; w->array[0].tt = VIEW_INT;
    w->array[1].v.n = -0.5; w->array[1].tt = VIEW_FLOAT;
    w->array[2].v.i = 42; w->array[2].tt = VIEW_INT;
    ok = lua_rawlen(L, -1) == 3 &&
         lua_rawgeti(L, -1, 1) == LUA_TNUMBER && lua_isinteger(L, -1) && lua_tointeger(L, -1) == INT64_MIN &&
         lua_rawgeti(L, -2, 2) == LUA_TNUMBER && !lua_isinteger(L, -1) && lua_tonumber(L, -1) == -0.5 &&
         lua_rawgeti(L, -3, 3) == LUA_TNUMBER && lua_isinteger(L, -1) && lua_tointeger(L, -1) == 42;
    lua_pop(L, 3);
  }
  lua_pop(L, 1);
  view_works = ok;
  view_nodes = ok && view_check_nodes(L);
  view_strs = ok && view_check_strings(L);
}
#else
static int view_works, view_nodes;
static inline view_value *view_array(lua_State *L, int idx, lua_Integer *len) { *len = 0; return NULL; }
static inline view_value *view_fresh(lua_State *L, int idx, lua_Integer n) { return NULL; }
static void view_check(lua_State *L) { (void)L; }
#endif

/* ------------------------------------------------ pointer -> int maps */

typedef struct pmap {
  const void **keys;
  int64_t *vals;
  size_t cap, n;
} pmap;

/* Tables made one after the other lie at growing addresses: a hash that keeps
** their order keeps the map's accesses near each other (a big message's
** tables would otherwise cost a cache miss each), and the high bits folded in
** spread objects that lie a power of two apart. */
static size_t phash(const void *p) {
  uint64_t x = (uint64_t)(uintptr_t)p;
  return (size_t)((x >> 4) ^ (x >> 21) ^ (x >> 39));
}

static void pmap_free(pmap *m) {
  free(m->keys); free(m->vals);
  memset(m, 0, sizeof(*m));
}

/* A big map is kept only while big values keep coming: the memset that empties
** it must stay small next to the work that filled it. */
static void pmap_clear(pmap *m) {
  if (m->cap > 65536 && m->n < m->cap / 8) pmap_free(m);
  else if (m->n) { memset(m->keys, 0, m->cap * sizeof(*m->keys)); m->n = 0; }
}

static int64_t pmap_get(const pmap *m, const void *k) {  /* -1 when absent */
  if (!m->n || !k) return -1;  /* NULL marks empty slots: never a key */
  for (size_t i = phash(k) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
    if (m->keys[i] == k) return m->vals[i];
    if (!m->keys[i]) return -1;
  }
}

static void pmap_put(lua_State *L, pmap *m, const void *k, int64_t v) {
  if ((m->n + 1) * 2 > m->cap) {
    pmap old = *m;
    size_t cap = old.cap ? old.cap * 2 : 64;
    m->keys = calloc(cap, sizeof(*m->keys));
    m->vals = malloc(cap * sizeof(*m->vals));
    if (!m->keys || !m->vals) { free(m->keys); free(m->vals); *m = old; luaL_error(L, "not enough memory"); }
    m->cap = cap; m->n = 0;
    for (size_t i = 0; i < old.cap; i++) if (old.keys[i]) pmap_put(L, m, old.keys[i], old.vals[i]);
    free(old.keys); free(old.vals);
  }
  size_t i = phash(k) & (m->cap - 1);
  while (m->keys[i]) i = (i + 1) & (m->cap - 1);
  m->keys[i] = k; m->vals[i] = v; m->n++;
}

/* drops the entries whose value >> shift is above max (an encode that is undone) */
static void pmap_drop_above(lua_State *L, pmap *m, int64_t max, int shift) {
  if (!m->n) return;
  pmap old = *m;
  m->keys = calloc(old.cap, sizeof(*m->keys));
  m->vals = malloc(old.cap * sizeof(*m->vals));
  if (!m->keys || !m->vals) { free(m->keys); free(m->vals); *m = old; luaL_error(L, "not enough memory"); }
  m->n = 0;
  for (size_t i = 0; i < old.cap; i++)
    if (old.keys[i] && (old.vals[i] >> shift) <= max) pmap_put(L, m, old.keys[i], old.vals[i]);
  free(old.keys); free(old.vals);
}

/* ------------------------------------------------------------ encoder */

enum { F_KEY, F_INDEX, F_UPVALUE, F_METATABLE };
typedef struct frame { int kind; int idx; lua_Integer i; const char *name; } frame;
typedef struct seg { size_t at; const char *p; size_t n; } seg;

struct mp_enc {
  mp_buf out;
  seg *segs; size_t nsegs, capsegs, segbytes;  /* big strings, kept alive by the anchor table */
  size_t *refpos; size_t caprefpos;  /* output offset of the tag of each ordinal */
  pmap refs;     /* table/function -> ordinal */
  pmap ups;      /* upvalue id -> function ordinal << 8 | upvalue number */
  pmap mods;     /* module tables (only when usemods) */
  pmap names;    /* names of globals sent in this message -> order sent */
  pmap envs;     /* environment (the globals, or a decoded one) -> its number */
  int nnames, nenvs;
  int trial;     /* > 0 while a global's value is being tried (see ship_pair) */
  int shipped;   /* globals were sent with a function */
  struct gname { size_t off; size_t len; } *gn;  /* names read by functions, offsets in out */
  size_t ngn, capgn;
  size_t *later; size_t nlater, caplater;  /* where ENV_LATER was written */
  int gwrites;   /* scan_proto: the function writes globals */
  size_t kpos[256];  /* scan_proto: offsets in out of the first constants of a prototype */
  int nrefs, busy, usemods, hascnames, hasanchors, depth, base;
  lua_Integer range_i0, range_n;  /* mp_encode_range: the root is root[i0 .. i0+n-1] */
  int small;     /* encodes in a row that used little of a big buffer */
  int sawfunc;   /* a function was met: a module may have been sent as a table */
  int canretry;  /* enc_fail may jump to retry (first pass, modules not looked up) */
  int rootidx;   /* stack index of the value being encoded */
  int stackdepth;  /* depth up to which the Lua stack has room (ensure_stack) */
  jmp_buf retry;
  const void *globals;
  const char *root;
  frame path[MAXDEPTH + 2];
  mp_sent *sent; size_t nsent, capsent;  /* objects named by the handles met (mp_enc_handles) */
};

#define ENCODER "multiprocessing.encoder"        /* the metatable */
#define CACHED "multiprocessing.encoder.cached"  /* registry key of the reusable encoder */
#define UV_CNAMES 1   /* C function -> "module\0field", built on first need */
#define UV_CARRIER 2  /* a table of 2 slots that brings a node's key and value to the stack */

static int enc_gc(lua_State *L) {
  mp_enc *e = mp_toself(L, 1, MP_CLASSES(ENCODER));
  mp_buf_free(L, &e->out);
  free(e->segs); e->segs = NULL; e->nsegs = e->capsegs = 0;
  free(e->refpos); e->refpos = NULL; e->caprefpos = 0;
  pmap_free(&e->refs); pmap_free(&e->ups); pmap_free(&e->mods);
  free(e->sent); e->sent = NULL; e->nsent = e->capsent = 0;
  pmap_free(&e->names); pmap_free(&e->envs);
  free(e->gn); e->gn = NULL; e->ngn = e->capgn = 0;
  free(e->later); e->later = NULL; e->nlater = e->caplater = 0;
  return 0;
}

static mp_enc *enc_new(lua_State *L) {
  mp_enc *e = lua_newuserdatauv(L, sizeof(mp_enc), 2);
  memset(e, 0, sizeof(*e));
  luaL_setmetatable(L, ENCODER);
  lua_createtable(L, 2, 0);
  lua_setiuservalue(L, -2, UV_CARRIER);
  return e;
}

static inline void put_u8(lua_State *L, mp_enc *e, int c) {
  reserve(L, &e->out, 1);
  e->out.p[e->out.n++] = (char)c;
}

static inline void put_raw(lua_State *L, mp_enc *e, const void *p, size_t n) {
  reserve(L, &e->out, n);
  memcpy(e->out.p + e->out.n, p, n);
  e->out.n += n;
}

static void put_str8(lua_State *L, mp_enc *e, const char *s, size_t n) {
  reserve(L, &e->out, n + 1);
  e->out.p[e->out.n] = (char)n;
  memcpy(e->out.p + e->out.n + 1, s, n);
  e->out.n += n + 1;
}

/* the path of the value being encoded, for error messages */
static void push_path(lua_State *L, mp_enc *e) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, e->root);
  for (int d = 0; d < e->depth && d <= MAXDEPTH; d++) {
    if (e->depth > 16 && d == 6) {  /* a long path: keep its two ends */
      luaL_addstring(&b, "...");
      d = e->depth - 8;
    }
    frame *f = &e->path[d];
    char tmp[64];
    switch (f->kind) {
      case F_INDEX:
        snprintf(tmp, sizeof tmp, "[%lld]", (long long)f->i);
        luaL_addstring(&b, tmp);
        break;
      case F_UPVALUE:
        luaL_addstring(&b, "<upvalue ");
        luaL_addstring(&b, f->name && *f->name ? f->name : "?");
        luaL_addstring(&b, ">");
        break;
      case F_METATABLE: luaL_addstring(&b, "<metatable>"); break;
      default: {
        int t = lua_type(L, f->idx);
        if (t == LUA_TSTRING) {
          size_t n;
          const char *s = lua_tolstring(L, f->idx, &n);
          int ident = n > 0 && n < 40 && !(s[0] >= '0' && s[0] <= '9');
          for (size_t i = 0; ident && i < n; i++)
            ident = (s[i] == '_' || (s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
                     (s[i] >= '0' && s[i] <= '9'));
          if (ident) { luaL_addchar(&b, '.'); luaL_addlstring(&b, s, n); }
          else { snprintf(tmp, sizeof tmp, "[\"%.40s\"]", s); luaL_addstring(&b, tmp); }
        } else if (t == LUA_TNUMBER) {
          lua_pushvalue(L, f->idx);
          snprintf(tmp, sizeof tmp, "[%.40s]", lua_tostring(L, -1));
          lua_pop(L, 1);
          luaL_addstring(&b, tmp);
        } else {
          snprintf(tmp, sizeof tmp, "[<%s key>]", luaL_typename(L, f->idx));
          luaL_addstring(&b, tmp);
        }
      }
    }
  }
  luaL_pushresult(&b);
}

static int sent_a_module(lua_State *L, mp_enc *e);

static char trial_failed;  /* the error value of a global that cannot be sent (see ship_pair) */

static int enc_fail(lua_State *L, mp_enc *e, const char *what) {
  if (e->trial) {  /* a global's value: ship_pair skips it, without a message */
    lua_pushlightuserdata(L, &trial_failed);
    return lua_error(L);
  }
  /* Only our own frames lie between here and mp_encode's setjmp (no Lua API
  ** call is in progress), so jumping back is safe: mp_encode resets the stack. */
  if (e->canretry && sent_a_module(L, e)) longjmp(e->retry, 1);
  e->busy = 0;  /* the error unwinds past mp_enc_done */
  push_path(L, e);
  return luaL_error(L, "cannot send %s at %s", what, lua_tostring(L, -1));
}

static void encode_value(lua_State *L, mp_enc *e, int idx);

/* Each level of nesting holds at most 8 stack slots while it encodes a child
** (and leaf work needs at most 40 more): the room is made 16 levels at a time
** rather than per table. */
static inline void ensure_stack(lua_State *L, mp_enc *e) {
  if (e->depth >= e->stackdepth) {
    int need = e->base + 8 * (e->depth + 17) + 40 - lua_gettop(L);
    if (need > 0) luaL_checkstack(L, need, "value nested too deeply");
    e->stackdepth = e->depth + 16;
  }
}

/* gives the next ordinal to the table or function p, whose tag is at out[at] */
static void add_ref(lua_State *L, mp_enc *e, const void *p, size_t at) {
  int r = ++e->nrefs;
  if ((size_t)r >= e->caprefpos) {
    size_t cap = e->caprefpos ? e->caprefpos * 2 : 64;
    size_t *np = realloc(e->refpos, cap * sizeof(size_t));
    if (!np) luaL_error(L, "not enough memory");
    e->refpos = np; e->caprefpos = cap;
  }
  e->refpos[r] = at;
  pmap_put(L, &e->refs, p, r);
}

static void put_ref(lua_State *L, mp_enc *e, int64_t r) {
  e->out.p[e->refpos[r]] |= (char)SHARED;
  reserve(L, &e->out, 5);
  uint32_t v = (uint32_t)r;
  e->out.p[e->out.n] = T_REF;
  memcpy(e->out.p + e->out.n + 1, &v, 4);
  e->out.n += 5;
}

/* Does the table at the top of the stack have a name in package.loaded that
** fits a str8? Pushes that name (the first one lua_next finds) or nothing. */
static int module_name(lua_State *L) {
  const void *p = lua_topointer(L, -1);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_topointer(L, -1) == p && lua_type(L, -2) == LUA_TSTRING && lua_rawlen(L, -2) <= 255) {
      lua_pop(L, 1);
      lua_remove(L, -2);
      return 1;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return 0;
}

/* Module tables are the tables of package.loaded that hold a function: those
** travel by name. (A table of data only is sent by value, like any table.) */
static int holds_function(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -1) == LUA_TFUNCTION) { lua_pop(L, 2); return 1; }
    lua_pop(L, 1);
  }
  return 0;
}

/* Fills e->mods with the module tables of package.loaded. */
static void load_modules(lua_State *L, mp_enc *e) {
  pmap_clear(&e->mods);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TTABLE && lua_rawlen(L, -2) <= 255 &&
        pmap_get(&e->mods, lua_topointer(L, -1)) < 0 && holds_function(L, -1))
      pmap_put(L, &e->mods, lua_topointer(L, -1), 1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* Was a module table encoded as a plain table? Modules are rare in messages, so
** the encoder does not look for them per table: it checks at the end, only if
** it met a function (a module holds one), and encodes again with e->usemods
** set when a module was sent; enc_fail checks too (a module may hold what
** cannot be sent by value, like io.stdout). */
static int sent_a_module(lua_State *L, mp_enc *e) {
  if (!e->refs.n) return 0;
  int found = 0;
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushnil(L);
  while (lua_next(L, -2)) {  /* lua_topointer is NULL for non-objects: no type test first */
    if (pmap_get(&e->refs, lua_topointer(L, -1)) >= 0 && lua_type(L, -1) == LUA_TTABLE &&
        lua_type(L, -2) == LUA_TSTRING && lua_rawlen(L, -2) <= 255 && holds_function(L, -1)) {
      found = 1;
      lua_pop(L, 2);
      break;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return found;
}

/* Pushes the "module\0field" name of the C function at idx, or nil. */
static void cfunc_name(lua_State *L, mp_enc *e, int idx) {
  if (!e->hascnames) {
    e->hascnames = 1;
    lua_newtable(L);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_pushnil(L);
    while (lua_next(L, -2)) {  /* names, loaded, modname, module ("" names lmp_register's functions) */
      if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TTABLE && lua_rawlen(L, -2) <= 255 && lua_rawlen(L, -2) > 0) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {  /* names, loaded, modname, module, key, value */
          if (lua_type(L, -2) == LUA_TSTRING && lua_rawlen(L, -2) <= 255 && lua_tocfunction(L, -1)) {
            lua_pushvalue(L, -1);
            if (lua_rawget(L, -7) == LUA_TNIL) {
              lua_pop(L, 1);
              lua_pushvalue(L, -4);
              lua_pushlstring(L, "", 1);
              lua_pushvalue(L, -4);
              lua_concat(L, 3);      /* names, loaded, modname, module, key, value, name */
              lua_rawset(L, -7);
            } else {
              lua_pop(L, 2);
            }
          } else {
            lua_pop(L, 1);
          }
        }
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_setiuservalue(L, e->base, UV_CNAMES);
  }
  lua_getiuservalue(L, e->base, UV_CNAMES);
  lua_pushvalue(L, idx);
  lua_rawget(L, -2);
  lua_remove(L, -2);
}

static int writer(lua_State *L, const void *p, size_t n, void *ud) {
  mp_buf_add(L, &((mp_enc *)ud)->out, p, n);
  return 0;
}

static inline void put_integer(lua_State *L, mp_enc *e, lua_Integer v) {
  reserve(L, &e->out, 9);
  char *o = e->out.p + e->out.n;
  if (v >= INT8_MIN && v <= INT8_MAX) { int8_t x = (int8_t)v; o[0] = T_INT8; memcpy(o + 1, &x, 1); e->out.n += 2; }
  else if (v >= INT16_MIN && v <= INT16_MAX) { int16_t x = (int16_t)v; o[0] = T_INT16; memcpy(o + 1, &x, 2); e->out.n += 3; }
  else if (v >= INT32_MIN && v <= INT32_MAX) { int32_t x = (int32_t)v; o[0] = T_INT32; memcpy(o + 1, &x, 4); e->out.n += 5; }
  else { int64_t x = (int64_t)v; o[0] = T_INT64; memcpy(o + 1, &x, 8); e->out.n += 9; }
}

static inline void put_float(lua_State *L, mp_enc *e, lua_Number v) {
  reserve(L, &e->out, 9);
  char *o = e->out.p + e->out.n;
  o[0] = T_FLOAT;
  memcpy(o + 1, &v, 8);
  e->out.n += 9;
}

static inline void put_number(lua_State *L, mp_enc *e, int idx) {
  if (lua_isinteger(L, idx)) put_integer(L, e, lua_tointeger(L, idx));
  else put_float(L, e, lua_tonumber(L, idx));
}

/* str8 or str32 of a string that is not a big one (see encode_string) */
static inline void put_string(lua_State *L, mp_enc *e, const char *s, size_t n) {
  reserve(L, &e->out, n + 5);
  char *o = e->out.p + e->out.n;
  if (n <= 255) {
    o[0] = T_STR8;
    o[1] = (char)n;
    memcpy(o + 2, s, n);
    e->out.n += n + 2;
  } else {
    uint32_t n32 = (uint32_t)n;
    o[0] = T_STR32;
    memcpy(o + 1, &n32, 4);
    memcpy(o + 5, s, n);
    e->out.n += n + 5;
  }
}

/* Writes a leaf (a number, a boolean, a string shorter than BIGSTR) read in
** place (see view_node) and returns 1; returns 0 for any other value. */
static inline __attribute__((always_inline)) int put_leaf(lua_State *L, mp_enc *e, unsigned tt, view_raw v) {
  switch (tt) {
    case VIEW_INT: put_integer(L, e, v.i); return 1;
    case VIEW_FLOAT: put_float(L, e, v.n); return 1;
    case VIEW_FALSE: put_u8(L, e, T_FALSE); return 1;
    case VIEW_TRUE: put_u8(L, e, T_TRUE); return 1;
    case VIEW_SHRSTR: {
      const view_string *s = v.p;
      put_string(L, e, s->contents, s->shrlen);
      return 1;
    }
    case VIEW_LNGSTR: {
      const view_string *s = v.p;
      if (s->u.lnglen >= BIGSTR) return 0;
      put_string(L, e, s->contents, s->u.lnglen);
      return 1;
    }
    default: return 0;
  }
}

static void encode_string(lua_State *L, mp_enc *e, int idx);

/* lua_next(t, k) for a key k that is absent: Lua accepts it only when k lies in
** the array part of t (and raises otherwise), so this succeeds exactly when
** keys 1..k-1 are all in the array part and lua_next may resume after them. */
static int next_probe(lua_State *L) {
  return lua_next(L, 1) ? 2 : 0;
}

/* --- packed arrays: a table of numbers at 1..n, nothing else, no metatable */

static inline int int_width(lua_Integer v) {
  return v >= INT8_MIN && v <= INT8_MAX ? 1 : v >= INT16_MIN && v <= INT16_MAX ? 2
       : v >= INT32_MIN && v <= INT32_MAX ? 4 : 8;
}

/* T_INTS body, from out[d]: stores v as item k (from 0), widening the k items
** stored before when v needs more room; *w is the width so far */
static inline void pack_int(lua_State *L, mp_enc *e, size_t d, lua_Integer n, lua_Integer k,
                            lua_Integer v, int *w) {
  if (int_width(v) > *w) {
    int w2 = int_width(v);
    reserve(L, &e->out, d - e->out.n + (size_t)n * (size_t)w2);
    unsigned char *o = (unsigned char *)e->out.p + d;
    for (lua_Integer j = k - 1; j >= 0; j--) {  /* back to front, in place */
      int64_t x;
      switch (*w) {
        case 1: { int8_t y; memcpy(&y, o + j, 1); x = y; break; }
        case 2: { int16_t y; memcpy(&y, o + 2 * j, 2); x = y; break; }
        default: { int32_t y; memcpy(&y, o + 4 * j, 4); x = y; break; }
      }
      switch (w2) {
        case 2: { int16_t y = (int16_t)x; memcpy(o + 2 * j, &y, 2); break; }
        case 4: { int32_t y = (int32_t)x; memcpy(o + 4 * j, &y, 4); break; }
        default: memcpy(o + 8 * j, &x, 8); break;
      }
    }
    *w = w2;
  }
  unsigned char *o = (unsigned char *)e->out.p + d;
  switch (*w) {
    case 1: { int8_t y = (int8_t)v; memcpy(o + k, &y, 1); break; }
    case 2: { int16_t y = (int16_t)v; memcpy(o + 2 * k, &y, 2); break; }
    case 4: { int32_t y = (int32_t)v; memcpy(o + 4 * k, &y, 4); break; }
    default: { int64_t y = (int64_t)v; memcpy(o + 8 * k, &y, 8); break; }
  }
}

/* Writes t[i0 .. i0+n-1] (t at idx) as T_INTS or T_FLOATS over the table header
** at out[at], as its first item's type says. Returns 0, out[at ..] then free
** again, when another kind of value is met. */
static int encode_packed(lua_State *L, mp_enc *e, int idx, lua_Integer i0, lua_Integer n, size_t at) {
  lua_Integer lim;
  view_value *a = view_array(L, idx, &lim);
  if (a && i0 >= 1 && i0 - 1 <= lim) { a += i0 - 1; lim -= i0 - 1; } else { a = NULL; lim = 0; }
  if (lim > n) lim = n;
  int ints;
  if (a && lim > 0) {
    if (a[0].tt != VIEW_INT && a[0].tt != VIEW_FLOAT) return 0;
    ints = a[0].tt == VIEW_INT;
  } else {
    int t = lua_rawgeti(L, idx, i0);
    ints = lua_isinteger(L, -1);
    lua_pop(L, 1);
    if (t != LUA_TNUMBER) return 0;
  }
  size_t hdr = ints ? 6 : 5, d = at + hdr;
  e->out.n = at;
  reserve(L, &e->out, hdr + (size_t)n * (ints ? 1 : 8));
  int w = 1;
  lua_Integer k = 0;
  if (ints) {
    /* in place: nothing here calls Lua (reserve only allocates). Each width has
    ** its loop, left for pack_int when an item needs more room. */
#define PACK_LOOP(T) \
    for (unsigned char *o = (unsigned char *)e->out.p + d; k < lim; k++) { \
      if (a[k].tt != VIEW_INT) goto undo; \
      T y = (T)a[k].v.i; \
      if (y != a[k].v.i) break; \
      memcpy(o + sizeof(T) * (size_t)k, &y, sizeof(T)); \
    }
    while (k < lim) {
      switch (w) {
        case 1: PACK_LOOP(int8_t) break;
        case 2: PACK_LOOP(int16_t) break;
        case 4: PACK_LOOP(int32_t) break;
        default: PACK_LOOP(int64_t) break;
      }
      if (k < lim) { pack_int(L, e, d, n, k, a[k].v.i, &w); k++; }
    }
#undef PACK_LOOP
  } else {
    for (; k < lim; k++) {
      if (a[k].tt != VIEW_FLOAT) goto undo;
      memcpy(e->out.p + d + 8 * k, &a[k].v.n, 8);
    }
  }
  if (k < n) luaL_checkstack(L, 40, "value nested too deeply");
  while (k < n) {  /* through the API: no view, or past what it may read */
    int batch = n - k < 32 ? (int)(n - k) : 32;
    int base = lua_gettop(L);
    for (int j = 0; j < batch; j++) lua_rawgeti(L, idx, i0 + k + j);
    for (int j = 0; j < batch; j++, k++) {
      int isint = lua_isinteger(L, base + 1 + j);
      if (isint != ints || lua_type(L, base + 1 + j) != LUA_TNUMBER) { lua_settop(L, base); goto undo; }
      if (ints) pack_int(L, e, d, n, k, lua_tointeger(L, base + 1 + j), &w);
      else { lua_Number v = lua_tonumber(L, base + 1 + j); memcpy(e->out.p + d + 8 * k, &v, 8); }
    }
    lua_settop(L, base);
  }
  uint32_t n32 = (uint32_t)n;
  e->out.p[at] = (char)(ints ? T_INTS : T_FLOATS);
  memcpy(e->out.p + at + 1, &n32, 4);
  if (ints) e->out.p[at + 5] = (char)w;
  e->out.n = d + (size_t)n * (size_t)(ints ? w : 8);
  return 1;
undo:
  e->out.n = at;
  return 0;
}

/* Pushes a value read in place (and first its key, when k): written into the
** encoder's carrier table in place, read with lua_rawgeti, and emptied at once,
** so that the carrier never holds a value across anything that may collect.
** *carrier: its stack slot, 0 until it is pushed. */
static void carry(lua_State *L, mp_enc *e, int *carrier, const view_value *k, view_value v) {
  view_table *c = NULL;
  if (*carrier) c = (view_table *)lua_topointer(L, *carrier);
  else if (lua_getiuservalue(L, e->base, UV_CARRIER) == LUA_TTABLE) c = (view_table *)lua_topointer(L, -1);
  if (!c || !c->array || c->alimit < 2) {  /* (a carrier that someone resized) */
    if (*carrier) lua_remove(L, *carrier);
    else lua_pop(L, 1);
    lua_createtable(L, 2, 0);
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, e->base, UV_CARRIER);
    c = (view_table *)lua_topointer(L, -1);
  }
  *carrier = lua_gettop(L);
  c->array[0] = v;
  if (k) { c->array[1] = *k; lua_rawgeti(L, *carrier, 2); }
  lua_rawgeti(L, *carrier, 1);
  c->array[0].tt = c->array[1].tt = 0;  /* nil */
}

/* The pairs of a table whose array part is small, read in place: its array
** part (alimit slots, its whole size) then its nodes, in lua_next's order (the
** bytes are those of the loop through lua_next). Leaves go straight from the
** mirror to the output; other keys and values reach the stack through carry()
** and are encoded as usual. Encoding them may run Lua code (a finalizer) that
** changes the table: each step reads the table's fields again, so that a
** change costs no crash (the pairs sent are then unspecified, as with lua_next). */
static void encode_view_pairs(lua_State *L, mp_enc *e, const view_table *t, frame *f, uint32_t *pnarr,
                              uint32_t *pnpairs) {
  uint32_t narr = 0, npairs = 0;
  int carrier = 0;
  for (unsigned i = 0; t->array && i < t->alimit; i++) {
    view_value v = t->array[i];
    if (VIEW_EMPTY(v.tt)) continue;
    lua_Integer k = (lua_Integer)i + 1;
    if (npairs == 0 && k == (lua_Integer)narr + 1) narr++;
    else { npairs++; put_integer(L, e, k); }
    if (put_leaf(L, e, v.tt, v.v)) continue;
    f->kind = F_INDEX; f->i = k;
    carry(L, e, &carrier, NULL, v);
    encode_value(L, e, -1);
    lua_pop(L, 1);
  }
  for (size_t i = 0; i < (size_t)1 << t->lsizenode; i++) {
    const view_node *n = &t->node[i];
    if (VIEW_EMPTY(n->tt)) continue;
    view_value k = { n->k, n->key_tt }, v = { n->v, n->tt };
    if (k.tt == VIEW_INT) {
      if (npairs == 0 && k.v.i == (lua_Integer)narr + 1) narr++;
      else { npairs++; put_integer(L, e, k.v.i); }
      if (put_leaf(L, e, v.tt, v.v)) continue;
      f->kind = F_INDEX; f->i = k.v.i;
      carry(L, e, &carrier, NULL, v);
      encode_value(L, e, -1);
      lua_pop(L, 1);
      continue;
    }
    npairs++;
    int leafkey = put_leaf(L, e, k.tt, k.v);
    if (leafkey && put_leaf(L, e, v.tt, v.v)) continue;
    carry(L, e, &carrier, &k, v);
    f->kind = F_KEY; f->idx = lua_gettop(L) - 1;
    if (!leafkey) encode_value(L, e, -2);
    encode_value(L, e, -1);
    lua_pop(L, 2);
  }
  if (carrier) lua_pop(L, 1);
  *pnarr = narr;
  *pnpairs = npairs;
}

static void encode_table(lua_State *L, mp_enc *e, int idx, const void *p) {
  if (e->usemods && pmap_get(&e->mods, p) >= 0) {
    lua_pushvalue(L, idx);
    if (module_name(L)) {
      size_t n;
      const char *name = lua_tolstring(L, -1, &n);
      put_u8(L, e, T_MODULE);
      put_str8(L, e, name, n);
      lua_pop(L, 2);
      return;
    }
    lua_pop(L, 1);
  }
  ensure_stack(L, e);
  int hasmt = lua_getmetatable(L, idx);
  if (hasmt) {
    lua_getfield(L, LUA_REGISTRYINDEX, "multiprocessing.metatables");
    lua_pushvalue(L, -2);
    lua_rawget(L, -2);
    lua_replace(L, -2);  /* mt, name-or-nil */
  }
  reserve(L, &e->out, 9);
  size_t at = e->out.n;
  add_ref(L, e, p, at);
  e->out.p[at] = (char)(hasmt ? T_TABLE_MT : T_TABLE);
  e->out.n += 9;
  uint32_t narr = 0, npairs = 0;
  frame *f = &e->path[e->depth];
  const view_table *view = view_nodes && e->depth < MAXDEPTH ? p : NULL;
  if (view && !(view->flags & VIEW_REALASIZE) && view->alimit < 8) {  /* records, small arrays */
    e->depth++;
    encode_view_pairs(L, e, view, f, &narr, &npairs);
    e->depth--;
    goto pairs_done;
  }
  /* An array goes through lua_rawgeti, cheaper than lua_next, when 1..n lie in
  ** the table's array part (then lua_next can resume after n): the view says so
  ** (any n), else a probe at n + 1 (see next_probe; worth its pcall from n = 16).
  ** Only tables whose first key is 1 can be such arrays. */
  int keytop = lua_gettop(L) + 1;  /* where lua_next leaves keys */
  lua_pushnil(L);
  int more = lua_next(L, idx), fast = 0;
  lua_Integer n = 0;
  lua_Integer lim;
  if (!(more && e->depth < MAXDEPTH && lua_isinteger(L, -2) && lua_tointeger(L, -2) == 1 &&
        (n = (lua_Integer)lua_rawlen(L, idx)) >= 8 && n < (lua_Integer)UINT32_MAX)) {
    /* not an array, or a small one: lua_next all along */
  } else if (view_array(L, idx, &lim) && lim >= n) {
    /* 1..n lie in the array part (see view_array): lua_next resumes at n, no probe */
    lua_pop(L, 2);
    lua_pushinteger(L, n);
    if (!lua_next(L, idx)) { lua_pushnil(L); lua_pushnil(L); }
    fast = 1;
  } else if (n >= 16) {
    lua_pop(L, 2);
    lua_pushcfunction(L, next_probe);
    lua_pushvalue(L, idx);
    lua_pushinteger(L, n + 1);
    if (mp_pcall(L, 2, 2) == LUA_OK) {
      fast = 1;  /* the first other key and value are on the stack */
    } else {
      lua_pop(L, 1);
      lua_pushnil(L);
      more = lua_next(L, idx);
    }
  }
  if (fast && !hasmt && lua_isnil(L, -2)) {  /* 1..n and nothing else: numbers travel packed */
    if (encode_packed(L, e, idx, 1, n, at)) { lua_pop(L, 2); return; }
    e->out.n = at + 9;  /* the T_TABLE header, as written above */
  }
  e->depth++;
  if (fast) {
    /* values are fetched 32 at a time, and popped together */
    f->kind = F_INDEX;
    luaL_checkstack(L, 40, "value nested too deeply");
    for (lua_Integer i = 1; i <= n; i += 32) {
      int batch = n - i + 1 < 32 ? (int)(n - i + 1) : 32;
      unsigned char tt[32];
      for (int j = 0; j < batch; j++) tt[j] = (unsigned char)lua_rawgeti(L, idx, i + j);
      int base = lua_gettop(L) - batch;
      for (int j = 0; j < batch; j++) {
        if (tt[j] == LUA_TNUMBER) put_number(L, e, base + 1 + j);
        else if (tt[j] == LUA_TSTRING) encode_string(L, e, base + 1 + j);
        else { f->i = i + j; encode_value(L, e, base + 1 + j); }
      }
      lua_settop(L, base);
    }
    narr = (uint32_t)n;
    more = !lua_isnil(L, -2);
    if (!more) lua_pop(L, 2);
  }
  int leaves = e->depth <= MAXDEPTH;  /* strings and numbers straight, where not too deep */
  while (more) {
    if (npairs == 0 && lua_isinteger(L, -2) && lua_tointeger(L, -2) == (lua_Integer)narr + 1) {
      f->kind = F_INDEX; f->i = (lua_Integer)narr + 1;
      narr++;
    } else {
      f->kind = F_KEY; f->idx = keytop;
      npairs++;
      if (leaves && lua_type(L, -2) == LUA_TSTRING) encode_string(L, e, -2);
      else encode_value(L, e, -2);
    }
    int vt = leaves ? lua_type(L, -1) : LUA_TNONE;
    if (vt == LUA_TSTRING) encode_string(L, e, -1);
    else if (vt == LUA_TNUMBER) put_number(L, e, -1);
    else encode_value(L, e, -1);
    lua_pop(L, 1);
    more = lua_next(L, idx);
  }
  e->depth--;
pairs_done:
  memcpy(e->out.p + at + 1, &narr, 4);
  memcpy(e->out.p + at + 5, &npairs, 4);
  if (hasmt) {
    int top = lua_gettop(L);
    if (lua_type(L, top) == LUA_TSTRING) {
      size_t len;
      const char *name = lua_tolstring(L, top, &len);
      put_u8(L, e, T_NAMEDMT);
      put_str8(L, e, name, len);
    } else {
      e->path[e->depth].kind = F_METATABLE;
      e->depth++;
      encode_value(L, e, top - 1);
      e->depth--;
    }
    lua_pop(L, 2);
  }
}

/* ------------------------------------------- globals sent with functions */

/* A function whose _ENV is the sender's global table reads globals that the
** receiver may not have (a REPL's, or a script's set after the workers were
** forked). The encoder finds the names it reads (GETTABUP on its _ENV with a
** constant name, in it and its nested functions, found in its dump) and sends
** the sender's current values of those that are not library (see LIBGLOBALS),
** with UP_ENV. A value that cannot be sent is skipped. */
#define LIBGLOBALS "multiprocessing.libglobals"  /* registry: name -> library value */
#define OP_GETTABUP 11        /* Lua 5.4's opcode numbers; checked by scan_works */
#define OP_SETTABUP 15
#define ENV_LATER 0xffffffffu  /* UP_ENV: the message's environment of the globals, if any (see encode_env) */
#define DUMP_HEADER 32        /* a 5.4 dump's header and its upvalue count byte */

/* The environment made on arrival is an empty table P whose metatable has
** __index = S, the sent values, whose own metatable has __index = the globals,
** and __newindex = env_newindex: a write goes to the globals, and to S when S has
** the name (so the function reads what it wrote). Reads cost two table hops more
** than with the plain globals; a function with nothing to send keeps them. */
static int env_newindex(lua_State *L) {
  lua_settop(L, 3);
  if (lua_getmetatable(L, 1) && (lua_pushliteral(L, "__index"), lua_rawget(L, 4)) == LUA_TTABLE) {
    lua_pushvalue(L, 2);
    if (lua_rawget(L, 5) != LUA_TNIL) {
      lua_pushvalue(L, 2);
      lua_pushvalue(L, 3);
      lua_rawset(L, 5);
    }
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 3);
  lua_settable(L, -3);
  return 0;
}

/* is the table at idx an environment made by a decoder (its __newindex is
** env_newindex and its __index a table)? */
static int is_made_env(lua_State *L, int idx) {
  if (!lua_getmetatable(L, idx)) return 0;
  lua_pushliteral(L, "__newindex");
  lua_rawget(L, -2);
  lua_pushliteral(L, "__index");
  int yes = lua_rawget(L, -3) == LUA_TTABLE && lua_tocfunction(L, -2) == env_newindex;
  lua_pop(L, 3);
  return yes;
}

/* pushes a new environment (P) */
static void push_env(lua_State *L) {
  lua_newtable(L);                       /* S */
  lua_createtable(L, 0, 1);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  lua_newtable(L);                       /* S, P */
  lua_createtable(L, 0, 2);
  lua_pushvalue(L, -3);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, env_newindex);
  lua_setfield(L, -2, "__newindex");
  lua_setmetatable(L, -2);
  lua_remove(L, -2);
}

/* Reading a dump (ldump.c of 5.4): sizes are varints, most significant group
** first, the last byte marked with 0x80. Our own dumps only; any surprise
** stops the scan, and the function is then sent as before (no globals). */
typedef struct dscan { const unsigned char *p, *end; int bad; } dscan;

static size_t ds_size(dscan *s) {
  size_t x = 0;
  int b;
  do {
    if (s->p >= s->end || x >> (sizeof(size_t) * 8 - 8)) { s->bad = 1; s->p = s->end; return 0; }
    b = *s->p++;
    x = (x << 7) | (size_t)(b & 0x7f);
  } while (!(b & 0x80));
  return x;
}

static void ds_skip(dscan *s, size_t n) {
  if ((size_t)(s->end - s->p) < n) { s->bad = 1; s->p = s->end; }
  else s->p += n;
}

static void ds_string(dscan *s) {
  size_t n = ds_size(s);
  if (n) ds_skip(s, n - 1);
}

#define BIT(m, i) (((m)[(i) >> 3] >> ((i) & 7)) & 1)

/* Scans one prototype: env marks its upvalues that are the _ENV being sent
** (for the top function: given; for a nested one: those that are its parent's).
** Adds to e->gn the names read as globals. out: the start of e->out. */
static void scan_proto(lua_State *L, mp_enc *e, dscan *s, const unsigned char *out,
                       const unsigned char *env, int top, int depth) {
  if (depth > 250) { s->bad = 1; return; }
  ds_string(s);                        /* source */
  ds_size(s); ds_size(s);              /* lines */
  ds_skip(s, 3);                       /* params, vararg, stack size */
  size_t ncode = ds_size(s);
  const unsigned char *code = s->p;
  if (s->bad || ncode > (size_t)(s->end - s->p) / 4) { s->bad = 1; return; }
  s->p += ncode * 4;
  size_t nk = ds_size(s);
  for (size_t i = 0; i < nk && !s->bad; i++) {
    if (i < 256) e->kpos[i] = (size_t)(s->p - out);
    if (s->p >= s->end) { s->bad = 1; break; }
    switch (*s->p++) {
      case 0: case 1: case 17: break;            /* nil, false, true */
      case 3: case 19: ds_skip(s, 8); break;     /* integer, float */
      case 4: case 20: ds_string(s); break;      /* short, long string */
      default: s->bad = 1;
    }
  }
  size_t nup = ds_size(s);
  unsigned char mine[32] = { 0 };
  int any = 0;
  if (s->bad || nup > 256 || (size_t)(s->end - s->p) / 3 < nup) { s->bad = 1; return; }
  for (size_t j = 0; j < nup; j++, s->p += 3) {
    int on = top ? BIT(env, j) : !s->p[0] && BIT(env, s->p[1]);
    if (on) { mine[j >> 3] |= (unsigned char)(1 << (j & 7)); any = 1; }
  }
  if (any) {
    unsigned char seen[32] = { 0 };
    for (size_t i = 0; i < ncode; i++) {
      uint32_t ins;
      memcpy(&ins, code + 4 * i, 4);
      if ((ins & 0x7f) == OP_SETTABUP && BIT(mine, (ins >> 7) & 0xff)) e->gwrites = 1;
      if ((ins & 0x7f) != OP_GETTABUP) continue;
      unsigned b = (ins >> 16) & 0xff, c = ins >> 24;
      if (!BIT(mine, b) || c >= nk || BIT(seen, c)) continue;
      seen[c >> 3] |= (unsigned char)(1 << (c & 7));
      dscan k = { out + e->kpos[c], s->end, 0 };
      if (*k.p++ != 4) continue;                 /* not a short string */
      size_t n = ds_size(&k);
      if (k.bad || n < 2 || n - 1 > 255 || (size_t)(k.end - k.p) < n - 1) continue;
      if (e->ngn == e->capgn) {
        size_t cap = e->capgn ? e->capgn * 2 : 32;
        struct gname *ng = realloc(e->gn, cap * sizeof(*ng));
        if (!ng) luaL_error(L, "not enough memory");
        e->gn = ng; e->capgn = cap;
      }
      e->gn[e->ngn].off = (size_t)(k.p - out);
      e->gn[e->ngn].len = n - 1;
      e->ngn++;
    }
  }
  size_t np = ds_size(s);
  for (size_t i = 0; i < np && !s->bad; i++) scan_proto(L, e, s, out, mine, 0, depth + 1);
  if (top || s->bad) return;           /* the rest of the top function is its debug info */
  size_t n = ds_size(s);               /* debug info: line info, absolute lines, locals, upvalue names */
  ds_skip(s, n);
  n = ds_size(s);
  for (size_t i = 0; i < n && !s->bad; i++) { ds_size(s); ds_size(s); }
  n = ds_size(s);
  for (size_t i = 0; i < n && !s->bad; i++) { ds_string(s); ds_size(s); ds_size(s); }
  n = ds_size(s);
  for (size_t i = 0; i < n && !s->bad; i++) ds_string(s);
}

/* Adds to e->gn the globals read by the function whose dump is out[at .. at+n),
** upvalue up (from 0) being its _ENV. Returns 0 when the dump was not understood. */
static int scan_dump(lua_State *L, mp_enc *e, size_t at, size_t n, int up, int *writes) {
  const unsigned char *p = (const unsigned char *)e->out.p + at;
  if (n < DUMP_HEADER || memcmp(p, LUA_SIGNATURE, 4) != 0 || p[4] != 0x54 || p[5] != 0 ||
      p[12] != 4 || p[13] != 8 || p[14] != 8)
    return 0;
  unsigned char env[32] = { 0 };
  env[up >> 3] = (unsigned char)(1 << (up & 7));
  dscan s = { p + DUMP_HEADER, p + n, 0 };
  size_t g0 = e->ngn;
  e->gwrites = 0;
  scan_proto(L, e, &s, (const unsigned char *)e->out.p, env, 1, 0);
  if (s.bad) { e->ngn = g0; return 0; }
  *writes = e->gwrites;
  return 1;
}

/* Whether scan_dump understands this Lua's dumps: checked once per program on a
** function that reads one global. -1: not yet known. */
static int scan_works = -1;

static int dump_writer(lua_State *L, const void *p, size_t n, void *ud) {
  mp_buf_add(L, ud, p, n);
  return 0;
}

static int check_scan(lua_State *L, mp_enc *e) {
  static const char probe[] = "local a = ... return function() return a, mp_probe_global end";
  scan_works = 0;
  if (luaL_loadbuffer(L, probe, sizeof probe - 1, "=probe") != LUA_OK) { lua_pop(L, 1); return 0; }
  lua_call(L, 0, 1);
  size_t at = e->out.n, g0 = e->ngn;
  lua_dump(L, dump_writer, &e->out, 0);
  lua_pop(L, 1);
  int writes;
  int ok = scan_dump(L, e, at, e->out.n - at, 1, &writes) && e->ngn == g0 + 1 && e->gn[g0].len == 15 &&
           memcmp(e->out.p + e->gn[g0].off, "mp_probe_global", 15) == 0;
  e->out.n = at;
  e->ngn = g0;
  return scan_works = ok;
}

static int trial_encode(lua_State *L) {
  mp_enc *e = lua_touserdata(L, 1);
  e->base = 1;  /* the encoder, where cfunc_name finds its user value */
  e->stackdepth = 0;
  encode_value(L, e, 2);
  return 0;
}

/* Encodes the name at nameidx and the value at vidx, or nothing when the value
** cannot be sent (the encoding is then undone). Returns 1 when sent. */
static int ship_pair(lua_State *L, mp_enc *e, int nameidx, int vidx) {
  size_t n0 = e->out.n, nsegs = e->nsegs, segbytes = e->segbytes, ngn = e->ngn;
  int nrefs = e->nrefs, nnames = e->nnames, nenvs = e->nenvs, depth = e->depth;
  int base = e->base, stackdepth = e->stackdepth, canretry = e->canretry;
  size_t len;
  const char *name = lua_tolstring(L, nameidx, &len);
  put_str8(L, e, name, len);
  frame *f = &e->path[e->depth];
  f->kind = F_UPVALUE; f->name = "_ENV";
  e->depth++;
  e->trial++;
  e->canretry = 0;
  lua_pushcfunction(L, trial_encode);
  lua_pushvalue(L, e->base);
  lua_pushvalue(L, vidx);
  int st = lua_pcall(L, 2, 0, 0);
  e->trial--;
  e->base = base; e->stackdepth = stackdepth; e->canretry = canretry; e->depth = depth;
  e->busy = 1;
  if (st == LUA_OK) return 1;
  /* unsendable: a thread, a userdata, a closed handle, too deep... Anything
  ** else (no memory, an interrupt) goes on up. */
  if (!(st == LUA_ERRRUN && (lua_touserdata(L, -1) == &trial_failed ||
                             (lua_type(L, -1) == LUA_TSTRING && (strncmp(lua_tostring(L, -1), "cannot send", 11) == 0 ||
                                                                     strstr(lua_tostring(L, -1), "stack overflow"))))))
    lua_error(L);
  lua_pop(L, 1);
  if (canretry && sent_a_module(L, e)) longjmp(e->retry, 1);  /* from here, as enc_fail would */
  e->out.n = n0; e->nsegs = nsegs; e->segbytes = segbytes; e->ngn = ngn;
  while (e->nlater && e->later[e->nlater - 1] >= n0) e->nlater--;
  if (e->nrefs > nrefs) {
    pmap_drop_above(L, &e->refs, nrefs, 0);
    pmap_drop_above(L, &e->ups, nrefs, 8);
    e->nrefs = nrefs;
  }
  if (e->nnames > nnames) { pmap_drop_above(L, &e->names, nnames, 0); e->nnames = nnames; }
  if (e->nenvs > nenvs) { pmap_drop_above(L, &e->envs, nenvs, 0); e->nenvs = nenvs; }
  return 0;
}

static void put_u32(lua_State *L, mp_enc *e, uint32_t v) { put_raw(L, e, &v, 4); }

/* The upvalue at the top of the stack is the _ENV of the function at fidx, the
** globals or a decoded environment; the function's dump is out[dump .. dump+dlen).
** up: the upvalue's number (from 1). */
static void encode_env(lua_State *L, mp_enc *e, size_t dump, size_t dlen, int up) {
  int env = lua_gettop(L);
  const void *p = lua_topointer(L, env);
  int64_t num = pmap_get(&e->envs, p);
  if (p != e->globals) {  /* a decoded environment: its sent values go on with it */
    if (num >= 0) {
      put_u8(L, e, UP_ENV); put_u32(L, e, (uint32_t)num); put_u32(L, e, 0);
      return;
    }
    pmap_put(L, &e->envs, p, ++e->nenvs);
    e->shipped = 1;
    put_u8(L, e, UP_ENV); put_u32(L, e, 0);
    size_t at = e->out.n;
    put_u32(L, e, 0);
    uint32_t npairs = 0;
    lua_getmetatable(L, env);
    lua_pushliteral(L, "__index");
    lua_rawget(L, -2);  /* a table: is_made_env */
    int sent = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, sent)) {
      if (lua_type(L, -2) == LUA_TSTRING && lua_rawlen(L, -2) <= 255) {
        lua_pushvalue(L, -2);  /* a copy: lua_tolstring must not touch lua_next's key */
        npairs += (uint32_t)ship_pair(L, e, lua_gettop(L), lua_gettop(L) - 1);
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
    memcpy(e->out.p + at, &npairs, 4);
    return;
  }
  /* the globals: the names it reads, less those of the library */
  size_t g0 = e->ngn;
  int writes = 0;
  if ((scan_works == 1 || (scan_works < 0 && check_scan(L, e))) && scan_dump(L, e, dump, dlen, up - 1, &writes)) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_getfield(L, LUA_REGISTRYINDEX, LIBGLOBALS);
    int G = env + 1, lib = env + 2;
    size_t g1 = g0;  /* the names worth sending move to gn[g0 .. g1) */
    int named = 0;   /* some names were sent by another function of the message */
    for (size_t g = g0; g < e->ngn; g++) {
      lua_pushlstring(L, e->out.p + e->gn[g].off, e->gn[g].len);
      if (pmap_get(&e->names, lua_topointer(L, -1)) >= 0) { named = 1; lua_pop(L, 1); continue; }
      lua_pushvalue(L, -1);
      int t = lua_rawget(L, G);
      int keep = t != LUA_TNIL && lua_topointer(L, -1) != e->globals;
      if (keep && (t == LUA_TTABLE || t == LUA_TFUNCTION)) {
        lua_pushvalue(L, -2);
        lua_rawget(L, lib);
        keep = !lua_rawequal(L, -1, -2);
        lua_pop(L, 1);
      }
      lua_pop(L, 2);
      if (keep) e->gn[g1++] = e->gn[g];
    }
    e->ngn = g1;
    if (g1 > g0) {
      int isnew = num < 0;
      if (isnew) { num = ++e->nenvs; pmap_put(L, &e->envs, p, num); }
      int nenvs = e->nenvs;
      size_t hdr = e->out.n;
      put_u8(L, e, UP_ENV); put_u32(L, e, isnew ? 0 : (uint32_t)num);
      size_t at = e->out.n;
      put_u32(L, e, 0);
      uint32_t npairs = 0;
      for (size_t g = g0; g < g1; g++) {
        lua_pushlstring(L, e->out.p + e->gn[g].off, e->gn[g].len);
        const void *name = lua_topointer(L, -1);
        if (pmap_get(&e->names, name) >= 0) { named = 1; lua_pop(L, 1); continue; }  /* sent meanwhile */
        lua_pushvalue(L, -1);
        lua_rawget(L, G);
        pmap_put(L, &e->names, name, ++e->nnames);
        npairs += (uint32_t)ship_pair(L, e, lua_gettop(L) - 1, lua_gettop(L));
        lua_pop(L, 2);
      }
      if (npairs || named) {
        memcpy(e->out.p + at, &npairs, 4);
        e->shipped = 1;
        e->ngn = g0;
        lua_settop(L, env);
        return;
      }
      e->out.n = hdr;  /* nothing could be sent */
      if (isnew) { pmap_drop_above(L, &e->envs, nenvs - 1, 0); e->nenvs = nenvs - 1; num = -1; }
    }
    lua_settop(L, env);
    e->ngn = g0;
    if (named || writes) {
      /* It reads names that another function of the message sent (named: the
      ** environment exists), or it writes globals: if the message has an
      ** environment, it shares it, so that its writes reach the names sent
      ** (which its globals would hide from the others). Not known yet: ENV_LATER,
      ** patched at the end of the encoding (see encode_top). */
      put_u8(L, e, UP_ENV);
      if (num < 0) {
        if (e->nlater == e->caplater) {
          size_t cap = e->caplater ? e->caplater * 2 : 16;
          size_t *nl = realloc(e->later, cap * sizeof(size_t));
          if (!nl) luaL_error(L, "not enough memory");
          e->later = nl; e->caplater = cap;
        }
        e->later[e->nlater++] = e->out.n;
      }
      put_u32(L, e, num < 0 ? ENV_LATER : (uint32_t)num);
      put_u32(L, e, 0);
      return;
    }
  }
  e->ngn = g0;
  put_u8(L, e, UP_VALUE);
  put_u8(L, e, T_GLOBALS);
}

static void encode_function(lua_State *L, mp_enc *e, int idx, const void *p) {
  if (lua_iscfunction(L, idx)) {
    size_t n;
    const char *name = mp_host_name(L, idx, &n);  /* registered with lmp_register: by that name */
    if (name) {
      put_u8(L, e, T_CFUNC);
      put_str8(L, e, "", 0);
      put_str8(L, e, name, n);
      return;
    }
    cfunc_name(L, e, idx);
    name = lua_tolstring(L, -1, &n);
    if (!name) {
      lua_pop(L, 1);
      if (!e->trial && mp_host_guess(L, idx))
        enc_fail(L, e, lua_pushfstring(L, "the C function %s (neither registered with lmp_register nor in "
                                          "package.loaded)", lua_tostring(L, -1)));
      enc_fail(L, e, "a C function with no name (not found in package.loaded)");
    }
    size_t m = strlen(name);  /* the module name ends at the \0 */
    put_u8(L, e, T_CFUNC);
    put_str8(L, e, name, m);
    put_str8(L, e, name + m + 1, n - m - 1);
    lua_pop(L, 1);
    return;
  }
  ensure_stack(L, e);
  int me = e->nrefs + 1;
  reserve(L, &e->out, 5);
  size_t at = e->out.n;
  add_ref(L, e, p, at);
  e->out.p[at] = T_LFUNC;
  e->out.n += 5;
  lua_pushvalue(L, idx);
  lua_dump(L, writer, e, 0);
  lua_pop(L, 1);
  size_t dlen = e->out.n - at - 5;
  if (dlen > UINT32_MAX) enc_fail(L, e, "a function too big");
  uint32_t d32 = (uint32_t)dlen;
  memcpy(e->out.p + at + 1, &d32, 4);
  uint64_t sum = checksum((const unsigned char *)e->out.p + at + 5, dlen);
  put_raw(L, e, &sum, 8);
  /* the upvalue count is the dump's byte after its header (a Lua closure has
  ** as many as its prototype): cheaper than lua_getinfo */
  int nups;
  if (dlen >= DUMP_HEADER) {
    nups = (unsigned char)e->out.p[at + 5 + DUMP_HEADER - 1];
  } else {
    lua_Debug ar;
    lua_pushvalue(L, idx);
    lua_getinfo(L, ">u", &ar);
    nups = ar.nups;
  }
  put_u8(L, e, nups);
  for (int i = 1; i <= nups; i++) {
    void *id = lua_upvalueid(L, idx, i);
    int64_t seen = pmap_get(&e->ups, id);
    if (seen > 0) {
      int64_t r = seen >> 8;
      e->out.p[e->refpos[r]] |= (char)SHARED;
      uint32_t r32 = (uint32_t)r;
      put_u8(L, e, UP_SHARED);
      put_raw(L, e, &r32, 4);
      put_u8(L, e, (int)(seen & 0xff));
      continue;
    }
    const char *name = lua_getupvalue(L, idx, i);
    /* an _ENV that is an environment (0 in e->ups) is never UP_SHARED: each
    ** function sends the globals it reads */
    if (name && name[0] == '_' && strcmp(name, "_ENV") == 0 && lua_type(L, -1) == LUA_TTABLE &&
        (lua_topointer(L, -1) == e->globals || is_made_env(L, -1))) {
      if (seen < 0) pmap_put(L, &e->ups, id, 0);
      encode_env(L, e, at + 5, dlen, i);
      lua_pop(L, 1);
      continue;
    }
    if (seen < 0) pmap_put(L, &e->ups, id, ((int64_t)me << 8) | i);
    put_u8(L, e, UP_VALUE);
    frame *f = &e->path[e->depth];
    f->kind = F_UPVALUE; f->name = name;
    e->depth++;
    encode_value(L, e, -1);
    e->depth--;
    lua_pop(L, 1);
  }
}

static size_t handle_encode(lua_State *L, mp_enc *e, const mp_handle_type *t, int idx,
                            unsigned char *payload);
static void enc_pin(mp_enc *e);

static void encode_userdata(lua_State *L, mp_enc *e, int idx) {
  const char *tname = NULL;
  int nt = luaL_getmetafield(L, idx, "__name");
  if (nt == LUA_TSTRING) tname = lua_tostring(L, -1);  /* stays alive in the metatable */
  if (nt != LUA_TNIL) lua_pop(L, 1);
  const mp_handle_type *t = tname ? find_type(tname, strlen(tname)) : NULL;
  if (t && !luaL_testudata(L, idx, t->name)) t = NULL;  /* a look-alike, not our type */
  if (!t) {
    char what[128];
    snprintf(what, sizeof what, "a userdata (%.80s)", tname ? tname : "no type name");
    enc_fail(L, e, what);
  }
  unsigned char payload[32];
  /* a callback that raises leaves this encoder busy: the next mp_encode then
  ** makes a new one and caches it instead (see mp_encode) */
  size_t n = handle_encode(L, e, t, idx, payload);
  put_u8(L, e, T_HANDLE);
  put_str8(L, e, t->name, strlen(t->name));
  put_u8(L, e, (int)n);
  put_raw(L, e, payload, n);
}

static void encode_string(lua_State *L, mp_enc *e, int idx) {
  size_t n;
  const char *s = lua_tolstring(L, idx, &n);
  if (n <= 255) {
    reserve(L, &e->out, n + 2);
    char *o = e->out.p + e->out.n;
    o[0] = T_STR8;
    o[1] = (char)n;
    memcpy(o + 2, s, n);
    e->out.n += n + 2;
    return;
  }
  if (n <= UINT32_MAX) { uint32_t n32 = (uint32_t)n; put_u8(L, e, T_STR32); put_raw(L, e, &n32, 4); }
  else { uint64_t n64 = n; put_u8(L, e, T_STR64); put_raw(L, e, &n64, 8); }
  if (n < BIGSTR) { put_raw(L, e, s, n); return; }
  /* a big string: referenced, and anchored in registry[e] so that it lives */
  if (e->nsegs == e->capsegs) {
    size_t cap = e->capsegs ? e->capsegs * 2 : 8;
    seg *ns = realloc(e->segs, cap * sizeof(seg));
    if (!ns) luaL_error(L, "not enough memory");
    e->segs = ns; e->capsegs = cap;
  }
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, e) != LUA_TTABLE) {
    lua_pop(L, 1);
    e->hasanchors = 1;
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, e);
  }
  lua_pushvalue(L, idx);
  lua_rawseti(L, -2, (lua_Integer)e->nsegs + 1);
  lua_pop(L, 1);
  e->segs[e->nsegs++] = (seg){ e->out.n, s, n };
  e->segbytes += n;
}

static void encode_value(lua_State *L, mp_enc *e, int idx) {
  if (e->depth > MAXDEPTH) enc_fail(L, e, "a value nested deeper than 200 levels");
  switch (lua_type(L, idx)) {
    case LUA_TNIL: put_u8(L, e, T_NIL); break;
    case LUA_TBOOLEAN: put_u8(L, e, lua_toboolean(L, idx) ? T_TRUE : T_FALSE); break;
    case LUA_TNUMBER: put_number(L, e, idx); break;
    case LUA_TSTRING: encode_string(L, e, idx); break;
    case LUA_TTABLE: {
      const void *p = lua_topointer(L, idx);
      int64_t r = pmap_get(&e->refs, p);
      if (r >= 0) put_ref(L, e, r);
      else if (p == e->globals) put_u8(L, e, T_GLOBALS);
      else encode_table(L, e, lua_absindex(L, idx), p);
      break;
    }
    case LUA_TFUNCTION: {
      const void *p = lua_topointer(L, idx);
      e->sawfunc = 1;
      int64_t r = pmap_get(&e->refs, p);
      if (r >= 0) put_ref(L, e, r);
      else encode_function(L, e, lua_absindex(L, idx), p);
      break;
    }
    case LUA_TUSERDATA: encode_userdata(L, e, lua_absindex(L, idx)); break;
    case LUA_TTHREAD: enc_fail(L, e, "a thread (coroutine)"); break;
    case LUA_TLIGHTUSERDATA: enc_fail(L, e, "a light userdata"); break;
    default: enc_fail(L, e, luaL_typename(L, idx)); break;
  }
}

static void enc_reset(lua_State *L, mp_enc *e) {
  e->out.n = 0; e->nsegs = 0; e->segbytes = 0; e->nrefs = 0; e->depth = 0; e->sawfunc = 0;
  e->stackdepth = 0;
  e->nsent = 0;  /* (bytes that were never sent: nothing to pin) */
  pmap_clear(&e->refs); pmap_clear(&e->ups);
  if (e->nnames) { pmap_clear(&e->names); e->nnames = 0; }
  if (e->nenvs) { pmap_clear(&e->envs); e->nenvs = 0; }
  e->ngn = 0; e->shipped = 0; e->nlater = 0;
  if (e->hascnames) {
    e->hascnames = 0;
    lua_pushnil(L); lua_setiuservalue(L, e->base, UV_CNAMES);
  }
  if (e->hasanchors) {
    e->hasanchors = 0;
    lua_pushnil(L); lua_rawsetp(L, LUA_REGISTRYINDEX, e);
  }
}

/* The root of an mp_encode_range: the array t[i0 .. i0+n-1], encoded as a table
** would be (it takes an ordinal, as every table does) without being copied first. */
static void encode_range(lua_State *L, mp_enc *e) {
  ensure_stack(L, e);
  reserve(L, &e->out, 9);
  size_t at = e->out.n;
  add_ref(L, e, (const void *)e, at);  /* no real table has the encoder's address */
  if (e->range_n > 0 && encode_packed(L, e, e->rootidx, e->range_i0, e->range_n, at)) return;
  uint32_t narr = (uint32_t)e->range_n, npairs = 0;
  e->out.n = at;
  e->out.p[at] = (char)T_TABLE;
  memcpy(e->out.p + at + 1, &narr, 4);
  memcpy(e->out.p + at + 5, &npairs, 4);
  e->out.n += 9;
  frame *f = &e->path[e->depth];
  f->kind = F_INDEX;
  e->depth++;
  for (lua_Integer k = 0; k < e->range_n; k++) {
    f->i = e->range_i0 + k;  /* errors name the index in the whole table */
    lua_rawgeti(L, e->rootidx, e->range_i0 + k);
    encode_value(L, e, lua_gettop(L));
    lua_pop(L, 1);
  }
  e->depth--;
}

static mp_enc *encode_top(lua_State *L, int idx, const char *root, lua_Integer i0, lua_Integer n);

mp_enc *mp_encode(lua_State *L, int idx, const char *root) {
  return encode_top(L, idx, root, 0, -1);
}

mp_enc *mp_encode_range(lua_State *L, int idx, lua_Integer i0, lua_Integer n, const char *root) {
  if (n < 0 || n > (lua_Integer)UINT32_MAX) luaL_error(L, "bad range to encode");
  return encode_top(L, idx, root, i0, n);
}

static mp_enc *encode_top(lua_State *L, int idx, const char *root, lua_Integer i0, lua_Integer n) {
  int absidx = lua_absindex(L, idx);
  mp_enc *e = NULL;
  if (lua_getfield(L, LUA_REGISTRYINDEX, CACHED) == LUA_TUSERDATA) e = lua_touserdata(L, -1);
  if (!e || e->busy) {
    /* first use, a nested encode (from a finalizer), or an encode that raised an
    ** error outside enc_fail: this one becomes the cached encoder */
    lua_pop(L, 1);
    e = enc_new(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, CACHED);
  }
  e->busy = 1;
  e->rootidx = absidx;
  e->range_i0 = i0;
  e->range_n = n;
  e->root = root ? root : "value";
  e->base = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  e->globals = lua_topointer(L, -1);
  lua_pop(L, 1);
  e->usemods = 0;
  if (setjmp(e->retry)) {  /* from enc_fail: a module was in the way */
    lua_settop(L, e->base);
    e->usemods = 1;
    load_modules(L, e);
  }
  e->canretry = !e->usemods;
  for (;;) {
    enc_reset(L, e);
    put_u8(L, e, FORMAT);
    if (e->range_n >= 0) encode_range(L, e);
    else encode_value(L, e, e->rootidx);
    if (e->usemods || !e->sawfunc || !sent_a_module(L, e)) break;
    e->usemods = 1;  /* a module was sent as a table: again, by name */
    e->canretry = 0;
    load_modules(L, e);
  }
  e->canretry = 0;
  if (e->nlater) {  /* functions that write globals: the environment of the globals, if one came */
    int64_t num = pmap_get(&e->envs, e->globals);
    if (num >= 0) {
      uint32_t n32 = (uint32_t)num;
      for (size_t i = 0; i < e->nlater; i++) memcpy(e->out.p + e->later[i], &n32, 4);
    }
  }
  return e;
}

size_t mp_enc_size(mp_enc *e) { return e->out.n + e->segbytes; }

void mp_enc_copy(mp_enc *e, char *dst) {
  size_t from = 0;
  for (size_t i = 0; i < e->nsegs; i++) {
    memcpy(dst, e->out.p + from, e->segs[i].at - from);
    dst += e->segs[i].at - from;
    memcpy(dst, e->segs[i].p, e->segs[i].n);
    dst += e->segs[i].n;
    from = e->segs[i].at;
  }
  memcpy(dst, e->out.p + from, e->out.n - from);
}

/* The pieces are the copied runs of e->out between the big strings (which stay
** anchored until mp_enc_done). */
int mp_enc_piece(mp_enc *e, size_t i, const void **p, size_t *n) {
  size_t k = i / 2;
  if (k > e->nsegs || (k == e->nsegs && (i & 1))) return 0;
  if (i & 1) { *p = e->segs[k].p; *n = e->segs[k].n; return 1; }
  size_t from = k ? e->segs[k - 1].at : 0, to = k < e->nsegs ? e->segs[k].at : e->out.n;
  *p = e->out.p + from; *n = to - from;
  return 1;
}

void mp_enc_push(lua_State *L, mp_enc *e) {
  if (!e->nsegs) { lua_pushlstring(L, e->out.p, e->out.n); return; }
  /* one copy of everything: lua_concat of the pieces and the big strings themselves */
  luaL_checkstack(L, (int)(2 * e->nsegs + 3), "too many strings");
  int anchors = lua_gettop(L) + 1;
  int ok = lua_rawgetp(L, LUA_REGISTRYINDEX, e) == LUA_TTABLE;
  size_t from = 0;
  for (size_t i = 0; i < e->nsegs; i++) {
    lua_pushlstring(L, e->out.p + from, e->segs[i].at - from);
    if (!ok || lua_rawgeti(L, anchors, (lua_Integer)i + 1) != LUA_TSTRING) {
      if (ok) lua_pop(L, 1);
      lua_pushlstring(L, e->segs[i].p, e->segs[i].n);
    }
    from = e->segs[i].at;
  }
  lua_pushlstring(L, e->out.p + from, e->out.n - from);
  lua_concat(L, (int)(2 * e->nsegs + 1));
  lua_remove(L, anchors);
}

void mp_enc_done(lua_State *L, mp_enc *e) {
  e->busy = 0;
  if (e->nsent) enc_pin(e);
  if (e->hasanchors) {  /* let big strings go */
    e->hasanchors = 0;
    lua_pushnil(L); lua_rawsetp(L, LUA_REGISTRYINDEX, e);
  }
  e->nsegs = 0;
  /* a big buffer is kept while big values keep coming, freed after 16 small ones */
  if (e->out.cap > (1u << 20) && e->out.n < e->out.cap / 4) {
    if (++e->small >= 16) { mp_buf_free(L, &e->out); e->small = 0; }
  } else {
    e->small = 0;
  }
}

/* ------------------------------------------------------------ decoder */

#define KEYCACHE 64  /* short string keys remembered by a decoder (see push_key) */
#define PF_AHEAD 1024  /* bytes of input ahead of the decoder whose strings are prefetched */
#define PF_RING 256    /* strings remembered between a bucket's prefetch and its first string's */

typedef struct dec {
  const unsigned char *p, *end;
  int refs;         /* stack slot of the table of shared values (nil until one comes), or 0 */
  uint32_t nrefs;   /* ordinals given so far */
  int depth;
  size_t budget;    /* table slots the input can still justify (each needs a byte) */
  int base, stackdepth;  /* stack room: as in the encoder's ensure_stack */
  int into;              /* mp_decode_into: stack slot of the table the root array fills */
  lua_Integer into_at;   /* ... from this index on */
  const unsigned char *start;  /* the first byte, for the place named in refusals */
  int data;              /* MP_DECODE_DATA: plain data only (see refuse) */
  int inmt;              /* data-only: a metatable's name is being decoded */
  uint32_t nenvs;        /* environments made so far (UP_ENV), kept at refs[-1], refs[-2]... */
  int later;             /* refs[0] lists function, upvalue, environment number to set at the end */
  int remote;            /* MP_DECODE_SIGNED: bytes from another machine, signed (see below) */
  int keys;              /* stack slot of the key cache's anchor table (nil until a key comes), or 0 */
  int keyed;             /* the key cache is in use */
  const unsigned char *pf;  /* the prefetch walk (see str_prefetch), NULL when stopped */
  unsigned pfn, pfo;      /* strings remembered by the walk, and whose bucket was read */
  const view_strt *strt;  /* Lua's string table (see view_strs) */
  unsigned seed;          /* its hash seed: the hash of "" (each Lua state has its own) */
  unsigned tplused;       /* which of tp[] are in use (bits) */
  tpl *last;              /* the template used last (see decode_pairs) */
  lua_Integer retired;    /* templates' tables replaced in their slots, kept anchored */
  struct { const char *s; size_t n; } kc[KEYCACHE];  /* the key cache (see push_key) */
  tpl tp[TPLS];
  struct { const unsigned char *at; unsigned hash; } pfr[PF_RING];  /* strings met by the walk */
} dec;

/* The value after the one at p in a flat walk (a table's header is a value of
** its own, its items follow it), or NULL past end or at a tag it does not
** know (then the walk stops). It only guides prefetches: it trusts nothing. */
static inline const unsigned char *scan_skip(const unsigned char *p, const unsigned char *end) {
  size_t left = (size_t)(end - p), n;
  uint32_t m;
  if (left < 2) return NULL;
  switch (p[0] & ~SHARED) {
    case T_NIL: case T_FALSE: case T_TRUE: case T_GLOBALS: n = 1; break;
    case T_INT8: n = 2; break;
    case T_INT16: n = 3; break;
    case T_INT32: case T_REF: n = 5; break;
    case T_INT64: case T_FLOAT: case T_TABLE: case T_TABLE_MT: n = 9; break;
    case T_STR8: case T_NAMEDMT: case T_MODULE: n = 2 + (size_t)p[1]; break;
    case T_STR32: case T_INTS: case T_FLOATS:
      if (left < 6) return NULL;
      memcpy(&m, p + 1, 4);
      n = (p[0] & ~SHARED) == T_STR32 ? 5 + (size_t)m
        : (p[0] & ~SHARED) == T_FLOATS ? 5 + 8 * (size_t)m : 6 + (size_t)m * (p[5] & 15);
      break;
    default: return NULL;
  }
  return n <= left ? p + n : NULL;
}

/* Called before a string is interned, when the walk is less than PF_AHEAD / 2
** bytes ahead of the decoder: walks the input up to PF_AHEAD bytes ahead and,
** for each short string met (but those that look like a cached key: keys are
** not interned, and those of 1 or 2 bytes: few, so in cache), prefetches its
** string table bucket and remembers it; the strings remembered that now lie
** less than PF_AHEAD / 2 bytes ahead (their bucket in cache by then) get the
** first string chained in their bucket prefetched. */
static void str_prefetch(dec *d) {
  const view_strt *st = d->strt;
  size_t room = (size_t)(d->end - d->p);
  const unsigned char *ahead = d->p + (room < PF_AHEAD ? room : PF_AHEAD);
  const unsigned char *near = d->p + (room < PF_AHEAD / 2 ? room : PF_AHEAD / 2);
  unsigned mask = (unsigned)st->size - 1;
  while (d->pfo != d->pfn && d->pfr[d->pfo % PF_RING].at < near) {
    const view_string *head = st->hash[d->pfr[d->pfo++ % PF_RING].hash & mask];
    if (head) __builtin_prefetch(head);
  }
  while (d->pf && d->pf < ahead) {
    const unsigned char *p = d->pf;
    d->pf = scan_skip(p, d->end);
    if (p[0] == T_STR8 && p[1] <= 40 && p[1] >= 3 && d->pf) {
      if (d->keyed) {  /* like a cached key (length and ends, see push_key): not interned */
        unsigned k = ((unsigned)p[1] * 31u + p[2] * 7u + p[1 + p[1]]) & (KEYCACHE - 1);
        if (d->kc[k].n == p[1] && d->kc[k].s[0] == p[2]) continue;
      }
      unsigned h = view_hash(p + 2, p[1], d->seed);
      __builtin_prefetch(&st->hash[h & mask]);
      if (d->pfn - d->pfo == PF_RING) d->pfo++;  /* (full: the oldest goes without) */
      d->pfr[d->pfn % PF_RING].at = p;
      d->pfr[d->pfn++ % PF_RING].hash = h;
    }
  }
}

/* Each level of nesting holds at most DEC_LEVEL stack slots while it decodes a
** child (decode_pairs holds a table's pairs: more for more than 5 pairs, made
** there): the room is made 16 levels at a time, as in the encoder's ensure_stack. */
#define DEC_LEVEL 12
static inline void dec_ensure_stack(lua_State *L, dec *d) {
  if (d->depth >= d->stackdepth) {
    int need = d->base + DEC_LEVEL * (d->depth + 17) + 40 - lua_gettop(L);
    if (need > 0) luaL_checkstack(L, need, "cannot decode: nesting too deep");
    d->stackdepth = d->depth + 16;
  }
}

static int corrupt(lua_State *L, const char *why) {
  return luaL_error(L, "cannot decode: %s", why);
}

/* Data-only decoding (mp.decode(s, "data")) refuses whatever could run code or
** reach beyond the value: functions, C functions and modules (require), the
** globals, metatables sent by value (a __gc), and handles. at: the tag's byte. */
static int refuse(lua_State *L, dec *d, const char *what) {
  return luaL_error(L, "cannot decode: %s refused in data-only mode (at byte %d)", what,
                    (int)(d->p - 1 - d->start));
}

static inline void need(lua_State *L, dec *d, size_t n) {
  if ((size_t)(d->end - d->p) < n) corrupt(L, "truncated data");
}

static uint32_t get_u32(lua_State *L, dec *d) {
  uint32_t v;
  need(L, d, 4); memcpy(&v, d->p, 4); d->p += 4;
  return v;
}

static int get_u8(lua_State *L, dec *d) {
  need(L, d, 1);
  return *d->p++;
}

static const char *get_str8(lua_State *L, dec *d, size_t *n) {
  *n = (size_t)get_u8(L, d);
  need(L, d, *n);
  const char *s = (const char *)d->p;
  d->p += *n;
  return s;
}

/* gives the next ordinal to the value at idx, remembered when shared */
static void remember(lua_State *L, dec *d, int idx, int shared) {
  if (!d->refs) corrupt(L, "misplaced value");
  d->nrefs++;
  if (!shared) return;
  if (lua_type(L, d->refs) != LUA_TTABLE) { lua_newtable(L); lua_replace(L, d->refs); }
  lua_pushvalue(L, idx);
  lua_rawseti(L, d->refs, (lua_Integer)d->nrefs);
}

static void decode_value(lua_State *L, dec *d);

/* pushes a table key that is not a short string: any value a table can hold as a key */
static void decode_key(lua_State *L, dec *d) {
  decode_value(L, d);
  int kt = lua_type(L, -1);
  if (kt == LUA_TNIL) corrupt(L, "nil table key");
  if (kt == LUA_TNUMBER && !lua_isinteger(L, -1) && isnan(lua_tonumber(L, -1))) corrupt(L, "NaN table key");
}

/* pushes the metatable registered under name and returns 1, or pushes nothing and returns 0 */
static int push_named_mt(lua_State *L, const char *s, size_t n) {
  lua_getfield(L, LUA_REGISTRYINDEX, "multiprocessing.metatables");
  lua_pushlstring(L, s, n);
  if (lua_istable(L, -2) && lua_rawget(L, -2) == LUA_TTABLE) {
    lua_remove(L, -2);
    return 1;
  }
  lua_pop(L, 2);
  return 0;
}

/* pushes package.loaded[name], requiring it if needed */
static void push_module(lua_State *L, const char *name, size_t n) {
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushlstring(L, name, n);
  if (lua_rawget(L, -2) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushlstring(L, name, n);
    if (!lua_isfunction(L, -2) || mp_pcall(L, 1, 1) != LUA_OK)
      luaL_error(L, "cannot decode: module '%s' is not available here", lua_pushlstring(L, name, n));
  }
  lua_remove(L, -2);
}

typedef struct rd { const char *p; size_t n; } rd;
static const char *reader(lua_State *L, void *ud, size_t *size) {
  (void)L;
  rd *r = ud;
  *size = r->n;
  r->n = 0;
  return *size ? r->p : NULL;
}

/* is upvalue n of the function at idx named _ENV? */
static int is_env_name(lua_State *L, int idx, int n) {
  const char *name = lua_getupvalue(L, idx, n);
  if (name) lua_pop(L, 1);
  return name && strcmp(name, "_ENV") == 0;
}

/* UP_ENV: upvalue i (an _ENV) of the function at f gets environment number j,
** or a new one (j = 0), after the pairs sent are added to its values */
static void decode_env(lua_State *L, dec *d, int f, int i) {
  uint32_t j = get_u32(L, d), npairs = get_u32(L, d);
  if (npairs > (size_t)(d->end - d->p) / 2) corrupt(L, "truncated data");
  if (!is_env_name(L, f, i)) corrupt(L, "environment for an upvalue that is not _ENV");
  if (j == ENV_LATER) {  /* no environment came: the globals */
    if (npairs) corrupt(L, "bad environment number");
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_setupvalue(L, f, i);
    return;
  }
  if (lua_type(L, d->refs) != LUA_TTABLE) { lua_newtable(L); lua_replace(L, d->refs); }
  if (j > d->nenvs && !npairs) {  /* made later in the message: set at the end (decode_root) */
    if (lua_rawgeti(L, d->refs, 0) != LUA_TTABLE) { lua_pop(L, 1); lua_newtable(L); lua_pushvalue(L, -1); lua_rawseti(L, d->refs, 0); }
    lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
    lua_pushvalue(L, f); lua_rawseti(L, -2, n + 1);
    lua_pushinteger(L, i); lua_rawseti(L, -2, n + 2);
    lua_pushinteger(L, j); lua_rawseti(L, -2, n + 3);
    lua_pop(L, 1);
    d->later = 1;
    return;
  }
  if (j == 0) {
    push_env(L);
    lua_pushvalue(L, -1);
    lua_rawseti(L, d->refs, -(lua_Integer)++d->nenvs);
  } else {
    if (j > d->nenvs) corrupt(L, "bad environment number");
    lua_rawgeti(L, d->refs, -(lua_Integer)j);
  }
  lua_getmetatable(L, -1);
  lua_pushliteral(L, "__index");
  lua_rawget(L, -2);
  lua_remove(L, -2);  /* P, S */
  for (uint32_t k = 0; k < npairs; k++) {
    size_t n;
    const char *name = get_str8(L, d, &n);
    lua_pushlstring(L, name, n);
    decode_value(L, d);
    lua_rawset(L, -3);
  }
  lua_pop(L, 1);
  lua_setupvalue(L, f, i);
}

static void decode_function(lua_State *L, dec *d, int shared) {
  dec_ensure_stack(L, d);
  uint32_t len = get_u32(L, d);
  need(L, d, (size_t)len + 8);
  const unsigned char *dump = d->p;
  d->p += (size_t)len + 8;
  /* signed bytes come from another program that holds the shared key: the signature,
  ** checked by the caller before decoding, stands for our checksum */
  if (!d->remote && !dump_ok(dump, len, dump + len)) corrupt(L, "bad function (checksum mismatch)");
  rd r = { (const char *)dump, len };
  if (lua_load(L, reader, &r, "=(sent function)", "b") != LUA_OK)
    luaL_error(L, "cannot decode: bad function (%s)", lua_tostring(L, -1));
  int f = lua_gettop(L);
  remember(L, d, f, shared);
  /* the closure lua_load made has the upvalue count of the dump's byte after
  ** its header (lundump.c); the checksum says the dump is one of ours */
  int nups = get_u8(L, d), has;
  if (len >= DUMP_HEADER) {
    has = dump[DUMP_HEADER - 1];
  } else {
    lua_Debug ar;
    lua_pushvalue(L, f);
    lua_getinfo(L, ">u", &ar);
    has = ar.nups;
  }
  if (nups != has) corrupt(L, "upvalue count mismatch");
  d->depth++;
  for (int i = 1; i <= nups; i++) {
    int kind = get_u8(L, d);
    if (kind == UP_VALUE) {
      decode_value(L, d);
      lua_setupvalue(L, f, i);
    } else if (kind == UP_SHARED) {
      uint32_t j = get_u32(L, d);
      int n = get_u8(L, d);
      if (j < 1 || j > d->nrefs || lua_type(L, d->refs) != LUA_TTABLE) corrupt(L, "bad upvalue reference");
      lua_rawgeti(L, d->refs, (lua_Integer)j);
      if (lua_type(L, -1) != LUA_TFUNCTION || lua_iscfunction(L, -1)) corrupt(L, "bad upvalue reference");
      lua_Debug ar2;
      lua_pushvalue(L, -1);
      lua_getinfo(L, ">u", &ar2);
      if (n < 1 || n > ar2.nups) corrupt(L, "bad upvalue reference");
      /* an environment stays an _ENV's (the encoder never shares one) */
      if (d->nenvs && is_env_name(L, -1, n) != is_env_name(L, f, i)) corrupt(L, "bad upvalue reference");
      lua_upvaluejoin(L, f, i, -1, n);
      lua_pop(L, 1);
    } else if (kind == UP_ENV) {
      decode_env(L, d, f, i);
    } else {
      corrupt(L, "bad upvalue tag");
    }
  }
  d->depth--;
}

/* Pushes the string key of n bytes at p. The keys of a message's records are
** mostly the same few names: a small cache (by length and end bytes) finds
** them again with one memcmp and one lua_rawgeti instead of Lua's interning
** (hash, look-up, compare); the cached strings live in the table at d->keys. */
static const char *push_key(lua_State *L, dec *d, const char *p, size_t n) {
  if (!d->keys || n == 0) return lua_pushlstring(L, p, n);
  if (!d->keyed) {  /* the first key: the cache starts empty */
    memset(d->kc, 0, sizeof d->kc);
    lua_createtable(L, KEYCACHE, 0);
    lua_replace(L, d->keys);
    d->keyed = 1;
  }
  unsigned h = ((unsigned)n * 31u + (unsigned char)p[0] * 7u + (unsigned char)p[n - 1]) & (KEYCACHE - 1);
  if (d->kc[h].n == n && memcmp(d->kc[h].s, p, n) == 0) {
    lua_rawgeti(L, d->keys, (lua_Integer)h + 1);
    return d->kc[h].s;
  }
  d->kc[h].s = lua_pushlstring(L, p, n);
  d->kc[h].n = n;
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->keys, (lua_Integer)h + 1);
  return d->kc[h].s;
}

/* The value at the top of the stack as the mirror writes it, when it is a
** number, a boolean, a string or a table: returns 0 for other values. */
static int stack_view(lua_State *L, view_value *v) {
  switch (lua_type(L, -1)) {
    case LUA_TTABLE: v->v.p = (void *)lua_topointer(L, -1); v->tt = VIEW_TABLE; return 1;
    case LUA_TBOOLEAN: v->tt = lua_toboolean(L, -1) ? VIEW_TRUE : VIEW_FALSE; return 1;
    case LUA_TSTRING:
      v->v.p = (void *)lua_topointer(L, -1);
      v->tt = (unsigned char)(((const view_string *)v->v.p)->tt | 0x40);
      return 1;
    case LUA_TNUMBER:
      if (lua_isinteger(L, -1)) { v->v.i = lua_tointeger(L, -1); v->tt = VIEW_INT; }
      else { v->v.n = lua_tonumber(L, -1); v->tt = VIEW_FLOAT; }
      return 1;
    default: return 0;
  }
}

/* the template of the shape (n keys, in order), or a free slot for it */
static inline tpl *tpl_find(dec *d, const view_string *const *keys, int n) {
  uintptr_t h = ((uintptr_t)keys[0] >> 4) ^ ((uintptr_t)keys[n - 1] >> 7) ^ (uintptr_t)n;
  tpl *tp = &d->tp[h & (TPLS - 1)];
  unsigned bit = 1u << (h & (TPLS - 1));
  if (!(d->tplused & bit)) {
    d->tplused |= bit;
    tp->npairs = 0;
  }
  return tp;
}

/* The npairs key/value pairs of the new table t (lua_createtable(L, 0, npairs)).
** Messages often hold many tables of one shape (records: the same keys in the
** same order): the first one is filled through the API; from the second one of
** a shape on, the decoder keeps that table as the shape's template (tpl), and
** the next ones copy its nodes and write their values in place (tpl_fill)
** instead of hashing and inserting each key. Only when the keys are strings,
** the values numbers, booleans, strings or tables, and t is not black (no GC
** barrier needed); else through the API. The pairs are decoded onto the stack
** first (they stay anchored there until the table holds them). */
static void decode_pairs(lua_State *L, dec *d, int t, uint32_t npairs) {
  const view_string *keys[TPL_MAX];
  view_value vals[TPL_MAX];
  int known = 1;  /* the keys strings, the values of kinds that tpl_fill may write */
  int base = lua_gettop(L);
  /* the keys of the template used last, while they match: not looked up, and
  ** not pushed (a nil holds their place, until they are needed). The values
  ** decoded meanwhile may make other templates, in guess's slot too (a shape
  ** whose hash falls there): guess is used after only if its table is still
  ** the one it had (the keys taken from it stay alive: a template's table stays
  ** anchored to the end of the decoding, see the end) */
  const tpl *guess = d->last && d->last->t && d->last->npairs == npairs ? d->last : NULL;
  const view_table *guess_t = guess ? guess->t : NULL;
  uint32_t guessed = 0;
  if (2 * (int)npairs + 2 > DEC_LEVEL) {  /* more than this level's room: the children check theirs */
    luaL_checkstack(L, 2 * (int)npairs + 8, "cannot decode: nesting too deep");
    d->stackdepth = d->depth;
  }
  for (uint32_t i = 0; i < npairs; i++) {
    const unsigned char *p = d->p;
    ptrdiff_t left = d->end - p;
    if (guess && left >= 2 && p[0] == T_STR8 && p[1] == guess->keys[i]->shrlen && left - 2 >= p[1] &&
        memcmp(p + 2, guess->keys[i]->contents, p[1]) == 0) {
      keys[i] = guess->keys[i];
      lua_pushnil(L);
      d->p += 2 + p[1];
      guessed++;
    } else if (left >= 2 && p[0] == T_STR8 && left - 2 >= p[1]) {  /* the common key: a short string */
      const char *k = push_key(L, d, (const char *)p + 2, p[1]);
      keys[i] = (const view_string *)(k - offsetof(view_string, contents));
      d->p += 2 + p[1];
    } else {
      decode_key(L, d);
      known = 0;
    }
    p = d->p;  /* the value: small integers, floats and short strings inline */
    left = d->end - p;
    view_value *v = &vals[i];
    if (left >= 2 && p[0] == T_INT8) { v->v.i = (int8_t)p[1]; v->tt = VIEW_INT; lua_pushinteger(L, v->v.i); d->p += 2; }
    else if (left >= 5 && p[0] == T_INT32) { int32_t x; memcpy(&x, p + 1, 4); v->v.i = x; v->tt = VIEW_INT; lua_pushinteger(L, x); d->p += 5; }
    else if (left >= 3 && p[0] == T_INT16) { int16_t x; memcpy(&x, p + 1, 2); v->v.i = x; v->tt = VIEW_INT; lua_pushinteger(L, x); d->p += 3; }
    else if (left >= 9 && p[0] == T_FLOAT) { memcpy(&v->v.n, p + 1, 8); v->tt = VIEW_FLOAT; lua_pushnumber(L, v->v.n); d->p += 9; }
    else if (left >= 2 && p[0] == T_STR8 && left - 2 >= p[1]) {
      if (d->pf && d->pf - d->p < PF_AHEAD / 2) str_prefetch(d);
      const char *x = lua_pushlstring(L, (const char *)p + 2, p[1]);
      v->v.p = (void *)(x - offsetof(view_string, contents));
      v->tt = (unsigned char)(((const view_string *)v->v.p)->tt | 0x40);  /* a short or a long string */
      d->p += 2 + p[1];
    } else {
      decode_value(L, d);
      if (!stack_view(L, v)) known = 0;  /* (a function, a userdata...: the API) */
    }
  }
  view_table *vt = (view_table *)lua_topointer(L, t);
  int n = (int)npairs;
  if (guess && guess->t != guess_t) guess = NULL;  /* (remade: its keys are still anchored) */
  if (guess && guessed == npairs && known && tpl_fits(guess, vt)) {
    tpl_fill(vt, guess, vals);
    lua_settop(L, base);
    return;
  }
  for (uint32_t i = 0; guessed && i < npairs; i++) {  /* the keys not pushed */
    if (lua_isnil(L, base + 1 + 2 * (int)i)) {
      lua_pushlstring(L, keys[i]->contents, keys[i]->shrlen);  /* (alive: guess's table, anchored) */
      lua_replace(L, base + 1 + 2 * (int)i);
    }
  }
  tpl *tp = known ? tpl_find(d, keys, n) : NULL;
  if (tp) {
    if (tp->npairs == n && memcmp(tp->keys, keys, (size_t)n * sizeof keys[0]) == 0) {
      if (tp->t && tpl_fits(tp, vt)) {
        tpl_fill(vt, tp, vals);
        lua_settop(L, base);
        d->last = tp;
        return;
      }
    } else {
      tp->npairs = (unsigned char)n;  /* a new shape here: seen once */
      memcpy(tp->keys, keys, (size_t)n * sizeof keys[0]);
      tp->t = NULL;
      tp = NULL;
    }
  }
  for (int j = 0; j < n; j++) {
    lua_pushvalue(L, base + 1 + 2 * j);
    lua_pushvalue(L, base + 2 + 2 * j);
    lua_rawset(L, t);
  }
  lua_settop(L, base);
  /* seen twice: this table becomes the template, anchored with the keys. The
  ** slot's table before (a template emptied for another shape) stays anchored
  ** to the end of the decoding: a decode_pairs up the stack may hold its keys */
  if (tp && !tp->t && tpl_make(tp, vt)) {
    lua_Integer slot = KEYCACHE + 1 + (tp - d->tp);
    if (lua_rawgeti(L, d->keys, slot) == LUA_TTABLE) lua_rawseti(L, d->keys, KEYCACHE + 1 + TPLS + ++d->retired);
    else lua_pop(L, 1);
    lua_pushvalue(L, t);
    lua_rawseti(L, d->keys, slot);
    d->last = tp;
  }
}

static void decode_table(lua_State *L, dec *d, int withmt, int shared) {
  dec_ensure_stack(L, d);
  uint32_t narr = get_u32(L, d), npairs = get_u32(L, d);
  /* every slot needs at least one byte of input: a lying count fails here
  ** rather than preallocating more than the input can fill */
  uint64_t cost = (uint64_t)narr + 2 * (uint64_t)npairs;
  if (cost > d->budget) corrupt(L, "truncated data");
  d->budget -= (size_t)cost;
  int t;
  lua_Integer at = 0;  /* array item i goes to t[at + i] */
  if (d->into) {  /* the root array of mp_decode_into: straight into the caller's table */
    if (npairs || withmt) corrupt(L, "not an array");
    t = d->into;
    at = d->into_at - 1;
    d->into = 0;
    lua_pushvalue(L, t);
  } else {
    lua_createtable(L, (int)(narr < (1u << 30) ? narr : (1u << 30)), (int)(npairs < (1u << 30) ? npairs : (1u << 30)));
    t = lua_gettop(L);
  }
  remember(L, d, t, shared);
  d->depth++;
  ptrdiff_t inl = d->depth <= MAXDEPTH ? 2 : PTRDIFF_MAX;  /* no inline values too deep */
  /* The array part is filled in place with the small integers (no push: they
  ** need no anchor nor barrier) and the short strings (while the table is not
  ** black, see tpl_fill), else through lua_rawseti. */
  view_table *va = view_nodes && !at && narr ? (view_table *)lua_topointer(L, t) : NULL;
  for (uint64_t i = 1; i <= narr; i++) {
    /* small integers and short strings inline: arrays of them are common */
    const unsigned char *p = d->p;
    ptrdiff_t left = d->end - p;
    if (left < inl) left = 0;
    view_value v;
    int num = 1;  /* an integer: nothing to anchor, so pushed only for lua_rawseti */
    if (left >= 2 && p[0] == T_INT8) { v.v.i = (int8_t)p[1]; v.tt = VIEW_INT; d->p += 2; }
    else if (left >= 5 && p[0] == T_INT32) { int32_t x; memcpy(&x, p + 1, 4); v.v.i = x; v.tt = VIEW_INT; d->p += 5; }
    else if (left >= 3 && p[0] == T_INT16) { int16_t x; memcpy(&x, p + 1, 2); v.v.i = x; v.tt = VIEW_INT; d->p += 3; }
    else num = 0;
    if (num) {
      if (va && va->array && va->alimit >= i) va->array[i - 1] = v;
      else { lua_pushinteger(L, v.v.i); lua_rawseti(L, t, at + (lua_Integer)i); }
      continue;
    }
    if (left >= 2 && p[0] == T_STR8 && left - 2 >= p[1]) {
      if (d->pf && d->pf - d->p < PF_AHEAD / 2) str_prefetch(d);
      v.v.p = (void *)(lua_pushlstring(L, (const char *)p + 2, p[1]) - offsetof(view_string, contents));
      v.tt = (unsigned char)(((const view_string *)v.v.p)->tt | 0x40);
      d->p += 2 + p[1];
    } else {
      decode_value(L, d);  /* (through the API: no faster in place) */
      v.tt = 0;
    }
    if (va && v.tt && va->array && va->alimit >= i && !(va->marked & VIEW_BLACK)) {
      va->array[i - 1] = v;
      lua_pop(L, 1);
    } else {
      lua_rawseti(L, t, at + (lua_Integer)i);
    }
  }
  if (narr == 0 && npairs && npairs <= TPL_MAX && d->keyed && view_nodes && inl == 2) {
    decode_pairs(L, d, t, npairs);
    npairs = 0;
  }
  for (uint32_t i = 0; i < npairs; i++) {
    const unsigned char *p = d->p;
    ptrdiff_t left = d->end - p;
    if (left < inl) left = 0;
    if (left >= 2 && p[0] == T_STR8 && left - 2 >= p[1]) {  /* the common key: a short string */
      push_key(L, d, (const char *)p + 2, p[1]);
      d->p += 2 + p[1];
    } else {
      decode_key(L, d);
    }
    p = d->p;  /* the value: small integers and short strings inline, as above */
    left = d->end - p;
    if (left < inl) left = 0;
    if (left >= 2 && p[0] == T_INT8) { lua_pushinteger(L, (int8_t)p[1]); d->p += 2; }
    else if (left >= 5 && p[0] == T_INT32) { int32_t v; memcpy(&v, p + 1, 4); lua_pushinteger(L, v); d->p += 5; }
    else if (left >= 3 && p[0] == T_INT16) { int16_t v; memcpy(&v, p + 1, 2); lua_pushinteger(L, v); d->p += 3; }
    else if (left >= 9 && p[0] == T_FLOAT) { double v; memcpy(&v, p + 1, 8); lua_pushnumber(L, v); d->p += 9; }
    else if (left >= 2 && p[0] == T_STR8 && left - 2 >= p[1]) {
      if (d->pf && d->pf - d->p < PF_AHEAD / 2) str_prefetch(d);
      lua_pushlstring(L, (const char *)p + 2, p[1]);
      d->p += 2 + p[1];
    } else {
      decode_value(L, d);
    }
    lua_rawset(L, t);
  }
  if (withmt) {
    if (d->data && (d->p >= d->end || *d->p != T_NAMEDMT)) { d->p++; refuse(L, d, "a metatable sent by value"); }
    d->inmt = 1;
    decode_value(L, d);
    d->inmt = 0;
    if (!lua_istable(L, -1)) corrupt(L, "metatable is not a table");
    lua_setmetatable(L, t);
  }
  d->depth--;
}

/* T_INTS, T_FLOATS: a new table of n numbers */
static void decode_packed(lua_State *L, dec *d, int tag, int shared) {
  dec_ensure_stack(L, d);
  uint32_t n = get_u32(L, d);
  int w = tag == T_FLOATS ? 8 : get_u8(L, d);
  if (w != 1 && w != 2 && w != 4 && w != 8) corrupt(L, "bad packed array width");
  if (n > (size_t)(d->end - d->p) / (size_t)w || n > d->budget) corrupt(L, "truncated data");
  d->budget -= n;
  const unsigned char *p = d->p;
  d->p += (size_t)n * (size_t)w;
  int t;
  lua_Integer at = 0;  /* item i goes to t[at + i] */
  view_value *a;
  if (d->into) {  /* the root array of mp_decode_into: straight into the caller's table */
    t = d->into;
    at = d->into_at - 1;
    d->into = 0;
    lua_pushvalue(L, t);
    lua_Integer lim;
    a = view_array(L, t, &lim);
    if (a && at >= 0 && lim >= at && lim - at >= (lua_Integer)n) a += at; else a = NULL;
  } else {
    lua_createtable(L, (int)(n < (1u << 30) ? n : (1u << 30)), 0);
    t = lua_gettop(L);
    a = view_fresh(L, t, (lua_Integer)n);
  }
  remember(L, d, t, shared);
  if (a && tag == T_FLOATS) {
    for (uint32_t i = 0; i < n; i++) { memcpy(&a[i].v.n, p + 8 * (size_t)i, 8); a[i].tt = VIEW_FLOAT; }
    return;
  }
  if (a) {
    switch (w) {
      case 1: for (uint32_t i = 0; i < n; i++) { a[i].v.i = (int8_t)p[i]; a[i].tt = VIEW_INT; } break;
      case 2: for (uint32_t i = 0; i < n; i++) { int16_t v; memcpy(&v, p + 2 * (size_t)i, 2); a[i].v.i = v; a[i].tt = VIEW_INT; } break;
      case 4: for (uint32_t i = 0; i < n; i++) { int32_t v; memcpy(&v, p + 4 * (size_t)i, 4); a[i].v.i = v; a[i].tt = VIEW_INT; } break;
      default: for (uint32_t i = 0; i < n; i++) { int64_t v; memcpy(&v, p + 8 * (size_t)i, 8); a[i].v.i = v; a[i].tt = VIEW_INT; } break;
    }
    return;
  }
  for (uint32_t i = 0; i < n; i++, p += w) {  /* through the API */
    if (tag == T_FLOATS) { double v; memcpy(&v, p, 8); lua_pushnumber(L, v); }
    else if (w == 1) lua_pushinteger(L, (int8_t)*p);
    else if (w == 2) { int16_t v; memcpy(&v, p, 2); lua_pushinteger(L, v); }
    else if (w == 4) { int32_t v; memcpy(&v, p, 4); lua_pushinteger(L, v); }
    else { int64_t v; memcpy(&v, p, 8); lua_pushinteger(L, (lua_Integer)v); }
    lua_rawseti(L, t, at + (lua_Integer)i + 1);
  }
}

static void decode_value(lua_State *L, dec *d) {
  if (d->depth > MAXDEPTH) corrupt(L, "nesting too deep");
  if (d->p >= d->end) corrupt(L, "truncated data");
  int tag = *d->p++;
  switch (tag) {
    case T_NIL: lua_pushnil(L); break;
    case T_FALSE: lua_pushboolean(L, 0); break;
    case T_TRUE: lua_pushboolean(L, 1); break;
    case T_INT8: { int8_t v; need(L, d, 1); memcpy(&v, d->p, 1); d->p += 1; lua_pushinteger(L, v); break; }
    case T_INT16: { int16_t v; need(L, d, 2); memcpy(&v, d->p, 2); d->p += 2; lua_pushinteger(L, v); break; }
    case T_INT32: { int32_t v; need(L, d, 4); memcpy(&v, d->p, 4); d->p += 4; lua_pushinteger(L, v); break; }
    case T_INT64: { int64_t v; need(L, d, 8); memcpy(&v, d->p, 8); d->p += 8; lua_pushinteger(L, (lua_Integer)v); break; }
    case T_FLOAT: { double v; need(L, d, 8); memcpy(&v, d->p, 8); d->p += 8; lua_pushnumber(L, v); break; }
    case T_STR8: {
      need(L, d, 1);
      size_t n = *d->p++;
      need(L, d, n);
      if (d->pf && d->pf - d->p < PF_AHEAD / 2) str_prefetch(d);
      lua_pushlstring(L, (const char *)d->p, n);
      d->p += n;
      break;
    }
    case T_STR32: case T_STR64: {
      uint64_t n;
      if (tag == T_STR32) n = get_u32(L, d);
      else { need(L, d, 8); memcpy(&n, d->p, 8); d->p += 8; }
      if ((uint64_t)(d->end - d->p) < n) corrupt(L, "truncated data");
      lua_pushlstring(L, (const char *)d->p, (size_t)n);
      d->p += n;
      break;
    }
    case T_TABLE: case T_TABLE_MT: case T_TABLE | SHARED: case T_TABLE_MT | SHARED:
      decode_table(L, d, (tag & ~SHARED) == T_TABLE_MT, tag & SHARED);
      break;
    case T_INTS: case T_FLOATS: case T_INTS | SHARED: case T_FLOATS | SHARED:
      decode_packed(L, d, tag & ~SHARED, tag & SHARED);
      break;
    case T_LFUNC: case T_LFUNC | SHARED:
      if (d->data) refuse(L, d, "a Lua function");
      decode_function(L, d, tag & SHARED);
      break;
    case T_REF: {
      uint32_t j = get_u32(L, d);
      if (j < 1 || j > d->nrefs || lua_type(L, d->refs) != LUA_TTABLE) corrupt(L, "bad reference");
      if (lua_rawgeti(L, d->refs, (lua_Integer)j) == LUA_TNIL) corrupt(L, "bad reference");
      break;
    }
    case T_CFUNC: {
      if (d->data) refuse(L, d, "a C function");
      size_t m, n;
      const char *mod = get_str8(L, d, &m);
      const char *name = get_str8(L, d, &n);
      if (m == 0) {  /* a host C function, by its lmp_register name */
        lua_CFunction f = mp_host_find(name, n);
        if (!f)
          luaL_error(L, "cannot decode: host C function '%s' is not registered in this process (lmp_register "
                        "it before the pool or process starts)", lua_pushlstring(L, name, n));
        lua_pushcfunction(L, f);
        break;
      }
      push_module(L, mod, m);
      if (!lua_istable(L, -1))
        luaL_error(L, "cannot decode: module '%s' is not a table here", lua_pushlstring(L, mod, m));
      lua_pushlstring(L, name, n);
      if (lua_rawget(L, -2) == LUA_TNIL) {  /* a field loaded on first use (lua/multiprocessing/init.lua) */
        lua_pop(L, 1);
        lua_pushlstring(L, name, n);
        lua_gettable(L, -2);
      }
      lua_remove(L, -2);
      if (!lua_iscfunction(L, -1)) {
        lua_pushlstring(L, mod, m);
        lua_pushlstring(L, name, n);
        luaL_error(L, "cannot decode: no C function '%s.%s' here", lua_tostring(L, -2), lua_tostring(L, -1));
      }
      break;
    }
    case T_MODULE: {
      if (d->data) refuse(L, d, "a module");
      size_t n;
      const char *s = get_str8(L, d, &n);
      push_module(L, s, n);
      break;
    }
    case T_GLOBALS:
      if (d->data) refuse(L, d, "the global table");
      lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS); break;
    case T_NAMEDMT: {
      if (d->data && !d->inmt) refuse(L, d, "a registered metatable as a value");
      d->inmt = 0;
      size_t n;
      const char *s = get_str8(L, d, &n);
      if (!push_named_mt(L, s, n)) {
        /* registered by a part of the library not loaded here yet: the public module, once
        ** loaded, names that part (lua/multiprocessing/init.lua) */
        int top = lua_gettop(L);
        luaL_checkstack(L, 8, "cannot decode");
        luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
        if (lua_getfield(L, -1, "multiprocessing") == LUA_TTABLE &&
            lua_getfield(L, -1, "_metatable_modules") == LUA_TTABLE) {
          lua_pushlstring(L, s, n);
          if (lua_gettable(L, -2) == LUA_TSTRING) {  /* (its __index loads every part) */
            size_t mn;
            const char *mod = lua_tolstring(L, -1, &mn);
            push_module(L, mod, mn);
          }
        }
        lua_settop(L, top);
        if (!push_named_mt(L, s, n))
          luaL_error(L, "cannot decode: no metatable registered as '%s' here", lua_pushlstring(L, s, n));
      }
      break;
    }
    case T_HANDLE: {
      if (d->data) refuse(L, d, "a shared object's handle");
      if (d->remote) corrupt(L, "a shared object's handle from another machine");
      size_t n;
      const char *s = get_str8(L, d, &n);
      const mp_handle_type *t = find_type(s, n);
      if (!t) corrupt(L, "unknown handle type");
      size_t pn = (size_t)get_u8(L, d);
      if (pn > 32) corrupt(L, "bad handle");
      need(L, d, pn);
      t->decode(L, d->p, pn);
      d->p += pn;
      break;
    }
    default: corrupt(L, "unknown tag");
  }
}

static void decode_root(lua_State *L, const char *s, size_t n, int tidx, lua_Integer at, int mode);

void mp_decode(lua_State *L, const char *s, size_t n) {
  decode_root(L, s, n, 0, 0, 0);
}

void mp_decode_mode(lua_State *L, const char *s, size_t n, int mode) {
  decode_root(L, s, n, 0, 0, mode);
}

void mp_decode_into(lua_State *L, const char *s, size_t n, int tidx, lua_Integer at) {
  decode_root(L, s, n, tidx, at, 0);
}

/* the environments that came after the functions that use them (decode_env) */
static void set_later_envs(lua_State *L, dec *d) {
  lua_rawgeti(L, d->refs, 0);
  lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
  for (lua_Integer k = 1; k + 2 <= n; k += 3) {
    lua_rawgeti(L, -1, k);
    lua_Integer i = (lua_rawgeti(L, -2, k + 1), lua_tointeger(L, -1));
    lua_Integer j = (lua_rawgeti(L, -3, k + 2), lua_tointeger(L, -1));
    lua_pop(L, 2);
    if (j > (lua_Integer)d->nenvs) corrupt(L, "bad environment number");
    lua_rawgeti(L, d->refs, -j);
    lua_setupvalue(L, -2, (int)i);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

static void decode_root(lua_State *L, const char *s, size_t n, int tidx, lua_Integer at, int mode) {
  dec d;  /* (the key cache is cleared when a table key first comes: see push_key) */
  memset(&d, 0, offsetof(dec, kc));
  d.p = d.start = (const unsigned char *)s;
  d.end = (const unsigned char *)s + n;
  d.budget = n;
  d.data = mode == MP_DECODE_DATA;
  d.remote = mode == MP_DECODE_SIGNED;
  if (tidx) {
    d.into = lua_absindex(L, tidx);
    d.into_at = at;
    int root = n < 2 ? -1 : s[1] & ~SHARED;
    if (root != T_TABLE && root != T_INTS && root != T_FLOATS) corrupt(L, "not an array");
  }
  if (n < 2 || (d.p[0] != FORMAT && d.p[0] != FORMAT_B2))
    corrupt(L, n < 2 ? "truncated data" : "not an encoded value (or another format version)");
  d.p++;
  luaL_checkstack(L, 8, "cannot decode: stack overflow");
  d.base = lua_gettop(L);
  int root = d.p[0] & ~SHARED;
  if (root == T_TABLE || root == T_TABLE_MT || root == T_LFUNC || root == T_INTS || root == T_FLOATS) {
    lua_pushnil(L);  /* the slot of the table of shared values */
    d.refs = lua_gettop(L);
    if (root == T_TABLE || root == T_TABLE_MT) {
      lua_pushnil(L);  /* the slot of the key cache's strings */
      d.keys = d.refs + 1;
    }
  }
  if (view_strs && n >= PF_AHEAD) {  /* a big message: prefetch for its strings */
    d.strt = &((const view_state *)(const void *)L)->l_G->strt;
    lua_pushliteral(L, "");
    d.seed = ((const view_string *)lua_topointer(L, -1))->hash;
    lua_pop(L, 1);
    d.pf = d.p;
  }
  decode_value(L, &d);
  if (d.p != d.end) corrupt(L, "trailing bytes");
  if (d.later) set_later_envs(L, &d);
  if (d.refs) {
    lua_copy(L, -1, d.refs);
    lua_settop(L, d.refs);
  }
}

/* --------------------------------------------------------- handles */

/* Who owns the objects a handle names once its bytes are out (docs/arena.md):
** a type's encode callback reports each object (mp_obj_sent), and the encoder
** lists it; the caller that sends the bytes then either counts a reference for
** each entry, owned by its message (a queue: mp_enc_own), or leaves them to
** mp_enc_done, which pins them (core.encode's strings, pipe frames: bytes that
** may be decoded any number of times, or never scanned). An object reported
** outside an encoder's handle is pinned at once. */
#define CAPTURE 4
static mp_sent captured[CAPTURE];
static int ncaptured = -1;  /* -1: no handle is being encoded */

static struct { uint32_t type; mp_dtor dtor; } dtors[16];
static int ndtors;

void mp_obj_set_dtor(uint32_t type, mp_dtor dtor) {
  for (int i = 0; i < ndtors; i++) if (dtors[i].type == type) { dtors[i].dtor = dtor; return; }
  if (ndtors < 16) { dtors[ndtors].type = type; dtors[ndtors].dtor = dtor; ndtors++; }
}

static mp_dtor dtor_of(uint32_t type) {
  for (int i = 0; i < ndtors; i++) if (dtors[i].type == type) return dtors[i].dtor;
  return NULL;
}

mp_dtor mp_obj_dtor(uint32_t type) { return dtor_of(type); }

static void pin(uint64_t off) {
  __atomic_store_n(&((mp_obj *)MP_PTR(off))->pinned, 1, __ATOMIC_SEQ_CST);
}

void mp_obj_sent(uint64_t off, mp_dtor dtor) {
  if (ncaptured < 0 || ncaptured >= CAPTURE) { pin(off); return; }
  captured[ncaptured].off = off;
  captured[ncaptured].dtor = mp_fn_pack(dtor);
  ncaptured++;
}

static void enc_pin(mp_enc *e) {
  for (size_t i = 0; i < e->nsent; i++) pin(e->sent[i].off);
  e->nsent = 0;
}

/* t->encode, listing the objects it reports in e->sent (a callback that raises
** leaves them unlisted: the bytes are never sent) */
static mp_enc *encoding;  /* the encoder of the handle being encoded (see mp_handle_encode) */

static size_t handle_encode(lua_State *L, mp_enc *e, const mp_handle_type *t, int idx,
                            unsigned char *payload) {
  int saved = ncaptured;
  ncaptured = 0;
  encoding = e;
  size_t n = t->encode(L, idx, payload);  /* (C only: nothing nests in here) */
  encoding = NULL;
  int k = ncaptured;
  ncaptured = saved;
  if (k == 0) return n;  /* (a Connection names no object) */
  if (e->nsent + (size_t)k > e->capsent) {
    size_t cap = e->capsent ? e->capsent * 2 : 8;
    mp_sent *ns = realloc(e->sent, cap * sizeof(mp_sent));
    if (!ns) {
      for (int i = 0; i < k; i++) pin(captured[i].off);
      luaL_error(L, "not enough memory");
    }
    e->sent = ns; e->capsent = cap;
  }
  memcpy(e->sent + e->nsent, captured, (size_t)k * sizeof(mp_sent));
  e->nsent += (size_t)k;
  return n;
}

size_t mp_enc_handles(mp_enc *e, const mp_sent **list) {
  *list = e->sent;
  return e->nsent;
}

void mp_enc_own(mp_enc *e) { e->nsent = 0; }
void mp_enc_unsent(mp_enc *e) { e->nsent = 0; }

size_t mp_handle_encode(lua_State *L, int idx, unsigned char *payload) {
  mp_handle *h = lua_touserdata(L, idx);
  if (!h->off) {  /* (met inside a module sent by value: again, modules by name, as enc_fail does) */
    mp_enc *e = encoding;
    encoding = NULL;
    if (e && e->canretry && sent_a_module(L, e)) longjmp(e->retry, 1);
    luaL_error(L, "cannot send a closed %s", luaL_typename(L, idx));
  }
  mp_obj *o = MP_PTR(h->off);
  mp_obj_sent(h->off, dtor_of(o->type));
  memcpy(payload, &h->off, 8);
  return 8;
}

uint64_t mp_handle_payload(lua_State *L, const unsigned char *payload, size_t n) {
  uint64_t off;
  if (n != 8 || !mp_arena_base()) corrupt(L, "bad handle");
  memcpy(&off, payload, 8);
  size_t top = mp_arena_top();  /* no off + size here: a huge off would wrap past the check */
  if (off < 64 || off % 16 || off > top || top - off < sizeof(mp_obj)) corrupt(L, "bad handle");
  /* bytes that outlived what they name (only bytes nobody owned can: see docs/arena.md) */
  if (!mp_obj_alive(off)) corrupt(L, "the shared object this handle names was freed");
  return off;
}

uint64_t mp_handle_object(lua_State *L, const unsigned char *payload, size_t n, uint32_t type,
                          size_t objsize) {
  uint64_t off = mp_handle_payload(L, payload, n);
  if (mp_arena_top() - off < objsize || ((mp_obj *)MP_PTR(off))->type != type) corrupt(L, "bad handle");
  return off;
}

mp_handle *mp_handle_attach(lua_State *L, const unsigned char *payload, size_t n, uint32_t type,
                            const char *tname, size_t size, int nuv) {
  uint64_t off = mp_handle_payload(L, payload, n);
  if (((mp_obj *)MP_PTR(off))->type != type) luaL_error(L, "cannot decode: bad %s handle", tname);
  mp_handle *h = lua_newuserdatauv(L, size, nuv);
  memset(h, 0, size);
  luaL_setmetatable(L, tname);
  mp_obj_retain(off);
  h->off = off;
  h->pid = getpid();
  return h;
}

/* ------------------------------------------------------- self checks */

/* pushes the metatable of class name: the registry keeps it under the name's
** address too, which is cheaper to look up than the name (hot methods check) */
static void push_class(lua_State *L, const char *name) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, name) != LUA_TNIL) return;
  lua_pop(L, 1);
  if (luaL_getmetatable(L, name) == LUA_TNIL) return;  /* no such class (yet): not cached */
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, name);
}

/* the index in names of the class of the userdata at idx; raises a type error
** naming the classes (without "multiprocessing.") when it is none of them */
static int self_class(lua_State *L, int idx, const char *const *names) {
  if (lua_touserdata(L, idx) && lua_getmetatable(L, idx)) {
    for (int i = 0; names[i]; i++) {
      push_class(L, names[i]);
      int eq = lua_rawequal(L, -1, -2);
      lua_pop(L, 1);
      if (eq) { lua_pop(L, 1); return i; }
    }
    lua_pop(L, 1);
  }
  const char *got = luaL_getmetafield(L, idx, "__name") == LUA_TSTRING ? lua_tostring(L, -1)
                    : lua_type(L, idx) == LUA_TLIGHTUSERDATA ? "light userdata" : luaL_typename(L, idx);
  luaL_Buffer b;  /* as luaL_typeerror, which would see the pushed values at a missing idx */
  luaL_buffinit(L, &b);
  for (int i = 0; names[i]; i++) {
    const char *dot = strrchr(names[i], '.');
    if (i) luaL_addstring(&b, " or ");
    luaL_addstring(&b, dot ? dot + 1 : names[i]);
  }
  luaL_addstring(&b, " expected, got ");
  luaL_addstring(&b, got);
  luaL_pushresult(&b);
  return luaL_argerror(L, idx, lua_tostring(L, -1));
}

void *mp_toself(lua_State *L, int idx, const char *const *names) {
  self_class(L, idx, names);
  return lua_touserdata(L, idx);
}

mp_handle *mp_checkopen(lua_State *L, int idx, const char *const *names) {
  int i = self_class(L, idx, names);
  mp_handle *h = lua_touserdata(L, idx);
  if (!h->off) {
    const char *dot = strrchr(names[i], '.');
    luaL_error(L, "attempt to use a closed %s", dot ? dot + 1 : names[i]);
  }
  return h;
}

/* ------------------------------------------------------------- Lua API */

static int encode_to_string(lua_State *L) {
  luaL_checkany(L, 1);
  const char *root = luaL_optstring(L, 2, "value");
  mp_enc *e = mp_encode(L, 1, root);
  mp_enc_push(L, e);
  int shipped = e->shipped;
  mp_enc_done(L, e);
  return shipped;
}

static int codec_encode(lua_State *L) {
  encode_to_string(L);
  return 1;
}

/* core._encode_unowned(v [, root]): the bytes of v with its handles neither pinned nor
** counted, as the bytes of a message whose references are gone (for tests; and the pool's
** check that arguments it keeps unsent can be sent: it raises as encode does) */
static int codec_encode_unowned(lua_State *L) {
  luaL_checkany(L, 1);
  mp_enc *e = mp_encode(L, 1, luaL_optstring(L, 2, "value"));
  mp_enc_push(L, e);
  mp_enc_unsent(e);
  mp_enc_done(L, e);
  return 1;
}

/* core.encode_function(f, root) -> bytes, carries, owners: carries is true when
** globals were sent with a function (the pool then does not reuse the bytes:
** they may change unseen). owners (nil when the bytes name no shared object)
** lists the objects the bytes name, neither pinned nor counted: core.blob_new
** takes it, and its blob owns them (src/pool.c). mp.encode keeps one result,
** for decode(encode(v)). */
static int codec_encode_function(lua_State *L) {
  luaL_checkany(L, 1);
  const char *root = luaL_optstring(L, 2, "value");
  mp_enc *e = mp_encode(L, 1, root);
  mp_enc_push(L, e);
  lua_pushboolean(L, e->shipped);
  if (e->nsent) {
    mp_owners *o = lua_newuserdatauv(L, sizeof(mp_owners) + e->nsent * sizeof(mp_sent), 0);
    luaL_setmetatable(L, MP_OWNERS);
    o->n = e->nsent;
    memcpy(o->h, e->sent, e->nsent * sizeof(mp_sent));
    mp_enc_unsent(e);
  } else {
    lua_pushnil(L);
  }
  mp_enc_done(L, e);
  return 3;
}

static int codec_decode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  static const char *const modes[] = { "all", "data", "signed", NULL };
  static const int mode_of[] = { MP_DECODE_ALL, MP_DECODE_DATA, MP_DECODE_SIGNED };
  int mode = mode_of[luaL_checkoption(L, 2, "all", modes)];
  lua_settop(L, 1);
  mp_decode_mode(L, s, n, mode);
  return 1;
}

/* register_metatable(name, mt): mt travels by name from now on. Registering
** another table under a taken name replaces the old one (a module that is
** loaded again registers its new metatable), which then travels by value. */
static int codec_register_metatable(lua_State *L) {
  size_t n;
  luaL_checklstring(L, 1, &n);
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_argcheck(L, n > 0 && n <= 255, 1, "name must be 1 to 255 bytes");
  lua_settop(L, 2);
  lua_getfield(L, LUA_REGISTRYINDEX, "multiprocessing.metatables");  /* 3 */
  lua_pushvalue(L, 1);
  if (lua_rawget(L, 3) == LUA_TTABLE && !lua_rawequal(L, -1, 2)) {
    lua_pushnil(L);
    lua_rawset(L, 3);  /* the old table loses the name */
  } else {
    lua_pop(L, 1);
  }
  lua_pushvalue(L, 2);
  if (lua_rawget(L, 3) == LUA_TSTRING && !lua_rawequal(L, -1, 1)) {
    lua_pushnil(L);
    lua_rawset(L, 3);  /* the table's old name goes: one name per table */
  } else {
    lua_pop(L, 1);
  }
  lua_pushvalue(L, 1); lua_pushvalue(L, 2); lua_rawset(L, 3);  /* name -> mt */
  lua_pushvalue(L, 2); lua_pushvalue(L, 1); lua_rawset(L, 3);  /* mt -> name */
  lua_pushvalue(L, 2);
  return 1;
}

/* core._codec_view([on [, strings]]) -> arrays, nodes, strings in use: for tests, tables
** through the API (false) or in place (true, when view_check passed), and
** whether the decoder prefetches strings (see view_strs) */
static int codec_view(lua_State *L) {
  static int works = -1, nodes, strs;
  if (works < 0) works = view_works, nodes = view_nodes, strs = view_strs;
  if (!lua_isnone(L, 1)) {
    view_works = works && lua_toboolean(L, 1);
    view_nodes = nodes && view_works;
    view_strs = strs && view_works && (lua_isnone(L, 2) || lua_toboolean(L, 2));
  }
  lua_pushboolean(L, view_works);
  lua_pushboolean(L, view_nodes);
  lua_pushboolean(L, view_strs);
  return 3;
}

int mp_codec_open(lua_State *L) {
  make_key();
  view_check(L);
  luaL_newmetatable(L, ENCODER);
  lua_pushcfunction(L, enc_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, "multiprocessing.metatables");
  lua_pop(L, 1);
  luaL_newmetatable(L, MP_OWNERS);  /* (encode_function's owners: a list, no methods) */
  lua_pop(L, 1);
  if (lua_getfield(L, LUA_REGISTRYINDEX, LIBGLOBALS) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_createtable(L, 0, 48);  /* (a standard interpreter's: about 35) */
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, LIBGLOBALS);
    /* The library, as globals, when this module is first loaded: the C
    ** functions, and the modules under their own names. Those stay the
    ** receiver's own (a worker that patched print keeps its print); what differs
    ** goes with a function that reads it, as do Lua functions (a script's, whose
    ** globals may have changed since). */
    int lib = lua_gettop(L);
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      int t = lua_type(L, -1);
      int keep = lua_type(L, -2) == LUA_TSTRING && lua_iscfunction(L, -1);
      if (!keep && lua_type(L, -2) == LUA_TSTRING && t == LUA_TTABLE) {
        lua_pushvalue(L, -2);
        lua_rawget(L, lib + 1);
        keep = lua_rawequal(L, -1, -2);
        lua_pop(L, 1);
      }
      if (keep) { lua_pushvalue(L, -2); lua_pushvalue(L, -2); lua_rawset(L, lib); }
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
  }
  lua_pop(L, 1);
  static const luaL_Reg funcs[] = {
    {"encode", codec_encode},
    {"decode", codec_decode},
    {"_encode_unowned", codec_encode_unowned},
    {"register_metatable", codec_register_metatable},
    {"encode_function", codec_encode_function},
    {"_codec_view", codec_view},
    {"_env_newindex", env_newindex},  /* named, so that an environment can travel as a value */
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
