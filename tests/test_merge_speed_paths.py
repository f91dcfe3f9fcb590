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
    """Buffered writes (direct=False): the early-writeback hint covers every tensor's byte range,
    in order, and nothing else (the header is flushed by the fsync of close); the file is the
    same with and without it."""
    calls = []
    monkeypatch.setattr(S, "_start_writeback", lambda fd, offset, nbytes: calls.append((offset, nbytes)))
    specs = [("a", np.float32, (3, 5)), ("b", np.float16, (7,)), ("c", np.float64, (2, 2))]
    arrays = [np.arange(15, dtype=np.float32).reshape(3, 5), np.arange(7, dtype=np.float16), np.eye(2)]
    for name, hint in (("with.safetensors", True), ("without.safetensors", False)):
        if not hint:
            monkeypatch.setattr(S, "_start_writeback", None)
        w = S.SafetensorsWriter(tmp_path / name, specs, direct=False)
        for (key, _, _), a in zip(specs, arrays):
            w.write(key, a)
        w.close()
    assert (tmp_path / "with.safetensors").read_bytes() == (tmp_path / "without.safetensors").read_bytes()
    f = S.SafetensorsFile(tmp_path / "with.safetensors")
    assert calls == [f.byte_range(k) for k, _, _ in specs]


# ---------------------------------------------------------------------------
# the fused 16-bit merge: stored bits in, rounded bits out, one C call
# ---------------------------------------------------------------------------

_LP = {"bf16": (BF16, "BF16", 8, float.fromhex("0x1.fep127")), "fp16": (np.dtype(np.float16), "F16", 11, 65504.0)}


def _crafted_rows(lp, rng, in_f):
    """(W0 rows, B rows, m) whose merged float32 values hit the rounding's hard cases exactly.

    A row with W0 = e_j (one 1.0) and a zero lora_B row has V = e_j, n = 1 and
    W' = m e_j exactly: so m is the value rounded. m: ties between two
    neighbours (to even: down and up), one ulp past a tie, subnormal ties and
    halfway-to-the-smallest-subnormal, the largest finite value and values
    just below it, negative ones. Then rows of subnormal W0 values and rows
    of large W0 values (|W'| near the largest) with random adapters.
    """
    dtype, _, p, largest = _LP[lp]
    one_ulp = 2.0 ** (1 - p)  # at 1.0
    tiny = float(np.finfo(np.float32).smallest_subnormal) if lp == "bf16" else 2.0**-24  # smallest subnormal
    ties = [1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2), -(1 + 3 * one_ulp / 2),
            2.0**10 * (1 + one_ulp / 2), 2.0**-10 * (1 + 3 * one_ulp / 2), 1 + one_ulp / 2 + 2.0**-20,
            tiny * (2**16 if lp == "bf16" else 1) * 1.5, tiny * (2**16 if lp == "bf16" else 1) * 0.5,
            tiny * (2**16 if lp == "bf16" else 1) * 2.5, largest, -largest, largest * (1 - 2.0**-p), 1.0]
    if lp == "fp16":
        ties += [65504.0 - 8, 2.0**-14 * (1 + one_ulp / 2), 2.0**-24 * 0.75]
    W_rows, B_rows, m = [], [], []
    for i, v in enumerate(ties):
        w = np.zeros(in_f)
        w[i % in_f] = 1.0
        W_rows.append(w)
        B_rows.append(0.0)
        m.append(v)
    sub = float(np.finfo(np.float32).tiny) if lp == "bf16" else 2.0**-14  # the smallest normal
    for scale in (sub / 4, sub * 3, largest / 64):
        W_rows += list(scale * rng.standard_normal((3, in_f)))
        B_rows += [1.0] * 3
        m += list(np.sqrt(in_f) * scale * (1 + 0.1 * rng.standard_normal(3)))
    return np.array(W_rows), np.array(B_rows), np.array(m, np.float32)


@pytest.mark.parametrize("block", [10**9, 300], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("lp", ["bf16", "fp16"])
def test_fused_16_bit_merge_is_merge_weight_bit_for_bit_on_ties_subnormals_and_near_the_largest(
        tmp_path, monkeypatch, lp, block):
    """Issue 11: the command's bf16/fp16 output, now one C call per block (stored bits in, rounded bits
    out), is bitwise ``merge_weight``'s (the float32 merge of the widened weight, then ml_dtypes' or
    NumPy's whole-tensor cast) on random weights, a convolution kernel, and rows whose merged values
    are exact ties of the format, subnormals and the largest finite values; and the fused path, not
    the fallback, made every tensor."""
    from dora_ref.core import backend

    dtype, st, _, _ = _LP[lp]
    monkeypatch.setattr(merge_cli, "_BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(21)
    W_rows, B_zero, m_crafted = _crafted_rows(lp, rng, 24)
    weights = {"crafted": W_rows, "q": rng.standard_normal((40, 24)), "conv": rng.standard_normal((6, 3, 3, 3))}
    mods = {"q": random_module(rng, 40, 24, 4, dtype=np.float32)}
    A, B, _ = random_module(rng, len(W_rows), 24, 4, dtype=np.float32)
    mods["crafted"] = (A, (B * B_zero[:, None]).astype(np.float32), m_crafted)
    A, B, m = random_module(rng, 6, 27, 4, dtype=np.float32)
    mods["conv"] = (A.reshape(4, 3, 3, 3), B.reshape(6, 4, 1, 1), m.reshape(1, 6, 1, 1))
    with np.errstate(over="ignore"):
        stored = {f"{k}.weight": v.astype(dtype) for k, v in weights.items()}
    w = S.SafetensorsWriter(tmp_path / "base.safetensors", [(k, st, v.shape) for k, v in stored.items()])
    for k, v in stored.items():
        w.write(k, v.view(np.uint16), bits=True)
    w.close()
    write_adapter(tmp_path / "ad", mods, {"lora_alpha": 8, "r": 4})
    fused = []
    real = merge_cli._fused_merge
    monkeypatch.setattr(merge_cli, "_fused_merge", lambda *a: fused.append(real(*a)) or fused[-1])
    out = tmp_path / "out.safetensors"
    assert merge_cli.main([str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), str(out), "--no-progress"]) == 0
    # with the C backend every block took the C call; with NumPy's, none (the general path)
    assert (fused and all(fused)) if backend.backend() == "c" else not fused, fused
    adapter = P.load_adapter(tmp_path / "ad")
    got = S.SafetensorsFile(out)
    for key, W0 in stored.items():
        want = P.merge_weight(W0, [adapter.modules[key.removesuffix(".weight")]])
        np.testing.assert_array_equal(got.read_bits(key), want.view(np.uint16), err_msg=key)
    crafted = got.read_bits("crafted.weight").view(dtype)[: len(m_crafted) - 9].astype(np.float64).sum(axis=1)
    np.testing.assert_array_equal(crafted, m_crafted[: len(m_crafted) - 9].astype(dtype).astype(np.float64))
    assert np.isin(crafted, [1.0, 1 + 2.0 ** (2 - _LP[lp][2])]).sum() == 3  # the ties went to even: 1, 1 + 2 ulp


@pytest.mark.parametrize("lp", ["bf16", "fp16"])
def test_rows_the_fused_merge_leaves_are_merged_the_general_way_with_the_same_bits_or_refused(tmp_path, lp):
    """A zero row norm (with --allow-zero-norm), a magnitude past the largest finite value whose merged
    value still rounds to it, and one that overflows: the fused merge answers False and the general path
    merges the block (bitwise ``merge_weight``) or refuses it, naming the rows, as before."""
    from dora_ref.core import backend

    if backend.backend() != "c":
        pytest.skip("the fused merge is the C backend's (NumPy's takes the general path throughout)")
    dtype, st, p, largest = _LP[lp]
    rng = np.random.default_rng(4)
    A, B, m = random_module(rng, 5, 8, 2, dtype=np.float32)
    W0 = np.eye(5, 8)
    W0[2] = 0
    B[2] = 0  # row 2: V = 0, n = 0
    B[[0, 1]] = 0
    just_past = largest * (1 + 2.0**-p / 2) * (1 - 2.0**-20)  # rounds down to the largest
    m[0], m[1] = just_past, -just_past
    stored = W0.astype(dtype)
    codec = merge_cli._codec(st)
    mod = P.ModuleAdapter("w", A, B, m, 2.0, 2, 4.0)
    out = np.empty(stored.shape, codec.view)
    assert merge_cli._fused_merge(stored.view(codec.view), mod, codec, out) is False
    f = tmp_path / "base.safetensors"
    w = S.SafetensorsWriter(f, [("w", st, stored.shape)])
    w.write("w", stored.view(np.uint16), bits=True)
    w.close()
    got, is_bits = merge_cli.merge_tensor(S.SafetensorsFile(f), "w", [mod], False, allow_zero_norm=True)
    want = P.merge_weight(stored, [mod], allow_zero_norm=True)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    assert float(want[0, 0]) == largest and not want[2].any()
    m[0] = largest + 2.0 ** (int(np.log2(largest)) - p)  # half an ulp past the largest: a tie, to even: inf
    with pytest.raises(ValueError, match=r"not finite in 1 of 5 rows.*rows \[0\]: merged values beyond"):
        merge_cli.merge_tensor(S.SafetensorsFile(f), "w", [mod], False, allow_zero_norm=True)
    with pytest.raises(ValueError, match=r"rows \[0\]: merged values beyond"):
        P.merge_weight(stored, [mod], allow_zero_norm=True)


def test_float32_and_float64_merges_reuse_the_output_buffer_and_take_the_fused_path(tmp_path, monkeypatch):
    """float32/float64 weights merge by one C call into the reused output buffer (no new array per
    tensor): the same bits as ``merge_weight``, and one buffer for two tensors."""
    from dora_ref.core import backend

    if backend.backend() != "c":
        pytest.skip("the fused merge is the C backend's (NumPy's takes the general path throughout)")
    rng = np.random.default_rng(6)
    for dtype, st in ((np.float32, "F32"), (np.float64, "F64")):
        f = tmp_path / f"{st}.safetensors"
        W = {"a": rng.standard_normal((12, 7)).astype(dtype), "b": rng.standard_normal((9, 7)).astype(dtype)}
        w = S.SafetensorsWriter(f, [(k, st, v.shape) for k, v in W.items()])
        for k, v in W.items():
            w.write(k, v)
        w.close()
        buffers, results = merge_cli._Buffers(), []
        for k, v in W.items():
            A, B, m = random_module(rng, v.shape[0], 7, 3, dtype=dtype)
            mod = P.ModuleAdapter(k, A, B, m, 0.5, 3, 1.5)
            got, is_bits = merge_cli.merge_tensor(S.SafetensorsFile(f), k, [mod], False, buffers=buffers)
            assert not is_bits and got.dtype == dtype
            np.testing.assert_array_equal(got, P.merge_weight(v, [mod]))
            results.append(got)
        assert np.shares_memory(results[0], results[1])  # the one "merged" buffer


def test_merge_into_checks_every_array_before_a_pointer_crosses():
    from dora_ref.core import backend

    if "c" not in backend.available_backends():
        pytest.skip("merge_into is the C kernels'")
    from dora_ref.kernels import c

    rng = np.random.default_rng(8)
    A, B, m = (x.astype(np.float32) for x in random_module(rng, 6, 5, 2))
    W0 = rng.standard_normal((6, 5)).astype(BF16)
    bits = W0.view(np.uint16)
    out = np.empty((6, 5), np.uint16)
    n = c.merge_into(out, bits, A, B, m, 0.5, fmt="bfloat16")
    W_ref, n_ref = c.merge(W0, A, B, m, 0.5)
    np.testing.assert_array_equal(out, W_ref.view(np.uint16))
    np.testing.assert_array_equal(n, n_ref)
    strided = np.asfortranarray(bits)  # copied a block of rows at a time: the same bits
    out2 = np.empty_like(out)
    c.merge_into(out2, strided, A, B, m, 0.5, fmt="bfloat16")
    np.testing.assert_array_equal(out2, out)
    with pytest.raises(TypeError, match="fmt must be"):
        c.merge_into(out, bits, A, B, m, 0.5, fmt="float8")
    with pytest.raises(TypeError, match="W0 must be uint16"):
        c.merge_into(out, W0, A, B, m, 0.5, fmt="bfloat16")
    with pytest.raises(TypeError, match="A must have dtype float32"):
        c.merge_into(out, bits, A.astype(np.float64), B, m, 0.5, fmt="float16")
    with pytest.raises(ValueError, match=r"B must have shape \(out, r\) = \(6, 2\)"):
        c.merge_into(out, bits, A, B[:5], m, 0.5, fmt="bfloat16")
    with pytest.raises(ValueError, match=r"W_merged must be uint16 of W0's shape \(6, 5\)"):
        c.merge_into(np.empty((5, 6), np.uint16), bits, A, B, m, 0.5, fmt="bfloat16")
    with pytest.raises(ValueError, match="C-contiguous and writable"):
        c.merge_into(np.empty((5, 6), np.uint16).T, bits, A, B, m, 0.5, fmt="bfloat16")
    ro = np.empty_like(out)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="C-contiguous and writable"):
        c.merge_into(ro, bits, A, B, m, 0.5, fmt="bfloat16")
    with pytest.raises(ValueError, match="shares memory with W0"):
        c.merge_into(bits, bits, A, B, m, 0.5, fmt="bfloat16")
    with pytest.raises(TypeError, match="W0 must have dtype float32 or float64"):
        c.merge_into(out, bits, A, B, m, 0.5)
    W32 = W0.astype(np.float32)
    with pytest.raises(TypeError, match="must have W0's dtype float64"):
        c.merge_into(np.empty((6, 5)), W32.astype(np.float64), A, B, m, 0.5)
    out32 = np.empty((6, 5), np.float32)
    c.merge_into(out32, W32, A, B, m, 0.5)
    np.testing.assert_array_equal(out32, c.merge(W32, A, B, m, 0.5)[0])


def test_merge_command_imports_no_layer_checker_or_demo_and_import_dora_ref_still_binds_everything(tmp_path):
    """Issue 11: ``import dora_ref`` imports the layers, the conformance checker and the demo on first
    use (``dora-ref merge`` needs none of them: a third of its start); every name it bound before still
    resolves, to the same objects, and the old flat-layout names stay the views they were."""
    rng = np.random.default_rng(0)
    _write_base(tmp_path / "base.safetensors", BF16, rng)
    write_adapter(tmp_path / "ad", {"q": random_module(rng, *SHAPES["q"], 4, dtype=np.float32)}, {"r": 4})
    code = textwrap.dedent(f"""
        import sys
        from dora_ref.cli import main
        assert main(["merge", {str(tmp_path / 'base.safetensors')!r}, {str(tmp_path / 'ad')!r},
                     {str(tmp_path / 'out.safetensors')!r}, "--no-progress"]) == 0
        print(sorted(m for m in sys.modules if m.startswith(("dora_ref.layers", "dora_ref.porting", "dora_ref.demo"))))
        import dora_ref
        import dora_ref.layers, dora_ref.porting.testing, dora_ref.demo.analysis, dora_ref.core.conv
        assert dora_ref.DoRALinear is dora_ref.layers.DoRALinear and dora_ref.testing is dora_ref.porting.testing
        assert dora_ref.analysis is dora_ref.demo.analysis and dora_ref.peft is dora_ref.formats.peft
        assert sorted(dora_ref.__all__) == sorted(set(dora_ref.__all__)) and "AdamW" in dora_ref.__all__
        assert type(dora_ref.conv).__name__ == "_SplitModule" and dora_ref.conv.DoRAConv2d is dora_ref.DoRAConv2d
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-2:] == ["[]", "ok"]
