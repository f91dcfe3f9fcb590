"""Diagnose a port that disagrees with dora_ref: which known variants its numbers reproduce.

On a mismatch ``dora_ref.porting.testing`` calls ``diagnose`` with the shrunk case.
It runs the port again on a few targeted cases (probes), each built to make
some variants visible:

* the shrunk case itself;
* a square case (in = out = 5): a per-column quantity then has the
  per-output shape, so a norm over the wrong axis, the per-input-column
  layer and the fan_in_fan_out layout mix run instead of raising;
* the same with weights scaled by 1e-6 (norms ~1e-6): an epsilon added to
  the norm shows;
* the same with a bias 1000 times larger: a bias scaled by the magnitude
  shows;
* (dropout checks: every probe has a dropout mask)
* when the port raised: the smallest square case, x of shape (batch, seq,
  in), the magnitude as (out, 1) or (1, in), the weight stored (in, out).

A variant is *consistent* when, on every probe where the port ran, the
port's outputs match the variant's within the check's tolerance, and on at
least one probe the variant differs from dora_ref (so the match is not a
coincidence of a case where they agree). Consistent variants are ranked by
the number of such probes, single variants before pairs of them, then by
how closely they match. Variants that explain only the outputs they change
come last, marked "partly".
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from . import conventions as C
from . import variants as VV

# A probe is evidence for a variant only where the variant differs from
# dora_ref by more than this many tolerances: a port that misses dora_ref by a
# little (with 16-bit tolerances, say) would otherwise "match" any variant that
# also misses it by a little there (a Frobenius norm taken for norm_plus_eps).
_DECISIVE = 2.0


class _Score(NamedTuple):
    """How well one variant explains the port; sorts best first on its first four fields."""

    order: int  # 1: consistent on every probe; 2: explains only the outputs it changes
    neg_support: int  # minus the probes that tell it apart and match
    pair: bool  # a pair of variants ranks after a single one
    mean_fit: float  # mean error / tolerance against the variant where it matched
    key: str
    detail: str
    evidence: list
    kind: str
    probes: int


@dataclass(frozen=True)
class Diagnosis:
    """One explanation of a mismatch.

    Attributes
    ----------
    key : str
        A key of ``testing.HINTS`` (two joined by " + " for a pair).
    rank : int
        1 for the most likely.
    kind : str
        "convention" (the port is right, called another way), "matches"
        (consistent on every probe), "partly" (matches the outputs the
        variant changes, not all).
    probes : int
        Probes where the variant differs from dora_ref and the port matches it.
    evidence : tuple of str
        What was run and seen, one line a probe.
    detail : str
        E.g. the epsilon that matched.
    """

    key: str
    rank: int
    kind: str
    probes: int
    evidence: tuple
    detail: str = ""

    def describe(self, hints):
        text = " + ".join(hints[k] for k in self.key.split(" + "))
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.key}{extra}: {text}"


def _probes(case, raised):
    from .cases import make_case

    p = dict(case.params)
    sq = dict(p, N=3, in_features=5, out_features=5, r=2, bias=True, B_zero=False, magnitude="trained",
              weight_scale=1.0, bias_scale=1.0, seed=7)
    probes = [
        ("the shrunk case", case),
        ("a square case (in = out = 5)", make_case(**sq)),
        ("a square case with weights scaled by 1e-6 (norms ~1e-6), no bias",
         make_case(**dict(sq, weight_scale=1e-6, bias=False))),
        ("a square case with a bias 1000 times larger", make_case(**dict(sq, bias_scale=1e3))),
    ]
    if raised:
        probes.append(("the smallest square case (N = 1, in = out = 2, r = 1)",
                       make_case(**dict(sq, N=1, in_features=2, out_features=2, r=1))))
    return probes


def output_names(check, with_second):
    """The outputs a check compares (``with_second``: an unmerge, or init's identity forward)."""
    names = {"forward": ("y",), "backward": C.GRAD_NAMES, "merge": ("W_merged",), "init": ("magnitude",)}[check]
    if with_second and check in ("merge", "init"):
        names = names + ({"merge": "W0_unmerged", "init": "y_identity"}[check],)
    return names


_names = output_names


def _ratio(got, want, tols, names):
    """Largest |got - want| / atol over the named outputs (inf on shape mismatch or NaN)."""
    worst = 0.0
    for k in names:
        g, w = np.asarray(got[k], dtype=np.float64), np.asarray(want[k], dtype=np.float64)
        if g.shape != w.shape:
            return np.inf
        err = np.abs(g - w)
        err = np.where(np.isnan(err), np.inf, err)
        atol = tols[k]["atol"]
        r = np.where(err > 0, np.inf, 0.0) if atol <= 0 else err / atol
        worst = max(worst, float(np.max(r, initial=0.0)))
    return worst


def _fmt(r):
    return "inf" if not np.isfinite(r) else f"{r:.3g}"


def _candidates(c, check, detach_norm, conv, with_unmerge):
    """(key, spec overrides, eps) for each applicable single variant (one per epsilon)."""
    out = []
    for key in VV.VARIANTS:
        if not VV.applies(key, c, check=check, detach_norm=detach_norm, conv=conv, with_unmerge=with_unmerge):
            continue
        over = VV.VARIANTS[key][1]
        which = [k for k in ("eps", "eps_root") if over.get(k) == "eps"]
        if which:
            for eps in VV.EPSILONS:
                e = float(np.finfo(c.dtype).eps) if eps is None else eps
                out.append((key, dict(over, **{which[0]: e}), e))
        else:
            out.append((key, dict(over), None))
    return out


def _variant(c64, over, detach_norm, conv, check=None, ref=None, storage_dtype=None):
    out = _variant_outputs(c64, over, detach_norm, conv)
    if check == "init":  # a port's init gives its norm (maybe rounded); its identity forward is not modelled
        m = VV.init_magnitude(out["weight_norm"], over, storage_dtype)
        y_identity = ref["y_identity"]
        if over.get("init") == "rounded":  # B = 0: g = lp(||W0||) / ||W0|| scales the base product
            n0 = np.linalg.norm(c64.W0, axis=1)
            g = VV.init_magnitude(n0, over, storage_dtype) / np.where(n0 > 0, n0, 1.0)
            y_identity = g * (c64.x @ c64.W0.T) + (0.0 if c64.bias is None else c64.bias)
        out = dict(out, magnitude=m, y_identity=y_identity)
    return out


def _variant_outputs(c64, over, detach_norm, conv):
    spec = dict(VV.BASE, **over)
    if conv.per_input_column and over and set(over) <= VV.COLUMN_OVERRIDES:
        spec["layer"] = "column"  # the per-input-column layer with the detach flipped, another scaling, an eps
    unmerge_input = None
    if conv.unmerge_gets_norm:
        from .cases import reference

        ref = reference(c64)
        unmerge_input = (ref["W_merged"], ref["weight_norm"])
    return VV.evaluate(c64, spec, detach_norm, unmerge_input=unmerge_input)


def _retry(check, fn, unmerge, case, conv, dropout, detach_norm):
    """When the port raised: does it run, and match dora_ref, called another way?"""
    from .cases import make_case
    from .runner import _reference_and_tolerances

    found = []
    names = _names(check, unmerge is not None)
    # a case where the layouts tell apart: N even (x splits into (2, seq)), in != out, both > 1
    case = make_case(**dict(case.params, N=2, in_features=3, out_features=2))
    tries = []
    if conv.x_ndim == 2:
        tries.append(("expects_batched_x", replace(conv, x_ndim=3), case,
                      "x of shape (2, seq, in) instead of (N, in)"))
    if conv.magnitude == "(out,)":
        tries.append(("magnitude_shape_out_1", replace(conv, magnitude="(out, 1)"), case,
                      "a magnitude of shape (out, 1)"))
    if conv.magnitude != "(1, in)" and not dropout:
        col = make_case(**dict(case.params, magnitude_axis="in"))
        tries.append(("magnitude_per_input_column", replace(conv, magnitude="(1, in)"), col,
                      "a magnitude of shape (1, in), compared with the per-input-column layer"))
    tries.append(("weight_layout_transposed", replace(conv, fan_in_fan_out=not conv.fan_in_fan_out), case,
                  f"W0 stored {'(out, in)' if conv.fan_in_fan_out else '(in, out)'}"))
    for key, other, probe, words in tries:
        try:
            got = C.call_port(check, fn, unmerge, probe, other, dropout)
        except Exception:  # noqa: BLE001 - this way does not run either
            continue
        ref, tols = _reference_and_tolerances(check, probe, detach_norm)
        r = _ratio(got, ref, tols, names)
        if r <= 1.0:
            found.append((key, f"called with {words} on a case with N = 2, in = 3, out = 2, it runs and "
                               f"matches dora_ref's reference for that convention (worst error / tolerance "
                               f"{_fmt(r)})", other.changed()))
    return found


def diagnose(check, fn, unmerge, case, conv, dropout, detach_norm, raised=None):
    """Rank the known variants by how well they explain the port's numbers.

    Parameters
    ----------
    check : {"forward", "backward", "merge"}
    fn, unmerge : the port's callables
    case : Case
        The shrunk case.
    conv : Convention
    dropout, detach_norm : bool
        As the check was called.
    raised : Exception, optional
        What the port raised on the shrunk case, if it did.

    Returns
    -------
    list of Diagnosis, best first (empty if nothing explains the numbers).
    """
    from .runner import _reference_and_tolerances

    with_unmerge = unmerge is not None
    names = _names(check, with_unmerge)
    runs = []  # (label, case, float64 case, got, ref, tols)
    evidence_raised = []
    for label, probe in _probes(case, raised is not None):
        try:
            got = C.call_port(check, fn, unmerge, probe, conv, dropout)
        except Exception as exc:  # noqa: BLE001 - a probe the port cannot run says something too
            evidence_raised.append(f"on {label} it raised {type(exc).__name__}: {exc}")
            continue
        ref, tols = _reference_and_tolerances(check, probe, detach_norm)
        runs.append((label, probe, probe.astype(np.float64), got, ref, tols))

    def applies(key, probe):
        return all(VV.applies(k, probe, check=check, detach_norm=detach_norm, conv=conv, with_unmerge=with_unmerge)
                   for k in key.split(" + "))

    def score(key, over, detail):
        """A _Score if the variant explains the port on the probes (fully or partly), else None."""
        support, partial, contradicted, fits, evidence = 0, 0, False, [], []
        for label, probe, c64, got, ref, tols in runs:
            if not applies(key, probe):
                continue
            with np.errstate(all="ignore"):
                var = _variant(c64, over, detach_norm, conv, check, ref, probe.dtype)
            told = _ratio(var, ref, tols, names)  # > 1: the variant differs from DoRA here
            fit = _ratio(got, var, tols, names)  # <= 1: the port matches the variant here
            if told <= 1.0:
                contradicted |= fit > 1.0  # the variant is DoRA here, the port is not
                continue
            if told <= _DECISIVE:  # too close to DoRA for a match to say anything
                continue
            if fit <= 1.0:
                support += 1
                fits.append(fit)
                evidence.append(f"on {label}: the variant differs from dora_ref by {_fmt(told)} x the tolerance; "
                                f"the port matches it (worst error / tolerance {_fmt(fit)})")
                continue
            contradicted = True
            changed = [k for k in names if _ratio(var, ref, tols, (k,)) > 1.0]
            if changed and _ratio(got, var, tols, changed) <= 1.0:
                partial += 1
                evidence.append(f"on {label}: the port matches the variant's {', '.join(changed)} but not the rest")
        pair = " + " in key
        mean_fit = float(np.mean(fits)) if fits else np.inf
        if support and not contradicted:
            return _Score(1, -support, pair, mean_fit, key, detail, evidence, "matches", support)
        if (support or partial) and not pair:
            return _Score(2, -(support + partial), pair, mean_fit, key, detail, evidence, "partly",
                          support + partial)
        return None

    # candidates: the variants that apply on any probe that ran (square-only ones need the square probes)
    singles, seen = [], set()
    for _, probe, *_ in runs:
        for cand in _candidates(probe, check, detach_norm, conv, with_unmerge):
            if (cand[0], cand[2]) not in seen:
                seen.add((cand[0], cand[2]))
                singles.append(cand)
    best = {}  # key -> its best _Score (norm_plus_eps is tried with several epsilons)
    for key, over, eps in singles:
        sc = score(key, over, f"eps = {eps:.3g}" if eps is not None else "")
        if sc is not None and (key not in best or sc[:4] < best[key][:4]):
            best[key] = sc
    scored = list(best.values())
    if not any(sc.order == 1 for sc in scored):  # no single variant explains it: try pairs
        for (k1, _, e1), (k2, _, e2) in itertools.combinations(singles, 2):
            over = VV.combine(k1, k2)
            if over is None or k1 == k2:
                continue
            for k in ("eps", "eps_root"):
                if over.get(k) == "eps":
                    over[k] = e1 if VV.VARIANTS[k1][1].get(k) == "eps" else e2
            detail = " ".join(f"eps = {e:.3g}" for e in (e1, e2) if e is not None)
            sc = score(f"{k1} + {k2}", over, detail)
            if sc is not None:
                scored.append(sc)
    scored.sort(key=lambda sc: sc[:4])
    out = []
    if raised is not None:
        for key, ev, changed in _retry(check, fn, unmerge, case, conv, dropout, detach_norm):
            args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
            out.append(Diagnosis(key, len(out) + 1, "convention", 1,
                                 (f"on the shrunk case it raised {type(raised).__name__}: {raised}", ev),
                                 f"check it with {args}"))
    for sc in scored:
        same = [i for i, d in enumerate(out) if d.key == sc.key]
        if same:  # found both by a retry and as a variant: one entry, all the evidence
            d = out[same[0]]
            out[same[0]] = replace(d, probes=d.probes + sc.probes, evidence=d.evidence + tuple(sc.evidence))
            continue
        out.append(Diagnosis(sc.key, len(out) + 1, sc.kind, sc.probes, tuple(sc.evidence) + tuple(evidence_raised),
                             sc.detail))
    if not any(d.kind == "matches" for d in out):
        low = _float32_inside(check, runs, names, detach_norm)
        if low is not None:
            out.insert(0, low)
            out = [replace(d, rank=i + 1) for i, d in enumerate(out)]
    return out


def _float32_inside(check, runs, names, detach_norm):
    """A Diagnosis ``computed_in_float32`` if, on every probe of a float64 check,
    the port is within the *float32* tolerance of dora_ref's result (derived
    the same way, for float32's unit roundoff) while outside float64's: the
    port's formula is right and some of it runs or is kept in float32. None
    otherwise."""
    from .runner import _reference_and_tolerances

    fits, evidence, largest = [], [], 0.0
    for label, probe, c64, got, ref, tols in runs:
        if np.dtype(probe.dtype) != np.float64:
            return None
        tols32 = _reference_and_tolerances(check, probe.astype(np.float32), detach_norm)[1]
        fit32, fit64 = _ratio(got, ref, tols32, names), _ratio(got, ref, tols, names)
        if fit32 > 1.0:
            return None
        if fit64 > _DECISIVE:  # a float32 error shows only where it is well above float64's tolerance
            fits.append(fit32)
            evidence.append(f"on {label}: {_fmt(fit64)} x the float64 tolerance, {_fmt(fit32)} x the "
                            "float32 one")
        for k in names:  # the error relative to the terms' scale (the tolerance's own scale)
            scale = tols[k]["scale"]
            err = np.abs(np.asarray(got[k], np.float64) - np.asarray(ref[k], np.float64))
            if scale > 0 and err.size:
                largest = max(largest, float(np.max(err)) / scale)
    # float32 arithmetic errs by about its unit roundoff 2**-24 somewhere; a far smaller
    # error (1e-9 relative) is something else
    if not fits or largest < 2.0**-27:
        return None
    return Diagnosis("computed_in_float32", 1, "matches", len(fits), tuple(evidence))


# ---------------------------------------------------------------------------
# a wide case's mismatch: which axis's ragged last tile
# ---------------------------------------------------------------------------

#: The axes of each canonical output, for saying where a wide case's mismatches lie.
_OUTPUT_AXES = {"y": ("N", "out"), "y_identity": ("N", "out"), "dx": ("N", "in"), "dA": ("r", "in"),
                "dB": ("out", "r"), "dmagnitude": ("out",), "magnitude": ("out",), "W_merged": ("out", "in"),
                "W0_unmerged": ("out", "in")}
_SIZE_KEYS = (("N", "N"), ("in_features", "in"), ("out_features", "out"), ("r", "r"))
_VERDICT = {True: "misses", False: "passes", None: "raises"}
#: One past each tile size the wide cases are built for (8, 16, 32 and 64).
_PAST_TILE = (9, 17, 33, 65)


def _whole(size):
    """The size a probe gives an axis that must not be ragged: ``size`` itself where a drawn case
    has it (<= 8), else the largest of 64, 32, 16 and 8 not above it (whole tiles of 8 up to it)."""
    return size if size <= 8 else max(t for t in (64, 32, 16, 8) if t <= size)


def _spread(bad, size, name):
    """Where along one axis of ``size`` the mismatches (a boolean per index) lie, in words."""
    idx = np.flatnonzero(bad)
    if idx.size == size:
        return f"every {name}"
    if idx.size and idx[-1] == size - 1 and idx.size == size - idx[0]:
        return f"only the last {idx.size} {name} of {size} (from {idx[0]})"
    return f"{idx.size} of {size} {name}"


def _where(name, got, ref, tol, per_input_column):
    """One line: where the output ``name`` misses dora_ref on the wide case, axis by axis."""
    g, w = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    axes = _OUTPUT_AXES.get(name)
    if axes is None or g.shape != w.shape or g.ndim != len(axes):
        return None
    if per_input_column and name in ("dmagnitude", "magnitude"):
        axes = ("in",)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(g - w) <= tol)
    if not bad.any():
        return None
    parts = [_spread(bad.any(axis=tuple(j for j in range(bad.ndim) if j != d)), bad.shape[d], ax)
             for d, ax in enumerate(axes)]
    return f"{name} {tuple(bad.shape)} misses dora_ref at {int(bad.sum())} of {bad.size} entries: " + "; ".join(parts)


def locate_tile(check, fn, unmerge, case, conv, dropout, detach_norm, seen=None):
    """For a mismatch on a wide case (the small drawn cases passed): the axis whose ragged last tile the
    port mishandles, found by running it again on cases ragged along one axis at a time.

    Each probe keeps the wide case's parameters but its sizes: the axes under test keep their wide
    (ragged) size, the others take a whole number of tiles of 8 (``_whole``: 64, 32, 16 or 8, or
    the size itself up to 8). Then, on each axis found, the sizes one past a tile of 8, 16, 32 and 64
    (below the wide size) say from which size on the port fails.

    Parameters
    ----------
    check, fn, unmerge, case, conv, dropout, detach_norm
        As for ``diagnose``; ``case`` is the wide case the port failed.
    seen : tuple, optional
        (the port's outputs, the reference, the tolerances) on ``case``, as the check compared
        them; without it the port runs on ``case`` once more.

    Returns
    -------
    Diagnosis or None
        Key ``"ragged_last_tile"`` (axes found; ``detail`` names them), ``"fails_past_drawn_sizes"``
        (it fails with every axis whole too), or None when the port raised on the probes.
    """
    from .cases import make_case
    from .runner import _reference_and_tolerances

    names = _names(check, unmerge is not None)
    params = dict(case.params)
    whole = {key: _whole(params[key]) for key, _ in _SIZE_KEYS}
    runs = [0]

    def misses(**sizes):
        probe = make_case(**{**params, **whole, **sizes})
        runs[0] += 1
        try:
            got = C.call_port(check, fn, unmerge, probe, conv, dropout)
        except Exception:  # noqa: BLE001 - a port that raises here is not diagnosed by tiles
            return None
        ref, tols = _reference_and_tolerances(check, probe, detach_norm)
        return _ratio(got, ref, tols, names) > 1.0

    def sizes_text(sizes):
        return ", ".join(f"{label} = {dict(whole, **sizes)[key]}" for key, label in _SIZE_KEYS)

    evidence = []
    if seen is None:
        try:
            got = C.call_port(check, fn, unmerge, case, conv, dropout)
        except Exception:  # noqa: BLE001 - the wide case's own failure is already reported
            return None
        seen = (got, *_reference_and_tolerances(check, case, detach_norm))
    got, ref, tols = seen
    for name in names:  # where the wide case itself misses, output by output
        line = _where(name, got[name], ref[name], tols[name]["atol"], conv.per_input_column)
        if line:
            evidence.append(f"on the wide case: {line}")
    found = misses()
    if found is None:
        return None
    if found:
        evidence.append(f"it misses dora_ref with every axis a whole number of tiles of 8 too ({sizes_text({})})")
        return Diagnosis("fails_past_drawn_sizes", 1, "located", runs[0], tuple(evidence))
    ragged = [(key, label) for key, label in _SIZE_KEYS if params[key] != whole[key]]
    culprits = [(key, label) for key, label in ragged if misses(**{key: params[key]})]
    if not culprits:  # no axis alone: two at once
        culprits = [pair for pair in itertools.combinations(ragged, 2)
                    if misses(**{key: params[key] for key, _ in pair})]
        culprits = [(tuple(k for k, _ in pair), " and ".join(label for _, label in pair)) for pair in culprits]
        if not culprits:
            return None
        for keys, label in culprits:
            evidence.append(f"it misses with {label} ragged together ({sizes_text({k: params[k] for k in keys})}), "
                            "and passes with either alone")
        return Diagnosis("ragged_last_tile", 1, "located", runs[0], tuple(evidence),
                         "; ".join(label for _, label in culprits) + " ragged together")
    details = []
    for key, label in culprits:
        evidence.append(f"it misses with only {label} ragged ({sizes_text({key: params[key]})}); "
                        f"with {label} = {whole[key]} it passes")
        tried = [(size, misses(**{key: size})) for size in _PAST_TILE if size < params[key]]
        if tried:
            evidence.append(f"{label} = " + ", ".join(f"{s} {_VERDICT[bad]}" for s, bad in tried)
                            + f", {params[key]} misses (the other axes whole)")
        first = min([s for s, bad in tried if bad] + [params[key]])
        below = [s for s, bad in tried if bad is False and s < first]
        tile = f"{max(below)} to {first - 1}" if below else f"below {first}"
        details.append(f"{label}: misses from {label} = {first}" + (f", passes at {max(below)}" if below else "")
                       + f", as a tile of {tile} along {label} would")
    return Diagnosis("ragged_last_tile", 1, "located", runs[0], tuple(evidence), "; ".join(details))
