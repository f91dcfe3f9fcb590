"""Regressions from session 13's adversary: unmerge returned inf without an error, and two
non-array arguments raised AttributeError instead of a TypeError naming the argument.

* ``unmerge`` of finite float32/float64 inputs whose W' / (m / n) or s B A overflows the dtype
  returned an all-inf W0 (the 16-bit unmerge already refused it); it now raises
  ``NonFiniteWeightError`` naming the rows, as ``merge`` does.
* ``unmerge(..., magnitude=None, ...)`` raised AttributeError; now TypeError, as ``merge``.
* ``init_magnitude`` with W0 a list raised AttributeError (``None in LOW_PRECISION_DTYPES``);
  it now takes a list as ``column_norm`` does, and None, a string or a scalar are refused by the
  same checks as there.

Runs on both backends (the conftest's autouse ``backend`` fixture).
"""
from __future__ import annotations

import numpy as np
import pytest

import dora_ref
from dora_ref.core.precision import LOW_PRECISION_DTYPES


@pytest.mark.parametrize("dtype, big", [(np.float32, 3e38), (np.float64, 1.5e308)])
def test_unmerge_whose_result_overflows_is_refused_with_its_rows(dtype, big):
    W = np.full((3, 4), big, dtype)
    W[1] = 1.0  # row 1 stays finite: only rows 0 and 2 are named
    A = np.ones((1, 4), dtype)
    B = np.ones((3, 1), dtype)
    one = np.ones(3, dtype)
    with pytest.raises(dora_ref.NonFiniteWeightError, match=r"unmerged weight.*\[0, 2\].*overflowed") as e:
        dora_ref.unmerge(W, A, B, one, -big, one)
    assert list(e.value.rows) == [0, 2]


def test_unmerge_whose_low_rank_term_overflows_is_refused():
    f = np.float32
    W = np.ones((2, 3), f)
    A = np.full((1, 3), 1e20, f)
    B = np.full((2, 1), 1e20, f)
    one = np.ones(2, f)
    with pytest.raises(dora_ref.NonFiniteWeightError, match="overflowed float32"):
        dora_ref.unmerge(W, A, B, one, 1.0, one)


def test_unmerge_finite_result_is_returned_unchanged():
    # the result check reads W0 and returns it as the kernel wrote it: bit for bit the
    # backend's unmerge with the factor m / n
    from dora_ref.core import backend

    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((5, 7))
    A, B = rng.standard_normal((2, 7)), rng.standard_normal((5, 2))
    m = rng.uniform(0.5, 2, 5)
    W_merged, n = dora_ref.merge(W0, A, B, m, 0.5)
    want = backend.kernels().unmerge(W_merged, A, B, m / n, 0.5)
    np.testing.assert_array_equal(dora_ref.unmerge(W_merged, A, B, m, 0.5, n), want)


def test_unmerge_magnitude_none_is_a_type_error():
    f = np.float32
    with pytest.raises(TypeError, match="magnitude must be an array"):
        dora_ref.unmerge(np.ones((2, 3), f), np.ones((1, 3), f), np.ones((2, 1), f), None, 1.0,
                         np.ones(2, f))


def test_init_magnitude_takes_a_list_w0_as_column_norm_does():
    A, B = np.ones((1, 2)), np.ones((1, 1))
    got = dora_ref.init_magnitude([[1.0, 2.0]], A, B, 1.0)
    np.testing.assert_array_equal(got, dora_ref.column_norm(np.array([[1.0, 2.0]]), A, B, 1.0))


@pytest.mark.parametrize("bad, error", [(None, TypeError), ("abc", TypeError), (3.0, ValueError)])
def test_init_magnitude_refuses_a_non_array_w0_by_name(bad, error):
    with pytest.raises(error, match="W0"):
        dora_ref.init_magnitude(bad, np.ones((1, 2)), np.ones((1, 1)), 1.0)


@pytest.mark.parametrize("obj", [None, "x", 3, object(), [1, 2]])
def test_low_precision_dtypes_contains_nothing_that_is_not_a_dtype(obj):
    assert obj not in LOW_PRECISION_DTYPES


def test_low_precision_dtypes_still_knows_its_two_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert np.dtype(np.float16) in LOW_PRECISION_DTYPES and np.float16 in LOW_PRECISION_DTYPES
    assert np.dtype(ml_dtypes.bfloat16) in LOW_PRECISION_DTYPES
    assert np.dtype(np.float32) not in LOW_PRECISION_DTYPES


@pytest.mark.parametrize("bad, error", [(float("nan"), ValueError), (float("inf"), ValueError),
                                        ("2", TypeError)])
def test_embedding_bad_embed_scale_is_named_embed_scale(bad, error):
    # it was reported as "scaling must be finite" (session 13's adversary)
    from dora_ref.core.embedding import embedding_dora_forward, embedding_init_magnitude

    rng = np.random.default_rng(1)
    E, A, B = rng.standard_normal((7, 4)), rng.standard_normal((2, 7)), rng.standard_normal((4, 2))
    m = embedding_init_magnitude(E, A, B, 0.5)
    with pytest.raises(error, match="^embed_scale must be"):
        embedding_dora_forward(np.array([1, 2]), E, A, B, m, 0.5, embed_scale=bad)


def test_column_norm_that_overflows_raises_without_numpy_warnings(backend):
    # the rescue pass formed s * B @ A for the flagged rows outside np.errstate, so a scaling
    # beyond float32 printed "overflow encountered in cast" before the documented error
    import warnings

    if backend == "numpy":
        pytest.skip("the NumPy backend's kernel is NumPy's own expression, which warns as NumPy "
                    "does (an np.errstate on every call would cost the small layer's step ~3%)")

    f = np.float32
    W0, A, B = np.ones((2, 3), f), np.full((1, 3), 1e30, f), np.full((2, 1), 1e30, f)
    for s in (1e39, 1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match="overflowed float32"):
                dora_ref.column_norm(W0, A, B, s)
