"""Shared test setup: every test runs once per available backend.

With ``DORA_REF_REQUIRE_C=1`` (CI sets it) a missing C backend is an error,
not a silent NumPy-only run. With ``DORA_REF_REQUIRE_PARITY=1`` (CI sets it;
the ``parity`` extra is installed there) a torch, PEFT or transformers that
does not import is an error too, and so is any test skipped for want of one:
without it a broken torch would leave CI green with ~170 skips. Both are read
by ``ci_env.env_flag`` (set and not "0").
"""
import contextlib
import importlib
import os
import sys

import hypothesis
import pytest

import dora_ref
from ci_env import env_flag

PARITY_MODULES = ("torch", "peft", "transformers")

# Deadlines off: the machines are shared and noisy, and timing is not what
# these tests check. Examples are kept moderate so the suite runs in minutes.
hypothesis.settings.register_profile("dora_ref", deadline=None, max_examples=40)
hypothesis.settings.load_profile("dora_ref")

BACKENDS = ("numpy", "c")


def pytest_sessionstart(session):
    if env_flag("DORA_REF_REQUIRE_C") and "c" not in dora_ref.available_backends():
        raise pytest.UsageError(
            "DORA_REF_REQUIRE_C is set but the C backend is not available: "
            f"{dora_ref.core.backend._C_IMPORT_ERROR}"
        )
    if env_flag("DORA_REF_REQUIRE_OPENMP") and "c" in dora_ref.available_backends():
        from dora_ref.kernels import c

        cores = os.cpu_count() or 1
        if c.openmp_enabled() and c.openmp_threads() < 2 <= cores:
            # found by session 17's flaky-test hunt: 26 threaded tests in 7 files skip, and CI stayed green
            raise pytest.UsageError(
                f"DORA_REF_REQUIRE_OPENMP is set but the C kernels may use only {c.openmp_threads()} thread "
                f"on this {cores}-core machine (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')!r}): "
                "the threaded tests would be skipped; unset OMP_NUM_THREADS"
            )
    if env_flag("DORA_REF_REQUIRE_PARITY"):
        for name in PARITY_MODULES:
            try:
                importlib.import_module(name)
            except Exception as exc:  # a broken install raises more than ImportError
                raise pytest.UsageError(
                    f"DORA_REF_REQUIRE_PARITY is set but {name} does not import "
                    f"({type(exc).__name__}: {exc}); install the parity extra: "
                    f"pip install -e '.[test,parity]'"
                ) from exc


def _fail_parity_skip(report, what):
    """Under DORA_REF_REQUIRE_PARITY, turn a skip for want of a parity module into a failure."""
    if not (env_flag("DORA_REF_REQUIRE_PARITY") and report.skipped
            and isinstance(report.longrepr, tuple)):
        return
    reason = str(report.longrepr[2])
    if any(name in reason for name in PARITY_MODULES):
        report.outcome = "failed"
        report.longrepr = f"DORA_REF_REQUIRE_PARITY is set but the {what} skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test skipped for want of torch / PEFT / transformers (see _fail_parity_skip)."""
    outcome = yield
    _fail_parity_skip(outcome.get_result(), "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped by a module-level importorskip."""
    outcome = yield
    _fail_parity_skip(outcome.get_result(), "module")


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request):
    """Run the test under each backend; the C runs skip, visibly, where it is not built."""
    if request.param not in dora_ref.available_backends():
        pytest.skip(f"the C extension is not built: {dora_ref.core.backend._C_IMPORT_ERROR}")
    with dora_ref.use_backend(request.param):
        yield request.param


@pytest.fixture(scope="session")
def bench_busy():
    """benchmarks/bench_busy.py as a module (its decision rules are tested on synthetic times)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "bench_busy.py")
    spec = importlib.util.spec_from_file_location("bench_busy_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vec_dir(tmp_path_factory):
    """The golden vectors (float32 and float64), written once per test module."""
    from dora_ref.porting import vectors

    d = tmp_path_factory.mktemp("vectors")
    vectors.write(d)
    return d


@pytest.fixture(scope="module")
def lp_dir(tmp_path_factory):
    """The low-precision golden vectors (bfloat16 and float16), written once per test module."""
    from dora_ref.porting import vectors

    d = tmp_path_factory.mktemp("vectors_lp")
    vectors.write(d, dtypes=vectors.LP_DTYPES)
    return d


def _thread_settings():
    """(dora_ref's C kernels' thread limit, torch's) now; None where not loaded.

    torch and dora_ref's extension share one OpenMP runtime in a process, so
    ``torch.set_num_threads(1)`` also lowers ``C.openmp_threads()``.
    """
    c = sys.modules.get("dora_ref.kernels.c")
    torch = sys.modules.get("torch")
    return (c.openmp_threads() if c is not None else None,
            torch.get_num_threads() if torch is not None else None)


@pytest.fixture(autouse=True)
def _no_thread_setting_leaks():
    """A test that leaves the kernels' or torch's thread limit changed fails, and the limits are
    put back: found by session 17's flaky-test hunt, six tests set torch.set_num_threads(1) and
    never undid it, and every threaded test after them ran its kernels on one thread, green."""
    before = _thread_settings()
    yield
    after = _thread_settings()
    # a limit not loaded before the test (torch imported by it) is judged through the other:
    # they share one runtime
    if any(b is not None and a != b for a, b in zip(after, before)):
        c, torch = sys.modules.get("dora_ref.kernels.c"), sys.modules.get("torch")
        if torch is not None and before[1] is not None:
            torch.set_num_threads(before[1])
        if c is not None:
            c.set_threads(0)
        pytest.fail(f"this test left the thread limits (C kernels, torch) changed: {before} -> {after}; "
                    "restore them (tests/conftest.py's torch_threads)")


@contextlib.contextmanager
def torch_threads(n):
    """torch.set_num_threads(n) inside the block, the previous limit after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test (its small products are faster so), put back after it;
    a skip where torch does not import."""
    pytest.importorskip("torch")
    with torch_threads(1) as torch:
        yield torch
