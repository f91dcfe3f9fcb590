"""Conformance checks for DoRA's other layers: Embedding, Conv1d / Conv2d, chained adapters.

Both layers are DoRA on a linear layer (see ``dora_ref.core.embedding`` and
``dora_ref.core.conv``), and the checks use that:

* an embedding lookup ``E[ids]`` is ``onehot(ids) @ E``: the linear layer
  with x = onehot(ids) (N, V), W0 = E.T (D, V), A = lora_embedding_A (r, V),
  B = lora_embedding_B (D, r), m (D,) -- the norm taken over the vocabulary;
  ``embed_scale`` multiplies the whole output;
* a convolution is the linear layer on the patch matrix of x (``im2col``):
  x = P (N * prod(L_out), in * prod(k)), W0 the dense flattened kernel (with
  groups > 1 its block-diagonal dense form), A = lora_A flattened, B the
  dense (out, r) form of the grouped 1x1 lora_B.

The expected outputs come from the layer's own functional API in float64
(``embedding_dora_forward`` / ``embedding_merge``, ``conv_dora_forward``),
the tolerances from ``testing.tolerances`` of the linear view (the same
derivation as the linear checks: one-hot rows and patch rows are just the
x of that view; zeros of a grouped kernel add nothing to the term scales,
and only lengthen k, so the bound stays an upper bound), and the known
variants from ``variants.evaluate`` on the linear view, mapped back
to the layer's shapes, plus the layer's own (``embed_scale`` left off the
DoRA term). Cases are drawn and shrunk by hypothesis, and a mismatch is
diagnosed on a few probes, as for the linear checks.

Several adapters active on one linear layer (PEFT 0.21) are checked against
``dora_ref.formats.peft.chain_forward``, with a tolerance of their own
(``_chain_tolerance``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import diagnosis as _D
from . import variants as _V
from ..core import conv as _conv
from ..core import embedding as _emb
from ..core import im2col as _im2col
from .tolerance import rtol


@dataclass
class LayerCase:
    """One evaluation of an Embedding or a Conv DoRA layer.

    Attributes
    ----------
    layer : {"embedding", "conv"}
    arrays : dict
        The port's inputs, in the layer's own shapes and the case's dtype
        (see ``check_embedding_forward`` / ``check_conv_forward``).
    linear : testing.Case
        The same layer as a linear layer (one-hot rows, or patch rows), in
        the case's dtype.
    params : dict
        The parameters that built it (``make_embedding_case`` /
        ``make_conv_case``).
    """

    layer: str
    arrays: dict
    linear: object
    params: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.linear.dtype

    def describe(self):
        p = self.params
        if self.layer == "chain":
            kinds = ["LoRA" if (p["lora_mask"] >> i) & 1 else "DoRA" for i in range(p["adapters"])]
            words = [f"N={p['N']}, in={p['in_features']}, out={p['out_features']}, "
                     f"adapters {' -> '.join(kinds)} (ranks {[m['A'].shape[0] for m in self.arrays['adapters']]}, "
                     f"scalings {[round(m['scaling'], 4) for m in self.arrays['adapters']]})",
                     f"dtype={p['dtype']}", "bias" if p["bias"] else "no bias"]
            if p["weight_scale"] != 1.0:
                words.append(f"weight scale {p['weight_scale']:g}")
            return ", ".join(words) + f", magnitude {p['magnitude']}; rebuild it with " \
                f"dora_ref.porting.testing.make_chain_case(**{p!r})"
        if self.layer == "embedding":
            words = [f"N={p['N']} ids, V={p['num_embeddings']}, D={p['embedding_dim']}, r={p['r']}",
                     f"dtype={p['dtype']}, scaling={p['scaling']:g}, embed_scale={p['embed_scale']:g}",
                     f"padding_idx={self.arrays['padding_idx']}"]
            maker = "make_embedding_case"
        else:
            words = [f"Conv{p['ndim']}d N={p['N']}, in={p['in_channels']}, out={p['out_channels']}, "
                     f"kernel={p['kernel_size']}, stride={p['stride']}, padding={p['padding']}, "
                     f"dilation={p['dilation']}, groups={p['groups']}, L={p['length']}, r={p['r']}",
                     f"dtype={p['dtype']}, scaling={p['scaling']:g}",
                     "bias" if p["bias"] else "no bias"]
            maker = "make_conv_case"
        words += ["B = 0" if p["B_zero"] else "B random", f"magnitude {p['magnitude']}"]
        if p["weight_scale"] != 1.0:
            words.append(f"weight scale {p['weight_scale']:g}")
        return ", ".join(words) + f"; rebuild it with dora_ref.porting.testing.{maker}(**{p!r})"


def _magnitude(n64, magnitude, rng, dtype):
    factor = 2.0 ** rng.uniform(-2, 2, n64.shape[0])
    if magnitude == "trained":
        n64 = n64 * factor
    elif magnitude != "init":
        raise ValueError(f"magnitude must be 'init' or 'trained', got {magnitude!r}")
    return np.ascontiguousarray(n64, dtype=dtype)


def _linear_case(x, W0, A, B, m, scaling, bias, rng, params):
    from .cases import Case

    dy = rng.standard_normal((x.shape[0], W0.shape[0])).astype(W0.dtype)
    return Case(np.ascontiguousarray(x), np.ascontiguousarray(W0), np.ascontiguousarray(A),
                np.ascontiguousarray(B), m, float(scaling), bias, dy, None, dict(params))


def make_embedding_case(N=3, num_embeddings=5, embedding_dim=4, r=2, *, dtype="float64", scaling=2.0,
                        embed_scale=1.0, padding_idx=False, B_zero=False, magnitude="trained",
                        weight_scale=1.0, seed=0):
    """Build an embedding ``LayerCase`` deterministically (PEFT's layout).

    Parameters
    ----------
    N, num_embeddings, embedding_dim, r : int
        Ids looked up, V, D and the rank, all >= 1.
    dtype : {"float64", "float32"}
    scaling, embed_scale : float
    padding_idx : bool
        True: the port gets ``padding_idx`` = the first id looked up (a
        forward value it must not change); False: None.
    B_zero : bool
    magnitude : {"init", "trained"}
        "init": m = ||E.T + s*B@A||_row (over the vocabulary); "trained":
        that times a factor in [0.25, 4) per dimension.
    weight_scale : float
        Multiplies E and B.
    seed : int

    Returns
    -------
    LayerCase
    """
    params = dict(N=N, num_embeddings=num_embeddings, embedding_dim=embedding_dim, r=r, dtype=str(np.dtype(dtype)),
                  scaling=scaling, embed_scale=embed_scale, padding_idx=padding_idx, B_zero=B_zero,
                  magnitude=magnitude, weight_scale=weight_scale, seed=seed)
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    V, D = num_embeddings, embedding_dim
    ids = rng.integers(0, V, N).astype(np.int64)
    E = (weight_scale * rng.standard_normal((V, D))).astype(dtype)
    A = rng.standard_normal((r, V)).astype(dtype)
    B = (weight_scale * rng.standard_normal((D, r)) / np.sqrt(r)).astype(dtype)
    if B_zero:
        B[:] = 0
    n64 = np.linalg.norm(E.T.astype(np.float64) + scaling * (B.astype(np.float64) @ A.astype(np.float64)), axis=1)
    m = _magnitude(n64, magnitude, rng, dtype)
    onehot = np.zeros((N, V), dtype=dtype)
    onehot[np.arange(N), ids] = 1
    linear = _linear_case(onehot, E.T, A, B, m, scaling, None, rng, params)
    arrays = dict(ids=ids, weight=E, lora_embedding_A=A, lora_embedding_B=B, magnitude=m,
                  scaling=float(scaling), embed_scale=float(embed_scale),
                  padding_idx=int(ids[0]) if padding_idx else None)
    return LayerCase("embedding", arrays, linear, params)


def make_conv_case(N=2, in_channels=2, out_channels=3, kernel_size=2, r=2, *, ndim=1, stride=1, padding=0,
                   dilation=1, groups=1, length=4, dtype="float64", scaling=2.0, bias=True, B_zero=False,
                   magnitude="trained", weight_scale=1.0, seed=0):
    """Build a Conv1d / Conv2d ``LayerCase`` deterministically (PEFT's layout).

    Parameters
    ----------
    N, in_channels, out_channels, kernel_size, r : int
        in, out and r divisible by ``groups``; the kernel is square in 2-D.
    ndim : {1, 2}
    stride, padding, dilation, groups : int
        As ``torch.nn.ConvNd`` (zero padding), the same on every axis.
    length : int
        The spatial size of x on every axis (the output must be non-empty).
    dtype, scaling, bias, B_zero, magnitude, weight_scale, seed
        As ``testing.make_case``.

    Returns
    -------
    LayerCase
    """
    params = dict(N=N, in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, r=r,
                  ndim=ndim, stride=stride, padding=padding, dilation=dilation, groups=groups, length=length,
                  dtype=str(np.dtype(dtype)), scaling=scaling, bias=bias, B_zero=B_zero, magnitude=magnitude,
                  weight_scale=weight_scale, seed=seed)
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("r", r)):
        if v % groups:
            raise ValueError(f"{name} = {v} is not divisible by groups = {groups}")
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    k = (kernel_size,) * ndim
    K = kernel_size ** ndim
    x = rng.standard_normal((N, in_channels) + (length,) * ndim).astype(dtype)
    fan_in = in_channels // groups * K
    W = (weight_scale * rng.standard_normal((out_channels, in_channels // groups) + k) / np.sqrt(fan_in)).astype(dtype)
    A = (rng.standard_normal((r, in_channels) + k) / np.sqrt(in_channels * K)).astype(dtype)
    B = (weight_scale * rng.standard_normal((out_channels, r // groups) + (1,) * ndim)).astype(dtype)
    if B_zero:
        B[:] = 0
    b = rng.standard_normal(out_channels).astype(dtype) if bias else None
    W0f, Af, Bf = _im2col._flat(W, A, B, groups)
    n64 = np.linalg.norm(W0f.astype(np.float64) + scaling * (Bf.astype(np.float64) @ Af.astype(np.float64)), axis=1)
    m = _magnitude(n64, magnitude, rng, dtype)
    geom = _im2col.ConvGeometry.make(k, stride, padding, dilation, groups)
    P, out_spatial = _im2col.im2col(x, geom)
    linear = _linear_case(P, W0f, Af, Bf, m, scaling, b, rng, params)
    arrays = dict(x=x, weight=W, lora_A=A, lora_B=B, magnitude=m, scaling=float(scaling), bias=b,
                  stride=stride, padding=padding, dilation=dilation, groups=groups, out_spatial=out_spatial)
    return LayerCase("conv", arrays, linear, params)


def make_chain_case(N=3, in_features=4, out_features=5, r=2, *, adapters=2, lora_mask=0, dtype="float64",
                    bias=True, magnitude="trained", weight_scale=1.0, seed=0):
    """Build a ``LayerCase`` of several adapters active on one linear layer (PEFT 0.21).

    Parameters
    ----------
    N, in_features, out_features : int
    r : int
        The largest rank; each adapter's rank is drawn in 1..r.
    adapters : int
        How many adapters are active, in order.
    lora_mask : int
        Bit i set: adapter i is plain LoRA (no magnitude).
    dtype, bias, weight_scale, seed
        As ``testing.make_case``; each adapter's scaling is drawn from
        {2, 1/2, 1/3, 8}.
    magnitude : {"init", "trained"}
        Each DoRA adapter's m: ||W0 + s_i B_i A_i||_row, times a factor in
        [0.25, 4) per channel when "trained".

    Returns
    -------
    LayerCase
    """
    params = dict(N=N, in_features=in_features, out_features=out_features, r=r, adapters=adapters,
                  lora_mask=lora_mask, dtype=str(np.dtype(dtype)), bias=bias, magnitude=magnitude,
                  weight_scale=weight_scale, seed=seed)
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, in_features)).astype(dtype)
    W0 = (weight_scale * rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(dtype)
    b = rng.standard_normal(out_features).astype(dtype) if bias else None
    mods = []
    for i in range(adapters):
        ri = int(rng.integers(1, r + 1))
        s = float(rng.choice([2.0, 0.5, 1.0 / 3.0, 8.0]))
        A = (rng.standard_normal((ri, in_features)) / np.sqrt(in_features)).astype(dtype)
        B = (weight_scale * rng.standard_normal((out_features, ri)) / np.sqrt(ri)).astype(dtype)
        m = None
        if not (lora_mask >> i) & 1:
            n64 = np.linalg.norm(W0.astype(np.float64) + s * (B.astype(np.float64) @ A.astype(np.float64)), axis=1)
            m = _magnitude(n64, magnitude, rng, dtype)
        mods.append(dict(A=A, B=B, magnitude=m, scaling=s))
    first = mods[0]
    m0 = first["magnitude"] if first["magnitude"] is not None else np.ones(out_features, dtype)
    linear = _linear_case(x, W0, first["A"], first["B"], m0, first["scaling"], b, rng, params)
    return LayerCase("chain", dict(x=x, W0=W0, bias=b, adapters=mods), linear, params)


# ---------------------------------------------------------------------------
# the reference, its tolerances, and the variants on the linear view
# ---------------------------------------------------------------------------


def reference(check, case):
    """Expected outputs (float64) of ``check`` ("embedding_forward", "embedding_merge", "conv_forward")."""
    a = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
         for k, v in case.arrays.items()}
    if check == "embedding_forward":
        y, _ = _emb.embedding_dora_forward(a["ids"], a["weight"], a["lora_embedding_A"], a["lora_embedding_B"],
                                           a["magnitude"], a["scaling"], embed_scale=a["embed_scale"],
                                           padding_idx=a["padding_idx"])
        return dict(y=y)
    if check == "embedding_merge":
        W, _ = _emb.embedding_merge(a["weight"], a["lora_embedding_A"], a["lora_embedding_B"], a["magnitude"],
                                    a["scaling"])
        return dict(W_merged=W)
    if check == "conv_forward":
        y, _ = _conv.conv_dora_forward(a["x"], a["weight"], a["lora_A"], a["lora_B"], a["magnitude"], a["scaling"],
                                       a["bias"], stride=a["stride"], padding=a["padding"],
                                       dilation=a["dilation"], groups=a["groups"])
        return dict(y=y)
    if check == "chain_forward":
        from ..formats.peft import ModuleAdapter, chain_forward

        mods = [ModuleAdapter("chain", m["A"].astype(np.float64), m["B"].astype(np.float64),
                              None if m["magnitude"] is None else m["magnitude"].astype(np.float64),
                              m["scaling"], m["A"].shape[0], m["scaling"] * m["A"].shape[0])
                for m in case.arrays["adapters"]]
        b = None if a["bias"] is None else a["bias"]
        return dict(y=chain_forward(a["x"], a["W0"], b, mods))
    raise ValueError(check)


def _chain_forward(case, norm_from):
    """The chained forward in float64 with each DoRA adapter's norm taken from ``norm_from``.

    "bare": W0 (PEFT 0.21, ``peft.chain_forward``); "merged": the weight the
    adapters before it give when merged in order; "independent": from W0,
    but each adapter's correction computed on the bare base output and
    summed (the running result not fed forward).
    """
    a = case.arrays
    x, W0 = a["x"].astype(np.float64), a["W0"].astype(np.float64)
    z0 = x @ W0.T
    y, W = z0, W0
    for mod in a["adapters"]:
        A, B, s = mod["A"].astype(np.float64), mod["B"].astype(np.float64), mod["scaling"]
        low_rank = s * ((x @ A.T) @ B.T)
        if mod["magnitude"] is None:
            y, W = y + low_rank, W + s * (B @ A)
            continue
        base = W if norm_from == "merged" else W0
        V = base + s * (B @ A)
        g = mod["magnitude"].astype(np.float64) / np.linalg.norm(V, axis=1)
        if norm_from == "independent":  # each adapter's DoRA correction on the bare base, summed
            y = y + (g - 1.0) * z0 + g * low_rank
        else:
            y = g * (y + low_rank)
        W = g[:, None] * (W + s * (B @ A))
    return y if a["bias"] is None else y + a["bias"].astype(np.float64)


def _chain_tolerance(case):
    """The chained forward's tolerance: ``rtol(dtype, k)`` times a running term scale.

    ``S_0 = |x| @ |W0|.T``; a LoRA adapter adds ``L_i = |s_i| (|x| @ |A_i|.T)
    @ |B_i|.T``; a DoRA adapter gives ``S_i = |g_i| (1 + kappa_i) (S_{i-1} +
    L_i)``, kappa_i = ||T_i||_row / n_i with T_i = |W0| + |s_i| |B_i| |A_i|
    (the norm's relative error is gamma times kappa, as for one adapter,
    ``testing.term_scales``), and the bias adds |b|. k = in + the largest
    rank + 2 per adapter (its multiplication and its addition).
    """
    from .tolerance import rtol as _rtol

    a = case.arrays
    x, W0 = np.abs(a["x"].astype(np.float64)), a["W0"].astype(np.float64)
    S = x @ np.abs(W0).T
    r_max = 1
    for mod in a["adapters"]:
        A, B, s = mod["A"].astype(np.float64), mod["B"].astype(np.float64), abs(mod["scaling"])
        r_max = max(r_max, A.shape[0])
        L = s * ((x @ np.abs(A).T) @ np.abs(B).T)
        if mod["magnitude"] is None:
            S = S + L
            continue
        T = np.abs(W0) + s * (np.abs(B) @ np.abs(A))
        n = np.linalg.norm(W0 + mod["scaling"] * (B @ A), axis=1)
        safe = np.where(n > 0, n, 1.0)
        g = np.abs(mod["magnitude"].astype(np.float64)) / safe
        kappa = np.linalg.norm(T, axis=1) / safe
        S = g * (1.0 + kappa) * (S + L)
    if a["bias"] is not None:
        S = S + np.abs(a["bias"].astype(np.float64))
    k = W0.shape[1] + r_max + 2 * len(a["adapters"])
    scale = float(np.max(S, initial=0.0))
    rt = _rtol(case.dtype, k)
    return dict(atol=rt * scale if scale > 0 else 0.0, rtol=rt, k=k, scale=scale, dtype=str(case.dtype))


def tolerances(check, case):
    """The tolerance of each output: the linear view's (``testing.tolerances``).

    ``embed_scale`` adds one multiplication: y's tolerance is that of the
    linear view with k + 1, times |embed_scale|.
    """
    from .cases import tolerances as linear_tolerances

    if check == "chain_forward":
        return dict(y=_chain_tolerance(case))
    tols = linear_tolerances(case.linear)
    if check == "embedding_forward":
        t = dict(tols["y"])
        es = abs(case.arrays["embed_scale"])
        t["rtol"] = rtol(case.dtype, t["k"] + 1)
        t["k"] += 1
        t["scale"] *= es
        t["atol"] = t["rtol"] * t["scale"]
        return dict(y=t)
    if check == "embedding_merge":
        return dict(W_merged=tols["W_merged"])
    return dict(y=tols["y"])


def _chain_variant(norm_from):
    return lambda case: dict(y=_chain_forward(case, norm_from))


def _several_dora(case):
    return sum(m["magnitude"] is not None for m in case.arrays["adapters"]) >= 2


def _to_layer(check, case, lin):
    """A linear-view output dict in the layer's shapes."""
    if check == "embedding_forward":
        return dict(y=lin["y"] * case.arrays["embed_scale"])
    if check == "embedding_merge":
        return dict(W_merged=np.ascontiguousarray(lin["W_merged"].T))
    return dict(y=_im2col._rows_to_channels_first(lin["y"], case.arrays["x"].shape[0], case.arrays["out_spatial"]))


def _embed_scale_not_on_lora(case):
    """y = g * (embed_scale * E[ids] + s * A.T[ids] @ B.T): PEFT before 0.18."""
    c = case.linear.astype(np.float64)
    n = np.linalg.norm(c.W0 + c.scaling * (c.B @ c.A), axis=1)
    g = c.magnitude / n
    es = case.arrays["embed_scale"]
    return dict(y=g * (es * (c.x @ c.W0.T) + c.scaling * ((c.x @ c.A.T) @ c.B.T)))


def _peft_grouped_conv_norm(case):
    """PEFT 0.21's conv forward with groups > 1: its norm mixes output channels.

    PEFT's ``_DoraConvNdLayer.get_weight_norm`` forms the delta as
    ``(lora_B.view(-1, r) @ lora_A.view(r, -1)).view(W0.shape)``: for a grouped
    lora_B (out, r/groups, 1, ...) that is an (out/groups, in * prod(k))
    product reshaped into the (out, in/groups, *k) kernel. The output is
    g * (conv(x, W0) + s * lora_B(lora_A(x))) + b with g = m / that norm.
    """
    a = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
         for k, v in case.arrays.items()}
    W, A, B = a["weight"], a["lora_A"], a["lora_B"]
    r = A.shape[0]
    delta = (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(W.shape)
    out = W.shape[0]
    n_peft = np.linalg.norm((W + a["scaling"] * delta).reshape(out, -1), axis=1)
    W0f, Af, Bf = _im2col._flat(W, A, B, a["groups"])
    n_true = np.linalg.norm(W0f + a["scaling"] * (Bf @ Af), axis=1)
    m = a["magnitude"] * n_true / n_peft  # the reference with this m has g = m / n_peft
    y, _ = _conv.conv_dora_forward(a["x"], W, A, B, m, a["scaling"], a["bias"], stride=a["stride"],
                                   padding=a["padding"], dilation=a["dilation"], groups=a["groups"])
    return dict(y=y)


def _peft_conv_dilation_dropped(case):
    """PEFT 0.21's conv forward with dilation > 1: lora_A is built without the base's dilation.

    Its low-rank path then has another output size; PyTorch broadcasting
    joins the two where one of them has length 1 (else PEFT raises).
    """
    a = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
         for k, v in case.arrays.items()}
    W0f, Af, Bf = _im2col._flat(a["weight"], a["lora_A"], a["lora_B"], a["groups"])
    g = a["magnitude"] / np.linalg.norm(W0f + a["scaling"] * (Bf @ Af), axis=1)
    base = _im2col.conv_nd(a["x"], a["weight"], None, stride=a["stride"], padding=a["padding"],
                         dilation=a["dilation"], groups=a["groups"])
    low = _im2col.conv_nd(a["x"], a["lora_A"], None, stride=a["stride"], padding=a["padding"])
    low = _im2col.conv_nd(low, a["lora_B"], None, groups=a["groups"])
    shape = (1, -1) + (1,) * (a["x"].ndim - 2)
    y = g.reshape(shape) * (base + a["scaling"] * low)  # raises where PEFT raises
    return dict(y=y if a["bias"] is None else y + a["bias"].reshape(shape))


def _square(case):
    return case.linear.W0.shape[0] == case.linear.W0.shape[1]


#: check -> [(hint key, linear-variant overrides or a function of the case, condition)]
LAYER_VARIANTS = {
    "embedding_forward": [
        ("embedding_norm_axis", dict(norm="col"), _square),
        ("scaling_outside_norm", dict(norm="no_scaling"), None),
        ("norm_of_W0", dict(norm="W0"), None),
        ("norm_plus_eps", dict(eps="eps"), None),
        ("no_magnitude", dict(g="one"), None),
        ("embed_scale_not_on_lora", _embed_scale_not_on_lora, lambda c: c.arrays["embed_scale"] != 1.0),
    ],
    "embedding_merge": [
        ("embedding_merge_without_magnitude", dict(merge="without_magnitude"), None),
        ("merge_without_norm", dict(merge="without_norm"), None),
        ("embedding_norm_axis", dict(norm="col"), _square),
        ("scaling_outside_norm", dict(norm="no_scaling"), None),
        ("norm_of_W0", dict(norm="W0"), None),
    ],
    "chain_forward": [
        ("chain_norm_of_merged_weight", _chain_variant("merged"), lambda c: len(c.arrays["adapters"]) >= 2),
        ("chain_not_fed_forward", _chain_variant("independent"), _several_dora),
    ],
    "conv_forward": [
        ("norm_axis", dict(norm="col"), _square),
        ("scaling_outside_norm", dict(norm="no_scaling"), None),
        ("norm_of_W0", dict(norm="W0"), None),
        ("norm_plus_eps", dict(eps="eps"), None),
        ("no_magnitude", dict(g="one"), None),
        ("bias_scaled", dict(bias="scaled"), lambda c: c.linear.bias is not None),
        ("peft_grouped_conv_norm", _peft_grouped_conv_norm, lambda c: c.arrays["groups"] > 1),
        ("peft_conv_dilation_dropped", _peft_conv_dilation_dropped,
         lambda c: c.arrays["dilation"] > 1 and c.params["kernel_size"] > 1),
    ],
}


def _candidates(check, case):
    """(key, detail, outputs) for each variant that applies to the case."""
    out = []
    c64 = case.linear.astype(np.float64)
    for key, over, cond in LAYER_VARIANTS[check]:
        if cond is not None and not cond(case):
            continue
        if callable(over):
            try:
                with np.errstate(all="ignore"):
                    out.append((key, "", over(case)))
            except ValueError:  # the variant itself fails on this case (e.g. PEFT's shapes do not broadcast)
                pass
            continue
        epsilons = [None]
        if over.get("eps") == "eps":
            epsilons = [float(np.finfo(case.dtype).eps) if e is None else e for e in _V.EPSILONS]
        for eps in epsilons:
            spec = dict(_V.BASE, **over)
            if eps is not None:
                spec["eps"] = eps
            with np.errstate(all="ignore"):
                lin = _V.evaluate(c64, spec, True)
            out.append((key, "" if eps is None else f"eps = {eps:.3g}", _to_layer(check, case, lin)))
    return out


# ---------------------------------------------------------------------------
# calling the port
# ---------------------------------------------------------------------------


def call_port(check, fn, case):
    """Call the port on copies of the case's arrays; return its outputs as float arrays."""
    from .conventions import WroteInput, checked_output, first

    a = case.arrays
    copies = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a.items()}
    if check == "embedding_forward":
        out = fn(copies["ids"], copies["weight"], copies["lora_embedding_A"], copies["lora_embedding_B"],
                 copies["magnitude"], copies["scaling"], copies["embed_scale"], copies["padding_idx"])
        name = "y"
    elif check == "embedding_merge":
        out = fn(copies["weight"], copies["lora_embedding_A"], copies["lora_embedding_B"], copies["magnitude"],
                 copies["scaling"])
        name = "W_merged"
    elif check == "chain_forward":
        adapters = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in mod.items()}
                    for mod in a["adapters"]]
        out = fn(copies["x"], copies["W0"], copies["bias"], adapters)
        for mod, got in zip(a["adapters"], adapters):
            for k, v in mod.items():
                if isinstance(v, np.ndarray) and not np.array_equal(v, got[k], equal_nan=True):
                    raise WroteInput(f"your {check} wrote to an adapter's {k}: ports must not modify their arguments")
        name = "y"
    else:
        out = fn(copies["x"], copies["weight"], copies["lora_A"], copies["lora_B"], copies["magnitude"],
                 copies["scaling"], copies["bias"], copies["stride"], copies["padding"], copies["dilation"],
                 copies["groups"])
        name = "y"
    for k, v in a.items():
        if isinstance(v, np.ndarray) and not np.array_equal(v, copies[k], equal_nan=True):
            raise WroteInput(f"your {check} wrote to its input {k}: ports must not modify their arguments")
    source = "weight" if isinstance(a.get("weight"), np.ndarray) else "W0"
    return {name: checked_output(check, name, first(out), a[source].dtype, source).astype(np.float64)}


# ---------------------------------------------------------------------------
# diagnosis
# ---------------------------------------------------------------------------


def _probes(check, case):
    p = dict(case.params)
    if case.layer == "embedding":
        sq = dict(p, N=4, num_embeddings=5, embedding_dim=5, r=2, B_zero=False, magnitude="trained",
                  weight_scale=1.0, seed=7, embed_scale=p["embed_scale"] if p["embed_scale"] != 1.0 else 3.0)
        make = make_embedding_case
        label = "a square case (V = D = 5, embed_scale != 1)"
    elif case.layer == "chain":
        sq = dict(p, N=3, in_features=5, out_features=5, r=2, adapters=3, lora_mask=0, bias=True,
                  magnitude="trained", weight_scale=1.0, seed=7)
        make = make_chain_case
        label = "three DoRA adapters (in = out = 5)"
    else:
        # in * prod(k) = out: the flattened kernel is square
        sq = dict(p, N=2, in_channels=2, out_channels=2 * 2 ** p["ndim"], kernel_size=2, r=2, stride=1, padding=1,
                  dilation=1, groups=1, length=4, bias=True, B_zero=False, magnitude="trained", weight_scale=1.0,
                  seed=7)
        make = make_conv_case
        label = "a square case (in * prod(kernel) = out)"
    probes = [("the shrunk case", case), (label, make(**sq)),
              ("that case with weights scaled by 1e-6 (norms ~1e-6)", make(**dict(sq, weight_scale=1e-6)))]
    if case.layer == "conv" and p["groups"] > 1:  # a geometry the shrunk case needed is kept in a probe
        probes.append(("a grouped case (groups = 2, in = out = 4, r = 4)",
                       make(**dict(sq, in_channels=4, out_channels=4, r=4, groups=2, padding=0))))
    if case.layer == "conv" and p["dilation"] > 1:
        probes.append(("a dilated case (dilation 2, kernel 2, length 3)",
                       make(**dict(sq, dilation=2, kernel_size=2, padding=0, length=3))))
    return probes


def diagnose(check, fn, case):
    """Rank the layer's known variants by how well they explain the port (as ``diagnosis``).

    A variant is kept when, on every probe where the port ran, the port
    matches it within the tolerance, and on at least one probe it differs
    from dora_ref; ranked by the number of such probes, then by fit.
    """
    runs, raised = [], []
    for label, probe in _probes(check, case):
        try:
            got = call_port(check, fn, probe)
        except Exception as exc:  # noqa: BLE001 - a probe the port cannot run says something too
            raised.append(f"on {label} it raised {type(exc).__name__}: {exc}")
            continue
        runs.append((label, probe, got, reference(check, probe), tolerances(check, probe)))
    names = tuple(reference(check, case))
    best = {}
    for label, probe, got, ref, tols in runs:
        for key, detail, _ in _candidates(check, probe):
            best.setdefault((key, detail), None)
    scored = []
    for key, detail in best:
        support, contradicted, fits, evidence = 0, False, [], []
        for label, probe, got, ref, tols in runs:
            var = next((o for k, d, o in _candidates(check, probe) if (k, d) == (key, detail)), None)
            if var is None:
                continue
            told = _D._ratio(var, ref, tols, names)
            fit = _D._ratio(got, var, tols, names)
            if told <= 1.0:
                contradicted |= fit > 1.0
                continue
            if fit <= 1.0:
                support += 1
                fits.append(fit)
                evidence.append(f"on {label}: the variant differs from dora_ref by {_D._fmt(told)} x the "
                                f"tolerance; the port matches it (worst error / tolerance {_D._fmt(fit)})")
            else:
                contradicted = True
        if support and not contradicted:
            scored.append((-support, float(np.mean(fits)), key, detail, evidence))
    scored.sort(key=lambda t: t[:2])
    out, seen = [], set()
    for neg_support, _, key, detail, evidence in scored:
        if key in seen:  # norm_plus_eps: the best epsilon only
            continue
        seen.add(key)
        out.append(_D.Diagnosis(key, len(out) + 1, "matches", -neg_support, tuple(evidence + raised), detail))
    return out


def output_names(check):
    return ("W_merged",) if check == "embedding_merge" else ("y",)


def conv_strategy(st, dtype, fixed=None):
    """Hypothesis strategy for ``make_conv_case``'s parameters (output always non-empty).

    ``fixed``: parameter -> strategy, replacing the default one; channels
    and rank stay multiples of groups, and the length keeps the output
    non-empty, whatever is fixed.
    """
    fixed = fixed or {}

    @st.composite
    def draw(draw_):
        def pick(name, default):
            return draw_(fixed.get(name, default))

        groups = pick("groups", st.sampled_from([1, 2]))
        k = pick("kernel_size", st.integers(1, 3))
        padding = pick("padding", st.integers(0, 2))
        dilation = pick("dilation", st.integers(1, 2))
        span = dilation * (k - 1) + 1
        p = dict(
            N=pick("N", st.integers(1, 3)),
            in_channels=pick("in_channels", st.integers(1, 3).map(lambda v: groups * v)),
            out_channels=pick("out_channels", st.integers(1, 3).map(lambda v: groups * v)),
            kernel_size=k, r=pick("r", st.integers(1, 2).map(lambda v: groups * v)),
            ndim=pick("ndim", st.sampled_from([1, 2])), stride=pick("stride", st.integers(1, 2)), padding=padding,
            dilation=dilation, groups=groups,
            length=pick("length", st.integers(0, 3).map(lambda v: max(1, span - 2 * padding) + v)),
            dtype=str(np.dtype(dtype)), scaling=pick("scaling", st.sampled_from([2.0, 0.5, 1.0 / 3.0, 8.0])),
            bias=pick("bias", st.booleans()), B_zero=pick("B_zero", st.booleans()),
            magnitude=pick("magnitude", st.sampled_from(["trained", "init"])),
            weight_scale=pick("weight_scale", st.sampled_from([1.0, 1e-3, 1e3])),
            seed=pick("seed", st.integers(0, 2 ** 16)),
        )
        return p

    return draw()


def embedding_strategy(st, dtype, fixed=None):
    """Hypothesis strategy for ``make_embedding_case``'s parameters (``fixed`` as ``conv_strategy``)."""
    fields = dict(
        N=st.integers(1, 6), num_embeddings=st.integers(1, 8), embedding_dim=st.integers(1, 8),
        r=st.integers(1, 6), dtype=st.just(str(np.dtype(dtype))),
        scaling=st.sampled_from([2.0, 0.5, 1.0 / 3.0, 8.0]),
        embed_scale=st.sampled_from([1.0, 3.0, 0.125, math.sqrt(5.0)]), padding_idx=st.booleans(),
        B_zero=st.booleans(), magnitude=st.sampled_from(["trained", "init"]),
        weight_scale=st.sampled_from([1.0, 1e-3, 1e3]), seed=st.integers(0, 2 ** 16),
    )
    fields.update(fixed or {})
    return st.fixed_dictionaries(fields)


_CONV_PARAMS = ("N", "in_channels", "out_channels", "kernel_size", "r", "ndim", "stride", "padding", "dilation",
                "groups", "length", "scaling", "bias", "B_zero", "magnitude", "weight_scale", "seed")
_EMBEDDING_PARAMS = ("N", "num_embeddings", "embedding_dim", "r", "scaling", "embed_scale", "padding_idx", "B_zero",
                     "magnitude", "weight_scale", "seed")


def chain_strategy(st, dtype, fixed=None):
    """Hypothesis strategy for ``make_chain_case``'s parameters (``fixed`` as ``conv_strategy``)."""
    fields = dict(
        N=st.integers(1, 6), in_features=st.integers(1, 8), out_features=st.integers(1, 8), r=st.integers(1, 4),
        adapters=st.integers(1, 3), lora_mask=st.integers(0, 7), dtype=st.just(str(np.dtype(dtype))),
        bias=st.booleans(), magnitude=st.sampled_from(["trained", "init"]),
        weight_scale=st.sampled_from([1.0, 1e-3, 1e3]), seed=st.integers(0, 2 ** 16),
    )
    fields.update(fixed or {})
    return st.fixed_dictionaries(fields)


_CHAIN_PARAMS = ("N", "in_features", "out_features", "r", "adapters", "lora_mask", "bias", "magnitude",
                 "weight_scale", "seed")


def make_case(check, params):
    if check.startswith("embedding"):
        return make_embedding_case(**params)
    return make_chain_case(**params) if check == "chain_forward" else make_conv_case(**params)


def as_strategy(st, key, value):
    """A ``cases=`` entry as a hypothesis strategy: a strategy, a list / tuple / range of values, or one value."""
    if hasattr(value, "example") and hasattr(value, "map"):  # a hypothesis strategy
        return value
    if isinstance(value, (list, tuple, range)):
        if len(value) == 0:
            raise ValueError(f"cases[{key!r}] is empty")
        return st.sampled_from(list(value))
    return st.just(value)


def strategy(check, st, dtype, cases: Optional[dict]):
    """The check's case strategy, restricted by ``cases`` (parameter -> value, list, or strategy)."""
    embedding = check.startswith("embedding")
    known = _EMBEDDING_PARAMS if embedding else _CHAIN_PARAMS if check == "chain_forward" else _CONV_PARAMS
    fixed = {}
    for key, value in (cases or {}).items():
        if key not in known:
            raise ValueError(f"cases= has an unknown parameter {key!r}; the {check} cases take {sorted(known)}")
        fixed[key] = as_strategy(st, key, value)
    if check == "chain_forward":
        return chain_strategy(st, dtype, fixed)
    return embedding_strategy(st, dtype, fixed) if embedding else conv_strategy(st, dtype, fixed)
