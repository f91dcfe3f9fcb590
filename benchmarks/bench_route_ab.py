"""Where r >= out: U @ B.T by BLAS (the route) or by the C tile, against NumPy, side by side.

Not a test: a script that prints, for a DoRA training step and an eval forward (the norm
cached), the median time of three callables run round robin (each round starting one later):
the C backend as shipped (above ``FUSED_MAX_RANK`` and where r >= out its epilogues take
U @ B.T from NumPy's BLAS: ``dora_ref.kernels.c._lowrank_on_blas``), the C backend with every
shape sent to its register tile (the tests-only switch ``kernels.c._BLAS_LOWRANK = False``),
and the NumPy backend; with each ratio to NumPy, a 95 % bootstrap interval of the ratio of
medians (rounds resampled as triples). With ``--loads 0,1`` it repeats the cells with one
busy process, which it starts itself (a Python spin loop that stops by itself after
``--busy-limit`` seconds, killed by PID when the level ends).

    python benchmarks/bench_route_ab.py                 # quiet and one busy process
    python benchmarks/bench_route_ab.py --loads 0 --budget 1

Cells: (out, in, r) = (64, 64, 64), (64, 256, 64), (16, 64, 16), (32, 128, 32), N = 16, 64,
256, 2048, float32 and float64 (every cell has r >= out and r > 12: the route's domain).
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

import bench_busy as bb  # noqa: E402  (problem, train_step, eval_forward, busy processes)
import dora_ref  # noqa: E402
from dora_ref.core import functional as F  # noqa: E402
try:
    from dora_ref.kernels import c as kc  # noqa: E402
except ImportError as exc:  # the C extension is not built: --help still answers, main() says so
    kc, _C_MISSING = None, exc

SHAPES = [(64, 64, 64), (64, 256, 64), (16, 64, 16), (32, 128, 32)]
BATCHES = [16, 64, 256, 2048]
VARIANTS = [("route", "c", True), ("tile", "c", False), ("numpy", "numpy", True)]


def interval(a, b, resamples=2000, seed=0):
    """95 % bootstrap interval of median(a) / median(b), rounds resampled together."""
    a, b = np.asarray(a), np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    r = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def race(fn, p, budget, max_rounds):
    """Seconds of fn under each variant, round robin, for `budget` s (at least 10 rounds)."""
    for _, backend, route in VARIANTS:  # warm: caches, the cost model's first calls
        kc._BLAS_LOWRANK = route
        with dora_ref.use_backend(backend):
            fn(p)
            fn(p)
    times = {name: [] for name, _, _ in VARIANTS}
    end, i = time.perf_counter() + budget, 0
    try:
        while (time.perf_counter() < end or i < 10) and i < max_rounds:
            for name, backend, route in VARIANTS[i % 3:] + VARIANTS[:i % 3]:
                kc._BLAS_LOWRANK = route
                with dora_ref.use_backend(backend):
                    t0 = time.perf_counter()
                    fn(p)
                    times[name].append(time.perf_counter() - t0)
            i += 1
    finally:
        kc._BLAS_LOWRANK = True
    return times, i


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=bb.loads_arg, default=[0, 1],
                    help="busy processes per level, e.g. 0,1")
    ap.add_argument("--budget", type=bb.positive_arg(float), default=1.5, help="seconds per cell and kind")
    ap.add_argument("--max-rounds", type=bb.positive_arg(int), default=400)
    ap.add_argument("--busy-limit", type=bb.positive_arg(float), default=1200.0,
                    help="seconds after which a busy process stops by itself")
    args = ap.parse_args(argv)
    if kc is None:
        ap.error(f"the C extension is not built here ({_C_MISSING}): this script "
                 "times the C kernels; pip install -e . builds it")
    print(f"# CPU: {bb.cpu()}\n# BLAS: {bb.blas()}\n# C kernels: {kc.build_info()}")
    for load in args.loads:
        procs = []
        try:
            procs = bb.start_busy(load, args.busy_limit)
            print(f"\n## {load} busy process(es); {bb.uptime()}", flush=True)
            for (out_f, in_f, r) in SHAPES:
                for N in BATCHES:
                    for dtype in (np.float32, np.float64):
                        p = bb.problem(out_f, in_f, r, N, dtype)
                        p["n"] = F.column_norm(p["W0"], p["A"], p["B"], p["s"])
                        for kind, fn in (("train", bb.train_step), ("eval", bb.eval_forward)):
                            t, rounds = race(fn, p, args.budget, args.max_rounds)
                            bb.check_busy(procs)  # the cell ran beside the level's busy processes
                            med = {k: float(np.median(v)) for k, v in t.items()}
                            lr, hr = interval(t["route"], t["numpy"])
                            lt, ht = interval(t["tile"], t["numpy"])
                            print(f"({out_f}, {in_f}, {r}, {N}) {np.dtype(dtype).name:7s} {kind:5s} "
                                  f"rounds {rounds:3d} | us: route {med['route'] * 1e6:8.1f} "
                                  f"tile {med['tile'] * 1e6:8.1f} numpy {med['numpy'] * 1e6:8.1f} | "
                                  f"route/numpy {med['route'] / med['numpy']:.2f} [{lr:.2f}-{hr:.2f}] "
                                  f"tile/numpy {med['tile'] / med['numpy']:.2f} [{lt:.2f}-{ht:.2f}]",
                                  flush=True)
        finally:
            bb.stop_busy(procs)
            print(f"# after: {bb.uptime()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
