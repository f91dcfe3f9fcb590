"""Argument checks shared by the functional core and the layers.

Every public function checks its inputs here before any arithmetic, so that
bad input gives a ``TypeError`` or ``ValueError`` that names the argument and
the shapes seen, never a NumPy broadcasting error deep inside, a crash in C,
or a silent NaN.
"""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from .precision import LOW_PRECISION_DTYPES, classify, finfo

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# np.vdot without the __array_function__ dispatch (a Python call per use), where NumPy
# exposes it: sum_squares's fallback, on arrays known to be plain ndarrays
_vdot = getattr(np.vdot, "_implementation", np.vdot)

#: sum_squares's C kernels, installed by ``dora_ref.kernels.c`` when the extension loads
#: (``_install_sum_squares``): (ffi.from_buffer, {dtype char: (C array type, function)}).
_SUM_SQUARES_C = None


def _install_sum_squares(from_buffer, kernels):
    """Called by ``dora_ref.kernels.c`` once its extension has loaded (it imports this
    module, so this module cannot import it): ``kernels`` maps "f" and "d" to (cffi array
    type, ``dora_sum_squares_f32`` / ``_f64``)."""
    global _SUM_SQUARES_C
    _SUM_SQUARES_C = (from_buffer, dict(kernels))


def sum_squares(a):
    """a . a, the sum of the squares of a float32/float64 ndarray's entries, as a Python float.

    The finiteness checks' sum: NaN or Inf if some entry is (the squares are
    >= 0, so an Inf cannot cancel), so a finite result proves every entry
    finite; a non-finite one may also be an overflow of the sum (float64
    entries beyond about 1e154), which the callers then tell apart exactly.

    With the C extension built, a C-contiguous array's sum is the C kernel's
    ``dora_sum_squares_*``: in double, on the calling thread alone. NumPy's
    ``vdot``, used before (and still without the extension, or for an array
    of other strides), runs on OpenBLAS's worker threads above 10,000
    entries, and a fork from another thread in the middle of it hung the
    call for good: ``column_norm`` and ``merge`` hung although their C
    kernels let a fork wait for them (an adversary, session 23). The sum is
    not bit for bit vdot's (double, sixteen partial sums); no result of
    dora_ref depends on it, only which path a check takes. Sets no
    floating-point flag that NumPy reports (``np.errstate``).

    Parameters
    ----------
    a : ndarray, float32 or float64, any shape

    Returns
    -------
    float
    """
    c = _SUM_SQUARES_C
    if c is not None and a.flags.c_contiguous:
        kernel = c[1].get(a.dtype.char)
        if kernel is not None:
            return kernel[1](c[0](kernel[0], a), a.size)
    return float(_vdot(a, a))

# ndarray subclasses whose arithmetic is the ndarray's: a memory-mapped file
_PLAIN_SUBCLASSES = (np.memmap,)


def plain_array(value):
    """True for a plain ndarray or one of ``_PLAIN_SUBCLASSES`` (``np.memmap``): an array
    whose arithmetic is the ndarray's; False for anything else, including the ndarray
    subclasses that ``refuse_array_subclass`` refuses."""
    return type(value) is np.ndarray or isinstance(value, _PLAIN_SUBCLASSES)


def refuse_array_subclass(name, value):
    """Raise ``TypeError`` if ``value`` is an ndarray subclass that changes arithmetic.

    A masked array (``np.ma``) computes on its unmasked entries only and
    ``np.matrix`` makes ``*`` a matrix product: through dora_ref's formulas
    either gives a wrong result or an unrelated broadcasting error, and
    ``np.asarray`` would silently drop the mask. Only plain ndarrays and
    ``np.memmap`` (an ndarray backed by a file) are accepted; the message says
    how to convert.
    """
    if isinstance(value, np.ndarray) and not plain_array(value):
        if isinstance(value, np.ma.MaskedArray):
            how = (f"fill the masked entries explicitly, e.g. {name}.filled(0), "
                   f"or drop them before the call")
        else:
            how = f"convert it with np.asarray({name}) if its arithmetic is the ndarray's"
        raise TypeError(
            f"{name} is a {type(value).__module__}.{type(value).__name__} (shape {value.shape}), "
            f"an ndarray subclass with its own arithmetic, which dora_ref does not "
            f"follow: pass a plain numpy.ndarray; {how}"
        )


def _astype_example(name, want):
    """``name.astype(...)`` to the dtype ``want`` (float32 if None), as a user would write it."""
    want = np.dtype(np.float32 if want is None else want)
    spelled = "ml_dtypes.bfloat16" if want.name == "bfloat16" else f"np.{want.name}"
    return f"{name}.astype({spelled})"


def dtype_mismatch(name, got, want):
    """The ``TypeError`` for an array ``name`` of dtype ``got`` where the weights' dtype ``want``
    is needed, with the conversion to write (a new user's float64 dy, made by a NumPy float64
    scalar, was told what was wrong but not what to do)."""
    return TypeError(f"{name} has dtype {got} but the weights have dtype {want}; "
                     f"convert it first ({name}.astype({str(want)!r})): dora_ref does not "
                     "cast silently")


def as_float_array(name, value, ndim=None, *, low_precision=False, want=None):
    """Return ``value`` as a float32/float64 (or float16/bfloat16) ndarray, or raise.

    Parameters
    ----------
    name : str
        The argument's name, used in error messages.
    value : array_like
        The argument. Lists are converted; integer, bool, complex and object
        arrays are rejected rather than silently promoted.
    ndim : int or tuple of int, optional
        The allowed number(s) of dimensions.
    low_precision : bool, default False
        Also accept float16 and ``ml_dtypes.bfloat16`` (the functions that
        implement ``dora_ref.core.precision``'s rules pass True).
    want : numpy dtype, optional
        The dtype the caller needs (the weights'): the conversion an error
        message suggests (default float32). A float64 layer given float16 x
        was told to convert it to float32, which it then refused too
        (session 20's second adversary).

    Returns
    -------
    numpy.ndarray
        ``value`` itself when it already is a float ndarray (no copy).

    Raises
    ------
    TypeError
        If the dtype is not float32 or float64 (or, with ``low_precision``,
        float16 or bfloat16), or ``value`` is an ndarray
        subclass with its own arithmetic (``np.ma.MaskedArray``,
        ``np.matrix``; see ``refuse_array_subclass``).
    ValueError
        If the number of dimensions is not allowed.
    """
    if type(value) is not np.ndarray:
        refuse_array_subclass(name, value)
    if not isinstance(value, np.ndarray):
        if value is None:
            raise TypeError(f"{name} must be an array, got None")
        value = np.asarray(value)
        if value.dtype.kind in "iu" or value.dtype == np.bool_:
            # a Python list of ints such as [[1, 2], [3, 4]] means float64
            value = value.astype(np.float64)
    if value.dtype not in FLOAT_DTYPES and not (
        low_precision and value.dtype in LOW_PRECISION_DTYPES
    ):
        native = value.dtype.newbyteorder("=") if value.dtype.kind == "f" else None
        if native is not None and not value.dtype.isnative and (
                native in FLOAT_DTYPES or (low_precision and native in LOW_PRECISION_DTYPES)):
            # the float the caller means, stored byte-swapped: name it (a float16 layer's x
            # was told to become float32, which the layer then refused)
            raise TypeError(
                f"{name} has dtype {value.dtype} (shape {value.shape}), {native.name} in "
                f"non-native byte order, which is not accepted; convert it, e.g. "
                f"{_astype_example(name, native if want is None else want)}"
            )
        to = _astype_example(name, want)
        takes = "float32 or float64" if want is None else f"the weights' dtype, {np.dtype(want)}"
        if value.dtype in LOW_PRECISION_DTYPES:
            raise TypeError(
                f"{name} has dtype {value.dtype} (shape {value.shape}), which this function "
                f"does not accept: it takes {takes}; convert it explicitly, e.g. {to}"
            )
        must = "dtype float32 or float64" if want is None else f"the weights' dtype {np.dtype(want)}"
        raise TypeError(
            f"{name} must have {must}, got {value.dtype} "
            f"(shape {value.shape}); convert it explicitly, e.g. {to}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(
                f"{name} must have {want} dimension(s), got shape {value.shape}"
            )
    return value


def check_same_dtype(**arrays):
    """Raise ``TypeError`` unless all non-None arrays share one dtype.

    Returns the common dtype. Mixing float32 and float64 is refused rather
    than promoted, because a silent promotion hides precision bugs in ports.
    """
    seen = {k: v.dtype for k, v in arrays.items() if v is not None}
    dtypes = set(seen.values())
    if len(dtypes) > 1:
        listing = ", ".join(f"{k}: {d}" for k, d in seen.items())
        raise TypeError(f"arrays must share one dtype, got {listing}")
    return dtypes.pop()


def check_flag(name, value):
    """``value`` as a bool if it is one (Python's or NumPy's); else ``TypeError`` naming ``name``.

    A flag taken by truthiness would read the string "False" (from a config
    file or a command line) as True, and None or 0 as False: silently the
    other computation. Found by session 18's adversary on ``detach_norm``,
    ``allow_zero_norm`` and ``use_rslora``.
    """
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_scaling(scaling, name="scaling"):
    """Return ``scaling`` as a Python float; raise if it is not a finite real (the
    message names the argument ``name``: ``scaling``, or e.g. ``embed_scale``)."""
    if type(scaling) is float and scaling - scaling == 0.0:  # finite (inf - inf, NaN: NaN)
        return scaling
    if isinstance(scaling, (bool, np.bool_)) or not isinstance(
        scaling, (numbers.Real, np.floating, np.integer)
    ):
        raise TypeError(f"{name} must be a real number, got {type(scaling).__name__}")
    try:
        scaling = float(scaling)
    except OverflowError:  # an int beyond float's range
        raise ValueError(
            f"{name} must be finite, got an integer of {int(scaling).bit_length()} bits"
        ) from None
    if not np.isfinite(scaling):
        raise ValueError(f"{name} must be finite, got {scaling}")
    return scaling


def all_finite(arr):
    """True if every entry of the float32/float64 ndarray ``arr`` is finite.

    One sum of squares (``sum_squares``, no temporary) decides in the usual
    case: a NaN or an Inf anywhere makes it NaN or Inf (the squares are >= 0,
    so an Inf cannot cancel). A finite sum proves every entry finite; a
    non-finite one is NaN/Inf or an overflow of the sum (float64 entries
    beyond ~1e154), which the exact elementwise test then tells apart. About
    half the cost of ``np.isfinite(arr).all()``, which allocates a boolean
    array and reduces it. Other dtypes (float16, bfloat16, lists) and arrays
    that are not C-contiguous take the exact test.

    Parameters
    ----------
    arr : ndarray or array_like, any shape and strides

    Returns
    -------
    bool
    """
    if type(arr) is np.ndarray and arr.dtype.char in "fd" and arr.flags.c_contiguous:
        if math.isfinite(sum_squares(arr)):
            return True
    return bool(np.isfinite(arr).all())


def check_finite(name, arr):
    """Raise ``ValueError`` if ``arr`` holds NaN or Inf, naming a first bad index."""
    if not all_finite(arr):
        bad = np.argwhere(~np.isfinite(arr))
        raise ValueError(
            f"{name} (shape {arr.shape}) contains NaN or Inf, "
            f"first at index {tuple(int(i) for i in bad[0])}"
        )


def results_finite(*arrays):
    """True if every entry of every float ndarray given is finite: ``check_result_finite``'s
    usual case, for a caller that holds fresh results (its own products) and would
    otherwise build the lists of names per call.

    One sum of squares per array (``sum_squares``), added: finite only if
    every entry is (see ``all_finite``). False also when only a sum overflowed; the
    caller then calls ``check_result_finite``, which decides exactly and
    names what is wrong, so together they refuse exactly what it refuses.
    """
    total = 0.0
    for a in arrays:
        total += sum_squares(a)
    return math.isfinite(total)


def check_result_finite(results, inputs):
    """Raise ``ValueError`` if a result holds NaN or Inf: naming the input that does, or the overflow.

    The weights are checked before a call; what is left is the batch (x, or
    dy in backward), checked here only when a result is not finite, so the
    usual path costs one pass over the results: a sum of squares of
    each (``sum_squares``), added, finite only if every entry of every result is (see
    ``all_finite``; a finite sum that overflows is sorted out array by array). A non-finite input is named
    (``check_finite``); with finite inputs the values overflowed the dtype.

    Parameters
    ----------
    results : sequence of (str, ndarray)
        The arrays computed, by the name a message should use.
    inputs : sequence of (str, ndarray)
        The per-call inputs that could carry NaN or Inf in.
    """
    total = 0.0  # the usual case: one sum of the results' sums of squares (see all_finite)
    for _, a in results:
        if type(a) is not np.ndarray or a.dtype.char not in "fd":
            total = math.nan
            break
        # any strides (the results here are fresh and C-contiguous: the C kernel's sum)
        total += sum_squares(a)
    if math.isfinite(total):
        return
    for name, a in results:
        if not all_finite(a):
            for input_name, x in inputs:
                check_finite(input_name, x)
            bad = np.argwhere(~np.isfinite(a))
            raise ValueError(
                f"{name} (shape {a.shape}) overflowed {a.dtype}, first at index "
                f"{tuple(int(i) for i in bad[0])}: every input is finite, but the values are "
                f"too large for the dtype; scale them down"
                + (", or compute in float64" if a.dtype != np.float64 else "")
            )


def wider_float(dtype):
    """A float type with more exponent range than ``dtype``, or None (error paths only).

    float64 for float32, float16 and bfloat16; for float64, ``np.longdouble``
    where it has a larger exponent range (x86-64 Linux: 80-bit extended,
    largest about 1.19e4932), decided at run time from ``np.finfo``; else
    None, and a message that needs a value beyond float64 says less.

    Parameters
    ----------
    dtype : numpy dtype

    Returns
    -------
    type or None
    """
    if np.dtype(dtype) != np.dtype(np.float64):
        return np.float64
    if np.finfo(np.longdouble).max > np.finfo(np.float64).max:
        return np.longdouble
    return None


def fits_dtype(value, dtype):
    """True if the finite wide ``value`` (scalar or array) rounds to finite values of ``dtype``.

    ``value`` is computed in ``wider_float(dtype)``; float16/bfloat16 are
    reached through float64 (a longdouble is never paired with them).
    """
    v = np.asarray(value)
    if not np.isfinite(v).all():
        return False
    if v.dtype == np.dtype(np.longdouble) and np.dtype(dtype) != np.dtype(np.float64) and \
            np.dtype(dtype) != v.dtype:
        v = v.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(v.astype(dtype)).all())


def describe_overflow(steps, dtype):
    """The first step of a recomputation that is not finite in ``dtype``, in words.

    Parameters
    ----------
    steps : list of (str, ndarray or scalar, ndarray or scalar or None[, dtype])
        In the order the computation forms them: a name, the value as
        recomputed in ``dtype`` and the same value in ``wider_float(dtype)``
        (None where there is none); an optional fourth entry is the dtype
        that step is formed in, where it is not ``dtype``.
    dtype : numpy dtype
        The computation's dtype.

    Returns
    -------
    str or None
        "NAME overflowed DTYPE (largest magnitude about V)" for the first
        step that is not finite; where its wide value fits the dtype, "NAME
        overflowed DTYPE in its partial sums (its value ... fits)"; None if
        every step is finite.
    """
    computation_dtype = dtype
    for name, value, wide, *step_dtype in steps:
        dtype = step_dtype[0] if step_dtype else computation_dtype
        if np.isfinite(np.asarray(value)).all():
            continue
        if wide is None:
            return f"{name} overflowed {dtype}"
        w = np.asarray(wide)
        big = format_wide(np.max(np.abs(w))) if w.size else "0"
        if fits_dtype(w, dtype):
            return (f"{name} overflowed {dtype} in its partial sums (its value, largest "
                    f"magnitude about {big}, fits {dtype})")
        return f"{name} overflowed {dtype} (largest magnitude about {big})"
    return None


def format_wide(value, digits=4):
    """A wide scalar (float64 or long double) to ``digits`` significant digits, also beyond
    float64 (where ``float()`` would give inf)."""
    v = np.asarray(value)[()]
    with np.errstate(over="ignore"):
        as64 = float(v)
    if math.isfinite(as64) or not np.isfinite(v):
        return f"{as64:.{digits}g}"
    mantissa, exponent = np.format_float_scientific(v, precision=digits - 1, trim="k").split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


def check_adapter(W0, A, B, magnitude=None, bias=None, *, low_precision=False, names=None):
    """Check the shapes and dtypes of a DoRA layer's weights.

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    magnitude : ndarray, shape (out,), optional
    bias : ndarray, shape (out,), optional
    low_precision : bool, default False
        Also accept a float16/bfloat16 W0 with the adapter dtypes
        ``dora_ref.core.precision.classify`` allows (float32 "mixed" or
        W0's dtype "pure").
    names : tuple of 5 str, optional
        How messages call the five arrays (default W0, A, B, magnitude, bias).

    Returns
    -------
    W0, A, B, magnitude, bias
        The same arrays, converted to float ndarrays.

    Raises
    ------
    TypeError
        On a non-float dtype or mixed dtypes (with ``low_precision``, a
        combination ``classify`` refuses).
    ValueError
        On inconsistent shapes (the message gives every shape seen), an
        empty weight (out, in or r = 0: refused everywhere, see
        ``check_weight_shape``), or NaN/Inf in A, B, magnitude or bias.
        NaN/Inf in W0 is caught where the norm is computed, which reads W0
        anyway.
    """
    lp = low_precision
    w_name = names[0] if names else "W0"
    W0 = as_float_array(w_name, W0, ndim=2, low_precision=lp)
    A = as_float_array("A", A, ndim=2, low_precision=lp)
    B = as_float_array("B", B, ndim=2, low_precision=lp)
    if magnitude is not None:
        magnitude = as_float_array("magnitude", magnitude, low_precision=lp)
        if magnitude.ndim != 1:
            raise ValueError(
                f"magnitude must have shape (out,) = ({W0.shape[0]},), one value per output "
                f"channel; got {magnitude.shape}"
            )
    if bias is not None:
        bias = as_float_array("bias", bias, ndim=1, low_precision=lp)
    out_f, in_f = W0.shape
    r = A.shape[0]
    shapes = f"{w_name} {W0.shape}, A {A.shape}, B {B.shape}"
    if r == 0:
        raise ValueError(f"rank r must be >= 1, got A of shape {A.shape}")
    check_weight_shape(w_name, W0.shape)
    if A.shape[1] != in_f or B.shape != (out_f, r):
        hint = ""
        if A.shape[1] == out_f and B.shape == (in_f, r) and in_f != out_f:
            hint = (f" ({w_name} looks transposed: A and B fit a weight of shape {(in_f, out_f)}; "
                    f"dora_ref takes it as (out, in), the layout of PyTorch's nn.Linear.weight)")
        if A.shape[1] != in_f:
            raise ValueError(f"A must have shape (r, in) = (r, {in_f}); got {shapes}{hint}")
        raise ValueError(f"B must have shape (out, r) = ({out_f}, {r}); got {shapes}{hint}")
    if magnitude is not None and magnitude.shape != (out_f,):
        hint = ""
        if magnitude.shape == (in_f,) and in_f != out_f:
            hint = (
                " (a magnitude with one value per *input* feature is the norm taken "
                "over the wrong axis: the paper's column norm is the row norm of an "
                "(out, in) weight, one value per output channel)"
            )
        raise ValueError(
            f"magnitude must have shape (out,) = ({out_f},), got {magnitude.shape}{hint}"
        )
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"bias must have shape (out,) = ({out_f},), got {bias.shape}")
    if lp:
        classify(W0, A, B, magnitude, bias, **({"names": names} if names else {}))
    else:
        check_same_dtype(W0=W0, A=A, B=B, magnitude=magnitude, bias=bias)
    check_finite("A", A)
    check_finite("B", B)
    if magnitude is not None:
        check_finite("magnitude", magnitude)
    if bias is not None:
        check_finite("bias", bias)
    return W0, A, B, magnitude, bias


def check_weight_shape(name, shape, axes=("output channel", "input feature")):
    """Raise ``ValueError`` if a weight has no output channels or no input features.

    An empty weight is refused everywhere (construction, forward, backward,
    merge) rather than supported in some paths only: a layer with out = 0
    or in = 0 computes nothing, and its norm and magnitude would be empty.
    A batch of N = 0 rows is different, and works everywhere.

    Parameters
    ----------
    name : str
    shape : tuple of int
        (out, in, ...), the weight's shape.
    axes : (str, str)
        What the first two axes are called, for the message.
    """
    for size, axis in zip(shape[:2], axes):
        if size == 0:
            raise ValueError(
                f"{name} must have at least one {axis}, got shape {tuple(shape)}: "
                f"empty weights are not supported (a batch of 0 rows is)"
            )


def check_input(x, in_features, dtype, name="x", *, low_precision=False, axis="in"):
    """Check an input batch and flatten its leading dimensions.

    Parameters
    ----------
    x : ndarray, shape (..., in)
    in_features : int
        The size its last axis must have.
    dtype : numpy.dtype
        The weights' dtype, which x must share.
    name : str, default "x"
    low_precision : bool, default False
        Also accept a float16/bfloat16 x (of ``dtype``).
    axis : str, default "in"
        What the last axis is called in the message: "out" for a gradient dy
        of the output.

    Returns
    -------
    ndarray, shape (N, in)
        A view of x when possible, N the product of the leading dimensions.
    """
    if (type(x) is np.ndarray and x.dtype is dtype and x.ndim == 2
            and x.shape[1] == in_features and (low_precision or dtype.char in "fd")):
        return x  # the usual case: an (N, in) ndarray of the weights' float dtype
    x = as_float_array(name, x, low_precision=low_precision, want=dtype)
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{name} must have shape (..., {axis}) = (..., {in_features}), got {x.shape}"
        )
    if x.dtype != dtype:
        raise dtype_mismatch(name, x.dtype, dtype)
    return x.reshape(-1, in_features)


class NonFiniteWeightError(ValueError):
    """A DoRA scale m / n or a merged weight that would not be finite, refused.

    Raised by ``dora_forward`` and ``merge`` (and the layers, the conv and
    embedding variants built on them) instead of returning inf or NaN, as
    PEFT's ``merge(safe_merge=True)`` refuses a broken adapter. A
    ``ValueError``, so callers that catch bad weights keep working; code
    that adds context (a module name, a file) can read the attributes.

    Attributes
    ----------
    rows : list of int
        Every output channel (row of the (out, in) weight) concerned.
    cause : str
        What overflowed, in words.
    """

    def __init__(self, message, rows, cause):
        super().__init__(message)
        self.rows = [int(i) for i in rows]
        self.cause = cause


def refuse_non_finite_rows(what, bad_rows, cause):
    """Raise ``NonFiniteWeightError`` naming ``what``, the rows and the cause."""
    rows = np.asarray(bad_rows).reshape(-1)
    shown = f"{rows[:8].tolist()}{'...' if rows.size > 8 else ''}"
    raise NonFiniteWeightError(
        f"{what} is not finite at output channel(s) {shown} ({rows.size} in all): {cause}",
        rows,
        cause,
    )


def check_rows_finite(what, W):
    """Raise ``NonFiniteWeightError`` if a row of the (out, ...) array ``W`` has NaN/Inf.

    For a merged weight computed from finite inputs, where a non-finite
    entry can only be an overflow of the dtype.
    """
    W2 = W.reshape(W.shape[0], -1)
    if not np.isfinite(W2).all():
        bad = np.flatnonzero(~np.isfinite(W2).all(axis=1))
        refuse_non_finite_rows(what, bad, f"the result overflowed {W.dtype} "
                                          f"(largest finite value {float(finfo(W.dtype).max):.3g})")


_tobytes = operator.methodcaller("tobytes")
_new_object = object.__new__


class WeightSnapshot:
    """What some weight arrays held at one moment, to tell whether they changed in place since.

    What is shared between calls has a version: a forward's context holds
    references to ``A``, ``B`` and the magnitude (not copies), and a merged
    layer's weight was built from them. NumPy arrays carry no version
    counter, and an optimiser is not the only thing that writes into them
    (``layer.lora_A[...] = v``, ``np.copyto``, a view), so the snapshot keeps
    the arrays' bytes and compares them exactly: any change of any bit is
    seen. The arrays are small (r * (in + out) + out numbers), so a copy and
    a comparison cost a few microseconds, nothing next to a forward.

    Parameters
    ----------
    arrays : mapping of str to ndarray
        The live arrays, by the name an error message should use.
    """

    __slots__ = ("_names", "_arrays", "_bytes")

    def __init__(self, arrays):
        self._names = tuple(arrays)
        self._arrays = tuple(arrays.values())
        self._bytes = list(map(_tobytes, self._arrays))

    @classmethod
    def of(cls, names, arrays):
        """``WeightSnapshot(dict(zip(names, arrays)))`` without building the dict (per call).

        Parameters
        ----------
        names : tuple of str
        arrays : tuple of ndarray, as many as names
        """
        self = _new_object(cls)
        self._names = names
        self._arrays = arrays
        if len(arrays) == 3:  # a DoRA forward's A, B, magnitude, per call: the method
            a, b, c = arrays  # called directly, not through map and methodcaller (1 us less)
            self._bytes = [a.tobytes(), b.tobytes(), c.tobytes()]
        else:
            self._bytes = list(map(_tobytes, arrays))
        return self

    def __getstate__(self):
        return None, {"_names": self._names, "_arrays": self._arrays, "_bytes": self._bytes}

    def __setstate__(self, state):
        """Restore a pickle, also one from before ``_names`` (``_arrays`` a dict by name).

        A merged layer or a forward's context pickled by an earlier version
        holds such a snapshot; read as it was stored, its ``changed`` and
        ``check_backward`` would fail with AttributeError (or iterate the
        names as arrays).
        """
        slots = dict(state[1] or {}) if isinstance(state, tuple) else dict(state or {})
        if isinstance(state, tuple) and state[0]:
            slots.update(state[0])
        arrays = slots["_arrays"]
        if isinstance(arrays, dict):  # the layout before session 4
            slots["_names"], arrays = tuple(arrays), tuple(arrays.values())
        self._names = tuple(slots["_names"])
        self._arrays = tuple(arrays)
        self._bytes = list(slots["_bytes"])

    def changed(self):
        """The names of the arrays whose contents differ from the snapshot's, in order."""
        return [
            name
            for name, a, saved in zip(self._names, self._arrays, self._bytes)
            if a.tobytes() != saved
        ]

    def check_backward(self):
        """Raise ``RuntimeError`` if an array changed since the forward that took the snapshot."""
        arrays, saved = self._arrays, self._bytes
        if len(arrays) == 3 and len(saved) == 3:  # a DoRA forward's, per call: unrolled
            a, b, c = arrays
            if a.tobytes() == saved[0] and b.tobytes() == saved[1] and c.tobytes() == saved[2]:
                return  # every byte as it was
        elif list(map(_tobytes, arrays)) == saved:  # every byte as it was
            return
        changed = self.changed()
        if changed:
            raise RuntimeError(
                f"{', '.join(changed)} changed in place between the forward and this backward "
                f"(an optimiser step or an assignment in between?): the activations the "
                f"forward saved belong to the old values, and backward would mix them with "
                f"the new ones. Call backward before updating the weights, or run the "
                f"forward again."
            )
