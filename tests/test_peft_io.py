"""PEFT adapter I/O without torch: round trips, safetensors bases, merge, errors.

Every expected value is computed independently of ``dora_ref.formats.peft``: adapters
are written by hand (``peft_helpers.write_adapter``) and merged weights
formed in full in float64 (``peft_helpers.dense_merge``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from peft_helpers import dense_merge, random_module, write_adapter
from safetensors.numpy import load_file, save_file

from dora_ref import DoRALinear, LoRALinear
from dora_ref import peft as P
from dora_ref.formats.peft import config as peft_config
from dora_ref.formats import bf16_bits
from dora_ref.formats import safetensors_io as S
from dora_ref.formats.merge_cli import main as merge_main
from dora_ref.porting.tolerance import assert_close

BF16 = np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------
# config: PEFT's pattern semantics
# ---------------------------------------------------------------------------


def test_rank_and_alpha_patterns_match_as_peft_get_pattern_key():
    """First pattern (file order) matching ``(.*\\.)?(p)$``, anchored at the start."""
    cfg = P.LoraAdapterConfig(
        r=8, lora_alpha=16,
        rank_pattern={"q_proj": 4, r"layers\.1\..*": 2, "proj": 1},
        alpha_pattern={"v_proj": 3},
    )  # fmt: skip
    assert cfg.rank_and_alpha("model.layers.0.self_attn.q_proj") == (4, 16)
    assert cfg.rank_and_alpha("model.layers.1.self_attn.q_proj") == (4, 16)  # first match wins
    assert cfg.rank_and_alpha("model.layers.1.mlp.up") == (2, 16)
    assert cfg.rank_and_alpha("model.layers.0.mlp.down_proj") == (8, 16)  # "proj" needs a dot before
    assert cfg.rank_and_alpha("model.layers.0.proj") == (1, 16)
    assert cfg.rank_and_alpha("model.layers.0.self_attn.v_proj") == (8, 3)
    assert cfg.rank_and_alpha("xq_proj") == (8, 16)
    assert cfg.scaling("model.layers.0.self_attn.v_proj") == 3 / 8
    rs = P.LoraAdapterConfig(r=4, lora_alpha=8, use_rslora=True)
    assert rs.scaling("anything") == 8 / 2


@pytest.mark.parametrize(
    "field, value",
    [("lora_bias", True), ("trainable_token_indices", [1, 2]), ("bias", "all"),
     ("peft_type", "IA3"), ("use_qalora", True), ("target_parameters", ["experts.w"])],
)  # fmt: skip
def test_unsupported_config_is_refused_by_name(tmp_path, field, value):
    A, B, m = random_module(np.random.default_rng(0), 3, 4, 2)
    write_adapter(tmp_path, {"lin": (A, B, m)}, {field: value})
    with pytest.raises(ValueError, match=field):
        P.load_adapter(tmp_path)


def test_adapter_of_a_rewritten_base_warns(tmp_path):
    A, B, m = random_module(np.random.default_rng(0), 3, 4, 2)
    write_adapter(tmp_path, {"lin": (A, B, m)}, {"init_lora_weights": "pissa_niter_4"})
    with pytest.warns(UserWarning, match="residual"):
        P.load_adapter(tmp_path)


# ---------------------------------------------------------------------------
# adapter round trips
# ---------------------------------------------------------------------------


def _layers(rng, dtype=np.float64):
    """Three DoRA layers of two ranks and alphas, trained-looking (B != 0, m perturbed)."""
    layers = {}
    for name, (out_f, in_f, r, alpha) in {
        "model.layers.0.q": (5, 6, 2, 4), "model.layers.0.up": (7, 5, 2, 4),
        "model.layers.1.q": (5, 6, 3, 5),
    }.items():  # fmt: skip
        layer = DoRALinear(rng.normal(size=(out_f, in_f)).astype(dtype), r=r, lora_alpha=alpha, rng=rng)
        A, B, m = random_module(rng, out_f, in_f, r, dtype)
        layer.lora_A, layer.lora_B, layer.lora_magnitude_vector = A, B, m
        layers[name] = layer
    return layers


def test_save_then_load_round_trips_exactly_with_per_module_ranks(tmp_path):
    layers = _layers(np.random.default_rng(0))
    P.save_adapter(tmp_path, P.adapter_from_layers(layers, base_model_name_or_path="toy"))
    cfg = json.loads((tmp_path / P.ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["use_dora"] is True
    assert cfg["rank_pattern"] == {r"^model\.layers\.1\.q": 3}  # anchored: this module only
    assert cfg["alpha_pattern"] == {r"^model\.layers\.1\.q": 5}
    assert cfg["base_model_name_or_path"] == "toy" and cfg["peft_type"] == "LORA"
    # keys and shapes as docs/peft_dora.md, Sec. 4
    tensors = load_file(str(tmp_path / P.ADAPTER_WEIGHTS))
    pre = "base_model.model.model.layers.0.up."
    assert tensors[pre + "lora_A.weight"].shape == (2, 5)
    assert tensors[pre + "lora_B.weight"].shape == (7, 2)
    assert tensors[pre + "lora_magnitude_vector"].shape == (7,)
    assert len(tensors) == 9

    back = P.load_adapter(tmp_path)
    for name, layer in layers.items():
        mod = back.modules[name]
        np.testing.assert_array_equal(mod.lora_A, layer.lora_A)
        np.testing.assert_array_equal(mod.lora_B, layer.lora_B)
        np.testing.assert_array_equal(mod.magnitude, layer.lora_magnitude_vector)
        assert mod.r == layer.r and mod.scaling == layer.scaling


def test_loaded_layers_forward_as_the_saved_ones(tmp_path):
    rng = np.random.default_rng(1)
    layers = _layers(rng)
    P.save_adapter(tmp_path, P.adapter_from_layers(layers))
    base = {f"{n}.weight": layer.weight for n, layer in layers.items()}
    built, fifo = P.build_layers(tmp_path, base)
    assert not any(fifo.values())
    for name, layer in layers.items():
        x = rng.normal(size=(4, layer.in_features))
        np.testing.assert_array_equal(built[name].eval()(x), layer.eval()(x))


def test_plain_lora_adapter_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    layer = LoRALinear(rng.normal(size=(4, 3)), r=2, lora_alpha=2, rng=0)
    layer.lora_B[:] = rng.normal(size=(4, 2))
    P.save_adapter(tmp_path, P.adapter_from_layers({"fc": layer}))
    assert json.loads((tmp_path / P.ADAPTER_CONFIG).read_text())["use_dora"] is False
    built, _ = P.build_layers(tmp_path, {"fc.weight": layer.weight})
    assert type(built["fc"]) is LoRALinear
    x = rng.normal(size=(2, 3))
    np.testing.assert_array_equal(built["fc"](x), layer(x))


def test_config_dropout_rank_and_rslora_reach_the_layers(tmp_path):
    rng = np.random.default_rng(4)
    mods = {"a.q": random_module(rng, 3, 4, 2), "a.v": random_module(rng, 3, 4, 5)}
    write_adapter(tmp_path, mods, {"lora_dropout": 0.25, "use_rslora": True, "lora_alpha": 6,
                                   "rank_pattern": {"v": 5}, "alpha_pattern": {"a.v": 10}})  # fmt: skip
    layers, _ = P.build_layers(tmp_path, {"a.q.weight": rng.normal(size=(3, 4)), "a.v.weight": rng.normal(size=(3, 4))})
    assert layers["a.q"].lora_dropout == 0.25 and layers["a.q"].r == 2
    assert layers["a.q"].scaling == 6 / np.sqrt(2) and layers["a.v"].scaling == 10 / np.sqrt(5)


def test_magnitude_key_with_weight_suffix_and_no_prefix_is_read(tmp_path):
    A, B, m = random_module(np.random.default_rng(3), 3, 4, 2)
    write_adapter(tmp_path, {"lin": (A, B, m)}, prefix="", magnitude_suffix=".weight")
    np.testing.assert_array_equal(P.load_adapter(tmp_path).modules["lin"].magnitude, m)


# ---------------------------------------------------------------------------
# errors: each names the key or module and the shapes seen
# ---------------------------------------------------------------------------


def test_missing_magnitude_of_a_dora_adapter_names_the_module(tmp_path):
    rng = np.random.default_rng(0)
    A, B, m = random_module(rng, 3, 4, 2)
    A2, B2, _ = random_module(rng, 3, 4, 2)
    write_adapter(tmp_path, {"blk.q": (A, B, m), "blk.v": (A2, B2, None)}, {"use_dora": True})
    with pytest.raises(ValueError, match=r"'blk\.v' has no lora_magnitude_vector.*re-initialise"):
        P.load_adapter(tmp_path)


@pytest.mark.parametrize("shape", [(1, 6), (6,)])
def test_lycoris_magnitude_over_inputs_says_it_is_the_other_convention(tmp_path, shape):
    A, B, _ = random_module(np.random.default_rng(0), 3, 6, 2)
    write_adapter(tmp_path, {"lin": (A, B, np.ones(shape))})
    with pytest.raises(ValueError, match=r"\(1, 6\)|\(6,\)") as info:
        P.load_adapter(tmp_path)
    assert "LyCORIS" in str(info.value) and "(3,)" in str(info.value)


def test_lycoris_keys_are_named(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": np.ones((2, 4)), "lora_unet_x.dora_scale": np.ones((1, 4))},
              str(tmp_path / P.ADAPTER_WEIGHTS))  # fmt: skip
    (tmp_path / P.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(ValueError, match="LyCORIS"):
        P.load_adapter(tmp_path)


def test_pickle_adapter_is_refused_with_how_to_convert(tmp_path):
    (tmp_path / P.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(ValueError, match=r"never unpickles.*(\n|.)*save_file\(torch\.load"):
        P.load_adapter(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        P.BaseWeights(tmp_path / "adapter_model.bin")


def test_truncated_and_missing_files(tmp_path):
    A, B, m = random_module(np.random.default_rng(0), 3, 4, 2)
    write_adapter(tmp_path / "ad", {"lin": (A, B, m)})
    weights = tmp_path / "ad" / P.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"not a valid safetensors file.*truncated"):
        P.load_adapter(tmp_path / "ad")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=P.ADAPTER_WEIGHTS):
        P.load_adapter(tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        P.load_adapter(tmp_path / "nope")
    (tmp_path / "ad" / P.ADAPTER_CONFIG).write_text('{"r": 2,')
    write_adapter(tmp_path / "ad2", {"lin": (A, B, m)})
    (tmp_path / "ad2" / P.ADAPTER_CONFIG).write_text('{"r": 2,')
    with pytest.raises(ValueError, match="not valid JSON"):
        P.load_adapter(tmp_path / "ad2")


def test_rank_disagreeing_with_config_is_an_error(tmp_path):
    A, B, m = random_module(np.random.default_rng(0), 3, 4, 3)
    write_adapter(tmp_path, {"lin": (A, B, m)}, {"r": 2})
    with pytest.raises(ValueError, match=r"rank 3 .*r = 2"):
        P.load_adapter(tmp_path)


def test_base_shape_mismatch_is_an_error_naming_all_shapes(tmp_path):
    A, B, m = random_module(np.random.default_rng(0), 3, 4, 2)
    write_adapter(tmp_path, {"lin": (A, B, m)})
    shapes = r"'lin\.weight' has shape \(3, 5\).*\(2, 4\).*\(3, 2\).*\(out, in\) = \(3, 4\)"
    with pytest.raises(ValueError, match=shapes):
        P.build_layers(tmp_path, {"lin.weight": np.zeros((3, 5))})
    with pytest.raises(ValueError, match=r"\(3, 4, 1, 1\).*\(linear\)"):
        P.build_layers(tmp_path, {"lin.weight": np.zeros((3, 4, 1, 1))})
    with pytest.raises(KeyError, match="'lin': base weight 'lin.weight' not found"):
        P.build_layers(tmp_path, {"other.weight": np.zeros((3, 4))})


def _conv_embedding_adapter(tmp_path, rng, conv_magnitude_shape=(1, 4, 1, 1)):
    """A conv (4 <- 3, 3x3) and an embedding (V=10, D=5) module, keys as PEFT saves them."""
    t = {
        "base_model.model.conv.lora_A.weight": rng.normal(size=(2, 3, 3, 3)),
        "base_model.model.conv.lora_B.weight": rng.normal(size=(4, 2, 1, 1)),
        "base_model.model.conv.lora_magnitude_vector": 1 + 0.1 * rng.normal(size=conv_magnitude_shape),
        "base_model.model.emb.lora_embedding_A": rng.normal(size=(2, 10)),
        "base_model.model.emb.lora_embedding_B": rng.normal(size=(5, 2)),
        "base_model.model.emb.lora_magnitude_vector": 1 + 0.1 * rng.normal(size=5),
    }  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(tmp_path / P.ADAPTER_WEIGHTS))
    (tmp_path / P.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                         "use_dora": True}))  # fmt: skip
    return t


def test_conv_and_embedding_modules_read_write_and_merge_on_their_linear_views(tmp_path):
    """Conv: DoRA on the kernel flattened to (out, in*k*k); embedding: on E.T (docs/peft_dora.md, Sec. 1 "Embeddings", "Convolutions")."""
    rng = np.random.default_rng(0)
    t = _conv_embedding_adapter(tmp_path / "a", rng)
    ad = P.load_adapter(tmp_path / "a")
    conv, emb = ad.modules["conv"], ad.modules["emb"]
    assert (conv.kind, emb.kind) == ("conv", "embedding")
    assert conv.magnitude.shape == (4,) and conv.in_features == 27
    P.save_adapter(tmp_path / "b", ad)  # PEFT's keys and shapes back
    back = load_file(str(tmp_path / "b" / P.ADAPTER_WEIGHTS))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in t.items()}
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
    K, E = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(10, 5))
    merged = P.merge_state_dict({"conv.weight": K, "emb.weight": E}, [ad])
    want_k = dense_merge(K.reshape(4, 27), t["base_model.model.conv.lora_A.weight"].reshape(2, 27),
                         t["base_model.model.conv.lora_B.weight"].reshape(4, 2), conv.magnitude, 1.0)
    assert_close(merged["conv.weight"], want_k.reshape(K.shape), k=27 + 2)
    want_e = dense_merge(E.T, t["base_model.model.emb.lora_embedding_A"],
                         t["base_model.model.emb.lora_embedding_B"], emb.magnitude, 1.0).T
    assert_close(merged["emb.weight"], want_e, k=10 + 2)
    with pytest.raises(ValueError, match="convolution: its stride"):
        P.build_layers(ad, {"conv.weight": K, "emb.weight": E})


def test_conv_magnitude_shape_and_grouped_conv_are_errors(tmp_path):
    rng = np.random.default_rng(1)
    _conv_embedding_adapter(tmp_path, rng, conv_magnitude_shape=(4,))
    with pytest.raises(ValueError, match=r"conv\.lora_magnitude_vector has shape \(4,\); expected \(1, 4, 1, 1\)"):
        P.load_adapter(tmp_path)
    _conv_embedding_adapter(tmp_path, rng)
    ad = P.load_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"groups = 3\) are not supported"):
        P.merge_state_dict({"conv.weight": np.ones((4, 1, 3, 3)), "emb.weight": np.ones((10, 5))}, [ad])


# ---------------------------------------------------------------------------
# safetensors bases: single file, shards, bf16/fp16, streaming writer
# ---------------------------------------------------------------------------


def _write_sharded(directory, tensors, n_shards=2, dtype=None):
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] if dtype is None else tensors[k].astype(dtype) for k in keys[i::n_shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (directory / P.SHARD_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text("{}")


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bf16", "fp16"])
def test_sharded_low_precision_base_loads_exactly(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {f"l{i}.weight": rng.normal(size=(3, 4)).astype(np.float32) for i in range(3)}
    _write_sharded(tmp_path, tensors, dtype=dtype)
    loaded = P.load_base_weights(tmp_path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == dtype
        np.testing.assert_array_equal(loaded[k].view(np.uint16), v.astype(dtype).view(np.uint16))


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    _write_sharded(tmp_path, {"a.weight": np.ones((2, 2)), "b.weight": np.ones((2, 2))})
    next(tmp_path.glob("model-00002*")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        P.BaseWeights(tmp_path)


@pytest.mark.parametrize("with_bf16", [False, True])
def test_streaming_writer_output_is_read_by_safetensors(tmp_path, with_bf16):
    rng = np.random.default_rng(0)
    specs = [("b", np.dtype(np.float32), (3,)), ("c", np.dtype(np.float64), (2, 1)),
             ("a", BF16 if with_bf16 else np.dtype(np.float16), (2, 3))]  # fmt: skip
    arrays = {k: rng.normal(size=s).astype(d) for k, d, s in specs}
    path = tmp_path / "x.safetensors"
    w = S.SafetensorsWriter(path, specs, {"format": "pt"})
    with pytest.raises(ValueError, match=r"expected tensor 'b'"):
        w.write("a", arrays["a"])
    for k, _, _ in specs:
        w.write(k, arrays[k])
    assert not path.exists()  # appears only when complete
    w.close()
    f = S.SafetensorsFile(path)  # safe_open validates the header and coverage
    assert sorted(f.keys()) == ["a", "b", "c"] and f.metadata() == {"format": "pt"}
    for k in arrays:
        assert f.get(k).dtype == arrays[k].dtype
        np.testing.assert_array_equal(f.get(k), arrays[k])
    if not with_bf16:  # safetensors' own NumPy loader reads the file too
        for k, v in load_file(str(path)).items():
            np.testing.assert_array_equal(v, arrays[k])


@given(
    st.lists(
        st.tuples(st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "U8"]),
                  st.lists(st.integers(1, 4), min_size=0, max_size=3)),
        min_size=1, max_size=5,
    ),
    st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_writer_then_reader_round_trips_any_dtype_and_shape(tmp_path_factory, specs, seed):
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, (st_dtype, shape) in enumerate(specs):
        dtype = S._numpy_dtype(st_dtype)
        arrays[f"t{i}"] = (rng.normal(size=shape) * 100).astype(dtype)
    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    w = S.SafetensorsWriter(path, [(k, a.dtype, a.shape) for k, a in arrays.items()])
    for k, a in arrays.items():
        w.write(k, a)
    w.close()
    f = S.SafetensorsFile(path)
    for k, a in arrays.items():
        got = f.get(k)
        assert got.dtype == a.dtype and got.shape == a.shape and f.st_dtype(k) == S._safetensors_dtype(a.dtype)
        assert got.tobytes() == a.tobytes()


def test_build_layers_from_a_sharded_bf16_directory_computes_in_float32(tmp_path):
    base, mods = _toy_checkpoint(tmp_path, BF16)
    layers, fifo = P.build_layers(tmp_path / "ad", tmp_path / "base")
    assert fifo == {"transformer.h.0.fc": False, "transformer.h.0.c_attn": True}
    attn = layers["transformer.h.0.c_attn"]
    assert attn.weight.dtype == np.float32 and attn.weight.shape == (9, 4)
    np.testing.assert_array_equal(attn.weight, base["h.0.c_attn.weight"].astype(BF16).astype(np.float32).T)
    np.testing.assert_array_equal(attn.bias, base["h.0.c_attn.bias"].astype(BF16).astype(np.float32))
    np.testing.assert_array_equal(attn.lora_magnitude_vector, mods["h.0.c_attn"][2].astype(np.float32))


# ---------------------------------------------------------------------------
# merge: single, chained, fan_in_fan_out, low precision
# ---------------------------------------------------------------------------


def _module(name, rng, out_f, in_f, r, alpha=4.0, dora=True, dtype=np.float64):
    A, B, m = random_module(rng, out_f, in_f, r, dtype, dora)
    return P.ModuleAdapter(name, A, B, m, alpha / r, r, alpha)


@pytest.mark.parametrize("shape", [(5, 5), (4, 7)], ids=["square", "non-square"])
def test_merge_weight_equals_the_dense_definition_in_both_layouts(shape):
    rng = np.random.default_rng(0)
    W0 = rng.normal(size=shape)
    mod = _module("m", rng, *shape, r=2)
    want = dense_merge(W0, mod.lora_A, mod.lora_B, mod.magnitude, mod.scaling)
    k = shape[1] + 2  # longest reduction: the row norm over in, after B @ A (r)
    assert_close(P.merge_weight(W0, [mod]), want, k=k)
    assert_close(P.merge_weight(W0.T.copy(), [mod], fan_in_fan_out=True), want.T, k=k)


def test_chained_adapters_merge_and_forward_as_peft_0_21():
    """DoRA, LoRA, DoRA on one layer; every norm from the bare W0 (docs/peft_dora.md, Sec. 1 "Several DoRA adapters", Sec. 3)."""
    rng = np.random.default_rng(1)
    out_f, in_f = 6, 5
    W0, b0, x = rng.normal(size=(out_f, in_f)), rng.normal(size=out_f), rng.normal(size=(3, in_f))
    mods = [_module("a", rng, out_f, in_f, 2), _module("b", rng, out_f, in_f, 3, dora=False),
            _module("c", rng, out_f, in_f, 1)]  # fmt: skip
    W = W0.copy()
    for mod in mods:  # the fold written out in full, float64
        V = mod.scaling * mod.lora_B @ mod.lora_A
        if mod.magnitude is None:
            W = W + V
        else:
            g = mod.magnitude / np.linalg.norm(W0 + V, axis=1)
            W = g[:, None] * (W + V)
    k = in_f + 3
    scale = np.abs(W).max() * 3  # three folds, each rounding at the scale of W
    assert_close(P.merge_weight(W0, mods), W, k=k, scale=scale)
    y_want = x @ W.T + b0
    assert_close(P.chain_forward(x, W0, b0, mods), y_want, k=k, scale=np.abs(y_want).max() * 3)
    # one adapter: the chain is the plain DoRA layer
    one = P.chain_forward(x, W0, b0, mods[:1])
    layer = DoRALinear(W0, b0, r=2, lora_alpha=4.0).eval()
    layer.lora_A, layer.lora_B, layer.lora_magnitude_vector = mods[0].lora_A, mods[0].lora_B, mods[0].magnitude
    assert_close(one, layer(x), k=k)


@given(
    st.integers(1, 6), st.integers(1, 6), st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=3),
    st.booleans(), st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_merged_chain_equals_the_chained_forward(out_f, in_f, specs, fifo, seed):
    """x @ W'.T + b equals the unmerged chain for any adapters (PEFT 0.21's merge = its forward)."""
    rng = np.random.default_rng(seed)
    W0, b0, x = rng.normal(size=(out_f, in_f)), rng.normal(size=out_f), rng.normal(size=(3, in_f))
    mods = [_module(str(i), rng, out_f, in_f, r, dora=dora) for i, (r, dora) in enumerate(specs)]
    stored = W0.T.copy() if fifo else W0
    merged = P.merge_weight(stored, mods, fan_in_fan_out=fifo)
    W = merged.T if fifo else merged
    y = P.chain_forward(x, W0, b0, mods)
    # the size of the summed terms: |x| (|W0| + sum_i s_i |B_i| |A_i|), times every g_i
    # (each DoRA fold rescales what came before), plus |b0|; one rounding per fold
    low_rank = sum(m.scaling * np.abs(m.lora_B) @ np.abs(m.lora_A) for m in mods)
    terms = float((np.abs(x) @ (np.abs(W0) + low_rank).T).max())
    g_max = 1.0
    for m in mods:
        if m.magnitude is not None:
            n = np.linalg.norm(W0 + m.scaling * m.lora_B @ m.lora_A, axis=1)
            g_max *= max(1.0, float(np.max(np.abs(m.magnitude) / n)))
    scale = terms * g_max + float(np.abs(b0).max())
    assert_close(x @ W.T + b0, y, k=in_f + 3 * len(mods), scale=len(mods) * scale)


def test_bf16_merge_computes_in_float32_and_rounds_once():
    """Each merged bf16 value is the float64 result rounded to bf16, up to one bf16 ulp.

    float32 arithmetic adds a relative error of about (in + r) * 2**-24 ~ 1e-6
    before the single rounding to bf16 (relative half-ulp 2**-9), so a value
    can land on the neighbouring bf16 only near a rounding tie.
    """
    rng = np.random.default_rng(2)
    W0 = rng.normal(size=(16, 24)).astype(BF16)
    mod = _module("m", rng, 16, 24, 4, dtype=np.float32)
    got = P.merge_weight(W0, [mod])
    assert got.dtype == BF16 and got.shape == W0.shape
    exact = dense_merge(W0.astype(np.float64), mod.lora_A, mod.lora_B, mod.magnitude, mod.scaling)
    ulp = np.spacing(np.abs(exact).astype(BF16).astype(np.float32)).astype(np.float64) * 2**16
    # np.spacing of the float32 value times 2**16 is the bf16 spacing (8 vs 24 significand bits)
    assert np.all(np.abs(got.astype(np.float64) - exact) <= ulp)
    assert np.mean(got == exact.astype(BF16)) > 0.99


def test_zero_norm_row_names_the_module():
    W0 = np.zeros((2, 3))
    mod = P.ModuleAdapter("blk.fc", np.zeros((1, 3)), np.zeros((2, 1)), np.ones(2), 1.0, 1, 1.0)
    with pytest.raises(ValueError, match=r"'blk\.fc'.*all-zero row"):
        P.merge_weight(W0, [mod])
    assert not P.merge_weight(W0, [mod], allow_zero_norm=True).any()


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def _toy_checkpoint(tmp_path, dtype=None, n_shards=2):
    """A sharded base with a Linear (out, in) and a Conv1D-style (in, out) weight, and its adapter."""
    rng = np.random.default_rng(5)
    base = {
        "h.0.fc.weight": rng.normal(size=(6, 4)), "h.0.fc.bias": rng.normal(size=6),
        "h.0.c_attn.weight": rng.normal(size=(4, 9)), "h.0.c_attn.bias": rng.normal(size=9),
        "h.0.ln.weight": rng.normal(size=4), "wte.weight": rng.normal(size=(10, 4)),
    }  # fmt: skip
    _write_sharded(tmp_path / "base", base, n_shards=n_shards, dtype=dtype)
    mods = {"h.0.fc": random_module(rng, 6, 4, 2), "h.0.c_attn": random_module(rng, 9, 4, 2)}
    write_adapter(tmp_path / "ad", {"transformer." + k: v for k, v in mods.items()},
                  {"fan_in_fan_out": True})  # fmt: skip
    return base, mods


@pytest.mark.parametrize("dtype", [None, BF16], ids=["f64", "bf16"])
def test_merge_command_writes_the_base_layout_and_merged_weights(tmp_path, capsys, dtype):
    base, mods = _toy_checkpoint(tmp_path, dtype)
    rc = merge_main([str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "merged 2 module(s) (2 with DoRA, 0 plain LoRA)" in out and "h.0.c_attn.weight" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in (tmp_path / "base").iterdir()
    )
    merged = P.load_base_weights(tmp_path / "out")
    original = P.load_base_weights(tmp_path / "base")
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in original.items()}
    for k in base:
        if k not in ("h.0.fc.weight", "h.0.c_attn.weight"):
            np.testing.assert_array_equal(merged[k].view(np.uint8), original[k].view(np.uint8))
    W_fc = dense_merge(original["h.0.fc.weight"].astype(np.float64), *mods["h.0.fc"][:2],
                       mods["h.0.fc"][2], 2.0)  # fmt: skip
    W_attn = dense_merge(original["h.0.c_attn.weight"].astype(np.float64).T, *mods["h.0.c_attn"][:2],
                         mods["h.0.c_attn"][2], 2.0).T  # fmt: skip
    if dtype is None:
        assert_close(merged["h.0.fc.weight"], W_fc, k=4 + 2)
        assert_close(merged["h.0.c_attn.weight"], W_attn, k=4 + 2)
    else:  # float32 compute, one rounding to bf16: within one bf16 ulp (see the bf16 test)
        for got, want in ((merged["h.0.fc.weight"], W_fc), (merged["h.0.c_attn.weight"], W_attn)):
            ulp = np.spacing(np.abs(want).astype(BF16).astype(np.float32)).astype(np.float64) * 2**16
            assert np.all(np.abs(got.astype(np.float64) - want) <= ulp)


def test_merge_command_on_a_single_file_and_a_plain_lora_adapter(tmp_path, capsys):
    rng = np.random.default_rng(6)
    W0 = rng.normal(size=(3, 5)).astype(np.float32)
    save_file({"fc.weight": W0}, str(tmp_path / "base.safetensors"))
    A, B, _ = random_module(rng, 3, 5, 2, np.float32, dora=False)
    write_adapter(tmp_path / "ad", {"fc": (A, B, None)}, {"lora_alpha": 2})
    assert merge_main([str(tmp_path / "base.safetensors"), str(tmp_path / "ad"),
                       str(tmp_path / "m.safetensors"), "--no-progress"]) == 0  # fmt: skip
    assert "(0 with DoRA, 1 plain LoRA)" in capsys.readouterr().out
    got = load_file(str(tmp_path / "m.safetensors"))["fc.weight"]
    assert_close(got, W0.astype(np.float64) + 1.0 * B.astype(np.float64) @ A, k=2, dtype=np.float32)


def test_merge_command_with_base_and_adapter_swapped_says_so(tmp_path, capsys):
    """A new user gave the adapter folder as BASE: the error names the likely mistake."""
    rng = np.random.default_rng(6)
    save_file({"fc.weight": rng.normal(size=(3, 5)).astype(np.float32)}, str(tmp_path / "base.safetensors"))
    write_adapter(tmp_path / "ad", {"fc": random_module(rng, 3, 5, 2)})
    assert merge_main([str(tmp_path / "ad"), str(tmp_path / "base.safetensors"), str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a PEFT adapter: are the base and the adapter given in the wrong order?" in err
    assert not (tmp_path / "m").exists()


def test_merge_command_errors_before_writing_anything(tmp_path, capsys):
    base, mods = _toy_checkpoint(tmp_path)
    A, B, _ = mods["h.0.fc"]
    write_adapter(tmp_path / "bad", {"transformer.h.0.fc": (A, B, None), "transformer.h.0.c_attn":
                                     mods["h.0.c_attn"]}, {"use_dora": True})  # fmt: skip
    assert merge_main([str(tmp_path / "base"), str(tmp_path / "bad"), str(tmp_path / "out")]) == 1
    assert "'transformer.h.0.fc' has no lora_magnitude_vector" in capsys.readouterr().err
    write_adapter(tmp_path / "wrong", {"h.0.fc": random_module(np.random.default_rng(0), 6, 5, 2)})
    assert merge_main([str(tmp_path / "base"), str(tmp_path / "wrong"), str(tmp_path / "out")]) == 1
    assert "'h.0.fc.weight' has shape (6, 4)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    shard = next((tmp_path / "base").glob("model-00001*"))
    shard.write_bytes(shard.read_bytes()[:-8])
    assert merge_main([str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "out")]) == 1
    assert f"{shard} is not a valid safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_command_leaves_no_partial_output_when_a_later_shard_fails(tmp_path, capsys):
    """A zero row norm found while merging shard 2 removes shard 1's output too."""
    _write_sharded(tmp_path / "base", {"a.weight": np.ones((2, 3)), "b.weight": np.zeros((2, 3))})
    write_adapter(tmp_path / "ad", {"a": random_module(np.random.default_rng(0), 2, 3, 2),
                                    "b": (np.zeros((2, 3)), np.zeros((2, 2)), np.ones(2))})  # fmt: skip
    assert merge_main([str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "module 'b': W0 + s*B@A has an all-zero row" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_modules_to_save_tensors_replace_the_base_tensors_in_its_dtype(tmp_path, capsys):
    """PEFT saves a modules_to_save copy (e.g. a classifier) in full as base_model.model.<module>.<param>."""
    rng = np.random.default_rng(8)
    base = {"fc.weight": rng.normal(size=(3, 4)), "score.weight": rng.normal(size=(2, 3)),
            "score.bias": rng.normal(size=2)}  # fmt: skip
    save_file({k: v.astype(BF16) for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    head = {"score.weight": rng.normal(size=(2, 3)).astype(np.float32), "score.bias": np.ones(2, np.float32)}
    write_adapter(tmp_path / "ad", {"fc": random_module(rng, 3, 4, 2)}, {"modules_to_save": ["score"]}, extra=head)
    adapter = P.load_adapter(tmp_path / "ad")
    assert set(adapter.replaced) == {"score.weight", "score.bias"} and set(adapter.modules) == {"fc"}
    P.save_adapter(tmp_path / "again", adapter)  # written back under PEFT's keys
    assert set(load_file(str(tmp_path / "again" / P.ADAPTER_WEIGHTS))) >= {
        "base_model.model.score.weight", "base_model.model.score.bias"}  # fmt: skip
    out = tmp_path / "out.safetensors"
    assert merge_main([str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), str(out), "--no-progress"]) == 0
    assert "replaced 2 tensor(s) by the adapters' modules_to_save" in capsys.readouterr().out
    merged = P.load_base_weights(out)
    for k, v in head.items():
        assert merged[k].dtype == BF16
        np.testing.assert_array_equal(merged[k].view(np.uint16), v.astype(BF16).view(np.uint16))
    bad = {"score.weight": np.ones((3, 2), np.float32)}
    write_adapter(tmp_path / "bad", {"fc": random_module(rng, 3, 4, 2)}, {"modules_to_save": ["score"]}, extra=bad)
    assert merge_main([str(tmp_path / "base.safetensors"), str(tmp_path / "bad"), str(tmp_path / "o2")]) == 1
    assert "'score.weight' has shape (3, 2), the base's 'score.weight' (2, 3)" in capsys.readouterr().err


def test_merge_command_does_not_overwrite_without_force(tmp_path, capsys):
    _toy_checkpoint(tmp_path)
    args = [str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "out"), "--no-progress"]
    assert merge_main(args) == 0
    assert merge_main(args) == 1
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert merge_main(args + ["--force"]) == 0
    assert merge_main([str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "base")]) == 1


def test_plumbing_merge_command_chains_adapters_as_python_m(tmp_path, backend):
    """Plumbing: the command's output equals P.merge_weight's (same code path); the chained
    values are checked against the fold written out densely in
    test_chained_adapters_merge_and_forward_as_peft_0_21."""
    base, mods = _toy_checkpoint(tmp_path, n_shards=1)
    rng = np.random.default_rng(7)
    write_adapter(tmp_path / "ad2", {"h.0.fc": random_module(rng, 6, 4, 2)})
    res = subprocess.run(
        [sys.executable, "-m", "dora_ref", "merge", str(tmp_path / "base"), str(tmp_path / "ad"),
         str(tmp_path / "ad2"), str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "DORA_REF_BACKEND": backend},
    )  # fmt: skip  (the same backend as this process: their last bits may differ)
    assert res.returncode == 0, res.stderr
    assert "h.0.fc.weight  <- " in res.stdout and ":DoRA, " in res.stdout
    adapters = [P.load_adapter(tmp_path / "ad"), P.load_adapter(tmp_path / "ad2")]
    want = P.merge_weight(base["h.0.fc.weight"],
                          [adapters[0].modules["transformer.h.0.fc"], adapters[1].modules["h.0.fc"]])  # fmt: skip
    np.testing.assert_array_equal(P.load_base_weights(tmp_path / "out")["h.0.fc.weight"], want)


# ---------------------------------------------------------------------------
# regressions from the adversarial review
# ---------------------------------------------------------------------------


def _square_pair(tmp_path, fifo_flag=False, extra_modules=None):
    """Adapter on two square (4, 4) modules "c" and "l"; base stores "c" (in, out) like a Conv1D."""
    rng = np.random.default_rng(11)
    mods = {"c": random_module(rng, 4, 4, 2), "l": random_module(rng, 4, 4, 2), **(extra_modules or {})}
    write_adapter(tmp_path / "ad", mods, {"fan_in_fan_out": fifo_flag})
    W_c, W_l = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))  # (out, in) views
    base = {"c.weight": W_c.T.copy(), "l.weight": W_l}  # c stored (in, out)
    want = {"c.weight": dense_merge(W_c, *mods["c"], 2.0).T, "l.weight": dense_merge(W_l, *mods["l"], 2.0)}
    return base, want, mods


def test_square_weights_of_unestablished_orientation_are_refused_not_guessed(tmp_path):
    """Review HIGH: PEFT saves fan_in_fan_out=false for a Conv1D + nn.Linear adapter; a square
    Conv1D was merged untransposed. Nothing here says which square module is which: refuse."""
    base, want, _ = _square_pair(tmp_path)
    for call in (lambda **kw: P.merge_state_dict(base, [tmp_path / "ad"], **kw),
                 lambda **kw: P.build_layers(tmp_path / "ad", base, **kw),
                 lambda **kw: P.plan_merge(base, [P.load_adapter(tmp_path / "ad")], **kw)):  # fmt: skip
        with pytest.raises(ValueError, match=r"square base weight\(s\) of module\(s\) \['c', 'l'\].*fan_in_fan_out="):
            call()
    # the override settles it: module names, a regex (PEFT's suffix rule), or a bool per module set
    for override in (["c"], "c", r"c|nothing"):
        got = P.merge_state_dict(base, [tmp_path / "ad"], fan_in_fan_out=override)
        for k in want:
            assert_close(got[k], want[k], k=4 + 2)
    layers, fifo = P.build_layers(tmp_path / "ad", base, fan_in_fan_out=["c"])
    assert fifo == {"c": True, "l": False}
    with pytest.raises(ValueError, match="not a valid regex"):
        P.merge_state_dict(base, [tmp_path / "ad"], fan_in_fan_out="(")


def test_fan_in_fan_out_flag_contradicted_by_a_non_square_module_is_refused(tmp_path):
    """A non-square module stored (in, out) under fan_in_fan_out=false: the adapter mixes types."""
    rng = np.random.default_rng(12)
    base, want, mods = _square_pair(tmp_path, extra_modules={"f": random_module(rng, 6, 4, 2)})
    base["f.weight"] = rng.normal(size=(4, 6))  # (in, out): a Conv1D
    with pytest.raises(ValueError, match=r"\['c', 'l'\].*contradicted by its non-square module\(s\) \['f'\]"):
        P.merge_state_dict(base, [tmp_path / "ad"])
    # an override contradicting a non-square shape is an error too, not a silent transpose
    with pytest.raises(ValueError, match=r"says module 'f' is stored \(out, in\)"):
        P.merge_state_dict(base, [tmp_path / "ad"], fan_in_fan_out=["c"])
    got = P.merge_state_dict(base, [tmp_path / "ad"], fan_in_fan_out="c|f")
    assert_close(got["c.weight"], want["c.weight"], k=6)
    # corroborated: every non-square module agrees with the flag, and no name says Conv1D
    base["f.weight"] = rng.normal(size=(6, 4))
    base["c.weight"] = base["c.weight"].T.copy()  # now both square modules are nn.Linear
    got = P.merge_state_dict(base, [tmp_path / "ad"])
    assert_close(got["c.weight"], dense_merge(base["c.weight"], *mods["c"], 2.0), k=6)


def test_base_config_json_model_type_decides_square_conv1d_modules(tmp_path):
    """GPT-2's attn.c_proj is a square Conv1D; config.json's model_type says so. A square
    module named like a GPT-2 Conv1D under fan_in_fan_out=false is never taken on the flag."""
    rng = np.random.default_rng(13)
    mods = {"h.0.attn.c_proj": random_module(rng, 4, 4, 2), "score": random_module(rng, 3, 4, 2)}
    write_adapter(tmp_path / "ad", mods, {"fan_in_fan_out": False})  # as PEFT saves it: score was last
    W = rng.normal(size=(4, 4))
    tensors = {"h.0.attn.c_proj.weight": W.T.copy(), "score.weight": rng.normal(size=(3, 4))}
    (tmp_path / "base").mkdir()
    save_file(tensors, str(tmp_path / "base" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"\['h.0.attn.c_proj'\] are named as GPT-2 Conv1D modules"):
        P.merge_state_dict(tmp_path / "base", [tmp_path / "ad"])
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    got = P.merge_state_dict(tmp_path / "base", [tmp_path / "ad"])
    assert_close(got["h.0.attn.c_proj.weight"], dense_merge(W, *mods["h.0.attn.c_proj"], 2.0).T, k=6)
    # another transformers model_type has nn.Linear only; a contradicting shape is an error
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    got = P.merge_state_dict(tmp_path / "base", [tmp_path / "ad"])
    assert_close(got["h.0.attn.c_proj.weight"], dense_merge(W.T, *mods["h.0.attn.c_proj"], 2.0), k=6)
    save_file({**tensors, "score.weight": rng.normal(size=(4, 3))}, str(tmp_path / "base" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model_type llama\) makes module 'score' an nn.Linear"):
        P.merge_state_dict(tmp_path / "base", [tmp_path / "ad"])
    # remote code (auto_map) tells nothing
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "gpt2", "auto_map": {"x": "y"}}))
    with pytest.raises(ValueError, match="cannot tell whether"):
        P.merge_state_dict(tmp_path / "base", [tmp_path / "ad"])


def test_merge_command_fan_in_fan_out_option_settles_square_modules(tmp_path, capsys):
    base, want, _ = _square_pair(tmp_path)
    save_file(base, str(tmp_path / "base.safetensors"))
    args = [str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), str(tmp_path / "out.safetensors"),
            "--no-progress"]  # fmt: skip
    assert merge_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("dora-ref merge: error: cannot tell whether") and err.count("\n") == 1
    assert "--fan-in-fan-out PATTERN" in err and not (tmp_path / "out.safetensors").exists()
    assert merge_main(args + ["--fan-in-fan-out", "c"]) == 0
    got = load_file(str(tmp_path / "out.safetensors"))
    for k in want:
        assert_close(got[k], want[k], k=6)


def test_merge_command_refuses_a_non_empty_out_and_out_in_an_input_directory(tmp_path, capsys):
    """Review: config.json/tokenizer files in OUT were overwritten without --force, and OUT ==
    ADAPTER wrote model.safetensors into the adapter directory."""
    _toy_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("mine")

    def run(o, *extra):
        return merge_main([str(tmp_path / "base"), str(tmp_path / "ad"), str(o), "--no-progress", *extra])

    assert run(out) == 1
    assert f"OUT {out} exists and is not empty; pass --force" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "mine" and len(list(out.iterdir())) == 1
    before = sorted(p.name for p in (tmp_path / "ad").iterdir())
    for o in (tmp_path / "ad", tmp_path / "ad" / "sub", tmp_path / "base", tmp_path / "base" / "merged"):
        assert run(o, "--force") == 1
        err = capsys.readouterr().err
        assert "directory" in err and err.endswith("; write the output elsewhere\n"), err
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == before
    assert not (tmp_path / "base" / "merged").exists()
    (out / "config.json").unlink()
    assert run(out) == 0  # an empty existing directory is fine
    assert run(tmp_path / "out2") == 0 and run(tmp_path / "out2", "--force") == 0


def test_adapter_from_layers_anchors_patterns_so_suffix_named_modules_keep_their_ranks(tmp_path):
    """Review: rank_pattern {'proj': 4} also matches 'block.proj' under PEFT's (.*\\.)?(key)$."""
    rng = np.random.default_rng(0)
    layers = {"proj": DoRALinear(rng.normal(size=(4, 6)), r=4, rng=0),
              "block.proj": DoRALinear(rng.normal(size=(4, 6)), r=2, lora_alpha=3, rng=1),
              "other": DoRALinear(rng.normal(size=(4, 6)), r=2, rng=2)}  # fmt: skip
    adapter = P.adapter_from_layers(layers)
    assert adapter.config.rank_pattern == {"^proj": 4} and adapter.config.alpha_pattern == {r"^block\.proj": 3}
    P.save_adapter(tmp_path, adapter)
    back = P.load_adapter(tmp_path)
    for name, layer in layers.items():
        assert (back.modules[name].r, back.modules[name].scaling) == (layer.r, layer.scaling)


def test_embedding_layers_save_through_adapter_from_layers(tmp_path):
    """Review: build_layers -> adapter_from_layers -> save_adapter failed for DoRAEmbedding
    (alone: no lora_dropout; with linear layers: 'all layers must be DoRA')."""
    rng = np.random.default_rng(3)
    t = _conv_embedding_adapter(tmp_path / "a", rng)
    t = {k: v for k, v in t.items() if ".emb." in k}
    t["base_model.model.lin.lora_A.weight"] = rng.normal(size=(2, 5))
    t["base_model.model.lin.lora_B.weight"] = rng.normal(size=(3, 2))
    t["base_model.model.lin.lora_magnitude_vector"] = 1 + 0.1 * rng.normal(size=3)
    save_file(t, str(tmp_path / "a" / P.ADAPTER_WEIGHTS))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_dora": True, "lora_dropout": 0.1}
    (tmp_path / "a" / P.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    base = {"emb.weight": rng.normal(size=(10, 5)), "lin.weight": rng.normal(size=(3, 5))}
    layers, _ = P.build_layers(tmp_path / "a", base)
    P.save_adapter(tmp_path / "b", P.adapter_from_layers(layers))
    back = load_file(str(tmp_path / "b" / P.ADAPTER_WEIGHTS))
    assert set(back) == set(t)
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
    assert json.loads((tmp_path / "b" / P.ADAPTER_CONFIG).read_text())["lora_dropout"] == 0.1
    P.save_adapter(tmp_path / "c", P.adapter_from_layers({"emb": layers["emb"]}))  # embeddings alone
    alone = P.load_adapter(tmp_path / "c")
    assert alone.modules["emb"].kind == "embedding" and alone.config.lora_dropout == 0.0
    np.testing.assert_array_equal(P.merge_state_dict(base, [alone])["emb.weight"],
                                  P.merge_state_dict(base, [tmp_path / "a"])["emb.weight"])  # fmt: skip


@pytest.mark.parametrize(
    "config, match",
    [({"lora_alpha": "16"}, r"field 'lora_alpha' must be a finite number, got '16'"),
     ({"rank_pattern": ["q", 4]}, r"field 'rank_pattern' must be an object"),
     ({"rank_pattern": {"(": 4}}, r"field 'rank_pattern': key '\(' is not a valid regex"),
     ({"alpha_pattern": {"q": "8"}}, r"field 'alpha_pattern': 'q' maps to '8'"),
     ({"rank_pattern": {"q": 2.5}}, r"field 'rank_pattern': 'q' maps to 2.5"),
     ({"use_dora": "yes"}, r"field 'use_dora' must be true or false"),
     ({"lora_dropout": "0.1"}, r"field 'lora_dropout' must be a number"),
     ({"target_modules": 5}, r"field 'target_modules' must be a list"),
     ({"modules_to_save": "score"}, r"field 'modules_to_save' must be a list"),
     ([1, 2], r"expected a JSON object of config fields, got list"),
     (None, r"expected a JSON object of config fields, got NoneType")],
)  # fmt: skip
def test_malformed_config_is_a_value_error_naming_file_and_field(tmp_path, capsys, config, match):
    """Review: these gave TypeError/AttributeError/re.error naming neither file nor field."""
    write_adapter(tmp_path / "ad", {"lin": random_module(np.random.default_rng(0), 3, 4, 2)},
                  config if isinstance(config, dict) else {})  # fmt: skip
    if not isinstance(config, dict):
        (tmp_path / "ad" / P.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"adapter_config.json: {match}"):
        P.load_adapter(tmp_path / "ad")
    save_file({"lin.weight": np.ones((3, 4))}, str(tmp_path / "base.safetensors"))
    assert merge_main([str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dora-ref merge: error: ") and err.count("\n") == 1 and "adapter_config.json" in err


@pytest.mark.parametrize(
    "index", [{"weight_map": [["a.weight", "s.safetensors"]]}, [1, 2], {"metadata": {}},
              {"weight_map": {"a.weight": 3}}, {"weight_map": {"a.weight": "../s.safetensors"}}],
)  # fmt: skip
def test_malformed_shard_index_is_a_value_error_naming_the_field(tmp_path, capsys, index):
    (tmp_path / "base").mkdir()
    save_file({"a.weight": np.ones((2, 3))}, str(tmp_path / "base" / "s.safetensors"))
    (tmp_path / "base" / S.SHARD_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{S.SHARD_INDEX}: field 'weight_map' must be an object"):
        S.BaseWeights(tmp_path / "base")
    write_adapter(tmp_path / "ad", {"a": random_module(np.random.default_rng(0), 2, 3, 2)})
    assert merge_main([str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dora-ref merge: error: ") and err.count("\n") == 1 and "weight_map" in err


# ---------------------------------------------------------------------------
# issue 10: non-finite merges, hostile configs, true messages, files changing under us
# ---------------------------------------------------------------------------


def _single_file_case(tmp_path, W0, A, B, m, name="blk.fc"):
    save_file({f"{name}.weight": W0}, str(tmp_path / "base.safetensors"))
    write_adapter(tmp_path / "ad", {name: (A, B, m)}, {"r": A.shape[0], "lora_alpha": A.shape[0]})
    return [str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), str(tmp_path / "out.safetensors"), "--no-progress"]


def test_tiny_float32_row_norm_with_unit_magnitude_is_refused_naming_module_rows_and_cause(tmp_path, capsys):
    """Issue 10 item 5: a row norm ~1e-41 made m / n = inf; the C merge returned it and the CLI wrote it."""
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((6, 8)).astype(np.float32)
    W0[[1, 4]] = np.float32(1e-42)  # subnormal rows: n ~ 4e-42, m / n ~ 2e41 > float32 max
    A, B = np.zeros((2, 8), np.float32), np.zeros((6, 2), np.float32)
    mod = P.ModuleAdapter("blk.fc", A, B, np.ones(6, np.float32), 1.0, 2, 2.0)
    for call in (lambda: P.merge_weight(W0, [mod]), lambda: P.merge_state_dict({"blk.fc.weight": W0}, [
            P.PeftAdapter(P.LoraAdapterConfig(r=2, lora_alpha=2, use_dora=True), {"blk.fc": mod})])):  # fmt: skip
        with pytest.raises(ValueError, match=r"'blk\.fc'.*not finite in 2 of 6 rows.*rows \[1, 4\].*so small that m / n overflows float32"):
            call()
    argv = _single_file_case(tmp_path, W0, A, B, np.ones(6, np.float32))
    assert merge_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'blk.fc'" in err and "rows [1, 4]" in err and "m / n overflows" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base.safetensors"]  # nothing written


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=["fp16", "bf16"])
def test_merged_values_beyond_the_stored_dtype_range_are_refused_not_warned(tmp_path, capsys, dtype):
    """Issue 10 item 5: fp16/bf16 merged values past the dtype's range gave only a RuntimeWarning."""
    big = 6e4 if dtype == np.float16 else 3.3e38
    W0 = np.full((4, 3), big, np.float32).astype(dtype)
    A, B = np.ones((1, 3), np.float32), np.zeros((4, 1), np.float32)
    B[2] = 1.2e4 if dtype == np.float16 else 1.05e37  # row 2 passes the largest finite value; float32 holds it
    mod = P.ModuleAdapter("blk.fc", A, B, None, 1.0, 1, 1.0)
    with pytest.raises(ValueError, match=rf"rows \[2\]: merged values beyond {dtype.name}'s largest finite value"):
        P.merge_weight(W0, [mod])
    assert merge_main(_single_file_case(tmp_path, W0, A, B, None)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"beyond {dtype.name}'s largest finite value" in err and "rows [2]" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_modules_to_save_tensor_beyond_fp16_range_is_refused():
    base = {"score.weight": np.zeros((2, 2), np.float16)}
    adapter = P.PeftAdapter(P.LoraAdapterConfig(), {}, {"score.weight": np.full((2, 2), 1e6, np.float32)})
    with pytest.raises(ValueError, match=r"modules_to_save tensor 'score\.weight'.*beyond float16"):
        P.merge_state_dict(base, [adapter])


@pytest.mark.parametrize(
    "key, why",
    [("(a+)+b", "a quantifier inside a repeated group"), ("(a|ab)*c", "an alternation inside a repeated group"),
     ("(a?){30}a{30}", "a quantifier inside a repeated group"), (r"(\w)\1", "a backreference"),
     ("a?a?a?a?a?aaaaa", "5 quantifiers")],
)  # fmt: skip
def test_catastrophic_backtracking_pattern_key_is_refused_naming_field_and_file(tmp_path, capsys, key, why):
    """Issue 10 item 6 (ReDoS): `(a+)+b` made load_adapter run for minutes.

    The adapter is loaded in a subprocess with a time limit, so a regression
    fails instead of hanging the suite.
    """
    name = "a" * 40  # what (a+)+b backtracks on: 2**40 ways
    write_adapter(tmp_path / "ad", {name: random_module(np.random.default_rng(0), 3, 4, 2)},
                  {"rank_pattern": {key: 2}})  # fmt: skip
    code = "import sys; from dora_ref import peft; peft.load_adapter(sys.argv[1])"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ad")], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 1 and "ValueError" in proc.stderr
    with pytest.raises(ValueError, match=rf"adapter_config.json: field 'rank_pattern': key .* has {why}"):
        P.load_adapter(tmp_path / "ad")


def test_pattern_keys_peft_writes_are_accepted_and_match_as_peft_get_pattern_key():
    peft_other = pytest.importorskip("peft.utils.other")
    keys = ["model.layers.0.self_attn.q_proj", "^model.decoder.layers.0.encoder_attn.k_proj", r".*q_proj",
            r"model\.layers\.\d+\.(q|v)_proj", "q_proj|v_proj", r"layers\.[0-3]\.mlp\..*", "lm_head$"]  # fmt: skip
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.12.self_attn.v_proj", "model.decoder.layers.0.encoder_attn.k_proj",
               "encoder.model.decoder.layers.0.encoder_attn.k_proj", "model.layers.2.mlp.up_proj", "lm_head", "xq_proj"]  # fmt: skip
    for module in modules:
        for key in keys:
            want = peft_other.get_pattern_key([key], module) == key
            assert P.pattern_matches(key, module) == want, (key, module)


def test_pattern_matching_time_budget_names_the_field_and_the_file(tmp_path, monkeypatch):
    """Keys the rules let through stay polynomial; a config that still spends too long is stopped."""
    monkeypatch.setattr(peft_config, "PATTERN_TIME_BUDGET", 0.0)
    write_adapter(tmp_path / "ad", {"blk.fc": random_module(np.random.default_rng(0), 3, 4, 2)},
                  {"alpha_pattern": {".*.*x": 3}})  # fmt: skip
    with pytest.raises(ValueError, match=r"adapter_config.json: field 'alpha_pattern': matching its keys .* took over 0 s"):
        P.load_adapter(tmp_path / "ad")


@pytest.mark.parametrize(
    "config",
    [{"lora_alpha": 10**400}, {"lora_dropout": 10**400}, {"alpha_pattern": {"fc": 10**400}},
     {"r": 10**400}, {"rank_pattern": {"fc": 10**400}}, {"lora_alpha": 123456789}],
    ids=["lora_alpha", "lora_dropout", "alpha_pattern", "r", "rank_pattern", "5000_digits"],
)  # fmt: skip
def test_integer_too_large_for_a_float_is_a_value_error_naming_field_and_file(tmp_path, capsys, config):
    """Issue 10 item 7: 10**400 gave an OverflowError naming nothing, and the CLI a traceback.

    A 5000-digit integer is beyond what Python's json reads (4300 digits):
    "not valid JSON", naming the file.
    """
    field = next(iter(config))
    write_adapter(tmp_path / "ad", {"fc": random_module(np.random.default_rng(0), 3, 4, 2)}, config)
    text = (tmp_path / "ad" / P.ADAPTER_CONFIG).read_text()
    if "123456789" in text:
        (tmp_path / "ad" / P.ADAPTER_CONFIG).write_text(text.replace("123456789", "1" + "0" * 5000))
    match = "not valid JSON" if "123456789" in text else f"field '{field}'"
    with pytest.raises(ValueError, match=rf"adapter_config.json: {match}"):
        P.load_adapter(tmp_path / "ad")
    save_file({"fc.weight": np.ones((3, 4))}, str(tmp_path / "base.safetensors"))
    assert merge_main([str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dora-ref merge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "adapter_config.json" in err and (f"'{field}'" in err or "not valid JSON" in err), (err, len(text))


def test_null_bias_is_refused_with_a_true_message(tmp_path):
    """Issue 10 item 14: `bias: null` was refused as if the adapter held trained biases.

    PEFT 0.21 cannot load it either (``bias.endswith`` on None), so it is
    refused, saying so; 'all'/'lora_only' keep the trained-bias message.
    """
    for bias, match in ((None, r"field 'bias' is null; PEFT's LoraConfig takes 'none', 'all' or 'lora_only'"),
                        ("all", r"bias='all' \(base biases trained and saved"),
                        (7, r"field 'bias' must be 'none', 'all' or 'lora_only', got 7")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            P.LoraAdapterConfig.from_dict({"bias": bias}, source="x.json")


def test_null_bias_fails_in_peft_too(tmp_path):
    """The PEFT behaviour the message states: a null bias does not load."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    write_adapter(tmp_path / "ad", {"lin": random_module(np.random.default_rng(0), 3, 4, 2, dtype=np.float32)},
                  {"bias": None, "target_modules": ["lin"]})  # fmt: skip

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'endswith'"):
        peft.PeftModel.from_pretrained(M(), str(tmp_path / "ad"))


def test_unreadable_base_file_says_why_not_no_such_file(tmp_path):
    """Issue 10 item 14: a directory, or a file without read permission, was 'No such file or directory'.

    Root reads any file, so the command runs in a subprocess that drops to
    user nobody after its imports, on files in a world-readable directory.
    """
    import shutil
    import tempfile

    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory, not a safetensors file"):
        S.SafetensorsFile(tmp_path / "dir.safetensors")
    d = Path(tempfile.mkdtemp(prefix="dora-ref-perm-"))
    try:
        os.chmod(d, 0o755)
        save_file({"a.weight": np.ones((2, 1))}, str(d / "x.safetensors"))
        os.chmod(d / "x.safetensors", 0)
        write_adapter(d / "ad", {"a": random_module(np.random.default_rng(0), 2, 1, 1)})
        code = ("import os, sys\nfrom dora_ref.formats.merge_cli import main\nimport tqdm.auto\n"
                "if os.geteuid() == 0: os.setgid(65534); os.setuid(65534)\nsys.exit(main(sys.argv[1:]))")  # fmt: skip
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run([sys.executable, "-c", code, str(d / "x.safetensors"), str(d / "ad"), str(d / "o.safetensors"),
                               "--no-progress"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    finally:
        shutil.rmtree(d)
    assert proc.returncode == 1 and "Permission denied" in proc.stderr and "No such file" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1


def test_file_truncated_after_it_was_opened_is_a_value_error_not_sigbus(tmp_path):
    """Issue 10: a safetensors file truncated after open killed the process (SIGBUS, memory-mapped reads).

    dora_ref reads with pread (no memory map) and compares the size and
    modification time with those seen at open before every read and copy.
    """
    path = tmp_path / "x.safetensors"
    save_file({"a": np.arange(4096.0), "b": np.ones((64, 64), np.float32)}, str(path))
    f = S.SafetensorsFile(path)
    np.testing.assert_array_equal(f.get("a"), np.arange(4096.0))
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(ValueError, match="changed while it was being read"):
        f.get("b")
    with pytest.raises(ValueError, match="changed while it was being read"):
        f.read_bits("b")
    w = S.SafetensorsWriter(tmp_path / "y.safetensors", [("b", np.float32, (64, 64))])
    with pytest.raises(ValueError, match="changed while it was being read"):
        w.copy("b", f)
    w.abort()


def test_reader_stops_at_a_short_read_even_if_the_size_check_passed(tmp_path, monkeypatch):
    """The second line of defence: a read that comes back short is an error naming the tensor."""
    path = tmp_path / "x.safetensors"
    save_file({"a": np.arange(16.0)}, str(path))
    f = S.SafetensorsFile(path)
    os.truncate(path, path.stat().st_size - 8)
    monkeypatch.setattr(f, "check_unchanged", lambda: None)
    with pytest.raises(ValueError, match=r"tensor 'a' is truncated"):
        f.get("a")


def _round_once(x, bits, emin):
    """float64 -> nearest binary float with ``bits`` significant bits, ties to even.

    ``emin``: the frexp exponent of the smallest normal number (below it,
    subnormals keep fewer bits). Independent of NumPy's and ml_dtypes'
    casts: frexp, then Python's round() (exact, ties to even) on the scaled
    significand. No overflow handling: the values tested are in range.
    """
    out = np.empty_like(x)
    for i, v in enumerate(x.ravel()):
        mant, exp = np.frexp(v)
        keep = bits - max(0, emin - int(exp))
        out.flat[i] = np.ldexp(round(mant * 2.0**keep), int(exp) - keep)
    return out


@pytest.mark.parametrize("dtype, bits, emin", [(BF16, 8, -125), (np.dtype(np.float16), 11, -13)], ids=["bf16", "fp16"])
def test_merged_low_precision_values_are_the_float32_merge_rounded_once_to_nearest_even(
    tmp_path, dtype, bits, emin, monkeypatch
):
    """The rule: every stored value is the float32 merge rounded once, ties to even (no double rounding).

    Checked on 4096 values of the command's block-wise path (small blocks, so
    several) against an independent rounding (frexp + round()) of its own
    float32 result, and against a float64 merge rounded once: the two may
    differ only where the float64 value lies within the float32 computation's
    error bound of a tie between two neighbours. That bound: V = W0 + s B A
    and the norm in float32 each carry at most (in + r + 4) * 2**-24 relative
    to |W0| + s |B||A|, and the scale m / n adds as much.
    """
    from dora_ref.formats import merge_cli

    monkeypatch.setattr(merge_cli, "_BLOCK_ELEMENTS", 1000)  # several blocks
    rng = np.random.default_rng(3)
    out_f, in_f, r = 64, 64, 4
    W0 = rng.standard_normal((out_f, in_f)).astype(dtype)
    A, B, m = random_module(rng, out_f, in_f, r, dtype=np.float32)
    if dtype == BF16:  # written by safetensors' torch API, independent of dora_ref's writer
        torch = pytest.importorskip("torch")
        from safetensors.torch import save_file as save_torch

        save_torch({"w": torch.from_numpy(W0.view(np.int16)).view(torch.bfloat16)}, str(tmp_path / "base.safetensors"))
    else:
        save_file({"w": W0}, str(tmp_path / "base.safetensors"))
    f = S.SafetensorsFile(tmp_path / "base.safetensors")
    mod = P.ModuleAdapter("w", A, B, m, 0.5, r, 2.0)
    got, is_bits = merge_cli.merge_tensor(f, "w", [mod], False)
    got = got.view(dtype) if is_bits else got
    np.testing.assert_array_equal(got.view(np.uint16), P.merge_weight(W0, [mod]).view(np.uint16))  # whole = blocks
    f32 = P.merge_view(W0.astype(np.float32), [mod]).astype(np.float64)
    np.testing.assert_array_equal(got.astype(np.float64), _round_once(f32, bits, emin))
    exact = dense_merge(W0.astype(np.float64), A.astype(np.float64), B.astype(np.float64), m.astype(np.float64), 0.5)
    once = _round_once(exact, bits, emin)
    differ = got.astype(np.float64) != once
    scale = np.abs(W0.astype(np.float64)) + 0.5 * np.abs(B) @ np.abs(A)
    g = np.abs(exact).max(axis=1, keepdims=True) / np.abs(W0.astype(np.float64) + 0.5 * B @ A).max(axis=1, keepdims=True)
    tol = 2 * (in_f + r + 4) * 2.0**-24 * g * scale
    tie = (got.astype(np.float64) + once) / 2
    assert np.all(np.abs(exact - tie)[differ] <= tol[differ])
    assert differ.mean() < 0.01, differ.sum()


@pytest.mark.parametrize("threads", [1, 3])
def test_bf16_rounding_of_float32_bits_is_round_to_nearest_even_on_every_class(threads, monkeypatch):
    """float32_to_bfloat16_bits against ml_dtypes' cast: random bit patterns, ties, the largest values, NaN, inf.

    With one thread and with three (the parts split at chunk boundaries), whatever the machine's load.
    """
    monkeypatch.setattr(bf16_bits, "_idle_cores", lambda: threads)
    rng = np.random.default_rng(0)
    u = rng.integers(0, 2**32, size=1_000_003, dtype=np.uint64).astype(np.uint32)  # > 8 chunks: threaded
    specials = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00008000,
                         0x00018000, 0x3F808000, 0x3F818000, 0xBF808000], np.uint32)  # fmt: skip
    x = np.concatenate([u, specials]).view(np.float32)
    got = bf16_bits.float32_to_bfloat16_bits(x)
    nan = np.isnan(x)
    with np.errstate(invalid="ignore"):
        want = x.astype(BF16).view(np.uint16)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(BF16).astype(np.float32)).all()  # NaN stays NaN (never inf or -0)
    assert np.array_equal(got[nan] >> 15, x[nan].view(np.uint32) >> 31)
    np.testing.assert_array_equal(bf16_bits.bfloat16_bits_to_float32(want[~nan]), want[~nan].view(BF16).astype(np.float32))
    finite = x[np.isfinite(x) & (np.abs(x) < 3.38e38)]
    assert bf16_bits.float32_to_bfloat16_bits(finite, report_non_finite=True)[1] is False
    for bad in (np.inf, np.nan, np.float32(3.3962e38)):  # the last rounds up to inf
        assert bf16_bits.float32_to_bfloat16_bits(np.append(finite, np.float32(bad)), report_non_finite=True)[1] is True


@pytest.mark.parametrize("dtype", [None, BF16, np.dtype(np.float16)], ids=["f64", "bf16", "fp16"])
def test_merge_command_output_equals_merge_state_dict_bit_for_bit_and_copies_the_rest(tmp_path, dtype, monkeypatch):
    """The streaming command (blocks of rows, bits for bf16, byte copies) and the in-memory API agree exactly."""
    from dora_ref.formats import merge_cli

    monkeypatch.setattr(merge_cli, "_BLOCK_ELEMENTS", 10)
    _toy_checkpoint(tmp_path, dtype)
    assert merge_main([str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "out"), "--no-progress"]) == 0
    want = P.merge_state_dict(tmp_path / "base", [tmp_path / "ad"])
    base = S.BaseWeights(tmp_path / "base")
    out = S.BaseWeights(tmp_path / "out")
    for key in base.keys():
        if key in want:
            assert out.get(key).tobytes() == want[key].tobytes()
        else:
            f, g = base.handle(base.weight_map[key]), out.handle(out.weight_map[key])
            (o1, n1), (o2, n2) = f.byte_range(key), g.byte_range(key)
            raw1, raw2 = f.path.read_bytes()[o1 : o1 + n1], g.path.read_bytes()[o2 : o2 + n2]
            assert raw1 == raw2


def test_merge_command_force_replaces_out_as_a_whole_and_only_a_model_directory(tmp_path, capsys):
    _toy_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale-00009.safetensors").write_bytes(b"old shard")
    args = [str(tmp_path / "base"), str(tmp_path / "ad"), str(out), "--no-progress", "--force"]
    assert merge_main(args) == 0
    assert not (out / "stale-00009.safetensors").exists()  # not mixed into the new model
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert merge_main(args[:2] + [str(notes)] + args[3:]) == 1
    assert "holds no safetensors model" in capsys.readouterr().err and (notes / "todo.txt").exists()


def test_adapter_config_that_is_a_directory_is_not_reported_missing(tmp_path):
    """Issue 10 item 14, for adapters: the OS's reason, not 'no adapter_config.json'."""
    write_adapter(tmp_path / "ad", {"fc": random_module(np.random.default_rng(0), 3, 4, 2)})
    (tmp_path / "ad" / P.ADAPTER_CONFIG).unlink()
    (tmp_path / "ad" / P.ADAPTER_CONFIG).mkdir()
    with pytest.raises(IsADirectoryError):
        P.load_adapter(tmp_path / "ad")
    (tmp_path / "ad" / P.ADAPTER_CONFIG).rmdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        P.load_adapter(tmp_path / "ad")


def test_merge_command_interrupted_leaves_out_unchanged_and_says_so(tmp_path, capsys, monkeypatch):
    from dora_ref.formats import merge_cli

    _toy_checkpoint(tmp_path)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_cli, "merge_tensor", interrupt)
    assert merge_main([str(tmp_path / "base"), str(tmp_path / "ad"), str(tmp_path / "out"), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base"]  # no OUT, no temporary output


def test_dora_ref_command_with_a_missing_optional_dependency_prints_one_line(capsys, monkeypatch):
    from dora_ref import cli

    monkeypatch.setitem(cli.COMMANDS, "merge", ("dora_ref._no_such_module", "merge"))
    assert cli.main(["merge", "a", "b", "c"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dora-ref merge: error: No module named") and err.count("\n") == 1


def test_nan_with_a_payload_near_all_ones_is_reported_when_rounded_to_bf16():
    """Review finding: the non-finite report looked at the rounded value before NaNs were
    redone, and a NaN whose payload is near all ones wraps that value to 0, so 0x7FFFFFFF
    and 0xFFFF8001 went through a merge unreported."""
    for bits in (0x7FFFFFFF, 0xFFFF8001, 0x7FC00000):
        x = np.array([1.0, bits], dtype=np.uint32)
        x[0] = np.float32(1.0).view(np.uint32)
        out, bad = bf16_bits.float32_to_bfloat16_bits(x.view(np.float32), report_non_finite=True)
        assert bad is True, hex(bits)
        assert np.isnan(out[1:].view(BF16).astype(np.float32)).all()


@pytest.mark.parametrize("r, alpha, rslora", [(1, 1, False), (8, 16, False), (8, 16, True), (3, 0.5, True), (16, 7, False)])
def test_config_scaling_is_lora_scaling(tmp_path, r, alpha, rslora):
    """The adapter config computes PEFT's scaling itself (so that reading an adapter imports no layer,
    for the merge command's start): it must be ``dora_ref.layers.lora_scaling``, bit for bit, and refuse
    what it refuses."""
    from dora_ref.formats.peft.config import _lora_scaling
    from dora_ref.layers import lora_scaling

    write_adapter(tmp_path / "ad", {"fc": random_module(np.random.default_rng(0), 3, 4, r)},
                  {"r": r, "lora_alpha": alpha, "use_rslora": rslora})
    assert P.load_adapter(tmp_path / "ad").modules["fc"].scaling == lora_scaling(r, alpha, rslora)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="r must be a positive integer") as ours:
            _lora_scaling(bad, alpha, rslora)
        with pytest.raises(ValueError) as theirs:
            lora_scaling(bad, alpha, rslora)
        assert str(ours.value) == str(theirs.value)
    for bad in (float("nan"), "2"):
        with pytest.raises((TypeError, ValueError)) as ours:
            _lora_scaling(r, bad, rslora)
        with pytest.raises((TypeError, ValueError)) as theirs:
            lora_scaling(r, bad, rslora)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
