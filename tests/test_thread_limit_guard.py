"""The suite's guard against tests that leave a thread limit changed (tests/conftest.py).

Found by session 17's flaky-test hunt: torch and dora_ref's C extension share
one OpenMP runtime, so a test's ``torch.set_num_threads(1)`` (six tests,
never undone) lowered ``dora_ref.kernels.c.openmp_threads()`` for every test
after it: the threaded tests then ran their kernels on one thread and passed.
The conftest now fails a test that leaves either limit changed, and puts the
limits back. Here a test that leaks is run in a pytest of its own with this
suite's conftest as a plugin: it errors, naming both limits, and the test
after it sees the limits as they were.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

LEAKY = textwrap.dedent("""
    import pytest
    torch = pytest.importorskip("torch")
    from dora_ref.kernels import c as C

    LIMITS = {}

    def test_a_leaky_test():
        LIMITS["before"] = (C.openmp_threads(), torch.get_num_threads())
        torch.set_num_threads(1)

    def test_the_next_test_sees_the_limits_as_they_were():
        assert (C.openmp_threads(), torch.get_num_threads()) == LIMITS["before"]
""")


def test_a_test_that_leaves_torch_on_one_thread_errors_and_the_next_sees_the_limits_restored(tmp_path):
    pytest.importorskip("torch")
    c = pytest.importorskip("dora_ref.kernels.c")
    if c.openmp_threads() < 2:
        pytest.skip("needs at least two OpenMP threads to see a limit lowered to one")
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE)] + sys.path))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_leaky.py")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "left the thread limits (C kernels, torch) changed" in out, out
    assert "ERROR at teardown of test_a_leaky_test" in out, out
    # every test runs once per backend: the leaky one errors twice, the next one passes twice
    assert "4 passed, 2 errors" in out, out


def test_ci_refuses_to_run_the_suite_on_one_thread_of_a_multicore_machine(tmp_path):
    """OMP_NUM_THREADS=1 (set by some CI images) made 26 threaded tests in 7 files skip, and
    a run with DORA_REF_REQUIRE_OPENMP=1 stayed green; now the session refuses to start."""
    c = pytest.importorskip("dora_ref.kernels.c")
    if not c.openmp_enabled() or (os.cpu_count() or 1) < 2:
        pytest.skip("needs an OpenMP build on a machine with at least two cores")
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE)] + sys.path), OMP_NUM_THREADS="1",
               DORA_REF_REQUIRE_OPENMP="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_nothing.py")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "unset OMP_NUM_THREADS" in out, out
