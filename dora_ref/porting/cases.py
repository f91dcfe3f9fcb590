"""The cases the checker draws, the reference it computes, and its tolerances.

A ``Case`` holds one linear DoRA layer's inputs in PyTorch's layout;
``reference`` is dora_ref's forward, backward and merge on it in float64
(``dora_ref.core.functional``), and ``tolerances`` bounds each output's
rounding error: ``rtol(dtype, k)`` (``dora_ref.porting.tolerance``) with k
the reduction length, times the size of the summed terms (``term_scales``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import variants as _V
from ..core import functional as F
from .tolerance import ROUNDINGS, SAFETY, accumulation_dtype, as_dtype, dora_reduction_length, gamma, \
    is_low_precision, rtol, underflow_error, unit_roundoff

#: the outputs a low-precision port returns in its storage dtype (the rest are float32: n, the magnitude and,
#: with float32 adapters, their gradients)
LP_OUTPUTS = ("y", "dx", "W_merged", "W0_unmerged", "y_identity")


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
        """The storage dtype (W0's): float64, float32, or bfloat16 / float16 with float32 adapters."""
        return self.W0.dtype

    def copy(self):
        """The same case with fresh copies of its arrays, each in its own dtype."""
        cp = lambda a: None if a is None else a.copy()  # noqa: E731
        return Case(
            cp(self.x), cp(self.W0), cp(self.A), cp(self.B), cp(self.magnitude),
            self.scaling, cp(self.bias), cp(self.dy), cp(self.dropout_mask), dict(self.params),
        )

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
    dtype : {"float64", "float32", "bfloat16", "float16"}
        bfloat16 / float16 (PEFT's mixed precision, ``autocast_adapter_dtype=True``):
        x, W0, bias, dy and the dropout mask are stored in that dtype; A and B
        hold values of that dtype (PEFT rounds them at init) stored float32;
        the magnitude is float32 (the norm of the stored weights, times the
        trained factor, rounded once to float32).
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
    dtype = as_dtype(dtype)
    params = dict(
        N=N, in_features=in_features, out_features=out_features, r=r, dtype=str(dtype),
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
    lp = is_low_precision(dtype)
    adapter = np.dtype(np.float32) if lp else dtype
    W0 = W0.astype(dtype)
    A, B = (a.astype(dtype).astype(adapter) for a in (A, B))  # lp values in float32, as PEFT's autocast keeps them
    # the magnitude is the norm of the weights as stored in this dtype
    m = np.linalg.norm(W0.astype(np.float64) + scaling * (B.astype(np.float64) @ A.astype(np.float64)),
                       axis=1 if magnitude_axis == "out" else 0)
    if magnitude == "trained":
        m = m * factor
    elif magnitude != "init":
        raise ValueError(f"magnitude must be 'init' or 'trained', got {magnitude!r}")
    cast = lambda a, d=dtype: None if a is None else np.ascontiguousarray(a, dtype=d)  # noqa: E731
    return Case(cast(x), W0, A, B, cast(m, adapter), float(scaling), cast(b), cast(dy), cast(mask), params)


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
        acc = accumulation_dtype(case.dtype)
        u = unit_roundoff(acc)
        weight = (gamma(i + 1, acc) + u) / (2.0 * gamma(k, acc))
        dm_terms = dm_terms + weight * np.sum(dya, axis=0) * bias / safe
    if is_low_precision(case.dtype) and c.bias is not None:
        # lp (PEFT): z = lp(lp(x@W0.T + b) - b), two lp roundings of terms of size |z| + |b|: the |b| part
        # enters dm with weight 1, so that rtol(lp, k, roundings=2) covers it
        dm_terms = dm_terms + np.sum(dya, axis=0) * bias / safe
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

    For a bfloat16 / float16 case each output is judged in the dtype it is
    returned in: y, dx and the merged / unmerged weights in the storage
    dtype, with ``rtol(lp, k, roundings=R)``; n, the magnitude and the
    float32 adapters' gradients in float32. R is the larger of the
    "consistent" rule's count and PEFT's mixed-precision path's
    (``tolerance.ROUNDINGS``), except for the magnitude at init, which
    both the consistent rule and the paper leave unrounded (R = 0): a port
    that rounds it to the storage dtype (PEFT with
    ``autocast_adapter_dtype=True``) fails ``check_init`` with the hint
    ``magnitude_rounded_at_init``.

    Parameters
    ----------
    case : Case
    detach_norm : bool

    Returns
    -------
    dict of str to dict
        For each output: ``atol`` (float), ``rtol``, ``k``, ``scale``, ``dtype``
        (and ``roundings`` for an lp case).
    """
    N, i, o, r = case.shapes()
    out = {}
    lp = is_low_precision(case.dtype)
    for name, scale in term_scales(case, detach_norm=detach_norm).items():
        k = dora_reduction_length(name, n_rows=N, in_features=i, out_features=o, r=r)
        if lp:
            out[name] = _lp_tolerance(case.dtype, name, k, scale)
            continue
        rt = rtol(case.dtype, k)
        # a scale of 0 (e.g. dA when B = 0 and m = 0) still allows rounding of 0
        out[name] = dict(atol=rt * scale if scale > 0 else 0.0, rtol=rt, k=k, scale=scale,
                         dtype=str(case.dtype))
    return out


def lp_roundings(name):
    """R for output ``name`` of a low-precision case (see ``tolerances``): the checker's choice."""
    if name == "magnitude":
        return ROUNDINGS["consistent"]["magnitude"]
    base = "y" if name == "y_identity" else name
    return max(ROUNDINGS["consistent"][base], ROUNDINGS["peft_mixed"][base])


def _lp_tolerance(dtype, name, k, scale):
    """One output's tolerance in a low-precision case: lp outputs get R roundings, the rest float32's."""
    R = lp_roundings(name)
    stored = name in LP_OUTPUTS
    dt = dtype if (stored or R) else np.dtype(np.float32)
    rt = rtol(dt, k, roundings=R) if is_low_precision(dt) else rtol(dt, k)
    atol = (rt * scale if scale > 0 else 0.0) + SAFETY * R * underflow_error(dt)  # rounding near zero is absolute
    return dict(atol=atol, rtol=rt, k=k, scale=scale, dtype=str(dt), roundings=R)
