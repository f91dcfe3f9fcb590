"""The functional API on float16/bfloat16 weights: the two policies, linear layout.

``dora_ref.core.functional`` hands its float16/bfloat16 calls here, after
its argument checks; ``dora_ref.core.precision`` states the dtype rules.
Shapes are ``functional``'s: x (N, in), W0 (out, in), A (r, in), B (out, r),
magnitude and n (out,).

Policy "consistent": the float32 code of ``functional`` on the exactly
upcast inputs (``_dora_forward``, ``_dora_backward_f32``, the kernels), each
result rounded once to its storage dtype: y, dx and a merged or unmerged
weight to W0's dtype, dA, dB, dmagnitude to the adapter's. With an lp
magnitude ("pure") the norm is rounded to the magnitude's dtype before the
division, so that g = m / n == 1 exactly at init.

Policy "peft": PEFT 0.21.2's cast points on CPU (``peft/tuners/lora/dora.py``
with ``autocast_adapter_dtype`` True or False, read from A's dtype). Written
with ``op``, the rounding of PEFT's adapter-side arithmetic: none (float32)
with float32 adapters, "round to lp after every operation" with lp ones.
An lp matrix product of torch accumulates in float32 and rounds once, so it
is ``op(float32 product)`` here. Each step cites the PEFT line it matches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import backend as _backend
from . import functional as F
from .kernels_numpy import _row_blocks
from .norm import (_rescue_extreme_rows, check_norm, divide_by_norm, magnitude_over_norm,
                   refuse_overflowed_norm)
from ._validate import WeightSnapshot, all_finite, check_finite, check_input, \
    check_result_finite, check_rows_finite, describe_overflow, fits_dtype
from .precision import classify, finfo, round_to, upcast

F32 = np.float32


@dataclass
class Precision:
    """What a low-precision forward remembers for its backward.

    Attributes
    ----------
    policy : str
        "consistent" or "peft".
    lp : numpy dtype
        W0's dtype (float16 or bfloat16): x, y, dx.
    adapter : numpy dtype
        A's dtype (float32 "mixed", or ``lp`` "pure"): dA, dB, dmagnitude.
    parts : dict or None
        Under "peft", the forward's intermediate values the backward reads.
    """

    policy: str
    lp: np.dtype
    adapter: np.dtype
    parts: dict = None


def _op(adapter, lp):
    """PEFT's rounding of adapter-side arithmetic: identity (float32 adapter) or via lp."""
    if adapter == np.dtype(F32):
        return lambda a: np.asarray(a, F32)
    return lambda a: round_to(np.asarray(a, F32), lp).astype(F32)


def _store(a, dtype, name, inputs):
    """Round a float32 result once to ``dtype``; refuse it if that overflowed."""
    r = round_to(a, dtype)
    check_result_finite([(name, r)], inputs)
    return r


def _check_rows_finite(what, W):
    """``check_rows_finite`` one row block at a time: no (out, in) bool temporary."""
    for rows in _row_blocks(*W.shape, W.itemsize):
        block = W[rows]
        if not np.isfinite(block).all():
            check_rows_finite(what, W)  # names every bad row (a rare, failing path)


def _f32_norm(W0, A32, B32, scaling, allow_zero_norm):
    """Row norms of W0 + s B A, float32, from the kernel that reads lp W0 in row blocks."""
    n = _backend.low_precision_kernels().column_norm(W0, A32, B32, scaling)
    _rescue_extreme_rows(n, W0, A32, B32, scaling)
    check_norm(n, W0, allow_zero_norm, A32, B32, scaling)
    return n


def _to_magnitude_dtype(n, magnitude_dtype, W0, allow_zero_norm):
    """n rounded to the magnitude's dtype (pure lp), float32 values; checked again (fp16 underflow)."""
    if magnitude_dtype == np.dtype(F32):
        return n, n
    stored = round_to(n, magnitude_dtype)
    refuse_overflowed_norm(n, stored)
    n32 = stored.astype(F32)
    check_norm(n32, W0, allow_zero_norm)
    return stored, n32


# ---------------------------------------------------------------------------
# the norm and the magnitude
# ---------------------------------------------------------------------------


def column_norm(W0, A, B, scaling, allow_zero_norm, policy):
    """``functional.column_norm`` for an lp W0: float32 ("consistent", and "peft" mixed) or lp."""
    case, lp = classify(W0, A, B)
    if policy == "consistent" or case == "mixed":
        # PEFT mixed: torch.linalg.norm(W.to(f32) + s * lora_weight) in float32
        return _f32_norm(W0, upcast(A), upcast(B), scaling, allow_zero_norm)
    return _peft_pure_norm(W0, A, B, scaling, lp, allow_zero_norm)


def _peft_pure_norm(W0, A, B, scaling, lp, allow_zero_norm):
    """PEFT with lp adapters: n = lp(||lp(W + lp(s * lp(B @ A)))||), row block by row block."""
    op = _op(lp, lp)
    A32, B32 = upcast(A), upcast(B)
    n = np.empty(W0.shape[0], lp)
    for rows in _row_blocks(*W0.shape, 4):
        lora_weight = op(B32[rows] @ A32)  # lora_B(lora_A(eye)).T, an lp product
        V = op(W0[rows].astype(F32) + op(F32(scaling) * lora_weight))
        n32 = np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64)).astype(F32)
        n[rows] = round_to(n32, lp)
        refuse_overflowed_norm(n32, n[rows])
    check_norm(n.astype(F32), W0, allow_zero_norm)
    return n


def init_magnitude(W0, A, B, scaling, policy):
    """``functional.init_magnitude`` for an lp W0, in A's dtype.

    "consistent": ``column_norm`` rounded once to A's dtype (no rounding
    when mixed). "peft" (``DoraLinearLayer.update_layer``, which runs before
    PEFT upcasts the adapter): the norm of ``lp(W + lp(s * lp(B @ A)))``
    rounded to lp, then upcast exactly when A is float32.
    """
    case, lp = classify(W0, A, B)
    if policy == "consistent":
        n = _f32_norm(W0, upcast(A), upcast(B), scaling, True)
        return _to_magnitude_dtype(n, A.dtype, W0, True)[0]
    m = _peft_pure_norm(W0, A, B, scaling, lp, True)
    return m.astype(A.dtype)


# ---------------------------------------------------------------------------
# DoRA forward / backward
# ---------------------------------------------------------------------------


def dora_forward(x_shape, x, W0, A, B, magnitude, scaling, bias, dropout_mask, weight_norm,
                 allow_zero_norm, policy):
    """``functional.dora_forward`` for an lp W0 (arguments checked by it, x not yet)."""
    case, lp = classify(W0, A, B, magnitude, bias)
    x2 = check_input(x, W0.shape[1], lp, low_precision=True)
    if weight_norm is not None and weight_norm.dtype != magnitude.dtype:
        raise ValueError(f"weight_norm must have the magnitude's dtype {magnitude.dtype}, "
                         f"got {weight_norm.dtype}")
    seen = WeightSnapshot({"A (lora_A)": A, "B (lora_B)": B,
                           "magnitude (lora_magnitude_vector)": magnitude})
    if policy == "peft":
        if dropout_mask is not None:
            raise ValueError(
                "dropout_mask with policy='peft' on a float16/bfloat16 weight is not supported: "
                "PEFT then recomputes the base product in the adapter's dtype (and fails for "
                "convolutions); use policy='consistent', or no dropout"
            )
        y, ctx = _peft_forward(x_shape, x2, W0, A, B, magnitude, scaling, bias, weight_norm,
                               allow_zero_norm, lp)
        ctx.seen = seen
        return y, ctx
    A32, B32, m32 = upcast(A), upcast(B), upcast(magnitude)
    if weight_norm is None:
        n = _f32_norm(W0, A32, B32, scaling, allow_zero_norm)
        _, n = _to_magnitude_dtype(n, magnitude.dtype, W0, allow_zero_norm)
    else:
        n = upcast(weight_norm)
    mask = None if dropout_mask is None else upcast(F._check_mask(dropout_mask, x_shape, lp))
    y, ctx = F._dora_forward(x_shape, upcast(x2), upcast(W0), A32, B32, m32, scaling,
                             upcast(bias), mask, n, allow_zero_norm, out_dtype=lp)
    y = _store(y, lp, "y (the output)", [("x", x2)])
    ctx.W0 = W0  # the backward upcasts it again: the context keeps no float32 copy
    ctx.seen = seen
    ctx.precision = Precision("consistent", lp, A.dtype)
    return y, ctx


def dora_backward(dy, ctx, detach_norm, dx_adjoint=None):
    """``functional.dora_backward`` for a context of an lp forward.

    ``dx_adjoint`` (the convolutions' col2im) maps the float32 gradient of
    the rows of x to the caller's x before dx is rounded, so that its sums
    are float32 too; None: dx is reshaped to the forward's x.
    """
    p = ctx.precision
    dy2 = F._check_dy(dy, ctx, p.lp)
    adjoint = dx_adjoint or (lambda d: d.reshape(ctx.x_shape))
    if p.policy == "peft":
        return _peft_backward(dy2, ctx, adjoint)
    dx, dA, dB, dm = F._dora_backward_f32(upcast(dy2), ctx, upcast(ctx.W0), detach_norm)
    inputs = [("dy", dy2)]
    try:
        return F.DoRAGrads(_store(adjoint(dx), p.lp, "dx", inputs),
                           _store(dA, p.adapter, "dA", inputs), _store(dB, p.adapter, "dB", inputs),
                           _store(dm, p.adapter, "dmagnitude", inputs))
    except ValueError:
        # a float32 gradient already not finite: say truly what overflowed (an intermediate
        # such as dg = sum_N dy * z, or the gradient), as the float32 backward does
        results = dict(dA=dA, dB=dB, dmagnitude=dm, dx=dx)
        if not all(np.isfinite(a).all() for a in results.values()):
            F._check_backward_overflow(results, upcast(dy2), ctx, upcast(ctx.W0), detach_norm)
        raise


def _peft_forward(x_shape, x2, W0, A, B, magnitude, scaling, bias, weight_norm, allow_zero_norm,
                  lp):
    """PEFT ``DoraLinearLayer.forward`` + ``lora.Linear.forward`` with lp weights.

    Mixed (A float32)::

        r   = lp(x @ W0.T + b)            base layer: lp GEMM, bias in the accumulator
        bse = r, or lp(r - b)             PEFT subtracts the bias back out
        n   = ||W0 + s B A||  (float32)   g = m / n
        l   = (x @ A.T) @ B.T             float32
        d   = (g - 1) * bse + (g * l) * s
        y   = lp(r + d)

    Pure (A lp): the same with a rounding to lp after every operation.
    """
    op = _op(A.dtype, lp)
    s = F32(scaling)
    x32, W32, A32, B32 = upcast(x2), upcast(W0), upcast(A), upcast(B)
    if weight_norm is not None:  # a layer's cached norm: checked as a computed one is
        n = upcast(weight_norm)
        check_norm(n, W0, allow_zero_norm, given=(A, B, scaling))
    elif A.dtype == np.dtype(F32):
        n = _f32_norm(W0, A32, B32, scaling, allow_zero_norm)
    else:
        n = _peft_pure_norm(W0, A, B, scaling, lp, allow_zero_norm).astype(F32)
    g = op(magnitude_over_norm(upcast(magnitude), n))
    base = x32 @ W32.T
    if bias is None:
        r = round_to(base, lp).astype(F32)
        bse = r
    else:
        r = round_to(base + bias.astype(F32), lp).astype(F32)
        bse = round_to(r - bias.astype(F32), lp).astype(F32)
    h = op(x32 @ A32.T)
    lo = op(h @ B32.T)
    d = op(op(op(g - F32(1)) * bse) + op(op(g * lo) * s))
    y = round_to(r + d, lp)
    if not all_finite(y):  # _store's test; the error path names what overflowed
        _peft_forward_overflow(y, x2, W0, A, B, g, scaling, bias, r, bse, h, lo, op, lp)
    ctx = F.DoRAContext(x_shape, x2, None, W0, A, B, magnitude, scaling, n, g, base, h)
    ctx.precision = Precision("peft", lp, A.dtype, dict(bse=bse, lo=lo))
    return y.reshape(*x_shape[:-1], W0.shape[0]), ctx


def _peft_forward_overflow(y, x2, W0, A, B, g, scaling, bias, r, bse, h, lo, op, lp):
    """Raise the ``ValueError`` that says, truly, why ``_peft_forward``'s y is not finite.

    NaN/Inf in x is named. Else the first non-finite element (i, j) is
    followed through PEFT's cast points, in the order ``_peft_forward`` forms
    them (the float32 values it computed; adapter-side steps rounded by
    ``op``), to name the first intermediate that overflowed; y itself is
    computed in float64 to say whether it fits W0's dtype ``lp``. A y that
    fits is never said to overflow; where no step can be named, the message
    says "y, or an intermediate of its computation, is not finite". Error
    path only.
    """
    check_finite("x", x2)
    check_finite("W0", W0)  # not checked before a forward given weight_norm (session 22)
    i, j = (int(v) for v in np.argwhere(~np.isfinite(y))[0])
    ad = A.dtype  # op's dtype: float32 (mixed) or lp (pure)
    s = F32(scaling)
    f64 = np.float64
    with np.errstate(over="ignore", invalid="ignore"):
        gj = F32(g[j])
        t1 = op(op(gj - F32(1)) * bse[i, j])
        t2 = op(gj * lo[i, j])
        t3 = op(t2 * s)
        d = op(t1 + t3)
        xw = float(x2[i].astype(f64) @ W0[j].astype(f64))
        hw = x2[i].astype(f64) @ A.astype(f64).T
        low = float(hw @ B[j].astype(f64))
        b = 0.0 if bias is None else float(bias[j])
        yw = float(gj) * (xw + scaling * low) + b
        steps = [
            ("the base layer's output x W0^T" + (" + b" if bias is not None else ""),
             r[i, j], xw + b, lp),
            ("x W0^T (the base output less the bias)", bse[i, j], xw, lp),
            ("x A^T", h[i], hw, ad),
            ("(x A^T) B^T", lo[i, j], low, ad),
            ("(m / n - 1) x W0^T", t1, (float(gj) - 1.0) * xw, ad),
            ("(m / n) (x A^T) B^T", t2, float(gj) * low, ad),
            ("s (m / n) (x A^T) B^T", t3, scaling * float(gj) * low, ad),
            ("the DoRA delta (m / n - 1) x W0^T + s (m / n) (x A^T) B^T", d,
             (float(gj) - 1.0) * xw + scaling * float(gj) * low, ad),
            ("the base output plus the DoRA delta, in float32", r[i, j] + d, yw, np.dtype(F32)),
        ]
    what = describe_overflow(steps, np.dtype(F32))
    if not fits_dtype(yw, lp):
        about = f"about {yw:.4g}, " if math.isfinite(yw) else ""
        raise ValueError(
            f"y (the output) (shape {y.shape}) overflowed {lp}, first at index ({i}, {j}): "
            f"{about}beyond {lp}'s largest value {float(finfo(lp).max):.6g}; every input is "
            f"finite, but the values are too large for the dtype; scale them down")
    if what:
        raise ValueError(
            f"y (the output) (shape {y.shape}) could not be formed under policy 'peft': at "
            f"index ({i}, {j}) it is about {yw:.4g}, which fits {lp}, but PEFT's intermediate "
            f"{what}; every input is finite. Scale the scaling or the adapter down, or merge "
            f"the adapter (merge() forms W0 + s B A scaled by m / n first)")
    raise ValueError(
        f"y, or an intermediate of its computation, is not finite in {lp}: first at index "
        f"({i}, {j}) of y (shape {y.shape}), which is about {yw:.4g} and fits {lp}; every "
        f"input is finite, but the values are too large for PEFT's cast points (policy "
        f"'peft'). Scale the scaling or the adapter down")


def _peft_backward(dy2, ctx, adjoint):
    """PEFT's autograd through ``_peft_forward`` (detached norm, as PEFT).

    With G = dy in the adapter's dtype and ``op`` that dtype's rounding::

        gt = op(G s)   gl = op(gt g)   h = x @ A.T
        dm = op(op(sum_N op(gt l) + sum_N op(G bse)) / n)
        dB = op(gl.T @ h)   dh = op(gl @ B)   dA = op(dh.T @ x)
        dr = lp(lp(G) + lp(G (g - 1)))               both gradients of the lp result
        dx = lp(lp(dr @ W0) + lp(dh @ A))

    (each product's rows mapped by ``adjoint`` before its rounding: PEFT's
    convolution backward rounds after its transposed convolution).
    """
    p = ctx.precision
    lp, op = p.lp, _op(p.adapter, p.lp)
    parts = p.parts
    s, g, n, h = F32(ctx.scaling), ctx.g, ctx.n, ctx.U
    x32 = upcast(ctx.x)
    A32, B32 = upcast(ctx.A), upcast(ctx.B)
    G = dy2.astype(F32)
    gt = op(G * s)
    gl = op(gt * g)
    red = (lambda a: a.sum(axis=0, dtype=F32)) if p.adapter == np.dtype(F32) else \
        (lambda a: op(a.sum(axis=0, dtype=F32)))
    dg = op(red(op(gt * parts["lo"])) + red(op(G * parts["bse"])))
    dm = op(divide_by_norm(dg, n))
    dB = op(gl.T @ h)
    dh = op(gl @ B32)
    dA = op(dh.T @ x32)
    dr = round_to(round_to(G, lp).astype(F32) + round_to(op(G * op(g - F32(1))), lp).astype(F32),
                  lp).astype(F32)
    dx = (round_to(adjoint(dr @ upcast(ctx.W0)), lp).astype(F32)
          + round_to(adjoint(dh @ A32), lp).astype(F32))
    inputs = [("dy", dy2)]
    return F.DoRAGrads(_store(dx, lp, "dx", inputs),
                       _store(dA, p.adapter, "dA", inputs), _store(dB, p.adapter, "dB", inputs),
                       _store(dm, p.adapter, "dmagnitude", inputs))


# ---------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------


def merge(W0, A, B, magnitude, scaling, allow_zero_norm, policy):
    """``functional.merge`` for an lp W0: (W' in W0's dtype, n in the magnitude's dtype).

    "consistent", mixed: the kernel's float32 merge, W' rounded once.
    "consistent", pure: n rounded to lp first (as the forward does), then
    W' = lp((m / n) (W0 + s B A)) in float32. "peft" (``DoraLinearVariant.merge``,
    ``get_delta_weight``): delta = op(f32(B @ A) s), n = op-norm of op(W0 + delta),
    W' = lp(op(op(m / n) op(W0 + delta))) -- with float32 adapters this is the
    consistent merge.
    """
    case, lp = classify(W0, A, B, magnitude)
    A32, B32, m32 = upcast(A), upcast(B), upcast(magnitude)
    if case == "mixed":
        with np.errstate(over="ignore"):
            W_merged, n = _backend.low_precision_kernels().merge(W0, A32, B32, m32, scaling)
        rescued = _rescue_extreme_rows(n, W0, A32, B32, scaling)
        check_norm(n, W0, allow_zero_norm, A32, B32, scaling)
        g = magnitude_over_norm(m32, n)
        if rescued.size:
            W_merged[rescued] = round_to(g[rescued, None] * (W0[rescued].astype(F32) + scaling
                                                              * (B32[rescued] @ A32)), lp)
        n_stored = n
    elif policy == "consistent":
        n = _f32_norm(W0, A32, B32, scaling, allow_zero_norm)
        n_stored, n = _to_magnitude_dtype(n, magnitude.dtype, W0, allow_zero_norm)
        g = magnitude_over_norm(m32, n)
        W_merged = np.empty_like(W0)
        with np.errstate(over="ignore"):
            for rows in _row_blocks(*W0.shape, 4):
                V = W0[rows].astype(F32) + F32(scaling) * (B32[rows] @ A32)
                W_merged[rows] = round_to(g[rows, None] * V, lp)
    else:  # PEFT with lp adapters: get_delta_weight rounds s * (B @ A) once, then lp after each op
        op = _op(lp, lp)
        n_stored = np.empty(W0.shape[0], lp)
        W_merged = np.empty_like(W0)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            for rows in _row_blocks(*W0.shape, 4):
                V = op(W0[rows].astype(F32) + op(F32(scaling) * (B32[rows] @ A32)))
                n_rows = round_to(np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64))
                                  .astype(F32), lp)
                n_stored[rows] = n_rows
                factor = op(m32[rows] / n_rows.astype(F32))
                W_merged[rows] = round_to(op(factor[:, None] * V), lp)
        n = n_stored.astype(F32)
        check_norm(n, W0, allow_zero_norm)
        magnitude_over_norm(m32, n)  # refuses an m / n that overflowed
    if not n.all():
        W_merged[n == 0] = 0
    _check_rows_finite("the merged weight (m / n) * (W0 + s*B@A)", W_merged)
    return W_merged, n_stored


def unmerge(W_merged, A, B, magnitude, scaling, n, policy):
    """``functional.unmerge`` for an lp W_merged: W0 in W_merged's dtype.

    "consistent", and "peft" with float32 adapters: the kernel's float32
    unmerge of the upcast W', rounded once. "peft" with lp adapters
    (``DoraLinearVariant.unmerge``): W0 = lp(op(op(W' / op(m / n)) - delta)).
    """
    case, lp = classify(W_merged, A, B, magnitude, names=("W_merged", "A", "B", "magnitude",
                                                          "bias"))
    A32, B32, m32, n32 = upcast(A), upcast(B), upcast(magnitude), upcast(n)
    op = _op(lp, lp) if (policy == "peft" and case == "pure") else (lambda a: a)
    factor = op(np.where(n32 == 0, F32(1), divide_by_norm(m32, n32)).astype(F32))
    F._refuse_lost_rows(factor)
    for rows in _row_blocks(*W_merged.shape, W_merged.itemsize):
        if not np.isfinite(W_merged[rows]).all():
            check_finite("W_merged", W_merged)
    if policy == "peft" and case == "pure":
        W0 = np.empty_like(W_merged)
        with np.errstate(over="ignore"):
            for rows in _row_blocks(*W_merged.shape, 4):
                delta = op(F32(scaling) * (B32[rows] @ A32))
                W0[rows] = round_to(op(op(W_merged[rows].astype(F32) / factor[rows, None])
                                       - delta), lp)
    else:
        with np.errstate(over="ignore"):
            W0 = _backend.low_precision_kernels().unmerge(W_merged, A32, B32, factor, scaling)
    _check_rows_finite("the unmerged weight W' / (m / n) - s*B@A", W0)
    return W0


# ---------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------


def lora_forward(x_shape, x, W0, A, B, scaling, bias, dropout_mask, policy):
    """``functional.lora_forward`` for an lp W0 ("consistent" only)."""
    if policy == "peft":
        raise ValueError(
            "policy='peft' is defined for DoRA layers (PEFT's DoRA cast points); plain LoRA on "
            "float16/bfloat16 weights uses policy='consistent'"
        )
    case, lp = classify(W0, A, B, None, bias)
    x2 = check_input(x, W0.shape[1], lp, low_precision=True)
    check_finite("W0", W0)
    mask = None if dropout_mask is None else upcast(F._check_mask(dropout_mask, x_shape, lp))
    y, ctx = F._lora_forward(x_shape, upcast(x2), upcast(W0), upcast(A), upcast(B),
                             scaling, upcast(bias), mask)
    y = _store(y, lp, "y (the output)", [("x", x2)])
    ctx.W0 = W0
    ctx.seen = WeightSnapshot({"A (lora_A)": A, "B (lora_B)": B})
    ctx.precision = Precision("consistent", lp, A.dtype)
    return y, ctx


def lora_backward(dy, ctx, dx_adjoint=None):
    """``functional.lora_backward`` for a context of an lp forward (see ``dora_backward``)."""
    p = ctx.precision
    dy2 = F._check_dy(dy, ctx, p.lp)
    adjoint = dx_adjoint or (lambda d: d.reshape(ctx.x_shape))
    dx, dA, dB = F._lora_backward_f32(upcast(dy2), ctx, upcast(ctx.W0))
    inputs = [("dy", dy2)]
    return F.LoRAGrads(_store(adjoint(dx), p.lp, "dx", inputs),
                       _store(dA, p.adapter, "dA", inputs), _store(dB, p.adapter, "dB", inputs))
