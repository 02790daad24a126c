"""Payload descriptors: logical (shape, dims, padding, Fourier) and physical (memory kind, bytes), moves."""
from __future__ import annotations

import numpy as np
import pytest

from xmipp_accel.gpu.runtime import LogicalDescriptor, Payload, PhysicalDescriptor


def test_wrap_describes_an_image_stack():
    frames = np.zeros((30, 64, 48), np.float32)
    p = Payload.wrap(frames, padding=(0, 4), name="movie.tif")
    assert p.logical.shape == (30, 64, 48) and p.logical.dims == 2 and p.logical.batch == 30
    assert p.logical.spatial_shape == (64, 48) and p.logical.unpadded_shape == (64, 44)
    assert not p.logical.fourier
    assert p.physical.memory == "pageable" and p.physical.nbytes == frames.nbytes
    assert p.physical.dtype == np.float32 and not p.physical.on_gpu
    assert p.meta == {"name": "movie.tif"} and p.xp is np


def test_half_spectrum_volume_and_single_items():
    spec = np.zeros((5, 32, 32, 17), np.complex64)
    p = Payload.wrap(spec, dims=3, half=True)
    assert p.logical.fourier and p.logical.half and p.logical.unpadded_shape == (32, 32, 32)
    single = Payload.wrap(np.zeros((8, 8), np.float32))
    assert single.logical.shape == (1, 8, 8) and single.logical.batch == 1
    with pytest.raises(ValueError):
        single.subset(0, 1)


def test_fits_and_subset():
    ref = LogicalDescriptor((30, 4096, 4096), dims=2)
    p = Payload.wrap(np.zeros((40, 16, 16), np.float32))
    sub = p.subset(10, 25)
    assert sub.logical.batch == 15 and sub.physical.nbytes == 15 * 16 * 16 * 4
    small_ref = LogicalDescriptor((20, 16, 16))
    assert sub.logical.fits(small_ref) and not p.logical.fits(small_ref)  # 40 items > reference batch
    assert not sub.logical.fits(ref)
    assert not LogicalDescriptor((2, 16, 16), fourier=True).fits(small_ref)


def test_descriptor_validation():
    with pytest.raises(ValueError):
        LogicalDescriptor((4, 4), dims=3)
    with pytest.raises(ValueError):
        LogicalDescriptor((2, 4, 4), padding=(1,))
    with pytest.raises(ValueError):
        LogicalDescriptor((2, 4, 4), half=True)
    with pytest.raises(ValueError):
        PhysicalDescriptor("swap", 0, np.float32)


def test_host_payload_to_host_is_itself():
    p = Payload.wrap(np.ones((2, 3, 3)))
    assert p.to_host() is p


@pytest.mark.gpu
def test_round_trip_through_the_gpu():
    from xmipp_accel import backend
    cp = backend.cupy_module()
    host = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    pinned = backend.pinned_empty(host.shape, host.dtype)
    pinned[...] = host
    p = Payload.wrap(pinned, pinned=True)
    assert p.physical.memory == "pinned"
    d = p.to_device(0, stream=stream)
    stream.synchronize()
    assert d.physical.on_gpu and d.physical.gpu_id == 0 and d.xp is cp
    back = d.to_host(pinned=True, stream=stream)
    assert back.physical.memory == "pinned"
    np.testing.assert_array_equal(back.data, host)
    assert back.logical == p.logical
