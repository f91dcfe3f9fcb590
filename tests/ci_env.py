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
