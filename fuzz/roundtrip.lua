-- The round-trip check of the fuzz target: a value that decodes must encode
-- again and come back alike. Failures raise "ROUNDTRIP: ...", which aborts.
local core = core
local pack, mtype, rawequal, next = string.pack, math.type, rawequal, next
local getupvalue = debug and debug.getupvalue

local alike
local function fail(why) error("ROUNDTRIP: " .. why, 0) end

local function alike_fn(a, b, seen)
  local ca, cb = pcall(string.dump, a), pcall(string.dump, b)
  if ca ~= cb then return false end
  if not ca then return rawequal(a, b) end  -- C functions resolve to the same one
  if string.dump(a) ~= string.dump(b) then return false end
  if getupvalue then
    for i = 1, 255 do
      local na, va = getupvalue(a, i)
      local nb, vb = getupvalue(b, i)
      if na ~= nb then return false end
      if na == nil then break end
      if not alike(va, vb, seen) then return false end
    end
  end
  return true
end

function alike(a, b, seen)
  local ta = type(a)
  if ta ~= type(b) then return false end
  if ta == "number" then
    if mtype(a) ~= mtype(b) then return false end
    if mtype(a) == "float" then return pack("<d", a) == pack("<d", b) end
    return a == b
  end
  if ta == "userdata" then  -- handles: two handles to one object encode alike
    local oka, ea = pcall(core.encode, a)
    local okb, eb = pcall(core.encode, b)
    return oka and okb and ea == eb
  end
  if ta ~= "table" and ta ~= "function" then return rawequal(a, b) end
  if seen[a] ~= nil then return rawequal(seen[a], b) end
  if rawequal(a, b) then return true end  -- modules, globals, registered metatables
  seen[a] = b
  if ta == "function" then return alike_fn(a, b, seen) end
  local na, nb, ta_keys, tb_keys = 0, 0, 0, 0
  for k, v in next, a do
    na = na + 1
    local kt = type(k)
    if kt == "table" or kt == "function" then
      ta_keys = ta_keys + 1
    elseif not alike(v, rawget(b, k), seen) then
      return false
    end
  end
  for k in next, b do
    nb = nb + 1
    local kt = type(k)
    if kt == "table" or kt == "function" then tb_keys = tb_keys + 1 end
  end
  if na ~= nb or ta_keys ~= tb_keys then return false end
  local ma, mb = getmetatable(a), getmetatable(b)
  if (ma == nil) ~= (mb == nil) then return false end
  return ma == nil or alike(ma, mb, seen)
end

return function(s)
  local ok, v = pcall(core.decode, s)
  if not ok then return end
  local ok2, e1 = pcall(core.encode, v)
  if not ok2 then
    if tostring(e1):find("nested deeper than", 1, true) then return end
    fail("cannot encode a decoded value: " .. tostring(e1))
  end
  local ok3, v2 = pcall(core.decode, e1)
  if not ok3 then fail("cannot decode a re-encoding: " .. tostring(v2)) end
  if not alike(v, v2, {}) then fail("the value changed on a round trip") end
end
