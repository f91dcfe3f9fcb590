"""Scratch arrays that a backward reuses from one call to the next.

A training step allocates, besides what it returns, two large arrays that
die within the backward: dz = dy * m / n, of shape (N, out), which feeds
``dz @ W0``, and the (N, in) product ``dU @ A`` added into dx. Fresh memory
is not free: glibc gives a large freed block back to the kernel, and the
next step's first write to each of its pages is a page fault in which the
kernel clears the page (and, on a virtual machine whose balloon reports free
pages, may wait for the host to hand the page back). Measured at (out, in,
r, N) = (4096, 4096, 64, 512), float32, on a 2-core Intel Xeon KVM guest:
about 6,900 page faults a DoRA step against 2,250 for the plain layer's
two products, and about 12 ms of a 166 ms step (``docs/performance.md``,
"Fresh memory").

So those two arrays come from here: one buffer per *slot* ("dz", "dx_lowrank")
and thread, kept from call to call and grown when a larger one is needed.
They are never returned to the user and never outlive the call that takes
them; the results (y, dx, dA, dB, dm) and what the context keeps for the
backward stay new arrays.

Rules, so that the reuse can never change a result:

* A slot is in use while any array on its memory is alive: the one
  ``take`` handed out, or any view of it (NumPy makes every view refer to
  the buffer's owning array, whose reference count tells). So there is
  nothing to give back, no exception (a Ctrl-C between any two bytecodes)
  can leave a slot in use once its arrays are gone, and memory that is
  still seen anywhere is never handed out again.
* ``take`` returns ``None`` (the caller then allocates as before) for a
  small array (under ``MIN_BYTES``: glibc serves those from memory it
  keeps), a large one (over ``MAX_BYTES``: not worth holding), or a slot
  in use in this thread (a signal handler running another backward in the
  middle of one).
* The buffer is this thread's: another thread gets its own.
* The caller keeps the array only for the call that took it (a result
  made of it would keep the slot in use: correct, but no longer reused).

The memory held is at most one buffer per slot and thread, each at most
``MAX_BYTES``; ``release()`` frees this thread's, and a thread's go with it.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

#: Arrays smaller than this are allocated fresh: glibc keeps freed blocks this
#: small in its heap, so reusing them saves nothing.
MIN_BYTES = 1 << 20
#: Arrays larger than this are allocated fresh, so that a thread holds at most
#: this much per slot.
MAX_BYTES = 1 << 28

_local = threading.local()


class _Slot:
    __slots__ = ("owner", "start")

    def __init__(self, nbytes):
        # the array that owns the memory: every view of it, however derived, refers to it
        self.owner = np.empty(nbytes + 64, dtype=np.uint8)
        self.start = (-self.owner.ctypes.data) % 64  # 64-byte aligned (NumPy aligns to 16)

    @property
    def nbytes(self):
        return self.owner.nbytes - 64

    def in_use(self):
        # references: this slot's attribute and getrefcount's argument; any more is a view
        return sys.getrefcount(self.owner) > 2


def _slots():
    slots = getattr(_local, "slots", None)
    if slots is None:
        slots = _local.slots = {}  # name -> _Slot
    return slots


def take(slot, shape, dtype):
    """This thread's scratch array for ``slot``, uninitialised, or ``None``.

    Parameters
    ----------
    slot : str
        The use ("dz", "dx_lowrank"); each has its own buffer.
    shape : tuple of int
    dtype : numpy.dtype
        float32 or float64 (any fixed-size dtype works).

    Returns
    -------
    ndarray or None
        A C-contiguous, writeable, 64-byte aligned array of ``shape`` and
        ``dtype`` that shares memory with nothing alive; the slot is in use
        until it and every view of it are garbage (the caller's frame ends).
        ``None`` where the caller should allocate instead (the module
        docstring's rules).
    """
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if not MIN_BYTES <= nbytes <= MAX_BYTES:
        return None
    slots = _slots()
    entry = slots.get(slot)
    if entry is not None and entry.in_use():
        return None  # a nested call allocates its own
    if entry is None or entry.nbytes < nbytes:
        entry = None
        slots.pop(slot, None)  # the old buffer goes before the new one is allocated
        entry = slots[slot] = _Slot(nbytes)
    return entry.owner[entry.start:entry.start + nbytes].view(dtype).reshape(shape)


def release():
    """Free this thread's scratch buffers that are not in use at the moment."""
    slots = _slots()
    for name in list(slots):
        if not slots[name].in_use():
            del slots[name]


def held_bytes():
    """Bytes of scratch buffers this thread holds."""
    return sum(e.nbytes for e in _slots().values())
