"""The row norm ``||W0 + s B A||_row`` and the guards around dividing by it.

DoRA's step (3) (paper Eq. 5, the "column" norm of the paper's (in, out)
layout, one value per output channel here): ``column_norm`` computes it
without forming ``B @ A`` (the kernels walk W0 in row blocks),
``init_magnitude`` is it at initialisation (PEFT's ``update_layer``), and
``check_norm``, ``magnitude_over_norm`` and ``divide_by_norm`` refuse, by
name, a zero norm or a quotient that overflows instead of returning inf or
NaN. Rows whose float64 sum of squares underflows or overflows are
recomputed scaled (``_rescue_extreme_rows``), so the norm of any finite
weight is finite and correct to rounding.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend as _backend
from ._validate import (check_adapter, check_flag, check_scaling, describe_overflow, fits_dtype,
                        format_wide, refuse_non_finite_rows, wider_float, sum_squares)
from .precision import finfo as _finfo


def check_norm(n, W0, allow_zero_norm, A=None, B=None, scaling=None, given=None):
    """Raise ``ValueError`` on a non-finite or (unless allowed) zero row norm.

    Parameters
    ----------
    n : ndarray, shape (out,)
        Row norms of W0 + s*B@A.
    W0 : ndarray, shape (out, in)
        Read only to name the cause (NaN/Inf rows) when n is not finite.
    allow_zero_norm : bool
        If False, n = 0 raises (PEFT outputs NaN there, peft#2049).
    A, B : ndarray, shapes (r, in) and (out, r), optional
    scaling : float, optional
        The adapter (finite, checked before), read only when n is not finite
        and W0 is: the first bad row is recomputed step by step (B@A, s*B@A,
        W0 + s*B@A) in n's dtype and in a wider one (``wider_float``), so that
        a norm that fits n's dtype is never said to have overflowed (B@A,
        formed before the scaling, is named instead).
    given : tuple (A, B, scaling), optional
        n was given, not computed here (``weight_norm``, a layer's cached
        norm): a zero is said to be an all-zero row of W0 + s*B@A only where
        that row is zero (recomputed for the zero rows, error path only);
        elsewhere the message says the norm does not belong to the weights.
    """
    finite = np.isfinite(n)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        w0_bad = [int(i) for i in rows[:8] if not np.isfinite(W0[i]).all()]
        if not w0_bad and A is not None and B is not None and scaling is not None:
            _refuse_intermediate_overflow(n, rows, W0, A, B, scaling)
        cause = (
            f"W0 has NaN/Inf in row(s) {w0_bad}"
            if w0_bad
            else f"the norm itself overflowed {n.dtype} (it is larger than {np.finfo(n.dtype).max:.4g})"
        )
        raise ValueError(
            f"the row norm of W0 + s*B@A is not finite in row(s) "
            f"{rows[:8].tolist()}{'...' if rows.size > 8 else ''}: {cause}"
        )
    if allow_zero_norm is not True and allow_zero_norm is not False:
        allow_zero_norm = check_flag("allow_zero_norm", allow_zero_norm)
    if not allow_zero_norm and not n.all():
        rows = np.flatnonzero(n == 0)
        if given is not None:  # a zero in a given norm: is the row zero? (found by session 18's adversary)
            gA, gB, gs = (np.asarray(given[0], np.float64), np.asarray(given[1], np.float64),
                          float(given[2]))
            not_zero = [int(i) for i in rows[:8]
                        if np.any(np.asarray(W0[i], np.float64) + gs * (gB[i] @ gA))]
            if not_zero:
                raise ValueError(
                    f"the row norm given for output channel(s) {not_zero} is 0, but W0 + s*B@A "
                    f"is not zero there: the norm (weight_norm, or a layer's cached norm) does "
                    f"not belong to these weights"
                )
        raise ValueError(
            f"W0 + s*B@A has an all-zero row at output channel(s) {rows[:8].tolist()}"
            f"{'...' if rows.size > 8 else ''}: its norm is 0 and m / n is undefined "
            f"(PEFT silently outputs NaN here, peft#2049). Pass allow_zero_norm=True "
            f"to define g = 0 for such rows (the channel then outputs its bias)."
        )


def _refuse_intermediate_overflow(n, rows, W0, A, B, scaling):
    """``check_norm``'s error path: raise where only an intermediate of row rows[0]'s norm overflowed.

    Returns (and ``check_norm`` says that the norm itself overflowed) when
    the norm itself does not fit n's dtype, or when no step can be named.
    """
    i = int(rows[0])
    if not (np.isfinite(A).all() and np.isfinite(B[i]).all()):
        return  # NaN/Inf in the adapter is named by its own check, not as an overflow
    dt = n.dtype
    wide = wider_float(dt)

    def steps(t):
        with np.errstate(over="ignore", invalid="ignore"):
            # in the kernels' order: BLAS's may not overflow where theirs did
            BA = _lowrank_in_rank_order(B[i:i + 1].astype(t), A.astype(t))[0]
            sBA = BA * np.asarray(scaling).astype(t)
            V = W0[i].astype(t) + sBA
        return BA, sBA, V

    got = steps(dt)
    ref = steps(wide) if wide is not None else (None, None, None)
    what = describe_overflow(list(zip(("B@A (formed before the scaling)", "s*B@A",
                                       "W0 + s*B@A"), got, ref)), dt)
    if what is None:
        return
    listing = f"{rows[:8].tolist()}{'...' if rows.size > 8 else ''}"
    if wide is None:
        raise ValueError(
            f"the row norm of W0 + s*B@A could not be computed in {dt} in row(s) {listing}: at "
            f"row {i}, {what}; whether the norm itself fits {dt} is not known (no float type "
            f"wider than {dt} here). Scale A or B down (and the scaling up)")
    V = ref[2]
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.max(np.abs(V), initial=0)
        norm = t * np.sqrt(np.sum((V / t) ** 2)) if t > 0 else t
    if not fits_dtype(norm, dt):
        return
    raise ValueError(
        f"the row norm of W0 + s*B@A could not be computed in {dt} in row(s) {listing}: at "
        f"row {i} it is about {format_wide(norm)}, which fits {dt}, but {what}; every weight "
        f"is finite. Scale A or B down (and the scaling up)"
        + (", or compute in float64" if dt != np.dtype(np.float64) else ""))


def refuse_overflowed_norm(n, stored):
    """``ValueError`` where a finite float32 norm ``n`` became inf in its lp rounding ``stored``.

    A row norm of 0.9 * 65504 over 8 columns is 1.7e5: finite in float32,
    past float16's largest value (65504); a float16 magnitude cannot hold it.

    Parameters
    ----------
    n : ndarray, shape (out,), float32
        The row norms before rounding.
    stored : ndarray, shape (out,), float16 or bfloat16
        ``n`` rounded to the magnitude's dtype (``precision.round_to``).

    Raises
    ------
    ValueError
        Naming the rows, the first norm and the dtype's largest value.
    """
    over = np.isfinite(n) & ~np.isfinite(stored)
    if over.any():
        rows = np.flatnonzero(over)
        largest = float(_finfo(stored.dtype).max)
        raise ValueError(
            f"the row norm of W0 + s*B@A overflows the magnitude's dtype {stored.dtype} in "
            f"row(s) {rows[:8].tolist()}{'...' if rows.size > 8 else ''} (norm "
            f"{float(n[rows[0]]):.6g}, largest {stored.dtype} {largest:.6g}): "
            f"keep the adapter in float32 (autocast_adapter_dtype=True) or scale W0 down"
        )


_HALF_MAX = {np.dtype(t): 0.5 * float(np.finfo(t).max) for t in (np.float32, np.float64)}


def magnitude_over_norm(magnitude, n):
    """g = m / n (step 4), refused where it overflows the dtype.

    A row of V far smaller than its magnitude (a float32 row of norm 1e-41
    with m = 1) makes m / n overflow to inf, and the forward and the merged
    weight would be inf or NaN in that channel, although m * V_i / n_i is
    representable. PEFT computes the same m / n and returns the inf; here it
    raises instead.

    Parameters
    ----------
    magnitude : ndarray, shape (out,)
    n : ndarray, shape (out,)
        Finite row norms (``check_norm`` passed); rows with n = 0 get g = 0.

    Returns
    -------
    g : ndarray, shape (out,)

    Raises
    ------
    NonFiniteWeightError
        A ``ValueError`` naming every row where m / n is not finite.
    """
    # |m_i| / n_i <= max|m| / min(n) < half the dtype's largest value: no quotient can
    # overflow (and no n is 0), the common case, without errstate's cost
    if float(n.min()) * _HALF_MAX[n.dtype] > float(np.abs(magnitude).max()):
        return magnitude / n
    with np.errstate(over="ignore"):  # checked right below
        g = divide_by_norm(magnitude, n)
    if not np.isfinite(g).all():
        rows = np.flatnonzero(~np.isfinite(g))
        i = rows[0]
        refuse_non_finite_rows(
            "the DoRA scale m / n",
            rows,
            f"m / n overflows {g.dtype} (row {i}: m = {magnitude[i]:.3g}, n = ||W0 + s*B@A||"
            f" = {n[i]:.3g}); a row of W0 + s*B@A this small cannot carry this magnitude in "
            f"{g.dtype}",
        )
    return g


def divide_by_norm(a, n):
    """a / n elementwise for a per-channel a, shape (out,), with 0 where n = 0.

    Gives g = m / n and dm = dg / n. A zero norm is reached only with
    ``allow_zero_norm=True``; there g = 0 (the channel outputs its bias) and
    the magnitude gets no gradient.
    """
    if n.all():
        return a / n
    out = np.zeros_like(a)
    np.divide(a, n, out=out, where=n != 0)
    return out


# below this norm the float64 sum of squares was subnormal (or 0), so it lost digits
_SMALLEST_SAFE_NORM = float(np.sqrt(np.finfo(np.float64).tiny))  # 1.5e-154
# above this norm the float64 sum of squares overflows
_LARGEST_SAFE_NORM = float(np.sqrt(np.finfo(np.float64).max))  # 1.3e154
# how far a genuine under/overflow may land from those limits: the kernels'
# own rounding (squares that lost digits to subnormals, the sum's rounding) is
# a relative in * u ~ 1e-9 for in = 1e7; a bug lands orders of magnitude away
_RESCUE_SLACK = 1e-6
_NO_ROWS = np.zeros(0, dtype=np.intp)
_NO_ROWS.flags.writeable = False


def norms_in_safe_range(n):
    """True if every row norm is finite and >= ``_SMALLEST_SAFE_NORM`` (no rescue, no zero).

    Two calls instead of the four passes of the rows' mask: the smallest
    norm, and one sum of squares ``n . n`` (``_validate.sum_squares``),
    finite only if every norm is (a NaN or an Inf makes it NaN or Inf; an
    overflow of the sum of squares of finite norms, possible for float64
    norms beyond about 1e154, answers False too, and the caller's exact path
    decides).
    ``functional._scale`` makes the same test inline.

    Parameters
    ----------
    n : ndarray, shape (out,), float32 or float64

    Returns
    -------
    bool
    """
    return (n.size > 0
            and smallest_norm(n) >= _SMALLEST_SAFE_NORM  # NaN compares False
            # sum_squares, not ndarray.dot, which warns or raises (np.errstate) when a
            # float32 sum of squares overflows; and not on BLAS's threads (a fork)
            and math.isfinite(sum_squares(n)))


def smallest_norm(n):
    """``float(np.minimum.reduce(n))`` for a non-empty 1-D float ndarray, in one cheaper call.

    ``n.argmin()`` is the index of the first smallest entry, or of the first
    NaN when there is one (NaN propagates in ``argmin`` as in ``minimum``),
    so the entry there is the minimum, or NaN exactly when the minimum is
    NaN. A ufunc reduction costs about 1.5 us of dispatch at any size; the
    norms have one value per output channel, so at small sizes that is most
    of the check (``functional._scale``, issue 11).

    Parameters
    ----------
    n : ndarray, shape (out,), out >= 1

    Returns
    -------
    float
    """
    return float(n.item(n.argmin()))


def _lowrank_in_rank_order(B_rows, A):
    """``B_rows @ A`` with its rank-r terms added in the kernels' order.

    The C tiles add ``B[i, k] * A[k, :]`` for k = 0, 1, ..., r - 1 in that
    order; BLAS (and so the NumPy backend, whose products are BLAS's) adds
    them in an order of its own, which changes with the number of rows. A
    partial sum can overflow in one order and not in the other
    (``9e307 - 1.7e308 - 1.7e308 + 9e307`` overflows left to right, not
    pairwise), and cancellation can keep or lose a term (``1e300 + 1 -
    1e300``), so the rescue recomputes flagged rows, and ``check_norm`` names
    the intermediate that overflowed, in this order. Here each product is
    rounded before it is added, where the tiles may fuse the two (one
    rounding), so the last bits, and an overflow within an ulp of the largest
    value, can differ. Only flagged rows come here (the rescue, the error
    path): r passes over a (rows, in) array and one scratch of that size.

    Parameters
    ----------
    B_rows : ndarray, shape (k, r)
        The rows of B in question.
    A : ndarray, shape (r, in)

    Returns
    -------
    P : ndarray, shape (k, in), dtype ``result_type(B_rows, A)``
        The sums, inf or NaN where a partial sum overflowed.
    """
    dtype = np.result_type(B_rows, A)
    P = np.zeros((B_rows.shape[0], A.shape[1]), dtype=dtype)
    term = np.empty_like(P)
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(A.shape[0]):
            np.multiply(B_rows[:, k:k + 1], A[k], out=term)
            P += term
    return P


def _rescue_extreme_rows(n, W0, A, B, scaling):
    """Recompute, in place, rows whose sum of squares left float64's range.

    The kernels sum squares in float64, which loses digits to subnormals (or
    underflows to 0) for rows of entries below ~1e-154 and overflows for
    entries above ~1e154 (float64 weights only: float32's whole range squares
    safely in float64). Those rows are recomputed as ``t * ||V_i / t||`` with
    ``t = max |V_i|``, the scaling of LAPACK's nrm2, so that a tiny row is not
    reported as "all zero" and a huge but representable norm is not reported
    as overflow. V_i is formed again with its rank-r terms in the kernels'
    order (``_lowrank_in_rank_order``), so that the recomputed row is the
    one the C kernel summed.

    The rescue repairs only genuine under/overflow. A row the kernel reported
    as tiny (or 0) whose recomputed norm is not tiny, or one reported as
    inf whose recomputed norm is well inside the range, is a bug in the
    kernel, and repairing it would hide that bug from every test of the
    kernel: it raises instead. Except where another order of the rank-r
    terms (BLAS's, in the NumPy backend; or the C tiles' fused multiply-adds)
    can explain the difference (session 16's adversaries found each case
    called a bug):

    * reported inf, where an intermediate may overflow in some order (a sum
      of the terms' magnitudes, sum_k |B_ik A_kj| before the scaling, |s|
      times it, or a_ij = |W0_ij| + |s| sum_k |B_ik A_kj|, reaches the
      dtype's largest value: a partial sum never exceeds it, up to rounding)
      or where the recomputed norm plus the rounding error any order may
      make (``8 gamma_{in + r + 2} ||a_i||``) reaches the range where the
      squares overflow: the recomputed norm stands (it is the kernels'
      order's);
    * reported 0 or tiny, where the recomputed norm is within that rounding
      error (cancellation: ``1e300 + 1 - 1e300`` is 0 left to right and 1 in
      another order): the kernel's value is kept.

    A row whose recomputation overflows (an intermediate in the kernels'
    order, or the norm itself) stays inf, and ``check_norm`` names why.

    Parameters
    ----------
    n : ndarray, shape (out,)
        The kernel's row norms of V = W0 + s * B @ A; rescued rows are
        overwritten.
    W0 : ndarray, shape (out, in), any strides
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    scaling : float

    Returns
    -------
    ndarray of int
        The rows flagged and recomputed (usually none).

    Raises
    ------
    RuntimeError
        If a flagged row is not a genuine under/overflow (a kernel bug); the
        message names the rows, both norms and the backend.
    """
    if norms_in_safe_range(n):  # the usual case, in two reductions instead of four passes
        return _NO_ROWS
    rows = np.flatnonzero((n < _SMALLEST_SAFE_NORM) | np.isinf(n))
    if not rows.size:
        return rows
    with np.errstate(all="ignore"):  # an overflow here is the row's, reported by the caller
        V = _rows_in_rank_order(rows, W0, A, B, scaling)  # (k, in) for the k rows only
        recomputed = _scaled_norms(V)  # 0 for a zero row, inf where V is not finite
    reported = n[rows]
    huge = min(float(np.finfo(n.dtype).max), _LARGEST_SAFE_NORM)
    inf = np.isinf(reported)
    bug = np.where(
        inf,
        recomputed < huge * (1 - _RESCUE_SLACK),  # reported overflow of an ordinary row
        recomputed > _SMALLEST_SAFE_NORM * (1 + _RESCUE_SLACK),  # reported 0 / tiny, it is not
    )
    if bug.any():  # outcomes of another order of the terms, not bugs (see above)
        suspect = np.flatnonzero(bug)
        with np.errstate(over="ignore", invalid="ignore"):
            BA = np.abs(B[rows[suspect]]).astype(np.float64) @ np.abs(A).astype(np.float64)
            sBA = abs(float(scaling)) * BA
            a = np.abs(W0[rows[suspect]]).astype(np.float64) + sBA
            limit = float(np.finfo(n.dtype).max) * (1 - _RESCUE_SLACK)
            may_overflow = ~((BA.max(axis=1, initial=0) < limit)  # B@A, before the scaling
                             & (sBA.max(axis=1, initial=0) < limit)
                             & (a.max(axis=1, initial=0) < limit))
            k = W0.shape[1] + A.shape[0] + 2
            u = float(np.finfo(n.dtype).eps) / 2
            rounding = 8 * (k * u / (1 - k * u)) * _scaled_norms(a)
            cand = recomputed[suspect]
            order = np.where(inf[suspect],
                             may_overflow | (cand + rounding >= huge * (1 - _RESCUE_SLACK)),
                             cand <= rounding)
        bug[suspect[order]] = False
        kept = suspect[order & ~inf[suspect]]
        recomputed[kept] = reported[kept]  # a 0 / tiny one order gives: the kernel's value
    if bug.any():
        bad = rows[bug]
        raise RuntimeError(
            f"the {_backend.backend()!r} backend's row norm kernel returned "
            f"{reported[bug][:8].tolist()} for row(s) {bad[:8].tolist()}"
            f"{'...' if bad.size > 8 else ''} of W0 + s*B@A, whose norms are "
            f"{recomputed[bug][:8].tolist()}: not an under/overflow but a bug in the kernel "
            f"(shape W0 {W0.shape}, A {A.shape}, dtype {W0.dtype})"
        )
    n[rows] = recomputed
    return rows


def _rows_in_rank_order(rows, W0, A, B, scaling):
    """V = W0[rows] + s * B[rows] @ A, shape (k, in) for the k ``rows`` (an int array),
    with B @ A added in the kernels' order of k (``_lowrank_in_rank_order``)."""
    return W0[rows] + scaling * _lowrank_in_rank_order(B[rows], A)


def _scaled_norms(V):
    """Row norms of V (k, in) as ``t * ||V_i / t||``, t = max |V_i| (LAPACK nrm2's
    scaling: no squares under- or overflow): 0 for a zero row, inf for a row with
    inf or NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.max(np.abs(V), axis=1, initial=0)
        ok = (t > 0) & np.isfinite(t)
        scaled = t * np.linalg.norm(V / np.where(ok, t, 1)[:, None], axis=1)
    return np.where(ok, scaled, np.where(t == 0, 0.0, np.inf)).astype(V.dtype, copy=False)


def _kernel_norm(W0, A, B, scaling):
    """The active backend's row norms, with under/overflowed rows recomputed."""
    n = _backend.kernels().column_norm(W0, A, B, scaling)
    _rescue_extreme_rows(n, W0, A, B, scaling)
    return n


def column_norm(W0, A, B, scaling, *, allow_zero_norm=True, policy="consistent"):
    """Row norms of V = W0 + s * B @ A, without forming V (paper's ||V||_c).

    The paper's column norm is the row norm of a PyTorch (out, in) weight:
    one value per output channel.

    Parameters
    ----------
    W0 : ndarray, shape (out, in), float32, float64, float16 or bfloat16
    A : ndarray, shape (r, in), W0's dtype, or float32 with a float16/bfloat16 W0
    B : ndarray, shape (out, r), A's dtype
    scaling : float
        s = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA).
    allow_zero_norm : bool, default True
        If False, a zero row raises ``ValueError``.
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 W0: the float32 norm of the exactly upcast
        weights ("consistent"; also "peft" with float32 A and B, PEFT's
        autocast), or PEFT's norm in lp with lp A, B: ``lp(||lp(W0 + lp(s *
        lp(B @ A)))||)``. Ignored for float32/float64.

    Returns
    -------
    n : ndarray, shape (out,)
        The dtype of W0; float32 for a float16/bfloat16 W0, except under
        "peft" with lp A (then W0's dtype).

    Raises
    ------
    TypeError, ValueError
        On bad dtypes or shapes, NaN/Inf in the weights, or (if not allowed)
        a zero row.

    Notes
    -----
    Matches PEFT ``DoraLinearLayer.get_weight_norm``:
    ``torch.linalg.norm(W + s * B @ A, dim=1)`` with no epsilon.
    """
    from .precision import LOW_PRECISION_DTYPES, check_policy

    check_policy(policy)
    allow_zero_norm = check_flag("allow_zero_norm", allow_zero_norm)
    W0, A, B, _, _ = check_adapter(W0, A, B, low_precision=True)
    scaling = check_scaling(scaling)
    if W0.dtype in LOW_PRECISION_DTYPES:
        from . import lowp

        return lowp.column_norm(W0, A, B, scaling, allow_zero_norm, policy)
    n = _kernel_norm(W0, A, B, scaling)
    check_norm(n, W0, allow_zero_norm, A, B, scaling)
    return n


def init_magnitude(W0, A, B, scaling, *, policy="consistent"):
    """PEFT's magnitude initialisation: m = ||W0 + s * B @ A||_row.

    With PEFT's default init (B = 0) this is the row norms of W0, so the
    layer starts as the base layer (paper Sec. 4.1).

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    scaling : float
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 W0. "consistent": ``column_norm`` rounded
        once to A's dtype, so that g = m / n == 1 exactly at init. "peft":
        PEFT's init, which computes the norm in lp before it upcasts the
        adapter: ``lp(||lp(W0 + lp(s * lp(B @ A)))||)``, then in A's dtype
        (with float32 A, g = m / n differs from 1 by up to one lp unit
        roundoff at init: PEFT's quirk, reproduced).

    Returns
    -------
    magnitude : ndarray, shape (out,), A's dtype

    Raises
    ------
    TypeError, ValueError
        As ``column_norm``.

    Notes
    -----
    Matches PEFT ``DoraLinearLayer.update_layer``.
    """
    from .precision import LOW_PRECISION_DTYPES, check_policy

    check_policy(policy)
    if getattr(W0, "dtype", None) in LOW_PRECISION_DTYPES:
        from . import lowp

        W0, A, B, _, _ = check_adapter(W0, A, B, low_precision=True)
        return lowp.init_magnitude(W0, A, B, check_scaling(scaling), policy)
    return column_norm(W0, A, B, scaling)
