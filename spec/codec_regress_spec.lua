-- Regression inputs of the decoder: every file in fuzz/crashers/ (inputs that
-- once crashed or misbehaved, found by the fuzzer or by review) must decode to
-- a value or fail with a Lua error, in both modes, and a value must survive a
-- round trip.
local mp = require "multiprocessing"

local function files(dir)
  local p = assert(io.popen('ls -1 "' .. dir .. '" 2>/dev/null'))
  local list = {}
  for name in p:lines() do
    if not name:match("%.md$") then list[#list + 1] = dir .. "/" .. name end
  end
  p:close()
  table.sort(list)
  return list
end

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

describe("codec regressions", function()
  local list = files("fuzz/crashers")

  it("has regression inputs", function()
    assert.is_true(#list > 0)
  end)

  for _, path in ipairs(list) do
    it("survives " .. path, function()
      local s = slurp(path)
      local ok, v = pcall(mp.decode, s)
      if ok then
        local ok2, again = pcall(mp.encode, v)
        if ok2 then assert.has_no_error(function() mp.decode(again) end)
        else assert.matches("cannot send", again) end
      else
        assert.is_string(v)
        assert.matches("cannot decode", v)
      end
      -- the data-only mode: a value, or an error (a refusal or bad input)
      local okd, d = pcall(mp.decode, s, "data")
      if not okd then assert.matches("cannot decode", d) end
    end)
  end
end)
