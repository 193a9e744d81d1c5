/* queue.c: placeholder until this part is written. */
#include "mp.h"

int mp_queue_open(lua_State *L) {
  (void)L;
  return 0;
}
