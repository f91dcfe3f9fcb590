"""Fuzzing the file formats: the safetensors reader and the adapter config.

What each test asserts, for every generated input:

* ``test_reader_on_malformed_files``: ``SafetensorsFile`` either refuses the
  file with a ``ValueError`` (its documented error for an invalid file), or
  opens it; then the ``safetensors`` package opens it too and agrees on the
  keys, dtypes and shapes, and every tensor read returns exactly the bytes
  at its offsets in the file. A file the ``safetensors`` package opens is
  opened by us too, except for the documented difference: a header with a
  duplicate key (which we refuse). Never another exception, never a crash.
* ``test_config_from_dict_on_json_values_of_every_type``: ``from_dict``
  either returns a config whose math fields have the documented types and
  ranges (and which survives ``to_dict`` -> ``from_dict``), or raises a
  ``ValueError`` whose message names the source; never another exception.
  Scaling lookups on the accepted config return finite floats.

The counts of inputs tried (and refused) are printed (``pytest -s``);
``DORA_REF_FUZZ_EXAMPLES=N`` runs N inputs per test instead of 400/600.
"""
import json
import math
import os
import struct
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dora_ref import peft as P
from dora_ref.formats import safetensors_io as S

COUNTS = Counter()
EXAMPLES = os.environ.get("DORA_REF_FUZZ_EXAMPLES")

DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}


@pytest.fixture(autouse=True)
def backend():
    """File formats do not depend on the kernels' backend: one run."""
    yield None


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\nfuzz inputs: {dict(COUNTS)}")


# ---------------------------------------------------------------------------
# the safetensors reader
# ---------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=5)
junk = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@st.composite
def safetensors_files(draw):
    """Bytes of a safetensors file: valid, or broken in one or more of the ways a file can be."""
    n_tensors = draw(st.integers(0, 4))
    header, offset, data = {}, 0, b""
    for i in range(n_tensors):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * DTYPES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        data += draw(st.binary(min_size=nbytes, max_size=nbytes))
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.just({"format": "pt"}) | st.dictionaries(st.text(max_size=3), json_scalars, max_size=2) | json_scalars)
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(0, 2))):  # mutations of the header
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "whole", "extra"]))
        if not isinstance(header[key], dict):
            continue
        if field == "drop":
            header[key].pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif field == "whole":
            header[key] = draw(junk)
        elif field == "extra":
            header[key]["extra"] = draw(junk)
        elif field == "dtype":
            header[key]["dtype"] = draw(st.sampled_from(["f32", "Q7", "", "F32 "]) | json_scalars)
        elif field == "shape":
            header[key]["shape"] = draw(st.lists(st.integers(-2, 2**40) | json_scalars, max_size=3) | junk)
        else:
            header[key]["data_offsets"] = draw(st.lists(st.integers(-3, offset + 3), min_size=0, max_size=3) | junk)
    raw = json.dumps(header).encode()
    if draw(st.integers(0, 9)) == 0 and len(keys) >= 2:  # a duplicate key, written by hand
        raw = raw.replace(f'"{keys[1]}"'.encode(), f'"{keys[0]}"'.encode(), 1)
    raw = draw(st.sampled_from([b"", b" ", b"  \n"])) + raw if draw(st.integers(0, 9)) == 0 else raw
    raw += b" " * draw(st.integers(0, 7))
    n = len(raw)
    how = draw(st.sampled_from(["ok"] * 4 + ["length", "cut", "extend", "garbage"]))
    if how == "length":
        n = draw(st.sampled_from([0, 1, n - 1, n + 1, 2**63, 2**64 - 1, 200_000_000]))
    blob = struct.pack("<Q", n) + raw + data
    if how == "cut":
        blob = blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
    elif how == "extend":
        blob += draw(st.binary(min_size=1, max_size=9))
    elif how == "garbage":
        blob = draw(st.binary(max_size=64))
    return blob


def _theirs(path):
    """What the safetensors package makes of the file: None if it refuses it, else {key: (dtype, shape)}."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, ValueError, OSError):
        return None


@settings(max_examples=int(EXAMPLES or 400), suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(blob=safetensors_files())
def test_reader_on_malformed_files(tmp_path, blob):
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    COUNTS["reader inputs"] += 1
    theirs = _theirs(path)
    try:
        f = S.SafetensorsFile(path)
    except ValueError as e:
        COUNTS["reader refused"] += 1
        assert str(path) in str(e)
        if theirs is not None:  # the one documented difference: duplicate keys
            assert "duplicate key" in str(e), (str(e), theirs)
            COUNTS["reader refused, safetensors accepted (duplicate key)"] += 1
        return
    with f:
        assert theirs is not None, "we accepted a file the safetensors package refuses"
        ours = {k: (f.st_dtype(k), f.shape(k)) for k in f.keys()}
        assert ours == theirs
        (n,) = struct.unpack("<Q", blob[:8])
        start = 8 + n
        header = json.loads(blob[8:start])
        for key in f.keys():
            begin, end = header[key]["data_offsets"]
            assert f.read_bits(key).tobytes() == blob[start + begin : start + end]
            got = f.get(key)
            assert got.shape == f.shape(key) and got.dtype == S._numpy_dtype(f.st_dtype(key))
            assert got.tobytes() == blob[start + begin : start + end]
    COUNTS["reader accepted"] += 1


@pytest.mark.parametrize("extra", ["Infinity", "-Infinity", "NaN", "1e999", "-1e999"])
def test_reader_refuses_non_json_numbers_in_the_header_as_safetensors_does(tmp_path, extra):
    # found by the fuzz test above: Python's json reads NaN/Infinity and turns 1e999
    # into inf; JSON has no such numbers and the safetensors package refuses the file
    header = ('{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": %s}}' % extra).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert _theirs(path) is None
    with pytest.raises(ValueError, match="not valid JSON") as e:
        S.SafetensorsFile(path)
    assert str(path) in str(e.value)
    ok = header.replace(extra.encode(), b"1.5")  # a field both ignore, with a finite number: fine for both
    path.write_bytes(struct.pack("<Q", len(ok)) + ok + b"\0" * 4)
    assert _theirs(path) == {"t": ("F32", (1,))}
    with S.SafetensorsFile(path) as f:
        assert f.shape("t") == (1,)


# ---------------------------------------------------------------------------
# the adapter config
# ---------------------------------------------------------------------------

FIELDS = ["r", "lora_alpha", "use_dora", "use_rslora", "lora_dropout", "fan_in_fan_out", "target_modules",
          "rank_pattern", "alpha_pattern", "peft_type", "bias", "lora_bias", "modules_to_save",
          "init_lora_weights", "use_qalora", "layer_replication"]  # fmt: skip
numbers = (st.integers(-3, 40) | st.integers(-(10**500), 10**500) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0.0, 0.5, 1.0, 8, 16, 2**31, 2**31 - 1]))  # fmt: skip
keys = st.sampled_from(["q_proj", r".*v_proj", "(a+)+b", "(", "layers\\.\\d+\\.fc", "^x", "a?b?c?d?"]) | st.text(max_size=6)
values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=6) | st.sampled_from(["none", "all", "LORA", "pissa", "q_proj"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
configs = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), values, max_size=6) | values


@settings(max_examples=int(EXAMPLES or 600), suppress_health_check=[HealthCheck.too_slow])
@given(d=configs)
def test_config_from_dict_on_json_values_of_every_type(d):
    COUNTS["config inputs"] += 1
    try:
        cfg = P.LoraAdapterConfig.from_dict(d, source="fuzz.json")
    except ValueError as e:
        COUNTS["config refused"] += 1
        assert str(e).startswith("fuzz.json: ")
        return
    except UserWarning:  # pragma: no cover  (warnings are not errors here)
        raise
    COUNTS["config accepted"] += 1
    assert type(cfg.r) is int and 0 < cfg.r < 2**31
    assert math.isfinite(float(cfg.lora_alpha)) and 0.0 <= cfg.lora_dropout < 1.0
    assert all(type(v) is int and v > 0 for v in cfg.rank_pattern.values())
    assert all(math.isfinite(float(v)) for v in cfg.alpha_pattern.values())
    for module in ("model.layers.0.self_attn.q_proj", "fc", "ab"):
        s = cfg.scaling(module)
        assert isinstance(s, float) and math.isfinite(s), s
    again = P.LoraAdapterConfig.from_dict(cfg.to_dict(), source="again.json")
    for name in P.LoraAdapterConfig._FIELDS:
        assert getattr(again, name) == getattr(cfg, name)


def test_fuzz_reader_agrees_on_a_valid_file_of_every_dtype(tmp_path):
    """A plumbing check of the fuzz harness itself: a valid file of every dtype is accepted by both readers."""
    from safetensors.numpy import save_file

    arrays = {f"t{i}": np.arange(6).astype(dt).reshape(2, 3) for i, dt in enumerate([np.float64, np.float32, np.float16, np.int8, np.uint8, np.bool_])}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    with S.SafetensorsFile(tmp_path / "x.safetensors") as f:
        for k, a in arrays.items():
            np.testing.assert_array_equal(f.get(k), a)
    assert _theirs(tmp_path / "x.safetensors") is not None
