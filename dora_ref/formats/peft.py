"""Read, write and merge Hugging Face PEFT (Do)LoRA adapters, without PyTorch.

An adapter directory as ``PeftModel.save_pretrained`` writes it holds
``adapter_config.json`` and ``adapter_model.safetensors``. For a linear
module at path ``<name>`` of the base model (e.g.
``model.layers.0.self_attn.q_proj``), PEFT 0.12+ saves (docs/peft_dora.md, Sec. 4)::

    base_model.model.<name>.lora_A.weight            (r, in)
    base_model.model.<name>.lora_B.weight            (out, r)
    base_model.model.<name>.lora_magnitude_vector    (out,)    DoRA only

Embeddings (``lora_embedding_A`` (r, V), ``lora_embedding_B`` (D, r),
magnitude (D,)) and convolutions (``lora_A.weight`` (r, in, *k),
``lora_B.weight`` (out, r, 1, ...), magnitude (1, out, 1, ...)) are read,
written and merged too: each is DoRA on a linear view of its weight, E.T
(D, V) for an embedding and the kernel flattened to (out, in * prod(k)) for
a convolution (docs/peft_dora.md, Sec. 1 "Embeddings", "Convolutions", and Sec. 3), the views
``dora_ref.embedding`` and ``dora_ref.conv`` use.

The magnitude has one value per output channel: the paper's column norm is
the row norm of an (out, in) weight. A, B and the magnitude are in this
(out, in) orientation even for GPT-2's ``Conv1D``, whose *base* weight is
stored (in, out) (``fan_in_fan_out``): the base weight is transposed for the
math and the merged weight is stored back in the base's own layout. Which
weights are stored (in, out) is not in a checkpoint (PEFT decides it by the
module's type): a shape tells for a non-square weight; for a square one
``resolve_fan_in_fan_out`` states the rule, and raises rather than guess
(pass ``fan_in_fan_out=`` / ``--fan-in-fan-out`` to settle it).

Base weights come from safetensors files (one file, or shards listed in
``model.safetensors.index.json``). bfloat16 and float16 bases are read with
``ml_dtypes`` and computed in float32; float64 bases compute in float64.
Merged weights are cast back to the base dtype. Nothing here unpickles:
``.bin`` checkpoints are refused with a note on how to convert them.

Tensors of the config's ``modules_to_save`` (modules trained in full, saved
as ``base_model.model.<module>.weight``) are kept in ``PeftAdapter.replaced``
and replace the base's when merging.

Several DoRA adapters on one layer are chained as PEFT 0.21 chains them
(docs/peft_dora.md, Sec. 1 "Several DoRA adapters", Sec. 3): each adapter's norm is taken from the *bare*
base weight, and each DoRA adapter rescales everything accumulated before it::

    forward (eval):  y <- x @ W0.T;  per adapter i:  y <- g_i * (y + s_i (x A_i.T) B_i.T)
                     (plain LoRA: y <- y + s_i (x A_i.T) B_i.T);  finally y += b0
    merge:           W <- W0;        per adapter i:  W <- diag(g_i) (W + s_i B_i A_i)
    with g_i = m_i / ||W0 + s_i B_i A_i||_row.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..core import functional as F
from ..core._validate import check_input
from ..layers.linear import DoRALinear, LoRALinear, lora_scaling
from .safetensors_io import (  # noqa: F401  (re-exported: part of dora_ref.peft's API)
    SHARD_INDEX,
    SINGLE_FILE,
    BaseWeights,
    SafetensorsFile,
    SafetensorsWriter,
    _refuse_pickle,
    load_base_weights,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the prefix PEFT puts before every module path in a saved adapter
PEFT_PREFIX = "base_model.model."



# ---------------------------------------------------------------------------
# the adapter config
# ---------------------------------------------------------------------------

# truthy values of these fields select behaviour this library does not implement
_UNSUPPORTED_FIELDS = {
    "lora_bias": "a trainable bias in lora_B (PEFT refuses it together with DoRA)",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on nn.Parameter targets (MoE experts)",
    "layer_replication": "layer replication",
    "megatron_config": "Megatron tensor parallel layers",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}

def _is_real(x):
    """A JSON number that is a finite float (an integer too large for a float, e.g. 10**400, is not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _is_rank(x):
    return isinstance(x, int) and not isinstance(x, bool) and 0 < x < 2**31


def _show(value, limit=80):
    """``repr(value)`` cut to ``limit`` characters (an integer of thousands of digits has no repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# rank_pattern / alpha_pattern keys: PEFT's regex rule, at a bounded cost
# ---------------------------------------------------------------------------

#: at most this many quantifiers (``*``, ``+``, ``?``, ``{m,n}``) in a pattern key
MAX_PATTERN_QUANTIFIERS = 3
#: module paths longer than this are not matched against pattern keys
MAX_MODULE_PATH = 256
#: seconds one config may spend matching its pattern keys, in total (each match takes
#: microseconds for real keys and at most ~0.3 s for the worst key the rules above let through)
PATTERN_TIME_BUDGET = 2.0


def _quantifiers(items, repeated):
    """Count the quantifiers of a parsed regex; raise ValueError on constructs that backtrack exponentially."""
    count = 0
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = av
            if repeated:
                raise ValueError("a quantifier inside a repeated group")
            count += lo != hi
            count += _quantifiers(sub, repeated or hi > 1)
        elif name == "BRANCH":
            if repeated:
                raise ValueError("an alternation inside a repeated group")
            count += sum(_quantifiers(branch, repeated) for branch in av[1])
        elif name == "SUBPATTERN":
            count += _quantifiers(av[-1], repeated)
        elif name == "ATOMIC_GROUP":
            count += _quantifiers(av, repeated)
        elif name in ("ASSERT", "ASSERT_NOT"):
            count += _quantifiers(av[1], repeated)
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            raise ValueError("a backreference")
    return count


@functools.lru_cache(maxsize=1024)
def pattern_key_regex(key):
    """The compiled PEFT pattern ``(.*\\.)?(key)$`` of a rank_pattern/alpha_pattern key.

    PEFT (``peft.utils.other.get_pattern_key``) matches a key ``p`` against
    a module path with ``re.match(rf"(.*\\.)?({p})$", path)``: the key must
    match a whole dot-separated suffix of the path. The same regex is used
    here, but only for keys whose matching time is bounded: Python's regex
    engine backtracks, and a key such as ``(a+)+b`` takes exponential time
    (minutes on one module path). Refused: a quantifier or an alternation
    inside a repeated group (``(a+)+``, ``(a|ab)*``, ``(a?){30}``), a
    backreference, and more than ``MAX_PATTERN_QUANTIFIERS`` quantifiers
    (sequential optional parts such as ``a?a?a?...`` backtrack exponentially
    too). Plain module paths, anchors, ``.*``, ``\\d+`` and alternations such
    as ``(q|v)_proj`` are accepted.

    Returns
    -------
    re.Pattern

    Raises
    ------
    ValueError
        An invalid regex, or one of the constructs above (the message says which).
    """
    if not isinstance(key, str):
        raise ValueError(f"key {key!r} is not a string")
    full = rf"(.*\.)?({key})$"
    try:
        compiled = re.compile(full)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"key {key!r} is not a valid regex ({e})") from None
    try:
        count = _quantifiers(_regex_parser().parse(full), False) - 2  # the two of the prefix (.*\.)?
    except ValueError as e:
        raise ValueError(
            f"key {key!r} has {e}, whose matching time can grow exponentially with the module path's "
            f"length; write the key without it (e.g. list the module paths)"
        ) from None
    except RecursionError:
        raise ValueError(f"key {key!r} nests too deeply") from None
    if count > MAX_PATTERN_QUANTIFIERS:
        raise ValueError(
            f"key {key!r} has {count} quantifiers (at most {MAX_PATTERN_QUANTIFIERS}: each one multiplies "
            f"the matching time by up to the module path's length)"
        )
    return compiled


def _regex_parser():
    try:
        import re._parser as parser  # Python 3.11+
    except ImportError:  # pragma: no cover  (Python 3.10)
        import sre_parse as parser
    return parser


def pattern_matches(key, module):
    """PEFT's rule: whether pattern key ``key`` matches module path ``module`` (see ``pattern_key_regex``).

    Raises
    ------
    ValueError
        A key refused by ``pattern_key_regex``, or a module path longer than
        ``MAX_MODULE_PATH`` characters.
    """
    if len(module) > MAX_MODULE_PATH or "\n" in module:
        raise ValueError(
            f"module path {_show(module)} ({len(module)} characters) is not matched against pattern keys: "
            f"a module path has at most {MAX_MODULE_PATH} characters and no line break"
        )
    return pattern_key_regex(key).match(module) is not None


def _check_field_types(d, source):
    """ValueError naming the file and the field for a field of the wrong JSON type.

    The numbers and patterns that change the math must be what PEFT writes:
    ``lora_alpha`` a number (not ``"16"``), ``rank_pattern`` an object of
    regex -> positive int, and so on; anything else would fail later with a
    message naming neither the file nor the field.
    """

    def bad(name, want):
        return ValueError(f"{source}: field {name!r} must be {want}, got {_show(d[name])}")

    present = lambda name: d.get(name) is not None  # noqa: E731  (null means the default)
    if present("peft_type") and not isinstance(d["peft_type"], str):
        raise bad("peft_type", "a string")
    for name in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if present(name) and not isinstance(d[name], bool):
            raise bad(name, "true or false")
    if present("r") and not _is_rank(d["r"]):
        raise bad("r", "a positive integer below 2**31")
    if present("lora_alpha") and not _is_real(d["lora_alpha"]):
        raise bad("lora_alpha", "a finite number")
    if present("lora_dropout") and not _is_real(d["lora_dropout"]):
        raise bad("lora_dropout", "a number in [0, 1)")
    for name in ("target_modules", "modules_to_save"):
        v = d.get(name)
        if v is None or (name == "target_modules" and isinstance(v, str)):
            continue
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            raise bad(name, "a list of module names" + (" or a regex string" if name == "target_modules" else ""))
    for name, check, want in (
        ("rank_pattern", _is_rank, "positive integers below 2**31"),
        ("alpha_pattern", _is_real, "finite numbers"),
    ):
        pattern = d.get(name)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(name, "an object of {regex: value}")
        for key, value in pattern.items():
            try:
                pattern_key_regex(key)
            except ValueError as e:
                raise ValueError(f"{source}: field {name!r}: {e}") from None
            if not check(value):
                raise ValueError(f"{source}: field {name!r}: {key!r} maps to {_show(value)}; values must be {want}")


# initialisations that replace the base weight W by a residual (docs/peft_dora.md, Sec. 1 "Initial magnitude")
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class LoraAdapterConfig:
    """The fields of a PEFT ``LoraConfig`` that change the math.

    Attributes
    ----------
    r : int
        Default rank (PEFT default 8).
    lora_alpha : float
        Default alpha (PEFT default 8).
    use_dora : bool
        DoRA (a magnitude per module) or plain LoRA.
    use_rslora : bool
        Scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
    lora_dropout : float
        Dropout on the adapter's input in training (docs/peft_dora.md, Sec. 1 "The forward").
    fan_in_fan_out : bool
        Base weights stored (in, out), as GPT-2's ``Conv1D``. PEFT overwrites
        it per module type, so a saved adapter holds the value for the last
        module PEFT visited: ``resolve_fan_in_fan_out`` says when it is used.
    target_modules : list of str, str, or None
    rank_pattern, alpha_pattern : dict of str to number
        Per-module rank and alpha; keys are regexes matched as PEFT matches
        them (see ``rank_and_alpha``).
    extra : dict
        Every other field of ``adapter_config.json``, written back unchanged.
    source : str
        Where the config was read from (the file), named in error messages.
    """

    r: int = 8
    lora_alpha: float = 8
    use_dora: bool = False
    use_rslora: bool = False
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    target_modules: object = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    #: where the config came from, for messages (not written back)
    source: str = field(default="adapter config", repr=False, compare=False)

    _FIELDS = ("r", "lora_alpha", "use_dora", "use_rslora", "lora_dropout", "fan_in_fan_out",
               "target_modules", "rank_pattern", "alpha_pattern")  # fmt: skip

    @classmethod
    def from_dict(cls, d, *, source="adapter config"):
        """Build from the dict of an ``adapter_config.json``.

        Warns (``UserWarning``) for PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA
        initialisations, whose adapters apply to a rewritten (residual) base.

        Raises
        ------
        ValueError
            If it is not a LoRA config, or asks for something unsupported
            (``lora_bias``, ``trainable_token_indices``, ``bias != "none"``, other
            LoRA variants): the message names the field.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of config fields, got {type(d).__name__}")
        d = dict(d)
        _check_field_types(d, source)
        peft_type = "LORA" if d.get("peft_type") is None else d["peft_type"]
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type is {_show(peft_type)}; only LoRA/DoRA adapters are supported")
        for name, what in _UNSUPPORTED_FIELDS.items():
            if d.get(name):
                raise ValueError(f"{source}: {name}={_show(d[name])} ({what}) is not supported by dora_ref")
        bias = d.get("bias", "none")
        if bias is None:  # PEFT 0.21 fails on it too (AttributeError in _mark_only_adapters_as_trainable)
            raise ValueError(
                f"{source}: field 'bias' is null; PEFT's LoraConfig takes 'none', 'all' or 'lora_only' "
                f"(PEFT itself cannot load a null bias). Write \"none\" if the adapter saved no biases"
            )
        if bias in ("all", "lora_only"):
            raise ValueError(
                f"{source}: bias={bias!r} (base biases trained and saved in the adapter) "
                f"is not supported; only bias='none'"
            )
        if bias != "none":
            raise ValueError(f"{source}: field 'bias' must be 'none', 'all' or 'lora_only', got {_show(bias)}")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            warnings.warn(
                f"{source}: init_lora_weights={d['init_lora_weights']!r} rewrote the base weights when "
                f"the adapter was created, so this adapter applies to that *residual* base, not to the "
                f"original model. Use it with the residual model, or convert it first with PEFT's "
                f"save_pretrained(..., path_initial_model_for_weight_conversion=...).",
                UserWarning,
                stacklevel=3,
            )
        kw = {k: d.pop(k) for k in cls._FIELDS if k in d and d[k] is not None}
        cfg = cls(**kw, extra=d, source=str(source))
        if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r <= 0:
            raise ValueError(f"{source}: r must be a positive integer, got {cfg.r!r}")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            raise ValueError(f"{source}: lora_dropout must be in [0, 1), got {cfg.lora_dropout!r}")
        return cfg

    def to_dict(self):
        """The ``adapter_config.json`` dict (PEFT's field names)."""
        d = {"peft_type": "LORA", "bias": "none", "lora_bias": False, "task_type": None,
             "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}  # fmt: skip
        d.update(self.extra)
        d.update({k: getattr(self, k) for k in self._FIELDS})
        return d

    def rank_and_alpha(self, module):
        """(r, alpha) of ``module``, a path such as ``model.layers.0.mlp.up_proj``.

        PEFT ``get_pattern_key``: the first key ``p`` of ``rank_pattern``
        (``alpha_pattern``), in the file's order, for which
        ``re.match(rf"(.*\\.)?({p})$", module)`` matches gives the value;
        otherwise ``r`` (``lora_alpha``). Keys whose matching time is not
        bounded are refused (``pattern_key_regex``); as a backstop, the
        matches for one module may take at most ``PATTERN_TIME_BUDGET``
        seconds (per call, so a config kept for long is not worn down).

        Raises
        ------
        ValueError
            Naming the field, the key and ``source``.
        """

        spent = [0.0]  # seconds of matching in this call

        def lookup(name, pattern, default):
            for key, value in pattern.items():
                start = time.perf_counter()
                try:
                    hit = pattern_matches(key, module)
                except ValueError as e:
                    raise ValueError(f"{self.source}: field {name!r}: {e}") from None
                spent[0] += time.perf_counter() - start
                if spent[0] > PATTERN_TIME_BUDGET:
                    raise ValueError(
                        f"{self.source}: field {name!r}: matching its keys against the module paths took "
                        f"over {PATTERN_TIME_BUDGET:g} s (last key {_show(key)}, module {_show(module)}); "
                        f"simplify the keys (e.g. list the module paths)"
                    )
                if hit:
                    return value
            return default

        return (lookup("rank_pattern", self.rank_pattern, self.r),
                lookup("alpha_pattern", self.alpha_pattern, self.lora_alpha))  # fmt: skip

    def scaling(self, module):
        """PEFT's scaling of ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_and_alpha(module)
        return lora_scaling(int(r), alpha, self.use_rslora)


def read_config(directory):
    """Read and check ``adapter_config.json`` of an adapter directory.

    Returns
    -------
    LoraAdapterConfig

    Raises
    ------
    FileNotFoundError, ValueError
        A missing file, invalid JSON, or an unsupported config.
    """
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():  # anything else (a directory, no permission): the OS's own reason below
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG} (is this a PEFT adapter directory?)")
    try:
        d = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise ValueError(f"{path}: not valid JSON ({e}); the file may be truncated") from None
    return LoraAdapterConfig.from_dict(d, source=str(path))


# ---------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------


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
    """

    config: LoraAdapterConfig
    modules: dict
    replaced: dict = field(default_factory=dict)

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
        (the LyCORIS convention (1, in) or (in,) gets a message saying so).
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
        for key in f.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if not _KEY.match(name) and adapter.replacement_key(name):
                adapter.replaced[name] = f.get(key)
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
    if not adapter.modules and not adapter.replaced:
        raise ValueError(f"{weights}: no LoRA tensors found")
    return adapter


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
        Created if needed.
    adapter : PeftAdapter

    Raises
    ------
    ValueError
        If a module's rank, scaling or magnitude disagrees with the config.
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
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def _layer_parts(layer):
    """(kind, A, B, magnitude (out,) or None) of a dora_ref layer, in PEFT's shapes."""
    if hasattr(layer, "lora_embedding_A"):  # DoRAEmbedding: A (r, V), B (D, r)
        kind, A, B = "embedding", layer.lora_embedding_A, layer.lora_embedding_B
    else:
        A, B = layer.lora_A, layer.lora_B
        kind = "conv" if np.ndim(A) > 2 else "linear"
    m = getattr(layer, "lora_magnitude_vector", None)
    return kind, A, B, None if m is None else np.reshape(m, -1)


def adapter_from_layers(layers, *, fan_in_fan_out=False, lora_dropout=None, **config_fields):
    """Collect dora_ref layers into a ``PeftAdapter`` for ``save_adapter``.

    The config gets the most common rank and alpha as ``r``/``lora_alpha``,
    and ``rank_pattern``/``alpha_pattern`` entries for the others, so that
    PEFT gives every module its own rank and scaling back. Each entry is the
    module's escaped full path anchored with ``^``: PEFT matches a key ``p``
    as ``(.*\\.)?(p)$``, under which a bare ``proj`` would also match
    ``block.proj``, while ``^proj`` matches ``proj`` only.
    ``target_modules`` lists the module paths.

    Parameters
    ----------
    layers : dict of str to layer
        Module path in the base model -> ``DoRALinear``/``LoRALinear``,
        ``DoRAEmbedding``, or a ``dora_ref.conv`` layer (what
        ``build_layers`` returns). All DoRA or all LoRA.
    fan_in_fan_out : bool, default False
        Recorded in the config (set it for GPT-2 ``Conv1D`` modules).
    lora_dropout : float, optional
        Default: the most common ``lora_dropout`` of the layers that have one
        (embeddings have none: PEFT applies no dropout to them), else 0.
    **config_fields
        Other ``adapter_config.json`` fields (e.g. ``base_model_name_or_path``).

    Returns
    -------
    PeftAdapter

    Raises
    ------
    ValueError
        On an empty mapping, a mix of DoRA and LoRA layers, mixed rsLoRA,
        or merged layers.
    """
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
        target_modules=sorted(layers),
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
# matching an adapter to base weights
# ---------------------------------------------------------------------------


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
        "once, under the other module's name"
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


# ---------------------------------------------------------------------------
# layers, forward and merge from adapter + base
# ---------------------------------------------------------------------------


def build_layers(adapter, base, *, modules=None, lora_dropout=None, rng=None, detach_norm=True,
                 fan_in_fan_out=None):  # fmt: skip
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
        checkpoint: build ``dora_ref.conv.DoRAConv2d`` etc. from
        ``adapter.modules[name]`` yourself; ``merge_weight`` needs no
        geometry and merges it); a plain-LoRA embedding.
    """
    if not isinstance(adapter, PeftAdapter):
        adapter = load_adapter(adapter)
    if not hasattr(base, "keys") or isinstance(base, (str, os.PathLike)):
        base = BaseWeights(base)
    cfg = adapter.config
    keys = set(base.keys())
    layers, fifo = {}, {}
    rng = np.random.default_rng(rng)
    names = list(adapter.modules) if modules is None else list(modules)
    orientation = resolve_fan_in_fan_out(adapter, base, fan_in_fan_out)
    for name in names:
        if name not in adapter.modules:
            raise KeyError(f"the adapter has no module {name!r}")
        mod = adapter.modules[name]
        wkey = weight_key(name, keys)
        W = base.get(wkey) if isinstance(base, BaseWeights) else np.asarray(base[wkey])
        fifo[name] = is_fan_in_fan_out(mod, W.shape, orientation.get(name), key=wkey)
        cdt = _compute_dtype(W.dtype)
        if mod.kind != "linear":
            layers[name] = _build_non_linear(name, mod, W.astype(cdt), cfg, rng, detach_norm)
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


def _build_non_linear(name, mod, W, cfg, rng, detach_norm):
    if mod.kind == "conv":
        raise ValueError(
            f"module {name!r} is a convolution: its stride, padding and dilation are not stored in "
            f"a checkpoint, so build dora_ref.conv.DoRAConv{mod.lora_A.ndim - 2}d from "
            f"adapter.modules[{name!r}] with the geometry yourself (merge_weight needs none)"
        )
    if mod.magnitude is None:
        raise ValueError(f"module {name!r}: plain-LoRA embeddings have no layer in dora_ref")
    from ..layers.embedding import DoRAEmbedding

    layer = DoRAEmbedding(W, r=mod.r, lora_alpha=mod.lora_alpha, use_rslora=cfg.use_rslora,
                          rng=rng, detach_norm=detach_norm)  # fmt: skip
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
    magnitude); a DoRA row norm n so small that m / n overflows the compute
    dtype; W0 + s B A itself overflowing it; merged values beyond the stored
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
                why = f"the row norm n = ||W0 + s*B@A|| is so small that m / n overflows {cdt.name}"
                value, show = n, "smallest n"
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
        two adapters, or also adapted by LoRA.
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
            out[key] = arr
    return out


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
