"""Inputs that are pipes, and an OUT that is a symlink loop: a clear error, never a wait.

Found by session 17's adversary. A named pipe in place of
``adapter_model.safetensors``, ``adapter_config.json`` or a base shard made
``dora-ref merge`` wait for ever: the reader's "not a regular file" check ran
after ``open``, which for a pipe waits for a writer. Now every input file is
opened non-blocking and refused by ``fstat`` unless it is a regular file. An
OUT that is a symlink to itself ended in a traceback (``Path.resolve``'s
RuntimeError); now it is the command's one-line error naming OUT.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_adversarial import small_checkpoint  # noqa: F401 (the fixture)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")


def _merge(d, out, timeout=60):
    """The command in a process of its own (a wait for ever would hang pytest): (status, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    done = subprocess.run([sys.executable, "-m", "dora_ref", "merge", "--no-progress",
                           str(d / "base"), str(d / "ad"), str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    return done.returncode, done.stderr


@pytest.mark.parametrize("where", ["ad/adapter_model.safetensors", "ad/adapter_config.json",
                                   "base/model.safetensors", "base/config.json"])
def test_merge_with_a_named_pipe_for_an_input_file_is_an_error_not_a_wait(small_checkpoint, where):
    d = small_checkpoint
    pipe = d / where
    if pipe.exists():
        pipe.unlink()
    os.mkfifo(pipe)
    status, err = _merge(d, d / "out")
    assert status == 1, err
    assert "not a regular file" in err and str(pipe) in err, err
    assert "Traceback" not in err, err
    assert not (d / "out").exists()


def test_merge_with_a_named_pipe_for_the_shard_index_is_an_error_not_a_wait(small_checkpoint):
    d = small_checkpoint
    os.mkfifo(d / "base" / "model.safetensors.index.json")
    # beside model.safetensors the index is not read (transformers reads model.safetensors
    # first; session 23), nor copied: no wait either
    status, err = _merge(d, d / "out")
    assert status == 0 and not (d / "out" / "model.safetensors.index.json").exists(), err
    (d / "base" / "model.safetensors").unlink()  # the index alone: read, and refused
    status, err = _merge(d, d / "out2")
    assert status == 1 and "not a regular file" in err and "Traceback" not in err, err


def test_merge_into_an_out_that_is_a_symlink_loop_is_a_one_line_error(small_checkpoint):
    d = small_checkpoint
    out = d / "out"
    out.symlink_to(out)
    status, err = _merge(d, out)
    assert status == 1, err
    assert "cannot resolve" in err and str(out) in err and "Traceback" not in err, err
    assert out.is_symlink() and os.readlink(out) == str(out)  # left as it was


def test_read_regular_text_refuses_a_pipe_at_once_and_names_a_non_utf8_file(tmp_path):
    from dora_ref.formats.safetensors_io import read_regular_text

    pipe = tmp_path / "p.json"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match="not a regular file"):
        read_regular_text(pipe)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"{\"a\": \"\xff\"}")
    with pytest.raises(ValueError, match=r"bad\.json: not UTF-8"):
        read_regular_text(bad)
    with pytest.raises(IsADirectoryError):
        read_regular_text(tmp_path)
    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    assert read_regular_text(good) == '{"a": 1}'


def test_a_small_file_that_is_a_pipe_is_refused_not_left_out(small_checkpoint):
    """Round 2 (session 17): a pipe among the base's small files was silently left out of OUT."""
    d = small_checkpoint
    os.mkfifo(d / "base" / "tokenizer.json")
    status, err = _merge(d, d / "out")
    assert status == 1 and "tokenizer.json is not a regular file" in err and "Traceback" not in err, err
    assert not (d / "out").exists()


def test_copying_a_small_file_that_became_a_pipe_is_an_error_not_a_wait(tmp_path):
    """Round 2 (session 17): shutil.copy2 checks for a pipe before it opens the file, so a file
    that became a pipe in between made the merge wait for ever; the copy now opens it non-blocking."""
    from dora_ref.formats.merge_cli import _copy_small_file

    os.mkfifo(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="not a regular file"):
        _copy_small_file(tmp_path / "tokenizer.json", tmp_path / "copy.json")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    os.chmod(tmp_path / "vocab.txt", 0o640)
    _copy_small_file(tmp_path / "vocab.txt", tmp_path / "vocab_copy.txt")
    assert (tmp_path / "vocab_copy.txt").read_text() == "a\nb\n"
    assert os.stat(tmp_path / "vocab_copy.txt").st_mode & 0o777 == 0o640


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_broken_link_for_config_json_is_refused_not_passed_over(small_checkpoint, link):
    """Round 2 (session 17): a config.json that was a dangling link or a link loop was ignored and
    the merge went on without the config (and without the checks that need it)."""
    d = small_checkpoint
    cfg = d / "base" / "config.json"
    cfg.symlink_to(d / "nowhere.json" if link == "dangling" else cfg)
    status, err = _merge(d, d / "out")
    assert status == 1 and "config.json" in err and "Traceback" not in err, err


def test_a_config_larger_than_any_config_is_refused_by_size(tmp_path):
    from dora_ref.formats.safetensors_io import MAX_TEXT_BYTES, read_regular_text

    big = tmp_path / "config.json"
    with open(big, "wb") as f:  # sparse: no disk used
        f.truncate(MAX_TEXT_BYTES + 1)
    with pytest.raises(ValueError, match=r"config\.json: \d+ bytes, more than"):
        read_regular_text(big)
