"""Scipion wizards (the wand next to a form field): pick a symmetry group from a list.

Only the ``show`` methods touch Tk; the list itself comes from :func:`symmetryChoices`, which tests
can call without a display.
"""
from __future__ import annotations

import pyworkflow.object as pwobj
from pyworkflow.wizard import Wizard

from .protocols import XmippAccelProtAssignAngles, XmippAccelProtReconstructFourier, XmippAccelProtRefine3D

# (name, description) in Xmipp's naming; cN and dN are shown for common orders
_SYMMETRY_GROUPS = (
    [("c1", "no symmetry")]
    + [(f"c{n}", f"cyclic, {n}-fold axis along z") for n in range(2, 9)]
    + [(f"d{n}", f"dihedral, {n}-fold axis along z and 2-fold axes along x") for n in range(2, 9)]
    + [("t", "tetrahedral (12 operators)"),
       ("o", "octahedral (24 operators)"),
       ("i1", "icosahedral: 2-fold axes on x, y, z, a 5-fold axis along (phi, 0, -1)"),
       ("i2", "icosahedral: 2-fold axes on x, y, z, a 5-fold axis along (1, 0, phi) (also written 'i')"),
       ("i3", "icosahedral: 5-fold axis on z, a 2-fold axis along (-1, 0, phi)"),
       ("i4", "icosahedral: 5-fold axis along (2, 0, 1), a 2-fold axis along (1, 0, phi)")]
)


def symmetryChoices() -> list:
    """``[(name, description), ...]`` of the groups the wizard offers (all valid for our commands)."""
    return list(_SYMMETRY_GROUPS)


class XmippAccelSymmetryWizard(Wizard):
    """Choose the symmetry group (Xmipp/RELION naming: c1, cN, dN, t, o, i1..i4) from a list."""
    _targets = [(XmippAccelProtReconstructFourier, ["symmetryGroup"]),
                (XmippAccelProtAssignAngles, ["symmetryGroup"]),
                (XmippAccelProtRefine3D, ["symmetryGroup"])]

    def show(self, form, *params):
        from pyworkflow.gui import dialog
        from pyworkflow.gui.tree import ListTreeProviderString

        items = [pwobj.String(f"{name}: {desc}") for name, desc in symmetryChoices()]
        provider = ListTreeProviderString(items)
        dlg = dialog.ListDialog(form.root, "Symmetry group", provider,
                                "Select the point group of the particle (Xmipp naming)",
                                selectmode="browse", selectOnDoubleClick=True)
        if dlg.resultYes() and dlg.values:
            form.setVar("symmetryGroup", dlg.values[0].get().split(":")[0])
