"""Tuning cache: persistence, keys per device signature, and concurrent writers from several processes."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from xmipp_accel.gpu.tuning import cache as tc
from xmipp_accel.gpu.tuning.cache import TuningCache, make_key

SIG_A = {"device": "NVIDIA H100 80GB HBM3", "cc": "9.0", "cuda": "12080", "cupy": "14.0.1"}
SIG_B = {"device": "NVIDIA GeForce RTX 3090", "cc": "8.6", "cuda": "12080", "cupy": "14.0.1"}


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(tc.CACHE_ENV, str(tmp_path / "c"))
    assert tc.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.setenv(tc.CACHE_ENV, "off")
    assert tc.default_cache_dir() is None
    monkeypatch.delenv(tc.CACHE_ENV)
    assert tc.default_cache_dir().rstrip(os.sep).endswith("xmipp_accel")


def test_values_persist_across_instances_and_are_kept_per_device(tmp_path):
    a = TuningCache(str(tmp_path), SIG_A)
    key = make_key("r2c", batch=30, shape=[4092, 5760])
    assert a.get("fft", key) is None
    assert a.get("fft", key, default=-1) == -1
    a.put("fft", key, {"ms": 9.1})
    a.put("kernel:x", "small", {"params": {"BLOCK": 128}})
    assert TuningCache(str(tmp_path), SIG_A).get("fft", key) == {"ms": 9.1}
    assert TuningCache(str(tmp_path), SIG_B).get("fft", key) is None  # another GPU model: no reuse
    assert TuningCache(str(tmp_path), SIG_A).kinds() == ["fft", "kernel:x"]
    data = json.loads(open(a.path).read())
    assert data["signature"] == SIG_A and data["entries"]["fft"][key] == {"ms": 9.1}


def test_a_second_instance_sees_updates_and_clear(tmp_path):
    a = TuningCache(str(tmp_path), SIG_A)
    b = TuningCache(str(tmp_path), SIG_A)
    a.put("fft", "k1", 1)
    assert b.get("fft", "k1") == 1
    b.put("fft", "k2", 2)
    assert a.items("fft") == {"k1": 1, "k2": 2}
    a.clear("fft")
    assert b.get("fft", "k1") is None


def test_make_key_is_canonical():
    assert make_key("a", x=1, y=[2, 3]) == make_key("a", y=[2, 3], x=1)
    assert make_key("a", 1) != make_key("a", 2)


def test_memory_only_and_non_json_values(tmp_path):
    m = TuningCache(signature=SIG_A, memory_only=True)
    m.put("k", "x", [1, 2])
    assert m.get("k", "x") == [1, 2] and m.path is None
    with pytest.raises(TypeError):
        TuningCache(str(tmp_path), SIG_A).put("k", "x", object())


def test_corrupt_file_is_ignored_and_rewritten(tmp_path):
    c = TuningCache(str(tmp_path), SIG_A)
    os.makedirs(tmp_path, exist_ok=True)
    with open(c.path, "w") as f:
        f.write("{not json")
    assert c.get("fft", "k") is None
    c.put("fft", "k", 3)
    assert TuningCache(str(tmp_path), SIG_A).get("fft", "k") == 3


def test_unwritable_folder_keeps_values_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder should be: makedirs fails
    c = TuningCache(str(blocker / "sub"), SIG_A)
    c.put("fft", "k", 5)
    assert c.get("fft", "k") == 5


def _writer(folder, worker, n):
    c = TuningCache(folder, SIG_A)
    for i in range(n):
        c.put("kind", f"w{worker}-{i}", {"worker": worker, "i": i})


def test_concurrent_processes_lose_no_entries(tmp_path):
    ctx = mp.get_context("spawn" if os.name == "nt" else "fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = TuningCache(str(tmp_path), SIG_A).items("kind")
    assert len(entries) == 60
    assert entries["w3-14"] == {"worker": 3, "i": 14}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_device_signature_without_gpu(monkeypatch):
    monkeypatch.setattr(tc.backend, "cupy_module", lambda: None)
    assert tc.device_signature()["device"] == "cpu"
    assert "cpu" in tc.signature_slug(tc.device_signature())
