"""The demo: DoRA vs LoRA vs full fine-tuning on scikit-learn's digits.

* ``digits``: the experiment, run by ``python -m dora_ref demo``;
* ``mlp``: the small network it adapts;
* ``analysis``: the paper's magnitude/direction analysis (Sec. 3.2, Fig. 2).

``dora_ref.demo`` was a module in 0.1; its names are here.
"""
from .digits import (
    FULL,
    MISSING,
    QUICK,
    TASK_SEED,
    Config,
    accuracy,
    adapt,
    build_mlp,
    correlation_summary,
    correlations,
    format_correlations,
    format_table,
    hidden_layers,
    load_tasks,
    main,
    merge_check,
    methods,
    paired_differences,
    parse_args,
    plot_accuracy_figure,
    plot_decomposition_figure,
    run_seed,
    summarize,
    train,
    write_csv,
)

__all__ = [
    "FULL",
    "MISSING",
    "QUICK",
    "TASK_SEED",
    "Config",
    "accuracy",
    "adapt",
    "build_mlp",
    "correlation_summary",
    "correlations",
    "format_correlations",
    "format_table",
    "hidden_layers",
    "load_tasks",
    "main",
    "merge_check",
    "methods",
    "paired_differences",
    "parse_args",
    "plot_accuracy_figure",
    "plot_decomposition_figure",
    "run_seed",
    "summarize",
    "train",
    "write_csv",
]
