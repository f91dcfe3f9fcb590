"""One deliberately wrong port per behaviour the checker knows, and the rank its diagnosis gets.

Run it::

    python examples/wrong_ports.py            # a table: behaviour, shrunk case, rank, seconds

Each entry is a correct NumPy port (written from the formulas, not from
dora_ref's kernels) with ONE behaviour of a real implementation switched
on, called in that implementation's convention. The checker must catch it
and rank that behaviour first (``tests/test_testing_variants.py`` asserts
it for each entry). This is also the table's evidence in docs/porting.md.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from dora_ref.core import dense

from dora_ref.porting import testing


def rows(W):
    return np.linalg.norm(W, axis=1)


def forward(x, W0, A, B, m, s, b, dropout_mask=None, *, axis=1, s_in_norm=True, of_W0=False, eps=0.0,
            bias_scaled=False, g_one=False, dropout="peft", lora_twice=False):
    """DoRA's forward (PEFT semantics); each keyword switches on one real-world behaviour."""
    W = W0 if of_W0 else W0 + (s if s_in_norm else 1.0) * (B @ A)
    if lora_twice:  # the low-rank term scaled twice (the norm right): y's s -> s * s below
        B = s * B
    g = np.ones(W0.shape[0]) if g_one else m / (np.linalg.norm(W, axis=axis) + eps)
    bias = 0.0 if b is None else b
    if dropout_mask is None or dropout == "ignored":
        y = g * (x @ W0.T + s * ((x @ A.T) @ B.T))
    elif dropout == "naive":
        xd = x * dropout_mask
        y = g * (xd @ W0.T + s * ((xd @ A.T) @ B.T))
    elif dropout == "clean_base":  # torchtune
        y = g * (x @ W0.T) + g * (s * ((x * dropout_mask) @ A.T) @ B.T)
    else:
        xd = x * dropout_mask
        y = x @ W0.T + (g - 1) * (xd @ W0.T) + g * (s * ((xd @ A.T) @ B.T))
    return y + (g * bias if bias_scaled else bias)


def backward(exact=False, *, dm_times_n=False, lora_grads=False, bias_scaled=False):
    """The paper's gradients (dora_ref.core.dense, the dense route), with one change."""

    def fn(dy, x, W0, A, B, m, s, b):
        g = dense.backward(dy, x, W0, A, B, m, s, detach_norm=not exact)
        dA, dB, dm = g.dA, g.dB, g.dmagnitude
        n = rows(W0 + s * B @ A)
        if dm_times_n:
            dm = dm * n
        if lora_grads:
            dA, dB = s * (dy @ B).T @ x, s * dy.T @ (x @ A.T)
        if bias_scaled and b is not None:
            dm = dm + dy.sum(0) * b / n
        return g.dx, dA, dB, dm

    return fn


def merge(W0, A, B, m, s, *, factor="rows"):
    V = W0 + s * (B @ A)
    g = m / rows(V)
    if factor == "rows":
        return g[:, None] * V
    if factor == "none":
        return V
    if factor == "m_only":
        return m[:, None] * V
    return g[None, :] * V  # "columns": broadcasts only when in = out


def unmerge(W, A, B, m, s, n, *, factor="rows"):
    g = m / n
    if factor == "rows":
        return W / g[:, None] - s * (B @ A)
    if factor == "none":
        return W - s * (B @ A)
    return W / g[None, :] - s * (B @ A)  # "columns"


def _fifo_norm_untransposed(x, W0s, A, B, m, s, b):  # PEFT 0.10 Conv1D
    y = (m / rows(W0s + s * (B @ A))) * (x @ W0s + s * ((x @ A.T) @ B.T))
    return y + (0.0 if b is None else b)


def _per_input_column(x, W0, A, B, m, s, b):  # LyCORIS wd_on_out=False
    V = W0 + s * (B @ A)
    return (x * (m / np.linalg.norm(V, axis=0))) @ V.T + (0.0 if b is None else b)


def _batched_only(x, W0, A, B, m, s, b):
    batch, seq, _ = x.shape
    return forward(x.reshape(batch * seq, -1), W0, A, B, m, s, b).reshape(batch, seq, -1)


def _other_scaling_rule(x, W0, A, B, m, scaling, b, dropout_mask=None):
    """Given (lora_alpha, r, use_rslora), s by the rule not asked for (alpha / sqrt(r) for alpha / r)."""
    alpha, r, rslora = scaling
    return forward(x, W0, A, B, m, alpha / r if rslora else alpha / np.sqrt(r), b, dropout_mask)


def _fifo_merge(W0s, A, B, m, s):
    return merge(W0s.T, A, B, m, s).T


def _fifo_unmerge_rows_of_stored(Ws, A, B, m, s, n):  # PEFT 0.11-0.20 Conv1D
    return Ws / (m / n)[:, None] - (s * (B @ A)).T


#: behaviour -> (check, port args, keyword arguments of the check)
WRONG_PORTS = {
    "norm_axis": ("forward", (lambda *a, **k: forward(*a, **k, axis=0),), {}),
    "scaling_outside_norm": ("forward", (lambda *a, **k: forward(*a, **k, s_in_norm=False),), {}),
    "scaling_rule": ("forward", (_other_scaling_rule,), dict(scaling="lora_alpha")),
    "scaling_twice": ("forward", (lambda *a, **k: forward(*a, **k, lora_twice=True),), {}),
    "norm_of_W0": ("forward", (lambda *a, **k: forward(*a, **k, of_W0=True),), {}),
    "norm_plus_eps": ("forward", (lambda *a, **k: forward(*a, **k, eps=float(np.finfo(np.float32).eps)),),
                      dict(dtype="float32", max_examples=100)),
    "fan_in_fan_out_norm_untransposed": ("forward", (_fifo_norm_untransposed,), dict(fan_in_fan_out=True)),
    "magnitude_per_input_column": ("forward", (_per_input_column,), {}),
    "bias_scaled": ("forward", (lambda *a, **k: forward(*a, **k, bias_scaled=True),), {}),
    "bias_scaled (backward)": ("backward", (backward(bias_scaled=True),), {}),
    "no_magnitude": ("forward", (lambda *a, **k: forward(*a, **k, g_one=True),), {}),
    "naive_dropout": ("forward", (lambda *a, **k: forward(*a, **k, dropout="naive"),), dict(dropout=True)),
    "dropout_ignored": ("forward", (lambda *a, **k: forward(*a, **k, dropout="ignored"),), dict(dropout=True)),
    "dropout_scales_clean_base": ("forward", (lambda *a, **k: forward(*a, **k, dropout="clean_base"),),
                                  dict(dropout=True)),
    "norm_not_detached": ("backward", (backward(exact=True),), {}),
    "norm_detached": ("backward", (backward(exact=False),), dict(detach_norm=False)),
    "dmagnitude_missing_norm": ("backward", (backward(dm_times_n=True),), {}),
    "grads_without_g": ("backward", (backward(lora_grads=True),), {}),
    "merge_without_magnitude": ("merge", (lambda *a: merge(*a, factor="none"),), {}),
    "merge_without_norm": ("merge", (lambda *a: merge(*a, factor="m_only"),), {}),
    "factor_on_columns": ("merge", (lambda *a: merge(*a, factor="columns"),
                                    lambda *a: unmerge(*a, factor="columns")), {}),
    "unmerge_factor_on_columns": ("merge", (_fifo_merge, _fifo_unmerge_rows_of_stored), dict(fan_in_fan_out=True)),
    "unmerge_without_magnitude": ("merge", (merge, lambda *a: unmerge(*a, factor="none")), {}),
    "expects_batched_x": ("forward", (_batched_only,), {}),
    "magnitude_shape_out_1": ("forward", (lambda x, W0, A, B, m, s, b: forward(x, W0, A, B, m[:, 0], s, b),), {}),
    "weight_layout_transposed": ("forward", (lambda x, W0s, A, B, m, s, b: forward(x, W0s.T, A, B, m, s, b),), {}),
}


def diagnose(name, max_examples=30):
    """Run the wrong port ``name``; return (ConformanceError, rank of its behaviour or None, seconds)."""
    check, fns, kw = WRONG_PORTS[name]
    key = name.split(" ")[0]
    kw = {"max_examples": max_examples, **kw}
    call = {"forward": testing.check_forward, "backward": testing.check_backward,
            "merge": testing.check_merge}[check]
    t = time.perf_counter()
    try:
        call(*fns, **kw) if check != "merge" or len(fns) == 1 else call(fns[0], fns[1], **kw)
    except testing.ConformanceError as err:
        ranks = [d.rank for d in err.diagnoses if key in d.key.split(" + ")]
        return err, (ranks[0] if ranks else None), time.perf_counter() - t
    raise AssertionError(f"the wrong port {name!r} passed")


def main(argv=None):
    print(f"{'behaviour':<36} {'rank':>4} {'of':>3} {'s':>6}  shrunk case (then the output that differs)")
    for name in WRONG_PORTS:
        err, rank, sec = diagnose(name)
        N, i, o, r = err.case.shapes()
        where = err.output or "raised"
        print(f"{name:<36} {rank!s:>4} {len(err.diagnoses):>3} {sec:6.2f}  N={N} in={i} out={o} r={r} "
              f"{err.case.dtype} {'bias' if err.case.bias is not None else 'no bias'} ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
