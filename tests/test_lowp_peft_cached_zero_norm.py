"""policy="peft" in eval mode refuses a zero row norm, as every other path does.

Found by session 18's adversary: a ``DoRALinear`` or ``DoRAConv2d`` on a
float16/bfloat16 weight with ``policy="peft"``, in eval mode, silently output
0 in a channel whose row of W0 + s B A is all zero (as if
``allow_zero_norm=True`` had been passed; PEFT outputs NaN there), while
training mode, "consistent", float32, the functional API, the embedding and
``merge()`` refused it. The eval forward passes the layer's cached norm, and
``lowp._peft_forward`` took a given norm unchecked; it now goes through
``check_norm`` as a computed one does.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from dora_ref import DoRAConv2d, DoRALinear
from dora_ref.core import functional as F

LOW = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


def _zero_row_case(lp):
    W = np.ones((3, 4), lp)
    W[1] = 0
    A = np.full((2, 4), 0.5, np.float32)
    B = np.ones((3, 2), np.float32)
    B[1] = 0  # row 1 of W0 + s B A is zero: n[1] = 0
    return W, A, B, np.ones(3, np.float32), np.ones((2, 4), lp)


@pytest.mark.parametrize("lp", LOW, ids=str)
@pytest.mark.parametrize("policy", ["peft", "consistent"])
def test_eval_linear_refuses_a_zero_row_norm_from_its_cached_norm(lp, policy):
    W, A, B, m, x = _zero_row_case(lp)
    layer = DoRALinear(W, lora_A=A, lora_B=B, lora_magnitude_vector=m, lora_alpha=2, policy=policy)
    layer.eval()
    with pytest.raises(ValueError, match=r"all-zero row at output channel\(s\) \[1\]"):
        layer(x)


@pytest.mark.parametrize("lp", LOW, ids=str)
def test_eval_conv_refuses_a_zero_row_norm_from_its_cached_norm(lp):
    W = np.ones((3, 2, 1, 1), lp)
    W[1] = 0
    conv = DoRAConv2d(W, r=2, lora_alpha=2, policy="peft", rng=0)
    conv.lora_B = np.zeros_like(conv.lora_B)
    conv.lora_magnitude_vector = np.ones(3, conv.lora_magnitude_vector.dtype)
    conv.eval()
    with pytest.raises(ValueError, match=r"all-zero row at output channel\(s\) \[1\]"):
        conv(np.ones((1, 2, 1, 1), lp))


@pytest.mark.parametrize("lp", LOW, ids=str)
def test_functional_peft_forward_checks_a_given_weight_norm(lp):
    W, A, B, m, x = _zero_row_case(lp)
    n = np.array([2.0, 0.0, 2.0], np.float32)
    with pytest.raises(ValueError, match="all-zero row"):
        F.dora_forward(x, W, A, B, m, 1.0, weight_norm=n, policy="peft")
    # allowed: the channel's g is 0, as documented for allow_zero_norm, and the others are kept
    y, _ = F.dora_forward(x, W, A, B, m, 1.0, weight_norm=n, policy="peft", allow_zero_norm=True)
    y = y.astype(np.float32)
    assert np.all(y[:, 1] == 0) and np.all(np.isfinite(y))
    with pytest.raises(ValueError, match="not finite|NaN|Inf"):
        F.dora_forward(x, W, A, B, m, 1.0, weight_norm=np.array([2.0, np.inf, 2.0], np.float32),
                       policy="peft")
