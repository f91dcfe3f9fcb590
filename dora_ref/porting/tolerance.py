"""The one tolerance table: how close two correct computations must agree.

Two correct implementations of the same formula differ only by rounding,
and rounding is bounded by the dtype's unit roundoff u = eps / 2
(float32: u = 2**-24 ~ 6.0e-8; float64: u = 2**-53 ~ 1.1e-16).

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

Finite differences (float64) have their own rule, see ``gradcheck``.
"""
from __future__ import annotations

import numpy as np

SAFETY = 4.0

#: unit roundoff u = eps / 2 of each supported dtype
UNIT_ROUNDOFF = {
    np.dtype(np.float32): float(np.finfo(np.float32).eps) / 2,
    np.dtype(np.float64): float(np.finfo(np.float64).eps) / 2,
}


def gamma(k, dtype):
    """Higham's gamma_k = k u / (1 - k u) for ``dtype``.

    Parameters
    ----------
    k : int
        The reduction length (number of products summed), >= 1.
    dtype : numpy dtype, float32 or float64

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If k u >= 1 (no bound exists) or the dtype is not float32/float64.
    """
    dtype = np.dtype(dtype)
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    ku = max(int(k), 1) * UNIT_ROUNDOFF[dtype]
    if ku >= 1:
        raise ValueError(f"k = {k} is too long for {dtype}: k * u = {ku} >= 1")
    return ku / (1.0 - ku)


def rtol(dtype, k):
    """Relative tolerance ``SAFETY * 2 * gamma_k`` for two evaluations of k-term sums.

    Examples: float64, k = 100: 8.9e-14; float32, k = 100: 4.8e-5.
    """
    return SAFETY * 2.0 * gamma(k, dtype)


def assert_close(actual, expected, *, dtype=None, k, scale=None, name="value"):
    """Assert |actual - expected| <= rtol(dtype, k) * scale elementwise.

    Parameters
    ----------
    actual, expected : array_like, same shape
    dtype : numpy dtype, optional
        The dtype both were computed in; default ``actual``'s.
    k : int
        The longest reduction length in the computation.
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
    dtype = np.dtype(dtype or actual.dtype)
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 1.0
        scale = scale or 1.0
    bound = np.broadcast_to(rtol(dtype, k) * np.asarray(scale, dtype=np.float64), expected.shape)
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    ok = err <= bound  # NaN compares False
    if not np.all(ok):
        excess = np.where(ok, -np.inf, np.where(np.isnan(err), np.inf, err - bound))
        worst = np.unravel_index(int(np.argmax(excess)), err.shape)
        raise AssertionError(
            f"{name}: at index {tuple(int(i) for i in worst)} got {actual[worst]!r}, "
            f"expected {expected[worst]!r}: error {err[worst]:.3g} > bound {bound[worst]:.3g} "
            f"(rtol {rtol(dtype, k):.3g} for {dtype}, k={k})"
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
