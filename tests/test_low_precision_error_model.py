"""The low-precision error model of ``dora_ref.porting.tolerance``, checked against float64.

* The "consistent" gradients (float32 backward on the exactly upcast lp
  inputs, each gradient rounded once to its parameter's dtype) agree with
  float64 central differences within ``rtol(lp, k, roundings=1) * scale``
  (float32's bound for a float32 gradient), and the one rounding is what
  takes them past float32's bound.
* PEFT 0.21's two lp paths, written out below in NumPy + ml_dtypes from
  the cast points of its code (mixed: float32 adapters,
  ``autocast_adapter_dtype=True``; pure: lp adapters, a rounding after
  every operation), stay within ``rtol(lp, k, roundings=R)`` with R from
  ``tolerance.ROUNDINGS`` for the forward, the norm and the merge.
"""
import numpy as np
import pytest

from dora_ref.core import dense
from dora_ref.core import functional as F
from dora_ref.porting import testing
from dora_ref.porting.gradcheck import numerical_gradient
from dora_ref.porting.tolerance import (ROUNDINGS, SAFETY, as_dtype, dora_reduction_length, rtol,
                                        underflow_error, unit_roundoff)

LP = ["bfloat16", "float16"]
f32 = np.float32


def lp_case(dtype, seed, **kw):
    shape = dict(N=4, in_features=12, out_features=6, r=3)
    shape.update(kw)
    return testing.make_case(dtype=dtype, seed=seed, bias=True, magnitude="trained", scaling=2.0, **shape)


def bound(dtype, name, case, R, *, detach_norm=True):
    N, i, o, r = case.shapes()
    k = dora_reduction_length(name, n_rows=N, in_features=i, out_features=o, r=r)
    scale = testing.term_scales(case, detach_norm=detach_norm)[name]
    return rtol(dtype, k, roundings=R) * scale + SAFETY * R * underflow_error(dtype)


# ---------------------------------------------------------------------------
# gradients: one rounding of the float32 gradient, against float64 differences
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("adapters", ["float32", "lp"])
@pytest.mark.parametrize("dtype", LP)
def test_consistent_lp_gradients_match_float64_differences(dtype, adapters):
    lp = as_dtype(dtype)
    case = lp_case(dtype, seed=11)
    if adapters == "lp":  # pure lp: the magnitude is stored in lp too (A and B already hold lp values)
        case.magnitude = case.magnitude.astype(lp).astype(f32)
    c32 = {k: getattr(case, k).astype(f32) for k in ("x", "W0", "A", "B", "magnitude", "bias", "dy")}
    _, ctx = F.dora_forward(c32["x"], c32["W0"], c32["A"], c32["B"], c32["magnitude"], case.scaling, c32["bias"])
    g32 = F.dora_backward(c32["dy"], ctx, detach_norm=False)._asdict()
    store = {"dx": lp, "dA": lp if adapters == "lp" else np.dtype(f32), "dB": lp if adapters == "lp" else
             np.dtype(f32), "dmagnitude": lp if adapters == "lp" else np.dtype(f32)}
    consistent = {k: v.astype(store[k]) for k, v in g32.items()}

    c64 = case.astype(np.float64)
    params = dict(x=c64.x.copy(), A=c64.A.copy(), B=c64.B.copy(), magnitude=c64.magnitude.copy())

    def loss(p):
        y = dense.forward(p["x"], c64.W0, p["A"], p["B"], p["magnitude"], case.scaling, c64.bias)
        return float(np.sum(c64.dy * y))

    past_f32 = {}
    for name, pname in (("dx", "x"), ("dA", "A"), ("dB", "B"), ("dmagnitude", "magnitude")):
        fd = numerical_gradient(loss, params, pname)
        got = consistent[name].astype(np.float64)
        rounded = store[name] == lp
        # the one rounding: |lp(g) - g| <= u_lp |g| (+ half the smallest subnormal)
        step = np.abs(got - g32[name].astype(np.float64))
        if rounded:
            assert np.all(step <= unit_roundoff(lp) * np.abs(g32[name]) + underflow_error(lp)), name
        else:
            assert not step.any(), name
        # the whole: float32 sums + that rounding, against float64 (finite differences: 1e-6 of the largest)
        tol = bound(lp, name, case, 1, detach_norm=False) if rounded else bound("float32", name, case, 0,
                                                                                  detach_norm=False)
        err = np.abs(got - fd)
        assert np.all(err <= tol + 1e-6 * np.max(np.abs(fd))), (name, float(err.max()), tol)
        if rounded:
            past_f32[name] = float(err.max() / (bound("float32", name, case, 0, detach_norm=False)
                                                + 1e-6 * np.max(np.abs(fd))))
    # and float32's bound alone would not hold: the one rounding is what the lp term is for
    assert max(past_f32.values()) > 1, past_f32


# ---------------------------------------------------------------------------
# PEFT 0.21's lp paths, written from its cast points (lp(.) = round a float32 result to lp once)
# ---------------------------------------------------------------------------


def _rows_norm(V):
    return np.sqrt(np.sum(V * V, axis=1, dtype=f32))


def peft_norm(W0, A, B, s, lp, pure):
    """DoraLinearLayer.get_weight_norm: pure lp rounds B@A, s*(B@A), W0 + that, and the norm."""
    W = W0.astype(f32)
    if not pure:
        return _rows_norm(W + f32(s) * (B.astype(f32) @ A.astype(f32)))
    r = lambda v: v.astype(lp).astype(f32)  # noqa: E731
    lw = r(B.astype(f32) @ A.astype(f32))
    return r(_rows_norm(r(W + r(f32(s) * lw))))


def peft_forward(x, W0, A, B, m, s, bias, lp, pure):
    """lora.Linear.forward with DoRA, eval: r = base_layer(x) (lp, bias inside the sum), then the DoRA term."""
    op = (lambda v: v.astype(lp).astype(f32)) if pure else (lambda v: v.astype(f32))
    rl = lambda v: v.astype(lp).astype(f32)  # noqa: E731
    xf, Wf, bf = x.astype(f32), W0.astype(f32), bias.astype(f32)
    r = rl(xf @ Wf.T + bf)
    bse = rl(r - bf)
    n = peft_norm(W0, A, B, s, lp, pure)
    g = op(m.astype(f32) / n)
    lora = op(op(xf @ A.astype(f32).T) @ B.astype(f32).T)
    d = op(op(op(g - 1) * bse) + op(op(g * lora) * f32(s)))
    return (r + d).astype(lp)


def peft_merge(W0, A, B, m, s, lp, pure):
    """get_delta_weight, then the norm of W0 + delta, factor m / n, W' = lp(factor * (W0 + delta))."""
    op = (lambda v: v.astype(lp).astype(f32)) if pure else (lambda v: v.astype(f32))
    delta = op((B.astype(f32) @ A.astype(f32)) * f32(s))
    V = op(W0.astype(f32) + delta)
    wn = op(_rows_norm(V))
    fac = op(m.astype(f32) / wn)
    return (fac[:, None] * V).astype(lp)


@pytest.mark.parametrize("path", ["peft_mixed", "peft_pure"])
@pytest.mark.parametrize("dtype", LP)
def test_peft_lp_paths_stay_within_their_rounding_counts(dtype, path):
    lp, pure = as_dtype(dtype), path == "peft_pure"
    R = ROUNDINGS[path]
    worst = {}
    for seed in range(20):
        case = lp_case(dtype, seed, in_features=[4, 16, 64][seed % 3])
        if pure:
            case.magnitude = case.magnitude.astype(lp).astype(f32)
        c = case.astype(np.float64)
        want = dict(y=dense.forward(c.x, c.W0, c.A, c.B, c.magnitude, c.scaling, c.bias),
                    weight_norm=dense.row_norm(dense.direction(c.W0, c.A, c.B, c.scaling)),
                    W_merged=dense.merged_weight(c.W0, c.A, c.B, c.magnitude, c.scaling))
        got = dict(y=peft_forward(case.x, case.W0, case.A, case.B, case.magnitude, case.scaling, case.bias, lp, pure),
                   weight_norm=peft_norm(case.W0, case.A, case.B, case.scaling, lp, pure),
                   W_merged=peft_merge(case.W0, case.A, case.B, case.magnitude, case.scaling, lp, pure))
        for name in want:
            dt = lp if R[name] else "float32"
            tol = bound(dt, name, case, R[name])
            err = float(np.max(np.abs(got[name].astype(np.float64) - want[name])))
            assert err <= tol, (seed, name, err, tol)
            worst[name] = max(worst.get(name, 0.0), err / tol)
    assert set(worst) == {"y", "weight_norm", "W_merged"}


@pytest.mark.parametrize("dtype", LP)
def test_peft_mixed_init_magnitude_is_off_by_one_rounding(dtype):
    """The init quirk in numbers: PEFT's m = lp(norm) (R = 1 under "peft_mixed"), the forward's n is the
    float32 norm, so |g - 1| <= u_lp, nonzero on most rows; the consistent m = n gives g = 1 exactly."""
    lp = as_dtype(dtype)
    u = unit_roundoff(lp)
    case = lp_case(dtype, seed=3, out_features=64, in_features=64)
    B0 = np.zeros_like(case.B)
    n = peft_norm(case.W0, case.A, B0, case.scaling, lp, pure=False)
    m_peft = n.astype(lp).astype(f32)
    g = m_peft / n
    assert np.all(np.abs(g.astype(np.float64) - 1) <= u * (1 + 1e-6)) and np.mean(g != 1) > 0.9
    assert ROUNDINGS["peft_mixed"]["magnitude"] == 1 and ROUNDINGS["consistent"]["magnitude"] == 0
    assert np.all(n / n == 1)
