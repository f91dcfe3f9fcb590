"""Check a port of DoRA against dora_ref, in one call per operation.

Write your port in any framework, wrap it to take and return NumPy arrays,
and call::

    from dora_ref import testing
    testing.check_forward(my_forward)                      # y
    testing.check_backward(my_backward, detach_norm=True)  # dx, dA, dB, dmagnitude
    testing.check_merge(my_merge, my_unmerge)              # W', then W0 back

Each check draws cases with hypothesis (shapes from 1 up, with or without
bias, B = 0 or random, a magnitude at its initial value or trained, several
scalings and weight scales), computes the expected outputs with dora_ref's
functional core in float64, and compares. On a mismatch hypothesis shrinks
the case to a minimal one, and the check raises ``ConformanceError`` saying
in words which output and index differ, expected vs got, the tolerance and
why, and, when your numbers match a known mistake (the norm over the wrong
axis, the scaling left out of the norm, the bias multiplied by the
magnitude, the norm detached or not, the naive dropout formula, a merge
without the magnitude, ...), a hint naming it. Hints are found by
recomputing each wrong variant and seeing which one your output matches.

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

Tolerances come from ``dora_ref.tolerance``: ``rtol(dtype, k)`` with ``k``
the reduction length of the output (``dora_reduction_length``), times the
size of the summed terms (``term_scales``), so that a nearly cancelling
``W0 + s*B@A`` or a tiny weight scale is judged by the size of what was
summed, not by the size of the result. See docs/porting.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np

from . import functional as F
from .tolerance import dora_reduction_length, rtol

__all__ = [
    "Case",
    "CheckResult",
    "ConformanceError",
    "HINTS",
    "check_backward",
    "check_forward",
    "check_merge",
    "make_case",
    "reference",
    "term_scales",
    "tolerances",
]

GRAD_NAMES = ("dx", "dA", "dB", "dmagnitude")

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
        "the bias is multiplied by the magnitude: y = g*(x@V.T + b). The bias must be "
        "added after the scaling, y = g*(x@V.T) + b (PEFT subtracts the base bias before "
        "applying m / n, and never scales it)."
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
        "the factor m / n scales the columns instead of the rows of the (out, in) "
        "weight (the transposed layout; PEFT's fan_in_fan_out unmerge had this bug "
        "before PR #3532). One factor per output channel: W' = (m / n)[:, None] * V."
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
        A key of ``HINTS`` when the port's numbers match a known mistake.
    """

    def __init__(self, message, *, check, output, index, expected, got, bound, case, hint):
        super().__init__(message)
        self.check = check
        self.output = output
        self.index = index
        self.expected = expected
        self.got = got
        self.bound = bound
        self.case = case
        self.hint = hint


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
    magnitude : ndarray, shape (out,)
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
        return ", ".join(words) + f"; rebuild it with dora_ref.testing.make_case(**{p!r})"


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

    Returns
    -------
    Case
    """
    params = dict(
        N=N, in_features=in_features, out_features=out_features, r=r, dtype=str(np.dtype(dtype)),
        scaling=scaling, bias=bias, B_zero=B_zero, magnitude=magnitude,
        weight_scale=weight_scale, dropout_p=dropout_p, seed=seed,
    )
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, in_features))
    W0 = weight_scale * rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)
    A = rng.standard_normal((r, in_features)) / np.sqrt(in_features)
    B = weight_scale * rng.standard_normal((out_features, r))
    if B_zero:
        B[:] = 0
    b = rng.standard_normal(out_features) if bias else None
    dy = rng.standard_normal((N, out_features))
    factor = 2.0 ** rng.uniform(-2, 2, out_features)
    mask = None
    if dropout_p > 0:
        mask = (rng.random((N, in_features)) >= dropout_p) / (1.0 - dropout_p)
    dtype = np.dtype(dtype)
    W0, A, B = W0.astype(dtype), A.astype(dtype), B.astype(dtype)
    # the magnitude is the norm of the weights as stored in this dtype
    m = np.linalg.norm(W0.astype(np.float64) + scaling * (B.astype(np.float64) @ A.astype(np.float64)), axis=1)
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


def _case_strategy(st, dtype, dropout):
    """Hypothesis strategy for ``make_case``'s parameters; shrinks towards small, plain cases."""
    return st.fixed_dictionaries(
        {
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
    )


# ---------------------------------------------------------------------------
# the reference and its tolerances
# ---------------------------------------------------------------------------


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
        ``W0_unmerged`` (out, in) (the unmerge of that merge).
    """
    c = case.astype(np.float64)
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
    dV = ga[:, None] * G
    if not detach_norm:  # the projection term c_i V_i, c = -dg g / n^2, and its rounding
        cabs = np.abs(ref["dmagnitude"]) * ga / safe
        dV = dV + (ga * dm_terms / safe + 4.0 * kappa * cabs)[:, None] * T
    bias = 0.0 if c.bias is None else np.abs(c.bias)
    mx = lambda a: float(np.max(a, initial=0.0))  # noqa: E731
    return {
        "weight_norm": mx(np.linalg.norm(T, axis=1)),
        "y": mx(lin * (xa @ T.T) + kappa * gz + bias),
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
# the known mistakes, recomputed (float64, through the functional core)
# ---------------------------------------------------------------------------


def _f64(case):
    return case.astype(np.float64)


def _forward_with_norm(c, n, *, x=None, mask="case"):
    mask = c.dropout_mask if mask == "case" else mask
    x = c.x if x is None else x
    return F.dora_forward(x, c.W0, c.A, c.B, c.magnitude, c.scaling, c.bias,
                          dropout_mask=mask, weight_norm=n, allow_zero_norm=True)


def _wrong_norms(c):
    """Norms a port gets wrong: name -> (out,) array, where the shapes allow."""
    V = c.W0 + c.scaling * (c.B @ c.A)
    norms = {
        "scaling_outside_norm": np.linalg.norm(c.W0 + c.B @ c.A, axis=1),
        "norm_of_W0": np.linalg.norm(c.W0, axis=1),
    }
    if V.shape[0] == V.shape[1]:
        norms["norm_axis"] = np.linalg.norm(V, axis=0)
    return norms


def _forward_variants(case):
    c = _f64(case)
    n = F.column_norm(c.W0, c.A, c.B, c.scaling)
    g = c.magnitude / n
    y_ref = _forward_with_norm(c, n)[0]
    out = {key: _forward_with_norm(c, wrong)[0] for key, wrong in _wrong_norms(c).items()}
    if c.bias is not None:
        out["bias_scaled"] = y_ref + (g - 1.0) * c.bias
    # magnitude = n makes g = 1: plain LoRA
    out["no_magnitude"] = F.dora_forward(c.x, c.W0, c.A, c.B, n, c.scaling, c.bias,
                                         dropout_mask=c.dropout_mask)[0]
    if c.dropout_mask is not None:
        out["naive_dropout"] = _forward_with_norm(c, n, x=c.x * c.dropout_mask, mask=None)[0]
        out["dropout_ignored"] = _forward_with_norm(c, n, mask=None)[0]
    return {k: {"y": v} for k, v in out.items()}


def _backward_variants(case, detach_norm):
    c = _f64(case)
    n = F.column_norm(c.W0, c.A, c.B, c.scaling)
    out = {}
    other = F.dora_backward(c.dy, _forward_with_norm(c, n)[1], detach_norm=not detach_norm)
    out["norm_not_detached" if detach_norm else "norm_detached"] = other._asdict()
    for key, wrong in _wrong_norms(c).items():
        if np.all(wrong > 0):
            out[key] = F.dora_backward(c.dy, _forward_with_norm(c, wrong)[1])._asdict()
    ref = F.dora_backward(c.dy, _forward_with_norm(c, n)[1], detach_norm=detach_norm)._asdict()
    out["dmagnitude_missing_norm"] = dict(ref, dmagnitude=ref["dmagnitude"] * n)
    _, lctx = F.lora_forward(c.x, c.W0, c.A, c.B, c.scaling, c.bias, dropout_mask=c.dropout_mask)
    lora = F.lora_backward(c.dy, lctx)
    out["grads_without_g"] = dict(ref, dA=lora.dA, dB=lora.dB)
    if c.dropout_mask is not None:  # y = g*(xd@V.T) + b: dx = mask * d/dxd
        _, nctx = _forward_with_norm(c, n, x=c.x * c.dropout_mask, mask=None)
        naive = F.dora_backward(c.dy, nctx, detach_norm=detach_norm)._asdict()
        naive["dx"] = naive["dx"] * c.dropout_mask
        out["naive_dropout"] = naive
    return out


def _merge_variants(case):
    c = _f64(case)
    V = c.W0 + c.scaling * (c.B @ c.A)
    n = np.linalg.norm(V, axis=1)
    g = c.magnitude / n
    ref_merged = g[:, None] * V
    low_rank = c.scaling * (c.B @ c.A)
    out = {
        "merge_without_magnitude": {"W_merged": V},
        "merge_without_norm": {"W_merged": c.magnitude[:, None] * V},
        "unmerge_without_magnitude": {"W0_unmerged": ref_merged - low_rank},
    }
    for key, wrong in _wrong_norms(c).items():
        out[key] = {"W_merged": (c.magnitude / wrong)[:, None] * V}
    if V.shape[0] == V.shape[1]:
        out["factor_on_columns"] = {
            "W_merged": g[None, :] * V,
            "W0_unmerged": ref_merged / g[None, :] - low_rank,
        }
    return out


# ---------------------------------------------------------------------------
# calling the port and comparing
# ---------------------------------------------------------------------------


class _Mismatch(Exception):
    """Raised inside a hypothesis example; carries what differed."""

    def __init__(self, case, info):
        super().__init__(info["text"])
        self.case = case
        self.info = info


class _WroteInput(Exception):
    """The port modified an input array in place."""


def _first(result):
    if isinstance(result, tuple) and not hasattr(result, "_fields"):
        return result[0]
    return result


def _to_numpy(value):
    """np.asarray, after .detach().cpu() for tensors that carry a graph or live on a device."""
    for method in ("detach", "cpu"):
        if hasattr(value, method) and not isinstance(value, np.ndarray):
            value = getattr(value, method)()
    return np.asarray(value)


def _grads_of(result):
    if isinstance(result, dict):
        missing = [k for k in GRAD_NAMES if k not in result]
        if missing:
            raise TypeError(f"the backward returned a mapping without {missing}")
        return {k: result[k] for k in GRAD_NAMES}
    result = tuple(result)
    if len(result) != 4:
        raise TypeError(f"the backward must return (dx, dA, dB, dmagnitude), got {len(result)} values")
    return dict(zip(GRAD_NAMES, result))


def _call_port(check, fn, unmerge, case, dropout, detach_norm):
    """Call the port on copies of the case's arrays; return {output: ndarray}."""
    c = case.astype(case.dtype)  # fresh copies: a port may not write to our arrays
    kw = {"dropout_mask": c.dropout_mask} if dropout else {}
    if check == "forward":
        got = {"y": _first(fn(c.x, c.W0, c.A, c.B, c.magnitude, c.scaling, c.bias, **kw))}
    elif check == "backward":
        got = _grads_of(fn(c.dy, c.x, c.W0, c.A, c.B, c.magnitude, c.scaling, c.bias, **kw))
    else:
        got = {"W_merged": _first(fn(c.W0, c.A, c.B, c.magnitude, c.scaling))}
        if unmerge is not None:
            ref = reference(case)
            merged, n = ref["W_merged"].astype(case.dtype), ref["weight_norm"].astype(case.dtype)
            got["W0_unmerged"] = _first(unmerge(merged, c.A, c.B, c.magnitude, c.scaling, n))
    for name in ("x", "W0", "A", "B", "magnitude", "bias", "dy", "dropout_mask"):
        before, after = getattr(case, name), getattr(c, name)
        if before is not None and not np.array_equal(before, after):
            raise _WroteInput(f"your {check} wrote to its input {name!r}: a port must not modify its inputs")
    return {k: _to_numpy(v) for k, v in got.items()}


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
                f"with k = {t['k']}, times the term scale {t['scale']:.3g}; see dora_ref.tolerance)"
            )
            return np.inf, info
        r = float(np.max(ratio, initial=0.0))
        if r >= worst:
            worst, worst_name = r, name
    return worst, worst_name


def _expected(check, case, detach_norm, with_unmerge):
    ref = reference(case, detach_norm=detach_norm)
    names = {"forward": ("y",), "backward": GRAD_NAMES, "merge": ("W_merged",)}[check]
    if check == "merge" and with_unmerge:
        names = names + ("W0_unmerged",)
    return {k: ref[k] for k in names}


def _diagnose(check, fn, unmerge, case, dropout, detach_norm):
    """Find the known mistake whose numbers the port reproduces; (key, where) or (None, None)."""
    dtype = case.dtype
    for where, probe in (("on this case", case), ("on a square diagnostic case", _diagnostic_case(dtype, dropout))):
        try:
            got = _call_port(check, fn, unmerge, probe, dropout, detach_norm)
        except Exception:  # noqa: BLE001 - a port that raises cannot be diagnosed on this probe
            continue
        expected = _expected(check, probe, detach_norm, unmerge is not None)
        tols = tolerances(probe, detach_norm=detach_norm)
        if check == "forward":
            variants = _forward_variants(probe)
        elif check == "backward":
            variants = _backward_variants(probe, detach_norm)
        else:
            variants = _merge_variants(probe)
        for key, wrong in variants.items():
            # compare only the outputs the variant changes, and only where it is told apart
            outs = {k: v for k, v in wrong.items() if k in got}
            if not outs:
                continue
            differs = _compare(outs, {k: expected[k] for k in outs}, tols)[0] == np.inf
            matches = _compare(got, outs, tols)[0] != np.inf
            if differs and matches:
                return key, where
    return None, None


def _hypothesis():
    try:
        import hypothesis
        import hypothesis.strategies
    except ImportError as exc:  # pragma: no cover - exercised with hypothesis hidden
        raise ImportError(
            "dora_ref.testing needs hypothesis to draw cases: pip install hypothesis "
            "(or pip install 'dora_ref[test]')"
        ) from exc
    return hypothesis


def _run(check, fn, *, unmerge=None, dtype="float64", dropout=False, detach_norm=True,
         max_examples=100, seed=0):
    if not callable(fn):
        raise TypeError(f"check_{check} needs a callable, got {type(fn).__name__}")
    if unmerge is not None and not callable(unmerge):
        raise TypeError(f"unmerge must be callable or None, got {type(unmerge).__name__}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be a positive int, got {max_examples!r}")
    hyp = _hypothesis()
    stats = {"examples": 0, "worst": 0.0, "where": ""}

    @hyp.settings(
        max_examples=max_examples, deadline=None, database=None,
        verbosity=hyp.Verbosity.quiet, report_multiple_bugs=False,
        suppress_health_check=list(hyp.HealthCheck),
        # no "explain" phase: it reruns the shrunk case hundreds of times to say which
        # arguments could vary, which the message already makes plain
        phases=[hyp.Phase.explicit, hyp.Phase.generate, hyp.Phase.shrink],
    )
    @hyp.seed(seed)
    @hyp.given(_case_strategy(hyp.strategies, dtype, dropout))
    def one_case(params):
        case = make_case(**params)
        try:
            got = _call_port(check, fn, unmerge, case, dropout, detach_norm)
        except Exception as exc:  # noqa: BLE001 - reported as a mismatch, shrunk like one
            text = str(exc) if isinstance(exc, _WroteInput) else f"your {check} raised {type(exc).__name__}: {exc}"
            raise _Mismatch(case, dict(
                output=None, index=None, expected=None, got=None, bound=None, text=text,
            )) from exc
        ratio, info = _compare(got, _expected(check, case, detach_norm, unmerge is not None),
                               tolerances(case, detach_norm=detach_norm))
        if ratio == np.inf:
            raise _Mismatch(case, info)
        stats["examples"] += 1
        if ratio >= stats["worst"]:
            stats["worst"], stats["where"] = ratio, info

    try:
        one_case()
    except _Mismatch as exc:
        hint, where = _diagnose(check, fn, unmerge, exc.case, dropout, detach_norm)
        info = exc.info
        mode = ""
        if check == "backward":
            mode = " (detached norm)" if detach_norm else " (exact gradient)"
        lines = [
            f"check_{check}{mode}: your {check} differs from dora_ref on this minimal case "
            f"(found by hypothesis, then shrunk):",
            f"  case: {exc.case.describe()}",
            f"  {info['text']}",
        ]
        if hint is not None:
            lines.append(f"  hint (your numbers match this mistake {where}): {HINTS[hint]}")
        raise ConformanceError(
            "\n".join(lines), check=check, output=info["output"], index=info["index"],
            expected=info["expected"], got=info["got"], bound=info["bound"], case=exc.case, hint=hint,
        ) from None
    return CheckResult(check, stats["examples"], stats["worst"], stats["where"] or "")


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

    Returns
    -------
    CheckResult
        Cases compared and the largest error / tolerance seen.

    Raises
    ------
    ConformanceError
        An ``AssertionError`` on the first (shrunk) mismatch, or if your
        function raised or wrote to its inputs; the message names the
        output, index, expected and got values, tolerance, the case, and a
        hint when one applies (also in ``.hint``).
    ImportError
        If hypothesis is not installed.
    TypeError, ValueError
        On bad arguments to the check itself.
"""


def check_forward(forward, *, dtype="float64", dropout=False, max_examples=100, seed=0):
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
    return _run("forward", forward, dtype=dtype, dropout=dropout, max_examples=max_examples, seed=seed)


def check_backward(backward, *, detach_norm=True, dtype="float64", dropout=False, max_examples=100, seed=0):
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
                max_examples=max_examples, seed=seed)


def check_merge(merge, unmerge=None, *, dtype="float64", max_examples=100, seed=0):
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
    """
    return _run("merge", merge, unmerge=unmerge, dtype=dtype, max_examples=max_examples, seed=seed)


for _check in (check_forward, check_backward, check_merge):
    _check.__doc__ = _check.__doc__.rstrip() + _COMMON
del _check
