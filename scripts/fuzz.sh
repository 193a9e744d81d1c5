#!/bin/sh
# Builds the codec's libFuzzer target (fuzz/codec_fuzz.c + src/*.c, with ASan and
# UBSan) and runs it in its modes one after the other (one core), FUZZ_SECONDS
# each (default 60): "both" decodes every input data-only and then fully, with
# the arena made and a live object of every shared type; "roundtrip" checks
# that what decodes encodes again alike. The seeds are written by the target
# itself (fuzz/make_seeds.lua), so their handles and keyed function checksums are
# valid in the fuzzing process. Inputs that crash land in build-fuzz/ and make
# this script fail: keep them in fuzz/crashers/ once the decoder is fixed (the
# regression spec decodes every file there).
#   FUZZ_SECONDS  how long each mode runs        (60)
#   FUZZ_MODES    which modes, in turn            ("both roundtrip"; also data, decode)
#   CLANG         the compiler                    (clang)
set -e
cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_MODES=${FUZZ_MODES:-both roundtrip}
export LUA_PATH="./lua/?.lua;./lua/?/init.lua;;"
CLANG=${CLANG:-clang}
LUA=${LUA:-lua5.4}
OUT=build-fuzz

if ! command -v "$CLANG" >/dev/null 2>&1; then MP_NEED_EXTRA="clang" sh scripts/deps.sh; fi
rtdir=$("$CLANG" --print-runtime-dir 2>/dev/null || true)
if [ ! -f "$rtdir/libclang_rt.fuzzer-x86_64.a" ]; then
  ver=$("$CLANG" -dumpversion | cut -d. -f1)
  MP_NEED_EXTRA="libclang-rt-$ver-dev" sh scripts/deps.sh
fi

mkdir -p "$OUT/seeds" fuzz/crashers
for mode in $FUZZ_MODES; do mkdir -p "$OUT/corpus-$mode"; done
echo "building $OUT/codec_fuzz"
"$CLANG" -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I/usr/include/lua5.4 -Isrc -o "$OUT/codec_fuzz" fuzz/codec_fuzz.c src/*.c -llua5.4 -lm -lhiredis -lcrypto

# each run writes its seeds at start (before libFuzzer reads the corpora): its
# own key signs their functions

status=0
for mode in $FUZZ_MODES; do
  echo "fuzzing ($mode) for ${FUZZ_SECONDS}s, log in $OUT/$mode.log"
  rm -rf "$OUT/seeds"; mkdir -p "$OUT/seeds"
  FUZZ_MODE=$mode FUZZ_SEEDS="$OUT/seeds" UBSAN_OPTIONS=print_stacktrace=1 ASAN_OPTIONS=detect_leaks=0 \
    ${FUZZ_NICE:-nice} "$OUT/codec_fuzz" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$OUT/$mode-" \
    "$OUT/corpus-$mode" "$OUT/seeds" fuzz/crashers >"$OUT/$mode.log" 2>&1 || status=1
done
for mode in $FUZZ_MODES; do
  printf '%s: ' "$mode"
  grep -E "^stat::number_of_executed_units|Done [0-9]+ runs" "$OUT/$mode.log" | tail -1
  grep -E "ERROR|SUMMARY|ROUNDTRIP" "$OUT/$mode.log" | head -5 || true
done
found=$(ls "$OUT"/*-crash-* "$OUT"/*-timeout-* "$OUT"/*-oom-* 2>/dev/null || true)
if [ -n "$found" ] || [ $status -ne 0 ]; then
  echo "fuzzing found problems:"; echo "$found"
  exit 1
fi
echo "fuzzing: no crash"
