"""benchmarks/bench_merge.py killed by SIGTERM removes its temporary folder and its child.

An audit (session 21) killed ``bench_merge.py --quick`` after 4 s and 14 s: each
time its ``bench-merge-*`` folder stayed behind in the temporary directory
(20 and 38 MB; about 1.6 GB for the full model). The script is killed here
once its model is built, while it times the merges, with its temporary
directory pointed at a fresh folder.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_merge_killed_by_sigterm_leaves_no_folder(tmp_path, backend):
    if backend != "numpy":
        pytest.skip("runs the benchmark in a subprocess, which the backend does not reach: once is enough")
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--quick",
                             "--no-peft", "--rounds", "50"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # the model is built: the rounds start
            seen.append(line)
            if "round 1: dora-ref merge" in line or time.monotonic() > deadline:
                break
        assert any("round 1: dora-ref merge" in s for s in seen), "".join(seen)[-3000:]
        assert any(p.name.startswith("bench-merge-") for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, rest[-2000:])
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("bench-merge-"))
    assert left == [], left
