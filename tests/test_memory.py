"""Memory: DoRA's training step needs no (out, in) temporary (DESIGN.md).

tracemalloc sees NumPy's allocations. What the step must allocate anyway is
its results (y, dx, dA, dB, dmagnitude) and the activations it keeps for the
backward (the (N, out) base product and the (N, r) low-rank one). Everything
else at peak must stay below 25% of W0's bytes; PEFT's forward alone
allocates two (out, in) matrices (B@A and W0 + s*B@A), i.e. 200%.
"""
import tracemalloc

import numpy as np
import pytest

from cases import make_case
from dora_ref import dora_backward, dora_forward


@pytest.mark.parametrize("detach_norm", [True, False])
def test_training_step_peak_memory(detach_norm):
    case = make_case(2048, 2048, 8, 64, seed=0)
    tracemalloc.start()
    y, ctx = dora_forward(case.x, *case.weights)
    grads = dora_backward(case.dy, ctx, detach_norm=detach_norm)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kept = y.nbytes + sum(g.nbytes for g in grads) + ctx.base.nbytes + ctx.U.nbytes
    extra = peak - kept
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
