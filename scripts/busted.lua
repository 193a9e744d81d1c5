-- Runs busted inside this interpreter (used by `make valgrind`).
require "busted.runner"({ standalone = false })
