/* dora_kernels_impl.h: the fused kernels for one floating type.

   Not a public header: dora_kernels.c includes it four times, with
     REAL   float (W = 16)  or  double (W = 8)   the type of the arithmetic
     W      elements in one tile column (64 bytes, one cache line)
     FN(x)  x ## _f32, x ## _f64, x ## _bf16 or x ## _f16
     WTYPE  the storage type of the weight-shaped arrays (W0, W', y): REAL,
            or uint16_t holding the bits of a bfloat16 / float16
     WIDEN(v), NARROW(v)   WTYPE -> REAL exactly, REAL -> WTYPE rounded once
            (the identity when WTYPE is REAL)
     LP     1 for the two 16-bit storage types: only column_norm, merge,
            unmerge, forward_epilogue and norm_gradient_products are built
            for them, static (the dora_*_lp entry points of
            dora_kernels.c call them by format)
     API    what precedes those five kernels: nothing, or static
   An LP kernel is the float32 kernel, the same source and the same
   instructions for the arithmetic, with W0's elements widened as they are
   loaded and the results narrowed as they are stored: so it gives the bits
   of the float32 kernel on W0.astype(float32), then one rounding.
   The arithmetic of each kernel follows its NumPy twin in
   dora_ref/core/kernels_numpy.py operation by operation (s * P, then + W0, ...),
   so the two differ only by rounding: the order of the rank-r sum, the
   double accumulators used here for sums, and, where the CPU has FMA, the
   fused multiply-adds of the rank-r sum in the tile of the norm, the merge
   and the unmerge (the tile's fused mode, FN(madd)), written as fma() calls. Elsewhere
   only column_norm's float32 squares may take an fma (FN(add_square)), where
   it gives the bits of the multiply and the add. Nothing else is fused: the
   build passes -ffp-contract=off, so each other operation rounds as written.

   Every kernel is split in three:
     FN(x_step)(..., g, w)          one tile: g <= G rows, w <= W columns
     FN(x_rows)(..., i0, i1, ...)   serial loop of steps over a range of rows
     FN(dora_x)(...)                checks sizes, parallel loop over blocks
   The rows worker calls each step with the constants G and W when the tile
   is full, so that the compiler unrolls and vectorizes that case, and with
   the variables g and w for the edges.
   The blocks have a fixed size, and rows are grouped in G's from the start
   of each block, so every row is computed by the same instructions whatever
   the number of threads: the results are bitwise independent of it. Blocks
   are handed out dynamically, so that on a shared machine a thread the OS
   preempts does not hold up the others (which thread computes a block does
   not change its bits). */

/* ------------------------------------------------------------------------ */
/* The rank-r tile, shared by the kernels:                                    */
/*   P[q][l] = sum_k b[q * ldb + k] * a[k * lda + l],   q < g, l < w        */
/* i.e. g rows of (b @ a) restricted to w columns, summed over k = 0..r-1   */
/* in order. Each load of a is used for g rows (the llm.c matmul trick), so */
/* A is read from cache out / G times instead of out times.                 */
/* ------------------------------------------------------------------------ */

/* One term of the tile, p + c * a: rounded twice (the product, then the
   sum), or, when `fused` (a constant after inlining), rounded once by a
   fused multiply-add. The norm, the merge and the unmerge fuse where the CPU
   has FMA (norm_or_merge: dora_fma_ok): on x86-64-v3 and v4 one vfmadd
   replaces a vmulps and a vaddps, the most of the norm's time at r >= 8.
   The forward and backward tiles never fuse. Either way the k terms are
   added in the same order, and the full tile and the edges round alike, so
   a row's P is the same for any tile and any number of threads. */
static inline __attribute__((always_inline)) REAL FN(madd)(const int fused, REAL c, REAL a, REAL p)
{
    if (!fused) return p + c * a;
    return sizeof(REAL) == sizeof(float) ? (REAL)fmaf((float)c, (float)a, (float)p)
                                         : (REAL)fma((double)c, (double)a, (double)p);
}

static inline __attribute__((always_inline)) void FN(tile_general)(
    const int fused, REAL P[G][W], const REAL *b, int64_t ldb, int g,
    const REAL *a, int64_t lda, int64_t r, int w)
{
    for (int q = 0; q < g; q++)
        for (int l = 0; l < w; l++) P[q][l] = 0;
    for (int64_t k = 0; k < r; k++) {
        const REAL *ak = a + k * lda;
        for (int q = 0; q < g; q++) {
            const REAL c = b[q * ldb + k];
            for (int l = 0; l < w; l++) P[q][l] = FN(madd)(fused, c, ak[l], P[q][l]);
        }
    }
}

/* The full G x W tile, written out row by row with the column loop inside
   so that the compiler keeps p0..p3 in vector registers and loads each
   a[k, l..] once for the four rows. (Written as tile_general, GCC vectorizes
   across the rows instead, with gathers: ten times slower.) */
static inline __attribute__((always_inline)) void FN(tile_full)(
    const int fused, REAL P[G][W], const REAL *b, int64_t ldb, const REAL *a, int64_t lda,
    int64_t r)
{
    REAL p0[W] = {0}, p1[W] = {0}, p2[W] = {0}, p3[W] = {0};
    for (int64_t k = 0; k < r; k++) {
        const REAL *ak = a + k * lda;
        const REAL c0 = b[k], c1 = b[ldb + k], c2 = b[2 * ldb + k], c3 = b[3 * ldb + k];
        #pragma omp simd  /* GCC 12 made the float64 tile 5x slower without it */
        for (int l = 0; l < W; l++) {
            p0[l] = FN(madd)(fused, c0, ak[l], p0[l]);
            p1[l] = FN(madd)(fused, c1, ak[l], p1[l]);
            p2[l] = FN(madd)(fused, c2, ak[l], p2[l]);
            p3[l] = FN(madd)(fused, c3, ak[l], p3[l]);
        }
    }
    for (int l = 0; l < W; l++) {
        P[0][l] = p0[l];
        P[1][l] = p1[l];
        P[2][l] = p2[l];
        P[3][l] = p3[l];
    }
}

/* P = tile of g rows and w columns: the fast path when it is a full one. */
static inline __attribute__((always_inline)) void FN(tile)(
    const int fused, REAL P[G][W], const REAL *b, int64_t ldb, int g,
    const REAL *a, int64_t lda, int64_t r, int w)
{
    if (g == G && w == W)
        FN(tile_full)(fused, P, b, ldb, a, lda, r);
    else
        FN(tile_general)(fused, P, b, ldb, g, a, lda, r, w);
}

/* sqrt of the sum of ACCW double lanes, added in a fixed order. */
static inline double FN(sqrt_lanes)(const double acc[ACCW])
{
    double t = 0;
    for (int l = 0; l < ACCW; l++) t += acc[l];
    return sqrt(t);
}

/* Packs the r x cols matrix M[k, c] = M[k * sk + c * sc] into panels of W
   columns, zero-padded: Mp[(p * r + k) * W + l] = M[k, p * W + l]. A tile
   then reads its r x W block of A (or of B.T) contiguously. Read in place,
   those rows are in * sizeof(REAL) bytes apart, which for in = 4096 maps
   them all to one L1 cache set: with r = 64 the tile ran 2x slower.
   Returns a new buffer that the caller frees, or NULL. */
/* Panels p0..p1 of that packing into Mp. A full panel's copy has no test
   of the column inside it (the forward packs B.T per call: at N = 16 that
   copy cost as many instructions as the rank-r sums themselves). */
static void FN(pack_panels_range)(REAL *Mp, const REAL *M, int64_t r, int64_t cols, int64_t sk,
                                  int64_t sc, int64_t p0, int64_t p1)
{
    for (int64_t p = p0; p < p1; p++) {
        REAL *dst = Mp + p * r * W;
        const REAL *src = M + p * W * sc;
        if ((p + 1) * W <= cols) {
            for (int64_t k = 0; k < r; k++)
                for (int l = 0; l < W; l++) dst[k * W + l] = src[k * sk + l * sc];
        } else {
            for (int64_t k = 0; k < r; k++)
                for (int64_t l = 0; l < W; l++)
                    dst[k * W + l] = p * W + l < cols ? src[k * sk + l * sc] : 0;
        }
    }
}

/* A buffer for the panels of an r x cols matrix, or NULL. */
static REAL *FN(pack_alloc)(int64_t r, int64_t cols)
{
    const int64_t size = (cols + W - 1) / W * r * W;
    return (REAL *)malloc((size_t)(size > 0 ? size : 1) * sizeof(REAL));
}

static REAL *FN(pack_panels)(const REAL *M, int64_t r, int64_t cols, int64_t sk, int64_t sc)
{
    REAL *Mp = FN(pack_alloc)(r, cols);
    if (Mp) FN(pack_panels_range)(Mp, M, r, cols, sk, sc, 0, (cols + W - 1) / W);
    return Mp;
}

/* Packs B (out x r) in groups of NG rows for norm_full6, zero-padded:
   Bq[(i / NG) * NG * r + k * NG + q] = B[i + q, k] for i a multiple of NG.
   Returns a new buffer that the caller frees, or NULL. */
static REAL *FN(pack_groups)(const REAL *B, int64_t out, int64_t r)
{
    const int64_t ngroups = (out + NG - 1) / NG;
    const int64_t size = ngroups * NG * r;
    REAL *Bq = (REAL *)malloc((size_t)(size > 0 ? size : 1) * sizeof(REAL));
    if (!Bq) return NULL;
    for (int64_t p = 0; p < ngroups; p++)
        for (int64_t k = 0; k < r; k++)
            for (int64_t q = 0; q < NG; q++) {
                const int64_t i = p * NG + q;
                Bq[(p * r + k) * NG + q] = i < out ? B[i * r + k] : 0;
            }
    return Bq;
}

/* ------------------------------------------------------------------------ */
/* column_norm: n_i = ||W0_i + s * B_i @ A||_2  (paper ||V||_c, one per row) */
/* ------------------------------------------------------------------------ */

/* acc + v * v in double. For a float v the product of the two doubles is
   exact (24 significant bits squared fit in 53, and no float squared
   overflows or underflows a double), so one fused multiply-add gives the
   same bits, including for inf and NaN: the float kernels take it when
   `fused` is 2 (column_norm_rows_sq: the fused mode at r < NORM_FMA_SQUARES_MAX_R).
   It moves the add from the FP adders, where the square's two vcvtps2pd also
   run, to the FMA units, which the rank-r sum keeps busy: Zen 3 shared with
   other processes (load 7-9), one thread, float32, interleaved repeats,
   medians against the multiply and the add: (240, 4096) 0.957x the time at
   r = 8, 0.964x at r = 16, 0.99-1.01x at r = 32 and 64; (4096, 4096)
   0.95-0.99x at r = 32 but 1.05-1.12x at r = 64 (three runs; the slowdown
   an earlier session also saw at r = 64). float64 always multiplies and
   adds: its product rounds, and an fma would change the bits. */
static inline __attribute__((always_inline)) double FN(add_square)(const int fused, double acc,
                                                                   REAL v)
{
    if (fused == 2 && sizeof(REAL) == sizeof(float))
        return fma((double)v, (double)v, acc);
    return acc + (double)v * (double)v;
}

/* One tile: acc[q][l % ACCW] += V[q][l]^2 with V = W0 + s * (B @ A) and, if
   Vout is not NULL, Vout = V (the merge keeps V; rows in apart, as W0's).
   g <= G rows (acc has g of them), w <= W columns. */
static inline __attribute__((always_inline)) void FN(norm_step)(
    const int fused, double acc[][ACCW], REAL *Vout, const WTYPE *w0, const REAL *b,
    const REAL *a, REAL s, int64_t in, int64_t r, int g, int w)
{
    REAL P[G][W];
    FN(tile)(fused, P, b, r, g, a, W, r, w);  /* P = B_i @ A on this tile */
    for (int q = 0; q < g; q++) {
        /* V = W0 + s * P in place of P (PEFT: W + s * (B @ A)), in a loop of
           its own, which vectorizes with the widening of W0 in it */
        for (int l = 0; l < w; l++) P[q][l] = WIDEN(w0[q * in + l]) + s * P[q][l];
        for (int h = 0; h < w; h += ACCW) {
            const int e = w - h < ACCW ? w - h : ACCW;
            for (int l = 0; l < e; l++) {
                const REAL v = P[q][h + l];
                if (Vout) Vout[q * in + h + l] = v;
                acc[q][l] = FN(add_square)(fused, acc[q][l], v);  /* += (double)v * (double)v */
            }
        }
    }
}

/* One row of norm_full6's tile: acc[l % ACCW] += V[l]^2, V = W0 + s * p,
   for the W columns of this tile; the arithmetic of norm_step. */
static inline __attribute__((always_inline)) void FN(norm_row_squares)(
    const int fused, double acc[ACCW], const WTYPE *w0, const REAL p[W], REAL s)
{
    REAL v[W];
    #pragma omp simd
    for (int l = 0; l < W; l++) v[l] = WIDEN(w0[l]) + s * p[l];
    for (int h = 0; h < W; h += ACCW)
        for (int l = 0; l < ACCW; l++) acc[l] = FN(add_square)(fused, acc[l], v[h + l]);
}

/* norm_step for a full tile of NG = 6 rows (column_norm in the fused mode:
   float32 at r >= NORM_SIX_MIN_R, float64 where the AVX-512 tile is allowed,
   norm_or_merge): twelve vector accumulators on AVX2
   where tile_full has eight, so that each load of A feeds six rows instead
   of four and the k loop has twelve independent chains of FMAs. A loop a
   row, so that a row's coefficient is needed only for its own vector FMAs
   (with the six loaded ahead GCC spilled three accumulators), and each
   row's sums go from registers into its squares. The group's coefficients
   come packed, bq[k * NG + q] = B[i + q, k] (pack_groups): one pointer
   where six rows of B took six registers, which GCC reloaded from the
   stack at every k. k = 0 is peeled (t = c * a, no zeroed accumulators,
   which GCC kept on the stack): fma(c, a, 0) differs from c * a only in
   the sign of a zero, and so may every later P; V = W0 + s * P then only
   in the sign of a zero, and V * V not at all. Otherwise the same terms in
   the same order as tile_full, tile_general and norm_step: n has the same
   bits. Zen 3, one thread, (120, 4096) float32, 41 interleaved repeats,
   load 8: 0.93-0.98x the four-row tile's time at r = 16, 32, 64, 1.06x at
   r = 8 (hence NORM_SIX_MIN_R). */
static inline __attribute__((always_inline)) void FN(norm_full6)(
    const int fused, double acc[][ACCW], const WTYPE *w0, const REAL *bq, const REAL *a, REAL s,
    int64_t in, int64_t r)
{
    REAL t0[W], t1[W], t2[W], t3[W], t4[W], t5[W];
    #pragma omp simd
    for (int l = 0; l < W; l++) {  /* k = 0: fma(c, a, 0) = c * a but for the sign of a zero */
        t0[l] = bq[0] * a[l];
        t1[l] = bq[1] * a[l];
        t2[l] = bq[2] * a[l];
        t3[l] = bq[3] * a[l];
        t4[l] = bq[4] * a[l];
        t5[l] = bq[5] * a[l];
    }
    for (int64_t k = 1; k < r; k++) {
        const REAL *ak = a + k * W;  /* A[k, j:j+W] in its panel */
        const REAL *bk = bq + k * NG;  /* B[i:i+NG, k] */
        REAL e;
        e = bk[0];
        #pragma omp simd
        for (int l = 0; l < W; l++) t0[l] = FN(madd)(fused, e, ak[l], t0[l]);
        e = bk[1];
        #pragma omp simd
        for (int l = 0; l < W; l++) t1[l] = FN(madd)(fused, e, ak[l], t1[l]);
        e = bk[2];
        #pragma omp simd
        for (int l = 0; l < W; l++) t2[l] = FN(madd)(fused, e, ak[l], t2[l]);
        e = bk[3];
        #pragma omp simd
        for (int l = 0; l < W; l++) t3[l] = FN(madd)(fused, e, ak[l], t3[l]);
        e = bk[4];
        #pragma omp simd
        for (int l = 0; l < W; l++) t4[l] = FN(madd)(fused, e, ak[l], t4[l]);
        e = bk[5];
        #pragma omp simd
        for (int l = 0; l < W; l++) t5[l] = FN(madd)(fused, e, ak[l], t5[l]);
    }
    FN(norm_row_squares)(fused, acc[0], w0, t0, s);
    FN(norm_row_squares)(fused, acc[1], w0 + in, t1, s);
    FN(norm_row_squares)(fused, acc[2], w0 + 2 * in, t2, s);
    FN(norm_row_squares)(fused, acc[3], w0 + 3 * in, t3, s);
    FN(norm_row_squares)(fused, acc[4], w0 + 4 * in, t4, s);
    FN(norm_row_squares)(fused, acc[5], w0 + 5 * in, t5, s);
}

/* Rows i0..i1 of V = W0 + s * B @ A: n_i = ||V_i||, and, for the merge,
   Wm_i = (m_i / n_i) V_i, scaled while the row is in cache: a group's G rows
   of V are kept in V (G x in REALs, the caller's scratch), so that W' is
   written once, narrowed once. Inlined into merge_rows with `merging` a
   constant 1 (column_norm_rows has a loop of its own, blocked for A). */
static inline __attribute__((always_inline)) void FN(norm_rows)(
    const int fused, const int merging, WTYPE *Wm, REAL *V, REAL *n, const WTYPE *W0, const REAL *Ap,
    const REAL *B, const REAL *m, REAL s, int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    for (int64_t i = i0; i < i1; i += G) {
        const int g = (int)dora_min(G, i1 - i);
        double acc[G][ACCW] = {{0}};
        for (int64_t j = 0; j < in; j += W) {
            const int w = (int)dora_min(W, in - j);
            const int64_t o = i * in + j;
            const REAL *ap = Ap + (j / W) * r * W;  /* A[:, j:j+W] */
            REAL *vout = merging ? V + j : NULL;
            if (g == G && w == W)
                FN(norm_step)(fused, acc, vout, W0 + o, B + i * r, ap, s, in, r, G, W);
            else
                FN(norm_step)(fused, acc, vout, W0 + o, B + i * r, ap, s, in, r, g, w);
        }
        for (int q = 0; q < g; q++) {
            const REAL nq = (REAL)FN(sqrt_lanes)(acc[q]);
            n[i + q] = nq;
            if (merging) {
                const REAL f = m[i + q] / nq;  /* inf or NaN when nq = 0, as in NumPy */
                const REAL *v = V + q * in;
                WTYPE *row = Wm + (i + q) * in;
                for (int64_t j = 0; j < in; j++) row[j] = NARROW(f * v[j]);
            }
        }
    }
}

/* Asks for the cache lines of W0 that the tile after (i, j) in
   column_norm_rows_body's order reads: (i, j + W) in the chunk j0..j1,
   else the next group's first tile (i + ng, j0), else the next chunk's
   first tile (i0, j1); nothing past W0's last row or column. A hint only:
   no value depends on it. When A is taken in chunks (norm_chunk), the
   block's rows read W0 a chunk's width at a time (256 bytes a row at
   r = 64), a pattern the CPU's own prefetchers did not follow. */
static inline __attribute__((always_inline)) void FN(norm_prefetch)(
    const WTYPE *W0, const int ng, int64_t i, int64_t j, int64_t i0, int64_t i1, int64_t j0,
    int64_t j1, int64_t in)
{
#if defined(__GNUC__) || defined(__clang__)
    int64_t pi = i, pj = j + W;
    if (pj >= j1) {
        pi = i + ng;
        pj = j0;
        if (pi >= i1) {
            pi = i0;
            pj = j1;
        }
    }
    if (pj >= in) return;
    const WTYPE *p = W0 + pi * in + pj;
    if (pi + ng <= i1) {
        for (int q = 0; q < ng; q++) __builtin_prefetch(p + q * in, 0, 3);
    } else {
        for (int64_t q = 0; q < i1 - pi; q++) __builtin_prefetch(p + q * in, 0, 3);
    }
#else
    (void)W0, (void)ng, (void)i, (void)j, (void)i0, (void)i1, (void)j0, (void)j1, (void)in;
#endif
}

/* Rows i0..i1 (at most NORM_ROW_BLOCK) of the norm alone, with the columns
   in chunks: all the rows' groups take one chunk of A before the next, so
   that A's chunk (r x chunk REALs, norm_chunk) is read from L1 by every
   group, where norm_rows reads all of A, which at r = 64 is larger than L2,
   once per group. Each row's squares are still added in column order, into
   the same lanes: the bits of norm_rows. Rows are taken `ng` at a time, a
   constant: NG (norm_full6) where norm_or_merge packed Bq (its rule), G
   otherwise (norm_step). NORM_ROW_BLOCK is a multiple of both, so only the
   last group of the matrix can be short. `prefetch` (a constant): when A
   is taken in chunks, each tile first asks for the W0 lines of the tile
   after it (norm_prefetch). Only column_norm_rows' six-row body takes it
   (r >= NORM_FMA_SQUARES_MAX_R): in column_norm_rows_sq, where A is read
   whole at in = 4096 and no prefetch is made, the test alone made the
   r = 16 norm 2-8% slower (Zen 3, one and two threads, shared); and in a
   function of its own the six-row body kept two of its twelve sums on the
   stack in the k loop (GCC 12). Zen 3, (4096, 4096, 64) float32, shared
   (load 2-5): 0.88-0.92x the time without it on one thread, 0.83-0.93x on
   two (CPU time, minima and medians of 7 interleaved repeats), 0.85-0.92x
   in bench_rank_ab.py (2 threads, medians of 21-41); r = 32, where it is
   not taken, 0.99-1.00x (3.6% more instructions per tile). The bits are
   the same. */
static inline __attribute__((always_inline)) void FN(column_norm_rows_body)(
    const int fused, const int ng, const int prefetch, REAL *n, const WTYPE *W0, const REAL *Ap,
    const REAL *B, const REAL *Bq, REAL s, int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    const int64_t chunk = norm_chunk(r, in);
    const int pf = prefetch && chunk < in;  /* W0 read a chunk's width at a time */
    double acc[NORM_ROW_BLOCK][ACCW] = {{0}};  /* row i's lanes: acc[i - i0] */
    for (int64_t j0 = 0; j0 < in; j0 += chunk) {
        const int64_t j1 = dora_min(in, j0 + chunk);
        for (int64_t i = i0; i < i1; i += ng) {
            /* acc[group] += squares of V[i:i+g, j0:j1], V = W0 + s * B @ A */
            const int g = (int)dora_min(ng, i1 - i);
            double (*ag)[ACCW] = acc + (i - i0);
            for (int64_t j = j0; j < j1; j += W) {
                const int w = (int)dora_min(W, in - j);
                const REAL *ap = Ap + (j / W) * r * W;  /* A[:, j:j+W] */
                const WTYPE *w0 = W0 + i * in + j;
                if (pf) FN(norm_prefetch)(W0, ng, i, j, i0, i1, j0, j1, in);
                if (ng == NG && g == NG && w == W) {
                    FN(norm_full6)(fused, ag, w0, Bq + i * r, ap, s, in, r);
                } else if (ng == NG) {  /* the last group's or the last columns' tile */
                    for (int q = 0; q < g; q += G)
                        FN(norm_step)(fused, ag + q, NULL, w0 + q * in, B + (i + q) * r, ap, s,
                                      in, r, (int)dora_min(G, g - q), w);
                } else if (g == G && w == W) {
                    FN(norm_step)(fused, ag, NULL, w0, B + i * r, ap, s, in, r, G, W);
                } else {
                    FN(norm_step)(fused, ag, NULL, w0, B + i * r, ap, s, in, r, g, w);
                }
            }
        }
    }
    for (int64_t i = i0; i < i1; i++)  /* n_i = sqrt of row i's lanes */
        n[i] = (REAL)FN(sqrt_lanes)(acc[i - i0]);
}

static DORA_CLONES void FN(column_norm_rows)(
    int fused, REAL *n, const WTYPE *W0, const REAL *Ap, const REAL *B, const REAL *Bq, REAL s,
    int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    if (fused && Bq)
        FN(column_norm_rows_body)(1, NG, 1, n, W0, Ap, B, Bq, s, i0, i1, in, r);
    else if (fused)
        FN(column_norm_rows_body)(1, G, 0, n, W0, Ap, B, Bq, s, i0, i1, in, r);
    else
        FN(column_norm_rows_body)(0, G, 0, n, W0, Ap, B, Bq, s, i0, i1, in, r);
}

/* column_norm_rows in the fused mode at r < NORM_FMA_SQUARES_MAX_R: the
   squares by fma too (add_square's `fused` 2). A function of its own: with
   these two bodies added to column_norm_rows, GCC 12 compiled that
   function's six-row body 1.7x slower at r = 32, where it takes no fma
   squares ((4096, 4096) and (1024, 4096) float32, one thread, Zen 3). */
static DORA_CLONES void FN(column_norm_rows_sq)(
    REAL *n, const WTYPE *W0, const REAL *Ap, const REAL *B, const REAL *Bq, REAL s,
    int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    if (Bq)
        FN(column_norm_rows_body)(2, NG, 0, n, W0, Ap, B, Bq, s, i0, i1, in, r);
    else
        FN(column_norm_rows_body)(2, G, 0, n, W0, Ap, B, Bq, s, i0, i1, in, r);
}

#if defined(DORA_NORM_AVX2) && W == 16
/* column_norm_rows_sq's six-row body in AVX2/FMA intrinsics (float32
   arithmetic: W0 float32, or 16-bit W0 widened by WIDEN), compiled for
   that target alone and called only where dora_norm_avx2_ok (norm_block).
   The same operations in the same order as norm_full6 with `fused` 2, so
   n has the same bits as the plain C tile's (and norm_step's, merge's):
     P[q] = c_q0 * a_0 (k = 0 peeled, as norm_full6), then for k = 1..r-1
            P[q] = fma(c_qk, a_k, P[q]), the sixteen columns in two __m256;
     V[q] = WIDEN(W0[q]) + s * P[q]   (a multiply and an add, two roundings);
     acc[q][l % ACCW] = fma((double)V[l], (double)V[l], acc[q][l % ACCW])
            for l = 0..15 in order: lanes 0-3 and 4-7 are two __m256d, and
            columns 0-7 are added before columns 8-15, as add_square's loop.
   Why intrinsics: GCC 12 compiled norm_full6 (r = 16, fused 2) and its
   loop to 546 instructions a tile (callgrind) for 228 FMA-unit operations,
   about 3 a cycle on Zen 3: instruction-bound. Here the twelve sums stay in
   ymm registers from k = 0 to the squares; the k loop is unrolled whole at
   r = 8, 16 and 32 (column_norm_rows_avx2's constants); the group's lanes
   are __m256d values across its tiles (norm6_avx2_rows). Instructions a
   six-row tile, (120, 4096) float32, one thread, callgrind, plain C tiles
   of the base build -> this: r = 8 427 (four-row tiles, scaled to six rows)
   -> 270, r = 16 546 -> 430, r = 24 738 -> 649 (k loop not unrolled), r = 32
   997 (column_norm_rows, squares by a multiply and an add) -> 749. The
   rest of r = 16's 430: 180 + 12 vector FMAs and multiplies of the rank-r
   sum, 96 broadcasts of B, 32 loads of A, the squares (12 multiplies, 12
   adds, 12 extracts, 24 conversions, 24 double FMAs) and 22 register
   copies. */
/* What bounds this tile at r = 16 (measured, nothing adopted): a throwaway
   copy of norm6_avx2_rows at (4080, 4096, 16) float32, variants timed
   interleaved in one process by thread CPU time (Zen 3, about 2.9 GHz by a
   dependent-add loop, shared: load 3-6), ns a tile, medians of 31-41:
     one thread: 68-77 as it is; W0 always from L1 (wrong results) 54,
       A always from L1 62, both 53-54; both and no squares (the twelve sums
       added to the lanes as they are) 39, about 112 cycles where the 192
       FMAs on two pipes take 96. So the work in registers is most of it,
       about 155 cycles, the squares (24 conversions, 12 extracts, 36
       FMA-unit operations) about 42 of them, and W0's stream about 20%;
     two threads: 88-92 as it is, W0 from L1 69, both from L1 63-70.
   callgrind (one thread): 424 instructions and 22.1 L1 read misses a tile
   (6 lines of W0, 16 of A: 6.1 with A from L1, 16.1 with W0 from L1).
   Tried, bits the same, none faster beyond the noise: B broadcast once per
   group into 96 vectors (3 KiB, L1) read by the FMAs as memory operands
   (335 instructions a tile, 1.0-1.16x the time: the issue of the 96
   broadcasts is not the bound); the squares of the previous tile
   interleaved into this tile's k loop (its sums kept in 12 stores):
   1.05-1.13x; V stored and converted from memory (GCC put the extracts
   back: the same 424 instructions); prefetch of W0 1, 2, 3, 4, 6, 8, 16,
   32, 64 tiles ahead into L1, L2 or non-temporal: 0.84-1.10x, no
   consistent sign from run to run; column blocks of 512-2048 so that A's
   block stays in L1: 0.97-1.00x, of 256: 1.12-1.24x (W0 read in pieces);
   two, five, ten groups per column tile, so that A's 1 KiB comes from L2
   once for 12-60 rows: 1.0x, 1.6x, 1.9x the same loop with one group
   (more streams of W0). */
#define NORM6_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* acc lanes 0-3 (lo) and 4-7 (hi) += V^2, V = W0 row (16 columns) + s * (t0 | t1). */
NORM6_AVX2_INLINE void FN(norm6_avx2_squares)(__m256d acc[2], const WTYPE *w0, __m256 t0,
                                              __m256 t1, __m256 s)
{
#if LP
    float wv[W];
    for (int l = 0; l < W; l++) wv[l] = WIDEN(w0[l]);
    const __m256 x0 = _mm256_loadu_ps(wv), x1 = _mm256_loadu_ps(wv + 8);
#else
    const __m256 x0 = _mm256_loadu_ps(w0), x1 = _mm256_loadu_ps(w0 + 8);
#endif
    const __m256 v0 = _mm256_add_ps(x0, _mm256_mul_ps(s, t0));  /* W0 + s * P */
    const __m256 v1 = _mm256_add_ps(x1, _mm256_mul_ps(s, t1));
    const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v0));   /* columns 0-3 */
    const __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v0, 1)); /* 4-7 */
    const __m256d d2 = _mm256_cvtps_pd(_mm256_castps256_ps128(v1));   /* 8-11 */
    const __m256d d3 = _mm256_cvtps_pd(_mm256_extractf128_ps(v1, 1)); /* 12-15 */
    __m256d lo = acc[0], hi = acc[1];
    lo = _mm256_fmadd_pd(d0, d0, lo);  /* lanes 0-3: columns 0-3, then 8-11 */
    hi = _mm256_fmadd_pd(d1, d1, hi);  /* lanes 4-7: columns 4-7, then 12-15 */
    lo = _mm256_fmadd_pd(d2, d2, lo);
    hi = _mm256_fmadd_pd(d3, d3, hi);
    acc[0] = lo;
    acc[1] = hi;
}

/* k = 1..r-1 of norm6_avx2: t_q = fma(c_qk, A[k, cols], t_q), in order. */
#define NORM6_AVX2_K(k)                                                       \
    do {                                                                      \
        const float *ak_ = a + (k) * W, *bk_ = bq + (k) * NG;                 \
        const __m256 a0_ = _mm256_loadu_ps(ak_), a1_ = _mm256_loadu_ps(ak_ + 8); \
        __m256 e_;                                                            \
        e_ = _mm256_broadcast_ss(bk_ + 0);                                    \
        t00 = _mm256_fmadd_ps(e_, a0_, t00);                                  \
        t01 = _mm256_fmadd_ps(e_, a1_, t01);                                  \
        e_ = _mm256_broadcast_ss(bk_ + 1);                                    \
        t10 = _mm256_fmadd_ps(e_, a0_, t10);                                  \
        t11 = _mm256_fmadd_ps(e_, a1_, t11);                                  \
        e_ = _mm256_broadcast_ss(bk_ + 2);                                    \
        t20 = _mm256_fmadd_ps(e_, a0_, t20);                                  \
        t21 = _mm256_fmadd_ps(e_, a1_, t21);                                  \
        e_ = _mm256_broadcast_ss(bk_ + 3);                                    \
        t30 = _mm256_fmadd_ps(e_, a0_, t30);                                  \
        t31 = _mm256_fmadd_ps(e_, a1_, t31);                                  \
        e_ = _mm256_broadcast_ss(bk_ + 4);                                    \
        t40 = _mm256_fmadd_ps(e_, a0_, t40);                                  \
        t41 = _mm256_fmadd_ps(e_, a1_, t41);                                  \
        e_ = _mm256_broadcast_ss(bk_ + 5);                                    \
        t50 = _mm256_fmadd_ps(e_, a0_, t50);                                  \
        t51 = _mm256_fmadd_ps(e_, a1_, t51);                                  \
    } while (0)

/* One full NG x W tile: norm_full6(2, acc, w0, bq, a, s, in, r), acc the
   group's lanes. At r = 8, 16, 32 (constants after inlining) the k loop is
   unrolled whole: GCC 12 left r = 16's 15 iterations a loop at -O3 (too
   many instructions for its complete peeling), 3 more instructions an
   iteration. */
NORM6_AVX2_INLINE void FN(norm6_avx2)(__m256d acc[NG][2], const WTYPE *w0, const float *bq,
                                      const float *a, const float *sp, int64_t in, const int64_t r)
{
    /* bq is the same for all the group's tiles: GCC 12 then hoisted the
       96 addresses bq + k * NG + q (r = 16) out of the tile loop and spilled
       them, one reload a broadcast; opaque here, each broadcast reads
       bq + constant. Likewise s, read after the k loop (a ymm register held
       across it spilled one of the twelve sums). */
    __asm__("" : "+r"(bq), "+r"(sp));
    const __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
    __m256 e;
    e = _mm256_broadcast_ss(bq + 0);  /* k = 0: c * a, as norm_full6 */
    __m256 t00 = _mm256_mul_ps(e, a0), t01 = _mm256_mul_ps(e, a1);
    e = _mm256_broadcast_ss(bq + 1);
    __m256 t10 = _mm256_mul_ps(e, a0), t11 = _mm256_mul_ps(e, a1);
    e = _mm256_broadcast_ss(bq + 2);
    __m256 t20 = _mm256_mul_ps(e, a0), t21 = _mm256_mul_ps(e, a1);
    e = _mm256_broadcast_ss(bq + 3);
    __m256 t30 = _mm256_mul_ps(e, a0), t31 = _mm256_mul_ps(e, a1);
    e = _mm256_broadcast_ss(bq + 4);
    __m256 t40 = _mm256_mul_ps(e, a0), t41 = _mm256_mul_ps(e, a1);
    e = _mm256_broadcast_ss(bq + 5);
    __m256 t50 = _mm256_mul_ps(e, a0), t51 = _mm256_mul_ps(e, a1);
    if (r == 8 || r == 16 || r == 32) {  /* a constant (column_norm_rows_avx2): unrolled whole */
        #pragma GCC unroll 32
        for (int k = 1; k < r; k++) NORM6_AVX2_K(k);
    } else {
        #pragma GCC unroll 4
        for (int64_t k = 1; k < r; k++) NORM6_AVX2_K(k);
    }
    const __m256 s = _mm256_broadcast_ss(sp);
    FN(norm6_avx2_squares)(acc[0], w0, t00, t01, s);
    FN(norm6_avx2_squares)(acc[1], w0 + in, t10, t11, s);
    FN(norm6_avx2_squares)(acc[2], w0 + 2 * in, t20, t21, s);
    FN(norm6_avx2_squares)(acc[3], w0 + 3 * in, t30, t31, s);
    FN(norm6_avx2_squares)(acc[4], w0 + 4 * in, t40, t41, s);
    FN(norm6_avx2_squares)(acc[5], w0 + 5 * in, t50, t51, s);
}

/* The last group's tiles of a block and the last columns' of a row (fewer
   than NG rows or W columns): norm_step's plain C tiles, in column order. */
static inline __attribute__((always_inline)) void FN(norm6_edge_tiles)(
    double (*ag)[ACCW], int g, const WTYPE *W0,
    const REAL *Ap, const REAL *B, REAL s, int64_t i, int64_t j, int64_t j1, int64_t in, int64_t r)
{
    for (; j < j1; j += W) {
        const int w = (int)dora_min(W, in - j);
        const REAL *ap = Ap + (j / W) * r * W;
        const WTYPE *w0 = W0 + i * in + j;
        for (int q = 0; q < g; q += G)
            FN(norm_step)(2, ag + q, NULL, w0 + q * in, B + (i + q) * r, ap, s, in, r,
                          (int)dora_min(G, g - q), w);
    }
}

/* column_norm_rows_body(2, NG, 0, ...) with a SIMD tile for the full
   tiles, the body of norm6_avx2_rows and norm6_avx512_rows: GROUP(ag, w0,
   bq, ap, tiles) adds a full group's `tiles` full tiles from column j0 on
   (w0 = W0[i, j0], bq its rows of Bq, ap = A[:, j0:j0+W]) to its lanes ag;
   the edge tiles are norm_step's (norm6_edge_tiles). Columns are taken in
   the same order, j0 to j1, so n has the plain tiles' bits. */
/* ROWS(r, ...) with the benchmarks' ranks a constant: the k loop unrolled. */
#define NORM6_RANK_SWITCH(ROWS)                                               \
    do {                                                                      \
        switch (r) {                                                          \
        case 8: ROWS(8, n, W0, Ap, B, Bq, s, i0, i1, in); break;              \
        case 16: ROWS(16, n, W0, Ap, B, Bq, s, i0, i1, in); break;            \
        case 32: ROWS(32, n, W0, Ap, B, Bq, s, i0, i1, in); break;            \
        case 64: ROWS(64, n, W0, Ap, B, Bq, s, i0, i1, in); break;            \
        default: ROWS(r, n, W0, Ap, B, Bq, s, i0, i1, in); break;             \
        }                                                                     \
    } while (0)

#define NORM6_SIMD_ROWS(GROUP)                                                \
    do {                                                                      \
        const int64_t chunk_ = norm_chunk(r, in);  /* a multiple of W, or in */ \
        double acc_[NORM_ROW_BLOCK][ACCW] = {{0}};  /* row i's lanes: acc_[i - i0] */ \
        for (int64_t j0 = 0; j0 < in; j0 += chunk_) {                         \
            const int64_t j1 = dora_min(in, j0 + chunk_);                     \
            const int64_t jf = j0 + (j1 - j0) / W * W;  /* full tiles: j0 .. jf */ \
            for (int64_t i = i0; i < i1; i += NG) {                           \
                const int g = (int)dora_min(NG, i1 - i);                      \
                double (*ag)[ACCW] = acc_ + (i - i0);                         \
                int64_t j = j0;                                               \
                if (g == NG) {                                                \
                    GROUP(ag, W0 + i * in + j0, Bq + i * r, Ap + (j0 / W) * r * W, \
                          (jf - j0) / W);                                     \
                    j = jf;                                                   \
                }                                                             \
                FN(norm6_edge_tiles)(ag, g, W0, Ap, B, s, i, j, j1, in, r);   \
            }                                                                 \
        }                                                                     \
        for (int64_t i = i0; i < i1; i++)  /* n_i = sqrt of row i's lanes */  \
            n[i] = (REAL)FN(sqrt_lanes)(acc_[i - i0]);                        \
    } while (0)

/* A full group's full tiles with norm6_avx2, walked with two pointers and
   a count (with column_norm_rows_body's loop, GCC spent about 60 scalar
   instructions a tile on its indices, kept on the stack). The group's
   lanes are held in registers' type (acc is written by may-alias stores,
   after which GCC 12 reloaded everything). */
NORM6_AVX2_INLINE void FN(norm6_avx2_group)(double (*ag)[ACCW], const WTYPE *w0, const REAL *bq,
                                            const REAL *ap, const REAL *sp, int64_t in,
                                            const int64_t r, int64_t tiles)
{
    __m256d ga[NG][2];
    for (int q = 0; q < NG; q++) {
        ga[q][0] = _mm256_loadu_pd(ag[q]);
        ga[q][1] = _mm256_loadu_pd(ag[q] + 4);
    }
    for (; tiles > 0; tiles--, w0 += W, ap += r * W)
        FN(norm6_avx2)(ga, w0, bq, ap, sp, in, r);
    for (int q = 0; q < NG; q++) {
        _mm256_storeu_pd(ag[q], ga[q][0]);
        _mm256_storeu_pd(ag[q] + 4, ga[q][1]);
    }
}

NORM6_AVX2_INLINE void FN(norm6_avx2_rows)(
    const int64_t r, REAL *n, const WTYPE *W0, const REAL *Ap, const REAL *B, const REAL *Bq,
    REAL s, int64_t i0, int64_t i1, int64_t in)
{
#define NORM6_AVX2_GROUP(ag, w0, bq, ap, tiles) \
    FN(norm6_avx2_group)(ag, w0, bq, ap, &s, in, r, tiles)
    NORM6_SIMD_ROWS(NORM6_AVX2_GROUP);
#undef NORM6_AVX2_GROUP
}

/* column_norm's rows i0..i1 at NORM_AVX2_MIN_R <= r <= NORM_AVX2_MAX_R in
   the fused mode, on a CPU with AVX2 and FMA (norm_block): in place of
   column_norm_rows_sq (r < 16: four-row tiles; 16..31: norm_full6) and of
   column_norm_rows at r = 32 (norm_full6 with the squares by a multiply
   and an add, the same bits as an fma: add_square). Its A is read whole at
   in <= 4096 (norm_chunk), where column_norm_rows' W0 prefetch is not made
   either. */
static __attribute__((target("avx2,fma"))) void FN(column_norm_rows_avx2)(
    REAL *n, const WTYPE *W0, const REAL *Ap, const REAL *B, const REAL *Bq, REAL s,
    int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    NORM6_RANK_SWITCH(FN(norm6_avx2_rows));
}
#endif

#if defined(DORA_NORM_AVX2) && W == 16
/* norm6_avx2's work in AVX-512 (float32 arithmetic, as there), compiled for
   that target alone and called only where dora_norm_avx512_ok (norm_block),
   at NORM_AVX2_MIN_R <= r <= NORM_AVX512_MAX_R. The same operations in the
   same order for every element, so n has the bits of the AVX2 and plain C
   tiles: P[q] = c_q0 * a_0, then P[q] = fma(c_qk, a_k, P[q]) for k = 1..r-1;
   V[q] = WIDEN(W0[q]) + s * P[q]; row q's lane l += V[l]^2 (in double, by
   fma) for columns l then l + 8 of each 16, the tiles in column order.
   A zmm register holds a row's sixteen columns, so a tile pair (six rows,
   two panels of A: 32 columns) keeps twelve independent sums, enough to
   keep both FMA units busy through their latency (a single tile's six
   sums are not: norm6_avx512_one, for the odd tile of a row's full tiles);
   a row's eight lanes are one __m512d. Why: on an Intel Xeon with AVX-512
   (2 cores, both FMA units 512 bits wide) the AVX2 tile ran the rank-16
   norm at 154 GF/s against OpenBLAS's 355 for an SGEMM, 2.7x a read of W0
   (goal: 2x). */
#define NORM6_AVX512_INLINE static inline __attribute__((always_inline, target("avx512f")))

/* acc (row q's eight lanes) += V^2, V = W0 row's 16 columns + s * t. */
NORM6_AVX512_INLINE __m512d FN(norm6_avx512_squares)(__m512d acc, const WTYPE *w0, __m512 t,
                                                     __m512 s)
{
#if LP
    const __m512 x = WIDEN16_ZMM(w0);  /* WIDEN of each, in registers */
#else
    const __m512 x = _mm512_loadu_ps(w0);
#endif
    const __m512 v = _mm512_add_ps(x, _mm512_mul_ps(s, t));  /* W0 + s * P */
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));  /* columns 0-7 */
    const __m512d hi = _mm512_cvtps_pd(                             /* 8-15 */
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    acc = _mm512_fmadd_pd(lo, lo, acc);
    return _mm512_fmadd_pd(hi, hi, acc);
}

/* Two full NG x W tiles side by side (columns j .. j + 2W: panels a and
   a + r * W), the first's squares added before the second's. */
NORM6_AVX512_INLINE void FN(norm6_avx512_pair)(__m512d acc[NG], const WTYPE *w0, const float *bq,
                                               const float *a, const float *sp, int64_t in,
                                               const int64_t r)
{
    __asm__("" : "+r"(bq), "+r"(sp));  /* as norm6_avx2: each broadcast reads bq + constant */
    const float *a2 = a + r * W;
    __m512 t0[NG], t1[NG];
    {
        const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a2);
        for (int q = 0; q < NG; q++) {  /* k = 0: c * a */
            const __m512 e = _mm512_set1_ps(bq[q]);
            t0[q] = _mm512_mul_ps(e, a0);
            t1[q] = _mm512_mul_ps(e, a1);
        }
    }
#define NORM6_AVX512_PAIR_K(k)                                                \
    do {                                                                      \
        const __m512 a0_ = _mm512_loadu_ps(a + (k) * W);                      \
        const __m512 a1_ = _mm512_loadu_ps(a2 + (k) * W);                     \
        for (int q = 0; q < NG; q++) {                                        \
            const __m512 e_ = _mm512_set1_ps(bq[(k) * NG + q]);               \
            t0[q] = _mm512_fmadd_ps(e_, a0_, t0[q]);                          \
            t1[q] = _mm512_fmadd_ps(e_, a1_, t1[q]);                          \
        }                                                                     \
    } while (0)
    if (r == 8 || r == 16 || r == 32 || r == 64) {  /* a constant (column_norm_rows_avx512): unrolled whole */
        #pragma GCC unroll 64
        for (int k = 1; k < r; k++) NORM6_AVX512_PAIR_K(k);
    } else {
        #pragma GCC unroll 4
        for (int64_t k = 1; k < r; k++) NORM6_AVX512_PAIR_K(k);
    }
#undef NORM6_AVX512_PAIR_K
    const __m512 s = _mm512_set1_ps(*sp);
    for (int q = 0; q < NG; q++) {
        acc[q] = FN(norm6_avx512_squares)(acc[q], w0 + q * in, t0[q], s);
        acc[q] = FN(norm6_avx512_squares)(acc[q], w0 + q * in + W, t1[q], s);
    }
}

/* One full NG x W tile (a row's odd full tile). */
NORM6_AVX512_INLINE void FN(norm6_avx512_one)(__m512d acc[NG], const WTYPE *w0, const float *bq,
                                              const float *a, const float *sp, int64_t in,
                                              const int64_t r)
{
    __asm__("" : "+r"(bq), "+r"(sp));
    __m512 t[NG];
    const __m512 a0 = _mm512_loadu_ps(a);
    for (int q = 0; q < NG; q++) t[q] = _mm512_mul_ps(_mm512_set1_ps(bq[q]), a0);
    for (int64_t k = 1; k < r; k++) {
        const __m512 ak = _mm512_loadu_ps(a + k * W);
        for (int q = 0; q < NG; q++) t[q] = _mm512_fmadd_ps(_mm512_set1_ps(bq[k * NG + q]), ak, t[q]);
    }
    const __m512 s = _mm512_set1_ps(*sp);
    for (int q = 0; q < NG; q++) acc[q] = FN(norm6_avx512_squares)(acc[q], w0 + q * in, t[q], s);
}

/* A full group's full tiles with the AVX-512 tiles: in pairs, then the odd
   one; W0 prefetched NORM_AVX512_PREFETCH columns ahead: the two lines of
   each row that the pair there reads (tiles of W0 too large for the
   caches: (11008, 4096, 16) 0.90x the time, (4096, 4096, 16) 0.95-1.01x). */
NORM6_AVX512_INLINE void FN(norm6_avx512_group)(double (*ag)[ACCW], const WTYPE *w0,
                                                const REAL *bq, const REAL *ap, const REAL *sp,
                                                int64_t in, const int64_t r, int64_t tiles)
{
    __m512d ga[NG];
    for (int q = 0; q < NG; q++) ga[q] = _mm512_loadu_pd(ag[q]);
    for (; tiles >= 2; tiles -= 2, w0 += 2 * W, ap += 2 * r * W) {
        for (int q = 0; q < NG; q++) {
            const char *ahead = (const char *)(w0 + q * in + NORM_AVX512_PREFETCH);
            _mm_prefetch(ahead, _MM_HINT_T0);
            _mm_prefetch(ahead + W * sizeof(WTYPE), _MM_HINT_T0);
        }
        FN(norm6_avx512_pair)(ga, w0, bq, ap, sp, in, r);
    }
    if (tiles)
        FN(norm6_avx512_one)(ga, w0, bq, ap, sp, in, r);
    for (int q = 0; q < NG; q++) _mm512_storeu_pd(ag[q], ga[q]);
}

NORM6_AVX512_INLINE void FN(norm6_avx512_rows)(
    const int64_t r, REAL *n, const WTYPE *W0, const REAL *Ap, const REAL *B, const REAL *Bq,
    REAL s, int64_t i0, int64_t i1, int64_t in)
{
#define NORM6_AVX512_GROUP(ag, w0, bq, ap, tiles) \
    FN(norm6_avx512_group)(ag, w0, bq, ap, &s, in, r, tiles)
    NORM6_SIMD_ROWS(NORM6_AVX512_GROUP);
#undef NORM6_AVX512_GROUP
}

/* column_norm_rows_avx2 on a CPU with AVX-512 F (dora_norm_avx512_ok), at
   NORM_AVX2_MIN_R <= r <= NORM_AVX512_MAX_R. */
static __attribute__((target("avx512f"))) void FN(column_norm_rows_avx512)(
    REAL *n, const WTYPE *W0, const REAL *Ap, const REAL *B, const REAL *Bq, REAL s,
    int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    NORM6_RANK_SWITCH(FN(norm6_avx512_rows));
}
#endif

/* ------------------------------------------------------------------------ */
/* merge: V = W0 + s * B @ A,  n = ||V||_row,  W' = (m / n) * V             */
/* One pass over W0: a group's rows of V are kept in a scratch (in cache),  */
/* then scaled into W'.                                                     */
/* ------------------------------------------------------------------------ */

static DORA_CLONES void FN(merge_rows)(
    int fused, WTYPE *Wm, REAL *V, REAL *n, const WTYPE *W0, const REAL *Ap, const REAL *B,
    const REAL *m, REAL s, int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    if (fused)
        FN(norm_rows)(1, 1, Wm, V, n, W0, Ap, B, m, s, i0, i1, in, r);
    else
        FN(norm_rows)(0, 1, Wm, V, n, W0, Ap, B, m, s, i0, i1, in, r);
}

/* column_norm's blocks on a team (dora_team_for): block blk is rows
   blk * NORM_ROW_BLOCK onwards. */
typedef struct {
    REAL *n;
    const WTYPE *W0;
    const REAL *Ap, *B, *Bq;
    REAL s;
    int64_t out, in, r;
    int fused, tile;  /* tile: 1 norm6_avx2 takes the full tiles, 2 norm6_avx512's, 0 neither */
} FN(norm_ctx);

static void FN(norm_block)(void *ctx, void *scratch, int64_t blk)
{
    const FN(norm_ctx) *c = (const FN(norm_ctx) *)ctx;
    (void)scratch;
    const int64_t i0 = blk * NORM_ROW_BLOCK, i1 = dora_min(c->out, i0 + NORM_ROW_BLOCK);
#if defined(DORA_NORM_AVX2) && W == 16
    if (c->tile == 2) {
        FN(column_norm_rows_avx512)(c->n, c->W0, c->Ap, c->B, c->Bq, c->s, i0, i1, c->in, c->r);
        return;
    }
    if (c->tile == 1) {
        FN(column_norm_rows_avx2)(c->n, c->W0, c->Ap, c->B, c->Bq, c->s, i0, i1, c->in, c->r);
        return;
    }
#endif
    if (c->fused && c->r < NORM_FMA_SQUARES_MAX_R)
        FN(column_norm_rows_sq)(c->n, c->W0, c->Ap, c->B, c->Bq, c->s, i0, i1, c->in, c->r);
    else
        FN(column_norm_rows)(c->fused, c->n, c->W0, c->Ap, c->B, c->Bq, c->s, i0, i1, c->in, c->r);
}

/* The norm (Wm NULL), on a team (dora_team_for: OpenBLAS's threads when
   registered), or the merge, over row blocks on an OpenMP
   team whose threads each have a scratch of G rows of V. */
static int FN(norm_or_merge)(WTYPE *Wm, REAL *n, const WTYPE *W0, const REAL *A, const REAL *B,
                             const REAL *m, double s, int64_t out, int64_t in, int64_t r)
{
    const int fused = dora_fma_ok();
    REAL *Ap = FN(pack_panels)(A, r, in, in, 1);  /* A in panels */
    /* Six-row tiles (norm_full6, or the AVX2 / AVX-512 tiles), B in groups
       of NG rows (which needs r > 0); Bq NULL selects G-row tiles. The n
       they give has the bits of the G-row tiles.
       - float32 (and the 16-bit formats) in the fused mode at
         r >= NORM_SIX_MIN_R; with the AVX2 or AVX-512 tiles
         (dora_norm_tile) from NORM_AVX2_MIN_R.
       - float64 in the fused mode where the AVX-512 tile is allowed
         (dora_norm_tile() == 2), at every r: there the compiled six-row
         tile keeps six vector chains of FMAs in flight where the four-row
         tile has four (one zmm register a row). Intel Xeon (AVX-512,
         family 6 model 167), quiet, medians of interleaved calls, the same
         bits: 0.61-0.72x the four-row tile's time at r = 32 and 64 on one
         and two threads ((256, 256), (1024, 1024), (4096, 4096)), 0.70-0.83x
         at r = 16, 0.86-0.92x at r = 8, 0.97-1.00x at r = 1 and 4. On AVX2
         (two ymm registers a row: twelve accumulators in sixteen
         registers) float64 keeps G rows: its six-row tile was 1.09x slower
         at r = 16 on Zen 3. */
    const int cpu_tile = !Wm && fused && r > 0 ? dora_norm_tile() : 0;
    const int is_f32 = sizeof(REAL) == sizeof(float);
    const int tile = !is_f32 || r < NORM_AVX2_MIN_R ? 0
                     : cpu_tile == 2 && r <= NORM_AVX512_MAX_R ? 2
                     : cpu_tile >= 1 && r <= NORM_AVX2_MAX_R ? 1 : 0;
    const int six = tile || (!Wm && fused && r > 0
                             && (is_f32 ? r >= NORM_SIX_MIN_R : cpu_tile == 2));
    REAL *Bq = six ? FN(pack_groups)(B, out, r) : NULL;
    if (!Ap || (six && !Bq)) {
        free(Ap);
        free(Bq);
        return DORA_ERR_NOMEM;
    }
    const int64_t rows = Wm ? ROW_BLOCK : NORM_ROW_BLOCK;  /* rows in a block */
    const int64_t nblocks = (out + rows - 1) / rows;
    int failed = 0;
    dora_plan plan;
    dora_plan_begin(&plan, Wm ? K_MERGE : K_NORM, (double)out * in * (r + 1), nblocks);
    if (!Wm) {
        FN(norm_ctx) ctx = {n, W0, Ap, B, Bq, (REAL)s, out, in, r, fused, tile};
        failed = dora_team_for(&plan, nblocks, FN(norm_block), &ctx, 0);
    } else {
        #pragma omp parallel num_threads(plan.nt)
        {
            dora_plan_arrive(&plan);
            REAL *V = (REAL *)malloc((size_t)dora_max(1, G * in) * sizeof(REAL));
            if (!V) {
                #pragma omp atomic write
                failed = 1;
            }
            /* nowait: each member notes when it ran out of blocks (the region's
               end is the barrier) */
            #pragma omp for schedule(dynamic) nowait
            for (int64_t blk = 0; blk < nblocks; blk++) {
                const int64_t i0 = blk * rows, i1 = dora_min(out, i0 + rows);
                if (V) FN(merge_rows)(fused, Wm, V, n, W0, Ap, B, m, (REAL)s, i0, i1, in, r);
            }
            dora_plan_leave(&plan);
            free(V);
        }
    }
    dora_plan_end(&plan);
    free(Ap);
    free(Bq);
    return failed ? DORA_ERR_NOMEM : DORA_OK;
}

API int FN(dora_column_norm)(REAL *n, const WTYPE *W0, const REAL *A, const REAL *B,
                         double s, int64_t out, int64_t in, int64_t r)
{
    if (out < 0 || in < 0 || r < 0) return DORA_ERR_SIZE;
    if ((out && !n) || (out && in && !W0) || (r && in && !A) || (out && r && !B))
        return DORA_ERR_NULL;
    return FN(norm_or_merge)(NULL, n, W0, A, B, NULL, s, out, in, r);
}

API int FN(dora_merge)(WTYPE *Wm, REAL *n, const WTYPE *W0, const REAL *A, const REAL *B,
                   const REAL *m, double s, int64_t out, int64_t in, int64_t r)
{
    if (out < 0 || in < 0 || r < 0) return DORA_ERR_SIZE;
    if ((out && (!n || !m)) || (out && in && (!Wm || !W0)) || (r && in && !A)
        || (out && r && !B))
        return DORA_ERR_NULL;
    return FN(norm_or_merge)(Wm, n, W0, A, B, m, s, out, in, r);
}

/* ------------------------------------------------------------------------ */
/* unmerge: W0 = W' / factor - s * B @ A  (factor = m / n from the merge)   */
/* ------------------------------------------------------------------------ */

static inline __attribute__((always_inline)) void FN(unmerge_step)(
    const int fused, WTYPE *W0, const WTYPE *Wm, const REAL *f, const REAL *b, const REAL *a,
    REAL s, int64_t in, int64_t r, int g, int w)
{
    REAL P[G][W];
    FN(tile)(fused, P, b, r, g, a, W, r, w);  /* the merge's P, bit for bit */
    for (int q = 0; q < g; q++)
        for (int l = 0; l < w; l++)
            W0[q * in + l] = NARROW(WIDEN(Wm[q * in + l]) / f[q] - s * P[q][l]);
}

static inline __attribute__((always_inline)) void FN(unmerge_rows_body)(
    const int fused, WTYPE *W0, const WTYPE *Wm, const REAL *Ap, const REAL *B,
    const REAL *factor, REAL s, int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    for (int64_t i = i0; i < i1; i += G) {
        const int g = (int)dora_min(G, i1 - i);
        for (int64_t j = 0; j < in; j += W) {
            const int w = (int)dora_min(W, in - j);
            const int64_t o = i * in + j;
            const REAL *ap = Ap + (j / W) * r * W;
            if (g == G && w == W)
                FN(unmerge_step)(fused, W0 + o, Wm + o, factor + i, B + i * r, ap, s, in, r, G, W);
            else
                FN(unmerge_step)(fused, W0 + o, Wm + o, factor + i, B + i * r, ap, s, in, r, g, w);
        }
    }
}

static DORA_CLONES void FN(unmerge_rows)(
    int fused, WTYPE *W0, const WTYPE *Wm, const REAL *Ap, const REAL *B, const REAL *factor,
    REAL s, int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    if (fused)
        FN(unmerge_rows_body)(1, W0, Wm, Ap, B, factor, s, i0, i1, in, r);
    else
        FN(unmerge_rows_body)(0, W0, Wm, Ap, B, factor, s, i0, i1, in, r);
}

API int FN(dora_unmerge)(WTYPE *W0, const WTYPE *Wm, const REAL *A, const REAL *B,
                     const REAL *factor, double s, int64_t out, int64_t in, int64_t r)
{
    if (out < 0 || in < 0 || r < 0) return DORA_ERR_SIZE;
    if ((out && !factor) || (out && in && (!W0 || !Wm)) || (r && in && !A) || (out && r && !B))
        return DORA_ERR_NULL;
    REAL *Ap = FN(pack_panels)(A, r, in, in, 1);  /* A in panels */
    if (!Ap) return DORA_ERR_NOMEM;
    const int fused = dora_fma_ok();
    const int64_t nblocks = (out + ROW_BLOCK - 1) / ROW_BLOCK;
    dora_plan plan;
    dora_plan_begin(&plan, K_UNMERGE, (double)out * in * (r + 1), nblocks);
    #pragma omp parallel num_threads(plan.nt)
    {
        dora_plan_arrive(&plan);
        #pragma omp for schedule(dynamic) nowait
        for (int64_t blk = 0; blk < nblocks; blk++) {
            const int64_t i0 = blk * ROW_BLOCK;
            FN(unmerge_rows)(fused, W0, Wm, Ap, B, factor, (REAL)s, i0, dora_min(out, i0 + ROW_BLOCK), in, r);
        }
        dora_plan_leave(&plan);
    }
    dora_plan_end(&plan);
    free(Ap);
    return DORA_OK;
}

/* ------------------------------------------------------------------------ */
/* forward_epilogue: y = g * (base + s * U @ B.T) + bias  (paper Eq. 5)     */
/* B.T (r, out) is packed in panels, so that rows of U @ B.T are tiles     */
/* exactly like the rows of B @ A above.                                    */
/* y may be base itself (the eval forward writes y over the base product,  */
/* dora_ref.kernels.c.forward_epilogue(out=base)): each element of base is  */
/* read once, by the step that then writes the same element of y, and no   */
/* step reads an element another step writes. (No restrict on y and base   */
/* for that reason; any other overlap is refused by the wrapper.)           */
/* ------------------------------------------------------------------------ */

static inline __attribute__((always_inline)) void FN(forward_step)(
    WTYPE *y, REAL *z, const REAL *base, const REAL *u, const REAL *bt, const REAL *gm,
    const REAL *bias, REAL s, int64_t out, int64_t r, int g, int w, int has_bias, int has_z,
    REAL chk[W])
{
    REAL P[G][W];
    FN(tile)(0, P, u, r, g, bt, W, r, w);  /* P = U_t @ B.T on this tile */
    for (int q = 0; q < g; q++)
        #pragma omp simd
        for (int l = 0; l < w; l++) {
            const REAL zv = base[q * out + l] + s * P[q][l];
            const REAL v = gm[l] * zv;
            const REAL yv = has_bias ? v + bias[l] : v;
            if (has_z) z[q * out + l] = zv;  /* z may be base: its element was read above */
            y[q * out + l] = NARROW(yv);
            chk[l] += yv - yv;  /* +0 for a finite yv, NaN for Inf or NaN (the finiteness flag) */
        }
}

/* One row group's tile, the four (bias, z) cases as constants of forward_step. */
static inline __attribute__((always_inline)) void FN(forward_tile)(
    WTYPE *y, REAL *z, const REAL *base, const REAL *u, const REAL *bt, const REAL *gm,
    const REAL *bias, REAL s, int64_t out, int64_t r, int g, int w, REAL chk[W])
{
    if (g == G && w == W) {
        if (bias && z) FN(forward_step)(y, z, base, u, bt, gm, bias, s, out, r, G, W, 1, 1, chk);
        else if (bias) FN(forward_step)(y, z, base, u, bt, gm, bias, s, out, r, G, W, 1, 0, chk);
        else if (z) FN(forward_step)(y, z, base, u, bt, gm, bias, s, out, r, G, W, 0, 1, chk);
        else FN(forward_step)(y, z, base, u, bt, gm, bias, s, out, r, G, W, 0, 0, chk);
    } else if (z) {
        FN(forward_step)(y, z, base, u, bt, gm, bias, s, out, r, g, w, bias != NULL, 1, chk);
    } else {
        FN(forward_step)(y, z, base, u, bt, gm, bias, s, out, r, g, w, bias != NULL, 0, chk);
    }
}

/* Rows t0..t1, columns j0..j1 (j0 a multiple of W). Returns 1 if some y it
   wrote is Inf or NaN (before the narrowing of a 16-bit y), else 0: the
   eval forward's finiteness test, without a second pass over y. */
static DORA_CLONES int FN(forward_epilogue_rows)(
    WTYPE *y, REAL *z, const REAL *base, const REAL *U, const REAL *Bp, const REAL *gm,
    const REAL *bias, REAL s, int64_t t0, int64_t t1, int64_t j0, int64_t j1, int64_t out,
    int64_t r)
{
    REAL chk[W] = {0};
    /* Columns in blocks of COL_BLOCK, so that their panels of B.T stay in L1
       while the rows go by (all of B.T per row group would come from L2). */
    for (int64_t c0 = j0; c0 < j1; c0 += COL_BLOCK)
    for (int64_t t = t0; t < t1; t += G) {
        const int g = (int)dora_min(G, t1 - t);
        for (int64_t i = c0; i < dora_min(j1, c0 + COL_BLOCK); i += W) {
            const int w = (int)dora_min(W, out - i);
            const int64_t o = t * out + i;
            const REAL *bp = Bp + (i / W) * r * W;  /* B.T[:, i:i+W] */
            const REAL *ub = U + t * r, *bi = bias ? bias + i : NULL;
            FN(forward_tile)(y + o, z ? z + o : NULL, base + o, ub, bp, gm + i, bi, s, out, r,
                             g, w, chk);
        }
    }
    REAL sum = 0;
    for (int l = 0; l < W; l++) sum += chk[l];
    return !(sum == 0);  /* NaN unless every lane is +0 */
}

/* forward_epilogue's blocks on a team (dora_team_for), as column_norm's:
   it follows the BLAS product x @ W0.T, whose OpenBLAS workers are still
   spinning when it starts; on an OpenMP team of its own its second thread
   waited for a core (and its spinning threads then slowed the next BLAS
   call). By rows (B.T packed before the team): block blk is rows
   blk * ROW_BLOCK onwards, every column. By columns: block blk is columns
   blk * FWD_COL_BLOCK onwards, every row, and it packs its own panels of
   B.T first (into its part of the shared buffer: no block reads another's). */
typedef struct {
    WTYPE *y;
    REAL *z;
    const REAL *base, *U, *B, *gm, *bias;
    REAL *Bp;
    REAL s;
    int64_t N, out, r;
    int by_columns;
    int nonfinite;  /* set (atomically) by a block that wrote an Inf or NaN */
} FN(forward_ctx);

static void FN(forward_block)(void *ctx, void *scratch, int64_t blk)
{
    FN(forward_ctx) *c = (FN(forward_ctx) *)ctx;
    int bad;
    (void)scratch;
    if (c->by_columns) {
        const int64_t j0 = blk * FWD_COL_BLOCK, j1 = dora_min(c->out, j0 + FWD_COL_BLOCK);
        FN(pack_panels_range)(c->Bp, c->B, c->r, c->out, 1, c->r, j0 / W, (j1 + W - 1) / W);
        bad = FN(forward_epilogue_rows)(c->y, c->z, c->base, c->U, c->Bp, c->gm, c->bias, c->s,
                                        0, c->N, j0, j1, c->out, c->r);
    } else {
        const int64_t t0 = blk * ROW_BLOCK;
        bad = FN(forward_epilogue_rows)(c->y, c->z, c->base, c->U, c->Bp, c->gm, c->bias, c->s,
                                        t0, dora_min(c->N, t0 + ROW_BLOCK), 0, c->out, c->out,
                                        c->r);
    }
    if (bad) __atomic_store_n(&c->nonfinite, 1, __ATOMIC_RELAXED);
}

/* The forward epilogue; z NULL, or where z = base + s * U @ B.T goes (it may
   be base itself: the training forward keeps z for the backward in the
   memory of the base product, so that the backward need not form U @ B.T
   again). By rows or by columns (dora_forward_by_columns): every element
   is the same sum and the same epilogue either way, the same bits. */
static int FN(forward_epilogue_impl)(WTYPE *y, REAL *z, const REAL *base, const REAL *U,
                                     const REAL *B, const REAL *gm, const REAL *bias,
                                     double s, int64_t N, int64_t out, int64_t r, int *nonfinite)
{
    if (N < 0 || out < 0 || r < 0) return DORA_ERR_SIZE;
    if ((N && out && (!y || !base)) || (N && r && !U) || (out && r && !B) || (out && !gm))
        return DORA_ERR_NULL;
    const int by_columns = dora_forward_by_columns(N, out);
    REAL *Bp = by_columns ? FN(pack_alloc)(r, out) : FN(pack_panels)(B, r, out, 1, r);
    if (!Bp) return DORA_ERR_NOMEM;
    const int64_t nblocks = by_columns ? (out + FWD_COL_BLOCK - 1) / FWD_COL_BLOCK
                                       : (N + ROW_BLOCK - 1) / ROW_BLOCK;
    FN(forward_ctx) ctx = {y, (N && out) ? z : NULL, base, U, B, gm, bias, Bp, (REAL)s, N, out, r,
                           by_columns, 0};
    dora_plan plan;
    dora_plan_begin(&plan, z ? K_FORWARD_Z : K_FORWARD, (double)N * out * (r + 1), nblocks);
    dora_team_for(&plan, nblocks, FN(forward_block), &ctx, 0);  /* no scratch: cannot fail */
    dora_plan_end(&plan);
    free(Bp);
    if (nonfinite) *nonfinite = ctx.nonfinite;
    return DORA_OK;
}

API int FN(dora_forward_epilogue)(WTYPE *y, const REAL *base, const REAL *U, const REAL *B,
                              const REAL *gm, const REAL *bias,
                              double s, int64_t N, int64_t out, int64_t r)
{
    return FN(forward_epilogue_impl)(y, NULL, base, U, B, gm, bias, s, N, out, r, NULL);
}

#if !LP
int FN(dora_forward_epilogue_z)(REAL *y, REAL *z, const REAL *base, const REAL *U,
                                const REAL *B, const REAL *gm, const REAL *bias,
                                double s, int64_t N, int64_t out, int64_t r)
{
    if (N > 0 && out > 0 && !z) return DORA_ERR_NULL;
    return FN(forward_epilogue_impl)(y, z, base, U, B, gm, bias, s, N, out, r, NULL);
}

/* The two above with the finiteness flag: *nonfinite = 1 if some element of
   y is Inf or NaN, else 0 (z NULL: y alone). */
int FN(dora_forward_epilogue_nf)(REAL *y, REAL *z, const REAL *base, const REAL *U,
                                 const REAL *B, const REAL *gm, const REAL *bias,
                                 double s, int64_t N, int64_t out, int64_t r, int *nonfinite)
{
    if (!nonfinite) return DORA_ERR_NULL;
    *nonfinite = 0;
    return FN(forward_epilogue_impl)(y, z, base, U, B, gm, bias, s, N, out, r, nonfinite);
}

/* The forward epilogue from the product P = U @ B.T formed by the caller  */
/* (BLAS, dora_ref.kernels.c._lowrank_on_blas): y = g * (base + s * P) +    */
/* bias, z = base + s * P stored if z is not NULL, *nonfinite as above.    */
/* Each element is the forward_step's operations on that element, in the   */
/* same order and roundings (s * P, + base, * g, + bias; no contraction),   */
/* only P's sum is BLAS's. y or z may be base, and y may be P, element for  */
/* element (each element of base and P is read before the same element of   */
/* y and z is written: the wrapper writes y over its own fresh P, as the    */
/* NumPy twin does); z may not overlap P. One thread: one pass over (N,     */
/* out) arrays, a small part of the product it follows.                     */
static DORA_CLONES int FN(forward_from_product_rows)(
    REAL *y, REAL *z, const REAL *base, const REAL *P, const REAL *gm, const REAL *bias,
    REAL s, int64_t N, int64_t out)
{
    REAL chk = 0;
    for (int64_t t = 0; t < N; t++) {
        REAL *yr = y + t * out, *zr = z ? z + t * out : NULL;
        const REAL *br = base + t * out, *pr = P + t * out;
        if (zr) {
            #pragma omp simd reduction(+:chk)
            for (int64_t l = 0; l < out; l++) {
                const REAL zv = br[l] + s * pr[l];
                const REAL v = gm[l] * zv;
                const REAL yv = bias ? v + bias[l] : v;
                zr[l] = zv;
                yr[l] = yv;
                chk += yv - yv;
            }
        } else {
            #pragma omp simd reduction(+:chk)
            for (int64_t l = 0; l < out; l++) {
                const REAL zv = br[l] + s * pr[l];
                const REAL v = gm[l] * zv;
                const REAL yv = bias ? v + bias[l] : v;
                yr[l] = yv;
                chk += yv - yv;
            }
        }
    }
    return !(chk == 0);  /* NaN unless every yv was finite */
}

int FN(dora_forward_epilogue_from_product_nf)(REAL *y, REAL *z, const REAL *base, const REAL *P,
                                              const REAL *gm, const REAL *bias, double s,
                                              int64_t N, int64_t out, int *nonfinite)
{
    if (!nonfinite) return DORA_ERR_NULL;
    *nonfinite = 0;
    if (N < 0 || out < 0) return DORA_ERR_SIZE;
    if (N && out && (!y || !base || !P || !gm)) return DORA_ERR_NULL;
    if (N && out) *nonfinite = FN(forward_from_product_rows)(y, z, base, P, gm, bias, (REAL)s, N, out);
    return DORA_OK;
}
#endif

#if !LP  /* backward_epilogue: float32 and float64 only */

/* ------------------------------------------------------------------------ */
/* backward_epilogue: z = base + s * U @ B.T (formed again here, not         */
/* stored), or z as the training forward kept it (has_z: then base holds z  */
/* and U, B are not read),                                                  */
/*   dg = sum_N dy * z,   dz = dy * g.                                      */
/* dg is a sum over the N rows, so here the threads split the *columns*     */
/* (output channels): each owns a block of dg and the same columns of dz,   */
/* and adds its columns' N terms in row order, in double.                   */
/* ------------------------------------------------------------------------ */

static inline __attribute__((always_inline)) void FN(backward_step)(
    double *acc, REAL *dz, const REAL *dy, const REAL *base, const REAL *u,
    const REAL *bt, const REAL *gm, REAL s, int64_t out, int64_t r, int g, int w, int has_z)
{
    REAL P[G][W];
    if (!has_z) FN(tile)(0, P, u, r, g, bt, W, r, w);  /* P = U_t @ B.T on this tile */
    for (int q = 0; q < g; q++) {
        #pragma omp simd
        for (int l = 0; l < w; l++) {
            const int64_t o = q * out + l;
            const REAL z = has_z ? base[o] : base[o] + s * P[q][l];
            acc[l] += (double)(dy[o] * z);
            dz[o] = dy[o] * gm[l];
        }
    }
}

/* backward_step on one tile, has_z and the full tile as constants. */
static inline __attribute__((always_inline)) void FN(backward_tile)(
    double *acc, REAL *dz, const REAL *dy, const REAL *base, const REAL *u,
    const REAL *bt, const REAL *gm, REAL s, int64_t out, int64_t r, int g, int w, int has_z)
{
    if (has_z && g == G && w == W)
        FN(backward_step)(acc, dz, dy, base, u, bt, gm, s, out, r, G, W, 1);
    else if (has_z)
        FN(backward_step)(acc, dz, dy, base, u, bt, gm, s, out, r, g, w, 1);
    else if (g == G && w == W)
        FN(backward_step)(acc, dz, dy, base, u, bt, gm, s, out, r, G, W, 0);
    else
        FN(backward_step)(acc, dz, dy, base, u, bt, gm, s, out, r, g, w, 0);
}

static DORA_CLONES void FN(backward_epilogue_cols)(
    REAL *dg, REAL *dz, const REAL *dy, const REAL *base, const REAL *U,
    const REAL *Bp, const REAL *gm, REAL s,
    int64_t c0, int64_t c1, int64_t N, int64_t out, int64_t r, int has_z)
{
    double acc[COL_BLOCK];
    for (int64_t i = c0; i < c1; i++) acc[i - c0] = 0;
    for (int64_t t = 0; t < N; t += G) {
        const int g = (int)dora_min(G, N - t);
        for (int64_t i = c0; i < c1; i += W) {
            const int w = (int)dora_min(W, c1 - i);
            const int64_t o = t * out + i;
            /* c0 is a multiple of W; with has_z there are no panels, no U */
            const REAL *bp = has_z ? NULL : Bp + (i / W) * r * W;
            const REAL *ub = has_z ? NULL : U + t * r;
            FN(backward_tile)(acc + (i - c0), dz + o, dy + o, base + o, ub, bp, gm + i, s,
                              out, r, g, w, has_z);
        }
    }
    for (int64_t i = c0; i < c1; i++) dg[i] = (REAL)acc[i - c0];
}

/* backward_epilogue's blocks on a team: block blk is columns blk * COL_BLOCK onwards. */
typedef struct {
    REAL *dg, *dz;
    const REAL *dy, *base, *U, *Bp, *gm;
    REAL s;
    int64_t N, out, r;
    int has_z;
} FN(backward_ctx);

static void FN(backward_block)(void *ctx, void *scratch, int64_t blk)
{
    const FN(backward_ctx) *c = (const FN(backward_ctx) *)ctx;
    (void)scratch;
    const int64_t c0 = blk * COL_BLOCK;
    FN(backward_epilogue_cols)(c->dg, c->dz, c->dy, c->base, c->U, c->Bp, c->gm, c->s, c0,
                               dora_min(c->out, c0 + COL_BLOCK), c->N, c->out, c->r, c->has_z);
}

static int FN(backward_epilogue_impl)(REAL *dg, REAL *dz, const REAL *dy, const REAL *base,
                                      const REAL *U, const REAL *B, const REAL *gm,
                                      double s, int64_t N, int64_t out, int64_t r, int has_z)
{
    if (N < 0 || out < 0 || r < 0) return DORA_ERR_SIZE;
    if ((out && (!dg || !gm)) || (N && out && (!dz || !dy || !base)) || (!has_z && N && r && !U)
        || (!has_z && out && r && !B))
        return DORA_ERR_NULL;
    REAL *Bp = NULL;
    if (!has_z) {
        Bp = FN(pack_panels)(B, r, out, 1, r);  /* B.T in panels */
        if (!Bp) return DORA_ERR_NOMEM;
    }
    const int64_t nblocks = (out + COL_BLOCK - 1) / COL_BLOCK;
    FN(backward_ctx) ctx = {dg, dz, dy, base, U, Bp, gm, (REAL)s, N, out, r, has_z};
    dora_plan plan;
    /* work: per element, one plus one multiply-add of U @ B.T per rank; with z, no product */
    dora_plan_begin(&plan, has_z ? K_BACKWARD_Z : K_BACKWARD,
                    (double)N * out * (has_z ? 1.0 : (double)(r + 1)), nblocks);
    dora_team_for(&plan, nblocks, FN(backward_block), &ctx, 0);  /* no scratch: cannot fail */
    dora_plan_end(&plan);
    free(Bp);
    return DORA_OK;
}

int FN(dora_backward_epilogue)(REAL *dg, REAL *dz, const REAL *dy, const REAL *base,
                               const REAL *U, const REAL *B, const REAL *gm,
                               double s, int64_t N, int64_t out, int64_t r)
{
    return FN(backward_epilogue_impl)(dg, dz, dy, base, U, B, gm, s, N, out, r, 0);
}

int FN(dora_backward_epilogue_z)(REAL *dg, REAL *dz, const REAL *dy, const REAL *z,
                                 const REAL *gm, int64_t N, int64_t out)
{
    return FN(backward_epilogue_impl)(dg, dz, dy, z, NULL, NULL, gm, 1.0, N, out, 0, 1);
}

#endif  /* !LP */

/* Sums each of the n runs of W lanes of v (v[e * W .. e * W + W - 1]) into
   its first lane, by a fixed pairwise tree (halves added W / 2, W / 4, ...
   apart), which vectorizes across the lanes; v is overwritten. */
static inline void FN(sum_lanes)(REAL *restrict v, int64_t n)
{
    for (int h = W / 2; h >= 1; h /= 2)
        for (int64_t e = 0; e < n; e++)
            for (int l = 0; l < h; l++) v[e * W + l] += v[e * W + l + h];
}

/* ------------------------------------------------------------------------ */
/* Two products in one pass over a matrix M (the generic row kernel):       */
/*   M @ P.T   a sum over M's columns, one value per row of M and k < r     */
/*   Q.T @ M   a sum over M's rows, one row per k < r                       */
/* backward_lowrank runs it on M = dz (P = B.T, Q = U: dU and dB), and      */
/* norm_gradient_products on M = W0 (P = A, Q = C: WAt and CtW). P comes    */
/* packed in panels of W columns (pack_panels).                             */
/* ------------------------------------------------------------------------ */

/* One tile, for one k: w columns of g rows of M (rows ldm apart).
     lanes[q][l] += M[q, l] * P[k, l]            (M @ P.T, row q, lane by lane)
     row[l]      += sum_q Q[q, k] * M[q, l]      (Q.T @ M, row k, rows in order) */
static inline __attribute__((always_inline)) void FN(twoprod_tile)(
    REAL lanes[G][W], REAL *restrict row, const WTYPE *restrict m, const REAL *restrict p,
    const REAL qk[G], int64_t ldm, int g, int w)
{
    for (int l = 0; l < w; l++) {
        REAL t = row[l];
        for (int q = 0; q < g; q++) {
            const REAL x = WIDEN(m[q * ldm + l]);
            lanes[q][l] += x * p[l];
            t += qk[q] * x;
        }
        row[l] = t;
    }
}

/* twoprod_tile for two k at once (k and k + 1): each row of M loaded is
   used four times. The same sums, in the same order. */
static inline __attribute__((always_inline)) void FN(twoprod_tile2)(
    REAL lanes[G][W], REAL lanes1[G][W], REAL *restrict row, REAL *restrict row1,
    const WTYPE *restrict m, const REAL *restrict p, const REAL *restrict p1,
    const REAL qk[G], const REAL qk1[G], int64_t ldm, int g, int w)
{
    for (int l = 0; l < w; l++) {
        REAL t = row[l], t1 = row1[l];
        for (int q = 0; q < g; q++) {
            const REAL x = WIDEN(m[q * ldm + l]);
            lanes[q][l] += x * p[l];
            lanes1[q][l] += x * p1[l];
            t += qk[q] * x;
            t1 += qk1[q] * x;
        }
        row[l] = t;
        row1[l] = t1;
    }
}

/* g rows of M over width columns, k by k, so that the rows' lanes stay in
   registers while the columns go by and the rows of M come from L1.
     mp (g, r)      gets this stretch's M @ P.T: stored (accumulate = 0) or
                    added to what it holds (accumulate = 1);
     qm (r, ldq)    accumulates Q.T @ M over these rows.
   q holds the g rows of Q (r apart), Pp the panels of P for these columns. */
static inline __attribute__((always_inline)) void FN(twoprod_rows)(
    REAL *restrict mp, REAL *restrict qm, int64_t ldq, const WTYPE *restrict m, int64_t ldm,
    const REAL *restrict Pp, const REAL *restrict q, int64_t width, int64_t r, int g,
    int accumulate)
{
    int64_t k = 0;
    for (; k + 1 < r; k += 2) {  /* two k at a time */
        REAL lanes[G][W] = {{0}}, lanes1[G][W] = {{0}}, qk[G] = {0}, qk1[G] = {0};
        for (int e = 0; e < g; e++) {
            qk[e] = q[e * r + k];
            qk1[e] = q[e * r + k + 1];
        }
        REAL *row = qm + k * ldq, *row1 = row + ldq;
        int64_t j = 0;
        for (; j + W <= width; j += W) {
            const REAL *p = Pp + (j / W) * r * W + k * W;
            FN(twoprod_tile2)(lanes, lanes1, row + j, row1 + j, m + j, p, p + W, qk, qk1,
                              ldm, g, W);
        }
        if (j < width) {
            const REAL *p = Pp + (j / W) * r * W + k * W;
            FN(twoprod_tile2)(lanes, lanes1, row + j, row1 + j, m + j, p, p + W, qk, qk1,
                              ldm, g, (int)(width - j));
        }
        FN(sum_lanes)(&lanes[0][0], g);
        FN(sum_lanes)(&lanes1[0][0], g);
        for (int e = 0; e < g; e++) {
            mp[e * r + k] = accumulate ? mp[e * r + k] + lanes[e][0] : lanes[e][0];
            mp[e * r + k + 1] = accumulate ? mp[e * r + k + 1] + lanes1[e][0] : lanes1[e][0];
        }
    }
    for (; k < r; k++) {  /* the last k of an odd r */
        REAL lanes[G][W] = {{0}}, qk[G] = {0};
        for (int e = 0; e < g; e++) qk[e] = q[e * r + k];
        REAL *row = qm + k * ldq;
        int64_t j = 0;
        for (; j + W <= width; j += W)
            FN(twoprod_tile)(lanes, row + j, m + j, Pp + (j / W) * r * W + k * W, qk, ldm, g, W);
        if (j < width)
            FN(twoprod_tile)(lanes, row + j, m + j, Pp + (j / W) * r * W + k * W, qk, ldm, g,
                             (int)(width - j));
        FN(sum_lanes)(&lanes[0][0], g);
        for (int e = 0; e < g; e++)
            mp[e * r + k] = accumulate ? mp[e * r + k] + lanes[e][0] : lanes[e][0];
    }
}

#if !LP  /* backward_lowrank: float32 and float64 only */

/* ------------------------------------------------------------------------ */
/* backward_lowrank: backward_epilogue, and in the same pass over dz        */
/*   dB = s * dz.T @ U   (out, r): a sum over N, across the row blocks      */
/*   dU = s * dz @ B     (N, r):   a sum over out, across the column blocks */
/* The work is cut into column blocks (lowrank_col_block) and, where out is */
/* one column block, row blocks (lowrank_row_block); a task is one (row     */
/* block, column block). Each column block adds its columns' terms of dU    */
/* into its own (N, r) partial (rows are disjoint across row blocks); the   */
/* partials are then added in column-block order. With one column block the */
/* tasks write s * dU themselves (what the sum of one partial gave, bit for */
/* bit). With one row block a task writes dg and dB; with several it writes */
/* its rows' partial sums of dg (doubles) and dB, added afterwards in       */
/* row-block order. The block sizes depend on N, out and r only, so the     */
/* bits do not depend on the number of threads.                             */
/* ------------------------------------------------------------------------ */

/* One task: rows [t0, t1) of column block [c0, c1): dz (backward_step,
   exactly as in backward_epilogue), this block's partial
   dUp[t0:t1] = dz[t0:t1, c0:c1] @ B[c0:c1] (times s where `scale_dU`: the
   block is all of out and dUp is dU), and the sums over these rows of dg and
   dB for these columns: written as dg and dB where `whole` (the rows are all
   of N), else as partials: dgp[i] (double) and dBp[i * r + k] (unscaled),
   i from c0. Scratch: acc (c1 - c0 doubles), dBt (r x (c1 - c0 + W)). */
static DORA_CLONES void FN(backward_lowrank_cols)(
    REAL *dg, REAL *dz, REAL *dUp, REAL *dB, double *dgp, REAL *dBp, double *acc, REAL *dBt,
    const REAL *dy, const REAL *base, const REAL *U, const REAL *Bp, const REAL *gm,
    REAL s, int64_t c0, int64_t c1, int64_t t0, int64_t t1, int64_t out, int64_t r,
    int has_z, int whole, int scale_dU)
{
    const int64_t width = c1 - c0, ldt = width + W;  /* rows not a power of two apart */
    const REAL *bp0 = Bp + (c0 / W) * r * W;  /* c0 is a multiple of W */
    for (int64_t i = 0; i < width; i++) acc[i] = 0;
    for (int64_t i = 0; i < r * ldt; i++) dBt[i] = 0;
    for (int64_t t = t0; t < t1; t += G) {
        const int g = (int)dora_min(G, t1 - t);
        for (int64_t i = c0; i < c1; i += W) {
            const int w = (int)dora_min(W, c1 - i);
            const int64_t o = t * out + i;
            const REAL *bp = Bp + (i / W) * r * W;
            FN(backward_tile)(acc + (i - c0), dz + o, dy + o, base + o, U + t * r, bp, gm + i,
                              s, out, r, g, w, has_z);
        }
        /* dUp[t:t+g] = dz[t:t+g, c0:c1] @ B[c0:c1], dBt += U[t:t+g].T @ dz[t:t+g, c0:c1] */
        if (g == G)
            FN(twoprod_rows)(dUp + t * r, dBt, ldt, dz + t * out + c0, out, bp0, U + t * r,
                             width, r, G, 0);
        else
            FN(twoprod_rows)(dUp + t * r, dBt, ldt, dz + t * out + c0, out, bp0, U + t * r,
                             width, r, g, 0);
        if (scale_dU)  /* s * (REAL)(0.0 + x) of the sum pass is s * x: never -0 (sums from +0) */
            for (int64_t e = t * r; e < (t + g) * r; e++) dUp[e] = s * dUp[e];
    }
    if (whole)
        for (int64_t i = c0; i < c1; i++) {
            dg[i] = (REAL)acc[i - c0];
            for (int64_t k = 0; k < r; k++) dB[i * r + k] = s * dBt[k * ldt + (i - c0)];
        }
    else
        for (int64_t i = c0; i < c1; i++) {
            dgp[i] = acc[i - c0];
            for (int64_t k = 0; k < r; k++) dBp[i * r + k] = dBt[k * ldt + (i - c0)];
        }
}

/* backward_lowrank's tasks on a team: task blk is row block blk / ncols and
   column block blk % ncols, `width` columns by `rows` rows (scratch: acc and
   dBt); then the sum of the dU partials in blocks of SUM_BLOCK elements of dU
   (several column blocks), and that of the dg and dB partials (several row
   blocks). */
typedef struct {
    REAL *dg, *dz, *dUp, *dB, *dU, *dBp;
    double *dgp;
    const REAL *dy, *base, *U, *Bp, *gm;
    REAL s;
    int64_t N, out, r, width, nblocks, rows, nrows;
    int has_z;
} FN(lowrank_ctx);

static void FN(lowrank_block)(void *ctx, void *scratch, int64_t blk)
{
    const FN(lowrank_ctx) *c = (const FN(lowrank_ctx) *)ctx;
    double *acc = (double *)scratch;
    REAL *dBt = (REAL *)(acc + c->width);
    const int64_t cb = blk % c->nblocks, rb = blk / c->nblocks;
    const int64_t c0 = cb * c->width, t0 = rb * c->rows;
    REAL *dUp = c->nblocks > 1 ? c->dUp + cb * c->N * c->r : c->dU;
    double *dgp = c->nrows > 1 ? c->dgp + rb * c->out : NULL;
    REAL *dBp = c->nrows > 1 ? c->dBp + rb * c->out * c->r : NULL;
    FN(backward_lowrank_cols)(c->dg, c->dz, dUp, c->dB, dgp, dBp, acc, dBt, c->dy, c->base, c->U,
                              c->Bp, c->gm, c->s, c0, dora_min(c->out, c0 + c->width), t0,
                              dora_min(c->N, t0 + c->rows), c->out, c->r, c->has_z,
                              c->nrows == 1, c->nblocks == 1);
}

static void FN(lowrank_sum_block)(void *ctx, void *scratch, int64_t blk)
{
    const FN(lowrank_ctx) *c = (const FN(lowrank_ctx) *)ctx;
    (void)scratch;
    const int64_t size = c->N * c->r, e1 = dora_min(size, (blk + 1) * SUM_BLOCK);
    for (int64_t e = blk * SUM_BLOCK; e < e1; e++) {
        double sum = 0;
        for (int64_t b = 0; b < c->nblocks; b++) sum += c->dUp[b * size + e];
        c->dU[e] = c->s * (REAL)sum;
    }
}

/* dg and dB from the row blocks' partials, added in row-block order (in
   double; then dB is s times the sum rounded, as with one row block). On the
   calling thread: out * (r + 1) * nrows additions, at most 512 x 13 x 4
   (lowrank_row_block splits rows only where out is one column block). */
static void FN(lowrank_rows_sum)(const FN(lowrank_ctx) *c)
{
    const int64_t out = c->out, r = c->r;
    for (int64_t i = 0; i < out; i++) {
        double sum = 0;
        for (int64_t b = 0; b < c->nrows; b++) sum += c->dgp[b * out + i];
        c->dg[i] = (REAL)sum;
    }
    for (int64_t e = 0; e < out * r; e++) {
        double sum = 0;
        for (int64_t b = 0; b < c->nrows; b++) sum += c->dBp[b * out * r + e];
        c->dB[e] = c->s * (REAL)sum;
    }
}

/* has_z: base holds z (the training forward kept it), no U @ B.T to form. */
static int FN(backward_lowrank_impl)(REAL *dg, REAL *dz, REAL *dU, REAL *dB, const REAL *dy,
                                     const REAL *base, const REAL *U, const REAL *B,
                                     const REAL *gm, double s, int64_t N, int64_t out, int64_t r,
                                     int has_z)
{
    if (N < 0 || out < 0 || r < 0) return DORA_ERR_SIZE;
    if ((out && (!dg || !gm)) || (N && out && (!dz || !dy || !base)) || (N && r && (!U || !dU))
        || (out && r && (!B || !dB)))
        return DORA_ERR_NULL;
    const int64_t width = lowrank_col_block(out, r);
    const int64_t nblocks = (out + width - 1) / width;
    const int64_t rows = lowrank_row_block(N, out, r);
    const int64_t nrows = dora_max(1, (N + rows - 1) / rows);
    REAL *Bp = FN(pack_panels)(B, r, out, 1, r);  /* B.T in panels */
    /* dU's partials: several column blocks only (one block writes dU) */
    REAL *dUp = nblocks > 1 ? (REAL *)malloc((size_t)dora_max(1, nblocks * N * r) * sizeof(REAL))
                            : NULL;
    /* dg's and dB's partials: several row blocks only */
    double *dgp = nrows > 1 ? (double *)malloc((size_t)dora_max(1, nrows * out) * sizeof(double))
                            : NULL;
    REAL *dBp = nrows > 1 ? (REAL *)malloc((size_t)dora_max(1, nrows * out * r) * sizeof(REAL))
                          : NULL;
    if (!Bp || (nblocks > 1 && !dUp) || (nrows > 1 && (!dgp || !dBp))) {
        free(Bp);
        free(dUp);
        free(dgp);
        free(dBp);
        return DORA_ERR_NOMEM;
    }
    FN(lowrank_ctx) ctx = {dg, dz, dUp, dB, dU, dBp, dgp, dy, base, U, Bp, gm, (REAL)s, N, out, r,
                           width, nblocks, rows, nrows, has_z};
    dora_plan plan;
    dora_plan_begin(&plan, has_z ? K_LOWRANK_Z : K_LOWRANK,
                    (double)N * out * ((has_z ? 2 : 3) * r + 1), nblocks * nrows);
    /* scratch: acc (width doubles), then dBt (r x (width + W) REALs) */
    const size_t scratch = (size_t)width * sizeof(double)
                           + (size_t)dora_max(1, r * (width + W)) * sizeof(REAL);
    const int failed = dora_team_for(&plan, nblocks * nrows, FN(lowrank_block), &ctx, scratch);
    dora_plan_end(&plan);
    if (!failed && nblocks > 1) {  /* dU = s * (sum of the blocks' partials, in block order) */
        const int64_t nsums = (N * r + SUM_BLOCK - 1) / SUM_BLOCK;
        dora_plan sum_plan;
        dora_plan_begin(&sum_plan, K_LOWRANK_SUM, (double)N * r * nblocks, nsums);
        dora_team_for(&sum_plan, nsums, FN(lowrank_sum_block), &ctx, 0);
        dora_plan_end(&sum_plan);
    }
    if (!failed && nrows > 1) FN(lowrank_rows_sum)(&ctx);
    if (nblocks == 0)  /* out = 0: dU = dz @ B is a sum of no terms */
        for (int64_t e = 0; e < N * r; e++) dU[e] = 0;
    free(Bp);
    free(dUp);
    free(dgp);
    free(dBp);
    return failed ? DORA_ERR_NOMEM : DORA_OK;
}

int FN(dora_backward_lowrank)(REAL *dg, REAL *dz, REAL *dU, REAL *dB, const REAL *dy,
                              const REAL *base, const REAL *U, const REAL *B, const REAL *gm,
                              double s, int64_t N, int64_t out, int64_t r)
{
    return FN(backward_lowrank_impl)(dg, dz, dU, dB, dy, base, U, B, gm, s, N, out, r, 0);
}

int FN(dora_backward_lowrank_z)(REAL *dg, REAL *dz, REAL *dU, REAL *dB, const REAL *dy,
                                const REAL *z, const REAL *U, const REAL *B, const REAL *gm,
                                double s, int64_t N, int64_t out, int64_t r)
{
    return FN(backward_lowrank_impl)(dg, dz, dU, dB, dy, z, U, B, gm, s, N, out, r, 1);
}

#endif  /* !LP */

/* ------------------------------------------------------------------------ */
/* norm_gradient_products: in one pass over W0,                             */
/*   WAt = W0 @ A.T   (out, r): a sum over in, owned by the row             */
/*   CtW = C.T @ W0   (r, in):  a sum over out, across row slices           */
/* The exact norm gradient needs both (functional.norm_gradient, with       */
/* C = c * B); two BLAS calls would read W0 twice. W0 is cut into           */
/* products_slices(out, r) slices of rows, set by the sizes alone; each     */
/* adds its rows into its own (r, in) partial of CtW (slice 0 into CtW      */
/* itself), and the partials are added in slice order.                      */
/* ------------------------------------------------------------------------ */

/* Rows [i0, i1): WAt for these rows, and ct (r, in) = C[i0:i1].T @ W0[i0:i1].
   Columns in chunks of PRODUCT_CHUNK, so that a group's rows of W0 stay in
   L1 while k runs and the chunk of ct stays in cache while the rows go by;
   the chunk is summed in cc, rows CHUNK_LD apart rather than in apart (rows
   a power of two bytes apart share one L1 cache set), and copied to ct when
   it is done. Scratch: cc (r x CHUNK_LD). */
static DORA_CLONES void FN(products_slice)(
    REAL *WAt, REAL *ct, REAL *cc, const WTYPE *W0, const REAL *Ap, const REAL *C,
    int64_t i0, int64_t i1, int64_t in, int64_t r)
{
    for (int64_t i = i0 * r; i < i1 * r; i++) WAt[i] = 0;
    for (int64_t j0 = 0; j0 < in; j0 += PRODUCT_CHUNK) {
        const int64_t width = dora_min(in - j0, PRODUCT_CHUNK);
        const REAL *ap = Ap + (j0 / W) * r * W;  /* j0 is a multiple of W */
        for (int64_t e = 0; e < r * CHUNK_LD; e++) cc[e] = 0;
        for (int64_t i = i0; i < i1; i += G) {
            const int g = (int)dora_min(G, i1 - i);
            /* WAt[i:i+g] += W0[i:i+g, chunk] @ A[:, chunk].T, cc += C[i:i+g].T @ W0[i:i+g, chunk] */
            if (g == G)
                FN(twoprod_rows)(WAt + i * r, cc, CHUNK_LD, W0 + i * in + j0, in, ap, C + i * r,
                                 width, r, G, 1);
            else
                FN(twoprod_rows)(WAt + i * r, cc, CHUNK_LD, W0 + i * in + j0, in, ap, C + i * r,
                                 width, r, g, 1);
        }
        for (int64_t k = 0; k < r; k++)
            for (int64_t j = 0; j < width; j++) ct[k * in + j0 + j] = cc[k * CHUNK_LD + j];
    }
}

/* norm_gradient_products' blocks on a team: the row slices (scratch: cc),
   then the sum of the partials in blocks of SUM_BLOCK elements of CtW. */
typedef struct {
    REAL *WAt, *CtW, *part;
    const WTYPE *W0;
    const REAL *Ap, *C;
    int64_t out, in, r, nslices;
} FN(products_ctx);

static void FN(products_block)(void *ctx, void *scratch, int64_t sl)
{
    const FN(products_ctx) *c = (const FN(products_ctx) *)ctx;
    REAL *ct = sl == 0 ? c->CtW : c->part + (sl - 1) * c->r * c->in;
    FN(products_slice)(c->WAt, ct, (REAL *)scratch, c->W0, c->Ap, c->C, sl * c->out / c->nslices,
                       (sl + 1) * c->out / c->nslices, c->in, c->r);
}

static void FN(products_sum_block)(void *ctx, void *scratch, int64_t blk)
{
    const FN(products_ctx) *c = (const FN(products_ctx) *)ctx;
    (void)scratch;
    const int64_t size = c->r * c->in, e1 = dora_min(size, (blk + 1) * SUM_BLOCK);
    for (int64_t e = blk * SUM_BLOCK; e < e1; e++)
        for (int64_t sl = 1; sl < c->nslices; sl++) c->CtW[e] += c->part[(sl - 1) * size + e];
}

API int FN(dora_norm_gradient_products)(REAL *WAt, REAL *CtW, const WTYPE *W0, const REAL *A,
                                    const REAL *C, int64_t out, int64_t in, int64_t r)
{
    if (out < 0 || in < 0 || r < 0) return DORA_ERR_SIZE;
    if ((out && r && (!WAt || !C)) || (r && in && (!A || !CtW)) || (out && in && !W0))
        return DORA_ERR_NULL;
    const int64_t nslices = products_slices(out, r);
    REAL *Ap = FN(pack_panels)(A, r, in, in, 1);  /* A in panels */
    REAL *part = (REAL *)malloc((size_t)dora_max(1, (nslices - 1) * r * in) * sizeof(REAL));
    if (!Ap || !part) {
        free(Ap);
        free(part);
        return DORA_ERR_NOMEM;
    }
    FN(products_ctx) ctx = {WAt, CtW, part, W0, Ap, C, out, in, r, nslices};
    dora_plan plan;
    dora_plan_begin(&plan, K_PRODUCTS, (double)out * in * (2 * r + 1), nslices);
    const int failed = dora_team_for(&plan, nslices, FN(products_block), &ctx,
                                     (size_t)dora_max(1, r * CHUNK_LD) * sizeof(REAL));
    dora_plan_end(&plan);
    if (!failed && nslices > 1) {  /* CtW = sum of the slices' partials, in slice order */
        const int64_t nsums = (r * in + SUM_BLOCK - 1) / SUM_BLOCK;
        dora_plan sum_plan;
        dora_plan_begin(&sum_plan, K_PRODUCTS_SUM, (double)r * in * nslices, nsums);
        dora_team_for(&sum_plan, nsums, FN(products_sum_block), &ctx, 0);
        dora_plan_end(&sum_plan);
    }
    free(Ap);
    free(part);
    return failed ? DORA_ERR_NOMEM : DORA_OK;
}
