"""The float64 column norm: the six-row tile against the four-row tile and NumPy, side by side.

Not a test: a script that prints, for ``column_norm`` of float64 W0 at several (out, in, r),
the median time of three callables run round robin (each round starting one later): the C
backend as shipped (six-row tiles where the AVX-512 tile is allowed,
``dora_ref.kernels.c.norm_tile() == "avx512"``), the C backend held to four-row tiles (the
tests-and-benchmarks switch ``_set_norm_tile_limit("avx2")``, which for float64 selects the
four-row tile and nothing else), and the NumPy backend's ``column_norm`` (BLAS's B @ A, then
NumPy's sum of squares). Each ratio comes with a 95 % bootstrap interval of the ratio of
medians (rounds resampled together). The two C callables give the same bits; the script
checks that before it times.

Levels: each backend held to one thread and to two (C by ``set_threads``, OpenBLAS by
threadpoolctl: what a busy machine leaves and what a quiet one gives), then, with
``--loads``, the default threads beside 0, 1, ... busy processes that the script starts
itself (Python spin loops that stop by themselves after ``--busy-limit`` seconds, killed by
PID when the level ends).

    python benchmarks/bench_norm_f64.py                 # one and two threads, then one busy
    python benchmarks/bench_norm_f64.py --loads "" --budget 1

On a CPU without AVX-512 the first two callables are the same code (float64 keeps four-row
tiles there), and the script says so.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Time the checkout this script sits in, not an installed dora_ref.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import bench_busy as bb  # noqa: E402  (busy processes, machine description, intervals)
from dora_ref.core import kernels_numpy as kn  # noqa: E402
try:
    from dora_ref.kernels import c as kc  # noqa: E402
except ImportError as exc:  # the C extension is not built: --help still answers, main() says so
    kc, _C_MISSING = None, exc

SHAPES = [(256, 256, 8), (256, 256, 16), (256, 256, 64), (1024, 1024, 64), (4096, 4096, 16),
          (4096, 4096, 64)]
VARIANTS = ("six", "four", "numpy")


def _call(name, W0, A, B):
    if name == "numpy":
        return kn.column_norm(W0, A, B, 0.5)
    kc._set_norm_tile_limit("avx512" if name == "six" else "avx2")
    try:
        return kc.column_norm(W0, A, B, 0.5)
    finally:
        kc._set_norm_tile_limit("avx512")


def race(W0, A, B, budget, max_rounds):
    """Seconds of each variant, round robin, for `budget` s (at least 10 rounds)."""
    for name in VARIANTS:  # warm: caches, the plan's first calls
        _call(name, W0, A, B)
    times = {name: [] for name in VARIANTS}
    end, i = time.perf_counter() + budget, 0
    while (time.perf_counter() < end or i < 10) and i < max_rounds:
        for name in VARIANTS[i % 3:] + VARIANTS[:i % 3]:
            t0 = time.perf_counter()
            _call(name, W0, A, B)
            times[name].append(time.perf_counter() - t0)
        i += 1
    return times, i


def report(label, times, rounds):
    med = {k: float(np.median(v)) for k, v in times.items()}
    six_four = bb.ratio_interval(times["six"], times["four"])
    six_np = bb.ratio_interval(times["six"], times["numpy"])
    print(f"{label:<34} {rounds:>4} {med['six'] * 1e6:>9.0f} {med['four'] * 1e6:>9.0f} "
          f"{med['numpy'] * 1e6:>9.0f}   {med['six'] / med['four']:.2f} "
          f"[{six_four[0]:.2f}-{six_four[1]:.2f}]   {med['six'] / med['numpy']:.2f} "
          f"[{six_np[0]:.2f}-{six_np[1]:.2f}]", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=bb.loads_arg, default=[1], help="busy processes per level "
                    "after the thread levels, e.g. 1 or 0,1 ('' for none)")
    ap.add_argument("--budget", type=bb.positive_arg(float), default=2.0,
                    help="seconds per cell and level")
    ap.add_argument("--max-rounds", type=bb.positive_arg(int), default=300)
    ap.add_argument("--busy-limit", type=bb.positive_arg(float), default=600.0,
                    help="seconds after which a busy process stops by itself (each also stops "
                         "when this script is gone)")
    args = ap.parse_args(argv)
    if kc is None:
        ap.error(f"the C extension is not built here ({_C_MISSING}): this script "
                 "times the C kernels; pip install -e . builds it")
    loads = args.loads

    print(f"CPU: {bb.cpu()}")
    print(f"BLAS: {bb.blas()}")
    print(f"dora_ref C build: {kc.build_info()}; norm tile: {kc.norm_tile()}")
    if kc.norm_tile() != "avx512":
        print("this CPU has no AVX-512 tile: float64 takes four-row tiles in both C columns")
    print(f"start: {bb.uptime()}")
    print(f"{'cell':<34} {'rnds':>4} {'six us':>9} {'four us':>9} {'numpy us':>9}   "
          f"six/four [95%]      six/numpy [95%]")
    rng = np.random.default_rng(0)
    problems = []
    for out_f, in_f, r in SHAPES:
        W0 = rng.standard_normal((out_f, in_f))
        A = rng.standard_normal((r, in_f)) * 0.1
        B = rng.standard_normal((out_f, r)) * 0.1
        six, four = _call("six", W0, A, B), _call("four", W0, A, B)
        if not np.array_equal(six.view(np.int64), four.view(np.int64)):
            raise SystemExit(f"({out_f}, {in_f}, {r}): the six- and four-row tiles' bits differ")
        problems.append(((out_f, in_f, r), W0, A, B))

    for threads in (1, 2):
        kc.set_threads(threads)
        try:
            with threadpool_limits(threads, user_api="blas"):
                for shape, W0, A, B in problems:
                    times, rounds = race(W0, A, B, args.budget, args.max_rounds)
                    report(f"{shape} {threads} thread(s)", times, rounds)
        finally:
            kc.set_threads(0)
    for load in loads:
        procs = []
        try:
            procs = bb.start_busy(load, args.busy_limit)
            time.sleep(0.5 if load else 0)
            print(f"-- {load} busy process(es), default threads: {bb.uptime()}")
            for shape, W0, A, B in problems:
                times, rounds = race(W0, A, B, args.budget, args.max_rounds)
                bb.check_busy(procs)  # the cell ran beside the level's busy processes
                report(f"{shape} busy {load}", times, rounds)
        finally:
            bb.stop_busy(procs)
    print(f"end: {bb.uptime()}")


if __name__ == "__main__":
    main()
