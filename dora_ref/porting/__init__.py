"""The porting kit: check your own DoRA against this one.

* ``testing``: the conformance checker (``check_forward``, ``check_backward``,
  ``check_merge``, ...), built from ``cases`` (the cases, the reference, the
  tolerances), ``runner`` (calling a port, comparing, shrinking), ``hints``,
  and the diagnosis of the usual mistakes (``conventions``, ``variants``,
  ``diagnosis``, ``layer_checks`` for embeddings, convolutions and chains);
* ``vectors``: golden input/output files, the same cases for any language
  (``vector_cases``: which cases, how drawn, their tolerances);
* ``tolerance``: the error model every comparison uses (``rtol(dtype, k)``;
  bfloat16 and float16 with ``roundings=R``, ``ROUNDINGS``);
* ``gradcheck``: float64 finite differences.
"""
