"""Regression tests for what an adversarial review of the merged state found.

Each test is named after the case that was silently wrong before its fix,
and checks the value against an independent computation (the layer's own
weights before merge, or a fresh layer).
"""

import numpy as np
import pytest

from test_reliability_layers import KINDS, make_layer


def _base(layer):
    return np.array(layer.weight, copy=True)


@pytest.mark.parametrize("kind", KINDS)
def test_scaling_changed_while_merged_unmerge_raises(kind):
    """merge(), layer.scaling = other, unmerge(): refused, the layer left merged and
    unchanged; with the scaling set back, unmerge() gives back W0 (before: W0 off by 2.2,
    no error)."""
    layer, x = make_layer(kind)
    W0 = _base(layer)
    layer.merge()
    W_merged = _base(layer)
    s = layer.scaling
    layer.scaling = 2.0 * s
    with pytest.raises(RuntimeError, match="scaling changed"):
        layer.unmerge()
    with pytest.raises(RuntimeError, match="scaling changed"):
        layer.forward(x)
    assert layer.merged
    np.testing.assert_array_equal(layer.weight, W_merged)
    layer.scaling = s
    layer.unmerge()
    # merge then unmerge rounds each element a few times: float64, |W0| ~ 1
    np.testing.assert_allclose(layer.weight, W0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k in KINDS if k.startswith("DoRA")])
def test_weight_norm_written_while_merged_unmerge_raises(kind):
    """A merged DoRA layer's weight_norm (what unmerge() divides by) is read-only, and a
    write that goes around that is found (before: weight_norm[...] = 1 gave W0 off by
    1.6, no error)."""
    layer, _ = make_layer(kind)
    W0 = _base(layer)
    layer.merge()
    with pytest.raises(ValueError, match="read-only"):
        layer.weight_norm[...] = 1.0
    saved = layer.weight_norm.copy()
    layer.weight_norm.flags.writeable = True
    layer.weight_norm[...] = 1.0
    with pytest.raises(RuntimeError, match="weight_norm changed"):
        layer.unmerge()
    layer.weight_norm[...] = saved
    layer.unmerge()
    np.testing.assert_allclose(layer.weight, W0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k in KINDS if k.startswith("DoRA")])
def test_weight_norm_read_only_after_pickle_of_merged_layer(kind):
    import copy
    import pickle

    layer, _ = make_layer(kind)
    layer.merge()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not clone.weight_norm.flags.writeable


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "DoRAEmbedding"])
def test_dropout_mask_while_merged_raises(kind):
    """A dropout mask given to a merged layer would be ignored (before: silently, the
    output that of no dropout): refused with ValueError, in train and eval mode."""
    layer, x = make_layer(kind)
    layer.merge()
    mask = np.zeros_like(x)
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(ValueError, match="merged" if mode else "no dropout in eval"):
            layer.forward(x, dropout_mask=mask)
    y = layer.forward(x)  # without a mask the merged forward still runs
    layer.unmerge()
    layer.train(False)
    np.testing.assert_allclose(layer.forward(x), y, rtol=0, atol=1e-12)
