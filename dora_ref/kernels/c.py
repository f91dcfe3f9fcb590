"""C twins of the NumPy kernels: a thin wrapper around ``dora_ref.kernels._dora_c``.

The kernels here take and return exactly what their twins in
``dora_ref.core.kernels_numpy`` do; ``dora_ref.set_backend("c")`` selects them
(the default when the extension is built). The C sources are in ``csrc/``
(``dora_kernels.h`` is the C API); ``csrc/build_ffi.py`` builds them with
cffi at install time. This module fails to import, with ``ImportError``,
when the extension was not built, and ``dora_ref`` then uses NumPy.

Before any pointer crosses into C, every array is checked here:

* type: a plain ``numpy.ndarray`` or an ``np.memmap``; another ndarray
  subclass (``np.ma`` masked arrays, ``np.matrix``, ...) is a ``TypeError``
  naming the argument, as in the public API (a masked array's mask would be
  ignored);
* dtype: float32 or float64, the same for all arrays of a call
  (``TypeError`` otherwise, naming the argument); or, for ``column_norm``,
  ``merge``, ``unmerge``, ``norm_gradient_products`` and
  ``forward_epilogue``, a 16-bit weight
  (``np.float16`` or ``ml_dtypes.bfloat16``) with float32 adapter arrays
  (see "Low-precision weights" below);
* shape: consistent with the others (``ValueError`` naming the argument and
  the shapes seen);
* layout: **inputs** that are not C-contiguous (strided views,
  Fortran-ordered arrays) are copied with ``np.ascontiguousarray``, so any
  layout works, at the cost of one copy; except the (out, in) weight of
  ``column_norm`` and ``merge``, which is never copied whole: a
  non-contiguous one is copied a block of rows at a time
  (``_weight_row_blocks``), with the bits of a contiguous call; read-only
  inputs are used as they are (C only reads them). **Outputs** are always allocated here, fresh,
  C-contiguous and writable, so C never writes into a caller's array; except ``merge_into``'s
  W_merged, a caller's buffer checked first (dtype, shape, C-contiguous, writable, no memory
  shared with an input).

Results agree with NumPy up to rounding (``tests/test_kernels_c.py`` states
the bound). Determinism, precisely: every C kernel here gives the same bits
for any number of threads (each thread owns whole rows or columns, and the
block sizes that fix the order of every sum depend on the sizes alone), and
so do ``merge``, ``unmerge`` and ``column_norm`` of ``dora_ref.core.functional``
with this backend. The BLAS paths (``backward_lowrank`` and
``norm_gradient_products`` above ``FUSED_MAX_RANK``), the epilogues where
r >= out above it (U @ B.T by BLAS: ``_lowrank_on_blas``), and the forward and
backward's large products, which BLAS computes, may differ in the last bits
between thread counts (``tests/test_determinism.py`` bounds the difference).

Threads: each call uses one thread or ``openmp_threads()``, chosen from its
measured cost against what opening a team costs now (``set_threads``,
``threading_info``; ``csrc/dora_kernels.c`` explains the model). A process
forked after a threaded call runs the kernels too (``tests/test_fork.py``); a fork
while another thread is inside one waits for its team to finish
(``tests/test_fork_mid_call.py``). NaN and
Inf propagate as in NumPy; the forward epilogue also tells the functional
core whether it wrote one into y (``_forward_epilogue_flagged``), so that
the forward's test of y costs no second pass over it. Sums of squares are accumulated in double, as
in the NumPy twin; the reduction dg of ``backward_epilogue`` is too (the
twin sums it in the arrays' dtype), which only makes it more accurate.

Low-precision weights: ``column_norm(W0, A, B, s)``, ``merge(W0, A, B, m, s)``,
``unmerge(W_merged, A, B, factor, s)`` and ``norm_gradient_products(W0, A, C)``
take W0 (resp. W_merged) in ``np.float16`` or ``ml_dtypes.bfloat16`` with
A, B, C, m, factor float32, and ``forward_epilogue(..., out_dtype=)`` writes
y in either (base, U, B, g float32; bias float32 or of ``out_dtype``). Each
result is, bit for bit, the float32 kernel's on the exactly widened inputs,
rounded once to the 16-bit dtype (to nearest, ties to even, as ``astype``):
n, WAt and CtW are float32, W', the unmerged W0 and y have the weight's
dtype (above ``FUSED_MAX_RANK``, ``norm_gradient_products`` is BLAS on W0
widened a block of rows at a time). The C kernels read the 16 bits
and widen each element as they load it, so no float32 copy of the weight is
made. A value past the 16-bit range becomes inf, returned as the float32
kernels return an overflow; the callers (``dora_ref.core``) refuse it.
``ml_dtypes`` is imported only when a bfloat16 array or ``"bfloat16"`` is
passed.

A nonzero status from C becomes ``MemoryError`` (a scratch allocation
failed) or ``RuntimeError`` (a bug: the checks above should make it
impossible).
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np

from ..core import kernels_numpy as _kernels_numpy
from ..core import _validate
from ..core._validate import plain_array, refuse_array_subclass, sum_squares

# Environment variables with which a user tells the OpenMP runtime how idle
# threads wait; dora_ref never overrides one that is set.
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _openmp_runtime_loaded():
    """The path of an OpenMP runtime already mapped into this process, or None.

    Read from ``/proc/self/maps`` (Linux); elsewhere None. Only the runtime
    the extension links by soname (``libgomp.so.1``, ``libomp.so``) counts:
    a vendored copy under another name (scikit-learn's) is a separate runtime.
    """
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                name = os.path.basename(path)
                if name.startswith(("libgomp.so", "libomp.so", "libiomp5.so")):
                    return path
    except OSError:
        pass
    return None


def _import_extension():
    """Import ``_dora_c`` with its OpenMP runtime's idle threads told to sleep.

    By default an idle OpenMP thread spins for a few milliseconds after each
    parallel region, on a core that the next BLAS call (or another process)
    needs: measured at (out, in) = (1024, 1024), N = 256, r = 8 on 2 cores,
    the forward epilogue took 7.4 ms instead of 0.66 ms and the next BLAS
    product 15.2 instead of 8.7 ms. The runtime reads its wait policy once,
    when it is loaded; so if no OpenMP runtime is loaded yet and the user set
    none of ``_WAIT_VARIABLES``, ``OMP_WAIT_POLICY=PASSIVE`` is set while the
    extension (and with it the runtime) loads, then removed again, so that no
    child process inherits it. The policy then holds for every user of that
    runtime in this process (PyTorch imported later shares it). Returns the
    module and a sentence saying which policy holds.
    """
    if any(os.environ.get(v) is not None for v in _WAIT_VARIABLES):
        from . import _dora_c

        set_by = ", ".join(f"{v}={os.environ[v]}" for v in _WAIT_VARIABLES if v in os.environ)
        return _dora_c, f"as the environment sets it ({set_by})"
    loaded = _openmp_runtime_loaded()
    if loaded is not None:
        from . import _dora_c

        return _dora_c, (
            f"the runtime's default (it spins): {loaded} was loaded before dora_ref, "
            f"e.g. by torch; import dora_ref first for a passive policy"
        )
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from . import _dora_c
    finally:
        del os.environ["OMP_WAIT_POLICY"]
    return _dora_c, "passive, set by dora_ref when it loaded the runtime"


_dora_c, _WAIT_POLICY = _import_extension()
ffi, lib = _dora_c.ffi, _dora_c.lib

__all__ = [
    "backward_epilogue",
    "backward_lowrank",
    "build_info",
    "column_norm",
    "forward_epilogue",
    "merge",
    "merge_into",
    "norm_gradient_products",
    "norm_tile",
    "openmp_enabled",
    "openmp_threads",
    "set_threads",
    "threading_info",
    "unmerge",
]

_CTYPE = {np.dtype(np.float32): ("float", "f32"), np.dtype(np.float64): ("double", "f64")}
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)

#: ``column_norm``, ``merge``, ``unmerge`` and ``forward_epilogue`` take a
#: float16/bfloat16 weight (float32 adapter arrays) by the contract of
#: ``dora_ref.core.kernels_numpy``: the float32 kernel on the exactly widened
#: input, each result rounded once; ``dora_ref.core.backend`` reads this flag.
LOW_PRECISION = True


def _lp_format(dtype):
    """The C format of a 16-bit storage dtype (``DORA_F16``, ``DORA_BF16``), else None.

    A bfloat16 array exists only if ``ml_dtypes`` was imported already, so
    importing it here, once the name says bfloat16, costs nothing.
    """
    if dtype == np.float16:
        return lib.DORA_F16
    if dtype.itemsize == 2 and dtype.name == "bfloat16":
        import ml_dtypes

        if dtype == ml_dtypes.bfloat16:
            return lib.DORA_BF16
    return None


def _is_lp(arr):
    return plain_array(arr) and _lp_format(arr.dtype) is not None


def _ndarray(name, arr):
    """Raise ``TypeError`` naming ``name`` unless arr is a plain ndarray (or a memmap).

    A masked array would pass its data with the mask ignored, and ``np.matrix``
    turns ``*`` into a product on the BLAS paths: the public API refuses both
    (``core._validate.refuse_array_subclass``), and so does every path here
    (session 16's adversary: all ten kernels took them).
    """
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    refuse_array_subclass(name, arr)


def openmp_enabled():
    """True if the C kernels were compiled with OpenMP."""
    return bool(lib.dora_openmp_enabled())


def openmp_threads():
    """The most threads a C kernel may use now; 1 without OpenMP.

    ``set_threads(n)`` if called, else the OpenMP runtime's maximum
    (``OMP_NUM_THREADS`` or the number of cores); 1 in a forked child whose
    parent's thread pool could not be released before the fork.
    """
    return int(lib.dora_max_threads())


def set_threads(n):
    """Let each C kernel use at most ``n`` threads (``n = 0``: the OpenMP default).

    Whether a call uses one thread or ``n`` is decided per call from its
    measured cost against what opening a team of threads costs now (see
    ``threading_info``); the results are the same bits whatever it uses.

    Raises
    ------
    TypeError
        If ``n`` is not an int.
    ValueError
        If ``n`` is negative.
    """
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0 (0: the OpenMP default), got {n}")
    lib.dora_set_threads(int(min(n, 2**31 - 1)))


def threading_info():
    """How the C kernels use threads here: a dict.

    ``threads`` (``openmp_threads()``), ``wait_policy`` (how idle OpenMP
    threads wait, and who set it: see ``_import_extension``),
    ``region_cost_us`` (the current estimate of what opening a team costs,
    which decides serial against parallel per call; 0 before the first
    measurement), ``probe_interval_s`` (how long calls stay serial before
    one goes parallel to measure that cost again: 0.1 s, doubled after each
    parallel call slower than its predicted serial time, up to 6.4 s),
    ``forks`` (what the fork handlers did: ``_fork_stats()``) and ``build``
    (``build_info()``).
    """
    return {
        "threads": openmp_threads(),
        "wait_policy": _WAIT_POLICY,
        "region_cost_us": float(lib.dora_region_cost_ns()) / 1e3,
        "probe_interval_s": float(lib.dora_probe_interval()),
        "forks": _fork_stats(),
        "build": build_info(),
    }


def _set_always_parallel(always):
    """Tests only: every call with several blocks uses ``openmp_threads()`` threads."""
    lib.dora_set_parallel_policy(1 if always else 0)


def _set_forward_layout(layout):
    """Tests and benchmarks only: the forward epilogue's blocks.

    ``"rule"`` (the default): by columns when the rows (blocks of 16)
    give fewer blocks than the threads and the columns (blocks of 64) give
    more, else by rows; ``"rows"`` or ``"columns"``: always that way. The
    bits are the same for all three.
    """
    layouts = ("rule", "rows", "columns")
    if layout not in layouts:
        raise ValueError(f"layout must be one of {layouts}, got {layout!r}")
    lib.dora_set_forward_layout(layouts.index(layout))


#: column_norm's SIMD tiles, widest last (``_set_norm_tile_limit``).
_NORM_TILES = ("plain", "avx2", "avx512")


def norm_tile():
    """The SIMD tile ``column_norm`` takes for float32 (and 16-bit) W0 in this process:
    ``"avx512"`` on a CPU with AVX-512 F (used at 8 <= r <= 64), ``"avx2"`` with AVX2
    and FMA (used at 8 <= r <= 32), else ``"plain"`` (the C tiles without intrinsics).
    All three give the same bits (``tests/test_norm_avx2_tile.py``). Where it is
    ``"avx512"``, float64 W0 takes six-row tiles at every rank (four-row tiles
    otherwise), again with the same bits (``tests/test_norm_f64_six_row_tile.py``)."""
    return _NORM_TILES[lib.dora_norm_tile()]


def _set_norm_tile_limit(tile):
    """Tests and benchmarks only: the widest tile ``column_norm`` may take,
    ``"avx512"`` (the default: the widest the CPU has), ``"avx2"`` or
    ``"plain"`` (the C tiles without intrinsics). The bits are the same for
    all three. Returns the widest the CPU allows."""
    if tile not in _NORM_TILES:
        raise ValueError(f"tile must be one of {_NORM_TILES}, got {tile!r}")
    return _NORM_TILES[lib.dora_set_norm_tile_limit(_NORM_TILES.index(tile))]


#: The kernels of ``_plan_stats``, in the order of ``enum dora_kernel_id`` in
#: ``csrc/dora_kernels.c`` (``*_sum``: the reduction of a kernel's partial sums).
_PLAN_KERNELS = ("column_norm", "merge", "unmerge", "forward_epilogue", "backward_epilogue",
                 "backward_lowrank", "backward_lowrank_sum", "norm_gradient_products",
                 "norm_gradient_products_sum", "forward_epilogue_z", "backward_epilogue_z",
                 "backward_lowrank_z")
_PLAN_FIELDS = ("calls", "parallel", "probes", "lost", "lost_ms", "start_ms", "wall_ms",
                "predicted_ms", "gated", "spread_ms")


def _plan_stats(reset=False):
    """Diagnosis: the thread plan's decisions since the last reset, per kernel.

    A dict ``{kernel: {field: value}}`` over the kernels called at least
    once: ``calls``, ``parallel`` (calls that opened a team), ``probes``
    (parallel calls that the cost model alone would have run serially),
    ``lost`` (parallel calls slower than the predicted serial time) and
    ``lost_ms`` (their excess, summed), ``start_ms`` (the teams' start
    delays, summed), ``wall_ms`` and ``predicted_ms`` (the parallel calls'
    time and predicted serial time, summed), ``gated`` (probes not made
    because no core was idle), ``spread_ms`` (the spread of the team
    members' finishing times, summed). ``reset=True`` zeroes the counters
    after reading them.
    """
    count = int(lib.dora_plan_stats(ffi.NULL, 0))
    buf = ffi.new("double[]", count)
    lib.dora_plan_stats(buf, count)
    width = count // len(_PLAN_KERNELS)
    if width != len(_PLAN_FIELDS):
        raise RuntimeError(f"the extension counts {width} fields a kernel, this module names "
                           f"{len(_PLAN_FIELDS)}: rebuild it (setup.py build_ext --inplace)")
    stats = {}
    for k, name in enumerate(_PLAN_KERNELS):
        row = [buf[k * width + j] for j in range(width)]
        if row[0]:
            stats[name] = {f: (v / 1e6 if f.endswith("_ms") else int(v))
                           for f, v in zip(_PLAN_FIELDS, row)}
    if reset:
        lib.dora_plan_stats_reset()
    return stats


_RATE_TYPES = ("float32", "float64", "16-bit")


def _plan_rates(reset=False):
    """Diagnosis: the plan's serial rates, which predict a call's serial time.

    A dict ``{(kernel, type, work, blocks): ns per unit of work}``, one per
    call shape measured (``type``: ``"float32"``, ``"float64"`` or
    ``"16-bit"`` storage; ``work`` and ``blocks`` as the kernel counts them).
    A shape not measured yet is planned by the latest rate of its kernel,
    type and size class (``floor(log4(work))``) and not judged lost.
    ``reset=True`` forgets them all after reading: the next call of each
    kernel, type and size class runs on one thread to measure its rate.
    """
    size = 5 * int(lib.DORA_RATE_SLOTS)
    buf = ffi.new("double[]", size)
    filled = int(lib.dora_plan_rates(buf, size))
    rates = {}
    for i in range(0, filled, 5):
        kernel, kind, work, blocks, rate = (buf[i + j] for j in range(5))
        rates[(_PLAN_KERNELS[int(kernel)], _RATE_TYPES[int(kind)], int(work), int(blocks))] = rate
    if reset:
        lib.dora_plan_rates_reset()
    return rates


def _rate_size_class(work):
    """Tests only: the size class of a call's work for the plan's guessed rates (C's)."""
    return int(lib.dora_rate_size_class(float(work)))


def _plan_rate(kernel, dtype, work, blocks):
    """Tests only: ``(rate, guessed)``, the rate the plan would predict a call
    of that shape by (0.0: none, the call runs alone), and whether it is the
    latest of another shape of the same size class."""
    guessed = ffi.new("int *")
    rate = lib.dora_plan_rate_for_tests(_PLAN_KERNELS.index(kernel), _RATE_TYPES.index(dtype),
                                        float(work), int(blocks), guessed)
    return float(rate), bool(guessed[0])


def _plan_observe(start_us, wall_us, predicted_us, threads, spread_us=None, probe=False):
    """Tests only: feed the cost model one parallel call (times in us); True if it lost.

    ``spread_us``: the spread of the members' finishing times (default: the
    wall time, so that all of a lost call's excess may be the team's);
    ``probe``: whether the call was a probe.
    """
    spread_us = wall_us if spread_us is None else spread_us
    return bool(lib.dora_plan_observe_for_tests(start_us * 1e3, wall_us * 1e3, predicted_us * 1e3,
                                                threads, spread_us * 1e3, 1 if probe else 0))


def _loadavg_running(text):
    """Tests only: the runnable threads in a /proc/loadavg text (C's parser), or -1."""
    return int(lib.dora_loadavg_running(text.encode()))


def _plan_decide(T_us, L_us, Lmin_us, since_team_s, since_check_s, interval_s):
    """Tests only: the plan's decision, ``"serial"``, ``"team"`` or ``"ask"`` (``dora_plan_decide``)."""
    decision = lib.dora_plan_decide(T_us * 1e3, L_us * 1e3, Lmin_us * 1e3, since_team_s,
                                    since_check_s, interval_s)
    return {lib.DORA_PLAN_SERIAL: "serial", lib.DORA_PLAN_TEAM: "team",
            lib.DORA_PLAN_ASK: "ask"}[decision]


def _team_fits(running, own, cores, threads, on_pool):
    """Tests only: C's decision whether a team finds its cores (``dora_team_fits``)."""
    return bool(lib.dora_team_fits(running, own, cores, threads, 1 if on_pool else 0))


def _stat_runnable(text):
    """Tests only: True if a /proc/<pid>/task/<tid>/stat text says runnable (C's parser)."""
    return bool(lib.dora_stat_runnable(text.encode()))


def _own_runnable(limit=0):
    """Diagnosis: this process's runnable threads now, as a probe counts them
    (up to ``limit``, 0: all; 0 if unknown), among the first 32 threads in
    /proc/self/task (the C side reads no more: ``OWN_SCAN_MAX``)."""
    return int(lib.dora_own_runnable(limit))


def _plan_reset():
    """Forget the measured cost of a team: the next call that might go parallel measures it."""
    lib.dora_plan_reset()


def _set_fork_pause(on):
    """Tests only: ``False`` keeps the thread pool across fork, so a child runs serially."""
    lib.dora_set_fork_pause(1 if on else 0)


def _fork_stats():
    """What the fork handlers did in this process: a dict of counts.

    ``forks``; ``waited``, those that found another thread inside a C
    kernel with a team and waited for the team to finish before forking
    (no team starts while a fork is under way: those calls run on one
    thread); ``waited_in_vain``, those whose wait reached its limit (10 s;
    the child then runs every kernel on one thread). Zeros without OpenMP.
    """
    stats = ffi.new("int64_t[3]")
    lib.dora_fork_stats(stats)
    return {"forks": int(stats[0]), "waited": int(stats[1]), "waited_in_vain": int(stats[2])}


def _set_fork_wait_limit(seconds):
    """Tests only: how long a fork waits for the teams in flight (``None``: the default, 10 s)."""
    lib.dora_set_fork_wait_limit(-1.0 if seconds is None else float(seconds))


def build_info():
    """How the extension was compiled, e.g. ``'openmp=yes simd_clones=...'``."""
    return ffi.string(lib.dora_build_info()).decode()


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


def _arrays(**named):
    """Check dtypes and return (C-contiguous arrays in order, dtype).

    Every array must be an ndarray of float32 or float64, all of one dtype.
    Non-contiguous inputs are copied (see the module docstring).
    """
    arrays = list(named.values())
    # the common case, checked fully but cheaply: plain C-contiguous ndarrays
    # that share NumPy's own float32 or float64 dtype object
    dtype = getattr(arrays[0], "dtype", None) if arrays else None
    if dtype is _FLOAT32 or dtype is _FLOAT64:
        for arr in arrays:
            if type(arr) is not np.ndarray or arr.dtype is not dtype or not arr.flags.c_contiguous:
                break
        else:
            return arrays, dtype
    return _arrays_checked(named)


def _arrays_checked(named):
    """``_arrays`` for any input: each array checked in turn, the error naming it."""
    dtype = None
    first = None
    out = []
    for name, arr in named.items():
        _ndarray(name, arr)
        if arr.dtype not in _CTYPE:
            raise TypeError(
                f"{name} must have dtype float32 or float64, got {arr.dtype} (shape {arr.shape})"
            )
        if dtype is None:
            dtype, first = arr.dtype, name
        elif arr.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {arr.dtype} but {first} has dtype {dtype}; "
                f"the C kernels need one dtype for all arrays"
            )
        out.append(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))
    return out, dtype


class _Shapes:
    """The shapes of a call's arrays, for an error message: formatted only when
    one is raised (formatting them on every call cost more than a small kernel)."""

    __slots__ = ("named",)

    def __init__(self, *named):
        self.named = named  # (name, array) pairs

    def plus(self, name, arr, first=False):
        return _Shapes((name, arr), *self.named) if first else _Shapes(*self.named, (name, arr))

    def __str__(self):
        return ", ".join(f"{name} {np.shape(arr)}" for name, arr in self.named)


def _strided_weight(W0):
    """True for an (out, in) weight that is not C-contiguous (e.g. a transpose).

    ``column_norm`` and ``merge`` then call C on blocks of rows
    (``_weight_row_blocks``), each copied contiguous, instead of copying the
    whole weight (an (out, in) copy on every forward is what DoRA's memory
    budget rules out).
    """
    return (
        plain_array(W0)  # a refused subclass goes to the checks, which name it
        and W0.ndim == 2
        and W0.dtype in _CTYPE
        and not W0.flags.c_contiguous
    )


def _weight_row_blocks(out_features, in_features, itemsize):
    """Yield slices of about 1 MiB of rows of W0, each starting at a multiple of ROW_BLOCK.

    The C kernels take rows in groups of four from the start of each block
    of ``dora_row_block()`` rows, and a row in a full group is computed by
    other instructions than one in the ragged last group (the compiler's
    vector code), which can change its last bit. Blocks
    that start where the kernel's own blocks start keep every row in the
    group it has in one call on the whole weight: the same bits, whatever
    the layout. (Blocks of ``_kernels_numpy._row_blocks`` did not, and
    gave 1-ulp differences in float64.)
    """
    return _kernels_numpy._row_blocks(out_features, in_features, itemsize,
                                      align=int(lib.dora_row_block()))


def _shape(name, arr, shape, shapes):
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}; got {shapes}")


def _scaling(scaling):
    if type(scaling) is float:
        return scaling
    if isinstance(scaling, (bool, np.bool_)) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    try:
        return float(scaling)
    except OverflowError:  # an int (or Fraction) past float64's range: a ValueError naming it
        raise ValueError(f"scaling ({type(scaling).__name__}) is too large for a float64, "
                         f"which the kernels compute with") from None


# the cffi types, looked up once (a type given by name is parsed on every call)
_ARRAY_TYPE = {"float": ffi.typeof("float[]"), "double": ffi.typeof("double[]")}
_from_buffer = ffi.from_buffer
_DORA_OK = lib.DORA_OK

# the finiteness checks' sums of squares on the calling thread, not on BLAS's (a fork)
_validate._install_sum_squares(_from_buffer, {
    "f": (_ARRAY_TYPE["float"], lib.dora_sum_squares_f32),
    "d": (_ARRAY_TYPE["double"], lib.dora_sum_squares_f64),
})


def _ptr(arr, ctype):
    """A C pointer to arr's data (arr is C-contiguous, of ctype)."""
    return _from_buffer(_ARRAY_TYPE[ctype], arr)


def _check_status(status, kernel):
    if status == _DORA_OK:
        return
    if status == lib.DORA_ERR_NOMEM:
        raise MemoryError(f"{kernel}: the C kernel could not allocate its scratch buffer")
    raise RuntimeError(f"{kernel}: the C kernel returned status {status} (a bug in the wrapper)")


def _adapter(W0, A, B, W0_name="W0"):
    """Check W0 (out, in), A (r, in), B (out, r); return out, in, r and their _Shapes."""
    shapes = _Shapes((W0_name, W0), ("A", A), ("B", B))
    ws, As, Bs = W0.shape, A.shape, B.shape
    if len(ws) == 2 and len(As) == 2 and As[1] == ws[1] and Bs == (ws[0], As[0]):
        return ws[0], ws[1], As[0], shapes
    for name, arr in ((W0_name, W0), ("A", A), ("B", B)):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D; got {shapes}")
    out_f, in_f = ws
    r = As[0]
    if As[1] != in_f:
        raise ValueError(f"A must have shape (r, in) = (r, {in_f}); got {shapes}")
    raise ValueError(f"B must have shape (out, r) = ({out_f}, {r}); got {shapes}")


def _epilogue_shapes(base, U, B, g, base_name="base"):
    """Check base (N, out), U (N, r), B (out, r), g (out,); return N, out, r and their _Shapes."""
    shapes = _Shapes((base_name, base), ("U", U), ("B", B), ("g", g))
    bs, us, Bs, gs = base.shape, U.shape, B.shape, g.shape
    if len(bs) == 2 and len(us) == 2 and us[0] == bs[0] and Bs == (bs[1], us[1]) \
            and gs == (bs[1],):
        return bs[0], bs[1], us[1], shapes
    if len(bs) != 2 or len(us) != 2 or len(Bs) != 2:
        raise ValueError(f"{base_name}, U and B must be 2-D; got {shapes}")
    N, out_f = bs
    r = us[1]
    if us[0] != N:
        raise ValueError(f"U must have shape (N, r) = ({N}, r); got {shapes}")
    if Bs != (out_f, r):
        raise ValueError(f"B must have shape (out, r) = ({out_f}, {r}); got {shapes}")
    raise ValueError(f"g must have shape {(out_f,)}; got {shapes}")  # the one left


def _float32_arrays(reason, **named):
    """Check that every array is a float32 ndarray; return them C-contiguous.

    ``reason`` (a phrase) says in the error why float32 is due.
    """
    out = []
    for name, arr in named.items():
        _ndarray(name, arr)
        if arr.dtype != _FLOAT32:
            raise TypeError(
                f"{name} must have dtype float32 {reason}, got {arr.dtype} (shape {arr.shape})"
            )
        out.append(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))
    return out


def _lp_weight_reason(name, W):
    """The reason A, B, ... must be float32: W is a 16-bit weight."""
    return f"when {name} has dtype {W.dtype} (a 16-bit weight takes a float32 adapter)"


class _Whole:
    """An argument of ``_lp_call`` passed whole to every row block (A)."""

    __slots__ = ("arr",)

    def __init__(self, arr):
        self.arr = arr


def _lp_call(kernel, W, args, scaling, in_features, r):
    """Call a 16-bit C kernel on all of W, or on W's row blocks if W is strided.

    ``args`` are the kernel's array arguments in order: ``W`` itself (the
    (out, in) 16-bit weight), ``_Whole(A)``, and arrays whose first axis is
    W's rows (outputs included), which are cut to each block's rows. A
    strided weight is copied a block of rows at a time (``_weight_row_blocks``),
    in its own dtype, one block alive at a time: never whole, never to float32.
    """
    def call(rows, W_rows):
        ptrs = []
        for a in args:
            block = W_rows if a is W else a.arr if isinstance(a, _Whole) else a[rows]
            ptrs.append(_bits(block) if block.itemsize == 2 else _ptr(block, "float"))
        status = kernel(*ptrs, scaling, W_rows.shape[0], in_features, r, _lp_format(W.dtype))
        _check_status(status, kernel.__name__)

    if W.flags.c_contiguous:
        call(slice(None), W)
        return
    for rows in _weight_row_blocks(*W.shape, W.itemsize):
        call(rows, np.ascontiguousarray(W[rows]))


def _bits(arr):
    """A C pointer to the 16-bit storage of a C-contiguous float16/bfloat16 array."""
    return ffi.from_buffer("uint16_t[]", arr.view(np.uint16))


def _lp_out_dtype(out_dtype, base):
    """``forward_epilogue``'s out_dtype: the 16-bit dtype, or None for the inputs' own dtype."""
    if out_dtype is None:
        return None
    if isinstance(out_dtype, str) and out_dtype == "bfloat16":
        import ml_dtypes

        out_dtype = ml_dtypes.bfloat16
    try:
        dtype = np.dtype(out_dtype)
    except TypeError:
        dtype = None
    if dtype is not None and _lp_format(dtype) is not None:
        return dtype
    if dtype is not None and isinstance(base, np.ndarray) and dtype == base.dtype:
        return None  # the inputs' dtype: the float32/float64 kernel
    raise TypeError(
        f"out_dtype must be None, float16, bfloat16 or the inputs' dtype "
        f"({getattr(base, 'dtype', type(base).__name__)}), got {out_dtype!r}"
    )


# ---------------------------------------------------------------------------
# the kernels
# ---------------------------------------------------------------------------


def _openblas_pool():
    """NumPy's OpenBLAS thread pool: (address of ``gotoblas_pthread``, threads, path), or None.

    Looked for among the libraries mapped into this process
    (``/proc/self/maps``, Linux): the OpenBLAS (``libopenblas*``,
    ``libscipy_openblas*``) that NumPy calls (``_numpy_blas_path``; with
    several mapped, as after ``import scipy``, which brings its own; where
    that lookup is not available, the one in NumPy's wheel folder
    ``numpy.libs``, or a lone one), with the pthreads threading layer (its
    ``openblas_get_parallel`` returns 1, under any of the symbol prefixes
    the wheels use), at least two threads, and ``gotoblas_pthread``
    exported. Anything else (another BLAS, an OpenMP OpenBLAS, one thread,
    not Linux) gives None, and the kernels use OpenMP teams.
    """
    import ctypes

    paths = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "openblas" in os.path.basename(path).lower() and ".so" in path:
                    paths.add(path)
    except OSError:
        return None
    path = _numpy_blas_path(ctypes)
    if path is not None:  # the library NumPy's cblas_sgemm lies in: an OpenBLAS mapped here?
        same = [p for p in sorted(paths) if os.path.realpath(p) == os.path.realpath(path)]
        if not same:
            return None  # NumPy calls another BLAS
        path = same[0]
    else:
        if len(paths) > 1:  # SciPy (scikit-learn) maps its own copy: keep the one NumPy's wheel ships
            wheel_libs = os.path.realpath(os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs"))
            paths = {p for p in paths if os.path.dirname(os.path.realpath(p)) == wheel_libs}
        if len(paths) != 1:
            return None
        path = paths.pop()
    try:
        blas = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
    except OSError:
        return None

    def symbol(name):
        for prefix in ("", "scipy_"):
            for suffix in ("", "64_", "_64"):
                fn = getattr(blas, prefix + name + suffix, None)
                if fn is not None:
                    fn.restype = ctypes.c_int
                    fn.argtypes = []
                    return fn
        return None

    parallel, threads = symbol("openblas_get_parallel"), symbol("openblas_get_num_threads")
    pool = getattr(blas, "gotoblas_pthread", None)
    if parallel is None or threads is None or pool is None or parallel() != 1:
        return None
    nthreads = threads()
    if nthreads < 2:
        return None
    return ctypes.cast(pool, ctypes.c_void_p).value, nthreads, path


def _numpy_blas_path(ctypes):
    """The file of the library that NumPy's ``cblas_sgemm`` comes from, or None if not found.

    ``dlsym`` on NumPy's own extension module searches the libraries it was
    linked against, so the symbol found is the one NumPy calls, whatever
    other BLAS libraries (SciPy's OpenBLAS, MKL from torch) are loaded;
    ``dladdr`` names the file it lies in.
    """
    class _DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        from numpy._core import _multiarray_umath as umath
        ext = ctypes.CDLL(umath.__file__, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
        dladdr = ctypes.CDLL(None).dladdr
    except (ImportError, OSError, AttributeError):
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            fn = getattr(ext, prefix + "cblas_sgemm" + suffix, None)
            if fn is None:
                continue
            info = _DlInfo()
            if dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) and info.dli_fname:
                return os.fsdecode(info.dli_fname)
    return None


def _set_blas_pool(on):
    """Run the teams of column_norm, forward_epilogue, backward_epilogue,
    backward_lowrank and norm_gradient_products on NumPy's OpenBLAS threads
    (``True``, the default where ``_openblas_pool`` finds them) or on OpenMP
    teams (``False``); returns the OpenBLAS threads now used, 0 for none. (``csrc/dora_kernels.c``, "Teams
    on OpenBLAS's threads", says why.)"""
    pool = _openblas_pool() if on else None
    if pool is None:
        lib.dora_set_blas_pool(ffi.NULL, 0)
    else:
        lib.dora_set_blas_pool(ffi.cast("void *", pool[0]), pool[1])
    return int(lib.dora_blas_pool_threads())


_set_blas_pool(True)


def column_norm(W0, A, B, scaling):
    """n_i = ||W0_i + s * B_i @ A||_2 for every output row i, without forming B @ A.

    The paper's column norm ||V||_c (DoRA, Eq. 2), one per output row of the
    PyTorch (out, in) weight.

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
        float32, float64, or float16 / bfloat16 (then A and B are float32).
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    scaling : float

    Returns
    -------
    n : ndarray, shape (out,)
        The dtype of W0; float32 for a 16-bit W0, bit for bit the float32
        kernel's on ``W0.astype(np.float32)``.

    Raises
    ------
    TypeError
        A non-array, a dtype outside those combinations, a non-real scaling.
    ValueError
        Shapes that do not fit (out, in), (r, in), (out, r).

    Notes
    -----
    Where NumPy's BLAS is a threaded pthreads OpenBLAS (``_openblas_pool``),
    the kernel's threads are OpenBLAS's own workers rather than an OpenMP
    team: after each BLAS call those workers busy-wait for about 0.1 s, and
    an OpenMP team started then waited for the scheduler to preempt them
    (``csrc/dora_kernels.c``, "Teams on OpenBLAS's threads"). The bits are
    the same either way, for any number of threads.

    A raw kernel, as its NumPy twin: squares are summed in float64 without
    rescaling, so a row whose entries are below about 1e-154 (its squares
    subnormal) loses digits, and one above about 1e154 overflows to inf.
    ``dora_ref.column_norm`` and the layers recompute such rows scaled by
    their largest entry (``core.norm._rescue_extreme_rows``).
    """
    fast = _column_norm_checked_fast(W0, A, B)
    if fast is not None:  # every check below passed: the same call, one pass of tests
        ctype, kernel, out_f, in_f, r = fast
        pt = _ARRAY_TYPE[ctype]  # once, not per pointer (_ptr)
        n = np.empty(out_f, dtype=W0.dtype)
        status = kernel(_from_buffer(pt, n), _from_buffer(pt, W0), _from_buffer(pt, A),
                        _from_buffer(pt, B), _scaling(scaling), out_f, in_f, r)
        if status != _DORA_OK:
            _check_status(status, "column_norm")
        return n
    if _is_lp(W0):
        return _column_norm_lp(W0, A, B, scaling)
    if _strided_weight(W0):  # row blocks, each copied: the same bits, no (out, in) copy
        (A, B), _ = _arrays(A=A, B=B)
        _adapter(W0, A, B)
        n = np.empty(W0.shape[0], dtype=W0.dtype)
        for rows in _weight_row_blocks(*W0.shape, W0.itemsize):
            n[rows] = column_norm(np.ascontiguousarray(W0[rows]), A, B[rows], scaling)
        return n
    (W0, A, B), dtype = _arrays(W0=W0, A=A, B=B)
    out_f, in_f, r, _ = _adapter(W0, A, B)
    ctype, sfx = _CTYPE[dtype]
    n = np.empty(out_f, dtype=dtype)
    status = getattr(lib, f"dora_column_norm_{sfx}")(
        _ptr(n, ctype), _ptr(W0, ctype), _ptr(A, ctype), _ptr(B, ctype),
        _scaling(scaling), out_f, in_f, r,
    )
    _check_status(status, "column_norm")
    return n


_NORM_KERNELS = {
    np.dtype(np.float32): ("float", lib.dora_column_norm_f32),
    np.dtype(np.float64): ("double", lib.dora_column_norm_f64),
}


def _column_norm_checked_fast(W0, A, B):
    """``column_norm``'s checks for the usual call, decided in one pass.

    Returns (ctype, kernel, out, in, r) when W0, A, B are C-contiguous
    ndarrays of one float32/float64 dtype with the shapes (out, in), (r, in),
    (out, r): exactly the calls for which ``_arrays`` copies nothing and
    ``_adapter`` raises nothing (a 16-bit or strided W0 is not one of them).
    Otherwise None, and the general path checks again and raises the message
    that names what is wrong.
    """
    if type(W0) is not np.ndarray or type(A) is not np.ndarray or type(B) is not np.ndarray:
        return None
    entry = _NORM_KERNELS.get(W0.dtype)
    if (entry is None or A.dtype != W0.dtype or B.dtype != W0.dtype
            or W0.ndim != 2 or A.ndim != 2 or not W0.flags.c_contiguous
            or not A.flags.c_contiguous or not B.flags.c_contiguous):
        return None
    out_f, in_f = W0.shape
    r = A.shape[0]
    if A.shape[1] != in_f or B.shape != (out_f, r):
        return None
    return entry[0], entry[1], out_f, in_f, r


# NaN or Inf in A or B makes at least one norm of ``column_norm`` NaN or Inf
# when out, in > 0 (float32/float64): the kernel (csrc/dora_kernels_impl.h,
# norm_step and tile_full/tile_general) forms every product B[i, k] * A[k, j]
# (no element skipped, no zero short-cut; 0 * Inf is NaN) and adds
# s * B_i @ A to W0_i and the squares without -ffast-math, so a NaN or an
# infinite product reaches that row's sum. A caller that finds every norm
# finite has therefore proved A and B finite (``core.functional._scale``;
# tested in tests/test_small_layer_path.py).
NORM_PROPAGATES_NON_FINITE = True


def _column_norm_lp(W0, A, B, scaling):
    """``column_norm`` of a 16-bit W0 with float32 A, B: n float32."""
    A, B = _float32_arrays(_lp_weight_reason("W0", W0), A=A, B=B)
    out_f, in_f, r, _ = _adapter(W0, A, B)
    n = np.empty(out_f, dtype=np.float32)
    _lp_call(lib.dora_column_norm_lp, W0,
             [n, W0, _Whole(A), B], _scaling(scaling), in_f, r)
    return n


def forward_epilogue(base, U, B, g, scaling, bias, out_dtype=None, out=None, z_out=None):
    """y = g * (base + s * U @ B.T) + bias, one pass over the (N, out) output.

    The DoRA output (Eq. 5) with g = m / n, after the two products x @ W0.T
    (base) and x @ A.T (U) that BLAS computes.

    Parameters
    ----------
    base : ndarray, shape (N, out)
    U : ndarray, shape (N, r)
    B : ndarray, shape (out, r)
    g : ndarray, shape (out,)
    scaling : float
    bias : ndarray, shape (out,), or None
    out_dtype : None, np.float16, ml_dtypes.bfloat16 (or "bfloat16"), optional
        None (or the inputs' dtype): y in the inputs' dtype. A 16-bit dtype:
        base, U, B, g must be float32 and bias float32 or of out_dtype; y is
        the float32 result rounded once to out_dtype, bit for bit.
    out : ndarray, shape (N, out), optional
        Write y here (C-contiguous, writeable, y's dtype) instead of into a
        new array. It may be ``base`` itself, element for element: the kernel
        reads each element of base before it writes that element of y. Any
        other overlap with an input is refused (see
        ``dora_ref.core.kernels_numpy.check_epilogue_out``).
    z_out : ndarray, shape (N, out), optional
        Also write z = base + s * U @ B.T here (the training forward keeps it
        for ``backward_lowrank_z``): C-contiguous, writeable, base's dtype
        (float32/float64); it may be ``base`` itself, element for element,
        as ``out`` may. Not with ``out`` or ``out_dtype``. y is a new array.

    Returns
    -------
    y : ndarray, shape (N, out)
        The inputs' dtype, or out_dtype; ``out`` when given.

    Raises
    ------
    TypeError
        A non-array, mixed or unsupported dtypes, an unknown out_dtype, an
        ``out`` or ``z_out`` of another dtype.
    ValueError
        Shapes that do not fit (N, out), (N, r), (out, r), (out,); an ``out``
        or ``z_out`` of another shape, not C-contiguous, read-only, or
        overlapping an input other than as base itself; ``z_out`` with
        ``out`` or ``out_dtype``.
    """
    if z_out is not None:
        return _forward_epilogue_z(base, U, B, g, scaling, bias, out_dtype, out, z_out)
    if out_dtype is None and out is None and type(base) is np.ndarray:
        entry = _EPILOGUE_KERNELS.get(base.dtype)
        if entry is not None and _epilogue_usual(base, U, B, g, bias):
            # every check below passed (``_epilogue_usual``): the same call, in fewer steps
            ptr_type, kernel = entry
            N, out_f = base.shape
            if _lowrank_on_blas(out_f, U.shape[1]):
                return _epilogue_from_product(None, None, base, U, B, g, bias, scaling)[0]
            y = np.empty((N, out_f), dtype=base.dtype)
            status = kernel(
                _from_buffer(ptr_type, y), _from_buffer(ptr_type, base),
                _from_buffer(ptr_type, U), _from_buffer(ptr_type, B), _from_buffer(ptr_type, g),
                ffi.NULL if bias is None else _from_buffer(ptr_type, bias),
                _scaling(scaling), N, out_f, U.shape[1],
            )
            _check_status(status, "forward_epilogue")
            return y
    lp_dtype = _lp_out_dtype(out_dtype, base)
    if lp_dtype is not None:
        return _forward_epilogue_lp(base, U, B, g, scaling, bias, lp_dtype, out)
    arrays, dtype, N, out_f, r, ctype, sfx, bias_ptr = _epilogue_arrays(base, U, B, g, bias)
    if out is not None:  # against the caller's arrays: a non-contiguous base was copied by _arrays
        _kernels_numpy.check_epilogue_out(out, base, (U, B, g, bias), dtype)
    if _lowrank_on_blas(out_f, r):  # y into out, or (out None) over the product
        # the product of the caller's U and B as given (checked: plain ndarrays of this dtype), as
        # the twin forms it: from _arrays' C-contiguous copies BLAS took another path and the
        # bits differed from NumPy's for a Fortran-ordered U or B (an adversary, session 22)
        return _epilogue_from_product(out, None, arrays[0], U, B, arrays[3],
                                      arrays[4] if bias is not None else None, scaling)[0]
    y = np.empty((N, out_f), dtype=dtype) if out is None else out
    base, U, B, g = arrays[:4]
    status = getattr(lib, f"dora_forward_epilogue_{sfx}")(
        _ptr(y, ctype), _ptr(base, ctype), _ptr(U, ctype), _ptr(B, ctype), _ptr(g, ctype),
        bias_ptr, _scaling(scaling), N, out_f, r,
    )
    _check_status(status, "forward_epilogue")
    return y


_EPILOGUE_KERNELS = {
    np.dtype(np.float32): (_ARRAY_TYPE["float"], lib.dora_forward_epilogue_f32),
    np.dtype(np.float64): (_ARRAY_TYPE["double"], lib.dora_forward_epilogue_f64),
}

_EPILOGUE_Z_KERNELS = {
    np.dtype(np.float32): (_ARRAY_TYPE["float"], lib.dora_forward_epilogue_z_f32),
    np.dtype(np.float64): (_ARRAY_TYPE["double"], lib.dora_forward_epilogue_z_f64),
}


def _forward_epilogue_keep_z(base, U, B, g, scaling, bias):
    """``forward_epilogue(base, ..., z_out=base)`` for the functional core's training forward.

    base is the caller's own (N, out) product, fresh from ``x @ W0.T``: it
    cannot overlap U, B, g or the bias, so the usual call (``_epilogue_usual``,
    base writeable) goes to the kernel without ``check_epilogue_out``; any
    other goes through ``forward_epilogue``'s checks.
    """
    if type(base) is np.ndarray and base.flags.writeable:
        entry = _EPILOGUE_Z_KERNELS.get(base.dtype)
        if entry is not None and _epilogue_usual(base, U, B, g, bias):
            ptr_type, kernel = entry
            N, out_f = base.shape
            if _lowrank_on_blas(out_f, U.shape[1]):
                return _epilogue_from_product(None, base, base, U, B, g, bias, scaling)[0]
            y = np.empty((N, out_f), dtype=base.dtype)
            zp = _from_buffer(ptr_type, base)
            status = kernel(
                _from_buffer(ptr_type, y), zp, zp, _from_buffer(ptr_type, U),
                _from_buffer(ptr_type, B), _from_buffer(ptr_type, g),
                ffi.NULL if bias is None else _from_buffer(ptr_type, bias),
                _scaling(scaling), N, out_f, U.shape[1],
            )
            _check_status(status, "forward_epilogue")
            return y
    return forward_epilogue(base, U, B, g, scaling, bias, z_out=base)


def _forward_epilogue_over_base(base, U, B, g, scaling, bias):
    """``forward_epilogue(base, ..., out=base)`` for the functional core's eval forward.

    base is the caller's own (N, out) product, fresh from ``x @ W0.T``: it
    cannot overlap U, B, g or the bias, so the usual call (``_epilogue_usual``,
    base writeable) goes to the kernel without ``check_epilogue_out`` (8 us of
    a 15 us call at N = 16, out = 64, r = 64, float32); any other goes
    through ``forward_epilogue``'s checks. Returns y, which is base.
    """
    if type(base) is np.ndarray and base.flags.writeable:
        entry = _EPILOGUE_KERNELS.get(base.dtype)
        if entry is not None and _epilogue_usual(base, U, B, g, bias):
            ptr_type, kernel = entry
            N, out_f = base.shape
            if _lowrank_on_blas(out_f, U.shape[1]):
                return _epilogue_from_product(base, None, base, U, B, g, bias, scaling)[0]
            yp = _from_buffer(ptr_type, base)
            status = kernel(
                yp, yp, _from_buffer(ptr_type, U), _from_buffer(ptr_type, B),
                _from_buffer(ptr_type, g), ffi.NULL if bias is None else _from_buffer(ptr_type, bias),
                _scaling(scaling), N, out_f, U.shape[1],
            )
            _check_status(status, "forward_epilogue")
            return base
    return forward_epilogue(base, U, B, g, scaling, bias, out=base)


_EPILOGUE_NF_KERNELS = {
    np.dtype(np.float32): (_ARRAY_TYPE["float"], lib.dora_forward_epilogue_nf_f32),
    np.dtype(np.float64): (_ARRAY_TYPE["double"], lib.dora_forward_epilogue_nf_f64),
}

#: ``_forward_epilogue_flagged``'s ``where``: y in a new array, y over base, z over base
#: (the NumPy twin's constants: both backends take the same values)
EPILOGUE_NEW, EPILOGUE_OVER_BASE, EPILOGUE_KEEP_Z = (
    _kernels_numpy.EPILOGUE_NEW, _kernels_numpy.EPILOGUE_OVER_BASE, _kernels_numpy.EPILOGUE_KEEP_Z)

_new_flag = ffi.new

_FROM_PRODUCT_KERNELS = {
    np.dtype(np.float32): (_ARRAY_TYPE["float"], lib.dora_forward_epilogue_from_product_nf_f32),
    np.dtype(np.float64): (_ARRAY_TYPE["double"], lib.dora_forward_epilogue_from_product_nf_f64),
}


def _lowrank_on_blas(out_f, r):
    """Whether the epilogues form U @ B.T with BLAS (``U @ B.T``, as the NumPy twin) rather
    than with the C kernels' register tile: where r >= out, above ``FUSED_MAX_RANK``.

    There the rank-r product is as large as the output it feeds (r multiply-adds
    per element of y, as many as x @ W0.T has per element at in = r), and the
    tile, which adds without fused multiply-adds (its bits are NumPy's sequence
    of roundings), runs it more slowly than OpenBLAS's micro-kernel: 44 against
    39 us on one thread, quiet, at (N, out, r) = (256, 64, 64), float32. With a
    busy core the cost model keeps the tile on one thread while NumPy's
    ``U @ B.T`` still splits over OpenBLAS's spinning worker whenever that worker
    has the core (its fast mode): the eval forward at (64, 64, 64, 256) was
    C/NumPy 1.10 / 1.20 by medians (float32 / float64) while C was faster by
    means. Above ``FUSED_MAX_RANK`` a training forward keeps z (``KEEP_Z_MIN_RANK``),
    and the backward that forms z again (``backward_epilogue``, ``backward_lowrank``)
    forms it the same way (``_z_on_blas``), so a step's bits do not depend on
    whether z was kept. A function of the shape only, never of the load or the
    threads. But the product is BLAS's, so there (unlike every other C kernel) y,
    z and dg change in the last bits with BLAS's number of threads, as the NumPy
    backend's do: at (N, out, r) = (256, 64, 64), float32, 1,431 of 16,384
    elements of y differed between OpenBLAS on 1 and on 2 threads, by up to
    7.6e-6 (an adversary's run, session 12; threadpoolctl). And a fork from
    another thread in the middle of that product can hang in OpenBLAS, as a fork
    during any NumPy product can.
    """
    return _BLAS_LOWRANK and r > FUSED_MAX_RANK and r >= out_f


#: Tests only: False sends every shape to the tile (``tests/test_forward_tile_bits.py`` pins
#: the tile's bits at r >= out too).
_BLAS_LOWRANK = True


def _epilogue_from_product(y, z, base, U, B, g, bias, scaling):
    """The forward epilogue where ``_lowrank_on_blas``: P = U @ B.T by BLAS, then one C pass
    y = g * (base + s * P) + bias (z = base + s * P stored if z is not None; y or z may be
    base, element for element). ``y`` None: y is written over P, this call's own fresh
    product, as the NumPy twin writes its y over its U @ B.T (``_epilogue``, ``_epilogue_z``):
    no other (N, out) array is touched. With a y of its own the C path wrote one more (N, out)
    array than the twin, and on the Zen 4 its eval forward at (64, 64, 64, 256) float64 ran
    1.3-1.5x the twin's in the busy sweep's quiet level and in stretches of a quiet machine
    (the C kernel on its own was no slower; session 22). Arguments checked by the caller
    (one float32/float64 dtype, fitting shapes; base, g, bias, y and z C-contiguous; U and B
    plain ndarrays in any layout, as the caller gave them: only their product is formed, as
    the twin forms it; y and z not overlapping U, B, g, bias). Returns (y, whether some
    element of y is Inf or NaN)."""
    ptr_type, kernel = _FROM_PRODUCT_KERNELS[base.dtype]
    # NumPy's product, so (unlike the C kernels) its bits depend on BLAS's threads, and a fork from
    # another thread in the middle of it can hang in OpenBLAS (attack 57, session 12). A place in the
    # fork gate taken here deadlocks: os.fork holds the GIL while the gate waits for this thread to
    # give the place back. Both are documented (README "Determinism", docs/performance.md).
    # (no np.errstate here: it costs 1.4 us a call, 2% of an eval forward at (16, 64, 64); an Inf or
    # NaN that reaches P warns as in the NumPy twin's own U @ B.T, then the caller refuses it)
    # the NumPy twin's product, bit for bit; np.asarray: a subclass's own __matmul__ (an
    # np.memmap subclass passes the checks) never decides what the kernel is handed (one that
    # returned a (1, 1) array had the kernel write past it: a segfault, an adversary, session 22)
    P = np.asarray(U) @ np.asarray(B).T
    N, out_f = base.shape
    if type(P) is not np.ndarray or P.dtype != base.dtype or P.shape != (N, out_f) \
            or not P.flags.c_contiguous:  # NumPy's matmul of two plain 2-D arrays always is
        raise RuntimeError(f"U @ B.T gave {type(P).__name__} {P.dtype} {P.shape}, not a "
                           f"C-contiguous {base.dtype} array of shape {(N, out_f)}")
    flag = _new_flag("int *")
    pp = _from_buffer(ptr_type, P)
    if y is None:
        y, yp = P, pp  # each element of P is read before that element of y is written
    else:
        yp = _from_buffer(ptr_type, y)
    status = kernel(
        yp, ffi.NULL if z is None else _from_buffer(ptr_type, z),
        _from_buffer(ptr_type, base), pp, _from_buffer(ptr_type, g),
        ffi.NULL if bias is None else _from_buffer(ptr_type, bias), _scaling(scaling),
        N, out_f, flag,
    )
    _check_status(status, "forward_epilogue")
    return y, bool(flag[0])


def _z_on_blas(base, U, B, scaling):
    """z = base + s * U @ B.T as ``_epilogue_from_product`` forms it (the same roundings:
    s * P, then + base), for the backward's kernels that read z (checked arguments)."""
    z = U @ B.T
    z *= _scaling(scaling)  # a Python float: z keeps the arrays' dtype, as in C
    z += base
    return z


def _forward_epilogue_flagged(base, U, B, g, scaling, bias, where):
    """The functional core's forward epilogue, and whether y is certainly finite.

    ``where``: ``EPILOGUE_NEW`` (``forward_epilogue``), ``EPILOGUE_OVER_BASE``
    (``_forward_epilogue_over_base``: y written over base, which is the
    caller's own fresh product) or ``EPILOGUE_KEEP_Z``
    (``_forward_epilogue_keep_z``: z written over base, y a new array).

    Returns
    -------
    y : ndarray, shape (N, out)
        The same bits as the function named above.
    finite : bool
        True: every element of y is finite (the kernel's flag, set while it
        wrote y: no second pass over y). False: some element may not be;
        the caller runs the exact test (``check_result_finite``). The usual
        call (``_epilogue_usual``, base writeable) takes the flag from the
        kernel; any other goes through the function named above and
        ``results_finite``'s one-sum test of y.
    """
    if type(base) is np.ndarray and (where == EPILOGUE_NEW or base.flags.writeable):
        entry = _EPILOGUE_NF_KERNELS.get(base.dtype)
        if entry is not None and _epilogue_usual(base, U, B, g, bias):
            ptr_type, kernel = entry
            N, out_f = base.shape
            if _lowrank_on_blas(out_f, U.shape[1]):  # y over base, or over the product
                y, nonfinite = _epilogue_from_product(
                    base if where == EPILOGUE_OVER_BASE else None,
                    base if where == EPILOGUE_KEEP_Z else None, base, U, B, g, bias, scaling)
                return y, not nonfinite
            bp = _from_buffer(ptr_type, base)
            if where == EPILOGUE_OVER_BASE:
                y, yp, zp = base, bp, ffi.NULL
            else:
                y = np.empty((N, out_f), dtype=base.dtype)
                yp = _from_buffer(ptr_type, y)
                zp = bp if where == EPILOGUE_KEEP_Z else ffi.NULL
            flag = _new_flag("int *")
            status = kernel(
                yp, zp, bp, _from_buffer(ptr_type, U), _from_buffer(ptr_type, B),
                _from_buffer(ptr_type, g), ffi.NULL if bias is None else _from_buffer(ptr_type, bias),
                _scaling(scaling), N, out_f, U.shape[1], flag,
            )
            _check_status(status, "forward_epilogue")
            return y, not flag[0]
    if where == EPILOGUE_OVER_BASE:
        y = _forward_epilogue_over_base(base, U, B, g, scaling, bias)
    elif where == EPILOGUE_KEEP_Z:
        y = _forward_epilogue_keep_z(base, U, B, g, scaling, bias)
    else:
        y = forward_epilogue(base, U, B, g, scaling, bias)
    return y, math.isfinite(sum_squares(y))


def _forward_epilogue_z(base, U, B, g, scaling, bias, out_dtype, out, z_out):
    """``forward_epilogue`` with ``z_out``: y in a new array, z written to z_out."""
    if out_dtype is not None or out is not None:
        raise ValueError("z_out cannot be combined with out or out_dtype: the forward that "
                         "keeps z writes y (base's dtype) to a new array")
    arrays, dtype, N, out_f, r, ctype, sfx, bias_ptr = _epilogue_arrays(base, U, B, g, bias)
    # against the caller's arrays: a non-contiguous base was copied by _arrays (and a
    # z_out that is that base is refused: not C-contiguous)
    _kernels_numpy.check_epilogue_out(z_out, base, (U, B, g, bias), dtype, name="z_out")
    if _lowrank_on_blas(out_f, r):  # y over the product of the caller's U and B, as the twin's
        return _epilogue_from_product(None, z_out, arrays[0], U, B, arrays[3],
                                      arrays[4] if bias is not None else None, scaling)[0]
    base, U, B, g = arrays[:4]
    y = np.empty((N, out_f), dtype=dtype)
    status = getattr(lib, f"dora_forward_epilogue_z_{sfx}")(
        _ptr(y, ctype), _ptr(z_out, ctype), _ptr(base, ctype), _ptr(U, ctype), _ptr(B, ctype),
        _ptr(g, ctype), bias_ptr, _scaling(scaling), N, out_f, r,
    )
    _check_status(status, "forward_epilogue")
    return y


def _epilogue_arrays(base, U, B, g, bias):
    """The general path's checks of ``forward_epilogue`` (with or without ``z_out``).

    Returns ((base, U, B, g[, bias]) C-contiguous of one float32/float64 dtype, that
    dtype, N, out, r, its C type name, the kernels' suffix, the bias pointer
    or NULL); raises the ``TypeError``/``ValueError`` that names the argument.
    """
    named = dict(base=base, U=U, B=B, g=g)
    if bias is not None:
        named["bias"] = bias
    arrays, dtype = _arrays(**named)
    N, out_f, r, shapes = _epilogue_shapes(*arrays[:4])
    ctype, sfx = _CTYPE[dtype]
    bias_ptr = ffi.NULL
    if bias is not None:
        if arrays[4].shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},); got {shapes}, "
                             f"bias {arrays[4].shape}")
        bias_ptr = _ptr(arrays[4], ctype)
    return arrays, dtype, N, out_f, r, ctype, sfx, bias_ptr


def _epilogue_usual(base, U, B, g, bias):
    """True for ``forward_epilogue``'s usual call, decided in one pass.

    base is an ndarray of float32/float64 (the caller checked that);
    True when it is 2-D and it and U, B, g (and bias) are C-contiguous ndarrays of its
    dtype with the shapes (N, out), (N, r), (out, r), (out,) [, (out,)]:
    exactly the calls for which ``_arrays`` copies nothing and
    ``_epilogue_shapes`` raises nothing. Otherwise False, and the general
    path checks again and raises the message that says what is wrong
    (``tests/test_kernels_c.py`` passes every kind of bad argument).
    """
    dtype = base.dtype
    for arr in (U, B, g) if bias is None else (U, B, g, bias):
        if type(arr) is not np.ndarray or arr.dtype != dtype or not arr.flags.c_contiguous:
            return False
    if base.ndim != 2 or not base.flags.c_contiguous or U.ndim != 2:
        return False
    N, out_f = base.shape
    return (U.shape[0] == N and B.shape == (out_f, U.shape[1]) and g.shape == (out_f,)
            and (bias is None or bias.shape == (out_f,)))


def _forward_epilogue_lp(base, U, B, g, scaling, bias, out_dtype, out=None):
    """``forward_epilogue`` with float32 inputs and y rounded once to the 16-bit out_dtype."""
    reason = f"when out_dtype is {out_dtype} (float32 inputs, a 16-bit output)"
    base32, U32, B32, g32 = _float32_arrays(reason, base=base, U=U, B=B, g=g)
    N, out_f, r, shapes = _epilogue_shapes(base32, U32, B32, g32)
    bias_ptr = ffi.NULL
    if bias is not None:
        if not isinstance(bias, np.ndarray):
            raise TypeError(f"bias must be a numpy.ndarray or None, got {type(bias).__name__}")
        refuse_array_subclass("bias", bias)
        if bias.dtype not in (_FLOAT32, out_dtype):
            raise TypeError(f"bias must have dtype float32 or out_dtype ({out_dtype}), "
                            f"got {bias.dtype} (shape {bias.shape})")
        if bias.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},); got {shapes}, bias {bias.shape}")
        bias32 = np.ascontiguousarray(bias, dtype=np.float32)  # (out,): widening is exact
        bias_ptr = _ptr(bias32, "float")
    if out is None:
        y = np.empty((N, out_f), dtype=out_dtype)
    else:  # a 16-bit out cannot alias the float32 inputs element for element
        _kernels_numpy.check_epilogue_out(out, base, (U, B, g, bias), out_dtype)
        y = out
    if _lowrank_on_blas(out_f, r):  # the float32 y of the float32 path, rounded once
        y32 = _epilogue_from_product(None, None, base32, U, B, g32,  # the caller's U, B: the twin's product
                                     None if bias is None else bias32, scaling)[0]
        y[...] = y32
        return y
    status = lib.dora_forward_epilogue_lp(
        _bits(y), _ptr(base32, "float"), _ptr(U32, "float"), _ptr(B32, "float"),
        _ptr(g32, "float"), bias_ptr, _scaling(scaling), N, out_f, r, _lp_format(out_dtype),
    )
    _check_status(status, "forward_epilogue")
    return y


def backward_epilogue(dy, base, U, B, g, scaling):
    """dg = sum_N dy * z and dz = dy * g, with z = base + s * U @ B.T never stored.

    Parameters
    ----------
    dy : ndarray, shape (N, out)
    base : ndarray, shape (N, out)
    U : ndarray, shape (N, r)
    B : ndarray, shape (out, r)
    g : ndarray, shape (out,)
    scaling : float

    Returns
    -------
    dg : ndarray, shape (out,)
    dz : ndarray, shape (N, out)
    """
    return _backward_epilogue_kernel(*_backward_checked(dy, base, U, B, g), _scaling(scaling))


def _backward_epilogue_kernel(arrays, dtype, N, out_f, r, scaling, dz=None):
    """The C kernel on arguments ``_backward_checked`` returned and a scaling
    ``_scaling`` returned (it checks nothing); ``dz``: where to write dz (base
    itself, or None: a new array)."""
    dy, base, U, B, g = arrays
    if _lowrank_on_blas(out_f, r):  # z as the forward formed it
        return _backward_epilogue_z_kernel(dy, _z_on_blas(base, U, B, scaling), g, dtype, N,
                                           out_f, dz)
    ctype, sfx = _CTYPE[dtype]
    dg = np.empty(out_f, dtype=dtype)
    if dz is None:
        dz = np.empty((N, out_f), dtype=dtype)
    status = getattr(lib, f"dora_backward_epilogue_{sfx}")(
        _ptr(dg, ctype), _ptr(dz, ctype), _ptr(dy, ctype), _ptr(base, ctype), _ptr(U, ctype),
        _ptr(B, ctype), _ptr(g, ctype), scaling, N, out_f, r,
    )
    _check_status(status, "backward_epilogue")
    return dg, dz


def backward_epilogue_z(dy, z, g):
    """dg = sum_N dy * z and dz = dy * g, with z as the training forward kept it.

    ``backward_epilogue`` when ``forward_epilogue(..., z_out=)`` stored
    z = base + s * U @ B.T: no product is formed, one pass over dy and z.

    Parameters
    ----------
    dy, z : ndarray, shape (N, out), float32 or float64
    g : ndarray, shape (out,)

    Returns
    -------
    dg : ndarray, shape (out,)
    dz : ndarray, shape (N, out)

    Raises
    ------
    TypeError
        A non-array, mixed or unsupported dtypes.
    ValueError
        Shapes that do not fit (N, out), (N, out), (out,).
    """
    arrays, dtype = _arrays(dy=dy, z=z, g=g)
    dy, z, g = arrays
    shapes = _Shapes(("dy", dy), ("z", z), ("g", g))
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D (N, out); got {shapes}")
    _shape("dy", dy, z.shape, shapes)
    _shape("g", g, (z.shape[1],), shapes)
    return _backward_epilogue_z_kernel(dy, z, g, dtype, *z.shape)


def _backward_epilogue_z_kernel(dy, z, g, dtype, N, out_f, dz=None):
    """The C kernel on checked arguments (C-contiguous, one dtype, fitting shapes); ``dz``:
    where to write dz (an (N, out) array of the dtype, which may be z itself: the kernel
    reads each element of z before it writes the same element of dz), or None: a new array."""
    ctype, sfx = _CTYPE[dtype]
    dg = np.empty(out_f, dtype=dtype)
    if dz is None:
        dz = np.empty((N, out_f), dtype=dtype)
    status = getattr(lib, f"dora_backward_epilogue_z_{sfx}")(
        _ptr(dg, ctype), _ptr(dz, ctype), _ptr(dy, ctype), _ptr(z, ctype), _ptr(g, ctype),
        N, out_f,
    )
    _check_status(status, "backward_epilogue_z")
    return dg, dz


# The rank up to which the one-pass kernels below beat BLAS. They save a pass
# over the (N, out) or (out, in) array but do their 2 r multiply-adds per
# element less efficiently than BLAS: a win while the pass is bound by memory,
# a loss once it is bound by arithmetic. Measured at (4096, 4096, r, 512),
# float32, 2 threads, AVX-512 Xeon (fastest repeats): backward_lowrank 1.3 ms
# vs 2.0 ms for backward_epilogue and two BLAS products at r = 8, 1.6 vs
# 2.4 ms at r = 12; norm_gradient_products 5-6 ms vs 15 ms for two BLAS
# products at r = 8, 10 vs 17 ms at r = 12, about even at r = 16. Measured
# again on an AVX2 EPYC (Zen 3), same shape, fastest of 11 interleaved
# repeats on a busy machine (load 2.4-2.7 on 2 cores): backward_lowrank 3.7
# vs 4.2 ms at r = 16, 8.2 vs 6.0 ms at r = 32, 22.7 vs 20.5 ms at r = 64;
# norm_gradient_products 22 vs 12 ms at r = 16, 57 vs 19 ms at r = 32,
# 131 vs 98 ms at r = 64. Above it the wrappers call BLAS, as the NumPy
# twins do.
# At small sizes the fused backward_lowrank is kept too: at (N, out) = 64x64,
# r = 8, 1 thread, CPU time (medians of 15 interleaved repeats, load ~4-6 on
# 2 cores) it took 0.89x (float32) and 0.94x (float64) the time of
# backward_epilogue and two BLAS products, though it runs about twice their
# instructions (one call from Python instead of five); from 128x128 to
# 512x512 it was 0.96-1.18x, from 1024x1024 0.63-0.75x. No size switch: the
# bits of a given shape stay those of one kernel.
FUSED_MAX_RANK = 12
#: A training forward keeps z = base + s * U @ B.T for the backward from this rank on
#: (``core.functional``). Below it the fused backward above forms z in registers as it
#: goes, for less than writing and reading it back costs (a 64x64 layer, r = 8: a step
#: 2-3% slower with z kept, CPU time, Zen 3); above, the backward's separate epilogue
#: would form U @ B.T again (its kernels' CPU time 16-25% lower with z kept, r = 16..64).
KEEP_Z_MIN_RANK = FUSED_MAX_RANK + 1


def backward_lowrank(dy, base, U, B, g, scaling):
    """``backward_epilogue`` plus dU = s * dz @ B and dB = s * dz.T @ U.

    For r <= ``FUSED_MAX_RANK``, all four in one pass over dz
    (``_backward_lowrank_fused``); above it, ``backward_epilogue`` and two
    BLAS products, as the NumPy twin. The arguments are checked the same
    way on both paths.

    Parameters
    ----------
    dy, base : ndarray, shape (N, out)
    U : ndarray, shape (N, r)
    B : ndarray, shape (out, r)
    g : ndarray, shape (out,)
    scaling : float

    Returns
    -------
    dg : ndarray, shape (out,)
    dz : ndarray, shape (N, out)
    dU : ndarray, shape (N, r)
    dB : ndarray, shape (out, r)

    Raises
    ------
    TypeError
        An argument that is not a float32/float64 ndarray, mixed dtypes, or a
        scaling that is not a real number.
    ValueError
        Shapes that do not fit (N, out), (N, r), (out, r), (out,).

    Notes
    -----
    The fused path's bits do not depend on the number of threads; on the
    BLAS path dg and dz do not either, dU and dB may (BLAS splits its sums
    by thread), and where r >= out (``_lowrank_on_blas``) dg and dz may
    too. The fused kernel cuts its work into blocks set by (N, out, r)
    alone: of >= 512 columns, and where out is one such block, of rows of N
    (at most 4, each with >= 32768 elements of dz), whose partial sums of dg
    and dB are added in row order; so a small N (64 rows of 64 columns) is one
    block, as it was, and a tall dz (2048 x 64) runs on the team.
    """
    return _backward_lowrank_any(dy, base, U, B, g, scaling, False, False)


def _backward_checked(dy, base, U, B, g, base_name="base"):
    """The checks of ``backward_epilogue`` and ``backward_lowrank``.

    Returns ((dy, base, U, B, g) C-contiguous, dtype, N, out, r). The usual
    call (C-contiguous ndarrays of one float32/float64 dtype, the shapes
    (N, out), (N, out), (N, r), (out, r), (out,)) is recognised in one pass
    by the same tests as ``_epilogue_usual``; any other goes through ``_arrays`` and
    ``_epilogue_shapes``, which copy what is strided and raise the message
    that names the argument.
    """
    arrays = (dy, base, U, B, g)
    if type(base) is np.ndarray and base.dtype in _CTYPE and base.ndim == 2:
        dtype = base.dtype
        for arr in arrays:
            if type(arr) is not np.ndarray or arr.dtype != dtype or not arr.flags.c_contiguous:
                break
        else:
            N, out_f = base.shape
            if U.ndim == 2 and U.shape[0] == N and dy.shape == base.shape:
                r = U.shape[1]
                if B.shape == (out_f, r) and g.shape == (out_f,):
                    return arrays, dtype, N, out_f, r
    arrays, dtype = _arrays(**{"dy": dy, base_name: base, "U": U, "B": B, "g": g})
    N, out_f, r, shapes = _epilogue_shapes(*arrays[1:], base_name=base_name)
    _shape("dy", arrays[0], arrays[1].shape, shapes.plus("dy", arrays[0], first=True))
    return arrays, dtype, N, out_f, r


def _backward_lowrank_z_fused(dy, z, U, B, g, scaling):
    """``backward_lowrank_z`` in one pass over dz, for any r (the C kernel), checked."""
    return _backward_lowrank_kernel(*_backward_checked(dy, z, U, B, g, "z"), _scaling(scaling),
                                    _LOWRANK_Z_KERNELS)


def _backward_lowrank_fused(dy, base, U, B, g, scaling):
    """``backward_lowrank`` in one pass over dz, for any r (the C kernel), checked."""
    return _backward_lowrank_kernel(*_backward_checked(dy, base, U, B, g), _scaling(scaling))


_LOWRANK_KERNELS = {
    np.dtype(np.float32): ("float", lib.dora_backward_lowrank_f32),
    np.dtype(np.float64): ("double", lib.dora_backward_lowrank_f64),
}
_LOWRANK_Z_KERNELS = {
    np.dtype(np.float32): ("float", lib.dora_backward_lowrank_z_f32),
    np.dtype(np.float64): ("double", lib.dora_backward_lowrank_z_f64),
}


def backward_lowrank_z(dy, z, U, B, g, scaling):
    """``backward_lowrank`` with z as the training forward kept it, in place of base.

    The same dg, dz, dU, dB, bit for bit, as ``backward_lowrank`` on the
    base product that z was formed from (``forward_epilogue(..., z_out=)``
    forms z = base + s * U @ B.T exactly as the backward would), without
    forming U @ B.T again: for r <= ``FUSED_MAX_RANK`` the one-pass kernel
    skips it, above it ``backward_epilogue_z`` and two BLAS products.

    Parameters
    ----------
    dy, z : ndarray, shape (N, out)
    U : ndarray, shape (N, r)
    B : ndarray, shape (out, r)
    g : ndarray, shape (out,)
    scaling : float

    Returns
    -------
    dg : ndarray, shape (out,)
    dz : ndarray, shape (N, out)
    dU : ndarray, shape (N, r)
    dB : ndarray, shape (out, r)

    Raises
    ------
    TypeError
        An argument that is not a float32/float64 ndarray, mixed dtypes, or a
        scaling that is not a real number.
    ValueError
        Shapes that do not fit (N, out), (N, r), (out, r), (out,).
    """
    return _backward_lowrank_any(dy, z, U, B, g, scaling, True, False)


def _backward_lowrank_any(dy, base, U, B, g, scaling, base_is_z, dz_over_base):
    """``backward_lowrank`` (``base_is_z`` False) or ``backward_lowrank_z`` (True), checked, for
    either path (the one-pass kernel for r <= ``FUSED_MAX_RANK``, else the epilogue and two
    BLAS products).

    ``dz_over_base``: write dz over ``base`` (or z) instead of into a new (N,
    out) array, for the functional core's backward, whose array it is and
    which nothing reads after this call (``functional._take_base``): it spares
    the backward fresh memory and its page faults. The same bits either way:
    the kernels read each element of base (or z) before they write that
    element of dz. dz is ``base`` itself unless the checks had to copy it.
    """
    arrays, dtype, N, out_f, r = _backward_checked(dy, base, U, B, g, "z" if base_is_z else "base")
    s = _scaling(scaling)
    dz = arrays[1] if dz_over_base else None  # base, or its C-contiguous copy: ours either way
    if r > FUSED_MAX_RANK:
        if base_is_z:
            dg, dz = _backward_epilogue_z_kernel(arrays[0], arrays[1], arrays[4], dtype, N, out_f, dz)
        else:
            dg, dz = _backward_epilogue_kernel(arrays, dtype, N, out_f, r, s, dz)
        # the twin's products, scaled in place: the same roundings, and no second (N, r) and
        # (out, r) array per step (session 22; see _epilogue_from_product)
        return (dg, dz, *_kernels_numpy._lowrank_products(dz, arrays[2], arrays[3], s))
    return _backward_lowrank_kernel(arrays, dtype, N, out_f, r, s,
                                    _LOWRANK_Z_KERNELS if base_is_z else _LOWRANK_KERNELS, dz)


def _backward_lowrank_kernel(arrays, dtype, N, out_f, r, scaling, kernels=_LOWRANK_KERNELS,
                             dz=None):
    """The C kernel on arguments ``_backward_checked`` returned and a scaling
    ``_scaling`` returned (it checks nothing); ``kernels``: the _z ones for z
    in place of base; ``dz``: where to write dz (base itself, or None: a new
    array; each task reads its tiles of base before it writes the same
    elements of dz, and reads dz back only after)."""
    dy, base, U, B, g = arrays
    ctype, kernel = kernels[dtype]
    pt = _ARRAY_TYPE[ctype]  # once, not per pointer (_ptr): nine pointers per call
    dg = np.empty(out_f, dtype=dtype)
    if dz is None:
        dz = np.empty((N, out_f), dtype=dtype)
    dU = np.empty((N, r), dtype=dtype)
    dB = np.empty((out_f, r), dtype=dtype)
    status = kernel(
        _from_buffer(pt, dg), _from_buffer(pt, dz), _from_buffer(pt, dU), _from_buffer(pt, dB),
        _from_buffer(pt, dy), _from_buffer(pt, base), _from_buffer(pt, U), _from_buffer(pt, B),
        _from_buffer(pt, g), scaling, N, out_f, r,
    )
    if status != _DORA_OK:
        _check_status(status, "backward_lowrank")
    return dg, dz, dU, dB


def norm_gradient_products(W0, A, C):
    """W0 @ A.T (out, r) and C.T @ W0 (r, in).

    For r <= ``FUSED_MAX_RANK``, in one pass over W0
    (``_norm_gradient_products_fused``); above it, two BLAS products, as the
    NumPy twin. The arguments are checked the same way on both paths.

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
        float32, float64, or float16 / bfloat16 (then A and C are float32).
    A : ndarray, shape (r, in)
    C : ndarray, shape (out, r)

    Returns
    -------
    WAt : ndarray, shape (out, r)
    CtW : ndarray, shape (r, in)
        W0's dtype; float32 for a 16-bit W0: on the fused path, bit for bit
        the float32 kernel's on ``W0.astype(np.float32)``; on the BLAS path,
        BLAS on W0 widened one block of rows at a time (no float32 copy of
        W0), CtW summed over the blocks in order.

    Raises
    ------
    TypeError
        An argument that is not a float32/float64 ndarray, or mixed dtypes.
    ValueError
        Shapes that do not fit (out, in), (r, in), (out, r).

    Notes
    -----
    The fused path's bits do not depend on the number of threads; the BLAS
    path's may (BLAS splits its sums by thread).
    """
    if _is_lp(W0):
        return _norm_gradient_products_lp(W0, A, C)
    (W0, A, C), _ = _arrays(W0=W0, A=A, C=C)
    _products_shapes(W0, A, C)
    if A.shape[0] > FUSED_MAX_RANK:
        return W0 @ A.T, C.T @ W0
    return _norm_gradient_products_fused(W0, A, C)


def _products_shapes(W0, A, C):
    """Check W0 (out, in), A (r, in), C (out, r); return out, in, r."""
    shapes = _Shapes(("W0", W0), ("A", A), ("C", C))
    for name, arr in (("W0", W0), ("A", A), ("C", C)):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D; got {shapes}")
    out_f, in_f = W0.shape
    r = A.shape[0]
    if A.shape[1] != in_f:
        raise ValueError(f"A must have shape (r, in) = (r, {in_f}); got {shapes}")
    _shape("C", C, (out_f, r), shapes)
    return out_f, in_f, r


def _norm_gradient_products_fused(W0, A, C):
    """``norm_gradient_products`` in one pass over W0, for any r (the C kernel)."""
    (W0, A, C), dtype = _arrays(W0=W0, A=A, C=C)
    out_f, in_f, r = _products_shapes(W0, A, C)
    ctype, sfx = _CTYPE[dtype]
    WAt = np.empty((out_f, r), dtype=dtype)
    CtW = np.empty((r, in_f), dtype=dtype)
    status = getattr(lib, f"dora_norm_gradient_products_{sfx}")(
        _ptr(WAt, ctype), _ptr(CtW, ctype), _ptr(W0, ctype), _ptr(A, ctype), _ptr(C, ctype),
        out_f, in_f, r,
    )
    _check_status(status, "norm_gradient_products")
    return WAt, CtW


def _norm_gradient_products_lp(W0, A, C):
    """``norm_gradient_products`` of a 16-bit W0 with float32 A, C: WAt, CtW float32."""
    A, C = _float32_arrays(_lp_weight_reason("W0", W0), A=A, C=C)
    out_f, in_f, r = _products_shapes(W0, A, C)
    WAt = np.empty((out_f, r), dtype=np.float32)
    if r > FUSED_MAX_RANK:  # BLAS, as for float32, on W0 widened a block of rows at a time
        CtW = np.zeros((r, in_f), dtype=np.float32)
        for rows in _weight_row_blocks(out_f, in_f, 4):
            W_rows = W0[rows].astype(np.float32)
            WAt[rows] = W_rows @ A.T
            CtW += C[rows].T @ W_rows
        return WAt, CtW
    # the kernel's row slices depend on out: a strided W0 is copied whole
    # (in its own dtype), as the float32 wrapper copies it, for the same bits
    W0 = W0 if W0.flags.c_contiguous else np.ascontiguousarray(W0)
    CtW = np.empty((r, in_f), dtype=np.float32)
    status = lib.dora_norm_gradient_products_lp(
        _ptr(WAt, "float"), _ptr(CtW, "float"), _bits(W0), _ptr(A, "float"), _ptr(C, "float"),
        out_f, in_f, r, _lp_format(W0.dtype),
    )
    _check_status(status, "norm_gradient_products")
    return WAt, CtW


def scratch_bytes(kernel, *sizes, itemsize=4):
    """Bytes of C scratch one call allocates (not seen by tracemalloc); r is the last size.

    ``scratch_bytes("backward_lowrank", N, out, r)`` or
    ``scratch_bytes("norm_gradient_products", out, in, r)``; for the
    benchmark's memory accounting.
    """
    fn = {
        "backward_lowrank": lib.dora_backward_lowrank_scratch,
        "norm_gradient_products": lib.dora_norm_gradient_products_scratch,
    }[kernel]
    if sizes[-1] > FUSED_MAX_RANK:  # BLAS: its arrays are NumPy's, seen by tracemalloc
        return 0
    return int(fn(*sizes, itemsize))


def merge(W0, A, B, magnitude, scaling):
    """W' = (m / n)[:, None] * (W0 + s * B @ A) and n, in one pass over W0.

    PEFT's merge with DoRA (``W' = m * V / ||V||_c``, V = W0 + s * B @ A).

    Parameters
    ----------
    W0 : ndarray, shape (out, in)
        float32, float64, or float16 / bfloat16 (then A, B, magnitude are float32).
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    magnitude : ndarray, shape (out,)
    scaling : float

    Returns
    -------
    W_merged : ndarray, shape (out, in)
        W0's dtype; for a 16-bit W0, the float32 kernel's W' on
        ``W0.astype(np.float32)`` rounded once (past the range: inf).
    n : ndarray, shape (out,)
        W0's dtype, float32 for a 16-bit W0. Rows with n = 0 give inf/NaN
        rows in W_merged, as NumPy does; the caller checks n.

    Raises
    ------
    TypeError
        A non-array, a dtype outside those combinations, a non-real scaling.
    ValueError
        Shapes that do not fit W0 (out, in), A (r, in), B (out, r), magnitude (out,).
    """
    if _is_lp(W0):
        return _merge_lp(W0, A, B, magnitude, scaling)
    if _strided_weight(W0):  # row blocks, each copied: the same bits, no (out, in) copy
        (A, B, magnitude), _ = _arrays(A=A, B=B, magnitude=magnitude)
        _, _, _, shapes = _adapter(W0, A, B)
        _shape("magnitude", magnitude, (W0.shape[0],), shapes.plus("magnitude", magnitude))
        W_merged = np.empty(W0.shape, dtype=W0.dtype)
        n = np.empty(W0.shape[0], dtype=W0.dtype)
        for rows in _weight_row_blocks(*W0.shape, W0.itemsize):
            W_merged[rows], n[rows] = merge(
                np.ascontiguousarray(W0[rows]), A, B[rows], magnitude[rows], scaling
            )
        return W_merged, n
    (W0, A, B, magnitude), dtype = _arrays(W0=W0, A=A, B=B, magnitude=magnitude)
    out_f, in_f, r, shapes = _adapter(W0, A, B)
    _shape("magnitude", magnitude, (out_f,), shapes.plus("magnitude", magnitude))
    ctype, sfx = _CTYPE[dtype]
    W_merged = np.empty((out_f, in_f), dtype=dtype)
    n = np.empty(out_f, dtype=dtype)
    status = getattr(lib, f"dora_merge_{sfx}")(
        _ptr(W_merged, ctype), _ptr(n, ctype), _ptr(W0, ctype), _ptr(A, ctype), _ptr(B, ctype),
        _ptr(magnitude, ctype), _scaling(scaling), out_f, in_f, r,
    )
    _check_status(status, "merge")
    return W_merged, n


def _merge_lp(W0, A, B, magnitude, scaling):
    """``merge`` of a 16-bit W0 with float32 A, B, magnitude: W' in W0's dtype, n float32."""
    A, B, magnitude = _float32_arrays(_lp_weight_reason("W0", W0), A=A, B=B, magnitude=magnitude)
    out_f, in_f, r, shapes = _adapter(W0, A, B)
    _shape("magnitude", magnitude, (out_f,), shapes.plus("magnitude", magnitude))
    W_merged = np.empty((out_f, in_f), dtype=W0.dtype)
    n = np.empty(out_f, dtype=np.float32)
    _lp_call(lib.dora_merge_lp, W0,
             [W_merged, n, W0, _Whole(A), B, magnitude], _scaling(scaling), in_f, r)
    return W_merged, n


#: ``merge_into``'s formats: the C format of a 16-bit weight given as its bits
_BITS_FORMATS = {"bfloat16": "DORA_BF16", "float16": "DORA_F16"}


def merge_into(W_merged, W0, A, B, magnitude, scaling, *, fmt=None):
    """``merge`` written into the caller's ``W_merged``; a 16-bit weight as its raw bits.

    For ``dora-ref merge``, which reuses one output buffer from tensor to
    tensor (a fresh (out, in) array per tensor costs its page faults and
    zeroing) and handles bfloat16 as uint16 bits, so that ``ml_dtypes`` (a
    second or two to import) is never imported.

    Parameters
    ----------
    W_merged : ndarray, shape (out, in)
        Written: C-contiguous, writable, not overlapping any input; uint16
        with ``fmt``, else W0's dtype.
    W0 : ndarray, shape (out, in)
        With ``fmt``: uint16, the bits of the bfloat16/float16 values; else
        float32 or float64. Any layout (a strided W0 is copied a block of
        rows at a time, with the bits of a contiguous one).
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    magnitude : ndarray, shape (out,)
        float32 with ``fmt``; else W0's dtype.
    scaling : float
    fmt : {None, "bfloat16", "float16"}
        What W0's bits are; None for a float32/float64 W0.

    Returns
    -------
    n : ndarray, shape (out,)
        float32 with ``fmt``, else W0's dtype. W_merged then holds the bits of
        ``merge(W0, A, B, magnitude, scaling)[0]``: with ``fmt``, the float32
        kernel's W' on the exactly widened W0, rounded once to the format
        (to nearest, ties to even; past the range: inf). Rows with n = 0
        give inf/NaN rows, as ``merge``; the caller checks n.

    Raises
    ------
    TypeError
        A non-array, a dtype that does not fit ``fmt``, an unknown ``fmt``,
        a non-real scaling.
    ValueError
        Shapes that do not fit W0 (out, in), A (r, in), B (out, r),
        magnitude (out,); a W_merged of another shape, not C-contiguous,
        read-only, or sharing memory with an input.
    """
    if fmt is not None and fmt not in _BITS_FORMATS:
        raise TypeError(f"fmt must be None, 'bfloat16' or 'float16', got {fmt!r}")
    for name, arr in (("W_merged", W_merged), ("W0", W0)):
        _ndarray(name, arr)
    if fmt is None:
        if W0.dtype not in _CTYPE:
            raise TypeError(f"W0 must have dtype float32 or float64 (or be uint16 bits with fmt), "
                            f"got {W0.dtype} (shape {W0.shape})")
        (A, B, magnitude), dtype = _arrays(A=A, B=B, magnitude=magnitude)
        if dtype != W0.dtype:
            raise TypeError(f"A, B and magnitude must have W0's dtype {W0.dtype}, got {dtype}")
        ctype, sfx = _CTYPE[dtype]
        kernel = getattr(lib, f"dora_merge_{sfx}")
        in_ptr = out_ptr = lambda a: _ptr(a, ctype)  # noqa: E731
        tail = ()
    else:
        if W0.dtype != np.uint16:
            raise TypeError(f"W0 must be uint16 (the bits of {fmt} values) with fmt={fmt!r}, "
                            f"got {W0.dtype} (shape {W0.shape})")
        A, B, magnitude = _float32_arrays(f"when W0 holds {fmt} bits (a 16-bit weight takes a "
                                          f"float32 adapter)", A=A, B=B, magnitude=magnitude)
        dtype, ctype, kernel = np.dtype(np.uint16), "float", lib.dora_merge_lp
        in_ptr = out_ptr = lambda a: ffi.from_buffer("uint16_t[]", a)  # noqa: E731
        tail = (getattr(lib, _BITS_FORMATS[fmt]),)
    out_f, in_f, r, shapes = _adapter(W0, A, B)
    _shape("magnitude", magnitude, (out_f,), shapes.plus("magnitude", magnitude))
    if W_merged.dtype != dtype or W_merged.shape != W0.shape:
        raise ValueError(f"W_merged must be {dtype} of W0's shape {W0.shape}; got {W_merged.dtype} "
                         f"{W_merged.shape}")
    if not (W_merged.flags.c_contiguous and W_merged.flags.writeable):
        raise ValueError(f"W_merged must be C-contiguous and writable (shape {W_merged.shape})")
    for name, arr in (("W0", W0), ("A", A), ("B", B), ("magnitude", magnitude)):
        if np.may_share_memory(W_merged, arr):
            raise ValueError(f"W_merged shares memory with {name}: the kernel reads {name} while it "
                             f"writes W_merged; pass a separate buffer")
    n = np.empty(out_f, dtype=np.float32 if fmt else dtype)
    vec_ptr = (lambda a: _ptr(a, "float")) if fmt else in_ptr
    # a strided W0: blocks of rows starting where the kernel's own blocks start, each copied
    # contiguous (never the whole weight), with the bits of one call on the whole
    whole = W0.flags.c_contiguous
    blocks = [slice(None)] if whole else _weight_row_blocks(out_f, in_f, W0.itemsize)
    s = _scaling(scaling)
    for rows in blocks:
        W_rows = W0 if whole else np.ascontiguousarray(W0[rows])
        status = kernel(out_ptr(W_merged[rows]), vec_ptr(n[rows]), in_ptr(W_rows), vec_ptr(A),
                        vec_ptr(B[rows]), vec_ptr(magnitude[rows]), s, W_rows.shape[0], in_f, r, *tail)
        _check_status(status, "merge_into")
    return n


def unmerge(W_merged, A, B, factor, scaling):
    """W0 = W' / factor[:, None] - s * B @ A, the inverse of ``merge``.

    Parameters
    ----------
    W_merged : ndarray, shape (out, in)
        float32, float64, or float16 / bfloat16 (then A, B, factor are float32).
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    factor : ndarray, shape (out,)
        ``magnitude / n`` with n from ``merge``.
    scaling : float

    Returns
    -------
    W0 : ndarray, shape (out, in)
        W_merged's dtype; for a 16-bit W_merged, the float32 kernel's result
        on ``W_merged.astype(np.float32)`` rounded once (past the range: inf).

    Raises
    ------
    TypeError
        A non-array, a dtype outside those combinations, a non-real scaling.
    ValueError
        Shapes that do not fit W_merged (out, in), A (r, in), B (out, r),
        factor (out,).
    """
    if _is_lp(W_merged):
        return _unmerge_lp(W_merged, A, B, factor, scaling)
    (W_merged, A, B, factor), dtype = _arrays(W_merged=W_merged, A=A, B=B, factor=factor)
    out_f, in_f, r, shapes = _adapter(W_merged, A, B, W0_name="W_merged")
    _shape("factor", factor, (out_f,), shapes.plus("factor", factor))
    ctype, sfx = _CTYPE[dtype]
    W0 = np.empty((out_f, in_f), dtype=dtype)
    status = getattr(lib, f"dora_unmerge_{sfx}")(
        _ptr(W0, ctype), _ptr(W_merged, ctype), _ptr(A, ctype), _ptr(B, ctype),
        _ptr(factor, ctype), _scaling(scaling), out_f, in_f, r,
    )
    _check_status(status, "unmerge")
    return W0


def _unmerge_lp(W_merged, A, B, factor, scaling):
    """``unmerge`` of a 16-bit W_merged with float32 A, B, factor: W0 in W_merged's dtype."""
    A, B, factor = _float32_arrays(_lp_weight_reason("W_merged", W_merged), A=A, B=B,
                                   factor=factor)
    out_f, in_f, r, shapes = _adapter(W_merged, A, B, W0_name="W_merged")
    _shape("factor", factor, (out_f,), shapes.plus("factor", factor))
    W0 = np.empty((out_f, in_f), dtype=W_merged.dtype)
    _lp_call(lib.dora_unmerge_lp, W_merged,
             [W0, W_merged, _Whole(A), B, factor], _scaling(scaling), in_f, r)
    return W0
