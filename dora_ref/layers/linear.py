"""DoRA and LoRA linear layers: parameters, init, train/eval, merge/unmerge.

A layer wraps the functions of ``dora_ref.core.functional`` with state, named as
PEFT names it so that numbers and checkpoints compare directly:

==========================  ===========  =================================
attribute                   shape        PEFT name
==========================  ===========  =================================
``weight`` (frozen)         (out, in)    ``base_layer.weight``
``bias`` (frozen)           (out,)       ``base_layer.bias``
``lora_A``                  (r, in)      ``lora_A.<adapter>.weight``
``lora_B``                  (out, r)     ``lora_B.<adapter>.weight``
``lora_magnitude_vector``   (out,)       ``lora_magnitude_vector.<adapter>.weight``
==========================  ===========  =================================

The magnitude has one value per output channel: the paper's column norm is
the row norm of an (out, in) weight.

Use::

    layer = DoRALinear(W0, bias, r=8, lora_alpha=16, rng=np.random.default_rng(0))
    y = layer.forward(x)            # x: (..., in) -> y: (..., out)
    dx = layer.backward(dy)         # accumulates layer.grads[name] (+=)
    opt.step()                      # dora_ref.layers.optim over layer.parameters()
"""
from __future__ import annotations

import math

import numpy as np

from ..core import functional as F
from ..core import lowp as _lowp
from ..core.precision import LOW_PRECISION_DTYPES, check_policy, classify, round_to
from .base import (
    adapter_dtype,
    consistent_forward,
    check_autocast,
    check_bias_argument,
    check_keywords,
    check_lora_dropout,
    initial_adapter_dtype,
    AdapterLayer,
    EvalNormCache,
    adapter_parameter,
    checked_array,
    frozen,
    with_parent_keywords,
)
from ..core._validate import (
    as_float_array,
    check_adapter,
    check_finite,
    check_flag,
    check_input,
    check_rows_finite,
    check_scaling,
    check_weight_shape,
    results_finite,
)

_INIT_CHOICES = (True, False, "gaussian")


def lora_scaling(r, lora_alpha, use_rslora=False):
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA.

    Parameters
    ----------
    r : int
        Rank, >= 1.
    lora_alpha : float
    use_rslora : bool

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If r is not a positive integer.
    TypeError
        If use_rslora is not True or False (a string "False" would read as True).

    Notes
    -----
    Matches PEFT ``LoraLayer.update_layer``.
    """
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    lora_alpha = check_scaling(lora_alpha)
    use_rslora = check_flag("use_rslora", use_rslora)
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def initial_lora_weights(in_features, out_features, r, rng, dtype, init=True):
    """PEFT's initial ``lora_A`` (r, in) and ``lora_B`` (out, r).

    * ``init=True`` (PEFT default): A ~ U(-1/sqrt(in), 1/sqrt(in)), which is
      ``nn.init.kaiming_uniform_(A, a=sqrt(5))``, torch ``nn.Linear``'s init;
      B = 0, so the adapted layer starts as the base layer.
    * ``init="gaussian"``: A ~ N(0, 1/r), B = 0.
    * ``init=False``: both keep ``nn.Linear``'s init, A ~ U(+-1/sqrt(in)),
      B ~ U(+-1/sqrt(r)); the layer does *not* start as the base layer.

    Parameters
    ----------
    in_features, out_features, r : int
    rng : numpy.random.Generator
    dtype : numpy dtype, float32 or float64
    init : {True, False, "gaussian"}

    Returns
    -------
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)

    Notes
    -----
    Matches PEFT ``LoraLayer.reset_lora_parameters``.
    """
    if init not in _INIT_CHOICES:
        raise ValueError(f"init_lora_weights must be one of {_INIT_CHOICES}, got {init!r}")
    bound_a = 1.0 / math.sqrt(in_features)
    if init == "gaussian":
        A = rng.normal(0.0, 1.0 / r, size=(r, in_features))
    else:
        A = rng.uniform(-bound_a, bound_a, size=(r, in_features))
    if init is False:
        bound_b = 1.0 / math.sqrt(r)
        B = rng.uniform(-bound_b, bound_b, size=(out_features, r))
    else:
        B = np.zeros((out_features, r))
    return A.astype(dtype), B.astype(dtype)


class LoRALinear(AdapterLayer):
    """A frozen linear layer with a trainable low-rank update (LoRA).

    ``y = x @ weight.T + s * (dropout(x) @ lora_A.T) @ lora_B.T + bias``.

    Parameters
    ----------
    weight : ndarray, shape (out, in), float32 or float64
        Frozen base weight. The layer keeps a read-only, C-contiguous copy;
        an array that is already read-only and C-contiguous is kept without
        copying, and trusted not to change.
    bias : ndarray, shape (out,), optional
        Frozen base bias, kept the same way.
    r : int, optional
        Rank; default 8 (PEFT's), or ``lora_A.shape[0]`` when ``lora_A`` is given.
    lora_alpha : float, default 8
    use_rslora : bool, default False
    lora_dropout : float in [0, 1), default 0
    init_lora_weights : {True, False, "gaussian"}, default True
    rng : numpy.random.Generator or int, optional
        Seeds the init and the dropout masks.
    lora_A : ndarray, shape (r, in), optional
    lora_B : ndarray, shape (out, r), optional
        Trained adapter weights (e.g. from a PEFT checkpoint) instead of the
        initialisation; give both or neither. Copied, in the adapter's dtype
        (the weight's; with a float16/bfloat16 weight, see below).
    policy : {"consistent", "peft"}, default "consistent"
        Where a float16/bfloat16 layer rounds (``dora_ref.core.precision``);
        ignored for float32/float64. ``LoRALinear`` accepts "consistent" only.
    autocast_adapter_dtype : bool, default True
        PEFT's name. With a float16/bfloat16 weight: True keeps lora_A,
        lora_B (and DoRA's magnitude) in float32 ("mixed"), False in the
        weight's dtype ("pure"). The init draws A in float32; under "peft" it
        is rounded to the weight's dtype as PEFT does (then kept in the
        adapter's dtype), under "consistent" a mixed layer keeps the float32
        draw. Ignored for float32/float64 weights.

    Attributes
    ----------
    lora_A : ndarray, shape (r, in)
    lora_B : ndarray, shape (out, r)
    scaling : float
    grads : dict of str to ndarray
        Accumulated gradients, keyed as ``parameters()``.
    training : bool
    merged : bool

    Raises
    ------
    TypeError, ValueError
        On bad dtypes, shapes, r, or dropout probability.
    """

    _param_names = ("lora_A", "lora_B")
    _peft_policy = False  # PEFT's lp cast points are reproduced for DoRA only
    lora_A = adapter_parameter("lora_A", "Trainable (r, in), PEFT ``lora_A.weight``.")
    lora_B = adapter_parameter("lora_B", "Trainable (out, r), PEFT ``lora_B.weight``.")

    def __init__(
        self,
        weight,
        bias=None,
        *,
        r=None,
        lora_alpha=8,
        use_rslora=False,
        lora_dropout=0.0,
        init_lora_weights=True,
        rng=None,
        lora_A=None,
        lora_B=None,
        policy="consistent",
        autocast_adapter_dtype=True,
    ):
        check_bias_argument(self, bias)
        self.policy = check_policy(policy)
        self.autocast_adapter_dtype = check_autocast(autocast_adapter_dtype)
        weight = as_float_array("weight", weight, ndim=2, low_precision=True)
        check_weight_shape("weight", weight.shape)
        low_precision = weight.dtype in LOW_PRECISION_DTYPES
        if low_precision and policy == "peft" and not self._peft_policy:
            raise ValueError("policy='peft' is defined for DoRA layers; a float16/bfloat16 "
                             "LoRALinear uses policy='consistent'")
        ad_dtype = adapter_dtype(weight.dtype, self.autocast_adapter_dtype)
        if (lora_A is None) != (lora_B is None):
            raise ValueError("give both lora_A and lora_B, or neither")
        if lora_A is not None:
            lora_A = as_float_array("lora_A", lora_A, ndim=2, low_precision=low_precision)
            lora_B = as_float_array("lora_B", lora_B, ndim=2, low_precision=low_precision)
            check_adapter(weight, lora_A, lora_B, low_precision=low_precision,
                          names=("weight", "lora_A", "lora_B", "magnitude", "bias"))
            if lora_A.dtype != ad_dtype:
                raise TypeError(
                    f"lora_A and lora_B have dtype {lora_A.dtype}, but a {weight.dtype} weight "
                    f"with autocast_adapter_dtype={self.autocast_adapter_dtype} keeps the "
                    f"adapter in {ad_dtype}"
                )
            lora_A, lora_B = lora_A.copy(), lora_B.copy()
            if r is not None and r != lora_A.shape[0]:
                raise ValueError(f"r = {r} but lora_A has shape {lora_A.shape}")
            r = lora_A.shape[0]
        r = 8 if r is None else r
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)  # checks use_rslora
        self.use_rslora = bool(use_rslora)
        self.lora_dropout = check_lora_dropout(lora_dropout)
        self.rng = np.random.default_rng(rng)
        out_features, in_features = weight.shape
        if lora_A is None:
            A, B = initial_lora_weights(in_features, out_features, r, self.rng,
                                        np.float32 if low_precision else weight.dtype,
                                        init_lora_weights)
            self._lora_A, self._lora_B = initial_adapter_dtype(
                (A, B), weight.dtype, policy, self.autocast_adapter_dtype)
        else:
            self._lora_A, self._lora_B = lora_A, lora_B
        self.training = True
        self.merged = False
        self._ctx = None
        self._set_base(weight, bias)
        self.zero_grad()

    # -- base weights -------------------------------------------------------

    def _set_base(self, weight, bias, owned=False):
        """Install a frozen base; ``owned``: the arrays are fresh results of ours."""
        weight = as_float_array("weight", weight, ndim=2, low_precision=True)
        if weight.shape != (self.lora_B.shape[0], self.lora_A.shape[1]):
            raise ValueError(
                f"weight must have shape (out, in) = "
                f"{(self.lora_B.shape[0], self.lora_A.shape[1])}, got {weight.shape}"
            )
        if weight.dtype in LOW_PRECISION_DTYPES:
            classify(weight, self.lora_A, self.lora_B,
                     names=("weight", "lora_A", "lora_B", "magnitude", "bias"))
        elif weight.dtype != self.lora_A.dtype:
            raise TypeError(f"weight has dtype {weight.dtype}, the adapter {self.lora_A.dtype}")
        self._low_precision = weight.dtype in LOW_PRECISION_DTYPES
        if bias is not None:
            bias = as_float_array("bias", bias, ndim=1, low_precision=self._low_precision)
            if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
                raise ValueError(
                    f"bias must have shape ({weight.shape[0]},) and dtype {weight.dtype}, "
                    f"got {bias.shape} {bias.dtype}"
                )
            bias = frozen(bias, owned)
            check_finite("bias", bias)  # frozen: checked once, not every forward
        self._weight, self._bias = frozen(weight, owned), bias

    def _replace_base(self, weight):
        self._set_base(weight, self._bias, owned=True)

    @property
    def weight(self):
        """The frozen base weight (out, in), read-only. Assigning calls ``set_base_weight``."""
        return self._weight

    @weight.setter
    def weight(self, value):
        self.set_base_weight(value)

    @property
    def bias(self):
        """The frozen base bias (out,) or None, read-only."""
        return self._bias

    def set_base_weight(self, weight, bias="keep"):
        """Replace the frozen base weight (and optionally the bias).

        Parameters
        ----------
        weight : ndarray, shape (out, in)
        bias : ndarray of shape (out,), None, or "keep" (default)

        Raises
        ------
        RuntimeError
            If the layer is merged.
        """
        if self.merged:
            raise RuntimeError("unmerge() before replacing the base weight")
        self._changing_base(lambda: self._set_base(
            weight, self._bias if isinstance(bias, str) and bias == "keep" else bias))

    @property
    def in_features(self):
        return self._weight.shape[1]

    @property
    def out_features(self):
        return self._weight.shape[0]

    # -- forward / backward ---------------------------------------------------

    @consistent_forward
    def forward(self, x, *, dropout_mask=None):
        """Forward pass.

        Parameters
        ----------
        x : ndarray, shape (..., in)
        dropout_mask : ndarray, shape of x, optional
            Use this scaled keep mask instead of drawing one. Training only:
            PEFT applies no dropout in eval, so a mask in eval mode raises
            ``ValueError``.

        Returns
        -------
        y : ndarray, shape (..., out)

        Raises
        ------
        RuntimeError
            Merged, if the adapter changed in place since ``merge()`` (see
            ``unmerge``).
        """
        self._ctx = None  # a forward that raises leaves no context: backward() then refuses
        if self.merged:
            self._mask_for(x, dropout_mask)  # refuses a mask: a merged layer has no dropout
            self._check_merged_adapter("forward")
            x2 = check_input(x, self.in_features, self._weight.dtype,
                             low_precision=self._low_precision)
            if self._low_precision:  # float32 product (and bias), rounded once
                y = x2.astype(np.float32) @ self._weight.astype(np.float32).T
                if self._bias is not None:
                    y += self._bias.astype(np.float32)
                y = round_to(y, self._weight.dtype)
            else:
                y = x2 @ self._weight.T
                if self._bias is not None:
                    y += self._bias
            if not results_finite(y):  # names x, or truly what overflowed
                F._check_merged_overflow(y, x2, self._weight, self._bias,
                                         np.float32 if self._low_precision else self._weight.dtype)
            return y.reshape(*np.shape(x)[:-1], self.out_features)
        mask = self._mask_for(x, dropout_mask)
        if self._low_precision:
            self._check_parameters_finite()
            y, self._ctx = _lowp.lora_forward(np.shape(x), x, self._weight, self._lora_A,
                                              self._lora_B, check_scaling(self.scaling),
                                              self._bias, mask, self.policy)
            return y
        x2 = check_input(x, self.in_features, self._weight.dtype)
        self._check_parameters_finite()  # shapes, dtypes and the frozen weights: checked once
        y, self._ctx = F._lora_forward(np.shape(x), x2, self._weight, self._lora_A, self._lora_B,
                                       check_scaling(self.scaling), self._bias, mask)
        return y

    __call__ = forward

    def backward(self, dy):
        """Backward pass: accumulates ``grads`` (+=) and returns dx (..., in).

        Raises
        ------
        RuntimeError
            If no forward was run, the layer is merged, or a trainable array
            changed in place since the forward (an optimiser step between
            forward and backward: the saved activations would not match it).

        Notes
        -----
        The forward keeps a view of x, not a copy: do not write into x
        between the forward and this backward (the trainable arrays are
        compared; x, as large as the batch, is not).
        """
        self._require_ctx()
        g = F.lora_backward(dy, self._ctx)
        self._add_to_grads({"lora_A": g.dA, "lora_B": g.dB})
        return g.dx

    # -- merge ------------------------------------------------------------------

    def merge(self):
        """Fold the adapter into ``weight``: W' = W0 + s B A (PEFT ``Linear.merge``).

        While merged, ``lora_A`` and ``lora_B`` are read-only (an optimiser
        step or an assignment raises), so that ``unmerge()`` subtracts what
        was added.

        Raises
        ------
        RuntimeError
            If already merged.
        NonFiniteWeightError
            A ``ValueError``: W' would overflow the dtype (nothing is changed).
        """
        if self.merged:
            raise RuntimeError("the layer is already merged")
        s = check_scaling(self.scaling)
        with np.errstate(over="ignore", invalid="ignore"):  # refused right below, with its rows
            if self._low_precision:  # float32, rounded once
                W = round_to(self._weight.astype(np.float32) + s * (
                    self.lora_B.astype(np.float32) @ self.lora_A.astype(np.float32)),
                    self._weight.dtype)
            else:
                W = self._weight + s * (self.lora_B @ self.lora_A)
        check_rows_finite("the merged weight W0 + s*B@A", W)
        self._install_merged(W)

    def unmerge(self):
        """Restore the unmerged base weight W0 = W' - s B A.

        Raises
        ------
        RuntimeError
            If not merged, or if the adapter changed in place since ``merge()``
            (a write around its read-only arrays): W0 could not be restored;
            the layer is left merged and unchanged.
        """
        if not self.merged:
            raise RuntimeError("the layer is not merged")
        self._check_merged_adapter("unmerge()")
        if self._low_precision:
            with np.errstate(over="ignore"):
                W0 = round_to(self._weight.astype(np.float32) - self.scaling * (
                    self.lora_B.astype(np.float32) @ self.lora_A.astype(np.float32)),
                    self._weight.dtype)
            check_rows_finite("the unmerged weight W' - s*B@A", W0)
            self._install_unmerged(W0)
            return
        self._install_unmerged(self._weight - self.scaling * (self.lora_B @ self.lora_A))

    def __repr__(self):
        return (
            f"{type(self).__name__}(in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"dtype={self._weight.dtype}, merged={self.merged})"
        )


class DoRALinear(LoRALinear):
    """A frozen linear layer adapted with DoRA (paper Eq. 5, PEFT semantics).

    ``y = g * (x @ W0.T + s * (x @ A.T) @ B.T) + bias`` with
    ``g = lora_magnitude_vector / ||W0 + s B A||_row`` (one value per output
    channel). Training with ``lora_dropout > 0`` uses PEFT's formula, see
    ``dora_ref.core.functional.dora_forward``.

    Parameters
    ----------
    weight, bias, r, lora_alpha, use_rslora, lora_dropout, init_lora_weights, rng, lora_A, lora_B
        As in ``LoRALinear``. The magnitude is initialised to the row norms of
        ``weight + s * lora_B @ lora_A`` (PEFT ``DoraLinearLayer.update_layer``).
    lora_magnitude_vector : ndarray, shape (out,), optional
        A trained magnitude instead of that initialisation. Copied.
    detach_norm : bool, default True
        True: the norm is a constant in backward (paper Sec. 4.3, PEFT).
        False: the exact gradient (paper Eqs. 6-7).
    allow_zero_norm : bool, default False
        See ``dora_ref.core.functional.dora_forward``.
    policy, autocast_adapter_dtype
        As in ``LoRALinear``; "peft" also initialises the magnitude as PEFT
        does (rounded to the weight's dtype, so g != 1 at init when mixed).

    Attributes
    ----------
    lora_magnitude_vector : ndarray, shape (out,), the adapter's dtype
    weight_norm : ndarray, shape (out,) or None
        The row norms n kept by ``merge()`` for ``unmerge()``.

    Notes
    -----
    In eval mode the norm is cached and reused while ``lora_A``, ``lora_B``,
    the scaling and the base weight are unchanged. Unlike PEFT's opt-in
    ``DoraCaching``, every forward compares the cached A and B (r * (in + out)
    numbers, negligible next to the forward's products) and recomputes on
    any change, including in-place optimiser updates.
    """

    _param_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    _peft_policy = True
    lora_magnitude_vector = adapter_parameter(
        "lora_magnitude_vector", "Trainable (out,), PEFT ``lora_magnitude_vector``: one per output channel."
    )

    def __init__(
        self,
        weight,
        bias=None,
        *,
        detach_norm=True,
        allow_zero_norm=False,
        lora_magnitude_vector=None,
        **kwargs,
    ):
        self.detach_norm = check_flag("detach_norm", detach_norm)
        self.allow_zero_norm = check_flag("allow_zero_norm", allow_zero_norm)
        self.weight_norm = None
        self._norm_cache = EvalNormCache()
        self._given_magnitude = lora_magnitude_vector
        self._lora_magnitude_vector = None
        check_keywords(self, DoRALinear, kwargs)
        super().__init__(weight, bias, **kwargs)

    def _forward_norm(self):
        """The norm the forward divides by, in the magnitude's dtype (see ``core.lowp``).

        Computed on an eval-mode cache miss, before the forward's own checks:
        NaN/Inf in the adapter is named here by its PEFT name (the functional
        ``column_norm`` would call it "A" or "B").
        """
        check_finite("lora_A", self._lora_A)
        check_finite("lora_B", self._lora_B)
        n = F.column_norm(self._weight, self.lora_A, self.lora_B, self.scaling, policy=self.policy)
        return round_to(n, self._lora_magnitude_vector.dtype)

    def _replace_base(self, weight):
        self._set_base(weight, self._bias, owned=True, keep_magnitude=True)

    def _set_base(self, weight, bias, owned=False, keep_magnitude=False):
        super()._set_base(weight, bias, owned)
        self._norm_cache.clear()
        if self._given_magnitude is not None:  # construction with a trained magnitude
            m = checked_array("lora_magnitude_vector", self._given_magnitude, self.lora_A.dtype,
                              (self.out_features,))
            self._lora_magnitude_vector, self._given_magnitude = m.copy(), None
        elif not (self.merged or keep_magnitude):  # a new base: re-initialise the magnitude
            m = F.init_magnitude(self._weight, self.lora_A, self.lora_B, self.scaling,
                                 policy=self.policy)
            if self._lora_magnitude_vector is None:
                self._lora_magnitude_vector = m
            else:  # in place: an optimiser holds this array
                self._lora_magnitude_vector[...] = m
                self.grads["lora_magnitude_vector"][...] = 0

    def set_base_weight(self, weight, bias="keep"):
        """Replace the base weight; the magnitude is re-initialised from it.

        The magnitude is defined relative to the base weight (m = ||W0 + s B A||
        at init), so a new W0 gets a new magnitude, as PEFT computes it after
        any init that rewrites the base weight (PiSSA, OLoRA, ...).

        Parameters
        ----------
        weight : ndarray, shape (out, in)
        bias : ndarray of shape (out,), None, or "keep" (default)
        """
        super().set_base_weight(weight, bias)

    @consistent_forward
    def forward(self, x, *, dropout_mask=None):
        """Forward pass, x (..., in) -> y (..., out); see ``LoRALinear.forward``."""
        self._ctx = None  # a forward that raises leaves no context: backward() then refuses
        if self.merged:
            return super().forward(x, dropout_mask=dropout_mask)
        # _mask_for's usual answer, without the call
        mask = None if dropout_mask is None and self.lora_dropout == 0.0 else \
            self._mask_for(x, dropout_mask)
        # checked before the eval cache compares it with its own (an array
        # scaling would otherwise fail there with NumPy's message, not ours)
        scaling = self.scaling
        if not (type(scaling) is float and scaling - scaling == 0.0):  # finite: check_scaling's
            scaling = check_scaling(scaling)  # own first test, without the call; else it raises
        if self.training:
            self._norm_cache.clear()
            norm = None
        else:  # reused while W0, A, B and s are unchanged (EvalNormCache)
            norm = self._norm_cache.get(
                self._weight, self.lora_A, self.lora_B, scaling,
                self._forward_norm,
            )
        if self._low_precision:
            self._check_parameters_finite()
            y, self._ctx = _lowp.dora_forward(
                np.shape(x), x, self._weight, self._lora_A, self._lora_B,
                self._lora_magnitude_vector, scaling, self._bias, mask, norm,
                self.allow_zero_norm, self.policy,
            )
            return y
        W0 = self._weight
        x2 = check_input(x, W0.shape[1], W0.dtype)
        # shapes, dtypes and the frozen weights: checked once; NaN/Inf written into A or B
        # and the magnitude by _dora_forward (where the C kernel's norms prove A and B
        # finite, by its fast path: checked there by name only if a norm is not finite)
        # in eval, y is written over the base product (no second (N, out) array); a
        # backward after an eval forward recomputes that product
        y, self._ctx = F._dora_forward(
            x.shape if x2 is x else np.shape(x), x2, W0, self._lora_A, self._lora_B,
            self._lora_magnitude_vector, scaling, self._bias, mask, norm,
            self.allow_zero_norm, not self.training,  # overwrite_base
            "lora_magnitude_vector", ("lora_A", "lora_B"),  # magnitude_name, adapter_names
        )
        return y

    __call__ = forward

    def backward(self, dy):
        """Backward pass: accumulates ``grads`` (+=) and returns dx (..., in).

        Parameters
        ----------
        dy : ndarray, shape (..., out), the forward output's shape and dtype

        Returns
        -------
        dx : ndarray, shape (..., in), x's dtype

        Raises
        ------
        RuntimeError
            If no forward was run, the layer is merged, or a trainable array
            changed in place since the forward (an optimiser step between
            forward and backward).
        TypeError, ValueError
            A dy of another dtype or shape than the forward's output, NaN/Inf
            in dy, or a gradient that overflowed (``dora_backward``).

        Notes
        -----
        The forward keeps a view of x, not a copy (as PyTorch saves its
        input): do not write into x between the forward and this backward.
        The trainable arrays are compared; x, as large as the batch, is not,
        so a write into it gives a wrong ``lora_A`` gradient without an error.
        Calling backward twice after one forward adds the gradients twice.
        """
        ctx = self._ctx
        if ctx is None or self.merged:
            self._require_ctx()  # raises, saying which
        if type(ctx) is F.DoRAContext and ctx.precision is None:  # dora_backward, known ctx
            dx, dA, dB, dm = F._dora_backward_checked(dy, ctx, self.detach_norm)
        else:
            dx, dA, dB, dm = F.dora_backward(dy, ctx, detach_norm=self.detach_norm)
        self._add_to_grads({"lora_A": dA, "lora_B": dB, "lora_magnitude_vector": dm})
        return dx

    def merge(self):
        """Fold the adapter into ``weight``: W' = diag(m / n)(W0 + s B A).

        Keeps n in ``weight_norm`` for ``unmerge`` (PEFT caches it the same
        way; W' alone does not determine it). The bias is unchanged. While
        merged the trainable arrays are read-only (see ``LoRALinear.merge``).

        Raises
        ------
        RuntimeError
            If already merged.
        ValueError
            A zero row norm, a zero magnitude (unmerge could not restore the
            row), or (``NonFiniteWeightError``) a merged weight that would
            not be finite; nothing is changed.
        """
        if self.merged:
            raise RuntimeError("the layer is already merged")
        W_merged, n = F.merge(
            self._weight,
            self.lora_A,
            self.lora_B,
            self.lora_magnitude_vector,
            self.scaling,
            allow_zero_norm=self.allow_zero_norm,
            policy=self.policy,
        )
        self._install_merged(W_merged, n, "dora_ref.merge")

    def unmerge(self):
        """Restore W0 = W' / (m / n) - s B A, with n kept at merge time.

        Raises ``RuntimeError`` if not merged, or if the adapter changed in
        place since ``merge()`` (see ``LoRALinear.unmerge``).
        """
        if not self.merged:
            raise RuntimeError("the layer is not merged")
        self._check_merged_adapter("unmerge()")
        W0 = F.unmerge(
            self._weight,
            self.lora_A,
            self.lora_B,
            self.lora_magnitude_vector,
            self.scaling,
            self.weight_norm,
            policy=self.policy,
        )
        self._install_unmerged(W0)


with_parent_keywords(DoRALinear.__init__, LoRALinear.__init__)  # help(): r, lora_alpha, ... too
