"""What is and is not deterministic across thread counts, tested exactly.

* Bitwise identical for any number of threads: every C kernel (tested in
  ``test_kernels_c.py``), and so, with the C backend, everything built only
  from them and elementwise NumPy: ``column_norm`` (the magnitude's initial
  value), ``merge`` and ``unmerge``. (The NumPy backend forms B @ A with
  BLAS, so there they are only within rounding.)
* Not bitwise identical: ``dora_forward`` and ``dora_backward``, because
  their large products (x @ W0.T, x @ A.T, dz @ W0, dU.T @ x) are BLAS's,
  and BLAS splits a sum differently for another number of threads. They
  stay within the rounding bound of those sums, derived below and asserted
  with 1 and 2 threads for both BLAS and the C kernels.

Bound (Higham, Eq. 3.5): one evaluation of a sum of k products is within
``gamma_k * sum |terms|`` of the exact value, so two evaluations in different
orders differ by at most ``2 gamma_k sum |terms|``; each bound below is that,
built elementwise from absolute values in float64, with the safety factor 4
of ``test_kernels_c.py`` for the few roundings on top:

* y = g (x @ W0.T + s (x @ A.T) @ B.T) + bias (the norm is bitwise fixed):
  ``|g| (|x| @ |W0|.T + |s| (|x| @ |A|.T) @ |B|.T)``, k = in + r + 2.
* dx = dz @ W0 + dU @ A, with dz = dy g and dU = s dz @ B bitwise fixed:
  ``|dz| @ |W0| + |dU| @ |A|``, k = out + r + 1.
* dA = dU.T @ x: ``|dU|.T @ |x|``, k = N.
* dB = s dz.T @ U, with U from BLAS: ``|s| |dz|.T @ (|U| + dU_bound)``, k = N + in + r,
  where dU_bound = |x| @ |A|.T bounds U's own difference (folded into k).
* dmagnitude = dg / n, dg = sum_N dy z: ``sum_N |dy| |z|_bound / n``, with
  |z|_bound = |x| @ |W0|.T + |s| (|x| @ |A|.T) @ |B|.T, k = N + in + r + 2.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from dora_ref.core import functional as F
from dora_ref.porting.tolerance import gamma

threadpoolctl = pytest.importorskip("threadpoolctl")

try:
    from dora_ref.kernels import c as C
except ImportError:  # pragma: no cover - depends on the install
    C = None


def _problem(dtype, out_f=768, in_f=1024, r=8, N=300):  # large enough for BLAS to thread
    rng = np.random.default_rng(21)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    return dict(
        x=draw(N, in_f), W0=draw(out_f, in_f), A=draw(r, in_f), B=draw(out_f, r),
        m=(rng.random(out_f) + 0.5).astype(dtype), bias=draw(out_f), dy=draw(N, out_f), s=0.7,
    )


def _run(p, threads):
    """Forward, backward and merge with `threads` BLAS threads and C threads."""
    if C is not None:
        C._set_always_parallel(True)
        C.set_threads(threads)
    try:
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            y, ctx = F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"], p["bias"])
            grads = F.dora_backward(p["dy"], ctx)
            W_merged, n = F.merge(p["W0"], p["A"], p["B"], p["m"], p["s"])
            unmerged = F.unmerge(W_merged, p["A"], p["B"], p["m"], p["s"], n)
            norm = F.column_norm(p["W0"], p["A"], p["B"], p["s"])
    finally:
        if C is not None:
            C._set_always_parallel(False)
            C.set_threads(0)
    return dict(y=y, dx=grads.dx, dA=grads.dA, dB=grads.dB, dmagnitude=grads.dmagnitude,
                W_merged=W_merged, n=n, unmerged=unmerged, norm=norm)


def _bounds(p, dtype):
    """The bounds of the module docstring, in float64."""
    a = {k: np.abs(v).astype(np.float64) for k, v in p.items() if isinstance(v, np.ndarray)}
    s = abs(p["s"])
    N, in_f = p["x"].shape
    out_f, r = p["B"].shape
    n = F.column_norm(*(p[k].astype(np.float64) for k in ("W0", "A", "B")), p["s"])
    g = a["m"] / n
    z = a["x"] @ a["W0"].T + s * (a["x"] @ a["A"].T) @ a["B"].T
    dz = a["dy"] * g
    dU = s * dz @ a["B"]
    U = a["x"] @ a["A"].T
    safety = 4 * 2
    return {
        "y": safety * gamma(in_f + r + 2, dtype) * g * z,
        "dx": safety * gamma(out_f + r + 1, dtype) * (dz @ a["W0"] + dU @ a["A"]),
        "dA": safety * gamma(N, dtype) * (dU.T @ a["x"]),
        "dB": safety * gamma(N + in_f + r, dtype) * s * (dz.T @ (2 * U)),
        "dmagnitude": safety * gamma(N + in_f + r + 2, dtype) * (a["dy"] * z).sum(axis=0) / n,
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_unmerge_and_norm_bits_do_not_depend_on_threads(dtype, backend):
    if backend != "c":
        pytest.skip("the NumPy backend forms B @ A with BLAS: its bits may depend on threads")
    p = _problem(dtype)
    one, two = _run(p, 1), _run(p, 2)
    for name in ("W_merged", "n", "unmerged", "norm"):
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_and_backward_agree_across_threads_within_blas_rounding(dtype):
    p = _problem(dtype)
    one, two = _run(p, 1), _run(p, 2)
    bounds = _bounds(p, dtype)
    if all(np.array_equal(one[name], two[name]) for name in bounds):
        pytest.skip("BLAS gave the same bits with 1 and 2 threads here: nothing to bound")
    for name, bound in bounds.items():
        err = np.abs(one[name].astype(np.float64) - two[name].astype(np.float64))
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert (err <= bound).all(), (
            f"{name}: |1 thread - 2 threads| = {err[worst]:.3g} > bound {bound[worst]:.3g} "
            f"at {worst}"
        )


def _openblas_info():
    """threadpoolctl's view of NumPy's OpenBLAS (the one in NumPy's wheel folder
    where SciPy has mapped a copy of its own too), or None."""
    found = [info for info in threadpoolctl.threadpool_info() if info.get("internal_api") == "openblas"]
    wheel_libs = os.path.realpath(os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs"))
    mine = [info for info in found if os.path.dirname(os.path.realpath(info["filepath"])) == wheel_libs]
    return (mine or found or [None])[0]


_SCIPY_FIRST_SCRIPT = """
import scipy.linalg  # maps SciPy's own OpenBLAS before dora_ref looks
from dora_ref.kernels import c as C
pool = C._openblas_pool()
print(C._set_blas_pool(True), pool[2] if pool else None)
"""


@pytest.mark.skipif(C is None, reason="the C extension is not built")
def test_openblas_pool_is_numpys_when_scipy_mapped_its_openblas_first():
    """Regression: with SciPy (scikit-learn's dependency) imported first, two
    OpenBLAS copies are mapped and the lookup gave up, so the kernels' teams
    went back to OpenMP depending on import order (the full test suite caught
    it). NumPy's copy, in its wheel folder, is the one its products use."""
    import subprocess
    import sys

    info = _openblas_info()
    if info is None or info.get("threading_layer") != "pthreads" or info["num_threads"] < 2:
        pytest.skip(f"NumPy's BLAS here is not a threaded pthreads OpenBLAS: {info}")
    res = subprocess.run([sys.executable, "-c", _SCIPY_FIRST_SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    threads, path = res.stdout.split()
    assert int(threads) == info["num_threads"]
    assert os.path.realpath(path) == os.path.realpath(info["filepath"])


@pytest.mark.skipif(C is None, reason="the C extension is not built")
def test_openblas_pool_is_found_where_numpy_has_a_threaded_pthreads_openblas():
    info = _openblas_info()
    if info is None or info.get("threading_layer") != "pthreads" or info["num_threads"] < 2:
        pytest.skip(f"NumPy's BLAS here is not a threaded pthreads OpenBLAS: {info}")
    pool = C._openblas_pool()
    assert pool is not None, "column_norm would not use OpenBLAS's threads here"
    address, threads, path = pool
    assert address and threads == info["num_threads"]
    assert os.path.realpath(path) == os.path.realpath(info["filepath"])


@pytest.mark.skipif(C is None, reason="the C extension is not built")
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_kernel_bits_on_openblas_threads_and_openmp_teams(dtype):
    """The kernels whose teams run on OpenBLAS's threads when they are found
    (``_set_blas_pool``: column_norm, forward_epilogue, backward_epilogue,
    backward_lowrank, norm_gradient_products), else on OpenMP's, give the same
    bits either way, for 1 and 2 threads, and right after a BLAS call (when
    OpenBLAS's workers spin). float16: the 16-bit kernels (norm and products)
    on float32 adapters, and the epilogue's float16 y."""
    rng = np.random.default_rng(5)
    lp = dtype == np.float16
    adapter = np.float32 if lp else dtype
    out_f, in_f, r, N = 1000, 700, 12, 300
    draw = lambda *shape: rng.standard_normal(shape).astype(adapter)  # noqa: E731
    W0 = rng.standard_normal((out_f, in_f)).astype(dtype)
    A, B, U, dy, base = draw(r, in_f), draw(out_f, r), draw(N, r), draw(N, out_f), draw(N, out_f)
    g = (rng.random(out_f) + 0.5).astype(adapter)

    def kernels():
        res = {"norm": C.column_norm(W0, A, B, 0.3)}
        assert r <= C.FUSED_MAX_RANK  # the fused kernels, not BLAS
        res.update(zip(("WAt", "CtW"), C.norm_gradient_products(W0, A, B)))
        if lp:
            res["y16"] = C.forward_epilogue(base, U, B, g, 0.3, None, out_dtype=np.float16)
        else:
            res["y"] = C.forward_epilogue(base, U, B, g, 0.3, g)
            res["y_nobias"] = C.forward_epilogue(base, U, B, g, 0.3, None)
            over = base.copy()
            C.forward_epilogue(over, U, B, g, 0.3, g, out=over)  # y written over base
            assert np.array_equal(over, res["y"])
            res.update(zip(("dg", "dz"), C.backward_epilogue(dy, base, U, B, g, 0.3)))
            res.update(zip(("lr_dg", "lr_dz", "dU", "dB"),
                           C._backward_lowrank_fused(dy, base, U, B, g, 0.3)))
        return res

    results = {}
    C._set_always_parallel(True)
    try:
        for pool in (True, False):
            used = C._set_blas_pool(pool)
            assert pool or used == 0
            for threads in (1, 2):
                C.set_threads(threads)
                _ = A @ A.T  # a BLAS call just before: its workers spin
                results[pool, threads, used] = kernels()
    finally:
        C._set_always_parallel(False)
        C.set_threads(0)
        C._set_blas_pool(True)
    reference = results[False, 1, 0]
    assert reference["norm"].dtype == (np.float32 if lp else dtype)
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
W0, A, B = rng.standard_normal((512, 256)), rng.standard_normal((4, 256)), rng.standard_normal((512, 4))
base, U = rng.standard_normal((256, 512)), rng.standard_normal((256, 4))
_ = A @ A.T
before = len(os.listdir("/proc/self/task"))
if sys.argv[2] == "column_norm":
    C.column_norm(W0, A, B, 0.5)
else:
    C.forward_epilogue(base, U, B, np.ones(512), 0.5, None)
print(before, len(os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(C is None, reason="the C extension is not built")
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc/self/task (Linux)")
@pytest.mark.parametrize("kernel", ["column_norm", "forward_epilogue"])
def test_kernel_after_blas_runs_on_openblas_threads_not_a_second_pool(kernel):
    """Issue: right after a BLAS call, OpenBLAS's workers spin and an OpenMP
    team's threads waited for them to be preempted. With OpenBLAS's threads
    found, a two-thread column_norm (or forward_epilogue, which follows
    x @ W0.T) starts no OpenMP thread at all (a fresh process: the thread
    count does not grow); without them, libgomp starts its worker."""
    import subprocess
    import sys

    def run(mode):
        res = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, mode, kernel], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        pool, before, after = (int(v) for v in res.stdout.split())
        return pool, before, after

    pool, before, after = run("pool")
    if pool == 0:
        pytest.skip("no threaded pthreads OpenBLAS here: OpenMP teams only")
    assert after == before, f"{kernel} started threads of its own beside OpenBLAS's"
    _, before, after = run("openmp")
    assert after == before + 1, "the OpenMP path should start libgomp's second thread"
