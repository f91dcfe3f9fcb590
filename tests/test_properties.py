"""Properties that follow from the math, over hypothesis-drawn cases.

Tolerances: ``dora_ref.porting.tolerance`` (Higham's gamma_k from the dtype's unit
roundoff), with k the longest reduction and the scale the sum of absolute
terms where the result can cancel.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from cases import cases, make_case
from dora_ref import column_norm, dora_forward, init_magnitude, merge, unmerge
from dora_ref.core import dense
from dora_ref.porting.tolerance import assert_close

DTYPES = [np.float64, np.float32]


def _forward_scale(case):
    """sum |terms| of each output: |g| (|x| |W0|^T + s |x| |A|^T |B|^T) + |b|."""
    x, W0, A, B, m = (a.astype(np.float64) for a in (case.x, case.W0, case.A, case.B, case.magnitude))
    V_abs = np.abs(W0) + abs(case.scaling) * np.abs(B) @ np.abs(A)
    n = np.linalg.norm(W0 + case.scaling * B @ A, axis=1)
    kappa = np.linalg.norm(V_abs, axis=1) / n  # n's own cancellation (see cases.abs_scales)
    out = np.abs(x) @ V_abs.T * (np.abs(m) / n * kappa)
    return out + (0 if case.bias is None else np.abs(case.bias))


def _dropout_scale(case, mask):
    """sum |terms| of PEFT's training formula, xd = x * mask:

    |x| |W0|^T + |g - 1| |xd| |W0|^T + |g| |s| |xd| |A|^T |B|^T + |b|; where g is far
    from 1 the first two terms cancel, so |g| alone (``_forward_scale``) is too small.
    """
    x, W0, A, B, m = (a.astype(np.float64) for a in (case.x, case.W0, case.A, case.B, case.magnitude))
    xd = np.abs(x * mask)
    n = np.linalg.norm(W0 + case.scaling * B @ A, axis=1)
    kappa = np.linalg.norm(np.abs(W0) + abs(case.scaling) * np.abs(B) @ np.abs(A), axis=1) / n
    g = np.abs(m) / n * kappa
    out = (np.abs(x) @ np.abs(W0).T + (g + 1) * (xd @ np.abs(W0).T)
           + g * abs(case.scaling) * ((xd @ np.abs(A).T) @ np.abs(B).T))
    return out + (0 if case.bias is None else np.abs(case.bias))


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_forward_equals_dense_definition(dtype, data):
    case = data.draw(cases(dtype=dtype))
    y, _ = dora_forward(case.x, *case.weights)
    want = dense.forward(case.x, *case.weights)
    assert y.dtype == dtype
    k = case.x.shape[1] + case.A.shape[0] + 2
    assert_close(y, want, k=k, scale=_forward_scale(case), name="y")


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_column_norm_and_merge_equal_dense_definition(dtype, data):
    case = data.draw(cases(dtype=dtype))
    W0, A, B, m, s, _ = case.weights
    k = A.shape[1] + A.shape[0] + 2
    W0_, A_, B_ = (np.abs(a.astype(np.float64)) for a in (W0, A, B))
    V_abs = W0_ + abs(s) * B_ @ A_
    n = column_norm(W0, A, B, s)
    assert n.shape == (W0.shape[0],) and n.dtype == dtype
    assert_close(n, dense.row_norm(dense.direction(W0, A, B, s)), k=k,
                 scale=np.linalg.norm(V_abs, axis=1), name="n")
    W_merged, n_merge = merge(W0, A, B, m, s)
    # the same bits as column_norm: test_regressions.test_merge_norm_is_the_column_norm_bit_for_bit
    assert_close(n_merge, n, k=k, scale=np.linalg.norm(V_abs, axis=1), name="n (merge)")
    assert_close(W_merged, dense.merged_weight(W0, A, B, m, s), k=k,
                 scale=(np.abs(m) / n)[:, None] * V_abs, name="W_merged")


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_merged_forward_equals_unmerged(dtype, data):
    case = data.draw(cases(dtype=dtype))
    y, _ = dora_forward(case.x, *case.weights)
    W_merged, _ = merge(*case.weights[:5])
    y_merged = case.x @ W_merged.T
    if case.bias is not None:
        y_merged = y_merged + case.bias
    k = case.x.shape[1] + case.A.shape[0] + 2
    assert_close(y_merged, y, k=k, scale=_forward_scale(case), name="merged y")


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_unmerge_restores_base_weight(dtype, data):
    case = data.draw(cases(dtype=dtype, zero_magnitude=False))  # m = 0 cannot unmerge
    W0, A, B, m, s, _ = case.weights
    W_merged, n = merge(W0, A, B, m, s)
    restored = unmerge(W_merged, A, B, m, s, n)
    # W0 = (f V) / f - s B A: the scale is |V| + s |B| |A|, the terms that cancel
    scale = np.abs(W0) + 2 * abs(s) * np.abs(B) @ np.abs(A)
    assert_close(restored, W0, k=A.shape[0] + 4, scale=scale, name="W0")


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_identity_at_init_when_B_is_zero(dtype, data):
    """With B = 0 and m = ||W0||_row (PEFT's init), DoRA is the base layer.

    g = m / n is then exactly 1 (both are the same computed norm), so the
    output equals x @ W0.T + b to the last bit of the base product.
    """
    case = data.draw(cases(dtype=dtype))
    B0 = np.zeros_like(case.B)
    m0 = init_magnitude(case.W0, case.A, B0, case.scaling)
    y, ctx = dora_forward(case.x, case.W0, case.A, B0, m0, case.scaling, case.bias)
    np.testing.assert_array_equal(ctx.g, np.ones_like(ctx.g))
    base = case.x @ case.W0.T + (0 if case.bias is None else case.bias)
    assert_close(y, base, k=case.x.shape[1] + 1, scale=_forward_scale(case), name="y")


@given(cases(), st.floats(-3, 3))
def test_output_is_linear_in_the_magnitude(case, c):
    W0, A, B, m, s, _ = case.weights
    m2 = np.random.default_rng(0).normal(size=m.shape)
    y1, _ = dora_forward(case.x, W0, A, B, m, s)
    y2, _ = dora_forward(case.x, W0, A, B, m2, s)
    y12, _ = dora_forward(case.x, W0, A, B, m + c * m2, s)
    scale = np.abs(y1) + abs(c) * np.abs(y2) + 1e-300
    assert_close(y12, y1 + c * y2, k=W0.shape[1] + A.shape[0] + 4, scale=scale, name="y")


@given(cases())
def test_dropout_mask_of_ones_equals_no_dropout(case):
    """PEFT's training formula reduces to the eval formula when nothing is dropped."""
    y, _ = dora_forward(case.x, *case.weights)
    y_mask, _ = dora_forward(case.x, *case.weights, dropout_mask=np.ones_like(case.x))
    assert_close(y_mask, y, k=case.x.shape[1] + case.A.shape[0] + 4,
                 scale=_dropout_scale(case, 1.0) + _forward_scale(case), name="y")


@given(cases(), st.floats(0.1, 0.9))
def test_dropout_forward_equals_dense(case, p):
    mask = (np.random.default_rng(1).random(case.x.shape) >= p) / (1 - p)
    y, _ = dora_forward(case.x, *case.weights, dropout_mask=mask)
    want = dense.forward(case.x, *case.weights, dropout_mask=mask)
    assert_close(y, want, k=case.x.shape[1] + case.A.shape[0] + 4,
                 scale=_dropout_scale(case, mask) + _forward_scale(case) * mask.max(), name="y")


def test_no_out_by_in_temporary_in_the_norm():
    """The NumPy norm walks W0 in blocks: its peak allocation is far below W0's size."""
    import tracemalloc

    case = make_case(1024, 1024, 8, 1, seed=0)
    tracemalloc.start()
    column_norm(case.W0, case.A, case.B, case.scaling)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.5 * case.W0.nbytes, peak
