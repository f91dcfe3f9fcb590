"""A process under a memory limit: the C kernels never end it through libgomp (session 10's adversary).

libgomp creates a team's threads the first time a team needs them, and when
``pthread_create`` fails (RLIMIT_AS, a limit on processes) it prints "Thread
creation failed" and ends the process: nothing a caller can catch. Under
``RLIMIT_AS`` set before any team had run, ``dora_ref.merge`` did that
(exit 1; ``dora-ref merge`` under ``prlimit --as`` left its temporary output
behind). Now the first team of a size is preceded by dora_ref's own test of
creating its threads, and the call runs on one thread when they cannot be
created: a correct result, or a clear ``MemoryError``. (NumPy's own products
under such a limit can still end the process in OpenBLAS: not dora_ref's.)
"""
import subprocess
import sys
import textwrap

import pytest

from dora_ref.kernels import c as C
from native_fork import skip_unless_threaded

pytestmark = skip_unless_threaded(C)

CHILD = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from dora_ref.kernels import c as C
    C._set_always_parallel(True)  # a team whatever the size: the first one of the process
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((96, 512)).astype(np.float32)
    A = rng.standard_normal((8, 512)).astype(np.float32) / 16
    B = rng.standard_normal((96, 8)).astype(np.float32) / 4
    m = np.linalg.norm(W0 + 0.5 * B @ A, axis=1).astype(np.float32) * 1.5
    want_W = np.asarray(m / np.linalg.norm(W0 + 0.5 * B @ A, axis=1))[:, None] * (W0 + 0.5 * B @ A)
    vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")][0] * 1024
    # room for the arrays below, not for a thread's stack (8 MB unless the stack limit is smaller)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 20),) * 2)
    try:
        n = C.column_norm(W0, A, B, 0.5)
        W, n2 = C.merge(W0, A, B, m, 0.5)
    except MemoryError as e:
        print("MemoryError", e)
        sys.exit(0)
    err = float(np.abs(W - want_W).max())
    print("ok", err, float(np.abs(n - n2).max()))
    sys.exit(0 if err < 1e-4 else 3)
""")


def test_first_team_under_a_memory_limit_runs_serially_instead_of_ending_the_process():
    stack = subprocess.run(["bash", "-c", "ulimit -s"], capture_output=True, text=True).stdout.strip()
    if stack != "unlimited" and int(stack) < 4096:
        pytest.skip(f"a thread stack of {stack} KiB fits the limit's headroom")
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert "Thread creation failed" not in p.stderr, p.stderr
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    assert p.stdout.startswith(("ok", "MemoryError")), p.stdout
