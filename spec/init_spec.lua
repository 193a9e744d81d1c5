-- init_spec.lua: `require "multiprocessing"` loads the parts of the Lua layer on first use.
local H = require "spec.helpers"

local PARTS = { "process", "pipe", "queue", "sync", "shared", "shared_memory", "pool", "progress", "manager", "parallel" }

-- runs a Lua script in a fresh interpreter of this checkout (its Lua files found along lpath when
-- given); returns its output (asserting success)
local function fresh(script, lpath)
  local path = H.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(script)
  f:close()
  local env = lpath and ("LUA_PATH=%s LUA_CPATH='./%s/?.so;;'"):format(H.quote(lpath), os.getenv("MP_BUILD") or "build")
    or H.ENV
  local p = assert(io.popen(env .. " " .. H.LUA .. " " .. path .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  os.remove(path)
  assert(ok, out)
  return out
end

describe("require 'multiprocessing'", function()
  it("loads the C core and no part of the Lua layer", function()
    local out = fresh [[
      require "multiprocessing"
      local names = {}
      for k in pairs(package.loaded) do if k:find("^multiprocessing") then names[#names + 1] = k end end
      table.sort(names)
      io.write(table.concat(names, " "))
    ]]
    assert.equal("multiprocessing multiprocessing.core", out)
  end)

  it("gives a lock from another part its Lua methods (hold, wait_for)", function()
    local out = fresh [[
      local mp = require "multiprocessing"
      local v = mp.Value("i", 0)
      do
        local guard <close> = v:get_lock():hold()
        v.value = 1
      end
      local c = mp.Condition()
      c:acquire()
      io.write(tostring(v.value), " ", tostring(c:wait_for(function() return 7 end)), " ")
      c:release()
      -- their errors name the caller's line, as when sync.lua was loaded first
      local ok, err = pcall(function() local g = v:get_lock():hold("soon") return g end)
      io.write(tostring(err))
    ]]
    assert.matches("^1 7 [^:]+:12: bad argument #1 to 'hold' %(number expected, got string%)$", out)
  end)

  it("loads a part when one of its names is first used, and that part only", function()
    local out = fresh [[
      local mp = require "multiprocessing"
      assert(type(mp.Queue) == "function")
      io.write(tostring(package.loaded["multiprocessing.queue"] ~= nil), " ",
        tostring(package.loaded["multiprocessing.pool"] ~= nil), " ", tostring(package.loaded["multiprocessing.manager"] ~= nil))
    ]]
    assert.equal("true false false", out)
  end)

  it("runs a Pool's map without loading the progress bar, the manager, the asynchronous calls, Process or the pool's fault paths", function()
    local out = fresh [[
      local mp = require "multiprocessing"
      local pool <close> = mp.Pool(1)
      assert(pool:map(function(x) return x * 2 end, { 1, 2 })[2] == 4)
      io.write(tostring(package.loaded["multiprocessing.progress"] ~= nil), " ",
        tostring(package.loaded["multiprocessing.manager"] ~= nil), " ",
        tostring(package.loaded["multiprocessing.pool_async"] ~= nil), " ",
        tostring(package.loaded["multiprocessing.process_class"] ~= nil), " ",
        tostring(package.loaded["multiprocessing.pool_faults"] ~= nil))
    ]]
    assert.equal("false false false false false", out)
  end)

  it("loads Process at the first use of one of its names, in place of every stand-in", function()
    local out = fresh [[
      local mp = require "multiprocessing"
      local process = require "multiprocessing.process"
      local names = { "Process", "active_children", "_child_main", "_call_args" }
      local function file(f) return debug.getinfo(f, "S").short_src:match("[^/]*$") end
      local before, after = {}, {}
      for _, k in ipairs(names) do before[#before + 1] = file(process[k]) end
      -- mp's own name, copied before the load, still reaches the real function
      local p = mp.Process { target = function(a) return a * 2 end, args = { 21 } }
      for _, k in ipairs(names) do after[#after + 1] = file(process[k]) end
      p:start()
      p:join()
      io.write(table.concat(before, " "), "\n", table.concat(after, " "), "\n", p:result(), " ", #mp.active_children())
    ]]
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal(("process.lua "):rep(4):sub(1, -2), lines[1])
    assert.equal(("process_class.lua "):rep(4):sub(1, -2), lines[2])
    assert.equal("42 0", lines[3])
  end)

  it("loads the asynchronous calls at the first use of one, in place of every stand-in", function()
    local out = fresh [[
      local mp = require "multiprocessing"
      local pool_mod = require "multiprocessing.pool"
      local pool <close> = mp.Pool(1)
      local Pool = getmetatable(pool)
      local names = { "apply_async", "apply", "submit", "map_async", "starmap_async", "imap", "imap_unordered",
        "poll", "fileno", "stats" }
      local function file(f) return debug.getinfo(f, "S").short_src:match("[^/]*$") end
      local before = {}
      for _, k in ipairs(names) do before[#before + 1] = file(Pool[k]) end
      before[#before + 1] = file(pool_mod.as_completed) .. " " .. file(pool_mod.wait)
      assert(pool:submit(function(x) return x + 1 end, 1):result() == 2)
      local after = {}
      for _, k in ipairs(names) do after[#after + 1] = file(Pool[k]) end
      after[#after + 1] = file(pool_mod.as_completed) .. " " .. file(pool_mod.wait)
      -- mp's own names, copied before the load, still reach the real functions
      local done = mp.wait({ pool:apply_async(function() return 3 end) })
      io.write(table.concat(before, " "), "\n", table.concat(after, " "), "\n", done[1]:get())
    ]]
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal(("pool.lua "):rep(12):sub(1, -2), lines[1])
    assert.equal(("pool_async.lua "):rep(12):sub(1, -2), lines[2])
    assert.equal("3", lines[3])
  end)

  it("sends a function holding the core after a pool closed, before sync.lua was loaded", function()
    -- the codec may walk the core's tables by value first: the lock classes' stand-ins must
    -- lead to nothing unsendable (they once reached the public module, its pools, their closed
    -- queues). Checked on what they hold, the walk's order being the hash tables'.
    local out = fresh [[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      local pool = mp.Pool(1)
      pool:close() pool:join()
      local bad = {}
      for class, methods in pairs(core.sync_methods) do
        for name, f in pairs(methods) do
          for u = 1, math.huge do
            local un, uv = debug.getupvalue(f, u)
            if not un then break end
            if type(uv) == "table" and uv ~= core.sync_methods and uv ~= _G or type(uv) == "function" and uv ~= f then
              bad[#bad + 1] = class .. "." .. name .. ":" .. un
            end
          end
        end
      end
      assert(#mp.encode(function() return core end) > 0)
      io.write(table.concat(bad, " "))
    ]]
    assert.equal("", out)
  end)

  it("knows which part holds every public name", function()
    -- a name init.lua does not place makes it load every part (and drop its metatable)
    local out = fresh(([[
      local mp = require "multiprocessing"
      local bad = {}
      for _, part in ipairs { "%s" } do
        for k, v in pairs(require("multiprocessing." .. part)) do
          if not k:find("^_") then
            if mp[k] ~= v then bad[#bad + 1] = part .. "." .. k .. " differs" end
            if getmetatable(mp) == nil then bad[#bad + 1] = part .. "." .. k .. " is not placed" break end
          end
        end
      end
      io.write(table.concat(bad, ", "))
    ]]):format(table.concat(PARTS, '", "')))
    assert.equal("", out)
  end)

  it("knows which part registers every named metatable", function()
    local out = fresh [[
      local mp = require "multiprocessing"
      local modules = mp._metatable_modules
      for _ in pairs(mp) do end  -- every part loaded
      local missing = {}
      for name, mt in pairs(debug.getregistry()["multiprocessing.metatables"]) do
        if type(name) == "string" and name:find("^multiprocessing%.") and rawget(modules, name) == nil then
          missing[#missing + 1] = name
        end
      end
      table.sort(missing)
      io.write(table.concat(missing, " "))
    ]]
    assert.equal("", out, "add these to _metatable_modules in lua/multiprocessing/init.lua (they work, but load every part)")
  end)

  it("decodes a Manager proxy in a process that has not loaded the manager", function()
    local out = fresh [[
      local mp = require "multiprocessing"
      -- a registered metatable travels by name: a table with it, renamed to a proxy's name
      local msg = mp.encode(setmetatable({}, mp.TaskError))
      local i = msg:find("\25multiprocessing.TaskError", 1, true)
      assert(i, "unexpected encoding")
      local v = mp.decode(msg:sub(1, i - 1) .. "\25multiprocessing.ListProxy" .. msg:sub(i + 26))
      io.write(getmetatable(v).__name, " ", tostring(package.loaded["multiprocessing.manager"] ~= nil))
    ]]
    assert.equal("multiprocessing.ListProxy true", out)
  end)

  it("lists every name with pairs, connection included", function()
    local out = fresh(([[
      local mp = require "multiprocessing"
      local seen = {}
      for k in pairs(mp) do seen[k] = true end
      local missing = {}
      for _, part in ipairs { "%s" } do
        for k in pairs(require("multiprocessing." .. part)) do
          if not k:find("^_") and not seen[k] then missing[#missing + 1] = k end
        end
      end
      if not seen.connection or not seen.encode then missing[#missing + 1] = "connection or encode" end
      io.write(table.concat(missing, " "))
    ]]):format(table.concat(PARTS, '", "')))
    assert.equal("", out)
  end)

  it("finds an unknown name after loading every part, and nil for none", function()
    local out = fresh [[
      local mp = require "multiprocessing"
      io.write(tostring(mp.no_such_name), " ", tostring(package.loaded["multiprocessing.manager"] ~= nil))
    ]]
    assert.equal("nil true", out)
  end)

  it("decodes a C function sent by its name in the module, before the part that names it was loaded", function()
    local out = fresh [[
      local mp = require "multiprocessing"
      local core = require "multiprocessing.core"
      -- core.getpid as sent, renamed to the public module's Queue (as a sender may name it)
      local msg = mp.encode(core.getpid)
      local i, j = msg:find("\20multiprocessing.core\6getpid", 1, true)
      assert(i and j == #msg, "unexpected encoding")
      local f = mp.decode(msg:sub(1, i - 1) .. "\15multiprocessing\5Queue")
      io.write(tostring(f == core.Queue))
    ]]
    assert.equal("true", out)
  end)

  it("decodes a value whose metatable a part not loaded yet registers", function()
    local mp = require "multiprocessing"
    local p = mp.Process { target = function() error({ code = 7 }) end }
    local restore = H.capture_stderr()
    finally(restore)
    p:start()
    p:join()
    restore()
    local ok, e = pcall(p.result, p)
    assert.is_false(ok)
    assert.equal("multiprocessing.TaskError", getmetatable(e).__name)
    local path = H.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write(mp.encode(e))
    f:close()
    local out = fresh(([[
      local mp = require "multiprocessing"
      local f = assert(io.open(%q, "rb"))
      local e = mp.decode(f:read("a"))
      f:close()
      io.write(getmetatable(e).__name, " ", tostring(e.value.code))
    ]]):format(path))
    os.remove(path)
    assert.equal("multiprocessing.TaskError 7", out)
  end)
end)

-- The layer's bytecode, built into the core (scripts/lua_layer.lua): used for a file of the layer
-- only when that file is byte for byte the one built, named and numbered as the file.
describe("the Lua layer's bytecode", function()
  -- the line of pool.lua (as in dir) where Pool:map is defined
  local function map_line(dir)
    local n = 0
    for line in io.lines(dir .. "/multiprocessing/pool.lua") do
      n = n + 1
      if line:find("^function Pool:map%(") then return n end
    end
  end

  -- what the script prints: the module's file, the searcher before Lua's own (what it gives for
  -- pool.lua, then for process.lua), Pool:map's file and line, the file and line of the error
  -- of a bad map in its traceback, init.lua's functions' file, and whether init.lua comes from
  -- the bytecode (the third value of core._layer_init; the searcher gives pool.lua's only then)
  local PROBE = [[
    local mp, file = require "multiprocessing"
    local s = package.searchers[2]
    local f, where = s("multiprocessing.pool")
    local g, gwhere = s("multiprocessing.process")
    local pool <close> = mp.Pool(1)
    local info = debug.getinfo(pool.map, "S")
    local _, tb = xpcall(pool.map, debug.traceback, pool, 42, { 1 })
    io.write(file, " ", #package.searchers, " ", type(f), " ", tostring(where), " ", type(g), " ", tostring(gwhere), " ",
      info.source, ":", info.linedefined, " ", tb:match("(%S+pool%.lua:%d+): in function <%S+pool%.lua:%d+>") or tb, " ",
      debug.getinfo(getmetatable(mp).__index, "S").source, " ", tostring(EDITED), " ",
      tostring(select(3, require("multiprocessing.core")._layer_init("multiprocessing", file))))
  ]]

  it("loads the files built from their bytecode, named and numbered as the files", function()
    local out = fresh(PROBE .. [[
      package.loaded.multiprocessing = nil  -- loaded again: the searcher is not put in twice
      require "multiprocessing"
      io.write(" ", #package.searchers)
    ]])
    local line = map_line("lua")
    local pieces = {}
    for w in out:gmatch("%S+") do pieces[#pieces + 1] = w end
    assert.same({ "./lua/multiprocessing.lua", "5", "function", "./lua/multiprocessing/pool.lua", "function",
      "./lua/multiprocessing/process.lua", "@./lua/multiprocessing/pool.lua:" .. line, pieces[8],
      "@./lua/multiprocessing/init.lua", "nil", "true", "5" }, pieces)
    local at = tonumber(pieces[8]:match("^%./lua/multiprocessing/pool%.lua:(%d+)$"))
    assert.is_true(at and at > line and at < line + 30, pieces[8])  -- a line of Pool:map
  end)

  it("loads an edited file from its source, the others from their bytecode", function()
    local dir = H.tmpname()
    os.remove(dir)
    assert(os.execute("cp -r lua " .. H.quote(dir)))
    finally(function() os.execute("rm -rf " .. H.quote(dir)) end)
    for _, name in ipairs { "init", "pool" } do  -- a line on top: the sources' lines move down by one
      local path = dir .. "/multiprocessing/" .. name .. ".lua"
      local text = H.slurp(path)
      local f = assert(io.open(path, "w"))
      f:write("EDITED = (EDITED or '') .. '" .. name .. ",'\n", text)
      f:close()
    end
    local out = fresh(PROBE, dir .. "/?.lua;" .. dir .. "/?/init.lua;;")
    local line = map_line(dir)
    assert.equal(map_line("lua") + 1, line)
    local pieces = {}
    for w in out:gmatch("%S+") do pieces[#pieces + 1] = w end
    assert.same({ dir .. "/multiprocessing.lua", "5", "nil", "nil", "function", dir .. "/multiprocessing/process.lua",
      "@" .. dir .. "/multiprocessing/pool.lua:" .. line, pieces[8], "@" .. dir .. "/multiprocessing/init.lua",
      "init,pool,", "false" }, pieces)
  end)

  it("serves the other files to a path that finds init.lua first", function()
    local out = fresh([[
      local mp, file = require "multiprocessing"
      local pool <close> = mp.Pool(1)
      io.write(file, " ", #package.searchers, " ", type(package.searchers[2]("multiprocessing.pool")), " ",
        debug.getinfo(pool.map, "S").source,
        " ", pool:map(function(x) return x + 1 end, { 1 })[1])
    ]], "./lua/?/init.lua;./lua/?.lua;;")
    assert.equal("./lua/multiprocessing/init.lua 5 function @./lua/multiprocessing/pool.lua 2", out)
  end)
end)
