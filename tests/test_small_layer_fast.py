"""The small layer's cheaper hot path (issue 11, goal 2) refuses what it refused, with the same bits.

Each shortcut of the session has its regression test here:

* ``norm.smallest_norm`` (``n.argmin()``) is ``np.minimum.reduce(n)``,
  NaN included, so ``_scale`` and ``norms_in_safe_range`` decide as before;
* ``_validate.results_finite`` (the forward's y, the backward's dA, dB,
  dmagnitude, dx) is False whenever ``check_result_finite`` would raise, and
  the layer still names the input or the overflow;
* ``WeightSnapshot.of`` is ``WeightSnapshot(dict)``: a write into A, B or the
  magnitude between forward and backward is refused by the layer, whatever
  the bit changed;
* the layer's backward goes past ``dora_backward``'s context check only on
  its own float32/float64 ``DoRAContext``: same gradients, same refusals;
* the layer's forward skips ``_mask_for`` only without a mask and without
  dropout;
* the NumPy norm runs ``np.errstate`` only when a float32 cast can overflow,
  and ``backward_epilogue`` calls ``np.add.reduce`` (``np.sum``'s call): the
  same bits, no new warning.
"""
import pickle
import warnings

import numpy as np
import pytest

from cases import small_dora_layer
import dora_ref
from dora_ref import DoRALinear
from dora_ref.core import functional as F
from dora_ref.core import _validate
from dora_ref.core import kernels_numpy as KN
from dora_ref.core._validate import WeightSnapshot, check_result_finite, results_finite
from dora_ref.core.norm import norms_in_safe_range, smallest_norm
from dora_ref.layers.optim import SGD

BACKENDS = dora_ref.available_backends()
FLOATS = [np.float32, np.float64]


def _layer(backend, dtype, **kw):
    return small_dora_layer(backend, dtype, 3, **kw)


# ---------------------------------------------------------------------------
# smallest_norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [None, np.nan, np.inf, 0.0, -0.0, 1e-300])
def test_smallest_norm_is_minimum_reduce_at_every_position(dtype, bad):
    rng = np.random.default_rng(0)
    n = rng.uniform(0.5, 2.0, 9).astype(dtype)
    positions = [None] if bad is None else range(n.size)
    for i in positions:
        v = n.copy()
        if i is not None:
            v[i] = bad
            v[(i + 4) % v.size] = 0.25  # another small value before or after it
        want = float(np.minimum.reduce(v))
        got = smallest_norm(v)
        assert (np.isnan(got) and np.isnan(want)) or got == want, (i, got, want)
        assert norms_in_safe_range(v) == bool(np.isfinite(v).all()
                                              and float(v.min()) >= F._SMALLEST_SAFE_NORM)


def test_smallest_norm_two_nans_and_a_single_entry():
    assert np.isnan(smallest_norm(np.array([1.0, np.nan, -1.0, np.nan])))
    assert smallest_norm(np.array([3.0], np.float32)) == 3.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("row", [0, 3, 5])
def test_layer_nan_magnitude_at_any_row_is_named(backend, dtype, row):
    """A NaN in the magnitude makes _scale's bound NaN (m . m): the full sequence names it."""
    layer, x, _ = _layer(backend, dtype)
    layer.lora_magnitude_vector[row] = np.nan
    with dora_ref.use_backend(backend):
        with pytest.raises(ValueError, match=r"lora_magnitude_vector \(shape \(6,\)\) contains NaN"):
            layer.forward(x)


# ---------------------------------------------------------------------------
# results_finite
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_results_finite_false_whenever_check_result_finite_raises(dtype):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s).astype(dtype) for s in [(3, 4), (4, 2), (5,), (6, 3)]]
    assert results_finite(*arrays)
    for k, a in enumerate(arrays):
        for i in range(a.size):
            for bad in (np.nan, np.inf, -np.inf):
                b = [c.copy() for c in arrays]
                b[k].flat[i] = bad
                assert not results_finite(*b)
                with pytest.raises(ValueError, match="overflowed"):
                    check_result_finite([(f"r{j}", c) for j, c in enumerate(b)], [])
    # a sum that overflows alone: False, and the exact test finds nothing wrong. Summed in
    # double (the C extension's sum_squares, session 23) float32 squares cannot overflow it:
    # then True, as every entry is finite
    big = [np.full((3, 3), np.finfo(dtype).max / 2, dtype)]
    summed_in_double = dtype == np.float32 and _validate._SUM_SQUARES_C is not None
    with np.errstate(over="raise"):
        assert results_finite(*big) is summed_in_double
    check_result_finite([("big", big[0])], [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
# an Inf in dy meets zeros in the products before the check names it (as before the session)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_layer_non_finite_x_and_dy_still_named(backend, dtype):
    layer, x, dy = _layer(backend, dtype)
    with dora_ref.use_backend(backend):
        bad_x = x.copy()
        bad_x[2, 3] = np.nan
        with pytest.raises(ValueError, match=r"x \(shape \(4, 5\)\) contains NaN or Inf"):
            layer.forward(bad_x)
        layer.forward(x)
        bad_dy = dy.copy()
        bad_dy[1, 4] = np.inf
        before = {k: v.copy() for k, v in layer.grads.items()}
        with pytest.raises(ValueError, match=r"dy \(shape \(4, 6\)\) contains NaN or Inf"):
            layer.backward(bad_dy)
        for k, v in layer.grads.items():  # nothing accumulated
            np.testing.assert_array_equal(v, before[k])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_layer_overflowing_output_and_gradient_refused(backend, dtype):
    big = np.finfo(dtype).max / 2
    with dora_ref.use_backend(backend):
        layer = DoRALinear(np.ones((6, 5), dtype), r=2, lora_alpha=4, rng=0)
        x = np.full((4, 5), big, dtype)  # every entry finite, each output a sum of 5 of them
        with pytest.raises(ValueError, match=r"y \(the output\) .* overflowed"):
            layer.forward(x)
        layer.forward(np.ones((4, 5), dtype))
        before = {k: v.copy() for k, v in layer.grads.items()}
        with pytest.raises(ValueError, match=r"overflowed"):
            layer.backward(np.full((4, 6), big, dtype))
        for k, v in layer.grads.items():
            np.testing.assert_array_equal(v, before[k])


# ---------------------------------------------------------------------------
# WeightSnapshot.of and the layer's stale-backward check
# ---------------------------------------------------------------------------


def test_weight_snapshot_of_is_the_dict_constructor():
    a, b = np.arange(4.0), np.ones((2, 2), np.float32)
    s1 = WeightSnapshot({"a": a, "b": b})
    s2 = WeightSnapshot.of(("a", "b"), (a, b))
    assert s1._names == s2._names and s1._bytes == s2._bytes
    assert all(x is y for x, y in zip(s1._arrays, s2._arrays))
    b[1, 0] = -0.0  # a sign bit only
    assert s1.changed() == s2.changed() == ["b"]
    with pytest.raises(RuntimeError, match="b changed in place between the forward"):
        s2.check_backward()
    s3 = pickle.loads(pickle.dumps(s2))
    assert s3._names == ("a", "b") and s3.changed() == ["b"]  # b was written before


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", ["lora_A", "lora_B", "lora_magnitude_vector"])
@pytest.mark.parametrize("how", ["one_bit", "optimiser", "assignment"])
def test_layer_write_between_forward_and_backward_refused(backend, dtype, name, how):
    layer, x, dy = _layer(backend, dtype)
    with dora_ref.use_backend(backend):
        layer.forward(x)
        p = getattr(layer, name)
        if how == "one_bit":  # the last bit of one entry's mantissa
            bits = p.view(np.uint32 if dtype == np.float32 else np.uint64)
            bits.flat[1] ^= 1
        elif how == "optimiser":
            layer.grads[name][...] = 1
            SGD(layer.parameters(), lr=0.1).step(layer.grads)
        else:
            setattr(layer, name, p + 1)
        before = {k: v.copy() for k, v in layer.grads.items()}
        with pytest.raises(RuntimeError, match="changed in place between the forward and this backward"):
            layer.backward(dy)
        for k, v in layer.grads.items():
            np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_scaling_changed_or_base_replaced_between_forward_and_backward(backend):
    """The context keeps the forward's scaling and W0: the gradients are the forward's, as before."""
    layer, x, dy = _layer(backend, np.float64)
    with dora_ref.use_backend(backend):
        y, ctx = F.dora_forward(x, layer.weight, layer.lora_A, layer.lora_B,
                                layer.lora_magnitude_vector, layer.scaling, layer.bias)
        want = F.dora_backward(dy, ctx)
        layer.forward(x)
        layer.scaling = 5.0
        layer.set_base_weight(layer.weight * 2)  # re-initialises the magnitude: refused
        with pytest.raises(RuntimeError, match="lora_magnitude_vector"):
            layer.backward(dy)
        layer2, _, _ = _layer(backend, np.float64)
        layer2.forward(x)
        layer2.scaling = 5.0  # the context holds the forward's scaling
        dx = layer2.backward(dy)
        np.testing.assert_array_equal(dx, want.dx)
        np.testing.assert_array_equal(layer2.grads["lora_A"], want.dA)


# ---------------------------------------------------------------------------
# the layer's backward past dora_backward's context check
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("detach_norm", [True, False])
def test_layer_backward_bits_are_dora_backwards(backend, dtype, detach_norm):
    layer, x, dy = _layer(backend, dtype, detach_norm=detach_norm)
    with dora_ref.use_backend(backend):
        y, ctx = F.dora_forward(x, layer.weight, layer.lora_A, layer.lora_B,
                                layer.lora_magnitude_vector, layer.scaling, layer.bias)
        want = F.dora_backward(dy, ctx, detach_norm=detach_norm)
        np.testing.assert_array_equal(layer.forward(x), y)
        dx = layer.backward(dy.reshape(2, 2, 6).reshape(4, 6))
        np.testing.assert_array_equal(dx, want.dx)
        np.testing.assert_array_equal(layer.grads["lora_A"], want.dA)
        np.testing.assert_array_equal(layer.grads["lora_B"], want.dB)
        np.testing.assert_array_equal(layer.grads["lora_magnitude_vector"], want.dmagnitude)
        # a batch with leading dimensions: dx in x's shape
        layer.forward(x.reshape(2, 2, 5))
        assert layer.backward(dy.reshape(2, 2, 6)).shape == (2, 2, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_backward_refuses_a_bad_dy_as_dora_backward_does(backend):
    layer, x, dy = _layer(backend, np.float32)
    with dora_ref.use_backend(backend):
        _, ctx = F.dora_forward(x, layer.weight, layer.lora_A, layer.lora_B,
                                layer.lora_magnitude_vector, layer.scaling, layer.bias)
        layer.forward(x)
        for bad in (dy[:3], dy.astype(np.float64), dy[:, :5], [[1.0] * 6] * 4, None):
            with pytest.raises((TypeError, ValueError)) as functional:
                F.dora_backward(bad, ctx)
            with pytest.raises(type(functional.value), match=None) as layered:
                layer.backward(bad)
            assert str(layered.value) == str(functional.value)
        with pytest.raises(TypeError, match="ctx must be the DoRAContext returned by dora_forward"):
            F.dora_backward(dy, object())  # the public entry still checks its ctx


def test_layer_backward_of_a_16_bit_forward_takes_dora_backward():
    rng = np.random.default_rng(0)
    W0 = (rng.standard_normal((6, 5)) / 3).astype(np.float16)
    layer = DoRALinear(W0, r=2, lora_alpha=4, rng=0)
    x = rng.standard_normal((4, 5)).astype(np.float16)
    dy = rng.standard_normal((4, 6)).astype(np.float16)
    layer.forward(x)
    assert layer._ctx.precision is not None
    dx = layer.backward(dy)
    assert dx.dtype == np.float16 and dx.shape == (4, 5)
    layer.forward(x)
    layer.lora_A[0, 0] += 1
    with pytest.raises(RuntimeError, match="changed in place between the forward"):
        layer.backward(dy)


# ---------------------------------------------------------------------------
# the forward's dropout shortcut
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_forward_masks_as_before(backend):
    layer, x, _ = _layer(backend, np.float64, lora_dropout=0.5)
    with dora_ref.use_backend(backend):
        layer.forward(x)
        assert layer._ctx.dropout_mask is not None  # a mask drawn
        layer.eval()
        layer.forward(x)
        assert layer._ctx.dropout_mask is None
    layer0, x, _ = _layer(backend, np.float64)
    with dora_ref.use_backend(backend):
        mask = np.full(x.shape, 2.0)
        mask[0] = 0
        layer0.forward(x, dropout_mask=mask)  # given with lora_dropout = 0: used
        np.testing.assert_array_equal(layer0._ctx.dropout_mask, mask)
        layer0.eval()
        with pytest.raises(ValueError, match="dropout_mask given in eval mode"):
            layer0.forward(x, dropout_mask=mask)


# ---------------------------------------------------------------------------
# the NumPy kernels
# ---------------------------------------------------------------------------


def _row_norms_before(V):
    """The NumPy norm as it was: the cast and the root under errstate every call."""
    V64 = V.astype(np.float64, copy=False)
    with np.errstate(over="ignore"):
        return np.sqrt(np.einsum("ij,ij->i", V64, V64)).astype(V.dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e18, 1e30, "max", "nan", "inf"])
def test_numpy_row_norms_bits_and_no_warning(dtype, scale):
    rng = np.random.default_rng(2)
    V = rng.standard_normal((7, 33)).astype(dtype)
    if scale == "max":
        V[3] = np.finfo(dtype).max
    elif scale in ("nan", "inf"):
        V[5, 2] = float(scale)
    else:
        V *= dtype(scale) if scale < np.finfo(dtype).max else 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            got = KN._row_norms(V)
    want = _row_norms_before(V)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))
    if scale == "max":
        assert np.isinf(got[3])  # the sum of squares overflows: inf, rescued by the caller


@pytest.mark.parametrize("dtype", FLOATS)
def test_numpy_backward_epilogue_dg_is_np_sum(dtype):
    rng = np.random.default_rng(4)
    dy, base = (rng.standard_normal((37, 11)).astype(dtype) for _ in range(2))
    U, B, g = (rng.standard_normal(s).astype(dtype) for s in [(37, 3), (11, 3), (11,)])
    dg, dz = KN.backward_epilogue(dy, base, U, B, g, 0.7)
    z = U @ B.T
    z *= 0.7
    z += base
    z *= dy
    np.testing.assert_array_equal(dg, np.sum(z, axis=0))
    np.testing.assert_array_equal(dz, dy * g)


@pytest.mark.parametrize("dtype", FLOATS)
def test_huge_magnitude_or_norm_is_no_floating_point_error_under_errstate_raise(backend, dtype):
    # found at integration: the fast path's sums of squares n . n and m . m by
    # ndarray.dot set the overflow flag: a RuntimeWarning by default, and under
    # np.errstate(all="raise") a FloatingPointError instead of the full path's
    # answer, for a magnitude (or norms) whose squares overflow but whose quotients
    # do not. np.vdot's implementation (the session's start) sets no flag.
    rng = np.random.default_rng(4)
    big = np.sqrt(np.finfo(dtype).max)  # its square overflows
    W0 = rng.standard_normal((48, 32)).astype(dtype)
    layer = DoRALinear(W0, None, r=4, lora_alpha=8, rng=0)
    layer.lora_magnitude_vector[...] = big
    x, dy = rng.standard_normal((8, 32)).astype(dtype), rng.standard_normal((8, 48)).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            y = layer.forward(x)
            layer.backward(dy)
            n = layer._forward_norm()
            # every norm finite, their squares' sum overflows: "not sure", without a flag raised;
            # summed in double (float32 with the C extension's sum_squares) it does not: True
            summed_in_double = dtype == np.float32 and _validate._SUM_SQUARES_C is not None
            assert norms_in_safe_range(n * dtype(big)) is summed_in_double
    x64, W64 = x.astype(np.float64), W0.astype(np.float64)
    g = float(big) / np.linalg.norm(W64, axis=1)  # B = 0: V = W0
    # a 32-term sum and a few roundings, relative to the sum of |terms|
    bound = 40 * np.finfo(dtype).eps * (np.abs(x64) @ np.abs(W64).T) * g
    assert np.all(np.abs(y - (x64 @ W64.T) * g) <= bound)
