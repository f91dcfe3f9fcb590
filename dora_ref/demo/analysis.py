"""The paper's weight-decomposition analysis (Sec. 3.2, Eqs. 2-4, Fig. 2).

The paper decomposes a weight into a magnitude and a direction (Eq. 2),
``W = m * W / ||W||_c``, and measures how fine-tuning moved each of them
away from the pretrained weight W0, per layer and per training step t:

    ΔM^t = (1/k) Σ_n |m^{n,t} - m_0^n|                  (Eq. 3)
    ΔD^t = (1/k) Σ_n (1 - cos(W^{n,t}, W_0^n))           (Eq. 4)

where n runs over the k "columns" of the paper's (in, out) weight. **In the
PyTorch (out, in) layout used here those are the rows**: one magnitude per
output channel, k = out. (The paper's column norm is the row norm of an
``nn.Linear.weight``; the author confirms the axis in nbasyl/DoRA#1.)

The paper plots one (ΔD, ΔM) point per layer per checkpoint and reads the
sign of the slope: full fine-tuning and DoRA show a negative correlation
(-0.62 and -0.31 on VL-BART), LoRA a positive one (+0.83): LoRA tends to
change magnitude and direction together.

The functions here take plain weights; ``effective_weight`` turns a dora_ref
layer into the weight it computes with (the merged weight of an adapter),
which is what the paper decomposes. Plotting needs matplotlib (the ``demo``
extra) and imports it only when called.
"""
from __future__ import annotations

import numpy as np

from ..core import functional as F
from ..core._validate import as_float_array

#: Correlations between ΔD and ΔM reported by the paper (Sec. 4.1, VL-BART, query matrices)
PAPER_CORRELATIONS = {"FT": -0.62, "DoRA": -0.31, "LoRA": 0.83}


def _pair(W, W0):
    W = as_float_array("W", W, ndim=2)
    W0 = as_float_array("W0", W0, ndim=2)
    if W.shape != W0.shape:
        raise ValueError(f"W and W0 must have the same (out, in) shape, got {W.shape} and {W0.shape}")
    return W, W0


def magnitude_direction(W):
    """Split W into magnitude and direction (paper Eq. 2): ``W = m[:, None] * D``.

    Parameters
    ----------
    W : ndarray, shape (out, in), float32 or float64
        A PyTorch-layout weight.

    Returns
    -------
    m : ndarray, shape (out,)
        The L2 norm of each row (the paper's column norm ``||W||_c``),
        in the units of W's entries.
    D : ndarray, shape (out, in)
        ``W / m[:, None]``: every row has unit norm.

    Raises
    ------
    TypeError
        If W is not a float array.
    ValueError
        If W is not 2-D, or has an all-zero row (its direction is undefined).
    """
    W = as_float_array("W", W, ndim=2)
    m = np.sqrt(np.sum(W * W, axis=1))
    if not m.all():
        raise ValueError(
            f"W has all-zero row(s) {np.flatnonzero(m == 0)[:8].tolist()}: no direction"
        )
    return m, W / m[:, None]


def delta_magnitude(W, W0):
    """ΔM of the paper (Eq. 3): the mean absolute change of the row norms.

    Parameters
    ----------
    W : ndarray, shape (out, in)
        The fine-tuned (or merged adapted) weight.
    W0 : ndarray, shape (out, in)
        The pretrained weight.

    Returns
    -------
    float
        ``mean_i | ||W_i|| - ||W0_i|| |`` over the out rows, in the units of
        the weights' entries.

    Raises
    ------
    TypeError, ValueError
        On non-float input or different shapes.
    """
    W, W0 = _pair(W, W0)
    m = np.sqrt(np.sum(W * W, axis=1))
    m0 = np.sqrt(np.sum(W0 * W0, axis=1))
    return float(np.mean(np.abs(m - m0)))


def delta_direction(W, W0):
    """ΔD of the paper (Eq. 4): the mean cosine distance between rows.

    Parameters
    ----------
    W : ndarray, shape (out, in)
        The fine-tuned (or merged adapted) weight.
    W0 : ndarray, shape (out, in)
        The pretrained weight.

    Returns
    -------
    float
        ``mean_i (1 - cos(W_i, W0_i))`` over the out rows; dimensionless,
        in [0, 2]. 0 means every row kept its direction.

    Raises
    ------
    TypeError, ValueError
        On non-float input, different shapes, or an all-zero row in either
        weight (the cosine is undefined).
    """
    W, W0 = _pair(W, W0)
    _, D = magnitude_direction(W)
    _, D0 = magnitude_direction(W0)
    cos = np.clip(np.sum(D * D0, axis=1), -1.0, 1.0)
    return float(np.mean(1.0 - cos))


def correlation_and_slope(delta_d, delta_m, groups=None):
    """Pearson correlation of (ΔD, ΔM) points and the slope of ΔM on ΔD.

    Parameters
    ----------
    delta_d, delta_m : array_like, shape (P,)
        One point per layer per checkpoint, as in the paper's Fig. 2.
    groups : array_like, shape (P,), optional
        If given (e.g. the training step of each point), each group's mean
        is subtracted from its points first, so only the variation *within*
        a group counts: with steps as groups this compares layers at the
        same step and removes the growth that ΔD and ΔM share over
        training. Without it, all points are pooled, as the paper does.

    Returns
    -------
    corr : float
        Pearson's r, in [-1, 1]; the number the paper reports.
    slope : float
        The least-squares slope of ΔM against ΔD (units of ΔM per unit of
        ΔD), the line the paper's plots suggest.

    Raises
    ------
    ValueError
        With fewer than 2 points, different lengths, non-finite values, or
        zero spread in either coordinate (no correlation is defined).
    """
    x = np.asarray(delta_d, dtype=np.float64)
    y = np.asarray(delta_m, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(
            f"delta_d and delta_m must be 1-D of the same length >= 2, got {x.shape} and {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("delta_d and delta_m must be finite")
    if groups is None:
        dx, dy = x - x.mean(), y - y.mean()
    else:
        groups = np.asarray(groups)
        if groups.shape != x.shape:
            raise ValueError(f"groups must have shape {x.shape}, got {groups.shape}")
        dx, dy = x.copy(), y.copy()
        for g in np.unique(groups):
            sel = groups == g
            dx[sel] -= x[sel].mean()
            dy[sel] -= y[sel].mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0 or syy == 0:
        raise ValueError("delta_d or delta_m has zero spread: the correlation is undefined")
    sxy = float(dx @ dy)
    return sxy / np.sqrt(sxx * syy), sxy / sxx


def effective_weight(layer):
    """The (out, in) weight a layer computes with, as the paper decomposes it.

    Parameters
    ----------
    layer : DoRALinear, LoRALinear, or any object with a ``weight`` (out, in)
        For an unmerged DoRA layer: ``m / ||W0 + s B A||_row * (W0 + s B A)``
        (``dora_ref.core.functional.merge``); for LoRA: ``W0 + s B A``; for a
        merged adapter or a dense layer: its ``weight``.

    Returns
    -------
    W : ndarray, shape (out, in), a new array
    """
    from ..layers.linear import DoRALinear, LoRALinear

    if isinstance(layer, DoRALinear) and not layer.merged:
        W, _ = F.merge(layer.weight, layer.lora_A, layer.lora_B,
                       layer.lora_magnitude_vector, layer.scaling)
        return W
    if isinstance(layer, LoRALinear) and not layer.merged:
        return layer.weight + layer.scaling * (layer.lora_B @ layer.lora_A)
    return np.array(layer.weight, copy=True)


def plot_decomposition(ax, delta_d, delta_m, layers, steps, *, title=None, paper_corr=None,
                       points_label=None, summary=None):
    """Draw one panel of the paper's Fig. 2: ΔM against ΔD.

    Marker shape says the layer, colour the training step, and a dashed line
    is the least-squares fit; the title gives the correlation.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    delta_d, delta_m : array_like, shape (P,)
    layers : sequence of str, length P
        The layer of each point (legend entries).
    steps : sequence of int, length P
        The training step of each point (colour).
    title : str, optional
        The method's name; the measured correlation is appended.
    paper_corr : float, optional
        The paper's correlation for this method, shown next to the measured one.
    points_label : str, optional
        Which run the points are (e.g. ``"seed 0"``); the title's correlation
        and the fit line's slope are labelled with it, so that they are not
        mistaken for a statistic over several runs.
    summary : str, optional
        A second title line, e.g. the same statistic averaged over seeds
        (``"mean over 5 seeds: r = +0.31 ± 0.12"``).

    Returns
    -------
    corr, slope : float
        As ``correlation_and_slope``.
    """
    import matplotlib.pyplot as plt

    x = np.asarray(delta_d, dtype=np.float64)
    y = np.asarray(delta_m, dtype=np.float64)
    corr, slope = correlation_and_slope(x, y)
    steps = np.asarray(steps)
    uniq_steps = sorted(set(steps.tolist()))
    cmap = plt.get_cmap("viridis")
    colours = {s: cmap(i / max(len(uniq_steps) - 1, 1)) for i, s in enumerate(uniq_steps)}
    markers = "osD^vP*X"
    for j, name in enumerate(dict.fromkeys(layers)):
        sel = np.array([lay == name for lay in layers])
        ax.scatter(x[sel], y[sel], c=[colours[s] for s in steps[sel]], marker=markers[j % 8],
                   s=42, edgecolors="black", linewidths=0.5)
        # legend entry in white: the colour of a point means its step, not its layer
        ax.scatter([], [], marker=markers[j % 8], s=42, facecolors="white",
                   edgecolors="black", linewidths=0.5, label=name)
    xs = np.linspace(x.min(), x.max(), 2)
    which = f" ({points_label})" if points_label else ""
    ax.plot(xs, y.mean() + slope * (xs - x.mean()), "--", color="grey", lw=1,
            label=f"least-squares fit{which}, slope {slope:.2g}")
    paper = f" (paper {paper_corr:+.2f})" if paper_corr is not None else ""
    if points_label:  # one line per statistic, each saying what it is over
        lines = [f"{title or ''}{paper}".strip(), f"{points_label}: corr {corr:+.2f}, slope {slope:.2g}"]
    else:
        lines = [f"{title + ': ' if title else ''}corr {corr:+.2f}{paper}"]
    ax.set_title("\n".join(lines + ([summary] if summary else [])), fontsize=10)
    ax.set_xlabel("ΔD: mean (1 − cos) to W0 (dimensionless)")
    ax.set_ylabel("ΔM: mean |Δ row norm| (weight units)")
    ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    return corr, slope
