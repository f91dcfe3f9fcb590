"""PEFT parity for DoRA convolutions and embeddings (float64, torch on the CPU).

For each layer type, PEFT (``get_peft_model`` with ``use_dora=True``) and
dora_ref get the same weights; the forward, the gradients of ``sum(dy * y)``
(PEFT detaches the norm, so ``detach_norm=True``) and the merged weights must
agree to rounding.

Tolerance. Each side computes sums of at most k products, so each is within
gamma_k * (sum of |terms|) of the exact value (Higham, Eq. 3.5), and the two
differ by at most twice that. ``sum of |terms|`` is bounded by running the
same computation on the absolute values of every input (with the true norm
passed in), so no term can cancel. ``tolerance.assert_close`` applies
``rtol(float64, k) = 8 gamma_k`` to that scale; for the sizes here
rtol <= 1e-12 (asserted), i.e. agreement to about 12 significant digits of
the largest term.

Where dora_ref deliberately differs from PEFT 0.21.2 (dilation > 1, groups > 1,
a (1, 1, k) Conv3d merge) the tests below pin both sides: dora_ref equals the
math PEFT's own merge implies, and PEFT's unmerged path is what it is.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PEFT parity needs torch (pip install -e .[parity])")
peft = pytest.importorskip("peft", reason="PEFT parity needs peft (pip install -e .[parity])")
nn = torch.nn

from dora_ref import conv as C  # noqa: E402
from dora_ref import embedding as Em  # noqa: E402
from dora_ref.porting.tolerance import assert_close, rtol  # noqa: E402

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def peft_dora(layer, r, alpha, **config):
    """A float64 PEFT DoRA model around one layer, with random (nonzero) A and B."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(target_modules=["layer"], r=r, lora_alpha=alpha, use_dora=True,
                          init_lora_weights=False, **config)
    model = peft.get_peft_model(Wrap(layer.double()), cfg)
    return model, model.base_model.model.layer


def t2n(t):
    return t.detach().cpu().numpy().copy()


def adapter_arrays(lora_layer, conv=True):
    if conv:
        A = t2n(lora_layer.lora_A["default"].weight)
        B = t2n(lora_layer.lora_B["default"].weight)
    else:
        A = t2n(lora_layer.lora_embedding_A["default"])
        B = t2n(lora_layer.lora_embedding_B["default"])
    m = lora_layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():  # a trained-looking magnitude, not the init norm
        m.mul_(1.0 + 0.2 * torch.randn_like(m))
    return A, B, t2n(m), lora_layer.scaling["default"]


def k_bound(k):
    assert rtol(np.float64, k) <= 1e-12, "the sizes here must keep rtol <= 1e-12"
    return k


CONV_CASES = [
    dict(d=1, cin=3, out=4, k=3, stride=1, padding=1),
    dict(d=1, cin=2, out=3, k=5, stride=2, padding=0),
    dict(d=2, cin=3, out=4, k=3, stride=1, padding=1),
    dict(d=2, cin=2, out=5, k=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(d=2, cin=3, out=4, k=1, stride=1, padding=0),  # PEFT's 1x1 shortcut
    dict(d=3, cin=2, out=3, k=3, stride=1, padding=1),
    dict(d=3, cin=2, out=3, k=(2, 3, 1), stride=(1, 2, 1), padding=0),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"conv{c['d']}d_k{c['k']}_s{c['stride']}")
def test_conv_forward_gradients_and_merge_equal_peft(case):
    d = case["d"]
    base = CONVS[d](case["cin"], case["out"], case["k"], stride=case["stride"],
                    padding=case["padding"], bias=True)
    model, lay = peft_dora(base, r=2, alpha=3)
    A, B, m, s = adapter_arrays(lay)
    W, b = t2n(lay.base_layer.weight), t2n(lay.base_layer.bias)
    assert m.shape == (1, case["out"]) + (1,) * d  # PEFT's shape, stored as is
    kw = dict(stride=lay.base_layer.stride, padding=lay.base_layer.padding)
    rng = np.random.default_rng(d)
    x = rng.standard_normal((2, case["cin"]) + (6,) * d)

    # forward (train mode, no dropout: PEFT's reuse path) and gradients
    xt = torch.tensor(x, requires_grad=True)
    model.train()
    yt = model(xt)
    y, ctx = C.conv_dora_forward(x, W, A, B, m, s, b, **kw)
    dy = rng.standard_normal(y.shape)
    (yt * torch.tensor(dy)).sum().backward()
    g = C.conv_dora_backward(dy, ctx, detach_norm=True)

    n = C.conv_column_norm(W, A, B, s)
    y_abs, ctx_abs = C.conv_dora_forward(np.abs(x), np.abs(W), np.abs(A), np.abs(B), np.abs(m), s,
                                         np.abs(b), weight_norm=n, **kw)
    g_abs = C.conv_dora_backward(np.abs(dy), ctx_abs)
    inK, rows = W[0].size, y.size // case["out"]
    k_fwd = k_bound(2 * inK + 2)
    k_grad = k_bound(rows + 2 * inK + case["out"] + 2)
    assert_close(y, t2n(yt), k=k_fwd, scale=y_abs.max(), name="y")
    assert_close(g.dx, t2n(xt.grad), k=k_grad, scale=g_abs.dx.max(), name="dx")
    assert_close(g.dA, t2n(lay.lora_A["default"].weight.grad), k=k_grad, scale=g_abs.dA.max(), name="dA")
    assert_close(g.dB, t2n(lay.lora_B["default"].weight.grad), k=k_grad, scale=g_abs.dB.max(), name="dB")
    assert_close(g.dmagnitude, t2n(lay.lora_magnitude_vector["default"].weight.grad), k=k_grad,
                 scale=g_abs.dmagnitude.max(), name="dmagnitude")

    # merge: PEFT's merged kernel, and its merged model, equal ours
    W_merged, n_merge = C.conv_merge(W, A, B, m, s)
    model.merge_adapter()
    W_peft = t2n(lay.base_layer.weight)
    V_abs = np.abs(W) + np.abs(C.conv_delta_weight(np.abs(A), np.abs(B), s))
    g_max = np.abs(m).max() / n.min()
    assert_close(W_merged, W_peft, k=k_bound(inK + 2), scale=V_abs.max() * g_max, name="merged weight")
    model.eval()
    with torch.no_grad():
        y_merged_peft = t2n(model(torch.tensor(x)))
    assert_close(y, y_merged_peft, k=k_fwd, scale=y_abs.max(), name="merged y")
    model.unmerge_adapter()
    assert_close(C.conv_unmerge(W_merged, A, B, m, s, n_merge), W, k=k_bound(inK + 4),
                 scale=V_abs.max())


def test_conv_training_with_dropout_equals_peft():
    """lora_dropout > 0 in training: PEFT's recompute path (docs/peft_dora.md, Sec. 1 "Convolutions"),
    y = conv(x, W) + b + (g - 1) conv(xd, W) + g s lora_B(lora_A(xd)). PEFT's mask is
    reproduced by replaying torch's RNG on a tensor of ones of x's shape."""
    model, lay = peft_dora(nn.Conv2d(3, 4, 3, padding=1, stride=2), r=2, alpha=3, lora_dropout=0.3)
    A, B, m, s = adapter_arrays(lay)  # m != init norm, so the (g - 1) term is exercised
    W, b = t2n(lay.base_layer.weight), t2n(lay.base_layer.bias)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 6, 6))
    xt = torch.tensor(x, requires_grad=True)
    model.train()
    torch.manual_seed(123)
    yt = model(xt)
    torch.manual_seed(123)
    mask = t2n(nn.Dropout(0.3)(torch.ones_like(xt)))
    assert set(np.unique(mask)) == {0.0, 1 / 0.7}
    y, ctx = C.conv_dora_forward(x, W, A, B, m, s, b, stride=2, padding=1, dropout_mask=mask)
    dy = rng.standard_normal(y.shape)
    (yt * torch.tensor(dy)).sum().backward()
    g = C.conv_dora_backward(dy, ctx)
    n = C.conv_column_norm(W, A, B, s)
    y_abs, ctx_abs = C.conv_dora_forward(np.abs(x), np.abs(W), np.abs(A), np.abs(B), np.abs(m), s,
                                         np.abs(b), stride=2, padding=1, dropout_mask=mask,
                                         weight_norm=n)
    g_abs = C.conv_dora_backward(np.abs(dy), ctx_abs)
    # |g - 1| <= |g| + 1: bound the (g - 1) term by adding the base term's bound once more
    k = k_bound(y.size // 4 + 2 * W[0].size + 4 + 2)
    assert_close(y, t2n(yt), k=k, scale=2 * y_abs.max(), name="y")
    for name, ours, theirs in [
        ("dx", g.dx, xt.grad), ("dA", g.dA, lay.lora_A["default"].weight.grad),
        ("dB", g.dB, lay.lora_B["default"].weight.grad),
        ("dmagnitude", g.dmagnitude, lay.lora_magnitude_vector["default"].weight.grad),
    ]:
        assert_close(ours, t2n(theirs), k=k, scale=2 * np.abs(getattr(g_abs, name)).max(), name=name)


def test_conv3d_1x1xk_merge_equals_the_definition_where_peft_crashes():
    """peft#3768: PEFT 0.21.2 takes the Conv2d 1x1 shortcut for a (1, 1, k) Conv3d kernel."""
    model, lay = peft_dora(nn.Conv3d(2, 3, (1, 1, 3)), r=2, alpha=2)
    A, B, m, s = adapter_arrays(lay)
    W = t2n(lay.base_layer.weight)
    with pytest.raises(RuntimeError):
        model.merge_adapter()
    W_merged, _ = C.conv_merge(W, A, B, m, s)
    # the definition, with torch doing the arithmetic: g * (W + s * B @ A) per channel
    Wt, At, Bt = torch.tensor(W), torch.tensor(A), torch.tensor(B)
    V = Wt + s * (Bt.reshape(3, 2) @ At.reshape(2, -1)).reshape(Wt.shape)
    expected = torch.tensor(m).reshape(3, 1, 1, 1, 1) / V.flatten(1).norm(dim=1).reshape(3, 1, 1, 1, 1) * V
    assert_close(W_merged, t2n(expected), k=k_bound(8), scale=np.abs(t2n(expected)).max() * 2)
    # and PEFT's (working) forward equals ours
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 3, 6))
    with torch.no_grad():
        y_peft = t2n(model(torch.tensor(x)))
    y, _ = C.conv_dora_forward(x, W, A, B, m, s, t2n(lay.base_layer.bias))
    assert_close(y, y_peft, k=k_bound(16), scale=np.abs(y).max() * 4)


def test_dilated_conv_equals_peft_merged_model_while_peft_unmerged_path_is_broken():
    """PEFT's lora_A omits the dilation: its unmerged forward raises or silently
    broadcasts to the wrong shape. dora_ref's forward is PEFT's merged model."""
    model, lay = peft_dora(nn.Conv1d(2, 3, 3, dilation=2), r=2, alpha=2)
    A, B, m, s = adapter_arrays(lay)
    W, b = t2n(lay.base_layer.weight), t2n(lay.base_layer.bias)
    x = np.random.default_rng(1).standard_normal((1, 2, 5))
    with torch.no_grad():
        y_broken = model(torch.tensor(x))
    assert tuple(y_broken.shape) == (1, 3, 3)  # the base output is (1, 3, 1): silently broadcast
    y, _ = C.conv_dora_forward(x, W, A, B, m, s, b, dilation=2)
    assert y.shape == (1, 3, 1)
    model.merge_adapter()
    with torch.no_grad():
        y_merged = t2n(model(torch.tensor(x)))
    assert_close(y, y_merged, k=k_bound(16), scale=np.abs(y).max() * 4)
    with pytest.raises(RuntimeError, match="must match the size"):
        model.unmerge_adapter()
        model(torch.randn(1, 2, 10, dtype=torch.float64))


def test_grouped_conv_uses_the_dense_adapted_kernel_unlike_peft():
    """groups > 1: same magnitude at init; afterwards dora_ref normalises the rows of
    the dense kernel the layer applies, PEFT rows of a reshaped B@A; PEFT cannot merge."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, groups=2, padding=1).double()
    W, b = t2n(base.weight), t2n(base.bias)
    cfg = peft.LoraConfig(target_modules=["layer"], r=2, lora_alpha=2, use_dora=True)
    model = peft.get_peft_model(Wrap(base), cfg)
    lay = model.base_model.model.layer
    A0, B0 = t2n(lay.lora_A["default"].weight), t2n(lay.lora_B["default"].weight)
    assert B0.shape == (6, 1, 1, 1) and not B0.any()
    m0 = C.conv_init_magnitude(W, A0, B0, 1.0, groups=2)
    np.testing.assert_allclose(m0, t2n(lay.lora_magnitude_vector["default"].weight), rtol=1e-14)

    with torch.no_grad():
        lay.lora_B["default"].weight.normal_()
    A, B, m, s = adapter_arrays(lay)
    x = np.random.default_rng(2).standard_normal((1, 4, 5, 5))
    with torch.no_grad():
        y_peft = t2n(model(torch.tensor(x)))
    y, _ = C.conv_dora_forward(x, W, A, B, m, s, b, padding=1, groups=2)
    # the definition in torch: the adapted layer is conv(x, W, groups) + s * lora_B(lora_A(x))
    xt = torch.tensor(x)
    z = (torch.nn.functional.conv2d(xt, torch.tensor(W), padding=1, groups=2)
         + s * torch.nn.functional.conv2d(torch.nn.functional.conv2d(xt, torch.tensor(A), padding=1),
                                          torch.tensor(B), groups=2))
    V = torch.tensor(C.grouped_to_dense(W, 2)) + s * (
        torch.block_diag(*torch.tensor(B).reshape(6, 1).split(3)) @ torch.tensor(A).reshape(2, -1)
    ).reshape(6, 4, 3, 3)
    g = torch.tensor(m).reshape(1, 6, 1, 1) / V.flatten(1).norm(dim=1).reshape(1, 6, 1, 1)
    expected = t2n(g * z + torch.tensor(b).reshape(1, 6, 1, 1))
    assert_close(y, expected, k=k_bound(80), scale=np.abs(expected).max() * 8)
    assert np.abs(y - y_peft).max() > 1e-3  # PEFT's norm of the reshaped B@A differs
    with pytest.raises(NotImplementedError):
        model.merge_adapter()
    W_merged, _ = C.conv_merge(W, A, B, m, s, groups=2)
    y_m = C.conv_nd(x, W_merged, b, padding=1)  # a groups=1 convolution
    assert_close(y_m, y, k=k_bound(80), scale=np.abs(expected).max() * 8)


@pytest.mark.parametrize("padding_idx, embed_scale", [(None, None), (2, None), (0, 1.7)])
def test_embedding_forward_gradients_and_merge_equal_peft(padding_idx, embed_scale):
    class Scaled(nn.Embedding):  # like transformers' Gemma3TextScaledWordEmbedding
        def __init__(self, *a, scale, **kw):
            super().__init__(*a, **kw)
            self.register_buffer("embed_scale", torch.tensor(scale, dtype=torch.float64))

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    V, D = 11, 5
    torch.manual_seed(1)
    base = nn.Embedding(V, D, padding_idx=padding_idx) if embed_scale is None else \
        Scaled(V, D, padding_idx=padding_idx, scale=embed_scale)
    model, lay = peft_dora(base, r=3, alpha=6)
    A, B, m, s = adapter_arrays(lay, conv=False)
    E = t2n(lay.base_layer.weight)
    assert A.shape == (3, V) and B.shape == (D, 3) and m.shape == (D,)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, V, size=(3, 4))
    ids[0, :2] = padding_idx or 0

    model.train()
    yt = model(torch.tensor(ids))
    y, ctx = Em.embedding_dora_forward(ids, E, A, B, m, s, embed_scale=embed_scale,
                                       padding_idx=padding_idx)
    dy = rng.standard_normal(y.shape)
    (yt * torch.tensor(dy)).sum().backward()
    dA, dB, dm = Em.embedding_dora_backward(dy, ctx)
    n = Em.embedding_column_norm(E, A, B, s)
    y_abs, ctx_abs = Em.embedding_dora_forward(ids, np.abs(E), np.abs(A), np.abs(B), np.abs(m), s,
                                               embed_scale=embed_scale, weight_norm=n)
    dA_abs, dB_abs, dm_abs = Em.embedding_dora_backward(np.abs(dy), ctx_abs)
    k = k_bound(ids.size + V + 3)
    assert_close(y, t2n(yt), k=k, scale=y_abs.max(), name="y")
    assert_close(dA, t2n(lay.lora_embedding_A["default"].grad), k=k, scale=dA_abs.max(), name="dA")
    assert_close(dB, t2n(lay.lora_embedding_B["default"].grad), k=k, scale=dB_abs.max(), name="dB")
    assert_close(dm, t2n(lay.lora_magnitude_vector["default"].weight.grad), k=k,
                 scale=dm_abs.max(), name="dmagnitude")

    E_merged, _ = Em.embedding_merge(E, A, B, m, s)
    model.merge_adapter()
    scale = (np.abs(E) + s * (np.abs(B) @ np.abs(A)).T).max() * np.abs(m).max() / n.min()
    assert_close(E_merged, t2n(lay.base_layer.weight), k=k, scale=scale, name="merged weight")
    with torch.no_grad():
        assert_close(y, t2n(model(torch.tensor(ids))), k=k, scale=y_abs.max(), name="merged y")
