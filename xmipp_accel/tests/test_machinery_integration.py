"""The algorithms use the machinery: autotuned movie kernel, FFT size advisor in the angular search, runtime pipeline.

* ``correct_local_motion`` launches the local-motion kernel with the autotuner's cached configuration
  for this device and movie size (``tuned_params("movie-local-motion", ...)``), else the default.
* The angular assignment's transform sizes (polar FFT length, cropped particle box, sampled map box)
  come from the FFT size advisor.
* ``assign-angles`` aligns particle batches through ``Pipeline``; the output does not depend on the
  batch size or the number of workers, and equals a plain loop over ``ProjectionMatcher.align``.
"""
from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest

from xmipp_accel.gpu.tuning.cache import default_cache
from xmipp_accel.gpu.tuning.fft_advisor import good_fft_size, is_smooth

MOVIE = {"frames": 12, "height": 96, "width": 128}


# ------------------------------------------------------------------------------------------------------------
# movie kernel: tuned launch geometry
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh tuning cache folder for this test (XMIPP_ACCEL_CACHE)."""
    monkeypatch.setenv("XMIPP_ACCEL_CACHE", str(tmp_path / "cache"))
    return default_cache()


def _store_tuned(cache, size, params):
    from xmipp_accel.gpu.movie.apply import MOVIE_LOCAL_MOTION_KERNEL as k  # registers the kernel
    cache.put(k.cache_kind, k.size_class(size), {"params": dict(params), "time_s": 1e-3})


def test_local_motion_block_is_the_default_without_a_tuned_result(tmp_cache):
    from xmipp_accel.gpu.movie.apply import LOCAL_MOTION_DEFAULT_BLOCK, local_motion_block
    from xmipp_accel.gpu.movie.apply import MOVIE_LOCAL_MOTION_KERNEL as k  # registers the kernel
    assert LOCAL_MOTION_DEFAULT_BLOCK == (k.default["block_x"], k.default["block_y"])
    assert local_motion_block(MOVIE["frames"], MOVIE["height"], MOVIE["width"]) == LOCAL_MOTION_DEFAULT_BLOCK


def test_local_motion_block_reads_the_cached_tuned_configuration(tmp_cache):
    from xmipp_accel.gpu.movie.apply import LOCAL_MOTION_DEFAULT_BLOCK, local_motion_block
    _store_tuned(tmp_cache, MOVIE, {"block_x": 64, "block_y": 4})
    assert local_motion_block(MOVIE["frames"], MOVIE["height"], MOVIE["width"]) == (64, 4)
    # another size class (16x more pixels) has no tuned result: default
    assert local_motion_block(MOVIE["frames"], 4 * MOVIE["height"], 4 * MOVIE["width"]) == LOCAL_MOTION_DEFAULT_BLOCK
    # a stale entry (parameters outside the kernel's space) is ignored
    _store_tuned(tmp_cache, MOVIE, {"block_x": 48, "block_y": 4})
    assert local_motion_block(MOVIE["frames"], MOVIE["height"], MOVIE["width"]) == LOCAL_MOTION_DEFAULT_BLOCK


class _RecordingKernel:
    def __init__(self):
        self.launches = []

    def __call__(self, grid, block, args):
        self.launches.append((tuple(grid), tuple(block)))


def _fake_device_xp():
    """numpy dressed as a CuPy module, so the GPU launch path runs up to the (recorded) kernel call."""
    device = types.SimpleNamespace(id=0)
    return types.SimpleNamespace(ascontiguousarray=np.ascontiguousarray, asarray=np.asarray,
                                 empty_like=np.empty_like, cuda=types.SimpleNamespace(Device=lambda: device))


def test_correct_local_motion_launches_with_the_tuned_block(tmp_cache, monkeypatch):
    from xmipp_accel.gpu.movie import apply
    kern = _RecordingKernel()
    asked = []
    monkeypatch.setattr(apply, "_kernel", lambda device_id, interpolation: asked.append(interpolation) or kern)
    monkeypatch.setattr(apply.backend, "get_xp", lambda *a: _fake_device_xp())
    n, ny, nx = MOVIE["frames"], MOVIE["height"], MOVIE["width"]
    frames = np.zeros((n, ny, nx), np.float32)
    coef = np.zeros((n, 2, 6, 6), np.float32)
    apply.correct_local_motion(frames, coef, (ny / 3, nx / 3))
    assert kern.launches[-1] == ((nx // 32, ny // 8, n), (32, 8, 1))          # default
    _store_tuned(tmp_cache, MOVIE, {"block_x": 128, "block_y": 2})
    apply.correct_local_motion(frames, coef, (ny / 3, nx / 3))
    assert kern.launches[-1] == ((1, ny // 2, n), (128, 2, 1))                # tuned, cached
    apply.correct_local_motion(frames, coef, (ny / 3, nx / 3), block=(16, 16))
    assert kern.launches[-1] == ((nx // 16, ny // 16, n), (16, 16, 1))        # explicit
    with pytest.raises(ValueError, match="block"):
        apply.correct_local_motion(frames, coef, (ny / 3, nx / 3), block=(64, 32))
    apply.correct_local_motion(frames, coef, (ny / 3, nx / 3), interpolation="linear")
    assert asked == ["keys"] * 3 + ["linear"]                                 # the bilinear kernel on request


@pytest.mark.gpu
def test_gpu_correct_local_motion_same_result_for_any_block(tmp_cache):
    cp = pytest.importorskip("cupy")
    from xmipp_accel.gpu.movie.apply import correct_local_motion, correct_local_motion_reference
    rng = np.random.default_rng(0)
    n, ny, nx = MOVIE["frames"], MOVIE["height"], MOVIE["width"]
    frames = rng.standard_normal((n, ny, nx)).astype(np.float32)
    coef = (rng.standard_normal((n, 2, 6, 6)) * 2).astype(np.float32)
    ref = correct_local_motion_reference(frames, coef, (ny / 3, nx / 3))
    _store_tuned(tmp_cache, MOVIE, {"block_x": 16, "block_y": 16})
    outs = [correct_local_motion(cp.asarray(frames), cp.asarray(coef), (ny / 3, nx / 3), block=b)
            for b in (None, (32, 8), (256, 1), (8, 4))]
    for out in outs:
        np.testing.assert_allclose(cp.asnumpy(out), ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(cp.asnumpy(out), cp.asnumpy(outs[0]))


# ------------------------------------------------------------------------------------------------------------
# angular assignment: transform sizes from the FFT size advisor
# ------------------------------------------------------------------------------------------------------------

def test_angular_search_sizes_come_from_the_fft_advisor():
    from xmipp_accel.gpu.align.polar import CentralSlicer, good_size
    from xmipp_accel.gpu.align.search_plan import plan_search
    for n in (16, 22, 70, 130, 187, 361):
        assert good_size(n) == good_fft_size(n, multiple_of=2)
        assert good_size(n) >= n and good_size(n) % 2 == 0 and is_smooth(good_size(n))
    for box, step in ((64, 3.0), (100, 5.0), (200, 1.5)):
        plan = plan_search(box, 1.5, step_deg=step)
        need = max(360.0 / step, 2.0 * math.pi * plan.r0, 16)
        assert plan.n_theta == good_fft_size(math.ceil(need), multiple_of=2)
        assert plan.n_theta >= need and 360.0 / plan.n_theta <= step
    vol = np.zeros((64, 64, 64), np.float32)
    vol[28:36, 28:36, 28:36] = 1
    slicer = CentralSlicer(vol, r_max=10.0)
    assert slicer.size == 2 * good_fft_size(2 * 10 + 8, multiple_of=2)


# ------------------------------------------------------------------------------------------------------------
# angular assignment through the runtime pipeline
# ------------------------------------------------------------------------------------------------------------

PX = 3.0
N = 32


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    from xmipp_accel.em.synthetic import make_particles, phantom_volume
    from xmipp_accel.io.images import write_stack
    from xmipp_accel.io.mrc import write_mrc
    from xmipp_accel.io.particles import write_particles_from_arrays
    d = tmp_path_factory.mktemp("pipeline_assign")
    vol = phantom_volume(N, seed=0)
    imgs, truth = make_particles(vol, 30, pixel_size_A=PX, snr=2.0, max_shift_px=1.5, seed=1)
    write_stack(str(d / "particles.mrcs"), imgs, PX)
    refs = [f"{i + 1}@particles.mrcs" for i in range(len(imgs))]
    write_particles_from_arrays(str(d / "particles.star"), refs, PX, ctf=truth, subset=truth["subset"], box_size=N)
    write_mrc(str(d / "ref.mrc"), vol, PX)
    return d


def _assign(d, out, capsys, *extra):
    from xmipp_accel.cli.__main__ import main as cli
    code = cli(["assign-angles", str(d / "particles.star"), "--reference", str(d / "ref.mrc"), "-o", str(out),
                "--angular-step", "6", "--max-shift", "2", "--device", "cpu", "--json", "-q", *extra])
    stdout = capsys.readouterr().out
    assert code == 0
    return json.loads(stdout.strip().splitlines()[-1])


def _columns(star):
    from xmipp_accel.io.particles import read_particles
    p = read_particles(str(star))
    return np.concatenate([p.angles_deg, p.origins_A, np.asarray(p.table["rlnParticleFigureOfMerit"], float)[:, None]],
                          axis=1)


def test_pipeline_output_does_not_depend_on_batches_or_workers(particles, capsys):
    d = particles
    s7 = _assign(d, d / "b7.star", capsys, "--batch", "7")
    _assign(d, d / "b50.star", capsys, "--batch", "50")
    s2 = _assign(d, d / "b7w2.star", capsys, "--batch", "7", "--cpu-workers", "2")
    a7, a50, a7w2 = _columns(d / "b7.star"), _columns(d / "b50.star"), _columns(d / "b7w2.star")
    np.testing.assert_array_equal(a7, a50)
    np.testing.assert_array_equal(a7, a7w2)
    assert s7["pipeline"]["items"] == 5 and s7["pipeline"]["failed"] == 0 and s7["pipeline"]["workers"] == ["cpu0"]
    assert s2["pipeline"]["workers"] == ["cpu0", "cpu1"]
    assert set(s7["pipeline"]["stage_busy_s"]) >= {"read", "compute", "write"}


def test_pipeline_equals_a_plain_loop_over_the_matcher(particles, capsys):
    from xmipp_accel.cli.assign_angles import WHITENING_SAMPLE, _ctf_mode, load_reference
    from xmipp_accel.gpu.align.projmatch import ProjectionMatcher
    from xmipp_accel.io.particles import read_particles
    d = particles
    _assign(d, d / "cli.star", capsys, "--batch", "9")
    pset = read_particles(str(d / "particles.star"))
    vol, _ = load_reference(str(d / "ref.mrc"), box=N, pixel_size_A=PX, max_res_A=None)
    m = ProjectionMatcher(vol, pixel_size_A=PX, sym="c1", step_deg=6.0, max_shift_px=2.0, ctf_mode=_ctf_mode(pset))
    images, ctf = pset.read_images(), pset.ctf()
    first = slice(0, min(pset.n, WHITENING_SAMPLE))
    m.set_whitening(images[first], {k: np.asarray(v)[first] for k, v in ctf.items()})
    res = m.align(images, ctf, batch_size=11)
    loop = np.concatenate([res.angles_deg, res.origins_px * PX, res.score[:, None]], axis=1)
    np.testing.assert_allclose(_columns(d / "cli.star"), loop, atol=1e-4)


def test_a_bad_batch_size_is_refused(particles, capsys):
    from xmipp_accel.cli.__main__ import main as cli
    d = particles
    code = cli(["assign-angles", str(d / "particles.star"), "--reference", str(d / "ref.mrc"), "-o",
                str(d / "x.star"), "--device", "cpu", "-q", "--batch", "0"])
    assert code == 2 and "--batch" in capsys.readouterr().err
