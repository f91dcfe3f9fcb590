"""The weight-decomposition analysis (paper Sec. 3.2, Eqs. 2-4) on hand-computed cases.

Each case has a known answer: a rescaling of rows changes only the
magnitude, a rotation only the direction, and a transposed axis (the
paper's column norm taken as a PyTorch column norm) gives a different,
wrong answer that the tests tell apart. Values are compared with
``dora_ref.porting.tolerance.assert_close`` at the reduction length of the sums
involved (in for a row norm, out for the mean over rows).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dora_ref import DoRALinear, LoRALinear

from dora_ref.demo import analysis
from dora_ref.demo.mlp import Dense
from dora_ref.porting.tolerance import assert_close


def _weight(rng, out=5, inp=7):
    return rng.standard_normal((out, inp))


def test_magnitude_direction_is_row_norm_and_unit_rows():
    W = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]])  # (out=2, in=3)
    m, D = analysis.magnitude_direction(W)
    assert_close(m, np.array([5.0, 2.0]), k=3, name="m")  # one value per output channel
    assert_close(D, np.array([[0.6, 0.8, 0.0], [0.0, 0.0, -1.0]]), k=3, name="D")
    assert_close(m[:, None] * D, W, k=3, name="m * D")  # Eq. 2 reassembles W


def test_row_rescaling_changes_only_magnitude():
    rng = np.random.default_rng(0)
    W0 = _weight(rng)
    c = np.array([2.0, 0.5, 1.0, 3.0, 1.25])  # positive: the direction is kept
    W = c[:, None] * W0
    m0 = np.linalg.norm(W0, axis=1)
    expected = np.mean(np.abs(c - 1.0) * m0)  # |c m0 - m0| averaged over rows
    assert_close(analysis.delta_magnitude(W, W0), expected, k=7 + 5, name="delta_m")
    assert_close(analysis.delta_direction(W, W0), 0.0, k=7 + 5, scale=1.0, name="delta_d")


def test_rotation_changes_only_direction():
    # rotate every row of W0 within the plane of its first two coordinates by theta
    theta = 0.3
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    W0 = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]])
    W = W0 @ rot.T
    assert_close(analysis.delta_magnitude(W, W0), 0.0, k=4 + 3, scale=5.0, name="delta_m")
    assert_close(analysis.delta_direction(W, W0), 1.0 - np.cos(theta), k=4 + 3, name="delta_d")


def test_sign_flip_is_the_largest_direction_change():
    W0 = np.array([[1.0, 2.0], [-3.0, 0.5]])
    assert analysis.delta_direction(-W0, W0) == pytest.approx(2.0, abs=1e-15)
    assert analysis.delta_magnitude(-W0, W0) == 0.0


def test_axis_is_rows_not_columns():
    """Scaling one *row* (output channel) is a pure magnitude change; scaling
    one *column* (input feature) changes the direction of every row."""
    W0 = np.array([[1.0, 1.0], [2.0, -1.0], [0.5, 3.0]])  # (out=3, in=2)
    W_rows = W0 * np.array([[2.0], [1.0], [1.0]])
    W_cols = W0 * np.array([[2.0, 1.0]])
    assert analysis.delta_direction(W_rows, W0) < 1e-15
    assert analysis.delta_direction(W_cols, W0) > 0.01


@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**32 - 1),
       st.floats(0.1, 10.0))
def test_properties_scale_invariance_and_ranges(out, inp, seed, c):
    rng = np.random.default_rng(seed)
    W0, W = _weight(rng, out, inp), _weight(rng, out, inp)
    dd = analysis.delta_direction(W, W0)
    assert 0.0 <= dd <= 2.0
    # a common positive scale of W changes no direction and scales m linearly
    assert_close(analysis.delta_direction(c * W, W0), dd, k=inp + out, scale=2.0, name="dD")
    # |c m0 - m0| cancels for c near 1: the error scales with the terms, c m0 and m0
    m0 = np.linalg.norm(W0, axis=1)
    assert_close(analysis.delta_magnitude(c * W0, W0), abs(c - 1.0) * np.mean(m0),
                 k=inp + out, scale=max(c, 1.0) * m0.max(), name="dM")


def test_correlation_and_slope_of_a_line():
    x = np.array([0.1, 0.2, 0.3, 0.5])
    corr, slope = analysis.correlation_and_slope(x, 3.0 - 2.0 * x)
    assert_close(corr, -1.0, k=8, scale=1.0, name="corr")
    assert_close(slope, -2.0, k=8, scale=2.0, name="slope")


def test_within_step_correlation_removes_the_shared_growth():
    """Both coordinates grow from step 1 to step 2 (pooled: positive), but at
    each step the layer with more direction change has less magnitude change."""
    dd = np.array([0.1, 0.2, 0.5, 0.6])
    dm = np.array([0.2, 0.1, 0.6, 0.5])
    steps = np.array([1, 1, 2, 2])
    pooled, _ = analysis.correlation_and_slope(dd, dm)
    assert pooled > 0.8
    within, slope = analysis.correlation_and_slope(dd, dm, groups=steps)
    assert_close(within, -1.0, k=4, scale=1.0, name="within-step corr")
    assert_close(slope, -1.0, k=4, scale=1.0, name="within-step slope")
    with pytest.raises(ValueError, match="groups must have shape"):
        analysis.correlation_and_slope(dd, dm, groups=steps[:3])


def test_correlation_against_numpy():
    rng = np.random.default_rng(3)
    x, y = rng.random(12), rng.random(12)
    corr, slope = analysis.correlation_and_slope(x, y)
    assert_close(corr, np.corrcoef(x, y)[0, 1], k=12, scale=1.0, name="corr")
    assert_close(slope, np.polyfit(x, y, 1)[0], k=12, scale=abs(slope) + 1.0, name="slope")


def test_effective_weight_of_adapters_is_the_merged_weight():
    rng = np.random.default_rng(1)
    W0, b = _weight(rng, 4, 6), rng.standard_normal(4)
    x = rng.standard_normal((3, 6))
    for cls in (LoRALinear, DoRALinear):
        layer = cls(W0, b, r=2, lora_alpha=4, rng=rng)
        layer.lora_B[...] = rng.standard_normal(layer.lora_B.shape)
        if cls is DoRALinear:
            layer.lora_magnitude_vector[...] *= 1.0 + rng.random(4)
        layer.eval()
        W = analysis.effective_weight(layer)
        assert_close(x @ W.T + b, layer.forward(x), k=6 + 2, name=f"{cls.__name__} output")
        layer.merge()  # a merged layer's weight is returned as is
        assert_close(analysis.effective_weight(layer), W, k=6 + 2, name="merged")
    dense = Dense(W0, b)
    assert np.array_equal(analysis.effective_weight(dense), W0)


def test_dora_magnitude_is_what_delta_m_sees():
    """For a DoRA layer, the merged weight's row norms are the magnitude vector m."""
    rng = np.random.default_rng(2)
    W0 = _weight(rng, 5, 8)
    layer = DoRALinear(W0, r=2, rng=rng)
    layer.lora_B[...] = rng.standard_normal(layer.lora_B.shape)
    layer.lora_magnitude_vector[...] = rng.random(5) + 0.5
    m, _ = analysis.magnitude_direction(analysis.effective_weight(layer))
    assert_close(m, layer.lora_magnitude_vector, k=8 + 2, name="m")
    m0 = np.linalg.norm(W0, axis=1)
    assert_close(analysis.delta_magnitude(analysis.effective_weight(layer), W0),
                 np.mean(np.abs(layer.lora_magnitude_vector - m0)), k=8 + 5, name="dM")


@pytest.mark.parametrize("bad, match", [
    (lambda W: (W, W[:, :2]), "same"),
    (lambda W: (W.astype(np.int64), W), "dtype"),
    (lambda W: (W[0], W[0]), "dimension"),
])
def test_bad_weights_name_the_argument(bad, match):
    W = np.ones((3, 4))
    with pytest.raises((TypeError, ValueError), match=match):
        analysis.delta_direction(*bad(W))


def test_zero_row_has_no_direction():
    W0 = np.array([[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"zero row\(s\) \[1\]"):
        analysis.delta_direction(np.eye(2), W0)


@pytest.mark.parametrize("x, y, match", [
    ([1.0], [2.0], "length >= 2"),
    ([1.0, 2.0], [1.0, 2.0, 3.0], "same length"),
    ([1.0, 1.0], [1.0, 2.0], "zero spread"),
    ([1.0, np.nan], [1.0, 2.0], "finite"),
])
def test_correlation_rejects_undefined_cases(x, y, match):
    with pytest.raises(ValueError, match=match):
        analysis.correlation_and_slope(x, y)


def test_plot_decomposition_draws_and_returns_the_fit(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([0.1, 0.2, 0.3, 0.4])
    fig, ax = plt.subplots()
    corr, slope = analysis.plot_decomposition(
        ax, x, 1.0 - x, ["layer 1", "layer 1", "layer 2", "layer 2"], [10, 20, 10, 20],
        title="FT", paper_corr=-0.62)
    assert corr == pytest.approx(-1.0, abs=1e-12) and slope == pytest.approx(-1.0, abs=1e-12)
    assert "paper -0.62" in ax.get_title() and "ΔD" in ax.get_xlabel()
    assert [t.get_text() for t in ax.legend().get_texts()][:2] == ["layer 1", "layer 2"]
    fig.savefig(tmp_path / "p.png")
    plt.close(fig)


def test_plot_decomposition_labels_which_run_its_statistic_is_over(tmp_path):
    """The drawn seed's correlation and slope, and the seeds' summary, each say what they are over
    (the demo figure once titled seed 0's correlation next to a README quoting the 5-seed mean)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([0.1, 0.2, 0.3, 0.4])
    y = np.array([0.2, 0.1, 0.5, 0.4])
    fig, ax = plt.subplots()
    corr, slope = analysis.plot_decomposition(
        ax, x, y, ["layer 1"] * 4, [10, 20, 10, 20], title="FT", paper_corr=-0.62,
        points_label="seed 0", summary="5 seeds: corr +0.31 ± 0.09 [+0.18, +0.39]")
    want_corr, want_slope = analysis.correlation_and_slope(x, y)
    assert (corr, slope) == (want_corr, want_slope)
    lines = ax.get_title().split("\n")
    assert lines == ["FT (paper -0.62)", f"seed 0: corr {corr:+.2f}, slope {slope:.2g}",
                     "5 seeds: corr +0.31 ± 0.09 [+0.18, +0.39]"]
    fit = [t.get_text() for t in ax.legend().get_texts()][-1]
    assert fit == f"least-squares fit (seed 0), slope {slope:.2g}"
    fig.savefig(tmp_path / "p.png")
    plt.close(fig)
