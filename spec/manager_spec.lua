local mp = require "multiprocessing"

describe("Manager", function()
  local manager
  before_each(function() manager = mp.Manager() end)
  after_each(function() manager:shutdown() end)

  it("runs its server in a daemon process that shutdown stops", function()
    local m = mp.Manager()
    assert.is_true(m._proc:is_alive())
    m:shutdown()
    assert.is_false(m._proc:is_alive())
    m:shutdown()  -- idempotent
  end)

  it("gives dicts that child processes fill", function()
    local d = manager:dict()
    local procs = {}
    for i = 1, 4 do
      procs[i] = mp.Process { target = function(dd, n) dd[n] = n * 2 end, args = { d, i } }
      procs[i]:start()
    end
    for _, p in ipairs(procs) do p:join() assert.equal(0, p.exitcode) end
    assert.same({ 2, 4, 6, 8 }, d:totable())
    assert.equal(4, #d)
  end)

  it("supports get with a default, pop, update, keys, values, clear and pairs", function()
    local d = manager:dict { a = 1 }
    assert.equal(1, d.a)
    assert.equal("x", d:get("missing", "x"))
    d:update { b = 2, c = 3 }
    assert.equal(3, d:pop("c"))
    assert.equal("none", d:pop("c", "none"))
    local ks = d:keys() table.sort(ks)
    assert.same({ "a", "b" }, ks)
    local vs = d:values() table.sort(vs)
    assert.same({ 1, 2 }, vs)
    local seen = {}
    for k, v in pairs(d) do seen[k] = v end
    assert.same({ a = 1, b = 2 }, seen)
    d.a = nil
    assert.is_nil(d.a)
    d:clear()
    assert.equal(0, #d)
  end)

  it("gives lists with append, extend, insert, pop and bounds checks", function()
    local l = manager:list { 1, 2 }
    l:append(3)
    l:extend { 4, 5 }
    l:insert(1, 0)
    assert.same({ 0, 1, 2, 3, 4, 5 }, l:totable())
    assert.equal(5, l:pop())
    assert.equal(0, l:pop(1))
    assert.equal(4, #l)
    assert.equal(2, l[2])
    local ok, err = pcall(function() l[9] = 1 end)
    assert.is_false(ok)
    assert.matches("list%[9%]: index out of range %(length 4%)", err)
    l:clear()
    assert.has_error(function() l:pop() end, "list:pop(): pop from an empty list")
  end)

  it("updates atomically with update_with from pool workers", function()
    local d = manager:dict()
    local pool <close> = mp.Pool(2)
    pool:map(function(x) d:update_with("sum", function(v) return (v or 0) + x end) end, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 })
    assert.equal(55, d.sum)
  end)

  it("raises when its server is gone", function()
    local m = mp.Manager()
    local d = m:dict()
    m._proc:kill()
    m._proc:join()
    assert.has_error(function() d.x = 1 end, "dict['x']: the manager process is gone")
    m:shutdown()
  end)
end)
