"""Global (FSC) and local resolution from two half maps (``xmipp-accel fsc`` / ``local-resolution``)."""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import LEVEL_ADVANCED

import pwem.objects as emobj
from pwem.protocols import ProtAnalysis3D

from . import convert
from .protocol_base import XmippAccelProtBase

INPUT_HALVES_OF_VOLUME, INPUT_TWO_VOLUMES = 0, 1


class XmippAccelProtResolutionBase(XmippAccelProtBase):
    """Inputs shared by the FSC and local-resolution protocols (a mixin, not a protocol)."""

    def _defineInputParams(self, form):
        form.addSection(label="Input")
        self._defineGpuParams(form)
        form.addParam("inputType", params.EnumParam, default=INPUT_HALVES_OF_VOLUME,
                      choices=["map with half maps", "two half maps"],
                      display=params.EnumParam.DISPLAY_HLIST,
                      label="Input",
                      help="'map with half maps': a map that carries its half maps (e.g. the output of "
                           "'reconstruct fourier (GPU)' or of a RELION refinement). 'two half maps': pick "
                           "both half maps yourself.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume",
                      condition=f"inputType == {INPUT_HALVES_OF_VOLUME}", allowsNull=True,
                      label="Map with half maps",
                      help="A map whose half maps are stored with it in the project.")
        form.addParam("half1", params.PointerParam, pointerClass="Volume",
                      condition=f"inputType == {INPUT_TWO_VOLUMES}", allowsNull=True,
                      label="Half map 1", help="First half map (reconstructed from one half of the data).")
        form.addParam("half2", params.PointerParam, pointerClass="Volume",
                      condition=f"inputType == {INPUT_TWO_VOLUMES}", allowsNull=True,
                      label="Half map 2", help="Second half map, same box and voxel size as the first.")
        form.addParam("mask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      label="Mask (optional)",
                      help="Soft mask around the particle (values 0..1), same box as the maps. Leave empty "
                           "to use no mask.")

    # --------------------------- UTILS functions ------------------------------
    def _getInputMap(self):
        """The Volume whose half maps are used (the first half map with two volumes)."""
        if self.inputType.get() == INPUT_HALVES_OF_VOLUME:
            return self.inputVolume.get()
        return self.half1.get()

    def _getHalfMaps(self) -> list:
        """Absolute paths of the two half maps ([] when not available)."""
        if self.inputType.get() == INPUT_HALVES_OF_VOLUME:
            vol = self.inputVolume.get()
            if vol is None or not vol.hasHalfMaps():
                return []
            halves = [convert.clean_image_path(h) for h in vol.getHalfMaps(asList=True)]
        else:
            if self.half1.get() is None or self.half2.get() is None:
                return []
            halves = [convert.clean_image_path(self.half1.get().getFileName()),
                      convert.clean_image_path(self.half2.get().getFileName())]
        return [os.path.abspath(h) for h in halves]

    def _getSampling(self) -> float:
        vol = self._getInputMap()
        return float(vol.getSamplingRate()) if vol is not None else 0.0

    def _maskArgs(self) -> list:
        if self.mask.get() is None:
            return []
        return ["--mask", os.path.abspath(convert.clean_image_path(self.mask.get().getFileName()))]

    def _validateInputs(self) -> list:
        errors = self._validateGpu()
        if self.inputType.get() == INPUT_HALVES_OF_VOLUME:
            vol = self.inputVolume.get()
            if vol is None:
                errors.append("Select the input map (with half maps).")
            elif not vol.hasHalfMaps() or len(vol.getHalfMaps(asList=True)) != 2:
                errors.append("The input map has no half maps attached: choose 'two half maps' and select "
                              "them, or use a map from a reconstruction that produced half maps.")
        else:
            h1, h2 = self.half1.get(), self.half2.get()
            if h1 is None or h2 is None:
                errors.append("Select both half maps.")
            else:
                if h1.getDim() != h2.getDim():
                    errors.append(f"The half maps differ in size: {h1.getDim()} and {h2.getDim()}.")
                if abs(h1.getSamplingRate() - h2.getSamplingRate()) > 1e-3 * h1.getSamplingRate():
                    errors.append(f"The half maps differ in voxel size: {h1.getSamplingRate()} and "
                                  f"{h2.getSamplingRate()} Å.")
        ref = self._getInputMap()
        mask = self.mask.get()
        if ref is not None and mask is not None and ref.getDim() and mask.getDim() \
                and tuple(mask.getDim()) != tuple(ref.getDim()):
            errors.append(f"The mask box {mask.getDim()} differs from the maps' box {ref.getDim()}.")
        return errors


class XmippAccelProtFSC(XmippAccelProtResolutionBase, ProtAnalysis3D):
    """Fourier shell correlation between two half maps: resolution at FSC = 0.143 (and 0.5, half-bit),
    with an optional mask and RELION's phase-randomisation correction of the masked FSC.
    """
    _label = "fsc (GPU)"
    _possibleOutputs = {"outputFSC": emobj.FSC}

    def _defineParams(self, form):
        self._defineInputParams(form)
        form.addParam("threshold", params.FloatParam, default=0.143, expertLevel=LEVEL_ADVANCED,
                      label="FSC threshold",
                      help="Threshold reported in the summary (0.143 for half maps; the command also "
                           "reports 0.5 and the half-bit criterion).")
        form.addParallelSection(threads=1, mpi=0)

    def _insertAllSteps(self):
        self._insertCommandSteps(self.fscStep, convert=False)

    def fscStep(self):
        half1, half2 = self._getHalfMaps()
        args = [half1, half2, "--pixel-size", self._getSampling(),
                "-o", os.path.abspath(self._getExtraPath("fsc.star")),
                "--xml", os.path.abspath(self._getExtraPath("fsc.xml")),
                "--plot", os.path.abspath(self._getExtraPath("fsc.png"))]
        args += self._maskArgs() + self._deviceArgs()
        self._runAccel("fsc", args, self._getExtraPath("fsc.json"))

    def createOutputStep(self):
        freq, values = convert.fsc_from_star(self._getExtraPath("fsc.star"))
        fsc = emobj.FSC(objLabel=self.getRunName())
        fsc.setData(freq.tolist(), values.tolist())
        self._defineOutputs(outputFSC=fsc)
        self._defineSourceRelation(self._getInputPointer(), fsc)

    def _getInputPointer(self):
        return self.inputVolume if self.inputType.get() == INPUT_HALVES_OF_VOLUME else self.half1

    def _validate(self):
        errors = self._validateInputs()
        if not 0 < self.threshold.get() < 1:
            errors.append(f"FSC threshold must be between 0 and 1 (got {self.threshold.get()}).")
        return errors

    def _summary(self):
        if not self.hasAttribute("outputFSC"):
            return ["Output not ready yet."]
        lines = [f"Resolution (FSC = {self.threshold.get():g}): "
                 f"{self._fscResolution(self.outputFSC, self.threshold.get())}"
                 + (" (masked, corrected)" if self.mask.get() is not None else "")]
        info = self._readJson(self._getExtraPath("fsc.json"))
        for key, label in (("resolution_A_0.5", "FSC = 0.5"), ("resolution_A_half-bit", "half-bit"),
                           ("resolution_A_unmasked", "FSC = 0.143, unmasked")):
            if info.get(key):
                lines.append(f"Resolution ({label}): {float(info[key]):.2f} Å")
        return lines

    def _methods(self):
        if not self.hasAttribute("outputFSC"):
            return []
        return [f"The resolution of {self.getObjectTag(self._getInputPointer())} was "
                f"{self._fscResolution(self.outputFSC)} by the FSC = 0.143 criterion between "
                "half maps" + (", masked, with phase-randomisation correction." if self.mask.get() else ".")]

    def _citations(self):
        return []


class XmippAccelProtLocalResolution(XmippAccelProtResolutionBase, ProtAnalysis3D):
    """Local resolution from two half maps: a local FSC whose window follows the resolution tested,
    computed on the GPU, giving a map of resolution in Å (solvent excluded), its histogram and a
    ChimeraX script colouring the map surface.
    """
    _label = "local resolution (GPU)"
    _possibleOutputs = {"outputResolutionVolume": emobj.Volume}

    def _defineParams(self, form):
        self._defineInputParams(form)
        form.addParam("periods", params.FloatParam, default=8.0,
                      label="Window size (wavelengths)",
                      help="The local FSC at resolution d Å is measured in a soft window of periods x d Å "
                           "(Gaussian, sigma = window/4). Larger windows are less noisy but less local.")
        form.addParam("windowMax", params.FloatParam, default=0.0, expertLevel=LEVEL_ADVANCED,
                      label="Largest window (px)",
                      help="Upper limit of the window in pixels; 0 = half the box. It also sets the worst "
                           "resolution measured (window/2 px).")
        form.addParam("threshold", params.FloatParam, default=0.143, expertLevel=LEVEL_ADVANCED,
                      label="Local FSC threshold",
                      help="FSC value at which the local resolution is read (0.143 as for the global FSC).")
        form.addParallelSection(threads=1, mpi=0)

    def _insertAllSteps(self):
        self._insertCommandSteps(self.localResolutionStep, convert=False)

    def localResolutionStep(self):
        half1, half2 = self._getHalfMaps()
        args = [half1, half2, "-o", os.path.abspath(self.getResolutionMapFn()),
                "--plot", os.path.abspath(self._getExtraPath("local_resolution.png")),
                "--chimerax", os.path.abspath(self.getChimeraScriptFn())]
        args += ["--periods", self.periods.get()]
        if self.windowMax.get() > 0:
            args += ["--window-max", self.windowMax.get()]
        if self.inputType.get() == INPUT_HALVES_OF_VOLUME:  # colour the map itself in ChimeraX
            args += ["--map", self.getMapFn()]
        if abs(self.threshold.get() - 0.143) > 1e-9:
            args += ["--threshold", self.threshold.get()]
        args += ["--pixel-size", self._getSampling()]
        args += self._maskArgs() + self._deviceArgs()
        self._runAccel("local-resolution", args, self._getExtraPath("local_resolution.json"))

    def createOutputStep(self):
        vol = emobj.Volume()
        vol.setFileName(self.getResolutionMapFn())
        vol.setSamplingRate(self._getSampling())
        self._defineOutputs(outputResolutionVolume=vol)
        src = self.inputVolume if self.inputType.get() == INPUT_HALVES_OF_VOLUME else self.half1
        self._defineSourceRelation(src, vol)

    def _validate(self):
        errors = self._validateInputs()
        if self.periods.get() < 2:
            errors.append(f"The window must span at least 2 wavelengths (got {self.periods.get()}).")
        ref = self._getInputMap()
        w_max = self.windowMax.get()
        if ref is not None and w_max > 0 and ref.getXDim() and w_max > ref.getXDim():
            errors.append(f"Largest window {w_max} px is larger than the box ({ref.getXDim()} px).")
        if not 0 < self.threshold.get() < 1:
            errors.append(f"Local FSC threshold must be between 0 and 1 (got {self.threshold.get()}).")
        return errors

    def _summary(self):
        if not self.hasAttribute("outputResolutionVolume"):
            return ["Output not ready yet."]
        info = self._readJson(self._getExtraPath("local_resolution.json"))
        lines = ["Local resolution map computed."]
        if info.get("median_A") is not None:
            lines.append(f"Median {float(info['median_A']):.2f} Å; 25-75%: {float(info['p25_A']):.2f}-"
                         f"{float(info['p75_A']):.2f} Å; 5-95%: {float(info['p5_A']):.2f}-"
                         f"{float(info['p95_A']):.2f} Å.")
        return lines

    def _methods(self):
        if not self.hasAttribute("outputResolutionVolume"):
            return []
        return ["The local resolution was estimated by a windowed local FSC between half maps computed on "
                "the GPU (xmipp_accel)."]

    def _citations(self):
        return []

    # --------------------------- UTILS functions ------------------------------
    def getResolutionMapFn(self) -> str:
        return self._getExtraPath("local_resolution.mrc")

    def getChimeraScriptFn(self) -> str:
        return self._getExtraPath("local_resolution.cxc")

    def getMapFn(self) -> str:
        """The map coloured by local resolution: the input map, or the average of the two half maps."""
        if self.inputType.get() == INPUT_HALVES_OF_VOLUME:
            return os.path.abspath(convert.clean_image_path(self.inputVolume.get().getFileName()))
        return os.path.abspath(os.path.splitext(self.getResolutionMapFn())[0] + "_halves_average.mrc")
