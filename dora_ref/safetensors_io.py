"""safetensors files as NumPy arrays: read tensor by tensor, write streaming.

Used by ``dora_ref.peft`` and the ``dora-ref merge`` command, which must hold
about one tensor in memory, not the model. Reading uses the ``safetensors``
package; bfloat16 and float8 tensors, which its NumPy API refuses, are read
from the file's documented layout (an 8-byte header length, a JSON header,
then raw little-endian data) and typed with ``ml_dtypes``. Nothing here
unpickles: ``.bin``/``.pt`` checkpoints are refused with a note on how to
convert them.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"

_PICKLE_NOTE = (
    "dora_ref never unpickles: loading a pickle can run arbitrary code. Convert it once, "
    "in an environment you trust, with\n"
    "    python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('{src}', weights_only=True), '{dst}')\"\n"
    "or re-save the model/adapter with save_pretrained(..., safe_serialization=True)."
)


# ---------------------------------------------------------------------------
# safetensors reading and streaming writing
# ---------------------------------------------------------------------------


def _numpy_dtype(st_dtype):
    """The NumPy dtype of a safetensors dtype string ("F32", "BF16", ...)."""
    import ml_dtypes

    table = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16,
        "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
        "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
        "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    }  # fmt: skip
    if st_dtype not in table:
        raise ValueError(f"safetensors dtype {st_dtype!r} is not supported")
    return np.dtype(table[st_dtype])


def _safetensors_dtype(dtype):
    """The safetensors dtype string of a NumPy dtype (inverse of ``_numpy_dtype``)."""
    for name in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16",
                 "I8", "U64", "U32", "U16", "U8", "BOOL"):  # fmt: skip
        if _numpy_dtype(name) == np.dtype(dtype):
            return name
    raise ValueError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors")


def _refuse_pickle(path):
    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise ValueError(
            f"{path}: this is a PyTorch pickle checkpoint. "
            + _PICKLE_NOTE.format(src=path, dst=path.with_suffix(".safetensors"))
        )


class SafetensorsFile:
    """One safetensors file, read tensor by tensor with the ``safetensors`` NumPy API.

    Tensors are read only when asked for, so memory stays about one tensor.
    dtypes NumPy cannot name (bfloat16, float8) are read from the file's
    documented layout (an 8-byte little-endian header length, a JSON header
    with ``data_offsets``, then the raw little-endian data) and viewed with
    ``ml_dtypes``: ``safetensors``' NumPy API raises on them.

    Parameters
    ----------
    path : str or os.PathLike

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is a pickle (``.bin``), or is not a valid safetensors file
        (e.g. truncated): the message names the file and the parser's reason.
    """

    def __init__(self, path):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        _refuse_pickle(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such safetensors file: {self.path}")
        try:
            self._file = safe_open(str(self.path), framework="np")
        except SafetensorError as e:
            raise ValueError(
                f"{self.path} is not a valid safetensors file ({e}); "
                f"it may be truncated or not fully downloaded ({self.path.stat().st_size} bytes)"
            ) from None
        self._header = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Release the file."""
        self._file = None

    def keys(self):
        """The tensor names, sorted (as ``safe_open`` lists them)."""
        return list(self._file.keys())

    def metadata(self):
        """The ``__metadata__`` dict of the header (str to str), or None."""
        return self._file.metadata()

    def st_dtype(self, key):
        """The safetensors dtype string of tensor ``key`` ("F32", "BF16", ...)."""
        return self._file.get_slice(key).get_dtype()

    def dtype(self, key):
        """The NumPy dtype of tensor ``key`` (``ml_dtypes.bfloat16`` for BF16)."""
        return _numpy_dtype(self.st_dtype(key))

    def shape(self, key):
        """The shape of tensor ``key``, as a tuple, without reading its data."""
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key):
        """Read tensor ``key`` into a new NumPy array of its stored dtype and shape."""
        st_dtype = self.st_dtype(key)
        if st_dtype not in ("BF16", "F8_E4M3", "F8_E5M2"):
            return self._file.get_tensor(key)
        if self._header is None:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self._header = (8 + n, json.loads(fh.read(n)))
        start, header = self._header
        begin, end = header[key]["data_offsets"]
        dtype = _numpy_dtype(st_dtype)
        count = (end - begin) // dtype.itemsize
        with open(self.path, "rb") as fh:
            fh.seek(start + begin)
            data = np.fromfile(fh, dtype=dtype.newbyteorder("<"), count=count)
        if data.size != count:  # safe_open checks this; a file changed under us
            raise ValueError(f"{self.path}: tensor {key!r} is truncated")
        return data.reshape(self.shape(key))


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time (memory: one tensor).

    The ``safetensors`` package serialises only a complete in-memory dict,
    which for a merged model means holding the whole model. This writer
    emits the same format (header first, then each tensor's little-endian
    bytes, in header order, 8-byte aligned header), so the header must be
    known up front: the keys, dtypes and shapes, e.g. those of the base.
    The file appears at ``path`` only when ``close()`` succeeds (it is
    written to ``path + ".partial"`` and renamed).

    Parameters
    ----------
    path : str or os.PathLike
    specs : list of (str, numpy dtype, tuple)
        Key, dtype and shape of every tensor, in the order they will be written.
    metadata : dict of str to str, optional
        The header's ``__metadata__`` (e.g. ``{"format": "pt"}``).

    Raises
    ------
    ValueError
        From ``write`` if a tensor comes out of order or with a dtype or
        shape other than announced; from ``close`` if tensors are missing.
    """

    def __init__(self, path, specs, metadata=None):
        self.path = Path(path)
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._specs = []
        for key, dtype, shape in specs:
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[key] = {
                "dtype": _safetensors_dtype(dtype),
                "shape": [int(d) for d in shape],
                "data_offsets": [offset, offset + nbytes],
            }
            self._specs.append((key, dtype, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._fh = open(self._partial, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, key, array):
        """Append tensor ``key``; it must be the next announced one, same dtype and shape."""
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {key!r} was not announced in the header")
        want_key, dtype, shape = self._specs[self._next]
        array = np.asarray(array)
        if key != want_key or array.dtype != dtype or array.shape != shape:
            raise ValueError(
                f"{self.path}: expected tensor {want_key!r} {dtype} {shape} next, "
                f"got {key!r} {array.dtype} {array.shape}"
            )
        self._fh.write(np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes())
        self._next += 1

    def close(self):
        """Finish the file and move it into place."""
        self._fh.close()
        if self._next != len(self._specs):
            self._partial.unlink()
            missing = [k for k, _, _ in self._specs[self._next:]]
            raise ValueError(f"{self.path}: {len(missing)} tensor(s) never written: {missing[:5]}")
        os.replace(self._partial, self.path)

    def abort(self):
        """Drop the partial file."""
        self._fh.close()
        self._partial.unlink(missing_ok=True)


class BaseWeights:
    """The tensors of a base model: one safetensors file, or a model directory.

    A directory as ``save_pretrained`` writes it holds ``model.safetensors``
    or shards listed in ``model.safetensors.index.json`` (its ``weight_map``
    maps each key to its shard). Files are opened lazily and tensors read one
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
        ``dora_ref.peft.resolve_fan_in_fan_out`` takes ``model_type`` from.

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
            if index_path.is_file():
                try:
                    self.index = json.loads(index_path.read_text())
                except ValueError as e:
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
                    if not f.is_file():
                        raise FileNotFoundError(f"{index_path} names shard {f.name}, which is missing")
            elif single.is_file():
                self.files = [single]
                self.weight_map = None
            else:
                pickles = sorted(p.name for p in path.glob("*.bin"))
                if pickles:
                    _refuse_pickle(path / pickles[0])
                raise FileNotFoundError(
                    f"{path}: no {SINGLE_FILE} or {SHARD_INDEX} in this directory"
                )
        else:
            _refuse_pickle(path)
            if not path.is_file():
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
            if path.is_file():
                try:
                    cfg = json.loads(path.read_text())
                except ValueError as e:
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
