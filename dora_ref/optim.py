"""Optimisers over a mapping of parameters: SGD with momentum, and AdamW.

Both follow PyTorch's update rules (``torch.optim.SGD``, ``torch.optim.AdamW``)
so that a training run can be compared step by step. They update the arrays
of ``params`` in place, which is what a layer's ``parameters()`` hands out.

Use::

    params = layer.parameters()            # {"lora_A": ..., "lora_B": ..., ...}
    opt = AdamW(params, lr=1e-3)
    ...
    layer.backward(dy)
    opt.step(layer.grads)
    layer.zero_grad()
"""
from __future__ import annotations

import numpy as np


def _check_grads(params, grads):
    missing = set(params) - set(grads)
    if missing:
        raise ValueError(f"grads is missing {sorted(missing)} (params has {sorted(params)})")
    for name, p in params.items():
        if np.shape(grads[name]) != p.shape:
            raise ValueError(
                f"grads[{name!r}] has shape {np.shape(grads[name])}, the parameter {p.shape}"
            )


def _check_params(params):
    for name, p in params.items():
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            raise TypeError(f"params[{name!r}] must be a float ndarray, got {type(p).__name__}")
        if not p.flags.writeable:
            raise ValueError(f"params[{name!r}] is read-only (a frozen weight?)")


class SGD:
    """Stochastic gradient descent with momentum (PyTorch's rule, no dampening).

    ``v <- momentum * v + (grad + weight_decay * p)``, ``p <- p - lr * v``
    (``v`` starts as the first gradient; with ``nesterov``,
    ``p <- p - lr * (grad + momentum * v)``).

    Parameters
    ----------
    params : mapping of str to ndarray
        Arrays updated in place.
    lr : float
        Learning rate, > 0.
    momentum : float, default 0
    weight_decay : float, default 0
        L2 penalty added to the gradient (coupled, as in torch.optim.SGD).
    nesterov : bool, default False

    Raises
    ------
    ValueError
        On a negative learning rate or momentum, or read-only parameters.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"need lr > 0, momentum >= 0, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}"
            )
        _check_params(params)
        self.params, self.lr, self.momentum = params, lr, momentum
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self.velocity = {}

    def step(self, grads):
        """Apply one update from ``grads`` (a mapping with the keys of ``params``)."""
        _check_grads(self.params, grads)
        for name, p in self.params.items():
            d = np.asarray(grads[name], dtype=p.dtype)
            if self.weight_decay:
                d = d + self.weight_decay * p
            if self.momentum:
                v = self.velocity.get(name)
                v = d.copy() if v is None else self.momentum * v + d
                self.velocity[name] = v
                d = d + self.momentum * v if self.nesterov else v
            p -= self.lr * d


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), PyTorch's rule.

    At step t, for each parameter p with gradient d::

        p <- p * (1 - lr * weight_decay)
        m <- beta1 * m + (1 - beta1) * d
        v <- beta2 * v + (1 - beta2) * d**2
        p <- p - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    Parameters
    ----------
    params : mapping of str to ndarray
        Arrays updated in place.
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0.01 (torch's default)

    Raises
    ------
    ValueError
        On out-of-range hyperparameters or read-only parameters.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"bad AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        _check_params(params)
        self.params, self.lr, self.betas = params, lr, betas
        self.eps, self.weight_decay = eps, weight_decay
        self.t = 0
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}

    def step(self, grads):
        """Apply one update from ``grads`` (a mapping with the keys of ``params``)."""
        _check_grads(self.params, grads)
        self.t += 1
        beta1, beta2 = self.betas
        bias1 = 1.0 - beta1**self.t
        bias2 = 1.0 - beta2**self.t
        for name, p in self.params.items():
            d = np.asarray(grads[name], dtype=p.dtype)
            m, v = self.m[name], self.v[name]
            p *= 1.0 - self.lr * self.weight_decay
            m *= beta1
            m += (1.0 - beta1) * d
            v *= beta2
            v += (1.0 - beta2) * d * d
            p -= (self.lr / bias1) * m / (np.sqrt(v) / np.sqrt(bias2) + self.eps)
