-- shared_memory_list: a ShareableList as a small shared scoreboard: pool workers attach to it by
-- name and each writes its own slot; the parent reads the board. Its layout is Python's, so a
-- Python process could attach to it too (multiprocessing.shared_memory.ShareableList(name=...)).
local mp = require "multiprocessing"

local board <close> = assert(mp.ShareableList({ n = 4, 0, 0, 0, 0 }))

local function work(name, slot)
  local sl <close> = assert(mp.ShareableList(name))
  local sum = 0
  for i = 1, 100000 * slot do sum = sum + i % 7 end
  sl[slot] = sum
  return slot
end

local pool <close> = mp.Pool(2)
local args = {}
for slot = 1, #board do args[slot] = { board.name, slot } end
pool:starmap(work, args)

for i = 1, #board do print(("slot %d: %d"):format(i, board[i])) end
print("format:", board.format)   --> qqqq
assert(board:unlink())
