"""forward_epilogue on a team (OpenBLAS's threads when found), as column_norm.

Issue 11: the eval forward's epilogue follows the BLAS product x @ W0.T; on
an OpenMP team of its own its second thread waited for OpenBLAS's spinning
workers to be preempted. It now runs on ``dora_team_for`` like column_norm:
these tests check that its bits do not depend on the team (OpenBLAS's
threads or OpenMP's, 1 or 2 threads, right after a BLAS call), for y in a
new array, y written over base, and a 16-bit y; and that with OpenBLAS's
threads found it starts no OpenMP thread.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from dora_ref.core import kernels_numpy as KN

try:
    from dora_ref.kernels import c as C
except ImportError:  # the extension is not built
    C = None

pytestmark = pytest.mark.skipif(C is None, reason="the C extension is not built")


def _problem(dtype, N=300, out_f=1000, r=12):
    rng = np.random.default_rng(11)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    g = (rng.random(out_f) + 0.5).astype(dtype)
    return draw(N, out_f), draw(N, r), draw(out_f, r), g, draw(out_f)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_epilogue_bits_on_openblas_threads_and_openmp_teams(dtype):
    base, U, B, g, bias = _problem(dtype)

    def run():
        _ = U.T @ U  # a BLAS call just before: its workers spin
        res = {"y": C.forward_epilogue(base, U, B, g, 0.3, bias),
               "y_nobias": C.forward_epilogue(base, U, B, g, 0.3, None),
               "y16": C.forward_epilogue(base.astype(np.float32), U.astype(np.float32),
                                         B.astype(np.float32), g.astype(np.float32), 0.3,
                                         None, out_dtype=np.float16)}
        over = base.copy()
        C.forward_epilogue(over, U, B, g, 0.3, bias, out=over)
        res["y_over_base"] = over
        return res

    results = {}
    C._set_always_parallel(True)
    try:
        for pool in (True, False):
            used = C._set_blas_pool(pool)
            for threads in (1, 2):
                C.set_threads(threads)
                results[pool, threads, used] = run()
    finally:
        C._set_always_parallel(False)
        C.set_threads(0)
        C._set_blas_pool(True)
    reference = results[False, 1, 0]
    np.testing.assert_array_equal(reference["y_over_base"], reference["y"])
    # the NumPy twin up to the order of the rank-r sums (test_kernels_c bounds it)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(reference["y"], KN.forward_epilogue(base, U, B, g, 0.3, bias),
                               rtol=tol, atol=tol * np.abs(base).max())
    for key, res in results.items():
        for name, value in res.items():
            np.testing.assert_array_equal(
                value, reference[name], err_msg=f"{name}, (pool, threads, pool threads) {key}")


_THREADS_SCRIPT = """
import os, sys
import numpy as np
from dora_ref.kernels import c as C

C._set_always_parallel(True)
C.set_threads(2)
print(C._set_blas_pool(sys.argv[1] == "pool"))
rng = np.random.default_rng(0)
base, U, B = rng.standard_normal((256, 512)), rng.standard_normal((256, 4)), rng.standard_normal((512, 4))
g = np.ones(512)
_ = U.T @ U
before = len(os.listdir("/proc/self/task"))
C.forward_epilogue(base, U, B, g, 0.5, None)
print(before, len(os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc/self/task (Linux)")
def test_forward_epilogue_after_blas_runs_on_openblas_threads_not_a_second_pool():
    def run(mode):
        res = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, mode], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return (int(v) for v in res.stdout.split())

    pool, before, after = run("pool")
    if pool == 0:
        pytest.skip("no threaded pthreads OpenBLAS here: OpenMP teams only")
    assert after == before, "forward_epilogue started threads of its own beside OpenBLAS's"
    _, before, after = run("openmp")
    assert after == before + 1, "the OpenMP path should start libgomp's second thread"
