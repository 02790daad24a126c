"""pytest setup: a self-contained Scipion environment (set before pyworkflow is imported),
the ``gpu`` marker and an ``xp`` fixture running a test on NumPy and, where a GPU is usable, CuPy."""
import os
import sys
import tempfile

_root = os.environ.get("XMIPP_ACCEL_TEST_ROOT") or tempfile.mkdtemp(prefix="xmipp_accel_scipion_")
_home = os.path.join(_root, "home")
os.makedirs(os.path.join(_home, "config"), exist_ok=True)
_hosts = os.path.join(_home, "config", "hosts.conf")
if not os.path.exists(_hosts):
    with open(_hosts, "w") as f:
        f.write("[localhost]\nPARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s\n")
for _k, _v in {"SCIPION_HOME": _home, "SCIPION_DOMAIN": "pwem",
               "SCIPION_USER_DATA": os.path.join(_root, "userdata"),
               "SCIPION_TEST_NOSYNC": "1", "SCIPION_NOTIFY": "False",
               "SCIPION_PYTHON": sys.executable, "MPLBACKEND": "Agg",
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# ../shared/data beside the checkout; XMIPP_ACCEL_SHARED_DATA points elsewhere (a git worktree in another folder).
SHARED_DATA = os.path.abspath(os.environ.get("XMIPP_ACCEL_SHARED_DATA")
                              or os.path.join(os.path.dirname(__file__), "..", "shared", "data"))


def _gpu_ok():
    from xmipp_accel import backend
    return backend.gpu_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU with CuPy (skipped otherwise)")
    config.addinivalue_line("markers", "scipion: needs Scipion (pyworkflow + pwem with tkinter)")
    config.addinivalue_line("markers", "slow: longer tests (still run in CI)")


def pytest_collection_modifyitems(config, items):
    if _gpu_ok():
        return
    skip = pytest.mark.skip(reason="no usable GPU (CuPy missing or no CUDA device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: numpy always, cupy where a GPU is usable."""
    if request.param == "numpy":
        return np
    from xmipp_accel import backend
    return backend.cupy_module()


@pytest.fixture
def shared_data():
    """Path of ../shared/data (or $XMIPP_ACCEL_SHARED_DATA); skips the test when that folder is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA
