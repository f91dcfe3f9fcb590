/* dora_kernels.c: the fused C kernels of dora_ref, float32 and float64.

   What a reference promises (after llm.c's train_gpt2.c): plain C99 that
   runs on any CPU, no intrinsics, readable next to its NumPy twin in
   dora_ref/_kernels_numpy.py, and a few OpenMP pragmas because they are a
   large speedup at very low cost. Large matrix products (x @ W0.T, dy @ W0,
   x @ A.T) are not here: they stay with NumPy's BLAS. What is here is
   everything DoRA adds to a linear layer that BLAS cannot fuse: one pass
   over W0 for the row norms (and the merge), one pass over the (N, out)
   output for the magnitude and the rank-r update (in the backward, with
   the rank-r products dU and dB), and one pass over W0 for the two
   products of W0 that the exact norm gradient needs.

   Layout, said once: weights are PyTorch (out, in); the paper's column norm
   is the norm of each *row* here, one value per output channel.

   Build knobs (set by dora_ref/_build_ffi.py after test compiles):
     _OPENMP                 compiled with -fopenmp
     DORA_HAVE_TARGET_CLONES x86-64 with GCC/Clang function multi-versioning:
                             the row workers are compiled for baseline x86-64,
                             x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512) and
                             the loader picks one for the running CPU, so the
                             wheel stays portable without -march=native. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

#ifdef _OPENMP
#define DORA_OPENMP_INFO "yes"
#else
#define DORA_OPENMP_INFO "no"
#endif

#define G 4                       /* rows that share each load of A (tile_full spells out 4) */
#define ACCW 8                    /* double lanes of a sum of squares */
#define ROW_BLOCK 16              /* rows a thread takes at a time (a multiple of G) */
#define COL_BLOCK 256             /* columns a thread takes in the backward */
#define PARALLEL_MIN_WORK 65536   /* below this many multiply-adds, stay on one thread */

#define LOWRANK_COL_BLOCK 512     /* columns a thread takes in backward_lowrank (at least) */
#define SLICES_MAX 8              /* most row slices of W0 in norm_gradient_products */
#define PRODUCT_CHUNK 512         /* columns of W0 a slice takes at a time there */
#define CHUNK_LD (PRODUCT_CHUNK + 16)  /* row stride of that chunk's sums */

static inline int64_t dora_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t dora_max(int64_t a, int64_t b) { return a > b ? a : b; }

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

/* norm_gradient_products: row slices of W0, each with its own (r, in) partial
   sum of C.T @ W0; at most out / (32 r) of them, so that the partials stay
   within 1/32 of W0's size, and at most SLICES_MAX. */
static int64_t products_slices(int64_t out, int64_t r)
{
    return dora_max(1, dora_min(SLICES_MAX, out / (32 * dora_max(1, r))));
}

#define REAL float
#define W 16
#define FN(name) name##_f32
#include "dora_kernels_impl.h"
#undef REAL
#undef W
#undef FN

#define REAL double
#define W 8
#define FN(name) name##_f64
#include "dora_kernels_impl.h"
#undef REAL
#undef W
#undef FN

int64_t dora_backward_lowrank_scratch(int64_t N, int64_t out, int64_t r, int64_t itemsize)
{
    const int64_t width = lowrank_col_block(out, r);
    const int64_t blocks = (out + width - 1) / width;
    const int64_t panels = (out + 15) / 16 * 16 * r;  /* B.T in panels */
    const int64_t per_thread = width * 8 + r * (width + 16) * itemsize;
    return (blocks * N * r + panels) * itemsize + dora_max_threads() * per_thread;
}

int64_t dora_norm_gradient_products_scratch(int64_t out, int64_t in, int64_t r, int64_t itemsize)
{
    const int64_t partials = (products_slices(out, r) - 1) * r * in;
    const int64_t panels = (in + 15) / 16 * 16 * r;  /* A in panels */
    return (partials + panels + dora_max_threads() * CHUNK_LD * r) * itemsize;
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
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

const char *dora_build_info(void)
{
    return "openmp=" DORA_OPENMP_INFO " simd_clones=" DORA_CLONES_INFO;
}
