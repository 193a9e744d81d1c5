-- chaos/cases.lua: the families of chaos cases, in the order the runner runs them.
-- Each family file returns a list of cases: { name = "...", timeout = secs, env = "K=V", run = fn }.
return { "pool_faults", "queue_faults", "sigint", "exit_paths", "parent_death", "sync_faults", "arena", "leaks", "hostile", "manager", "shared_memory", "stream_faults" }
