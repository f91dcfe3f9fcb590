"""A fork from a signal handler while this thread waits in dora_ref's fork handler.

dora_ref's prepare handler waits until no team of threads is in flight
before OpenBLAS's handler stops its workers (a worker stopped in the middle
of a team's job hangs the team's caller). A second prepare handler of the
same fork (dora_ref registers two) takes the first one's answer at once;
but a fork made by a signal handler *during* that wait took the same
shortcut: it returned the previous fork's answer without waiting, OpenBLAS's
handler then stopped its workers under another thread's team, and that
thread waited for ever in OpenBLAS's ``exec_blas`` (the adversary's attack
36: the parent hung in about 3 runs of 4; gdb showed the computing thread
there with the pool's workers gone). A first fix made such a nested fork
wait too, and the attack still hung 1 round in 4: a signal could also land
inside OpenBLAS's prepare handler (re-entered by the nested fork) or between
taking dora_ref's lock and counting the fork. dora_ref's first prepare
handler of a fork now blocks every signal until its last parent or child
handler, so a signal handler's fork comes after the fork it interrupted.

A small C helper compiled here (skipped without a compiler): two native
threads fork in loops, a third computes the float32 column norm on a team
of threads and compares its bits with the serial result, and a SIGUSR2
handler that forks is sent to the forking threads every 0.5 ms. The signal
is unblocked only while a forking thread runs the prepare handlers between
one registered after dora_ref's and one registered before it (dora_ref's
and OpenBLAS's): anywhere else in a fork, a fork from a signal handler can
deadlock inside glibc itself, which is not dora_ref's to prevent. Each
round runs in a subprocess with a watchdog, so a hang is a failure, never
a stuck test.
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
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int (*norm_t)(float *, const float *, const float *, const float *, double,
                      int64_t, int64_t, int64_t);
static norm_t NORM;
static const float *W0, *A, *B, *EXPECTED;
static int64_t O, I, R;
static volatile int hung, wrong, forks, parent_wrong, calls, stop, forkers_done, killer_stop;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
static int norm_ok(void)
{
    float *n = malloc(sizeof(float) * O);
    int ok = n && NORM(n, W0, A, B, 0.5, O, I, R) == 0 && !memcmp(n, EXPECTED, sizeof(float) * O);
    free(n);
    return ok;
}
static void reap(pid_t pid, double limit)  /* a child not done within limit s counts as hung */
{
    double t0 = now();
    int st;
    for (;;) {
        pid_t d = waitpid(pid, &st, WNOHANG);
        if (d == pid) {
            if (!WIFEXITED(st) || WEXITSTATUS(st)) __sync_fetch_and_add(&wrong, 1);
            return;
        }
        if (d < 0) return;
        if (now() - t0 > limit) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            __sync_fetch_and_add(&hung, 1);
            return;
        }
        struct timespec p = {0, 200000};
        nanosleep(&p, NULL);
    }
}

#define MAXSIG 1500
static __thread volatile int in_signal = 0;
static pid_t signal_children[MAXSIG];
static volatile int nsignal = 0;
static void on_usr2(int s)
{
    (void)s;
    int e = errno;
    if (!in_signal && nsignal < MAXSIG) {
        in_signal = 1;
        pid_t p = fork();
        if (p == 0) _exit(norm_ok() ? 0 : 3);
        if (p > 0) {
            int k = __sync_fetch_and_add(&nsignal, 1);
            if (k < MAXSIG) signal_children[k] = p;
        }
        in_signal = 0;
    }
    errno = e;
}
static void sig_unblock(void)
{
    if (in_signal) return;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
}
static void sig_block(void)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
}
/* prepare handlers run last registered first: this one before dora_ref loads (runs after its) */
void install_window_early(void) { pthread_atfork(sig_block, NULL, NULL); }
/* and this one after (runs before it): the signal lands only inside dora_ref's prepare handler */
void install_window_late(void) { pthread_atfork(sig_unblock, sig_block, sig_block); }

static pthread_t forkers[2];
static int iterations;
static void *forker(void *arg)
{
    (void)arg;
    sig_block();
    for (int k = 0; k < iterations && !stop; k++) {
        pid_t pid = fork();
        if (pid == 0) _exit(norm_ok() ? 0 : 3);
        if (pid > 0) {
            __sync_fetch_and_add(&forks, 1);
            reap(pid, 3.0);
        }
    }
    __sync_fetch_and_add(&forkers_done, 1);
    while (!stop) {
        struct timespec p = {0, 1000000};
        nanosleep(&p, NULL);
    }
    return NULL;
}
static void *computer(void *arg)
{
    (void)arg;
    while (!stop) {
        if (!norm_ok()) __sync_fetch_and_add(&parent_wrong, 1);
        __sync_fetch_and_add(&calls, 1);
    }
    return NULL;
}
static void *killer(void *arg)
{
    (void)arg;
    while (!killer_stop) {
        struct timespec p = {0, 500000};
        nanosleep(&p, NULL);
        for (int i = 0; i < 2; i++) pthread_kill(forkers[i], SIGUSR2);
    }
    return NULL;
}
int progress(void) { return calls; }
int run(void *norm, const float **a, const int64_t *dims, int iters, int *out)
{
    NORM = (norm_t)norm;
    W0 = a[0]; A = a[1]; B = a[2]; EXPECTED = a[3];
    O = dims[0]; I = dims[1]; R = dims[2];
    iterations = iters;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, NULL);
    pthread_t comp, kil;
    pthread_create(&comp, NULL, computer, NULL);
    for (int i = 0; i < 2; i++) pthread_create(&forkers[i], NULL, forker, NULL);
    sig_block();
    pthread_create(&kil, NULL, killer, NULL);
    while (forkers_done < 2) {
        struct timespec p = {0, 1000000};
        nanosleep(&p, NULL);
    }
    killer_stop = 1;
    pthread_join(kil, NULL);
    stop = 1;
    for (int i = 0; i < 2; i++) pthread_join(forkers[i], NULL);
    pthread_join(comp, NULL);
    for (int k = 0; k < nsignal && k < MAXSIG; k++) reap(signal_children[k], 3.0);
    out[0] = hung; out[1] = wrong; out[2] = forks; out[3] = nsignal; out[4] = parent_wrong;
    out[5] = calls;
    return 0;
}
"""

RUN = textwrap.dedent(r"""
    import ctypes, os, sys, threading, time
    import numpy as np
    helper = ctypes.CDLL(sys.argv[1])
    helper.install_window_early()
    from dora_ref.kernels import c as C
    lib = ctypes.CDLL(C._dora_c.__file__, mode=os.RTLD_NOLOAD)
    rng = np.random.default_rng(36)
    O, I, R = 480, 384, 8
    W0 = rng.standard_normal((O, I)).astype(np.float32)
    A = (rng.standard_normal((R, I)) / 20).astype(np.float32)
    B = rng.standard_normal((O, R)).astype(np.float32)
    C.set_threads(1); expected = C.column_norm(W0, A, B, 0.5); C.set_threads(0)
    C._set_always_parallel(True)  # every norm on a team: the teams the forks must wait for
    C.column_norm(W0, A, B, 0.5)  # registers the gate after OpenBLAS's handler
    helper.install_window_late()
    arrays = [W0, A, B, expected]
    pointers = (ctypes.c_void_p * 4)(*[a.ctypes.data for a in arrays])
    dims = (ctypes.c_int64 * 3)(O, I, R)
    out = (ctypes.c_int * 6)()
    norm = ctypes.cast(lib.dora_column_norm_f32, ctypes.c_void_p)
    worker = threading.Thread(target=lambda: helper.run(norm, pointers, dims, int(sys.argv[2]), out),
                              daemon=True)
    worker.start()
    last, since = -1, time.time()
    while worker.is_alive():  # watchdog: a norm takes under a millisecond
        worker.join(0.2)
        done = helper.progress()
        if done != last:
            last, since = done, time.time()
        elif time.time() - since > 6:
            print("parent hung: the computing thread made no progress for 6 s after %d norms" % done,
                  flush=True)
            os._exit(2)
    print("hung %d wrong %d forks %d signal_forks %d parent_wrong %d norms %d" % tuple(out), flush=True)
""")


@pytest.fixture(params=["c"], autouse=True)
def backend(request):
    """This file tests the C extension's fork handlers: once, not once per backend."""
    yield request.param


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    return build_helper(tmp_path_factory, HELPER, "fork_signal")


def test_fork_from_a_signal_handler_during_the_fork_gate_wait_does_not_hang(helper):
    """Four rounds of 2 threads x 30 forks, the signal handler forking inside
    dora_ref's prepare handler (several hundred such forks a round): neither
    the parent's computing thread nor any child hangs, and every norm has the
    serial bits. Before the fix, about 3 rounds in 4 hung the parent."""
    if not c._set_blas_pool(True):  # (True is the default: unchanged)
        pytest.skip("NumPy's BLAS is not a threaded OpenBLAS: no BLAS pool to stop mid-team")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    signal_forks = 0
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", RUN, helper, "30"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"round {round_}: no end within 60 s: {output[-800:]}")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert proc.returncode == 0, f"round {round_}: {output[-1500:]}"
        line = output.strip().splitlines()[-1]
        assert line.startswith("hung "), output[-1500:]
        hung, wrong, forks, nsignal, parent_wrong, norms = (int(v) for v in line.split()[1::2])
        assert forks == 60, line
        assert (hung, wrong, parent_wrong) == (0, 0, 0), f"round {round_}: {line}"
        assert norms > 0, line
        signal_forks += nsignal
    # the case under test happened: forks from the signal handler inside the gate's window
    assert signal_forks > 0
