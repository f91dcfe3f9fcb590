"""PEFT's DoRA layers, checked as ports: how to wrap a real implementation as it is written.

Run it (torch==2.13.0, peft 0.21, transformers; CPU)::

    python examples/peft_port.py [examples per check, default 200]

PEFT takes ``lora_alpha`` and ``r`` (not a scaling), keeps the weight norm
of a merge privately, stores GPT-2's ``Conv1D`` weight as (in, out) and
calls ``self.lora_dropout[...](x)``: each of these is a convention of
``dora_ref.porting.testing`` (``scaling="lora_alpha"``, ``fan_in_fan_out=True``,
``dropout_as="callable"``), so the wrappers below only move arrays in and out
of a freshly built PEFT layer; the numbers are all PEFT's.

The wrappers are the checked object of ``tests/test_testing_peft.py``
(PEFT must pass every check, float32 and float64: a checker that fails
PEFT would not be trusted).
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import torch


def peft_layer(W0, bias, A, B, magnitude, scaling, *, fan_in_fan_out=False):
    """A PEFT ``lora.Linear`` with DoRA around nn.Linear (or Conv1D), holding the given arrays.

    ``scaling`` is ``(lora_alpha, r, use_rslora)``: PEFT computes s itself.
    W0 is (out, in), or (in, out) with ``fan_in_fan_out`` (Conv1D's layout).
    """
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    lora_alpha, r, use_rslora = scaling
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731 - a copy PEFT may own
    dtype = t(W0).dtype
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(W0.shape[1], W0.shape[0])  # weight (in, out); always has a bias
    else:
        base = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=bias is not None)
    base = base.to(dtype)
    with torch.no_grad():
        base.weight.copy_(t(W0))
        if bias is not None:
            base.bias.copy_(t(bias))
        elif fan_in_fan_out:
            base.bias.zero_()
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, use_dora=True, init_lora_weights=False,
                     fan_in_fan_out=fan_in_fan_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D's fan_in_fan_out notice
        layer = LoraLinear(base, "default", cfg, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, use_dora=True,
                           init_lora_weights=False, fan_in_fan_out=fan_in_fan_out)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t(A))
        layer.lora_B["default"].weight.copy_(t(B))
        layer.lora_magnitude_vector["default"].weight.copy_(t(magnitude))
    return layer


class _Callable(torch.nn.Module):
    """Stands in for PEFT's ``lora_dropout`` module: calls the checker's dropout function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _run(layer, x, dropout):
    if dropout is None:
        layer.eval()
    else:
        layer.lora_dropout["default"] = _Callable(dropout)
        layer.train()
    return layer(x)


def make_ports(fan_in_fan_out=False):
    """forward, backward, merge, unmerge of PEFT's DoRA Linear (or Conv1D), NumPy in and out."""

    def forward(x, W0, A, B, magnitude, scaling, bias, dropout=None):
        layer = peft_layer(W0, bias, A, B, magnitude, scaling, fan_in_fan_out=fan_in_fan_out)
        with torch.no_grad():
            return _run(layer, torch.from_numpy(x), dropout).numpy()

    def backward(dy, x, W0, A, B, magnitude, scaling, bias, dropout=None):
        layer = peft_layer(W0, bias, A, B, magnitude, scaling, fan_in_fan_out=fan_in_fan_out)
        xt = torch.from_numpy(np.array(x)).requires_grad_()
        _run(layer, xt, dropout).backward(torch.from_numpy(dy))  # L = sum(dy * y)
        grad = lambda p: p.weight.grad.numpy()  # noqa: E731
        return (xt.grad.numpy(), grad(layer.lora_A["default"]), grad(layer.lora_B["default"]),
                grad(layer.lora_magnitude_vector["default"]))

    def merge(W0, A, B, magnitude, scaling):
        layer = peft_layer(W0, None, A, B, magnitude, scaling, fan_in_fan_out=fan_in_fan_out)
        layer.eval()
        with torch.no_grad():
            layer.merge(safe_merge=True)
        return layer.base_layer.weight.detach().numpy()

    def unmerge(W_merged, A, B, magnitude, scaling, weight_norm):
        """PEFT keeps n from merge time in its cache; put it there, mark the layer merged, unmerge."""
        layer = peft_layer(W_merged, None, A, B, magnitude, scaling, fan_in_fan_out=fan_in_fan_out)
        layer.eval()
        layer.lora_magnitude_vector["default"]._cache_clear()
        layer._cache_store("default-weight_norm", torch.from_numpy(np.array(weight_norm)))
        layer.merged_adapters.append("default")
        with torch.no_grad():
            layer.unmerge()
        return layer.base_layer.weight.detach().numpy()

    return forward, backward, merge, unmerge


def make_init(fan_in_fan_out=False):
    """PEFT's magnitude initialisation from given W0, A, B: ``DoraLinearLayer.update_layer``."""

    def init(W0, A, B, scaling):
        layer = peft_layer(W0, None, A, B, np.zeros(W0.shape[1] if fan_in_fan_out else W0.shape[0], W0.dtype),
                           scaling, fan_in_fan_out=fan_in_fan_out)
        dora = layer.lora_magnitude_vector["default"]
        with torch.no_grad():
            dora.update_layer(base_layer=layer.get_base_layer(), lora_A=layer.lora_A["default"].weight,
                              lora_B=layer.lora_B["default"].weight, scaling=layer.scaling["default"])
        return dora.weight.detach().numpy()

    return init


#: the conventions PEFT's layers are written in
CONVENTIONS = {
    "Linear": dict(scaling="lora_alpha", dropout_as="callable"),
    "Conv1D": dict(scaling="lora_alpha", dropout_as="callable", fan_in_fan_out=True),
}


def check_all(max_examples=200, dtypes=("float64", "float32")):
    """Every check on PEFT's Linear and Conv1D; yields (kind, dtype, CheckResult)."""
    from dora_ref.porting import testing

    for kind, conv in CONVENTIONS.items():
        forward, backward, merge, unmerge = make_ports(kind == "Conv1D")
        for dtype in dtypes:
            kw = dict(dtype=dtype, max_examples=max_examples, **conv)
            yield kind, dtype, testing.check_forward(forward, **kw)
            yield kind, dtype, testing.check_forward(forward, dropout=True, **kw)
            yield kind, dtype, testing.check_backward(backward, **kw)
            yield kind, dtype, testing.check_backward(backward, dropout=True, **kw)
            yield kind, dtype, testing.check_merge(merge, unmerge, **kw)
            yield kind, dtype, testing.check_init(make_init(kind == "Conv1D"), forward, **kw)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 200
    torch.set_num_threads(1)
    for kind, dtype, r in check_all(n):
        print(f"PEFT {kind:<6}  {dtype}  check_{r.check:<8}  {r.examples} cases  "
              f"worst error / tolerance {r.worst_ratio:.3f} ({r.worst_output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
