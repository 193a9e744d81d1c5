-- busted output handler: the usual terminal output, then a plain
-- "N passed, N failed" line that CI reads.
return function(options)
  local busted = require "busted"
  local handler = require "busted.outputHandlers.utfTerminal"(options)
  busted.subscribe({ "suite", "end" }, function(suite, count, total)
    local failed = #handler.failures + #handler.errors
    io.write(("\n%d passed, %d failed, %d skipped\n"):format(#handler.successes, failed, #handler.pendings))
    io.flush()
    return nil, true
  end)
  return handler
end
