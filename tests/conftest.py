"""Shared test setup: every test runs once per available backend.

With ``DORA_REF_REQUIRE_C=1`` (CI sets it) a missing C backend is an error,
not a silent NumPy-only run.
"""
import os

import hypothesis
import pytest

import dora_ref

# Deadlines off: the machines are shared and noisy, and timing is not what
# these tests check. Examples are kept moderate so the suite runs in minutes.
hypothesis.settings.register_profile("dora_ref", deadline=None, max_examples=40)
hypothesis.settings.load_profile("dora_ref")

BACKENDS = ("numpy", "c")


def pytest_sessionstart(session):
    if os.environ.get("DORA_REF_REQUIRE_C") == "1" and "c" not in dora_ref.available_backends():
        raise pytest.UsageError(
            "DORA_REF_REQUIRE_C=1 but the C backend is not available: "
            f"{dora_ref._backend._C_IMPORT_ERROR}"
        )


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request):
    """Run the test under each backend; the C runs skip, visibly, where it is not built."""
    if request.param not in dora_ref.available_backends():
        pytest.skip(f"the C extension is not built: {dora_ref._backend._C_IMPORT_ERROR}")
    with dora_ref.use_backend(request.param):
        yield request.param
