"""Bad input gets a TypeError/ValueError that names the argument and the shapes."""
import numpy as np
import pytest

from dora_ref import column_norm, dora_backward, dora_forward, lora_forward, merge, unmerge

rng = np.random.default_rng(0)
W0, A, B = rng.normal(size=(4, 3)), rng.normal(size=(2, 3)), rng.normal(size=(4, 2))
m, x = np.linalg.norm(W0, axis=1), rng.normal(size=(5, 3))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(W0=W0.T), ValueError, r"A must have shape \(r, in\) = \(r, 4\); got W0 \(3, 4\)"),
        (dict(A=A.T), ValueError, r"A must have shape \(r, in\).*A \(3, 2\)"),
        (dict(B=B.T), ValueError, r"B must have shape \(out, r\) = \(4, 2\).*B \(2, 4\)"),
        (dict(A=np.zeros((0, 3)), B=np.zeros((4, 0))), ValueError, r"rank r must be >= 1"),
        (dict(magnitude=np.ones(3)), ValueError, r"magnitude must have shape \(out,\) = \(4,\), got \(3,\).*wrong axis"),
        (dict(magnitude=np.ones((1, 4))), ValueError, r"magnitude must have shape \(out,\) = \(4,\), one value per output channel; got \(1, 4\)"),
        (dict(bias=np.ones(3)), ValueError, r"bias must have shape \(out,\) = \(4,\), got \(3,\)"),
        (dict(x=np.ones((5, 4))), ValueError, r"x must have shape \(\.\.\., in\) = \(\.\.\., 3\), got \(5, 4\)"),
        (dict(x=np.ones((5, 3), np.float32)), TypeError, r"x has dtype float32 but the weights have dtype float64"),
        (dict(A=A.astype(np.float32)), TypeError, r"arrays must share one dtype.*A: float32"),
        (dict(W0=np.ones((4, 3), np.int64)), TypeError, r"W0 must have dtype float32 or float64, got int64"),
        (dict(W0=W0.astype(np.float16)), TypeError, r"unsupported combination of dtypes: W0: float16, A: float64"),
        (dict(W0=W0.astype(np.int8)), TypeError, r"W0 must have dtype float32 or float64, got int8"),
        (dict(A=np.where(np.eye(2, 3) > 0, np.nan, A)), ValueError, r"A \(shape \(2, 3\)\) contains NaN or Inf, first at index \(0, 0\)"),
        (dict(magnitude=np.array([1, np.inf, 1, 1.0])), ValueError, r"magnitude .* NaN or Inf, first at index \(1,\)"),
        (dict(scaling=np.nan), ValueError, r"scaling must be finite"),
        (dict(scaling="2"), TypeError, r"scaling must be a real number, got str"),
        (dict(x=None), TypeError, r"x must be an array, got None"),
    ],
)
def test_dora_forward_rejects(kwargs, error, pattern):
    args = dict(x=x, W0=W0, A=A, B=B, magnitude=m, scaling=1.0, bias=None)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        dora_forward(**args)


def test_nan_in_base_weight_names_the_row():
    W = W0.copy()
    W[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"not finite in row\(s\) \[2\]: W0 has NaN/Inf in row\(s\) \[2\]"):
        dora_forward(x, W, A, B, m, 1.0)
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        merge(W, A, B, m, 1.0)


def test_overflowing_norm_is_reported():
    W = np.full((4, 3), 3e38, dtype=np.float32)  # the norm itself, 5.2e38, exceeds float32
    with pytest.raises(ValueError, match="overflowed"):
        column_norm(W, A.astype(np.float32), B.astype(np.float32), 1.0)


def test_backward_rejects_wrong_dy():
    _, ctx = dora_forward(x, W0, A, B, m, 1.0)
    with pytest.raises(ValueError, match=r"dy must have shape \(\.\.\., in\) = \(\.\.\., 4\), got \(5, 3\)"):
        dora_backward(np.ones((5, 3)), ctx)
    with pytest.raises(ValueError, match=r"dy must have shape \(5, 4\).*got \(6, 4\)"):
        dora_backward(np.ones((6, 4)), ctx)


def test_unmerge_rejects_lost_rows_and_wrong_norm():
    Wm, n = merge(W0, A, B, m, 1.0)
    m0 = m.copy()
    m0[1] = 0.0
    with pytest.raises(ValueError, match=r"cannot unmerge: the magnitude is 0 .* channel\(s\) \[1\]"):
        unmerge(Wm, A, B, m0, 1.0, n)
    with pytest.raises(ValueError, match=r"W_merged .* contains NaN or Inf"):
        unmerge(Wm * np.nan, A, B, m, 1.0, n)
    with pytest.raises(ValueError, match=r"n must have the shape and dtype of magnitude"):
        unmerge(Wm, A, B, m, 1.0, n[:3])


def test_dropout_mask_shape():
    with pytest.raises(ValueError, match=r"dropout_mask must have the shape of x \(5, 3\), got \(5, 2\)"):
        dora_forward(x, W0, A, B, m, 1.0, dropout_mask=np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"dropout_mask"):
        lora_forward(x, W0, A, B, 1.0, dropout_mask=np.ones(3))


def test_zero_input_features_is_an_error():
    with pytest.raises(ValueError, match=r"W0 must have at least one input feature, got shape \(4, 0\)"):
        dora_forward(np.ones((2, 0)), np.ones((4, 0)), np.ones((1, 0)), np.ones((4, 1)), np.ones(4), 1.0)


def test_python_lists_of_ints_are_float64():
    y, _ = dora_forward([1, 0], [[1, 2], [3, 4]], [[1, 1]], [[0], [0]], [1, 1], 1)
    assert y.dtype == np.float64



@pytest.mark.parametrize("call", ["dora_forward", "merge", "column_norm"])
def test_transposed_W0_error_says_W0_looks_transposed(call):
    """A new user passed W0 as (in, out): the error said A had the wrong shape (with all
    three shapes) without saying that W0 transposed fits A and B. Now it says so; a
    square W0 (which cannot be told) and a merely wrong A get no such hint."""
    rng = np.random.default_rng(0)
    out_f, in_f, r = 64, 32, 4
    W0 = rng.normal(size=(out_f, in_f))
    A, B = rng.normal(size=(r, in_f)), rng.normal(size=(out_f, r))
    m, x = np.ones(out_f), rng.normal(size=(3, in_f))
    calls = {"dora_forward": lambda W: dora_forward(x, W, A, B, m, 2.0),
             "merge": lambda W: merge(W, A, B, m, 2.0),
             "column_norm": lambda W: column_norm(W, A, B, 2.0)}
    calls[call](W0)  # the right layout passes
    with pytest.raises(ValueError, match=r"W0 looks transposed: A and B fit a weight of shape \(64, 32\)"):
        calls[call](W0.T)
    with pytest.raises(ValueError) as info:
        dora_forward(x, W0, A[:, :-1], B, m, 2.0)  # A wrong, W0 right
    assert "transposed" not in str(info.value)
    sq = rng.normal(size=(in_f, in_f))
    with pytest.raises(ValueError) as info:
        dora_forward(x, sq, A, rng.normal(size=(in_f + 1, r)), np.ones(in_f), 2.0)
    assert "transposed" not in str(info.value)
