"""The module names of dora_ref's first, flat layout, kept importable.

dora_ref 0.1 was one folder of modules (``dora_ref.functional``,
``dora_ref.peft``, ``dora_ref._kernels_c``, ...). They now live in folders
named after what they do (see the README's architecture sketch). Every old
name still imports, and gives the module that holds its code now, the same
object, so ``import dora_ref.functional as F``, ``from dora_ref.tolerance
import rtol`` and ``dora_ref.peft.load_adapter`` keep working, and so do
pickles that name an old module.

A module that was split in two (``conv`` into the convolution math and its
layers, ...) is reached through a read-only view holding the names of all its
parts: ``dora_ref.conv.conv_dora_forward`` and ``dora_ref.conv.DoRAConv2d``
are the objects that live in ``dora_ref.core.conv`` and
``dora_ref.layers.conv``. Patch a function where it lives, not through a view.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# old name -> the module(s) that hold its code now (several: it was split)
FLAT_LAYOUT = {
    "dense": ("core.dense",),
    "functional": ("core.functional",),
    "_kernels_numpy": ("core.kernels_numpy",),
    "_validate": ("core._validate",),
    "_backend": ("core.backend",),
    "_kernels_c": ("kernels.c",),
    "_layer_base": ("layers.base",),
    "optim": ("layers.optim",),
    "conv": ("core.im2col", "core.conv", "layers.conv"),
    "embedding": ("core.embedding", "layers.embedding"),
    "safetensors_io": ("formats.safetensors_io",),
    "peft": ("formats.peft",),
    "merge_cli": ("formats.merge_cli",),
    "testing": ("porting.testing",),
    "_testing_conventions": ("porting.conventions",),
    "_testing_variants": ("porting.variants",),
    "_testing_diagnosis": ("porting.diagnosis",),
    "_testing_layers": ("porting.layer_checks",),
    "vectors": ("porting.vectors",),
    "tolerance": ("porting.tolerance",),
    "gradcheck": ("porting.gradcheck",),
    "mlp": ("demo.mlp",),
    "analysis": ("demo.analysis",),
}
# ``dora_ref.layers`` and ``dora_ref.demo`` were modules and are now packages
# whose ``__init__`` re-exports the old module's names: no alias needed.


class _SplitModule(types.ModuleType):
    """The names of several modules under the one name they once shared."""

    def __init__(self, name, parts):
        super().__init__(name, f"Old name of {', '.join(p.__name__ for p in parts)} (see dora_ref._aliases).")
        self.__dict__["_parts"] = parts
        names = []
        for part in parts:
            for key, value in vars(part).items():
                if not key.startswith("__") and key not in self.__dict__:
                    self.__dict__[key] = value
                    names.append(key)
        self.__dict__["__all__"] = [n for n in names if not n.startswith("_")]

    def __setattr__(self, key, value):
        if key.startswith("__") and key.endswith("__"):  # the import system's own (__spec__, ...)
            return super().__setattr__(key, value)
        self._refuse("set", key)

    def __delattr__(self, key):
        # a deleted name would be gone from every later ``from dora_ref.<old> import``
        self._refuse("delete", key)

    def _refuse(self, verb, key):
        raise AttributeError(
            f"{self.__name__} is an old name kept for imports; {verb} {key!r} on the module that "
            f"holds it ({', '.join(p.__name__ for p in self._parts)})"
        )


def resolve(old):
    """The module (or split view) that the flat-layout name ``dora_ref.<old>`` means now."""
    parts = [importlib.import_module(f"dora_ref.{new}") for new in FLAT_LAYOUT[old]]
    return parts[0] if len(parts) == 1 else _SplitModule(f"dora_ref.{old}", parts)


class _Finder:
    """Finds ``dora_ref.<old name>`` and loads it as the module that holds it now.

    A meta path finder and loader by protocol (``find_spec``, ``create_module``,
    ``exec_module``), not by ``importlib.abc``'s base classes: importing
    ``importlib.abc`` imports ``importlib.resources`` and with it a few
    hundredths of a second of modules no dora_ref command needs.
    """

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == "dora_ref" and old in FLAT_LAYOUT:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = resolve(spec.name.rpartition(".")[2])
        spec.loader_state = getattr(module, "__spec__", None)
        return module

    def exec_module(self, module):
        # the import machinery set the alias's spec on the real module: give it back
        if not isinstance(module, _SplitModule):
            module.__spec__ = module.__spec__.loader_state


def _package_getattr(name):
    """``dora_ref.<old name>`` as an attribute, without an import statement (PEP 562).

    In 0.1 ``import dora_ref`` imported every module, so ``dora_ref.optim.AdamW``
    and ``dora_ref.conv.DoRAConv2d`` worked after it; the old name is imported
    on first access instead.
    """
    if name in FLAT_LAYOUT:
        return importlib.import_module(f"dora_ref.{name}")
    raise AttributeError(f"module 'dora_ref' has no attribute {name!r}")


def install():
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
    package = sys.modules.get("dora_ref")
    if package is not None and "__getattr__" not in vars(package):
        package.__getattr__ = _package_getattr
