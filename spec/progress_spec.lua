-- Specs of the progress bar: the line format, the bar object, mp.progress.
local mp = require "multiprocessing"
local progress = require "multiprocessing.progress"
local H = require "helpers"

local fmt = progress._format

describe("progress", function()
  H.leak_check(before_each, after_each)

  describe("_format", function()
    it("shows percent, bar, done/total, elapsed, ETA and rate", function()
      local line = fmt(50, 200, 10)
      assert.equal(" 25%|#####               | 50/200 [00:10<00:30, 5.00it/s]", line)
    end)

    it("shows a description", function()
      assert.matches("^work:  25%%|", fmt(50, 200, 10, "work"))
    end)

    it("is full at the end", function()
      assert.equal("100%|####################| 4/4 [00:02<00:00, 2.00it/s]", fmt(4, 4, 2))
    end)

    it("shows seconds per item when slow, and ? for an unknown ETA", function()
      assert.matches("4%.00s/it%]$", fmt(1, 10, 4))
      assert.matches("<%?, 0%.00it/s%]$", fmt(0, 10, 0))
    end)

    it("shows hours past an hour", function()
      assert.matches("%[1:01:01<", fmt(1, 2, 3661))
    end)

    it("without a total shows the count and the rate", function()
      assert.equal("30 [00:03, 10.00it/s]", fmt(30, nil, 3))
      assert.equal("items: 30 [00:03, 10.00it/s]", fmt(30, nil, 3, "items"))
    end)
  end)

  describe("_bar", function()
    it("writes lines to a file when forced", function()
      local name = H.tmpname()
      local f = assert(io.open(name, "w"))
      local bar = progress._bar { total = 3, out = f, force = true, desc = "t" }
      bar:update(1)
      bar:update(3)  -- within 0.1 s of the first: not drawn until close
      bar:close()
      bar:close()  -- idempotent
      f:close()
      local text = H.slurp(name)
      assert.matches("\rt:  33%%|", text)
      assert.matches("\rt: 100%%|####################| 3/3", text)
      assert.equal("\n", text:sub(-1))
    end)

    it("redraws at most ten times a second", function()
      local name = H.tmpname()
      local f = assert(io.open(name, "w"))
      local bar = progress._bar { total = 1000, out = f, force = true }
      for i = 1, 1000 do bar:update(i) end
      bar:close()
      f:close()
      local _, draws = H.slurp(name):gsub("\r", "")
      assert.is_true(draws <= 3, draws .. " redraws")
    end)

    it("draws nothing when not forced and the output is not stderr", function()
      local name = H.tmpname()
      local f = assert(io.open(name, "w"))
      local bar = progress._bar { total = 3, out = f }
      bar:update(3)
      bar:close()
      f:close()
      assert.equal("", H.slurp(name))
    end)

    it("works as a <close> value", function()
      local name = H.tmpname()
      local f = assert(io.open(name, "w"))
      do
        local bar <close> = progress._bar { out = f, force = true }
        bar:update(5)
      end
      f:close()
      assert.matches("5 %[", H.slurp(name))
    end)
  end)

  describe("mp.progress", function()
    it("wraps an iterator and yields the same values", function()
      local xs = {}
      for i = 1, 10 do xs[i] = i * i end
      local i = 0
      local got = {}
      for v in mp.progress(function() i = i + 1 return xs[i] end, 10) do got[#got + 1] = v end
      assert.are.same(xs, got)
    end)

    it("wraps a table", function()
      local got = {}
      for v in mp.progress { "a", "b", "c" } do got[#got + 1] = v end
      assert.are.same({ "a", "b", "c" }, got)
    end)

    it("passes all the iterator's values (imap's index and value)", function()
      local pool <close> = mp.Pool(2)
      local got = {}
      for i, v in mp.progress(pool:imap(function(x) return x + 1 end, { 1, 2, 3 }), 3) do got[i] = v end
      assert.are.same({ 2, 3, 4 }, got)
    end)

    it("writes to a given file when forced", function()
      local name = H.tmpname()
      local f = assert(io.open(name, "w"))
      for _ in mp.progress({ 1, 2 }, nil, { out = f, force = true }) do end
      f:close()
      assert.matches("2/2", H.slurp(name))
    end)

    it("rejects what is not iterable", function()
      H.raises("bad argument #1 to 'progress' (table or iterator function expected, got number)", mp.progress, 5)
    end)
  end)
end)
