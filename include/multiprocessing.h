/* multiprocessing.h: the public C API of lua-multiprocessing, for hosts that
** embed Lua. Every public symbol is luaopen_multiprocessing* or starts with
** lmp_; everything else in the library is hidden. See docs/embedding.md. */
#ifndef LUA_MULTIPROCESSING_H
#define LUA_MULTIPROCESSING_H

#include "lua.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LMP_API __attribute__((visibility("default")))

/* require "multiprocessing.core": the C core alone */
LMP_API int luaopen_multiprocessing_core(lua_State *L);

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
