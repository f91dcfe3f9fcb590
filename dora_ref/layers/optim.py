"""Optimisers over a mapping of parameters: SGD with momentum, and AdamW.

Both follow PyTorch's update rules (``torch.optim.SGD``, ``torch.optim.AdamW``)
so that a training run can be compared step by step. They update the arrays
of ``params`` in place, which is what a layer's ``parameters()`` hands out.

Low precision: a float16/bfloat16 parameter (a "pure" lp adapter) is
updated in float32: its value and gradient are upcast exactly, the update
(and the optimiser's state, kept in float32) is computed as for a float32
parameter, and the new value is rounded once to the parameter's dtype.

Use::

    params = layer.parameters()            # {"lora_A": ..., "lora_B": ..., ...}
    opt = AdamW(params, lr=1e-3)
    ...
    layer.backward(dy)
    opt.step(layer.grads)
    layer.zero_grad()
"""
from __future__ import annotations

import itertools
import math
import numbers
import operator
from collections.abc import Mapping

import numpy as np

from ..core._validate import check_finite, refuse_array_subclass
from ..core.precision import LOW_PRECISION_DTYPES, round_to
from .base import replacement, run_in_c


def _working_dtype(p):
    """The dtype a parameter's update is computed in: float32 for float16/bfloat16, else its own."""
    return np.dtype(np.float32) if p.dtype in LOW_PRECISION_DTYPES else p.dtype


def _hyperparameter(name, value, low, *, low_inclusive, high=None):
    """``value`` as a float in the range, or ``TypeError``/``ValueError`` naming it.

    NaN, inf, numbers too large for a float and bools are refused: a NaN
    learning rate would turn every parameter into NaN at the first step,
    and the next forward would blame ``lora_A``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    cond = f"{name} {'>=' if low_inclusive else '>'} {low:g}"
    if high is not None:
        cond = f"{low:g} {'<=' if low_inclusive else '<'} {name} < {high:g}"
    ok = math.isfinite(v) and (v >= low if low_inclusive else v > low)
    if high is not None:
        ok = ok and v < high
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:12]}... (a {v:g})"
        raise ValueError(f"{name} must be finite with {cond}, got {name}={shown}")
    return v


def _check_grads(params, grads):
    if not isinstance(grads, Mapping):
        raise TypeError(
            f"grads must be a mapping of name -> array with the keys of params (e.g. "
            f"layer.grads), got {type(grads).__name__}"
        )
    missing = set(params) - set(grads)
    if missing:
        raise ValueError(f"grads is missing {sorted(missing)} (params has {sorted(params)})")
    for name, p in params.items():
        refuse_array_subclass(f"grads[{name!r}]", grads[name])
        if np.shape(grads[name]) != p.shape:
            raise ValueError(
                f"grads[{name!r}] has shape {np.shape(grads[name])}, the parameter {p.shape}"
            )
        g = np.asarray(grads[name])
        if g.dtype.kind not in "fiu" and g.dtype not in LOW_PRECISION_DTYPES:  # complex would lose its imaginary part, bool mean 0/1
            raise TypeError(
                f"grads[{name!r}] must hold real numbers, got dtype {g.dtype} (the parameter "
                f"has dtype {p.dtype})"
            )
        check_finite(f"grads[{name!r}]", g)


def _check_params(params):
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a mapping of name -> array (e.g. layer.parameters()), "
            f"got {type(params).__name__}"
        )
    for name, p in params.items():
        refuse_array_subclass(f"params[{name!r}]", p)
        if not isinstance(p, np.ndarray) or (p.dtype.kind != "f"
                                             and p.dtype not in LOW_PRECISION_DTYPES):
            raise TypeError(f"params[{name!r}] must be a float ndarray, got {type(p).__name__}")
        if not p.flags.writeable:
            raise ValueError(
                f"params[{name!r}] is read-only (a frozen weight, or the adapter of a merged "
                f"layer: unmerge() it first)"
            )
    names = list(params)
    for i, a in enumerate(names):  # a few arrays: the pairs are cheap
        for b in names[i + 1:]:
            if np.may_share_memory(params[a], params[b]):
                raise ValueError(
                    f"params[{a!r}] and params[{b!r}] share memory (the same array, or "
                    f"overlapping views): each step would update it twice; give each "
                    f"parameter once"
                )


def _check_result(new_values):
    """Before a step writes anything: every new parameter and state value must be finite.

    A finite but huge lr or gradient can overflow the update; written, a
    parameter would turn inf and the next forward would blame the layer's
    weights, not the step (an inf in AdamW's v would freeze the parameter
    silently from then on).

    Parameters
    ----------
    new_values : mapping of str to ndarray
        By the name the message should use, e.g. ``params['lora_A']``.
    """
    for label, a in new_values.items():
        if not np.isfinite(a).all():
            raise ValueError(
                f"this step would make {label} non-finite (the update overflowed its dtype "
                f"{a.dtype}: lr or the gradient too large); no parameter was changed"
            )


def _check_writeable(params):
    """Before a step changes anything: every parameter must still be writeable.

    A merged layer makes its adapter read-only (its merged weight was built
    from it, and ``unmerge()`` subtracts exactly those values); checking all
    of them first means a refused step changes no parameter at all.
    """
    for name, p in params.items():
        # a merged layer restored from a pickle with this optimiser holds a copy of p (its
        # restored array can never be made writeable): train the layer's array
        q = None if p.flags.writeable else replacement(p)
        if q is not None:
            params[name] = p = q
        if not p.flags.writeable:
            raise RuntimeError(
                f"params[{name!r}] is read-only: its layer is merged (an optimiser step would "
                f"change the adapter the merged weight was built from, and unmerge() could not "
                f"restore the base weight). unmerge() before training; no parameter was changed"
            )


class _Optimizer:
    """What SGD and AdamW share: every check before any parameter changes."""

    def step(self, grads):
        """Apply one update from ``grads`` (a mapping with the keys of ``params``).

        Raises
        ------
        TypeError
            ``grads`` not a mapping, or a gradient not of real numbers.
        ValueError
            A missing, misshapen or non-finite gradient, or an update that
            would make a parameter non-finite (nothing is changed).
        RuntimeError
            A parameter is read-only: its layer is merged (nothing is changed).
        """
        _check_grads(self.params, grads)
        _check_writeable(self.params)
        self._update(grads)

    def _commit(self, new_params, state):
        """Write ``new_params`` into the parameters in place and install the optimiser's new
        ``state`` (attribute name to value), with no signal handler able to run in between.

        The values were computed and checked before. The ndarray assignments
        and then the ``dict.update`` of the state run by C code alone
        (``base.run_in_c``), so a signal's exception (Ctrl-C, an alarm) comes
        before the step or after it, never inside. Each write is checked first
        to be one that cannot fail and runs no Python code (a plain ndarray of
        the parameter's shape and dtype, writeable), and the state being
        replaced is kept alive until the chain is done (freed inside it, its
        arrays' weakref callbacks would run Python code between two writes).

        Before, the step wrote parameter after parameter in a Python loop: an
        alarm inside it left ``lora_A`` updated, ``lora_B`` not and ``t``
        unchanged; then a rollback of kept copies, itself a Python loop that a
        second alarm could stop (adversarial tests, session 24).
        """
        targets = [self.params[name] for name in new_params]
        values = list(new_params.values())
        for name, p, value in zip(new_params, targets, values):
            if type(p) is not np.ndarray:  # a subclass's own __setitem__ is Python code
                raise TypeError(f"params[{name!r}] is a {type(p).__name__}, not a plain ndarray (one "
                                f"put into the mapping after the optimiser was made?); nothing was changed")
            if p.shape != value.shape or p.dtype != value.dtype or not p.flags.writeable:
                raise RuntimeError(  # the checks before the update make this unreachable
                    f"params[{name!r}] cannot take its update: {p.dtype} {p.shape}, writeable "
                    f"{p.flags.writeable}, against {value.dtype} {value.shape}; nothing was changed")
        previous = [self.__dict__.get(key) for key in state]  # alive through the chain
        run_in_c(map(operator.setitem, targets, itertools.repeat(Ellipsis), values),
                 itertools.starmap(self.__dict__.update, [(state,)]))
        del previous


class SGD(_Optimizer):
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
    TypeError
        If a hyperparameter is not a real number (``nesterov``: not a bool).
    ValueError
        Naming the argument: lr not > 0, momentum or weight_decay not >= 0,
        any of them NaN or infinite, ``nesterov`` without momentum (as
        ``torch.optim.SGD``), or read-only parameters.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        lr = _hyperparameter("lr", lr, 0, low_inclusive=False)
        momentum = _hyperparameter("momentum", momentum, 0, low_inclusive=True)
        weight_decay = _hyperparameter("weight_decay", weight_decay, 0, low_inclusive=True)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0 (as torch.optim.SGD)")
        _check_params(params)
        self.params, self.lr, self.momentum = params, lr, momentum
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self.velocity = {}

    def _update(self, grads):
        """The update rule above, on checked gradients; nothing is written unless all is finite."""
        new_p, new_v = {}, {}
        with np.errstate(over="ignore", invalid="ignore"):  # refused below, naming the parameter
            for name, p in self.params.items():
                work = _working_dtype(p)
                d = np.asarray(grads[name], dtype=work)
                p = p.astype(work, copy=False)
                if self.weight_decay:
                    d = d + self.weight_decay * p
                if self.momentum:
                    v = self.velocity.get(name)
                    v = d.copy() if v is None else self.momentum * v + d
                    new_v[name] = v
                    d = d + self.momentum * v if self.nesterov else v
                new_p[name] = round_to(p - self.lr * d, self.params[name].dtype)
        _check_result({**{f"params[{k!r}]": a for k, a in new_p.items()},
                       **{f"the velocity of params[{k!r}]": a for k, a in new_v.items()}})
        self._commit(new_p, {"velocity": {**self.velocity, **new_v}})


class AdamW(_Optimizer):
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
    TypeError
        If a hyperparameter is not a real number, or betas not a pair.
    ValueError
        Naming the argument: lr or eps not > 0, weight_decay not >= 0, a beta
        outside [0, 1), any of them NaN or infinite; or read-only parameters.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        lr = _hyperparameter("lr", lr, 0, low_inclusive=False)
        eps = _hyperparameter("eps", eps, 0, low_inclusive=False)
        weight_decay = _hyperparameter("weight_decay", weight_decay, 0, low_inclusive=True)
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        betas = tuple(
            _hyperparameter(f"betas[{i}]", b, 0, low_inclusive=True, high=1) for i, b in enumerate(betas)
        )
        _check_params(params)
        self.params, self.lr, self.betas = params, lr, betas
        self.eps, self.weight_decay = eps, weight_decay
        self.t = 0
        self.m = {k: np.zeros(p.shape, _working_dtype(p)) for k, p in params.items()}
        self.v = {k: np.zeros(p.shape, _working_dtype(p)) for k, p in params.items()}

    def _update(self, grads):
        """The update rule above, on checked gradients."""
        t = self.t + 1
        beta1, beta2 = self.betas
        bias1 = 1.0 - beta1**t
        bias2 = 1.0 - beta2**t
        new = {}
        with np.errstate(over="ignore", invalid="ignore"):  # refused below, naming the parameter
            for name, p in self.params.items():
                work = _working_dtype(p)
                d = np.asarray(grads[name], dtype=work)
                p = p.astype(work, copy=False) * (1.0 - self.lr * self.weight_decay)
                m = self.m[name] * beta1
                m += (1.0 - beta1) * d
                v = self.v[name] * beta2
                v += (1.0 - beta2) * d * d
                p -= (self.lr / bias1) * m / (np.sqrt(v) / np.sqrt(bias2) + self.eps)
                new[name] = round_to(p, self.params[name].dtype), m, v
        _check_result({f"{what}[{k!r}]": a for k, arrays in new.items()
                       for what, a in zip(("params", "AdamW's m of params", "AdamW's v of params"),
                                          arrays)})
        self._commit({name: arrays[0] for name, arrays in new.items()},
                     {"m": {**self.m, **{name: arrays[1] for name, arrays in new.items()}},
                      "v": {**self.v, **{name: arrays[2] for name, arrays in new.items()}},
                      "t": t})
