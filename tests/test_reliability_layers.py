"""Regression tests of issue 10's layer, optimiser and functional-API cases.

Each test is named after the case it pins. The references are independent of
the code under test: the dense definition (``dora_ref.core.dense``, which forms
V in full), values computed by hand, or the state before the call.

* unmerge after an in-place change of the adapter (item 2): the adapter is
  read-only while merged, and a write that gets around it is found;
* backward after an in-place change since the forward (item 3): raises;
* non-finite merged weights (item 5): refused, naming the rows;
* empty weights (item 8): refused everywhere; a batch of 0 rows works;
* NaN/inf hyperparameters (item 9): refused at construction;
* masked arrays and np.matrix (item 13): a TypeError naming the argument.
"""
import numpy as np
import pytest

import dora_ref.core.functional as F
from dora_ref import AdamW, DoRALinear, LoRALinear, SGD
from dora_ref.core import dense
from dora_ref import conv as C
from dora_ref import embedding as Em
from dora_ref.core.functional import NonFiniteWeightError
from dora_ref.porting.tolerance import assert_close

KINDS = ["DoRALinear", "LoRALinear", "DoRAConv1d", "LoRAConv2d", "DoRAConv2d-groups",
         "DoRAEmbedding"]


def make_layer(kind, seed=0, dtype=np.float64):
    """A small layer of ``kind`` with a nonzero adapter, and an input for it."""
    rng = np.random.default_rng(seed)
    if kind in ("DoRALinear", "LoRALinear"):
        cls = DoRALinear if kind == "DoRALinear" else LoRALinear
        layer = cls(rng.normal(size=(6, 5)).astype(dtype), rng.normal(size=6).astype(dtype),
                    r=3, rng=seed)
        x = rng.normal(size=(4, 5)).astype(dtype)
    elif kind == "DoRAConv1d":
        layer = C.DoRAConv1d(rng.normal(size=(4, 2, 3)).astype(dtype), rng.normal(size=4).astype(dtype),
                             r=2, padding=1, rng=seed)
        x = rng.normal(size=(3, 2, 7)).astype(dtype)
    elif kind == "LoRAConv2d":
        layer = C.LoRAConv2d(rng.normal(size=(4, 2, 2, 3)).astype(dtype), None, r=2, stride=(1, 2),
                             rng=seed)
        x = rng.normal(size=(2, 2, 5, 6)).astype(dtype)
    elif kind == "DoRAConv2d-groups":
        layer = C.DoRAConv2d(rng.normal(size=(4, 1, 3, 3)).astype(dtype), None, r=2, groups=2,
                             padding=1, rng=seed)
        x = rng.normal(size=(2, 2, 4, 4)).astype(dtype)
    elif kind == "DoRAEmbedding":
        layer = Em.DoRAEmbedding(rng.normal(size=(9, 4)).astype(dtype), r=2, rng=seed)
        x = rng.integers(0, 9, size=(3, 5))
    else:
        raise ValueError(kind)
    for name, p in layer.parameters().items():  # not the initial state: every term counts
        if name != "lora_magnitude_vector":
            p[...] = 0.3 * rng.normal(size=p.shape)
    return layer, x


def zero_grads(layer):
    return {k: np.zeros_like(v) for k, v in layer.parameters().items()}


def snapshot(layer):
    return {k: v.copy() for k, v in layer.parameters().items()}


# ---------------------------------------------------------------------------
# item 2: a merged layer's adapter cannot change behind unmerge()'s back
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make_opt", [
    lambda p: AdamW(p, lr=1e-2, weight_decay=0.5),  # moves params even with zero grads
    lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
], ids=["AdamW", "SGD"])
def test_unmerge_after_optimizer_step_raises(kind, make_opt):
    """merge(), optimiser step, unmerge(): the step is refused and changes nothing, and
    unmerge() gives back W0 (before: W0 off by 3e-2, no error)."""
    layer, x = make_layer(kind)
    opt = make_opt(layer.parameters())
    W0, before = layer.weight.copy(), snapshot(layer)
    layer.eval().merge()
    with pytest.raises(RuntimeError, match="read-only: its layer is merged.*no parameter was changed"):
        opt.step(zero_grads(layer))
    for k, v in layer.parameters().items():
        np.testing.assert_array_equal(v, before[k])
    layer.unmerge()
    # W0 -> W' -> W0: a few roundings of terms the size of |W0| + |s B A| (k = r + 2)
    assert_close(layer.weight, W0, k=8, scale=np.abs(W0).max() + 1)
    opt.step(zero_grads(layer))  # unmerged: training goes on
    assert any(not np.array_equal(v, before[k]) for k, v in layer.parameters().items())


@pytest.mark.parametrize("kind", KINDS)
def test_assigning_the_adapter_while_merged_raises(kind):
    """Assigning through the property, or writing into the array, is refused while merged."""
    layer, _ = make_layer(kind)
    layer.merge()
    W_merged = layer.weight.copy()
    for name, p in layer.parameters().items():
        with pytest.raises(RuntimeError, match=f"the layer is merged: unmerge\\(\\) before assigning {name}"):
            setattr(layer, name, p + 1)
        with pytest.raises(ValueError, match="read-only"):
            p[...] = 0
        with pytest.raises(ValueError, match="read-only"):
            p -= 1  # what an optimiser step writes
    np.testing.assert_array_equal(layer.weight, W_merged)
    layer.unmerge()
    name, p = next(iter(layer.parameters().items()))
    setattr(layer, name, p + 1)  # unmerged: allowed again


@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_after_write_through_an_old_view_raises(kind):
    """A view taken before merge() stays writeable: the write is found at the merged
    forward and at unmerge(), which raise and leave the layer merged and unchanged;
    writing the merged values back makes unmerge() work."""
    layer, x = make_layer(kind)
    name = list(layer.parameters())[0]
    view = layer.parameters()[name][...]  # a view, writeable, taken before the merge
    W0 = layer.weight.copy()
    layer.eval().merge()
    W_merged = layer.weight.copy()
    view.flat[0] += 1.0
    with pytest.raises(RuntimeError, match=f"{name} changed in place while the layer was merged"):
        layer.forward(x)
    with pytest.raises(RuntimeError, match=f"{name} changed in place while the layer was merged.*"
                                           "unmerge\\(\\) would give back a wrong base weight"):
        layer.unmerge()
    assert layer.merged
    np.testing.assert_array_equal(layer.weight, W_merged)
    view[...] = layer.merged_adapter[name]  # the documented way back
    layer.unmerge()
    assert_close(layer.weight, W0, k=8, scale=np.abs(W0).max() + 1)


def test_unmerge_after_writeable_flag_set_back_raises():
    """Setting the writeable flag back by hand and writing is found the same way."""
    layer, _ = make_layer("DoRALinear")
    layer.merge()
    layer.lora_magnitude_vector.flags.writeable = True
    layer.lora_magnitude_vector[0] *= 1.5
    with pytest.raises(RuntimeError, match="lora_magnitude_vector changed in place"):
        layer.unmerge()


@pytest.mark.parametrize("kind", KINDS)
def test_copied_or_pickled_merged_layer_keeps_its_adapter_read_only(kind):
    """NumPy gives back writeable arrays from pickle and deepcopy: a merged copy (with the
    optimiser built on it before the merge) must refuse the step all the same, and
    unmerge to the base weight."""
    import copy
    import pickle

    layer, _ = make_layer(kind)
    opt = AdamW(layer.parameters(), weight_decay=0.5)
    W0 = layer.weight.copy()
    layer.merge()
    for clone, clone_opt in (copy.deepcopy((layer, opt)), pickle.loads(pickle.dumps((layer, opt)))):
        assert clone_opt.params[next(iter(clone_opt.params))] is next(iter(clone.parameters().values()))
        with pytest.raises(RuntimeError, match="read-only: its layer is merged"):
            clone_opt.step(zero_grads(clone))
        clone.unmerge()
        assert_close(clone.weight, W0, k=8, scale=np.abs(W0).max() + 1)


def test_optimizer_step_refused_before_any_change_when_one_layer_is_merged():
    """One optimiser over two layers, one merged: the refused step changes neither."""
    a, _ = make_layer("DoRALinear", seed=1)
    b, _ = make_layer("LoRALinear", seed=2)
    params = {**{"a." + k: v for k, v in a.parameters().items()},
              **{"b." + k: v for k, v in b.parameters().items()}}
    opt = AdamW(params, lr=0.1)
    before = {k: v.copy() for k, v in params.items()}
    b.merge()
    with pytest.raises(RuntimeError, match=r"params\['b.lora_A'\] is read-only"):
        opt.step({k: np.ones_like(v) for k, v in params.items()})
    for k, v in params.items():
        np.testing.assert_array_equal(v, before[k])
    assert opt.t == 0


# ---------------------------------------------------------------------------
# item 3: a stale forward context raises
# ---------------------------------------------------------------------------


def _dy_for(layer, y):
    return np.random.default_rng(9).normal(size=np.shape(y)).astype(y.dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_after_optimizer_step_between_forward_and_backward_raises(kind):
    """forward, AdamW step, backward: the backward refuses to mix the new weights with the
    old activations (before: dA off by 11, no error)."""
    layer, x = make_layer(kind)
    opt = AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    y = layer.forward(x)
    opt.step(zero_grads(layer))
    with pytest.raises(RuntimeError, match="changed in place between the forward and this backward"):
        layer.backward(_dy_for(layer, y))
    for g in layer.grads.values():
        assert not g.any()  # nothing accumulated
    y = layer.forward(x)  # a new forward is a fresh start
    layer.backward(_dy_for(layer, y))


@pytest.mark.parametrize("kind", KINDS)
def test_backward_after_assignment_between_forward_and_backward_raises(kind):
    layer, x = make_layer(kind)
    y = layer.forward(x)
    name = list(layer.parameters())[-1]
    p = layer.parameters()[name]
    setattr(layer, name, p * 1.01)
    with pytest.raises(RuntimeError, match=f"{name}.*changed in place between the forward"):
        layer.backward(_dy_for(layer, y))


def test_backward_after_a_step_that_changes_nothing_is_correct():
    """SGD with zero gradients and no weight decay leaves every bit: no false alarm,
    and the gradients equal the dense definition's."""
    layer, x = make_layer("DoRALinear")
    opt = SGD(layer.parameters(), lr=0.1)
    y = layer.forward(x)
    opt.step(zero_grads(layer))
    dy = _dy_for(layer, y)
    dx = layer.backward(dy)
    want = dense.backward(dy, x, layer.weight, layer.lora_A, layer.lora_B,
                          layer.lora_magnitude_vector, layer.scaling)
    assert_close(dx, want.dx, k=20)
    assert_close(layer.grads["lora_A"], want.dA, k=20)


@pytest.mark.parametrize("which", ["A", "B", "magnitude"])
def test_functional_dora_backward_after_in_place_change_raises(which):
    rng = np.random.default_rng(0)
    W0, A, B = rng.normal(size=(5, 4)), rng.normal(size=(2, 4)), rng.normal(size=(5, 2))
    m = np.linalg.norm(W0, axis=1)
    x, dy = rng.normal(size=(3, 4)), rng.normal(size=(3, 5))
    _, ctx = F.dora_forward(x, W0, A, B, m, 1.0)
    {"A": A, "B": B, "magnitude": m}[which][0] += 0.5
    with pytest.raises(RuntimeError, match=f"{which}.*changed in place"):
        F.dora_backward(dy, ctx)
    _, ctx = F.lora_forward(x, W0, A, B, 1.0)
    if which != "magnitude":
        {"A": A, "B": B}[which][0] -= 0.5
        with pytest.raises(RuntimeError, match=f"{which} \\(lora_{which}\\) changed in place"):
            F.lora_backward(dy, ctx)


# ---------------------------------------------------------------------------
# item 5: non-finite merged weights are refused, naming rows and cause
# ---------------------------------------------------------------------------


def _tiny_row_case(dtype):
    """Row 0 of W0 is tiny (norm ~1e-41 in float32, ~1e-310 in float64), its magnitude 1:
    m / n overflows the dtype although m * V_0 / n_0 would be representable."""
    tiny = {np.float32: 1e-41, np.float64: 1e-310}[dtype]
    W0 = np.ones((3, 4), dtype)
    W0[0] = tiny
    A = np.zeros((2, 4), dtype)
    B = np.zeros((3, 2), dtype)
    m = np.ones(3, dtype)
    return W0, A, B, m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_of_tiny_norm_row_refuses_non_finite_weight(dtype):
    W0, A, B, m = _tiny_row_case(dtype)
    before = [a.copy() for a in (W0, A, B, m)]
    with pytest.raises(NonFiniteWeightError, match=r"output channel\(s\) \[0\] \(1 in all\): "
                                                   r"m / n overflows " + np.dtype(dtype).name) as e:
        F.merge(W0, A, B, m, 1.0)
    assert isinstance(e.value, ValueError)  # callers that catch bad weights keep working
    assert e.value.rows == [0] and "overflows" in e.value.cause
    for a, b in zip((W0, A, B, m), before):
        np.testing.assert_array_equal(a, b)  # nothing modified
    with pytest.raises(NonFiniteWeightError, match=r"\[0\]"):
        F.dora_forward(np.ones((2, 4), dtype), W0, A, B, m, 1.0)  # the forward refuses the same


def test_layer_merge_of_tiny_norm_row_refuses_and_stays_unmerged():
    W0, _, _, _ = _tiny_row_case(np.float32)
    layer = DoRALinear(W0, r=2, rng=0)  # m = ||W0||: g = 1, finite
    layer.lora_magnitude_vector = np.ones(3, np.float32)  # now m / n overflows in row 0
    with pytest.raises(NonFiniteWeightError, match=r"\[0\]"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(layer.weight, W0)
    layer.lora_A = np.ones_like(layer.lora_A)  # still trainable: not locked


def test_lora_merge_overflowing_the_dtype_refuses():
    """W0 + s B A beyond float32's largest value: refused with the row, layer unchanged."""
    W0 = np.ones((3, 2), np.float32)
    W0[1] = 3e38
    layer = LoRALinear(W0, r=1, rng=0)
    layer.lora_A = np.ones((1, 2), np.float32)
    layer.lora_B = np.array([[0.0], [3e38], [1.0]], np.float32)
    with pytest.raises(NonFiniteWeightError, match=r"merged weight W0 \+ s\*B@A is not finite at "
                                                   r"output channel\(s\) \[1\]"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(layer.weight, W0)


def test_merge_with_magnitude_near_dtype_max_is_checked():
    """|W'_ij| <= |m_i| (1 + few u): only a magnitude near the largest float can overflow,
    and those rows are checked: here |W'| stays finite on both backends, and is returned."""
    big = np.finfo(np.float32).max
    W0 = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    A, B = np.zeros((1, 2), np.float32), np.zeros((2, 1), np.float32)
    m = np.array([big, 1.0], np.float32)
    W, n = F.merge(W0, A, B, m, 1.0)
    assert np.isfinite(W).all()
    assert_close(W[0], np.array([0.6, 0.8]) * float(big), dtype=np.float32, k=4)


# ---------------------------------------------------------------------------
# item 8: empty weights are refused everywhere; a batch of 0 rows works
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", [((0, 3), "output channel"), ((4, 0), "input feature")])
def test_out_zero_weight_refused_by_forward_backward_and_merge(shape, axis):
    """out = 0 used to pass forward and merge and fail in backward ("cannot reshape array
    of size 0"): an empty weight is now refused everywhere, naming it."""
    out_f, in_f = shape
    W0, A, B, m = np.zeros(shape), np.ones((2, in_f)), np.ones((out_f, 2)), np.ones(out_f)
    x = np.ones((3, in_f))
    pattern = f"W0 must have at least one {axis}"
    for call in (lambda: F.dora_forward(x, W0, A, B, m, 1.0),
                 lambda: F.lora_forward(x, W0, A, B, 1.0),
                 lambda: F.merge(W0, A, B, m, 1.0),
                 lambda: F.column_norm(W0, A, B, 1.0)):
        with pytest.raises(ValueError, match=pattern):
            call()
    for cls in (DoRALinear, LoRALinear):
        with pytest.raises(ValueError, match=f"weight must have at least one {axis}"):
            cls(np.zeros(shape), r=2)


def test_empty_conv_and_embedding_weights_refused():
    with pytest.raises(ValueError, match="weight must have at least one output channel"):
        C.DoRAConv1d(np.zeros((0, 2, 3)), r=1)
    with pytest.raises(ValueError, match="weight must have at least one input channel"):
        C.LoRAConv2d(np.zeros((2, 0, 3, 3)), r=1)
    with pytest.raises(ValueError, match="weight must have at least one output channel"):
        C.conv_dora_forward(np.zeros((1, 2, 5)), np.zeros((0, 2, 3)), np.ones((1, 2, 3)),
                            np.ones((0, 1, 1)), np.ones(0), 1.0)
    with pytest.raises(ValueError, match=r"weight must have at least one embedding"):
        Em.DoRAEmbedding(np.zeros((0, 4)), r=1)
    with pytest.raises(ValueError, match="weight must have at least one dimension"):
        Em.embedding_dora_forward(np.zeros(2, int), np.zeros((3, 0)), np.ones((1, 3)),
                                  np.ones((0, 1)), np.ones(0), 1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "eval", "exact", "dropout", "merged"])
def test_zero_size_batch_end_to_end(kind, mode):
    """N = 0: forward gives (0, out, ...), backward gives zero gradients and an empty dx,
    in training and eval, detached and exact, with dropout, and merged."""
    layer, x = make_layer(kind)
    x0 = x[:0]
    y_full = layer.forward(x)  # the output shape for one batch, to compare with
    if mode == "eval":
        layer.eval()
    elif mode == "exact":
        if not hasattr(layer, "detach_norm"):
            pytest.skip("LoRA has no norm")
        layer.detach_norm = False
    elif mode == "dropout":
        if kind == "DoRAEmbedding":
            pytest.skip("no dropout on embeddings (PEFT's)")
        layer.lora_dropout = 0.5
    elif mode == "merged":
        layer.eval().merge()
    layer.zero_grad()
    y = layer.forward(x0)
    assert y.shape == (0,) + y_full.shape[1:]
    if mode == "merged":
        with pytest.raises(RuntimeError, match="unmerge"):
            layer.backward(y)
        return
    dx = layer.backward(np.zeros_like(y))
    if kind != "DoRAEmbedding":
        assert dx.shape == x0.shape
    for g in layer.grads.values():
        assert np.isfinite(g).all() and not g.any()


def test_zero_size_batch_functional_both_modes():
    rng = np.random.default_rng(0)
    W0, A, B = rng.normal(size=(5, 4)), rng.normal(size=(2, 4)), rng.normal(size=(5, 2))
    m = np.linalg.norm(W0, axis=1)
    for detach in (True, False):
        y, ctx = F.dora_forward(np.zeros((0, 4)), W0, A, B, m, 1.0)
        g = F.dora_backward(np.zeros((0, 5)), ctx, detach_norm=detach)
        assert y.shape == (0, 5) and g.dx.shape == (0, 4)
        assert not (g.dA.any() or g.dB.any() or g.dmagnitude.any())
    y, ctx = F.lora_forward(np.zeros((2, 0, 4)), W0, A, B, 1.0)
    assert F.lora_backward(np.zeros((2, 0, 5)), ctx).dx.shape == (2, 0, 4)


# ---------------------------------------------------------------------------
# item 13: masked arrays and other ndarray subclasses
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_masked_array_x_raises_type_error_naming_it():
    """np.ma x used to raise an unrelated broadcast error (and np.matrix to compute
    something else silently): a TypeError names the argument and the fix."""
    rng = np.random.default_rng(0)
    W0, A, B = rng.normal(size=(4, 3)), rng.normal(size=(2, 3)), rng.normal(size=(4, 2))
    m = np.linalg.norm(W0, axis=1)
    xm = np.ma.masked_array(np.ones((2, 3)), mask=[[0, 1, 0], [0, 0, 0]])
    with pytest.raises(TypeError, match=r"x is a numpy.ma.MaskedArray .*filled\(0\)"):
        F.dora_forward(xm, W0, A, B, m, 1.0)
    with pytest.raises(TypeError, match=r"x is a numpy.matrix"):
        F.dora_forward(np.matrix(np.ones((2, 3))), W0, A, B, m, 1.0)
    with pytest.raises(TypeError, match=r"W0 is a numpy.matrix"):
        F.merge(np.asmatrix(W0), A, B, m, 1.0)
    with pytest.raises(TypeError, match=r"magnitude is a numpy.ma.MaskedArray"):
        F.merge(W0, A, B, np.ma.masked_array(m), 1.0)
    _, ctx = F.dora_forward(np.ones((2, 3)), W0, A, B, m, 1.0)
    with pytest.raises(TypeError, match=r"dy is a numpy.ma.MaskedArray"):
        F.dora_backward(np.ma.masked_array(np.ones((2, 4))), ctx)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_array_input_to_layers_raises_type_error(kind):
    layer, x = make_layer(kind)
    name = "ids" if kind == "DoRAEmbedding" else "x"
    with pytest.raises(TypeError, match=f"{name} is a numpy.ma.MaskedArray"):
        layer.forward(np.ma.masked_array(x))
    pname, p = next(iter(layer.parameters().items()))
    with pytest.raises(TypeError, match=f"{pname} is a numpy.ma.MaskedArray"):
        setattr(layer, pname, np.ma.masked_array(p))


def test_memmap_input_is_accepted(tmp_path):
    rng = np.random.default_rng(0)
    layer = DoRALinear(rng.normal(size=(4, 3)), r=2, rng=0)
    x = rng.normal(size=(2, 3))
    xm = np.memmap(tmp_path / "x.bin", dtype=np.float64, mode="w+", shape=x.shape)
    xm[...] = x
    np.testing.assert_array_equal(layer.forward(xm), layer.forward(x))


def test_masked_gradient_refused_by_optimizers():
    p = {"w": np.ones(3)}
    for opt in (SGD(p, lr=0.1), AdamW(p)):
        with pytest.raises(TypeError, match=r"grads\['w'\] is a numpy.ma.MaskedArray"):
            opt.step({"w": np.ma.masked_array(np.ones(3), mask=[0, 1, 0])})
    np.testing.assert_array_equal(p["w"], 1.0)


# ---------------------------------------------------------------------------
# the layers' cheaper per-call checks (issue 11) keep every check that can fail
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DoRALinear, LoRALinear])
def test_layer_forward_checks_what_can_change_between_calls(cls):
    """A layer checks its arrays' shapes and dtypes (fixed) once, but every forward still
    refuses NaN/Inf written in place into a trainable array, a bad scaling, and bad x;
    the frozen bias is checked when installed."""
    layer, x = make_layer(cls.__name__)
    for name, p in layer.parameters().items():
        saved = p.copy()
        p.flat[1] = np.inf
        with pytest.raises(ValueError, match=f"{name} .* contains NaN or Inf"):
            layer.forward(x)
        p[...] = saved
    layer.scaling = float("nan")
    with pytest.raises(ValueError, match="scaling must be finite"):
        layer.forward(x)
    layer.scaling = 1.0
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in\) = \(\.\.\., 5\)"):
        layer.forward(x[:, :4])
    with pytest.raises(TypeError, match="x has dtype float32"):
        layer.forward(x.astype(np.float32))
    with pytest.raises(ValueError, match="bias .* contains NaN or Inf"):
        cls(np.ones((3, 2)), np.array([0.0, np.nan, 0.0]), r=1)


def _large(kind):
    """A layer of ``kind`` whose arrays are over 1 KiB: NumPy unpickles those over the
    pickle's immutable bytes (below that it copies them)."""
    rng = np.random.default_rng(3)
    if kind == "DoRALinear":
        return DoRALinear(rng.normal(size=(64, 64)), r=8, rng=3), rng.normal(size=(2, 64))
    if kind == "DoRAConv2d":
        return C.DoRAConv2d(rng.normal(size=(16, 8, 3, 3)), None, r=8, padding=1, rng=3), \
            rng.normal(size=(1, 8, 5, 5))
    return Em.DoRAEmbedding(rng.normal(size=(300, 16)), r=8, rng=3), rng.integers(0, 300, size=(2, 3))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("kind", ["DoRALinear", "DoRAConv2d", "DoRAEmbedding"])
def test_large_layer_through_pickle_merges_and_unmerges(kind, protocol):
    """Session 10's adversary: a merged layer sent through pickle (a spawn or forkserver
    worker's), or one merged after it, could not unmerge ("cannot set WRITEABLE flag")
    and was left half unmerged. Now it unmerges to its base weight, and a write into an
    array that could not be made read-only is still found by the merge-time snapshot."""
    import pickle

    layer, x = _large(kind)
    for p in layer.parameters().values():
        p[...] = 0.1 * np.random.default_rng(4).normal(size=p.shape) + (p if p.ndim == 1 else 0)
    W0 = layer.weight.copy()
    merged = pickle.loads(pickle.dumps(layer, protocol=protocol))
    merged.merge()
    for clone in (pickle.loads(pickle.dumps(merged, protocol=protocol)), merged):
        clone.unmerge()
        assert not clone.merged
        assert_close(clone.weight, W0, k=8, scale=np.abs(W0).max() + 1)
        for p in clone.parameters().values():
            p[...] += 0.0  # writeable again: an optimiser can train it
    fresh = pickle.loads(pickle.dumps(layer, protocol=protocol))
    fresh.merge()
    name, a = next((n, p) for n, p in fresh.parameters().items() if p.ndim >= 2)
    if a.flags.writeable:  # left writeable (it could not be unlocked again): the snapshot sees it
        a[(0,) * a.ndim] += 1.0
        with pytest.raises(RuntimeError, match=f"{name} changed in place"):
            fresh(x)
    else:
        with pytest.raises(ValueError, match="read-only"):
            a[(0,) * a.ndim] += 1.0


@pytest.mark.parametrize("protocol", [4, 5])
def test_large_layer_and_its_optimizer_through_pickle_still_share_arrays(protocol):
    """The fix keeps the arrays an optimiser pickled with the layer holds: no copy."""
    import pickle

    layer, _ = _large("DoRALinear")
    opt = AdamW(layer.parameters())
    clone, clone_opt = pickle.loads(pickle.dumps((layer, opt), protocol=protocol))
    for name, p in clone.parameters().items():
        assert clone_opt.params[name] is p
    clone.merge()
    clone.unmerge()
    for name, p in clone.parameters().items():
        assert clone_opt.params[name] is p


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("kind", ["DoRALinear", "DoRAConv2d", "DoRAEmbedding"])
def test_optimizer_pickled_with_a_merged_layer_trains_it_after_unmerge(kind, protocol):
    """Second adversarial pass, session 10 (attack 45): under pickle protocol 5 a merged
    layer's read-only arrays come back over immutable bytes and the layer takes copies;
    the optimiser pickled with it kept the old arrays and refused every step after
    unmerge() ("read-only: its layer is merged"). It now trains the layer's arrays."""
    import pickle

    layer, x = _large(kind)
    opt = AdamW(layer.parameters(), lr=0.1)
    layer.merge()
    clone, clone_opt = pickle.loads(pickle.dumps((layer, opt), protocol=protocol))
    with pytest.raises(RuntimeError, match="read-only: its layer is merged"):
        clone_opt.step(zero_grads(clone))  # still merged: refused, as before
    clone.unmerge()
    before = {k: v.copy() for k, v in clone.parameters().items()}
    clone_opt.step({k: np.ones_like(v) for k, v in clone.parameters().items()})
    for name, p in clone.parameters().items():
        assert clone_opt.params[name] is p
        assert not np.array_equal(p, before[name]), name
