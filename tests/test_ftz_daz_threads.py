"""The C kernels' teams compute in the caller's floating-point mode (FTZ/DAZ, rounding).

The SSE control register is per thread. A library that turns on
flush-to-zero and denormals-are-zero in the calling thread (code built with
``-ffast-math`` does when it loads) changed it there alone: the threads of
OpenMP's or OpenBLAS's pool kept the default, and rows computed on them
treated subnormal values differently from rows computed by the caller, so
the bits followed the thread count (an adversary's run: 0 or 60 of 240 rows
differed between 1 and 2 threads, from call to call). Each member of a team
now takes the caller's FTZ, DAZ and rounding bits when it starts and puts
its own back when it leaves.

Each case runs in a subprocess (the floating-point mode must not leak into
the test process), sets FTZ+DAZ with glibc's
``fegetenv``/``fesetenv`` (the MXCSR word of its x86-64 ``fenv_t``), and compares each kernel on
one thread with the same kernel on a team of two, bit for bit; it also
checks that the mode took effect (the results differ from the default
mode's, else the test would prove nothing) and that the default mode gives
the default bits again afterwards.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

kernels_c = pytest.importorskip("dora_ref.kernels.c")

pytestmark = [
    pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")),
                       reason="sets MXCSR through glibc's x86-64 fenv_t"),
    pytest.mark.skipif(kernels_c.openmp_threads() < 2, reason="needs a team of two threads"),
]

SCRIPT = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from dora_ref.kernels import c as K

    libm = ctypes.CDLL("libm.so.6")
    FE_DFL_ENV = ctypes.c_void_p(-1)

    def set_ftz_daz():  # glibc x86-64's fenv_t: the x87 state (28 bytes), then MXCSR
        env = ctypes.create_string_buffer(32)
        assert libm.fegetenv(env) == 0
        mxcsr = int.from_bytes(env.raw[28:32], "little") | 0x8040  # FTZ (bit 15), DAZ (bit 6)
        ctypes.memmove(ctypes.addressof(env) + 28, mxcsr.to_bytes(4, "little"), 4)
        assert libm.fesetenv(env) == 0

    rng = np.random.default_rng(0)
    out, inf, r, N = 512, 256, 8, 256
    f32 = np.float32
    tiny = np.finfo(f32).tiny  # smallest normal float32

    # column_norm: every other row of W0 subnormal, B = 0 (V = W0): DAZ reads those rows as zeros
    W0s = rng.standard_normal((out, inf)).astype(f32)
    W0s[::2] *= f32(tiny / 8)
    A = rng.standard_normal((r, inf)).astype(f32)
    B0 = np.zeros((out, r), f32)
    # merge: W' = (m / n) V lands in the subnormal range on the rows whose magnitude is tiny: FTZ flushes it
    W0 = rng.standard_normal((out, inf)).astype(f32)
    B = (0.01 * rng.standard_normal((out, r))).astype(f32)
    m = np.full(out, np.sqrt(inf), f32)
    m[::3] *= f32(tiny / 4)
    # forward epilogue: y = g (base + s U B^T) + bias with subnormal base rows and U = 0
    base = rng.standard_normal((N, out)).astype(f32)
    base[::2] *= f32(tiny / 8)
    U0 = np.zeros((N, r), f32)
    g = np.ones(out, f32)
    bias = np.zeros(out, f32)

    def kernels():
        n = K.column_norm(W0s, A, B0, 2.0)
        W, n_merge = K.merge(W0, A, B, m, 2.0)
        back = K.unmerge(W, A, B, m / n_merge, 2.0)
        y = K.forward_epilogue(base, U0, B, g, 2.0, bias)
        return {"column_norm": n, "merge": W, "unmerge": back, "forward_epilogue": y}

    def on(threads):
        K.set_threads(threads)
        K._set_always_parallel(threads > 1)
        try:
            return {k: v.view(np.uint32).copy() for k, v in kernels().items()}
        finally:
            K.set_threads(0)
            K._set_always_parallel(False)

    default1, default2 = on(1), on(2)
    set_ftz_daz()  # in this thread only
    ftz1, ftz2 = on(1), on(2)
    libm.fesetenv(FE_DFL_ENV)
    again2 = on(2)
    bad = []
    for k in default1:
        if not np.array_equal(default1[k], default2[k]):
            bad.append(f"{k}: default mode, 1 and 2 threads differ")
        if np.array_equal(ftz1[k], default1[k]):
            bad.append(f"{k}: FTZ/DAZ changed nothing on one thread (the case tests nothing)")
        rows = np.flatnonzero((ftz1[k] != ftz2[k]).reshape(ftz1[k].shape[0], -1).any(axis=1))
        if rows.size:
            bad.append(f"{k}: FTZ/DAZ, 1 and 2 threads differ in {rows.size} of {ftz1[k].shape[0]} rows")
        if not np.array_equal(again2[k], default1[k]):
            bad.append(f"{k}: back in the default mode, 2 threads give other bits")
    print("\\n".join(bad) if bad else "ok")
""")


def test_ftz_daz_in_the_caller_gives_the_same_bits_on_one_thread_and_on_a_team():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]
