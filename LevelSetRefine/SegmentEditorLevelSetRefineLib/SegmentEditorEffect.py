import contextlib
import os

import qt

import slicer
from slicer.i18n import tr as _

from SegmentEditorEffects import *
from LevelSetRefineLib.effect import MAX_ITERATIONS_PARAMETER, MU_PARAMETER
from LevelSetRefineLib.logic import DEFAULT_ITERATIONS, DEFAULT_MU


@contextlib.contextmanager
def waitCursor():
    """Show the wait cursor while the block runs; restored even when it raises."""
    qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        yield
    finally:
        qt.QApplication.restoreOverrideCursor()


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Level set refine: moves the selected segment's boundary onto the image edges (Chan-Vese).

    Only the GUI lives here.  What Apply does (dependency step, validation and computation,
    then the undo state and the write, every failure reported as a message) is
    LevelSetRefineLib.applyRefinementEffect, Qt-free and tested headless; the maths is
    LevelSetRefineLib.refineOrientedLabelmap, shared with the LevelSetRefine module.
    """

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "Level set refine"
        scriptedEffect.title = _("Level set refine")
        scriptedEffect.perSegment = True  # this effect modifies only the selected segment
        scriptedEffect.requireSegments = True  # this effect requires segment(s) existing in the segmentation
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)

    def clone(self):
        # It should not be necessary to modify this method
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        # It should not be necessary to modify this method
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        if os.path.exists(iconPath):
            return qt.QIcon(iconPath)
        return qt.QIcon()

    def helpText(self):
        return _("""<html>Refine the selected segment so that its boundary follows the source volume's
intensities (Chan-Vese level set initialised from the segment).<p>
<ul style="margin: 0">
<li><b>Smoothness (mu):</b> higher values give smoother, more compact shapes.</li>
<li><b>Maximum iterations:</b> upper limit of level-set steps; it stops earlier when the boundary settles.</li>
</ul><p>
Masking settings (editable area, overwrite of other segments) apply. Undo restores the segment.
PyTorch is installed through the PyTorch extension on first use.</html>""")

    def setupOptionsFrame(self):
        self.muSpinBox = qt.QDoubleSpinBox()
        self.muSpinBox.decimals = 3
        self.muSpinBox.minimum = 0.0
        self.muSpinBox.maximum = 10.0
        self.muSpinBox.singleStep = 0.01
        self.muSpinBox.setToolTip(_("Weight of the boundary length: higher values give smoother, more compact shapes."))
        self.scriptedEffect.addLabeledOptionsWidget(_("Smoothness (mu):"), self.muSpinBox)
        self.muSpinBox.connect("valueChanged(double)", self.updateMRMLFromGUI)

        self.iterationsSpinBox = qt.QSpinBox()
        self.iterationsSpinBox.minimum = 1
        self.iterationsSpinBox.maximum = 5000
        self.iterationsSpinBox.singleStep = 50
        self.iterationsSpinBox.setToolTip(_("Upper limit of level-set steps."))
        self.scriptedEffect.addLabeledOptionsWidget(_("Maximum iterations:"), self.iterationsSpinBox)
        self.iterationsSpinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)

        self.applyButton = qt.QPushButton(_("Apply"))
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip(_("Refine the selected segment"))
        self.scriptedEffect.addOptionsWidget(self.applyButton)
        self.applyButton.connect("clicked()", self.onApply)

    def createCursor(self, widget):
        # Turn off effect-specific cursor for this effect
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault(MU_PARAMETER, DEFAULT_MU)
        self.scriptedEffect.setParameterDefault(MAX_ITERATIONS_PARAMETER, DEFAULT_ITERATIONS)

    def updateGUIFromMRML(self):
        wasBlocked = self.muSpinBox.blockSignals(True)
        self.muSpinBox.value = self.scriptedEffect.doubleParameter(MU_PARAMETER)
        self.muSpinBox.blockSignals(wasBlocked)
        wasBlocked = self.iterationsSpinBox.blockSignals(True)
        self.iterationsSpinBox.value = self.scriptedEffect.integerParameter(MAX_ITERATIONS_PARAMETER)
        self.iterationsSpinBox.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter(MU_PARAMETER, self.muSpinBox.value)
        self.scriptedEffect.setParameter(MAX_ITERATIONS_PARAMETER, self.iterationsSpinBox.value)

    def onApply(self):
        """Refine the selected segment in place; a failure leaves it and the undo stack unchanged.

        The sequence is LevelSetRefineLib.applyRefinementEffect: torch and the module's
        packages first (the user may be asked to install them), then validation and the
        refinement under the wait cursor, and only then the undo state and the write.
        """
        # Make sure the user wants to do the operation, even if the segment is not visible
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return

        from DeepImagingCommonLib.dependencies import ensureModuleDependencies
        from LevelSetRefineLib.effect import applyRefinementEffect

        applyRefinementEffect(
            self.scriptedEffect,
            ensureDependencies=lambda: ensureModuleDependencies("LevelSetRefine", askConfirmation=True),
            reportError=slicer.util.errorDisplay,
            modificationMode=slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
            busy=waitCursor)  # not around the dependency step, which may open dialogs
