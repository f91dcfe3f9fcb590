"""Mutation check: does the test suite catch plausible bugs in the NumPy and C code?

Each mutation below is a bug someone could plausibly write (most come from
issue 15's audit). For each one the script

1. copies the working tree (without .git and caches) into a temporary folder,
2. applies the mutation by exact string replacement, which must match exactly
   once (a missing or ambiguous anchor stops the script: the code moved and the
   mutation must be updated, never silently skipped),
3. rebuilds the C extension in the copy when the mutation touches ``csrc/``,
4. runs the end-to-end tests (public functions against independent values:
   stored PEFT/torch values, the dense definition, finite differences, the
   regressions) on both backends, with a fixed hypothesis seed, each file up
   to its first failure,
5. prints the first test of each file that caught it, or SURVIVED.

Only end-to-end tests run: ``tests/test_kernels_c.py`` (C against its NumPy
twin) is left out on purpose, so a mutation counts as caught only if a test of
what users call sees it. The script exits 1 if any mutation survives or if
the unmutated copy does not pass.

It is slow (about a minute a C mutation for the rebuild; 30-50 minutes in
all on 2 busy cores) and is not part of ``pytest -q``. Run from the repository
root, with the package's test dependencies installed::

    python tests/mutation/run_mutations.py            # all mutations
    python tests/mutation/run_mutations.py --list     # names only
    python tests/mutation/run_mutations.py --only c_float_accumulator np_bias_times_g
    python tests/mutation/run_mutations.py --check-anchors   # fast: anchors still match
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

E2E_TESTS = [  # fastest first: most mutations are caught in the first seconds
    "tests/test_reference_values.py",
    "tests/test_regressions.py",
    "tests/test_forward_finite_flag.py",  # its first test: the layer and functional forwards
    "tests/test_properties.py",
    "tests/test_gradients.py",
    # the fused backward against float64 at shapes of several row or column blocks (the
    # end-to-end files' shapes are one block of each: the sum passes go untested there)
    "tests/test_backward_lowrank_row_blocks.py",
    "tests/test_add_low_rank.py",  # the backward's dx at (512, 4096): dU @ A added by blocks
    # a context's base shared with a copy, a view, a pickle or read-only memory, and two
    # threads on one context: where the backward may write dz over it and where not
    "tests/test_backward_dz_over_base.py",
    # save_adapter's record of the config beside its weights, and load_adapter's check of it
    "tests/test_save_adapter_crash_safe.py",
]
MAXFAIL = 1  # a file stops at its first failure: the report names one test a file
TIMEOUT = 1800  # seconds for one mutation's tests; a hang counts as caught, and says so

NP, FUNC, C = "dora_ref/core/kernels_numpy.py", "dora_ref/core/functional.py", "csrc/dora_kernels_impl.h"
NORM = "dora_ref/core/norm.py"
PEFT_ADAPTER = "dora_ref/formats/peft/adapter.py"


@dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    what: str


MUTATIONS = [
    # --- NumPy kernels and the functional core -------------------------------------
    Mutation("np_norm_wrong_axis", NP,
             'np.einsum("ij,ij->i", V64, V64)', 'np.einsum("ij,ij->j", V64, V64)[: V.shape[0]]',
             "NumPy norm over the wrong axis (columns of the (out, in) weight)"),
    Mutation("np_scaling_outside_norm", NP,
             "V = _rows_f32(W0, rows) + scaling * (B[rows] @ A)  # PEFT: W + s * (B @ A)",
             "V = _rows_f32(W0, rows) + (B[rows] @ A)  # PEFT: W + s * (B @ A)",
             "NumPy column_norm leaves the scaling out of the norm"),
    Mutation("np_merge_without_magnitude", NP,
             "W_merged[rows] = (magnitude[rows] / n[rows])[:, None] * V",
             "W_merged[rows] = (1.0 / n[rows])[:, None] * V",
             "NumPy merge forgets the magnitude: W' = V / n"),
    Mutation("np_bias_times_g", NP,
             "    np.multiply(z_out, g, out=y)\n    if bias is not None:\n"
             "        y += bias.astype(y.dtype, copy=False)",
             "    np.multiply(z_out, g, out=y)\n    if bias is not None:\n"
             "        y += (g * bias).astype(y.dtype, copy=False)",
             "NumPy forward multiplies the bias by g"),
    Mutation("np_float_accumulator", NP,
             "V64 = V.astype(np.float64, copy=False)", "V64 = V",
             "NumPy norm sums squares in the weights' dtype (float32 accumulator)"),
    Mutation("np_detached_drops_g", NP,
             "    dz = np.multiply(dy, g, out=out)\n",
             "    dz = np.multiply(dy, 1, out=out)\n",
             "NumPy backward epilogue (from base or the kept z): dz = dy (the LoRA gradient, g forgotten)"),
    Mutation("np_dg_misses_low_rank", NP,
             "        p *= float(scaling)\n        p += base\n        p *= dy",
             "        p *= 0.0\n        p += base\n        p *= dy",
             "NumPy backward that forms z again (dropout; eval then backward): dg from base only"),
    Mutation("np_unmerge_without_scaling", NP,
             "W0[rows] -= scaling * (B[rows] @ A)", "W0[rows] -= B[rows] @ A",
             "NumPy unmerge subtracts B @ A without the scaling"),
    Mutation("dm_without_over_n", FUNC,
             "dmagnitude = dg / ctx.n if ctx.n_nonzero else divide_by_norm(dg, ctx.n)  # (4)",
             "dmagnitude = dg  # (4)",
             "dm = dg, the division by n forgotten"),
    Mutation("exact_correction_sign", FUNC,
             "c = divide_by_norm(divide_by_norm(-dg * g, n), n)",
             "c = divide_by_norm(divide_by_norm(dg * g, n), n)",
             "the exact norm correction with the wrong sign"),
    Mutation("exact_drops_dB_term", FUNC,
             "        dB += dB_n\n", "        dB += 0 * dB_n\n",
             "the exact gradient forgets the norm's term of dB"),
    Mutation("dropout_on_the_base_term", FUNC,
             "y = x2 @ W0.T + (g - 1.0) * base + g * (scaling * (U @ B.T))",
             "y = xd @ W0.T + (g - 1.0) * base + g * (scaling * (U @ B.T))",
             "dropout applied to the base term (PEFT keeps it clean)"),
    Mutation("dropout_mask_missing_in_dx", FUNC,
             "dx = dy2 @ W0 + ctx.dropout_mask * ((dz - dy2) @ W0 + dU @ A)",
             "dx = dy2 @ W0 + ((dz - dy2) @ W0 + dU @ A)",
             "dx with dropout forgets the mask on the DoRA correction"),
    Mutation("dx_low_rank_sign", FUNC,
             "        dx += dU @ A\n        return\n", "        dx -= dU @ A\n        return\n",
             "dx's low-rank path subtracted (dx in one block)"),
    Mutation("dx_low_rank_sign_blocked", FUNC,
             "        dx[i:j] += part\n", "        dx[i:j] -= part\n",
             "dx's low-rank path subtracted where dx is added a block of rows at a time"),
    Mutation("backward_writes_over_a_shared_base", FUNC,
             "                and sys.getrefcount(base) == sys.getrefcount(probe) + 1\n",
             "                and True\n",
             "the backward writes dz over the context's base though a copy of the context holds it "
             "too: that copy's backward reads dz as its base product"),
    Mutation("take_base_waits_in_a_signal_handler", FUNC,
             "    if busy and _TAKE_LOCK.locked():\n", "    if False:\n",
             "a backward run by a signal handler inside another's take waits for the lock its own "
             "thread holds: a hang"),
    Mutation("load_adapter_ignores_the_config_record", PEFT_ADAPTER,
             "        _check_paired_config(config, f, weights)\n", "        pass\n",
             "load_adapter reads new weights beside an old config (a save killed between its two "
             "files) without a word: every module scaled by the old alpha / r"),
    Mutation("dA_scaled_twice", FUNC,
             "        dA = dU.T @ ctx.x  # (1)\n", "        dA = ctx.scaling * (dU.T @ ctx.x)  # (1)\n",
             "detached dA multiplied by the scaling a second time"),
    Mutation("unmerge_with_current_norm", FUNC,
             "factor = np.where(n == 0, 1, divide_by_norm(magnitude, n))",
             "factor = np.where(n == 0, 1, divide_by_norm(magnitude, "
             "_kernel_norm(W_merged, A, B, scaling)))",
             "unmerge divides by the norm of the merged weight, not the one kept at merge"),
    Mutation("init_magnitude_ignores_B", NORM,
             "    return column_norm(W0, A, B, scaling)\n",
             "    return column_norm(W0, A, 0 * B, scaling)\n",
             "the magnitude initialised from W0 alone (right only when B = 0)"),
    # --- C kernels ---------------------------------------------------------------
    Mutation("c_norm_skips_last_partial_tile", C,
             "        for (int64_t j = 0; j < in; j += W) {\n"
             "            const int w = (int)dora_min(W, in - j);\n"
             "            const int64_t o = i * in + j;\n"
             "            const REAL *ap = Ap + (j / W) * r * W;  /* A[:, j:j+W] */",
             "        for (int64_t j = 0; j + W <= in; j += W) {\n"
             "            const int w = (int)dora_min(W, in - j);\n"
             "            const int64_t o = i * in + j;\n"
             "            const REAL *ap = Ap + (j / W) * r * W;  /* A[:, j:j+W] */",
             "C column_norm and merge (one row loop) skip the last partial tile (the bug the rescue hid)"),
    Mutation("c_merge_factor_inverted", C,
             "const REAL f = m[i + q] / nq;", "const REAL f = nq / m[i + q];",
             "C merge scales the rows by n / m instead of m / n"),
    Mutation("c_float_accumulator", C,
             "        return fma((double)v, (double)v, acc);\n"
             "    return acc + (double)v * (double)v;",
             "        return (double)((float)acc + (float)v * (float)v);\n"
             "    return (double)((float)acc + (float)v * (float)v);",
             "C norm sums squares in float"),
    Mutation("c_full_tile_wrong_row", C,
             "p3[l] = FN(madd)(fused, c3, ak[l], p3[l]);",
             "p3[l] = FN(madd)(fused, c2, ak[l], p3[l]);",
             "C full 4-row tile uses row 2's coefficient for row 3"),
    Mutation("c_bias_times_g", C,
             "const REAL yv = has_bias ? v + bias[l] : v;",
             "const REAL yv = has_bias ? v + gm[l] * bias[l] : v;",
             "C forward multiplies the bias by g"),
    Mutation("c_forward_flag_ignores_y", C,
             "chk[l] += yv - yv;", "chk[l] += 0;",
             "C forward epilogue's finiteness flag never set"),
    Mutation("c_forward_skips_last_partial_tile", C,
             "for (int64_t i = c0; i < dora_min(j1, c0 + COL_BLOCK); i += W) {",
             "for (int64_t i = c0; i + W <= dora_min(j1, c0 + COL_BLOCK); i += W) {",
             "C forward epilogue skips the last partial column tile"),
    Mutation("c_backward_z_without_scaling", C,
             "const REAL z = has_z ? base[o] : base[o] + s * P[q][l];",
             "const REAL z = has_z ? base[o] : base[o] + P[q][l];",
             "C backward forms z without the scaling (dg wrong)"),
    Mutation("c_dU_without_scaling", C,
             "c->dU[e] = c->s * (REAL)sum;", "c->dU[e] = (REAL)sum;",
             "C backward_lowrank forgets s in dU"),
    Mutation("c_dU_one_block_without_scaling", C,
             "for (int64_t e = t * r; e < (t + g) * r; e++) dUp[e] = s * dUp[e];",
             "for (int64_t e = t * r; e < (t + g) * r; e++) dUp[e] = dUp[e];",
             "C backward_lowrank forgets s in dU where out is one column block (no sum pass)"),
    Mutation("c_products_odd_rank_sign", C,
             "            lanes[q][l] += x * p[l];\n            t += qk[q] * x;",
             "            lanes[q][l] += x * p[l];\n            t -= qk[q] * x;",
             "C two-product row kernel (norm_gradient_products' C.T @ W0, backward_lowrank's "
             "dB): Q.T @ M subtracted for the last k of an odd r"),
    Mutation("c_unmerge_sign", C,
             "W0[q * in + l] = NARROW(WIDEN(Wm[q * in + l]) / f[q] - s * P[q][l]);",
             "W0[q * in + l] = NARROW(WIDEN(Wm[q * in + l]) / f[q] + s * P[q][l]);",
             "C unmerge adds s B A instead of subtracting it"),
]


def _ignore(directory, names):
    skip = {".git", "__pycache__", ".hypothesis", ".pytest_cache", "build", ".ci-venv",
            ".ipynb_checkpoints"}
    return [n for n in names if n in skip or n.endswith(".egg-info")]


def apply(tree, m):
    """Apply mutation ``m`` in ``tree``; the anchor must occur exactly once."""
    path = Path(tree) / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(
            f"mutation {m.name}: its anchor occurs {count} times in {m.path} (must be once); "
            f"the code changed: update the mutation\n--- anchor ---\n{m.old}"
        )
    path.write_text(text.replace(m.old, m.new))


def build(tree):
    env = dict(os.environ, DORA_REF_REQUIRE_C="1")
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the C extension did not build in {tree}:\n{res.stdout}\n{res.stderr}")


def run_tests(tree, tests):
    """Run each file of ``tests`` in ``tree`` up to its first failure.

    Returns (the first failing test of each file that failed, seconds, note).
    """
    env = dict(os.environ, PYTHONPATH=str(tree), DORA_REF_REQUIRE_C="1")
    env.pop("DORA_REF_BACKEND", None)
    failed, notes = [], []
    t = time.perf_counter()
    for test in tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
               "--hypothesis-seed=0", f"--maxfail={MAXFAIL}", "-o", "addopts=", test]
        try:
            res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                                 timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            failed.append(f"{test} (timeout: the tests hung)")
            continue
        found = re.findall(r"^(?:FAILED|ERROR) (\S+)", res.stdout, re.M)
        if res.returncode not in (0, 1) and not found:
            found = [f"{test} (pytest exit {res.returncode})"]
            notes.append(res.stdout[-1500:] + res.stderr[-1500:])
        failed.extend(found[:1])
    return failed, time.perf_counter() - t, "\n".join(notes)


def scratch_copy(base):
    tree = Path(tempfile.mkdtemp(prefix="dora_ref_mutation_"))
    shutil.copytree(base, tree / "repo", ignore=_ignore)
    return tree / "repo"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--check-anchors", action="store_true",
                    help="check that every anchor matches exactly once, and exit")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not first check that the unmutated copy passes")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies")
    args = ap.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            raise SystemExit(f"unknown mutation(s): {sorted(unknown)}")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:<34} {m.path:<30} {m.what}")
        return 0
    for m in chosen:  # every anchor, before anything slow
        text = (ROOT / m.path).read_text()
        if text.count(m.old) != 1:
            raise SystemExit(f"mutation {m.name}: its anchor occurs {text.count(m.old)} times "
                             f"in {m.path} (must be once); update the mutation")
    if args.check_anchors:
        print(f"all {len(chosen)} anchors match exactly once")
        return 0

    base = scratch_copy(ROOT)
    build(base)  # the unmutated extension, copied into every Python-only mutation
    if not args.skip_baseline:
        failed, seconds, note = run_tests(base, E2E_TESTS)
        if failed:
            raise SystemExit(f"the unmutated copy fails {failed} ({note}): fix that first")
        print(f"baseline: the unmutated copy passes ({seconds:.0f} s)")

    results = []
    for i, m in enumerate(chosen, 1):
        tree = scratch_copy(base)
        apply(tree, m)
        if m.path.startswith("csrc/"):
            build(tree)
        failed, seconds, note = run_tests(tree, E2E_TESTS)
        results.append((m, failed))
        status = f"caught by {len(failed)}/{len(E2E_TESTS)} files" if failed else "SURVIVED"
        print(f"[{i:2}/{len(chosen)}] {m.name:<34} {status:<20} {seconds:4.0f} s  {m.what}")
        for test in failed:
            print(f"        by {test}")
        if note:
            print(f"        note: {note}")
        sys.stdout.flush()
        if not args.keep:
            shutil.rmtree(tree.parent)
    if not args.keep:
        shutil.rmtree(base.parent)

    survivors = [m.name for m, failed in results if not failed]
    print(f"\n{len(results) - len(survivors)} of {len(results)} mutations caught by end-to-end "
          f"tests; survivors: {survivors or 'none'}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
