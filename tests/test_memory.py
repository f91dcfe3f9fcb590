"""Memory: DoRA's training step needs no (out, in) temporary (the memory goal in README.md).

tracemalloc sees NumPy's allocations. What the step must allocate anyway is
its results (y, dx, dA, dB, dmagnitude) and the activations it keeps for the
backward (the (N, out) base product and the (N, r) low-rank one). Everything
else at peak must stay below 25% of W0's bytes; PEFT's forward alone
allocates two (out, in) matrices (B@A and W0 + s*B@A), i.e. 200%.

tracemalloc does not see the C kernels' own ``malloc`` scratch. The C backend
reports it (``_kernels_c.scratch_bytes`` for the two backward kernels; the
others allocate one packed panel of A or B.T, r x in or r x out rounded up to
a tile), and the C runs add it to the peak.
"""
import tracemalloc

import numpy as np
import pytest

from cases import make_case
from dora_ref import dora_backward, dora_forward


def _c_scratch(case, detach_norm):
    """An upper bound of the C kernels' malloc scratch in one training step (0 on NumPy).

    The sum over the kernels called, though they run one after another: the
    norm's and the forward epilogue's packed panels, plus what the two backward
    kernels report.
    """
    from dora_ref import backend

    if backend() != "c":
        return 0
    from dora_ref.kernels import c as C

    (N, in_f), out_f, r = case.x.shape, case.W0.shape[0], case.A.shape[0]
    item = case.W0.itemsize
    panels = ((in_f + 15) // 16 + (out_f + 15) // 16) * 16 * r * item
    scratch = panels + C.scratch_bytes("backward_lowrank", N, out_f, r, itemsize=item)
    if not detach_norm:
        scratch += C.scratch_bytes("norm_gradient_products", out_f, in_f, r, itemsize=item)
    return scratch


def test_c_kernels_report_scratch_below_their_budget(backend):
    """The scratch the C backward kernels report stays a small fraction of what they walk.

    backward_lowrank keeps one (N, r) partial of dU per block of >= 512 columns
    (at most 1/16 of dz's size by construction) plus B.T in panels and two rows
    of sums per thread; norm_gradient_products keeps at most out / (32 r) partials
    of C.T @ W0 (1/32 of W0) plus A in panels. Checked at the sizes of the memory
    test and at (4096, 4096, 8, 512), for 1 to 8 threads' worth.
    """
    if backend != "c":
        pytest.skip("the NumPy backend allocates nothing tracemalloc does not see")
    from dora_ref.kernels import c as C

    for out_f, in_f, r, N in [(2048, 2048, 8, 64), (4096, 4096, 8, 512), (4096, 4096, 12, 2048)]:
        for item in (4, 8):
            lowrank = C.scratch_bytes("backward_lowrank", N, out_f, r, itemsize=item)
            products = C.scratch_bytes("norm_gradient_products", out_f, in_f, r, itemsize=item)
            assert 0 < lowrank <= N * out_f * item / 16 + C.openmp_threads() * 64 * 1024 + 2 * out_f * r * item
            assert 0 < products <= out_f * in_f * item / 32 + C.openmp_threads() * 64 * 1024 + 2 * in_f * r * item
    # above FUSED_MAX_RANK the products are BLAS's, NumPy arrays tracemalloc sees
    assert C.scratch_bytes("backward_lowrank", 64, 2048, C.FUSED_MAX_RANK + 1) == 0


@pytest.mark.parametrize("detach_norm", [True, False])
def test_training_step_peak_memory(detach_norm):
    case = make_case(2048, 2048, 8, 64, seed=0)
    tracemalloc.start()
    y, ctx = dora_forward(case.x, *case.weights)
    grads = dora_backward(case.dy, ctx, detach_norm=detach_norm)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the (N, out) activation the forward kept until the backward wrote dz over it
    base_bytes = case.x.shape[0] * case.W0.shape[0] * case.W0.itemsize
    kept = y.nbytes + sum(g.nbytes for g in grads) + base_bytes + ctx.U.nbytes
    extra = peak - kept + _c_scratch(case, detach_norm)
    ratio = extra / case.W0.nbytes
    print(f"peak {peak / 2**20:.2f} MiB, results+activations {kept / 2**20:.2f} MiB, "
          f"extra {extra / 2**20:.2f} MiB = {ratio:.1%} of W0 ({case.W0.nbytes / 2**20:.0f} MiB)")
    assert ratio < 0.25


def test_a_transposed_weight_is_not_copied_by_the_norm():
    """Adversarial review: the C wrapper copied a non-contiguous (out, in) weight on every
    call (45.8 MiB peak for DoRALinear-style (in, out) storage vs 2.6 MiB); it now copies
    a block of rows at a time, which gives the same bits as a contiguous call."""
    from dora_ref import column_norm

    case = make_case(1024, 1024, 8, 1, seed=0)
    W0_T = np.ascontiguousarray(case.W0.T).T  # the same values, Fortran-ordered
    tracemalloc.start()
    n = column_norm(W0_T, case.A, case.B, case.scaling)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.5 * case.W0.nbytes, peak
    np.testing.assert_array_equal(n, column_norm(case.W0, case.A, case.B, case.scaling))
