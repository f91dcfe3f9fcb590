"""An interrupt anywhere inside a layer's ``merge()`` or ``unmerge()`` leaves a consistent layer.

Found by session 18's adversary: a ``KeyboardInterrupt`` (Ctrl-C) landing in
``DoRALinear.merge()`` just after the base weight was replaced put the
``merged`` flag back but kept the merged weight: the next forward was
silently wrong (by 2.5 at a scale of 3), and after ``unmerge()`` the base
weight was off by 1.2; landing later, it left the adapter read-only with
the layer unmerged (the optimiser refused it, ``unmerge()`` said "not
merged"). A timer-signal fuzz hit a bad state in 99 of 4,000 interrupted
DoRA calls. Now the state change is all or nothing
(``AdapterLayer._all_or_nothing``).

Here the interrupt is raised by a trace function at every line the call
runs, one run per line (every place a signal handler's exception can
appear, at line granularity), for each layer kind, merge and unmerge. After
each: the layer is merged or not, and in either state its forward is the
uninterrupted one's, ``unmerge()`` gives W0 back, and a training step runs.
"""
from __future__ import annotations

import gc
import sys

import numpy as np
import pytest

from dora_ref import AdamW, DoRAConv2d, DoRAEmbedding, DoRALinear, LoRALinear


def _make(kind):
    rng = np.random.default_rng(0)
    if kind == "dora_linear":
        layer = DoRALinear(rng.normal(size=(8, 6)), r=2, lora_alpha=4, rng=0)
        x = rng.normal(size=(3, 6))
    elif kind == "lora_linear":
        layer = LoRALinear(rng.normal(size=(8, 6)), r=2, lora_alpha=4, rng=0)
        x = rng.normal(size=(3, 6))
    elif kind == "dora_conv2d":
        layer = DoRAConv2d(rng.normal(size=(4, 3, 3, 3)), padding=1, r=2, lora_alpha=4, rng=0)
        x = rng.normal(size=(2, 3, 5, 5))
    else:
        layer = DoRAEmbedding(rng.normal(size=(10, 6)), r=2, lora_alpha=4, rng=0)
        x = np.array([[1, 3, 9], [0, 2, 2]])
    names = list(layer.parameters())
    b_name = "lora_embedding_A" if kind == "dora_embedding" else "lora_B"  # the zero-initialised one
    assert b_name in names
    setattr(layer, b_name, np.random.default_rng(1).normal(size=getattr(layer, b_name).shape))
    layer.eval()
    return layer, x


def _traced(fn, k=None):
    """Call fn() counting the 'line' events of dora_ref's own code; with ``k``, raise a
    KeyboardInterrupt at the k-th (1-based). Returns (events seen, whether it was raised)."""
    seen = 0

    def tracer(frame, event, arg):
        if "dora_ref" not in frame.f_code.co_filename:
            return None

        def local(frame, event, arg):
            nonlocal seen
            if event == "line":
                seen += 1
                if seen == k:
                    sys.settrace(None)
                    raise KeyboardInterrupt
            return local
        return local

    collecting = gc.isenabled()
    gc.disable()  # a collection's callbacks (hypothesis has one) would run traced, and take the interrupt
    sys.settrace(tracer)
    try:
        fn()
    except KeyboardInterrupt:
        if k is None or seen != k:
            raise
        return seen, True
    finally:
        sys.settrace(None)
        if collecting:
            gc.enable()
    return seen, False


@pytest.mark.parametrize("kind", ["dora_linear", "lora_linear", "dora_conv2d", "dora_embedding"])
@pytest.mark.parametrize("call", ["merge", "unmerge"])
def test_a_layer_interrupted_at_any_line_of_merge_or_unmerge_stays_consistent(kind, call):
    ref, x = _make(kind)
    y_ref = ref(x)
    W0 = ref.weight.copy()
    probe, _ = _make(kind)
    if call == "unmerge":
        probe.merge()
    total, _ = _traced(getattr(probe, call))
    assert total > 20  # the call runs the layer's code, traced
    tol = 64 * np.finfo(np.float64).eps * max(1.0, float(np.abs(y_ref).max()))
    for k in range(1, total + 1):
        layer, _ = _make(kind)
        if call == "unmerge":
            layer.merge()
        _traced(getattr(layer, call), k)
        y = layer(x)  # merged or not, the same function
        assert np.abs(y - y_ref).max() <= tol, (k, layer.merged)
        if layer.merged:
            layer.unmerge()
        assert np.abs(layer.weight - W0).max() <= tol, k
        for p in layer.parameters().values():
            assert p.flags.writeable, k  # unmerged: the adapter is trainable
        layer.train()
        y = layer(x)
        layer.backward(np.ones_like(y))
        AdamW(layer.parameters(), lr=1e-3).step(layer.grads)
        layer.eval()
        layer.merge()
        layer.unmerge()


def test_the_rollback_restores_the_flag_weight_and_norm_together():
    """The first reported case, by name: an interrupt right after merge() replaced the weight."""
    layer, x = _make("dora_linear")
    y_ref = layer(x)
    W0 = layer.weight.copy()
    original = DoRALinear._set_base

    def interrupted(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt  # after the new weight is in place

    DoRALinear._set_base = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            layer.merge()
    finally:
        DoRALinear._set_base = original
    assert not layer.merged and np.array_equal(layer.weight, W0)
    assert getattr(layer, "weight_norm", None) is None
    assert np.abs(layer(x) - y_ref).max() <= 64 * np.finfo(np.float64).eps * np.abs(y_ref).max()
