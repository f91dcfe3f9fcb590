"""dora_ref.porting.gradcheck catches wrong gradients and passes right ones."""
import numpy as np
import pytest

from dora_ref.porting.gradcheck import GradcheckError, gradcheck, numerical_gradient


def test_passes_a_correct_gradient_and_reports_the_worst_element():
    x0 = np.array([[0.3, -1.2], [2.0, 0.5]])
    report = gradcheck(lambda p: np.sum(np.sin(p["x"]) * p["x"]), {"x": x0},
                       {"x": np.cos(x0) * x0 + np.sin(x0)})
    assert report.ok and report.max_rel_error < 1e-8
    assert "x[" in str(report)


def test_fails_a_wrong_gradient_naming_index_and_error():
    x0 = np.array([1.0, 2.0, 3.0])
    wrong = 2 * x0
    wrong[1] *= 1.01  # one element 1% off
    report = gradcheck(lambda p: np.sum(p["x"] ** 2), {"x": x0}, {"x": wrong})
    assert not report.ok
    (entry,) = report.entries
    assert entry.index == (1,) and 0.005 < entry.rel_error < 0.02
    with pytest.raises(GradcheckError, match=r"FAIL x\[1\]"):
        gradcheck(lambda p: np.sum(p["x"] ** 2), {"x": x0}, {"x": wrong}, raise_on_failure=True)


def test_numerical_gradient_restores_the_point():
    p = {"x": np.array([1.0, 2.0])}
    numerical_gradient(lambda q: float(np.prod(q["x"])), p, "x")
    np.testing.assert_array_equal(p["x"], [1.0, 2.0])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"grads\['x'\] has shape \(3,\), params\['x'\] \(2,\)"):
        gradcheck(lambda p: 0.0, {"x": np.ones(2)}, {"x": np.ones(3)})


def test_a_loss_too_large_to_resolve_is_inconclusive_not_ok():
    """Adversarial review: with f ~ 1e8 the difference noise (~1e-2) hid a missing gradient."""
    f = lambda p: 1e8 + float(np.sum(p["a"] ** 2))  # noqa: E731
    report = gradcheck(f, {"a": np.array([0.3, -0.2])}, {"a": np.zeros(2)})
    assert report.inconclusive and not report.ok
    assert "INCONCLUSIVE" in str(report)
    # the same gradient check without the constant resolves and catches the zero gradient
    report = gradcheck(lambda p: f(p) - 1e8, {"a": np.array([0.3, -0.2])}, {"a": np.zeros(2)})
    assert not report.inconclusive and not report.ok


def test_a_zero_gradient_judged_against_the_measured_noise_of_a_cancelling_loss():
    """The DoRA case hypothesis found (exact norm, in = 1: each row of V / ||V|| is a
    sign, so dA is exactly 0) with dy chosen so that sum(dy * y) cancels to ~0: the
    central difference of A carries the rounding noise of the loss's terms (2.5e-8),
    and atol from u max(1, |f|) (1.1e-8) failed the true zero gradient. The measured
    noise passes it; dx is still checked to 1e-6, and a wrong dA still fails."""
    from dora_ref import dora_backward, dora_forward
    from dora_ref.porting.gradcheck import measured_noise

    rng = np.random.default_rng(0)
    N, out_f, r = 8, 32, 4
    x, W0 = rng.standard_normal((N, 1)), rng.standard_normal((out_f, 1))
    A, B = rng.standard_normal((r, 1)), rng.standard_normal((out_f, r)) * 0.1
    m, s = rng.uniform(0.5, 2, out_f), 2.0
    y, ctx = dora_forward(x, W0, A, B, m, s)
    dy = rng.standard_normal((N, out_f)) * 10
    dy -= (np.sum(dy * y) / np.sum(y * y)) * y  # the loss's terms cancel
    g = dora_backward(dy, ctx, detach_norm=False)

    def f(p):
        return float(np.sum(dy * dora_forward(p["x"], W0, p["A"], B, m, s)[0]))

    params = {"A": A.copy(), "x": x.copy()}
    assert measured_noise(f, params) > 100 * np.finfo(float).eps / 2  # far above u max(1, |f|)
    np.testing.assert_array_equal(params["A"], A)  # the point restored exactly
    report = gradcheck(f, {"A": A, "x": x}, {"A": g.dA, "x": g.dx})
    assert report.ok, report
    wrong = gradcheck(f, {"A": A, "x": x}, {"A": g.dA + 1e-3, "x": g.dx})
    assert not wrong.ok, wrong
