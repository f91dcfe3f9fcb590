"""Flags are True or False: a string "False", None, 0 or a list is a TypeError naming the flag.

Found by session 18's adversary: ``detach_norm``, ``allow_zero_norm`` and
``use_rslora`` were taken by truthiness, so ``detach_norm="False"`` gave the
detached gradient, ``use_rslora="False"`` rsLoRA's scaling (4.0 for 2.0), and
``allow_zero_norm="False"`` a zero row's output silently instead of the
ValueError. ``fan_in_fan_out`` and ``autocast_adapter_dtype`` were already
checked; now every such flag is (``_validate.check_flag``), and
``lora_dropout`` takes NumPy scalars (``np.float32(0.5)`` was refused with a
message saying it must be in [0, 1)).
"""
from __future__ import annotations

import numpy as np
import pytest

import dora_ref
from dora_ref import DoRAConv2d, DoRAEmbedding, DoRALinear, LoRALinear
from dora_ref.core import dense
from dora_ref.core.embedding import embedding_dora_backward, embedding_dora_forward

BAD = ["False", "True", None, 0, 1, [], 1.0]


def _problem():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(6, 5))
    A = rng.normal(size=(2, 5))
    B = rng.normal(size=(6, 2))
    return W, A, B, np.ones(6), rng.normal(size=(3, 5)), rng.normal(size=(3, 6))


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_functional_flags_refuse_what_is_not_a_bool(bad):
    W, A, B, m, x, dy = _problem()
    y, ctx = dora_ref.dora_forward(x, W, A, B, m, 1.0)
    with pytest.raises(TypeError, match="detach_norm must be True or False"):
        dora_ref.dora_backward(dy, ctx, detach_norm=bad)
    with pytest.raises(TypeError, match="allow_zero_norm must be True or False"):
        dora_ref.dora_forward(x, W, A, B, m, 1.0, allow_zero_norm=bad)
    with pytest.raises(TypeError, match="allow_zero_norm must be True or False"):
        dora_ref.merge(W, A, B, m, 1.0, allow_zero_norm=bad)
    with pytest.raises(TypeError, match="allow_zero_norm must be True or False"):
        dora_ref.column_norm(W, A, B, 1.0, allow_zero_norm=bad)
    with pytest.raises(TypeError, match="detach_norm must be True or False"):
        dense.backward(dy, x, W, A, B, m, 1.0, detach_norm=bad)
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        dora_ref.layers.lora_scaling(4, 8, bad)


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_layer_flags_refuse_what_is_not_a_bool(bad):
    W = np.random.default_rng(1).normal(size=(6, 5))
    for kwargs in ({"detach_norm": bad}, {"allow_zero_norm": bad}, {"use_rslora": bad}):
        name = next(iter(kwargs))
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            DoRALinear(W, r=2, lora_alpha=4, **kwargs)
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            DoRAConv2d(np.ones((4, 3, 3, 3)), r=2, lora_alpha=4, **kwargs)
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            DoRAEmbedding(np.ones((10, 4)), r=2, lora_alpha=4, **kwargs)
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        LoRALinear(W, r=2, lora_alpha=4, use_rslora=bad)


def test_the_reported_cases():
    W, A, B, m, x, dy = _problem()
    assert DoRALinear(W, r=4, lora_alpha=8, use_rslora=False).scaling == 2.0
    assert DoRALinear(W, r=4, lora_alpha=8, use_rslora=np.bool_(True)).scaling == 4.0
    Wz, Bz = W.copy(), B.copy()
    Wz[0], Bz[0] = 0, 0
    with pytest.raises(ValueError, match="all-zero row"):
        dora_ref.dora_forward(x, Wz, A, Bz, m, 1.0, allow_zero_norm=np.bool_(False))
    y, _ = dora_ref.dora_forward(x, Wz, A, Bz, m, 1.0, allow_zero_norm=True)
    assert np.all(y[:, 0] == 0)
    layer = DoRALinear(W, r=2, lora_dropout=np.float32(0.5), rng=0)
    assert layer.lora_dropout == 0.5
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\), got np.float32\(1.5\)"):
        DoRALinear(W, r=2, lora_dropout=np.float32(1.5))


def test_a_flag_set_on_a_layer_later_is_refused_where_it_is_used():
    W, A, B, m, x, dy = _problem()
    layer = DoRALinear(W, r=2, lora_alpha=4, rng=0)
    y = layer(x)
    layer.detach_norm = "False"
    with pytest.raises(TypeError, match="detach_norm must be True or False"):
        layer.backward(dy)
    layer.eval()
    layer.allow_zero_norm = "False"
    layer.set_base_weight(np.vstack([np.zeros((1, 5)), W[1:]]))
    layer.lora_B = np.vstack([np.zeros((1, 2)), layer.lora_B[1:]])
    with pytest.raises(TypeError, match="allow_zero_norm must be True or False"):
        layer(x)
    emb = DoRAEmbedding(np.ones((10, 4)), r=2, lora_alpha=4, rng=0)
    ids = np.array([1, 2])
    out, ctx = embedding_dora_forward(ids, emb.weight, emb.lora_embedding_A, emb.lora_embedding_B,
                                      emb.lora_magnitude_vector, emb.scaling)
    with pytest.raises(TypeError, match="detach_norm must be True or False"):
        embedding_dora_backward(np.ones_like(out), ctx, detach_norm="False")
