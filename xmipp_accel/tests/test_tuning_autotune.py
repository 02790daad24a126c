"""Kernel autotuner: search, verification, cache per size class, dynamic tuning, registry, built-in kernel."""
from __future__ import annotations

import numpy as np
import pytest

from xmipp_accel import backend
from xmipp_accel.gpu.tuning import autotune as at
from xmipp_accel.gpu.tuning.autotune import DynamicTuner, TunableKernel, Tuner
from xmipp_accel.gpu.tuning.cache import TuningCache

SIG = {"device": "test-gpu", "cc": "0.0"}

# A toy kernel: a blocked sum of squares whose (fake) cost depends on its parameters in a known way.
SPACE = {"BLOCK": [32, 64, 128, 256], "UNROLL": [1, 2, 4], "TABLE": [False, True]}
DEFAULT = {"BLOCK": 64, "UNROLL": 1, "TABLE": False}


def fake_cost(p):
    """Known cost landscape: best at BLOCK=128, UNROLL=4, TABLE=True."""
    return (abs(np.log2(p["BLOCK"]) - 7) + 1) * (1.0 / p["UNROLL"] + 1) * (0.7 if p["TABLE"] else 1.0)


def toy_kernel(broken=None, failing=None, name="toy"):
    def build(params):
        if failing is not None and params == failing:
            raise RuntimeError("too many resources requested for launch")

        def fn(x):
            blocks = [np.sum(x[i:i + params["BLOCK"]] ** 2) for i in range(0, len(x), params["BLOCK"])]
            total = np.sum(blocks)
            if broken is not None and params == broken:
                total = total + 1.0  # a wrong variant
            return np.array([total])
        fn.params = params
        return fn

    return TunableKernel(
        name=name, space=SPACE, default=DEFAULT, build=build,
        make_inputs=lambda size, xp: xp.asarray(np.random.default_rng(1).random(int(size))),
        run=lambda fn, x: fn(x), constraints=[lambda p: p["BLOCK"] * p["UNROLL"] <= 512],
        sizes=(1000,))


def fake_timer(call):
    return fake_cost(call.args[0].params)  # functools.partial(kernel.run, fn, inputs)


def fake_dynamic_timer(call):
    return call(), fake_cost(call.args[0].params)


def best_valid():
    cands = at.configurations(SPACE, [lambda p: p["BLOCK"] * p["UNROLL"] <= 512])
    return min(cands, key=fake_cost)


def test_configurations_respect_constraints():
    cands = at.configurations(SPACE, [lambda p: p["BLOCK"] * p["UNROLL"] <= 512])
    assert len(cands) == 4 * 3 * 2 - 2  # (256, 4) is out, with and without table
    assert all(p["BLOCK"] * p["UNROLL"] <= 512 for p in cands)
    assert len({tuple(sorted(p.items())) for p in cands}) == len(cands)


def test_size_class_buckets_to_powers_of_two():
    assert at.size_class(200) == at.size_class(256) == "256"
    assert at.size_class((100, 1000)) == "128x1024"
    assert at.size_class({"box": 250, "batch": 900}) == "batch=1024,box=256"
    assert at.size_class(100) != at.size_class(1000)


def test_offline_tuner_finds_the_best_and_caches_it_per_size_class():
    cache = TuningCache(signature=SIG, memory_only=True)
    k = toy_kernel()
    res = Tuner(k, cache=cache, timer=fake_timer).tune(1000, xp=np)
    assert res.best == best_valid() == {"BLOCK": 128, "UNROLL": 4, "TABLE": True}
    assert res.default_s == pytest.approx(fake_cost(DEFAULT))
    assert res.speedup == pytest.approx(fake_cost(DEFAULT) / fake_cost(res.best))
    assert len(res.trials) == 22 and res.trials[0].params == DEFAULT
    assert at.tuned_params(k, 1000, cache=cache) == res.best
    assert at.tuned_params(k, 900, cache=cache) == res.best        # same size class (1024)
    assert at.tuned_params(k, 100, cache=cache) == DEFAULT          # another class: untuned
    entry = cache.get(k.cache_kind, "1024")
    assert entry["mode"] == "offline" and entry["tried"] == 22


def test_wrong_or_failing_variants_are_skipped():
    best = {"BLOCK": 128, "UNROLL": 4, "TABLE": True}
    fail = {"BLOCK": 128, "UNROLL": 2, "TABLE": True}
    k = toy_kernel(broken=best, failing=fail)
    res = Tuner(k, cache=TuningCache(signature=SIG, memory_only=True), timer=fake_timer).tune(1000, xp=np)
    assert res.best != best and res.best != fail
    errors = {tuple(sorted(t.params.items())): t.error for t in res.trials if t.error}
    assert "differs" in errors[tuple(sorted(best.items()))]
    assert "resources" in errors[tuple(sorted(fail.items()))]
    assert res.best == min((t for t in res.trials if t.seconds is not None), key=lambda t: t.seconds).params


def test_random_strategy_is_bounded_and_reproducible():
    k = toy_kernel()
    cache = TuningCache(signature=SIG, memory_only=True)
    r1 = Tuner(k, cache=cache, max_configs=6, timer=fake_timer, seed=3).tune(1000, xp=np, store=False)
    r2 = Tuner(k, cache=cache, max_configs=6, timer=fake_timer, seed=3).tune(1000, xp=np, store=False)
    assert len(r1.trials) == 6 and r1.trials[0].params == DEFAULT
    assert [t.params for t in r1.trials] == [t.params for t in r2.trials]
    assert cache.get(k.cache_kind, "1024") is None  # store=False


def test_default_outside_the_space_is_an_error():
    k = toy_kernel()
    k.default = {"BLOCK": 256, "UNROLL": 4, "TABLE": False}
    with pytest.raises(ValueError, match="default"):
        Tuner(k, cache=TuningCache(signature=SIG, memory_only=True)).tune(10, xp=np)


def test_dynamic_tuning_never_changes_results_and_settles_on_the_best():
    cache = TuningCache(signature=SIG, memory_only=True)
    k = toy_kernel()
    x = np.random.default_rng(1).random(1000)
    expected = np.sum(x ** 2)
    dyn = DynamicTuner(k, 1000, budget=8, cache=cache, xp=np, timer=fake_dynamic_timer, seed=1)
    outs = [dyn.run(x)[0] for _ in range(20)]
    np.testing.assert_allclose(outs, expected, rtol=1e-12)
    assert len(dyn.trials) == 8 and not dyn.tuning
    assert dyn.trials[0].params == DEFAULT
    assert dyn.best == min(dyn.trials, key=lambda t: t.seconds).params
    # a later run on this GPU and size class starts from the stored best, with no trials
    again = DynamicTuner(k, 1000, budget=8, cache=cache, xp=np, timer=fake_dynamic_timer)
    assert not again.tuning and again.from_cache and again.best == dyn.best
    np.testing.assert_allclose(again.run(x)[0], expected, rtol=1e-12)
    assert again.trials == []


def test_dynamic_tuning_exhaustive_when_space_is_small_and_survives_failures():
    fail = {"BLOCK": 128, "UNROLL": 4, "TABLE": True}
    k = toy_kernel(failing=fail)
    x = np.random.default_rng(1).random(500)
    dyn = DynamicTuner(k, 500, budget=50, cache=TuningCache(signature=SIG, memory_only=True), xp=np,
                       timer=fake_dynamic_timer)
    outs = [dyn.run(x)[0] for _ in range(30)]
    np.testing.assert_allclose(outs, np.sum(x ** 2), rtol=1e-12)
    assert len(dyn.trials) == 22
    others = [p for p in at.configurations(SPACE, k.constraints) if p != fail]
    assert dyn.best == min(others, key=fake_cost)  # every valid configuration was tried; the failing one skipped
    assert [t.error is not None for t in dyn.trials].count(True) == 1


def test_stale_cache_entries_are_ignored():
    cache = TuningCache(signature=SIG, memory_only=True)
    k = toy_kernel()
    cache.put(k.cache_kind, at.size_class(1000), {"params": {"BLOCK": 4096, "UNROLL": 1, "TABLE": False}})
    assert at.tuned_params(k, 1000, cache=cache) == DEFAULT
    cache.put(k.cache_kind, at.size_class(1000), {"params": {"BLOCK": 32}})
    assert at.tuned_params(k, 1000, cache=cache) == DEFAULT


def test_registry_lists_the_algorithms_kernels_and_rejects_unknown_names():
    from xmipp_accel.cli.tune import load_kernels
    names = load_kernels()
    assert {"insert", "movie-local-motion"} <= set(names)
    with pytest.raises(ValueError, match="movie-local-motion"):
        at.get_kernel("no-such-kernel")
    k = at.register(toy_kernel(name="toy-registered"))
    assert at.get_kernel("toy-registered") is k


def test_tuning_imports_no_algorithm():
    """The tuner is machinery: importing it (in a fresh interpreter) loads no algorithm package."""
    import subprocess
    import sys
    code = ("import sys, xmipp_accel.gpu.tuning.autotune, xmipp_accel.gpu.tuning.cache; "
            "print(sorted(m for m in sys.modules if m.startswith(('xmipp_accel.gpu.reconstruct', "
            "'xmipp_accel.gpu.movie', 'xmipp_accel.gpu.align', 'xmipp_accel.gpu.refine', "
            "'xmipp_accel.gpu.resolution'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_time_callable_on_cpu_counts_calls():
    calls = []
    t = at.time_callable(lambda: calls.append(1), xp=np, repeats=4, warmup=2)
    assert len(calls) == 6 and len(t.samples_s) == 4 and t.min_s <= t.median_s


# --------------------------------------------------------------------------------- algorithms' kernels
@pytest.mark.gpu
def test_gpu_tuner_and_dynamic_tuner_on_a_registered_kernel(tmp_path):
    from xmipp_accel.cli.tune import load_kernels
    cp = backend.cupy_module()
    k = load_kernels()["movie-local-motion"]
    cache = TuningCache(str(tmp_path), memory_only=False)
    size = {"frames": 3, "height": 64, "width": 96}
    res = Tuner(k, cache=cache, max_configs=8, repeats=3).tune(size, xp=cp)
    assert sum(t.seconds is not None for t in res.trials) >= 2
    assert not [t for t in res.trials if t.error and "differs" in t.error]  # every variant computes the same
    assert at.tuned_params(k, size, cache=cache) == res.best
    inputs = k.make_inputs(size, cp)
    ref = cp.asnumpy(k.run(k.build(k.default), inputs)).copy()
    dyn = DynamicTuner(k, size, budget=5, cache=TuningCache(str(tmp_path / "d")), xp=cp)
    for _ in range(8):
        np.testing.assert_allclose(cp.asnumpy(dyn.run(inputs)), ref, rtol=1e-6)
    assert len(dyn.trials) == 5


def test_adapters_build_inputs_on_the_cpu():
    from xmipp_accel.cli.tune import load_kernels
    names = load_kernels()
    if "insert" in names:
        inp = names["insert"].make_inputs({"padded_box": 32, "images": 3}, np)
        assert inp["data"].shape == (32, 32, 17) and inp["proj"].shape == (3, 32, 17)
        assert names["insert"].default in at.configurations(names["insert"].space, names["insert"].constraints)
    if "movie-local-motion" in names:
        k = names["movie-local-motion"]
        inp = k.make_inputs({"frames": 2, "height": 16, "width": 24}, np)
        assert inp["frames"].shape == (2, 16, 24) and inp["coef"].shape == (2, 2, 6, 6)
        assert k.size_class({"frames": 30, "height": 4096, "width": 4096}) == "frames=32,pixels=16777216"


@pytest.mark.gpu
@pytest.mark.parametrize("name,size", [("insert", {"padded_box": 48, "images": 24}),
                                       ("movie-local-motion", {"frames": 3, "height": 200, "width": 300})])
def test_gpu_adapted_kernels_give_the_same_result_in_every_configuration(name, size, tmp_path):
    """Every configuration of the algorithms' kernels computes the default's result (else the tuner skips it)."""
    from xmipp_accel.cli.tune import load_kernels
    names = load_kernels()
    if name not in names:
        pytest.skip(f"{name} kernel not in this build")
    cp = backend.cupy_module()
    res = Tuner(names[name], cache=TuningCache(str(tmp_path)), max_configs=12, repeats=1).tune(size, xp=cp)
    differs = [t.params for t in res.trials if t.error and "differs" in t.error]
    assert not differs, f"configurations giving another result: {differs}"
    assert sum(t.seconds is not None for t in res.trials) >= 6


# --------------------------------------------------------------------------------- command line
def test_cli_tune_list_and_errors(capsys, monkeypatch, tmp_path):
    import json

    from xmipp_accel.cli.__main__ import main
    from xmipp_accel.cli.tune import parse_kernel_size
    monkeypatch.setenv("XMIPP_ACCEL_CACHE", str(tmp_path))
    assert main(["tune", "--list", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kernels"]["movie-local-motion"]["configurations"] == 27   # 6 x 6 shapes, 32..1024 threads
    assert "insert" in summary["kernels"]
    assert main(["tune", "no-such-kernel"]) == 2
    assert "movie-local-motion" in capsys.readouterr().err
    assert parse_kernel_size("frames=30,pixels=1024") == {"frames": 30, "pixels": 1024}
    assert parse_kernel_size("64x32") == (64, 32) and parse_kernel_size("7") == 7
    if not backend.gpu_available():
        assert main(["tune", "movie-local-motion", "--device", "cpu"]) == 2
        assert "GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_cli_tune_stores_the_best_for_this_gpu(capsys, monkeypatch, tmp_path):
    import json

    from xmipp_accel.cli.__main__ import main
    from xmipp_accel.gpu.tuning import cache as tc
    monkeypatch.setenv("XMIPP_ACCEL_CACHE", str(tmp_path))
    tc._DEFAULT.clear()
    assert main(["tune", "movie-local-motion", "--size", "frames=3,height=64,width=96", "--max-configs", "4",
                 "--repeats", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = summary["results"][0]
    assert res["tried"] == 4 and res["best_ms"] > 0
    k = at.get_kernel("movie-local-motion")
    assert at.tuned_params(k, {"frames": 3, "height": 64, "width": 96}) == res["best"]
    tc._DEFAULT.clear()
