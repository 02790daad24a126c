"""The command line dispatcher and ``info``: JSON last line, help, errors as one line."""
import json
import subprocess
import sys

from xmipp_accel.cli.__main__ import main


def test_info_json_is_last_stdout_line(capsys):
    assert main(["info", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["numpy"] and "gpus" in summary and summary["tuning_cache"]


def test_python_dash_m_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "xmipp_accel", "info", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "xmipp_accel" in json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_command_prints_help(capsys):
    assert main([]) == 1
    assert "COMMAND" in capsys.readouterr().out
