"""The Conv1d / Conv2d / Conv3d adapter layers: PEFT's LoRA and DoRA ``ConvNd``.

Each keeps the base kernel (out, in/groups, *k), ``lora_A`` (r, in, *k),
``lora_B`` (out, r/groups, 1, ...) and, for DoRA, the magnitude
(1, out, 1, ...); the math is ``dora_ref.core.conv``, the DoRA of a linear
layer on im2col patches.
"""
from __future__ import annotations

import math

import numpy as np

from ..core._validate import (as_float_array, check_flag, check_result_finite, check_rows_finite,
                               check_weight_shape)
from ..core.conv import (
    conv_column_norm,
    conv_dora_backward,
    conv_dora_forward,
    conv_init_magnitude,
    conv_lora_backward,
    conv_lora_forward,
    conv_merge,
    conv_unmerge,
)
from ..core.im2col import (
    ConvGeometry,
    _check_bias,
    _check_groups,
    _check_x,
    conv_delta_weight,
    conv_nd,
    dense_to_grouped,
    grouped_to_dense,
)
from ..core.precision import LOW_PRECISION_DTYPES, check_policy, classify, round_to, upcast
from .base import (AdapterLayer, EvalNormCache, adapter_parameter, check_autocast,
                   check_bias_argument, check_keywords, check_lora_dropout, consistent_forward, frozen,
                   initial_adapter_dtype, with_parent_keywords)
from .linear import initial_lora_weights, lora_scaling


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
        policy="consistent",
        autocast_adapter_dtype=True,
    ):
        check_bias_argument(self, bias)
        d = self._ndim
        self.policy = check_policy(policy)
        self.autocast_adapter_dtype = check_autocast(autocast_adapter_dtype)
        weight = as_float_array("weight", weight, ndim=d + 2, low_precision=True)
        low_precision = weight.dtype in LOW_PRECISION_DTYPES
        if low_precision and policy == "peft" and "lora_magnitude_vector" not in self._param_names:
            raise ValueError("policy='peft' is defined for DoRA layers; a float16/bfloat16 "
                             "LoRA convolution uses policy='consistent'")
        check_weight_shape("weight", weight.shape, ("output channel", "input channel"))
        self.geometry = ConvGeometry.make(weight.shape[2:], stride, padding, dilation, groups)
        _check_groups(weight.shape[0], weight.shape[1] * groups, groups)
        if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 1 or r % groups:
            raise ValueError(
                f"r must be a positive multiple of groups = {groups} (PEFT's rule), got {r!r}"
            )
        self.r, self.lora_alpha = int(r), lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)  # checks use_rslora
        self.use_rslora = bool(use_rslora)
        self.lora_dropout = check_lora_dropout(lora_dropout)
        self.rng = np.random.default_rng(rng)
        self.in_channels = weight.shape[1] * groups
        self.out_channels = weight.shape[0]
        A, B = initial_conv_lora_weights(
            self.in_channels, self.out_channels, self.kernel_size, self.r, groups,
            self.rng, np.float32 if low_precision else weight.dtype, init_lora_weights,
        )
        self._lora_A, self._lora_B = initial_adapter_dtype((A, B), weight.dtype, policy,
                                                           self.autocast_adapter_dtype)
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

    def _replace_base(self, weight):
        self._set_base(weight, self._bias, owned=True)

    def _set_base(self, weight, bias, owned=False):
        """Install the frozen kernel and bias as the layer's own read-only arrays
        (``layers.base.frozen``).

        Unmerged: (out, in/groups, *k); merged with groups > 1: the dense
        (out, in, *k) kernel. ``owned``: the arrays are fresh results of ours.
        """
        weight = as_float_array("weight", weight, ndim=self._ndim + 2, low_precision=True)
        cols = self.in_channels if (self.merged and self.groups > 1) else self.in_channels // self.groups
        want = (self.out_channels, cols, *self.kernel_size)
        if weight.shape != want:
            raise ValueError(f"weight must have shape {want}, got {weight.shape}")
        self._low_precision = weight.dtype in LOW_PRECISION_DTYPES
        if self._low_precision:
            classify(weight, self.lora_A, self.lora_B,
                     names=("weight", "lora_A", "lora_B", "magnitude", "bias"))
        elif weight.dtype != self.lora_A.dtype:
            raise TypeError(f"weight has dtype {weight.dtype}, the adapter {self.lora_A.dtype}")
        if bias is not None:
            bias = _check_bias(bias, weight, self._low_precision)
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
        self._changing_base(lambda: self._set_base(
            weight, self._bias if isinstance(bias, str) and bias == "keep" else bias))

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
        if self._low_precision:  # the float32 convolution, rounded once
            x = _check_x(x, self.in_channels, self._ndim, self._weight.dtype)
            y = round_to(conv_nd(upcast(x), upcast(self._weight), upcast(self._bias), **args),
                         self._weight.dtype)
        else:
            y = conv_nd(x, self._weight, self._bias, **args)
        check_result_finite([("y (the output)", y)], [("x", x)])
        return y

    @consistent_forward
    def forward(self, x, *, dropout_mask=None):
        """Forward pass, x (N, in, *L) -> y (N, out, *L_out).

        ``dropout_mask`` (shape of x) replaces the drawn mask; training only
        (in eval mode it raises ``ValueError``: PEFT applies no dropout there).
        """
        self._ctx = None  # a forward that raises leaves no context: backward() then refuses
        mask = self._mask_for(x, dropout_mask)
        if self.merged:
            return self._merged_forward(x)
        y, self._ctx = conv_lora_forward(
            x, self._weight, self.lora_A, self.lora_B, self.scaling, self._bias,
            dropout_mask=mask, policy=self.policy, **self._conv_args(),
        )
        return y

    __call__ = forward

    def backward(self, dy):
        """Backward pass: accumulates ``grads`` (+=) and returns dx (N, in, *L)."""
        self._require_ctx()
        g = conv_lora_backward(dy, self._ctx)
        self._add_to_grads({"lora_A": g.dA, "lora_B": g.dB})
        return g.dx

    # -- merge -------------------------------------------------------------------

    def merge(self):
        """Fold the adapter in: W' = W0 + s * delta (PEFT ``_ConvNd.merge``).

        With groups > 1 the merged kernel is dense (out, in, *k), see ``conv_merge``.
        """
        if self.merged:
            raise RuntimeError("the layer is already merged")
        with np.errstate(over="ignore", invalid="ignore"):  # refused right below, with its rows
            delta = conv_delta_weight(upcast(self.lora_A), upcast(self.lora_B), self.scaling,
                                      self.groups)
            W = grouped_to_dense(upcast(self._weight), self.groups) + delta
            W = round_to(W, self._weight.dtype)  # float16/bfloat16: rounded once
        check_rows_finite("the merged kernel W0 + s * delta", W)  # nothing changed yet
        self._install_merged(W)

    def unmerge(self):
        """Restore W0 = W' - s * delta.

        Raises ``RuntimeError`` if not merged, or if the adapter changed in
        place since ``merge()`` (see ``dora_ref.LoRALinear.unmerge``).
        """
        if not self.merged:
            raise RuntimeError("the layer is not merged")
        self._check_merged_adapter("unmerge()")
        delta = conv_delta_weight(upcast(self.lora_A), upcast(self.lora_B), self.scaling,
                                  self.groups)
        with np.errstate(over="ignore"):
            W0 = round_to(upcast(self._weight) - delta, self._weight.dtype)
        check_rows_finite("the unmerged kernel W' - s * delta", W0)
        self._install_unmerged(dense_to_grouped(W0, self.groups))

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
        self.detach_norm = check_flag("detach_norm", detach_norm)
        self.allow_zero_norm = check_flag("allow_zero_norm", allow_zero_norm)
        self.weight_norm = None
        self._lora_magnitude_vector = None
        self._norm_cache = EvalNormCache()
        check_keywords(self, _DoRAConvNd, kwargs)
        super().__init__(weight, bias, **kwargs)

    def _replace_base(self, weight):
        self._set_base(weight, self._bias, owned=True, keep_magnitude=True)

    def _set_base(self, weight, bias, owned=False, keep_magnitude=False):
        super()._set_base(weight, bias, owned)
        self._norm_cache.clear()
        if not (self.merged or keep_magnitude):  # a new base: re-initialise m (PEFT init order)
            m = conv_init_magnitude(self._weight, self.lora_A, self.lora_B, self.scaling,
                                    self.groups, policy=self.policy)
            if self._lora_magnitude_vector is None:
                self._lora_magnitude_vector = m
            else:  # in place: an optimiser built on parameters() holds these arrays
                self._lora_magnitude_vector[...] = m
                self.grads["lora_magnitude_vector"][...] = 0

    @consistent_forward
    def forward(self, x, *, dropout_mask=None):
        """Forward pass, x (N, in, *L) -> y (N, out, *L_out); see ``conv_dora_forward``.

        ``dropout_mask`` as ``LoRAConv2d.forward`` (training only).
        """
        self._ctx = None  # a forward that raises leaves no context: backward() then refuses
        mask = self._mask_for(x, dropout_mask)
        if self.merged:
            return self._merged_forward(x)
        norm = None
        if self.training:
            self._norm_cache.clear()
        else:  # the norm of unchanged weights is reused (see EvalNormCache)
            norm = self._norm_cache.get(
                self._weight, self.lora_A, self.lora_B, self.scaling,
                lambda: round_to(conv_column_norm(self._weight, self.lora_A, self.lora_B,
                                                  self.scaling, self.groups, policy=self.policy),
                                 self.lora_magnitude_vector.dtype),  # lp: the forward's n
            )
        y, self._ctx = conv_dora_forward(
            x, self._weight, self.lora_A, self.lora_B, self.lora_magnitude_vector,
            self.scaling, self._bias, dropout_mask=mask, weight_norm=norm,
            allow_zero_norm=self.allow_zero_norm, policy=self.policy, **self._conv_args(),
        )
        return y

    __call__ = forward

    def backward(self, dy):
        """Backward pass: accumulates ``grads`` (+=) and returns dx (N, in, *L)."""
        self._require_ctx()
        g = conv_dora_backward(dy, self._ctx, detach_norm=self.detach_norm)
        self._add_to_grads({"lora_A": g.dA, "lora_B": g.dB, "lora_magnitude_vector": g.dmagnitude})
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
            self.groups, allow_zero_norm=self.allow_zero_norm, policy=self.policy,
        )
        self._install_merged(W, n, "conv_merge")

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
            self.weight_norm, self.groups, policy=self.policy,
        )
        self._install_unmerged(W0)


_LAYER_DOC = """{kind} for ``torch.nn.Conv{d}d``: a frozen kernel plus {what}.

Attributes carry PEFT's names and shapes, so numbers and checkpoints compare
directly: ``weight`` (out, in/groups{k}) and ``bias`` (out,) are the frozen
``base_layer``'s (read-only); ``lora_A`` (r, in{k}) is the conv in -> r;
``lora_B`` (out, r/groups{ones}) the grouped 1x..x1 conv r -> out.{mag_row}

Parameters
----------
weight : ndarray, shape (out, in/groups{k}), float32, float64, float16 or bfloat16
    The frozen kernel. The layer keeps its own read-only, C-contiguous copy;
    an array that is already read-only and C-contiguous is kept without a
    copy, trusted not to change.
bias : ndarray, shape (out,), optional
    Kept the same way.
stride, padding, dilation, groups
    As ``torch.nn.Conv{d}d`` (zero padding; ``padding`` may be "valid" or
    "same"). ``lora_A`` uses the same stride, padding and dilation (PEFT
    leaves out the dilation, see ``dora_ref.core.conv``).
r : int, default 8
    Rank; a multiple of groups (PEFT's rule).
lora_alpha : float, default 8
use_rslora : bool, default False
lora_dropout : float in [0, 1), default 0
init_lora_weights : {{True, False, "gaussian"}}, default True
rng : numpy.random.Generator or int, optional
policy : {{"consistent", "peft"}}, default "consistent"
autocast_adapter_dtype : bool, default True
    For a float16/bfloat16 kernel, as ``dora_ref.LoRALinear`` (the adapter
    float32 or in the kernel's dtype; "peft": PEFT's init rounding; LoRA
    layers accept "consistent" only).{extra}

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


with_parent_keywords(_DoRAConvNd.__init__, _LoRAConvNd.__init__)  # help(): r, lora_alpha, ... too


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
