"""Regression tests for what session 23's adversary found in ``dora-ref merge`` and the
PEFT adapter reader.

* ``--force`` with OUT a bind-mounted view of the ADAPTER directory, the
  BASE directory or the BASE file replaced it: the guard compared resolved
  names, and a bind mount reaches the same directory under another name.
  Now also by device and inode (``merge_cli._inside``, ``_same_entry``).
* ``--force`` replaced a FIFO or a device node by a regular file (as root,
  ``--force ... /dev/null`` would have replaced /dev/null). A non-regular OUT
  is now refused, ``--force`` or not.
* ``target_modules``, ``exclude_modules`` and ``layers_to_transform`` were
  ignored: every module with tensors was merged, where PEFT adapts only the
  modules its config selects (``check_target_module_exists``) and leaves the
  other tensors out: a merged model unlike PEFT's (1.1-1.26 of a tensor's
  largest value), silently. Such an adapter is now refused, naming the
  modules; ``config_selects`` is checked against PEFT's own rule here.
* ``modules_to_save`` naming a module of the base with no saved tensor
  merged silently (PEFT: KeyError); now refused (a name the base has no
  module of is skipped, as PEFT skips it).
* A magnitude of 3e38 was reported as "the row norm n ... is so small"
  (n 0.34); the message now names the magnitude.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import numpy as np
import pytest
from peft_helpers import random_module, write_adapter
from safetensors.numpy import save_file

from dora_ref import peft as P
from dora_ref.formats.merge_cli import main as merge_main
from dora_ref.formats.peft.adapter import config_selects


@pytest.fixture(autouse=True)
def backend():
    """Override conftest's per-backend fixture: the file tests need one backend."""
    yield "c"


def _model(tmp_path, names=("blk.fc",), out_f=6, in_f=8, config=None):
    rng = np.random.default_rng(0)
    base = tmp_path / "base"
    base.mkdir()
    tensors, modules = {}, {}
    for name in names:
        tensors[f"{name}.weight"] = rng.standard_normal((out_f, in_f)).astype(np.float32)
        modules[name] = random_module(rng, out_f, in_f, 2, np.float32)
    save_file(tensors, str(base / "model.safetensors"))
    write_adapter(tmp_path / "adapter", modules, config)
    return base, tmp_path / "adapter"


def _digest(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _bind(src, view):
    view.mkdir()
    try:
        done = subprocess.run(["mount", "--bind", str(src), str(view)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot bind-mount here (not root, or no mount permission)")


def _unbind(view):
    subprocess.run(["umount", str(view)], capture_output=True, timeout=30)


@pytest.mark.parametrize("which", ["adapter", "base"])
def test_force_into_a_bind_mounted_view_of_an_input_directory_is_refused(tmp_path, capsys, which):
    base, adapter = _model(tmp_path)
    before = {"adapter": _digest(adapter), "base": _digest(base)}
    view = tmp_path / "view"
    _bind(tmp_path, view)
    try:
        status = merge_main([str(base), str(adapter), str(view / which), "--force", "--no-progress"])
    finally:
        _unbind(view)
    assert status == 1
    err = capsys.readouterr().err
    assert f"the {which.upper()} directory" in err, err
    assert {"adapter": _digest(adapter), "base": _digest(base)} == before


def test_force_into_a_bind_mounted_view_of_the_base_file_is_refused(tmp_path, capsys):
    base, adapter = _model(tmp_path)
    base_file = base / "model.safetensors"
    before = base_file.read_bytes()
    view = tmp_path / "view"
    _bind(base, view)
    try:
        status = merge_main([str(base_file), str(adapter), str(view / "model.safetensors"), "--force",
                             "--no-progress"])
    finally:
        _unbind(view)
    assert status == 1
    assert "is a base file" in capsys.readouterr().err
    assert base_file.read_bytes() == before


def test_a_hard_link_to_the_base_file_is_refused_as_the_base_file(tmp_path, capsys):
    # a hard link and a file bind mount cannot be told apart (one inode): both are the base
    # file under another name, and replacing the base's own name through a file bind mount
    # lost it (an adversary, the second round)
    base, adapter = _model(tmp_path)
    base_file = base / "model.safetensors"
    before = base_file.read_bytes()
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "model.safetensors"
    os.link(base_file, link)
    assert merge_main([str(base_file), str(adapter), str(link), "--force", "--no-progress"]) == 1
    assert "is a base file (or the same file under another name" in capsys.readouterr().err
    assert base_file.read_bytes() == before and link.read_bytes() == before


@pytest.mark.parametrize("which", ["adapter", "base"])
def test_force_refuses_an_out_that_holds_an_input(tmp_path, capsys, which):
    # --force deletes the old OUT: an ADAPTER or BASE inside it went with it (an adversary)
    base, adapter = _model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.safetensors").write_bytes(b"")
    moved = out / which
    shutil.move(str(adapter if which == "adapter" else base), str(moved))
    before = _digest(moved)
    args = [str(out / "base" if which == "base" else base), str(out / "adapter" if which == "adapter"
            else adapter), str(out), "--force", "--no-progress"]
    assert merge_main(args) == 1
    err = capsys.readouterr().err
    assert "--force would delete it" in err or f"the {which.upper()} directory" in err, err
    assert _digest(moved) == before


def test_force_refuses_an_out_that_holds_a_mount_point(tmp_path, capsys):
    # the adversary's case: the adapter bind-mounted into a folder of OUT lost its files
    base, adapter = _model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.safetensors").write_bytes(b"")
    before = _digest(adapter)
    _bind(adapter, out / "sub")
    try:
        status = merge_main([str(base), str(adapter), str(out), "--force", "--no-progress"])
    finally:
        _unbind(out / "sub")
    assert status == 1
    err = capsys.readouterr().err
    assert "holds a mount point" in err or "--force would delete it" in err, err
    assert _digest(adapter) == before


@pytest.mark.parametrize("kind", ["fifo", "char_device"])
@pytest.mark.parametrize("force", [True, False])
def test_force_never_replaces_a_fifo_or_a_device_node(tmp_path, capsys, kind, force):
    base, adapter = _model(tmp_path)
    out = tmp_path / "out.safetensors"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        try:
            os.mknod(out, stat.S_IFCHR | 0o644, os.makedev(1, 3))  # what /dev/null is
        except PermissionError:
            pytest.skip("mknod needs root")
    before = os.lstat(out)
    args = [str(base / "model.safetensors"), str(adapter), str(out), "--no-progress"]
    assert merge_main(args + (["--force"] if force else [])) == 1
    err = capsys.readouterr().err
    assert ("a FIFO" if kind == "fifo" else "a character device") in err, err
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)


# ---------------------------------------------------------------------------
# which modules the config selects
# ---------------------------------------------------------------------------

_LAYERS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.mark.parametrize("config, unselected", [
    ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.v_proj"),
    ({"target_modules": r".*\.q_proj"}, "model.layers.0.self_attn.v_proj"),
    ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["q_proj"]},
     "model.layers.0.self_attn.q_proj"),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
     "model.layers.0.self_attn.q_proj"),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 1, "layers_pattern": "layers"},
     "model.layers.0.self_attn.q_proj"),
], ids=["list", "regex", "exclude", "layers_to_transform", "layers_pattern"])
def test_an_adapter_with_tensors_its_config_does_not_select_is_refused(tmp_path, capsys, config,
                                                                         unselected):
    base, adapter = _model(tmp_path, _LAYERS, config=config)
    with pytest.raises(ValueError, match="does not select") as info:
        P.load_adapter(adapter)
    assert repr(unselected) in str(info.value)
    out = tmp_path / "out"
    assert merge_main([str(base), str(adapter), str(out), "--no-progress"]) == 1
    assert "does not select" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("config", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"},
    {"target_modules": ["self_attn.q_proj", "model.layers.0.self_attn.v_proj", "v_proj"]},
    {"target_modules": "all-linear"},
    {"target_modules": None},
], ids=["suffixes", "regex", "paths", "all-linear", "none"])
def test_an_adapter_whose_config_selects_its_modules_loads(tmp_path, config):
    _, adapter = _model(tmp_path, _LAYERS, config=config)
    assert sorted(P.load_adapter(adapter).modules) == sorted(_LAYERS)


def test_config_selects_agrees_with_peft():
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    keys = [f"model.layers.{i}.{blk}.{p}" for i in (0, 1, 3, 11) for blk in ("self_attn", "mlp")
            for p in ("q_proj", "v_proj", "up_proj")] + [
        "model.layers.1.experts.0.up_proj", "transformer.h.2.attn.c_attn", "lm_head", "q_proj",
        "model.embed_tokens", "model.blocks.3.mlp.up_proj", "score", "model.layers.2.q_proj.inner"]
    configs = [
        dict(target_modules=["q_proj"]), dict(target_modules=["q_proj", "up_proj"]),
        dict(target_modules=r".*\.(q|v)_proj"), dict(target_modules=r"model\.layers\.1\..*"),
        dict(target_modules=["self_attn.q_proj"]), dict(target_modules=["lm_head", "c_attn"]),
        dict(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]),
        dict(target_modules=["q_proj", "up_proj"], exclude_modules=r".*mlp.*"),
        dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1, 3]),
        dict(target_modules=["q_proj", "up_proj"], layers_to_transform=0),
        dict(target_modules=["up_proj"], layers_to_transform=[1], layers_pattern="layers"),
        dict(target_modules=["up_proj"], layers_to_transform=[3], layers_pattern=["h", "blocks"]),
        dict(target_modules=["q_proj", "up_proj", "score"], modules_to_save=["score", "mlp"]),
        dict(target_modules=["q_proj"], layers_to_transform=[]),
    ]
    checked = 0
    for fields in configs:
        ours = P.LoraAdapterConfig(r=2, lora_alpha=4, use_dora=True,
                                   target_modules=fields.get("target_modules"),
                                   extra={k: v for k, v in fields.items() if k != "target_modules"})
        theirs = peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, **fields)
        for key in keys:
            got = config_selects(ours, key)
            want = check_target_module_exists(theirs, key)
            want = False if isinstance(want, _ExcludedModule) else bool(want)
            assert got is want, (fields, key, got, want)
            checked += 1
    assert checked == len(configs) * len(keys)


def test_modules_to_save_without_its_tensor_is_refused(tmp_path, capsys):
    base, adapter = _model(tmp_path, ["blk.fc", "head"], config={"modules_to_save": ["head"],
                                                                 "target_modules": ["fc"]})
    shutil.rmtree(adapter)  # an adapter on blk.fc alone whose config keeps "head" (the base has it)
    rng = np.random.default_rng(1)
    write_adapter(adapter, {"blk.fc": random_module(rng, 6, 8, 2, np.float32)},
                  {"modules_to_save": ["head"], "target_modules": ["fc"]})
    out = tmp_path / "out"
    assert merge_main([str(base), str(adapter), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "modules_to_save names 'head'" in err and "no tensor of it" in err, err
    assert not out.exists()
    # with its tensor it merges, and the tensor replaces the base's
    shutil.rmtree(adapter)
    head = np.full((6, 8), 0.5, np.float32)
    write_adapter(adapter, {"blk.fc": random_module(rng, 6, 8, 2, np.float32)},
                  {"modules_to_save": ["head"], "target_modules": ["fc"]}, extra={"head.weight": head})
    assert merge_main([str(base), str(adapter), str(out), "--no-progress"]) == 0
    from safetensors.numpy import load_file
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))["head.weight"], head)


def test_modules_to_save_naming_a_module_the_base_lacks_is_skipped_as_peft_does(tmp_path):
    # PEFT's sequence-classification configs list "classifier" and "score" for every model
    base, adapter = _model(tmp_path, ["blk.fc"], config={"modules_to_save": ["classifier", "score"]})
    assert merge_main([str(base), str(adapter), str(tmp_path / "out"), "--no-progress"]) == 0


def test_a_huge_magnitude_is_named_as_the_cause_not_the_row_norm(tmp_path, capsys):
    rng = np.random.default_rng(2)
    W0 = rng.standard_normal((6, 8)).astype(np.float32)
    A, B = np.zeros((2, 8), np.float32), np.zeros((6, 2), np.float32)
    W0[3] *= np.float32(0.1)  # row norm about 0.3, as the adversary's 0.34
    m = np.ones(6, np.float32)
    m[3] = 3e38  # m / n about 1e39: overflows float32
    save_file({"blk.fc.weight": W0}, str(tmp_path / "base.safetensors"))
    write_adapter(tmp_path / "ad", {"blk.fc": (A, B, m)}, {"r": 2, "lora_alpha": 2})
    assert merge_main([str(tmp_path / "base.safetensors"), str(tmp_path / "ad"),
                       str(tmp_path / "out.safetensors"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "rows [3]" in err and "the magnitude m is so large" in err and "overflows float32" in err, err
    assert "so small" not in err


def test_a_base_with_both_model_safetensors_and_a_shard_index_is_read_as_transformers_reads_it(
        tmp_path):
    # transformers loads model.safetensors first; the merge read the shards (an adversary)
    base, adapter = _model(tmp_path)
    from safetensors.numpy import load_file
    shard_values = {k: v + np.float32(1.0) for k, v in load_file(str(base / "model.safetensors")).items()}
    save_file(shard_values, str(base / "model-00001-of-00001.safetensors"))
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in shard_values}}))
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert merge_main([str(base), str(adapter), str(both), "--no-progress"]) == 0
    assert merge_main([str(base / "model.safetensors"), str(adapter), str(alone / "model.safetensors"),
                       "--no-progress"]) == 1  # a file OUT in a folder that does not exist: named
    alone.mkdir()
    assert merge_main([str(base / "model.safetensors"), str(adapter), str(alone / "model.safetensors"),
                       "--no-progress"]) == 0
    assert sorted(p.name for p in both.iterdir()) == ["model.safetensors"]  # no dangling index
    assert (both / "model.safetensors").read_bytes() == (alone / "model.safetensors").read_bytes()


def test_many_slow_patterns_in_a_config_end_in_an_error_not_an_unbounded_wait(tmp_path):
    # each pattern's matching time is bounded, but 600 of them against a 252-character path took
    # 46 s before the whole check got a budget (an adversary, the second round)
    import time

    module = ".".join(["a"] * 123) + ".q_proj"
    rng = np.random.default_rng(4)
    write_adapter(tmp_path / "ad", {module: random_module(rng, 4, 4, 2, np.float32)},
                  {"target_modules": ["q_proj"],
                   "modules_to_save": [rf".*\..*\..*\.X{i}" for i in range(600)]})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"modules_to_save against the module paths took over 2 s"):
        P.load_adapter(tmp_path / "ad")
    assert time.perf_counter() - start < 15


@pytest.mark.parametrize("tying", [True, False])
def test_the_tied_partner_of_a_targeted_module_is_not_called_unselected_under_ensure_weight_tying(
        tmp_path, tying):
    # PEFT adapts lm_head with embed_tokens when ensure_weight_tying is set (target_modules_to_tie):
    # the check called such an adapter's lm_head tensors unselected, falsely (an adversary)
    rng = np.random.default_rng(5)
    modules = {"model.layers.0.q_proj": random_module(rng, 4, 4, 2, np.float32),
               "lm_head": random_module(rng, 4, 4, 2, np.float32)}
    write_adapter(tmp_path / "ad", modules, {"target_modules": ["q_proj"], "ensure_weight_tying": tying})
    cfg = P.read_config(tmp_path / "ad")
    assert config_selects(cfg, "lm_head") is (None if tying else False)
    if tying:
        assert sorted(P.load_adapter(tmp_path / "ad").modules) == sorted(modules)
    else:
        with pytest.raises(ValueError, match="does not select"):
            P.load_adapter(tmp_path / "ad")


def test_the_next_runs_cleanup_never_deletes_through_a_mount_point_in_a_leftover(tmp_path, capsys):
    # the adversary's second round: the first deletion stopped at the mount (EBUSY) and left the
    # old OUT as a sibling; the next run's cleanup of that sibling deleted the adapter's files
    from dora_ref.formats import merge_cli

    base, adapter = _model(tmp_path)
    out = tmp_path / "out"
    leftover = tmp_path / f".out.{merge_cli._OLD_TAG}-999999-0123abcd"  # a pid no process has
    leftover.mkdir()
    before = _digest(adapter)
    _bind(adapter, leftover / "sub")
    try:
        status = merge_main([str(base), str(adapter), str(out), "--no-progress"])
    finally:
        _unbind(leftover / "sub")
    assert status == 1
    assert "holds a mount point" in capsys.readouterr().err
    assert _digest(adapter) == before and leftover.is_dir()


def test_an_out_made_a_link_between_the_check_and_the_exchange_is_unlinked_not_followed(
        tmp_path, monkeypatch):
    # the adversary's race: OUT turned into a symlink to the ADAPTER after the checks; the
    # exchange put the link aside and rmtree refused it ("Cannot call rmtree on a symbolic link")
    from dora_ref.formats import merge_cli

    base, adapter = _model(tmp_path)
    out = tmp_path / "out"
    assert merge_main([str(base), str(adapter), str(out), "--no-progress"]) == 0
    before = _digest(adapter)
    real_exchange = merge_cli._exchange

    def racing_exchange(tmp, dst):
        shutil.rmtree(dst)
        os.symlink(adapter, dst)
        return real_exchange(tmp, dst)

    monkeypatch.setattr(merge_cli, "_exchange", racing_exchange)
    assert merge_main([str(base), str(adapter), str(out), "--force", "--no-progress"]) == 0
    assert _digest(adapter) == before
    assert out.is_dir() and not out.is_symlink() and (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # nothing left aside


# ---------------------------------------------------------------------------
# the third round: mount points the first fix missed
# ---------------------------------------------------------------------------


def _tree(p):
    """Every file under p, by its path relative to p, with its bytes."""
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def _precious(tmp_path):
    p = tmp_path / "precious"
    (p / "sub").mkdir(parents=True)
    (p / "a").write_text("keep")
    (p / "sub" / "b").write_text("keep")
    return p


@pytest.mark.parametrize("char", ["\r", "\x0b", "\x0c", "\x1c", "\u0085", "\u2028", " ", "\\"],
                         ids=["cr", "vt", "ff", "fs", "nel", "ls", "space", "backslash"])
def test_a_mount_point_under_an_out_whose_name_holds_a_line_separator_is_seen(tmp_path, capsys, char):
    # /proc/self/mountinfo was read as text and split with splitlines(): a path with \r, \v,
    # \f, U+2028, ... was cut in two, the mount went unseen and the old OUT's deletion emptied
    # the bind-mounted folder (exit 0)
    base, adapter = _model(tmp_path)
    precious = _precious(tmp_path)
    before = _tree(precious)
    out = tmp_path / f"o{char}x"
    assert merge_main([str(base), str(adapter), str(out), "--no-progress"]) == 0
    _bind(precious, out / "m")
    try:
        status = merge_main([str(base), str(adapter), str(out), "--force", "--no-progress"])
    finally:  # where it is: in OUT, or moved aside with the old OUT (the old code)
        for m in [out / "m", *tmp_path.glob(".o*/m")]:
            _unbind(m)
    assert status == 1 and "holds a mount point" in capsys.readouterr().err
    assert _tree(precious) == before and len(before) == 2


def test_a_mount_made_after_the_check_is_not_deleted_through(tmp_path, monkeypatch, capsys):
    # the race: a mount appears in the old OUT between the check and the exchange; the
    # deletion refused it, and then the error handler's rmtree went through it
    from dora_ref.formats import merge_cli

    base, adapter = _model(tmp_path)
    precious = _precious(tmp_path)
    before = _tree(precious)
    out = tmp_path / "out"
    assert merge_main([str(base), str(adapter), str(out), "--no-progress"]) == 0
    real_exchange = merge_cli._exchange
    mounted = []

    def racing_exchange(tmp, dst):
        _bind(precious, dst / "m")
        mounted.append(dst / "m")
        return real_exchange(tmp, dst)

    monkeypatch.setattr(merge_cli, "_exchange", racing_exchange)
    try:
        merge_main([str(base), str(adapter), str(out), "--force", "--no-progress"])
    finally:
        for m in tmp_path.glob(".out.*/m"):
            _unbind(m)
    assert "holds a mount point" in capsys.readouterr().err
    assert _tree(precious) == before and len(before) == 2
    assert (out / "model.safetensors").exists()  # the new OUT is in place


def test_an_interrupted_merge_never_deletes_through_a_mount_in_its_temporary_folder(
        tmp_path, monkeypatch):
    from dora_ref.formats import merge_cli

    base, adapter = _model(tmp_path)
    precious = _precious(tmp_path)
    before = _tree(precious)

    def interrupted_install(tmp, out, is_dir, force):
        _bind(precious, tmp / "m")
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_cli, "_install", interrupted_install)
    try:
        with pytest.raises(KeyboardInterrupt):
            merge_cli.merge_checkpoint(base, [adapter], tmp_path / "out", progress=False,
                                       log=lambda *a: None)
    finally:
        for m in tmp_path.glob(".out.*/m"):
            _unbind(m)
    assert _tree(precious) == before and len(before) == 2


def test_a_leftover_with_a_pid_no_process_can_have_is_cleaned_not_a_traceback(tmp_path):
    from dora_ref.formats import merge_cli

    base, adapter = _model(tmp_path)
    leftover = tmp_path / f".out.{merge_cli._TMP_TAG}-99999999999999999999-ab"
    leftover.mkdir()
    assert merge_main([str(base), str(adapter), str(tmp_path / "out"), "--no-progress"]) == 0
    assert not leftover.exists()
