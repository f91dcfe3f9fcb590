"""Every script in benchmarks/ answers ``--help`` with its usage, and times nothing.

A reader finds out what a benchmark measures and how to run it from ``--help``
(the README and docs/performance.md send them there). ``profile_step.py`` read
its arguments as integers and answered ``--help`` with a ValueError traceback
(session 21); this runs every script's ``--help`` in a fresh interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def test_the_benchmarks_folder_has_scripts():
    assert "profile_step.py" in SCRIPTS and "bench_busy.py" in SCRIPTS, SCRIPTS


def test_every_benchmark_answers_help(backend):
    # one test for all scripts (started together), once: the subprocesses do not see
    # the backend fixture
    if backend != "numpy":
        pytest.skip("runs the scripts in subprocesses, which the backend does not reach: once is enough")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = {script: subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for script in SCRIPTS}
    failed = []
    for script, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            failed.append((script, "timed out", err[-500:]))
            continue
        if proc.returncode != 0 or not out.startswith("usage:") or "Traceback" in err:
            failed.append((script, proc.returncode, out[:200], err[-1000:]))
    assert not failed, failed
