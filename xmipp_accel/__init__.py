"""xmipp_accel: GPU-accelerated single-particle analysis for Scipion.

FlexAlign movie alignment, DeepAlign-style angular assignment with GPU
projection matching, gather-based 3D Fourier reconstruction, FSC and local
resolution, and the machinery that makes them fast (FFT size advisor, kernel
autotuning, a task runtime). Algorithms live in :mod:`xmipp_accel.gpu`
(NumPy or CuPy), conventions in :mod:`xmipp_accel.em`, file formats in
:mod:`xmipp_accel.io`, the ``xmipp-accel`` command in :mod:`xmipp_accel.cli`
and the Scipion adapters in :mod:`xmipp_accel.protocols` and
:mod:`xmipp_accel.viewers`.

The Scipion ``Plugin`` class is created on first access (``xmipp_accel.Plugin``, as
Scipion's plugin discovery does), so that the algorithms and the command line work without
Scipion and do not pay for importing pwem; without pwem the attribute does not exist.
"""
import os
import sys

__version__ = "0.1.0"

_logo = "xmipp_accel_logo.png"
_references = ["Strelak2020FlexAlign", "Strelak2019Reconstruction", "JimenezMoreno2021DeepAlign",
               "Petrovic2020KTT", "Strelak2018cuFFTAdvisor", "Strelak2023Umpalumpa"]


def _define_plugin():
    """Create the ``Plugin`` class (imports pwem)."""
    import pwem
    import pyworkflow.utils as pwutils

    from . import constants as _c

    class Plugin(pwem.Plugin):
        """Scipion plugin for xmipp_accel (pure Python: nothing to install with installb)."""
        _homeVar = None
        _pathVars = []
        _supportedVersions = [__version__]
        _url = "https://github.com/scipion-em/scipion-em-xmipp-accel"

        @classmethod
        def _defineVariables(cls):
            cls._defineVar(_c.XMIPP_ACCEL_DEVICE, "auto")
            cls._defineVar(_c.XMIPP_ACCEL_GPU, "")
            cls._defineVar(_c.XMIPP_ACCEL_CACHE, "")
            cls._defineVar(_c.XMIPP_ACCEL_PYTHON, sys.executable)
            cls._defineVar(_c.XMIPP_ACCEL_CHIMERAX, "ChimeraX")

        @classmethod
        def getEnviron(cls):
            """Environment for ``runJob``: our variables exported, progress bars off in logs."""
            env = pwutils.Environ(os.environ)
            for var in (_c.XMIPP_ACCEL_DEVICE, _c.XMIPP_ACCEL_CACHE):
                value = cls.getVar(var)
                if value:
                    env[var] = value
            env["PYTHONUNBUFFERED"] = "1"
            env.setdefault("TQDM_MININTERVAL", "10")  # keep progress bars from flooding run.stderr
            return env

        @classmethod
        def gpuAvailable(cls) -> bool:
            """True when CuPy can use a CUDA device on this machine (imports CuPy lazily, once)."""
            if not hasattr(cls, "_gpuAvailable"):
                from . import backend
                cls._gpuAvailable = bool(backend.gpu_available())
            return cls._gpuAvailable

        @classmethod
        def getGpuError(cls) -> str:
            """The message a protocol shows when a GPU is requested but none is usable."""
            return ("No usable GPU was found on this machine (CuPy is missing or sees no CUDA device). "
                    "Set 'Use GPU?' to No to run on the CPU (same results, slower), or install the "
                    "GPU extra: pip install 'scipion-em-xmipp-accel[gpu]'.")

        @classmethod
        def getCommand(cls) -> str:
            """The program that protocols run: ``<python> -m xmipp_accel``."""
            return f"{cls.getVar(_c.XMIPP_ACCEL_PYTHON) or sys.executable} -m xmipp_accel"

        @classmethod
        def validateInstallation(cls):
            """Return a list of problems (empty when fine)."""
            errors = []
            for module, package in (("mrcfile", "mrcfile"), ("tifffile", "tifffile"), ("scipy", "scipy")):
                try:
                    __import__(module)
                except ImportError:
                    errors.append(f"{module} is missing: pip install {package}")
            python = cls.getVar(_c.XMIPP_ACCEL_PYTHON)
            if python and os.path.isabs(python) and not os.path.exists(python):
                errors.append(f"{_c.XMIPP_ACCEL_PYTHON}={python} does not exist: unset it or point it to the "
                              "Python that has xmipp_accel installed")
            return errors

        @classmethod
        def defineBinaries(cls, env):
            """Pure-Python plugin: dependencies come from pip (extras gpu, deep, mpi)."""

    Plugin.__qualname__ = "Plugin"
    return Plugin


def __getattr__(name):
    """Module attribute hook: build ``Plugin`` when it is first asked for (PEP 562)."""
    if name == "Plugin":
        try:
            plugin = _define_plugin()
        except ImportError as exc:  # Scipion (pwem) is not installed
            raise AttributeError(f"xmipp_accel.Plugin needs Scipion (pwem): {exc}") from exc
        globals()["Plugin"] = plugin
        return plugin
    raise AttributeError(f"module 'xmipp_accel' has no attribute {name!r}")
