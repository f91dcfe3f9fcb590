"""Golden test vectors for porting DoRA: ``python -m dora_ref vectors --out DIR``.

Writes one ``.npz`` per case and a ``manifest.json`` that gives, for each
case, its configuration, every array's role, shape and dtype, and for each
expected output the tolerance that applies and why. A port in any language
loads the inputs, runs, and checks ``|got - expected| <= atol`` elementwise.

The case matrix (each case in float32 and float64; ``CASES`` below)
-------------------------------------------------------------------
================================  ==================================================
case                              what it pins
================================  ==================================================
linear_basic                      forward, backward (detached and exact), merge/unmerge
linear_init                       B = 0, initial magnitude: the layer is the base layer
linear_r1 / linear_out1           r = 1; out = 1 (a single output channel)
linear_r_gt_min                   r = 8 > min(out, in) = 3
linear_magnitude_far              a trained magnitude 1/30 to 30 times the initial norm
linear_cancelling                 W0 + s*B@A nearly cancels (row norms ~1e-3 of the terms)
linear_large_scale / tiny_scale   weights scaled by 1e6 and 1e-6
linear_dropout                    PEFT's training formula with a given mask (p = 0.25)
linear_fan_in_fan_out             W0 stored (in, out), as GPT-2's Conv1D
linear_rslora                     s = lora_alpha / sqrt(r)
linear_no_bias / linear_batched   no bias; x with two leading batch dimensions
linear_wide / linear_wide_no_bias N, in, out in 67..127, r 33 and 17, odd: every tile of
                                  8/16/32/64 over any axis has a ragged tail
linear_wide_aligned               N 64, in 128, out 64, r 16: whole tiles only, a
                                  kernel's path for aligned sizes
multi_adapter                     two DoRA adapters on one layer, PEFT 0.21's chaining
conv1d / conv2d                   DoRA convolutions (stride, padding), PEFT shapes
embedding / embedding_scaled      DoRA embedding (norm over the vocabulary), embed_scale
================================  ==================================================

Where the numbers come from
---------------------------
Inputs are drawn from NumPy's PCG64 generator seeded by (seed, the case's
name), in float64 and then cast, so the float32 and float64 versions of a
case share their inputs up to rounding and are identical on every machine.
Expected values are computed by dora_ref's functional core (NumPy backend)
**in the case's dtype**, i.e. what a correct implementation in that dtype
computes; each is cross-checked against the dense definition
(``dora_ref.core.dense``, which forms V = W0 + s*B@A in full) in float64, and the
generator refuses to write a case whose cross-check exceeds its tolerance.
The manifest records the worst cross-check error / tolerance.

Files are written deterministically (fixed zip timestamps, stored without
compression, arrays in a fixed order, JSON with a fixed key order), so the
same seed regenerates them byte for byte on the same machine with the same
number of threads (BLAS splits its sums by thread); other BLAS
builds may differ in the last bits of float results, well within tolerance.

Tolerances follow ``dora_ref.porting.tolerance``: ``atol = rtol(dtype, k) * scale``,
with ``k`` the output's reduction length (``dora_reduction_length``) and
``scale`` the size of the summed terms (``dora_ref.porting.testing.term_scales``).

Low precision (bfloat16, float16)
---------------------------------
``dora-ref vectors`` also writes the same configurations in bfloat16 and
float16 into ``DIR/low_precision/`` with their own manifest (the float32 /
float64 files and their manifest are unchanged). Their inputs x, W0, bias,
dy hold and are stored in the lp dtype, A and B hold lp values stored
float32 and the magnitude is float32 (PEFT's mixed precision); the expected
values follow the "consistent" rule of docs/low_precision.md: the float32
computation on the upcast inputs, y, dx, W_merged and W0_unmerged rounded
once to the lp dtype, n and the adapters' gradients float32. Their
tolerance adds R lp roundings: ``rtol(lp, k, roundings=R)``. bfloat16
arrays are stored as their uint16 bits (``.npy`` has no bfloat16);
``load_case`` gives them back as ``ml_dtypes.bfloat16``. float16 leaves out
``linear_large_scale`` (1e6 is past its largest value, 65504).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import zipfile

import numpy as np

from .. import __version__, use_backend
from ..core import conv, dense, embedding, im2col
from ..core import functional as F
from ..formats import peft
from .cases import Case, lp_roundings
from .tolerance import SAFETY, as_dtype, rtol, underflow_error
from .vector_cases import (  # noqa: F401 (the case matrix and constants: dora_ref.porting.vectors' names)
    ALL_DTYPES,
    CASES,
    DTYPES,
    FORMAT_VERSION,
    FORMULAS,
    GRADS,
    LOW_PRECISION_NOTE,
    LP_DTYPES,
    LP_INPUTS,
    LP_OUTPUTS,
    LP_SKIPPED,
    LP_SUBDIR,
    MANIFEST,
    SEED,
    _caster,
    _draw_linear,
    _kappa,
    _linear_tolerances,
    _magnitude,
    _rng,
    _scaling,
    _tolerance,
)

# ---------------------------------------------------------------------------
# generating each kind of case
# ---------------------------------------------------------------------------


def _grad_arrays(g_det, g_exact, names=GRADS):
    out = {}
    for name in names:
        out[name + "_detached"] = getattr(g_det, name)
        out[name + "_exact"] = getattr(g_exact, name)
    return out


def _gen_linear(spec, dtype, seed, lp=None):
    cast = _caster(dtype, lp)
    d = _draw_linear(spec, _rng(seed, spec["name"]))
    s = d["s"]
    x, W0, A, B = (cast(d[k]) for k in ("x", "W0", "A", "B"))
    bias, dy, mask = cast(d["bias"]), cast(d["dy"]), cast(d["mask"])
    m = _magnitude(W0, A, B, s, d["factor"])
    batch = spec["batch"]
    x_in = x if batch is None else x.reshape(*batch, x.shape[1])
    dy_in = dy if batch is None else dy.reshape(*batch, dy.shape[1])
    mask_in = mask if (mask is None or batch is None) else mask.reshape(x_in.shape)

    y, ctx = F.dora_forward(x_in, W0, A, B, m, s, bias, dropout_mask=mask_in)
    g_det = F.dora_backward(dy_in, ctx, detach_norm=True)
    g_exact = F.dora_backward(dy_in, ctx, detach_norm=False)
    W_merged, n = F.merge(W0, A, B, m, s)
    W0_back = F.unmerge(W_merged, A, B, m, s, n)

    fifo = spec["fan_in_fan_out"]
    stored = (lambda w: np.ascontiguousarray(w.T)) if fifo else (lambda w: w)
    inputs = dict(x=x_in, W0=stored(W0))
    if bias is not None:
        inputs["bias"] = bias
    inputs.update(A=A, B=B, magnitude=m, dy=dy_in)
    if mask is not None:
        inputs["dropout_mask"] = mask_in
    expected = dict(y=y, weight_norm=n, **_grad_arrays(g_det, g_exact),
                    W_merged=stored(W_merged), W0_unmerged=stored(W0_back))

    case = Case(x, W0, A, B, m, s, bias, dy, mask)
    if lp is None:
        tols = _linear_tolerances(case, list(expected))
    else:  # the checker's scales for this lp case (x, W0, bias, dy, mask in lp), rtol from float32's sums
        lp_in = lambda a: None if a is None else a.astype(lp)  # noqa: E731 (exact: they hold lp values)
        tols = _linear_tolerances(Case(lp_in(x), lp_in(W0), A, B, m, s, lp_in(bias), lp_in(dy), lp_in(mask)),
                                  list(expected), dtype=dtype)

    # the float64 dense definition, on the float64 values of the same inputs
    c = case.astype(np.float64)
    ref = dict(y=dense.forward(c.x, c.W0, c.A, c.B, c.magnitude, s, c.bias, dropout_mask=c.dropout_mask),
               weight_norm=dense.row_norm(dense.direction(c.W0, c.A, c.B, s)),
               W_merged=stored(dense.merged_weight(c.W0, c.A, c.B, c.magnitude, s)), W0_unmerged=stored(c.W0))
    for detach, suffix in ((True, "_detached"), (False, "_exact")):
        gr = dense.backward(c.dy, c.x, c.W0, c.A, c.B, c.magnitude, s, detach_norm=detach,
                            dropout_mask=c.dropout_mask)
        ref.update({k + suffix: getattr(gr, k) for k in GRADS})
    if batch is not None:
        ref["y"] = ref["y"].reshape(y.shape)
        for sfx in ("_detached", "_exact"):
            ref["dx" + sfx] = ref["dx" + sfx].reshape(x_in.shape)

    config = dict(N=spec["N"], in_features=spec["in_features"], out_features=spec["out_features"],
                  r=spec["r"], lora_alpha=spec["lora_alpha"], use_rslora=spec["use_rslora"], scaling=s,
                  fan_in_fan_out=fifo, lora_dropout=spec["dropout_p"], bias=bias is not None)
    return config, inputs, expected, tols, ref


def _gen_multi(spec, dtype, seed, lp=None):
    cast = _caster(dtype, lp)
    rng = _rng(seed, spec["name"])
    N, i, o = spec["N"], spec["in_features"], spec["out_features"]
    x = cast(rng.standard_normal((N, i)))
    W0 = cast(rng.standard_normal((o, i)) / math.sqrt(i))
    bias = cast(rng.standard_normal(o))
    modules, inputs = [], dict(x=x, W0=W0, bias=bias)
    for j, (r, alpha) in enumerate(zip(spec["ranks"], spec["lora_alphas"])):
        A = cast(rng.standard_normal((r, i)) / math.sqrt(i))
        B = cast(rng.standard_normal((o, r)))
        s = _scaling(r, alpha)
        m = _magnitude(W0, A, B, s, 2.0 ** rng.uniform(-1, 1, o))
        modules.append(peft.ModuleAdapter(f"adapter_{j}", A, B, m, s, r, alpha))
        inputs.update({f"A_{j}": A, f"B_{j}": B, f"magnitude_{j}": m})
    y = peft.chain_forward(x, W0, bias, modules)
    W_merged = peft.merge_weight(W0, modules)
    expected = dict(y=y, W_merged=W_merged)

    # float64 dense: merged weight folded adapter by adapter, each g_i from the bare W0
    W0d, xd = W0.astype(np.float64), x.astype(np.float64)
    Wd, ya, Wa, kappa = W0d, np.abs(xd) @ np.abs(W0d).T, np.abs(W0d), 1.0
    for mod in modules:
        A, B, m = (a.astype(np.float64) for a in (mod.lora_A, mod.lora_B, mod.magnitude))
        V = dense.direction(W0d, A, B, mod.scaling)
        g = m / dense.row_norm(V)
        Wd = g[:, None] * (Wd + mod.scaling * (B @ A))
        low = abs(mod.scaling) * (np.abs(B) @ np.abs(A))
        Wa = np.abs(g)[:, None] * (Wa + low)  # the terms, on absolute values
        ya = np.abs(g) * (ya + np.abs(xd) @ low.T)
        kappa *= _kappa(W0d, A, B, mod.scaling)
    ref = dict(y=xd @ Wd.T + bias.astype(np.float64), W_merged=Wd)
    r_sum = sum(spec["ranks"])
    k = i + r_sum
    note = "; several adapters: kappa is the product of the adapters' factors, r the sum of their ranks"
    tols = dict(
        y=_tolerance("y", dtype, k, kappa * float(ya.max()) + float(np.abs(bias).max()), kappa, note),
        W_merged=_tolerance("W_merged", dtype, k, kappa * float(Wa.max()), kappa, note),
    )
    config = dict(N=N, in_features=i, out_features=o, ranks=list(spec["ranks"]),
                  lora_alphas=list(spec["lora_alphas"]), scalings=[mod.scaling for mod in modules],
                  order="adapter 0 then adapter 1", bias=True,
                  semantics="PEFT 0.21 eval: y <- x @ W0.T; y <- g_i * (y + s_i (x @ A_i.T) @ B_i.T) "
                            "for i = 0, 1; y <- y + bias; g_i = magnitude_i / ||W0 + s_i B_i A_i||_row "
                            "(bare W0). Merge: W <- diag(g_i) (W + s_i B_i A_i) in the same order")
    return config, inputs, expected, tols, ref


def _gen_conv(spec, dtype, seed, lp=None):
    cast = _caster(dtype, lp)
    rng = _rng(seed, spec["name"])
    N, C, O, r = spec["N"], spec["in_channels"], spec["out_channels"], spec["r"]
    k, L = spec["kernel_size"], spec["spatial"]
    fan_in = C * int(np.prod(k))
    x = cast(rng.standard_normal((N, C, *L)))
    W0 = cast(rng.standard_normal((O, C, *k)) / math.sqrt(fan_in))
    A = cast(rng.standard_normal((r, C, *k)) / math.sqrt(fan_in))
    B = cast(rng.standard_normal((O, r, *(1,) * len(k))))
    bias = cast(rng.standard_normal(O))
    s = _scaling(r, spec["lora_alpha"])
    n0 = conv.conv_column_norm(W0, A, B, s)
    m = (n0 * (2.0 ** rng.uniform(-1, 1, O)).astype(dtype)).astype(dtype).reshape(1, O, *(1,) * len(k))
    geo = dict(stride=spec["stride"], padding=spec["padding"])
    y, ctx = conv.conv_dora_forward(x, W0, A, B, m, s, bias, **geo)
    dy = cast(rng.standard_normal(y.shape))
    g_det = conv.conv_dora_backward(dy, ctx, detach_norm=True)
    g_exact = conv.conv_dora_backward(dy, ctx, detach_norm=False)
    W_merged, n = conv.conv_merge(W0, A, B, m, s)
    W0_back = conv.conv_unmerge(W_merged, A, B, m, s, n)
    inputs = dict(x=x, W0=W0, bias=bias, A=A, B=B, magnitude=m, dy=dy)
    expected = dict(y=y, weight_norm=n, **_grad_arrays(g_det, g_exact),
                    W_merged=W_merged, W0_unmerged=W0_back)

    # the linear view: rows of x's patches against the flattened kernels
    lin = ctx.linear
    dy_rows = np.moveaxis(dy, 1, -1).reshape(-1, O)
    case = Case(lin.x, lin.W0, lin.A, lin.B, lin.magnitude, s, bias, dy_rows, None)
    taps = int(np.prod(k))
    tols = _linear_tolerances(
        case, list(expected), extra_k=taps, extra_scale=taps,
        note=f"; conv: the linear view of x's patches (in = C*prod(k) = {fan_in}, N = rows of patches), "
             f"and dx sums up to prod(k) = {taps} overlapping patches (k + {taps}, scale x {taps})")

    c = case.astype(np.float64)
    out_spatial = y.shape[2:]
    to_y = lambda rows: np.moveaxis(rows.reshape(N, *out_spatial, O), -1, 1)  # noqa: E731
    geom = im2col.ConvGeometry.make(k, **geo)
    ref = dict(y=to_y(dense.forward(c.x, c.W0, c.A, c.B, c.magnitude, s, c.bias)),
               weight_norm=dense.row_norm(dense.direction(c.W0, c.A, c.B, s)),
               W_merged=dense.merged_weight(c.W0, c.A, c.B, c.magnitude, s).reshape(W0.shape),
               W0_unmerged=W0.astype(np.float64))
    for detach, suffix in ((True, "_detached"), (False, "_exact")):
        gr = dense.backward(c.dy, c.x, c.W0, c.A, c.B, c.magnitude, s, detach_norm=detach)
        ref["dx" + suffix] = im2col.col2im(gr.dx, x.shape, geom)
        ref["dA" + suffix] = gr.dA.reshape(A.shape)
        ref["dB" + suffix] = gr.dB.reshape(B.shape)
        ref["dmagnitude" + suffix] = gr.dmagnitude.reshape(m.shape)
    config = dict(N=N, in_channels=C, out_channels=O, kernel_size=list(k), input_spatial=list(L),
                  stride=spec["stride"], padding=spec["padding"], dilation=1, groups=1, r=r,
                  lora_alpha=spec["lora_alpha"], scaling=s, bias=True,
                  layout="PyTorch: x (N, C, *L), W0 (out, in, *k), A (r, in, *k), B (out, r, 1..), "
                         "magnitude (1, out, 1..) as PEFT stores it; n is over all of (in, *k)")
    return config, inputs, expected, tols, ref


def _gen_embedding(spec, dtype, seed, lp=None):
    cast = _caster(dtype, lp)
    rng = _rng(seed, spec["name"])
    V, D, r = spec["num_embeddings"], spec["embedding_dim"], spec["r"]
    ids = rng.integers(0, V, size=spec["ids_shape"]).astype(np.int64)
    ids.flat[-1] = ids.flat[0]  # a repeated id: its gradient accumulates
    E = cast(rng.standard_normal((V, D)))
    A = cast(rng.standard_normal((r, V)))
    B = cast(rng.standard_normal((D, r)) / math.sqrt(V))
    s = _scaling(r, spec["lora_alpha"])
    es = spec["embed_scale"]
    m = (embedding.embedding_column_norm(E, A, B, s) * (2.0 ** rng.uniform(-1, 1, D)).astype(dtype)).astype(dtype)
    y, ctx = embedding.embedding_dora_forward(ids, E, A, B, m, s, embed_scale=es)
    dy = cast(rng.standard_normal(y.shape))
    det = embedding.embedding_dora_backward(dy, ctx, detach_norm=True)
    exact = embedding.embedding_dora_backward(dy, ctx, detach_norm=False)
    W_merged, n = embedding.embedding_merge(E, A, B, m, s)
    W0_back = embedding.embedding_unmerge(W_merged, A, B, m, s, n)
    inputs = dict(ids=ids, W0=E, A=A, B=B, magnitude=m, dy=dy)
    expected = dict(y=y, weight_norm=n)
    for suffix, g in (("_detached", det), ("_exact", exact)):
        expected.update({"dA" + suffix: g[0], "dB" + suffix: g[1], "dmagnitude" + suffix: g[2]})
    expected.update(W_merged=W_merged, W0_unmerged=W0_back)

    # the linear view: one-hot rows against the (D, V) weight E.T
    onehot = np.eye(V, dtype=dtype)[ids.reshape(-1)]
    esf = 1.0 if es is None else es
    case = Case(onehot, np.ascontiguousarray(E.T), A, B, m, s, None, dy.reshape(-1, D) * _dtype_cast(esf, dtype), None)
    tols = _linear_tolerances(case, list(expected))
    if es is not None:  # embed_scale multiplies y and, through dy, every gradient: one more rounding
        for name in ("y",):
            tols[name] = _tolerance(name, str(dtype), tols[name]["k"] + 1, tols[name]["scale"] * es,
                                    _kappa(case.W0, A, B, s), f"; times embed_scale {es:.6g}")
    c = case.astype(np.float64)
    ref = dict(y=esf * dense.forward(c.x, c.W0, c.A, c.B, c.magnitude, s).reshape(y.shape),
               weight_norm=dense.row_norm(dense.direction(c.W0, c.A, c.B, s)),
               W_merged=dense.merged_weight(c.W0, c.A, c.B, c.magnitude, s).T, W0_unmerged=E.astype(np.float64))
    for detach, suffix in ((True, "_detached"), (False, "_exact")):
        gr = dense.backward(c.dy, c.x, c.W0, c.A, c.B, c.magnitude, s, detach_norm=detach)
        ref.update({"dA" + suffix: gr.dA, "dB" + suffix: gr.dB, "dmagnitude" + suffix: gr.dmagnitude})
    config = dict(num_embeddings=V, embedding_dim=D, r=r, lora_alpha=spec["lora_alpha"], scaling=s,
                  ids_shape=list(spec["ids_shape"]), embed_scale=es, padding_idx=None,
                  layout="W0 is the embedding table E (V, D); A = lora_embedding_A (r, V), "
                         "B = lora_embedding_B (D, r); the layer is DoRA on the (D, V) weight E.T: "
                         "magnitude and n have one value per embedding dimension, n over the vocabulary; "
                         "W_merged and W0_unmerged are tables (V, D); no dropout, no dx (ids are integers)")
    return config, inputs, expected, tols, ref


def _dtype_cast(value, dtype):
    """``value`` rounded to ``dtype`` (a NumPy scalar)."""
    return np.dtype(dtype).type(value)


_GENERATORS = {"linear": _gen_linear, "multi_adapter": _gen_multi, "conv": _gen_conv,
               "embedding": _gen_embedding}


# ---------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------


def npz_bytes(arrays):
    """The bytes of an ``.npz`` of ``arrays``, identical for identical arrays.

    ``numpy.savez`` stamps each member with the current time; this writes
    the same format (readable by ``numpy.load``) with a fixed timestamp and
    no compression.

    Parameters
    ----------
    arrays : dict of str to ndarray
        Written in this order.

    Returns
    -------
    bytes
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _array_entry(arr, role):
    return dict(role=role, shape=list(arr.shape), dtype=str(arr.dtype))


def _lp_base(name):
    return name.replace("_detached", "").replace("_exact", "")


def _round_outputs(spec, config, inputs, expected, tols, lp):
    """The consistent rule on a case computed in float32 from lp inputs: each lp output rounded once.

    The unmerge is recomputed from the rounded merged weight (what a port is given), so W0_unmerged
    carries two roundings (the merged weight's, its own); n and the float32 adapters' gradients stay.
    Each tolerance allows R lp roundings (``_lp_rounding_count``): for a linear case the checker's R, so
    that PEFT's mixed-precision path (three roundings of y, four of dx, two in the float32 dmagnitude)
    passes by the manifest's tolerances alone, as it passes ``testing.check_*(dtype=...)``.
    """
    out = {k: (v.astype(lp) if _lp_base(k) in LP_OUTPUTS else v) for k, v in expected.items()}
    if "W0_unmerged" in expected:
        Wm = out["W_merged"].astype(np.float32)
        A, B, m, n, s = inputs["A"], inputs["B"], inputs["magnitude"], expected["weight_norm"], config["scaling"]
        if spec["kind"] == "conv":
            back = conv.conv_unmerge(Wm, A, B, m, s, n)
        elif spec["kind"] == "embedding":
            back = embedding.embedding_unmerge(Wm, A, B, m, s, n)
        elif config.get("fan_in_fan_out"):
            back = np.ascontiguousarray(F.unmerge(np.ascontiguousarray(Wm.T), A, B, m, s, n).T)
        else:
            back = F.unmerge(Wm, A, B, m, s, n)
        out["W0_unmerged"] = back.astype(lp)
    ins = {k: (v.astype(lp) if k in LP_INPUTS else v) for k, v in inputs.items()}
    new_tols = {}
    for k, t in tols.items():
        R = _lp_rounding_count(spec["kind"], k)
        stored = _lp_base(k) in LP_OUTPUTS
        if not R:
            new_tols[k] = dict(t, dtype="float32", roundings=0,
                               why=t["why"] + "; float32 (n and the float32 adapters' gradients are not rounded)")
            continue
        rt = rtol(lp, t["k"], roundings=R)
        atol = (rt * t["scale"] if t["scale"] > 0 else 0.0) + SAFETY * R * underflow_error(lp)
        if stored:
            where = f"stored in {lp}: rtol({lp}, k, roundings={R}) = SAFETY * ({R} u + 2 gamma_k(float32))"
        else:
            where = (f"float32, from {R} roundings to {lp} on the way (PEFT's mixed precision): "
                     f"rtol({lp}, k, roundings={R}) = SAFETY * ({R} u + 2 gamma_k(float32))")
        if spec["kind"] == "linear":
            why = (f" (R = {R}: the larger of the consistent rule's count and PEFT's mixed-precision count, "
                   "tolerance.ROUNDINGS, as dora_ref.porting.testing judges a low-precision port"
                   + ("; at least 2 here: the rounded merged weight, then the unmerge's own rounding)"
                      if k == "W0_unmerged" else ")"))
        else:
            why = (" (the rounded merged weight, then the unmerge's own rounding)" if R == 2 else
                   " (float32 computation, rounded once)")
        new_tols[k] = dict(t, atol=atol, rtol=rt, dtype=str(lp) if stored else "float32", roundings=R, why=(
            t["why"].replace("rtol(float32, k", f"rtol({lp}, k", 1) + "; " + where + why
            + " + SAFETY * R * half the smallest subnormal"))
    return ins, out, new_tols


def _lp_rounding_count(kind, name):
    """R, the roundings to the storage dtype behind expected output ``name`` of a low-precision case.

    Linear cases: the checker's count (``cases.lp_roundings``: the larger of the consistent rule's and
    PEFT 0.21's mixed-precision path's, ``tolerance.ROUNDINGS``), so that a port the checker passes in
    either convention passes the vectors by their own tolerances; W0_unmerged at least 2 (the rounded
    merged weight a port is given, then its own rounding). The other kinds (conv, embedding, several
    adapters), which the checker does not take in low precision: the consistent rule (1 for an output
    stored in lp, 2 for W0_unmerged, 0 for the float32 ones).
    """
    base = _lp_base(name)
    if kind == "linear":
        R = lp_roundings(base)
        return max(R, 2) if base == "W0_unmerged" else R
    if base not in LP_OUTPUTS:
        return 0
    return 2 if base == "W0_unmerged" else 1


def _storable(arrays):
    """bfloat16 arrays as their uint16 bits (NumPy's .npy has no bfloat16; the manifest says bfloat16)."""
    return {k: (v.view(np.uint16) if v.dtype.name == "bfloat16" else v) for k, v in arrays.items()}


def generate(seed=SEED, cases=CASES, dtypes=DTYPES):
    """Compute every case of the matrix in memory.

    Parameters
    ----------
    seed : int, default ``SEED``
    cases : sequence of dict, default ``CASES``
    dtypes : sequence of str, default ("float32", "float64")
        Any of ``ALL_DTYPES``. bfloat16 / float16: the inputs x, W0, bias, dy (and a dropout mask)
        hold and are stored in that dtype, A and B hold values of it stored
        float32, the magnitude is float32; the expected values follow the
        consistent rule (the float32 computation on those inputs, each lp
        output rounded once; n and the adapters' gradients float32). A
        (case, dtype) in ``LP_SKIPPED`` is left out.

    Returns
    -------
    list of (entry, arrays)
        ``entry`` is the case's manifest entry (a dict; without the file's
        sha256), ``arrays`` a dict of name to ndarray, inputs first.

    Raises
    ------
    ValueError
        On a negative or non-integer seed, or an unknown dtype.
    RuntimeError
        If an expected value disagrees with the float64 dense definition by
        more than its tolerance (the vectors would be wrong: nothing is written).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    bad = [d for d in dtypes if d not in ALL_DTYPES]
    if bad:
        raise ValueError(f"dtypes must be among {ALL_DTYPES}, got {bad}")
    out = []
    with use_backend("numpy"):
        for spec in cases:
            for dtype in dtypes:
                if (spec["name"], dtype) in LP_SKIPPED:
                    continue
                if dtype in LP_DTYPES:
                    lp = as_dtype(dtype)
                    config, inputs, expected, tols, ref = _GENERATORS[spec["kind"]](spec, np.dtype(np.float32),
                                                                                    seed, lp)
                    inputs, expected, tols = _round_outputs(spec, config, inputs, expected, tols, lp)
                    config = dict(config, storage_dtype=dtype, adapter_dtype="float32",
                                  rule="consistent: the float32 computation on these inputs, each output "
                                       f"stored in {dtype} rounded once (n and the adapters' gradients float32)")
                else:
                    config, inputs, expected, tols, ref = _GENERATORS[spec["kind"]](spec, np.dtype(dtype), seed)
                name = f"{spec['name']}_{dtype}"
                arrays_meta = {k: _array_entry(v, "input") for k, v in inputs.items()}
                for key, value in expected.items():
                    t = tols[key]
                    err = np.abs(value.astype(np.float64) - np.asarray(ref[key], dtype=np.float64))
                    if not np.all(np.isfinite(value)):
                        raise RuntimeError(f"{name}: {key} is not finite in {value.dtype}")
                    worst = float(np.max(err, initial=0.0))
                    ratio = worst / t["atol"] if t["atol"] > 0 else (0.0 if worst == 0 else np.inf)
                    if not ratio <= 1.0:
                        raise RuntimeError(
                            f"{name}: {key} differs from the float64 dense definition by "
                            f"{float(np.max(err)):.3g} > tolerance {t['atol']:.3g}"
                        )
                    meta = _array_entry(value, "expected")
                    meta.update(formula=FORMULAS[key.replace("_detached", "").replace("_exact", "")],
                                tolerance=t, crosscheck_ratio=ratio)
                    arrays_meta[key] = meta
                entry = dict(
                    name=name, file=name + ".npz", kind=spec["kind"], dtype=dtype, description=spec["doc"],
                    tags=list(spec["tags"]) + [dtype], config=config, arrays=arrays_meta,
                )
                out.append((entry, {**inputs, **expected}))
    return out


def _manifest_header(seed):
    return dict(
        format_version=FORMAT_VERSION,
        generator=f"dora_ref {__version__}: python -m dora_ref vectors --seed {seed}",
        seed=seed,
        reference=(
            "expected values: dora_ref's functional core (numpy backend) in each case's dtype "
            "(functional.dora_forward/dora_backward/merge/unmerge; conv.conv_dora_*; "
            "embedding.embedding_dora_*; peft.chain_forward/merge_weight), cross-checked against "
            "dora_ref.core.dense (V = W0 + s*B@A formed in full) in float64; crosscheck_ratio is the "
            "worst |expected - dense| / atol"
        ),
        conventions=(
            "PyTorch/PEFT layout: W0 (out, in), A = lora_A.weight (r, in), B = lora_B.weight (out, r), "
            "magnitude = lora_magnitude_vector (out,). The paper's column norm ||.||_c is the L2 norm of "
            "each ROW of the (out, in) weight: one value per output channel. The loss is L = sum(dy * y). "
            "'_detached' gradients treat n as a constant (paper Sec. 4.3, PEFT); '_exact' ones do not "
            "(paper Eq. 6). dropout_mask holds 0 or 1/(1-p): x * dropout_mask is torch's Dropout(p)(x)."
        ),
        tolerance_policy=(
            "for each expected array: all(|got - expected| <= tolerance.atol), with "
            "atol = rtol * scale, rtol = rtol(dtype, k) = SAFETY * 2 * gamma_k (SAFETY = 4; "
            "gamma_k = k u / (1 - k u), Higham Eq. 3.5, u = eps(dtype) / 2: two evaluations of "
            "k-term sums differ by at most 2 gamma_k sum|terms|); k = the output's reduction length "
            "(dora_ref.porting.tolerance.dora_reduction_length); scale = the largest sum of |terms| "
            "(dora_ref.porting.testing.term_scales: the output evaluated on |x|, |W0| + |s||B||A|, |dy|, "
            "plus kappa * |the part proportional to g = m / n|, kappa = ||terms_i|| / n_i the "
            "cancellation factor of row i). See docs/porting.md"
        ),
    )


def write(out_dir, seed=SEED, dtypes=DTYPES):
    """Write every case's ``.npz`` and ``manifest.json`` into ``out_dir``.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Created if missing; files of the same names are overwritten.
    seed : int, default ``SEED``
    dtypes : sequence of str, default ("float32", "float64")
        ``LP_DTYPES`` for the low-precision set (``dora-ref vectors`` writes
        it into the subdirectory ``LP_SUBDIR``, with its own manifest, so
        that the float32 / float64 set and its manifest stay as they were).

    Returns
    -------
    dict
        The manifest that was written.

    Raises
    ------
    ValueError
        On a bad seed (see ``generate``).
    OSError
        If ``out_dir`` cannot be created or written (e.g. it is a file).
    """
    entries_data = generate(seed, dtypes=dtypes)  # compute first: a bad seed writes nothing
    os.makedirs(out_dir, exist_ok=True)
    manifest = _manifest_header(seed)
    if any(d in LP_DTYPES for d in dtypes):
        manifest.update(LOW_PRECISION_NOTE, generator=manifest["generator"] + f" (the {LP_SUBDIR}/ subdirectory)")
        manifest["skipped"] = [dict(name=f"{n}_{d}", why=why) for (n, d), why in LP_SKIPPED.items() if d in dtypes]
    entries = []
    for entry, arrays in entries_data:
        data = npz_bytes(_storable(arrays))
        with open(os.path.join(out_dir, entry["file"]), "wb") as f:
            f.write(data)
        entry = dict(entry, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        entries.append(entry)
    manifest["total_bytes"] = sum(e["bytes"] for e in entries)
    manifest["cases"] = entries
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8", newline="\n") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


def load_manifest(directory):
    """Read ``manifest.json`` from a vectors directory; returns the dict."""
    with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def load_case(directory, name):
    """Load one case.

    Parameters
    ----------
    directory : str or os.PathLike
    name : str
        A case name from the manifest, e.g. "linear_basic_float32".

    Returns
    -------
    entry : dict
        The case's manifest entry (config, arrays with roles and tolerances).
    arrays : dict of str to ndarray

    Raises
    ------
    KeyError
        If there is no such case (the message lists the names).
    ValueError
        If the file's sha256 does not match the manifest.
    """
    manifest = load_manifest(directory)
    entries = {e["name"]: e for e in manifest["cases"]}
    if name not in entries:
        raise KeyError(f"no case {name!r}; cases: {sorted(entries)}")
    entry = entries[name]
    path = os.path.join(directory, entry["file"])
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{path} does not match the sha256 in the manifest: regenerate the vectors")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for k, meta in entry["arrays"].items():  # bfloat16 is stored as its uint16 bits
        if meta["dtype"] == "bfloat16":
            arrays[k] = arrays[k].view(as_dtype("bfloat16"))
    return entry, arrays


def main(argv=None):
    """``python -m dora_ref vectors --out DIR [--seed N]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="dora-ref vectors",
        description="Write DoRA golden test vectors (.npz per case + manifest.json) for checking a port.",
    )
    parser.add_argument("--out", required=True, help="directory to write into (created if missing)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of every input (default {SEED})")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        manifest = write(args.out, seed=args.seed)
        low = write(os.path.join(args.out, LP_SUBDIR), seed=args.seed, dtypes=LP_DTYPES)
    except OSError as exc:
        print(f"dora-ref vectors: cannot write to {args.out!r}: {exc}", file=sys.stderr)
        return 1
    n = len(manifest["cases"])
    print(f"wrote {n} cases, {manifest['total_bytes'] / 1024:.0f} KiB, and {MANIFEST} to {args.out}; "
          f"{len(low['cases'])} low-precision cases ({', '.join(LP_DTYPES)}), {low['total_bytes'] / 1024:.0f} KiB, "
          f"and their {MANIFEST} to {os.path.join(args.out, LP_SUBDIR)}")
    return 0
