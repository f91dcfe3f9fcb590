"""The porting checker on bfloat16 / float16 ports (PEFT's mixed precision: lp base, float32 adapters).

The ports here are written in plain NumPy float32 arithmetic on the upcast
inputs and rounded with ml_dtypes / NumPy's float16 cast: the "consistent"
rule (one rounding of each lp result). A port that rounds the initial
magnitude to the storage dtype (PEFT 0.21 with autocast_adapter_dtype=True)
must fail ``check_init`` with the hint ``magnitude_rounded_at_init``; PEFT's
own layer, when torch and PEFT are installed, too.
"""
import numpy as np
import pytest

from dora_ref.porting import testing
from dora_ref.porting.cases import lp_roundings
from dora_ref.porting.tolerance import ROUNDINGS, as_dtype, rtol, unit_roundoff

LP = ["bfloat16", "float16"]
f32 = np.float32


def _norm(W0, A, B, s):
    """||W0 + s*B@A||_row in float32 on the upcast weights."""
    V = W0.astype(f32) + f32(s) * (B.astype(f32) @ A.astype(f32))
    return np.sqrt(np.sum(V * V, axis=1))


def consistent_forward(x, W0, A, B, m, s, bias):
    xf, Wf = x.astype(f32), W0.astype(f32)
    g = m.astype(f32) / _norm(W0, A, B, s)
    y = g * (xf @ Wf.T + f32(s) * ((xf @ A.T) @ B.T))
    if bias is not None:
        y = y + bias.astype(f32)
    return y.astype(x.dtype)


def consistent_forward_dropout(x, W0, A, B, m, s, bias, dropout_mask):
    """PEFT's training formula, float32 on the upcast inputs, rounded once."""
    xf, Wf = x.astype(f32), W0.astype(f32)
    xd = xf * dropout_mask.astype(f32)
    g = m.astype(f32) / _norm(W0, A, B, s)
    y = xf @ Wf.T + (g - 1) * (xd @ Wf.T) + g * f32(s) * ((xd @ A.T) @ B.T)
    if bias is not None:
        y = y + bias.astype(f32)
    return y.astype(x.dtype)


def consistent_backward(dy, x, W0, A, B, m, s, bias):
    """Detached norm (PEFT): dx rounded to x's dtype, dA, dB, dm float32 like the adapters."""
    xf, Wf, dyf = x.astype(f32), W0.astype(f32), dy.astype(f32)
    n = _norm(W0, A, B, s)
    g = m / n
    z = xf @ Wf.T + f32(s) * ((xf @ A.T) @ B.T)
    dz = dyf * g
    dm = np.sum(dyf * z, axis=0) / n
    dP = f32(s) * (dz.T @ xf)  # dL/d(B@A), n held constant
    dx = dz @ Wf + f32(s) * ((dz @ B) @ A)
    return dx.astype(x.dtype), B.T @ dP, dP @ A.T, dm


def consistent_merge(W0, A, B, m, s):
    V = W0.astype(f32) + f32(s) * (B @ A)
    return ((m / _norm(W0, A, B, s))[:, None] * V).astype(W0.dtype)


def consistent_unmerge(Wm, A, B, m, s, n):
    return (Wm.astype(f32) / (m / n)[:, None] - f32(s) * (B @ A)).astype(Wm.dtype)


def consistent_init(W0, A, B, s):
    return _norm(W0, A, B, s)


def rounding_init(W0, A, B, s):
    """PEFT 0.21's init with autocast_adapter_dtype=True: the lp norm, upcast afterwards."""
    return _norm(W0, A, B, s).astype(W0.dtype).astype(f32)


def test_low_precision_case_is_lp_representable_with_float32_adapters():
    for dtype in LP:
        c = testing.make_case(N=3, in_features=6, out_features=4, r=2, dtype=dtype, dropout_p=0.5, seed=1)
        lp = as_dtype(dtype)
        for name in ("x", "W0", "bias", "dy", "dropout_mask"):
            assert getattr(c, name).dtype == lp, name
        for name in ("A", "B", "magnitude"):
            assert getattr(c, name).dtype == np.float32, name
        assert np.array_equal(c.A.astype(lp).astype(f32), c.A) and np.array_equal(c.B.astype(lp).astype(f32), c.B)
        assert "dtype=" + dtype in c.describe()


def test_low_precision_tolerances_follow_the_output_dtype():
    """y, dx, merged weights: lp with R roundings; n and the init magnitude: float32's bound."""
    c = testing.make_case(N=3, in_features=6, out_features=4, r=2, dtype="bfloat16")
    t = testing.tolerances(c)
    assert t["y"]["dtype"] == "bfloat16" and t["y"]["roundings"] == 3
    assert t["y"]["rtol"] == rtol("bfloat16", t["y"]["k"], roundings=3)
    assert t["weight_norm"]["dtype"] == "float32" and t["weight_norm"]["rtol"] == rtol("float32", t["weight_norm"]["k"])
    assert t["dA"]["dtype"] == "float32" and t["dmagnitude"]["roundings"] == 2
    assert lp_roundings("magnitude") == 0 and lp_roundings("y_identity") == ROUNDINGS["peft_mixed"]["y"]


@pytest.mark.parametrize("dtype", LP)
def test_consistent_low_precision_port_passes_every_check(dtype):
    kw = dict(dtype=dtype, max_examples=25, seed=3)
    results = [
        testing.check_forward(consistent_forward, **kw),
        testing.check_backward(consistent_backward, **kw),
        testing.check_merge(consistent_merge, consistent_unmerge, **kw),
        testing.check_init(consistent_init, consistent_forward, **kw),
        testing.check_forward(consistent_forward_dropout, dropout=True, **kw),
    ]
    for r in results:
        assert r.examples == 25 and r.worst_ratio < 1


@pytest.mark.parametrize("dtype", LP)
def test_magnitude_rounded_at_init_fails_with_its_hint(dtype):
    with pytest.raises(testing.ConformanceError) as info:
        testing.check_init(rounding_init, consistent_forward, dtype=dtype, max_examples=25, seed=3)
    err = info.value
    assert err.output == "magnitude" and err.hint == "magnitude_rounded_at_init"
    assert err.diagnoses[0].kind == "matches"
    # the error is the rounding of the norm: at most u_lp |n|, far above float32's bound
    assert abs(err.got - err.expected) <= unit_roundoff(dtype) * abs(err.expected) * (1 + 1e-6)
    assert "autocast_adapter_dtype=True" in str(err)


def test_low_precision_port_with_a_formula_mistake_gets_its_usual_hint():
    """The diagnosis works in lp as in float32: a bfloat16 forward whose norm ignores s*B@A."""
    def forward(x, W0, A, B, m, s, bias):
        W = W0.astype(f32)
        g = m / np.sqrt(np.sum(W * W, axis=1))
        y = g * (x.astype(f32) @ W.T + f32(s) * ((x.astype(f32) @ A.T) @ B.T))
        return (y + (0 if bias is None else bias.astype(f32))).astype(x.dtype)

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(forward, dtype="bfloat16", max_examples=50, seed=0)
    assert info.value.output == "y" and info.value.hint == "norm_of_W0"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_unknown_mistake_gets_no_hint_from_a_variant_barely_apart_from_dora(dtype):
    """A port that takes the Frobenius norm of all of V (no known variant) gets no hint.

    Found by a new user: in bfloat16 the checker named ``norm_plus_eps`` as the
    only hint, "partly" matching on one probe (tiny weights) where that variant
    differs from dora_ref by 1.19 tolerances: evidence too close to dora_ref to
    tell anything apart. A probe counts only where the variant is more than
    ``diagnosis._DECISIVE`` tolerances away from dora_ref.
    """
    def forward(x, W0, A, B, m, s, bias):
        xf = x.astype(f32)
        V = W0.astype(f32) + f32(s) * (B.astype(f32) @ A.astype(f32))
        g = m.astype(f32) / np.sqrt(np.sum(V * V))  # one norm for the whole matrix
        y = g * (xf @ V.T)
        return (y + (0 if bias is None else bias.astype(f32))).astype(x.dtype)

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(forward, dtype=dtype, max_examples=50, seed=0)
    assert info.value.output == "y"
    assert info.value.hint is None, [d.key for d in info.value.diagnoses]
    # and says so, instead of ending after the mismatch (a new user's nit)
    assert "hint: none; no known mistake" in str(info.value), str(info.value)


def test_low_precision_argument_errors():
    with pytest.raises(ValueError, match="dtype must be float64, float32, bfloat16 or float16"):
        testing.check_forward(consistent_forward, dtype="int8")
    with pytest.raises(ValueError, match="linear layer"):
        testing.check_embedding_forward(lambda *a: None, dtype="bfloat16")


# ---------------------------------------------------------------------------
# PEFT's own layer in bfloat16 (skips, visibly, without torch and PEFT)
# ---------------------------------------------------------------------------


def _peft_ports(torch):
    """PEFT 0.21's DoRA Linear in bfloat16 through get_peft_model(..., autocast_adapter_dtype=True),
    its default: the init and the forward as ports (bfloat16 arrays cross as their 16 bits)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft_helpers import to_numpy, to_torch

    def model_of(W0, bias, scaling, r):
        lora_alpha, _, use_rslora = scaling
        base = torch.nn.Sequential()
        base.layer = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=bias is not None).to(torch.bfloat16)
        with torch.no_grad():
            base.layer.weight.copy_(to_torch(W0))
            if bias is not None:
                base.layer.bias.copy_(to_torch(bias))
        cfg = LoraConfig(target_modules=["layer"], use_dora=True, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, cfg, autocast_adapter_dtype=True)
        return model, model.base_model.model.layer

    def layer_of(W0, bias, A, B, m, scaling):
        """A PEFT lora.Linear (DoRA) on an lp base, adapters upcast as autocast_adapter_dtype=True does."""
        from peft.tuners.lora import Linear as LoraLinear

        lora_alpha, r, use_rslora = scaling
        base = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=bias is not None)
        base = base.to(torch.bfloat16 if W0.dtype.name == "bfloat16" else torch.float16)
        with torch.no_grad():
            base.weight.copy_(to_torch(W0))
            if bias is not None:
                base.bias.copy_(to_torch(bias))
        cfg = LoraConfig(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, use_dora=True, init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = LoraLinear(base, "default", cfg, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                               use_dora=True, init_lora_weights=False)
        for module in (layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]):
            module.float()  # what cast_adapter_dtype does after the init
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(to_torch(A))
            layer.lora_B["default"].weight.copy_(to_torch(B))
            layer.lora_magnitude_vector["default"].weight.copy_(to_torch(m))
        layer.eval()
        return layer

    def layer_forward(x, W0, A, B, m, scaling, bias):
        with torch.no_grad():
            return to_numpy(layer_of(W0, bias, A, B, m, scaling)(to_torch(x)))

    def layer_backward(dy, x, W0, A, B, m, scaling, bias):
        layer = layer_of(W0, bias, A, B, m, scaling)
        xt = to_torch(x).requires_grad_()
        layer(xt).backward(to_torch(dy))  # L = sum(dy * y)
        grad = lambda mod: to_numpy(mod.weight.grad)  # noqa: E731
        return (to_numpy(xt.grad), grad(layer.lora_A["default"]), grad(layer.lora_B["default"]),
                grad(layer.lora_magnitude_vector["default"]))

    def layer_merge(W0, A, B, m, scaling):
        layer = layer_of(W0, None, A, B, m, scaling)
        with torch.no_grad():
            layer.merge(safe_merge=True)
        return to_numpy(layer.base_layer.weight)

    def init(W0, A, B, scaling):
        if B.any():  # the diagnosis probes draw B random: this port runs PEFT's default init only
            raise ValueError("this port is PEFT's default init (B = 0; A is PEFT's own draw, which then "
                             "does not matter)")
        _, layer = model_of(W0, None, scaling, A.shape[0])
        m = layer.lora_magnitude_vector["default"].weight
        assert m.dtype == torch.float32  # upcast by autocast_adapter_dtype=True, after the lp init
        return to_numpy(m)

    def forward(x, W0, A, B, m, scaling, bias):
        model, layer = model_of(W0, bias, scaling, A.shape[0])
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(to_torch(A))
            layer.lora_B["default"].weight.copy_(to_torch(B))
            layer.lora_magnitude_vector["default"].weight.copy_(to_torch(m))
        model.eval()
        with torch.no_grad():
            return to_numpy(model(to_torch(x)))

    return init, forward, (layer_forward, layer_backward, layer_merge)


def test_peft_bfloat16_autocast_init_is_diagnosed_magnitude_rounded_at_init(torch_one_thread):
    """PEFT 0.21, bfloat16 base, autocast_adapter_dtype=True (the default), B = 0 (the default init):
    the magnitude it stores is the bfloat16 rounding of the norm, upcast; the checker names it."""
    torch = pytest.importorskip("torch", reason="torch is not installed: PEFT's bfloat16 init is not checked")
    pytest.importorskip("peft", reason="peft is not installed: PEFT's bfloat16 init is not checked")
    init, forward, _ = _peft_ports(torch)
    with pytest.raises(testing.ConformanceError) as info:
        testing.check_init(init, forward, dtype="bfloat16", max_examples=10, seed=0, scaling="lora_alpha",
                           cases=dict(B_zero=True))
    err = info.value
    assert err.output == "magnitude" and err.hint == "magnitude_rounded_at_init"
    assert err.diagnoses[0].kind == "matches"
    u = unit_roundoff("bfloat16")
    assert 0 < abs(err.got - err.expected) <= u * abs(err.expected) * (1 + 1e-6)


@pytest.mark.parametrize("dtype", LP)
def test_peft_mixed_precision_forward_backward_merge_pass(dtype, torch_one_thread):
    """No false alarm: given the same float32 magnitude, PEFT 0.21's mixed-precision forward (three lp
    roundings), backward and merge are within the lp tolerances (measured: 300 cases per check, worst
    error / tolerance 0.07 to 0.11); only its init is flagged."""
    torch = pytest.importorskip("torch", reason="torch is not installed: PEFT's lp layer is not checked")
    pytest.importorskip("peft", reason="peft is not installed: PEFT's lp layer is not checked")
    forward, backward, merge = _peft_ports(torch)[2]
    kw = dict(dtype=dtype, max_examples=20, seed=1, scaling="lora_alpha")
    for result in (testing.check_forward(forward, **kw), testing.check_backward(backward, **kw),
                   testing.check_merge(merge, **kw)):
        assert result.examples == 20 and result.worst_ratio < 1
