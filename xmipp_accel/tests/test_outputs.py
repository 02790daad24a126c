"""One way to write outputs (io/atomic.py): every command checks its outputs before any work, and
writes them all or nothing.

An output that cannot be written (its folder is a file, or a folder without write permission) must be
refused with exit status 2 and a message naming the path *before* the work starts: the work functions
are replaced by ones that fail the test if they are called.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel.errors import InputError
from xmipp_accel.io.atomic import check_outputs, write_outputs
from xmipp_accel.io.images import write_stack
from xmipp_accel.io.mrc import write_mrc
from xmipp_accel.io.particles import write_particles_from_arrays

PX = 3.0
N = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs")
    vol = phantom_volume(N, seed=0)
    imgs, truth = make_particles(vol, 8, pixel_size_A=PX, snr=2.0, seed=1)
    write_stack(str(d / "particles.mrcs"), imgs, PX)
    refs = [f"{i + 1}@{d / 'particles.mrcs'}" for i in range(len(imgs))]
    write_particles_from_arrays(str(d / "particles.star"), refs, PX, ctf=truth, subset=truth["subset"], box_size=N,
                                angles_deg=np.stack([truth["rot"], truth["tilt"], truth["psi"]], axis=1))
    write_mrc(str(d / "ref.mrc"), vol, PX)
    write_mrc(str(d / "half1.mrc"), vol, PX)
    write_mrc(str(d / "half2.mrc"), vol, PX)
    (d / "not_a_folder").write_text("a file where a folder is expected\n")
    return d


def _never(*_a, **_k):
    raise AssertionError("the work started although an output cannot be written")


def _commands(d, out):
    star, ref = str(d / "particles.star"), str(d / "ref.mrc")
    return {
        "assign-angles": (["assign-angles", star, "--reference", ref, "-o", f"{out}/a.star", "--device", "cpu"],
                          "xmipp_accel.cli.assign_angles.align_particles"),
        "reconstruct": (["reconstruct", star, "-o", f"{out}/map.mrc", "--device", "cpu"],
                        "xmipp_accel.gpu.reconstruct.batches.reconstruct_batches"),
        "fsc": (["fsc", str(d / "half1.mrc"), str(d / "half2.mrc"), "-o", f"{out}/fsc.star", "--device", "cpu"],
                "xmipp_accel.gpu.resolution.fsc.fsc"),
        "local-resolution": (["local-resolution", str(d / "half1.mrc"), str(d / "half2.mrc"), "-o",
                              f"{out}/locres.mrc", "--device", "cpu"],
                             "xmipp_accel.gpu.resolution.local.local_resolution"),
        "refine": (["refine", star, "--initial-volume", ref, "--diameter", str(0.8 * N * PX), "-o", f"{out}/ref",
                    "--device", "cpu"], "xmipp_accel.gpu.refine.autorefine.auto_refine"),
    }


@pytest.mark.parametrize("command", ["assign-angles", "reconstruct", "fsc", "local-resolution", "refine"])
def test_an_output_under_a_file_is_refused_before_any_work(data, command, monkeypatch, capsys):
    out = data / "not_a_folder" / "sub"
    argv, work = _commands(data, out)[command]
    monkeypatch.setattr(work, _never)
    code = cli(argv + ["-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "not_a_folder" in err and "not a folder" in err and "Traceback" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
@pytest.mark.parametrize("command", ["assign-angles", "reconstruct", "refine"])
def test_a_read_only_folder_is_refused_before_any_work(data, command, monkeypatch, capsys, tmp_path):
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        argv, work = _commands(data, ro)[command]
        monkeypatch.setattr(work, _never)
        code = cli(argv + ["-q"])
        err = capsys.readouterr().err
        assert code == 2 and "not writable" in err and str(ro) in err, err
    finally:
        ro.chmod(0o700)


def test_check_outputs_accepts_new_folders_and_refuses_a_folder_as_file(tmp_path):
    check_outputs([tmp_path / "new" / "deeper" / "a.mrc"], folders=[tmp_path / "out"])
    assert not (tmp_path / "new").exists() and not (tmp_path / "out").exists()   # creates nothing
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="it is a folder"):
        check_outputs([tmp_path / "d"])


def test_write_outputs_is_all_or_nothing(tmp_path):
    old = tmp_path / "b.mrc"
    old.write_text("previous run")

    def fails(_tmp):
        raise OSError(28, "No space left on device")

    writers = {str(tmp_path / "a.mrc"): lambda tmp: write_mrc(tmp, np.zeros((4, 4, 4), np.float32), 1.0),
               str(old): fails}
    with pytest.raises(InputError, match="nothing was written"):
        write_outputs(writers)
    assert sorted(os.listdir(tmp_path)) == ["b.mrc"] and old.read_text() == "previous run"   # no temporaries
    write_outputs({str(tmp_path / "a.mrc"): writers[str(tmp_path / "a.mrc")]})
    assert sorted(os.listdir(tmp_path)) == ["a.mrc", "b.mrc"]
