"""Build script for dora_ref.

Metadata lives in pyproject.toml. This file exists for the C extension, which
cffi builds in out-of-line API mode through ``cffi_modules``.
"""
from setuptools import setup

setup()
