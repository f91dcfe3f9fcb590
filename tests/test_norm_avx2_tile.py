"""column_norm's AVX2/FMA six-row tile gives the bits of the plain C tiles.

Where the CPU has AVX2 and FMA, column_norm of float32 (and of a float16 /
bfloat16 W0, widened) takes its full tiles of six rows and sixteen columns
at NORM_AVX2_MIN_R <= r <= NORM_AVX2_MAX_R (8..32) from ``norm6_avx2``
(``csrc/dora_kernels_impl.h``), written with intrinsics; the last group of a
block, the last columns of a row and the other ranks stay with the plain C
tiles. It performs the same operations in the same order, so n must not
depend on which tile computed a row:

* a row alone (a group of one row: always the plain edge tile) has the bits
  it has inside the problem (a full six-row tile where it falls in one);
* merge's n (four-row plain tiles, the squares by a multiply and an add,
  which for a float V is exact in double: the same bits) equals column_norm's;
* one thread and two, a 16-bit W0 and its float32 widening, a negative s,
  inf and NaN in W0 (the same n, NaN where a row holds a NaN or inf - inf).

On a CPU with AVX-512 F the AVX-512 tiles (``norm6_avx512_pair``: two
tiles side by side, 32 columns; ``norm6_avx512_one`` for a row's odd full
tile) take the AVX2 tile's place, and go on to r = 64, with the same bits;
``test_avx512_tile_pairs_and_the_odd_tile_have_the_bits_of_the_row_alone``
gives them an odd and an even count of full tiles. Every test runs once with each
tile the CPU has (the narrower ones forced by ``_set_norm_tile_limit``), so
an AVX-512 machine checks the AVX2 tile too; and the three tiles give the
same n (``test_every_norm_tile_gives_the_same_bits``).

The ranks run over 1..40, across both ends of the AVX2 range and the
unrolled ranks 8, 16 and 32 (to 65 in the chunked and three-tile tests,
across the AVX-512 range's end and its unrolled r = 64); ``out`` is not a multiple of 6 (and spans two
blocks of 60 rows), ``in`` not a multiple of 16 or of 8; a wide ``in`` at
r = 31 and 32 takes A in chunks (norm_chunk). On a CPU without AVX2 the
same assertions hold for the plain tiles (``build_info`` says whether the
AVX2 tile was built). Independent check: float64 within the bound of
``tests/test_norm_fused_tile.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from dora_ref.porting.tolerance import gamma

from ci_env import c_kernels_or_skip  # the C kernels, or a skip (DORA_REF_REQUIRE_C: an error)

C = c_kernels_or_skip()

from test_kernels_c import forced_threads  # noqa: E402,F401 (the fixture: set_threads, forced)

_WIDEST = C._set_norm_tile_limit("avx512")  # the widest tile this CPU allows


@pytest.fixture(params=["avx512", "avx2", "plain"])
def norm_tile(request):
    """Each test once with every tile this CPU has, the narrower ones forced
    (``_set_norm_tile_limit``): on an AVX-512 machine the AVX2 tile is
    checked too, and the plain tiles against themselves."""
    if C._NORM_TILES.index(request.param) > C._NORM_TILES.index(_WIDEST):
        pytest.skip(f"this CPU has no {request.param} tile (widest: {_WIDEST})")
    C._set_norm_tile_limit(request.param)
    yield request.param
    C._set_norm_tile_limit("avx512")


# 67 rows: a block of 60 (ten six-row groups) and one of 7 (a group and an
# edge row); 100 columns: six full tiles of 16 and an edge of 4.
OUT, IN = 67, 100
RANKS = list(range(1, 41))


def _problem(out, in_, r, seed):
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((out, in_)).astype(np.float32)
    A = rng.standard_normal((r, in_)).astype(np.float32)
    B = rng.standard_normal((out, r)).astype(np.float32)
    return W0, A, B


def _bits(x):
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _assert_rows_alone(W0, A, B, s, n):
    for i in range(W0.shape[0]):
        alone = C.column_norm(W0[i:i + 1], A, B[i:i + 1], s)
        np.testing.assert_array_equal(_bits(alone), _bits(n[i:i + 1]), err_msg=f"row {i}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("s", [0.7, -1.3])
def test_six_row_avx2_tile_row_alone_and_merge_have_its_bits(norm_tile, forced_threads, threads, s):
    forced_threads(threads)
    for r in RANKS:
        W0, A, B = _problem(OUT, IN, r, seed=r)
        n = C.column_norm(W0, A, B, s)
        _assert_rows_alone(W0, A, B, s, n)
        _, n_merge = C.merge(W0, A, B, np.ones(OUT, np.float32), s)
        np.testing.assert_array_equal(_bits(n_merge), _bits(n), err_msg=f"r = {r}: merge's n")
        W64, A64, B64 = (x.astype(np.float64) for x in (W0, A, B))
        ref = np.linalg.norm(W64 + s * (B64 @ A64), axis=1)
        a = np.abs(W64) + abs(s) * (np.abs(B64) @ np.abs(A64))
        bound = 2 * 4 * gamma(IN + r + 2, np.float32) * np.linalg.norm(a, axis=1)
        assert np.all(np.abs(n - ref) <= bound), (r, np.max(np.abs(n - ref) / bound))


@pytest.mark.parametrize("r", [8, 16, 31, 32, 33, 48, 64])
def test_six_row_avx2_tile_with_A_in_chunks_has_the_bits_of_the_row_alone(norm_tile, forced_threads, r):
    # in = 4200: at r = 31, 32 A (counted in float64) exceeds 1 MiB and is taken
    # in chunks of columns; 4200 = 262 * 16 + 8, an edge tile in every row
    forced_threads(2)
    W0, A, B = _problem(13, 4200, r, seed=100 + r)
    n = C.column_norm(W0, A, B, -0.45)
    _assert_rows_alone(W0, A, B, -0.45, n)
    forced_threads(1)
    np.testing.assert_array_equal(_bits(C.column_norm(W0, A, B, -0.45)), _bits(n))


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_six_row_avx2_tile_on_16_bit_W0_has_the_bits_of_float32_on_its_widening(norm_tile, forced_threads, fmt):
    if fmt == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    else:
        dtype = np.float16
    for threads in (1, 2):
        forced_threads(threads)
        for r in (1, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 64):
            W0, A, B = _problem(OUT, IN, r, seed=200 + r)
            W16 = W0.astype(dtype)
            n = C.column_norm(W16, A, B, -0.75)
            assert n.dtype == np.float32
            want = C.column_norm(W16.astype(np.float32), A, B, -0.75)
            np.testing.assert_array_equal(_bits(n), _bits(want), err_msg=f"{fmt}, r = {r}")
            _assert_rows_alone(W16, A, B, -0.75, n)


@pytest.mark.parametrize("r", [4, 8, 16, 20, 32])
def test_six_row_avx2_tile_inf_and_nan_in_W0_give_the_same_n(norm_tile, forced_threads, r):
    forced_threads(2)
    W0, A, B = _problem(OUT, IN, r, seed=300 + r)
    W0[2, 5] = np.inf  # row 2: n = inf
    W0[4, 99] = np.nan  # row 4 (its edge column): NaN
    W0[7, 0] = -np.inf  # row 7: inf
    W0[8, 17] = np.nan  # rows 8: NaN in a full tile; 9: inf and NaN
    W0[9, 3], W0[9, 40] = np.inf, np.nan
    n = C.column_norm(W0, A, B, -0.5)
    assert np.isinf(n[[2, 7]]).all() and (n[[2, 7]] > 0).all()
    assert np.isnan(n[[4, 8, 9]]).all()
    finite = np.setdiff1d(np.arange(OUT), [2, 4, 7, 8, 9])
    assert np.isfinite(n[finite]).all()
    _assert_rows_alone(W0, A, B, -0.5, n)
    _, n_merge = C.merge(W0, A, B, np.ones(OUT, np.float32), -0.5)
    np.testing.assert_array_equal(_bits(n_merge), _bits(n))


@pytest.mark.parametrize("in_", [16, 32, 48, 112, 116, 150])
def test_avx512_tile_pairs_and_the_odd_tile_have_the_bits_of_the_row_alone(norm_tile, forced_threads, in_):
    # full tiles of 16 per row: 1, 2, 3, 7, 7 (and an edge of 4), 9 (and 6): pairs, and an
    # odd tile after them or alone; a row alone is the plain edge tile, merge four-row tiles
    for threads in (1, 2):
        forced_threads(threads)
        for r in (8, 13, 16, 24, 32):
            W0, A, B = _problem(OUT, in_, r, seed=400 + r + in_)
            n = C.column_norm(W0, A, B, 0.35)
            _assert_rows_alone(W0, A, B, 0.35, n)
            _, n_merge = C.merge(W0, A, B, np.ones(OUT, np.float32), 0.35)
            np.testing.assert_array_equal(_bits(n_merge), _bits(n), err_msg=f"in = {in_}, r = {r}")


@pytest.mark.parametrize("r", [8, 12, 16, 31, 32, 40, 63, 64, 65])
def test_every_norm_tile_gives_the_same_bits(forced_threads, r):
    # (130, 1100): two blocks of 60 and an edge group, 68 full tiles and an edge of 12
    forced_threads(2)
    W0, A, B = _problem(130, 1100, r, seed=500 + r)
    got = {}
    try:
        for tile in C._NORM_TILES[:C._NORM_TILES.index(_WIDEST) + 1]:
            C._set_norm_tile_limit(tile)
            got[tile] = _bits(C.column_norm(W0, A, B, 1.7))
    finally:
        C._set_norm_tile_limit("avx512")
    for tile, bits in got.items():
        np.testing.assert_array_equal(bits, got["plain"], err_msg=f"{tile} tile, r = {r}")


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_16_bit_W0_specials_give_the_values_of_their_float32_widening(norm_tile, forced_threads, fmt):
    # the AVX-512 tile widens sixteen 16-bit values in registers (vcvtph2ps; a shift for
    # bfloat16) where the others widen one at a time: subnormals, the largest value, -0,
    # inf and NaN must come out as the float32 widening's (NaN where the widening gives NaN)
    if fmt == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    else:
        dtype = np.float16
    forced_threads(2)
    W0, A, B = _problem(OUT, 4 * 16 + 5, 16, seed=600)
    W16 = (W0 * 0.25).astype(dtype)
    info = np.finfo(dtype)
    W16[0, 3] = info.smallest_subnormal
    W16[1, 17] = -info.smallest_subnormal * 3
    W16[2, 20] = info.max
    W16[3, 33] = -0.0
    W16[6, 1] = np.inf
    W16[7, 40] = np.nan
    W16[12, 0:16] = info.smallest_subnormal  # a whole tile's row of subnormals
    n = C.column_norm(W16, A, B, 0.5)
    want = C.column_norm(W16.astype(np.float32), A, B, 0.5)
    np.testing.assert_array_equal(n, want)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(_bits(n[finite]), _bits(want[finite]))


def test_norm_tile_names_the_tile_in_use_and_follows_the_cap():
    assert C.norm_tile() == _WIDEST  # the default: the widest tile the CPU has
    try:
        for tile in C._NORM_TILES[:C._NORM_TILES.index(_WIDEST) + 1]:
            C._set_norm_tile_limit(tile)
            assert C.norm_tile() == tile
    finally:
        C._set_norm_tile_limit("avx512")
