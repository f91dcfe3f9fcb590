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

Which base weights are stored (in, out) (GPT-2 ``Conv1D``, PEFT's
``fan_in_fan_out``) is not recorded in a checkpoint. A non-square weight's
shape tells; a square one is settled by ``--fan-in-fan-out PATTERN`` (a regex
of the modules stored (in, out), matched as PEFT matches ``rank_pattern``
keys; ``''`` for none), else by the ``model_type`` in the base's
``config.json``, else by the adapter's ``fan_in_fan_out`` when its non-square
modules corroborate it; otherwise the command stops and says so
(``dora_ref.peft.resolve_fan_in_fan_out``): it never guesses.

OUT must not exist (for a directory BASE: may be an empty directory) unless
``--force``, and may not be, or lie inside, BASE or an ADAPTER directory.

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
    p.add_argument("--force", action="store_true", help="write into an existing OUT, overwriting its files")
    p.add_argument(
        "--fan-in-fan-out",
        metavar="PATTERN",
        default=None,
        help="regex of the modules whose base weight is stored (in, out) (GPT-2 Conv1D), matched as "
        "PEFT matches rank_pattern keys, e.g. 'c_attn|c_proj|c_fc'; '' for none. Needed only for square "
        "weights that nothing else settles (the command says so)",
    )
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


def _inside(path, directory):
    """Whether ``path`` is ``directory`` or lies inside it (both resolved)."""
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def _check_output(base, adapter_paths, out, files, out_dir, force):
    """Refuse an OUT that would overwrite files (without force) or lands in an input."""
    out = Path(out)
    for what, src in [("ADAPTER", Path(a)) for a in adapter_paths] + [("BASE", base.path)]:
        if src.is_dir() and _inside(out, src):
            where = "" if _inside(src, out) else "inside "
            raise ValueError(f"OUT {out} is {where}the {what} directory {src}; write the output elsewhere")
    for _, dst in files:
        if dst.resolve() in [f.resolve() for f in base.files]:
            raise ValueError(f"{dst} is a base file; write the output elsewhere")
    if force:
        return
    if out_dir is not None and out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"OUT {out_dir} exists and is not empty; pass --force to write into it")
    for _, dst in files:
        if dst.exists():
            raise ValueError(f"{dst} exists; pass --force to overwrite")


def merge_checkpoint(base_path, adapter_paths, out, *, progress=True, allow_zero_norm=False,
                     force=False, verbose=False, log=print, fan_in_fan_out=None):  # fmt: skip
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
        Write into an existing, non-empty OUT, overwriting its files.
    verbose : bool
        List every merged module in the summary (default: the first 10).
    log : callable
        Receives the summary lines.
    fan_in_fan_out : None, bool, str or iterable of str
        Which base weights are stored (in, out); see
        ``dora_ref.peft.resolve_fan_in_fan_out``.

    Returns
    -------
    dict of str to list of str
        Each merged base key -> the ``"<adapter dir>:<kind>"`` merged into it.

    Raises
    ------
    FileNotFoundError, KeyError, ValueError
        Missing files, an adapter module without a base weight, shape
        mismatches, unsupported or malformed configs, a square weight of
        unknown orientation, a zero row norm, an existing output without
        ``force``, or OUT in BASE or an ADAPTER directory. Raised before any output is written, except
        the zero-norm error (found while merging), after which no partial
        output is left behind.
    """
    from tqdm.auto import tqdm

    base = S.BaseWeights(base_path)
    adapters = [P.load_adapter(a) for a in adapter_paths]
    plan = P.plan_merge(base, adapters, fan_in_fan_out=fan_in_fan_out)
    replaced = P.plan_replacements(base, adapters)  # modules_to_save: full tensors
    # which adapter each module came from, for the summary
    origin = {id(m): (str(a), "DoRA" if ad.config.use_dora else "LoRA")
              for a, ad in zip(adapter_paths, adapters) for m in ad.modules.values()}  # fmt: skip
    files, out_dir = _output_files(base, out)
    _check_output(base, adapter_paths, out, files, out_dir, force)
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
            fan_in_fan_out=args.fan_in_fan_out,
        )
    except (OSError, KeyError, ValueError) as e:  # one line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"dora-ref merge: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
