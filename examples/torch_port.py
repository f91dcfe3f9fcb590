"""A pure-PyTorch port of DoRA, checked against dora_ref: the worked example.

Run it (torch==2.13.0, CPU)::

    python examples/torch_port.py [cases per check, default 100]

The port is the first half of this file, about 40 lines: forward (with
PEFT's dropout formula), backward by autograd (the norm detached, as PEFT
does, or not), merge and unmerge. The second half wraps it to take and
return NumPy arrays and hands it to ``dora_ref.porting.testing``, which draws cases
with hypothesis, compares with dora_ref and, on a mismatch, names the
output, the index, the tolerance and the likely mistake. Last, it checks
the port against the golden vectors (``python -m dora_ref vectors``), the
route for a port that cannot call Python.

Layout, said once: weights are (out, in), as ``nn.Linear.weight``; the
paper's column norm ||.||_c is the norm of each ROW, ``dim=1``, one value
per output channel.
"""
from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch

# ---------------------------------------------------------------------------
# the port
# ---------------------------------------------------------------------------


def weight_norm(W0, A, B, scaling):
    """n = ||W0 + s B A|| per row (out,): one value per output channel (dim=1)."""
    return torch.linalg.norm(W0 + scaling * (B @ A), dim=1)


def dora_forward(x, W0, A, B, magnitude, scaling, bias=None, dropout_mask=None, detach_norm=True):
    """y (N, out) from x (N, in); PEFT DoraLinearLayer.forward semantics."""
    n = weight_norm(W0, A, B, scaling)
    if detach_norm:  # paper Sec. 4.3, PEFT: the norm is a constant in backprop
        n = n.detach()
    g = magnitude / n
    if dropout_mask is None:  # eval, or lora_dropout = 0
        y = g * (x @ W0.T + scaling * (x @ A.T) @ B.T)
    else:  # PEFT's training formula: the base sees the clean x
        xd = x * dropout_mask
        y = x @ W0.T + (g - 1) * (xd @ W0.T) + g * (scaling * (xd @ A.T) @ B.T)
    if bias is not None:  # never scaled by g
        y = y + bias
    return y


def dora_merge(W0, A, B, magnitude, scaling):
    """W' = diag(m / n) (W0 + s B A), and n, which unmerge needs."""
    V = W0 + scaling * (B @ A)
    n = torch.linalg.norm(V, dim=1)
    return (magnitude / n)[:, None] * V, n


def dora_unmerge(W_merged, A, B, magnitude, scaling, n):
    """W0 = W' / (m / n) - s B A, with n kept from merge time."""
    return W_merged / (magnitude / n)[:, None] - scaling * (B @ A)


# ---------------------------------------------------------------------------
# NumPy in, NumPy out: what dora_ref.porting.testing calls
# ---------------------------------------------------------------------------


def _t(a):
    return None if a is None else torch.from_numpy(np.array(a))


def forward(x, W0, A, B, magnitude, scaling, bias, dropout_mask=None):
    with torch.no_grad():
        y = dora_forward(_t(x), _t(W0), _t(A), _t(B), _t(magnitude), scaling, _t(bias), _t(dropout_mask))
    return y.numpy()


def make_backward(detach_norm=True):
    """backward(dy, x, W0, A, B, magnitude, scaling, bias) -> (dx, dA, dB, dmagnitude), by autograd."""

    def backward(dy, x, W0, A, B, magnitude, scaling, bias, dropout_mask=None):
        x, A, B, m = (_t(a).requires_grad_() for a in (x, A, B, magnitude))
        y = dora_forward(x, _t(W0), A, B, m, scaling, _t(bias), _t(dropout_mask), detach_norm=detach_norm)
        y.backward(_t(dy))  # L = sum(dy * y)
        return x.grad.numpy(), A.grad.numpy(), B.grad.numpy(), m.grad.numpy()

    return backward


def merge(W0, A, B, magnitude, scaling):
    with torch.no_grad():
        return dora_merge(_t(W0), _t(A), _t(B), _t(magnitude), scaling)[0].numpy()


def unmerge(W_merged, A, B, magnitude, scaling, weight_norm):
    with torch.no_grad():
        return dora_unmerge(_t(W_merged), _t(A), _t(B), _t(magnitude), scaling, _t(weight_norm)).numpy()


def check_golden(directory):
    """Run the port on every linear golden case; return the worst error / atol."""
    from dora_ref.porting import vectors

    worst = 0.0
    for entry in vectors.load_manifest(directory)["cases"]:
        if entry["kind"] != "linear":
            continue
        _, a = vectors.load_case(directory, entry["name"])
        cfg = entry["config"]
        W0 = a["W0"].T if cfg["fan_in_fan_out"] else a["W0"]  # stored (in, out)
        args = (a["x"], W0, a["A"], a["B"], a["magnitude"], cfg["scaling"], a.get("bias"))
        got = {"y": forward(*args, dropout_mask=a.get("dropout_mask"))}
        for mode, detach in (("detached", True), ("exact", False)):
            grads = make_backward(detach)(a["dy"], *args, dropout_mask=a.get("dropout_mask"))
            got.update({f"{k}_{mode}": v for k, v in zip(("dx", "dA", "dB", "dmagnitude"), grads)})
        W_merged = merge(W0, a["A"], a["B"], a["magnitude"], cfg["scaling"])
        got["W_merged"] = W_merged.T if cfg["fan_in_fan_out"] else W_merged
        W_given = a["W_merged"].T if cfg["fan_in_fan_out"] else a["W_merged"]  # (out, in) for the port
        W0_back = unmerge(W_given, a["A"], a["B"], a["magnitude"], cfg["scaling"], a["weight_norm"])
        got["W0_unmerged"] = W0_back.T if cfg["fan_in_fan_out"] else W0_back
        for name, value in got.items():
            atol = entry["arrays"][name]["tolerance"]["atol"]
            err = float(np.max(np.abs(value.astype(np.float64) - a[name]), initial=0.0))
            if not err <= atol:
                raise AssertionError(f"{entry['name']}: {name} off by {err:.3g} > atol {atol:.3g}")
            worst = max(worst, err / atol if atol else 0.0)
    return worst


def init(W0, A, B, scaling):
    """The magnitude a new adapter starts from: n itself (PEFT DoraLinearLayer.update_layer)."""
    with torch.no_grad():
        return weight_norm(_t(W0), _t(A), _t(B), scaling).numpy()


def main(argv=None):
    from dora_ref.porting import testing
    from dora_ref.porting import vectors

    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 100  # cases per check
    torch.set_num_threads(1)
    for dtype in ("float64", "float32"):
        kw = dict(dtype=dtype, max_examples=n)
        results = [
            ("", testing.check_forward(forward, **kw)),
            ("dropout", testing.check_forward(forward, dropout=True, **kw)),
            ("detached", testing.check_backward(make_backward(True), detach_norm=True, **kw)),
            ("exact", testing.check_backward(make_backward(False), detach_norm=False, **kw)),
            ("detached, dropout", testing.check_backward(make_backward(True), detach_norm=True,
                                                         dropout=True, **kw)),
            ("", testing.check_merge(merge, unmerge, **kw)),
            ("", testing.check_init(init, forward, **kw)),
        ]
        for label, r in results:
            name = f"check_{r.check}" + (f" ({label})" if label else "")
            print(f"{dtype}  {name:<34}  {r.examples} cases  worst error / tolerance "
                  f"{r.worst_ratio:.3f} ({r.worst_output})")
    with tempfile.TemporaryDirectory() as d:
        vectors.write(d)
        print(f"golden linear vectors: worst error / tolerance {check_golden(d):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
