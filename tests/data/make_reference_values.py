"""Regenerate tests/data/reference_values.npz: DoRA values computed without dora_ref.

Run from the repository root (needs torch and peft, the ``parity`` extra)::

    python tests/data/make_reference_values.py

and commit the .npz only if you mean to change the reference (the test
``tests/test_reference_values.py`` never regenerates it).

For each case (sizes chosen to cover 1, the C kernels' full tiles of 8 doubles
and 16 floats, a tile + 1, several tiles, and r above the fused kernels' limit
of 12), in float64:

* PEFT 0.21 (``use_dora=True`` on a ``torch.nn.Linear``, eval, no dropout):
  the output ``y``, the gradients that PEFT's autograd gives with its detached
  norm (``dx``, ``dA``, ``dB``, ``dmagnitude`` for the loss ``sum(dy * y)``),
  the magnitude PEFT initialises from (``W0``, ``A``, ``B``) and the merged
  weight (``merge()``);
* torch autograd on the forward written densely with nothing detached,
  ``y = x @ (m / ||W0 + s B A||_row * (W0 + s B A)).T + b``: the exact
  gradients (``*_exact``).

The inputs are drawn here from a fixed seed and stored with the results, so
the test needs neither torch nor this script. Nothing of dora_ref is imported.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import peft
import torch
from peft import LoraConfig, get_peft_model

OUT = Path(__file__).with_name("reference_values.npz")

# name: (out, in, r, N, scaling, bias, magnitude kind)
CASES = {
    "ones": (1, 1, 1, 1, 2.0, True, "trained"),
    "tile_f64": (8, 8, 2, 4, 0.75, False, "trained"),
    "tile_plus_one": (9, 17, 3, 5, 1.5, True, "far"),
    "tiles_f32": (17, 33, 4, 16, -0.5, True, "signed"),  # negative alpha
    "rank_13_rslora": (33, 16, 13, 9, 16.0 / np.sqrt(13.0), False, "trained"),  # BLAS path
    "b_dominates": (12, 9, 2, 3, 4.0, True, "trained"),  # s B A >> W0
}


class One(torch.nn.Module):
    def __init__(self, in_f, out_f, bias):
        super().__init__()
        self.lin = torch.nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):
        return self.lin(x)


def draw(out_f, in_f, r, N, scaling, kind, seed, b_scale):
    rng = np.random.default_rng(seed)
    W0 = rng.normal(size=(out_f, in_f))
    A = rng.normal(size=(r, in_f)) / np.sqrt(in_f)
    B = rng.normal(size=(out_f, r)) * b_scale
    norm = np.linalg.norm(W0 + scaling * B @ A, axis=1)
    spread = {"trained": rng.uniform(0.5, 2.0, out_f), "far": 10.0 ** rng.uniform(-3, 3, out_f),
              "signed": rng.uniform(0.5, 2.0, out_f) * rng.choice([-1.0, 1.0], out_f)}[kind]
    return dict(W0=W0, A=A, B=B, magnitude=norm * spread, bias=rng.normal(size=out_f),
                x=rng.normal(size=(N, in_f)), dy=rng.normal(size=(N, out_f)))


def peft_values(c, scaling, bias):
    """Forward, PEFT's (detached) gradients and merged weight, and PEFT's init magnitude."""
    out_f, in_f = c["W0"].shape
    r = c["A"].shape[0]
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in c.items()}
    model = One(in_f, out_f, bias).double()
    with torch.no_grad():
        model.lin.weight.copy_(t["W0"])
        if bias:
            model.lin.bias.copy_(t["bias"])
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["lin"], use_dora=True,
                        lora_dropout=0.0, init_lora_weights=True)
    model = get_peft_model(model, config)
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(t["A"])
        lin.lora_B["default"].weight.copy_(t["B"])
    lin.scaling["default"] = float(scaling)
    # PEFT's own magnitude init (update_layer's norm) for these A, B, s
    lin.lora_magnitude_vector["default"].update_layer(
        base_layer=lin.get_base_layer(), lora_A=lin.lora_A["default"].weight,
        lora_B=lin.lora_B["default"].weight, scaling=float(scaling))
    init = lin.lora_magnitude_vector["default"].weight.detach().clone().numpy()
    with torch.no_grad():
        lin.lora_magnitude_vector["default"].weight.copy_(t["magnitude"])
    model.eval()
    x = t["x"].clone().requires_grad_(True)
    y = model(x)
    (y * t["dy"]).sum().backward()
    res = dict(
        y=y.detach().numpy(), dx=x.grad.numpy(),
        dA=lin.lora_A["default"].weight.grad.numpy(), dB=lin.lora_B["default"].weight.grad.numpy(),
        dmagnitude=lin.lora_magnitude_vector["default"].weight.grad.numpy(),
        init_magnitude=init,
    )
    lin.merge(safe_merge=True)
    res["W_merged"] = lin.get_base_layer().weight.detach().clone().numpy()
    return res


def exact_values(c, scaling, bias):
    """Autograd through the dense forward with the norm NOT detached."""
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in ("x", "A", "B", "magnitude"))
         for k, v in c.items()}
    V = t["W0"] + scaling * t["B"] @ t["A"]
    W = (t["magnitude"] / torch.linalg.norm(V, dim=1))[:, None] * V
    y = t["x"] @ W.T + (t["bias"] if bias else 0.0)
    (y * t["dy"]).sum().backward()
    return {f"{k}_exact": t[name].grad.numpy()
            for k, name in (("dx", "x"), ("dA", "A"), ("dB", "B"), ("dmagnitude", "magnitude"))}


def main():
    arrays = {}
    for i, (name, (out_f, in_f, r, N, s, bias, kind)) in enumerate(CASES.items()):
        c = draw(out_f, in_f, r, N, s, kind, seed=1000 + i, b_scale=30.0 if name == "b_dominates" else 1.0)
        res = {**peft_values(c, s, bias), **exact_values(c, s, bias)}
        if not bias:
            c["bias"] = np.zeros(0)  # stored empty: "no bias"
        for k, v in {**c, **res, "scaling": np.array(s)}.items():
            arrays[f"{name}/{k}"] = np.asarray(v, dtype=np.float64)
    arrays["meta/peft_version"] = np.array(peft.__version__)
    arrays["meta/torch_version"] = np.array(torch.__version__)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {', '.join(CASES)} "
          f"(peft {peft.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
