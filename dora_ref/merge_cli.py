"""``dora-ref merge BASE ADAPTER [ADAPTER ...] OUT``: merge PEFT adapters without PyTorch.

BASE is a ``.safetensors`` file or a model directory as ``save_pretrained``
writes it (``model.safetensors``, or shards with
``model.safetensors.index.json``). Each ADAPTER is a PEFT adapter directory
(DoRA or plain LoRA); several are merged in the order given, as PEFT 0.21
merges several active adapters (each DoRA norm from the bare base weight,
see ``dora_ref.peft.merge_weight``).

Tensors of an adapter's ``modules_to_save`` (e.g. a classification head
trained in full) replace the base's, cast to the base dtype, as in PEFT's
``merge_and_unload``.

OUT gets the base's keys, dtypes, shapes and file layout: a file for a file
BASE; a directory for a directory BASE, with the same shard names, the index,
and the base's other small files (``config.json``, tokenizer files, ...)
copied, so ``AutoModel.from_pretrained(OUT)`` loads the merged model.

Tensors are read, merged and written one at a time: memory is about one
tensor (plus its float32 copy for bf16/fp16 bases), not the model. Every
adapter is checked against the base's header before anything is written.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


from . import peft as P
from . import safetensors_io as S

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def _parser():
    p = argparse.ArgumentParser(
        prog="dora-ref merge",
        description=(
            "Merge PEFT DoRA/LoRA adapters into base safetensors weights with NumPy: "
            "W' = diag(m / ||W0 + s B A||_row) (W0 + s B A) for DoRA, W0 + s B A for LoRA."
        ),
    )
    p.add_argument("base", metavar="BASE", help="base .safetensors file or model directory")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter directory (in order)")
    p.add_argument("out", metavar="OUT", help="output file (file BASE) or directory (directory BASE)")
    p.add_argument("--force", action="store_true", help="overwrite existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="list every merged module")
    p.add_argument(
        "--allow-zero-norm",
        action="store_true",
        help="merge rows whose norm ||W0 + s B A|| is 0 to zeros instead of failing",
    )
    return p


def _output_files(base, out):
    """(source file, destination file) pairs, and the directory to create (or None)."""
    out = Path(out)
    if base.path.is_dir():
        if out.exists() and not out.is_dir():
            raise ValueError(f"BASE is a directory, so OUT must be a directory; {out} is a file")
        return [(f, out / f.name) for f in base.files], out
    if out.is_dir():
        return [(base.files[0], out / base.files[0].name)], None
    return [(base.files[0], out)], None


def merge_checkpoint(base_path, adapter_paths, out, *, progress=True, allow_zero_norm=False,
                     force=False, verbose=False, log=print):  # fmt: skip
    """Merge adapters into a safetensors checkpoint, streaming tensor by tensor.

    Parameters
    ----------
    base_path : str or os.PathLike
        Base ``.safetensors`` file or model directory.
    adapter_paths : sequence of str or os.PathLike
        PEFT adapter directories, merged in this order.
    out : str or os.PathLike
        Output file, or directory for a directory base.
    progress : bool
        Show a tqdm progress bar (one step per tensor).
    allow_zero_norm : bool
        See ``dora_ref.peft.merge_weight``.
    force : bool
        Overwrite existing output files.
    verbose : bool
        List every merged module in the summary (default: the first 10).
    log : callable
        Receives the summary lines.

    Returns
    -------
    dict of str to list of str
        Each merged base key -> the ``"<adapter dir>:<kind>"`` merged into it.

    Raises
    ------
    FileNotFoundError, KeyError, ValueError
        Missing files, an adapter module without a base weight, shape
        mismatches, unsupported configs, a zero row norm, or an existing
        output without ``force``. Raised before any output is written, except
        the zero-norm error (found while merging), after which no partial
        output is left behind.
    """
    from tqdm.auto import tqdm

    base = S.BaseWeights(base_path)
    adapters = [P.load_adapter(a) for a in adapter_paths]
    plan = P.plan_merge(base, adapters)
    replaced = P.plan_replacements(base, adapters)  # modules_to_save: full tensors
    # which adapter each module came from, for the summary
    origin = {id(m): (str(a), "DoRA" if ad.config.use_dora else "LoRA")
              for a, ad in zip(adapter_paths, adapters) for m in ad.modules.values()}  # fmt: skip
    files, out_dir = _output_files(base, out)
    for _, dst in files:
        if dst.exists() and not force:
            raise ValueError(f"{dst} exists; pass --force to overwrite")
        if dst.resolve() in [f.resolve() for f in base.files]:
            raise ValueError(f"{dst} is a base file; write the output elsewhere")
    created_dir = out_dir is not None and not out_dir.exists()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    total = sum(len(base.file_keys(src)) for src, _ in files)
    bar = tqdm(total=total, unit="tensor", desc="merging", disable=not progress, file=sys.stderr)
    written = []
    try:
        for src, dst in files:
            f = base.handle(src)
            keys = f.keys()
            writer = S.SafetensorsWriter(dst, [(k, f.dtype(k), f.shape(k)) for k in keys], f.metadata())
            try:
                for key in keys:
                    W = f.get(key)
                    if key in plan:
                        mods, fifo = plan[key]
                        W = P.merge_weight(W, mods, fan_in_fan_out=fifo, allow_zero_norm=allow_zero_norm)
                    elif key in replaced:
                        W = replaced[key].astype(W.dtype)
                    writer.write(key, W)
                    bar.update(1)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            written.append(dst)
    except BaseException:  # no partial output: drop the shards this run completed
        for dst in written:
            dst.unlink(missing_ok=True)
        if created_dir and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    finally:
        bar.close()

    if out_dir is not None:  # the shard index and the small files (config.json, tokenizer, ...)
        for item in base.path.iterdir():
            if item.is_file() and item.suffix not in _WEIGHT_SUFFIXES:
                shutil.copy2(item, out_dir / item.name)

    merged = {k: [":".join(origin[id(m)]) for m in mods] for k, (mods, _) in plan.items()}
    n_dora = sum(1 for mods, _ in plan.values() if any(m.magnitude is not None for m in mods))
    log(
        f"merged {len(plan)} module(s) ({n_dora} with DoRA, {len(plan) - n_dora} plain LoRA) "
        f"from {len(adapters)} adapter(s); wrote {total} tensor(s) to {out}"
    )
    if replaced:
        log(f"replaced {len(replaced)} tensor(s) by the adapters' modules_to_save: {sorted(replaced)}")
    shown = sorted(merged)
    for key in shown if verbose else shown[:10]:
        log(f"  {key}  <- {', '.join(merged[key])}")
    if len(shown) > 10 and not verbose:
        log(f"  ... and {len(shown) - 10} more (-v lists all)")
    return merged


def main(argv=None):
    """Entry point of ``dora-ref merge``; returns the exit status (0 ok, 1 error, 2 usage)."""
    args = _parser().parse_args(argv)
    try:
        merge_checkpoint(
            args.base,
            args.adapters,
            args.out,
            progress=not args.no_progress,
            allow_zero_norm=args.allow_zero_norm,
            force=args.force,
            verbose=args.verbose,
        )
    except (FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"dora-ref merge: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
