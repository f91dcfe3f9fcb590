"""Where a DoRA training step spends its time, line by line (float32, 2 threads).

Re-times, one by one, the products and kernels that ``dora_forward`` and
``dora_backward`` (``dora_ref/core/functional.py``) run, next to the plain frozen
linear layer's two products, so that the overhead of each piece can be read
off. Medians of interleaved repeats, wall and CPU time (``time.process_time``,
all threads: steadier than wall time on a shared machine); compare rows of
one run only.

    python benchmarks/profile_step.py [out in r N]   (default 4096 4096 8 512)
"""
from __future__ import annotations

import os
import sys

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = "2"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

# Time the checkout this script sits in, not an installed dora_ref.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dora_ref.core import backend as _backend  # noqa: E402
from dora_ref.core import functional as F  # noqa: E402


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", nargs="*", type=int, metavar="out in r N",
                   help="the layer's shape, the rank and the batch (default 4096 4096 8 512)")
    shape = p.parse_args(argv).shape or [4096, 4096, 8, 512]
    if len(shape) != 4 or min(shape) < 1:
        p.error(f"give four positive integers: out in r N (got {shape})")
    out_f, in_f, r, N = shape
    rng = np.random.default_rng(0)
    f32 = np.float32
    W0 = rng.standard_normal((out_f, in_f), dtype=f32) / f32(np.sqrt(in_f))
    A = rng.standard_normal((r, in_f), dtype=f32) / f32(np.sqrt(in_f))
    B = rng.standard_normal((out_f, r), dtype=f32) * f32(0.01)
    x = rng.standard_normal((N, in_f), dtype=f32)
    dy = rng.standard_normal((N, out_f), dtype=f32)
    s = 2.0
    K = _backend.kernels()
    n = K.column_norm(W0, A, B, s)
    m = n * f32(1.1)
    g = m / n
    U = x @ A.T
    base = x @ W0.T
    z = base + s * (U @ B.T)  # what the training forward keeps over base
    dg, dz = K.backward_epilogue(dy, base, U, B, g, s)
    dU = s * (dz @ B)
    c = -dg * g / (n * n)
    cB = c[:, None] * B

    def no_keep_z():  # the step of before: the backward forms U @ B.T again
        F._KEEP_Z = False
        try:
            return F.dora_backward(dy, F.dora_forward(x, W0, A, B, m, s)[1])
        finally:
            F._KEEP_Z = True

    pieces = {
        "plain: x @ W0.T": lambda: x @ W0.T,
        "plain: dy @ W0": lambda: dy @ W0,
        "fwd (3) column_norm": lambda: K.column_norm(W0, A, B, s),
        "fwd (1) U = x @ A.T": lambda: x @ A.T,
        "fwd (5,6) forward_epilogue": lambda: K.forward_epilogue(base, U, B, g, s, None),
        "fwd (5,6) forward_epilogue keeping z": lambda: K.forward_epilogue(z, U, B, g, s, None,
                                                                           z_out=z),
        "bwd (6) backward_epilogue": lambda: K.backward_epilogue(dy, base, U, B, g, s),
        "bwd (6) backward_epilogue_z": lambda: K.backward_epilogue_z(dy, z, g),
        "bwd (6,5) backward_lowrank (dg, dz, dU, dB)": lambda: K.backward_lowrank(dy, base, U, B, g, s),
        "bwd (6,5) backward_lowrank_z": lambda: K.backward_lowrank_z(dy, z, U, B, g, s),
        "bwd (5) dU = s * (dz @ B)": lambda: s * (dz @ B),
        "bwd (5) dB = s * (dz.T @ U)": lambda: s * (dz.T @ U),
        "bwd (1) dA = dU.T @ x": lambda: dU.T @ x,
        "bwd (2,1) dx = dz @ W0 + dU @ A": lambda: dz @ W0 + dU @ A,
        "bwd (2,1) dx = dz @ W0; dx += dU @ A": lambda: np.add(dz @ W0, dU @ A, out=None),
        "exact: W0 @ A.T": lambda: W0 @ A.T,
        "exact: cB.T @ W0": lambda: cB.T @ W0,
        "exact: norm_gradient_products (both)": lambda: K.norm_gradient_products(W0, A, cB),
        "LoRA fwd: x @ W0.T + s * (U @ B.T)": lambda: x @ W0.T + s * (U @ B.T),
        "step: plain fwd+bwd": lambda: (x @ W0.T, dy @ W0),
        "step: LoRA": lambda: F.lora_backward(dy, F.lora_forward(x, W0, A, B, s)[1]),
        "step: DoRA detached": lambda: F.dora_backward(dy, F.dora_forward(x, W0, A, B, m, s)[1]),
        "step: DoRA detached, z not kept": no_keep_z,
        "step: DoRA exact": lambda: F.dora_backward(
            dy, F.dora_forward(x, W0, A, B, m, s)[1], detach_norm=False),
    }

    def dx_inplace():
        dx = dz @ W0
        dx += dU @ A
        return dx

    pieces["bwd (2,1) dx = dz @ W0; dx += dU @ A"] = dx_inplace
    times = {k: [] for k in pieces}
    cpu = {k: [] for k in pieces}
    for f in pieces.values():
        f()
    for _ in range(9):
        for k, f in pieces.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    print(f"(out, in, r, N) = {(out_f, in_f, r, N)}, backend {_backend.backend()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    # GFLOP/s of the products (fastest repeat), to set each against the big GEMM's rate
    big = 2.0 * N * in_f * out_f
    flops = {"plain: x @ W0.T": big, "plain: dy @ W0": big, "fwd (1) U = x @ A.T": 2.0 * N * r * in_f,
             "bwd (5) dU = s * (dz @ B)": 2.0 * N * r * out_f,
             "bwd (5) dB = s * (dz.T @ U)": 2.0 * N * r * out_f,
             "bwd (1) dA = dU.T @ x": 2.0 * N * r * in_f,
             "fwd (5,6) forward_epilogue": 2.0 * N * r * out_f,
             "fwd (5,6) forward_epilogue keeping z": 2.0 * N * r * out_f,
             "bwd (6) backward_epilogue": 2.0 * N * r * out_f,
             "bwd (6,5) backward_lowrank (dg, dz, dU, dB)": 3 * 2.0 * N * r * out_f,
             "bwd (6,5) backward_lowrank_z": 2 * 2.0 * N * r * out_f,
             "exact: W0 @ A.T": 2.0 * out_f * in_f * r, "exact: cB.T @ W0": 2.0 * out_f * in_f * r,
             "fwd (3) column_norm": 2.0 * out_f * in_f * r}
    for k, v in times.items():
        rate = f"   {flops[k] / min(v) / 1e9:6.1f} GF/s" if k in flops else ""
        print(f"  {k:44s} median {np.median(v) * 1e3:8.2f} ms   min {min(v) * 1e3:8.2f} ms   "
              f"CPU median {np.median(cpu[k]) * 1e3:8.2f} ms{rate}")


if __name__ == "__main__":
    main(sys.argv[1:])
