"""DoRALinear / LoRALinear: init, modes, dropout, caching, merge, optimisers."""
import numpy as np
import pytest

from cases import make_case
from dora_ref import AdamW, DoRALinear, LoRALinear, SGD
from dora_ref.core import dense
from dora_ref.porting.tolerance import assert_close


def _layer(cls=DoRALinear, out_f=6, in_f=5, r=3, seed=0, **kw):
    rng = np.random.default_rng(seed)
    layer = cls(rng.normal(size=(out_f, in_f)), rng.normal(size=out_f), r=r, rng=seed, **kw)
    layer.lora_B[:] = rng.normal(size=layer.lora_B.shape)  # not only the initial state
    return layer


def test_peft_initialisation():
    """A ~ U(+-1/sqrt(in)) (kaiming_uniform a=sqrt 5), B = 0, m = ||W0||_row."""
    W0 = np.random.default_rng(0).normal(size=(64, 400))
    layer = DoRALinear(W0, r=16, lora_alpha=32, rng=0)
    bound = 1 / np.sqrt(400)
    assert layer.lora_A.shape == (16, 400) and layer.lora_B.shape == (64, 16)
    assert np.abs(layer.lora_A).max() <= bound
    assert np.abs(layer.lora_A).max() > 0.99 * bound  # 6400 draws reach the bound
    assert not layer.lora_B.any()
    np.testing.assert_allclose(layer.lora_magnitude_vector, np.linalg.norm(W0, axis=1), rtol=1e-15)
    assert layer.scaling == 2.0
    assert DoRALinear(W0, r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
    assert set(layer.parameters()) == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_init_false_is_not_the_base_layer():
    """init_lora_weights=False: random B, m = ||W0 + s B A|| (PEFT test_lora_use_dora_linear_init_false)."""
    W0 = np.random.default_rng(0).normal(size=(4, 6))
    layer = DoRALinear(W0, r=2, init_lora_weights=False, rng=0).eval()
    assert layer.lora_B.any()
    V = dense.direction(W0, layer.lora_A, layer.lora_B, layer.scaling)
    np.testing.assert_allclose(layer.lora_magnitude_vector, dense.row_norm(V), rtol=1e-14)
    x = np.ones((1, 6))
    assert not np.allclose(layer(x), x @ W0.T)


def test_seeded_init_and_dropout_are_reproducible():
    a, b = _layer(lora_dropout=0.3), _layer(lora_dropout=0.3)
    x = np.ones((4, 5))
    np.testing.assert_array_equal(a.lora_A, b.lora_A)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))


def test_dropout_zero_in_train_equals_eval():
    layer = _layer(lora_dropout=0.0)
    x = np.random.default_rng(1).normal(size=(3, 5))
    y_train = layer.train().forward(x)
    np.testing.assert_array_equal(layer.eval().forward(x), y_train)


def test_dropout_is_applied_in_training_only_and_matches_the_mask():
    layer = _layer(lora_dropout=0.5)
    x = np.random.default_rng(1).normal(size=(200, 5))
    y1, y2 = layer.forward(x), layer.forward(x)
    assert not np.array_equal(y1, y2)  # a fresh mask each call
    mask = (np.random.default_rng(2).random(x.shape) >= 0.5) / 0.5
    want = dense.forward(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                         layer.scaling, layer.bias, dropout_mask=mask)
    assert_close(layer.forward(x, dropout_mask=mask), want, k=5 + 3 + 4)
    layer.eval()
    np.testing.assert_array_equal(layer.forward(x), layer.forward(x))


def test_backward_accumulates_and_zero_grad_resets():
    layer = _layer()
    case = make_case(6, 5, 3, 4, seed=0)
    layer.forward(case.x)
    layer.backward(case.dy)
    first = {k: v.copy() for k, v in layer.grads.items()}
    layer.forward(case.x)
    layer.backward(case.dy)
    for k in first:
        np.testing.assert_allclose(layer.grads[k], 2 * first[k], rtol=1e-15)
    layer.zero_grad()
    assert not any(v.any() for v in layer.grads.values())


def test_layer_backward_equals_dense():
    for detach in (True, False):
        layer = _layer(detach_norm=detach)
        case = make_case(6, 5, 3, 4, seed=2)
        layer.forward(case.x)
        dx = layer.backward(case.dy)
        want = dense.backward(case.dy, case.x, layer.weight, layer.lora_A, layer.lora_B,
                              layer.lora_magnitude_vector, layer.scaling, detach_norm=detach)
        assert_close(dx, want.dx, k=20)
        assert_close(layer.grads["lora_A"], want.dA, k=20)
        assert_close(layer.grads["lora_B"], want.dB, k=20)
        assert_close(layer.grads["lora_magnitude_vector"], want.dmagnitude, k=20)


@pytest.mark.parametrize("cls", [DoRALinear, LoRALinear])
def test_merge_unmerge_round_trip(cls):
    layer = _layer(cls).eval()
    x = np.random.default_rng(3).normal(size=(7, 5))
    W0 = layer.weight.copy()
    y = layer.forward(x)
    layer.merge()
    assert layer.merged
    assert_close(layer.forward(x), y, k=5 + 3 + 4)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.backward(np.ones((7, 6)))
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert_close(layer.weight, W0, k=8)
    assert_close(layer.forward(x), y, k=5 + 3 + 4)


def test_merge_keeps_the_norm_and_does_not_touch_the_magnitude():
    layer = _layer().eval()
    m = layer.lora_magnitude_vector.copy()
    n = np.linalg.norm(layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, axis=1)
    layer.merge()
    assert_close(layer.weight_norm, n, k=8)
    np.testing.assert_array_equal(layer.lora_magnitude_vector, m)
    layer.unmerge()
    np.testing.assert_array_equal(layer.lora_magnitude_vector, m)


def test_eval_norm_cache_is_reused_and_invalidated_by_updates():
    layer = _layer().eval()
    x = np.random.default_rng(4).normal(size=(3, 5))
    layer.forward(x)
    cached = layer._norm_cache._entry[4]
    layer.forward(x)
    assert layer._norm_cache._entry[4] is cached  # reused while nothing changed
    layer.lora_B += 0.5  # an in-place update, as an optimiser makes
    y = layer.forward(x)
    want = dense.forward(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                         layer.scaling, layer.bias)
    assert_close(y, want, k=12)
    assert layer._norm_cache._entry[4] is not cached


def test_eval_cache_sees_an_optimiser_step():
    layer = _layer()
    case = make_case(6, 5, 3, 4, seed=5)
    layer.eval().forward(case.x)
    layer.train().forward(case.x)
    layer.backward(case.dy)
    AdamW(layer.parameters(), lr=0.1).step(layer.grads)
    layer.eval()
    want = dense.forward(case.x, layer.weight, layer.lora_A, layer.lora_B,
                         layer.lora_magnitude_vector, layer.scaling, layer.bias)
    assert_close(layer.forward(case.x), want, k=12)


def test_frozen_weight_is_read_only():
    layer = _layer()
    with pytest.raises(ValueError, match="read-only"):
        layer.weight[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        SGD({"weight": layer.weight}, lr=0.1)


def test_float32_layer_computes_in_float32():
    W0 = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    layer = DoRALinear(W0, r=2, rng=0)
    assert layer.lora_A.dtype == layer.lora_magnitude_vector.dtype == np.float32
    y = layer.forward(np.ones((2, 3), np.float32))
    assert y.dtype == np.float32
    with pytest.raises(TypeError, match="dtype float64 but the weights have dtype float32"):
        layer.forward(np.ones((2, 3)))


def test_bad_layer_arguments():
    W0 = np.ones((3, 2))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        DoRALinear(W0, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        DoRALinear(W0, lora_dropout=1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        DoRALinear(W0, np.ones(2))
    with pytest.raises(ValueError, match="init_lora_weights"):
        DoRALinear(W0, init_lora_weights="pissa")
    with pytest.raises(RuntimeError, match="forward"):
        DoRALinear(W0).backward(np.ones((1, 3)))


def test_construct_from_trained_weights():
    """lora_A/lora_B/lora_magnitude_vector given: used as is (copied), r from lora_A."""
    case = make_case(6, 5, 3, 4, seed=8)
    layer = DoRALinear(case.W0, case.bias, lora_A=case.A, lora_B=case.B,
                       lora_magnitude_vector=case.magnitude, lora_alpha=3 * case.scaling).eval()
    assert layer.r == 3 and layer.scaling == case.scaling
    assert layer.lora_A is not case.A
    np.testing.assert_array_equal(layer.lora_magnitude_vector, case.magnitude)
    assert_close(layer(case.x), dense.forward(case.x, *case.weights), k=12)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        DoRALinear(case.W0, lora_A=case.A)
    with pytest.raises(ValueError, match=r"r = 2 but lora_A has shape \(3, 5\)"):
        DoRALinear(case.W0, r=2, lora_A=case.A, lora_B=case.B)
    with pytest.raises(ValueError, match=r"lora_magnitude_vector must have shape \(6,\), got \(5,\)"):
        DoRALinear(case.W0, lora_A=case.A, lora_B=case.B, lora_magnitude_vector=np.ones(5))


def test_assigning_a_parameter_writes_into_the_array_the_optimiser_holds():
    """Assignment copies into the existing array (as in the conv and embedding layers)."""
    layer = _layer()
    held = layer.parameters()["lora_B"]
    new = np.full(layer.lora_B.shape, 0.25)
    layer.lora_B = new
    assert layer.lora_B is held and np.array_equal(held, new)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(6, 3\), got \(3, 6\)"):
        layer.lora_B = new.T
    with pytest.raises(TypeError, match="lora_magnitude_vector has dtype float32 but the weight has dtype float64"):
        layer.lora_magnitude_vector = np.ones(6, np.float32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.lora_A = np.full(layer.lora_A.shape, np.nan)
