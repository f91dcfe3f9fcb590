"""Regression tests for what this version's adversary found (each named after its case).

* A dy with as many rows as the output but another shape ((3, 2, out) for an
  output of (2, 3, out)) was accepted: only the flattened row count was
  compared, so rows of dy met the wrong rows of x, silently.
* A layer in eval mode given an array scaling after one cached forward
  raised NumPy's "truth value of an array" from the norm cache's comparison
  instead of the message naming scaling.
* A negative weight_norm was used as given: DoRA's term came out with its
  sign flipped, no error.
"""
import numpy as np
import pytest

from dora_ref import DoRALinear, LoRALinear
from dora_ref.core import functional as F
from dora_ref.layers.embedding import DoRAEmbedding


def _problem(rng, dtype=np.float64):
    W0 = rng.standard_normal((5, 4)).astype(dtype)
    A = rng.standard_normal((2, 4)).astype(dtype)
    B = rng.standard_normal((5, 2)).astype(dtype)
    m = F.column_norm(W0, A, B, 2.0) * 1.5
    x = rng.standard_normal((2, 3, 4)).astype(dtype)
    return x, W0, A, B, m


@pytest.mark.parametrize("dy_shape", [(3, 2, 5), (6, 5), (1, 6, 5), (2, 3, 1, 5)])
def test_dora_backward_refuses_a_dy_of_another_shape_with_as_many_rows(backend, dy_shape):
    x, W0, A, B, m = _problem(np.random.default_rng(0))
    y, ctx = F.dora_forward(x, W0, A, B, m, 2.0)
    assert y.shape == (2, 3, 5)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 5\)"):
        F.dora_backward(np.ones(dy_shape), ctx)
    F.dora_backward(np.ones((2, 3, 5)), ctx)  # the output's own shape is accepted


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_layer_backward_refuses_a_transposed_batch_dy(backend, cls):
    rng = np.random.default_rng(1)
    layer = cls(rng.standard_normal((5, 4)), rng.standard_normal(5), r=2, rng=0,
                init_lora_weights=False)
    x = rng.standard_normal((2, 3, 4))
    y = layer.forward(x)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 5\)"):
        layer.backward(np.ones((3, 2, 5)))
    dx = layer.backward(np.ones(y.shape))
    assert dx.shape == x.shape


def test_lora_backward_refuses_a_dy_of_another_shape_with_as_many_rows(backend):
    x, W0, A, B, _ = _problem(np.random.default_rng(2))
    _, ctx = F.lora_forward(x, W0, A, B, 2.0)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 5\)"):
        F.lora_backward(np.ones((3, 2, 5)), ctx)


@pytest.mark.parametrize("bad, error", [(np.array([0.5, 0.5]), (TypeError, ValueError)),
                                        ("0.5", TypeError), (float("nan"), ValueError)])
def test_eval_norm_cache_names_scaling_when_it_becomes_an_array(backend, bad, error):
    rng = np.random.default_rng(3)
    for layer, x in ((DoRALinear(rng.standard_normal((5, 4)), r=2, rng=0), rng.standard_normal((3, 4))),
                     (DoRAEmbedding(rng.standard_normal((9, 4)), r=2, rng=0), np.array([[1, 2], [3, 4]]))):
        layer.eval()
        layer.forward(x)  # the cache now holds a norm and its scaling
        layer.scaling = bad
        with pytest.raises(error, match="scaling"):
            layer.forward(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_negative_weight_norm_is_refused_not_used_with_its_sign(backend, dtype):
    x, W0, A, B, m = _problem(np.random.default_rng(4), dtype)
    n = F.column_norm(W0, A, B, 2.0)
    y, _ = F.dora_forward(x, W0, A, B, m, 2.0, weight_norm=n)  # the usual call works
    for bad in (-n, np.where(np.arange(5) == 2, -n, n)):
        with pytest.raises(ValueError, match="weight_norm must hold row norms"):
            F.dora_forward(x, W0, A, B, m, 2.0, weight_norm=bad.astype(dtype))
