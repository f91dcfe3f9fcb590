"""The fused backward split by rows (issue 11, goal 1): a tall dz on the team.

``backward_lowrank`` (C, r <= 12) cut its work only into blocks of >= 512
output columns, so any out <= 512 was one block, one thread, at any N
(64 x 2048, r = 8, float32: 456 us against NumPy's 289 us on 2 cores). Where
out is one column block, ``lowrank_row_block`` (csrc/dora_kernels.c) now
cuts N into at most 4 row blocks of whole groups of 16 rows, each with at
least 32768 elements of dz and 32 (r + 2) rows; each task adds its rows'
partials of dg (double) and dB, which are added in row-block order. So:

* The bits of every output do not depend on the number of threads (1 vs 2,
  forced onto a team), at shapes where the rows split, ragged N included.
* Each output is within the bound of ``test_kernels_c.py``'s derivation of a
  float64 reference (not a second kernel): dg sums N products dy * z,
  ``gamma_(N + r + 2) sum_N |dy| (|base| + |s| |U| @ |B|.T)``; dz = dy * g is
  one rounding (equal to the rounded float64 product); dU sums out products,
  ``gamma_(out + 2) |s| |dz| @ |B|``; dB sums N products,
  ``gamma_(N + 2) |s| |dz|.T @ |U|``; times the safety factor 4. The row
  split sums dB's N terms as row blocks of partial sums (float32 or float64)
  added in double, then rounded and scaled: an error within
  ``gamma_(rows + 2)`` of the terms, so within the same bound (the order of
  a sum changes which terms share roundings, never their number's bound).
* keep_z: ``backward_lowrank_z`` on the z the training forward keeps gives
  the bits of ``backward_lowrank`` on base, rows split or not.
* NaN and Inf reach the same elements as in NumPy's backward.
* Small N (the demo's N = 64 layers) and out > 512 stay one row block: the
  scratch the kernel reports has no row partials there.
"""
from __future__ import annotations

import numpy as np
import pytest

from dora_ref.core import kernels_numpy as NP
from dora_ref.porting.tolerance import gamma

C = pytest.importorskip("dora_ref.kernels.c", reason="the C extension is not built")

SAFETY = 4.0


@pytest.fixture(autouse=True)
def backend():
    """Override conftest's per-backend fixture: these tests call the C kernels directly."""
    yield "c"


def _problem(dtype, out_f, r, N, seed=0, s=0.7):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    return dict(dy=draw(N, out_f), base=draw(N, out_f), U=draw(N, r), B=draw(out_f, r),
                g=(rng.random(out_f) + 0.5).astype(dtype), s=s)


def _row_blocks(N, out_f, r):
    """lowrank_row_block's count of row blocks, restated (csrc/dora_kernels.c)."""
    blocks = max(1, out_f // (16 * max(1, r)))  # lowrank_col_block
    width = max(512, (-(-out_f // blocks) + 15) // 16 * 16)
    if out_f > width or N <= 0:
        return 1
    rows = max(-(-N // 4), -(-32768 // max(1, out_f)), 32 * (max(1, r) + 2))
    rows = min(-(-rows // 16) * 16, N)
    return -(-N // rows)


def _fused(p, has_z):
    args = (p["U"], p["B"], p["g"], p["s"])
    if not has_z:
        return C._backward_lowrank_fused(p["dy"], p["base"], *args)
    z = p["base"].copy()
    C.forward_epilogue(z, p["U"], p["B"], p["g"], p["s"], None, z_out=z)
    return C._backward_lowrank_z_fused(p["dy"], z, *args)


def _check_against_float64(p, got, dtype):
    dy, base, U, B, g, s = (p[k] for k in ("dy", "base", "U", "B", "g", "s"))
    dg, dz, dU, dB = got
    N, r = U.shape
    out_f = B.shape[0]
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    z64 = f(base) + s * (f(U) @ f(B).T)
    np.testing.assert_array_equal(dz, (f(dy) * f(g)).astype(dtype), err_msg="dz: one rounding")
    dz64 = f(dz)  # the kernel's dz (exact, above): the products' inputs
    a = np.abs
    bounds = {
        "dg": (np.sum(f(dy) * z64, axis=0),
               SAFETY * gamma(N + r + 2, dtype) * np.sum(a(f(dy)) * (a(f(base)) + abs(s) * (a(f(U)) @ a(f(B)).T)),
                                                         axis=0), dg),
        "dU": (s * (dz64 @ f(B)), SAFETY * gamma(out_f + 2, dtype) * abs(s) * (a(dz64) @ a(f(B))), dU),
        "dB": (s * (dz64.T @ f(U)), SAFETY * gamma(N + 2, dtype) * abs(s) * (a(dz64).T @ a(f(U))), dB),
    }
    for name, (want, bound, have) in bounds.items():
        assert have.dtype == dtype and have.shape == want.shape, name
        err = np.abs(f(have) - want)
        assert (err <= bound).all(), (
            f"{name} at {(out_f, r, N)}: error {err.max():.3g} over the bound "
            f"(at {np.unravel_index(np.argmax(err - bound), err.shape)})")


# (out, r, N): rows split (the headline 64 x 2048; ragged N, neither a multiple of
# 16 nor of G = 4; out < W = 16 columns; a last row block of one row), and not
# (N = 1, the demo's N = 64, out > 512: several column blocks)
SPLIT = [(64, 8, 2048), (64, 8, 2047), (100, 3, 1999), (5, 2, 7001), (64, 12, 1537),
         (512, 1, 1029)]
WHOLE = [(64, 8, 1), (64, 8, 64), (64, 8, 512), (600, 5, 700)]


def test_the_row_rule_splits_where_meant():
    for shape in SPLIT:
        assert _row_blocks(shape[2], shape[0], shape[1]) > 1, shape
    for shape in WHOLE:
        assert _row_blocks(shape[2], shape[0], shape[1]) == 1, shape
    assert _row_blocks(2048, 64, 8) == 4 and _row_blocks(1537, 64, 12) == 4  # 3 x 512 + 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_partials_reported_only_where_rows_split(dtype):
    """The scratch backward_lowrank reports: the row blocks' partials of dg and dB
    (nrows * out * (8 + r * itemsize) bytes) where rows split, none elsewhere."""
    item = np.dtype(dtype).itemsize
    threads = C.openmp_threads()
    for out_f, r, N in SPLIT + WHOLE:
        width = max(512, out_f)  # one column block (all shapes here but (600, 5, 700))
        nrows = _row_blocks(N, out_f, r)
        panels = -(-out_f // 16) * 16 * r * item
        per_thread = width * 8 + r * (width + 16) * item
        got = C.scratch_bytes("backward_lowrank", N, out_f, r, itemsize=item)
        if out_f <= 512:
            partials = nrows * out_f * (8 + r * item) if nrows > 1 else 0
            assert got == partials + panels + threads * per_thread, (out_f, r, N)
            assert partials <= N * out_f * item / 16  # the partials' bound
        else:
            assert got >= 2 * N * r * item  # dU's partials, one (N, r) array a column block


@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_blocks_bits_do_not_depend_on_threads(dtype, has_z):
    if not C.openmp_enabled():
        pytest.skip("one thread whatever is asked: nothing to compare")
    problems = [_problem(dtype, *shape, seed=i) for i, shape in enumerate(SPLIT + WHOLE)]
    results = {}
    C._set_always_parallel(True)
    try:
        for threads in (1, 2):
            C.set_threads(threads)
            results[threads] = [_fused(p, has_z) for p in problems]
    finally:
        C._set_always_parallel(False)
        C.set_threads(0)
    for shape, one, two in zip(SPLIT + WHOLE, results[1], results[2]):
        for name, a, b in zip(("dg", "dz", "dU", "dB"), one, two):
            assert a.tobytes() == b.tobytes(), f"{name} at {shape}: 1 and 2 threads differ"


@pytest.mark.parametrize("r", range(1, 13))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_blocks_within_float64_bound(dtype, r):
    for out_f, N in [(64, 2048), (21, 1571), (1, 4097)]:
        p = _problem(dtype, out_f, r, N, seed=r, s=-1.3 if r % 2 else 0.7)
        if out_f != 1:
            assert _row_blocks(N, out_f, r) > 1
        for has_z in (False, True):
            _check_against_float64(p, _fused(p, has_z), dtype)
    p = _problem(dtype, 64, r, 1, seed=r)  # N = 1: one row
    _check_against_float64(p, _fused(p, False), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SPLIT + WHOLE)
def test_split_and_whole_shapes_within_float64_bound(shape, dtype):
    """Every shape above, rows split or not, one column block or two (600 columns:
    dU from the sum pass of the column blocks' partials), against float64."""
    p = _problem(dtype, *shape, seed=11, s=-0.6)
    for has_z in (False, True):
        _check_against_float64(p, _fused(p, has_z), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SPLIT + WHOLE)
def test_keep_z_bits_equal_with_row_blocks(shape, dtype):
    p = _problem(dtype, *shape, seed=7)
    for name, a, b in zip(("dg", "dz", "dU", "dB"), _fused(p, False), _fused(p, True)):
        assert a.tobytes() == b.tobytes(), f"{name} at {shape}: keep_z changed the bits"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN/Inf on purpose
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_row_blocks_nan_inf_propagate_like_numpy(bad, dtype):
    """A NaN or Inf in one row block's dy or base reaches dg's and dB's columns
    through that block's partials, and dU's row, as in NumPy's backward."""
    p = _problem(dtype, 64, 8, 2048, seed=5)
    assert _row_blocks(2048, 64, 8) == 4
    p["dy"][1500, 3] = bad  # in the third row block
    p["base"][10, 40] = bad  # in the first
    p["g"][20] = bad  # every row block
    args = (p["dy"], p["base"], p["U"], p["B"], p["g"], p["s"])
    for c, n, name in zip(C.backward_lowrank(*args), NP.backward_lowrank(*args),
                          ("dg", "dz", "dU", "dB")):
        for what, fn in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
            np.testing.assert_array_equal(fn(c), fn(n), err_msg=f"{name}: {what} pattern differs")
