-- Specs of the packaging: one version everywhere, a rock that builds without the
-- Makefile, the settings that let busted and scripts find this checkout, and
-- sources that build beyond glibc on x86 (make cross builds them for aarch64).
local mp = require "multiprocessing"
local H = require "helpers"

local slurp = H.slurp

local function ls(pattern)
  local p = assert(io.popen("ls -1 " .. pattern .. " 2>/dev/null"))
  local list = {}
  for name in p:lines() do list[#list + 1] = name end
  p:close()
  return list
end

-- a rockspec's fields (it is Lua: run it in an empty environment)
local function rockspec(path)
  local t = {}
  assert(loadfile(path, "t", t))()
  return t
end

describe("packaging", function()
  H.leak_check(before_each, after_each)

  it("defines the version once, in src/mp.h, and exports it as _VERSION", function()
    local v = slurp("src/mp.h"):match('#define MP_VERSION "([^"]+)"')
    assert.equal(mp._VERSION, v)
    assert.matches("^%d+%.%d+%.%d+$", v)
    for _, f in ipairs(ls("src/*.c lua/multiprocessing/*.lua")) do
      assert.is_nil(slurp(f):find(v, 1, true), f .. " repeats the version")
    end
  end)

  it("has one rockspec, whose name, version and tag match _VERSION", function()
    local list = ls("rockspec/*.rockspec")
    assert.same({ "rockspec/multiprocessing-" .. mp._VERSION .. "-1.rockspec" }, list)
    local r = rockspec(list[1])
    assert.equal(mp._VERSION .. "-1", r.version)
    assert.equal("v" .. mp._VERSION, r.source.tag)
    assert.matches("^git%+https://github%.com/lua%-multiprocessing/lua%-multiprocessing%.git$", r.source.url)
  end)

  it("builds every source file in the rock", function()
    local r = rockspec(ls("rockspec/*.rockspec")[1])
    local sources = {}
    for _, s in ipairs(r.build.modules["multiprocessing.core"].sources) do sources[s] = true end
    for _, f in ipairs(ls("src/*.c")) do assert.is_true(sources[f], f .. " is not in the rockspec") end
    local lua = {}
    for name, f in pairs(r.build.modules) do if type(f) == "string" then lua[f] = name end end
    for _, f in ipairs(ls("lua/multiprocessing/*.lua")) do assert.is_string(lua[f], f .. " is not in the rockspec") end
  end)

  it("ships the MIT LICENSE its rockspec names", function()
    assert.equal("MIT", rockspec(ls("rockspec/*.rockspec")[1]).description.license)
    assert.matches("^MIT License", slurp("LICENSE") or "")
  end)

  it("pins busted to lua5.4 when another Lua runs busted, and only then", function()
    local function lua_of(version)
      local env = setmetatable({ _VERSION = version }, { __index = _G })
      return assert(loadfile(".busted", "t", env))()._all.lua
    end
    assert.equal("lua5.4", lua_of("Lua 5.1"))
    assert.is_nil(lua_of("Lua 5.4"))  -- no restart: scripts/busted.lua stays under valgrind
  end)

  it("cleans what luarocks make leaves in the checkout", function()
    local p = assert(io.popen("make -n clean 2>&1"))
    local out = p:read("a")
    p:close()
    assert.matches("src/%*%.o", out)
    assert.matches("multiprocessing/core%.so", out)
  end)
end)

describe("README", function()
  H.leak_check(before_each, after_each)

  local readme = slurp("README.md")

  it("links every page of docs/", function()
    for _, f in ipairs(ls("docs/*.md")) do
      assert.is_truthy(readme:find("(" .. f .. ")", 1, true), f .. " is not in README's index")
    end
  end)

  it("installs the rockspec that exists, for Lua 5.4", function()
    local cmd = readme:match("luarocks make [^\n`]*")
    assert.is_string(cmd)
    assert.matches("%-%-lua%-version=5%.4", cmd)
    local path = cmd:match("(rockspec/%S+%.rockspec)")
    assert.equal(ls("rockspec/*.rockspec")[1], path)
  end)

  it("shows a LUA_PATH and LUA_CPATH that let a script elsewhere require the checkout", function()
    local lpath = readme:match('export LUA_PATH="([^"]+)"')
    local cpath = readme:match('export LUA_CPATH="([^"]+)"')
    assert.is_string(lpath)
    assert.is_string(cpath)
    local pwd = assert(io.popen("pwd"))
    local here = pwd:read("l")
    pwd:close()
    lpath = lpath:gsub("/path/to/lua%-multiprocessing", here)
    cpath = cpath:gsub("/path/to/lua%-multiprocessing/build/", here .. "/" .. (os.getenv("MP_BUILD") or "build") .. "/")
    local cmd = ("cd /tmp && LUA_PATH=%s LUA_CPATH=%s %s -e 'print(require(\"multiprocessing\")._VERSION)' 2>&1")
      :format(H.quote(lpath), H.quote(cpath), H.LUA)
    local p = assert(io.popen(cmd))
    local out = p:read("a")
    p:close()
    assert.equal(mp._VERSION .. "\n", out)
  end)
end)

describe("sources", function()
  H.leak_check(before_each, after_each)

  it("read no glibc-private fields (they build with any libc, for any CPU)", function()
    for _, f in ipairs(ls("src/*.c src/*.h")) do
      assert.is_nil(slurp(f):find("__data", 1, true), f .. " reads a glibc-private field")
    end
  end)
end)
