"""The convolution as a matrix of patches: the geometry DoRA for ``nn.ConvNd`` needs.

``ConvGeometry`` checks and holds stride, padding, dilation and groups as
``torch.nn.ConvNd`` takes them; ``im2col`` cuts the input into one row per
output position and ``col2im`` scatter-adds patch rows back (the backward);
``conv_nd`` is the plain convolution built on them. A grouped kernel is also
written as the dense kernel of the same linear map (``grouped_to_dense``),
the form ``dora_ref.core.conv`` normalises; its docstring gives the shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._validate import as_float_array, check_scaling, check_weight_shape, dtype_mismatch
from .precision import classify


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
    x = as_float_array(name, x, low_precision=True, want=dtype)
    if x.ndim != d + 2 or x.shape[1] != in_channels:
        raise ValueError(
            f"{name} must have shape (N, in, {', '.join('L' + str(i) for i in range(1, d + 1))}) "
            f"with in = {in_channels}, got {x.shape}"
        )
    if x.dtype != dtype:
        raise dtype_mismatch(name, x.dtype, dtype)
    return x


def _check_bias(bias, weight, low_precision=False):
    bias = as_float_array("bias", bias, ndim=1, low_precision=low_precision)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape (out,) = ({weight.shape[0]},), got {bias.shape}")
    return bias


def _check_conv_adapter(weight, lora_A, lora_B, groups, magnitude=None):
    """Check PEFT-shaped conv adapter arrays; return them and the flat magnitude (out,).

    float16/bfloat16 weights are accepted with the adapter dtypes of
    ``dora_ref.core.precision.classify`` (float32, or the weight's dtype).
    """
    weight = as_float_array("weight", weight, ndim=(3, 4, 5), low_precision=True)
    d = weight.ndim - 2
    lora_A = as_float_array("lora_A", lora_A, ndim=d + 2, low_precision=True)
    lora_B = as_float_array("lora_B", lora_B, ndim=d + 2, low_precision=True)
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
        magnitude = as_float_array("magnitude", magnitude, low_precision=True)
        if magnitude.shape not in ((out,), (1, out) + (1,) * d):
            raise ValueError(
                f"magnitude must have shape (out,) = ({out},) or PEFT's (1, out, 1, ...) = "
                f"{(1, out) + (1,) * d}; got {magnitude.shape}"
            )
        m = magnitude.reshape(out)
    classify(weight, lora_A, lora_B, magnitude,
             names=("weight", "lora_A", "lora_B", "magnitude", "bias"))
    return weight, lora_A, lora_B, m


def _flat(weight, lora_A, lora_B, groups):
    """The linear-layer view: W0 (out, in*K), A (r, in*K), B (out, r).

    With groups = 1 these are views; with groups > 1 W0 and B are the dense
    block-diagonal matrices (see ``grouped_to_dense``).
    """
    out, r = weight.shape[0], lora_A.shape[0]
    W0 = grouped_to_dense(weight, groups).reshape(out, -1)
    return W0, lora_A.reshape(r, -1), lora_B_dense(lora_B, groups)
