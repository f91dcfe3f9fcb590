/* dora_kernels.h: the C API of dora_ref's fused kernels.

   Declarations only. The cffi build script (csrc/build_ffi.py) reads
   this file verbatim into ffibuilder.cdef(), so it holds no preprocessor
   lines and no code; dora_kernels.c includes <stdint.h> before it.

   Layout, said once: weights are PyTorch (out, in), row-major. The paper's
   column norm ||.||_c is the L2 norm of each *row* here, one value per
   output channel.

   Sizes (the letters used throughout):
     N    rows of a batch (tokens)
     out  output channels
     in   input features
     r    rank of the adapter
   Every array is C-contiguous: W0 (out, in), A (r, in), B (out, r),
   base / dy / y / dz (N, out), U (N, r), vectors (out,).

   Arguments come as outputs first, then inputs, then the scaling s, then
   sizes. Each function returns a dora_status: DORA_OK, or an error code
   that the Python wrapper (dora_ref/kernels/c.py) turns into an exception.
   Results do not depend on the number of OpenMP threads, bit for bit: each
   thread writes only its own rows (or, for the backward's reduction over
   N, its own columns), with no atomics; a sum across threads' blocks goes
   through per-block partial sums, blocks fixed by the sizes, added in
   block order. Float32 sums of squares and the reduction dg are
   accumulated in double. How many threads a call uses is decided per call
   (dora_set_parallel_policy below); it never changes the bits. */

enum dora_status {
    DORA_OK = 0,
    DORA_ERR_SIZE = 1,   /* a size is negative */
    DORA_ERR_NULL = 2,   /* a required pointer is NULL */
    DORA_ERR_NOMEM = 3,  /* a scratch allocation failed */
    DORA_ERR_FORMAT = 4  /* a 16-bit format other than DORA_BF16, DORA_F16 */
};

/* n[i] = || W0[i, :] + s * B[i, :] @ A ||_2, for i < out, without forming B @ A. */
int dora_column_norm_f32(float *n,
                         const float *W0, const float *A, const float *B,
                         double s, int64_t out, int64_t in, int64_t r);
int dora_column_norm_f64(double *n,
                         const double *W0, const double *A, const double *B,
                         double s, int64_t out, int64_t in, int64_t r);

/* y = g * (base + s * U @ B.T) + bias; bias may be NULL (no bias). */
int dora_forward_epilogue_f32(float *y,
                              const float *base, const float *U, const float *B,
                              const float *g, const float *bias,
                              double s, int64_t N, int64_t out, int64_t r);
int dora_forward_epilogue_f64(double *y,
                              const double *base, const double *U, const double *B,
                              const double *g, const double *bias,
                              double s, int64_t N, int64_t out, int64_t r);

/* forward_epilogue that also writes z = base + s * U @ B.T to z, which may
   be base itself (element for element; y may not overlap z): the training
   forward keeps z for the backward's *_z kernels below. */
int dora_forward_epilogue_z_f32(float *y, float *z,
                                const float *base, const float *U, const float *B,
                                const float *g, const float *bias,
                                double s, int64_t N, int64_t out, int64_t r);
int dora_forward_epilogue_z_f64(double *y, double *z,
                                const double *base, const double *U, const double *B,
                                const double *g, const double *bias,
                                double s, int64_t N, int64_t out, int64_t r);

/* forward_epilogue (z NULL) or forward_epilogue_z (z not NULL) that also sets
   *nonfinite to 1 if some element of y is Inf or NaN, else 0 (the forward's
   test of its output, without a second pass over y). */
int dora_forward_epilogue_nf_f32(float *y, float *z,
                                 const float *base, const float *U, const float *B,
                                 const float *g, const float *bias,
                                 double s, int64_t N, int64_t out, int64_t r, int *nonfinite);
int dora_forward_epilogue_nf_f64(double *y, double *z,
                                 const double *base, const double *U, const double *B,
                                 const double *g, const double *bias,
                                 double s, int64_t N, int64_t out, int64_t r, int *nonfinite);

/* forward_epilogue_nf from the product P = U @ B.T (N, out) formed by the
   caller: the same operations on each element, P's sum the caller's. */
int dora_forward_epilogue_from_product_nf_f32(float *y, float *z, const float *base,
                                              const float *P, const float *g, const float *bias,
                                              double s, int64_t N, int64_t out, int *nonfinite);
int dora_forward_epilogue_from_product_nf_f64(double *y, double *z, const double *base,
                                              const double *P, const double *g,
                                              const double *bias, double s, int64_t N,
                                              int64_t out, int *nonfinite);

/* With z = base + s * U @ B.T (never stored): dg = sum over N of dy * z,
   and dz = dy * g. */
int dora_backward_epilogue_f32(float *dg, float *dz,
                               const float *dy, const float *base, const float *U,
                               const float *B, const float *g,
                               double s, int64_t N, int64_t out, int64_t r);
int dora_backward_epilogue_f64(double *dg, double *dz,
                               const double *dy, const double *base, const double *U,
                               const double *B, const double *g,
                               double s, int64_t N, int64_t out, int64_t r);

/* backward_epilogue given z as the forward kept it: dg = sum over N of
   dy * z, dz = dy * g, no product formed. */
int dora_backward_epilogue_z_f32(float *dg, float *dz, const float *dy, const float *z,
                                 const float *g, int64_t N, int64_t out);
int dora_backward_epilogue_z_f64(double *dg, double *dz, const double *dy, const double *z,
                                 const double *g, int64_t N, int64_t out);

/* backward_epilogue plus the rank-r products of the backward, in the same
   pass over the (N, out) arrays: dg and dz as above, and
     dU = s * dz @ B     (N, r)     a sum over out: fixed column blocks give
                                    partial sums, added in block order
     dB = s * dz.T @ U   (out, r)   a sum over N, in row order, per column. */
int dora_backward_lowrank_f32(float *dg, float *dz, float *dU, float *dB,
                              const float *dy, const float *base, const float *U,
                              const float *B, const float *g,
                              double s, int64_t N, int64_t out, int64_t r);
int dora_backward_lowrank_f64(double *dg, double *dz, double *dU, double *dB,
                              const double *dy, const double *base, const double *U,
                              const double *B, const double *g,
                              double s, int64_t N, int64_t out, int64_t r);

/* backward_lowrank given z as the forward kept it (z in place of base):
   the same dg, dz, dU, dB, without forming U @ B.T again. */
int dora_backward_lowrank_z_f32(float *dg, float *dz, float *dU, float *dB,
                                const float *dy, const float *z, const float *U,
                                const float *B, const float *g,
                                double s, int64_t N, int64_t out, int64_t r);
int dora_backward_lowrank_z_f64(double *dg, double *dz, double *dU, double *dB,
                                const double *dy, const double *z, const double *U,
                                const double *B, const double *g,
                                double s, int64_t N, int64_t out, int64_t r);

/* The two products of W0 that the exact norm gradient needs, in one pass over W0:
     WAt = W0 @ A.T     (out, r)   a sum over in, per row
     CtW = C.T @ W0     (r, in)    a sum over out: a fixed number of row
                                   slices (set by the sizes alone) give
                                   partial sums, added in slice order. */
int dora_norm_gradient_products_f32(float *WAt, float *CtW,
                                    const float *W0, const float *A, const float *C,
                                    int64_t out, int64_t in, int64_t r);
int dora_norm_gradient_products_f64(double *WAt, double *CtW,
                                    const double *W0, const double *A, const double *C,
                                    int64_t out, int64_t in, int64_t r);

/* Scratch bytes that the two kernels above allocate (partial sums and
   packed panels), for the memory accounting of benchmarks/bench_kernels.py. */
int64_t dora_backward_lowrank_scratch(int64_t N, int64_t out, int64_t r, int64_t itemsize);
int64_t dora_norm_gradient_products_scratch(int64_t out, int64_t in, int64_t r, int64_t itemsize);

/* V = W0 + s * B @ A row by row: n[i] = ||V[i]||, W_merged[i] = (m[i] / n[i]) * V[i].
   A row with n = 0 gives inf / NaN, as NumPy does; the caller checks n. */
int dora_merge_f32(float *W_merged, float *n,
                   const float *W0, const float *A, const float *B, const float *magnitude,
                   double s, int64_t out, int64_t in, int64_t r);
int dora_merge_f64(double *W_merged, double *n,
                   const double *W0, const double *A, const double *B, const double *magnitude,
                   double s, int64_t out, int64_t in, int64_t r);

/* W0[i] = W_merged[i] / factor[i] - s * B[i, :] @ A, the inverse of the merge. */
int dora_unmerge_f32(float *W0,
                     const float *W_merged, const float *A, const float *B, const float *factor,
                     double s, int64_t out, int64_t in, int64_t r);
int dora_unmerge_f64(double *W0,
                     const double *W_merged, const double *A, const double *B, const double *factor,
                     double s, int64_t out, int64_t in, int64_t r);

/* The same kernels on 16-bit weights, one entry point each, `format`
   saying which: W0, W_merged and y hold the bits of bfloat16 (DORA_BF16)
   or float16 (DORA_F16) values as uint16_t; every other array is float32.
   Each computes what its _f32 twin computes on the exactly widened W0
   (resp. W_merged), bit for bit, with the same float32 operations in the
   same order, and rounds W_merged, W0 and y once to the 16-bit type (to
   nearest, ties to even; past the range: inf; NaN stays NaN). No float32
   copy of the weight is made: elements are widened as they are loaded.
   n, WAt and CtW are float32. Another format: DORA_ERR_FORMAT. */
enum dora_lp_format { DORA_BF16 = 1, DORA_F16 = 2 };
int dora_column_norm_lp(float *n, const uint16_t *W0, const float *A, const float *B,
                        double s, int64_t out, int64_t in, int64_t r, int format);
int dora_merge_lp(uint16_t *W_merged, float *n, const uint16_t *W0, const float *A,
                  const float *B, const float *magnitude, double s, int64_t out, int64_t in,
                  int64_t r, int format);
int dora_unmerge_lp(uint16_t *W0, const uint16_t *W_merged, const float *A, const float *B,
                    const float *factor, double s, int64_t out, int64_t in, int64_t r, int format);
int dora_forward_epilogue_lp(uint16_t *y, const float *base, const float *U, const float *B,
                             const float *g, const float *bias, double s, int64_t N,
                             int64_t out, int64_t r, int format);
int dora_norm_gradient_products_lp(float *WAt, float *CtW, const uint16_t *W0, const float *A,
                                   const float *C, int64_t out, int64_t in, int64_t r,
                                   int format);

/* The sum of the squares of n values, in double, on the caller's thread
   alone (no thread, no lock: safe beside a fork from another thread). NaN
   or Inf if some value is; a float64 value beyond about 1e154 overflows it
   to Inf too. The Python layer's finiteness checks use it. */
double dora_sum_squares_f32(const float *x, int64_t n);
double dora_sum_squares_f64(const double *x, int64_t n);

/* n values from float32 to 16 bits (narrow) and back (widen), with the
   conversions the kernels above use. */
int dora_widen_lp(float *dst, const uint16_t *src, int64_t n, int format);
int dora_narrow_lp(uint16_t *dst, const float *src, int64_t n, int format);

/* Rows of W0 that a thread takes at a time in column_norm, merge and unmerge
   (ROW_BLOCK): a row's bits depend on where its group of rows starts, so a
   caller that splits W0 into row blocks must start each at a multiple of it
   to get the bits of one call on the whole of W0. */
int64_t dora_row_block(void);

/* 1 if the library was compiled with OpenMP, else 0. */
int dora_openmp_enabled(void);
/* The most threads a call may use now: dora_set_threads's n, else
   omp_get_max_threads() (OMP_NUM_THREADS); 1 without OpenMP, and 1 in a
   forked child whose parent's thread pool could not be released. */
int dora_max_threads(void);
/* Set that number (n <= 0: back to omp_get_max_threads()). */
void dora_set_threads(int n);
/* 0 (the default): each call picks 1 or dora_max_threads() threads from its
   measured cost against what opening a team costs (dora_kernels.c, "How
   many threads a call uses"); 1: every call with several blocks uses
   dora_max_threads() threads (for tests of thread-count independence). */
void dora_set_parallel_policy(int always);
/* 1 (the default): release the OpenMP thread pool before every fork, so a
   forked child can start its own; 0: do not, and a forked child runs on
   one thread (for tests of that fallback). */
void dora_set_fork_pause(int on);
/* What the fork handlers did in this process: stats[0] forks, stats[1] of
   them found a team in flight (another thread inside a kernel) and waited
   for it to finish, stats[2] of these waited in vain (the limit, 10 s: a
   fork from inside a call); their child runs on one thread. */
void dora_fork_stats(int64_t *stats);
/* Tests only: that limit in seconds (negative: back to 10). */
void dora_set_fork_wait_limit(double seconds);
/* The current estimate of what opening a team costs, in ns (0 before the
   first measurement). */
double dora_region_cost_ns(void);
/* Run the teams of column_norm, forward_epilogue, backward_epilogue,
   backward_lowrank and norm_gradient_products on OpenBLAS's own worker threads: the address of
   that OpenBLAS's gotoblas_pthread, and its number of threads (caller
   included); NULL: OpenMP teams (dora_kernels.c, "Teams on OpenBLAS's
   threads"). A team larger than `threads` uses OpenMP. */
void dora_set_blas_pool(void *gotoblas_pthread, int threads);
/* The threads registered that way, 0 if none. */
int dora_blas_pool_threads(void);
/* Seconds without a team after which a call that would pay on a quiet
   machine goes parallel to measure the cost again (0.1, doubled after each
   parallel call that lost against its predicted serial time, up to 6.4). */
double dora_probe_interval(void);
/* Tests only: feed the cost model a parallel call's start delay, wall time,
   predicted serial time (ns; predicted 0: a forced team), the spread of its
   members' finishing times, for nt threads, and whether it was a probe, as
   dora_plan_end does; returns 1 if the call lost. */
int dora_plan_observe_for_tests(double start_ns, double wall_ns, double predicted_ns, int nt,
                                double spread_ns, int probe);
/* The number of runnable threads in a text of Linux's /proc/loadavg (its
   fourth field, "running/total"), or -1 if it has none: a probe opens a
   team only if that leaves an idle core for each extra thread. */
long dora_loadavg_running(const char *text);
/* Whether a team of nt threads finds its cores: `running` runnable threads
   on the machine (the caller included), `own` of them this process's (0:
   unknown), `cores` online; on_pool: the team runs on OpenBLAS's workers,
   so up to nt - 1 of the process's own runnable threads (its workers,
   spinning after a product) are the team, not competitors. */
int dora_team_fits(long running, long own, long cores, int nt, int on_pool);
/* The thread plan's decision for a call (dora_kernels.c, dora_plan_decide):
   T, L, Lmin in ns, the times in seconds. */
#define DORA_PLAN_SERIAL 0
#define DORA_PLAN_TEAM 1
#define DORA_PLAN_ASK 2
int dora_plan_decide(double T, double L, double Lmin, double since_team, double since_check,
                     double interval);
/* 1 if a /proc/<pid>/task/<tid>/stat text says the thread is runnable (R). */
int dora_stat_runnable(const char *text);
/* This process's runnable threads, the caller included, counted up to
   limit (0: all) (Linux with OpenMP; else 0). */
long dora_own_runnable(long limit);
/* Forget what the cost model measured of teams (L, L_min, the probe
   interval): the next call that might go parallel measures L again. */
void dora_plan_reset(void);
/* Counters of the thread plan's decisions since the last reset, for
   diagnosis: per kernel (the order of dora_plan_kernel_names in
   dora_ref/kernels/c.py), 9 values: calls, parallel calls,
   probes (parallel calls the model alone would have run serially),
   parallel calls slower than the predicted serial time, the sum of that
   excess (ns), the sum of team start delays (ns), the sums of the
   parallel calls' wall and predicted serial times (ns), and probes not
   made because no core was idle. Fills at most n
   values of stats and returns how many there are. */
int dora_plan_stats(double *stats, int n);
void dora_plan_stats_reset(void);
/* The plan's serial rates, for diagnosis: one per call shape (kernel,
   element type, work, blocks), in DORA_RATE_SLOTS slots. Fills stats with
   5 values per measured shape (kernel as dora_plan_stats, element type 0
   float32, 1 float64, 2 16-bit storage, work, blocks, ns per unit of work),
   at most n values, and returns how many it filled. A shape not measured
   is planned by the latest rate of its kernel, type and size class
   (dora_rate_size_class: floor(log4(work)), at most 19), and not judged
   lost. dora_plan_rates_reset forgets them all: the next call of each
   kernel, type and size class runs on one thread to measure its rate.
   dora_rate_slot_index: the slot of a shape. */
#define DORA_RATE_SLOTS 1024
int dora_plan_rates(double *rates, int n);
void dora_plan_rates_reset(void);
int dora_rate_slot_index(int kernel, int type, double work, int64_t nblocks);
int dora_rate_size_class(double work);
/* Tests only: the rate (ns per unit of work) the plan would predict a call
   of that shape by, 0 if none; *guessed: 1 if it is another shape's. */
double dora_plan_rate_for_tests(int kernel, int type, double work, int64_t nblocks, int *guessed);
/* Tests and benchmarks: the forward epilogue's blocks, 0 by its rule (the
   default), 1 by rows, 2 by columns; the bits are the same for all three. */
void dora_set_forward_layout(int layout);
/* Tests and benchmarks: the widest SIMD tile column_norm may take, 2 AVX-512
   (the default: what the CPU has), 1 AVX2, 0 the plain C tiles; returns
   the one the CPU allows (2, 1 or 0). The bits are the same for all three. */
int dora_set_norm_tile_limit(int limit);
/* The tile column_norm takes now (float32 arithmetic; AVX-512 at 8 <= r <= 64, AVX2 at
   8 <= r <= 32): 2 AVX-512, 1 AVX2, 0 plain C. */
int dora_norm_tile(void);
/* A short description of how the kernels were compiled, e.g. the SIMD clones. */
const char *dora_build_info(void);
