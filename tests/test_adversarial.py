"""Regression tests for what an adversarial review of the merged state found.

Each test is named after the case that was silently wrong before its fix,
and checks the value against an independent computation (the layer's own
weights before merge, or a fresh layer).
"""

import numpy as np
import pytest

from test_reliability_layers import KINDS, make_layer


def _base(layer):
    return np.array(layer.weight, copy=True)


@pytest.mark.parametrize("kind", KINDS)
def test_scaling_changed_while_merged_unmerge_raises(kind):
    """merge(), layer.scaling = other, unmerge(): refused, the layer left merged and
    unchanged; with the scaling set back, unmerge() gives back W0 (before: W0 off by 2.2,
    no error)."""
    layer, x = make_layer(kind)
    W0 = _base(layer)
    layer.merge()
    W_merged = _base(layer)
    s = layer.scaling
    layer.scaling = 2.0 * s
    with pytest.raises(RuntimeError, match="scaling changed"):
        layer.unmerge()
    with pytest.raises(RuntimeError, match="scaling changed"):
        layer.forward(x)
    assert layer.merged
    np.testing.assert_array_equal(layer.weight, W_merged)
    layer.scaling = s
    layer.unmerge()
    # merge then unmerge rounds each element a few times: float64, |W0| ~ 1
    np.testing.assert_allclose(layer.weight, W0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k in KINDS if k.startswith("DoRA")])
def test_weight_norm_written_while_merged_unmerge_raises(kind):
    """A merged DoRA layer's weight_norm (what unmerge() divides by) is read-only, and a
    write that goes around that is found (before: weight_norm[...] = 1 gave W0 off by
    1.6, no error)."""
    layer, _ = make_layer(kind)
    W0 = _base(layer)
    layer.merge()
    with pytest.raises(ValueError, match="read-only"):
        layer.weight_norm[...] = 1.0
    saved = layer.weight_norm.copy()
    layer.weight_norm.flags.writeable = True
    layer.weight_norm[...] = 1.0
    with pytest.raises(RuntimeError, match="weight_norm changed"):
        layer.unmerge()
    layer.weight_norm[...] = saved
    layer.unmerge()
    np.testing.assert_allclose(layer.weight, W0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k in KINDS if k.startswith("DoRA")])
def test_weight_norm_read_only_after_pickle_of_merged_layer(kind):
    import copy
    import pickle

    layer, _ = make_layer(kind)
    layer.merge()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not clone.weight_norm.flags.writeable


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "DoRAEmbedding"])
def test_dropout_mask_while_merged_raises(kind):
    """A dropout mask given to a merged layer would be ignored (before: silently, the
    output that of no dropout): refused with ValueError, in train and eval mode."""
    layer, x = make_layer(kind)
    layer.merge()
    mask = np.zeros_like(x)
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(ValueError, match="merged" if mode else "no dropout in eval"):
            layer.forward(x, dropout_mask=mask)
    y = layer.forward(x)  # without a mask the merged forward still runs
    layer.unmerge()
    layer.train(False)
    np.testing.assert_allclose(layer.forward(x), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_lora_forward_nonfinite_W0_raises(bad):
    """lora_forward left NaN/Inf in W0 to a norm that LoRA does not compute: it returned
    NaN outputs silently (dora_forward refused the same W0)."""
    import dora_ref.core.functional as F

    rng = np.random.default_rng(3)
    W0, A, B = rng.normal(size=(6, 5)), rng.normal(size=(2, 5)), rng.normal(size=(6, 2))
    W0[4, 1] = bad
    with pytest.raises(ValueError, match="W0"):
        F.lora_forward(rng.normal(size=(3, 5)), W0, A, B, 0.5)


@pytest.mark.parametrize("ctx", [None, {}, "ctx", 3])
def test_backward_with_a_wrong_ctx_raises_type_error(ctx):
    """dora_backward / lora_backward with something that is not their forward's context
    raised AttributeError ('NoneType' object has no attribute 'seen')."""
    import dora_ref.core.functional as F

    dy = np.ones((4, 6))
    with pytest.raises(TypeError, match="ctx must be the DoRAContext"):
        F.dora_backward(dy, ctx)
    with pytest.raises(TypeError, match="ctx must be the LoRAContext"):
        F.lora_backward(dy, ctx)


def test_backward_with_the_other_kinds_ctx_raises_type_error():
    import dora_ref.core.functional as F

    rng = np.random.default_rng(4)
    x, W0, A, B = (rng.normal(size=s) for s in [(3, 5), (6, 5), (2, 5), (6, 2)])
    _, lora_ctx = F.lora_forward(x, W0, A, B, 0.5)
    _, dora_ctx = F.dora_forward(x, W0, A, B, np.ones(6), 0.5)
    with pytest.raises(TypeError, match="got LoRAContext"):
        F.dora_backward(np.ones((3, 6)), lora_ctx)
    with pytest.raises(TypeError, match="got DoRAContext"):
        F.lora_backward(np.ones((3, 6)), dora_ctx)


# ---------------------------------------------------------------------------
# dora-ref merge
# ---------------------------------------------------------------------------


@pytest.fixture
def small_checkpoint(tmp_path):
    """A two-tensor base directory and a DoRA adapter for one of its modules."""
    from peft_helpers import random_module, write_adapter
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    (tmp_path / "base").mkdir()
    save_file({"l0.weight": rng.standard_normal((8, 6)).astype(np.float32),
               "norm.weight": np.ones(6, np.float32)},
              str(tmp_path / "base" / "model.safetensors"))
    write_adapter(tmp_path / "ad", {"l0": random_module(rng, 8, 6, 2, dtype=np.float32)})
    return tmp_path


def _merged_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("target_exists", [True, False], ids=["model-dir", "dangling"])
def test_merge_out_symlink_is_written_through(small_checkpoint, target_exists):
    """OUT a symlink (--force): before, the atomic exchange swapped the link itself, the
    cleanup then failed ('Cannot call rmtree on a symbolic link') and the command exited
    with an error although OUT had been replaced, leaving the link as a temporary sibling;
    a dangling link failed with 'Not a directory'. Now the target is written, the link stays."""
    from dora_ref.formats.merge_cli import merge_checkpoint

    d = small_checkpoint
    merge_checkpoint(d / "base", [d / "ad"], d / "ref", progress=False, log=lambda *a: None)
    if target_exists:
        merge_checkpoint(d / "base", [d / "ad"], d / "target", progress=False, log=lambda *a: None)
        (d / "target" / "model.safetensors").write_bytes(b"old")  # an older output
    (d / "link").symlink_to(d / "target")
    merge_checkpoint(d / "base", [d / "ad"], d / "link", progress=False, force=True,
                     log=lambda *a: None)
    assert (d / "link").is_symlink()
    assert _merged_files(d / "target") == _merged_files(d / "ref")
    assert sorted(p.name for p in d.iterdir()) == ["ad", "base", "link", "ref", "target"]


@pytest.mark.parametrize("name, raw", [
    ("adapter_config.json", b"[" * 100000 + b"]" * 100000),
    ("adapter_config.json", b"{" + b'"a":{' * 100000 + b"}" * 100001),
    ("model.safetensors.index.json", b"[" * 100000 + b"]" * 100000),
    ("config.json", b"[" * 100000 + b"]" * 100000),
])
def test_merge_deeply_nested_json_is_a_value_error(small_checkpoint, name, raw):
    """JSON nested deeper than Python's stack raised RecursionError (a traceback from the
    CLI) for the adapter config, the shard index and the model's config.json."""
    from dora_ref.formats.merge_cli import merge_checkpoint

    d = small_checkpoint
    target = d / ("ad" if name == "adapter_config.json" else "base") / name
    target.write_bytes(raw)
    if name == "model.safetensors.index.json":  # beside model.safetensors an index is not read,
        (d / "base" / "model.safetensors").unlink()  # as transformers reads neither (session 23)
    with pytest.raises(ValueError, match="not valid JSON"):
        merge_checkpoint(d / "base", [d / "ad"], d / "out", progress=False, log=lambda *a: None)
    assert not (d / "out").exists()


# ---------------------------------------------------------------------------
# optimisers
# ---------------------------------------------------------------------------

OPTIMISERS = {
    "SGD": lambda p, **kw: __import__("dora_ref").SGD(p, **{"lr": 0.1, **kw}),
    "SGD-momentum": lambda p, **kw: __import__("dora_ref").SGD(
        p, **{"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, **kw}),
    "AdamW": lambda p, **kw: __import__("dora_ref").AdamW(p, **{"lr": 0.1, **kw}),
}


@pytest.mark.parametrize("opt", OPTIMISERS)
@pytest.mark.parametrize("lr, grad, dtype", [(1e308, 1e10, np.float64), (10.0, 3e38, np.float32)],
                         ids=["huge-lr", "huge-grad-float32"])
def test_step_that_overflows_raises_and_changes_nothing(opt, lr, grad, dtype):
    """A finite but huge lr or gradient overflowed the update: the parameter (or AdamW's v,
    which then froze it) turned inf silently, and the next forward blamed lora_A."""
    import copy

    p = {"a": np.array([1.0, -2.0, 0.5], dtype), "b": np.ones(2, dtype)}
    o = OPTIMISERS[opt](p, lr=lr)
    before = copy.deepcopy(p)
    state = copy.deepcopy({k: v for k, v in vars(o).items() if k != "params"})
    with pytest.raises(ValueError, match="non-finite"):
        o.step({"a": np.full(3, grad, dtype), "b": np.ones(2, dtype)})
    for k in p:
        np.testing.assert_array_equal(p[k], before[k])
    after = {k: v for k, v in vars(o).items() if k != "params"}
    assert after.keys() == state.keys()
    for k, v in state.items():
        if isinstance(v, dict):
            assert after[k].keys() == v.keys()
            for n in v:
                np.testing.assert_array_equal(after[k][n], v[n])
        else:
            assert after[k] == v


@pytest.mark.parametrize("opt", OPTIMISERS)
def test_optimizer_refuses_params_that_share_memory(opt):
    """The same array under two names (or overlapping views) was stepped twice per step."""
    a = np.ones(4)
    with pytest.raises(ValueError, match=r"params\['x'\] and params\['y'\] share memory"):
        OPTIMISERS[opt]({"x": a, "y": a})
    with pytest.raises(ValueError, match="share memory"):
        OPTIMISERS[opt]({"x": a[:3], "y": a[1:]})
    OPTIMISERS[opt]({"x": a[::2], "y": np.ones(2)})  # distinct arrays: accepted


@pytest.mark.parametrize("opt", OPTIMISERS)
@pytest.mark.parametrize("dtype", [bool, complex, object])
def test_step_refuses_grads_that_are_not_real_numbers(opt, dtype):
    """Complex gradients lost their imaginary part with only a ComplexWarning, bools were
    taken as 0/1, object arrays gave numpy's 'isfinite not supported'."""
    p = {"a": np.ones(3)}
    o = OPTIMISERS[opt](p)
    with pytest.raises(TypeError, match=r"grads\['a'\] must hold real numbers"):
        o.step({"a": np.ones(3, dtype)})
    np.testing.assert_array_equal(p["a"], np.ones(3))


@pytest.mark.parametrize("opt", OPTIMISERS)
def test_optimizer_params_and_grads_not_mappings_raise_type_error(opt):
    """A list of params gave AttributeError ('list' object has no attribute 'items'), grads
    None 'NoneType' object is not iterable."""
    with pytest.raises(TypeError, match="params must be a mapping"):
        OPTIMISERS[opt]([np.ones(3)])
    o = OPTIMISERS[opt]({"a": np.ones(3)})
    with pytest.raises(TypeError, match="grads must be a mapping"):
        o.step(None)
    with pytest.raises(TypeError, match="grads must be a mapping"):
        o.step([np.ones(3)])


# ---------------------------------------------------------------------------
# NaN/Inf in the batch, and outputs that overflow: never returned
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns before the check refuses
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_forward_with_nonfinite_x_raises_naming_x(kind, merged, bad):
    """NaN/Inf in x came out as NaN/Inf outputs silently (unmerged and merged)."""
    if kind == "DoRAEmbedding":
        pytest.skip("an embedding's input is integer ids")
    layer, x = make_layer(kind)
    if merged:
        layer.merge()
    x = x.copy()
    x.flat[3] = bad
    with pytest.raises(ValueError, match=r"^x .*contains NaN or Inf"):
        layer.forward(x)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns before the check refuses
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_forward_that_overflows_raises(kind, merged):
    """A finite float32 x near the dtype's maximum overflowed the output to inf: returned
    with a RuntimeWarning (NumPy backend) or nothing at all (C epilogue)."""
    if kind == "DoRAEmbedding":
        pytest.skip("an embedding's output is a row of its finite table")
    layer, x = make_layer(kind, dtype=np.float32)
    if merged:
        layer.merge()
    x = np.full_like(x, 3e38)
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(ValueError, match="overflowed float32"):
        layer.forward(x)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns before the check refuses
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "DoRAEmbedding"] + ["DoRAEmbedding"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_backward_with_nonfinite_dy_raises_naming_dy(kind, bad):
    """NaN/Inf in dy came out as NaN gradients, accumulated into layer.grads silently."""
    layer, x = make_layer(kind)
    y = layer.forward(x)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    dy = np.ones_like(y)
    dy.flat[2] = bad
    with pytest.raises(ValueError, match=r"^dy .*contains NaN or Inf"):
        layer.backward(dy)
    for k in grads:
        np.testing.assert_array_equal(layer.grads[k], grads[k])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns before the check refuses
def test_dora_forward_magnitude_that_overflows_the_output_raises():
    """C backend: a finite magnitude near float64's maximum gave inf outputs with no
    warning at all (the epilogue runs in C); NumPy only warned."""
    import dora_ref.core.functional as F

    rng = np.random.default_rng(6)
    W0, A, B = rng.normal(size=(6, 5)), rng.normal(size=(2, 5)), rng.normal(size=(6, 2))
    m = np.full(6, np.finfo(np.float64).max)
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(ValueError, match="overflowed float64"):
        F.dora_forward(rng.normal(size=(3, 5)), W0, A, B, m, 0.5)


# ---------------------------------------------------------------------------
# dora_ref.formats.peft: merge_weight and merge_state_dict arguments
# ---------------------------------------------------------------------------


@pytest.fixture
def dora_module(tmp_path):
    from peft_helpers import random_module, write_adapter

    import dora_ref.formats.peft as P

    rng = np.random.default_rng(7)
    write_adapter(tmp_path / "ad", {"l0": random_module(rng, 8, 8, 2, dtype=np.float32)})
    adapter = P.load_adapter(tmp_path / "ad")
    return adapter, rng.standard_normal((8, 8)).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, bool])
def test_merge_weight_into_integer_or_bool_weight_raises(dora_module, dtype):
    """An int32 or bool base weight came back merged and truncated to its dtype."""
    import dora_ref.formats.peft as P

    adapter, W = dora_module
    with pytest.raises(TypeError, match="W_stored must be a float16, bfloat16, float32 or float64"):
        P.merge_weight((W * 10).astype(dtype), [adapter.modules["l0"]])


@pytest.mark.parametrize("fifo", ["false", "False", 1, None])
def test_merge_weight_fan_in_fan_out_not_a_bool_raises(dora_module, fifo):
    """fan_in_fan_out="false" is truthy: a square weight was merged transposed, silently."""
    import dora_ref.formats.peft as P

    adapter, W = dora_module
    with pytest.raises(TypeError, match="fan_in_fan_out must be True or False"):
        P.merge_weight(W, [adapter.modules["l0"]], fan_in_fan_out=fifo)


def test_merge_weight_and_state_dict_bad_containers_raise_type_error(dora_module):
    """merge_weight(W, []) raised IndexError; merge_state_dict(list or None, ...)
    AttributeError; merge_state_dict(base, adapter) 'PeftAdapter' object is not iterable."""
    import dora_ref.formats.peft as P

    adapter, W = dora_module
    for modules in ([], None, adapter.modules["l0"], ["l0"]):
        with pytest.raises(TypeError, match="modules must be a non-empty sequence of ModuleAdapter"):
            P.merge_weight(W, modules)
    for base in ([W], None):
        with pytest.raises(TypeError, match="base must be a mapping"):
            P.merge_state_dict(base, [adapter])
    with pytest.raises(TypeError, match="adapters must be a sequence"):
        P.merge_state_dict({"l0.weight": W}, adapter)
    merged = P.merge_state_dict({"l0.weight": W}, [adapter], fan_in_fan_out=False)  # well formed
    np.testing.assert_array_equal(merged["l0.weight"], P.merge_weight(W, [adapter.modules["l0"]]))


@pytest.mark.parametrize("kw", [dict(stride=1.5), dict(padding=2.0), dict(dilation=None),
                                dict(padding=10**30), dict(stride=2**31), dict(dilation=(1, 10**20))])
def test_conv_geometry_float_or_huge_raises_value_error_naming_it(kw):
    """stride=1.5 raised "TypeError: 'float' object is not iterable" and padding=10**30
    NumPy's "`pad_width` must be of integral type": neither named the argument."""
    from dora_ref import conv as C

    (name,) = kw
    W = np.random.default_rng(8).standard_normal((4, 2, 3, 3))
    with pytest.raises(ValueError, match=f"^{name} must be an int >= "):
        C.DoRAConv2d(W, r=2, rng=0, **kw)


_SIGTERM_MID_MERGE = """
import os, signal, sys
from dora_ref.formats import merge_cli
real = merge_cli.merge_tensor
def terminated_mid_merge(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode
    return real(*args, **kwargs)
merge_cli.merge_tensor = terminated_mid_merge
handler = signal.getsignal(signal.SIGTERM)
rc = merge_cli.main(sys.argv[1:])
assert signal.getsignal(signal.SIGTERM) is handler, "SIGTERM handler not restored"
sys.exit(rc)
"""


@pytest.mark.parametrize("out_exists", [False, True], ids=["fresh", "force"])
def test_merge_sigterm_removes_the_temporary_output(small_checkpoint, out_exists):
    """SIGTERM (kill, timeout, docker stop) ended Python at once: exit -15 and a partial
    temporary copy of the model left beside OUT until the next merge into it. Now the
    temporary output is removed, OUT is as it was, exit 143. (In a subprocess: the
    signal must not reach pytest.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dora_ref.formats import merge_cli

    d = small_checkpoint
    out = d / "out"
    if out_exists:
        merge_cli.merge_checkpoint(d / "base", [d / "ad"], out, progress=False, log=lambda *a: None)
        (out / "model.safetensors").write_bytes(b"old")
    before = sorted(p.name for p in d.iterdir())
    snapshot = _merged_files(out) if out_exists else None
    argv = [str(d / "base"), str(d / "ad"), str(out), "--no-progress"] + (["--force"] if out_exists else [])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_MID_MERGE, *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert "terminated (SIGTERM)" in proc.stderr
    # the message says what is at OUT: the old output, or none (it said "unchanged" for an
    # OUT that never existed: a new user's nit)
    assert (f"{out} is unchanged" if out_exists else f"{out} was not created") in proc.stderr, proc.stderr
    assert sorted(p.name for p in d.iterdir()) == before  # no temporary sibling left
    assert (_merged_files(out) if out_exists else None) == snapshot


@pytest.mark.parametrize("stop", ["interrupt", "sigterm"])
@pytest.mark.parametrize("out_exists", [False, True], ids=["fresh", "force"])
def test_merge_stopped_after_out_was_installed_says_the_merge_is_done(small_checkpoint, monkeypatch,
                                                                      capsys, stop, out_exists):
    """Found by session 9's adversary: a Ctrl-C or SIGTERM that came after OUT had been
    moved into place (the report blocked on a full pipe) said 'OUT was not created' (or
    'unchanged') with status 130/143, though OUT held the complete merge. Now the message
    says the merge is done, status 0; OUT is the merged output."""
    from dora_ref.formats import merge_cli

    d = small_checkpoint
    out = d / "out"
    if out_exists:
        merge_cli.merge_checkpoint(d / "base", [d / "ad"], out, progress=False, log=lambda *a: None)
        (out / "model.safetensors").write_bytes(b"old")
    real_install = merge_cli._install

    def install_then_stop(*args, **kwargs):
        real_install(*args, **kwargs)
        raise merge_cli._Terminated() if stop == "sigterm" else KeyboardInterrupt()

    monkeypatch.setattr(merge_cli, "_install", install_then_stop)
    argv = [str(d / "base"), str(d / "ad"), str(out), "--no-progress"] + (["--force"] if out_exists else [])
    assert merge_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"after {out} was written complete: the merge is done" in err, err
    monkeypatch.setattr(merge_cli, "_install", real_install)
    reference = d / "reference"
    merge_cli.merge_checkpoint(d / "base", [d / "ad"], reference, progress=False, log=lambda *a: None)
    assert _merged_files(out) == _merged_files(reference)


_SIGNAL_AT_EXIT = """
import atexit, os, signal, sys
sys.argv = ["dora-ref", "merge", "--no-progress", *sys.argv[2:]]
atexit.register(lambda: os.kill(os.getpid(), getattr(signal, {signame!r})))  # the process exiting
from dora_ref.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_merge_command_signalled_while_it_exits_after_a_complete_merge(small_checkpoint, signame):
    """Session 20's adversary: a SIGTERM that came while ``dora-ref merge`` exited after a complete
    merge (2 of 40 random SIGTERMs from outside; here sent from an atexit hook) ended it with
    status -15 (143 in a shell), OUT complete: the merge had put the default handler back, and
    the console script ignored only Ctrl-C on its way out. Now both: status 0, OUT complete."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dora_ref.formats import merge_cli

    d = small_checkpoint
    out, reference = d / "out", d / "reference"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_AT_EXIT.format(signame=signame), "-",
                           str(d / "base"), str(d / "ad"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    merge_cli.merge_checkpoint(d / "base", [d / "ad"], reference, progress=False, log=lambda *a: None)
    assert _merged_files(out) == _merged_files(reference)


def test_merge_main_called_by_a_program_puts_its_sigterm_handler_back(small_checkpoint):
    """Only the console script leaves SIGTERM ignored at the end; a program that calls
    ``merge_cli.main`` gets its own handler back."""
    import signal

    from dora_ref.formats import merge_cli

    d = small_checkpoint
    before = signal.getsignal(signal.SIGTERM)
    assert merge_cli.main([str(d / "base"), str(d / "ad"), str(d / "out"), "--no-progress"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("case", ["foreign-file-then-interrupt", "foreign-folder-then-error"])
def test_merge_out_changed_by_another_process_is_not_called_done(small_checkpoint, monkeypatch,
                                                                   capsys, case):
    """Found by session 9's second adversarial pass: 'the merge is done' (status 0) was
    decided by any new file at OUT, so a file another process put at OUT before an
    interrupt, or a folder that made the final rename fail (an error!), read as this
    merge's complete output. Now only the output this merge moved there counts."""
    from dora_ref.formats import merge_cli

    d = small_checkpoint
    out = d / "out.safetensors"
    real_install = merge_cli._install

    def someone_else_then(tmp, final, is_dir, *rest):
        if case == "foreign-file-then-interrupt":
            final.write_bytes(b"not ours")
            raise KeyboardInterrupt()
        final.mkdir()
        (final / "x").write_bytes(b"not ours")
        real_install(tmp, final, is_dir, *rest)

    monkeypatch.setattr(merge_cli, "_install", someone_else_then)
    # a one-file base: OUT is a file (a folder OUT that appeared meanwhile is refused too:
    # tests/test_merge_no_replace.py)
    argv = [str(d / "base" / "model.safetensors"), str(d / "ad"), str(out), "--no-progress"]
    status = merge_cli.main(argv)
    err = capsys.readouterr().err
    assert "the merge is done" not in err, err
    if case == "foreign-file-then-interrupt":
        assert status == 130 and "this merge did not write it" in err, err
        assert out.read_bytes() == b"not ours"
    else:
        assert status == 1 and "error:" in err, err

def test_merge_report_into_a_full_disk_does_not_fail_the_merge(small_checkpoint):
    """Found by session 9's adversary: ``dora-ref merge ... > /dev/full`` printed
    'error: [Errno 28] No space left on device' and exited 1 although OUT was written
    complete (a script would redo the merge). The report is dropped, as for a reader
    that has gone, and stderr says so once; status 0."""
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    d = small_checkpoint
    out = d / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = " ".join(shlex.quote(str(a)) for a in [sys.executable, "-m", "dora_ref", "merge", d / "base",
                                                  d / "ad", out, "--no-progress", "-v"]) + " > /dev/full"
    done = subprocess.run(["sh", "-c", cmd], stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "the report could not be written" in done.stderr, done.stderr
    assert (out / "model.safetensors").exists()

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", ["merge", "forward", "eval-forward"])
@pytest.mark.parametrize("scaling", [10**400, True, "2"])
def test_layer_scaling_too_large_or_not_a_number_raises_naming_scaling(kind, op, scaling):
    """layer.scaling = 10**400 raised a bare OverflowError ('int too large to convert to
    float') from every layer; LoRALinear.merge() took scaling = True as 1 (its forward
    refused it)."""
    layer, x = make_layer(kind)
    layer.scaling = scaling
    with pytest.raises((TypeError, ValueError), match="^scaling must be"):
        if op == "merge":
            layer.merge()
        else:
            layer.train(op == "forward")
            layer.forward(x)
    assert not layer.merged


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_two_threads_merging_into_one_new_out(small_checkpoint, monkeypatch, kind):
    """Session 20's adversary: two threads of one process merging into the same new OUT. The
    second's cleanup removed the first's temporary output as a leftover of its own pid, and
    the first failed with a raw FileNotFoundError naming its temporary file (15 of 16 trials).
    Now one merge installs OUT and the other says OUT appeared while it ran (as two processes
    do); OUT is the complete merge and no temporary sibling is left."""
    import threading

    from dora_ref.formats import merge_cli

    d = small_checkpoint
    base = d / "base" if kind == "dir" else d / "base" / "model.safetensors"
    out = d / ("out" if kind == "dir" else "out.safetensors")
    both_writing = threading.Barrier(2, timeout=60)
    real = merge_cli.merge_tensor

    def merge_tensor(*args, **kwargs):  # both threads past their cleanup, both writing
        both_writing.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_cli, "merge_tensor", merge_tensor)
    outcomes = []

    def run():
        try:
            merge_cli.merge_checkpoint(base, [d / "ad"], out, progress=False, log=lambda *a: None)
            outcomes.append("ok")
        except ValueError as e:
            outcomes.append("appeared" if "appeared while this merge ran" in str(e) else repr(e))
        except BaseException as e:  # noqa: BLE001 (what the test reports)
            outcomes.append(repr(e))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(outcomes) == ["appeared", "ok"], outcomes
    monkeypatch.setattr(merge_cli, "merge_tensor", real)
    reference = d / ("reference" if kind == "dir" else "reference.safetensors")
    merge_cli.merge_checkpoint(base, [d / "ad"], reference, progress=False, log=lambda *a: None)
    if kind == "dir":
        assert _merged_files(out) == _merged_files(reference)
    else:
        assert out.read_bytes() == reference.read_bytes()
    assert not [p.name for p in d.iterdir() if ".dora-ref-" in p.name]
    assert not merge_cli._LIVE


def test_a_thread_refused_because_another_installed_out_does_not_say_it_is_done(small_checkpoint,
                                                                                monkeypatch):
    """Session 20's second adversary: thread B (another adapter, no --force) started while OUT was
    absent, thread A merged and installed OUT, then B was refused ("exists and is not empty")
    but returned 0 and said its merge was done: the record of who installed OUT was per
    process. Now per thread: B returns 1 and says OUT was changed by something else."""
    import threading

    from peft_helpers import random_module, write_adapter

    from dora_ref.formats import merge_cli

    d = small_checkpoint
    write_adapter(d / "ad2", {"l0": random_module(np.random.default_rng(7), 8, 6, 2, dtype=np.float32)})
    out = d / "out"
    a_done = threading.Event()
    real = merge_cli.merge_checkpoint

    def merge_checkpoint(*args, **kwargs):
        if threading.current_thread().name == "B":
            a_done.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_cli, "merge_checkpoint", merge_checkpoint)
    status = {}

    def run(name, adapter):
        status[name] = merge_cli.main([str(d / "base"), str(d / adapter), str(out), "--no-progress"])
        if name == "A":
            a_done.set()

    b = threading.Thread(target=run, args=("B", "ad2"), name="B")
    a = threading.Thread(target=run, args=("A", "ad"), name="A")
    b.start()
    a.start()
    a.join(60)
    b.join(60)
    assert status == {"A": 0, "B": 1}
    reference = d / "reference"
    real(d / "base", [d / "ad"], reference, progress=False, log=lambda *a: None)
    assert _merged_files(out) == _merged_files(reference)


def test_ctrl_c_before_the_command_starts_is_status_130_without_a_traceback(monkeypatch, capsys):
    from dora_ref import cli

    def interrupted(argv, console=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["info"]) == 130
    assert "dora-ref: interrupted" in capsys.readouterr().err
