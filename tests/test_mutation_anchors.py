"""The mutation check's anchors still match the code (new-user finding, session 6).

``tests/mutation/run_mutations.py`` applies each plausible bug by exact string
replacement and stops, before applying any, when an anchor no longer occurs
exactly once. Its full run is slow and not part of ``pytest -q``, so a rewrite
of the code it mutates went unnoticed until a new user ran it and it stopped
at once. This runs its fast ``--check-anchors`` mode with every test run.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutation_anchor_matches_exactly_once():
    script = ROOT / "tests" / "mutation" / "run_mutations.py"
    done = subprocess.run([sys.executable, str(script), "--check-anchors"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "anchors match exactly once" in done.stdout
