"""Adversarial cases for float16/bfloat16 DoRA (issue 13): each test is a defect found and fixed.

Every test names the input that once gave a silent inf, a silently different
number or a crash instead of a result or a clear ValueError.
"""
import copy
import pickle

import numpy as np
import pytest

import dora_ref
from dora_ref import DoRALinear, LoRALinear, init_magnitude

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


def _fp16_layer(cls, **kw):
    rng = np.random.default_rng(2)
    W0 = rng.normal(size=(6, 8)).astype(np.float16)
    return cls(W0, r=2, rng=0, **kw), rng.normal(size=(3, 8)).astype(np.float16)


@pytest.mark.parametrize("typo", ["Peft", "PEFT", "consistant", None, 1])
@pytest.mark.parametrize("cls", [DoRALinear, LoRALinear])
def test_layer_policy_typo_assigned_after_construction_raises(cls, typo):
    """``layer.policy = "Peft"`` used to run the consistent path silently (forward tests == "peft")."""
    layer, _ = _fp16_layer(cls)
    with pytest.raises(ValueError, match="policy must be one of"):
        layer.policy = typo
    assert layer.policy == "consistent"


def test_layer_policy_assigned_after_construction_is_used():
    """A valid assignment takes effect: the same numbers as a layer built with that policy."""
    built, x = _fp16_layer(DoRALinear, policy="peft", autocast_adapter_dtype=False)
    switched, _ = _fp16_layer(DoRALinear, policy="peft", autocast_adapter_dtype=False)
    switched.policy = "consistent"
    switched.policy = "peft"
    assert built.forward(x).tobytes() == switched.forward(x).tobytes()


@pytest.mark.parametrize("cls", [DoRALinear, LoRALinear])
def test_layer_pickled_before_policies_existed_merges(cls):
    """A float32 layer pickled by dora_ref 0.1 has no ``policy``: merge() raised AttributeError."""
    rng = np.random.default_rng(3)
    layer = cls(rng.normal(size=(6, 8)).astype(np.float32), r=2, rng=0)
    layer.lora_B[...] = rng.normal(size=layer.lora_B.shape).astype(np.float32)
    state = copy.deepcopy(layer.__dict__)
    for key in ("_policy", "policy", "autocast_adapter_dtype"):
        state.pop(key, None)  # what an old pickle holds
    old = cls.__new__(cls)
    old.__setstate__(state)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    y = layer.forward(x)
    assert old.policy == "consistent"
    old.merge()
    layer.merge()
    assert old.weight.tobytes() == layer.weight.tobytes()
    assert old.forward(x).tobytes() == layer.forward(x).tobytes()
    old.unmerge()
    layer.unmerge()
    assert old.weight.tobytes() == layer.weight.tobytes()
    assert np.isfinite(y).all()


def test_layer_pickled_with_policy_attribute_keeps_it():
    """A pickle written while ``policy`` was a plain attribute loads with that policy."""
    layer, x = _fp16_layer(DoRALinear, policy="peft")
    state = dict(layer.__dict__)
    state["policy"] = state.pop("_policy")
    old = DoRALinear.__new__(DoRALinear)
    old.__setstate__(state)
    assert old.policy == "peft"
    assert old.forward(x).tobytes() == pickle.loads(pickle.dumps(layer)).forward(x).tobytes()


def _layers_of_dora_ref_0_1():
    """Float32 layers and an input each, as dora_ref 0.1 (before float16/bfloat16) built them."""
    from dora_ref.layers.conv import DoRAConv2d
    from dora_ref.layers.embedding import DoRAEmbedding

    rng = np.random.default_rng(4)
    f32 = np.float32
    return [
        (DoRALinear(rng.normal(size=(6, 8)).astype(f32), r=2, rng=0),
         rng.normal(size=(3, 8)).astype(f32)),
        (LoRALinear(rng.normal(size=(6, 8)).astype(f32), r=2, rng=0),
         rng.normal(size=(3, 8)).astype(f32)),
        (DoRAConv2d(rng.normal(size=(4, 3, 3, 3)).astype(f32), r=2, rng=0),
         rng.normal(size=(2, 3, 5, 5)).astype(f32)),
        (DoRAEmbedding(rng.normal(size=(10, 4)).astype(f32), r=2, rng=0),
         np.array([[1, 2, 9]])),
    ]


@pytest.mark.parametrize("index", range(4), ids=["DoRALinear", "LoRALinear", "DoRAConv2d",
                                                 "DoRAEmbedding"])
def test_layer_pickled_before_low_precision_runs_forward_merge_backward(index):
    """A 0.1 pickle lacks _low_precision, policy and autocast_adapter_dtype: forward raised
    AttributeError. Loaded, it gives the bits of the layer it was pickled from."""
    layer, x = _layers_of_dora_ref_0_1()[index]
    for name in ("lora_B", "lora_embedding_A"):
        if name in layer.parameters():
            p = layer.parameters()[name]
            p[...] = np.linspace(-0.2, 0.3, p.size, dtype=p.dtype).reshape(p.shape)
    old = copy.deepcopy(layer)
    for key in ("_low_precision", "_policy", "autocast_adapter_dtype"):
        old.__dict__.pop(key, None)
    loaded = pickle.loads(pickle.dumps(old))
    assert loaded.policy == "consistent"
    y = layer.forward(x)
    assert loaded.forward(x).tobytes() == y.tobytes()
    dy = np.linspace(-1, 1, y.size, dtype=y.dtype).reshape(y.shape)
    layer.backward(dy)
    loaded.backward(dy)
    for name, g in layer.grads.items():
        assert loaded.grads[name].tobytes() == g.tobytes(), name
    layer.merge()
    loaded.merge()
    assert loaded.weight.tobytes() == layer.weight.tobytes()
    assert loaded.forward(x).tobytes() == layer.forward(x).tobytes()


# every public name the 0.1 module dora_ref.layers held (read from its source)
LAYERS_0_1_NAMES = [
    "AdapterLayer", "DoRALinear", "EvalNormCache", "LoRALinear", "adapter_parameter",
    "as_float_array", "check_adapter", "check_finite", "check_input", "check_result_finite",
    "check_rows_finite", "check_scaling", "check_weight_shape", "checked_array", "frozen",
    "initial_lora_weights", "lora_scaling", "refuse_unrecoverable_merge",
]


def test_layers_package_keeps_every_name_of_the_0_1_module():
    """``from dora_ref.layers import AdapterLayer`` (a custom layer's base) raised ImportError."""
    import subprocess
    import sys

    code = f"from dora_ref.layers import {', '.join(LAYERS_0_1_NAMES)}; import dora_ref; " \
           "from dora_ref.layers.base import AdapterLayer as A; assert AdapterLayer is A; " \
           "assert 'AdapterLayer' not in dora_ref.__all__"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("policy", ["consistent", "peft"])
def test_embedding_init_magnitude_fp16_pure_norm_past_fp16_max_raises(policy):
    """The embedding's magnitude init rounded a norm of 1.9e5 to a float16 inf ("consistent")."""
    from dora_ref.core.embedding import embedding_init_magnitude

    E = np.full((10, 4), 6e4, np.float16)  # each dimension's norm over V = 10: 1.9e5
    A, B = np.zeros((2, 10), np.float16), np.ones((4, 2), np.float16)
    with pytest.raises(ValueError, match=r"overflows the magnitude's dtype float16.*65504"):
        embedding_init_magnitude(E, A, B, 2.0, policy=policy)


def test_embedding_layer_fp16_pure_norm_past_fp16_max_raises_at_construction():
    """The layer was built with an inf magnitude and failed only at its first forward."""
    from dora_ref.layers.embedding import DoRAEmbedding

    E = np.full((10, 4), 6e4, np.float16)
    with pytest.raises(ValueError, match="overflows the magnitude's dtype float16"):
        DoRAEmbedding(E, r=2, autocast_adapter_dtype=False, rng=0)
    layer = DoRAEmbedding(E, r=2, rng=0)  # float32 magnitude: the float32 norm, finite
    assert layer.lora_magnitude_vector.dtype == np.float32
    # A = 0 at init: each norm is sqrt(10) * 6e4 up to one float64 sum rounded to float32
    np.testing.assert_allclose(layer.lora_magnitude_vector, np.sqrt(10) * 6e4, rtol=2.0**-23)


@pytest.mark.parametrize("old", ["conv", "embedding"])
def test_split_old_module_refuses_attribute_deletion(old):
    """``del dora_ref.conv.conv_merge`` removed the name from the shared view for the whole
    process (``from dora_ref.conv import conv_merge`` then failed); it is refused like assignment."""
    import importlib

    view = importlib.import_module(f"dora_ref.{old}")
    name = next(n for n in view.__all__ if callable(getattr(view, n)))
    with pytest.raises(AttributeError, match=f"delete '{name}' on the module that holds it"):
        delattr(view, name)
    assert hasattr(view, name)
    with pytest.raises(AttributeError, match="set 'x' on the module that holds it"):
        view.x = 1


def _merged(dtype):
    rng = np.random.default_rng(5)
    W0 = rng.normal(size=(6, 8)).astype(dtype)
    A = (rng.normal(size=(2, 8)) / 4).astype(np.float32)
    B = (rng.normal(size=(6, 2)) / 4).astype(np.float32)
    m = init_magnitude(W0, A, B, 2.0)
    W_merged, n = dora_ref.merge(W0, A, B, m, 2.0)
    return W_merged, A, B, m, n


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
@pytest.mark.parametrize("bad", ["negative", "nan", "zero_on_nonzero_row"])
def test_unmerge_with_norms_merge_cannot_return_raises(dtype, bad):
    """unmerge(..., n) with n < 0, NaN or 0 on a nonzero row of W' returned a wrong W0 silently
    (n = 0 gave W'_i - s B_i A, a negative n a flipped row)."""
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    W_merged, A, B, m, n = _merged(dtype)
    n = n.copy()
    n[2] = {"negative": -n[2], "nan": np.nan, "zero_on_nonzero_row": 0.0}[bad]
    with pytest.raises(ValueError, match=r"n (must hold the row norms|is 0 at output channel).*\b2\b"):
        dora_ref.unmerge(W_merged, A, B, m, 2.0, n)


def test_unmerge_zero_norm_row_of_allowed_merge_still_recovers():
    """The legitimate n = 0 (allow_zero_norm: merge wrote a zero row) still unmerges: W0_i = -s B_i A."""
    rng = np.random.default_rng(6)
    W0 = rng.normal(size=(4, 8)).astype(np.float16)
    A = (rng.normal(size=(2, 8)) / 4).astype(np.float32)
    B = (rng.normal(size=(4, 2)) / 4).astype(np.float32)
    B[1] = 0.0
    W0[1] = 0.0  # row 1 of W0 + s B A is zero: its norm is 0
    m = np.ones(4, np.float32)
    W_merged, n = dora_ref.merge(W0, A, B, m, 2.0, allow_zero_norm=True)
    assert n[1] == 0 and not W_merged[1].any()
    W0_back = dora_ref.unmerge(W_merged, A, B, m, 2.0, n)
    assert W0_back[1].tobytes() == W0[1].tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_dropout_mask_with_nan_or_inf_is_named(dtype, value):
    """A NaN dropout mask was reported as 'y overflowed float32 ... every input is finite'."""
    rng = np.random.default_rng(7)
    W0 = rng.normal(size=(6, 8)).astype(dtype)
    A = (rng.normal(size=(2, 8)) / 4).astype(np.float32)
    B = (rng.normal(size=(6, 2)) / 4).astype(np.float32)
    x = rng.normal(size=(3, 8)).astype(dtype)
    m = init_magnitude(W0, A, B, 2.0)
    mask = np.ones_like(x)
    mask[1, 3] = value
    with pytest.raises(ValueError, match=r"dropout_mask \(shape \(3, 8\)\) contains NaN or Inf"):
        dora_ref.dora_forward(x, W0, A, B, m, 2.0, dropout_mask=mask)


def test_conv_dropout_mask_with_nan_is_named():
    from dora_ref.core.conv import conv_dora_forward, conv_init_magnitude

    rng = np.random.default_rng(8)
    W = rng.normal(size=(4, 3, 3, 3)).astype(np.float16)
    A = (rng.normal(size=(2, 3, 3, 3)) / 4).astype(np.float32)
    B = np.zeros((4, 2, 1, 1), np.float32)
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float16)
    m = conv_init_magnitude(W, A, B, 2.0)
    mask = np.ones_like(x)
    mask[0, 1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="dropout_mask .*contains NaN or Inf"):
        conv_dora_forward(x, W, A, B, m, 2.0, dropout_mask=mask)


@pytest.mark.parametrize("merged_under", ["consistent", "peft"])
def test_layer_policy_change_while_merged_raises(merged_under):
    """Switching the policy between merge() and unmerge() recovered another W0 (pure fp16: 20 of
    20 seeds differed); the change is refused while merged and allowed after unmerge()."""
    other = {"consistent": "peft", "peft": "consistent"}[merged_under]
    layer, x = _fp16_layer(DoRALinear, policy=merged_under, autocast_adapter_dtype=False)
    layer.lora_B[...] = np.linspace(-0.3, 0.3, layer.lora_B.size).reshape(
        layer.lora_B.shape).astype(layer.lora_B.dtype)
    reference = copy.deepcopy(layer)
    reference.merge()
    reference.unmerge()
    layer.merge()
    layer.policy = merged_under  # the same policy: allowed
    with pytest.raises(ValueError, match="policy cannot change while the layer is merged"):
        layer.policy = other
    layer.unmerge()
    assert layer.weight.tobytes() == reference.weight.tobytes()
    layer.policy = other
    assert layer.policy == other


@pytest.mark.parametrize("value", ["False", "no", 0, None, 1.0])
def test_layer_autocast_adapter_dtype_not_bool_raises(value):
    """``autocast_adapter_dtype="False"`` (a config read as text) was bool()-ed to True: float32
    adapters instead of the 16-bit ones asked for, silently."""
    from dora_ref.layers.conv import DoRAConv2d
    from dora_ref.layers.embedding import DoRAEmbedding

    W = np.ones((4, 3, 3, 3), np.float16)
    for build in (lambda: DoRALinear(np.ones((6, 8), np.float16), r=2, rng=0,
                                     autocast_adapter_dtype=value),
                  lambda: DoRAConv2d(W, r=2, rng=0, autocast_adapter_dtype=value),
                  lambda: DoRAEmbedding(np.ones((10, 4), np.float16), r=2, rng=0,
                                        autocast_adapter_dtype=value)):
        with pytest.raises(TypeError, match="autocast_adapter_dtype must be True or False"):
            build()
    layer = DoRALinear(np.ones((6, 8), np.float16), r=2, rng=0,
                       autocast_adapter_dtype=np.bool_(False))
    assert layer.lora_A.dtype == np.float16


def _eval_layers(policy, index):
    """A pure-fp16 layer with a trained lora_B; seeds where the two policies' norms differ."""
    from dora_ref.layers.conv import DoRAConv2d
    from dora_ref.layers.embedding import DoRAEmbedding

    seed = (4, 0, 0)[index]
    rng = np.random.default_rng(seed)
    kw = dict(r=4, rng=0, policy=policy, autocast_adapter_dtype=False)
    f16 = np.float16
    layer, x = [
        lambda: (DoRALinear(rng.normal(size=(16, 256)).astype(f16), **kw),
                 rng.normal(size=(4, 256)).astype(f16)),
        lambda: (DoRAConv2d(rng.normal(size=(8, 16, 3, 3)).astype(f16), **kw),
                 rng.normal(size=(2, 16, 6, 6)).astype(f16)),
        lambda: (DoRAEmbedding(rng.normal(size=(400, 16)).astype(f16), **kw),
                 np.arange(10).reshape(2, 5)),
    ][index]()
    name = "lora_embedding_A" if index == 2 else "lora_B"
    p = layer.parameters()[name]
    p[...] = (np.random.default_rng(seed + 100).normal(size=p.shape) * 0.3).astype(p.dtype)
    return layer.eval(), x


@pytest.mark.parametrize("index", range(3), ids=["linear", "conv2d", "embedding"])
def test_eval_norm_cache_after_policy_change_is_recomputed(index):
    """In eval mode the cached norm outlived ``layer.policy = ...``: a pure-fp16 forward kept
    the old policy's norm and gave other bits than a layer built with the new policy."""
    layer, x = _eval_layers("consistent", index)
    built_peft, _ = _eval_layers("peft", index)
    y_consistent = layer.forward(x)  # fills the cache under "consistent"
    y_peft = built_peft.forward(x)
    assert y_consistent.tobytes() != y_peft.tobytes()  # the case tells the policies apart
    layer.policy = "peft"
    assert layer.forward(x).tobytes() == y_peft.tobytes()
    layer.policy = "consistent"
    assert layer.forward(x).tobytes() == y_consistent.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_weight_norm_with_nan_is_named(dtype):
    """A NaN weight_norm was reported as 'the sum of squares overflowed the dtype'."""
    rng = np.random.default_rng(10)
    W0 = rng.normal(size=(6, 8)).astype(dtype)
    A = (rng.normal(size=(2, 8)) / 4).astype(np.float32)
    B = (rng.normal(size=(6, 2)) / 4).astype(np.float32)
    m = init_magnitude(W0, A, B, 2.0)
    n = m.copy()
    n[4] = np.nan
    with pytest.raises(ValueError, match=r"weight_norm \(shape \(6,\)\) contains NaN or Inf"):
        dora_ref.dora_forward(rng.normal(size=(3, 8)).astype(dtype), W0, A, B, m, 2.0,
                              weight_norm=n)


def test_old_module_names_are_attributes_of_the_package_after_import_dora_ref():
    """In 0.1 ``import dora_ref`` imported every module: ``dora_ref.optim.AdamW`` and
    ``dora_ref.conv.DoRAConv2d`` worked; after the new layout they raised AttributeError."""
    import subprocess
    import sys

    from dora_ref._aliases import FLAT_LAYOUT

    code = (
        "import importlib, dora_ref\n"
        f"for old in {sorted(FLAT_LAYOUT)!r}:\n"
        "    assert getattr(dora_ref, old) is importlib.import_module('dora_ref.' + old), old\n"
        "assert dora_ref.optim.AdamW is dora_ref.AdamW\n"
        "assert not hasattr(dora_ref, 'no_such_module')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
