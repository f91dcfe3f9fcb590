"""Two merges into one new OUT, without --force: never both reported done.

Found by session 13's adversary: the checks that OUT is absent (``_check_output``) and that
no live run is writing it (``_clean_leftovers``) run before the merge; ``_install`` then
replaced whatever OUT had become (``os.replace``, or the directory exchange), so in 2 of 40
races both runs printed 'wrote N tensor(s)' while one had silently replaced the other's
output. Now, without --force, the output is moved in only if OUT is still absent (a
directory: absent or empty), in one atomic step (``renameat2(RENAME_NOREPLACE)``; a hard
link where that is missing; ``rename(2)`` for a directory), else the merge stops with
'appeared while this merge ran' and leaves OUT as it is. With --force the last run wins.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_adversarial import _merged_files, small_checkpoint  # noqa: F401 (the fixture)

ROOT = Path(__file__).resolve().parents[1]


def _other_output_appears_then_install(monkeypatch, kind):
    """_install is called after another process put its own output at OUT."""
    from dora_ref.formats import merge_cli

    real_install = merge_cli._install

    def appear_then_install(tmp, final, is_dir, *rest):
        if kind == "file":
            final.write_bytes(b"the other run's output")
        else:
            final.mkdir(exist_ok=True)
            (final / "model.safetensors").write_bytes(b"the other run's output")
        real_install(tmp, final, is_dir, *rest)

    monkeypatch.setattr(merge_cli, "_install", appear_then_install)
    return merge_cli


@pytest.mark.parametrize("no_renameat2", [False, True], ids=["renameat2", "hard-link"])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_merge_into_an_out_that_appeared_meanwhile_stops_and_leaves_it(small_checkpoint, monkeypatch,
                                                                        capsys, kind, no_renameat2):
    if no_renameat2:
        monkeypatch.setenv("DORA_REF_TEST_NO_EXCHANGE", "1")
    d = small_checkpoint
    merge_cli = _other_output_appears_then_install(monkeypatch, kind)
    base = d / "base" / "model.safetensors" if kind == "file" else d / "base"
    out = d / ("out.safetensors" if kind == "file" else "out")
    status = merge_cli.main([str(base), str(d / "ad"), str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "appeared while this merge ran" in err, err
    other = out.read_bytes() if kind == "file" else (out / "model.safetensors").read_bytes()
    assert other == b"the other run's output"
    assert sorted(p.name for p in d.iterdir()) == sorted(["ad", "base", out.name])  # no temporary left


def test_merge_into_an_empty_out_directory_still_works(small_checkpoint):
    from dora_ref.formats import merge_cli

    d = small_checkpoint
    (d / "out").mkdir()
    assert merge_cli.main([str(d / "base"), str(d / "ad"), str(d / "out"), "--no-progress"]) == 0
    merge_cli.merge_checkpoint(d / "base", [d / "ad"], d / "ref", progress=False, log=lambda *a: None)
    assert _merged_files(d / "out") == _merged_files(d / "ref")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_merge_with_force_replaces_an_out_that_appeared_meanwhile(small_checkpoint, monkeypatch, kind):
    d = small_checkpoint
    merge_cli = _other_output_appears_then_install(monkeypatch, kind)
    base = d / "base" / "model.safetensors" if kind == "file" else d / "base"
    out = d / ("out.safetensors" if kind == "file" else "out")
    assert merge_cli.main([str(base), str(d / "ad"), str(out), "--no-progress", "--force"]) == 0
    merged = out.read_bytes() if kind == "file" else (out / "model.safetensors").read_bytes()
    assert merged != b"the other run's output" and len(merged) > 100


def test_two_concurrent_merges_into_one_new_out_never_both_succeed(small_checkpoint):
    # the race itself, a few rounds: the loser stops at the check (OUT exists, or a live
    # writer) or at the install ('appeared'); exactly one run reports success each round
    d = small_checkpoint
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "dora_ref", "merge", str(d / "base"), str(d / "ad")]
    for round_ in range(4):
        out = d / f"out{round_}"
        procs = [subprocess.Popen(cmd + [str(out), "--no-progress"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        ok = [r for r in results if r[0] == 0]
        assert len(ok) == 1, results
        assert "wrote" in ok[0][1]
    ref = d / "ref"
    from dora_ref.formats import merge_cli
    merge_cli.merge_checkpoint(d / "base", [d / "ad"], ref, progress=False, log=lambda *a: None)
    for round_ in range(4):
        assert _merged_files(d / f"out{round_}") == _merged_files(ref)
