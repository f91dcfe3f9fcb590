"""The C backend against the NumPy backend, on a quiet machine and a busy one.

Not a test: a script that prints C/NumPy ratios measured side by side in one
run, for a DoRA training step (``dora_forward`` + ``dora_backward``, the
norm detached as in PEFT) and an eval forward (the norm cached, as
``DoRALinear.eval()`` does), over a sweep of (out, in), r, N and dtype, with
0, 1 and 2 busy processes that this script starts itself.

The goal (issue "performance under real conditions"): C/NumPy <= 1.05 in
every cell, quiet and busy, with no environment variable set by the user.

Timing: for each cell the two backends run round-robin (C, NumPy, C, ...),
so that a burst of load falls on both; the ratio of the medians is the
headline, the ratio of the fastest repeats (the least disturbed ones) is
printed beside it.
The busy processes are plain Python spin loops, each bounded in time by
itself (it exits after ``--busy-limit`` seconds even if this script dies)
and killed by PID in a ``finally``. ``uptime`` is printed before and after
every load level: the machine may be shared with other work too.

    python benchmarks/bench_busy.py --quick      # a few minutes
    python benchmarks/bench_busy.py              # the full sweep
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import time

# Time the checkout this script sits in, not an installed dora_ref.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import dora_ref  # noqa: E402
from dora_ref.core import functional as F  # noqa: E402

GOAL = 1.05

FULL = dict(
    shapes=[(64, 64), (256, 256), (1024, 1024), (4096, 4096), (11008, 4096)],
    ranks=[1, 4, 8, 16, 64],
    batches=[16, 256, 2048],
    dtypes=[np.float32, np.float64],
    loads=[0, 1, 2],
)
QUICK = dict(
    shapes=[(64, 64), (256, 256), (1024, 1024), (4096, 4096)],
    ranks=[1, 8, 64],
    batches=[16, 256],
    dtypes=[np.float32, np.float64],
    loads=[0, 1],
)

_SPIN = "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass\n"


def start_busy(count, limit):
    """Start `count` spinning processes that stop by themselves after `limit` s."""
    return [subprocess.Popen([sys.executable, "-c", _SPIN, str(limit)]) for _ in range(count)]


def stop_busy(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu():
    name = platform.processor() or platform.machine()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline"
    return f"{name} ({os.cpu_count()} CPUs, {simd})"


def problem(out_f, in_f, r, N, dtype, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(dtype)  # noqa: E731
    p = dict(x=draw(N, in_f), W0=draw(out_f, in_f), A=draw(r, in_f), B=draw(out_f, r),
             dy=draw(N, out_f), bias=draw(out_f), s=2.0)
    p["m"] = F.column_norm(p["W0"], p["A"], p["B"], p["s"])
    return p


def train_step(p):
    y, ctx = F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"], p["bias"])
    return F.dora_backward(p["dy"], ctx)


def eval_forward(p):
    return F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"], p["bias"],
                          weight_norm=p["n"])


def side_by_side(fn, p, budget):
    """Median seconds of fn with the C and the NumPy backend, run round-robin
    for about `budget` seconds (at least 5 and at most 200 rounds)."""
    times = {"c": [], "numpy": []}
    for name in times:  # warm up: caches, the C cost model's first calls
        with dora_ref.use_backend(name):
            fn(p)
            fn(p)
    t_end = time.perf_counter() + budget
    rounds = 0
    while rounds < 5 or (time.perf_counter() < t_end and rounds < 200):
        for name in ("c", "numpy") if rounds % 2 == 0 else ("numpy", "c"):
            with dora_ref.use_backend(name):
                t0 = time.perf_counter()
                fn(p)
                times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {k: float(np.median(v)) for k, v in times.items()} | {
        f"{k}_min": float(np.min(v)) for k, v in times.items()}


def cells(grid):
    for (out_f, in_f), r, N, dtype in itertools.product(
        grid["shapes"], grid["ranks"], grid["batches"], grid["dtypes"]
    ):
        if r > min(out_f, in_f):
            continue
        yield out_f, in_f, r, N, dtype


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller sweep (a few minutes)")
    ap.add_argument("--loads", default=None, help="busy processes per level, e.g. 0,1,2")
    ap.add_argument("--budget", type=float, default=None, help="seconds per cell and kind")
    ap.add_argument("--busy-limit", type=float, default=1800,
                    help="seconds after which a busy process stops by itself")
    args = ap.parse_args(argv)
    grid = dict(QUICK if args.quick else FULL)
    if args.loads:
        grid["loads"] = [int(v) for v in args.loads.split(",")]
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    if "c" not in dora_ref.available_backends():
        sys.exit("the C extension is not built: nothing to compare")
    from dora_ref.kernels import c as _kernels_c

    print(f"# C backend vs NumPy backend, quiet and busy (goal: C/NumPy <= {GOAL})")
    print(f"# CPU: {cpu()}; numpy {np.__version__}; {_kernels_c.threading_info()}")
    worst = {}
    for load in grid["loads"]:
        procs = start_busy(load, args.busy_limit)
        try:
            time.sleep(0.5 if load else 0)
            print(f"\n## {load} busy process(es); before: {uptime()}")
            print(f"{'out':>6} {'in':>5} {'r':>3} {'N':>5} {'dtype':>7} | "
                  f"{'train C ms':>10} {'NumPy ms':>9} {'C/NumPy':>7} | "
                  f"{'eval C ms':>9} {'NumPy ms':>9} {'C/NumPy':>7} | min-ratio train eval")
            for out_f, in_f, r, N, dtype in cells(grid):
                p = problem(out_f, in_f, r, N, dtype)
                p["n"] = F.column_norm(p["W0"], p["A"], p["B"], p["s"])
                tr = side_by_side(train_step, p, budget)
                ev = side_by_side(eval_forward, p, budget)
                rt, re_ = tr["c"] / tr["numpy"], ev["c"] / ev["numpy"]
                mt, me = tr["c_min"] / tr["numpy_min"], ev["c_min"] / ev["numpy_min"]
                flag = " <-- over the goal" if max(rt, re_) > GOAL else ""
                print(f"{out_f:>6} {in_f:>5} {r:>3} {N:>5} {np.dtype(dtype).name:>7} | "
                      f"{tr['c'] * 1e3:>10.3f} {tr['numpy'] * 1e3:>9.3f} {rt:>7.2f} | "
                      f"{ev['c'] * 1e3:>9.3f} {ev['numpy'] * 1e3:>9.3f} {re_:>7.2f} | "
                      f"{mt:>9.2f} {me:>5.2f}{flag}",
                      flush=True)
                key = (out_f, in_f, r, N, np.dtype(dtype).name)
                w = worst.setdefault(load, (0, None))
                if max(rt, re_) > w[0]:
                    worst[load] = (max(rt, re_), key)
            print(f"after: {uptime()}; C cost model: {_kernels_c.threading_info()['region_cost_us']:.1f} "
                  f"us to open a team")
        finally:
            stop_busy(procs)
    print("\n## worst C/NumPy cell per load level")
    for load, (ratio, key) in worst.items():
        print(f"{load} busy: {ratio:.2f} at (out, in, r, N, dtype) = {key}")


if __name__ == "__main__":
    main()
