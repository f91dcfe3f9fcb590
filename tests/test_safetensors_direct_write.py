"""SafetensorsWriter's O_DIRECT path: the same bytes as buffered writes, its fallbacks and its errors.

The writer (and so ``dora-ref merge``) writes with ``O_DIRECT`` where the OS
has it: whole 4096-byte blocks from two aligned buffers, one written by a
short-lived thread while the other fills, the last partial block written
buffered. Each case here is one way that could go
wrong: a tensor ending at, just before or just after a block or buffer
boundary, copies from another file, a filesystem that refuses ``O_DIRECT``,
a disk that refuses a write, and a writer abandoned half way.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from dora_ref.formats import safetensors_io as S

pytestmark = pytest.mark.skipif(not S._O_DIRECT, reason="this OS has no O_DIRECT: the writer writes buffered")

CHUNK = 2 * S._DIRECT_ALIGN  # small buffers, so a few KB cross many buffer boundaries


@pytest.fixture
def small_chunk(monkeypatch):
    monkeypatch.setattr(S, "_DIRECT_CHUNK", CHUNK)


def _direct_flag(fd):
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & S._O_DIRECT)


def _write(path, arrays, *, direct, copy_from=None):
    """Write ``arrays`` (key -> uint8 array) in order; keys in ``copy_from`` are copied from that file."""
    w = S.SafetensorsWriter(path, [(k, a.dtype, a.shape) for k, a in arrays.items()], {"format": "pt"}, direct=direct)
    used_direct = w._sink is not None
    for key, a in arrays.items():
        if copy_from is not None and key in copy_from.keys():
            w.copy(key, copy_from)
        else:
            w.write(key, a)
    w.close()
    assert w._sink is None  # the buffers are let go at close
    return used_direct


# sizes around the 4096-byte block and the two-block buffer: the tail of the file lands at every
# kind of place, and so do the boundaries between tensors
EDGES = [0, 1, 7, 4095, 4096, 4097, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


@pytest.mark.parametrize("last", EDGES)
def test_direct_and_buffered_writes_give_the_same_bytes_whatever_the_sizes(tmp_path, small_chunk, last):
    rng = np.random.default_rng(last)
    arrays = {f"t{i}": rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate(EDGES + [last])}
    assert _write(tmp_path / "direct.safetensors", arrays, direct=None)  # O_DIRECT (tmp_path's filesystem takes it)
    _write(tmp_path / "buffered.safetensors", arrays, direct=False)
    data = (tmp_path / "direct.safetensors").read_bytes()
    assert data == (tmp_path / "buffered.safetensors").read_bytes()
    f = S.SafetensorsFile(tmp_path / "direct.safetensors")
    for key, a in arrays.items():
        np.testing.assert_array_equal(f.read_bits(key), a)
    assert not (tmp_path / "direct.safetensors.partial").exists()


def test_direct_copy_moves_the_same_bytes_as_the_kernel_copy(tmp_path, small_chunk):
    """``copy`` reads the source straight into the aligned buffer (no copy_file_range under O_DIRECT)."""
    rng = np.random.default_rng(1)
    arrays = {f"t{i}": rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate([5, CHUNK + 3, 0, 4096, 9000])}
    _write(tmp_path / "source.safetensors", arrays, direct=False)
    src = S.SafetensorsFile(tmp_path / "source.safetensors")
    _write(tmp_path / "direct.safetensors", arrays, direct=None, copy_from=src)
    _write(tmp_path / "buffered.safetensors", arrays, direct=False, copy_from=src)
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "source.safetensors").read_bytes()


def test_direct_write_falls_back_to_buffered_when_the_filesystem_refuses_o_direct(tmp_path, small_chunk, monkeypatch):
    """A filesystem that opens with O_DIRECT but refuses its writes (EINVAL): the writer clears the
    flag on the descriptor and goes on buffered; the file is the same."""
    real_write, refused = os.write, []

    def write(fd, data):
        if _direct_flag(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(S.os, "write", write)
    rng = np.random.default_rng(2)
    arrays = {f"t{i}": rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate([3, CHUNK * 2 + 1, 100])}
    _write(tmp_path / "direct.safetensors", arrays, direct=None)
    monkeypatch.setattr(S.os, "write", real_write)
    _write(tmp_path / "buffered.safetensors", arrays, direct=False)
    assert len(refused) == 1  # refused once, then buffered
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()


def test_direct_write_open_refused_falls_back_to_buffered(tmp_path, monkeypatch):
    """A filesystem that refuses O_DIRECT at open (EINVAL, as tmpfs did before Linux 6.6)."""
    real_open = os.open

    def open_(path, flags, mode=0o777):
        if flags & S._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(S.os, "open", open_)
    assert not _write(tmp_path / "x.safetensors", {"a": np.arange(10, dtype=np.uint8)}, direct=None)
    np.testing.assert_array_equal(S.SafetensorsFile(tmp_path / "x.safetensors").read_bits("a"), np.arange(10))


def test_direct_write_other_open_errors_are_not_swallowed(tmp_path):
    with pytest.raises(FileNotFoundError):
        S.SafetensorsWriter(tmp_path / "no" / "such" / "dir.safetensors", [("a", np.uint8, (1,))])


@pytest.mark.parametrize("direct", [None, False])
def test_direct_write_disk_refusal_raises_naming_the_file_and_leaves_nothing(tmp_path, direct):
    """A write the disk refuses (here the file-size limit, EFBIG; a full disk is ENOSPC) surfaces in
    the caller's thread as OSError naming the file, on this call or the next, and on every later one;
    abort removes the partial file and no writer thread is left behind. Buffered writes (direct=False)
    name the file too (they did not)."""
    script = textwrap.dedent(f"""
        import errno, resource, signal, threading, numpy as np
        from pathlib import Path
        from dora_ref.formats import safetensors_io as S
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        path = Path({str(tmp_path / "x.safetensors")!r})
        big = np.zeros(16 << 20, np.uint8)
        w = S.SafetensorsWriter(path, [("a", np.uint8, big.shape), ("b", np.uint8, big.shape)], direct={direct!r})
        assert (w._sink is not None) == ({direct!r} is None)
        seen = []
        for key in ("a", "b"):
            try:
                w.write(key, big)
            except OSError as e:
                seen.append(e)
                break
        if not seen:
            try:
                w.close()
            except OSError as e:
                seen.append(e)
        e = seen[0]
        assert e.errno == errno.EFBIG and "x.safetensors.partial" in str(e), e
        try:
            w.close()
            raise SystemExit("close after a failed write succeeded")
        except OSError as again:
            assert again.errno == errno.EFBIG, again
        assert not path.exists() and not Path(str(path) + ".partial").exists()
        assert threading.active_count() == 1, threading.enumerate()
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(S.Path(S.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_direct_writer_abandoned_half_way_leaves_no_file_and_no_thread(tmp_path, small_chunk):
    before = threading.active_count()
    w = S.SafetensorsWriter(tmp_path / "x.safetensors", [("a", np.uint8, (10 * CHUNK,)), ("b", np.uint8, (3,))])
    w.write("a", np.ones(10 * CHUNK, np.uint8))
    w.abort()
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.safetensors.partial").exists()
    assert threading.active_count() == before


def test_direct_write_out_of_order_is_refused_before_any_byte_moves(tmp_path, small_chunk):
    w = S.SafetensorsWriter(tmp_path / "x.safetensors", [("a", np.uint8, (5,)), ("b", np.uint8, (5,))])
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        w.write("b", np.zeros(5, np.uint8))
    w.write("a", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) never written"):
        w.close()
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.safetensors.partial").exists()


def test_direct_appender_refuses_a_chunk_that_is_not_whole_blocks(tmp_path):
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(ValueError, match="chunk must be a multiple of 4096, got 5000"):
            S._DirectAppender(fd, tmp_path / "x", chunk=5000)
    finally:
        os.close(fd)


def test_writer_that_cannot_get_its_buffers_leaves_no_file_and_no_descriptor(tmp_path, monkeypatch):
    """mmap failing (out of memory) in the constructor: MemoryError, and neither the partial file
    nor its descriptor is left behind."""
    def no_memory(*args, **kwargs):
        raise MemoryError("mmap")

    monkeypatch.setattr(S.mmap, "mmap", no_memory)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(MemoryError):
        S.SafetensorsWriter(tmp_path / "x.safetensors", [("a", np.uint8, (3,))])
    assert not (tmp_path / "x.safetensors.partial").exists()
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


# ---------------------------------------------------------------------------
# regression tests from the adversary's run on the O_DIRECT writer (each named after its case)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [None, False])
@pytest.mark.parametrize("ending", ["close", "abort"])
def test_writer_used_after_close_or_abort_raises_and_touches_no_other_file(tmp_path, small_chunk, direct, ending):
    """A second close(), or write()/copy()/close() after abort(), used the old descriptor number:
    the next file the process opened could get it, and was truncated or written into."""
    w = S.SafetensorsWriter(tmp_path / "out.safetensors", [("a", np.uint8, (5 * CHUNK,)), ("b", np.uint8, (3,))],
                            direct=direct)  # fmt: skip
    w.write("a", np.ones(5 * CHUNK, np.uint8))
    if ending == "close":
        w.write("b", np.ones(3, np.uint8))
        w.close()
    else:
        w.abort()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"x" * 100_000)
    fd = os.open(victim, os.O_RDWR)  # most likely the number the writer had
    try:
        with pytest.raises(ValueError, match="the writer is closed"):
            w.write("b", np.ones(3, np.uint8))
        with pytest.raises(ValueError, match="the writer is closed"):
            w.close()
        w.abort()  # a no-op now
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"x" * 100_000
    assert (tmp_path / "out.safetensors").exists() == (ending == "close")


@pytest.mark.parametrize("when", ["before", "after"])
def test_interrupt_inside_the_write_threads_start_leaves_no_partial_file(tmp_path, small_chunk, monkeypatch, when):
    """A Ctrl-C landing inside Thread.start(), before or after the thread began: abort() raised
    "cannot join thread before it is started", and the descriptor and .partial file were left."""
    real_start = threading.Thread.start

    def start(self):
        if self.name == "dora_ref safetensors write":
            if when == "after":
                real_start(self)
            raise KeyboardInterrupt
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    fds = len(os.listdir("/proc/self/fd"))
    w = S.SafetensorsWriter(tmp_path / "x.safetensors", [("a", np.uint8, (4 * CHUNK,))])
    with pytest.raises(KeyboardInterrupt):
        w.write("a", np.ones(4 * CHUNK, np.uint8))
    w.abort()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert not (tmp_path / "x.safetensors.partial").exists() and not (tmp_path / "x.safetensors").exists()
    deadline = time.monotonic() + 10  # a thread that did start closes its own descriptor when done
    while len(os.listdir("/proc/self/fd")) > fds + (1 if when == "before" else 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(os.listdir("/proc/self/fd")) <= fds + (1 if when == "before" else 0)


def test_no_write_thread_to_be_had_writes_in_the_callers_thread(tmp_path, small_chunk, monkeypatch):
    """A thread limit (RuntimeError: can't start new thread) made write() fail and abort() raise;
    now each write is done by the caller, and the file is the same."""
    real_start = threading.Thread.start

    def start(self):
        if self.name == "dora_ref safetensors write":
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    rng = np.random.default_rng(3)
    arrays = {f"t{i}": rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate([5, 3 * CHUNK + 7, 4096])}
    assert _write(tmp_path / "direct.safetensors", arrays, direct=None)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    _write(tmp_path / "buffered.safetensors", arrays, direct=False)
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()


def test_file_that_fits_the_size_limit_exactly_is_written(tmp_path):
    """The last block was padded to 4096 bytes before the file was cut back: a file that fit a
    quota or a disk exactly failed with EFBIG/ENOSPC on the O_DIRECT path alone."""
    script = textwrap.dedent(f"""
        import resource, signal, numpy as np
        from pathlib import Path
        from dora_ref.formats import safetensors_io as S
        path = Path({str(tmp_path / "x.safetensors")!r})
        data = np.arange(5_000_001, dtype=np.uint32).view(np.uint8)[:5_000_001]
        probe = S.SafetensorsWriter(path, [("a", np.uint8, data.shape)], direct=False)
        probe.write("a", data)
        probe.close()
        size = path.stat().st_size
        assert size % 4096, size  # the case needs a partial last block
        path.unlink()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        w = S.SafetensorsWriter(path, [("a", np.uint8, data.shape)])
        assert w._sink is not None
        w.write("a", data)
        w.close()
        assert path.stat().st_size == size
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(S.Path(S.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_merge_interrupted_inside_a_write_threads_start_exits_130_and_leaves_nothing(tmp_path):
    """The merge's view of the Ctrl-C inside Thread.start(): it gave a traceback, exit 1 and a
    .partial file; now the usual interrupted exit (130) and nothing beside OUT."""
    from peft_helpers import random_module, write_adapter

    rng = np.random.default_rng(4)
    base = tmp_path / "base.safetensors"
    big = 3 * S._DIRECT_CHUNK // 4  # float32 values: three of the merge's 4 MiB buffers
    w = S.SafetensorsWriter(base, [("l0.weight", np.float32, (8, 6)), ("other", np.float32, (big,))])
    w.write("l0.weight", rng.standard_normal((8, 6)).astype(np.float32))
    w.write("other", np.ones(big, np.float32))
    w.close()
    adapter = tmp_path / "adapter"
    write_adapter(adapter, {"l0": random_module(rng, 8, 6, 2, dtype=np.float32)})
    script = textwrap.dedent("""
        import sys, threading
        started = [0]
        real = threading.Thread.start
        def start(self):
            if self.name == "dora_ref safetensors write":
                started[0] += 1
                if started[0] == 2:
                    raise KeyboardInterrupt  # a Ctrl-C landing inside Thread.start(), before the thread began
            return real(self)
        threading.Thread.start = start
        from dora_ref.cli import main
        sys.exit(main(["merge"] + sys.argv[1:]))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(S.Path(S.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-c", script, str(base), str(adapter), str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base.safetensors"]


def test_last_partial_block_refused_names_the_file(tmp_path):
    """Second adversary: the O_DIRECT path's last partial block (written buffered) raised a bare
    "File too large" from close(); now it names the file, like every other write."""
    script = textwrap.dedent(f"""
        import errno, resource, signal, numpy as np
        from pathlib import Path
        from dora_ref.formats import safetensors_io as S
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        path = Path({str(tmp_path / "x.safetensors")!r})
        w = S.SafetensorsWriter(path, [("t0", np.float32, (1001,))])
        assert w._sink is not None
        w.write("t0", np.zeros(1001, np.float32))
        resource.setrlimit(resource.RLIMIT_FSIZE, (4075, resource.RLIM_INFINITY))  # the file is 4076 bytes
        try:
            w.close()
            raise SystemExit("close succeeded past the limit")
        except OSError as e:
            assert e.errno == errno.EFBIG and "x.safetensors.partial" in str(e), e
        assert not path.exists() and not Path(str(path) + ".partial").exists()
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(S.Path(S.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.parametrize("where", ["close", "replace"])
def test_interrupt_inside_close_leaves_no_partial_and_closes_nothing_twice(tmp_path, monkeypatch, where):
    """Second adversary: a KeyboardInterrupt right after close() closed the descriptor (before it
    was forgotten) made abort() close that number again, an unrelated file's by then; one just
    before the rename left the .partial file."""
    real_close, real_replace = os.close, os.replace
    victims = []
    w = S.SafetensorsWriter(tmp_path / "x.safetensors", [("a", np.uint8, (5,))])
    w.write("a", np.zeros(5, np.uint8))
    fd = w._fd

    def close(n):
        real_close(n)
        if n == fd and where == "close" and not victims:  # once: the interrupt lands once
            victims.append(os.open(tmp_path / "victim", os.O_WRONLY | os.O_CREAT))  # takes the number
            raise KeyboardInterrupt

    def replace(a, b):
        if where == "replace":
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(S.os, "close", close)
    monkeypatch.setattr(S.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        w.close()
    w.abort()
    monkeypatch.setattr(S.os, "close", real_close)
    for v in victims:
        os.fstat(v)  # still open: nobody closed it
        real_close(v)
    assert not (tmp_path / "x.safetensors.partial").exists() and not (tmp_path / "x.safetensors").exists()
