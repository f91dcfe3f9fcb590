"""Regression tests, each named after the mistake or report it pins.

The expected numbers are worked by hand in the docstrings.
"""
from contextlib import nullcontext
from fractions import Fraction

import numpy as np
import pytest

from dora_ref import (
    DoRALinear,
    SGD,
    column_norm,
    dora_backward,
    dora_forward,
    init_magnitude,
    lora_scaling,
    merge,
    unmerge,
)
from dora_ref.porting.tolerance import gamma


def test_norm_axis_is_per_output_row():
    """W0 = [[1,2,2],[0,0,3]]: rows have norm 3 and 3; columns would give 3 values.

    The paper's column norm of a (in, out) weight is the row norm of the
    PyTorch (out, in) weight (nbasyl/DoRA#1, peft#2348).
    """
    W0 = np.array([[1.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    m = init_magnitude(W0, np.zeros((1, 3)), np.zeros((2, 1)), 1.0)
    assert m.shape == (2,)
    np.testing.assert_array_equal(m, [3.0, 3.0])


def test_scaling_enters_the_norm_and_the_low_rank_term():
    """W0 = I2, A = [[1,1]], B = [[1],[1]], r = 1, alpha = 4: s = 4.

    V = I + 4 [[1,1],[1,1]] = [[5,4],[4,5]], so m = [sqrt(41), sqrt(41)].
    Leaving s out of the norm would give sqrt(5).
    """
    s = lora_scaling(1, 4)
    assert s == 4.0
    m = init_magnitude(np.eye(2), np.array([[1.0, 1.0]]), np.array([[1.0], [1.0]]), s)
    np.testing.assert_allclose(m, [np.sqrt(41), np.sqrt(41)], rtol=4e-16)


def test_peft_dropout_semantics():
    """W0 = [[1,2],[3,4]], b = [.5,-.5], A = [[1,1]], B = [[1],[2]], s = 1, m = [2,3], x = [1,2].

    V = [[2,3],[5,6]], n = [sqrt 13, sqrt 61], g = m / n.
    eval: y = g * (x V^T) + b = g * [8, 17] + b = [4.937602, 6.029881].
    train, dropout mask [2, 0] (xd = [2, 0]): PEFT's
    y = x W0^T + b + (g-1) * xd W0^T + g * s * (xd A^T) B^T
      = [5.5, 10.5] + (g-1) * [2, 6] + g * [2, 4] = [5.718801, 8.341106].
    The naive g * (xd V^T) + b would give [2.718801, 7.2612].
    """
    W0 = np.array([[1.0, 2.0], [3.0, 4.0]])
    args = (W0, np.array([[1.0, 1.0]]), np.array([[1.0], [2.0]]), np.array([2.0, 3.0]), 1.0,
            np.array([0.5, -0.5]))
    x = np.array([1.0, 2.0])
    y_train, _ = dora_forward(x, *args, dropout_mask=np.array([2.0, 0.0]))
    y_eval, _ = dora_forward(x, *args)
    np.testing.assert_allclose(y_train, [5.718801, 8.341106], atol=5e-7)
    np.testing.assert_allclose(y_eval, [4.937602, 6.029881], atol=5e-7)


def test_the_magnitude_trains():
    """W0 = [[1,2],[3,4]], A = [[1,1]], B = 0, x = [1,0], loss = sum(y), SGD lr 0.1.

    m0 = [sqrt 5, 5]; dL/dm = z / n = [1 / sqrt 5, 3 / 5]; one step gives
    m = [sqrt 5 - 0.1 / sqrt 5, 5 - 0.06] = [2.191347, 4.94].
    """
    layer = DoRALinear(np.array([[1.0, 2.0], [3.0, 4.0]]), r=1, lora_alpha=1, rng=0)
    layer.lora_A[:] = [[1.0, 1.0]]
    np.testing.assert_array_equal(layer.lora_B, 0)
    y = layer.forward(np.array([1.0, 0.0]))
    layer.backward(np.ones_like(y))  # loss = sum(y): its gradient is ones
    SGD(layer.parameters(), lr=0.1).step(layer.grads)
    np.testing.assert_allclose(layer.lora_magnitude_vector, [2.191347, 4.94], atol=5e-7)


def test_replacing_the_base_weight_recomputes_the_magnitude():
    """PEFT initialises m after any init that rewrites W0 (PiSSA, OLoRA...)."""
    rng = np.random.default_rng(0)
    layer = DoRALinear(rng.normal(size=(3, 4)), r=2, rng=1)
    W_new = rng.normal(size=(3, 4))
    layer.weight = W_new
    np.testing.assert_allclose(layer.lora_magnitude_vector, np.linalg.norm(W_new, axis=1),
                               rtol=1e-15)
    layer.eval()
    np.testing.assert_allclose(layer.forward(np.ones(4)), W_new @ np.ones(4), rtol=1e-14)


def test_zero_row_norm_raises_instead_of_nan():
    """peft#2049: an all-zero row of W0 + s*B@A makes m / n = 0 / 0; PEFT outputs NaN."""
    W0 = np.array([[0.0, 0.0], [1.0, 2.0]])
    A, B, m = np.ones((1, 2)), np.zeros((2, 1)), np.array([1.0, 2.0])
    with pytest.raises(ValueError, match=r"all-zero row at output channel\(s\) \[0\]"):
        dora_forward(np.ones(2), W0, A, B, m, 1.0)


def test_zero_row_norm_opt_in_gives_the_bias():
    """allow_zero_norm=True: g = 0 there, the channel outputs its bias, dm = 0."""
    from dora_ref import dora_backward

    W0 = np.array([[0.0, 0.0], [1.0, 2.0]])
    A, B, m = np.ones((1, 2)), np.zeros((2, 1)), np.array([1.0, 2.0])
    y, ctx = dora_forward(np.ones(2), W0, A, B, m, 1.0, np.array([0.5, 0.0]),
                          allow_zero_norm=True)
    assert np.isfinite(y).all() and y[0] == 0.5
    g = dora_backward(np.ones(2), ctx, detach_norm=False)
    assert all(np.isfinite(a).all() for a in g) and g.dmagnitude[0] == 0


def test_tiny_float64_rows_are_not_reported_as_zero():
    """Adversarial review: rows of 1e-170 (norm 2.6e-170, representable) underflowed to 0
    in the sum of squares and were reported as all-zero rows. Such rows are recomputed
    with scaling (LAPACK nrm2's idea)."""
    W0 = np.full((2, 7), 1e-170)
    W0[1] = np.arange(1.0, 8.0)
    A, B = np.ones((1, 7)), np.zeros((2, 1))
    n = column_norm(W0, A, B, 1.0)
    np.testing.assert_allclose(n, [np.sqrt(7) * 1e-170, np.sqrt(140)], rtol=4e-16)
    W_merged, n2 = merge(W0, A, B, np.array([2.0, 1.0]), 1.0)
    np.testing.assert_allclose(W_merged[0], 2 * W0[0] / n[0], rtol=4e-16)


def test_huge_float64_rows_do_not_overflow_the_norm():
    W0 = np.full((1, 4), 1e200)
    n = column_norm(W0, np.ones((1, 4)), np.zeros((1, 1)), 1.0)
    np.testing.assert_allclose(n, [2e200], rtol=4e-16)


def test_float32_norm_sums_squares_in_float64_on_both_backends():
    """Adversarial review: a float32 row of 3e-21 squared into subnormals; the C kernel
    (float64 sums) and the NumPy twin (float32 sums) disagreed by ~30 ulp. Both now sum
    in float64 and give the correctly rounded norm."""
    W0 = np.full((1, 8), 3e-21, dtype=np.float32)
    A, B = np.ones((1, 8), np.float32), np.zeros((1, 1), np.float32)
    want = np.float32(np.sqrt(8 * np.float64(np.float32(3e-21)) ** 2))
    assert column_norm(W0, A, B, 1.0)[0] == want


def test_exact_float32_gradient_survives_a_norm_whose_square_overflows():
    """Adversarial review: n ~ 1e21 in float32 made n * n = inf, which silently zeroed the
    projection term of the exact gradient (the detached one came back).

    The reference is the paper's projection form (Eq. 6) evaluated densely in float64,
    where n**2 ~ 1e42 is far from overflow: independent of the chain rule under test,
    so a flipped or dropped correction term fails here.
    """
    from dora_ref.core import dense

    rng = np.random.default_rng(0)
    sc = 3e19
    W = rng.normal(size=(4, 6)) * sc
    A = rng.normal(size=(2, 6))
    B = rng.normal(size=(4, 2)) * sc
    m = np.abs(rng.normal(size=4)) * sc
    x, dy = rng.normal(size=(3, 6)) / sc, rng.normal(size=(3, 4))

    def run(dt, detach):
        _, ctx = dora_forward(*(a.astype(dt) for a in (x, W, A, B, m)), 1.0)
        return dora_backward(dy.astype(dt), ctx, detach_norm=detach)

    want = dense.backward(dy, x, W, A, B, m, 1.0, detach_norm=False)
    detached = dense.backward(dy, x, W, A, B, m, 1.0, detach_norm=True)
    for dt, tol in ((np.float64, 1e-12), (np.float32, 1e-4)):  # a few steps' rounding of dt
        got = run(dt, False)
        for name in ("dA", "dB"):
            ref, scale = getattr(want, name), np.abs(getattr(want, name)).max()
            assert np.abs(getattr(got, name) - ref).max() < tol * scale, (dt, name)
            # and the two modes differ here: a missing projection term cannot pass
            assert np.abs(getattr(detached, name) - ref).max() > 0.1 * scale, name


def test_unmerge_restores_rows_whose_norm_was_zero():
    """Adversarial review: with allow_zero_norm a zero row merged but could not unmerge.
    There V_i = 0, so W0_i = -s B_i A is known exactly."""
    A = np.array([[1.0, 2.0, -1.0]])
    B = np.array([[0.5], [1.0]])
    W0 = np.array([[-0.5, -1.0, 0.5], [1.0, 0.0, 2.0]])  # row 0 = -s B_0 A with s = 1
    m = np.array([1.0, 2.0])
    W_merged, n = merge(W0, A, B, m, 1.0, allow_zero_norm=True)
    assert n[0] == 0 and not W_merged[0].any()
    np.testing.assert_allclose(unmerge(W_merged, A, B, m, 1.0, n), W0, atol=4e-16)


def test_layer_owns_its_frozen_weight():
    """Adversarial review: the layer kept the caller's array by reference, so writing to it
    changed the base behind the eval norm cache (eval and train outputs differed by 8.6)."""
    from dora_ref.core import dense

    rng = np.random.default_rng(0)
    W, x = rng.normal(size=(6, 8)), rng.normal(size=(4, 8))
    layer = DoRALinear(W, r=2, lora_alpha=4, init_lora_weights=False, rng=0).eval()
    y = layer(x)
    W *= 3.0
    np.testing.assert_array_equal(layer(x), y)
    assert not np.shares_memory(layer.weight, W)
    frozen = np.ascontiguousarray(W)
    frozen.flags.writeable = False
    assert np.shares_memory(DoRALinear(frozen, r=2).weight, frozen)  # trusted: no copy
    want = dense.forward(x, layer.weight, layer.lora_A, layer.lora_B,
                         layer.lora_magnitude_vector, layer.scaling)
    np.testing.assert_allclose(layer(x), want, rtol=1e-13)


def test_set_base_weight_keeps_the_optimisers_magnitude():
    """Adversarial review: set_base_weight rebound the magnitude array, so an optimiser
    made before it kept updating a stale array and the magnitude stopped training."""
    from dora_ref import AdamW

    rng = np.random.default_rng(0)
    W, x = rng.normal(size=(4, 5)), rng.normal(size=(3, 5))
    layer = DoRALinear(W, r=2, rng=0)
    opt = AdamW(layer.parameters(), lr=0.1)
    layer.set_base_weight(2 * W)
    y = layer(x)
    layer.backward(np.ones_like(y))
    m0 = layer.lora_magnitude_vector.copy()
    opt.step(layer.grads)
    assert not np.array_equal(m0, layer.lora_magnitude_vector)


def test_layer_rejects_complex_adapter_weights():
    W = np.ones((3, 2))
    with pytest.raises(TypeError, match="lora_A must have dtype float32 or float64, got complex128"):
        DoRALinear(W, lora_A=np.ones((1, 2)) + 0j, lora_B=np.ones((3, 1)))
    with pytest.raises(TypeError, match="lora_magnitude_vector must have dtype"):
        DoRALinear(W, lora_A=np.ones((1, 2)), lora_B=np.ones((3, 1)),
                   lora_magnitude_vector=np.ones(3) + 1j)


def test_dropout_mask_in_eval_mode_is_an_error():
    """PEFT applies no dropout in eval; a mask there used to switch on the training formula."""
    layer = DoRALinear(np.ones((3, 2)), r=1, rng=0).eval()
    with pytest.raises(ValueError, match="dropout_mask given in eval mode"):
        layer(np.ones((1, 2)), dropout_mask=np.zeros((1, 2)))


def test_layer_merge_refuses_rows_it_could_not_unmerge():
    """A zero magnitude scales a row of W0 away: merge() refuses rather than leave the
    layer merged for good (dora_ref.merge still does a one-way merge)."""
    layer = DoRALinear(np.random.default_rng(0).normal(size=(3, 4)), r=1, rng=0).eval()
    layer.lora_magnitude_vector[1] = 0.0
    with pytest.raises(ValueError, match=r"magnitude is 0 at output channel\(s\) \[1\]"):
        layer.merge()
    assert not layer.merged
    merge(layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling)


def test_subnormal_sums_of_squares_are_recomputed():
    """Review of the fix above: entries of 1e-160 square into float64 subnormals (~3e-5
    relative error) without reaching 0; they are recomputed too."""
    W0 = np.full((1, 5), 1e-160)
    n = column_norm(W0, np.ones((1, 5)), np.zeros((1, 1)), 1.0)
    np.testing.assert_allclose(n, [np.sqrt(5) * 1e-160], rtol=4e-16)


def test_a_norm_kernel_that_returns_zero_rows_raises_instead_of_being_rescued(monkeypatch, backend):
    """Issue: a C norm kernel that skipped its last partial tile returned n = 0 for those
    rows, and the underflow rescue recomputed them in NumPy, so every end-to-end test of
    the kernel passed. The rescue now repairs only rows that are genuinely tiny (or
    huge) and raises, naming the rows and the backend, on any other."""
    from dora_ref.core import backend as _backend

    kernels = _backend.kernels()
    good_norm, good_merge = kernels.column_norm, kernels.merge

    def broken_norm(W0, A, B, scaling):
        n = good_norm(W0, A, B, scaling)
        n[-2:] = 0
        return n

    def broken_merge(W0, A, B, magnitude, scaling):
        W_merged, n = good_merge(W0, A, B, magnitude, scaling)
        n[-2:] = 0
        return W_merged, n

    rng = np.random.default_rng(0)
    W0, A, B = rng.normal(size=(5, 9)), rng.normal(size=(2, 9)), rng.normal(size=(5, 2))
    monkeypatch.setattr(kernels, "column_norm", broken_norm)
    monkeypatch.setattr(kernels, "merge", broken_merge)
    match = rf"'{backend}' backend's row norm kernel returned \[0.0, 0.0\] for row\(s\) \[3, 4\]"
    with pytest.raises(RuntimeError, match=match):
        column_norm(W0, A, B, 1.0)
    with pytest.raises(RuntimeError, match=match):
        dora_forward(np.ones(9), W0, A, B, np.ones(5), 1.0)
    with pytest.raises(RuntimeError, match=match):
        merge(W0, A, B, np.ones(5), 1.0)


def test_a_norm_kernel_that_reports_overflow_for_an_ordinary_row_raises(monkeypatch, backend):
    from dora_ref.core import backend as _backend

    kernels = _backend.kernels()
    good_norm = kernels.column_norm

    def broken_norm(W0, A, B, scaling):
        n = good_norm(W0, A, B, scaling)
        n[0] = np.inf
        return n

    monkeypatch.setattr(kernels, "column_norm", broken_norm)
    with pytest.raises(RuntimeError, match=r"returned \[inf\] for row\(s\) \[0\]"):
        column_norm(np.ones((2, 3)), np.ones((1, 3)), np.zeros((2, 1)), 1.0)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_a_zero_norm_from_cancellation_in_the_kernels_order_is_not_called_a_kernel_bug(backend, rows):
    """Session 16's adversary, the tiny side of its overflow case: B_i @ A = 1e300 + 1 - 1e300
    (+ zeros) is 0 added left to right, the kernels' order, and 1 in BLAS's order for
    several rows (not for one). With W0 = 0 the kernel's n = 0 was judged against BLAS's
    1.0 and called "a bug in the kernel" (RuntimeError). A difference within the rounding
    any order may make (8 gamma_{in+r+2} ||a_i||, a_i = |W0_i| + |s| |B_i| |A|: here
    about 1e288) is not a bug: the kernel's 0 stands. A bug stays one: a kernel that
    returns 0 for an ordinary row still raises (the test above)."""
    W0, A = np.zeros((rows, 1)), np.ones((8, 1))
    B = np.tile([1e300, 1.0, -1e300, 0, 0, 0, 0, 0], (rows, 1))
    n = column_norm(W0, A, B, 1.0)
    assert n.shape == (rows,) and np.all((n == 0) | (n == 1)), n  # either order's rounding
    with pytest.raises(ValueError, match="all-zero row") if np.any(n == 0) else nullcontext():
        column_norm(W0, A, B, 1.0, allow_zero_norm=False)


def test_a_huge_norm_the_kernels_order_keeps_is_rescued_not_called_a_bug(backend):
    """Session 16's second adversary: A's column [-1e300, 0, 0, 0, 1e300, 0, -1e160, 0, 0]
    and B = 1: in the kernels' order (k = 0, 1, ...) B@A = -1e160, exactly, and the float64
    sum of squares overflows (a genuine overflow); BLAS's order for one row absorbs the 1e160
    into 1e300 and gives 0. The rescue recomputed with BLAS, saw an ordinary norm and raised
    "a bug in the kernel" (C backend), or kept the inf and said the norm itself overflowed.
    It now recomputes in the kernels' order: the C backend gives the exact 1e160; the NumPy
    backend, whose products are BLAS's, its own order's value, within the rounding bound."""
    col = [-1e300, 0, 0, 0, 1e300, 0, -1e160, 0, 0]
    A = np.zeros((9, 36))
    A[:, 8] = col
    B = np.ones((1, 9))
    for w00 in (1.0, 0.0):
        W0 = np.zeros((1, 36))
        W0[0, 0] = w00
        n = column_norm(W0, A, B, 1.0)
        exact = np.hypot(w00, 1e160)
        a = np.abs(W0) + np.abs(B) @ np.abs(A)
        assert a.max() == 2e300 and np.count_nonzero(a) <= 2  # ||a|| <= 2e300 + 1
        # the norm's bound, 2 * 4 * gamma_{in + r + 2} * ||a|| (tests/test_kernels_c.py)
        bound = 2 * 4 * gamma(36 + 9 + 2, np.float64) * (2e300 + 1)
        assert abs(n[0] - exact) <= bound, (n, exact)
        _, n_merge = merge(W0, A, B, np.ones(1), 1.0, allow_zero_norm=True)
        np.testing.assert_array_equal(n_merge, n)  # NumPy's order may give 0 here


@pytest.mark.filterwarnings("ignore:overflow encountered in matmul:RuntimeWarning")  # NumPy's own
@pytest.mark.parametrize("rows", [1, 2, 4, 13])
def test_a_float32_product_only_BLAS_overflows_is_not_called_an_overflow_of_the_norm(backend, rows):
    """Session 16's second adversary: a rank-17 float32 B@A whose partial sums overflow in
    BLAS's order (the NumPy backend, 2+ rows) and not in the kernels' order; the exact norm is
    7.656e37 < float32's 3.4e38. The NumPy backend said "the norm itself overflowed float32".
    The rescue's recomputation in the kernels' order gives the norm; both backends agree."""
    big = np.float32(1.0208470399155866e+38)
    A = np.array([-big, 0, big, 1, 1, big, -big, 0, big, -1, 0, 0, -1, big, -big, 0, -1],
                 np.float32)[:, None]
    b = np.array([0, -1, -1, 2, 2, 0.5, 1, 0.5, 0, 2, 1, 2, 2, 2, 2, 1, 1], np.float32)
    B = np.tile(b, (rows, 1))
    exact = float(abs(Fraction(0.5) * sum(Fraction(float(x)) * Fraction(float(y))
                                         for x, y in zip(b, A[:, 0]))))  # 7.656e37
    # the norm's bound, 2 * 4 * gamma_{in + r + 2} * ||a||, a = |s| |B| |A| (W0 = 0), in float32
    a = 0.5 * float(np.abs(b).astype(np.float64) @ np.abs(A[:, 0]).astype(np.float64))
    bound = 2 * 4 * gamma(1 + 17 + 2, np.float32) * a
    for W0 in (np.zeros((rows, 1), np.float32), np.zeros((rows, 1), np.float16)):
        n = column_norm(W0, A, B, 0.5)
        assert np.all(np.abs(n.astype(np.float64) - exact) <= bound), (n, exact)


def test_a_kernel_that_returns_zero_for_a_huge_ordinary_row_still_raises(monkeypatch, backend):
    """Session 16's second adversary: with ||a|| past 1.3e154 the rounding bound that excuses
    a 0 from cancellation was computed unscaled, overflowed to inf and excused any 0: a kernel
    returning 0 for the row [1e200, 1] (B = 0: nothing cancels) went unreported."""
    from dora_ref.core import backend as _backend

    kernels = _backend.kernels()
    good_norm = kernels.column_norm

    def broken_norm(W0, A, B, scaling):
        n = good_norm(W0, A, B, scaling)
        n[0] = 0
        return n

    monkeypatch.setattr(kernels, "column_norm", broken_norm)
    for row in ([1e200, 1.0], [1e150, 1.0], [2.0, 1.0]):
        with pytest.raises(RuntimeError, match=r"returned \[0.0\] for row\(s\) \[0\]"):
            column_norm(np.array([row]), np.ones((1, 2)), np.zeros((1, 1)), 1.0)


def test_genuine_zero_tiny_and_huge_rows_are_still_rescued_or_reported():
    """The rescue's genuine cases, in one call: an all-zero row (left at 0), a row of
    1e-170 (recomputed), a row of 1e200 (recomputed), an ordinary row (untouched)."""
    W0 = np.array([[0.0, 0.0], [1e-170, 1e-170], [1e200, 1e200], [3.0, 4.0]])
    n = column_norm(W0, np.ones((1, 2)), np.zeros((4, 1)), 1.0)
    np.testing.assert_allclose(n, [0.0, np.sqrt(2) * 1e-170, np.sqrt(2) * 1e200, 5.0],
                               rtol=4e-16)


def test_merge_norm_is_the_column_norm_bit_for_bit(backend):
    """One definition of n: the norm merge returns (kept for unmerge) is column_norm's,
    bit for bit, also on full C tiles (out = 8 rows = two groups of 4, in = 8 doubles =
    one tile), which the hypothesis sizes reach since issue 15.

    Found so: GCC fused ``acc += v * v`` into a multiply-add in the float64 column_norm
    kernel and not in merge (its default -ffp-contract=fast), and the two norms differed
    in the last bit on 11% of rows. The build now passes -ffp-contract=off.
    """
    rng = np.random.default_rng(0)
    W0, A, B = rng.normal(size=(8, 8)), rng.normal(size=(2, 8)), rng.normal(size=(8, 2)) * 30
    n = column_norm(W0, A, B, 1.3)
    _, n_merge = merge(W0, A, B, np.ones(8), 1.3)
    np.testing.assert_array_equal(n_merge, n)


def test_float32_norm_is_correctly_rounded_where_a_float_accumulator_is_not(backend):
    """Issue 15: only the 3e-21 test above pinned the double accumulator, and the kernel
    tolerances (gamma_in) accept a float one. Here 64 float32 rows of in = 4096 normal
    entries, B = 0 so that V = W0 exactly on both backends: squares summed in double
    give every norm correctly rounded to float32, while a float32 accumulator misses it
    in a third to two thirds of the rows (measured: sequential, 8 or 16 lanes, or
    pairwise; up to 4 ulp).

    The data is checked to have no norm within 1e-11 (relative) of a float32 rounding
    boundary: double's own error here is below 4096 * 2**-53 = 4.5e-13, so any double
    sum rounds the same way as the exact one.
    """
    import math

    rng = np.random.default_rng(15)
    W0 = rng.normal(size=(64, 4096)).astype(np.float32)
    A, B = np.zeros((1, 4096), np.float32), np.zeros((64, 1), np.float32)
    exact = np.array([math.sqrt(math.fsum(float(v) ** 2 for v in row)) for row in W0])
    want = exact.astype(np.float32)
    # distance to the nearest float32 midpoint, relative: the data must be safe
    lo = np.nextafter(want, np.float32(-np.inf)).astype(np.float64)
    hi = np.nextafter(want, np.float32(np.inf)).astype(np.float64)
    mids = np.stack([(lo + want) / 2, (hi + want) / 2])
    assert np.min(np.abs(mids - exact) / exact) > 1e-11
    n = column_norm(W0, A, B, 1.0)
    wrong = np.flatnonzero(n != want)
    assert not wrong.size, (
        f"rows {wrong[:8].tolist()} not correctly rounded: got {n[wrong[:4]].tolist()}, "
        f"want {want[wrong[:4]].tolist()} (a float32 accumulator?)"
    )
    _, n_merge = merge(W0, A, B, np.ones(64, np.float32), 1.0)
    np.testing.assert_array_equal(n_merge, want)
