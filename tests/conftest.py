"""Shared test setup: every test runs once per available backend.

With ``DORA_REF_REQUIRE_C=1`` (CI sets it) a missing C backend is an error,
not a silent NumPy-only run. With ``DORA_REF_REQUIRE_PARITY=1`` (CI sets it;
the ``parity`` extra is installed there) a torch, PEFT or transformers that
does not import is an error too, and so is any test skipped for want of one:
without it a broken torch would leave CI green with ~170 skips. Both are read
by ``ci_env.env_flag`` (set and not "0").
"""
import importlib

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
            f"{dora_ref._backend._C_IMPORT_ERROR}"
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


def _parity_skip(report):
    """The reason of a skip for want of a parity module, or None."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[2])
    return reason if any(name in reason for name in PARITY_MODULES) else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under DORA_REF_REQUIRE_PARITY, a test skipped for want of torch/PEFT fails."""
    outcome = yield
    report = outcome.get_result()
    reason = _parity_skip(report) if env_flag("DORA_REF_REQUIRE_PARITY") else None
    if reason:
        report.outcome = "failed"
        report.longrepr = f"DORA_REF_REQUIRE_PARITY is set but the test skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped by a module-level importorskip."""
    outcome = yield
    report = outcome.get_result()
    reason = _parity_skip(report) if env_flag("DORA_REF_REQUIRE_PARITY") else None
    if reason:
        report.outcome = "failed"
        report.longrepr = f"DORA_REF_REQUIRE_PARITY is set but the module skipped: {reason}"


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request):
    """Run the test under each backend; the C runs skip, visibly, where it is not built."""
    if request.param not in dora_ref.available_backends():
        pytest.skip(f"the C extension is not built: {dora_ref._backend._C_IMPORT_ERROR}")
    with dora_ref.use_backend(request.param):
        yield request.param
