/* pool.c: placeholder until this part is written. */
#include "mp.h"

int mp_pool_open(lua_State *L) {
  (void)L;
  return 0;
}
