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
from ._aliases import install as _install_aliases
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
from .layers import *  # noqa: F403 (the layers and optimisers, dora_ref.layers.__all__)

# the old flat module names (dora_ref.functional, dora_ref.peft, ...) keep importing
_install_aliases()

# the submodules a user reaches as dora_ref.<name> (all import only NumPy)
from . import core, formats, kernels, layers, porting  # noqa: E402
from .core import dense, functional, precision  # noqa: E402
from .formats import peft  # noqa: E402
from .porting import gradcheck, testing, tolerance  # noqa: E402
from .demo import analysis  # noqa: E402

__version__ = "0.1.0"

__all__ = layers.__all__ + [
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
