"""safetensors files as NumPy arrays: read tensor by tensor, write streaming.

Used by ``dora_ref.formats.peft`` and the ``dora-ref merge`` command, which must hold
about one tensor in memory, not the model. The format is small enough to read
here in full: an 8-byte little-endian header length n, n bytes of JSON header
(each tensor's ``dtype``, ``shape`` and ``data_offsets`` into the data that
follows, optional ``__metadata__``), then the raw little-endian data, the
tensors back to back. The reader checks every field the way the
``safetensors`` package does (offsets in order, no gaps or overlaps, sizes
that match the shapes, the data ending where the file ends), and reads with
``pread`` into a new array: no memory map, so a file truncated while it is
open is an error naming it, never a SIGBUS (the ``safetensors`` package maps
the file; touching a mapped page past a new end of file kills the process).
Before each read the file's size and modification time are compared with
those seen at open.

bfloat16 and float8 arrays are typed with ``ml_dtypes``, imported only when
such a tensor is read (``read_bits`` gives their raw bits without it). Nothing
here unpickles: ``.bin``/``.pt`` checkpoints are refused with a note on how to
convert them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import stat
import struct
import sys
import threading
from pathlib import Path

import numpy as np

from .bf16_bits import bfloat16_bits_to_float32, float32_to_bfloat16_bits  # noqa: F401 (0.1's names)

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
#: the ``safetensors`` package refuses headers above 100 MB; so do we
MAX_HEADER_BYTES = 100_000_000

_PICKLE_NOTE = (
    "dora_ref never unpickles: loading a pickle can run arbitrary code. Convert it once, "
    "in an environment you trust, with\n"
    "    python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('{src}', weights_only=True), '{dst}')\"\n"
    "or re-save the model/adapter with save_pretrained(..., safe_serialization=True)."
)


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------

# safetensors dtype string -> (NumPy dtype name, itemsize); the ml_dtypes ones are looked up lazily
_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "I64": ("int64", 8),
    "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U64": ("uint64", 8),
    "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}  # fmt: skip
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
_BY_NAME = {name: st for st, (name, _) in _DTYPES.items()}
#: unsigned integer dtype with the same bytes, for reading a tensor's raw bits
_BITS = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _numpy_dtype(st_dtype):
    """The NumPy dtype of a safetensors dtype string ("F32", "BF16", ...).

    ``ml_dtypes`` is imported only for BF16 and F8 (its import costs about a second).
    """
    if st_dtype not in _DTYPES:
        raise ValueError(f"safetensors dtype {st_dtype!r} is not supported")
    name = _DTYPES[st_dtype][0]
    if name in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _safetensors_dtype(dtype):
    """The safetensors dtype string of a NumPy dtype (inverse of ``_numpy_dtype``)."""
    dtype = np.dtype(dtype)
    st = _BY_NAME.get(dtype.name)
    if st is None:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return st


def _refuse_pickle(path):
    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise ValueError(
            f"{path}: this is a PyTorch pickle checkpoint. "
            + _PICKLE_NOTE.format(src=path, dst=path.with_suffix(".safetensors"))
        )


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _no_constant(name):
    # Python's json reads NaN, Infinity and -Infinity; JSON (RFC 8259) and the
    # safetensors package do not
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):  # 1e999: JSON allows it, serde_json (safetensors) refuses it
        raise ValueError(f"the number {text} is out of range")
    return value


#: The largest element count (and dimension) a tensor may have: a shape whose
#: running product exceeds it (a dimension of 2**63, or [2**40, 2**40, 0]) was
#: accepted with no data and failed in NumPy, naming no tensor (issue:
#: adversarial s5); the safetensors package refuses it in its header.
_MAX_SIZE = 2**63 - 1


def parse_header(raw, data_bytes):
    """Check a safetensors JSON header against the data size; return its tensors and metadata.

    The checks are those of the ``safetensors`` package: a JSON object; an
    optional ``__metadata__`` object of str to str; for every other key an
    object with ``dtype`` (a known dtype string), ``shape`` (a list of
    non-negative integers) and ``data_offsets`` ([begin, end] with
    end - begin = prod(shape) * itemsize); the tensors, in offset order,
    cover the data exactly, with no gap and no overlap.

    Parameters
    ----------
    raw : bytes
        The header (the n bytes after the 8-byte length).
    data_bytes : int
        The size of the data part of the file (file size - 8 - n).

    Returns
    -------
    tensors : dict of str to (str, tuple of int, int, int)
        Key -> (dtype string, shape, begin, end), in offset order.
    metadata : dict of str to str, or None

    Raises
    ------
    ValueError
        Naming the first field found malformed.
    """
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant, parse_float=_finite_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise ValueError("the header's __metadata__ must be an object of string values")
    tensors = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise ValueError(f"tensor {key!r}: expected an object with dtype, shape, data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(
                f"tensor {key!r}: dtype {dtype!r} is not one dora_ref reads ({', '.join(_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):  # fmt: skip
            raise ValueError(f"tensor {key!r}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        size = 1
        for d in shape:  # as safetensors computes it: in order, refused on a 64-bit overflow
            size *= d
            if size > _MAX_SIZE or d > _MAX_SIZE:  # (and each dimension: NumPy takes none past it)
                raise ValueError(f"tensor {key!r}: shape {tuple(shape)} overflows a 64-bit size")
        nbytes = size * _DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(
                f"tensor {key!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but "
                f"{dtype} {tuple(shape)} needs {nbytes}"
            )
        tensors.append((offsets[0], offsets[1], key, dtype, tuple(shape)))
    tensors.sort(key=lambda t: (t[0], t[1]))
    end = 0
    for begin, stop, key, _, _ in tensors:
        if begin != end:
            why = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes"
            raise ValueError(f"tensor {key!r}: data_offsets begin at {begin}, which {why}")
        end = stop
    if end != data_bytes:
        raise ValueError(f"the tensors end at byte {end} of the data, but the file holds {data_bytes}")
    return {key: (dtype, shape, begin, stop) for begin, stop, key, dtype, shape in tensors}, metadata


# Opening a named pipe for reading waits for a writer: opened non-blocking,
# so that fstat can refuse what is not a regular file at once (a regular
# file reads the same either way).
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_regular(path):
    """A read-only descriptor of ``path`` if it is a regular file.

    Raises FileNotFoundError (missing), IsADirectoryError, ValueError (a pipe,
    a device or a socket: reading one could wait for ever), or the OS's own
    error (permission denied, ...).
    """
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{path} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file (a pipe or a device?)")
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


#: The largest JSON file read (a config, an adapter config, a shard index): as
#: the safetensors header's limit; a larger one is not such a file.
MAX_TEXT_BYTES = 100_000_000


def read_regular_text(path):
    """The text of the regular file ``path`` (UTF-8), never waiting on a pipe.

    Raises as ``open_regular``, and ValueError naming the file if it is not
    UTF-8 or is larger than ``MAX_TEXT_BYTES``.
    """
    fd = open_regular(path)
    with open(fd, "rb", closefd=True) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(MAX_TEXT_BYTES + 1) if size <= MAX_TEXT_BYTES else b""  # bounded: it may grow meanwhile
        if size > MAX_TEXT_BYTES or len(raw) > MAX_TEXT_BYTES:
            raise ValueError(f"{path}: {max(size, len(raw))} bytes, more than the {MAX_TEXT_BYTES} a config "
                             "or index file here may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _read_into(fd, buf, offset):
    """Fill ``buf`` (a writable byte memoryview) from ``fd`` at ``offset``; the bytes read."""
    done = 0
    while done < len(buf):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [buf[done:]], offset + done)
        else:  # pragma: no cover  (Windows)
            os.lseek(fd, offset + done, os.SEEK_SET)
            n = os.readv(fd, [buf[done:]])
        if n == 0:
            break
        done += n
    return done


class SafetensorsFile:
    """One safetensors file, read tensor by tensor.

    The header is read and checked when the file is opened; tensors are read
    only when asked for, so memory stays about one tensor. Reads use
    ``pread``, not a memory map (see the module docstring: a file truncated
    while open is a ValueError, not a SIGBUS).

    Parameters
    ----------
    path : str or os.PathLike

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    IsADirectoryError, PermissionError, OSError
        If it cannot be opened (the OS's own reason and the path).
    ValueError
        If the file is a pickle (``.bin``), not a regular file, or not a
        valid safetensors file (e.g. truncated): the message names the file
        and the reason.
    """

    def __init__(self, path):
        self.path = Path(path)
        _refuse_pickle(self.path)
        try:
            self._fd = open_regular(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such safetensors file: {self.path}") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"{self.path} is a directory, not a safetensors file") from None
        # any other OSError (permission denied, ...) propagates with the OS's own reason
        try:
            st = os.fstat(self._fd)
            self._stamp = (st.st_size, st.st_mtime_ns)
            self._tensors, self._metadata, self._data_start = self._read_header(st.st_size)
        except BaseException:
            self.close()
            raise

    def _read_header(self, size):
        def invalid(why):
            return ValueError(
                f"{self.path} is not a valid safetensors file ({why}); "
                f"it may be truncated or not fully downloaded ({size} bytes)"
            )

        head = bytearray(8)
        if size < 8 or _read_into(self._fd, memoryview(head), 0) != 8:
            raise invalid("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise invalid(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise invalid(f"header length {n} runs past the end of the file")
        raw = bytearray(n)
        if _read_into(self._fd, memoryview(raw), 8) != n:
            raise invalid("the header is cut short")
        try:
            tensors, metadata = parse_header(bytes(raw), size - 8 - n)
        except ValueError as e:
            raise invalid(e) from None
        return tensors, metadata, 8 + n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def close(self):
        """Release the file."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def fileno(self):
        """The open file descriptor (for copying a tensor's bytes)."""
        return self._fd

    def keys(self):
        """The tensor names, sorted (as ``safetensors.safe_open`` lists them)."""
        return sorted(self._tensors)

    def keys_in_file_order(self):
        """The tensor names in the order their data is stored."""
        return list(self._tensors)

    def metadata(self):
        """The ``__metadata__`` dict of the header (str to str), or None."""
        return None if self._metadata is None else dict(self._metadata)

    def _info(self, key):
        if key not in self._tensors:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        return self._tensors[key]

    def st_dtype(self, key):
        """The safetensors dtype string of tensor ``key`` ("F32", "BF16", ...)."""
        return self._info(key)[0]

    def dtype(self, key):
        """The NumPy dtype of tensor ``key`` (``ml_dtypes.bfloat16`` for BF16)."""
        return _numpy_dtype(self.st_dtype(key))

    def shape(self, key):
        """The shape of tensor ``key``, as a tuple, without reading its data."""
        return self._info(key)[1]

    def byte_range(self, key):
        """(offset in the file, number of bytes) of tensor ``key``'s data."""
        _, _, begin, end = self._info(key)
        return self._data_start + begin, end - begin

    def check_unchanged(self):
        """Raise ValueError if the file's size or modification time changed since it was opened."""
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise ValueError(
                f"{self.path} changed while it was being read (size {self._stamp[0]} -> {st.st_size} "
                f"bytes); was it overwritten or truncated? Read it again once it is complete"
            )

    def read_bits(self, key, *, out=None):
        """Tensor ``key``'s raw little-endian bits as unsigned integers of its itemsize, shaped.

        A bfloat16 tensor gives uint16 (no ``ml_dtypes`` needed); BOOL gives uint8.
        ``out``, if given, is filled instead of a new array: a writable
        C-contiguous array of that unsigned dtype and the tensor's shape
        (ValueError otherwise), e.g. a buffer reused for many tensors.
        """
        st_dtype, shape, _, _ = self._info(key)
        return self._read(key, _BITS[_DTYPES[st_dtype][1]], shape, out)

    def get(self, key):
        """Read tensor ``key`` into a new NumPy array of its stored dtype and shape."""
        st_dtype, shape, _, _ = self._info(key)
        return self._read(key, _numpy_dtype(st_dtype).newbyteorder("<"), shape)

    def _read(self, key, dtype, shape, out=None):
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        offset, nbytes = self.byte_range(key)
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif not (isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == tuple(shape)
                  and out.flags.c_contiguous and out.flags.writeable):  # fmt: skip
            raise ValueError(f"{self.path}: tensor {key!r} is {np.dtype(dtype).name} {tuple(shape)}; out must be a "
                             f"writable C-contiguous array of that dtype and shape, got "
                             f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")  # fmt: skip
        self.check_unchanged()
        if _read_into(self._fd, memoryview(out.reshape(-1).view(np.uint8)), offset) != nbytes:
            raise ValueError(f"{self.path}: tensor {key!r} is truncated (the file shrank while open)")
        return out


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------


def _write_all(fd, buf):
    buf = memoryview(buf).cast("B")
    while buf:
        buf = buf[os.write(fd, buf):]


def _copy_range(src_fd, dst_fd, offset, nbytes):
    """Append ``nbytes`` of ``src_fd`` from ``offset`` to ``dst_fd`` (kernel copy where it can)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
                if n == 0:
                    break
                done += n
            return done
        except OSError:  # e.g. EXDEV on older kernels, or a filesystem that refuses: copy by hand
            pass
    chunk = bytearray(min(max(nbytes - done, 1), 16 << 20))
    while done < nbytes:
        n = _read_into(src_fd, memoryview(chunk)[: min(len(chunk), nbytes - done)], offset + done)
        if n == 0:
            break
        _write_all(dst_fd, memoryview(chunk)[:n])
        done += n
    return done


def _writeback_starter():
    """Linux ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``, or None elsewhere.

    It starts writing a range of a file's dirty pages to disk and returns
    without waiting for the disk (unless its queue is full): the disk works
    while the merge computes (measured: the final fsync of bench_merge.py's
    794 MB output went from 0.47 s to 0.01 s), and the fsync that
    ``SafetensorsWriter.close`` still does (the guarantee) finds little left.
    Only a hint: where it is missing nothing changes but the time.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # pragma: no cover
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    sync_file_range_write = 2
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, sync_file_range_write)


_start_writeback = _writeback_starter()


# O_DIRECT writes: whole blocks of this size at offsets that are multiples of it
# (4096 covers disks of 512- and 4096-byte logical blocks), from page-aligned
# buffers of _DIRECT_CHUNK bytes (1 to 16 MiB writes all ran at the disk's rate,
# about 1.8 GB/s, on the Intel Xeon machine; docs/performance.md, "The merge command").
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_DIRECT_ALIGN = 4096
_DIRECT_CHUNK = 4 << 20


class _DirectAppender:
    """Append bytes to a file opened with ``O_DIRECT``, one buffer written while the next fills.

    ``O_DIRECT`` moves the bytes from our buffer to the disk without a copy
    in the page cache. A buffered write of a large file needs that many
    bytes of fresh page cache, and fresh memory can be slow: in a virtual
    machine whose host takes back free memory (free page reporting) every
    first touch of such a page costs a trip to the host (measured: 800 MB
    written in 3.9-7.1 s instead of 0.2 s). The merge fsyncs its output
    anyway, so bypassing the page cache costs nothing but the cache.

    Two page-aligned buffers of ``chunk`` bytes: the caller fills one while
    a short-lived thread writes the other (``os.write`` releases the GIL),
    at most one write in flight, in file order; the thread writes through
    its own duplicate of the descriptor. Every write is whole
    ``_DIRECT_ALIGN`` blocks at an aligned offset; ``finish`` writes the
    last partial block buffered. Where the filesystem refuses ``O_DIRECT``
    (``EINVAL``, e.g. some FUSE mounts), the flag is cleared on the file
    and the writes go on buffered; where no thread can be started, each
    write is done by the caller.
    """

    def __init__(self, fd, path, chunk=None):
        self.fd = fd
        self.path = path
        self.chunk = chunk or _DIRECT_CHUNK
        if self.chunk % _DIRECT_ALIGN:
            raise ValueError(f"chunk must be a multiple of {_DIRECT_ALIGN}, got {self.chunk}")
        self._buf, self._spare = mmap.mmap(-1, self.chunk), mmap.mmap(-1, self.chunk)  # page-aligned
        self._fill = 0
        self._inflight = None
        self._error = None

    def append(self, data):
        """Append the bytes of ``data`` (any buffer)."""
        with memoryview(data) as view:
            mv = view.cast("B")
            while mv:
                if self._fill == self.chunk:  # only after a failed write: raises it again
                    self._submit(self.chunk)
                n = min(len(mv), self.chunk - self._fill)
                self._buf[self._fill : self._fill + n] = mv[:n]
                mv = mv[n:]
                self._advance(n)

    def append_from(self, src_fd, offset, nbytes):
        """Append ``nbytes`` of ``src_fd`` from ``offset``, read straight into the buffer; the bytes read."""
        done = 0
        while done < nbytes:
            if self._fill == self.chunk:  # only after a failed write: raises it again
                self._submit(self.chunk)
            n = min(nbytes - done, self.chunk - self._fill)
            with memoryview(self._buf) as view:
                got = _read_into(src_fd, view[self._fill : self._fill + n], offset + done)
            self._advance(got)
            done += got
            if got < n:
                break
        return done

    def _advance(self, n):
        self._fill += n
        if self._fill == self.chunk:
            self._submit(self.chunk)

    def _submit(self, nbytes):
        """Hand the filled buffer's first ``nbytes`` to a thread and go on with the other buffer."""
        self.wait()
        # The thread writes through its own duplicate of the descriptor and closes it: if the
        # caller closes ours meanwhile (an abort, an interrupted start), the number can be reused
        # by another file, and the write still lands in this file (or its unlinked inode).
        fd = os.dup(self.fd)
        thread = threading.Thread(target=self._write, args=(fd, self._buf, nbytes), daemon=True,
                                  name="dora_ref safetensors write")  # fmt: skip
        try:  # (interrupted before the thread began, its duplicate stays open: one descriptor)
            thread.start()
        except RuntimeError:  # no thread to be had (a limit on threads or memory): write it here
            self._write(fd, self._buf, nbytes)
            thread = None
        self._inflight = thread  # only once started: join() refuses a thread that is not
        self._buf, self._spare = self._spare, self._buf
        self._fill = 0

    def _write(self, fd, buf, nbytes):
        try:
            with memoryview(buf) as view:
                mv = view[:nbytes]
                while mv:
                    try:
                        n = os.write(fd, mv)
                    except OSError as e:
                        if e.errno != errno.EINVAL or not self._clear_direct(fd):
                            raise
                        continue
                    mv = mv[n:]
        except BaseException as e:  # handed to the caller's thread by wait()
            self._error = e
        finally:
            os.close(fd)

    @staticmethod
    def _clear_direct(fd):
        """Turn O_DIRECT off on the file (the filesystem refused it); False if it was off."""
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not flags & _O_DIRECT:
            return False
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)  # (the flag is the open file's: shared by dups)
        return True

    def wait(self):
        """Wait for the write in flight; raise its error, naming the file (again on every later call)."""
        if self._inflight is not None:
            self._inflight.join()
            self._inflight = None
        e = self._error
        if isinstance(e, OSError):
            raise _named(e, self.path) from e
        if e is not None:
            raise RuntimeError(f"writing {self.path} failed: {e!r}") from e

    def finish(self):
        """Write the rest and wait: the whole blocks with O_DIRECT, the last partial block buffered.

        The partial block is not padded: a file that fits a quota or a disk
        exactly must not need up to 4095 bytes more to be written.
        """
        whole = self._fill - self._fill % _DIRECT_ALIGN
        tail = bytes(self._buf[whole : self._fill])
        if whole:
            self._submit(whole)
        self.wait()
        if tail:
            self._clear_direct(self.fd)
            try:
                _write_all(self.fd, tail)
            except OSError as e:
                self._error = e  # named, and raised again by later calls, as a thread's
                raise _named(e, self.path) from e
        self.release()

    def release(self):
        """Drop the buffers (8 MiB); the appender cannot be used after this."""
        self._buf = self._spare = None
        self._fill = 0


def _named(error, path):
    """``error`` (an OSError from a write) as an OSError that names ``path``, the file written."""
    return OSError(error.errno, f"writing {path}: {error.strerror}")


def _open_for_append(path, direct):
    """Open ``path`` new for writing: with O_DIRECT if asked and the filesystem takes it; (fd, direct)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    if direct and _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                raise
    return os.open(path, flags, 0o644), False


def fsync_directory(path):
    """Flush a directory's entries (renames, new files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover  (Windows cannot open directories)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time (memory: one tensor).

    The ``safetensors`` package serialises only a complete in-memory dict,
    which for a merged model means holding the whole model. This writer
    emits the same format (header first, then each tensor's little-endian
    bytes, in header order, 8-byte aligned header), so the header must be
    known up front: the keys, dtypes and shapes, e.g. those of the base.
    Arrays are written from their own buffer (no copy), and ``copy`` moves a
    tensor's bytes from another safetensors file without decoding them.
    The file appears at ``path`` only when ``close()`` succeeds (it is
    written to ``path + ".partial"``, flushed to disk with fsync and renamed).
    Where the OS offers ``O_DIRECT`` (Linux) the bytes go to the disk
    without passing through the page cache, from two 4 MiB buffers, one
    written by a thread while the other fills (the last partial block is
    written buffered; a filesystem that refuses ``O_DIRECT`` gets ordinary
    writes). Otherwise, on Linux, each tensor's bytes start going to disk as
    soon as they are written (``sync_file_range``), so the final fsync waits
    for little.

    Parameters
    ----------
    path : str or os.PathLike
    specs : list of (str, numpy dtype or safetensors dtype string, tuple)
        Key, dtype and shape of every tensor, in the order they will be written.
    metadata : dict of str to str, optional
        The header's ``__metadata__`` (e.g. ``{"format": "pt"}``).
    direct : bool or None, optional
        Write with ``O_DIRECT``: None (the default) or True where the OS has
        it, False for ordinary buffered writes. The file's bytes are the same.

    Raises
    ------
    ValueError
        From ``write``/``copy`` if a tensor comes out of order or with a
        dtype or shape other than announced, or a copied source changed;
        from ``close`` if tensors are missing.
    OSError
        From any method if the disk refuses a write (full, quota), naming
        the file.
    """

    def __init__(self, path, specs, metadata=None, *, direct=None):
        self.path = Path(path)
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._specs = []
        for key, dtype, shape in specs:
            st = dtype if isinstance(dtype, str) and dtype in _DTYPES else _safetensors_dtype(dtype)
            nbytes = math.prod(int(d) for d in shape) * _DTYPES[st][1]
            header[key] = {"dtype": st, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
            self._specs.append((key, st, tuple(int(d) for d in shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._fd, is_direct = _open_for_append(self._partial, direct is not False)
        self._sink = None
        self._write_error = None  # a buffered write's OSError, kept for close()
        self._next = 0
        self._written = 8 + len(raw)  # bytes in the file so far
        try:
            if is_direct:
                self._sink = _DirectAppender(self._fd, self._partial)
            self._append(struct.pack("<Q", len(raw)) + raw)
        except BaseException:  # no buffers, or the header refused: no file, no descriptor left
            self.abort()
            raise

    def _check_open(self):
        if self._fd is None:
            raise ValueError(f"{self.path}: the writer is closed (after close() or abort())")

    def _append(self, data):
        if self._sink is not None:
            self._sink.append(data)
        else:
            with self._naming_errors():
                _write_all(self._fd, data)

    @contextlib.contextmanager
    def _naming_errors(self):
        """A buffered write's OSError (disk full, quota) names the file, as the O_DIRECT path's does."""
        try:
            yield
        except OSError as e:
            if e.errno is None:
                raise
            self._write_error = e  # close() raises it again, as the O_DIRECT path's wait() does
            raise _named(e, self._partial) from e

    def _wrote(self, nbytes):
        """Account for a tensor's bytes; buffered, start writing them to disk (see ``_writeback_starter``)."""
        if self._sink is None and _start_writeback is not None:
            _start_writeback(self._fd, self._written, nbytes)
        self._written += nbytes
        self._next += 1

    def _expect(self, key, st_dtype, shape):
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {key!r} was not announced in the header")
        want_key, want_st, want_shape, nbytes = self._specs[self._next]
        if key != want_key or st_dtype != want_st or tuple(shape) != want_shape:
            raise ValueError(
                f"{self.path}: expected tensor {want_key!r} {want_st} {want_shape} next, "
                f"got {key!r} {st_dtype} {tuple(shape)}"
            )
        return nbytes

    def write(self, key, array, *, bits=False):
        """Append tensor ``key``; it must be the next announced one, same dtype and shape.

        With ``bits=True`` ``array`` holds the raw bits as unsigned integers
        of the announced dtype's itemsize (uint16 for bfloat16), as
        ``SafetensorsFile.read_bits`` returns them.
        """
        self._check_open()
        array = np.asarray(array)
        if bits:
            want = self._specs[self._next][1] if self._next < len(self._specs) else None
            if want is None or array.dtype.kind != "u" or array.dtype.itemsize != _DTYPES[want][1]:
                raise ValueError(f"{self.path}: tensor {key!r}: bits must be unsigned integers of the "
                                 f"announced dtype's size, got {array.dtype}")  # fmt: skip
            st = want
        else:
            st = _safetensors_dtype(array.dtype)
        nbytes = self._expect(key, st, array.shape)
        self._append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8))
        self._wrote(nbytes)

    def copy(self, key, source):
        """Append tensor ``key`` by copying its bytes from ``source`` (a ``SafetensorsFile``) unchanged."""
        self._check_open()
        offset, nbytes = source.byte_range(key)
        self._expect(key, source.st_dtype(key), source.shape(key))
        source.check_unchanged()
        if self._sink is not None:
            copied = self._sink.append_from(source.fileno(), offset, nbytes)
        else:
            with self._naming_errors():
                copied = _copy_range(source.fileno(), self._fd, offset, nbytes)
        if copied != nbytes:
            raise ValueError(f"{source.path}: tensor {key!r} is truncated (the file shrank while open)")
        self._wrote(nbytes)

    def close(self):
        """Finish the file, flush it to disk and move it into place."""
        self._check_open()
        try:
            if self._sink is not None:
                self._sink.wait()  # a write that failed is the error to report, not the tensors it left out
            if self._write_error is not None:
                raise _named(self._write_error, self._partial) from self._write_error
            if self._next != len(self._specs):
                missing = [k for k, _, _, _ in self._specs[self._next:]]
                raise ValueError(f"{self.path}: {len(missing)} tensor(s) never written: {missing[:5]}")
            if self._sink is not None:
                self._sink.finish()
                self._sink = None
            os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        fd, self._fd = self._fd, None  # (before the close: an interrupt can never close it twice)
        try:
            os.close(fd)
            os.replace(self._partial, self.path)
        except BaseException:  # (an interrupt between the two included: no partial file left)
            self._partial.unlink(missing_ok=True)
            raise

    def abort(self):
        """Drop the partial file (a no-op once closed or aborted)."""
        sink, self._sink = self._sink, None
        try:
            if sink is not None:
                try:
                    sink.wait()  # (a write in flight has its own descriptor: waited for to be tidy)
                except Exception:
                    pass  # the write that failed is dropped with the file
                sink.release()
        finally:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
                self._partial.unlink(missing_ok=True)


class BaseWeights:
    """The tensors of a base model: one safetensors file, or a model directory.

    A directory as ``save_pretrained`` writes it holds ``model.safetensors``
    or shards listed in ``model.safetensors.index.json`` (its ``weight_map``
    maps each key to its shard); one that holds both is read as transformers
    reads it: ``model.safetensors``, the index left alone. Files are opened lazily and tensors read one
    at a time.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.safetensors`` file or a model directory.

    Attributes
    ----------
    files : list of pathlib.Path
        The safetensors files, in order.
    weight_map : dict of str to pathlib.Path
        Each tensor key's file.
    index : dict or None
        The parsed shard index, if there is one.
    model_config : dict or None
        The model's ``config.json`` (read when first asked for), which
        ``dora_ref.formats.peft.resolve_fan_in_fan_out`` takes ``model_type`` from.

    Raises
    ------
    FileNotFoundError
        If neither a file nor a directory with safetensors weights is found
        (a directory with only ``pytorch_model.bin`` gets a ValueError that
        explains why pickles are refused).
    ValueError
        On a malformed index, or a shard it names that is missing or invalid.
    """

    def __init__(self, path):
        path = Path(path)
        self.path = path
        self.index = None
        if path.is_dir():
            index_path, single = path / SHARD_INDEX, path / SINGLE_FILE
            if single.is_file() and os.path.lexists(index_path):
                # transformers' from_pretrained loads model.safetensors before it looks for an
                # index: with both, the merge read the shards, and its model differed from the
                # one transformers gives (an adversary, session 23). The index is then not read
                self.files = [single]
                self.weight_map = None
            elif os.path.lexists(index_path):  # a pipe, a folder, a broken link there: refused, not passed over
                text = read_regular_text(index_path)
                try:
                    self.index = json.loads(text)
                except (ValueError, RecursionError) as e:  # nested deeper than Python's stack
                    raise ValueError(f"{index_path}: not valid JSON ({e})") from None
                wm = self.index.get("weight_map") if isinstance(self.index, dict) else None
                if not isinstance(wm, dict) or not all(
                    isinstance(v, str) and v and Path(v).name == v for v in wm.values()
                ):
                    raise ValueError(
                        f"{index_path}: field 'weight_map' must be an object of tensor key -> shard "
                        f"file name (in this directory), got "
                        f"{type(wm).__name__ if not isinstance(wm, dict) else 'other values'}"
                    )
                self.weight_map = {k: path / v for k, v in wm.items()}
                self.files = list(dict.fromkeys(self.weight_map.values()))
                for f in self.files:
                    if not f.exists():
                        raise FileNotFoundError(f"{index_path} names shard {f.name}, which is missing")
            elif single.exists():
                self.files = [single]
                self.weight_map = None
            else:
                pickles = sorted(p.name for p in path.glob("*.bin"))
                if pickles:
                    _refuse_pickle(path / pickles[0])
                adapter = (path / "adapter_config.json").exists()
                raise FileNotFoundError(
                    f"{path}: no {SINGLE_FILE} or {SHARD_INDEX} in this directory"
                    + ("; it holds adapter_config.json, a PEFT adapter: are the base and the "
                       "adapter given in the wrong order?" if adapter else "")
                )
        else:
            _refuse_pickle(path)
            if not path.exists():
                raise FileNotFoundError(f"no such file or directory: {path}")
            self.files = [path]
            self.weight_map = None
        self._open = {}
        self._model_config = False  # not read yet
        if self.weight_map is None:
            self.weight_map = {k: self.files[0] for k in self._handle(self.files[0]).keys()}
        else:
            for f in self.files:
                have = set(self._handle(f).keys())
                missing = [k for k, v in self.weight_map.items() if v == f and k not in have]
                if missing:
                    raise ValueError(f"{f}: the index lists {missing[:5]} but the shard lacks them")

    @property
    def model_config_path(self):
        """The model's ``config.json``: in the directory, or beside the file."""
        return (self.path if self.path.is_dir() else self.path.parent) / "config.json"

    @property
    def model_config(self):
        """The parsed ``config.json`` (``model_type``, ...), or None if there is none.

        Raises ValueError if it is not a JSON object.
        """
        if self._model_config is False:
            path, cfg = self.model_config_path, None
            if os.path.lexists(path):  # a broken link too: refused, not passed over
                text = read_regular_text(path)
                try:
                    cfg = json.loads(text)
                except (ValueError, RecursionError) as e:  # nested deeper than Python's stack
                    raise ValueError(f"{path}: not valid JSON ({e})") from None
                if not isinstance(cfg, dict):
                    raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
            self._model_config = cfg
        return self._model_config

    def _handle(self, f):
        if f not in self._open:
            self._open[f] = SafetensorsFile(f)
        return self._open[f]

    def file_keys(self, f):
        """The keys stored in file ``f``, sorted."""
        return self._handle(f).keys()

    def handle(self, f):
        """The open ``SafetensorsFile`` of file ``f``."""
        return self._handle(f)

    def keys(self):
        """Every tensor key."""
        return list(self.weight_map)

    def __contains__(self, key):
        return key in self.weight_map

    def shape(self, key):
        """Stored shape of ``key`` (no data read)."""
        return self._handle(self.weight_map[key]).shape(key)

    def dtype(self, key):
        """Stored NumPy dtype of ``key``."""
        return self._handle(self.weight_map[key]).dtype(key)

    def get(self, key):
        """Read tensor ``key`` in its stored dtype."""
        if key not in self.weight_map:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        return self._handle(self.weight_map[key]).get(key)


def load_base_weights(path, keys=None):
    """Read base model tensors from safetensors into NumPy arrays.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.safetensors`` file, or a model directory (``model.safetensors``
        or shards with ``model.safetensors.index.json``).
    keys : iterable of str, optional
        Read only these tensors (default: all).

    Returns
    -------
    dict of str to ndarray
        In the stored dtypes; bfloat16 as ``ml_dtypes.bfloat16``.

    Raises
    ------
    FileNotFoundError, ValueError, KeyError
        See ``BaseWeights``; KeyError for a requested key that is absent.
    """
    base = BaseWeights(path)
    return {k: base.get(k) for k in (base.keys() if keys is None else keys)}
