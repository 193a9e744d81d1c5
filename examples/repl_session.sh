#!/bin/sh
# repl_session.sh: a lua5.4 -i session piped in: a function typed at the prompt runs in a Pool.
# Run from the checkout after `make`.
cd "$(dirname "$0")/.." || exit 1
export LUA_PATH="./lua/?.lua;./lua/?/init.lua;;" LUA_CPATH="./build/?.so;;"
lua5.4 -i <<'LUA'
mp = require "multiprocessing"
pool = mp.Pool(2)
function sq(x) return x * x end
print(table.concat(pool:map(sq, {1, 2, 3, 4}), ", "))
local k = 10 print(table.concat(pool:map(function(x) return x + k end, {1, 2}), ", "))
for i, v in pool:imap(sq, {5, 6}) do print(i, v) end
pool:close() pool:join()
LUA
