-- pool_wait_sec.lua: seed 001's wait_sec with map, imap and imap_unordered on Pool(3).
local mp = require "multiprocessing"

local function wait_sec(sec)
  mp.sleep(sec)    -- sleep `sec` seconds (Lua has no sleep of its own)
  return sec ^ 2
end

local secs = { 0.1, 0.5, 0.3 }
local pool <close> = mp.Pool(3)  -- closed and joined at the end of the scope

-- serial, for comparison
local t0 = mp.now()
for _, s in ipairs(secs) do wait_sec(s) end
print(("serial: it took %.2f sec"):format(mp.now() - t0))

-- map: one table of results, once all are done
t0 = mp.now()
local r = pool:map(wait_sec, secs)
print(("map: it took %.2f sec: %s"):format(mp.now() - t0, table.concat(r, ", ")))

-- imap: results in input order, each as soon as it and those before it are done
t0 = mp.now()
for i, v in pool:imap(wait_sec, secs) do
  print(("imap: item %d = %g at %.2f sec"):format(i, v, mp.now() - t0))
end

-- imap_unordered: results as they finish (0.1, then 0.3, then 0.5)
t0 = mp.now()
for i, v in pool:imap_unordered(wait_sec, secs) do
  print(("imap_unordered: item %d = %g at %.2f sec"):format(i, v, mp.now() - t0))
end
