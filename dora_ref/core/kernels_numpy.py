"""NumPy twins of the C kernels: the readable definition of each fused step.

Each function here has a C twin in ``csrc/`` with the same arguments and
results; ``dora_ref.set_backend`` picks one. The functional core
(``dora_ref.core.functional``) calls only these steps plus BLAS products, so
this file and its C twin are all that differs between backends.

Layout, said once: weights are PyTorch ``(out, in)``. The paper's column norm
``||.||_c`` is the L2 norm of each *row* here, one value per output channel.

Nothing of size (out, in) is allocated besides the merge's output: the norm
and the merge walk W0 in blocks of rows, so the temporary ``W0 + s*B@A`` is
at most ``_BLOCK_BYTES`` at a time.

The norm forms each entry of V in the weights' dtype, as PEFT does
(``W + s * (B @ A)``), and sums the squares in float64, as the C kernel does:
a float32 row then neither loses its small entries to subnormals nor
overflows in the sum of squares (PEFT's float32 sum can do both).
"""
from __future__ import annotations

import math

import numpy as np

from ._validate import sum_squares
from .precision import LOW_PRECISION_DTYPES, upcast

_BLOCK_BYTES = 1 << 20  # 1 MiB of rows of V at a time

# column_norm, merge and unmerge accept a float16/bfloat16 W0 (resp. W_merged)
# with float32 A, B, magnitude; forward_epilogue takes out_dtype. The functional
# core reads this flag to choose a backend for low-precision weights.
LOW_PRECISION = True

# Not claimed here: B @ A is BLAS's, which this module cannot prove forms every
# product (0 * Inf) at every size; the layers check A and B for NaN/Inf before
# this backend's norm (see ``core.functional._dora_forward``, ``adapter_names``).
NORM_PROPAGATES_NON_FINITE = False

# A training forward keeps z = base + s * U @ B.T for the backward at every rank
# (``core.functional``): here the backward would form U @ B.T again with a matmul.
KEEP_Z_MIN_RANK = 0


def _rows_f32(W, rows):
    """Rows of W, upcast exactly to float32 if W is float16/bfloat16 (one block, not W)."""
    return upcast(W[rows])


def _norm_dtype(W):
    """The dtype of the norms of W's rows: float32 for a low-precision W, else W's."""
    return np.dtype(np.float32) if W.dtype in LOW_PRECISION_DTYPES else W.dtype


# Below this, a float64 norm rounds to a finite float32 (its square is < 3.4e38 ** 2): the
# cast back cannot overflow, and needs no np.errstate (about 1.5 us a call at small sizes)
_F32_SAFE_SQUARE = float(np.finfo(np.float32).max) ** 2


def _row_norms(V):
    """||V_i|| for each row of a block, squares summed in float64, result in V's dtype.

    A norm beyond the dtype's range is inf; the caller checks. The float64
    sum and square root raise no floating-point warning (``einsum`` checks
    none; ``sqrt(inf)`` is inf), so only the cast of a float32 block's norms
    back to float32 can overflow: it runs under ``np.errstate`` only when a
    sum of squares is that large, or NaN (``argmax`` finds the first NaN).
    Same bits as the cast under ``errstate`` every time (tested in
    tests/test_small_layer_fast.py).
    """
    if V.dtype == np.float64:
        return np.sqrt(np.einsum("ij,ij->i", V, V))
    V64 = V.astype(np.float64, copy=False)
    sq = np.einsum("ij,ij->i", V64, V64)
    # NaN compares False; no rows (a kernel call with out = 0): nothing to cast (argmax raises)
    if sq.size == 0 or sq.item(sq.argmax()) < _F32_SAFE_SQUARE:
        return np.sqrt(sq).astype(V.dtype)
    with np.errstate(over="ignore"):
        return np.sqrt(sq).astype(V.dtype)


def _row_blocks(out_features, in_features, itemsize, align=1):
    """Yield slices of about ``_BLOCK_BYTES`` of rows of an (out, in) matrix,
    each starting at a multiple of ``align`` rows."""
    rows = max(1, _BLOCK_BYTES // max(1, in_features * itemsize))
    rows = max(align, rows // align * align)
    for start in range(0, out_features, rows):
        yield slice(start, min(start + rows, out_features))


def column_norm(W0, A, B, scaling):
    """n_i = ||W0_i + s * B_i @ A||_2 for every output row i.

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
        float32/float64, or float16/bfloat16 with float32 A and B: then each
        block of rows is upcast exactly to float32 (no float32 copy of W0).
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    scaling : float

    Returns
    -------
    n : ndarray, shape (out,), the dtype of W0 (float32 for a float16/bfloat16 W0)

    Notes
    -----
    A raw kernel: a row whose squares are subnormal in float64 (entries below
    about 1e-154) loses digits, one above about 1e154 overflows to inf;
    ``dora_ref.column_norm`` and the layers recompute such rows scaled by their
    largest entry (``core.norm._rescue_extreme_rows``).
    """
    if W0.size * W0.itemsize <= _BLOCK_BYTES and (
            W0.dtype.char in "fd" or W0.dtype not in LOW_PRECISION_DTYPES):  # the first: cheaper
        return _row_norms(W0 + scaling * (B @ A))  # one block: the loop's operations, no loop
    n = np.empty(W0.shape[0], dtype=_norm_dtype(W0))
    for rows in _row_blocks(*W0.shape, W0.itemsize):
        V = _rows_f32(W0, rows) + scaling * (B[rows] @ A)  # PEFT: W + s * (B @ A)
        n[rows] = _row_norms(V)
    return n


def forward_epilogue(base, U, B, g, scaling, bias, out_dtype=None, out=None, z_out=None):
    """y = g * (base + s * U @ B.T) + bias, paper Eq. (5) applied to a batch.

    Parameters
    ----------
    base : ndarray, shape (N, out)
        ``x @ W0.T``, the base layer's output without bias.
    U : ndarray, shape (N, r)
        ``x @ A.T``.
    B : ndarray, shape (out, r)
    g : ndarray, shape (out,)
        ``magnitude / n``.
    scaling : float
    bias : ndarray, shape (out,), or None
        The dtype of ``base``, or float16/bfloat16 (upcast exactly).
    out_dtype : float16 or bfloat16 dtype, optional
        Round y once to it (round to nearest even) after the float32
        computation; a value past its range becomes inf (the caller refuses it).
    out : ndarray, shape (N, out), optional
        Write y here instead of into a new array: C-contiguous, writeable, of
        y's dtype (base's, or ``out_dtype``). It may be ``base`` itself (the
        eval forward overwrites the base product it owns: each element of base
        is read before the same element of y is written); any other overlap
        with an input raises ``ValueError`` (``check_epilogue_out``).
    z_out : ndarray, shape (N, out), optional
        Also write z = base + s * U @ B.T here, in base's dtype (the training
        forward keeps z for ``backward_lowrank_z``). It may be ``base``
        itself, as ``out`` may; checked as ``out`` is. Not with ``out`` or
        ``out_dtype``: y is then a new array.

    Returns
    -------
    y : ndarray, shape (N, out), base's dtype or ``out_dtype``
        ``out`` when given.

    Raises
    ------
    TypeError, ValueError
        A bad ``out`` or ``z_out`` (``check_epilogue_out``); ``z_out`` with
        ``out`` or ``out_dtype`` (``ValueError``).
    """
    if z_out is not None:
        if out_dtype is not None or out is not None:
            raise ValueError("z_out cannot be combined with out or out_dtype: the forward that "
                             "keeps z writes y (base's dtype) to a new array")
        check_epilogue_out(z_out, base, (U, B, g, bias), base.dtype, name="z_out")
        return _epilogue_z(base, U, B, g, scaling, bias, z_out)
    if out is not None:
        check_epilogue_out(out, base, (U, B, g, bias),
                           np.dtype(out_dtype) if out_dtype is not None else base.dtype)
    # y's final dtype: the sum goes to out; else y is rounded to out_dtype below
    y = _epilogue(base, U, B, g, scaling, bias, out if out_dtype is None else None)
    if out_dtype is not None:
        with np.errstate(over="ignore"):
            if out is None:
                y = y.astype(out_dtype)
            else:
                out[...] = y
                y = out
    return y


def _epilogue(base, U, B, g, scaling, bias, out):
    """``forward_epilogue``'s operations, y in base's dtype: into ``out`` (checked by the
    caller, or base itself) or, if None, a new array."""
    y = U @ B.T  # the operations of g * (base + s * (U @ B.T)), in place on one temporary
    y *= float(scaling)  # a Python float: y keeps the arrays' dtype (as in C)
    if out is not None:
        y = np.add(base, y, out=out)
    else:
        y += base
    y *= g
    if bias is not None:
        y += bias.astype(y.dtype, copy=False)
    return y


def _epilogue_z(base, U, B, g, scaling, bias, z_out):
    """``forward_epilogue`` with a checked ``z_out``: the operations of its y, z stored on the way."""
    y = U @ B.T
    y *= float(scaling)
    np.add(base, y, out=z_out)
    np.multiply(z_out, g, out=y)
    if bias is not None:
        y += bias.astype(y.dtype, copy=False)
    return y


def _forward_epilogue_keep_z(base, U, B, g, scaling, bias):
    """``forward_epilogue(base, ..., z_out=base)`` for the functional core's training forward.

    base is the caller's own (N, out) product, fresh from ``x @ W0.T``: it
    cannot overlap U, B, g or the bias, so ``check_epilogue_out`` (a few
    microseconds, noticeable at a 64x64 layer) is not run.
    """
    return _epilogue_z(base, U, B, g, scaling, bias, base)


def _forward_epilogue_over_base(base, U, B, g, scaling, bias):
    """``forward_epilogue(base, ..., out=base)`` for the functional core's eval forward.

    base is the caller's own (N, out) product, fresh from ``x @ W0.T``: it
    cannot overlap U, B, g or the bias, so ``check_epilogue_out`` is not run
    (as in ``_forward_epilogue_keep_z``).
    """
    return _epilogue(base, U, B, g, scaling, bias, base)


#: ``_forward_epilogue_flagged``'s ``where`` (as in ``dora_ref.kernels.c``)
EPILOGUE_NEW, EPILOGUE_OVER_BASE, EPILOGUE_KEEP_Z = 0, 1, 2


def _forward_epilogue_flagged(base, U, B, g, scaling, bias, where):
    """The functional core's forward epilogue, and whether y is certainly finite.

    ``where``: ``EPILOGUE_NEW`` (``forward_epilogue``), ``EPILOGUE_OVER_BASE``
    (``_forward_epilogue_over_base``) or ``EPILOGUE_KEEP_Z``
    (``_forward_epilogue_keep_z``). Returns (y, finite): finite is True when
    the sum of y's squares is (then every element is), False when the caller
    must run the exact test (``check_result_finite``). The C backend takes
    the flag from its kernel instead of this second pass over y.
    """
    if where == EPILOGUE_OVER_BASE:
        y = _forward_epilogue_over_base(base, U, B, g, scaling, bias)
    elif where == EPILOGUE_KEEP_Z:
        y = _forward_epilogue_keep_z(base, U, B, g, scaling, bias)
    else:
        y = forward_epilogue(base, U, B, g, scaling, bias)
    return y, math.isfinite(sum_squares(y))


def check_epilogue_out(out, base, others, dtype, name="out"):
    """Check ``forward_epilogue``'s ``out=`` (both backends): raise unless it can take y.

    The same checks for its ``z_out=`` (``name="z_out"``), which takes z.

    Parameters
    ----------
    out : ndarray
        Must be an ndarray of ``dtype`` and base's shape (N, out),
        C-contiguous and writeable.
    base : ndarray, shape (N, out)
        ``out`` may be base itself, element for element (the same memory,
        shape and strides): the epilogue reads each element of base before
        it writes that element of y. Any other overlap is refused.
    others : sequence of ndarray or None
        The other inputs (U, B, g, bias): ``out`` may not overlap them.
    dtype : numpy.dtype
        y's dtype.
    name : str, default "out"
        The argument's name in the messages.

    Raises
    ------
    TypeError
        ``out`` not an ndarray, or of another dtype.
    ValueError
        Another shape, not C-contiguous, read-only, or overlapping an input
        other than as base itself.
    """
    if type(out) is not np.ndarray:
        raise TypeError(f"{name} must be a numpy.ndarray or None, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have y's dtype {dtype}, got {out.dtype} (shape {out.shape})")
    if out.shape != np.shape(base):
        raise ValueError(f"{name} must have base's shape {np.shape(base)}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (shape {out.shape}, strides {out.strides})")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable (shape {out.shape} is read-only)")
    same_as_base = (
        isinstance(base, np.ndarray)
        and out.__array_interface__["data"][0] == base.__array_interface__["data"][0]
        and out.strides == base.strides
        and out.dtype == base.dtype
    )
    if not same_as_base and isinstance(base, np.ndarray) and np.may_share_memory(out, base):
        raise ValueError(
            f"{name} overlaps base other than element for element (a shifted or strided view): "
            "the epilogue would read elements of base it has already overwritten; pass base "
            "itself or a separate array"
        )
    for arg, arr in zip(("U", "B", "g", "bias"), others):
        if isinstance(arr, np.ndarray) and np.may_share_memory(out, arr):
            raise ValueError(f"{name} overlaps {arg}: y would overwrite an input it still reads")


def backward_epilogue(dy, base, U, B, g, scaling):
    """dg = sum_N dy * z and dz = dy * g, where z = base + s * U @ B.T.

    Parameters
    ----------
    dy : ndarray, shape (N, out)
    base : ndarray, shape (N, out)
    U : ndarray, shape (N, r)
    B : ndarray, shape (out, r)
    g : ndarray, shape (out,)
    scaling : float

    Returns
    -------
    dg : ndarray, shape (out,)
    dz : ndarray, shape (N, out)
    """
    return _backward_epilogue_any(dy, base, U, B, g, scaling, False, None)


def _backward_epilogue_any(dy, base, U, B, g, scaling, base_is_z, out):
    """``backward_epilogue`` (``base_is_z`` False) or ``backward_epilogue_z`` (True, ``base``
    holding z; U, B and scaling unused); ``out``: None, or ``base`` itself, over which the
    product dy * z (with z) and dz then go, element for element (the same operations in
    the same order, so the same bits)."""
    if base_is_z:
        p = np.multiply(base, dy, out=out)  # z * dy: the operands of the product below, in its order
    else:
        p = U @ B.T  # base + s * (U @ B.T), then dy * z, in place on one temporary
        p *= float(scaling)
        p += base
        p *= dy
    dg = np.add.reduce(p, axis=0)  # np.sum's own call for an ndarray, without its wrapper
    dz = np.multiply(dy, g, out=out)
    return dg, dz


def backward_lowrank(dy, base, U, B, g, scaling):
    """``backward_epilogue`` plus the backward's rank-r products.

    dg = sum_N dy * z and dz = dy * g as in ``backward_epilogue``, and the
    low-rank path's step (5) of ``dora_ref.core.functional``::

        dU = s * dz @ B       (N, r)
        dB = s * dz.T @ U     (out, r)

    The C twin computes all four in one pass over dz.

    Parameters
    ----------
    dy, base : ndarray, shape (N, out)
    U : ndarray, shape (N, r)
    B : ndarray, shape (out, r)
    g : ndarray, shape (out,)
    scaling : float

    Returns
    -------
    dg : ndarray, shape (out,)
    dz : ndarray, shape (N, out)
    dU : ndarray, shape (N, r)
    dB : ndarray, shape (out, r)
    """
    dg, dz = backward_epilogue(dy, base, U, B, g, scaling)
    return (dg, dz, *_lowrank_products(dz, U, B, scaling))


def _lowrank_products(dz, U, B, scaling):
    """Step (5)'s products of ``backward_lowrank`` and ``backward_lowrank_z``:
    dU = s * dz @ B (N, r) and dB = s * dz.T @ U (out, r), scaled in place."""
    dU = dz @ B
    dU *= float(scaling)
    dB = dz.T @ U
    dB *= float(scaling)
    return dU, dB


def backward_epilogue_z(dy, z, g):
    """dg = sum_N dy * z and dz = dy * g, with z as the training forward kept it.

    ``backward_epilogue`` when ``forward_epilogue(..., z_out=)`` stored
    z = base + s * U @ B.T (the same bits: the same operations formed it).

    Parameters
    ----------
    dy, z : ndarray, shape (N, out)
    g : ndarray, shape (out,)

    Returns
    -------
    dg : ndarray, shape (out,)
    dz : ndarray, shape (N, out)
    """
    return _backward_epilogue_any(dy, z, None, None, g, None, True, None)


def backward_lowrank_z(dy, z, U, B, g, scaling):
    """``backward_lowrank`` with z as the training forward kept it, in place of base.

    Parameters
    ----------
    dy, z : ndarray, shape (N, out)
    U : ndarray, shape (N, r)
    B : ndarray, shape (out, r)
    g : ndarray, shape (out,)
    scaling : float

    Returns
    -------
    dg : ndarray, shape (out,)
    dz : ndarray, shape (N, out)
    dU : ndarray, shape (N, r)
    dB : ndarray, shape (out, r)
    """
    dg, dz = backward_epilogue_z(dy, z, g)
    return (dg, dz, *_lowrank_products(dz, U, B, scaling))


def _backward_lowrank_any(dy, base, U, B, g, scaling, base_is_z, dz_over_base):
    """``backward_lowrank`` (``base_is_z`` False) or ``backward_lowrank_z`` (True);
    ``dz_over_base``: dz (and, with z, the product dy * z) written over ``base``, the
    functional core's own (N, out) array, which nothing reads after this call
    (``functional._take_base``), instead of into new arrays. The same bits either way."""
    dg, dz = _backward_epilogue_any(dy, base, U, B, g, scaling, base_is_z,
                                    base if dz_over_base else None)
    return (dg, dz, *_lowrank_products(dz, U, B, scaling))


def norm_gradient_products(W0, A, C):
    """The two products of W0 in the exact norm gradient: W0 @ A.T and C.T @ W0.

    ``dora_ref.core.functional.norm_gradient`` needs both (with C = c * B); the C
    twin computes them in one pass over W0 instead of two.

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
    A : ndarray, shape (r, in)
    C : ndarray, shape (out, r)

    Returns
    -------
    WAt : ndarray, shape (out, r)
        ``W0 @ A.T``.
    CtW : ndarray, shape (r, in)
        ``C.T @ W0``.
    """
    return W0 @ A.T, C.T @ W0


def merge(W0, A, B, magnitude, scaling):
    """W' = (m / n)[:, None] * (W0 + s * B @ A), with n the row norms.

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
        float32/float64, or float16/bfloat16 with float32 A, B, magnitude
        (each block of rows upcast exactly; no float32 copy of W0).
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    magnitude : ndarray, shape (out,)
    scaling : float

    Returns
    -------
    W_merged : ndarray, shape (out, in), the dtype of W0
        For a float16/bfloat16 W0, the float32 result rounded once (to
        nearest even; past the dtype's range it is inf, refused by the caller).
    n : ndarray, shape (out,), the dtype of W0 (float32 for float16/bfloat16)
        Rows with n = 0 give inf/NaN rows in W_merged; the caller checks n.
    """
    W_merged = np.empty_like(W0)
    n = np.empty(W0.shape[0], dtype=_norm_dtype(W0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for rows in _row_blocks(*W0.shape, W0.itemsize):
            V = _rows_f32(W0, rows) + scaling * (B[rows] @ A)
            n[rows] = _row_norms(V)
            W_merged[rows] = (magnitude[rows] / n[rows])[:, None] * V
    return W_merged, n


def unmerge(W_merged, A, B, factor, scaling):
    """W0 = W' / factor[:, None] - s * B @ A, the inverse of ``merge``.

    Parameters
    ----------
    W_merged : ndarray, shape (out, in)
        float32/float64, or float16/bfloat16 with float32 A, B, factor
        (each block of rows upcast exactly).
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    factor : ndarray, shape (out,)
        ``magnitude / n`` with n the norms returned by ``merge``; nonzero.
    scaling : float

    Returns
    -------
    W0 : ndarray, shape (out, in), the dtype of W_merged
        For float16/bfloat16, the float32 result rounded once.
    """
    W0 = np.empty_like(W_merged)
    if W_merged.dtype not in LOW_PRECISION_DTYPES:  # the float32/float64 loop, unchanged
        for rows in _row_blocks(*W_merged.shape, W_merged.itemsize):
            np.divide(W_merged[rows], factor[rows, None], out=W0[rows])
            W0[rows] -= scaling * (B[rows] @ A)
        return W0
    with np.errstate(over="ignore"):
        for rows in _row_blocks(*W_merged.shape, W_merged.itemsize):
            W0[rows] = _rows_f32(W_merged, rows) / factor[rows, None] - scaling * (B[rows] @ A)
    return W0
