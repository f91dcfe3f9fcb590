"""Regression tests, each named after the mistake or report it pins.

The expected numbers are worked by hand in the docstrings.
"""
import numpy as np
import pytest

from dora_ref import DoRALinear, SGD, dora_forward, init_magnitude, lora_scaling


def test_norm_axis_is_per_output_row():
    """W0 = [[1,2,2],[0,0,3]]: rows have norm 3 and 3; columns would give 3 values.

    The paper's column norm of a (in, out) weight is the row norm of the
    PyTorch (out, in) weight (NVlabs/DoRA#1, peft#2348).
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
