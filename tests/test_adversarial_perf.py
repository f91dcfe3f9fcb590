"""Adversarial cases against session 4's performance work (hot path, C teams, fused merge).

Each test is named after the case that broke; it asserts values against an
independent computation (``dora_ref.core.dense``) or the error the rules ask for.
"""
from __future__ import annotations

import copyreg
import io
import pickle
import re

import numpy as np
import pytest

from dora_ref.core import dense
from dora_ref.core._validate import WeightSnapshot
from dora_ref.layers.linear import DoRALinear


class _PicklerOfTheOldSnapshot(pickle.Pickler):
    """Pickles a ``WeightSnapshot`` as the version before session 4 did: its slots
    ``_arrays`` (a dict by name) and ``_bytes``, no ``_names``."""

    def reducer_override(self, obj):
        if type(obj) is WeightSnapshot:
            old = {"_arrays": dict(zip(obj._names, obj._arrays)), "_bytes": list(obj._bytes)}
            return copyreg.__newobj__, (WeightSnapshot,), (None, old)
        return NotImplemented


def _old_pickle_roundtrip(obj):
    buf = io.BytesIO()
    _PicklerOfTheOldSnapshot(buf, protocol=4).dump(obj)
    return pickle.loads(buf.getvalue())


def _layer(rng):
    return DoRALinear(rng.standard_normal((6, 5)), rng.standard_normal(6), r=2,
                      lora_A=rng.standard_normal((2, 5)), lora_B=rng.standard_normal((6, 2)))


def test_layer_pickled_with_the_old_weight_snapshot_layout_still_runs_backward_and_unmerge():
    """A layer pickled before ``WeightSnapshot`` kept ``_names`` (its ``_arrays`` a dict) crashed:
    backward after a training forward raised AttributeError ('str' has no ``tobytes``: it iterated
    the names), a merged layer's forward AttributeError (no ``_names``). Now the old state is
    read, the snapshot still sees in-place changes, and the values are the dense definition's."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((3, 5)), rng.standard_normal((3, 6))

    L = _layer(rng)
    L(x)
    want = dense.backward(dy, x, L.weight, L.lora_A, L.lora_B, L.lora_magnitude_vector, L.scaling)
    L = _old_pickle_roundtrip(L)
    dx = L.backward(dy)
    np.testing.assert_allclose(dx, want.dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(L.grads["lora_A"], want.dA, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(L.grads["lora_magnitude_vector"], want.dmagnitude, rtol=1e-12, atol=1e-12)

    L(x)
    L = _old_pickle_roundtrip(L)
    L.lora_B[0, 0] += 1.0  # in place between forward and backward: still refused
    with pytest.raises(RuntimeError, match="lora_B"):
        L.backward(dy)

    M = _layer(rng)
    W0, A, B, m, b = (np.array(a) for a in (M.weight, M.lora_A, M.lora_B, M.lora_magnitude_vector, M.bias))
    M.merge()
    M = _old_pickle_roundtrip(M)
    want_y = dense.forward(x, W0, A, B, m, M.scaling, b)
    np.testing.assert_allclose(M(x), want_y, rtol=1e-12, atol=1e-12)
    M.unmerge()
    np.testing.assert_allclose(M.weight, W0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M(x), want_y, rtol=1e-12, atol=1e-12)


def test_merged_layer_pickled_with_protocol_5_unmerges_and_still_sees_in_place_writes():
    """Pickle protocol 5 restores a merged layer's read-only adapter arrays over immutable bytes:
    ``unmerge()`` raised NumPy's "cannot set WRITEABLE flag to True". Now they are owned copies
    (the merge-time snapshot follows them): unmerge restores W0 and the forward is the dense one,
    and a write around the lock after unpickling is still refused."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5))
    L = _layer(rng)
    W0, A, B, m, b = (np.array(a) for a in (L.weight, L.lora_A, L.lora_B, L.lora_magnitude_vector, L.bias))
    L.merge()
    M = pickle.loads(pickle.dumps(L, protocol=5))
    assert not M.lora_A.flags.writeable  # still locked while merged
    M.unmerge()
    np.testing.assert_allclose(M.weight, W0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M(x), dense.forward(x, W0, A, B, m, M.scaling, b), rtol=1e-12, atol=1e-12)
    M.lora_A[0, 0] += 1.0  # writeable again after unmerge

    N = pickle.loads(pickle.dumps(L, protocol=5))
    N.lora_B.flags.writeable = True  # a write around the lock: the snapshot follows the copies
    N.lora_B[0, 0] += 1.0
    with pytest.raises(RuntimeError, match="lora_B"):
        N.unmerge()


_POOL_AFTER = """
import sys
if sys.argv[1] == "scipy":
    import scipy.linalg  # brings a second OpenBLAS (SciPy's own) into the process
import os
import numpy as np
from dora_ref.kernels import c
pool = c._openblas_pool()
print(None if pool is None else os.path.realpath(pool[2]), int(c.lib.dora_blas_pool_threads()))
"""


def test_openblas_pool_is_numpys_also_after_import_scipy_loaded_a_second_openblas():
    """``import scipy`` (also through transformers, peft) maps SciPy's own OpenBLAS beside NumPy's:
    the pool finder wanted exactly one OpenBLAS in the process and silently fell back to OpenMP
    teams (the slow teams right after a BLAS call), and test_determinism's pool test failed when
    run after a test that imported scipy. Now NumPy's own OpenBLAS is found (``dlsym`` through
    NumPy's extension, ``dladdr``) whatever else is loaded: the same library and team size as in
    a process without SciPy."""
    import subprocess
    import sys

    pytest.importorskip("scipy")
    pytest.importorskip("dora_ref.kernels.c", reason="the C extension is not built")
    run = lambda how: subprocess.run(  # noqa: E731
        [sys.executable, "-c", _POOL_AFTER, how], capture_output=True, text=True, timeout=120,
        check=True).stdout.split()
    alone, with_scipy = run("none"), run("scipy")
    if alone[0] == "None":
        pytest.skip("NumPy's BLAS here is not a threaded pthreads OpenBLAS")
    assert with_scipy == alone


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "flag"])
def test_frozen_weight_of_a_copied_layer_or_its_own_copy_cannot_be_written_in_place(how):
    """The eval-mode norm cache keys on the frozen weight's identity (it changes only by
    replacement). A pickled or deep-copied layer got its weight and bias back writeable, and
    ``layer.weight.flags.writeable = True`` was allowed on the layer's own copy (it owned its
    data): an in-place write then left the cached norm stale, and the eval forward was silently
    wrong (max error 8.8 on this layer) while the training forward was right. Now the weight
    stays read-only (a view of a read-only array), and the eval forward is the dense one."""
    import copy

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5))
    L = _layer(rng).eval()
    L(x)  # fills the eval norm cache
    if how == "pickle":
        L = pickle.loads(pickle.dumps(L, protocol=4))
    elif how == "deepcopy":
        L = copy.deepcopy(L)
    for arr in (L.weight, L.bias):
        with pytest.raises(ValueError):
            arr[0] += 5.0
        with pytest.raises(ValueError):
            arr.flags.writeable = True
    want = dense.forward(x, np.array(L.weight), L.lora_A, L.lora_B, L.lora_magnitude_vector,
                         L.scaling, np.array(L.bias))
    np.testing.assert_allclose(L(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["lora_A", "lora_B"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_written_into_the_adapter_is_named_by_its_peft_name_in_eval_too(dtype, name, value):
    """In eval the norm cache's miss computed the norm first, and NaN/Inf written into lora_A or
    lora_B was reported as "A (shape ...)" / "B (shape ...)" (the functional API's names); the
    training forward names lora_A/lora_B. Both modes now name the layer's parameter."""
    rng = np.random.default_rng(3)
    L = DoRALinear(rng.standard_normal((6, 5)).astype(dtype), r=2,
                   lora_A=rng.standard_normal((2, 5)).astype(dtype),
                   lora_B=rng.standard_normal((6, 2)).astype(dtype))
    x = rng.standard_normal((3, 5)).astype(dtype)
    for training in (True, False):
        L.train(training)
        L(x)
        arr = getattr(L, name)
        keep = arr[1, 0]
        arr[1, 0] = value
        with pytest.raises(ValueError, match=rf"^{name} \(shape {re.escape(str(arr.shape))}\) "
                                             r"contains NaN or Inf, first at index \(1, 0\)"):
            L(x)
        arr[1, 0] = keep
