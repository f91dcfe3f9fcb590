"""The tutorials' stored outputs must be what the notebooks print today.

nbmake executes each notebook as a test (``pytest`` collects ``tutorials/``)
and fails it on an error, but it does not look at what the cells print: a
notebook whose stored outputs were left behind by a change of the library
(a result's repr that gained a field, a function whose printed source
changed, a check that now reports another tolerance) still passed, and a
reader saw outputs the code no longer gives (a new user's finding, session
21: six of nine notebooks had such cells).

This hook takes the notebook nbmake executed and compares each code cell's
text output with the stored one, with every number masked (and runs of blanks made one): the digits of a
timing, a rounding error or an index drawn at random move with the machine
(the CPU, its BLAS kernels, its load), the words and the layout do not (and
the backend's name, and which output came closest to a tolerance: see
``_VARIES``), so the notebooks pass on either backend and any machine. To
store fresh outputs after a change, execute and write them back (nbmake's
own option)::

    pytest --overwrite tutorials/

then read the numbers the prose quotes against what the cells now print.
"""
from __future__ import annotations

import re

import nbformat
import pytest

# an integer, a decimal or a number in e-notation, with its sign
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# what else moves with the machine or the backend, not with the code: the backend's name
# (DORA_REF_BACKEND, or NumPy's where the C extension is not built), and which output of
# a conformance check came closest to its tolerance (a matter of the last bits)
_VARIES = [(re.compile(r"backend: (?:c|numpy)\b"), "backend: #"),
           (re.compile(r"worst_output='\w+'"), "worst_output=#")]
_SPACES = re.compile(r"[ \t]+")  # and runs of blanks as one: a number's width moves them
_STALE = pytest.StashKey[str]()


def masked_text(cell):
    """A code cell's printed text (streams and text/plain results), numbers masked as '#'
    (and what ``_VARIES`` lists), runs of blanks as one blank."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"])
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    text = "".join(parts)
    for pattern, mask in _VARIES:
        text = pattern.sub(mask, text)
    return _SPACES.sub(" ", _NUMBER.sub("#", text))


def stale_cells(stored, executed):
    """[(index, stored text, executed text)] of code cells whose masked texts differ."""
    return [(i, masked_text(a), masked_text(b))
            for i, (a, b) in enumerate(zip(stored.cells, executed.cells))
            if a.cell_type == "code" and masked_text(a) != masked_text(b)]


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
    if item.config.option.overwrite:
        return outcome  # its outputs were just stored
    if len(results) != 1 or getattr(results[0], "nb", None) is None:
        raise RuntimeError("tutorials/conftest.py: nbmake did not run the notebook through "
                           "nbmake.pytest_items.NotebookRun (a new nbmake?): its outputs "
                           "could not be compared")
    stored = nbformat.read(str(item.config.rootpath / item.filename), as_version=4)
    stale = stale_cells(stored, results[0].nb)
    if stale:  # reported by pytest_runtest_makereport: nbmake calls any exception its own error
        shown = "\n".join(f"cell {i}:\n  stored:   {a[:400]!r}\n  executed: {b[:400]!r}"
                          for i, a, b in stale[:5])
        item.stash[_STALE] = (
            f"{item.filename}: {len(stale)} code cell(s) print something else than the "
            f"notebook stores (numbers masked):\n{shown}\nStore fresh outputs with "
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
