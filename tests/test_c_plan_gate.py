"""The thread plan's idle-core gate does not count the process's own
OpenBLAS workers, spinning after a product, as other work.

A probe (a parallel call made to measure again what a team costs) first
reads how many threads are runnable and opens a team only if the team finds
its cores (``csrc/dora_kernels.c``, ``dora_team_fits``). After every BLAS
product NumPy's OpenBLAS workers spin, runnable, for about 0.1 s; a training
loop always follows a product, so on 2 cores the gate refused every probe
when it counted them, and after one lost call (its cost of a team in ms)
every kernel stayed serial for the rest of the run, on a quiet machine too.
When the team runs on those very workers (``_openblas_pool``), they are the
team, not competitors. No timing here: the decision is a pure function of
the counts, tested on a table; the counts' parsers on /proc texts.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from ci_env import env_flag

try:
    from dora_ref.kernels import c as C
except ImportError as exc:  # pragma: no cover - depends on the install
    if env_flag("DORA_REF_REQUIRE_C"):
        raise
    pytest.skip(f"the C backend is not built ({exc})", allow_module_level=True)


@pytest.mark.parametrize("running, own, cores, threads, on_pool, fits", [
    # 2 cores, right after a product: the caller and its spinning OpenBLAS worker
    (2, 2, 2, 2, True, True),    # the worker is the team's second member
    (2, 2, 2, 2, False, False),  # an OpenMP team would wait for the spinner's slice
    # one busy process besides them: no core for the team, either way
    (3, 2, 2, 2, True, False),
    (3, 2, 2, 2, False, False),
    # quiet, the workers asleep: the caller alone
    (1, 1, 2, 2, True, True),
    (1, 1, 2, 2, False, True),
    # own unknown (0): every runnable thread but the caller competes
    (2, 0, 2, 2, True, False),
    # more own runnable threads than the team has members: the rest compete
    (4, 4, 2, 2, True, False),
    (4, 4, 4, 4, True, True),
    (5, 3, 4, 4, True, False),
    # unknown load or cores: the probe measures
    (-1, 0, 2, 2, True, True),
    (2, 2, -1, 2, True, True),
])
def test_the_gate_does_not_count_own_spinning_openblas_workers_as_busy(
        running, own, cores, threads, on_pool, fits):
    assert C._team_fits(running, own, cores, threads, on_pool) is fits


def test_the_task_stat_parser_reads_the_state_after_the_command():
    assert C._stat_runnable("4242 (python) R 1 4242 4242 0 -1 4194304 ...")
    assert not C._stat_runnable("4242 (python) S 1 4242 4242 0 -1 4194304 ...")
    # a command may hold spaces and parentheses: the state follows the last ')'
    assert C._stat_runnable("7 (a) S (b)) R 1 7 7")
    assert not C._stat_runnable("7 (a) R (b)) S 1 7 7")
    for bad in ("", "4242 python R", "4242 (python)", "4242 (python)R"):
        assert not C._stat_runnable(bad), bad


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task is Linux's")
def test_own_runnable_counts_the_calling_thread():
    if not C.openmp_enabled():
        assert C._own_runnable() == 0  # the gate is compiled only with OpenMP
        return
    assert C._own_runnable() >= 1
    assert C._own_runnable(1) == 1  # counted up to the limit, a team's size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/task is Linux's")
def test_own_runnable_sees_openblas_workers_spinning_after_a_product():
    """What the gate subtracts is there: right after a product the pool's
    workers are runnable (each read within microseconds of the product; a
    few tries, as a loaded machine may deschedule this thread past the
    workers' ~0.1 s of spinning)."""
    if not C.openmp_enabled() or C._openblas_pool() is None:
        pytest.skip("no threaded pthreads OpenBLAS registered as the teams' pool")
    a = np.random.default_rng(0).standard_normal((384, 384))
    seen = 0
    for _ in range(10):
        a @ a
        seen = max(seen, C._own_runnable())
        if seen >= 2:
            break
    assert seen >= 2


@pytest.mark.parametrize("T, L, Lmin, since_team, since_check, interval, decision", [
    # L measured by a team within the interval says a team pays: open one
    (1000, 50, 20, 0.05, 0.05, 0.1, "team"),
    # the same L, older than an interval (startup, or a serial spell): ask for the cores first
    (1000, 50, 20, 0.5, 0.5, 0.1, "ask"),
    # ... unless a probe was refused within the interval: stay serial until it passes
    (1000, 50, 20, 0.5, 0.05, 0.1, "serial"),
    # L says no, L_min says yes: a probe once an interval, asking for the cores
    (1000, 3500, 20, 0.5, 0.5, 0.1, "ask"),
    (1000, 3500, 20, 0.05, 0.05, 0.1, "serial"),
    (1000, 3500, 20, 0.5, 0.05, 0.1, "serial"),
    # too small even for the best team ever seen: serial, nothing read
    (50, 3500, 20, 10.0, 10.0, 0.1, "serial"),
    (50, 20, 20, 0.01, 0.01, 0.1, "serial"),
])
def test_a_team_on_an_old_region_cost_asks_for_the_cores_first(
        T, L, Lmin, since_team, since_check, interval, decision):
    """bench_busy --cells at load ~7: a column norm predicted at 0.5 ms went
    parallel on an L measured at startup and lost 12 ms; an L older than the
    probe interval now opens a team only through the idle-core gate."""
    assert C._plan_decide(T, L, Lmin, since_team, since_check, interval) == decision
