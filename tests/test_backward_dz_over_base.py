"""The backward writes dz over the (N, out) array its context kept (issue 11, goal 3).

``dora_forward`` keeps the base product x @ W0.T (or z = base + s * U @ B.T
over it) for the backward; nothing reads it after the backward's epilogue,
so ``_dora_backward_f32`` takes it from the context and the kernels write
dz over it (``_backward_lowrank_any`` of each backend) instead of into a
fresh (N, out) array: 8 MiB less fresh memory, and its page faults, a step
at (4096, 4096, r, 512) in float32.

What is asserted, against independent computations:

* Bit for bit, within each backend: dg, dz, dU and dB equal the public
  kernels' (``backward_lowrank`` / ``backward_lowrank_z``, which write a new
  dz) on a copy of the same array, at ranks on both sides of the C
  backend's ``FUSED_MAX_RANK`` and at N and out that are not multiples of a
  tile; the same operations run, so no tolerance is due.
* The whole step: a second backward on the same context (which forms the
  base product again) gives the first one's bits, and both equal a fresh
  forward and backward; with dropout and after an eval forward too.
* An interrupt in the middle of the backward's kernel (dz half written over
  the context's array) leaves a context whose next backward is right: the
  context gives the array up before the kernel writes into it.
* Memory: the backward allocates no (N, out) array of NumPy's (tracemalloc).
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dora_ref.core import backend as _backend
from dora_ref.core import functional as F


@pytest.fixture(autouse=True)
def _take_every_base(monkeypatch):
    """The backward writes dz over arrays of every size here (the library: from 1 MiB)."""
    monkeypatch.setattr(F, "_TAKE_MIN_BYTES", 0)


def _problem(dtype, out_f, in_f, r, N, seed=5):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    return dict(x=draw(N, in_f), W0=draw(out_f, in_f), A=draw(r, in_f), B=draw(out_f, r),
                m=(rng.random(out_f) + 0.5).astype(dtype), dy=draw(N, out_f), s=0.7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [1, 8, 12, 13, 16, 64, 70])
@pytest.mark.parametrize("base_is_z", [False, True])
def test_kernels_write_dz_over_base_with_the_public_kernels_bits(dtype, r, base_is_z):
    K = _backend.kernels()
    rng = np.random.default_rng(r)
    N, out_f = 37, 67  # neither a multiple of a tile; at r = 70 r >= out (BLAS's U @ B.T in C)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    dy, base, U, B = draw(N, out_f), draw(N, out_f), draw(N, r), draw(out_f, r)
    g = (rng.random(out_f) + 0.5).astype(dtype)
    public = K.backward_lowrank_z if base_is_z else K.backward_lowrank
    expected = public(dy, base.copy(), U, B, g, 0.7)
    own = base.copy()
    got = K._backward_lowrank_any(dy, own, U, B, g, 0.7, base_is_z, True)
    assert got[1] is own  # dz went over the array given
    for name, e, a in zip(("dg", "dz", "dU", "dB"), expected, got):
        assert a.dtype == dtype and a.shape == e.shape, name
        np.testing.assert_array_equal(a, e, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [4, 16])  # the fused backward; the forward that keeps z (C and NumPy)
@pytest.mark.parametrize("dropout", [False, True])
def test_a_second_backward_on_one_context_gives_the_same_bits(dtype, r, dropout):
    p = _problem(dtype, 65, 40, r, 19)
    mask = None
    if dropout:
        mask = (np.random.default_rng(1).random(p["x"].shape) > 0.25).astype(dtype) / dtype(0.75)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
    y, ctx = F.dora_forward(*args, dropout_mask=mask)
    first = F.dora_backward(p["dy"], ctx, detach_norm=False)
    assert ctx.base is None and not ctx.base_is_z  # the backward took it
    second = F.dora_backward(p["dy"], ctx, detach_norm=False)
    _, ctx_fresh = F.dora_forward(*args, dropout_mask=mask)
    fresh = F.dora_backward(p["dy"], ctx_fresh, detach_norm=False)
    for name, a, b, c in zip(("dx", "dA", "dB", "dmagnitude"), first, second, fresh):
        np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(a, c, err_msg=name)


def test_an_interrupt_inside_the_backward_kernel_leaves_a_usable_context(monkeypatch):
    """A Ctrl-C while the kernel writes dz over the context's array: the next backward on
    that context must not read the half-written array as its base product (or z)."""
    p = _problem(np.float64, 48, 30, 16, 11)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
    _, ctx_ref = F.dora_forward(*args)
    expected = F.dora_backward(p["dy"], ctx_ref)

    K = _backend.kernels()
    real = K._backward_lowrank_any

    def interrupted(dy, base, *rest):
        base[: base.shape[0] // 2] = 1e300  # dz half written ...
        raise KeyboardInterrupt  # ... when the signal lands

    _, ctx = F.dora_forward(*args)
    monkeypatch.setattr(K, "_backward_lowrank_any", interrupted)
    with pytest.raises(KeyboardInterrupt):
        F.dora_backward(p["dy"], ctx)
    monkeypatch.setattr(K, "_backward_lowrank_any", real)
    again = F.dora_backward(p["dy"], ctx)
    for name, a, b in zip(("dx", "dA", "dB", "dmagnitude"), again, expected):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_layer_eval_forward_then_backward_and_backward_again():
    """The eval forward wrote y over its base product (the context has none): each
    backward forms it again, and writes dz over that."""
    from dora_ref.layers import DoRALinear

    p = _problem(np.float32, 33, 20, 16, 9)
    layer = DoRALinear(p["W0"], r=16, lora_alpha=8, rng=0)
    layer.lora_B[...] = p["B"]
    layer.eval()
    layer(p["x"])
    first = layer.backward(p["dy"])  # dx (the layer accumulates its gradients)
    second = layer.backward(p["dy"])
    layer.train()
    layer(p["x"])
    third = layer.backward(p["dy"])
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)


@pytest.mark.parametrize("r", [8, 16])
def test_the_backward_allocates_no_out_sized_array(r):
    """dz goes over the context's array: the backward's NumPy allocations at peak are dx,
    the small gradients and one block of _add_low_rank's rows (about 1 MiB), not an (N, out)
    array (2 MiB here)."""
    N, out_f, in_f = 256, 2048, 128
    p = _problem(np.float32, out_f, in_f, r, N)
    _, ctx = F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
    tracemalloc.start()
    try:
        dx, dA, dB, dm = F.dora_backward(p["dy"], ctx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    results = dx.nbytes + dA.nbytes + dB.nbytes + dm.nbytes
    out_sized = N * out_f * 4
    # besides the results: the (N, r) and (out, r) products and their scaled copies,
    # dg and 1/n terms, a block of rows of dx; far below one (N, out) array
    small = 4 * (N * r + out_f * r) * 4 + 4 * out_f * 4 + (1 << 20)
    assert peak - results <= small < out_sized, (peak, results, small, out_sized)


def _two_holders_cases():
    import copy
    import pickle

    def shallow_copy(ctx):
        return copy.copy(ctx)  # shares ctx.base, the same ndarray

    def view(ctx):
        return ctx.base[:]  # a view of it, held by the caller

    def zero_copy_pickle(ctx):  # protocol 5 with out-of-band buffers: the same memory
        buffers = []
        data = pickle.dumps(ctx, protocol=5, buffer_callback=buffers.append)
        return pickle.loads(data, buffers=[b.raw() for b in buffers])

    return [shallow_copy, view, zero_copy_pickle]


@pytest.mark.parametrize("holder", _two_holders_cases(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("r", [4, 16])
def test_a_base_held_elsewhere_is_not_written_over(holder, r):
    """An adversary's cases: a shallow copy of the context, or a layer pickled zero-copy between
    forward and backward, shares the context's base; a backward wrote dz over it and the other
    holder's backward then read dz as its base product (dmagnitude off by 11)."""
    import copy

    p = _problem(np.float32, 67, 30, r, 9)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], 0.5)
    _, ctx_ref = F.dora_forward(*args)
    expected = F.dora_backward(p["dy"], ctx_ref, detach_norm=False)
    _, ctx = F.dora_forward(*args)
    other = holder(ctx)
    first = F.dora_backward(p["dy"], ctx, detach_norm=False)
    if isinstance(other, F.DoRAContext):
        second = F.dora_backward(p["dy"], other, detach_norm=False)
    else:  # the caller's view: still the base product (or z) the forward kept
        second = F.dora_backward(p["dy"], copy.copy(ctx), detach_norm=False)
        assert ctx.base is not None
    for name, e, a, b in zip(("dx", "dA", "dB", "dmagnitude"), expected, first, second):
        np.testing.assert_array_equal(a, e, err_msg=name)
        np.testing.assert_array_equal(b, e, err_msg=name)


@pytest.mark.parametrize("make", ["read-only", "bytes"])
def test_a_base_in_memory_that_is_not_writeable_is_not_written_over(make):
    """An adversary's case: a context unpickled from read-only buffers (a read-only memory map
    crashed the process with SIGSEGV in the C kernel; bytes objects were changed in place)."""
    import pickle

    p = _problem(np.float32, 67, 30, 16, 9)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], 0.5)
    _, ctx_ref = F.dora_forward(*args)
    expected = F.dora_backward(p["dy"], ctx_ref)
    _, ctx = F.dora_forward(*args)
    buffers = []
    data = pickle.dumps(ctx, protocol=5, buffer_callback=buffers.append)
    if make == "bytes":
        raw = [bytes(b.raw()) for b in buffers]
        before = [bytes(b) for b in raw]
    else:
        raw = [memoryview(bytearray(b.raw())).toreadonly() for b in buffers]
        before = [bytes(b) for b in raw]
    ctx2 = pickle.loads(data, buffers=raw)
    assert not ctx2.base.flags.writeable
    got = F.dora_backward(p["dy"], ctx2)
    assert [bytes(b) for b in raw] == before
    for name, e, a in zip(("dx", "dA", "dB", "dmagnitude"), expected, got):
        np.testing.assert_array_equal(a, e, err_msg=name)


def _line_numbers(fn):
    import dis

    return sorted({line for _, line in dis.findlinestarts(fn.__code__) if line is not None})


def _line_after_take_base():
    """The line of ``_dora_backward_f32`` right after it took its base: where the thread that
    took the array read-only waits before its kernel reads it."""
    import inspect

    lines, first = inspect.getsourcelines(F._dora_backward_f32)
    for k, text in enumerate(lines):
        if "_take_base(ctx)" in text:
            return first + k + 1
    raise AssertionError("_dora_backward_f32 no longer calls _take_base")


@pytest.mark.parametrize("at", range(len(_line_numbers(F._take_base))))
def test_two_threads_backing_up_one_context(at):
    """An adversary's case: thread A held (a trace hook) between reading the context's base and
    clearing it while thread B ran a backward of the same context: A's dmagnitude was off by 11.
    Here A is held at each line of ``_take_base`` in turn until B has taken what it takes and
    is about to run its kernel; then A runs to the end (writing dz over the array if it took
    it), then B. Both results must be right."""
    import sys
    import threading

    p = _problem(np.float32, 67, 30, 16, 9)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], 0.5)
    rng = np.random.default_rng(2)
    dyA, dyB = (rng.standard_normal(p["dy"].shape).astype(np.float32) for _ in range(2))
    expected = {k: F.dora_backward(dy, F.dora_forward(*args)[1]) for k, dy in (("A", dyA), ("B", dyB))}
    _, ctx = F.dora_forward(*args)
    line_a = _line_numbers(F._take_base)[at]
    line_b = _line_after_take_base()
    a_held, b_held, a_done = threading.Event(), threading.Event(), threading.Event()

    def hook(code, line, held, wait_for, timeout):
        def tracer(frame, event, arg):
            if frame.f_code is code:
                def local(frame, event, arg):
                    if event == "line" and frame.f_lineno == line and not held.is_set():
                        held.set()
                        wait_for.wait(timeout)
                    return local
                return local
            return None
        return tracer

    out = {}

    def run(key, dy, tracer, done=None):
        sys.settrace(tracer)
        try:
            out[key] = F.dora_backward(dy, ctx)
        finally:
            sys.settrace(None)
            if done is not None:
                done.set()

    # A waits for B a short while only: where A holds the lock that makes taking the array one
    # step, B waits for A instead (and reaches its own hold after A let go)
    ta = threading.Thread(target=run, args=("A", dyA, hook(F._take_base.__code__, line_a, a_held,
                                                           b_held, 0.2), a_done))
    ta.start()
    while not a_held.is_set() and ta.is_alive():  # a line this call does not run: no hold
        a_held.wait(0.005)
    tb = threading.Thread(target=run, args=("B", dyB, hook(F._dora_backward_f32.__code__, line_b,
                                                           b_held, a_done, 10)))
    tb.start()
    ta.join(20)
    tb.join(20)
    assert not ta.is_alive() and not tb.is_alive()
    for key in ("A", "B"):
        for name, e, a in zip(("dx", "dA", "dB", "dmagnitude"), expected[key], out[key]):
            np.testing.assert_array_equal(a, e, err_msg=f"{key} {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("dropout", [False, True])
def test_the_gradients_do_not_depend_on_the_memory_order_of_dy(dtype, r, dropout):
    """An adversary's case: on the NumPy backend a Fortran-ordered dy gave dx, dA and dB other
    last bits than the same dy C-ordered (its dz = dy * g kept dy's order, and BLAS read it
    transposed); the C backend copied it C-contiguous. Now both backends do."""
    p = _problem(dtype, 37, 21, r, 13)
    mask = None
    if dropout:
        mask = (np.random.default_rng(3).random(p["x"].shape) > 0.25).astype(dtype) / dtype(0.75)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
    dy_f = np.asfortranarray(p["dy"])
    assert not dy_f.flags.c_contiguous
    got = {}
    for key, dy in (("C", p["dy"]), ("F", dy_f)):
        _, ctx = F.dora_forward(*args, dropout_mask=mask)
        got[key] = F.dora_backward(dy, ctx, detach_norm=False)
    for name, a, b in zip(("dx", "dA", "dB", "dmagnitude"), got["C"], got["F"]):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_tracer_that_reads_locals_does_not_make_a_shared_base_look_held_alone():
    """An adversary's case: the count for "held alone" was measured once, at import; a tracer
    that reads frames' locals (a debugger, a call logger) adds a reference to every local, and
    one active at import made a base shared with a copy of the context look held alone
    (dmagnitude off by 9.6). The count is now compared with a probe's at the same moment."""
    import copy
    import sys

    p = _problem(np.float32, 67, 30, 4, 9)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], 0.5)
    expected = F.dora_backward(p["dy"], F.dora_forward(*args)[1])

    def tracer(frame, event, arg):
        frame.f_locals  # noqa: B018 - what a debugger's or logger's tracer does
        return tracer

    for shared in (False, True):
        _, ctx = F.dora_forward(*args)
        other = copy.copy(ctx) if shared else None
        sys.settrace(tracer)
        try:
            got = F.dora_backward(p["dy"], ctx)
        finally:
            sys.settrace(None)
        grads = [got] + ([F.dora_backward(p["dy"], other)] if shared else [])
        for g in grads:
            for name, e, a in zip(("dx", "dA", "dB", "dmagnitude"), expected, g):
                np.testing.assert_array_equal(a, e, err_msg=f"shared={shared} {name}")


@pytest.mark.parametrize("at", range(len(_line_numbers(F._take_base))))
def test_the_context_keeps_its_base_attribute_through_an_interrupt_anywhere(at):
    """An adversary's case: between popping the array and putting None in its place the context
    had no ``base`` at all, and an interrupt there left ``ctx.base`` and ``repr(ctx)`` raising
    AttributeError for good. A KeyboardInterrupt at each line of ``_take_base``: the context
    still has ``base`` (the array or None) and the next backward is right."""
    import sys

    p = _problem(np.float64, 20, 12, 16, 5)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], 0.5)
    expected = F.dora_backward(p["dy"], F.dora_forward(*args)[1])
    _, ctx = F.dora_forward(*args)
    code, line = F._take_base.__code__, _line_numbers(F._take_base)[at]
    fired = []

    def tracer(frame, event, arg):
        if frame.f_code is code:
            def local(frame, event, arg):
                assert "base" in ctx.__dict__  # at every line
                if event == "line" and frame.f_lineno == line and not fired:
                    fired.append(line)
                    raise KeyboardInterrupt
                return local
            return local
        return None

    sys.settrace(tracer)
    try:
        F.dora_backward(p["dy"], ctx)
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    assert "base" in ctx.__dict__ and "base_is_z" in ctx.__dict__
    repr(ctx)
    got = F.dora_backward(p["dy"], ctx)
    for name, e, a in zip(("dx", "dA", "dB", "dmagnitude"), expected, got):
        np.testing.assert_array_equal(a, e, err_msg=name)


def test_a_context_pickled_without_base_is_z_still_backs_up(monkeypatch):
    """An adversary's case: a context whose __dict__ lacks ``base_is_z`` (pickled by a version
    before forwards kept z, whose base was always the base product) failed the backward with
    KeyError 'base_is_z'; it reads as False."""
    p = _problem(np.float64, 20, 12, 4, 5)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], 0.5)
    expected = F.dora_backward(p["dy"], F.dora_forward(*args)[1])
    monkeypatch.setattr(F, "_KEEP_Z", False)  # such a version's context: the base product
    _, ctx = F.dora_forward(*args)
    assert not ctx.base_is_z
    del ctx.__dict__["base_is_z"]
    got = F.dora_backward(p["dy"], ctx)
    for name, e, a in zip(("dx", "dA", "dB", "dmagnitude"), expected, got):
        np.testing.assert_array_equal(a, e, err_msg=name)


def test_dora_ref_imported_under_a_tracer_that_reads_locals():
    """The adversary's case itself, in a process of its own: dora_ref imported while a tracer that
    reads frames' locals runs, the tracer gone, then a copy of a context backs up before the
    context does. Both must be right (with the count measured at import, the copy's backward
    wrote dz over the shared base and the original's dmagnitude was off by 9.6)."""
    import subprocess
    import sys

    code = """
import sys
def tracer(frame, event, arg):
    frame.f_locals
    return tracer
sys.settrace(tracer)
import copy
import numpy as np
from dora_ref.core import functional as F
sys.settrace(None)
F._TAKE_MIN_BYTES = 0  # this small case's base is taken too
rng = np.random.default_rng(0)
x, W0, A, B = (rng.standard_normal(s).astype(np.float32) for s in ((9, 30), (67, 30), (4, 30), (67, 4)))
m = (rng.random(67) + .5).astype(np.float32)
dy = rng.standard_normal((9, 67)).astype(np.float32)
ref = F.dora_backward(dy, F.dora_forward(x, W0, A, B, m, 0.5)[1], detach_norm=False)
_, ctx = F.dora_forward(x, W0, A, B, m, 0.5)
other = copy.copy(ctx)
g2 = F.dora_backward(dy, other, detach_norm=False)
g1 = F.dora_backward(dy, ctx, detach_norm=False)
ok = all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(ref, g1, g2))
print("right" if ok else "WRONG")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "right", out.stdout + out.stderr


def test_only_arrays_of_a_mebibyte_or_more_are_written_over(monkeypatch):
    """Below ``_TAKE_MIN_BYTES`` (1 MiB) glibc reuses freed arrays without page faults, and
    taking the array cost the 64x64 layer's backward 2-5%: it stays in the context there."""
    monkeypatch.setattr(F, "_TAKE_MIN_BYTES", 1 << 20)
    for N, out_f, taken in ((64, 64, False), (64, 4095, False), (64, 4096, True)):
        p = _problem(np.float32, out_f, 8, 4, N)
        _, ctx = F.dora_forward(p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"])
        F.dora_backward(p["dy"], ctx)
        assert (ctx.base is None) is taken, (N, out_f)


def _backward_in_a_thread(dy, ctx, line, at_line, results=None):
    """Start a thread that runs ``F.dora_backward(dy, ctx)`` (into ``results["outer"]``) with
    ``at_line(frame)`` called once, when ``_take_base`` reaches ``line``; returns the thread."""
    import sys
    import threading

    code, fired = F._take_base.__code__, []

    def tracer(frame, event, arg):
        if frame.f_code is code and not fired:
            def local(frame, event, arg):
                if event == "line" and frame.f_lineno == line and not fired:
                    fired.append(line)
                    at_line(frame)
                return local
            return local
        return None

    def run():
        sys.settrace(tracer)
        try:
            got = F.dora_backward(dy, ctx)
        finally:
            sys.settrace(None)
        if results is not None:
            results["outer"] = got
            results["fired"] = bool(fired)
            results["busy"] = getattr(F._TAKING, "busy", False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_takes_a_base_leaves_the_child_a_free_lock():
    """Review of this round's change: ``_take_base``'s lock, held by another thread at the
    moment of a fork, stayed held in the child, whose first backward that takes an array
    would wait for ever. The child gets a fresh lock (``os.register_at_fork``)."""
    import os
    import threading
    import time

    p = _problem(np.float64, 20, 12, 16, 5)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], 0.5)
    expected = F.dora_backward(p["dy"], F.dora_forward(*args)[1])
    _, ctx = F.dora_forward(*args)
    code = F._take_base.__code__
    inside = next(line for line in _line_numbers(F._take_base)
                  if "probe = []" in open(code.co_filename).read().splitlines()[line - 1])
    held, release = threading.Event(), threading.Event()

    def hold(frame):
        held.set()
        release.wait(20)

    thread = _backward_in_a_thread(p["dy"], ctx, inside, hold)
    assert held.wait(10)
    assert F._TAKE_LOCK.locked()  # the other thread is inside the lock
    pid = os.fork()
    if pid == 0:  # the child: a backward that takes its array must finish, and be right
        try:
            _, ctx2 = F.dora_forward(*args)
            got = F.dora_backward(p["dy"], ctx2)
            ok = all(np.array_equal(a, e) for a, e in zip(got, expected)) and ctx2.base is None
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    try:
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the child's backward hung on the lock held at the fork")
            time.sleep(0.01)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        release.set()
        thread.join(20)


@pytest.mark.parametrize("same_context", [True, False])
@pytest.mark.parametrize("at", range(len(_line_numbers(F._take_base))))
def test_a_backward_run_by_a_signal_handler_inside_a_take(at, same_context):
    """Session 20's adversary: a SIGALRM handler that ran a backward while its thread was inside
    ``_take_base``'s lock waited for that lock for ever (the interrupted frame holds it). A
    nested backward (what a handler runs between two bytecodes) at each line of ``_take_base``,
    on the same context and on another: both finish, in a thread joined with a timeout, and
    both give the bits of a backward run alone."""
    import sys

    p = _problem(np.float64, 20, 12, 16, 5)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], 0.5)
    expected = F.dora_backward(p["dy"], F.dora_forward(*args)[1])
    _, ctx = F.dora_forward(*args)
    _, other = F.dora_forward(*args)
    line = _line_numbers(F._take_base)[at]
    results = {}

    def handler(frame):
        sys.settrace(None)  # the handler's own backward runs untraced
        frame.f_trace = None
        results["nested"] = F.dora_backward(p["dy"], ctx if same_context else other)

    thread = _backward_in_a_thread(p["dy"], ctx, line, handler, results)
    thread.join(30)
    assert not thread.is_alive(), f"the nested backward at line {line} of _take_base hung"
    # a line this path does not run (another branch's return) fires nothing: the outer alone
    assert set(results) - {"fired", "busy"} == ({"outer", "nested"} if results["fired"] else {"outer"})
    for which in ("outer", "nested") if results["fired"] else ("outer",):
        for name, e, a in zip(("dx", "dA", "dB", "dmagnitude"), expected, results[which]):
            np.testing.assert_array_equal(a, e, err_msg=f"{which} {name}")
    assert results["busy"] is False and not F._TAKE_LOCK.locked()  # the flag as it was, the lock free


def test_a_flag_an_interrupt_left_set_does_not_stop_the_take(monkeypatch):
    """An interrupt at the line that puts ``_TAKING.busy`` back leaves it set for the thread;
    with the lock free the backward still takes its array (and puts the flag as it found it)."""
    p = _problem(np.float64, 20, 12, 16, 5)
    args = (p["x"], p["W0"], p["A"], p["B"], p["m"], 0.5)
    expected = F.dora_backward(p["dy"], F.dora_forward(*args)[1])
    monkeypatch.setattr(F._TAKING, "busy", True, raising=False)
    _, ctx = F.dora_forward(*args)
    got = F.dora_backward(p["dy"], ctx)
    assert ctx.base is None  # taken, dz written over it
    for name, e, a in zip(("dx", "dA", "dB", "dmagnitude"), expected, got):
        np.testing.assert_array_equal(a, e, err_msg=name)
