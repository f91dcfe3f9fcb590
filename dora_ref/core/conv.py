r"""DoRA (and LoRA) for Conv1d / Conv2d / Conv3d: the linear core on patches.

A convolution is a linear layer applied to patches. ``im2col`` cuts the
(zero-padded) input into one row per output position, each row holding the
``in * k1 * ... * kd`` values the kernel sees; the kernel, flattened to
``(out, in * k1 * ... * kd)``, is then an ``nn.Linear`` weight. So DoRA for a
convolution is ``dora_ref.core.functional.dora_forward`` / ``dora_backward`` on
that patch matrix, and the norm is ``column_norm`` of the flattened kernel.
The patch bookkeeping is ``dora_ref.core.im2col``; this module holds no
second copy of the DoRA math.

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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import functional as F
from ._validate import WeightSnapshot, as_float_array, check_finite
from .im2col import (
    ConvGeometry,
    _channels_last_rows,
    _check_conv_adapter,
    _check_x,
    _flat,
    _rows_to_channels_first,
    col2im,
    dense_to_grouped,
    im2col,
    lora_B_dense,
)


# ---------------------------------------------------------------------------
# norm, magnitude, forward, backward
# ---------------------------------------------------------------------------


def _refuse_peft_groups(policy, weight, groups):
    """policy='peft' on lp weights reproduces PEFT's groups = 1 convolutions only.

    With groups > 1 PEFT mixes output channels in its norm and refuses to
    merge (see this module's docstring): there is no PEFT behaviour to match.
    """
    if policy == "peft" and groups != 1 and np.dtype(weight.dtype).itemsize == 2:
        raise ValueError(
            f"policy='peft' with groups={groups}: PEFT's grouped DoRA convolution mixes output "
            f"channels and cannot merge, so there is nothing to reproduce; use "
            f"policy='consistent'"
        )


def conv_column_norm(weight, lora_A, lora_B, scaling, groups=1, *, policy="consistent"):
    """Per-output-channel norm of the adapted kernel V = W0 + s * delta.

    Output channel o's norm is taken over everything that produces it,
    (in/groups, *k) for the base kernel: the row norm of the flattened
    kernel, ``functional.column_norm`` of the linear view.

    Parameters
    ----------
    weight : ndarray, shape (out, in/groups, *k), float32, float64, float16 or bfloat16
    lora_A : ndarray, shape (r, in, *k), weight's dtype, or float32 with an lp weight
    lora_B : ndarray, shape (out, r/groups, 1, ...), lora_A's dtype
    scaling : float
    groups : int, default 1
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 weight (see ``functional.dora_forward`` and
        ``dora_ref.core.precision``); ignored for float32/float64.

    Returns
    -------
    n : ndarray, shape (out,), as ``functional.column_norm``

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
    _refuse_peft_groups(policy, weight, groups)
    return F.column_norm(*_flat(weight, lora_A, lora_B, groups), scaling, policy=policy)


def conv_init_magnitude(weight, lora_A, lora_B, scaling, groups=1, *, policy="consistent"):
    """PEFT's magnitude init, in PEFT's shape: (1, out, 1, ...) = ``conv_column_norm``.

    Parameters
    ----------
    As ``conv_column_norm``.

    Returns
    -------
    magnitude : ndarray, shape (1, out, 1, ..., 1) (d ones after out), lora_A's dtype

    Notes
    -----
    Matches PEFT ``_DoraConvNdLayer.update_layer`` (the norm with keepdim,
    transposed to (1, out, 1, ...)); for lp weights, ``functional.init_magnitude``'s
    policies.
    """
    weight, lora_A, lora_B, _ = _check_conv_adapter(weight, lora_A, lora_B, groups)
    _refuse_peft_groups(policy, weight, groups)
    n = F.init_magnitude(*_flat(weight, lora_A, lora_B, groups), scaling, policy=policy)
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
    mask = as_float_array("dropout_mask", dropout_mask, low_precision=True)
    if mask.shape != x.shape or mask.dtype != x.dtype:
        raise ValueError(
            f"dropout_mask must have the shape and dtype of x {x.shape} {x.dtype}, "
            f"got {mask.shape} {mask.dtype}"
        )
    check_finite("dropout_mask", mask)  # else blamed on an overflow of finite inputs
    return mask


@contextmanager
def _in_conv_terms(out_spatial, x=None, dy=None):
    """Say a convolution's errors in the caller's terms.

    The DoRA math runs on the linear view (``functional`` on im2col's patch
    matrix), whose messages give that view's shapes and indices: x "(shape
    (72, 108)) ... at index (6, 53)" for an x of shape (3, 4, 5, 4, 6) with
    its Inf at (0, 1, 2, 3, 4) (found by session 18's adversary). Here a
    ``ValueError`` from inside is checked against the caller's own x and dy
    first (NaN/Inf named with their shapes and indices); any other that gives
    an index of the view keeps its message with a sentence saying how the
    view's rows map to samples and output positions.
    """
    try:
        yield
    except ValueError as e:
        if x is not None:
            check_finite("x", x)
        if dy is not None:
            check_finite("dy", dy)
        if e.args and isinstance(e.args[0], str) and "index (" in e.args[0]:  # a view's index
            per = math.prod(out_spatial)
            e.args = (f"{e.args[0]} (shapes and indices of the convolution computed as a linear "
                      f"layer on the patches of x: row i is sample i // {per} at output position "
                      f"i % {per} of {tuple(out_spatial)}, in C order)",) + e.args[1:]
        raise


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
    policy="consistent",
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
    x : ndarray, shape (N, in, *L), float32, float64, float16 or bfloat16
    weight : ndarray, shape (out, in/groups, *k), x's dtype
    lora_A : ndarray, shape (r, in, *k), x's dtype, or float32 with an lp x
    lora_B : ndarray, shape (out, r/groups, 1, ..., 1), lora_A's dtype
    magnitude : ndarray, shape (1, out, 1, ..., 1) (PEFT's) or (out,), lora_A's dtype
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
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 weight (see ``functional.dora_forward`` and
        ``dora_ref.core.precision``); ignored for float32/float64.

    Returns
    -------
    y : ndarray, shape (N, out, *L_out), x's dtype
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
    _refuse_peft_groups(policy, weight, groups)
    geom = ConvGeometry.make(weight.shape[2:], stride, padding, dilation, groups)
    x = _check_x(x, lora_A.shape[1], geom.ndim, weight.dtype)
    mask = _patch_mask(dropout_mask, x)
    P, out_spatial = im2col(x, geom)
    P_mask = None if mask is None else im2col(mask, geom)[0]
    W0, A, B = _flat(weight, lora_A, lora_B, groups)
    with _in_conv_terms(out_spatial, x=x):
        y_rows, lin = F.dora_forward(
            P, W0, A, B, m, scaling, bias,
            dropout_mask=P_mask, weight_norm=weight_norm, allow_zero_norm=allow_zero_norm,
            policy=policy,
        )
    seen = WeightSnapshot({"lora_A": lora_A, "lora_B": lora_B, "lora_magnitude_vector": m})
    ctx = ConvDoRAContext(lin, x.shape, geom, lora_A.shape, lora_B.shape, np.shape(magnitude),
                          seen)
    return _rows_to_channels_first(y_rows, x.shape[0], out_spatial), ctx


def _check_dy(dy, ctx, out, dtype=None):
    dy = as_float_array("dy", dy, low_precision=True, want=dtype)  # dtype: the weights
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
    dy_rows = _check_dy(dy, ctx, lin.W0.shape[0], lin.W0.dtype)
    with _in_conv_terms(ctx.geom.output_shape(ctx.x_shape[2:]), dy=dy):
        if lin.precision is not None:  # col2im's sums in float32, then one rounding
            g = F.dora_backward(dy_rows, lin, detach_norm=detach_norm,
                                _dx_adjoint=lambda dP: col2im(dP, ctx.x_shape, ctx.geom))
            dx = g.dx
        else:
            g = F.dora_backward(dy_rows, lin, detach_norm=detach_norm)
            dx = col2im(g.dx, ctx.x_shape, ctx.geom)
    dA, dB = _grouped_grads(ctx, g.dA, g.dB)
    return F.DoRAGrads(dx, dA, dB, g.dmagnitude.reshape(ctx.magnitude_shape))


def conv_lora_forward(
    x, weight, lora_A, lora_B, scaling, bias=None, *,
    stride=1, padding=0, dilation=1, groups=1, dropout_mask=None, policy="consistent",
):
    """LoRA convolution forward: y = conv(x, W0) + s * lora_B(lora_A(xd)) + bias.

    ``functional.lora_forward`` on the patch matrix (PEFT ``_ConvNd.forward``,
    vanilla LoRA). Arguments and shapes as ``conv_dora_forward`` without the
    magnitude (float16/bfloat16: "consistent" only, as ``functional.lora_forward``).

    Returns
    -------
    y : ndarray, shape (N, out, *L_out), x's dtype
    ctx : ConvDoRAContext
    """
    weight, lora_A, lora_B, _ = _check_conv_adapter(weight, lora_A, lora_B, groups)
    geom = ConvGeometry.make(weight.shape[2:], stride, padding, dilation, groups)
    x = _check_x(x, lora_A.shape[1], geom.ndim, weight.dtype)
    mask = _patch_mask(dropout_mask, x)
    P, out_spatial = im2col(x, geom)
    P_mask = None if mask is None else im2col(mask, geom)[0]
    with _in_conv_terms(out_spatial, x=x):
        y_rows, lin = F.lora_forward(P, *_flat(weight, lora_A, lora_B, groups), scaling, bias,
                                     dropout_mask=P_mask, policy=policy)
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
    dy_rows = _check_dy(dy, ctx, lin.W0.shape[0], lin.W0.dtype)
    with _in_conv_terms(ctx.geom.output_shape(ctx.x_shape[2:]), dy=dy):
        if lin.precision is not None:  # col2im's sums in float32, then one rounding
            g = F.lora_backward(dy_rows, lin,
                                _dx_adjoint=lambda dP: col2im(dP, ctx.x_shape, ctx.geom))
            dx = g.dx
        else:
            g = F.lora_backward(dy_rows, lin)
            dx = col2im(g.dx, ctx.x_shape, ctx.geom)
    dA, dB = _grouped_grads(ctx, g.dA, g.dB)
    return F.LoRAGrads(dx, dA, dB)


# ---------------------------------------------------------------------------
# merge / unmerge
# ---------------------------------------------------------------------------


def conv_merge(weight, lora_A, lora_B, magnitude, scaling, groups=1, *, allow_zero_norm=False,
               policy="consistent"):
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
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 weight, as ``functional.merge``.

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
    _refuse_peft_groups(policy, weight, groups)
    W_merged, n = F.merge(
        *_flat(weight, lora_A, lora_B, groups), m, scaling, allow_zero_norm=allow_zero_norm,
        policy=policy,
    )
    return W_merged.reshape(weight.shape[0], *lora_A.shape[1:]), n


def conv_unmerge(W_merged, lora_A, lora_B, magnitude, scaling, n, groups=1, *,
                 policy="consistent"):
    """Recover the base kernel: W0 = W' / (m / n) - s * delta (``functional.unmerge``).

    Parameters
    ----------
    W_merged : ndarray, shape (out, in, *k)
        From ``conv_merge`` (dense when groups > 1).
    lora_A, lora_B, magnitude, scaling, groups
        As given to ``conv_merge``.
    n : ndarray, shape (out,)
        The norms ``conv_merge`` returned.
    policy : {"consistent", "peft"}, default "consistent"
        For a float16/bfloat16 W_merged, as ``functional.unmerge``.

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
    W_merged = as_float_array("W_merged", W_merged, ndim=(3, 4, 5), low_precision=True)
    lora_A = as_float_array("lora_A", lora_A, ndim=W_merged.ndim, low_precision=True)
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
    _refuse_peft_groups(policy, W_merged, groups)
    r = lora_A.shape[0]
    W0 = F.unmerge(
        W_merged.reshape(out, -1), lora_A.reshape(r, -1), lora_B_dense(lora_B, groups), m, scaling, n,
        policy=policy,
    )
    return dense_to_grouped(W0.reshape(W_merged.shape), groups)
