/* shared.c: Value and Array, typed memory in the arena with an optional lock. */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "mp.h"

/* The object holds the typecode, the length and the elements; the lock is a
** separate lock object of sync.c, counted by every handle that names it, so
** a handle's payload is the two offsets. Elements are read and written with
** relaxed atomic loads and stores: no torn values, ordering comes from the lock. */

#define T_SHARED 0x44524853u  /* "SHRD" */
#define T_LOCK   0x4b434f4cu  /* "LOCK": sync.c's lock objects (its T_LOCK), which a lock offset must name */
#define VALUE "multiprocessing.Value"
#define ARRAY "multiprocessing.Array"
#define TYPECODES "b B h H i I l L q Q f d c u"

typedef struct shared_obj {
  mp_obj o;
  uint32_t tc;       /* the typecode character */
  uint32_t isvalue;  /* made by Value (1) or Array (0) */
  uint64_t n;        /* elements, which follow */
} shared_obj;        /* 32 bytes: the elements are 16-aligned */

typedef struct shared_handle {
  mp_handle h;
  uint64_t lock;     /* lock object counted by this handle, or 0 */
  char *data;
  lua_Integer n;
  int tc;
} shared_handle;

#define DATA(off) ((char *)MP_PTR(off) + sizeof(shared_obj))

/* ------------------------------------------------------------ typecodes */
/* Shared with shm.c's views (mp.h, "typed elements"): loads and stores touch
** memory only (no Lua call), so that a view can guard them against SIGBUS. 'c'
** is a byte, read and written as a 1-byte string; 'u' a Unicode code point
** (uint32, as wchar_t on Linux), read and written as a 1-character UTF-8 string. */

size_t mp_tc_size(int tc) {
  switch (tc) {
    case 'b': case 'B': case 'c': return 1;
    case 'h': case 'H': return 2;
    case 'i': case 'I': case 'f': case 'u': return 4;
    case 'l': case 'L': case 'q': case 'Q': case 'd': return 8;
    default: return 0;
  }
}
#define tc_size mp_tc_size

int mp_checktypecode(lua_State *L, int idx) {
  size_t len;
  const char *s = luaL_checklstring(L, idx, &len);
  if (len != 1 || !tc_size((unsigned char)s[0]))
    luaL_error(L, "unknown typecode '%s' (valid: " TYPECODES ")", s);
  return (unsigned char)s[0];
}
#define checktypecode mp_checktypecode

#define LD(T, p, i) __atomic_load_n((const T *)(p) + (i), __ATOMIC_RELAXED)
#define ST(T, p, i, v) __atomic_store_n((T *)(p) + (i), (T)(v), __ATOMIC_RELAXED)

mp_elem mp_elem_load(int tc, const char *p, lua_Integer i) {
  mp_elem e;
  switch (tc) {
    case 'b': e.i = LD(int8_t, p, i); break;
    case 'B': case 'c': e.i = LD(uint8_t, p, i); break;
    case 'h': e.i = LD(int16_t, p, i); break;
    case 'H': e.i = LD(uint16_t, p, i); break;
    case 'i': e.i = LD(int32_t, p, i); break;
    case 'I': case 'u': e.i = LD(uint32_t, p, i); break;
    case 'f': {
      uint32_t bits = LD(uint32_t, p, i);
      float f;
      memcpy(&f, &bits, 4);
      e.d = f;
      break;
    }
    case 'd': {
      uint64_t bits = LD(uint64_t, p, i);
      memcpy(&e.d, &bits, 8);
      break;
    }
    default: e.u = LD(uint64_t, p, i); break;
  }
  return e;
}

void mp_elem_push(lua_State *L, int tc, mp_elem e) {
  switch (tc) {
    case 'f': case 'd': lua_pushnumber(L, e.d); break;
    case 'L': case 'Q':
      if (e.u <= (uint64_t)LUA_MAXINTEGER) lua_pushinteger(L, (lua_Integer)e.u);
      else lua_pushnumber(L, (lua_Number)e.u);
      break;
    case 'c': { char c = (char)e.i; lua_pushlstring(L, &c, 1); break; }
    case 'u':
      if (e.i <= 0x10FFFF) lua_pushfstring(L, "%U", (long)e.i);
      else lua_pushliteral(L, "\xEF\xBF\xBD");  /* stored by others: U+FFFD */
      break;
    default: lua_pushinteger(L, e.i); break;
  }
}

static void push_elem(lua_State *L, int tc, const char *p, lua_Integer i) {
  mp_elem_push(L, tc, mp_elem_load(tc, p, i));
}

/* One UTF-8 character at s[0..n): its length (0 if invalid), its code point in *cp.
** Strict: no overlong forms, no surrogates, nothing above U+10FFFF. */
static size_t utf8_one(const unsigned char *s, size_t n, uint32_t *cp) {
  if (n == 0) return 0;
  unsigned c = s[0];
  size_t len;
  uint32_t v, min;
  if (c < 0x80) { *cp = c; return 1; }
  else if ((c & 0xE0) == 0xC0) { len = 2; v = c & 0x1F; min = 0x80; }
  else if ((c & 0xF0) == 0xE0) { len = 3; v = c & 0x0F; min = 0x800; }
  else if ((c & 0xF8) == 0xF0) { len = 4; v = c & 0x07; min = 0x10000; }
  else return 0;
  if (n < len) return 0;
  for (size_t k = 1; k < len; k++) {
    if ((s[k] & 0xC0) != 0x80) return 0;
    v = (v << 6) | (s[k] & 0x3F);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  *cp = v;
  return len;
}

/* A value for typecode tc, checked; stored as 64 bits (an integer, a byte, a
** code point, or the double of a float/double). */
mp_elem mp_elem_check(lua_State *L, int tc, int idx) {
  mp_elem e;
  if (tc == 'c' || tc == 'u') {
    size_t len;
    const char *s = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &len) : NULL;
    uint32_t cp = 0;
    if (tc == 'c' && (!s || len != 1))
      luaL_error(L, "a string of 1 byte expected for typecode 'c', got %s",
                 s ? lua_pushfstring(L, "a string of %I bytes", (lua_Integer)len) : luaL_typename(L, idx));
    if (tc == 'u' && (!s || len == 0 || utf8_one((const unsigned char *)s, len, &cp) != len))
      luaL_error(L, "a string of one UTF-8 character expected for typecode 'u', got %s",
                 s ? lua_pushfstring(L, "\"%s\"", lua_pushlstring(L, s, len > 20 ? 20 : len)) : luaL_typename(L, idx));
    e.i = tc == 'c' ? (unsigned char)s[0] : (int64_t)cp;
    return e;
  }
  if (lua_type(L, idx) != LUA_TNUMBER)
    luaL_error(L, "number expected for typecode '%c', got %s", tc, luaL_typename(L, idx));
  if (tc == 'f' || tc == 'd') { e.d = lua_tonumber(L, idx); return e; }
  int isint;
  lua_Integer v = lua_tointegerx(L, idx, &isint);
  if (!isint) {
    lua_Number x = lua_tonumber(L, idx);
    if (x == floor(x) && !isinf(x))
      luaL_error(L, "value %s out of range for typecode '%c'", lua_tostring(L, idx), tc);
    luaL_error(L, "value %s is not an integer (typecode '%c')", lua_tostring(L, idx), tc);
  }
  lua_Integer lo, hi;
  switch (tc) {
    case 'b': lo = INT8_MIN; hi = INT8_MAX; break;
    case 'B': lo = 0; hi = UINT8_MAX; break;
    case 'h': lo = INT16_MIN; hi = INT16_MAX; break;
    case 'H': lo = 0; hi = UINT16_MAX; break;
    case 'i': lo = INT32_MIN; hi = INT32_MAX; break;
    case 'I': lo = 0; hi = UINT32_MAX; break;
    case 'L': case 'Q': lo = 0; hi = LUA_MAXINTEGER; break;
    default: lo = LUA_MININTEGER; hi = LUA_MAXINTEGER; break;
  }
  if (v < lo || v > hi) luaL_error(L, "value %I out of range for typecode '%c'", v, tc);
  e.i = v;
  return e;
}
#define check_elem mp_elem_check

void mp_elem_store(int tc, char *p, lua_Integer i, mp_elem e) {
  switch (tc) {
    case 'b': case 'B': case 'c': ST(uint8_t, p, i, e.i); break;
    case 'h': case 'H': ST(uint16_t, p, i, e.i); break;
    case 'i': case 'I': case 'u': ST(uint32_t, p, i, e.i); break;
    case 'f': {
      float f = (float)e.d;
      uint32_t bits;
      memcpy(&bits, &f, 4);
      ST(uint32_t, p, i, bits);
      break;
    }
    case 'd': {
      uint64_t bits;
      memcpy(&bits, &e.d, 8);
      ST(uint64_t, p, i, bits);
      break;
    }
    default: ST(uint64_t, p, i, e.i); break;
  }
}
#define store_elem mp_elem_store

/* The elements that the value at idx gives, all checked before any is stored:
** a table (its items 1..#t), or for 'c' a string (its bytes) and for 'u' a
** UTF-8 string (its characters). Pushes a userdata that holds them. */
mp_elem *mp_elems_check(lua_State *L, int tc, int idx, lua_Integer *count) {
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) == LUA_TSTRING && (tc == 'c' || tc == 'u')) {
    size_t len;
    const unsigned char *s = (const unsigned char *)lua_tolstring(L, idx, &len);
    mp_elem *e = lua_newuserdatauv(L, (len ? len : 1) * sizeof(mp_elem), 0);
    lua_Integer n = 0;
    for (size_t k = 0; k < len;) {
      uint32_t cp = s[k];
      size_t l = tc == 'c' ? 1 : utf8_one(s + k, len - k, &cp);
      if (!l) luaL_error(L, "invalid UTF-8 at byte %I of the string (typecode 'u')", (lua_Integer)k + 1);
      e[n++].i = cp;
      k += l;
    }
    *count = n;
    return e;
  }
  if (lua_type(L, idx) != LUA_TTABLE)
    luaL_error(L, "table%s expected, got %s", tc == 'c' || tc == 'u' ? " or string" : "", luaL_typename(L, idx));
  lua_Integer n = luaL_len(L, idx);
  if (n < 0 || (lua_Unsigned)n > SIZE_MAX / sizeof(mp_elem) / 2) luaL_error(L, "table too long");
  mp_elem *e = lua_newuserdatauv(L, (n ? (size_t)n : 1) * sizeof(mp_elem), 0);
  for (lua_Integer k = 0; k < n; k++) {
    lua_geti(L, idx, k + 1);
    e[k] = check_elem(L, tc, -1);
    lua_pop(L, 1);
  }
  *count = n;
  return e;
}

/* -------------------------------------------------------------- handles */

/* every method, close and __gc included, checks its self (mp.h's self checks) */
#define SHAREDS MP_CLASSES(VALUE, ARRAY)
static shared_handle *checkshared(lua_State *L, int idx) {
  return (shared_handle *)mp_checkopen(L, idx, SHAREDS);
}
static shared_handle *checkarray(lua_State *L, int idx) {
  return (shared_handle *)mp_checkopen(L, idx, MP_CLASSES(ARRAY));
}

/* The handle's own metatable is upvalue 2 of __index/__newindex: the same check
** as mp_checkopen's (the metatable's identity), without the registry look-up,
** for v.value and a[i]. */
static shared_handle *fastcheck(lua_State *L, const char *what) {
  shared_handle *a = lua_touserdata(L, 1);
  if (!a || !lua_getmetatable(L, 1) || !lua_rawequal(L, -1, lua_upvalueindex(2)))
    luaL_typeerror(L, 1, what);
  lua_pop(L, 1);
  if (!a->h.off) luaL_error(L, "attempt to use a closed %s", what);
  return a;
}

static int shared_close(lua_State *L) {
  shared_handle *a = mp_toself(L, 1, SHAREDS);
  {  /* each part on its own: a failed constructor may leave only the lock */
    if (a->h.off) mp_obj_release(a->h.off, a->h.pid);
    if (a->lock) mp_obj_release(a->lock, a->h.pid);
    a->h.off = a->lock = 0;
    a->data = NULL;
    a->n = 0;
  }
  return 0;
}

static shared_handle *newshared(lua_State *L, int isvalue) {
  shared_handle *a = lua_newuserdatauv(L, sizeof(shared_handle), 1);
  memset(a, 0, sizeof *a);
  luaL_setmetatable(L, isvalue ? VALUE : ARRAY);
  a->h.pid = getpid();
  return a;
}

static void attach(shared_handle *a, uint64_t off) {
  shared_obj *o = MP_PTR(off);
  a->h.off = off;
  a->data = DATA(off);
  a->n = (lua_Integer)o->n;
  a->tc = (int)o->tc;
}

/* {lock = true|false|Lock|RLock}, at idx: sets a->lock. A lock that was given is
** kept as the handle's user value (at top), so get_lock returns that very object. */
static void takelock(lua_State *L, shared_handle *a, int idx) {
  int self = lua_gettop(L);  /* a, just made */
  int mode = 1;  /* a new RLock */
  if (!lua_isnoneornil(L, idx)) {
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_getfield(L, idx, "lock");
    if (lua_isboolean(L, -1)) mode = lua_toboolean(L, -1);
    else if (!lua_isnil(L, -1)) {
      mp_handle *h = luaL_testudata(L, -1, "multiprocessing.Lock");
      if (!h) h = luaL_testudata(L, -1, "multiprocessing.RLock");
      if (!h) luaL_error(L, "option 'lock' must be a boolean, a Lock or an RLock, got %s", luaL_typename(L, -1));
      if (!h->off) luaL_error(L, "option 'lock' is a closed lock");
      mp_obj_retain(h->off);
      a->lock = h->off;
      mode = 2;
      lua_pushvalue(L, -1);
      lua_setiuservalue(L, self, 1);
    }
    lua_pop(L, 1);
  }
  if (mode == 1) a->lock = mp_sync_newlock(L, 1);
}

static uint64_t newobj(lua_State *L, int tc, lua_Integer n, int isvalue) {
  size_t es = tc_size(tc);
  if ((uint64_t)n > (SIZE_MAX - sizeof(shared_obj)) / es) luaL_error(L, "Array of %I elements is too large", n);
  uint64_t off = mp_obj_new(L, sizeof(shared_obj) + (size_t)n * es, T_SHARED);
  shared_obj *o = MP_PTR(off);
  o->tc = (uint32_t)tc;
  o->isvalue = isvalue;
  o->n = (uint64_t)n;
  return off;
}

static int get_lock(lua_State *L) {
  shared_handle *a = checkshared(L, 1);
  if (!a->lock)
    return luaL_error(L, "this %s has no lock (it was made with lock = false)",
                      luaL_testudata(L, 1, VALUE) ? "Value" : "Array");
  if (lua_getiuservalue(L, 1, 1) == LUA_TUSERDATA) {
    mp_handle *h = lua_touserdata(L, -1);
    if (h->off == a->lock) return 1;  /* cached and not closed */
  }
  mp_sync_pushlock(L, a->lock);
  lua_pushvalue(L, -1);
  lua_setiuservalue(L, 1, 1);
  return 1;
}

static size_t shared_encode(lua_State *L, int idx, unsigned char *payload) {
  shared_handle *a = lua_touserdata(L, idx);
  if (!a->h.off) luaL_error(L, "cannot send a closed %s", luaL_testudata(L, idx, VALUE) ? "Value" : "Array");
  mp_obj_sent(a->h.off, NULL);  /* both objects are owned by the message (or pinned) */
  if (a->lock) mp_obj_sent(a->lock, NULL);
  memcpy(payload, &a->h.off, 8);
  memcpy(payload + 8, &a->lock, 8);
  return 16;
}

/* The payload names two objects: both offsets go through the codec's checked
** path (mp_handle_payload: aligned, below the arena's top), then their types
** are checked, and the elements must lie below the top too, so no bytes can
** make a handle that reaches outside the arena or into another kind of object. */
static void decode_as(lua_State *L, const unsigned char *p, size_t n, int isvalue) {
  const char *tname = isvalue ? VALUE : ARRAY;
  if (n != 16) luaL_error(L, "cannot decode: bad %s handle", tname);
  uint64_t off = mp_handle_payload(L, p, 8), lock;
  memcpy(&lock, p + 8, 8);
  if (lock) {
    lock = mp_handle_payload(L, p + 8, 8);
    if (((mp_obj *)MP_PTR(lock))->type != T_LOCK)
      luaL_error(L, "cannot decode: bad %s handle (its lock is not a lock)", tname);
  }
  size_t top = mp_arena_top();
  shared_obj *o = MP_PTR(off);
  size_t es;
  if (off + sizeof(shared_obj) > top || o->o.type != T_SHARED || o->isvalue != (uint32_t)isvalue ||
      !(es = tc_size((int)o->tc)) || (isvalue && o->n != 1) ||
      o->n > (top - off - sizeof(shared_obj)) / es || o->n > (uint64_t)LUA_MAXINTEGER)
    luaL_error(L, "cannot decode: bad %s handle", tname);
  shared_handle *a = (shared_handle *)mp_handle_attach(L, p, 8, T_SHARED, tname, sizeof(shared_handle), 1);
  attach(a, off);
  if (lock) { mp_obj_retain(lock); a->lock = lock; }
}

static void value_decode(lua_State *L, const unsigned char *p, size_t n) { decode_as(L, p, n, 1); }
static void array_decode(lua_State *L, const unsigned char *p, size_t n) { decode_as(L, p, n, 0); }

static const mp_handle_type value_type = { VALUE, shared_encode, value_decode };
static const mp_handle_type array_type = { ARRAY, shared_encode, array_decode };

/* ---------------------------------------------------------------- Value */

/* Value(typecode [, init=0 [, {lock = ...}]]) */
static int shared_Value(lua_State *L) {
  int tc = checktypecode(L, 1);
  lua_settop(L, 3);
  mp_elem e = { 0 };
  if (!lua_isnoneornil(L, 2)) e = check_elem(L, tc, 2);
  shared_handle *a = newshared(L, 1);
  takelock(L, a, 3);
  attach(a, newobj(L, tc, 1, 1));
  store_elem(tc, a->data, 0, e);
  return 1;
}

static int value_index(lua_State *L) {
  const char *k = lua_tostring(L, 2);
  if (k && strcmp(k, "value") == 0) {
    shared_handle *a = fastcheck(L, "Value");
    push_elem(L, a->tc, a->data, 0);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int value_newindex(lua_State *L) {
  shared_handle *a = fastcheck(L, "Value");
  const char *k = lua_tostring(L, 2);
  if (!k || strcmp(k, "value") != 0)
    return luaL_error(L, "cannot set field '%s' of a Value (only 'value')", luaL_tolstring(L, 2, NULL));
  store_elem(a->tc, a->data, 0, check_elem(L, a->tc, 3));
  return 0;
}

static int value_tostring(lua_State *L) {
  shared_handle *a = mp_toself(L, 1, MP_CLASSES(VALUE));
  if (!a->h.off) { lua_pushfstring(L, "%s (closed) %p", VALUE, (void *)a); return 1; }
  mp_elem e = mp_elem_load(a->tc, a->data, 0);
  if (a->tc == 'c' && (e.i < 32 || e.i > 126)) lua_pushfstring(L, "'\\%d'", (int)e.i);
  else {
    mp_elem_push(L, a->tc, e);
    if (a->tc == 'c' || a->tc == 'u') lua_pushfstring(L, "'%s'", lua_tostring(L, -1));
  }
  lua_pushfstring(L, "%s('%c', %s) %p", VALUE, a->tc, lua_tostring(L, -1), (void *)a);
  return 1;
}

/* ---------------------------------------------------------------- Array */

/* Array(typecode, size | {values} [, {lock = ...}]) */
static int shared_Array(lua_State *L) {
  int tc = checktypecode(L, 1);
  lua_settop(L, 3);
  lua_Integer n = 0;
  int fromtable = lua_type(L, 2) == LUA_TTABLE || (lua_type(L, 2) == LUA_TSTRING && (tc == 'c' || tc == 'u'));
  mp_elem *init = NULL;
  if (fromtable) init = mp_elems_check(L, tc, 2, &n);  /* at 4 */
  else {
    n = luaL_checkinteger(L, 2);
    luaL_argcheck(L, n >= 0, 2, "size must be >= 0");
  }
  shared_handle *a = newshared(L, 0);
  takelock(L, a, 3);
  attach(a, newobj(L, tc, n, 0));
  if (init)
    for (lua_Integer i = 0; i < n; i++) store_elem(tc, a->data, i, init[i]);
  return 1;
}

static int range_error(lua_State *L, lua_Integer i, lua_Integer n) {
  return luaL_error(L, "Array index %I out of range (size %I)", i, n);
}

/* Text arrays ('c', 'u'), as Python's c_char and c_wchar arrays: a.value is the
** text up to the first zero element, a.raw ('c' only) all the bytes. Setting
** .value writes the text and a zero after it if there is room; .raw must fill
** the array exactly. */
static int text_get(lua_State *L, shared_handle *a, int raw) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (lua_Integer i = 0; i < a->n; i++) {
    mp_elem e = mp_elem_load(a->tc, a->data, i);
    if (e.i == 0 && !raw) break;
    if (a->tc == 'c') luaL_addchar(&b, (char)e.i);
    else {
      mp_elem_push(L, 'u', e);
      luaL_addvalue(&b);
    }
  }
  luaL_pushresult(&b);
  return 1;
}

static int text_set(lua_State *L, shared_handle *a, int raw) {
  if (lua_type(L, 3) != LUA_TSTRING)
    return luaL_error(L, "string expected for Array('%c').%s, got %s", a->tc, raw ? "raw" : "value", luaL_typename(L, 3));
  lua_Integer n;
  mp_elem *e = mp_elems_check(L, a->tc, 3, &n);
  if (n > a->n || (raw && n != a->n))
    return luaL_error(L, "%s of %I %s %s for Array('%c', %I)", raw ? "raw bytes" : "string", n,
                      a->tc == 'c' ? "bytes" : "characters", n > a->n ? "too long" : "do not fill it",
                      a->tc, a->n);
  for (lua_Integer i = 0; i < n; i++) store_elem(a->tc, a->data, i, e[i]);
  if (n < a->n) store_elem(a->tc, a->data, n, (mp_elem){ .i = 0 });
  return 0;
}

/* arr:set(i, values): slice assignment; values is a table, or a string for 'c'
** ('u': UTF-8). Every value is checked before any is written. */
static int array_set(lua_State *L) {
  shared_handle *a = checkarray(L, 1);
  lua_Integer i = luaL_checkinteger(L, 2), n;
  mp_elem *e = mp_elems_check(L, a->tc, 3, &n);
  if (i < 1 || i > a->n + 1 || n > a->n - (i - 1))
    return luaL_error(L, "Array:set(%I, ...) of %I elements out of range (size %I)", i, n, a->n);
  for (lua_Integer k = 0; k < n; k++) store_elem(a->tc, a->data, i - 1 + k, e[k]);
  return 0;
}

/* v:get_obj(): Python's synchronized wrapper gives its raw object; here a new
** handle to the same memory without a lock (get_lock on it raises). */
static int get_obj(lua_State *L) {
  shared_handle *a = checkshared(L, 1);
  int isvalue = luaL_testudata(L, 1, VALUE) != NULL;
  shared_handle *b = newshared(L, isvalue);
  mp_obj_retain(a->h.off);
  attach(b, a->h.off);
  return 1;
}

/* arr[i] reads 1..n; arr[n+1] is nil so that ipairs stops; other indexes raise */
static int array_index(lua_State *L) {
  if (lua_type(L, 2) == LUA_TNUMBER) {
    shared_handle *a = fastcheck(L, "Array");
    int isint;
    lua_Integer i = lua_tointegerx(L, 2, &isint);
    if (!isint) return luaL_error(L, "Array index must be an integer, got %s", lua_tostring(L, 2));
    if ((lua_Unsigned)i - 1 < (lua_Unsigned)a->n) { push_elem(L, a->tc, a->data, i - 1); return 1; }
    if (i == a->n + 1) { lua_pushnil(L); return 1; }
    return range_error(L, i, a->n);
  }
  const char *k = lua_tostring(L, 2);
  if (k && (strcmp(k, "value") == 0 || strcmp(k, "raw") == 0)) {
    shared_handle *a = fastcheck(L, "Array");
    if (a->tc == 'c' || (a->tc == 'u' && k[0] == 'v')) return text_get(L, a, k[0] == 'r');
  }
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int array_newindex(lua_State *L) {
  shared_handle *a = fastcheck(L, "Array");
  if (lua_type(L, 2) != LUA_TNUMBER) {
    const char *k = lua_tostring(L, 2);
    if (k && (a->tc == 'c' || a->tc == 'u') && (strcmp(k, "value") == 0 || (a->tc == 'c' && strcmp(k, "raw") == 0)))
      return text_set(L, a, k[0] == 'r');
    return luaL_error(L, "cannot set field '%s' of an Array (indexes are integers)", luaL_tolstring(L, 2, NULL));
  }
  int isint;
  lua_Integer i = lua_tointegerx(L, 2, &isint);
  if (!isint) return luaL_error(L, "Array index must be an integer, got %s", lua_tostring(L, 2));
  if ((lua_Unsigned)i - 1 >= (lua_Unsigned)a->n) return range_error(L, i, a->n);
  store_elem(a->tc, a->data, i - 1, check_elem(L, a->tc, 3));
  return 0;
}

static int array_len(lua_State *L) {
  shared_handle *a = checkarray(L, 1);
  lua_pushinteger(L, a->n);
  return 1;
}

static int array_totable(lua_State *L) {
  shared_handle *a = checkarray(L, 1);
  lua_createtable(L, a->n > INT32_MAX ? 0 : (int)a->n, 0);
  for (lua_Integer i = 0; i < a->n; i++) {
    push_elem(L, a->tc, a->data, i);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int array_fill(lua_State *L) {
  shared_handle *a = checkarray(L, 1);
  mp_elem e = check_elem(L, a->tc, 2);
  for (lua_Integer i = 0; i < a->n; i++) store_elem(a->tc, a->data, i, e);
  return 0;
}

void mp_slice_range(lua_State *L, int idx, lua_Integer n, lua_Integer *pi, lua_Integer *pj) {
  lua_Integer i = luaL_optinteger(L, idx, 1), j = luaL_optinteger(L, idx + 1, n);
  if (i < 0) i = i < -n ? 1 : n + i + 1;
  else if (i == 0) i = 1;
  if (j < 0) j = j < -n ? 0 : n + j + 1;
  else if (j > n) j = n;
  *pi = i;
  *pj = j;
}

/* arr:slice([i=1 [, j=#arr]]) -> table, indexes as string.sub takes them */
static int array_slice(lua_State *L) {
  shared_handle *a = checkarray(L, 1);
  lua_Integer i, j;
  mp_slice_range(L, 2, a->n, &i, &j);
  lua_createtable(L, i <= j && j - i < INT32_MAX ? (int)(j - i + 1) : 0, 0);
  for (lua_Integer k = i; k <= j; k++) {
    push_elem(L, a->tc, a->data, k - 1);
    lua_rawseti(L, -2, k - i + 1);
  }
  return 1;
}

static int array_tostring(lua_State *L) {
  shared_handle *a = mp_toself(L, 1, MP_CLASSES(ARRAY));
  if (!a->h.off) lua_pushfstring(L, "%s (closed) %p", ARRAY, (void *)a);
  else lua_pushfstring(L, "%s('%c', %I) %p", ARRAY, a->tc, a->n, (void *)a);
  return 1;
}

/* -------------------------------------------------------------- classes */

static void newclass(lua_State *L, const char *name, const luaL_Reg *methods,
                     lua_CFunction index, lua_CFunction newindex, const luaL_Reg *meta) {
  mp_newmetatable(L, name, mp_nregs(meta) + 2);  /* (+ __index, __newindex) */
  luaL_setfuncs(L, meta, 0);
  lua_createtable(L, 0, mp_nregs(methods));  /* upvalue 1: the methods */
  luaL_setfuncs(L, methods, 0);
  lua_pushvalue(L, -2);           /* upvalue 2: the metatable itself */
  lua_pushcclosure(L, index, 2);
  lua_setfield(L, -2, "__index");
  lua_newtable(L);                /* __newindex needs no methods */
  lua_pushvalue(L, -2);
  lua_pushcclosure(L, newindex, 2);
  lua_setfield(L, -2, "__newindex");
  lua_pop(L, 1);
}

int mp_shared_open(lua_State *L) {
  static const luaL_Reg value_methods[] = {
    {"get_lock", get_lock}, {"get_obj", get_obj}, {"close", shared_close}, {NULL, NULL}
  };
  static const luaL_Reg value_meta[] = {
    {"__gc", shared_close}, {"__close", shared_close}, {"__tostring", value_tostring}, {NULL, NULL}
  };
  static const luaL_Reg array_methods[] = {
    {"get_lock", get_lock}, {"totable", array_totable}, {"fill", array_fill},
    {"slice", array_slice}, {"set", array_set}, {"get_obj", get_obj}, {"close", shared_close}, {NULL, NULL}
  };
  static const luaL_Reg array_meta[] = {
    {"__gc", shared_close}, {"__close", shared_close}, {"__tostring", array_tostring},
    {"__len", array_len}, {NULL, NULL}
  };
  newclass(L, VALUE, value_methods, value_index, value_newindex, value_meta);
  newclass(L, ARRAY, array_methods, array_index, array_newindex, array_meta);
  mp_codec_register(&value_type);
  mp_codec_register(&array_type);
  static const luaL_Reg funcs[] = {
    {"Value", shared_Value}, {"Array", shared_Array}, {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
