describe("multiprocessing", function()
  it("loads without globals", function()
    local before = {}
    for k in pairs(_G) do before[k] = true end
    local mp = require "multiprocessing"
    assert.is_table(mp)
    assert.is_string(mp._VERSION)
    for k in pairs(_G) do assert.is_true(before[k], "new global " .. tostring(k)) end
  end)
end)
