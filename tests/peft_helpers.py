"""Shared helpers for the PEFT I/O and parity tests (NumPy only)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from dora_ref.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX


def random_module(rng, out_f, in_f, r, dtype=np.float64, dora=True):
    """Random A (r, in), B (out, r) (nonzero) and a magnitude (out,) near 1."""
    A = rng.standard_normal((r, in_f)).astype(dtype) / np.sqrt(in_f)
    B = rng.standard_normal((out_f, r)).astype(dtype) / np.sqrt(r)
    m = (1.0 + 0.2 * rng.standard_normal(out_f)).astype(dtype) if dora else None
    return A, B, m


def write_adapter(directory, modules, config=None, *, prefix=PEFT_PREFIX, magnitude_suffix="", extra=None):
    """Write a PEFT-format adapter by hand (independent of ``dora_ref.formats.peft.save_adapter``).

    ``modules``: name -> (A, B, m or None). ``config``: fields overriding
    PEFT defaults (``use_dora`` defaults to whether any module has a magnitude).
    ``extra``: more tensors by key (without the prefix), e.g. ``modules_to_save`` copies.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B, m) in modules.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = np.ascontiguousarray(A)
        tensors[f"{prefix}{name}.lora_B.weight"] = np.ascontiguousarray(B)
        if m is not None:
            tensors[f"{prefix}{name}.lora_magnitude_vector{magnitude_suffix}"] = np.ascontiguousarray(m)
    tensors.update({prefix + k: v for k, v in (extra or {}).items()})
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    cfg = {
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": False,
        "use_dora": any(m is not None for _, _, m in modules.values()),
        "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
        "target_modules": sorted({n.split(".")[-1] for n in modules}),
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
    }  # fmt: skip
    cfg.update(config or {})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    return directory


def dense_merge(W0, A, B, m, s):
    """W' = diag(m / ||W0 + s B A||_row)(W0 + s B A), formed in full, float64."""
    V = W0.astype(np.float64) + s * B.astype(np.float64) @ A.astype(np.float64)
    return (m.astype(np.float64) / np.linalg.norm(V, axis=1))[:, None] * V


def to_torch(a):
    """A NumPy array as a torch tensor of the same dtype; bfloat16 through its 16 bits (torch has no NumPy bfloat16)."""
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def to_numpy(t):
    """A torch tensor as a NumPy array of the same dtype (bfloat16 as ``ml_dtypes.bfloat16``)."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
