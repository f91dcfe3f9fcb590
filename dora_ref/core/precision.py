"""Low precision: which dtypes dora_ref accepts below float32, and how it rounds.

"lp" below means a low-precision storage dtype: ``np.float16`` (unit
roundoff u = 2**-11) or ``ml_dtypes.bfloat16`` (u = 2**-8). Arithmetic is
never done in lp: every lp input is upcast exactly to float32, the float32
computation runs, and a result is rounded to its storage dtype with
round-to-nearest-even (``astype``).

The arrays of a layer come in two families:

* the base: W0, the bias, x and what has their shapes (y, dx, a merged or
  unmerged weight), all in the lp dtype of W0;
* the adapter: A (lora_A), B (lora_B) and the magnitude, either float32
  ("mixed", PEFT's default ``autocast_adapter_dtype=True``) or the lp dtype
  of W0 ("pure", ``autocast_adapter_dtype=False``).

``classify`` names the case; any other combination is a ``TypeError``.

Two policies say where results are rounded (``POLICIES``):

* ``"consistent"`` (the default): each public operation is the float32
  computation on the exactly upcast inputs, each result rounded once to its
  storage dtype. An untrained layer (B = 0) is then the base layer, bit for
  bit.
* ``"peft"``: PEFT 0.21.2's cast points on CPU (its magnitude rounded to lp at
  init, lp roundings after every operation with lp adapters), reproduced to
  compare with PEFT's numbers.

float32 and float64 arrays never go through any of this: for them ``policy``
changes nothing.
"""
from __future__ import annotations

import sys

import numpy as np

FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)

POLICIES = ("consistent", "peft")

_UNIT_ROUNDOFF = {FLOAT16: 2.0**-11, FLOAT32: 2.0**-24, FLOAT64: 2.0**-53}


def _is_bfloat16(dtype):
    """True for ``ml_dtypes.bfloat16``, without importing ml_dtypes for any other dtype.

    A bfloat16 array exists only once ml_dtypes is imported, so the check
    looks it up in ``sys.modules``: importing dora_ref does not import it.
    """
    if dtype.itemsize != 2 or dtype.name != "bfloat16":
        return False
    ml_dtypes = sys.modules.get("ml_dtypes")
    return ml_dtypes is not None and dtype == ml_dtypes.bfloat16


class _LowPrecisionDtypes:
    """The set {float16, bfloat16}: ``dtype in LOW_PRECISION_DTYPES`` works for any dtype,
    and iterating it (which imports ml_dtypes) gives the two numpy dtypes."""

    __slots__ = ()

    def __contains__(self, dtype):
        if not isinstance(dtype, np.dtype):
            try:  # a scalar type or a name; anything else (None, a list's missing dtype) is not
                dtype = np.dtype(dtype)
            except TypeError:
                return False
        return dtype == FLOAT16 or _is_bfloat16(dtype)

    def __iter__(self):
        import ml_dtypes

        return iter((FLOAT16, np.dtype(ml_dtypes.bfloat16)))

    def __len__(self):
        return 2

    def __repr__(self):
        return "(dtype('float16'), dtype(bfloat16))"


LOW_PRECISION_DTYPES = _LowPrecisionDtypes()


def is_low_precision(dtype):
    """True for float16 and bfloat16 (``LOW_PRECISION_DTYPES``), False otherwise."""
    return np.dtype(dtype) in LOW_PRECISION_DTYPES


def unit_roundoff(dtype):
    """The unit roundoff u of a float dtype: half the distance from 1 to the next value.

    Parameters
    ----------
    dtype : float16, bfloat16, float32 or float64

    Returns
    -------
    float
        2**-11, 2**-8, 2**-24 or 2**-53.

    Raises
    ------
    TypeError
        For any other dtype.
    """
    try:
        dtype = np.dtype(dtype)
        return 2.0**-8 if _is_bfloat16(dtype) else _UNIT_ROUNDOFF[dtype]
    except (KeyError, TypeError):
        raise TypeError(
            f"unit_roundoff: dtype must be float16, bfloat16, float32 or float64, got {dtype}"
        ) from None


def finfo(dtype):
    """``np.finfo`` that also knows bfloat16 (through ``ml_dtypes.finfo``)."""
    if _is_bfloat16(np.dtype(dtype)):
        import ml_dtypes

        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


def check_policy(policy):
    """Return ``policy`` if it is one of ``POLICIES``, else raise ``ValueError``."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return policy


def round_to(x, dtype):
    """Round an array to ``dtype``, round-to-nearest-even (NaN stays NaN).

    A float32 value beyond the range of ``dtype`` becomes inf: the callers'
    finiteness checks then refuse the result (it is never returned).

    Parameters
    ----------
    x : ndarray, any float dtype
    dtype : numpy dtype

    Returns
    -------
    ndarray of ``dtype``; ``x`` itself if it already has it.
    """
    with np.errstate(over="ignore"):  # an overflow to inf is refused by the caller
        return x.astype(dtype, copy=False)


def upcast(x):
    """``x`` as float32 (exact for an lp array), or ``x`` itself if not lp; None stays None.

    A bfloat16 value is the upper half of the float32 with the same value, so
    its upcast is a 16-bit shift of the bits (NaN payloads included), several
    times faster than ml_dtypes' element-by-element cast.
    """
    if x is None or x.dtype not in LOW_PRECISION_DTYPES:
        return x
    if _is_bfloat16(x.dtype):
        bits = np.ascontiguousarray(x).view(np.uint16).astype(np.uint32)
        return np.left_shift(bits, 16, out=bits).view(np.float32)  # in place: one temporary, not two
    return x.astype(np.float32)


def classify(W0, A, B, magnitude=None, bias=None, names=("W0", "A", "B", "magnitude", "bias")):
    """Name the precision case of a layer's arrays, or raise ``TypeError``.

    Parameters
    ----------
    W0 : ndarray
        The base weight; its dtype is the storage dtype.
    A, B : ndarray
        lora_A, lora_B.
    magnitude, bias : ndarray, optional
    names : tuple of 5 str
        How messages call the arrays (e.g. ``"W_merged"`` for ``unmerge``).

    Returns
    -------
    case : str
        ``"f32"`` or ``"f64"`` (every array float32, resp. float64: today's
        rule, one dtype), ``"mixed"`` (W0 and bias lp, A, B, magnitude
        float32) or ``"pure"`` (every array the same lp dtype).
    lp : numpy dtype or None
        The lp dtype of W0, None for float32/float64.

    Raises
    ------
    TypeError
        Naming every array and its dtype when they fit no case: a bias that
        is not W0's dtype, a float64 adapter on an lp weight, fp16 with
        bf16, an adapter that mixes float32 and lp.
    """
    arrays = dict(zip(names, (W0, A, B, magnitude, bias)))
    seen = {k: v.dtype for k, v in arrays.items() if v is not None}
    base = W0.dtype
    if base not in LOW_PRECISION_DTYPES:
        if len(set(seen.values())) > 1:
            listing = ", ".join(f"{k}: {d}" for k, d in seen.items())
            raise TypeError(
                f"arrays must share one dtype, got {listing}"
                + (_lp_hint(seen, names[0]) if any(
                    d in LOW_PRECISION_DTYPES for d in seen.values()) else "")
            )
        return ("f32" if base == FLOAT32 else "f64"), None
    adapter = {names[i]: seen[names[i]] for i in (1, 2, 3) if names[i] in seen}
    adapter_dtypes = set(adapter.values())
    bias_ok = bias is None or bias.dtype == base
    if bias_ok and adapter_dtypes == {FLOAT32}:
        return "mixed", base
    if bias_ok and adapter_dtypes == {base}:
        return "pure", base
    listing = ", ".join(f"{k}: {d}" for k, d in seen.items())
    raise TypeError(f"unsupported combination of dtypes: {listing}.{_lp_hint(seen, names[0])}")


def _lp_hint(seen, base_name):
    return (
        f" With a float16/bfloat16 {base_name}, the bias and x must have its dtype, and "
        f"A, B and the magnitude must be all float32 (mixed precision, PEFT's "
        f"autocast_adapter_dtype=True) or all {base_name}'s dtype (pure low precision)"
    )
