"""The Embedding and Conv checks of dora_ref.porting.testing: correct ports pass, known wrong ones are named.

The correct ports are written here from the formulas (NumPy for the
embedding, torch.nn.functional convolutions for Conv1d / Conv2d), not with
dora_ref's functions, so that the checks are tested against an independent
computation.
"""
import numpy as np
import pytest

pytest.importorskip("hypothesis")

from dora_ref.porting import testing as T  # noqa: E402


# --- embedding: PEFT's convention, A (r, V), B (D, r), m (D,), the norm over the vocabulary ---------------

def _emb_norm(E, A, B, s, axis=0):
    return np.linalg.norm(E + s * (B @ A).T, axis=axis)


def embedding_forward(ids, E, A, B, m, s, embed_scale, padding_idx):
    return embed_scale * (m / _emb_norm(E, A, B, s)) * (E[ids] + s * A.T[ids] @ B.T)


def embedding_merge(E, A, B, m, s):
    V = E + s * (B @ A).T
    return V * (m / np.linalg.norm(V, axis=0))


def embedding_forward_norm_per_token(ids, E, A, B, m, s, embed_scale, padding_idx):
    return embed_scale * (m / _emb_norm(E, A, B, s, axis=1)) * (E[ids] + s * A.T[ids] @ B.T)


def embedding_forward_embed_scale_on_base_only(ids, E, A, B, m, s, embed_scale, padding_idx):
    return (m / _emb_norm(E, A, B, s)) * (embed_scale * E[ids] + s * A.T[ids] @ B.T)


def embedding_forward_scaling_outside_norm(ids, E, A, B, m, s, embed_scale, padding_idx):
    return embed_scale * (m / _emb_norm(E, A, B, 1.0)) * (E[ids] + s * A.T[ids] @ B.T)


def embedding_merge_without_magnitude(E, A, B, m, s):
    return E + s * (B @ A).T


def embedding_merge_norm_per_token(E, A, B, m, s):
    V = E + s * (B @ A).T
    return V * (m / np.linalg.norm(V, axis=1))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_embedding_forward_correct_port_passes(dtype):
    result = T.check_embedding_forward(embedding_forward, dtype=dtype, max_examples=150)
    assert result.examples == 150 and result.worst_ratio < 1.0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_embedding_merge_correct_port_passes(dtype):
    result = T.check_embedding_merge(embedding_merge, dtype=dtype, max_examples=150)
    assert result.examples == 150 and result.worst_ratio < 1.0


def test_embedding_reference_is_the_linear_view():
    """dora_ref.core.embedding's forward equals the linear DoRA layer on one-hot rows (the tolerances' premise)."""
    from dora_ref.core import functional as F
    from dora_ref.porting.layer_checks import reference

    case = T.make_embedding_case(N=5, num_embeddings=6, embedding_dim=3, r=2, embed_scale=3.0, seed=3)
    c = case.linear
    y_lin, _ = F.dora_forward(c.x, c.W0, c.A, c.B, c.magnitude, c.scaling, None)
    np.testing.assert_allclose(reference("embedding_forward", case)["y"], 3.0 * y_lin, rtol=1e-13, atol=0)


@pytest.mark.parametrize("port, check, hint", [
    (embedding_forward_norm_per_token, T.check_embedding_forward, "embedding_norm_axis"),
    (embedding_forward_embed_scale_on_base_only, T.check_embedding_forward, "embed_scale_not_on_lora"),
    (embedding_forward_scaling_outside_norm, T.check_embedding_forward, "scaling_outside_norm"),
    (embedding_merge_without_magnitude, T.check_embedding_merge, "embedding_merge_without_magnitude"),
    (embedding_merge_norm_per_token, T.check_embedding_merge, "embedding_norm_axis"),
])
def test_embedding_wrong_port_is_named_first(port, check, hint):
    with pytest.raises(T.ConformanceError) as info:
        check(port, max_examples=100)
    err = info.value
    assert err.hint == hint, str(err)
    assert err.diagnoses[0].key == hint and err.diagnoses[0].rank == 1
    assert "make_embedding_case" in str(err)
    # the shrunk case rebuilds
    assert T.make_embedding_case(**err.case.params).params == err.case.params


def test_embedding_report_all_returns_the_failure():
    rep = T.check_embedding_merge(embedding_merge_without_magnitude, max_examples=50, report="all")
    assert not rep.ok and rep.failures[0].hint == "embedding_merge_without_magnitude"
    assert T.check_embedding_merge(embedding_merge, max_examples=20, report="all").ok


# --- convolution: torch.nn.functional, the norm of each output channel's dense adapted kernel -------------

torch = pytest.importorskip("torch")
Fn = torch.nn.functional


def _dense(W, B, r, groups):
    """The dense (out, in, *k) base kernel and the dense (out, r) lora_B of grouped ones."""
    out, cg = W.shape[:2]
    og, rg = out // groups, r // groups
    Wd = np.zeros((out, cg * groups) + W.shape[2:], dtype=W.dtype)
    Bd = np.zeros((out, r), dtype=W.dtype)
    for j in range(groups):
        Wd[j * og:(j + 1) * og, j * cg:(j + 1) * cg] = W[j * og:(j + 1) * og]
        Bd[j * og:(j + 1) * og, j * rg:(j + 1) * rg] = B[j * og:(j + 1) * og].reshape(og, rg)
    return Wd, Bd


def _conv_port(scale_in_norm=True, bias_in_g=False):
    def forward(x, W, A, B, m, s, b, stride, padding, dilation, groups):
        d = x.ndim - 2
        conv = Fn.conv1d if d == 1 else Fn.conv2d
        out, r = W.shape[0], A.shape[0]
        Wd, Bd = _dense(W, B, r, groups)
        V = Wd.reshape(out, -1) + (s if scale_in_norm else 1.0) * Bd @ A.reshape(r, -1)
        shape = (1, out) + (1,) * d
        g = torch.from_numpy(m / np.linalg.norm(V, axis=1)).reshape(shape)
        t = torch.from_numpy
        bias = None if b is None else t(b)
        base = conv(t(x), t(W), bias if bias_in_g else None, stride, padding, dilation, groups)
        lora = conv(conv(t(x), t(A), None, stride, padding, dilation), t(B), None, 1, 0, 1, groups)
        y = g * (base + s * lora)
        if bias is not None and not bias_in_g:
            y = y + bias.reshape(shape)
        return y.numpy()
    return forward


def conv_norm_over_inputs(x, W, A, B, m, s, b, stride, padding, dilation, groups):
    """The norm of each column of the flattened (out, in*k) kernel: runs only when in*k = out."""
    d = x.ndim - 2
    conv = Fn.conv1d if d == 1 else Fn.conv2d
    out, r = W.shape[0], A.shape[0]
    Wd, Bd = _dense(W, B, r, groups)
    V = Wd.reshape(out, -1) + s * Bd @ A.reshape(r, -1)
    shape = (1, out) + (1,) * d
    g = torch.from_numpy(m / np.linalg.norm(V, axis=0)).reshape(shape)
    t = torch.from_numpy
    base = conv(t(x), t(W), None, stride, padding, dilation, groups)
    lora = conv(conv(t(x), t(A), None, stride, padding, dilation), t(B), None, 1, 0, 1, groups)
    y = g * (base + s * lora)
    return (y if b is None else y + t(b).reshape(shape)).numpy()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conv_forward_correct_port_passes(dtype):
    result = T.check_conv_forward(_conv_port(), dtype=dtype, max_examples=100)
    assert result.examples == 100 and result.worst_ratio < 1.0


@pytest.mark.parametrize("port, hint", [
    (_conv_port(scale_in_norm=False), "scaling_outside_norm"),
    (_conv_port(bias_in_g=True), "bias_scaled"),
    (conv_norm_over_inputs, "norm_axis"),
])
def test_conv_wrong_port_is_named_first(port, hint):
    with pytest.raises(T.ConformanceError) as info:
        T.check_conv_forward(port, max_examples=100)
    err = info.value
    assert err.hint == hint, str(err)
    assert "make_conv_case" in str(err)


def test_conv_cases_restrict_the_geometry():
    seen = []

    def port(x, W, A, B, m, s, b, stride, padding, dilation, groups):
        seen.append((groups, dilation))
        return _conv_port()(x, W, A, B, m, s, b, stride, padding, dilation, groups)

    T.check_conv_forward(port, max_examples=20, cases=dict(groups=2, dilation=[2]))
    assert set(seen) == {(2, 2)}


# --- several adapters on one linear layer, PEFT 0.21: every norm from the bare base, the output fed forward --

def _chain_port(norm_from="bare"):
    def forward(x, W0, b, adapters):
        y, W = x @ W0.T, W0
        for ad in adapters:
            A, B, m, s = ad["A"], ad["B"], ad["magnitude"], ad["scaling"]
            low_rank = s * (x @ A.T) @ B.T
            if m is None:
                y, W = y + low_rank, W + s * B @ A
                continue
            g = m / np.linalg.norm((W if norm_from == "merged" else W0) + s * B @ A, axis=1)
            y = g * (y + low_rank) if norm_from != "independent" else y + (g - 1) * (x @ W0.T) + g * low_rank
            W = g[:, None] * (W + s * B @ A)
        return y if b is None else y + b
    return forward


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_chain_forward_correct_port_passes(dtype):
    result = T.check_chain_forward(_chain_port(), dtype=dtype, max_examples=150)
    assert result.examples == 150 and result.worst_ratio < 1.0


@pytest.mark.parametrize("norm_from, hint", [
    ("merged", "chain_norm_of_merged_weight"),
    ("independent", "chain_not_fed_forward"),
])
def test_chain_wrong_port_is_named_first(norm_from, hint):
    with pytest.raises(T.ConformanceError) as info:
        T.check_chain_forward(_chain_port(norm_from), max_examples=100)
    err = info.value
    assert err.hint == hint, str(err)
    assert "make_chain_case" in str(err)


# --- PEFT 0.21's own DoRA embedding passes (no false alarm on the implementation most users run) ------------

class _ScaledEmbedding(torch.nn.Embedding):
    """An embedding that scales its output, as Gemma's ScaledWordEmbedding (PEFT reads ``embed_scale``)."""

    def __init__(self, V, D, padding_idx, embed_scale):
        super().__init__(V, D, padding_idx=padding_idx)
        self.embed_scale = embed_scale

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def peft_embedding_forward(ids, E, A, B, m, s, embed_scale, padding_idx):
    import warnings

    from peft import LoraConfig
    from peft.tuners.lora.layer import Embedding

    dtype = torch.float64 if E.dtype == np.float64 else torch.float32
    base = _ScaledEmbedding(E.shape[0], E.shape[1], padding_idx, embed_scale).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = LoraConfig(r=A.shape[0], lora_alpha=1, use_dora=True, init_lora_weights=False)
        layer = Embedding(base, "default", cfg, r=A.shape[0], lora_alpha=1, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(E))
        layer.lora_embedding_A["default"].copy_(torch.from_numpy(A))
        layer.lora_embedding_B["default"].copy_(torch.from_numpy(B))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m))
        layer.scaling["default"] = s
        layer.eval()
        return layer(torch.from_numpy(ids)).numpy()


def peft_embedding_forward_wrong_scaling(ids, E, A, B, m, s, embed_scale, padding_idx):
    return peft_embedding_forward(ids, E, A, B, m, s * 1.001, embed_scale, padding_idx)


def test_peft_embedding_port_can_fail():
    """The wrapper really runs PEFT with the case's weights: a scaling off by 0.1% is caught,
    as a numeric mismatch (not as a port that raised, which a missing PEFT would give)."""
    pytest.importorskip("peft")
    with pytest.raises(T.ConformanceError) as info:
        T.check_embedding_forward(peft_embedding_forward_wrong_scaling, max_examples=10)
    assert "raised" not in str(info.value), str(info.value)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_peft_embedding_passes(dtype, torch_one_thread):
    pytest.importorskip("peft")
    result = T.check_embedding_forward(peft_embedding_forward, dtype=dtype, max_examples=30)
    assert result.examples == 30 and result.worst_ratio < 1.0


# --- PEFT 0.21's DoRA Conv1d / Conv2d: passes where it is the same layer, named where it is not ----------

def peft_conv_forward(x, W, A, B, m, s, b, stride, padding, dilation, groups):
    import warnings

    from peft import LoraConfig
    from peft.tuners.lora.layer import Conv1d, Conv2d

    d = x.ndim - 2
    dtype = torch.float64 if W.dtype == np.float64 else torch.float32
    Base = torch.nn.Conv1d if d == 1 else torch.nn.Conv2d
    base = Base(x.shape[1], W.shape[0], W.shape[2:], stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=b is not None).to(dtype)
    cfg = LoraConfig(r=A.shape[0], lora_alpha=1, use_dora=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = (Conv1d if d == 1 else Conv2d)(base, "default", cfg, r=A.shape[0], lora_alpha=1, use_dora=True,
                                               init_lora_weights=False)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(W))
        if b is not None:
            base.bias.copy_(torch.from_numpy(b))
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        magnitude = layer.lora_magnitude_vector["default"].weight  # (1, out, 1, ...)
        magnitude.copy_(torch.from_numpy(m).reshape(magnitude.shape))
        layer.scaling["default"] = s
        layer.eval()
        return layer(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_peft_conv_passes_without_groups_and_dilation(dtype, torch_one_thread):
    pytest.importorskip("peft")
    result = T.check_conv_forward(peft_conv_forward, dtype=dtype, max_examples=30, cases=dict(groups=1, dilation=1))
    assert result.examples == 30 and result.worst_ratio < 1.0


@pytest.mark.parametrize("cases, hint", [
    (dict(groups=2, dilation=1), "peft_grouped_conv_norm"),
    (dict(groups=1, dilation=2), "peft_conv_dilation_dropped"),
])
def test_peft_conv_differences_are_named(cases, hint, torch_one_thread):
    """Where dora_ref.core.conv deliberately differs from PEFT (its module docstring), PEFT fails, named."""
    pytest.importorskip("peft")
    with pytest.raises(T.ConformanceError) as info:
        T.check_conv_forward(peft_conv_forward, max_examples=20, cases=cases)
    assert info.value.hint == hint, str(info.value)


@pytest.mark.parametrize("check", [T.check_embedding_forward, T.check_embedding_merge, T.check_conv_forward,
                                   T.check_chain_forward])
def test_layer_checks_reject_bad_arguments(check):
    with pytest.raises(TypeError, match="callable"):
        check(None)
    with pytest.raises(ValueError, match="dtype"):
        check(embedding_forward, dtype="float16")
    with pytest.raises(ValueError, match="max_examples"):
        check(embedding_forward, max_examples=0)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        check(embedding_forward, cases=dict(nope=1))
    with pytest.raises(ValueError, match="empty"):
        check(embedding_forward, cases=dict(seed=[]))


def test_a_port_that_writes_its_input_is_reported():
    def forward(ids, E, A, B, m, s, embed_scale, padding_idx):
        m *= 1.0 + 0.0 * m  # in place, unchanged values: not reported
        E[...] = 0.0 if E.size else E
        return embedding_forward(ids, E, A, B, m, s, embed_scale, padding_idx)

    with pytest.raises(T.ConformanceError, match="wrote to its input weight"):
        T.check_embedding_forward(forward, max_examples=10)
