r"""DoRA and LoRA as plain functions: forward, hand-derived backward, merge.

Conventions (PyTorch / PEFT layout, so numbers compare directly)
----------------------------------------------------------------
=========  ==========  =====================================================
symbol     shape       meaning
=========  ==========  =====================================================
x          (N, in)     input rows; leading batch dims are flattened
W0         (out, in)   frozen base weight (``nn.Linear.weight``)
b0         (out,)      frozen base bias, or None
A          (r, in)     PEFT ``lora_A.weight``
B          (out, r)    PEFT ``lora_B.weight``
s          scalar      scaling: alpha / r (or alpha / sqrt(r), rsLoRA)
V          (out, in)   W0 + s * B @ A (never formed in full here)
n          (out,)      L2 norm of each row of V
m          (out,)      magnitude, PEFT ``lora_magnitude_vector``
g          (out,)      m / n
=========  ==========  =====================================================

**The axis.** The paper writes W as (d, k) = (in, out) and normalises each
*column* (``||.||_c``). In the (out, in) layout used here that is the norm of
each **row**: one value per output channel, shape (out,).

Forward (paper Eq. 5, dropout off)
----------------------------------
Numbered so the backward can walk it back::

    (1) U    = x @ A.T                      (N, r)
    (2) base = x @ W0.T                     (N, out)
    (3) n    = ||W0 + s * B @ A||_row       (out,)    column_norm
    (4) g    = m / n                        (out,)
    (5) z    = base + s * U @ B.T           (N, out)  = x @ V.T
    (6) y    = g * z + b0                   (N, out)

With ``lora_dropout`` in training PEFT uses a different formula (see
``dora_forward``); ``dropout_mask`` selects it.

Backward
--------
Given dy = dL/dy, walk (6) to (1)::

    (6) dg = sum_N dy * z        dz = dy * g
    (4) dm = dg / n              dn = -dg * m / n**2        (only if exact)
    (5) dB = s * dz.T @ U        dU = s * dz @ B             dbase = dz
    (3) dV_i = dn_i * V_i / n_i  (row i; only if exact) -> dA, dB, below
    (2) dx = dbase @ W0
    (1) dx += dU @ A             dA = dU.T @ x

**detach_norm=True** (paper Sec. 4.3, PEFT's behaviour): n is a constant, so
step (3) sends nothing back; A and B get LoRA's gradient scaled by g per
output channel, and m still gets its full gradient. In the paper's terms,
Eq. (11): grad_V' L = (m / C) grad_W' L.

**detach_norm=False**: the exact gradient of the forward. Step (3) adds,
with c = dn / n = -dg * g / n**2 (per row)::

    dL/dV  += diag(c) @ V                                   (out, in)
    dB     += s * diag(c) @ V @ A.T  = s * c[:, None] * (W0 @ A.T + s * B @ (A @ A.T))
    dA     += s * B.T @ diag(c) @ V  = s * (cB.T @ W0 + s * (cB.T @ B) @ A)

where ``cB = c[:, None] * B`` (out, r) is B with row i scaled by c_i (an
elementwise scaling, not a matrix product).

Adding this to the detached term g_i * G_i, where G = dy.T @ x is the
gradient w.r.t. the merged weight W', gives row by row
``dL/dV_i = (m_i / n_i) (I - V_i V_i^T / n_i^2) G_i``: the paper's Eq. (6),
the gradient projected away from the current row of V. The magnitude's
gradient dm_i = G_i . V_i / n_i is the paper's Eq. (7) in both modes.

Every term uses W0, ``W0 @ A.T`` (out, r), ``A @ A.T`` (r, r) and N-row
products only; no (out, in) temporary exists besides W0 itself (the norm in
step (3) walks W0 in row blocks, see ``dora_ref.core.kernels_numpy``).

Low precision
-------------
W0 (with x, the bias, y, dx) may be float16 or ``ml_dtypes.bfloat16``; A, B
and the magnitude are then float32 ("mixed", PEFT's default
``autocast_adapter_dtype=True``) or W0's dtype ("pure"); any other mix is a
``TypeError`` (``dora_ref.core.precision``). No arithmetic is done in the
low-precision dtype: inputs are upcast exactly to float32. The keyword
``policy`` says where results are rounded (round to nearest even):

* ``"consistent"`` (default): each function is the float32 computation
  above on the upcast inputs, and each result is rounded ONCE to its
  storage dtype (y, dx, a merged or unmerged weight: W0's; dA, dB,
  dmagnitude: A's). Its error is the float32 bound plus one rounding,
  ``u_lp |result|`` (u = 2**-11 float16, 2**-8 bfloat16). A pure-lp
  magnitude divides a norm rounded to its dtype too, so g = m / n == 1
  exactly at init and an untrained layer is the base layer, bit for bit.
* ``"peft"``: PEFT 0.21.2's roundings on CPU, to compare with PEFT:
  its magnitude is rounded to lp at init even when it is then kept in
  float32 (so g != 1, |g - 1| <= u_lp, at init), and with lp adapters every
  operation is rounded (``dora_ref.core.lowp``).

float32 and float64 calls ignore ``policy``: their results are unchanged,
bit for bit. The NumPy kernels read a low-precision W0 one row block at a
time (no float32 copy of W0 in the norm or the merge).
"""
from __future__ import annotations

import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from . import backend as _backend
from ._validate import (  # noqa: F401 (NonFiniteWeightError: re-exported)
    NonFiniteWeightError,
    WeightSnapshot,
    all_finite,
    as_float_array,
    check_adapter,
    check_finite,
    check_flag,
    check_input,
    check_rows_finite,
    check_scaling,
    dtype_mismatch,
    refuse_non_finite_rows,
    results_finite,
    wider_float,
    fits_dtype,
    describe_overflow,
    format_wide,
    sum_squares,
)
from .kernels_numpy import EPILOGUE_KEEP_Z, EPILOGUE_NEW, EPILOGUE_OVER_BASE
from .precision import LOW_PRECISION_DTYPES, check_policy, finfo
from .norm import (  # noqa: F401 (column_norm, init_magnitude, ...: part of the functional API)
    _HALF_MAX,
    _SMALLEST_SAFE_NORM,
    _kernel_norm,
    _rescue_extreme_rows,
    _rows_in_rank_order,
    check_norm,
    column_norm,
    divide_by_norm,
    init_magnitude,
    magnitude_over_norm,
    smallest_norm,
)


class DoRAGrads(NamedTuple):
    """Gradients of a DoRA layer, in the shapes of what they differentiate.

    Attributes
    ----------
    dx : ndarray, shape (..., in), the shape of the forward's x
    dA : ndarray, shape (r, in)
    dB : ndarray, shape (out, r)
    dmagnitude : ndarray, shape (out,)
    """

    dx: np.ndarray
    dA: np.ndarray
    dB: np.ndarray
    dmagnitude: np.ndarray


class LoRAGrads(NamedTuple):
    """Gradients of a LoRA layer: dx (..., in), dA (r, in), dB (out, r)."""

    dx: np.ndarray
    dA: np.ndarray
    dB: np.ndarray


# A training forward without dropout keeps z = base + s * U @ B.T over the base product
# for its backward (``DoRAContext.base_is_z``) from the backend's ``KEEP_Z_MIN_RANK`` on.
# False: never (the backward forms U @ B.T again), for benchmarks/bench_rank_ab.py's A/B.
_KEEP_Z = True

# the names a DoRA forward's WeightSnapshot gives A, B and the magnitude in messages
_DORA_SNAPSHOT_NAMES = ("A (lora_A)", "B (lora_B)", "magnitude (lora_magnitude_vector)")


@dataclass
class DoRAContext:
    """What ``dora_forward`` keeps for ``dora_backward``.

    Holds references, not copies, of the weights, plus the (N, out) base
    product and the (N, r) low-rank activations, and a snapshot of A, B and
    the magnitude (``WeightSnapshot``): ``dora_backward`` raises
    ``RuntimeError`` if they changed in place since the forward. Treat it as
    opaque.

    ``base`` is None after a forward that wrote its output over the base
    product (a layer's eval forward, which usually has no backward): the
    backward then recomputes it from ``x``. After a training forward that
    kept z (no dropout, r >= the backend's ``KEEP_Z_MIN_RANK``), ``base``
    holds z = x @ W0.T + s * U @ B.T instead (``base_is_z``): the forward's
    epilogue wrote z over it, and the backward reads z instead of forming
    U @ B.T again (A, B and the magnitude cannot have changed since: the
    snapshot refuses the backward). ``n_nonzero`` says that the forward found
    every norm nonzero (the backward divides by n without looking again).

    The backward takes ``base`` (or z) from the context and writes dz over
    it, sparing itself a fresh (N, out) array: afterwards ``base`` is None,
    and a second backward on the same context forms the base product again
    from ``x`` (the same result, bit for bit, with the same backend and BLAS
    on the same number of threads; slower by one product). It does so only
    when nothing else holds that array (``_take_base``): a copy of the
    context, a view of its base or a zero-copy pickle sharing its memory
    leaves it untouched, and dz goes into a new array.
    """

    x_shape: tuple
    x: np.ndarray  # (N, in), the input the low-rank path saw (dropped out if any)
    dropout_mask: Optional[np.ndarray]  # (N, in) or None
    W0: np.ndarray
    A: np.ndarray
    B: np.ndarray
    magnitude: np.ndarray
    scaling: float
    n: np.ndarray  # (out,)
    g: np.ndarray  # (out,)
    base: Optional[np.ndarray]  # (N, out): x @ W0.T for the x above; None: recompute it
    U: np.ndarray  # (N, r): x @ A.T for the x above
    seen: Optional[WeightSnapshot] = None  # A, B, m as the forward saw them
    precision: Optional[object] = None  # lowp.Precision of a float16/bfloat16 forward
    n_nonzero: bool = False  # every n > 0, checked by the forward
    base_is_z: bool = False  # base holds z = base + s * U @ B.T (step 5), not x @ W0.T


@dataclass
class LoRAContext:
    """What ``lora_forward`` keeps for ``lora_backward``."""

    x_shape: tuple
    x: np.ndarray
    dropout_mask: Optional[np.ndarray]
    W0: np.ndarray
    A: np.ndarray
    B: np.ndarray
    scaling: float
    U: np.ndarray
    seen: Optional[WeightSnapshot] = None  # A, B as the forward saw them
    precision: Optional[object] = None  # lowp.Precision of a float16/bfloat16 forward


# ---------------------------------------------------------------------------
# DoRA forward / backward
# ---------------------------------------------------------------------------


def dora_forward(
    x,
    W0,
    A,
    B,
    magnitude,
    scaling,
    bias=None,
    *,
    dropout_mask=None,
    weight_norm=None,
    allow_zero_norm=False,
    policy="consistent",
):
    """DoRA linear layer forward, PEFT semantics (paper Eq. 5).

    Without dropout (eval, or ``lora_dropout = 0``)::

        y = g * (x @ W0.T + s * (x @ A.T) @ B.T) + bias,    g = m / n

    With a dropout mask (training with ``lora_dropout = p > 0``), where
    ``xd = x * dropout_mask``, PEFT computes::

        y = x @ W0.T + bias + (g - 1) * (xd @ W0.T) + g * s * (xd @ A.T) @ B.T

    which is *not* ``g * (xd @ V.T) + bias``: the base output sees the clean
    x, and only DoRA's correction sees the dropped-out one (PEFT
    ``DoraLinearLayer.forward``, the training path since v0.14; the author's
    explanation in nbasyl/DoRA#2). With a mask of ones both formulas agree.

    Parameters
    ----------
    x : ndarray, shape (..., in), float32, float64, float16 or bfloat16
    W0 : ndarray, shape (out, in), x's dtype
    A : ndarray, shape (r, in), x's dtype, or float32 with a float16/bfloat16 W0
    B : ndarray, shape (out, r), A's dtype
    magnitude : ndarray, shape (out,), A's dtype
    scaling : float
    bias : ndarray, shape (out,), optional
        Never multiplied by g (PEFT subtracts it before scaling).
    dropout_mask : ndarray, shape of x, optional
        The scaled keep mask: 0 for dropped entries and 1 / (1 - p) for kept
        ones, so that ``x * dropout_mask`` is ``torch.nn.Dropout(p)(x)``.
    weight_norm : ndarray, shape (out,), optional
        A precomputed ``column_norm(W0, A, B, scaling)``, e.g. one cached while
        the weights are unchanged (eval mode). It is trusted: pass only the
        norm of these exact weights. Its shape, dtype and finiteness are
        checked, and a negative entry is refused (``ValueError``).
    allow_zero_norm : bool, default False
        A zero row of W0 + s*B@A raises ``ValueError`` by default. If True,
        g = 0 for that row: the channel outputs its bias, and its magnitude
        gets zero gradient.
    policy : {"consistent", "peft"}, default "consistent"
        Where a float16/bfloat16 call rounds (see "Low precision" in this
        module's docstring); float32/float64 calls ignore it.

    Returns
    -------
    y : ndarray, shape (..., out), x's dtype
    ctx : DoRAContext
        Pass it to ``dora_backward`` (it remembers the policy).

    Raises
    ------
    TypeError
        On non-float or mixed dtypes (``dora_ref.core.precision.classify``
        lists the float16/bfloat16 combinations accepted).
    ValueError
        On inconsistent shapes (the message lists them), an empty weight
        (out, in or r = 0; a batch of N = 0 rows works), NaN/Inf in a
        weight, or a zero row norm (see ``allow_zero_norm``).
    NonFiniteWeightError
        A ``ValueError``: m / n overflows the dtype in some row (see
        ``magnitude_over_norm``).
    ValueError
        NaN/Inf in x, or an output that overflowed the dtype (never
        returned as inf or NaN). The message names what overflowed: y (only
        when its value, recomputed in a wider type, does not fit the output
        dtype, float16/bfloat16 for those weights), or the first intermediate
        (x A^T, (x A^T) B^T, s times it, x W0^T, z; PEFT's cast points under
        ``policy="peft"``) with y's value where it fits; where it cannot tell,
        "y, or an intermediate of its computation, is not finite".

    Notes
    -----
    The context holds references to W0, A, B, the magnitude and x (no
    copies). ``dora_backward`` raises ``RuntimeError`` if A, B or the
    magnitude changed in place since this forward (it compares them with a
    snapshot, ``WeightSnapshot``); W0 and x are not compared (a full pass
    each): do not write into them between forward and backward (the layers
    keep W0 read-only).
    """
    check_policy(policy)
    allow_zero_norm = check_flag("allow_zero_norm", allow_zero_norm)
    W0, A, B, magnitude, bias = check_adapter(W0, A, B, magnitude, bias, low_precision=True)
    if magnitude is None:
        raise TypeError("magnitude must be an array of shape (out,), got None")
    scaling = check_scaling(scaling)
    lp = W0.dtype in LOW_PRECISION_DTYPES
    if weight_norm is not None:
        weight_norm = as_float_array("weight_norm", weight_norm, ndim=1, low_precision=lp)
        if weight_norm.shape != magnitude.shape:
            raise ValueError(f"weight_norm must have shape {magnitude.shape}, "
                             f"got {weight_norm.shape}")
        check_finite("weight_norm", weight_norm)  # else reported as an overflowed sum
        if (weight_norm < 0).any():  # a norm is >= 0; a negative one would flip DoRA's term
            raise ValueError(f"weight_norm must hold row norms (>= 0), got a negative entry at "
                             f"row {int(np.argmax(weight_norm < 0))} of {weight_norm.shape}")
    if lp:
        return _lowp.dora_forward(np.shape(x), x, W0, A, B, magnitude, scaling, bias,
                                  dropout_mask, weight_norm, allow_zero_norm, policy)
    x2 = check_input(x, W0.shape[1], W0.dtype)
    if weight_norm is not None:
        if weight_norm.shape != magnitude.shape or weight_norm.dtype != W0.dtype:
            raise ValueError(
                f"weight_norm must have shape {magnitude.shape} and dtype {W0.dtype}, "
                f"got {weight_norm.shape} {weight_norm.dtype}"
            )
    return _dora_forward(np.shape(x), x2, W0, A, B, magnitude, scaling, bias, dropout_mask,
                         weight_norm, allow_zero_norm)


def _dora_forward(x_shape, x2, W0, A, B, magnitude, scaling, bias, dropout_mask, weight_norm,
                  allow_zero_norm, overwrite_base=False, magnitude_name="magnitude",
                  adapter_names=None, out_dtype=None):
    """``dora_forward`` after its argument checks, x flattened to x2 (N, in).

    The layers call it directly: the shapes and dtypes of their arrays are
    fixed when the layer is built (assignments are checked, in-place writes
    cannot change them), so per call they check only x, the scaling and the
    finiteness of the trainable arrays (``AdapterLayer._check_parameters_finite``).
    The public API's inputs are all checked every call, by ``dora_forward``.

    ``overwrite_base`` (a layer's eval forward): the epilogue writes y over
    the (N, out) base product instead of allocating another (N, out) array;
    the context then holds no base, and a backward recomputes it.

    The magnitude need not be checked for NaN/Inf before: ``_scale`` proves
    it finite on its fast path and checks it by ``magnitude_name`` otherwise.

    ``out_dtype`` (a low-precision forward computed in float32): the dtype
    y is rounded to afterwards; only an overflow's message reads it.

    ``adapter_names`` (names for A and B): A and B have not been checked for
    NaN/Inf. Allowed only where the norm proves them finite: it is computed
    here (no ``weight_norm``), by a backend whose ``column_norm`` turns NaN
    or Inf in A or B into a non-finite norm (``NORM_PROPAGATES_NON_FINITE``),
    W0 not empty; otherwise they are checked here first. ``_scale`` checks
    them by these names before anything else whenever a norm is not finite.
    """
    kernels = _backend.kernels()
    if adapter_names is not None and not (
            weight_norm is None and W0.size and getattr(kernels, "NORM_PROPAGATES_NON_FINITE", False)):
        # a layer's own A and B (C-contiguous float ndarrays): one sum of both dot products
        # in the usual case (see results_finite), the exact test by name otherwise
        if not results_finite(A, B):
            check_finite(adapter_names[0], A)
            check_finite(adapter_names[1], B)
        adapter_names = None
    n = kernels.column_norm(W0, A, B, scaling) if weight_norm is None else weight_norm  # (3)
    g, n_nonzero = _scale(n, magnitude, W0, A, B, scaling, weight_norm is None,
                          allow_zero_norm, magnitude_name, adapter_names)  # (4)

    # keep z where forming it again in the backward costs more than storing it now
    keep_z = _KEEP_Z and dropout_mask is None and A.shape[0] >= kernels.KEEP_Z_MIN_RANK
    if dropout_mask is None:
        U = x2 @ A.T  # (1)
        base = x2 @ W0.T  # (2)
        # base is ours, fresh: y replaces it, element by element (overwrite_base), or z (5)
        # replaces it and the backward reads it (keep_z); finite: the kernel saw y finite as
        # it wrote it (the C backend's flag, or results_finite(y) for the NumPy one)
        y, finite = kernels._forward_epilogue_flagged(
            base, U, B, g, scaling, bias,
            EPILOGUE_OVER_BASE if overwrite_base else EPILOGUE_KEEP_Z if keep_z
            else EPILOGUE_NEW)  # (5), (6)
        if overwrite_base:
            base = None
        xd, mask = x2, None
    else:
        mask = _check_mask(dropout_mask, x_shape, W0.dtype)
        xd = x2 * mask
        U = xd @ A.T
        base = xd @ W0.T  # the base product of the dropped-out input
        y = x2 @ W0.T + (g - 1.0) * base + g * (scaling * (U @ B.T))
        if bias is not None:
            y += bias
        finite = math.isfinite(sum_squares(y))  # results_finite(y), inline

    if not finite:  # the exact test, which names x or what overflowed
        _check_forward_overflow(y, x2, xd, W0, A, B, g, scaling, bias, mask is not None,
                                out_dtype)
    # positional (keywords cost a few tenths of a us per call at small sizes):
    # seen, precision, n_nonzero, base_is_z
    ctx = DoRAContext(x_shape, xd, mask, W0, A, B, magnitude, scaling, n, g, base, U,
                      WeightSnapshot.of(_DORA_SNAPSHOT_NAMES, (A, B, magnitude)), None,
                      n_nonzero, keep_z and base is not None)
    if len(x_shape) != 2:
        y = y.reshape(*x_shape[:-1], W0.shape[0])
    return y, ctx


def _check_forward_overflow(y, x2, xd, W0, A, B, g, scaling, bias, masked, out_dtype=None):
    """Raise the ``ValueError`` that says why y (N, out) is not finite, every claim true.

    A NaN or Inf in x is named (``check_finite``). Else something overflowed
    y's dtype: y itself, or only an intermediate of the unmerged forward
    (x A^T, (x A^T) B^T, s times that, x W0^T, or z = x W0^T + s (x A^T) B^T,
    formed before the magnitude's scale g = m / n; PEFT forms them in the same
    order). ``g`` None: the LoRA forward, y = x W0^T + s (xd A^T) B^T (+ bias),
    with the same intermediates but z. The first non-finite element (i, j) is recomputed step by step,
    in y's dtype to find the first intermediate that is not finite there, and
    in a wider type (``wider_float``: float64, or a long double with more
    exponent range for float64) to tell whether y fits ``out_dtype`` (the
    caller's output dtype, float16/bfloat16 for a low-precision forward
    computed in float32; default y's). The message names what overflowed,
    says that y fits (with its value) only when it does, and where neither
    can be told says the true, less specific "y, or an intermediate of its
    computation, is not finite". Runs only after a non-finite y was found.
    """
    check_finite("x", x2)
    # W0 is not checked before a forward given weight_norm (where no norm of it is formed);
    # a NaN/Inf there reached the "every input is finite" message below (an adversary,
    # session 22). This runs only after y was found not finite.
    check_finite("W0", W0)
    bad = np.argwhere(~np.isfinite(y))
    if not bad.size:  # every entry finite: only the one-sum test's sum of squares overflowed
        return
    i, j = (int(v) for v in bad[0])
    dt = y.dtype
    out = np.dtype(dt if out_dtype is None else out_dtype)
    wide = wider_float(dt)
    steps = [(name, _forward_step(value, dt), None if wide is None else _forward_step(value, wide))
             for name, value in _forward_row_steps(i, j, x2, xd, W0, A, B, g, scaling, bias, masked)]
    what = describe_overflow(steps[:-1], dt)  # the first intermediate not finite in dt
    y_wide = steps[-1][2]
    y_fits, about = None, None
    if wide is not None:
        bound = _forward_step(_forward_row_steps(i, j, x2, xd, W0, A, B, g, scaling, bias,
                                                 masked, absolute=True)[-1][1], wide)
        y_fits, about = _wide_verdict(y_wide, bound, x2.shape[1] + A.shape[0] + 8, wide, dt, out)
    largest = float(finfo(out).max)
    advice = ("Scale the scaling or the adapter down, merge the adapter (merge() forms "
              + ("W0 + s B A first)" if g is None else "W0 + s B A scaled by m / n first)")
              + (", or compute in float64" if dt != np.dtype(np.float64) else ""))
    if y_fits is False:  # six digits: a y just past the largest value shows that it is
        about = f"about {format_wide(y_wide, 6)}, " if np.isfinite(y_wide) else ""
        raise ValueError(
            f"y (the output) (shape {y.shape}) overflowed {out}, first at index ({i}, {j}): "
            f"{about}beyond {out}'s largest value {largest:.6g}"
            + (f"; on the way, {what}" if what and out != dt else "")
            + "; every input is finite, but the values are too large for the dtype; scale "
              "them down" + (", or compute in float64" if out != np.dtype(np.float64) else ""))
    if what and y_fits:
        raise ValueError(
            f"y (the output) (shape {y.shape}) could not be formed in {dt}: at index "
            f"({i}, {j}) it is {about}, which fits {out}, but the unmerged "
            f"forward's intermediate {what}; every input is finite. {advice}")
    unknown = (f"no float type wider than {dt} here" if wide is None else
               f"its {_wide_name(wide)} recomputation is not accurate enough to tell")
    if what:  # whether y fits is not known
        raise ValueError(
            f"y (the output) (shape {y.shape}) could not be formed in {dt}: at index "
            f"({i}, {j}) the unmerged forward's intermediate {what}; whether y itself fits "
            f"{out} is not known ({unknown}); every input is finite. {advice}")
    fit = f" (y there is {about}, which fits {out})" if y_fits else ""
    raise ValueError(
        f"y, or an intermediate of its computation, is not finite in {dt}: first at index "
        f"({i}, {j}) of y (shape {y.shape}){fit}; every input is finite, but the values are "
        f"too large for the dtype. {advice}")


def _check_merged_overflow(y, x2, W, bias, dtype):
    """Raise the ``ValueError`` that says truly why a merged layer's y = x W'^T (+ bias) is not finite.

    The merged layer's forward is one product; its terms can overflow where
    their sum fits (they cancel). As ``_check_forward_overflow``: x is named
    if it holds NaN or Inf; else y[i, j] at the first non-finite element is
    recomputed in a wider type and called an overflow only where it surely
    does not fit y's dtype. y (N, out); x2 (N, in), W (out, in) and bias
    (out,) as stored; ``dtype`` the one the product was computed in
    (float32 for a 16-bit layer): only row i of x and row j of W are
    converted. Error path only.
    """
    check_finite("x", x2)
    bad = np.argwhere(~np.isfinite(y))
    if not bad.size:
        return
    i, j = (int(v) for v in bad[0])
    dt = np.dtype(dtype)
    out = y.dtype

    def y_at(t, absolute=False):
        up = (lambda a: np.abs(np.asarray(a).astype(t))) if absolute else \
            (lambda a: np.asarray(a).astype(t))
        v = up(x2[i]) @ up(W[j])
        return v if bias is None else v + up(bias[j])

    wide = wider_float(dt)
    fits, about = None, None
    if wide is not None:
        value = _forward_step(y_at, wide)
        bound = _forward_step(lambda t: y_at(t, absolute=True), wide)
        fits, about = _wide_verdict(value, bound, x2.shape[1] + 2, wide, dt, out)
    if fits is False:
        raise ValueError(
            f"y (the output) (shape {y.shape}) overflowed {out}, first at index ({i}, {j}): "
            f"{about}, beyond {out}'s largest value {float(finfo(out).max):.6g}; every input is "
            f"finite, but the values are too large for the dtype; scale them down"
            + (", or compute in float64" if out != np.dtype(np.float64) else ""))
    if fits:
        raise ValueError(
            f"y (the output) (shape {y.shape}) could not be formed in {dt}: at index ({i}, {j}) "
            f"it is {about}, which fits {out}, but the terms of the product x W'^T (W' the "
            f"merged weight) overflowed {dt} before they cancelled; every input is finite. "
            f"Scale x down" + (", or compute in float64" if dt != np.dtype(np.float64) else ""))
    raise ValueError(
        f"y, or an intermediate of its computation, is not finite in {dt}: first at index "
        f"({i}, {j}) of y (shape {y.shape}); every input is finite, but the values are too "
        f"large for the dtype. Scale x down"
        + (", or compute in float64" if dt != np.dtype(np.float64) else ""))


def _wide_verdict(value, bound, k, wide, dt, out):
    """Whether a value recomputed in ``wide`` surely fits ``out``: (True, False or None; words).

    The recomputation's error is at most (gamma_k + 8 u) * ``bound`` (``bound``:
    the same computation on the operands' magnitudes; gamma_k for its k
    chained wide operations; 8 u for the forward's n and g, rounded to ``dt``
    once each, entering as n^-3 g at most). True if value + error fits, False
    if value - error does not (or the value is not finite), None otherwise.
    The words: "about V", or "V to within E" where E is not below V / 1000.
    """
    u = float(np.finfo(wide).eps)
    err = bound * (k * u / (1 - k * u) + 8 * float(np.finfo(dt).eps))
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(value):
            return False, f"about {format_wide(value)}"
        if fits_dtype(abs(value) + err, out):
            fits = True
        elif not fits_dtype(max(abs(value) - err, 0 * err), out):
            fits = False
        else:
            fits = None
        about = (f"about {format_wide(value)}" if err <= abs(value) * 1e-3
                 else f"{format_wide(value)} to within {format_wide(err)}")
    return fits, about


def _forward_row_steps(i, j, x2, xd, W0, A, B, g, scaling, bias, masked, absolute=False):
    """The unmerged forward's intermediates for y[i, j], in the order it forms them.

    Returns (name, function of a dtype) pairs; the function recomputes the
    value in that dtype (the operands rounded to it first, which is exact for
    a wider one). The last pair is y[i, j] itself. ``absolute``: the same on
    the operands' magnitudes, every difference a sum (``_wide_verdict``'s
    bound). ``g`` None: LoRA's forward, ``_lora_forward``'s order. Error path only.
    """
    sign = 1 if absolute else -1

    def up(a, t):
        a = np.asarray(a).astype(t)
        return np.abs(a) if absolute else a

    def U(t):
        return up(xd[i], t) @ up(A, t).T

    def UB(t):
        return U(t) @ up(B[j], t)

    def sUB(t):
        return UB(t) * up(scaling, t)

    def base(t):  # x W0^T, or (x * mask) W0^T
        return up(xd[i], t) @ up(W0[j], t)

    def gj(t):
        return up(g[j], t)

    if g is None:  # LoRA: y = x W0^T + s (xd A^T) B^T (+ bias), xd = x (* mask)
        def xw(t):
            return up(x2[i], t) @ up(W0[j], t)

        def lora_y(t):
            return xw(t) + sUB(t)

        xa = "(x * mask) A^T" if masked else "x A^T"
        steps = [(xa, U), (f"({xa}) B^T", UB), (f"s ({xa}) B^T", sUB), ("x W0^T", xw)]
        last = lora_y
    elif not masked:  # y = g (x W0^T + s (x A^T) B^T) (+ bias): the epilogue's order
        def z(t):
            return base(t) + sUB(t)

        def gz(t):
            return gj(t) * z(t)

        steps = [("x A^T", U), ("(x A^T) B^T", UB), ("s (x A^T) B^T", sUB), ("x W0^T", base),
                 ("z = x W0^T + s (x A^T) B^T (formed before the magnitude's scale m / n, as "
                  "PEFT forms it)", z)]
        last = gz
    else:  # y = x W0^T + (g - 1) (xd W0^T) + g (s (xd A^T) B^T) (+ bias)
        def xw(t):
            return up(x2[i], t) @ up(W0[j], t)

        def t1(t):
            return (gj(t) + sign * up(1, t)) * base(t)

        def t2(t):
            return gj(t) * sUB(t)

        def s1(t):
            return xw(t) + t1(t)

        def gz(t):
            return s1(t) + t2(t)

        steps = [("(x * mask) A^T", U), ("((x * mask) A^T) B^T", UB),
                 ("s ((x * mask) A^T) B^T", sUB), ("x W0^T", xw), ("(x * mask) W0^T", base),
                 ("(m / n - 1) (x * mask) W0^T", t1), ("(m / n) s ((x * mask) A^T) B^T", t2),
                 ("x W0^T + (m / n - 1) (x * mask) W0^T", s1)]
        last = gz
    if bias is None:
        return steps + [("y", last)]

    def with_bias(t):
        return last(t) + up(bias[j], t)

    return steps + [("y before the bias", last), ("y", with_bias)]


def _forward_step(fn, dtype):
    """``fn(dtype)`` with floating-point warnings off (the error path recomputes overflows)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return fn(dtype)


def _scale(n, magnitude, W0, A, B, scaling, rescue, allow_zero_norm, magnitude_name,
           adapter_names=None):
    """g = m / n (step 4) from the kernel's norms n, with every check on n and m; and whether n > 0.

    The usual case costs three reductions: every norm finite (``n . n`` is)
    and at least ``norm._SMALLEST_SAFE_NORM`` (so no row needs the rescue,
    none is zero), and ``min(n) * max/2 > sqrt(m . m) >= max |m_i|`` (so m
    is finite and no quotient overflows): g = m / n. Otherwise the full
    sequence, which names what is wrong: NaN/Inf in m (by
    ``magnitude_name``), the rescue of under/overflowed rows (only for norms
    the kernel just computed, ``rescue``), ``check_norm``,
    ``magnitude_over_norm``.

    ``adapter_names`` (see ``_dora_forward``): A and B, not yet checked, are
    checked first on the full sequence (finite norms from the backend's
    kernel prove them finite).
    """
    lo = smallest_norm(n)  # NaN if a norm is: every comparison below is False
    # n . n and m . m by sum_squares, not ndarray.dot: dot checks the floating-point flags,
    # so a float32 sum of squares beyond 3.4e38 (norms of 2e19, valid weights) warned
    # 'overflow encountered in dot', or raised FloatingPointError under
    # np.errstate(over='raise'); sum_squares sets no flag NumPy reports (an overflow is inf:
    # the full sequence below), and never runs on BLAS's threads (a fork from another thread)
    if (lo >= _SMALLEST_SAFE_NORM and math.isfinite(sum_squares(n))
            and lo * _HALF_MAX[n.dtype] > math.sqrt(sum_squares(magnitude))):
        return magnitude / n, True
    if adapter_names is not None:
        check_finite(adapter_names[0], A)
        check_finite(adapter_names[1], B)
    check_finite(magnitude_name, magnitude)
    if rescue:
        _rescue_extreme_rows(n, W0, A, B, scaling)
        check_norm(n, W0, allow_zero_norm, A, B, scaling)  # names what overflowed
    else:  # a given norm (weight_norm)
        check_norm(n, W0, allow_zero_norm, given=(A, B, scaling))
    return magnitude_over_norm(magnitude, n), bool(n.all())


def _check_ctx(ctx, cls, forward):
    """Raise ``TypeError`` unless ``ctx`` is the context ``forward`` returns."""
    if not isinstance(ctx, cls):
        raise TypeError(
            f"ctx must be the {cls.__name__} returned by {forward}, got {type(ctx).__name__}"
        )


def dora_backward(dy, ctx, *, detach_norm=True, _dx_adjoint=None):
    """Gradients of a DoRA layer from the upstream gradient (hand-derived).

    The derivation is in this module's docstring; the steps are numbered
    as the forward's.

    Parameters
    ----------
    dy : ndarray, shape (..., out)
        dL/dy, the shape of the forward's output, same dtype.
    ctx : DoRAContext
        From ``dora_forward``; a float16/bfloat16 forward's policy applies.
    detach_norm : bool, default True
        True: n is a constant (paper Sec. 4.3, PEFT). False: the exact
        gradient, including the path through n (paper Eqs. 6-7).

    Returns
    -------
    DoRAGrads
        ``dx`` (..., in), ``dA`` (r, in), ``dB`` (out, r), ``dmagnitude`` (out,),
        each in the dtype of what it differentiates (dx in x's, the others in A's).

    Raises
    ------
    TypeError, ValueError
        If dy's dtype or shape does not match the forward's output, or ctx
        is not a ``DoRAContext``; NaN/Inf in dy, or a gradient that
        overflowed the dtype (never returned as inf or NaN). A gradient is
        said to overflow only when its value, recomputed in a wider type
        with a bound on that recomputation's error, surely does not fit;
        otherwise the message names its first intermediate that overflowed
        (dy * z, dg = sum_N dy * z, dU, the norm's terms) or says "<name>, or
        an intermediate of its computation, is not finite".
    RuntimeError
        If A, B or the magnitude changed in place since the forward (an
        optimiser step in between): the saved activations belong to the
        old values, and mixing them with the new ones would be silently
        wrong (PyTorch raises the same way for saved tensors).
    """
    _check_ctx(ctx, DoRAContext, "dora_forward")
    detach_norm = check_flag("detach_norm", detach_norm)
    if ctx.precision is not None:
        if ctx.seen is not None:
            ctx.seen.check_backward()
        return _lowp.dora_backward(dy, ctx, detach_norm, _dx_adjoint)
    return DoRAGrads(*_dora_backward_checked(dy, ctx, detach_norm))


def _dora_backward_checked(dy, ctx, detach_norm):
    """``dora_backward`` of a float32/float64 forward's ``DoRAContext`` (the caller knows it
    is one, as a layer does of its own): every other check, then (dx, dA, dB, dmagnitude)."""
    if detach_norm is not True and detach_norm is not False:  # a layer's attribute, set later
        detach_norm = check_flag("detach_norm", detach_norm)
    seen, W0, x = ctx.seen, ctx.W0, ctx.x
    if seen is not None:
        seen.check_backward()
    dtype = W0.dtype
    # the usual dy, an (N, out) ndarray of the forward's float dtype, recognised in one test
    # (check_input's own first test, plus N); any other goes through _check_dy
    if not (type(dy) is np.ndarray and dy.dtype is dtype and dy.ndim == 2 == len(ctx.x_shape)
            and dy.shape[0] == x.shape[0] and dy.shape[1] == W0.shape[0] and dtype.char in "fd"
            and dy.flags.c_contiguous):
        dy = _check_dy(dy, ctx, dtype)
    dx, dA, dB, dmagnitude = _dora_backward_f32(dy, ctx, W0, detach_norm)
    # results_finite(dA, dB, dmagnitude, dx), inline; else the exact test, which names them
    if not math.isfinite(sum_squares(dA) + sum_squares(dB) + sum_squares(dmagnitude)
                         + sum_squares(dx)):
        _check_backward_overflow(dict(dA=dA, dB=dB, dmagnitude=dmagnitude, dx=dx), dy, ctx,
                                 W0, detach_norm)
    return (dx if dx.shape == ctx.x_shape else dx.reshape(ctx.x_shape)), dA, dB, dmagnitude


# a float64 backward recomputed in long double (no BLAS) above this many multiply-adds is
# not: its message then says less (whether the gradient itself fits is not known)
_WIDE_BACKWARD_LIMIT = 3e7


def _check_backward_overflow(results, dy, ctx, W0, detach_norm, lora=False):
    """Raise the ``ValueError`` that says, truly, why a gradient is not finite (error path only).

    ``lora``: ctx is a ``LoRAContext`` (dz = dy: no magnitude, no norm).

    NaN/Inf in dy is named. Else the first gradient (dA, dB, dmagnitude, dx)
    with a non-finite entry is named as overflowed only if its value there,
    recomputed in a wider type (``wider_float``), does not fit the dtype.
    Otherwise its intermediates (dy * z, dg = sum_N dy * z, dz = dy m / n,
    dU = s dz B, the norm's terms c = -dg g / n^2, ...), recomputed in the
    dtype in the order the backward forms them, name the first that
    overflowed; where none can be named, the message says "<name>, or an
    intermediate of its computation, is not finite". Returns if every
    result is finite (only the one-sum test's sum of squares overflowed).
    """
    check_finite("dy", dy)
    name = next((k for k, a in results.items() if not np.isfinite(a).all()), None)
    if name is None:
        return
    got = results[name]
    dt = got.dtype
    idx = tuple(int(v) for v in np.argwhere(~np.isfinite(got))[0])
    N, in_f = ctx.x.shape
    out_f, r = ctx.B.shape
    wide = wider_float(dt)
    if wide is np.longdouble and N * in_f * out_f + out_f * in_f * r > _WIDE_BACKWARD_LIMIT:
        wide = None
    mine = _backward_parts(dy, ctx, W0, detach_norm, dt, lora=lora)
    ref = None if wide is None else _backward_parts(dy, ctx, W0, detach_norm, wide, lora=lora)
    value = fits = about = None
    if ref is not None:
        # said to fit (or to overflow) only when it surely does: a cancelling sum of huge
        # terms carries the wide computation's error (_wide_verdict)
        value = ref[name][idx]
        bound = _backward_parts(dy, ctx, W0, detach_norm, wide, absolute=True, lora=lora)[name][idx]
        fits, about = _wide_verdict(value, bound, N + in_f + out_f + 2 * r + 16, wide, dt, dt)
    if fits is False:
        raise ValueError(
            f"{name} (shape {got.shape}) overflowed {dt}, first at index {idx}: "
            + (f"{about}, " if np.isfinite(value) else "")
            + f"beyond {dt}'s largest value {float(finfo(dt).max):.6g}; every input is finite, "
            f"but the values are too large for the dtype; scale them down"
            + (", or compute in float64" if dt != np.dtype(np.float64) else ""))
    chain = _BACKWARD_CHAINS[name, "lora" if lora else
                             bool(detach_norm) or name in ("dmagnitude", "dx")]
    what = describe_overflow([(label, mine[key], None if ref is None else ref[key])
                              for key, label in chain], dt)
    if what and fits:
        raise ValueError(
            f"the gradient {name} (shape {got.shape}) could not be formed in {dt}: at index "
            f"{idx} it is {about} (recomputed in {_wide_name(wide)}), which fits {dt}, but its "
            f"intermediate {what}; every input is finite. Scale dy, x or the adapter down")
    if what:
        raise ValueError(
            f"the gradient {name} (shape {got.shape}) could not be formed in {dt}: at index "
            f"{idx} its intermediate {what}; whether {name} itself fits {dt} is not known; "
            f"every input is finite. Scale dy, x or the adapter down")
    fit = "" if not fits else f" ({name} there is {about}, which fits {dt})"
    raise ValueError(
        f"{name}, or an intermediate of its computation, is not finite in {dt}: first at "
        f"index {idx} of {name} (shape {got.shape}){fit}; every input is finite, but the "
        f"values are too large for the dtype. Scale dy, x or the adapter down")


def _wide_name(t):
    """How a message calls ``wider_float``'s type ("float64", or "long double": NumPy's
    name float128 would claim a format x86-64's 80-bit extended is not)."""
    return "long double" if np.dtype(t) == np.dtype(np.longdouble) != np.dtype(np.float64) \
        else str(np.dtype(t))


# each gradient's intermediates, in the order the backward forms them: (key, name)
_DG = [("dyz", "dy * z"), ("dg", "dg = sum_N dy * z")]
_NORM = _DG + [("c", "c = -dg (m / n) / n^2, the norm's factor"), ("cB", "c B")]
_BACKWARD_CHAINS = {
    ("dmagnitude", True): _DG,
    ("dx", True): [("dz", "dz = dy m / n"), ("dzW0", "dz W0"), ("dU", "dU = s dz B"),
                   ("dUA", "dU A")],
    ("dA", True): [("dz", "dz = dy m / n"), ("dU", "dU = s dz B"), ("dA_lowrank", "dU^T x")],
    ("dB", True): [("dz", "dz = dy m / n"), ("U", "x A^T"), ("dB_lowrank", "s dz^T (x A^T)")],
    ("dA", False): _NORM + [("cBtW0", "(c B)^T W0"), ("dA_norm", "the norm's term of dA"),
                            ("dz", "dz = dy m / n"), ("dU", "dU = s dz B"),
                            ("dA_lowrank", "dU^T x (the low-rank term of dA)")],
    ("dB", False): _NORM + [("W0At", "W0 A^T"), ("dB_norm", "the norm's term of dB"),
                            ("dz", "dz = dy m / n"), ("U", "x A^T"),
                            ("dB_lowrank", "s dz^T (x A^T) (the low-rank term of dB)")],
    # LoRA (lora_backward): dz is dy itself
    ("dx", "lora"): [("dzW0", "dy W0"), ("dU", "dU = s dy B"), ("dUA", "dU A")],
    ("dA", "lora"): [("dU", "dU = s dy B"), ("dA_lowrank", "dU^T x")],
    ("dB", "lora"): [("U", "x A^T"), ("dB_lowrank", "s dy^T (x A^T)")],
}


def _backward_parts(dy, ctx, W0, detach_norm, t, absolute=False, lora=False):
    """The backward's intermediates and gradients recomputed in dtype ``t`` (error path only).

    The operands are rounded to ``t`` first (exact for a wider type); the
    formulas are ``_dora_backward_f32``'s and ``norm_gradient``'s, with x the
    forward's (dropped-out) input; dx is computed for the unmasked forward
    and, with a mask, as the backward forms it. ``absolute``: the same
    computation on the operands' magnitudes, every difference a sum (the
    bound that scales the wide computation's rounding error). ``lora``: a
    ``LoRAContext``'s backward, as DoRA's with m / n = 1 and n = 1 (then
    dz = dy exactly, and with a mask (dz - dy) W0 = 0: ``_lora_backward_f32``'s
    values).
    """
    sign = 1 if absolute else -1

    def up(a):
        a = np.asarray(a).astype(t)
        return np.abs(a) if absolute else a

    x, w, A, B, dY = up(ctx.x), up(W0), up(ctx.A), up(ctx.B), up(dy)
    if lora:
        g = n = np.ones(W0.shape[0], dtype=t)
    else:
        g, n = up(ctx.g), up(ctx.n)
    s = up(ctx.scaling)
    p = {}
    with np.errstate(all="ignore"):
        p["U"] = U = x @ A.T
        z = x @ w.T + s * (U @ B.T)
        p["dyz"] = dY * z
        p["dg"] = dg = p["dyz"].sum(axis=0)
        safe = np.where(n == 0, up(1), n)
        p["dmagnitude"] = np.where(n == 0, up(0), dg / safe)
        p["dz"] = dz = dY * g
        p["dU"] = dU = s * (dz @ B)
        p["dA_lowrank"] = dU.T @ x
        p["dB_lowrank"] = s * (dz.T @ U)
        p["dzW0"] = dz @ w
        p["dUA"] = dU @ A
        if ctx.dropout_mask is None:
            p["dx"] = p["dzW0"] + p["dUA"]
        else:
            mask = up(ctx.dropout_mask)
            p["dx"] = dY @ w + mask * ((dz + sign * dY) @ w + p["dUA"])
        if detach_norm:
            p["dA"], p["dB"] = p["dA_lowrank"], p["dB_lowrank"]
        else:
            p["c"] = c = np.where(n == 0, up(0), (sign * dg * g / safe) / safe)
            p["cB"] = cB = c[:, None] * B
            p["cBtW0"] = cB.T @ w
            p["W0At"] = w @ A.T
            p["dA_norm"] = s * (p["cBtW0"] + s * ((cB.T @ B) @ A))
            p["dB_norm"] = s * (c[:, None] * (p["W0At"] + s * (B @ (A @ A.T))))
            p["dA"] = p["dA_norm"] + p["dA_lowrank"]
            p["dB"] = p["dB_lowrank"] + p["dB_norm"]
    return p


def _check_dy(dy, ctx, dtype):
    """dy checked against the forward's output (shape (..., out), ``dtype``), flattened.

    Its whole shape must be the output's: a dy of as many rows in another
    shape ((3, 2, out) for an output of (2, 3, out), or a flattened
    (6, out)) would pair its rows with rows of x by position, which is
    right for some layouts and silently wrong for others, so it is refused
    (as PyTorch refuses a gradient of another shape).

    Returned C-contiguous (a copy of a dy in another memory order, as the C
    kernels take it), so that the gradients' bits do not depend on dy's
    memory order on either backend (an adversary found a Fortran-ordered dy
    giving other last bits than the same dy C-ordered on the NumPy backend)."""
    out_f = ctx.W0.shape[0]
    low_precision = dtype.char not in "fd" and dtype in LOW_PRECISION_DTYPES  # the first: cheaper
    dy2 = check_input(dy, out_f, dtype, name="dy", low_precision=low_precision, axis="out")
    if np.shape(dy)[:-1] != tuple(ctx.x_shape[:-1]):
        raise ValueError(
            f"dy must have shape {(*ctx.x_shape[:-1], out_f)} (the forward's output), "
            f"got {np.shape(dy)}"
        )
    return np.ascontiguousarray(dy2)


#: False where reference counts say nothing about who holds an array (a build without the GIL):
#: the backward then never writes over its context's array.
_COUNTS_TELL = getattr(sys, "_is_gil_enabled", lambda: True)()
#: One backward at a time takes an array out of a context (``_take_base``).
_TAKE_LOCK = threading.Lock()
#: Per thread: whether it is inside ``_take_base``'s lock (or about to take it, or just out of
#: it), so that a backward a signal handler runs there does not wait for the lock its own
#: thread holds.
_TAKING = threading.local()


def _new_take_lock():
    """A fork's child gets a fresh ``_TAKE_LOCK``: one another thread held in the parent at the
    fork would stay held in the child, and its first backward would wait for ever."""
    global _TAKE_LOCK
    _TAKE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_take_lock)

#: The smallest (N, out) array the backward writes dz over. What it saves is fresh memory's page
#: faults, which glibc's allocator spares arrays this small (it keeps and reuses them); below it,
#: taking the array cost more than it saved: the 64x64 layer's step 1.02-1.06x its time without
#: (``bench_small_layer.py --base``, Intel Xeon). Tests set it to 0.
_TAKE_MIN_BYTES = 1 << 20


def _take_base(ctx):
    """The (N, out) array a backward reads from its context, and whether it may write dz over it.

    Returns (base, base_is_z, over). ``base`` None: the context holds none
    (the forward wrote y over it, or a backward took it); the caller forms it
    again. ``over`` True: the array was the context's alone, now taken from
    it (the context holds None, and ``base_is_z`` False): dz goes over it,
    and a second backward on this context forms it again. Otherwise the
    array stays in the context and dz goes into a new array: when something
    else holds it too (a copy of the context, a view of it, a zero-copy
    pickle's buffer: an adversary's cases, which a write would have made
    silently wrong), or its memory is not its own and writeable (a read-only
    buffer: the C kernel would have written into it or crashed).

    The count is compared with that of an object made here and held the same
    way, at the same moment, not with a figure measured once: a tracer that
    reads frames' locals (a debugger, a call logger) adds a reference to
    every local, and one active at import made an array held twice look held
    alone (an adversary's case: dmagnitude off by 9.6). Aliases that hold no
    reference (an address given to ctypes, a copy of ``__array_interface__``)
    cannot be seen; the context is opaque. One backward at a time takes the
    array (a lock), so a backward of the same context on another thread
    finds it or finds None and forms its own; the context always has the
    attribute, and an interrupt leaves it holding the array or None, never dz.
    A backward that a signal handler runs while its thread is inside this
    function (any context) reads and takes nothing: dz into a new array.
    A context without ``base_is_z`` (pickled by an older version) reads as False.
    An array below ``_TAKE_MIN_BYTES`` stays in the context (nothing to gain).
    """
    d = ctx.__dict__
    base, base_is_z = d.get("base"), d.get("base_is_z", False)
    if base is not None and base.nbytes < _TAKE_MIN_BYTES:
        return base, base_is_z, False  # too small to gain anything: dz into a new array
    busy = getattr(_TAKING, "busy", False)
    if busy and _TAKE_LOCK.locked():
        # a backward run by a signal handler while this thread holds the lock (it is set
        # before the lock is taken and put back after it is released): waiting for the lock
        # would wait for the interrupted frame, for ever (an adversary's case), and taking the
        # array could write over the one that frame has read. Read only: the handler runs to
        # its end before that frame goes on, and dz goes into a new array. (A flag an interrupt
        # left set, with another thread holding the lock, costs that call the take, no more.)
        return (None, False, True) if base is None else (base, base_is_z, False)
    try:
        _TAKING.busy = True
        with _TAKE_LOCK:  # read, then None in its place: another backward finds one or the other
            base, base_is_z = d.get("base"), d.get("base_is_z", False)
            if base is None:
                return None, False, True
            probe = []  # held by one local variable, as base is here besides the context
            if not (_COUNTS_TELL and type(base) is np.ndarray
                    and sys.getrefcount(base) == sys.getrefcount(probe) + 1
                    and (flags := base.flags).owndata and flags.writeable):
                return base, base_is_z, False  # held elsewhere too, or not ours to write: untouched
            d.update(base=None, base_is_z=False)  # one operation: an interrupt leaves both or neither
    finally:
        _TAKING.busy = busy  # as it was: a handler's take inside another's leaves it set
    return base, base_is_z, True


def _dora_backward_f32(dy2, ctx, W0, detach_norm):
    """The backward's arithmetic, steps (6) to (1), in the dtype of dy2 and W0 (not lp).

    Returns dx (N, in), dA, dB, dmagnitude, not yet checked for overflow.
    """
    A, B, s = ctx.A, ctx.B, ctx.scaling
    if ctx.precision is not None:  # an lp forward's context: its adapter as float32
        A, B = A.astype(np.float32, copy=False), B.astype(np.float32, copy=False)
    kernels = _backend.kernels()

    base, base_is_z, over = _take_base(ctx)
    if base is None:  # the forward wrote y over it (a layer in eval), or a backward took it
        base, base_is_z, over = ctx.x @ W0.T, False, True  # (2) again, as the forward formed it
    # (6) dg, dz and (5) dU = s * dz @ B, dB = s * dz.T @ U (one kernel for r <= the C
    # backend's FUSED_MAX_RANK), from z where the forward kept it: dz written over base (or
    # z) when the backward may
    dg, dz, dU, dB = kernels._backward_lowrank_any(dy2, base, ctx.U, B, ctx.g, s, base_is_z, over)
    dmagnitude = dg / ctx.n if ctx.n_nonzero else divide_by_norm(dg, ctx.n)  # (4)
    if detach_norm:
        dA = dU.T @ ctx.x  # (1)
    else:  # (3) now, so that its pass over W0 (C) follows the C pass above, not BLAS
        dA, dB_n = norm_gradient(W0, A, B, s, dg, ctx.g, ctx.n)
        dB += dB_n
        dA += dU.T @ ctx.x  # (1)

    if ctx.dropout_mask is None:
        dx = dz @ W0  # (2)
        _add_low_rank(dx, dU, A)  # (1): dx += dU @ A, with no (N, in) temporary
    else:  # y = x@W0.T + (g-1)*(xd@W0.T) + g*s*(xd@A.T)@B.T, xd = x*mask
        dx = dy2 @ W0 + ctx.dropout_mask * ((dz - dy2) @ W0 + dU @ A)
    return dx, dA, dB, dmagnitude


def norm_gradient(W0, A, B, scaling, dg, g, n):
    """The gradient through the norm n (step 3), which ``detach_norm=True`` drops.

    With dn = dL/dn = -dg * m / n**2 and c = dn / n = -dg * g / n**2, the
    norm sends ``dL/dV_i = c_i V_i`` to each row of V = W0 + s B A, so::

        dB = s * c[:, None] * (V @ A.T) = s * c[:, None] * (W0 @ A.T + s * B @ (A @ A.T))
        dA = s * B.T @ diag(c) @ V     = s * (cB.T @ W0 + s * (cB.T @ B) @ A)

    with ``cB = c[:, None] * B`` (row i of B scaled by c_i), using only (out, r), (r, r) and (r, in) products: no (out, in) temporary.
    The two products of W0 in it, ``W0 @ A.T`` and ``cB.T @ W0``, come
    from one kernel (``norm_gradient_products``; in C, one pass over W0 at
    small ranks).

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
        Any strides (a transposed view works: it goes to BLAS, not copied).
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    scaling : float
    dg : ndarray, shape (out,)
        dL/dg from step (6).
    g : ndarray, shape (out,)
        m / n.
    n : ndarray, shape (out,)
        Rows with n = 0 get c = 0.

    Returns
    -------
    dA : ndarray, shape (r, in)
    dB : ndarray, shape (out, r)
        To be added to the detached gradients.
    """
    c = divide_by_norm(divide_by_norm(-dg * g, n), n)  # not n * n: it can overflow
    cB = c[:, None] * B  # (out, r)
    if W0.flags.c_contiguous:
        W0At, cBtW0 = _backend.kernels().norm_gradient_products(W0, A, cB)  # one pass over W0
    else:  # e.g. an embedding table's transpose: BLAS reads it in place, no copy
        W0At, cBtW0 = W0 @ A.T, cB.T @ W0
    VAt = W0At + scaling * (B @ (A @ A.T))  # V @ A.T, (out, r)
    dB = scaling * (c[:, None] * VAt)
    dA = scaling * (cBtW0 + scaling * ((cB.T @ B) @ A))
    return dA, dB


def _check_mask(mask, x_shape, dtype):
    mask = as_float_array("dropout_mask", mask, low_precision=dtype in LOW_PRECISION_DTYPES)
    if mask.shape != tuple(x_shape):
        raise ValueError(f"dropout_mask must have the shape of x {tuple(x_shape)}, got {mask.shape}")
    if mask.dtype != dtype:
        raise dtype_mismatch("dropout_mask", mask.dtype, dtype)
    check_finite("dropout_mask", mask)  # else blamed on an overflow of finite inputs
    return mask.reshape(-1, x_shape[-1])


# ---------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------


def merge(W0, A, B, magnitude, scaling, *, allow_zero_norm=False, policy="consistent"):
    """Fold a DoRA adapter into the base weight: W' = diag(m / n) (W0 + s B A).

    After merging, ``x @ W'.T + bias`` equals ``dora_forward`` (eval). The
    bias is unchanged. Keep the returned n: ``unmerge`` needs it, because W'
    alone does not determine it.

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    magnitude : ndarray, shape (out,)
    scaling : float
    allow_zero_norm : bool, default False
        If True, rows with n = 0 merge to zero rows (g = 0) instead of raising.
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 W0 (A, B, magnitude float32 or W0's dtype):
        W' is the float32 merge rounded once to W0's dtype ("consistent"), or
        PEFT's merge with its roundings ("peft"). Ignored for float32/float64.

    Returns
    -------
    W_merged : ndarray, shape (out, in), new array, W0's dtype
    n : ndarray, shape (out,), the magnitude's dtype
        The row norms of W0 + s*B@A at merge time (for a float16/bfloat16
        magnitude, rounded to it, as the forward uses them).

    Raises
    ------
    ValueError
        On bad shapes, an empty weight, NaN/Inf, or a zero row norm (PEFT's
        ``safe_merge`` raises there too; its unsafe merge writes NaN).
    NonFiniteWeightError
        A ``ValueError`` subclass, when the merged weight would not be finite:
        m / n overflows the dtype, or (a magnitude near the dtype's largest
        value) a product does. It names every row (``.rows``) and the
        cause (``.cause``), as PEFT's ``safe_merge`` refuses NaN results.
        Nothing is modified: the inputs are only read.

    Notes
    -----
    Matches PEFT ``DoraLinearVariant.merge_safe`` (the factor m / n applied to
    ``W + s * B @ A``, the norm cached for unmerge).
    """
    check_policy(policy)
    allow_zero_norm = check_flag("allow_zero_norm", allow_zero_norm)
    W0, A, B, magnitude, _ = check_adapter(W0, A, B, magnitude, low_precision=True)
    if magnitude is None:
        raise TypeError("magnitude must be an array of shape (out,), got None")
    scaling = check_scaling(scaling)
    if W0.dtype in LOW_PRECISION_DTYPES:
        return _lowp.merge(W0, A, B, magnitude, scaling, allow_zero_norm, policy)
    with np.errstate(over="ignore"):  # an overflow is refused below, with its rows
        W_merged, n = _backend.kernels().merge(W0, A, B, magnitude, scaling)
    rescued = _rescue_extreme_rows(n, W0, A, B, scaling)
    check_norm(n, W0, allow_zero_norm, A, B, scaling)
    g = magnitude_over_norm(magnitude, n)  # the kernel's factor: refused if it overflows
    if rescued.size:
        with np.errstate(over="ignore", invalid="ignore"):  # finite: check_norm refused the rest
            V = _rows_in_rank_order(rescued, W0, A, B, scaling)  # the kernel's order, as its n
        W_merged[rescued] = g[rescued, None] * V
    if not n.all():
        W_merged[n == 0] = 0
    # With g finite, |W'_ij| = |g_i| |V_ij| <= |m_i| (1 + a few u), as |V_ij| <= n_i:
    # only a magnitude within a factor 2 of the dtype's largest value can overflow.
    near_max = np.flatnonzero(np.abs(magnitude) > np.finfo(W0.dtype).max / 2)
    if near_max.size and not np.isfinite(W_merged[near_max]).all():
        bad = near_max[~np.isfinite(W_merged[near_max]).all(axis=1)]
        refuse_non_finite_rows(
            "the merged weight (m / n) * (W0 + s*B@A)", bad,
            f"the magnitude is near the largest {W0.dtype} ({np.finfo(W0.dtype).max:.3g}) "
            f"and a product overflowed",
        )
    return W_merged, n


def unmerge(W_merged, A, B, magnitude, scaling, n, *, policy="consistent"):
    """Recover the base weight: W0 = W' / (m / n)[:, None] - s B A.

    Parameters
    ----------
    W_merged : ndarray, shape (out, in)
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    magnitude : ndarray, shape (out,)
        The magnitude used by ``merge``.
    scaling : float
    n : ndarray, shape (out,), the magnitude's dtype
        The norms returned by ``merge``.
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 W_merged: the float32 unmerge of the upcast
        W_merged rounded once ("consistent"), or PEFT's unmerge with its
        roundings ("peft"). Ignored for float32/float64.

    Returns
    -------
    W0 : ndarray, shape (out, in), W_merged's dtype

    Raises
    ------
    TypeError
        magnitude or n is not an array.
    ValueError
        On bad shapes, or a zero in m / n: such a row was scaled to zero by
        the merge and cannot be recovered.
    NonFiniteWeightError
        A ``ValueError`` subclass, when W0 would not be finite: W' / (m / n)
        or s B A overflows the dtype (every input finite). It names the rows.

    Notes
    -----
    Matches PEFT ``DoraLinearVariant.unmerge``, which divides by the factor
    cached at merge time.
    """
    check_policy(policy)
    W_merged, A, B, magnitude, _ = check_adapter(
        W_merged, A, B, magnitude, low_precision=True,
        names=("W_merged", "A", "B", "magnitude", "bias"))
    if magnitude is None:
        raise TypeError("magnitude must be an array of shape (out,), got None")
    n = as_float_array("n", n, ndim=1, low_precision=True)
    if n.shape != magnitude.shape or n.dtype != magnitude.dtype:
        raise ValueError(
            f"n must have the shape and dtype of magnitude {magnitude.shape} {magnitude.dtype}, "
            f"got {n.shape} {n.dtype}"
        )
    scaling = check_scaling(scaling)
    _check_merge_norms(n, W_merged)
    if W_merged.dtype in LOW_PRECISION_DTYPES:
        return _lowp.unmerge(W_merged, A, B, magnitude, scaling, n, policy)
    # where n = 0 the merge wrote a zero row and V_i = 0, so W0_i = -s B_i A:
    # dividing that zero row by 1 and subtracting s B_i A gives exactly that
    factor = np.where(n == 0, 1, divide_by_norm(magnitude, n))
    _refuse_lost_rows(factor)
    check_finite("W_merged", W_merged)
    with np.errstate(over="ignore"):  # an overflow is refused below, with its rows
        W0 = _backend.kernels().unmerge(W_merged, A, B, factor, scaling)
    if not all_finite(W0):  # every input is finite: W' / (m / n) or s B A overflowed
        check_rows_finite("the unmerged weight W' / (m / n) - s*B@A", W0)
    return W0


def _check_merge_norms(n, W_merged):
    """Refuse an ``n`` that ``merge`` cannot have returned: NaN, negative, or 0 on a nonzero row.

    A row norm is >= 0, and where it is 0 the merge wrote a zero row (g = 0).
    Any other n would make unmerge return a wrong W0 without a sign: n < 0
    flips the row, n = 0 on a nonzero row of W' returns W'_i - s B_i A.
    """
    bad = ~(n >= 0)  # NaN too
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"n must hold the row norms returned by merge (>= 0), got {float(n[rows[0]])} "
            f"at output channel(s) {rows[:8].tolist()}"
        )
    zero = np.flatnonzero(n == 0)
    if zero.size:
        nonzero_rows = zero[np.any(W_merged[zero] != 0, axis=1)]
        if nonzero_rows.size:
            raise ValueError(
                f"n is 0 at output channel(s) {nonzero_rows[:8].tolist()} where W_merged is not "
                f"zero: merge writes a zero row where the norm is 0, so this n does not belong "
                f"to this W_merged"
            )


def _refuse_lost_rows(factor):
    """Raise ``ValueError`` where m / n is 0 or not finite: unmerge cannot recover those rows."""
    lost = (factor == 0) | ~np.isfinite(factor)
    if lost.any():
        rows = np.flatnonzero(lost)
        raise ValueError(
            f"cannot unmerge: the magnitude is 0 (or m / n not finite) at output channel(s) "
            f"{rows[:8].tolist()}: the merge scaled those rows of V to zero and W0 cannot "
            f"be recovered there"
        )


# ---------------------------------------------------------------------------
# plain LoRA, the baseline
# ---------------------------------------------------------------------------


def lora_forward(x, W0, A, B, scaling, bias=None, *, dropout_mask=None, policy="consistent"):
    """LoRA linear layer forward: y = x @ W0.T + s * (xd @ A.T) @ B.T + bias.

    Parameters
    ----------
    x : ndarray, shape (..., in)
    W0 : ndarray, shape (out, in)
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    scaling : float
    bias : ndarray, shape (out,), optional
    dropout_mask : ndarray, shape of x, optional
        Scaled keep mask; ``xd = x * dropout_mask`` feeds only the low-rank
        path (PEFT ``lora.Linear.forward``). Without it, xd = x.
    policy : {"consistent"}, default "consistent"
        For a float16/bfloat16 W0: the float32 forward rounded once. "peft"
        is defined for DoRA only and raises ``ValueError`` here.

    Returns
    -------
    y : ndarray, shape (..., out), x's dtype
    ctx : LoRAContext

    Raises
    ------
    TypeError, ValueError
        On bad dtypes or shapes, NaN/Inf in a weight or in x, or an output
        that overflowed the dtype (never returned as inf or NaN).
    """
    check_policy(policy)
    W0, A, B, _, bias = check_adapter(W0, A, B, None, bias, low_precision=True)
    scaling = check_scaling(scaling)
    if W0.dtype in LOW_PRECISION_DTYPES:
        return _lowp.lora_forward(np.shape(x), x, W0, A, B, scaling, bias, dropout_mask, policy)
    check_finite("W0", W0)  # check_adapter leaves it to the norm, which LoRA has not
    x2 = check_input(x, W0.shape[1], W0.dtype)
    return _lora_forward(np.shape(x), x2, W0, A, B, scaling, bias, dropout_mask)


def _lora_forward(x_shape, x2, W0, A, B, scaling, bias, dropout_mask):
    """``lora_forward`` after its argument checks (see ``_dora_forward``)."""
    mask = None
    xd = x2
    if dropout_mask is not None:
        mask = _check_mask(dropout_mask, x_shape, W0.dtype)
        xd = x2 * mask
    U = xd @ A.T
    y = x2 @ W0.T + scaling * (U @ B.T)
    if bias is not None:
        y += bias
    if not results_finite(y):  # the exact test, which names x or, truly, what overflowed
        _check_forward_overflow(y, x2, xd, W0, A, B, None, scaling, bias, mask is not None)
    ctx = LoRAContext(x_shape, xd, mask, W0, A, B, scaling, U,
                      WeightSnapshot({"A (lora_A)": A, "B (lora_B)": B}))
    return y.reshape(*x_shape[:-1], W0.shape[0]), ctx


def lora_backward(dy, ctx, *, _dx_adjoint=None):
    """Gradients of a LoRA layer.

    Parameters
    ----------
    dy : ndarray, shape (..., out)
    ctx : LoRAContext

    Returns
    -------
    LoRAGrads
        ``dx`` (..., in), ``dA`` (r, in), ``dB`` (out, r).

    Raises
    ------
    TypeError, ValueError
        If dy's dtype or shape does not match the forward's output, or ctx
        is not a ``LoRAContext``; NaN/Inf in dy, or a gradient that
        overflowed the dtype.
    RuntimeError
        If A or B changed in place since the forward (see ``dora_backward``).
    """
    _check_ctx(ctx, LoRAContext, "lora_forward")
    if ctx.seen is not None:
        ctx.seen.check_backward()
    if ctx.precision is not None:
        return _lowp.lora_backward(dy, ctx, _dx_adjoint)
    dy2 = _check_dy(dy, ctx, ctx.W0.dtype)
    dx, dA, dB = _lora_backward_f32(dy2, ctx, ctx.W0)
    if not results_finite(dA, dB, dx):  # the exact test, which names dy or, truly, the overflow
        _check_backward_overflow(dict(dA=dA, dB=dB, dx=dx), dy2, ctx, ctx.W0, True, lora=True)
    return LoRAGrads(dx.reshape(ctx.x_shape), dA, dB)


def _lora_backward_f32(dy2, ctx, W0):
    """LoRA's backward arithmetic in the dtype of dy2 and W0; dx (N, in), dA, dB unchecked."""
    A, B, s = ctx.A, ctx.B, ctx.scaling
    if ctx.precision is not None:
        A, B = A.astype(np.float32, copy=False), B.astype(np.float32, copy=False)
    dU = s * (dy2 @ B)
    dB = s * (dy2.T @ ctx.U)
    dA = dU.T @ ctx.x
    dx = dy2 @ W0
    if ctx.dropout_mask is None:
        _add_low_rank(dx, dU, A)
    else:
        low_rank_dx = dU @ A
        low_rank_dx *= ctx.dropout_mask
        dx += low_rank_dx
    return dx, dA, dB


#: rows of dU @ A formed at a time by ``_add_low_rank``: about this many bytes, so that a
#: block is added to dx while it is still in a cache (the Intel Xeon measured has 2 MiB of L2 a
#: core; Zen 3 has 512 KiB, and L3) instead of being written to memory whole and read back.
#: Measured on the Xeon: 1 MiB blocks 0.76x the whole temporary's time, 256 KiB blocks 0.86x.
_ADD_BLOCK_BYTES = 1 << 20


def _add_low_rank(dx, dU, A):
    """dx += dU @ A (step (1) of the backward), a block of rows at a time.

    dx (N, in), dU (N, r), A (r, in), one float dtype; dx is updated in place.
    Each element is the r-term product that ``dx += dU @ A`` adds, from the
    same BLAS call on fewer rows, within the same rounding bound
    (``tests/test_add_low_rank.py``). Its last bit can differ from the whole
    product's where BLAS takes another code path for a block than for the
    whole: with OpenBLAS 0.3.31 on the Intel Xeon, never in float32 over
    every shape tried, and in float64 at some widths (in = 255, 383, 511,
    513, ...: 35 of 255,000 elements at (N, in, r) = (1000, 255, 8); found by
    session 18's second adversary). What it saves is the
    whole (N, in) temporary (8 MiB at N = 512, in = 4096, float32): memory
    written once and read back, and fresh in every training step (its first
    writes fault page by page; see docs/performance.md, "Fresh memory in a
    training step"). Alone, on memory already mapped, at (N, in, r) = (512,
    4096, 16): 1.27 against 1.68 ms (medians of 15, Intel Xeon, quiet).
    """
    N, in_f = dx.shape
    blocks = -(-N * in_f * dx.itemsize // _ADD_BLOCK_BYTES)  # ceil
    if blocks <= 1 or N < 2 * blocks:  # one block; or blocks of a row, which BLAS takes as a gemv
        dx += dU @ A
        return
    rows = -(-N // blocks)  # as even as they go: no last block of a row or two
    block = np.empty((rows, in_f), dtype=np.result_type(dU, A))
    for i in range(0, N, rows):
        j = min(N, i + rows)
        part = block[:j - i]
        np.matmul(dU[i:j], A, out=part)
        dx[i:j] += part


from . import lowp as _lowp  # noqa: E402 (it builds on the functions above)
