from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

import LevelSetRefineLib
from DeepImagingCommonLib.inputs import DEVICE_CHOICES, isPathSet
from DeepImagingCommonLib.pathbinding import PathFieldBinding
from DeepImagingCommonWidgets.trainingsection import TRAIN_FROM_FOLDER, TRAIN_FROM_SCENE, TrainingSectionMixin
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
the image. <b>classic</b>: the segment initialises a Chan-Vese level set, which evolves on the input
volume's intensities with a smoothness term. <b>learned</b>: a trained deep Chan-Vese refiner
(checkpoint; 2D for single-slice images, 3D for volumes) predicts the level set. The result goes into
a new segment "&lt;name&gt; (refined)" unless "Replace segment" is checked. The same refinement is
available in the Segment Editor as the "Level set refine" effect, with undo.
<b>Segment in a box</b>: given only a markups ROI around an object, the learned refiner segments it
from the image into a new segment. <b>Train a learned refiner</b>: from segmentations in the scene or
a folder, in a background process. PyTorch is installed through the PyTorch extension on first use.
""")
        self.parent.acknowledgementText = _("""
Chan-Vese active contours without edges (Chan and Vese, IEEE TIP 2001) and a learned deep
Chan-Vese refiner (after LevelSet R-CNN, Homayounfar et al., ECCV 2020), computed in PyTorch by
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
    method - classic (Chan-Vese) or learned (a trained checkpoint).
    checkpointPath - Learned refiner checkpoint ("" = none chosen); also used by "Segment in box".
    device - auto, cpu or cuda for the learned refiner.
    roiNode - The markups ROI (box) of "Segment in box".
    trainingSource - Train from segmentations in the scene or from a folder on disk.
    trainingFolder - Folder with images/, masks/ and optionally coarse/.
    trainingDimension - 2D or 3D refiner.
    epochs - Training epochs.
    trainingDevice - auto, cpu or cuda for training.
    outputFolder - Receives best.pt and last.pt.

    Paths are str fields ("" = unset), synced with their path widgets by PathFieldBinding.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentationNode: vtkMRMLSegmentationNode
    segmentId: str = ""
    mu: Annotated[float, WithinRange(0.0, 10.0)] = LevelSetRefineLib.DEFAULT_MU
    lambda1: Annotated[float, WithinRange(0.0, 10.0)] = 1.0
    lambda2: Annotated[float, WithinRange(0.0, 10.0)] = 1.0
    maxIterations: Annotated[int, WithinRange(1, 5000)] = LevelSetRefineLib.DEFAULT_ITERATIONS
    replaceSegment: bool = False
    method: Annotated[str, Choice(list(LevelSetRefineLib.METHOD_CHOICES))] = LevelSetRefineLib.METHOD_CLASSIC
    checkpointPath: str = ""
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    roiNode: vtkMRMLMarkupsROINode
    trainingSource: Annotated[str, Choice([TRAIN_FROM_SCENE, TRAIN_FROM_FOLDER])] = TRAIN_FROM_SCENE
    trainingFolder: str = ""
    trainingDimension: Annotated[str, Choice(["2D", "3D"])] = "2D"
    epochs: Annotated[int, WithinRange(1, 100000)] = 30
    trainingDevice: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    outputFolder: str = ""


#
# LevelSetRefineWidget
#


class LevelSetRefineWidget(TrainingSectionMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: reads the parameter node, calls the Logic, shows progress and offers Cancel."""

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelToken = None  # set while a refinement runs; its button is then Cancel
        self._trainingJob = None  # set while training runs; Train is then Cancel
        self._segmentBinding = None  # keeps the segment selector and the parameter node in sync
        self._pathBindings = ()
        self._shownCheckpoint = None

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
        # Path widgets are synced by hand: the parameter node wrapper would show empty paths as ".".
        self._checkpointBinding = PathFieldBinding(self.ui.checkpointPathLineEdit, "checkpointPath")
        self._trainingFolderBinding = PathFieldBinding(self.ui.trainingFolderLineEdit, "trainingFolder")
        self._outputFolderBinding = PathFieldBinding(self.ui.outputFolderLineEdit, "outputFolder")
        self._pathBindings = (self._checkpointBinding, self._trainingFolderBinding, self._outputFolderBinding)
        for binding in self._pathBindings:
            binding.widget.connect("currentPathChanged(QString)", self.onPathChanged)
        # The checkable segmentation list has no parameter-node connector: it is read on Train.
        self.ui.trainingSegmentationsComboBox.connect("checkedNodesChanged()", self._checkCanApply)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.segmentInBoxButton.connect("clicked(bool)", self.onSegmentInBoxButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.progressBar.hide()
        self.ui.trainingProgressBar.hide()
        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(500)
        self._trainingTimer.connect("timeout()", self._onTrainingTimer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()
        if self._trainingJob is not None:
            self._trainingJob.cancel()  # never leave a training process behind Slicer
            self._trainingJob.wait(timeout=10)
        self._trainingTimer.stop()
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
        """Called just before the scene is closed; training (files only) keeps running."""
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

    def onPathChanged(self, *args) -> None:
        if any([binding.guiToNode(self._parameterNode) for binding in self._pathBindings]):
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        self._segmentBinding.nodeToGui(self._parameterNode)
        for binding in self._pathBindings:
            binding.nodeToGui(self._parameterNode)
        self._updateMethod()
        self._updateTrainingSource()
        if self._cancelToken is None:  # while running the button is Cancel and stays enabled
            self._enable(self.ui.applyButton, self._missingInputs(), _("Refine the selected segment"))
            self._enable(self.ui.segmentInBoxButton, self._missingBoxInputs(),
                         _("Segment the object in the box into a new segment"))
        if self._trainingJob is None:
            self._enable(self.ui.trainButton, self._missingTrainingInputs(), _("Train in a background process"))

    def _updateMethod(self) -> None:
        """Show the classic parameters or the learned ones, and describe the chosen checkpoint."""
        learned = self._parameterNode.method == LevelSetRefineLib.METHOD_LEARNED
        for widget in (self.ui.checkpointLabel, self.ui.checkpointPathLineEdit, self.ui.checkpointInfoLabel,
                       self.ui.deviceLabel, self.ui.deviceComboBox):
            widget.visible = learned
        for widget in (self.ui.muLabel, self.ui.muSpinBox, self.ui.lambda1Label, self.ui.lambda1SpinBox,
                       self.ui.lambda2Label, self.ui.lambda2SpinBox, self.ui.iterationsLabel, self.ui.iterationsSpinBox):
            widget.visible = not learned
        if learned and self._parameterNode.checkpointPath != self._shownCheckpoint:
            self._shownCheckpoint = self._parameterNode.checkpointPath
            from DeepImagingCommonLib.dependencies import installedTorchVersion

            # Describing a checkpoint loads it with torch: not before torch is installed.
            if installedTorchVersion() is not None:
                self.ui.checkpointInfoLabel.text = LevelSetRefineLib.describeRefiner(self._shownCheckpoint)

    def _missingInputs(self) -> str:
        parameters, missing = self._parameterNode, []
        if not parameters.inputVolume:
            missing.append(_("an input volume"))
        if not parameters.segmentationNode:
            missing.append(_("a segmentation"))
        elif not parameters.segmentId:
            missing.append(_("a segment"))
        if parameters.method == LevelSetRefineLib.METHOD_LEARNED and not isPathSet(parameters.checkpointPath):
            missing.append(_("a learned refiner checkpoint"))
        return _(" and ").join(missing)

    def _missingBoxInputs(self) -> str:
        parameters, missing = self._parameterNode, []
        if not parameters.inputVolume:
            missing.append(_("an input volume"))
        if not parameters.roiNode:
            missing.append(_("a box (markups ROI)"))
        if not isPathSet(parameters.checkpointPath):
            missing.append(_("the learned method and its checkpoint"))
        return _(" and ").join(missing)

    def onApplyButton(self) -> None:
        """Run the refinement, or cancel the one that is running."""
        parameters = self._parameterNode
        if parameters.method == LevelSetRefineLib.METHOD_LEARNED:
            options = dict(method=parameters.method, checkpoint=parameters.checkpointPath, device=parameters.device)
        else:
            options = dict(mu=parameters.mu, lambda1=parameters.lambda1, lambda2=parameters.lambda2,
                           max_iterations=parameters.maxIterations)
        self._run(self.ui.applyButton, _("Failed to refine the segment."), lambda progress, cancel: self.logic.refine(
            parameters.inputVolume, parameters.segmentationNode, parameters.segmentId,
            replace=parameters.replaceSegment, progress=progress, cancel=cancel, **options), self._reportRefinement)

    def onSegmentInBoxButton(self) -> None:
        """Segment the object in the box with the learned refiner, or cancel."""
        parameters = self._parameterNode
        self._run(self.ui.segmentInBoxButton, _("Failed to segment in the box."),
                  lambda progress, cancel: self.logic.segmentInBox(
                      parameters.inputVolume, parameters.roiNode, parameters.checkpointPath,
                      segmentationNode=parameters.segmentationNode, device=parameters.device, progress=progress,
                      cancel=cancel), self._reportBox)

    def _run(self, button, errorText, work, reportResult) -> None:
        """Run ``work(progress, cancel)`` with the progress bar; ``button`` is Cancel meanwhile."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()
            button.enabled = False
            self.ui.statusLabel.text = _("Cancelling...")
            return
        # No wait cursor: the progress bar shows activity and the Cancel button must stay usable.
        with slicer.util.tryWithErrorDisplay(errorText, waitCursor=False):
            from DeepImagingCommonLib.dependencies import ensureModuleDependencies
            from deepimaging.core.progress import CancelToken, Cancelled

            torch = ensureModuleDependencies("LevelSetRefine", askConfirmation=True)
            self._cancelToken = CancelToken()
            self._setRunning(button)
            try:
                result = work(self._onProgress, self._cancelToken)
                if isPathSet(self._parameterNode.checkpointPath):
                    self._checkpointBinding.remember()
                reportResult(result, torch)
            except Cancelled:
                self.ui.statusLabel.text = _("Cancelled; the segmentation was not changed.")
            finally:
                self._cancelToken = None
                self._setRunning(None)

    def _reportRefinement(self, outputId, torch) -> None:
        result, parameters = self.logic.lastResult, self._parameterNode
        name = parameters.segmentationNode.GetSegmentation().GetSegment(outputId).GetName()
        if parameters.method == LevelSetRefineLib.METHOD_LEARNED:
            state = _("{steps} learned steps").format(steps=result.iterations)
        else:
            state = _("{iterations} iterations, {state}").format(
                iterations=result.iterations, state=_("converged") if result.converged else _("stopped at the limit"))
        self.ui.statusLabel.text = _("'{name}': {state} (PyTorch {version}).").format(
            name=name, state=state, version=torch.__version__)

    def _reportBox(self, segmentId, torch) -> None:
        segmentationNode = self.logic.lastSegmentationNode
        if not self._parameterNode.segmentationNode:
            self._parameterNode.segmentationNode = segmentationNode
        name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        self.ui.statusLabel.text = _("Added segment '{name}' to '{node}' (PyTorch {version}).").format(
            name=name, node=segmentationNode.GetName(), version=torch.__version__)

    def _setRunning(self, button) -> None:
        """``button`` (Apply or Segment in box) becomes Cancel; None restores both."""
        running = button is not None
        for section in (self.ui.inputsCollapsibleButton, self.ui.parametersCollapsibleButton,
                        self.ui.outputsCollapsibleButton):
            section.enabled = not running
        self.ui.roiSelector.enabled = not running
        if running:
            button.text = _("Cancel")
            button.enabled = True
            other = self.ui.segmentInBoxButton if button is self.ui.applyButton else self.ui.applyButton
            other.enabled = False
            self.ui.statusLabel.text = ""
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.segmentInBoxButton.text = _("Segment in box")
            self._checkCanApply()
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running

    def _onProgress(self, fraction: float, message: str) -> None:
        """Progress callback of the Logic; keeps the GUI (and the Cancel button) responsive."""
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.setFormat(f"{message} %p%" if message else "%p%")
        slicer.app.processEvents()

    trainingModuleName = "LevelSetRefine"
    trainingLib = LevelSetRefineLib

    def trainingOptions(self, parameters) -> dict:
        """Keyword arguments of the Logic's ``startTraining`` from the panel (see TrainingSectionMixin)."""
        return dict(dim=parameters.trainingDimension, epochs=parameters.epochs, device=parameters.trainingDevice)

    def onTrainingSucceeded(self, job) -> str:
        """Select the new best checkpoint; returns the status text."""
        if self._parameterNode:  # None when the scene was closed during training
            self._parameterNode.checkpointPath = str(job.bestCheckpoint)
            self._parameterNode.method = LevelSetRefineLib.METHOD_LEARNED
        return _("Finished ({summary}); the learned method now uses it.").format(summary=job.status.text())

    def _setTraining(self, running: bool) -> None:
        for widget in (self.ui.trainingSourceComboBox, self.ui.trainingFolderLineEdit,
                       self.ui.trainingSegmentationsComboBox, self.ui.trainingDimensionComboBox,
                       self.ui.epochsSpinBox, self.ui.trainingDeviceComboBox, self.ui.outputFolderLineEdit):
            widget.enabled = not running
        self.ui.trainButton.text = _("Cancel training") if running else _("Train")
        self.ui.trainButton.enabled = True
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingProgressBar.visible = running
        if not running:
            self._checkCanApply()


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
    """Runs the module Logic on generated data (checks in LevelSetRefineLib/selftest.py)."""

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_LevelSetRefineImprovesDice()
        self.setUp()
        self.test_LevelSetRefineBadInput()
        self.setUp()
        self.test_LevelSetRefineLearnedAndBox()

    def test_LevelSetRefineImprovesDice(self):
        from LevelSetRefineLib.selftest import checkImprovesDice
        checkImprovesDice(self, LevelSetRefineLogic)

    def test_LevelSetRefineBadInput(self):
        from LevelSetRefineLib.selftest import checkBadInput
        checkBadInput(self, LevelSetRefineLogic)

    def test_LevelSetRefineLearnedAndBox(self):
        from LevelSetRefineLib.selftest import checkLearnedAndBox
        checkLearnedAndBox(self, LevelSetRefineLogic)
