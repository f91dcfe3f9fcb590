"""Matching an adapter to base weights: a module's base key, and the rule for
weights stored (in, out) (``fan_in_fan_out``, GPT-2's ``Conv1D``).
"""
from __future__ import annotations

import re

import numpy as np

from ..safetensors_io import BaseWeights
from .config import pattern_key_regex, pattern_matches


def weight_key(name, base_keys):
    """The base tensor key of module ``name``: ``name + ".weight"``.

    If absent, the one key that ends with ``"." + name + ".weight"`` (a
    base saved from an inner model), or whose module path ``name`` ends
    with (an adapter saved on a wrapper), is used.

    Raises
    ------
    KeyError
        If no key, or more than one candidate, matches.
    """
    return base_key(name + ".weight", base_keys, what=f"module {name!r}: base weight")


def base_key(want, base_keys, *, what="tensor"):
    """``want`` if it is a key of the base, else the one key that ends with
    ``"." + want`` or that ``want`` ends with (see ``weight_key``).

    Raises
    ------
    KeyError
        If no key, or more than one candidate, matches.
    """
    if want in base_keys:
        return want
    candidates = [k for k in base_keys if k.endswith("." + want) or want.endswith("." + k)]
    if len(candidates) == 1:
        return candidates[0]
    why = (
        f"candidates {candidates[:5]}"
        if candidates
        else "no such key; a tied weight (e.g. lm_head tied to the input embeddings) is stored "
        "once, under the other module's name: to adapt or replace it alone, untie the base first (store "
        "it as a copy of the other and set tie_word_embeddings false in config.json)"
    )
    raise KeyError(f"{what} {want!r} not found ({why})")


def is_fan_in_fan_out(module, stored_shape, config_fifo, *, key=None):
    """Whether ``module``'s linear view is the *transpose* of its stored base weight.

    * Linear: True if the weight is stored (in, out) (GPT-2 ``Conv1D``). PEFT
      decides by the module type (``Conv1D`` -> True, ``nn.Linear`` -> False,
      overriding the config with a warning). Without the torch module we
      decide by the shapes: a non-square weight of shape (in, out) is
      fan_in_fan_out, of shape (out, in) is not; a square one follows
      ``config_fifo``, which the caller must have *established*
      (``resolve_fan_in_fan_out`` gives the rule); ``None`` raises.
    * Embedding: always True; the view of E (V, D) is E.T (D, V).
    * Convolution: always False; the view is the kernel flattened to
      (out, in * prod(k)).

    Parameters
    ----------
    module : ModuleAdapter
    stored_shape : tuple of int
        The base weight's stored shape.
    config_fifo : bool or None
        The orientation of a square linear weight; None: not known (raises).
    key : str, optional
        The base key, for messages.

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        If the base weight's shape does not fit the adapter's A and B
        (the message gives all three), or is a grouped convolution, or is
        square with ``config_fifo=None``.
    """
    out_f, in_f = module.out_features, module.lora_A.shape[1]
    key = key or module.name + ".weight"
    stored_shape = tuple(stored_shape)
    A, B = module.lora_A.shape, module.lora_B.shape
    if module.kind == "embedding":
        if stored_shape == (in_f, out_f):
            return True
        want = f"(num_embeddings, embedding_dim) = {(in_f, out_f)}"
    elif module.kind == "conv":
        want_shape = (out_f,) + tuple(A[1:])
        if stored_shape == want_shape:
            return False
        if len(stored_shape) == len(want_shape) and stored_shape[1] and in_f % stored_shape[1] == 0:
            raise ValueError(
                f"module {module.name!r}: base kernel {key!r} {stored_shape} has in/groups = "
                f"{stored_shape[1]} for lora_A {A}: grouped convolutions (groups = "
                f"{in_f // stored_shape[1]}) are not supported (PEFT cannot merge them either)"
            )
        want = f"(out, in, *k) = {want_shape}"
    else:
        if len(stored_shape) == 2 and stored_shape == (out_f, in_f) == (in_f, out_f):
            if config_fifo is None:
                raise ValueError(
                    f"module {module.name!r}: base weight {key!r} is square {stored_shape}, so its "
                    f"shape does not tell (out, in) from (in, out); see resolve_fan_in_fan_out"
                )
            return bool(config_fifo)
        if len(stored_shape) == 2:
            if stored_shape == (out_f, in_f):
                return False
            if stored_shape == (in_f, out_f):
                return True
        want = f"(out, in) = {(out_f, in_f)} (or (in, out) = {(in_f, out_f)} with fan_in_fan_out)"
    raise ValueError(
        f"module {module.name!r}: base weight {key!r} has shape {stored_shape}, but lora_A {A} "
        f"and lora_B {B} ({module.kind}) need {want}"
    )


# transformers models with GPT-2's ``Conv1D`` (weight stored (in, out)) and which of
# their modules are Conv1D, as PEFT-style suffix patterns (from transformers'
# modeling files: ``grep "= Conv1D("``). Every other linear module of these, and
# every linear module of any other transformers ``model_type``, is an nn.Linear.
_GPT2_CONV1D = r"(attn|crossattention)\.(c_attn|q_attn|c_proj)|mlp\.(c_fc|c_proj)"
CONV1D_MODULES = {
    "gpt2": _GPT2_CONV1D,
    "openai-gpt": _GPT2_CONV1D,
    "imagegpt": _GPT2_CONV1D,
    "decision_transformer": _GPT2_CONV1D,
    "clvp": r"mlp\.(c_fc|c_proj)",
    "clvp_decoder": r"mlp\.(c_fc|c_proj)",
}


def _suffix_match(pattern, name):
    """PEFT's pattern rule (``get_pattern_key``): ``(.*\\.)?(pattern)$`` matches ``name``."""
    return pattern_matches(pattern, name)


def _fifo_override(fan_in_fan_out):
    """None, or a function module name -> whether it is stored (in, out)."""
    if fan_in_fan_out is None:
        return None
    if isinstance(fan_in_fan_out, (bool, np.bool_)):
        return lambda name: bool(fan_in_fan_out)
    if isinstance(fan_in_fan_out, re.Pattern):
        fan_in_fan_out = fan_in_fan_out.pattern
    if isinstance(fan_in_fan_out, str):
        if fan_in_fan_out == "":
            return lambda name: False
        try:
            pattern_key_regex(fan_in_fan_out)
        except ValueError as e:
            raise ValueError(f"fan_in_fan_out: {e}") from None
        return lambda name: _suffix_match(fan_in_fan_out, name)
    if isinstance(fan_in_fan_out, dict):  # e.g. build_layers' {module: fan_in_fan_out}
        fan_in_fan_out = [n for n, f in fan_in_fan_out.items() if f]
    names = list(fan_in_fan_out)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"fan_in_fan_out must be a bool, a regex or module names, got {fan_in_fan_out!r}")
    return lambda name: any(name == n or name.endswith("." + n) for n in names)


def _model_types(cfg):
    """Every ``model_type`` in a (possibly composite) transformers config dict."""
    found = [cfg["model_type"]] if isinstance(cfg.get("model_type"), str) else []
    for v in cfg.values():
        if isinstance(v, dict):
            found += _model_types(v)
    return found


def _model_evidence(base):
    """(description, Conv1D pattern) from the base's ``config.json``, or None if it tells nothing.

    A config whose ``model_type`` (or a sub-config's, e.g. a GPT-2 decoder) is
    in ``CONV1D_MODULES`` names its Conv1D modules; any other transformers
    ``model_type`` has only nn.Linear (pattern ""). Remote code (``auto_map``)
    and configs without a ``model_type`` tell nothing.
    """
    cfg = getattr(base, "model_config", None)
    if not isinstance(cfg, dict) or cfg.get("auto_map"):
        return None
    types = _model_types(cfg)
    if not types:
        return None
    pattern = "|".join(dict.fromkeys(f"(?:{CONV1D_MODULES[t]})" for t in types if t in CONV1D_MODULES))
    return f"{base.model_config_path} (model_type {'/'.join(dict.fromkeys(types))})", pattern


def _layout(fifo):
    return "(in, out)" if fifo else "(out, in)"


def resolve_fan_in_fan_out(adapter, base, fan_in_fan_out=None):
    """Which modules' base weights are stored (in, out) (GPT-2 ``Conv1D``): the orientation rule.

    PEFT decides per module *type* (``Conv1D``: (in, out); ``nn.Linear``:
    (out, in)) and overwrites the config's ``fan_in_fan_out`` as it goes, so
    an adapter on both types saves the flag of the last module it visited.
    A checkpoint records no types, so for each linear module, in order:

    1. ``fan_in_fan_out`` given: it decides (a bool for every module, or
       module names / a regex of the modules stored (in, out)).
    2. A non-square weight: its shape decides (and must agree with 1 and 3).
    3. The base's ``config.json`` (next to its weights) has a transformers
       ``model_type``: GPT-2-family Conv1D modules (``CONV1D_MODULES``) are
       (in, out), all others (out, in).
    4. Else a square weight follows the adapter's ``fan_in_fan_out`` only if
       the adapter corroborates it: it has non-square linear modules, all
       stored as the flag says, and the module is not named as a GPT-2
       Conv1D (``c_attn``, ``c_proj``, ...) under ``fan_in_fan_out=false``.

    Otherwise nothing establishes the orientation, and a ValueError names
    the square modules and says how to settle them: this never guesses.

    Parameters
    ----------
    adapter : PeftAdapter
    base : BaseWeights or mapping of str to ndarray
    fan_in_fan_out : None, bool, str or iterable of str
        None: the rule above. True/False: every linear module. A str: a regex
        of the modules stored (in, out), matched as PEFT matches
        ``rank_pattern`` keys (``(.*\\.)?(PATTERN)$``; "" matches none). An
        iterable: module paths (or their dotted suffixes) stored (in, out);
        a dict (as ``build_layers`` returns): the modules mapped to True.

    Returns
    -------
    dict of str to bool
        For every module of the adapter whose base weight is present;
        embeddings True (their view is E.T), convolutions False.

    Raises
    ------
    ValueError
        A square module whose orientation is not established; a non-square
        weight stored against what ``fan_in_fan_out`` or ``config.json``
        say; a base shape that does not fit the adapter.
    """
    keys = set(base.keys())
    shape_of = base.shape if isinstance(base, BaseWeights) else (lambda k: np.shape(base[k]))
    override = _fifo_override(fan_in_fan_out)
    model = None
    out, square = {}, []
    for name, mod in adapter.modules.items():
        try:
            key = weight_key(name, keys)
        except KeyError:
            continue  # the callers report it
        shape = tuple(shape_of(key))
        if mod.kind == "linear" and len(shape) == 2 and shape == (mod.out_features, mod.in_features) == shape[::-1]:
            square.append(name)
            continue
        fifo = is_fan_in_fan_out(mod, shape, None, key=key)
        if mod.kind == "linear":
            if override is not None and override(name) != fifo:
                raise ValueError(
                    f"fan_in_fan_out={fan_in_fan_out!r} says module {name!r} is stored {_layout(not fifo)}, "
                    f"but its base weight {key!r} {shape} is {_layout(fifo)} for lora_A "
                    f"{mod.lora_A.shape} and lora_B {mod.lora_B.shape}"
                )
            if override is None:
                model = model or _model_evidence(base) or (None, "")
                says = bool(model[1]) and _suffix_match(model[1], name)
            if override is None and model[0] and says != fifo:
                raise ValueError(
                    f"{model[0]} makes module {name!r} {'a Conv1D' if says else 'an nn.Linear'} stored "
                    f"{_layout(says)}, but its base weight {key!r} {shape} is stored {_layout(fifo)}; "
                    f"pass fan_in_fan_out to say which modules are (in, out)"
                )
        out[name] = fifo
    if not square:
        return out
    if override is None:
        model = model or _model_evidence(base) or (None, "")
    flag = bool(adapter.config.fan_in_fan_out)
    linear = [n for n in out if adapter.modules[n].kind == "linear"]
    against = [n for n in linear if out[n] != flag]
    unresolved = []
    for name in square:
        if override is not None:
            out[name] = override(name)
        elif model[0]:  # a transformers model_type: its Conv1D modules are known
            out[name] = bool(model[1]) and _suffix_match(model[1], name)
        elif linear and not against and (flag or not _suffix_match(_GPT2_CONV1D, name)):
            out[name] = flag
        else:
            unresolved.append(name)
    if unresolved:
        if against:
            why = (f"the adapter's fan_in_fan_out={str(flag).lower()} is contradicted by its non-square "
                   f"module(s) {against[:3]}, stored {_layout(not flag)}, so it targets both nn.Linear "
                   f"and Conv1D modules")  # fmt: skip
        elif linear:
            why = f"{unresolved[:3]} are named as GPT-2 Conv1D modules but the adapter says fan_in_fan_out=false"
        else:
            why = (f"no non-square module corroborates the adapter's fan_in_fan_out="
                   f"{str(flag).lower()} and the base has no config.json with a model_type")  # fmt: skip
        raise ValueError(
            f"cannot tell whether the square base weight(s) of module(s) {unresolved} are stored "
            f"(out, in) (nn.Linear) or (in, out) (GPT-2 Conv1D): {why}. PEFT decides this by each "
            f"module's type, which a checkpoint does not record, and saves fan_in_fan_out as it was for "
            f"the last module it visited. Say which modules are stored (in, out): fan_in_fan_out=<bool, "
            f"module names or regex> (Python), --fan-in-fan-out PATTERN ('' for none) (dora-ref merge), "
            f"or keep the base model's config.json next to its weights"
        )
    return out


def _to_view(W_stored, mod, transposed, dtype, copy=True):
    """The (out, in) linear view of a stored weight, as a contiguous ``dtype`` array.

    ``copy=False`` may return ``W_stored`` itself (for callers that never write to it).
    """
    W = W_stored.reshape(W_stored.shape[0], -1) if mod.kind == "conv" else W_stored
    return np.ascontiguousarray((W.T if transposed else W).astype(dtype, copy=copy))


def _from_view(W, shape, transposed):
    """Back from the linear view to the stored layout (inverse of ``_to_view``)."""
    return np.ascontiguousarray(W.T if transposed else W).reshape(shape)
