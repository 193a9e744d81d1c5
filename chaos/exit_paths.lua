-- chaos/exit_paths.lua: every way out of a program with our objects alive (issue 7, items 2, 10):
-- os.exit with a pool open, errors at top level, the end of a script, a Process that made a
-- pool, the prompt, a C host that calls exit(). Each must end within the bound, leaving nothing.
local L = require "chaos.lib"
local mp = require "multiprocessing"
local sleep = L.sleep

-- runs a victim script and checks that it ends within the bound with the expected exit code,
-- its session empty; extra(v) checks more. opts: code | args, stdin (text sent, then EOF), cmd.
local function exits(opts)
  return function()
    local v = L.victim { code = opts.code, args = opts.args, stdin = opts.stdin ~= nil, cmd = opts.cmd }
    if opts.stdin then v:send(opts.stdin) end
    local t0
    if opts.code or opts.cmd then v:wait_for("^READY$", 15, "start-up") t0 = L.now() end
    if opts.stdin then
      v:wait_for("READY!", 15, "start-up")
      t0 = L.now()
      if opts.eof then v:close_input() end
    end
    local code, dt = v:wait_exit(L.BOUND + (opts.extra_secs or 0))
    L.fig("exit_ms", math.floor((L.now() - (t0 or L.now() - dt)) * 1000 + 0.5))
    if code == nil then
      L.fail("still running %d s after %s; its processes: %s", L.BOUND + (opts.extra_secs or 0), opts.what,
        L.describe((L.session(v.sid))))
    end
    L.fig("code", code)
    L.check(code == (opts.expect or 0), "%s: exit code %s, expected %d; stderr: %s", opts.what, tostring(code), opts.expect or 0, v:errors():sub(-300))
    local empty, _, live = L.wait_session_empty(v.sid, L.BOUND)
    L.check(empty, "%s: left behind: %s", opts.what, L.describe(live))
    if opts.check then opts.check(v) end
    v:cleanup()
  end
end

local ALIVE = [[
local p = mp.Pool(2)
local busy = p:map_async(function(x) core.sleep(0.2) return x end, { 1, 2, 3, 4 }, 1)
local q = mp.Queue() q:put({ 1, 2, 3 }) q:put(string.rep("x", 100000))
local lock = mp.Lock() lock:acquire()
local a, b = mp.Pipe() a:send("unread")
local e, bar = mp.Event(), mp.Barrier(3)
local short = mp.Process { target = function() core.sleep(0.2) end }:start()
local daemon = mp.Process { target = function() core.sleep(300) end, daemon = true }:start()
local done = mp.Process { target = function() end }:start()
ready()
]]

local C_HOST = [[
#include <stdio.h>
#include <stdlib.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
/* a host that runs a script and leaves with exit(), without lua_close */
int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  if (argc < 2 || luaL_dofile(L, argv[1])) { fprintf(stderr, "%s\n", lua_tostring(L, -1)); exit(1); }
  exit(0);
}
]]

return {
  { name = "exit_os_exit_pool", timeout = 30, run = exits {
    what = "os.exit(0) with a Pool open", code = "local p = mp.Pool(2) ready() os.exit(0)" } },
  { name = "exit_os_exit_false", timeout = 30, run = exits {
    what = "os.exit(0, false) with a busy Pool", code = [[local p = mp.Pool(2)
      local r = p:map_async(function(x) core.sleep(0.3) return x end, { 1, 2, 3, 4 }, 1) ready() os.exit(0, false)]] } },
  { name = "exit_os_exit_close", timeout = 30, run = exits {
    what = "os.exit(0, true) with a busy Pool", code = [[local p = mp.Pool(2)
      local r = p:map_async(function(x) core.sleep(0.3) return x end, { 1, 2, 3, 4 }, 1) ready() os.exit(0, true)]] } },
  { name = "exit_os_exit_all", timeout = 30, run = exits {
    what = "os.exit(3) with pools, processes, queues, locks, pipes alive", expect = 3,
    code = ALIVE .. "os.exit(3)" } },
  { name = "exit_error_toplevel", timeout = 30, run = exits {
    what = "error() at top level with pools, processes, queues alive", expect = 1,
    code = ALIVE .. "error('chaos: boom')",
    check = function(v) L.check(v:errors():find("chaos: boom", 1, true), "the error was not reported: %s", v:errors():sub(-200)) end } },
  { name = "exit_end_of_script", timeout = 30, run = exits {
    what = "the end of a script with everything still open", code = ALIVE } },
  { name = "exit_process_made_pool", timeout = 30, run = exits {
    what = "a Process that made a Pool and returned", code = [[
      local pr = mp.Process { target = function() local p = mp.Pool(2) p:map(function(x) return x end, { 1, 2 }) end }:start()
      ready()
      assert(pr:join(3), "the Process did not end within 3 s")
      assert(pr.exitcode == 0, "exit code " .. tostring(pr.exitcode))]] } },
  { name = "exit_process_os_exit_pool", timeout = 30, run = exits {
    what = "a Process that made a Pool and called os.exit(0)", code = [[
      local pr = mp.Process { target = function() local p = mp.Pool(2) os.exit(0) end }:start()
      ready()
      local ok = pr:join(3)
      if not ok then io.stderr:write("the Process did not end within 3 s\n") os.exit(9) end
      assert(pr.exitcode == 0, "exit code " .. tostring(pr.exitcode))]] } },
  { name = "exit_repl_os_exit", timeout = 30, run = exits {
    what = "os.exit(0) at the lua5.4 -i prompt with a Pool open", args = "-i",
    stdin = 'mp = require "multiprocessing"\np = mp.Pool(2)\nprint("READY" .. "!")\nos.exit(0)\n' } },
  { name = "exit_repl_eof", timeout = 30, run = exits {
    what = "end of input at the lua5.4 -i prompt with a busy Pool open", args = "-i", eof = true,
    stdin = 'mp = require "multiprocessing"\np = mp.Pool(2)\nr = p:map_async(function(x) require("multiprocessing.core").sleep(0.3) return x end, {1,2,3,4}, 1)\nprint("READY" .. "!")\n' } },
  { name = "exit_c_host", timeout = 40, run = function()
    -- a C host that calls exit() without lua_close, after a script that made a Pool
    local src, bin = L.tmpname("host") .. ".c", L.tmpname("host")
    L.write(src, C_HOST)
    local ok = os.execute(("${CC:-cc} -I/usr/include/lua5.4 -o %s %s -llua5.4 2>&1"):format(bin, src))
    L.check(ok, "cannot build the C host (cc, liblua5.4-dev)")
    local script = L.tmpname("hosted") .. ".lua"
    L.write(script, L.PRELUDE .. "local p = mp.Pool(2) ready()\n")
    exits { what = "exit() in a C host with a Pool open", cmd = bin .. " " .. script }()
    os.remove(src) os.remove(bin) os.remove(script)
  end },

  -- item 10: 100 Processes started and never joined must not pile up as zombies
  { name = "process_unjoined_zombies", timeout = 40, run = function()
    for i = 1, 100 do
      mp.Process { target = function() end }:start()
      if i % 10 == 0 then collectgarbage() end
    end
    sleep(0.3)
    collectgarbage() collectgarbage()
    -- Python reaps finished children whenever a new one starts: so may we
    local last = mp.Process { target = function() end }:start()
    last:join()
    local live, zombies
    local ok = L.eventually(function()
      live, zombies = L.children()
      return #zombies <= 2
    end, L.BOUND)
    L.fig("zombies", #zombies)
    L.check(ok, "%d zombies after 100 unjoined Processes ended", #zombies)
  end },
}
