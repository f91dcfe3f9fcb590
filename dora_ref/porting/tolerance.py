"""The one tolerance table: how close two correct computations must agree.

Two correct implementations of the same formula differ only by rounding,
and rounding is bounded by the dtype's unit roundoff u = eps / 2
(float32: u = 2**-24 ~ 6.0e-8; float64: u = 2**-53 ~ 1.1e-16; the
low-precision storage dtypes bfloat16: u = 2**-8 ~ 3.9e-3 and float16:
u = 2**-11 ~ 4.9e-4).

The bound used everywhere in dora_ref's tests and checker
---------------------------------------------------------
A sum of k products computed in any order satisfies (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., Eq. 3.5)::

    |fl(sum) - sum| <= gamma_k * sum |terms|,     gamma_k = k u / (1 - k u)

Two such evaluations therefore differ by at most ``2 gamma_k sum|terms|``.
DoRA's outputs are a handful of such sums chained (the norm, the base
product, the low-rank product, the scale by m / n), so the reduction length
``k`` is the longest of them (``in + r`` for the forward, ``N + in`` for the
weight gradients), and a few more roundings are covered by the safety
factor ``SAFETY = 4``. ``sum|terms|`` is replaced by a *scale*, by default
the largest magnitude of the expected result; where a result can cancel
(nearly-opposite W0 and s*B@A), pass the scale of the terms instead.

The deterministic bound grows like k; errors of real summations grow like
sqrt(k) on average, so the bound is loose by design: a failure is a bug,
not bad luck.

Low precision: bfloat16 and float16
-----------------------------------
Nobody sums in bfloat16 or float16: every implementation worth checking
(PEFT on PyTorch, dora_ref) stores arrays in the low-precision dtype ("lp")
and accumulates in float32. What differs between implementations is *where*
results are rounded to lp. A result computed in float32 from lp inputs (they
upcast exactly) and rounded once to lp has the error::

    |lp(fl32(f)) - f| <= u_lp |f| + gamma_k(u_f32) * scale      (to first order)

the float32 error of the sums (today's bound) plus one rounding. This is
dora_ref's "consistent" rule. A path that rounds to lp after each operation
(PEFT's with ``autocast_adapter_dtype=False``) adds one ``u_lp`` times the
size of the intermediate for every rounding on the way; to first order,
with every intermediate bounded by the output's scale (the sum of absolute
terms), an output R roundings deep has::

    |result - f| <= (R u_lp + gamma_k(u_f32)) * scale

so ``rtol(lp, k, roundings=R) = SAFETY * (R u_lp + 2 gamma_k(u_f32))``.
Below the smallest normal number (float16: 6.1e-5) rounding is absolute,
not relative: each rounding adds up to half the smallest subnormal
(``underflow_error``; float16: 3.0e-8, bfloat16: 4.6e-41), so an lp
tolerance is ``rtol * scale + SAFETY * R * underflow_error``.
``ROUNDINGS`` counts R for each output and each path, from the longest
chain of roundings in PEFT 0.21's code (the chains are in
docs/low_precision.md). A float32 output computed from lp inputs (the norm
n, g, the adapters' gradients in mixed precision) has R = 0 under the
consistent rule: its tolerance is the float32 one.

Finite differences (float64) have their own rule, see ``gradcheck``.
"""
from __future__ import annotations

import numpy as np

from ..core.precision import finfo

SAFETY = 4.0

#: unit roundoff u = eps / 2 of the dtypes sums are computed in (``unit_roundoff`` also knows the lp ones)
UNIT_ROUNDOFF = {
    np.dtype(np.float32): float(np.finfo(np.float32).eps) / 2,
    np.dtype(np.float64): float(np.finfo(np.float64).eps) / 2,
}

#: the low-precision storage dtypes, by name, and their unit roundoff
LOW_PRECISION = {"bfloat16": 2.0**-8, "float16": 2.0**-11}

#: R, the roundings to lp on the longest chain behind each output (``rtol(lp, k, roundings=R)``), per path:
#: "consistent" (float32 computation, one rounding of each lp result; n, g, the magnitude and the
#: mixed-precision adapters' gradients are float32), and PEFT 0.21 with float32 adapters ("peft_mixed",
#: ``autocast_adapter_dtype=True``) or lp adapters ("peft_pure", ``autocast_adapter_dtype=False``). The
#: chains are written out in docs/low_precision.md. "magnitude" is the magnitude at init.
ROUNDINGS = {
    "consistent": dict(y=1, dx=1, weight_norm=0, magnitude=0, dA=0, dB=0, dmagnitude=0, W_merged=1,
                       W0_unmerged=1),
    "peft_mixed": dict(y=3, dx=4, weight_norm=0, magnitude=1, dA=0, dB=0, dmagnitude=2, W_merged=1,
                       W0_unmerged=1),
    "peft_pure": dict(y=9, dx=10, weight_norm=4, magnitude=4, dA=8, dB=7, dmagnitude=6, W_merged=5,
                      W0_unmerged=6),
}


def as_dtype(dtype):
    """``np.dtype(dtype)``, with "bfloat16" resolved through ml_dtypes (imported only then).

    Raises
    ------
    TypeError
        If ``dtype`` names no NumPy dtype.
    """
    if isinstance(dtype, str) and dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"not a dtype: {dtype!r}") from exc


def is_low_precision(dtype):
    """True for bfloat16 and float16 (the storage dtypes summed in float32)."""
    return as_dtype(dtype).name in LOW_PRECISION


def unit_roundoff(dtype):
    """u = eps / 2 of float64, float32, bfloat16 (2**-8) or float16 (2**-11).

    Raises
    ------
    ValueError
        For any other dtype.
    """
    dtype = as_dtype(dtype)
    if dtype.name in LOW_PRECISION:
        return LOW_PRECISION[dtype.name]
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"dtype must be float64, float32, bfloat16 or float16, got {dtype}")
    return UNIT_ROUNDOFF[dtype]


def underflow_error(dtype):
    """Half the smallest subnormal of ``dtype``: the absolute error of one rounding near zero.

    (Higham Eq. 2.8: fl(x) = x (1 + delta) + eta with |eta| <= this.)
    """
    dtype = as_dtype(dtype)
    return float(finfo(dtype).smallest_subnormal) / 2  # bfloat16 too, on NumPy 1


def accumulation_dtype(dtype):
    """The dtype sums are computed in: float32 for the lp dtypes, else the dtype itself."""
    dtype = as_dtype(dtype)
    return np.dtype(np.float32) if dtype.name in LOW_PRECISION else dtype


def gamma(k, dtype):
    """Higham's gamma_k = k u / (1 - k u) for ``dtype``.

    Parameters
    ----------
    k : int
        The reduction length (number of products summed), >= 1.
    dtype : numpy dtype, float32 or float64 (or bfloat16 / float16: a sum
        rounded to lp after every addition, which no implementation here does;
        ``rtol`` uses float32's gamma for lp arrays)

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If k u >= 1 (no bound exists) or the dtype is not one of those four.
    """
    ku = max(int(k), 1) * unit_roundoff(dtype)
    if ku >= 1:
        raise ValueError(f"k = {k} is too long for {dtype}: k * u = {ku} >= 1")
    return ku / (1.0 - ku)


def rtol(dtype, k, *, roundings=1):
    """Relative tolerance of a k-term result: ``SAFETY * 2 * gamma_k``, plus the lp roundings.

    Parameters
    ----------
    dtype : numpy dtype or name
        float64 / float32: the dtype the sums are computed in. bfloat16 /
        float16: the storage dtype of the result, summed in float32.
    k : int
        The longest reduction length.
    roundings : int, default 1
        lp only: R, the roundings to lp on the longest chain behind the
        result (``ROUNDINGS``; 1 for a result rounded once).

    Returns
    -------
    float
        float64 / float32: ``SAFETY * 2 * gamma_k(u)``. lp:
        ``SAFETY * (R * u_lp + 2 * gamma_k(u_f32))``.

    Examples: float64, k = 100: 8.9e-14; float32, k = 100: 4.8e-5;
    bfloat16, k = 100, R = 1: 0.0157; float16, k = 100, R = 1: 0.00200.
    """
    dtype = as_dtype(dtype)
    if dtype.name in LOW_PRECISION:
        if isinstance(roundings, bool) or not isinstance(roundings, (int, np.integer)) or roundings < 0:
            raise ValueError(f"roundings must be an int >= 0, got {roundings!r}")
        return SAFETY * (roundings * LOW_PRECISION[dtype.name] + 2.0 * gamma(k, np.float32))
    return SAFETY * 2.0 * gamma(k, dtype)


def assert_close(actual, expected, *, dtype=None, k, scale=None, name="value", roundings=1):
    """Assert |actual - expected| <= rtol(dtype, k, roundings=roundings) * scale elementwise.

    Parameters
    ----------
    actual, expected : array_like, same shape
    dtype : numpy dtype, optional
        The dtype both were computed in (for bfloat16 / float16: stored
        in, summed in float32); default ``actual``'s.
    k : int
        The longest reduction length in the computation.
    roundings : int, default 1
        lp dtypes only: the roundings to lp behind the result (``rtol``).
    scale : float or ndarray broadcastable to ``expected``, optional
        The size of the summed terms, ``sum |terms|`` (elementwise if an
        array); default ``max|expected|`` (or 1 if the expected array is all
        zero). Where the result can cancel, pass the sum of absolute terms.
    name : str
        Names the quantity in the failure message.

    Raises
    ------
    AssertionError
        With the worst index, both values, the error and the bound.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {actual.shape}, expected {expected.shape}")
    dtype = as_dtype(dtype or actual.dtype)
    if scale is None:
        scale = float(np.max(np.abs(expected.astype(np.float64)))) if expected.size else 1.0
        scale = scale or 1.0
    tol = rtol(dtype, k, roundings=roundings)
    bound = np.broadcast_to(tol * np.asarray(scale, dtype=np.float64), expected.shape)
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    ok = err <= bound  # NaN compares False
    if not np.all(ok):
        excess = np.where(ok, -np.inf, np.where(np.isnan(err), np.inf, err - bound))
        worst = np.unravel_index(int(np.argmax(excess)), err.shape)
        raise AssertionError(
            f"{name}: at index {tuple(int(i) for i in worst)} got {actual[worst]!r}, "
            f"expected {expected[worst]!r}: error {err[worst]:.3g} > bound {bound[worst]:.3g} "
            f"(rtol {tol:.3g} for {dtype}, k={k}"
            + (f", {roundings} lp rounding(s))" if dtype.name in LOW_PRECISION else ")")
        )


def dora_reduction_length(output, *, n_rows, in_features, out_features, r):
    """The reduction length ``k`` that bounds the rounding of one DoRA output.

    Each DoRA output is a short chain of sums; ``k`` is the total length of
    the sums on the longest path from the inputs to that output (a few extra
    roundings per chain are covered by ``SAFETY``):

    ==================  =======================  ===================================
    output              k                        longest chain
    ==================  =======================  ===================================
    ``weight_norm``     in + r                   (B @ A)_ij over r, then sum_j over in
    ``y``               in + r                   x @ A.T over in, then @ B.T over r
    ``dx``              out + r                  dz @ B over out, then @ A over r
    ``dA`` ``dB``       N + in + out + r         dg (over N of an in + r sum) feeds the
    ``dmagnitude``                               norm term, then a product over out
    ``W_merged``        in + r                   the norm, then one product over r
    ``W0_unmerged``     2 (in + r)               a merge, then its inverse
    ==================  =======================  ===================================

    Parameters
    ----------
    output : str
        One of the names above (``"dA_exact"``-style suffixes are accepted).
    n_rows, in_features, out_features, r : int
        N (rows of x), in, out and the rank (for several adapters, the sum of
        their ranks).

    Returns
    -------
    int

    Raises
    ------
    ValueError
        For an unknown output name.
    """
    base = output.split("_")[0] if output.startswith("d") else output
    N, i, o = int(n_rows), int(in_features), int(out_features)
    table = {
        "weight_norm": i + r,
        "y": i + r,
        "dx": o + r,
        "dA": N + i + o + r,
        "dB": N + i + o + r,
        "dmagnitude": N + i + o + r,
        "W_merged": i + r,
        "W0_unmerged": 2 * (i + r),
    }
    if base not in table:
        raise ValueError(f"output must be one of {sorted(table)}, got {output!r}")
    return table[base]
