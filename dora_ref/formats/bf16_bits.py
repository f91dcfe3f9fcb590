"""bfloat16 as raw bits, without ml_dtypes: widening is exact, narrowing rounds once.

A bfloat16 is the top 16 bits of a float32 (same sign and exponent, 7 of the
23 fraction bits). Widening shifts the bits left by 16, exactly. Narrowing
rounds to nearest, ties to even, on the bits (the rule torch and ml_dtypes
use), keeps NaN a NaN, and can report values that do not fit. The merge
command converts whole tensors this way, in blocks, on the cores the machine
has idle.
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


def bfloat16_bits_to_float32(bits):
    """Widen bfloat16 values, given as their uint16 bits, to float32 (exact).

    A bfloat16 is the upper half of a float32: the float32 bits are the
    bfloat16 bits shifted left by 16.

    Parameters
    ----------
    bits : ndarray of uint16, any shape

    Returns
    -------
    ndarray of float32, the same shape
    """
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    out = np.empty(bits.shape, dtype=np.float32)
    src, dst = bits.reshape(-1), out.reshape(-1).view(np.uint32)

    def run(lo, hi):
        for s in range(lo, hi, _CHUNK):
            d = dst[s : min(s + _CHUNK, hi)]
            d[...] = src[s : s + d.size]
            d <<= 16

    _parallel(run, src.size)
    return out


def float32_to_bfloat16_bits(x, *, report_non_finite=False):
    """Round float32 values to bfloat16, ties to even; return the uint16 bits.

    The rule of IEEE 754 (and of ``torch.Tensor.to(torch.bfloat16)``, and
    ``ml_dtypes``): the nearest bfloat16, and of two equally near the one
    with an even last bit. In bits: add 0x7FFF plus the lowest kept bit,
    then drop the low 16 bits. Values beyond the largest bfloat16
    (3.3895e38 plus half a unit in the last place) become inf, inf stays
    inf, and NaN stays a (quiet) NaN of the same sign.

    Parameters
    ----------
    x : ndarray of float32, any shape
    report_non_finite : bool, default False
        Also say whether any result is inf or NaN (checked while each chunk
        is in cache).

    Returns
    -------
    ndarray of uint16, the same shape
        And, with ``report_non_finite``, a bool.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    non_finite = []
    out = np.empty(x.shape, dtype=np.uint16)
    xf, dst = x.reshape(-1), out.reshape(-1)
    xu = xf.view(np.uint32)

    def run(lo, hi):
        tmp = np.empty(min(_CHUNK, hi - lo), dtype=np.uint32)
        for s in range(lo, hi, _CHUNK):
            e = min(s + _CHUNK, hi)
            t, u = tmp[: e - s], xu[s:e]
            np.right_shift(u, 16, out=t)
            t &= 1
            t += 0x7FFF
            t += u  # no wrap-around: only NaNs are that large, and they are redone below
            t >>= 16
            dst[s:e] = t
            nan = np.isnan(xf[s:e])
            has_nan = bool(nan.any())
            if has_nan:
                dst[s:e][nan] = (u[nan] >> 16) | 0x0040
            if report_non_finite:
                # On the final bits: a NaN whose payload is near all ones wraps t to 0,
                # so the rounded value t alone would not show it.
                t &= 0x7FFF  # exponent all ones: inf or NaN
                if has_nan or (t.size and t.max() >= 0x7F80):
                    non_finite.append(True)

    _parallel(run, xu.size)
    return (out, bool(non_finite)) if report_non_finite else out
