"""float16 / bfloat16 weights: the dtype rules and the two policies (no torch needed).

Every test runs under each backend (conftest); with a backend whose kernels do
not accept lp weights, the lp calls use the NumPy twins.

The "consistent" policy is defined as the float32 computation on the exactly
upcast inputs, each result rounded once: its tests compare BIT FOR BIT with
dora_ref's own float32 API called on the upcast inputs and rounded once (no
tolerance: the claim is equality). Inputs are lp arrays, so the upcast is exact.
The "peft" policy is checked against PEFT itself in test_low_precision_parity.py;
here only its init quirk, stated from the formula.
"""
import ml_dtypes
import numpy as np
import pytest

import dora_ref.core.functional as F
from dora_ref.core import backend, precision
from dora_ref.core.precision import classify, round_to, unit_roundoff

BF16 = np.dtype(ml_dtypes.bfloat16)
FP16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
LP = [FP16, BF16]
LP_IDS = ["fp16", "bf16"]


def lp_case(lp, mixed, seed=0, out_f=24, in_f=40, r=4, N=7, trained=True, bias=True):
    """Random lp arrays; adapter float32 (mixed) or lp (pure), all lp-representable."""
    rng = np.random.default_rng(seed)
    ad = F32 if mixed else lp
    rep = lambda a: a.astype(lp).astype(ad)  # noqa: E731 (lp values in the adapter dtype)
    W0 = (rng.standard_normal((out_f, in_f)) * 0.5).astype(lp)
    A = rep(rng.standard_normal((r, in_f)) * 0.3)
    B = rep(rng.standard_normal((out_f, r)) * 0.3) if trained else np.zeros((out_f, r), ad)
    m = rep(1.0 + rng.random(out_f))
    x = rng.standard_normal((N, in_f)).astype(lp)
    b = (rng.standard_normal(out_f) * 0.1).astype(lp) if bias else None
    return dict(x=x, W0=W0, A=A, B=B, m=m, b=b, s=2.0)


def up(a):
    return None if a is None else a.astype(np.float32)


def same_bits(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# ---------------------------------------------------------------------------
# precision.py
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_classify_names_mixed_and_pure(lp):
    W0 = np.zeros((3, 4), lp)
    f32 = lambda *s: np.zeros(s, F32)  # noqa: E731
    assert classify(W0, f32(2, 4), f32(3, 2), f32(3), np.zeros(3, lp)) == ("mixed", lp)
    assert classify(W0, np.zeros((2, 4), lp), np.zeros((3, 2), lp), np.zeros(3, lp)) == ("pure", lp)
    assert classify(f32(3, 4), f32(2, 4), f32(3, 2)) == ("f32", None)


@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_classify_refuses_other_combinations_naming_every_array(lp):
    other = BF16 if lp == FP16 else FP16
    W0 = np.zeros((3, 4), lp)
    bad = [
        (np.zeros((2, 4), F32), np.zeros((3, 2), lp), None, None),  # adapter mixes f32 and lp
        (np.zeros((2, 4), other), np.zeros((3, 2), other), None, None),  # fp16 with bf16
        (np.zeros((2, 4)), np.zeros((3, 2)), None, None),  # float64 adapter
        (np.zeros((2, 4), F32), np.zeros((3, 2), F32), None, np.zeros(3, F32)),  # f32 bias
    ]
    for A, B, m, b in bad:
        with pytest.raises(TypeError, match=rf"W0: {lp}, A: {A.dtype}, B: {B.dtype}"):
            classify(W0, A, B, m, b)


def test_unit_roundoffs_and_policy_names():
    assert unit_roundoff(FP16) == 2.0**-11 and unit_roundoff(BF16) == 2.0**-8
    assert unit_roundoff(F32) == 2.0**-24 and unit_roundoff(np.float64) == 2.0**-53
    with pytest.raises(TypeError, match="unit_roundoff"):
        unit_roundoff(np.int8)
    assert precision.POLICIES == ("consistent", "peft")
    with pytest.raises(ValueError, match=r"policy must be one of \('consistent', 'peft'\), got 'fast'"):
        precision.check_policy("fast")


@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_round_to_is_round_to_nearest_even_and_overflows_to_inf(lp):
    u = unit_roundoff(lp)
    one_and_half_ulp = np.array([1 + u, 1 + 3 * u], np.float32)  # ties: to even -> 1, 1 + 4u
    got = round_to(one_and_half_ulp, lp).astype(np.float64)
    assert got.tolist() == [1.0, 1 + 4 * u]
    assert np.isinf(round_to(np.array([min(float(precision.finfo(lp).max) * 2, float(np.finfo(np.float32).max))], np.float32), lp)).all()


def test_functions_without_low_precision_support_still_refuse_it():
    from dora_ref.core._validate import as_float_array

    with pytest.raises(TypeError, match=r"x has dtype bfloat16 .* takes float32 or float64"):
        as_float_array("x", np.zeros(3, BF16))


# ---------------------------------------------------------------------------
# "consistent": the float32 computation, rounded once (bit for bit)
# ---------------------------------------------------------------------------


def f32_reference(c, mixed, lp, **fwd):
    """dora_ref's float32 API on the upcast inputs; the pure rule's norm rounded to lp."""
    n = F.column_norm(c["W0"].astype(np.float32), up(c["A"]), up(c["B"]), c["s"])
    if not mixed:
        n = n.astype(lp).astype(np.float32)
    return F.dora_forward(up(c["x"]), up(c["W0"]), up(c["A"]), up(c["B"]), up(c["m"]), c["s"],
                          up(c["b"]), weight_norm=n, **fwd), n


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_consistent_forward_backward_are_float32_rounded_once(lp, mixed):
    c = lp_case(lp, mixed)
    rng = np.random.default_rng(5)
    dy = rng.standard_normal(c["x"].shape[:-1] + (c["W0"].shape[0],)).astype(lp)
    for detach in (True, False):
        y, ctx = F.dora_forward(c["x"], c["W0"], c["A"], c["B"], c["m"], c["s"], c["b"])
        (y32, ctx32), _ = f32_reference(c, mixed, lp)
        same_bits(y, y32.astype(lp))
        g = F.dora_backward(dy, ctx, detach_norm=detach)
        g32 = F.dora_backward(up(dy), ctx32, detach_norm=detach)
        same_bits(g.dx, g32.dx.astype(lp))
        for got, want in zip(g[1:], g32[1:]):
            same_bits(got, want.astype(c["A"].dtype))


@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_consistent_forward_with_dropout_mask_is_float32_rounded_once(lp):
    c = lp_case(lp, True, seed=3)
    mask = (np.random.default_rng(1).random(c["x"].shape) > 0.5).astype(lp) * lp.type(2)
    y, ctx = F.dora_forward(c["x"], c["W0"], c["A"], c["B"], c["m"], c["s"], c["b"],
                            dropout_mask=mask)
    (y32, _), _ = f32_reference(c, True, lp, dropout_mask=up(mask))
    same_bits(y, y32.astype(lp))


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_consistent_norm_and_init_magnitude(lp, mixed):
    c = lp_case(lp, mixed)
    n = F.column_norm(c["W0"], c["A"], c["B"], c["s"])
    n32 = F.column_norm(up(c["W0"]), up(c["A"]), up(c["B"]), c["s"])
    same_bits(n, n32)
    same_bits(F.init_magnitude(c["W0"], c["A"], c["B"], c["s"]), n32.astype(c["A"].dtype))


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_consistent_merge_unmerge_are_float32_rounded_once(lp, mixed):
    c = lp_case(lp, mixed)
    Wm, n = F.merge(c["W0"], c["A"], c["B"], c["m"], c["s"])
    assert n.dtype == c["m"].dtype
    if mixed:
        Wm32, n32 = F.merge(up(c["W0"]), up(c["A"]), up(c["B"]), up(c["m"]), c["s"])
        same_bits(n, n32)
    else:  # the norm rounded to the magnitude's dtype, then the float32 formula
        n_f32 = F.column_norm(up(c["W0"]), up(c["A"]), up(c["B"]), c["s"])
        same_bits(n, n_f32.astype(lp))
        V = up(c["W0"]) + c["s"] * (up(c["B"]) @ up(c["A"]))
        Wm32 = (up(c["m"]) / up(n))[:, None] * V
    same_bits(Wm, Wm32.astype(lp))
    W0 = F.unmerge(Wm, c["A"], c["B"], c["m"], c["s"], n)
    W0_32 = F.unmerge(up(Wm), up(c["A"]), up(c["B"]), up(c["m"]), c["s"], up(n))
    same_bits(W0, W0_32.astype(lp))


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_consistent_lora_is_float32_rounded_once(lp, mixed):
    c = lp_case(lp, mixed)
    dy = np.random.default_rng(2).standard_normal((7, 24)).astype(lp)
    y, ctx = F.lora_forward(c["x"], c["W0"], c["A"], c["B"], c["s"], c["b"])
    y32, ctx32 = F.lora_forward(up(c["x"]), up(c["W0"]), up(c["A"]), up(c["B"]), c["s"], up(c["b"]))
    same_bits(y, y32.astype(lp))
    g, g32 = F.lora_backward(dy, ctx), F.lora_backward(up(dy), ctx32)
    same_bits(g.dx, g32.dx.astype(lp))
    same_bits(g.dA, g32.dA.astype(c["A"].dtype))
    same_bits(g.dB, g32.dB.astype(c["A"].dtype))
    with pytest.raises(ValueError, match="policy='peft' is defined for DoRA"):
        F.lora_forward(c["x"], c["W0"], c["A"], c["B"], c["s"], policy="peft")


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_consistent_policy_untrained_layer_is_the_base_layer(lp, mixed):
    """B = 0: g == 1 exactly and y == lp(f32(x) @ f32(W0).T + b), bit for bit."""
    for bias in (True, False):
        c = lp_case(lp, mixed, trained=False, bias=bias, seed=11)
        m = F.init_magnitude(c["W0"], c["A"], c["B"], c["s"])
        y, ctx = F.dora_forward(c["x"], c["W0"], c["A"], c["B"], m, c["s"], c["b"])
        assert (ctx.g == 1).all()
        base = up(c["x"]) @ up(c["W0"]).T
        if bias:
            base += up(c["b"])
        same_bits(y, base.astype(lp))


@pytest.mark.parametrize("policy", ["consistent", "peft"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_policy_changes_nothing_for_float32_and_float64(dtype, policy):
    c = {k: (None if v is None else (v.astype(np.float32).astype(dtype) if hasattr(v, "astype") else v))
         for k, v in lp_case(FP16, True).items()}
    args = (c["x"], c["W0"], c["A"], c["B"], c["m"], c["s"], c["b"])
    y0, ctx0 = F.dora_forward(*args)
    y1, ctx1 = F.dora_forward(*args, policy=policy)
    same_bits(y0, y1)
    for a, b in zip(F.dora_backward(y0, ctx0), F.dora_backward(y0, ctx1)):
        same_bits(a, b)
    for a, b in zip(F.merge(*args[1:6]), F.merge(*args[1:6], policy=policy)):
        same_bits(a, b)
    same_bits(F.init_magnitude(*args[1:4], c["s"]),
              F.init_magnitude(*args[1:4], c["s"], policy=policy))


def test_fp16_output_past_the_range_is_refused_not_returned():
    c = lp_case(FP16, True)
    x = np.full_like(c["x"], 6e4)
    with pytest.raises(ValueError, match=r"y \(the output\).*overflowed float16"):
        F.dora_forward(x, c["W0"], c["A"], c["B"], c["m"], c["s"], c["b"])


def test_pure_lp_adapter_changed_in_place_before_backward_raises():
    c = lp_case(BF16, False)
    y, ctx = F.dora_forward(c["x"], c["W0"], c["A"], c["B"], c["m"], c["s"])
    c["A"][0, 0] += 1
    with pytest.raises(RuntimeError, match=r"A \(lora_A\) changed in place"):
        F.dora_backward(y, ctx)


def test_low_precision_kernels_fall_back_to_numpy_without_the_capability():
    from dora_ref.core import kernels_numpy

    assert kernels_numpy.LOW_PRECISION is True
    k = backend.low_precision_kernels()
    if getattr(backend.kernels(), "LOW_PRECISION", False):
        assert k is backend.kernels()
    else:
        assert k is kernels_numpy


@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_numpy_twins_accept_lp_and_equal_the_float32_kernel_rounded_once(lp):
    from dora_ref.core import kernels_numpy as K

    c = lp_case(lp, True, out_f=300, in_f=1000)  # several row blocks
    A, B, m, s = c["A"], c["B"], c["m"], c["s"]
    same_bits(K.column_norm(c["W0"], A, B, s), K.column_norm(up(c["W0"]), A, B, s))
    Wm, n = K.merge(c["W0"], A, B, m, s)
    Wm32, n32 = K.merge(up(c["W0"]), A, B, m, s)
    same_bits(n, n32)
    same_bits(Wm, Wm32.astype(lp))
    f = m / n
    same_bits(K.unmerge(Wm, A, B, f, s), K.unmerge(up(Wm), A, B, f, s).astype(lp))


# ---------------------------------------------------------------------------
# "peft": the init quirk, from its formula
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_peft_policy_reproduces_magnitude_rounded_at_init(lp):
    """PEFT computes m in lp before upcasting the adapter: m = lp(n), g = m / n != 1 (|g-1| <= u).

    With lp adapters (PEFT's autocast_adapter_dtype=False) the forward's norm is
    rounded to lp too and g == 1 exactly.
    """
    u = unit_roundoff(lp)
    c = lp_case(lp, True, trained=False, out_f=64, seed=4)
    m = F.init_magnitude(c["W0"], c["A"], c["B"], c["s"], policy="peft")
    n = F.column_norm(c["W0"], c["A"], c["B"], c["s"], policy="peft")
    assert m.dtype == F32 and n.dtype == F32
    same_bits(m, n.astype(lp).astype(np.float32))
    _, ctx = F.dora_forward(c["x"], c["W0"], c["A"], c["B"], m, c["s"], policy="peft")
    dev = np.abs(ctx.g.astype(np.float64) - 1)
    assert (dev > 0).mean() > 0.5 and dev.max() <= u * (1 + 2.0**-20)
    cp = lp_case(lp, False, trained=False, out_f=64, seed=4)
    mp = F.init_magnitude(cp["W0"], cp["A"], cp["B"], cp["s"], policy="peft")
    _, ctxp = F.dora_forward(cp["x"], cp["W0"], cp["A"], cp["B"], mp, cp["s"], policy="peft")
    assert mp.dtype == lp and (ctxp.g == 1).all()


# ---------------------------------------------------------------------------
# conv and embedding under "consistent"
# ---------------------------------------------------------------------------


def conv_case(lp, mixed, trained=True, seed=0):
    rng = np.random.default_rng(seed)
    ad = F32 if mixed else lp
    rep = lambda a: a.astype(lp).astype(ad)  # noqa: E731
    W = (rng.standard_normal((6, 3, 3, 3)) * 0.5).astype(lp)
    A = rep(rng.standard_normal((4, 3, 3, 3)) * 0.3)
    B = rep(rng.standard_normal((6, 4, 1, 1)) * 0.3) if trained else np.zeros((6, 4, 1, 1), ad)
    m = rep(1 + rng.random((1, 6, 1, 1)))
    x = rng.standard_normal((2, 3, 5, 5)).astype(lp)
    b = (rng.standard_normal(6) * 0.1).astype(lp)
    return x, W, A, B, m, b


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_consistent_conv_is_float32_rounded_once(lp, mixed):
    from dora_ref.core import conv as C

    x, W, A, B, m, b = conv_case(lp, mixed)
    s = 2.5
    y, ctx = C.conv_dora_forward(x, W, A, B, m, s, b, padding=1)
    n = C.conv_column_norm(up(W), up(A), up(B), s)
    if not mixed:
        n = n.astype(lp).astype(np.float32)
    y32, ctx32 = C.conv_dora_forward(up(x), up(W), up(A), up(B), up(m), s, up(b), padding=1,
                                     weight_norm=n)
    same_bits(y, y32.astype(lp))
    dy = np.random.default_rng(3).standard_normal(y.shape).astype(lp)
    g, g32 = C.conv_dora_backward(dy, ctx), C.conv_dora_backward(up(dy), ctx32)
    same_bits(g.dx, g32.dx.astype(lp))  # col2im summed in float32, then one rounding
    for got, want in zip(g[1:], g32[1:]):
        same_bits(got, want.astype(A.dtype))
    Wm, n_m = C.conv_merge(W, A, B, m, s)
    W_back = C.conv_unmerge(Wm, A, B, m, s, n_m)
    assert Wm.dtype == lp and W_back.dtype == lp and n_m.dtype == m.dtype
    if mixed:
        Wm32, n32 = C.conv_merge(up(W), up(A), up(B), up(m), s)
        same_bits(Wm, Wm32.astype(lp))
        same_bits(W_back, C.conv_unmerge(up(Wm), up(A), up(B), up(m), s, n32).astype(lp))


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_consistent_policy_untrained_conv_and_embedding_are_the_base_layer(lp, mixed):
    """B = 0 (conv) / A = 0 (embedding, PEFT's init): g == 1, y is the base layer's, bitwise."""
    from dora_ref.core import conv as C
    from dora_ref.core import embedding as E
    from dora_ref.core.im2col import conv_nd

    x, W, A, B, _, b = conv_case(lp, mixed, trained=False, seed=5)
    m = C.conv_init_magnitude(W, A, B, 2.5)
    y, ctx = C.conv_dora_forward(x, W, A, B, m, 2.5, b, padding=1)
    assert (ctx.linear.g == 1).all()
    same_bits(y, conv_nd(up(x), up(W), up(b), padding=1).astype(lp))

    rng = np.random.default_rng(6)
    ad = F32 if mixed else lp
    table = rng.standard_normal((40, 24)).astype(lp)
    A_e = np.zeros((4, 40), ad)
    B_e = rng.standard_normal((24, 4)).astype(lp).astype(ad)
    m_e = E.embedding_init_magnitude(table, A_e, B_e, 2.5)
    ids = rng.integers(0, 40, (3, 7))
    y_e, ctx_e = E.embedding_dora_forward(ids, table, A_e, B_e, m_e, 2.5)
    assert (ctx_e.g == 1).all()
    same_bits(y_e, table[ids])


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_consistent_embedding_is_float32_rounded_once(lp, mixed):
    from dora_ref.core import embedding as E

    rng = np.random.default_rng(8)
    ad = F32 if mixed else lp
    table = rng.standard_normal((40, 24)).astype(lp)
    A = (rng.standard_normal((4, 40)) * 0.2).astype(lp).astype(ad)
    B = (rng.standard_normal((24, 4)) * 0.2).astype(lp).astype(ad)
    m = (1 + rng.random(24)).astype(lp).astype(ad)
    ids = rng.integers(0, 40, (3, 7))
    n = E.embedding_column_norm(up(table), up(A), up(B), 2.5)
    same_bits(E.embedding_column_norm(table, A, B, 2.5), n)
    if not mixed:
        n = n.astype(lp).astype(np.float32)
    y, ctx = E.embedding_dora_forward(ids, table, A, B, m, 2.5)
    y32, ctx32 = E.embedding_dora_forward(ids, up(table), up(A), up(B), up(m), 2.5, weight_norm=n)
    same_bits(y, y32.astype(lp))
    dy = rng.standard_normal(y.shape).astype(lp)
    for detach in (True, False):
        for got, want in zip(E.embedding_dora_backward(dy, ctx, detach_norm=detach),
                             E.embedding_dora_backward(up(dy), ctx32, detach_norm=detach)):
            same_bits(got, want.astype(ad))


# ---------------------------------------------------------------------------
# layers and optimisers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_dora_linear_layer_low_precision(lp, autocast):
    from dora_ref import DoRALinear

    rng = np.random.default_rng(0)
    W = rng.standard_normal((24, 40)).astype(lp)
    b = (rng.standard_normal(24) * 0.1).astype(lp)
    x = rng.standard_normal((7, 40)).astype(lp)
    ad = F32 if autocast else lp
    layer = DoRALinear(W, b, r=4, lora_alpha=10, rng=1, autocast_adapter_dtype=autocast)
    assert layer.lora_A.dtype == ad and layer.lora_magnitude_vector.dtype == ad
    if autocast:  # "consistent" keeps the float32 draw
        assert (layer.lora_A.astype(lp).astype(np.float32) != layer.lora_A).any()
    y = layer(x)  # untrained: the base layer, bit for bit
    same_bits(y, (up(x) @ up(W).T + up(b)).astype(lp))
    peft_layer = DoRALinear(W, b, r=4, lora_alpha=10, rng=1, policy="peft",
                            autocast_adapter_dtype=autocast)
    A = peft_layer.lora_A  # PEFT: drawn in float32, cast to lp
    same_bits(A, A.astype(lp).astype(ad))
    np.testing.assert_array_equal(up(A), up(layer.lora_A.astype(lp)))
    same_bits(peft_layer.lora_magnitude_vector,
              F.init_magnitude(W, A, peft_layer.lora_B, peft_layer.scaling, policy="peft"))

    # training forward == functional; eval (cached norm) == training; merge round trip
    layer.lora_B[...] = (rng.standard_normal((24, 4)) * 0.1).astype(lp).astype(ad)
    y_train = layer(x)
    y_fun, _ = F.dora_forward(x, W, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                              layer.scaling, b)
    same_bits(y_train, y_fun)
    dx = layer.backward(np.ones_like(y_train))
    assert dx.dtype == lp and layer.grads["lora_A"].dtype == ad
    layer.eval()
    same_bits(layer(x), y_train)
    same_bits(layer(x), y_train)  # from the cache
    layer.merge()
    Wm, _ = F.merge(W, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling)
    same_bits(layer.weight, Wm)
    same_bits(layer(x), (up(x) @ up(Wm).T + up(b)).astype(lp))
    from dora_ref.layers.optim import SGD

    with pytest.raises(ValueError, match="read-only"):  # merged: the adapter is locked
        SGD(layer.parameters(), lr=0.1)
    layer.unmerge()
    assert layer.weight.dtype == lp


def test_lora_linear_refuses_the_peft_policy_on_low_precision():
    from dora_ref import LoRALinear

    with pytest.raises(ValueError, match="policy='peft' is defined for DoRA layers"):
        LoRALinear(np.zeros((3, 4), BF16), r=2, policy="peft")


@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_optimiser_step_on_pure_lp_parameters_is_float32_rounded_once(lp):
    from dora_ref.layers.optim import SGD, AdamW

    rng = np.random.default_rng(2)
    for make in (lambda p: AdamW(p, lr=1e-2), lambda p: SGD(p, lr=0.1, momentum=0.9)):
        p_lp = {"a": rng.standard_normal(50).astype(lp)}
        p_32 = {"a": up(p_lp["a"])}
        opt_lp, opt_32 = make(p_lp), make(p_32)
        for _ in range(3):
            g = rng.standard_normal(50).astype(lp)
            opt_lp.step({"a": g})
            opt_32.step({"a": up(g)})
            same_bits(p_lp["a"], p_32["a"].astype(lp))
            p_32["a"][...] = up(p_lp["a"])  # the float32 twin continues from the rounded value


@pytest.mark.parametrize("autocast", [True, False], ids=["mixed", "pure"])
@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_conv_and_embedding_layers_low_precision(lp, autocast):
    """Untrained layers are the base layer (consistent); eval cache and merge as the functions."""
    from dora_ref import DoRAConv2d, DoRAEmbedding, LoRAConv2d
    from dora_ref.core import conv as C
    from dora_ref.core import embedding as E
    from dora_ref.core.im2col import conv_nd

    rng = np.random.default_rng(3)
    ad = F32 if autocast else lp
    W = (rng.standard_normal((6, 3, 3, 3)) * 0.5).astype(lp)
    b = (rng.standard_normal(6) * 0.1).astype(lp)
    x = rng.standard_normal((2, 3, 5, 5)).astype(lp)
    layer = DoRAConv2d(W, b, r=4, padding=1, rng=0, autocast_adapter_dtype=autocast)
    assert layer.lora_A.dtype == ad and layer.lora_magnitude_vector.dtype == ad
    same_bits(layer(x), conv_nd(up(x), up(W), up(b), padding=1).astype(lp))
    layer.lora_B[...] = (rng.standard_normal(layer.lora_B.shape) * 0.2).astype(lp).astype(ad)
    y = layer(x)
    y_fun, _ = C.conv_dora_forward(x, W, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                                   layer.scaling, b, padding=1)
    same_bits(y, y_fun)
    layer.eval()
    same_bits(layer(x), y)
    layer.merge()
    Wm, _ = C.conv_merge(W, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.scaling)
    same_bits(layer.weight, Wm)
    layer.unmerge()
    lora = LoRAConv2d(W, b, r=4, padding=1, rng=0, autocast_adapter_dtype=autocast)
    same_bits(lora(x), conv_nd(up(x), up(W), up(b), padding=1).astype(lp))

    table = rng.standard_normal((40, 24)).astype(lp)
    ids = rng.integers(0, 40, (3, 7))
    emb = DoRAEmbedding(table, r=4, rng=0, autocast_adapter_dtype=autocast)
    assert emb.lora_embedding_B.dtype == ad
    same_bits(emb(ids), table[ids])
    emb_peft = DoRAEmbedding(table, r=4, rng=0, policy="peft", autocast_adapter_dtype=autocast)
    same_bits(emb_peft.lora_magnitude_vector,
              E.embedding_init_magnitude(table, emb_peft.lora_embedding_A,
                                         emb_peft.lora_embedding_B, emb_peft.scaling,
                                         policy="peft"))
    conv_peft = DoRAConv2d(W, b, r=4, padding=1, rng=0, policy="peft",
                           autocast_adapter_dtype=autocast)
    same_bits(conv_peft.lora_A, conv_peft.lora_A.astype(lp).astype(ad))


@pytest.mark.parametrize("lp", LP, ids=LP_IDS)
def test_low_precision_norm_and_merge_make_no_float32_copy_of_the_weight(lp):
    """The twins upcast one row block at a time: the peak does not grow with W0.

    A block holds ``_BLOCK_BYTES`` of lp rows (1 MiB); its temporaries are
    the float32 upcast (2 blocks), s * B @ A (2), V (2) and V in float64 for
    the squares (4): at most 10 blocks, whatever the size of W0; 12 allowed.
    W0 is 32 MiB, so a float32 copy (64 MiB) could not hide under that; the
    merge adds its lp output, W0.nbytes.
    """
    import tracemalloc

    from dora_ref.core.kernels_numpy import _BLOCK_BYTES

    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((4096, 4096), dtype=np.float32).astype(lp)
    A = rng.standard_normal((8, 4096), dtype=np.float32) * 0.01
    B = rng.standard_normal((4096, 8), dtype=np.float32) * 0.01
    m = np.ones(4096, np.float32)
    blocks = 12 * _BLOCK_BYTES
    for f, budget in ((lambda: F.column_norm(W0, A, B, 2.0), blocks),
                      (lambda: F.merge(W0, A, B, m, 2.0), W0.nbytes + blocks)):
        tracemalloc.start()
        f()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < budget, (peak / _BLOCK_BYTES)


@pytest.mark.parametrize("policy", ["consistent", "peft"])
def test_fp16_merge_past_the_range_is_refused_naming_the_row(policy):
    """A float32 magnitude past float16's range (65504) overflows the rounded W': refused.

    (With an lp magnitude |W'_ij| <= |m_i| (1 + a few u) cannot pass the range.)
    """
    from dora_ref.core._validate import NonFiniteWeightError

    c = lp_case(FP16, True, trained=False)  # B = 0: V = W0
    W0 = c["W0"].copy()
    W0[3] = 0
    W0[3, 0] = 1  # row 3's norm is carried by one entry: W'_30 ~ m_3
    m = c["m"].copy()
    m[3] = 1e5
    with pytest.raises(NonFiniteWeightError, match=r"merged weight.*output channel\(s\) \[3\]"):
        F.merge(W0, c["A"], c["B"], m, c["s"], policy=policy)


def test_dora_ref_imports_ml_dtypes_only_when_a_bfloat16_array_appears():
    """float16 needs only NumPy: dora_ref's precision rules never import ml_dtypes themselves."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "import dora_ref\n"
        "from dora_ref.core import precision\n"
        "W0 = np.ones((3, 4), np.float16); A = np.ones((2, 4), np.float32)\n"
        "B = np.ones((3, 2), np.float32); m = np.ones(3, np.float32)\n"
        "dora_ref.merge(W0, A, B, m, 1.0); dora_ref.dora_forward(W0, W0, A, B, m, 1.0)\n"
        "assert np.dtype(np.float16) in precision.LOW_PRECISION_DTYPES\n"
        "assert np.dtype(np.float32) not in precision.LOW_PRECISION_DTYPES\n"
        "print('ml_dtypes' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    assert [d.name for d in precision.LOW_PRECISION_DTYPES] == ["float16", "bfloat16"]


def test_peft_policy_refuses_grouped_low_precision_convolutions():
    from dora_ref.core import conv as C

    W = np.zeros((4, 1, 3, 3), FP16)
    A = np.zeros((4, 2, 3, 3), F32)
    B = np.zeros((4, 2, 1, 1), F32)
    with pytest.raises(ValueError, match="policy='peft' with groups=2"):
        C.conv_init_magnitude(W, A, B, 1.0, groups=2, policy="peft")
    C.conv_init_magnitude(W + np.float16(1), A, B, 1.0, groups=2)  # "consistent" works
