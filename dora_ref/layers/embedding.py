"""The DoRA embedding layer: PEFT's ``nn.Embedding`` DoRA with its state.

The math (lookups, the norm over the vocabulary, ``embed_scale``) is
``dora_ref.core.embedding``; this module keeps the weights, the forward
context and the merged state.
"""
from __future__ import annotations

import numpy as np

from ..core._validate import as_float_array, check_flag, check_weight_shape
from ..core.embedding import (
    _check_embed_scale,
    _check_ids,
    _check_padding_idx,
    embedding_column_norm,
    embedding_dora_backward,
    embedding_dora_forward,
    embedding_init_magnitude,
    embedding_merge,
    embedding_unmerge,
)
from ..core.precision import LOW_PRECISION_DTYPES, check_policy, classify, round_to
from .base import (AdapterLayer, EvalNormCache, adapter_parameter, check_autocast,
                   consistent_forward, frozen, initial_adapter_dtype)
from .linear import lora_scaling


def initial_embedding_lora_weights(num_embeddings, embedding_dim, r, rng, dtype, init=True):
    """PEFT's initial ``lora_embedding_A`` (r, V) and ``lora_embedding_B`` (D, r).

    ``init`` True or "gaussian": A = 0, B ~ N(0, 1), so the layer starts as
    the base layer. ``init=False``: both ~ N(0, 1) (``Embedding.update_layer``'s
    ``torch.randn``). Matches PEFT ``LoraLayer.reset_lora_parameters``.
    """
    if init not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init!r}")
    A = rng.standard_normal((r, num_embeddings))
    B = rng.standard_normal((embedding_dim, r))
    if init is not False:
        A = np.zeros_like(A)
    return A.astype(dtype), B.astype(dtype)


class DoRAEmbedding(AdapterLayer):
    """DoRA for ``torch.nn.Embedding``, PEFT's convention (see ``dora_ref.core.embedding``).

    ``y = embed_scale * g * (weight[ids] + s * lora_embedding_A.T[ids] @ lora_embedding_B.T)``,
    ``g = m / ||weight.T + s B A||_row``, one value per embedding dimension.

    Parameters
    ----------
    weight : ndarray, shape (V, D), float32 or float64
        Frozen ``nn.Embedding.weight`` (num_embeddings, embedding_dim). The
        layer keeps its own read-only, C-contiguous copy; an array that is
        already read-only and C-contiguous is kept without a copy (saving a
        table's worth of memory), trusted not to change.
    padding_idx : int, optional
        As ``nn.Embedding``: lookups of it send no gradient to ``lora_embedding_A``.
    embed_scale : float, optional
        A scaled embedding's output factor (e.g. Gemma3's), applied to the
        DoRA term too (PEFT >= 0.18).
    r : int, default 8
    lora_alpha : float, default 8
    use_rslora : bool, default False
    init_lora_weights : {True, False, "gaussian"}, default True
        True: ``lora_embedding_A`` = 0 and ``lora_embedding_B`` ~ N(0, 1) (PEFT).
    rng : numpy.random.Generator or int, optional
    detach_norm : bool, default True
    allow_zero_norm : bool, default False
    policy : {"consistent", "peft"}, default "consistent"
    autocast_adapter_dtype : bool, default True
        For a float16/bfloat16 table, as ``dora_ref.DoRALinear``: the adapter
        and magnitude float32 (True) or in the table's dtype (False); "peft"
        rounds the init draw to the table's dtype and initialises the
        magnitude as PEFT (``dora_ref.core.embedding``).

    Attributes
    ----------
    weight : ndarray, shape (V, D), read-only
    lora_embedding_A : ndarray, shape (r, V)
    lora_embedding_B : ndarray, shape (D, r)
    lora_magnitude_vector : ndarray, shape (D,)
    scaling : float
    grads : dict of str to ndarray, keyed as ``parameters()``
    weight_norm : ndarray, shape (D,) or None
        Kept by ``merge()`` for ``unmerge()``.

    Notes
    -----
    Assigning ``lora_embedding_A``, ``lora_embedding_B`` or
    ``lora_magnitude_vector`` copies into the layer's array in place (an
    optimiser built on ``parameters()`` keeps training it); the value must be
    a finite float array of the weight's dtype and the parameter's shape.

    No dropout: PEFT applies none to embeddings. In eval mode the (D,) norm,
    a pass over the whole (V, D) table, is cached while the weights are
    unchanged (``layers.base.EvalNormCache``); in training it is recomputed every
    forward, as PEFT does.
    """

    _param_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(
        self,
        weight,
        *,
        padding_idx=None,
        embed_scale=None,
        r=8,
        lora_alpha=8,
        use_rslora=False,
        init_lora_weights=True,
        rng=None,
        detach_norm=True,
        allow_zero_norm=False,
        policy="consistent",
        autocast_adapter_dtype=True,
    ):
        self.policy = check_policy(policy)
        self.autocast_adapter_dtype = check_autocast(autocast_adapter_dtype)
        weight = as_float_array("weight", weight, ndim=2, low_precision=True)
        check_weight_shape("weight", weight.shape, ("embedding (num_embeddings)", "dimension"))
        V, D = weight.shape
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)  # checks use_rslora
        self.use_rslora = bool(use_rslora)
        self.padding_idx = _check_padding_idx(padding_idx, V)
        self.embed_scale = None if embed_scale is None else _check_embed_scale(embed_scale)
        self.detach_norm = check_flag("detach_norm", detach_norm)
        self.allow_zero_norm = check_flag("allow_zero_norm", allow_zero_norm)
        self.rng = np.random.default_rng(rng)
        A, B = initial_embedding_lora_weights(
            V, D, r, self.rng,
            np.float32 if weight.dtype in LOW_PRECISION_DTYPES else weight.dtype, init_lora_weights
        )
        self._lora_embedding_A, self._lora_embedding_B = initial_adapter_dtype(
            (A, B), weight.dtype, policy, self.autocast_adapter_dtype)
        self.training = True
        self.merged = False
        self.weight_norm = None
        self._ctx = None
        self._norm_cache = EvalNormCache()
        self._lora_magnitude_vector = None
        self._set_base(weight)
        self.zero_grad()

    def _replace_base(self, weight):
        self._set_base(weight, owned=True, keep_magnitude=True)

    def _set_base(self, weight, owned=False, keep_magnitude=False):
        """Install the frozen table as the layer's own read-only array (``layers.base.frozen``);
        unless merged or ``keep_magnitude``, (re-)initialise the magnitude from it."""
        weight = as_float_array("weight", weight, ndim=2, low_precision=True)
        if weight.shape != (self._lora_embedding_A.shape[1], self._lora_embedding_B.shape[0]):
            raise ValueError(
                f"weight must have shape (V, D) = ({self._lora_embedding_A.shape[1]}, "
                f"{self._lora_embedding_B.shape[0]}), got {weight.shape}"
            )
        if weight.dtype in LOW_PRECISION_DTYPES:
            classify(weight, self._lora_embedding_A, self._lora_embedding_B,
                     names=("weight", "lora_embedding_A", "lora_embedding_B", "magnitude", "bias"))
        elif weight.dtype != self._lora_embedding_A.dtype:
            raise TypeError(
                f"weight has dtype {weight.dtype}, the adapter {self._lora_embedding_A.dtype}"
            )
        self._weight = frozen(weight, owned)
        self._norm_cache.clear()
        if self.merged or keep_magnitude:
            return
        m = embedding_init_magnitude(self._weight, self._lora_embedding_A,
                                     self._lora_embedding_B, self.scaling, policy=self.policy)
        if self._lora_magnitude_vector is None:
            self._lora_magnitude_vector = m
        else:  # in place: an optimiser built on parameters() holds these arrays
            self._lora_magnitude_vector[...] = m
            self.grads["lora_magnitude_vector"][...] = 0

    def set_base_weight(self, weight):
        """Replace the frozen (V, D) table; the magnitude is re-initialised from it.

        As ``DoRALinear.set_base_weight``: the magnitude is defined relative
        to the base (m = ||E.T + s B A||_row at init). The layer keeps its own
        read-only copy (see ``weight``); the trainable arrays stay the same
        objects, so an optimiser built on ``parameters()`` keeps training them.

        Raises
        ------
        RuntimeError
            If the layer is merged.
        TypeError, ValueError
            On a dtype or shape that differs from the adapter's.
        """
        if self.merged:
            raise RuntimeError("unmerge() before replacing the base weight")
        self._changing_base(lambda: self._set_base(weight))

    @property
    def weight(self):
        """The frozen (V, D) table, read-only (merged: E'): the layer's own copy."""
        return self._weight

    lora_embedding_A = adapter_parameter(
        "lora_embedding_A", "``lora_embedding_A`` (r, V), trainable; assigning copies in place."
    )
    lora_embedding_B = adapter_parameter(
        "lora_embedding_B", "``lora_embedding_B`` (D, r), trainable; assigning copies in place."
    )
    lora_magnitude_vector = adapter_parameter(
        "lora_magnitude_vector",
        "The magnitude (D,), one value per embedding dimension; assigning copies in place.",
    )

    @property
    def num_embeddings(self):
        return self._weight.shape[0]

    @property
    def embedding_dim(self):
        return self._weight.shape[1]

    @consistent_forward
    def forward(self, ids):
        """Look up ids (...) -> (..., D)."""
        self._ctx = None  # a forward that raises leaves no context: backward() then refuses
        if self.merged:
            self._check_merged_adapter("forward")
            ids = _check_ids(ids, self.num_embeddings)
            y = self._weight[ids]
            if self.embed_scale is None:
                return y.copy()
            if self._weight.dtype in LOW_PRECISION_DTYPES:  # float32 product, rounded once
                return round_to(y.astype(np.float32) * self.embed_scale, self._weight.dtype)
            return y * self.embed_scale
        norm = None
        if self.training:
            self._norm_cache.clear()
        else:  # the (D, V) norm of unchanged weights is reused (see layers.base.EvalNormCache)
            norm = self._norm_cache.get(
                self._weight, self.lora_embedding_A, self.lora_embedding_B, self.scaling,
                lambda: round_to(embedding_column_norm(
                    self._weight, self.lora_embedding_A, self.lora_embedding_B, self.scaling,
                    policy=self.policy), self.lora_magnitude_vector.dtype),  # lp: the forward's n
            )
        y, self._ctx = embedding_dora_forward(
            ids, self._weight, self.lora_embedding_A, self.lora_embedding_B,
            self.lora_magnitude_vector, self.scaling, embed_scale=self.embed_scale,
            padding_idx=self.padding_idx, weight_norm=norm, allow_zero_norm=self.allow_zero_norm,
            policy=self.policy,
        )
        return y

    __call__ = forward

    def backward(self, dy):
        """Accumulate ``grads`` (+=) from dy (..., D). Returns None: ids have no gradient."""
        self._require_ctx()
        dA, dB, dm = embedding_dora_backward(dy, self._ctx, detach_norm=self.detach_norm)
        self._add_to_grads({"lora_embedding_A": dA, "lora_embedding_B": dB, "lora_magnitude_vector": dm})
        return None

    def merge(self):
        """E' = (E + s (B A).T) * (m / n) column-wise; n kept in ``weight_norm`` (PEFT's merge)."""
        if self.merged:
            raise RuntimeError("the layer is already merged")
        W, n = embedding_merge(self._weight, self.lora_embedding_A, self.lora_embedding_B,
                               self.lora_magnitude_vector, self.scaling,
                               allow_zero_norm=self.allow_zero_norm, policy=self.policy)
        self._install_merged(W, n, "embedding_merge")

    def unmerge(self):
        """E = E' / (m / n) - s (B A).T, with n kept at merge time.

        Raises ``RuntimeError`` if not merged, or if the adapter changed in
        place since ``merge()`` (see ``dora_ref.LoRALinear.unmerge``).
        """
        if not self.merged:
            raise RuntimeError("the layer is not merged")
        self._check_merged_adapter("unmerge()")
        E = embedding_unmerge(self._weight, self.lora_embedding_A, self.lora_embedding_B,
                              self.lora_magnitude_vector, self.scaling, self.weight_norm,
                              policy=self.policy)
        self._install_unmerged(E)

    def __repr__(self):
        return (
            f"DoRAEmbedding({self.num_embeddings}, {self.embedding_dim}, r={self.r}, "
            f"scaling={self.scaling:g}, padding_idx={self.padding_idx}, "
            f"embed_scale={self.embed_scale}, dtype={self._weight.dtype}, merged={self.merged})"
        )
