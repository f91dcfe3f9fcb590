"""The norm's tile rounds alike wherever a row falls (C backend).

Where the CPU has FMA, the tile of column_norm, merge and unmerge adds each
rank-r term with one fused multiply-add (``csrc/dora_kernels_impl.h``,
``madd`` in its tiles), in the full 4 x 16 tile (vectorized) and in the edge tiles
(the last rows of a block, the last columns of a row) alike. A row's results
must then not depend on which tile computed it: the row alone (a group of
one row, so always an edge tile) gives the bits it has inside a larger
problem (a full group of four rows). Without FMA both tiles multiply and add,
and the same must hold. The columns keep their positions, so each row's
squares go to the same lanes in the same order.

Independent check: the column norm against float64 within the bound of
``tests/test_kernels_c.py`` (``2 * 4 * gamma_{in + r + 2} * ||a_i||``, a_ij =
|W0_ij| + |s| |B_i|.|A_j|), which covers one or two roundings per term.
"""
from __future__ import annotations

import numpy as np
import pytest

from dora_ref.porting.tolerance import gamma

from ci_env import c_kernels_or_skip  # the C kernels, or a skip (DORA_REF_REQUIRE_C: an error)

C = c_kernels_or_skip()

from test_kernels_c import forced_threads  # noqa: E402,F401 (the fixture: set_threads, forced)

# 9 rows: two full groups of 4 and an edge row; 37 columns: two full tiles of
# 16 floats (four of 8 doubles) and an edge of 5; r = 5 terms per element.
OUT, IN, R, S = 9, 37, 5, 0.7


def _problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((OUT, IN)).astype(dtype)
    A = rng.standard_normal((R, IN)).astype(dtype)
    B = rng.standard_normal((OUT, R)).astype(dtype)
    m = rng.uniform(0.5, 2.0, OUT).astype(dtype)
    return W0, A, B, m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_norm_row_alone_has_the_bits_of_the_row_in_a_full_tile(dtype):
    W0, A, B, _ = _problem(dtype)
    n = C.column_norm(W0, A, B, S)
    for i in range(OUT):
        alone = C.column_norm(W0[i:i + 1], A, B[i:i + 1], S)
        np.testing.assert_array_equal(alone, n[i:i + 1], err_msg=f"row {i}")
    W64, A64, B64 = (x.astype(np.float64) for x in (W0, A, B))
    ref = np.linalg.norm(W64 + S * (B64 @ A64), axis=1)
    a = np.abs(W64) + abs(S) * (np.abs(B64) @ np.abs(A64))
    bound = 2 * 4 * gamma(IN + R + 2, dtype) * np.linalg.norm(a, axis=1)
    assert np.all(np.abs(n - ref) <= bound), np.max(np.abs(n - ref) / bound)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_and_unmerge_row_alone_have_the_bits_of_the_row_in_a_full_tile(dtype):
    W0, A, B, m = _problem(dtype, seed=1)
    Wm, n = C.merge(W0, A, B, m, S)
    np.testing.assert_array_equal(n, C.column_norm(W0, A, B, S))
    factor = (m / n).astype(dtype)
    back = C.unmerge(Wm, A, B, factor, S)
    for i in range(OUT):
        Wm_i, n_i = C.merge(W0[i:i + 1], A, B[i:i + 1], m[i:i + 1], S)
        np.testing.assert_array_equal(Wm_i, Wm[i:i + 1], err_msg=f"merge, row {i}")
        np.testing.assert_array_equal(n_i, n[i:i + 1], err_msg=f"merge's n, row {i}")
        back_i = C.unmerge(Wm[i:i + 1], A, B[i:i + 1], factor[i:i + 1], S)
        np.testing.assert_array_equal(back_i, back[i:i + 1], err_msg=f"unmerge, row {i}")


# The float32 norm takes six-row tiles (norm_full6) in the fused mode from
# r = 16 on; merge and unmerge keep four. 67 rows: a block of 60 (ten full
# groups of six), then a group of six and an edge row; 37 columns as above.
OUT6, R6 = 67, 17


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_norm_six_row_tile_row_alone_and_merge_have_its_bits(dtype):
    rng = np.random.default_rng(2)
    W0 = rng.standard_normal((OUT6, IN)).astype(dtype)
    A = rng.standard_normal((R6, IN)).astype(dtype)
    B = rng.standard_normal((OUT6, R6)).astype(dtype)
    m = rng.uniform(0.5, 2.0, OUT6).astype(dtype)
    n = C.column_norm(W0, A, B, S)
    for i in range(OUT6):
        alone = C.column_norm(W0[i:i + 1], A, B[i:i + 1], S)
        np.testing.assert_array_equal(alone, n[i:i + 1], err_msg=f"row {i}")
    _, n_merge = C.merge(W0, A, B, m, S)  # four-row tiles, the same terms in the same order
    np.testing.assert_array_equal(n_merge, n)
    W64, A64, B64 = (x.astype(np.float64) for x in (W0, A, B))
    ref = np.linalg.norm(W64 + S * (B64 @ A64), axis=1)
    a = np.abs(W64) + abs(S) * (np.abs(B64) @ np.abs(A64))
    bound = 2 * 4 * gamma(IN + R6 + 2, dtype) * np.linalg.norm(a, axis=1)
    assert np.all(np.abs(n - ref) <= bound), np.max(np.abs(n - ref) / bound)


def _lane_sums_norm(V):
    """The kernel's sum of squares, replayed in NumPy: column j's square goes to
    lane j % 8 (ACCW), each lane adds in column order, the eight lanes are
    added in order, then sqrt, rounded once to V's dtype. The squares are
    taken in float64 (for float32 V exact; for float64 V rounded, as the
    kernel's multiply then add)."""
    V64 = V.astype(np.float64)
    out, cols = V.shape
    acc = np.zeros((out, 8))
    for h in range(0, cols, 8):
        sq = V64[:, h:h + 8] * V64[:, h:h + 8]
        acc[:, :sq.shape[1]] += sq
    t = np.zeros(out)
    for lane in range(8):
        t += acc[:, lane]
    return np.sqrt(t).astype(V.dtype)


@pytest.mark.parametrize("r", [8, R6, 40])  # four rows, six (fused mode), six without fma squares
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_norm_fused_squares_have_the_bits_of_a_multiply_and_an_add(dtype, r):
    """Where the CPU has FMA, the float32 norm adds each square with one fused
    multiply-add (csrc/dora_kernels_impl.h, add_square): exact products, so
    the bits of acc + (double)v * (double)v. With B = 0 the tile's P is 0 and
    V = W0, so the norm is the lanes' sums of W0's squares, replayed here:
    entries with all 24 (53) significant bits, over a range of exponents from
    subnormal float32 to near its largest, where a square rounded in float, or
    a product rounded before the add, would differ."""
    rng = np.random.default_rng(3)
    finfo = np.finfo(dtype)
    expo = rng.integers(-140, 120, size=(OUT6, IN)) if dtype == np.float32 \
        else rng.integers(-500, 500, size=(OUT6, IN))
    W0 = (rng.uniform(1.0, 2.0, (OUT6, IN)) * np.exp2(expo.astype(np.float64))).astype(dtype)
    W0 *= rng.choice(np.array([-1, 1], dtype=dtype), size=W0.shape)
    W0[3, 5] = finfo.max / 4 if dtype == np.float32 else 1e150  # a square still finite in float64
    W0[7, :] = finfo.smallest_subnormal * rng.integers(1, 1000, IN)  # a row of subnormals
    A = rng.standard_normal((r, IN)).astype(dtype)
    B = np.zeros((OUT6, r), dtype=dtype)
    expected = _lane_sums_norm(W0)
    assert np.all(np.isfinite(expected)) and np.all(expected[:7] > 0)
    n = C.column_norm(W0, A, B, S)
    np.testing.assert_array_equal(n, expected)
    _, n_merge = C.merge(W0, A, B, np.ones(OUT6, dtype=dtype), S)
    np.testing.assert_array_equal(n_merge, expected)


# A taken in chunks of columns (norm_chunk: 8 * r * in > 1 MiB), where the
# float32 six-row body at r >= 32 prefetches the next tile's W0
# (norm_prefetch): rows not a multiple of six (a short last group, blocks of
# 60 rows and a short last block), columns not a multiple of 16 and chunks
# that do not divide them (a short last chunk, a short last tile), r from 16
# (the fma squares' body, chunked without prefetch) to 70.
_CHUNKED = [  # out, in, r: chunk of columns
    (7, 8200, 16),    # 128 columns (the fma squares' body)
    (13, 4001, 33),   # 112
    (61, 3300, 40),   # 96
    (127, 2100, 64),  # 64
    (67, 1890, 70),   # 48
]


@pytest.mark.parametrize("shape", _CHUNKED, ids=lambda s: "out{}_in{}_r{}".format(*s))
def test_column_norm_chunked_prefetched_tile_has_the_bits_of_merge_on_any_threads(
        shape, forced_threads):
    out, in_, r = shape
    assert 8 * r * in_ > 1 << 20  # A is taken in chunks
    rng = np.random.default_rng(out + in_ + r)
    W0 = rng.standard_normal((out, in_)).astype(np.float32)
    A = rng.standard_normal((r, in_)).astype(np.float32)
    B = rng.standard_normal((out, r)).astype(np.float32)
    m = rng.uniform(0.5, 2.0, out).astype(np.float32)
    norms = {}
    for threads in (1, 2):
        forced_threads(threads)
        norms[threads] = C.column_norm(W0, A, B, S)
    n = norms[1]
    np.testing.assert_array_equal(norms[2], n)
    _, n_merge = C.merge(W0, A, B, m, S)  # four-row tiles, whole rows, no prefetch
    np.testing.assert_array_equal(n_merge, n)
    for i in sorted({0, out // 2, out - 1}):
        alone = C.column_norm(W0[i:i + 1], A, B[i:i + 1], S)
        np.testing.assert_array_equal(alone, n[i:i + 1], err_msg=f"row {i}")
    W16 = W0.astype(np.float16)  # the 16-bit body: the float32 kernel on the widened W0
    np.testing.assert_array_equal(C.column_norm(W16, A, B, S),
                                  C.column_norm(W16.astype(np.float32), A, B, S))
    W64, A64, B64 = (x.astype(np.float64) for x in (W0, A, B))
    ref = np.linalg.norm(W64 + S * (B64 @ A64), axis=1)
    a = np.abs(W64) + abs(S) * (np.abs(B64) @ np.abs(A64))
    bound = 2 * 4 * gamma(in_ + r + 2, np.float32) * np.linalg.norm(a, axis=1)
    assert np.all(np.abs(n - ref) <= bound), np.max(np.abs(n - ref) / bound)
