-- The REPL trap (issue 8): globals set after Pool() reach the workers with the functions that read them.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- busted gives this file its own _ENV: functions that read globals are loaded with the real
-- ones, as a REPL line or a script's function would be. Their globals are set and cleared
-- through _G (the names start with REPL_ so that they clash with nothing).
local _G, rawset, pairs = _G, rawset, pairs
local function global_fn(src) return assert(load("return " .. src, "=repl", "t", _G))() end

local function clear()
  for k in pairs(_G) do
    if type(k) == "string" and k:match("^REPL_") then rawset(_G, k, nil) end
  end
end

describe("Pool and the sender's globals", function()
  H.leak_check(before_each, after_each)
  before_each(clear)
  after_each(clear)

  it("sees a global set after Pool()", function()
    local pool <close> = mp.Pool(2)
    _G.REPL_K = 10
    local r = pool:map(global_fn "function(x) return x + REPL_K end", { 1, 2 })
    assert.are.same({ 11, 12, n = 2 }, r)
  end)

  it("sees a changed global in the next call, with the same function", function()
    local pool <close> = mp.Pool(2)
    local add = global_fn "function(x) return x + REPL_K end"
    _G.REPL_K = 10
    assert.are.same({ 11, 12, n = 2 }, pool:map(add, { 1, 2 }))
    _G.REPL_K = 20
    assert.are.same({ 21, 22, n = 2 }, pool:map(add, { 1, 2 }))
    assert.equal(21, pool:apply(add, { 1 }))
    _G.REPL_K = 30
    assert.equal(31, pool:apply(add, { 1 }))
    assert.equal(31, pool:apply_async(add, { 1 }):get(20))
  end)

  it("sends a table global as it is at the call", function()
    local pool <close> = mp.Pool(2)
    _G.REPL_CONF = { scale = 2 }
    local f = global_fn "function(x) return x * REPL_CONF.scale end"
    assert.are.same({ 2, 4, n = 2 }, pool:map(f, { 1, 2 }))
    _G.REPL_CONF.scale = 3
    assert.are.same({ 3, 6, n = 2 }, pool:map(f, { 1, 2 }))
  end)

  it("runs a recursive global function defined after Pool()", function()
    local pool <close> = mp.Pool(2)
    rawset(_G, "REPL_fib", global_fn "function(n) if n < 2 then return n end return REPL_fib(n - 1) + REPL_fib(n - 2) end")
    assert.are.same({ 55, 6765, n = 2 }, pool:map(_G.REPL_fib, { 10, 20 }))
  end)

  it("sends global functions that read each other (a cycle) once each", function()
    local pool <close> = mp.Pool(2)
    rawset(_G, "REPL_even", global_fn "function(n) if n == 0 then return true end return REPL_odd(n - 1) end")
    rawset(_G, "REPL_odd", global_fn "function(n) if n == 0 then return false end return REPL_even(n - 1) end")
    local s = mp.encode(_G.REPL_even)
    assert.is_true(#s < 2 * #mp.encode(global_fn "function(n) if n == 0 then return true end return REPL_odd(n - 1) end") + 64)
    assert.are.same({ true, false, n = 2 }, pool:map(_G.REPL_even, { 10, 7 }))
  end)

  it("does not send library globals: a worker's own patch of one is used", function()
    local pool <close> = mp.Pool { processes = 2,
      initializer = global_fn "function() tostring = function(v) return 'patched ' .. v end end" }
    _G.REPL_K = 10
    local r = pool:map(global_fn "function(x) return tostring(x + REPL_K) end", { 1, 2 })
    assert.are.same({ "patched 11", "patched 12", n = 2 }, r)
    -- a function that reads only library globals carries none
    local lib = global_fn "function(x) return math.floor(x) + select('#', x) + #string.rep('a', 2) end"
    assert.is_false(select(2, core.encode_function(lib)))
    assert.are.same({ 4, n = 1 }, pool:map(lib, { 1.5 }))
  end)

  it("leaves the worker's globals to what the sender lacks or cannot send", function()
    local pool <close> = mp.Pool { processes = 2,
      initializer = global_fn "function() REPL_DB = 'db'; REPL_FILE = 'worker file' end" }
    _G.REPL_K = 1
    _G.REPL_FILE = io.stdout  -- cannot be sent: skipped without a word
    local r = pool:map(global_fn "function(x) return REPL_DB .. ' ' .. REPL_FILE .. ' ' .. (x + REPL_K) end", { 1 })
    assert.are.same({ "db worker file 2", n = 1 }, r)
  end)

  it("gives the sender's current value precedence over the worker's", function()
    local pool <close> = mp.Pool { processes = 1, initializer = global_fn "function() REPL_K = 99 end" }
    _G.REPL_K = 10
    assert.are.same({ 11, n = 1 }, pool:map(global_fn "function(x) return x + REPL_K end", { 1 }))
    _G.REPL_K = nil  -- the sender has none: the worker's own
    assert.are.same({ 100, n = 1 }, pool:map(global_fn "function(x) return x + REPL_K end", { 1 }))
  end)

  it("writes a task's globals to the worker's globals, where the next call's functions read them", function()
    local pool <close> = mp.Pool(1)
    _G.REPL_K = 5
    local r = pool:map(global_fn "function(x) REPL_SEEN = x + REPL_K; REPL_K = 0; return REPL_K end", { 1 }, 1)
    assert.are.same({ 0, n = 1 }, r)  -- it reads what it wrote
    assert.are.same({ 6, n = 1 }, pool:map(global_fn "function() return REPL_SEEN end", { 1 }))
    assert.is_nil(rawget(_G, "REPL_SEEN"))  -- the parent is untouched
  end)

  it("sends a script's global functions defined before require with the globals they read", function()
    local p = io.popen(H.ENV .. [[ timeout 60 lua5.4 - 2>&1 <<'LUA'
function helper() return K end
local mp = require "multiprocessing"
K = 5
local pool = mp.Pool(1)
K = 6
print("R", pool:apply(function() return helper() end), pool:apply(function() return print == _G.print end))
pool:close() pool:join()
LUA]])
    local out = p:read("a")
    p:close()
    assert.matches("R\t6\ttrue", out)
  end)

  it("works at a real lua5.4 -i prompt", function()
    local p = io.popen(H.ENV .. [[ timeout 60 lua5.4 -i 2>&1 <<'LUA'
mp = require "multiprocessing"; pool = mp.Pool(2)
k = 10
print("R1", table.concat(pool:map(function(x) return x + k end, {1, 2}), ","))
k = 20
function add(x) return x + k end
print("R2", table.concat(pool:map(add, {1, 2}), ","))
pool:close() pool:join()
LUA]])
    local out = p:read("a")
    p:close()
    assert.matches("R1\t11,12", out, 1, true)
    assert.matches("R2\t21,22", out, 1, true)
  end)
end)
