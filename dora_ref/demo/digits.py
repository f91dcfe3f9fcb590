"""``dora-ref demo``: DoRA vs LoRA vs full fine-tuning on scikit-learn's digits.

What it does
------------
1. **Data.** scikit-learn's handwritten digits (1,797 8x8 images, shipped
   with the package: no download), pixels scaled to [0, 1], split 75/25
   (stratified, fixed).
2. **Source task.** An MLP 64 -> 64 -> 64 -> 64 -> 10 (ReLU) learns to read
   the digits; each seed pretrains its own.
3. **Target task: the same digits with their 64 pixels shuffled by one fixed
   random permutation** ("permuted digits", as in permuted MNIST). Why this
   shift: the pretrained first layer's features become random projections of
   scrambled pixels, so training only the head does poorly; undoing the
   shuffle exactly needs ``W1[:, perm]`` (``W1 @ P``), whose difference from
   W1 has nearly full rank (58 of 64 for seed 0), so a small rank limits
   what LoRA and DoRA can do; full fine-tuning has the capacity and does
   well. Permuting a row's entries keeps its norm, so that ideal update is
   a pure change of direction (ΔM = 0, ΔD = 0.99; tutorial 01 shows it).
   Measured (5 seeds): head only ~70%, full fine-tuning ~97%, LoRA/DoRA
   from ~84% at rank 1 to ~95% at rank 8.
4. **Methods**, each from the pretrained weights, several seeds: the head
   only; full fine-tuning; LoRA and DoRA at ranks 1, 2, 4, 8 on the three
   hidden layers (the head is trained in full, as PEFT's
   ``modules_to_save``), ``lora_alpha = 2 r``, AdamW without weight decay.
   LoRA and DoRA at the same rank and seed share their adapter init and
   batch order, so their difference is paired. All use ``dora_ref``'s
   layers, its hand-derived backward and its AdamW; nothing here uses an
   autograd framework.
5. **Merge check.** Every trained adapter is merged into its base weights
   and the merged network's test outputs are compared with the unmerged ones.
6. **Weight-decomposition analysis** (paper Sec. 3.2, Fig. 2): ΔM and ΔD of
   each hidden layer at 4 checkpoints against the pretrained weights, for
   FT, LoRA and DoRA; their correlation and slope next to the paper's
   (FT -0.62, DoRA -0.31, LoRA +0.83 on VL-BART). The paper pools all
   points of a run; the demo also reports a within-step correlation (each
   checkpoint's mean removed), since ΔD and ΔM both grow with training.

Outputs in ``--out`` (default ``./demo_out``, ``./demo_out_quick`` with
``--quick``, so that a short run does not overwrite a full one's): ``results.json``,
``results.csv`` (the table), ``decomposition.csv`` (every ΔM/ΔD point),
``decomposition.png`` (Fig. 2 redrawn) and ``accuracy.png``.

Run ``python -m dora_ref demo --help`` for the options. It needs
scikit-learn and matplotlib: ``pip install -e ".[demo]"``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

import numpy as np

from . import analysis
from ..layers.linear import DoRALinear, LoRALinear
from .mlp import MLP, Dense, ReLU, init_dense, softmax_cross_entropy
from ..layers.optim import AdamW
from ..porting.tolerance import rtol

MISSING = (
    "dora-ref demo needs scikit-learn and matplotlib, which are not installed "
    "({missing}).\nInstall the demo extra:  pip install -e \".[demo]\"   "
    "(or: pip install scikit-learn matplotlib)"
)

#: the target task's pixel permutation is drawn from this seed, so every
#: ``--seed`` adapts to the same task
TASK_SEED = 2402


@dataclasses.dataclass(frozen=True)
class Config:
    """The demo's settings; ``FULL`` and ``QUICK`` below are the two presets."""

    hidden: tuple = (64, 64, 64)  # widths of the hidden layers (the adapted ones)
    seeds: int = 5
    ranks: tuple = (1, 2, 4, 8)
    pretrain_epochs: int = 30
    epochs: int = 60  # fine-tuning epochs on the target task
    batch_size: int = 64
    lr_head: float = 1e-2
    lr_ft: float = 3e-3
    lr_adapter: float = 3e-3
    alpha_over_r: float = 2.0  # lora_alpha = 2 r, the paper's choice (Table 8)
    checkpoints: int = 4  # 3 intermediate steps + the last, as in the paper
    analysis_rank: int = 4  # the rank drawn in decomposition.png


FULL = Config()
QUICK = Config(seeds=2, ranks=(1, 4), pretrain_epochs=20, epochs=20)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def load_tasks(dtype=np.float64):
    """The source and target tasks on scikit-learn's digits.

    Returns
    -------
    dict with float arrays ``X_train`` (1347, 64), ``X_test`` (450, 64) in
    [0, 1], their pixel-permuted versions ``X_train_target``,
    ``X_test_target``, int labels ``y_train`` (1347,), ``y_test`` (450,),
    and ``permutation`` (64,).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(dtype)  # pixel intensities 0..16 -> [0, 1]
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    perm = np.random.default_rng(TASK_SEED).permutation(X.shape[1])
    return dict(X_train=X_tr, X_test=X_te, y_train=y_tr, y_test=y_te, permutation=perm,
                X_train_target=X_tr[:, perm], X_test_target=X_te[:, perm])


# ---------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------


def build_mlp(sizes, rng, dtype=np.float64):
    """Dense-ReLU-...-Dense with PyTorch's default init; ``sizes`` = (in, hidden..., out)."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Dense(*init_dense(n_in, n_out, rng, dtype)))
        if i < len(sizes) - 2:
            layers.append(ReLU())
    return MLP(layers)


def adapt(base, method, rank, config, rng):
    """A copy of the pretrained ``base`` set up for one fine-tuning method.

    Parameters
    ----------
    base : MLP
        The pretrained network (its weights are copied, never changed).
    method : {"head", "FT", "LoRA", "DoRA"}
    rank : int or None
        The adapter rank (LoRA, DoRA).
    config : Config
    rng : numpy.random.Generator
        Draws the adapters' ``lora_A``.

    Returns
    -------
    MLP
        The hidden layers are frozen ``Dense`` (head), trainable ``Dense``
        (FT) or ``LoRALinear``/``DoRALinear`` with ``lora_alpha = 2 r``; the
        last layer (the head) is always a trainable ``Dense``.
    """
    dense = [layer for layer in base.layers if isinstance(layer, Dense)]
    head = dense[-1]
    layers = []
    for layer in base.layers:
        if not isinstance(layer, Dense):
            layers.append(ReLU())
        elif layer is head or method == "FT":
            layers.append(Dense(layer.weight, layer.bias))
        elif method == "head":
            layers.append(Dense(layer.weight, layer.bias, trainable=False))
        else:
            cls = {"LoRA": LoRALinear, "DoRA": DoRALinear}[method]
            layers.append(cls(layer.weight.copy(), layer.bias.copy(), r=rank,
                              lora_alpha=config.alpha_over_r * rank, rng=rng))
    return MLP(layers)


def hidden_layers(net):
    """The adapted (hidden) linear layers of ``net``, in order: all but the head."""
    linear = [layer for layer in net.layers if not isinstance(layer, ReLU)]
    return linear[:-1]


def train(net, X, y, *, epochs, lr, batch_size, rng, checkpoint_steps=(), on_checkpoint=None):
    """Minibatch AdamW (weight decay 0) on softmax cross-entropy.

    ``on_checkpoint(step)`` is called after each step listed in
    ``checkpoint_steps``. Returns the number of steps taken.
    """
    opt = AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    checkpoint_steps = set(checkpoint_steps)
    step = 0
    net.train()
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for start in range(0, len(X), batch_size):
            idx = order[start:start + batch_size]
            net.zero_grad()
            _, dlogits = softmax_cross_entropy(net.forward(X[idx]), y[idx])
            net.backward(dlogits)
            opt.step(net.grads())
            step += 1
            if step in checkpoint_steps and on_checkpoint is not None:
                on_checkpoint(step)
    net.eval()
    return step


def accuracy(net, X, y):
    """The fraction of rows of X whose arg-max logit is the label."""
    net.eval()
    return float(np.mean(net.forward(X).argmax(axis=1) == y))


def merge_check(net, X):
    """Merge every adapter, compare outputs with the unmerged network, unmerge.

    Returns
    -------
    max_diff : float
        ``max |logits_merged - logits_unmerged|`` over X (logit units).
    bound : float
        The float64 rounding bound it must meet: ``rtol(float64, k) *
        max|logits|`` with k the sum over linear layers of (in + r), the
        reduction lengths along the chain (``dora_ref.porting.tolerance``).
    """
    net.eval()
    before = net.forward(X)
    adapters = [layer for layer in net.layers if isinstance(layer, LoRALinear)]
    for layer in adapters:
        layer.merge()
    merged = net.forward(X)
    for layer in adapters:
        layer.unmerge()
    k = sum(layer.weight.shape[1] + getattr(layer, "r", 0)
            for layer in net.layers if not isinstance(layer, ReLU))
    bound = rtol(before.dtype, k) * float(np.max(np.abs(before)))
    return float(np.max(np.abs(merged - before))), bound


# ---------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------


def methods(config):
    """The list of (method, rank) pairs the demo runs."""
    return ([("head", None), ("FT", None)]
            + [("LoRA", r) for r in config.ranks] + [("DoRA", r) for r in config.ranks])


def run_seed(config, seed, data, progress=None):
    """Pretrain on the source task, then run every method on the target task.

    Returns
    -------
    runs : list of dict
        One per method: ``method, rank, seed, accuracy, params, seconds``,
        and for adapters ``merge_max_diff, merge_bound``.
    points : list of dict
        ΔM/ΔD points: ``method, rank, seed, layer, step, delta_m, delta_d``.
    source_accuracy : float
    """
    rng = np.random.default_rng(seed)
    sizes = (data["X_train"].shape[1], *config.hidden, 10)
    base = build_mlp(sizes, rng)
    train(base, data["X_train"], data["y_train"], epochs=config.pretrain_epochs,
          lr=config.lr_ft, batch_size=config.batch_size, rng=rng)
    source_acc = accuracy(base, data["X_test"], data["y_test"])
    W0s = [layer.weight.copy() for layer in hidden_layers(base)]

    X, y = data["X_train_target"], data["y_train"]
    steps_per_epoch = -(-len(X) // config.batch_size)
    total = config.epochs * steps_per_epoch
    ckpts = [round(total * (j + 1) / config.checkpoints) for j in range(config.checkpoints)]

    runs, points = [], []
    for method, rank in methods(config):
        # LoRA and DoRA at the same rank share their adapter init and batch order (a paired
        # comparison), and a run does not depend on which other ranks are in the config
        run_rng = np.random.default_rng([seed, rank or 0])
        net = adapt(base, method, rank, config, run_rng)
        lr = {"head": config.lr_head, "FT": config.lr_ft}.get(method, config.lr_adapter)

        analysis_seconds = [0.0]  # kept out of the method's training time

        def record(step, net=net, method=method, rank=rank, clock=analysis_seconds):
            t = time.perf_counter()
            for i, (layer, W0) in enumerate(zip(hidden_layers(net), W0s)):
                W = analysis.effective_weight(layer)
                points.append(dict(method=method, rank=rank, seed=seed, layer=f"layer {i + 1}",
                                   step=step, delta_m=analysis.delta_magnitude(W, W0),
                                   delta_d=analysis.delta_direction(W, W0)))
            clock[0] += time.perf_counter() - t

        t0 = time.perf_counter()
        train(net, X, y, epochs=config.epochs, lr=lr, batch_size=config.batch_size, rng=run_rng,
              checkpoint_steps=ckpts if method != "head" else (),
              on_checkpoint=record)
        seconds = time.perf_counter() - t0 - analysis_seconds[0]
        run = dict(method=method, rank=rank, seed=seed, params=net.num_trainable(),
                   accuracy=accuracy(net, data["X_test_target"], data["y_test"]),
                   seconds=seconds)
        if method in ("LoRA", "DoRA"):
            run["merge_max_diff"], run["merge_bound"] = merge_check(net, data["X_test_target"])
        runs.append(run)
        if progress is not None:
            progress.set_postfix_str(f"seed {seed} {method}{'' if rank is None else f' r={rank}'}")
            progress.update(1)
    return runs, points, source_acc


def summarize(runs):
    """Group runs by (method, rank): mean, std, min, max accuracy; params; mean seconds."""
    table = []
    for method, rank in dict.fromkeys((r["method"], r["rank"]) for r in runs):
        group = [r for r in runs if r["method"] == method and r["rank"] == rank]
        acc = np.array([r["accuracy"] for r in group])
        row = dict(method=method, rank=rank, params=group[0]["params"], seeds=len(group),
                   acc_mean=float(acc.mean()), acc_std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                   acc_min=float(acc.min()), acc_max=float(acc.max()),
                   seconds_mean=float(np.mean([r["seconds"] for r in group])))
        if "merge_max_diff" in group[0]:
            row["merge_max_diff"] = max(r["merge_max_diff"] for r in group)
            row["merge_bound"] = min(r["merge_bound"] for r in group)
        table.append(row)
    return table


def paired_differences(runs, config):
    """DoRA minus LoRA test accuracy per rank, paired by seed (same init and batches).

    Returns a list of dicts ``rank, mean, std, diffs`` (accuracy as a fraction).
    """
    acc = {(r["method"], r["rank"], r["seed"]): r["accuracy"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = []
    for rank in config.ranks:
        d = np.array([acc[("DoRA", rank, s)] - acc[("LoRA", rank, s)] for s in seeds])
        out.append(dict(rank=rank, mean=float(d.mean()),
                        std=float(d.std(ddof=1)) if len(d) > 1 else 0.0, diffs=d.tolist()))
    return out


def correlations(points, config):
    """Per (method, rank, seed): corr and slope over layers x checkpoints (the paper's pooling)."""
    out = []
    keys = dict.fromkeys((p["method"], p["rank"], p["seed"]) for p in points)
    for method, rank, seed in keys:
        sel = [p for p in points if (p["method"], p["rank"], p["seed"]) == (method, rank, seed)]
        dd, dm = [p["delta_d"] for p in sel], [p["delta_m"] for p in sel]
        corr, slope = analysis.correlation_and_slope(dd, dm)
        corr_step, _ = analysis.correlation_and_slope(dd, dm, groups=[p["step"] for p in sel])
        out.append(dict(method=method, rank=rank, seed=seed, corr=corr, slope=slope,
                        corr_within_step=corr_step))
    return out


def correlation_summary(corrs, config):
    """Mean and std over seeds of the correlation for FT and the analysis rank."""
    summary = []
    for method in ("FT", "LoRA", "DoRA"):
        rank = None if method == "FT" else config.analysis_rank
        c = np.array([x["corr"] for x in corrs if x["method"] == method and x["rank"] == rank])
        s = np.array([x["slope"] for x in corrs if x["method"] == method and x["rank"] == rank])
        w = np.array([x["corr_within_step"] for x in corrs
                      if x["method"] == method and x["rank"] == rank])
        std = (lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0)
        summary.append(dict(method=method, rank=rank, corr_mean=float(c.mean()),
                            corr_std=std(c), corr_min=float(c.min()), corr_max=float(c.max()),
                            slope_mean=float(s.mean()), slope_std=std(s),
                            corr_within_step_mean=float(w.mean()), corr_within_step_std=std(w),
                            paper_corr=analysis.PAPER_CORRELATIONS[method]))
    return summary


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------


def _label(method, rank):
    return method if rank is None else f"{method} r={rank}"


def format_table(table):
    """The results table as fixed-width text."""
    lines = [f"{'method':<11}{'params':>8}  {'test accuracy (%)':<22}{'time/run (s)':>12}"
             f"{'merge max|diff|':>17}"]
    for row in table:
        acc = f"{100 * row['acc_mean']:5.1f} ± {100 * row['acc_std']:3.1f} " \
              f"[{100 * row['acc_min']:.1f}, {100 * row['acc_max']:.1f}]"
        merge = f"{row['merge_max_diff']:.1e}" if "merge_max_diff" in row else "-"
        lines.append(f"{_label(row['method'], row['rank']):<11}{row['params']:>8}  {acc:<22}"
                     f"{row['seconds_mean']:>12.2f}{merge:>17}")
    lines.append("test accuracy: mean ± std (sample std over seeds) [min, max]; time: mean per run")
    return "\n".join(lines)


def format_correlations(summary, n_seeds, config):
    """The correlation table as text: pooled (the paper's statistic), slope, within-step."""
    n_points = f"{len(config.hidden)} layers x {config.checkpoints} checkpoints"
    lines = [f"ΔD-ΔM correlation over {n_points}, mean ± std over {n_seeds} seed(s):",
             f"  {'':<10} {'pooled':>12}  {'paper':>6}  {'slope ΔM/ΔD':>14}  "
             f"{'within-step':>12}"]
    for row in summary:
        lines.append(f"  {_label(row['method'], row['rank']):<10} {row['corr_mean']:+6.2f} ± "
                     f"{row['corr_std']:.2f}  {row['paper_corr']:+6.2f}  "
                     f"{row['slope_mean']:+6.2f} ± {row['slope_std']:.2f}  "
                     f"{row['corr_within_step_mean']:+6.2f} ± {row['corr_within_step_std']:.2f}")
    lines.append("  pooled: all points, as the paper (VL-BART); slope in weight units per unit of "
                 "ΔD;\n  within-step: each checkpoint's mean removed first, i.e. layers compared "
                 "at the same step.")
    return "\n".join(lines)


def write_csv(path, rows):
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_decomposition_figure(points, config, seed, path, summary=None):
    """Fig. 2 redrawn: FT, LoRA and DoRA (analysis rank), one seed, side by side.

    Each panel's title gives the pooled correlation of the drawn seed, labelled
    with the seed, and, if ``summary`` (``correlation_summary``'s rows) is given,
    the same statistic's mean ± std and [min, max] over all seeds: the numbers
    the README quotes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one y axis for all three: DoRA's small magnitude change per unit of direction is the point
    fig, axes = plt.subplots(1, 3, figsize=(14, 5), sharey=True, constrained_layout=True)
    for ax, method in zip(axes, ("FT", "LoRA", "DoRA")):
        rank = None if method == "FT" else config.analysis_rank
        sel = [p for p in points if p["method"] == method and p["rank"] == rank
               and p["seed"] == seed]
        line = None
        if summary is not None:
            row = next(r for r in summary if r["method"] == method and r["rank"] == rank)
            n_seeds = len({p["seed"] for p in points})
            line = (f"{n_seeds} seeds: corr {row['corr_mean']:+.2f} ± {row['corr_std']:.2f} "
                    f"[{row['corr_min']:+.2f}, {row['corr_max']:+.2f}]\n"
                    f"slope {row['slope_mean']:.2f} ± {row['slope_std']:.2f}")
        analysis.plot_decomposition(
            ax, [p["delta_d"] for p in sel], [p["delta_m"] for p in sel],
            [p["layer"] for p in sel], [p["step"] for p in sel],
            title=_label(method, rank), paper_corr=analysis.PAPER_CORRELATIONS[method],
            points_label=f"seed {seed}", summary=line)
        ax.legend(fontsize=8, loc="best", title="marker: layer", title_fontsize=8, framealpha=0.6)
    steps = sorted({p["step"] for p in points})
    sm = plt.cm.ScalarMappable(cmap="viridis",
                               norm=matplotlib.colors.Normalize(min(steps), max(steps)))
    cbar = fig.colorbar(sm, ax=axes, ticks=steps, shrink=0.9)
    cbar.set_label("training step (colour)")
    fig.suptitle(f"Magnitude vs direction change of the hidden layers against the pretrained "
                 f"weights (permuted digits, paper Fig. 2); points: seed {seed}\ncorr: Pearson's r "
                 f"of a run's {len(config.hidden) * config.checkpoints} points pooled; slope: ΔM per unit ΔD; over seeds: mean ± std "
                 f"[min, max]", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_figure(table, config, path):
    """Test accuracy against rank for LoRA and DoRA, head-only and FT as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    by = {(r["method"], r["rank"]): r for r in table}
    ranks = list(config.ranks)
    for method, marker, dodge in (("LoRA", "o", 0.96), ("DoRA", "s", 1.04)):
        mean = [100 * by[(method, r)]["acc_mean"] for r in ranks]
        std = [100 * by[(method, r)]["acc_std"] for r in ranks]
        # dodged sideways a little so that overlapping error bars stay visible
        ax.errorbar([r * dodge for r in ranks], mean, yerr=std, marker=marker, capsize=3,
                    label=method)
    for method, style in (("FT", "-"), ("head", ":")):
        ax.axhline(100 * by[(method, None)]["acc_mean"], ls=style, color="grey",
                   label="full fine-tuning" if method == "FT" else "head only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("adapter rank r")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Permuted digits, test accuracy: mean ± std over {config.seeds} seed(s)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def _missing_dependencies():
    missing = []
    for module in ("sklearn", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append({"sklearn": "scikit-learn"}.get(module, module))
    return missing


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="dora-ref demo",
        description="DoRA vs LoRA vs full fine-tuning on scikit-learn's digits (pixels "
                    "permuted), with the paper's weight-decomposition analysis (Fig. 2).")
    p.add_argument("--quick", action="store_true",
                   help="a short run for CI: %d seeds, ranks %s, %d epochs"
                        % (QUICK.seeds, ",".join(map(str, QUICK.ranks)), QUICK.epochs))
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write results.json/.csv and the plots (default: ./demo_out, "
                        "./demo_out_quick with --quick)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed; seeds SEED, SEED+1, ... are run (default 0)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 5, quick: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.out is None:  # a --quick run never overwrites a full run's outputs (a new user's find)
        args.out = "demo_out_quick" if args.quick else "demo_out"
    return args


def main(argv=None):
    """Run the demo; returns 0, or 1 on a missing dependency or a failed merge check."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    missing = _missing_dependencies()
    if missing:
        print(MISSING.format(missing=", ".join(missing)), file=sys.stderr)
        return 1
    from tqdm.auto import tqdm

    config = QUICK if args.quick else FULL
    if args.seeds is not None:
        if args.seeds < 1:
            print("dora-ref demo: --seeds must be >= 1", file=sys.stderr)
            return 2
        config = dataclasses.replace(config, seeds=args.seeds)
    os.makedirs(args.out, exist_ok=True)
    seeds = [args.seed + i for i in range(config.seeds)]

    t0 = time.perf_counter()
    data = load_tasks()
    runs, points, source_accs = [], [], []
    with tqdm(total=len(seeds) * len(methods(config)), unit="run", desc="fine-tuning",
              disable=args.no_progress, file=sys.stderr) as progress:
        for seed in seeds:
            r, p, acc = run_seed(config, seed, data, progress)
            runs += r
            points += p
            source_accs.append(acc)
    table = summarize(runs)
    corrs = correlations(points, config)
    corr_summary = correlation_summary(corrs, config)
    paired = paired_differences(runs, config)
    elapsed = time.perf_counter() - t0

    merge_ok = all(r["merge_max_diff"] <= r["merge_bound"] for r in runs if "merge_max_diff" in r)
    worst = max((r for r in runs if "merge_max_diff" in r), key=lambda r: r["merge_max_diff"])

    print(f"\nSource task (digits): pretrained test accuracy "
          f"{100 * np.mean(source_accs):.1f}% (mean over {len(seeds)} seed(s)).")
    print(f"Target task (digits, pixels permuted): {len(data['X_train'])} train / "
          f"{len(data['X_test'])} test images, seeds {seeds[0]}..{seeds[-1]}.\n")
    print(format_table(table))
    print("\nDoRA - LoRA test accuracy, paired by seed (same adapter init and batches), "
          "mean ± std over seeds: "
          + ", ".join(f"r={p['rank']} {100 * p['mean']:+.1f} ± {100 * p['std']:.1f}" for p in paired)
          + " points")
    print(f"\nMerge check: largest |merged - unmerged| test logit over all adapters "
          f"{worst['merge_max_diff']:.2e} ({_label(worst['method'], worst['rank'])}, "
          f"seed {worst['seed']}); float64 bound {worst['merge_bound']:.2e}: "
          f"{'OK' if merge_ok else 'FAILED'}.")
    print()
    print(format_correlations(corr_summary, len(seeds), config))

    result = dict(config=dataclasses.asdict(config), seeds=seeds, task=dict(
        dataset="sklearn.datasets.load_digits", shift="fixed random pixel permutation",
        task_seed=TASK_SEED, n_train=len(data["X_train"]), n_test=len(data["X_test"])),
        source_accuracy=source_accs, table=table, dora_minus_lora=paired, runs=runs,
        correlations=corrs,
        correlation_summary=corr_summary, paper_correlations=analysis.PAPER_CORRELATIONS,
        merge_ok=merge_ok, seconds_total=elapsed)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_csv(os.path.join(args.out, "results.csv"), table)
    write_csv(os.path.join(args.out, "decomposition.csv"), points)
    plot_decomposition_figure(points, config, seeds[0], os.path.join(args.out, "decomposition.png"),
                              summary=corr_summary)
    plot_accuracy_figure(table, config, os.path.join(args.out, "accuracy.png"))
    print(f"\nWrote results.json, results.csv, decomposition.csv, decomposition.png, accuracy.png "
          f"to {args.out}/ ({time.perf_counter() - t0:.1f} s in all).")
    if not merge_ok:
        print("dora-ref demo: the merged network's outputs differ from the unmerged ones by "
              "more than float64 rounding allows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
