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

``--base DIR``: also time the layer of another checkout (its C extension
built in place), imported under the name ``dora_ref_base``, in the same
blocks: this checkout's layer, the base's, the inline step, interleaved, so
that a before/after comparison sees one machine state; it prints both
ratios against the inline step and this / base.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

import numpy as np  # noqa: E402

import dora_ref  # noqa: E402


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


def load_base(path):
    """The ``dora_ref`` package of the checkout at ``path``, all of it imported, as its own copy.

    The package imports some of its modules by absolute name (the lazy names of
    ``dora_ref/__init__.py``, ``_aliases``): it is imported as ``dora_ref`` with
    this checkout's modules set aside, every module loaded, then its modules
    are moved to ``dora_ref_base.*`` and this checkout's put back. The base's
    modules keep the references they bound at import, so its layer runs its own
    code from then on.
    """
    init = os.path.join(path, "dora_ref", "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"--base {path}: no dora_ref/__init__.py there")
    ours = {k: sys.modules.pop(k) for k in list(sys.modules)
            if k == "dora_ref" or k.startswith("dora_ref.")}
    sys.path.insert(0, os.path.abspath(path))
    try:
        import dora_ref as base  # noqa: F811 (the base's, while ours is set aside)
        base.DoRALinear  # noqa: B018 (imports the lazy rest)
        importlib.import_module("dora_ref.layers.linear")
        importlib.import_module("dora_ref.kernels.c")
        if os.path.dirname(os.path.abspath(base.__file__)) != os.path.dirname(os.path.abspath(init)):
            raise SystemExit(f"--base {path}: imported {base.__file__} instead")
    finally:
        sys.path.remove(os.path.abspath(path))
        theirs = {k: sys.modules.pop(k) for k in list(sys.modules)
                  if k == "dora_ref" or k.startswith("dora_ref.")}
        sys.modules.update(ours)
    for k, module in theirs.items():
        sys.modules["dora_ref_base" + k[len("dora_ref"):]] = module
    return theirs["dora_ref"]


def measure(out_f, in_f, r, N, dtype, repeats, backend, inner=10, base=None):
    """Median time per step (wall, CPU) of "layer", "inline" and, with ``base``, "base"."""
    rng = np.random.default_rng(0)
    order_rng = np.random.default_rng(1)
    W0 = rng.standard_normal((out_f, in_f)).astype(dtype) / np.sqrt(in_f).astype(dtype)
    b0 = rng.standard_normal(out_f).astype(dtype)
    x = rng.standard_normal((N, in_f)).astype(dtype)
    dy = rng.standard_normal((N, out_f)).astype(dtype)
    B0 = 0.01 * rng.standard_normal((out_f, r)).astype(dtype)
    layers = {}
    for name, package in (("layer", dora_ref), ("base", base)):
        if package is not None:
            with package.use_backend(backend):
                layers[name] = package.DoRALinear(W0, b0, r=r, lora_alpha=2 * r, rng=0)
                layers[name].lora_B[...] = B0
    layer = layers["layer"]
    A, B, m, s = layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling
    grads = {k: np.zeros_like(v) for k, v in layer.parameters().items()}
    # they compute the same step (checked here, not timed)
    y2, dx2 = inline_step(x, dy, W0, A, B, m, s, b0, grads)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for name, lay in layers.items():
        with (base if name == "base" else dora_ref).use_backend(backend):
            y1, dx1 = layer_step(lay, x, dy)
        assert np.allclose(y1, y2, rtol=tol, atol=tol) and np.allclose(dx1, dx2, rtol=tol, atol=tol)
    names = ["layer", "base", "inline"] if base is not None else ["layer", "inline"]
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    with dora_ref.use_backend(backend), \
            (base.use_backend(backend) if base is not None else contextlib.nullcontext()):
        for block in range(max(1, repeats // inner)):  # interleaved: all see the same machine
            # a new order each block (seeded): a rotation keeps who runs right after whom
            for name in order_rng.permutation(names):
                c0, t0 = time.process_time(), time.perf_counter()
                if name == "inline":
                    for _ in range(inner):
                        inline_step(x, dy, W0, A, B, m, s, b0, grads)
                else:
                    lay = layers[name]
                    for _ in range(inner):
                        layer_step(lay, x, dy)
                wall[name].append((time.perf_counter() - t0) / inner)
                cpu[name].append((time.process_time() - c0) / inner)
    return {k: float(np.median(v)) for k, v in wall.items()}, \
        {k: float(np.median(v)) for k, v in cpu.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=int, default=64,
                   help="the layer's out_features (not a folder: this script writes no file)")
    p.add_argument("--in", dest="in_f", type=int, default=64, help="the layer's in_features")
    p.add_argument("--r", type=int, default=8, help="the adapter's rank")
    p.add_argument("--N", type=int, default=64, help="rows of x per step (the batch)")
    p.add_argument("--repeats", type=int, default=2000, help="steps of each, in all")
    p.add_argument("--inner", type=int, default=10, help="steps per timed block")
    p.add_argument("--base", metavar="DIR", help="also time the layer of the checkout in DIR")
    args = p.parse_args(argv)
    base = load_base(args.base) if args.base else None
    started = time.perf_counter()
    print(f"CPU: {cpu_model()}; load average before: {os.getloadavg()}")
    print(f"(out, in, r, N) = ({args.out}, {args.in_f}, {args.r}, {args.N}); "
          f"{args.repeats} steps each, medians of interleaved blocks of {args.inner}; "
          f"goal: layer / inline <= 1.3")
    print(f"{'backend':8s} {'dtype':8s} {'layer us':>9s} {'inline us':>10s} {'ratio':>6s}"
          f" | CPU time: {'layer us':>9s} {'inline us':>10s} {'ratio':>6s}")
    if base is not None:
        print(f"base: {os.path.abspath(args.base)} (its layer timed in the same blocks)")
    for backend in dora_ref.available_backends():
        if base is not None and backend not in base.available_backends():
            continue
        for dtype in (np.float32, np.float64):
            wall, cpu = measure(args.out, args.in_f, args.r, args.N, dtype,
                                args.repeats, backend, args.inner, base)
            if base is not None:
                print(f"{backend:8s} {np.dtype(dtype).name:8s} base {wall['base'] * 1e6:9.1f} us, "
                      f"ratio {wall['base'] / wall['inline']:6.2f}; this / base "
                      f"{wall['layer'] / wall['base']:5.3f} | CPU time: base "
                      f"{cpu['base'] * 1e6:9.1f} us, ratio {cpu['base'] / cpu['inline']:6.2f}; "
                      f"this / base {cpu['layer'] / cpu['base']:5.3f}")
            print(f"{backend:8s} {np.dtype(dtype).name:8s} {wall['layer'] * 1e6:9.1f} "
                  f"{wall['inline'] * 1e6:10.1f} {wall['layer'] / wall['inline']:6.2f}"
                  f" | {'':9s} {cpu['layer'] * 1e6:9.1f} {cpu['inline'] * 1e6:10.1f} "
                  f"{cpu['layer'] / cpu['inline']:6.2f}")
    # the kernel updates the load average every 5 s: after a run that short it is the same
    print(f"load average after: {os.getloadavg()}"
          + (" (unchanged: the run took under 5 s, the average's update interval)"
             if time.perf_counter() - started < 5 else ""))


if __name__ == "__main__":
    main()
