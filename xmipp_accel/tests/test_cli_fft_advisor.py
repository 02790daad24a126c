"""``xmipp-accel fft-advisor``: table, --json last line with [width, height] pairs, option parsing and errors."""
from __future__ import annotations

import json

import pytest

from xmipp_accel.cli import fft_advisor as cli
from xmipp_accel.cli.__main__ import main
from xmipp_accel.errors import InputError


def run_json(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return out, json.loads(out[-1])


def test_k3_frame_json_lists_width_height_pairs_best_first(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XMIPP_ACCEL_CACHE", str(tmp_path))
    out, summary = run_json(capsys, ["fft-advisor", "5760x4092", "--batch", "30", "--crop-max", "10%", "--json",
                                     "--device", "cpu"])
    assert summary["requested"] == [5760, 4092] and summary["batch"] == 30
    rec = summary["recommended"]
    assert rec[0] == [5760, 4096]              # width first: the 4092 rows go to 4096
    assert [5760, 4092] not in rec             # 4092 = 4*3*11*31 is shown for comparison only
    assert all(len(p) == 2 for p in rec)
    assert summary["crop_max"] == pytest.approx(0.1) and summary["pad_max"] == pytest.approx(0.2)
    assert any("(requested)" in line for line in out)
    assert any("recommended: 5760 x 4096" in line for line in out)


def test_no_pad_gives_crops_only(capsys):
    _, summary = run_json(capsys, ["fft-advisor", "5760x4092", "--batch", "30", "--crop-max", "10", "--pad-max", "0",
                                   "--device", "cpu", "--json"])
    for w, h in summary["recommended"]:
        assert w <= 5760 and h <= 4092 and w >= 0.9 * 5760 - 1 and h >= 0.9 * 4092 - 1


def test_3d_even_cube(capsys):
    _, summary = run_json(capsys, ["fft-advisor", "181", "--3d", "--even", "--device", "cpu", "--json"])
    assert summary["requested"] == [181, 181, 181]
    assert all(len(s) == 3 and all(v % 2 == 0 and v >= 181 for v in s) for s in summary["recommended"])


def test_parsers():
    assert cli.parse_size("5760x4092", False) == (4092, 5760)
    assert cli.parse_size("100", True) == (100, 100, 100)
    assert cli.parse_size("64x32x16", True) == (16, 32, 64)
    assert cli.parse_fraction("10%", "--crop-max") == pytest.approx(0.1)
    assert cli.parse_fraction("0.2", "--pad-max") == pytest.approx(0.2)
    assert cli.parse_fraction("15", "--pad-max") == pytest.approx(0.15)
    for bad in ["axb", "0x10", ""]:
        with pytest.raises(InputError):
            cli.parse_size(bad, False)
    with pytest.raises(InputError, match="--3d"):
        cli.parse_size("10x10x10", False)
    with pytest.raises(InputError, match="--crop-max"):
        cli.parse_fraction("ten", "--crop-max")


def test_user_errors_are_one_line_exit_2(capsys):
    assert main(["fft-advisor", "5760x4092", "--crop-max", "150%", "--device", "cpu"]) == 2
    assert "--crop-max" in capsys.readouterr().err
    assert main(["fft-advisor", "5760x4092", "--batch", "0", "--device", "cpu"]) == 2


@pytest.mark.gpu
def test_gpu_measured_ranking_beats_the_request(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XMIPP_ACCEL_CACHE", str(tmp_path))
    _, summary = run_json(capsys, ["fft-advisor", "1000x1009", "--batch", "4", "--json", "--device", "gpu"])
    assert summary["measured"]
    cands = summary["candidates"]
    req = next(c for c in cands if c["requested"])
    assert cands[0]["measured_ms"] is not None and req["measured_ms"] is not None
    assert cands[0]["measured_ms"] <= req["measured_ms"]  # 1009 is prime: a smooth pad must win
    assert list(tmp_path.glob("tuning_*.json"))          # measurements kept for the next call
