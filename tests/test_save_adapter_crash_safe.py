"""``peft.save_adapter`` under kills: no pair of files that loads without an error but wrongly.

Session 20's adversary: saving an adapter with lora_alpha = 32 into a folder that held one
with lora_alpha = 8, killed (SIGKILL) between the two files, left the new weights beside the
old config, and ``load_adapter`` read them with scaling 2.0 instead of 8.0, no error (8 of
15 random kills). The weights file now records the config fields that say what its tensors
mean, and ``load_adapter`` refuses a config beside it that disagrees; an absent or empty
folder is built aside and renamed into place whole.
"""
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dora_ref import DoRALinear
from dora_ref import peft as P
from dora_ref.formats.peft import adapter as adapter_module

ROOT = Path(__file__).resolve().parents[1]


def _adapter(alpha, seed=0):
    layer = DoRALinear(np.random.default_rng(seed).standard_normal((5, 4)), r=2, lora_alpha=alpha,
                       rng=seed)
    layer.lora_B[...] = np.random.default_rng(seed + 1).standard_normal(layer.lora_B.shape)
    return P.adapter_from_layers({"proj": layer})


def _save_killed_at(directory, alpha, where, after=False):
    """Run save_adapter(directory, alpha) in a child that SIGKILLs itself when it starts
    writing the temporary file whose name begins with ``where`` (``after``: once it is written)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        from test_save_adapter_crash_safe import _adapter
        from dora_ref import peft as P
        from dora_ref.formats.peft import adapter as A
        write = A._write_synced
        def killing(path, data):
            hit = os.path.basename(str(path)).startswith({where!r}) or str(path).endswith({where!r})
            if hit and not {after!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, data)
            if hit:
                os.kill(os.getpid(), signal.SIGKILL)
        A._write_synced = killing
        P.save_adapter({str(directory)!r}, _adapter({alpha}))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(ROOT), timeout=120)
    assert done.returncode == -9


def test_a_save_killed_between_its_two_files_is_refused_on_load(tmp_path):
    out = tmp_path / "adapter"
    P.save_adapter(out, _adapter(8))
    (out / "README.md").write_text("kept")
    _save_killed_at(out, 32, ".adapter_config.json")  # the new weights are in place, the config is not
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 8
    with pytest.raises(ValueError, match=r"saved with lora_alpha=32 but the adapter_config\.json beside "
                                         r"it gives lora_alpha=8: the two files are from different saves"):
        P.load_adapter(out)
    P.save_adapter(out, _adapter(32))  # saving again mends it, and removes what the kill left
    assert P.load_adapter(out).modules["proj"].scaling == 16.0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                    "adapter_model.safetensors"]


@pytest.mark.parametrize("where", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_save_into_a_new_folder_killed_leaves_no_adapter(tmp_path, where):
    out = tmp_path / "sub" / "adapter"
    _save_killed_at(out, 32, where)
    assert not out.exists()  # only a hidden temporary sibling, which the next save removes
    assert [p.name.startswith(".adapter.dora-ref-save-") for p in out.parent.iterdir()] == [True]
    P.save_adapter(out, _adapter(32))
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]
    assert P.load_adapter(out).modules["proj"].scaling == 16.0


def test_a_config_edited_by_hand_is_refused_naming_the_field(tmp_path):
    P.save_adapter(tmp_path, _adapter(8))  # an empty folder: filled whole
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = "elsewhere"  # a field the tensors do not depend on: fine
    path.write_text(json.dumps(cfg))
    assert P.load_adapter(tmp_path).modules["proj"].scaling == 4.0
    cfg["r"], cfg["lora_alpha"] = 2, 8.0  # the same values written otherwise: fine
    path.write_text(json.dumps(cfg))
    P.load_adapter(tmp_path)
    cfg["use_rslora"] = True
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"saved with use_rslora=false but .* gives use_rslora=true"):
        P.load_adapter(tmp_path)


def test_an_adapter_without_the_record_loads_as_before(tmp_path):
    """PEFT's own files (and dora_ref's before this check) carry no record: not checked."""
    from safetensors.numpy import load_file, save_file

    P.save_adapter(tmp_path, _adapter(8))
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    assert P.load_adapter(tmp_path).modules["proj"].scaling == 8.0


def test_the_saved_files_have_the_usual_mode(tmp_path):
    """The weights file was 0600 (safetensors' own temporary file), the config 0644."""
    old = os.umask(0o022)
    try:
        P.save_adapter(tmp_path / "a", _adapter(8))
    finally:
        os.umask(old)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o644


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "a").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        P.save_adapter(tmp_path / "a", _adapter(8))


def test_a_symlinked_folder_is_written_through_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    P.save_adapter(tmp_path / "link", _adapter(8))
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]


def test_the_record_survives_peft_loading(tmp_path):
    """PEFT ignores the extra metadata: it loads a dora_ref-saved adapter as before."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 5, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = M().double()
    W0 = model.proj.weight.detach().numpy().copy()
    layer = DoRALinear(W0, r=2, lora_alpha=8, rng=0)
    layer.lora_B[...] = 0.1
    P.save_adapter(tmp_path, P.adapter_from_layers({"proj": layer}))
    x = np.random.default_rng(0).standard_normal((3, 4))
    y = PeftModel.from_pretrained(model, str(tmp_path))(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, layer(x), rtol=0, atol=1e-14)  # float64: a few roundings of values of O(1), each 1.1e-16


def test_a_save_into_the_working_directory(tmp_path, monkeypatch):
    """save_adapter(".") in an empty working directory: written into it, not replaced (a
    replaced working directory would leave the process in a deleted folder)."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    P.save_adapter(".", _adapter(8))
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["adapter_config.json",
                                                           "adapter_model.safetensors"]
    assert os.path.samefile(Path.cwd(), here) and P.load_adapter(".").modules["proj"].scaling == 4.0


def test_an_adapter_with_unsorted_pattern_keys_loads_back(tmp_path):
    """Session 20's second adversary: layers given in an order whose rank/alpha pattern keys are
    not sorted ('^b' before '^a') made load_adapter refuse save_adapter's own output (the config
    is written with sorted keys, the record kept the order given)."""
    rng = np.random.default_rng(0)
    layers = {"b": DoRALinear(rng.standard_normal((5, 4)), r=2, lora_alpha=4, rng=0),
              "a": DoRALinear(rng.standard_normal((5, 4)), r=2, lora_alpha=16, rng=1),
              "c": DoRALinear(rng.standard_normal((5, 4)), r=4, lora_alpha=8, rng=2),
              "d": DoRALinear(rng.standard_normal((5, 4)), r=2, lora_alpha=16, rng=3)}
    P.save_adapter(tmp_path, P.adapter_from_layers(layers))
    loaded = P.load_adapter(tmp_path)
    assert {k: m.scaling for k, m in loaded.modules.items()} == {
        k: layer.scaling for k, layer in layers.items()}


@pytest.mark.parametrize("start", ["absent", "existing"])
def test_concurrent_saves_into_one_folder_leave_one_whole_adapter(tmp_path, start):
    """The second adversary's case: four threads saving adapters with different alphas into one
    folder all succeeded and left one's weights beside another's config in 39 of 160 trials.
    Saves into folders of one parent now run one at a time: the folder holds one whole save."""
    import threading

    out = tmp_path / "adapter"
    if start == "existing":
        P.save_adapter(out, _adapter(1, seed=9))
    adapters = [_adapter(alpha, seed=i) for i, alpha in enumerate((4, 8, 16, 32))]
    errors = []

    def save(ad):
        try:
            P.save_adapter(out, ad)
        except BaseException as e:  # noqa: BLE001 (what the test reports)
            errors.append(repr(e))

    for _ in range(5):
        threads = [threading.Thread(target=save, args=(ad,)) for ad in adapters]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        got = P.load_adapter(out).modules["proj"]
        assert any(got.scaling == ad.modules["proj"].scaling
                   and np.array_equal(got.lora_B, ad.modules["proj"].lora_B) for ad in adapters)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_save_killed_through_a_symlinked_folder_is_cleaned_by_the_next(tmp_path):
    """The second adversary's case: the temporary file a killed save left in the folder a
    symlink points to was never removed (the cleanup skipped symlinked folders)."""
    real = tmp_path / "real"
    P.save_adapter(real, _adapter(8))
    (tmp_path / "link").symlink_to(real)
    _save_killed_at(tmp_path / "link", 32, ".adapter_model.safetensors", after=True)
    assert any(".dora-ref-save-" in p.name for p in real.iterdir())
    P.save_adapter(tmp_path / "link", _adapter(32))
    assert sorted(p.name for p in real.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]


@pytest.mark.parametrize("record, said", [("[" * 100000 + "]" * 100000, "not valid JSON"),
                                          ('{"r": 1' + "0" * 400 + "}", "was saved with r=1000"),
                                          ("[1, 2]", "not a JSON object")])
def test_a_tampered_record_is_a_clear_error(tmp_path, record, said):
    """A record nested deeper than Python's stack gave RecursionError, one with r = 10**400 an
    OverflowError (the second adversary): both now a ValueError naming the file."""
    from safetensors.numpy import load_file, save_file

    P.save_adapter(tmp_path, _adapter(8))
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights),
              metadata={"format": "pt", "dora_ref.adapter_config": record})
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors.*{said}"):
        P.load_adapter(tmp_path)


@pytest.mark.parametrize("fields, said", [
    (dict(lora_alpha=32), "takes lora_alpha from the layers"),
    (dict(r=8), "takes r from the layers"),
    (dict(use_dora=True), "takes use_dora from the layers"),
    (dict(target_modules=["proj"]), "takes target_modules from the layers"),
    (dict(lora_alpa=8), r"'lora_alpa' is not a field of PEFT's LoraConfig \(0\.21\); did you mean 'lora_alpha'\?"),
    (dict(base_model=8), r"'base_model' is not a field of PEFT's LoraConfig"),
    # the third adversary's: PEFT loads them otherwise than the layers (or refuses them)
    (dict(peft_type="LOHA"), r"does not write peft_type='LOHA'"),
    (dict(init_lora_weights="pissa"), r"does not write init_lora_weights='pissa'"),
    (dict(layers_to_transform=[0]), r"does not write layers_to_transform=\[0\]"),
    (dict(bias="all"), r"does not write bias='all'"),
    (dict(modules_to_save=["head"]), r"does not write modules_to_save=\['head'\]"),
    (dict(base_model_name_or_path=np.int64(3)), r"base_model_name_or_path=.* \(not a JSON value\)"),
])
def test_adapter_from_layers_refuses_fields_the_layers_give_or_peft_lacks(fields, said):
    """A new user's case: adapter_from_layers(layers, lora_alpha=32, r=8, use_dora=True) dropped
    them silently (the layers' own were written), and lora_alpa=8 was written into the config,
    where PEFT then warned to upgrade PEFT."""
    layer = DoRALinear(np.ones((5, 4)), r=2, lora_alpha=4, rng=0)
    with pytest.raises(TypeError, match=said):
        P.adapter_from_layers({"proj": layer}, **fields)
    P.adapter_from_layers({"proj": layer}, base_model_name_or_path="x", revision="main",  # PEFT's own
                          task_type="CAUSAL_LM", init_lora_weights=False, bias="none")


def test_every_field_adapter_from_layers_accepts_is_one_of_peft_s():
    """``_PEFT_LORA_FIELDS`` (PEFT 0.21.2's LoraConfig when written) names no field the installed
    PEFT lacks: nothing written into adapter_config.json is one PEFT would warn about."""
    import dataclasses

    peft = pytest.importorskip("peft")
    assert set(adapter_module._PEFT_LORA_FIELDS) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}


def test_a_folder_named_near_the_length_limit(tmp_path):
    """A 250-character folder name: the temporary sibling named after it in full passed the
    filesystem's 255-byte limit (ENAMETOOLONG); it is cut and hashed as the merge command's."""
    out = tmp_path / ("a" * 250)
    P.save_adapter(out, _adapter(8))
    assert P.load_adapter(out).modules["proj"].scaling == 4.0
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
