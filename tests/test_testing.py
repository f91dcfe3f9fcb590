"""The conformance checker: correct ports pass, each usual mistake is caught and named.

Every wrong port below is a correct one with a single, realistic mistake
(the ones public DoRA ports have shipped with). Each must fail with a
ConformanceError whose ``hint`` names that mistake and whose message says
which output, which index, expected vs got and the tolerance.
"""
import importlib.util
import pathlib
import sys

import numpy as np
import pytest

from dora_ref.core import dense

from dora_ref.porting import cases as porting_cases
from dora_ref.porting import runner, testing
from dora_ref.core import functional as F
from dora_ref.porting.tolerance import rtol

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
FEW = dict(max_examples=20)

# ---------------------------------------------------------------------------
# a plain NumPy port, written from the formulas (not from dora_ref's kernels)
# ---------------------------------------------------------------------------


def np_forward(x, W0, A, B, m, s, b, dropout_mask=None, *, norm_axis=1, s_in_norm=True,
               bias_scaled=False, naive_dropout=False):
    n = np.linalg.norm(W0 + (s if s_in_norm else 1.0) * (B @ A), axis=norm_axis)
    g = m / n
    if dropout_mask is None or naive_dropout:
        xd = x if dropout_mask is None else x * dropout_mask
        z = xd @ W0.T + s * ((xd @ A.T) @ B.T)
        y = g * (z + b) if (bias_scaled and b is not None) else g * z
    else:
        xd = x * dropout_mask
        y = x @ W0.T + (g - 1) * (xd @ W0.T) + g * (s * ((xd @ A.T) @ B.T))
    if b is not None and not bias_scaled:
        y = y + b
    return y


def np_merge(W0, A, B, m, s, *, with_magnitude=True):
    V = W0 + s * (B @ A)
    if not with_magnitude:
        return V
    return (m / np.linalg.norm(V, axis=1))[:, None] * V


def np_unmerge(W_merged, A, B, m, s, n):
    return W_merged / (m / n)[:, None] - s * (B @ A)


def np_backward(detach_norm):
    """The paper's gradient formulas (dora_ref.core.dense), a route independent of functional's."""

    def backward(dy, x, W0, A, B, m, s, b, dropout_mask=None):
        return dense.backward(dy, x, W0, A, B, m, s, detach_norm=detach_norm, dropout_mask=dropout_mask)

    return backward


def expect_hint(check, fn, hint, *args, **kw):
    with pytest.raises(testing.ConformanceError) as info:
        check(fn, *args, **FEW, **kw)
    err = info.value
    assert err.hint == hint, str(err)
    msg = str(err)
    assert testing.HINTS[hint] in msg
    if err.index is not None:  # a value mismatch, said in words
        for word in (f"output {err.output}", "index", "expected", "got", "tolerance", "rtol", "k = "):
            assert word in msg, msg
        assert abs(err.got - err.expected) > err.bound
    assert "make_case(**" in msg
    return err


# ---------------------------------------------------------------------------
# correct ports pass
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_correct_numpy_port_passes(dtype):
    for dropout in (False, True):
        res = testing.check_forward(np_forward, dtype=dtype, dropout=dropout, **FEW)
        assert res.examples == 20 and 0 <= res.worst_ratio < 1
        for detach in (True, False):
            res = testing.check_backward(np_backward(detach), detach_norm=detach, dtype=dtype,
                                         dropout=dropout, **FEW)
            assert res.examples == 20 and res.worst_ratio < 1
    res = testing.check_merge(np_merge, np_unmerge, dtype=dtype, **FEW)
    assert res.examples == 20 and res.worst_ratio < 1


def test_plumbing_checker_accepts_dora_refs_own_signatures():
    """Plumbing (the checker's expected values are dora_ref.core.functional's own):
    dora_forward and merge return tuples, and the checker takes their first element.
    The checker's verdicts are tested on independent ports (np_forward and the wrong
    ports) above and below."""
    testing.check_forward(F.dora_forward, **FEW)
    testing.check_merge(F.merge, F.unmerge, **FEW)


def test_float32_port_passes_float32_check_by_a_margin():
    """Float32 rounding uses a small part of the float32 bound (the bound is not slack to hide bugs)."""
    res = testing.check_forward(np_forward, dtype="float32", max_examples=60)
    assert 0 < res.worst_ratio < 0.5


# ---------------------------------------------------------------------------
# the wrong ports of the issue, each caught with its hint
# ---------------------------------------------------------------------------


def test_norm_over_wrong_axis_is_caught():
    err = expect_hint(testing.check_forward, lambda *a, **k: np_forward(*a, **k, norm_axis=0), "norm_axis")
    assert err.check == "forward"


def test_scaling_left_out_of_norm_is_caught():
    expect_hint(testing.check_forward, lambda *a, **k: np_forward(*a, **k, s_in_norm=False),
                "scaling_outside_norm")


def test_bias_multiplied_by_magnitude_is_caught():
    err = expect_hint(testing.check_forward, lambda *a, **k: np_forward(*a, **k, bias_scaled=True),
                      "bias_scaled")
    assert err.case.bias is not None  # the shrunk case keeps what the bug needs: a bias


def test_merge_without_magnitude_is_caught():
    err = expect_hint(testing.check_merge, lambda *a: np_merge(*a, with_magnitude=False),
                      "merge_without_magnitude")
    assert err.output == "W_merged"


# ---------------------------------------------------------------------------
# the other known mistakes
# ---------------------------------------------------------------------------


def test_naive_dropout_formula_is_caught():
    expect_hint(testing.check_forward, lambda *a, **k: np_forward(*a, **k, naive_dropout=True),
                "naive_dropout", dropout=True)


def test_dropout_mask_ignored_is_caught():
    expect_hint(testing.check_forward, lambda *a, dropout_mask: np_forward(*a), "dropout_ignored", dropout=True)


def test_norm_not_detached_is_caught():
    expect_hint(testing.check_backward, np_backward(False), "norm_not_detached", detach_norm=True)


def test_norm_detached_when_exact_asked_is_caught():
    expect_hint(testing.check_backward, np_backward(True), "norm_detached", detach_norm=False)


def test_dmagnitude_missing_division_by_norm_is_caught():
    def backward(dy, x, W0, A, B, m, s, b):
        dx, dA, dB, dm = np_backward(True)(dy, x, W0, A, B, m, s, b)
        return dx, dA, dB, dm * np.linalg.norm(W0 + s * B @ A, axis=1)

    expect_hint(testing.check_backward, backward, "dmagnitude_missing_norm")


def test_lora_gradients_without_g_are_caught():
    def backward(dy, x, W0, A, B, m, s, b):
        dx, _, _, dm = np_backward(True)(dy, x, W0, A, B, m, s, b)
        return dx, s * (dy @ B).T @ x, s * dy.T @ (x @ A.T), dm

    expect_hint(testing.check_backward, backward, "grads_without_g")


def test_merge_without_norm_is_caught():
    expect_hint(testing.check_merge, lambda W0, A, B, m, s: m[:, None] * (W0 + s * B @ A), "merge_without_norm")


def test_unmerge_without_magnitude_is_caught():
    err = expect_hint(testing.check_merge, np_merge, "unmerge_without_magnitude",
                      lambda W, A, B, m, s, n: W - s * B @ A)
    assert err.output == "W0_unmerged"


def test_factor_on_columns_is_caught():
    def merge(W0, A, B, m, s):
        V = W0 + s * B @ A
        return (m / np.linalg.norm(V, axis=1))[None, :] * V

    expect_hint(testing.check_merge, merge, "factor_on_columns")


# ---------------------------------------------------------------------------
# what the checker reports, and its own argument checks
# ---------------------------------------------------------------------------


def test_a_port_that_raises_is_reported_on_a_minimal_case():
    def forward(x, W0, A, B, m, s, b):
        if W0.shape[0] != W0.shape[1]:
            raise RuntimeError("only square layers")
        return np_forward(x, W0, A, B, m, s, b)

    with pytest.raises(testing.ConformanceError, match="raised RuntimeError: only square layers") as info:
        testing.check_forward(forward, **FEW)
    N, i, o, r = info.value.case.shapes()
    assert (N, r) == (1, 1) and abs(i - o) == 1  # shrunk to the smallest non-square layer


def test_a_port_that_writes_to_its_inputs_is_reported():
    def forward(x, W0, A, B, m, s, b):
        y = np_forward(x, W0, A, B, m, s, b)
        x *= 0
        return y

    with pytest.raises(testing.ConformanceError, match="wrote to its input 'x'"):
        testing.check_forward(forward, **FEW)


def test_wrong_output_shape_is_reported():
    with pytest.raises(testing.ConformanceError, match=r"output y has shape"):
        testing.check_forward(lambda *a: np_forward(*a).T, **FEW)


def test_a_float32_computation_fails_the_float64_check():
    """The numpy-ml lesson: a port that silently computes in float32 is not float64-exact."""

    def forward(x, W0, A, B, m, s, b):
        f = lambda a: None if a is None else a.astype(np.float32)  # noqa: E731
        return np_forward(f(x), f(W0), f(A), f(B), f(m), s, f(b)).astype(np.float64)

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(forward, **FEW)
    assert info.value.hint == "computed_in_float32"  # since session 17; before: no hint
    err = abs(info.value.got - info.value.expected)
    assert info.value.bound < err < 1e-4 * max(1.0, abs(info.value.expected))


def test_tiny_relative_error_is_caught_in_float64():
    """The bound is tight enough to see a 1e-9 relative error in float64."""
    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(lambda *a: np_forward(*a) * (1 + 1e-9), **FEW)
    assert info.value.hint != "computed_in_float32"  # far below float32's own rounding


def test_backward_may_return_a_mapping():
    def backward(dy, x, W0, A, B, m, s, b):
        return np_backward(True)(dy, x, W0, A, B, m, s, b)._asdict()

    testing.check_backward(backward, **FEW)
    with pytest.raises(testing.ConformanceError, match="without \\['dmagnitude'\\]"):
        testing.check_backward(lambda *a: {k: v for k, v in backward(*a).items() if k != "dmagnitude"}, **FEW)


def test_same_seed_draws_the_same_cases():
    seen = [], []
    for log in seen:
        def forward(x, W0, A, B, m, s, b, log=log):
            log.append((x.shape, W0.shape, A.shape, s, float(x.flat[0])))
            return np_forward(x, W0, A, B, m, s, b)

        testing.check_forward(forward, max_examples=10, seed=3)
    assert seen[0] == seen[1] and len(seen[0]) == 10 + len(runner.WIDE_CASES)  # the draws, then the wide cases


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dtype="int32"), ValueError, "dtype must be float64, float32, bfloat16 or float16"),
    (dict(max_examples=0), ValueError, "max_examples"),
])
def test_bad_check_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        testing.check_forward(np_forward, **kwargs)


def test_not_callable():
    with pytest.raises(TypeError, match="needs a callable"):
        testing.check_forward(42)
    with pytest.raises(TypeError, match="unmerge must be callable"):
        testing.check_merge(np_merge, unmerge=3)


def test_missing_hypothesis_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match="pip install hypothesis"):
        testing.check_forward(np_forward)


# ---------------------------------------------------------------------------
# the reference and the tolerances the checker uses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    dict(), dict(B_zero=True, magnitude="init"), dict(dropout_p=0.5), dict(weight_scale=1e3, r=6),
    dict(N=1, in_features=1, out_features=1, r=1),
])
def test_reference_agrees_with_dense_definition(params):
    case = testing.make_case(**params)
    for detach in (True, False):
        ref = testing.reference(case, detach_norm=detach)
        tols = testing.tolerances(case, detach_norm=detach)
        c = case
        want = dense.backward(c.dy, c.x, c.W0, c.A, c.B, c.magnitude, c.scaling, detach_norm=detach,
                              dropout_mask=c.dropout_mask)._asdict()
        want["y"] = dense.forward(c.x, c.W0, c.A, c.B, c.magnitude, c.scaling, c.bias, dropout_mask=c.dropout_mask)
        want["W_merged"] = dense.merged_weight(c.W0, c.A, c.B, c.magnitude, c.scaling)
        for name, value in want.items():
            assert np.all(np.abs(ref[name] - value) <= tols[name]["atol"]), name


def test_tolerances_follow_the_table():
    case = testing.make_case(N=3, in_features=4, out_features=5, r=2, dtype="float32")
    t = testing.tolerances(case)
    assert t["y"]["k"] == 4 + 2 and t["y"]["rtol"] == rtol(np.float32, 6)
    assert t["dA"]["k"] == 3 + 4 + 5 + 2
    assert all(v["atol"] == v["rtol"] * v["scale"] for v in t.values())


def test_cancellation_needs_the_term_scale():
    """Nearly cancelling W0 + s*B@A: a correct float32 port's error is far above rtol * max|y|
    (the default scale of tolerance.assert_close) yet within the term-scale bound."""
    c = testing.make_case(N=4, in_features=16, out_features=8, r=4, bias=False, seed=0)
    W0 = -c.scaling * (c.B @ c.A) + 1e-3 * c.W0  # rows of V are ~1e-3 of their terms
    m = np.linalg.norm(W0 + c.scaling * (c.B @ c.A), axis=1)
    near = testing.Case(c.x, W0, c.A, c.B, m, c.scaling, None, c.dy, None).astype(np.float32)
    expected = testing.reference(near)["y"]
    tol = testing.tolerances(near)["y"]
    err = np.max(np.abs(np_forward(near.x, near.W0, near.A, near.B, near.magnitude, near.scaling, None) - expected))
    assert err <= tol["atol"]
    assert err > 10 * tol["rtol"] * np.max(np.abs(expected))


def test_make_case_is_deterministic_and_checks_its_magnitude_mode():
    a, b = testing.make_case(seed=5), testing.make_case(seed=5)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("x", "W0", "A", "B", "magnitude", "dy"))
    init = testing.make_case(magnitude="init")
    np.testing.assert_allclose(init.magnitude, F.column_norm(init.W0, init.A, init.B, init.scaling), rtol=1e-15)
    with pytest.raises(ValueError, match="magnitude must be"):
        testing.make_case(magnitude="random")


# ---------------------------------------------------------------------------
# the worked PyTorch port (skips, visibly, without torch)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_port():
    pytest.importorskip("torch", reason="torch is not installed: the PyTorch port is not checked")
    spec = importlib.util.spec_from_file_location("torch_port", EXAMPLES / "torch_port.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_port_passes(torch_port, dtype):
    tp = torch_port
    testing.check_forward(tp.forward, dtype=dtype, **FEW)
    testing.check_forward(tp.forward, dtype=dtype, dropout=True, **FEW)
    for detach in (True, False):
        testing.check_backward(tp.make_backward(detach), detach_norm=detach, dtype=dtype, **FEW)
    testing.check_backward(tp.make_backward(True), dtype=dtype, dropout=True, **FEW)
    testing.check_merge(tp.merge, tp.unmerge, dtype=dtype, **FEW)


def test_torch_port_with_norm_on_wrong_axis_is_caught(torch_port, monkeypatch):
    import torch

    monkeypatch.setattr(torch_port, "weight_norm",
                        lambda W0, A, B, s: torch.linalg.norm(W0 + s * (B @ A), dim=0))
    expect_hint(testing.check_forward, torch_port.forward, "norm_axis")


def test_torch_port_with_norm_not_detached_is_caught(torch_port):
    expect_hint(testing.check_backward, torch_port.make_backward(detach_norm=False), "norm_not_detached")


# ---------------------------------------------------------------------------
# the hints themselves
# ---------------------------------------------------------------------------


def test_every_variant_is_told_apart_on_a_probe():
    """Each known variant changes the numbers of at least one of the diagnosis probes (beyond 100x the
    tolerance), so each one can be diagnosed; every variant has a hint text."""
    from dora_ref.porting import diagnosis as D
    from dora_ref.porting import variants as V

    seen = set()
    for dropout in (False, True):
        for conv in (testing.Convention(), testing.Convention(fan_in_fan_out=True)):
            case = porting_cases._diagnostic_case(np.float64, dropout)
            for _, probe in D._probes(case, raised=False):
                c64 = probe.astype(np.float64)
                for check in ("forward", "backward", "merge"):
                    for detach in (True, False):
                        ref = testing.reference(probe, detach_norm=detach)
                        tols = testing.tolerances(probe, detach_norm=detach)
                        for key, over, eps in D._candidates(probe, check, detach, conv, True):
                            var = D._variant(c64, over, detach, conv)
                            names = D._names(check, True)
                            if D._ratio(var, ref, tols, names) > 100:
                                seen.add(key)
    from dora_ref.porting.runner import _reference_and_tolerances

    for _, probe in D._probes(porting_cases._diagnostic_case("bfloat16", False), raised=False):  # init, lp
        ref, tols = _reference_and_tolerances("init", probe, True)
        for key, over, eps in D._candidates(probe, "init", True, testing.Convention(), True):
            var = D._variant(probe.astype(np.float64), over, True, testing.Convention(), "init", ref, probe.dtype)
            if D._ratio(var, ref, tols, D._names("init", True)) > 100:
                seen.add(key)
    # a port that computes s from (lora_alpha, r, use_rslora): the diagnostic case with an alpha
    alpha = testing.make_case(**dict(porting_cases._diagnostic_case(np.float64, False).params, lora_alpha=4.0))
    for _, probe in D._probes(alpha, raised=False):
        for key, over, eps in D._candidates(probe, "forward", True, testing.Convention(scaling="lora_alpha"), True):
            var = D._variant(probe.astype(np.float64), over, True, testing.Convention(scaling="lora_alpha"))
            if D._ratio(var, testing.reference(probe), testing.tolerances(probe), ("y",)) > 100:
                seen.add(key)
    assert seen == set(V.VARIANTS)
    assert set(V.VARIANTS) <= set(testing.HINTS)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r_asked", "rslora_asked"])
def test_port_with_the_other_scaling_rule_gets_the_scaling_rule_hint(use_rslora):
    # new user, session 10: a port that always took lora_alpha / sqrt(r) was told "hint: none"
    def port(x, W0, A, B, m, scaling, b, dropout_mask=None):
        alpha, r, rslora = scaling
        s = alpha / r if rslora else alpha / np.sqrt(r)  # the rule the case did NOT ask for
        return np_forward(x, W0, A, B, m, s, b, dropout_mask)

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(port, scaling="lora_alpha", cases=dict(r=[2, 4, 8], use_rslora=use_rslora), **FEW)
    assert info.value.hint == "scaling_rule", str(info.value)
    assert testing.HINTS["scaling_rule"] in str(info.value)


def test_port_with_the_right_scaling_rule_passes_with_lora_alpha():
    def port(x, W0, A, B, m, scaling, b, dropout_mask=None):
        alpha, r, rslora = scaling
        return np_forward(x, W0, A, B, m, alpha / np.sqrt(r) if rslora else alpha / r, b, dropout_mask)

    testing.check_forward(port, scaling="lora_alpha", **FEW)


def test_reported_index_is_where_the_port_is_wrong():
    """A single wrong element is found: its output, index, and both values are reported exactly."""

    def forward(x, W0, A, B, m, s, b):
        y = np_forward(x, W0, A, B, m, s, b)
        y[-1, -1] += 1e-3 * (1 + abs(y[-1, -1]))
        return y

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(forward, **FEW)
    err = info.value
    N, _, out, _ = err.case.shapes()
    assert err.output == "y" and err.index == (N - 1, out - 1) and err.hint is None
    want = testing.reference(err.case)["y"][N - 1, out - 1]
    assert err.expected == want and err.got != want


def test_per_input_column_port_with_the_other_scaling_rule_gets_the_scaling_rule_hint():
    # second adversarial pass, session 10: the per-input-column layer's port got "hint: none"
    from types import SimpleNamespace

    from dora_ref.porting import variants as V

    def port(x, W0, A, B, m, scaling, b, dropout_mask=None):
        alpha, r, rslora = scaling
        s = alpha / r if rslora else alpha / np.sqrt(r)  # the rule the case did NOT ask for
        c = SimpleNamespace(x=x, W0=W0, A=A, B=B, magnitude=m.reshape(-1), scaling=s, bias=b,
                            dy=np.zeros((len(x), len(W0))))
        return V.column_layer(c)["y"]

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(port, scaling="lora_alpha", magnitude="(1, in)", cases=dict(r=[2, 4]), **FEW)
    assert info.value.hint == "scaling_rule", str(info.value)
