"""The fast paths of ``dora-ref merge``: reused buffers, byte copies, threaded conversions, no ml_dtypes.

Each fast path is checked against a slower independent one: the merged bits
against ``dora_ref.formats.peft.merge_weight`` (whole-tensor NumPy/ml_dtypes
casts, new arrays) and a float64 merge; the conversions against NumPy's and
ml_dtypes' casts; the byte copies against the base file's bytes.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from peft_helpers import dense_merge, random_module, write_adapter

from dora_ref import peft as P
from dora_ref.formats import bf16_bits
from dora_ref.formats import merge_cli
from dora_ref.formats import safetensors_io as S

BF16 = np.dtype(ml_dtypes.bfloat16)
# (out, in) of the merged weights, in file order: large, small, larger, small again, so that every
# buffer is reused both grown and shrunk; "emb" and "norm" are never touched by the adapter
SHAPES = {"q": (48, 40), "k": (8, 40), "up": (96, 40), "down": (40, 24)}


def _write_base(path, dtype, rng):
    """A base file with four merged weights and two untouched tensors, written with bits (no dora_ref cast)."""
    tensors = {"emb.weight": rng.standard_normal((30, 40))}
    tensors.update({f"{name}.weight": rng.standard_normal(shape) for name, shape in SHAPES.items()})
    tensors["norm.weight"] = rng.standard_normal(40)
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    st = "BF16" if dtype == BF16 else S._safetensors_dtype(dtype)
    w = S.SafetensorsWriter(path, [(k, st, v.shape) for k, v in tensors.items()])
    for k, v in tensors.items():
        w.write(k, v.view(S._BITS[v.itemsize]), bits=True)
    w.close()
    return tensors


@pytest.mark.parametrize("block", [10**9, 500], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32)], ids=["bf16", "fp16", "f32"])
def test_merge_with_reused_buffers_equals_the_in_memory_merge_bit_for_bit(tmp_path, monkeypatch, dtype, block):
    """Buffers grown and shrunk from tensor to tensor leave no stale value: every merged tensor equals
    ``merge_weight`` (new arrays, whole-tensor casts), and is within the float32 merge's error of the
    float64 merge; untouched tensors are the base's bytes, and never read as values."""
    monkeypatch.setattr(merge_cli, "_BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(11)
    base = _write_base(tmp_path / "base.safetensors", dtype, rng)
    mods = {name: random_module(rng, *shape, 4, dtype=np.float32) for name, shape in SHAPES.items()}
    write_adapter(tmp_path / "ad", mods, {"lora_alpha": 8, "r": 4})
    read = []
    original_read = S.SafetensorsFile._read

    def spy(self, key, *args, **kwargs):
        read.append((self.path.name, key))
        return original_read(self, key, *args, **kwargs)

    monkeypatch.setattr(S.SafetensorsFile, "_read", spy)
    out = tmp_path / "out.safetensors"
    assert merge_cli.main([str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), str(out), "--no-progress"]) == 0
    assert sorted(k for f, k in read if f == "base.safetensors") == sorted(f"{n}.weight" for n in SHAPES)
    monkeypatch.setattr(S.SafetensorsFile, "_read", original_read)
    adapter = P.load_adapter(tmp_path / "ad")
    got_file, base_file = S.SafetensorsFile(out), S.SafetensorsFile(tmp_path / "base.safetensors")
    for key, W0 in base.items():
        got = got_file.read_bits(key).view(dtype)
        name = key.removesuffix(".weight")
        if name not in SHAPES:
            o1, n1 = base_file.byte_range(key)
            o2, n2 = got_file.byte_range(key)
            assert out.read_bytes()[o2 : o2 + n2] == (tmp_path / "base.safetensors").read_bytes()[o1 : o1 + n1]
            continue
        want = P.merge_weight(W0, [adapter.modules[name]])
        np.testing.assert_array_equal(got.view(S._BITS[dtype.itemsize]), want.view(S._BITS[dtype.itemsize]))
        A, B, m = mods[name]
        exact = dense_merge(W0.astype(np.float64), A, B, m, 2.0)
        # rounding to the stored dtype (half an ulp: 2**-8 bf16, 2**-11 fp16, 2**-24 f32, relative) plus the
        # float32 arithmetic, (in + r + 4) u_32 relative to the row's scale, times m / n <= 2 here
        ulp_half = {2: 2.0**-8 if dtype == BF16 else 2.0**-11, 4: 2.0**-24}[dtype.itemsize]
        scale = np.abs(exact).max(axis=1, keepdims=True)
        tol = ulp_half * np.abs(exact) + 2 * (W0.shape[1] + 4 + 4) * 2.0**-24 * scale
        assert np.all(np.abs(got.astype(np.float64) - exact) <= tol)


def test_buffers_take_views_of_one_flat_buffer_per_role_grown_to_the_largest():
    buffers = merge_cli._Buffers()
    a = buffers.take("wide", (4, 8), np.float32)
    b = buffers.take("wide", (2, 8), np.float32)
    assert np.shares_memory(a, b) and a.flags.c_contiguous and b.shape == (2, 8)
    c = buffers.take("wide", (16, 8), np.float64)  # grown: a new buffer, the old one dropped
    assert not np.shares_memory(a, c) and c.dtype == np.float64
    assert not np.shares_memory(c, buffers.take("merged", (16, 8), np.float64))
    assert len(buffers._flat) == 2 and buffers._flat["wide"].nbytes == 16 * 8 * 8


def test_merge_of_a_bf16_model_never_imports_ml_dtypes(tmp_path):
    """Issue 11: ``ml_dtypes`` (a second to import) only when a tensor needs it; bf16 is handled as bits."""
    rng = np.random.default_rng(0)
    _write_base(tmp_path / "base.safetensors", BF16, rng)
    write_adapter(tmp_path / "ad", {"q": random_module(rng, *SHAPES["q"], 4, dtype=np.float32)}, {"r": 4})
    code = textwrap.dedent(f"""
        import sys
        from dora_ref.formats.merge_cli import main
        assert main([{str(tmp_path / 'base.safetensors')!r}, {str(tmp_path / 'ad')!r},
                     {str(tmp_path / 'out.safetensors')!r}, "--no-progress"]) == 0
        print("ml_dtypes" in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("threads", [1, 3])
def test_float16_conversions_are_numpy_casts_and_report_what_rounds_to_inf(threads, monkeypatch):
    """float32_to_float16 / float16_to_float32 in parallel parts equal NumPy's casts on random bit patterns;
    the report flags exactly inf, NaN, and values from 65520 up (halfway past 65504: a tie to even, inf)."""
    monkeypatch.setattr(bf16_bits, "_idle_cores", lambda: threads)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, size=1_000_003, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16)
    got = bf16_bits.float32_to_float16(x)
    same = (got.view(np.uint16) == want.view(np.uint16)) | (np.isnan(got) & np.isnan(want))
    assert same.all()
    h = rng.integers(0, 2**16, size=700_001, dtype=np.uint32).astype(np.uint16).view(np.float16)
    wide = bf16_bits.float16_to_float32(h)
    assert ((wide.view(np.uint32) == h.astype(np.float32).view(np.uint32)) | np.isnan(h)).all()
    finite = rng.uniform(-65519.99, 65519.99, size=600_000).astype(np.float32)
    assert bf16_bits.float32_to_float16(finite, report_non_finite=True)[1] is False
    below = np.nextafter(np.float32(65520), np.float32(0))
    assert bf16_bits.float32_to_float16(np.append(finite, -below), report_non_finite=True)[1] is False
    for bad in (np.float32(65520), np.float32(-65520), np.inf, np.nan):
        assert bf16_bits.float32_to_float16(np.append(finite, np.float32(bad)), report_non_finite=True)[1] is True


def test_conversions_and_reads_into_a_wrong_buffer_raise_naming_it(tmp_path):
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"float32_to_bfloat16_bits: out must be .*uint16 .*\(4, 3\)"):
        bf16_bits.float32_to_bfloat16_bits(x, out=np.empty((3, 4), np.uint16))
    with pytest.raises(ValueError, match="bfloat16_bits_to_float32: out must be"):
        bf16_bits.bfloat16_bits_to_float32(np.zeros(5, np.uint16), out=np.empty(5, np.float64))
    with pytest.raises(ValueError, match="float32_to_float16: out must be"):
        bf16_bits.float32_to_float16(x, out=np.empty((4, 6), np.float16)[:, ::2])
    path = tmp_path / "x.safetensors"
    w = S.SafetensorsWriter(path, [("a", "BF16", (4, 3))])
    w.write("a", np.zeros((4, 3), np.uint16), bits=True)
    w.close()
    f = S.SafetensorsFile(path)
    with pytest.raises(ValueError, match=r"tensor 'a' is uint16 \(4, 3\); out must be"):
        f.read_bits("a", out=np.empty((4, 3), np.int16))
    buf = np.full((4, 3), 7, np.uint16)
    assert f.read_bits("a", out=buf) is buf and not buf.any()


def test_writer_starts_writeback_of_each_tensor_exactly_where_it_lies(tmp_path, monkeypatch):
    """The early-writeback hint covers every tensor's byte range, in order, and nothing else
    (the header is flushed by the fsync of close); the file is the same with and without it."""
    calls = []
    monkeypatch.setattr(S, "_start_writeback", lambda fd, offset, nbytes: calls.append((offset, nbytes)))
    specs = [("a", np.float32, (3, 5)), ("b", np.float16, (7,)), ("c", np.float64, (2, 2))]
    arrays = [np.arange(15, dtype=np.float32).reshape(3, 5), np.arange(7, dtype=np.float16), np.eye(2)]
    for name, hint in (("with.safetensors", True), ("without.safetensors", False)):
        if not hint:
            monkeypatch.setattr(S, "_start_writeback", None)
        w = S.SafetensorsWriter(tmp_path / name, specs)
        for (key, _, _), a in zip(specs, arrays):
            w.write(key, a)
        w.close()
    assert (tmp_path / "with.safetensors").read_bytes() == (tmp_path / "without.safetensors").read_bytes()
    f = S.SafetensorsFile(tmp_path / "with.safetensors")
    assert calls == [f.byte_range(k) for k, _, _ in specs]
