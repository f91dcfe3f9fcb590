"""``dora-ref merge BASE ADAPTER [ADAPTER ...] OUT``: merge PEFT adapters without PyTorch.

BASE is a ``.safetensors`` file or a model directory as ``save_pretrained``
writes it (``model.safetensors``, or shards with
``model.safetensors.index.json``). Each ADAPTER is a PEFT adapter directory
(DoRA or plain LoRA); several are merged in the order given, as PEFT 0.21
merges several active adapters (each DoRA norm from the bare base weight,
see ``dora_ref.formats.peft.merge_weight``).

Tensors of an adapter's ``modules_to_save`` (e.g. a classification head
trained in full) replace the base's, cast to the base dtype, as in PEFT's
``merge_and_unload``.

OUT gets the base's keys, dtypes, shapes and file layout: a file for a file
BASE; a directory for a directory BASE, with the same shard names, the index,
and the base's other small files (``config.json``, tokenizer files, ...)
copied, so ``AutoModel.from_pretrained(OUT)`` loads the merged model.

Which base weights are stored (in, out) (GPT-2 ``Conv1D``, PEFT's
``fan_in_fan_out``) is not recorded in a checkpoint. A non-square weight's
shape tells; a square one is settled by ``--fan-in-fan-out PATTERN`` (a regex
of the modules stored (in, out), matched as PEFT matches ``rank_pattern``
keys; ``''`` for none), else by the ``model_type`` in the base's
``config.json``, else by the adapter's ``fan_in_fan_out`` when its non-square
modules corroborate it; otherwise the command stops and says so
(``dora_ref.formats.peft.resolve_fan_in_fan_out``): it never guesses.

OUT must not exist (for a directory BASE: may be an empty directory) unless
``--force``, and may not be, or lie inside, BASE or an ADAPTER directory.
Without ``--force`` this holds at the end too: the output is moved in only if
OUT is still absent (or an empty directory), in one atomic step, so of two
runs into one new OUT exactly one succeeds; the other stops with 'appeared
while this merge ran' and leaves OUT as it is.

Crash safety: the output is written into a temporary sibling of OUT
(``.<OUT name>.dora-ref-tmp-<pid>-<random>``; an OUT name too long for that
is cut and followed by a digest of it), every file flushed to disk
(fsync) and the directory too, then moved into place by one rename. With
``--force`` an existing OUT directory is swapped with the new one
atomically (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere the old OUT is
first renamed aside, so a kill between the two renames leaves no OUT), and
the old one is removed afterwards. So a reader sees OUT absent, the old
complete output, or the new complete output, never a mix. A kill leaves at
most the temporary sibling(s); the next ``dora-ref merge`` to the same OUT
removes those whose process is gone.

Tensors are read, merged and written one at a time: every stored value is
the float32 merge (float64 for a float64 weight) rounded once to the stored
dtype, ties to even. A weight with one DoRA module on a linear view (a
linear (out, in) weight, a convolution kernel) is merged by one C call
(``dora_ref.kernels.c.merge_into``) that reads the stored values (bf16 and
fp16 as their bits, widened as they are loaded) and writes the rounded
result into a buffer reused from tensor to tensor: no float32 copy, no
conversion pass, no new array per tensor. Other weights (several adapters,
plain LoRA, fan-in-fan-out weights, embeddings, rows with zero or extreme
norms) are widened to float32, merged and rounded back, with the same bits;
the conversions run in cache-sized chunks on the cores the machine has idle.
bf16 is handled as raw bits throughout (``ml_dtypes``, a second or two to
import, is never imported for it). A weight above 16M elements is merged a
block of rows at a time. Memory is a copy or two of the largest merged tensor
(float32 ones only on the general path), not the model. Tensors that no
adapter touches are copied byte for byte (``copy_file_range``), never
decoded and never in memory. Each tensor's bytes start going to disk as soon
as they are written, so the final fsync waits for little. Every adapter is
checked against the base's header before anything is written; a merged
weight that is not finite in the stored dtype stops the command (naming the
module, rows and cause) and nothing is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import hashlib
import math
import os
import re
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path

import numpy as np

from . import bf16_bits
from . import peft as P
from . import safetensors_io as S
from ..core.norm import _SMALLEST_SAFE_NORM
from .peft.merge import _as, _from_view_rows
from .peft.orientation import _from_view

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
#: rows of a merged tensor processed at once: about this many elements (64 MB in float32). A
#: Llama projection is one block; blocks bound the memory of larger weights. (Smaller blocks
#: cost more than they save: each merge call opens a parallel region, slow on a busy machine.)
_BLOCK_ELEMENTS = 1 << 24
_TMP_TAG = "dora-ref-tmp"
_OLD_TAG = "dora-ref-old"


def _parser():
    p = argparse.ArgumentParser(
        prog="dora-ref merge",
        description=(
            "Merge PEFT DoRA/LoRA adapters into base safetensors weights with NumPy: "
            "W' = diag(m / ||W0 + s B A||_row) (W0 + s B A) for DoRA, W0 + s B A for LoRA."
        ),
    )
    p.add_argument("base", metavar="BASE", help="base .safetensors file or model directory")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter directory (in order)")
    p.add_argument("out", metavar="OUT", help="output file (file BASE) or directory (directory BASE)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT as a whole (atomically: a kill leaves the old or the new)")
    p.add_argument(
        "--fan-in-fan-out",
        metavar="PATTERN",
        default=None,
        help="regex of the modules whose base weight is stored (in, out) (GPT-2 Conv1D), matched as "
        "PEFT matches rank_pattern keys, e.g. 'c_attn|c_proj|c_fc'; '' for none. Needed only for square "
        "weights that nothing else settles (the command says so)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="list every merged module (by default the first 10)")
    p.add_argument(
        "--allow-zero-norm",
        action="store_true",
        help="merge rows whose norm ||W0 + s B A|| is 0 to zeros instead of failing",
    )
    return p


def _output_files(base, out):
    """(source file, destination file) pairs, and the directory to create (or None)."""
    out = Path(out)
    if base.path.is_dir():
        if out.exists() and not out.is_dir():
            raise ValueError(f"BASE is a directory, so OUT must be a directory; {out} is a file")
        return [(f, out / f.name) for f in base.files], out
    if out.is_dir():
        return [(base.files[0], out / base.files[0].name)], None
    return [(base.files[0], out)], None


def _inside(path, directory):
    """Whether ``path`` is ``directory`` or lies inside it.

    By name (both resolved) and by identity: ``path`` or one of its existing
    ancestors is ``directory``'s device and inode, which a bind mount (or a
    second mount of the same file system) reaches under another name: with
    ``--force``, OUT given as a bind-mounted view of the ADAPTER or BASE
    directory replaced that directory (an adversary, session 23).

    Raises ValueError naming the path that cannot be resolved (a symlink
    loop: RuntimeError before Python 3.13, OSError after).
    """
    resolved = []
    for p in (path, directory):
        try:
            resolved.append(Path(p).resolve())
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{p}: cannot resolve the path ({e})") from None
    path, directory = resolved
    if path == directory or directory in path.parents:
        return True
    try:
        target = os.stat(directory)
    except OSError:  # no such directory: nothing lies inside it
        return False
    for p in (path, *path.parents):
        try:
            if os.path.samestat(os.stat(p), target):
                return True
        except OSError:  # not there (yet), or not ours to look at
            continue
    return False


def _same_file(a, b):
    """Whether paths ``a`` and ``b`` are one file (device and inode; False if either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_inputs_inside(out_dir, inputs):
    """Refuse to replace an OUT directory that holds an input or a mount point.

    ``--force`` deletes the old OUT as a whole once the new one is in place:
    an ADAPTER or BASE inside it (by name, or under another name through a
    bind mount) went with it, and so did whatever a mount point inside it
    leads to (an adversary, session 23: an adapter bind-mounted into a
    folder of OUT lost its files). OUT is a model directory (``--force``
    refuses any other), so walking it costs little. Symbolic links are not
    followed, as the deletion does not follow them.
    """
    mounts = _mount_points_under(out_dir)
    if mounts:
        raise ValueError(f"OUT {out_dir} holds a mount point, {mounts[0]}: --force deletes the old OUT "
                         f"as a whole, through it; unmount it or write the output elsewhere")
    ids = {}
    for what, path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        ids[(st.st_dev, st.st_ino)] = (what, path)
    for root, dirs, names in os.walk(out_dir, followlinks=False):
        for name in dirs + names:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            hit = ids.get((st.st_dev, st.st_ino))
            if hit is not None:
                raise ValueError(f"OUT {out_dir} holds the {hit[0]} {hit[1]} (as {path}): --force would "
                                 f"delete it with the old OUT; write the output elsewhere")


def _describe_kind(mode):
    """What a non-regular file is, for a message."""
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _looks_like_output(directory):
    """Whether an existing directory may be replaced by --force: empty, or holding a safetensors model."""
    names = [p.name for p in directory.iterdir()]
    return not names or any(n.endswith(".safetensors") or n == S.SHARD_INDEX for n in names)


def _check_output(base, adapter_paths, out, files, out_dir, force):
    """Refuse an OUT that would overwrite files (without force) or lands in an input."""
    out = Path(out)
    for what, src in [("ADAPTER", Path(a)) for a in adapter_paths] + [("BASE", base.path)]:
        if src.is_dir() and _inside(out, src):
            where = "" if _inside(src, out) else "inside "
            raise ValueError(f"OUT {out} is {where}the {what} directory {src}; write the output elsewhere")
    for _, dst in files:
        if dst.resolve() in [f.resolve() for f in base.files] or any(
                _same_file(dst, f) for f in base.files):
            raise ValueError(f"{dst} is a base file (or the same file under another name: a hard "
                             f"link, a bind mount); write the output elsewhere")
    if force and out_dir is not None and out_dir.is_dir():
        _refuse_inputs_inside(out_dir, [("ADAPTER", Path(a)) for a in adapter_paths]
                              + [("BASE", base.path)] + [("base file", f) for f in base.files])
    if out_dir is not None and out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise ValueError(f"OUT {out_dir} exists and is not empty; pass --force to replace it")
        if not _looks_like_output(out_dir):
            raise ValueError(
                f"OUT {out_dir} exists and holds no safetensors model; --force replaces OUT as a whole, "
                f"so it only replaces a model directory (remove {out_dir} yourself if you mean it)"
            )
    if out_dir is None and not files[0][1].parent.is_dir():  # else: ENOENT naming a temporary file
        raise ValueError(f"OUT {out}: the folder {files[0][1].parent} does not exist; create it first")
    for _, dst in files:
        try:
            mode = os.lstat(dst).st_mode
        except OSError:  # not there: nothing to replace
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            # a device node, a FIFO or a socket is never replaced, --force or not (with
            # --force a FIFO and a device node were replaced by a regular file: an adversary)
            raise ValueError(f"{dst} exists and is {_describe_kind(mode)}; OUT must be a regular "
                             f"file or a model directory")
        if not force:
            raise ValueError(f"{dst} exists; pass --force to overwrite")


# ---------------------------------------------------------------------------
# crash safety: a temporary sibling, fsync, one rename (or an atomic exchange)
# ---------------------------------------------------------------------------


def _kill_point(name):
    """Test hook: ``DORA_REF_TEST_KILL_AT=<name>`` makes the process SIGKILL itself here.

    Used by tests/test_merge_crash.py to kill the command at exact points
    (``tensor:<N>`` after N tensors, ``written``, ``exchanged``, ``renamed-aside``).
    """
    if os.environ.get("DORA_REF_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# what a temporary sibling adds to OUT's name, at most: "." and "." around it, a tag, "-", a pid
# (Linux's largest has 7 digits; 10 allowed), "-", 8 hex digits, and the writer's ".partial"
_SIBLING_EXTRA = 2 + max(len(_TMP_TAG), len(_OLD_TAG)) + 1 + 10 + 1 + 8 + len(".partial")


def _stem(out):
    """OUT's name as its temporary siblings carry it.

    The whole name where the longest sibling's name fits the directory's
    limit (``NAME_MAX``, 255 bytes on Linux filesystems); else the name cut
    to fit, followed by "~" and 16 hex digits of its SHA-256, so that an
    OUT whose own name is legal (up to the limit) can still be written, and
    the next run into the same OUT finds the siblings a killed run left.
    """
    parent = out.parent if str(out.parent) else Path(".")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):  # no such directory yet, or no limit to ask for
        name_max = -1
    if name_max <= 0:
        name_max = 255
    raw = os.fsencode(out.name)
    if len(raw) + _SIBLING_EXTRA <= name_max:
        return out.name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    keep = max(0, name_max - _SIBLING_EXTRA - 1 - len(digest))
    return _cut(raw, keep) + "~" + digest


def _cut(raw, keep):
    """The first ``keep`` bytes of a file name, not ending inside a UTF-8 character
    (a multi-byte character at the end is dropped whole)."""
    cut = raw[:keep]
    if len(cut) < len(raw) and (raw[len(cut)] & 0xC0) == 0x80:  # the cut splits a character
        while cut and (cut[-1] & 0xC0) == 0x80:
            cut = cut[:-1]
        cut = cut[:-1]  # its lead byte
    return os.fsdecode(cut)


#: Names of the temporary siblings this process is writing now: ``_clean_leftovers`` leaves
#: them alone (another thread of this process merging into the same OUT: its cleanup removed
#: the first thread's output as a leftover of its own pid; session 20's adversary).
_LIVE = set()
_LIVE_LOCK = threading.Lock()


def _sibling(out, tag):
    """A new temporary sibling of OUT, recorded as live until ``_done_with`` is called."""
    path = out.with_name(f".{_stem(out)}.{tag}-{os.getpid()}-{os.urandom(4).hex()}")  # (secrets: 0.01 s to import)
    with _LIVE_LOCK:
        _LIVE.add(path.name)
    return path


def _done_with(path):
    with _LIVE_LOCK:
        _LIVE.discard(path.name)


def _clean_leftovers(out):
    """Remove temporary siblings of OUT left by killed runs; refuse if a live run is writing OUT."""
    pattern = re.compile(rf"\.{re.escape(_stem(out))}\.({_TMP_TAG}|{_OLD_TAG})-([0-9]+)-[0-9a-f]+(\.partial)?\Z")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return
    for item in parent.iterdir():
        m = pattern.match(item.name)
        if not m:
            continue
        pid = int(m[2])
        with _LIVE_LOCK:
            live = item.name.removesuffix(".partial") in _LIVE
        if live:  # another thread of this process is writing it
            continue
        if pid != os.getpid() and _alive(pid):
            raise ValueError(
                f"process {pid}, which is writing {item}, is still running (another dora-ref merge into "
                f"{out}?); wait for it, or remove {item} if it is not"
            )
        _delete_tree(item)


def _delete_tree(path):
    """Delete a temporary sibling or the old OUT: a symbolic link or a file by unlinking it, a
    directory as ``shutil.rmtree`` would (``_remove_tree``), but never across a mount point.

    ``rmtree`` descends into a mount point inside the tree and deletes what the
    mount shows: an adapter bind-mounted into a folder of OUT lost its files when
    ``--force`` deleted the old OUT, and again when the next run cleaned up the
    sibling that first deletion had stopped in (an adversary, session 23).
    ``_refuse_inputs_inside`` refuses such an OUT before the merge; this closes the
    gap between that check and the deletion, and covers the leftovers. A link (OUT
    made a link between the check and the exchange: rmtree refused it after the
    merge, and the link was left) is unlinked; its target is not touched.
    """
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    _remove_tree(str(path), str(path))


def _remove_tree(root, top):
    """``shutil.rmtree`` that looks for mount points again before it enters each directory (a
    mount made while the command ran, after its first check, was crossed: an adversary)."""
    mounts = _mount_points_under(root)
    if mounts:
        raise ValueError(f"{top} holds a mount point, {mounts[0]}: not deleted; unmount it and "
                         f"remove {top} yourself")
    with os.scandir(root) as entries:
        for entry in list(entries):
            if entry.is_dir(follow_symlinks=False):
                _remove_tree(entry.path, top)
            else:
                os.unlink(entry.path)
    os.rmdir(root)


def _mount_points_under(path):
    """The mount points at or below directory ``path``.

    From ``/proc/self/mountinfo`` where there is one: ``os.path.ismount`` does
    not see a bind mount of a directory of the same file system (the device
    and the parent's inode tell nothing then), which is how the adversary's
    adapter came to lie inside OUT. Elsewhere, ``os.path.ismount`` on each
    directory of the tree.
    """
    real = os.fsencode(os.path.realpath(path))
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            data = f.read()
    except OSError:
        return [os.path.join(root, d) for root, dirs, _ in os.walk(path, followlinks=False)
                for d in dirs if os.path.ismount(os.path.join(root, d))]
    # bytes, split on newlines alone: the kernel escapes only space, tab, newline and
    # backslash, and text mode or splitlines() cut a path at a \r, \v, \f, U+2028, ...,
    # so such a mount point went unseen (an adversary)
    prefix = real.rstrip(b"/") + b"/"
    found = []
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) > 4:  # the fifth field: the mount point, with \040-style escapes
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8) & 0xFF]), fields[4])
            if point == real or point.startswith(prefix):
                found.append(os.fsdecode(point))
    return found


def _alive(pid):
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a pid no process can have
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2's flags (linux/fs.h)


def _renameat2(a, b, flags):
    """Linux ``renameat2(a, b, flags)``: 0 on success, else the errno (ENOSYS where the
    system or the C library has no renameat2)."""
    if not sys.platform.startswith("linux"):
        return errno.ENOSYS
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc < 2.28
        return errno.ENOSYS
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) != 0:
        return ctypes.get_errno()
    return 0


def _exchange(a, b):
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if os.environ.get("DORA_REF_TEST_NO_EXCHANGE"):
        return False
    return _renameat2(a, b, _RENAME_EXCHANGE) == 0  # else e.g. a filesystem without it: two renames


def _appeared(out):
    return ValueError(
        f"{out} appeared while this merge ran (another dora-ref merge into it?); it was left as it is "
        f"and this merge's output removed; pass --force to replace it"
    )


def _install_new(tmp, out, is_dir):
    """Move ``tmp`` to ``out`` only if OUT is still absent (or, for a directory, empty), in one
    atomic step: the checks before the merge ran long ago, and another run may have installed
    its output since (without this, two runs without --force could both report success while
    one replaced the other's output: session 13's adversary, 2 of 40 races)."""
    if is_dir:
        try:  # rename(2) replaces an empty directory, and fails on anything else
            os.rename(tmp, out)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise _appeared(out) from None
            raise
        return
    err = errno.ENOSYS if os.environ.get("DORA_REF_TEST_NO_EXCHANGE") else \
        _renameat2(tmp, out, _RENAME_NOREPLACE)
    if err == 0:
        return
    if err == errno.EEXIST:
        raise _appeared(out)
    try:  # no renameat2 here: a hard link cannot replace a file either
        os.link(tmp, out)
    except FileExistsError:
        raise _appeared(out) from None
    except OSError:  # a filesystem without hard links: check, then replace (a short window)
        if os.path.lexists(out):
            raise _appeared(out) from None
        os.replace(tmp, out)
        return
    os.unlink(tmp)


#: (thread, realpath of an OUT) -> (device, inode) of the output this thread moved there
#: (a rename keeps the inode): how ``main`` tells its own complete output from
#: something another process, or another thread of this one, put at OUT meanwhile (keyed
#: by OUT alone, a thread refused because another had installed OUT said its merge was
#: done, status 0: session 20's second adversary).
_INSTALLED = {}


def _installed_key(out):
    return threading.get_ident(), os.path.realpath(out)


def _install(tmp, out, is_dir, force):
    """Move the complete, synced ``tmp`` to ``out`` (replacing an old OUT only with ``force``;
    without it, refusing an OUT that appeared meanwhile: ``_install_new``) and sync the parent."""
    parent = out.parent if str(out.parent) else Path(".")
    # recorded before the rename: OUT holds this inode only if the rename happened
    # (an interrupt between the rename and a later record would go unrecorded)
    _INSTALLED[_installed_key(out)] = _identity(tmp)
    if not force:
        try:
            _install_new(tmp, out, is_dir)
        except ValueError:  # the record this call made, not another thread's for the same OUT
            if _INSTALLED.get(_installed_key(out)) == _identity(tmp):
                del _INSTALLED[_installed_key(out)]
            raise
    elif not is_dir or not out.exists():
        os.replace(tmp, out)  # atomic; an empty OUT directory is replaced too
    elif _exchange(tmp, out):
        _kill_point("exchanged")
        S.fsync_directory(parent)
        _delete_tree(tmp)  # now the old output
    else:
        old = _sibling(out, _OLD_TAG)
        try:
            os.rename(out, old)
            _kill_point("renamed-aside")
            os.rename(tmp, out)
            S.fsync_directory(parent)
            _delete_tree(old)
        finally:
            _done_with(old)
    S.fsync_directory(parent)


def _copy_small_file(src, dst):
    """Copy one of the base directory's small files (config.json, the tokenizer, ...)
    with its mode and times, as ``shutil.copy2`` does, but opened non-blocking and
    refused unless it is a regular file: ``copy2`` checks for a pipe before it opens
    the file, and a file that became a pipe in between made the merge wait for ever
    (session 17's adversary)."""
    with open(S.open_regular(src), "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    shutil.copystat(src, dst)


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# merging one tensor, a block of rows at a time
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Codec:
    """How one stored float dtype is read, widened to the compute dtype and rounded back.

    ``view``: the dtype the read bits are viewed as (uint16 for bfloat16, which
    is handled as raw bits so that ``ml_dtypes`` is never imported; float16,
    float32, float64 as themselves). ``widen(stored, out=)`` gives the
    compute-dtype values (exact); ``narrow(W, out=)`` rounds them once to the
    stored dtype, ties to even, and says whether any result is not finite;
    ``not_finite(stored)`` gives the mask (only on that error path). ``bits``:
    the merged tensor is raw bits rather than typed values. ``fmt``: how the
    C kernel is told what the stored values are (``"bfloat16"``,
    ``"float16"``; None for float32/float64, merged in their own dtype), and
    ``largest``: the stored dtype's largest finite value (see ``_fused_merge``).
    """

    view: np.dtype
    widen: object
    narrow: object
    not_finite: object
    bits: bool = False
    fmt: object = None
    largest: float = 0.0


def _same(x, *, out=None):
    """float32/float64 weights merge in their own dtype: nothing to widen (``out`` unused)."""
    return x


def _checked(x, *, out=None):
    """A float32/float64 merge result as is (copied into ``out`` if given), and whether any value is not finite."""
    if out is not None:
        np.copyto(out, x)
        x = out
    return x, not np.isfinite(x).all()


def _codec(st_dtype):
    """The ``_Codec`` of a stored dtype; the merge computes in float32 (float64 for a float64 weight)."""
    if st_dtype == "BF16":
        return _Codec(np.dtype("<u2"), bf16_bits.bfloat16_bits_to_float32,
                      functools.partial(bf16_bits.float32_to_bfloat16_bits, report_non_finite=True),
                      lambda bits: (bits & 0x7F80) == 0x7F80, bits=True, fmt="bfloat16",
                      largest=float.fromhex("0x1.fep127"))  # fmt: skip
    if st_dtype == "F16":
        return _Codec(np.dtype("<f2"), bf16_bits.float16_to_float32,
                      functools.partial(bf16_bits.float32_to_float16, report_non_finite=True),
                      lambda a: ~np.isfinite(a), fmt="float16", largest=65504.0)  # fmt: skip
    if st_dtype in ("F32", "F64"):
        view = np.dtype("<f4" if st_dtype == "F32" else "<f8")
        return _Codec(view, _same, _checked, lambda a: ~np.isfinite(a), largest=float(np.finfo(view).max))
    raise ValueError(f"cannot merge into a {st_dtype} base weight (float16, bfloat16, float32, float64 only)")


class _Buffers:
    """Arrays reused from one merged tensor to the next, by role.

    A new array's pages are faulted in and zeroed by the kernel on first
    touch: on bench_merge.py's model, reusing them took the command from
    58,000 page faults to 20,000, and merging into the "merged" buffer
    (``_fused_merge``) instead of the C merge kernel's new output array to
    13,000 (29,000 before, measured side by side). Each role keeps one flat
    buffer, grown to the largest tensor seen, so memory is what the largest
    merged tensor needs anyway. An array taken for a role is valid until that role is taken again.
    """

    def __init__(self):
        self._flat = {}

    def take(self, role, shape, dtype):
        """A C-contiguous ``dtype`` array of ``shape`` (uninitialised) over the role's buffer."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        flat = self._flat.get(role)
        if flat is None or flat.size < nbytes:
            flat = self._flat[role] = None  # drop the old one first: never two at once
            flat = self._flat[role] = np.empty(max(nbytes, 1), dtype=np.uint8)
        return flat[:nbytes].view(dtype).reshape(shape)


def _block_modules(mods, rows):
    return [dataclasses.replace(m, lora_B=m.lora_B[rows], magnitude=None if m.magnitude is None else m.magnitude[rows])
            for m in mods]  # fmt: skip


def _c_kernels():
    """The C kernels if they are the active backend (``merge_into`` is theirs), else None."""
    from ..core import backend

    return backend.kernels() if backend.backend() == "c" else None


def _fusable(mods, fifo, codec):
    """Whether ``_fused_merge`` may take a weight: one DoRA module whose linear view is the
    stored rows (a linear (out, in) weight, a convolution kernel), with the C backend."""
    mod = mods[0]
    return (len(mods) == 1 and mod.magnitude is not None and not fifo and mod.kind in ("linear", "conv")
            and _c_kernels() is not None)  # fmt: skip


def _fused_merge(stored, mod, codec, out):
    """Merge one DoRA module into a block of rows by one C call, stored dtype in and out; True if done.

    ``dora_ref.kernels.c.merge_into`` reads the stored values (bfloat16 and
    float16 as their bits, widened as they are loaded), merges in float32
    (float64 for a float64 weight) and writes ``out`` rounded once, ties to
    even: the bits of ``F.merge`` on the widened block rounded once, with no
    float32 copy of the block, no new output array and no conversion pass.

    It answers False (``out`` then holds garbage, and the caller merges the
    block the general way, which raises or handles what it finds) unless
    every row is ordinary: n finite and at least ``_SMALLEST_SAFE_NORM``
    (so ``F.merge`` rescues, zeroes and refuses no row: for float32 norms this
    is n > 0), m / n finite, and every |m| at most the stored dtype's largest
    finite value (half of it for float32/float64). Then no merged value can
    be NaN or inf, so none needs checking: n is at least every |V_ij| of its
    row (the norm sums the float32 squares exactly in double, and each
    rounding is monotone), so |W'_ij| = |fl(fl(m / n) V_ij)| <= |m_i| (1 + u)^2,
    and the stored dtype's rounding reaches inf only from (1 + 2^-12) times
    its largest value (float16; bfloat16 2^-9); for float32/float64 the
    bound keeps ``F.merge``'s near-max check empty.
    """
    kernels = _c_kernels()
    A, B, m = _as(mod, np.float64 if codec.view == np.float64 else np.float32)
    if stored.size == 0 or A.shape[0] == 0:
        return False
    W0 = stored.reshape(stored.shape[0], -1)
    dst = out.reshape(W0.shape)
    if codec.fmt is not None:
        W0, dst = W0.view(np.uint16), dst.view(np.uint16)
    n = kernels.merge_into(dst, W0, A, B, m, mod.scaling, fmt=codec.fmt)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        g = m / n  # what the kernel scaled each row by
    largest = codec.largest if codec.fmt is not None else codec.largest / 2
    return bool(float(n.min()) >= _SMALLEST_SAFE_NORM and float(n.max()) < math.inf
                and np.isfinite(g).all() and float(np.abs(m).max()) <= largest)  # fmt: skip


def _merge_rows(stored, mods, fifo, codec, allow_zero_norm, *, buffers=None, out=None, fused=False):
    """Merge ``mods`` into one block of rows of a stored weight: widen, merge, round once.

    The one function where the command touches the numbers. One DoRA module
    on a linear view (``fused``, see ``_fusable``) takes one C call
    (``_fused_merge``): the stored block in, the rounded merged block out.
    Otherwise, and for the rows ``_fused_merge`` leaves (zero or extreme
    norms, a magnitude near the dtype's largest value): widen the stored
    values to float32 exactly (bf16 from its bits), merge
    (``dora_ref.formats.peft.merge_view``), round the float32 result once to
    the stored dtype, ties to even, with the check for non-finite values
    fused into the rounding; the conversions run a cache-sized chunk at a
    time on the idle cores (``bf16_bits``). The two give the same bits.
    Neither imports ``ml_dtypes`` (1.4-2 s): bfloat16 is handled as its
    uint16 bits.

    Parameters
    ----------
    stored : ndarray, shape (rows, ...) of the stored layout, ``codec.view`` dtype
    mods : list of ModuleAdapter
        Sliced to these rows (``_block_modules``).
    fifo : bool
    codec : _Codec
    allow_zero_norm : bool
    buffers : _Buffers, optional
        Where the widened block goes (role ``"wide"``, float32), if needed.
    out : ndarray, optional
        Where the rounded block goes (``codec.view`` dtype, the shape of
        ``stored``); required with ``fused``.
    fused : bool
        ``_fusable(mods, fifo, codec)``.

    Returns
    -------
    (ndarray, bool)
        The merged block in the stored dtype (``out`` if given) and whether any value is not finite.
    """
    if fused and _fused_merge(stored, mods[0], codec, out):
        return out, False
    wide = None if codec.widen is _same or buffers is None else buffers.take("wide", stored.shape, np.float32)
    W = P.merge_view(codec.widen(stored, out=wide), mods, fan_in_fan_out=fifo, allow_zero_norm=allow_zero_norm)
    return codec.narrow(_from_view(W, stored.shape, fifo), out=out)


def merge_tensor(f, key, mods, fifo, allow_zero_norm=False, *, buffers=None):
    """Merge ``mods`` into base tensor ``key`` of ``f``: the stored dtype's array (or bits for bf16).

    The tensor is merged in float32 (float64 for a float64 weight) and
    rounded once back to the stored dtype: by one C call for one DoRA module
    on a linear view, else widened (bf16 from its bits, exactly), merged
    (``dora_ref.formats.peft.merge_view``) and rounded with the check for
    non-finite values fused into the rounding (``_merge_rows``). Rows are
    independent (each output channel has its own norm), so a weight above
    ``_BLOCK_ELEMENTS`` whose linear view keeps its rows (a linear (out, in)
    weight, a convolution kernel) is merged a block of rows at a time, with the same bits; fan-in-fan-out weights and
    embeddings (whose view is a transpose) are merged whole.

    Parameters
    ----------
    f : SafetensorsFile
    key : str
    mods : list of ModuleAdapter
    fifo : bool
    allow_zero_norm : bool
    buffers : _Buffers, optional
        Reused arrays (``merge_checkpoint`` passes one for the whole run); the
        result may live in one, valid until the next call with the same
        ``buffers``. Default: new arrays.

    Returns
    -------
    (ndarray, bool)
        The merged tensor in the stored shape, and whether it holds raw bits
        (uint16 for bfloat16) rather than typed values.

    Raises
    ------
    ValueError
        As ``dora_ref.formats.peft.merge_weight``: shapes, zero norms, and a merged
        weight that is not finite in the stored dtype (module, rows, cause).
    """
    st_dtype = f.st_dtype(key)
    codec = _codec(st_dtype)
    buffers = _Buffers() if buffers is None else buffers
    shape = f.shape(key)
    stored = f.read_bits(key, out=buffers.take("stored", shape, S._BITS[codec.view.itemsize])).view(codec.view)
    row_elems = max(1, int(np.prod(stored.shape[1:], dtype=np.int64)))
    blockwise = (not fifo and mods[0].kind != "embedding" and stored.ndim >= 1
                 and stored.size > _BLOCK_ELEMENTS)  # fmt: skip
    step = max(1, _BLOCK_ELEMENTS // row_elems) if blockwise else max(1, stored.shape[0])
    fused = _fusable(mods, fifo, codec)
    out = buffers.take("merged", shape, codec.view) if codec.widen is not _same or blockwise or fused else None
    try:
        for start in range(0, max(1, stored.shape[0]), step):
            rows = slice(start, start + step) if blockwise else slice(None)
            merged, any_bad = _merge_rows(stored[rows], _block_modules(mods, rows) if blockwise else mods, fifo,
                                          codec, allow_zero_norm, buffers=buffers,
                                          out=None if out is None else out[rows], fused=fused)  # fmt: skip
            if any_bad:
                raise _NotFinite(start if blockwise else 0, _from_view_rows(codec.not_finite(merged), fifo))
            if not blockwise:
                return merged, codec.bits
    except (_NotFinite, ValueError) as e:
        # name the rows of the whole tensor: diagnose it whole (only on this error path)
        full = codec.widen(stored)
        if isinstance(e, _NotFinite):
            W = P.merge_view(full, mods, fan_in_fan_out=fifo, allow_zero_norm=allow_zero_norm)
            dtype = S._numpy_dtype(st_dtype)
            raise P.non_finite_error(full, mods, fifo, e.offset + e.rows, W, dtype) from None
        P.merge_view(full, mods, fan_in_fan_out=fifo, allow_zero_norm=allow_zero_norm)
        raise
    return out, codec.bits


class _NotFinite(Exception):
    def __init__(self, offset, rows):
        super().__init__()
        self.offset, self.rows = offset, rows


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total, show):
    # No stderr (started with it closed, ``2>&-``: Python sets sys.stderr to
    # None): no bar. tqdm wrote to None and a complete merge failed, exit 1,
    # with no message at all.
    if not show or sys.stderr is None:  # tqdm is not even imported (it takes a tenth of a second)
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tensor", desc="merging", file=sys.stderr)


def merge_checkpoint(base_path, adapter_paths, out, *, progress=True, allow_zero_norm=False,
                     force=False, verbose=False, log=print, fan_in_fan_out=None):  # fmt: skip
    """Merge adapters into a safetensors checkpoint, streaming tensor by tensor, crash-safe.

    Parameters
    ----------
    base_path : str or os.PathLike
        Base ``.safetensors`` file or model directory.
    adapter_paths : sequence of str or os.PathLike
        PEFT adapter directories, merged in this order.
    out : str or os.PathLike
        Output file, or directory for a directory base.
    progress : bool
        Show a tqdm progress bar (one step per tensor).
    allow_zero_norm : bool
        See ``dora_ref.formats.peft.merge_weight``.
    force : bool
        Replace an existing OUT (a file, or a directory holding a
        safetensors model) as a whole.

        An OUT that is a symbolic link is written through: its target (which
        need not exist yet) is what is created or replaced, and the link
        stays, as ``cp`` and ``save_pretrained`` write through it.
    verbose : bool
        List every merged module in the summary (default: the first 10).
    log : callable
        Receives the summary lines.
    fan_in_fan_out : None, bool, str or iterable of str
        Which base weights are stored (in, out); see
        ``dora_ref.formats.peft.resolve_fan_in_fan_out``.

    Returns
    -------
    dict of str to list of str
        Each merged base key -> the ``"<adapter dir>:<kind>"`` merged into it.

    Raises
    ------
    FileNotFoundError, OSError, KeyError, ValueError
        Missing or unreadable files, an adapter module without a base
        weight, shape mismatches, unsupported or malformed configs, a square
        weight of unknown orientation, an existing output without ``force``,
        or OUT in BASE or an ADAPTER directory: raised before any output is
        written. A zero row norm or a non-finite merged weight (found while
        merging) and I/O errors: raised with OUT untouched and the temporary
        output removed.
    """
    base = S.BaseWeights(base_path)
    adapters = [P.load_adapter(a) for a in adapter_paths]
    plan = P.plan_merge(base, adapters, fan_in_fan_out=fan_in_fan_out)
    replaced = P.plan_replacements(base, adapters)  # modules_to_save: full tensors
    # which adapter each module came from, for the summary
    origin = {id(m): (str(a), "DoRA" if ad.config.use_dora else "LoRA")
              for a, ad in zip(adapter_paths, adapters) for m in ad.modules.values()}  # fmt: skip
    if Path(out).is_symlink():  # write through the link (replacing it would leave it behind)
        out = Path(os.path.realpath(out))
    files, out_dir = _output_files(base, out)
    _check_output(base, adapter_paths, out, files, out_dir, force)
    final = Path(os.path.abspath(out_dir if out_dir is not None else files[0][1]))  # "." has no name
    _clean_leftovers(final)
    tmp = _sibling(final, _TMP_TAG)
    if out_dir is not None:
        tmp.mkdir(parents=True)
        files = [(src, tmp / dst.name) for src, dst in files]
    else:
        files = [(files[0][0], tmp)]

    total = sum(len(base.file_keys(src)) for src, _ in files)
    bar = _progress_bar(total, progress)
    buffers = _Buffers()  # written out before they are reused
    done = 0
    try:
        for src, dst in files:
            f = base.handle(src)
            keys = f.keys_in_file_order()
            writer = S.SafetensorsWriter(dst, [(k, f.st_dtype(k), f.shape(k)) for k in keys], f.metadata())
            try:
                for key in keys:
                    if key in plan:
                        mods, fifo = plan[key]
                        W, bits = merge_tensor(f, key, mods, fifo, allow_zero_norm, buffers=buffers)
                        writer.write(key, W, bits=bits)
                    elif key in replaced:
                        writer.write(key, P.cast_replacement(replaced[key], f.dtype(key), key))
                    else:
                        writer.copy(key, f)
                    done += 1
                    _kill_point(f"tensor:{done}")
                    bar.update(1)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        if out_dir is not None:  # the shard index and the small files (config.json, tokenizer, ...)
            for item in base.path.iterdir():
                # folders, and links to nothing, are not copied; a pipe or a device is refused
                if base.index is None and item.name == S.SHARD_INDEX:
                    continue  # beside model.safetensors, which was read: it names shards OUT lacks
                if item.suffix not in _WEIGHT_SUFFIXES and not item.is_dir() and item.exists():
                    _copy_small_file(item, tmp / item.name)
                    _fsync_file(tmp / item.name)
            S.fsync_directory(tmp)
        _kill_point("written")
        _install(tmp, final, out_dir is not None, force)
    except BaseException:  # no partial output: OUT is untouched, the temporary output goes
        # (after an exchange, tmp is the old OUT.) Mount-aware, as every deletion here: this
        # handler's rmtree went through a mount _delete_tree had just refused (an adversary)
        try:
            if tmp.is_symlink() or tmp.exists():
                _delete_tree(tmp)
        except (OSError, ValueError):  # left as a sibling; the next run's cleanup tries again
            pass
        raise
    finally:
        bar.close()
        _done_with(tmp)

    if base.path.is_dir() and base.index is None and os.path.lexists(base.path / S.SHARD_INDEX):
        log(f"note: {base.path} holds both {S.SINGLE_FILE} and {S.SHARD_INDEX}: merged "
            f"{S.SINGLE_FILE}, which transformers loads first (the index was not read or copied)")
    merged = {k: [":".join(origin[id(m)]) for m in mods] for k, (mods, _) in plan.items()}
    n_dora = sum(1 for mods, _ in plan.values() if any(m.magnitude is not None for m in mods))
    log(
        f"merged {len(plan)} module(s) ({n_dora} with DoRA, {len(plan) - n_dora} plain LoRA) "
        f"from {len(adapters)} adapter(s); wrote {total} tensor(s) to {out}"
    )
    if replaced:
        log(f"replaced {len(replaced)} tensor(s) by the adapters' modules_to_save: {sorted(replaced)}")
    shown = sorted(merged)
    for key in shown if verbose else shown[:10]:
        log(f"  {key}  <- {', '.join(merged[key])}")
    if len(shown) > 10 and not verbose:
        log(f"  ... and {len(shown) - 10} more (-v lists all)")
    return merged


def _report(line):
    """Print a line of the command's report; a reader that has gone does not fail the merge.

    ``dora-ref merge ... | head -1`` closes stdout after one line: the rest of
    the report is dropped (stdout is pointed at the null device, as Python's
    documentation of SIGPIPE advises, so that the exit's flush does not fail
    either) and the merge, which owes nothing to its reader, goes on.
    A report that cannot be written for another reason (stdout on a full disk)
    is dropped the same way, and said once on stderr.
    """
    try:
        print(line, flush=True)
    except OSError as e:
        from ..cli import _stdout_to_devnull

        _stdout_to_devnull()
        if not isinstance(e, BrokenPipeError):
            print(f"dora-ref merge: the report could not be written to stdout ({e}); the merge goes on",
                  file=sys.stderr)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that the temporary output is removed."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(argv=None, *, ignore_signals_after=False):
    """Entry point of ``dora-ref merge``; returns the exit status (0 ok, 1 error, 2 usage).

    Every expected error (a bad file, config, shape, a non-finite merged
    weight, an OS error, running out of memory) prints one line,
    ``dora-ref merge: error: ...``, and returns 1: no traceback. Ctrl-C
    returns 130 and SIGTERM (``kill``, ``timeout``, a container stopping)
    143; either way OUT is as it was (the temporary output is removed; by
    default SIGTERM would end Python at once and leave it behind), and the
    message says whether OUT was there before. A stop that comes after the
    complete output was moved into place (while the report is printed, say)
    changes nothing: the message says the merge is done, and the status is 0.
    A report that cannot be written (stdout closed, a reader gone, a full
    disk) does not fail the merge.

    ``ignore_signals_after``: leave SIGINT and SIGTERM ignored when it returns
    (default: SIGTERM's handler as it found it). The console script
    (``dora_ref.cli.main``) sets it: with the default handlers back, a
    SIGTERM or a Ctrl-C while the process exits after a complete merge
    ended it with status -15 or -2 (143 or 130 in a shell), OUT complete
    (session 20's adversaries: 2 of 40 random SIGTERMs; 4 of 61 points of a
    Ctrl-C sweep between this function's return and the exit).
    """
    args = _parser().parse_args(argv)
    before = _identity(args.out)
    _INSTALLED.pop(_installed_key(args.out), None)  # a record of an earlier merge says nothing
    previous = None
    try:
        try:
            try:  # inside the try: a SIGTERM just after the handler is in goes to _stopped
                previous = signal.signal(signal.SIGTERM, _raise_terminated)
            except ValueError:  # not the main thread: signals stay as they are
                pass
            return _main(args, before)
        finally:
            if previous is not None:
                if ignore_signals_after:  # Ctrl-C first: a SIGTERM meanwhile still goes to _stopped
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                else:
                    signal.signal(signal.SIGTERM, previous)
    except _Terminated:  # after _main's own handlers (a signal just as it returned)
        return _stopped(args.out, before, "terminated (SIGTERM)", 143)
    except KeyboardInterrupt:
        return _stopped(args.out, before, "interrupted", 130)


def _identity(path):
    """(device, inode) of what is at path (through a symlink), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _stopped(out, before, what, status, say_left=True):
    """The message and exit status of a merge stopped by a signal or an error.

    A stop after this merge moved its complete output to OUT (the identity
    ``_install`` recorded is at OUT now) changes nothing: status 0. Else
    the message says what is at OUT: as before, nothing, or something this
    merge did not write (another process changed OUT meanwhile)."""
    now = _identity(out)
    if now is not None and now != before and now == _INSTALLED.get(_installed_key(out)):
        print(f"dora-ref merge: {what} after {out} was written complete: the merge is done",
              file=sys.stderr)
        return 0
    if now == before:
        left = f"{out} is unchanged" if before is not None else f"{out} was not created"
    else:
        left = f"{out} was changed meanwhile by something else: this merge did not write it"
    print(f"dora-ref merge: {what}" + (f"; {left}" if say_left or now != before else ""),
          file=sys.stderr)
    return status


def _main(args, before):
    try:
        merge_checkpoint(
            args.base,
            args.adapters,
            args.out,
            progress=not args.no_progress,
            allow_zero_norm=args.allow_zero_norm,
            force=args.force,
            verbose=args.verbose,
            fan_in_fan_out=args.fan_in_fan_out,
            log=_report,
        )
    except (OSError, KeyError, ValueError, TypeError) as e:  # one line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        return _stopped(args.out, before, f"error: {msg}", 1, say_left=False)
    except MemoryError:
        return _stopped(args.out, before, "error: out of memory (a tensor and its float32 copies "
                        "did not fit)", 1)
    except _Terminated:
        return _stopped(args.out, before, "terminated (SIGTERM)", 143)
    except KeyboardInterrupt:
        return _stopped(args.out, before, "interrupted", 130)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
