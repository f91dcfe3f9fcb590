"""Adversarial checks (session 5) of the C thread plan against threads and processes.

Every case that can hang runs in a subprocess under a time limit, so that a
hang is reported, not suffered. Results must be the bits of a serial run:
no C kernel's result depends on the number of threads.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

try:
    from dora_ref.kernels import c as C
except ImportError:  # pragma: no cover - depends on the install
    C = None

pytestmark = pytest.mark.skipif(C is None, reason="the C extension is not built")

TIME_LIMIT = 120

_SETUP = """
import hashlib, os, sys, threading
import numpy as np
from dora_ref.kernels import c as C

rng = np.random.default_rng(0)
n = 600
W0 = rng.standard_normal((n, n)).astype(np.float32)
A = rng.standard_normal((8, n)).astype(np.float32)
B = rng.standard_normal((n, 8)).astype(np.float32)
dy, base = rng.standard_normal((2, 128, n)).astype(np.float32)
U = rng.standard_normal((128, 8)).astype(np.float32)
g = (rng.random(n) + 0.5).astype(np.float32)
x = rng.standard_normal((128, n)).astype(np.float32)


def digest():
    x @ W0.T  # OpenBLAS's workers spin after a product, as in a training step
    h = hashlib.sha256()
    for a in (C.column_norm(W0, A, B, 0.5), *C.merge(W0, A, B, g, 0.5),
              C.forward_epilogue(base, U, B, g, 0.5, None),
              C.backward_epilogue(dy, base, U, B, g, 0.5),
              *C._backward_lowrank_fused(dy, base, U, B, g, 0.5),
              *C._norm_gradient_products_fused(W0, A, B)):
        for part in (a if isinstance(a, tuple) else (a,)):
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


C.set_threads(1)
SERIAL = digest()
C.set_threads(0)
"""


def _run(body):
    code = _SETUP + textwrap.dedent(body)
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=TIME_LIMIT, env=dict(os.environ))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung (killed after {TIME_LIMIT} s): {exc.stderr!r}")
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.split()


@pytest.mark.skipif(not os.path.exists("/proc/self/io") or not os.path.isdir("/proc/self/task"),
                    reason="needs Linux's /proc/self/io and /proc/self/task")
def test_own_runnable_with_200_idle_threads_reads_a_bounded_number_of_threads():
    # A process with 200 idle threads: the gate read every thread's stat
    # (1.6 ms a gated probe, shared machine load ~2.3); it reads at most 32.
    # Counted by read system calls (/proc/self/io), not by time.
    if C._own_runnable() == 0:
        pytest.skip("the gate is compiled only with OpenMP on Linux")
    stop = threading.Event()
    idle = [threading.Thread(target=stop.wait) for _ in range(200)]
    for t in idle:
        t.start()
    try:
        def reads():
            with open("/proc/self/io") as f:
                return int(next(line for line in f if line.startswith("syscr:")).split()[1])
        before = reads()
        own = C._own_runnable(2)
        spent = reads() - before - 1  # less the read of /proc/self/io itself
        assert 1 <= own <= 2  # the caller at least (the main thread is read first)
        assert spent <= 32, f"{spent} reads for {len(os.listdir('/proc/self/task'))} threads"
    finally:
        stop.set()
        for t in idle:
            t.join()


@pytest.mark.parametrize("always", [True, False])
def test_three_python_threads_calling_kernels_at_once_give_the_serial_bits(always):
    out = _run(
        f"""
        C._set_always_parallel({always})
        bad, errors = [], []
        def work():
            try:
                for _ in range(6):
                    if digest() != SERIAL:
                        bad.append(1)
            except Exception as exc:
                errors.append(repr(exc))
        ts = [threading.Thread(target=work) for _ in range(3)]
        for t in ts: t.start()
        for t in ts: t.join()
        print(len(bad), len(errors), *errors)
        """
    )
    assert out[:2] == ["0", "0"], out


@pytest.mark.parametrize("toggle", ["set_threads", "threadpoolctl", "always_parallel"])
def test_thread_settings_toggled_from_another_thread_keep_the_serial_bits(toggle):
    pytest.importorskip("threadpoolctl")
    out = _run(
        f"""
        import time
        from threadpoolctl import threadpool_limits
        C._set_always_parallel(True)
        stop = threading.Event()
        def toggler():
            i = 0
            while not stop.is_set():
                if "{toggle}" == "set_threads":
                    C.set_threads(i % 3)
                elif "{toggle}" == "threadpoolctl":
                    with threadpool_limits(limits=1 + i % 2):
                        time.sleep(0.002)
                else:
                    C._set_always_parallel(i % 2 == 0)
                i += 1
                time.sleep(0.001)
        t = threading.Thread(target=toggler)
        t.start()
        bad = sum(digest() != SERIAL for _ in range(12))
        stop.set()
        t.join()
        print(bad)
        """
    )
    assert out == ["0"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_fork_of_a_fork_right_after_a_product_gives_the_serial_bits():
    out = _run(
        """
        C._set_always_parallel(True)
        def check(depth):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                x @ W0.T
                ok = digest() == SERIAL and (depth == 1 or check(depth - 1))
                os.write(w, b"1" if ok else b"0")
                os._exit(0)
            os.close(w)
            got = os.read(r, 1)
            os.close(r)
            return got == b"1" and os.waitpid(pid, 0)[1] == 0
        digest()
        print(check(3), digest() == SERIAL)
        """
    )
    assert out == ["True", "True"]


# ---- the merge command's processes: stderr closed, a file size limit ----

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    np = pytest.importorskip("numpy")
    save_file = pytest.importorskip("safetensors.numpy").save_file
    from peft_helpers import random_module, write_adapter

    d = tmp_path_factory.mktemp("merge_procs")
    rng = np.random.default_rng(0)
    save_file({f"l{i}.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(6)},
              str(d / "base.safetensors"), metadata={"format": "pt"})
    write_adapter(d / "ad", {f"l{i}": random_module(rng, 64, 32, 4, dtype=np.float32) for i in range(6)},
                  config={"r": 4, "lora_alpha": 8})
    return d


def _merge(d, out, *extra, preexec_fn=None, stderr=subprocess.PIPE):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    try:
        return subprocess.run(
            [sys.executable, "-m", "dora_ref", "merge", str(d / "base.safetensors"), str(d / "ad"),
             str(out), *extra], env=env, stdout=subprocess.PIPE, stderr=stderr,
            preexec_fn=preexec_fn, timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the merge hung (killed after {TIME_LIMIT} s): {exc!r}")


def test_merge_with_stderr_closed_completes_with_the_same_bytes(small_checkpoint, tmp_path):
    # `dora-ref merge ... 2>&-` (cron, a daemon): Python sets sys.stderr to
    # None; the progress bar wrote to it and a complete merge failed, exit 1,
    # with no message.
    d = small_checkpoint
    ref = _merge(d, tmp_path / "ref.safetensors", "--no-progress")
    assert ref.returncode == 0, ref.stderr
    res = _merge(d, tmp_path / "out.safetensors", preexec_fn=lambda: os.close(2), stderr=None)
    assert res.returncode == 0, res.stdout
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as Linux applies it")
def test_merge_past_a_file_size_limit_fails_clearly_and_leaves_nothing(small_checkpoint, tmp_path):
    # A full disk, simulated: the output may not exceed 8 KiB (the merge
    # writes about 50 KiB). Python ignores SIGXFSZ, so the write fails with
    # EFBIG: one error line, exit 1, no OUT and no temporary file left.
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    out = tmp_path / "out.safetensors"
    res = _merge(small_checkpoint, out, "--no-progress", preexec_fn=limit)
    assert res.returncode == 1, res.stderr
    assert res.stderr.decode().startswith("dora-ref merge: error:"), res.stderr
    assert "File too large" in res.stderr.decode()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("shape", [[2**63, 0], [10**30, 0], [2**40, 2**40, 0], [0, 2**64]])
def test_safetensors_header_shape_past_a_64_bit_size_is_refused_naming_the_tensor(shape):
    # With no data (a 0 in the shape), these were accepted and failed later in
    # NumPy ("Maximum allowed dimension exceeded"), naming no tensor.
    from dora_ref.formats.safetensors_io import parse_header

    header = '{"w":{"dtype":"F32","shape":%s,"data_offsets":[0,0]}}' % shape
    with pytest.raises(ValueError, match=r"tensor 'w': shape .* overflows a 64-bit size"):
        parse_header(header.encode(), 0)


def test_safetensors_header_largest_zero_size_shape_is_still_read():
    from dora_ref.formats.safetensors_io import parse_header

    header = '{"w":{"dtype":"F32","shape":[%d,0],"data_offsets":[0,0]}}' % (2**63 - 1)
    assert parse_header(header.encode(), 0)[0]["w"][1] == (2**63 - 1, 0)
