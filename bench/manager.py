# bench/manager.py: the same work as bench/manager.lua with Python's Manager.
import multiprocessing as mp
import statistics
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000


def timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    mp.set_start_method("fork")
    with mp.Manager() as m:
        d = m.dict()

        def dict_loop():
            for i in range(1, N + 1):
                d[i] = i
                assert d[i] == i

        t = statistics.median(timed(dict_loop) for _ in range(5))
        print("manager: dict set+get x %d\t%.6f\t%d\top" % (N, t, 2 * N))

        def list_run():
            lst = m.list()

            def loop():
                for i in range(1, N + 1):
                    lst.append(i)
                assert len(lst) == N

            return timed(loop)

        t = statistics.median(list_run() for _ in range(5))
        print("manager: list append x %d\t%.6f\t%d\top" % (N, t, N))
