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
