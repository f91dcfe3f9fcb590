"""The C kernels: the fast twins of ``dora_ref.core.kernels_numpy``.

* ``c``: the wrapper of the cffi extension built from ``csrc/`` (the C
  sources stay at the repository's root). It checks every argument before a
  pointer crosses, decides each call's threads, and falls back to the NumPy
  twin where C would not win (ranks above ``FUSED_MAX_RANK``).

The core chooses between the two through ``dora_ref.core.backend``
(``set_backend`` / ``use_backend``); both compute the same steps, and the
README says what "the same" means bitwise.
"""
