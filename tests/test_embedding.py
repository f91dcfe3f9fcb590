"""DoRA embedding (PEFT convention): forward against the one-hot linear
definition, gradients against float64 finite differences (exact and
detached), padding_idx, embed_scale, merge/unmerge, errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_ref import embedding as Em
from dora_ref.porting.gradcheck import gradcheck
from dora_ref.porting.tolerance import assert_close


@st.composite
def emb_cases(draw):
    V = draw(st.integers(2, 12))
    D = draw(st.integers(1, 6))
    r = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=shape)
    ids.flat[0] = ids.flat[-1]  # at least one repeated id when size > 1: the scatter must add
    padding_idx = draw(st.one_of(st.none(), st.just(int(ids.flat[0]))))
    embed_scale = draw(st.sampled_from([None, 2.5]))
    E = rng.standard_normal((V, D))
    A = rng.standard_normal((r, V))
    B = rng.standard_normal((D, r)) / np.sqrt(V)
    m = 1.0 + 0.3 * rng.standard_normal(D)
    return dict(E=E, A=A, B=B, m=m, ids=ids, padding_idx=padding_idx, embed_scale=embed_scale,
                s=draw(st.sampled_from([0.5, 2.0])), rng=rng)


def onehot_definition(c):
    """y = embed_scale * onehot(ids) @ (diag(m / n) V_oi).T, V_oi = E.T + s B A formed in full."""
    E, A, B, m, s = c["E"], c["A"], c["B"], c["m"], c["s"]
    V_oi = E.T + s * B @ A  # (D, V)
    n = np.linalg.norm(V_oi, axis=1)
    onehot = np.eye(E.shape[0])[c["ids"].reshape(-1)]
    y = onehot @ ((m / n)[:, None] * V_oi).T
    y *= c["embed_scale"] or 1.0
    return y.reshape(*c["ids"].shape, E.shape[1])


def forward(c, **kw):
    return Em.embedding_dora_forward(c["ids"], c["E"], c["A"], c["B"], c["m"], c["s"],
                                     embed_scale=c["embed_scale"], padding_idx=c["padding_idx"], **kw)


@given(emb_cases())
def test_forward_matches_the_one_hot_linear_definition(c):
    y, _ = forward(c)
    V = c["E"].shape[0]
    assert_close(y, onehot_definition(c), k=V + c["A"].shape[0])


@settings(max_examples=30)
@given(emb_cases(), st.booleans())
def test_gradients_match_finite_differences(c, detach_norm):
    y, ctx = forward(c)
    dy = c["rng"].standard_normal(y.shape)
    dA, dB, dm = Em.embedding_dora_backward(dy, ctx, detach_norm=detach_norm)
    n0 = Em.embedding_column_norm(c["E"], c["A"], c["B"], c["s"]) if detach_norm else None

    def loss(p):
        yy, _ = Em.embedding_dora_forward(c["ids"], c["E"], p["A"], p["B"], p["m"], c["s"],
                                          embed_scale=c["embed_scale"], weight_norm=n0)
        return float(np.sum(dy * yy))

    pad = c["padding_idx"]
    if pad is not None:
        # F.embedding's padding_idx: lookups of that id send nothing to A's column
        # `pad`. Finite differences see the plain function, so check that the
        # padded gradient equals the plain one everywhere else (and is zero
        # there when the norm is detached), then check the plain one.
        _, ctx_plain = forward(dict(c, padding_idx=None))
        dA_plain, dB_plain, dm_plain = Em.embedding_dora_backward(dy, ctx_plain, detach_norm=detach_norm)
        off = np.arange(c["A"].shape[1]) != pad
        np.testing.assert_array_equal(dA[:, off], dA_plain[:, off])
        np.testing.assert_array_equal(dB, dB_plain)
        np.testing.assert_array_equal(dm, dm_plain)
        if detach_norm:
            assert not dA[:, pad].any()
        dA = dA_plain
    report = gradcheck(loss, {"A": c["A"], "B": c["B"], "m": c["m"]}, {"A": dA, "B": dB, "m": dm})
    assert report.ok, str(report)


@pytest.mark.parametrize("embed_scale", [None, 2.5])
def test_exact_gradient_of_the_padding_column_is_the_norms_path_only(embed_scale):
    """Issue 15: in exact mode dA's padding column was never checked. There the lookup
    sends nothing (F.embedding's padding_idx) but the norm n = ||E.T + s B A||_row still
    depends on the whole of A: the column gets the norm's path and nothing else. The
    reference is float64 central differences of the one-hot definition with A moving in
    the norm only, at column pad."""
    from dora_ref.porting.gradcheck import numerical_gradient

    rng = np.random.default_rng(4)
    E, A, B = rng.standard_normal((6, 3)), rng.standard_normal((2, 6)), rng.standard_normal((3, 2))
    m, s, pad = 1.0 + 0.3 * rng.standard_normal(3), 0.7, 2
    ids = np.array([[2, 0, 2], [5, 2, 1]])
    y, ctx = Em.embedding_dora_forward(ids, E, A, B, m, s, embed_scale=embed_scale,
                                       padding_idx=pad)
    dy = rng.standard_normal(y.shape)
    dA, _, _ = Em.embedding_dora_backward(dy, ctx, detach_norm=False)

    def loss(p):  # the one-hot definition; A in the norm has column pad = p["a"]
        A_norm = A.copy()
        A_norm[:, pad] = p["a"]
        n = np.linalg.norm(E.T + s * B @ A_norm, axis=1)
        V_oi = E.T + s * B @ A  # the lookup's A: fixed
        yy = np.eye(6)[ids.reshape(-1)] @ ((m / n)[:, None] * V_oi).T * (embed_scale or 1.0)
        return float(np.sum(dy.reshape(-1, 3) * yy))

    want = numerical_gradient(loss, {"a": A[:, pad].copy()}, "a")
    # central differences: ~1e-10 relative (dora_ref.porting.gradcheck's error model), 1e-6 allowed
    np.testing.assert_allclose(dA[:, pad], want, rtol=1e-6, atol=1e-9 * np.abs(dA).max())
    assert np.abs(dA[:, pad]).max() > 1e-3 * np.abs(dA).max()  # not a vacuous zero


def test_repeated_ids_accumulate_in_the_scatter_add():
    rng = np.random.default_rng(0)
    E, A, B = rng.standard_normal((5, 3)), rng.standard_normal((2, 5)), rng.standard_normal((3, 2))
    m = np.linalg.norm(E, axis=0)
    dy1 = rng.standard_normal((1, 3))
    _, ctx1 = Em.embedding_dora_forward(np.array([4]), E, A, B, m, 1.0)
    _, ctx3 = Em.embedding_dora_forward(np.array([4, 4, 4]), E, A, B, m, 1.0)
    dA1, dB1, dm1 = Em.embedding_dora_backward(dy1, ctx1)
    dA3, dB3, dm3 = Em.embedding_dora_backward(np.repeat(dy1, 3, axis=0), ctx3)
    assert_close(dA3, 3 * dA1, k=4)
    assert not np.delete(dA3, 4, axis=1).any()  # only the looked-up column


def test_default_init_is_the_base_lookup_with_magnitude_over_the_vocabulary():
    rng = np.random.default_rng(1)
    E = rng.standard_normal((7, 4))
    layer = Em.DoRAEmbedding(E, r=2, lora_alpha=4, rng=0, embed_scale=3.0)
    assert layer.lora_embedding_A.shape == (2, 7) and not layer.lora_embedding_A.any()
    assert layer.lora_embedding_B.shape == (4, 2) and layer.lora_embedding_B.any()  # N(0, 1)
    assert layer.lora_magnitude_vector.shape == (4,)
    assert_close(layer.lora_magnitude_vector, np.linalg.norm(E, axis=0), k=7)  # E.norm(dim=0)
    ids = np.array([[0, 6, 3]])
    assert_close(layer(ids), 3.0 * E[ids], k=9)


@given(emb_cases())
@settings(max_examples=25)
def test_merged_equals_unmerged_and_unmerge_restores(c):
    layer = Em.DoRAEmbedding(c["E"], r=c["A"].shape[0], lora_alpha=c["s"] * c["A"].shape[0],
                             embed_scale=c["embed_scale"], padding_idx=c["padding_idx"],
                             init_lora_weights=False, rng=3)
    layer.lora_magnitude_vector *= 1.2
    y = layer(c["ids"])
    layer.merge()
    k = c["A"].shape[0] + 4
    delta = np.abs(layer.scaling * (layer.lora_embedding_B @ layer.lora_embedding_A)).T
    scale = (np.abs(c["E"]) + delta).max() * np.abs(layer.lora_magnitude_vector).max() * (c["embed_scale"] or 1)
    ym = layer(c["ids"])
    n = Em.embedding_column_norm(c["E"], layer.lora_embedding_A, layer.lora_embedding_B, layer.scaling)
    assert_close(ym, y, k=k, scale=scale / n.min())
    layer.unmerge()
    assert_close(layer.weight, c["E"], k=k, scale=(np.abs(c["E"]) + delta).max())


def test_layer_backward_accumulates_and_training_lowers_the_loss():
    from dora_ref.layers.optim import AdamW

    rng = np.random.default_rng(2)
    E = rng.standard_normal((10, 4))
    layer = Em.DoRAEmbedding(E, r=2, lora_alpha=2, rng=0, padding_idx=0)
    ids = rng.integers(0, 10, size=(3, 5))
    target = rng.standard_normal((3, 5, 4))
    opt = AdamW(layer.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(10):
        y = layer(ids)
        losses.append(0.5 * np.sum((y - target) ** 2))
        layer.zero_grad()
        assert layer.backward(y - target) is None
        opt.step(layer.grads)
    assert losses[-1] < losses[0]
    assert not layer.lora_embedding_A[:, 0].any()  # padding_idx's column never moved


def test_mlx_lm_per_token_convention_is_a_different_function():
    """mlx-lm normalises each token row (magnitude (V,)); PEFT each dimension (magnitude (D,))."""
    rng = np.random.default_rng(4)
    E, A, B = rng.standard_normal((6, 3)), rng.standard_normal((2, 6)), rng.standard_normal((3, 2))
    s, ids = 1.0, np.array([1, 4])
    m_peft = Em.embedding_init_magnitude(E, np.zeros_like(A), B, s)
    y_peft, _ = Em.embedding_dora_forward(ids, E, A, B, m_peft, s)
    rows = E + s * (B @ A).T  # mlx-lm: adapted rows, each scaled to ||E[id]||
    y_mlx = (np.linalg.norm(E, axis=1) / np.linalg.norm(rows, axis=1))[ids, None] * rows[ids]
    assert m_peft.shape == (3,) and np.linalg.norm(E, axis=1).shape == (6,)
    assert np.abs(y_peft - y_mlx).max() > 0.1
    with pytest.raises(ValueError, match="mlx-lm's convention"):
        Em.embedding_dora_forward(ids, E, A, B, np.linalg.norm(E, axis=1), s)


def test_bad_input_raises_clear_errors():
    rng = np.random.default_rng(0)
    E, A, B = rng.standard_normal((5, 3)), rng.standard_normal((2, 5)), rng.standard_normal((3, 2))
    m = np.ones(3)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\)"):
        Em.embedding_dora_forward(np.array([0, 5]), E, A, B, m, 1.0)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\)"):
        Em.embedding_dora_forward(np.array([-1]), E, A, B, m, 1.0)
    with pytest.raises(TypeError, match="ids must be an integer array"):
        Em.embedding_dora_forward(np.array([0.0]), E, A, B, m, 1.0)
    with pytest.raises(ValueError, match=r"lora_embedding_A \(r, V\)"):
        Em.embedding_dora_forward(np.array([0]), E, A.T, B, m, 1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        Em.embedding_dora_forward(np.array([0]), E, A.astype(np.float32), B, m, 1.0)
    with pytest.raises(ValueError, match="padding_idx must be within"):
        Em.DoRAEmbedding(E, padding_idx=9)
    y, ctx = Em.embedding_dora_forward(np.array([[0, 1]]), E, A, B, m, 1.0)
    with pytest.raises(ValueError, match=r"dy must have the forward output's shape \(1, 2, 3\)"):
        Em.embedding_dora_backward(y[0], ctx)
    with pytest.raises(ValueError, match="all-zero row"):
        Em.embedding_dora_forward(np.array([0]), np.zeros((5, 3)), np.zeros((2, 5)), B, m, 1.0)


def test_eval_norm_cache_follows_in_place_updates():
    rng = np.random.default_rng(6)
    E = rng.standard_normal((8, 3))
    layer = Em.DoRAEmbedding(E, r=2, init_lora_weights=False, rng=0).eval()
    ids = np.array([1, 5, 5])
    layer(ids)
    layer.lora_embedding_A[:, 5] += 1.0  # an in-place optimiser step
    y, _ = Em.embedding_dora_forward(ids, E, layer.lora_embedding_A, layer.lora_embedding_B,
                                     layer.lora_magnitude_vector, layer.scaling)
    np.testing.assert_array_equal(layer(ids), y)


# ---------------------------------------------------------------------------
# regressions: the layer owns its table; optimisers, dtypes, NaN/Inf, memory
# ---------------------------------------------------------------------------


def test_layer_owns_its_table_so_writes_to_the_callers_array_do_not_stale_the_eval_norm():
    rng = np.random.default_rng(20)
    E = rng.standard_normal((9, 4))
    layer = Em.DoRAEmbedding(E, r=2, init_lora_weights=False, rng=0).eval()
    ids = np.array([[0, 3, 8]])
    y_eval = layer(ids)  # fills the eval norm cache
    E0 = E.copy()
    E *= 3.0
    assert not np.shares_memory(layer.weight, E) and not layer.weight.flags.writeable
    np.testing.assert_array_equal(layer.weight, E0)
    np.testing.assert_array_equal(layer(ids), y_eval)
    np.testing.assert_allclose(layer.train()(ids), y_eval, rtol=1e-13, atol=1e-13)
    frozen = np.ascontiguousarray(E0)
    frozen.flags.writeable = False  # read-only and C-contiguous: trusted, not copied
    assert np.shares_memory(Em.DoRAEmbedding(frozen, r=2).weight, frozen)


def test_set_base_weight_keeps_an_optimizer_training_the_magnitude():
    from dora_ref.layers.optim import AdamW

    rng = np.random.default_rng(21)
    E = rng.standard_normal((10, 4))
    layer = Em.DoRAEmbedding(E, r=2, rng=0)
    params = layer.parameters()
    opt = AdamW(params, lr=0.1)
    E2 = 2.0 * E
    layer.set_base_weight(E2)
    E2 += 1.0  # the layer kept its own copy
    assert all(layer.parameters()[k] is v for k, v in params.items())  # same arrays
    np.testing.assert_array_equal(layer.weight, 2.0 * E)
    m_new = Em.embedding_init_magnitude(2.0 * E, layer.lora_embedding_A, layer.lora_embedding_B,
                                        layer.scaling)
    np.testing.assert_array_equal(layer.lora_magnitude_vector, m_new)
    ids = rng.integers(0, 10, size=(3, 4))
    y = layer(ids)
    layer.backward(rng.standard_normal(y.shape))
    opt.step(layer.grads)
    assert np.abs(layer.lora_magnitude_vector - m_new).max() > 0.05  # AdamW moved it
    with pytest.raises(ValueError, match=r"weight must have shape \(V, D\) = \(10, 4\)"):
        layer.set_base_weight(E[:5])
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_base_weight(E)


def test_assigned_adapter_arrays_must_be_real_floats_of_the_weights_dtype():
    import warnings

    rng = np.random.default_rng(22)
    layer = Em.DoRAEmbedding(rng.standard_normal((6, 3)), r=2, rng=0)
    A = layer.lora_embedding_A
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ComplexWarning would fail the test
        with pytest.raises(TypeError, match="lora_embedding_A must have dtype float32 or float64"):
            layer.lora_embedding_A = A + 1j
        with pytest.raises(TypeError, match="lora_magnitude_vector must have dtype"):
            layer.lora_magnitude_vector = np.ones(3, dtype=complex)
    with pytest.raises(TypeError, match="has dtype float32 but the weight has dtype float64"):
        layer.lora_embedding_B = layer.lora_embedding_B.astype(np.float32)
    with pytest.raises(ValueError, match=r"lora_magnitude_vector must have shape \(3,\)"):
        layer.lora_magnitude_vector = np.ones(6)
    new_A = rng.standard_normal(A.shape)
    layer.lora_embedding_A = new_A  # copied into the same array: optimisers keep it
    assert layer.lora_embedding_A is A and not np.shares_memory(A, new_A)
    np.testing.assert_array_equal(A, new_A)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_magnitude_or_adapter_raises(bad):
    """A NaN/Inf magnitude used to give NaN/Inf outputs silently (linear and conv raised)."""
    rng = np.random.default_rng(23)
    E, A, B = rng.standard_normal((5, 3)), rng.standard_normal((2, 5)), rng.standard_normal((3, 2))
    ids = np.array([0, 4])
    m = np.ones(3)
    m[1] = bad
    with pytest.raises(ValueError, match=r"magnitude \(shape \(3,\)\) contains NaN or Inf"):
        Em.embedding_dora_forward(ids, E, A, B, m, 1.0)
    with pytest.raises(ValueError, match="magnitude .* contains NaN or Inf"):
        Em.embedding_merge(E, A, B, m, 1.0)
    A_bad = A.copy()
    A_bad[0, 2] = bad
    with pytest.raises(ValueError, match="lora_embedding_A .* contains NaN or Inf"):
        Em.embedding_column_norm(E, A_bad, B, 1.0)
    layer = Em.DoRAEmbedding(E, r=2, rng=0)
    layer.lora_magnitude_vector[0] = bad  # an in-place write bypasses the setter's check
    for mode in (layer.train, layer.eval):
        mode()
        with pytest.raises(ValueError, match="magnitude .* contains NaN or Inf"):
            layer(ids)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_norm_over_several_vocabulary_blocks_matches_the_dense_definition(dtype):
    """The norm walks the table in ~1 MiB blocks of rows; check it across block edges."""
    rng = np.random.default_rng(24)
    V, D, r = 5000, 64, 3  # 2048 float64 (4096 float32) rows a block: several blocks
    E = rng.standard_normal((V, D)).astype(dtype)
    A, B = rng.standard_normal((r, V)).astype(dtype), rng.standard_normal((D, r)).astype(dtype)
    n = Em.embedding_column_norm(E, A, B, 0.5)
    V_oi = E.T.astype(np.float64) + 0.5 * B.astype(np.float64) @ A.astype(np.float64)
    assert n.dtype == dtype
    assert_close(n, np.linalg.norm(V_oi, axis=1), dtype=dtype, k=V + r)
    assert_close(Em.embedding_column_norm(np.asfortranarray(E), A, B, 0.5), n, dtype=dtype, k=V + r)


def test_training_forward_makes_no_copy_of_the_table():
    """The norm over the vocabulary used to copy the whole (V, D) table on every
    training forward (E.T made contiguous): peak 21.4 MiB (NumPy) / 19.6 MiB (C)
    for this 19.5 MiB table; now about 2 MiB, the norm's row blocks."""
    import tracemalloc

    rng = np.random.default_rng(25)
    E = rng.standard_normal((20000, 128))  # 19.5 MiB
    layer = Em.DoRAEmbedding(E, r=4, init_lora_weights=False, rng=0, detach_norm=False)
    ids = rng.integers(0, 20000, size=(4, 8))
    layer(ids)
    tracemalloc.start()
    try:
        y = layer(ids)
        layer.backward(y)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < E.nbytes / 4, f"peak {peak / 2**20:.2f} MiB for a {E.nbytes / 2**20:.1f} MiB table"


@pytest.mark.parametrize("size", [1e-170, 1e170])
def test_tiny_or_huge_float64_table_gets_its_true_norm(size):
    """Squares summed in float64 underflow to 0 / overflow there; those columns are
    rescaled, as in ``functional.column_norm``, not reported as all-zero or overflowed."""
    rng = np.random.default_rng(26)
    E = size * rng.standard_normal((7, 3))
    A, B = np.zeros((2, 7)), rng.standard_normal((3, 2))
    n = Em.embedding_column_norm(E, A, B, 1.0)
    assert_close(n / size, np.linalg.norm(E / size, axis=0), k=7)
    y, _ = Em.embedding_dora_forward(np.array([2]), E, A, B, n, 1.0)
    assert_close(y / size, E[[2]] / size, k=9)


def test_merge_refuses_a_zero_magnitude_it_could_not_unmerge():
    """As DoRALinear: m = 0 would zero a column of the table for good; the layer stays unmerged."""
    rng = np.random.default_rng(27)
    E = rng.standard_normal((6, 3))
    layer = Em.DoRAEmbedding(E, r=2, rng=0)
    layer.lora_magnitude_vector[2] = 0.0
    with pytest.raises(ValueError, match=r"magnitude is 0 at output channel\(s\) \[2\]"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(layer.weight, E)
