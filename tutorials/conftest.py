"""The tutorials' stored outputs must say what the notebooks print today.

nbmake executes each notebook as a test (``pytest`` collects ``tutorials/``)
and fails it on an error, but it does not look at what the cells print: a
notebook whose stored outputs were left behind by a change of the library
still passed, and a reader saw outputs the code no longer gives (a new
user's finding, session 21: six of nine notebooks had such cells).

This hook takes the notebook nbmake executed and compares what each code
cell printed to stdout and its text results with the stored ones, cells
paired by their ids. Every number is masked, and so are the blanks: the
digits of a timing, a rounding error or an index drawn at random move with
the machine (the CPU, its BLAS kernels, its load); so do the backend's name,
which output of a check came closest to its tolerance and an object's
address (``_VARIES``), and stderr (warnings, a library's cache folder) and
figures are not compared. What it catches is a change of the words, the fields and the
lines a cell prints (a result's repr that gained a field, a function whose
printed source changed, a check that now prints more cases); a change of
the numbers alone it does not (tutorial 03's stale gradcheck report of this
session differed in its numbers only: stored afresh by hand). The stored
outputs are those of a C build with OpenMP (CI's); on another build (the
NumPy fallback, C without OpenMP) the notebooks print other words where they
say which they run on, so there they are run but not compared. To store
fresh outputs after a change, execute and write them back (nbmake's own
option)::

    pytest --overwrite tutorials/

on a C build with OpenMP and the default backend (the backend's name is
masked: outputs stored with ``DORA_REF_BACKEND=numpy`` would pass unseen),
then read the numbers the prose quotes against what the cells now print.
"""
from __future__ import annotations

import re

import nbformat
import pytest

# an integer, a decimal or a number in e-notation, with its sign
# (a version's dotted parts with it); not digits inside a word (float32, fc1,
# linear_r1_float64: an adversary's stale "float16" passed as float#)
_NUMBER = re.compile(r"(?<![A-Za-z_\d.])[-+]?(?:\d+(?:\.\d+)*\.?|\.\d+)(?:[eE][-+]?\d+)?")
# what else moves with the machine or the backend, not with the code: the backend's name
# (DORA_REF_BACKEND), which output of a conformance check came closest to its tolerance (a
# matter of the last bits), an object's address
_VARIES = [(re.compile(r"backend: (?:c|numpy)\b"), "backend: #"),
           (re.compile(r"worst_output='\w+'"), "worst_output=#"),
           (re.compile(r"\b0x[0-9a-fA-F]+\b"), "#")]
_BLANKS = re.compile(r"[ \t]+")  # none compared: a number's width and sign move them
_STALE = pytest.StashKey[str]()
_NOT_COMPARED = {}  # why -> notebooks run but not compared


def masked_text(cell):
    """What a code cell printed to stdout and its text results (text/plain; an error's
    name and value), numbers and what ``_VARIES`` lists masked as '#', blanks removed."""
    parts = []
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if any(key.startswith("image/") for key in out.get("data", {})):
            continue  # a figure: its text is "<Figure size ...>", or nothing (MPLBACKEND=Agg)
        if kind == "stream":
            if out.get("name") == "stdout":  # stderr: warnings, which move with the setup
                parts.append(out.get("text", ""))
        elif "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"])
        elif kind == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    text = "".join(parts)
    for pattern, mask in _VARIES:
        text = pattern.sub(mask, text)
    return _BLANKS.sub("", _NUMBER.sub("#", text))


def comparable():
    """(True, "") where the stored outputs' setup holds (a C build with OpenMP), else
    (False, why)."""
    import dora_ref

    if "c" not in dora_ref.available_backends():
        return False, "the C extension is not built (the stored outputs are a C build's)"
    from dora_ref.kernels import c as kernels_c

    if not kernels_c.openmp_enabled():
        return False, "the C extension is built without OpenMP (the stored outputs' has it)"
    return True, ""


def stale_cells(stored, executed):
    """[(label, stored text, executed text)] of code cells whose masked texts differ, paired
    by cell id (an editor that saved the notebook while it ran may have added or moved
    cells), by position where the cells have no ids or the executed notebook lacks one
    of the stored ids (a repeated id: nbformat gives the repeat a new random id at each
    read)."""
    code = [c for c in stored.cells if c.cell_type == "code"]
    ran = [c for c in executed.cells if c.cell_type == "code"]
    ran_ids = {c.get("id") for c in ran}
    if all("id" in c for c in code + ran) and all(c["id"] in ran_ids for c in code):
        by_id = {c["id"]: c for c in ran}
        stored_ids = {c["id"] for c in code}
        pairs = [(f"cell {c['id']}", c, by_id.get(c["id"])) for c in code]
        pairs += [(f"cell {c['id']} (not stored)", None, c) for c in ran
                  if c["id"] not in stored_ids]
    else:  # by position; a cell only one notebook has is paired with nothing
        pairs = [(f"code cell {k}", code[k] if k < len(code) else None,
                  ran[k] if k < len(ran) else None) for k in range(max(len(code), len(ran)))]
    empty = nbformat.v4.new_code_cell("")
    texts = [(label, masked_text(a or empty), masked_text(b or empty), a is None or b is None)
             for label, a, b in pairs]
    return [(label, a, b) for label, a, b, alone in texts if alone or a != b]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if not getattr(item, "nbmake", False):
        return (yield)
    from nbmake import pytest_items

    run_class = pytest_items.NotebookRun  # nbmake's: its execute() returns the executed notebook
    results = []

    class Capturing(run_class):
        def execute(self, *args, **kwargs):
            res = super().execute(*args, **kwargs)
            results.append(res)
            return res

    pytest_items.NotebookRun = Capturing
    try:
        outcome = yield  # raises if the notebook failed: nbmake's report says why
    finally:
        pytest_items.NotebookRun = run_class
    ok, why = comparable()
    if not ok:  # said once at the end of the run (pytest_terminal_summary)
        _NOT_COMPARED.setdefault(why, []).append(item.filename)
    if item.config.option.overwrite or not ok:
        return outcome  # its outputs were just stored, or they are another setup's
    if len(results) != 1 or getattr(results[0], "nb", None) is None:
        raise RuntimeError("tutorials/conftest.py: nbmake did not run the notebook through "
                           "nbmake.pytest_items.NotebookRun (a new nbmake?): its outputs "
                           "could not be compared")
    stored = nbformat.read(str(item.config.rootpath / item.filename), as_version=4)
    stale = stale_cells(stored, results[0].nb)
    if stale:  # reported by pytest_runtest_makereport: nbmake calls any exception its own error
        shown = "\n".join(f"{label}:\n  stored:   {a[:400]!r}\n  executed: {b[:400]!r}"
                          for label, a, b in stale[:5])
        item.stash[_STALE] = (
            f"{item.filename}: {len(stale)} code cell(s) print something else than the "
            f"notebook stores (numbers and blanks masked):\n{shown}\nStore fresh outputs with "
            f"`pytest --overwrite {item.filename}` and check the figures the prose quotes.")
    return outcome


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A notebook that ran but whose stored outputs are stale: its call phase fails."""
    report = yield
    message = item.stash.get(_STALE, None)
    if message is not None and call.when == "call" and report.passed:
        report.outcome = "failed"
        report.longrepr = message
    return report


def pytest_terminal_summary(terminalreporter):
    """Say that, and why, notebooks ran without their outputs compared (else silent)."""
    for why, names in _NOT_COMPARED.items():
        terminalreporter.write_line(
            f"tutorials: {len(names)} notebook(s) ran, their stored outputs not compared: {why}")
