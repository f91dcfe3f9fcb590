"""Several adapters on one layer (``chain_forward``) and adapters merged into
base weights (``merge_weight``, ``merge_state_dict``), in PEFT 0.21's order.
"""
from __future__ import annotations

import os

import numpy as np

from ...core import functional as F
from ...core._validate import check_input
from ..safetensors_io import BaseWeights
from .adapter import (ModuleAdapter, PeftAdapter, _compute_dtype, check_saved_bases, load_adapter,
                      tied_pair_module)
from .orientation import _from_view, _to_view, base_key, resolve_fan_in_fan_out, weight_key


def _chain_checks(W0, modules):
    for mod in modules:
        if W0.shape != (mod.out_features, mod.in_features):
            raise ValueError(
                f"module {mod.name!r}: weight (out, in) {W0.shape} does not match lora_A "
                f"{mod.lora_A.shape} and lora_B {mod.lora_B.shape}"
            )


def _as(mod, dtype):
    cast = lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return tuple(cast(a) for a in mod.linear_view())


def chain_forward(x, W0, bias, modules):
    """Several (Do)LoRA adapters active on one linear layer, PEFT 0.21 (eval).

    PEFT's ``Linear.forward`` loop feeds the running result into each
    adapter; a DoRA adapter rescales everything before it (docs/peft_dora.md,
    Sec. 1 "Several DoRA adapters")::

        y <- x @ W0.T
        for each adapter i:  DoRA: y <- g_i * (y + s_i (x @ A_i.T) @ B_i.T)
                             LoRA: y <- y + s_i (x @ A_i.T) @ B_i.T
        y <- y + b0,         g_i = m_i / ||W0 + s_i B_i A_i||_row  (bare W0)

    With one DoRA adapter this is ``dora_forward`` (eval).

    Parameters
    ----------
    x : ndarray, shape (..., in), float32 or float64
    W0 : ndarray, shape (out, in), the dtype of x
    bias : ndarray, shape (out,), or None
    modules : sequence of ModuleAdapter
        In PEFT's active-adapter order.

    Returns
    -------
    y : ndarray, shape (..., out)

    Raises
    ------
    ValueError, TypeError
        On mismatched shapes or dtypes, or a zero row norm.
    """
    W0 = np.asarray(W0)
    if any(mod.kind != "linear" for mod in modules):
        raise ValueError("chain_forward takes linear modules; merge embeddings and convolutions")
    _chain_checks(W0, modules)
    x2 = check_input(x, W0.shape[1], W0.dtype)
    y = x2 @ W0.T
    for mod in modules:
        A, B, m = _as(mod, W0.dtype)
        low_rank = mod.scaling * ((x2 @ A.T) @ B.T)
        if m is None:
            y = y + low_rank
        else:
            n = F.column_norm(W0, A, B, mod.scaling, allow_zero_norm=False)
            y = (m / n) * (y + low_rank)
    if bias is not None:
        y = y + bias
    return y.reshape(*np.shape(x)[:-1], W0.shape[0])


def merge_weight(W_stored, modules, *, fan_in_fan_out=False, allow_zero_norm=False):
    """Merge (Do)LoRA adapters into one base weight, as PEFT 0.21 ``merge``.

    Computes in float32 (float64 for a float64 base) and returns the stored
    layout and dtype. One DoRA adapter: ``W' = diag(m / n)(W0 + s B A)``
    (``dora_ref.core.functional.merge``). Several: each in order,
    ``W <- diag(m_i / n_i)(W + s_i B_i A_i)`` for DoRA and ``W <- W + s_i B_i A_i``
    for LoRA, with n_i from the bare base (docs/peft_dora.md, Sec. 3; PEFT PR #3609).
    The bias is never changed.

    Embeddings and convolutions merge the same way on their linear views
    (E.T, and the kernel flattened to (out, in * prod(k))), as PEFT's
    ``DoraEmbeddingVariant``/``_DoraConvNdVariant.merge_safe`` do.

    Rounding: a float16/bfloat16 result is the float32 result rounded once
    to the nearest representable value, ties to even (IEEE 754's default,
    what ``torch.Tensor.to`` does); there is no intermediate rounding.

    Parameters
    ----------
    W_stored : ndarray
        Shape (out, in), or (in, out) if fan_in_fan_out; (V, D) for an
        embedding; (out, in, *k) for a convolution. float16, bfloat16,
        float32 or float64.
    modules : sequence of ModuleAdapter
        All of one kind.
    fan_in_fan_out : bool
        Whether the linear view is the transpose (``is_fan_in_fan_out``).
    allow_zero_norm : bool, default False
        A zero row norm raises (PEFT's safe_merge raises; its unsafe merge
        writes NaN); if True that row merges to zeros.

    Returns
    -------
    ndarray, the shape and dtype of ``W_stored``

    Raises
    ------
    TypeError
        W_stored not of a float dtype, ``fan_in_fan_out`` not a bool, or
        ``modules`` not a non-empty sequence of ``ModuleAdapter``.
    ValueError
        Mismatched shapes; a zero row norm (naming the module); or a merged
        weight that is not finite in the stored dtype (as PEFT's
        ``safe_merge``, which checks for NaN/inf): the message names the
        module, the rows (output channels) and the cause (a row norm so
        small that m / n overflows, values beyond the dtype's range, NaN or
        inf in the base or the adapter).
    """
    W_stored = np.asarray(W_stored)
    W = merge_view(W_stored, modules, fan_in_fan_out=fan_in_fan_out, allow_zero_norm=allow_zero_norm)
    out = _from_view(W, W_stored.shape, fan_in_fan_out)
    if out.dtype != W_stored.dtype:
        with np.errstate(over="ignore"):  # a value beyond the dtype's range: refused just below
            out = out.astype(W_stored.dtype)
    bad = ~np.isfinite(out)
    if bad.any():
        bad_rows = _from_view_rows(bad, fan_in_fan_out)
        raise non_finite_error(W_stored, modules, fan_in_fan_out, bad_rows, W, out.dtype)
    return out


def _check_merge_args(W_stored, modules, fan_in_fan_out):
    """The stored weight as an ndarray, after the checks ``merge_weight`` documents.

    An integer or bool weight would take the merged values truncated (a
    quantised weight is not a weight to merge into; dequantise it first), a
    string ``fan_in_fan_out`` such as ``"false"`` is true, and an empty
    ``modules`` has no adapter to merge: each raises, naming the argument.
    """
    W_stored = np.asarray(W_stored)
    if W_stored.dtype.kind != "f" and W_stored.dtype.name != "bfloat16":
        raise TypeError(
            f"W_stored must be a float16, bfloat16, float32 or float64 array, got dtype "
            f"{W_stored.dtype} (shape {W_stored.shape}): the merged weight would be cast to it"
        )
    if not isinstance(fan_in_fan_out, (bool, np.bool_)):
        raise TypeError(f"fan_in_fan_out must be True or False, got {fan_in_fan_out!r}")
    if isinstance(modules, ModuleAdapter) or not hasattr(modules, "__len__") or len(modules) == 0 or \
            not all(isinstance(m, ModuleAdapter) for m in modules):
        raise TypeError(
            f"modules must be a non-empty sequence of ModuleAdapter (adapter.modules[name], "
            f"in the order to merge), got {modules!r:.80}"
        )
    return W_stored


def merge_view(W_stored, modules, *, fan_in_fan_out=False, allow_zero_norm=False):
    """The merged weight on its (out, in) linear view, in the compute dtype (float32 or float64).

    The arithmetic of ``merge_weight`` without the cast back to the stored
    dtype and without its finiteness check (``dora-ref merge`` rounds and
    checks the bits itself). Same parameters; returns shape (out, in').
    """
    W_stored = _check_merge_args(W_stored, modules, fan_in_fan_out)
    if len({mod.kind for mod in modules}) > 1:
        raise ValueError(f"modules of different kinds on one weight: {[m.kind for m in modules]}")
    cdt = _compute_dtype(W_stored.dtype)
    W0 = _to_view(W_stored, modules[0], fan_in_fan_out, cdt, copy=False)  # read only
    _chain_checks(W0, modules)
    W = W0
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are refused by the callers
        for mod in modules:
            A, B, m = _as(mod, cdt)
            try:
                if m is None:
                    W = W + mod.scaling * (B @ A)
                elif W is W0:
                    W, _ = F.merge(W0, A, B, m, mod.scaling, allow_zero_norm=allow_zero_norm)
                else:
                    n = F.column_norm(W0, A, B, mod.scaling, allow_zero_norm=allow_zero_norm)
                    g = np.zeros_like(n)
                    np.divide(m, n, out=g, where=n != 0)
                    W = g[:, None] * (W + mod.scaling * (B @ A))
            except F.NonFiniteWeightError as e:  # diagnosed row by row, as merge_weight does
                raise non_finite_error(W_stored, modules, fan_in_fan_out, e.rows) from None
            except ValueError as e:
                raise ValueError(f"module {mod.name!r}: {e}") from None
    return W


def finite_max(dtype):
    """The largest finite value of a float dtype (bfloat16 and float8 through ``ml_dtypes``)."""
    dtype = np.dtype(dtype)
    if dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).max)
    return float(np.finfo(dtype).max)


def cast_replacement(arr, dtype, key):
    """A ``modules_to_save`` tensor cast to the base dtype; ValueError if a value is not finite there."""
    with np.errstate(over="ignore"):
        out = np.asarray(arr).astype(dtype)
    if np.dtype(dtype).kind in "fV" and not np.isfinite(out).all():
        src = np.asarray(arr)
        why = ("the adapter's tensor holds NaN or inf" if not np.isfinite(src.astype(np.float64)).all() else
               f"values up to {np.abs(src.astype(np.float64)).max():.4g} are beyond {np.dtype(dtype).name}'s "
               f"largest finite value {finite_max(dtype):.4g}")  # fmt: skip
        raise ValueError(f"modules_to_save tensor {key!r} is not finite in the base dtype: {why}")
    return out


def _from_view_rows(bad, fan_in_fan_out):
    """Output channels (rows of the linear view) with a True in ``bad`` (the stored layout)."""
    if fan_in_fan_out:
        return np.flatnonzero(bad.any(axis=0))
    return np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))


def non_finite_error(W_stored, modules, fan_in_fan_out, rows, W=None, dtype=None):
    """The ValueError for a merged weight that is not finite in ``rows``: says why, row by row.

    Causes, checked in this order for each row: NaN/inf in the base weight's
    row; NaN/inf in an adapter (its lora_A, or the row's lora_B or
    magnitude); a DoRA magnitude m and row norm n whose quotient m / n
    overflows the compute dtype (the message names n where |m| <= 1, else the
    magnitude); W0 + s B A itself overflowing it; merged values beyond the stored
    dtype's largest finite value (float16 65504, bfloat16 3.39e38). The
    diagnosis recomputes the rows in float64.

    Parameters
    ----------
    W_stored : ndarray, the base weight as stored
    modules : sequence of ModuleAdapter
    fan_in_fan_out : bool
    rows : sequence of int
        Output channels whose merged values are not finite.
    W : ndarray, optional
        The merged linear view in the compute dtype (to tell the range case).
    dtype : numpy dtype, optional
        The stored dtype (default ``W_stored.dtype``).

    Returns
    -------
    ValueError
    """
    dtype = np.dtype(W_stored.dtype if dtype is None else dtype)
    cdt = _compute_dtype(W_stored.dtype)
    rows = [int(i) for i in rows]
    view = W_stored.reshape(W_stored.shape[0], -1) if modules[0].kind == "conv" else W_stored
    view = view.T if fan_in_fan_out else view
    causes = {}  # why -> (rows, the extreme value of each row, how to show it)
    big = float(np.finfo(cdt).max)
    for i in rows[:64]:  # the first 64 are diagnosed
        W0 = np.asarray(view[i], dtype=np.float64)
        why, value, show = None, None, ""
        if not np.isfinite(W0).all():
            why = "the base weight's row holds NaN or inf"
        for mod in modules if why is None else ():
            A, B, m = mod.linear_view()
            if not (np.isfinite(A).all() and np.isfinite(B[i]).all() and (m is None or np.isfinite(m[i]))):
                why = f"adapter module {mod.name!r} holds NaN or inf (lora_A, or this row of lora_B or magnitude)"
                break
            V = W0 + mod.scaling * (B[i].astype(np.float64) @ A.astype(np.float64))
            if np.abs(V).max() > big:
                why, value, show = f"W0 + s*B@A overflows {cdt.name}", np.abs(V).max(), "max |W0 + s*B@A|"
                break
            n = float(np.sqrt(np.sum(V * V)))
            if m is not None and n > 0 and abs(float(m[i])) / n > big:
                # which of the two to name (a magnitude of 3e38 was blamed on its row norm
                # 0.34: an adversary, session 23); m / n > max needs n < 1 here, m being finite
                if abs(float(m[i])) <= 1.0:
                    why = f"the row norm n = ||W0 + s*B@A|| is so small that m / n overflows {cdt.name}"
                    value, show = n, "smallest n"
                else:
                    why = (f"the magnitude m is so large, against its row norm n = ||W0 + s*B@A|| "
                           f"below 1, that m / n overflows {cdt.name}")
                    value, show = abs(float(m[i])) / n, "largest |m| / n"
                break
        if why is None and W is not None and dtype != cdt and np.isfinite(W[i]).all():
            why = f"merged values beyond {dtype.name}'s largest finite value {finite_max(dtype):.4g}"
            value, show = float(np.abs(W[i]).max()), "largest"
        if why is None:
            why = f"an intermediate product overflowed {cdt.name}"
        entry = causes.setdefault(why, ([], [], show))
        entry[0].append(i)
        if value is not None:
            entry[1].append(value)
    parts = []
    for why, (r, values, show) in causes.items():
        extreme = ""
        if values:
            extreme = f" ({show} {min(values) if show.startswith('smallest') else max(values):.4g})"
        parts.append(f"rows {r[:8]}{' ...' if len(r) > 8 else ''}: {why}{extreme}")
    detail = "; ".join(parts)
    if len(rows) > 64:
        detail += f" (the first 64 rows diagnosed; all: {rows[:20]} ...)"
    out = W_stored.shape[1] if fan_in_fan_out else W_stored.shape[0]
    names = ", ".join(dict.fromkeys(repr(m.name) for m in modules))
    return ValueError(
        f"module {names}: the merged weight is not finite in {len(rows)} of {out} rows (output channels); "
        f"{detail}. Refused, as PEFT's safe_merge refuses it"
    )


def merge_state_dict(base, adapters, *, allow_zero_norm=False, fan_in_fan_out=None):
    """Merged copies of the adapted weights, keyed as the base (in memory).

    For whole checkpoints on disk use ``dora-ref merge`` (``merge_cli``),
    which streams tensor by tensor.

    Parameters
    ----------
    base : mapping of str to ndarray, or str or os.PathLike
    adapters : sequence of PeftAdapter (or adapter directories)
        Applied in order (PEFT's active-adapter order).
    allow_zero_norm : bool, default False
    fan_in_fan_out : None, bool, str or iterable of str
        Which base weights are stored (in, out); see ``resolve_fan_in_fan_out``.

    Returns
    -------
    dict of str to ndarray
        Only the changed tensors, in the base dtypes and layouts: merged
        ``<module>.weight`` tensors, and the adapters' ``modules_to_save``
        tensors (cast to the base dtype). All other tensors are unchanged.

    Raises
    ------
    TypeError
        ``base`` not a mapping or path, ``adapters`` a single adapter.
    KeyError, ValueError
        As ``plan_merge`` and ``merge_weight``: a merged weight or a
        ``modules_to_save`` tensor that is not finite in the base dtype is
        refused (naming the module, the rows and the cause) and nothing is
        returned.
    """
    if not isinstance(base, BaseWeights) and isinstance(base, (str, os.PathLike)):
        base = BaseWeights(base)
    if not isinstance(base, BaseWeights) and not hasattr(base, "keys"):
        raise TypeError(
            f"base must be a mapping of key -> array, a BaseWeights, or a path, "
            f"got {type(base).__name__}"
        )
    if isinstance(adapters, (PeftAdapter, str, os.PathLike)):
        raise TypeError(
            f"adapters must be a sequence of adapters (PeftAdapter or directories), in the "
            f"order to merge; got one {type(adapters).__name__}: pass [it]"
        )
    adapters = [a if isinstance(a, PeftAdapter) else load_adapter(a) for a in adapters]
    get = base.get if isinstance(base, BaseWeights) else (lambda k: np.asarray(base[k]))
    out = {
        key: merge_weight(get(key), mods, fan_in_fan_out=fifo, allow_zero_norm=allow_zero_norm)
        for key, (mods, fifo) in plan_merge(base, adapters, fan_in_fan_out=fan_in_fan_out).items()
    }
    for key, arr in plan_replacements(base, adapters).items():
        dtype = base.dtype(key) if isinstance(base, BaseWeights) else np.asarray(base[key]).dtype
        out[key] = cast_replacement(arr, dtype, key)
    return out


def plan_replacements(base, adapters):
    """The base tensors that adapters' ``modules_to_save`` replace, by base key (no data read).

    Parameters
    ----------
    base : BaseWeights or mapping of str to ndarray
    adapters : sequence of PeftAdapter

    Returns
    -------
    dict of str to ndarray
        Base key -> the adapter's tensor, as stored in the adapter.

    Raises
    ------
    KeyError, ValueError
        A tensor with no base counterpart, of another shape, or replaced by
        two adapters, or also adapted by LoRA; one of a tied input embedding
        and output head, which a merged checkpoint cannot give PEFT's
        model for (``_refuse_tied_replacement``).
    """
    keys = set(base.keys())
    lora_keys = {weight_key(name, keys) for a in adapters for name in a.modules}
    out = {}
    for adapter in adapters:
        for name, arr in adapter.replaced.items():
            key = base_key(name, keys, what="modules_to_save tensor")
            shape = base.shape(key) if isinstance(base, BaseWeights) else np.shape(base[key])
            if tuple(shape) != arr.shape:
                raise ValueError(
                    f"modules_to_save tensor {name!r} has shape {arr.shape}, the base's {key!r} {tuple(shape)}"
                )
            if key in out or key in lora_keys:
                raise ValueError(f"{key!r} is replaced by two adapters, or also adapted by LoRA")
            _refuse_tied_replacement(base, adapter, name, key, arr.shape)
            out[key] = arr
        _refuse_missing_replacement(keys, adapter)
        # ensure_weight_tying: PEFT's head is the embedding's trained copy. A base that stores its head
        # apart gets the copy written there too (a loader that does not tie two stored tensors again
        # would keep the base's head); one that stores it once keeps the tie
        for name, arr in adapter.tied_heads.items():
            try:
                key = base_key(name, keys, what="tied head")
            except KeyError as e:
                if "no such key" in str(e):  # stored once: the tie is kept
                    continue
                raise
            if key in out or key in lora_keys:
                raise ValueError(f"{key!r} is replaced by two adapters, or also adapted by LoRA")
            out[key] = arr
    return out


def _refuse_missing_replacement(keys, adapter):
    """Refuse an adapter whose ``modules_to_save`` names a module of the base that it holds no
    tensor of: PEFT wraps that module and its load fails (KeyError); dora_ref merged the rest and
    kept the base's module, silently (an adversary, session 23). A name no module of the base
    has is skipped, as PEFT skips it: its configs for sequence classifiers name "classifier" and
    "score" whatever the model has."""
    for kept in adapter.config.extra.get("modules_to_save") or ():
        if not isinstance(kept, str):
            continue

        def named(module):
            return module == kept or module.endswith("." + kept)

        in_base = sorted({k.rpartition(".")[0] for k in keys if named(k.rpartition(".")[0])})
        if in_base and not any(named(name.rpartition(".")[0]) for name in adapter.replaced):
            raise ValueError(
                f"the adapter's modules_to_save names {kept!r} (the base's {in_base[0]!r}"
                f"{f' and {len(in_base) - 1} more' if len(in_base) > 1 else ''}) but the adapter holds "
                f"no tensor of it: PEFT refuses such an adapter (a KeyError as it loads); it is "
                f"incomplete, or its config was edited")


def _config_field(cfg, name):
    """``cfg[name]``, or the same field of a nested ``text_config`` (multimodal configs), or None."""
    if name in cfg:
        return cfg[name]
    inner = cfg.get("text_config")
    return inner.get(name) if isinstance(inner, dict) else None


def _refuse_tied_replacement(base, adapter, name, key, shape):
    """Refuse a ``modules_to_save`` tensor that replaces one of a tied pair
    (the input embedding and the output head tied to it).

    PEFT trains a copy of such a module (``ModulesToSaveWrapper``) and leaves
    the other one of the pair as the base has it, so in PEFT's model and in
    its ``merge_and_unload()`` the head keeps the base's embedding. A merged
    checkpoint that keeps the tie loads both as the trained copy: a
    different model, with nothing to show it (found by session 17's
    adversary: logits off by 0.32 at a scale of 0.70). The pair is
    recognised by its module's name (``adapter.TIED_PAIR_NAMES``: a
    classifier is not tied), a 2-D shape and, with a ``config.json``,
    ``vocab_size`` rows. Tied: ``tie_word_embeddings`` true in the config;
    unset (whose default differs by model: True for GPT-2, False for Llama),
    tied unless the base stores the other one of the pair as its own tensor
    of the same shape. Without a ``config.json`` (a bare safetensors file)
    the same rule cannot be read, so a pair member the base does not store
    twice is refused as undecidable. A base given as a mapping (no config)
    is not checked. An ``ensure_weight_tying`` adapter with the head's copy
    (PEFT found the tie and keeps it) is not refused, unless the config
    unties what it keeps tied; without the copy (PEFT found no tie and
    unties) the rule above applies.
    """
    if tied_pair_module(key) is None or len(shape) != 2 or not isinstance(base, BaseWeights):
        return
    cfg = base.model_config if isinstance(base.model_config, dict) else None
    tied = _config_field(cfg, "tie_word_embeddings") if cfg is not None else None
    # ensure_weight_tying where PEFT found the tie (it then saves the head's copy): PEFT keeps it. Where
    # it did not (no copy; PEFT warns "no tied modules are added"), its merged model unties: the rule below
    if adapter.config.extra.get("ensure_weight_tying") is True and adapter.tied_heads:
        if tied is False:
            raise ValueError(
                f"the adapter keeps {sorted(adapter.tied_heads)} tied to {name!r} (ensure_weight_tying), "
                "but the base's config.json says tie_word_embeddings: false: not the base it was trained on?"
            )
        return
    if tied is False:
        return
    vocab = _config_field(cfg, "vocab_size") if cfg is not None else None
    if isinstance(vocab, int) and shape[0] != vocab:
        return
    partner = [k for k in base.keys() if k != key and tied_pair_module(k) and tuple(base.shape(k)) == tuple(shape)]
    if tied is None and partner:  # both stored: untied (unless the config says otherwise)
        return
    untie = ("or untie the base first: store its output head's weight (a causal LM's lm_head.weight; for "
             "T5, also the encoder's and decoder's embed_tokens.weight) as a copy of the base's embedding and "
             "set \"tie_word_embeddings\": false in its config.json; this merge then gives the model of "
             "PEFT's merge_and_unload()")
    if cfg is None:
        raise ValueError(
            f"modules_to_save tensor {name!r} replaces {key!r}, shape {tuple(shape)}: an input embedding or an "
            "output head, which a model may tie to the other, and with no config.json beside the base's "
            "weights there is no telling whether this one does (PEFT keeps the other one of a tied pair as "
            "the base has it; a merged checkpoint that keeps the tie would load both as the trained copy). "
            f"Merge from the base model's directory, with its config.json, {untie}."
        )
    said = ("says tie_word_embeddings: true" if tied is True else
            f"does not set tie_word_embeddings and the base stores no other tensor of shape {tuple(shape)} "
            "(tied, as for GPT-2)")
    raise ValueError(
        f"modules_to_save tensor {name!r} replaces {key!r}, shape {tuple(shape)} (the input embedding, or an "
        f"output head tied to it), and the base's config.json {said}. PEFT trains a copy of that module and "
        "leaves the other one of the tied pair as the base has it, but a merged checkpoint with tied weights "
        f"would load both as the trained copy: a different model. Merge with PEFT (merge_and_unload), {untie}. "
        "(Set tie_word_embeddings false alone only if the model has no output head tied to this embedding.)"
    )


def plan_merge(base, adapters, *, fan_in_fan_out=None):
    """Match each adapter's modules to base weight keys, checking shapes (no data read).

    Parameters
    ----------
    base : BaseWeights or mapping of str to ndarray
    adapters : sequence of PeftAdapter or adapter directories
    fan_in_fan_out : None, bool, str or iterable of str
        Which base weights are stored (in, out); see ``resolve_fan_in_fan_out``.

    Returns
    -------
    dict of str to (list of ModuleAdapter, bool)
        Base weight key -> the modules merged into it, in adapter order, and
        whether it is stored fan_in_fan_out.

    Raises
    ------
    KeyError, ValueError
        A module whose base weight is missing or of the wrong shape, or a
        square weight whose orientation is not established.
    """
    adapters = [a if isinstance(a, PeftAdapter) else load_adapter(a) for a in adapters]
    keys = set(base.keys())
    plan = {}
    for adapter in adapters:
        for name in adapter.modules:
            weight_key(name, keys)  # a missing module: KeyError first
        check_saved_bases(adapter, base)
        orientation = resolve_fan_in_fan_out(adapter, base, fan_in_fan_out)
        for name, mod in adapter.modules.items():
            key = weight_key(name, keys)
            fifo = orientation[name]
            mods, prev = plan.setdefault(key, ([], fifo))
            if prev != fifo:  # only possible for a square weight with differing evidence
                raise ValueError(
                    f"{key}: the adapters disagree on whether it is stored (in, out) (fan_in_fan_out); "
                    f"pass fan_in_fan_out to say"
                )
            mods.append(mod)
    return plan
