/* dynlib.c: libcrypto and libhiredis opened on first use (dynlib.h says why). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "dynlib.h"

#define STR_(x) #x
#define STR(x) STR_(x)

typedef struct lib {
  const char *const *names;  /* SONAMEs to try, in order; the first is shown in errors */
  const char *package;       /* the Debian package that ships the first */
  const char *const *syms;   /* in the order of the struct's fields */
  void **fns;                /* the struct, as an array of pointers */
  size_t n;
  int ok;
  char why[256];             /* dlerror of the failure */
} lib;

static void load(lib *b) {
  void *h = NULL;
  for (size_t i = 0; b->names[i] && !h; i++) {
    h = dlopen(b->names[i], RTLD_NOW | RTLD_LOCAL);
    const char *e = h ? NULL : dlerror();
    if (i == 0 && e) snprintf(b->why, sizeof b->why, "%s", e);  /* the SONAME's failure tells most */
  }
  if (!h) return;
  for (size_t i = 0; i < b->n; i++) {
    dlerror();
    if (!(b->fns[i] = dlsym(h, b->syms[i]))) {
      snprintf(b->why, sizeof b->why, "%s has no %s", b->names[0], b->syms[i]);
      dlclose(h);
      return;
    }
  }
  b->ok = 1;  /* the handle stays open for the life of the process */
}

static void *need(lua_State *L, lib *b, const char *who) {
  if (b->ok) return b->fns;
  lua_pushfstring(L, "%s: cannot load %s (install %s): %s", who, b->names[0], b->package, b->why);
  lua_error(L);  /* no position: the message names the user's call */
  return NULL;
}

/* ------------------------------------------------------------ libcrypto */

#define CRYPTO_SONAME "libcrypto.so." STR(OPENSSL_VERSION_MAJOR)
static const char *const crypto_names[] = {CRYPTO_SONAME, "libcrypto.so", NULL};
static const char *const crypto_syms[] = {
  "HMAC", "EVP_sha256", "CRYPTO_memcmp", "EVP_MAC_fetch", "EVP_MAC_CTX_new", "EVP_MAC_CTX_free",
  "EVP_MAC_init", "EVP_MAC_update", "EVP_MAC_final", "OSSL_PARAM_construct_utf8_string",
  "OSSL_PARAM_construct_end"};
mp_crypto_fns mp_libcrypto;
_Static_assert(sizeof mp_libcrypto == sizeof crypto_syms / sizeof crypto_syms[0] * sizeof(void *),
               "one name per libcrypto function");
static lib crypto_lib = {crypto_names, "libssl" STR(OPENSSL_VERSION_MAJOR), crypto_syms, (void **)&mp_libcrypto,
                         sizeof crypto_syms / sizeof crypto_syms[0], 0, ""};
static pthread_once_t crypto_once = PTHREAD_ONCE_INIT;
static void crypto_load(void) { load(&crypto_lib); }

const mp_crypto_fns *mp_crypto(lua_State *L, const char *who) {
  pthread_once(&crypto_once, crypto_load);
  return need(L, &crypto_lib, who);
}

/* ------------------------------------------------------------ libhiredis */

#if HIREDIS_MAJOR == 0
#define HIREDIS_SONAME_ "libhiredis.so.0." STR(HIREDIS_MINOR)
#define HIREDIS_PACKAGE "libhiredis0." STR(HIREDIS_MINOR)
#else
#define HIREDIS_SONAME_ "libhiredis.so." STR(HIREDIS_MAJOR) "." STR(HIREDIS_MINOR) ".0"
#define HIREDIS_PACKAGE "libhiredis" STR(HIREDIS_MAJOR) "." STR(HIREDIS_MINOR) ".0"
#endif
static const char *const hiredis_names[] = {HIREDIS_SONAME_, "libhiredis.so", NULL};
static const char *const hiredis_syms[] = {
  "redisConnectWithTimeout", "redisConnectUnixWithTimeout", "redisSetTimeout", "redisFree",
  "redisCommandArgv", "redisAppendCommandArgv", "redisBufferWrite", "redisGetReply", "freeReplyObject"};
mp_hiredis_fns mp_libhiredis;
_Static_assert(sizeof mp_libhiredis == sizeof hiredis_syms / sizeof hiredis_syms[0] * sizeof(void *),
               "one name per hiredis function");
static lib hiredis_lib = {hiredis_names, HIREDIS_PACKAGE, hiredis_syms, (void **)&mp_libhiredis,
                          sizeof hiredis_syms / sizeof hiredis_syms[0], 0, ""};
static pthread_once_t hiredis_once = PTHREAD_ONCE_INIT;
static void hiredis_load(void) { load(&hiredis_lib); }

const mp_hiredis_fns *mp_hiredis(lua_State *L, const char *who) {
  pthread_once(&hiredis_once, hiredis_load);
  return need(L, &hiredis_lib, who);
}
