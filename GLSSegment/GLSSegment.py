import os
import pathlib
import tempfile
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

from slicer import vtkMRMLScalarVolumeNode

import GLSSegmentLib
from DeepImagingCommonLib.pathbinding import PathFieldBinding
from DeepImagingCommonWidgets.trainingsection import TRAIN_FROM_FOLDER, TRAIN_FROM_SCENE, TrainingSectionMixin


#
# GLSSegment
#


class GLSSegment(ScriptedLoadableModule):
    """Module metadata; the work is done by GLSSegmentLib.GLSSegmentLogic."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GLS Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups", "DeepImagingCommon"]
        self.parent.contributors = ["SlicerDeepImaging developers"]
        self.parent.helpText = _("""
Segments 2-D B-scans (e.g. anterior-segment OCT) with GLS: a global network that also finds keypoints,
a local network on crops around each keypoint, and a fusion of both.
<b>Segment</b>: the input is one B-scan (a volume with one slice) or a stack of B-scans along the slice
axis. Apply adds a new segmentation with the segment "foreground" on the input's grid and a new point
list with the predicted keypoints (e.g. the two iris tails), named after the model's keypoints.
<b>Training</b>: from segmentations in the scene (one segment each, with the volume it was drawn on) or
from a folder with images/, masks/ and optionally keypoints.csv, in a background process. The U-Net,
UNet++ and CE-Net baselines can be trained and applied the same way. PyTorch and MONAI are installed on
first use.
""")
        self.parent.acknowledgementText = _("""
GLS (global and local keypoint-guided segmentation of B-scans) after the thesis it was described in,
rebuilt in PyTorch by the SlicerDeepImaging `deepimaging` library. Module layout from 3D Slicer's
scripted-module template; background processes after MONAIAuto3DSeg.
""")


#
# GLSSegmentParameterNode
#


@parameterNodeWrapper
class GLSSegmentParameterNode:
    """
    The parameters needed by module.

    modelPath - GLS checkpoint used by Apply ("" = none chosen).
    inputVolume - The B-scan (one slice) or B-scan stack to segment.
    device - auto, cpu or cuda for inference.
    threshold - Probability above which a pixel is foreground.
    trainingSource - Train from segmentations in the scene or from a folder on disk.
    trainingFolder - Folder with images/, masks/ and optionally keypoints.csv.
    architecture - gls, global, unet, unetpp or cenet.
    epochs - Training epochs.
    keypoints - Keypoints per B-scan (K).
    trainingDevice - auto, cpu or cuda for training.
    outputFolder - Receives best.pt and the training log.

    Paths are str fields ("" = unset), synced with their path widgets by PathFieldBinding: a
    pathlib.Path field would show an empty path as ".".
    """

    modelPath: str = ""
    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(list(GLSSegmentLib.DEVICE_CHOICES))] = "auto"
    threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    trainingSource: Annotated[str, Choice([TRAIN_FROM_SCENE, TRAIN_FROM_FOLDER])] = TRAIN_FROM_SCENE
    trainingFolder: str = ""
    architecture: Annotated[str, Choice(list(GLSSegmentLib.ARCHITECTURE_CHOICES))] = "gls"
    epochs: Annotated[int, WithinRange(1, 100000)] = 100
    keypoints: Annotated[int, WithinRange(1, 16)] = 2
    trainingDevice: Annotated[str, Choice(list(GLSSegmentLib.DEVICE_CHOICES))] = "auto"
    outputFolder: str = ""


#
# GLSSegmentWidget
#


class GLSSegmentWidget(TrainingSectionMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: reads the parameter node, calls the Logic, shows progress and offers Cancel."""

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelToken = None  # set while inference runs; Apply is then Cancel
        self._trainingJob = None  # set while training runs; Train is then Cancel
        self._shownModelPath = None
        self._modelPathBinding = None  # PathFieldBindings: the parameter node wrapper shows empty paths as "."
        self._trainingFolderBinding = None
        self._outputFolderBinding = None
        self._pathBindings = ()

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GLSSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)  # the .ui passes the scene on to each MRML widget
        self.logic = GLSSegmentLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        # Path widgets are synced by hand: the parameter node wrapper would show empty paths as ".".
        self._modelPathBinding = PathFieldBinding(self.ui.modelPathLineEdit, "modelPath")
        self._trainingFolderBinding = PathFieldBinding(self.ui.trainingFolderLineEdit, "trainingFolder")
        self._outputFolderBinding = PathFieldBinding(self.ui.outputFolderLineEdit, "outputFolder")
        self._pathBindings = (self._modelPathBinding, self._trainingFolderBinding, self._outputFolderBinding)
        for binding in self._pathBindings:
            binding.widget.connect("currentPathChanged(QString)", self.onPathChanged)
        # The checkable segmentation list has no parameter-node connector: it is read on Train.
        self.ui.trainingSegmentationsComboBox.connect("checkedNodesChanged()", self._checkCanApply)
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
        """Ensure parameter node exists and observed; preselect the input to save a few clicks."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[GLSSegmentParameterNode]) -> None:
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

    def onPathChanged(self, *args) -> None:
        if any([binding.guiToNode(self._parameterNode) for binding in self._pathBindings]):
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        for binding in self._pathBindings:
            binding.nodeToGui(self._parameterNode)
        self._updateModelInfo()
        self._updateTrainingSource()
        if self._cancelToken is None:
            self._enable(self.ui.applyButton, self._missingInferenceInputs(),
                         _("Segment the input and add its keypoints"))
        if self._trainingJob is None:
            self._enable(self.ui.trainButton, self._missingTrainingInputs(), _("Train in a background process"))

    def _missingInferenceInputs(self) -> str:
        missing, modelPath = [], self._parameterNode.modelPath
        if not GLSSegmentLib.isPathSet(modelPath) or not pathlib.Path(modelPath).is_file():
            missing.append(_("a model checkpoint file"))
        if not self._parameterNode.inputVolume:
            missing.append(_("an input volume"))
        return _(" and ").join(missing)

    def _updateModelInfo(self) -> None:
        """Describe the chosen checkpoint (architecture, keypoints, input size) under its path."""
        if self._parameterNode.modelPath != self._shownModelPath:
            self._shownModelPath = self._parameterNode.modelPath
            self.ui.modelInfoLabel.text = GLSSegmentLib.modelDescription(self._shownModelPath)

    def onApplyButton(self) -> None:
        """Run the segmentation, or cancel the one that is running."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling...")
            return
        # No wait cursor: the progress bar shows activity and the Cancel button must stay usable.
        with slicer.util.tryWithErrorDisplay(_("Failed to segment the B-scans."), waitCursor=False):
            from DeepImagingCommonLib.dependencies import ensureModuleDependencies

            torch = ensureModuleDependencies("GLSSegment", askConfirmation=True)
            self._shownModelPath = None  # torch may just have been installed: describe the model now
            self._checkCanApply()
            self._runSegmentation(torch)

    def _runSegmentation(self, torch) -> None:
        from deepimaging.core.progress import CancelToken, Cancelled

        parameters = self._parameterNode
        self._cancelToken = CancelToken()
        self._setSegmenting(True)
        try:
            outputs = self.logic.segment(
                parameters.inputVolume, parameters.modelPath, device=parameters.device,
                threshold=parameters.threshold, progress=self._onProgress, cancel=self._cancelToken)
            self._modelPathBinding.remember()
            if outputs.keypointsNode is not None:
                keypoints = _("{count} keypoint(s) in '{node}'").format(
                    count=outputs.keypointCount, node=outputs.keypointsNode.GetName())
            else:
                keypoints = _("no keypoints (the model has no keypoint head)")
            self.ui.statusLabel.text = _("Added '{node}' and {keypoints} in {seconds:.1f} s (PyTorch {version}).").format(
                node=outputs.segmentationNode.GetName(), keypoints=keypoints, seconds=outputs.seconds,
                version=torch.__version__)
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled; nothing was added.")
        finally:
            self._cancelToken = None
            self._setSegmenting(False)

    def _setSegmenting(self, running: bool) -> None:
        self._setRunning(running, (self.ui.modelPathLineEdit, self.ui.inputVolumeSelector, self.ui.deviceComboBox,
                                   self.ui.thresholdSliderWidget), self.ui.applyButton, self.ui.progressBar,
                         _("Cancel"), _("Apply"))
        if running:
            self.ui.statusLabel.text = ""

    def _setRunning(self, running, inputs, button, progressBar, runningText, idleText) -> None:
        """While running, inputs are locked, the button cancels and the progress bar shows."""
        for widget in inputs:
            widget.enabled = not running
        button.text = runningText if running else idleText
        button.enabled = True
        progressBar.value = 0
        progressBar.visible = running
        if not running:
            self._checkCanApply()

    def _onProgress(self, fraction: float, message: str) -> None:
        """Progress callback of the Logic; keeps the GUI (and the Cancel button) responsive."""
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.setFormat(f"{message} %p%" if message else "%p%")
        slicer.app.processEvents()

    trainingModuleName = "GLSSegment"
    trainingLib = GLSSegmentLib

    def trainingOptions(self, parameters) -> dict:
        """Keyword arguments of the Logic's ``startTraining`` from the panel (see TrainingSectionMixin)."""
        return dict(architecture=parameters.architecture, epochs=parameters.epochs, keypoints=parameters.keypoints,
                    device=parameters.trainingDevice)

    def onTrainingSucceeded(self, job) -> str:
        """Select the new best checkpoint; returns the status text."""
        if self._parameterNode:  # None when the scene was closed during training
            self._parameterNode.modelPath = str(job.bestCheckpoint)
        self.ui.segmentCollapsibleButton.collapsed = False
        return _("Finished ({summary}); its best checkpoint is selected in the Segment section.").format(
            summary=job.status.text())

    def _setTraining(self, running: bool) -> None:
        self._setRunning(running, (self.ui.trainingSourceComboBox, self.ui.trainingFolderLineEdit,
                                   self.ui.trainingSegmentationsComboBox, self.ui.architectureComboBox,
                                   self.ui.epochsSpinBox, self.ui.keypointsSpinBox, self.ui.trainingDeviceComboBox,
                                   self.ui.outputFolderLineEdit), self.ui.trainButton, self.ui.trainingProgressBar,
                         _("Cancel training"), _("Train"))


#
# GLSSegmentLogic
#


class GLSSegmentLogic(ScriptedLoadableModuleLogic, GLSSegmentLib.GLSSegmentLogic):
    """Adds the module's parameter node to the Qt-free Logic in GLSSegmentLib (all computation and checks)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        GLSSegmentLib.GLSSegmentLogic.__init__(self)

    def getParameterNode(self):
        return GLSSegmentParameterNode(super().getParameterNode())


#
# GLSSegmentTest
#


class GLSSegmentTest(ScriptedLoadableModuleTest):
    """Runs the module Logic on generated B-scans with a small randomly initialised GLS checkpoint."""

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_GLSSegmentBScan()
        self.setUp()
        self.test_GLSSegmentStack()
        self.setUp()
        self.test_GLSSegmentExportTrainingPairs()

    def _prepare(self):
        from DeepImagingCommonLib.dependencies import ensureModuleDependencies

        ensureModuleDependencies("GLSSegment", askConfirmation=False)

    def test_GLSSegmentBScan(self):
        from GLSSegmentLib.selftest import bscanVolume, randomCheckpoint

        self.delayDisplay("Segmenting a generated B-scan with a small, randomly initialised GLS checkpoint")
        self._prepare()
        volumeNode, _mask, _keypoints = bscanVolume()
        with tempfile.TemporaryDirectory() as folder:
            outputs = GLSSegmentLogic().segment(volumeNode, randomCheckpoint(folder), device="cpu")
        segmentation = outputs.segmentationNode.GetSegmentation()
        self.assertEqual([segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()],
                         [GLSSegmentLib.FOREGROUND_SEGMENT_NAME])
        self.assertEqual(outputs.segmentationNode.GetNodeReference("referenceImageGeometryRef"), volumeNode)
        self.assertIsNotNone(outputs.keypointsNode)
        self.assertEqual(outputs.keypointsNode.GetNumberOfControlPoints(), 2)
        self.assertEqual(outputs.keypointsNode.GetNthControlPointLabel(0), "left tail")
        self.delayDisplay("Test passed")

    def test_GLSSegmentStack(self):
        from GLSSegmentLib.selftest import bscanVolume, randomCheckpoint

        self.delayDisplay("Segmenting a stack of three generated B-scans")
        self._prepare()
        volumeNode, _mask, _keypoints = bscanVolume(slices=3)
        with tempfile.TemporaryDirectory() as folder:
            outputs = GLSSegmentLogic().segment(volumeNode, randomCheckpoint(folder), device="cpu")
        self.assertEqual(outputs.keypointsNode.GetNumberOfControlPoints(), 6)
        self.assertEqual(outputs.keypointsNode.GetNthControlPointLabel(5), "right tail s2")
        self.delayDisplay("Test passed")

    def test_GLSSegmentExportTrainingPairs(self):
        from DeepImagingCommonLib import nodes
        from GLSSegmentLib.selftest import bscanVolume

        self.delayDisplay("Exporting a B-scan + segmentation pair as a training folder")
        self._prepare()
        volumeNode, mask, _keypoints = bscanVolume()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        nodes.writeMaskToSegment(mask, segmentationNode, volumeNode, name="iris")
        with tempfile.TemporaryDirectory() as folder:
            data = GLSSegmentLogic().exportTrainingData([(volumeNode, segmentationNode)],
                                                        os.path.join(folder, "data"))
            self.assertEqual(data.names, ["case000"])
            self.assertTrue((data.folder / "images" / "case000.nrrd").is_file())
            self.assertTrue((data.folder / "masks" / "case000.nrrd").is_file())
        self.delayDisplay("Test passed")
