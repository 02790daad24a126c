"""``benchmarks/movies_side_by_side.py``: MotionCor3's output parsed, and a small run of all three programs.

MotionCor3 cannot run here (no GPU), so its output is checked on text written by hand from the format
strings in its source (MotionCor3 1.2.1, czimaginginstitute/MotionCor3):

* ``<LogDir><stem>-Full.log`` (``Align/CFullAlign.cpp``, ``CFullAlign::LogShift``): the line
  ``"# full frame alignment\\n"`` then one row per frame, ``"%4d  %8.2f  %8.2f\\n"`` (1-based frame, x, y px);
* ``<LogDir><stem>-Patch-Full.log`` (``Align/CPatchShifts.cpp``, ``CPatchShifts::LogFullShifts``): the lines
  ``"# Patch based alignment\\n"``, ``"# Initial alignment based upon full frames\\n\\n"``, then the same rows;
* ``stem`` is the input file name cut at ``.mrc`` (``Align/CAlignMain.cpp``, ``mCreateLogFile``);
* stdout: ``"*** %s: loaded in %.2f seconds.\\n\\n"`` (``MrcUtil/CLoadCryoEMStack.cpp``),
  ``"Computation time: %f sec\\n\\n"`` (``CProcessThread.cpp``), ``"Save image sums: %.2f sec\\n\\n"``
  (``MrcUtil/CSaveSingleCryoEM.cpp``; the batch mode's saver, ``CSaveSerialCryoEM.cpp``, prints no time),
  ``"Patch alignment time: %.2f(sec)\\n\\n"`` (``Align/CPatchAlign.cpp``),
  ``"Total time: %f sec\\n"`` (``CMotionCor3.cpp``).

The end-to-end test runs the script on 2 small movies with RELION, ours on the CPU and a stand-in for
MotionCor3 that consumes the same flags and writes those formats from the truth (relative to the central
frame, as MotionCor3's default reference): it checks the whole MotionCor3 path of the script (flags,
file names, parsing, scoring) but not MotionCor3 itself.
"""
from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest

from benchmarks.movies_side_by_side import (drift_scales, main, mc3_command, mc3_log_file, parse_mc3_shift_log,
                                            parse_mc3_stdout)
from xmipp_accel.tests.relion_peer import relion_program

PATCH_FULL_LOG = (
    "# Patch based alignment\n"
    "# Initial alignment based upon full frames\n"
    "\n"
    "   1     -3.21      1.50\n"
    "   2     -1.60      0.75\n"
    "   3      0.00      0.00\n"
    "   4      1.07     -0.52\n"
)
FULL_LOG = (
    "# full frame alignment\n"
    "   2     12.34    -56.78\n"      # rows out of order: sorted by frame
    "   1    -12.34    123.45\n"
)
STDOUT = (
    "Full-frame alignment shift\n"
    "...... Frame (  1) shift:    -3.210      1.500\n\n"
    "*** m0.mrcs: loaded in 1.82 seconds.\n\n"
    "Patch alignment time: 0.85(sec)\n\n"
    "Computation time: 1.234567 sec\n\n"
    "Save image sums: 0.31 sec\n\n"
    "*** m1.mrcs: loaded in 1.79 seconds.\n\n"
    "Computation time: 1.200000 sec\n\n"
    "Save image sums: 0.29 sec\n\n"
    "Total time: 9.876543 sec\n"
)


def test_parse_shift_logs():
    s = parse_mc3_shift_log(PATCH_FULL_LOG)
    np.testing.assert_array_equal(s, [[-3.21, 1.50], [-1.60, 0.75], [0.0, 0.0], [1.07, -0.52]])
    np.testing.assert_array_equal(parse_mc3_shift_log(FULL_LOG), [[-12.34, 123.45], [12.34, -56.78]])
    with pytest.raises(ValueError):
        parse_mc3_shift_log("# full frame alignment\n")
    with pytest.raises(ValueError):                     # frame 2 missing
        parse_mc3_shift_log("# full frame alignment\n   1  0.00  0.00\n   3  1.00  1.00\n")


def test_parse_stdout():
    t = parse_mc3_stdout(STDOUT)
    assert t["load_s"] == [1.82, 1.79] and t["loaded_files"] == ["m0.mrcs", "m1.mrcs"]
    assert t["compute_s"] == [1.234567, 1.2] and t["save_s"] == [0.31, 0.29] and t["patch_align_s"] == [0.85]
    assert t["total_s"] == 9.876543
    assert parse_mc3_stdout("nothing")["total_s"] is None


def test_log_file_names(tmp_path):
    (tmp_path / "m7-Patch-Full.log").write_text(PATCH_FULL_LOG)
    (tmp_path / "m8-Full.log").write_text(FULL_LOG)
    assert mc3_log_file(str(tmp_path), "/x/Movies/m7.mrcs") == str(tmp_path / "m7-Patch-Full.log")
    assert mc3_log_file(str(tmp_path), "/x/Movies/m8.mrc") == str(tmp_path / "m8-Full.log")
    assert mc3_log_file(str(tmp_path), "/x/Movies/m9.mrcs") is None
    cmd = mc3_command("MotionCor3", "/w", "/w/out", 0)
    assert cmd[cmd.index("-Patch") + 1:cmd.index("-Patch") + 3] == ["5", "5"]
    assert cmd[cmd.index("-LogDir") + 1].endswith("/")       # MotionCor3 appends the stem to it as is
    one = mc3_command("MotionCor3", "/w", "/w/out", 0, movie="/w/Movies/m3.mrcs")
    assert one[one.index("-InMrc") + 1] == "/w/Movies/m3.mrcs" and one[one.index("-Serial") + 1] == "0"
    assert one[one.index("-OutMrc") + 1] == "/w/out/m3.mrc" and "-InSuffix" not in one


def test_drifts_distinct():
    s = drift_scales(20)
    assert len(np.unique(np.round(s, 6))) == 20 and np.all(np.abs(s) >= 0.6) and np.all(np.abs(s) <= 1.6)
    assert (s > 0).any() and (s < 0).any()


FAKE_MC3 = '''#!{python}
"""Stand-in for MotionCor3 (-Serial 0 or 1): consumes its flags, writes its log and stdout formats from the truth."""
import json, os, sys
args = sys.argv[1:]
def val(tag, k=1):
    i = args.index(tag)
    return args[i + 1:i + 1 + k]
assert val("-Serial") in (["0"], ["1"]) and val("-Patch", 2) == ["5", "5"] and val("-OutStack") == ["0"]
assert float(val("-FmDose")[0]) > 0 and float(val("-PixSize")[0]) > 0
folder, prefix = os.path.split(val("-InMrc")[0])
log_dir = val("-LogDir")[0]
suffix = val("-InSuffix")[0] if val("-Serial") == ["1"] else prefix
for name in sorted(os.listdir(folder)):
    if not (name.startswith(prefix) and name.endswith(suffix)):
        continue
    stem = name[:name.lower().find(".mrc")]
    g = json.load(open(os.path.join(os.path.dirname(folder), "Truth", stem + ".json")))["global_shifts_px"]
    ref = g[len(g) // 2]
    print("*** %s: loaded in %.2f seconds.\\n" % (name, 0.5))
    print("Computation time: %f sec\\n" % 1.25)
    with open(log_dir + stem + "-Patch-Full.log", "w") as f:
        f.write("# Patch based alignment\\n# Initial alignment based upon full frames\\n\\n")
        for i, (x, y) in enumerate(g):
            f.write("%4d  %8.2f  %8.2f\\n" % (i + 1, x - ref[0], y - ref[1]))
    print("Save image sums: %.2f sec\\n" % 0.25)
print("Total time: %f sec" % 3.0)
'''


def test_small_run_all_three(tmp_path, capsys):
    relion_program("relion_run_motioncorr")
    fake = tmp_path / "bin" / "MotionCor3"
    fake.parent.mkdir()
    fake.write_text(FAKE_MC3.replace("{python}", sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "sbs.json"
    work = tmp_path / "work"
    assert main(["--size", "256", "--frames", "8", "--movies", "2", "--device", "cpu", "--passes", "cold",
                 "--motioncor3", str(fake), "--relion-movies", "1", "--workdir", str(work), "--json", str(out),
                 "--cores", ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))]) == 0
    printed = capsys.readouterr().out
    assert "posix_fadvise DONTNEED" in printed and "| cold | MotionCor3 |" in printed
    rows = {r["program"]: r for r in json.load(open(out))["rows"]}
    assert all(rows[p]["ok"] for p in ("MotionCor3", "RELION", "ours")), rows
    assert (rows["MotionCor3"]["movies"], rows["RELION"]["movies"], rows["ours"]["movies"]) == (2, 1, 2)
    mc3 = rows["MotionCor3"]
    assert (mc3["read_s"], mc3["compute_s"], mc3["write_s"], mc3["program_total_s"]) == (0.5, 1.25, 0.25, 6.0)
    assert "-Serial 0" in mc3["command"]          # one call per movie: two "Total time: 3.0" summed
    assert mc3["rms_px"] < 0.02 and mc3["rms_px_if_sign_flipped"] > 1.0    # %8.2f rounding only; sign kept
    for p in ("RELION", "ours"):                  # real aligners on 256² × 8, ~1 e/px/frame: well under 1 px
        assert rows[p]["rms_px"] < 0.5 and rows[p]["rms_px_if_sign_flipped"] > 1.0, rows[p]
    assert rows["ours"]["wall_ratio_to_ours"] == 1.0 and rows["RELION"]["wall_ratio_to_ours"] > 0
    assert not work.exists()                      # removed without --keep
