/* capi.c: the public C API (include/multiprocessing.h): host C functions by
** name, encode/decode for C callers, and the whole module with its Lua layer
** built in (see docs/embedding.md). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mp.h"
#include "../include/multiprocessing.h"

/* ------------------------------------------------------------- registry */
/* Host C functions under stable dotted names ("Engine.Math.len"), for the
** whole process (every lua_State, every thread). The codec sends a registered
** function by its name and finds it by name where it arrives: a forked worker
** has the registry as it was when it was forked.
**
** Entries are appended, never moved nor removed, in chunks that are never
** freed: readers (the codec, in any thread, and in a child forked while a
** registration was under way) take no lock, they read `count` (acquire) and the
** entries below it. Writers take `wlock`, which pthread_atfork holds across
** fork(), so a child never inherits it held. */
#define NAMEMAX 255
#define CHUNK 64
#define MAXCHUNKS 1024   /* 65,536 names */

typedef struct entry {
  lua_CFunction f;
  unsigned char len;
  char name[NAMEMAX + 1];
} entry;

static entry *chunks[MAXCHUNKS];
static _Atomic size_t count;
static pthread_mutex_t wlock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void) { pthread_mutex_lock(&wlock); }
static void fork_after(void) { pthread_mutex_unlock(&wlock); }
static void install_atfork(void) { pthread_atfork(fork_prepare, fork_after, fork_after); }

static inline entry *at(size_t i) { return &chunks[i / CHUNK][i % CHUNK]; }

/* identifiers joined by dots: "len", "Engine.Math.len" */
static int valid_name(const char *s, size_t n) {
  if (n == 0 || n > NAMEMAX) return 0;
  int start = 1;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '.') {
      if (start) return 0;
      start = 1;
    } else if (c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (!start && c >= '0' && c <= '9')) {
      start = 0;
    } else {
      return 0;
    }
  }
  return !start;
}

LMP_API int lmp_register(const char *name, lua_CFunction f) {
  if (!name || !f || !valid_name(name, strlen(name))) { errno = EINVAL; return -1; }
  size_t len = strlen(name);
  pthread_once(&atfork_once, install_atfork);
  pthread_mutex_lock(&wlock);
  size_t n = atomic_load_explicit(&count, memory_order_relaxed);
  int rc = 0;
  for (size_t i = 0; i < n; i++) {
    entry *e = at(i);
    if (e->len == len && memcmp(e->name, name, len) == 0) {
      if (e->f != f) { errno = EEXIST; rc = -1; }
      goto done;
    }
  }
  if (n / CHUNK >= MAXCHUNKS) { errno = ENOSPC; rc = -1; goto done; }
  if (!chunks[n / CHUNK] && !(chunks[n / CHUNK] = calloc(CHUNK, sizeof(entry)))) { errno = ENOMEM; rc = -1; goto done; }
  entry *e = at(n);
  e->f = f;
  e->len = (unsigned char)len;
  memcpy(e->name, name, len + 1);
  atomic_store_explicit(&count, n + 1, memory_order_release);
done:
  pthread_mutex_unlock(&wlock);
  return rc;
}

LMP_API lua_CFunction lmp_registered(const char *name) {
  if (!name) return NULL;
  size_t len = strlen(name), n = atomic_load_explicit(&count, memory_order_acquire);
  for (size_t i = 0; i < n; i++) {
    entry *e = at(i);
    if (e->len == len && memcmp(e->name, name, len) == 0) return e->f;
  }
  return NULL;
}

/* For the codec: the registered name of the C function at idx (the first
** name it was registered under), or NULL. Only a C function without upvalues
** matches: a closure's upvalues would not travel with its name. */
const char *mp_host_name(lua_State *L, int idx, size_t *len) {
  size_t n = atomic_load_explicit(&count, memory_order_acquire);
  if (n == 0) return NULL;
  lua_CFunction f = lua_tocfunction(L, idx);
  if (!f) return NULL;
  if (lua_getupvalue(L, idx, 1)) { lua_pop(L, 1); return NULL; }
  for (size_t i = 0; i < n; i++) {
    entry *e = at(i);
    if (e->f == f) { *len = e->len; return e->name; }
  }
  return NULL;
}

/* For the codec, where a registered name arrives: its function, or NULL. */
lua_CFunction mp_host_find(const char *name, size_t len) {
  size_t n = atomic_load_explicit(&count, memory_order_acquire);
  for (size_t i = 0; i < n; i++) {
    entry *e = at(i);
    if (e->len == len && memcmp(e->name, name, len) == 0) return e->f;
  }
  return NULL;
}

/* For the codec's error when a C function has no name: where the host put it,
** as a dotted path from the globals ("Engine.Math.len", tables three levels
** deep at most), pushed; or nothing pushed and 0. Only on that error path. */
static int find_in(lua_State *L, int t, int fidx, int depth, int seen) {
  lua_pushnil(L);
  while (lua_next(L, t)) {
    if (lua_type(L, -2) == LUA_TSTRING) {
      if (lua_rawequal(L, -1, fidx)) {
        lua_pop(L, 1);
        return 1;  /* the key is left: the path's last name */
      }
      if (depth > 1 && lua_type(L, -1) == LUA_TTABLE) {
        lua_pushvalue(L, -1);
        if (lua_rawget(L, seen) == LUA_TNIL) {
          lua_pop(L, 1);
          lua_pushvalue(L, -1);
          lua_pushboolean(L, 1);
          lua_rawset(L, seen);
          if (find_in(L, lua_gettop(L), fidx, depth - 1, seen)) {  /* key, table, subpath */
            lua_pushliteral(L, ".");
            lua_insert(L, -2);
            lua_remove(L, -3);  /* key, ".", subpath */
            lua_concat(L, 3);
            return 1;
          }
        } else {
          lua_pop(L, 1);
        }
      }
    }
    lua_pop(L, 1);
  }
  return 0;
}

int mp_host_guess(lua_State *L, int idx) {
  if (!lua_checkstack(L, 30)) return 0;
  int fidx = lua_absindex(L, idx), top = lua_gettop(L);
  lua_newtable(L);
  int seen = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  lua_pushvalue(L, -1);
  lua_pushboolean(L, 1);
  lua_rawset(L, seen);
  if (find_in(L, seen + 1, fidx, 3, seen)) {
    lua_replace(L, top + 1);
    lua_settop(L, top + 1);
    return 1;
  }
  lua_settop(L, top);
  return 0;
}

/* ----------------------------------------------------- encode / decode */
/* The codec's state lives in the Lua state (set up by luaopen_multiprocessing_core). */
static void need_core(lua_State *L) {
  if (luaL_getmetatable(L, "multiprocessing.encoder") == LUA_TNIL) {
    lua_pop(L, 1);
    luaL_requiref(L, "multiprocessing.core", luaopen_multiprocessing_core, 0);
  }
  lua_pop(L, 1);
}

typedef struct encout { char *p; size_t n; } encout;

static int do_encode(lua_State *L) {
  encout *o = lua_touserdata(L, 1);
  need_core(L);
  mp_enc *e = mp_encode(L, 2, "value");
  size_t n = mp_enc_size(e);
  o->p = malloc(n ? n : 1);
  if (!o->p) { mp_enc_unsent(e); mp_enc_done(L, e); return luaL_error(L, "not enough memory"); }
  mp_enc_copy(e, o->p);
  o->n = n;
  mp_enc_done(L, e);  /* the bytes may be decoded any number of times: handles are pinned */
  return 0;
}

LMP_API char *lmp_encode(lua_State *L, int idx, size_t *len) {
  encout o = { NULL, 0 };
  idx = lua_absindex(L, idx);
  if (!lua_checkstack(L, 4)) {
    lua_pushliteral(L, "lmp_encode: stack overflow");
    return NULL;
  }
  lua_pushcfunction(L, do_encode);
  lua_pushlightuserdata(L, &o);
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
    free(o.p);
    return NULL;  /* the message is on the stack */
  }
  if (len) *len = o.n;
  return o.p;
}

static int do_decode(lua_State *L) {
  const char *s = lua_touserdata(L, 1);
  size_t n = (size_t)lua_tointeger(L, 2);
  int mode = (int)lua_tointeger(L, 3);
  need_core(L);
  lua_settop(L, 0);
  mp_decode_mode(L, s, n, mode);
  return 1;
}

static int decode_in(lua_State *L, const char *bytes, size_t len, int mode) {
  if (!lua_checkstack(L, 4)) {
    lua_pushliteral(L, "decode: stack overflow");
    return LUA_ERRRUN;
  }
  if (!bytes || len > (size_t)LUA_MAXINTEGER) {
    lua_pushliteral(L, "decode: no bytes");
    return LUA_ERRRUN;
  }
  lua_pushcfunction(L, do_decode);
  lua_pushlightuserdata(L, (void *)bytes);
  lua_pushinteger(L, (lua_Integer)len);
  lua_pushinteger(L, mode);
  return lua_pcall(L, 3, 1, 0);
}

LMP_API int lmp_decode(lua_State *L, const char *bytes, size_t len) {
  return decode_in(L, bytes, len, MP_DECODE_ALL);
}

LMP_API int lmp_decode_data(lua_State *L, const char *bytes, size_t len) {
  return decode_in(L, bytes, len, MP_DECODE_DATA);
}

/* ------------------------------------------------------ the whole module */
/* build/lua_layer.c, generated from lua/multiprocessing/ by scripts/lua_layer.lua
** (weak: a build without it, such as the rock's, loads the layer from files).
** Each file comes as its source and, when the library was built with the same
** Lua release as the lua5.4 that compiled it, as bytecode (with all its debug
** information) less its chunk name: parsing the
** layer costs milliseconds, loading its bytecode a fifth of that. */
typedef struct mp_lua_file {
  const char *module, *chunkname, *source;
  size_t size;
  const char *code;             /* the bytecode less its chunk name, or NULL */
  size_t code_size, name_at;    /* the name goes before code[name_at] */
} mp_lua_file;
extern const mp_lua_file mp_lua_layer[] __attribute__((weak));

/* lua_load's reader of a file's bytecode with a chunk name put in: the bytes
** before the name, the name as lundump reads a string (its size + 1, 7 bits a
** byte, most significant first, the last byte marked with 0x80), the rest */
typedef struct code_reader {
  const mp_lua_file *f;
  const char *name;
  size_t namelen, lenn;
  int part;
  unsigned char len[16];
} code_reader;

static const char *code_read(lua_State *L, void *ud, size_t *size) {
  code_reader *r = ud;
  switch (r->part++) {
    case 0: *size = r->f->name_at; return r->f->code;
    case 1: *size = r->lenn; return (const char *)r->len;
    case 2: *size = r->namelen; return r->name;
    case 3: *size = r->f->code_size - r->f->name_at; return r->f->code + r->f->name_at;
    default: *size = 0; return NULL;
  }
}

/* pushes file f's main function, named chunkname ("@path", as luaL_loadfile
** names it); its bytecode when this Lua takes it (*bytecode set), else its source */
static int load_layer_file(lua_State *L, const mp_lua_file *f, const char *chunkname, int *bytecode) {
  if (bytecode) *bytecode = 0;
  if (f->code) {
    code_reader r = { f, chunkname, strlen(chunkname), 0, 0, { 0 } };
    unsigned char tmp[16];
    size_t n = 0, x = r.namelen + 1;
    do { tmp[n++] = x & 0x7f; x >>= 7; } while (x);
    for (size_t i = 0; i < n; i++) r.len[i] = tmp[n - 1 - i];
    r.len[n - 1] |= 0x80;
    r.lenn = n;
    if (lua_load(L, code_read, &r, chunkname, "b") == LUA_OK) {
      if (bytecode) *bytecode = 1;
      return LUA_OK;
    }
    lua_pop(L, 1);  /* another build of Lua 5.4 refused it */
  }
  return luaL_loadbufferx(L, f->source, f->size, chunkname, "t");
}

static int load_file(lua_State *L) {
  const mp_lua_file *f = lua_touserdata(L, lua_upvalueindex(1));
  if (load_layer_file(L, f, f->chunkname, NULL) != LUA_OK) return lua_error(L);
  lua_pushstring(L, f->module);
  lua_pushliteral(L, ":preload:");
  lua_call(L, 2, 1);
  return 1;
}

/* Whether the file open on fd holds exactly f's source (read a piece at a
** time: no buffer the size of the file) */
static int same_source(int fd, const mp_lua_file *f) {
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != f->size) return 0;
  char buf[8192];
  size_t at = 0;
  for (;;) {
    ssize_t k = read(fd, buf, sizeof buf);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) return 0;
    if (k == 0) return at == f->size;
    if ((size_t)k > f->size - at || memcmp(buf, f->source + at, (size_t)k) != 0) return 0;  /* (it grew meanwhile) */
    at += (size_t)k;
  }
}

/* A searcher of package.searchers, put before Lua's own by the layer's
** init.lua: for a module of the layer, the file Lua's searcher would load (the
** first readable one along package.path); when that file's bytes are the ones
** built in, their bytecode, named after the file as Lua's searcher names it,
** and the file's name (what Lua's searcher returns). Otherwise nothing, and
** Lua's searcher loads the file: an edited source wins over the library. */
static int layer_searcher(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  const mp_lua_file *f = mp_lua_layer;
  while (f && f->module && strcmp(f->module, name) != 0) f++;
  if (!f || !f->module || !f->code) return 0;
  if (lua_getfield(L, lua_upvalueindex(1), "path") != LUA_TSTRING) return 0;
  const char *path = lua_tostring(L, -1);
  char file[PATH_MAX];
  while (*path) {
    const char *end = strchr(path, *LUA_PATH_SEP);
    size_t tn = end ? (size_t)(end - path) : strlen(path), n = 0;
    int fit = 1;
    for (size_t i = 0; i < tn && fit; i++) {  /* the template, each "?" the name, its dots "/" */
      if (path[i] == *LUA_PATH_MARK) {
        for (const char *c = name; *c && fit; c++) {
          if (n + 1 >= sizeof file) fit = 0;
          else file[n++] = *c == '.' ? *LUA_DIRSEP : *c;
        }
      } else if (n + 1 >= sizeof file) {
        fit = 0;
      } else {
        file[n++] = path[i];
      }
    }
    path += tn + (end != NULL);
    if (!fit || n == 0) continue;
    file[n] = '\0';
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;  /* not readable: Lua's searcher goes on too */
    int same = same_source(fd, f);
    close(fd);
    if (!same) return 0;
    lua_pushfstring(L, "@%s", file);
    if (load_layer_file(L, f, lua_tostring(L, -1), NULL) != LUA_OK) return 0;
    lua_pushstring(L, file);
    return 2;
  }
  return 0;
}

/* core._layer_searcher(package): puts layer_searcher in package.searchers,
** after the preload searcher, once; a library without the layer's bytecode
** does nothing */
static int layer_searcher_install(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (!mp_lua_layer || !mp_lua_layer[0].module || !mp_lua_layer[0].code) return 0;
  if (lua_getfield(L, 1, "searchers") != LUA_TTABLE) return 0;
  lua_Integer n = (lua_Integer)lua_rawlen(L, 2);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, 2, i);
    int ours = lua_tocfunction(L, -1) == layer_searcher;
    lua_pop(L, 1);
    if (ours) return 0;
  }
  lua_Integer at = n >= 1 ? 2 : 1;
  for (lua_Integer i = n; i >= at; i--) {
    lua_rawgeti(L, 2, i);
    lua_rawseti(L, 2, i + 1);
  }
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, layer_searcher, 1);
  lua_rawseti(L, 2, at);
  return 0;
}

/* core._layer_init(name, path) -> function, init_path, bytecode: for
** lua/multiprocessing.lua, which `require "multiprocessing"` finds before
** multiprocessing/init.lua (path: ".../multiprocessing.lua"): that init.lua loaded
** (not run), from its bytecode when it is byte for byte the one built in, else
** from its source, its name, and whether it came from the bytecode */
static int layer_init(lua_State *L) {
  size_t n;
  const char *path = luaL_checklstring(L, 2, &n);
  luaL_argcheck(L, n > 4 && strcmp(path + n - 4, ".lua") == 0, 2, "the path of multiprocessing.lua expected");
  lua_pushlstring(L, path, n - 4);
  lua_pushliteral(L, LUA_DIRSEP "init.lua");
  lua_concat(L, 2);
  const char *file = lua_tostring(L, -1);
  const mp_lua_file *f = mp_lua_layer;
  while (f && f->module && strcmp(f->module, "multiprocessing") != 0) f++;
  int fd = f && f->module && f->code ? open(file, O_RDONLY | O_CLOEXEC) : -1;
  int same = fd >= 0 && same_source(fd, f);
  if (fd >= 0) close(fd);
  int st, bytecode = 0;
  if (same) {
    lua_pushfstring(L, "@%s", file);
    st = load_layer_file(L, f, lua_tostring(L, -1), &bytecode);
    lua_remove(L, -2);
  } else {
    st = luaL_loadfilex(L, file, NULL);
  }
  if (st != LUA_OK)  /* as require says it */
    return luaL_error(L, "error loading module '%s' from file '%s':\n\t%s", luaL_checkstring(L, 1), file, lua_tostring(L, -1));
  lua_insert(L, -2);
  lua_pushboolean(L, bytecode);
  return 3;
}

int mp_layer_open(lua_State *L) {
  lua_pushcfunction(L, layer_searcher_install);
  lua_setfield(L, -2, "_layer_searcher");
  lua_pushcfunction(L, layer_init);
  lua_setfield(L, -2, "_layer_init");
  return 0;
}

int mp_layer_builtin(void) { return mp_lua_layer != NULL && mp_lua_layer[0].module != NULL; }

LMP_API int luaopen_multiprocessing(lua_State *L) {
  luaL_checkversion(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  if (lua_getfield(L, -1, "multiprocessing.core") == LUA_TNIL) {
    lua_pushcfunction(L, luaopen_multiprocessing_core);
    lua_setfield(L, -3, "multiprocessing.core");
  }
  lua_pop(L, 1);
  const mp_lua_file *top = NULL;
  for (const mp_lua_file *f = mp_lua_layer; f && f->module; f++) {
    if (strcmp(f->module, "multiprocessing") == 0) { top = f; continue; }
    lua_pushlightuserdata(L, (void *)f);
    lua_pushcclosure(L, load_file, 1);
    lua_setfield(L, -2, f->module);
  }
  lua_pop(L, 1);
  if (top) {  /* run init.lua, as require would */
    lua_pushlightuserdata(L, (void *)top);
    lua_pushcclosure(L, load_file, 1);
    lua_call(L, 0, 1);
    return 1;
  }
  /* no built-in layer: the files on package.path */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "multiprocessing");
  lua_call(L, 1, 1);
  return 1;
}
