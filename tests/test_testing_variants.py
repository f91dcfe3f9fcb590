"""The diagnosis engine and the conventions of dora_ref.porting.testing (v2).

Each wrong port below is a correct NumPy port with one behaviour of a real
implementation (named in the test), called the way that implementation is
written; each must be caught with that behaviour ranked first. The correct
ports written in each convention must pass.
"""
import math

import numpy as np
import pytest

from dora_ref.porting import variants as V
from dora_ref.core import dense
from dora_ref.porting import testing

FEW = dict(max_examples=30)


def norm_rows(W):
    return np.linalg.norm(W, axis=1)


def port_forward(x, W0, A, B, m, s, b, dropout_mask=None, *, eps=0.0, bias_scaled=False, clean_base_scaled=False):
    """A forward written from the formulas; the keywords switch on one real-world behaviour each."""
    V_ = W0 + s * (B @ A)
    g = m / (norm_rows(V_) + eps)
    bias = 0.0 if b is None else b
    if dropout_mask is None:
        y = g * (x @ W0.T + s * ((x @ A.T) @ B.T))
    elif clean_base_scaled:  # torchtune: y = g * base(x) + g * s * B(A(dropout(x)))
        y = g * (x @ W0.T) + g * (s * ((x * dropout_mask) @ A.T) @ B.T)
    else:
        xd = x * dropout_mask
        y = x @ W0.T + (g - 1) * (xd @ W0.T) + g * (s * ((xd @ A.T) @ B.T))
    return y + (g * bias if bias_scaled else bias)


def expect_top(check, fn, key, **kw):
    kw = {**FEW, **kw}
    with pytest.raises(testing.ConformanceError) as info:
        check(fn, **kw)
    err = info.value
    assert err.diagnoses, str(err)
    assert err.diagnoses[0].key.split(" + ")[0] == key or err.diagnoses[0].key == key, str(err)
    assert err.hint == err.diagnoses[0].key.split(" + ")[0]
    assert [d.rank for d in err.diagnoses] == list(range(1, len(err.diagnoses) + 1))
    assert err.diagnoses[0].evidence and testing.HINTS[err.hint] in str(err)
    return err


# ---------------------------------------------------------------------------
# the new variants, each caught and ranked first
# ---------------------------------------------------------------------------


def test_norm_plus_eps_is_caught_at_tiny_norms():
    """LyCORIS adds torch.finfo(dtype).eps to the norm: invisible at norms ~1, visible at ~1e-6."""
    for dtype in ("float32", "float64"):
        eps = float(np.finfo(dtype).eps)
        err = expect_top(testing.check_forward, lambda *a, **k: port_forward(*a, **k, eps=eps), "norm_plus_eps",
                         dtype=dtype, max_examples=100)
        assert err.diagnoses[0].detail == f"eps = {eps:.3g}"
        assert any("1e-6" in e for e in err.diagnoses[0].evidence)


def test_bias_scaled_in_the_backward_is_caught():
    """torchtune / fsdp_qlora: y = g * (x@V.T + b), so dm = sum(dy * (z + b)) / n."""

    def backward(dy, x, W0, A, B, m, s, b):
        g = dense.backward(dy, x, W0, A, B, m, s, detach_norm=True)
        dm = g.dmagnitude if b is None else g.dmagnitude + dy.sum(0) * b / norm_rows(W0 + s * B @ A)
        return g.dx, g.dA, g.dB, dm

    err = expect_top(testing.check_backward, backward, "bias_scaled")
    assert err.output == "dmagnitude"


def test_dropout_that_scales_the_clean_base_is_caught():
    """torchtune's dropout formula, bias added as PEFT does (the shrunk case has no bias anyway)."""
    expect_top(testing.check_forward, lambda *a, **k: port_forward(*a, **k, clean_base_scaled=True),
               "dropout_scales_clean_base", dropout=True)


def test_torchtune_forward_is_explained_by_two_variants():
    """torchtune scales the bias AND the clean base by g: on the square probes (with a bias) no single
    variant explains it; the pair does, ranked first."""
    err = expect_top(testing.check_forward,
                     lambda *a, **k: port_forward(*a, **k, clean_base_scaled=True, bias_scaled=True),
                     "dropout_scales_clean_base", dropout=True)  # the shrunk case has no bias
    assert set(err.diagnoses[0].key.split(" + ")) == {"bias_scaled", "dropout_scales_clean_base"}
    assert err.diagnoses[0].kind == "matches" and err.diagnoses[0].probes >= 2


def test_dropout_clean_base_backward_is_caught():
    def backward(dy, x, W0, A, B, m, s, b, dropout_mask):
        # gradient of y = g*(x@W0.T) + g*s*(xd@A.T)@B.T + b, the norm detached
        V_ = W0 + s * B @ A
        n = norm_rows(V_)
        g = m / n
        xd = x * dropout_mask
        dyg = dy * g
        dx = dyg @ W0 + (s * (dyg @ B) @ A) * dropout_mask
        dA = s * (dyg @ B).T @ xd
        dB = s * dyg.T @ (xd @ A.T)
        dm = np.sum(dy * (x @ W0.T + s * (xd @ A.T) @ B.T), axis=0) / n
        return dx, dA, dB, dm

    expect_top(testing.check_backward, backward, "dropout_scales_clean_base", dropout=True)


def test_per_input_column_layer_is_named_on_the_square_case():
    """The paper's ||.||_c read on an (out, in) weight: magnitude (1, in). With a magnitude (out,) it
    raises except on square layers, where it runs and gives other numbers."""

    def forward(x, W0, A, B, m, s, b):
        V_ = W0 + s * (B @ A)
        g = m / np.linalg.norm(V_, axis=0)
        return (x * g) @ V_.T + (0.0 if b is None else b)

    err = expect_top(testing.check_forward, forward, "magnitude_per_input_column")
    assert any("square" in e or "(1, in)" in e for d in err.diagnoses for e in d.evidence)


def test_fan_in_fan_out_norm_without_transpose_is_caught():
    """PEFT 0.10's Conv1D DoRA (peft PR #1588): the (in, out) stored weight added to B@A untransposed."""

    def forward(x, W0_stored, A, B, m, s, b):
        n = norm_rows(W0_stored + s * (B @ A))  # broadcasts only when in = out (or in/out = 1)
        y = (m / n) * (x @ W0_stored + s * ((x @ A.T) @ B.T))
        return y + (0.0 if b is None else b)

    expect_top(testing.check_forward, forward, "fan_in_fan_out_norm_untransposed", fan_in_fan_out=True)


def test_conv1d_unmerge_dividing_rows_of_the_stored_weight_is_caught():
    """PEFT 0.11-0.20's Conv1D unmerge: the merge right, the unmerge divides the (in, out) weight per row."""

    def merge(W0_stored, A, B, m, s):
        V_ = W0_stored.T + s * (B @ A)
        return ((m / norm_rows(V_))[:, None] * V_).T

    def unmerge(W_stored, A, B, m, s, n):
        return W_stored / (m / n)[:, None] - (s * (B @ A)).T

    err = expect_top(testing.check_merge, merge, "unmerge_factor_on_columns", unmerge=unmerge, fan_in_fan_out=True)
    assert err.output in ("W0_unmerged", None)


def test_port_that_expects_batched_x_is_diagnosed():
    def forward(x, W0, A, B, m, s, b):
        batch, seq, _ = x.shape  # written for (batch, seq, features)
        y = port_forward(x.reshape(batch * seq, -1), W0, A, B, m, s, b)
        return y.reshape(batch, seq, -1)

    err = expect_top(testing.check_forward, forward, "expects_batched_x")
    assert err.diagnoses[0].kind == "convention" and "x_ndim=3" in err.diagnoses[0].detail
    assert "ValueError" in err.diagnoses[0].evidence[0]
    testing.check_forward(forward, x_ndim=3, **FEW)  # and passes as written


def test_port_that_wants_a_magnitude_of_shape_out_1_is_diagnosed():
    def forward(x, W0, A, B, m, s, b):  # the paper authors' code: m is an nn.Linear(1, out) weight
        return port_forward(x, W0, A, B, m[:, 0], s, b)

    err = expect_top(testing.check_forward, forward, "magnitude_shape_out_1")
    assert "magnitude='(out, 1)'" in err.diagnoses[0].detail
    testing.check_forward(forward, magnitude="(out, 1)", **FEW)


def test_port_with_the_weight_in_the_other_layout_is_diagnosed():
    def forward(x, W0_stored, A, B, m, s, b):
        return port_forward(x, W0_stored.T, A, B, m, s, b)

    expect_top(testing.check_forward, forward, "weight_layout_transposed")


def test_the_old_variants_still_rank_first():
    """v1's hints keep firing, now as the top of a ranking."""
    expect_top(testing.check_forward, lambda x, W0, A, B, m, s, b: port_forward(x, W0, A, B, m, s, b, bias_scaled=True),
               "bias_scaled")

    def merge(W0, A, B, m, s):
        return W0 + s * B @ A

    expect_top(testing.check_merge, merge, "merge_without_magnitude")


# ---------------------------------------------------------------------------
# the conventions: correct ports written each way pass
# ---------------------------------------------------------------------------


def column_port(x, W0, A, B, m, s, b):
    """A per-input-column port (LyCORIS wd_on_out=False): magnitude (1, in)."""
    V_ = W0 + s * (B @ A)
    W = V_ * (m / np.linalg.norm(V_, axis=0, keepdims=True))
    return x @ W.T + (0.0 if b is None else b)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_per_input_column_layer_passes_as_a_named_convention(dtype):
    testing.check_forward(column_port, magnitude="(1, in)", dtype=dtype, **FEW)

    def merge(W0, A, B, m, s):
        V_ = W0 + s * (B @ A)
        return V_ * (m / np.linalg.norm(V_, axis=0, keepdims=True))

    def unmerge(W, A, B, m, s, n):
        return W / (m / n) - s * (B @ A)

    testing.check_merge(merge, unmerge, magnitude="(1, in)", dtype=dtype, **FEW)
    # the per-output port is not silently accepted as the per-column layer
    with pytest.raises(testing.ConformanceError):
        testing.check_forward(port_forward, magnitude="(1, in)", dtype=dtype, **FEW)


def test_per_input_column_reference_gradient_matches_finite_differences():
    """The column layer's hand-derived gradients (detached and exact) against central differences."""
    case = testing.make_case(N=3, in_features=4, out_features=5, r=2, magnitude_axis="in", seed=3)
    c = case.astype(np.float64)

    def loss(**over):
        cc = testing.Case(**{**c.__dict__, **over})
        return float(np.sum(c.dy * V.column_layer(cc)["y"]))

    def loss_detached(n_fixed, **over):
        cc = testing.Case(**{**c.__dict__, **over})
        Vv = cc.W0 + cc.scaling * cc.B @ cc.A
        return float(np.sum(c.dy * (cc.x @ (Vv * (cc.magnitude / n_fixed)).T + cc.bias)))

    n0 = np.linalg.norm(c.W0 + c.scaling * c.B @ c.A, axis=0)
    h = 1e-6
    for detach in (True, False):
        ref = V.column_layer(c, detach)
        for name, arr in (("x", c.x), ("A", c.A), ("B", c.B), ("magnitude", c.magnitude)):
            num = np.zeros_like(arr)
            for idx in np.ndindex(arr.shape):
                plus, minus = arr.copy(), arr.copy()
                plus[idx] += h
                minus[idx] -= h
                f = (lambda **o: loss_detached(n0, **o)) if detach else loss
                num[idx] = (f(**{name: plus}) - f(**{name: minus})) / (2 * h)
            key = "d" + name
            np.testing.assert_allclose(ref[key], num, rtol=1e-6, atol=1e-8, err_msg=f"{key} detach={detach}")


def test_lora_alpha_scaling_convention():
    """PEFT-style ports take (lora_alpha, r, use_rslora) and compute s themselves; alpha = s*r is inexact
    for s = 1/3, so the checker draws lora_alpha and computes s as PEFT does."""
    seen = set()

    def forward(x, W0, A, B, m, scaling, b):
        lora_alpha, r, use_rslora = scaling
        assert r == A.shape[0]
        seen.add(use_rslora)
        s = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        return port_forward(x, W0, A, B, m, s, b)

    testing.check_forward(forward, scaling="lora_alpha", **FEW)
    assert seen == {True, False}


def test_fan_in_fan_out_batched_x_unmerge_without_norm_and_callable_dropout():
    calls = []

    def forward(x, W0_stored, A, B, m, s, b, dropout):
        xd = dropout(x)
        calls.append(x.ndim)
        x2, xd2 = x.reshape(-1, x.shape[-1]), xd.reshape(-1, x.shape[-1])
        mask = np.divide(xd2, x2, out=np.zeros_like(x2), where=x2 != 0)  # recovers the mask where x != 0
        y = port_forward(x2, W0_stored.T, A, B, m, s, b, dropout_mask=mask)
        return y.reshape(*x.shape[:-1], -1)

    testing.check_forward(forward, fan_in_fan_out=True, x_ndim=3, dropout=True, dropout_as="callable", **FEW)
    assert set(calls) == {3}

    class Stateful:  # keeps n from its own merge, as PEFT does
        def merge(self, W0_stored, A, B, m, s):
            V_ = W0_stored.T + s * B @ A
            self.n = norm_rows(V_)
            return ((m / self.n)[:, None] * V_).T

        def unmerge(self, W_stored, A, B, m, s):
            return (W_stored.T / (m / self.n)[:, None] - s * B @ A).T

    port = Stateful()
    testing.check_merge(port.merge, port.unmerge, fan_in_fan_out=True, unmerge_gets_norm=False, **FEW)


def test_report_all_returns_every_failing_output():
    def backward(dy, x, W0, A, B, m, s, b):
        g = dense.backward(dy, x, W0, A, B, m, s, detach_norm=True)
        return g.dx, g.dA, 2 * g.dB, g.dmagnitude * norm_rows(W0 + s * B @ A)

    rep = testing.check_backward(backward, report="all", **FEW)
    assert not rep.ok
    assert sorted(rep.passed) == ["dA", "dx"]
    failed = {f.output: f for f in rep.failures}
    assert sorted(failed) == ["dB", "dmagnitude"]
    assert failed["dmagnitude"].hint == "dmagnitude_missing_norm"
    assert "2 output(s) pass, 2 fail" in str(rep)


def test_cases_restricts_the_drawn_cases():
    seen = []

    def forward(x, W0, A, B, m, s, b):
        seen.append((b is None, W0.shape[1]))
        return port_forward(x, W0, A, B, m, s, b)

    testing.check_forward(forward, cases=dict(bias=False, in_features=range(2, 4)), **FEW)
    assert {s[0] for s in seen} == {True} and {s[1] for s in seen} <= {2, 3}
    with pytest.raises(ValueError, match="unknown parameter"):
        testing.check_forward(forward, cases=dict(nonsense=1))
    with pytest.raises(ValueError, match="dtype"):
        testing.check_forward(forward, cases=dict(dtype="float32"))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(magnitude="(in,)"), ValueError, "magnitude must be"),
    (dict(scaling="alpha"), ValueError, "scaling must be"),
    (dict(x_ndim=4), ValueError, "x_ndim"),
    (dict(dropout_as="module"), ValueError, "dropout_as"),
    (dict(fan_in_fan_out=1), TypeError, "fan_in_fan_out"),
    (dict(report="some"), ValueError, "report"),
    (dict(cases=[1]), TypeError, "cases"),
    (dict(colour="red"), TypeError, "unknown argument"),
    (dict(convention=testing.Convention(x_ndim=3), x_ndim=3), TypeError, "both"),
])
def test_bad_convention_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        testing.check_forward(port_forward, **kwargs)


def test_per_input_column_with_dropout_is_refused():
    with pytest.raises(ValueError, match="per-input-column"):
        testing.check_forward(column_port, magnitude="(1, in)", dropout=True)


# ---------------------------------------------------------------------------
# the initialisation check
# ---------------------------------------------------------------------------


def np_init(W0, A, B, s):
    return norm_rows(W0 + s * (B @ A))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_correct_init_and_identity_pass(dtype):
    r = testing.check_init(np_init, port_forward, dtype=dtype, **FEW)
    assert r.check == "init" and r.examples == FEW["max_examples"] and r.worst_ratio < 1


def test_init_from_W0_alone_is_caught():
    """Right only when B = 0: PEFT computes the initial magnitude from W0 + s*B@A with the B it has."""
    expect_top(testing.check_init, lambda W0, A, B, s: norm_rows(W0), "norm_of_W0")


def test_init_over_the_wrong_axis_is_caught():
    expect_top(testing.check_init, lambda W0, A, B, s: np.linalg.norm(W0 + s * B @ A, axis=0), "norm_axis")


def test_broken_identity_at_b_zero_is_caught():
    """A forward that is not the base layer at B = 0 with its own initial magnitude (here: bias scaled
    by g, which only shows once g != 1 -- so the identity holds; then a forward that adds an epsilon to
    the norm, which breaks it)."""
    testing.check_init(np_init, lambda *a: port_forward(*a, bias_scaled=True), **FEW)
    with pytest.raises(testing.ConformanceError) as info:
        testing.check_init(np_init, lambda *a: port_forward(*a, eps=1e-3), **FEW)
    assert info.value.output == "y_identity"


# ---------------------------------------------------------------------------
# conventions in the backward (autograd ports: a route independent of the reference's formulas)
# ---------------------------------------------------------------------------


def _torch_backward(forward, magnitude_shape=None):
    torch = pytest.importorskip("torch", reason="torch is not installed")

    def backward(dy, x, W0, A, B, m, s, b, **kw):
        t = lambda a: None if a is None else torch.from_numpy(np.array(a))  # noqa: E731
        xs, As, Bs, ms = (t(a).requires_grad_() for a in (x, A, B, m))
        y = forward(torch, xs, t(W0), As, Bs, ms, s, t(b), **{k: t(v) for k, v in kw.items()})
        y.backward(t(dy))
        return xs.grad.numpy(), As.grad.numpy(), Bs.grad.numpy(), ms.grad.numpy()

    return backward


@pytest.mark.parametrize("detach", [True, False])
def test_per_input_column_backward_by_autograd_passes(detach):
    """The per-input-column layer's reference gradient agrees with PyTorch autograd (both variants)."""

    def forward(torch, x, W0, A, B, m, s, b):
        V_ = W0 + s * (B @ A)
        n = torch.linalg.norm(V_, dim=0, keepdim=True)
        n = n.detach() if detach else n
        y = x @ (V_ * (m / n)).T
        return y if b is None else y + b

    testing.check_backward(_torch_backward(forward), detach_norm=detach, magnitude="(1, in)", **FEW)


def test_magnitude_out_1_and_batched_x_backward_by_autograd_passes():
    def forward(torch, x, W0, A, B, m, s, b):  # m (out, 1) as the paper authors' code; x (batch, seq, in)
        n = torch.linalg.norm(W0 + s * (B @ A), dim=1, keepdim=True).detach()
        y = (x @ W0.T + s * (x @ A.T) @ B.T) * (m / n).T
        return y if b is None else y + b

    testing.check_backward(_torch_backward(forward), magnitude="(out, 1)", x_ndim=3, **FEW)
    testing.check_backward(_torch_backward(forward), magnitude="(out, 1)", x_ndim=3, dtype="float32", **FEW)


def test_wrong_output_shape_says_what_it_suggests():
    """A 3-D output for a 2-D x (the magnitude (out, 1) broadcast the wrong way) is named, and the retries
    find the convention under which the port is right."""

    def forward(x, W0, A, B, m, s, b):  # written for the paper authors' (out, 1) magnitude
        n = norm_rows(W0 + s * (B @ A))[:, None]
        y = (m / n).T * (x @ W0.T + s * ((x @ A.T) @ B.T))
        return y + (0.0 if b is None else b)

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(forward, **FEW)
    err = info.value
    assert err.output == "y" and err.index is None
    assert "dimensions of size 1" in str(err) or "shape" in str(err)
    assert err.hint == "magnitude_shape_out_1", str(err)


def test_diagnosis_of_a_non_square_shrunk_case_does_not_crash():
    """Regression: the variants' evaluation formed every unmerge, the per-column one included, which does not
    broadcast on an (out, in) weight with in != out (both > 1): diagnosing a port on such a case raised
    ValueError instead of naming the mistake."""
    def forward(x, W0, A, B, m, s, b):  # the scaling left out of the norm
        y = (m / np.linalg.norm(W0 + B @ A, axis=1)) * (x @ W0.T + s * (x @ A.T) @ B.T)
        return y if b is None else y + b

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(forward, max_examples=30, cases=dict(in_features=4, out_features=5))
    assert info.value.hint == "scaling_outside_norm"


def test_a_port_that_scales_the_low_rank_term_twice_gets_the_scaling_twice_hint():
    """A new user's port (session 17) scaled the low-rank term by s twice (s*s*(x@A.T)@B.T, the
    norm right) and was told 'hint: none' by check_forward and check_backward. Its
    gradients here come from torch autograd of that forward (norm detached), not from
    dora_ref's formulas."""
    torch = pytest.importorskip("torch")

    def forward(x, W0, A, B, m, s, b):
        V = W0 + s * (B @ A)
        y = (m / np.linalg.norm(V, axis=1)) * (x @ W0.T + s * s * (x @ A.T) @ B.T)
        return y if b is None else y + b

    def backward(dy, x, W0, A, B, m, s, b):
        t = {k: torch.tensor(v, requires_grad=k in ("x", "A", "B", "m"))
             for k, v in dict(x=x, W0=W0, A=A, B=B, m=m).items()}
        n = torch.linalg.norm(t["W0"] + s * (t["B"] @ t["A"]), dim=1).detach()
        y = (t["m"] / n) * (t["x"] @ t["W0"].T + s * s * (t["x"] @ t["A"].T) @ t["B"].T)
        (y * torch.tensor(dy)).sum().backward()
        return tuple(t[k].grad.numpy() for k in ("x", "A", "B", "m"))

    for check, port in ((testing.check_forward, forward), (testing.check_backward, backward)):
        with pytest.raises(testing.ConformanceError) as info:
            check(port, max_examples=30)
        assert info.value.hint == "scaling_twice", str(info.value)
        assert "scaled twice" in str(info.value)
    # at s = -1, s * s = 1 = -s (round 2: the rule skipped it as if s * s were s there)
    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(forward, max_examples=30, cases=dict(scaling=-1.0))
    assert info.value.hint == "scaling_twice", str(info.value)


def _float32_inside_forward(x, W0, A, B, m, s, b):
    f = lambda a: None if a is None else np.asarray(a, np.float32)  # noqa: E731
    x, W0, A, B, m = map(f, (x, W0, A, B, m))
    V = W0 + np.float32(s) * (B @ A)
    y = (m / np.linalg.norm(V, axis=1)) * (x @ W0.T + np.float32(s) * (x @ A.T) @ B.T)
    return (y if b is None else y + f(b)).astype(np.float64)  # float64 out: only the inside is float32


def _float32_inside_init(W0, A, B, s):
    V = np.asarray(W0, np.float32) + np.float32(s) * (np.asarray(B, np.float32) @ np.asarray(A, np.float32))
    return np.linalg.norm(V, axis=1).astype(np.float64)


@pytest.mark.parametrize("check, port", [(testing.check_forward, _float32_inside_forward),
                                         (testing.check_init, _float32_inside_init)], ids=["forward", "init"])
def test_a_port_computing_in_float32_inside_a_float64_check_is_told_so(check, port):
    """A new user's port (session 17) initialised the magnitude in float32 under a float64
    check ('expected 0.002255958826619081, got 0.002255961298942566') and got 'hint: none'."""
    with pytest.raises(testing.ConformanceError) as info:
        check(port, max_examples=30)
    assert info.value.hint == "computed_in_float32", str(info.value)
    assert "x the float32 one" in str(info.value)
    # the same port passes the float32 check: the formula is right
    if check is testing.check_init:
        def port32(W0, A, B, s):
            return port(W0, A, B, s).astype(np.float32)
    else:
        def port32(*a):
            return port(*a).astype(np.float32)
    assert check(port32, dtype="float32", max_examples=30).examples == 30


def test_a_wrong_formula_with_a_small_error_is_not_called_a_float32_port():
    """scaling_outside_norm's error is far above float32's tolerance: its own hint, not this one."""
    def forward(x, W0, A, B, m, s, b):
        y = (m / np.linalg.norm(W0 + B @ A, axis=1)) * (x @ W0.T + s * (x @ A.T) @ B.T)
        return y if b is None else y + b
    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(forward, max_examples=30)
    assert info.value.hint == "scaling_outside_norm"


def _detached_backward(dy, x, W0, A, B, m, s, b):
    """A correct backward (detached norm), from the dense definition."""
    g = dense.backward(dy, x, W0, A, B, m, s, detach_norm=True)
    return g.dx, g.dA, g.dB, g.dmagnitude


@pytest.mark.parametrize("mistake, said", [
    # dA without s (s = 2): 1/s on both widened cases (s = 2, then 8), not the literal 1/2
    (lambda g: (g[0], g[1] / g.s, g[2], g[3]),
     "your dA is dora_ref's times one factor at every element: 0.5 on a case widened to N=5, "
     "in=6, out=7, r=3, s=2 and 0.125 on N=6, in=9, out=11, r=5, s=8 (= 1/s)"),
    # d(m**2) / dm: the literal 2, not s (a second new user's case: it was named "s" at s = 2)
    (lambda g: (g[0], g[1], g[2], 2 * g[3]),
     "your dmagnitude is 2 times dora_ref's at every element (= 2), on two cases widened"),
    (lambda g: (-g[0], g[1], g[2], g[3]),  # a sign
     "your dx is -1 times dora_ref's at every element (= -1), on two cases widened"),
    # a mean over the batch (an adversary's case: named 1/r where the widened N and r were both 3)
    (lambda g: (g[0], g[1] / g.N, g[2], g[3]),
     "your dA is dora_ref's times one factor at every element: 0.2 on a case widened to N=5, "
     "in=6, out=7, r=3, s=2 and 0.166667 on N=6, in=9, out=11, r=5, s=8 (= 1/N)"),
])
def test_a_port_off_by_a_constant_factor_is_told_the_factor(mistake, said):
    """New users' ports (dA / s, 2 * dmagnitude) got 'hint: none' on a one-element shrunk case:
    the checker now runs the port on two wider cases (another s and r on the second) and
    names a constant ratio only where it fits both."""
    def backward(dy, x, W0, A, B, m, s, b):
        grads = list(_detached_backward(dy, x, W0, A, B, m, s, b))

        class G(list):
            pass
        g = G(grads)
        g.s, g.N = s, x.shape[0]
        return tuple(mistake(g))

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_backward(backward, max_examples=30, cases=dict(scaling=2.0))
    text = str(info.value)
    assert "hint: none" in text
    assert f"but {said}" in text, text


def test_a_port_off_by_more_than_a_constant_gets_no_factor():
    """An error that is not one constant times the reference (dA plus a constant): no factor line."""
    def backward(*args):
        dx, dA, dB, dm = _detached_backward(*args)
        return dx, dA + 0.25, dB, dm

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_backward(backward, max_examples=30, cases=dict(scaling=2.0))
    assert "times dora_ref's" not in str(info.value), str(info.value)
