"""Read, write and merge Hugging Face PEFT (Do)LoRA adapters, without PyTorch.

An adapter directory as ``PeftModel.save_pretrained`` writes it holds
``adapter_config.json`` and ``adapter_model.safetensors``. For a linear
module at path ``<name>`` of the base model (e.g.
``model.layers.0.self_attn.q_proj``), PEFT 0.12+ saves (docs/peft_dora.md, Sec. 4)::

    base_model.model.<name>.lora_A.weight            (r, in)
    base_model.model.<name>.lora_B.weight            (out, r)
    base_model.model.<name>.lora_magnitude_vector    (out,)    DoRA only

Embeddings (``lora_embedding_A`` (r, V), ``lora_embedding_B`` (D, r),
magnitude (D,)) and convolutions (``lora_A.weight`` (r, in, *k),
``lora_B.weight`` (out, r, 1, ...), magnitude (1, out, 1, ...)) are read,
written and merged too: each is DoRA on a linear view of its weight, E.T
(D, V) for an embedding and the kernel flattened to (out, in * prod(k)) for
a convolution (docs/peft_dora.md, Sec. 1 "Embeddings", "Convolutions", and Sec. 3), the views
``dora_ref.core.embedding`` and ``dora_ref.core.conv`` use.

The magnitude has one value per output channel: the paper's column norm is
the row norm of an (out, in) weight. A, B and the magnitude are in this
(out, in) orientation even for GPT-2's ``Conv1D``, whose *base* weight is
stored (in, out) (``fan_in_fan_out``): the base weight is transposed for the
math and the merged weight is stored back in the base's own layout. Which
weights are stored (in, out) is not in a checkpoint (PEFT decides it by the
module's type): a shape tells for a non-square weight; for a square one
``resolve_fan_in_fan_out`` states the rule, and raises rather than guess
(pass ``fan_in_fan_out=`` / ``--fan-in-fan-out`` to settle it).

Base weights come from safetensors files (one file, or shards listed in
``model.safetensors.index.json``). bfloat16 and float16 bases are read with
``ml_dtypes`` and computed in float32; float64 bases compute in float64.
Merged weights are cast back to the base dtype. Nothing here unpickles:
``.bin`` checkpoints are refused with a note on how to convert them.

Tensors of the config's ``modules_to_save`` (modules trained in full, saved
as ``base_model.model.<module>.weight``) are kept in ``PeftAdapter.replaced``
and replace the base's when merging.

Several DoRA adapters on one layer are chained as PEFT 0.21 chains them
(docs/peft_dora.md, Sec. 1 "Several DoRA adapters", Sec. 3): each adapter's norm is taken from the *bare*
base weight, and each DoRA adapter rescales everything accumulated before it::

    forward (eval):  y <- x @ W0.T;  per adapter i:  y <- g_i * (y + s_i (x A_i.T) B_i.T)
                     (plain LoRA: y <- y + s_i (x A_i.T) B_i.T);  finally y += b0
    merge:           W <- W0;        per adapter i:  W <- diag(g_i) (W + s_i B_i A_i)
    with g_i = m_i / ||W0 + s_i B_i A_i||_row.

The parts, one concept a file: ``config`` (``adapter_config.json`` and PEFT's
pattern matching), ``adapter`` (adapter folders read, written, made into
layers), ``orientation`` (a module's base key and the ``fan_in_fan_out``
rule), ``merge`` (several adapters on a layer; adapters merged into base
weights).
"""
from .config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapterConfig,
    MAX_MODULE_PATH,
    MAX_PATTERN_QUANTIFIERS,
    PATTERN_TIME_BUDGET,
    PEFT_PREFIX,
    pattern_key_regex,
    pattern_matches,
    read_config,
)
from .orientation import (
    CONV1D_MODULES,
    base_key,
    is_fan_in_fan_out,
    resolve_fan_in_fan_out,
    weight_key,
)
from .adapter import (
    ModuleAdapter,
    PeftAdapter,
    adapter_from_layers,
    build_layers,
    config_selects,
    load_adapter,
    save_adapter,
    stored_weight,
)
from .merge import (
    cast_replacement,
    chain_forward,
    finite_max,
    merge_state_dict,
    merge_view,
    merge_weight,
    non_finite_error,
    plan_merge,
    plan_replacements,
)
# base weights are read with these (dora_ref.formats.peft offered them in 0.1)
from ..safetensors_io import SHARD_INDEX, SINGLE_FILE, BaseWeights, SafetensorsFile, SafetensorsWriter, load_base_weights

__all__ = [
    "load_base_weights",
    "SafetensorsWriter",
    "SafetensorsFile",
    "BaseWeights",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CONV1D_MODULES",
    "LoraAdapterConfig",
    "MAX_MODULE_PATH",
    "MAX_PATTERN_QUANTIFIERS",
    "ModuleAdapter",
    "PATTERN_TIME_BUDGET",
    "PEFT_PREFIX",
    "PeftAdapter",
    "SHARD_INDEX",
    "SINGLE_FILE",
    "adapter_from_layers",
    "base_key",
    "build_layers",
    "cast_replacement",
    "chain_forward",
    "config_selects",
    "finite_max",
    "is_fan_in_fan_out",
    "load_adapter",
    "merge_state_dict",
    "merge_view",
    "merge_weight",
    "non_finite_error",
    "pattern_key_regex",
    "pattern_matches",
    "plan_merge",
    "plan_replacements",
    "read_config",
    "resolve_fan_in_fan_out",
    "save_adapter",
    "stored_weight",
    "weight_key",
]
