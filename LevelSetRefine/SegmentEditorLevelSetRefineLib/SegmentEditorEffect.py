import contextlib
import os

import ctk
import qt

import slicer
from slicer.i18n import tr as _

from SegmentEditorEffects import *
from LevelSetRefineLib.effect import CHECKPOINT_PARAMETER, MAX_ITERATIONS_PARAMETER, METHOD_PARAMETER, MU_PARAMETER
from LevelSetRefineLib.learned import METHOD_CHOICES, METHOD_CLASSIC, METHOD_LEARNED
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
intensities: a level set initialised from the segment.<p>
<ul style="margin: 0">
<li><b>Method:</b> <i>classic</i> evolves a Chan-Vese level set; <i>learned</i> runs a trained deep
Chan-Vese refiner (a 2D checkpoint for single-slice images, a 3D one for volumes), trained in the
Level Set Refine module or with 'deepimaging levelset train'.</li>
<li><b>Checkpoint</b> (learned): the refiner's best.pt.</li>
<li><b>Smoothness (mu)</b> (classic): higher values give smoother, more compact shapes.</li>
<li><b>Maximum iterations</b> (classic): upper limit of level-set steps; it stops earlier when the boundary settles.</li>
</ul><p>
Masking settings (editable area, overwrite of other segments) apply. Undo restores the segment.
PyTorch is installed through the PyTorch extension on first use.</html>""")

    def setupOptionsFrame(self):
        self.methodComboBox = qt.QComboBox()
        for method in METHOD_CHOICES:
            self.methodComboBox.addItem(method)
        self.methodComboBox.setToolTip(_("classic: Chan-Vese level set. learned: a trained deep Chan-Vese refiner."))
        self.scriptedEffect.addLabeledOptionsWidget(_("Method:"), self.methodComboBox)
        self.methodComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)

        # The options of each method sit in a frame of their own, shown for that method only.
        self.learnedFrame = qt.QFrame()
        learnedLayout = qt.QFormLayout(self.learnedFrame)
        learnedLayout.setContentsMargins(0, 0, 0, 0)
        self.checkpointLineEdit = ctk.ctkPathLineEdit()
        self.checkpointLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.checkpointLineEdit.nameFilters = ["Learned refiner (*.pt)", "All files (*)"]
        self.checkpointLineEdit.settingKey = "SegmentEditorLevelSetRefine/Checkpoint"
        self.checkpointLineEdit.setToolTip(_("Checkpoint (best.pt) of a learned refiner: 2D for single-slice "
                                             "images, 3D for volumes."))
        learnedLayout.addRow(_("Checkpoint:"), self.checkpointLineEdit)
        self.scriptedEffect.addOptionsWidget(self.learnedFrame)
        self.checkpointLineEdit.connect("currentPathChanged(QString)", self.updateMRMLFromGUI)

        self.classicFrame = qt.QFrame()
        classicLayout = qt.QFormLayout(self.classicFrame)
        classicLayout.setContentsMargins(0, 0, 0, 0)
        self.muSpinBox = qt.QDoubleSpinBox()
        self.muSpinBox.decimals = 3
        self.muSpinBox.minimum = 0.0
        self.muSpinBox.maximum = 10.0
        self.muSpinBox.singleStep = 0.01
        self.muSpinBox.setToolTip(_("Weight of the boundary length: higher values give smoother, more compact shapes."))
        classicLayout.addRow(_("Smoothness (mu):"), self.muSpinBox)
        self.muSpinBox.connect("valueChanged(double)", self.updateMRMLFromGUI)

        self.iterationsSpinBox = qt.QSpinBox()
        self.iterationsSpinBox.minimum = 1
        self.iterationsSpinBox.maximum = 5000
        self.iterationsSpinBox.singleStep = 50
        self.iterationsSpinBox.setToolTip(_("Upper limit of level-set steps."))
        classicLayout.addRow(_("Maximum iterations:"), self.iterationsSpinBox)
        self.scriptedEffect.addOptionsWidget(self.classicFrame)
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
        self.scriptedEffect.setParameterDefault(METHOD_PARAMETER, METHOD_CLASSIC)
        self.scriptedEffect.setParameterDefault(CHECKPOINT_PARAMETER, "")
        self.scriptedEffect.setParameterDefault(MU_PARAMETER, DEFAULT_MU)
        self.scriptedEffect.setParameterDefault(MAX_ITERATIONS_PARAMETER, DEFAULT_ITERATIONS)

    def updateGUIFromMRML(self):
        method = self.scriptedEffect.parameter(METHOD_PARAMETER) or METHOD_CLASSIC
        wasBlocked = self.methodComboBox.blockSignals(True)
        self.methodComboBox.setCurrentIndex(max(0, self.methodComboBox.findText(method)))
        self.methodComboBox.blockSignals(wasBlocked)
        wasBlocked = self.checkpointLineEdit.blockSignals(True)
        self.checkpointLineEdit.currentPath = self.scriptedEffect.parameter(CHECKPOINT_PARAMETER)
        self.checkpointLineEdit.blockSignals(wasBlocked)
        self.learnedFrame.visible = method == METHOD_LEARNED
        self.classicFrame.visible = method != METHOD_LEARNED
        wasBlocked = self.muSpinBox.blockSignals(True)
        self.muSpinBox.value = self.scriptedEffect.doubleParameter(MU_PARAMETER)
        self.muSpinBox.blockSignals(wasBlocked)
        wasBlocked = self.iterationsSpinBox.blockSignals(True)
        self.iterationsSpinBox.value = self.scriptedEffect.integerParameter(MAX_ITERATIONS_PARAMETER)
        self.iterationsSpinBox.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter(METHOD_PARAMETER, self.methodComboBox.currentText)
        self.scriptedEffect.setParameter(CHECKPOINT_PARAMETER, self.checkpointLineEdit.currentPath)
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

        if self.scriptedEffect.parameter(METHOD_PARAMETER) == METHOD_LEARNED:
            self.checkpointLineEdit.addCurrentPathToHistory()
        applyRefinementEffect(
            self.scriptedEffect,
            ensureDependencies=lambda: ensureModuleDependencies("LevelSetRefine", askConfirmation=True),
            reportError=slicer.util.errorDisplay,
            modificationMode=slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
            busy=waitCursor)  # not around the dependency step, which may open dialogs
