"""The backward's dx += dU @ A, a block of rows at a time (``functional._add_low_rank``).

It replaced ``dx += dU @ A``, whose (N, in) temporary was fresh memory in
every training step (its pages faulted one by one after glibc gave them
back) and went to memory and back. Checked here: the values within the
bound of an r-term float sum, against a long double reference, at every block
edge (N below, at and above a block, a ragged last block) and at the float64
widths where OpenBLAS gives a block other last bits than the whole product
(in = 255, 383, 511: a second adversary's finding; bit-identity with the
whole product is not claimed); and that a DoRA backward no longer allocates
the (N, in) temporary (tracemalloc's peak).
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dora_ref.core import functional as F


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_f", [3, 64, 255, 383, 511, 4096, 5000])
@pytest.mark.parametrize("r", [1, 7, 16])
def test_add_low_rank_matches_the_whole_product_at_every_block_edge(dtype, in_f, r):
    """N around one block and two (a first version's last block of one row went to BLAS's
    gemv, float64: rows left alone are now folded into even blocks)."""
    rng = np.random.default_rng(in_f + r)
    rows = F._ADD_BLOCK_BYTES // (in_f * np.dtype(dtype).itemsize)
    A = rng.standard_normal((r, in_f)).astype(dtype)
    for N in sorted({1, 2, 3, max(1, rows - 1), rows, rows + 1, rows + 2, 2 * rows + 1, 2 * rows + 3}):
        dU = rng.standard_normal((N, r)).astype(dtype)
        dx0 = rng.standard_normal((N, in_f)).astype(dtype)
        want = dx0.copy()
        want += dU @ A
        got = dx0.copy()
        F._add_low_rank(got, dU, A)
        wide = np.longdouble  # the reference, in the widest float NumPy has here
        exact = dx0.astype(wide) + dU.astype(wide) @ A.astype(wide)
        # an r-term dot product, then one addition: |error| <= gamma_{r+1} (|dx0| + |dU| |A|),
        # gamma_k = k u / (1 - k u) (Higham, Sec. 3.1), for the result and for the reference
        scale = np.abs(dx0).astype(wide) + np.abs(dU).astype(wide) @ np.abs(A).astype(wide)

        def gamma(t):
            u = np.finfo(t).eps / 2
            return (r + 1) * u / (1 - (r + 1) * u)

        bound = (gamma(dtype) + gamma(wide)) * scale
        assert np.all(np.abs(got - exact) <= bound), (N, in_f)
        assert np.all(np.abs(want - exact) <= bound), (N, in_f)  # the whole product: the same bound


def test_dora_backward_allocates_no_n_by_in_temporary():
    """The case: a training step took a fresh (N, in) array for dU @ A (8 MiB at N = 512, in = 4096)."""
    rng = np.random.default_rng(0)
    N, in_f, out_f, r = 512, 4096, 64, 8
    f32 = np.float32
    W0 = rng.standard_normal((out_f, in_f), dtype=f32)
    A = rng.standard_normal((r, in_f), dtype=f32) * f32(0.01)
    B = rng.standard_normal((out_f, r), dtype=f32) * f32(0.01)
    x = rng.standard_normal((N, in_f), dtype=f32)
    m = F.column_norm(W0, A, B, 2.0)
    y, ctx = F.dora_forward(x, W0, A, B, m, 2.0)
    dy = rng.standard_normal(y.shape, dtype=f32)
    F.dora_backward(dy, ctx)  # warm: nothing cached is counted below
    tracemalloc.start()
    try:
        grads = F.dora_backward(dy, ctx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dx_bytes = N * in_f * 4
    # dx itself, the small arrays (dz is N x out = 1/64 of dx here), and one block of rows;
    # with the whole temporary the peak was at least twice dx
    assert peak < dx_bytes + F._ADD_BLOCK_BYTES + 4 * N * out_f * 4 + (1 << 20), peak
    g = m / F.column_norm(W0, A, B, 2.0)
    dz = dy * g
    dU = 2.0 * (dz.astype(np.float64) @ B)
    dx64 = dz.astype(np.float64) @ W0 + dU @ A
    assert np.allclose(grads.dx, dx64, rtol=1e-4, atol=1e-3 * np.abs(dx64).max())
