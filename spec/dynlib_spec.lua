-- libcrypto and libhiredis are opened at their first use (src/dynlib.h), not by require
local H = require "spec.helpers"

-- runs script in a fresh lua5.4 (prefix: a command put before it); its output and success
local function fresh(script, prefix)
  local path = H.tmpname() .. ".lua"
  local f = assert(io.open(path, "w"))
  f:write(script)
  f:close()
  local p = assert(io.popen((prefix or "") .. " env " .. H.ENV .. " timeout 60 " .. H.LUA .. " " .. path .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  os.remove(path)
  return out, ok
end

local MAPPED = [[
local function mapped()
  local f = assert(io.open("/proc/self/maps"))
  local s = f:read("a")
  f:close()
  local libs = {}
  if s:find("libcrypto", 1, true) then libs[#libs + 1] = "crypto" end
  if s:find("libhiredis", 1, true) then libs[#libs + 1] = "hiredis" end
  return "[" .. table.concat(libs, ",") .. "]"
end
]]

describe("libcrypto and libhiredis", function()
  it("are not mapped by require, a Pool or a Listener without authkey; each at its first use", function()
    local out, ok = fresh(MAPPED .. [[
local mp = require "multiprocessing"
io.write("require ", mapped(), "\n")
local p = mp.Pool(2)
assert(p:apply_async(function(x) return x + 1 end, {1}):get(20) == 2)
p:close(); p:join()
io.write("pool ", mapped(), "\n")
local l = assert(mp.connection.Listener(nil, { family = "unix" }))
l:close()
io.write("listener ", mapped(), "\n")
local la = assert(mp.connection.Listener(nil, { family = "unix", authkey = "k" }))
la:close()
io.write("authkey ", mapped(), "\n")
local core = require "multiprocessing.core"
local r = core.redis_connect("127.0.0.1", 1, 1)  -- nothing listens on port 1: nil, message
assert(r == nil)
io.write("redis ", mapped(), "\n")
]])
    assert(ok, out)
    assert.are.equal("require []\npool []\nlistener []\nauthkey [crypto]\nredis [crypto,hiredis]\n", out)
  end)

  it("agree with their former linked selves (HMAC-SHA256 test vector, Signer, compare_digest)", function()
    local core = require "multiprocessing.core"
    -- RFC 4231 test case 2
    local hex = core.hmac_sha256("Jefe", "what do ya want for nothing?"):gsub(".", function(c)
      return ("%02x"):format(c:byte())
    end)
    assert.are.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843", hex)
    local key = ("k"):rep(32)
    local s = core.signer(key)
    assert.are.equal(core.hmac_sha256(key, "ctx\nmsg"), s:sign("ctx", "msg"))
    assert.is_true(s:verify("ctx", "msg", s:sign("ctx", "msg")))
    assert.is_false(s:verify("ctx", "msg", ("x"):rep(32)))
    assert.is_true(core.compare_digest("abc", "abc"))
    assert.is_false(core.compare_digest("abc", "abd"))
    assert.is_false(core.compare_digest("abc", "ab"))
    assert.are.equal(40, #core.random_bytes(40))
    assert.are_not.equal(core.random_bytes(16), core.random_bytes(16))
    assert.has_error(function() core.need_lib("ssl", "x") end)
  end)

  -- a machine without the libraries: hidden under /dev/null in a mount namespace of its own
  local can_hide = os.execute("[ \"$(id -u)\" = 0 ] && unshare -m --propagation private true 2>/dev/null")
  local hide = [[unshare -m --propagation private sh -c 'for f in $(ldconfig -p | sed -n "s/.*\(libcrypto\|libhiredis\)\.so.* => //p"); do mount --bind /dev/null "$f" || exit 9; done; exec "$@"' sh]]
  local test = can_hide and it or pending
  test("missing, raise an error naming the user's call, the library and the package", function()
    local out, ok = fresh([[
local mp = require "multiprocessing"
local ok, e = pcall(mp.connection.Listener, nil, { family = "unix", authkey = "k" })
io.write(tostring(ok), " ", e, "\n")
ok, e = pcall(mp.connection.Client, "/nonexistent/x.sock", { authkey = "k" })
io.write(tostring(ok), " ", e, "\n")
ok, e = pcall(require("multiprocessing.stream").connect, { host = "127.0.0.1", port = 1, url = "redis://127.0.0.1:1" }, "Pool")
io.write(tostring(ok), " ", e, "\n")
local p = mp.Pool(2)  -- the rest works
assert(p:apply_async(function(x) return x + 1 end, {1}):get(20) == 2)
p:close(); p:join()
print("pool ok")
]], hide)
    assert(ok, out)
    assert.matches("^false mp%.connection%.Listener: cannot load libcrypto%.so%.%d+ %(install libssl%d+%): [^\n]+\n", out)
    assert.matches("\nfalse mp%.connection%.Client: cannot load libcrypto%.so%.%d+ %(install libssl%d+%)", out)
    assert.matches("\nfalse Pool: cannot load libhiredis%.so%.[%d.]+ %(install libhiredis[%d.]+%)", out)
    assert.matches("\npool ok\n$", out)
  end)
end)
