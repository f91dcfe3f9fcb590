"""The package layout: every name of the flat 0.1 layout still imports.

``tests/data/flat_layout_public_names.json`` lists, for each module of the
flat layout, the public names defined in it (recorded before the move). Each
must still be reachable as ``dora_ref.<old module>.<name>`` and be the very
object that its new home holds, so that old imports, ``isinstance`` checks
and pickles keep working.
"""
import importlib
import json
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

import dora_ref
from dora_ref import _aliases

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAT = json.loads((ROOT / "tests" / "data" / "flat_layout_public_names.json").read_text())
NEW_HOMES = [name for homes in _aliases.FLAT_LAYOUT.values() for name in homes]


@pytest.mark.parametrize("old", sorted(FLAT))
def test_every_flat_layout_name_still_imports(old):
    module = importlib.import_module(f"dora_ref.{old}")
    missing = [name for name in FLAT[old] if not hasattr(module, name)]
    assert not missing, f"dora_ref.{old} lost {missing}"


@pytest.mark.parametrize("old", sorted(_aliases.FLAT_LAYOUT))
def test_old_name_gives_the_objects_of_the_new_home(old):
    module = importlib.import_module(f"dora_ref.{old}")
    homes = [importlib.import_module(f"dora_ref.{new}") for new in _aliases.FLAT_LAYOUT[old]]
    for name in FLAT[old]:
        owners = [h for h in homes if name in vars(h)]
        assert owners, f"{name} of dora_ref.{old} has no new home among {homes}"
        assert getattr(module, name) is getattr(owners[0], name)
    if len(homes) == 1:
        assert module is homes[0]
        assert module.__spec__.name == homes[0].__name__  # the alias did not clobber the spec


def test_old_module_name_forms(tmp_path):
    # the three ways code wrote an import in 0.1, in a fresh interpreter
    code = (
        "import dora_ref.functional as F\n"
        "from dora_ref import _kernels_c, tolerance\n"
        "from dora_ref.peft import load_adapter\n"
        "from dora_ref.conv import DoRAConv2d, conv_dora_forward\n"
        "import dora_ref.layers\n"
        "assert F.dora_forward is __import__('dora_ref').dora_forward\n"
        "assert dora_ref.layers.DoRALinear is __import__('dora_ref').DoRALinear\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr



@pytest.mark.parametrize(
    "obj, new, old",
    [
        (dora_ref.DoRALinear, b"dora_ref.layers.linear", b"dora_ref.layers"),
        (dora_ref.dora_forward, b"dora_ref.core.functional", b"dora_ref.functional"),
        (dora_ref.DoRAConv2d, b"dora_ref.layers.conv", b"dora_ref.conv"),
    ],
)
def test_pickle_that_names_an_old_module_loads(obj, new, old):
    # protocol 0 names a global as "c<module>\n<name>\n": write the 0.1 module name
    blob = pickle.dumps(obj, protocol=0)
    assert new + b"\n" in blob
    assert pickle.loads(blob.replace(new + b"\n", old + b"\n")) is obj


def test_every_new_home_exists_and_is_a_file_in_a_concern_folder():
    folders = {"core", "kernels", "layers", "formats", "porting", "demo"}
    for new in NEW_HOMES:
        package, _, leaf = new.partition(".")
        assert package in folders, new
        path = ROOT / "dora_ref" / package / leaf.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), new


def test_no_module_left_at_the_top_but_the_entry_points():
    top = sorted(p.name for p in (ROOT / "dora_ref").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "_aliases.py", "cli.py"]


def test_split_view_is_read_only():
    conv = importlib.import_module("dora_ref.conv")
    if not isinstance(conv, _aliases._SplitModule):
        pytest.skip("dora_ref.conv is a single module")
    with pytest.raises(AttributeError, match="set 'conv_nd' on the module that holds it"):
        conv.conv_nd = None


def test_folders_import_only_the_folders_below_them():
    """README's sketch: demo > porting > formats > layers > core > kernels, one exception.

    ``kernels/c.py`` is the C twin of ``core/kernels_numpy.py`` and reuses it
    (row blocks, the fallback above the fused kernels' rank): the only import
    that points up the sketch.
    """
    import ast

    order = ["demo", "porting", "formats", "layers", "core", "kernels"]
    allowed_up = {("kernels/c.py", "core")}
    found_up = set()
    for path in (ROOT / "dora_ref").rglob("*.py"):
        parts = path.relative_to(ROOT / "dora_ref").parts
        if len(parts) < 2:
            continue
        folder, package = parts[0], list(parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            target = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            names = [target[0]] if target else [a.name for a in node.names]
            for other in names:
                if other in order and other != folder and order.index(other) < order.index(folder):
                    found_up.add(("/".join(parts), other))
    assert found_up == allowed_up
