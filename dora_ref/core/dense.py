"""The readable definition of DoRA: forms V = W0 + s * B @ A in full.

This is the spec every faster path in dora_ref is tested against. It is
slow and memory-hungry on purpose (it allocates (out, in) matrices, as PEFT
does), and it follows the paper's equations literally, including the
gradient w.r.t. V written as the paper's projection (Eq. 6) rather than by
the chain rule that ``dora_ref.core.functional`` uses. Two different routes to the
same numbers make a useful check.

Weights are (out, in); the paper's column norm ``||.||_c`` is the L2 norm of
each *row* here, one value per output channel.
"""
from __future__ import annotations

import numpy as np

from ._validate import check_adapter, check_flag, check_input, check_scaling
from .functional import DoRAGrads


def direction(W0, A, B, scaling):
    """V = W0 + s * B @ A, the (unnormalised) direction matrix (paper Eq. 5).

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    scaling : float

    Returns
    -------
    V : ndarray, shape (out, in)
    """
    W0, A, B, _, _ = check_adapter(W0, A, B)
    return W0 + check_scaling(scaling) * (B @ A)


def row_norm(V):
    """||V||_c of the paper: the L2 norm of each row of an (out, in) matrix, shape (out,)."""
    return np.sqrt(np.sum(V * V, axis=1))


def magnitude_init(W0, A, B, scaling):
    """m = ||W0 + s * B @ A||_row, PEFT's magnitude initialisation; shape (out,)."""
    return row_norm(direction(W0, A, B, scaling))


def merged_weight(W0, A, B, magnitude, scaling):
    """W' = m * V / ||V||_c (paper Eq. 5), shape (out, in): the merged weight."""
    V = direction(W0, A, B, scaling)
    return (magnitude / row_norm(V))[:, None] * V


def forward(x, W0, A, B, magnitude, scaling, bias=None, dropout_mask=None):
    """DoRA output from the full merged weight, PEFT semantics.

    Parameters
    ----------
    x : ndarray, shape (..., in)
    W0, A, B, magnitude, scaling, bias
        As in ``dora_ref.core.functional.dora_forward``.
    dropout_mask : ndarray, shape of x, optional
        With a mask, PEFT's training formula:
        ``y = x W0^T + b + (g - 1)(xd W0^T) + g s (xd A^T) B^T``, xd = x * mask,
        written here as ``x W0^T + b + xd (W' - W0)^T``.

    Returns
    -------
    y : ndarray, shape (..., out)
    """
    W0, A, B, magnitude, bias = check_adapter(W0, A, B, magnitude, bias)
    x2 = check_input(x, W0.shape[1], W0.dtype)
    W_merged = merged_weight(W0, A, B, magnitude, scaling)
    if dropout_mask is None:
        y = x2 @ W_merged.T
    else:
        xd = x2 * np.asarray(dropout_mask).reshape(x2.shape)
        y = x2 @ W0.T + xd @ (W_merged - W0).T
    if bias is not None:
        y = y + bias
    return y.reshape(*np.shape(x)[:-1], W0.shape[0])


def backward(dy, x, W0, A, B, magnitude, scaling, *, detach_norm=True, dropout_mask=None):
    """Gradients by the paper's formulas, from full (out, in) matrices.

    With G = dL/dW' = dy^T x (the gradient w.r.t. the merged weight) and V,
    n = ||V||_c, g = m / n:

    * paper Eq. (7): dm_i = G_i . V_i / n_i;
    * paper Eq. (6), exact: dV_i = g_i (I - V_i V_i^T / n_i^2) G_i;
    * paper Eq. (11), norm detached (Sec. 4.3): dV_i = g_i G_i;
    * then dA = s B^T dV and dB = s dV A^T, since V = W0 + s B A.

    With a dropout mask, W' acts on xd = x * mask (see ``forward``), so
    G = dy^T xd, and dx gets the clean base path dy W0 plus the masked
    correction.

    Parameters
    ----------
    dy : ndarray, shape (..., out)
    x : ndarray, shape (..., in)
    W0, A, B, magnitude, scaling
        As in ``forward``.
    detach_norm : bool, default True
    dropout_mask : ndarray, shape of x, optional

    Returns
    -------
    DoRAGrads
        dx (..., in), dA (r, in), dB (out, r), dmagnitude (out,).
    """
    W0, A, B, magnitude, _ = check_adapter(W0, A, B, magnitude)
    s = check_scaling(scaling)
    detach_norm = check_flag("detach_norm", detach_norm)
    x2 = check_input(x, W0.shape[1], W0.dtype)
    dy2 = check_input(dy, W0.shape[0], W0.dtype, name="dy", axis="out")
    V = W0 + s * (B @ A)
    n = row_norm(V)
    g = magnitude / n
    W_merged = g[:, None] * V
    xd = x2 if dropout_mask is None else x2 * np.asarray(dropout_mask).reshape(x2.shape)

    G = dy2.T @ xd  # dL/dW', (out, in)
    dmagnitude = np.sum(G * V, axis=1) / n  # Eq. (7)
    dV = g[:, None] * G  # Eq. (11)
    if not detach_norm:  # Eq. (6): remove the component along V_i
        dV -= g[:, None] * (np.sum(G * V, axis=1) / n**2)[:, None] * V
    dA = s * (B.T @ dV)
    dB = s * (dV @ A.T)
    if dropout_mask is None:
        dx = dy2 @ W_merged
    else:
        dx = dy2 @ W0 + (dy2 @ (W_merged - W0)) * np.asarray(dropout_mask).reshape(x2.shape)
    return DoRAGrads(dx.reshape(np.shape(x)), dA, dB, dmagnitude)
