"""What every xmipp_accel protocol shares: the GPU parameters and their validation, and running
the ``xmipp-accel`` command through ``runJob`` with its ``--json`` summary captured.

The mixin is not a protocol itself (it does not derive from ``Protocol``), so Scipion does not
list it in the protocol tree.
"""
from __future__ import annotations

import json
import os
import shlex
from typing import Optional, Sequence

import numpy as np

import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU

from .. import Plugin
from ..constants import COMMAND

GPU_PLACEHOLDER = "%(GPU)s"


class XmippAccelProtBase:
    """Mixin for xmipp_accel protocols (put it first among the bases)."""

    # -------------------------- DEFINE param functions -----------------------
    @staticmethod
    def _defineGpuParams(form, allowCpu: bool = True) -> None:
        """Hidden GPU parameters shown by Scipion in the run header ("GPU IDs")."""
        if allowCpu:
            form.addHidden(USE_GPU, params.BooleanParam, default=True,
                           label="Use GPU?",
                           help="Yes: compute on the GPUs listed in 'GPU IDs' (CuPy). No: compute on the CPU "
                                "with NumPy; the results are the same, only slower.")
        form.addHidden(GPU_LIST, params.StringParam, default="0",
                       label="GPU IDs",
                       help="GPU ids to use, separated by spaces or commas, e.g. '0' or '0 1'. With several "
                            "ids the work is shared between the GPUs. Repeating an id (e.g. '0 0 0 0') runs "
                            "several workers on the same card in streaming protocols, which overlaps one "
                            "worker's reading and writing with another's GPU work (H100, 24-frame 2k movies: "
                            "130 movies/min with 4 workers, 100 with 1).")

    @staticmethod
    def _defineSymmetryParam(form, what: str = "particle", note: str = "") -> None:
        """The ``symmetryGroup`` parameter (Xmipp's names; the symmetry wizard fills it)."""
        form.addParam("symmetryGroup", params.StringParam, default="c1",
                      label="Symmetry group",
                      help=f"Point group of the {what} in Xmipp's naming: c1 (none), cN, dN, t, o, i1..i4 "
                           f"(i = i2). Use the wizard to pick one.{(' ' + note) if note else ''}")

    @staticmethod
    def _defineBatchSizeParam(form) -> None:
        """The expert ``batchSize`` parameter: particles per GPU batch (0: from the free GPU memory)."""
        form.addParam("batchSize", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED,
                      label="Batch size (particles)",
                      help="Particles sent to the GPU at a time; 0 chooses it from the free GPU memory.")

    @staticmethod
    def _defineSubsetSeedParam(form) -> None:
        """The expert ``subsetSeed`` parameter: seed of the half-set split of particles without one."""
        form.addParam("subsetSeed", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed of the half-set split",
                      help="Used only when the particles carry no random subset (rlnRandomSubset).")

    # --------------------------- INSERT steps functions ----------------------
    def _insertCommandSteps(self, commandStep, convert: bool = True) -> None:
        """The steps of every protocol here: convert the inputs (CPU; when ``convert``), run the
        ``xmipp-accel`` command (``commandStep``, on the GPUs), register the outputs (CPU)."""
        if convert:
            self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(commandStep, needsGPU=True)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- INFO functions -------------------------------
    def _usesGpu(self) -> bool:
        return bool(self.getAttributeValue(USE_GPU, True))

    def _validateGpu(self) -> list:
        """Concrete messages when a GPU is requested but cannot be used."""
        if not self._usesGpu():
            return []
        errors = []
        gpus = str(self.getAttributeValue(GPU_LIST, "") or "").replace(",", " ").split()
        if not gpus:
            errors.append("'GPU IDs' is empty: give at least one GPU id (e.g. 0) or set 'Use GPU?' to No.")
        elif not all(g.isdigit() for g in gpus):
            errors.append(f"'GPU IDs' must be GPU numbers separated by spaces, e.g. '0 1' (got "
                          f"'{self.getAttributeValue(GPU_LIST)}').")
        # With a queue the protocol runs on another node: the GPU is checked there.
        if not errors and not self.useQueue() and not Plugin.gpuAvailable():
            errors.append(Plugin.getGpuError())
        return errors

    @staticmethod
    def _validateSymmetry(sym: str, label: str = "Symmetry group") -> list:
        from ..em.symmetry import is_valid_symmetry
        sym = (sym or "").strip()
        if not sym:
            return [f"'{label}' is empty: write c1 for no symmetry."]
        if not is_valid_symmetry(sym):
            return [f"'{label}' = '{sym}' is not a symmetry group xmipp_accel knows. Use c1 (none), cN, dN, "
                    "t, o, i (= i2) or i1..i4 (Xmipp naming; the wizard lists them)."]
        return []

    # --------------------------- UTILS functions ------------------------------
    def _deviceArgs(self) -> list:
        """``--device``/``--gpus`` for the command: the step's GPUs come in through ``%(GPU)s``."""
        if self._usesGpu():
            return ["--device", "gpu", "--gpus", GPU_PLACEHOLDER]
        return ["--device", "cpu"]

    @staticmethod
    def _accelArgs(subcommand: str, args: Sequence, jsonFile: str) -> str:
        """The argument string given to ``runJob``: shell-quoted, ``--json``, stdout redirected to ``jsonFile``.

        When ``%(GPU)s`` is present Scipion applies ``%`` formatting to the string, so any other ``%``
        (e.g. in a file name) is doubled; without it the string is used as is.
        """
        args = [str(a) for a in args] + ["--json"]
        substituted = any(GPU_PLACEHOLDER in a for a in args)
        quoted = []
        for a in args:
            if a == GPU_PLACEHOLDER:
                quoted.append(f'"{GPU_PLACEHOLDER}"')
            else:
                q = shlex.quote(a)
                quoted.append(q.replace("%", "%%") if substituted else q)
        redirect = shlex.quote(os.path.abspath(jsonFile))
        if substituted:
            redirect = redirect.replace("%", "%%")
        return " ".join([subcommand] + quoted) + " > " + redirect

    def _runAccel(self, subcommand: str, args: Sequence, jsonFile: str, *,
                  numberOfMpi: Optional[int] = None, cwd: Optional[str] = None, concurrent: int = 1) -> dict:
        """Run ``xmipp-accel <subcommand> ARGS --json`` through ``runJob`` and return its JSON summary.

        The command's standard output goes to ``jsonFile`` (its human-readable lines are copied to
        the run log afterwards); its standard error (warnings, progress) goes to the run log.
        ``%(GPU)s`` in ``args`` is replaced by Scipion with the GPUs of the step. ``concurrent``: how
        many such commands this protocol runs at once on the node; each then gets its share of the
        cores for its BLAS/OpenMP threads (:mod:`xmipp_accel.threads`).
        """
        from ..threads import with_thread_limits
        argStr = self._accelArgs(subcommand, args, jsonFile)
        kwargs = {"env": with_thread_limits(Plugin.getEnviron(), concurrent)}
        if numberOfMpi is not None:
            kwargs["numberOfMpi"] = numberOfMpi
        if cwd is not None:
            kwargs["cwd"] = cwd
        try:
            self.runJob(Plugin.getCommand(), argStr, **kwargs)
        finally:
            lines = []
            if os.path.exists(jsonFile):
                with open(jsonFile) as f:
                    lines = f.read().splitlines()
            for line in lines[:-1]:
                self.info(line)
        if not lines:
            raise RuntimeError(f"{COMMAND} {subcommand} printed no JSON summary (see {jsonFile} and the log)")
        try:
            summary = json.loads(lines[-1])
        except ValueError:
            self.info(lines[-1])
            raise RuntimeError(f"{COMMAND} {subcommand}: the last line of {jsonFile} is not JSON") from None
        with open(jsonFile, "w") as f:  # keep only the summary
            json.dump(summary, f, indent=1)
        return summary

    @staticmethod
    def _fscResolution(fsc, threshold: float = 0.143) -> str:
        """Resolution of a pwem FSC at ``threshold`` as text, e.g. ``"4.21 Å"``.

        Unlike ``FSC.calculateResolution`` (which extrapolates beyond the last shell), a curve that
        never falls below the threshold is reported as Nyquist.
        """
        freq, values = (np.asarray(list(v), dtype=np.float64) for v in fsc.getData())
        if freq.size < 2:
            return "unknown"
        if not np.any(values[1:] < threshold):
            return f"{1.0 / freq[-1]:.2f} Å (FSC above {threshold:g} up to Nyquist)"
        return f"{float(fsc.calculateResolution(threshold, 4)):.2f} Å"

    @staticmethod
    def _resamplingWarnings(particles, volume, what: str = "The reference") -> list:
        """A warning when a map's box or pixel size differs from the particles' (the CLI resamples it)."""
        if particles is None or volume is None:
            return []
        ps, vs = particles.getSamplingRate(), volume.getSamplingRate()
        if abs(ps - vs) > 0.01 * ps or particles.getXDim() != volume.getXDim():
            return [f"{what} ({volume.getXDim()} px, {vs:.3f} Å/px) differs from the particles "
                    f"({particles.getXDim()} px, {ps:.3f} Å/px): it will be resampled."]
        return []

    @staticmethod
    def _readJson(path: str) -> dict:
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)
