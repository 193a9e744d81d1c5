# Codec workloads, Python's side (bench/codec.lua is ours): pickle protocol 5.
# Prints "<row>\t<seconds>\t<units>\t<unit>..." lines, medians of BENCH_REPEAT runs.
import gc, os, pickle, statistics, sys, time

REPEAT = int(os.environ.get("BENCH_REPEAT", "7"))

def median(f, arg):
    ts = []
    for _ in range(REPEAT):
        gc.collect()
        t0 = time.perf_counter()
        f(arg)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[(REPEAT + 1) // 2 - 1]

def row(name, seconds, *rest):
    print("\t".join([name, "%.6f" % seconds] + [str(x) for x in rest]))
    sys.stdout.flush()

dumps = lambda v: pickle.dumps(v, protocol=5)
loads = pickle.loads
# each data set is made just before its rows and dropped after them
datasets = (
    ("1M ints", lambda: list(range(1, 1000001))),
    ("100k records", lambda: [{"id": i, "name": "item%d" % i, "tags": ["a", "b"], "score": i / 3}
                              for i in range(1, 100001)]),
    ("16MiB string", lambda: b"0123456789abcdef" * (1 << 20)),
)

for name, make in datasets:
    value = make()
    n = len(value) if isinstance(value, list) else 1
    s = dumps(value)
    mb = "%.3f" % (len(s) / 1e6)
    row("codec encode " + name, median(dumps, value), n, "values", mb, "MB")
    row("codec decode " + name, median(loads, s), n, "values", mb, "MB")
    row("codec roundtrip " + name, median(lambda v: loads(dumps(v)), value), n, "values", mb, "MB")
    del value, s
