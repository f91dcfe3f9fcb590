"""The forward's finiteness test of y, taken from the epilogue that writes y.

Issue 11, goal 3 (the eval forward at the standard shapes): after the C
epilogue wrote y, the functional core read all of y again for its test that
y is finite (``math.isfinite(np.vdot(y, y))``): 0.46 ms of a 94 ms eval
forward at (4096, 4096, r, 512), float32, 2 threads, 0.5 % of the plain
product. The C epilogue now sums ``yv - yv`` per lane while it writes each
element (+0 for a finite one, NaN for Inf or NaN) and returns the flag
(``dora_forward_epilogue_nf_*``); ``_forward_epilogue_flagged`` hands it to
the functional core, which runs the exact test (``check_result_finite``)
only when the flag is set. The NumPy twin keeps the one-sum test. y's bits
are unchanged: the flag is computed beside them.
"""
import numpy as np
import pytest

import dora_ref
from dora_ref.core import backend as _backend
from dora_ref.core import functional as F
from dora_ref.core import kernels_numpy as KN

try:
    from dora_ref.kernels import c as C
except ImportError:  # pragma: no cover - the C extension is not built
    C = None

BACKENDS = ["numpy"] + (["c"] if C is not None else [])
WHERE = {"new": 0, "over_base": 1, "keep_z": 2}
# (N, out, r): partial tiles of rows and columns, a block of rows and one of columns,
# one row, rank 1 and 0
SHAPES = [(13, 201, 5), (40, 300, 17), (16, 64, 64), (1, 100, 3), (5, 7, 1), (6, 33, 0)]


def _module(backend):
    return KN if backend == "numpy" else C


def _draw(N, out_f, r, dtype, seed):
    rng = np.random.default_rng(seed)
    d = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return d(N, out_f), d(N, r), d(out_f, r), d(out_f), d(out_f)


def _reference(K, where, base, U, B, g, bias):
    """What the functional core called before the flag: y, and z (base) after the call."""
    base = base.copy()
    if where == "over_base":
        y = K._forward_epilogue_over_base(base, U, B, g, 0.3, bias)
    elif where == "keep_z":
        y = K._forward_epilogue_keep_z(base, U, B, g, 0.3, bias)
    else:
        y = K.forward_epilogue(base, U, B, g, 0.3, bias)
    return y.copy(), base


def _layouts():
    """(threads, layout) pairs the C epilogue runs under (teams forced), or one for NumPy."""
    return [(t, lay) for t in (1, 2) for lay in ("rows", "columns")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_and_training_forward_raise_on_non_finite_x_and_on_overflow(backend):
    """The layer's eval forward (y over base) and training forward (z kept),
    and the functional forward with a weight_norm: NaN in x is named; an
    output that overflows float32 raises; y of eval and training bitwise equal."""
    with _backend.use_backend(backend):
        rng = np.random.default_rng(4)
        W0 = rng.standard_normal((40, 24)).astype(np.float32)
        layer = dora_ref.layers.DoRALinear(W0, r=16, lora_alpha=16, rng=0)
        layer.lora_B[...] = rng.standard_normal(layer.lora_B.shape).astype(np.float32) * 0.1
        x = rng.standard_normal((7, 24)).astype(np.float32)
        y_train = layer(x).copy()
        layer.eval()
        y_eval = layer(x)
        assert np.array_equal(y_train, y_eval)
        n = F.column_norm(W0, layer.lora_A, layer.lora_B, layer.scaling)
        for training in (True, False):
            layer.train(training)
            xb = x.copy()
            xb[3, 5] = np.nan
            with pytest.raises(ValueError, match="x"):
                layer(xb)
            with pytest.raises(ValueError, match="overflow"), np.errstate(over="ignore"):
                layer(x * np.float32(3e37))
        with pytest.raises(ValueError, match="x"):
            F.dora_forward(xb, W0, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                           layer.scaling, weight_norm=n)
        with pytest.raises(ValueError, match="overflow"), np.errstate(over="ignore"):
            F.dora_forward(x * np.float32(3e37), W0, layer.lora_A, layer.lora_B,
                           layer.lora_magnitude_vector, layer.scaling, weight_norm=n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flagged_epilogue_gives_the_bits_of_the_unflagged_one(backend, where, dtype):
    """Every shape, with and without bias: y (and z kept over base) bitwise
    those of the function the core called before; finite y flagged finite."""
    K = _module(backend)
    for N, out_f, r in SHAPES:
        base, U, B, g, bias = _draw(N, out_f, r, dtype, N * 1000 + out_f + r)
        for b in (bias, None):
            want_y, want_base = _reference(K, where, base, U, B, g, b)
            got_base = base.copy()
            y, finite = K._forward_epilogue_flagged(got_base, U, B, g, 0.3, b, WHERE[where])
            assert finite is True
            assert y.dtype == want_y.dtype and np.array_equal(y.view(np.uint8), want_y.view(np.uint8))
            assert np.array_equal(got_base.view(np.uint8), want_base.view(np.uint8))
            if where == "over_base":
                assert y is got_base


@pytest.mark.skipif(C is None, reason="the C extension is not built")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", list(WHERE))
def test_flag_sees_every_non_finite_element_in_every_layout(where, dtype):
    """An Inf or NaN of y anywhere (first element, a partial tile of rows or
    columns, the last element), by rows and by columns, on 1 and 2 threads:
    the flag is set; and y is still the unflagged kernel's y, bit for bit."""
    N, out_f, r = 21, 203, 7  # partial tiles both ways, more than one block of rows
    base, U, B, g, bias = _draw(N, out_f, r, dtype, 5)
    spots = [(0, 0), (N - 1, out_f - 1), (17, 200), (20, 3), (4, 130), (9, 16)]
    try:
        C._set_always_parallel(True)
        for threads, layout in _layouts():
            C.set_threads(threads)
            C._set_forward_layout(layout)
            for i, j in spots:
                for bad in (np.inf, -np.inf, np.nan):
                    b2 = base.copy()
                    b2[i, j] = bad
                    want_y, _ = _reference(C, where, b2, U, B, g, bias)
                    got = b2.copy()
                    y, finite = C._forward_epilogue_flagged(got, U, B, g, 0.3, bias, WHERE[where])
                    assert finite is False, (threads, layout, i, j, bad)
                    assert np.array_equal(y.view(np.uint8), want_y.view(np.uint8))
    finally:
        C._set_forward_layout("rule")
        C._set_always_parallel(False)
        C.set_threads(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flag_sees_an_output_that_overflows(backend, dtype):
    """Finite inputs whose y overflows the dtype (g * z beyond max): flagged;
    a y of finite huge values (the sum of squares overflows, each element is
    finite): not flagged by C (its flag is exact), and either way the forward
    returns it."""
    K = _module(backend)
    N, out_f, r = 9, 40, 3
    base, U, B, g, bias = _draw(N, out_f, r, dtype, 8)
    big = np.finfo(dtype).max
    g_over = g.copy()
    g_over[7] = big
    with np.errstate(over="ignore"):
        y, finite = K._forward_epilogue_flagged(base.copy(), U, B, g_over, 0.3, bias, 0)
    assert not finite and not np.isfinite(y).all()
    huge = np.full((N, out_f), np.sqrt(big) * 4, dtype=dtype)  # squares overflow, values do not
    y, finite = K._forward_epilogue_flagged(huge, U, B, np.ones(out_f, dtype), 0.0, None, 1)
    assert np.isfinite(y).all()
    if K is C:
        assert finite is True


@pytest.mark.skipif(C is None, reason="the C extension is not built")
def test_flagged_kernel_refuses_a_null_flag():
    """The C entry point never trusts its caller: no flag pointer, DORA_ERR_NULL."""
    base = np.ones((2, 3), np.float32)
    U, B, g = np.ones((2, 1), np.float32), np.ones((3, 1), np.float32), np.ones(3, np.float32)
    y = np.empty_like(base)
    p = lambda a: C.ffi.from_buffer("float[]", a)  # noqa: E731
    status = C.lib.dora_forward_epilogue_nf_f32(p(y), C.ffi.NULL, p(base), p(U), p(B), p(g),
                                                C.ffi.NULL, 0.5, 2, 3, 1, C.ffi.NULL)
    assert status == C.lib.DORA_ERR_NULL
