"""A byte-swapped float input is refused with advice that works.

Found by session 18's adversary: big-endian float16 x, dy, bias or weight on
a float16 layer got "x must have dtype float32 or float64, got >f2 ...
convert it explicitly, e.g. x.astype(np.float32)", and following that advice
failed again ("x has dtype float32 but the weights have dtype float16"). The
message now names the float the array holds and converts to it.
"""
from __future__ import annotations

import numpy as np
import pytest

from dora_ref import DoRALinear, column_norm


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_a_byte_swapped_input_is_told_to_become_its_own_native_float(dtype):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(6, 10)).astype(dtype)
    layer = DoRALinear(W, r=4, rng=0)
    x = rng.normal(size=(3, 10)).astype(dtype)
    swapped = x.astype(x.dtype.newbyteorder())
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=rf"x has dtype .*{name} in non-native byte order.*x\.astype\(np\.{name}\)"):
        layer(swapped)
    advised = swapped.astype(getattr(np, name))  # the advice, followed
    assert np.array_equal(layer(advised), layer(x))
    bias = np.zeros(6, dtype=np.dtype(dtype).newbyteorder())
    with pytest.raises(TypeError, match=rf"bias has dtype .*bias\.astype\(np\.{name}\)"):
        DoRALinear(W, bias, r=4, rng=0)
    DoRALinear(W, bias.astype(getattr(np, name)), r=4, rng=0)


def test_the_functional_api_gives_the_same_advice():
    rng = np.random.default_rng(1)
    W, A, B = rng.normal(size=(6, 5)), rng.normal(size=(2, 5)), rng.normal(size=(6, 2))
    with pytest.raises(TypeError, match=r"W0 has dtype >f8 .*float64 in non-native byte order"):
        column_norm(W.astype(">f8"), A, B, 1.0)
