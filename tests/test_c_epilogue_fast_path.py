"""forward_epilogue's one-pass check (``_epilogue_usual``) accepts exactly the
calls the general path takes without a copy or an error.

The C wrapper's fast path skips ``_arrays`` and ``_epilogue_shapes``: it is
safe only if every argument it lets through is one those checks let through
unchanged (no copy: the pointers are the caller's arrays), and it must not
refuse a usual call either (then the general path still runs, only slower).
Each case below is one way to get an argument wrong; the general checks decide
the expected answer, independently of ``_epilogue_usual``.
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

from dora_ref.core import kernels_numpy as NP


class _Sub(np.ndarray):
    pass


def _args(dtype, N=5, out=7, r=3, bias=True):
    rng = np.random.default_rng(1)
    a = dict(base=rng.standard_normal((N, out)), U=rng.standard_normal((N, r)),
             B=rng.standard_normal((out, r)), g=rng.standard_normal(out),
             bias=rng.standard_normal(out) if bias else None)
    return {k: (v.astype(dtype) if v is not None else None) for k, v in a.items()}


def _mutations(dtype):
    other = np.float32 if dtype == np.float64 else np.float64
    yield "usual", {}
    yield "no bias", {"bias": None}
    for name in ("base", "U", "B", "g", "bias"):
        a = _args(dtype)
        arr = a[name]
        yield f"{name} other dtype", {name: arr.astype(other)}
        yield f"{name} float16", {name: arr.astype(np.float16)}
        yield f"{name} int", {name: arr.astype(np.int64)}
        yield f"{name} list", {name: arr.tolist()}
        yield f"{name} subclass", {name: arr.view(_Sub)}
        yield f"{name} one more dim", {name: arr[None]}
        if arr.ndim == 2:
            yield f"{name} flattened", {name: arr.reshape(-1)}
        yield f"{name} one short", {name: arr[..., :-1] if arr.ndim == 2 else arr[:-1]}
        if arr.ndim == 2:
            yield f"{name} strided", {name: np.repeat(arr, 2, axis=1)[:, ::2]}
            yield f"{name} Fortran", {name: np.asfortranarray(arr)}
            yield f"{name} transposed", {name: arr.T}
        else:
            yield f"{name} strided", {name: np.repeat(arr, 2)[::2]}
            yield f"{name} column", {name: arr[:, None]}
        yield f"{name} byte-swapped", {name: arr.astype(arr.dtype.newbyteorder())}


def _general_takes_as_is(a):
    """The general path's checks: True if they pass and copy nothing."""
    named = {k: v for k, v in a.items() if v is not None}
    try:
        arrays, dtype = C._arrays(**named)
        N, out_f, r, _ = C._epilogue_shapes(*arrays[:4])
    except (TypeError, ValueError):
        return False
    if a["bias"] is not None and arrays[4].shape != (out_f,):
        return False
    return all(x is named[k] for x, k in zip(arrays, named))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_epilogue_fast_check_accepts_exactly_what_the_general_path_takes_unchanged(dtype):
    seen = 0
    for what, change in _mutations(dtype):
        a = {**_args(dtype), **change}
        base = a["base"]
        usual = (type(base) is np.ndarray and base.dtype in C._EPILOGUE_KERNELS
                 and C._epilogue_usual(base, a["U"], a["B"], a["g"], a["bias"]))
        general = _general_takes_as_is(a)
        assert not usual or general, f"{what}: the fast check lets through what the general path would not"
        if "subclass" not in what:  # a subclass takes the general path, which accepts it as is
            assert usual == general, f"{what}: a usual call missed the fast path"
        seen += usual
    assert seen == 2  # the usual call, with and without bias


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_epilogue_bad_arguments_raise_the_general_message(dtype):
    """What the fast path lets fall through still raises, naming the argument."""
    for what, change in _mutations(dtype):
        a = {**_args(dtype), **change}
        if _general_takes_as_is(a):
            continue
        try:
            y = C.forward_epilogue(a["base"], a["U"], a["B"], a["g"], 2.0, a["bias"])
        except (TypeError, ValueError):
            continue
        # accepted after a copy (a strided, subclassed or byte-swapped input):
        # the result of the contiguous call, to rounding
        want = NP.forward_epilogue(*(np.ascontiguousarray(a[k], dtype=dtype)
                                     for k in ("base", "U", "B", "g")), 2.0,
                                   None if a["bias"] is None
                                   else np.ascontiguousarray(a["bias"], dtype=dtype))
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5, err_msg=what)


def test_epilogue_fast_path_refuses_a_bool_or_non_real_scaling():
    a = _args(np.float64)
    for bad in (True, "2", None, 1j):
        with pytest.raises(TypeError, match="scaling"):
            C.forward_epilogue(a["base"], a["U"], a["B"], a["g"], bad, a["bias"])
    y_int = C.forward_epilogue(a["base"], a["U"], a["B"], a["g"], 2, a["bias"])
    y_np = C.forward_epilogue(a["base"], a["U"], a["B"], a["g"], np.float32(2), a["bias"])
    y = C.forward_epilogue(a["base"], a["U"], a["B"], a["g"], 2.0, a["bias"])
    np.testing.assert_array_equal(y_int, y)
    np.testing.assert_array_equal(y_np, y)
