"""Random DoRA test cases shared by the core tests.

A case is never only the initial state: B is nonzero and the magnitude is
perturbed away from the row norms, so every term of the forward and backward
is exercised. The upstream gradient is random, never all ones.
"""
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st


@dataclass
class Case:
    x: np.ndarray  # (N, in)
    W0: np.ndarray  # (out, in)
    A: np.ndarray  # (r, in)
    B: np.ndarray  # (out, r)
    magnitude: np.ndarray  # (out,)
    scaling: float
    bias: np.ndarray  # (out,) or None
    dy: np.ndarray  # (N, out)

    def astype(self, dtype):
        conv = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
        return Case(
            conv(self.x), conv(self.W0), conv(self.A), conv(self.B),
            conv(self.magnitude), self.scaling, conv(self.bias), conv(self.dy),
        )

    @property
    def weights(self):
        return self.W0, self.A, self.B, self.magnitude, self.scaling, self.bias


def make_case(out_f, in_f, r, n, seed, *, bias=True, dtype=np.float64):
    rng = np.random.default_rng(seed)
    W0 = rng.normal(size=(out_f, in_f))
    A = rng.normal(size=(r, in_f)) / np.sqrt(in_f)
    B = rng.normal(size=(out_f, r))
    scaling = float(rng.uniform(0.25, 2.0))
    norm = np.linalg.norm(W0 + scaling * B @ A, axis=1)
    magnitude = norm * rng.uniform(0.5, 2.0, size=out_f)  # trained: away from the norm
    case = Case(
        rng.normal(size=(n, in_f)),
        W0,
        A,
        B,
        magnitude,
        scaling,
        rng.normal(size=out_f) if bias else None,
        rng.normal(size=(n, out_f)),
    )
    return case.astype(dtype)


# shapes include 1 everywhere and r > min(out, in)
dims = st.integers(min_value=1, max_value=6)
ranks = st.integers(min_value=1, max_value=8)


@st.composite
def cases(draw, dtype=np.float64):
    return make_case(
        draw(dims), draw(dims), draw(ranks), draw(dims),
        draw(st.integers(0, 2**32 - 1)), bias=draw(st.booleans()), dtype=dtype,
    )


def abs_scales(case, detach_norm=True):
    """Sum of |terms| behind each gradient, for ``assert_close(scale=...)``.

    The dense backward (``dora_ref.dense.backward``) with every input replaced
    by its absolute value and every subtraction by an addition: the rounding
    error of any correct evaluation is bounded relative to these sums
    (see ``dora_ref.tolerance``), even where the gradient itself cancels to
    nearly zero.
    """
    x, W0, A, B, m, s, dy = (
        np.abs(case.x), np.abs(case.W0), np.abs(case.A), np.abs(case.B),
        np.abs(case.magnitude), abs(case.scaling), np.abs(case.dy),
    )
    V = W0 + s * B @ A
    n = np.linalg.norm(case.W0 + case.scaling * case.B @ case.A, axis=1)
    # where W0 and s*B@A nearly cancel, n carries the rounding error of the
    # terms it is summed from, u * ||V_abs||, not u * n: every 1/n is uncertain
    # relative to itself by the factor kappa = ||V_abs|| / n >= 1.
    kappa = np.linalg.norm(V, axis=1) / n
    g = m / n * kappa
    G = dy.T @ x
    dV = g[:, None] * G
    if not detach_norm:
        dV = dV + g[:, None] * kappa[:, None] * (np.sum(G * V, axis=1) / n**2)[:, None] * V
    return dict(
        dx=dy @ (g[:, None] * V) + dy @ (g[:, None] * W0),
        dA=s * B.T @ dV,
        dB=s * dV @ A.T,
        dmagnitude=np.sum(G * V, axis=1) / n * kappa,
    )
