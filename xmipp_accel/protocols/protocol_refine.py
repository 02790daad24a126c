"""Gold-standard 3D auto-refinement of particles from an initial model (``xmipp-accel refine``)."""
from __future__ import annotations

import os
import shutil

import pyworkflow.object as pwobj
import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import LEVEL_ADVANCED

import pwem.objects as emobj
from pwem.protocols import ProtRefine3D

from . import convert
from .protocol_assign_angles import SCORE_ATTR
from .protocol_base import XmippAccelProtBase

REFINE_DIR = "refine"          # OUTDIR of the command, under extra/
ITERATIONS = "iterations.jsonl"


class XmippAccelProtRefine3D(XmippAccelProtBase, ProtRefine3D):
    """3D auto-refinement with gold-standard half sets, from a low-resolution initial model to the best map
    the particles allow.

    The particles are split once into two half sets (their random subset when they carry one); each half is
    refined against its own map only: projection matching (a global search first, then local searches whose
    angular step shrinks with the resolution, CTF-multiplied references), Fourier reconstruction with Wiener
    CTF correction, FSC between the masked half maps. It stops when the resolution no longer improves or after
    the maximum number of iterations, then averages the halves and writes a sharpened map.
    """
    _label = "refine 3D (GPU)"
    _possibleOutputs = {"outputParticles": emobj.SetOfParticles, "outputVolume": emobj.Volume,
                        "outputFSC": emobj.FSC}

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        self._defineGpuParams(form)
        form.addParam("doContinue", params.BooleanParam, default=False,
                      label="Continue a previous refinement?",
                      help="Yes: start from the last finished iteration of an earlier run of this protocol on the "
                           "same particles (its poses, half sets and half maps), e.g. to run more iterations. "
                           "A run that was stopped and is launched again in 'Continue' mode resumes by itself.")
        form.addParam("continueRun", params.PointerParam, pointerClass="XmippAccelProtRefine3D",
                      condition="doContinue", allowsNull=True,
                      label="Refinement to continue",
                      help="An earlier 'refine 3D (GPU)' run with the same input particles.")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles to refine, with their CTF (e.g. after 2D classification). Their random "
                           "subset (_rlnRandomSubset) is kept when present, else a balanced random split is made. "
                           "Disabled particles are left out.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Initial model",
                      help="Low-resolution starting map (e.g. from initial-model generation), at the particles' "
                           "box and voxel size; a different size is resampled by the command (a note in the log).")
        self._defineSymmetryParam(form, "particle", "Only the asymmetric unit is searched and the half maps are "
                                  "symmetrised.")
        form.addParam("diameter", params.FloatParam, default=-1,
                      label="Particle diameter (Å)",
                      help="Diameter of the soft spherical mask and of the angular step rule "
                           "(step = resolution / (pi x radius)); -1 uses 90% of the box.")
        form.addParam("maxIterations", params.IntParam, default=10,
                      label="Maximum iterations",
                      help="The refinement stops earlier when the resolution has not improved for two iterations "
                           "and the poses move less than the angular step.")
        form.addParam("doCTF", params.BooleanParam, default=True,
                      label="CTF correction?",
                      help="Yes: references are multiplied by each particle's CTF and the maps are reconstructed "
                           "with Wiener CTF correction (the particles must have a CTF). No: ignore the CTF.")
        form.addParam("initialLowPass", params.FloatParam, default=30.0,
                      label="Initial low-pass (Å)",
                      help="The initial model is low-passed to this resolution for the first iteration, so that "
                           "its high-resolution details do not bias both half sets.")
        form.addParam("globalIterations", params.IntParam, default=1, expertLevel=LEVEL_ADVANCED,
                      label="Global search iterations",
                      help="First iterations with the exhaustive search over all directions; then local searches.")
        form.addParam("maxShift", params.FloatParam, default=-1, expertLevel=LEVEL_ADVANCED,
                      label="Maximum shift (px)",
                      help="Largest shift of the global search, pixels; -1 uses 10% of the box.")
        self._defineSubsetSeedParam(form)
        form.addParallelSection(threads=1, mpi=0)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertCommandSteps(self.refineStep)

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        convert.write_particles_star(self.inputParticles.get(), self._getInputStar(), stack_dir=self._getTmpPath(),
                                     with_alignment=False, with_ctf=self.doCTF.get(),
                                     subset_seed=self.subsetSeed.get())
        if self._continuesOther() and not os.path.exists(self._getRefineFn(ITERATIONS)):
            previous = self.continueRun.get()._getRefineFn()
            shutil.copytree(previous, self._getRefineFn(), dirs_exist_ok=True)

    def refineStep(self):
        particles = self.inputParticles.get()
        volume = os.path.abspath(convert.clean_image_path(self.inputVolume.get().getFileName()))
        args = [os.path.abspath(self._getInputStar()),
                "--initial-volume", volume,
                "-o", os.path.abspath(self._getRefineFn()), "--absolute-paths",
                "--symmetry", self.symmetryGroup.get().strip(),
                "--diameter", self._diameterA(particles),
                "--max-iterations", self.maxIterations.get(),
                "--initial-lowpass", self.initialLowPass.get(),
                "--global-iterations", self.globalIterations.get()]
        if self.maxShift.get() >= 0:
            args += ["--max-shift", self.maxShift.get()]
        if not self.doCTF:
            args += ["--no-ctf"]
        if os.path.exists(self._getRefineFn(ITERATIONS)):  # continued run, or this run relaunched
            args += ["--continue"]
        args += self._deviceArgs()
        self._runAccel("refine", args, self._getExtraPath("refine.json"))

    def createOutputStep(self):
        inputSet = self.inputParticles.get()
        star = self._getRefineFn("run_data.star")
        rows = convert.read_alignment_rows(star)
        subsets = self._readSubsets(star)
        stackMap = self._readStackMap()
        missing = []

        def updateItem(particle, _row):
            ref = convert.particle_ref(particle, stackMap)
            row = rows.get(ref)
            if row is None:
                missing.append(particle.getObjId())
                particle._appendItem = False
                return
            matrix = convert.transform_from_euler(row["rot"], row["tilt"], row["psi"],
                                                  row["shift_x_px"], row["shift_y_px"])
            particle.setTransform(emobj.Transform(matrix))
            if row["score"] is not None:
                setattr(particle, SCORE_ATTR, pwobj.Float(row["score"]))
            particle._rlnRandomSubset = pwobj.Integer(subsets[ref])

        outSet = self._createSetOfParticles()
        outSet.copyInfo(inputSet)
        outSet.setAlignmentProj()
        outSet.copyItems(inputSet, updateItemCallback=updateItem)
        if missing:
            self.warning(f"{len(missing)} particles were not in {star} and were left out "
                         f"(first ids: {missing[:10]}).")
        if outSet.getSize() == 0:
            raise RuntimeError(f"No particle of the input was found in {star}.")
        sampling = inputSet.getSamplingRate()
        volume = emobj.Volume()
        volume.setFileName(self._getRefineFn("run_class001.mrc"))
        volume.setSamplingRate(sampling)
        volume.setHalfMaps([self._getRefineFn("run_half1_class001.mrc"), self._getRefineFn("run_half2_class001.mrc")])
        freq, values = convert.fsc_from_star(self._getRefineFn("run_fsc.star"))
        fsc = emobj.FSC(objLabel=self.getRunName())
        fsc.setData(freq.tolist(), values.tolist())
        self._defineOutputs(outputParticles=outSet, outputVolume=volume, outputFSC=fsc)
        self._defineTransformRelation(self.inputParticles, outSet)
        self._defineSourceRelation(self.inputParticles, volume)
        self._defineSourceRelation(self.inputVolume, volume)
        self._defineSourceRelation(self.inputParticles, fsc)

    # --------------------------- INFO functions -------------------------------
    def _validate(self):
        errors = self._validateGpu()
        errors += self._validateSymmetry(self.symmetryGroup.get())
        particles = self.inputParticles.get()
        if particles is not None:
            if particles.getSize() < 2:
                errors.append("A gold-standard refinement needs at least 2 particles (one per half set).")
            if self.doCTF and not particles.hasCTF():
                errors.append("The input particles have no CTF: estimate it (and extract the particles with it) or "
                              "set 'CTF correction?' to No.")
            box_A = (particles.getXDim() or 0) * particles.getSamplingRate()
            if self.diameter.get() > 0 and box_A and self.diameter.get() > box_A:
                errors.append(f"Particle diameter {self.diameter.get():g} Å is larger than the box "
                              f"({box_A:.1f} Å).")
            if self.initialLowPass.get() < 2 * particles.getSamplingRate():
                errors.append(f"Initial low-pass {self.initialLowPass.get():g} Å is beyond Nyquist "
                              f"({2 * particles.getSamplingRate():.2f} Å).")
        if self.maxIterations.get() < 1:
            errors.append(f"Maximum iterations must be at least 1 (got {self.maxIterations.get()}).")
        if self.globalIterations.get() < 1:
            errors.append(f"Global search iterations must be at least 1 (got {self.globalIterations.get()}).")
        if self.doContinue:
            previous = self.continueRun.get()
            if previous is None:
                errors.append("Select the refinement to continue, or set 'Continue a previous refinement?' to No.")
            elif not os.path.exists(previous._getRefineFn(ITERATIONS)):
                errors.append(f"The run '{previous.getRunName()}' has no finished iteration to continue from.")
            elif particles is not None and previous.inputParticles.get() is not None \
                    and previous.inputParticles.get().getSize() != particles.getSize():
                errors.append("The refinement to continue used another number of particles "
                              f"({previous.inputParticles.get().getSize()}, here {particles.getSize()}).")
        return errors

    def _warnings(self):
        return self._resamplingWarnings(self.inputParticles.get(), self.inputVolume.get(), "The initial model")

    def _summary(self):
        if not self.hasAttribute("outputVolume"):
            return ["Output not ready yet."]
        info = self._readJson(self._getExtraPath("refine.json"))
        lines = [f"{self.outputParticles.getSize()} particles refined in {info.get('iterations', '?')} iterations "
                 f"(symmetry {self.symmetryGroup.get()})"
                 + ("" if info.get("converged", True) else ", stopped at the maximum number of iterations") + ".",
                 f"Resolution (FSC = 0.143 between half maps): {self._fscResolution(self.outputFSC)}."]
        if info.get("bfactor_A2") is not None:
            lines.append(f"B-factor (Guinier fit): {float(info['bfactor_A2']):.0f} Å²; sharpened map: "
                         f"{self._getRefineFn('run_class001_sharpened.mrc')}.")
        if info.get("seconds") is not None:
            lines.append(f"Time: {float(info['seconds']):.1f} s on {info.get('device', 'the device')}.")
        return lines

    def _methods(self):
        if not self.hasAttribute("outputVolume"):
            return []
        return [f"{self.inputParticles.get().getSize()} particles ({self.getObjectTag('inputParticles')}) were "
                f"refined from {self.getObjectTag('inputVolume')} (low-passed to {self.initialLowPass.get():g} Å) by "
                "gold-standard 3D auto-refinement (independent half sets, GPU projection matching and Fourier "
                f"reconstruction [Strelak2019Reconstruction]) with symmetry {self.symmetryGroup.get()}. The "
                f"resolution by the FSC = 0.143 criterion between half maps was {self._fscResolution(self.outputFSC)}."]

    def _citations(self):
        return ["Strelak2019Reconstruction"]

    # --------------------------- UTILS functions ------------------------------
    def _getRefineFn(self, name: str = "") -> str:
        """A file of the command's output folder (extra/refine/), or the folder itself."""
        return self._getExtraPath(REFINE_DIR, name) if name else self._getExtraPath(REFINE_DIR)

    def _getInputStar(self) -> str:
        return self._getExtraPath("input_particles.star")

    def _continuesOther(self) -> bool:
        return bool(self.doContinue) and self.continueRun.get() is not None

    def _diameterA(self, particles) -> float:
        if self.diameter.get() > 0:
            return float(self.diameter.get())
        return 0.9 * particles.getXDim() * particles.getSamplingRate()

    @staticmethod
    def _readSubsets(star: str) -> dict:
        """``{normalised image ref: rlnRandomSubset}`` of the refined particles STAR."""
        cols = convert.read_star_tables(star)["particles"]
        base = os.path.dirname(os.path.abspath(star))
        return {convert.normalize_ref(ref, base): int(s)
                for ref, s in zip(cols[convert.IMAGE_NAME], cols[convert.SUBSET])}

    def _readStackMap(self) -> dict:
        return convert.stack_map(self.inputParticles.get(), self._getInputStar())
