/* pipe.c: placeholder until this part is written. */
#include "mp.h"

int mp_pipe_open(lua_State *L) {
  (void)L;
  return 0;
}
