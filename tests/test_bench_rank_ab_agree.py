"""bench_rank_ab times two builds only after checking that they compute the same thing.

Until session 22 ``benchmarks/bench_rank_ab.py`` raced this checkout's C
kernels against another build (``--base``) without comparing their
results: a base build with a broken kernel would have been timed, and its
ratios printed, as if it computed DoRA. Now each build's column norm,
training step (y and the four gradients) and eval forward are compared
with this build's within the rounding bound of their longest sums before
each race (``check_builds_agree``). Here: two loads of this build agree, a
result off by more than the bound stops the run naming the build, output
and shape, and one within the bound does not.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from dora_ref.porting.tolerance import dora_reduction_length, rtol

C = pytest.importorskip("dora_ref.kernels.c", reason="bench_rank_ab times the C kernels")

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def rank_ab():
    """The benchmark module, imported without keeping the thread counts it sets for its own runs."""
    saved = dict(os.environ)
    sys.path.insert(0, BENCH_DIR)
    try:
        import bench_rank_ab
    finally:
        sys.path.remove(BENCH_DIR)
        os.environ.clear()
        os.environ.update(saved)
    return bench_rank_ab


SHAPE = (48, 40, 4, 16)


def _outputs(rng, shape):
    out_f, in_f, r, N = shape
    f32 = np.float32
    return {"norm": rng.standard_normal(out_f).astype(f32) + 3,
            "train": (rng.standard_normal((N, out_f)).astype(f32),
                      [rng.standard_normal(s).astype(f32) for s in ((N, in_f), (r, in_f), (out_f, r), (out_f,))]),
            "eval": rng.standard_normal((N, out_f)).astype(f32),
            "bias_train": rng.standard_normal((N, out_f)).astype(f32),
            "bias_eval": rng.standard_normal((N, out_f)).astype(f32)}


def test_rank_ab_two_loads_of_this_build_agree_and_are_timed(rank_ab):
    """A real run at a small shape with this build loaded a second time as the base (the
    forwards with a bias compared too: the races run without one, and a build wrong only in
    its bias passed the check, an adversary found in session 22)."""
    base = rank_ab.load_build(C._dora_c.__file__)
    builds = {"base": (base, False), "this, z off": (C._dora_c, False), "this": (C._dora_c, True)}
    (rows, extra), verdicts = rank_ab.run(SHAPE, builds, repeats=1)
    assert [row["build"] for row in rows] == list(builds)
    assert all(np.isfinite(row["train_vs_plain"]) and row["train_vs_plain"] > 0 for row in rows)
    assert verdicts == []


@pytest.mark.parametrize("kind, index", [("norm", None), ("train", 0), ("train", 1), ("train", 4),
                                         ("eval", None), ("bias_train", None), ("bias_eval", None)])
def test_rank_ab_base_build_off_by_more_than_the_bound_stops_the_run(rank_ab, kind, index):
    rng = np.random.default_rng(0)
    this = _outputs(rng, SHAPE)
    base = {k: this[k].copy() for k in ("norm", "eval", "bias_train", "bias_eval")}
    base["train"] = (this["train"][0].copy(), [g.copy() for g in this["train"][1]])
    if kind == "train":
        target = base["train"][0] if index == 0 else base["train"][1][index - 1]
    else:
        target = base[kind]
    out_f, in_f, r, N = SHAPE
    output = ("weight_norm" if kind == "norm" else "y" if kind != "train"
              else ("y", "dx", "dA", "dB", "dmagnitude")[index])
    k = dora_reduction_length(output, n_rows=N, in_features=in_f, out_features=out_f, r=r)
    bound = rtol(np.float32, k) * float(np.max(np.abs(target)))
    outputs = {"base": base, "this": this}
    # within the bound: compared, and passed
    target.flat[3] += 0.5 * bound
    assert rank_ab.check_builds_agree(SHAPE, {"base": None, "this": None}, outputs) == 9
    # beyond it: the run stops, naming the build and the shape
    target.flat[3] += 4 * bound
    with pytest.raises(AssertionError, match=r"build 'base' against this build at \(48, 40, 4, 16\)"):
        rank_ab.check_builds_agree(SHAPE, {"base": None, "this": None}, outputs)


def test_rank_ab_swaps_the_epilogue_from_the_product_of_the_other_build(rank_ab):
    """An adversary, session 22: where r >= out above rank 12 the epilogue from BLAS's product
    (``C._FROM_PRODUCT_KERNELS``) was not swapped, so the "base" column timed this build's
    kernel there, and a base build broken in it passed the check. Now it is swapped: inside
    ``behind`` the table holds the other build's functions, and after it this build's again."""
    other = rank_ab.load_build(C._dora_c.__file__)
    ours = dict(C._FROM_PRODUCT_KERNELS)
    seen = {}

    def look():
        seen.update(C._FROM_PRODUCT_KERNELS)

    rank_ab.behind(other, look)()
    assert set(seen) == set(ours)
    for dt, (_, kernel) in seen.items():
        sfx = "f32" if dt == np.float32 else "f64"
        assert kernel is getattr(other.lib, f"dora_forward_epilogue_from_product_nf_{sfx}")
    assert C._FROM_PRODUCT_KERNELS == ours


@pytest.mark.parametrize("case", ["missing", "not_so", "not_an_extension"])
def test_rank_ab_refuses_a_base_that_is_not_a_dora_c_build(rank_ab, tmp_path, case):
    """--base that does not exist, is not a shared object, or is one that Python cannot load as
    _dora_c: a ValueError naming the path (until session 22: a bare ImportError traceback, or
    ``AttributeError: 'NoneType' object has no attribute 'loader'`` for README.md)."""
    path = {"missing": tmp_path / "nope.so", "not_so": tmp_path / "README.md",
            "not_an_extension": tmp_path / "_dora_c.abi3.so"}[case]
    if case != "missing":
        path.write_bytes(b"not a shared object\n")
    with pytest.raises(ValueError, match=r"--base .*" + path.name):
        rank_ab.load_build(str(path))


@pytest.mark.parametrize("argv, said", [
    (["--shapes", "5,5,0,3"], "--shapes: each entry is out,in,r,N"),  # r = 0: a ZeroDivisionError
    (["--shapes", "64,64,8"], "--shapes: each entry is out,in,r,N"),  # "not enough values to unpack"
    (["--shapes", "64,64,x,8"], "--shapes: each entry is out,in,r,N"),
    (["--repeats", "0"], "--repeats must be at least 1"),  # "min() arg is an empty sequence"
])
def test_rank_ab_refuses_bad_shapes_and_repeats_before_timing(argv, said):
    import subprocess

    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "bench_rank_ab.py"),
                           "--base", C._dora_c.__file__, *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert said in proc.stderr and "Traceback" not in proc.stderr
