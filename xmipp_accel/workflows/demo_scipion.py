"""The demo as a scripted Scipion project: movies → movie alignment, and particles → angular
assignment → reconstruction with half maps → FSC and local resolution, with viewer plots saved.

Used by ``xmipp-accel demo --scipion``. Needs scipion-em (pwem) importable (tkinter included).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from ..errors import XmippAccelError


def _scipion_environment(outdir: str) -> None:
    """Set the variables pyworkflow reads at import time, unless the user set them already."""
    home = os.environ.get("SCIPION_HOME") or os.path.join(outdir, "scipion_home")
    hosts = os.path.join(home, "config", "hosts.conf")
    if not os.path.exists(hosts):
        os.makedirs(os.path.dirname(hosts), exist_ok=True)
        with open(hosts, "w") as f:
            f.write("[localhost]\nPARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s\n")
    for key, value in {"SCIPION_HOME": home, "SCIPION_DOMAIN": "pwem",
                       "SCIPION_USER_DATA": os.path.join(outdir, "scipion_userdata"),
                       "SCIPION_TEST_NOSYNC": "1", "SCIPION_NOTIFY": "False",
                       "SCIPION_PYTHON": sys.executable, "MPLBACKEND": "Agg"}.items():
        os.environ.setdefault(key, value)


def _write_movies(folder: str, n: int, shape=(256, 256), frames: int = 10, pixel_size_A: float = 1.0,
                  dose: float = 2.0) -> None:
    from ..em.synthetic_movies import make_movie
    from ..io.mrc import write_mrc
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        movie, _ = make_movie(shape, frames, dose_per_pixel=dose, seed=i)
        write_mrc(os.path.join(folder, f"movie_{i:02d}.mrcs"), movie, pixel_size_A)


def run_scipion_demo(args, outdir: str, *, box: int, n: int) -> dict:
    """Run the demo workflow in a new Scipion project; return the JSON summary."""
    _scipion_environment(outdir)
    try:
        from pwem.protocols import ProtImportMovies, ProtImportParticles, ProtImportVolumes
        from pyworkflow.project import Manager
    except ImportError as exc:
        raise XmippAccelError(
            f"the Scipion demo needs Scipion importable ({exc}): install scipion-em into a Python that has "
            "tkinter (Debian/Ubuntu: apt-get install python3-tk), or run the demo without --scipion") from None

    from ..em import synthetic
    from ..io.mrc import write_mrc
    from ..io.particles import write_particles_from_arrays
    from ..protocols import (XmippAccelProtAssignAngles, XmippAccelProtFSC, XmippAccelProtLocalResolution,
                             XmippAccelProtMovieAlign, XmippAccelProtReconstructFourier, convert)
    from .. import plots

    t0 = time.perf_counter()
    data = os.path.join(outdir, "data")
    os.makedirs(data, exist_ok=True)
    pixel = args.pixel_size
    # --- built-in data: a phantom, particles at unknown (to the workflow) orientations, a few movies
    truth_map = synthetic.phantom_volume(box, seed=args.seed)
    images, truth = synthetic.make_particles(truth_map, n, pixel_size_A=pixel, snr=args.snr, ctf=True,
                                             max_shift_px=2, seed=args.seed)
    write_mrc(os.path.join(data, "particles.mrcs"), images, pixel)
    star_path = os.path.join(data, "particles.star")
    write_particles_from_arrays(star_path, [f"{i + 1}@particles.mrcs" for i in range(n)], pixel, ctf=truth,
                                subset=truth["subset"], box_size=box)
    sqlite = os.path.join(data, "particles.sqlite")
    convert.star_to_particles(star_path, sqlite)
    # the reference: the true map low-passed to 4 pixels (a reference never has the final resolution)
    reference = synthetic.gaussian_lowpass(truth_map, resolution_A=4 * pixel, pixel_size_A=pixel)
    ref_path = os.path.join(data, "reference.mrc")
    write_mrc(ref_path, reference, pixel)
    truth_path = os.path.join(data, "truth_map.mrc")
    write_mrc(truth_path, truth_map, pixel)
    movies = os.path.join(data, "movies")
    _write_movies(movies, 2 if args.small else 4)

    use_gpu = not (getattr(args, "device", None) == "cpu")
    from ..backend import gpu_available
    use_gpu = use_gpu and gpu_available()
    gpu_kw = {"useGpu": use_gpu, "gpuList": "0"}

    manager = Manager()
    name = f"xmipp_accel_demo_{time.strftime('%Y%m%d_%H%M%S')}"
    project = manager.createProject(name)
    os.chdir(project.getPath())
    runs = []

    def launch(prot):
        project.launchProtocol(prot, wait=True)
        runs.append(prot)
        if not prot.isFinished():
            raise RuntimeError(f"protocol {prot.getRunName()} failed; see {prot.getLogPaths()[1]}")
        return prot

    summary = {"project": project.getPath(), "protocols": []}
    try:
        imp_movies = launch(project.newProtocol(
            ProtImportMovies, filesPath=movies, filesPattern="movie_*.mrcs", samplingRate=1.0, dosePerFrame=2.0,
            voltage=300, sphericalAberration=2.7, objLabel="import movies"))
        launch(project.newProtocol(XmippAccelProtMovieAlign, inputMovies=imp_movies.outputMovies,
                                   objLabel="movie alignment (xmipp_accel)", **gpu_kw))
        imp_parts = launch(project.newProtocol(
            ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_SCIPION, sqliteFile=sqlite,
            samplingRate=pixel, voltage=truth["voltage_kV"], sphericalAberration=truth["cs_mm"],
            amplitudeContrast=truth["amplitude_contrast"], objLabel="import particles"))
        imp_ref = launch(project.newProtocol(ProtImportVolumes, filesPath=ref_path, samplingRate=pixel,
                                             objLabel="import reference"))
        assign = launch(project.newProtocol(
            XmippAccelProtAssignAngles, inputParticles=imp_parts.outputParticles, inputVolume=imp_ref.outputVolume,
            symmetryGroup=args.sym, method=0, angularStep=10.0 if args.small else 5.0, maxShift=4.0,
            objLabel="angular assignment (xmipp_accel)", **gpu_kw))
        rec = launch(project.newProtocol(
            XmippAccelProtReconstructFourier, inputParticles=assign.outputParticles, symmetryGroup=args.sym,
            objLabel="reconstruction (xmipp_accel)", **gpu_kw))
        fsc = launch(project.newProtocol(XmippAccelProtFSC, inputVolume=rec.outputVolume,
                                         objLabel="FSC (xmipp_accel)", **gpu_kw))
        locres = launch(project.newProtocol(XmippAccelProtLocalResolution, inputVolume=rec.outputVolume,
                                            objLabel="local resolution (xmipp_accel)", **gpu_kw))
        freq, curve = fsc.outputFSC.getData()
        freq, curve = np.asarray(freq, float), np.asarray(curve, float)
        summary["resolution_A"] = float(fsc.outputFSC.calculateResolution(0.143))
        fsc_png = os.path.join(outdir, "scipion_fsc.png")
        plots.plot_fsc([("half maps", freq, curve)], fsc_png,
                       thresholds=(0.143,), title="xmipp_accel demo (Scipion)")
        from ..io.mrc import read_mrc
        locres_map, _ = read_mrc(os.path.abspath(locres.outputResolutionVolume.getFileName()))
        locres_png = os.path.join(outdir, "scipion_local_resolution.png")
        plots.plot_local_resolution(locres_map, locres_png)
        summary["plots"] = {"fsc": fsc_png, "local_resolution": locres_png}
    finally:
        for prot in runs:
            summary["protocols"].append({"label": prot.getObjLabel(), "class": prot.getClassName(),
                                         "status": prot.getStatus()})
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


