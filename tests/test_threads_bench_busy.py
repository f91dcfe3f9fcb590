"""bench_busy decides a cell by an interval of C/NumPy, not one median.

At 5 repeats under load the same eval cell swung from 0.5x to 4x between
runs (README, bench_busy): the script now samples a cell while a bootstrap
interval of the ratio of medians straddles the goal and calls it over,
under or undecided. Its decision functions are tested here on synthetic
times (no timing).
"""
from __future__ import annotations


import numpy as np
import pytest

@pytest.fixture(scope="module")
def bench(bench_busy):
    return bench_busy


def test_a_cell_clearly_over_the_goal_is_over(bench):
    rng = np.random.default_rng(1)
    numpy = 1.0 + 0.01 * rng.standard_normal(40)
    low, high = bench.ratio_interval(1.3 * numpy, numpy)
    assert 1.05 < low <= 1.3 <= high
    assert bench.verdict(low, high) == "over"


def test_a_cell_clearly_under_the_goal_is_under(bench):
    numpy = 1.0 + 0.01 * np.random.default_rng(2).standard_normal(40)
    low, high = bench.ratio_interval(0.8 * numpy, numpy)
    assert bench.verdict(low, high) == "under"
    assert high <= 1.05


def test_a_bimodal_cell_near_the_goal_is_undecided(bench):
    """The case of the busy sweeps: half the rounds of each backend hit a
    time slice (4x), so a median of a few repeats lands in either mode."""
    rng = np.random.default_rng(3)
    c = np.where(rng.random(12) < 0.5, 4.0, 1.0) * 1.02
    numpy = np.where(rng.random(12) < 0.5, 4.0, 1.0)
    low, high = bench.ratio_interval(c, numpy)
    assert low < 1.05 < high
    assert bench.verdict(low, high) == "undecided"


def test_rounds_are_resampled_as_pairs(bench):
    """A burst that slows both backends in the same round is not noise of the
    ratio: resampled as pairs, the interval stays on the true ratio."""
    burst = np.where(np.arange(20) % 2 == 0, 1.0, 5.0)
    low, high = bench.ratio_interval(1.2 * burst, burst)
    assert low == pytest.approx(1.2) and high == pytest.approx(1.2)
    assert bench.verdict(low, high) == "over"


@pytest.mark.parametrize("low, high, expected", [
    (1.06, 1.2, "over"), (0.9, 1.05, "under"), (1.05, 1.2, "undecided"), (0.9, 1.06, "undecided"),
])
def test_the_verdict_at_the_goal(bench, low, high, expected):
    assert bench.verdict(low, high) == expected
