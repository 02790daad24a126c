"""FFT size advisor: candidate enumeration, cost model properties, ranking, cheap size helpers, GPU measurement."""
from __future__ import annotations

import types

import numpy as np
import pytest

from xmipp_accel import backend
from xmipp_accel.gpu.tuning import fft_advisor as fa
from xmipp_accel.gpu.tuning.cache import TuningCache


def brute_smooth(lo, hi):
    return [m for m in range(lo, hi + 1) if all(p in (2, 3, 5, 7) for p in fa.factorize(m))]


@pytest.mark.parametrize("n", [1, 7, 97, 360, 1009, 4092, 5760])
def test_candidate_sizes_are_exactly_the_smooth_sizes_in_the_window(n):
    got = fa.candidate_sizes(n, crop_max=0.1, pad_max=0.2)
    lo, hi = int(np.ceil(n * 0.9 - 1e-9)), int(np.floor(n * 1.2 + 1e-9))
    assert got == brute_smooth(max(lo, 1), max(hi, n))


def test_candidate_sizes_options():
    assert fa.candidate_sizes(4092, crop_max=0.0, pad_max=0.0) == []
    assert fa.candidate_sizes(4092, crop_max=0.0, pad_max=0.01) == [4096, 4116]
    assert all(m % 2 == 0 for m in fa.candidate_sizes(1000, multiple_of=2))
    assert 1331 in fa.candidate_sizes(1300, primes=(2, 3, 5, 7, 11))
    assert 1331 not in fa.candidate_sizes(1300)
    with pytest.raises(ValueError):
        fa.candidate_sizes(0)
    with pytest.raises(ValueError):
        fa.candidate_sizes(10, crop_max=1.5)


def test_factorize_and_smoothness():
    assert fa.factorize(4092) == {2: 2, 3: 1, 11: 1, 31: 1}
    assert fa.factorize(1) == {}
    assert fa.is_smooth(5760) and not fa.is_smooth(4092) and not fa.is_smooth(0)


def test_cost_model_orders_known_cases():
    """Prime-heavy sizes cost more than nearby powers of two; odd real last axes cost more than even ones."""
    t = lambda shape, **kw: fa.transform_cost(shape, **kw)[0]  # noqa: E731
    assert t((4092, 5760), batch=30) > 1.15 * t((4096, 5760), batch=30)      # 11*31 factors vs 2^12
    assert t((1009,), batch=4096, real=False) > 1.8 * t((1024,), batch=4096, real=False)  # prime: Bluestein
    assert t((512, 513)) > t((512, 512))                                    # odd r2c last axis
    assert t((4096, 4096), batch=10) == pytest.approx(10 * t((4096, 4096)), rel=0.2)  # bandwidth bound
    assert t((64, 64), batch=10) < 3 * t((64, 64))                                    # launch bound
    assert t((256, 256), double=True) > t((256, 256))
    assert t((64, 64, 64)) < t((128, 128, 128))
    _, launches, mem = fa.transform_cost((4096, 5760), batch=30)
    assert launches >= 2 and mem >= 30 * 4096 * 5760 * 4 * 2


def test_recommend_k3_frame_pads_to_4096_rows_and_flags_the_request():
    ranked = fa.recommend((4092, 5760), batch=30, crop_max=0.1, pad_max=0.2, measure=False)
    assert ranked[0].shape == (4096, 5760)
    req = [c for c in ranked if c.requested]
    assert len(req) == 1 and req[0].shape == (4092, 5760) and ranked[-1] is req[0]
    assert all(fa.is_smooth(s) for c in ranked if not c.requested for s in c.shape)
    for c in ranked:
        assert all(0.9 * n - 1 <= m <= 1.2 * n + 1 for m, n in zip(c.shape, (4092, 5760)))
    assert ranked[0].width_height == [5760, 4096]


def test_recommend_respects_no_pad_and_even():
    ranked = fa.recommend((4092, 5760), batch=30, crop_max=0.1, pad_max=0.0, multiple_of=2, measure=False)
    for c in ranked:
        if not c.requested:
            assert c.shape[0] <= 4092 and c.shape[1] <= 5760
            assert c.shape[0] % 2 == 0 and c.shape[1] % 2 == 0


def test_recommend_keeps_a_smooth_request_first_when_nothing_is_clearly_faster():
    ranked = fa.recommend((256, 256), measure=False)
    assert ranked[0].shape == (256, 256) and ranked[0].requested


def test_rank_by_memory_and_time():
    by_mem = fa.recommend((1000, 1000), crop_max=0.1, measure=False, rank_by="memory")
    mems = [c.memory_bytes for c in by_mem if not c.requested]
    everything = fa.recommend((1000, 1000), crop_max=0.1, measure=False, rank_by="memory", top=10000)
    assert mems[0] <= 1.031 * min(c.memory_bytes for c in everything)
    assert max(mems) <= min(c.memory_bytes for c in everything[len(mems):]) * 1.031
    by_time = fa.recommend((1000, 1000), crop_max=0.1, measure=False, rank_by="time")
    assert by_time[0].model_ms <= min(c.model_ms for c in by_time) * 1.031
    with pytest.raises(ValueError):
        fa.recommend((10, 10), rank_by="speed")


def test_measure_true_without_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(fa.backend, "cupy_module", lambda: None)
    with pytest.raises(ValueError, match="GPU"):
        fa.recommend((64, 64), measure=True)


def test_measurements_come_from_the_cache_and_reorder_the_ranking(monkeypatch):
    """Cached measurements (as if from this GPU) outrank the model, fastest first."""
    cache = TuningCache(signature={"device": "fake"}, memory_only=True)
    calls = []

    def fake_measure(shape, *, batch, real, double):
        calls.append(shape)
        return (1.0 if shape == (384, 384) else 2.0 + shape[0] / 1000), 1024

    monkeypatch.setattr(fa, "measure_transform", fake_measure)
    pool = types.SimpleNamespace(free_all_blocks=lambda: None)
    fake_cp = types.SimpleNamespace(get_default_memory_pool=lambda: pool)
    monkeypatch.setattr(fa.backend, "cupy_module", lambda: fake_cp)
    ranked = fa.recommend((360, 360), crop_max=0.0, pad_max=0.1, measure=True, shortlist=3, cache=cache)
    measured = [c for c in ranked if c.measured_ms is not None]
    assert len(measured) >= 3 and ranked[: len(measured)] == measured
    assert [c.measured_ms for c in measured] == sorted(c.measured_ms for c in measured)
    n_calls = len(calls)
    again = fa.recommend((360, 360), crop_max=0.0, pad_max=0.1, measure=True, shortlist=3, cache=cache)
    assert len(calls) == n_calls  # all from the cache
    assert [c.shape for c in again] == [c.shape for c in ranked]


@pytest.mark.parametrize("n,expected", [(4092, 4096), (256, 256), (1009, 1024), (300, 300)])
def test_good_fft_size_pads_to_fast_sizes(n, expected):
    assert fa.good_fft_size(n) == expected


def test_good_fft_size_rules():
    for n in range(50, 700, 7):
        m = fa.good_fft_size(n, multiple_of=2)
        assert m >= n and m % 2 == 0 and fa.is_smooth(m)
        c = fa.good_fft_size(n, allow_crop=True, crop_max=0.1)
        assert 0.9 * n - 1 <= c <= 1.2 * n + 1 and fa.is_smooth(c)
    assert fa.good_fft_size(1000003, pad_max=0.0) > 1000003  # nothing in the window: next smooth size


def test_good_fft_shape_for_a_k3_movie_crop():
    shape = fa.good_fft_shape((4092, 5760), allow_crop=True, pad_max=0.0, batch=30)
    assert shape[0] <= 4092 and shape[1] <= 5760
    assert all(fa.is_smooth(s) for s in shape)
    assert shape[1] == 5760 and shape[0] >= 3900


def test_speedup_table_lines():
    ranked = fa.recommend((4092, 5760), batch=30, measure=False)
    lines = fa.speedup_table((4092, 5760), ranked)
    assert "5760 x 4096" in lines[1] and "(requested)" in lines[-1]


@pytest.mark.gpu
def test_gpu_measurement_is_positive_and_cached(tmp_path):
    cache = TuningCache(str(tmp_path))
    ms, plan = fa.measure_transform((64, 96), batch=4)
    assert ms > 0 and (plan is None or plan >= 0)
    ranked = fa.recommend((250, 250), batch=2, measure=True, shortlist=2, cache=cache)
    assert ranked[0].measured_ms is not None and ranked[0].measured_ms > 0
    assert len(cache.items("fft")) >= 2
    cp = backend.cupy_module()
    assert cp is not None
