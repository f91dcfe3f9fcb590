"""SGD and AdamW follow PyTorch's update rules step for step."""
import numpy as np
import pytest

from dora_ref import AdamW, SGD


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(5)]
    return params, grads


def test_sgd_by_hand():
    """v1 = g1, p1 = p0 - lr g1; v2 = mu v1 + g2, p2 = p1 - lr v2."""
    p = {"w": np.array([1.0, -2.0])}
    opt = SGD(p, lr=0.5, momentum=0.9)
    opt.step({"w": np.array([1.0, 1.0])})
    np.testing.assert_array_equal(p["w"], [0.5, -2.5])
    opt.step({"w": np.array([0.0, 2.0])})
    np.testing.assert_allclose(p["w"], [0.5 - 0.5 * 0.9, -2.5 - 0.5 * 2.9], rtol=1e-15)


def test_adamw_first_step_by_hand():
    """Step 1: m_hat = g, v_hat = g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps)."""
    p = {"w": np.array([1.0, -2.0])}
    AdamW(p, lr=0.1, weight_decay=0.5, eps=1e-8).step({"w": np.array([3.0, -0.5])})
    want = np.array([1.0, -2.0]) * (1 - 0.05) - 0.1 * np.array([3.0, -0.5]) / (
        np.array([3.0, 0.5]) + 1e-8)
    np.testing.assert_allclose(p["w"], want, rtol=1e-15)


@pytest.mark.parametrize(
    "make, torch_make",
    [
        (lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
         lambda t, p: t.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
        (lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True),
         lambda t, p: t.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
        (lambda p: AdamW(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
         lambda t, p: t.optim.AdamW(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    ],
)
def test_matches_torch_optim(make, torch_make):
    torch = pytest.importorskip("torch", reason="torch not installed: pip install -e '.[parity]'")
    params, grads = _problem()
    tparams = [torch.tensor(v.copy(), requires_grad=True) for v in params.values()]
    opt, topt = make(params), torch_make(torch, tparams)
    for g in grads:
        opt.step(g)
        for t, v in zip(tparams, g.values()):
            t.grad = torch.tensor(v)
        topt.step()
    for v, t in zip(params.values(), tparams):
        # same formula, float64, 5 steps: rounding order may differ by a few ulp
        np.testing.assert_allclose(v, t.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_bad_optimiser_input():
    p = {"w": np.ones(2)}
    with pytest.raises(ValueError, match="lr > 0"):
        SGD(p, lr=0)
    with pytest.raises(ValueError, match=r"grads is missing \['w'\]"):
        SGD(p, lr=0.1).step({})
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(3,\), the parameter \(2,\)"):
        AdamW(p).step({"w": np.ones(3)})
    with pytest.raises(TypeError, match="must be a float ndarray"):
        SGD({"w": [1.0]}, lr=0.1)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda p: SGD(p, lr=float("nan")), r"lr must be finite with lr > 0, got lr=nan"),
        (lambda p: SGD(p, lr=float("inf")), r"lr must be finite.*got lr=inf"),
        (lambda p: SGD(p, lr=-0.1), r"lr must be finite with lr > 0, got lr=-0.1"),
        (lambda p: SGD(p, lr=10**400), r"lr must be finite.*got lr=1000"),
        (lambda p: SGD(p, lr=0.1, momentum=float("nan")), r"momentum must be finite with momentum >= 0"),
        (lambda p: SGD(p, lr=0.1, momentum=-0.5), r"momentum must be finite with momentum >= 0"),
        (lambda p: SGD(p, lr=0.1, weight_decay=float("inf")), r"weight_decay must be finite"),
        (lambda p: SGD(p, lr=0.1, nesterov=True), r"nesterov=True needs momentum > 0"),
        (lambda p: AdamW(p, lr=float("nan")), r"lr must be finite with lr > 0, got lr=nan"),
        (lambda p: AdamW(p, eps=float("nan")), r"eps must be finite with eps > 0"),
        (lambda p: AdamW(p, eps=0.0), r"eps must be finite with eps > 0"),
        (lambda p: AdamW(p, weight_decay=float("nan")), r"weight_decay must be finite"),
        (lambda p: AdamW(p, weight_decay=-1e-3), r"weight_decay must be finite with weight_decay >= 0"),
        (lambda p: AdamW(p, betas=(float("nan"), 0.999)), r"betas\[0\] must be finite with 0 <= betas\[0\] < 1"),
        (lambda p: AdamW(p, betas=(0.9, float("inf"))), r"betas\[1\] must be finite"),
        (lambda p: AdamW(p, betas=(0.9, 1.0)), r"betas\[1\] must be finite with 0 <= betas\[1\] < 1, got betas\[1\]=1.0"),
        (lambda p: AdamW(p, betas=(-0.1, 0.9)), r"betas\[0\]"),
    ],
)
def test_optimizer_rejects_nan_lr_and_other_bad_hyperparameters(make, pattern):
    """lr=nan used to be accepted (the next forward then blamed lora_A): every
    hyperparameter is checked at construction, with its name."""
    p = {"w": np.ones(2)}
    with pytest.raises(ValueError, match=pattern):
        make(p)


@pytest.mark.parametrize("make, error, pattern", [
    (lambda p: SGD(p, lr="0.1"), TypeError, r"lr must be a real number, got str"),
    (lambda p: SGD(p, lr=True), TypeError, r"lr must be a real number, got bool"),
    (lambda p: SGD(p, lr=0.1, nesterov="yes"), TypeError, r"nesterov must be a bool"),
    (lambda p: AdamW(p, betas=0.9), TypeError, r"betas must be a pair"),
    (lambda p: AdamW(p, betas=(0.9, 0.99, 0.999)), TypeError, r"betas must be a pair"),
])
def test_optimizer_rejects_non_numeric_hyperparameters(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make({"w": np.ones(2)})


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1), lambda p: AdamW(p)])
def test_optimizer_step_with_nan_gradient_raises_and_changes_nothing(make):
    p = {"a": np.ones(2), "w": np.ones(3)}
    opt = make(p)
    with pytest.raises(ValueError, match=r"grads\['w'\] \(shape \(3,\)\) contains NaN or Inf, first at index \(1,\)"):
        opt.step({"a": np.ones(2), "w": np.array([0.0, np.nan, 0.0])})
    np.testing.assert_array_equal(p["a"], 1.0)
    np.testing.assert_array_equal(p["w"], 1.0)


def test_numpy_scalar_hyperparameters_are_accepted():
    p = {"w": np.ones(2)}
    AdamW(p, lr=np.float32(1e-3), betas=np.array([0.9, 0.99]), eps=np.float64(1e-8), weight_decay=np.int64(0))
    SGD(p, lr=np.float64(0.1), momentum=np.float32(0.9), nesterov=np.bool_(True)).step({"w": np.ones(2)})
