"""The cheaper per-call checks of the layers' hot path (issue 11) keep every check that can fail.

* ``_validate.all_finite`` decides by one dot product ``a . a`` and falls
  back to the elementwise test when that is not finite: a NaN or an Inf at
  any position is found, and an overflow of the sum alone is no error;
* ``functional._scale`` checks the norms and m / n in three reductions: its
  fast answer is the full sequence's (rescue, ``check_norm``,
  ``magnitude_over_norm``), and a NaN/Inf in the magnitude is named;
* ``forward_epilogue(..., out=)`` (both backends) writes y over the base
  product it may alias element for element, and refuses every other out;
* a layer's eval forward writes y over its base product: a backward after
  it recomputes that product and gives the gradients of a fresh computation,
  and an optimiser step between the two is still refused.
"""
import re

import numpy as np
import pytest

import dora_ref
from dora_ref import DoRALinear
from dora_ref.core import functional as F
from dora_ref.core import kernels_numpy as KN
from dora_ref.core._validate import all_finite, check_input, check_scaling
from dora_ref.core.norm import _SMALLEST_SAFE_NORM, norms_in_safe_range
from dora_ref.layers.optim import SGD

BACKENDS = dora_ref.available_backends()
FLOATS = [np.float32, np.float64]


def _kernels(backend):
    with dora_ref.use_backend(backend):
        return dora_ref.core.backend.kernels()


# ---------------------------------------------------------------------------
# all_finite
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 9), (64, 64)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_a_non_finite_entry_at_every_position(dtype, shape, bad):
    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    assert all_finite(a)
    for i in range(a.size):
        b = a.copy()
        b.flat[i] = bad
        assert not all_finite(b), (i, bad)
        assert not all_finite(b.T), (i, bad)  # not C-contiguous: the elementwise test


@pytest.mark.parametrize("dtype", FLOATS)
def test_all_finite_an_overflowing_sum_of_finite_entries_is_finite(dtype):
    """The sum of squares overflows (1e30 ** 2 in float32, 1e200 ** 2 in float64): the
    elementwise test decides, and every entry is finite."""
    big = np.full((4, 3), 1e30 if dtype == np.float32 else 1e200, dtype=dtype)
    with np.errstate(over="raise"):  # the dot product must not warn either
        assert all_finite(big)
        assert all_finite(np.finfo(dtype).max * np.ones(5, dtype))
    assert all_finite(np.zeros((0, 4), dtype))


def test_all_finite_other_inputs_take_the_elementwise_test():
    assert all_finite([1.0, 2.0]) and not all_finite([1.0, np.nan])
    assert all_finite(np.ones(3, np.float16)) and not all_finite(np.array([1, np.inf], np.float16))


def test_check_scaling_fast_path_refuses_what_the_general_one_does():
    assert check_scaling(0.5) == 0.5
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="scaling must be finite"):
            check_scaling(bad)


def test_check_input_fast_path_refuses_what_the_general_one_does():
    x = np.ones((3, 4), np.float16)
    with pytest.raises(TypeError, match="x has dtype float16"):
        check_input(x, 4, np.dtype(np.float16))  # 16-bit only where low_precision says so
    assert check_input(x, 4, np.dtype(np.float16), low_precision=True) is x
    with pytest.raises(TypeError, match="x has dtype float32 but the weights have dtype float64"):
        check_input(np.ones((3, 4), np.float32), 4, np.dtype(np.float64))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in\) = \(\.\.\., 5\)"):
        check_input(np.ones((3, 4)), 5, np.dtype(np.float64))
    with pytest.raises(TypeError, match="numpy.ma.MaskedArray"):
        check_input(np.ma.masked_array(np.ones((3, 4))), 4, np.dtype(np.float64))


# ---------------------------------------------------------------------------
# _scale: the norm's and m / n's checks in three reductions
# ---------------------------------------------------------------------------


def _full_sequence(n, m, W0, A, B, s, allow_zero_norm):
    """What _scale replaced: rescue, check_norm, magnitude_over_norm."""
    n = n.copy()
    F._rescue_extreme_rows(n, W0, A, B, s)
    F.check_norm(n, W0, allow_zero_norm)
    return F.magnitude_over_norm(m, n), n


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", ["ordinary", "tiny_row", "zero_row", "huge_m", "nan_m", "inf_m"])
def test_scale_fast_answer_is_the_full_sequences(dtype, case):
    rng = np.random.default_rng(1)
    W0 = rng.standard_normal((6, 5)).astype(dtype)
    A = rng.standard_normal((2, 5)).astype(dtype)
    B = np.zeros((6, 2), dtype)
    m = rng.uniform(0.5, 2, 6).astype(dtype)
    if case == "tiny_row":  # a row whose float64 sum of squares underflows: rescued
        W0[2] = 1e-160 if dtype == np.float64 else 1e-40
    if case == "zero_row":
        W0[3] = 0
    if case == "huge_m":
        m[1] = np.finfo(dtype).max
    if case == "nan_m":
        m[4] = np.nan
    if case == "inf_m":
        m[0] = np.inf
    n = _kernels("numpy").column_norm(W0, A, B, 1.0)
    for allow_zero_norm in (False, True):
        got_n = n.copy()
        if not np.isfinite(m).all():  # the full sequence ran after m was checked: named here
            with pytest.raises(ValueError, match=r"the_m \(shape \(6,\)\) contains NaN or Inf"):
                F._scale(got_n, m, W0, A, B, 1.0, True, allow_zero_norm, "the_m")
            continue
        try:
            want, want_n = _full_sequence(n, m, W0, A, B, 1.0, allow_zero_norm)
        except ValueError as e:
            with pytest.raises(type(e), match=re.escape(str(e))):
                F._scale(got_n, m, W0, A, B, 1.0, True, allow_zero_norm, "the_m")
            continue
        g, nonzero = F._scale(got_n, m, W0, A, B, 1.0, True, allow_zero_norm, "the_m")
        np.testing.assert_array_equal(g, want)
        np.testing.assert_array_equal(got_n, want_n)  # rescued in place, as before
        assert nonzero == bool(want_n.all())


@pytest.mark.parametrize("dtype", FLOATS)
def test_norms_in_safe_range(dtype):
    n = np.array([1.0, 2.0, 3.0], dtype)
    assert norms_in_safe_range(n)
    for bad in (np.nan, np.inf, 0.0):
        m = n.copy()
        m[1] = bad
        assert not norms_in_safe_range(m)
    if dtype == np.float64:
        assert not norms_in_safe_range(np.array([1.0, _SMALLEST_SAFE_NORM / 2]))
    assert not norms_in_safe_range(np.zeros(0, dtype))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_layer_nan_magnitude_at_a_zero_norm_row_is_named(bad):
    """With allow_zero_norm, g = 0 where n = 0 whatever m holds there: the magnitude's NaN
    must still be found, and named (the fast test does not hold with a zero norm)."""
    W0 = np.ones((3, 4))
    W0[1] = 0
    layer = DoRALinear(W0, r=1, allow_zero_norm=True, rng=0)
    layer.lora_magnitude_vector[1] = bad
    with pytest.raises(ValueError, match=r"lora_magnitude_vector \(shape \(3,\)\) contains NaN or Inf"):
        layer.forward(np.ones((2, 4)))


# ---------------------------------------------------------------------------
# forward_epilogue(..., out=)
# ---------------------------------------------------------------------------


def _epilogue_args(dtype, N=9, out=13, r=3, seed=2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, out)).astype(dtype), rng.standard_normal((N, r)).astype(dtype),
            rng.standard_normal((out, r)).astype(dtype), rng.standard_normal(out).astype(dtype),
            0.7, rng.standard_normal(out).astype(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_epilogue_out_is_base_gives_the_bits_of_a_new_array(backend, dtype, with_bias):
    base, U, B, g, s, bias = _epilogue_args(dtype, N=37, out=70)
    bias = bias if with_bias else None
    K = _kernels(backend)
    want = K.forward_epilogue(base, U, B, g, s, bias)
    separate = np.empty_like(base)
    assert K.forward_epilogue(base, U, B, g, s, bias, out=separate) is separate
    np.testing.assert_array_equal(separate, want)
    own = base.copy()
    assert K.forward_epilogue(own, U, B, g, s, bias, out=own) is own
    np.testing.assert_array_equal(own, want)
    # and the independent formula
    ref = g * (base.astype(np.float64) + s * (U.astype(np.float64) @ B.T.astype(np.float64)))
    if bias is not None:
        ref = ref + bias
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(own, ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_epilogue_out_16_bit(backend):
    base, U, B, g, s, bias = _epilogue_args(np.float32)
    K = _kernels(backend)
    want = K.forward_epilogue(base, U, B, g, s, bias, out_dtype=np.float16)
    out = np.empty(base.shape, np.float16)
    assert K.forward_epilogue(base, U, B, g, s, bias, out_dtype=np.float16, out=out) is out
    np.testing.assert_array_equal(out, want)
    with pytest.raises(TypeError, match="out must have y's dtype float16, got float32"):
        K.forward_epilogue(base, U, B, g, s, bias, out_dtype=np.float16, out=base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_epilogue_refuses_a_bad_out(backend):
    base, U, B, g, s, bias = _epilogue_args(np.float64)
    K = _kernels(backend)
    keep = [a.copy() for a in (base, U, B, g, bias)]

    def refused(out, exc, match):
        with pytest.raises(exc, match=match):
            K.forward_epilogue(base, U, B, g, s, bias, out=out)

    refused(base.tolist(), TypeError, "out must be a numpy.ndarray")
    refused(np.empty(base.shape, np.float32), TypeError, "out must have y's dtype float64")
    refused(np.empty((base.shape[0] + 1, base.shape[1])), ValueError, "out must have base's shape")
    refused(np.empty(base.shape[::-1]).T, ValueError, "out must be C-contiguous")
    ro = np.empty_like(base)
    ro.flags.writeable = False
    refused(ro, ValueError, "out must be writeable")
    # overlaps: base shifted by one element, U, g and the bias inside one buffer
    buf = np.zeros(base.size + 1)
    buf[1:] = base.ravel()
    shifted_base = buf[1:].reshape(base.shape)
    with pytest.raises(ValueError, match="out overlaps base other than element for element"):
        K.forward_epilogue(shifted_base, U, B, g, s, bias, out=buf[:-1].reshape(base.shape))
    big = np.zeros(base.size + g.size)
    big_out = big[:base.size].reshape(base.shape)
    with pytest.raises(ValueError, match="out overlaps g"):
        K.forward_epilogue(base, U, B, big[base.size - 3:base.size - 3 + g.size], s, bias,
                           out=big_out)
    with pytest.raises(ValueError, match="out overlaps bias"):
        K.forward_epilogue(base, U, B, g, s, big[5:5 + bias.size], out=big_out)
    for a, k in zip((base, U, B, g, bias), keep):
        np.testing.assert_array_equal(a, k)  # nothing was written


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_epilogue_refuses_out_overlapping_U_or_B(backend):
    """Both backends take the same out= contract (kernels_numpy.check_epilogue_out)."""
    base, U, B, g, s, bias = _epilogue_args(np.float32)
    K = _kernels(backend)
    big = np.zeros(base.size + U.size, np.float32)
    out = big[:base.size].reshape(base.shape)
    U_in_big = big[base.size - 2:base.size - 2 + U.size].reshape(U.shape)
    U_in_big[...] = U
    with pytest.raises(ValueError, match="out overlaps U"):
        K.forward_epilogue(base, U_in_big, B, g, s, bias, out=out)
    B_view = out.reshape(-1)[:B.size].reshape(B.shape)
    with pytest.raises(ValueError, match="out overlaps B"):
        K.forward_epilogue(base, U, B_view, g, s, bias, out=out)


# ---------------------------------------------------------------------------
# the eval forward writes y over its base product
# ---------------------------------------------------------------------------


def _fresh_grads(layer, x, dy):
    """The gradients by the functional API on copies: a fresh recomputation."""
    y, ctx = F.dora_forward(x, layer.weight.copy(), layer.lora_A.copy(), layer.lora_B.copy(),
                            layer.lora_magnitude_vector.copy(), layer.scaling,
                            None if layer.bias is None else layer.bias.copy())
    return y, F.dora_backward(dy, ctx, detach_norm=layer.detach_norm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("detach_norm", [True, False])
def test_backward_after_an_eval_forward_recomputes_the_base_product(backend, dtype, detach_norm):
    rng = np.random.default_rng(3)
    with dora_ref.use_backend(backend):
        layer = DoRALinear(rng.standard_normal((7, 5)).astype(dtype),
                           rng.standard_normal(7).astype(dtype), r=2, init_lora_weights=False,
                           detach_norm=detach_norm, rng=0)
        layer.eval()
        x = rng.standard_normal((2, 3, 5)).astype(dtype)
        dy = rng.standard_normal((2, 3, 7)).astype(dtype)
        y = layer.forward(x)
        assert layer._ctx.base is None  # y was written over it
        dx = layer.backward(dy)
        y_ref, g_ref = _fresh_grads(layer, x, dy)
    np.testing.assert_array_equal(y, y_ref)  # the same operations on the same values
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx, g_ref.dx, rtol=tol, atol=tol)
    for name, want in (("lora_A", g_ref.dA), ("lora_B", g_ref.dB),
                       ("lora_magnitude_vector", g_ref.dmagnitude)):
        np.testing.assert_allclose(layer.grads[name], want, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_forward_optimiser_step_before_backward_still_refused(backend):
    rng = np.random.default_rng(4)
    with dora_ref.use_backend(backend):
        layer = DoRALinear(rng.standard_normal((6, 4)), r=2, init_lora_weights=False, rng=0)
        layer.eval()
        x = rng.standard_normal((3, 4))
        y = layer.forward(x)
        layer.grads = {k: np.ones_like(v) for k, v in layer.grads.items()}
        SGD(layer.parameters(), lr=0.1).step(layer.grads)
        with pytest.raises(RuntimeError, match="changed in place between the forward and this backward"):
            layer.backward(np.ones_like(y))
        # the next eval forward sees the step: a recomputed norm, the fresh result
        y2 = layer.forward(x)
        np.testing.assert_array_equal(y2, _fresh_grads(layer, x, np.ones_like(y))[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_forward_returns_a_new_array_each_call(backend):
    """y is the base product of this call, never an array an earlier call returned."""
    rng = np.random.default_rng(5)
    with dora_ref.use_backend(backend):
        layer = DoRALinear(rng.standard_normal((6, 4)), r=2, init_lora_weights=False, rng=0).eval()
        x = rng.standard_normal((3, 4))
        y1 = layer.forward(x)
        keep = y1.copy()
        y2 = layer.forward(2 * x)
        assert not np.shares_memory(y1, y2)
        np.testing.assert_array_equal(y1, keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_forward_base_weight_replaced_before_backward(backend):
    """A new base weight re-initialises the magnitude in place: the backward of the eval
    forward before it is refused (it would recompute the base product of another layer),
    and the next forward uses the new weight, its norm recomputed."""
    rng = np.random.default_rng(6)
    with dora_ref.use_backend(backend):
        layer = DoRALinear(rng.standard_normal((6, 4)), r=2, init_lora_weights=False, rng=0).eval()
        x = rng.standard_normal((3, 4))
        dy = rng.standard_normal((3, 6))
        layer.forward(x)
        layer.set_base_weight(rng.standard_normal((6, 4)))
        with pytest.raises(RuntimeError, match="changed in place between the forward"):
            layer.backward(dy)
        y_new = layer.forward(x)
        y_ref, g_ref = _fresh_grads(layer, x, dy)
        np.testing.assert_array_equal(y_new, y_ref)
        dx = layer.backward(dy)
        np.testing.assert_allclose(dx, g_ref.dx, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.grads["lora_A"], g_ref.dA, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# the C norm kernel proves A and B finite; the layer checks them only then
# ---------------------------------------------------------------------------

C = dora_ref.kernels.c if "c" in BACKENDS else None


@pytest.mark.skipif(C is None, reason="no C extension")
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["A", "B"])
@pytest.mark.parametrize("zero_other", [False, True])
@pytest.mark.parametrize("s", [0.5, 0.0])
def test_c_column_norm_nan_or_inf_in_A_or_B_gives_a_non_finite_norm(dtype, bad, where,
                                                                    zero_other, s):
    """NORM_PROPAGATES_NON_FINITE: a NaN/Inf at any position of A or B (also
    against a zero partner, 0 * Inf, and at s = 0) leaves a norm NaN or Inf,
    at shapes with full and partial tiles."""
    assert C.NORM_PROPAGATES_NON_FINITE
    rng = np.random.default_rng(5)
    for out_f, in_f, r in [(64, 64, 8), (7, 13, 3), (1, 1, 1)]:
        W0 = rng.standard_normal((out_f, in_f)).astype(dtype)
        A = rng.standard_normal((r, in_f)).astype(dtype)
        B = rng.standard_normal((out_f, r)).astype(dtype)
        if zero_other:  # the partner of every bad element is 0: 0 * Inf must be NaN
            (B if where == "A" else A)[...] = 0
        arr = A if where == "A" else B
        positions = list(np.ndindex(arr.shape))
        for pos in positions[:: max(1, len(positions) // 40)] + [positions[-1]]:
            bad_arr = arr.copy()
            bad_arr[pos] = bad
            args = (W0, bad_arr, B, s) if where == "A" else (W0, A, bad_arr, s)
            assert not np.isfinite(C.column_norm(*args)).all(), (out_f, in_f, r, pos)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", ["lora_A", "lora_B"])
@pytest.mark.parametrize("training", [True, False])
def test_layer_nan_in_lora_A_or_B_is_named_on_every_backend(backend, dtype, bad, name, training):
    """The C backend's training forward checks A and B only when a norm is not
    finite: the error still names the array, as the NumPy backend's and the
    eval forward's (a cached norm proves nothing) up-front checks do; with the
    magnitude bad as well, the adapter is named first, as before."""
    rng = np.random.default_rng(6)
    with dora_ref.use_backend(backend):
        layer = DoRALinear(rng.standard_normal((12, 10)).astype(dtype), r=3, rng=0)
        layer.lora_B[...] = rng.standard_normal(layer.lora_B.shape)
        x = rng.standard_normal((4, 10)).astype(dtype)
        layer.train(training)
        layer(x)  # an eval forward caches the norm
        getattr(layer, name)[1, 2] = bad
        # the eval forward's norm (recomputed: A or B changed) names them as F.column_norm does
        shown = name if training else rf"(lora_)?{name[-1]}"
        with pytest.raises(ValueError, match=rf"^{shown} \(shape .*\) contains NaN or Inf"):
            layer(x)
        layer.lora_magnitude_vector[0] = np.nan
        with pytest.raises(ValueError, match=rf"^{shown} \(shape .*\) contains NaN or Inf"):
            layer(x)
