# bench/value_lock.py: the same work as bench/value_lock.lua with Python's Value and its lock.
import multiprocessing as mp
import statistics
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100000


def work(v):
    lock = v.get_lock()
    for _ in range(N):
        with lock:
            v.value += 1


def run():
    v = mp.Value("d", 0)
    t0 = time.perf_counter()
    p = mp.Process(target=work, args=(v,))
    p.start()
    work(v)
    p.join()
    t = time.perf_counter() - t0
    assert p.exitcode == 0 and v.value == 2 * N, v.value
    return t


if __name__ == "__main__":
    mp.set_start_method("fork")
    t = statistics.median(run() for _ in range(5))
    print("value: 2 processes x 100,000 locked increments\t%.6f\t%d\tincrement" % (t, 2 * N))
