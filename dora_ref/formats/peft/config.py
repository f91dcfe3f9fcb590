"""PEFT's ``adapter_config.json``: the fields dora_ref reads and checks, and
PEFT's ``rank_pattern`` / ``alpha_pattern`` key matching, at a bounded cost.
"""
from __future__ import annotations

import functools
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ...core._validate import check_scaling
from ..safetensors_io import read_regular_text


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


def _lora_scaling(r, lora_alpha, use_rslora):
    """``dora_ref.layers.lora_scaling`` (alpha / r, or alpha / sqrt(r) with rsLoRA; the same checks).

    Here rather than imported, so that reading an adapter imports no layer:
    ``dora_ref.layers`` is a fifth of ``dora-ref merge``'s start.
    ``tests/test_peft_io.py`` checks that the two agree.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    lora_alpha = check_scaling(lora_alpha)
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


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
    return bounded_regex(rf"(.*\.)?({key})$", 2, key)  # the two quantifiers of the prefix (.*\.)?


def bounded_regex(full, own, key):
    """``full`` compiled, if its matching time is bounded by ``pattern_key_regex``'s rules,
    counting the quantifiers of ``full`` less ``own`` (those PEFT puts around the user's
    string ``key``, which the messages name); else ValueError.

    ``pattern_key_regex`` for rank_pattern/alpha_pattern keys, and
    ``adapter.config_selects`` for the strings PEFT matches module paths
    against (target_modules, exclude_modules, modules_to_save, layers_pattern).
    """
    try:
        compiled = re.compile(full)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"key {key!r} is not a valid regex ({e})") from None
    try:
        count = _quantifiers(_regex_parser().parse(full), False) - own
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
        return _lora_scaling(int(r), alpha, self.use_rslora)


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
    text = read_regular_text(path)
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise ValueError(f"{path}: not valid JSON ({e}); the file may be truncated") from None
    return LoraAdapterConfig.from_dict(d, source=str(path))
