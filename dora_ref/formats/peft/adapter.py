"""PEFT adapter folders: read (``load_adapter``), written (``save_adapter``,
``adapter_from_layers``), and turned into layers (``build_layers``).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..safetensors_io import BaseWeights, SafetensorsFile, _refuse_pickle
from .config import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_MODULE_PATH, PATTERN_TIME_BUDGET, PEFT_PREFIX,
                     LoraAdapterConfig, _show, bounded_regex, read_config)
from .orientation import _to_view, is_fan_in_fan_out, resolve_fan_in_fan_out, weight_key


@dataclass


class ModuleAdapter:
    """One adapted linear module.

    Attributes
    ----------
    name : str
        Module path in the base model; its base weight is ``name + ".weight"``.
    lora_A : ndarray, shape (r, in), or (r, in, *k) for a convolution
        (``lora_embedding_A`` (r, V) for an embedding: in = V).
    lora_B : ndarray, shape (out, r), or (out, r, 1, ...) for a convolution
        (``lora_embedding_B`` (D, r) for an embedding: out = D).
    magnitude : ndarray, shape (out,), or None for plain LoRA
        Flattened: PEFT stores a convolution's as (1, out, 1, ...).
    scaling : float
    r : int
    lora_alpha : float
    kind : {"linear", "embedding", "conv"}
    """

    name: str
    lora_A: np.ndarray
    lora_B: np.ndarray
    magnitude: Optional[np.ndarray]
    scaling: float
    r: int
    lora_alpha: float
    kind: str = "linear"

    @property
    def out_features(self):
        return self.lora_B.shape[0]

    @property
    def in_features(self):
        """Columns of the linear view: in, V, or in * prod(kernel)."""
        return int(np.prod(self.lora_A.shape[1:]))

    def linear_view(self):
        """(A (r, in), B (out, r), magnitude (out,) or None): the adapter on its linear view."""
        return (self.lora_A.reshape(self.r, -1), self.lora_B.reshape(self.out_features, self.r),
                self.magnitude)  # fmt: skip


@dataclass


class PeftAdapter:
    """A PEFT (Do)LoRA adapter: its config and its modules by path.

    Attributes
    ----------
    config : LoraAdapterConfig
    modules : dict of str to ModuleAdapter
    replaced : dict of str to ndarray
        Full tensors of the config's ``modules_to_save`` (e.g. a
        classification head trained in full), by their key in the base model
        (``score.weight``): merging *replaces* the base tensors with them.
    saved_base : dict of str to ndarray
        Copies of adapted modules' base weights that PEFT saved with the
        adapter (``<module>.base_layer.weight``: an adapted embedding, or
        ``lm_head``, under PEFT's default ``save_embedding_layers="auto"``),
        by module path. PEFT loads such a copy over the base model's own
        weight; dora_ref checks that it is the base's (``check_saved_bases``).
    tied_heads : dict of str to ndarray
        What an adapter made with ``ensure_weight_tying`` (PEFT >= 0.18)
        also saves: the tied output head's copy (``lm_head.weight``), equal
        to the ``modules_to_save`` copy of the input embedding it is tied to
        (``load_adapter`` checks so). Nothing to merge: the merged
        checkpoint keeps the tie, so the head loads as that copy.
    """

    config: LoraAdapterConfig
    modules: dict
    replaced: dict = field(default_factory=dict)
    saved_base: dict = field(default_factory=dict)
    tied_heads: dict = field(default_factory=dict)

    def __repr__(self):
        kinds = {}
        for mod in self.modules.values():
            kind = ("DoRA " if mod.magnitude is not None else "LoRA ") + mod.kind
            kinds[kind] = kinds.get(kind, 0) + 1
        listing = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no modules"
        return (f"PeftAdapter({listing}; r={self.config.r}, lora_alpha={self.config.lora_alpha}, "
                f"{len(self.replaced)} replaced tensor(s))")

    def replacement_key(self, name):
        """Whether adapter key ``name`` (prefix stripped) is a ``modules_to_save`` tensor."""
        targets = self.config.extra.get("modules_to_save") or []
        module = name.rpartition(".")[0]
        return any(module == t or module.endswith("." + t) for t in targets)


_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)


_SAVED_BASE = ".base_layer.weight"

#: The module names transformers models give the input embedding and the output head
#: that ``tie_word_embeddings`` ties (Llama, Mistral, Qwen, ...: embed_tokens / lm_head;
#: GPT-2: wte; BERT: word_embeddings / decoder; T5: shared; GPT-NeoX: embed_in / embed_out;
#: LLaMA's original checkpoints: tok_embeddings / output).
TIED_PAIR_NAMES = frozenset({"embed_tokens", "lm_head", "wte", "word_embeddings", "decoder", "shared",
                             "embed_in", "embed_out", "tok_embeddings", "output"})


def tied_pair_module(key):
    """The module name of ``<path>.<module>.weight`` if it is one of ``TIED_PAIR_NAMES``, else None."""
    if not key.endswith(".weight"):
        return None
    module = key[: -len(".weight")].rsplit(".", 1)[-1]
    return module if module in TIED_PAIR_NAMES else None


def check_saved_bases(adapter, base):
    """Check that every base weight PEFT saved with the adapter is the base's own.

    PEFT saves the base weight of an adapted embedding (and ``lm_head``) with
    the adapter by default (``save_embedding_layers="auto"``, for a resized
    vocabulary) and loads it over the base model's weight; merging onto
    another base weight would not give PEFT's model. Equal (same dtype,
    shape and bits): nothing to do, the base weight is used.

    Parameters
    ----------
    adapter : PeftAdapter
    base : BaseWeights or mapping of str to ndarray

    Raises
    ------
    ValueError
        A saved copy that differs from the base's weight (dtype, shape or
        values), naming the module and what to do.
    """
    keys = set(base.keys())
    for name, saved in adapter.saved_base.items():
        key = weight_key(name, keys)
        W = base.get(key) if isinstance(base, BaseWeights) else np.asarray(base[key])
        if W.dtype == saved.dtype and W.shape == saved.shape and np.array_equal(
                W.reshape(-1).view(np.uint8), saved.reshape(-1).view(np.uint8)):
            continue
        what = (f"shape {saved.shape} against {W.shape}" if W.shape != saved.shape else
                f"dtype {saved.dtype} against {W.dtype}" if W.dtype != saved.dtype else
                "the same shape and dtype, other values")
        raise ValueError(
            f"the adapter holds its own copy of {name!r}'s base weight ({name}{_SAVED_BASE}, saved by "
            f"PEFT's save_embedding_layers), which differs from the base's {key!r} ({what}): PEFT "
            f"loads that copy in place of the base's (a resized vocabulary). Merge onto the base the "
            f"adapter was trained with, or, if this base is right, save the adapter again with "
            f"save_embedding_layers=False"
        )


def _split_key(key, source):
    """(module path, "lora_A" | "lora_B" | "lora_magnitude_vector", "embedding" or None) of a key.

    Raises ValueError on formats we do not read (LyCORIS/kohya, lora_bias).
    """
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    m = _KEY.match(name)
    if m:
        part = m["part"].split(".")[0]
        if part.startswith("lora_embedding_"):  # lora_embedding_A -> lora_A
            return m["module"], "lora_" + part[-1], "embedding"
        return m["module"], part, None
    if re.search(r"(lora_down|lora_up|dora_scale|\.alpha$|hada_|lokr_)", key):
        raise ValueError(
            f"{source}: key {key!r} is in the LyCORIS/kohya format (lora_down/lora_up/dora_scale), "
            f"not PEFT's; its dora_scale is normalised over the other axis (shape (1, in)). "
            f"Convert it to PEFT keys first."
        )
    if key.endswith("lora_B.bias"):
        raise ValueError(f"{source}: key {key!r} is a lora_B bias (lora_bias=True), not supported")
    raise ValueError(f"{source}: unexpected key {key!r}: not a PEFT LoRA/DoRA tensor")


def load_adapter(directory, *, dtype=None):
    """Read a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Parameters
    ----------
    directory : str or os.PathLike
    dtype : numpy dtype, optional
        Cast A, B and the magnitude to it (float32 or float64); default:
        float64 tensors stay float64, every other float dtype becomes float32.

    Returns
    -------
    PeftAdapter
        Its ``replaced`` holds the ``modules_to_save`` tensors as stored.

    Raises
    ------
    FileNotFoundError
        A missing directory, config or weights file.
    ValueError
        A ``.bin`` (pickle) adapter; a truncated or invalid file; an
        unsupported config or key; a module with A but no B (or the
        reverse); A and B of inconsistent ranks or of a rank other than the
        config's; a ``use_dora`` adapter without a magnitude for a module
        (PEFT only warns there and re-initialises it, changing the outputs),
        or a magnitude in a LoRA adapter; a magnitude not of shape (out,)
        (the LyCORIS convention (1, in) or (in,) gets a message saying so);
        a config whose rank, alpha or patterns differ from the ones the weights
        file was saved with by ``save_adapter`` (a save interrupted between its
        two files, or a config edited by hand).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such adapter directory: {directory}")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.exists():
        for pickle_name in ("adapter_model.bin", "adapter_model.pt"):
            if (directory / pickle_name).is_file():
                _refuse_pickle(directory / pickle_name)
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}")
    config = read_config(directory)
    adapter = PeftAdapter(config, {})
    parts = {}
    with SafetensorsFile(weights) as f:
        _check_paired_config(config, f, weights)
        for key in f.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if not _KEY.match(name) and adapter.replacement_key(name):
                adapter.replaced[name] = f.get(key)
                continue
            if name.endswith(_SAVED_BASE):  # PEFT's save_embedding_layers: the base weight itself
                adapter.saved_base[name[: -len(_SAVED_BASE)]] = (key, f.get(key))
                continue
            if (config.extra.get("ensure_weight_tying") is True and not _KEY.match(name)
                    and tied_pair_module(name)):  # the tied head's copy (checked below)
                adapter.tied_heads[name] = f.get(key)
                continue
            module, part, kind = _split_key(key, weights)
            if kind:
                parts.setdefault(module, {})["kind"] = kind
            if part in parts.setdefault(module, {}):
                raise ValueError(f"{weights}: module {module!r} has two {part} tensors")
            arr = f.get(key)
            if arr.dtype.kind != "f" and np.dtype(arr.dtype).name not in ("bfloat16",):
                raise ValueError(f"{weights}: {key} has dtype {arr.dtype}, not a float")
            parts[module][part] = (key, arr)
    for name, p in parts.items():
        adapter.modules[name] = _module_from_parts(name, p, config, weights, dtype)
    for name, (key, _) in adapter.saved_base.items():
        if name not in adapter.modules:
            raise ValueError(f"{weights}: {key!r} is a saved base weight of {name!r}, which the adapter does not adapt")
    adapter.saved_base = {name: arr for name, (_, arr) in adapter.saved_base.items()}
    for name, arr in adapter.tied_heads.items():
        same = [r for r in adapter.replaced.values() if r.dtype == arr.dtype and r.shape == arr.shape]
        if not any(np.array_equal(r.view(np.uint8), arr.view(np.uint8)) for r in same):
            raise ValueError(
                f"{weights}: {name!r} is not a PEFT LoRA/DoRA tensor, and not the tied copy of a "
                f"modules_to_save tensor (ensure_weight_tying): no modules_to_save tensor is equal to it"
            )
    if not adapter.modules and not adapter.replaced:
        raise ValueError(f"{weights}: no LoRA tensors found")
    _check_selected(config, adapter, weights)
    return adapter


class _OutOfTime(ValueError):
    """``config_selects`` spent more than its budget (``PATTERN_TIME_BUDGET``)."""


def _in_time(deadline, field, pattern, module):
    if time.perf_counter() > deadline:
        raise _OutOfTime(
            f"matching {field} against the module paths took over {PATTERN_TIME_BUDGET:g} s (last "
            f"{_show(pattern)}, module {_show(module)}); simplify the config (e.g. list the module paths)")


def config_selects(config, module, *, deadline=None):
    """Whether PEFT would put an adapter on ``module`` from this config: True, False, or None
    where the config alone cannot tell.

    PEFT 0.21's rule (``check_target_module_exists``), on the module's path in
    the base model (the adapter key without ``base_model.model.`` and the
    tensor's part): a module that ``exclude_modules`` names (a list: the name or
    a dotted suffix; a string: a regex matching the whole path) or that lies in
    a ``modules_to_save`` module is never adapted; else a string
    ``target_modules`` is a regex that must match the whole path, and a list
    names modules by path or dotted suffix, with ``layers_to_transform`` (an
    index or a list of them) then keeping only the modules whose first
    numbered segment after a ``layers_pattern`` (or any segment, without one)
    is such an index. None: no ``target_modules`` (PEFT takes the model
    type's defaults), ``"all-linear"`` (PEFT expands it against the model),
    ``target_parameters``, a pattern that is not a valid regex or whose
    matching time is not bounded (``config.pattern_key_regex``'s rules), a
    module path longer than ``MAX_MODULE_PATH``, or, with
    ``ensure_weight_tying``, a module of a tied input embedding / output head
    pair (PEFT adapts the partner of a targeted one as well).

    Parameters
    ----------
    config : LoraAdapterConfig
    module : str
        A module path as ``PeftAdapter.modules`` keys it.

    deadline : float, optional
        A ``time.perf_counter()`` value: past it, ValueError (the matching of
        many patterns, each bounded, against a long path can still take long).
        Default: ``PATTERN_TIME_BUDGET`` seconds from the call.

    Returns
    -------
    bool or None

    Raises
    ------
    ValueError
        The deadline passed (the message names the field and the pattern).
    """
    if deadline is None:
        deadline = time.perf_counter() + PATTERN_TIME_BUDGET
    extra = config.extra
    targets = config.target_modules
    if (extra.get("target_parameters") or targets is None or targets == "all-linear"
            or len(module) > MAX_MODULE_PATH):
        return None
    if (extra.get("ensure_weight_tying") is True and tied_pair_module(module + ".weight")):
        return None  # PEFT adapts the partner of a targeted tied module too (target_modules_to_tie)
    try:
        exclude = extra.get("exclude_modules")
        if exclude:
            if isinstance(exclude, str):
                if _bounded(exclude, 0).fullmatch(module):
                    return False
            elif module in exclude or any(module.endswith("." + e) for e in exclude):
                return False
        for kept in dict.fromkeys(extra.get("modules_to_save") or ()):  # each once
            if _bounded(rf"(^|.*\.){kept}($|\..*)", 2).match(module):
                return False
            _in_time(deadline, "modules_to_save", kept, module)
        if isinstance(targets, str):
            return _bounded(targets, 0).fullmatch(module) is not None
        if module in targets:
            return True
        if not any(module.endswith("." + t) for t in targets):
            return False
        indexes = extra.get("layers_to_transform")
        if indexes is None or (isinstance(indexes, list) and not indexes):
            return True
        patterns = extra.get("layers_pattern")
        if not patterns:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            found = None
            for pattern in dict.fromkeys([patterns] if isinstance(patterns, str) else patterns):
                found = _bounded(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", 2).match(module)
                if found is not None:
                    break
                _in_time(deadline, "layers_pattern", pattern, module)
    except _OutOfTime:
        raise
    except (ValueError, TypeError):  # a regex PEFT fails on, or whose time is unbounded
        return None
    if found is None:
        return False
    index = int(found["idx"])
    if isinstance(indexes, list):
        return index in indexes
    return isinstance(indexes, int) and not isinstance(indexes, bool) and index == indexes


@functools.lru_cache(maxsize=256)
def _bounded(pattern, own):
    """``config.bounded_regex`` of a config's string as PEFT embeds it (``own``: the quantifiers
    PEFT puts around it), compiled once: PEFT would spend minutes on ``(a+)+b``; ValueError
    then, and ``config_selects`` answers None."""
    return bounded_regex(pattern, own, pattern)


def _check_selected(config, adapter, weights):
    """Refuse an adapter whose weights and config disagree about which modules it adapts.

    PEFT builds the adapter's modules from the config (``config_selects``)
    and loads the weights into them: tensors of a module the config does not
    select are left out. dora_ref merged every module the weights hold: a
    merged model unlike PEFT's, silently (an adversary, session 23, with
    hand-edited target_modules, exclude_modules and layers_to_transform).
    Files PEFT saves agree with their config. (A ``modules_to_save`` module
    without its tensor is refused where the base model is known:
    ``merge.plan_replacements``; PEFT's configs name modules the model may
    not have, e.g. "classifier" and "score" for every sequence classifier.)
    """
    deadline = time.perf_counter() + PATTERN_TIME_BUDGET  # for the whole adapter (an adversary:
    try:                                                 # 600 patterns, one module, 46 s)
        unselected = [m for m in adapter.modules if config_selects(config, m, deadline=deadline) is False]
    except ValueError as e:
        raise ValueError(f"{weights}: {ADAPTER_CONFIG}: {e}") from None
    if unselected:
        fields = {k: v for k, v in (("target_modules", config.target_modules),
                                    *((k, config.extra.get(k)) for k in (
                                        "exclude_modules", "layers_to_transform", "layers_pattern",
                                        "modules_to_save")))
                  if v is not None}
        shown = ", ".join(repr(m) for m in unselected[:5])
        more = f" and {len(unselected) - 5} more" if len(unselected) > 5 else ""
        raise ValueError(
            f"{weights}: {len(unselected)} module(s) with LoRA tensors that {ADAPTER_CONFIG} does not "
            f"select ({', '.join(f'{k}={json.dumps(v)}' for k, v in fields.items())}): {shown}{more}; "
            f"PEFT would leave their tensors out, so its model and a merge of all the tensors differ. "
            f"The config and the weights disagree (a config edited by hand?): make the config select "
            f"the modules the weights hold, or remove those tensors")


def _compute_dtype(dtype):
    """float64 stays float64; float32, float16, bfloat16 compute in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _module_from_parts(name, p, config, source, dtype):
    for need in ("lora_A", "lora_B"):
        if need not in p:
            raise ValueError(f"{source}: module {name!r} has no {need}.weight (truncated adapter?)")
    (_, A), (_, B) = p["lora_A"], p["lora_B"]
    kind = p.get("kind") or ("conv" if A.ndim > 2 else "linear")
    r = A.shape[0]
    if kind == "conv":
        if not (3 <= A.ndim <= 5 and B.shape[:1] + B.shape[2:] == (B.shape[0],) + (1,) * (A.ndim - 2)):
            raise ValueError(
                f"{source}: module {name!r}: a convolution needs lora_A (r, in, *k) and lora_B "
                f"(out, r, 1, ...) of the same number of dimensions, got {A.shape} and {B.shape}"
            )
        if B.shape[1] != r:
            raise ValueError(
                f"{source}: module {name!r}: lora_B {B.shape} has r/groups = {B.shape[1]} != r = {r} "
                f"(lora_A {A.shape}): grouped convolutions are not supported (PEFT cannot merge them either)"
            )
    elif A.ndim != 2 or B.ndim != 2 or B.shape[1] != r:
        raise ValueError(
            f"{source}: module {name!r}: lora_A {A.shape} must be (r, in) and lora_B {B.shape} "
            f"(out, r) with the same r"
        )
    r_cfg, alpha = config.rank_and_alpha(name)
    if r != r_cfg:
        raise ValueError(
            f"{source}: module {name!r} has rank {r} (lora_A {A.shape}) but the config gives "
            f"r = {r_cfg} (r / rank_pattern); the scaling would be wrong"
        )
    out_f, in_f = B.shape[0], A.shape[1]
    m = None
    if "lora_magnitude_vector" in p:
        km, m = p["lora_magnitude_vector"]
        if not config.use_dora:
            raise ValueError(f"{source}: {km} is a DoRA magnitude but the config has use_dora=false")
        want = (out_f,) if kind != "conv" else (1, out_f) + (1,) * (A.ndim - 2)
        if m.shape == want:
            m = m.reshape(out_f)
        else:
            hint = ""
            if m.shape in ((in_f,), (1, in_f)) and in_f != out_f:
                hint = (
                    ": one value per *input* feature is the LyCORIS/kohya convention "
                    "(dora_scale, the weight normalised over the other axis), not PEFT's, whose "
                    "magnitude has one value per output channel (the row norm of the (out, in) weight)"
                )
            raise ValueError(
                f"{source}: {km} has shape {m.shape}; expected {want} (one value per output "
                f"channel) for lora_A {A.shape}, lora_B {B.shape}{hint}"
            )
    elif config.use_dora:
        raise ValueError(
            f"{source}: the config has use_dora=true but module {name!r} has no "
            f"lora_magnitude_vector (PEFT would only warn and re-initialise it to the base norm, "
            f"silently changing the outputs)"
        )
    cdt = np.dtype(dtype) if dtype is not None else _compute_dtype(A.dtype)
    cast = lambda a: None if a is None else np.ascontiguousarray(a.astype(cdt))  # noqa: E731
    return ModuleAdapter(name, cast(A), cast(B), cast(m), config.scaling(name), r, alpha, kind)


def save_adapter(directory, adapter):
    """Write ``adapter`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Keys and shapes as docs/peft_dora.md, Sec. 4 (``base_model.model.<name>.lora_A.weight``
    (r, in), ``...lora_B.weight`` (out, r), ``...lora_magnitude_vector`` (out,);
    ``lora_embedding_A``/``_B`` for embeddings, (1, out, 1, ...) conv magnitudes).
    Each module's rank and alpha must be what the config gives it (see
    ``adapter_from_layers``, which builds a matching config).

    Parameters
    ----------
    directory : str or os.PathLike
        Created if needed (with its parents). An absent directory is
        written as a temporary sibling and renamed into place, so that a
        kill leaves no adapter or the whole one; into an existing directory
        (its other files kept) each file is written under a
        temporary name, flushed to disk and renamed over the old one, the
        weights first. A kill between those two renames leaves the new
        weights beside the old config: ``load_adapter`` refuses that pair
        where their ranks, alphas or patterns disagree (the weights file
        records them in its metadata), but PEFT, which does not look, would
        load it. What a killed save leaves (hidden ``.*.dora-ref-save-*``
        files) is removed by the next save to the same directory.
    adapter : PeftAdapter

    Raises
    ------
    ValueError
        If a module's rank, scaling or magnitude disagrees with the config.
    FileExistsError
        If ``directory`` exists and is not a directory.
    """
    directory = Path(directory)
    cfg = adapter.config
    tensors = {}
    for name, mod in adapter.modules.items():
        r, alpha = cfg.rank_and_alpha(name)
        if mod.r != r or mod.lora_A.shape[0] != r or not math.isclose(mod.scaling, cfg.scaling(name)):
            raise ValueError(
                f"module {name!r} has r={mod.r}, scaling={mod.scaling:g} but the config gives "
                f"r={r}, scaling={cfg.scaling(name):g}"
            )
        if (mod.magnitude is not None) != bool(cfg.use_dora):
            raise ValueError(f"module {name!r}: magnitude present = {mod.magnitude is not None}, "
                             f"but use_dora = {cfg.use_dora}")  # fmt: skip
        key = PEFT_PREFIX + name
        a, b = (".lora_embedding_A", ".lora_embedding_B") if mod.kind == "embedding" else (
            ".lora_A.weight", ".lora_B.weight")  # fmt: skip
        tensors[key + a] = np.ascontiguousarray(mod.lora_A)
        tensors[key + b] = np.ascontiguousarray(mod.lora_B)
        if mod.magnitude is not None:
            m = mod.magnitude
            if mod.kind == "conv":  # PEFT's (1, out, 1, ...), docs/peft_dora.md, Sec. 1 "Convolutions"
                m = m.reshape((1, -1) + (1,) * (mod.lora_A.ndim - 2))
            tensors[key + ".lora_magnitude_vector"] = np.ascontiguousarray(m)
    for name, arr in adapter.replaced.items():
        tensors[PEFT_PREFIX + name] = np.ascontiguousarray(arr)
    from safetensors.numpy import save

    config = cfg.to_dict()
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    # the record's keys sorted as the file's are (a pattern's order is compared)
    paired = json.dumps({k: config[k] for k in _PAIRED_FIELDS if k in config}, sort_keys=True)
    weights = save(tensors, metadata={"format": "pt", _PAIRED_KEY: paired})
    _write_adapter_files(directory, weights, config_text.encode())


#: The config fields that say what an adapter's tensors mean. ``save_adapter`` writes them
#: into the weights file's ``__metadata__`` too, and ``load_adapter`` refuses a config beside
#: it that gives other values: the pair a save interrupted between its two files leaves in an
#: existing directory (the new weights, the old config), which would otherwise load without an
#: error and scale every module by the old alpha / r (session 20's adversary: lora_alpha 8
#: read beside weights saved with 32).
_PAIRED_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                  "fan_in_fan_out")
_PAIRED_KEY = "dora_ref.adapter_config"
_SAVE_TMP = re.compile(r"\.(.+)\.dora-ref-save-(\d+)-[0-9a-f]+$")


def _write_synced(path, data):
    """A new file ``path`` holding ``data``, flushed to disk (mode 0o666 less the umask)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_saves(directory):
    """Remove what a killed ``save_adapter`` left: its temporary files in ``directory`` and
    its temporary sibling directories, where the process that wrote them is gone."""
    from ..merge_cli import _alive, _stem

    places = [(directory.parent, _stem(directory))]
    if directory.is_dir():  # through a symlink too: the files went where it points
        places.append((Path(os.path.realpath(directory)), None))
    for folder, stem in places:
        try:
            items = list(folder.iterdir())
        except OSError:
            continue
        for item in items:
            m = _SAVE_TMP.match(item.name)
            if not m or (stem is not None and m[1] != stem) or _alive(int(m[2])):
                continue
            try:
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
            except FileNotFoundError:  # another save removed it first
                pass


def _write_adapter_files(directory, weights, config):
    """Write the two files of an adapter so that no kill leaves a pair that loads wrongly.

    An absent ``directory`` is built as a temporary sibling and renamed into
    place: a reader sees no adapter or the whole new one. In an existing
    directory (its other files kept) each file is written under a
    temporary name, flushed and renamed over the old one, the weights first:
    a kill between the two renames leaves the new weights beside the old
    config, which ``load_adapter`` refuses (``_PAIRED_FIELDS``) where the
    two disagree. Parent directories are created as needed. Saves into
    folders of one parent run one at a time (``_saving_into``).
    """
    directory = Path(os.path.abspath(directory))  # "." has no name to build a sibling's from
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _saving_into(parent):
        _write_adapter_files_locked(directory, parent, weights, config)


@contextlib.contextmanager
def _saving_into(parent):
    """Saves whose folders share a parent directory, one at a time (an advisory ``flock`` on
    the parent, across threads and processes; none where ``fcntl`` is missing): four
    concurrent saves into one folder each reported success and left one's weights beside
    another's config in 39 of 160 trials (session 20's second adversary)."""
    try:
        import fcntl

        fd = os.open(parent, os.O_RDONLY)
    except (ImportError, OSError):  # not POSIX, or a parent we may write but not read: unlocked
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock: unserialised, as before
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_adapter_files_locked(directory, parent, weights, config):
    from ..merge_cli import _stem
    from ..safetensors_io import fsync_directory

    _remove_stale_saves(directory)
    tag = f"dora-ref-save-{os.getpid()}-{os.urandom(4).hex()}"
    # an existing folder, even an empty one, is written into, not replaced: it may be a
    # process's working directory, a mount point, or carry permissions of its own
    if not os.path.lexists(directory):
        # the merge command's sibling name: a folder name near the filesystem's limit is cut
        # and hashed (with the whole name a 250-character folder failed: ENAMETOOLONG)
        tmp = parent / f".{_stem(directory)}.{tag}"
        tmp.mkdir()
        try:
            _write_synced(tmp / ADAPTER_WEIGHTS, weights)
            _write_synced(tmp / ADAPTER_CONFIG, config)
            fsync_directory(tmp)
            os.rename(tmp, directory)  # atomic; fails on a non-empty directory made meanwhile
            fsync_directory(parent)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # the directory appeared meanwhile (another save into it): write into it below
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory: save_adapter writes "
                              f"a directory ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    for name, data in ((ADAPTER_WEIGHTS, weights), (ADAPTER_CONFIG, config)):
        tmp = directory / f".{name}.{tag}"
        try:
            _write_synced(tmp, data)
            os.replace(tmp, directory / name)
        finally:
            if os.path.lexists(tmp):
                tmp.unlink()
    fsync_directory(directory)


def _check_paired_config(config, weights_file, weights_path):
    """Refuse a config that gives other values of ``_PAIRED_FIELDS`` than the ones
    ``save_adapter`` recorded in the weights file beside it (files without the record,
    e.g. PEFT's own, are not checked)."""
    recorded = (weights_file.metadata() or {}).get(_PAIRED_KEY)
    if recorded is None:
        return
    try:
        recorded = json.loads(recorded)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
        raise ValueError(f"{weights_path}: its {_PAIRED_KEY} metadata is not valid JSON") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{weights_path}: its {_PAIRED_KEY} metadata is not a JSON object")
    given = config.to_dict()
    for key, value in recorded.items():
        if key in _PAIRED_FIELDS and not _same_value(given.get(key), value):
            raise ValueError(
                f"{weights_path} was saved with {key}={json.dumps(value)} but the "
                f"{ADAPTER_CONFIG} beside it gives {key}={json.dumps(given.get(key))}: the two "
                f"files are from different saves (a save interrupted between writing them?) or "
                f"the config was edited; save the adapter again, or set {key} back"
            )


def _same_value(a, b):
    """Equal as a config value: numbers by value (8 == 8.0), mappings key by key in order."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b  # True is not 1
    return a == b  # numbers exactly, also an int too large for a float


def _layer_parts(layer):
    """(kind, A, B, magnitude (out,) or None) of a dora_ref layer, in PEFT's shapes."""
    if hasattr(layer, "lora_embedding_A"):  # DoRAEmbedding: A (r, V), B (D, r)
        kind, A, B = "embedding", layer.lora_embedding_A, layer.lora_embedding_B
    else:
        A, B = layer.lora_A, layer.lora_B
        kind = "conv" if np.ndim(A) > 2 else "linear"
    m = getattr(layer, "lora_magnitude_vector", None)
    return kind, A, B, None if m is None else np.reshape(m, -1)


#: The fields of PEFT 0.21.2's ``LoraConfig`` (``dataclasses.fields``), which
#: ``adapter_from_layers`` accepts as extra config fields.
_PEFT_LORA_FIELDS = (
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping",
    "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying", "eva_config",
    "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "kasa_config",
    "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
    "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r",
    "rank_pattern", "revision", "runtime_config", "target_modules", "target_parameters",
    "task_type", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora", "use_rslora",
    "velora_config")
#: What ``adapter_from_layers`` takes from the layers themselves.
_FROM_LAYERS = ("r", "lora_alpha", "use_dora", "use_rslora", "target_modules", "rank_pattern",
                "alpha_pattern")


#: The extra fields ``adapter_from_layers`` writes, and the values allowed (None: any value
#: JSON can hold): the ones that leave what PEFT builds from the file the layers' adapter.
#: Any other of PEFT's fields was refused by dora_ref's reader, by PEFT, or made PEFT's
#: outputs differ silently (the third adversary: peft_type="LOHA" loaded by PEFT as LoHa
#: without the LoRA tensors, init_lora_weights="pissa" rewriting the base weights, output
#: off by 4.7 and 7.3; layers_to_transform, which PEFT refuses with a regex target_modules).
_WRITABLE_FIELDS = {"base_model_name_or_path": None, "revision": None, "task_type": None,
                    "inference_mode": (True, False), "auto_mapping": None,
                    "init_lora_weights": (True, False, "gaussian"), "bias": ("none",),
                    "lora_bias": (False,), "modules_to_save": (None,)}


def _check_config_fields(fields):
    """Refuse an extra config field that the layers give, that PEFT's LoraConfig lacks, or that
    would make what PEFT (or dora_ref) reads from the file something else than the layers."""
    import difflib

    for key, value in fields.items():
        if key in _FROM_LAYERS:
            raise TypeError(
                f"adapter_from_layers takes {key} from the layers (each layer's r, lora_alpha, "
                f"use_rslora, DoRA or LoRA; target_modules from the mapping's module paths), "
                f"not as a keyword: build the layers with the {key} you want")
        if key not in _PEFT_LORA_FIELDS:
            close = difflib.get_close_matches(key, _PEFT_LORA_FIELDS, n=1, cutoff=0.8)
            raise TypeError(
                f"{key!r} is not a field of PEFT's LoraConfig (0.21)"
                + (f"; did you mean {close[0]!r}?" if close else "")
                + " (adapter_from_layers writes its keywords into adapter_config.json)")
        allowed = _WRITABLE_FIELDS.get(key, ())
        if key not in _WRITABLE_FIELDS or (allowed is not None and not any(
                value is a or (type(value) is type(a) and value == a) for a in allowed)):
            raise TypeError(
                f"adapter_from_layers does not write {key}={value!r}: with it, PEFT (or dora_ref's "
                f"load_adapter) would not read back the layers' adapter; it writes "
                + ", ".join(k if v is None else f"{k} in {v}" for k, v in _WRITABLE_FIELDS.items()))
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise TypeError(f"{key}={value!r} cannot be written to adapter_config.json "
                            f"(not a JSON value)") from None


def adapter_from_layers(layers, *, fan_in_fan_out=False, lora_dropout=None, **config_fields):
    """Collect dora_ref layers into a ``PeftAdapter`` for ``save_adapter``.

    The config gets the most common rank and alpha as ``r``/``lora_alpha``,
    and ``rank_pattern``/``alpha_pattern`` entries for the others, so that
    PEFT gives every module its own rank and scaling back. Each entry is the
    module's escaped full path anchored with ``^``: PEFT matches a key ``p``
    as ``(.*\\.)?(p)$``, under which a bare ``proj`` would also match
    ``block.proj``, while ``^proj`` matches ``proj`` only.
    ``target_modules`` is a regular expression that matches exactly the
    module paths (PEFT full-matches a string against every module path): a
    list would be matched as suffixes too, so a layer saved at ``q`` would
    make PEFT wrap ``attn.q`` as well, with a fresh adapter the file does not
    hold (not a no-op with ``init_lora_weights=False``, nor in bfloat16).

    Parameters
    ----------
    layers : dict of str to layer
        Module path in the base model -> ``DoRALinear``/``LoRALinear``,
        ``DoRAEmbedding``, or a ``dora_ref.core.conv`` layer (what
        ``build_layers`` returns). All DoRA or all LoRA.
    fan_in_fan_out : bool, default False
        Recorded in the config (set it for GPT-2 ``Conv1D`` modules).
    lora_dropout : float, optional
        Default: the most common ``lora_dropout`` of the layers that have one
        (embeddings have none: PEFT applies no dropout to them), else 0.
    **config_fields
        Other fields of PEFT's ``LoraConfig`` for ``adapter_config.json`` (e.g.
        ``base_model_name_or_path``); not the ones the layers give (``r``,
        ``lora_alpha``, ``use_dora``, ``use_rslora``, ``target_modules``, the
        patterns), which were dropped silently (a new user's ``lora_alpha=32``),
        nor a name PEFT's ``LoraConfig`` does not have (a typo was written into
        the file, and PEFT then warned to upgrade it).

    Returns
    -------
    PeftAdapter

    Raises
    ------
    TypeError
        If ``layers`` is not a mapping (e.g. a list of layers), or a config
        field is one the layers give or not one of PEFT's.
    ValueError
        On an empty mapping, a mix of DoRA and LoRA layers, mixed rsLoRA,
        or merged layers.
    """
    if not isinstance(layers, Mapping):
        raise TypeError(
            f"layers must be a mapping of module path to layer, e.g. {{'q_proj': layer}} (as "
            f"build_layers returns), got {type(layers).__name__}")
    _check_config_fields(config_fields)
    if not layers:
        raise ValueError("layers is empty")
    parts = {name: _layer_parts(layer) for name, layer in layers.items()}
    dora = {name: m is not None for name, (_, _, _, m) in parts.items()}
    rslora = {bool(layer.use_rslora) for layer in layers.values()}
    if len(set(dora.values())) != 1 or len(rslora) != 1:
        raise ValueError(
            f"all layers must be DoRA (or all LoRA) and share use_rslora; DoRA: "
            f"{sorted(n for n, d in dora.items() if d)}, LoRA: {sorted(n for n, d in dora.items() if not d)}, "
            f"use_rslora: {sorted(rslora)}"
        )
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged: unmerge() it before saving its adapter")

    def most_common(values, default=None):
        values = list(values)
        return max(dict.fromkeys(values), key=values.count) if values else default

    def exactly(name):  # a rank_pattern/alpha_pattern key that matches ``name`` only
        return "^" + re.escape(name)

    r = most_common(int(layer.r) for layer in layers.values())
    alpha = most_common(layer.lora_alpha for layer in layers.values())
    dropout = most_common((layer.lora_dropout for layer in layers.values() if hasattr(layer, "lora_dropout")), 0.0)
    config = LoraAdapterConfig(
        r=r,
        lora_alpha=alpha,
        use_dora=next(iter(dora.values())),
        use_rslora=rslora.pop(),
        lora_dropout=dropout if lora_dropout is None else lora_dropout,
        fan_in_fan_out=bool(fan_in_fan_out),
        target_modules="^(?:" + "|".join(re.escape(n) for n in sorted(layers)) + ")$",
        rank_pattern={exactly(n): int(l.r) for n, l in layers.items() if l.r != r},
        alpha_pattern={exactly(n): l.lora_alpha for n, l in layers.items() if l.lora_alpha != alpha},
        extra=dict(config_fields),
    )
    modules = {}
    for name, layer in layers.items():
        kind, A, B, m = parts[name]
        modules[name] = ModuleAdapter(name, np.array(A), np.array(B), None if m is None else np.array(m),
                                      layer.scaling, int(layer.r), layer.lora_alpha, kind)  # fmt: skip
    return PeftAdapter(config, modules)


# ---------------------------------------------------------------------------
# layers, forward and merge from adapter + base
# ---------------------------------------------------------------------------


def build_layers(adapter, base, *, modules=None, lora_dropout=None, rng=None, detach_norm=True,
                 fan_in_fan_out=None, padding_idx=None):  # fmt: skip
    """``DoRALinear``/``LoRALinear`` (and ``DoRAEmbedding``) layers from an adapter and base weights.

    Parameters
    ----------
    adapter : PeftAdapter or str or os.PathLike
        Loaded adapter, or its directory.
    base : mapping of str to ndarray, or str or os.PathLike
        Base tensors by key (``<module>.weight`` (out, in), or (in, out) for
        fan_in_fan_out modules, and optional ``<module>.bias`` (out,)), or a
        safetensors file / model directory to read them from. float64 bases
        compute in float64; float32, float16 and bfloat16 bases in float32.
    modules : iterable of str, optional
        Build only these module paths (default: every module of the adapter).
    lora_dropout : float, optional
        Default: the config's.
    rng : numpy.random.Generator or int, optional
        Seeds the dropout masks.
    detach_norm : bool, default True
        See ``DoRALinear``.
    fan_in_fan_out : None, bool, str or iterable of str
        Which base weights are stored (in, out) (GPT-2 ``Conv1D``); None:
        decided by ``resolve_fan_in_fan_out``'s rule, which raises rather
        than guess for a square weight.
    padding_idx : None, int, or mapping of str to int or None
        The embeddings' padding row (``DoRAEmbedding``'s ``padding_idx``): an
        int for every embedding module, or one per module path. PEFT's DoRA
        embedding looks tokens up with its base ``nn.Embedding``'s
        padding_idx, so no gradient reaches that token's column of
        ``lora_embedding_A``; a checkpoint does not store it. None (default):
        no padding row, except that an embedding module of a base directory
        whose ``config.json`` names a ``pad_token_id`` raises (transformers
        models usually give it to their token embedding; this function does
        not guess which): pass ``padding_idx`` for it, None included.

    Returns
    -------
    layers : dict of str to DoRALinear, LoRALinear or DoRAEmbedding
        By module path. A linear layer's ``weight`` is in (out, in)
        orientation (transposed for fan_in_fan_out modules), an embedding's
        (V, D) as stored; both in the compute dtype. The adapter arrays are
        the adapter's.
    fan_in_fan_out : dict of str to bool
        Which layers' ``weight`` is the transpose of the stored base weight;
        pass it to ``stored_weight`` to write a merged weight back.

    Raises
    ------
    KeyError, ValueError
        A module missing from the base; a base shape that does not fit the
        adapter; a convolution (its stride and padding are not in the
        checkpoint: build ``dora_ref.layers.conv.DoRAConv2d`` etc. from
        ``adapter.modules[name]`` yourself; ``merge_weight`` needs no
        geometry and merges it); a plain-LoRA embedding; an embedding whose
        padding row is not known (see ``padding_idx``).
    """
    from ...layers.linear import DoRALinear, LoRALinear  # only here: the merge command needs no layer

    if not isinstance(adapter, PeftAdapter):
        adapter = load_adapter(adapter)
    if not hasattr(base, "keys") or isinstance(base, (str, os.PathLike)):
        base = BaseWeights(base)
    cfg = adapter.config
    check_saved_bases(adapter, base)
    keys = set(base.keys())
    layers, fifo = {}, {}
    rng = np.random.default_rng(rng)
    names = list(adapter.modules) if modules is None else list(modules)
    orientation = resolve_fan_in_fan_out(adapter, base, fan_in_fan_out)
    for name in names:
        if name not in adapter.modules:
            raise KeyError(f"the adapter has no module {name!r}")
    _check_padding_keys(padding_idx, adapter, names)
    for name in names:
        mod = adapter.modules[name]
        wkey = weight_key(name, keys)
        W = base.get(wkey) if isinstance(base, BaseWeights) else np.asarray(base[wkey])
        fifo[name] = is_fan_in_fan_out(mod, W.shape, orientation.get(name), key=wkey)
        cdt = _compute_dtype(W.dtype)
        if mod.kind != "linear":
            pad = _padding_idx(name, padding_idx, base, W.shape[0]) if mod.kind == "embedding" else None
            layers[name] = _build_non_linear(name, mod, W.astype(cdt), cfg, rng, detach_norm, pad)
            fifo[name] = False
            continue
        W = _to_view(W, mod, fifo[name], cdt)
        bkey = wkey[: -len("weight")] + "bias"
        bias = None
        if bkey in keys:
            bias = base.get(bkey) if isinstance(base, BaseWeights) else np.asarray(base[bkey])
            bias = bias.astype(cdt)
        cls = DoRALinear if mod.magnitude is not None else LoRALinear
        kw = (
            dict(detach_norm=detach_norm, lora_magnitude_vector=mod.magnitude.astype(cdt))
            if cls is DoRALinear
            else {}
        )
        layers[name] = cls(
            W,
            bias,
            lora_A=mod.lora_A.astype(cdt),
            lora_B=mod.lora_B.astype(cdt),
            lora_alpha=mod.lora_alpha,
            use_rslora=cfg.use_rslora,
            lora_dropout=cfg.lora_dropout if lora_dropout is None else lora_dropout,
            rng=rng,
            **kw,
        )
    return layers, fifo


def _check_padding_keys(padding_idx, adapter, names):
    """A ``padding_idx`` mapping may name only embedding modules being built: any other key
    (a suffix, a key with PEFT's prefix) would be dropped, the embedding built without its
    padding row."""
    if not isinstance(padding_idx, Mapping):
        return
    embeddings = [n for n in names if n in adapter.modules and adapter.modules[n].kind == "embedding"]
    unknown = [k for k in padding_idx if k not in embeddings]
    if unknown:
        raise ValueError(
            f"padding_idx names {unknown!r}, which {'is' if len(unknown) == 1 else 'are'} not an embedding "
            f"module being built; the embedding modules are {embeddings!r} (full module paths, as in "
            f"adapter.modules)"
        )


def _padding_idx(name, padding_idx, base, num_embeddings):
    """The padding row of embedding module ``name`` (``build_layers``'s ``padding_idx``)."""
    if isinstance(padding_idx, Mapping):
        if name in padding_idx:
            return padding_idx[name]
    elif padding_idx is not None:
        return padding_idx
    cfg = getattr(base, "model_config", None)  # BaseWeights: the config.json beside its weights
    pad = cfg.get("pad_token_id") if isinstance(cfg, dict) else None
    if pad is not None:
        from ...core.embedding import _check_padding_idx  # only here: the merge command needs no layer

        try:  # a value DoRAEmbedding would take as its padding_idx
            usable = _check_padding_idx(pad, num_embeddings) is not None
        except (TypeError, ValueError):
            usable = False
        suggest = (f"pass build_layers(..., padding_idx={{{name!r}: {pad!r}}}), or None for no padding "
                   f"row" if usable else
                   f"it is not a row of this embedding ({num_embeddings} rows): pass build_layers(..., "
                   f"padding_idx={{{name!r}: None}}) for no padding row, or the row")
        raise ValueError(
            f"module {name!r} is an embedding and the base's config.json has pad_token_id = {pad!r}, "
            f"which transformers models usually give their token embedding as padding_idx (PEFT then "
            f"sends no gradient to that token's column of lora_embedding_A); a checkpoint does not "
            f"say which embedding has it: {suggest}"
        )
    return None


def _build_non_linear(name, mod, W, cfg, rng, detach_norm, padding_idx=None):
    if mod.kind == "conv":
        raise ValueError(
            f"module {name!r} is a convolution: its stride, padding and dilation are not stored in "
            f"a checkpoint, so build dora_ref.layers.conv.DoRAConv{mod.lora_A.ndim - 2}d from "
            f"adapter.modules[{name!r}] with the geometry yourself (merge_weight needs none)"
        )
    if mod.magnitude is None:
        raise ValueError(f"module {name!r}: plain-LoRA embeddings have no layer in dora_ref")
    from ...layers.embedding import DoRAEmbedding

    layer = DoRAEmbedding(W, r=mod.r, lora_alpha=mod.lora_alpha, use_rslora=cfg.use_rslora,
                          rng=rng, detach_norm=detach_norm, padding_idx=padding_idx)  # fmt: skip
    layer.lora_embedding_A = mod.lora_A.astype(W.dtype, copy=True)
    layer.lora_embedding_B = mod.lora_B.astype(W.dtype, copy=True)
    layer.lora_magnitude_vector = mod.magnitude.astype(W.dtype, copy=True)
    layer.zero_grad()
    return layer


def stored_weight(layer, fan_in_fan_out, dtype=None):
    """A layer's (merged) weight in the base's stored layout and dtype.

    Parameters
    ----------
    layer : DoRALinear or LoRALinear
    fan_in_fan_out : bool
        Transpose back to (in, out).
    dtype : numpy dtype, optional
        Cast to it (e.g. ``ml_dtypes.bfloat16``; NumPy rounds to nearest even,
        as torch does).

    Returns
    -------
    ndarray, shape (out, in), or (in, out) if fan_in_fan_out
    """
    W = layer.weight.T if fan_in_fan_out else layer.weight
    return np.ascontiguousarray(W if dtype is None else W.astype(dtype))
