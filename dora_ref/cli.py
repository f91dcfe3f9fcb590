"""The ``dora-ref`` command (also ``python -m dora_ref``).

Each subcommand lives in its own module, which exposes ``main(argv)`` and
parses its own arguments; this file only dispatches, so a missing optional
dependency of one command (e.g. scikit-learn for the demo) does not break
the others.
"""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading

# name -> (module with main(argv), one-line help)
COMMANDS = {
    "demo": ("dora_ref.demo.digits", "DoRA vs LoRA vs full fine-tuning on scikit-learn's digits"),
    "merge": ("dora_ref.formats.merge_cli", "merge a PEFT (Do)LoRA adapter into base safetensors weights"),
    "vectors": ("dora_ref.porting.vectors", "write golden test vectors for porting DoRA"),
    "info": ("dora_ref.cli", "print the version, its git commit, the backend and the threads"),
}


def _usage():
    lines = ["usage: dora-ref COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'dora-ref COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _cpu_summary(cpuinfo_text):
    """One line naming the CPU and its vector level, from the text of ``/proc/cpuinfo``.

    The timings in the README name the machine kind they were measured on
    (e.g. an AVX2 Zen 3 or an AVX-512 Zen 4); ``lscpu`` often says only
    "AMD EPYC", so this gives the model name, family and model numbers and
    the x86-64 level whose C kernel clones run here (v4: AVX-512 F/BW/CD/DQ/VL;
    v3: AVX2 + FMA), and, for the machine kinds the README's tables have a
    column for (``_README_MACHINE_KINDS``), that column's name. Returns None
    if the text has no model name.
    """
    fields = {}
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's entry
            fields[key.strip()] = value.strip()
    name = fields.get("model name")
    if name is None:
        return None
    flags = set(fields.get("flags", "").split())
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        level = "AVX-512 (x86-64-v4)"
    elif {"avx2", "fma"} <= flags:
        level = "AVX2 + FMA (x86-64-v3), no AVX-512"
    else:
        level = "no AVX2"
    family, model = fields.get("cpu family"), fields.get("model")
    where = f" (family {family} model {model})" if family and model else ""
    kind = _README_MACHINE_KINDS.get((fields.get("vendor_id"), family, model))
    named = f"; the README's tables call it \"{kind}\"" if kind else ""
    return f"cpu: {name}{where}, {level}{named}"


#: The machine kinds the README's tables have columns for, by (vendor, family, model): a new
#: user's finding (session 23) was that ``info`` printed the numbers and the README the names.
_README_MACHINE_KINDS = {
    ("GenuineIntel", "6", "167"): "Intel Xeon",
    ("AuthenticAMD", "25", "1"): "AMD EPYC Zen 3",
    ("AuthenticAMD", "25", "17"): "AMD EPYC Zen 4",
}


def _source_summary(package_dir):
    """One line saying which code ``package_dir`` (the imported ``dora_ref`` folder) is.

    The README and docs label every figure with a version of the code
    ("this version", "the previous version", ...); this names the git commit
    of the checkout the package was imported from, and whether the code
    differs from it: tracked files changed anywhere, or files in the package
    folder that git does not track (code that runs but no commit holds).
    Only a checkout whose top level holds the package counts: git is asked
    for the top level of ``package_dir`` and it must be the package's parent
    (a copy of the package inside some other repository, or a stray empty
    ``.git`` folder beside it, is "not a git checkout"). git runs with the
    caller's ``GIT_*`` variables removed (``GIT_DIR`` or ``GIT_WORK_TREE``
    would point it at another repository), ``GIT_OPTIONAL_LOCKS=0`` (``git
    status`` then takes no lock and writes no index) and a timeout; when it
    is missing or fails, the line says so.
    """
    pkg = os.path.abspath(package_dir)
    root = os.path.dirname(pkg)
    not_a_checkout = "source: not a git checkout (an installed copy, or a folder without .git)"
    if not os.path.exists(os.path.join(root, ".git")):
        return not_a_checkout
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_OPTIONAL_LOCKS"] = "0"

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=10, env=env)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode == 0 and os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return not_a_checkout
        head = git("rev-parse", "HEAD")
        tracked = git("status", "--porcelain", "--untracked-files=no")
        untracked = git("status", "--porcelain", "--untracked-files=all", "--", pkg)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"source: a git checkout at {root}; git could not be run ({type(exc).__name__})"
    for done in (top, head, tracked, untracked):
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()
            return f"source: a git checkout at {root}; git failed: {why[0] if why else 'no message'}"
    changes = []
    if tracked.stdout.strip():
        changes.append("uncommitted changes to tracked files")
    if any(line.startswith("??") for line in untracked.stdout.splitlines()):
        changes.append("untracked files in the package")
    dirty = f", with {' and '.join(changes)}" if changes else ""
    return f"source: git commit {head.stdout.strip()[:12]}{dirty} ({root})"


def info(argv=None):
    """Print dora_ref's version, its source (git commit), the backends, the active one, its
    threads, the CPU and BLAS."""
    import argparse

    import dora_ref

    argparse.ArgumentParser(
        prog="dora-ref info", description="Print the version, the backends and the threads."
    ).parse_args(argv)
    print(f"dora_ref {dora_ref.__version__}")
    print(_source_summary(os.path.dirname(dora_ref.__file__)))
    print(f"backend: {dora_ref.backend()} (available: {', '.join(dora_ref.available_backends())})")
    if "c" in dora_ref.available_backends():
        from dora_ref.kernels import c as _kernels_c

        print(f"C kernels: {_kernels_c.build_info()}; OpenMP threads: {_kernels_c.openmp_threads()}; "
              f"column_norm tile: {_kernels_c.norm_tile()}")
    try:
        with open("/proc/cpuinfo") as f:
            cpu = _cpu_summary(f.read())
    except OSError:  # not Linux
        cpu = None
    if cpu is not None:
        print(cpu)
    try:
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            version = f" {pool['version']}" if pool.get("version") else ""
            kernel = f", kernel {pool['architecture']}" if pool.get("architecture") else ""
            print(f"{pool['user_api']}: {pool['prefix']}{version}{kernel}, "
                  f"{pool['num_threads']} threads")
    except ImportError:
        pass
    return 0


def _shadowing_folder():
    """The folder that ``import dora_ref`` found instead of the package, or None.

    Run from the folder that holds a clone named ``dora_ref``, Python imports
    that folder as a namespace package (no ``__init__.py``, no ``__file__``)
    ahead of the installed package, and every command then fails on a missing
    name. Say so instead.
    """
    import dora_ref

    if getattr(dora_ref, "__file__", None) is None:
        return ", ".join(str(p) for p in getattr(dora_ref, "__path__", []))
    return None


def main(argv=None):
    """Entry point: ``dora-ref COMMAND ...``. Returns the exit status.

    Output piped into a reader that stops early (``dora-ref info | head -2``)
    ends the command quietly, with status 1, as other command-line tools do,
    instead of a ``BrokenPipeError`` traceback.
    """
    console = argv is None and threading.current_thread() is threading.main_thread()
    try:
        status = _run(argv, console)
        if console:
            # the console script, its work done: a Ctrl-C or a SIGTERM now would only kill the
            # exit (status -2 or -15 after a complete merge, say), so they are ignored
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if sys.stdout is not None:  # None when the command started with stdout closed (>&-)
            sys.stdout.flush()  # inside the try: a closed pipe shows here, not at exit
        return status
    except KeyboardInterrupt:  # Ctrl-C before a command took it over (its start): no traceback
        print("dora-ref: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _stdout_to_devnull()
        return 1
    except OSError as e:  # stdout on a full disk (> /dev/full), ...: one line, no traceback
        _stdout_to_devnull()
        print(f"dora-ref: error: {e}", file=sys.stderr)
        return 1


def _stdout_to_devnull():
    """Point stdout at the null device (Python's advice for SIGPIPE), so that
    the flush at exit does not fail again."""
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _run(argv, console=False):
    argv = list(sys.argv[1:] if argv is None else argv)
    folder = _shadowing_folder()
    if folder is not None:
        print(f"dora-ref: error: 'import dora_ref' found the folder {folder}, not the package "
              "(a folder named dora_ref in the current directory shadows it): run from another "
              "directory, e.g. the repository root", file=sys.stderr)
        return 1
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dora-ref: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name == "info":
        return info(rest)
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ImportError as e:  # an optional dependency of this command: one line, not a traceback
        missing = f" ({e.name})" if getattr(e, "name", None) else ""
        print(f"dora-ref {name}: error: {e}; install the extra that provides it{missing} (see README.md)",
              file=sys.stderr)
        return 1
    if name == "merge" and console:  # Ctrl-C and SIGTERM ignored from the merge's end to the exit
        return module.main(rest, ignore_signals_after=True) or 0
    return module.main(rest) or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
