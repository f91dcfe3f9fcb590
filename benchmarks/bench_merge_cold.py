"""``dora-ref merge`` and a plain read + write on fresh memory that the host has taken back.

Not a test. In a virtual machine whose balloon does free page reporting
(``bench_merge.py``'s first line says whether this one does), the guest
tells the host which memory is free and the host takes it back; the next
first touch of such a page, by any process, for anonymous memory or for a
new file's page cache, waits for the host to give it back. On the Intel
Xeon machine 800 MB of page cache written that way took 4.5-6 s instead of
0.2 s. A machine that has been idle a while is in that state; a benchmark
that runs its commands back to back mostly is not (each command gets the
memory the previous one just freed).

What state a merge meets is decided by the machine's memory history, which
a benchmark hardly controls: on the Intel Xeon a merge that wrote its output
through the page cache (before it wrote with ``O_DIRECT``) took 2.5-5.4 s in
16 runs of ad-hoc scripts that ran merges one after another, each after a
file as large as the model was written and deleted and 4 s passed; with a
``safetensors.torch`` read + write (1 GB of memory, freed at its exit)
between the merges it took 0.86-1.17 s, and in every run of this script's
merge block it took 0.82-1.35 s (never slow).

So the script first times what decides it, in one process where the state
is steadier: ``SafetensorsWriter`` writing 800 MB (eight 100 MB tensors,
then its fsync) with ``O_DIRECT`` (the default) and buffered
(``direct=False``, through the page cache), alternately, each after
``--settle`` seconds of idling, then the same with no idling.

Then it builds ``bench_merge.py``'s model (794 MB of bf16, DoRA r = 16
on all seven projections), then in interleaved rounds times, each as a
fresh subprocess, this checkout's ``dora-ref merge`` and, with ``--base
CHECKOUT``, another checkout's (an A/B), each after a file as large as the
model was written and deleted and ``--settle`` seconds passed (4 by
default). Then, in a block of its own (run between the merges it changes
what they meet), the ``safetensors.torch`` read + write of
``bench_merge.py``, the same way. Wall and CPU time (user + system) per
command, medians and ranges. Run ``python benchmarks/bench_merge_cold.py
--base CHECKOUT`` (3.1 minutes with ``--rounds 4`` on the Intel Xeon).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as M  # noqa: E402  (this directory's benchmark: its model, its runner)

ROOT = M.ROOT


def free_page_cache(directory, nbytes):
    """Write a file of ``nbytes`` and delete it: that much page cache becomes free memory."""
    block = os.urandom(1 << 20)  # small: this script's peak RSS is a floor for every child's
    path = directory / "cold.bin"
    with open(path, "wb") as f:
        for _ in range(max(1, -(-nbytes // len(block)))):
            f.write(block)
    path.unlink()


def writer_ab(directory, rounds, settle):
    """Time SafetensorsWriter on 800 MB, O_DIRECT and buffered, after ``settle`` s idle and after none."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from dora_ref.formats.safetensors_io import SafetensorsWriter

    data = np.random.default_rng(0).integers(0, 256, (8, 100 << 20), dtype=np.uint8)
    path = directory / "writer.safetensors"
    times = {}
    for round_ in range(rounds):
        for wait in (settle, 0.0):
            for direct in (None, False):
                time.sleep(wait)
                start, usage = time.perf_counter(), os.times()
                w = SafetensorsWriter(path, [(f"t{i}", np.uint8, row.shape) for i, row in enumerate(data)], direct=direct)
                for i, row in enumerate(data):
                    w.write(f"t{i}", row)
                w.close()
                wall, after = time.perf_counter() - start, os.times()
                path.unlink()
                name = f"{'O_DIRECT' if direct is None else 'buffered'}, after {wait:g} s idle"
                times.setdefault(name, []).append(wall)
                print(f"  writer round {round_ + 1}: {name:<28} {wall:6.2f} s  system {after.system - usage.system:5.2f} s",
                      flush=True)
    del data
    print()
    print(f"| SafetensorsWriter, 800 MB + fsync | wall, median of {rounds} [range] |")
    print("|---|---|")
    for name, w in times.items():
        print(f"| {name} | {statistics.median(w):.2f} s [{min(w):.2f}-{max(w):.2f}] |")
    print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    ap.add_argument("--settle", type=float, default=4.0, metavar="SECONDS",
                    help="the wait after the page cache is freed, before each command (default 4)")
    ap.add_argument("--base", metavar="CHECKOUT", default=None,
                    help="also time this checkout's 'dora-ref merge' (its extension built): an A/B")
    args = ap.parse_args(argv)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    print(f"machine: {M.machine()}")
    print(f"load before: {M.uptime()}")
    with tempfile.TemporaryDirectory(prefix="bench-merge-cold-") as tmp:
        tmp = Path(tmp)
        writer_ab(tmp, args.rounds, args.settle)
        base, adapter, largest = M.build_in_subprocess(tmp, False)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"model: {size / 1e6:.0f} MB of bf16 safetensors; before each command {size / 1e6:.0f} MB of page "
              f"cache freed, then {args.settle:g} s")  # fmt: skip
        for f in base.iterdir():
            M.subprocess.run(["cat", str(f)], stdout=M.subprocess.DEVNULL, check=True)
        merge = [sys.executable, "-m", "dora_ref", "merge", str(base), str(adapter), "{out}", "--no-progress"]
        merges = {"dora-ref merge": env}
        if args.base:
            merges[f"dora-ref merge, {args.base}"] = dict(env, PYTHONPATH=os.pathsep.join(
                [str(Path(args.base).resolve()), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
        floor = "read + write (safetensors.torch)"
        blocks = [(merges, merge), ({floor: env}, [sys.executable, "-c", M.READ_WRITE, str(base), "{out}"])]
        walls, cpus = {}, {}
        for commands, cmd in blocks:
            for round_ in range(args.rounds):
                for name, cmd_env in commands.items():
                    out = tmp / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    free_page_cache(tmp, size)
                    time.sleep(args.settle)
                    wall, cpu, _, _ = M.run([c.replace("{out}", str(out)) for c in cmd], cmd_env)
                    walls.setdefault(name, []).append(wall)
                    cpus.setdefault(name, []).append(cpu)
                    print(f"  round {round_ + 1}: {name:<34} {wall:6.2f} s  CPU {cpu:6.2f} s", flush=True)
        shutil.rmtree(tmp / "out", ignore_errors=True)
    print(f"load after: {M.uptime()}")
    print()
    print(f"| command | wall, median of {args.rounds} [range] | CPU, median | vs read + write (wall) |")
    print("|---|---|---|---|")
    for name, w in walls.items():
        print(f"| {name} | {statistics.median(w):.2f} s [{min(w):.2f}-{max(w):.2f}] | "
              f"{statistics.median(cpus[name]):.2f} s | {statistics.median(w) / statistics.median(walls[floor]):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
