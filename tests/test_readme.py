"""README.md's code runs as written, and its commands name real things."""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    """Every python block compiles; every block not marked as an illustration runs."""
    blocks = re.findall(r"(<!-- illustration[^>]*-->\n)?```python\n(.*?)```", README.read_text(), re.S)
    assert sum(not marker for marker, _ in blocks) >= 2, "README.md lost its runnable examples"
    for marker, block in blocks:
        code = compile(block, str(README), "exec")
        if not marker:
            exec(code, {})


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert 'pip install -e ".[demo]" && python -m dora_ref demo' in text
    assert 'pip install -e ".[test,parity]" && pytest -q' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test,parity]"' in ci and "pytest -q" in ci
    # CI turns the skips that could hide a broken install into failures
    for flag in ("DORA_REF_REQUIRE_C=1", "DORA_REF_REQUIRE_PARITY=1", "DORA_REF_REQUIRE_OPENMP=1"):
        assert f"export {flag}" in ci, flag


def test_readme_testing_commands_name_real_files():
    text = README.read_text()
    for path in ("tests/mutation/run_mutations.py", "tests/data/make_reference_values.py"):
        assert f"python {path}" in text or f"`{path}`" in text, path
        assert (README.parent / path).is_file(), path


def test_cli_info_and_usage():
    out = subprocess.run([sys.executable, "-m", "dora_ref", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "backend:" in out
    bad = subprocess.run([sys.executable, "-m", "dora_ref", "nonsense"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown command 'nonsense'" in bad.stderr


def test_cli_names_a_folder_that_shadows_the_package(monkeypatch, capsys, tmp_path):
    """New-user finding: run from the folder holding a clone named dora_ref, Python imports
    that folder as a namespace package, and 'dora-ref info' died of an AttributeError
    ('vectors' blamed a missing extra). The command now names the folder and the fix."""
    import types

    from dora_ref import cli

    shadow = types.ModuleType("dora_ref")  # what a namespace import gives: no __file__
    shadow.__path__ = [str(tmp_path / "dora_ref")]
    monkeypatch.setitem(sys.modules, "dora_ref", shadow)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "dora_ref") in err and "another directory" in err


def test_cli_output_into_a_closed_pipe_ends_quietly():
    """Found by session 8's new user: ``dora-ref info | head -2`` ended with a
    BrokenPipeError traceback. The reader here closes its end before the command
    writes: status 1, and nothing on stderr but what the command printed itself."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "dora_ref", "info"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


@pytest.mark.parametrize("stdout", ["closed", "dev-full"])
def test_cli_output_with_stdout_closed_or_on_a_full_disk_has_no_traceback(stdout):
    """Found by session 9's adversary: ``dora-ref info >&-`` ended with
    ``AttributeError: 'NoneType' object has no attribute 'flush'`` (Python sets
    sys.stdout to None when fd 1 is closed) and ``dora-ref info > /dev/full``
    with an OSError traceback. Now: nothing to write to, status 0; a full disk,
    one line and status 1."""
    import os

    if stdout == "dev-full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    cmd = f"{shlex.quote(sys.executable)} -m dora_ref info " + (">&-" if stdout == "closed" else "> /dev/full")
    done = subprocess.run(["sh", "-c", cmd], stderr=subprocess.PIPE, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    if stdout == "closed":
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 1 and done.stderr.startswith("dora-ref: error: [Errno 28]"), done.stderr

def test_cli_info_names_the_machine_kind():
    """New-user finding (session 6): the README labels timings by machine kind (AVX2 Zen 3,
    AVX-512 Zen 4) but ``lscpu`` said only "AMD EPYC"; ``dora-ref info`` now names the CPU's
    family, model and vector level, read from /proc/cpuinfo (the first processor's entry)."""
    from dora_ref.cli import _cpu_summary

    zen3 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512f\n")
    assert _cpu_summary(zen3) == ("cpu: AMD EPYC (family 25 model 1), "
                                  "AVX2 + FMA (x86-64-v3), no AVX-512; "
                                  "the README's tables call it \"AMD EPYC Zen 3\"")
    zen4 = zen3.replace("model\t\t: 1", "model\t\t: 17").replace(
        "bmi2", "bmi2 avx512f avx512dq avx512cd avx512bw avx512vl")
    assert _cpu_summary(zen4) == ("cpu: AMD EPYC (family 25 model 17), AVX-512 (x86-64-v4); "
                                  "the README's tables call it \"AMD EPYC Zen 4\"")
    xeon = ("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
            "model name\t: Intel(R) Xeon(R) CPU\nflags\t\t: avx2 fma avx512f avx512dq avx512cd "
            "avx512bw avx512vl\n")
    assert _cpu_summary(xeon).endswith("the README's tables call it \"Intel Xeon\"")
    # a kind the README has no column for is named by its numbers only
    other = zen4.replace("cpu family\t: 25", "cpu family\t: 26")
    assert _cpu_summary(other) == "cpu: AMD EPYC (family 26 model 17), AVX-512 (x86-64-v4)"
    assert "README" not in _cpu_summary(zen4.replace("AuthenticAMD", "HygonGenuine"))
    only_f = zen3.replace("bmi2", "bmi2 avx512f")  # AVX-512F alone: the v4 clones do not run
    assert "x86-64-v3" in _cpu_summary(only_f)
    assert _cpu_summary("model name\t: old\nflags\t\t: sse2\n") == "cpu: old, no AVX2"
    assert _cpu_summary("no such fields") is None


def test_cli_info_names_the_git_commit_of_the_code(tmp_path, monkeypatch):
    """Session 16: the README labels figures by version ("this version", ...); ``dora-ref
    info`` names the git commit of the checkout the package was imported from, says when
    tracked files differ from it, and says plainly when there is no checkout or no git."""
    import shutil

    from dora_ref.cli import _source_summary

    pkg = tmp_path / "repo" / "dora_ref"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    assert _source_summary(str(pkg)) == (
        "source: not a git checkout (an installed copy, or a folder without .git)")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = str(tmp_path / "repo")
    git = ["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t", "-c",
           "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", repo], check=True)
    assert _source_summary(str(pkg)).startswith(  # no commit yet: rev-parse HEAD fails
        f"source: a git checkout at {repo}; git failed: ")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "one"], check=True)
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert _source_summary(str(pkg)) == f"source: git commit {head[:12]} ({repo})"
    (tmp_path / "repo" / "notes.txt").write_text("")  # untracked outside the package: not code
    assert _source_summary(str(pkg)) == f"source: git commit {head[:12]} ({repo})"
    (pkg / "extra.py").write_text("")  # untracked in the package: code no commit holds
    assert _source_summary(str(pkg)) == (
        f"source: git commit {head[:12]}, with untracked files in the package ({repo})")
    (pkg / "__init__.py").write_text("x = 2\n")
    assert _source_summary(str(pkg)) == (
        f"source: git commit {head[:12]}, with uncommitted changes to tracked files and "
        f"untracked files in the package ({repo})")
    (pkg / "extra.py").unlink()
    (pkg / "__init__.py").write_text("x = 1\n")
    # the second adversary's cases: the caller's GIT_DIR / GIT_WORK_TREE / GIT_INDEX_FILE
    # named another repository or a false change; a copy of the package inside another
    # repository, or an empty .git folder beside it inside one, named that repository's commit
    other = str(tmp_path / "other")
    subprocess.run(["git", "init", "-q", other], check=True)
    subprocess.run(["git", "-C", other, "-c", "user.name=t", "-c", "user.email=t@t", "-c",
                    "commit.gpgsign=false", "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    monkeypatch.setenv("GIT_DIR", os.path.join(other, ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", other)
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "no-such-index"))
    assert _source_summary(str(pkg)) == f"source: git commit {head[:12]} ({repo})"
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var)
    inner = tmp_path / "other" / "sub" / "dora_ref"
    inner.mkdir(parents=True)
    (inner / "__init__.py").write_text("")
    (inner.parent / ".git").mkdir()  # empty: git looks upward and finds "other"
    assert _source_summary(str(inner)).startswith("source: not a git checkout")
    assert not (tmp_path / "repo" / ".git" / "index.lock").exists()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git on PATH
    assert _source_summary(str(pkg)) == (
        f"source: a git checkout at {repo}; git could not be run (FileNotFoundError)")
