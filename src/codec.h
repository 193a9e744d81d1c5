/* codec.h: the codec's wire format (docs/codec.md), written down once: codec.c
** encodes and decodes it; queue.c's small-value path (put and get of nil,
** booleans, numbers and short strings) writes and reads its shortest forms. */
#ifndef MP_CODEC_H
#define MP_CODEC_H

#define FORMAT 0xB3   /* first byte of every encoding (the format version) */
#define FORMAT_B2 0xB2  /* the previous version: the same less T_INTS and T_FLOATS, still decoded */
enum {
  T_NIL, T_FALSE, T_TRUE, T_INT8, T_INT16, T_INT32, T_INT64, T_FLOAT,
  T_STR8, T_STR32, T_STR64,
  T_TABLE,     /* u32 narr, u32 npairs, narr values, npairs key/value */
  T_TABLE_MT,  /* same, then the metatable value */
  T_REF,       /* u32 ordinal of a table or Lua function seen before */
  T_LFUNC,     /* u32 dump size, dump, u64 checksum of the dump, u8 nups,
                  per upvalue: 0 value | 1 u32 function ordinal, u8 upvalue number
                  | 2 u32 environment number (0: a new one), u32 npairs, npairs
                  (str8 name, value): the globals sent with it (see UP_ENV) */
  T_CFUNC,     /* str8 module name, str8 field name; module "": field is an lmp_register name */
  T_MODULE,    /* str8 module name */
  T_GLOBALS,   /* the receiver's global table */
  T_NAMEDMT,   /* str8 name given to register_metatable */
  T_HANDLE,    /* str8 type name, u8 payload size, payload */
  T_INTS,      /* a table of integers at 1..n only: u32 n, u8 width (1, 2, 4, 8), n integers */
  T_FLOATS,    /* a table of floats at 1..n only: u32 n, n doubles */
  T_LIMIT
};
/* Tables and Lua functions get ordinals 1, 2... in the order they start. The
** encoder sets SHARED on the tag of those that are referenced again (by T_REF
** or by a shared upvalue), so that the decoder remembers only those. */
#define SHARED 0x80

/* How an upvalue travels (after T_LFUNC). UP_ENV is an _ENV that is the
** sender's globals (or an environment made by a decoder, see env_newindex): it
** arrives as an environment that reads the globals sent with the function first
** and the receiver's globals after, and writes to the receiver's globals. The
** functions of one message that share an environment on the sender share one on
** arrival: environments are numbered in order of their first use, and the next
** functions name theirs by number, adding the names not sent yet. */
enum { UP_VALUE, UP_SHARED, UP_ENV };

#endif
