"""dora_ref against stored values that no code of dora_ref computed.

``tests/data/reference_values.npz`` holds, for six float64 cases (sizes 1, one
C tile of 8 doubles, a tile + 1, several float32 tiles of 16, r = 13 above the
fused kernels' limit, s B A >> W0; negative and far-from-the-norm magnitudes, a
negative scaling), what PEFT 0.21.2 on torch 2.13 computes: the output, its
gradients with the norm detached (PEFT's training behaviour), the magnitude it
initialises, its merged weight; and the exact gradients by torch autograd
through the dense forward. ``tests/data/make_reference_values.py`` made it;
nothing here regenerates it, so the NumPy and C backends are both compared with
numbers from another library.

Tolerances (``dora_ref.porting.tolerance``): two float64 evaluations of k-term sums,
k the longest reduction (in + r for y and the merge, N + in + out + r for the
gradients), scaled by the sum of absolute terms with the norm's cancellation
factor (``cases.abs_scales``). float32 runs compare the rounded inputs' result
with the float64 reference: one more u per term for the rounding of the inputs.
"""
from pathlib import Path

import numpy as np
import pytest

from cases import Case, abs_scales
from dora_ref import dora_backward, dora_forward, init_magnitude, merge, unmerge
from dora_ref.porting.tolerance import assert_close

DATA = Path(__file__).with_name("data") / "reference_values.npz"
FIELDS = ("W0", "A", "B", "magnitude", "bias", "x", "dy")


def _load():
    with np.load(DATA) as z:
        names = sorted({k.split("/")[0] for k in z.files} - {"meta"})
        return {n: {k.split("/")[1]: z[k] for k in z.files if k.startswith(n + "/")} for n in names}


REFERENCE = _load()


def _case(ref, dtype):
    bias = ref["bias"] if ref["bias"].size else None
    case = Case(ref["x"], ref["W0"], ref["A"], ref["B"], ref["magnitude"], float(ref["scaling"]),
                bias, ref["dy"])
    return case.astype(dtype)


def _forward_scale(case):
    """sum |terms| of y: |g| kappa |x| (|W0| + |s| |B| |A|)^T + |b| (see test_properties)."""
    V_abs = np.abs(case.W0) + abs(case.scaling) * np.abs(case.B) @ np.abs(case.A)
    n = np.linalg.norm(case.W0 + case.scaling * case.B @ case.A, axis=1)
    kappa = np.linalg.norm(V_abs, axis=1) / n
    out = np.abs(case.x) @ V_abs.T * (np.abs(case.magnitude) / n * kappa)
    return out + (0 if case.bias is None else np.abs(case.bias))


def test_the_reference_covers_the_c_tiles_and_the_wide_strategies():
    """The file is what its docstring says (so a regenerated one cannot quietly shrink)."""
    shapes = {name: (*ref["W0"].shape, ref["A"].shape[0]) for name, ref in REFERENCE.items()}
    outs, ins, ranks = zip(*shapes.values())
    assert {1, 8, 9, 17, 33} <= set(outs) | set(ins) and max(ranks) > 12, shapes
    scalings = [float(ref["scaling"]) for ref in REFERENCE.values()]
    assert min(scalings) < 0 and max(scalings) > 2
    assert any((ref["magnitude"] < 0).any() for ref in REFERENCE.values())


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_gradients_and_merge_match_peft_and_torch(name, dtype):
    ref = REFERENCE[name]
    case64 = _case(ref, np.float64)
    case = case64.astype(dtype)
    (N, in_f), out_f, r = case.x.shape, case.W0.shape[0], case.A.shape[0]
    extra = 1 if dtype == np.float32 else 0  # the inputs' own rounding to float32
    k_y, k_grad = in_f + r + 2 + extra, N + in_f + out_f + r + extra

    y, ctx = dora_forward(case.x, *case.weights)
    assert_close(y, ref["y"], dtype=dtype, k=k_y, scale=_forward_scale(case64), name=f"{name} y")
    for detach_norm, suffix in ((True, ""), (False, "_exact")):
        grads = dora_backward(case.dy, ctx, detach_norm=detach_norm)
        scales = abs_scales(case64, detach_norm)
        for field, got in zip(grads._fields, grads):
            assert_close(got, ref[field + suffix], dtype=dtype, k=k_grad, scale=scales[field],
                         name=f"{name} {field}{suffix}")

    V_abs = np.abs(case64.W0) + abs(case64.scaling) * np.abs(case64.B) @ np.abs(case64.A)
    row_scale = np.linalg.norm(V_abs, axis=1)
    m0 = init_magnitude(case.W0, case.A, case.B, case.scaling)
    assert_close(m0, ref["init_magnitude"], dtype=dtype, k=k_y, scale=row_scale,
                 name=f"{name} init_magnitude")
    W_merged, _ = merge(*case.weights[:5])
    n = np.linalg.norm(case64.W0 + case64.scaling * case64.B @ case64.A, axis=1)
    scale = (np.abs(case64.magnitude) / n)[:, None] * V_abs * (1 + (row_scale / n)[:, None])
    assert_close(W_merged, ref["W_merged"], dtype=dtype, k=k_y + 2, scale=scale,
                 name=f"{name} W_merged")
    if np.all(case.magnitude != 0):
        # PEFT's merged weight, unmerged here: W0 = W' / (m / n) - s B A; the scale is
        # that of the terms that cancel, |V| + |s| |B| |A| (test_properties)
        n_ref = np.linalg.norm(case64.W0 + case64.scaling * case64.B @ case64.A, axis=1)
        W0 = unmerge(ref["W_merged"].astype(dtype), case.A, case.B, case.magnitude, case.scaling,
                     n_ref.astype(dtype))
        cancel = np.abs(case64.W0) + 2 * abs(case64.scaling) * np.abs(case64.B) @ np.abs(case64.A)
        assert_close(W0, ref["W0"], dtype=dtype, k=r + 4 + extra, scale=cancel,
                     name=f"{name} unmerged W0")
