"""column_norm of float64 W0: the six-row tile gives the bits of the four-row tile.

Where the AVX-512 norm tile is allowed (``norm_tile() == "avx512"``), the
float64 norm takes its full groups of rows six at a time (``norm_full6`` in
``csrc/dora_kernels_impl.h``: six vector chains of fused multiply-adds where
the four-row tile has four), at every rank; elsewhere (an AVX2 or older CPU,
or the tile held to ``"avx2"`` or ``"plain"`` by ``_set_norm_tile_limit``)
it keeps the four-row tiles. Both add the same rank-r terms in the same
order and each row's squares into the same lanes, so n must not depend on
which ran:

* the six-row tile's n (``"avx512"``) equals the four-row tile's (``"avx2"``,
  ``"plain"``) bit for bit, on one thread and two;
* a row alone (always the edge tile) has the bits it has inside the problem;
* merge's n (four-row tiles, whole rows) equals column_norm's;
* A read whole and A taken in chunks (norm_chunk, where the body at r >= 32
  also prefetches W0), rows not a multiple of six or of the 60-row block,
  columns not a multiple of the 8-double tile, ranks 1 to 70;
* inf and NaN in W0 give the same n (NaN where a row holds a NaN or inf - inf).

Independent check: n against a float64 reference within the column norm's
bound (``2 * 4 * gamma_{in + r + 2} * ||a_i||``, a_ij = |W0_ij| + |s| |B_i|.|A_j|,
as in ``tests/test_norm_fused_tile.py``).
"""
from __future__ import annotations

import numpy as np
import pytest

from dora_ref.porting.tolerance import gamma

from ci_env import c_kernels_or_skip  # the C kernels, or a skip (DORA_REF_REQUIRE_C: an error)

C = c_kernels_or_skip()

from test_kernels_c import forced_threads  # noqa: E402,F401 (the fixture: set_threads, forced)

_WIDEST = C._set_norm_tile_limit("avx512")  # the widest tile this CPU allows
_TILES = C._NORM_TILES[:C._NORM_TILES.index(_WIDEST) + 1]

# out, in: a block of 60 rows and an edge group; 100 columns = 12 full tiles of 8
# doubles and an edge of 4; 130 x 1100: three blocks; the chunked shapes take A in
# chunks of columns (8 * r * in > 1 MiB) that do not divide `in`.
_WHOLE = [(67, 100), (130, 1100), (7, 9)]
_RANKS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 40, 63, 64, 65]
_CHUNKED = [(13, 8200, 16), (61, 3300, 40), (127, 2100, 64), (67, 1890, 70)]


def _problem(out, in_, r, seed):
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((out, in_))
    A = rng.standard_normal((r, in_))
    B = rng.standard_normal((out, r))
    return W0, A, B


def _bits(x):
    return np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)


def _norm_with(tile, W0, A, B, s):
    try:
        C._set_norm_tile_limit(tile)
        return C.column_norm(W0, A, B, s)
    finally:
        C._set_norm_tile_limit("avx512")


def _assert_within_bound(W0, A, B, s, n):
    ref = np.linalg.norm(W0 + s * (B @ A), axis=1)
    a = np.abs(W0) + abs(s) * (np.abs(B) @ np.abs(A))
    bound = 2 * 4 * gamma(W0.shape[1] + A.shape[0] + 2, np.float64) * np.linalg.norm(a, axis=1)
    assert np.all(np.abs(n - ref) <= bound), np.max(np.abs(n - ref) / bound)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", _WHOLE, ids=lambda s: "out{}_in{}".format(*s))
def test_float64_six_row_tile_has_the_bits_of_the_four_row_tile(forced_threads, threads, shape):
    forced_threads(threads)
    out, in_ = shape
    for r in _RANKS:
        W0, A, B = _problem(out, in_, r, seed=10 * r + out)
        s = -1.3 if r % 2 else 0.7
        got = {tile: _norm_with(tile, W0, A, B, s) for tile in _TILES}
        for tile, n in got.items():
            np.testing.assert_array_equal(_bits(n), _bits(got["plain"]),
                                          err_msg=f"{tile} tile, r = {r}")
        _assert_within_bound(W0, A, B, s, got[_WIDEST])


@pytest.mark.parametrize("r", [1, 8, 17, 33, 64])
def test_float64_six_row_tile_row_alone_and_merge_have_its_bits(forced_threads, r):
    forced_threads(2)
    W0, A, B = _problem(67, 100, r, seed=700 + r)
    m = np.random.default_rng(r).uniform(0.5, 2.0, 67)
    n = C.column_norm(W0, A, B, 0.45)
    for i in range(W0.shape[0]):
        alone = C.column_norm(W0[i:i + 1], A, B[i:i + 1], 0.45)
        np.testing.assert_array_equal(_bits(alone), _bits(n[i:i + 1]), err_msg=f"row {i}")
    _, n_merge = C.merge(W0, A, B, m, 0.45)
    np.testing.assert_array_equal(_bits(n_merge), _bits(n))


@pytest.mark.parametrize("shape", _CHUNKED, ids=lambda s: "out{}_in{}_r{}".format(*s))
def test_float64_six_row_tile_with_A_in_chunks_has_the_bits_of_merge_on_any_threads(
        forced_threads, shape):
    out, in_, r = shape
    assert 8 * r * in_ > 1 << 20  # A is taken in chunks
    W0, A, B = _problem(out, in_, r, seed=out + in_ + r)
    m = np.ones(out)
    norms = {}
    for threads in (1, 2):
        forced_threads(threads)
        norms[threads] = C.column_norm(W0, A, B, 0.7)
    n = norms[1]
    np.testing.assert_array_equal(_bits(norms[2]), _bits(n))
    np.testing.assert_array_equal(_bits(_norm_with("plain", W0, A, B, 0.7)), _bits(n))
    _, n_merge = C.merge(W0, A, B, m, 0.7)
    np.testing.assert_array_equal(_bits(n_merge), _bits(n))
    for i in sorted({0, out // 2, out - 1}):
        alone = C.column_norm(W0[i:i + 1], A, B[i:i + 1], 0.7)
        np.testing.assert_array_equal(_bits(alone), _bits(n[i:i + 1]), err_msg=f"row {i}")
    _assert_within_bound(W0, A, B, 0.7, n)


@pytest.mark.parametrize("r", [4, 16, 64])
def test_float64_six_row_tile_inf_and_nan_in_W0_give_the_same_n(forced_threads, r):
    forced_threads(2)
    W0, A, B = _problem(67, 100, r, seed=800 + r)
    W0[2, 5] = np.inf  # a row with inf: n = inf
    W0[9, 0] = np.nan  # NaN
    W0[20, 3], W0[20, 4] = np.inf, -np.inf  # inf and -inf: the squares add to inf, no NaN
    W0[33, 99] = 1e200  # a square that overflows float64: inf
    W0[40, :] = 0.0
    B[40, :] = 0.0  # a zero row: n = 0
    got = {tile: _norm_with(tile, W0, A, B, 0.9) for tile in _TILES}
    n = got[_WIDEST]
    assert np.isinf(n[[2, 20, 33]]).all() and np.isnan(n[9]) and n[40] == 0.0
    for tile, other in got.items():
        np.testing.assert_array_equal(other, n, err_msg=f"{tile} tile")
        finite = np.isfinite(n)
        np.testing.assert_array_equal(_bits(other[finite]), _bits(n[finite]))
