"""The prose of the tutorials and the docs: the text a reader reads, not the code the suite runs.

Over every markdown cell of ``tutorials/*.ipynb``, every ``docs/*.md`` and
``README.md``:

* no control characters (a ``"\\times"`` written in a non-raw Python string
  is saved as a TAB followed by ``imes``, ``"\\approx"`` as a BEL followed by
  ``pprox``; tabs are refused too: nothing in this prose needs one);
* every relative link and image, and every repository path written in
  backticks (``dora_ref/core/functional.py``, ``docs/figures/...``), exists in the
  repository, and nothing points outside it (no ``../`` that leaves the
  repository, no absolute paths, no notes kept outside it such as
  ``shared/``): the repository must be self-contained;
* every LaTeX span ``$...$`` and ``$$...$$`` outside code parses with
  matplotlib's mathtext, after the few MathJax spellings that mathtext lacks
  are translated (``\\lVert`` -> ``\\Vert``, ``\\frac1k`` -> ``\\frac{1}{k}``,
  ``\\le`` -> ``\\leq``):
  an unknown command or unbalanced braces fail.
"""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# C0 controls except newline, and DEL: a TAB or BEL in prose is a mangled backslash escape
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_BLOCK = re.compile(r"```.*?```", re.S)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_MATH = re.compile(r"\$\$(.+?)\$\$|\$([^$\n]+?)\$", re.S)
# what mathtext spells differently from MathJax (GitHub and Jupyter render with MathJax)
_MATHJAX_TO_MATHTEXT = [
    (re.compile(r"\\[lr]Vert"), r"\\Vert"),
    (re.compile(r"\\[lr]vert"), r"|"),
    (re.compile(r"\\frac\s*([A-Za-z0-9])\s*([A-Za-z0-9])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\([lg]e)(?![A-Za-z])"), r"\\\1q"),
]
_BARE_PATH = re.compile(r"(?<![\w./\-])([a-z_]+)/[\w./-]*\.(?:md|py|ipynb|png|json|c|h|toml)\b")
_OUTSIDE_ROOTS = ("shared/", "/work/", "/tmp/", "/home/", "~/")  # folders beside or above a clone
_OUTSIDE = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, _OUTSIDE_ROOTS)) + ")")


def _documents():
    """(label, directory of the document, markdown text) for every document linted."""
    docs = []
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "markdown":
                src = cell["source"]
                docs.append((f"{path.relative_to(ROOT)} cell {i}", path.parent,
                             src if isinstance(src, str) else "".join(src)))
    for path in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        docs.append((str(path.relative_to(ROOT)), path.parent, path.read_text(encoding="utf-8")))
    return docs


DOCUMENTS = _documents()
IDS = [label for label, _, _ in DOCUMENTS]
# top-level folders of the repository: a backticked path starting with one of them must exist
_REPO_DIRS = sorted(p.name for p in ROOT.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and p.name not in ("build",)
                    and not p.name.endswith(".egg-info") and p.name != "__pycache__")


def _line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def control_characters(text):
    """[(line, repr of the context)] of each control character."""
    return [(_line_of(text, m.start()), repr(text[max(0, m.start() - 12):m.end() + 12]))
            for m in _CONTROL.finditer(text)]


def _expand_braces(path):
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",")
            for q in _expand_braces(path[:m.start()] + alt + path[m.end():])]


def _exists(path):
    """Whether a repository path (maybe with {a,b} or a glob *) names something in ROOT."""
    for p in _expand_braces(path):
        if "*" in p:
            if not list(ROOT.glob(p)):
                return False
        elif not (ROOT / p).exists():
            return False
    return True


def _inside_repo(path):
    try:
        path.resolve().relative_to(ROOT)
        return True
    except ValueError:
        return False


def bad_references(text, directory):
    """[(line, problem)] for links and paths that do not exist or leave the repository."""
    problems = []
    prose = _CODE_BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in _LINK.finditer(prose):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same document
        path = target.split("#")[0]
        full = directory / path
        if path.startswith("/") or not _inside_repo(full):
            problems.append((_line_of(prose, m.start()), f"link {target!r} leaves the repository"))
        elif not full.exists():
            problems.append((_line_of(prose, m.start()), f"link {target!r} does not exist"))
    for m in _CODE_SPAN.finditer(text):
        span = m.group(1).strip()
        first = span.split("/")[0]
        if "/" in span and " " not in span and first in _REPO_DIRS and not _exists(span.rstrip("/")):
            problems.append((_line_of(text, m.start()), f"path `{span}` does not exist"))
    # a file path written in plain prose, e.g. "see docs/porting.md, section 3"
    bare = _LINK.sub(lambda m: " " * len(m.group(0)), _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), prose))
    for m in _BARE_PATH.finditer(bare):
        if m.group(1) in _REPO_DIRS and not (ROOT / m.group(0)).exists():
            problems.append((_line_of(bare, m.start()), f"path {m.group(0)!r} does not exist"))
    for m in _OUTSIDE.finditer(text):
        problems.append((_line_of(text, m.start()),
                         f"refers to {m.group(1)!r}, outside the repository: "
                         f"{text[max(0, m.start() - 20):m.end() + 30]!r}"))
    return problems


def math_spans(text):
    """(line, LaTeX source) of each $...$ / $$...$$ span outside code."""
    prose = _CODE_BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    prose = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), prose)
    return [(_line_of(prose, m.start()), m.group(1) if m.group(1) is not None else m.group(2))
            for m in _MATH.finditer(prose)]


def math_errors(text):
    """[(line, span, error)] for each span mathtext cannot parse."""
    from matplotlib.mathtext import MathTextParser

    parser = MathTextParser("agg")
    errors = []
    for line, span in math_spans(text):
        tex = span.replace("\n", " ")
        for pattern, repl in _MATHJAX_TO_MATHTEXT:
            tex = pattern.sub(repl, tex)
        try:
            parser.parse(f"${tex}$", dpi=72)
        except ValueError as e:  # pyparsing's errors reach us as ValueError
            errors.append((line, span, str(e).strip().splitlines()[-1]))
    return errors


@pytest.mark.parametrize("label, directory, text", DOCUMENTS, ids=IDS)
def test_no_control_characters(label, directory, text):
    found = control_characters(text)
    assert not found, f"{label}: control characters (a backslash escape eaten by a non-raw string?): {found}"


@pytest.mark.parametrize("label, directory, text", DOCUMENTS, ids=IDS)
def test_links_and_paths_exist_in_the_repository(label, directory, text):
    found = bad_references(text, directory)
    assert not found, f"{label}: {found}"


@pytest.mark.parametrize("label, directory, text", DOCUMENTS, ids=IDS)
def test_latex_parses(label, directory, text):
    pytest.importorskip("matplotlib")
    found = math_errors(text)
    assert not found, f"{label}: LaTeX that does not parse: {found}"


# the checks themselves, on the errors they exist for


def test_lint_catches_a_mangled_times_and_approx():
    mangled = "about $5\times10^{-7}$, $u \approx 6\times10^{-8}$"  # not raw: TAB and BEL
    assert len(control_characters(mangled)) == 3
    assert control_characters(r"about $5\times10^{-7}$, $u \approx 6\times10^{-8}$") == []


def test_lint_catches_links_outside_and_missing_paths():
    tutorials = ROOT / "tutorials"
    for root in _OUTSIDE_ROOTS:
        assert bad_references(f"see `{root}notes.md`", tutorials), root
    assert bad_references("[notes](../../outside_the_repository/x.md)", tutorials)
    assert bad_references("[gone](../docs/no_such_page.md)", tutorials)
    assert bad_references("`dora_ref/no_such_module.py`", tutorials)
    assert bad_references("see docs/no_such_page.md, section 3", tutorials)
    assert not bad_references("[PEFT](../docs/peft_dora.md) and `dora_ref/core/functional.py`, "
                              "`benchmarks/results/bench_kernels.{md,json,png}`, "
                              "[paper](https://arxiv.org/abs/2402.09353)", tutorials)


def test_lint_catches_latex_that_does_not_parse():
    pytest.importorskip("matplotlib")
    assert math_errors(r"$\frac{1}{2$") and math_errors(r"$\nosuchcommand x$")
    assert math_errors(r"$x^{\top$")
    assert not math_errors(r"$\lVert W\rVert_c$ and $$\Delta M = \frac1k \sum_n |m_n|$$, $a \le b$")
    assert math_errors(r"$a \lef b$")
    assert not math_errors("price `$5` and ```\n$\\oops$\n```")  # code is not math
