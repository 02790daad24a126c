"""Fourier reconstruction of a map from aligned particles (``xmipp-accel reconstruct``)."""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import LEVEL_ADVANCED

import pwem.objects as emobj
from pwem.protocols import ProtReconstruct3D

from .. import constants as c
from . import convert
from .protocol_base import XmippAccelProtBase

CTF_CHOICES = list(c.CTF_MODES)  # auto, wiener, phase-flip, none


class XmippAccelProtReconstructFourier(XmippAccelProtBase, ProtReconstruct3D):
    """Reconstruct a 3D map from particles with projection alignment by direct Fourier inversion
    (gather-based insertion with a Kaiser-Bessel blob, Wiener CTF correction), on the GPU or CPU.

    With half maps, the particles are split by their random subset (RELION's rlnRandomSubset, or a
    balanced random split), both halves are reconstructed and their FSC gives the resolution.
    """
    _label = "reconstruct fourier (GPU)"
    _possibleOutputs = {"outputVolume": emobj.Volume, "outputFSC": emobj.FSC}

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        self._defineGpuParams(form)
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasAlignmentProj", important=True,
                      label="Input particles",
                      help="Particles with projection alignment (angles and shifts), e.g. the output of a 3D "
                           "refinement or of 'assign angles (GPU)'. Disabled particles are left out.")
        self._defineSymmetryParam(form, "particle", "The data are symmetrised once in Fourier space, so a high "
                                  "symmetry costs little.")
        form.addParam("maxRes", params.FloatParam, default=-1,
                      label="Maximum resolution (Å)",
                      help="Frequencies beyond this resolution are not used; -1 uses all of them (up to "
                           "Nyquist, twice the pixel size).")
        form.addParam("ctfMode", params.EnumParam, choices=CTF_CHOICES, default=0,
                      display=params.EnumParam.DISPLAY_HLIST,
                      label="CTF correction",
                      help="auto: Wiener when the particles have a CTF, none otherwise. wiener: accumulate "
                           "CTF*F and CTF^2 (best). phase-flip: correct the sign only. none: ignore the CTF.")
        form.addParam("doHalves", params.BooleanParam, default=True,
                      label="Reconstruct half maps and FSC?",
                      help="Also reconstruct the two half sets, attach them to the output map (for local "
                           "resolution, post-processing) and output their FSC.")
        form.addParam("pad", params.FloatParam, default=2.0, expertLevel=LEVEL_ADVANCED,
                      label="Padding factor",
                      help="Fourier padding of the particles before insertion (2 is accurate; 1 is faster "
                           "and uses less memory but leaves interpolation artefacts).")
        self._defineBatchSizeParam(form)
        self._defineSubsetSeedParam(form)
        form.addParallelSection(threads=1, mpi=1)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertCommandSteps(self.reconstructStep)

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        convert.write_particles_star(self.inputParticles.get(), self._getExtraPath("particles.star"),
                                     stack_dir=self._getTmpPath(), with_alignment=True,
                                     subset_seed=self.subsetSeed.get())

    def reconstructStep(self):
        args = [os.path.abspath(self._getExtraPath("particles.star")),
                "-o", os.path.abspath(self._getVolumeFn()),
                "--sym", self.symmetryGroup.get().strip(),
                "--pad", self.pad.get(),
                "--ctf", CTF_CHOICES[self.ctfMode.get()]]
        if self.maxRes.get() > 0:
            args += ["--max-res", self.maxRes.get()]
        if self.doHalves:
            args += ["--halves"]
        if self.batchSize.get() > 0:
            args += ["--batch", self.batchSize.get()]
        args += self._deviceArgs()
        self._runAccel("reconstruct", args, self._getExtraPath("reconstruct.json"),
                       numberOfMpi=self.numberOfMpi.get())

    def createOutputStep(self):
        particles = self.inputParticles.get()
        volume = emobj.Volume()
        volume.setFileName(self._getVolumeFn())
        volume.setSamplingRate(particles.getSamplingRate())
        if self.doHalves:
            volume.setHalfMaps([self._getVolumeFn("_half1"), self._getVolumeFn("_half2")])
        self._defineOutputs(outputVolume=volume)
        self._defineSourceRelation(self.inputParticles, volume)
        if self.doHalves:
            freq, values = convert.fsc_from_star(self._getVolumeFn("_fsc", ".star"))
            fsc = emobj.FSC(objLabel=self.getRunName())
            fsc.setData(freq.tolist(), values.tolist())
            self._defineOutputs(outputFSC=fsc)
            self._defineSourceRelation(self.inputParticles, fsc)

    # --------------------------- INFO functions -------------------------------
    def _validate(self):
        errors = self._validateGpu()
        errors += self._validateSymmetry(self.symmetryGroup.get())
        particles = self.inputParticles.get()
        if particles is not None:
            if not particles.hasAlignmentProj():
                errors.append("The input particles have no projection alignment (angles): run an angular "
                              "assignment or 3D refinement first.")
            mode = CTF_CHOICES[self.ctfMode.get()]
            if mode in (c.CTF_WIENER, c.CTF_PHASE_FLIP) and not particles.hasCTF():
                errors.append(f"CTF correction '{mode}' needs particles with a CTF: choose 'auto' or 'none'.")
            if self.doHalves and particles.getSize() < 2:
                errors.append("Half maps need at least 2 particles.")
        if self.pad.get() < 1:
            errors.append(f"Padding factor must be >= 1 (got {self.pad.get()}).")
        return errors

    def _summary(self):
        summary = []
        info = self._readJson(self._getExtraPath("reconstruct.json"))
        if self.hasAttribute("outputVolume"):
            summary.append(f"Map reconstructed from {info.get('particles', self.inputParticles.get().getSize())} "
                           f"particles with symmetry {self.symmetryGroup.get()}.")
            if self.hasAttribute("outputFSC"):
                summary.append(f"Resolution (FSC = 0.143 between half maps): "
                               f"{self._fscResolution(self.outputFSC)}.")
            seconds = info.get("seconds", info.get("time_s"))
            if seconds is not None:
                summary.append(f"Reconstruction time: {float(seconds):.1f} s on {info.get('device', 'the device')}.")
        else:
            summary.append("Output not ready yet.")
        return summary

    def _methods(self):
        if not self.hasAttribute("outputVolume"):
            return []
        text = (f"We reconstructed a 3D map from {self.inputParticles.get().getSize()} particles "
                f"({self.getObjectTag('inputParticles')}) by direct Fourier inversion with gather-based "
                f"GPU insertion [Strelak2019Reconstruction], symmetry {self.symmetryGroup.get()}, CTF "
                f"correction {CTF_CHOICES[self.ctfMode.get()]}.")
        if self.hasAttribute("outputFSC"):
            text += (" The resolution by the FSC = 0.143 criterion between half maps was "
                     f"{self._fscResolution(self.outputFSC)}.")
        return [text]

    def _citations(self):
        return ["Strelak2019Reconstruction"]

    # --------------------------- UTILS functions ------------------------------
    def _getVolumeFn(self, suffix: str = "", ext: str = ".mrc") -> str:
        return self._getExtraPath(f"volume{suffix}{ext}")
