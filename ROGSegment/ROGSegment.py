import json
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

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

import ROGSegmentLib
from DeepImagingCommonLib.pathbinding import PathFieldBinding
from DeepImagingCommonWidgets.trainingsection import TRAIN_FROM_FOLDER, TRAIN_FROM_SCENE, TrainingSectionMixin


#
# ROGSegment
#


class ROGSegment(ScriptedLoadableModule):
    """Module metadata; the work is done by ROGSegmentLib.ROGSegmentLogic."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ROG Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "DeepImagingCommon"]
        self.parent.contributors = ["SlicerDeepImaging developers"]
        self.parent.helpText = _("""
Segments CT or MRI volumes with ROG, a small (2.6 M parameters) generic 3-D segmentation network.
<b>Segment</b>: Apply adds a new segmentation with one named, coloured segment per label of the
chosen checkpoint (best.pt), on the input volume's grid.
<b>Training</b>: from a folder (Medical Segmentation Decathlon layout, or images/ and labels/) or from
segmentations in the scene (each with the volume it was drawn on), planned and trained in a
background process; training again into the same output folder resumes it. PyTorch is installed
through the PyTorch extension on first use.
""")
        self.parent.acknowledgementText = _("""
ROG: Daza et al., "Towards Robust General Medical Image Segmentation", MICCAI 2021, rebuilt in
PyTorch by the SlicerDeepImaging `deepimaging` library. Module layout from 3D Slicer's scripted-module
template; background processes after MONAIAuto3DSeg.
""")


#
# ROGSegmentParameterNode
#


@parameterNodeWrapper
class ROGSegmentParameterNode:
    """
    The parameters needed by module.

    modelPath - ROG checkpoint used by Apply ("" = none chosen).
    inputVolume - The volume to segment.
    device - auto, cpu or cuda for inference.
    postprocess - Apply the plan's largest-component / small-lesion rules.
    trainingSource - Train from a folder on disk or from segmentations in the scene.
    trainingFolder - MSD folder, or folder with images/ and labels/.
    modality - CT or MR normalisation for exported or unnamed data.
    epochs - Total training epochs.
    stepsPerEpoch - Batches per epoch.
    trainingDevice - auto, cpu or cuda for training.
    outputFolder - Receives plan.json, best.pt, last.pt, training_log.csv.
    robustnessReference - Reference segmentation of the input volume (segments named as the labels).
    robustnessEps - Comma-separated eps in 1/255 of the model's intensity range.
    robustnessAttacks - Comma-separated attacks, in order.
    robustnessIterations - Gradient steps of APGD/PGD/FAB-T.

    Paths are str fields ("" = unset), synced with their path widgets by PathFieldBinding: a
    pathlib.Path field would show an empty path as ".".
    """

    modelPath: str = ""
    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(list(ROGSegmentLib.DEVICE_CHOICES))] = "auto"
    postprocess: bool = True
    trainingSource: Annotated[str, Choice([TRAIN_FROM_SCENE, TRAIN_FROM_FOLDER])] = TRAIN_FROM_SCENE
    trainingFolder: str = ""
    modality: Annotated[str, Choice(list(ROGSegmentLib.MODALITY_CHOICES))] = "CT"
    epochs: Annotated[int, WithinRange(1, 100000)] = 100
    stepsPerEpoch: Annotated[int, WithinRange(1, 100000)] = 250
    trainingDevice: Annotated[str, Choice(list(ROGSegmentLib.DEVICE_CHOICES))] = "auto"
    outputFolder: str = ""
    robustnessReference: vtkMRMLSegmentationNode
    robustnessEps: str = ",".join(f"{e:g}" for e in ROGSegmentLib.DEFAULT_EPS)
    robustnessAttacks: str = ",".join(ROGSegmentLib.DEFAULT_ATTACKS)
    robustnessIterations: Annotated[int, WithinRange(1, 1000)] = 5


#
# ROGSegmentWidget
#


class ROGSegmentWidget(TrainingSectionMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: reads the parameter node, calls the Logic, shows progress and offers Cancel."""

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelToken = None  # set while inference runs; Apply is then Cancel
        self._robustnessCancel = None  # set while attacks run; Evaluate is then Cancel
        self._trainingJob = None  # set while training runs; Train is then Cancel
        self._shownModelPath = None
        self._modelPathBinding = None  # PathFieldBindings: the parameter node wrapper shows empty paths as "."
        self._trainingFolderBinding = None
        self._outputFolderBinding = None
        self._pathBindings = ()

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ROGSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)  # the .ui passes the scene on to each MRML widget
        self.logic = ROGSegmentLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.robustnessButton.connect("clicked(bool)", self.onRobustnessButton)
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
        self.ui.robustnessProgressBar.hide()
        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(500)
        self._trainingTimer.connect("timeout()", self._onTrainingTimer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        for token in (self._cancelToken, self._robustnessCancel):
            if token is not None:
                token.cancel()
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
        for token in (self._cancelToken, self._robustnessCancel):
            if token is not None:
                token.cancel()
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

    def setParameterNode(self, inputParameterNode: Optional[ROGSegmentParameterNode]) -> None:
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
            self._enable(self.ui.applyButton, self._missingInferenceInputs(), _("Segment the input volume"))
        if self._trainingJob is None:
            self._enable(self.ui.trainButton, self._missingTrainingInputs(), _("Plan and train ROG in the background"))
        if self._robustnessCancel is None:
            missing = [m for m in (self._missingInferenceInputs(),) if m]
            if not self._parameterNode.robustnessReference:
                missing.append(_("a reference segmentation"))
            self._enable(self.ui.robustnessButton, _(" and ").join(missing), _("Attack the model on the input volume"))

    def _missingInferenceInputs(self) -> str:
        missing, modelPath = [], self._parameterNode.modelPath
        if not ROGSegmentLib.isPathSet(modelPath) or not pathlib.Path(modelPath).is_file():
            missing.append(_("a model checkpoint file"))
        if not self._parameterNode.inputVolume:
            missing.append(_("an input volume"))
        return _(" and ").join(missing)

    def _updateModelInfo(self) -> None:
        """Describe the chosen checkpoint (labels, input, validation Dice) under its path."""
        if self._parameterNode.modelPath != self._shownModelPath:
            self._shownModelPath = self._parameterNode.modelPath
            self.ui.modelInfoLabel.text = ROGSegmentLib.modelDescription(self._shownModelPath)

    def onApplyButton(self) -> None:
        """Run the segmentation, or cancel the one that is running."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling...")
            return
        # No wait cursor: the progress bar shows activity and the Cancel button must stay usable.
        with slicer.util.tryWithErrorDisplay(_("Failed to segment the volume."), waitCursor=False):
            from DeepImagingCommonLib.dependencies import ensureModuleDependencies

            torch = ensureModuleDependencies("ROGSegment", askConfirmation=True)
            self._shownModelPath = None  # torch may just have been installed: describe the model now
            self._checkCanApply()
            self._runSegmentation(torch)

    def _runSegmentation(self, torch) -> None:
        from deepimaging.core.progress import CancelToken, Cancelled

        parameters = self._parameterNode
        self._cancelToken = CancelToken()
        self._setSegmenting(True)
        try:
            segmentationNode = self.logic.segment(
                parameters.inputVolume, parameters.modelPath, device=parameters.device,
                postprocess=parameters.postprocess, progress=self._onProgress, cancel=self._cancelToken)
            self._modelPathBinding.remember()
            names = ", ".join(label for value, label in self.logic.lastModelInfo.foregroundLabels)
            self.ui.statusLabel.text = _("Added '{node}' ({names}) in {seconds:.1f} s (PyTorch {version}).").format(
                node=segmentationNode.GetName(), names=names, seconds=self.logic.lastSeconds, version=torch.__version__)
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled; no segmentation was added.")
        finally:
            self._cancelToken = None
            self._setSegmenting(False)

    def _setSegmenting(self, running: bool) -> None:
        self._setRunning(running, (self.ui.modelPathLineEdit, self.ui.inputVolumeSelector, self.ui.deviceComboBox,
                                   self.ui.postprocessCheckBox), self.ui.applyButton, self.ui.progressBar,
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

    def onRobustnessButton(self) -> None:
        """Attack the model on the input volume against the reference, or cancel the attacks."""
        if self._robustnessCancel is not None:
            self._robustnessCancel.cancel()
            self.ui.robustnessButton.enabled = False
            self.ui.robustnessStatusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to evaluate robustness."), waitCursor=False):
            from DeepImagingCommonLib.dependencies import ensureModuleDependencies

            ensureModuleDependencies("ROGSegment", askConfirmation=True)
            self._runRobustness()

    def _runRobustness(self) -> None:
        from deepimaging.core.progress import CancelToken, Cancelled

        parameters = self._parameterNode
        self._robustnessCancel = CancelToken()
        self._setRobustnessRunning(True)
        try:
            outputs = ROGSegmentLib.ROGRobustnessLogic().evaluate(
                parameters.inputVolume, parameters.robustnessReference, parameters.modelPath,
                eps=parameters.robustnessEps, attacks=parameters.robustnessAttacks.split(","),
                iterations=parameters.robustnessIterations, device=parameters.device,
                progress=self._onRobustnessProgress, cancel=self._robustnessCancel)
            self._modelPathBinding.remember()
            slicer.util.setSliceViewerLayers(background=outputs.adversarialVolume, fit=True)
            slicer.modules.plots.logic().ShowChartInLayout(outputs.plotChartNode)
            result = outputs.result
            robust = ", ".join(f"{e * 255:g}: {d:.3f}" for e, d in zip(result.eps, result.robust_dice))
            self.ui.robustnessStatusLabel.text = _(
                "Clean Dice {clean:.3f}; robust Dice per eps {robust}. Added '{table}', the adversarial volume "
                "and its segmentation at eps {shown:g}/255 ({seconds:.0f} s).").format(
                clean=result.clean_dice, robust=robust, table=outputs.tableNode.GetName(), shown=outputs.shownEps,
                seconds=outputs.seconds)
        except Cancelled:
            self.ui.robustnessStatusLabel.text = _("Cancelled; nothing was added.")
        finally:
            self._robustnessCancel = None
            self._setRobustnessRunning(False)

    def _setRobustnessRunning(self, running: bool) -> None:
        self._setRunning(running, (self.ui.robustnessReferenceSelector, self.ui.robustnessEpsLineEdit,
                                   self.ui.robustnessAttacksLineEdit, self.ui.robustnessIterationsSpinBox,
                                   self.ui.applyButton), self.ui.robustnessButton, self.ui.robustnessProgressBar,
                         _("Cancel"), _("Evaluate robustness"))

    def _onRobustnessProgress(self, fraction: float, message: str) -> None:
        self.ui.robustnessProgressBar.value = int(round(100 * fraction))
        self.ui.robustnessProgressBar.setFormat(f"{message} %p%" if message else "%p%")
        slicer.app.processEvents()

    trainingModuleName = "ROGSegment"
    trainingLib = ROGSegmentLib

    def trainingOptions(self, parameters) -> dict:
        """Keyword arguments of the Logic's ``startTraining`` from the panel (see TrainingSectionMixin)."""
        return dict(modality=parameters.modality, epochs=parameters.epochs, stepsPerEpoch=parameters.stepsPerEpoch,
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
                                   self.ui.trainingSegmentationsComboBox, self.ui.modalityComboBox,
                                   self.ui.epochsSpinBox, self.ui.stepsSpinBox, self.ui.trainingDeviceComboBox,
                                   self.ui.outputFolderLineEdit), self.ui.trainButton, self.ui.trainingProgressBar,
                         _("Cancel training"), _("Train"))


#
# ROGSegmentLogic
#


class ROGSegmentLogic(ScriptedLoadableModuleLogic, ROGSegmentLib.ROGSegmentLogic):
    """Adds the module's parameter node to the Qt-free Logic in ROGSegmentLib (all computation and checks)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ROGSegmentLib.ROGSegmentLogic.__init__(self)

    def getParameterNode(self):
        return ROGSegmentParameterNode(super().getParameterNode())


#
# ROGSegmentTest
#


class ROGSegmentTest(ScriptedLoadableModuleTest):
    """Runs the module Logic on a generated blob volume with a small randomly initialised ROG checkpoint."""

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_ROGSegmentIntoNewSegmentation()
        self.setUp()
        self.test_ROGSegmentExportTrainingPairs()
        self.setUp()
        self.test_ROGSegmentRobustness()

    def _makeCase(self):
        """A 32^3 CT-like volume with two blob organs (labels 1 liver, 2 kidney) as a volume node."""
        from DeepImagingCommonLib.dependencies import ensureModuleDependencies

        ensureModuleDependencies("ROGSegment", askConfirmation=False)
        from ROGSegmentLib.selftest import blobVolume

        return blobVolume()

    def test_ROGSegmentIntoNewSegmentation(self):
        from ROGSegmentLib.selftest import randomCheckpoint

        self.delayDisplay("Segmenting a generated volume with a small, randomly initialised ROG checkpoint")
        volumeNode, _labels = self._makeCase()
        with tempfile.TemporaryDirectory() as folder:
            segmentationNode = ROGSegmentLogic().segment(volumeNode, randomCheckpoint(folder), device="cpu")
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual([segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()],
                         ["liver", "kidney"])
        self.assertEqual(segmentationNode.GetNodeReference("referenceImageGeometryRef"), volumeNode)
        self.delayDisplay("Test passed")

    def test_ROGSegmentRobustness(self):
        from DeepImagingCommonLib import nodes
        from ROGSegmentLib.selftest import randomCheckpoint

        self.delayDisplay("Attacking a small ROG on a generated volume (PGD and APGD-CE, 2 iterations)")
        volumeNode, labels = self._makeCase()
        reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Reference")
        for value, name in ((1, "liver"), (2, "kidney")):
            nodes.writeMaskToSegment(labels == value, reference, volumeNode, name=name)
        with tempfile.TemporaryDirectory() as folder:
            outputs = ROGSegmentLib.ROGRobustnessLogic().evaluate(
                volumeNode, reference, randomCheckpoint(folder), eps=[0, 8], attacks=["pgd", "apgd-ce"], iterations=2,
                device="cpu")
        self.assertEqual(outputs.tableNode.GetTable().GetNumberOfRows(), 2)
        self.assertLessEqual(outputs.result.robust_dice[1], outputs.result.clean_dice + 1e-9)
        self.assertIsNotNone(outputs.adversarialVolume.GetImageData())
        self.delayDisplay("Test passed")

    def test_ROGSegmentExportTrainingPairs(self):
        from DeepImagingCommonLib import nodes

        self.delayDisplay("Exporting a volume + segmentation pair as a training folder")
        volumeNode, labels = self._makeCase()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        nodes.writeMaskToSegment(labels == 2, segmentationNode, volumeNode, name="kidney")
        with tempfile.TemporaryDirectory() as folder:
            data = ROGSegmentLogic().exportTrainingData([(volumeNode, segmentationNode)], os.path.join(folder, "data"))
            meta = json.loads((data.folder / "dataset.json").read_text())
            self.assertEqual(meta["labels"], {"0": "background", "1": "kidney"})
            self.assertTrue((data.folder / "labelsTr" / "case_000.nii.gz").is_file())
        self.delayDisplay("Test passed")
