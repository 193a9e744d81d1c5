# bench/pipe.py: multiprocessing.Pipe throughput between a parent and a forked child (pairs with bench/pipe.lua).
# Prints "<workload>\t<seconds>" (median of 3 runs) per workload, then a rate on stderr.
import multiprocessing as mp
import statistics
import sys
import time


def child(w, n, kind):
    big = b"x" * (1 << 20)
    for i in range(1, n + 1):
        w.send(i if kind == "small" else big)
    w.close()


def run(n, kind):
    r, w = mp.Pipe()  # the default (duplex), a socket pair like ours
    p = mp.get_context("fork").Process(target=child, args=(w, n, kind))
    p.start()
    w.close()
    t0 = time.monotonic()
    for _ in range(n):
        assert r.recv() is not None
    dt = time.monotonic() - t0
    r.close()
    p.join()
    assert p.exitcode == 0
    return dt


def main():
    n_small, n_big, mib = 100000, 1000, 1 << 20
    small = statistics.median(run(n_small, "small") for _ in range(3))
    print("small_messages\t%.4f" % small, flush=True)
    print("  %.0f messages/s" % (n_small / small), file=sys.stderr)
    large = statistics.median(run(n_big, "big") for _ in range(3))
    print("1MiB_messages\t%.4f" % large, flush=True)
    print("  %.0f MB/s" % (n_big * mib / 1e6 / large), file=sys.stderr)


if __name__ == "__main__":
    main()
