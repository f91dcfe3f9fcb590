"""The C forward epilogue's rank-r tile: the bits of one fixed sequence of roundings.

The forward epilogue forms U @ B.T in register tiles of rows (full tiles of
G = 4 rows and W columns, edge tiles for the rest) and each element is one
sum, ``((0 + u_0 b_0) + u_1 b_1) + ...`` in k order, each product and each
sum rounded once (the build does not contract them), followed by
z = base + s * P and y = g * z (+ bias). So y must not depend on which tile
a row falls in, which differs by rows (blocks of rows) and by columns (all
the rows from the first), nor on the number of threads; any tile that
reorders or fuses the terms (a wider register tile, fused multiply-adds)
must show up here.

What is asserted: y (with and without bias), z kept, y over base (with the
finiteness flag) and a float16 y, bit for bit against NumPy evaluating that
same sequence of roundings (a loop over k of float32/float64 elementwise
operations), by rows, by columns and by the rule, on 1 and 2 threads; at N
that leave every remainder of row groups, with columns that leave a partial
tile, at ranks 1 to 64; and the finiteness flag set by an inf in any row.
"""
import numpy as np
import pytest

try:
    from dora_ref.kernels import c as C
except ImportError:  # pragma: no cover - the C extension is not built
    C = None

pytestmark = pytest.mark.skipif(C is None, reason="the C extension is not built")

S = 0.3


def _sequential(base, U, B, g, bias, s):
    """y and z with the C kernel's roundings, in its order: P summed over k from +0,
    then z = base + s * P, y = g * z (+ bias)."""
    dt = base.dtype.type
    P = np.zeros(base.shape, base.dtype)
    for k in range(U.shape[1]):
        P = P + U[:, k, None] * B[None, :, k]
    z = base + dt(s) * P
    y = g * z
    return (y if bias is None else y + bias), z


# (N, out, r): N from 6 to 48, with every remainder of four- and six-row groups;
# out with a partial tile of columns (16 float32 or 8 float64 a tile); r from 1 to
# 64; rows 4 KiB apart (out = 1024 float32, 512 float64)
SHAPES = [(24, 64, 32), (48, 80, 64), (25, 70, 33), (26, 17, 40), (27, 64, 64), (28, 33, 32),
          (29, 100, 48), (32, 64, 64), (13, 130, 31), (6, 16, 64), (7, 9, 1), (30, 1024, 32),
          (30, 512, 40)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,out_f,r", SHAPES)
def test_forward_tile_gives_the_sequential_bits(N, out_f, r, dtype):
    rng = np.random.default_rng(N * 1000 + out_f * 7 + r)
    draw = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    base, U, B, g, bias = draw(N, out_f), draw(N, r), draw(out_f, r), draw(out_f), draw(out_f)
    y_ref, z_ref = _sequential(base, U, B, g, bias, S)
    y_nobias_ref, _ = _sequential(base, U, B, g, None, S)
    f32 = [a.astype(np.float32) for a in (base, U, B, g)]
    y16_ref = _sequential(*f32, None, S)[0].astype(np.float16)
    try:
        C._BLAS_LOWRANK = False  # the tile at every shape (at r >= out the wrappers use BLAS)
        C._set_always_parallel(True)
        for threads in (1, 2):
            C.set_threads(threads)
            for layout in ("rows", "columns", "rule"):
                C._set_forward_layout(layout)
                where = f"{layout}, {threads} thread(s)"
                np.testing.assert_array_equal(C.forward_epilogue(base, U, B, g, S, bias), y_ref,
                                              err_msg=where)
                np.testing.assert_array_equal(C.forward_epilogue(base, U, B, g, S, None),
                                              y_nobias_ref, err_msg=where)
                z = base.copy()
                np.testing.assert_array_equal(C._forward_epilogue_keep_z(z, U, B, g, S, bias),
                                              y_ref, err_msg=where)
                np.testing.assert_array_equal(z, z_ref, err_msg=where)
                over = base.copy()
                y, finite = C._forward_epilogue_flagged(over, U, B, g, S, bias,
                                                        C.EPILOGUE_OVER_BASE)
                assert y is over and finite, where
                np.testing.assert_array_equal(over, y_ref, err_msg=where)
                np.testing.assert_array_equal(
                    C.forward_epilogue(*f32, S, None, out_dtype=np.float16), y16_ref,
                    err_msg=where)
    finally:
        C._BLAS_LOWRANK = True
        C._set_forward_layout("rule")
        C._set_always_parallel(False)
        C.set_threads(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("row", [0, 5, 24, 29])
def test_forward_tile_flags_a_nonfinite_y_in_any_row(row, dtype):
    """An inf in one row of base (first and last rows of tiles, in the first
    and the second block of rows): the finiteness flag is set."""
    rng = np.random.default_rng(row)
    draw = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    N, out_f, r = 30, 48, 32
    base, U, B, g = draw(N, out_f), draw(N, r), draw(out_f, r), draw(out_f)
    base[row, 17] = np.inf
    try:
        C.set_threads(1)
        y, finite = C._forward_epilogue_flagged(base.copy(), U, B, g, S, None, C.EPILOGUE_NEW)
    finally:
        C.set_threads(0)
    assert not finite and np.isinf(y[row, 17])
