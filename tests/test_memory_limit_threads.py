"""A process under a memory limit: the C kernels never end it through libgomp (session 10's adversary).

libgomp creates a team's threads the first time a team needs them (one pool
per thread that starts teams), and when ``pthread_create`` fails (RLIMIT_AS,
a limit on processes) it prints "Thread creation failed" and ends the
process: nothing a caller can catch. Under ``RLIMIT_AS`` set before any team
had run, ``dora_ref.merge`` did that (exit 1; ``dora-ref merge`` under
``prlimit --as`` left its temporary output behind). Now the first team of a
size from each thread is preceded by dora_ref's own test of creating its
threads, with the stack size libgomp read when it loaded, and the call runs
on one thread when they cannot be created: a correct result, or a clear
``MemoryError``. (NumPy's own products under such a limit can still end the
process in OpenBLAS: not dora_ref's.)
"""
import os
import subprocess
import sys
import textwrap

import pytest

from dora_ref.kernels import c as C
from native_fork import skip_unless_threaded

pytestmark = skip_unless_threaded(C)

CHILD = textwrap.dedent("""
    import os, resource, sys, threading
    import numpy as np
    from dora_ref.kernels import c as C
    C._set_always_parallel(True)  # a team whatever the size
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((96, 512)).astype(np.float32)
    A = rng.standard_normal((8, 512)).astype(np.float32) / 16
    B = rng.standard_normal((96, 8)).astype(np.float32) / 4
    m = np.linalg.norm(W0 + 0.5 * B @ A, axis=1).astype(np.float32) * 1.5
    want_W = np.asarray(m / np.linalg.norm(W0 + 0.5 * B @ A, axis=1))[:, None] * (W0 + 0.5 * B @ A)

    def limit(headroom_mb):  # room for the arrays below, not for a thread's stack
        vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")][0] * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (headroom_mb << 20),) * 2)

    def run():
        try:
            n = C.column_norm(W0, A, B, 0.5)
            W, n2 = C.merge(W0, A, B, m, 0.5)
        except MemoryError as e:
            print("MemoryError", e, flush=True)
            return
        err = float(np.abs(W - want_W).max())
        print("ok" if err < 1e-4 and np.array_equal(n, n2) else "WRONG", err, flush=True)

    mode = sys.argv[1]
    if mode == "first_team":
        limit(3)
        run()
    elif mode == "stacksize_changed_after_import":  # libgomp keeps what it read when it loaded
        os.environ["OMP_STACKSIZE"] = "64k"
        limit(3)
        run()
    elif mode == "invalid_omp_valid_gomp":  # libgomp ignores 'abc' and takes GOMP_STACKSIZE's 1G
        limit(64)
        run()
    elif mode == "second_thread":  # a team verified from the main thread; another thread's own pool
        run()
        go = threading.Event()
        t = threading.Thread(target=lambda: (go.wait(), run()))
        t.start()
        limit(3)
        go.set()
        t.join()
""")


def _run(mode, env=None):
    stack = subprocess.run(["bash", "-c", "ulimit -s"], capture_output=True, text=True).stdout.strip()
    if stack != "unlimited" and int(stack) < 4096:
        pytest.skip(f"a thread stack of {stack} KiB fits the limit's headroom")
    p = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, **(env or {})))
    assert "Thread creation failed" not in p.stderr, p.stderr
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    assert "WRONG" not in p.stdout and p.stdout.startswith(("ok", "MemoryError")), p.stdout


def test_first_team_under_a_memory_limit_runs_serially_instead_of_ending_the_process():
    _run("first_team")


def test_stack_size_changed_after_import_is_not_what_libgomp_uses():
    # second adversarial pass (attack 47): the test read OMP_STACKSIZE at the call
    _run("stacksize_changed_after_import")


def test_invalid_OMP_STACKSIZE_falls_back_to_GOMP_STACKSIZE_as_in_libgomp():
    _run("invalid_omp_valid_gomp", {"OMP_STACKSIZE": "abc", "GOMP_STACKSIZE": "1G"})


def test_another_threads_first_team_is_tested_too():
    # one flag for the process let another thread's first team (a pool of its own) go untested
    _run("second_thread")
