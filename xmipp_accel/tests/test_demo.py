"""The demo: the main job on built-in data reaches a sane resolution, and the Scipion version runs
every protocol of the workflow to 'finished' (issue 8, CPU, small size)."""
import json
import os
import subprocess
import sys

import pytest

from xmipp_accel.cli.__main__ import main


def test_demo_small_reconstructs_the_phantom(tmp_path, capsys):
    assert main(["demo", "--small", "--device", "cpu", "--outdir", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 32 px at 2 Å: Nyquist is 4 Å; SNR 0.5 with 1500 particles reaches well below 12 Å
    assert 4.0 <= summary["resolution_A"] < 12.0
    assert 4.0 <= summary["resolution_vs_truth_A"] < 12.0
    for key in ("output", "half1", "half2", "fsc"):
        assert os.path.getsize(summary["reconstruct"][key]) > 0
    assert os.path.getsize(os.path.join(tmp_path, "fsc_truth.png")) > 10000


def _scipion_importable() -> bool:
    try:
        import pwem.protocols  # noqa: F401  (needs tkinter)
        return True
    except ImportError:
        return False


@pytest.mark.scipion
@pytest.mark.skipif(not _scipion_importable(), reason="Scipion (pwem with tkinter) not importable here")
def test_demo_scipion_small_runs_the_whole_workflow(tmp_path):
    env = dict(os.environ, XMIPP_ACCEL_DEVICE="cpu")
    for key in ("SCIPION_USER_DATA",):  # the demo makes its own project folder below --outdir
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "xmipp_accel", "demo", "--scipion", "--small", "--quiet",
                           "--device", "cpu", "--outdir", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    classes = [p["class"] for p in summary["protocols"]]
    for cls in ("XmippAccelProtMovieAlign", "XmippAccelProtAssignAngles", "XmippAccelProtReconstructFourier",
                "XmippAccelProtFSC", "XmippAccelProtLocalResolution"):
        assert cls in classes
    assert all(p["status"] == "finished" for p in summary["protocols"])
    assert 4.0 <= summary["resolution_A"] < 16.0
    assert os.path.isdir(summary["project"])
    for png in summary["plots"].values():
        assert os.path.getsize(png) > 10000
