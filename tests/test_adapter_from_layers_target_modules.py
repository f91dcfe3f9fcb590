"""``adapter_from_layers`` writes ``target_modules`` that PEFT matches to exactly its layers.

Found by session 18's adversary: the config listed the module paths, and PEFT
matches a listed name as a suffix too (``key == t or key.endswith("." + t)``),
so an adapter saved from a layer at ``q`` made ``PeftModel.from_pretrained``
wrap ``attn.q`` as well, with a fresh adapter the file does not hold: with
``init_lora_weights=False`` or a bfloat16 base that changed ``attn.q``'s
outputs (302 of 1,024) and PEFT's merged weight, which dora_ref's merge
leaves alone. ``target_modules`` is now a regular expression, which PEFT
full-matches against every module path.
"""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from dora_ref import DoRALinear
from dora_ref import peft as P


def _layer(rng, out_f=6, in_f=5):
    W = rng.standard_normal((out_f, in_f)).astype(np.float32)
    return DoRALinear(W, r=2, lora_alpha=4, rng=rng, init_lora_weights=False)


def test_target_modules_full_match_the_layer_paths_only():
    rng = np.random.default_rng(0)
    names = ["q", "model.layers.0.self_attn.q_proj", "a+b(c)"]
    pattern = P.adapter_from_layers({n: _layer(rng) for n in names}).config.target_modules
    assert isinstance(pattern, str)
    for n in names:
        assert re.fullmatch(pattern, n), n
    for other in ["attn.q", "qq", "q.x", "model.layers.0.self_attn.q_proj.base", "layers.0.self_attn.q_proj",
                  "a+b(c)d", "aab(c)"]:
        assert not re.fullmatch(pattern, other), other


def test_peft_loads_an_adapter_from_layers_into_exactly_its_modules(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(5, 6)
            self.attn = torch.nn.Module()
            self.attn.q = torch.nn.Linear(5, 6)

    torch.manual_seed(0)
    base = M().double()
    layer = DoRALinear(base.q.weight.detach().numpy().copy(), base.q.bias.detach().numpy().copy(), r=2,
                       lora_alpha=4, rng=0, init_lora_weights=False)
    P.save_adapter(tmp_path / "ad", P.adapter_from_layers({"q": layer}))
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    inner = model.base_model.model
    assert hasattr(inner.q, "lora_A") and not hasattr(inner.attn.q, "lora_A")
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(inner.attn.q(x), base.attn.q(x))  # untouched, as in dora_ref's merge
        y = inner.q(x).numpy()
    layer.eval()
    want = layer(x.numpy())
    # one DoRA forward in float64 against PEFT's: a few ulps of the output's scale
    assert np.max(np.abs(y - want)) <= 64 * np.finfo(np.float64).eps * np.max(np.abs(want))
