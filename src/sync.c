/* sync.c: placeholder until this part is written. */
#include "mp.h"

int mp_sync_open(lua_State *L) {
  (void)L;
  return 0;
}
