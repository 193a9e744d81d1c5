-- futures_crawl.lua: heterogeneous work with futures. A "crawl" over a made-up site: each page
-- costs a very different amount of work (from microseconds to a tenth of a second) and links to
-- pages found only once it is processed. Pages are submitted as they are discovered and consumed
-- as they finish with mp.as_completed; a slow page never holds up the quick ones behind it.
local mp = require "multiprocessing"

-- page n: its cost (loop iterations) and its links, known only to whoever processes it
local function process(n)
  local cost = (n * 7919) % 13 == 0 and 3000000 or (n * 104729) % 20000  -- a few pages are heavy
  local x = 0
  for i = 1, cost do x = (x + i * i) % 1000003 end
  local links = {}
  if n < 200 then  -- a tree of about 400 pages
    links[1], links[2] = 2 * n, 2 * n + 1
  end
  return n, x, links, mp.current_process().name
end

local pool <close> = mp.Pool(4)
local t0 = mp.now()
local seen, pending = { [1] = true }, { pool:submit(process, 1) }
local done, by_worker, overtaken = 0, {}, 0
while #pending > 0 do
  local discovered = {}
  -- consume this round's pages as they finish; what they link to is submitted at once, so it
  -- runs while the slow pages of this round are still being processed
  local last = 0
  for f in mp.as_completed(pending, 60) do
    local n, _, links, worker = f:result()
    done = done + 1
    by_worker[worker] = (by_worker[worker] or 0) + 1
    if n < last then overtaken = overtaken + 1 end  -- a page submitted later finished first
    last = n
    for _, m in ipairs(links) do
      if not seen[m] then
        seen[m] = true
        discovered[#discovered + 1] = pool:submit(process, m)
      end
    end
  end
  pending = discovered
end

print(("crawled %d pages in %.2f s"):format(done, mp.now() - t0))
print(("%d pages finished after pages submitted later than them"):format(overtaken))
local names = {}
for name in pairs(by_worker) do names[#names + 1] = name end
table.sort(names)
for _, name in ipairs(names) do print(("  %s processed %d pages"):format(name, by_worker[name])) end

-- wait and cancel: stop early once one answer is enough
local fs = {}
for i = 1, 40 do fs[i] = pool:submit(process, 1000 + i) end
local first = mp.wait(fs, { return_when = mp.FIRST_COMPLETED })
local cancelled = 0
for _, f in ipairs(fs) do if f:cancel() then cancelled = cancelled + 1 end end
print(("first of 40 answered: page %d; %d others cancelled before they started"):format(
  (first[1]:result()), cancelled))
