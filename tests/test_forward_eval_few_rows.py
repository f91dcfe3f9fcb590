"""The C forward epilogue with few rows (an eval forward of N <= 16 tokens).

Issue 11: quiet, the C eval forward at r = 64, N = 16 was 1.07-1.25x the
NumPy backend's. Cause: the epilogue's blocks were blocks of 16 rows, so at
N <= 16 it had one block (one thread) and packed all of B.T (out x r) on
that thread first, while NumPy's ``U @ B.T`` ran on every thread. It now
runs in blocks of columns when the rows leave threads idle, each block
packing its own panels of B.T: the same sums in the same order, so the same
bits as by rows.
"""
import numpy as np
import pytest

from dora_ref.core import kernels_numpy as KN

try:
    from dora_ref.kernels import c as C
except ImportError:  # pragma: no cover - the C extension is not built
    C = None

pytestmark = pytest.mark.skipif(C is None, reason="the C extension is not built")

# (N, out, r): N <= 16 (one block of rows), out with a partial tile of 16 and 8
# columns and a partial block of 64, rank 64, small and 0; one shape of many rows
SHAPES = [(16, 1024, 64), (16, 64, 64), (1, 100, 3), (13, 201, 64), (5, 7, 1), (16, 16, 0),
          (0, 5, 3), (3, 65, 5), (40, 300, 17)]


def _calls(base, U, B, g, bias):
    """Every way the epilogue is called: y with and without bias, z kept, y over base,
    a float16 y."""
    res = {"y": C.forward_epilogue(base, U, B, g, 0.3, bias),
           "y_nobias": C.forward_epilogue(base, U, B, g, 0.3, None)}
    z = base.copy()
    res["y_keep_z"] = C._forward_epilogue_keep_z(z, U, B, g, 0.3, bias)
    res["z"] = z
    over = base.copy()
    C.forward_epilogue(over, U, B, g, 0.3, bias, out=over)
    res["y_over_base"] = over
    f32 = [a.astype(np.float32) for a in (base, U, B, g)]
    res["y16"] = C.forward_epilogue(*f32, 0.3, None, out_dtype=np.float16)
    return res


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,out_f,r", SHAPES)
def test_forward_epilogue_by_columns_gives_the_bits_of_by_rows(N, out_f, r, dtype):
    """By rows, by columns and by the rule, on 1 and 2 threads, teams forced:
    bitwise the same y, z and float16 y; and y within the float64 reference's
    rounding bound (the r products and sums, then three operations)."""
    rng = np.random.default_rng(N * 1000 + out_f + r)
    draw = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    base, U, B, g, bias = draw(N, out_f), draw(N, r), draw(out_f, r), draw(out_f), draw(out_f)
    results = {}
    try:
        C._set_always_parallel(True)
        for threads in (1, 2):
            C.set_threads(threads)
            for layout in ("rows", "columns", "rule"):
                C._set_forward_layout(layout)
                results[threads, layout] = _calls(base, U, B, g, bias)
    finally:
        C._set_forward_layout("rule")
        C._set_always_parallel(False)
        C.set_threads(0)
    first = results[1, "rows"]
    for key, res in results.items():
        for name, arr in res.items():
            assert arr.dtype == first[name].dtype and arr.shape == first[name].shape
            assert np.array_equal(arr.view(np.uint8), first[name].view(np.uint8)), (key, name)
    ref = g * (base.astype(np.float64) + 0.3 * (U.astype(np.float64) @ B.T.astype(np.float64)))
    ref += bias
    mag = np.abs(g) * (np.abs(base) + 0.3 * (np.abs(U).astype(np.float64) @ np.abs(B).T)) + np.abs(bias)
    eps = np.finfo(dtype).eps
    assert np.all(np.abs(first["y"] - ref) <= (r + 4) * eps * mag + np.finfo(dtype).tiny)
    # and the NumPy twin agrees within the same bound (its U @ B.T is BLAS's)
    y_np = KN.forward_epilogue(base, U, B, g, 0.3, bias)
    assert np.all(np.abs(y_np - ref) <= (r + 4) * eps * mag + np.finfo(dtype).tiny)


def test_eval_forward_n16_r64_opens_a_team():
    """The root cause, by the plan's counters: with 2 threads and teams forced
    (``_set_always_parallel``), the epilogue of N = 16 rows, out = 1024 opens a
    team (by rows it had one block: never a team, whatever the policy)."""
    rng = np.random.default_rng(3)
    base, U = rng.standard_normal((16, 1024)), rng.standard_normal((16, 64))
    B, g = rng.standard_normal((1024, 64)), rng.standard_normal(1024)
    try:
        C._set_always_parallel(True)
        C.set_threads(2)
        for layout, teams in (("rows", 0), ("rule", 1)):
            C._set_forward_layout(layout)
            C._plan_stats(reset=True)
            C.forward_epilogue(base, U, B, g, 0.5, None)
            stats = C._plan_stats()["forward_epilogue"]
            assert stats["calls"] == 1 and stats["parallel"] == teams, (layout, stats)
    finally:
        C._set_forward_layout("rule")
        C._set_always_parallel(False)
        C.set_threads(0)
        C._plan_stats(reset=True)


def test_set_forward_layout_refuses_an_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        C._set_forward_layout("diagonal")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_eval_forward_over_base_without_checks_gives_the_bits_of_out_base(backend, dtype):
    """The layer's eval forward writes y over its fresh base product through
    ``_forward_epilogue_over_base`` (no overlap checks: 8 of 15 us at N = 16,
    out = 64, r = 64): bitwise ``forward_epilogue(base, ..., out=base)``, y is
    base itself; a layout that is not the usual call goes through the checks."""
    K = KN if backend == "numpy" else C
    rng = np.random.default_rng(11)
    for N, out_f, r in ((16, 64, 64), (13, 201, 5), (40, 300, 17)):
        draw = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
        base, U, B, g, bias = draw(N, out_f), draw(N, r), draw(out_f, r), draw(out_f), draw(out_f)
        for b in (bias, None):
            want = base.copy()
            K.forward_epilogue(want, U, B, g, 0.3, b, out=want)
            got = base.copy()
            y = K._forward_epilogue_over_base(got, U, B, g, 0.3, b)
            assert y is got and np.array_equal(got, want)
    if K is C:  # not C-contiguous: refused by forward_epilogue's checks, as before
        with pytest.raises(ValueError, match="out must be C-contiguous"):
            K._forward_epilogue_over_base(np.asfortranarray(base), U, B, g, 0.3, bias)


def test_layer_eval_forward_matches_functional_eval_forward():
    """The layer's eval forward (y over its base product) gives the functional
    eval forward's y, bit for bit, with the active backend."""
    import dora_ref
    from dora_ref.core import functional as F

    rng = np.random.default_rng(2)
    W0 = rng.standard_normal((64, 48)).astype(np.float32)
    layer = dora_ref.layers.DoRALinear(W0, r=16, lora_alpha=16, rng=0)
    layer.lora_B[...] = rng.standard_normal(layer.lora_B.shape).astype(np.float32)
    layer.eval()
    x = rng.standard_normal((16, 48)).astype(np.float32)
    n = F.column_norm(W0, layer.lora_A, layer.lora_B, layer.scaling)
    y_f, _ = F.dora_forward(x, W0, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                            layer.scaling, None, weight_norm=n)
    assert np.array_equal(layer(x), y_f)
