# bench/queues.py: the same work as bench/queues.lua, with Python's multiprocessing (fork).
import gc
import multiprocessing as mp
import statistics
import time


def produce(q, n, item):
    for _ in range(n):
        q.put(item)


def transfer(n, item):
    q = mp.Queue()
    t0 = time.perf_counter()
    p = mp.Process(target=produce, args=(q, n, item))
    p.start()
    for _ in range(n):
        q.get()
    t = time.perf_counter() - t0
    p.join()
    return t


def nothing():
    pass


def start_join():
    t0 = time.perf_counter()
    for _ in range(50):
        p = mp.Process(target=nothing)
        p.start()
        p.join()
    return (time.perf_counter() - t0) / 50


def median(f, reps):
    """the median of reps runs of f, each from a collected heap (as bench/lib.lua's)"""
    ts = []
    for _ in range(reps):
        gc.collect()
        ts.append(f())
    return statistics.median(ts)


if __name__ == "__main__":
    mp.set_start_method("fork")
    N = 100000
    print("queue: %d small messages\t%.6f\t%d\tmsg" % (N, median(lambda: transfer(N, 12345), 5), N))
    mib = b"x" * (1 << 20)
    print("queue: 1000 x 1 MiB\t%.6f\t%g\tMB" % (median(lambda: transfer(1000, mib), 3), 1000 * 1.048576))
    print("process: start + join\t%.6f\t1\tproc" % median(start_join, 5))
