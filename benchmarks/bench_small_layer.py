"""A small DoRALinear's training step against the same math written inline in NumPy.

Issue 11, goal 2: at (out, in) = 64x64, N = 64, r = 8 a ``DoRALinear``
training step (forward + backward, the gradients accumulated into
``layer.grads``) should cost at most 1.3x the same step written inline in
NumPy, with nothing between the products but the math: at these sizes the
per-call argument checks and the dispatch are what a learner's notebook (and
the demo) pays for.

The inline step computes what the layer computes, in the same dtype and the
same order (PEFT's semantics, norm detached, no dropout)::

    n = ||W0 + s B A||_row;  g = m / n
    U = x A^T;  base = x W0^T;  z = base + s U B^T;  y = g z + b0
    dg = sum_N dy z;  dz = g dy;  dm = dg / n
    dU = s dz B;  dB = s dz^T U;  dA = dU^T x;  dx = dz W0 + dU A

Both are timed interleaved in one process, in blocks of ``--inner`` steps
(medians of the blocks' time per step), so the ratio holds for the
machine's state during the run: it prints the load average before and
after, and the CPU. On a shared machine read the CPU-time columns
(``time.process_time``: the time this process ran, not the time it waited
for a core); wall and CPU time agree on a quiet one. Never a timed test.

    python benchmarks/bench_small_layer.py [--out 64] [--in 64] [--r 8] [--N 64]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

import numpy as np  # noqa: E402

import dora_ref  # noqa: E402
from dora_ref import DoRALinear  # noqa: E402


def inline_step(x, dy, W0, A, B, m, s, b0, grads):
    """The training step, inline NumPy: forward, detached backward, accumulate."""
    V = W0 + s * (B @ A)
    n = np.sqrt(np.einsum("ij,ij->i", V, V))
    g = m / n
    U = x @ A.T
    z = x @ W0.T + s * (U @ B.T)
    y = g * z + b0
    dg = np.einsum("ij,ij->j", dy, z)
    dz = dy * g
    dU = s * (dz @ B)
    grads["lora_B"] += s * (dz.T @ U)
    grads["lora_A"] += dU.T @ x
    grads["lora_magnitude_vector"] += dg / n
    dx = dz @ W0
    dx += dU @ A
    return y, dx


def layer_step(layer, x, dy):
    y = layer.forward(x)
    dx = layer.backward(dy)
    return y, dx


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                    if line.startswith("model name"))
        simd = [f for f in ("avx512f", "avx2") if f" {f}" in info]
        return f"{name} ({', '.join(simd) or 'no avx2'})"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def measure(out_f, in_f, r, N, dtype, repeats, backend, inner=10):
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((out_f, in_f)).astype(dtype) / np.sqrt(in_f).astype(dtype)
    b0 = rng.standard_normal(out_f).astype(dtype)
    x = rng.standard_normal((N, in_f)).astype(dtype)
    dy = rng.standard_normal((N, out_f)).astype(dtype)
    with dora_ref.use_backend(backend):
        layer = DoRALinear(W0, b0, r=r, lora_alpha=2 * r, rng=0)
        layer.lora_B[...] = 0.01 * rng.standard_normal(layer.lora_B.shape).astype(dtype)
        A, B, m, s = layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling
        grads = {k: np.zeros_like(v) for k, v in layer.parameters().items()}
        # the two compute the same step (checked here, not timed)
        y1, dx1 = layer_step(layer, x, dy)
        y2, dx2 = inline_step(x, dy, W0, A, B, m, s, b0, grads)
        tol = 1e-4 if dtype == np.float32 else 1e-12
        assert np.allclose(y1, y2, rtol=tol, atol=tol) and np.allclose(dx1, dx2, rtol=tol, atol=tol)
        wall = {"layer": [], "inline": []}
        cpu = {"layer": [], "inline": []}
        for _ in range(max(1, repeats // inner)):  # interleaved: both see the same machine
            for name in ("layer", "inline"):
                c0, t0 = time.process_time(), time.perf_counter()
                if name == "layer":
                    for _ in range(inner):
                        layer_step(layer, x, dy)
                else:
                    for _ in range(inner):
                        inline_step(x, dy, W0, A, B, m, s, b0, grads)
                wall[name].append((time.perf_counter() - t0) / inner)
                cpu[name].append((time.process_time() - c0) / inner)
    return {k: float(np.median(v)) for k, v in wall.items()}, \
        {k: float(np.median(v)) for k, v in cpu.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=int, default=64)
    p.add_argument("--in", dest="in_f", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2000, help="steps of each, in all")
    p.add_argument("--inner", type=int, default=10, help="steps per timed block")
    args = p.parse_args(argv)
    print(f"CPU: {cpu_model()}; load average before: {os.getloadavg()}")
    print(f"(out, in, r, N) = ({args.out}, {args.in_f}, {args.r}, {args.N}); "
          f"{args.repeats} steps each, medians of interleaved blocks of {args.inner}; "
          f"goal: layer / inline <= 1.3")
    print(f"{'backend':8s} {'dtype':8s} {'layer us':>9s} {'inline us':>10s} {'ratio':>6s}"
          f" | CPU time: {'layer us':>9s} {'inline us':>10s} {'ratio':>6s}")
    for backend in dora_ref.available_backends():
        for dtype in (np.float32, np.float64):
            wall, cpu = measure(args.out, args.in_f, args.r, args.N, dtype,
                                args.repeats, backend, args.inner)
            print(f"{backend:8s} {np.dtype(dtype).name:8s} {wall['layer'] * 1e6:9.1f} "
                  f"{wall['inline'] * 1e6:10.1f} {wall['layer'] / wall['inline']:6.2f}"
                  f" | {'':9s} {cpu['layer'] * 1e6:9.1f} {cpu['inline'] * 1e6:10.1f} "
                  f"{cpu['layer'] / cpu['inline']:6.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
