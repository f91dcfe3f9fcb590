"""dora_ref: a from-scratch, autograd-free reference implementation of DoRA.

DoRA (Weight-Decomposed Low-Rank Adaptation; Liu et al., ICML 2024,
arXiv:2402.09353) in NumPy, with C kernels for the hot paths.

The package, bottom to top (the README has the sketch): ``core`` (the DoRA
math in NumPy: read it first), ``kernels`` (the backend switch and the C
kernels), ``layers`` (stateful layers and optimisers), ``formats`` (safetensors,
PEFT's files, the merge command), ``porting`` (the conformance checker, golden
vectors, tolerances), ``demo``.

Layout of the arrays, said once: weights are PyTorch ``(out, in)``; the paper's column norm
``||.||_c`` is the L2 norm of each *row*, one value per output channel.
"""
import importlib as _importlib

from . import _aliases
from .core.backend import available_backends, backend, set_backend, use_backend
from .core.functional import (
    DoRAGrads,
    LoRAGrads,
    NonFiniteWeightError,
    column_norm,
    dora_backward,
    dora_forward,
    init_magnitude,
    lora_backward,
    lora_forward,
    merge,
    unmerge,
)
from .core.precision import LOW_PRECISION_DTYPES, POLICIES

# the old flat module names (dora_ref.functional, dora_ref.peft, ...) keep importing
_aliases.install()

from . import core, kernels  # noqa: E402
from .core import dense, functional, precision  # noqa: E402

# imported before by the layers, so ``dora_ref.core.conv`` ... keep working (not bound here:
# ``dora_ref.conv`` and ``dora_ref.embedding`` are old flat-layout names, see _aliases)
for _name in ("im2col", "conv", "embedding"):
    _importlib.import_module(f"dora_ref.core.{_name}")
del _name

__version__ = "0.1.0"

# The rest is imported on first use (PEP 562), so that a command imports only what it
# needs: ``dora-ref merge`` needs no layer, no conformance checker and no demo, whose
# imports took a third of its start (``python -X importtime -m dora_ref merge --help``).
# The first access to any of it (``dora_ref.DoRALinear``, ``dora_ref.porting.testing``,
# ``__all__``, ``from dora_ref import *``) imports all that ``import dora_ref`` imported before.
_CORE_ALL = [
    "DoRAGrads",
    "LOW_PRECISION_DTYPES",
    "LoRAGrads",
    "NonFiniteWeightError",
    "POLICIES",
    "available_backends",
    "backend",
    "column_norm",
    "dora_backward",
    "dora_forward",
    "init_magnitude",
    "lora_backward",
    "lora_forward",
    "merge",
    "set_backend",
    "unmerge",
    "use_backend",
]


_REST = {  # what ``import dora_ref`` bound before it was lazy: name -> module
    "demo": "dora_ref.demo",
    "formats": "dora_ref.formats",
    "layers": "dora_ref.layers",
    "porting": "dora_ref.porting",
    "analysis": "dora_ref.demo.analysis",
    "peft": "dora_ref.formats.peft",
    "gradcheck": "dora_ref.porting.gradcheck",
    "testing": "dora_ref.porting.testing",
    "tolerance": "dora_ref.porting.tolerance",
}


def _import_the_rest():
    """Import and bind the lazy part: ``_REST``, the layers' names, ``__all__``."""
    found = {name: _importlib.import_module(module) for name, module in _REST.items()}
    layers = found["layers"]
    found.update((name, getattr(layers, name)) for name in layers.__all__)
    found["__all__"] = layers.__all__ + _CORE_ALL
    globals().update(found)


def __getattr__(name):
    """A name of the lazily imported part (see above), or an old flat-layout module name."""
    if name == "__all__" or not name.startswith("__"):
        _import_the_rest()
        if name in globals():
            return globals()[name]
    return _aliases._package_getattr(name)  # an old flat-layout name, or AttributeError


def __dir__():
    _import_the_rest()
    return sorted(globals())
