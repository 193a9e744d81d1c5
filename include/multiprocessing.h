/* multiprocessing.h: the public C API of lua-multiprocessing, for hosts that
** embed Lua. Every public symbol is luaopen_multiprocessing* or starts with
** lmp_; everything else in the library is hidden. See docs/embedding.md.
**
** Link: pkg-config --cflags --libs multiprocessing (the static library
** libmultiprocessing.a, with liblua5.4, libhiredis, libcrypto, pthreads). */
#ifndef LUA_MULTIPROCESSING_H
#define LUA_MULTIPROCESSING_H

#include <stddef.h>
#include "lua.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LMP_API __attribute__((visibility("default")))

/* require "multiprocessing.core": the C core alone */
LMP_API int luaopen_multiprocessing_core(lua_State *L);

/* The whole module, its Lua layer built into the library: no .lua file is
** read. Registers every part of the module in package.preload (so that
** require "multiprocessing.pool" and the others work too, and take precedence
** over files on package.path) and returns the module table, as
** require "multiprocessing" does. Needs the package library (luaL_openlibs).
** Use it as luaL_requiref(L, "multiprocessing", luaopen_multiprocessing, 0). */
LMP_API int luaopen_multiprocessing(lua_State *L);

/* Registers a host C function under a stable dotted name ("Engine.Math.len":
** identifiers joined by dots, at most 255 bytes), for the whole process. A task
** may then hold the function (in an upvalue, a global, a table: anywhere the
** codec sends values): it travels as its name and arrives as the worker's own
** registered function. Workers see what was registered before they started
** (fork copies the registry): register at start-up, before the first Pool or
** Process. Only a C function without upvalues travels by name.
** Thread-safe. Registering the same function under the same name again does
** nothing; one function may have several names (it travels as the first).
** Returns 0, or -1 with errno: EINVAL (bad name, NULL function), EEXIST (the
** name is taken by another function), ENOMEM/ENOSPC. */
LMP_API int lmp_register(const char *name, lua_CFunction f);

/* The function registered under name, or NULL. Thread-safe, lock-free. */
LMP_API lua_CFunction lmp_registered(const char *name);

/* Encodes the value at idx with the library's codec (as mp.encode). Returns a
** buffer of *len bytes that the caller owns and releases with free(); the
** stack is unchanged. When the value cannot be sent (a coroutine, an
** unregistered C function...) or memory runs out, returns NULL and pushes the
** error message. Never raises. The bytes may be decoded any number of times,
** in this process or its workers (functions and handles included), until the
** program ends; a Lua function's bytes are refused by other programs. */
LMP_API char *lmp_encode(lua_State *L, int idx, size_t *len);

/* Decodes len bytes made by lmp_encode (or mp.encode) of this program and
** pushes the value: returns LUA_OK. On malformed bytes, a function that is not
** available here or no memory, pushes the error message and returns
** LUA_ERRRUN or LUA_ERRMEM. Never raises; always pushes one value. The bytes
** stay the caller's (they are not kept). */
LMP_API int lmp_decode(lua_State *L, const char *bytes, size_t len);

/* Same, for bytes from anywhere (a file, the network): plain data only (nil,
** booleans, numbers, strings, tables); functions, modules, handles and
** metatables are refused with an error, nothing is required or loaded. */
LMP_API int lmp_decode_data(lua_State *L, const char *bytes, size_t len);

/* Starts the forkserver now, before the host starts threads or grows its
** heap; later Pools and Processes made with the "forkserver" start method are
** forked from it. 0 on success, -1 with errno set. */
LMP_API int lmp_forkserver_start(void);

/* Async-signal-safe and thread-safe: every blocking call of the library in
** this process returns as at Ctrl-C ("interrupted!"), as lua.c's SIGINT hook
** does for the interpreter. For hosts without lua.c's hook. */
LMP_API void lmp_interrupt(void);

#ifdef __cplusplus
}
#endif
#endif
