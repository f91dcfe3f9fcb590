"""Calling a port and comparing it: the search, the shrinking, the errors it raises.

``_run`` draws cases (hypothesis), calls the port in its own convention,
compares every output with the reference within its tolerance, and for a
mismatch shrinks the case and ranks the known mistakes that explain it
(``dora_ref.porting.diagnosis``) before raising ``ConformanceError``.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from . import conventions as _C
from . import diagnosis as _D
from . import layer_checks as _L
from .cases import make_case, reference, tolerances
from ..core.precision import finfo
from .hints import HINTS
from .tolerance import as_dtype, is_low_precision


class ConformanceError(AssertionError):
    """A port disagrees with dora_ref beyond the tolerance.

    Attributes
    ----------
    check : str
        "forward", "backward" or "merge".
    output : str
        The output that differs ("y", "dA", "W_merged", "W0_unmerged", ...).
    index : tuple of int or None
        The worst element (None if the output has the wrong shape or the port raised).
    expected, got : float or None
    bound : float or None
        The tolerance that applied to that element.
    case : Case
        The (shrunk) case; ``case.describe()`` says it in words,
        ``make_case(**case.params)`` rebuilds it.
    hint : str or None
        A key of ``HINTS``: the top-ranked explanation (``diagnoses[0]``),
        when the port's numbers match a known mistake; for a pair of mistakes
        the first of the two.
    diagnoses : list of Diagnosis
        Every known variant consistent with the port's outputs, ranked, each
        with its evidence (``key``, ``rank``, ``kind``, ``probes``,
        ``evidence``, ``detail``); empty when none is.
    """

    def __init__(self, message, *, check, output, index, expected, got, bound, case, hint, diagnoses=()):
        super().__init__(message)
        self.check = check
        self.output = output
        self.index = index
        self.expected = expected
        self.got = got
        self.bound = bound
        self.case = case
        self.hint = hint
        self.diagnoses = list(diagnoses)


class CheckResult(NamedTuple):
    """What a passing check measured.

    Attributes
    ----------
    check : str
    examples : int
        Drawn cases compared (hypothesis's ``max_examples``).
    worst_ratio : float
        The largest error / tolerance seen (below 1, since the check passed), the wide cases included.
    worst_output : str
        The output where it was seen.
    wide : int
        Wide cases compared after the draws (``WIDE_CASES``; 0 for the Embedding, Conv and chain checks).
    """

    check: str
    examples: int
    worst_ratio: float
    worst_output: str
    wide: int = 0


class _Mismatch(Exception):
    """Raised inside a hypothesis example; carries what differed."""

    def __init__(self, case, info, raised=None, seen=None):
        super().__init__(info["text"])
        self.case = case
        self.info = info
        self.raised = raised
        self.seen = seen  # (the port's outputs, the reference, the tolerances) where they were compared
        self.wide = False  # True: found on one of WIDE_CASES, which is not shrunk
        self.flaky = False  # True: the case passed when hypothesis ran it again
        self.wrong_type = False  # True: an output of the wrong kind (WrongOutputType): no numbers to explain


def _compare(got, expected, tols):
    """Compare outputs: (inf, mismatch info) at the first mismatch, else (worst ratio, its output's name)."""
    worst, worst_name = 0.0, None  # without a mismatch: the largest error / tolerance, and where
    for name, exp in expected.items():
        g = got[name]
        if g.shape != exp.shape:
            return np.inf, dict(
                output=name, index=None, expected=None, got=None, bound=None,
                text=f"output {name} has shape {g.shape}, expected {exp.shape}",
            )
        atol = tols[name]["atol"]
        err = np.abs(g.astype(np.float64) - exp)
        err = np.where(np.isnan(err), np.inf, err)
        ratio = err / atol if atol > 0 else np.where(err > 0, np.inf, 0.0)
        if ratio.size and np.max(ratio) > 1.0:
            idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
            t = tols[name]
            info = dict(
                output=name, index=tuple(int(i) for i in idx), expected=float(exp[idx]),
                got=float(g[idx]), bound=float(atol),
            )
            info["text"] = (
                f"output {name}, index {info['index']}: expected {info['expected']!r}, "
                f"got {info['got']!r}; error {float(err[idx]):.3g} > tolerance {atol:.3g} "
                f"(rtol {t['rtol']:.3g} for {t['dtype']} "
                f"with k = {t['k']}, times the term scale {t['scale']:.3g}; see dora_ref.porting.tolerance)"
            )
            return np.inf, info
        r = float(np.max(ratio, initial=0.0))
        if r >= worst:
            worst, worst_name = r, name
    return worst, worst_name


def _init_identity_case(case):
    """The case with B = 0 and the magnitude at its initial value ||W0||_row (in the magnitude's dtype)."""
    c = dataclasses.replace(case, B=np.zeros_like(case.B), params=dict(case.params, B_zero=True, magnitude="init"))
    ref = reference(c)
    return dataclasses.replace(c, magnitude=ref["weight_norm"].astype(case.magnitude.dtype))


def _reference_and_tolerances(check, case, detach_norm):
    """Expected outputs and their tolerances for one check (``init`` adds its own two)."""
    ref = reference(case, detach_norm=detach_norm)
    tols = tolerances(case, detach_norm=detach_norm)
    if check == "init":  # the magnitude at init is the norm; with B = 0 the layer is the base layer
        ref = dict(ref, magnitude=ref["weight_norm"])
        tols = dict(tols, magnitude=tols["weight_norm"])
        c0 = _init_identity_case(case)
        c64 = c0.astype(np.float64)
        ref["y_identity"] = c64.x @ c64.W0.T + (0.0 if c64.bias is None else c64.bias)
        tols["y_identity"] = tolerances(c0)["y"]
    return ref, tols


def _hypothesis():
    try:
        import hypothesis
        import hypothesis.strategies
    except ImportError as exc:  # pragma: no cover - exercised with hypothesis hidden
        raise ImportError(
            "dora_ref.porting.testing needs hypothesis to draw cases: pip install hypothesis "
            "(in a checkout of dora_ref, pip install -e \".[porting]\" brings it)"
        ) from exc
    return hypothesis


def _case_strategy(st, dtype, dropout, conv=None, cases=None):
    """Hypothesis strategy for ``make_case``'s parameters; shrinks towards small, plain cases.

    ``cases`` restricts it: parameter -> a value, a list / tuple / range of
    values, or a hypothesis strategy.
    """
    conv = conv or _C.Convention()
    fields_ = {
        "N": st.integers(1, 6),
        "in_features": st.integers(1, 8),
        "out_features": st.integers(1, 8),
        "r": st.integers(1, 6),
        "dtype": st.just(str(np.dtype(dtype))),
        "scaling": st.sampled_from([2.0, 0.5, 1.0 / 3.0, 8.0]),
        "bias": st.booleans(),
        "B_zero": st.booleans(),
        "magnitude": st.sampled_from(["trained", "init"]),
        # float16 overflows past 65504: its large weights are 10, not 1e3
        "weight_scale": st.sampled_from([1.0, 1e-3, 10.0 if np.dtype(dtype).name == "float16" else 1e3]),
        "dropout_p": st.just(0.5) if dropout else st.just(0.0),
        "seed": st.integers(0, 2**16),
    }
    if conv.scaling == "lora_alpha":
        fields_["lora_alpha"] = st.sampled_from([16.0, 1.0, 8.0, 3.0])
        fields_["use_rslora"] = st.booleans()
    if conv.per_input_column:
        fields_["magnitude_axis"] = st.just("in")
    for key, value in (cases or {}).items():
        if key in ("dtype", "dropout_p", "magnitude_axis"):
            raise ValueError(f"cases= cannot set {key!r}: it follows the check's own arguments")
        if key not in fields_ and key not in ("bias_scale", "lora_alpha", "use_rslora"):
            raise ValueError(f"cases= has an unknown parameter {key!r}; make_case takes {sorted(fields_)}")
        fields_[key] = _L.as_strategy(st, key, value)
    return st.fixed_dictionaries(fields_)


#: Cases past one tile on every axis, run after the hypothesis draws (which stay small, N <= 6, in and
#: out <= 8, r <= 6, so that a mismatch shrinks fast): each size is odd, so that a kernel tiled by 8,
#: 16, 32 or 64 over N, in or out (8, 16 or 32 over r) has a ragged last tile, and one that drops or
#: misreads that tile fails. The same shapes as the golden vectors' linear_wide and linear_wide_no_bias.
#: The last one is the opposite: every size a whole number of tiles (N and out 64, in 128, r
#: 16), for a port whose path for whole tiles (taken when N % 8 == 0, say) is wrong while its
#: ragged path is right: a port wrong only there passed 1,000 drawn cases and the two ragged
#: wide cases (an adversarial test, session 24). The golden vectors' linear_wide_aligned.
WIDE_CASES = (
    dict(N=67, in_features=127, out_features=97, r=33, scaling=2.0, bias=True, seed=67),
    dict(N=71, in_features=67, out_features=79, r=17, scaling=0.5, bias=False, seed=71),
    dict(N=64, in_features=128, out_features=64, r=16, scaling=1.5, bias=True, seed=64),
)
_SHAPE_KEYS = ("N", "in_features", "out_features", "r")


def wide_cases(dtype, dropout=False, convention=None, cases=None):
    """The ``make_case`` parameters of the wide cases a check runs after its hypothesis draws.

    Parameters
    ----------
    dtype : dtype or name
    dropout : bool
    convention : Convention, optional
        ``scaling="lora_alpha"`` adds ``lora_alpha`` / ``use_rslora``; the per-input-column layer
        ``magnitude_axis="in"``.
    cases : dict, optional
        The check's ``cases=`` restriction: a single value replaces the wide case's; a list / tuple /
        range keeps the wide value if it is among them, else takes the largest (N, in_features,
        out_features, r) or the first (the rest); a hypothesis strategy, whose values cannot be listed,
        leaves the wide cases out.

    Returns
    -------
    list of dict
        Each a ``make_case(**params)`` argument set (B random, a trained magnitude, weight scale 1).
    """
    conv = convention or _C.Convention()
    out = []
    for j, wide in enumerate(WIDE_CASES):
        params = dict(wide, dtype=str(as_dtype(dtype)), B_zero=False, magnitude="trained", weight_scale=1.0,
                      dropout_p=0.5 if dropout else 0.0)
        if conv.scaling == "lora_alpha":
            params.update(lora_alpha=16.0, use_rslora=bool(j % 2))
        if conv.per_input_column:
            params["magnitude_axis"] = "in"
        for key, value in (cases or {}).items():
            if hasattr(value, "example") and hasattr(value, "map"):  # a hypothesis strategy
                return []
            if isinstance(value, (list, tuple, range)):
                allowed = list(value)
                if params.get(key) not in allowed:
                    params[key] = max(allowed) if key in _SHAPE_KEYS else allowed[0]
            else:
                params[key] = value
        out.append(params)
    return out


class Report(NamedTuple):
    """What ``report="all"`` returns: every output checked on its own.

    Attributes
    ----------
    check : str
    passed : dict of str to CheckResult
        The outputs that passed.
    failures : list of ConformanceError
        One per failing output, each on its own shrunk case with its diagnosis.
    """

    check: str
    passed: dict
    failures: list

    @property
    def ok(self):
        return not self.failures

    def __str__(self):
        lines = [f"check_{self.check}: {len(self.passed)} output(s) pass, {len(self.failures)} fail"]
        lines += [f"  pass {name}: {r.examples} cases, worst error / tolerance {r.worst_ratio:.3g}"
                  for name, r in self.passed.items()]
        lines += [str(f) for f in self.failures]
        return "\n".join(lines)


def _settings(hyp, max_examples):
    """The hypothesis settings of every check: quiet, no deadline, no database, shrink."""
    return hyp.settings(
        max_examples=max_examples, deadline=None, database=None,
        verbosity=hyp.Verbosity.quiet, report_multiple_bugs=False,
        suppress_health_check=list(hyp.HealthCheck),
        # no "explain" phase: it reruns the shrunk case hundreds of times to say which
        # arguments could vary, which the message already makes plain
        phases=[hyp.Phase.explicit, hyp.Phase.generate, hyp.Phase.shrink],
    )


def _search(check, fn, unmerge, conv, names, *, dtype, dropout, detach_norm, max_examples, seed, cases):
    """Draw cases until one fails on ``names`` (returns the shrunk _Mismatch) or all pass (CheckResult)."""
    hyp = _hypothesis()
    return _hunt(
        check, names, _case_strategy(hyp.strategies, dtype, dropout, conv, cases), make_case,
        lambda case: _C.call_port(check, fn, unmerge, case, conv, dropout),
        lambda case: _reference_and_tolerances(check, case, detach_norm),
        max_examples=max_examples, seed=seed, wide=wide_cases(dtype, dropout, conv, cases),
    )


def _hunt(check, names, strategy, build, call, expect, *, max_examples, seed, wide=()):
    """The search every check runs: hypothesis draws parameters from ``strategy``,
    ``build(params)`` makes the case, ``call(case)`` runs the port (its outputs
    by name), ``expect(case)`` gives the reference and the tolerances; the first
    mismatch is shrunk and returned as a _Mismatch, else a CheckResult. When the
    draws pass, each parameter set of ``wide`` is run as it is (no shrinking: a
    mismatch there is returned on that case, marked ``wide``)."""
    hyp = _hypothesis()
    stats = {"examples": 0, "worst": 0.0, "where": "", "wide": 0}

    def run(params, counter="examples"):
        case = build(**params)
        try:
            got = call(case)
        except _C.ShapeMismatch as exc:  # diagnosed as a port that raised: other layouts are tried
            raise _Mismatch(case, dict(output=exc.output, index=None, expected=None, got=None, bound=None,
                                       text=str(exc)), exc) from exc
        except Exception as exc:  # noqa: BLE001 - reported as a mismatch, shrunk like one
            wrote = isinstance(exc, _C.PortContract)  # its own message says what it broke
            text = str(exc) if wrote else f"your {check} raised {type(exc).__name__}: {exc}"
            mismatch = _Mismatch(case, dict(
                output=None, index=None, expected=None, got=None, bound=None, text=text,
            ), None if wrote else exc)
            mismatch.wrong_type = isinstance(exc, _C.WrongOutputType)
            raise mismatch from exc
        ref, tols = expect(case)
        ratio, info = _compare({k: got[k] for k in names}, {k: ref[k] for k in names}, tols)
        if ratio == np.inf:
            raise _Mismatch(case, info, seen=(got, ref, tols))
        stats[counter] += 1
        if ratio >= stats["worst"]:
            stats["worst"], stats["where"] = ratio, info

    @_settings(hyp, max_examples)
    @hyp.seed(seed)
    @hyp.given(strategy)
    def one_case(params):
        run(params)

    try:
        one_case()
    except _Mismatch as exc:
        return exc
    except hyp.errors.Flaky as exc:  # a case failed, then passed when run again: a port that varies
        found = _mismatch_in(exc)
        if found is None:
            raise
        found.flaky = True
        found.info = dict(found.info, text=(
            "your port is not deterministic: this case failed, then passed when it was run again with the "
            "same inputs (state kept between calls, randomness other than the dropout given, or memory "
            f"read before it is written?); the failing run: {found.info['text']}"))
        return found
    for params in wide:
        try:
            run(params, "wide")
        except _Mismatch as exc:
            exc.wide = True
            return exc
    return CheckResult(check, stats["examples"], stats["worst"], stats["where"] or "", stats["wide"])


def _mismatch_in(exc):
    """The first _Mismatch inside hypothesis's error (an exception group), or None."""
    if isinstance(exc, _Mismatch):
        return exc
    for inner in list(getattr(exc, "exceptions", ())) + [exc.__cause__, exc.__context__]:
        if inner is not None and inner is not exc:
            found = _mismatch_in(inner)
            if found is not None:
                return found
    return None


def _error(check, fn, unmerge, conv, exc, dropout, detach_norm):
    """The ConformanceError for a shrunk mismatch, with its diagnosis."""
    if exc.flaky or exc.wrong_type:  # numbers that change from call to call, or the wrong kind: no diagnosis
        return _error_from(check, exc, [], "", conv.changed())
    diagnoses = _D.diagnose(check, fn, unmerge, exc.case, conv, dropout, detach_norm, raised=exc.raised)
    if exc.wide and exc.raised is None:  # the drawn cases passed: locate the ragged tile first
        located = _D.locate_tile(check, fn, unmerge, exc.case, conv, dropout, detach_norm, seen=exc.seen)
        if located is not None:
            diagnoses = [located] + [dataclasses.replace(d, rank=d.rank + 1) for d in diagnoses]
    mode = ""
    if check == "backward":
        mode = " (detached norm)" if detach_norm else " (exact gradient)"
    factor = None
    if not diagnoses and exc.raised is None:
        factor = _constant_factor(check, fn, unmerge, exc, conv, dropout, detach_norm)
    return _error_from(check, exc, diagnoses, mode, conv.changed(), factor)


def _error_from(check, exc, diagnoses, mode="", changed=None, factor=None):
    """The ConformanceError for a shrunk mismatch and its ranked diagnoses (``factor``: what
    ``_constant_factor`` found, when nothing else explains it)."""
    info = exc.info
    if exc.wide and all(exc.case.params[k] > 8 and exc.case.params[k] % 8 == 0 for k in _SHAPE_KEYS):
        found = ("on this aligned wide case (run after the small drawn cases passed; N, in, out and r "
                 "whole tiles of 8 and 16, N, in and out of 64 too: a path taken only for whole tiles? "
                 "not shrunk)")
    elif exc.wide:
        found = ("on this wide case (run after the small drawn cases passed; N, in, out and r past one tile "
                 "of 8 to 64 with a ragged tail: a tiled kernel's last tile? not shrunk)")
    else:
        found = "on this minimal case (found by hypothesis, then shrunk)"
    lines = [
        f"check_{check}{mode}: your {check} differs from dora_ref {found}:",
        f"  case: {exc.case.describe()}",
    ]
    if changed:
        lines.append("  convention: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    lines.append(f"  {info['text']}")
    hint = diagnoses[0].key.split(" + ")[0] if diagnoses else None
    if diagnoses:
        top = diagnoses[0]
        lines.append(f"  hint (rank 1 of {len(diagnoses)}, {top.kind} on {top.probes} probe(s)): "
                     + top.describe(HINTS))
        for ev in top.evidence:
            lines.append(f"    - {ev}")
        for d in diagnoses[1:]:
            lines.append(f"  also consistent (rank {d.rank}, {d.kind} on {d.probes} probe(s)): {d.key}"
                         + (f" ({d.detail})" if d.detail else ""))
    elif not (exc.flaky or exc.wrong_type):  # those say what is wrong themselves
        lines.append("  hint: none; no known mistake (dora_ref.porting.variants) explains these numbers")
        if factor is not None:
            lines.append(f"    - but {factor}")
    return ConformanceError(
        "\n".join(lines), check=check, output=info["output"], index=info["index"],
        expected=info["expected"], got=info["got"], bound=info["bound"], case=exc.case, hint=hint,
        diagnoses=diagnoses,
    )


def _constant_factor(check, fn, unmerge, exc, conv, dropout, detach_norm):
    """The mismatching output as one constant times dora_ref's, element for element, in words; or None.

    A scaling left out or applied twice (dA without s), a factor of 2 from the
    derivative of a square, a sign: none of them is one of the named mistakes
    of ``dora_ref.porting.variants``, and each multiplies one output by a
    constant (a new user's ports: dA / s and 2 * dmagnitude got "hint: none").
    The shrunk case is often one element, where any error is a constant
    factor, so the port runs again on the case widened to at least
    (N, in, out, r) = (5, 6, 7, 3), and on a second one with other sizes and
    another s (N + 1, in + 3, out + 4, r + 2; s = 8, or 0.375 where s was 8;
    with ``lora_alpha``, four times it), so that a literal 2 is not called
    s = 2 (a second new user's case) nor a batch mean 1/r (an adversary's).
    A constant is found on a case (``_factor_on``) when at least two elements
    of the reference are well above the tolerance (eight times), the median c
    of their ratios is finite, neither 0 nor 1, and every element of the
    output is c times the reference's within the tolerance scaled by 1 + |c|.
    It is named when one of s, 1/s, s**2, 1/s**2, r, 1/r, sqrt(r),
    1/sqrt(r), N, 1/N, out, 1/out, in, 1/in, 2, 1/2 or -1 matches it on both
    cases, to 16 units of the output dtype's roundoff (at least 1e-6).
    """
    name = exc.info.get("output")
    if name is None or conv.per_input_column:
        return None
    params = dict(exc.case.params)
    for key, least in (("N", 5), ("in_features", 6), ("out_features", 7), ("r", 3)):
        params[key] = max(params[key], least)
    other = dict(params, N=params["N"] + 1, in_features=params["in_features"] + 3,
                 out_features=params["out_features"] + 4, r=params["r"] + 2)
    if other.get("lora_alpha") is not None:
        other["lora_alpha"] = 4 * other["lora_alpha"]
    else:
        other["scaling"] = 0.375 if params["scaling"] == 8.0 else 8.0
    found = [_factor_on(check, fn, unmerge, conv, dropout, detach_norm, name, p)
             for p in (params, other)]
    if found[0] is None:
        return None
    (c, case), second = found[0], found[1]

    def candidates(on):
        sc, r, (N, in_f), out_f = on.scaling, on.A.shape[0], on.x.shape[-2:], on.W0.shape[0]
        return {"s": sc, "1/s": 1 / sc, "s**2": sc * sc, "1/s**2": 1 / (sc * sc), "r": r, "1/r": 1 / r,
                "sqrt(r)": r ** 0.5, "1/sqrt(r)": r ** -0.5, "2": 2.0, "1/2": 0.5, "-1": -1.0,
                "N": N, "1/N": 1 / N, "out": out_f, "1/out": 1 / out_f, "in": in_f, "1/in": 1 / in_f}

    # names to the output's precision (an adversary's float16 y * 2 measured 2.0002)
    rel = max(1e-6, 16 * float(finfo(np.dtype(case.x.dtype)).eps))

    def close(a, b):
        return abs(a - b) <= rel * abs(b)

    def shape(on):
        return f"{on.describe().split(', dtype')[0]}, s={on.scaling:g}"

    first = candidates(case)
    if second is None:  # the second case could not tell: name nothing
        return (f"your {name} is {c:.6g} times dora_ref's at every element of the case widened to "
                f"{shape(case)}: a scaling left out or applied twice, a mean instead of a sum, a "
                f"factor of 2 from the derivative of a square, or a sign?")
    c2, case2 = second
    also = candidates(case2)
    which = [k for k, v in first.items() if close(c, v) and close(c2, also[k])]
    named = f" (= {' = '.join(which)})" if which else ""

    if close(c2, c):
        seen = (f"{c:.6g} times dora_ref's at every element{named}, on two cases widened from the "
                f"shrunk one ({shape(case)}; {shape(case2)})")
    else:
        seen = (f"dora_ref's times one factor at every element: {c:.6g} on a case widened to "
                f"{shape(case)} and {c2:.6g} on {shape(case2)}{named}")
    return (f"your {name} is {seen}: a scaling left out or applied twice, a mean instead of a "
            f"sum, a factor of 2 from the derivative of a square, or a sign?")


def _factor_on(check, fn, unmerge, conv, dropout, detach_norm, name, params):
    """(c, case) where the port's output ``name`` is c times dora_ref's on ``make_case(**params)``
    (``_constant_factor``'s test), else None (also when the port fails there)."""
    try:
        case = make_case(**params)
        got = _C.call_port(check, fn, unmerge, case, conv, dropout)
        ref, tols = _reference_and_tolerances(check, case, detach_norm)
        g = np.asarray(got[name], dtype=np.float64)
        e = np.asarray(ref[name], dtype=np.float64)
        atol = tols[name]["atol"]
    except Exception:  # noqa: BLE001 - a port that fails on the wider case: no such hint
        return None
    if g.shape != e.shape or not atol > 0:
        return None
    big = np.abs(e) > 8 * atol
    if np.count_nonzero(big) < 2:
        return None
    with np.errstate(all="ignore"):
        c = float(np.median(g[big] / e[big]))
        if not (np.isfinite(c) and c != 0 and abs(c - 1) > 1e-6
                and np.all(np.abs(g - c * e) <= atol * (1 + abs(c)))):
            return None
    return c, case


def _run(check, fn, *, unmerge=None, dtype="float64", dropout=False, detach_norm=True,
         max_examples=100, seed=0, convention=None, report="first", cases=None, **conventions):
    dtype = _check_arguments(check, fn, dtype, max_examples, report, cases)
    if unmerge is not None and not callable(unmerge):
        raise TypeError(f"unmerge must be callable or None, got {type(unmerge).__name__}")
    conv = _C.convention_from(convention, conventions)
    if conv.per_input_column and dropout:
        raise ValueError("dropout=True is not defined for the per-input-column layer (magnitude='(1, in)')")
    _hypothesis()
    names = _D.output_names(check, unmerge is not None)
    kw = dict(dtype=dtype, dropout=dropout, detach_norm=detach_norm, max_examples=max_examples, seed=seed,
              cases=cases)
    if report == "first":
        found = _search(check, fn, unmerge, conv, names, **kw)
        if isinstance(found, _Mismatch):
            raise _error(check, fn, unmerge, conv, found, dropout, detach_norm) from None
        return found
    passed, failures = {}, []
    for name in names:
        found = _search(check, fn, unmerge, conv, (name,), **kw)
        if isinstance(found, _Mismatch):
            failures.append(_error(check, fn, unmerge, conv, found, dropout, detach_norm))
            if found.info["output"] is None:  # the port raised or wrote its inputs: the same for every output
                break
        else:
            passed[name] = found
    return Report(check, passed, failures)


def _search_layer(check, fn, names, *, dtype, max_examples, seed, cases):
    """``_search`` for the Embedding, Conv and chained-adapter checks (``dora_ref.porting.layer_checks``)."""
    hyp = _hypothesis()
    return _hunt(
        check, names, _L.strategy(check, hyp.strategies, dtype, cases),
        lambda **params: _L.make_case(check, params), lambda case: _L.call_port(check, fn, case),
        lambda case: (_L.reference(check, case), _L.tolerances(check, case)),
        max_examples=max_examples, seed=seed,
    )


def _check_arguments(check, fn, dtype, max_examples, report, cases):
    """Validate the arguments every check takes; returns the dtype."""
    if not callable(fn):
        raise TypeError(f"check_{check} needs a callable, got {type(fn).__name__}")
    try:
        dtype = as_dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"dtype must be float64, float32, bfloat16 or float16, got {dtype!r}") from exc
    if dtype not in (np.float32, np.float64) and not is_low_precision(dtype):
        raise ValueError(f"dtype must be float64, float32, bfloat16 or float16, got {dtype}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be a positive int, got {max_examples!r}")
    if report not in ("first", "all"):
        raise ValueError(f"report must be 'first' or 'all', got {report!r}")
    if cases is not None and not isinstance(cases, dict):
        raise TypeError(f"cases must be a dict of case parameters, got {type(cases).__name__}")
    return dtype


def _run_layer(check, fn, *, dtype, max_examples, seed, report, cases):
    dtype = _check_arguments(check, fn, dtype, max_examples, report, cases)
    if is_low_precision(dtype):
        raise ValueError(f"check_{check} checks float64 and float32 ports; dtype={dtype} is checked on the "
                         "linear layer (check_forward, check_backward, check_merge, check_init)")
    names = _L.output_names(check)
    found = _search_layer(check, fn, names, dtype=dtype, max_examples=max_examples, seed=seed, cases=cases)
    if isinstance(found, _Mismatch):
        error = _error_from(check, found,
                            [] if found.flaky or found.wrong_type else _L.diagnose(check, fn, found.case))
        if report == "first":
            raise error from None
        return Report(check, {}, [error])
    return found if report == "first" else Report(check, {names[0]: found}, [])
