"""cffi build script for dora_ref's C kernels (out-of-line API mode).

``setup.py`` names this file in ``cffi_modules``; cffi then compiles
``csrc/dora_kernels.c`` into the extension module ``dora_ref.kernels._dora_c``
during ``build_ext`` (both ``pip install .`` and ``pip install -e .``).
The C API is the declarations-only header ``csrc/dora_kernels.h``, read
verbatim into ``ffibuilder.cdef``; ``dora_ref/kernels/c.py`` wraps it.

Compiler flags are chosen by test compiles, never assumed:

* ``-O3`` (``/O2`` with MSVC) and ``-ffp-contract=off``: no multiply-add is
  fused behind the source's back. GCC fuses by default where it sees fit,
  and it fused ``acc += v * v`` in one float64 kernel and not in another,
  so that merge's n and column_norm's n differed in the last bit
  (``test_merge_norm_is_the_column_norm_bit_for_bit``). Off, every kernel
  rounds each operation as its NumPy twin does (MSVC does not contract by
  default), except where the source asks for a fused multiply-add itself:
  the rank-r sums of the norm, merge and unmerge (``madd`` in
  ``csrc/dora_kernels_impl.h``) call ``fma`` when the CPU has FMA, in every
  tile alike, so that their bits still do not depend on the tile, the
  layout or the thread count;
* ``-fopenmp`` (``/openmp``), only when a small OpenMP program compiles and
  links: Apple clang, for one, has no OpenMP by default. Without it the
  kernels are the same code, run on one thread;
* ``-DDORA_HAVE_OMP_PAUSE`` when the OpenMP runtime has
  ``omp_pause_resource_all`` (OpenMP 5.0; GCC's libgomp since GCC 10 has it
  while ``_OPENMP`` still says 4.5): the kernels release the thread pool
  before a fork with it (``csrc/dora_kernels.c``);
* on x86-64, ``-DDORA_HAVE_TARGET_CLONES`` when the compiler supports
  ``__attribute__((target_clones))``: each row worker is compiled for
  baseline x86-64, x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512) and picked
  at load time, so a wheel stays portable without ``-march=native``.

``DORA_REF_EXTRA_CFLAGS`` (space-separated) adds flags, e.g.
``-march=native`` to measure it. Run ``python csrc/build_ffi.py`` to build
the module in place by hand.
"""
from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "dora_kernels.h")
# setuptools wants source paths relative to setup.py's folder, where it runs.
_ROOT = os.path.dirname(HERE)
SOURCES = [os.path.relpath(os.path.join(HERE, "dora_kernels.c"), _ROOT)]
DEPENDS = [os.path.relpath(os.path.join(HERE, n), _ROOT) for n in ("dora_kernels.h", "dora_kernels_impl.h")]

_OPENMP_TEST = r"""
#include <omp.h>
int dora_probe(void) {
    int s = 0;
    #pragma omp parallel for reduction(+:s)
    for (int i = 0; i < 4; i++) s += i;
    return s + omp_get_max_threads();
}
"""

_PAUSE_TEST = r"""
#include <omp.h>
int dora_probe(void) { return omp_pause_resource_all(omp_pause_soft); }
"""

_CLONES_TEST = r"""
__attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
static void dora_twice(float *x, int n) { for (int i = 0; i < n; i++) x[i] *= 2; }
void dora_probe(float *x, int n) { dora_twice(x, n); }
"""


def _new_compiler():
    try:
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler
    except ImportError:  # pragma: no cover - older setuptools
        from distutils.ccompiler import new_compiler
        from distutils.sysconfig import customize_compiler
    cc = new_compiler()
    customize_compiler(cc)
    return cc


def _compiles(code, compile_args=(), link_args=()):
    """True if ``code`` compiles and links into a shared object with these flags."""
    tmp = tempfile.mkdtemp(prefix="dora_ref_probe_")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(code)
        cc = _new_compiler()
        objs = cc.compile([src], output_dir=tmp, extra_postargs=list(compile_args))
        cc.link_shared_object(objs, os.path.join(tmp, "probe.so"), extra_postargs=list(link_args))
        return True
    except Exception:  # CompileError, LinkError, a missing compiler, ...
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compiler_flags():
    """Return (compile_args, link_args, define_macros) that work here."""
    try:
        msvc = _new_compiler().compiler_type == "msvc"
    except Exception:  # no compiler at all: the build fails later, setup.py reports it
        return [], [], []
    compile_args = ["/O2"] if msvc else ["-O3", "-ffp-contract=off"]
    link_args = []
    macros = []
    for omp_compile, omp_link in (
        (["/openmp"], []) if msvc else (["-fopenmp"], ["-fopenmp"]),
        ([], []) if msvc else (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),  # macOS + libomp
    ):
        if omp_compile and _compiles(_OPENMP_TEST, compile_args + omp_compile, omp_link):
            compile_args += omp_compile
            link_args += omp_link
            break
    else:
        print("dora_ref: the C compiler has no OpenMP; the C kernels will run on one thread",
              file=sys.stderr)
    if "-fopenmp" in compile_args or "/openmp" in compile_args:
        if _compiles(_PAUSE_TEST, compile_args, link_args):
            macros.append(("DORA_HAVE_OMP_PAUSE", "1"))
    if platform.machine().lower() in ("x86_64", "amd64") and not msvc:
        if _compiles(_CLONES_TEST, compile_args, link_args):
            macros.append(("DORA_HAVE_TARGET_CLONES", "1"))
    extra = shlex.split(os.environ.get("DORA_REF_EXTRA_CFLAGS", ""))
    return compile_args + extra, link_args, macros


def _cdef_text():
    with open(HEADER) as f:
        return f.read()


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
_compile_args, _link_args, _macros = compiler_flags()
ffibuilder.set_source(
    "dora_ref.kernels._dora_c",
    '#include <stdint.h>\n#include "dora_kernels.h"\n',
    sources=SOURCES,
    depends=DEPENDS,
    include_dirs=[os.path.relpath(HERE, _ROOT)],
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
    define_macros=_macros,
)

if __name__ == "__main__":
    os.chdir(_ROOT)
    ffibuilder.compile(tmpdir=_ROOT, verbose=True)
