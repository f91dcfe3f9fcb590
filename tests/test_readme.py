"""README.md's code runs as written, and its commands name real things."""
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert 'pip install -e ".[demo]" && python -m dora_ref demo' in text
    assert 'pip install -e ".[test,parity]" && pytest -q' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test,parity]"' in ci and "pytest -q" in ci


def test_cli_info_and_usage():
    out = subprocess.run([sys.executable, "-m", "dora_ref", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "backend:" in out
    bad = subprocess.run([sys.executable, "-m", "dora_ref", "nonsense"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown command 'nonsense'" in bad.stderr
