"""The thread plan predicts a call's serial time from a rate measured on
calls of the same shape: kernel, element type, work and blocks.

Before, each kernel kept one rate (ns per unit of work, a minimum that
rises 2 % a call) for every type and size. Measured serially on one
kernel, that rate spans 200x over bench_busy's grid (forward_epilogue:
0.04 ns at (4096, 4096), r = 64, N = 256, float32; 8.6 ns at r = 1,
N = 2048, float64, its output out of cache), and the grid runs float64
right after float32 of the same cell (4.4x apart at that cell). A call
after a cheaper shape was predicted several times too fast for tens of
calls: a team that beat the real serial time counted as lost, its excess
went into the cost of a team, and the probes backed off (bench_busy --full,
quiet: 1,648 of 21,796 parallel calls "lost", mostly at large cells).
No timing here: which rate a call reads and writes.
"""
from __future__ import annotations

import numpy as np
import pytest

from ci_env import env_flag

try:
    from dora_ref.kernels import c as C
except ImportError as exc:  # pragma: no cover - depends on the install
    if env_flag("DORA_REF_REQUIRE_C"):
        raise
    pytest.skip(f"the C backend is not built ({exc})", allow_module_level=True)


@pytest.fixture
def fresh_rates():
    C._plan_rates(reset=True)
    try:
        yield
    finally:
        C._plan_rates(reset=True)


def _norm(out, inp, r, dtype):
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((out, inp)).astype(dtype)
    A = rng.standard_normal((r, inp)).astype(dtype)
    B = rng.standard_normal((out, r)).astype(dtype)
    return C.column_norm(W0, A, B, 2.0)


def _norm_rates():
    return {k: v for k, v in C._plan_rates().items() if k[0] == "column_norm"}


def test_a_float64_call_after_float32_calls_of_the_same_shape_uses_its_own_rate(fresh_rates):
    for _ in range(3):
        _norm(256, 128, 4, np.float32)
    (key32, rate32), = _norm_rates().items()
    assert key32[:3] == ("column_norm", "float32", 256 * 128 * 5)
    assert rate32 > 0
    _norm(256, 128, 4, np.float64)
    rates = _norm_rates()
    assert rates[key32] == rate32  # the float64 call neither read nor moved it
    (key64,) = set(rates) - {key32}
    assert key64[:3] == ("column_norm", "float64", 256 * 128 * 5)


def test_a_larger_call_after_small_ones_uses_its_own_rate(fresh_rates):
    for _ in range(3):
        _norm(64, 64, 8, np.float32)
    small = _norm_rates()
    _norm(512, 512, 1, np.float32)  # another shape: its own rate, measured serially
    rates = _norm_rates()
    assert {k: rates[k] for k in small} == small
    assert {k[2] for k in rates} == {64 * 64 * 9, 512 * 512 * 2}


def test_a_shape_never_measured_is_forgotten_by_reset_and_measured_again(fresh_rates):
    _norm(128, 64, 2, np.float32)
    assert _norm_rates()
    C._plan_rates(reset=True)
    assert C._plan_rates() == {}
    _norm(128, 64, 2, np.float32)
    assert len(_norm_rates()) == 1


def test_the_slot_of_a_shape_depends_on_each_part_of_its_key():
    slots = C.lib.DORA_RATE_SLOTS
    base = C.lib.dora_rate_slot_index(0, 0, 1e6, 16)
    others = [C.lib.dora_rate_slot_index(*key) for key in
              ((1, 0, 1e6, 16), (0, 1, 1e6, 16), (0, 0, 2e6, 16), (0, 0, 1e6, 17))]
    assert all(0 <= s < slots for s in others + [base])
    assert base not in others


def test_a_new_shape_is_planned_by_its_size_class_and_not_judged(fresh_rates):
    """N varying from step to step makes every call a new shape: such a call
    is planned by the latest rate of the same kernel, type and size class
    (work within a factor of 4), marked guessed (a parallel call by a guess
    is not judged lost), instead of running alone to measure its rate."""
    _norm(256, 128, 4, np.float32)
    ((_, _, work, blocks), rate), = _norm_rates().items()
    assert C._plan_rate("column_norm", "float32", work, blocks) == (rate, False)
    assert C._rate_size_class(work + 1) == C._rate_size_class(work)
    assert C._plan_rate("column_norm", "float32", work + 1, blocks) == (rate, True)
    # another type, another size class, another kernel: nothing to go by
    assert C._plan_rate("column_norm", "float64", work, blocks)[0] == 0.0
    assert C._plan_rate("column_norm", "float32", 64 * work, blocks)[0] == 0.0
    assert C._plan_rate("merge", "float32", work, blocks)[0] == 0.0


@pytest.mark.parametrize("work, size_class", [
    (0, 0), (3, 0), (4, 1), (15, 1), (16, 2), (4.0 ** 10, 10), (4.0 ** 10 - 1, 9), (1e300, 19),
])
def test_the_size_classes_are_powers_of_4(work, size_class):
    assert C._rate_size_class(work) == size_class


def test_forward_that_keeps_z_has_a_rate_of_its_own(fresh_rates):
    """Review finding (session 6): the training forward's epilogue writes z as well as y and
    was planned as the eval forward's epilogue at the same shape (same kernel, work and
    blocks): a layer switching train/eval mixed the two costs in one rate. The z variants
    (forward, backward epilogue, fused backward) are kernels of their own in the plan."""
    rng = np.random.default_rng(0)
    N, out_f, r = 64, 96, 16
    base = rng.standard_normal((N, out_f)).astype(np.float32)
    U = rng.standard_normal((N, r)).astype(np.float32)
    B = rng.standard_normal((out_f, r)).astype(np.float32)
    g = np.ones(out_f, np.float32)
    C.forward_epilogue(base, U, B, g, 0.5, None)
    z = np.empty_like(base)
    C.forward_epilogue(base, U, B, g, 0.5, None, z_out=z)
    dy = rng.standard_normal((N, out_f)).astype(np.float32)
    C.backward_lowrank(dy, base, U, B, g, 0.5)
    C.backward_lowrank_z(dy, z, U, B, g, 0.5)
    kernels = {key[0] for key in C._plan_rates()}
    assert {"forward_epilogue", "forward_epilogue_z"} <= kernels
    # r = 16 > FUSED_MAX_RANK: the backward epilogue and its z variant, each with its own rate
    assert {"backward_epilogue", "backward_epilogue_z"} <= kernels
