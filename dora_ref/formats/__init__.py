"""Files in and out: safetensors, PEFT's adapter folders, and the merge command.

* ``safetensors_io``: a reader that checks before it trusts and a writer that
  survives a crash;
* ``peft``: PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``:
  ``peft.config`` (the config and its pattern matching), ``peft.adapter``
  (folders read, written, made into layers), ``peft.orientation`` (a module's
  base key, the ``fan_in_fan_out`` rule), ``peft.merge`` (adapters chained
  and merged into base weights);
* ``bf16_bits``: bfloat16 as raw bits, widened exactly, narrowed with one rounding;
* ``merge_cli``: ``dora-ref merge``, the crash-safe merge of a checkpoint.
"""
