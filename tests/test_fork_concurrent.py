"""Several threads fork at the same moment: every child must finish.

Python's ``os.fork`` holds the GIL, so two Python threads never fork at
once; native threads (a C extension's, a data loader written in C++) do.
glibc holds no lock of its own while the fork handlers (``pthread_atfork``) run,
so two such forks interleaved OpenBLAS's handlers, which stop and restart
its worker threads under OpenBLAS's own lock: a child forked while the
other fork held that lock waited for it forever in its first threaded call
(about one fork in 500-1,000 from 3-6 threads at once, with or without
dora_ref's kernels). dora_ref's fork handler, which runs before
OpenBLAS's, now lets one fork through at a time.

The forking threads are those of a small C helper compiled here (the test
is skipped without a C compiler, which building the extension needs
anyway); the child calls dora_ref's float32 column norm on a team of
threads and compares its bits with the serial result. Every fork runs in
a subprocess bounded in time, so a hang is a failure, never a stuck test.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from native_fork import build_helper, skip_unless_threaded

c = pytest.importorskip("dora_ref.kernels.c")

pytestmark = skip_unless_threaded(c)

HELPER = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int (*norm_fn)(float *, const float *, const float *, const float *, double,
                       int64_t, int64_t, int64_t);
static norm_fn norm;
static const float *W0, *A, *B, *expected;
static int64_t out_f, in_f, rank;
static int rounds, hung, wrong, forks;
static pthread_barrier_t together;

/* Fork handlers registered before dora_ref's (this library loads first), as
   OpenBLAS's are: glibc runs their prepare handler after dora_ref's and their
   parent handler before it. They count the forks inside them at once. */
static volatile int inside, most_inside;
static void prepare(void)
{
    int now = __sync_add_and_fetch(&inside, 1);
    int seen = most_inside;
    while (now > seen && !__sync_bool_compare_and_swap(&most_inside, seen, now)) seen = most_inside;
    struct timespec pause = {0, 2000000};  /* 2 ms: a window for another fork to enter */
    nanosleep(&pause, NULL);
}
static void after_in_parent(void) { __sync_sub_and_fetch(&inside, 1); }
__attribute__((constructor)) static void register_handlers(void)
{
    pthread_atfork(prepare, after_in_parent, NULL);
}

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* One threaded column norm, compared bit for bit with the serial one. */
static int norm_is_right(void)
{
    float *n = malloc(sizeof(float) * out_f);
    int ok = n && norm(n, W0, A, B, 0.5, out_f, in_f, rank) == 0
             && memcmp(n, expected, sizeof(float) * out_f) == 0;
    free(n);
    return ok;
}

static void *forking_thread(void *unused)
{
    (void)unused;
    for (int k = 0; k < rounds; k++) {
        pthread_barrier_wait(&together);  /* compute together: the BLAS workers are up */
        if (!norm_is_right()) __sync_fetch_and_add(&wrong, 1);
        pthread_barrier_wait(&together);  /* then fork together */
        pid_t child = fork();
        if (child == 0) _exit(norm_is_right() ? 0 : 3);
        const double t0 = seconds();
        int status;
        for (;;) {
            if (waitpid(child, &status, WNOHANG) == child) {
                if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) __sync_fetch_and_add(&wrong, 1);
                break;
            }
            if (seconds() - t0 > 5.0) {  /* a child's norm takes well under 0.1 s */
                kill(child, SIGKILL);
                waitpid(child, &status, 0);
                __sync_fetch_and_add(&hung, 1);
                break;
            }
            struct timespec pause = {0, 200000};
            nanosleep(&pause, NULL);
        }
        __sync_fetch_and_add(&forks, 1);
    }
    return NULL;
}

int fork_together(void *fn, const float **arrays, const int64_t *dims, int threads, int n_rounds,
                  int *counts)
{
    norm = (norm_fn)fn;
    W0 = arrays[0]; A = arrays[1]; B = arrays[2]; expected = arrays[3];
    out_f = dims[0]; in_f = dims[1]; rank = dims[2];
    rounds = n_rounds; hung = wrong = forks = 0; most_inside = 0;
    pthread_t t[16];
    if (threads > 16) return -1;
    pthread_barrier_init(&together, NULL, threads);
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, forking_thread, NULL);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    pthread_barrier_destroy(&together);
    counts[0] = hung; counts[1] = wrong; counts[2] = forks; counts[3] = most_inside;
    return 0;
}
"""

RUN = textwrap.dedent(r"""
    import ctypes, os, sys
    helper = ctypes.CDLL(sys.argv[1])  # first: its fork handlers before dora_ref's
    import numpy as np
    from dora_ref.kernels import c
    import dora_ref.kernels._dora_c as ext
    pool, threads, rounds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = np.random.default_rng(8)
    out_f, in_f, rank = 480, 384, 8
    W0 = rng.standard_normal((out_f, in_f)).astype(np.float32)
    A = (rng.standard_normal((rank, in_f)) / 20).astype(np.float32)
    B = rng.standard_normal((out_f, rank)).astype(np.float32)
    c.set_threads(1)
    expected = c.column_norm(W0, A, B, 0.5)
    c.set_threads(0)
    c._set_blas_pool(pool == "blas")
    c._set_always_parallel(True)
    lib = ctypes.CDLL(ext.__file__, mode=os.RTLD_NOLOAD)
    arrays = (ctypes.c_void_p * 4)(*(a.ctypes.data for a in (W0, A, B, expected)))
    dims = (ctypes.c_int64 * 3)(out_f, in_f, rank)
    counts = (ctypes.c_int * 4)()
    assert helper.fork_together(ctypes.cast(lib.dora_column_norm_f32, ctypes.c_void_p),
                                arrays, dims, threads, rounds, counts) == 0
    print("hung %d wrong %d forks %d most_inside %d" % tuple(counts), flush=True)
""")


@pytest.fixture(params=["c"], autouse=True)
def backend(request):
    """This file tests the C extension's fork handlers: once, not once per backend."""
    yield request.param


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    return build_helper(tmp_path_factory, HELPER, "fork_together")


@pytest.mark.parametrize("pool", ["blas", "omp"])
def test_threads_that_fork_at_once_all_have_children_that_finish(helper, pool):
    """6 native threads x 40 rounds: each round, all compute a threaded norm, then
    all fork at once; every child computes a threaded norm with the serial bits,
    and the fork handlers registered before dora_ref's never ran for two forks at once."""
    if pool == "blas" and not c._set_blas_pool(True):  # (True is the default: unchanged)
        pytest.skip("NumPy's BLAS is not a threaded OpenBLAS: no BLAS pool")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", RUN, helper, pool, "6", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the forking process did not end within 240 s (pool {pool}): {output[-800:]}")
    assert proc.returncode == 0, output[-1500:]
    line = output.strip().splitlines()[-1]
    assert line.startswith("hung "), output[-1500:]
    hung, wrong, forks, most_inside = (int(v) for v in line.split()[1::2])
    assert forks == 240, line
    assert (hung, wrong) == (0, 0), f"pool {pool}: {line}"
    # the root cause, whether a child would hang or not this time: the handlers
    # registered before dora_ref's (OpenBLAS's) ran for one fork at a time
    assert most_inside == 1, f"pool {pool}: {line}"
