"""A float64 central-difference gradient checker you can call on your own code.

Use::

    from dora_ref.porting.gradcheck import gradcheck

    def loss(p):                       # p: dict of float64 arrays
        y, _ = my_dora_forward(x, W0, p["A"], p["B"], p["m"], s)
        return float(np.sum(dy * y))   # a random dy, never all ones

    report = gradcheck(loss, {"A": A, "B": B, "m": m}, {"A": dA, "B": dB, "m": dm})
    print(report)                      # worst element per array, its index, rel. error

Error model (why the default tolerance is 1e-6)
-----------------------------------------------
The central difference ``(f(p + h) - f(p - h)) / 2h`` has truncation error
``h**2 / 6 * |f'''|`` and rounding error about ``u |f| / h`` (u = 1.1e-16
in float64). With ``h = 1e-6 * max(1, |p|)`` both are about 1e-10 relative
to the scale of f and its derivatives, so a correct gradient agrees to
~1e-9 in most elements (measured on 600 random DoRA cases, exact and
detached, with and without dropout: the worst element of all was 1.7e-7, a
small one judged against the floor below), and ``rtol = 1e-6`` still leaves
a margin, while a wrong term (a missing factor, a wrong sign, a dropped
path) shows up as an error of order 1. The error of each element is measured relative to
``max(|analytic|, |numeric|, 1e-3 * max|analytic|, atol / rtol)`` so that
tiny elements are judged against the array's scale, not against themselves,
and a gradient that is truly zero is not failed for the rounding noise of
its difference quotient: ``atol = 100 e / step`` is a hundred times that
noise, where e, the rounding noise of f, is the larger of ``u max(1, |f|)``
and e measured at the point (``measured_noise``: the rounding error of f is
a few u times the sum of its absolute terms, which exceeds |f| a thousandfold
in a loss whose terms cancel; the model from |f| alone failed a true zero
gradient of such a loss, found by hypothesis on a DoRA case with in = 1).

A loss that is large next to its own variation (a big constant, a bias of
1e9) makes that noise large too. When ``u |f| / step`` exceeds 1e-3 of the largest
gradient checked, central differences cannot resolve the gradient, and the
report says so and fails (``inconclusive``) rather than passing anything:
subtract the constant, or scale the loss down.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GradcheckEntry:
    """The worst element of one checked array."""

    name: str
    index: tuple
    analytic: float
    numeric: float
    rel_error: float
    ok: bool


class GradcheckError(AssertionError):
    """Raised by ``gradcheck(..., raise_on_failure=True)``; carries the report."""

    def __init__(self, report):
        super().__init__(str(report))
        self.report = report


@dataclass
class GradcheckReport:
    """Per-array results of ``gradcheck``; ``ok`` if every array passed."""

    entries: list
    rtol: float
    atol: float = 0.0
    inconclusive: bool = False

    @property
    def ok(self):
        return not self.inconclusive and all(e.ok for e in self.entries)

    @property
    def max_rel_error(self):
        return max((e.rel_error for e in self.entries), default=0.0)

    def __str__(self):
        lines = [f"gradcheck (rtol {self.rtol:g}, atol {self.atol:.3g}): "
                 f"{'ok' if self.ok else 'FAILED'}"]
        if self.inconclusive:
            lines.append(
                f"  INCONCLUSIVE: the loss is so large next to its variation that central "
                f"differences carry noise of ~{self.atol / 100:.3g}, over 1e-3 of the largest "
                f"gradient; subtract its constant part or scale it down"
            )
        for e in self.entries:
            lines.append(
                f"  {'ok  ' if e.ok else 'FAIL'} {e.name}{list(e.index)}: analytic {e.analytic:.10g}, "
                f"numeric {e.numeric:.10g}, relative error {e.rel_error:.3g}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def numerical_gradient(f, params, name, *, step=1e-6):
    """Central-difference gradient of scalar ``f(params)`` w.r.t. ``params[name]``.

    Parameters
    ----------
    f : callable
        ``f(params) -> float``; must read the arrays of ``params``.
    params : dict of str to ndarray, float64
        Perturbed in place, one element at a time, and restored exactly.
    name : str
        Which array to differentiate.
    step : float, default 1e-6
        Relative step: element p uses h = step * max(1, |p|).

    Returns
    -------
    ndarray, float64, the shape of ``params[name]``
    """
    p = params[name]
    grad = np.zeros(p.shape, dtype=np.float64)
    for idx in np.ndindex(p.shape):
        old = p[idx]
        h = step * max(1.0, abs(float(old)))
        p[idx] = old + h
        f_plus = float(f(params))
        p[idx] = old - h
        f_minus = float(f(params))
        p[idx] = old
        grad[idx] = (f_plus - f_minus) / (2.0 * h)
    return grad


def measured_noise(f, params, f0=None, *, spacing=1e-9, directions=4, seed=0):
    """The rounding noise of ``f`` at ``params``, measured (float64).

    f is evaluated at 7 points ``p + k t d`` (k = -3..3) along each of a few
    random directions d, with the relative spacing t = `spacing` (each
    element moves by about ``t * max(1, |p|)``: every rounding inside f
    changes, while the smooth change of f is linear to ~1e-18 relative).
    The sixth difference of 7 such values removes the smooth part (it is
    of order ``(t |d|)**6 f''''''``, nil at t = 1e-9) and leaves the noise:
    for independent noise of size sigma at each point its variance is
    ``924 sigma**2`` (the sum of the squared binomial coefficients of order
    6). Returns the root mean square over the directions of ``|sixth
    difference| / sqrt(924)``. The idea is Moré and Wild's ECnoise (SIAM J.
    Sci. Comput. 33(3), 2011), in its simplest form.

    Parameters
    ----------
    f : callable
        ``f(params) -> float``.
    params : dict of str to ndarray, float64
        Perturbed in place and restored exactly.
    f0 : float, optional
        f(params), if already computed (the centre of each line).
    spacing : float, default 1e-9
    directions : int, default 4
    seed : int, default 0
        Of the random directions (so a check repeats itself).

    Returns
    -------
    float
        The estimated standard deviation of f's rounding noise (0 if f
        does not change its roundings under such moves).
    """
    rng = np.random.default_rng(seed)
    saved = {k: v.copy() for k, v in params.items()}
    f0 = float(f(params)) if f0 is None else f0
    coefficients = np.array([1.0, -6.0, 15.0, -20.0, 15.0, -6.0, 1.0])
    squares = []
    try:
        for _ in range(directions):
            d = {k: rng.standard_normal(v.shape) * np.maximum(1.0, np.abs(v)) * spacing
                 for k, v in saved.items()}
            values = []
            for step_k in range(-3, 4):
                if step_k == 0:
                    values.append(f0)
                    continue
                for k in params:
                    params[k][...] = saved[k] + step_k * d[k]
                values.append(float(f(params)))
            for k in params:
                params[k][...] = saved[k]
            sixth = float(np.dot(coefficients, values))
            if np.isfinite(sixth):
                squares.append(sixth * sixth / 924.0)
    finally:
        for k in params:
            params[k][...] = saved[k]
    return float(np.sqrt(np.mean(squares))) if squares else 0.0


def gradcheck(f, params, grads, *, rtol=1e-6, step=1e-6, raise_on_failure=False):
    """Compare analytic gradients with float64 central differences.

    Parameters
    ----------
    f : callable
        ``f(params) -> float``, the scalar loss. Use a random upstream
        gradient (``sum(dy * y)`` with random dy), never ``sum(y)`` alone:
        all-ones hides errors that cancel across outputs.
    params : mapping of str to array_like
        The point to check at. Copied to float64 before perturbing; ``f``
        receives the copies.
    grads : mapping of str to array_like
        Your analytic gradients, keyed like ``params`` (a subset is fine:
        only those keys are checked).
    rtol : float, default 1e-6
        See the module docstring for why.
    step : float, default 1e-6
    raise_on_failure : bool, default False
        Raise ``GradcheckError`` (an ``AssertionError``) instead of returning
        a failing report.

    Returns
    -------
    GradcheckReport
        ``report.ok``, ``report.max_rel_error``, and per array the worst
        element: its index, both values and the relative error.

    Raises
    ------
    ValueError
        If a gradient's shape differs from its parameter's, or f is not finite.
    """
    work = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    f0 = float(f(work))
    if not np.isfinite(f0):
        raise ValueError("f(params) is not finite at the point to check")
    f_noise = max(np.finfo(np.float64).eps / 2 * max(1.0, abs(f0)), measured_noise(f, work, f0))
    noise = f_noise / step
    atol = 100 * noise
    entries = []
    for name, analytic in grads.items():
        if name not in work:
            raise ValueError(f"grads has {name!r}, which params lacks ({sorted(work)})")
        analytic = np.asarray(analytic, dtype=np.float64)
        if analytic.shape != work[name].shape:
            raise ValueError(
                f"grads[{name!r}] has shape {analytic.shape}, params[{name!r}] {work[name].shape}"
            )
        numeric = numerical_gradient(f, work, name, step=step)
        floor = 1e-3 * float(np.max(np.abs(analytic), initial=0.0))
        denom = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), max(floor, atol / rtol))
        rel = np.abs(analytic - numeric) / denom
        worst = np.unravel_index(int(np.argmax(rel)), rel.shape) if rel.size else ()
        err = float(rel[worst]) if rel.size else 0.0
        entries.append(
            GradcheckEntry(
                name,
                tuple(int(i) for i in worst),
                float(analytic[worst]) if rel.size else 0.0,
                float(numeric[worst]) if rel.size else 0.0,
                err,
                bool(err <= rtol),
            )
        )
    scale = max((max(abs(e.analytic), abs(e.numeric)) for e in entries), default=0.0)
    scale = max([scale] + [float(np.max(np.abs(np.asarray(g, dtype=np.float64)), initial=0.0))
                           for g in grads.values()])
    inconclusive = noise > 1e-3 * scale if scale > 0 else False
    report = GradcheckReport(entries, rtol, atol, inconclusive)
    if raise_on_failure and not report.ok:
        raise GradcheckError(report)
    return report
