"""Regression (session 24, an adversarial test): a forward on one thread while another thread merged
and unmerged the same layer returned a wrong y without an error (94 wrong outputs in 5 s, the worst
off by 0.14 of max|y|). Now such a forward raises RuntimeError (``base.consistent_forward``).

The interleavings are made deterministic with a trace function: a merge (or unmerge) is run at
every line of a forward, and a forward at every line of a merge's state change; then the
adversary's two-thread run, bounded in time, must return no wrong y.
"""
import sys
import threading
import time

import numpy as np
import pytest

import dora_ref


def _layers():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((48, 40))
    out = []
    for cls in (dora_ref.DoRALinear, dora_ref.LoRALinear):
        layer = cls(W.copy(), r=4, lora_alpha=8, rng=0)
        layer.lora_B[...] = rng.standard_normal(layer.lora_B.shape) / 2
        out.append(layer)
    emb = dora_ref.DoRAEmbedding(rng.standard_normal((20, 12)), r=3, lora_alpha=6, rng=0)
    emb.lora_embedding_A[...] = rng.standard_normal(emb.lora_embedding_A.shape)
    out.append(emb)
    conv = dora_ref.DoRAConv1d(rng.standard_normal((6, 4, 3)), r=2, lora_alpha=4, rng=0)
    conv.lora_B[...] = rng.standard_normal(conv.lora_B.shape)
    out.append(conv)
    inputs = [rng.standard_normal((7, 40)), rng.standard_normal((7, 40)), np.array([[1, 5, 19], [0, 2, 2]]),
              rng.standard_normal((2, 4, 9))]
    return list(zip(out, inputs))


IDS = ["DoRALinear", "LoRALinear", "DoRAEmbedding", "DoRAConv1d"]


def _run_with(code, action, k):
    """Run ``action`` at the k-th line event of frames running ``code``; True if it ran."""
    seen, ran = [0], [False]

    def local(frame, event, arg):
        if event == "line" and not ran[0]:
            if seen[0] == k:
                ran[0] = True
                sys.settrace(None)  # the action itself untraced
                action()
                sys.settrace(tracer)
            seen[0] += 1
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is code else None

    return tracer, ran


def _forward_with(layer, x, action, k):
    """A forward with ``action`` run at its k-th line: (the action ran, y or None if the forward
    raised the overlap RuntimeError)."""
    tracer, ran = _run_with(type(layer).forward.__wrapped__.__code__, action, k)
    sys.settrace(tracer)
    try:
        y = layer.forward(x)
    except RuntimeError as exc:
        assert "merge(), unmerge() or set_base_weight() of the same layer" in str(exc)
        y = None
    finally:
        sys.settrace(None)
    return ran[0], y


@pytest.mark.parametrize("case", range(4), ids=IDS)
@pytest.mark.parametrize("toggle", ["merge", "unmerge"])
def test_merge_or_unmerge_inside_a_forward_makes_it_raise(case, toggle):
    layer, x = _layers()[case]
    layer.eval()
    if toggle == "unmerge":
        layer.merge()
    y_ref = layer.forward(x).copy()
    k, raised = 0, 0
    while True:
        ran, y = _forward_with(layer, x, getattr(layer, toggle), k)
        if not ran:  # past the forward's last line: every place was tried
            np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-12 * np.max(np.abs(y_ref)))  # rounding only
            break
        assert y is None, f"{toggle} at line event {k} of the forward: a y was returned"
        raised += 1
        getattr(layer, "unmerge" if toggle == "merge" else "merge")()  # back to the start
        k += 1
    assert raised >= 3


@pytest.mark.parametrize("case", range(4), ids=IDS)
def test_forward_started_inside_a_merge_raises(case):
    layer, x = _layers()[case]
    layer.eval()
    seen = []

    def forward():
        try:
            layer.forward(x)
            seen.append("returned")
        except RuntimeError as exc:
            assert "started while a merge(), unmerge() or set_base_weight()" in str(exc)
            seen.append("raised")

    # the state change of a merge: the function _all_or_nothing runs (change), traced line by line
    tracer, ran = _run_with(type(layer)._switch_base.__code__, forward, 1)
    sys.settrace(tracer)
    try:
        layer.merge()
    finally:
        sys.settrace(None)
    assert ran[0] and seen == ["raised"], seen
    assert layer.merged
    y = layer.forward(x)  # afterwards: fine
    layer.unmerge()
    np.testing.assert_allclose(layer.forward(x), y, rtol=1e-12, atol=1e-12)


def test_two_threads_forward_and_merge_never_return_a_wrong_y():
    """The adversary's reproducer, bounded to 1.5 s: every forward returns the right y or raises."""
    rng = np.random.default_rng(0)
    layer = dora_ref.DoRALinear(rng.standard_normal((256, 256)), r=16, lora_alpha=32, rng=0)
    layer.lora_B[...] = rng.standard_normal(layer.lora_B.shape) / 2
    layer.eval()
    x = rng.standard_normal((64, 256))
    y_ref = layer.forward(x).copy()
    stop = time.monotonic() + 1.5
    counts = {"wrong": 0, "raised": 0, "right": 0, "toggles": 0}

    def infer():
        while time.monotonic() < stop:
            try:
                y = layer.forward(x)
            except RuntimeError:
                counts["raised"] += 1
                continue
            # merged and unmerged forwards differ by rounding only
            if np.max(np.abs(y - y_ref)) > 1e-9 * np.max(np.abs(y_ref)):
                counts["wrong"] += 1
            else:
                counts["right"] += 1

    def toggle():
        while time.monotonic() < stop:
            layer.merge()
            layer.unmerge()
            counts["toggles"] += 1

    threads = [threading.Thread(target=infer), threading.Thread(target=toggle)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert counts["wrong"] == 0, counts
    assert counts["right"] > 0 and counts["toggles"] > 0, counts


@pytest.mark.parametrize("case", range(4), ids=IDS)
def test_set_base_weight_inside_a_forward_makes_it_raise(case):
    """A third adversary's find: another thread's set_base_weight during a forward gave a y from
    neither base (max |y - old| 3.0, |y - new| 6.7), no error."""
    layer, x = _layers()[case]
    rng = np.random.default_rng(5)
    new_base = rng.standard_normal(layer.weight.shape)
    k = 0
    while True:
        ran, y = _forward_with(layer, x, lambda: layer.set_base_weight(new_base.copy()), k)
        if not ran:
            assert y is not None
            break
        assert y is None, f"set_base_weight at line event {k} of the forward: a y was returned"
        k += 1
    assert k >= 3


def test_a_copy_taken_during_a_change_is_refused_and_an_odd_counter_heals():
    """A copy (pickle, deepcopy) of a layer taken while it was being merged held a flag and a weight
    that disagree and forwarded a wrong y (a fourth adversary's find; before that, it kept the odd
    counter and refused every forward). Now copying is refused during a change; a copy taken
    between changes starts with none under way; and an odd counter left by two changes racing on
    two threads is healed by the next change."""
    import copy
    import pickle

    layer, x = _layers()[0]
    y_ref = layer.forward(x).copy()
    k = 0
    while True:  # a copy attempted at every line of a merge's change
        refused = []

        def attempt():
            for make in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
                try:
                    make(layer)
                except RuntimeError as exc:
                    assert "while it was copied or pickled" in str(exc)
                    refused.append(1)

        tracer, ran = _run_with(type(layer)._switch_base.__code__, attempt, k)
        sys.settrace(tracer)
        try:
            layer.merge()
        finally:
            sys.settrace(None)
        layer.unmerge()
        if not ran[0]:
            break
        assert len(refused) == 2, k
        k += 1
    assert k >= 2
    for c in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):  # between changes: fine
        np.testing.assert_allclose(c.forward(x), y_ref, rtol=0, atol=1e-12 * np.max(np.abs(y_ref)))
    layer._state_generation = 3  # what two racing changes could leave
    with pytest.raises(RuntimeError, match="started while"):
        layer.forward(x)
    layer.merge()  # the next change ends on an even number
    layer.forward(x)
    layer.unmerge()
    layer.forward(x)


@pytest.mark.parametrize("kind", ["DoRALinear", "LoRALinear"])
def test_refused_or_interrupted_set_base_weight_leaves_the_layer_as_it_was(kind):
    """A fourth adversary's finds: a weight refused by set_base_weight (a bias of another dtype, a
    NaN weight) stayed installed, or half of it did, and every later forward refused; an alarm in
    the middle of a DoRA set_base_weight left the new W0 with the old magnitude (a wrong y, no
    error). Now an exception anywhere in it leaves the layer as it was."""

    rng = np.random.default_rng(0)
    cls = getattr(dora_ref, kind)
    W = rng.standard_normal((8, 6)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    layer = cls(W, b, r=2, lora_alpha=4, rng=0)
    layer.lora_B[...] = rng.standard_normal(layer.lora_B.shape)
    y_ref = layer.forward(x).copy()
    bads = [W.astype(np.float16)] + ([np.full(W.shape, np.nan, np.float32)] if kind == "DoRALinear" else [])
    for bad in bads:  # a bias of another dtype than the weight; a NaN weight (DoRA: its norm)
        with pytest.raises((ValueError, TypeError)):
            layer.set_base_weight(bad)
        assert np.array_equal(layer.forward(x), y_ref)
    # an exception at every line of set_base_weight's work (a trace function stands in for an alarm)
    new_W = rng.standard_normal(W.shape).astype(np.float32)
    codes = {c.__dict__["_set_base"].__code__ for c in cls.__mro__ if "_set_base" in c.__dict__}
    k = 0
    while True:
        seen, raised = [0], []

        def local(frame, event, arg):
            if event == "line":
                if seen[0] == k:
                    raised.append(1)
                    raise KeyboardInterrupt
                seen[0] += 1
            return local

        sys.settrace(lambda frame, event, arg: local if frame.f_code in codes else None)
        try:
            layer.set_base_weight(new_W.copy())
            done = True
        except KeyboardInterrupt:
            done = False
        finally:
            sys.settrace(None)
        if done:
            break
        assert np.array_equal(layer.forward(x), y_ref), f"interrupted at line {k}: the layer changed"
        k += 1
    assert k >= 5
