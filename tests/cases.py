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


def make_case(out_f, in_f, r, n, seed, *, bias=True, dtype=np.float64, scaling=None,
              magnitude="trained", b_scale=1.0):
    """A random DoRA case; the defaults give the cases the tests were written with.

    Parameters
    ----------
    out_f, in_f, r, n : int
        out, in, the rank and N (rows of x).
    seed : int
    bias : bool
    dtype : float32 or float64
        The case is drawn in float64 and rounded to it.
    scaling : float, optional
        Default: uniform in [0.25, 2]. Any finite real is valid (0, negative
        alphas and rsLoRA's large scalings exist in the wild).
    magnitude : str
        "trained": the row norms times uniform [0.5, 2] (away from the norm);
        "far": times 10**uniform[-3, 3]; "signed": "trained" with random
        signs and one entry set to 0.
    b_scale : float
        Multiplies B: 30 makes s * B @ A dominate W0.
    """
    rng = np.random.default_rng(seed)
    W0 = rng.normal(size=(out_f, in_f))
    A = rng.normal(size=(r, in_f)) / np.sqrt(in_f)
    B = rng.normal(size=(out_f, r)) * b_scale
    drawn = float(rng.uniform(0.25, 2.0))
    scaling = drawn if scaling is None else float(scaling)
    norm = np.linalg.norm(W0 + scaling * B @ A, axis=1)
    if magnitude == "trained":
        magnitude = norm * rng.uniform(0.5, 2.0, size=out_f)  # trained: away from the norm
    elif magnitude == "far":
        magnitude = norm * 10.0 ** rng.uniform(-3.0, 3.0, size=out_f)
    elif magnitude == "signed":
        magnitude = norm * rng.uniform(0.5, 2.0, size=out_f) * rng.choice([-1.0, 1.0], size=out_f)
        magnitude[rng.integers(out_f)] = 0.0
    else:
        raise ValueError(f"magnitude must be 'trained', 'far' or 'signed', got {magnitude!r}")
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


def _mostly(common, rare):
    """``common`` three draws in four, ``rare`` the fourth (bounds the time of large cases)."""
    return st.integers(0, 3).flatmap(lambda k: rare if k == 0 else common)


# Sizes include 1 everywhere and r > min(out, in). The C kernels work in tiles
# of W columns (8 doubles, 16 floats) and groups of G = 4 rows, with separate
# code for a full tile and for the edges; a quarter of the draws take a size
# that is exactly one tile, one tile + 1, or several tiles + 1, so that every
# path runs end to end, not only in test_kernels_c.
small_dims = st.integers(min_value=1, max_value=6)
tile_dims = st.sampled_from([8, 9, 16, 17, 33])
dims = _mostly(small_dims, tile_dims)
# finite differences cost one forward per entry of x, A, B: without 33 (2 doubles' tiles + 1
# is still there) the gradient checks stay within their time
fd_dims = _mostly(small_dims, st.sampled_from([8, 9, 16, 17]))
# r = 13 > FUSED_MAX_RANK: the C wrapper's BLAS path for the rank-r products
ranks = _mostly(st.integers(min_value=1, max_value=8), st.sampled_from([12, 13]))
# 0, negative alphas, rsLoRA's large s = alpha / sqrt(r)
scalings = _mostly(st.floats(0.25, 2.0), st.sampled_from([0.0, -0.5, -3.0, 4.0, 16.0]))


@st.composite
def cases(draw, dtype=np.float64, zero_magnitude=True, extreme=True):
    """A drawn case.

    ``zero_magnitude=False`` for what needs m != 0 (unmerge). ``extreme=False``
    (for the finite difference checks) draws sizes up to 17, not 33, and
    leaves out magnitudes far from the norm and B >> W0: there the rounding of
    the loss exceeds the noise model of ``dora_ref.porting.gradcheck`` (u |f| / h;
    measured: 1.0e-6 > rtol 1e-6 on an exact dA that is 0 for in = 1). Those
    cases are checked against the dense formulas instead, whose tolerance
    carries the cancellation factor.
    """
    kinds = ["trained", "signed"] if zero_magnitude else ["trained"]
    if extreme:
        kinds.append("far")
    sizes = dims if extreme else fd_dims
    return make_case(
        draw(sizes), draw(sizes), draw(ranks), draw(sizes),
        draw(st.integers(0, 2**32 - 1)), bias=draw(st.booleans()), dtype=dtype,
        scaling=draw(scalings),
        magnitude=draw(_mostly(st.just("trained"), st.sampled_from(kinds))),
        b_scale=draw(_mostly(st.just(1.0), st.just(30.0))) if extreme else 1.0,  # B >> W0
    )


def abs_scales(case, detach_norm=True):
    """Sum of |terms| behind each gradient, for ``assert_close(scale=...)``.

    The dense backward (``dora_ref.core.dense.backward``) with every input replaced
    by its absolute value and every subtraction by an addition: the rounding
    error of any correct evaluation is bounded relative to these sums
    (see ``dora_ref.porting.tolerance``), even where the gradient itself cancels to
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


def small_dora_layer(backend, dtype, seed, **kw):
    """A (6, 5) DoRALinear built under ``backend`` with a nonzero lora_B, an
    x of 4 rows and a dy for it: (layer, x, dy) in ``dtype``. The small-layer
    hot-path tests share it (each with its own seed)."""
    import dora_ref
    from dora_ref import DoRALinear

    rng = np.random.default_rng(seed)
    W0 = (rng.standard_normal((6, 5)) / 3).astype(dtype)
    b0 = rng.standard_normal(6).astype(dtype)
    with dora_ref.use_backend(backend):
        layer = DoRALinear(W0, b0, r=2, lora_alpha=4, rng=0, **kw)
    layer.lora_B[...] = 0.1 * rng.standard_normal(layer.lora_B.shape).astype(dtype)
    x = rng.standard_normal((4, 5)).astype(dtype)
    dy = rng.standard_normal((4, 6)).astype(dtype)
    return layer, x, dy
