r"""DoRA for ``torch.nn.Embedding``, PEFT's convention.

An embedding lookup ``E[ids]`` is a linear layer applied to one-hot rows:
``onehot(ids) @ E``, whose PyTorch-layout weight is ``E.T`` of shape
(out, in) = (D, V). PEFT's DoRA embedding is DoRA on *that* linear layer:

=====================  ========  ================================================
symbol                 shape     PEFT name
=====================  ========  ================================================
ids                    (...)     integer token ids in [0, V)
E (weight)             (V, D)    ``base_layer.weight`` (num_embeddings, embedding_dim)
A (lora_embedding_A)   (r, V)    ``lora_embedding_A.<adapter>``
B (lora_embedding_B)   (D, r)    ``lora_embedding_B.<adapter>``
m                      (D,)      ``lora_magnitude_vector``: one value per embedding dimension
n                      (D,)      ``||E.T + s * B @ A||_row``: a norm **over the vocabulary**
y                      (..., D)
=====================  ========  ================================================

Forward (PEFT ``DoraEmbeddingVariant.forward`` + ``DoraEmbeddingLayer.forward``,
numbered as ``functional``'s, with the one-hot products done as lookups)::

    (1) U    = A.T[ids]                   (N, r)   lookup of lora_embedding_A's columns
    (2) base = E[ids]                     (N, D)   the base lookup
    (3) n    = ||E.T + s * B @ A||_row    (D,)     functional.column_norm of the (D, V) view
    (4) g    = m / n
    (5,6) y  = embed_scale * g * (base + s * U @ B.T)

* ``embed_scale`` (e.g. Gemma's sqrt(D)) multiplies the whole output, the
  DoRA term included, after the norm: PEFT >= 0.18 (PR #2839). The base
  layer's own output already carries it.
* No dropout, in training or eval (PEFT applies none to embeddings).
* ``padding_idx``: as ``F.embedding``, lookups of that id send no gradient to
  ``lora_embedding_A[:, padding_idx]``; the forward value is not changed.

Backward: the forward read in reverse, as ``functional.dora_backward``, with
the lookup's adjoint, a scatter-add into the looked-up columns of A
(repeated ids accumulate)::

    dg, dz = backward_epilogue(embed_scale * dy, ...)    dm = dg / n
    dU = s * dz @ B        dB = s * dz.T @ U        dA[:, ids] += dU.T

There is no gradient for the integer ids.

Why mlx-lm's DoRA embedding is a different layer
------------------------------------------------
mlx-lm (``mlx_lm/tuner/dora.py``, ``DoRAEmbedding``) keeps one magnitude per
*token*, ``m = ||E||`` over axis 1, shape (V,), and rescales each looked-up
row to length ``m[id]``: DoRA on ``E`` read as an (out, in) = (V, D) weight,
the tied output projection. PEFT (and dora_ref) keep one magnitude per
embedding *dimension*, shape (D,), the norm taken over the vocabulary: DoRA on
``E.T``, the weight of the lookup itself. Both are the identity at init, but
they normalise different axes, their magnitudes have different shapes and
meanings, and mlx-lm also stores ``lora_a`` (V, r) / ``lora_b`` (r, D) with a
fixed scale. A checkpoint of one cannot be loaded into the other, not even
by transposing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import backend as _backend
from . import functional as F
from ._validate import (
    WeightSnapshot,
    as_float_array,
    check_finite,
    check_flag,
    check_result_finite,
    check_scaling,
    check_weight_shape,
    dtype_mismatch,
    refuse_array_subclass,
)
from .kernels_numpy import _norm_dtype, _row_blocks, _rows_f32
from .norm import _rescue_extreme_rows, refuse_overflowed_norm
from .precision import LOW_PRECISION_DTYPES, check_policy, classify, round_to, upcast

_NAMES = ("weight", "lora_embedding_A", "lora_embedding_B", "magnitude", "bias")


def _check_embedding(weight, A, B, magnitude=None):
    weight = as_float_array("weight", weight, ndim=2, low_precision=True)
    A = as_float_array("lora_embedding_A", A, ndim=2, low_precision=True)
    B = as_float_array("lora_embedding_B", B, ndim=2, low_precision=True)
    V, D = weight.shape
    check_weight_shape("weight", weight.shape, ("embedding (num_embeddings)", "dimension"))
    r = A.shape[0]
    shapes = f"weight {weight.shape}, lora_embedding_A {A.shape}, lora_embedding_B {B.shape}"
    if r == 0 or A.shape != (r, V) or B.shape != (D, r):
        raise ValueError(
            f"expected weight (V, D), lora_embedding_A (r, V), lora_embedding_B (D, r) "
            f"with r >= 1; got {shapes}"
        )
    if magnitude is not None:
        magnitude = as_float_array("magnitude", magnitude, ndim=1, low_precision=True)
        if magnitude.shape != (D,):
            hint = (
                " (one value per token is mlx-lm's convention, not PEFT's: see "
                "dora_ref.core.embedding)" if magnitude.shape == (V,) else ""
            )
            raise ValueError(
                f"magnitude must have shape (D,) = ({D},), one value per embedding "
                f"dimension; got {magnitude.shape}{hint}"
            )
    classify(weight, A, B, magnitude, names=_NAMES)  # float16/bfloat16 rules: core.precision
    # as _validate.check_adapter: NaN/Inf in the adapter raises here (NaN/Inf
    # in the table is caught where the norm reads it)
    check_finite("lora_embedding_A", A)
    check_finite("lora_embedding_B", B)
    if magnitude is not None:
        check_finite("magnitude", magnitude)
    return weight, A, B, magnitude


def _check_ids(ids, V):
    refuse_array_subclass("ids", ids)  # np.asarray would drop a mask silently
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer array, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(
            f"ids must lie in [0, {V}) (num_embeddings = {V}); got values in "
            f"[{ids.min()}, {ids.max()}]"
        )
    return ids


def _check_embed_scale(embed_scale):
    if embed_scale is None:
        return 1.0
    return check_scaling(embed_scale, "embed_scale")


def embedding_column_norm(weight, lora_embedding_A, lora_embedding_B, scaling, *,
                          policy="consistent"):
    """n = ||E.T + s * B @ A||_row: one norm per embedding dimension, over the vocabulary.

    Parameters
    ----------
    weight : ndarray, shape (V, D), float32, float64, float16 or bfloat16
    lora_embedding_A : ndarray, shape (r, V), weight's dtype, or float32 with an lp weight
    lora_embedding_B : ndarray, shape (D, r), lora_embedding_A's dtype
    scaling : float
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 weight, as ``functional.column_norm``: the
        float32 norm, or PEFT's lp norm with lp adapters. Ignored otherwise.

    Returns
    -------
    n : ndarray, shape (D,), weight's dtype (float32 for an lp weight, but
        the lp dtype under "peft" with lp adapters)

    Raises
    ------
    TypeError, ValueError
        On bad dtypes or shapes, or NaN/Inf.

    Notes
    -----
    ``functional.column_norm`` of the (D, V) linear view E.T, computed by
    ``_vocab_block_norm`` without copying the table. Matches PEFT
    ``DoraEmbeddingLayer.get_weight_norm`` (``fan_in_fan_out=True``); at
    PEFT's init (A = 0) it is ``E.norm(dim=0)``.
    """
    check_policy(policy)
    weight, A, B, _ = _check_embedding(weight, lora_embedding_A, lora_embedding_B)
    scaling = check_scaling(scaling)
    if weight.dtype in LOW_PRECISION_DTYPES and policy == "peft" and A.dtype == weight.dtype:
        n = _peft_pure_vocab_norm(weight, A, B, scaling)
        F.check_norm(upcast(n), weight.T, allow_zero_norm=True)
        return n
    n = _embedding_norm(weight, upcast(A), upcast(B), scaling)
    F.check_norm(n, weight.T, allow_zero_norm=True)
    return n


def _peft_pure_vocab_norm(E, A, B, scaling):
    """PEFT with lp adapters: n = lp(||lp(E.T + lp(s * lp(B @ A)))||) over the vocabulary, (D,) lp.

    The squares are summed in float64 (torch: float32, sequentially over V on
    the strided view), then rounded to float32 and to lp.
    """
    lp = E.dtype
    rnd = lambda a: round_to(a, lp).astype(np.float32)  # noqa: E731
    A32, B32 = upcast(A), upcast(B)
    sumsq = np.zeros(E.shape[1], dtype=np.float64)
    for rows in _row_blocks(*E.shape, 4):
        V_rows = rnd(E[rows].astype(np.float32)
                     + rnd(np.float32(scaling) * rnd(A32[:, rows].T @ B32.T)))
        sumsq += np.einsum("vd,vd->d", V_rows, V_rows, dtype=np.float64)
    n32 = np.sqrt(sumsq).astype(np.float32)
    n = round_to(n32, lp)
    refuse_overflowed_norm(n32, n)
    return n


def _embedding_norm(E, A, B, scaling):
    """``_vocab_block_norm``, with rows whose float64 sum of squares under- or
    overflowed recomputed by scaling (``norm._rescue_extreme_rows``, on
    the (D, V) view: only those rows are read)."""
    n = _vocab_block_norm(E, A, B, scaling)
    _rescue_extreme_rows(n, E.T, A, B, scaling)
    return n


def _vocab_block_norm(E, A, B, scaling):
    """n_d = ||E.T[d] + s * (B @ A)[d]||_2, walking the (V, D) table in blocks of whole rows.

    The row-walking kernels (``kernels_numpy.column_norm`` and its C twin)
    want the (D, V) view E.T, which is not C-contiguous: their row blocks of
    E.T gather strided columns of E, and a C call copies each such block.
    Reading blocks of E's own rows instead, about
    ``_BLOCK_BYTES`` each, and summing each column's squares gives the same
    norms with no (V, D)-sized temporary. As the kernels, every entry of
    V = E + s * (B @ A).T is formed in the table's dtype (PEFT's order) and
    the squares are summed in float64; a float16/bfloat16 table is upcast
    one block at a time and gives float32 norms (A, B float32).
    """
    sumsq = np.zeros(E.shape[1], dtype=np.float64)
    for rows in _row_blocks(*E.shape, E.itemsize):
        V_rows = _rows_f32(E, rows) + scaling * (A[:, rows].T @ B.T)  # rows of (E.T + s B A).T
        V64 = V_rows.astype(np.float64, copy=False)
        sumsq += np.einsum("vd,vd->d", V64, V64)
    return np.sqrt(sumsq).astype(_norm_dtype(E))


def embedding_init_magnitude(weight, lora_embedding_A, lora_embedding_B, scaling, *,
                             policy="consistent"):
    """PEFT's magnitude init, shape (D,): ``embedding_column_norm`` (``DoraEmbeddingVariant.init``).

    For a float16/bfloat16 weight the magnitude has lora_embedding_A's dtype:
    "consistent" rounds the float32 norm once to it (g == 1 exactly at init);
    "peft" is PEFT's init, the lp norm of ``lp(E.T + lp(s * lp(B @ A)))``
    (computed before PEFT upcasts the adapter), so with float32 adapters
    g = m / n differs from 1 by up to u_lp at init, as in PEFT. Arguments,
    errors: as ``embedding_column_norm``.
    """
    check_policy(policy)
    weight, A, B, _ = _check_embedding(weight, lora_embedding_A, lora_embedding_B)
    if weight.dtype not in LOW_PRECISION_DTYPES:
        return embedding_column_norm(weight, A, B, scaling)
    scaling = check_scaling(scaling)
    if policy == "peft":
        n = _peft_pure_vocab_norm(weight, A, B, scaling)
        F.check_norm(upcast(n), weight.T, allow_zero_norm=True)
        return n.astype(A.dtype)
    n = embedding_column_norm(weight, A, B, scaling)
    m = round_to(n, A.dtype)
    refuse_overflowed_norm(n, m)
    return m


@dataclass
class EmbeddingDoRAContext:
    """What ``embedding_dora_forward`` keeps for ``embedding_dora_backward``: opaque."""

    ids: np.ndarray  # (N,)
    ids_shape: tuple
    weight: np.ndarray
    A: np.ndarray
    B: np.ndarray
    scaling: float
    embed_scale: float
    padding_idx: Optional[int]
    n: np.ndarray  # (D,)
    g: np.ndarray  # (D,)
    base: np.ndarray  # (N, D)
    U: np.ndarray  # (N, r)
    seen: Optional[WeightSnapshot] = None  # A, B, m as the forward saw them
    precision: Optional[object] = None  # lowp.Precision of a float16/bfloat16 forward


def embedding_dora_forward(
    ids,
    weight,
    lora_embedding_A,
    lora_embedding_B,
    magnitude,
    scaling,
    *,
    embed_scale=None,
    padding_idx=None,
    weight_norm=None,
    allow_zero_norm=False,
    policy="consistent",
):
    """DoRA embedding forward: y = embed_scale * g * (E[ids] + s * A.T[ids] @ B.T).

    Parameters
    ----------
    ids : int ndarray, any shape (...)
        Token ids in [0, V).
    weight : ndarray, shape (V, D), float32, float64, float16 or bfloat16
    lora_embedding_A : ndarray, shape (r, V), weight's dtype, or float32 with an lp weight
    lora_embedding_B : ndarray, shape (D, r), lora_embedding_A's dtype
    magnitude : ndarray, shape (D,), lora_embedding_A's dtype
    scaling : float
    embed_scale : float, optional
        The base layer's output scale (e.g. Gemma's), applied to the DoRA
        term too (PEFT >= 0.18). None means 1.
    padding_idx : int, optional
        Only affects the backward (no gradient to ``A[:, padding_idx]`` from lookups).
    weight_norm : ndarray, shape (D,), optional
        A precomputed ``embedding_column_norm`` of these exact weights (trusted).
    allow_zero_norm : bool, default False
        See ``functional.dora_forward``.
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 weight: the float32 forward rounded once, or
        PEFT's (mixed: ``lp(g * E[ids] + (g * l) * s)`` in float32; lp
        adapters: a rounding after each operation). "peft" accepts no
        ``embed_scale`` (not measured). Ignored for float32/float64.

    Returns
    -------
    y : ndarray, shape (..., D), weight's dtype
    ctx : EmbeddingDoRAContext

    Raises
    ------
    TypeError, ValueError
        On non-integer or out-of-range ids (or a masked ids array), bad dtypes
        or shapes, an empty table (V or D = 0; an empty ids array works),
        NaN/Inf, or a zero norm.
    NonFiniteWeightError
        A ``ValueError``: m / n overflows the dtype (``functional.magnitude_over_norm``).

    Notes
    -----
    Matches PEFT ``DoraEmbeddingVariant.forward``:
    ``g * base_layer(x) + g * s * (embed(x, A.T) @ B.T) * embed_scale``.
    """
    check_policy(policy)
    weight, A, B, magnitude = _check_embedding(weight, lora_embedding_A, lora_embedding_B, magnitude)
    if magnitude is None:
        raise TypeError("magnitude must be an array of shape (D,), got None")
    scaling = check_scaling(scaling)
    embed_scale = _check_embed_scale(embed_scale)
    V, D = weight.shape
    ids_arr = _check_ids(ids, V)
    padding_idx = _check_padding_idx(padding_idx, V)
    flat = ids_arr.reshape(-1)
    if weight.dtype in LOW_PRECISION_DTYPES:
        return _lp_forward(ids_arr, weight, A, B, magnitude, scaling, embed_scale, padding_idx,
                           weight_norm, allow_zero_norm, policy)
    kernels = _backend.kernels()

    U = A.T[flat]  # (1) (N, r)
    base = weight[flat]  # (2) (N, D)
    if weight_norm is None:
        n = _embedding_norm(weight, A, B, scaling)  # (3), no copy of the table
    else:
        n = as_float_array("weight_norm", weight_norm, ndim=1)
        if n.shape != (D,) or n.dtype != weight.dtype:
            raise ValueError(f"weight_norm must have shape ({D},) and dtype {weight.dtype}, "
                             f"got {n.shape} {n.dtype}")
    F.check_norm(n, weight.T, allow_zero_norm)
    g = F.magnitude_over_norm(magnitude, n)  # (4)
    y = kernels.forward_epilogue(base, U, B, g, scaling, None)  # (5), (6)
    if embed_scale != 1.0:
        y *= embed_scale
    # the ids cannot carry NaN in; the table can, where weight_norm was given (no norm of it
    # formed): named, not reported as an overflow (an adversary, session 22; error path only)
    check_result_finite([("y (the output)", y)], [("weight", weight)])
    seen = WeightSnapshot({"lora_embedding_A": A, "lora_embedding_B": B,
                           "lora_magnitude_vector": magnitude})
    ctx = EmbeddingDoRAContext(flat, ids_arr.shape, weight, A, B, scaling, embed_scale,
                               padding_idx, n, g, base, U, seen)
    return y.reshape(*ids_arr.shape, D), ctx


def _lp_forward(ids_arr, weight, A, B, magnitude, scaling, embed_scale, padding_idx,
                weight_norm, allow_zero_norm, policy):
    """``embedding_dora_forward`` for a float16/bfloat16 table (arguments checked).

    "consistent": steps (1)-(6) in float32 on the upcast lookups, y rounded
    once; with an lp magnitude the norm is rounded to it first (g == 1 at
    init). "peft" (``DoraEmbeddingVariant.forward``; ``op`` = PEFT's rounding
    of adapter arithmetic: none with float32 adapters, lp after each op)::

        l = op(A.T[ids] @ B.T)   g = op(m / n)
        y = lp(op(g * E[ids]) + op(op(g * l) * s))
    """
    from .lowp import Precision, _op, _store

    lp, D = weight.dtype, weight.shape[1]
    flat = ids_arr.reshape(-1)
    A32, B32, m32 = upcast(A), upcast(B), upcast(magnitude)
    pure_peft = policy == "peft" and A.dtype == lp
    if weight_norm is not None:
        n = as_float_array("weight_norm", weight_norm, ndim=1, low_precision=True)
        if n.shape != (D,) or n.dtype != magnitude.dtype:
            raise ValueError(f"weight_norm must have shape ({D},) and dtype {magnitude.dtype}, "
                             f"got {n.shape} {n.dtype}")
        n = upcast(n)
    elif pure_peft:
        n = upcast(_peft_pure_vocab_norm(weight, A, B, scaling))
    else:
        n = _embedding_norm(weight, A32, B32, scaling)
        if policy == "consistent" and A.dtype == lp:  # pure: the norm in the magnitude's dtype
            F.check_norm(n, weight.T, allow_zero_norm)
            n = upcast(round_to(n, lp))
    F.check_norm(n, weight.T, allow_zero_norm)
    g = F.magnitude_over_norm(m32, n)
    U = A32.T[flat]
    base = weight[flat].astype(np.float32)
    if policy == "consistent":
        y = _backend.kernels().forward_epilogue(base, U, B32, g, scaling, None)
        if embed_scale != 1.0:
            y *= embed_scale
        parts = None
    else:
        if embed_scale != 1.0:
            raise ValueError("embed_scale with policy='peft' on a float16/bfloat16 table is not "
                             "supported (PEFT's cast points were not measured there); use "
                             "policy='consistent'")
        op = _op(A.dtype, lp)
        g = op(g)
        lo = op(U @ B32.T)
        y = op(g * base) + op(op(g * lo) * np.float32(scaling))
        parts = dict(lo=lo)
    y = _store(y, lp, "y (the output)", [("weight", weight)])  # a NaN in the table named
    seen = WeightSnapshot({"lora_embedding_A": A, "lora_embedding_B": B,
                           "lora_magnitude_vector": magnitude})
    ctx = EmbeddingDoRAContext(flat, ids_arr.shape, weight, A32, B32, scaling, embed_scale,
                               padding_idx, n, g, base, U, seen,
                               Precision(policy, lp, A.dtype, parts))
    return y.reshape(*ids_arr.shape, D), ctx


def _lp_backward(dy, ctx, detach_norm):
    """``embedding_dora_backward`` for an lp forward: float32 steps, each gradient rounded once
    to the adapter's dtype ("consistent"), or PEFT's autograd with ``op`` after each step::

        gt = op(G s)   gl = op(gt g)   dm = op(op(sum op(gt l) + sum op(G E[ids])) / n)
        dB = op(gl.T @ U)   dU = op(gl @ B)   dA[:, ids] += dU (float32, then op)
    """
    from .lowp import _op, _store

    p = ctx.precision
    D = ctx.weight.shape[1]
    dy = as_float_array("dy", dy, low_precision=True, want=p.lp)
    if dy.shape != (*ctx.ids_shape, D):
        raise ValueError(f"dy must have the forward output's shape {(*ctx.ids_shape, D)}, "
                         f"got {dy.shape}")
    if dy.dtype != p.lp:
        raise dtype_mismatch("dy", dy.dtype, p.lp)
    dy2 = dy.reshape(-1, D).astype(np.float32)
    A, B, s = ctx.A, ctx.B, ctx.scaling
    if p.policy == "consistent":
        dy2 = dy2 * ctx.embed_scale
        dg, dz = _backend.kernels().backward_epilogue(dy2, ctx.base, ctx.U, B, ctx.g, s)
        dm = F.divide_by_norm(dg, ctx.n)
        dU = s * (dz @ B)
        dB = s * (dz.T @ ctx.U)
        dA = np.zeros_like(A)
        np.add.at(dA.T, ctx.ids, dU)
        if ctx.padding_idx is not None:
            dA[:, ctx.padding_idx] = 0
        if not detach_norm:
            dA_n, dB_n = F.norm_gradient(ctx.weight.T.astype(np.float32), A, B, s, dg, ctx.g,
                                         ctx.n)
            dA += dA_n
            dB += dB_n
    else:
        if not detach_norm:
            raise ValueError("detach_norm=False with policy='peft': PEFT detaches the norm; "
                             "use policy='consistent' for the exact gradient")
        op = _op(p.adapter, p.lp)
        red = (lambda a: a.sum(axis=0, dtype=np.float32)) if p.adapter == np.float32 else \
            (lambda a: op(a.sum(axis=0, dtype=np.float32)))
        G = dy2
        gt = op(G * np.float32(s))
        gl = op(gt * ctx.g)
        dg = op(red(op(gt * p.parts["lo"])) + red(op(G * ctx.base)))
        dm = op(F.divide_by_norm(dg, ctx.n))
        dB = op(gl.T @ ctx.U)
        dU = op(gl @ B)
        dA = np.zeros_like(A)
        np.add.at(dA.T, ctx.ids, dU)
        dA = op(dA)
        if ctx.padding_idx is not None:
            dA[:, ctx.padding_idx] = 0
    inputs = [("dy", dy)]
    return (_store(dA, p.adapter, "dA", inputs), _store(dB, p.adapter, "dB", inputs),
            _store(dm, p.adapter, "dmagnitude", inputs))


def _check_padding_idx(padding_idx, V):
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
        raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
    if not -V <= padding_idx < V:
        raise ValueError(f"padding_idx must be within num_embeddings = {V}, got {padding_idx}")
    return int(padding_idx) % V  # torch accepts a negative index the same way


def embedding_dora_backward(dy, ctx, *, detach_norm=True):
    """Gradients of a DoRA embedding (hand-derived; steps as ``functional.dora_backward``).

    Parameters
    ----------
    dy : ndarray, shape (..., D)
        dL/dy, the shape of the forward's output, same dtype.
    ctx : EmbeddingDoRAContext
        A float16/bfloat16 forward's policy applies (``_lp_backward``).
    detach_norm : bool, default True
        True: n is a constant (paper Sec. 4.3, PEFT). False: the exact gradient.

    Returns
    -------
    dA : ndarray, shape (r, V), lora_embedding_A's dtype (likewise dB, dmagnitude)
        Scatter-added into the looked-up columns; zero in ``padding_idx``'s
        column from lookups (its norm-path gradient, exact mode only, is kept).
    dB : ndarray, shape (D, r)
    dmagnitude : ndarray, shape (D,)

    Raises
    ------
    TypeError, ValueError
        If dy's dtype or shape does not match the forward's output; NaN/Inf
        in dy, or a gradient that overflowed the dtype.
    RuntimeError
        If an adapter array changed in place since the forward (as
        ``functional.dora_backward``).
    """
    detach_norm = check_flag("detach_norm", detach_norm)
    if ctx.seen is not None:
        ctx.seen.check_backward()
    if ctx.precision is not None:
        return _lp_backward(dy, ctx, detach_norm)
    E, A, B, s = ctx.weight, ctx.A, ctx.B, ctx.scaling
    D = E.shape[1]
    dy = as_float_array("dy", dy, want=E.dtype)
    if dy.shape != (*ctx.ids_shape, D):
        raise ValueError(f"dy must have the forward output's shape {(*ctx.ids_shape, D)}, "
                         f"got {dy.shape}")
    if dy.dtype != E.dtype:
        raise dtype_mismatch("dy", dy.dtype, E.dtype)
    dy2 = dy.reshape(-1, D) * ctx.embed_scale
    kernels = _backend.kernels()

    dg, dz = kernels.backward_epilogue(dy2, ctx.base, ctx.U, B, ctx.g, s)  # (6)
    dmagnitude = F.divide_by_norm(dg, ctx.n)  # (4)
    dU = s * (dz @ B)  # (5)
    dB = s * (dz.T @ ctx.U)
    dA = np.zeros_like(A)
    np.add.at(dA.T, ctx.ids, dU)  # (1): the lookup's adjoint, a scatter-add
    if ctx.padding_idx is not None:
        dA[:, ctx.padding_idx] = 0

    if not detach_norm:  # (3), as functional.dora_backward with W0 = E.T
        dA_n, dB_n = F.norm_gradient(E.T, A, B, s, dg, ctx.g, ctx.n)
        dA += dA_n
        dB += dB_n
    check_result_finite([("dA", dA), ("dB", dB), ("dmagnitude", dmagnitude)], [("dy", dy2)])
    return dA, dB, dmagnitude


def embedding_merge(weight, lora_embedding_A, lora_embedding_B, magnitude, scaling, *,
                    allow_zero_norm=False, policy="consistent"):
    """Fold the adapter in: E' = (E + s * (B @ A).T) * (m / n), scaling column j by g_j.

    Parameters
    ----------
    weight : ndarray, shape (V, D)
    lora_embedding_A : ndarray, shape (r, V)
    lora_embedding_B : ndarray, shape (D, r)
    magnitude : ndarray, shape (D,)
    scaling : float
    allow_zero_norm : bool, default False
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 table, as ``functional.merge``.

    Returns
    -------
    weight_merged : ndarray, shape (V, D), weight's dtype
        The base layer's lookup of it (times its own embed_scale) equals the
        eval forward.
    n : ndarray, shape (D,)
        Keep it for ``embedding_unmerge``.

    Notes
    -----
    ``functional.merge`` of the (D, V) view; matches PEFT
    ``DoraEmbeddingVariant.merge_safe``.
    """
    weight, A, B, magnitude = _check_embedding(weight, lora_embedding_A, lora_embedding_B, magnitude)
    if magnitude is None:
        raise TypeError("magnitude must be an array of shape (D,), got None")
    W, n = F.merge(np.ascontiguousarray(weight.T), A, B, magnitude, scaling,
                   allow_zero_norm=allow_zero_norm, policy=policy)
    return np.ascontiguousarray(W.T), n


def embedding_unmerge(weight_merged, lora_embedding_A, lora_embedding_B, magnitude, scaling, n,
                      *, policy="consistent"):
    """Recover E = E' / (m / n) - s * (B @ A).T (``functional.unmerge`` of the (D, V) view).

    Parameters as ``embedding_merge`` (``policy`` included), plus ``n`` (D,)
    from it. Returns E (V, D) in weight_merged's dtype.
    """
    weight_merged, A, B, magnitude = _check_embedding(
        weight_merged, lora_embedding_A, lora_embedding_B, magnitude
    )
    W = F.unmerge(np.ascontiguousarray(weight_merged.T), A, B, magnitude, scaling, n,
                  policy=policy)
    return np.ascontiguousarray(W.T)
