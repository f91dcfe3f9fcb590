"""Regression tests for what session 8's adversary found (one test per case).

false_overflow: float32, a scaling of 1e38: the magnitude-scaled output
y = (m / n) (x W0^T + s (x A^T) B^T) is about 3 and fits, but its
intermediate z = x W0^T + s (x A^T) B^T (4e38) does not. The unmerged
forward (ours and PEFT's) forms z first, so it cannot give y in float32;
the error said that y overflowed, which was false. It now says that y fits
(with its value) and that the intermediate overflowed. (The fork case of the
same adversary is tests/test_fork_concurrent.py.)
"""
import numpy as np
import pytest

from dora_ref import functional as F

# the overflows are the point: NumPy's own RuntimeWarning comes before the ValueError asserted
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _false_overflow_case(out_features=2, scaling=1e38):
    W0 = np.full((out_features, 4), 0.5, np.float32)
    A = np.ones((1, 4), np.float32)
    B = np.ones((out_features, 1), np.float32)
    m = np.full(out_features, 1.5, np.float32)  # g = m / n about 7.5e-39: y = g z about 3
    x = np.ones((3, 4), np.float32)
    return x, W0, A, B, m, np.float32(scaling)


def _float64_output(x, W0, A, B, m, s):
    V = W0.astype(np.float64) + float(s) * (B.astype(np.float64) @ A.astype(np.float64))
    return x.astype(np.float64) @ (V * (m.astype(np.float64) / np.linalg.norm(V, axis=1))[:, None]).T


def test_false_overflow_functional_forward_says_the_intermediate_overflowed_not_y():
    x, W0, A, B, m, s = _false_overflow_case()
    y64 = _float64_output(x, W0, A, B, m, s)
    assert np.abs(y64).max() < 10  # y fits float32 by far
    with pytest.raises(ValueError) as err:
        F.dora_forward(x, W0, A, B, m, s)
    text = str(err.value)
    assert "intermediate" in text and "which fits" in text and "overflowed float32" in text, text
    # the value it quotes is y's, from a float64 computation
    quoted = float(text.split("it is about ")[1].split(",")[0])
    assert np.isclose(quoted, y64[0, 0], rtol=1e-3), (quoted, y64[0, 0])


def test_false_overflow_eval_forward_with_weight_norm_says_the_same():
    x, W0, A, B, m, s = _false_overflow_case()
    n = F.column_norm(W0, A, B, s)
    with pytest.raises(ValueError, match="intermediate"):
        F.dora_forward(x, W0, A, B, m, s, weight_norm=n)


def test_false_overflow_with_a_dropout_mask_says_the_same():
    x, W0, A, B, m, s = _false_overflow_case()
    with pytest.raises(ValueError, match="intermediate"):
        F.dora_forward(x, W0, A, B, m, s, dropout_mask=np.ones_like(x))


def test_false_overflow_merged_layer_gives_the_float64_output():
    # the documented way out: the merged weight forms W0 + s B A first
    x, W0, A, B, m, s = _false_overflow_case()
    W, _ = F.merge(W0, A, B, m, s)
    y = x @ W.T
    assert np.all(np.isfinite(y))
    # float32, u = 2**-24: the merge rounds V, n and (m / n) V (3 u) and x @ W.T sums 4
    # terms (gamma_4, about 4 u): about 7 u. Asserted at 32 u: what this test is about is
    # that the merged path gives y at all, and its value to far better than 1e-5
    np.testing.assert_allclose(y, _float64_output(x, W0, A, B, m, s), rtol=4 * 2.0 ** -23 * 4)


def test_true_overflow_of_y_is_still_called_an_overflow_of_y():
    # y itself beyond float32: the old message, unchanged
    x, W0, A, B, m, s = _false_overflow_case(scaling=1.0)
    m = np.full_like(m, 3e38)
    with pytest.raises(ValueError, match=r"y \(the output\) \(shape \(3, 2\)\) overflowed float32"):
        F.dora_forward(x * 10, W0, A, B, m, s)


def test_nan_in_x_is_still_named_x():
    x, W0, A, B, m, s = _false_overflow_case(scaling=1.0)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"^x .*NaN or Inf"):
        F.dora_forward(x, W0, A, B, m, s)
