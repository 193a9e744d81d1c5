#!/bin/sh
# repl_session.sh: a lua5.4 -i session piped in: functions typed at the prompt run in a Pool,
# with the globals typed after Pool() (they travel with the functions that read them, as they
# are at each call: docs/pool.md, "At the REPL"). Run from the checkout after `make`.
cd "$(dirname "$0")/.." || exit 1
export LUA_PATH="./lua/?.lua;./lua/?/init.lua;;" LUA_CPATH="./build/?.so;;"
lua5.4 -i <<'LUA'
mp = require "multiprocessing"
pool = mp.Pool(2)
k = 10
print(table.concat(pool:map(function(x) return x + k end, {1, 2}), ", "))   -- 11, 12
k = 20
function add(x) return x + k end
print(table.concat(pool:map(add, {1, 2}), ", "))                             -- 21, 22
k = 30
print(table.concat(pool:map(add, {1, 2}), ", "))                             -- 31, 32
function sq(x) return x * x end
function sumsq(t) local s = 0 for _, v in ipairs(t) do s = s + sq(v) end return s end
print(table.concat(pool:map(sumsq, {{1, 2}, {3, 4}}), ", "))                 -- 5, 25
function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
for i, v in pool:imap(fib, {10, 20}) do print(i, v) end                      -- 1 55, 2 6765
pool:close() pool:join()
LUA
