-- Listener, Client and wait (mp.connection): unrelated processes over Unix and TCP
-- sockets, the authkey handshake, the faults (wrong key, no listener, a peer killed
-- mid-message, Ctrl-C) and wait over a mix of objects.
local mp = require "multiprocessing"
local core = require "multiprocessing.core"
local H = require "helpers"
local C = mp.connection

-- is there a socket file at path? (test -S: system() opens nothing here, as fd_count needs)
local function exists(path)
  return os.execute("test -S " .. H.quote(path)) == true
end

-- runs a Lua chunk in a new interpreter (an unrelated program: no common Lua state,
-- started by the shell), in the background; returns a function that waits for it
-- and gives its output (stdout and stderr) and whether it succeeded
local function run_lua(code)
  local out = H.tmpname()
  local script = H.tmpname()
  local f = assert(io.open(script, "w"))
  f:write(code)
  f:close()
  local done = H.tmpname()
  assert(os.execute(("(%s %s %s > %s 2>&1; echo $? > %s) &"):format(H.ENV, H.LUA, script, out, done)))
  return function()
    assert(H.eventually(function() return (H.slurp(done) or ""):find("%d") end, 30), "the program did not end")
    return H.slurp(out), tonumber(H.slurp(done):match("%d+"))
  end, out
end

describe("mp.connection", function()
  H.leak_check(before_each, after_each)

  describe("Listener and Client", function()
    it("connect over a Unix path, authenticate, and carry any value both ways", function()
      local l = assert(C.Listener(nil, { authkey = "secret" }))
      assert.matches("^/.*%.sock$", l.address)
      assert.is_true(exists(l.address))
      local pid = H.spawn(function()
        local c = C.Client(l.address, { authkey = "secret", timeout = 20 })
        local v = assert(c:recv(20))
        c:send(v.f(20))  -- a function travels: both ends proved the key
        c:close()
      end)
      local c = assert(l:accept(20))
      assert.equal("multiprocessing.Connection", getmetatable(c).__name)
      assert.equal("all", c.trust)
      assert.is_true(c:send({ f = function(x) return x + 1 end }))
      assert.equal(21, c:recv(20))
      assert.same({ nil, "closed" }, { c:recv(20) })
      assert.equal(0, core.waitpid(pid))
      c:close()
      l:close()
      assert.is_false(exists(l.address), "close unlinks the socket path")
    end)

    it("connect over an abstract Unix name and over TCP, by string and by {host, port}", function()
      for _, spec in ipairs { { nil, "abstract" }, { "127.0.0.1:0" }, { { "127.0.0.1", 0 } } } do
        local l = assert(C.Listener(spec[1], { family = spec[2], authkey = "k" }))
        local addr = l.address
        if spec[2] == "abstract" then assert.equal(0, addr:byte(1)) else assert.matches("^127%.0%.0%.1:%d+$", addr) end
        local target = type(spec[1]) == "table" and { "127.0.0.1", tonumber(addr:match(":(%d+)$")) } or addr
        local pid = H.spawn(function()
          local c = C.Client(target, { authkey = "k", timeout = 20 })
          c:send_bytes(c:recv_bytes(20) .. "!")
          c:close()
        end)
        local c = assert(l:accept(20))
        c:send_bytes("ping")
        assert.equal("ping!", c:recv_bytes(20))
        assert.equal(0, core.waitpid(pid))
        c:close()
        l:close()
      end
    end)

    it("lets an unrelated program (lua5.4 started by the shell) connect by address", function()
      local l = assert(C.Listener("127.0.0.1:0", { authkey = "shared key" }))
      local wait = run_lua(([[
        local mp = require "multiprocessing"
        local c = mp.connection.Client(%q, { authkey = "shared key", timeout = 20 })
        local job = c:recv(20)
        c:send({ sum = job[1] + job[2], pid = mp.current_process().pid })
        c:close()
        print("client done")
      ]]):format(l.address))
      local c = assert(l:accept(20))
      c:send({ 2, 3 })
      local r = c:recv(20)
      assert.equal(5, r.sum)
      assert.is_true(r.pid ~= core.getpid())
      local out, code = wait()
      assert.equal(0, code, out)
      assert.matches("client done", out)
      c:close()
      l:close()
    end)

    it("refuses a client with a wrong authkey, on both sides, with a clear error", function()
      local l = assert(C.Listener(nil, { authkey = "right" }))
      local pid = H.spawn(function()
        local ok, err = pcall(C.Client, l.address, { authkey = "wrong", timeout = 20 })
        assert(not ok, "Client with a wrong key succeeded")
        assert(tostring(err):find("authentication failed", 1, true), err)
        assert(tostring(err):find(l.address, 1, true), err)
      end)
      local c, why, code = l:accept(20)
      assert.is_nil(c)
      assert.equal("auth", code)
      assert.matches("authentication failed", why)
      assert.matches("another authkey", why)
      assert.equal(0, core.waitpid(pid))
      -- the listener goes on: the next client with the right key gets in
      local pid2 = H.spawn(function()
        local c2 = C.Client(l.address, { authkey = "right", timeout = 20 })
        c2:send("in")
        c2:close()
      end)
      local c2 = assert(l:accept(20))
      assert.equal("in", c2:recv(20))
      assert.equal(0, core.waitpid(pid2))
      c2:close()
      l:close()
    end)

    it("a client without the key that sends garbage is refused, the listener does not raise", function()
      local l = assert(C.Listener(nil, { authkey = "k", handshake_timeout = 20 }))
      local pid = H.spawn(function()
        local c = C.Client(l.address, { timeout = 20 })
        -- (the listener may refuse and close while this is still sending: the send, or the
        -- receive of the challenge after it, then fails on a broken connection; either is fine)
        if pcall(c.send_bytes, c, ("x"):rep(100000)) then  -- longer than any handshake message
          pcall(c.recv_bytes, c, 20)  -- the challenge
        end
        c:close()
      end)
      local c, why, code = l:accept(20)
      assert.is_nil(c)
      assert.equal("auth", code)
      assert.matches("authentication failed", why)
      assert.equal(0, core.waitpid(pid))
      l:close()
    end)

    it("a keyed client facing a listener without a key fails within its handshake timeout", function()
      local l = assert(C.Listener(nil))
      local err = H.raises("authentication failed", C.Client, l.address, { authkey = "k", handshake_timeout = 0.3 })
      assert.matches("has it an authkey", err)
      local c = assert(l:accept(20))  -- the connection the client gave up
      c:close()
      l:close()
    end)

    it("without an authkey, decodes data only: a function from the peer is refused", function()
      local l = assert(C.Listener("127.0.0.1:0"))
      local pid = H.spawn(function()
        local c = C.Client(l.address, { timeout = 20 })
        c:send(function() return 1 end)
        c:send({ ok = true })
        c:close()
      end)
      local c = assert(l:accept(20))
      assert.equal("data", c.trust)
      H.raises("cannot decode", c.recv, c, 20)
      assert.same({ ok = true }, c:recv(20))  -- the connection stays usable
      assert.equal(0, core.waitpid(pid))
      c:close()
      l:close()
    end)

    it("a client without a listener times out with a timeout, and fails at once without one", function()
      local path = os.tmpname() .. ".absent.sock"
      assert.same({ nil, "timeout" }, { C.Client(path, { timeout = 0.2 }) })
      local c, why, code = C.Client(path)
      assert.is_nil(c)
      assert.matches("^Client%(" .. path:gsub("%p", "%%%0") .. "%): connect: ", why)
      assert.equal("ENOENT", code)
      local l = assert(C.Listener("127.0.0.1:0"))
      local port = l.address:match(":(%d+)$")
      l:close()
      local _, _, code2 = C.Client("127.0.0.1:" .. port)
      assert.equal("ECONNREFUSED", code2)
    end)

    it("a client started before its listener gets in once the listener appears", function()
      local path = os.tmpname() .. ".late.sock"
      local pid = H.spawn(function()
        local c = assert(C.Client(path, { authkey = "k", timeout = 20 }))
        c:send("late but in")
        c:close()
      end)
      core.sleep(0.2)
      local l = assert(C.Listener(path, { authkey = "k" }))
      local c = assert(l:accept(20))
      assert.equal("late but in", c:recv(20))
      assert.equal(0, core.waitpid(pid))
      c:close()
      l:close()
    end)

    it("accept with a timeout returns nil, 'timeout'", function()
      local l = assert(C.Listener())
      assert.same({ nil, "timeout" }, { l:accept(0.1) })
      assert.same({ nil, "timeout" }, { l:accept(0) })
      l:close()
    end)

    it("a peer killed in the middle of a message gives 'closed', not a hang", function()
      local l = assert(C.Listener(nil, { authkey = "k" }))
      local pid = H.spawn(function()
        local c = C.Client(l.address, { authkey = "k", timeout = 20 })
        c:send(("z"):rep(64 << 20))  -- blocks once the socket is full: killed there
      end)
      local c = assert(l:accept(20))
      assert.is_true(c:poll(20))  -- the message has begun
      core.kill(pid, 9)
      assert.equal(-9, core.waitpid(pid))
      assert.same({ nil, "closed" }, { c:recv(20) })
      c:close()
      l:close()
    end)

    it("passes Connections over a Unix socket, refuses them over TCP", function()
      local l = assert(C.Listener(nil, { authkey = "k" }))
      local pid = H.spawn(function()
        local c = C.Client(l.address, { authkey = "k", timeout = 20 })
        local inner = c:recv(20)
        inner:send("through a passed Connection")
        inner:close()
        c:close()
      end)
      local c = assert(l:accept(20))
      local a, b = mp.Pipe()
      c:send(b)
      b:close()
      assert.equal("through a passed Connection", a:recv(20))
      assert.equal(0, core.waitpid(pid))
      a:close()
      c:close()
      l:close()
      local t = assert(C.Listener("127.0.0.1:0"))
      local x = assert(C.Client(t.address))
      local y = assert(t:accept(20))
      local p, q = mp.Pipe()
      H.raises("cannot send a Connection over a TCP Connection", x.send, x, p)
      assert.is_true(x:send("still fine"))
      assert.equal("still fine", y:recv(20))
      for _, o in ipairs { x, y, p, q, t } do o:close() end
    end)

    it("close unlinks the path in its creator only, and not a path taken over since", function()
      local l = assert(C.Listener())
      local pid = H.spawn(function() l:close() end)  -- a forked copy closes its descriptor only
      assert.equal(0, core.waitpid(pid))
      assert.is_true(exists(l.address))
      local path = l.address
      os.remove(path)
      local l2 = assert(C.Listener(path))
      l:close()
      assert.is_true(exists(path), "a newer Listener's socket was unlinked")
      l2:close()
      assert.is_false(exists(path))
    end)

    it("reports a taken address with the call and the address", function()
      local l = assert(C.Listener())
      local l2, why, code = C.Listener(l.address)
      assert.is_nil(l2)
      assert.equal("EADDRINUSE", code)
      assert.matches("^Listener%(.*%): bind: ", why)
      l:close()
    end)

    it("raises on bad arguments", function()
      H.raises("address expected", C.Client, 42)
      H.raises("unknown option", C.Client, "/tmp/x", { authkye = "k" })
      H.raises("authkey must be a non-empty string", C.Listener, nil, { authkey = 1 })
      H.raises("trust must be", C.Listener, nil, { trust = "some" })
      H.raises("address table must be", C.Client, { "localhost" })
      H.raises("too long", C.Listener, "/tmp/" .. ("x"):rep(200))
      local l = assert(C.Listener())
      l:close()
      assert.matches(", closed%)$", tostring(l))
      H.raises("closed Listener", l.accept, l)
      H.raises("Listener expected", l.accept, {})
    end)
  end)

  describe("wait", function()
    it("returns the ready objects of a mix, in order, and {} at the timeout", function()
      local a, b = mp.Pipe()
      local q = mp.Queue()
      local l = assert(C.Listener())
      local p = mp.Process { target = function() core.sleep(0.1) end }:start()
      local done = false
      local custom = { _wait_ready = function() return done end }
      local objs = { b, q, p, l, custom }
      assert.same({}, C.wait(objs, 0))
      assert.same({}, C.wait(objs, 0.05))
      assert.same({ p }, C.wait({ b, q, p, l, custom }, 20))
      q:put(1)
      assert.same({ q, p }, C.wait(objs, 20))
      a:send("x")
      done = true
      local c = assert(C.Client(l.address))
      assert.same({ b, q, p, l, custom }, C.wait(objs, 20))
      assert.equal("x", b:recv())
      assert.equal(1, q:get())
      local s = assert(l:accept(1))
      p:join()
      for _, o in ipairs { a, b, c, s, l, q } do o:close() end
      p:close()
    end)

    it("wakes on a Queue put by another process (the polling fallback)", function()
      local q = mp.Queue()
      local pid = H.spawn(function() core.sleep(0.2); q:put("hi") end)
      assert.same({ q }, C.wait({ q }, 20))
      assert.equal("hi", q:get())
      assert.equal(0, core.waitpid(pid))
      q:close()
    end)

    it("sees buffered messages, descriptors, and objects with _wait_fd", function()
      local a, b = mp.Pipe()
      a:send(1); a:send(2)
      assert.equal(1, b:recv())  -- 2 is read ahead into b's buffer: the socket is empty
      assert.same({ b }, C.wait({ b }, 0))
      local r, w = mp.Pipe(false)
      local obj = { _wait_fd = function() return r:fileno() end }
      assert.same({}, C.wait({ r:fileno(), obj, a }, 0))
      w:send("go")
      assert.same({ r:fileno(), obj }, C.wait({ r:fileno(), obj, a }, 20))
      -- a descriptor is a hint when _wait_ready is there too: it must confirm
      local asked = 0
      local hinted = { _wait_fd = function() return r:fileno() end,
                       _wait_ready = function() asked = asked + 1; return asked > 2 end }
      assert.same({}, C.wait({ hinted }, 0))
      assert.same({ hinted }, C.wait({ hinted }, 20))
      for _, o in ipairs { a, b, r, w } do o:close() end
    end)

    it("raises for what cannot be waited on", function()
      H.raises("object #2", C.wait, { 0, {} })
      H.raises("cannot be waited on", C.wait, { "x" })
      local a, b = mp.Pipe()
      a:close()
      H.raises("closed Connection", C.wait, { b, a })
      b:close()
      local r, w = mp.Pipe(false)
      H.raises("object #2 is a write-only Connection", C.wait, { r, w })
      r:close(); w:close()
      H.raises("table expected", C.wait, nil)
    end)
  end)

  describe("Process.sentinel", function()
    it("is a descriptor that becomes readable when the process ends, closed with the process", function()
      if os.getenv("MP_VALGRIND") then pending("valgrind has no pidfd_open: wait polls exitcode there") return end
      local p = mp.Process { target = function() core.sleep(0.2) end }:start()
      local fd = p.sentinel
      assert.equal("integer", math.type(fd))
      assert.equal(fd, p.sentinel)
      assert.same({}, core.poll_fds({ fd }, 0))
      assert.same({ 1 }, core.poll_fds({ fd }, 20))
      p:join()
      assert.same({ 1 }, core.poll_fds({ fd }, 0))
      p:close()
      assert.is_nil(io.open("/proc/self/fd/" .. fd), "the sentinel is closed")
      H.raises("not started", function() return mp.Process { target = print }.sentinel end)
    end)

    it("of a process already joined is readable at once", function()
      local p = mp.Process { target = function() end }:start()
      p:join()
      assert.same({ p }, C.wait({ p }, 0))
      p:close()
    end)
  end)

  describe("Ctrl-C", function()
    -- lua.c handles SIGINT while it runs a script: the wait must end, the script with "interrupted!"
    for _, case in ipairs {
      { "accept", "local l = C.Listener(); io.write('ready\\n'); io.flush(); l:accept()" },
      { "Client's handshake", [[local l = C.Listener(); io.write('ready\n'); io.flush()
        C.Client(l.address, { authkey = "k" })]] },
      { "wait on a Queue", "local q = mp.Queue(); io.write('ready\\n'); io.flush(); C.wait({ q })" },
    } do
      it("ends a blocked " .. case[1], function()
        local code = case[2]
        local wait, out = run_lua(([[
          local mp = require "multiprocessing"
          local C = mp.connection
          io.write(require("multiprocessing.core").getpid(), "\n")
          %s
          print("not interrupted")
        ]]):format(code))
        assert(H.eventually(function() return (H.slurp(out) or ""):find("ready") end, 20), "did not start")
        local pid = tonumber(H.slurp(out):match("^(%d+)"))
        core.sleep(0.1)
        core.kill(pid, 2)
        local text, rc = wait()
        assert.is_true(rc ~= 0, text)
        assert.matches("interrupted!", text)
        assert.is_nil(text:find("not interrupted"))
      end)
    end
  end)
end)
