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

__version__ = "0.1.0"

# The rest is imported on first use (PEP 562), so that a command imports only what it
# needs: ``dora-ref merge`` needs no layer, no conformance checker and no demo, whose
# imports took a third of its start (``python -X importtime -m dora_ref merge --help``).
# ``dora_ref.layers``' names (``dora_ref.DoRALinear``, ...) and ``__all__`` come with it.
_SUBMODULES = {
    "layers": "dora_ref.layers",
    "formats": "dora_ref.formats",
    "porting": "dora_ref.porting",
    "demo": "dora_ref.demo",
    "peft": "dora_ref.formats.peft",
    "gradcheck": "dora_ref.porting.gradcheck",
    "testing": "dora_ref.porting.testing",
    "tolerance": "dora_ref.porting.tolerance",
    "analysis": "dora_ref.demo.analysis",
}
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


def __getattr__(name):
    """A submodule, a layer (``dora_ref.layers.__all__``) or ``__all__``, imported on first use."""
    if name in _SUBMODULES:
        value = _importlib.import_module(_SUBMODULES[name])
    elif name == "__all__":
        value = _importlib.import_module("dora_ref.layers").__all__ + _CORE_ALL
    elif not name.startswith("__") and name in _importlib.import_module("dora_ref.layers").__all__:
        value = getattr(_importlib.import_module("dora_ref.layers"), name)
    else:
        return _aliases._package_getattr(name)  # an old flat-layout name, or AttributeError
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(__getattr__("__all__")))
