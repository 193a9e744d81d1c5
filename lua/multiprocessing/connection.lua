-- connection.lua: Listener, Client and wait, as Python's multiprocessing.connection
-- (the OS side is src/socket.c; the Connections are Pipe's, src/pipe.c; docs/connection.md).
local core = require "multiprocessing.core"

local M = {}

local HANDSHAKE_TIMEOUT = 20      -- seconds a handshake may take when no timeout bounds it
local CHALLENGE = "#CHALLENGE#"   -- the handshake's messages (docs/connection.md, Authentication)
local WELCOME = "#WELCOME#"
local FAILURE = "#FAILURE#"
local DIGEST = "{sha256}"
local NONCE = 40                  -- random bytes in a challenge
local HANDSHAKE_MAX = 256         -- a longer handshake message is refused unread
local POLL_MIN, POLL_MAX = 0.001, 0.01  -- wait's polling fallback: first and longest sleep

---------------------------------------------------------------- addresses

-- how an address is shown in messages: abstract names as "@name", as ss(8) does
local function show(address)
  if type(address) == "table" then
    return ("%s:%s"):format(tostring(address.host or address[1]), tostring(address.port or address[2]))
  end
  if address:byte(1) == 0 then return "@" .. address:sub(2) end
  return address
end

-- kind ("unix"|"tcp"), a, b of an address: a Unix path, "\0name" (abstract),
-- "host:port", "[v6]:port", or {host, port} / {host = h, port = p}
local function parse(address, who)
  local t = type(address)
  if t == "table" then
    local host, port = address.host or address[1], address.port or address[2]
    if type(host) ~= "string" or math.type(port) ~= "integer" then
      error(("bad argument #1 to '%s' (address table must be {host, port}: a string and an integer)"):format(who), 3)
    end
    return "tcp", host, port
  elseif t == "string" then
    if address:byte(1) == 0 then return "unix", address end
    local h, p = address:match("^%[([%x:%.]+)%]:(%d+)$")
    if not h then h, p = address:match("^([%w%.%-]*):(%d+)$") end
    if h then return "tcp", h, tonumber(p) end
    return "unix", address
  end
  error(("bad argument #1 to '%s' (address expected: a string or {host, port}, got %s)"):format(who, t), 3)
end

local function check_opts(opts, allowed, who)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(("bad argument #2 to '%s' (options table expected, got %s)"):format(who, type(opts)), 3)
  end
  for k in pairs(opts) do
    if not allowed[k] then error(("bad argument #2 to '%s' (unknown option %s)"):format(who, tostring(k)), 3) end
  end
  local key = opts.authkey
  if key ~= nil and (type(key) ~= "string" or key == "") then
    error(("bad argument #2 to '%s' (authkey must be a non-empty string)"):format(who), 3)
  end
  -- the handshake's HMAC needs libcrypto, opened at its first use: told here if missing
  if key ~= nil then core.need_lib("crypto", "mp.connection." .. who) end
  local trust = opts.trust
  if trust ~= nil and trust ~= "all" and trust ~= "data" then
    error(("bad argument #2 to '%s' (trust must be \"all\" or \"data\", got %s)"):format(who, tostring(trust)), 3)
  end
  for _, k in ipairs { "timeout", "handshake_timeout" } do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v ~= v) then
      error(("bad argument #2 to '%s' (%s must be a number)"):format(who, k), 3)
    end
  end
  return opts
end

-- what recv decodes: everything when both ends proved the key, data otherwise (docs/codec.md, Trust)
local function trust_of(opts)
  return opts.trust or (opts.authkey and "all" or "data")
end

---------------------------------------------------------------- the handshake

-- Each side proves it has the key by answering the other's challenge: the
-- HMAC-SHA256, under the key, of a fresh random message. Both return true, or
-- nil, reason, word ("auth", or the word of a failed recv: "timeout", "closed",
-- "interrupted"). A peer that sends anything else breaks the connection (raises:
-- the caller protects the handshake).
local function recv_small(c, deadline)
  local left = deadline - core.now()
  local m, why = core.conn_recv_limited(c, HANDSHAKE_MAX, left > 0 and left or 0)
  if m == nil and (why == "too long" or why == "unexpected") then
    return nil, "the peer sent something else than the handshake", "auth"
  end
  if m == nil then return nil, why, why end
  return m
end

local function deliver_challenge(c, key, deadline)
  local msg = DIGEST .. core.random_bytes(NONCE)
  local ok, why = c:send_bytes(CHALLENGE .. msg)
  if not ok then return nil, why, why end
  local answer, why2, word = recv_small(c, deadline)
  if not answer then return nil, why2, word end
  if core.compare_digest(answer, DIGEST .. core.hmac_sha256(key, msg)) then
    c:send_bytes(WELCOME)
    return true
  end
  c:send_bytes(FAILURE)
  return nil, "the peer's answer to our challenge is wrong (it has another authkey)", "auth"
end

local function answer_challenge(c, key, deadline)
  local m, why, word = recv_small(c, deadline)
  if not m then return nil, why, word end
  if m:sub(1, #CHALLENGE + #DIGEST) ~= CHALLENGE .. DIGEST then
    return nil, "the peer sent no challenge (has it an authkey?)", "auth"
  end
  local ok, why2 = c:send_bytes(DIGEST .. core.hmac_sha256(key, m:sub(#CHALLENGE + 1)))
  if not ok then return nil, why2, why2 end
  local r, why3, word3 = recv_small(c, deadline)
  if r == WELCOME then return true end
  if r == FAILURE then return nil, "the peer refused our answer to its challenge (it has another authkey)", "auth" end
  if r then return nil, "the peer sent something else than the handshake", "auth" end
  return nil, why3, word3
end

-- runs the two halves (listener: deliver first; client: answer first), protected
local function handshake(c, key, deadline, listener_side)
  local first = listener_side and deliver_challenge or answer_challenge
  local second = listener_side and answer_challenge or deliver_challenge
  local ok, r, why, word = pcall(function()
    local done, why1, word1 = first(c, key, deadline)
    if not done then return nil, why1, word1 end
    return second(c, key, deadline)
  end)
  if not ok and tostring(r):find("interrupted!$") then error(r, 0) end  -- Ctrl-C (lua.c's hook)
  if not ok then return nil, "the peer broke the handshake (" .. tostring(r):gsub("^.-: ", "") .. ")", "auth" end
  return r, why, word
end

---------------------------------------------------------------- Listener

local Listener = { __name = "multiprocessing.connection.Listener" }
local lmethods = {}
Listener.__index = lmethods
Listener.__tostring = function(l)
  return ("Listener(%s%s)"):format(show(l.address), rawget(l, "_closed") and ", closed" or "")
end

local function check_listener(l, fname)
  if getmetatable(l) ~= Listener then
    error(("bad self to '%s' (Listener expected, got %s)"):format(fname, type(l)), 3)
  end
  return l
end

local tmpcount = 0
local function default_address(family)
  if family == "tcp" then return "127.0.0.1:0" end
  tmpcount = tmpcount + 1
  local rnd = core.random_bytes(6):gsub(".", function(ch) return ("%02x"):format(ch:byte()) end)
  local name = ("lua-mp-%d-%d-%s.sock"):format(core.getpid(), tmpcount, rnd)
  if family == "abstract" then return "\0" .. name end
  return (os.getenv("TMPDIR") or "/tmp") .. "/" .. name
end

local LOPTS = { authkey = true, backlog = true, trust = true, handshake_timeout = true, family = true }

--- Listener([address [, {authkey =, backlog =, trust =, handshake_timeout =, family =}]])
function M.Listener(address, opts)
  opts = check_opts(opts, LOPTS, "Listener")
  local family = opts.family
  if family ~= nil and family ~= "unix" and family ~= "abstract" and family ~= "tcp" then
    error(("bad argument #2 to 'Listener' (family must be \"unix\", \"abstract\" or \"tcp\", got %s)"):format(tostring(family)), 2)
  end
  if address == nil then address = default_address(family) end
  local kind, a, b = parse(address, "Listener")
  local backlog = opts.backlog
  if backlog ~= nil and math.type(backlog) ~= "integer" then
    error("bad argument #2 to 'Listener' (backlog must be an integer)", 2)
  end
  local l, err, code = core.listen(kind, a, b or 0, backlog)
  if not l then return nil, ("Listener(%s): %s"):format(show(address), err), code end
  local self = setmetatable({
    _l = l, _authkey = opts.authkey, _trust = trust_of(opts),
    _hs = opts.handshake_timeout or HANDSHAKE_TIMEOUT,
  }, Listener)
  self.address = kind == "tcp" and l:_address() or address
  return self
end

--- listener:accept([timeout]) -> Connection | nil, "timeout"|"interrupted" | nil, message, "auth"|code
function lmethods.accept(self, timeout)
  check_listener(self, "accept")
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout) then
    error("bad argument #1 to 'accept' (timeout must be a number)", 2)
  end
  local c, peer, code = self._l:accept(timeout)
  if not c then
    if code then return nil, "accept: " .. tostring(peer), code end
    return nil, peer
  end
  self.last_accepted = peer
  if self._authkey then
    local ok, why, word = handshake(c, self._authkey, core.now() + self._hs, true)
    if not ok then
      c:close()
      if word == "interrupted" then return nil, "interrupted" end
      local from = peer and (" from " .. show(peer)) or ""
      if word ~= "auth" then why = ("the client did not finish the handshake (%s)"):format(why) end
      return nil, ("accept: authentication failed%s: %s"):format(from, why), "auth"
    end
  end
  core.conn_trust(c, self._trust)
  return c
end

--- listener:close(): stops listening; a Unix path is unlinked (by its creator only)
function lmethods.close(self)
  check_listener(self, "close")
  self._l:close()
  self._closed = true
end
Listener.__close = lmethods.close

function lmethods.fileno(self)
  check_listener(self, "fileno")
  return self._l:fileno()
end

-- wait's protocol (see M.wait)
function lmethods._wait_fd(self) return self._l:fileno() end

---------------------------------------------------------------- Client

local COPTS = { authkey = true, timeout = true, trust = true, handshake_timeout = true }

--- Client(address [, {authkey =, timeout =, trust =, handshake_timeout =}]) -> Connection
---   | nil, "timeout"|"interrupted" | nil, message, code; raises when authentication fails
function M.Client(address, opts)
  opts = check_opts(opts, COPTS, "Client")
  local kind, a, b = parse(address, "Client")
  local timeout = opts.timeout
  local deadline = timeout and core.now() + math.max(timeout, 0)
  local c, why, code = core.connect(kind, a, b or 0, timeout, true)
  if not c then
    if code then return nil, ("Client(%s): %s"):format(show(address), why), code end
    return nil, why
  end
  local key = opts.authkey
  if key then
    local hs = core.now() + (opts.handshake_timeout or HANDSHAKE_TIMEOUT)
    local limit = deadline and math.min(deadline, hs) or hs
    local ok, why2, word = handshake(c, key, limit, false)
    if not ok then
      c:close()
      if word == "interrupted" then return nil, "interrupted" end
      if word == "timeout" and deadline and limit == deadline then return nil, "timeout" end
      if word == "timeout" then
        why2 = ("no challenge or answer from the listener within %g s (has it an authkey?)"):format(
          opts.handshake_timeout or HANDSHAKE_TIMEOUT)
      elseif word == "closed" then
        why2 = "the listener closed the connection during the handshake"
      end
      error(("Client(%s): authentication failed: %s"):format(show(address), why2), 2)
    end
  end
  core.conn_trust(c, trust_of(opts))
  return c
end

---------------------------------------------------------------- wait

local QUEUES = { ["multiprocessing.Queue"] = true, ["multiprocessing.SimpleQueue"] = true,
                 ["multiprocessing.JoinableQueue"] = true }

-- How object #i is waited on: fd, a descriptor that polls readable when it is
-- ready, or may be; ready, a function telling whether it is ready now (alone:
-- looked at between short polls; with fd: asked when fd wakes, and once at the
-- start); now, true when it is known ready already (a Connection's buffer).
local function waitable(o, i)
  if math.type(o) == "integer" then return o end
  local mt = getmetatable(o)
  local name = type(mt) == "table" and rawget(mt, "__name")
  if name == "multiprocessing.Connection" then
    if o.closed then error(("wait: object #%d is a closed Connection"):format(i), 3) end
    if not o.readable then error(("wait: object #%d is a write-only Connection"):format(i), 3) end
    return o:fileno(), nil, o:poll(0)
  elseif name and QUEUES[name] then
    return nil, function() return not o:empty() end
  end
  -- the protocol (Listener and Process implement it too)
  local okf, fdf = pcall(function() return o._wait_fd end)
  local okr, rdf = pcall(function() return o._wait_ready end)
  fdf, rdf = okf and fdf or nil, okr and rdf or nil
  if type(fdf) ~= "function" and type(rdf) ~= "function" then
    error(("wait: object #%d (%s) cannot be waited on: a Connection, Listener, Process, Queue, descriptor, "
      .. "or an object with _wait_fd or _wait_ready expected"):format(i, name or type(o)), 3)
  end
  local fd = type(fdf) == "function" and fdf(o) or nil
  if fd ~= nil and math.type(fd) ~= "integer" then
    error(("wait: object #%d: _wait_fd returned %s, not a descriptor"):format(i, type(fd)), 3)
  end
  local ready = type(rdf) == "function" and function() return rdf(o) end or nil
  return fd, ready
end

--- wait(objects [, timeout]) -> the ready objects (a list, empty at the timeout) | nil, "interrupted"
function M.wait(objects, timeout)
  if type(objects) ~= "table" then
    error(("bad argument #1 to 'wait' (table expected, got %s)"):format(type(objects)), 2)
  end
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout) then
    error("bad argument #2 to 'wait' (timeout must be a number)", 2)
  end
  local deadline = timeout and timeout ~= math.huge and core.now() + math.max(timeout, 0) or nil
  local n = #objects
  local fds, fdobj = {}, {}       -- descriptors to poll, and whose they are
  local confirm = {}              -- object index -> its ready function
  local pollers = {}              -- indexes of objects without a descriptor
  local hit = {}                  -- indexes of the ready objects
  for i = 1, n do
    local fd, ready, now = waitable(objects[i], i)
    if fd then fds[#fds + 1], fdobj[#fds + 1] = fd, i end
    if ready then
      confirm[i] = ready
      if not fd then pollers[#pollers + 1] = i end
      if ready() then now = true end
    end
    if now then hit[i] = true end
  end
  local step = POLL_MIN
  while true do
    local wait_for
    if next(hit) ~= nil then wait_for = 0
    elseif deadline then
      wait_for = math.max(deadline - core.now(), 0)
      if #pollers > 0 then wait_for = math.min(wait_for, step) end
    else
      wait_for = #pollers > 0 and step or nil
    end
    local r, why = core.poll_fds(fds, wait_for)
    if not r then
      if why == "interrupted" then return nil, "interrupted" end
      error("wait: " .. tostring(why), 2)
    end
    for _, k in ipairs(r) do
      local i = fdobj[k]
      if not hit[i] and (not confirm[i] or confirm[i]()) then hit[i] = true end
    end
    for _, i in ipairs(pollers) do
      if not hit[i] and confirm[i]() then hit[i] = true end
    end
    if next(hit) ~= nil or (deadline and core.now() >= deadline) then break end
    step = math.min(step * 2, POLL_MAX)
  end
  local list = {}
  for i = 1, n do if hit[i] then list[#list + 1] = objects[i] end end
  return list
end

return M
