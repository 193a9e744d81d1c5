-- Specs of Process, current_process, parent_process, active_children, cpu_count.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"

-- targets must not reach globals through busted's sandbox (see pool_spec.lua)
local error, select, tostring, os, io = error, select, tostring, os, io

local function run_script(script)
  local src, out = H.tmpname(), H.tmpname()
  local f = assert(io.open(src, "w")) f:write(script) f:close()
  local ok = os.execute(("%s %s %s > %s 2>&1"):format(H.ENV, H.LUA, src, out))
  return ok, H.slurp(out)
end

describe("Process", function()
  H.leak_check(before_each, after_each)

  it("starts, joins and reports exit code 0", function()
    local p = mp.Process { target = function() end }
    assert.is_false(p:is_alive())
    assert.is_nil(p.exitcode)
    assert.equal(p, p:start())
    assert.is_number(p.pid)
    assert.is_true(p:join())
    assert.equal(0, p.exitcode)
    assert.is_false(p:is_alive())
  end)

  it("takes the target as the first array item too", function()
    local p = mp.Process { function(a) return a end, args = { 5 } }
    p:start() p:join()
    assert.equal(5, p:result())
  end)

  it("join(timeout) returns nil, \"timeout\" while the child runs", function()
    local p = mp.Process { target = function() mp.sleep(0.3) end }
    p:start()
    assert.is_true(p:is_alive())
    local ok, why = p:join(0.02)
    assert.is_nil(ok)
    assert.equal("timeout", why)
    assert.is_nil(p.exitcode)
    assert.is_true(p:join())
    assert.equal(0, p.exitcode)
  end)

  it("reports exit code 1 when the target raises, with the error from result()", function()
    local p = mp.Process { target = function() error("child failed") end, name = "Failing" }
    p:start() p:join()
    assert.equal(1, p.exitcode)
    local err = H.error_of(p.result, p)
    assert.matches("child failed", err)
    assert.matches("stack traceback:", err)
  end)

  it("reports the code given to os.exit", function()
    local p = mp.Process { target = function() os.exit(7) end }
    p:start() p:join()
    assert.equal(7, p.exitcode)
    H.raises("exited with code 7 before returning", p.result, p)
  end)

  it("terminate() gives exit code -15, kill() -9", function()
    local p = mp.Process { target = function() mp.sleep(30) end }
    local q = mp.Process { target = function() mp.sleep(30) end }
    p:start() q:start()
    p:terminate() q:kill()
    p:join() q:join()
    assert.equal(-15, p.exitcode)
    assert.equal(-9, q.exitcode)
    H.raises("was killed by SIGKILL", q.result, q)
    -- on a finished process they do nothing
    p:terminate() q:kill()
  end)

  it("is named Process-N by default", function()
    local a, b = mp.Process {}, mp.Process {}
    local na, nb = tonumber(a.name:match("^Process%-(%d+)$")), tonumber(b.name:match("^Process%-(%d+)$"))
    assert.is_number(na)
    assert.equal(na + 1, nb)
    assert.equal("Worker", mp.Process { name = "Worker" }.name)
  end)

  it("result() returns the target's values, nils included (args.n honoured)", function()
    local p = mp.Process { target = function(...) return select("#", ...), ... end, args = { 1, nil, 3, nil, n = 4 } }
    p:start() p:join()
    local r = table.pack(p:result())
    assert.equal(5, r.n)
    assert.are.same({ 4, 1, nil, 3, nil, n = 5 }, r)
    assert.are.same({ 4, 1, nil, 3, nil, n = 5 }, table.pack(p:result()))  -- again: same values
  end)

  it("result() before join raises", function()
    local p = mp.Process { target = function() mp.sleep(0.2) end }
    H.raises("cannot get the result of a process that was not started", p.result, p)
    p:start()
    H.raises("has not finished (join it first)", p.result, p)
    p:join()
    assert.equal(0, select("#", p:result()))
  end)

  it("rejects bad arguments and misuse", function()
    H.raises("bad argument #1 to 'Process' (table expected, got number)", mp.Process, 1)
    H.raises("target must be callable", mp.Process, { target = 1 })
    H.raises("args must be a table", mp.Process, { target = print, args = 1 })
    local p = mp.Process {}
    H.raises("cannot join a process that was not started", p.join, p)
    p:start()
    H.raises("cannot start a process twice", p.start, p)
    p:join()
  end)

  it("has a readable tostring", function()
    local p = mp.Process { name = "T" }
    assert.matches("<Process name='T' pid=nil initial>", tostring(p), nil, true)
    p:start() p:join()
    assert.matches("stopped exitcode=0", tostring(p))
  end)

  describe("current_process and parent_process", function()
    it("are MainProcess and nil in the parent", function()
      assert.equal("MainProcess", mp.current_process().name)
      assert.equal(core.getpid(), mp.current_process().pid)
      assert.is_nil(mp.parent_process())
    end)

    it("are the child's name and the parent in the child", function()
      local cp, pp = mp.current_process, mp.parent_process
      local p = mp.Process { name = "Kid", target = function()
        return cp().name, cp().pid, pp().name, pp().pid
      end }
      p:start() p:join()
      local name, pid, pname, ppid = p:result()
      assert.equal("Kid", name)
      assert.equal(p.pid, pid)
      assert.equal("MainProcess", pname)
      assert.equal(core.getpid(), ppid)
    end)
  end)

  it("active_children() lists the running children", function()
    local ps = {}
    for i = 1, 2 do ps[i] = mp.Process { target = function() mp.sleep(0.3) end }:start() end
    local kids = mp.active_children()
    assert.equal(2, #kids)
    for _, p in ipairs(ps) do p:join() end
    assert.equal(0, #mp.active_children())
  end)

  it("cpu_count() is a positive integer", function()
    assert.equal("integer", math.type(mp.cpu_count()))
    assert.is_true(mp.cpu_count() >= 1)
  end)

  describe("at the parent's end", function()
    it("daemon children are killed when the parent exits; others are waited for", function()
      local dpid, done = H.tmpname(), H.tmpname()
      os.remove(done)
      local ok, out = run_script(([[
        local mp = require "multiprocessing"
        local d = mp.Process { daemon = true, target = function() mp.sleep(30) end }:start()
        local f = io.open(%q, "w") f:write(d.pid) f:close()
        mp.Process { target = function() mp.sleep(0.1) local g = io.open(%q, "w") g:write("done") g:close() end }:start()
        print("main exits")
      ]]):format(dpid, done))
      assert.is_true(ok, out)
      assert.matches("main exits", out)
      assert.equal("done", H.slurp(done))  -- the non-daemon child ran to the end
      local pid = tonumber(H.slurp(dpid))
      assert.is_true(H.eventually(function() return not H.alive(pid) end, 5))
    end)

    it("children die with a parent killed by SIGKILL", function()
      local pidfile = H.tmpname()
      os.remove(pidfile)
      local parent = H.spawn(function()
        local d = mp.Process { daemon = true, target = function() mp.sleep(30) end }:start()
        local n = mp.Process { target = function() mp.sleep(30) end }:start()
        local f = io.open(pidfile .. ".tmp", "w") f:write(d.pid, " ", n.pid) f:close()
        os.rename(pidfile .. ".tmp", pidfile)
        mp.sleep(30)
      end)
      local s = H.eventually(function() return H.slurp(pidfile) end, 5)
      assert.is_string(s)
      core.kill(parent, 9)
      assert.equal(-9, core.waitpid(parent))
      for p in s:gmatch("%d+") do
        assert.is_true(H.eventually(function() return not H.alive(tonumber(p)) end, 5), "child " .. p .. " survived")
      end
    end)
  end)
end)
