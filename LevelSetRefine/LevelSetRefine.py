import logging
from typing import Annotated, Optional

import numpy as np
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    WithinRange,
)

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

import LevelSetRefineLib
from DeepImagingCommonLib.segmentbinding import SegmentSelectorBinding


#
# LevelSetRefine
#


class LevelSetRefine(ScriptedLoadableModule):
    """Module metadata; the work is done by LevelSetRefineLib.LevelSetRefineLogic."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Level Set Refine")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "DeepImagingCommon"]
        self.parent.contributors = ["SlicerDeepImaging developers"]
        self.parent.helpText = _("""
Refines a segment (from a model, a threshold or a hand drawing) so that its boundary follows
the image: the segment initialises a Chan-Vese level set, which evolves on the input volume's
intensities with a smoothness term. The result goes into a new segment "&lt;name&gt; (refined)"
unless "Replace segment" is checked. The same refinement is available in the Segment Editor as
the "Level set refine" effect, with undo.
PyTorch is installed through the PyTorch extension on first use.
""")
        self.parent.acknowledgementText = _("""
Chan-Vese active contours without edges (Chan and Vese, IEEE TIP 2001), computed in PyTorch by
the SlicerDeepImaging `deepimaging` library. Module layout from 3D Slicer's scripted-module template.
""")


#
# LevelSetRefineParameterNode
#


@parameterNodeWrapper
class LevelSetRefineParameterNode:
    """
    The parameters needed by module.

    inputVolume - The volume whose intensities drive the level set.
    segmentationNode - The segmentation holding the segment to refine (set from the segment selector).
    segmentId - ID of the segment to refine (set from the segment selector).
    mu - Weight of the boundary length (smoothness).
    lambda1 - Weight of the intensity fit inside.
    lambda2 - Weight of the intensity fit outside.
    maxIterations - Upper limit of level-set steps.
    replaceSegment - Overwrite the segment instead of adding "<name> (refined)".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentationNode: vtkMRMLSegmentationNode
    segmentId: str = ""
    mu: Annotated[float, WithinRange(0.0, 10.0)] = LevelSetRefineLib.DEFAULT_MU
    lambda1: Annotated[float, WithinRange(0.0, 10.0)] = 1.0
    lambda2: Annotated[float, WithinRange(0.0, 10.0)] = 1.0
    maxIterations: Annotated[int, WithinRange(1, 5000)] = LevelSetRefineLib.DEFAULT_ITERATIONS
    replaceSegment: bool = False


#
# LevelSetRefineWidget
#


class LevelSetRefineWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: reads the parameter node, calls the Logic, shows progress and offers Cancel."""

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelToken = None  # set while a refinement runs; the Apply button is then Cancel
        self._segmentBinding = None  # keeps the segment selector and the parameter node in sync

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LevelSetRefine.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # The .ui connects the top-level qMRMLWidget's mrmlSceneChanged signal to each MRML widget.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LevelSetRefineLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # The parameter node wrapper has no connector for the segment selector: sync it here.
        self._segmentBinding = SegmentSelectorBinding(self.ui.segmentSelector)
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentSelectionChanged)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentSelectionChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.progressBar.hide()

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed; preselect inputs to save a few clicks."""
        self.setParameterNode(self.logic.getParameterNode())

        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.segmentationNode:
            firstSegmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if firstSegmentationNode:
                self._parameterNode.segmentationNode = firstSegmentationNode

    def setParameterNode(self, inputParameterNode: Optional[LevelSetRefineParameterNode]) -> None:
        """Set and observe the parameter node, so the GUI follows it."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Each bound widget in the .ui has a "SlicerParameterName" dynamic property.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def onSegmentSelectionChanged(self, *args) -> None:
        if self._segmentBinding.guiToNode(self._parameterNode):
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._cancelToken is not None:
            return  # while running the button is Cancel and stays enabled
        self._segmentBinding.nodeToGui(self._parameterNode)
        missing = self._missingInputs()
        if missing:
            self.ui.applyButton.toolTip = _("Select {missing}").format(missing=missing)
            self.ui.applyButton.enabled = False
        else:
            self.ui.applyButton.toolTip = _("Refine the selected segment")
            self.ui.applyButton.enabled = True

    def _missingInputs(self) -> str:
        if not self._parameterNode:
            return _("a scene")
        missing = []
        if not self._parameterNode.inputVolume:
            missing.append(_("an input volume"))
        if not self._parameterNode.segmentationNode:
            missing.append(_("a segmentation"))
        elif not self._parameterNode.segmentId:
            missing.append(_("a segment"))
        return _(" and ").join(missing)

    def onApplyButton(self) -> None:
        """Run the refinement, or cancel the one that is running."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling...")
            return
        # No wait cursor: the progress bar shows activity and the Cancel button must stay usable.
        with slicer.util.tryWithErrorDisplay(_("Failed to refine the segment."), waitCursor=False):
            from DeepImagingCommonLib.dependencies import ensureModuleDependencies

            torch = ensureModuleDependencies("LevelSetRefine", askConfirmation=True)
            self._runRefinement(torch)

    def _runRefinement(self, torch) -> None:
        from deepimaging.core.progress import CancelToken, Cancelled

        parameters = self._parameterNode
        self._cancelToken = CancelToken()
        self._setRunning(True)
        try:
            outputId = self.logic.refine(
                parameters.inputVolume, parameters.segmentationNode, parameters.segmentId,
                replace=parameters.replaceSegment, progress=self._onProgress, cancel=self._cancelToken,
                mu=parameters.mu, lambda1=parameters.lambda1, lambda2=parameters.lambda2,
                max_iterations=parameters.maxIterations)
            result = self.logic.lastResult
            name = parameters.segmentationNode.GetSegmentation().GetSegment(outputId).GetName()
            state = _("converged") if result.converged else _("stopped at the iteration limit")
            self.ui.statusLabel.text = _("'{name}': {iterations} iterations, {state} (PyTorch {version}).").format(
                name=name, iterations=result.iterations, state=state, version=torch.__version__)
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled; the segmentation was not changed.")
        finally:
            self._cancelToken = None
            self._setRunning(False)

    def _setRunning(self, running: bool) -> None:
        for section in (self.ui.inputsCollapsibleButton, self.ui.parametersCollapsibleButton,
                        self.ui.outputsCollapsibleButton):
            section.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running
        if running:
            self.ui.statusLabel.text = ""
        else:
            self._checkCanApply()

    def _onProgress(self, fraction: float, message: str) -> None:
        """Progress callback of the Logic; keeps the GUI (and the Cancel button) responsive."""
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.setFormat(f"{message} %p%" if message else "%p%")
        slicer.app.processEvents()


#
# LevelSetRefineLogic
#


class LevelSetRefineLogic(ScriptedLoadableModuleLogic, LevelSetRefineLib.LevelSetRefineLogic):
    """Adds the module's parameter node to the Qt-free Logic in LevelSetRefineLib.

    All computation (and the checks of bad input) is in LevelSetRefineLib/logic.py, which
    the Segment Editor effect and the headless tests use too.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        LevelSetRefineLib.LevelSetRefineLogic.__init__(self)

    def getParameterNode(self):
        return LevelSetRefineParameterNode(super().getParameterNode())


#
# LevelSetRefineTest
#


class LevelSetRefineTest(ScriptedLoadableModuleTest):
    """Runs the module Logic on generated data: a noisy ball and a rough box inside it."""

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_LevelSetRefineImprovesDice()
        self.setUp()
        self.test_LevelSetRefineBadInput()

    def _makeCase(self):
        """Noisy ball (truth) on anisotropic voxels and a segmentation with a rough box inside it."""
        rng = np.random.default_rng(0)
        shape = (24, 48, 48)  # (z, y, x)
        spacing = np.array([0.8, 0.8, 1.6])  # (x, y, z) mm
        z, y, x = np.indices(shape)
        centre = np.array(shape) / 2.0
        distance = np.sqrt(((x - centre[2]) * spacing[0]) ** 2 + ((y - centre[1]) * spacing[1]) ** 2
                           + ((z - centre[0]) * spacing[2]) ** 2)
        truth = distance < 13.0
        array = np.where(truth, 100.0, 20.0) + rng.normal(0.0, 20.0, shape)
        volumeNode = slicer.util.addVolumeFromArray(
            array.astype(np.float32), np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]), "LevelSetRefineTestVolume")
        rough = np.zeros(shape, np.uint8)
        rough[8:16, 16:32, 14:28] = 1  # a box off-centre, well inside the ball
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LevelSetRefineTestSegments")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "Ball", [0.9, 0.3, 0.2])
        slicer.util.updateSegmentBinaryLabelmapFromArray(rough, segmentationNode, segmentId, volumeNode)
        return volumeNode, segmentationNode, segmentId, truth, rough.astype(bool)

    @staticmethod
    def _dice(a, b):
        return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())

    def test_LevelSetRefineImprovesDice(self):
        from DeepImagingCommonLib.dependencies import ensureModuleDependencies

        self.delayDisplay("Starting the test")
        ensureModuleDependencies("LevelSetRefine", askConfirmation=False)
        volumeNode, segmentationNode, segmentId, truth, rough = self._makeCase()

        logic = LevelSetRefineLogic()
        outputId = logic.refine(volumeNode, segmentationNode, segmentId)
        self.assertNotEqual(outputId, segmentId)
        self.assertEqual(segmentationNode.GetSegmentation().GetSegment(outputId).GetName(), "Ball (refined)")
        refined = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, outputId, volumeNode) > 0
        original = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0
        np.testing.assert_array_equal(original, rough)
        before, after = self._dice(rough, truth), self._dice(refined, truth)
        logging.info(f"Dice before {before:.3f}, after {after:.3f}")
        self.assertGreater(after, before + 0.2)
        self.assertGreater(after, 0.85)
        self.delayDisplay("Test passed")

    def test_LevelSetRefineBadInput(self):
        from deepimaging.core.errors import InputError

        self.delayDisplay("Bad input gives clear errors and adds no segment")
        volumeNode, segmentationNode, segmentId, truth, rough = self._makeCase()
        emptyId = segmentationNode.GetSegmentation().AddEmptySegment("", "Empty")
        logic = LevelSetRefineLogic()
        with self.assertRaisesRegex(InputError, "empty"):
            logic.refine(volumeNode, segmentationNode, emptyId)
        with self.assertRaisesRegex(InputError, "no segment with ID"):
            logic.refine(volumeNode, segmentationNode, "NoSuchSegment")
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 2)
        self.delayDisplay("Test passed")
