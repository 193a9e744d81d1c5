# bench/pool.py: the same work as bench/pool.lua, with Python's multiprocessing.Pool (fork).
import gc
import multiprocessing as mp
import resource
import statistics
import subprocess
import sys
import time


def median(f, reps):
    """the median of reps runs of f, each from a collected heap (as bench/lib.lua's)"""
    ts = []
    for _ in range(reps):
        gc.collect()
        ts.append(f())
    return statistics.median(ts)


def timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def cpu_timed(f):
    """the parent's own CPU time (not its children's) and wall time of f"""
    c0, t0 = time.process_time(), time.perf_counter()
    f()
    return time.process_time() - c0, time.perf_counter() - t0


COLD = ("import multiprocessing as mp\n"
        "def double(x): return x * 2\n"
        "mp.set_start_method('fork')\n"
        "p = mp.Pool(2)\n"
        "assert p.map(double, [1, 2], 1)[1] == 4\n"
        "p.close()\n"
        "p.join()\n")


def double(x):
    return x * 2


def burn(n):
    x = 0
    for i in range(1, n + 1):
        x = (x + i * i) % 1000003
    return x


N = 200000

if __name__ == "__main__":
    mp.set_start_method("fork")
    # cold: a fresh interpreter, less one with nothing to do (both through the shell, as bench/pool.lua)
    work, base = [], []
    for _ in range(11):
        base.append(timed(lambda: subprocess.run([sys.executable, "-c", ""], check=True)))
        work.append(timed(lambda: subprocess.run([sys.executable, "-c", COLD], check=True)))
    print("pool: cold start (fresh interpreter: require + Pool(2) + 2 tasks + close/join)\t%.6f\t1\tpool"
          % (statistics.median(work) - statistics.median(base)))
    def start():
        pool = mp.Pool(2)
        pool.map(double, [1, 2], 1)
        pool.close()
        pool.join()
    print("pool: warm start (Pool(2) + 2 tasks + close/join)\t%.6f\t1\tpool" % median(lambda: timed(start), 11))
    xs = list(range(1, N + 1))
    with mp.Pool(2) as pool:
        runs = [cpu_timed(lambda: pool.map(double, xs)) for _ in range(7)]
        print("pool: map x*2 over 200,000\t%.6f\t%d\titem" % (statistics.median(r[1] for r in runs), N))
        print("pool: parent CPU per item in map x*2 over 200,000\t%.9f\t1\titem"
              % (statistics.median(r[0] for r in runs) / N))
        print("pool: map x*2 over 200,000, chunksize 1000\t%.6f\t%d\titem"
              % (median(lambda: timed(lambda: pool.map(double, xs, 1000)), 7), N))
        print("pool: imap chunksize=1 over 200,000\t%.6f\t%d\titem"
              % (median(lambda: timed(lambda: sum(pool.imap(double, xs, chunksize=1))), 3), N))
    with mp.Pool(2) as pool:
        def run():
            rs = [pool.apply_async(double, (i,)) for i in xs]
            assert sum(r.get() for r in rs) == N * (N + 1)
        cpu, t = cpu_timed(run)
        print("pool: 200,000 apply_async + get\t%.6f\t%d\ttask" % (t, N))
        print("pool: parent CPU per task in apply_async + get\t%.9f\t1\ttask" % (cpu / N))
        print("# python apply_async: peak RSS %.1f MiB" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    # concurrent.futures: submit + result, with as_completed (bench/pool.lua does the same)
    from concurrent.futures import ProcessPoolExecutor, as_completed
    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex:
        ex.submit(double, 1).result()
        M = 20000
        def run_futures():
            fs = [ex.submit(double, i) for i in range(1, M + 1)]
            assert sum(f.result() for f in as_completed(fs)) == M * (M + 1)
        print("pool: 20,000 submit + as_completed/result\t%.6f\t%d\ttask" % (timed(run_futures), M))
    items = [3000000] * 16
    with mp.Pool(2) as pool:
        print("pool: cpu-bound 16 x 3M-iteration loop, Pool(2)\t%.6f\t16\titem"
              % median(lambda: timed(lambda: pool.map(burn, items, 1)), 1))


