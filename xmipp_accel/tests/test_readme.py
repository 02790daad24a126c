"""The README's commands are the ones CI runs."""
import os
import re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme, ci = _read("README.md"), _read(".ci/run")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2, "README must open with the demo and the test commands"
    test_cmd = blocks[1].strip()
    # .ci/run makes its own venv, then runs the part after the venv activation verbatim
    after_venv = test_cmd.split(". .venv/bin/activate && ", 1)[1]
    assert after_venv in ci


def test_readme_demo_command_runs_the_demo():
    readme = _read("README.md")
    first = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[0]
    assert "pip install" in first and "xmipp-accel demo" in first
