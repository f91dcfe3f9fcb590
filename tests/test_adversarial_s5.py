"""Regression tests for the defects adversary A found in session 5's changes.

* ``ndarray.dot`` in ``functional._scale`` and ``norm.norms_in_safe_range``
  (replacing ``np.vdot``) checks the floating-point flags: a float32 layer
  whose row norms exceed sqrt(float32 max) ~ 1.8e19 (valid, finite weights;
  the sum of squares of its norms overflows float32) got a spurious
  ``RuntimeWarning: overflow encountered in dot`` at construction and on each
  forward, and a ``FloatingPointError`` under ``np.errstate(over='raise')``
  (or ``warnings`` as errors) where the session-start code returned the
  correct result. ``np.vdot`` sets no flag; the full check sequence then
  decides, as before.
* The NumPy norm's new errstate shortcut (``sq.argmax()``) raised on a block
  with no rows: ``kernels_numpy.column_norm`` of a (0, in) weight raised
  ``ValueError: attempt to get argmax of an empty sequence`` where the C twin
  (and the session-start code) return an empty array.
* Pre-existing: a forward that raised left the previous forward's context
  in the layer, so a backward after it returned the gradients of that
  earlier forward (another batch), silently. Every layer's forward now
  drops the context first: backward() refuses until a forward succeeds.
"""
import warnings

import numpy as np
import pytest

import dora_ref
from dora_ref import DoRALinear, LoRALinear
from dora_ref.core import functional as F
from dora_ref.core import kernels_numpy as KN

BACKENDS = dora_ref.available_backends()


def _dense_y(x, W0, A, B, m, s):
    """y = x @ (m * V / ||V||_row).T in float64, V = W0 + s B A."""
    V = W0.astype(np.float64) + s * (B.astype(np.float64) @ A.astype(np.float64))
    n = np.sqrt((V * V).sum(axis=1))
    return x.astype(np.float64) @ ((m.astype(np.float64) / n)[:, None] * V).T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("errstate", ["warn", "raise"])
def test_float32_row_norms_beyond_sqrt_max_give_no_overflow_warning(backend, errstate):
    # row norms 2e19: finite in float32, their squares summed (n . n ~ 1.2e39) are not
    W0 = np.full((3, 4), 1e19, np.float32)
    x = np.ones((2, 4), np.float32)
    with warnings.catch_warnings(), np.errstate(over=errstate):
        warnings.simplefilter("error")
        with dora_ref.use_backend(backend):
            layer = DoRALinear(W0.copy(), r=1, rng=0)
            layer.eval()
            y = layer.forward(x)
            layer.train()
            y_train = layer.forward(x)
            dx = layer.backward(np.ones((2, 3), np.float32))
            n = F.column_norm(W0, layer.lora_A, layer.lora_B, layer.scaling)
    ref = _dense_y(x, W0, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling)
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    np.testing.assert_allclose(y_train, ref, rtol=1e-6)
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(n, np.full(3, 2e19), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_magnitude_beyond_sqrt_max_decided_by_the_full_checks(backend):
    # m . m overflows float32 (m = 2e19 per row); m / n is finite: a correct result, no warning
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((4, 5)).astype(np.float32)
    A = rng.standard_normal((2, 5)).astype(np.float32)
    B = np.zeros((4, 2), np.float32)
    m = np.full(4, 2e19, np.float32)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    with warnings.catch_warnings(), np.errstate(over="raise"):
        warnings.simplefilter("error")
        with dora_ref.use_backend(backend):
            y, _ = F.dora_forward(x, W0, A, B, m, 0.5)
    np.testing.assert_allclose(y, _dense_y(x, W0, A, B, m, 0.5), rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_column_norm_of_a_weight_with_no_rows_is_empty_as_the_c_twin(dtype):
    W0 = np.ones((0, 3), dtype)
    A = np.ones((1, 3), dtype)
    B = np.ones((0, 1), dtype)
    n = KN.column_norm(W0, A, B, 0.5)
    assert n.shape == (0,) and n.dtype == dtype
    if "c" in BACKENDS:
        from dora_ref.kernels import c
        n_c = c.column_norm(W0, A, B, 0.5)
        assert n_c.shape == n.shape and n_c.dtype == n.dtype


# ---------------------------------------------------------------------------
# pre-existing: a backward after a forward that raised used the previous forward's context
# ---------------------------------------------------------------------------


def _stale_ctx_layer(kind, rng):
    """(layer, a good input, a bad input the forward refuses, dy for the good input)."""
    from dora_ref.layers import conv as C
    from dora_ref.layers import embedding as Em
    if kind in ("LoRALinear", "DoRALinear"):
        cls = LoRALinear if kind == "LoRALinear" else DoRALinear
        layer = cls(rng.standard_normal((4, 3)), rng.standard_normal(4), r=2, rng=0)
        x = rng.standard_normal((2, 3))
        bad = x.copy()
        bad[1, 2] = np.nan
        return layer, x, bad, np.ones((2, 4))
    if kind in ("LoRAConv2d", "DoRAConv2d"):
        cls = C.LoRAConv2d if kind == "LoRAConv2d" else C.DoRAConv2d
        layer = cls(rng.standard_normal((4, 2, 2, 3)), None, r=2, rng=0)
        x = rng.standard_normal((2, 2, 5, 6))
        return layer, x, x[:, :1], np.ones((2, 4, 4, 4))
    layer = Em.DoRAEmbedding(rng.standard_normal((9, 4)), r=2, rng=0)
    ids = rng.integers(0, 9, size=(3, 5))
    return layer, ids, np.full((3, 5), 9), np.ones((3, 5, 4))


@pytest.mark.parametrize("kind", ["LoRALinear", "DoRALinear", "LoRAConv2d", "DoRAConv2d",
                                  "DoRAEmbedding"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backward_after_a_refused_forward_is_refused_not_the_previous_forwards(kind, mode):
    # before: forward(x); forward(bad) raised; backward(dy) returned the gradients of forward(x)
    layer, x, bad, dy = _stale_ctx_layer(kind, np.random.default_rng(0))
    getattr(layer, mode)()
    layer.forward(x)
    layer.backward(dy)  # the usual sequence works
    layer.forward(x)
    with pytest.raises((ValueError, TypeError)):
        layer.forward(bad)
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(dy)
    layer.forward(x)  # and the next good forward is usable again
    layer.backward(dy)


def test_demo_dense_backward_after_a_refused_forward_is_refused():
    from dora_ref.demo.mlp import Dense
    rng = np.random.default_rng(0)
    layer = Dense(rng.standard_normal((4, 3)), np.zeros(4))
    x = rng.standard_normal((2, 3))
    layer.forward(x)
    with pytest.raises(ValueError):
        layer.forward(np.ones((2, 5)))  # in = 3: refused
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(np.ones((2, 4)))
