"""The one parser of the test suite's environment switches.

``DORA_REF_REQUIRE_C``, ``DORA_REF_REQUIRE_PARITY`` and
``DORA_REF_REQUIRE_OPENMP`` turn what would be a visible skip on a developer's
machine (no compiler, no torch) into a failure. ``.ci/run`` sets all three.
The rule is setup.py's for ``DORA_REF_REQUIRE_C``: set to anything but "" or
"0" means on.
"""
import os


def env_flag(name):
    """True if the environment variable ``name`` is set to anything but "" or "0"."""
    return os.environ.get(name, "").strip() not in ("", "0")


def c_kernels_or_skip():
    """``dora_ref.kernels.c``, or skip the calling test module where the C extension is
    not built; under ``DORA_REF_REQUIRE_C`` that is an ``ImportError`` instead.

    Call it at module level: ``C = c_kernels_or_skip()``.
    """
    import pytest

    try:
        from dora_ref.kernels import c
    except ImportError as exc:  # pragma: no cover - depends on the install
        if env_flag("DORA_REF_REQUIRE_C"):
            raise ImportError(
                f"DORA_REF_REQUIRE_C is set but the C extension does not import: {exc}"
            ) from exc
        pytest.skip(f"the C backend is not built ({exc})", allow_module_level=True)
    return c
