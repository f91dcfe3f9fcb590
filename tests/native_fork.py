"""What the tests whose forks come from native threads share: the skip rule and
the build of their small C helper (``tests/test_fork_concurrent.py``,
``tests/test_fork_signal_nested.py``)."""
import os
import shutil
import subprocess
import sys

import pytest


def skip_unless_threaded(c):
    """The mark that skips a module unless Linux and a threaded C build (``c``:
    ``dora_ref.kernels.c``) with at least two threads."""
    return pytest.mark.skipif(
        not sys.platform.startswith("linux") or not c.threading_info().get("threads", 1) > 1,
        reason="needs Linux and a threaded C build with at least two threads",
    )


def build_helper(tmp_path_factory, source_text, name):
    """Compile ``source_text`` into a shared library under a fresh temporary
    folder; its path, or a skip (no C compiler, or it did not compile)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the forking helper")
    folder = tmp_path_factory.mktemp(name)
    source, library = folder / f"{name}.c", folder / f"{name}.so"
    source.write_text(source_text)
    done = subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-pthread", "-o", str(library),
                           str(source)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"the forking helper did not compile: {done.stderr[-300:]}")
    return str(library)
