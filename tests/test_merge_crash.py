"""``dora-ref merge`` killed with SIGKILL at every stage never leaves a mixed or partial OUT.

Each run is a subprocess killed at an exact point by the command's test hook
(``DORA_REF_TEST_KILL_AT``: after N tensors, after everything is written and
synced, after the atomic exchange, between the two renames of the fallback),
and a few more are killed after a delay. After each kill OUT must be absent,
the old complete output, or the new complete output, compared file by file
and byte by byte with outputs of uninterrupted runs; and the next run must
clean up what the killed one left and write the new output.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from peft_helpers import random_module, write_adapter
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
N_TENSORS = 6


@pytest.fixture(autouse=True)
def backend():
    """Crash safety does not depend on the kernels' backend: one run each (the subprocess's default)."""
    yield None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A two-shard base, two adapters, and the complete outputs of merging each (uninterrupted)."""
    d = tmp_path_factory.mktemp("crash")
    rng = np.random.default_rng(0)
    base = {f"l{i}.weight": rng.standard_normal((48, 32)).astype(np.float32) for i in range(N_TENSORS - 1)}
    base["norm.weight"] = np.ones(32, np.float32)
    keys = sorted(base)
    (d / "base").mkdir()
    weight_map = {}
    for s in range(2):
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: base[k] for k in keys[s::2]}, str(d / "base" / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys[s::2]})
    (d / "base" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "base" / "config.json").write_text('{"model_type": "llama"}')
    for name, seed in (("old_ad", 1), ("new_ad", 2)):
        r = np.random.default_rng(seed)
        write_adapter(d / name, {f"l{i}": random_module(r, 48, 32, 2, dtype=np.float32) for i in range(N_TENSORS - 1)})
    for name in ("old", "new"):
        _run(d, f"{name}_ad", d / f"ref_{name}")
    return d


def _run(d, adapter, out, kill_at=None, force=True, no_exchange=False, wait=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DORA_REF_TEST_KILL_AT", None)
    if kill_at:
        env["DORA_REF_TEST_KILL_AT"] = kill_at
    if no_exchange:
        env["DORA_REF_TEST_NO_EXCHANGE"] = "1"
    cmd = [sys.executable, "-m", "dora_ref", "merge", str(d / "base"), str(d / adapter), str(out), "--no-progress"]
    cmd += ["--force"] if force else []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    _, err = proc.communicate(timeout=300)
    if kill_at is None:
        assert proc.returncode == 0, err.decode()
    return proc.returncode


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def _state(d, out):
    """'absent', 'old' or 'new' (complete, byte for byte); anything else is a failure."""
    if not out.exists():
        return "absent"
    got = _snapshot(out)
    for name in ("old", "new"):
        if got == _snapshot(d / f"ref_{name}"):
            return name
    return f"MIXED OR PARTIAL: {sorted(got)}"


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# (kill point, whether the atomic exchange is disabled, the states allowed after the kill)
KILL_POINTS = [
    ("tensor:1", False, {"old"}),
    ("tensor:4", False, {"old"}),
    (f"tensor:{N_TENSORS}", False, {"old"}),
    ("written", False, {"old"}),
    ("exchanged", False, {"new"}),
    ("renamed-aside", True, {"absent"}),
]


@pytest.mark.parametrize("kill_at, no_exchange, allowed", KILL_POINTS, ids=[k for k, _, _ in KILL_POINTS])
def test_force_merge_killed_over_a_complete_output_leaves_old_or_new_never_a_mix(
    checkpoint, tmp_path, kill_at, no_exchange, allowed
):
    """Issue 10 item 4: a --force merge killed mid-run left OUT mixing two merges."""
    d, out = checkpoint, tmp_path / "out"
    shutil.copytree(d / "ref_old", out)
    rc = _run(d, "new_ad", out, kill_at=kill_at, no_exchange=no_exchange)
    assert rc == -signal.SIGKILL
    assert _state(d, out) in allowed
    assert _leftovers(out)  # the temporary output of the killed run is still there
    _run(d, "new_ad", out)  # the next run removes it and writes the new output
    assert _state(d, out) == "new" and _leftovers(out) == []


@pytest.mark.parametrize("kill_at", ["tensor:2", "written"])
def test_merge_killed_into_a_fresh_out_leaves_no_out(checkpoint, tmp_path, kill_at):
    d, out = checkpoint, tmp_path / "fresh"
    assert _run(d, "new_ad", out, kill_at=kill_at, force=False) == -signal.SIGKILL
    assert _state(d, out) == "absent"
    _run(d, "new_ad", out, force=False)  # the leftover does not count as an existing OUT
    assert _state(d, out) == "new" and _leftovers(out) == []


def test_merge_killed_after_a_delay_leaves_old_or_new(checkpoint, tmp_path):
    """SIGKILL from outside at a few delays: every outcome is one of the three states."""
    d, out = checkpoint, tmp_path / "out"
    shutil.copytree(d / "ref_old", out)
    seen = []
    for delay in (0.2, 0.6, 1.0, 1.5):
        proc = _run(d, "new_ad", out, wait=False)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
        seen.append(_state(d, out))
        assert seen[-1] in {"old", "new"}, seen
    _run(d, "new_ad", out)
    assert _state(d, out) == "new" and _leftovers(out) == []


def test_a_live_merge_into_the_same_out_is_not_disturbed(checkpoint, tmp_path):
    """A leftover whose process is alive belongs to a running merge: refused, not deleted."""
    d, out = checkpoint, tmp_path / "out"
    live = out.with_name(f".out.dora-ref-tmp-{os.getpid()}-00000000")  # this test process is alive
    live.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "dora_ref", "merge", str(d / "base"), str(d / "new_ad"), str(out),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and f"process {os.getpid()}, which is writing {live}, is still running" in proc.stderr
    assert live.is_dir() and not out.exists()


def test_merge_piped_into_a_reader_that_has_gone_exits_0_with_the_complete_output(checkpoint, tmp_path):
    # found by a new user: `dora-ref merge ... | head -1` printed "error: [Errno 32]
    # Broken pipe" and exited 1 after writing OUT in full
    d, out = checkpoint, tmp_path / "piped"
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first line: every print meets EPIPE
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DORA_REF_TEST_KILL_AT", None)
    cmd = [sys.executable, "-m", "dora_ref", "merge", str(d / "base"), str(d / "new_ad"), str(out),
           "--no-progress", "-v"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, stdout=w, stderr=subprocess.PIPE, timeout=300)
    os.close(w)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr.decode() == ""
    assert _state(d, out) == "new" and _leftovers(out) == []
