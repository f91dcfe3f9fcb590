"""An OUT whose name is legal but near the filesystem's limit is written, not refused.

Found in session 17: ``dora-ref merge`` writes into a temporary sibling
``.<OUT name>.dora-ref-tmp-<pid>-<random>`` (and its writer into that name
+ ``.partial``), about 40 bytes longer than OUT's name, so every OUT name of
about 215 to 255 bytes failed with "File name too long" naming the
temporary sibling, a file the user never asked for. The sibling now carries
OUT's name cut to fit and a digest of it (``merge_cli._stem``); the next
run into the same OUT still finds and removes what a killed run left.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_adversarial import small_checkpoint  # noqa: F401 (the fixture)

from dora_ref.formats import merge_cli

ROOT = Path(__file__).resolve().parents[1]


def _name_max(directory):
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _merge(d, base, out, kill_at=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    env.pop("DORA_REF_TEST_KILL_AT", None)
    if kill_at:
        env["DORA_REF_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "dora_ref", "merge", "--no-progress", str(base),
                           str(d / "ad"), str(out)], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_merge_into_an_out_name_of_the_filesystems_longest_length(small_checkpoint, kind):
    d = small_checkpoint
    longest = _name_max(d)
    if kind == "file":
        base, short = d / "base" / "model.safetensors", d / "short.safetensors"
        out = d / ("o" * (longest - len(".safetensors")) + ".safetensors")
    else:
        base, short, out = d / "base", d / "short", d / ("d" * longest)
    assert len(os.fsencode(out.name)) == longest
    done = _merge(d, base, short)
    assert done.returncode == 0, done.stderr
    done = _merge(d, base, out)
    assert done.returncode == 0, done.stderr
    if kind == "file":
        assert out.read_bytes() == short.read_bytes()
    else:
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in short.iterdir())
        for p in short.iterdir():
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # no sibling left


def test_a_killed_merge_into_a_long_out_name_is_cleaned_up_by_the_next_run(small_checkpoint):
    d = small_checkpoint
    out = d / ("k" * (_name_max(d) - 20) + ".safetensors")
    killed = _merge(d, d / "base" / "model.safetensors", out, kill_at="written")
    assert killed.returncode != 0
    left = [p.name for p in d.iterdir() if p.name.startswith(".")]
    assert len(left) == 1 and merge_cli._TMP_TAG in left[0] and not out.exists(), left
    done = _merge(d, d / "base" / "model.safetensors", out)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and [p.name for p in d.iterdir() if p.name.startswith(".")] == []


def test_stem_keeps_a_short_name_whole_and_cuts_a_long_one_on_a_character(tmp_path):
    longest = _name_max(tmp_path)
    short = tmp_path / "model.safetensors"
    assert merge_cli._stem(short) == "model.safetensors"
    for name in ("x" * longest, "é" * (longest // 2), "a" + "é" * (longest // 2 - 1)):
        stem = merge_cli._stem(tmp_path / name)
        raw = os.fsencode(stem)
        assert len(raw) + merge_cli._SIBLING_EXTRA <= longest, name
        assert stem.encode("utf-8").decode("utf-8") == stem  # whole characters only
        assert name.startswith(stem.rsplit("~", 1)[0])
        assert merge_cli._stem(tmp_path / (name[:-1] + "z")) != stem  # the digest tells names apart
    sibling = merge_cli._sibling(tmp_path / ("x" * longest), merge_cli._TMP_TAG)
    assert len(os.fsencode(sibling.name + ".partial")) <= longest
