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

* ``take`` returns ``None`` (the caller then allocates as before) for a
  small array (under ``MIN_BYTES``: glibc serves those from memory it
  keeps), a large one (over ``MAX_BYTES``: not worth holding), or a slot
  already taken in this thread and not yet given back (a signal handler
  running another backward in the middle of one).
* The buffer is this thread's: another thread gets its own.
* ``give_back`` is called in a ``finally``: an exception leaves no slot taken.

The memory held is at most one buffer per slot and thread, each at most
``MAX_BYTES``; ``release()`` frees this thread's, and a thread's go with it.
"""
from __future__ import annotations

import threading

import numpy as np

#: Arrays smaller than this are allocated fresh: glibc keeps freed blocks this
#: small in its heap, so reusing them saves nothing.
MIN_BYTES = 1 << 20
#: Arrays larger than this are allocated fresh, so that a thread holds at most
#: this much per slot.
MAX_BYTES = 1 << 28

_local = threading.local()


def _slots():
    slots = getattr(_local, "slots", None)
    if slots is None:
        slots = _local.slots = {}  # name -> [buffer (uint8 ndarray), taken (bool)]
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
        A C-contiguous, writeable array of ``shape`` and ``dtype`` that
        shares memory with nothing the caller holds; ``None`` where the
        caller should allocate instead (the module docstring's rules). Give
        it back with ``give_back(slot, array)`` when done.
    """
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if not MIN_BYTES <= nbytes <= MAX_BYTES:
        return None
    slots = _slots()
    entry = slots.get(slot)
    if entry is None:
        entry = slots[slot] = [None, False]
    elif entry[1]:
        return None  # taken and not given back: a nested call allocates its own
    if entry[0] is None or entry[0].nbytes < nbytes:
        entry[0] = None  # let the old one go before the new one is allocated
        # at least 64-byte aligned (NumPy aligns to 16): every view below starts there
        entry[0] = _aligned_bytes(nbytes)
    entry[1] = True
    return entry[0][:nbytes].view(dtype).reshape(shape)


def give_back(slot, array):
    """End the use of ``take(slot, ...)``'s array; ``array=None`` does nothing.

    The array must not be used afterwards: the next ``take`` of the slot in
    this thread returns the same memory.
    """
    if array is None:
        return
    entry = _slots().get(slot)
    if entry is not None and entry[0] is not None and np.may_share_memory(array, entry[0]):
        entry[1] = False


def release():
    """Free this thread's scratch buffers that are not taken at the moment."""
    slots = _slots()
    for name in list(slots):
        if not slots[name][1]:
            del slots[name]


def held_bytes():
    """Bytes of scratch buffers this thread holds."""
    return sum(e[0].nbytes for e in _slots().values() if e[0] is not None)


def _aligned_bytes(nbytes, align=64):
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]
