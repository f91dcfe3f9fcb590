"""Two builds of the C kernels side by side in one process: the rank table of issue 11.

Not a test: a script that prints ratios of medians measured in one run
(float32, 2 threads, interleaved repeats). It loads this checkout's
``_dora_c`` and a second build of it (``--base``, e.g. one built from an
earlier commit with ``git archive <commit> | tar -x -C DIR`` and
``python setup.py build_ext --inplace`` there), and times, with each build
in turn behind ``dora_ref.kernels.c``:

* the column norm against NumPy's expression ``norm(W0 + s * B @ A)``, one
  read of W0 (the faster of a GEMV and a sum) and the flop bound
  2 * out * in * r / (the rate of a (1024, 1024) BLAS GEMM measured in the
  same loop);
* a DoRA training step (forward + backward, detached norm; with this build
  also with the forward not keeping z for the backward, column
  "this, z off") and an eval
  forward with the cached norm (``DoRALinear.eval()``), each against the plain
  layer (``x @ W0.T`` and ``dy @ W0``; ``x @ W0.T``),

at (4096, 4096, r, 512) for r in 8, 16, 32, 64 and (11008, 4096, 16, 256)
by default. Beside each step ratio: the minima's ratio and a 95 % bootstrap
interval of the ratio of medians (rounds resampled as pairs), which says
whether a goal is met, missed or not decided by this many repeats. Before
each race, each build's results (the norm; y and the four gradients of the
step; y of the eval forward; y of a training and an eval forward with a
bias) are compared with this build's within the
rounding bound of their longest sums (``check_builds_agree``): a build that
computes something else stops the run with an AssertionError instead of
being timed.

    python benchmarks/bench_rank_ab.py --base /tmp/base/dora_ref/kernels/_dora_c.abi3.so

``--decide MINUTES`` goes on sampling each race past ``--repeats`` until
every goal of issue 11 at its shape is met or missed by its interval (the
looks at the round counts of bench_busy.LOOKS, as bench_busy samples a
cell), for at most MINUTES a race, and prints a verdict per goal: met,
missed or undecided, with the rounds it took. A noisy day then costs
time instead of giving an interval too wide to say anything.

``--eval-only`` races the plain product and each build's eval forward alone
(more repeats in the same time); ``--eval-breakdown`` (no ``--base``) times
the parts of this build's eval forward against the plain product: x @ A.T,
the epilogue over base, a new-y epilogue, U @ B.T by BLAS, the pass over y
that the epilogue's finiteness flag replaced, the snapshot and the norm
cache's comparison, and prints the floor (the two low-rank products' flops
at the plain product's rate).
"""
from __future__ import annotations

import os
import sys

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = "2"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

# Time the checkout this script sits in, not an installed dora_ref.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_busy  # noqa: E402  (ratio_interval)
import bench_kernels as bk  # noqa: E402  (problem, steps: the layer steps it times)
import dora_ref  # noqa: E402
from dora_ref.core import functional as F  # noqa: E402
from dora_ref.porting.tolerance import assert_close, dora_reduction_length  # noqa: E402
try:
    from dora_ref.kernels import c as C  # noqa: E402
except ImportError as exc:  # the C extension is not built: --help still answers, main() says so
    C, _C_MISSING = None, exc

SHAPES = [(4096, 4096, 8, 512), (4096, 4096, 16, 512), (4096, 4096, 32, 512),
          (4096, 4096, 64, 512), (11008, 4096, 16, 256)]


def load_build(path):
    """The ``_dora_c`` module at ``path``, under a name of its own.

    Raises ValueError, naming the path, if it is not a file, not a shared
    object (``.so``), or not a ``_dora_c`` build (no cffi ``lib`` with the
    column norm)."""
    if not os.path.isfile(path):
        raise ValueError(f"--base {path!r}: no such file (the other build's _dora_c shared object)")
    if not path.endswith(".so"):
        raise ValueError(f"--base {path!r}: not a shared object (.so): give the other build's "
                         "dora_ref/kernels/_dora_c*.so")
    spec = importlib.util.spec_from_file_location("dora_ab_base._dora_c", path)
    try:
        mod = importlib.util.module_from_spec(spec)  # an extension is loaded (dlopen) here
        spec.loader.exec_module(mod)
    except ImportError as exc:
        raise ValueError(f"--base {path!r}: cannot be loaded as a Python extension ({exc})") from exc
    if not hasattr(getattr(mod, "lib", None), "dora_column_norm_f32"):
        raise ValueError(f"--base {path!r}: not a build of dora_ref's _dora_c (no lib.dora_column_norm_f32)")
    # Its teams on NumPy's OpenBLAS threads, as dora_ref.kernels.c sets up for
    # its own build at import (_set_blas_pool): left on OpenMP teams, the other
    # build waited for OpenBLAS's spinning workers after each BLAS call of the race.
    pool = C._openblas_pool()
    if pool is not None and hasattr(mod.lib, "dora_set_blas_pool"):
        mod.lib.dora_set_blas_pool(mod.ffi.cast("void *", pool[0]), pool[1])
    return mod


def behind(mod, fn, keep_z=True):
    """fn run with ``mod``'s ffi and lib behind dora_ref.kernels.c, and the
    training forward keeping z or not (``functional._KEEP_Z``; a build without
    the _z kernels never keeps it).

    Swapped: what the wrapper looks up in ``lib`` at call time, its tables
    of forward epilogue kernels (the layer's eval forward and the training
    forward call them; with and without the finiteness flag) and column_norm's table of kernels
    (``C._NORM_KERNELS``); all four tables are bound at import, and without
    the swap those columns timed this build under both names. The other
    kernels it bound at import (the fused backward_lowrank) are this build's
    in every column. Where r >= out above rank 12 the epilogue from BLAS's
    product (``C._FROM_PRODUCT_KERNELS``) is swapped too when the other build
    has it."""
    keep_z = keep_z and hasattr(mod.lib, "dora_forward_epilogue_z_f32")
    tables = {}
    for name, prefix in (("_EPILOGUE_KERNELS", "dora_forward_epilogue_"),
                         ("_EPILOGUE_Z_KERNELS", "dora_forward_epilogue_z_")):
        ours = getattr(C, name)
        tables[name] = {dt: (ptr_type, getattr(mod.lib, prefix + ("f32" if dt == np.float32 else "f64"),
                                               kernel))
                        for dt, (ptr_type, kernel) in ours.items()}
    tables["_NORM_KERNELS"] = {dtype: (ctype, getattr(mod.lib, kernel.__name__))
                               for dtype, (ctype, kernel) in C._NORM_KERNELS.items()}
    # the epilogue from BLAS's product where r >= out above FUSED_MAX_RANK: without it that
    # column timed this build's kernel under the other's name (an adversary, session 22); a
    # build without the kernel (before it existed) is left on the tile, as it ran then
    if hasattr(mod.lib, "dora_forward_epilogue_from_product_nf_f32"):
        tables["_FROM_PRODUCT_KERNELS"] = {
            dt: (ptr_type, getattr(mod.lib, "dora_forward_epilogue_from_product_nf_"
                                   + ("f32" if dt == np.float32 else "f64")))
            for dt, (ptr_type, _) in C._FROM_PRODUCT_KERNELS.items()}
    # the epilogue with the finiteness flag: a build without it leaves the table empty, and
    # the forward then calls the kernels above and tests y by a second pass (as it did)
    tables["_EPILOGUE_NF_KERNELS"] = {
        dt: (ptr_type, getattr(mod.lib, "dora_forward_epilogue_nf_" + ("f32" if dt == np.float32 else "f64")))
        for dt, (ptr_type, _) in C._EPILOGUE_NF_KERNELS.items()
    } if hasattr(mod.lib, "dora_forward_epilogue_nf_f32") else {}

    def call():
        saved = {name: getattr(C, name) for name in tables}
        saved_rest = C.ffi, C.lib, F._KEEP_Z
        C.ffi, C.lib, F._KEEP_Z = mod.ffi, mod.lib, keep_z
        for name, table in tables.items():
            setattr(C, name, table)
        try:
            return fn()
        finally:
            C.ffi, C.lib, F._KEEP_Z = saved_rest
            for name, table in saved.items():
                setattr(C, name, table)
    return call


def check_builds_agree(shape, builds, outputs):
    """Raise if a build's results differ from this build's beyond the rounding
    bound of their longest sums (``porting.tolerance``: rtol(float32, k) times
    the largest value; k from ``dora_reduction_length``): a race between builds
    that compute different things would time nothing worth comparing.

    `outputs` maps each build's tag to what its callables returned once:
    ``{"norm": n, "train": (y, grads), "eval": y}`` (a key missing where the
    race did not time it), and y of ``dora_forward`` with a bias, training and
    with a given norm (``"bias_train"``, ``"bias_eval"``: the races run
    without one, and a build wrong only in its bias would otherwise pass; an
    adversary, session 22). Returns the number of arrays compared."""
    out_f, in_f, r, N = shape
    names = ("dx", "dA", "dB", "dmagnitude")
    ref = outputs["this"]
    compared = 0
    for tag, got in outputs.items():
        if tag == "this":
            continue
        pairs = []
        if "norm" in got:
            pairs.append(("weight_norm", "weight_norm", got["norm"], ref["norm"]))
        if "train" in got:
            pairs.append(("y", "y (training forward)", got["train"][0], ref["train"][0]))
            pairs.extend((n, n, a, b) for n, a, b in zip(names, got["train"][1], ref["train"][1]))
        if "eval" in got:
            pairs.append(("y", "y (eval forward)", got["eval"], ref["eval"]))
        for key, label in (("bias_train", "y (training forward with a bias)"),
                           ("bias_eval", "y (eval forward with a bias)")):
            if key in got:
                pairs.append(("y", label, got[key], ref[key]))
        for output, label, a, b in pairs:
            k = dora_reduction_length(output, n_rows=N, in_features=in_f, out_features=out_f, r=r)
            assert_close(a, b, k=k, name=f"{label}, build {tag!r} against this build at {shape}")
            compared += 1
    return compared


def race(fns, repeats, checks=None, budget=0.0):
    """Median and min seconds of each callable (as bench_kernels.race with
    ``shuffle``: each round in a new seeded order, so that neither build's
    kernel always follows the same one; a rotation, used until session 21,
    kept who ran right after whom), and every round's seconds (for the
    intervals of ``norm_rows``).

    With ``checks`` (``goal_checks``) and a `budget` in seconds (``--decide``):
    after the first `repeats` rounds, more rounds while a check is undecided,
    looked at when the count of rounds is one of bench_busy.LOOKS (each look
    at bench_busy.LEVEL, so that all the looks together keep 95 %), until the
    budget is spent or the last look. Returns the medians, the minima and the
    rounds' seconds."""
    for f in fns.values():  # warm-up
        f()
    keys = list(fns)
    samples = {k: [] for k in keys}
    t_end = time.perf_counter() + budget
    order_rng = np.random.default_rng(0)  # a new order each round: a rotation kept predecessors
    i = 0
    while True:
        if i >= repeats:
            if not checks or time.perf_counter() > t_end or i >= bench_busy.LOOKS[-1]:
                break
            if i in bench_busy.LOOKS and all(
                    c["verdict"] != "undecided"
                    for c in judge(checks, samples, level=bench_busy.LEVEL)):
                break
        for k in [keys[j] for j in order_rng.permutation(len(keys))]:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
        i += 1
    med = {k: float(np.median(v)) for k, v in samples.items()}
    mins = {k: float(min(v)) for k, v in samples.items()}
    return med, mins, samples


def goal_checks(shape, tag, part):
    """Issue 11's goals for build `tag` at `shape`, as checks on ratios of
    medians of the race's callables: (name, numerator, denominator or a
    tuple of candidates (the one with the lower median is taken), factor,
    goal, "<=" or ">="). `part` "norm": at r <= 16 the norm >= 10x NumPy's
    expression and <= 2x one read of W0, above it <= 1.2x the flop bound
    2 * out * in * r / (the (1024, 1024) GEMM's rate); "steps": the training
    step <= 1.15x the plain layer's at r <= 32 (1.20x above), the eval
    forward <= 1.03x the plain product."""
    out_f, in_f, r, _ = shape
    if part == "norm":
        if r <= 16:
            return [("NumPy expr / norm", "norm_numpy_expr", f"norm_{tag}", 1.0, 10.0, ">="),
                    ("norm / read W0", f"norm_{tag}", ("read_gemv", "read_sum"), 1.0, 2.0, "<=")]
        return [("norm / flop bound", f"norm_{tag}", "gemm_1024", 1024 ** 3 / (out_f * in_f * r), 1.2, "<=")]
    return [("train / plain", f"train_{tag}", "plain_train", 1.0, 1.15 if r <= 32 else 1.20, "<="),
            ("eval / plain", f"eval_{tag}", "plain_eval", 1.0, 1.03, "<=")]


def judge(checks, samples, level=0.95):
    """Each check's ratio of medians, bootstrap interval at `level` (rounds
    resampled as pairs: bench_busy.ratio_interval) and verdict: "met" when
    the whole interval is on the goal's side, "missed" when none of it is,
    else "undecided"."""
    out = []
    for name, num, den, factor, goal, way in checks:
        if isinstance(den, tuple):
            den = min(den, key=lambda k: np.median(samples[k]))
        ratio = factor * np.median(samples[num]) / np.median(samples[den])
        low, high = (factor * v for v in bench_busy.ratio_interval(samples[num], samples[den],
                                                                   level=level, resamples=2000))
        if way == "<=":
            v = "met" if high <= goal else "missed" if low > goal else "undecided"
        else:
            v = "met" if low >= goal else "missed" if high < goal else "undecided"
        out.append({"name": name, "ratio": float(ratio), "low": low, "high": high, "goal": goal,
                    "way": way, "verdict": v, "rounds": len(samples[num])})
    return out


def run(shape, builds, repeats, norm_only=False, eval_only=False, decide=0.0, judged="this"):
    """The table's rows for one shape (``norm_rows``) and, with `decide` (seconds
    per race), the goal checks of build `judged` (``judge``; else [])."""
    out_f, in_f, r, N = shape
    p = bk.problem(*shape)
    verdicts = []

    def timed(fns, part):
        checks = goal_checks(shape, judged, part) if decide else None
        if checks and eval_only:
            checks = [c for c in checks if c[1].startswith("eval_")]
        result = race(fns, repeats, checks, decide)
        if checks:
            verdicts.extend(judge(checks, result[2], level=bench_busy.LEVEL))
        return result

    outputs = {tag: {} for tag in builds}

    def once_with_bias():  # the forwards with a bias, which the races do not run
        bias = np.random.default_rng(2).standard_normal(out_f).astype(p["W0"].dtype)
        args = (p["x"], p["W0"], p["A"], p["B"], p["m"], p["s"], bias)
        n = F.column_norm(*args[1:4], p["s"])
        for tag, (mod, keep_z) in builds.items():
            outputs[tag]["bias_train"] = np.array(behind(mod, lambda: F.dora_forward(*args)[0], keep_z)())
            outputs[tag]["bias_eval"] = np.array(
                behind(mod, lambda: F.dora_forward(*args, weight_norm=n)[0], keep_z)())

    def once(kind, fns):  # each build's result of `kind`, copied: the race's calls reuse nothing
        for tag in builds:
            got = fns[f"{kind}_{tag}"]()
            outputs[tag][kind] = (np.array(got) if kind != "train"
                                  else (np.array(got[0]), [np.array(g) for g in got[1]]))

    if eval_only:  # the plain product and each build's eval forward, nothing else
        st = bk.steps(p)
        fns = {"plain_eval": st["plain_eval"]}
        for tag, (mod, keep_z) in builds.items():
            fns[f"eval_{tag}"] = behind(mod, st["dora_eval_layer"], keep_z)
        once("eval", fns)
        once_with_bias()
        check_builds_agree(shape, builds, outputs)
        nan = {"gemm_1024": float("nan"), "read_gemv": float("nan"), "read_sum": float("nan"),
               "norm_numpy_expr": float("nan"), **{f"norm_{tag}": float("nan") for tag in builds}}
        steps = timed(fns, "steps")
        return norm_rows(shape, builds, nan, steps[0], nan, steps[1], steps[2]), verdicts
    W0, A, B, s = p["W0"], p["A"], p["B"], p["s"]
    X = np.random.default_rng(1).standard_normal((1024, 1024), dtype=np.float32)
    ones = np.ones(in_f, dtype=np.float32)
    fns = {"gemm_1024": lambda: X @ X, "read_gemv": lambda: W0 @ ones, "read_sum": lambda: W0.sum(),
           "norm_numpy_expr": lambda: np.linalg.norm(W0 + s * B @ A, axis=1)}
    for tag, (mod, keep_z) in builds.items():
        fns[f"norm_{tag}"] = behind(mod, lambda: C.column_norm(W0, A, B, s), keep_z)
    once("norm", fns)
    check_builds_agree(shape, builds, outputs)
    norms = timed(fns, "norm")
    if norm_only:
        return norm_rows(shape, builds, norms[0], {}, norms[1], {}, {}), verdicts
    st = bk.steps(p)
    fns = {"plain_train": st["plain_train"], "plain_eval": st["plain_eval"]}
    for tag, (mod, keep_z) in builds.items():
        fns[f"train_{tag}"] = behind(mod, st["dora_train_detached"], keep_z)
        fns[f"eval_{tag}"] = behind(mod, st["dora_eval_layer"], keep_z)
    once("train", fns)
    once("eval", fns)
    once_with_bias()
    check_builds_agree(shape, builds, outputs)
    steps = timed(fns, "steps")
    return norm_rows(shape, builds, norms[0], steps[0], norms[1], steps[1], steps[2]), verdicts


def eval_breakdown(shape, repeats):
    """The parts of this build's eval forward (the layer's, cached norm) against
    the plain product x @ W0.T, timed in one race: each part alone, on
    arrays of the forward's shapes. Returns rows (name, median s, min s)
    and the floor: the two low-rank products' flops at the plain product's
    rate (its median), as a fraction of the plain product."""
    from dora_ref.core._validate import WeightSnapshot, _vdot

    out_f, in_f, r, N = shape
    p = bk.problem(*shape)
    W0, A, B, x, s, m = (p[k] for k in ("W0", "A", "B", "x", "s", "m"))
    st = bk.steps(p)  # its layer: eval mode, the norm cached
    n = F.column_norm(W0, A, B, s)
    g = m / n
    base, U = x @ W0.T, x @ A.T
    buf = base.copy()
    A_seen, B_seen = A.copy(), B.copy()  # the norm cache's copies (EvalNormCache)
    fns = {
        "plain x @ W0.T": st["plain_eval"],
        "layer eval forward": st["dora_eval_layer"],
        "functional, weight_norm": lambda: F.dora_forward(x, W0, A, B, m, s, weight_norm=n),
        "x @ A.T (BLAS)": lambda: x @ A.T,
        "epilogue over base (C, flag)": lambda: C._forward_epilogue_flagged(buf, U, B, g, s, None, 1),
        "epilogue, new y (C)": lambda: C.forward_epilogue(base, U, B, g, s, None),
        "U @ B.T alone (BLAS)": lambda: U @ B.T,
        "vdot(y, y) (the pass the flag replaces)": lambda: _vdot(buf, buf),
        "snapshot of A, B, m": lambda: WeightSnapshot.of(("A", "B", "m"), (A, B, m)),
        "cache: A, B compared": lambda: np.array_equal(A_seen, A) and np.array_equal(B_seen, B),
    }
    mins = {}
    med = bk.race(fns, repeats, mins=mins, shuffle=True)  # no part always after the same one
    plain = med["plain x @ W0.T"]
    floor = 2 * N * r * (in_f + out_f) / (2 * N * in_f * out_f / plain) / plain
    return [(k, med[k], mins[k]) for k in fns], floor, plain


def interval(samples, num, den):
    """The 95 % bootstrap interval of the ratio of medians num / den from the
    rounds of a race (``bench_busy.ratio_interval``: rounds resampled as
    pairs, so a burst of load that fell on both stays in both), or (nan, nan)
    when they were not timed."""
    if num not in samples or den not in samples:
        return float("nan"), float("nan")
    return bench_busy.ratio_interval(samples[num], samples[den])


def norm_rows(shape, builds, norm_med, step_med, norm_min, step_min, step_samples):
    """The table's rows from the medians, minima and rounds of the two races
    (the step columns NaN when the steps were not timed)."""
    out_f, in_f, r, _ = shape
    nan = float("nan")
    med = {**norm_med, **step_med}
    mins = {**norm_min, **step_min}
    for d in (med, mins):
        for k in ["plain_train", "plain_eval"] + [f"{w}_{tag}" for tag in builds for w in ("train", "eval")]:
            d.setdefault(k, nan)
    rate = 2 * 1024 ** 3 / med["gemm_1024"]
    read = min(med["read_gemv"], med["read_sum"])
    rows = []
    for tag in builds:
        n = med[f"norm_{tag}"]
        rows.append({
            "build": tag,
            "norm_ms": n * 1e3,
            "numpy_expr_vs_norm": med["norm_numpy_expr"] / n,
            "norm_vs_read": n / read,
            "norm_vs_flop_bound": n / (2 * out_f * in_f * r / rate),
            "train_vs_plain": med[f"train_{tag}"] / med["plain_train"],
            "train_vs_plain_min": mins[f"train_{tag}"] / mins["plain_train"],
            "eval_vs_plain": med[f"eval_{tag}"] / med["plain_eval"],
            "eval_vs_plain_min": mins[f"eval_{tag}"] / mins["plain_eval"],
            "train_interval": interval(step_samples, f"train_{tag}", "plain_train"),
            "eval_interval": interval(step_samples, f"eval_{tag}", "plain_eval"),
        })
    extra = {"gemm_GFps": rate / 1e9, "read_ms": read * 1e3, "plain_train_ms": med["plain_train"] * 1e3,
             "plain_eval_ms": med["plain_eval"] * 1e3}
    return rows, extra


def shape_arg(ap, text):
    """One --shapes entry, out,in,r,N: four integers, out, in and r >= 1, N >= 0 (else a usage error)."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape[:3]) < 1 or shape[3] < 0:
        ap.error(f"--shapes: each entry is out,in,r,N (integers, out, in and r at least 1, "
                 f"N at least 0), got {text!r}")
    return shape


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="path of the other build's _dora_c shared object")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default=None, help="e.g. 4096,4096,64,512;11008,4096,16,256")
    ap.add_argument("--norm-only", action="store_true",
                    help="time the column norm alone (the step columns nan; only the "
                         "builds' norms are compared before the race)")
    ap.add_argument("--eval-only", action="store_true",
                    help="time the eval forwards alone against the plain product (the other "
                         "columns nan): more repeats in the same time")
    ap.add_argument("--eval-breakdown", action="store_true",
                    help="time the parts of this build's eval forward against the plain product "
                         "(no --base build needed)")
    ap.add_argument("--decide", type=float, default=0.0, metavar="MINUTES",
                    help="sample each race past --repeats until every goal of issue 11 at its "
                         "shape is met or missed by its interval, for at most MINUTES a race "
                         "(the norms' race and the steps' race of each shape), and print the "
                         "verdicts")
    args = ap.parse_args()
    if C is None:
        ap.error(f"the C extension is not built here ({_C_MISSING}): this script "
                 "times the C kernels; pip install -e . builds it")
    # the steps run on the active backend: the C one, whatever DORA_REF_BACKEND says (with
    # DORA_REF_BACKEND=numpy the table timed NumPy's steps under a C build's header: an audit)
    dora_ref.set_backend("c")
    decided = []
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    shapes = SHAPES if not args.shapes else [shape_arg(ap, sh) for sh in args.shapes.split(";")]
    if args.eval_breakdown:
        print(f"load average at start {os.getloadavg()}; this build: {C.build_info()}")
        print("| (out, in, r, N) | part | median ms | min ms | median / plain | min / plain |")
        print("|---|---|---|---|---|---|")
        for shape in shapes:
            rows, floor, plain = eval_breakdown(shape, args.repeats)
            pmin = rows[0][2]
            for name, md, mn in rows:
                print(f"| {shape} | {name} | {md * 1e3:.3f} | {mn * 1e3:.3f} | {md / plain:.4f} | "
                      f"{mn / pmin:.4f} |", flush=True)
            print(f"| {shape} | floor: x @ A.T and U @ B.T flops at the plain product's rate | | | "
                  f"{floor:.4f} | |", flush=True)
        print(f"load average at end {os.getloadavg()}")
        return
    if not args.base:
        ap.error("--base is required (except with --eval-breakdown)")
    # "this, z off": this build with the training forward not keeping z (the step of before)
    try:
        base = load_build(args.base)
    except ValueError as exc:
        ap.error(str(exc))
    builds = {"base": (base, False), "this, z off": (C._dora_c, False),
              "this": (C._dora_c, True)}
    print(f"load average at start {os.getloadavg()}; this build: {C.build_info()}")
    print("| (out, in, r, N) | build | norm ms | NumPy expr / norm | norm / read W0 | "
          "norm / flop bound | train / plain (min) [95% interval] | eval / plain (min) [95% interval] |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        (rows, extra), verdicts = run(shape, builds, args.repeats, args.norm_only, args.eval_only,
                                      60.0 * args.decide)
        decided.extend((shape, v) for v in verdicts)
        for row in rows:
            print(f"| {shape} | {row['build']} | {row['norm_ms']:.2f} | {row['numpy_expr_vs_norm']:.2f} | "
                  f"{row['norm_vs_read']:.2f} | {row['norm_vs_flop_bound']:.2f} | "
                  f"{row['train_vs_plain']:.3f} ({row['train_vs_plain_min']:.3f}) "
                  f"[{row['train_interval'][0]:.3f}-{row['train_interval'][1]:.3f}] | "
                  f"{row['eval_vs_plain']:.3f} ({row['eval_vs_plain_min']:.3f}) "
                  f"[{row['eval_interval'][0]:.3f}-{row['eval_interval'][1]:.3f}] |", flush=True)
        print(f"|  | GEMM {extra['gemm_GFps']:.0f} GF/s, read W0 {extra['read_ms']:.2f} ms, plain train "
              f"{extra['plain_train_ms']:.0f} ms, plain eval {extra['plain_eval_ms']:.0f} ms | | | | | | |",
              flush=True)
    if decided:
        print(f"\nIssue 11's goals for this build, each sampled until decided (--decide {args.decide:g}: "
              f"at most {args.decide:g} min a race; each interval at "
              f"{100 * bench_busy.LEVEL:.1f} %, so that all the looks at a race keep 95 %):")
        print("| (out, in, r, N) | ratio | goal | ratio of medians [interval] | verdict | rounds |")
        print("|---|---|---|---|---|---|")
        for shape, v in decided:
            print(f"| {shape} | {v['name']} | {v['way']} {v['goal']:g} | {v['ratio']:.3f} "
                  f"[{v['low']:.3f}-{v['high']:.3f}] | {v['verdict']} | {v['rounds']} |")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
