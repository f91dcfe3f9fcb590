"""A convolution's errors are said in the caller's terms.

Found by session 18's adversary: the conv layers run the DoRA math on the
im2col patch matrix, and its messages gave that matrix's shapes: an x of
shape (3, 4, 5, 4, 6) with an Inf at (0, 1, 2, 3, 4) was reported as
"x (shape (72, 108)) contains NaN or Inf, first at index (6, 53)", an
overflowed output as "y (the output) (shape (72, 4)) ... index (13, 0)".
Now NaN/Inf in x or dy is named with their own shapes and indices, and other
messages say how a patch row maps to a sample and an output position.
"""
from __future__ import annotations

import numpy as np
import pytest

from dora_ref import DoRAConv2d, DoRAConv3d


def _conv3d(dtype=np.float64):
    rng = np.random.default_rng(0)
    layer = DoRAConv3d((rng.normal(size=(4, 4, 3, 3, 3)) / 2).astype(dtype), r=2, lora_alpha=4, rng=0,
                       init_lora_weights="gaussian")
    layer.lora_B = rng.normal(size=layer.lora_B.shape).astype(layer.lora_A.dtype) * 0.3
    return layer


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy's backend, as NumPy warns
def test_an_inf_in_x_is_named_at_its_own_index():
    layer = _conv3d()
    x = np.random.default_rng(1).normal(size=(3, 4, 5, 4, 6))
    x[0, 1, 2, 3, 4] = np.inf
    with pytest.raises(ValueError, match=r"^x \(shape \(3, 4, 5, 4, 6\)\) contains NaN or Inf, "
                                         r"first at index \(0, 1, 2, 3, 4\)$"):
        layer(x)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy's backend, as NumPy warns
def test_an_inf_in_dy_is_named_at_its_own_index():
    rng = np.random.default_rng(2)
    layer = DoRAConv2d(rng.normal(size=(4, 3, 3, 3)), padding=1, r=2, lora_alpha=4, rng=0)
    y = layer(rng.normal(size=(2, 3, 5, 5)))
    dy = np.ones_like(y)
    dy[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"^dy \(shape \(2, 4, 5, 5\)\) contains NaN or Inf, "
                                         r"first at index \(1, 2, 3, 4\)$"):
        layer.backward(dy)


def test_an_overflow_message_says_how_patch_rows_map_to_the_output():
    layer = _conv3d(np.float16)
    x = (np.random.default_rng(1).normal(size=(3, 4, 5, 4, 6)) * 5000).clip(-60000, 60000)
    with pytest.raises(ValueError, match=r"overflowed float16.*row i is sample i // 24 at output "
                                         r"position i % 24 of \(3, 2, 4\)"):
        layer(x.astype(np.float16))
