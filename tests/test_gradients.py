"""Gradient checks: the hand-derived backward against float64 finite differences.

Exact mode is checked against differences of the forward itself; detached
mode against differences of the forward with the norm n held fixed (passed
in as ``weight_norm``), which is what "n is a constant" means. The rtol of
1e-6 follows from the central-difference error model in
``dora_ref.porting.gradcheck``.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from cases import abs_scales, cases, make_case
from dora_ref import dora_backward, dora_forward, lora_backward, lora_forward
from dora_ref.core import dense
from dora_ref.core.functional import column_norm
from dora_ref.porting.gradcheck import gradcheck
from dora_ref.porting.tolerance import assert_close


def _loss(case, fixed_norm=None, mask=None):
    def f(p):
        y, _ = dora_forward(
            p["x"], case.W0, p["A"], p["B"], p["magnitude"], case.scaling, case.bias,
            dropout_mask=mask, weight_norm=fixed_norm,
        )
        return np.sum(case.dy * y)

    return f


def _check(case, detach_norm, mask=None):
    y, ctx = dora_forward(case.x, *case.weights, dropout_mask=mask)
    g = dora_backward(case.dy, ctx, detach_norm=detach_norm)
    params = dict(x=case.x, A=case.A, B=case.B, magnitude=case.magnitude)
    fixed = ctx.n.copy() if detach_norm else None
    grads = dict(x=g.dx, A=g.dA, B=g.dB, magnitude=g.dmagnitude)
    return gradcheck(_loss(case, fixed, mask), params, grads)


@given(cases(extreme=False))
def test_exact_gradient_matches_finite_differences(case):
    report = _check(case, detach_norm=False)
    assert report.ok, report


@given(cases(extreme=False))
def test_detached_gradient_matches_finite_differences_with_norm_fixed(case):
    report = _check(case, detach_norm=True)
    assert report.ok, report


@given(cases(extreme=False), st.floats(0.1, 0.9), st.booleans())
def test_dropout_gradient_matches_finite_differences(case, p, detach_norm):
    rng = np.random.default_rng(0)
    mask = (rng.random(case.x.shape) >= p) / (1.0 - p)
    report = _check(case, detach_norm=detach_norm, mask=mask)
    assert report.ok, report


def test_detached_and_exact_gradients_match_their_formulas_and_differ():
    """Each mode against an independent value, then the two against each other.

    Exact: float64 central differences of the forward (the gradient of the
    function itself). Detached: the paper's Eq. (11), dL/dV_i = (m_i / n_i) G_i
    with G = dy^T x, formed densely (``dense.backward``). Both share the
    magnitude's gradient (Eq. 7) and dx. The norm's path is not negligible here:
    dA differs between the modes by more than 1e-3 of its size, far above
    rounding, so a mode that silently computed the other fails.
    """
    case = make_case(4, 5, 2, 3, seed=1)
    _, ctx = dora_forward(case.x, *case.weights)
    exact = dora_backward(case.dy, ctx, detach_norm=False)
    detached = dora_backward(case.dy, ctx, detach_norm=True)
    params = dict(x=case.x, A=case.A, B=case.B, magnitude=case.magnitude)
    report = gradcheck(_loss(case), params, dict(x=exact.dx, A=exact.dA, B=exact.dB,
                                                 magnitude=exact.dmagnitude))
    assert report.ok, report
    want = dense.backward(case.dy, case.x, *case.weights[:5], detach_norm=True)
    scales = abs_scales(case, detach_norm=True)
    for name, a, b in zip(detached._fields, detached, want):
        assert_close(a, b, k=3 + 5 + 4 + 2, scale=scales[name], name=name)
    assert np.abs(exact.dA - detached.dA).max() > 1e-3 * np.abs(exact.dA).max()
    np.testing.assert_array_equal(exact.dmagnitude, detached.dmagnitude)
    np.testing.assert_array_equal(exact.dx, detached.dx)


@given(cases(extreme=False))
def test_lora_gradient_matches_finite_differences(case):
    _, ctx = lora_forward(case.x, case.W0, case.A, case.B, case.scaling, case.bias)
    g = lora_backward(case.dy, ctx)

    def f(p):
        y, _ = lora_forward(p["x"], case.W0, p["A"], p["B"], case.scaling, case.bias)
        return np.sum(case.dy * y)

    report = gradcheck(f, dict(x=case.x, A=case.A, B=case.B), dict(x=g.dx, A=g.dA, B=g.dB))
    assert report.ok, report


@pytest.mark.parametrize("detach_norm", [True, False])
@given(case=cases())
def test_backward_equals_dense_paper_formulas(case, detach_norm):
    """Chain rule (functional) == the paper's projection form, Eqs. 6, 7, 11 (dense)."""
    _, ctx = dora_forward(case.x, *case.weights)
    got = dora_backward(case.dy, ctx, detach_norm=detach_norm)
    want = dense.backward(case.dy, case.x, *case.weights[:5], detach_norm=detach_norm)
    n_rows, in_f = case.x.shape
    k = n_rows + in_f + case.B.shape[0] + case.A.shape[0]
    scales = abs_scales(case, detach_norm)
    for name, a, b in zip(got._fields, got, want):
        assert_close(a, b, k=k, scale=scales[name], name=name)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_float32_backward_matches_float64_dense_formulas(detach_norm):
    """float32 gradients agree with the paper's formulas evaluated densely in float64.

    The reference is ``dense.backward`` (projection form, Eqs. 6, 7, 11) on the
    float64 case, not the same functional code in float64: a term dropped in
    both dtypes would pass a float32-vs-float64 comparison of one code path.
    """
    case64 = make_case(17, 23, 4, 9, seed=3)
    case32 = case64.astype(np.float32)
    _, c32 = dora_forward(case32.x, *case32.weights)
    g32 = dora_backward(case32.dy, c32, detach_norm=detach_norm)
    want = dense.backward(case64.dy, case64.x, *case64.weights[:5], detach_norm=detach_norm)
    scales = abs_scales(case64, detach_norm)
    for name, a, b in zip(g32._fields, g32, want):
        assert a.dtype == np.float32
        # the inputs were rounded to float32 too: that is one more u per term
        assert_close(a, b, dtype=np.float32, k=9 + 23 + 17 + 4 + 1, scale=scales[name], name=name)


def test_batch_dims_are_flattened_and_restored():
    case = make_case(3, 4, 2, 6, seed=5)
    x3 = case.x.reshape(2, 3, 4)
    y3, ctx = dora_forward(x3, *case.weights)
    assert y3.shape == (2, 3, 3)
    g = dora_backward(case.dy.reshape(2, 3, 3), ctx)
    assert g.dx.shape == (2, 3, 4)
    y2, ctx2 = dora_forward(case.x, *case.weights)
    np.testing.assert_array_equal(y3.reshape(6, 3), y2)
    g2 = dora_backward(case.dy, ctx2)
    np.testing.assert_array_equal(g.dx.reshape(6, 4), g2.dx)  # the rows, not only the shape
    for a, b in zip(g[1:], g2[1:]):
        np.testing.assert_array_equal(a, b)
    want = dense.backward(case.dy, case.x, *case.weights[:5])
    assert_close(g.dx.reshape(6, 4), want.dx, k=3 + 2 + 4, scale=abs_scales(case)["dx"], name="dx")


def test_exact_gradient_wrt_V_is_orthogonal_to_each_row_and_detached_is_not():
    """Paper Eq. 6: the exact dL/dV_i is projected away from V_i.

    With A = I (r = in) and s = 1, V = W0 + B and dL/dB = dL/dV, so dB is
    the gradient w.r.t. V itself.
    """
    rng = np.random.default_rng(7)
    out_f, in_f, n = 5, 4, 6
    W0 = rng.normal(size=(out_f, in_f))
    A = np.eye(in_f)
    B = rng.normal(size=(out_f, in_f))
    m = rng.uniform(0.5, 2, out_f)
    x, dy = rng.normal(size=(n, in_f)), rng.normal(size=(n, out_f))
    V = W0 + B
    _, ctx = dora_forward(x, W0, A, B, m, 1.0)
    exact = dora_backward(dy, ctx, detach_norm=False).dB
    detached = dora_backward(dy, ctx, detach_norm=True).dB
    cos_exact = np.sum(exact * V, axis=1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(V, axis=1))
    cos_detached = np.sum(detached * V, axis=1) / (
        np.linalg.norm(detached, axis=1) * np.linalg.norm(V, axis=1)
    )
    assert np.abs(cos_exact).max() < 1e-13  # zero up to float64 rounding of a 4-term dot
    assert np.abs(cos_detached).min() > 1e-3


def test_plumbing_dora_forward_keeps_the_column_norm():
    """Plumbing: the context holds the public column_norm's n (same code path, same bits).

    The value itself is checked against the dense definition here and in
    test_properties.test_column_norm_and_merge_equal_dense_definition.
    """
    case = make_case(6, 5, 3, 4, seed=11)
    _, ctx = dora_forward(case.x, *case.weights)
    np.testing.assert_array_equal(ctx.n, column_norm(case.W0, case.A, case.B, case.scaling))
    want = dense.row_norm(dense.direction(case.W0, case.A, case.B, case.scaling))
    assert_close(ctx.n, want, k=5 + 3 + 2, name="n")
