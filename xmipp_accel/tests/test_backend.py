"""The backend module: device resolution, fallback, GPU list parsing, array helpers."""
import logging
import threading

import numpy as np
import pytest

from xmipp_accel import backend


def test_cpu_device_is_numpy():
    dev = backend.resolve_device("cpu")
    assert dev.kind == "cpu" and dev.xp is np and not dev.is_gpu


def test_unknown_device_is_a_clear_error():
    with pytest.raises(backend.BackendError, match="auto, gpu, cpu"):
        backend.resolve_device("tpu")


def test_env_var_selects_device(monkeypatch):
    monkeypatch.setenv(backend.DEVICE_ENV, "cpu")
    assert backend.resolve_device().kind == "cpu"


@pytest.mark.skipif(backend.gpu_available(), reason="needs a machine without a GPU")
def test_auto_falls_back_to_cpu_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        dev = backend.resolve_device("auto")
    assert dev.kind == "cpu"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CPU" in warnings[0].getMessage()


@pytest.mark.skipif(backend.gpu_available(), reason="needs a machine without a GPU")
def test_gpu_without_gpu_is_a_clear_error():
    with pytest.raises(backend.BackendError, match="--device cpu"):
        backend.resolve_device("gpu")


@pytest.mark.parametrize("spec,ids", [("0", [0]), ("0,1", [0, 1]), ("0 2", [0, 2]), ("0-3", [0, 1, 2, 3]),
                                      ("", []), (None, [])])
def test_parse_gpu_list(spec, ids):
    assert backend.parse_gpu_list(spec) == ids


def test_parse_gpu_list_rejects_garbage():
    with pytest.raises(backend.BackendError, match="invalid GPU id"):
        backend.parse_gpu_list("gpu0")


def test_get_xp_and_to_host_on_numpy():
    a = np.arange(4.0)
    assert backend.get_xp(a) is np
    assert backend.to_host(a) is a or np.array_equal(backend.to_host(a), a)


def test_pinned_empty_shape_and_dtype():
    a = backend.pinned_empty((3, 5), np.float32)
    assert a.shape == (3, 5) and a.dtype == np.float32
    a[:] = 1.5
    assert float(a.sum()) == pytest.approx(22.5)


@pytest.mark.gpu
def test_gpu_round_trip_and_info():  # also checks that `with device:` works on a frozen Device
    dev = backend.resolve_device("gpu", 0)
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    with dev:
        d = backend.to_device(x, dev)
        assert backend.get_xp(d) is dev.xp is not np
        np.testing.assert_array_equal(backend.to_host(d * 2), x * 2)
    info = backend.gpu_info(0)
    assert info["total_bytes"] > info["free_bytes"] > 0
    pinned = backend.pinned_empty((1024,), np.float32)
    pinned[:] = 3
    assert float(backend.to_host(dev.xp.asarray(pinned)).sum()) == 3 * 1024


def test_cpu_device_scope_nests():
    dev = backend.Device("cpu")
    with dev as outer, backend.on_device(dev) as inner:
        with dev:
            assert outer is inner is dev
    assert backend._entered_scopes() == []


@pytest.mark.gpu
def test_gpu_device_scope_is_reentrant_and_per_thread():
    """One Device object entered nested and from several threads at once (the reconstruction's workers
    and the CLIs share Device objects): every scope leaves the right context behind."""
    cp = backend.cupy_module()
    dev = backend.resolve_device("gpu", 0)
    with dev:
        with dev, backend.on_device(dev):
            assert cp.cuda.Device().id == dev.gpu_id
        assert cp.cuda.Device().id == dev.gpu_id
    errors = []

    def work():
        try:
            for _ in range(200):
                with dev:
                    assert float(cp.ones(8).sum()) == 8.0
            assert backend._entered_scopes() == []
        except Exception as exc:  # collected: an assertion in a thread would be lost
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
