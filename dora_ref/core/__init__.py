"""The reference: DoRA's math in NumPy, and nothing else. Read this first.

* ``dense``: the definition, paper Eqs. (1)-(5), with the adapted weight
  formed in full; short, slow, float64, the yardstick for the rest.
* ``functional``: the same math as a porter writes it: forward, the
  hand-derived backward (Sec. 4.3's detached norm or the exact gradient),
  merge and unmerge, without ever forming ``B @ A`` on the hot path.
* ``norm``: the row norm ``||W0 + s B A||`` and the guards around dividing
  by it (zero norms, overflow, rows whose squares under/overflow).
* ``kernels_numpy``: the fused steps ``functional`` calls, in NumPy; the C
  kernels (``dora_ref.kernels``) compute the same steps faster, and
  ``backend`` chooses between the two.
* ``conv`` (with ``im2col``, the patch bookkeeping) and ``embedding``: the
  same decomposition for ``nn.ConvNd`` and ``nn.Embedding``, PEFT's conventions.
* ``precision`` and ``lowp``: float16/bfloat16 weights, the dtype rules and
  the two policies ("consistent": float32 rounded once; "peft": PEFT 0.21's
  cast points).
* ``_validate``: the argument checks every public function runs.

Nothing here keeps state; the layers in ``dora_ref.layers`` do.
"""
