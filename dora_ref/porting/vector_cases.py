"""What the golden vectors contain: the case matrix, how inputs are drawn, the tolerances.

``dora_ref.porting.vectors`` generates and writes the files from these: each
entry of ``CASES`` is one configuration (a linear layer, several adapters,
a convolution, an embedding), drawn from a seed of its own name in each
dtype of ``DTYPES`` (and ``LP_DTYPES``), and each expected output carries
the tolerance its computation allows (``dora_ref.porting.tolerance``).
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from ..core import functional as F
from .cases import term_scales
from .tolerance import dora_reduction_length, is_low_precision, rtol

SEED = 2402  # arXiv:2402.09353
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float64")
#: the low-precision storage dtypes (base in lp, adapters float32: PEFT's autocast_adapter_dtype=True)
LP_DTYPES = ("bfloat16", "float16")
ALL_DTYPES = DTYPES + LP_DTYPES
#: inputs stored in the lp dtype (the rest, A, B, the magnitude, are float32 holding what they hold)
LP_INPUTS = ("x", "W0", "bias", "dy", "dropout_mask")
#: expected outputs stored in the lp dtype (n and the adapters' gradients are float32)
LP_OUTPUTS = ("y", "dx", "W_merged", "W0_unmerged")
#: where ``dora-ref vectors`` writes the low-precision set (its own manifest.json)
LP_SUBDIR = "low_precision"
#: what the low-precision manifest adds to the header
LOW_PRECISION_NOTE = dict(
    low_precision=(
        "bfloat16 / float16 cases follow dora_ref's 'consistent' rule: the inputs x, W0, bias, dy (and "
        "dropout_mask) hold and are stored in the case's dtype; A and B hold values of that dtype stored "
        "float32, the magnitude is float32 (PEFT's autocast_adapter_dtype=True keeps adapters float32). "
        "Each expected value is the float32 computation on the exactly upcast inputs; y, dx, W_merged and "
        "W0_unmerged are rounded once (round to nearest, ties to even) to the case's dtype, weight_norm and "
        "the adapters' gradients stay float32. W0_unmerged is the unmerge of the rounded W_merged. bfloat16 "
        "arrays are stored in the .npz as their uint16 bits (widen: bits << 16 as float32); the manifest "
        "gives their dtype as bfloat16. See docs/low_precision.md"
    ),
    tolerance_policy_low_precision=(
        "an expected array with R > 0 roundings to bfloat16 / float16 behind it has atol = rtol * scale + "
        "SAFETY * R * (half the smallest subnormal), rtol = rtol(dtype, k, roundings=R) = SAFETY * (R u + "
        "2 gamma_k(float32)), u = 2**-8 (bfloat16) or 2**-11 (float16). Linear cases: R is what "
        "dora_ref.porting.testing uses for a low-precision port, the larger of the consistent rule's count "
        "and PEFT 0.21's mixed-precision count (tolerance.ROUNDINGS: y 3, dx 4, W_merged 1, W0_unmerged 2 "
        "(the merged weight's rounding, then its own), dmagnitude 2 (float32, from PEFT's two roundings of "
        "x @ W0.T + bias and its difference with bias; its scale adds sum_N |dy| |bias| / n for them), "
        "weight_norm, dA, dB 0), so that both conventions pass by the manifest alone. Conv, embedding and "
        "several adapters: the consistent rule, R = 1 for an array stored in lp (2 for W0_unmerged). "
        "R = 0: float32's tolerance"
    ),
)
#: (case, dtype) pairs not generated, and why
LP_SKIPPED = {("linear_large_scale", "float16"): "its weights of 1e6 are past float16's largest value, 65504"}

# ---------------------------------------------------------------------------
# the case matrix
# ---------------------------------------------------------------------------


def _linear(name, doc, tags, **kw):
    spec = dict(kind="linear", name=name, doc=doc, tags=tags, N=4, in_features=16, out_features=12,
                r=4, lora_alpha=8.0, use_rslora=False, bias=True, B="random", magnitude="trained",
                weight_scale=1.0, cancel=False, dropout_p=0.0, fan_in_fan_out=False, batch=None)
    spec.update(kw)
    return spec


#: The matrix: each entry is generated in float32 and in float64.
CASES = (
    _linear("linear_basic", "a generic trained adapter: forward, both backwards, merge/unmerge",
            ["forward", "backward", "merge"]),
    _linear("linear_init", "PEFT's initial state: B = 0 and m = ||W0||_row, so y is the base output",
            ["B=0", "init"], B="zero", magnitude="init"),
    _linear("linear_r1", "rank 1", ["r=1"], N=3, in_features=10, out_features=7, r=1),
    _linear("linear_out1", "a single output channel", ["out=1"], in_features=9, out_features=1, r=2),
    _linear("linear_r_gt_min", "rank 8 above min(out, in) = 3", ["r>min(out,in)"],
            in_features=5, out_features=3, r=8),
    _linear("linear_magnitude_far", "a trained magnitude 1/30 to 30 times the initial norm",
            ["trained magnitude far from init"], magnitude="far"),
    _linear("linear_cancelling", "W0 = -s*B@A + 1e-3*E: each row of V is ~1e-3 of its terms",
            ["nearly-cancelling W0 + s*B@A"], cancel=True),
    _linear("linear_large_scale", "W0 and B scaled by 1e6", ["large weights"], weight_scale=1e6),
    _linear("linear_tiny_scale", "W0 and B scaled by 1e-6", ["tiny weights"], weight_scale=1e-6),
    _linear("linear_dropout", "training with lora_dropout = 0.25: PEFT's formula, given mask",
            ["dropout"], N=5, dropout_p=0.25),
    _linear("linear_fan_in_fan_out", "W0 stored (in, out) as transformers' Conv1D; W_merged too",
            ["fan_in_fan_out"], in_features=10, out_features=6, fan_in_fan_out=True),
    _linear("linear_rslora", "rsLoRA: s = lora_alpha / sqrt(r) = 12 / 3", ["rsLoRA"],
            r=9, lora_alpha=12.0, use_rslora=True),
    _linear("linear_no_bias", "no base bias", ["no bias"], bias=False),
    _linear("linear_batched", "x of shape (2, 3, in): leading dimensions are batch", ["batched x"],
            N=6, batch=(2, 3)),
    _linear("linear_wide", "past one tile on every axis: N 67, in 127, out 97, r 33, each odd, so that a "
            "kernel tiled by 8, 16, 32 or 64 over any axis has a ragged last tile",
            ["wide", "ragged tiles"], N=67, in_features=127, out_features=97, r=33, lora_alpha=66.0),
    _linear("linear_wide_no_bias", "out > in, no bias: N 71, in 67, out 79, r 17 (primes: ragged tails of "
            "tiles 8, 16, 32, 64 over N, in and out, of 8 and 16 over r)",
            ["wide", "ragged tiles", "no bias"], N=71, in_features=67, out_features=79, r=17, lora_alpha=34.0,
            bias=False),
    _linear("linear_wide_aligned", "every size whole tiles: N 64, in 128, out 64, r 16, for a kernel whose path "
            "for whole tiles (taken when a size is a multiple of 8) differs from its ragged one",
            ["wide", "whole tiles"], N=64, in_features=128, out_features=64, r=16, lora_alpha=24.0),
    dict(kind="multi_adapter", name="multi_adapter", tags=["several adapters"],
         doc="two DoRA adapters on one layer (r = 2 then 3), eval: PEFT 0.21's chaining and merge",
         N=4, in_features=8, out_features=6, ranks=(2, 3), lora_alphas=(4.0, 3.0)),
    dict(kind="conv", name="conv1d", tags=["conv"], doc="Conv1d 3 -> 4, k = 3, stride 2, padding 1",
         N=2, in_channels=3, out_channels=4, kernel_size=(3,), spatial=(7,), stride=2, padding=1,
         r=2, lora_alpha=4.0),
    dict(kind="conv", name="conv2d", tags=["conv"], doc="Conv2d 3 -> 5, 3x3, padding 1",
         N=2, in_channels=3, out_channels=5, kernel_size=(3, 3), spatial=(4, 5), stride=1, padding=1,
         r=2, lora_alpha=4.0),
    dict(kind="embedding", name="embedding", tags=["embedding"],
         doc="Embedding V = 11, D = 6, r = 3; repeated ids; norm over the vocabulary",
         num_embeddings=11, embedding_dim=6, r=3, lora_alpha=6.0, ids_shape=(2, 5), embed_scale=None),
    dict(kind="embedding", name="embedding_scaled", tags=["embedding", "embed_scale"],
         doc="as embedding, with embed_scale = sqrt(D) (Gemma; PEFT >= 0.18)",
         num_embeddings=11, embedding_dim=6, r=3, lora_alpha=6.0, ids_shape=(2, 5),
         embed_scale=math.sqrt(6.0)),
)

GRADS = ("dx", "dA", "dB", "dmagnitude")

#: What each expected array is, for the manifest.
FORMULAS = {
    "y": "the forward output: g * (x @ W0.T + s * (x @ A.T) @ B.T) + bias, g = magnitude / weight_norm "
         "(with dropout_mask: x @ W0.T + bias + (g - 1) * (xd @ W0.T) + g * s * (xd @ A.T) @ B.T)",
    "weight_norm": "n = ||W0 + s * B @ A|| per row of the (out, in) weight: one per output channel",
    "dx": "dL/dx for L = sum(dy * y)",
    "dA": "dL/dA", "dB": "dL/dB", "dmagnitude": "dL/dmagnitude",
    "W_merged": "diag(magnitude / weight_norm) (W0 + s * B @ A), in the layout W0 is stored in",
    "W0_unmerged": "unmerge(W_merged, ..., weight_norm): W0 recovered from the merged weight",
}


# ---------------------------------------------------------------------------
# drawing the inputs
# ---------------------------------------------------------------------------


def _rng(seed, name):
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _scaling(r, alpha, rslora=False):
    return alpha / math.sqrt(r) if rslora else alpha / r


def _draw_linear(spec, rng):
    N, i, o, r = spec["N"], spec["in_features"], spec["out_features"], spec["r"]
    s = _scaling(r, spec["lora_alpha"], spec["use_rslora"])
    ws = spec["weight_scale"]
    x = rng.standard_normal((N, i))
    A = rng.standard_normal((r, i)) / math.sqrt(i)
    B = ws * rng.standard_normal((o, r)) if spec["B"] == "random" else np.zeros((o, r))
    W0 = ws * rng.standard_normal((o, i)) / math.sqrt(i)
    if spec["cancel"]:
        W0 = -s * (B @ A) + 1e-3 * W0
    bias = rng.standard_normal(o) if spec["bias"] else None
    dy = rng.standard_normal((N, o))
    factor = {"init": np.ones(o), "trained": 2.0 ** rng.uniform(-1, 1, o),
              "far": 30.0 ** rng.uniform(-1, 1, o)}[spec["magnitude"]]
    mask = None
    if spec["dropout_p"]:
        mask = (rng.random((N, i)) >= spec["dropout_p"]) / (1.0 - spec["dropout_p"])
    return dict(x=x, W0=W0, A=A, B=B, factor=factor, bias=bias, dy=dy, mask=mask, s=s)


def _cast(a, dtype):
    return None if a is None else np.ascontiguousarray(a, dtype=dtype)


def _caster(dtype, lp):
    """How a generator casts its float64 draws: to ``dtype``, or first to the lp storage dtype
    (so that every input holds an lp value) and then to float32, the dtype the case is computed in."""
    if lp is None:
        return lambda a: _cast(a, dtype)
    return lambda a: None if a is None else _cast(_cast(a, lp), dtype)


def _magnitude(W0, A, B, s, factor):
    """m = ||W0 + s*B@A||_row (of the weights in their own dtype), times a trained factor."""
    return (F.column_norm(W0, A, B, s) * factor.astype(W0.dtype)).astype(W0.dtype)


# ---------------------------------------------------------------------------
# tolerances
# ---------------------------------------------------------------------------


def _kappa(W0, A, B, s):
    c = [np.asarray(a, dtype=np.float64) for a in (W0, A, B)]
    T = np.abs(c[0]) + abs(s) * (np.abs(c[2]) @ np.abs(c[1]))
    n = np.linalg.norm(c[0] + s * (c[2] @ c[1]), axis=1)
    return float(np.max(np.linalg.norm(T, axis=1) / n, initial=1.0))


_K_WHY = {
    "weight_norm": "in + r: (B @ A) over r, then the sum of squares over in",
    "y": "in + r: x @ A.T over in, then @ B.T over r",
    "dx": "out + r: dz @ B over out, then @ A over r",
    "dA": "N + in + out + r: dg sums N rows of (in + r)-term products, then products over out",
    "W_merged": "in + r: the norm, then one product over r",
    "W0_unmerged": "2 (in + r): a merge, then its inverse",
}


def _tolerance(name, dtype, k, scale, kappa, note="", lp_bias=False):
    rt = rtol(dtype, k)
    base = name.split("_")[0] if name.startswith("d") else name
    why = (f"rtol({dtype}, k = {k}) with k = {_K_WHY.get(base, _K_WHY['dA'])}; scale = the terms "
           f"on absolute values, cancellation factor kappa = {kappa:.3g}{note}")
    if base == "dmagnitude":
        why += ("; plus sum_N |dy| |bias| / n (without dropout), for x @ W0.T recovered as "
                "(x @ W0.T + bias) - bias (PEFT)")
        if lp_bias:
            why += (", and in the scale once more with weight 1: PEFT's lp(lp(x @ W0.T + bias) - bias) "
                    "rounds terms of size |z| + |bias| twice to the storage dtype "
                    "(dora_ref.porting.cases.term_scales, as the checker)")
    return dict(atol=rt * scale if scale > 0 else 0.0, rtol=rt, k=int(k), scale=scale, why=why)


def _linear_tolerances(case, names, extra_k=0, extra_scale=1.0, note="", dtype=None):
    """Tolerances of the linear view ``case`` for each requested output name.

    ``dtype`` (default the case's) is the dtype of ``rtol``; a low-precision ``case`` (x, W0, bias, dy
    in bfloat16 / float16) computed in float32 passes ``dtype="float32"``: its scales are then the
    checker's for that case (``term_scales`` adds PEFT's two lp roundings of the bias recovery to
    dmagnitude's), and ``vectors._round_outputs`` adds the lp roundings to ``rtol``.
    """
    N, i, o, r = case.shapes()
    dt = str(case.dtype) if dtype is None else str(dtype)
    lp_bias = is_low_precision(case.dtype) and case.bias is not None
    kappa = _kappa(case.W0, case.A, case.B, case.scaling)
    tols = {}
    for detach in (True, False):
        scales = term_scales(case, detach_norm=detach)
        for name in names:
            base = name.replace("_detached", "").replace("_exact", "")
            if base in GRADS and name.endswith("_detached") != detach:
                continue
            if base not in GRADS and not detach:
                continue
            k = dora_reduction_length(base, n_rows=N, in_features=i, out_features=o, r=r)
            sc = scales[base]
            if base == "dx":
                k, sc = k + extra_k, sc * extra_scale
            tols[name] = _tolerance(name, dt, k, sc, kappa, note if base == "dx" else "", lp_bias=lp_bias)
    return tols
