-- multiprocessing.lua: what `require "multiprocessing"` finds first (package.path lists "?.lua"
-- before "?/init.lua"); the module is multiprocessing/init.lua, loaded here from the bytecode built
-- into the core when it is byte for byte the file built, else from its source: parsing it cost a
-- tenth of a millisecond at every start (src/capi.c, layer_init).
local init, path = require("multiprocessing.core")._layer_init(...)
return init((...), path)
