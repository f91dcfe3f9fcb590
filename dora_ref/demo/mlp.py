"""A small multilayer perceptron built from dora_ref layers, for the demo.

Everything here is plain NumPy with a hand-written backward, like the rest of
dora_ref: a dense layer (trainable, or frozen for head-only training), ReLU,
softmax cross-entropy, and an ``MLP`` that chains them. Every layer has the
interface of ``dora_ref.layers.DoRALinear``: ``forward``, ``backward`` (which
accumulates ``grads`` with ``+=`` and returns dx), ``parameters()``,
``zero_grad()``, ``train()``/``eval()``; so a DoRA or LoRA layer drops into
an ``MLP`` in place of a dense one.

Shapes: a batch is (N, features); a dense weight is PyTorch's (out, in).

Use::

    net = MLP([Dense(W1, b1), ReLU(), Dense(W2, b2)])
    logits = net.forward(x)                      # (N, classes)
    loss, dlogits = softmax_cross_entropy(logits, labels)
    net.zero_grad(); net.backward(dlogits)
    opt = AdamW(net.parameters()); opt.step(net.grads())
"""
from __future__ import annotations

import math

import numpy as np

from ..core._validate import as_float_array, check_input
from ..layers.base import Module


def init_dense(in_features, out_features, rng, dtype=np.float64):
    """PyTorch ``nn.Linear``'s default init: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)).

    Parameters
    ----------
    in_features, out_features : int
    rng : numpy.random.Generator
    dtype : numpy dtype, default float64

    Returns
    -------
    weight : ndarray, shape (out, in)
    bias : ndarray, shape (out,)
    """
    bound = 1.0 / math.sqrt(in_features)
    weight = rng.uniform(-bound, bound, size=(out_features, in_features)).astype(dtype)
    bias = rng.uniform(-bound, bound, size=out_features).astype(dtype)
    return weight, bias


class Dense(Module):
    """A linear layer ``y = x @ weight.T + bias``, trainable or frozen.

    Parameters
    ----------
    weight : ndarray, shape (out, in), float32 or float64
        Copied: the layer owns (and, if trainable, updates) its weight.
    bias : ndarray, shape (out,), optional
    trainable : bool, default True
        False freezes the layer: ``parameters()`` is empty, but ``backward``
        still returns dx so that layers below it can learn.

    Raises
    ------
    TypeError, ValueError
        On a non-float weight or a bias of the wrong shape.
    """

    def __init__(self, weight, bias=None, *, trainable=True):
        self.weight = as_float_array("weight", weight, ndim=2).copy()
        if bias is not None:
            bias = as_float_array("bias", bias, ndim=1)
            if bias.shape != (self.weight.shape[0],) or bias.dtype != self.weight.dtype:
                raise ValueError(
                    f"bias must have shape ({self.weight.shape[0]},) and dtype "
                    f"{self.weight.dtype}, got {bias.shape} {bias.dtype}"
                )
            bias = bias.copy()
        self.bias = bias
        self.trainable = trainable
        self.training = True
        self._x = None
        self.zero_grad()

    @property
    def in_features(self):
        return self.weight.shape[1]

    @property
    def out_features(self):
        return self.weight.shape[0]

    def parameters(self):
        """``{"weight": (out, in), "bias": (out,)}`` (live arrays), or {} if frozen."""
        if not self.trainable:
            return {}
        params = {"weight": self.weight}
        if self.bias is not None:
            params["bias"] = self.bias
        return params

    def forward(self, x):
        """x (..., in) -> y (..., out)."""
        self._x = None  # a forward that raises leaves no input: backward() then refuses
        x2 = check_input(x, self.in_features, self.weight.dtype)
        self._x = x2
        y = x2 @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y.reshape(*np.shape(x)[:-1], self.out_features)

    __call__ = forward

    def backward(self, dy):
        """dy (..., out) -> dx (..., in); accumulates ``grads`` if trainable."""
        if self._x is None:
            raise RuntimeError("backward() needs a forward() first")
        dy2 = check_input(dy, self.out_features, self.weight.dtype, name="dy", axis="out")
        if self.trainable:
            deltas = {"weight": dy2.T @ self._x}
            if self.bias is not None:
                deltas["bias"] = dy2.sum(axis=0)
            self._add_to_grads(deltas)
        dx = dy2 @ self.weight
        return dx.reshape(*np.shape(dy)[:-1], self.in_features)

    def __repr__(self):
        return (f"Dense(in={self.in_features}, out={self.out_features}, "
                f"trainable={self.trainable})")


class ReLU(Module):
    """max(x, 0) elementwise; backward passes dy where x > 0."""

    def __init__(self):
        self._mask = None
        self.training = True

    def forward(self, x):
        self._mask = x > 0
        return np.where(self._mask, x, 0.0).astype(x.dtype, copy=False)

    __call__ = forward

    def backward(self, dy):
        if self._mask is None:
            raise RuntimeError("backward() needs a forward() first")
        return np.where(self._mask, dy, 0.0).astype(dy.dtype, copy=False)

    def __repr__(self):
        return "ReLU()"


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient w.r.t. the logits.

    ``loss = mean_i [logsumexp(logits_i) - logits_i[labels_i]]``;
    ``dlogits = (softmax(logits) - onehot(labels)) / N``.

    Parameters
    ----------
    logits : ndarray, shape (N, classes), float
    labels : ndarray of int, shape (N,), values in [0, classes)

    Returns
    -------
    loss : float
        In nats per example.
    dlogits : ndarray, shape (N, classes)

    Raises
    ------
    ValueError
        On mismatched shapes or labels out of range.
    """
    logits = as_float_array("logits", logits, ndim=2)
    labels = np.asarray(labels)
    n, classes = logits.shape
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}"
        )
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must be in [0, {classes}), got [{labels.min()}, {labels.max()}]")
    shifted = logits - logits.max(axis=1, keepdims=True)  # exp cannot overflow
    log_z = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(n)
    loss = float(np.mean(log_z - shifted[rows, labels]))
    dlogits = np.exp(shifted - log_z[:, None])
    dlogits[rows, labels] -= 1.0
    dlogits /= n
    return loss, dlogits


class MLP(Module):
    """A chain of layers; parameters are named ``"<index>.<name>"``.

    Parameters
    ----------
    layers : list
        Objects with ``forward``, ``backward``, ``parameters``, ``grads``,
        ``zero_grad``, ``train``: ``Dense``, ``ReLU``, ``DoRALinear``,
        ``LoRALinear``.
    """

    def __init__(self, layers):
        self.layers = list(layers)

    def forward(self, x):
        """x (N, in) -> logits (N, out)."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, dy):
        """Walk the layers in reverse; returns dL/dx (N, in)."""
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def parameters(self):
        """All trainable arrays, keyed ``"<layer index>.<name>"`` (live references)."""
        return {f"{i}.{name}": p for i, layer in enumerate(self.layers)
                for name, p in layer.parameters().items()}

    def grads(self):
        """The accumulated gradients, keyed as ``parameters()``."""
        return {f"{i}.{name}": g for i, layer in enumerate(self.layers)
                for name, g in layer.grads.items()}

    def zero_grad(self):
        for layer in self.layers:
            layer.zero_grad()

    def train(self, mode=True):
        """Every layer in training mode (``mode=True``) or evaluation mode. Returns self."""
        for layer in self.layers:
            layer.train(mode)
        return self

    def num_trainable(self):
        """The number of trainable scalars."""
        return int(sum(p.size for p in self.parameters().values()))

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"MLP(\n  {inner}\n)"
