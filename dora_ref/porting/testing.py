"""Check a port of DoRA against dora_ref, in one call per operation.

Write your port in any framework, wrap it to take and return NumPy arrays,
and call::

    from dora_ref.porting import testing
    testing.check_forward(my_forward)                      # y
    testing.check_backward(my_backward, detach_norm=True)  # dx, dA, dB, dmagnitude
    testing.check_merge(my_merge, my_unmerge)              # W', then W0 back
    testing.check_init(my_init, my_forward)                # m at init; B = 0 is the base layer

Each check draws cases with hypothesis (shapes from 1 up, with or without
bias, B = 0 or random, a magnitude at its initial value or trained, several
scalings and weight scales), computes the expected outputs with dora_ref's
functional core in float64, and compares. On a mismatch hypothesis shrinks
the case to a minimal one, and the check raises ``ConformanceError`` saying
in words which output and index differ, expected vs got, the tolerance and
why, and the known variants of DoRA your numbers reproduce, ranked, with the
evidence (``.hint`` the first, ``.diagnoses`` all): the port is run again on
a few targeted cases (square, tiny norms, a large bias; when it raised, the
smallest square case, a 3-D x, other magnitude and weight layouts) and each
variant, recomputed, is kept when the port matches it wherever it differs
from DoRA (``dora_ref.porting.diagnosis``).

A port is checked as it is written: ``Convention`` (or the same fields as
keywords) says how it takes its arguments -- a magnitude (out,), (out, 1)
or, as a different layer with its own reference, (1, in); scaling as a float
or ``(lora_alpha, r, use_rslora)``; W0 stored (in, out) (fan_in_fan_out);
x of shape (batch, seq, in); unmerge with or without n; dropout as a mask or
a callable. ``report="all"`` checks each output on its own and returns
every failure; ``cases=`` restricts the drawn cases.

The signatures the checks call (arrays in the case's dtype, PyTorch layout:
weights are (out, in); the paper's column norm is the norm of each *row*,
one value per output channel)::

    forward(x, W0, A, B, magnitude, scaling, bias)                 -> y (N, out)
    backward(dy, x, W0, A, B, magnitude, scaling, bias)            -> (dx, dA, dB, dmagnitude)
    merge(W0, A, B, magnitude, scaling)                            -> W_merged (out, in)
    unmerge(W_merged, A, B, magnitude, scaling, weight_norm)       -> W0 (out, in)

``bias`` may be None. With ``dropout=True`` the forward and backward also get
``dropout_mask=`` (shape of x, 0 or 1 / (1 - p)): PEFT's training path. A
function may return a tuple whose first element is the output (as
``dora_ref.dora_forward`` and ``dora_ref.merge`` do); a backward may return a
mapping with keys ``dx``, ``dA``, ``dB``, ``dmagnitude``.

hypothesis is needed for the checks (``pip install hypothesis``); it is
imported only when a check runs.

Tolerances come from ``dora_ref.porting.tolerance``: ``rtol(dtype, k)`` with ``k``
the reduction length of the output (``dora_reduction_length``), times the
size of the summed terms (``term_scales``), so that a nearly cancelling
``W0 + s*B@A`` or a tiny weight scale is judged by the size of what was
summed, not by the size of the result. See docs/porting.md.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np

from . import conventions as _C
from . import diagnosis as _D
from . import layer_checks as _L
from . import variants as _V
from ..core import functional as F
from .tolerance import UNIT_ROUNDOFF, dora_reduction_length, gamma, rtol

__all__ = [
    "Case",
    "CheckResult",
    "ConformanceError",
    "Convention",
    "Diagnosis",
    "HINTS",
    "Report",
    "check_backward",
    "check_chain_forward",
    "check_conv_forward",
    "check_embedding_forward",
    "check_embedding_merge",
    "check_forward",
    "check_init",
    "check_merge",
    "make_case",
    "make_chain_case",
    "make_conv_case",
    "make_embedding_case",
    "reference",
    "term_scales",
    "tolerances",
]

GRAD_NAMES = _C.GRAD_NAMES
LayerCase = _L.LayerCase
make_embedding_case = _L.make_embedding_case
make_conv_case = _L.make_conv_case
make_chain_case = _L.make_chain_case
Convention = _C.Convention
Diagnosis = _D.Diagnosis

#: What each hint means. The keys are ``ConformanceError.hint``.
HINTS = {
    "norm_axis": (
        "the norm is taken over the wrong axis. DoRA's norm is one value per output "
        "channel: the L2 norm of each ROW of the (out, in) weight W0 + s*B@A, e.g. "
        "torch.linalg.norm(W0 + s * B @ A, dim=1). The paper's 'column norm' means "
        "the same thing, because the paper writes W as (in, out)."
    ),
    "scaling_outside_norm": (
        "the scaling s is left out of the norm: n must be ||W0 + s*B@A|| per row, with "
        "the same s = lora_alpha / r (or / sqrt(r)) as the low-rank term "
        "(PEFT DoraLinearLayer.get_weight_norm)."
    ),
    "norm_of_W0": (
        "the norm ignores the low-rank update: your n is ||W0|| per row, but it must be "
        "||W0 + s*B@A||, recomputed from the current A and B at every forward. The two "
        "agree only at initialisation (B = 0)."
    ),
    "bias_scaled": (
        "the bias is multiplied by the magnitude: y = g*(x@V.T + b), so in the backward "
        "dm = sum_N(dy * (x@V.T + b)) / n (torchtune's and fsdp_qlora's DoRALinear add "
        "(g - 1) * base_layer(x), bias included). The bias must be added after the "
        "scaling, y = g*(x@V.T) + b, dm = sum_N(dy * x@V.T) / n (PEFT subtracts the base "
        "bias before applying m / n, and never scales it)."
    ),
    "no_magnitude": (
        "the magnitude is not applied: your output is plain LoRA, x@(W0 + s*B@A).T + b. "
        "DoRA multiplies each output channel by g = m / ||W0 + s*B@A||_row."
    ),
    "naive_dropout": (
        "dropout is applied to the whole input, y = g*(dropout(x)@V.T) + b. PEFT's "
        "training formula feeds the clean x to the base layer and the dropped-out xd only "
        "to DoRA's correction: y = x@W0.T + b + (g - 1)*(xd@W0.T) + g*s*(xd@A.T)@B.T "
        "(PEFT DoraLinearLayer.forward; nbasyl/DoRA#2)."
    ),
    "dropout_ignored": (
        "the dropout mask is not applied: your output is the eval-mode forward."
    ),
    "norm_not_detached": (
        "your gradients are the exact ones (the norm differentiated), but the detached "
        "variant was asked for: PEFT and the paper (Sec. 4.3) treat n as a constant, "
        "i.e. n = norm(...).detach() in PyTorch. Use detach_norm=False to check the "
        "exact gradient instead."
    ),
    "norm_detached": (
        "your gradients treat the norm as a constant (detached), but the exact gradient "
        "was asked for (detach_norm=False): let the gradient flow through n (paper Eq. 6, "
        "the projection away from each row of V). Use detach_norm=True to check the "
        "detached variant (PEFT's) instead."
    ),
    "dmagnitude_missing_norm": (
        "dmagnitude is missing the division by n: dm = sum_N(dy * z) / n with "
        "z = x@V.T (paper Eq. 7); you return sum_N(dy * z), the gradient w.r.t. g."
    ),
    "grads_without_g": (
        "dA and dB are plain LoRA's gradients: they must be scaled per output channel by "
        "g = m / n, because y = g * (... + s*(x@A.T)@B.T)."
    ),
    "merge_without_magnitude": (
        "the merge leaves out the magnitude: your W' is W0 + s*B@A (what PEFT's "
        "get_delta_weight gives, and what a LoRA merge does). DoRA's merged weight is "
        "diag(m / n) (W0 + s*B@A), n the row norms of W0 + s*B@A."
    ),
    "merge_without_norm": (
        "the merge multiplies by the magnitude but does not divide by the norm: "
        "W' = diag(m / n) (W0 + s*B@A), n = ||W0 + s*B@A||_row."
    ),
    "factor_on_columns": (
        "the factor m / n scales the columns instead of the rows of the (out, in) weight, in "
        "the merge and in the unmerge (the factor laid out for a weight stored (in, out) but "
        "applied to an (out, in) one). One factor per output channel: "
        "W' = (m / n)[:, None] * V, W0 = W' / (m / n)[:, None] - s*B@A."
    ),
    "unmerge_factor_on_columns": (
        "the merge is right but the unmerge divides by m / n per column of the (out, in) "
        "weight, i.e. per ROW of a weight stored (in, out) (PEFT 0.11 to 0.20's Conv1D / "
        "fan_in_fan_out unmerge: weight / dora_factor.view(-1, 1) without transposing; "
        "fixed in PEFT PR #3532). Divide each output channel's weights by its own factor: "
        "W0 = W' / (m / n)[:, None] - s*B@A in the (out, in) layout."
    ),
    "norm_plus_eps": (
        "an epsilon is added to the norm, g = m / (n + eps) (LyCORIS adds "
        "torch.finfo(dtype).eps to its weight norm). DoRA divides by n itself; the "
        "difference is eps / n relative, so it shows only when the norms are tiny. If you "
        "need a guard against n = 0, raise or handle n = 0 alone rather than shift every n."
    ),
    "fan_in_fan_out_norm_untransposed": (
        "the weight is stored (in, out) (fan_in_fan_out, GPT-2's Conv1D) and the norm is "
        "taken of that stored weight plus s*B@A without transposing it first, "
        "n = ||W0_stored + s*B@A||_row: it runs only when in = out and is wrong there "
        "(PEFT 0.10's Conv1D DoRA, fixed in peft PR #1588). Transpose to (out, in) before "
        "adding s*B@A and taking the row norms."
    ),
    "magnitude_per_input_column": (
        "your port normalises per INPUT column: n = ||W0 + s*B@A|| over the output axis, "
        "one value per input feature, magnitude of shape (1, in), W' = V * (m / n)[None, :] "
        "(the paper's ||.||_c read on an (out, in) weight; LyCORIS with wd_on_out=False). "
        "That is a different layer from DoRA as PEFT and the paper's code implement it (one "
        "magnitude per output channel). If it is the layer you mean, check it as such with "
        "magnitude='(1, in)'; otherwise take the norm over dim=1 with a magnitude (out,)."
    ),
    "dropout_scales_clean_base": (
        "with dropout your forward scales the clean base output by g and applies the "
        "correction to the dropped-out input only through the low-rank term: "
        "y = g*(x@W0.T) + g*s*(xd@A.T)@B.T + b (torchtune's DoRALinear, which also scales "
        "the bias). PEFT's formula also corrects the base output on xd: "
        "y = x@W0.T + b + (g - 1)*(xd@W0.T) + g*s*(xd@A.T)@B.T. Both equal the eval "
        "forward without dropout; they differ in training."
    ),
    "expects_batched_x": (
        "your port runs and is right on x of shape (batch, seq, in) but not on (N, in): "
        "it assumes a leading batch dimension (e.g. indexes x.shape[2], sums over dim=(0, 1)). "
        "Either accept any number of leading dimensions or check it with x_ndim=3."
    ),
    "magnitude_shape_out_1": (
        "your port runs and is right with a magnitude of shape (out, 1) (as the paper "
        "authors' code stores it, the weight of an nn.Linear(1, out)), not (out,): check "
        "it with magnitude='(out, 1)'."
    ),
    "weight_layout_transposed": (
        "your port runs and is right with W0 in the other layout: with fan_in_fan_out it "
        "wants W0 (out, in), without it W0 (in, out). Check it with the fan_in_fan_out= "
        "that matches how it stores the weight."
    ),
    "embedding_norm_axis": (
        "the embedding's norm is taken over the wrong axis: per token (over the embedding "
        "dimension, one value per row of E), as in mlx-lm's DoRAEmbedding, which is a different "
        "layer. PEFT's DoRA embedding keeps one magnitude per embedding DIMENSION, shape (D,), "
        "and its norm is over the vocabulary: n = ||E.T + s*B@A||_row with "
        "lora_embedding_B @ lora_embedding_A of shape (D, V), e.g. "
        "torch.linalg.norm(E + s * (B @ A).T, dim=0)."
    ),
    "embed_scale_not_on_lora": (
        "embed_scale multiplies only the base lookup, not the DoRA term: your "
        "y = g*(embed_scale*E[ids] + s*A.T[ids]@B.T). PEFT >= 0.18 scales the whole output, "
        "y = embed_scale * g * (E[ids] + s*A.T[ids]@B.T) (the base layer's output already "
        "carries embed_scale; the low-rank term must be scaled too)."
    ),
    "embedding_merge_without_magnitude": (
        "the embedding merge ignores the magnitude: your E' = E + s*(B@A).T, a LoRA merge (the "
        "delta weight alone; PEFT 0.14's embedding merge is reported to do this). DoRA's merged "
        "table scales each embedding dimension j by g_j = m_j / n_j: "
        "E' = (E + s*(B@A).T) * (m / n)[None, :], n = ||E.T + s*B@A||_row (over the vocabulary)."
    ),
    "peft_grouped_conv_norm": (
        "with groups > 1 your norm is PEFT 0.21's: it forms the delta as "
        "(lora_B.view(-1, r) @ lora_A.view(r, -1)).view(W0.shape), which for a grouped lora_B "
        "reshapes an (out/groups, in*k) product into the grouped kernel and mixes output channels "
        "(_DoraConvNdLayer.get_weight_norm). The layer's own norm is that of each output channel's "
        "dense adapted kernel, blockdiag(W0) + s * lora_B_dense @ lora_A (dora_ref.conv). To check the "
        "rest of a port that follows PEFT, use cases=dict(groups=1)."
    ),
    "peft_conv_dilation_dropped": (
        "with dilation > 1 your low-rank path ignores the dilation: lora_A is a convolution with "
        "the base's kernel size, stride and padding but dilation 1 (PEFT 0.21's _ConvNd.update_layer), "
        "so it sees another receptive field and gives another output size (PEFT raises, or broadcasts "
        "where one size is 1). lora_A must use the base's dilation, so that W0 + s*delta is one kernel; "
        "to check the rest of a port that follows PEFT, use cases=dict(dilation=1)."
    ),
    "chain_norm_of_merged_weight": (
        "with several adapters active, each DoRA adapter's norm is taken from the weight the "
        "adapters before it give (W0 merged with them in order). PEFT 0.21 takes every "
        "adapter's norm from the bare base, n_i = ||W0 + s_i*B_i@A_i||_row, and feeds the "
        "running output forward: y <- g_i * (y + s_i*(x@A_i.T)@B_i.T) per DoRA adapter, "
        "y <- y + s_i*(x@A_i.T)@B_i.T per LoRA one, then + b (its merge does the same, PEFT PR #3609)."
    ),
    "chain_not_fed_forward": (
        "with several DoRA adapters active, each adapter's correction is computed on the bare base "
        "output and the corrections are summed, y = x@W0.T + b + sum_i ((g_i - 1)*x@W0.T + "
        "g_i*s_i*(x@A_i.T)@B_i.T). PEFT 0.21 feeds the running output into each adapter, so a DoRA "
        "adapter rescales everything before it: y <- g_i * (y + s_i*(x@A_i.T)@B_i.T)."
    ),
    "unmerge_without_magnitude": (
        "the unmerge only subtracts s*B@A (or recomputes n from the merged weight, whose "
        "rows have norm m, which amounts to the same): it must divide by the factor "
        "m / n of the merge first, with n the norm kept from merge time: "
        "W0 = W' / (m / n)[:, None] - s*B@A."
    ),
}


class ConformanceError(AssertionError):
    """A port disagrees with dora_ref beyond the tolerance.

    Attributes
    ----------
    check : str
        "forward", "backward" or "merge".
    output : str
        The output that differs ("y", "dA", "W_merged", "W0_unmerged", ...).
    index : tuple of int or None
        The worst element (None if the output has the wrong shape or the port raised).
    expected, got : float or None
    bound : float or None
        The tolerance that applied to that element.
    case : Case
        The (shrunk) case; ``case.describe()`` says it in words,
        ``make_case(**case.params)`` rebuilds it.
    hint : str or None
        A key of ``HINTS``: the top-ranked explanation (``diagnoses[0]``),
        when the port's numbers match a known mistake; for a pair of mistakes
        the first of the two.
    diagnoses : list of Diagnosis
        Every known variant consistent with the port's outputs, ranked, each
        with its evidence (``key``, ``rank``, ``kind``, ``probes``,
        ``evidence``, ``detail``); empty when none is.
    """

    def __init__(self, message, *, check, output, index, expected, got, bound, case, hint, diagnoses=()):
        super().__init__(message)
        self.check = check
        self.output = output
        self.index = index
        self.expected = expected
        self.got = got
        self.bound = bound
        self.case = case
        self.hint = hint
        self.diagnoses = list(diagnoses)


class CheckResult(NamedTuple):
    """What a passing check measured.

    Attributes
    ----------
    check : str
    examples : int
        Cases compared.
    worst_ratio : float
        The largest error / tolerance seen (below 1, since the check passed).
    worst_output : str
        The output where it was seen.
    """

    check: str
    examples: int
    worst_ratio: float
    worst_output: str


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """The inputs of one DoRA layer evaluation, in the PyTorch (out, in) layout.

    Attributes
    ----------
    x : ndarray, shape (N, in)
    W0 : ndarray, shape (out, in)
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    magnitude : ndarray, shape (out,), or (in,) for the per-input-column layer
        (``make_case(magnitude_axis="in")``)
    scaling : float
    bias : ndarray, shape (out,), or None
    dy : ndarray, shape (N, out)
        A random upstream gradient (never all-ones).
    dropout_mask : ndarray, shape (N, in), or None
    params : dict
        The arguments of ``make_case`` that built it.
    """

    x: np.ndarray
    W0: np.ndarray
    A: np.ndarray
    B: np.ndarray
    magnitude: np.ndarray
    scaling: float
    bias: Optional[np.ndarray]
    dy: np.ndarray
    dropout_mask: Optional[np.ndarray]
    params: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.W0.dtype

    def shapes(self):
        """N, in, out, r."""
        return self.x.shape[0], self.W0.shape[1], self.W0.shape[0], self.A.shape[0]

    def astype(self, dtype):
        """The same case with every array cast to ``dtype``."""
        cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
        return Case(
            cast(self.x), cast(self.W0), cast(self.A), cast(self.B), cast(self.magnitude),
            self.scaling, cast(self.bias), cast(self.dy), cast(self.dropout_mask), dict(self.params),
        )

    def describe(self):
        """The case in words, e.g. for an error message."""
        N, i, o, r = self.shapes()
        p = self.params
        words = [
            f"N={N}, in={i}, out={o}, r={r}, dtype={self.dtype}, scaling={self.scaling:g}",
            "bias" if self.bias is not None else "no bias",
            "B = 0" if p.get("B_zero") else "B random",
            f"magnitude {p.get('magnitude', '?')}",
        ]
        if p.get("weight_scale", 1.0) != 1.0:
            words.append(f"weight scale {p['weight_scale']:g}")
        if self.dropout_mask is not None:
            words.append(f"dropout p={p.get('dropout_p')}")
        return ", ".join(words) + f"; rebuild it with dora_ref.porting.testing.make_case(**{p!r})"


def make_case(
    N=3,
    in_features=4,
    out_features=5,
    r=2,
    *,
    dtype="float64",
    scaling=2.0,
    bias=True,
    B_zero=False,
    magnitude="trained",
    weight_scale=1.0,
    dropout_p=0.0,
    seed=0,
    bias_scale=1.0,
    lora_alpha=None,
    use_rslora=False,
    magnitude_axis="out",
):
    """Build a ``Case`` from a few parameters, deterministically.

    Parameters
    ----------
    N, in_features, out_features, r : int
        Shapes, all >= 1 (r may exceed min(out, in)).
    dtype : {"float64", "float32"}
    scaling : float
    bias : bool
    B_zero : bool
        B = 0, PEFT's initial state (then the layer equals the base layer
        when the magnitude is initial).
    magnitude : {"init", "trained"}
        "init": m = ||W0 + s*B@A||_row; "trained": that times a factor in
        [0.25, 4) per channel.
    weight_scale : float
        Multiplies W0, B and so V and m.
    dropout_p : float
        If > 0, a dropout mask with entries 0 or 1 / (1 - p).
    seed : int
        Seeds NumPy's PCG64 generator that draws every value.
    bias_scale : float
        Multiplies the bias (1e3: a bias that dwarfs x@W0.T).
    lora_alpha : float, optional
        If given, ``scaling`` is ignored and s = lora_alpha / r (or
        lora_alpha / sqrt(r) with ``use_rslora``), computed as PEFT does, so
        that a port given ``(lora_alpha, r, use_rslora)`` gets the same s.
    use_rslora : bool
    magnitude_axis : {"out", "in"}
        "in": the per-input-column layer (magnitude (in,) from the column
        norms of W0 + s*B@A; the ``magnitude="(1, in)"`` convention).

    Returns
    -------
    Case
    """
    if lora_alpha is not None:
        scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    if magnitude_axis not in ("out", "in"):
        raise ValueError(f"magnitude_axis must be 'out' or 'in', got {magnitude_axis!r}")
    params = dict(
        N=N, in_features=in_features, out_features=out_features, r=r, dtype=str(np.dtype(dtype)),
        scaling=scaling, bias=bias, B_zero=B_zero, magnitude=magnitude,
        weight_scale=weight_scale, dropout_p=dropout_p, seed=seed,
    )
    # the parameters added later are recorded only when they differ from their defaults,
    # so that a case's params (and its message) read as before
    extra = dict(bias_scale=(bias_scale, 1.0), lora_alpha=(lora_alpha, None), use_rslora=(use_rslora, False),
                 magnitude_axis=(magnitude_axis, "out"))
    params.update({k: v for k, (v, default) in extra.items() if v != default})
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, in_features))
    W0 = weight_scale * rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)
    A = rng.standard_normal((r, in_features)) / np.sqrt(in_features)
    B = weight_scale * rng.standard_normal((out_features, r))
    if B_zero:
        B[:] = 0
    b = bias_scale * rng.standard_normal(out_features) if bias else None
    dy = rng.standard_normal((N, out_features))
    factor = 2.0 ** rng.uniform(-2, 2, out_features if magnitude_axis == "out" else in_features)
    mask = None
    if dropout_p > 0:
        mask = (rng.random((N, in_features)) >= dropout_p) / (1.0 - dropout_p)
    dtype = np.dtype(dtype)
    W0, A, B = W0.astype(dtype), A.astype(dtype), B.astype(dtype)
    # the magnitude is the norm of the weights as stored in this dtype
    m = np.linalg.norm(W0.astype(np.float64) + scaling * (B.astype(np.float64) @ A.astype(np.float64)),
                       axis=1 if magnitude_axis == "out" else 0)
    if magnitude == "trained":
        m = m * factor
    elif magnitude != "init":
        raise ValueError(f"magnitude must be 'init' or 'trained', got {magnitude!r}")
    cast = lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return Case(cast(x), W0, A, B, cast(m), float(scaling), cast(b), cast(dy), cast(mask), params)


def _diagnostic_case(dtype, dropout):
    """A square case where every known mistake changes the numbers."""
    return make_case(
        N=3, in_features=5, out_features=5, r=2, dtype=dtype, scaling=2.0, bias=True,
        magnitude="trained", dropout_p=0.5 if dropout else 0.0, seed=7,
    )


# ---------------------------------------------------------------------------
# the reference and its tolerances
# ---------------------------------------------------------------------------


def _per_input_column(case):
    return case.params.get("magnitude_axis", "out") == "in"


def reference(case, *, detach_norm=True):
    """Expected outputs for a case, from dora_ref's functional core in float64.

    Parameters
    ----------
    case : Case
    detach_norm : bool
        Which gradient: the detached one (PEFT) or the exact one.

    Returns
    -------
    dict of str to ndarray (float64)
        ``y`` (N, out), ``weight_norm`` (out,), ``dx`` (N, in), ``dA`` (r, in),
        ``dB`` (out, r), ``dmagnitude`` (out,), ``W_merged`` (out, in),
        ``W0_unmerged`` (out, in) (the unmerge of that merge). For a case of
        the per-input-column layer (``make_case(magnitude_axis="in")``),
        that layer's outputs: ``weight_norm`` and ``dmagnitude`` are (in,).
    """
    c = case.astype(np.float64)
    if _per_input_column(case):
        return _V.column_layer(c, detach_norm)
    y, ctx = F.dora_forward(c.x, c.W0, c.A, c.B, c.magnitude, c.scaling, c.bias, dropout_mask=c.dropout_mask)
    grads = F.dora_backward(c.dy, ctx, detach_norm=detach_norm)
    W_merged, n = F.merge(c.W0, c.A, c.B, c.magnitude, c.scaling)
    W0_back = F.unmerge(W_merged, c.A, c.B, c.magnitude, c.scaling, n)
    return dict(y=y, weight_norm=n, **grads._asdict(), W_merged=W_merged, W0_unmerged=W0_back)


def term_scales(case, *, detach_norm=True):
    """The size of the summed terms behind each output (Higham's ``sum |terms|``).

    Rounding in a sum is bounded by gamma_k times the sum of the absolute
    values of its terms, so each output's sums are evaluated again on
    absolute values: ``T = |W0| + |s| |B| @ |A|`` bounds |V| elementwise and
    covers the rounding of V itself, ``|x|`` and ``|dy|`` the inputs
    (``max(|x|, |x * mask|)`` with dropout). The factor g = m / n adds one
    more term: n's relative error is at most gamma_k times the cancellation
    factor ``kappa_i = ||T_i|| / n_i`` (about 1 normally, large when W0 and
    s*B@A nearly cancel), so every output also gets ``kappa * |its part that
    is proportional to g|``.

    One correct algorithm adds a term of its own: PEFT (eval, or
    ``lora_dropout = 0``) recovers ``x@W0.T`` from the base layer's output as
    ``(x@W0.T + b) - b``, the first a sum of in + 1 terms (``addmm`` adds b
    into the accumulator), the second one subtraction: exact to
    ``(gamma_{in+1} + u) |b|`` in its ``|b|`` part, so when ``|b|`` dwarfs
    ``|x@W0.T|`` the subtraction cancels and keeps only about ``in u |b|`` of
    absolute accuracy. It enters the magnitude's gradient
    ``dm = sum_N(dy * z) / n`` as ``(gamma_{in+1} + u) sum_N |dy| |b| / n``:
    added to dm's scale with the weight ``(gamma_{in+1} + u) / (2 gamma_k)``,
    so that ``rtol(dtype, k)`` times it is ``SAFETY (gamma_{in+1} + u)
    sum_N |dy| |b| / n`` -- the roundings of that path, not k of them -- and
    through dm to the exact gradient's projection term. (The output
    ``y = base + (g - 1) * (base - b) + ...`` already has ``(1 + |g|) |b|``
    in its scale.) Without it a checker fails PEFT itself, e.g. on
    ``make_case(N=1, in_features=1, out_features=1, r=1, weight_scale=0.001,
    dtype="float32")``: PEFT's dm is 0.04224, the exact value 0.04546; n =
    2.3e-6 there, so ``u |b| |dy| / n`` = 5.2e-3 is the size of the loss; the
    bound is 2.05e-5 without the term, 0.061 with it.

    Parameters
    ----------
    case : Case
    detach_norm : bool
        With False, the exact gradient's projection term is included.

    Returns
    -------
    dict of str to float
        One scale per output of ``reference``: the largest over its elements.
    """
    c = case.astype(np.float64)
    ref = reference(case, detach_norm=detach_norm)
    if _per_input_column(case):
        return _V.column_term_scales(c, ref, detach_norm)
    s = abs(c.scaling)
    absA, absB = np.abs(c.A), np.abs(c.B)
    T = np.abs(c.W0) + s * (absB @ absA)  # (out, in) >= |V|, elementwise
    V = c.W0 + c.scaling * (c.B @ c.A)
    n = ref["weight_norm"]
    safe = np.where(n > 0, n, 1.0)
    kappa = np.where(n > 0, np.linalg.norm(T, axis=1) / safe, 1.0)  # (out,)
    g = np.where(n > 0, c.magnitude / safe, 0.0)
    ga = np.abs(g)
    mask = c.dropout_mask
    xd = c.x if mask is None else c.x * mask
    xa = np.abs(c.x) if mask is None else np.maximum(np.abs(c.x), np.abs(xd))
    mmax = 1.0 if mask is None else max(1.0, float(np.max(np.abs(mask), initial=0.0)))
    dya = np.abs(c.dy)
    G = dya.T @ xa  # (out, in): bounds |dL/dW'| = |dy.T @ xd| term by term
    gz = ga * np.abs(xd @ V.T)  # (N, out): the part of y proportional to g
    lin = ga if mask is None else 1.0 + ga  # with dropout the clean base path adds terms
    dm_terms = np.sum(G * T, axis=1) / safe
    bias = 0.0 if c.bias is None else np.abs(c.bias)
    if mask is None and c.bias is not None:
        # z = x@V.T may be recovered as (x@W0.T + b) - b, the first a sum of in + 1 terms (addmm puts b in
        # the accumulator), then one subtraction: the |b| part of the error is (gamma_{in+1} + u) |b|,
        # weighted so that rtol(dtype, k) * weight = SAFETY * (gamma_{in+1} + u)
        N, i, o, r = case.shapes()
        k = dora_reduction_length("dmagnitude", n_rows=N, in_features=i, out_features=o, r=r)
        u = UNIT_ROUNDOFF[np.dtype(case.dtype)]
        weight = (gamma(i + 1, case.dtype) + u) / (2.0 * gamma(k, case.dtype))
        dm_terms = dm_terms + weight * np.sum(dya, axis=0) * bias / safe
    dV = ga[:, None] * G
    if not detach_norm:  # the projection term c_i V_i, c = -dg g / n^2, and its rounding
        cabs = np.abs(ref["dmagnitude"]) * ga / safe
        dV = dV + (ga * dm_terms / safe + 4.0 * kappa * cabs)[:, None] * T
    mx = lambda a: float(np.max(a, initial=0.0))  # noqa: E731
    return {
        "weight_norm": mx(np.linalg.norm(T, axis=1)),
        "y": mx(lin * (xa @ T.T) + kappa * gz + (1.0 + ga) * (0.0 if c.bias is None else np.abs(c.bias))),
        "dx": mmax * mx((dya * lin) @ T + (dya * (kappa * ga)) @ np.abs(V)),
        "dA": mx(s * (absB.T @ dV) + np.max(kappa) * np.abs(ref["dA"])),
        "dB": mx(s * (dV @ absA.T) + kappa[:, None] * np.abs(ref["dB"])),
        "dmagnitude": mx(dm_terms + kappa * np.abs(ref["dmagnitude"])),
        "W_merged": mx(ga[:, None] * T + kappa[:, None] * np.abs(ref["W_merged"])),
        "W0_unmerged": mx(2.0 * T + kappa[:, None] * np.abs(V)),
    }


def tolerances(case, *, detach_norm=True):
    """The absolute tolerance of each output: ``rtol(dtype, k) * term scale``.

    Parameters
    ----------
    case : Case
    detach_norm : bool

    Returns
    -------
    dict of str to dict
        For each output: ``atol`` (float), ``rtol``, ``k``, ``scale``, ``dtype``.
    """
    N, i, o, r = case.shapes()
    out = {}
    for name, scale in term_scales(case, detach_norm=detach_norm).items():
        k = dora_reduction_length(name, n_rows=N, in_features=i, out_features=o, r=r)
        rt = rtol(case.dtype, k)
        # a scale of 0 (e.g. dA when B = 0 and m = 0) still allows rounding of 0
        out[name] = dict(atol=rt * scale if scale > 0 else 0.0, rtol=rt, k=k, scale=scale,
                         dtype=str(case.dtype))
    return out


# ---------------------------------------------------------------------------
# calling the port and comparing
# ---------------------------------------------------------------------------


class _Mismatch(Exception):
    """Raised inside a hypothesis example; carries what differed."""

    def __init__(self, case, info, raised=None):
        super().__init__(info["text"])
        self.case = case
        self.info = info
        self.raised = raised


def _compare(got, expected, tols):
    """Compare outputs: (inf, mismatch info) at the first mismatch, else (worst ratio, its output's name)."""
    worst, worst_name = 0.0, None  # without a mismatch: the largest error / tolerance, and where
    for name, exp in expected.items():
        g = got[name]
        if g.shape != exp.shape:
            return np.inf, dict(
                output=name, index=None, expected=None, got=None, bound=None,
                text=f"output {name} has shape {g.shape}, expected {exp.shape}",
            )
        atol = tols[name]["atol"]
        err = np.abs(g.astype(np.float64) - exp)
        err = np.where(np.isnan(err), np.inf, err)
        ratio = err / atol if atol > 0 else np.where(err > 0, np.inf, 0.0)
        if ratio.size and np.max(ratio) > 1.0:
            idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
            t = tols[name]
            info = dict(
                output=name, index=tuple(int(i) for i in idx), expected=float(exp[idx]),
                got=float(g[idx]), bound=float(atol),
            )
            info["text"] = (
                f"output {name}, index {info['index']}: expected {info['expected']!r}, "
                f"got {info['got']!r}; error {float(err[idx]):.3g} > tolerance {atol:.3g} "
                f"(rtol {t['rtol']:.3g} for {t['dtype']} "
                f"with k = {t['k']}, times the term scale {t['scale']:.3g}; see dora_ref.porting.tolerance)"
            )
            return np.inf, info
        r = float(np.max(ratio, initial=0.0))
        if r >= worst:
            worst, worst_name = r, name
    return worst, worst_name


def _init_identity_case(case):
    """The case with B = 0 and the magnitude at its initial value ||W0||_row (in the case's dtype)."""
    c = dataclasses.replace(case, B=np.zeros_like(case.B), params=dict(case.params, B_zero=True, magnitude="init"))
    ref = reference(c)
    return dataclasses.replace(c, magnitude=ref["weight_norm"].astype(case.dtype))


def _reference_and_tolerances(check, case, detach_norm):
    """Expected outputs and their tolerances for one check (``init`` adds its own two)."""
    ref = reference(case, detach_norm=detach_norm)
    tols = tolerances(case, detach_norm=detach_norm)
    if check == "init":  # the magnitude at init is the norm; with B = 0 the layer is the base layer
        ref = dict(ref, magnitude=ref["weight_norm"])
        tols = dict(tols, magnitude=tols["weight_norm"])
        c0 = _init_identity_case(case)
        c64 = c0.astype(np.float64)
        ref["y_identity"] = c64.x @ c64.W0.T + (0.0 if c64.bias is None else c64.bias)
        tols["y_identity"] = tolerances(c0)["y"]
    return ref, tols


def _hypothesis():
    try:
        import hypothesis
        import hypothesis.strategies
    except ImportError as exc:  # pragma: no cover - exercised with hypothesis hidden
        raise ImportError(
            "dora_ref.porting.testing needs hypothesis to draw cases: pip install hypothesis "
            "(or pip install 'dora_ref[test]')"
        ) from exc
    return hypothesis


def _case_strategy(st, dtype, dropout, conv=None, cases=None):
    """Hypothesis strategy for ``make_case``'s parameters; shrinks towards small, plain cases.

    ``cases`` restricts it: parameter -> a value, a list / tuple / range of
    values, or a hypothesis strategy.
    """
    conv = conv or _C.Convention()
    fields_ = {
        "N": st.integers(1, 6),
        "in_features": st.integers(1, 8),
        "out_features": st.integers(1, 8),
        "r": st.integers(1, 6),
        "dtype": st.just(str(np.dtype(dtype))),
        "scaling": st.sampled_from([2.0, 0.5, 1.0 / 3.0, 8.0]),
        "bias": st.booleans(),
        "B_zero": st.booleans(),
        "magnitude": st.sampled_from(["trained", "init"]),
        "weight_scale": st.sampled_from([1.0, 1e-3, 1e3]),
        "dropout_p": st.just(0.5) if dropout else st.just(0.0),
        "seed": st.integers(0, 2**16),
    }
    if conv.scaling == "lora_alpha":
        fields_["lora_alpha"] = st.sampled_from([16.0, 1.0, 8.0, 3.0])
        fields_["use_rslora"] = st.booleans()
    if conv.per_input_column:
        fields_["magnitude_axis"] = st.just("in")
    for key, value in (cases or {}).items():
        if key in ("dtype", "dropout_p", "magnitude_axis"):
            raise ValueError(f"cases= cannot set {key!r}: it follows the check's own arguments")
        if key not in fields_ and key not in ("bias_scale", "lora_alpha", "use_rslora"):
            raise ValueError(f"cases= has an unknown parameter {key!r}; make_case takes {sorted(fields_)}")
        fields_[key] = _L.as_strategy(st, key, value)
    return st.fixed_dictionaries(fields_)


class Report(NamedTuple):
    """What ``report="all"`` returns: every output checked on its own.

    Attributes
    ----------
    check : str
    passed : dict of str to CheckResult
        The outputs that passed.
    failures : list of ConformanceError
        One per failing output, each on its own shrunk case with its diagnosis.
    """

    check: str
    passed: dict
    failures: list

    @property
    def ok(self):
        return not self.failures

    def __str__(self):
        lines = [f"check_{self.check}: {len(self.passed)} output(s) pass, {len(self.failures)} fail"]
        lines += [f"  pass {name}: {r.examples} cases, worst error / tolerance {r.worst_ratio:.3g}"
                  for name, r in self.passed.items()]
        lines += [str(f) for f in self.failures]
        return "\n".join(lines)


def _settings(hyp, max_examples):
    """The hypothesis settings of every check: quiet, no deadline, no database, shrink."""
    return hyp.settings(
        max_examples=max_examples, deadline=None, database=None,
        verbosity=hyp.Verbosity.quiet, report_multiple_bugs=False,
        suppress_health_check=list(hyp.HealthCheck),
        # no "explain" phase: it reruns the shrunk case hundreds of times to say which
        # arguments could vary, which the message already makes plain
        phases=[hyp.Phase.explicit, hyp.Phase.generate, hyp.Phase.shrink],
    )


def _search(check, fn, unmerge, conv, names, *, dtype, dropout, detach_norm, max_examples, seed, cases):
    """Draw cases until one fails on ``names`` (returns the shrunk _Mismatch) or all pass (CheckResult)."""
    hyp = _hypothesis()
    return _hunt(
        check, names, _case_strategy(hyp.strategies, dtype, dropout, conv, cases), make_case,
        lambda case: _C.call_port(check, fn, unmerge, case, conv, dropout),
        lambda case: _reference_and_tolerances(check, case, detach_norm),
        max_examples=max_examples, seed=seed,
    )


def _hunt(check, names, strategy, build, call, expect, *, max_examples, seed):
    """The search every check runs: hypothesis draws parameters from ``strategy``,
    ``build(params)`` makes the case, ``call(case)`` runs the port (its outputs
    by name), ``expect(case)`` gives the reference and the tolerances; the first
    mismatch is shrunk and returned as a _Mismatch, else a CheckResult."""
    hyp = _hypothesis()
    stats = {"examples": 0, "worst": 0.0, "where": ""}

    @_settings(hyp, max_examples)
    @hyp.seed(seed)
    @hyp.given(strategy)
    def one_case(params):
        case = build(**params)
        try:
            got = call(case)
        except _C.ShapeMismatch as exc:  # diagnosed as a port that raised: other layouts are tried
            raise _Mismatch(case, dict(output=exc.output, index=None, expected=None, got=None, bound=None,
                                       text=str(exc)), exc) from exc
        except Exception as exc:  # noqa: BLE001 - reported as a mismatch, shrunk like one
            wrote = isinstance(exc, _C.WroteInput)
            text = str(exc) if wrote else f"your {check} raised {type(exc).__name__}: {exc}"
            raise _Mismatch(case, dict(
                output=None, index=None, expected=None, got=None, bound=None, text=text,
            ), None if wrote else exc) from exc
        ref, tols = expect(case)
        ratio, info = _compare({k: got[k] for k in names}, {k: ref[k] for k in names}, tols)
        if ratio == np.inf:
            raise _Mismatch(case, info)
        stats["examples"] += 1
        if ratio >= stats["worst"]:
            stats["worst"], stats["where"] = ratio, info

    try:
        one_case()
    except _Mismatch as exc:
        return exc
    return CheckResult(check, stats["examples"], stats["worst"], stats["where"] or "")


def _error(check, fn, unmerge, conv, exc, dropout, detach_norm):
    """The ConformanceError for a shrunk mismatch, with its diagnosis."""
    diagnoses = _D.diagnose(check, fn, unmerge, exc.case, conv, dropout, detach_norm, raised=exc.raised)
    mode = ""
    if check == "backward":
        mode = " (detached norm)" if detach_norm else " (exact gradient)"
    return _error_from(check, exc, diagnoses, mode, conv.changed())


def _error_from(check, exc, diagnoses, mode="", changed=None):
    """The ConformanceError for a shrunk mismatch and its ranked diagnoses."""
    info = exc.info
    lines = [
        f"check_{check}{mode}: your {check} differs from dora_ref on this minimal case "
        f"(found by hypothesis, then shrunk):",
        f"  case: {exc.case.describe()}",
    ]
    if changed:
        lines.append("  convention: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    lines.append(f"  {info['text']}")
    hint = diagnoses[0].key.split(" + ")[0] if diagnoses else None
    if diagnoses:
        top = diagnoses[0]
        lines.append(f"  hint (rank 1 of {len(diagnoses)}, {top.kind} on {top.probes} probe(s)): "
                     + top.describe(HINTS))
        for ev in top.evidence:
            lines.append(f"    - {ev}")
        for d in diagnoses[1:]:
            lines.append(f"  also consistent (rank {d.rank}, {d.kind} on {d.probes} probe(s)): {d.key}"
                         + (f" ({d.detail})" if d.detail else ""))
    return ConformanceError(
        "\n".join(lines), check=check, output=info["output"], index=info["index"],
        expected=info["expected"], got=info["got"], bound=info["bound"], case=exc.case, hint=hint,
        diagnoses=diagnoses,
    )


def _run(check, fn, *, unmerge=None, dtype="float64", dropout=False, detach_norm=True,
         max_examples=100, seed=0, convention=None, report="first", cases=None, **conventions):
    dtype = _check_arguments(check, fn, dtype, max_examples, report, cases)
    if unmerge is not None and not callable(unmerge):
        raise TypeError(f"unmerge must be callable or None, got {type(unmerge).__name__}")
    conv = _C.convention_from(convention, conventions)
    if conv.per_input_column and dropout:
        raise ValueError("dropout=True is not defined for the per-input-column layer (magnitude='(1, in)')")
    _hypothesis()
    names = _D.output_names(check, unmerge is not None)
    kw = dict(dtype=dtype, dropout=dropout, detach_norm=detach_norm, max_examples=max_examples, seed=seed,
              cases=cases)
    if report == "first":
        found = _search(check, fn, unmerge, conv, names, **kw)
        if isinstance(found, _Mismatch):
            raise _error(check, fn, unmerge, conv, found, dropout, detach_norm) from None
        return found
    passed, failures = {}, []
    for name in names:
        found = _search(check, fn, unmerge, conv, (name,), **kw)
        if isinstance(found, _Mismatch):
            failures.append(_error(check, fn, unmerge, conv, found, dropout, detach_norm))
            if found.info["output"] is None:  # the port raised or wrote its inputs: the same for every output
                break
        else:
            passed[name] = found
    return Report(check, passed, failures)


def _search_layer(check, fn, names, *, dtype, max_examples, seed, cases):
    """``_search`` for the Embedding, Conv and chained-adapter checks (``dora_ref.porting.layer_checks``)."""
    hyp = _hypothesis()
    return _hunt(
        check, names, _L.strategy(check, hyp.strategies, dtype, cases),
        lambda **params: _L.make_case(check, params), lambda case: _L.call_port(check, fn, case),
        lambda case: (_L.reference(check, case), _L.tolerances(check, case)),
        max_examples=max_examples, seed=seed,
    )


def _check_arguments(check, fn, dtype, max_examples, report, cases):
    """Validate the arguments every check takes; returns the dtype."""
    if not callable(fn):
        raise TypeError(f"check_{check} needs a callable, got {type(fn).__name__}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be a positive int, got {max_examples!r}")
    if report not in ("first", "all"):
        raise ValueError(f"report must be 'first' or 'all', got {report!r}")
    if cases is not None and not isinstance(cases, dict):
        raise TypeError(f"cases must be a dict of case parameters, got {type(cases).__name__}")
    return dtype


def _run_layer(check, fn, *, dtype, max_examples, seed, report, cases):
    dtype = _check_arguments(check, fn, dtype, max_examples, report, cases)
    names = _L.output_names(check)
    found = _search_layer(check, fn, names, dtype=dtype, max_examples=max_examples, seed=seed, cases=cases)
    if isinstance(found, _Mismatch):
        error = _error_from(check, found, _L.diagnose(check, fn, found.case))
        if report == "first":
            raise error from None
        return Report(check, {}, [error])
    return found if report == "first" else Report(check, {names[0]: found}, [])


# ---------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------

_COMMON = """
    dtype : {"float64", "float32"}, default "float64"
        The dtype of every array passed to your function. Your outputs are
        compared with dora_ref's float64 result within ``rtol(dtype, k)``
        times the term scale (``tolerances``).
    max_examples : int, default 100
        Cases to draw.
    seed : int, default 0
        Seeds hypothesis: the same seed draws the same cases.
    convention : Convention, optional
        How your function takes its arguments; the same fields may be given
        as keywords: ``magnitude`` ("(out,)", "(out, 1)", or "(1, in)" for the
        per-input-column layer), ``scaling`` ("float" or "lora_alpha": you
        get ``(lora_alpha, r, use_rslora)``), ``fan_in_fan_out`` (W0 stored
        (in, out)), ``x_ndim`` (3: x (batch, seq, in)), ``unmerge_gets_norm``
        and ``dropout_as`` ("mask" or "callable"). See ``Convention``.
    report : {"first", "all"}, default "first"
        "first": raise at the first (shrunk) mismatch. "all": check each
        output on its own and return a ``Report`` of every failure (one
        accepted deviation does not hide the others).
    cases : dict, optional
        Restricts the drawn cases: a ``make_case`` parameter -> a value, a
        list / tuple / range of values, or a hypothesis strategy, e.g.
        ``cases=dict(bias=False, weight_scale=[1.0])``.

    Returns
    -------
    CheckResult
        Cases compared and the largest error / tolerance seen; with
        ``report="all"``, a ``Report``.

    Raises
    ------
    ConformanceError
        An ``AssertionError`` on the first (shrunk) mismatch, or if your
        function raised or wrote to its inputs; the message names the
        output, index, expected and got values, tolerance, the case, and
        the known mistakes your numbers reproduce, ranked, with the evidence
        (``.hint`` the first, ``.diagnoses`` all).
    ImportError
        If hypothesis is not installed.
    TypeError, ValueError
        On bad arguments to the check itself.
"""


def check_forward(forward, *, dtype="float64", dropout=False, max_examples=100, seed=0, convention=None,
                  report="first", cases=None, **conventions):
    """Check a port's DoRA forward against dora_ref (paper Eq. 5, PEFT semantics).

    Parameters
    ----------
    forward : callable
        ``forward(x, W0, A, B, magnitude, scaling, bias) -> y``: x (N, in),
        W0 (out, in), A (r, in), B (out, r), magnitude (out,), scaling a
        float, bias (out,) or None; y (N, out). With ``dropout=True`` it is
        also given ``dropout_mask=`` (N, in) and must compute PEFT's training
        formula ``y = x@W0.T + b + (g-1)*(xd@W0.T) + g*s*(xd@A.T)@B.T``,
        ``xd = x * dropout_mask``.
    dropout : bool, default False
        Check PEFT's training path (``lora_dropout > 0``) with a given mask.
    """
    return _run("forward", forward, dtype=dtype, dropout=dropout, max_examples=max_examples, seed=seed,
                convention=convention, report=report, cases=cases, **conventions)


def check_backward(backward, *, detach_norm=True, dtype="float64", dropout=False, max_examples=100, seed=0,
                   convention=None, report="first", cases=None, **conventions):
    """Check a port's DoRA gradients against dora_ref's hand-derived backward.

    Parameters
    ----------
    backward : callable
        ``backward(dy, x, W0, A, B, magnitude, scaling, bias) -> (dx, dA,
        dB, dmagnitude)`` (or a mapping with those keys): the gradients of
        ``sum(dy * y)`` with y the forward of ``check_forward``; dy (N, out),
        dx (N, in), dA (r, in), dB (out, r), dmagnitude (out,). With
        ``dropout=True`` it is also given ``dropout_mask=``.
    detach_norm : bool, default True
        True: the norm is a constant (paper Sec. 4.3; PEFT). False: the exact
        gradient (paper Eqs. 6-7).
    dropout : bool, default False
        Check the gradients of PEFT's training path with a given mask.
    """
    return _run("backward", backward, dtype=dtype, dropout=dropout, detach_norm=detach_norm,
                max_examples=max_examples, seed=seed, convention=convention, report=report, cases=cases,
                **conventions)


def check_merge(merge, unmerge=None, *, dtype="float64", max_examples=100, seed=0, convention=None,
                report="first", cases=None, **conventions):
    """Check a port's merge (and unmerge) against dora_ref.

    Parameters
    ----------
    merge : callable
        ``merge(W0, A, B, magnitude, scaling) -> W_merged`` (out, in), which
        must be ``diag(m / n) (W0 + s*B@A)``; a tuple whose first element is
        W_merged is accepted (``dora_ref.merge`` returns ``(W, n)``).
    unmerge : callable, optional
        ``unmerge(W_merged, A, B, magnitude, scaling, weight_norm) -> W0``,
        given dora_ref's merged weight and the norm n from merge time
        (PEFT caches it: the merged weight alone does not determine it).
        With ``unmerge_gets_norm=False``: ``unmerge(W_merged, A, B,
        magnitude, scaling)`` on the port's own merged weight, right after
        its merge.
    """
    return _run("merge", merge, unmerge=unmerge, dtype=dtype, max_examples=max_examples, seed=seed,
                convention=convention, report=report, cases=cases, **conventions)


def check_init(init, forward=None, *, dtype="float64", max_examples=100, seed=0, convention=None,
               report="first", cases=None, **conventions):
    """Check a port's magnitude initialisation (and, given its forward, the B = 0 identity).

    Parameters
    ----------
    init : callable
        ``init(W0, A, B, scaling) -> magnitude`` (out,): the magnitude a new
        adapter starts from, ``||W0 + s*B@A||_row`` (PEFT
        ``DoraLinearLayer.update_layer``; with PEFT's default B = 0 it is
        ``||W0||_row``). B is drawn random, as with ``init_lora_weights=False``.
    forward : callable, optional
        ``forward(x, W0, A, B, magnitude, scaling, bias) -> y``: then each case
        is also run with B = 0 and the port's own ``init`` magnitude, and y
        must be the base layer's output ``x@W0.T + b`` (output
        ``y_identity``): a freshly initialised adapter changes nothing.
    """
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable or None, got {type(forward).__name__}")
    return _run("init", init, unmerge=forward, dtype=dtype, max_examples=max_examples, seed=seed,
                convention=convention, report=report, cases=cases, **conventions)


_LAYER_COMMON = """
    dtype : {"float64", "float32"}, default "float64"
        The dtype of every float array passed to your function; compared with
        dora_ref's float64 result within the linear view's tolerance
        (``dora_ref.porting.layer_checks.tolerances``).
    max_examples : int, default 100
    seed : int, default 0
    report : {"first", "all"}, default "first"
        "all": return a ``Report`` instead of raising.
    cases : dict, optional
        Restricts the drawn cases: a parameter of the case builder
        (``make_embedding_case`` / ``make_conv_case`` / ``make_chain_case``) -> a value, a list of
        values or a hypothesis strategy.

    Returns
    -------
    CheckResult, or a ``Report`` with ``report="all"``.

    Raises
    ------
    ConformanceError
        On the first (shrunk) mismatch, or if your function raised or wrote
        to its inputs, with the known mistakes your numbers reproduce, ranked
        (``.hint`` the first, ``.diagnoses`` all).
    ImportError
        If hypothesis is not installed.
    TypeError, ValueError
        On bad arguments to the check itself.
"""


def check_embedding_forward(forward, *, dtype="float64", max_examples=100, seed=0, report="first", cases=None):
    """Check a port's DoRA Embedding forward (PEFT ``DoraEmbeddingVariant.forward``, PEFT >= 0.18).

    Parameters
    ----------
    forward : callable
        ``forward(ids, weight, lora_embedding_A, lora_embedding_B, magnitude,
        scaling, embed_scale, padding_idx) -> y``: ids int64 (N,), weight E
        (V, D), lora_embedding_A (r, V), lora_embedding_B (D, r), magnitude
        (D,), scaling and embed_scale floats, padding_idx an int or None;
        y (N, D) = ``embed_scale * g * (E[ids] + s * A.T[ids] @ B.T)``,
        ``g = m / ||E.T + s*B@A||_row`` (one norm per embedding dimension,
        over the vocabulary). padding_idx changes only the backward: the
        forward value of a padding id is computed like any other.
    """
    return _run_layer("embedding_forward", forward, dtype=dtype, max_examples=max_examples, seed=seed,
                      report=report, cases=cases)


def check_embedding_merge(merge, *, dtype="float64", max_examples=100, seed=0, report="first", cases=None):
    """Check a port's DoRA Embedding merge (PEFT ``DoraEmbeddingVariant.merge_safe``).

    Parameters
    ----------
    merge : callable
        ``merge(weight, lora_embedding_A, lora_embedding_B, magnitude,
        scaling) -> weight_merged`` (V, D) = ``(E + s*(B@A).T) * (m / n)[None, :]``
        (a tuple whose first element is it is accepted, as
        ``dora_ref.embedding.embedding_merge`` returns).
    """
    return _run_layer("embedding_merge", merge, dtype=dtype, max_examples=max_examples, seed=seed,
                      report=report, cases=cases)


def check_conv_forward(forward, *, dtype="float64", max_examples=100, seed=0, report="first", cases=None):
    """Check a port's DoRA Conv1d / Conv2d forward (PEFT ``_DoraConvNdLayer.forward``, eval).

    Parameters
    ----------
    forward : callable
        ``forward(x, weight, lora_A, lora_B, magnitude, scaling, bias,
        stride, padding, dilation, groups) -> y``: x (N, in, *L), weight
        (out, in/groups, *k), lora_A (r, in, *k) (a convolution with the
        base's stride, padding and dilation, not grouped), lora_B
        (out, r/groups, 1, ...) (a grouped 1x1 convolution), magnitude
        (out,) (PEFT stores it (1, out, 1, ...)), bias (out,) or None, ints
        for the geometry (the same on every axis); y (N, out, *L_out) =
        ``g * (conv(x, W0) + s * lora_B(lora_A(x))) + bias`` per channel,
        g = m / n with n the norm of each output channel's dense adapted
        kernel ``W0 + s * lora_B_dense @ lora_A`` (``dora_ref.conv``). With
        groups > 1, PEFT's norm differs (see ``dora_ref.conv``).
    """
    return _run_layer("conv_forward", forward, dtype=dtype, max_examples=max_examples, seed=seed,
                      report=report, cases=cases)


def check_chain_forward(forward, *, dtype="float64", max_examples=100, seed=0, report="first", cases=None):
    """Check a port's forward with several (Do)LoRA adapters active on one linear layer (PEFT 0.21, eval).

    Parameters
    ----------
    forward : callable
        ``forward(x, W0, bias, adapters) -> y``: x (N, in), W0 (out, in),
        bias (out,) or None, adapters a list (PEFT's active-adapter order)
        of dicts with ``A`` (r_i, in), ``B`` (out, r_i), ``magnitude``
        (out,) or None for a plain LoRA adapter, and ``scaling`` (float);
        y (N, out) as ``dora_ref.peft.chain_forward``::

            y <- x @ W0.T
            for each adapter:  DoRA: y <- g_i * (y + s_i (x @ A_i.T) @ B_i.T)
                               LoRA: y <- y + s_i (x @ A_i.T) @ B_i.T
            y <- y + b,        g_i = m_i / ||W0 + s_i B_i A_i||_row  (the bare W0)
    """
    return _run_layer("chain_forward", forward, dtype=dtype, max_examples=max_examples, seed=seed,
                      report=report, cases=cases)


for _check in (check_embedding_forward, check_embedding_merge, check_conv_forward, check_chain_forward):
    _check.__doc__ = _check.__doc__.rstrip() + _LAYER_COMMON

for _check in (check_forward, check_backward, check_merge, check_init):
    _check.__doc__ = _check.__doc__.rstrip() + _COMMON
del _check
