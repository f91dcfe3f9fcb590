"""Files in and out: safetensors, PEFT's adapter folders, and the merge command.

* ``safetensors_io``: a reader that checks before it trusts and a writer that
  survives a crash;
* ``peft``: PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``,
  read and written, turned into layers, and merged into base weights;
* ``merge_cli``: ``dora-ref merge``, the crash-safe merge of a checkpoint.
"""
