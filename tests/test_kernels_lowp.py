"""The C kernels on float16 / bfloat16 weights (dora_ref.kernels.c), against their contract.

The contract (docs: the low-precision rules): ``column_norm``, ``merge`` and
``unmerge`` with a 16-bit weight and float32 A, B, magnitude/factor, and
``forward_epilogue(..., out_dtype=)`` with float32 inputs, compute exactly
what the float32 C kernel computes on the exactly widened inputs, then round
each weight-shaped result ONCE to the 16-bit dtype (to nearest, ties to
even, as NumPy's ``astype(np.float16)`` and ml_dtypes' ``astype(bfloat16)``
do). So every test here is bitwise: the reference is the float32 kernel on
``W0.astype(np.float32)`` followed by one ``astype``, never a tolerance. The
results must also be bitwise independent of the number of threads.

The conversions the kernels use are tested on their own first, against
NumPy (float16) and ml_dtypes (bfloat16): every 16-bit pattern widened, and
narrowing on every boundary between two neighbouring 16-bit values, the
ties, the subnormals, the overflow thresholds and a few million random
float32 patterns.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from ci_env import c_kernels_or_skip  # the C kernels, or a skip (DORA_REF_REQUIRE_C: an error)

C = c_kernels_or_skip()

from test_kernels_c import forced_threads  # noqa: E402,F401 (the fixture: set_threads, forced)

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
LP = [F16, BF16]
_FORMAT = {F16: C.lib.DORA_F16, BF16: C.lib.DORA_BF16}


@pytest.fixture(autouse=True)
def backend():
    """Override conftest's per-backend fixture: these tests call the C kernels directly."""
    yield "c"


# ---------------------------------------------------------------------------
# the conversions
# ---------------------------------------------------------------------------


def _c_widen(bits, dtype):
    out = np.empty(bits.size, np.float32)
    status = C.lib.dora_widen_lp(C.ffi.from_buffer("float[]", out),
                                 C.ffi.from_buffer("uint16_t[]", bits), bits.size, _FORMAT[dtype])
    assert status == 0
    return out


def _c_narrow(x, dtype):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.size, np.uint16)
    assert C.lib.dora_narrow_lp(C.ffi.from_buffer("uint16_t[]", out),
                                C.ffi.from_buffer("float[]", x), x.size, _FORMAT[dtype]) == 0
    return out


def _ref_narrow(x, dtype):
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype).view(np.uint16)


def _assert_narrow_like_reference(x, dtype):
    """Bitwise equal on every non-NaN float32; a NaN gives a NaN of the same sign.

    (The exact bits of a NaN are the subject of their own tests: a library
    may use a CPU instruction that quiets a signalling NaN.)
    """
    got, ref = _c_narrow(x, dtype), _ref_narrow(x, dtype)
    nan = np.isnan(x)
    bad = np.flatnonzero((got != ref) & ~nan)
    assert bad.size == 0, (
        f"{dtype}: {bad.size} of {x.size} differ, e.g. float32 bits "
        f"{[hex(v) for v in x[bad[:5]].view(np.uint32)]}: C {[hex(v) for v in got[bad[:5]]]}, "
        f"reference {[hex(v) for v in ref[bad[:5]]]}"
    )
    got_v, ref_v = got[nan].view(dtype), ref[nan].view(dtype)
    assert np.isnan(got_v.astype(np.float32)).all() and np.isnan(ref_v.astype(np.float32)).all()
    assert np.array_equal(got[nan] & 0x8000, ref[nan] & 0x8000)


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_widen_every_16_bit_pattern_exactly(dtype):
    bits = np.arange(2**16, dtype=np.uint16)
    got = _c_widen(bits, dtype)
    ref = bits.view(dtype).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()
    # and back: every non-NaN 16-bit value survives the round trip
    assert np.array_equal(_c_narrow(got[~nan], dtype), bits[~nan])


def _boundaries_f32(dtype):
    """float32 values around every 16-bit value and every midpoint of two neighbours."""
    bits = np.arange(2**16, dtype=np.uint16)
    vals = bits.view(dtype).astype(np.float32)
    vals = vals[np.isfinite(vals)]
    vals = np.unique(vals)  # sorted; +0 and -0 compare equal: both kept below
    mids = (vals[:-1].astype(np.float64) + vals[1:]) / 2  # exact: one more bit than the 16-bit type
    mids = mids.astype(np.float32)
    assert np.array_equal(mids.astype(np.float64), (vals[:-1].astype(np.float64) + vals[1:]) / 2)
    centres = np.concatenate([vals, mids, [np.float32(-0.0)]])
    u = centres.view(np.uint32).astype(np.int64)
    around = [u + d for d in (-2, -1, 0, 1, 2)]  # the ties and the float32 values either side
    out = np.concatenate(around)
    out = out[(out >= 0) & (out < 2**32)].astype(np.uint32)
    return out.view(np.float32)


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_narrow_on_every_boundary_tie_and_neighbour(dtype):
    x = _boundaries_f32(dtype)
    assert x.size > 5 * 65000
    _assert_narrow_like_reference(x, dtype)


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_narrow_every_float32_below_the_smallest_normal(dtype):
    """Subnormal results: for float16 every float32 of magnitude < 2^-14 rounds
    to a multiple of 2^-24 (a path of its own in C); all 2^26 of them that
    matter are not needed: every exponent, with dense and random mantissas."""
    rng = np.random.default_rng(5)
    exps = np.arange(0, 114, dtype=np.uint32)  # float32 exponents up to 2^-14
    mant = np.concatenate([np.arange(4096, dtype=np.uint32) << 11,
                           rng.integers(0, 2**23, 4096, dtype=np.uint32)])
    u = (exps[:, None] << 23 | mant[None, :]).ravel()
    u = np.concatenate([u, u | 0x80000000])
    _assert_narrow_like_reference(u.view(np.float32), dtype)


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_narrow_a_few_million_random_float32_patterns(dtype):
    rng = np.random.default_rng(13)
    u = rng.integers(0, 2**32, 4_000_000, dtype=np.uint64).astype(np.uint32)
    _assert_narrow_like_reference(u.view(np.float32), dtype)


def test_float16_overflow_threshold_65520_rounds_to_inf():
    """65504 is float16's largest; 65520 is the tie between it and 2^16, which
    rounds to even: inf. Just below 65520 stays 65504."""
    below = np.nextafter(np.float32(65520), np.float32(0))
    x = np.array([65504, below, 65520, 65536, 1e30, np.inf, -65520, -below], np.float32)
    got = _c_narrow(x, F16).view(np.float16)
    assert got.tolist() == [65504, 65504, np.inf, np.inf, np.inf, np.inf, -np.inf, -65504]
    _assert_narrow_like_reference(x, F16)


def test_bfloat16_overflow_past_the_largest_finite_rounds_to_inf():
    top = np.float32(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    tie = (np.array([top], np.float32).view(np.uint32) + 0x8000).view(np.float32)[0]
    x = np.array([top, np.nextafter(tie, np.float32(0)), tie, np.finfo(np.float32).max], np.float32)
    got = _c_narrow(x, BF16).view(BF16).astype(np.float32)
    assert got.tolist() == [top, top, np.inf, np.inf]
    _assert_narrow_like_reference(x, BF16)


def test_float16_nan_keeps_the_sign_and_top_payload_bits_as_numpy_does():
    """NumPy's C cast: sign | 0x7c00 | the top 10 payload bits, at least one set."""
    u = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FA00000, 0x7FFFFFFF, 0x7F802000],
                 np.uint32)
    got = _c_narrow(u.view(np.float32), F16)
    assert [hex(v) for v in got] == ["0x7c01", "0xfc01", "0x7e00", "0x7d00", "0x7fff", "0x7c01"]


def test_bfloat16_nan_becomes_the_quiet_nan_ml_dtypes_gives():
    u = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FA00000, 0x7FFFFFFF], np.uint32)
    got = _c_narrow(u.view(np.float32), BF16)
    assert [hex(v) for v in got] == ["0x7fc0", "0xffc0", "0x7fc0", "0x7fc0", "0x7fc0"]
    assert np.array_equal(got, _ref_narrow(u.view(np.float32), BF16))


# ---------------------------------------------------------------------------
# the kernels: the float32 kernel on the widened inputs, rounded once
# ---------------------------------------------------------------------------


def _problem(seed, dtype, out_f, in_f, r, N=7):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return dict(
        W0=f32(out_f, in_f).astype(dtype), A=f32(r, in_f), B=f32(out_f, r),
        m=(rng.random(out_f) + 0.5).astype(np.float32), base=f32(N, out_f), U=f32(N, r),
        g=(rng.random(out_f) + 0.5).astype(np.float32), bias=f32(out_f), s=0.7,
    )


def _bits_equal(got, want):
    """Same shape, dtype and bits (NaNs included)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    view = np.uint16 if got.itemsize == 2 else np.uint32
    same = got.view(view) == want.view(view)
    if not same.all():
        i = tuple(int(k) for k in np.argwhere(~same)[0])
        raise AssertionError(f"differ at {i} ({int((~same).sum())} of {same.size}): "
                             f"got {got[i]!r}, contract {want[i]!r}")


def _round(x, dtype):
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype)


def _check_contract(p, dtype):
    """All four kernels on problem p against the contract."""
    W0, A, B, m, s = p["W0"], p["A"], p["B"], p["m"], p["s"]
    W0f = W0.astype(np.float32)
    _bits_equal(C.column_norm(W0, A, B, s), C.column_norm(W0f, A, B, s))
    Wm, n = C.merge(W0, A, B, m, s)
    Wm_f, n_f = C.merge(W0f, A, B, m, s)
    _bits_equal(n, n_f)
    _bits_equal(Wm, _round(Wm_f, dtype))
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = m / n
    _bits_equal(C.unmerge(Wm, A, B, factor, s),
                _round(C.unmerge(Wm.astype(np.float32), A, B, factor, s), dtype))
    base, U, g = p["base"], p["U"], p["g"]
    for bias in (None, p["bias"], p["bias"].astype(dtype)):
        bias_f = None if bias is None else bias.astype(np.float32)
        _bits_equal(C.forward_epilogue(base, U, B, g, s, bias, out_dtype=dtype),
                    _round(C.forward_epilogue(base, U, B, g, s, bias_f), dtype))


# ragged sizes around the 4-row group, the 16-row block and the 16-float tile
_SHAPES = [  # out, in, r, N
    (1, 1, 1, 1), (1, 17, 8, 3), (5, 37, 1, 2), (37, 53, 3, 5), (64, 256, 8, 33),
    (33, 100, 16, 17), (20, 70, 64, 9), (19, 16, 12, 4), (0, 8, 2, 3), (6, 0, 2, 0),
    (40, 31, 8, 0),
    (70, 4100, 40, 3),  # column_norm takes A in chunks of columns (r * in * 8 > 1 MiB)
]


@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "out{}_in{}_r{}_N{}".format(*s))
@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_kernels_are_the_float32_kernel_on_the_widened_input_rounded_once(dtype, shape):
    out_f, in_f, r, N = shape
    _check_contract(_problem(sum(shape), dtype, out_f, in_f, r, N), dtype)


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_kernels_contract_with_large_and_tiny_values(dtype):
    """Values spread over the 16-bit range, subnormals included, so that the
    roundings of W' and y land everywhere (ties as well)."""
    p = _problem(3, dtype, 45, 83, 8, 21)
    rng = np.random.default_rng(4)
    top = 2.0 ** (14 if dtype == F16 else 100)
    scale = np.exp2(rng.uniform(-20, np.log2(top) - 8, p["W0"].shape)).astype(np.float32)
    p["W0"] = (p["W0"].astype(np.float32) * scale).astype(dtype)
    p["base"] = p["base"] * np.float32(top / 64)
    _check_contract(p, dtype)


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_merge_rounds_once_not_after_each_step(dtype):
    """A merge that rounded V to the 16-bit type before scaling it would round
    twice; the kernel's W' must be lp(f32 merge), which differs from it."""
    p = _problem(8, dtype, 64, 128, 8)
    W0, A, B, m, s = p["W0"], p["A"], p["B"], p["m"] * 3, p["s"]
    Wm, n = C.merge(W0, A, B, m, s)
    Wm_f, _ = C.merge(W0.astype(np.float32), A, B, m, s)
    V = W0.astype(np.float32) + np.float32(s) * (B @ A)
    twice = ((m / n)[:, None] * V.astype(dtype).astype(np.float32)).astype(dtype)
    _bits_equal(Wm, Wm_f.astype(dtype))
    assert not np.array_equal(Wm.view(np.uint16), twice.view(np.uint16))


@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 53, 3), (70, 129, 8), (33, 40, 12), (0, 5, 2),
                                   (300, 64, 2), (6, 0, 3)], ids=str)
@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_norm_gradient_products_fused_are_the_float32_kernel_on_the_widened_weight(dtype, shape):
    """(300, 64, 2): several row slices of W0, whose partial sums of C.T @ W0 are added."""
    out_f, in_f, r = shape
    p = _problem(out_f + in_f, dtype, out_f, in_f, r)
    W0, A, Cm = p["W0"], p["A"], p["B"]
    WAt, CtW = C.norm_gradient_products(W0, A, Cm)
    WAt_f, CtW_f = C.norm_gradient_products(W0.astype(np.float32), A, Cm)
    _bits_equal(WAt, WAt_f)
    _bits_equal(CtW, CtW_f)
    WAt_t, CtW_t = C.norm_gradient_products(np.asfortranarray(W0), A, Cm)
    _bits_equal(WAt_t, WAt_f)
    _bits_equal(CtW_t, CtW_f)


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_norm_gradient_products_above_the_fused_rank_widen_a_row_block_at_a_time(dtype):
    """BLAS on W0 widened block by block: WAt is row by row BLAS on the widened
    rows (bitwise, BLAS's own rows); CtW sums the blocks, within float32
    rounding of a sum of out terms: |error| <= 2 gamma_{out} (|C|.T @ |W0|)."""
    out_f, in_f, r = 300, 64, C.FUSED_MAX_RANK + 4
    p = _problem(1, dtype, out_f, in_f, r)
    W0, A, Cm = p["W0"], p["A"], p["B"]
    W0f = W0.astype(np.float32)
    WAt, CtW = C.norm_gradient_products(W0, A, Cm)
    assert WAt.dtype == CtW.dtype == np.float32
    exact_WAt = W0f.astype(np.float64) @ A.T.astype(np.float64)
    exact_CtW = Cm.T.astype(np.float64) @ W0f.astype(np.float64)
    u = np.finfo(np.float32).eps / 2
    gamma = lambda k: k * u / (1 - k * u)  # noqa: E731
    assert (np.abs(WAt - exact_WAt) <= 2 * gamma(in_f) * (np.abs(W0f) @ np.abs(A.T))).all()
    assert (np.abs(CtW - exact_CtW) <= 2 * gamma(out_f) * (np.abs(Cm.T) @ np.abs(W0f))).all()
    with pytest.raises(TypeError, match=r"C must have dtype float32 when W0 has dtype"):
        C.norm_gradient_products(W0, A, Cm.astype(np.float64))
    with pytest.raises(ValueError, match=r"C must have shape"):
        C.norm_gradient_products(W0, A, Cm[:3])


# ---------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_strided_inputs_give_the_bits_of_contiguous_ones(dtype):
    p = _problem(11, dtype, 70, 90, 8)
    W0, A, B, m, s = p["W0"], p["A"], p["B"], p["m"], p["s"]
    W0_t = np.asfortranarray(W0)            # the weight transposed in memory
    W0_s = np.repeat(W0, 2, axis=1)[:, ::2]  # every other column
    A_s, B_f = np.repeat(A, 2, axis=1)[:, ::2], np.asfortranarray(B)
    n, (Wm, n2) = C.column_norm(W0, A, B, s), C.merge(W0, A, B, m, s)
    for W in (W0_t, W0_s):
        assert not W.flags.c_contiguous
        _bits_equal(C.column_norm(W, A_s, B_f, s), n)
        Wm_w, n_w = C.merge(W, A_s, B_f, np.repeat(m, 2)[::2], s)
        _bits_equal(Wm_w, Wm)
        _bits_equal(n_w, n2)
    factor = m / n2
    ref = C.unmerge(Wm, A, B, factor, s)
    _bits_equal(C.unmerge(np.asfortranarray(Wm), A_s, B_f, factor, s), ref)
    base, U, g = p["base"], p["U"], p["g"]
    bias = p["bias"].astype(dtype)
    y = C.forward_epilogue(base, U, B, g, s, bias, out_dtype=dtype)
    bias_s = np.repeat(bias, 2)[::2]
    assert not bias_s.flags.c_contiguous
    _bits_equal(C.forward_epilogue(np.asfortranarray(base), U, B_f, g, s, bias_s,
                                   out_dtype=dtype), y)


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_weight_is_never_copied_to_float32(dtype):
    """column_norm and merge read the 16 bits: no float32 copy of W0 (twice
    W0's bytes), nor a whole copy of a strided W0 (copied a row block at a
    time, in its own dtype)."""
    p = _problem(2, dtype, 2048, 1024, 8)
    W0, A, B, m, s = p["W0"], p["A"], p["B"], p["m"], p["s"]
    results = []
    for W in (W0, np.asfortranarray(W0)):
        tracemalloc.start()
        try:
            n = C.column_norm(W, A, B, s)
            norm_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            Wm, _ = C.merge(W, A, B, m, s)
            merge_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert norm_peak < W0.nbytes // 2, norm_peak       # row blocks of about 1 MiB at most
        assert merge_peak < W0.nbytes + W0.nbytes // 2, merge_peak  # W' itself, plus a block
        results.append((n, Wm, C.unmerge(W, A, B, m, s)))
    # the strided weight went through several row blocks: the bits of one call
    assert len(list(C._weight_row_blocks(*W0.shape, W0.itemsize))) > 1
    for whole, blocks in zip(*results):
        _bits_equal(blocks, whole)


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------


def _lp_digest():
    h = hashlib.sha256()
    for dtype in LP:
        for out_f, in_f, r, N in ((70, 45, 8, 50), (37, 129, 3, 33), (100, 64, 16, 70),
                                  (300, 64, 2, 20)):  # 4 row slices in norm_gradient_products
            p = _problem(out_f, dtype, out_f, in_f, r, N)
            W0, A, B, m, s = p["W0"], p["A"], p["B"], p["m"], p["s"]
            Wm, n = C.merge(W0, A, B, m, s)
            for a in (C.column_norm(W0, A, B, s), Wm, n, C.unmerge(Wm, A, B, m / n, s),
                      *C.norm_gradient_products(W0, A, B),
                      C.forward_epilogue(p["base"], p["U"], B, p["g"], s, p["bias"],
                                         out_dtype=dtype)):
                h.update(a.view(np.uint8).tobytes())
    return h.hexdigest()


def test_lp_kernels_bitwise_identical_for_any_thread_count(forced_threads):
    if not C.openmp_enabled():
        pytest.skip(f"the C kernels were built without OpenMP ({C.build_info()})")
    digests = {}
    for threads in (1, 2, 3):
        forced_threads(threads)
        assert C.openmp_threads() == threads
        digests[threads] = _lp_digest()
    assert digests[1] == digests[2] == digests[3], digests
    C._set_always_parallel(False)  # the cost model decides, call by call
    assert _lp_digest() == digests[1]


# ---------------------------------------------------------------------------
# NaN, inf, overflow
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_nan_and_inf_in_the_weight_follow_the_float32_kernel(dtype, bad):
    p = _problem(6, dtype, 21, 40, 4, 6)
    p["W0"][3, 7] = bad
    p["W0"][17, 0] = bad
    p["base"][2, 5] = bad
    _check_contract(p, dtype)
    n = C.column_norm(p["W0"], p["A"], p["B"], p["s"])
    assert not np.isfinite(n[[3, 17]]).any() and np.isfinite(np.delete(n, [3, 17])).all()


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_merge_overflow_gives_inf_on_those_rows_which_the_row_check_names(dtype):
    """W' past the 16-bit range (finite in float32) becomes inf, as the contract
    says, on the overflowing rows only; the callers refuse it with the
    non-finite row check, which names those rows."""
    from dora_ref.core._validate import NonFiniteWeightError, check_rows_finite

    p = _problem(7, dtype, 24, 32, 4)
    top = float(ml_dtypes.finfo(dtype).max)
    rows = [2, 19]
    # rows whose V is a single 1 (n = 1), so that W' = m there: a magnitude
    # past the 16-bit range and within float32's (for bfloat16, whose range is
    # float32's, in the sliver between the two)
    p["W0"][rows] = 0
    p["W0"][rows, 5] = 1
    p["B"][rows] = 0
    m = p["m"].copy()
    m[rows] = min(4 * top, 3.4e38)
    Wm, _ = C.merge(p["W0"], p["A"], p["B"], m, p["s"])
    Wm_f, _ = C.merge(p["W0"].astype(np.float32), p["A"], p["B"], m, p["s"])
    assert np.isfinite(Wm_f).all()
    _bits_equal(Wm, _round(Wm_f, dtype))
    finite_rows = np.isfinite(Wm.astype(np.float32)).all(axis=1)
    assert np.flatnonzero(~finite_rows).tolist() == rows
    with pytest.raises(NonFiniteWeightError, match=r"output channel\(s\) \[2, 19\]") as info:
        check_rows_finite("merged weight", Wm)
    assert info.value.rows == rows


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_forward_and_unmerge_overflow_to_inf_as_the_contract_says(dtype):
    p = _problem(9, dtype, 18, 20, 4, 5)
    top = np.float32(ml_dtypes.finfo(dtype).max)
    p["base"][1, :] = top
    p["g"][:] = 2
    _check_contract(p, dtype)
    y = C.forward_epilogue(p["base"], p["U"], p["B"], p["g"], p["s"], None, out_dtype=dtype)
    assert np.isinf(y[1].astype(np.float32)).all() and np.isfinite(np.delete(y, 1, 0)).all()
    W0 = C.unmerge(p["W0"], p["A"], p["B"], np.full(18, 1e-44, np.float32), p["s"])
    assert np.isinf(W0[p["W0"].astype(np.float32) != 0].astype(np.float32)).all()


# ---------------------------------------------------------------------------
# bad arguments: refused before any pointer crosses
# ---------------------------------------------------------------------------

_LP_WRAPPERS = {  # kernel: (call, the arguments by the wrapper's names)
    "column_norm": (lambda a: C.column_norm(a["W0"], a["A"], a["B"], a["s"]), ("A", "B")),
    "merge": (lambda a: C.merge(a["W0"], a["A"], a["B"], a["magnitude"], a["s"]),
              ("A", "B", "magnitude")),
    "unmerge": (lambda a: C.unmerge(a["W_merged"], a["A"], a["B"], a["factor"], a["s"]),
                ("A", "B", "factor")),
    "forward_epilogue": (
        lambda a: C.forward_epilogue(a["base"], a["U"], a["B"], a["g"], a["s"], a["bias"],
                                     out_dtype=a["out_dtype"]),
        ("base", "U", "B", "g", "bias"),
    ),
    "norm_gradient_products": (lambda a: C.norm_gradient_products(a["W0"], a["A"], a["C"]),
                               ("A", "C")),
}


def _lp_args(dtype):
    p = _problem(0, dtype, 4, 5, 2, 3)
    return dict(W0=p["W0"], W_merged=p["W0"], A=p["A"], B=p["B"], C=p["B"], magnitude=p["m"],
                factor=p["m"], base=p["base"], U=p["U"], g=p["g"], bias=p["bias"],
                out_dtype=dtype, s=0.5)


@pytest.mark.parametrize("kernel", sorted(_LP_WRAPPERS))
@pytest.mark.parametrize("dtype", LP, ids=str)
def test_every_lp_wrapper_checks_every_argument(dtype, kernel):
    """Each argument in turn: float64, float16/bfloat16 where float32 is due,
    a wrong shape, a list; each refused naming it."""
    call, names = _LP_WRAPPERS[kernel]
    call(_lp_args(dtype))  # the good call works
    for name in names:
        for bad_dtype in (np.float64, dtype) if name != "bias" else (np.float64,):
            a = _lp_args(dtype)
            a[name] = a[name].astype(bad_dtype)
            with pytest.raises(TypeError, match=rf"^{name} must have dtype float32"):
                call(a)
        a = _lp_args(dtype)
        a[name] = a[name][:, :1] if name == "A" else a[name][:1]
        # base sets (N, out): a wrong one is seen as the others not fitting it
        with pytest.raises(ValueError, match=rf"{name if name != 'base' else ''} must have shape"):
            call(a)
        a = _lp_args(dtype)
        a[name] = a[name].tolist()
        with pytest.raises(TypeError, match=rf"{name} must be a numpy.ndarray"):
            call(a)


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_lp_weight_with_a_float64_or_other_lp_adapter_is_refused_naming_both(dtype):
    a = _lp_args(dtype)
    other = BF16 if dtype == F16 else F16
    with pytest.raises(TypeError, match=rf"A must have dtype float32 when W0 has dtype {dtype}"):
        C.column_norm(a["W0"], a["A"].astype(np.float64), a["B"], 1.0)
    with pytest.raises(TypeError, match=r"magnitude must have dtype float32 when W0 has dtype"):
        C.merge(a["W0"], a["A"], a["B"], a["magnitude"].astype(other), 1.0)
    with pytest.raises(TypeError, match=r"B must have dtype float32 when W_merged has dtype"):
        C.unmerge(a["W_merged"], a["A"], a["B"].astype(dtype), a["factor"], 1.0)
    with pytest.raises(ValueError, match=r"W0 must be 2-D"):
        C.column_norm(a["W0"][0], a["A"], a["B"], 1.0)
    with pytest.raises(ValueError, match=r"W_merged must be 2-D"):
        C.unmerge(a["W_merged"][None], a["A"], a["B"], a["factor"], 1.0)
    with pytest.raises(TypeError, match=r"scaling must be a real number"):
        C.merge(a["W0"], a["A"], a["B"], a["magnitude"], "0.5")


@pytest.mark.parametrize("dtype", LP, ids=str)
def test_forward_epilogue_out_dtype_is_checked(dtype):
    a = _lp_args(dtype)
    args = (a["base"], a["U"], a["B"], a["g"], 0.5)
    for bad in (np.int16, np.float64, "float8", object):
        with pytest.raises(TypeError, match=r"out_dtype must be None, float16, bfloat16"):
            C.forward_epilogue(*args, None, out_dtype=bad)
    other = BF16 if dtype == F16 else F16
    with pytest.raises(TypeError, match=rf"bias must have dtype float32 or out_dtype \({dtype}\)"):
        C.forward_epilogue(*args, a["bias"].astype(other), out_dtype=dtype)
    with pytest.raises(TypeError, match=r"base must have dtype float32 when out_dtype"):
        C.forward_epilogue(a["base"].astype(np.float64), *args[1:], None, out_dtype=dtype)
    # the inputs' own dtype, or its name, is today's kernel
    y32 = C.forward_epilogue(*args, a["bias"])
    _bits_equal(C.forward_epilogue(*args, a["bias"], out_dtype=np.float32), y32)
    name = "bfloat16" if dtype == BF16 else "float16"
    _bits_equal(C.forward_epilogue(*args, a["bias"], out_dtype=name), y32.astype(dtype))


def test_ml_dtypes_is_imported_only_when_a_bfloat16_array_appears():
    code = (
        "import sys, numpy as np\n"
        "from dora_ref.kernels import c as C\n"
        "W0 = np.ones((3, 4), np.float16); A = np.ones((2, 4), np.float32)\n"
        "B = np.ones((3, 2), np.float32); m = np.ones(3, np.float32)\n"
        "C.column_norm(W0, A, B, 1.0); C.merge(W0, A, B, m, 1.0)\n"
        "C.forward_epilogue(np.ones((2, 3), np.float32), np.ones((2, 2), np.float32), B, m,"
        " 1.0, None, out_dtype=np.float16)\n"
        "print('ml_dtypes' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_c_entry_points_refuse_an_unknown_16_bit_format():
    """The wrapper always passes DORA_BF16 or DORA_F16; C still checks."""
    n, W0 = np.empty(1, np.float32), np.zeros((1, 1), np.uint16)
    A, B = np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32)
    f, u = C.ffi.from_buffer("float[]", n), C.ffi.from_buffer("uint16_t[]", W0)
    for bad in (0, 3, -1):
        assert C.lib.dora_column_norm_lp(f, u, C.ffi.from_buffer("float[]", A),
                                         C.ffi.from_buffer("float[]", B), 1.0, 1, 1, 1,
                                         bad) == C.lib.DORA_ERR_FORMAT
        assert C.lib.dora_widen_lp(f, u, 1, bad) == C.lib.DORA_ERR_FORMAT
        assert C.lib.dora_narrow_lp(u, f, 1, bad) == C.lib.DORA_ERR_FORMAT
