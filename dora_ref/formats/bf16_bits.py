"""bfloat16 as raw bits, without ml_dtypes: widening is exact, narrowing rounds once.

A bfloat16 is the top 16 bits of a float32 (same sign and exponent, 7 of the
23 fraction bits). Widening shifts the bits left by 16, exactly. Narrowing
rounds to nearest, ties to even, on the bits (the rule torch and ml_dtypes
use), keeps NaN a NaN, and can report values that do not fit. float16 goes
through NumPy's own casts (NumPy has the type). The merge command converts
whole tensors this way, a cache-sized chunk at a time, in parallel parts on
the cores the machine has idle (NumPy's ufuncs release the GIL), into
buffers it reuses (``out=``).
"""
from __future__ import annotations

import os

import numpy as np


_CHUNK = 1 << 16  # elements per step of a conversion (cache-sized temporaries)
_pool = None


def _idle_cores():
    """Cores not busy with other work: the core count minus the 1-minute load average (ours counted as idle).

    Threads help only on idle cores: on a busy 2-core machine a second
    conversion thread made ``dora-ref merge`` slower (9.2-10.8 s single vs
    11.1-12.3 s with two, load average 8).
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover  (Windows)
        return cores
    return max(1, min(cores, int(cores - busy + 1.5)))


def _parallel(run, n):
    """Call ``run(lo, hi)`` on contiguous parts of range(n): one per idle core for large n.

    NumPy's integer ufuncs release the GIL, so the parts run at once.
    """
    global _pool
    workers = min(_idle_cores(), 8) if n >= 8 * _CHUNK else 1
    if workers == 1:
        run(0, n)
        return
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8), thread_name_prefix="dora-ref-convert")
    step = -(-n // workers // _CHUNK) * _CHUNK
    list(_pool.map(lambda lo: run(lo, min(lo + step, n)), range(0, n, step)))


def _target(out, shape, dtype, name):
    """``out`` checked to be a contiguous ``dtype`` array of ``shape`` (or a new one)."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not (isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == shape and out.flags.c_contiguous
            and out.flags.writeable):  # fmt: skip
        raise ValueError(f"{name}: out must be a writable C-contiguous {np.dtype(dtype).name} array of shape "
                         f"{shape}, got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{getattr(out, 'shape', '')}")  # fmt: skip
    return out


def bfloat16_bits_to_float32(bits, *, out=None):
    """Widen bfloat16 values, given as their uint16 bits, to float32 (exact).

    A bfloat16 is the upper half of a float32: the float32 bits are the
    bfloat16 bits shifted left by 16 (one NumPy shift a chunk, in parallel
    parts on idle cores).

    Parameters
    ----------
    bits : ndarray of uint16, any shape
    out : ndarray of float32, the same shape, C-contiguous, optional
        Written in place (lets a caller reuse one buffer for many tensors).

    Returns
    -------
    ndarray of float32, the same shape (``out`` if given)

    Raises
    ------
    ValueError
        If ``out`` is not a writable C-contiguous float32 array of the shape of ``bits``.
    """
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    out = _target(out, bits.shape, np.float32, "bfloat16_bits_to_float32")
    src, dst = bits.reshape(-1), out.reshape(-1).view(np.uint32)

    def run(lo, hi):
        for s in range(lo, hi, _CHUNK):
            e = min(s + _CHUNK, hi)
            np.left_shift(src[s:e], 16, out=dst[s:e], dtype=np.uint32)

    _parallel(run, src.size)
    return out


#: the smallest float32 that rounds to inf in bfloat16: halfway from the largest bfloat16 (0x7F7F) to
#: inf, a tie that goes to the even neighbour, inf (0x7F80)
_BF16_OVERFLOW = np.uint32(0x7F7F8000).view(np.float32)
#: the same for float16: halfway from 65504 to the next power 65536, rounding to inf
_F16_OVERFLOW = np.float32(65520.0)


def _all_below(chunk, limit):
    """Whether every |value| of ``chunk`` is below ``limit``: False for any NaN (two vectorised reductions)."""
    return bool(chunk.max() < limit and chunk.min() > -limit)


def float32_to_bfloat16_bits(x, *, report_non_finite=False, out=None):
    """Round float32 values to bfloat16, ties to even; return the uint16 bits.

    The rule of IEEE 754 (and of ``torch.Tensor.to(torch.bfloat16)``, and
    ``ml_dtypes``): the nearest bfloat16, and of two equally near the one
    with an even last bit. In bits: add 0x7FFF plus the lowest kept bit,
    then drop the low 16 bits. Values beyond the largest bfloat16
    (3.3895e38 plus half a unit in the last place) become inf, inf stays
    inf, and NaN stays a (quiet) NaN of the same sign.

    Each chunk (cache-sized, in parallel parts on idle cores) is rounded,
    then its largest and smallest values are compared with the overflow
    threshold ``_BF16_OVERFLOW``; only a chunk that fails (NaN, inf, or a
    value that rounds to inf) is looked at element by element, to redo
    its NaNs and report it.

    Parameters
    ----------
    x : ndarray of float32, any shape
    report_non_finite : bool, default False
        Also say whether any result is inf or NaN (checked while each chunk
        is in cache).
    out : ndarray of uint16, the same shape, C-contiguous, optional
        Written in place.

    Returns
    -------
    ndarray of uint16, the same shape (``out`` if given)
        And, with ``report_non_finite``, a bool.

    Raises
    ------
    ValueError
        If ``out`` is not a writable C-contiguous uint16 array of the shape of ``x``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    non_finite = []
    out = _target(out, x.shape, np.uint16, "float32_to_bfloat16_bits")
    xf, dst = x.reshape(-1), out.reshape(-1)
    xu = xf.view(np.uint32)

    def run(lo, hi):
        tmp = np.empty(min(_CHUNK, hi - lo), dtype=np.uint32)
        for s in range(lo, hi, _CHUNK):
            e = min(s + _CHUNK, hi)
            t, u = tmp[: e - s], xu[s:e]
            np.right_shift(u, 16, out=t)
            t &= 1
            t += u
            t += 0x7FFF  # no wrap-around: only NaNs are that large, and they are redone below
            np.right_shift(t, 16, out=dst[s:e], casting="unsafe")
            if _all_below(xf[s:e], _BF16_OVERFLOW):
                continue
            # NaN, inf or a value rounding to inf. (A NaN whose payload is near all ones
            # wraps the sum above to a small number: never judge by the rounded bits.)
            non_finite.append(True)
            nan = np.isnan(xf[s:e])
            if nan.any():
                dst[s:e][nan] = (u[nan] >> 16) | 0x0040

    _parallel(run, xu.size)
    return (out, bool(non_finite)) if report_non_finite else out


def float16_to_float32(a, *, out=None):
    """Widen float16 values to float32 (exact; NumPy's cast, in parallel parts on idle cores).

    Parameters
    ----------
    a : ndarray of float16, any shape
    out : ndarray of float32, the same shape, C-contiguous, optional

    Returns
    -------
    ndarray of float32, the same shape (``out`` if given)
    """
    a = np.ascontiguousarray(a, dtype=np.float16)
    out = _target(out, a.shape, np.float32, "float16_to_float32")
    src, dst = a.reshape(-1), out.reshape(-1)

    def run(lo, hi):
        for s in range(lo, hi, _CHUNK):
            e = min(s + _CHUNK, hi)
            dst[s:e] = src[s:e]

    _parallel(run, src.size)
    return out


def float32_to_float16(x, *, report_non_finite=False, out=None):
    """Round float32 values to float16, ties to even (NumPy's cast, in parallel parts on idle cores).

    Values from 65520 up (halfway past the largest float16, 65504) become
    inf, as IEEE 754 rounds them; NaN stays NaN.

    Parameters
    ----------
    x : ndarray of float32, any shape
    report_non_finite : bool, default False
        Also say whether any result is inf or NaN.
    out : ndarray of float16, the same shape, C-contiguous, optional

    Returns
    -------
    ndarray of float16, the same shape (``out`` if given)
        And, with ``report_non_finite``, a bool.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = _target(out, x.shape, np.float16, "float32_to_float16")
    src, dst = x.reshape(-1), out.reshape(-1)
    non_finite = []

    def run(lo, hi):
        for s in range(lo, hi, _CHUNK):
            e = min(s + _CHUNK, hi)
            with np.errstate(over="ignore", invalid="ignore"):
                dst[s:e] = src[s:e]
            if not _all_below(src[s:e], _F16_OVERFLOW):
                non_finite.append(True)

    _parallel(run, src.size)
    return (out, bool(non_finite)) if report_non_finite else out
