"""A fork while another thread is inside ``dora_ref.column_norm`` or ``dora_ref.merge``.

Session 23's adversary: the public functions check their inputs before any
kernel runs, and the finiteness checks summed the squares of each array
with NumPy's ``vdot``. OpenBLAS runs a dot product of more than 10,000
entries on its worker threads, and a fork from another thread in the middle
of it stopped those workers: the computing thread waited for them for good
(3 of 3 runs with B of (2048, 8), float64; its C stack ``exec_blas`` <-
``ddot_k`` <- ``array_vdot``), although the C kernels after the check let a
fork wait for them. ``_validate.sum_squares`` now sums in C on the calling
thread (``dora_sum_squares_f32/_f64``): nothing a fork can catch half done.

Each case runs in a subprocess under a time limit (a hang fails the test
instead of hanging pytest) and forks many times. The computing thread calls
only dora_ref's public functions that make no NumPy product on the C
backend (a fork during a NumPy product can hang in OpenBLAS itself, with or
without dora_ref: the README says so).
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dora_ref.core import _validate

try:
    from dora_ref.kernels import c as C
except ImportError:  # pragma: no cover - depends on the install
    C = None

TIME_LIMIT = 90
FORKS = 40


@pytest.fixture(autouse=True)
def backend():
    """Override conftest's per-backend fixture: the cases pick their own."""
    yield "c"


_CASE = """
import os, signal, threading, time
import numpy as np
import dora_ref

signal.alarm({limit})
rng = np.random.default_rng(0)
W0 = rng.standard_normal((2048, {inner}))
A = rng.standard_normal(({r}, {inner})) / 30
B = rng.standard_normal((2048, {r}))        # 16,384 or 65,536 entries: above OpenBLAS's 10,000
m = np.ones(2048)
stop = False
calls = 0


def busy():
    global calls
    while not stop:
        {call}
        calls += 1


t = threading.Thread(target=busy, daemon=True)
t.start()
time.sleep(0.05)
for i in range({forks}):
    pid = os.fork()
    if pid == 0:
        os._exit(0)                         # the child does nothing
    os.waitpid(pid, 0)
    time.sleep(0.002 * (i % 7))             # forks at varied points of the calls
stop = True
t.join(timeout=20)
print("finished" if not t.is_alive() else "hung", calls)
os._exit(0)
"""


@pytest.mark.skipif(C is None, reason="without the C extension the checks use NumPy's vdot")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("call", [
    "dora_ref.column_norm(W0, A, B, 2.0)",
    "dora_ref.merge(W0, A, B, m, 2.0)",
], ids=["column_norm", "merge"])
@pytest.mark.parametrize("inner, r", [(2048, 8), (256, 32)], ids=["adversary", "checks_longer"])
def test_fork_while_another_thread_checks_a_large_adapter_never_hangs(call, inner, r):
    # the adversary's shape, and one where the checks take a larger share of each call;
    # before the fix, 40 forks hung the computing thread in 11 of 12 runs outside pytest
    code = textwrap.dedent(_CASE).format(limit=TIME_LIMIT, forks=FORKS, call=call, inner=inner, r=r)
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=TIME_LIMIT + 30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung (killed after {TIME_LIMIT + 30} s): {exc.stdout!r} {exc.stderr!r}")
    if res.returncode == -signal.SIGALRM:
        pytest.fail(f"hung (ended by its alarm after {TIME_LIMIT} s): {res.stdout!r} {res.stderr!r}")
    assert res.returncode == 0, res.stdout + res.stderr
    state, calls = res.stdout.split()
    assert state == "finished", res.stdout
    assert int(calls) >= 1, "the computing thread never completed a call: the case did not run"


# ---------------------------------------------------------------------------
# sum_squares itself, against an independent float64 sum
# ---------------------------------------------------------------------------


@pytest.mark.skipif(C is None, reason="the C kernel is installed by dora_ref.kernels.c")
def test_sum_squares_takes_the_c_kernel_on_c_contiguous_float_arrays():
    assert _validate._SUM_SQUARES_C is not None
    assert set(_validate._SUM_SQUARES_C[1]) == {"f", "d"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0,), (1,), (15,), (16,), (17,), (3, 5), (257, 33), (2, 3, 40)])
def test_sum_squares_is_the_sum_of_the_squares(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal(shape).astype(dtype)
    want = math.fsum(float(v) * float(v) for v in a.ravel())  # exact sum, rounded once
    got = _validate.sum_squares(a)
    assert type(got) is float
    # float64 sums of n squares of float32 values (exact in double): n * 2**-53 relative;
    # float64 values: the squares' roundings too, (n + 1) * 2**-53 (the vdot fallback the same)
    assert abs(got - want) <= (a.size + 1) * 2.0**-53 * want + 1e-300


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 15, 16, 1000, 1032])
def test_sum_squares_is_not_finite_with_a_nan_or_inf_anywhere(dtype, bad, where):
    a = np.ones(1033, dtype)
    a[where] = bad
    assert not math.isfinite(_validate.sum_squares(a))
    assert not _validate.all_finite(a)
    assert _validate.all_finite(np.ones(1033, dtype))


def test_sum_squares_of_float32_extremes_is_finite_and_float64_overflow_is_sorted_out():
    big32 = np.full(64, np.finfo(np.float32).max, np.float32)  # squares overflow float32, not double
    assert math.isfinite(_validate.sum_squares(big32))
    assert _validate.all_finite(big32)
    big64 = np.full(64, 1e200)  # the double sum overflows: all_finite takes the exact test
    with np.errstate(all="raise"):  # no floating-point flag that NumPy reports
        assert _validate.sum_squares(big64) == math.inf
        assert _validate.all_finite(big64)
        assert float(np.add(np.float64(1.0), np.float64(2.0))) == 3.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_of_strided_and_read_only_arrays(dtype):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 30)).astype(dtype)
    want = math.fsum(float(v) ** 2 for v in a.ravel())
    for view in (a.T, a[::2], a[:, ::3]):
        vw = math.fsum(float(v) ** 2 for v in np.asarray(view).ravel())
        assert abs(_validate.sum_squares(view) - vw) <= (view.size + 1) * 2.0**-23 * vw
    ro = a.copy()
    ro.setflags(write=False)
    assert abs(_validate.sum_squares(ro) - want) <= (a.size + 1) * 2.0**-53 * want
