/* dora_kernels.c: the fused C kernels of dora_ref, float32 and float64,
   and float32 arithmetic on bfloat16 / float16 weights.

   What a reference promises (after llm.c's train_gpt2.c): plain C99 that
   runs on any CPU, no intrinsics (but one tile of column_norm, below, with
   its plain C twin), readable next to its NumPy twin in
   dora_ref/core/kernels_numpy.py, and a few OpenMP pragmas because they are a
   large speedup at very low cost. Large matrix products (x @ W0.T, dy @ W0,
   x @ A.T) are not here: they stay with NumPy's BLAS. What is here is
   everything DoRA adds to a linear layer that BLAS cannot fuse: one pass
   over W0 for the row norms (and the merge), one pass over the (N, out)
   output for the magnitude and the rank-r update (in the backward, with
   the rank-r products dU and dB), and one pass over W0 for the two
   products of W0 that the exact norm gradient needs.

   Layout, said once: weights are PyTorch (out, in); the paper's column norm
   is the norm of each *row* here, one value per output channel.

   Build knobs (set by csrc/build_ffi.py after test compiles):
     _OPENMP                 compiled with -fopenmp
     DORA_HAVE_OMP_PAUSE     the runtime has omp_pause_resource_all (fork, below)
     DORA_HAVE_TARGET_CLONES x86-64 with GCC/Clang function multi-versioning:
                             the row workers are compiled for baseline x86-64,
                             x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512) and
                             the loader picks one for the running CPU, so the
                             wheel stays portable without -march=native. */

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "dora_kernels.h"

#ifdef DORA_HAVE_TARGET_CLONES
#define DORA_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#define DORA_CLONES_INFO "default,x86-64-v3,x86-64-v4"
#else
#define DORA_CLONES
#define DORA_CLONES_INFO "none"
#endif

/* The one exception to "no intrinsics": column_norm's six-row tiles in
   float32 (and on 16-bit W0), written with AVX2/FMA intrinsics at
   NORM_AVX2_MIN_R <= r <= NORM_AVX2_MAX_R (dora_kernels_impl.h, norm6_avx2)
   and with AVX-512 F ones up to NORM_AVX512_MAX_R (norm6_avx512_pair), each
   in functions compiled for that target alone and called only where the CPU
   has it (dora_norm_tile). GCC 12 compiled the plain C tile and its loop to
   546 instructions a tile at r = 16 for 228 FMA-unit operations (430 with
   AVX2 intrinsics). The plain C tiles stay for every other CPU and
   compiler, and give the same bits. */
#if defined(DORA_HAVE_TARGET_CLONES) && (defined(__GNUC__) || defined(__clang__)) \
    && defined(__x86_64__)
#include <immintrin.h>
#define DORA_NORM_AVX2 1
#define DORA_NORM_AVX2_INFO "yes"
#else
#define DORA_NORM_AVX2_INFO "no"
#endif

/* A team computes in the caller's floating-point mode. The SSE control
   register (MXCSR) is per thread: a library that turns on flush-to-zero
   and denormals-are-zero (FTZ/DAZ, as code built with -ffast-math does when
   it loads) or changes the rounding mode in the calling thread changes it
   there alone, and the threads of OpenMP's or OpenBLAS's pool, made
   earlier, keep theirs. Rows computed by different threads would then treat
   subnormal values differently, and the bits would follow the thread count.
   So dora_plan_begin reads the caller's FTZ, DAZ and rounding bits, each
   member takes them when it arrives and puts its own back when it leaves
   (the exception masks and flags stay each thread's own). */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <xmmintrin.h>
#define DORA_CSR_MODE 0xE040u  /* FTZ (bit 15), rounding (14-13), DAZ (bit 6) */
static inline unsigned dora_csr_get(void) { return _mm_getcsr(); }
static inline unsigned dora_csr_adopt(unsigned caller)  /* returns the thread's own */
{
    const unsigned own = _mm_getcsr();
    const unsigned want = (own & ~DORA_CSR_MODE) | (caller & DORA_CSR_MODE);
    if (want != own) _mm_setcsr(want);
    return own;
}
static inline void dora_csr_restore(unsigned own)
{
    if (_mm_getcsr() != own) _mm_setcsr(own);
}
#else  /* elsewhere no per-thread mode is carried (threads start in the default mode) */
static inline unsigned dora_csr_get(void) { return 0; }
static inline unsigned dora_csr_adopt(unsigned caller) { (void)caller; return 0; }
static inline void dora_csr_restore(unsigned own) { (void)own; }
#endif

#ifdef DORA_HAVE_OMP_PAUSE
#define DORA_PAUSE_INFO "yes"
#else
#define DORA_PAUSE_INFO "no"
#endif

#ifdef _OPENMP
#define DORA_OPENMP_INFO "yes"
#else
#define DORA_OPENMP_INFO "no"
#endif

#define G 4                       /* rows that share each load of A (tile_full spells out 4) */
#define ACCW 8                    /* double lanes of a sum of squares */
#define ROW_BLOCK 16              /* rows a thread takes at a time (a multiple of G) */
#define COL_BLOCK 256             /* columns a thread takes in the backward */
#define NG 6                      /* rows of column_norm's six-row tile (norm_full6 spells out 6) */
#define NORM_ROW_BLOCK 60         /* rows a thread takes at a time in column_norm (a multiple of G and NG) */
#define NORM_SIX_MIN_R 16         /* column_norm takes NG-row tiles from this rank on (fused mode) */
#define NORM_FMA_SQUARES_MAX_R 32 /* column_norm adds its float32 squares by fma below this rank (fused mode) */
#define NORM_AVX2_MIN_R 8         /* column_norm's AVX2 six-row tile from this rank (float32 arithmetic) */
#define NORM_AVX2_MAX_R 32        /* ... up to this one (norm6_avx2) */
#define NORM_AVX512_MAX_R 64      /* ... or this one with AVX-512 (norm6_avx512_pair) */
#define NORM_AVX512_PREFETCH 64   /* columns ahead that norm6_avx512_group prefetches W0 (2 pairs) */
#define FWD_COL_BLOCK 64          /* columns a block of the forward by columns has (a multiple of W) */
#define NORM_WHOLE_BYTES 1048576  /* A up to this size (counted in float64) is read whole in column_norm */
#define NORM_CHUNK_BYTES 32768    /* else column_norm takes it in chunks of this size (L1) */

#define LOWRANK_COL_BLOCK 512     /* columns a thread takes in backward_lowrank (at least) */
#define LOWRANK_ROW_TASKS 4       /* row blocks backward_lowrank cuts one column block into (at most) */
#define LOWRANK_ROW_MIN_ELEMS 32768  /* elements of dz a row block has (at least) */
#define SLICES_MAX 8              /* most row slices of W0 in norm_gradient_products */
#define PRODUCT_CHUNK 512         /* columns of W0 a slice takes at a time there */
#define CHUNK_LD (PRODUCT_CHUNK + 16)  /* row stride of that chunk's sums */
#define SUM_BLOCK 4096            /* elements a thread takes at a time in a sum of partials */

static inline int64_t dora_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t dora_max(int64_t a, int64_t b) { return a > b ? a : b; }
static inline double dora_max_d(double a, double b) { return a > b ? a : b; }
static inline double dora_min_d(double a, double b) { return a < b ? a : b; }

/* column_norm's chunk of columns: all `in` columns when A (r x in, counted
   in float64) is at most NORM_WHOLE_BYTES, so at most the 512 KiB of a
   float32 A at r = 32, in = 4096, since then a group of rows streams
   through W0's rows without restarts (AVX2 EPYC, 2 threads, busy: chunks
   were 1.3x slower at r = 8, 16 and no faster at r = 32); otherwise a whole
   number of tiles (W = 16 floats or 8 doubles: a multiple of 16 suits both)
   whose r rows of A fill NORM_CHUNK_BYTES, which stay in L1 while all the
   block's rows take them (r = 64, in = 4096: 0.82-0.89x the median time of
   whole rows, over six runs). */
static inline int64_t norm_chunk(int64_t r, int64_t in)
{
    if (8 * r * in <= NORM_WHOLE_BYTES) return dora_max(1, in);
    const int64_t cols = NORM_CHUNK_BYTES / (8 * dora_max(1, r));
    return dora_max(16, cols / 16 * 16);
}

/* Whether the norm, merge and unmerge tiles add their rank-r terms with fused
   multiply-adds (dora_kernels_impl.h, FN(madd)): where the CPU has FMA, so
   on the machines that run the x86-64-v3 and v4 clones. Elsewhere (another
   architecture, a compiler without __builtin_cpu_supports, an x86-64 CPU
   without FMA) the tiles keep a multiply and an add. Fixed for the process:
   the bits do not depend on the number of threads or the layout, and a
   machine with FMA and one without may differ in the last bits of P. */
static int dora_fma_ok(void)
{
#if defined(DORA_HAVE_TARGET_CLONES) && (defined(__GNUC__) || defined(__clang__))
    return __builtin_cpu_supports("fma") ? 1 : 0;
#else
    return 0;
#endif
}

/* Whether column_norm may take its AVX2/FMA six-row tile (norm6_avx2):
   built for x86-64, and the CPU has AVX2 and FMA (the x86-64-v3 clone's
   machines). Fixed for the process; the bits are those of the plain C tile. */
static int dora_norm_avx2_ok(void)
{
#ifdef DORA_NORM_AVX2
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
    return 0;
#endif
}

/* Whether column_norm may take its AVX-512 six-row tiles (norm6_avx512_pair)
   in place of the AVX2 one: the CPU has AVX-512 F (GCC's check includes the
   OS's saving of the zmm registers) and FMA. Fixed for the process; the same bits. */
static int dora_norm_avx512_ok(void)
{
#ifdef DORA_NORM_AVX2
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
    return 0;
#endif
}

/* The block sizes of the two reductions, set by the sizes alone (never by the
   number of threads), so that the order of every sum is fixed.

   backward_lowrank: columns per block, LOWRANK_COL_BLOCK widened (to a multiple of 16,
   a whole number of tiles of either type) so that the blocks' partial sums of
   dU, one (N, r) array a block, stay within 1/16 of dz's size. */
static int64_t lowrank_col_block(int64_t out, int64_t r)
{
    const int64_t blocks = dora_max(1, out / (16 * dora_max(1, r)));
    const int64_t width = ((out + blocks - 1) / blocks + 15) / 16 * 16;
    return dora_max(LOWRANK_COL_BLOCK, width);
}

/* backward_lowrank: rows per block. Where out is one column block (out <= 512
   at r <= 16), the columns alone gave one block, one thread, at any N: a tall
   dz (64 x 2048, r = 8, float32) took 456 us on one thread against NumPy's
   289 us (epilogue and two BLAS products, which OpenBLAS splits over both
   cores; 2-core EPYC Zen 3, minima). There N is cut into at most
   LOWRANK_ROW_TASKS blocks of whole groups of 16 rows, each with at least
   LOWRANK_ROW_MIN_ELEMS elements of dz (so small N, the demo's N = 64
   layers among them, stay one block with the bits they had) and at least
   32 (r + 2) rows, so that the blocks' partials of dg (doubles) and dB
   (r REALs a column) stay within 1/16 of dz's size. Several column blocks
   already make a team: N stays whole there (the bits they had). Set by
   (N, out, r) alone, never by the number of threads. */
static int64_t lowrank_row_block(int64_t N, int64_t out, int64_t r)
{
    if (out > lowrank_col_block(out, r) || N <= 0) return dora_max(1, N);
    int64_t rows = (N + LOWRANK_ROW_TASKS - 1) / LOWRANK_ROW_TASKS;
    rows = dora_max(rows, (LOWRANK_ROW_MIN_ELEMS + out - 1) / dora_max(1, out));
    rows = dora_max(rows, 32 * (dora_max(1, r) + 2));
    rows = (rows + 15) / 16 * 16;
    return dora_min(rows, N);
}

/* norm_gradient_products: row slices of W0, each with its own (r, in) partial
   sum of C.T @ W0; at most out / (32 r) of them, so that the partials stay
   within 1/32 of W0's size, and at most SLICES_MAX. */
static int64_t products_slices(int64_t out, int64_t r)
{
    return dora_max(1, dora_min(SLICES_MAX, out / (32 * dora_max(1, r))));
}

/* ------------------------------------------------------------------------ */
/* How many threads a call uses (dora_plan), and fork.                      */
/*                                                                          */
/* Every parallel region has an explicit num_threads(plan.nt), chosen per   */
/* call by dora_plan_begin from a cost model measured in this process:      */
/*   T = rate * work                   the call's serial time, from the     */
/*                                     recent calls of the same shape       */
/*                                     (kernel, element type, work, blocks: */
/*                                     a slowly rising minimum of their     */
/*                                     rates, ns per unit of work);         */
/*   L = region_ns                     what opening a team costs now: the   */
/*                                     delay until its last thread starts,  */
/*                                     measured in every parallel region.   */
/* A team of nt threads saves at most T (1 - 1/nt) and costs about L, so a  */
/* call goes parallel only when T > 4 L. On a busy machine a woken thread   */
/* waits for a time slice, L grows to milliseconds and small calls stay on  */
/* one thread (a barrier then never waits for the scheduler). While calls   */
/* stay serial L is not measured, so after probe_interval seconds without a */
/* team a call that would pay on a quiet machine (T > 4 L_min) goes         */
/* parallel again (a probe) to see whether the load has gone.               */
/*                                                                          */
/* A parallel call that ends later than its predicted serial time T lost:   */
/* its team cost at least wall - T / nt, more than the start delay shows    */
/* (a thread preempted mid-region makes the barrier wait a whole slice),    */
/* so that excess is L's sample, and probe_interval doubles (from           */
/* PROBE_INTERVAL up to PROBE_INTERVAL_MAX); a call that wins sets it back. */
/* Measured with one busy process on 2 cores (column_norm, (1024, 1024),    */
/* r = 8, in a training step): 13 of 21 probes a 0.1 s apart lost, 1.4 ms  */
/* each on average, against 0.5 ms of predicted serial time; backing off    */
/* bounds what losing probes cost to a few ms every few seconds. And a      */
/* probe first reads how many threads are runnable (dora_cores_free): with  */
/* no idle core for the team it is skipped until the next interval. Before */
/* this test, bench_busy --quick's quiet level on a machine kept at load    */
/* 5-7 by other jobs made 71 probes in 5 minutes, 66 lost (1.1 s in all);   */
/* with it, the training step above with one busy process made no probe    */
/* (28 gated) where it had made 5-7, 4-5 of them lost (13-30 ms).          */
/* The test counts this process's own runnable threads apart when the team */
/* runs on OpenBLAS's workers (dora_team_fits): after every product those  */
/* workers spin, runnable, for ~0.1 s, and a training loop always follows  */
/* a product, so counting them as busy refused every probe on 2 cores: one */
/* lost call (L of ms) kept every kernel serial for the rest of the run,   */
/* quiet or not (bench_busy --cells, load ~7: L stayed at 3.5 ms).         */
/* The rate is kept per call shape (rate_slots), not per kernel: one      */
/* kernel's rate spans 200x over bench_busy's grid (forward_epilogue,      */
/* serial: 0.04 ns a unit at (4096, 4096), r = 64, N = 256, float32; 8.6 ns */
/* at r = 1, N = 2048, float64, out of cache), and with one rate per kernel */
/* a call after a cheaper shape (the grid runs float64 right after float32, */
/* 4.4x apart there) was predicted several times too fast for tens of      */
/* calls: a team that beat the real serial time counted as lost, inflated  */
/* L and backed the probes off (--full, quiet: 1,648 of 21,796 parallel     */
/* calls "lost", mostly at large cells). A new shape is planned by the     */
/* latest rate of its kernel, type and size class (class_rates: N varying  */
/* from step to step), and its call is not judged lost; the first call of  */
/* a class runs on one thread to measure it.                                */
/* The bits never depend on nt.                                             */
/*                                                                          */
/* Fork: libgomp's worker threads do not exist in a forked child, but its   */
/* pool still lists them, so the child's first team would wait for them     */
/* forever. Before every fork (pthread_atfork) the forking thread's pool is */
/* released with omp_pause_resource_all (OpenMP 5.0): the child then starts */
/* a new pool when it needs one. A fork while another thread is inside a    */
/* call first waits for that call's team to finish (teams_in_flight,        */
/* dora_fork_gate_close; at most the call's time, 1.4-1.8 ms median a fork  */
/* against 0.8 with nothing in flight, 2048 x 2048 norms, 2 shared cores),  */
/* and no team starts until the fork is done: calls meanwhile run on one    */
/* thread. Before, the fork stopped OpenBLAS's workers in the middle of a   */
/* team's job (OpenBLAS's own prepare handler) and both the parent's caller */
/* and the child's first team waited forever. If the pool cannot be         */
/* released (an older runtime, a fork from inside a parallel region or from */
/* inside a call, a wait that reached its limit), the child runs every      */
/* kernel on one thread.                                                    */
/* ------------------------------------------------------------------------ */

enum dora_kernel_id {
    K_NORM, K_MERGE, K_UNMERGE, K_FORWARD, K_BACKWARD, K_LOWRANK, K_LOWRANK_SUM,
    K_PRODUCTS, K_PRODUCTS_SUM,
    /* the variants that write or read the z a training forward keeps: their own
       rates (the forward's writes one more (N, out) array than its eval twin at the
       same shape; the backward's skip the rank-r product) */
    K_FORWARD_Z, K_BACKWARD_Z, K_LOWRANK_Z, K_COUNT
};

#define MAX_TEAM 64             /* threads a team may have (arrival times kept) */
#define PROBE_INTERVAL 0.1      /* seconds between parallel probes while serial */
#define PROBE_INTERVAL_MAX 6.4  /* ... at most, after probes that lost (0.1 * 2^6) */
#define RATE_TYPES 3            /* element types: float32, float64, 16-bit storage */
#define RATE_SLOTS DORA_RATE_SLOTS  /* serial rates kept, one per call shape (a power of 2) */
#define RATE_SIZES 20           /* size classes of work, by factors of 4 (dora_rate_size_class) */

typedef struct { double work; int64_t nblocks; int kernel_type; double rate; } dora_rate_slot;

typedef struct {
    int kernel, nt, probe;
    int entered;                /* holds a place among the teams in flight (dora_flight_enter) */
    dora_rate_slot *slot;       /* its serial rate's slot */
    double *class_rate;         /* the latest rate of its kernel, type and size class */
    int guessed;                /* T is from class_rate: another shape's (not judged) */
    int kernel_type;            /* kernel * RATE_TYPES + element type */
    int64_t nblocks;
    double work, t0, T;
    double arrive[MAX_TEAM];    /* when each thread of the team started */
    double leave[MAX_TEAM];     /* ... and when it ran out of work */
    unsigned csr;               /* the caller's floating-point mode (dora_csr_get) */
    unsigned own_csr[MAX_TEAM]; /* each member's own, put back when it leaves */
} dora_plan;

static int threads_setting = 0;     /* 0 until first use: omp_get_max_threads() */
static int policy_setting = 0;      /* 0 auto (the cost model), 1 always nt threads */
static int fork_pause_setting = 1;  /* release the pool before fork (else: serial child) */
static int child_serial = 0;        /* set in a forked child whose pool was not released */
static double region_ns = 0;        /* L: recent cost of opening a team; 0: not measured */
static double region_min_ns = 0;    /* the smallest L seen */
static double last_parallel = 0;    /* when the last team ran */
static double last_gate = 0;        /* when a probe was last refused by dora_cores_free */
static double probe_interval = PROBE_INTERVAL;  /* seconds without a team before a probe */
static uintptr_t blas_pool_fn = 0;  /* gotoblas_pthread, or 0: OpenMP teams (dora_team_run) */
static int blas_pool_threads = 0;   /* OpenBLAS's threads, caller included */

/* Counters of the plan's decisions, per kernel, for dora_plan_stats. */
enum { S_CALLS, S_PARALLEL, S_PROBES, S_LOST, S_LOST_NS, S_START_NS, S_WALL_NS, S_PREDICT_NS,
       S_GATED, S_SPREAD_NS, S_COUNT };
static double plan_stats[K_COUNT][S_COUNT];
#define STAT_ADD(k, s, v) do { _Pragma("omp atomic") plan_stats[k][s] += (v); } while (0)

#ifdef _OPENMP
static double dora_now(void) { return omp_get_wtime(); }
#define LOAD(x, v) do { _Pragma("omp atomic read") v = x; } while (0)
#define STORE(x, v) do { _Pragma("omp atomic write") x = v; } while (0)
#else
static double dora_now(void) { return 0; }
#define LOAD(x, v) ((v) = (x))
#define STORE(x, v) ((x) = (v))
#endif

static int dora_threads_now(void)
{
    int nt, serial;
    LOAD(threads_setting, nt);
    LOAD(child_serial, serial);
#ifdef _OPENMP
    if (nt <= 0) nt = omp_get_max_threads();
#else
    nt = 1;
#endif
    return serial ? 1 : dora_max(1, dora_min(nt, MAX_TEAM));
}

#ifdef _OPENMP
/* The largest team libgomp has been seen able to start from this thread (1:
   none yet, or its threads were freed: omp_pause_resource_all before a fork,
   a new child). Per calling thread: libgomp keeps a pool of threads for each
   thread that starts teams, so another thread's first team creates threads
   of its own. */
static __thread int omp_team_verified = 1;

/* The stack size libgomp gives its threads, read as libgomp reads it when it
   loads (dora_omp_stack_at_load, a constructor: a later change to the
   environment changes neither): OMP_STACKSIZE if valid, else GOMP_STACKSIZE
   if valid, else 0 (the default). */
static size_t omp_stacksize = 0;

/* libgomp's parse_stacksize: spaces, a decimal number, spaces, an optional
   B, K, M or G (K without one), spaces, the end; anything else is invalid. */
static int dora_parse_stacksize(const char *v, size_t *out)
{
    if (!v) return 0;
    while (*v == ' ' || *v == '\t' || *v == '\n') v++;
    if (*v < '0' || *v > '9') return 0;
    char *end;
    errno = 0;
    const unsigned long long n = strtoull(v, &end, 10);
    if (errno) return 0;
    while (*end == ' ' || *end == '\t' || *end == '\n') end++;
    int shift = 10;
    if (*end) {
        switch (*end | 0x20) {
        case 'b': shift = 0; break;
        case 'k': shift = 10; break;
        case 'm': shift = 20; break;
        case 'g': shift = 30; break;
        default: return 0;
        }
        end++;
        while (*end == ' ' || *end == '\t' || *end == '\n') end++;
        if (*end) return 0;
    }
    if (((n << shift) >> shift) != n) return 0;
    *out = (size_t)(n << shift);
    return 1;
}

__attribute__((constructor)) static void dora_omp_stack_at_load(void)
{
    size_t v = 0;
    if (dora_parse_stacksize(getenv("OMP_STACKSIZE"), &v)
        || dora_parse_stacksize(getenv("GOMP_STACKSIZE"), &v))
        omp_stacksize = v;
}

static void *dora_idle_thread(void *arg) { return arg; }

/* Whether libgomp can start a team of nt threads from this thread. It
   creates the nt - 1 other threads when a team first needs them, and when
   pthread_create fails (a memory limit, RLIMIT_AS, or a limit on processes)
   it prints "Thread creation failed" and ends the process, with nothing a
   caller could catch (session 10's adversary: the merge command killed that
   way under prlimit --as, its temporary output left behind). So before a
   team larger than any this thread has started, dora_ref creates nt - 1
   threads itself, with libgomp's stack size, and joins them; if one cannot
   be created the call runs on one thread (where a failed allocation is an
   error it returns). Memory taken by another thread between this test and
   libgomp's own creation can still end the process: a window of
   microseconds, once per thread. */
static int dora_omp_team_ok(int nt)
{
    if (nt <= omp_team_verified) return 1;
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0) return 0;
    if (omp_stacksize) pthread_attr_setstacksize(&attr, omp_stacksize);  /* as libgomp: on failure, the default */
    pthread_t threads[MAX_TEAM];
    int made = 0;
    while (made < nt - 1 && pthread_create(&threads[made], &attr, dora_idle_thread, NULL) == 0) made++;
    for (int t = 0; t < made; t++) pthread_join(threads[t], NULL);
    pthread_attr_destroy(&attr);
    if (made < nt - 1) return 0;
    omp_team_verified = nt;
    return 1;
}

/* L from a few empty teams, the first time a call might go parallel. */
static void dora_measure_region(int nt)
{
    double best = 1e30, sum = 0;
    for (int rep = 0; rep < 3; rep++) {
        double arrive[MAX_TEAM] = {0};
        const double t0 = dora_now();
        #pragma omp parallel num_threads(nt)
        arrive[omp_get_thread_num()] = dora_now();
        double last = t0;
        for (int t = 0; t < nt; t++) last = arrive[t] > last ? arrive[t] : last;
        const double L = (last - t0) * 1e9;
        best = L < best ? L : best;
        sum += L;
    }
    STORE(region_min_ns, best);
    STORE(region_ns, sum / 3);  /* (not a recent team: the first decision asks for the cores) */
}
#endif

/* The number of runnable threads in the text of /proc/loadavg (its fourth
   field, "running/total"), or -1 if the text does not have one. */
long dora_loadavg_running(const char *text)
{
    const char *q = text;
    for (int field = 0; field < 3; field++) {  /* skip the three load averages */
        q = strchr(q, ' ');
        if (!q) return -1;
        q++;
    }
    char *end;
    const long running = strtol(q, &end, 10);
    return end != q && *end == '/' && running >= 0 ? running : -1;
}

/* Whether a team of nt threads (the caller and nt - 1 members) finds its
   cores, from what the machine runs now: `running` runnable threads in all
   (/proc/loadavg, the caller included), `own` of them this process's (the
   caller included; 0 if unknown), `cores` online. Every runnable thread
   but the caller competes with the members, except, when the team runs on
   OpenBLAS's workers (on_pool), up to nt - 1 of the process's own: right
   after a BLAS product its workers spin, runnable, for about 0.1 s, waiting
   for the job the team gives them. (Counting them as busy, a probe on 2
   cores in a training loop, which always follows a product, was always
   refused: one lost call then kept every kernel serial for good.) */
int dora_team_fits(long running, long own, long cores, int nt, int on_pool)
{
    if (running <= 0 || cores <= 0) return 1;  /* unknown: let the probe measure */
    long competitors = running - 1;
    if (on_pool && own > 1) competitors -= dora_min(own - 1, nt - 1);
    return cores - dora_max(0, competitors) >= nt;
}

/* 1 if the state field of a /proc/<pid>/task/<tid>/stat text (after the
   command's closing parenthesis) is R (running or runnable), else 0. */
int dora_stat_runnable(const char *text)
{
    const char *q = strrchr(text, ')');
    return q && q[1] == ' ' && q[2] == 'R';
}

#if defined(__linux__) && defined(_OPENMP)
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

/* The text of a small file of /proc into buf; its length, or -1. */
static ssize_t dora_read_small(const char *path, char *buf, size_t size)
{
    const int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    const ssize_t len = read(fd, buf, size - 1);
    close(fd);
    if (len <= 0) return -1;
    buf[len] = 0;
    return len;
}

/* This process's runnable threads (/proc/self/task/<tid>/stat), the
   caller included, counted up to `limit` (0: all); 0 if they cannot be
   read. (About 30 us for a handful of threads: a probe reads it only when
   the load alone refuses the team, and stops at the team's size.)
   At most OWN_SCAN_MAX threads are read, the first in /proc's order (by
   thread id: the main thread, then OpenBLAS's workers, started when NumPy
   loads, come first): each costs an open and read of about 8 us, and a
   process with 200 idle threads (a server's pool) paid 1.6 ms a gated
   probe reading all of them (issue: adversarial s5, many threads). A
   thread left unread counts as not runnable: fewer own threads, more
   competitors, so the bound can only refuse a team, never open one. */
#define OWN_SCAN_MAX 32
long dora_own_runnable(long limit)
{
    DIR *dir = opendir("/proc/self/task");
    if (!dir) return 0;
    long runnable = 0, scanned = 0;
    char path[64], buf[512];
    for (struct dirent *e = readdir(dir);
         e && (limit <= 0 || runnable < limit) && scanned < OWN_SCAN_MAX; e = readdir(dir)) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        scanned++;
        snprintf(path, sizeof path, "/proc/self/task/%.24s/stat", e->d_name);
        if (dora_read_small(path, buf, sizeof buf) > 0) runnable += dora_stat_runnable(buf);
    }
    closedir(dir);
    return runnable;
}

/* 1 if the machine has cores for a team of nt (dora_team_fits), or if
   that cannot be read; 0 if not. A probe reads it before it opens a team,
   so that on a machine whose cores other processes take the probe does not
   pay a time slice to find out. */
static int dora_cores_free(int nt, int on_pool)
{
    char buf[128];
    if (dora_read_small("/proc/loadavg", buf, sizeof buf) < 0) return 1;
    const long running = dora_loadavg_running(buf);
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (dora_team_fits(running, 0, cores, nt, 0)) return 1;
    return on_pool && dora_team_fits(running, dora_own_runnable(nt), cores, nt, 1);
}
#else
long dora_own_runnable(long limit) { (void)limit; return 0; }
static inline int dora_cores_free(int nt, int on_pool) { (void)nt; (void)on_pool; return 1; }
#endif

/* The kernels whose teams run on dora_team_for (OpenBLAS's workers when
   registered, dora_team_run); merge and unmerge open OpenMP teams. */
static int dora_kernel_on_pool(int kernel, int nt)
{
    uintptr_t pool;
    int pool_threads;
    LOAD(blas_pool_fn, pool);
    LOAD(blas_pool_threads, pool_threads);
    return pool && nt <= pool_threads && kernel != K_MERGE && kernel != K_UNMERGE;
}

/* The plan's decision for a call of predicted serial time T (ns), from the
   cost of a team L and its smallest L_min (ns), the seconds since the last
   team and since the last team or refused probe, and the probe interval:
   DORA_PLAN_TEAM when L, measured by a team within the interval, says a
   team pays (T > 4 L); DORA_PLAN_ASK when a team might pay but nothing was
   measured or refused for an interval: a probe (T > 4 L_min only), or a
   team that pays by an L that old; either opens only if the cores are
   free (dora_cores_free). Before, an old L opened a team unasked: the
   first team after startup or after a serial spell could find every core
   taken (bench_busy --cells at load ~7: a column norm of 0.5 ms predicted
   lost 12 ms). DORA_PLAN_SERIAL otherwise. */
int dora_plan_decide(double T, double L, double Lmin, double since_team, double since_check,
                     double interval)
{
    const int pays = T > 4 * L;
    if (pays && since_team <= interval) return DORA_PLAN_TEAM;
    if ((pays || T > 4 * Lmin) && since_check > interval) return DORA_PLAN_ASK;
    return DORA_PLAN_SERIAL;
}

/* The slot of a call's serial rate: its kernel, element type, work and
   number of blocks, all four exactly (a layer calls a kernel with the same
   ones every step); a slot already held by another shape is taken over. */
static dora_rate_slot rate_slots[RATE_SLOTS];
/* The rate of the latest call of each kernel, type and size class: the guess
   for a shape not in rate_slots (a new one, or one taken over), so that
   calls whose shapes keep changing (N varying from step to step) are
   planned as before rather than all run alone to measure a rate. */
static double class_rates[K_COUNT][RATE_TYPES][RATE_SIZES];

/* The size class of a call's work: floor(log4(work)), 0 below 4, at most
   RATE_SIZES - 1. */
int dora_rate_size_class(double work)
{
    int e = 0;
    if (!(work >= 4)) return 0;
    frexp(work, &e);  /* 2^(e-1) <= work < 2^e */
    return (int)dora_min((e - 1) / 2, RATE_SIZES - 1);
}

int dora_rate_slot_index(int kernel, int type, double work, int64_t nblocks)
{
    uint64_t bits;
    memcpy(&bits, &work, sizeof bits);
    uint64_t h = bits ^ ((uint64_t)nblocks * 0x9E3779B97F4A7C15u) ^ ((uint64_t)(kernel * RATE_TYPES + type) << 56);
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9u;
    h ^= h >> 32;
    return (int)(h & (RATE_SLOTS - 1));
}

/* The serial rate of the call p plans, ns per unit of work; 0 if its slot
   holds another shape's (or none). */
static double dora_rate_get(const dora_plan *p)
{
    double work, rate;
    int64_t nblocks;
    int kt;
    LOAD(p->slot->work, work);
    LOAD(p->slot->nblocks, nblocks);
    LOAD(p->slot->kernel_type, kt);
    LOAD(p->slot->rate, rate);
    return work == p->work && nblocks == p->nblocks && kt == p->kernel_type ? rate : 0;
}

static void dora_rate_set(const dora_plan *p, double rate)
{
    STORE(p->slot->rate, 0);  /* a reader between these stores sees no rate, not another's */
    STORE(p->slot->work, p->work);
    STORE(p->slot->nblocks, p->nblocks);
    STORE(p->slot->kernel_type, p->kernel_type);
    STORE(p->slot->rate, rate);
}

/* The kernels call dora_plan_begin(p, kernel, work, nblocks); the macro adds
   their element type (RATE_TYPE, defined where dora_kernels_impl.h is
   included). */
#define dora_plan_begin(p, kernel, work, nblocks) \
    dora_plan_begin_typed(p, kernel, work, nblocks, RATE_TYPE)

/* The rate that predicts the call p plans: its shape's, else (a new shape:
   p->guessed) the latest of its kernel, type and size class, else 0. */
static double dora_plan_rate(dora_plan *p)
{
    double rate = dora_rate_get(p);
    p->guessed = rate == 0;
    if (p->guessed) LOAD(*p->class_rate, rate);
    return rate;
}

static void dora_plan_where(dora_plan *p, int kernel, int type, double work, int64_t nblocks)
{
    p->kernel = kernel;
    p->work = work;
    p->slot = &rate_slots[dora_rate_slot_index(kernel, type, work, nblocks)];
    p->kernel_type = kernel * RATE_TYPES + type;
    p->class_rate = &class_rates[kernel][type][dora_rate_size_class(work)];
    p->guessed = 0;
    p->nblocks = nblocks;
}

double dora_plan_rate_for_tests(int kernel, int type, double work, int64_t nblocks, int *guessed)
{
    dora_plan p;
    dora_plan_where(&p, kernel, type, work, nblocks);
    const double rate = dora_plan_rate(&p);
    *guessed = p.guessed;
    return rate;
}

/* Teams in flight, for fork (dora_before_fork): a call takes a place
   (dora_flight_enter) before it opens a team, the empty teams that measure
   L included, and gives it back when the team has finished (dora_plan_end);
   while a fork is under way (fork_pending > 0, from its prepare handler to
   its parent handler) no place is given and the call runs on one thread.
   The accesses are sequentially consistent: either the call sees the
   fork's fork_pending, or the fork sees the call's place, never neither.
   A call that runs on one thread takes no place (and pays nothing). */
#ifdef _OPENMP
static int teams_in_flight = 0;
static int fork_pending = 0;
static _Thread_local int places_held = 0;  /* this thread's (a fork from inside a call) */

static int dora_flight_enter(void)
{
    int pending;
    #pragma omp atomic update seq_cst
    teams_in_flight++;
    #pragma omp atomic read seq_cst
    pending = fork_pending;
    if (!pending) {
        places_held++;
        return 1;
    }
    #pragma omp atomic update seq_cst
    teams_in_flight--;
    return 0;
}

static void dora_flight_leave(void)
{
    places_held--;
    #pragma omp atomic update seq_cst
    teams_in_flight--;
}
#endif

#ifdef _OPENMP
/* The plan's decision for a call that may open a team of p->nt > 1:
   p->nt, p->probe, p->T and p->t0 (dora_plan_begin). */
static void dora_plan_choose(dora_plan *p, int kernel, double work)
{
    int policy;
    LOAD(policy_setting, policy);
    if (policy == 1) return;
    double rate, L, Lmin, last;
    rate = dora_plan_rate(p);
    if (rate == 0) {  /* none: the call runs alone, to measure its rate */
        p->nt = 1;
        return;
    }
    LOAD(region_ns, L);
    if (L == 0 && dora_flight_enter()) {  /* (else a fork is under way: measured later) */
        dora_measure_region(p->nt);
        dora_flight_leave();
        LOAD(region_ns, L);
    }
    double interval, gated;
    LOAD(region_min_ns, Lmin);
    LOAD(last_parallel, last);
    LOAD(last_gate, gated);
    LOAD(probe_interval, interval);
    const double T = rate * work;
    const int decision = dora_plan_decide(T, L, Lmin, p->t0 - last,
                                          p->t0 - dora_max_d(last, gated), interval);
    int probe = 0;
    if (decision == DORA_PLAN_ASK) {
        if (dora_cores_free(p->nt, dora_kernel_on_pool(kernel, p->nt))) {
            probe = !(T > 4 * L);  /* else a team pays by an L older than an interval */
        } else {  /* no idle core: try again an interval later */
            STORE(last_gate, p->t0);
            STAT_ADD(kernel, S_GATED, 1);
            p->nt = 1;
        }
    } else if (decision == DORA_PLAN_SERIAL) {
        p->nt = 1;
    }
    p->probe = probe;
    p->T = T;
    p->t0 = dora_now();
}
#endif

static void dora_plan_begin_typed(dora_plan *p, int kernel, double work, int64_t nblocks,
                                  int type)
{
    dora_plan_where(p, kernel, type, work, nblocks);
    p->probe = 0;
    p->T = 0;
    p->entered = 0;
    p->nt = (int)dora_min(dora_threads_now(), dora_max(1, nblocks));
    /* not noted yet: a member the runtime does not start leaves its times 0 (dora_plan_end
       skips them), whichever way the team is decided below, forced teams included */
    for (int t = 0; t < p->nt; t++) p->arrive[t] = p->leave[t] = 0;
    p->csr = dora_csr_get();
    p->t0 = dora_now();
#ifdef _OPENMP
    if (p->nt <= 1) return;
    if (!dora_omp_team_ok(p->nt)) {  /* libgomp could not start the team: it would end the process */
        p->nt = 1;
        return;
    }
    dora_plan_choose(p, kernel, work);
    if (p->nt > 1) {
        if (dora_flight_enter())
            p->entered = 1;  /* given back by dora_plan_end, once the team has finished */
        else
            p->nt = 1;  /* a fork is under way: no team until it has forked */
    }
#endif
}

/* Called by every thread of the team when it starts: notes the time and
   takes the caller's floating-point mode. */
static inline void dora_plan_arrive(dora_plan *p)
{
#ifdef _OPENMP
    if (p->nt > 1) {
        const int t = omp_get_thread_num();
        p->own_csr[t] = dora_csr_adopt(p->csr);
        p->arrive[t] = dora_now();
    }
#else
    (void)p;
#endif
}

/* Called by every thread of the team when it has no block left: notes the
   time and puts the thread's own floating-point mode back. */
static inline void dora_plan_leave(dora_plan *p)
{
#ifdef _OPENMP
    if (p->nt > 1) {
        const int t = omp_get_thread_num();
        p->leave[t] = dora_now();
        dora_csr_restore(p->own_csr[t]);
    }
#else
    (void)p;
#endif
}

/* What a parallel call taught: its team's start delay, its wall time, its
   predicted serial time T (0: the policy forced the team, nothing was
   predicted), the spread of its members' finishing times, in ns, and
   whether it was a probe, at time t1 (s). Updates L, L_min, the time of
   the last team and probe_interval (the rules above); returns 1 if the
   call lost.
   A lost call's sample of L is its excess over a perfect split,
   wall - T / nt, but no more than the delays that fell on some members and
   not on others: the start delay plus the spread of the finishing times.
   A member preempted by another process (a busy core) starts or finishes
   late while the others wait: that counts in full. A stall of the whole
   process (every vCPU of a virtual machine descheduled by its host, a page
   fault storm) delays every member alike and would have delayed one thread
   as much: it is not the team's cost.
   L follows its samples by a moving average (0.75 old + 0.25 new), except
   after a probe that won: a probe asks whether what made teams lose has
   gone, and a win says it has, so L becomes that probe's sample. (With the
   average alone, one lost call on a quiet 2-core VM, one vCPU stalled for
   9-20 ms, set L to 2-5 ms, and a 3.5 ms column norm ran on one thread,
   7 ms, in a fifth of the next 300 calls, until three or four winning
   probes had brought L down.) */
static int dora_plan_observe(double start, double wall, double T, int nt, double t1, double spread,
                             int probe)
{
    const int lost = T > 0 && wall > T;
    const double L = lost ? dora_max_d(start, dora_min_d(wall - T / nt, start + spread)) : start;
    double Lold, Lmin;
    LOAD(region_ns, Lold);
    LOAD(region_min_ns, Lmin);
    STORE(region_ns, Lold == 0 || (probe && !lost) ? L : 0.75 * Lold + 0.25 * L);
    STORE(region_min_ns, Lmin == 0 || start < Lmin ? start : Lmin);
    STORE(last_parallel, t1);
    if (T > 0) {
        double interval;
        LOAD(probe_interval, interval);
        interval = lost ? (2 * interval < PROBE_INTERVAL_MAX ? 2 * interval : PROBE_INTERVAL_MAX)
                        : PROBE_INTERVAL;
        STORE(probe_interval, interval);
    }
    return lost;
}

static void dora_plan_end(dora_plan *p)
{
#ifdef _OPENMP
    const double t1 = dora_now();
    const double rate = dora_rate_get(p);
    const double wall = (t1 - p->t0) * 1e9;
    double sample = wall / (p->work > 1 ? p->work : 1);
    STAT_ADD(p->kernel, S_CALLS, 1);
    if (p->nt > 1) {
        double last = p->t0;
        for (int t = 0; t < p->nt; t++) last = p->arrive[t] > last ? p->arrive[t] : last;
        const double start = (last - p->t0) * 1e9;
        double first = t1, final = p->t0;  /* the members' earliest and latest finish */
        for (int t = 0; t < p->nt; t++) {
            if (p->leave[t] < p->t0) continue;  /* not noted (a runtime gave fewer threads) */
            first = p->leave[t] < first ? p->leave[t] : first;
            final = p->leave[t] > final ? p->leave[t] : final;
        }
        const double spread = dora_max_d(0, (final - first) * 1e9);
        /* a T guessed from another shape's rate is not judged (as a forced team's) */
        const int lost = dora_plan_observe(start, wall, p->guessed ? 0 : p->T, p->nt, t1, spread,
                                           p->probe);
        STAT_ADD(p->kernel, S_SPREAD_NS, spread);
        STAT_ADD(p->kernel, S_PARALLEL, 1);
        STAT_ADD(p->kernel, S_PROBES, p->probe);
        STAT_ADD(p->kernel, S_LOST, lost);
        STAT_ADD(p->kernel, S_LOST_NS, lost ? wall - p->T : 0);
        STAT_ADD(p->kernel, S_START_NS, start);
        STAT_ADD(p->kernel, S_WALL_NS, wall);
        STAT_ADD(p->kernel, S_PREDICT_NS, p->T);
        sample *= p->nt;  /* the team's time, as if one thread had done it all */
    }
    /* a minimum that rises 2 % a call: a preempted call does not inflate it,
       a kernel that really got slower (larger sizes, out of cache) is followed */
    const double next = rate == 0 || sample < rate * 1.02 ? sample : rate * 1.02;
    dora_rate_set(p, next);
    STORE(*p->class_rate, next);
    if (p->entered) dora_flight_leave();
#else
    (void)p;
#endif
}

#if defined(_OPENMP) && !defined(_WIN32)
#include <pthread.h>
#include <signal.h>
#include <time.h>

#define FORK_WAIT_MAX 10.0  /* seconds a fork waits for the teams in flight, at most */
static double fork_wait_max = FORK_WAIT_MAX;
static int64_t fork_stats[3];  /* forks; forks that found a team in flight; ... that waited in vain */
#define STAT_FORK(i) do { _Pragma("omp atomic") fork_stats[i]++; } while (0)
/* The forking thread's own fork (prepare, parent and child handlers run on
   it; two threads may fork at once): its prepare handlers run so far, and
   whether the teams had finished and the pool was released. */
static _Thread_local int fork_depth = 0;
static _Thread_local int fork_drained = 0;
static _Thread_local int fork_pause_ok = 0;
/* The forking thread's signal mask before its fork: every signal is
   blocked from this library's first prepare handler of a fork to its last
   parent or child handler, and delivered then. A signal handler that forks
   in between forked inside a fork: it took the shortcut of a second prepare
   handler of the same fork (below), returned the previous fork's answer at
   once, and OpenBLAS's handler stopped its workers under another thread's
   team (the parent hung in exec_blas); or it re-entered OpenBLAS's own
   prepare handler, or this library's lock, from inside them
   (tests/test_fork_signal_nested.py; the adversarial tests' attack 36). */
static _Thread_local sigset_t fork_saved_mask;
/* One fork at a time: held from this library's first prepare handler of a
   fork to its last parent or child handler, so that every handler
   registered before ours (OpenBLAS's: it stops and restarts its workers
   under its own lock) runs for one fork at a time. glibc holds no lock
   of its own while the handlers run, so two threads that fork at once
   (outside Python's GIL: native threads) interleaved them, and a child
   forked while the other fork held OpenBLAS's lock waited for it forever
   in its first threaded call (about 1 in 500-1,000 forks from 3-6 threads
   at once, with or without dora_ref's kernels; tests/test_fork_concurrent.py). */
static pthread_mutex_t fork_lock = PTHREAD_MUTEX_INITIALIZER;

/* Closes the gate (fork_pending) and waits until no team is in flight, at
   most fork_wait_max seconds; returns 1 if none is. A team finishes in
   its call's time (its members wait on nothing the forking thread holds:
   glibc runs prepare handlers before it takes malloc's locks, and without
   its own atfork lock); the limit bounds a fork from inside a call's team
   (a signal handler's on a member), which would wait for itself. A fork
   from inside a call on its calling thread does not wait. A second prepare
   handler of the same fork (dora_set_blas_pool registers one) takes the
   first one's answer (no signal handler's fork can come in between: the
   signals wait, fork_saved_mask). */
static int dora_fork_gate_close(void)
{
    if (fork_depth == 0) {
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &fork_saved_mask);  /* until this fork's last handler */
        pthread_mutex_lock(&fork_lock);  /* another thread's fork: after it */
    }
    #pragma omp atomic update seq_cst
    fork_pending++;
    if (fork_depth++ > 0) return fork_drained;
    int n;
    #pragma omp atomic read seq_cst
    n = teams_in_flight;
    const double t0 = dora_now();
    double limit;
    LOAD(fork_wait_max, limit);
    if (places_held > 0) limit = 0;  /* its own team cannot finish while it forks */
    STAT_FORK(0);
    if (n > 0) STAT_FORK(1);
    while (n > 0 && dora_now() - t0 < limit) {
        const struct timespec pause = {0, 20000};  /* 20 us */
        nanosleep(&pause, NULL);
        #pragma omp atomic read seq_cst
        n = teams_in_flight;
    }
    if (n > 0) STAT_FORK(2);
    fork_drained = n == 0;
    return fork_drained;
}

/* In the parent after the fork: opens the gate (once per prepare); the
   last one lets the next fork in. */
static void dora_fork_gate_open(void)
{
    #pragma omp atomic update seq_cst
    fork_pending--;
    if (--fork_depth == 0) {
        pthread_mutex_unlock(&fork_lock);
        pthread_sigmask(SIG_SETMASK, &fork_saved_mask, NULL);  /* the signals that waited come now */
    }
}

/* In the child: one thread, no fork under way, and no team in flight but
   the forking thread's own (a fork from inside a call: given back when the
   call returns, as in the parent). */
static void dora_fork_gate_reset(void)
{
    const int in_fork = fork_depth > 0;
    if (in_fork) {  /* the child's one thread holds the lock (this fork's): a new one */
        pthread_mutex_t unlocked = PTHREAD_MUTEX_INITIALIZER;
        fork_lock = unlocked;
    }
    fork_depth = 0;
    STORE(teams_in_flight, places_held);
    STORE(fork_pending, 0);
    if (in_fork) pthread_sigmask(SIG_SETMASK, &fork_saved_mask, NULL);
}

/* The pool is released only when no team is in flight: libgomp's pause
   frees the forking thread's pool alone, but another runtime's may wait for
   every pool, and a pool mid-work is not the forking thread's to free. */
static void dora_before_fork(void)
{
    const int drained = dora_fork_gate_close();
    int ok = 0;
#ifdef DORA_HAVE_OMP_PAUSE
    int pause_wanted;
    LOAD(fork_pause_setting, pause_wanted);
    if (pause_wanted && drained) ok = omp_pause_resource_all(omp_pause_soft) == 0;
    if (ok) omp_team_verified = 1;  /* this thread's pool is gone: its next team creates it */
#else
    (void)drained;
#endif
    fork_pause_ok = ok;
}
static void dora_after_fork_parent(void)
{
    dora_fork_gate_open();
}
static void dora_in_child(void)
{
    const int serial = !fork_pause_ok;
    dora_fork_gate_reset();
    if (serial) STORE(child_serial, 1);
#ifdef _OPENMP
    omp_team_verified = 1;  /* no thread of the parent's pools came along */
#endif
    STORE(region_ns, 0);  /* a new process: measure again */
    STORE(probe_interval, PROBE_INTERVAL);
}
static void dora_gate_prepare(void)
{
    (void)dora_fork_gate_close();
}
__attribute__((constructor)) static void dora_register_fork_handlers(void)
{
    pthread_atfork(dora_before_fork, dora_after_fork_parent, dora_in_child);
}
/* OpenBLAS's prepare handler stops its workers, and a worker stopped in
   the middle of a team's job hangs the caller waiting for it and the
   child's first team: the gate must close before that handler runs.
   Prepare handlers run last registered first, and OpenBLAS registers its
   own when it loads: dora_ref.kernels.c imports NumPy, and so loads it,
   before this library, and when a pool is registered its library is
   surely loaded, so the gate is registered again then (once). */
static void dora_register_gate_after_blas(void)
{
    static int done = 0;
    int was;
    #pragma omp atomic capture
    { was = done; done = 1; }
    if (!was) pthread_atfork(dora_gate_prepare, dora_fork_gate_open, dora_fork_gate_reset);
}

void dora_set_fork_wait_limit(double seconds)
{
    STORE(fork_wait_max, seconds >= 0 ? seconds : FORK_WAIT_MAX);
}

void dora_fork_stats(int64_t *stats)
{
    for (int i = 0; i < 3; i++) LOAD(fork_stats[i], stats[i]);
}
#else
static void dora_register_gate_after_blas(void) {}
void dora_set_fork_wait_limit(double seconds) { (void)seconds; }
void dora_fork_stats(int64_t *stats) { stats[0] = stats[1] = stats[2] = 0; }
#endif

/* ------------------------------------------------------------------------ */
/* Teams on OpenBLAS's threads (dora_team_run, dora_team_for: the teams of  */
/* column_norm, forward_epilogue, backward_epilogue, backward_lowrank and   */
/* norm_gradient_products, the kernels that follow BLAS products).          */
/*                                                                          */
/* NumPy's OpenBLAS (the pthreads build NumPy's wheels ship) keeps worker   */
/* threads of its own, which busy-wait for 2**28 cycles (about 0.1 s,       */
/* OPENBLAS_THREAD_TIMEOUT) after every BLAS call. An OpenMP team started   */
/* in that window finds the other cores taken by spinning threads of equal  */
/* priority: its threads start only when the scheduler preempts a spinner,  */
/* milliseconds later (2 cores: a column norm right after a product took    */
/* about the serial time, its second thread arriving as the first ended).   */
/* The cores are not busy, they are waiting for work: so when c.py finds    */
/* OpenBLAS's gotoblas_pthread(nt, fn, args, stride) (which runs            */
/* fn(args + t * stride) for t < nt, t = 0 on the calling thread, the       */
/* others on its workers, and returns when all have), it registers it with  */
/* dora_set_blas_pool, and a team's members run on OpenBLAS's workers: a    */
/* spinning worker takes its job at once, a sleeping one is woken as        */
/* libgomp wakes its own, and no second pool is left to compete. Members    */
/* take blocks from a shared counter, so which member computes a block      */
/* never changes its bits. Without a pool, the members run on an OpenMP     */
/* team (each thread runs members t, t + team size, ...).                   */
/* ------------------------------------------------------------------------ */

typedef int (*dora_blas_pool_fn)(int, void *, void *, int);

/* Runs fn(args + t * stride) for t < nt and returns when all have. */
static void dora_team_run(int nt, void (*fn)(void *), void *args, size_t stride)
{
    uintptr_t pool;
    int pool_threads;
    LOAD(blas_pool_fn, pool);
    LOAD(blas_pool_threads, pool_threads);
#ifdef _OPENMP
    /* (not from inside a caller's OpenMP region, where OpenBLAS's threads
       would warn and a nested OpenMP team is the caller's to plan) */
    if (nt > 1 && pool && nt <= pool_threads && !omp_in_parallel()) {
#else
    if (nt > 1 && pool && nt <= pool_threads) {
#endif
        ((dora_blas_pool_fn)pool)(nt, (void *)fn, args, (int)stride);
        return;
    }
#ifdef _OPENMP
    if (nt > 1) {
        #pragma omp parallel num_threads(nt)
        {
            const int size = omp_get_num_threads();
            for (int t = omp_get_thread_num(); t < nt; t += size)
                fn((char *)args + (size_t)t * stride);
        }
        return;
    }
#endif
    for (int t = 0; t < nt; t++) fn((char *)args + (size_t)t * stride);
}

/* A member's dora_plan_arrive: its index, not omp_get_thread_num(). */
static inline void dora_team_arrive(dora_plan *p, int t)
{
    if (p->nt > 1) {
        p->own_csr[t] = dora_csr_adopt(p->csr);
        p->arrive[t] = dora_now();
    }
}

/* A member's dora_plan_leave. */
static inline void dora_team_leave(dora_plan *p, int t)
{
    if (p->nt > 1) {
        p->leave[t] = dora_now();
        dora_csr_restore(p->own_csr[t]);
    }
}

/* A loop over blocks on a team (dora_team_for): fn(ctx, scratch, blk) for
   every blk < nblocks, each block once, by whichever member takes it from
   the counter `next`; each member has `scratch_bytes` of its own (NULL if
   0), and a member whose malloc fails sets `failed` and takes no block
   (the call then reports DORA_ERR_NOMEM, as before). */
typedef void (*dora_block_fn)(void *ctx, void *scratch, int64_t blk);
typedef struct {
    dora_block_fn fn;
    void *ctx;
    size_t scratch_bytes;
    int64_t nblocks;
    int64_t next;
    int failed;
    dora_plan *plan;
} dora_team_loop;
typedef struct {
    dora_team_loop *loop;
    int t;
} dora_team_member;

static void dora_team_member_run(void *arg)
{
    const dora_team_member *me = (const dora_team_member *)arg;
    dora_team_loop *loop = me->loop;
    dora_team_arrive(loop->plan, me->t);
    void *scratch = loop->scratch_bytes ? malloc(loop->scratch_bytes) : NULL;
    if (loop->scratch_bytes && !scratch) {
        #pragma omp atomic write
        loop->failed = 1;
        dora_team_leave(loop->plan, me->t);
        return;
    }
    for (;;) {
        int64_t blk;
        #pragma omp atomic capture
        blk = loop->next++;
        if (blk >= loop->nblocks) break;
        loop->fn(loop->ctx, scratch, blk);
    }
    dora_team_leave(loop->plan, me->t);
    free(scratch);
}

/* The blocks on plan->nt members (dora_team_run); returns 0, or 1 if a
   member's scratch could not be allocated (then some blocks may not have
   run). */
static int dora_team_for(dora_plan *plan, int64_t nblocks, dora_block_fn fn, void *ctx,
                         size_t scratch_bytes)
{
    dora_team_loop loop = {fn, ctx, scratch_bytes, nblocks, 0, 0, plan};
    dora_team_member members[MAX_TEAM];
    for (int t = 0; t < plan->nt; t++) {
        members[t].loop = &loop;
        members[t].t = t;
    }
    dora_team_run(plan->nt, dora_team_member_run, members, sizeof members[0]);
    return loop.failed;
}

void dora_set_blas_pool(void *gotoblas_pthread, int threads)
{
    if (gotoblas_pthread) dora_register_gate_after_blas();
    STORE(blas_pool_threads, gotoblas_pthread && threads > 1 ? threads : 0);
    STORE(blas_pool_fn, (uintptr_t)gotoblas_pthread);
}

int dora_blas_pool_threads(void)
{
    uintptr_t pool;
    int threads;
    LOAD(blas_pool_fn, pool);
    LOAD(blas_pool_threads, threads);
    return pool ? threads : 0;
}

/* ------------------------------------------------------------------------ */
/* bfloat16 and float16 <-> float32, on the bits (a uint16_t holds a value). */
/* Widening is exact. Narrowing rounds once, to nearest, ties to even; a    */
/* finite value past the 16-bit range gives inf; NaN stays NaN, with the    */
/* bits NumPy's and ml_dtypes' casts give: float16 keeps the sign and the   */
/* top 10 payload bits (at least one set), bfloat16 gives the sign and the  */
/* quiet NaN 0x7fc0. Plain integer and float operations, which the compiler */
/* vectorizes; tests/test_kernels_lowp.py checks them against NumPy and     */
/* ml_dtypes on every float16 / bfloat16 boundary and tie.                  */
/* ------------------------------------------------------------------------ */

static inline uint32_t dora_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float dora_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
/* a if c, else b: with masks, not a branch, so that a loop of conversions
   vectorizes (GCC 12 would not if-convert the ternaries: a float16 kernel
   ran 3-4 times slower than the float32 one) */
static inline uint32_t dora_pick(int c, uint32_t a, uint32_t b)
{
    const uint32_t m = (uint32_t)0 - (uint32_t)c;
    return (a & m) | (b & ~m);
}

/* bfloat16 is the top half of a float32. */
static inline float dora_bf16_to_f32(uint16_t h) { return dora_float((uint32_t)h << 16); }

static inline uint16_t dora_f32_to_bf16(float f)
{
    const uint32_t u = dora_bits(f);
    /* add half an ulp of bfloat16, less one unless the kept bit is odd, and
       truncate; a carry out of the mantissa steps the exponent (to inf past the top) */
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
    return (uint16_t)dora_pick((u & 0x7fffffffu) > 0x7f800000u, nan, rounded);
}

/* float16: each path below is computed whatever the value, and dora_pick
   takes the one that applies. */
static inline float dora_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t em = (uint32_t)(h & 0x7fffu) << 13;  /* exponent and mantissa, float32's places */
    const uint32_t e = em & 0x0f800000u;
    const uint32_t normal = em + 0x38000000u;           /* rebias the exponent: 15 -> 127 */
    const uint32_t inf_nan = em + 0x70000000u;          /* exponent 31 -> 255, payload kept */
    /* zero or subnormal, mant * 2^-24: the float32 2^-14 * (1 + mant / 2^10),
       less 2^-14, exactly */
    const uint32_t sub = dora_bits(dora_float(em + 0x38800000u) - 0x1p-14f);
    return dora_float(sign | dora_pick(e == 0x0f800000u, inf_nan, dora_pick(e == 0, sub, normal)));
}

static inline uint16_t dora_f32_to_f16(float f)
{
    const uint32_t u = dora_bits(f), x = u & 0x7fffffffu;
    const uint32_t payload = (x >> 13) & 0x3ffu;
    /* |f| >= 2^16: inf, or NaN with the top payload bits (at least one set) */
    const uint32_t big = 0x7c00u + dora_pick(x > 0x7f800000u, payload + (payload == 0), 0);
    /* |f| < 2^-14, subnormal or zero in float16: adding 0.5, whose float32
       ulp is 2^-24 (float16's subnormal step), rounds |f| to a multiple of
       it, and the sum's mantissa is that multiple (up to 0x400 = 2^-14,
       float16's smallest normal) */
    const uint32_t small = dora_bits(dora_float(x) + 0.5f) - 0x3f000000u;
    /* normal: rebias the exponent (127 -> 15) and round the 13 dropped bits
       as bfloat16's 16 above (a carry past 65504 gives inf) */
    const uint32_t normal = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;
    const uint32_t h = dora_pick(x >= 0x47800000u, big, dora_pick(x < 0x38800000u, small, normal));
    return (uint16_t)(((u >> 16) & 0x8000u) | h);
}

/* The forward epilogue's blocks: 0 by the rule below, 1 by rows, 2 by
   columns (dora_set_forward_layout: tests and benchmarks). */
static int forward_layout_setting = 0;

/* The widest tile column_norm may take (dora_set_norm_tile_limit: tests and
   benchmarks; 2 by default: AVX-512 where the CPU has it), and the one it
   takes: 2 AVX-512, 1 AVX2, 0 the plain C tiles. */
static int norm_tile_limit = 2;

/* The widest tile the CPU has, at most `limit`. */
static int dora_norm_tile_upto(int limit)
{
    return limit >= 2 && dora_norm_avx512_ok() ? 2 : limit >= 1 && dora_norm_avx2_ok() ? 1 : 0;
}

int dora_norm_tile(void)
{
    int limit;
    LOAD(norm_tile_limit, limit);
    return dora_norm_tile_upto(limit);
}

/* 1 if the forward epilogue of N rows (tokens) and `out` columns runs in
   blocks of columns (each packs its own panels of B.T, then does every
   row), 0 if in blocks of ROW_BLOCK rows (B.T packed before the team).
   The rule: by columns when the rows give fewer blocks than the threads a
   call may use and the columns give more. By rows, an eval forward of
   N <= ROW_BLOCK had one block, so one thread, after a serial pack of all
   of B.T (out * r elements: at N = 16 as many instructions as the N * out
   * r sums, callgrind, (1024, 1024), r = 64, float32), while NumPy's
   U @ B.T ran on every thread. Where the rows give a block to every thread
   they stay: by columns each block reads N rows of base and y 64 columns
   wide, out * 4 bytes apart, which was slower at (4096, 4096), r = 64,
   N = 512. The bits are the same either way. */
static int dora_forward_by_columns(int64_t N, int64_t out)
{
    int layout;
    LOAD(forward_layout_setting, layout);
    if (layout) return layout == 2;
    const int64_t row_blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    return row_blocks < dora_threads_now() && (out + FWD_COL_BLOCK - 1) / FWD_COL_BLOCK > row_blocks;
}

void dora_set_forward_layout(int layout)
{
    STORE(forward_layout_setting, layout >= 0 && layout <= 2 ? layout : 0);
}

int dora_set_norm_tile_limit(int limit)
{
    STORE(norm_tile_limit, limit < 0 ? 0 : limit > 2 ? 2 : limit);
    return dora_norm_tile_upto(2);
}

/* The kernels, for each type (dora_kernels_impl.h says what the macros mean). */

#define LP 0
#define API
#define WTYPE REAL
#define WIDEN(v) (v)
#define NARROW(v) (v)

#define RATE_TYPE 0
#define REAL float
#define W 16
#define FN(name) name##_f32
#include "dora_kernels_impl.h"
#undef REAL
#undef W
#undef FN

#undef RATE_TYPE
#define RATE_TYPE 1
#define REAL double
#define W 8
#define FN(name) name##_f64
#include "dora_kernels_impl.h"
#undef REAL
#undef W
#undef FN

#undef LP
#undef API
#undef WTYPE
#undef WIDEN
#undef NARROW

#ifdef DORA_NORM_AVX2
/* Sixteen 16-bit values widened to float32 in one zmm register, for the
   AVX-512 norm tile (WIDEN16_ZMM): exactly WIDEN of each. bfloat16 is the
   high half of a float32; float16 by vcvtph2ps (AVX-512 F), exact for every
   value, NaN quieted as the tile's next add would quiet it anyway. Built
   from a 256-bit load, not from sixteen WIDENs stored to memory and read
   back as one 512-bit operand: that load could not be forwarded from the
   two 256-bit stores GCC made, and float16 W0 ran 1.1-1.6x slower than the
   plain tiles (session 13's adversary, perf annotate). */
static inline __attribute__((always_inline, target("avx512f"))) __m512 dora_bf16x16_to_zmm(
    const uint16_t *p)
{
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

static inline __attribute__((always_inline, target("avx512f"))) __m512 dora_f16x16_to_zmm(
    const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
#endif

/* float32 arithmetic, 16-bit storage */
#undef RATE_TYPE
#define RATE_TYPE 2
#define LP 1
#define API static
#define REAL float
#define W 16
#define WTYPE uint16_t

#define WIDEN(v) dora_bf16_to_f32(v)
#define WIDEN16_ZMM(p) dora_bf16x16_to_zmm(p)
#define NARROW(v) dora_f32_to_bf16(v)
#define FN(name) name##_bf16
#include "dora_kernels_impl.h"
#undef WIDEN
#undef WIDEN16_ZMM
#undef NARROW
#undef FN

#define WIDEN(v) dora_f16_to_f32(v)
#define WIDEN16_ZMM(p) dora_f16x16_to_zmm(p)
#define NARROW(v) dora_f32_to_f16(v)
#define FN(name) name##_f16
#include "dora_kernels_impl.h"
#undef WIDEN
#undef WIDEN16_ZMM
#undef NARROW
#undef FN

#undef LP
#undef API
#undef REAL
#undef W
#undef WTYPE

/* The entry points dora_<kernel>_lp(..., format) of dora_kernels.h: the
   kernel's _bf16 or _f16 instance, by format. */
#define DORA_BY_FORMAT(kernel, args) \
    (format == DORA_BF16 ? kernel##_bf16 args \
     : format == DORA_F16 ? kernel##_f16 args : DORA_ERR_FORMAT)

int dora_column_norm_lp(float *n, const uint16_t *W0, const float *A, const float *B,
                        double s, int64_t out, int64_t in, int64_t r, int format)
{
    return DORA_BY_FORMAT(dora_column_norm, (n, W0, A, B, s, out, in, r));
}

int dora_merge_lp(uint16_t *W_merged, float *n, const uint16_t *W0, const float *A,
                  const float *B, const float *magnitude, double s, int64_t out, int64_t in,
                  int64_t r, int format)
{
    return DORA_BY_FORMAT(dora_merge, (W_merged, n, W0, A, B, magnitude, s, out, in, r));
}

int dora_unmerge_lp(uint16_t *W0, const uint16_t *W_merged, const float *A, const float *B,
                    const float *factor, double s, int64_t out, int64_t in, int64_t r, int format)
{
    return DORA_BY_FORMAT(dora_unmerge, (W0, W_merged, A, B, factor, s, out, in, r));
}

int dora_forward_epilogue_lp(uint16_t *y, const float *base, const float *U, const float *B,
                             const float *g, const float *bias, double s, int64_t N,
                             int64_t out, int64_t r, int format)
{
    return DORA_BY_FORMAT(dora_forward_epilogue, (y, base, U, B, g, bias, s, N, out, r));
}

int dora_norm_gradient_products_lp(float *WAt, float *CtW, const uint16_t *W0, const float *A,
                                   const float *C, int64_t out, int64_t in, int64_t r,
                                   int format)
{
    return DORA_BY_FORMAT(dora_norm_gradient_products, (WAt, CtW, W0, A, C, out, in, r));
}

/* Sums of squares for the finiteness checks of the Python layer
   (dora_ref.core._validate.sum_squares), on the caller's thread alone.

   Those checks (is every entry of an input or a result finite?) took
   NumPy's vdot(a, a), which OpenBLAS runs on its own worker threads above
   10,000 entries; a fork from another thread in the middle of it stopped
   those workers and the call waited for them for good (an adversary,
   session 23: column_norm and merge, whose C kernels had the fork gate
   while the check before them did not). Here there is no thread and no
   lock, so a fork cannot catch anything half done.

   A NaN or an Inf among the x_i makes the sum NaN or Inf (the squares are
   >= 0: an Inf cannot cancel), so a finite sum proves every x_i finite. A
   float32 x_i cannot overflow the double sum; a float64 one beyond about
   1e154 can, and the caller then tests each entry. Sixteen partial sums,
   the j-th over the entries i = j mod 16, are added together in order at
   the end: each is one chain of additions in its own vector lane, so the
   compiler vectorizes the loop without reordering an addition. */
#define DORA_SUMSQ_LANES 16
#define DORA_SUM_SQUARES(NAME, REAL)                                          \
    DORA_CLONES double NAME(const REAL *x, int64_t n)                          \
    {                                                                         \
        double acc[DORA_SUMSQ_LANES] = {0};                                   \
        int64_t i = 0;                                                        \
        for (; i + DORA_SUMSQ_LANES <= n; i += DORA_SUMSQ_LANES)              \
            for (int j = 0; j < DORA_SUMSQ_LANES; j++) {                      \
                double v = (double)x[i + j];                                  \
                acc[j] += v * v;                                              \
            }                                                                 \
        for (int j = 0; i < n; i++, j++) {                                    \
            double v = (double)x[i];                                          \
            acc[j] += v * v;                                                  \
        }                                                                     \
        double s = 0.0;                                                       \
        for (int j = 0; j < DORA_SUMSQ_LANES; j++) s += acc[j];               \
        return s;                                                             \
    }
DORA_SUM_SQUARES(dora_sum_squares_f32, float)
DORA_SUM_SQUARES(dora_sum_squares_f64, double)

/* Array conversions, with the functions the kernels use (for the tests). */
int dora_widen_lp(float *dst, const uint16_t *src, int64_t n, int format)
{
    if (format != DORA_BF16 && format != DORA_F16) return DORA_ERR_FORMAT;
    for (int64_t i = 0; i < n; i++)
        dst[i] = format == DORA_BF16 ? dora_bf16_to_f32(src[i]) : dora_f16_to_f32(src[i]);
    return DORA_OK;
}

int dora_narrow_lp(uint16_t *dst, const float *src, int64_t n, int format)
{
    if (format != DORA_BF16 && format != DORA_F16) return DORA_ERR_FORMAT;
    for (int64_t i = 0; i < n; i++)
        dst[i] = format == DORA_BF16 ? dora_f32_to_bf16(src[i]) : dora_f32_to_f16(src[i]);
    return DORA_OK;
}

int64_t dora_backward_lowrank_scratch(int64_t N, int64_t out, int64_t r, int64_t itemsize)
{
    const int64_t width = lowrank_col_block(out, r);
    const int64_t blocks = (out + width - 1) / width;
    const int64_t rows = lowrank_row_block(N, out, r);
    const int64_t row_blocks = dora_max(1, (N + rows - 1) / rows);
    const int64_t panels = (out + 15) / 16 * 16 * r;  /* B.T in panels */
    /* dU's partials (one (N, r) array a column block) where there are several
       column blocks; the row blocks' partials of dg (doubles) and dB where
       there are several row blocks */
    const int64_t partials = (blocks > 1 ? blocks * N * r : 0) * itemsize
                             + (row_blocks > 1 ? row_blocks * out * (8 + r * itemsize) : 0);
    const int64_t per_thread = width * 8 + r * (width + 16) * itemsize;
    return partials + panels * itemsize + dora_max_threads() * per_thread;
}

int64_t dora_norm_gradient_products_scratch(int64_t out, int64_t in, int64_t r, int64_t itemsize)
{
    const int64_t partials = (products_slices(out, r) - 1) * r * in;
    const int64_t panels = (in + 15) / 16 * 16 * r;  /* A in panels */
    return (partials + panels + dora_max_threads() * CHUNK_LD * r) * itemsize;
}

int64_t dora_row_block(void)
{
    return ROW_BLOCK;
}

int dora_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int dora_max_threads(void)
{
    return dora_threads_now();
}

void dora_set_threads(int n)
{
    STORE(threads_setting, n > 0 ? n : 0);
}

void dora_set_parallel_policy(int always)
{
    STORE(policy_setting, always ? 1 : 0);
}

void dora_set_fork_pause(int on)
{
    STORE(fork_pause_setting, on ? 1 : 0);
}

double dora_region_cost_ns(void)
{
    double L;
    LOAD(region_ns, L);
    return L;
}

double dora_probe_interval(void)
{
    double interval;
    LOAD(probe_interval, interval);
    return interval;
}

int dora_plan_observe_for_tests(double start_ns, double wall_ns, double predicted_ns, int nt,
                                double spread_ns, int probe)
{
    return dora_plan_observe(start_ns, wall_ns, predicted_ns, nt, dora_now(), spread_ns, probe);
}

void dora_plan_reset(void)
{
    STORE(region_ns, 0);
    STORE(region_min_ns, 0);
    STORE(probe_interval, PROBE_INTERVAL);
    STORE(last_gate, 0);
}

int dora_plan_stats(double *stats, int n)
{
    int k = 0;
    for (int i = 0; i < K_COUNT; i++)
        for (int j = 0; j < S_COUNT && k < n; j++, k++) LOAD(plan_stats[i][j], stats[k]);
    return K_COUNT * S_COUNT;
}

int dora_plan_rates(double *rates, int n)
{
    int k = 0;
    for (int i = 0; i < RATE_SLOTS && k + 5 <= n; i++) {
        double work, rate;
        int64_t nblocks;
        int kt;
        LOAD(rate_slots[i].rate, rate);
        if (rate == 0) continue;
        LOAD(rate_slots[i].work, work);
        LOAD(rate_slots[i].nblocks, nblocks);
        LOAD(rate_slots[i].kernel_type, kt);
        rates[k++] = kt / RATE_TYPES;
        rates[k++] = kt % RATE_TYPES;
        rates[k++] = work;
        rates[k++] = (double)nblocks;
        rates[k++] = rate;
    }
    return k;
}

void dora_plan_rates_reset(void)
{
    for (int i = 0; i < RATE_SLOTS; i++) STORE(rate_slots[i].rate, 0);
    for (int i = 0; i < K_COUNT; i++)
        for (int t = 0; t < RATE_TYPES; t++)
            for (int c = 0; c < RATE_SIZES; c++) STORE(class_rates[i][t][c], 0);
}

void dora_plan_stats_reset(void)
{
    for (int i = 0; i < K_COUNT; i++)
        for (int j = 0; j < S_COUNT; j++) STORE(plan_stats[i][j], 0);
}

const char *dora_build_info(void)
{
    return "openmp=" DORA_OPENMP_INFO " simd_clones=" DORA_CLONES_INFO
           " fork_pause=" DORA_PAUSE_INFO " norm_avx2=" DORA_NORM_AVX2_INFO;
}
