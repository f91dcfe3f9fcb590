"""dora_ref: a from-scratch, autograd-free reference implementation of DoRA.

DoRA (Weight-Decomposed Low-Rank Adaptation; Liu et al., ICML 2024,
arXiv:2402.09353) in NumPy, with C kernels for the hot paths.

Layout, said once: weights are PyTorch ``(out, in)``; the paper's column norm
``||.||_c`` is the L2 norm of each *row*, one value per output channel.
"""
from ._backend import available_backends, backend, set_backend, use_backend
from .functional import (
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
from .layers import DoRALinear, LoRALinear, lora_scaling
from .conv import DoRAConv1d, DoRAConv2d, DoRAConv3d, LoRAConv1d, LoRAConv2d, LoRAConv3d
from .embedding import DoRAEmbedding

# the submodules a user reaches as dora_ref.<name> (all import only NumPy)
from . import analysis, dense, gradcheck, peft, testing, tolerance  # noqa: E402
from .optim import SGD, AdamW

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "DoRAConv1d",
    "DoRAConv2d",
    "DoRAConv3d",
    "DoRAEmbedding",
    "DoRALinear",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRALinear",
    "SGD",
    "lora_scaling",
    "DoRAGrads",
    "LoRAGrads",
    "NonFiniteWeightError",
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
