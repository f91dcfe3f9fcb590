"""A read-only view of a writeable array is copied as a layer's frozen weight.

Found by session 18's adversary: ``frozen`` trusted any read-only
C-contiguous array, so ``DoRALinear(v)`` with ``v`` a read-only view of a
writeable ``W`` kept ``v``; a write into ``W`` then changed the layer's
weight behind its eval-mode norm cache (an eval forward of 9.2 where the
layer's weights gave 0.49). Such a view is now copied
(``base._written_through``); a read-only array with no writeable memory
behind it (one that owns its data, a read-only memory map, bytes) is still
kept without a copy.
"""
from __future__ import annotations

import mmap

import numpy as np
import pytest

from dora_ref import DoRALinear
from dora_ref.layers.base import _written_through


def test_a_read_only_view_of_a_writeable_array_is_copied_and_writes_do_not_reach_the_layer():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(8, 6))
    x = rng.normal(size=(3, 6))
    v = W.view()
    v.flags.writeable = False
    layer = DoRALinear(v, r=2, rng=0, init_lora_weights="gaussian")
    layer.lora_B = np.ones((8, 2))
    assert not np.shares_memory(layer.weight, W)
    layer.eval()
    y0 = layer(x)
    W[0] *= 100.0
    assert np.array_equal(layer(x), y0)  # the eval cache and the weight still agree
    layer.train()
    assert np.array_equal(layer(x), y0)


def test_read_only_memory_with_nothing_writeable_behind_it_is_kept_without_a_copy(tmp_path):
    W = np.random.default_rng(1).normal(size=(8, 6))
    owned = W.copy()
    owned.flags.writeable = False
    assert not _written_through(owned)
    assert np.shares_memory(DoRALinear(owned, r=2, rng=0).weight, owned)
    read_only_view_of_bytes = np.frombuffer(memoryview(W.tobytes()).toreadonly(), dtype=W.dtype)
    assert not _written_through(read_only_view_of_bytes)
    from_bytes = np.frombuffer(W.tobytes(), dtype=W.dtype).reshape(W.shape)
    assert not from_bytes.flags.writeable and not _written_through(from_bytes)
    assert np.shares_memory(DoRALinear(from_bytes, r=2, rng=0).weight, from_bytes)
    path = tmp_path / "w.bin"
    W.tofile(path)
    mapped = np.memmap(path, dtype=W.dtype, mode="r", shape=W.shape)
    assert not _written_through(mapped)
    assert np.shares_memory(DoRALinear(mapped, r=2, rng=0).weight, mapped)


@pytest.mark.parametrize("make", ["bytearray", "writable mmap", "view of a view",
                                  "read-only memoryview of a writeable array"])
def test_writeable_memory_behind_a_read_only_array_is_seen(make, tmp_path):
    W = np.random.default_rng(2).normal(size=(4, 3))
    if make == "bytearray":
        arr = np.frombuffer(bytearray(W.tobytes()), dtype=W.dtype).reshape(W.shape)
    elif make == "writable mmap":
        buf = mmap.mmap(-1, W.nbytes)
        arr = np.frombuffer(buf, dtype=W.dtype).reshape(W.shape)
    elif make == "view of a view":
        arr = W.view().view()
    else:  # a second adversary's way around the first fix: the chain ended at a read-only memoryview
        arr = np.frombuffer(memoryview(W).toreadonly(), dtype=W.dtype).reshape(W.shape)
    if arr.flags.writeable:
        arr.flags.writeable = False
    assert _written_through(arr)
    assert not np.shares_memory(DoRALinear(arr, r=2, rng=0).weight, arr)
