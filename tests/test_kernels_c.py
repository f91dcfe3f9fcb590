"""The C kernels (dora_ref.kernels.c) against their NumPy twins.

Each C kernel must compute what its twin in ``dora_ref.core.kernels_numpy``
computes, up to rounding, for every shape (1, odd sizes, sizes that are not
a multiple of the 16-float tile), both dtypes, any input layout, and with
NaN/Inf propagated as NumPy propagates them. Its result must not depend on
the number of OpenMP threads, bit for bit. The wrapper must refuse bad
dtypes and shapes with an error that names the argument.

Tolerances (derivation)
-----------------------
Both backends evaluate the same formula; they differ only in the order of
their sums (BLAS vs the C tile), FMA contraction, and the C side's double
accumulators. A sum of k products computed in any order is within
``gamma_k * sum|terms|`` of the exact value (Higham, Eq. 3.5;
``gamma_k = k u / (1 - k u)``, u = eps / 2; ``dora_ref.porting.tolerance.gamma``),
so two evaluations differ by at most ``2 gamma_k sum|terms|``. Each test
builds ``sum|terms|`` *elementwise*, in float64, from the absolute values of
the inputs (so cancellation cannot make the bound too tight) and allows a
safety factor of 4 for the few extra roundings (the scaling, the division
by n, the square root):

* column_norm: V_ij = W0_ij + s B_i.A_j has terms a_ij = |W0_ij| + |s| |B_i|.|A_j|;
  a perturbation dV moves ||V_i|| by at most ||dV_i|| (triangle inequality),
  and the sum of squares adds a relative gamma_in: bound
  ``2 * 4 * gamma_{in + r + 2} * ||a_i||``.
* forward_epilogue: ``|g| (|base| + |s| |U| @ |B|.T) + |bias|`` with k = r + 3.
* backward_epilogue: dg sums N products dy * z: ``sum_N |dy| (|base| + |s| |U| @ |B|.T)``
  with k = N + r + 2; dz = dy * g is one rounding in both (bitwise equal).
* merge: W'_ij = (m_i / n_i) V_ij: ``|m_i / n_i| a_ij (1 + ||a_i|| / n_i)`` with
  k = in + r + 4 (the error of V_ij plus the relative error of n_i).
* unmerge: ``|W'| / |factor| + |s| |B| @ |A|`` with k = r + 2.
* backward_lowrank: dg and dz as backward_epilogue; dU = s dz @ B sums out
  products: ``|s| |dz| @ |B|`` with k = out + 2; dB = s dz.T @ U sums N:
  ``|s| |dz|.T @ |U|`` with k = N + 2.
* norm_gradient_products: ``|W0| @ |A|.T`` with k = in + 2 and
  ``|C|.T @ |W0|`` with k = out + 2.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_ref.core import kernels_numpy as NP
from dora_ref.porting.tolerance import gamma

from ci_env import env_flag  # the suite's one parser of DORA_REF_REQUIRE_*

_REQUIRE_C = env_flag("DORA_REF_REQUIRE_C")
try:
    from dora_ref.kernels import c as C
except ImportError as exc:  # pragma: no cover - depends on the install
    if _REQUIRE_C:
        raise ImportError(
            f"DORA_REF_REQUIRE_C is set but the C extension does not import: {exc}"
        ) from exc
    pytest.skip(
        f"the C backend is not built ({exc}); reinstall with a C compiler "
        f"(pip install -e .) to test it",
        allow_module_level=True,
    )

SAFETY = 4.0


@pytest.fixture(autouse=True)
def backend():
    """Override conftest's per-backend fixture: these tests call both backends directly."""
    yield "c"


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def _problem(seed, dtype, out_f, in_f, r, N, scaling=0.7):
    """Random weights and activations; B is nonzero (unlike PEFT's init) to test the tile."""
    rng = np.random.default_rng(seed)

    def draw(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return dict(
        W0=draw(out_f, in_f),
        A=draw(r, in_f),
        B=draw(out_f, r),
        m=(rng.random(out_f) + 0.5).astype(dtype),
        g=(rng.random(out_f) + 0.5).astype(dtype),
        bias=draw(out_f),
        base=draw(N, out_f),
        U=draw(N, r),
        dy=draw(N, out_f),
        s=scaling,
    )


def _assert_within(actual, expected, bound, name):
    """Elementwise |actual - expected| <= bound, both computed by the tests' rules."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    bad = err > bound
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: C and NumPy differ by {err[i]:.3g} at {i} (bound {bound[i]:.3g}); "
            f"C {actual[i]!r}, NumPy {expected[i]!r}; {int(bad.sum())} of {bad.size} elements"
        )


def _abs64(*arrays):
    return [np.abs(np.asarray(a, dtype=np.float64)) for a in arrays]


def _norm_terms(W0, A, B, s):
    """a_ij = |W0_ij| + |s| |B_i| . |A_j|, the absolute terms of V, float64."""
    aW0, aA, aB = _abs64(W0, A, B)
    return aW0 + abs(s) * (aB @ aA)


# ---------------------------------------------------------------------------
# C equals NumPy, over drawn shapes
# ---------------------------------------------------------------------------

# 1, odd sizes, sizes around the 16-float / 8-double tile and the 4-row group
_sizes = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 47, 64, 65])
_shapes = st.tuples(_sizes, _sizes, st.integers(1, 19), _sizes)  # out, in, r, N
_dtypes = st.sampled_from([np.float32, np.float64])
_scalings = st.sampled_from([0.7, 2.0, -1.5, 0.0, 1 / 8])
_seeds = st.integers(0, 2**32 - 1)


def check_column_norm(p, dtype):
    W0, A, B, s = p["W0"], p["A"], p["B"], p["s"]
    in_f, r = W0.shape[1], A.shape[0]
    bound = 2 * SAFETY * gamma(in_f + r + 2, dtype) * np.linalg.norm(_norm_terms(W0, A, B, s), axis=1)
    _assert_within(C.column_norm(W0, A, B, s), NP.column_norm(W0, A, B, s), bound, "column_norm")


def check_forward_epilogue(p, dtype, with_bias):
    base, U, B, g, s = p["base"], p["U"], p["B"], p["g"], p["s"]
    bias = p["bias"] if with_bias else None
    abase, aU, aB, ag = _abs64(base, U, B, g)
    terms = ag * (abase + abs(s) * (aU @ aB.T))
    if with_bias:
        terms = terms + np.abs(bias.astype(np.float64))
    bound = 2 * SAFETY * gamma(B.shape[1] + 3, dtype) * terms
    _assert_within(
        C.forward_epilogue(base, U, B, g, s, bias),
        NP.forward_epilogue(base, U, B, g, s, bias),
        bound,
        "forward_epilogue",
    )


def check_backward_epilogue(p, dtype):
    dy, base, U, B, g, s = p["dy"], p["base"], p["U"], p["B"], p["g"], p["s"]
    ady, abase, aU, aB = _abs64(dy, base, U, B)
    N, r = U.shape
    dg_terms = np.sum(ady * (abase + abs(s) * (aU @ aB.T)), axis=0)
    dg_c, dz_c = C.backward_epilogue(dy, base, U, B, g, s)
    dg_np, dz_np = NP.backward_epilogue(dy, base, U, B, g, s)
    _assert_within(dg_c, dg_np, 2 * SAFETY * gamma(N + r + 2, dtype) * dg_terms, "dg")
    np.testing.assert_array_equal(dz_c, dz_np, err_msg="dz = dy * g is one rounding in both")


def check_backward_lowrank(p, dtype, fn):
    """``fn`` (C's backward_lowrank or its one-pass kernel) against the NumPy twin."""
    dy, base, U, B, g, s = p["dy"], p["base"], p["U"], p["B"], p["g"], p["s"]
    ady, abase, aU, aB = _abs64(dy, base, U, B)
    N, r = U.shape
    out_f = B.shape[0]
    dg_c, dz_c, dU_c, dB_c = fn(dy, base, U, B, g, s)
    dg_np, dz_np, dU_np, dB_np = NP.backward_lowrank(dy, base, U, B, g, s)
    dg_terms = np.sum(ady * (abase + abs(s) * (aU @ aB.T)), axis=0)
    _assert_within(dg_c, dg_np, 2 * SAFETY * gamma(N + r + 2, dtype) * dg_terms, "dg")
    np.testing.assert_array_equal(dz_c, dz_np, err_msg="dz = dy * g is one rounding in both")
    (adz,) = _abs64(dz_np)
    _assert_within(dU_c, dU_np, 2 * SAFETY * gamma(out_f + 2, dtype) * abs(s) * (adz @ aB), "dU")
    _assert_within(dB_c, dB_np, 2 * SAFETY * gamma(N + 2, dtype) * abs(s) * (adz.T @ aU), "dB")


def check_norm_gradient_products(p, dtype, fn):
    """``fn`` (C's norm_gradient_products or its one-pass kernel) against the twin."""
    W0, A, Cm = p["W0"], p["A"], p["B"] * p["g"][:, None]  # C = c * B: any (out, r)
    out_f, in_f = W0.shape
    aW0, aA, aC = _abs64(W0, A, Cm)
    WAt_c, CtW_c = fn(W0, A, Cm)
    WAt_np, CtW_np = NP.norm_gradient_products(W0, A, Cm)
    _assert_within(WAt_c, WAt_np, 2 * SAFETY * gamma(in_f + 2, dtype) * (aW0 @ aA.T), "W0 @ A.T")
    _assert_within(CtW_c, CtW_np, 2 * SAFETY * gamma(out_f + 2, dtype) * (aC.T @ aW0), "C.T @ W0")


def check_merge_unmerge(p, dtype):
    W0, A, B, m, s = p["W0"], p["A"], p["B"], p["m"], p["s"]
    in_f, r = W0.shape[1], A.shape[0]
    a = _norm_terms(W0, A, B, s)
    a_norm = np.linalg.norm(a, axis=1)
    Wm_c, n_c = C.merge(W0, A, B, m, s)
    Wm_np, n_np = NP.merge(W0, A, B, m, s)
    _assert_within(n_c, n_np, 2 * SAFETY * gamma(in_f + r + 2, dtype) * a_norm, "merge n")
    n64 = n_np.astype(np.float64)
    f = np.abs(m.astype(np.float64)) / n64
    bound = 2 * SAFETY * gamma(in_f + r + 4, dtype) * f[:, None] * a * (1 + a_norm / n64)[:, None]
    _assert_within(Wm_c, Wm_np, bound, "merge W'")

    factor = m / n_np
    aWm, aA, aB = _abs64(Wm_np, A, B)
    terms = aWm / np.abs(factor.astype(np.float64))[:, None] + abs(s) * (aB @ aA)
    _assert_within(
        C.unmerge(Wm_np, A, B, factor, s),
        NP.unmerge(Wm_np, A, B, factor, s),
        2 * SAFETY * gamma(r + 2, dtype) * terms,
        "unmerge",
    )


@settings(max_examples=60)
@given(shape=_shapes, dtype=_dtypes, s=_scalings, seed=_seeds)
def test_column_norm_matches_numpy(shape, dtype, s, seed):
    check_column_norm(_problem(seed, dtype, *shape, scaling=s), dtype)


@settings(max_examples=60)
@given(shape=_shapes, dtype=_dtypes, s=_scalings, seed=_seeds, with_bias=st.booleans())
def test_forward_epilogue_matches_numpy(shape, dtype, s, seed, with_bias):
    check_forward_epilogue(_problem(seed, dtype, *shape, scaling=s), dtype, with_bias)


@settings(max_examples=60)
@given(shape=_shapes, dtype=_dtypes, s=_scalings, seed=_seeds)
def test_backward_epilogue_matches_numpy(shape, dtype, s, seed):
    check_backward_epilogue(_problem(seed, dtype, *shape, scaling=s), dtype)


@settings(max_examples=60)
@given(shape=_shapes, dtype=_dtypes, s=_scalings, seed=_seeds)
def test_backward_lowrank_matches_numpy(shape, dtype, s, seed):
    p = _problem(seed, dtype, *shape, scaling=s)
    check_backward_lowrank(p, dtype, C._backward_lowrank_fused)  # the C kernel at any r
    check_backward_lowrank(p, dtype, C.backward_lowrank)  # C or BLAS, by rank


@settings(max_examples=60)
@given(shape=_shapes, dtype=_dtypes, s=_scalings, seed=_seeds)
def test_norm_gradient_products_match_numpy(shape, dtype, s, seed):
    p = _problem(seed, dtype, *shape, scaling=s)
    check_norm_gradient_products(p, dtype, C._norm_gradient_products_fused)
    check_norm_gradient_products(p, dtype, C.norm_gradient_products)


@settings(max_examples=60)
@given(shape=_shapes, dtype=_dtypes, s=_scalings, seed=_seeds)
def test_merge_and_unmerge_match_numpy(shape, dtype, s, seed):
    check_merge_unmerge(_problem(seed, dtype, *shape, scaling=s), dtype)


# Shapes past the one-thread threshold, with several row blocks (16 rows),
# several backward column blocks (256 columns) and ragged edges everywhere.
# backward_lowrank: several column blocks (512+ columns); norm_gradient_products:
# several row slices (out >= 64 r) and column chunks (512 columns).
LARGE_SHAPES = [(300, 257, 9, 70), (129, 1000, 64, 5), (517, 33, 3, 301), (1100, 1050, 4, 37)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", LARGE_SHAPES)
def test_large_shapes_match_numpy(shape, dtype):
    p = _problem(1, dtype, *shape)
    check_column_norm(p, dtype)
    check_forward_epilogue(p, dtype, with_bias=True)
    check_forward_epilogue(p, dtype, with_bias=False)
    check_backward_epilogue(p, dtype)
    check_merge_unmerge(p, dtype)
    check_backward_lowrank(p, dtype, C._backward_lowrank_fused)
    check_norm_gradient_products(p, dtype, C._norm_gradient_products_fused)


def test_lowrank_kernels_dispatch_on_rank():
    """Up to FUSED_MAX_RANK the public kernels are the one-pass C kernels; above, BLAS."""
    for r in (C.FUSED_MAX_RANK, C.FUSED_MAX_RANK + 1):
        p = _problem(2, np.float32, 40, 30, r, 20)
        args = (p["dy"], p["base"], p["U"], p["B"], p["g"], p["s"])
        want = C._backward_lowrank_fused(*args) if r <= C.FUSED_MAX_RANK else (
            *C.backward_epilogue(*args), p["s"] * ((p["dy"] * p["g"]) @ p["B"]), None)
        got = C.backward_lowrank(*args)
        for w, g in zip(want[:3], got[:3]):
            np.testing.assert_array_equal(g, w)
        prods = (p["W0"], p["A"], p["B"])
        want = C._norm_gradient_products_fused(*prods) if r <= C.FUSED_MAX_RANK else (
            p["W0"] @ p["A"].T, p["B"].T @ p["W0"])
        for w, g in zip(want, C.norm_gradient_products(*prods)):
            np.testing.assert_array_equal(g, w)


def test_column_norm_has_no_cancellation():
    """W0 = -s B @ A exactly plus a tiny residual: the norm is the residual's.

    The expanded formula ||w||^2 + 2 s b.(A w) + s^2 b^T (A A^T) b would
    subtract numbers of size 1e8 and lose the answer; the C kernel forms
    each row of V and must give the residual's norm to float64 accuracy.
    """
    rng = np.random.default_rng(3)
    A = rng.integers(-4, 5, size=(4, 50)).astype(np.float64)
    B = rng.integers(-4, 5, size=(6, 4)).astype(np.float64) * 1e3
    residual = rng.standard_normal((6, 50)) * 1e-6
    W0 = -(B @ A) + residual  # B @ A is exact in float64 (small integers)
    n = C.column_norm(W0, A, B, 1.0)
    np.testing.assert_allclose(n, np.linalg.norm(residual, axis=1), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(70, 4100, 40), (133, 8200, 17), (9, 4100, 64)])
def test_column_norm_in_column_chunks_gives_the_bits_of_the_merge(shape, dtype):
    """When A is large (r * in * 8 > 1 MiB), column_norm takes
    the columns in chunks, each chunk for all the rows of a block, while the
    merge takes each row group across all columns: each row's squares are
    still added in column order into the same lanes, so n has the same bits
    (ragged chunks, row groups and row blocks in these shapes)."""
    out_f, in_f, r = shape
    rng = np.random.default_rng(sum(shape))
    W0, A, B = (rng.standard_normal(sz).astype(dtype) for sz in ((out_f, in_f), (r, in_f), (out_f, r)))
    m = rng.random(out_f).astype(dtype) + 0.5
    n = C.column_norm(W0, A, B, 0.7)
    _, n_merge = C.merge(W0, A, B, m, 0.7)
    np.testing.assert_array_equal(n, n_merge)
    a = _norm_terms(W0, A, B, 0.7)
    _assert_within(n, NP.column_norm(W0, A, B, 0.7),
                   2 * SAFETY * gamma(in_f + r + 2, dtype) * np.linalg.norm(a, axis=1), "n")


def test_empty_sizes():
    """Zero rows, columns or batch: shapes as NumPy's, no crash."""
    for out_f, in_f, r, N in [(0, 5, 2, 3), (4, 0, 2, 3), (4, 5, 2, 0)]:
        p = _problem(0, np.float64, out_f, in_f, r, N)
        np.testing.assert_allclose(
            C.column_norm(p["W0"], p["A"], p["B"], 0.5), NP.column_norm(p["W0"], p["A"], p["B"], 0.5),
            rtol=1e-13,
        )
        y = C.forward_epilogue(p["base"], p["U"], p["B"], p["g"], 0.5, p["bias"])
        assert y.shape == (N, out_f)
        np.testing.assert_allclose(
            y, NP.forward_epilogue(p["base"], p["U"], p["B"], p["g"], 0.5, p["bias"]),
            rtol=1e-12, atol=1e-12)  # in = 0 does not empty y: g * (base + s U B^T) + bias
        dg, dz = C.backward_epilogue(p["dy"], p["base"], p["U"], p["B"], p["g"], 0.5)
        dg_np, dz_np = NP.backward_epilogue(p["dy"], p["base"], p["U"], p["B"], p["g"], 0.5)
        np.testing.assert_allclose(dg, dg_np, rtol=1e-12, atol=1e-12)
        assert dz.shape == dz_np.shape == (N, out_f)
        np.testing.assert_array_equal(dz, dz_np)  # dy * g: one rounding in both
        W_merged, n = C.merge(p["W0"], p["A"], p["B"], p["m"], 0.5)
        with np.errstate(divide="ignore", invalid="ignore"):
            W_merged_np, n_np = NP.merge(p["W0"], p["A"], p["B"], p["m"], 0.5)
        assert W_merged.shape == (out_f, in_f)
        np.testing.assert_allclose(n, n_np, rtol=1e-13)
        np.testing.assert_allclose(W_merged, W_merged_np, rtol=1e-13)
        for got, want in zip(
            C._backward_lowrank_fused(p["dy"], p["base"], p["U"], p["B"], p["g"], 0.5),
            NP.backward_lowrank(p["dy"], p["base"], p["U"], p["B"], p["g"], 0.5),
        ):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        for got, want in zip(
            C._norm_gradient_products_fused(p["W0"], p["A"], p["B"]),
            NP.norm_gradient_products(p["W0"], p["A"], p["B"]),
        ):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# layouts: strided, Fortran-ordered and read-only inputs are accepted
# ---------------------------------------------------------------------------


def _layouts(arr):
    """The same values as a strided view, a Fortran-ordered copy and a read-only array."""
    wide = np.zeros((arr.shape[0], 2 * arr.shape[1]) if arr.ndim == 2 else (2 * arr.shape[0],),
                    dtype=arr.dtype)
    if arr.ndim == 2:
        wide[:, ::2] = arr
        strided = wide[:, ::2]
    else:
        wide[::2] = arr
        strided = wide[::2]
    readonly = arr.copy()
    readonly.setflags(write=False)
    return {"strided": strided, "fortran": np.asfortranarray(arr), "readonly": readonly}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["strided", "fortran", "readonly"])
def test_any_input_layout_gives_the_same_bits(layout, dtype):
    p = _problem(7, dtype, 37, 45, 5, 23)
    q = {k: (_layouts(v)[layout] if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    for name in ("W0", "A", "B", "base", "U", "dy"):
        if layout != "readonly":
            assert not q[name].flags.c_contiguous or q[name].shape[0] == 1
    calls = [
        lambda d: C.column_norm(d["W0"], d["A"], d["B"], d["s"]),
        lambda d: C.forward_epilogue(d["base"], d["U"], d["B"], d["g"], d["s"], d["bias"]),
        lambda d: C.backward_epilogue(d["dy"], d["base"], d["U"], d["B"], d["g"], d["s"]),
        lambda d: C.merge(d["W0"], d["A"], d["B"], d["m"], d["s"]),
        lambda d: C.unmerge(d["W0"], d["A"], d["B"], d["m"], d["s"]),
        lambda d: C.backward_lowrank(d["dy"], d["base"], d["U"], d["B"], d["g"], d["s"]),
        lambda d: C.norm_gradient_products(d["W0"], d["A"], d["B"]),
    ]
    for call in calls:
        want, got = call(p), call(q)
        for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            assert g.flags.c_contiguous and g.flags.writeable
            np.testing.assert_array_equal(g, w)


def test_outputs_are_fresh_arrays():
    """The wrapper allocates outputs: C never writes into the caller's arrays."""
    p = _problem(0, np.float32, 8, 8, 2, 4)
    before = {k: v.copy() for k, v in p.items() if isinstance(v, np.ndarray)}
    C.merge(p["W0"], p["A"], p["B"], p["m"], p["s"])
    C.backward_epilogue(p["dy"], p["base"], p["U"], p["B"], p["g"], p["s"])
    for k, v in before.items():
        np.testing.assert_array_equal(p[k], v, err_msg=f"{k} was modified")


# ---------------------------------------------------------------------------
# NaN and Inf propagate as in NumPy
# ---------------------------------------------------------------------------


def _assert_same_nonfinite(c, n, name):
    for what, fn in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        np.testing.assert_array_equal(fn(c), fn(n), err_msg=f"{name}: {what} pattern differs")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN/Inf on purpose
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_propagate_like_numpy(bad, dtype):
    p = _problem(5, dtype, 21, 19, 3, 17)
    p["W0"][3, 4] = bad
    p["W0"][10, :] = 0  # with B row 10 zero: n = 0, the merge divides by it
    p["B"][10, :] = 0
    p["base"][2, 5] = bad
    p["dy"][7, 1] = bad
    p["g"][6] = bad
    W0, A, B, m, s = p["W0"], p["A"], p["B"], p["m"], p["s"]
    _assert_same_nonfinite(C.column_norm(W0, A, B, s), NP.column_norm(W0, A, B, s), "column_norm")
    for (c, n), name in zip(zip(C.merge(W0, A, B, m, s), NP.merge(W0, A, B, m, s)), ("W'", "n")):
        _assert_same_nonfinite(c, n, f"merge {name}")
    _assert_same_nonfinite(
        C.unmerge(W0, A, B, m, s), NP.unmerge(W0, A, B, m, s), "unmerge"
    )
    args = (p["base"], p["U"], B, p["g"], s)
    _assert_same_nonfinite(
        C.forward_epilogue(*args, p["bias"]), NP.forward_epilogue(*args, p["bias"]), "forward"
    )
    for c, n, name in zip(
        C.backward_epilogue(p["dy"], *args), NP.backward_epilogue(p["dy"], *args), ("dg", "dz")
    ):
        _assert_same_nonfinite(c, n, name)
    # the sums over N and out carry a NaN or Inf into whole rows or columns
    for c, n, name in zip(
        C.backward_lowrank(p["dy"], *args), NP.backward_lowrank(p["dy"], *args),
        ("dg", "dz", "dU", "dB"),
    ):
        _assert_same_nonfinite(c, n, f"backward_lowrank {name}")
    for c, n, name in zip(
        C.norm_gradient_products(W0, A, B), NP.norm_gradient_products(W0, A, B), ("WAt", "CtW")
    ):
        _assert_same_nonfinite(c, n, f"norm_gradient_products {name}")


def test_zero_norm_row_merges_to_nan_like_numpy():
    """n = 0 gives m / 0 = inf and inf * 0 = NaN, as NumPy; the caller checks n."""
    W0 = np.ones((3, 5))
    W0[1] = 0
    A, B, m = np.ones((2, 5)), np.zeros((3, 2)), np.ones(3)
    Wm, n = C.merge(W0, A, B, m, 1.0)
    assert n[1] == 0 and np.isnan(Wm[1]).all() and np.isfinite(Wm[[0, 2]]).all()


# ---------------------------------------------------------------------------
# the result does not depend on the number of threads
# ---------------------------------------------------------------------------

def _all_kernels_digest():
    """sha256 of every C kernel's results on shapes with several blocks per thread."""
    h = hashlib.sha256()
    # several blocks per thread, ragged edges; r = 3 also gives norm_gradient_products
    # several row slices and backward_lowrank several column blocks
    for dtype, (out_f, in_f, r, N) in [(dt, sh) for dt in (np.float32, np.float64)
                                       for sh in ((531, 389, 13, 301), (1100, 1050, 3, 61),
                                                  (150, 4100, 40, 3))]:  # norm in column chunks
        rng = np.random.default_rng(11)
        W0, A, B = (rng.standard_normal(s).astype(dtype) for s in ((out_f, in_f), (r, in_f), (out_f, r)))
        base, dy, U = (rng.standard_normal(s).astype(dtype) for s in ((N, out_f), (N, out_f), (N, r)))
        g, m, bias = (rng.random(out_f).astype(dtype) + 0.5 for _ in range(3))
        results = [C.column_norm(W0, A, B, 0.3), C.forward_epilogue(base, U, B, g, 0.3, bias),
                   *C.backward_epilogue(dy, base, U, B, g, 0.3), *C.merge(W0, A, B, m, 0.3),
                   C.unmerge(W0, A, B, m, 0.3),
                   *C._backward_lowrank_fused(dy, base, U, B, g, 0.3),
                   *C._norm_gradient_products_fused(W0, A, B)]
        z = base.copy()  # the training forward's z over its base product, and its backward
        results += [C.forward_epilogue(z, U, B, g, 0.3, bias, z_out=z), z,
                    *C.backward_epilogue_z(dy, z, g), *C._backward_lowrank_z_fused(dy, z, U, B, g, 0.3)]
        for a in results:
            h.update(a.tobytes())
    return h.hexdigest()


@pytest.fixture
def forced_threads():
    """Yield set_threads with every call forced onto that many threads; restore after."""
    C._set_always_parallel(True)
    try:
        yield C.set_threads
    finally:
        C._set_always_parallel(False)
        C.set_threads(0)


def test_bitwise_identical_for_any_thread_count(forced_threads):
    if not C.openmp_enabled():  # one thread whatever is asked: nothing to compare
        if env_flag("DORA_REF_REQUIRE_OPENMP"):
            pytest.fail(f"DORA_REF_REQUIRE_OPENMP is set but the C kernels lack OpenMP: "
                        f"{C.build_info()}")
        pytest.skip(f"the C kernels were built without OpenMP ({C.build_info()})")
    digests = {}
    for threads in (1, 2, 3):
        forced_threads(threads)
        if C.openmp_enabled():
            assert C.openmp_threads() == threads
        digests[threads] = _all_kernels_digest()
    assert digests[1] == digests[2] == digests[3], digests


def test_bitwise_identical_whether_the_cost_model_picks_one_thread_or_more(forced_threads):
    forced_threads(2)
    forced = _all_kernels_digest()
    C._set_always_parallel(False)  # the cost model decides, call by call
    assert _all_kernels_digest() == forced


@pytest.fixture
def fresh_plan():
    """The cost model with nothing measured of teams, before and after the test."""
    C._plan_reset()
    try:
        yield
    finally:
        C._plan_reset()


def test_a_parallel_call_slower_than_serial_backs_off_the_probes(fresh_plan):
    """With one busy process on 2 cores, 13 of 21 probes (a call sent to a team
    every 0.1 s to see whether the load had gone) lost against the predicted
    serial time, 1.4 ms each. A lost call now counts its whole excess over a
    perfect split, wall - T / nt, as the team's cost (the start delay alone
    missed a thread preempted mid-region), and doubles the probe interval up
    to 6.4 s; a call that wins sets it back to 0.1 s."""
    info = C.threading_info
    assert info()["probe_interval_s"] == 0.1
    assert not C._plan_observe(start_us=10, wall_us=600, predicted_us=1000, threads=2)
    assert info()["region_cost_us"] == pytest.approx(10)  # the first sample, a start delay
    assert info()["probe_interval_s"] == 0.1
    # lost: 3000 us against 1000 predicted; the team cost at least 3000 - 1000 / 2
    assert C._plan_observe(start_us=20, wall_us=3000, predicted_us=1000, threads=2)
    assert info()["region_cost_us"] == pytest.approx(0.75 * 10 + 0.25 * 2500)
    assert info()["probe_interval_s"] == 0.2
    for expected in (0.4, 0.8, 1.6, 3.2, 6.4, 6.4):
        assert C._plan_observe(start_us=20, wall_us=3000, predicted_us=1000, threads=2)
        assert info()["probe_interval_s"] == expected
    # a forced team (nothing predicted) is not judged
    assert not C._plan_observe(start_us=20, wall_us=3000, predicted_us=0, threads=2)
    assert info()["probe_interval_s"] == 6.4
    # a win: back to probing every 0.1 s
    assert not C._plan_observe(start_us=20, wall_us=900, predicted_us=1000, threads=2)
    assert info()["probe_interval_s"] == 0.1


def test_a_lost_call_whose_members_were_delayed_alike_is_not_the_teams_cost(fresh_plan):
    """A stall of the whole process (a VM's vCPUs descheduled by the host)
    makes a parallel call lose against its predicted serial time, but it
    would have delayed one thread as much: only the delays that fell on some
    members and not others (start delay + spread of finishing times) count."""
    info = C.threading_info
    assert not C._plan_observe(start_us=10, wall_us=600, predicted_us=1000, threads=2)
    # lost by 2000 us, but the members finished within 30 us of each other
    assert C._plan_observe(start_us=20, wall_us=3000, predicted_us=1000, threads=2, spread_us=30)
    assert info()["region_cost_us"] == pytest.approx(0.75 * 10 + 0.25 * (20 + 30))
    assert info()["probe_interval_s"] == 0.2  # still a loss: the probes back off
    # one member finished 1800 us after the other: a busy core; counted up to wall - T / nt
    assert C._plan_observe(start_us=20, wall_us=3000, predicted_us=1000, threads=2, spread_us=1800)
    assert info()["region_cost_us"] == pytest.approx(0.75 * (0.75 * 10 + 0.25 * 50) + 0.25 * 1820)


def test_a_probe_that_wins_sets_the_team_cost_to_its_sample(fresh_plan):
    """Measured on a quiet 2-core VM: one lost call (a vCPU stalled 9-20 ms) set
    the team cost L to 2-5 ms by the moving average, and a 3.5 ms column norm
    ran on one thread (7 ms) in a fifth of the next 300 calls while winning
    probes brought L down a quarter at a time. A probe that wins says the load
    has gone: L becomes its sample; other calls keep the average."""
    info = C.threading_info
    assert not C._plan_observe(start_us=10, wall_us=600, predicted_us=1000, threads=2)
    assert C._plan_observe(start_us=20, wall_us=20000, predicted_us=7000, threads=2)
    big = info()["region_cost_us"]
    assert big > 4000
    # a team call (not a probe) that wins: the average
    assert not C._plan_observe(start_us=12, wall_us=3500, predicted_us=7000, threads=2)
    assert info()["region_cost_us"] == pytest.approx(0.75 * big + 0.25 * 12)
    # a probe that wins: its own sample
    assert not C._plan_observe(start_us=12, wall_us=3500, predicted_us=7000, threads=2, probe=True)
    assert info()["region_cost_us"] == pytest.approx(12)
    assert info()["probe_interval_s"] == 0.1
    # a probe that loses: the average, as any lost call
    assert C._plan_observe(start_us=12, wall_us=9000, predicted_us=7000, threads=2, probe=True)
    assert info()["region_cost_us"] == pytest.approx(0.75 * 12 + 0.25 * (9000 - 3500))


def test_a_probe_reads_the_runnable_threads_from_loadavg():
    """Under load 5-7 on 2 cores, 66 of 71 probes lost (1.1 s in 5 minutes):
    a probe now first reads how many threads are runnable, and opens a team
    only if a core is idle for each extra thread."""
    assert C._loadavg_running("0.20 0.18 0.12 1/80 11206\n") == 1
    assert C._loadavg_running("5.66 5.75 5.37 13/105 18336") == 13
    for bad in ("", "0.20 0.18 0.12", "0.20 0.18 0.12 x/80 1", "0.20 0.18 0.12 7 1"):
        assert C._loadavg_running(bad) == -1, bad


def test_plan_stats_count_the_decisions(forced_threads):
    if not C.openmp_enabled():
        pytest.skip(f"the C kernels were built without OpenMP ({C.build_info()})")
    p = _problem(0, np.float64, 256, 32, 2, 3)
    forced_threads(2)
    C._plan_stats(reset=True)
    C.column_norm(p["W0"], p["A"], p["B"], 1.0)  # 256 rows: 4 blocks of 64, a team of 2
    stats = C._plan_stats(reset=True)
    assert list(stats) == ["column_norm"]
    assert {k: stats["column_norm"][k] for k in ("calls", "parallel", "probes", "lost")} == {
        "calls": 1, "parallel": 1, "probes": 0, "lost": 0}
    assert stats["column_norm"]["wall_ms"] > 0
    # each member noted when it ran out of blocks: the spread of those times
    # lies within the call (not garbage from a member that was never noted)
    assert 0 <= stats["column_norm"]["spread_ms"] <= stats["column_norm"]["wall_ms"]
    assert C._plan_stats() == {}  # reset
    C._set_always_parallel(False)
    C.column_norm(p["W0"], p["A"], p["B"], 1.0)
    assert C._plan_stats()["column_norm"]["calls"] == 1


def test_set_threads_checks_its_argument():
    with pytest.raises(TypeError, match="n must be an int, got float"):
        C.set_threads(2.0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        C.set_threads(-1)


def test_threading_info_says_who_set_the_wait_policy():
    info = C.threading_info()
    assert info["threads"] == C.openmp_threads()
    assert info["region_cost_us"] >= 0
    assert any(word in info["wait_policy"] for word in ("passive", "environment", "default"))


def test_openmp_info():
    assert isinstance(C.openmp_enabled(), bool)
    assert C.openmp_threads() >= 1
    assert "openmp=" in C.build_info()


def test_c_is_the_default_backend():
    import dora_ref

    code = "import dora_ref; print(dora_ref.backend())"
    env = {k: v for k, v in os.environ.items() if k != "DORA_REF_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.stdout.strip() == "c", res.stderr
    assert "c" in dora_ref.available_backends()


# ---------------------------------------------------------------------------
# the wrapper refuses bad input before any pointer crosses
# ---------------------------------------------------------------------------


def test_rejects_integer_dtype():
    p = _problem(0, np.float64, 4, 5, 2, 3)
    with pytest.raises(TypeError, match=r"A must have dtype float32 or float64, got int64"):
        C.column_norm(p["W0"], p["A"].astype(np.int64), p["B"], 1.0)


def test_rejects_mixed_dtypes():
    p = _problem(0, np.float64, 4, 5, 2, 3)
    with pytest.raises(TypeError, match=r"B has dtype float32 but W0 has dtype float64"):
        C.merge(p["W0"], p["A"], p["B"].astype(np.float32), p["m"], 1.0)


def test_rejects_non_arrays():
    p = _problem(0, np.float64, 4, 5, 2, 3)
    with pytest.raises(TypeError, match=r"W0 must be a numpy.ndarray, got list"):
        C.column_norm(p["W0"].tolist(), p["A"], p["B"], 1.0)
    with pytest.raises(TypeError, match=r"scaling must be a real number, got str"):
        C.column_norm(p["W0"], p["A"], p["B"], "1.0")


def test_an_int_scaling_too_large_for_a_float64_is_a_value_error_naming_scaling():
    """Session 16's adversary: C.column_norm(..., 10**400) and C.merge raised OverflowError
    ('int too large to convert to float'), naming nothing."""
    from fractions import Fraction

    p = _problem(0, np.float64, 4, 5, 2, 3)
    for scaling in (10**400, -(10**400), Fraction(10**400, 3)):
        for call in (lambda: C.column_norm(p["W0"], p["A"], p["B"], scaling),
                     lambda: C.merge(p["W0"], p["A"], p["B"], p["m"], scaling)):
            with pytest.raises(ValueError, match=r"scaling \((int|Fraction)\) is too large for a float64"):
                call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: C.column_norm(p["W0"], p["A"].T, p["B"], 1.0), r"A must have shape \(r, in\) = \(r, 5\); got W0 \(4, 5\), A \(5, 2\)"),
        (lambda p: C.column_norm(p["W0"], p["A"], p["B"][:3], 1.0), r"B must have shape \(out, r\) = \(4, 2\)"),
        (lambda p: C.column_norm(p["W0"][0], p["A"], p["B"], 1.0), r"W0 must be 2-D"),
        (lambda p: C.forward_epilogue(p["base"], p["U"], p["B"], p["g"][:3], 1.0, None), r"g must have shape \(4,\)"),
        (lambda p: C.forward_epilogue(p["base"], p["U"][:2], p["B"], p["g"], 1.0, None), r"U must have shape \(N, r\) = \(3, r\)"),
        (lambda p: C.forward_epilogue(p["base"], p["U"], p["B"], p["g"], 1.0, p["bias"][:2]), r"bias must have shape \(4,\)"),
        (lambda p: C.backward_epilogue(p["dy"].T, p["base"], p["U"], p["B"], p["g"], 1.0), r"dy must have shape \(3, 4\)"),
        (lambda p: C.merge(p["W0"], p["A"], p["B"], p["m"][:1], 1.0), r"magnitude must have shape \(4,\)"),
        (lambda p: C.unmerge(p["W0"], p["A"], p["B"], p["m"][:1], 1.0), r"factor must have shape \(4,\)"),
        (lambda p: C.backward_lowrank(p["dy"][:2], p["base"], p["U"], p["B"], p["g"], 1.0), r"dy must have shape \(3, 4\)"),
        (lambda p: C.backward_lowrank(p["dy"], p["base"], p["U"], p["B"][:3], p["g"], 1.0), r"B must have shape \(out, r\) = \(4, 2\)"),
        (lambda p: C.norm_gradient_products(p["W0"], p["A"], p["B"][:3]), r"C must have shape \(4, 2\)"),
        (lambda p: C.norm_gradient_products(p["W0"], p["A"].T, p["B"]), r"A must have shape \(r, in\) = \(r, 5\)"),
    ],
)
def test_rejects_bad_shapes_naming_the_argument(call, match):
    p = _problem(0, np.float64, 4, 5, 2, 3)
    with pytest.raises(ValueError, match=match):
        call(p)


class _Subclass(np.ndarray):
    pass


def test_array_checks_fast_path_falls_back_to_the_full_checks():
    """``_arrays`` takes plain C-contiguous arrays of NumPy's own float32/float64
    dtype objects in one cheap loop; anything else goes through the full checks:
    a strided array gives the plain call's bits, a byte-swapped float64 is
    refused by name, and so is an ndarray subclass (the public API's rule,
    ``core._validate.refuse_array_subclass``: since session 16 the wrappers'
    too; before, a subclass gave the plain call's bits, and so did a masked
    array, its mask ignored)."""
    p = _problem(0, np.float64, 6, 5, 2, 3)
    plain = C.column_norm(p["W0"], p["A"], p["B"], 0.5)
    with pytest.raises(TypeError, match=r"^A is a test_kernels_c._Subclass \(shape \(2, 5\)\)"):
        C.column_norm(p["W0"], p["A"].view(_Subclass), p["B"], 0.5)
    strided_B = np.asfortranarray(p["B"])
    assert np.array_equal(C.column_norm(p["W0"], p["A"], strided_B, 0.5), plain)
    swapped = p["B"].astype(p["B"].dtype.newbyteorder())
    with pytest.raises(TypeError, match=r"B must have dtype float32 or float64, got >f8"):
        C.column_norm(p["W0"], p["A"], swapped, 0.5)
    with pytest.raises(TypeError, match=r"A has dtype float32 but W0 has dtype float64"):
        C.column_norm(p["W0"], p["A"].astype(np.float32), p["B"], 0.5)


# Every wrapper with its arguments, by name: (kernel, argument names in order).
# backward_lowrank and norm_gradient_products take a fused C path for
# r <= FUSED_MAX_RANK and a BLAS path above it; both must check everything.
_WRAPPERS = {
    "column_norm": (lambda a: C.column_norm(a["W0"], a["A"], a["B"], a["s"]), ("W0", "A", "B")),
    "forward_epilogue": (
        lambda a: C.forward_epilogue(a["base"], a["U"], a["B"], a["g"], a["s"], a["bias"]),
        ("base", "U", "B", "g", "bias"),
    ),
    "backward_epilogue": (
        lambda a: C.backward_epilogue(a["dy"], a["base"], a["U"], a["B"], a["g"], a["s"]),
        ("dy", "base", "U", "B", "g"),
    ),
    "backward_lowrank": (
        lambda a: C.backward_lowrank(a["dy"], a["base"], a["U"], a["B"], a["g"], a["s"]),
        ("dy", "base", "U", "B", "g"),
    ),
    "norm_gradient_products": (
        lambda a: C.norm_gradient_products(a["W0"], a["A"], a["C"]), ("W0", "A", "C"),
    ),
    "merge": (lambda a: C.merge(a["W0"], a["A"], a["B"], a["m"], a["s"]), ("W0", "A", "B", "m")),
    "unmerge": (lambda a: C.unmerge(a["W0"], a["A"], a["B"], a["m"], a["s"]), ("W0", "A", "B", "m")),
}
# the wrappers' own names for the arguments, where the problem's differ
_ARG_NAMES = {
    ("merge", "m"): "magnitude", ("unmerge", "m"): "factor", ("unmerge", "W0"): "W_merged",
}


@pytest.mark.parametrize("r", [2, C.FUSED_MAX_RANK + 4] if C is not None else [2])
@pytest.mark.parametrize("kernel", sorted(_WRAPPERS))
def test_every_wrapper_checks_every_argument_on_every_path(kernel, r):
    """Each argument in turn gets a bad dtype, a wrong shape, then a non-array:
    the wrapper must raise the documented error naming it, on the fused and
    the BLAS path alike (norm_gradient_products above rank 12 used to skip
    its checks and hand the arrays to BLAS)."""
    call, names = _WRAPPERS[kernel]
    p = _problem(3, np.float64, 6, 7, r, 5)
    p["C"] = p["B"]
    call(p)  # the good arguments go through
    for name in names:
        shown = _ARG_NAMES.get((kernel, name), name)
        bad = dict(p, **{name: p[name].astype(np.int32)})
        with pytest.raises(TypeError, match=rf"{shown} must have dtype float32 or float64"):
            call(bad)
        bad = dict(p, **{name: p[name].astype(np.float32)})
        with pytest.raises(TypeError, match=rf"{shown} has dtype float32 but \w+ has dtype float64|"
                                            rf"\w+ has dtype float64 but {shown} has dtype float32"):
            call(bad)
        bad = dict(p, **{name: p[name][..., :-1]})
        with pytest.raises(ValueError, match=rf"{shown}"):
            call(bad)
        bad = dict(p, **{name: p[name].tolist()})
        with pytest.raises(TypeError, match=rf"{shown} must be a numpy.ndarray, got list"):
            call(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_f", [3000, 1000, 700, 4096])
def test_non_contiguous_weight_gives_the_bits_of_a_contiguous_one(in_f, dtype):
    """A strided (out, in) weight goes to C a block of rows at a time. Blocks of
    1 MiB of rows that did not start at a multiple of the kernel's row block
    (43 rows of float64 at in = 3000) put some rows in a ragged group of rows,
    computed by other instructions: 1 ulp off in float64. Now every layout
    gives the contiguous call's bits."""
    rng = np.random.default_rng(5)
    out_f, r = 301, 8
    W0 = rng.standard_normal((out_f, in_f)).astype(dtype)
    A = rng.standard_normal((r, in_f)).astype(dtype)
    B = rng.standard_normal((out_f, r)).astype(dtype)
    m = (rng.random(out_f) + 0.5).astype(dtype)
    wide = np.zeros((out_f, in_f + 3), dtype=dtype)
    wide[:, 1:in_f + 1] = W0
    backwards = np.ascontiguousarray(W0[::-1])[::-1]
    layouts = {
        "fortran": np.asfortranarray(W0),
        "column slice": wide[:, 1:in_f + 1],
        "reversed rows": backwards,
        "transposed twice": np.ascontiguousarray(W0.T).T,
    }
    want_n = C.column_norm(W0, A, B, 0.3)
    want_W, want_m = C.merge(W0, A, B, m, 0.3)
    for name, W in layouts.items():
        assert not W.flags.c_contiguous, name
        np.testing.assert_array_equal(C.column_norm(W, A, B, 0.3), want_n, err_msg=name)
        got_W, got_n = C.merge(W, A, B, m, 0.3)
        np.testing.assert_array_equal(got_W, want_W, err_msg=name)
        np.testing.assert_array_equal(got_n, want_m, err_msg=name)


# The three wrappers _WRAPPERS leaves out, in its shape (the problem's names; the
# wrappers' own in _MORE_ARG_NAMES): W_merged is a fresh output buffer of W0's shape.
_MORE_WRAPPERS = {
    "merge_into": (lambda a: C.merge_into(a["W_merged"], a["W0"], a["A"], a["B"], a["m"], a["s"]),
                   ("W_merged", "W0", "A", "B", "m")),
    "backward_epilogue_z": (lambda a: C.backward_epilogue_z(a["dy"], a["base"], a["g"]),
                            ("dy", "base", "g")),
    "backward_lowrank_z": (
        lambda a: C.backward_lowrank_z(a["dy"], a["base"], a["U"], a["B"], a["g"], a["s"]),
        ("dy", "base", "U", "B", "g"),
    ),
}
_MORE_ARG_NAMES = {
    ("merge_into", "m"): "magnitude", ("backward_epilogue_z", "base"): "z",
    ("backward_lowrank_z", "base"): "z",
}


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("kernel", sorted({**_WRAPPERS, **_MORE_WRAPPERS}))
def test_every_kernel_refuses_a_masked_array_or_a_matrix_naming_the_argument(kernel):
    """Session 16's adversary: every C wrapper took an np.ma masked array (its data, the mask
    silently ignored) or an np.matrix (``*`` a product on the BLAS paths), in every argument,
    on the fused and the BLAS paths, C-contiguous or strided; the public API refuses both.
    Each is now a TypeError naming the argument; an np.memmap is still accepted."""
    call, names = {**_WRAPPERS, **_MORE_WRAPPERS}[kernel]
    for r in (5, C.FUSED_MAX_RANK + 8):  # the fused kernels and the BLAS route
        for name in names:
            shown = {**_ARG_NAMES, **_MORE_ARG_NAMES}.get((kernel, name), name)
            for layout in ("C", "F"):
                for kind in ("masked", "matrix"):
                    p = _problem(1, np.float64, 9, 37, r, 6)
                    p["C"], p["W_merged"] = p["B"], np.empty_like(p["W0"])
                    a = np.asarray(p[name], order=layout)
                    if kind == "matrix" and a.ndim != 2:
                        continue
                    if kind == "masked":
                        a = np.ma.masked_array(a, mask=np.zeros(a.shape, bool))
                        a.mask.flat[0] = True
                    else:
                        a = np.asmatrix(a)
                    with pytest.raises(TypeError, match=rf"^{shown} is a numpy"):
                        call(dict(p, **{name: a}))


def test_kernels_accept_a_memmap(tmp_path):
    p = _problem(2, np.float64, 9, 37, 5, 6)
    W0 = np.lib.format.open_memmap(tmp_path / "w0.npy", mode="w+", dtype=np.float64, shape=(9, 37))
    W0[...] = p["W0"]
    np.testing.assert_array_equal(C.column_norm(W0, p["A"], p["B"], 0.7),
                                  C.column_norm(p["W0"], p["A"], p["B"], 0.7))
    np.testing.assert_array_equal(C.merge(W0.T.T, p["A"], p["B"], p["m"], 0.7)[0],
                                  C.merge(p["W0"], p["A"], p["B"], p["m"], 0.7)[0])
