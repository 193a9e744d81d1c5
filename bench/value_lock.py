# value_lock: two processes each add 1 to a shared Value N times under its lock (Python).
import multiprocessing as mp
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100000


def work(v):
    lock = v.get_lock()
    for _ in range(N):
        with lock:
            v.value += 1


if __name__ == "__main__":
    mp.set_start_method("fork")
    v = mp.Value("d", 0)
    t0 = time.monotonic()
    p = mp.Process(target=work, args=(v,))
    p.start()
    work(v)
    p.join()
    t = time.monotonic() - t0
    assert p.exitcode == 0 and v.value == 2 * N, v.value
    print("value_lock %.3f" % t)
