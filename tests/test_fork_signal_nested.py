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
/* Where this thread is in its own fork (set by the window's handlers, never
   by a fork made inside a signal handler). glibc takes its atfork lock again
   between two handlers of a fork (glibc 2.36: released around each handler,
   taken between them), and a fork from a signal handler that lands there
   waits for that lock forever, on its own thread: the test's own deadlock,
   not dora_ref's (it hung one CI-like run in about ten). So the handler
   forks only inside a handler's body: the window's first handler (the
   signal unblocked there), or dora_ref's last parent handler, where a
   signal held back during the fork (pending when the first parent handler
   runs) comes when dora_ref restores the mask; anywhere else it is counted
   and let go. */
enum { OUTSIDE, IN_WINDOW, AFTER_WINDOW, PARENT };
static __thread volatile sig_atomic_t in_signal = 0, stage = OUTSIDE, held_back = 0;
static pid_t signal_children[MAXSIG];
static volatile int nsignal = 0, at_restore = 0, let_go = 0, mask_open = 0;
static void on_usr2(int s)
{
    (void)s;
    int e = errno;
    const int in_body = stage == IN_WINDOW || (stage == PARENT && held_back);
    if (!in_signal && nsignal < MAXSIG && in_body) {
        if (stage == PARENT) {
            held_back = 0;
            __sync_fetch_and_add(&at_restore, 1);
        }
        in_signal = 1;
        pid_t p = fork();
        if (p == 0) _exit(norm_ok() ? 0 : 3);
        if (p > 0) {
            int k = __sync_fetch_and_add(&nsignal, 1);
            if (k < MAXSIG) signal_children[k] = p;
        }
        in_signal = 0;
    } else if (!in_signal) {
        __sync_fetch_and_add(&let_go, 1);
    }
    errno = e;
}
static void sig_block(void)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
}
/* dora_ref's first handler of a fork blocks every signal until its last:
   seen from a handler that runs between them (one registered before
   dora_ref's: its prepare handler runs after dora_ref's, its parent handler
   before) */
static void check_all_blocked(void)
{
    sigset_t now;
    pthread_sigmask(SIG_BLOCK, NULL, &now);
    if (!sigismember(&now, SIGUSR2) || !sigismember(&now, SIGTERM) || !sigismember(&now, SIGINT))
        __sync_fetch_and_add(&mask_open, 1);
}
static void window_open(void)  /* runs before dora_ref's prepare handlers */
{
    if (in_signal) return;
    stage = IN_WINDOW;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);  /* a signal waiting comes here */
    stage = AFTER_WINDOW;  /* from here to dora_ref's first handler: glibc's own code */
}
static void early_prepare(void)  /* runs after dora_ref's */
{
    check_all_blocked();
    sig_block();
}
static void early_parent(void)  /* runs before dora_ref's */
{
    check_all_blocked();
    if (in_signal) return;
    sigset_t pending;
    sigpending(&pending);
    held_back = sigismember(&pending, SIGUSR2);  /* comes when dora_ref restores the mask */
    stage = PARENT;
}
static void window_close(void)
{
    sig_block();
    if (in_signal) return;
    stage = OUTSIDE;
    held_back = 0;
}
/* prepare handlers run last registered first: this one before dora_ref loads (runs after its) */
void install_window_early(void) { pthread_atfork(early_prepare, early_parent, sig_block); }
/* and this one after (runs before it): the signal lands only inside dora_ref's prepare handler */
void install_window_late(void) { pthread_atfork(window_open, window_close, sig_block); }

/* A fork from inside a fork handler, in a process with two threads: returns
   0, or never (a C library that holds its fork lock while the handlers run,
   as glibc 2.28-2.35 did: every fork this test makes inside a handler would
   wait for ever, whatever dora_ref does). Run in a process of its own. */
static volatile int probe_inner = 0;
static void probe_prepare(void)
{
    if (probe_inner) return;
    probe_inner = 1;
    pid_t p = fork();
    if (p == 0) _exit(0);
    if (p > 0) waitpid(p, NULL, 0);
}
static void *probe_idle(void *arg)
{
    (void)arg;
    pause();
    return NULL;
}
int probe_fork_in_handler(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, probe_idle, NULL)) return 1;
    pthread_atfork(probe_prepare, NULL, NULL);
    pid_t p = fork();
    if (p == 0) _exit(0);
    if (p < 0) return 1;
    int st;
    waitpid(p, &st, 0);
    return !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

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
int fork_progress(void) { return forks + nsignal; }
int forking(void) { return forkers_done < 2; }
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
    out[5] = calls; out[6] = at_restore; out[7] = let_go; out[8] = mask_open;
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
    out = (ctypes.c_int * 9)()
    norm = ctypes.cast(lib.dora_column_norm_f32, ctypes.c_void_p)
    worker = threading.Thread(target=lambda: helper.run(norm, pointers, dims, int(sys.argv[2]), out),
                              daemon=True)
    worker.start()
    norms_seen, forks_seen = (-1, time.time()), (-1, time.time())
    while worker.is_alive():  # watchdog: a norm takes under a millisecond, a fork a few
        worker.join(0.2)
        now, forking = time.time(), helper.forking()
        if helper.progress() != norms_seen[0] or not forking:
            norms_seen = (helper.progress(), now)
        if helper.fork_progress() != forks_seen[0] or not forking:
            forks_seen = (helper.fork_progress(), now)
        for what, (_, since) in (("the computing thread", norms_seen),
                                     ("the forking threads", forks_seen)):
            if now - since > 6:
                print("hung: %s made no progress for 6 s (norms %d, forks %d)"
                      % (what, norms_seen[0], forks_seen[0]), flush=True)
                os._exit(2)
    print("hung %d wrong %d forks %d signal_forks %d parent_wrong %d norms %d at_restore %d "
          "let_go %d mask_open %d" % tuple(out), flush=True)
""")


@pytest.fixture(params=["c"], autouse=True)
def backend(request):
    """This file tests the C extension's fork handlers: once, not once per backend."""
    yield request.param


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    library = build_helper(tmp_path_factory, HELPER, "fork_signal")
    # A C library that holds its fork lock while the handlers run (glibc
    # 2.28-2.35) deadlocks any fork made inside a handler, with or without
    # dora_ref: nothing here to test there.
    probe = [sys.executable, "-c", "import ctypes, sys; "
             "sys.exit(ctypes.CDLL(sys.argv[1]).probe_fork_in_handler())", library]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("this C library deadlocks a fork made inside a fork handler (its own lock, "
                    "held while the handlers run): a signal handler's fork cannot be tested here")
    if done.returncode != 0:
        pytest.skip(f"a fork made inside a fork handler failed here (exit {done.returncode})")
    return library


def test_fork_from_a_signal_handler_during_the_fork_gate_wait_does_not_hang(helper):
    """Four rounds of 2 threads x 30 forks, a signal handler forking in the
    middle of the forks (several hundred such forks a round): neither the
    parent's computing thread nor any fork nor any child hangs, every norm
    has the serial bits, every signal is blocked from dora_ref's first fork
    handler to its last (mask_open), and signals held back by dora_ref
    during a fork come, and fork, when its last handler restores the mask.
    Before the fix, about 3 rounds in 4 hung the parent."""
    if not c._set_blas_pool(True):  # (True is the default: unchanged)
        pytest.skip("NumPy's BLAS is not a threaded OpenBLAS: no BLAS pool to stop mid-team")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    signal_forks = at_restore = 0
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
        counts = dict(zip(line.split()[0::2], (int(v) for v in line.split()[1::2])))
        assert counts["forks"] == 60, line
        assert (counts["hung"], counts["wrong"], counts["parent_wrong"]) == (0, 0, 0), \
            f"round {round_}: {line}"
        assert counts["mask_open"] == 0, f"round {round_}: a signal open inside the fork: {line}"
        assert counts["norms"] > 0, line
        signal_forks += counts["signal_forks"]
        at_restore += counts["at_restore"]
    # the cases under test happened: forks from the signal handler in the
    # middle of the forks, and among them signals held back by dora_ref
    assert signal_forks > 0 and at_restore > 0, (signal_forks, at_restore)
