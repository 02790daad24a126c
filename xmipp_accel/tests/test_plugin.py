"""The Scipion plugin as pyworkflow sees it: discovery, protocols, viewers, wizards, citations, forms,
menu entries and the streaming template (no project, no protocol run)."""
from __future__ import annotations

import json
import os
import re

import pytest

pytest.importorskip("pwem.protocols", reason="Scipion (pwem with tkinter) not importable here")

import pyworkflow.protocol.params as params  # noqa: E402
from pyworkflow.plugin import Domain  # noqa: E402
from pyworkflow.viewer import DESKTOP_TKINTER  # noqa: E402

import xmipp_accel  # noqa: E402

pytestmark = pytest.mark.scipion

PROTOCOLS = ["XmippAccelProtMovieAlign", "XmippAccelProtAssignAngles", "XmippAccelProtReconstructFourier",
             "XmippAccelProtFSC", "XmippAccelProtLocalResolution", "XmippAccelProtRefine3D"]
PKG = os.path.dirname(xmipp_accel.__file__)


@pytest.fixture(scope="module")
def plugin():
    Domain.getPlugins()  # discovery from the pyworkflow.plugin entry point
    return Domain.getPluginModule("xmipp_accel")


def test_plugin_is_discovered(plugin):
    assert plugin is xmipp_accel
    assert issubclass(plugin.Plugin, __import__("pwem").Plugin)
    assert plugin.Plugin.getCommand().endswith("-m xmipp_accel")
    env = plugin.Plugin.getEnviron()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert plugin.Plugin.validateInstallation() == []


def test_protocols_viewers_wizards_are_registered(plugin):
    protocols = Domain.getProtocols()
    for name in PROTOCOLS:
        assert name in protocols, f"{name} not discovered"
        assert protocols[name].__module__.startswith("xmipp_accel.protocols")
    # the mixins are not protocols
    assert "XmippAccelProtBase" not in protocols and "XmippAccelProtResolutionBase" not in protocols
    viewers = {name: Domain.findViewers(protocols[name](), DESKTOP_TKINTER) for name in PROTOCOLS}
    for name, found in viewers.items():
        ours = [v.__name__ for v in found if v.__module__.startswith("xmipp_accel.viewers")]
        assert ours, f"no xmipp_accel viewer for {name} (found {[v.__name__ for v in found]})"
    for name in ("XmippAccelProtReconstructFourier", "XmippAccelProtAssignAngles", "XmippAccelProtRefine3D"):
        wizards = Domain.findWizards(protocols[name](), DESKTOP_TKINTER)
        assert "symmetryGroup" in wizards, f"no symmetry wizard for {name}"


def test_bibtex_and_citations(plugin):
    keys = set(plugin._bibtex)
    assert set(plugin._references) <= keys
    assert {"Strelak2020FlexAlign", "Strelak2019Reconstruction", "JimenezMoreno2021DeepAlign", "Petrovic2020KTT",
            "Strelak2018cuFFTAdvisor", "Strelak2023Umpalumpa"} <= keys
    for entry in plugin._bibtex.values():
        assert entry.get("title") and entry.get("year") and entry.get("doi")
    protocols = Domain.getProtocols()
    for name in PROTOCOLS:
        prot = protocols[name]()
        assert set(prot._citations()) <= keys, name
    deep = protocols["XmippAccelProtAssignAngles"](method=1)
    assert deep._citations() == ["JimenezMoreno2021DeepAlign"]


def _user_params(prot):
    """Visible parameters: not hidden, not containers (Line/Group), not the standard run header."""
    skip = {"runName", "runMode", "hostName", "numberOfThreads", "numberOfMpi", "useGpu", "gpuList"}
    for name, param in prot._definition.iterAllParams():
        if name in skip or isinstance(param, (params.Line, params.Group, params.Section)):
            continue
        if param.condition.get() == "False":  # hidden
            continue
        yield name, param


def test_forms_have_labels_help_and_defaults(plugin):
    protocols = Domain.getProtocols()
    for name in PROTOCOLS:
        prot = protocols[name]()
        assert prot._label and prot.__doc__ and len(prot.__doc__.strip()) > 40, name
        assert prot._possibleOutputs, name
        for pname, param in _user_params(prot):
            assert param.label.get(), f"{name}.{pname} has no label"
            help_text = param.help.get() or ""
            # lines of a form group ("from"/"to" inside a Line) share the Line's help
            if not help_text:
                assert pname in {"alignFrame0", "alignFrameN", "patchX", "patchY", "inputMovies"} \
                    or isinstance(param, params.LabelParam), f"{name}.{pname} has no help"
        # GPU parameters exist (shown as "GPU IDs" in the run header)
        assert prot.allowsGpu(), name


def test_menu_entries_name_our_protocols(plugin):
    text = open(os.path.join(PKG, "protocols.conf")).read()
    names = re.findall(r'"value":\s*"(\w+)"', text)
    assert sorted(names) == sorted(PROTOCOLS)
    body = text.split("=", 1)[1]
    json.loads(body)  # valid JSON tree


def test_validation_messages(plugin):
    from xmipp_accel.protocols import XmippAccelProtReconstructFourier
    prot = XmippAccelProtReconstructFourier(symmetryGroup="x7", useGpu=False)
    errors = prot._validateSymmetry(prot.symmetryGroup.get())
    assert errors and "x7" in errors[0] and "c1" in errors[0]
    assert prot._validateSymmetry("D7") == [] and prot._validateSymmetry("i") == []
    assert prot._validateGpu() == []  # CPU requested: nothing to check
    prot = XmippAccelProtReconstructFourier(useGpu=True, gpuList="0 a")
    assert "GPU IDs" in prot._validateGpu()[0]
    prot = XmippAccelProtReconstructFourier(useGpu=True, gpuList="0")
    if not xmipp_accel.Plugin.gpuAvailable():
        errors = prot._validateGpu()
        assert errors and "Use GPU?" in errors[0]
    else:
        assert prot._validateGpu() == []
    # the device arguments and the GPU placeholder
    assert prot._deviceArgs() == ["--device", "gpu", "--gpus", "%(GPU)s"]
    assert XmippAccelProtReconstructFourier(useGpu=False)._deviceArgs() == ["--device", "cpu"]


def test_symmetry_wizard_choices_are_valid(plugin):
    from xmipp_accel.em.symmetry import is_valid_symmetry
    from xmipp_accel.wizards import symmetryChoices
    names = [name for name, _ in symmetryChoices()]
    assert names[0] == "c1" and {"d7", "t", "o", "i1", "i4"} <= set(names)
    assert all(is_valid_symmetry(n) for n in names)


def test_streaming_template_parses(plugin):
    from pyworkflow.template import LocalTemplate
    path = os.path.join(PKG, "templates", "xmipp_accel_streaming.json.template")
    # found where `scipion3 template` looks: the plugin's templates folder
    assert path in [t.templatePath for t in plugin.Plugin().getTemplates()]
    t = LocalTemplate("xmipp_accel", path)
    t.replaceEnvVariables()
    t.parseContent()
    aliases = {p.getAlias(): p for p in t.getParams().values()}
    assert {"moviesPath", "pattern", "apix", "dose", "gpus", "alignThreads"} <= set(aliases)
    for p in aliases.values():
        assert p.validate() is None, (p.getAlias(), p.validate())
    t.setParamValue("apix", "0.83")
    workflow = json.load(open(t.createTemplateFile()))
    classes = [p["object.className"] for p in workflow]
    assert classes == ["ProtImportMovies", "XmippAccelProtMovieAlign"]
    assert workflow[0]["dataStreaming"] is True and workflow[0]["samplingRate"] == 0.83
    assert workflow[1]["inputMovies"] == "2.outputMovies"
    # every key of our protocol in the template is one of its parameters
    prot = Domain.getProtocols()["XmippAccelProtMovieAlign"]()
    for key in workflow[1]:
        if not key.startswith(("object.", "_")) and key not in ("runName", "runMode", "hostName", "numberOfThreads"):
            assert prot.hasAttribute(key), key


def test_package_imports_without_scipion():
    """The algorithms and the command line do not need Scipion: no pwem import, no Plugin attribute."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['pwem'] = None; import xmipp_accel, xmipp_accel.cli.__main__ as m; "
            "m.build_parser(); assert not hasattr(xmipp_accel, 'Plugin'); assert 'pyworkflow' not in sys.modules; "
            "import xmipp_accel.plots; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "ok", out.stderr


def test_command_line_built_for_run_job(plugin):
    """What Scipion runs: the step's GPUs replace %(GPU)s, a literal % survives, stdout goes to the JSON file."""
    import shlex

    from pyworkflow.utils.process import buildRunCommand

    from xmipp_accel.protocols.protocol_base import XmippAccelProtBase
    args = ["/data/100% done/p.star", "-o", "/out/map.mrc", "--sym", "c1", "--device", "gpu", "--gpus", "%(GPU)s"]
    arg_str = XmippAccelProtBase._accelArgs("reconstruct", args, "/run/extra/r.json")
    command = buildRunCommand(plugin.Plugin.getCommand(), arg_str, 1, gpuList=[0, 1])
    tokens = shlex.split(command)
    i = tokens.index("reconstruct")
    assert tokens[i - 2:i] == ["-m", "xmipp_accel"]
    assert tokens[i + 1:] == ["/data/100% done/p.star", "-o", "/out/map.mrc", "--sym", "c1", "--device", "gpu",
                              "--gpus", "0 1", "--json", ">", "/run/extra/r.json"]
    # on the CPU there is no placeholder: Scipion does no % formatting and the string is used as is
    cpu = XmippAccelProtBase._accelArgs("fsc", ["/a/50%.mrc", "--device", "cpu"], "/j.json")
    command = buildRunCommand(plugin.Plugin.getCommand(), cpu, 1, gpuList=[])
    assert shlex.split(command)[-6:] == ["/a/50%.mrc", "--device", "cpu", "--json", ">", "/j.json"]
