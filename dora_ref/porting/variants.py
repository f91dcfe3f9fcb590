"""The DoRA variants real implementations compute, recomputed in float64.

``dora_ref.porting.testing`` diagnoses a mismatch by recomputing what each known
variant of DoRA gives on a few cases and asking which ones the port's
numbers reproduce. Every variant is one or two changes to one generic
formula, evaluated here with its hand-derived gradient (no autograd)::

    n  = the norm (per row of V = W0 + s*B@A, or a wrong one) [+ eps]
    g  = m / n                                                      (out,)
    y  = alpha * (x1 @ W0.T) + beta * (x2 @ W0.T) + g * s * (x2 @ A.T) @ B.T + gamma * b

with x1 the input of the base path and x2 = x * mask that of the
correction. DoRA (paper Eq. 5, PEFT) is alpha = g, beta = 0, gamma = 1,
x1 = x2 = x; PEFT's dropout path is alpha = 1, beta = g - 1, x1 = x.
The gradient of ``L = sum(dy * y)`` walks this back::

    dx    = (dy*alpha) @ W0 * m1 + ((dy*beta) @ W0 + s * ((dy*g) @ B) @ A) * m2
    dP    = s * (dy*g).T @ x2                      dL/d(B@A) through the low-rank term
    dg    = sum_N dy * (alpha' z1 + beta' z2 + s * lora + gamma' b),  ' = d/dg
    dm    = dg / n
    exact gradient only: dL/dn = -dg * g / n, and dP += dL/dn * dn/d(B@A)
    dA    = B.T @ dP,   dB = dP @ A.T

The per-input-column layer (one magnitude per input column; LyCORIS
``wd_on_out=False``) has its own formula, ``column_layer`` below, which is
both a variant (on square cases) and the reference of the ``magnitude="(1,
in)"`` convention.
"""
from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------------------
# the per-input-column layer: y = x @ (V * (m / ||V||_col)[None, :]).T + b
# ---------------------------------------------------------------------------


def column_layer(c, detach_norm=True, magnitude=None, scaling=None, eps=0.0, eps_root=0.0):
    """Outputs of the per-input-column DoRA layer, float64.

    Parameters
    ----------
    c : Case (float64), without a dropout mask
    detach_norm : bool
    magnitude : ndarray (in,), optional
        Default ``c.magnitude`` (which must then be (in,)).
    scaling : float, optional
        Default ``c.scaling`` (a variant's other rule: ``_scaling``).
    eps, eps_root : float, optional
        A variant's epsilon: added to the norm (``norm_plus_eps``, LyCORIS's
        ``wd_on_out=False`` layer adds the dtype's machine epsilon), or under its
        square root (``norm_eps_under_root``). 0 is DoRA.

    Returns
    -------
    dict: y (N, out), weight_norm (in,), dx, dA, dB, dmagnitude (in,),
    W_merged (out, in), W0_unmerged (out, in).

    The forward is ``W' = V diag(g)``, ``g = m / ||V||_col``,
    ``y = x @ W'.T + b``. With ``G = dy.T @ x`` (dL/dW'): ``dx = dy @ W'``,
    ``dm_j = sum_i G_ij V_ij / n_j``, ``dV = G * g`` (+ with the exact
    gradient, ``V * (dL/dn / n)[None, :]``, ``dL/dn_j = -n_j g_j dm_j / n_j``),
    ``dA = s B.T @ dV``, ``dB = s dV @ A.T``. With an epsilon, n above is
    the shifted norm n' and dn'/dV = V / sqrt(||V||^2 + eps_root).
    """
    m = c.magnitude if magnitude is None else magnitude
    s = c.scaling if scaling is None else scaling
    V = c.W0 + s * (c.B @ c.A)
    root = np.sqrt(np.sum(V * V, axis=0) + eps_root) if eps_root else np.linalg.norm(V, axis=0)
    n = root + eps
    g = m / n
    W = V * g[None, :]
    y = c.x @ W.T
    if c.bias is not None:
        y = y + c.bias
    G = c.dy.T @ c.x
    dm = np.sum(G * V, axis=0) / n
    dV = G * g[None, :]
    if not detach_norm:
        dV = dV + V * (-g * dm / root)[None, :]
    return dict(y=y, weight_norm=n, dx=c.dy @ W, dA=s * (c.B.T @ dV), dB=s * (dV @ c.A.T), dmagnitude=dm,
                W_merged=W, W0_unmerged=W / g[None, :] - s * (c.B @ c.A))


def column_term_scales(c, ref, detach_norm=True):
    """``testing.term_scales`` for the per-input-column layer: the same bounds, per column."""
    s = abs(c.scaling)
    T = np.abs(c.W0) + s * (np.abs(c.B) @ np.abs(c.A))
    n = ref["weight_norm"]
    safe = np.where(n > 0, n, 1.0)
    kappa = np.where(n > 0, np.linalg.norm(T, axis=0) / safe, 1.0)  # (in,)
    ga = np.abs(np.where(n > 0, c.magnitude / safe, 0.0))
    xa, dya = np.abs(c.x), np.abs(c.dy)
    G = dya.T @ xa
    dm_terms = np.sum(G * T, axis=0) / safe
    dV = G * ga[None, :]
    if not detach_norm:
        dV = dV + (ga * dm_terms / safe + 4.0 * kappa * np.abs(ref["dmagnitude"]) * ga / safe)[None, :] * T
    bias = 0.0 if c.bias is None else np.abs(c.bias)
    mx = lambda a: float(np.max(a, initial=0.0))  # noqa: E731
    w = ga * (1.0 + kappa)
    return {
        "weight_norm": mx(np.linalg.norm(T, axis=0)),
        "y": mx((xa * w) @ T.T + bias),
        "dx": mx(dya @ (T * w[None, :])),
        "dA": mx(s * (np.abs(c.B).T @ dV) + np.max(kappa) * np.abs(ref["dA"])),
        "dB": mx(s * (dV @ np.abs(c.A).T) + np.max(kappa) * np.abs(ref["dB"])),
        "dmagnitude": mx(dm_terms + kappa * np.abs(ref["dmagnitude"])),
        "W_merged": mx(T * w[None, :]),
        "W0_unmerged": mx(2.0 * T + kappa[None, :] * np.abs(np.where(n > 0, ref["W_merged"] / np.where(
            ga > 0, ga, 1.0)[None, :], T))),
    }


# ---------------------------------------------------------------------------
# the generic per-output formula and its gradient
# ---------------------------------------------------------------------------

#: the reference's choices; a variant overrides one or two of them
BASE = dict(norm="row", eps=0.0, eps_root=0.0, g="m/n", bias="added", dropout="peft", grads="ok", flip_detach=False,
            merge="ok", unmerge="ok", layer="row", init="ok", scaling="ok", lora_scale="ok")


def init_magnitude(norm, spec, storage_dtype):
    """The magnitude a variant's init returns, from its norm (float64).

    ``spec["init"]`` "ok": the norm itself (what the consistent rule stores in
    float32); "rounded": the norm rounded to the storage dtype (bfloat16 /
    float16) and kept in float32 -- PEFT 0.21's ``DoraLinearLayer.update_layer``
    computes the norm of the lp weight, rounds it to lp, and only then does
    ``autocast_adapter_dtype=True`` upcast the magnitude to float32, while
    its forward's norm stays float32: g = m / n differs from 1 by up to u_lp.
    """
    if spec.get("init", "ok") == "rounded":
        return np.asarray(norm).astype(storage_dtype).astype(np.float64)
    return norm


def _scaling(c, spec):
    """The scaling a variant uses: the case's, or ("other_rule") the other of PEFT's two
    rules for the case's (lora_alpha, r, use_rslora): lora_alpha / sqrt(r) where the case
    says lora_alpha / r, and the reverse."""
    if spec.get("scaling", "ok") == "ok":
        return c.scaling
    alpha, r = c.params["lora_alpha"], c.A.shape[0]
    return alpha / r if c.params.get("use_rslora", False) else alpha / math.sqrt(r)


def _norm(c, kind, s):
    """(n, dn) for a norm kind: n (out,) and dn(v) = dL/d(B@A) for dL/dn = v; s the scaling."""
    BA = c.B @ c.A
    if kind == "row":
        V = c.W0 + s * BA
        n = np.linalg.norm(V, axis=1)
        return n, lambda v: s * (v / n)[:, None] * V
    if kind == "no_scaling":
        U = c.W0 + BA
        n = np.linalg.norm(U, axis=1)
        return n, lambda v: (v / n)[:, None] * U
    if kind == "W0":
        return np.linalg.norm(c.W0, axis=1), lambda v: 0.0
    if kind == "col":  # square only: the norm of column i used for output channel i
        V = c.W0 + s * BA
        n = np.linalg.norm(V, axis=0)
        return n, lambda v: s * V * (v / n)[None, :]
    if kind == "stored_rows":  # square only: W0 stored (in, out) added to B@A untransposed
        M = c.W0.T + s * BA
        n = np.linalg.norm(M, axis=1)
        return n, lambda v: s * (v / n)[:, None] * M
    raise ValueError(kind)


def evaluate(c, spec, detach_norm, *, unmerge_input=None):
    """Every output of one variant on float64 case ``c``.

    Parameters
    ----------
    c : Case (float64)
    spec : dict
        ``BASE`` with overrides.
    detach_norm : bool
        The gradient the check asks for (``flip_detach`` flips it).
    unmerge_input : (W_merged, weight_norm), optional
        What the unmerge is given; default the variant's own merge.

    Returns
    -------
    dict of str to ndarray
    """
    if spec["layer"] == "column":
        return column_layer(c, detach_norm != spec["flip_detach"], scaling=_scaling(c, spec),
                            eps=spec["eps"], eps_root=spec["eps_root"])
    detach = detach_norm != spec["flip_detach"]
    s = _scaling(c, spec)
    n_raw, dn = _norm(c, spec["norm"], s)
    if spec["eps_root"]:  # n = sqrt(||.||^2 + eps): dn/d(B@A) has the new n where _norm has the raw one
        root = np.sqrt(n_raw * n_raw + spec["eps_root"])
        dn = (lambda dn_raw, ratio: lambda v: dn_raw(v * ratio))(dn, n_raw / root)
        n_raw = root
    n = n_raw + spec["eps"]
    with np.errstate(divide="ignore", invalid="ignore"):
        g = c.magnitude / n if spec["g"] == "m/n" else np.ones_like(n)
    x, mask = c.x, c.dropout_mask
    ones = np.ones_like(x)
    dropout = spec["dropout"] if mask is not None else "none"
    if dropout in ("none", "ignored"):
        x1 = x2 = x
        m1 = m2 = ones
        alpha, beta, da, db = g, 0.0 * g, 1.0, 0.0
    elif dropout == "peft":
        x1, x2, m1, m2 = x, x * mask, ones, mask
        alpha, beta, da, db = 1.0 + 0.0 * g, g - 1.0, 0.0, 1.0
    elif dropout == "naive":
        x1 = x2 = x * mask
        m1 = m2 = mask
        alpha, beta, da, db = g, 0.0 * g, 1.0, 0.0
    elif dropout == "clean_base_scaled":
        x1, x2, m1, m2 = x, x * mask, ones, mask
        alpha, beta, da, db = g, 0.0 * g, 1.0, 0.0
    else:
        raise ValueError(dropout)
    z1, z2 = x1 @ c.W0.T, x2 @ c.W0.T
    s_lora = s * s if spec["lora_scale"] == "squared" else s  # the low-rank term's own factor
    lora = s_lora * ((x2 @ c.A.T) @ c.B.T)
    b = np.zeros_like(g) if c.bias is None else c.bias
    gamma, dgam = (1.0, 0.0) if spec["bias"] == "added" else (g, 1.0)
    y = alpha * z1 + beta * z2 + g * lora + gamma * b
    dy = c.dy
    dx = ((dy * alpha) @ c.W0) * m1 + ((dy * beta) @ c.W0 + s_lora * ((dy * g) @ c.B) @ c.A) * m2
    gl = g if spec["grads"] != "lora" else np.ones_like(g)
    dP = s_lora * ((dy * gl).T @ x2)
    dg = np.sum(dy * (da * z1 + db * z2 + lora + dgam * b), axis=0)
    dm = dg / n if spec["grads"] != "dm_times_n" else dg
    if not detach:
        dP = dP + dn(-dg * g / n)
    V = c.W0 + s * (c.B @ c.A)
    factor = {"ok": g[:, None], "without_magnitude": 1.0, "without_norm": c.magnitude[:, None],
              "factor_on_columns": g[None, :]}[spec["merge"]]
    W = factor * V
    Wm, n_given = (W, n) if unmerge_input is None else unmerge_input
    gg = c.magnitude / n_given
    BA = s * (c.B @ c.A)
    # only the unmerge asked for: the per-column one broadcasts only on square weights
    unmerge_by = {"ok": lambda: Wm / gg[:, None] - BA, "without_magnitude": lambda: Wm - BA,
                  "factor_on_columns": lambda: Wm / gg[None, :] - BA}
    W0_back = unmerge_by[spec["unmerge"]]()
    return dict(y=y, weight_norm=n, dx=dx, dA=c.B.T @ dP, dB=dP @ c.A.T, dmagnitude=dm,
                W_merged=W, W0_unmerged=W0_back)


# ---------------------------------------------------------------------------
# the variants: key -> (checks it applies to, overrides, when it applies)
# ---------------------------------------------------------------------------

_F, _B, _M, _I = "forward", "backward", "merge", "init"
_SQUARE = "square"


def _square(c):
    return c.W0.shape[0] == c.W0.shape[1]


#: key: (checks, overrides, condition). Conditions: "square" (a per-column quantity
#: has the per-output shape only when in = out), "dropout", "fan_in_fan_out".
VARIANTS = {
    "norm_axis": ((_F, _B, _M, _I), dict(norm="col"), _SQUARE),
    "scaling_outside_norm": ((_F, _B, _M, _I), dict(norm="no_scaling"), None),
    "norm_of_W0": ((_F, _B, _M, _I), dict(norm="W0"), None),
    "norm_plus_eps": ((_F, _B, _M, _I), dict(eps="eps"), None),
    "norm_eps_under_root": ((_F, _B, _M, _I), dict(eps_root="eps"), None),
    "fan_in_fan_out_norm_untransposed": ((_F, _B, _M, _I), dict(norm="stored_rows"), "fan_in_fan_out"),
    "magnitude_per_input_column": ((_F, _B, _M, _I), dict(layer="column"), _SQUARE),
    "bias_scaled": ((_F, _B), dict(bias="scaled"), "bias"),
    "no_magnitude": ((_F,), dict(g="one"), None),
    "naive_dropout": ((_F, _B), dict(dropout="naive"), "dropout"),
    "dropout_ignored": ((_F, _B), dict(dropout="ignored"), "dropout"),
    "dropout_scales_clean_base": ((_F, _B), dict(dropout="clean_base_scaled"), "dropout"),
    "norm_not_detached": ((_B,), dict(flip_detach=True), "detached"),
    "norm_detached": ((_B,), dict(flip_detach=True), "exact"),
    "dmagnitude_missing_norm": ((_B,), dict(grads="dm_times_n"), None),
    "grads_without_g": ((_B,), dict(grads="lora"), None),
    "merge_without_magnitude": ((_M,), dict(merge="without_magnitude"), None),
    "merge_without_norm": ((_M,), dict(merge="without_norm"), None),
    "factor_on_columns": ((_M,), dict(merge="factor_on_columns", unmerge="factor_on_columns"), _SQUARE),
    "unmerge_factor_on_columns": ((_M,), dict(unmerge="factor_on_columns"), "unmerge_square"),
    "unmerge_without_magnitude": ((_M,), dict(unmerge="without_magnitude"), "unmerge"),
    "magnitude_rounded_at_init": ((_I,), dict(init="rounded"), "low_precision"),
    "scaling_rule": ((_F, _B, _M, _I), dict(scaling="other_rule"), "lora_alpha"),
    "scaling_twice": ((_F, _B), dict(lora_scale="squared"), "scaling_not_one"),
}

#: epsilons tried for ``norm_plus_eps`` and ``norm_eps_under_root``: the dtype's machine
#: epsilon (LyCORIS adds torch.finfo(dtype).eps), and the usual hand-picked ones
EPSILONS = (None, 1e-5, 1e-6, 1e-8, 1e-12)


def applies(key, c, *, check, detach_norm, conv, with_unmerge):
    checks, spec, cond = VARIANTS[key]
    if check not in checks:
        return False
    if conv.per_input_column and key == "magnitude_per_input_column":
        return False
    if conv.per_input_column and spec.get("layer") != "column" and key not in _COLUMN_TOO:
        return False  # the per-output variants do not describe the per-column layer
    if cond == _SQUARE:
        return _square(c)
    if cond == "fan_in_fan_out":
        return conv.fan_in_fan_out and _square(c)
    if cond == "dropout":
        return c.dropout_mask is not None
    if cond == "bias":
        return c.bias is not None
    if cond == "detached":
        return detach_norm
    if cond == "exact":
        return not detach_norm
    if cond == "unmerge":
        return with_unmerge
    if cond == "unmerge_square":
        return with_unmerge and _square(c)
    if cond == "low_precision":
        return np.dtype(c.dtype).name in ("bfloat16", "float16")
    if cond == "scaling_not_one":  # s * s = s at s = 1 (only: at s = -1 it is -s)
        return float(c.scaling) != 1.0
    if cond == "lora_alpha":  # the port computes s itself; at r = 1 both rules give lora_alpha
        return conv.scaling == "lora_alpha" and c.params.get("lora_alpha") is not None and c.A.shape[0] > 1
    return True


#: the variants that ``column_layer`` models on the per-input-column layer too (each
#: changes only what its overrides below name)
_COLUMN_TOO = ("norm_not_detached", "norm_detached", "scaling_rule", "norm_plus_eps", "norm_eps_under_root")
#: the overrides ``column_layer`` applies; it ignores the others (bias, dropout, norm, merge, ...)
COLUMN_OVERRIDES = frozenset(("layer", "flip_detach", "scaling", "eps", "eps_root"))


def combine(key1, key2):
    """The overrides of two variants together, or None if they change the same thing, or if
    one is the per-input-column layer and the other changes what that layer's formula
    (``column_layer``) does not model: such a pair computes the first variant alone, and
    would be ranked on evidence that is the first one's (a bias "scaled" in a layer that
    never scales it)."""
    a, b = VARIANTS[key1][1], VARIANTS[key2][1]
    if set(a) & set(b):
        return None
    both = {**a, **b}
    if both.get("layer") == "column" and not set(both) <= COLUMN_OVERRIDES:
        return None
    return both
