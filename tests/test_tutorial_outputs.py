"""tutorials/conftest.py fails a notebook whose stored outputs are not what it prints now.

Session 21's new user found tutorial 03 showing a gradcheck report the code no
longer gives (nbmake ran it and passed it: it does not compare outputs); six of
the nine notebooks had such cells. Here a notebook is run by pytest + nbmake
beside a copy of that conftest, in a fresh folder: stored as executed it passes,
with a word changed it fails and names the cell, and ``--overwrite`` stores what
it prints (numbers changed only pass: the masking's own test).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbmake")

ROOT = Path(__file__).resolve().parents[1]


def _conftest():
    spec = importlib.util.spec_from_file_location("tutorials_conftest",
                                                  ROOT / "tutorials" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stream(text):
    return nbformat.v4.new_output("stream", name="stdout", text=text)


def test_masked_text_hides_numbers_blanks_and_what_varies_only():
    mod = _conftest()
    a = nbformat.v4.new_code_cell("", outputs=[_stream("C kernel   10.00 ms, worst 1.79e-08 at x[3, 0]\n")])
    b = nbformat.v4.new_code_cell("", outputs=[_stream("C kernel    0.47 ms, worst -4.9E+02 at x[0, 12]\n")])
    c = nbformat.v4.new_code_cell("", outputs=[_stream("C kernel 0.47 ms, worst 4.9e-08 at A[0, 1]\n")])
    assert mod.masked_text(a) == mod.masked_text(b) == "Ckernel#ms,worst#atx[#,#]\n"
    assert mod.masked_text(a) != mod.masked_text(c)
    d = nbformat.v4.new_code_cell("", outputs=[_stream("backend: numpy | worst_output='dx' <L at 0x7f3a>")])
    e = nbformat.v4.new_code_cell("", outputs=[_stream("backend: c | worst_output='dmagnitude' <L at 0xbeef>")])
    assert mod.masked_text(d) == mod.masked_text(e) == "backend:#|worst_output=#<Lat#>"
    # NumPy's sign padding: [ 0.1 -0.2] against [-0.1 -0.2]
    f = nbformat.v4.new_code_cell("", outputs=[_stream("[ 0.1 -0.2]")])
    g = nbformat.v4.new_code_cell("", outputs=[_stream("[-0.1 -0.2]")])
    assert mod.masked_text(f) == mod.masked_text(g)
    # stderr (a warning, a library's cache folder) is not compared; stdout is
    h = nbformat.v4.new_code_cell("", outputs=[_stream("ok\n"), nbformat.v4.new_output(
        "stream", name="stderr", text="RuntimeWarning: the C extension is not built\n")])
    assert mod.masked_text(h) == "ok\n"


def test_stale_cells_pairs_cells_by_id():
    mod = _conftest()
    one = nbformat.v4.new_code_cell("print(1)", outputs=[_stream("loaded\n")])
    two = nbformat.v4.new_code_cell("print(2)", outputs=[_stream("second 2\n")])
    stored = nbformat.v4.new_notebook(cells=[one, two])
    # an editor saved the notebook while it ran: a cell added before both (ids kept)
    new = nbformat.v4.new_code_cell("x = 1")
    executed = nbformat.v4.new_notebook(cells=[new, one, two])
    assert [label for label, *_ in mod.stale_cells(stored, executed)] == [f"cell {new['id']} (not stored)"]
    changed = nbformat.v4.new_notebook(cells=[one, nbformat.v4.new_code_cell("print(2)", outputs=[
        _stream("third 2\n")])])
    changed.cells[1]["id"] = two["id"]
    assert [label for label, *_ in mod.stale_cells(stored, changed)] == [f"cell {two['id']}"]


def _run(folder, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--nbmake", "-o", "addopts=", "--rootdir", str(folder), *args,
                           str(folder / "nb.ipynb")],
                          cwd=folder, capture_output=True, text=True, timeout=300, env=env)


def test_a_stale_stored_output_fails_the_notebook(tmp_path, backend):
    if backend != "numpy":
        pytest.skip("runs pytest in a subprocess, which the backend does not reach: once is enough")
    ok, why = _conftest().comparable()
    if not ok:
        pytest.skip(f"the stored outputs are compared on a C build with OpenMP only: {why}")
    shutil.copy(ROOT / "tutorials" / "conftest.py", tmp_path / "conftest.py")
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("A notebook"),
        nbformat.v4.new_code_cell("print('norm', 3.25, 'ok')",
                                  outputs=[_stream("norm 3.25 ok\n")], execution_count=1),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

    nb.cells[1].outputs = [_stream("norm 3.25 FAILED\n")]  # the code no longer prints this
    nbformat.write(nb, path)
    proc = _run(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "1 code cell(s) print something else" in proc.stdout, proc.stdout[-3000:]
    assert f"cell {nb.cells[1]['id']}:" in proc.stdout and "FAILED" in proc.stdout
    assert "NBMAKE INTERNAL" not in proc.stdout

    assert _run(tmp_path, "--overwrite").returncode == 0  # stores what it prints now
    stored = nbformat.read(path, as_version=4).cells[1].outputs[0]["text"]
    assert stored == "norm 3.25 ok\n"
