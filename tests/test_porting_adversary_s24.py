"""Regressions from session 24's adversarial test of the porting checker (ports by others and by hand).

1. A port wrong only where N is a multiple of 8 (a separate path for whole tiles) passed 1,000 drawn
   cases in each dtype and every linear golden vector: the draws have N <= 6, the wide cases and
   vectors N 3..6, 67 and 71. ``runner.WIDE_CASES`` and the vectors now have an aligned case (N 64,
   in 128, out 64, r 16), and such a port fails there.
2. LyCORIS's ``wd_on_out=False`` layer adds the dtype's machine epsilon to its per-input-column norm;
   checked with ``magnitude="(1, in)"`` it failed with "hint: none": ``norm_plus_eps`` was not
   modelled on that layer.
3. The same layer called as DoRA was ranked "magnitude_per_input_column + bias_scaled" second: the
   per-input-column formula ignores the bias variant, so the pair computed the layer alone and was
   ranked on its evidence. Such pairs are no longer formed.
4. An epsilon under the square root of the norm was caught with "hint: none"; it is now a known
   variant, ``norm_eps_under_root``.
"""
import dataclasses

import numpy as np
import pytest

from dora_ref.porting import runner, testing, variants, vectors

from test_porting_tiled_tail import ONE_BACKEND, _golden_failures, _weights


def _dora(x, W0, A, B, m, s, b):
    V = W0 + s * (B @ A)
    y = (m / np.linalg.norm(V, axis=1)) * (x @ W0.T + s * ((x @ A.T) @ B.T))
    return y if b is None else y + b


def aligned_path_forward(x, W0, A, B, m, s, b):
    """Right but where N is a multiple of 8: there, as a buggy fast path for whole tiles would, off by 1e-3."""
    y = _dora(x, W0, A, B, m, s, b)
    if x.shape[0] % 8 == 0:
        y = y * 1.001
    return y.astype(x.dtype)


def column_forward(x, W0, A, B, magnitude, scaling, bias, *, eps=None):
    """LyCORIS's wd_on_out=False layer in NumPy: one magnitude per input column, the dtype's
    machine epsilon added to the norm (``eps=None``), the bias added unscaled."""
    e = np.finfo(x.dtype).eps if eps is None else eps
    V = W0 + scaling * (B @ A)
    n = np.linalg.norm(V, axis=0, keepdims=True) + e
    y = x @ (V * (np.reshape(magnitude, (1, -1)) / n)).T
    return y if bias is None else y + bias


@ONE_BACKEND
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_port_wrong_only_for_n_multiple_of_8_fails_the_aligned_wide_case(dtype):
    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(aligned_path_forward, dtype=dtype, max_examples=60)
    text = str(info.value)
    assert "on this aligned wide case" in text and "N=64" in text.replace(" ", ""), text
    assert info.value.hint == "fails_past_drawn_sizes", text
    assert "whole tiles" in testing.HINTS["fails_past_drawn_sizes"]


def test_port_wrong_only_for_n_multiple_of_8_fails_the_golden_vectors(vec_dir):
    def run(e, a):
        W0, x = _weights(e, a)
        b = a.get("bias")
        return aligned_path_forward(x, W0, a["A"], a["B"], a["magnitude"], e["config"]["scaling"],
                                    b).reshape(a["y"].shape)

    failing = _golden_failures(vec_dir, "y", run)
    assert set(failing) == {"linear_wide_aligned_float32", "linear_wide_aligned_float64"}, failing


def test_aligned_wide_case_is_whole_tiles_and_in_the_golden_set():
    aligned = [w for w in runner.WIDE_CASES if all(w[k] % 8 == 0 for k in ("N", "in_features", "out_features", "r"))]
    assert len(aligned) == 1
    w = aligned[0]
    assert all(w[k] % 64 == 0 for k in ("N", "in_features", "out_features")) and w["r"] % 16 == 0
    golden = {c["name"]: c for c in vectors.CASES}
    g = golden["linear_wide_aligned"]
    assert (g["N"], g["in_features"], g["out_features"], g["r"]) == (w["N"], w["in_features"], w["out_features"],
                                                                     w["r"])


@ONE_BACKEND
def test_correct_port_passes_all_three_wide_cases():
    res = testing.check_forward(_dora, dtype="float32", max_examples=5)
    assert res.wide == 3 and res.worst_ratio < 1, res


@ONE_BACKEND
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lycoris_column_layer_with_eps_is_named_norm_plus_eps(dtype):
    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(column_forward, dtype=dtype, magnitude="(1, in)")
    err = info.value
    assert err.hint == "norm_plus_eps", str(err)
    assert err.diagnoses[0].detail == f"eps = {float(np.finfo(dtype).eps):.3g}", str(err)


@ONE_BACKEND
def test_column_layer_without_eps_passes_as_its_own_layer():
    fwd = lambda *a: column_forward(*a, eps=0.0)  # noqa: E731
    assert testing.check_forward(fwd, dtype="float64", magnitude="(1, in)", max_examples=40).worst_ratio < 1


@ONE_BACKEND
def test_lycoris_column_layer_called_as_dora_gets_no_bias_pair():
    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(column_forward, dtype="float32")
    keys = [d.key for d in info.value.diagnoses]
    assert keys and keys[0].startswith("magnitude_per_input_column"), str(info.value)
    assert not any("bias_scaled" in k for k in keys), keys


def test_pairs_the_column_layer_cannot_model_are_not_formed():
    assert variants.combine("magnitude_per_input_column", "bias_scaled") is None
    assert variants.combine("magnitude_per_input_column", "naive_dropout") is None
    assert variants.combine("magnitude_per_input_column", "norm_plus_eps") == dict(layer="column", eps="eps")
    assert variants.combine("magnitude_per_input_column", "norm_eps_under_root") == dict(layer="column",
                                                                                        eps_root="eps")


@ONE_BACKEND
@pytest.mark.parametrize("dtype,eps", [("float64", 1e-12), ("float32", 1e-8)])
def test_eps_under_the_root_is_named(dtype, eps):
    def forward(x, W0, A, B, m, s, b):
        V = W0 + s * (B @ A)
        n = np.sqrt(np.sum(V * V, axis=1) + eps)
        y = (m / n) * (x @ W0.T + s * ((x @ A.T) @ B.T))
        return (y if b is None else y + b).astype(x.dtype)

    with pytest.raises(testing.ConformanceError) as info:
        testing.check_forward(forward, dtype=dtype, max_examples=100)
    err = info.value
    assert err.hint == "norm_eps_under_root", str(err)
    assert err.diagnoses[0].detail == f"eps = {eps:.3g}", str(err)


def test_eps_under_root_variant_gradient_matches_finite_differences():
    """The variant's exact gradient (dn/dV = V / sqrt(||V||^2 + eps)) against central differences in
    float64, on the row layer and the per-input-column layer."""
    from dora_ref.porting.cases import make_case

    c = make_case(N=3, in_features=4, out_features=4, r=2, dtype="float64", B_zero=False,
                  magnitude="trained", weight_scale=1e-3, seed=5)
    eps = 1e-7
    for layer in ("row", "column"):
        spec = dict(variants.BASE, eps_root=eps, layer=layer)
        if layer == "column":
            c = make_case(N=3, in_features=4, out_features=4, r=2, dtype="float64", B_zero=False,
                          magnitude="trained", weight_scale=1e-3, seed=5, magnitude_axis="in")
        out = variants.evaluate(c, spec, detach_norm=False)

        def loss(A):
            return float(np.sum(c.dy * variants.evaluate(dataclasses.replace(c, A=A), spec, False)["y"]))

        h = 1e-7
        num = np.zeros_like(c.A)
        for idx in np.ndindex(c.A.shape):
            Ap, Am = c.A.copy(), c.A.copy()
            Ap[idx] += h
            Am[idx] -= h
            num[idx] = (loss(Ap) - loss(Am)) / (2 * h)
        scale = np.max(np.abs(num))
        assert np.max(np.abs(out["dA"] - num)) <= 1e-6 * scale, (layer, out["dA"], num)
