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
#define TYPECODES "b B h H i I l L q Q f d"

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

static size_t tc_size(int tc) {
  switch (tc) {
    case 'b': case 'B': return 1;
    case 'h': case 'H': return 2;
    case 'i': case 'I': case 'f': return 4;
    case 'l': case 'L': case 'q': case 'Q': case 'd': return 8;
    default: return 0;
  }
}

static int checktypecode(lua_State *L, int idx) {
  size_t len;
  const char *s = luaL_checklstring(L, idx, &len);
  if (len != 1 || !tc_size((unsigned char)s[0]))
    luaL_error(L, "unknown typecode '%s' (valid: " TYPECODES ")", s);
  return (unsigned char)s[0];
}

/* --------------------------------------------------- element access */

#define LD(T, p, i) __atomic_load_n((T *)(p) + (i), __ATOMIC_RELAXED)
#define ST(T, p, i, v) __atomic_store_n((T *)(p) + (i), (T)(v), __ATOMIC_RELAXED)

static void push_elem(lua_State *L, int tc, char *p, lua_Integer i) {
  switch (tc) {
    case 'b': lua_pushinteger(L, LD(int8_t, p, i)); break;
    case 'B': lua_pushinteger(L, LD(uint8_t, p, i)); break;
    case 'h': lua_pushinteger(L, LD(int16_t, p, i)); break;
    case 'H': lua_pushinteger(L, LD(uint16_t, p, i)); break;
    case 'i': lua_pushinteger(L, LD(int32_t, p, i)); break;
    case 'I': lua_pushinteger(L, LD(uint32_t, p, i)); break;
    case 'l': case 'q': lua_pushinteger(L, LD(int64_t, p, i)); break;
    case 'L': case 'Q': {
      uint64_t v = LD(uint64_t, p, i);
      if (v <= (uint64_t)LUA_MAXINTEGER) lua_pushinteger(L, (lua_Integer)v);
      else lua_pushnumber(L, (lua_Number)v);
      break;
    }
    case 'f': {
      uint32_t bits = LD(uint32_t, p, i);
      float f;
      memcpy(&f, &bits, 4);
      lua_pushnumber(L, f);
      break;
    }
    default: {
      uint64_t bits = LD(uint64_t, p, i);
      double d;
      memcpy(&d, &bits, 8);
      lua_pushnumber(L, d);
      break;
    }
  }
}

/* A value for typecode tc, checked; stored as 64 bits (an integer, or the
** bits of the float/double). */
typedef union { int64_t i; double d; } elem;

static elem check_elem(lua_State *L, int tc, int idx) {
  elem e;
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

static void store_elem(int tc, char *p, lua_Integer i, elem e) {
  switch (tc) {
    case 'b': case 'B': ST(uint8_t, p, i, e.i); break;
    case 'h': case 'H': ST(uint16_t, p, i, e.i); break;
    case 'i': case 'I': ST(uint32_t, p, i, e.i); break;
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
  elem e = { 0 };
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
  push_elem(L, a->tc, a->data, 0);
  lua_pushfstring(L, "%s('%c', %s) %p", VALUE, a->tc, lua_tostring(L, -1), (void *)a);
  return 1;
}

/* ---------------------------------------------------------------- Array */

/* Array(typecode, size | {values} [, {lock = ...}]) */
static int shared_Array(lua_State *L) {
  int tc = checktypecode(L, 1);
  lua_settop(L, 3);
  lua_Integer n;
  int fromtable = lua_type(L, 2) == LUA_TTABLE;
  if (fromtable) n = luaL_len(L, 2);
  else {
    n = luaL_checkinteger(L, 2);
    luaL_argcheck(L, n >= 0, 2, "size must be >= 0");
  }
  shared_handle *a = newshared(L, 0);
  takelock(L, a, 3);
  attach(a, newobj(L, tc, n, 0));
  if (fromtable)
    for (lua_Integer i = 0; i < n; i++) {
      lua_geti(L, 2, i + 1);
      store_elem(tc, a->data, i, check_elem(L, tc, -1));
      lua_pop(L, 1);
    }
  return 1;
}

static int range_error(lua_State *L, lua_Integer i, lua_Integer n) {
  return luaL_error(L, "Array index %I out of range (size %I)", i, n);
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
  lua_pushvalue(L, 2);
  lua_rawget(L, lua_upvalueindex(1));
  return 1;
}

static int array_newindex(lua_State *L) {
  shared_handle *a = fastcheck(L, "Array");
  if (lua_type(L, 2) != LUA_TNUMBER)
    return luaL_error(L, "cannot set field '%s' of an Array (indexes are integers)", luaL_tolstring(L, 2, NULL));
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
  elem e = check_elem(L, a->tc, 2);
  for (lua_Integer i = 0; i < a->n; i++) store_elem(a->tc, a->data, i, e);
  return 0;
}

/* arr:slice([i=1 [, j=#arr]]) -> table, indexes as string.sub takes them */
static int array_slice(lua_State *L) {
  shared_handle *a = checkarray(L, 1);
  lua_Integer n = a->n;
  lua_Integer i = luaL_optinteger(L, 2, 1), j = luaL_optinteger(L, 3, n);
  if (i < 0) i = i < -n ? 1 : n + i + 1;
  else if (i == 0) i = 1;
  if (j < 0) j = j < -n ? 0 : n + j + 1;
  else if (j > n) j = n;
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
  luaL_newmetatable(L, name);
  luaL_setfuncs(L, meta, 0);
  lua_newtable(L);                /* upvalue 1: the methods */
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
    {"get_lock", get_lock}, {"close", shared_close}, {NULL, NULL}
  };
  static const luaL_Reg value_meta[] = {
    {"__gc", shared_close}, {"__close", shared_close}, {"__tostring", value_tostring}, {NULL, NULL}
  };
  static const luaL_Reg array_methods[] = {
    {"get_lock", get_lock}, {"totable", array_totable}, {"fill", array_fill},
    {"slice", array_slice}, {"close", shared_close}, {NULL, NULL}
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
