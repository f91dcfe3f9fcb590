"""Layers with state: the adapter's weights, merge/unmerge, training.

Built on the functions of ``dora_ref.core``; each layer keeps its weights,
its forward context for the backward, and the merged state.

* ``base``: what every adapter layer shares (parameters, the merged lock, the
  cached norm in eval mode);
* ``linear``: ``LoRALinear``, ``DoRALinear`` and ``lora_scaling``;
* ``conv``: ``LoRAConv1d/2d/3d``, ``DoRAConv1d/2d/3d``;
* ``embedding``: ``DoRAEmbedding``;
* ``optim``: ``SGD`` and ``AdamW`` over a list of layers' parameters.

``dora_ref.layers`` was a module in 0.1; its names are here.
"""
from .linear import DoRALinear, LoRALinear, initial_lora_weights, lora_scaling  # noqa: F401
from .conv import DoRAConv1d, DoRAConv2d, DoRAConv3d, LoRAConv1d, LoRAConv2d, LoRAConv3d
from .embedding import DoRAEmbedding
from .optim import SGD, AdamW

# the other names the 0.1 module ``dora_ref.layers`` held (it imported them from its
# helpers): code that took them from there keeps working; not part of __all__
from .base import (  # noqa: F401
    AdapterLayer, EvalNormCache, adapter_parameter, checked_array, frozen,
    refuse_unrecoverable_merge,
)
from ..core._validate import (  # noqa: F401
    as_float_array, check_adapter, check_finite, check_input, check_result_finite,
    check_rows_finite, check_scaling, check_weight_shape,
)

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
]
