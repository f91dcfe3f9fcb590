"""Every overflow message is true (session 9's adversary, attacks 30 and 31; one test per case).

The rule (README "Errors", the docstrings): an error never claims an overflow
that did not happen. Each case builds finite inputs where only an
intermediate overflows (or the output truly does), computes what the
message talks about in float64 / long double here, and asserts what the
message claims: the quantity it names as overflowed does not fit, a y it
calls "fits" fits the OUTPUT dtype, and where dora_ref cannot tell it says
the less specific "..., or an intermediate of its computation, ...".
Before the fix each of these said "y (the output) ... overflowed", "the
intermediate z ... overflowed", "the sum of squares overflowed" or
"dmagnitude/dA overflowed" for a value that fits.
"""
import ml_dtypes
import numpy as np
import pytest

import dora_ref
from dora_ref import functional as F
from dora_ref.porting.tolerance import gamma

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns before the refusal

f32, f64 = np.float32, np.float64
BF16 = ml_dtypes.bfloat16
LONG_DOUBLE_WIDER = np.finfo(np.longdouble).max > np.finfo(np.float64).max


def _message(fn):
    with pytest.raises(ValueError) as err:
        fn()
    return str(err.value)


def _quoted_y(text):
    return float(text.split("it is about ")[1].split(",")[0].split(" ")[0])


def _claims_y_overflowed(text):
    return "y (the output) (shape" in text and ") overflowed" in text.split(":")[0]


def test_a_float64_only_x_W0T_overflows_is_not_called_an_overflow_of_y():
    # x W0^T = 2e310 overflows float64; y = (m / n) z is about 1.414e10
    W0 = np.array([[1e300, 1e300], [1.0, 2.0]])
    A, B = np.full((1, 2), 0.1), np.full((2, 1), 0.1)
    x = np.array([[1e10, 1e10], [1.0, 1.0]])
    text = _message(lambda: F.dora_forward(x, W0, A, B, np.ones(2), 1.0))
    assert not _claims_y_overflowed(text), text
    assert "intermediate x W0^T overflowed float64" in text, text
    if LONG_DOUBLE_WIDER:  # y's value from the long double recomputation
        assert "which fits float64" in text, text
        assert np.isclose(_quoted_y(text), 2 ** 0.5 * 1e10, rtol=1e-3), text
    else:
        assert "whether y itself fits float64 is not known" in text, text


def test_a_float64_layer_eval_says_the_same():
    W0 = np.array([[1e300, 1e300], [1.0, 2.0]])
    layer = dora_ref.DoRALinear(W0, None, lora_A=np.full((1, 2), 0.1), lora_B=np.full((2, 1), 0.1),
                                lora_magnitude_vector=np.ones(2), lora_alpha=1.0, rng=0)
    layer.eval()
    text = _message(lambda: layer(np.array([[1e10, 1e10], [1.0, 1.0]])))
    assert not _claims_y_overflowed(text) and "x W0^T overflowed float64" in text, text


def test_b_only_xAT_overflows_names_xAT_not_z():
    # x A^T = 6e38 overflows float32; U B^T = 6e28, z and y (about 1.414) fit
    W0, A, B = np.ones((2, 2), f32), np.full((1, 2), 3e38, f32), np.full((2, 1), 1e-10, f32)
    text = _message(lambda: F.dora_forward(np.ones((1, 2), f32), W0, A, B, np.ones(2, f32), 1.0))
    assert "intermediate x A^T overflowed float32" in text, text
    assert "intermediate z" not in text and not _claims_y_overflowed(text), text
    assert "which fits float32" in text and np.isclose(_quoted_y(text), 2 ** 0.5, rtol=1e-3), text


def test_c_only_UBT_overflows_names_UBT_not_z():
    # U = 2e20 fits, U B^T = 2e40 overflows float32, s U B^T = 2e30, z and y (1.414e20) fit
    W0, A, B = np.ones((2, 2), f32), np.ones((1, 2), f32), np.full((2, 1), 1e20, f32)
    x = np.full((1, 2), 1e20, f32)
    text = _message(lambda: F.dora_forward(x, W0, A, B, np.ones(2, f32), 1e-10))
    assert "intermediate (x A^T) B^T overflowed float32" in text, text
    assert "intermediate z" not in text and not _claims_y_overflowed(text), text
    assert np.isclose(_quoted_y(text), 2 ** 0.5 * 1e20, rtol=1e-3), text


def test_c_prime_only_BA_overflows_names_BA_not_the_norm():
    # B @ A = 1e40 overflows float32 before the scaling 1e-10; V = 1e30 and n = 1.414e30 fit
    W0, A, B = np.ones((2, 2), f32), np.full((1, 2), 1e20, f32), np.full((2, 1), 1e20, f32)
    for call in (lambda: F.dora_forward(np.ones((1, 2), f32), W0, A, B, np.ones(2, f32), 1e-10),
                 lambda: F.column_norm(W0, A, B, 1e-10)):
        text = _message(call)
        assert "row norm of W0 + s*B@A is not finite" not in text, text
        assert "overflowed float32 (it is larger than" not in text, text  # not the norm itself
        assert "B@A (formed before the scaling) overflowed float32" in text, text
        assert "about 1.414e+30, which fits float32" in text, text


@pytest.mark.parametrize("backend", dora_ref.available_backends())
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_BA_partial_sums_overflow_in_the_kernels_order_not_in_BLAS_is_not_called_a_kernel_bug(
        backend, rows):
    """Session 16's adversary: B_i @ A = 9e307 - 1.7e308 - 1.7e308 + 9e307 = -1.6e308 fits
    float64, but its partial sums overflow left to right (the kernels' order of the rank-r
    terms) and not in BLAS's order for several rows; V = 1 + 1e-300 * B@A, n = 1.6e8. The
    C kernel's inf was judged against BLAS's finite recomputation and called "a bug in the
    kernel" (RuntimeError) for 3 rows, while 1 row gave the ValueError naming B@A. Every row
    count and backend now names B@A's partial sums, or (where a backend's own product did
    not overflow) gives the norm within float64's rounding of the exact 1.6e8."""
    W0, A = np.ones((rows, 1)), np.ones((4, 1))
    B = np.tile([9e307, -1.7e308, -1.7e308, 9e307], (rows, 1))
    exact = 1.6e308 * 1e-300 - 1.0  # |1 + 1e-300 * (-1.6e308)|
    with dora_ref.use_backend(backend):
        try:
            n = F.column_norm(W0, A, B, 1e-300)
        except ValueError as err:
            text = str(err)
            assert "B@A (formed before the scaling) overflowed float64 in its partial sums" in text, text
            assert "about 1.6e+08, which fits float64" in text, text
        else:  # NumPy's BLAS product never overflowed: its norm, within the norm's bound
            # 2 * 4 * gamma_{in + r + 2} * ||a||, a = |W0| + |s| |B| |A| = 1 + 1e-300 * 5.2e308
            # (tests/test_kernels_c.py derives it): any order of the sums stays within it
            a = 1.0 + 1e-300 * (np.abs(B) @ np.abs(A))[:, 0]
            assert np.all(np.abs(n - exact) <= 2 * 4 * gamma(1 + 4 + 2, f64) * a), n - exact
        # the forward: the same message, or, past a norm that did not overflow, the forward's
        # own (x A^T) B^T, whose partial sums overflow too (y = -1 fits)
        text = _message(lambda: F.dora_forward(np.ones((2, 1)), W0, A, B, np.ones(rows), 1e-300))
        assert ("B@A (formed before the scaling) overflowed float64 in its partial sums" in text
                or "(x A^T) B^T overflowed float64 in its partial sums" in text), text


def test_c_prime_norm_that_truly_overflows_keeps_its_message():
    # the norm itself (2e308 * sqrt(1.25)) does not fit float64: the old, true message
    W0 = np.array([[0.5, -0.25, 1.0, 0.1]] * 3)
    text = _message(lambda: F.dora_forward(np.ones((2, 4)), W0, np.ones((1, 4)), np.ones((3, 1)),
                                           np.array([1.0, 2.0, 3.0]), 1e308))
    assert "the row norm of W0 + s*B@A is not finite" in text and "the norm itself overflowed float64" in text, text


def test_g_fp16_consistent_y_beyond_65504_is_an_overflow_of_float16():
    # z overflows float32 (x A^T = 1.2e39); y = 8.485e4 fits float32, not float16 (65504)
    W0, A, B = np.ones((2, 2), np.float16), np.full((1, 2), 1e34, f32), np.ones((2, 1), f32)
    x = np.full((1, 2), 60000, np.float16)
    text = _message(lambda: F.dora_forward(x, W0, A, B, np.ones(2, f32), 1.0))
    assert "which fits" not in text, text
    assert "y (the output) (shape (1, 2)) overflowed float16" in text, text
    assert "largest value 65504" in text and "about 84852.8," in text, text


def test_h_bf16_consistent_y_beyond_bf16_max_is_an_overflow_of_bfloat16():
    # y = sqrt(2) * 2.404e38 = 3.3998e38: fits float32, not bfloat16 (3.3895e38)
    W0, A, B = np.ones((2, 2), BF16), np.full((1, 2), 2e38, f32), np.ones((2, 1), f32)
    text = _message(lambda: F.dora_forward(np.ones((1, 2), BF16), W0, A, B,
                                           np.full(2, 2.404e38, f32), 1.0))
    assert "which fits" not in text, text
    assert "y (the output) (shape (1, 2)) overflowed bfloat16" in text, text


def test_g_prime_fp16_peft_y_fits_names_PEFTs_intermediate():
    # under PEFT's cast points x A^T = 6e38 overflows float32; y = 4.243e4 fits float16
    W0, A, B = np.ones((2, 2), np.float16), np.full((1, 2), 1e34, f32), np.ones((2, 1), f32)
    x = np.full((1, 2), 30000, np.float16)
    text = _message(lambda: F.dora_forward(x, W0, A, B, np.ones(2, f32), 1.0, policy="peft"))
    assert not _claims_y_overflowed(text), text
    assert "PEFT's intermediate x A^T overflowed float32" in text, text
    assert "which fits float16" in text and np.isclose(_quoted_y(text), 42426, rtol=1e-3), text


def test_h_prime_bf16_peft_y_fits_names_PEFTs_intermediate():
    W0, A, B = np.ones((2, 2), BF16), np.full((1, 2), 2e38, f32), np.ones((2, 1), f32)
    text = _message(lambda: F.dora_forward(np.ones((1, 2), BF16), W0, A, B, np.full(2, 1e38, f32),
                                           1.0, policy="peft"))
    assert not _claims_y_overflowed(text), text
    assert "PEFT's intermediate x A^T overflowed float32" in text, text
    assert "which fits bfloat16" in text, text


def test_peft_fp16_true_overflow_of_y_is_still_called_one():
    W0, A, B = np.ones((2, 2), np.float16), np.full((1, 2), 1e34, f32), np.ones((2, 1), f32)
    x = np.full((1, 2), 60000, np.float16)
    text = _message(lambda: F.dora_forward(x, W0, A, B, np.ones(2, f32), 1.0, policy="peft"))
    assert "y (the output) (shape (1, 2)) overflowed float16" in text, text


def _dg_case(dt):
    big = 1e20 if dt == f32 else 1e160  # dy * z = 1e41 (1e321) overflows; dg / n fits
    W0, A, B = np.full((2, 2), big, dt), np.ones((1, 2), dt), np.ones((2, 1), dt)
    x, m, dy = np.full((1, 2), 5.0, dt), np.ones(2, dt), np.full((1, 2), big, dt)
    _, ctx = F.dora_forward(x, W0, A, B, m, 1.0)
    return dy, ctx


@pytest.mark.parametrize("dt", [f32, f64], ids=["float32", "float64"])
def test_backward_dg_overflows_dmagnitude_fits(dt):
    if dt == f64 and not LONG_DOUBLE_WIDER:
        pytest.skip("no float type wider than float64 here: the message names dy * z only")
    dy, ctx = _dg_case(dt)
    text = _message(lambda: F.dora_backward(dy, ctx))
    assert not text.startswith("dmagnitude (shape"), text  # not "dmagnitude ... overflowed"
    assert f"intermediate dy * z overflowed {np.dtype(dt)}" in text, text
    assert f"which fits {np.dtype(dt)}" in text, text
    quoted = float(text.split("it is about ")[1].split(" ")[0])
    # dmagnitude = dy * z / n, z = x (W0 + s B A)^T = 10 (W0 + 1), n the forward's
    dm = float(np.longdouble(dy[0, 0]) * (np.longdouble(5) * 2 * np.longdouble(ctx.W0[0, 0]) + 10)
               / np.longdouble(ctx.n[0]))
    assert np.isclose(quoted, dm, rtol=1e-3), (quoted, dm, text)


@pytest.mark.parametrize("dt", [f32, f64], ids=["float32", "float64"])
def test_backward_norm_terms_that_cancel_are_not_called_an_overflow_of_dA(dt):
    # detach_norm=False: dg overflows, the norm's term and the low-rank term of dA cancel
    if dt == f64 and not LONG_DOUBLE_WIDER:
        pytest.skip("no float type wider than float64 here")
    dy, ctx = _dg_case(dt)
    text = _message(lambda: F.dora_backward(dy, ctx, detach_norm=False))
    assert not text.startswith("dA (shape"), text
    assert "the gradient dA" in text and "intermediate dy * z overflowed" in text, text
    assert f"which fits {np.dtype(dt)}" in text, text


@pytest.mark.parametrize("dt", [f32, f64], ids=["float32", "float64"])
def test_backward_true_overflow_of_dA_is_still_called_one(dt):
    # dA = s B^T dV = 7.07e39 (7.07e309): beyond the dtype, named as before
    if dt == f64 and not LONG_DOUBLE_WIDER:
        pytest.skip("no float type wider than float64 here")
    hb = 1e30 if dt == f32 else 1e300
    W0, A, B = np.ones((2, 2), dt), np.full((1, 2), 1 / hb, dt), np.full((2, 1), hb, dt)
    _, ctx = F.dora_forward(np.ones((1, 2), dt), W0, A, B, np.ones(2, dt), 1.0)
    text = _message(lambda: F.dora_backward(np.full((1, 2), 1e10, dt), ctx))
    assert text.startswith(f"dA (shape (1, 2)) overflowed {np.dtype(dt)}"), text


def test_backward_nan_dy_is_still_named_dy():
    dy, ctx = _dg_case(f32)
    dy[0, 1] = np.nan
    assert _message(lambda: F.dora_backward(dy, ctx)).startswith("dy ")


def test_backward_bf16_consistent_dg_overflows_dmagnitude_fits():
    # a bfloat16 W0 with float32 adapters: the backward runs in float32; dy * z = 1e41
    # overflows it, dmagnitude = dg / n (about 7e20) fits float32 (its dtype here)
    big = 1e20
    W0, A, B = np.full((2, 2), big, BF16), np.ones((1, 2), f32), np.ones((2, 1), f32)
    _, ctx = F.dora_forward(np.full((1, 2), 5.0, BF16), W0, A, B, np.ones(2, f32), 1.0)
    text = _message(lambda: F.dora_backward(np.full((1, 2), big, BF16), ctx))
    assert not text.startswith("dmagnitude (shape"), text
    assert "the gradient dmagnitude" in text and "intermediate dy * z overflowed float32" in text
    assert "which fits float32" in text, text


# LoRA (lora_forward / lora_backward, LoRALinear): the same rule. Before, every LoRA
# refusal said "y (the output) ... overflowed" or "dB ... overflowed", whatever did.

def _lora_UBT_case():
    # U = x A^T = 2e30 fits, U B^T = 2e40 overflows float32, s U B^T = 2e20: y fits
    return (np.ones((1, 2), f32), np.ones((2, 2), f32), np.full((1, 2), 1e30, f32),
            np.full((2, 1), 1e10, f32), 1e-20)


def test_lora_forward_only_UBT_overflows_is_not_called_an_overflow_of_y():
    text = _message(lambda: F.lora_forward(*_lora_UBT_case()))
    assert not _claims_y_overflowed(text), text
    assert "intermediate (x A^T) B^T overflowed float32" in text, text
    assert "which fits float32" in text and np.isclose(_quoted_y(text), 2e20, rtol=1e-3), text
    assert "m / n" not in text, text  # LoRA has no magnitude


def test_lora_forward_with_a_mask_names_the_masked_intermediate():
    x, W0, A, B, s = _lora_UBT_case()
    mask = np.full((1, 2), 2.0, f32)  # xd = 2 x: y = 1 + 4e20
    text = _message(lambda: F.lora_forward(x, W0, A, B, s, dropout_mask=mask))
    assert "intermediate ((x * mask) A^T) B^T overflowed float32" in text, text
    assert np.isclose(_quoted_y(text), 4e20, rtol=1e-3), text


def test_lora_layer_says_the_same():
    x, W0, A, B, s = _lora_UBT_case()
    layer = dora_ref.LoRALinear(W0, None, lora_A=A, lora_B=B, r=1, lora_alpha=s, rng=0)
    text = _message(lambda: layer(x))
    assert not _claims_y_overflowed(text) and "(x A^T) B^T overflowed" in text, text


def test_lora_forward_true_overflow_of_y_is_still_called_one():
    x, W0, A, B, _ = _lora_UBT_case()  # s = 1: y = 2e40
    text = _message(lambda: F.lora_forward(x, W0, A, B, 1.0))
    assert _claims_y_overflowed(text) and "about 2e+40" in text, text


def _lora_dB_case(s):
    # U = x A^T = 2e19; dy^T U = 2e39 overflows float32; dB = s dy^T U
    x, W0 = np.ones((1, 2), f32), np.ones((2, 2), f32)
    A, B = np.full((1, 2), 1e19, f32), np.full((2, 1), 1e-10, f32)
    _, ctx = F.lora_forward(x, W0, A, B, s)
    return np.full((1, 2), 1e20, f32), ctx


def test_lora_backward_dB_fits_when_only_its_product_overflows():
    dy, ctx = _lora_dB_case(1e-10)  # dB = 2e29
    text = _message(lambda: F.lora_backward(dy, ctx))
    assert not text.startswith("dB (shape"), text  # not "dB ... overflowed"
    assert "the gradient dB" in text and "which fits float32" in text, text
    assert np.isclose(float(text.split("it is about ")[1].split(" ")[0]), 2e29, rtol=1e-3), text


def test_lora_backward_true_overflow_of_dB_is_still_called_one():
    dy, ctx = _lora_dB_case(1.0)  # dB = 2e39
    assert _message(lambda: F.lora_backward(dy, ctx)).startswith("dB (shape (2, 1)) overflowed float32")


# A merged layer's forward, y = x W'^T: its product's terms can overflow and cancel.
# Before, "y (the output) ... overflowed" for y = 0.

def _merged(cls, dt):
    layer = cls(np.array([[1e30, 1e30], [1.0, 1.0]], dt), None, r=1, lora_alpha=1, rng=0)
    layer.merge()  # lora_B = 0: W' = W0
    return layer


@pytest.mark.parametrize("cls", [dora_ref.LoRALinear, dora_ref.DoRALinear])
@pytest.mark.parametrize("dt", [f32, BF16], ids=["float32", "bfloat16"])
def test_merged_forward_terms_that_cancel_are_not_called_an_overflow_of_y(cls, dt):
    text = _message(lambda: _merged(cls, dt)(np.array([[1e10, -1e10]], dt)))  # y = 0
    assert not _claims_y_overflowed(text), text
    assert "terms of the product x W'^T" in text and "which fits" in text, text


@pytest.mark.parametrize("dt", [f32, BF16], ids=["float32", "bfloat16"])
def test_merged_forward_true_overflow_of_y_is_still_called_one(dt):
    text = _message(lambda: _merged(dora_ref.DoRALinear, dt)(np.array([[1e10, 1e10]], dt)))
    assert _claims_y_overflowed(text) and "about 2e+40" in text, text  # y = 2e40


def test_a_norm_past_the_dtype_says_the_norm_itself_overflowed():
    # Adversary, session 12: a float32 row whose norm is past float32's largest value was said to
    # have "overflowed" in its sum of squares (the C kernel sums in double; only n does not fit)
    W0 = np.full((2, 4), 3e38, f32)
    A, B = np.zeros((1, 4), f32), np.zeros((2, 1), f32)
    text = _message(lambda: F.column_norm(W0, A, B, 1.0))
    assert "the norm itself overflowed float32 (it is larger than 3.403e+38)" in text, text
    assert "sum of squares" not in text, text


@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("r", [4, 40])  # the tile and, at r >= out above rank 12, BLAS's product
def test_nan_in_W0_with_a_given_weight_norm_is_named_not_called_an_overflow(dtype, bad, r):
    """An adversary, session 22: with ``weight_norm`` given, W0 is not checked before the
    forward (no norm of it is formed), and a NaN in W0 reached the message "y (the output) ...
    overflowed ...; every input is finite, but the values are too large": false, and W0 not
    named. The error path now checks W0 first and names it, in both backends and the LoRA
    forward."""
    rng = np.random.default_rng(0)
    x, W0 = rng.standard_normal((5, 12)).astype(dtype), rng.standard_normal((16, 12)).astype(dtype)
    A, B = rng.standard_normal((r, 12)).astype(dtype), rng.standard_normal((16, r)).astype(dtype)
    m = (rng.random(16) + 0.5).astype(dtype)
    n = F.column_norm(W0, A, B, 0.5)
    W0[3, 7] = bad
    for backend in dora_ref.available_backends():
        with dora_ref.use_backend(backend):
            msg = _message(lambda: F.dora_forward(x, W0, A, B, m, 0.5, weight_norm=n))
            assert msg.startswith("W0 (shape (16, 12)) contains NaN or Inf, first at index (3, 7)"), msg
            assert "overflow" not in msg
            msg = _message(lambda: F.lora_forward(x, W0, A, B, 0.5))
            assert "W0" in msg and "every input is finite" not in msg, msg


def test_nan_in_a_float16_W0_under_policy_peft_with_a_given_norm_is_named():
    """An adversary, session 22: the float16/bfloat16 path with ``policy="peft"`` lacked the
    W0 check that 2b650e2 added to the float path, and said y overflowed "with every input
    finite"."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 12)).astype(np.float16)
    W0 = rng.standard_normal((16, 12)).astype(np.float16)
    A, B = rng.standard_normal((4, 12)).astype(f32), rng.standard_normal((16, 4)).astype(f32)
    m = (rng.random(16) + 0.5).astype(f32)
    n = F.column_norm(W0, A, B, 0.5)
    W0[3, 7] = np.nan
    for backend in dora_ref.available_backends():
        with dora_ref.use_backend(backend):
            msg = _message(lambda: F.dora_forward(x, W0, A, B, m, 0.5, weight_norm=n, policy="peft"))
            assert msg.startswith("W0 (shape (16, 12)) contains NaN or Inf, first at index (3, 7)"), msg


@pytest.mark.parametrize("dtype, policy", [(f64, "consistent"), (f32, "consistent"),
                                           (np.float16, "consistent"), (np.float16, "peft")])
def test_nan_in_an_embedding_table_with_a_given_norm_is_named(dtype, policy):
    """An adversary, session 22: ``embedding_dora_forward`` with ``weight_norm`` given (no norm
    of the table formed) reported a NaN in the table as y overflowing "with every input
    finite", and advised float64 to a float64 call. The table is now named."""
    from dora_ref.core.embedding import embedding_dora_forward

    rng = np.random.default_rng(0)
    adapter = f32 if dtype == np.float16 else dtype
    E = rng.standard_normal((20, 8)).astype(dtype)
    A, B = rng.standard_normal((4, 20)).astype(adapter), rng.standard_normal((8, 4)).astype(adapter)
    m = (rng.random(8) + 0.5).astype(adapter)
    n = embedding_dora_forward(np.array([1, 2]), E, A, B, m, 0.5, policy=policy)[1].n.astype(adapter)
    E[2, 3] = np.nan
    for backend in dora_ref.available_backends():
        with dora_ref.use_backend(backend):
            msg = _message(lambda: embedding_dora_forward(np.array([1, 2]), E, A, B, m, 0.5,
                                                          weight_norm=n, policy=policy))
            assert msg.startswith("weight (shape (20, 8)) contains NaN or Inf, first at index (2, 3)"), msg


def test_a_float64_overflow_message_does_not_advise_float64():
    """``check_result_finite``'s overflow message advised "or compute in float64" to a float64
    result (an adversary's note, session 22); it still does for narrower dtypes."""
    from dora_ref.core._validate import check_result_finite

    big = np.array([np.finfo(f64).max]) * 2
    msg = _message(lambda: check_result_finite([("y (the output)", big)], []))
    assert "overflowed float64" in msg and "compute in float64" not in msg
    msg = _message(lambda: check_result_finite([("y (the output)", big.astype(f32))], []))
    assert "compute in float64" in msg
