"""A fork while another thread of the process is inside a threaded C kernel.

Before the fix, such a fork hung (issue: an adversary's test; reproduced
here on the first fork, 2 cores, NumPy's pthreads OpenBLAS 0.3.31): the
kernel's team ran on OpenBLAS's worker threads, OpenBLAS's own prepare
handler stopped those workers mid-job, and both the parent's computing
thread (waiting for a worker that no longer exists) and the child's first
team (an inherited queue that never empties) spun forever. Now the
library's prepare handler, which runs before OpenBLAS's, waits until no
team of its own is in flight (at most the call's time) while any call that
starts meanwhile runs on one thread, so the fork sees no team mid-work;
the child releases and restarts pools as after any fork. A fork whose wait
reaches its limit (a fork from inside a call) forks anyway and its child
runs every kernel on one thread.

Every case runs in a subprocess under a time limit, so that a hang fails
the test instead of hanging pytest, and forks many times (50) so that a
pass is not luck; each case also checks that forks really found a team in
flight (``_fork_stats``), or it would prove nothing. The computing thread
calls only dora_ref's kernels: a fork while another thread is inside a
NumPy product hangs in OpenBLAS itself, with or without dora_ref. Results
must be the serial bits (no kernel's result depends on its threads).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

try:
    from dora_ref.kernels import c as C
except ImportError:  # pragma: no cover - depends on the install
    C = None

pytestmark = [
    pytest.mark.skipif(C is None, reason="the C extension is not built"),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform"),
    pytest.mark.skipif(C is not None and not C.openmp_enabled(), reason="no threads without OpenMP"),
]

# Whether the OpenMP runtime can release its pool before a fork (else every child is serial).
_PAUSE = C is not None and "fork_pause=yes" in C.build_info()

# A healthy run takes 2-25 s (2 cores, shared with other jobs). A hung run
# ends itself by SIGALRM at TIME_LIMIT (its forked children at half that: an
# orphan must not spin on after the test), else it is killed 30 s later.
TIME_LIMIT = 120
FORKS = 50


@pytest.fixture(autouse=True)
def backend():
    """Override conftest's per-backend fixture: each case runs the C kernels in a subprocess."""
    yield "c"

_SETUP = """{preload}
import hashlib, os, signal, sys, threading, time
import numpy as np
from dora_ref.kernels import c as C

signal.alarm({limit})

POOL = C._set_blas_pool({pool})          # teams on OpenBLAS's workers, or OpenMP teams
C._set_always_parallel(True)            # every call with several blocks opens a team
C.set_threads(2)
rng = np.random.default_rng(0)
n = 2048
W0 = rng.standard_normal((n, n)).astype(np.float32)
A = rng.standard_normal((8, n)).astype(np.float32)
B = rng.standard_normal((n, 8)).astype(np.float32)
g = (rng.random(n) + 0.5).astype(np.float32)
m = 256
dy, base = rng.standard_normal((2, 128, m)).astype(np.float32)
U = rng.standard_normal((128, 8)).astype(np.float32)
Bs, gs = B[:m], g[:m]


def digest():
    h = hashlib.sha256()
    for a in (C.column_norm(W0, A, B, 0.5), *C.merge(W0, A, B, g, 0.5),
              C.forward_epilogue(base, U, Bs, gs, 0.5, None),
              C.backward_epilogue(dy, base, U, Bs, gs, 0.5),
              *C._backward_lowrank_fused(dy, base, U, Bs, gs, 0.5),
              *C._norm_gradient_products_fused(W0[:m, :m], A[:, :m], Bs)):
        for part in (a if isinstance(a, tuple) else (a,)):
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


C.set_threads(1)
SERIAL = digest()
C.set_threads(2)

stop = threading.Event()


def compute():
    # a team in flight most of the time: the norm (OpenBLAS's workers when POOL)
    # and the merge (always an OpenMP team), 2048 x 2048
    while not stop.is_set():
        C.column_norm(W0, A, B, 0.5)
        C.merge(W0, A, B, g, 0.5)


def fork_and_check():
    # the child runs every kernel, threaded, and reports its bits and threads
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm({limit} // 2)
            os.close(r)
            ok = digest() == SERIAL
            os.write(w, f"{{int(ok)}} {{C.openmp_threads()}}".encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode().split()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return len(got) == 2 and got[0] == "1" and status == 0, int(got[1]) if got else 0
"""


def _run(body, pool, preload=""):
    code = _SETUP.format(pool=pool, limit=TIME_LIMIT, preload=preload) + textwrap.dedent(body)
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=TIME_LIMIT + 30, env=dict(os.environ))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung (killed after {TIME_LIMIT + 30} s): {exc.stdout!r} {exc.stderr!r}")
    if res.returncode == -signal.SIGALRM:
        pytest.fail(f"hung (ended by its alarm after {TIME_LIMIT} s): {res.stdout!r} {res.stderr!r}")
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.split()


_FORK_WHILE_COMPUTING = f"""
    t = threading.Thread(target=compute)
    t.start()
    bad, serial_children = 0, 0
    for i in range({FORKS}):
        time.sleep(0.002 * (i % 5))   # forks at varied points of the calls
        ok, threads = fork_and_check()
        bad += not ok
        serial_children += threads == 1
    stop.set()
    t.join()
    s = C._fork_stats()
    print(POOL, bad, serial_children, s["forks"], s["waited"], s["waited_in_vain"],
          digest() == SERIAL)
"""


def _check(out):
    pool, bad, serial_children, forks, waited, in_vain, parent_ok = out
    assert bad == "0", f"{bad} of {FORKS} children gave other bits"
    assert parent_ok == "True"
    assert int(forks) == FORKS
    # the case under test happened: many forks found a team in flight and waited
    assert int(waited) >= FORKS // 5, out
    assert in_vain == "0", out
    # and their children still opened teams (the pools were released as usual;
    # a runtime without omp_pause_resource_all keeps them, and every child is serial)
    assert serial_children == ("0" if _PAUSE else str(FORKS)), out
    return int(pool)


@pytest.mark.parametrize("pool", [True, False], ids=["openblas_workers", "openmp"])
def test_fork_while_another_thread_is_inside_a_threaded_kernel_never_hangs(pool):
    if pool and C._set_blas_pool(True) == 0:
        pytest.skip("NumPy's BLAS is not a threaded pthreads OpenBLAS here")
    try:
        _check(_run(_FORK_WHILE_COMPUTING, pool))
    finally:
        C._set_blas_pool(True)


def test_fork_while_another_thread_is_inside_a_threaded_kernel_under_load():
    # one busy process on the same cores (2 here): teams start late, calls
    # last longer, forks wait longer; started here, bounded, killed by PID
    busy = subprocess.Popen(
        [sys.executable, "-c", f"import time\nend = time.time() + {TIME_LIMIT + 30}\n"
                               "while time.time() < end: pass"])
    try:
        _check(_run(_FORK_WHILE_COMPUTING, True))
    finally:
        busy.kill()
        busy.wait()


def test_forks_from_two_threads_at_once_while_a_third_computes():
    # two forks under way together: the gate opens only after both have forked
    out = _run(
        """
        t = threading.Thread(target=compute)
        t.start()
        results = []
        def forker():
            for i in range(15):
                time.sleep(0.003 * (i % 3))
                results.append(fork_and_check())
        forkers = [threading.Thread(target=forker) for _ in range(2)]
        for f in forkers:
            f.start()
        for f in forkers:
            f.join()
        stop.set()
        t.join()
        s = C._fork_stats()
        print(sum(not ok for ok, _ in results), sum(th == 1 for _, th in results), s["forks"],
              s["waited"], s["waited_in_vain"], digest() == SERIAL)
        """,
        False,
    )
    bad, serial_children, forks, waited, in_vain, parent_ok = out
    expected_serial = "0" if _PAUSE else "30"
    assert (bad, serial_children, forks, in_vain, parent_ok) == ("0", expected_serial, "30", "0", "True"), out
    assert int(waited) >= 1, out


def test_fork_whose_wait_reaches_its_limit_gives_a_serial_child_with_the_same_bits():
    # A fork that cannot wait for the team in flight (the limit set to 0 here;
    # 10 s by default, reached by a fork from inside a call) forks mid-team:
    # the pool is not released and the child runs every kernel on one thread.
    # OpenMP teams only: a fork while OpenBLAS's workers run a job hangs in
    # OpenBLAS's own fork handler, which is why the fork waits at all.
    out = _run(
        """
        C._set_fork_wait_limit(0)
        t = threading.Thread(target=compute)
        t.start()
        results = []
        for i in range(40):
            time.sleep(0.002 * (i % 5))
            results.append(fork_and_check())
            if C._fork_stats()["waited_in_vain"] >= 5:
                break
        stop.set()
        t.join()
        s = C._fork_stats()
        in_vain = s["waited_in_vain"]
        # every fork that waited in vain gave a serial child; the others a threaded one
        print(sum(not ok for ok, _ in results), in_vain, sum(th == 1 for _, th in results),
              len(results), digest() == SERIAL)
        """,
        False,
    )
    bad, in_vain, serial_children, forks, parent_ok = out
    assert bad == "0" and parent_ok == "True", out
    assert int(in_vain) >= 1, out
    assert serial_children == (in_vain if _PAUSE else forks), out


def test_fork_mid_call_when_the_extension_was_loaded_before_numpy():
    # Prepare handlers run last registered first, and OpenBLAS registers its
    # own (which stops its workers) when it loads. Loaded before NumPy, the
    # extension's handler alone would run after OpenBLAS's, too late: the gate
    # is registered again when the BLAS pool is set, and so runs first.
    if C._set_blas_pool(True) == 0:
        pytest.skip("NumPy's BLAS is not a threaded pthreads OpenBLAS here")
    import dora_ref.kernels._dora_c as ext

    preload = f"import ctypes\nctypes.CDLL({ext.__file__!r})\nassert 'numpy' not in __import__('sys').modules"
    _check(_run(_FORK_WHILE_COMPUTING, True, preload=preload))
