# Makefile for lua-multiprocessing. Variables (override on the command line):
#   LUA         the Lua 5.4 interpreter           (lua5.4)
#   LUA_INCDIR  where lua.h is                    (/usr/include/lua5.4)
#   BUSTED      the busted runner                 (busted)
#   PREFIX      install prefix                    (/usr/local)
#   DESTDIR     staging root for packagers        (empty)
#   LUA_CMOD    install dir of C modules          ($(PREFIX)/lib/x86_64-linux-gnu/lua/5.4 style: $(PREFIX)/lib/lua/5.4)
#   LUA_LMOD    install dir of Lua modules        ($(PREFIX)/share/lua/5.4)
#   LIBS        extra libraries the core links    (none: libcrypto and libhiredis are dlopened
#               at first use, src/dynlib.h; on glibc < 2.34 give LIBS=-ldl)
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
LIBS       ?=
SRC        := $(wildcard src/*.c)
HDR        := $(wildcard src/*.h) include/multiprocessing.h
LUASRC     := $(wildcard lua/multiprocessing/*.lua lua/multiprocessing/*/*.lua)
BUILD      ?= build
SO          = $(BUILD)/multiprocessing/core.so
# The objects of the core plus the Lua layer built in (luaopen_multiprocessing)
OBJ         = $(patsubst src/%.c,$(BUILD)/obj/%.o,$(SRC)) $(BUILD)/obj/lua_layer.o
# The static library: one relocatable object whose only global symbols are
# the public ones (luaopen_multiprocessing*, lmp_*), so no internal name
# reaches a host that links it (docs/embedding.md)
STATIC      = $(BUILD)/libmultiprocessing.a
LIBDIR     ?= $(PREFIX)/lib
INCDIR     ?= $(PREFIX)/include
PKGDIR     ?= $(LIBDIR)/pkgconfig
VERSION    := $(shell sed -n 's/^\#define MP_VERSION "\(.*\)"/\1/p' src/mp.h)
SPECS      ?= spec
BUSTED_RUN  = $(BUSTED) --lua=$(LUA) -o spec/summary.lua
ASAN_FLAGS  = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

.PHONY: all test deps install uninstall clean bench bench-host asan valgrind fuzz demo examples examples-host chaos cross static

all: $(SO)

$(BUILD)/obj/%.o: src/%.c $(HDR) Makefile
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(BUILD)/lua_layer.c: $(LUASRC) scripts/lua_layer.lua
	@mkdir -p $(dir $@)
	$(LUA) scripts/lua_layer.lua $@ $(LUASRC)

$(BUILD)/obj/lua_layer.o: $(BUILD)/lua_layer.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(SO): $(OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -shared -o $@ $(OBJ) $(LDFLAGS) $(LIBS)

static: $(STATIC)

$(STATIC): $(OBJ)
	$(CC) -r -nostdlib -o $(BUILD)/multiprocessing.all.o $(OBJ)
	nm -g --defined-only $(BUILD)/multiprocessing.all.o | awk '$$3 ~ /^(luaopen_multiprocessing|lmp_)/ { print $$3 }' > $(BUILD)/public.syms
	objcopy --keep-global-symbols=$(BUILD)/public.syms $(BUILD)/multiprocessing.all.o $(BUILD)/multiprocessing.o
	rm -f $@ $(BUILD)/multiprocessing.all.o
	ar rcs $@ $(BUILD)/multiprocessing.o

# the pkg-config file, written at install time for this PREFIX
PC_LINES = 'prefix=$(PREFIX)' 'libdir=$(LIBDIR)' 'includedir=$(INCDIR)' '' \
  'Name: multiprocessing' 'Description: Python'"'"'s multiprocessing for Lua 5.4, for hosts that embed Lua' \
  'Version: $(VERSION)' 'Requires: lua5.4' 'Cflags: -I$${includedir}' \
  'Libs: -L$${libdir} -lmultiprocessing $(LIBS) -lpthread -lm'

deps:
	@sh scripts/deps.sh

test:
	@MP_FOR_TESTS=1 sh scripts/deps.sh
	@$(MAKE) --no-print-directory all
	MP_BUILD=$(BUILD) $(BUSTED_RUN) $(SPECS)

demo: deps
	@$(MAKE) --no-print-directory all
	$(LUA) examples/demo.lua

examples: all examples-host
	@for f in examples/*.lua; do echo "== $$f"; LUA_PATH="./lua/?.lua;./lua/?/init.lua;;" LUA_CPATH="./$(BUILD)/?.so;;" $(LUA) $$f >/dev/null || exit 1; done

# examples/host: a C host linking the static library (docs/embedding.md), built and run
HOST_CFLAGS = $(OPT) -g -std=gnu11 -Wall -Wextra -Werror -Iinclude -I$(LUA_INCDIR)
HOST_LIBS   = $(LIBS) -llua5.4 -lpthread -lm
$(BUILD)/host: examples/host/host.c examples/host/engine.h include/multiprocessing.h $(STATIC)
	$(CC) $(HOST_CFLAGS) -o $@ examples/host/host.c $(STATIC) $(HOST_LIBS)

examples-host: $(BUILD)/host
	@echo "== examples/host/host.c"
	cd /tmp && timeout 120 $(CURDIR)/$(BUILD)/host

$(BUILD)/host_frames: bench/host_frames.c examples/host/engine.h include/multiprocessing.h $(STATIC)
	$(CC) $(HOST_CFLAGS) -o $@ bench/host_frames.c $(STATIC) $(HOST_LIBS)

# The C host's frame times and a big heap's costs (bench/host_frames.c);
# HOST_HEAP_MB sets the heap (default 2048, less when memory is short)
bench-host: deps $(BUILD)/host_frames
	@cd /tmp && $(CURDIR)/$(BUILD)/host_frames fork --header && $(CURDIR)/$(BUILD)/host_frames forkserver

install: all $(STATIC)
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCDIR) $(DESTDIR)$(PKGDIR)
	install -m 644 $(STATIC) $(DESTDIR)$(LIBDIR)/libmultiprocessing.a
	install -m 644 include/multiprocessing.h $(DESTDIR)$(INCDIR)/multiprocessing.h
	printf '%s\n' $(PC_LINES) > $(DESTDIR)$(PKGDIR)/multiprocessing.pc
	install -d $(DESTDIR)$(LUA_CMOD)/multiprocessing $(DESTDIR)$(LUA_LMOD)/multiprocessing
	install -m 755 $(SO) $(DESTDIR)$(LUA_CMOD)/multiprocessing/core.so
	install -m 644 lua/multiprocessing/*.lua $(DESTDIR)$(LUA_LMOD)/multiprocessing/
	install -m 644 lua/multiprocessing.lua $(DESTDIR)$(LUA_LMOD)/multiprocessing.lua
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 755 bin/mp-worker $(DESTDIR)$(PREFIX)/bin/mp-worker
	install -d $(DESTDIR)$(LUA_LMOD)/multiprocessing/managers && install -m 644 lua/multiprocessing/managers/*.lua $(DESTDIR)$(LUA_LMOD)/multiprocessing/managers/

uninstall:
	rm -rf $(DESTDIR)$(LUA_CMOD)/multiprocessing $(DESTDIR)$(LUA_LMOD)/multiprocessing $(DESTDIR)$(PREFIX)/bin/mp-worker
	rm -f $(DESTDIR)$(LUA_LMOD)/multiprocessing.lua
	rm -f $(DESTDIR)$(LIBDIR)/libmultiprocessing.a $(DESTDIR)$(INCDIR)/multiprocessing.h $(DESTDIR)$(PKGDIR)/multiprocessing.pc

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
# built and that longs are 64-bit, the same on aarch64. The core links neither
# libcrypto nor hiredis (src/dynlib.c opens them at run time), so no arm64 library
# is needed: this build checks that the sources compile and link.
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
	@$(MAKE) --no-print-directory bench-host

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
