"""Build script for dora_ref.

Metadata lives in pyproject.toml. This file exists for the C extension
``dora_ref.kernels._dora_c``, which cffi builds in out-of-line API mode from
``csrc/`` through ``cffi_modules`` (see ``csrc/build_ffi.py``).

The extension is optional: if it fails to build (no C compiler, say), the
install still succeeds, prints a warning, and dora_ref runs its NumPy
backend. Set ``DORA_REF_REQUIRE_C=1`` to make a failed C build an error
(CI does).
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

REQUIRE_C = os.environ.get("DORA_REF_REQUIRE_C", "") not in ("", "0")


class build_ext_optional(build_ext):
    """build_ext that falls back to the NumPy backend when the C build fails."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler: DistutilsPlatformError, ...
            self._give_up(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError
            self._give_up(exc)

    def _give_up(self, exc):
        if REQUIRE_C:
            raise exc
        print(
            "\n" + "*" * 72 + "\n"
            f"WARNING: dora_ref's C extension did not build ({type(exc).__name__}: {exc}).\n"
            "dora_ref will use its NumPy backend, which computes the same results\n"
            "more slowly. Install a C compiler and reinstall to get the C kernels;\n"
            "set DORA_REF_REQUIRE_C=1 to make this an error.\n" + "*" * 72,
            file=sys.stderr,
        )


setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    cmdclass={"build_ext": build_ext_optional},
)
