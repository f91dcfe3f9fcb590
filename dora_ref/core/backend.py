"""Which implementation of the fused kernels runs: NumPy or C.

Two backends compute the same nine steps (``column_norm``,
``forward_epilogue`` (which can also keep z = base + s U B^T for the
backward), ``backward_epilogue``, ``backward_lowrank`` and their ``_z``
variants that read a kept z, ``norm_gradient_products``, ``merge``,
``unmerge``), and say from which rank a training forward keeps z
(``KEEP_Z_MIN_RANK``):

* ``"numpy"``: ``dora_ref.core.kernels_numpy``, the readable definition;
* ``"c"``: ``dora_ref.kernels.c``, the cffi/OpenMP extension built at install.

The C backend is the default when the extension imports. Force one with
``set_backend("numpy")``, the ``use_backend`` context manager, or the
environment variable ``DORA_REF_BACKEND=numpy|c`` (read at import).
"""
from __future__ import annotations

import contextlib
import os
import warnings

from . import kernels_numpy as _kernels_numpy

_C_IMPORT_ERROR = None
try:  # the extension is optional: a machine without a compiler gets NumPy
    from ..kernels import c as _kernels_c
except ImportError as exc:  # pragma: no cover - depends on the install
    _kernels_c = None
    _C_IMPORT_ERROR = exc

_MODULES = {"numpy": _kernels_numpy, "c": _kernels_c}
_active = None


def available_backends():
    """Return the names of the backends that can run here, e.g. ``("numpy", "c")``."""
    return tuple(name for name, mod in _MODULES.items() if mod is not None)


def backend():
    """Return the name of the active backend: ``"c"`` or ``"numpy"``."""
    return _active


def set_backend(name):
    """Make ``name`` (``"numpy"`` or ``"c"``) the active backend.

    Raises
    ------
    ValueError
        If ``name`` is not a backend, or is ``"c"`` and the C extension did
        not build or import (the message gives the import error).
    """
    global _active
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {tuple(_MODULES)}, got {name!r}")
    if _MODULES[name] is None:
        raise ValueError(
            f"the {name!r} backend is not available: the C extension did not import "
            f"({_C_IMPORT_ERROR}). Reinstall with a C compiler present "
            f"(pip install -e .) to build it."
        )
    _active = name


@contextlib.contextmanager
def use_backend(name):
    """Context manager that runs its body with backend ``name``, then restores.

    The backend is one setting of the process, not of the thread: other
    threads running meanwhile use it too, and one that enters or leaves
    its own ``use_backend`` changes it for all. Set one backend
    (``set_backend``) before starting threads that compute.
    """
    previous = _active
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def kernels():
    """Return the module of the active backend (its nine kernel functions)."""
    return _MODULES[_active]


def low_precision_kernels():
    """The kernel module for a float16/bfloat16 weight: the active one if it accepts them.

    A kernel module declares that its ``column_norm``, ``merge``, ``unmerge``
    and ``forward_epilogue`` accept low-precision weights (see
    ``dora_ref.core.kernels_numpy``) with a module attribute
    ``LOW_PRECISION = True``; a backend without it hands those calls to the
    NumPy twins, which compute the same bits.
    """
    active = _MODULES[_active]
    return active if getattr(active, "LOW_PRECISION", False) else _kernels_numpy


def _initial_backend():
    """The backend at import: DORA_REF_BACKEND if set, else C when built, else NumPy."""
    requested = os.environ.get("DORA_REF_BACKEND")
    if requested:
        if requested not in _MODULES or _MODULES[requested] is None:
            raise ImportError(
                f"DORA_REF_BACKEND={requested!r}: must be 'numpy' or 'c' (available here: "
                f"{', '.join(available_backends())})"
            )
        return requested
    if _kernels_c is None:
        warnings.warn(
            f"dora_ref: the C extension is not built ({_C_IMPORT_ERROR}); running on the "
            f"slower NumPy backend. Reinstall with a C compiler present to build it, or set "
            f"DORA_REF_BACKEND=numpy to choose NumPy and silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        return "numpy"
    return "c"


set_backend(_initial_backend())
