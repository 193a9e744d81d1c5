#!/bin/sh
# Installs the Debian packages the build and the tests need, when missing.
need=""
command -v lua5.4 >/dev/null 2>&1 || need="$need lua5.4"
[ -f /usr/include/lua5.4/lua.h ] || need="$need liblua5.4-dev"
[ -f /usr/include/openssl/hmac.h ] || need="$need libssl-dev"
[ -f /usr/include/hiredis/hiredis.h ] || need="$need libhiredis-dev"
# the specs of the Pool on Redis Streams start a redis-server of their own
[ -n "$MP_FOR_TESTS" ] && { command -v redis-server >/dev/null 2>&1 || need="$need redis-server"; }
# and one of them runs workers in a network namespace of their own (ip netns, veth)
[ -n "$MP_FOR_TESTS" ] && { command -v ip >/dev/null 2>&1 || need="$need iproute2"; }
command -v busted >/dev/null 2>&1 || need="$need lua-busted"
command -v cc >/dev/null 2>&1 || need="$need gcc libc6-dev"
command -v make >/dev/null 2>&1 || need="$need make"
[ -n "$MP_NEED_EXTRA" ] && need="$need $MP_NEED_EXTRA"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing:$need (install them, e.g. with apt-get)" >&2
  exit 1
fi
echo "installing:$need"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq $need >/dev/null
