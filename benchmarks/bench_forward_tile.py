"""The forward epilogue's rank-r tile on one thread, against OpenBLAS's U @ B.T.

Not a test: a script that prints times (microseconds, medians and minima of
interleaved repeats) of, on one thread (OpenBLAS and the C kernels alike):

* ``C``: this build's ``dora_forward_epilogue`` (y in a new buffer: the
  rank-r tile, the epilogue and the packing of B.T), called through cffi
  with preallocated arrays;
* ``base`` (with ``--base PATH``): the same kernel of another build;
* ``gemm``: NumPy's ``U @ B.T`` into a preallocated array (OpenBLAS);
* ``twin``: the NumPy twin of the whole epilogue
  (``dora_ref.core.kernels_numpy.forward_epilogue``).

    python benchmarks/bench_forward_tile.py --base /tmp/base/dora_ref/kernels/_dora_c.abi3.so
"""
from __future__ import annotations

import os
import sys

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = "1"
for _k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_k, None)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dora_ref.core import kernels_numpy as KN  # noqa: E402
try:
    from dora_ref.kernels import c as C  # noqa: E402
except ImportError as exc:  # the C extension is not built: --help still answers, main() says so
    C, _C_MISSING = None, exc


def load_build(path):
    spec = importlib.util.spec_from_file_location("dora_tile_base._dora_c", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.lib.dora_set_threads(1)
    return mod


def kernel_call(mod, dtype, N, out, r, rng):
    ffi, lib = mod.ffi, mod.lib
    ctype = "float" if dtype == np.float32 else "double"
    sfx = "f32" if dtype == np.float32 else "f64"
    base = rng.standard_normal((N, out)).astype(dtype)
    U = rng.standard_normal((N, r)).astype(dtype)
    B = rng.standard_normal((out, r)).astype(dtype)
    g = rng.uniform(0.5, 1.5, out).astype(dtype)
    bias = rng.standard_normal(out).astype(dtype)
    y = np.empty((N, out), dtype)
    fn = getattr(lib, f"dora_forward_epilogue_{sfx}")
    p = [ffi.cast(ctype + " *", a.ctypes.data) for a in (y, base, U, B, g, bias)]

    keep = (y, base, U, B, g, bias)  # the pointers' owners live as long as call

    def call():
        fn(*p, 0.5, N, out, r)
        return keep
    return call, (y, base, U, B, g, bias)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="path of another build's _dora_c shared object")
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--inner", type=int, default=20, help="calls per timed repeat")
    ap.add_argument("--shapes", default="64,64;256,256", help="out,N pairs")
    ap.add_argument("--ranks", default="8,16,32,64")
    args = ap.parse_args()
    if C is None:
        ap.error(f"the C extension is not built here ({_C_MISSING}): this script "
                 "times the C kernels; pip install -e . builds it")
    C.set_threads(1)
    mods = {"C": C}
    if args.base:
        mods["base"] = load_build(args.base)
    print(f"# one thread; {args.repeats} interleaved repeats of {args.inner} calls; "
          f"loadavg {os.getloadavg()}; times in us (median / min)")
    for dtype in (np.float32, np.float64):
        for shape in args.shapes.split(";"):
            out, N = (int(v) for v in shape.split(","))
            for r in (int(v) for v in args.ranks.split(",")):
                rng = np.random.default_rng(0)
                calls = {}
                for name, mod in mods.items():
                    calls[name] = kernel_call(mod, dtype, N, out, r, rng)[0]
                _, (y, base, U, B, g, bias) = kernel_call(C, dtype, N, out, r, rng)
                P = np.empty((N, out), dtype)
                calls["gemm"] = lambda: np.matmul(U, B.T, out=P)
                calls["twin"] = lambda: KN.forward_epilogue(base, U, B, g, 0.5, bias)
                times = {k: [] for k in calls}
                for _ in range(3):
                    for f in calls.values():
                        f()
                for _ in range(args.repeats):
                    for k, f in calls.items():
                        t0 = time.perf_counter()
                        for _ in range(args.inner):
                            f()
                        times[k].append((time.perf_counter() - t0) / args.inner * 1e6)
                cells = "  ".join(f"{k} {np.median(v):7.1f} / {min(v):7.1f}"
                                  for k, v in times.items())
                ratio = np.median(times["C"]) / np.median(times["gemm"])
                extra = ""
                if "base" in times:
                    extra = f"  C/base {np.median(times['C']) / np.median(times['base']):.3f}"
                print(f"{np.dtype(dtype).name} out={out} N={N} r={r:3d}  {cells}  "
                      f"C/gemm {ratio:.3f}{extra}", flush=True)


if __name__ == "__main__":
    main()
