-- shared.lua: Value and Array, typed shared memory (see docs/shared.md).
local core = require "multiprocessing.core"

return {
  Value = core.Value,
  Array = core.Array,
}
