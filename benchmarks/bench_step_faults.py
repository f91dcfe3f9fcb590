"""What page faults cost a DoRA training step, against the plain layer's (float32, 2 threads).

Issue 11's goal 3 asks a training step (forward + backward, detached norm)
for at most 1.15x the plain frozen linear layer's two products at r <= 32.
Part of what is left above the pieces' own times is the memory the step
takes fresh: glibc gives the step's freed (N, out) and (N, in) arrays back
to the kernel when it ends (its trim threshold), and the next step's first
write to each page faults. This script measures it, in two processes:

* this process, as any user's program runs;
* a child started with glibc told to keep its memory
  (``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` set to 2e9 for
  that child only; dora_ref sets neither, see docs/performance.md).

In each it times, interleaved (each round alternating which goes first),
the plain step, the DoRA step (``dora_forward`` + ``dora_backward``), the
DoRA step with dz written into a new (N, out) array as before this version
(``_backward_lowrank_any`` told not to write over z; the same bits), and
the DoRA step's pieces in the order the step runs them (the norm, x @ A.T,
x @ W0.T, the forward epilogue keeping z, the fused backward, dA, dz @ W0,
dx += dU @ A by blocks of rows), with the minor page faults of each call
(``getrusage``). Medians; compare rows of one run only.

    python benchmarks/bench_step_faults.py [--repeats 15] [--shapes 4096,4096,16,512;...]

Prints a Markdown report (the Intel Xeon's: ``benchmarks/results/bench_step_faults_intel.md``).
"""
from __future__ import annotations

import os
import sys

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = "2"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

# Time the checkout this script sits in, not an installed dora_ref.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels as bk  # noqa: E402  (problem: the same layer as the rank table)
from bench_rank_ab import SHAPES  # noqa: E402  (the rank table's shapes)
from dora_ref.core import backend as _backend  # noqa: E402
from dora_ref.core import functional as F  # noqa: E402
from dora_ref.core.kernels_numpy import EPILOGUE_KEEP_Z  # noqa: E402

KEEP_MEMORY = {"MALLOC_TRIM_THRESHOLD_": "2000000000", "MALLOC_MMAP_THRESHOLD_": "2000000000"}
NEW_DZ = "DoRA step, dz in a new array"  # the step before this version wrote dz over z
PIECES = ["norm", "U = x @ A.T", "base = x @ W0.T", "forward epilogue (z kept)",
          "backward_lowrank_z", "dA = dU.T @ x", "dx = dz @ W0", "dx += dU @ A"]


def _faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(shape, repeats):
    """{name: (median seconds, median faults)} for the plain step, the DoRA step and its pieces."""
    p = bk.problem(*shape)
    W0, A, B, x, dy, s, m = (p[k] for k in ("W0", "A", "B", "x", "dy", "s", "m"))
    K = _backend.kernels()

    def plain():
        y = x @ W0.T
        dx = dy @ W0
        return y, dx

    def dora():
        y, ctx = F.dora_forward(x, W0, A, B, m, s)
        return y, F.dora_backward(dy, ctx)

    any_ = K._backward_lowrank_any

    def new_dz(dy, base, U, B, g, s, base_is_z, dz_over_base):  # dz into a new array
        return any_(dy, base, U, B, g, s, base_is_z, False)

    def dora_new_dz():  # the step before dz went over the context's array (same bits)
        K._backward_lowrank_any = new_dz
        try:
            return dora()
        finally:
            K._backward_lowrank_any = any_

    def pieces(record):
        """The step's arithmetic in its order, each call timed and its faults counted where it runs."""
        def timed(name, fn):
            f0, t0 = _faults(), time.perf_counter()
            out = fn()
            record[name][0].append(time.perf_counter() - t0)
            record[name][1].append(_faults() - f0)
            return out
        n = timed("norm", lambda: K.column_norm(W0, A, B, s))
        g = m / n
        U = timed("U = x @ A.T", lambda: x @ A.T)
        base = timed("base = x @ W0.T", lambda: x @ W0.T)
        y, _ = timed("forward epilogue (z kept)",
                     lambda: K._forward_epilogue_flagged(base, U, B, g, s, None, EPILOGUE_KEEP_Z))
        # as the step calls it: dz written over z (the forward's base array)
        dg, dz, dU, dB = timed("backward_lowrank_z",
                               lambda: K._backward_lowrank_any(dy, base, U, B, g, s, True, True))
        dA = timed("dA = dU.T @ x", lambda: dU.T @ x)
        dx = timed("dx = dz @ W0", lambda: dz @ W0)
        timed("dx += dU @ A", lambda: F._add_low_rank(dx, dU, A))  # as the step adds it
        return y, dx, dA, dB, dg

    record = {k: ([], []) for k in ["plain step", "DoRA step", NEW_DZ, "DoRA pieces (sum)"] + PIECES}
    plain(), dora(), dora_new_dz(), pieces({k: ([], []) for k in PIECES})  # warm up
    calls = [("plain step", plain), ("DoRA step", dora), (NEW_DZ, dora_new_dz),
             ("DoRA pieces (sum)", None)]
    for i in range(repeats):
        for name, fn in calls[i % 4:] + calls[:i % 4]:
            if fn is None:
                sub = {k: ([], []) for k in PIECES}
                pieces(sub)
                for k in PIECES:
                    record[k][0].extend(sub[k][0])
                    record[k][1].extend(sub[k][1])
                record[name][0].append(sum(sub[k][0][0] for k in PIECES))
                record[name][1].append(sum(sub[k][1][0] for k in PIECES))
                continue
            f0, t0 = _faults(), time.perf_counter()
            fn()
            record[name][0].append(time.perf_counter() - t0)
            record[name][1].append(_faults() - f0)
    return {k: (float(np.median(t)), float(np.median(f))) for k, (t, f) in record.items()}


def run_all(shapes, repeats):
    return {",".join(map(str, sh)): measure(sh, repeats) for sh in shapes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shapes", default=None, help="e.g. 4096,4096,16,512;11008,4096,16,256")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # prints JSON, no report
    args = ap.parse_args()
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in sh.split(","))
                                             for sh in args.shapes.split(";")]
    if args.child:
        print(json.dumps(run_all(shapes, args.repeats)))
        return
    load0 = os.getloadavg()[0]
    here = run_all(shapes, args.repeats)
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--repeats",
                            str(args.repeats), "--shapes", ";".join(",".join(map(str, sh)) for sh in shapes)],
                           env=dict(os.environ, **KEEP_MEMORY), capture_output=True, text=True, check=True)
    kept = json.loads(child.stdout)
    load1 = os.getloadavg()[0]
    lines = [f"# bench_step_faults ({platform.processor() or platform.machine()}, backend "
             f"{_backend.backend()}, {args.repeats} repeats, load average {load0:.2f} -> {load1:.2f})", "",
             "Columns: as a user's program runs (glibc's defaults) | in a child with glibc keeping its memory "
             "(MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ = 2e9, set for that child only). "
             "Medians: ms (minor faults per call).", ""]
    for key in here:
        a, b = here[key], kept[key]
        lines += [f"## (out, in, r, N) = ({key.replace(',', ', ')})", "",
                  "| | default glibc | glibc keeping its memory |", "|---|---|---|"]
        for name in a:
            lines.append(f"| {name} | {a[name][0] * 1e3:.2f} ({a[name][1]:.0f}) | "
                         f"{b[name][0] * 1e3:.2f} ({b[name][1]:.0f}) |")
        lines.append(f"| **DoRA step / plain step** | **{a['DoRA step'][0] / a['plain step'][0]:.3f}** | "
                     f"**{b['DoRA step'][0] / b['plain step'][0]:.3f}** |")
        lines.append(f"| DoRA step, dz in a new array / plain step | {a[NEW_DZ][0] / a['plain step'][0]:.3f} | "
                     f"{b[NEW_DZ][0] / b['plain step'][0]:.3f} |")
        lines.append("")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
