r"""DoRA (and LoRA) for Conv1d / Conv2d / Conv3d: the linear core on patches.

A convolution is a linear layer applied to patches. ``im2col`` cuts the
(zero-padded) input into one row per output position, each row holding the
``in * k1 * ... * kd`` values the kernel sees; the kernel, flattened to
``(out, in * k1 * ... * kd)``, is then an ``nn.Linear`` weight. So DoRA for a
convolution is ``dora_ref.core.functional.dora_forward`` / ``dora_backward`` on
that patch matrix, and the norm is ``column_norm`` of the flattened kernel:
this module adds only the patch bookkeeping, no second copy of the DoRA math.

Shapes (d = 1, 2, 3 spatial dims; PEFT's, i.e. ``torch.nn.ConvNd``'s)
--------------------------------------------------------------------
=====================  ==========================  ==============================
symbol                 shape                       PEFT name
=====================  ==========================  ==============================
x                      (N, in, *L)                 the layer input
weight (W0)            (out, in/groups, *k)        ``base_layer.weight``
bias                   (out,)                      ``base_layer.bias``
lora_A                 (r, in, *k)                 ``lora_A.<adapter>.weight``
lora_B                 (out, r/groups, 1, ..., 1)  ``lora_B.<adapter>.weight``
magnitude              (1, out, 1, ..., 1)         ``lora_magnitude_vector``
y                      (N, out, *L_out)            the layer output
=====================  ==========================  ==============================

``lora_A`` is a convolution in -> r with the base's kernel size, stride and
padding (and, here, dilation, see below); ``lora_B`` is a 1x...x1
convolution r -> out with ``groups = base.groups`` (PEFT ``_ConvNd.update_layer``).

The magnitude has one value per output channel: the norm of output channel o
is taken over everything that produces it, (in/groups, *k), i.e. the row norm
of the flattened ``(out, in/groups * k...)`` kernel (PEFT
``_DoraConvNdLayer.get_weight_norm``, dims ``1..ndim-1``). It is stored in
PEFT's shape (1, out, 1, ...) so it broadcasts against (N, out, *L_out).

The forward, with P = im2col(x) of shape (N * prod(L_out), in * prod(k))::

    y_rows = dora_forward(P, W0.reshape(out, -1), lora_A.reshape(r, -1),
                          lora_B.reshape(out, r), m, s, bias)
    y      = y_rows reshaped to (N, *L_out, out), channels moved to axis 1

and the backward walks it back: ``dora_backward`` gives the gradient of P,
and ``col2im`` scatter-adds each patch row back to the input positions it
was read from (a loop over the kernel offsets).

Where dora_ref deliberately differs from PEFT
---------------------------------------------
* **dilation.** PEFT's ``lora_A`` copies ``kernel_size, stride, padding`` but
  *not* ``dilation`` (``_ConvNd.update_layer``), while its norm and its merge
  treat ``B @ A`` as a delta of the dilated base kernel. For a dilated
  convolution with a kernel larger than 1 its low-rank path therefore sees a
  different receptive field and a different output size: PEFT 0.21.2's
  forward raises a shape error, or, where the base output has length 1,
  silently broadcasts to the low-rank path's larger shape (a Conv1d with
  k = 3, dilation 2 on length 5 returns (N, out, 3) instead of (N, out, 1));
  and its merged layer is not its unmerged one. Here ``lora_A`` uses the base dilation, so
  ``W0 + s * delta`` is one kernel and forward, norm and merge agree. With
  dilation 1 (or a 1x...x1 kernel) the two are identical.
* **groups > 1.** PEFT keeps ``lora_A`` ungrouped (in -> r) and ``lora_B``
  grouped, so the low-rank delta of output channel o reads *all* input
  channels, while the base kernel reads only its group's. The layer is the
  linear map of the dense kernel ``V = blockdiag(W0) + s * B_full @ A``
  (``grouped_to_dense``, ``lora_B_dense``), and dora_ref normalises the rows of
  that V. PEFT instead reshapes ``lora_B.view(-1, r) @ lora_A.view(r, -1)``
  into W0's shape, which mixes output channels (docs/peft_dora.md, Sec. 1 "Convolutions"), and
  refuses to merge. Here merge works and returns the dense (out, in, *k)
  kernel of a ``groups=1`` convolution: the merged layer is no longer grouped,
  because the adapted layer is not. At initialisation (B = 0) both give the
  same magnitude. Cost: the dense view multiplies the base product's work by
  ``groups`` (a depthwise conv pays ``in`` times); the plain ``conv_nd``
  loops over groups instead.
* **(1, 1, k) Conv3d kernels.** PEFT's merge takes a Conv2d 1x1 shortcut
  for them and crashes (peft#3768); here every kernel shape goes through the
  same flattened merge.
* **padding.** Zero padding only (``padding_mode="zeros"``); an int, a tuple,
  ``"valid"`` or ``"same"`` (stride 1), as ``torch.nn.ConvNd``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..core import functional as F
from ..core._validate import (
    WeightSnapshot,
    as_float_array,
    check_result_finite,
    check_rows_finite,
    check_same_dtype,
    check_scaling,
    check_weight_shape,
)
from .base import (
    AdapterLayer,
    EvalNormCache,
    adapter_parameter,
    frozen,
    refuse_unrecoverable_merge,
)
from .linear import initial_lora_weights, lora_scaling

__all__ = [
    "ConvGeometry",
    "conv_nd",
    "im2col",
    "col2im",
    "grouped_to_dense",
    "dense_to_grouped",
    "lora_B_dense",
    "conv_delta_weight",
    "conv_column_norm",
    "conv_init_magnitude",
    "conv_dora_forward",
    "conv_dora_backward",
    "conv_merge",
    "conv_unmerge",
    "conv_lora_forward",
    "conv_lora_backward",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "DoRAConv1d",
    "DoRAConv2d",
    "DoRAConv3d",
    "initial_conv_lora_weights",
]


# ---------------------------------------------------------------------------
# geometry: stride, padding, dilation, groups
# ---------------------------------------------------------------------------


_MAX_GEOMETRY = 2**31 - 1  # any larger stride, padding or dilation is no layer's: refused by name


def _ntuple(name, value, d, minimum):
    """An int or a length-d sequence of ints >= minimum (below 2**31), as a tuple of d ints.

    Anything else raises ``ValueError`` naming the argument (a float, which
    is not a sequence, too: ``TypeError: 'float' object is not iterable``
    named nothing, and a padding of 10**30 reached ``np.pad``).
    """
    if isinstance(value, (int, np.integer)):
        items = (value,) * d
    else:
        try:
            items = tuple(value)
        except TypeError:
            items = None
    if items is None or len(items) != d or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        and minimum <= v <= _MAX_GEOMETRY for v in items
    ):
        raise ValueError(
            f"{name} must be an int >= {minimum} (below 2**31) or a tuple of {d} such ints, "
            f"got {value!r:.60}"
        )
    return tuple(int(v) for v in items)


@dataclass(frozen=True)
class ConvGeometry:
    """How a d-dimensional convolution walks its input (``torch.nn.ConvNd``'s arguments).

    Attributes
    ----------
    kernel_size, stride, dilation : tuple of d ints
    padding : tuple of d (left, right) pairs of ints
        Zeros added before and after each spatial dimension.
    groups : int
    """

    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @classmethod
    def make(cls, kernel_size, stride=1, padding=0, dilation=1, groups=1):
        """Check and normalise torch-style arguments.

        ``padding`` may be an int, a tuple of d ints, ``"valid"`` (no padding)
        or ``"same"`` (output length = input length; stride 1 only; an odd
        total is split with the extra zero on the right, as torch does).

        Raises
        ------
        ValueError
            On a non-positive size, a negative padding, an unknown padding
            string, ``"same"`` with a stride > 1, or groups < 1.
        """
        kernel_size = tuple(int(k) for k in kernel_size)
        d = len(kernel_size)
        if d not in (1, 2, 3) or min(kernel_size) < 1:
            raise ValueError(f"kernel_size must be 1 to 3 positive ints, got {kernel_size}")
        stride = _ntuple("stride", stride, d, 1)
        dilation = _ntuple("dilation", dilation, d, 1)
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0),) * d
            elif padding == "same":
                if stride != (1,) * d:
                    raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
                totals = [dl * (k - 1) for dl, k in zip(dilation, kernel_size)]
                pads = tuple((t // 2, t - t // 2) for t in totals)
            else:
                raise ValueError(f"padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
        else:
            pads = tuple((p, p) for p in _ntuple("padding", padding, d, 0))
        return cls(kernel_size, stride, pads, dilation, int(groups))

    @property
    def ndim(self):
        return len(self.kernel_size)

    def output_shape(self, spatial):
        """L_out_i = (L_i + pad_i - dilation_i (k_i - 1) - 1) // stride_i + 1 (torch's formula).

        Raises ``ValueError`` if the padded input is smaller than the dilated kernel.
        """
        out = []
        for L, (pl, pr), k, s, dl in zip(
            spatial, self.padding, self.kernel_size, self.stride, self.dilation
        ):
            span = dl * (k - 1) + 1
            if L + pl + pr < span:
                raise ValueError(
                    f"input spatial size {tuple(spatial)} (padded by {self.padding}) is smaller "
                    f"than the dilated kernel {self.kernel_size} x dilation {self.dilation}"
                )
            out.append((L + pl + pr - span) // s + 1)
        return tuple(out)


# ---------------------------------------------------------------------------
# im2col / col2im: the convolution as a matrix of patches
# ---------------------------------------------------------------------------


def im2col(x, geom):
    """Cut x into patches: one row per output position (zero padding).

    Parameters
    ----------
    x : ndarray, shape (N, C, *L)
    geom : ConvGeometry

    Returns
    -------
    P : ndarray, shape (N * prod(L_out), C * prod(k)), new array
        Row ``(n, *l)`` (C order) holds ``x_padded[n, c, l*stride + j*dilation]``
        for c and the kernel offsets j, ordered ``(c, *j)`` like a flattened
        ``(out, C, *k)`` kernel's columns.
    out_spatial : tuple of d ints, L_out
    """
    d = geom.ndim
    out_spatial = geom.output_shape(x.shape[2:])
    xp = np.pad(x, ((0, 0), (0, 0)) + geom.padding)
    spans = tuple(dl * (k - 1) + 1 for dl, k in zip(geom.dilation, geom.kernel_size))
    windows = sliding_window_view(xp, spans, axis=tuple(range(2, 2 + d)))  # (N, C, *positions, *spans)
    pick = (slice(None), slice(None))
    pick += tuple(slice(None, None, s) for s in geom.stride)  # every stride-th position
    pick += tuple(slice(None, None, dl) for dl in geom.dilation)  # every dilation-th tap
    windows = windows[pick]  # (N, C, *L_out, *k)
    order = (0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))  # (N, *L_out, C, *k)
    n_rows = x.shape[0] * math.prod(out_spatial)
    P = windows.transpose(order).reshape(n_rows, x.shape[1] * math.prod(geom.kernel_size))
    return P, out_spatial


def col2im(dP, x_shape, geom):
    """The adjoint of ``im2col``: scatter-add patch gradients back onto x.

    Each entry of x was copied into every patch whose window covers it, so
    its gradient is the sum over those copies. One strided ``+=`` per kernel
    offset j adds the j-th tap of every patch to the positions it was read from.

    Parameters
    ----------
    dP : ndarray, shape (N * prod(L_out), C * prod(k))
    x_shape : tuple, (N, C, *L)
    geom : ConvGeometry

    Returns
    -------
    dx : ndarray, shape x_shape
    """
    d = geom.ndim
    N, C, spatial = x_shape[0], x_shape[1], tuple(x_shape[2:])
    out_spatial = geom.output_shape(spatial)
    dP = dP.reshape(N, *out_spatial, C, *geom.kernel_size)  # row (n, *l), column (c, *j)
    padded = tuple(L + pl + pr for L, (pl, pr) in zip(spatial, geom.padding))
    dxp = np.zeros((N, *padded, C), dtype=dP.dtype)  # channels last, as the rows of dP
    rows = (slice(None),) * (d + 2)  # all of (n, *l, c)
    for j in np.ndindex(*geom.kernel_size):
        taps = tuple(
            slice(ji * dl, ji * dl + s * (Lo - 1) + 1, s)
            for ji, dl, s, Lo in zip(j, geom.dilation, geom.stride, out_spatial)
        )
        dxp[(slice(None),) + taps] += dP[rows + j]  # tap j of every patch, (N, *L_out, C)
    crop = tuple(slice(pl, pl + L) for (pl, _), L in zip(geom.padding, spatial))
    return np.ascontiguousarray(np.moveaxis(dxp[(slice(None),) + crop], -1, 1))


def conv_nd(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1):
    """A plain convolution (torch ``F.conv{1,2,3}d`` semantics) by im2col and BLAS.

    Parameters
    ----------
    x : ndarray, shape (N, in, *L), float32 or float64
    weight : ndarray, shape (out, in/groups, *k), same dtype
    bias : ndarray, shape (out,), optional
    stride, padding, dilation, groups
        As ``torch.nn.ConvNd``; zero padding.

    Returns
    -------
    y : ndarray, shape (N, out, *L_out)

    Raises
    ------
    TypeError, ValueError
        On bad dtypes, shapes, or arguments.
    """
    weight = as_float_array("weight", weight, ndim=(3, 4, 5))
    geom = ConvGeometry.make(weight.shape[2:], stride, padding, dilation, groups)
    x = _check_x(x, weight.shape[1] * groups, geom.ndim, weight.dtype)
    _check_groups(weight.shape[0], weight.shape[1] * groups, groups)
    if bias is not None:
        bias = _check_bias(bias, weight)
    P, out_spatial = im2col(x, geom)
    out, cols = weight.shape[0], weight[0].size  # cols = in/groups * prod(k)
    W = weight.reshape(out, cols)
    G, og = groups, out // groups
    y = np.empty((P.shape[0], out), dtype=weight.dtype)
    for j in range(G):  # group j: its output channels read only its input channels
        y[:, j * og : (j + 1) * og] = P[:, j * cols : (j + 1) * cols] @ W[j * og : (j + 1) * og].T
    if bias is not None:
        y += bias
    return _rows_to_channels_first(y, x.shape[0], out_spatial)


def _rows_to_channels_first(y_rows, N, out_spatial):
    """(N * prod(L_out), out) -> (N, out, *L_out), contiguous."""
    y = y_rows.reshape(N, *out_spatial, y_rows.shape[1])
    return np.ascontiguousarray(np.moveaxis(y, -1, 1))


def _channels_last_rows(dy):
    """(N, out, *L_out) -> (N * prod(L_out), out): the inverse of the above."""
    return np.moveaxis(dy, 1, -1).reshape(-1, dy.shape[1])


# ---------------------------------------------------------------------------
# grouped kernels as dense kernels
# ---------------------------------------------------------------------------


def grouped_to_dense(weight, groups):
    """The dense (out, in, *k) kernel of a grouped (out, in/groups, *k) one.

    Output channel o of group j = o // (out/groups) reads input channels
    ``j*in/G .. (j+1)*in/G - 1`` only; every other entry of its dense row is 0.
    With groups = 1 this returns ``weight`` itself.

    Parameters
    ----------
    weight : ndarray, shape (out, in/groups, *k)
    groups : int

    Returns
    -------
    ndarray, shape (out, in, *k)
    """
    if groups == 1:
        return weight
    out, cg = weight.shape[:2]
    og = out // groups
    dense = np.zeros((out, cg * groups, *weight.shape[2:]), dtype=weight.dtype)
    for j in range(groups):
        dense[j * og : (j + 1) * og, j * cg : (j + 1) * cg] = weight[j * og : (j + 1) * og]
    return dense


def dense_to_grouped(dense, groups):
    """The diagonal blocks of a dense (out, in, *k) kernel: (out, in/groups, *k).

    The inverse of ``grouped_to_dense`` (it drops the off-block entries).
    """
    if groups == 1:
        return dense
    out, cin = dense.shape[:2]
    og, cg = out // groups, cin // groups
    return np.concatenate(
        [dense[j * og : (j + 1) * og, j * cg : (j + 1) * cg] for j in range(groups)], axis=0
    )


def lora_B_dense(lora_B, groups):
    """PEFT's grouped 1x..x1 ``lora_B`` (out, r/groups, 1, ...) as a dense (out, r) matrix.

    The grouped 1x1 convolution r -> out is the linear map of this matrix:
    block-diagonal, output channel o of group j reading ranks
    ``j*r/G .. (j+1)*r/G - 1``.
    """
    out, rg = lora_B.shape[:2]
    return grouped_to_dense(lora_B.reshape(out, rg), groups)


def conv_delta_weight(lora_A, lora_B, scaling, groups=1):
    """The low-rank delta as a dense kernel: s * lora_B_dense @ lora_A, shape (out, in, *k).

    With groups = 1 this equals PEFT ``_ConvNd.get_delta_weight`` (which
    includes the scaling). With groups > 1 it is the true delta of the
    (ungrouped A, grouped B) path, which PEFT does not compute.

    Parameters
    ----------
    lora_A : ndarray, shape (r, in, *k)
    lora_B : ndarray, shape (out, r/groups, 1, ...)
    scaling : float
    groups : int, default 1

    Returns
    -------
    ndarray, shape (out, in, *k)
    """
    scaling = check_scaling(scaling)
    r = lora_A.shape[0]
    B = lora_B_dense(lora_B, groups)
    return (scaling * (B @ lora_A.reshape(r, -1))).reshape(B.shape[0], *lora_A.shape[1:])


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


def _check_groups(out, cin, groups):
    if out % groups or cin % groups:
        raise ValueError(
            f"groups={groups} must divide in_channels={cin} and out_channels={out}"
        )


def _check_x(x, in_channels, d, dtype, name="x"):
    """x as (N, in, *L); an unbatched (in, *L) input is not accepted here."""
    x = as_float_array(name, x)
    if x.ndim != d + 2 or x.shape[1] != in_channels:
        raise ValueError(
            f"{name} must have shape (N, in, {', '.join('L' + str(i) for i in range(1, d + 1))}) "
            f"with in = {in_channels}, got {x.shape}"
        )
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the weights have dtype {dtype}")
    return x


def _check_bias(bias, weight):
    bias = as_float_array("bias", bias, ndim=1)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape (out,) = ({weight.shape[0]},), got {bias.shape}")
    return bias


def _check_conv_adapter(weight, lora_A, lora_B, groups, magnitude=None):
    """Check PEFT-shaped conv adapter arrays; return them and the flat magnitude (out,)."""
    weight = as_float_array("weight", weight, ndim=(3, 4, 5))
    d = weight.ndim - 2
    lora_A = as_float_array("lora_A", lora_A, ndim=d + 2)
    lora_B = as_float_array("lora_B", lora_B, ndim=d + 2)
    out, cg, k = weight.shape[0], weight.shape[1], weight.shape[2:]
    check_weight_shape("weight", weight.shape, ("output channel", "input channel"))
    cin = cg * groups
    _check_groups(out, cin, groups)
    r = lora_A.shape[0]
    shapes = f"weight {weight.shape}, lora_A {lora_A.shape}, lora_B {lora_B.shape}, groups={groups}"
    if r == 0 or r % groups:
        raise ValueError(
            f"the rank r = {r} must be a positive multiple of groups = {groups} "
            f"(PEFT raises the same); got {shapes}"
        )
    if lora_A.shape != (r, cin, *k):
        raise ValueError(f"lora_A must have shape (r, in, *k) = ({r}, {cin}, *{k}); got {shapes}")
    if lora_B.shape != (out, r // groups) + (1,) * d:
        raise ValueError(
            f"lora_B must have shape (out, r/groups, 1, ...) = "
            f"{(out, r // groups) + (1,) * d}; got {shapes}"
        )
    m = None
    if magnitude is not None:
        magnitude = as_float_array("magnitude", magnitude)
        if magnitude.shape not in ((out,), (1, out) + (1,) * d):
            raise ValueError(
                f"magnitude must have shape (out,) = ({out},) or PEFT's (1, out, 1, ...) = "
                f"{(1, out) + (1,) * d}; got {magnitude.shape}"
            )
        m = magnitude.reshape(out)
    check_same_dtype(weight=weight, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude)
    return weight, lora_A, lora_B, m


def _flat(weight, lora_A, lora_B, groups):
    """The linear-layer view: W0 (out, in*K), A (r, in*K), B (out, r).

    With groups = 1 these are views; with groups > 1 W0 and B are the dense
    block-diagonal matrices (see ``grouped_to_dense``).
    """
    out, r = weight.shape[0], lora_A.shape[0]
    W0 = grouped_to_dense(weight, groups).reshape(out, -1)
    return W0, lora_A.reshape(r, -1), lora_B_dense(lora_B, groups)


# ---------------------------------------------------------------------------
# norm, magnitude, forward, backward
# ---------------------------------------------------------------------------


def conv_column_norm(weight, lora_A, lora_B, scaling, groups=1):
    """Per-output-channel norm of the adapted kernel V = W0 + s * delta.

    Output channel o's norm is taken over everything that produces it,
    (in/groups, *k) for the base kernel: the row norm of the flattened
    kernel, ``functional.column_norm`` of the linear view.

    Parameters
    ----------
    weight : ndarray, shape (out, in/groups, *k), float32 or float64
    lora_A : ndarray, shape (r, in, *k)
    lora_B : ndarray, shape (out, r/groups, 1, ...)
    scaling : float
    groups : int, default 1

    Returns
    -------
    n : ndarray, shape (out,)

    Raises
    ------
    TypeError, ValueError
        On bad dtypes or shapes, or NaN/Inf in the weights.

    Notes
    -----
    groups = 1: PEFT ``_DoraConvNdLayer.get_weight_norm`` (``V.norm(dim=(1, ..))``),
    flattened. groups > 1: the norm of the dense adapted kernel; PEFT's
    differs there (see the module docstring).
    """
    weight, lora_A, lora_B, _ = _check_conv_adapter(weight, lora_A, lora_B, groups)
    return F.column_norm(*_flat(weight, lora_A, lora_B, groups), scaling)


def conv_init_magnitude(weight, lora_A, lora_B, scaling, groups=1):
    """PEFT's magnitude init, in PEFT's shape: (1, out, 1, ...) = ``conv_column_norm``.

    Parameters
    ----------
    As ``conv_column_norm``.

    Returns
    -------
    magnitude : ndarray, shape (1, out, 1, ..., 1) (d ones after out)

    Notes
    -----
    Matches PEFT ``_DoraConvNdLayer.update_layer`` (the norm with keepdim,
    transposed to (1, out, 1, ...)).
    """
    n = conv_column_norm(weight, lora_A, lora_B, scaling, groups)
    return n.reshape((1, -1) + (1,) * (np.ndim(weight) - 2))


@dataclass
class ConvDoRAContext:
    """What ``conv_dora_forward`` keeps for ``conv_dora_backward``: treat as opaque."""

    linear: object  # the functional.DoRAContext (or LoRAContext) of the patch matrix
    x_shape: tuple
    geom: ConvGeometry
    lora_A_shape: tuple
    lora_B_shape: tuple
    magnitude_shape: Optional[tuple]
    seen: Optional[WeightSnapshot] = None  # the PEFT-shaped arrays as the forward saw them


def _patch_mask(dropout_mask, x):
    if dropout_mask is None:
        return None
    mask = as_float_array("dropout_mask", dropout_mask)
    if mask.shape != x.shape or mask.dtype != x.dtype:
        raise ValueError(
            f"dropout_mask must have the shape and dtype of x {x.shape} {x.dtype}, "
            f"got {mask.shape} {mask.dtype}"
        )
    return mask


def conv_dora_forward(
    x,
    weight,
    lora_A,
    lora_B,
    magnitude,
    scaling,
    bias=None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    dropout_mask=None,
    weight_norm=None,
    allow_zero_norm=False,
):
    """DoRA convolution forward (PEFT ``_DoraConvNdLayer.forward``, paper Eq. 5).

    Without dropout (eval, or ``lora_dropout = 0``)::

        y = g * (conv(x, W0) + s * lora_B(lora_A(x))) + bias,   g = m / n per channel

    With a dropout mask, xd = x * mask, PEFT's training formula (see
    ``functional.dora_forward``)::

        y = conv(x, W0) + bias + (g - 1) * conv(xd, W0) + g * s * lora_B(lora_A(xd))

    Computed as ``functional.dora_forward`` on the patch matrix of x.

    Parameters
    ----------
    x : ndarray, shape (N, in, *L), float32 or float64
    weight : ndarray, shape (out, in/groups, *k), same dtype
    lora_A : ndarray, shape (r, in, *k), same dtype
    lora_B : ndarray, shape (out, r/groups, 1, ..., 1), same dtype
    magnitude : ndarray, shape (1, out, 1, ..., 1) (PEFT's) or (out,)
    scaling : float
    bias : ndarray, shape (out,), optional
        Never multiplied by g.
    stride, padding, dilation, groups
        The base convolution's, as ``torch.nn.ConvNd`` (zero padding). lora_A
        uses the same stride, padding and dilation (PEFT omits the dilation:
        see the module docstring).
    dropout_mask : ndarray, shape of x, optional
        Scaled keep mask (0 or 1 / (1 - p)), so that x * mask is
        ``torch.nn.Dropout(p)(x)``.
    weight_norm : ndarray, shape (out,), optional
        A precomputed ``conv_column_norm`` of these exact weights (trusted).
    allow_zero_norm : bool, default False
        See ``functional.dora_forward``.

    Returns
    -------
    y : ndarray, shape (N, out, *L_out)
    ctx : ConvDoRAContext

    Raises
    ------
    TypeError, ValueError
        On bad dtypes, shapes or arguments (the message names them), a rank
        not divisible by groups, NaN/Inf in a weight, or a zero channel norm.
    """
    weight, lora_A, lora_B, m = _check_conv_adapter(weight, lora_A, lora_B, groups, magnitude)
    if m is None:
        raise TypeError("magnitude must be an array of shape (1, out, 1, ...), got None")
    geom = ConvGeometry.make(weight.shape[2:], stride, padding, dilation, groups)
    x = _check_x(x, lora_A.shape[1], geom.ndim, weight.dtype)
    mask = _patch_mask(dropout_mask, x)
    P, out_spatial = im2col(x, geom)
    P_mask = None if mask is None else im2col(mask, geom)[0]
    W0, A, B = _flat(weight, lora_A, lora_B, groups)
    y_rows, lin = F.dora_forward(
        P, W0, A, B, m, scaling, bias,
        dropout_mask=P_mask, weight_norm=weight_norm, allow_zero_norm=allow_zero_norm,
    )
    seen = WeightSnapshot({"lora_A": lora_A, "lora_B": lora_B, "lora_magnitude_vector": m})
    ctx = ConvDoRAContext(lin, x.shape, geom, lora_A.shape, lora_B.shape, np.shape(magnitude),
                          seen)
    return _rows_to_channels_first(y_rows, x.shape[0], out_spatial), ctx


def _check_dy(dy, ctx, out):
    dy = as_float_array("dy", dy)
    want = (ctx.x_shape[0], out, *ctx.geom.output_shape(ctx.x_shape[2:]))
    if dy.shape != want:
        raise ValueError(f"dy must have the forward output's shape {want}, got {dy.shape}")
    return _channels_last_rows(dy)


def _grouped_grads(ctx, dA, dB):
    """Back from the linear view to PEFT's shapes: dA (r, in, *k), dB (out, r/G, 1..)."""
    out = ctx.lora_B_shape[0]
    dB = dense_to_grouped(dB, ctx.geom.groups)  # the blocks that are parameters
    return dA.reshape(ctx.lora_A_shape), dB.reshape(out, -1).reshape(ctx.lora_B_shape)


def conv_dora_backward(dy, ctx, *, detach_norm=True):
    """Gradients of a DoRA convolution (``functional.dora_backward`` + col2im).

    Parameters
    ----------
    dy : ndarray, shape (N, out, *L_out)
        dL/dy, same dtype as the forward.
    ctx : ConvDoRAContext
        From ``conv_dora_forward``.
    detach_norm : bool, default True
        True: n is a constant (paper Sec. 4.3, PEFT). False: the exact gradient.

    Returns
    -------
    functional.DoRAGrads
        ``dx`` (N, in, *L), ``dA`` (r, in, *k), ``dB`` (out, r/groups, 1, ...),
        ``dmagnitude`` in the shape the forward's magnitude had.

    Raises
    ------
    TypeError, ValueError
        If dy's dtype or shape does not match the forward's output.
    RuntimeError
        If ``lora_A``, ``lora_B`` or the magnitude changed in place since the
        forward (as ``functional.dora_backward``).

    Notes
    -----
    With groups > 1 the linear view's B is block-diagonal; the gradient of
    the grouped ``lora_B`` is the diagonal blocks of the dense gradient
    (the parameters are exactly those entries).
    """
    if ctx.seen is not None:  # the PEFT-shaped arrays (with groups > 1 the view's B is a copy)
        ctx.seen.check_backward()
    lin = ctx.linear
    g = F.dora_backward(_check_dy(dy, ctx, lin.W0.shape[0]), lin, detach_norm=detach_norm)
    dx = col2im(g.dx, ctx.x_shape, ctx.geom)
    dA, dB = _grouped_grads(ctx, g.dA, g.dB)
    return F.DoRAGrads(dx, dA, dB, g.dmagnitude.reshape(ctx.magnitude_shape))


def conv_lora_forward(
    x, weight, lora_A, lora_B, scaling, bias=None, *,
    stride=1, padding=0, dilation=1, groups=1, dropout_mask=None,
):
    """LoRA convolution forward: y = conv(x, W0) + s * lora_B(lora_A(xd)) + bias.

    ``functional.lora_forward`` on the patch matrix (PEFT ``_ConvNd.forward``,
    vanilla LoRA). Arguments and shapes as ``conv_dora_forward`` without the
    magnitude.

    Returns
    -------
    y : ndarray, shape (N, out, *L_out)
    ctx : ConvDoRAContext
    """
    weight, lora_A, lora_B, _ = _check_conv_adapter(weight, lora_A, lora_B, groups)
    geom = ConvGeometry.make(weight.shape[2:], stride, padding, dilation, groups)
    x = _check_x(x, lora_A.shape[1], geom.ndim, weight.dtype)
    mask = _patch_mask(dropout_mask, x)
    P, out_spatial = im2col(x, geom)
    P_mask = None if mask is None else im2col(mask, geom)[0]
    y_rows, lin = F.lora_forward(P, *_flat(weight, lora_A, lora_B, groups), scaling, bias,
                                 dropout_mask=P_mask)
    ctx = ConvDoRAContext(lin, x.shape, geom, lora_A.shape, lora_B.shape, None,
                          WeightSnapshot({"lora_A": lora_A, "lora_B": lora_B}))
    return _rows_to_channels_first(y_rows, x.shape[0], out_spatial), ctx


def conv_lora_backward(dy, ctx):
    """Gradients of a LoRA convolution: ``functional.LoRAGrads`` with dx (N, in, *L),
    dA (r, in, *k), dB (out, r/groups, 1, ...).

    Raises ``RuntimeError`` if ``lora_A`` or ``lora_B`` changed in place since
    the forward, ``TypeError``/``ValueError`` on a bad dy."""
    if ctx.seen is not None:
        ctx.seen.check_backward()
    lin = ctx.linear
    g = F.lora_backward(_check_dy(dy, ctx, lin.W0.shape[0]), lin)
    dA, dB = _grouped_grads(ctx, g.dA, g.dB)
    return F.LoRAGrads(col2im(g.dx, ctx.x_shape, ctx.geom), dA, dB)


# ---------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------


def conv_merge(weight, lora_A, lora_B, magnitude, scaling, groups=1, *, allow_zero_norm=False):
    """Fold a DoRA adapter into the kernel: W' = (m / n) * (W0 + s * delta), per channel.

    ``functional.merge`` of the linear view. The bias is unchanged.

    Parameters
    ----------
    weight : ndarray, shape (out, in/groups, *k)
    lora_A : ndarray, shape (r, in, *k)
    lora_B : ndarray, shape (out, r/groups, 1, ...)
    magnitude : ndarray, shape (1, out, 1, ...) or (out,)
    scaling : float
    groups : int, default 1
    allow_zero_norm : bool, default False

    Returns
    -------
    W_merged : ndarray
        Shape (out, in, *k). With groups = 1 that is the base kernel's shape.
        With groups > 1 it is the dense kernel of a **groups = 1**
        convolution: the low-rank delta reads all input channels, so the
        adapted layer is no longer grouped (PEFT raises ``NotImplementedError``).
    n : ndarray, shape (out,)
        The channel norms at merge time; ``conv_unmerge`` needs them.

    Raises
    ------
    ValueError
        On bad shapes, NaN/Inf, or a zero channel norm.

    Notes
    -----
    groups = 1 matches PEFT ``_DoraConvNdVariant.merge_safe``.
    """
    weight, lora_A, lora_B, m = _check_conv_adapter(weight, lora_A, lora_B, groups, magnitude)
    if m is None:
        raise TypeError("magnitude must be an array, got None")
    W_merged, n = F.merge(
        *_flat(weight, lora_A, lora_B, groups), m, scaling, allow_zero_norm=allow_zero_norm
    )
    return W_merged.reshape(weight.shape[0], *lora_A.shape[1:]), n


def conv_unmerge(W_merged, lora_A, lora_B, magnitude, scaling, n, groups=1):
    """Recover the base kernel: W0 = W' / (m / n) - s * delta (``functional.unmerge``).

    Parameters
    ----------
    W_merged : ndarray, shape (out, in, *k)
        From ``conv_merge`` (dense when groups > 1).
    lora_A, lora_B, magnitude, scaling, groups
        As given to ``conv_merge``.
    n : ndarray, shape (out,)
        The norms ``conv_merge`` returned.

    Returns
    -------
    weight : ndarray, shape (out, in/groups, *k)
        With groups > 1, the diagonal blocks of the recovered dense kernel
        (its other entries are zero up to rounding).

    Raises
    ------
    ValueError
        On bad shapes, or a channel that the merge scaled to zero.
    """
    W_merged = as_float_array("W_merged", W_merged, ndim=(3, 4, 5))
    lora_A = as_float_array("lora_A", lora_A, ndim=W_merged.ndim)
    if W_merged.shape[1:] != lora_A.shape[1:]:
        raise ValueError(
            f"W_merged must have shape (out, in, *k) with (in, *k) = {lora_A.shape[1:]} "
            f"(lora_A's), got {W_merged.shape}"
        )
    out = W_merged.shape[0]
    grouped_shape = (out, lora_A.shape[1] // groups, *lora_A.shape[2:])
    _, lora_A, lora_B, m = _check_conv_adapter(
        np.empty(grouped_shape, W_merged.dtype), lora_A, lora_B, groups, magnitude
    )
    r = lora_A.shape[0]
    W0 = F.unmerge(
        W_merged.reshape(out, -1), lora_A.reshape(r, -1), lora_B_dense(lora_B, groups), m, scaling, n
    )
    return dense_to_grouped(W0.reshape(W_merged.shape), groups)


# ---------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------


def initial_conv_lora_weights(in_channels, out_channels, kernel_size, r, groups, rng, dtype,
                              init=True):
    """PEFT's initial ``lora_A`` (r, in, *k) and ``lora_B`` (out, r/groups, 1, ...).

    ``lora_A`` gets ``nn.ConvNd``'s init, U(+-1/sqrt(fan_in)) with
    fan_in = in * prod(k) (``kaiming_uniform_(a=sqrt(5))``), or N(0, 1/r) with
    ``init="gaussian"``; ``lora_B`` is 0, or with ``init=False`` keeps
    ``nn.ConvNd``'s init U(+-1/sqrt(r/groups)). As
    ``layers.initial_lora_weights`` for the flattened kernel (PEFT
    ``LoraLayer.reset_lora_parameters``).
    """
    d = len(kernel_size)
    fan_in = in_channels * math.prod(kernel_size)
    A, B = initial_lora_weights(fan_in, out_channels, r, rng, dtype, init)
    B = B[:, : r // groups]
    if init is False:
        bound = 1.0 / math.sqrt(r // groups)
        B = rng.uniform(-bound, bound, size=B.shape).astype(dtype)
    return A.reshape(r, in_channels, *kernel_size), B.reshape(out_channels, r // groups, *(1,) * d)


class _LoRAConvNd(AdapterLayer):
    """A frozen convolution with a trainable low-rank update (LoRA); see ``LoRAConv2d``."""

    _ndim = None  # 1, 2 or 3, set by the subclasses
    _param_names = ("lora_A", "lora_B")

    def __init__(
        self,
        weight,
        bias=None,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        r=8,
        lora_alpha=8,
        use_rslora=False,
        lora_dropout=0.0,
        init_lora_weights=True,
        rng=None,
    ):
        d = self._ndim
        weight = as_float_array("weight", weight, ndim=d + 2)
        check_weight_shape("weight", weight.shape, ("output channel", "input channel"))
        self.geometry = ConvGeometry.make(weight.shape[2:], stride, padding, dilation, groups)
        _check_groups(weight.shape[0], weight.shape[1] * groups, groups)
        if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1 or r % groups:
            raise ValueError(
                f"r must be a positive multiple of groups = {groups} (PEFT's rule), got {r!r}"
            )
        self.r, self.lora_alpha, self.use_rslora = int(r), lora_alpha, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        if not (isinstance(lora_dropout, (int, float)) and 0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.lora_dropout = float(lora_dropout)
        self.rng = np.random.default_rng(rng)
        self.in_channels = weight.shape[1] * groups
        self.out_channels = weight.shape[0]
        self._lora_A, self._lora_B = initial_conv_lora_weights(
            self.in_channels, self.out_channels, self.kernel_size, self.r, groups,
            self.rng, weight.dtype, init_lora_weights,
        )
        self.training = True
        self.merged = False
        self._ctx = None
        self._set_base(weight, bias)
        self.zero_grad()

    # -- geometry and base weights --------------------------------------------

    kernel_size = property(lambda self: self.geometry.kernel_size)
    stride = property(lambda self: self.geometry.stride)
    dilation = property(lambda self: self.geometry.dilation)
    groups = property(lambda self: self.geometry.groups)

    @property
    def padding(self):
        """Per-dimension (left, right) zero padding."""
        return self.geometry.padding

    def _set_base(self, weight, bias, owned=False):
        """Install the frozen kernel and bias as the layer's own read-only arrays
        (``_layer_base.frozen``).

        Unmerged: (out, in/groups, *k); merged with groups > 1: the dense
        (out, in, *k) kernel. ``owned``: the arrays are fresh results of ours.
        """
        weight = as_float_array("weight", weight, ndim=self._ndim + 2)
        cols = self.in_channels if (self.merged and self.groups > 1) else self.in_channels // self.groups
        want = (self.out_channels, cols, *self.kernel_size)
        if weight.shape != want:
            raise ValueError(f"weight must have shape {want}, got {weight.shape}")
        if weight.dtype != self.lora_A.dtype:
            raise TypeError(f"weight has dtype {weight.dtype}, the adapter {self.lora_A.dtype}")
        if bias is not None:
            bias = _check_bias(bias, weight)
            if bias.dtype != weight.dtype:
                raise TypeError(f"bias has dtype {bias.dtype}, the weight {weight.dtype}")
            bias = frozen(bias, owned)
        self._weight, self._bias = frozen(weight, owned), bias

    @property
    def weight(self):
        """The frozen base kernel, read-only (dense (out, in, *k) while merged with groups > 1).

        The layer's own copy: writing to the array given at construction or to
        ``set_base_weight`` does not change it (an array that was already
        read-only and C-contiguous is kept as is, trusted not to change).
        """
        return self._weight

    lora_A = adapter_parameter("lora_A", "``lora_A`` (r, in, *k), trainable; assigning copies in place.")
    lora_B = adapter_parameter(
        "lora_B", "``lora_B`` (out, r/groups, 1, ...), trainable; assigning copies in place."
    )

    @property
    def bias(self):
        """The frozen base bias (out,) or None, read-only."""
        return self._bias

    def set_base_weight(self, weight, bias="keep"):
        """Replace the frozen base kernel (out, in/groups, *k) and optionally the bias.

        The layer keeps its own read-only copy (see ``weight``). The trainable
        arrays are the same objects afterwards, so an optimiser built on
        ``parameters()`` keeps training them.

        Raises ``RuntimeError`` if the layer is merged.
        """
        if self.merged:
            raise RuntimeError("unmerge() before replacing the base weight")
        self._set_base(weight, self._bias if isinstance(bias, str) and bias == "keep" else bias)

    def _conv_args(self):
        g = self.geometry
        pad = tuple(p for p, _ in g.padding)
        if any(p != q for p, q in g.padding):  # asymmetric: only "same" produces it
            pad = "same"
        return dict(stride=g.stride, padding=pad, dilation=g.dilation, groups=g.groups)

    # -- parameters and modes --------------------------------------------------

    # -- forward / backward ----------------------------------------------------

    def _merged_forward(self, x):
        self._ctx = None
        self._check_merged_adapter("forward")
        args = self._conv_args()
        if self.groups > 1:  # the merged kernel is dense (see conv_merge)
            args["groups"] = 1
        y = conv_nd(x, self._weight, self._bias, **args)
        check_result_finite([("y (the output)", y)], [("x", x)])
        return y

    def forward(self, x, *, dropout_mask=None):
        """Forward pass, x (N, in, *L) -> y (N, out, *L_out).

        ``dropout_mask`` (shape of x) replaces the drawn mask; training only
        (in eval mode it raises ``ValueError``: PEFT applies no dropout there).
        """
        mask = self._mask_for(x, dropout_mask)
        if self.merged:
            return self._merged_forward(x)
        y, self._ctx = conv_lora_forward(
            x, self._weight, self.lora_A, self.lora_B, self.scaling, self._bias,
            dropout_mask=mask, **self._conv_args(),
        )
        return y

    __call__ = forward

    def backward(self, dy):
        """Backward pass: accumulates ``grads`` (+=) and returns dx (N, in, *L)."""
        self._require_ctx()
        g = conv_lora_backward(dy, self._ctx)
        self.grads["lora_A"] += g.dA
        self.grads["lora_B"] += g.dB
        return g.dx

    # -- merge -------------------------------------------------------------------

    def merge(self):
        """Fold the adapter in: W' = W0 + s * delta (PEFT ``_ConvNd.merge``).

        With groups > 1 the merged kernel is dense (out, in, *k), see ``conv_merge``.
        """
        if self.merged:
            raise RuntimeError("the layer is already merged")
        with np.errstate(over="ignore", invalid="ignore"):  # refused right below, with its rows
            delta = conv_delta_weight(self.lora_A, self.lora_B, self.scaling, self.groups)
            W = grouped_to_dense(self._weight, self.groups) + delta
        check_rows_finite("the merged kernel W0 + s * delta", W)  # nothing changed yet
        self.merged = True
        self._set_base(W, self._bias, owned=True)
        self._lock_adapter()

    def unmerge(self):
        """Restore W0 = W' - s * delta.

        Raises ``RuntimeError`` if not merged, or if the adapter changed in
        place since ``merge()`` (see ``dora_ref.LoRALinear.unmerge``).
        """
        if not self.merged:
            raise RuntimeError("the layer is not merged")
        self._check_merged_adapter("unmerge()")
        delta = conv_delta_weight(self.lora_A, self.lora_B, self.scaling, self.groups)
        W0 = dense_to_grouped(self._weight - delta, self.groups)
        self.merged = False
        self._set_base(W0, self._bias, owned=True)
        self._unlock_adapter()

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, r={self.r}, "
            f"scaling={self.scaling:g}, dtype={self._weight.dtype}, merged={self.merged})"
        )


class _DoRAConvNd(_LoRAConvNd):
    """A frozen convolution adapted with DoRA; see ``DoRAConv2d``."""

    _param_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    lora_magnitude_vector = adapter_parameter(
        "lora_magnitude_vector",
        "The magnitude (1, out, 1, ...), trainable; assigning copies in place (a flat (out,) too).",
        alt_shapes=lambda layer: ((layer.out_channels,),),
    )

    def __init__(self, weight, bias=None, *, detach_norm=True, allow_zero_norm=False, **kwargs):
        self.detach_norm = detach_norm
        self.allow_zero_norm = allow_zero_norm
        self.weight_norm = None
        self._lora_magnitude_vector = None
        self._norm_cache = EvalNormCache()
        super().__init__(weight, bias, **kwargs)

    def _set_base(self, weight, bias, owned=False, keep_magnitude=False):
        super()._set_base(weight, bias, owned)
        self._norm_cache.clear()
        if not (self.merged or keep_magnitude):  # a new base: re-initialise m (PEFT init order)
            m = conv_init_magnitude(self._weight, self.lora_A, self.lora_B, self.scaling,
                                    self.groups)
            if self._lora_magnitude_vector is None:
                self._lora_magnitude_vector = m
            else:  # in place: an optimiser built on parameters() holds these arrays
                self._lora_magnitude_vector[...] = m
                self.grads["lora_magnitude_vector"][...] = 0

    def forward(self, x, *, dropout_mask=None):
        """Forward pass, x (N, in, *L) -> y (N, out, *L_out); see ``conv_dora_forward``.

        ``dropout_mask`` as ``LoRAConv2d.forward`` (training only).
        """
        mask = self._mask_for(x, dropout_mask)
        if self.merged:
            return self._merged_forward(x)
        norm = None
        if self.training:
            self._norm_cache.clear()
        else:  # the norm of unchanged weights is reused (see EvalNormCache)
            norm = self._norm_cache.get(
                self._weight, self.lora_A, self.lora_B, self.scaling,
                lambda: conv_column_norm(self._weight, self.lora_A, self.lora_B, self.scaling,
                                         self.groups),
            )
        y, self._ctx = conv_dora_forward(
            x, self._weight, self.lora_A, self.lora_B, self.lora_magnitude_vector,
            self.scaling, self._bias, dropout_mask=mask, weight_norm=norm,
            allow_zero_norm=self.allow_zero_norm, **self._conv_args(),
        )
        return y

    __call__ = forward

    def backward(self, dy):
        """Backward pass: accumulates ``grads`` (+=) and returns dx (N, in, *L)."""
        self._require_ctx()
        g = conv_dora_backward(dy, self._ctx, detach_norm=self.detach_norm)
        self.grads["lora_A"] += g.dA
        self.grads["lora_B"] += g.dB
        self.grads["lora_magnitude_vector"] += g.dmagnitude
        return g.dx

    def merge(self):
        """W' = (m / n) * (W0 + s * delta) per output channel; n kept in ``weight_norm``.

        With groups > 1 the merged kernel is the dense (out, in, *k) kernel of
        a groups = 1 convolution (PEFT raises instead), see ``conv_merge``.
        """
        if self.merged:
            raise RuntimeError("the layer is already merged")
        W, n = conv_merge(
            self._weight, self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling,
            self.groups, allow_zero_norm=self.allow_zero_norm,
        )
        refuse_unrecoverable_merge(self.lora_magnitude_vector, n, "conv_merge")
        self.merged = True
        self._set_base(W, self._bias, owned=True)
        self.weight_norm = n
        self._lock_adapter()

    def unmerge(self):
        """Restore W0 = W' / (m / n) - s * delta, with n kept at merge time.

        Raises ``RuntimeError`` if not merged, or if the adapter changed in
        place since ``merge()`` (see ``dora_ref.LoRALinear.unmerge``).
        """
        if not self.merged:
            raise RuntimeError("the layer is not merged")
        self._check_merged_adapter("unmerge()")
        W0 = conv_unmerge(
            self._weight, self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling,
            self.weight_norm, self.groups,
        )
        self.merged = False
        self._set_base(W0, self._bias, owned=True, keep_magnitude=True)  # keeps the trained m
        self.weight_norm = None
        self._unlock_adapter()


_LAYER_DOC = """{kind} for ``torch.nn.Conv{d}d``: a frozen kernel plus {what}.

Attributes carry PEFT's names and shapes, so numbers and checkpoints compare
directly: ``weight`` (out, in/groups{k}) and ``bias`` (out,) are the frozen
``base_layer``'s (read-only); ``lora_A`` (r, in{k}) is the conv in -> r;
``lora_B`` (out, r/groups{ones}) the grouped 1x..x1 conv r -> out.{mag_row}

Parameters
----------
weight : ndarray, shape (out, in/groups{k}), float32 or float64
    The frozen kernel. The layer keeps its own read-only, C-contiguous copy;
    an array that is already read-only and C-contiguous is kept without a
    copy, trusted not to change.
bias : ndarray, shape (out,), optional
    Kept the same way.
stride, padding, dilation, groups
    As ``torch.nn.Conv{d}d`` (zero padding; ``padding`` may be "valid" or
    "same"). ``lora_A`` uses the same stride, padding and dilation (PEFT
    leaves out the dilation, see ``dora_ref.conv``).
r : int, default 8
    Rank; a multiple of groups (PEFT's rule).
lora_alpha : float, default 8
use_rslora : bool, default False
lora_dropout : float in [0, 1), default 0
init_lora_weights : {{True, False, "gaussian"}}, default True
rng : numpy.random.Generator or int, optional{extra}

Methods
-------
forward(x, dropout_mask=None) / __call__ : (N, in{L}) -> (N, out{Lout});
    a given ``dropout_mask`` (shape of x) in eval mode raises ``ValueError``
backward(dy) : accumulates ``grads`` (+=), returns dx (N, in{L})
parameters(), zero_grad(), train(), eval(), merge(), unmerge(), set_base_weight()

Assigning ``lora_A``, ``lora_B`` (or ``lora_magnitude_vector``) copies into
the layer's array in place, so an optimiser built on ``parameters()`` keeps
training it; the value must be a float array of the weight's dtype and shape.

Raises
------
TypeError, ValueError
    On bad dtypes, shapes, r, groups, dropout or geometry.
"""

_DORA_EXTRA = """
detach_norm : bool, default True
    True: the norm is a constant in backward (paper Sec. 4.3, PEFT).
    False: the exact gradient (paper Eqs. 6-7).
allow_zero_norm : bool, default False
    See ``dora_ref.core.functional.dora_forward``.

Attributes
----------
lora_magnitude_vector : ndarray, shape (1, out{ones})
    PEFT's shape; initialised to the per-channel norm of W0 + s * delta.
weight_norm : ndarray, shape (out,) or None
    The channel norms kept by ``merge()`` for ``unmerge()``."""


def _doc(kind, d, dora):
    k = ", " + ", ".join(f"k{i}" for i in range(1, d + 1))
    L = ", " + ", ".join(f"L{i}" for i in range(1, d + 1))
    ones = ", 1" * d
    return _LAYER_DOC.format(
        kind=kind, d=d, k=k, L=L, Lout=L.replace("L", "L_out"), ones=ones,
        what="a DoRA update (paper Eq. 5): y = g * (conv(x, W0) + s * lora_B(lora_A(x))) + bias, "
        "g = m / n per output channel" if dora else "a low-rank update: "
        "y = conv(x, W0) + s * lora_B(lora_A(x)) + bias",
        mag_row=(f" ``lora_magnitude_vector`` is (1, out{ones}), one value per output\nchannel."
                 if dora else ""),
        extra=_DORA_EXTRA.format(ones=ones) if dora else "",
    )


class LoRAConv1d(_LoRAConvNd):
    __doc__ = _doc("LoRA", 1, False)
    _ndim = 1


class LoRAConv2d(_LoRAConvNd):
    __doc__ = _doc("LoRA", 2, False)
    _ndim = 2


class LoRAConv3d(_LoRAConvNd):
    __doc__ = _doc("LoRA", 3, False)
    _ndim = 3


class DoRAConv1d(_DoRAConvNd):
    __doc__ = _doc("DoRA", 1, True)
    _ndim = 1


class DoRAConv2d(_DoRAConvNd):
    __doc__ = _doc("DoRA", 2, True)
    _ndim = 2


class DoRAConv3d(_DoRAConvNd):
    __doc__ = _doc("DoRA", 3, True)
    _ndim = 3
