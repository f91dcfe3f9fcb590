/* dora_kernels.c: the fused C kernels of dora_ref, float32 and float64.

   What a reference promises (after llm.c's train_gpt2.c): plain C99 that
   runs on any CPU, no intrinsics, readable next to its NumPy twin in
   dora_ref/_kernels_numpy.py, and a few OpenMP pragmas because they are a
   large speedup at very low cost. Large matrix products (x @ W0.T, dy @ W0,
   x @ A.T) are not here: they stay with NumPy's BLAS. What is here is
   everything DoRA adds to a linear layer that BLAS cannot fuse: one pass
   over W0 for the row norms (and the merge), and one pass over the (N, out)
   output for the magnitude and the rank-r update.

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

static inline int64_t dora_min(int64_t a, int64_t b) { return a < b ? a : b; }

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
