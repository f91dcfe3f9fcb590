"""The backward with and without the one-pass kernels, side by side (float32, 2 threads).

``dora_backward`` (``dora_ref/core/functional.py``) gets dg, dz, dU and dB from
``backward_lowrank`` and, exact only, W0 @ A.T and (c B).T @ W0 from
``norm_gradient_products``. This script times it, interleaved in one process,
against the same backward written with ``backward_epilogue`` and separate
BLAS products (what it did before), at the four shapes of
``bench_kernels.py``, and checks that both give the same gradients up to
rounding. Medians and minima of interleaved repeats; the machine may be
shared, so compare rows of one run only.

    python benchmarks/bench_fused_backward.py [--repeats 25] [--openblas-thread-timeout 4]

Writes ``benchmarks/results/bench_fused_backward[_obttN].md``.
"""
from __future__ import annotations

import os
import sys

_TIMEOUT = None
for _i, _a in enumerate(sys.argv):
    if _a.startswith("--openblas-thread-timeout"):
        _TIMEOUT = _a.split("=", 1)[1] if "=" in _a else sys.argv[_i + 1]
if _TIMEOUT and os.environ.get("OPENBLAS_THREAD_TIMEOUT") != _TIMEOUT:
    os.execve(sys.executable, [sys.executable, *sys.argv],
              dict(os.environ, OPENBLAS_THREAD_TIMEOUT=_TIMEOUT))
for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = "2"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

# Time the checkout this script sits in, not an installed dora_ref.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dora_ref.core import backend as _backend  # noqa: E402
from dora_ref.core import functional as F  # noqa: E402

SHAPES = [(1024, 1024, 8, 2048), (4096, 4096, 8, 512), (4096, 4096, 64, 512), (11008, 4096, 16, 256)]
HERE = os.path.dirname(os.path.abspath(__file__))


def unfused_backward(dy, ctx, detach_norm, base):
    """dora_backward as it was before the one-pass kernels (no dropout); ``base``: x @ W0.T."""
    K = _backend.kernels()
    W0, A, B, s = ctx.W0, ctx.A, ctx.B, ctx.scaling
    dg, dz = K.backward_epilogue(dy, base, ctx.U, B, ctx.g, s)
    dm = F.divide_by_norm(dg, ctx.n)
    dU = s * (dz @ B)
    dB = s * (dz.T @ ctx.U)
    dA = dU.T @ ctx.x
    dx = dz @ W0
    dx += dU @ A
    if not detach_norm:
        c = F.divide_by_norm(F.divide_by_norm(-dg * ctx.g, ctx.n), ctx.n)
        cB = c[:, None] * B
        VAt = W0 @ A.T + s * (B @ (A @ A.T))
        dB += s * (c[:, None] * VAt)
        dA += s * (cB.T @ W0 + s * ((cB.T @ B) @ A))
    return dx, dA, dB, dm


def run(shape, repeats):
    out_f, in_f, r, N = shape
    rng = np.random.default_rng(0)
    f32 = np.float32
    W0 = rng.standard_normal((out_f, in_f), dtype=f32) / f32(np.sqrt(in_f))
    A = rng.standard_normal((r, in_f), dtype=f32) / f32(np.sqrt(in_f))
    B = rng.standard_normal((out_f, r), dtype=f32) * f32(0.01)
    x = rng.standard_normal((N, in_f), dtype=f32)
    dy = rng.standard_normal((N, out_f), dtype=f32)
    m = F.column_norm(W0, A, B, 2.0) * f32(1.1)
    _, ctx = F.dora_forward(x, W0, A, B, m, 2.0)
    base = x @ W0.T  # the unfused backward forms z from it
    kept = ctx.base.copy()  # what the forward left in its context: base, or z above FUSED_MAX_RANK

    def fresh():  # a context as the forward left it: the backward writes dz over its array
        return dataclasses.replace(ctx, base=kept.copy())

    for detach in (True, False):  # same gradients up to rounding
        new = F.dora_backward(dy, fresh(), detach_norm=detach)
        old = unfused_backward(dy, ctx, detach, base)
        for a, b in zip((new.dx, new.dA, new.dB, new.dmagnitude), old):
            scale = np.abs(b).max()
            assert np.abs(a - b).max() <= 1e-4 * scale, "fused and unfused backward disagree"
    # (prepare, call): prepare runs outside the timed call (a fresh context per call)
    fns = {
        "plain dy @ W0": (None, lambda _: dy @ W0),
        "detached, unfused": (None, lambda _: unfused_backward(dy, ctx, True, base)),
        "detached, fused": (fresh, lambda c: F.dora_backward(dy, c)),
        "exact, unfused": (None, lambda _: unfused_backward(dy, ctx, False, base)),
        "exact, fused": (fresh, lambda c: F.dora_backward(dy, c, detach_norm=False)),
    }
    times = {k: [] for k in fns}
    for prepare, f in fns.values():
        f(prepare() if prepare else None)
    for _ in range(repeats):
        for k, (prepare, f) in fns.items():
            arg = prepare() if prepare else None
            t0 = time.perf_counter()
            f(arg)
            times[k].append(time.perf_counter() - t0)
    return {k: (np.median(v) * 1e3, min(v) * 1e3) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--openblas-thread-timeout", default=None)
    args = ap.parse_args()
    lines = [
        "# Backward with and without the one-pass kernels",
        "",
        f"float32, 2 threads, backend `{_backend.backend()}`, {args.repeats} interleaved repeats, "
        f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')}, "
        f"load average at start {os.getloadavg()[0]:.2f}. Backward only (the forward is "
        f"unchanged); ms, median / min.",
        "",
        "| (out, in, r, N) | plain dy @ W0 | detached, unfused | detached, fused | "
        "exact, unfused | exact, fused |",
        "|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        t = run(shape, args.repeats)
        cells = " | ".join(f"{t[k][0]:.1f} / {t[k][1]:.1f}" for k in t)
        lines.append(f"| {shape} | {cells} |")
        print(lines[-1], flush=True)
    suffix = f"_obtt{args.openblas_thread_timeout}" if args.openblas_thread_timeout else ""
    path = os.path.join(HERE, "results", f"bench_fused_backward{suffix}.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
