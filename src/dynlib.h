/* dynlib.h: OpenSSL's libcrypto and hiredis, opened with dlopen on their first use.
**
** The core links neither: `require "multiprocessing"` maps no more than libc, and every fork
** copies none of their pages. The headers still give the types and prototypes (compile time);
** the few functions used are looked up once per process (pthread_once), on the first
** Listener/Client with an authkey, HMAC, Signer or Redis connection.
**   mp_crypto(L, who)  -> the libcrypto functions, or raises
**                         "<who>: cannot load libcrypto.so.3 (install libssl3): <dlerror>"
**   mp_hiredis(L, who) -> the hiredis functions, or raises the same for libhiredis
** Only the SONAME of the headers' major version is tried (then the unversioned name of the
** -dev package): hiredis' structs change between versions, and r->c->fd is read directly. */
#ifndef MP_DYNLIB_H
#define MP_DYNLIB_H

#include <hiredis/hiredis.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>

#include "mp.h"

#pragma GCC visibility push(hidden)

#define MP_FN(name) __typeof__(name) *name

typedef struct mp_crypto_fns {
  MP_FN(HMAC);
  MP_FN(EVP_sha256);
  MP_FN(CRYPTO_memcmp);
  MP_FN(EVP_MAC_fetch);
  MP_FN(EVP_MAC_CTX_new);
  MP_FN(EVP_MAC_CTX_free);
  MP_FN(EVP_MAC_init);
  MP_FN(EVP_MAC_update);
  MP_FN(EVP_MAC_final);
  MP_FN(OSSL_PARAM_construct_utf8_string);
  MP_FN(OSSL_PARAM_construct_end);
} mp_crypto_fns;

typedef struct mp_hiredis_fns {
  MP_FN(redisConnectWithTimeout);
  MP_FN(redisConnectUnixWithTimeout);
  MP_FN(redisSetTimeout);
  MP_FN(redisFree);
  MP_FN(redisCommandArgv);
  MP_FN(redisAppendCommandArgv);
  MP_FN(redisBufferWrite);
  MP_FN(redisGetReply);
  MP_FN(freeReplyObject);
} mp_hiredis_fns;

#undef MP_FN

const mp_crypto_fns *mp_crypto(lua_State *L, const char *who);
const mp_hiredis_fns *mp_hiredis(lua_State *L, const char *who);
/* the same tables, filled by the first successful mp_crypto/mp_hiredis: what an object made
** after that call (a Signer, a Redis connection) uses without asking again */
extern mp_crypto_fns mp_libcrypto;
extern mp_hiredis_fns mp_libhiredis;

#pragma GCC visibility pop

#endif
