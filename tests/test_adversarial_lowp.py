"""Adversarial cases for float16/bfloat16 DoRA (issue 13): each test is a defect found and fixed.

Every test names the input that once gave a silent inf, a silently different
number or a crash instead of a result or a clear ValueError.
"""
import numpy as np
import pytest

import dora_ref
from dora_ref import init_magnitude

FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def _near_max_fp16_weight():
    # every row's float32 norm: 0.9 * 65504 * sqrt(8) = 1.67e5, past float16's 65504
    return np.full((6, 8), 0.9 * FP16_MAX, np.float16)


def _pure_fp16_adapter(rng):
    A = (rng.normal(size=(2, 8)) / 4).astype(np.float16)
    B = np.zeros((6, 2), np.float16)
    return A, B


@pytest.mark.parametrize("policy", ["consistent", "peft"])
def test_init_magnitude_fp16_pure_norm_past_fp16_max_raises(policy):
    """A float16 magnitude cannot hold a norm > 65504: it was returned as inf ("consistent")."""
    A, B = _pure_fp16_adapter(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"overflows the magnitude's dtype float16.*65504"):
        init_magnitude(_near_max_fp16_weight(), A, B, 2.0, policy=policy)


def test_init_magnitude_fp16_mixed_norm_past_fp16_max_is_float32_norm():
    """With a float32 magnitude the same weight is fine: m is the float32 norm, exactly."""
    rng = np.random.default_rng(0)
    A, B = _pure_fp16_adapter(rng)
    W0 = _near_max_fp16_weight()
    m = init_magnitude(W0, A.astype(np.float32), B.astype(np.float32), 2.0)
    assert m.dtype == np.float32
    expected = np.sqrt(np.sum(W0.astype(np.float64) ** 2, axis=1))  # B = 0: the norm of W0
    # one float32 sum of 8 squares and a sqrt: within 8 * 2**-24 relative (Higham 3.5)
    np.testing.assert_allclose(m, expected, rtol=8 * 2.0**-24)


def test_peft_pure_norm_fp16_overflow_message_names_dtype():
    """PEFT's pure-lp norm rounds n to float16: the error says so, not 'sum of squares overflowed'."""
    A, B = _pure_fp16_adapter(np.random.default_rng(1))
    with pytest.raises(ValueError, match="magnitude's dtype float16"):
        dora_ref.column_norm(_near_max_fp16_weight(), A, B, 2.0, policy="peft")
