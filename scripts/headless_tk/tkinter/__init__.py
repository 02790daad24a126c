"""A stand-in for tkinter on headless GPU nodes whose Python has no Tk: enough for pyworkflow and pwem
to import and run protocols (no window can be opened)."""
import sys
import types

TkVersion = 8.6
TclVersion = 8.6
__all__ = []


class TclError(Exception):
    pass


class _Dummy:
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return _Dummy()

    def __call__(self, *args, **kwargs):
        return _Dummy()

    def __mro_entries__(self, bases):
        return (_Dummy,)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    if name.isupper():
        return name.lower()
    return _Dummy


for _sub in ("ttk", "font", "messagebox", "filedialog", "simpledialog", "colorchooser", "scrolledtext",
             "constants", "dnd", "tix"):
    _m = types.ModuleType(f"tkinter.{_sub}")
    _m.__getattr__ = __getattr__
    _m.__all__ = []
    sys.modules[f"tkinter.{_sub}"] = _m
    globals()[_sub] = _m

# matplotlib's Tk backend (imported by pwem's viewers) loads the C extension _tkagg, which needs a real Tk
# ("ImportError: initialization failed"); stand in for it too: nothing is ever drawn on this machine.
_tkagg = types.ModuleType("matplotlib.backends._tkagg")
_tkagg.__getattr__ = lambda name: _Dummy()
_tkagg.blit = lambda *args, **kwargs: None
_tkagg.enable_dpi_awareness = lambda *args, **kwargs: None
sys.modules.setdefault("matplotlib.backends._tkagg", _tkagg)
