"""DoRA/LoRA convolutions: forward against a direct summation, gradients against
float64 finite differences (exact and detached), merge/unmerge, shapes, errors.

Independent computations used here: ``direct_conv`` (a loop over output
positions, no im2col), norms by ``np.linalg.norm`` of the dense kernel, and
``dora_ref.porting.gradcheck`` (central differences; its docstring derives rtol 1e-6).
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_ref import conv as C
from dora_ref.porting.gradcheck import gradcheck
from dora_ref.porting.tolerance import assert_close


# ---------------------------------------------------------------------------
# independent definitions
# ---------------------------------------------------------------------------


def direct_conv(x, W, stride, pad, dilation, groups):
    """y[n, o, l] = sum_{c in group(o), j} xpad[n, c, l*stride + j*dilation] W[o, c, j], looped."""
    d = W.ndim - 2
    N, cin = x.shape[:2]
    out, cg, k = W.shape[0], W.shape[1], W.shape[2:]
    og = out // groups
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple((p, p) for p in pad))
    L_out = tuple(
        (xp.shape[2 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(d)
    )
    y = np.zeros((N, out, *L_out))
    for o in range(out):
        c0 = (o // og) * cg
        for pos in np.ndindex(*L_out):
            idx = tuple(
                slice(pos[i] * stride[i], pos[i] * stride[i] + dilation[i] * (k[i] - 1) + 1, dilation[i])
                for i in range(d)
            )
            patch = xp[(slice(None), slice(c0, c0 + cg)) + idx]  # (N, cg, *k)
            y[(slice(None), o) + pos] = np.sum(patch * W[o], axis=tuple(range(1, d + 2)))
    return y


def dense_adapted_kernel(W, A, B, s, groups):
    """V = blockdiag(W) + s * B_full @ A as a dense (out, in, *k) kernel, built by loops."""
    out, cg = W.shape[:2]
    r = A.shape[0]
    og, rg = out // groups, r // groups
    V = np.zeros((out, cg * groups, *W.shape[2:]))
    for o in range(out):
        j = o // og
        V[o, j * cg : (j + 1) * cg] = W[o]
        for c in range(rg):
            V[o] += s * B[o, c].item() * A[j * rg + c]
    return V


# ---------------------------------------------------------------------------
# random cases
# ---------------------------------------------------------------------------


@st.composite
def conv_cases(draw, max_d=3):
    """A small random convolution: geometry, groups, rank, shapes."""
    d = draw(st.integers(1, max_d))
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, 2))
    out = groups * draw(st.integers(1, 2))
    r = groups * draw(st.integers(1, 2))
    kmax = 3 if d < 3 else 2
    k = tuple(draw(st.integers(1, kmax)) for _ in range(d))
    if d == 3 and draw(st.booleans()):
        k = (1, 1, draw(st.integers(2, 3)))  # the (1, 1, k) kernel PEFT's merge crashed on
    stride = tuple(draw(st.integers(1, 2)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    pad = tuple(draw(st.integers(0, 1)) for _ in range(d))
    L = tuple(
        dl * (ki - 1) + 1 - 2 * p + draw(st.integers(0, 3 if d < 3 else 1))
        for ki, dl, p in zip(k, dilation, pad)
    )
    L = tuple(max(1, v) for v in L)
    N = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31))
    return dict(d=d, groups=groups, cin=cin, out=out, r=r, k=k, stride=stride,
                dilation=dilation, pad=pad, L=L, N=N, seed=seed)


def make_arrays(c, dtype=np.float64, with_bias=True):
    rng = np.random.default_rng(c["seed"])
    W = rng.standard_normal((c["out"], c["cin"] // c["groups"], *c["k"]))
    A = rng.standard_normal((c["r"], c["cin"], *c["k"])) / math.sqrt(W[0].size)
    B = rng.standard_normal((c["out"], c["r"] // c["groups"]) + (1,) * c["d"])
    m = 1.0 + 0.3 * rng.standard_normal((1, c["out"]) + (1,) * c["d"])
    b = rng.standard_normal(c["out"]) if with_bias else None
    x = rng.standard_normal((c["N"], c["cin"], *c["L"]))
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    return tuple(cast(a) for a in (x, W, A, B, m, b)) + (rng,)


def geom_kwargs(c):
    return dict(stride=c["stride"], padding=c["pad"], dilation=c["dilation"], groups=c["groups"])


# ---------------------------------------------------------------------------
# the convolution itself
# ---------------------------------------------------------------------------


@given(conv_cases())
def test_conv_nd_matches_direct_summation(c):
    x, W, _, _, _, b, _ = make_arrays(c)
    y = C.conv_nd(x, W, b, **geom_kwargs(c))
    expected = direct_conv(x, W, c["stride"], c["pad"], c["dilation"], c["groups"])
    expected += b.reshape((1, -1) + (1,) * c["d"])
    k = W[0].size
    assert_close(y, expected, k=k + 1, scale=np.abs(x).max() * np.abs(W).max() * k + np.abs(b).max())


@given(conv_cases())
def test_col2im_is_the_adjoint_of_im2col(c):
    """<im2col(x), R> == <x, col2im(R)> for all x, R: col2im is im2col's transpose."""
    x, W, *_, rng = make_arrays(c)
    geom = C.ConvGeometry.make(W.shape[2:], c["stride"], c["pad"], c["dilation"], c["groups"])
    P, _ = C.im2col(x, geom)
    R = rng.standard_normal(P.shape)
    lhs, rhs = np.sum(P * R), np.sum(x * C.col2im(R, x.shape, geom))
    assert_close(lhs, rhs, k=P.size, scale=float(np.sum(np.abs(P * R))))


def test_padding_same_keeps_the_length_and_matches_explicit_padding():
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((1, 2, 9)), rng.standard_normal((3, 2, 4))  # even kernel: 3 zeros to add
    y = C.conv_nd(x, W, padding="same", dilation=1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2)))  # torch puts the odd zero on the right
    assert y.shape == (1, 3, 9)
    assert_close(y, C.conv_nd(xp, W), k=8)


# ---------------------------------------------------------------------------
# DoRA forward against the definition
# ---------------------------------------------------------------------------


@given(conv_cases())
def test_dora_forward_matches_the_dense_definition(c):
    """y = (m / ||V_o||) * conv(x, V) + b with V the dense adapted kernel (groups = 1 conv)."""
    x, W, A, B, m, b, _ = make_arrays(c)
    s = 0.7
    y, _ = C.conv_dora_forward(x, W, A, B, m, s, b, **geom_kwargs(c))
    V = dense_adapted_kernel(W, A, B, s, c["groups"])
    n = np.linalg.norm(V.reshape(V.shape[0], -1), axis=1)
    z = direct_conv(x, V, c["stride"], c["pad"], c["dilation"], 1)
    bc = (1, -1) + (1,) * c["d"]
    expected = (m.reshape(-1) / n).reshape(bc) * z + b.reshape(bc)
    k = V[0].size + c["r"]
    scale = np.abs(x).max() * (np.abs(W).max() + s * np.abs(B).max() * np.abs(A).max() * c["r"]) * k
    assert_close(y, expected, k=k, scale=scale * np.abs(m).max() / n.min() + np.abs(b).max())


@given(conv_cases())
def test_norm_is_per_output_channel_over_in_and_kernel_and_stored_in_peft_shape(c):
    _, W, A, B, _, _, _ = make_arrays(c)
    m0 = C.conv_init_magnitude(W, A, np.zeros_like(B), 2.0, c["groups"])
    assert m0.shape == (1, c["out"]) + (1,) * c["d"]
    expected = np.linalg.norm(W.reshape(W.shape[0], -1), axis=1)  # over (in/groups, *k)
    assert_close(m0.reshape(-1), expected, k=W[0].size)


def test_dilated_lora_A_uses_the_base_dilation():
    """W0 + s * delta is one dilated kernel: the adapter's output is conv(x, delta, dilation)."""
    rng = np.random.default_rng(3)
    x, W = rng.standard_normal((1, 2, 11)), rng.standard_normal((3, 2, 3))
    A, B = rng.standard_normal((2, 2, 3)), rng.standard_normal((3, 2, 1))
    y, _ = C.conv_lora_forward(x, W, A, B, 0.5, dilation=3, padding=1)
    expected = C.conv_nd(x, W + C.conv_delta_weight(A, B, 0.5), dilation=3, padding=1)
    assert y.shape == (1, 3, 7)
    assert_close(y, expected, k=8)


# ---------------------------------------------------------------------------
# gradients: float64 central differences
# ---------------------------------------------------------------------------


def _check_conv_grads(c, detach_norm, dropout):
    x, W, A, B, m, b, rng = make_arrays(c)
    s = 1.3
    kw = geom_kwargs(c)
    mask = None
    if dropout:
        mask = (rng.random(x.shape) > 0.3) / 0.7
    y, ctx = C.conv_dora_forward(x, W, A, B, m, s, b, dropout_mask=mask, **kw)
    dy = rng.standard_normal(y.shape)
    g = C.conv_dora_backward(dy, ctx, detach_norm=detach_norm)
    assert g.dx.shape == x.shape and g.dA.shape == A.shape
    assert g.dB.shape == B.shape and g.dmagnitude.shape == m.shape
    # detached: the norm held at its value here, passed in as weight_norm
    n0 = None if not detach_norm else C.conv_column_norm(W, A, B, s, c["groups"])

    def loss(p):
        yy, _ = C.conv_dora_forward(p["x"], W, p["A"], p["B"], p["m"], s, b,
                                    dropout_mask=mask, weight_norm=n0, **kw)
        return float(np.sum(dy * yy))

    report = gradcheck(loss, {"x": x, "A": A, "B": B, "m": m},
                       {"x": g.dx, "A": g.dA, "B": g.dB, "m": g.dmagnitude})
    assert report.ok, str(report)


@settings(max_examples=25)
@given(conv_cases(), st.booleans(), st.booleans())
def test_gradients_match_finite_differences(c, detach_norm, dropout):
    _check_conv_grads(c, detach_norm, dropout)


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize(
    "case",
    [
        dict(d=2, k=(1, 1), groups=1, cin=3, out=4, r=2, L=(3, 4)),  # 1x1 kernel (PEFT's shortcut)
        dict(d=3, k=(1, 1, 3), groups=1, cin=2, out=3, r=2, L=(2, 2, 5)),  # peft#3768
        dict(d=2, k=(3, 3), groups=2, cin=4, out=4, r=2, L=(5, 5)),  # grouped
        dict(d=1, k=(3,), groups=4, cin=4, out=8, r=4, L=(7,)),  # depthwise, multiplier 2
    ],
    ids=["conv2d_1x1", "conv3d_1x1xk", "conv2d_groups2", "conv1d_depthwise"],
)
def test_named_shapes_peft_crashed_on(case, detach_norm):
    d = case["d"]
    c = dict(case, stride=(1,) * d, dilation=(1,) * d, pad=(1,) * d, N=2, seed=7)
    _check_conv_grads(c, detach_norm, dropout=False)
    x, W, A, B, m, b, _ = make_arrays(c)
    layer = _layer(c, W, b)
    y = layer(x)
    layer.eval().merge()
    _assert_merged_close(layer, x, y)


def test_exact_and_detached_gradients_differ_only_through_the_norm():
    """The detached A/B gradients miss the norm path; m and x gradients are the same."""
    c = dict(d=2, k=(3, 3), groups=1, cin=2, out=3, r=2, L=(5, 5), stride=(1, 1),
             dilation=(1, 1), pad=(0, 0), N=1, seed=11)
    x, W, A, B, m, b, rng = make_arrays(c)
    y, ctx = C.conv_dora_forward(x, W, A, B, m, 1.0, b)
    dy = rng.standard_normal(y.shape)
    exact = C.conv_dora_backward(dy, ctx, detach_norm=False)
    detached = C.conv_dora_backward(dy, ctx, detach_norm=True)
    np.testing.assert_array_equal(exact.dmagnitude, detached.dmagnitude)
    np.testing.assert_array_equal(exact.dx, detached.dx)
    assert np.abs(exact.dA - detached.dA).max() > 1e-3 * np.abs(exact.dA).max()


@given(conv_cases(max_d=2))
@settings(max_examples=15)
def test_lora_conv_gradients_match_finite_differences(c):
    x, W, A, B, _, b, rng = make_arrays(c)
    y, ctx = C.conv_lora_forward(x, W, A, B, 0.9, b, **geom_kwargs(c))
    dy = rng.standard_normal(y.shape)
    g = C.conv_lora_backward(dy, ctx)

    def loss(p):
        return float(np.sum(dy * C.conv_lora_forward(p["x"], W, p["A"], p["B"], 0.9, b,
                                                     **geom_kwargs(c))[0]))

    report = gradcheck(loss, {"x": x, "A": A, "B": B}, {"x": g.dx, "A": g.dA, "B": g.dB})
    assert report.ok, str(report)


# ---------------------------------------------------------------------------
# layers: init, merge, unmerge, training
# ---------------------------------------------------------------------------

LAYERS = {1: C.DoRAConv1d, 2: C.DoRAConv2d, 3: C.DoRAConv3d}


def _layer(c, W, b, cls=None, **kw):
    cls = cls or LAYERS[c["d"]]
    return cls(W, b, r=c["r"], lora_alpha=2 * c["r"], init_lora_weights=False, rng=c["seed"],
               **geom_kwargs(c), **kw)


def _assert_merged_close(layer, x, y_unmerged):
    """Merged and unmerged compute the same conv; bound by the sum of |terms|."""
    y = layer(x)
    geom = layer.geometry
    P, _ = C.im2col(x, C.ConvGeometry(geom.kernel_size, geom.stride, geom.padding,
                                      geom.dilation, 1))
    Wd = np.abs(layer.weight.reshape(layer.out_channels, -1))
    if Wd.shape[1] != P.shape[1]:  # groups > 1 and not merged
        Wd = np.abs(C.grouped_to_dense(layer.weight, layer.groups).reshape(layer.out_channels, -1))
    scale = float((np.abs(P) @ Wd.T).max()) * 2 + (0 if layer.bias is None else np.abs(layer.bias).max())
    assert_close(y, y_unmerged, k=P.shape[1] + layer.r, scale=scale)


@given(conv_cases())
@settings(max_examples=25)
def test_merged_equals_unmerged_and_unmerge_restores_the_base(c):
    x, W, _, _, _, b, _ = make_arrays(c)
    layer = _layer(c, W, b).eval()
    layer.lora_magnitude_vector *= 1.1  # a trained-looking magnitude
    y = layer(x)
    layer.merge()
    assert layer.weight.shape == (c["out"], c["cin"], *c["k"])  # dense when grouped
    _assert_merged_close(layer, x, y)
    layer.unmerge()
    assert layer.weight.shape == W.shape
    delta = np.abs(C.conv_delta_weight(layer.lora_A, layer.lora_B, layer.scaling, c["groups"]))
    scale = np.abs(W).max() + delta.max()
    assert_close(layer.weight, W, k=c["r"] + 4, scale=scale)
    assert_close(layer(x), y, k=W[0].size * c["groups"] + c["r"], scale=np.abs(y).max() * 10)


@given(conv_cases())
@settings(max_examples=20)
def test_lora_conv_merge_roundtrip(c):
    x, W, _, _, _, b, _ = make_arrays(c)
    cls = {1: C.LoRAConv1d, 2: C.LoRAConv2d, 3: C.LoRAConv3d}[c["d"]]
    layer = _layer(c, W, b, cls=cls)
    y = layer(x)
    layer.merge()
    _assert_merged_close(layer, x, y)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight, W, rtol=0, atol=8 * np.finfo(float).eps * (np.abs(W).max() + 1))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_default_init_is_the_base_layer_in_peft_shapes(d):
    rng = np.random.default_rng(d)
    W, b = rng.standard_normal((4, 2) + (3,) * d), rng.standard_normal(4)
    layer = LAYERS[d](W, b, r=2, padding=1, groups=2, rng=0)
    assert layer.lora_A.shape == (2, 4) + (3,) * d
    assert layer.lora_B.shape == (4, 1) + (1,) * d
    assert layer.lora_magnitude_vector.shape == (1, 4) + (1,) * d
    assert not layer.lora_B.any()
    x = rng.standard_normal((2, 4) + (5,) * d)
    np.testing.assert_allclose(layer(x), C.conv_nd(x, W, b, padding=1, groups=2), rtol=1e-13, atol=1e-13)
    bound = 1 / math.sqrt(4 * 3**d)  # nn.ConvNd's init of lora_A: fan_in = in * prod(k)
    assert np.abs(layer.lora_A).max() <= bound


def test_layer_training_step_accumulates_and_lowers_the_loss():
    from dora_ref.layers.optim import SGD

    rng = np.random.default_rng(5)
    W = rng.standard_normal((3, 2, 3, 3))
    layer = C.DoRAConv2d(W, None, r=2, lora_alpha=4, padding=1, rng=0)
    x = rng.standard_normal((4, 2, 6, 6))
    target = rng.standard_normal((4, 3, 6, 6))
    opt = SGD(layer.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        y = layer(x)
        losses.append(0.5 * np.sum((y - target) ** 2))
        layer.zero_grad()
        layer.backward(y - target)
        opt.step(layer.grads)
    assert losses[-1] < losses[0]
    layer.zero_grad()
    y = layer(x)
    layer.backward(y - target)
    g1 = {k: v.copy() for k, v in layer.grads.items()}
    layer(x)
    layer.backward(y - target)
    for k in g1:
        np.testing.assert_allclose(layer.grads[k], 2 * g1[k], rtol=1e-12, atol=0)


def test_float32_agrees_with_float64_within_the_float32_bound():
    c = dict(d=2, k=(3, 3), groups=1, cin=3, out=4, r=2, L=(6, 6), stride=(2, 1),
             dilation=(1, 2), pad=(1, 1), N=2, seed=3)
    x, W, A, B, m, b, _ = make_arrays(c)
    y64, _ = C.conv_dora_forward(x, W, A, B, m, 0.5, b, **geom_kwargs(c))
    f32 = [a.astype(np.float32) for a in (x, W, A, B, m, b)]
    y32, _ = C.conv_dora_forward(*f32[:5], 0.5, f32[5], **geom_kwargs(c))
    assert y32.dtype == np.float32
    k = 3 * 9 + 2
    scale = float((np.abs(C.im2col(x, C.ConvGeometry.make((3, 3), (2, 1), 1, (1, 2)))[0])
                   @ np.abs(W.reshape(4, -1)).T).max()) * 2
    assert_close(y32, y64, dtype=np.float32, k=k, scale=scale)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 2, 3, 3))
    x = rng.standard_normal((1, 4, 5, 5))
    A, B = rng.standard_normal((2, 4, 3, 3)), rng.standard_normal((4, 1, 1, 1))
    m = np.ones((1, 4, 1, 1))
    with pytest.raises(ValueError, match="rank r = 3 must be a positive multiple of groups = 2"):
        C.conv_dora_forward(x, W, rng.standard_normal((3, 4, 3, 3)), B, m, 1.0, groups=2)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(r, in, \*k\)"):
        C.conv_dora_forward(x, W, A[:, :2], B, m, 1.0, groups=2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, in, L1, L2\) with in = 4, got \(1, 3, 5, 5\)"):
        C.conv_dora_forward(x[:, :3], W, A, B, m, 1.0, groups=2)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(out,\) = \(4,\) or PEFT's"):
        C.conv_dora_forward(x, W, A, B, np.ones(3), 1.0, groups=2)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        C.conv_dora_forward(x, W, A, B, m, 1.0, groups=2, padding="same", stride=2)
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        C.conv_dora_forward(x, W, A, B, m, 1.0, groups=2, dilation=0)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        C.conv_dora_forward(x[..., :2, :2], W, A, B, m, 1.0, groups=2)
    with pytest.raises(TypeError, match="x has dtype float32"):
        C.conv_dora_forward(x.astype(np.float32), W, A, B, m, 1.0, groups=2)
    with pytest.raises(ValueError, match="r must be a positive multiple of groups = 2"):
        C.DoRAConv2d(W, groups=2, r=3)
    y, ctx = C.conv_dora_forward(x, W, A, B, m, 1.0, groups=2)
    with pytest.raises(ValueError, match=r"dy must have the forward output's shape \(1, 4, 3, 3\)"):
        C.conv_dora_backward(y[..., :2], ctx)
    layer = C.DoRAConv2d(W, groups=2, r=2)
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(y)


def test_eval_norm_cache_is_reused_and_follows_in_place_updates():
    rng = np.random.default_rng(9)
    W = rng.standard_normal((3, 2, 3))
    layer = C.DoRAConv1d(W, None, r=2, padding=1, init_lora_weights=False, rng=0).eval()
    x = rng.standard_normal((2, 2, 6))
    layer(x)
    n_first = layer._norm_cache._entry[4]
    layer(x)
    assert layer._norm_cache._entry[4] is n_first  # reused, not recomputed
    layer.lora_B += 0.5  # an in-place optimiser step
    y = layer(x)
    expected, _ = C.conv_dora_forward(x, W, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                                      layer.scaling, padding=1)
    np.testing.assert_array_equal(y, expected)


# ---------------------------------------------------------------------------
# regressions: the layer owns its frozen base; optimisers, dtypes, eval dropout
# ---------------------------------------------------------------------------


def test_layer_owns_its_base_weight_so_writes_to_the_callers_array_do_not_stale_the_eval_norm():
    """Reviewer repro: ``W *= 3`` after ``DoRAConv1d(W)`` made eval and train differ by 13.9."""
    rng = np.random.default_rng(11)
    W, b = rng.standard_normal((3, 2, 3)), rng.standard_normal(3)
    x = rng.standard_normal((2, 2, 6))
    layer = C.DoRAConv1d(W, b, r=2, padding=1, init_lora_weights=False, rng=0).eval()
    y_eval = layer(x)  # fills the eval norm cache
    W0, b0 = W.copy(), b.copy()
    W *= 3.0
    b += 1.0
    assert not np.shares_memory(layer.weight, W) and not layer.weight.flags.writeable
    np.testing.assert_array_equal(layer.weight, W0)
    np.testing.assert_array_equal(layer.bias, b0)
    np.testing.assert_array_equal(layer(x), y_eval)
    np.testing.assert_allclose(layer.train()(x), y_eval, rtol=1e-13, atol=1e-13)
    W2 = rng.standard_normal((3, 2, 3))  # set_base_weight keeps its own copy too
    layer.set_base_weight(W2)
    y2 = layer.eval()(x)
    W2 += 1.0
    np.testing.assert_array_equal(layer(x), y2)
    frozen = np.ascontiguousarray(W0)
    frozen.flags.writeable = False  # read-only and C-contiguous: trusted, not copied
    assert np.shares_memory(C.LoRAConv1d(frozen, r=2).weight, frozen)
    layer_T = C.DoRAConv1d(np.asfortranarray(W0), r=2)  # any layout: a C-contiguous copy
    assert layer_T.weight.flags.c_contiguous


def test_set_base_weight_keeps_an_optimizer_training_the_magnitude():
    """Reviewer repro: after set_base_weight, AdamW(layer.parameters()) no longer moved m."""
    from dora_ref.layers.optim import AdamW

    rng = np.random.default_rng(12)
    W = rng.standard_normal((4, 2, 3, 3))
    x = rng.standard_normal((2, 2, 5, 5))
    layer = C.DoRAConv2d(W, r=2, padding=1, rng=0)
    params = layer.parameters()
    opt = AdamW(params, lr=0.1)
    layer.set_base_weight(2.0 * W)
    assert all(layer.parameters()[k] is v for k, v in params.items())  # same arrays
    m_new = C.conv_init_magnitude(2.0 * W, layer.lora_A, layer.lora_B, layer.scaling)
    np.testing.assert_array_equal(layer.lora_magnitude_vector, m_new)
    y = layer(x)
    layer.backward(rng.standard_normal(y.shape))
    opt.step(layer.grads)
    assert np.abs(layer.lora_magnitude_vector - m_new).max() > 0.05  # AdamW moved it


def test_assigned_adapter_arrays_must_be_real_floats_of_the_weights_dtype():
    """Complex values raise TypeError rather than being truncated with a ComplexWarning."""
    import warnings

    rng = np.random.default_rng(13)
    layer = C.DoRAConv2d(rng.standard_normal((4, 2, 3, 3)), r=2, rng=0)
    A = layer.lora_A
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ComplexWarning would fail the test
        with pytest.raises(TypeError, match="lora_A must have dtype float32 or float64, got complex128"):
            layer.lora_A = A + 1j
        with pytest.raises(TypeError, match="lora_magnitude_vector must have dtype"):
            layer.lora_magnitude_vector = np.ones(4, dtype=complex)
    with pytest.raises(TypeError, match="lora_B has dtype float32 but the weight has dtype float64"):
        layer.lora_B = layer.lora_B.astype(np.float32)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(2, 2, 3, 3\)"):
        layer.lora_A = A[:1]
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.lora_magnitude_vector = np.full(4, np.nan)
    new_A = rng.standard_normal(A.shape)
    layer.lora_A = new_A  # copied into the same array: optimisers keep it
    assert layer.lora_A is A and not np.shares_memory(A, new_A)
    np.testing.assert_array_equal(A, new_A)
    layer.lora_magnitude_vector = np.arange(1.0, 5.0)  # a flat (out,) magnitude is accepted
    assert layer.lora_magnitude_vector.shape == (1, 4, 1, 1)


@pytest.mark.parametrize("cls", [C.DoRAConv2d, C.LoRAConv2d])
def test_dropout_mask_in_eval_mode_raises(cls):
    """PEFT applies no dropout in eval; a given mask used to select the training formula silently."""
    rng = np.random.default_rng(14)
    layer = cls(rng.standard_normal((3, 2, 3, 3)), r=2, lora_dropout=0.5, rng=0)
    x = rng.standard_normal((1, 2, 5, 5))
    mask = 2.0 * (rng.random(x.shape) > 0.5)
    layer(x, dropout_mask=mask)  # training: accepted
    layer.eval()
    with pytest.raises(ValueError, match=r"PEFT applies no dropout in eval; call train\(\) first"):
        layer(x, dropout_mask=mask)
    layer.merge()
    with pytest.raises(ValueError, match="no dropout in eval"):
        layer(x, dropout_mask=mask)


def test_training_forward_makes_no_copy_of_the_weight():
    """A weight passed in any layout is kept C-contiguous, so no (out, in*k) copy per forward.

    Before the fix a Fortran-ordered kernel (e.g. from a permuted torch tensor)
    was kept as a view and reshaped, a full copy, on every forward (peak 6.8 MiB
    NumPy / 4.9 MiB C for this 9 MiB kernel; now 2.3 / 0.4 MiB).
    """
    import tracemalloc

    rng = np.random.default_rng(15)
    W = np.asfortranarray(rng.standard_normal((512, 256, 3, 3)))  # 9 MiB
    layer = C.DoRAConv2d(W, r=4, padding=1, init_lora_weights=False, rng=0)
    x = rng.standard_normal((1, 256, 3, 3))
    layer(x)
    tracemalloc.start()
    try:
        y = layer(x)
        layer.backward(y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < W.nbytes / 3, f"peak {peak / 2**20:.2f} MiB for a {W.nbytes / 2**20:.1f} MiB kernel"


def test_merge_refuses_a_zero_magnitude_it_could_not_unmerge():
    """As DoRALinear: m = 0 would zero a base channel for good; the layer stays unmerged."""
    rng = np.random.default_rng(16)
    W = rng.standard_normal((3, 2, 3))
    layer = C.DoRAConv1d(W, r=2, rng=0)
    layer.lora_magnitude_vector[0, 1, 0] = 0.0
    with pytest.raises(ValueError, match=r"magnitude is 0 at output channel\(s\) \[1\]"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(layer.weight, W)
