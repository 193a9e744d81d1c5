# bench/distributed.py: the same work as bench/distributed.lua with Python's own way to spread
# work over TCP without extra packages: a multiprocessing.managers.BaseManager serving a task
# queue and a result queue to 2 worker processes (each connects by address and authkey).
import multiprocessing as mp
import queue
import statistics
import time
from multiprocessing.managers import BaseManager

N_TASKS = 2000
N_ITEMS = 200000
# n / (4 * workers), as the Lua row's automatic chunks before their 10,000-item cap (Lua
# sends 20 chunks). Python is given 8: with 20 its map takes over a second here, each message
# of the BaseManager's connection waiting on TCP's delayed acknowledgement (measured), which
# would flatter the Lua row.
CHUNK = 200000 // 8

tasks_q, results_q = queue.Queue(), queue.Queue()


def get_tasks():
    return tasks_q


def get_results():
    return results_q


class QueueManager(BaseManager):
    pass


QueueManager.register("tasks", callable=get_tasks)
QueueManager.register("results", callable=get_results)


def double(x):
    return x * 2


def worker(address, authkey):
    m = QueueManager(address=address, authkey=authkey)
    m.connect()
    tasks, results = m.tasks(), m.results()
    while True:
        job = tasks.get()
        if job is None:
            return
        tid, kind, payload = job
        if kind == "one":
            results.put((tid, double(payload)))
        else:
            results.put((tid, [double(x) for x in payload]))


def timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    mp.set_start_method("fork")
    authkey = b"bench-key-of-32-bytes-or-more..."
    m = QueueManager(address=("127.0.0.1", 0), authkey=authkey)
    m.start()
    ws = [mp.Process(target=worker, args=(m.address, authkey)) for _ in range(2)]
    for w in ws:
        w.start()
    tasks, results = m.tasks(), m.results()

    def apply_run():
        for i in range(N_TASKS):
            tasks.put((i, "one", i))
        got = {}
        for _ in range(N_TASKS):
            tid, v = results.get()
            got[tid] = v
        assert got[N_TASKS - 1] == 2 * (N_TASKS - 1)

    def map_run():
        xs = list(range(1, N_ITEMS + 1))
        n = 0
        for start in range(0, N_ITEMS, CHUNK):
            tasks.put((n, "chunk", xs[start:start + CHUNK]))
            n += 1
        out = {}
        for _ in range(n):
            tid, v = results.get()
            out[tid] = v
        assert sum(len(v) for v in out.values()) == N_ITEMS

    print("distributed: %d tasks, one message each\t%.6f\t%d\ttask"
          % (N_TASKS, statistics.median(timed(apply_run) for _ in range(3)), N_TASKS))
    print("distributed: map x*2 over 200,000\t%.6f\t%d\titem"
          % (statistics.median(timed(map_run) for _ in range(3)), N_ITEMS))
    for _ in ws:
        tasks.put(None)
    for w in ws:
        w.join()
    m.shutdown()
