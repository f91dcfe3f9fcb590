"""The backward writes dz over the (N, out) array its context kept (issue 11, goal 3).

``dora_forward`` keeps the base product x @ W0.T (or z = base + s * U @ B.T
over it) for the backward; nothing reads it after the backward's epilogue,
so ``_dora_backward_f32`` takes it from the context and the kernels write
dz over it (``_backward_lowrank_own`` of each backend) instead of into a
fresh (N, out) array: 8 MiB less fresh memory, and its page faults, a step
at (4096, 4096, r, 512) in float32.

What is asserted, against independent computations:

* Bit for bit, within each backend: dg, dz, dU and dB equal the public
  kernels' (``backward_lowrank`` / ``backward_lowrank_z``, which write a new
  dz) on a copy of the same array, at ranks on both sides of the C
  backend's ``FUSED_MAX_RANK`` and at N and out that are not multiples of a
  tile; the same operations run, so no tolerance is due.
* The whole step: a second backward on the same context (which forms the
  base product again) gives the first one's bits, and both equal a fresh
  forward and backward; with dropout and after an eval forward too.
* An interrupt in the middle of the backward's kernel (dz half written over
  the context's array) leaves a context whose next backward is right: the
  context gives the array up before the kernel writes into it.
* Memory: the backward allocates no (N, out) array of NumPy's (tracemalloc).
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dora_ref.core import backend as _backend
from dora_ref.core import functional as F


def _problem(dtype, out_f, in_f, r, N, seed=5):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    return dict(x=draw(N, in_f), W0=draw(out_f, in_f), A=draw(r, in_f), B=draw(out_f, r),
                m=(rng.random(out_f) + 0.5).astype(dtype), dy=draw(N, out_f), s=0.7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [1, 8, 12, 13, 16, 64, 70])
@pytest.mark.parametrize("base_is_z", [False, True])
def test_kernels_write_dz_over_base_with_the_public_kernels_bits(dtype, r, base_is_z):
    K = _backend.kernels()
    rng = np.random.default_rng(r)
    N, out_f = 37, 67  # neither a multiple of a tile; at r = 70 r >= out (BLAS's U @ B.T in C)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    dy, base, U, B = draw(N, out_f), draw(N, out_f), draw(N, r), draw(out_f, r)
    g = (rng.random(out_f) + 0.5).astype(dtype)
    public = K.backward_lowrank_z if base_is_z else K.backward_lowrank
    expected = public(dy, base.copy(), U, B, g, 0.7)
    own = base.copy()
    got = K._backward_lowrank_own(dy, own, U, B, g, 0.7, base_is_z)
    assert got[1] is own  # dz went over the array given
    for name, e, a in zip(("dg", "dz", "dU", "dB"), expected, got):
        assert a.dtype == dtype and a.shape == e.shape, name
        np.testing.assert_array_equal(a, e, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [4, 16])  # the fused backward; the forward that keeps z (C and NumPy)
@pytest.mark.parametrize("dropout", [False, True])
def test_a_second_backward_on_one_context_gives_the_same_bits(dtype, r, dropout):
    p = _problem(dtype, 65, 40, r, 19)
    mask = None
    if dropout:
        mask = (np.random.default_rng(1).random(p["x"].shape) > 0.25).astype(dtype) / dtype(0.75)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
    y, ctx = F.dora_forward(*args, dropout_mask=mask)
    first = F.dora_backward(p["dy"], ctx, detach_norm=False)
    assert ctx.base is None and not ctx.base_is_z  # the backward took it
    second = F.dora_backward(p["dy"], ctx, detach_norm=False)
    _, ctx_fresh = F.dora_forward(*args, dropout_mask=mask)
    fresh = F.dora_backward(p["dy"], ctx_fresh, detach_norm=False)
    for name, a, b, c in zip(("dx", "dA", "dB", "dmagnitude"), first, second, fresh):
        np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(a, c, err_msg=name)


def test_an_interrupt_inside_the_backward_kernel_leaves_a_usable_context(monkeypatch):
    """A Ctrl-C while the kernel writes dz over the context's array: the next backward on
    that context must not read the half-written array as its base product (or z)."""
    p = _problem(np.float64, 48, 30, 16, 11)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
    _, ctx_ref = F.dora_forward(*args)
    expected = F.dora_backward(p["dy"], ctx_ref)

    K = _backend.kernels()
    real = K._backward_lowrank_own

    def interrupted(dy, base, *rest):
        base[: base.shape[0] // 2] = 1e300  # dz half written ...
        raise KeyboardInterrupt  # ... when the signal lands

    _, ctx = F.dora_forward(*args)
    monkeypatch.setattr(K, "_backward_lowrank_own", interrupted)
    with pytest.raises(KeyboardInterrupt):
        F.dora_backward(p["dy"], ctx)
    monkeypatch.setattr(K, "_backward_lowrank_own", real)
    again = F.dora_backward(p["dy"], ctx)
    for name, a, b in zip(("dx", "dA", "dB", "dmagnitude"), again, expected):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_layer_eval_forward_then_backward_and_backward_again():
    """The eval forward wrote y over its base product (the context has none): each
    backward forms it again, and writes dz over that."""
    from dora_ref.layers import DoRALinear

    p = _problem(np.float32, 33, 20, 16, 9)
    layer = DoRALinear(p["W0"], r=16, lora_alpha=8, rng=0)
    layer.lora_B[...] = p["B"]
    layer.eval()
    layer(p["x"])
    first = layer.backward(p["dy"])  # dx (the layer accumulates its gradients)
    second = layer.backward(p["dy"])
    layer.train()
    layer(p["x"])
    third = layer.backward(p["dy"])
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)


@pytest.mark.parametrize("r", [8, 16])
def test_the_backward_allocates_no_out_sized_array(r):
    """dz goes over the context's array: the backward's NumPy allocations at peak are dx,
    the small gradients and one block of _add_low_rank's rows (about 1 MiB), not an (N, out)
    array (2 MiB here)."""
    N, out_f, in_f = 256, 2048, 128
    p = _problem(np.float32, out_f, in_f, r, N)
    _, ctx = F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
    tracemalloc.start()
    try:
        dx, dA, dB, dm = F.dora_backward(p["dy"], ctx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    results = dx.nbytes + dA.nbytes + dB.nbytes + dm.nbytes
    out_sized = N * out_f * 4
    # besides the results: the (N, r) and (out, r) products and their scaled copies,
    # dg and 1/n terms, a block of rows of dx; far below one (N, out) array
    small = 4 * (N * r + out_f * r) * 4 + 4 * out_f * 4 + (1 << 20)
    assert peak - results <= small < out_sized, (peak, results, small, out_sized)
