"""Angular assignment of particles against a reference map (``xmipp-accel assign-angles``)."""
from __future__ import annotations

import importlib.util
import os

import pyworkflow.object as pwobj
import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import LEVEL_ADVANCED

import pwem.objects as emobj
from pwem.protocols import ProtRefine3D

from .. import constants as c
from . import convert
from .protocol_base import XmippAccelProtBase

METHODS = [c.METHOD_PROJMATCH, c.METHOD_DEEPALIGN]
SCORE_ATTR = "_xmippAccelScore"


class XmippAccelProtAssignAngles(XmippAccelProtBase, ProtRefine3D):
    """Assign projection angles and shifts to particles against a reference map.

    projmatch: GPU projection matching over an even sampling of the sphere (reduced by symmetry),
    with in-plane rotation and shift search and a local refinement. deepalign: learned recognition of
    sphere regions from projections of the reference (DeepAlign), then matching restricted to the best
    regions and local refinement. The output is a copy of the input particles with projection alignment.
    """
    _label = "assign angles (GPU)"
    _possibleOutputs = {"outputParticles": emobj.SetOfParticles}

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        form.addSection(label="Input")
        self._defineGpuParams(form)
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Input particles",
                      help="Particles to align (their CTF, when present, is applied to the references).")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Reference map",
                      help="Map to project. A box or voxel size different from the particles' is resampled "
                           "by the command (with a note in the log).")
        self._defineSymmetryParam(form, "reference", "Only the asymmetric unit is searched.")
        form.addParam("method", params.EnumParam, choices=METHODS, default=0,
                      display=params.EnumParam.DISPLAY_HLIST,
                      label="Method",
                      help="projmatch: exhaustive projection matching (the trusted baseline). deepalign: "
                           "learned region recognition plus local matching (faster at high resolution; "
                           "needs PyTorch, the 'deep' extra).")
        form.addParam("angularStep", params.FloatParam, default=3.0,
                      label="Angular step (deg)",
                      help="Sampling of projection directions for projection matching (and of the final "
                           "local search for deepalign). 3 degrees gives median errors below 2 degrees at "
                           "SNR 1/3; larger steps are faster.")
        form.addParam("maxShift", params.FloatParam, default=-1,
                      label="Maximum shift (px)",
                      help="Largest shift searched, in pixels of the particles; -1 uses 10% of the box.")
        form.addParam("maxRes", params.FloatParam, default=-1,
                      label="Maximum resolution (Å)",
                      help="Only frequencies up to this resolution are compared; -1 lets the command "
                           "choose it from the sampling.")
        form.addParam("modelDir", params.PathParam, default="", condition="method == 1",
                      expertLevel=LEVEL_ADVANCED,
                      label="Trained models folder (optional)",
                      help="Reuse DeepAlign models trained earlier on the same reference (the 'models' folder "
                           "of a previous run). Empty: train new models in this run's folder.")
        form.addParam("trainSteps", params.IntParam, default=0, condition="method == 1",
                      expertLevel=LEVEL_ADVANCED,
                      label="Training steps per model",
                      help="DeepAlign training steps (one new batch of simulated images each) for each of its two "
                           "models; 0 uses the command's default. Ignored when trained models are reused.")
        self._defineBatchSizeParam(form)
        form.addParallelSection(threads=1, mpi=0)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertCommandSteps(self.assignStep)

    # --------------------------- STEPS functions -----------------------------
    def convertInputStep(self):
        particles = self.inputParticles.get()
        convert.write_particles_star(particles, self._getExtraPath("input_particles.star"),
                                     stack_dir=self._getTmpPath(), with_alignment=False)

    def assignStep(self):
        reference = os.path.abspath(convert.clean_image_path(self.inputVolume.get().getFileName()))
        args = [os.path.abspath(self._getExtraPath("input_particles.star")),
                "--reference", reference,
                "-o", os.path.abspath(self._getOutputStar()), "--absolute-paths",
                "--method", METHODS[self.method.get()],
                "--sym", self.symmetryGroup.get().strip(),
                "--angular-step", self.angularStep.get()]
        if self.maxShift.get() >= 0:
            args += ["--max-shift", self.maxShift.get()]
        if self.maxRes.get() > 0:
            args += ["--max-res", self.maxRes.get()]
        if METHODS[self.method.get()] == c.METHOD_DEEPALIGN:
            modelDir = self.modelDir.get("").strip() or self._getExtraPath("models")
            args += ["--model-dir", os.path.abspath(modelDir)]
            if self.trainSteps.get() > 0:
                args += ["--train-steps", self.trainSteps.get()]
        if self.batchSize.get() > 0:
            args += ["--batch", self.batchSize.get()]
        args += self._deviceArgs()
        self._runAccel("assign-angles", args, self._getExtraPath("assign_angles.json"))

    def createOutputStep(self):
        inputSet = self.inputParticles.get()
        rows = convert.read_alignment_rows(self._getOutputStar())
        stackMap = self._readStackMap()
        missing = []

        def updateItem(particle, _row):
            row = rows.get(convert.particle_ref(particle, stackMap))
            if row is None:
                missing.append(particle.getObjId())
                particle._appendItem = False
                return
            matrix = convert.transform_from_euler(row["rot"], row["tilt"], row["psi"],
                                                  row["shift_x_px"], row["shift_y_px"])
            particle.setTransform(emobj.Transform(matrix))
            if row["score"] is not None:
                setattr(particle, SCORE_ATTR, pwobj.Float(row["score"]))
            for attr, value in row["extra"].items():
                setattr(particle, attr, pwobj.Float(value))

        outSet = self._createSetOfParticles()
        outSet.copyInfo(inputSet)
        outSet.setAlignmentProj()
        outSet.copyItems(inputSet, updateItemCallback=updateItem)
        if missing:
            self.warning(f"{len(missing)} particles were not in {self._getOutputStar()} and were left out "
                         f"(first ids: {missing[:10]}).")
        if outSet.getSize() == 0:
            raise RuntimeError(f"No particle of the input was found in {self._getOutputStar()}.")
        self._defineOutputs(outputParticles=outSet)
        self._defineTransformRelation(self.inputParticles, outSet)
        self._defineSourceRelation(self.inputVolume, outSet)

    # --------------------------- INFO functions -------------------------------
    def _validate(self):
        errors = self._validateGpu()
        errors += self._validateSymmetry(self.symmetryGroup.get())
        if self.angularStep.get() <= 0 or self.angularStep.get() > 90:
            errors.append(f"Angular step must be in (0, 90] degrees (got {self.angularStep.get()}).")
        if METHODS[self.method.get()] == c.METHOD_DEEPALIGN and not self.useQueue() \
                and importlib.util.find_spec("torch") is None:
            errors.append("Method 'deepalign' needs PyTorch, which is not installed: pip install "
                          "'scipion-em-xmipp-accel[deep]', or choose 'projmatch'.")
        modelDir = self.modelDir.get("") or ""
        if modelDir.strip() and not os.path.isdir(modelDir.strip()):
            errors.append(f"Trained models folder '{modelDir}' does not exist.")
        particles, volume = self.inputParticles.get(), self.inputVolume.get()
        if particles is not None and particles.getSize() == 0:
            errors.append("The input particle set is empty.")
        if particles is not None and volume is not None and self.maxShift.get() > particles.getXDim() / 2:
            errors.append(f"Maximum shift {self.maxShift.get()} px is more than half the box "
                          f"({particles.getXDim()} px).")
        return errors

    def _warnings(self):
        return self._resamplingWarnings(self.inputParticles.get(), self.inputVolume.get(), "The reference")

    def _summary(self):
        if not self.hasAttribute("outputParticles"):
            return ["Output not ready yet."]
        info = self._readJson(self._getExtraPath("assign_angles.json"))
        lines = [f"{self.outputParticles.getSize()} particles aligned with {METHODS[self.method.get()]} "
                 f"(symmetry {self.symmetryGroup.get()}, step {self.angularStep.get():g} deg)."]
        seconds = info.get("seconds", info.get("time_s"))
        if seconds:
            lines.append(f"Time: {float(seconds):.1f} s ({self.outputParticles.getSize() / float(seconds):.1f} "
                         "particles/s).")
        if info.get("median_score") is not None:
            lines.append(f"Median score (correlation with the reference projection): {info['median_score']:.3f}.")
        if info.get("disagree_fraction") is not None:
            lines.append(f"{100 * info['disagree_fraction']:.1f}% of the particles flagged: the two DeepAlign "
                         "models disagree (attribute _xmippAccelDisagree = 1).")
        return lines

    def _methods(self):
        if not self.hasAttribute("outputParticles"):
            return []
        method = METHODS[self.method.get()]
        cite = "[JimenezMoreno2021DeepAlign]" if method == c.METHOD_DEEPALIGN else ""
        return [f"Projection directions and shifts of {self.inputParticles.get().getSize()} particles were "
                f"assigned against {self.getObjectTag('inputVolume')} by GPU "
                f"{'DeepAlign' if cite else 'projection matching'} {cite} with an angular step of "
                f"{self.angularStep.get():g} degrees and symmetry {self.symmetryGroup.get()}."]

    def _citations(self):
        return ["JimenezMoreno2021DeepAlign"] if METHODS[self.method.get()] == c.METHOD_DEEPALIGN else []

    # --------------------------- UTILS functions ------------------------------
    def _getOutputStar(self) -> str:
        return self._getExtraPath("particles_aligned.star")

    def _readStackMap(self) -> dict:
        return convert.stack_map(self.inputParticles.get(), self._getExtraPath("input_particles.star"))
