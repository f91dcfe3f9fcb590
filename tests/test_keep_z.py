"""The training forward keeps z = base + s * U @ B.T for its backward (issue 11).

A DoRA training forward without dropout writes z over the (N, out) base
product it owns (``forward_epilogue(..., z_out=base)``), and the backward
reads it (``backward_lowrank_z``) instead of forming U @ B.T again.

What is asserted, against independent computations:

* Bit for bit, within each backend: y and every gradient equal those of the
  forward and backward that do not keep z (``functional._KEEP_Z = False``),
  at ranks on both sides of the C backend's ``FUSED_MAX_RANK`` and with
  N = 0. The same operations form z in the forward as the backward formed
  it (the C build does not contract multiply-adds), so no tolerance is due.
* z against float64 (both backends): one evaluation of base + s * sum_k
  U_ik B_jk is within ``gamma_(r+2) (|base| + |s| |U| @ |B|.T)`` of the
  exact value (Higham, Eq. 3.5: r products summed, then the scaling and the
  addition of base, each one rounding), with the safety factor 4 of
  ``test_kernels_c.py``.
* The paths that cannot keep z still work: with dropout (the base product
  feeds another formula), an eval forward that wrote y over base (the
  backward forms base again), and a stale context (A changed in place
  after the forward) is refused.
* The arguments: ``z_out`` is checked as ``out`` is, by name, in both backends.
"""
from __future__ import annotations

import numpy as np
import pytest

import dora_ref
from dora_ref.core import backend as _backend
from dora_ref.core import functional as F
from dora_ref.core import kernels_numpy as NP
from dora_ref.porting.tolerance import gamma


def _problem(dtype, out_f, in_f, r, N, seed=3):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    return dict(x=draw(N, in_f), W0=draw(out_f, in_f), A=draw(r, in_f), B=draw(out_f, r),
                m=(rng.random(out_f) + 0.5).astype(dtype), bias=draw(out_f), dy=draw(N, out_f),
                s=0.7)


def _step(p, keep_z, bias=True, detach_norm=True):
    """One step with z kept or not, at every rank (the backends' KEEP_Z_MIN_RANK set to 0:
    the z kernels are checked below the C backend's threshold too)."""
    kernels = _backend.kernels()
    saved = F._KEEP_Z, kernels.KEEP_Z_MIN_RANK
    F._KEEP_Z, kernels.KEEP_Z_MIN_RANK = keep_z, 0
    try:
        y, ctx = F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"],
                                p["bias"] if bias else None)
    finally:
        F._KEEP_Z, kernels.KEEP_Z_MIN_RANK = saved
    assert ctx.base_is_z is keep_z
    return (y, *F.dora_backward(p["dy"], ctx, detach_norm=detach_norm))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 29, 1, 11), (70, 50, 12, 9), (90, 61, 13, 17),
                                   (130, 40, 33, 5), (20, 30, 4, 0)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_keeping_z_changes_no_bit_of_the_step(dtype, shape, bias, detach_norm):
    p = _problem(dtype, *shape)
    kept = _step(p, True, bias, detach_norm)
    formed = _step(p, False, bias, detach_norm)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dmagnitude"), kept, formed):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [3, 13, 40])
def test_z_out_holds_base_plus_the_low_rank_term(dtype, r):
    N, out_f = 23, 67
    rng = np.random.default_rng(5)
    base, U, B = (rng.standard_normal(s).astype(dtype) for s in ((N, out_f), (N, r), (out_f, r)))
    g, bias = rng.random(out_f).astype(dtype) + 0.5, rng.standard_normal(out_f).astype(dtype)
    s = 0.7
    K = _backend.kernels()
    y_plain = K.forward_epilogue(base, U, B, g, s, bias)
    z = base.copy()
    y = K.forward_epilogue(z, U, B, g, s, bias, z_out=z)  # over base itself, as the forward
    assert np.array_equal(y, y_plain)  # the same y, bit for bit
    b64, U64, B64 = (a.astype(np.float64) for a in (base, U, B))
    exact = b64 + s * (U64 @ B64.T)
    bound = 4 * gamma(r + 2, dtype) * (np.abs(b64) + s * (np.abs(U64) @ np.abs(B64).T))
    assert np.all(np.abs(z - exact) <= bound)
    z3 = base.copy()  # the functional core's call, without the overlap checks: the same
    assert np.array_equal(K._forward_epilogue_keep_z(z3, U, B, g, s, bias), y_plain)
    assert np.array_equal(z3, z)
    z4 = np.asfortranarray(base)  # not the usual call
    if K is NP:  # elementwise NumPy: any layout takes z
        assert np.array_equal(K._forward_epilogue_keep_z(z4, U, B, g, s, bias), y_plain)
        assert np.array_equal(z4, z)
    else:  # C: through forward_epilogue's checks
        with pytest.raises(ValueError, match="z_out must be C-contiguous"):
            K._forward_epilogue_keep_z(z4, U, B, g, s, bias)
    z2 = np.empty_like(base)  # a separate array: base is left as it was
    base_before = base.copy()
    K.forward_epilogue(base, U, B, g, s, bias, z_out=z2)
    assert np.array_equal(z2, z) and np.array_equal(base, base_before)
    # the backward given z: the bits of the backward that forms z from base
    dy = rng.standard_normal((N, out_f)).astype(dtype)
    for a, b in zip(K.backward_lowrank_z(dy, z, U, B, g, s), K.backward_lowrank(dy, base, U, B, g, s)):
        assert np.array_equal(a, b)
    for a, b in zip(K.backward_epilogue_z(dy, z, g), K.backward_epilogue(dy, base, U, B, g, s)):
        assert np.array_equal(a, b)


def test_dropout_does_not_keep_z_and_its_gradient_is_unchanged():
    p = _problem(np.float64, 31, 23, 5, 9)
    mask = (np.random.default_rng(8).random(p["x"].shape) > 0.3) / 0.7
    y, ctx = F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"], p["bias"],
                            dropout_mask=mask)
    assert not ctx.base_is_z
    dx = F.dora_backward(p["dy"], ctx).dx
    # finite differences of L = sum(dy * y) along one direction of x (float64, central)
    v = np.random.default_rng(9).standard_normal(p["x"].shape)
    h = 1e-6

    def L(x):
        return np.sum(p["dy"] * F.dora_forward(x, p["W0"], p["A"], p["B"], p["m"], p["s"],
                                                p["bias"], dropout_mask=mask)[0])

    fd = (L(p["x"] + h * v) - L(p["x"] - h * v)) / (2 * h)
    assert abs(fd - np.sum(dx * v)) <= 1e-6 * np.sum(np.abs(dx * v))


def test_eval_forward_then_backward_forms_base_again():
    """A layer in eval writes y over its base product: nothing to keep, the backward recomputes."""
    p = _problem(np.float32, 24, 16, 16, 6)  # r = 16: z kept by both backends
    layer = dora_ref.layers.DoRALinear(p["W0"], r=16, lora_alpha=8, rng=0)
    layer.lora_B[...] = p["B"]
    layer.train()
    y_train = layer(p["x"])
    assert layer._ctx.base_is_z
    layer.zero_grad()
    dx_train = layer.backward(p["dy"])
    grads_train = {k: v.copy() for k, v in layer.grads.items()}
    layer.eval()
    y_eval = layer(p["x"])
    assert layer._ctx.base is None and not layer._ctx.base_is_z
    layer.zero_grad()
    dx_eval = layer.backward(p["dy"])
    assert np.array_equal(y_eval, y_train) and np.array_equal(dx_eval, dx_train)
    for name, grad in grads_train.items():
        assert np.array_equal(layer.grads[name], grad), name


def test_a_kept_z_is_not_used_after_A_changed():
    p = _problem(np.float32, 24, 16, 16, 6)  # r = 16: z kept by both backends
    y, ctx = F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
    assert ctx.base_is_z
    p["A"][0, 0] += 1
    with pytest.raises(RuntimeError, match="A"):
        F.dora_backward(p["dy"], ctx)


def _epilogue_args(dtype=np.float32, N=5, out_f=7, r=3):
    rng = np.random.default_rng(1)
    return (rng.standard_normal((N, out_f)).astype(dtype), rng.standard_normal((N, r)).astype(dtype),
            rng.standard_normal((out_f, r)).astype(dtype), rng.random(out_f).astype(dtype) + 0.5)


def test_z_out_is_checked_by_name():
    K = _backend.kernels()
    base, U, B, g = _epilogue_args()
    with pytest.raises(ValueError, match="z_out cannot be combined"):
        K.forward_epilogue(base, U, B, g, 0.5, None, out=np.empty_like(base), z_out=base)
    with pytest.raises(TypeError, match="z_out must have"):
        K.forward_epilogue(base, U, B, g, 0.5, None, z_out=base.astype(np.float64))
    with pytest.raises(ValueError, match=r"z_out must have base's shape \(5, 7\)"):
        K.forward_epilogue(base, U, B, g, 0.5, None, z_out=np.empty((5, 6), np.float32))
    with pytest.raises(ValueError, match="z_out must be C-contiguous"):
        K.forward_epilogue(base, U, B, g, 0.5, None, z_out=np.empty((7, 5), np.float32).T)
    ro = base.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="z_out must be writeable"):
        K.forward_epilogue(ro, U, B, g, 0.5, None, z_out=ro)
    with pytest.raises(ValueError, match="z_out overlaps base"):
        big = np.zeros((6, 7), np.float32)
        big[:5] = base
        K.forward_epilogue(big[:5], U, B, g, 0.5, None, z_out=big[1:])
    buf = np.zeros(35, np.float32)
    U_view = buf[:15].reshape(5, 3)
    U_view[...] = U
    with pytest.raises(ValueError, match="z_out overlaps U"):
        K.forward_epilogue(base, U_view, B, g, 0.5, None, z_out=buf.reshape(5, 7))


@pytest.mark.parametrize("kernel", ["backward_epilogue_z", "backward_lowrank_z"])
def test_backward_z_kernels_refuse_bad_arguments(kernel):
    K = _backend.kernels()
    if K is NP:
        pytest.skip("the NumPy twins are called checked by the functional core (as their "
                    "siblings backward_epilogue and backward_lowrank)")
    base, U, B, g = _epilogue_args()
    dy = base.copy()
    call = {"backward_epilogue_z": lambda dy, z, g, U=U, B=B: K.backward_epilogue_z(dy, z, g),
            "backward_lowrank_z": lambda dy, z, g, U=U, B=B: K.backward_lowrank_z(dy, z, U, B, g,
                                                                                  0.5)}[kernel]
    with pytest.raises(ValueError, match=r"dy must have shape \(5, 7\)"):
        call(dy[:4], base, g)
    with pytest.raises(ValueError, match=r"g must have shape \(7,\)"):
        call(dy, base, g[:6])
    with pytest.raises(TypeError, match="z has dtype float64"):
        call(dy, base.astype(np.float64), g)
    with pytest.raises(TypeError, match="must be a numpy.ndarray"):
        call(dy, base.tolist(), g)


@pytest.mark.parametrize("r", [1, 8, 12, 13, 64])
def test_which_ranks_keep_z_by_default(backend, r):
    """The C backend keeps z from r = FUSED_MAX_RANK + 1 on (below, its fused backward forms
    z in registers for less than storing it costs); the NumPy backend at every rank."""
    p = _problem(np.float64, 20, 16, r, 5)
    _, ctx = F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
    if backend == "c":
        from dora_ref.kernels import c as C
        assert C.KEEP_Z_MIN_RANK == C.FUSED_MAX_RANK + 1
        assert ctx.base_is_z is (r > C.FUSED_MAX_RANK)
    else:
        assert ctx.base_is_z is True
