"""The fused backward kernel of two builds side by side, in one process (issue 11, goal 1).

Not a test: a script that prints ratios of times measured in one run. It
loads this checkout's ``_dora_c`` and a second build (``--base``, e.g. one
built from main with ``git archive main | tar -x -C DIR`` and
``python setup.py build_ext --inplace`` there) and times, interleaved and
each round starting one callable later, ``dora_backward_lowrank`` (float32)
of each build and the r > 12 route (``backward_epilogue`` of this build and
two BLAS products), at shapes (out, r, N) where the row
blocks of ``lowrank_row_block`` split N (64 x 2048) and where they do not
(N = 64, the demo's layers; out >= 1024, several column blocks). Medians
and minima of the repeats; the machine may be shared, so compare rows of
one run only.

    python benchmarks/bench_lowrank_rows.py --base DIR/dora_ref/kernels/_dora_c.abi3.so [--repeats 200]
"""
from __future__ import annotations

import os
import sys

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = "2"

import argparse  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_kernels as bk  # noqa: E402  (race)
from bench_rank_ab import load_build  # noqa: E402
try:
    from dora_ref.kernels import c as C  # noqa: E402
except ImportError as exc:  # the C extension is not built: --help still answers, main() says so
    C, _C_MISSING = None, exc

SHAPES = [(64, 8, 2048), (64, 8, 64), (1024, 8, 256), (4096, 8, 512), (64, 8, 512),
          (256, 8, 2048), (64, 4, 2048)]


def kernel_call(mod, arrays, dtype=np.float32):
    """dora_backward_lowrank of build ``mod`` on ``arrays`` (outputs preallocated)."""
    dy, base, U, B, g, s, dg, dz, dU, dB = arrays
    N, out_f = dy.shape
    r = U.shape[1]
    fn = mod.lib.dora_backward_lowrank_f32 if dtype == np.float32 else mod.lib.dora_backward_lowrank_f64
    ctype = "float *" if dtype == np.float32 else "double *"
    ptrs = [mod.ffi.cast(ctype, mod.ffi.from_buffer(a)) for a in (dg, dz, dU, dB, dy, base, U, B, g)]

    def call():
        status = fn(*ptrs, s, N, out_f, r)
        assert status == 0, status
    return call


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the other build's _dora_c .so")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--shapes", default=None, help="out,r,N;... (default: the list above)")
    args = ap.parse_args()
    if C is None:
        ap.error(f"the C extension is not built here ({_C_MISSING}): this script "
                 "times the C kernels; pip install -e . builds it")
    base_mod = load_build(args.base)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in c.split(",")) for c in args.shapes.split(";")]
    print(f"load: {os.getloadavg()}  repeats {args.repeats}, float32, 2 threads")
    print("| out | r | N | base med us | this med us | epi+BLAS med us | this/base med | this/base min | "
          "this/epi+BLAS med | this/epi+BLAS min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for out_f, r, N in shapes:
        rng = np.random.default_rng(0)
        f32 = np.float32
        dy = rng.standard_normal((N, out_f), dtype=f32)
        base = rng.standard_normal((N, out_f), dtype=f32)
        U = rng.standard_normal((N, r), dtype=f32)
        B = rng.standard_normal((out_f, r), dtype=f32) * f32(0.01)
        g = (rng.random(out_f) + 0.5).astype(f32)
        s = 2.0
        outs = {k: [np.empty(out_f, f32), np.empty((N, out_f), f32), np.empty((N, r), f32),
                    np.empty((out_f, r), f32)] for k in ("base", "this")}
        fns = {k: kernel_call(mod, (dy, base, U, B, g, s, *outs[k]))
               for k, mod in (("base", base_mod), ("this", C))}

        def numpy_route():
            dg, dz = C.backward_epilogue(dy, base, U, B, g, s)
            return dg, dz, s * (dz @ B), s * (dz.T @ U)
        fns["numpy"] = numpy_route
        mins = {}
        med = bk.race(fns, args.repeats, warmup=5, mins=mins, shuffle=True)
        same = all(np.array_equal(a, b) for a, b in zip(outs["base"], outs["this"]))
        print(f"| {out_f} | {r} | {N} | {med['base'] * 1e6:.0f} | {med['this'] * 1e6:.0f} | "
              f"{med['numpy'] * 1e6:.0f} | {med['this'] / med['base']:.3f} | {mins['this'] / mins['base']:.3f} | "
              f"{med['this'] / med['numpy']:.3f} | {mins['this'] / mins['numpy']:.3f} |"
              + ("" if same else "  (bits differ from base: rows split)"), flush=True)


if __name__ == "__main__":
    main()
