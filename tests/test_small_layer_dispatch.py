"""The small layer's hot path after the dispatch trims (issue 11, goal 2): same refusals, same bits.

Each shortcut has its regression test here:

* ``WeightSnapshot.of`` and ``check_backward`` call ``tobytes`` directly for
  three arrays (a DoRA forward's A, B, magnitude) and through ``map`` for any
  other number: both find a change of any one bit of any one array, and name
  that array;
* the layer's forward tests ``check_scaling``'s first test inline (a finite
  Python float) and calls it otherwise: every scaling it refuses is refused
  with its message, every one it accepts gives the same bits;
* the layer's backward recognises the usual dy (an (N, out) ndarray of the
  forward's dtype) in one test and sends any other to ``_check_dy``: the same
  gradients, the same refusals as ``dora_backward``, also for a dy whose
  leading dimensions differ from x's but hold N rows;
* the layer's backward calls ``_require_ctx`` only to raise: no forward, a
  failed forward, a merged layer still say so;
* the NumPy backend's A and B are checked by one sum of two dot products
  before its norm: NaN or Inf in either is named, and finite entries whose
  squares overflow that sum are accepted (the exact test decides), as on C;
* the forward's y and the backward's four results are checked by inline dot
  products: an overflow is still refused, naming the result.
"""
import math

import numpy as np
import pytest

from cases import small_dora_layer
import dora_ref
from dora_ref import DoRALinear
from dora_ref.core import functional as F
from dora_ref.core._validate import WeightSnapshot, check_scaling

BACKENDS = dora_ref.available_backends()
FLOATS = [np.float32, np.float64]


def _layer(backend, dtype, **kw):
    return small_dora_layer(backend, dtype, 5, **kw)


def _uint(dtype):
    return np.uint32 if np.dtype(dtype) == np.float32 else np.uint64


# ---------------------------------------------------------------------------
# WeightSnapshot with three arrays (unrolled) and with any other number (map)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_snapshot_of_any_count_finds_one_changed_bit_in_each_array(count, dtype):
    rng = np.random.default_rng(count)
    shapes = [(3, 4), (4, 2), (5,), (2, 2)][:count]
    arrays = tuple(rng.standard_normal(s).astype(dtype) for s in shapes)
    names = tuple(f"a{i}" for i in range(count))
    for k in range(count):
        for pos in (0, arrays[k].size - 1):
            for bit in (0, 8 * np.dtype(dtype).itemsize - 1):  # the last mantissa bit, the sign
                s = WeightSnapshot.of(names, arrays)
                assert s._bytes == WeightSnapshot(dict(zip(names, arrays)))._bytes
                s.check_backward()  # unchanged: passes
                view = arrays[k].view(_uint(dtype))
                view.flat[pos] ^= _uint(dtype)(1) << _uint(dtype)(bit)
                with pytest.raises(RuntimeError, match=f"^{names[k]} changed in place between"):
                    s.check_backward()
                assert s.changed() == [names[k]]
                view.flat[pos] ^= _uint(dtype)(1) << _uint(dtype)(bit)  # back: passes again
                s.check_backward()


def test_snapshot_three_arrays_two_changed_are_both_named():
    a, b, c = np.zeros(3), np.ones(2), np.arange(4.0)
    s = WeightSnapshot.of(("a", "b", "c"), (a, b, c))
    a[0], c[3] = 1.0, -1.0
    with pytest.raises(RuntimeError, match="^a, c changed in place"):
        s.check_backward()


# ---------------------------------------------------------------------------
# the layer's scaling: check_scaling's first test inline
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, np.float64(np.inf),
                                 np.float32(np.nan), True, "2", None, 10 ** 400,
                                 np.array(2.0), complex(2, 0)])
def test_layer_forward_refuses_every_scaling_check_scaling_refuses(backend, bad):
    layer, x, _ = _layer(backend, np.float32)
    with pytest.raises((TypeError, ValueError)) as want:
        check_scaling(bad)
    layer.scaling = bad
    with dora_ref.use_backend(backend):
        with pytest.raises(type(want.value)) as got:
            layer.forward(x)
        assert str(got.value) == str(want.value)
        with pytest.raises(RuntimeError, match="needs a forward"):
            layer.backward(np.zeros((4, 6), np.float32))  # the failed forward left no context


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("good", [2, np.float32(2.0), np.float64(2.0), np.int64(2), -0.5, 0.0])
def test_layer_forward_accepts_every_scaling_check_scaling_accepts_with_its_bits(backend, good):
    layer, x, dy = _layer(backend, np.float64)
    with dora_ref.use_backend(backend):
        layer.scaling = float(check_scaling(good))
        y_float = layer.forward(x)
        dx_float = layer.backward(dy)
        layer.scaling = good
        np.testing.assert_array_equal(layer.forward(x), y_float)
        np.testing.assert_array_equal(layer.backward(dy), dx_float)


# ---------------------------------------------------------------------------
# the layer's backward: the usual dy in one test, any other through _check_dy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_layer_backward_dy_shapes_and_layouts_as_dora_backward(backend, dtype):
    layer, x, dy = _layer(backend, dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    cases = [
        dy,                                   # the usual one
        np.asfortranarray(dy),                # (N, out), not C-contiguous
        dy.reshape(2, 2, 6),                  # leading dimensions holding N rows
        dy.reshape(1, 4, 6),
        dy[:3], dy[:, :5], dy.astype(other),  # refused
        dy.reshape(24), dy.T.copy()[:4],      # refused: 1-D; (out, N)[:4] has out = 4
        dy.tolist(), None, np.float32(1.0),
    ]
    with dora_ref.use_backend(backend):
        _, ctx = F.dora_forward(x, layer.weight, layer.lora_A, layer.lora_B,
                                layer.lora_magnitude_vector, layer.scaling, layer.bias)
        for d in cases:
            layer.zero_grad()
            try:
                want = F.dora_backward(d, ctx)
            except (TypeError, ValueError) as e:
                layer.forward(x)
                with pytest.raises(type(e)) as got:
                    layer.backward(d)
                assert str(got.value) == str(e)
                assert all(not g.any() for g in layer.grads.values())  # nothing accumulated
                continue
            layer.forward(x)
            dx = layer.backward(d)
            np.testing.assert_array_equal(dx, want.dx)
            np.testing.assert_array_equal(layer.grads["lora_A"], want.dA)
            np.testing.assert_array_equal(layer.grads["lora_B"], want.dB)
            np.testing.assert_array_equal(layer.grads["lora_magnitude_vector"], want.dmagnitude)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_backward_without_a_context_or_merged_still_says_so(backend):
    layer, x, dy = _layer(backend, np.float32)
    with dora_ref.use_backend(backend):
        with pytest.raises(RuntimeError, match="backward\\(\\) needs a forward\\(\\) first"):
            layer.backward(dy)
        with pytest.raises(ValueError):
            layer.forward(x[:, :4])  # a bad x: no context left
        with pytest.raises(RuntimeError, match="needs a forward"):
            layer.backward(dy)
        layer.forward(x)
        layer.merge()
        with pytest.raises(RuntimeError, match="the layer is merged: unmerge\\(\\) before training"):
            layer.backward(dy)
        layer.unmerge()


# ---------------------------------------------------------------------------
# the NumPy backend's A and B: one sum of two dot products, then the exact test
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", ["lora_A", "lora_B"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_layer_non_finite_A_or_B_named_with_the_other_finite(backend, dtype, name, bad):
    layer, x, _ = _layer(backend, dtype)
    with dora_ref.use_backend(backend):
        getattr(layer, name).flat[-1] = bad  # in place: the property setter would refuse it
        with pytest.raises(ValueError, match=f"^{name} \\(shape .*\\) contains NaN or Inf"):
            layer.forward(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_layer_A_B_whose_squares_overflow_the_dot_product_are_accepted(backend, dtype):
    """Finite entries beyond sqrt(max): the sum of squares is inf, the exact test passes them."""
    big = 2.0 * math.sqrt(float(np.finfo(dtype).max))
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((3, 2)).astype(dtype)
    A = np.array([[big, 0.0]], dtype)
    B = np.zeros((3, 1), dtype)
    B[0, 0] = 1.0 / big  # s * B @ A = 2 at [0, 0]: the norms stay small
    x = rng.standard_normal((2, 2)).astype(dtype)
    with dora_ref.use_backend(backend):
        layer = DoRALinear(W0, lora_A=A, lora_B=B, lora_alpha=2)
        assert not math.isfinite(float(np.vdot(A, A)))
        y = layer.forward(x)
        y_ref, _ = F.dora_forward(x, W0, A, B, layer.lora_magnitude_vector, layer.scaling)
        np.testing.assert_array_equal(y, y_ref)


# ---------------------------------------------------------------------------
# the inline finiteness tests of y and of the backward's results
# ---------------------------------------------------------------------------


def _overflow_case(where, dtype):
    """(W0, B, x, dy) of a rank-1 layer (A = [[1, 0]], s = 1) where only ``where`` overflows.

    z = x W0.T + (x A.T) B.T; dz = g dy; dg = sum_N dy z; dU = dz B; dB = dz.T U;
    dA = dU.T x; dx = dz W0 + dU A.
    """
    top = float(np.finfo(dtype).max)
    root = 2.0 * math.sqrt(top)  # root * root = 4 * max: inf
    W0, B = np.eye(2), np.zeros((2, 1))
    if where == "y":  # g = 1, y = z = x W0.T + bias
        x, dy = [[0.75 * top, 0.0]], [[0.0, 0.0]]
        return W0, B, x, dy, np.array([0.75 * top, 0.0])
    if where == "dx":  # dx[:, 0] = dz0 + dz1
        W0 = np.array([[1.0, 0.0], [1.0, 0.0]])
        x, dy = [[0.0, 1.0]], [[0.75 * top, 0.75 * top]]
    elif where == "dA":  # dA[0, 1] = dU x1 = 8 * max / 4
        B[0, 0] = 1.0
        x, dy = [[1.0, top / 4]], [[8.0, 0.0]]
    elif where == "dB":  # dB[1] = dz1 U = dy1 x0
        x, dy = [[root, 0.0]], [[0.0, root]]
    else:  # dmagnitude[1] = dy1 z1 / n1 = dy1 x1
        x, dy = [[0.0, root]], [[0.0, root]]
    return W0, B, x, dy, None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("where", ["y", "dx", "dA", "dB", "dmagnitude"])
# the overflow is the point: NumPy's own RuntimeWarning comes before the ValueError asserted
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_layer_overflow_of_each_result_is_named(backend, dtype, where):
    """Finite inputs, one result past the dtype's range: refused, naming that result."""
    W0, B, x, dy, bias = _overflow_case(where, dtype)
    W0, B, x, dy = (np.asarray(a, dtype) for a in (W0, B, x, dy))
    with dora_ref.use_backend(backend):
        layer = DoRALinear(W0, lora_A=np.array([[1.0, 0.0]], dtype), lora_B=B, lora_alpha=1)
        if where == "y":
            layer.set_base_weight(W0, bias=np.asarray(bias, dtype))  # y = x0 + 0.75 max
            with pytest.raises(ValueError, match=r"^y \(the output\) .* overflowed"):
                layer.forward(x)
            return
        layer.forward(x)
        before = {k: v.copy() for k, v in layer.grads.items()}
        with pytest.raises(ValueError, match=f"^{where} \\(shape .*\\) overflowed"):
            layer.backward(dy)
        for k, v in layer.grads.items():
            np.testing.assert_array_equal(v, before[k])  # nothing accumulated


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_layer_non_finite_dy_is_named(backend, dtype):
    layer, x, dy = _layer(backend, dtype)
    with dora_ref.use_backend(backend):
        layer.forward(x)
        d = dy.copy()
        d[2, 3] = np.nan
        with pytest.raises(ValueError, match="^dy \\(shape \\(4, 6\\)\\) contains NaN or Inf"):
            layer.backward(d)
