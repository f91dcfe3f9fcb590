"""A zero in a given norm is called an all-zero row only where the row is zero.

Found by session 18's second adversary: a ``weight_norm`` of 0 for a row of
W0 + s*B@A that is not zero was refused with "W0 + s*B@A has an all-zero row
at output channel(s) [1]", a false claim about the weights. Now the rows of a
given norm's zeros are recomputed (error path only): a true zero row keeps
its message; any other says the norm does not belong to the weights.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import dora_ref


def _case():
    rng = np.random.default_rng(0)
    W, A, B = rng.normal(size=(4, 3)), rng.normal(size=(2, 3)), rng.normal(size=(4, 2))
    return W, A, B, np.ones(4), rng.normal(size=(2, 3))


@pytest.mark.parametrize("lp", [None, np.float16, ml_dtypes.bfloat16], ids=["float64", "float16", "bfloat16"])
def test_a_wrong_zero_in_a_given_norm_is_not_called_a_zero_row(lp):
    W, A, B, m, x = _case()
    n = dora_ref.column_norm(W, A, B, 1.0)
    n[1] = 0.0
    kwargs = {}
    if lp is not None:
        W, x = W.astype(lp), x.astype(lp)
        A, B, m, n = (v.astype(np.float32) for v in (A, B, m, n))
        kwargs = {"policy": "peft"}
    with pytest.raises(ValueError, match=r"^the row norm given for output channel\(s\) \[1\] is 0, but "
                                         r"W0 \+ s\*B@A is not zero there"):
        dora_ref.dora_forward(x, W, A, B, m, 1.0, weight_norm=n, **kwargs)


def test_a_true_zero_row_keeps_its_message():
    W, A, B, m, x = _case()
    W[2], B[2] = 0.0, 0.0
    n = dora_ref.column_norm(W, A, B, 1.0)
    with pytest.raises(ValueError, match=r"^W0 \+ s\*B@A has an all-zero row at output channel\(s\) \[2\]"):
        dora_ref.dora_forward(x, W, A, B, m, 1.0, weight_norm=n)
    layer = dora_ref.DoRALinear(W, lora_A=A, lora_B=B, lora_magnitude_vector=m, lora_alpha=2)
    layer.eval()  # the layer's cached norm is given to the forward: the row is zero, so said
    with pytest.raises(ValueError, match=r"all-zero row at output channel\(s\) \[2\]"):
        layer(x)
