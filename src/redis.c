/* redis.c: a blocking Redis connection (hiredis), and the key file that signs what crosses it.
**
** core.redis_connect(host, port, timeout [, unix_path]) -> Redis, or nil, message
**   r:call(arg...)       one command; its reply as Lua values (see push_reply), or nil, message
**   r:pipeline(cmds)     many commands, sent at once: { reply1, reply2, ... } (an error reply is
**                        { err = text } in its place), or nil, message on a connection fault
**   r:send(arg...)       a command sent without waiting for its reply; r:replies() -> the
**                        replies of the sent commands, in order (other calls read them first)
**   r:settimeout(s)      the longest a command may wait for its reply (seconds)
**   r:close()            also __gc and __close
**   r:entries(signer, ctx, arg...)  a command that answers stream entries (XREAD,
**                        XREADGROUP: one stream; XCLAIM): { id, m, id, m, ..., n = 2k }, where m
**                        is the entry's message if its signature is right, else false (the
**                        signature is checked here, before Lua sees a byte); false for a nil
**                        reply (a blocking read that timed out)
** core.read_key_file(path) -> the shared key.
** core.signer(key) -> Signer: s:sign(ctx, m) -> HMAC-SHA256(key, ctx .. "\n" .. m), 32 bytes;
**   s:verify(ctx, m, sig) -> boolean, in a time that depends on the lengths only. One keyed
**   OpenSSL context, made once and reset per message (no algorithm fetch, no key schedule,
**   no copy of m). (core.hmac_sha256 and core.compare_digest are socket.c's, and agree.)
** core.stream_frame(header, t [, i0, n]) -> a frame: u32 size, the header's codec bytes,
**   u32 size, the codec bytes of t (or of the array t[i0 .. i0+n-1], not copied first); or
**   nil, "handle" when a shared object's handle was met (it cannot cross machines).
** core.stream_unframe(m [, pos]) -> header, payload, the position after the frame (nil
**   past the last frame): decoded as signed bytes (mp.decode(s, "signed")); raises on
**   malformed bytes. The frames of a message are the only layout of stream.lua's messages.
**
** A connection fault (refused, reset, timed out) closes the connection: every later call
** answers nil, "closed". Replies: status and bulk strings are strings, integers are integers,
** a nil bulk is false (so that an array keeps its length), arrays and maps are tables with n. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>

#include <openssl/core_names.h>
#include <unistd.h>

#include "dynlib.h"

/* hiredis and libcrypto, opened by the first redis_connect and signer (dynlib.h): every
** Redis and Signer object was made after, so their methods call through these tables */
#define HI mp_libhiredis
#define CR mp_libcrypto

#define REDIS_CLASS "multiprocessing.Redis"
#define SIGNER_CLASS "multiprocessing.Signer"
#define SIGLEN 32
#define MAXARGS 4096
#define MAXDEPTH 16

typedef struct mp_redis {
  redisContext *c;
  pid_t owner;   /* a forked copy never uses (or closes) its parent's socket */
  int pending;   /* commands sent by r:send whose replies were not read yet */
} mp_redis;

typedef struct mp_signer mp_signer;  /* a keyed HMAC-SHA256 (below) */
static mp_signer *tosigner(lua_State *L, int idx);
static int mac(mp_signer *s, const char *c, size_t cn, const char *m, size_t mn, unsigned char *md);

static mp_redis *toredis(lua_State *L) {
  mp_redis *r = luaL_checkudata(L, 1, REDIS_CLASS);
  if (!r->c) luaL_error(L, "attempt to use a closed Redis connection");
  if (r->owner != getpid()) luaL_error(L, "a Redis connection can only be used by the process that made it");
  return r;
}

static struct timeval to_tv(double s) {
  struct timeval tv;
  if (s < 0) s = 0;
  tv.tv_sec = (time_t)s;
  tv.tv_usec = (suseconds_t)((s - (double)tv.tv_sec) * 1e6);
  return tv;
}

static int redis_connect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  lua_Integer port = luaL_checkinteger(L, 2);
  double t = luaL_optnumber(L, 3, 5.0);
  luaL_argcheck(L, port > 0 && port < 65536, 2, "port out of range");
  luaL_argcheck(L, t > 0 && t == t, 3, "timeout must be a positive number");
  mp_hiredis(L, "Redis connection");
  mp_redis *r = lua_newuserdatauv(L, sizeof *r, 1);
  r->c = NULL;
  r->pending = 0;
  lua_newtable(L);
  lua_setiuservalue(L, -2, 1);  /* replies of sent commands, read but not yet taken */
  r->owner = getpid();
  luaL_setmetatable(L, REDIS_CLASS);
  struct timeval tv = to_tv(t);
  redisContext *c = lua_isstring(L, 4) ? HI.redisConnectUnixWithTimeout(lua_tostring(L, 4), tv)
                                       : HI.redisConnectWithTimeout(host, (int)port, tv);
  if (!c) { lua_pushnil(L); lua_pushliteral(L, "cannot allocate a Redis context"); return 2; }
  if (c->err) {
    lua_pushnil(L);
    lua_pushfstring(L, "cannot connect to %s:%d: %s", host, (int)port, c->errstr);
    HI.redisFree(c);
    return 2;
  }
  HI.redisSetTimeout(c, tv);
  r->c = c;
  return 1;
}

static void push_reply(lua_State *L, redisReply *y, int depth) {
  luaL_checkstack(L, 4, "Redis reply too deep");
  switch (y->type) {
    case REDIS_REPLY_STRING: case REDIS_REPLY_STATUS:
      lua_pushlstring(L, y->str, y->len); break;
    case REDIS_REPLY_INTEGER: lua_pushinteger(L, (lua_Integer)y->integer); break;
    case REDIS_REPLY_NIL: lua_pushboolean(L, 0); break;
    case REDIS_REPLY_ERROR:
      lua_createtable(L, 0, 1);
      lua_pushlstring(L, y->str, y->len);
      lua_setfield(L, -2, "err");
      break;
    case REDIS_REPLY_ARRAY:  /* RESP2: hiredis 0.14 (Debian 12) has no RESP3 types */
      if (depth >= MAXDEPTH) { lua_pushboolean(L, 0); break; }
      lua_createtable(L, (int)y->elements, 1);
      for (size_t i = 0; i < y->elements; i++) {
        push_reply(L, y->element[i], depth + 1);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
      }
      lua_pushinteger(L, (lua_Integer)y->elements);
      lua_setfield(L, -2, "n");
      break;
    default: lua_pushboolean(L, 0);
  }
}

/* the fault that ended the connection: it is closed, and the caller gets nil, message */
static int conn_fault(lua_State *L, mp_redis *r) {
  const char *why = (r->c->err == REDIS_ERR_IO && (errno == EAGAIN || errno == ETIMEDOUT))
                        ? "timed out waiting for Redis" : r->c->errstr[0] ? r->c->errstr : "connection lost";
  lua_pushnil(L);
  lua_pushstring(L, why);
  HI.redisFree(r->c);
  r->c = NULL;
  return 2;
}

/* argv from the stack (slots from..to) or from the table at idx (items from..to). The
** strings stay referenced by the stack or the table while the command is sent; a number on
** the stack becomes a string in place, the pipeline turns a table's numbers first. */
static int collect(lua_State *L, int idx, int from, int to, const char **argv, size_t *lens, int table) {
  int n = 0;
  for (int i = from; i <= to; i++) {
    if (n >= MAXARGS) return luaL_error(L, "too many arguments for one Redis command");
    if (table) lua_rawgeti(L, idx, i);
    int at = table ? -1 : i;
    int t = lua_type(L, at);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      return luaL_error(L, "bad Redis argument #%d (string or number expected, got %s)", i, luaL_typename(L, at));
    argv[n] = lua_tolstring(L, at, &lens[n]);
    if (table) lua_pop(L, 1);
    n++;
  }
  return n;
}

/* argv and lengths for n arguments: the caller's arrays (on the C stack) when they hold
** SMALLARGS, else a userdata pushed on the stack (no static buffer: two Lua states on two
** host threads may send at once) */
#define SMALLARGS 16
static int argbuf(lua_State *L, int n, const char ***argv, size_t **lens) {
  if (n > MAXARGS) return luaL_error(L, "too many arguments for one Redis command");
  if (n <= SMALLARGS && *argv) return n;
  void *b = lua_newuserdatauv(L, (size_t)n * (sizeof(char *) + sizeof(size_t)), 0);
  *argv = b;
  *lens = (size_t *)((char *)b + (size_t)n * sizeof(char *));
  return n;
}

/* reads the replies of the commands r:send sent into the user value (the userdata at
** index 1): a command's reply must not be taken for an earlier one's. 0 on a fault. */
static int drain(lua_State *L, mp_redis *r) {
  if (!r->pending) return 1;
  lua_getiuservalue(L, 1, 1);
  lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
  while (r->pending > 0) {
    void *v = NULL;
    if (HI.redisGetReply(r->c, &v) != REDIS_OK || !v) { lua_pop(L, 1); return 0; }
    r->pending--;
    push_reply(L, v, 0);
    HI.freeReplyObject(v);
    lua_rawseti(L, -2, ++n);
  }
  lua_pop(L, 1);
  return 1;
}

/* appends one command and writes it out without waiting for its reply (read
** later by r:replies or the next call): true */
static int send_argv(lua_State *L, mp_redis *r, int n, const char **argv, const size_t *lens) {
  if (HI.redisAppendCommandArgv(r->c, n, argv, lens) != REDIS_OK) return conn_fault(L, r);
  int done = 0;
  do {
    if (HI.redisBufferWrite(r->c, &done) != REDIS_OK) return conn_fault(L, r);
  } while (!done);
  r->pending++;
  lua_pushboolean(L, 1);
  return 1;
}

/* r:send(arg...): one command sent without waiting for its reply (r:replies() gives the
** replies later, in order; any other call reads them first) */
static int redis_send(lua_State *L) {
  mp_redis *r = toredis(L);
  int top = lua_gettop(L);
  luaL_argcheck(L, top >= 2, 2, "a command expected");
  const char *av[SMALLARGS], **argv = av;
  size_t lv[SMALLARGS], *lens = lv;
  argbuf(L, top - 1, &argv, &lens);
  int n = collect(L, 0, 2, top, argv, lens, 0);
  return send_argv(L, r, n, argv, lens);
}


/* r:send_entry(signer, stream, m): XADD stream * m <m> s <signature of m>, sent without
** waiting for its reply (as r:send) */
static int redis_send_entry(lua_State *L) {
  mp_redis *r = toredis(L);
  mp_signer *s = tosigner(L, 2);
  size_t cn, mn;
  const char *c = luaL_checklstring(L, 3, &cn), *m = luaL_checklstring(L, 4, &mn);
  unsigned char md[SIGLEN];
  if (!mac(s, c, cn, m, mn, md)) return luaL_error(L, "HMAC-SHA256 failed (OpenSSL)");
  const char *argv[] = { "XADD", c, "*", "m", m, "s", (const char *)md };
  size_t lens[] = { 4, cn, 1, 1, mn, 1, SIGLEN };
  return send_argv(L, r, 7, argv, lens);
}

/* r:replies() -> the replies of the commands sent with r:send, in order (a list) */
static int redis_replies(lua_State *L) {
  mp_redis *r = toredis(L);
  lua_settop(L, 1);
  if (!drain(L, r)) return conn_fault(L, r);
  lua_getiuservalue(L, 1, 1);
  lua_newtable(L);
  lua_setiuservalue(L, 1, 1);
  return 1;
}

static int redis_call(lua_State *L) {
  mp_redis *r = toredis(L);
  if (!drain(L, r)) return conn_fault(L, r);
  int top = lua_gettop(L);
  luaL_argcheck(L, top >= 2, 2, "a command expected");
  const char *av[SMALLARGS], **argv = av;
  size_t lv[SMALLARGS], *lens = lv;
  argbuf(L, top - 1, &argv, &lens);
  int n = collect(L, 0, 2, top, argv, lens, 0);
  redisReply *y = HI.redisCommandArgv(r->c, n, argv, lens);
  if (!y) return conn_fault(L, r);
  if (y->type == REDIS_REPLY_ERROR) {
    lua_pushnil(L);
    lua_pushlstring(L, y->str, y->len);
    HI.freeReplyObject(y);
    return 2;
  }
  push_reply(L, y, 0);
  HI.freeReplyObject(y);
  return 1;
}

/* r:pipeline({ {cmd...}, {cmd...} }) */
static int redis_pipeline(lua_State *L) {
  mp_redis *r = toredis(L);
  if (!drain(L, r)) return conn_fault(L, r);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer ncmd = luaL_len(L, 2);
  for (lua_Integer k = 1; k <= ncmd; k++) {
    if (lua_rawgeti(L, 2, k) != LUA_TTABLE) return luaL_error(L, "bad Redis command #%d in pipeline (table expected)", (int)k);
    int cmd = lua_gettop(L);
    lua_Integer len = luaL_len(L, cmd);
    if (len < 1 || len > MAXARGS) return luaL_error(L, "bad Redis command #%d in pipeline (1 to %d arguments)", (int)k, MAXARGS);
    /* numbers are turned into strings in the table itself, so the pointers stay valid */
    for (lua_Integer i = 1; i <= len; i++) {
      int t = lua_rawgeti(L, cmd, i);
      if (t == LUA_TNUMBER) { lua_tostring(L, -1); lua_rawseti(L, cmd, i); }
      else if (t != LUA_TSTRING) return luaL_error(L, "bad Redis argument #%d of command #%d (string or number expected, got %s)", (int)i, (int)k, luaL_typename(L, -1));
      else lua_pop(L, 1);
    }
    const char *av[SMALLARGS], **argv = av;
    size_t lv[SMALLARGS], *lens = lv;
    int top = lua_gettop(L);
    argbuf(L, (int)len, &argv, &lens);
    int n = collect(L, cmd, 1, (int)len, argv, lens, 1);
    if (HI.redisAppendCommandArgv(r->c, n, argv, lens) != REDIS_OK) return conn_fault(L, r);
    lua_settop(L, top - 1);  /* the buffer, if any, and the command */
  }
  lua_createtable(L, (int)ncmd, 1);
  for (lua_Integer k = 1; k <= ncmd; k++) {
    void *v = NULL;
    if (HI.redisGetReply(r->c, &v) != REDIS_OK || !v) return conn_fault(L, r);
    push_reply(L, v, 0);
    HI.freeReplyObject(v);
    lua_rawseti(L, -2, k);
  }
  lua_pushinteger(L, ncmd);
  lua_setfield(L, -2, "n");
  return 1;
}

static int redis_settimeout(lua_State *L) {
  mp_redis *r = toredis(L);
  double t = luaL_checknumber(L, 2);
  luaL_argcheck(L, t > 0 && t == t, 2, "timeout must be a positive number");
  if (HI.redisSetTimeout(r->c, to_tv(t)) != REDIS_OK) return conn_fault(L, r);
  lua_settop(L, 1);
  return 1;
}

static int redis_close(lua_State *L) {
  mp_redis *r = luaL_checkudata(L, 1, REDIS_CLASS);
  if (r->c) {
    if (r->owner == getpid()) HI.redisFree(r->c);
    /* a forked copy lets the parent's socket be: its descriptor is closed, the context's
    ** memory is the copy's own and small; nothing is written to the peer */
    else { close(r->c->fd); r->c->fd = -1; HI.redisFree(r->c); }
    r->c = NULL;
  }
  return 0;
}

static int redis_tostring(lua_State *L) {
  mp_redis *r = luaL_checkudata(L, 1, REDIS_CLASS);
  if (!r->c) lua_pushliteral(L, "Redis (closed)");
  else lua_pushfstring(L, "Redis (%s:%d)", r->c->tcp.host ? r->c->tcp.host : "unix", r->c->tcp.port);
  return 1;
}


/* ------------------------------------------------------------ signing */

struct mp_signer {
  EVP_MAC_CTX *ctx;  /* keyed once; EVP_MAC_init(ctx, NULL...) resets it for each message */
};

static EVP_MAC *hmac_alg;  /* fetched once per process */

static mp_signer *tosigner(lua_State *L, int idx) {
  mp_signer *s = luaL_checkudata(L, idx, SIGNER_CLASS);
  if (!s->ctx) luaL_error(L, "attempt to use a closed Signer");
  return s;
}

static int signer_new(lua_State *L) {
  size_t kn;
  const char *k = luaL_checklstring(L, 1, &kn);
  luaL_argcheck(L, kn >= 32, 1, "a key of at least 32 bytes expected");
  mp_crypto(L, "Signer");
  mp_signer *s = lua_newuserdatauv(L, sizeof *s, 0);
  s->ctx = NULL;
  luaL_setmetatable(L, SIGNER_CLASS);
  if (!hmac_alg && !(hmac_alg = CR.EVP_MAC_fetch(NULL, "HMAC", NULL)))
    return luaL_error(L, "HMAC is not available (OpenSSL)");
  if (!(s->ctx = CR.EVP_MAC_CTX_new(hmac_alg))) return luaL_error(L, "out of memory (OpenSSL)");
  OSSL_PARAM params[] = {
    CR.OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0), CR.OSSL_PARAM_construct_end()};
  if (!CR.EVP_MAC_init(s->ctx, (const unsigned char *)k, kn, params))
    return luaL_error(L, "HMAC-SHA256 cannot take the key (OpenSSL)");
  return 1;
}

/* HMAC-SHA256(key, ctx .. "\n" .. m) into md; 0 on an OpenSSL failure */
static int mac(mp_signer *s, const char *c, size_t cn, const char *m, size_t mn, unsigned char *md) {
  size_t out = 0;
  return CR.EVP_MAC_init(s->ctx, NULL, 0, NULL) && CR.EVP_MAC_update(s->ctx, (const unsigned char *)c, cn) &&
         CR.EVP_MAC_update(s->ctx, (const unsigned char *)"\n", 1) &&
         CR.EVP_MAC_update(s->ctx, (const unsigned char *)m, mn) && CR.EVP_MAC_final(s->ctx, md, &out, SIGLEN) &&
         out == SIGLEN;
}

static int signer_sign(lua_State *L) {
  mp_signer *s = tosigner(L, 1);
  size_t cn, mn;
  const char *c = luaL_checklstring(L, 2, &cn), *m = luaL_checklstring(L, 3, &mn);
  unsigned char md[SIGLEN];
  if (!mac(s, c, cn, m, mn, md)) return luaL_error(L, "HMAC-SHA256 failed (OpenSSL)");
  lua_pushlstring(L, (const char *)md, SIGLEN);
  return 1;
}

static int good_sig(mp_signer *s, const char *c, size_t cn, const char *m, size_t mn, const char *sig, size_t sn) {
  unsigned char md[SIGLEN];
  if (!mac(s, c, cn, m, mn, md)) return 0;
  return sn == SIGLEN && CR.CRYPTO_memcmp(md, sig, SIGLEN) == 0;
}

static int signer_verify(lua_State *L) {
  mp_signer *s = tosigner(L, 1);
  size_t cn, mn, sn;
  const char *c = luaL_checklstring(L, 2, &cn), *m = luaL_checklstring(L, 3, &mn);
  const char *sig = luaL_checklstring(L, 4, &sn);
  lua_pushboolean(L, good_sig(s, c, cn, m, mn, sig, sn));
  return 1;
}

static int signer_close(lua_State *L) {
  mp_signer *s = luaL_checkudata(L, 1, SIGNER_CLASS);
  if (s->ctx) { CR.EVP_MAC_CTX_free(s->ctx); s->ctx = NULL; }
  return 0;
}

/* ------------------------------------------------------------ stream entries */

/* pushes the message of entry e ([id, [field, value, ...]]) if its "s" signs its "m" under
** ctx, else false; pushes its id first (false for a malformed entry) */
static void push_entry(lua_State *L, mp_signer *s, const char *c, size_t cn, redisReply *e) {
  if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 || e->element[0]->type != REDIS_REPLY_STRING) {
    lua_pushboolean(L, 0);
    lua_pushboolean(L, 0);
    return;
  }
  lua_pushlstring(L, e->element[0]->str, e->element[0]->len);
  redisReply *f = e->element[1], *m = NULL, *sig = NULL;
  if (f->type == REDIS_REPLY_ARRAY) {
    for (size_t i = 0; i + 1 < f->elements; i += 2) {
      redisReply *k = f->element[i], *v = f->element[i + 1];
      if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING || k->len != 1) continue;
      if (k->str[0] == 'm') m = v;
      else if (k->str[0] == 's') sig = v;
    }
  }
  if (m && sig && good_sig(s, c, cn, m->str, m->len, sig->str, sig->len)) lua_pushlstring(L, m->str, m->len);
  else lua_pushboolean(L, 0);
}

static int redis_entries(lua_State *L) {
  mp_redis *r = toredis(L);
  mp_signer *s = tosigner(L, 2);
  size_t cn;
  const char *c = luaL_checklstring(L, 3, &cn);
  if (!drain(L, r)) return conn_fault(L, r);
  int top = lua_gettop(L);
  luaL_argcheck(L, top >= 4, 4, "a command expected");
  const char *cmd = lua_tostring(L, 4);
  int streams = cmd && (strcasecmp(cmd, "XREAD") == 0 || strcasecmp(cmd, "XREADGROUP") == 0);
  const char *av[SMALLARGS], **argv = av;
  size_t lv[SMALLARGS], *lens = lv;
  argbuf(L, top - 3, &argv, &lens);
  int n = collect(L, 0, 4, top, argv, lens, 0);
  redisReply *y = HI.redisCommandArgv(r->c, n, argv, lens);
  if (!y) return conn_fault(L, r);
  if (y->type == REDIS_REPLY_ERROR) {
    lua_pushnil(L);
    lua_pushlstring(L, y->str, y->len);
    HI.freeReplyObject(y);
    return 2;
  }
  if (y->type != REDIS_REPLY_ARRAY) { HI.freeReplyObject(y); lua_pushboolean(L, 0); return 1; }
  /* XREAD's [[stream, [entry...]]...], or XCLAIM's [entry...] */
  redisReply *list = y;
  if (streams) list = (y->elements >= 1 && y->element[0]->type == REDIS_REPLY_ARRAY && y->element[0]->elements >= 2)
                          ? y->element[0]->element[1] : NULL;
  size_t k = list && list->type == REDIS_REPLY_ARRAY ? list->elements : 0;
  luaL_checkstack(L, 4, "Redis reply");
  lua_createtable(L, (int)(2 * k), 1);
  int t = lua_gettop(L);
  for (size_t i = 0; i < k; i++) {
    push_entry(L, s, c, cn, list->element[i]);
    lua_rawseti(L, t, (lua_Integer)(2 * i + 2));
    lua_rawseti(L, t, (lua_Integer)(2 * i + 1));
  }
  lua_pushinteger(L, (lua_Integer)(2 * k));
  lua_setfield(L, t, "n");
  HI.freeReplyObject(y);
  return 1;
}

/* ------------------------------------------------------------ frames */

static void put_u32le(char *p, size_t n) {
  p[0] = (char)n; p[1] = (char)(n >> 8); p[2] = (char)(n >> 16); p[3] = (char)(n >> 24);
}

/* 1 when e met no handle; else 0, and e is let go (its bytes go nowhere) */
static int no_handles(lua_State *L, mp_enc *e) {
  const mp_sent *list;
  if (mp_enc_handles(e, &list) == 0) return 1;
  mp_enc_unsent(e);
  mp_enc_done(L, e);
  return 0;
}

/* The header's bytes are copied out of the encoder (onto the C stack when small), the
** payload is encoded next, and one string is made of both: no other string, no copy of
** the items first. */
#define SMALLHEADER 512
static int stream_frame(lua_State *L) {
  luaL_checkany(L, 1);
  luaL_checkany(L, 2);
  int range = !lua_isnoneornil(L, 3);
  lua_Integer i0 = range ? luaL_checkinteger(L, 3) : 0, n = range ? luaL_checkinteger(L, 4) : 0;
  if (range) {
    luaL_checktype(L, 2, LUA_TTABLE);
    luaL_argcheck(L, n >= 0 && n <= 0x7fffffff, 4, "bad count");
  }
  lua_settop(L, 2);
  char small[SMALLHEADER];
  const char *hdr = small;
  mp_enc *e = mp_encode(L, 1, "header");
  if (!no_handles(L, e)) goto handle;
  size_t hn = mp_enc_size(e);
  if (hn <= sizeof small) mp_enc_copy(e, small);
  else {
    mp_enc_push(L, e);  /* a big header: kept as a string while the payload is encoded */
    hdr = lua_tostring(L, -1);
  }
  mp_enc_done(L, e);
  e = range ? mp_encode_range(L, 2, i0, n, "args") : mp_encode(L, 2, "args");
  if (!no_handles(L, e)) goto handle;
  size_t pn = mp_enc_size(e);
  if (hn > 0xffffffffu || pn > 0xffffffffu) {
    mp_enc_done(L, e);
    return luaL_error(L, "a message over 4 GB cannot be sent");
  }
  luaL_Buffer b;
  char *p = luaL_buffinitsize(L, &b, hn + pn + 8);
  put_u32le(p, hn);
  memcpy(p + 4, hdr, hn);
  put_u32le(p + 4 + hn, pn);
  mp_enc_copy(e, p + 8 + hn);
  luaL_pushresultsize(&b, hn + pn + 8);
  mp_enc_done(L, e);
  return 1;
handle:
  lua_pushnil(L);
  lua_pushliteral(L, "handle");
  return 2;
}

static size_t get_u32le(const unsigned char *p) {
  return (size_t)p[0] | (size_t)p[1] << 8 | (size_t)p[2] << 16 | (size_t)p[3] << 24;
}

static int stream_unframe(lua_State *L) {
  size_t len;
  const char *m = luaL_checklstring(L, 1, &len);
  lua_Integer pos = luaL_optinteger(L, 2, 1);
  luaL_argcheck(L, pos >= 1 && (size_t)pos <= len + 1, 2, "position out of range");
  size_t at = (size_t)pos - 1;
  lua_settop(L, 1);
  for (int part = 0; part < 2; part++) {
    if (len - at < 4) return luaL_error(L, "cannot decode: truncated frame");
    size_t n = get_u32le((const unsigned char *)m + at);
    at += 4;
    if (len - at < n) return luaL_error(L, "cannot decode: truncated frame");
    mp_decode_mode(L, m + at, n, MP_DECODE_SIGNED);
    at += n;
  }
  if (at < len) lua_pushinteger(L, (lua_Integer)at + 1);
  else lua_pushnil(L);
  return 3;
}

/* core.read_key_file(path) -> bytes, or nil, why: a regular file of 32 to 4096 bytes that
** only its owner may read or write (a key others can read lets them run code on workers) */
static int read_key_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) { lua_pushnil(L); lua_pushstring(L, strerror(errno)); return 2; }
  struct stat st;
  const char *why = NULL;
  if (fstat(fd, &st) != 0) why = strerror(errno);
  else if (!S_ISREG(st.st_mode)) why = "not a regular file";
  else if (st.st_mode & 077) why = "others may read or write it (chmod 600 it)";
  else if (st.st_size < 32) why = "it holds fewer than 32 bytes (make one with: head -c 32 /dev/urandom > FILE)";
  else if (st.st_size > 4096) why = "it holds more than 4096 bytes";
  if (why) { close(fd); lua_pushnil(L); lua_pushstring(L, why); return 2; }
  char buf[4096];
  size_t got = 0;
  while (got < (size_t)st.st_size) {
    ssize_t k = read(fd, buf + got, (size_t)st.st_size - got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) break;
    got += (size_t)k;
  }
  close(fd);
  if (got < 32) { lua_pushnil(L); lua_pushliteral(L, "cannot read it whole"); return 2; }
  lua_pushlstring(L, buf, got);
  explicit_bzero(buf, sizeof buf);
  return 1;
}

int mp_redis_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"call", redis_call}, {"pipeline", redis_pipeline}, {"entries", redis_entries}, {"send_entry", redis_send_entry}, {"send", redis_send}, {"replies", redis_replies}, {"settimeout", redis_settimeout},
    {"close", redis_close}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
    {"__gc", redis_close}, {"__close", redis_close}, {"__tostring", redis_tostring}, {NULL, NULL}};
  mp_newclass(L, REDIS_CLASS, methods, meta);
  static const luaL_Reg smethods[] = {{"sign", signer_sign}, {"verify", signer_verify}, {"close", signer_close}, {NULL, NULL}};
  static const luaL_Reg smeta[] = {{"__gc", signer_close}, {"__close", signer_close}, {NULL, NULL}};
  mp_newclass(L, SIGNER_CLASS, smethods, smeta);
  static const luaL_Reg fns[] = {
    {"redis_connect", redis_connect}, {"read_key_file", read_key_file}, {"signer", signer_new},
    {"stream_frame", stream_frame}, {"stream_unframe", stream_unframe}, {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
  return 0;
}
