"""A process forked after the C kernels ran on several threads runs them again.

libgomp's worker threads do not exist in a forked child, but its thread pool
still lists them: before the fix, the child's next parallel region waited for
them forever (issue: "hang after fork"). The library now releases the pool
before every fork (``pthread_atfork`` + ``omp_pause_resource_all``), so the
child starts its own; where that is impossible the child runs serially.

Every case runs in a subprocess under a time limit: a regression hangs that
subprocess, which the test then kills and reports, and the suite goes on.
The child's results must be the parent's bits (the kernels' results do not
depend on the number of threads).
"""
from __future__ import annotations

import os
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
]

# A generous limit: a healthy run takes about a second even on a busy machine.
TIME_LIMIT = 120


@pytest.fixture(autouse=True)
def backend():
    """Override conftest's per-backend fixture: each case runs the C kernels in a subprocess."""
    yield "c"

_SETUP = """
import hashlib, os, sys
import numpy as np
from dora_ref.kernels import c as C

C._set_always_parallel(True)   # every call opens a team, so that a pool exists
C.set_threads(2)
rng = np.random.default_rng(0)
W0 = rng.standard_normal((2000, 2000))
A = rng.standard_normal((8, 2000))
B = rng.standard_normal((2000, 8))
dy, base = rng.standard_normal((2, 300, 2000))
U = rng.standard_normal((300, 8))
g = rng.random(2000) + 0.5


def digest():
    h = hashlib.sha256()
    for a in (C.column_norm(W0, A, B, 0.5), *C.merge(W0, A, B, g, 0.5),
              C.forward_epilogue(base, U, B, g, 0.5, None),
              *C._backward_lowrank_fused(dy, base, U, B, g, 0.5),
              *C._norm_gradient_products_fused(W0, A, B)):
        h.update(a.tobytes())
    return h.hexdigest()


def threads_now():
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1
"""


def _run(body):
    """Run _SETUP + body in a fresh interpreter; return its stdout lines."""
    code = _SETUP + textwrap.dedent(body)
    env = dict(os.environ)
    try:
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIME_LIMIT,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the forked process hung (killed after {TIME_LIMIT} s): {exc.stderr!r}")
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.split()


def test_bare_fork_after_threaded_call_runs_the_kernels():
    out = _run(
        """
        parent = digest()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child = digest()
            os.write(w, f"{child} {threads_now()}".encode())
            os._exit(0)
        os.close(w)
        child, child_threads = os.read(r, 1000).decode().split()
        os.waitpid(pid, 0)
        print(parent, child, child_threads, C.build_info())
        """
    )
    parent, child, child_threads = out[:3]
    assert child == parent
    if "fork_pause=yes" in " ".join(out[3:]) and int(child_threads) > 0:
        # the pool was released before the fork: the child started a new team
        assert int(child_threads) >= 2


def test_fork_without_pool_release_falls_back_to_one_thread():
    out = _run(
        """
        C._set_fork_pause(False)   # keep the dead pool: the child must go serial
        parent = digest()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, f"{digest()} {C.openmp_threads()}".encode())
            os._exit(0)
        os.close(w)
        child, child_threads = os.read(r, 1000).decode().split()
        os.waitpid(pid, 0)
        print(parent, child, child_threads)
        """
    )
    parent, child, child_threads = out
    assert child == parent
    assert int(child_threads) == 1


def test_multiprocessing_fork_pool_after_threaded_call():
    out = _run(
        """
        import multiprocessing as mp

        def work(_):
            return digest()

        if __name__ == "__main__":
            parent = digest()
            with mp.get_context("fork").Pool(2) as pool:
                children = pool.map(work, range(4))
            print(parent, *children)
        """
    )
    parent, *children = out
    assert len(children) == 4
    assert all(child == parent for child in children)


def test_fork_of_a_fork_after_threaded_calls():
    out = _run(
        """
        parent = digest()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            digest()                      # the child opens its own team ...
            pid2 = os.fork()              # ... and forks again
            if pid2 == 0:
                os.write(w, digest().encode())
                os._exit(0)
            os.waitpid(pid2, 0)
            os._exit(0)
        os.close(w)
        grandchild = os.read(r, 1000).decode()
        os.waitpid(pid, 0)
        print(parent, grandchild)
        """
    )
    parent, grandchild = out
    assert grandchild == parent
