# Makefile for lua-multiprocessing. Variables (override on the command line):
#   LUA         the Lua 5.4 interpreter           (lua5.4)
#   LUA_INCDIR  where lua.h is                    (/usr/include/lua5.4)
#   BUSTED      the busted runner                 (busted)
#   PREFIX      install prefix                    (/usr/local)
#   DESTDIR     staging root for packagers        (empty)
#   LUA_CMOD    install dir of C modules          ($(PREFIX)/lib/x86_64-linux-gnu/lua/5.4 style: $(PREFIX)/lib/lua/5.4)
#   LUA_LMOD    install dir of Lua modules        ($(PREFIX)/share/lua/5.4)
#   LIBS        libraries the core links          (-lcrypto: OpenSSL's, for Listener/Client's HMAC)
LUA        ?= lua5.4
LUA_INCDIR ?= /usr/include/lua5.4
BUSTED     ?= busted
PREFIX     ?= /usr/local
DESTDIR    ?=
LUA_CMOD   ?= $(PREFIX)/lib/lua/5.4
LUA_LMOD   ?= $(PREFIX)/share/lua/5.4
CC         ?= cc
OPT        ?= -O2
CFLAGS     ?= $(OPT) -g
WARN        = -std=gnu11 -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wno-unused-parameter
ALL_CFLAGS  = $(CFLAGS) $(WARN) -fPIC -fvisibility=hidden -I$(LUA_INCDIR)
LDFLAGS    ?=
LIBS       ?= -lhiredis -lcrypto
SRC        := $(wildcard src/*.c)
HDR        := $(wildcard src/*.h)
BUILD      ?= build
SO          = $(BUILD)/multiprocessing/core.so
SPECS      ?= spec
BUSTED_RUN  = $(BUSTED) --lua=$(LUA) -o spec/summary.lua
ASAN_FLAGS  = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

.PHONY: all test deps install uninstall clean bench asan valgrind fuzz demo examples chaos cross

all: $(SO)

$(SO): $(SRC) $(HDR) Makefile
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -shared -o $@ $(SRC) $(LDFLAGS) $(LIBS)

deps:
	@sh scripts/deps.sh

test:
	@MP_FOR_TESTS=1 sh scripts/deps.sh
	@$(MAKE) --no-print-directory all
	MP_BUILD=$(BUILD) $(BUSTED_RUN) $(SPECS)

demo: deps
	@$(MAKE) --no-print-directory all
	$(LUA) examples/demo.lua

examples: all
	@for f in examples/*.lua; do echo "== $$f"; LUA_PATH="./lua/?.lua;./lua/?/init.lua;;" LUA_CPATH="./$(BUILD)/?.so;;" $(LUA) $$f >/dev/null || exit 1; done

install: all
	install -d $(DESTDIR)$(LUA_CMOD)/multiprocessing $(DESTDIR)$(LUA_LMOD)/multiprocessing
	install -m 755 $(SO) $(DESTDIR)$(LUA_CMOD)/multiprocessing/core.so
	install -m 644 lua/multiprocessing/*.lua $(DESTDIR)$(LUA_LMOD)/multiprocessing/
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 755 bin/mp-worker $(DESTDIR)$(PREFIX)/bin/mp-worker
	install -d $(DESTDIR)$(LUA_LMOD)/multiprocessing/managers && install -m 644 lua/multiprocessing/managers/*.lua $(DESTDIR)$(LUA_LMOD)/multiprocessing/managers/

uninstall:
	rm -rf $(DESTDIR)$(LUA_CMOD)/multiprocessing $(DESTDIR)$(LUA_LMOD)/multiprocessing $(DESTDIR)$(PREFIX)/bin/mp-worker

# also what `luarocks make` leaves in the checkout: objects next to the sources, multiprocessing/core.so
clean:
	rm -rf build build-asan build-fuzz
	rm -f src/*.o multiprocessing/core.so
	[ ! -d multiprocessing ] || rmdir --ignore-fail-on-non-empty multiprocessing

# The core cross-built for aarch64 (Debian's gcc-aarch64-linux-gnu, installed when
# missing), with the same strict warnings and -Werror: catches what only x86 accepts.
# Debian's luaconf.h includes the host's lua5.4-deb-multiarch.h (it only names the
# multiarch triplet); the Lua headers are otherwise the same for every architecture,
# so the aarch64 one is written here rather than installing arm64 packages.
# OpenSSL's headers are the host's too (linked one by one, without the rest of
# /usr/include): its two per-architecture headers only say which features were
# built and that longs are 64-bit, the same on aarch64. No arm64 libcrypto is
# installed, so the object is linked without -lcrypto (a shared object may leave
# symbols to the loader): this build checks that the sources compile.
cross: deps
	@command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || MP_NEED_EXTRA=gcc-aarch64-linux-gnu sh scripts/deps.sh
	@mkdir -p build/cross/include/openssl
	@printf '#define DEB_HOST_MULTIARCH "aarch64-linux-gnu"\n' > build/cross/include/lua5.4-deb-multiarch.h
	@ln -sfn /usr/include/hiredis build/cross/include/hiredis
	@for f in /usr/include/openssl/*.h /usr/include/$$($(CC) -print-multiarch 2>/dev/null)/openssl/*.h; do \
	  [ ! -e "$$f" ] || ln -sf "$$f" build/cross/include/openssl/; done
	@$(MAKE) --no-print-directory all BUILD=build/cross CC=aarch64-linux-gnu-gcc LIBS= CFLAGS="$(CFLAGS) -Ibuild/cross/include"

bench: deps
	@$(MAKE) --no-print-directory all
	$(LUA) bench/run.lua

# The specs with the core built under AddressSanitizer and UBSan (the
# interpreter is not instrumented, so the runtime is preloaded).
asan: deps
	@$(MAKE) --no-print-directory all BUILD=build-asan CC=gcc CFLAGS="$(ASAN_FLAGS)"
	MP_BUILD=build-asan LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(BUSTED_RUN) $(SPECS)

valgrind: deps
	@$(MAKE) --no-print-directory all
	MP_BUILD=$(BUILD) MP_VALGRIND=1 LUA_MP_ARENA_SIZE=1073741824 valgrind -q --error-exitcode=99 --trace-children=no \
	  --suppressions=scripts/valgrind.supp $(LUA) scripts/busted.lua -o spec/summary.lua $(SPECS)

# The fault suite (docs/chaos.md): every case in its own session under a hard timeout.
# CASE=name runs one case (or a family, or names by prefix); CHAOS_SEED replays a run;
# CHAOS_ROUNDS multiplies the rounds.
chaos: deps
	@$(MAKE) --no-print-directory all
	MP_BUILD=$(BUILD) CASE="$(CASE)" LUA_PATH="./?.lua;./lua/?.lua;./lua/?/init.lua;;" LUA_CPATH="./$(BUILD)/?.so;;" \
	  $(LUA) chaos/run.lua

fuzz: deps
	@sh scripts/fuzz.sh
