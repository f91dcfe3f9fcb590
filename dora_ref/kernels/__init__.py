"""Which code runs the hot paths: the backend switch and the C kernels.

* ``backend``: ``set_backend`` / ``use_backend`` choose between the NumPy
  twins (``dora_ref.core.kernels_numpy``) and the C kernels;
* ``c``: the wrapper of the cffi extension built from ``csrc/``; it checks
  every argument before a pointer crosses and decides each call's threads.

Both compute the same steps; see the README on what "the same" means bitwise.
"""
