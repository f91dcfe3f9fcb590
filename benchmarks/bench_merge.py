"""``dora-ref merge`` against PEFT, a plain safetensors read + write, and ``cp -r``.

Not a test: a script that builds a Llama-shaped bf16 model with random
weights (transformers ``LlamaConfig``: 6 layers, hidden 2048, intermediate
4480, vocabulary 32000, untied head: 397 M parameters, 794 MB, saved with
``save_pretrained`` into a temporary directory) and a PEFT DoRA adapter on
all seven projections (r = 16, lora_B and the magnitude randomised so the
merge is not the identity), then times, each as a fresh subprocess, in
interleaved rounds:

* ``dora-ref merge BASE ADAPTER OUT`` (this checkout's dora_ref);
* PEFT: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained``
  + ``merge_and_unload()`` + ``save_pretrained`` (bf16, PyTorch CPU);
* a plain read + write of the same files with ``safetensors.torch``
  (``load_file`` + ``save_file``), the floor a merge that must read and
  write every byte can approach; its in-process time (imports excluded) too;
  and the same with every file and the directory flushed to disk (fsync)
  at the end, as ``dora-ref merge`` does before it moves OUT into place (so
  that a power cut leaves OUT absent or complete): the floor of a crash-safe
  writer, which waits for the disk;
* ``cp -r``.

Wall time is the subprocess's, start to exit (interpreter start and imports
included, as a user sees it); CPU time its user + system time over all its
threads (the work itself: on a busy machine steadier than the wall time,
though a parallel region waiting on a busy core shows only in the wall
time); peak RSS is the subprocess's own ``ru_maxrss``
(``os.wait4``). Linux folds the peak of the forking parent's memory into a
child's ``ru_maxrss`` at exec, so this script stays small (the model is
built in a subprocess, the page cache warmed with ``cat``) and prints its own
peak: no child can show less. The base is read once beforehand so every run reads it from
the page cache. The machine's load (``uptime``) is printed before and after:
on a shared machine the ratios, measured side by side, are what to compare.

Run ``python benchmarks/bench_merge.py`` (about 5 minutes; PEFT takes most)
or ``--quick`` (a 2-layer model of a few MB: a check that everything runs; the merge itself
takes about a second, but PEFT's rounds, torch's import and load mostly, take 10-20 s each, so
``--quick --compare`` ran 74 s for a new user on the shared Zen 3 machine at load average 3.6-5.2;
``--small`` is the old name). ``--rounds N`` repeats the
interleaved round (default 2); ``--no-peft`` skips PEFT; ``--baseline CHECKOUT``
also times another checkout's ``dora-ref merge`` in the same rounds (an A/B). ``--compare`` keeps
the last round's dora-ref and PEFT outputs and compares the first layer's
seven merged projections bit by bit, and each with the float64 merge rounded
once to bf16 (ties to even): how many values differ, and which side holds
the correctly rounded value.

Back to back, each command mostly gets memory the previous one has just
freed. On a virtual machine with free page reporting (the first line says)
fresh memory can be much slower to touch; ``bench_merge_cold.py`` times the
merge and the read + write in that state.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # this checkout's dora_ref, not an installed one

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

READ_WRITE = """
import os, sys, time
from pathlib import Path
t0 = time.perf_counter()
from safetensors import safe_open
from safetensors.torch import load_file, save_file
t1 = time.perf_counter()
base, out, durable = Path(sys.argv[1]), Path(sys.argv[2]), len(sys.argv) > 3
out.mkdir()
for f in sorted(base.glob("*.safetensors")):
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    save_file(load_file(str(f)), str(out / f.name), metadata=meta)
    if durable:  # what dora-ref merge does before it installs OUT: each file on disk
        fd = os.open(out / f.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
if durable:  # and the directory's entries
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
print(f"{time.perf_counter() - t1:.4f} {t1 - t0:.4f}")
"""


# the same read + write, then each file and the directory flushed to disk (fsync), as dora-ref
# merge does before it moves OUT into place: the floor of a writer that is crash safe
DURABLE = "read + write + fsync (safetensors.torch)"
STARTUP = "python -c 'import numpy' (startup)"


def build(directory, small):
    """Save the base model and the DoRA adapter; return (base dir, adapter dir, largest tensor bytes).

    Run in its own process (``--build``): a parent holding the model would
    lend its resident pages to every child it forks, and their peak RSS
    would start from it.
    """
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dims = dict(hidden_size=512, intermediate_size=1120, num_hidden_layers=2, vocab_size=4000) if small else dict(
        hidden_size=2048, intermediate_size=4480, num_hidden_layers=6, vocab_size=32000)  # fmt: skip
    config = LlamaConfig(num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, **dims)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = directory / "base"
    model.save_pretrained(base)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    adapter = directory / "adapter"
    peft_model.save_pretrained(adapter)
    return base, adapter, largest


def build_in_subprocess(directory, small):
    cmd = [sys.executable, __file__, "--build", str(directory)] + (["--small"] if small else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    largest = int(out.strip().split()[-1])
    return directory / "base", directory / "adapter", largest


def compare(base, adapter, ours, theirs):
    """Lines comparing dora-ref's and PEFT's merged bf16 values with the float64 merge rounded once."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    def bf16(t):
        return t.view(torch.int16).numpy().view(np.uint16)

    def round_once(x):  # float64 -> the nearest bf16 (8 significant bits), ties to even; as bits
        mant, exp = np.frexp(x)
        y = np.ldexp(np.round(mant * 256.0), exp - 8).astype(np.float32)  # exact: 8 bits fit
        return (y.view(np.uint32) >> 16).astype(np.uint16)

    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    W = load_file(str(base / "model.safetensors"))
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    ours_t, theirs_t = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    total = differ = ours_right = theirs_right = ours_wrong = 0
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        sub = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"model.layers.0.{sub}.{proj}"
        W0 = W[key + ".weight"].double().numpy()
        A = ad[f"base_model.model.{key}.lora_A.weight"].double().numpy()
        B = ad[f"base_model.model.{key}.lora_B.weight"].double().numpy()
        m = ad[f"base_model.model.{key}.lora_magnitude_vector"].double().numpy()
        V = W0 + scaling * (B @ A)
        once = round_once((m / np.linalg.norm(V, axis=1))[:, None] * V)
        a, b = bf16(ours_t[key + ".weight"]), bf16(theirs_t[key + ".weight"])
        d = a != b
        total += a.size
        differ += int(d.sum())
        ours_right += int((a == once)[d].sum())
        theirs_right += int((b == once)[d].sum())
        ours_wrong += int((a != once).sum())
    return [
        f"layer 0's seven projections: {total} merged bf16 values; dora-ref and PEFT differ in {differ}; "
        f"of those, dora-ref holds the float64 merge rounded once in {ours_right}, PEFT in {theirs_right}",
        f"dora-ref differs from the float64 merge rounded once in {ours_wrong} of {total} values "
        f"({ours_wrong / total:.1e}; near rounding ties the float32 arithmetic's error decides the side)",
    ]


def run(cmd, env=None):
    """(wall seconds, CPU seconds (user + system, all threads), peak RSS bytes, stdout) of a subprocess.

    Raises if it fails. On a busy machine the wall time depends on what else
    runs; the CPU time is the work itself, a steadier figure to compare.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out = proc.stdout.read()
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # a SIGTERM / Ctrl-C of this script: the child goes too, then its files
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, out.decode()


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = open("/proc/cpuinfo").read()
    simd = "avx512f" if " avx512f" in flags else "avx2" if " avx2" in flags else "neither avx2 nor avx512f"
    return f"{model}, {os.cpu_count()} cores, {simd}, free page reporting: {free_page_reporting()}"


def free_page_reporting():
    """'yes' if a virtio balloon offers free page reporting (feature bit 5), else 'no' or 'unknown'.

    With it the host takes back guest memory some seconds after it is
    freed, and the next first touch of such a page is a trip to the host:
    fresh memory, a process's or a new file's page cache, can cost seconds
    per GB (see ``bench_merge_cold.py``).
    """
    try:
        for dev in Path("/sys/bus/virtio/devices").iterdir():
            if (dev / "device").read_text().strip() == "0x0005":  # the balloon
                bits = (dev / "features").read_text().strip()
                return "yes" if len(bits) > 5 and bits[5] == "1" else "no"
        return "no"
    except OSError:
        return "unknown"


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _positive_int(text):
    """argparse type of --rounds: at least one round (0 built the model, then failed on
    the medians of no rounds: an adversary's case). Not ``bench_busy.positive_arg``: that
    module imports NumPy and dora_ref, and this script keeps its own memory small (a
    child's peak RSS includes the parent's at exec)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _exit_on_signal(signum, frame):
    """SIGTERM / SIGHUP as SystemExit: the temporary folder (about 1.6 GB for the full
    model: base, adapter, outputs) is removed on the way out, as after a Ctrl-C (killed
    by SIGTERM, the script left its bench-merge-* folder behind: an audit, session 21)."""
    raise SystemExit(128 + signum)


def main(argv=None):
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", "--small", dest="small", action="store_true",
                    help="a 2-layer model of a few MB: a check that everything runs (the merge takes about "
                         "a second; with PEFT, about a minute)")
    ap.add_argument("--rounds", type=_positive_int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT (the slowest)")
    ap.add_argument("--compare", action="store_true", help="compare dora-ref's merged bits with PEFT's")
    ap.add_argument("--baseline", metavar="CHECKOUT", action="append", default=[],
                    help="also time 'dora-ref merge' of another checkout of dora_ref (its extension built), "
                         "in the same interleaved rounds: an A/B on a shared machine (repeatable)")
    ap.add_argument("--results", default=None, help="write a markdown table here (default: print only)")
    ap.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: build the model here
    args = ap.parse_args(argv)
    if args.build:
        print(build(Path(args.build), args.small)[2])
        return 0

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    print(f"machine: {machine()}")
    print(f"load before: {uptime()}")
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        tmp = Path(tmp)
        base, adapter, largest = build_in_subprocess(tmp, args.small)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"model: {size / 1e6:.0f} MB of bf16 safetensors in {len(list(base.glob('*.safetensors')))} file(s); "
              f"largest tensor {largest / 1e6:.0f} MB")  # fmt: skip
        for f in base.iterdir():  # into the page cache, for every method alike (not via this process:
            subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)  # see below)
        methods = {
            "dora-ref merge": [sys.executable, "-m", "dora_ref", "merge", str(base), str(adapter), "{out}", "--no-progress"],
            "read + write (safetensors.torch)": [sys.executable, "-c", READ_WRITE, str(base), "{out}"],
            DURABLE: [sys.executable, "-c", READ_WRITE, str(base), "{out}", "fsync"],
            "cp -r": ["cp", "-r", str(base), "{out}"],
            STARTUP: [sys.executable, "-c", "import numpy"],
        }
        envs = {}
        for checkout in args.baseline:
            name = f"dora-ref merge, baseline {checkout}"
            methods[name] = methods["dora-ref merge"]
            envs[name] = dict(env, PYTHONPATH=os.pathsep.join([str(Path(checkout).resolve()),
                                                                os.environ.get("PYTHONPATH", "")]))
        if not args.no_peft:
            methods["PEFT merge_and_unload"] = [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), "{out}"]
        times = {name: [] for name in methods}
        rss = {name: [] for name in methods}
        cpu = {name: [] for name in methods}
        inner = []
        kept = {"dora-ref merge": tmp / "cmp_dora_ref", "PEFT merge_and_unload": tmp / "cmp_peft"}
        for i, checkout in enumerate(args.baseline):  # the checkouts' outputs are compared byte for byte
            kept[f"dora-ref merge, baseline {checkout}"] = tmp / f"cmp_baseline_{i}"
        for round_ in range(args.rounds):
            for name, cmd in methods.items():
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                if round_ == args.rounds - 1 and name in kept and (args.compare or args.baseline and "dora" in name):
                    out = kept[name]
                wall, cpu_s, peak, stdout = run([c.replace("{out}", str(out)) for c in cmd], envs.get(name, env))
                cpu[name].append(cpu_s)
                times[name].append(wall)
                rss[name].append(peak)
                if name == "read + write (safetensors.torch)":
                    inner.append(float(stdout.split()[0]))
                print(f"  round {round_ + 1}: {name:<34} {wall:7.2f} s  CPU {cpu_s:6.2f} s  peak RSS {peak / 1e6:6.0f} MB",
                      flush=True)
        shutil.rmtree(tmp / "out", ignore_errors=True)
        after = uptime()
        compared = compare(base, adapter, kept["dora-ref merge"], kept["PEFT merge_and_unload"]) if (
            args.compare and not args.no_peft) else []
        for checkout in args.baseline:
            ours, theirs = kept["dora-ref merge"], kept[f"dora-ref merge, baseline {checkout}"]
            files = sorted(p.name for p in ours.iterdir())
            same = files == sorted(p.name for p in theirs.iterdir()) and all(
                filecmp.cmp(ours / f, theirs / f, shallow=False) for f in files)
            compared.append(f"this checkout's and {checkout}'s outputs are "
                            f"{'byte for byte the same' if same else 'DIFFERENT'} ({len(files)} files)")
    import resource

    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"load after: {after}; this script's own peak RSS (a floor for every child's): {parent_peak / 1e6:.0f} MB")

    med = {name: statistics.median(v) for name, v in times.items()}
    peak = {name: max(v) for name, v in rss.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    floor = med["read + write (safetensors.torch)"]
    # the strict floor: the read + write itself (no torch import) plus what any NumPy program pays to start
    strict = statistics.median(inner) + med[STARTUP]
    lines = [
        f"machine: {machine()}; model {size / 1e6:.0f} MB bf16, largest tensor {largest / 1e6:.0f} MB",
        f"load before/after: see the run log; after: {after}",
        "",
        "| method | wall (median of %d) | vs read + write | CPU, user + sys (median) | vs read + write "
        "| peak RSS | RSS / largest tensor |" % args.rounds,
        "|---|---|---|---|---|---|---|",
    ]
    cpu_floor = med_cpu["read + write (safetensors.torch)"]
    for name in methods:
        lines.append(f"| {name} | {med[name]:.2f} s | {med[name] / floor:.2f}x | {med_cpu[name]:.2f} s | "
                     f"{med_cpu[name] / cpu_floor:.2f}x | {peak[name] / 1e6:.0f} MB | {peak[name] / largest:.2f} |")  # fmt: skip
    lines.append(f"| read + write, in-process (imports excluded) | {statistics.median(inner):.2f} s | "
                 f"{statistics.median(inner) / floor:.2f}x | | | | |")  # fmt: skip
    lines.append(f"| strict floor: in-process read + write + NumPy startup | {strict:.2f} s | {strict / floor:.2f}x "
                 f"| | | | |")  # fmt: skip
    lines.append("")
    summary = [f"dora-ref merge / read + write: {med['dora-ref merge'] / floor:.2f} wall, "
               f"{med_cpu['dora-ref merge'] / cpu_floor:.2f} CPU (goal <= 1.1); "
               f"/ strict floor: {med['dora-ref merge'] / strict:.2f}; "
               f"/ read + write + fsync: {med['dora-ref merge'] / med[DURABLE]:.2f} wall",
               f"peak RSS / largest tensor: {peak['dora-ref merge'] / largest:.2f} "
               + (f"(the goal, <= 3, is the full model's: on --quick's few-MB tensors a NumPy "
                  f"process's own RSS, {peak[STARTUP] / 1e6:.0f} MB for the startup row above, is most of it)"
                  if args.small else "(goal <= 3)")]
    for checkout in args.baseline:
        base_name = f"dora-ref merge, baseline {checkout}"
        summary.append(f"dora-ref merge / {checkout}: {med['dora-ref merge'] / med[base_name]:.2f} wall (median), "
                       f"{min(times['dora-ref merge']) / min(times[base_name]):.2f} (fastest), "
                       f"{med_cpu['dora-ref merge'] / med_cpu[base_name]:.2f} CPU; baseline / read + write "
                       f"{med[base_name] / floor:.2f}, peak RSS / largest {peak[base_name] / largest:.2f}")
    if "PEFT merge_and_unload" in med:
        summary.insert(0, f"PEFT / dora-ref merge: {med['PEFT merge_and_unload'] / med['dora-ref merge']:.1f}x wall, "
                          f"{med_cpu['PEFT merge_and_unload'] / med_cpu['dora-ref merge']:.1f}x CPU (goal >= 6)")
    lines.append("; ".join(summary))
    lines += [""] + compared if compared else []
    print("\n".join(lines))
    if args.results:
        Path(args.results).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
