"""The benchmarks' busy processes never outlive the benchmark that started them.

``benchmarks/bench_busy.py``'s ``start_busy`` (used by ``bench_busy.py``,
``bench_route_ab.py`` and ``bench_norm_f64.py``) starts Python spin loops
that load a core. Session 16's adversary found two ways to leave one running
on a shared 2-core machine: the benchmark killed by SIGTERM or SIGKILL (no
``finally`` runs; the spinner stopped only at its time bound, 10-20 minutes
later), and a ``Popen`` failing part way through a level (the spinners
already started were never stopped). And the arguments accepted any load
(one run asked for 10**12 spinners), a zero or negative round count and a
NaN time bound. Each case below is real: a real benchmark process killed
with SIGKILL, a real spinner watched until it is gone.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dora_ref
from dora_ref.core import functional as F

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _alive(pid):
    """True if pid runs (a zombie, dead but not yet reaped by its new parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the OS
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _wait_gone(pid, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and SIGKILL semantics")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_busy_process_stops_when_the_benchmark_is_killed(sig):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import bench_busy as bb; "
            "p = bb.start_busy(1, 120); print(p[0].pid, flush=True); time.sleep(120)")
    bench = subprocess.Popen([sys.executable, "-c", code, BENCH_DIR], stdout=subprocess.PIPE,
                             text=True)
    spinner = None
    try:
        spinner = int(bench.stdout.readline())
        assert _alive(spinner)
        time.sleep(0.3)
        assert _alive(spinner)  # it spins while the benchmark lives
        bench.send_signal(sig)
        bench.wait(timeout=30)
        assert _wait_gone(spinner, 10), f"the spinner {spinner} outlived its benchmark ({sig!r})"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        if spinner is not None and _alive(spinner):
            os.kill(spinner, signal.SIGKILL)


def test_start_busy_stops_what_it_started_when_one_fails(bench_busy, monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        if len(started) == 2:
            raise OSError(11, "Resource temporarily unavailable (simulated)")
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(bench_busy.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="simulated"):
        bench_busy.start_busy(4, 60)
    assert len(started) == 2
    for p in started:
        assert p.poll() is not None, f"spinner {p.pid} left running"


def test_start_busy_refuses_a_negative_count_or_a_bad_time_bound(bench_busy):
    for count, limit in ((-1, 60), (1, 0), (1, -5), (1, float("nan")), (1, float("inf"))):
        with pytest.raises(ValueError):
            bench_busy.start_busy(count, limit)


def test_benchmark_arguments_refuse_bad_loads_rounds_and_bounds(bench_busy):
    most = bench_busy.MAX_BUSY_PER_CPU * (os.cpu_count() or 1)
    assert bench_busy.loads_arg("0,1,2") == [0, 1, 2]
    assert bench_busy.loads_arg("") == []
    assert bench_busy.loads_arg(str(most)) == [most]
    for text in ("-1", "a", "1,x", str(most + 1), "1000000000000"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_busy.loads_arg(text)
    rounds, seconds = bench_busy.positive_arg(int), bench_busy.positive_arg(float)
    assert rounds("3") == 3 and seconds("0.5") == 0.5
    for parse, text in ((rounds, "0"), (rounds, "-5"), (rounds, "1.5"), (seconds, "nan"),
                        (seconds, "inf"), (seconds, "-1"), (seconds, "0"), (seconds, "abc")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_a_level_whose_busy_process_stopped_early_is_refused(bench_busy):
    """Session 16's second adversary: a --busy-limit shorter than a level let the spinners stop
    mid-level, and the rest of the level was labelled busy while it was not."""
    procs = bench_busy.start_busy(1, 0.2)
    try:
        bench_busy.check_busy(procs)  # running: fine
        procs[0].wait(timeout=30)
        with pytest.raises(RuntimeError, match="stopped before the level ended"):
            bench_busy.check_busy(procs)
    finally:
        bench_busy.stop_busy(procs)
    bench_busy.check_busy([])  # a quiet level has none


def test_bench_busy_refuses_an_empty_loads_list(bench_busy):
    """--loads '' fell back silently to the default levels."""
    with pytest.raises(SystemExit):
        bench_busy.main(["--quick", "--loads", ""])


def test_bench_busy_refuses_to_time_backends_that_disagree(bench_busy):
    """The sweep checks, at each cell's warm-up, that C and NumPy computed the same values
    within the rounding bound of their sums (an audit, session 21: no check before): a
    gradient perturbed by far more than that bound is refused, a correct pair passes."""
    p = bench_busy.problem(64, 48, 8, 16, np.float32)
    p["n"] = F.column_norm(p["W0"], p["A"], p["B"], p["s"])
    results = {}
    for name in dora_ref.available_backends():
        with dora_ref.use_backend(name):
            results[name] = (bench_busy.train_step(p), bench_busy.eval_forward(p))
    a = results["numpy"]
    b = results.get("c", a)
    for i in range(2):
        bench_busy.check_agree(b[i], a[i], p)
    wrong = F.DoRAGrads(a[0].dx, a[0].dA * np.float32(1.001), a[0].dB, a[0].dmagnitude)
    with pytest.raises(AssertionError, match=r"dA, C against NumPy at \(64, 48, 8, 16, 'float32'\)"):
        bench_busy.check_agree(wrong, a[0], p)
    y_wrong = (a[1][0] + np.float32(1e-2) * np.abs(a[1][0]).max(), a[1][1])
    with pytest.raises(AssertionError, match="y, C against NumPy"):
        bench_busy.check_agree(y_wrong, a[1], p)
