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

from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

import NIRSTReconLib
from DeepImagingCommonLib.pathbinding import PathFieldBinding
from DeepImagingCommonLib.segmentbinding import SegmentSelectorBinding
from NIRSTReconLib import optionalPath, trainingProgress


#
# NIRSTRecon
#


class NIRSTRecon(ScriptedLoadableModule):
    """Module metadata; the work is done by NIRSTReconLib.NIRSTReconLogic."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("NIRST Reconstruction")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Reconstruction")]
        self.parent.dependencies = ["Segmentations", "DeepImagingCommon"]
        self.parent.contributors = ["SlicerDeepImaging developers"]
        self.parent.helpText = _("""
MRI-guided near-infrared spectral tomography (NIRST): from the boundary amplitudes of 16 (or 8)
optodes at 9 wavelengths (2160 or 504 raw CW values in the order wavelength, source, detector;
CSV or NPZ) and an MRI of the same plane (a 2D image, or a chosen slice of a 3D volume), a Z-Net
(or the model-based DRI) reconstructs HbO (uM), Hb (uM) and water (%) maps, plus HbT (uM) and
StO2 (%), as new volumes on the MRI's geometry. Optode ring: optode k at angle offset + 360 k / N
degrees, measured in the slice plane from the patient's left (axial) towards posterior for
"ccw" (clockwise on the axial view); default 82 mm, optode 0 at 0 deg, ccw; the disk centre is
the slice centre or a chosen point. Amplitudes must be on the model's scale: calibrate with a
homogeneous reference phantom or the known background (Optode ring and calibration). The HbT
contrast (inclusion / background) is computed inside a chosen segment. "Simulate phantom" makes
a test case without data; training runs in a background process. PyTorch is installed through
the PyTorch extension on first use.
""")
        self.parent.acknowledgementText = _("""
Z-Net: Feng et al., "Z-Net: a deep learning approach to MRI-guided near-infrared spectral
tomography", Optica 2022. Computed in PyTorch by the SlicerDeepImaging `deepimaging` library.
Module layout from 3D Slicer's scripted-module template.
""")


#
# NIRSTReconParameterNode
#


@parameterNodeWrapper
class NIRSTReconParameterNode:
    """
    The parameters needed by module.

    measurementFile - CSV or NPZ file of the 2160 boundary amplitudes.
    inputVolume, sliceIndex - The MRI: a single slice, or a 3D volume and the slice the optodes measured.
    method - znet (the network; robust training unless checkpointFile), znet-paper (the shipped
        network trained on the paper-style set) or dri (model-based, seconds, progress and Cancel).
    ringDiameter, optodeOffset, winding - The optode ring (mm, degrees of optode 0, ccw/cw).
    diskCentre - Optional point list whose first point is the ring centre (else the slice centre).
    calibrationMode, referenceFile - none / reference (homogeneous phantom file) / background.
    mediumHbO, mediumHb, mediumWater - The reference phantom's or the background's chromophores.
    perOptodeCoupling - With background calibration, also fit per-optode coupling factors.
    checkpointFile - Z-Net or Y-Net checkpoint for method znet; empty means the shipped Z-Net.
    device - Where the network runs: auto (GPU if available), cpu or cuda.
    segmentationNode, segmentId - Inclusion segment for the HbT contrast (set from the segment selector).
    hbtVolume - HbT map whose contrast "Compute contrast" reports (set after each reconstruction).
    phantomSeed, loadTruth - Seed of the simulated phantom; also add its true maps as volumes.
    trainingDataDirectory, trainingOutputDirectory - Simulated dataset shards; where the checkpoint goes.
    trainingArchitecture, trainingEpochs - Network to train and number of epochs.

    Paths are str fields ("" = unset), synced with their path widgets by PathFieldBinding: a
    pathlib.Path field would show an empty path as ".".
    """

    measurementFile: str = ""
    inputVolume: vtkMRMLScalarVolumeNode
    sliceIndex: Annotated[int, WithinRange(0, 100000)] = 0
    method: Annotated[str, Choice(list(NIRSTReconLib.METHODS))] = "znet"
    ringDiameter: Annotated[float, WithinRange(10.0, 300.0)] = 82.0
    optodeOffset: Annotated[float, WithinRange(-360.0, 360.0)] = 0.0
    winding: Annotated[str, Choice(list(NIRSTReconLib.WINDINGS))] = "ccw"
    diskCentre: vtkMRMLMarkupsFiducialNode
    calibrationMode: Annotated[str, Choice(list(NIRSTReconLib.CALIBRATION_MODES))] = "none"
    referenceFile: str = ""
    mediumHbO: Annotated[float, WithinRange(0.0, 500.0)] = 14.0
    mediumHb: Annotated[float, WithinRange(0.0, 500.0)] = 7.0
    mediumWater: Annotated[float, WithinRange(0.0, 100.0)] = 40.0
    perOptodeCoupling: bool = False
    checkpointFile: str = ""
    device: Annotated[str, Choice(list(NIRSTReconLib.DEVICES))] = "auto"
    segmentationNode: vtkMRMLSegmentationNode
    segmentId: str = ""
    hbtVolume: vtkMRMLScalarVolumeNode
    phantomSeed: Annotated[int, WithinRange(0, 1000000)] = 0
    loadTruth: bool = True
    trainingDataDirectory: str = ""
    trainingOutputDirectory: str = ""
    trainingArchitecture: Annotated[str, Choice(list(NIRSTReconLib.ARCHITECTURES))] = "znet"
    trainingEpochs: Annotated[int, WithinRange(1, 10000)] = 50


#
# NIRSTReconWidget
#


class NIRSTReconWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: reads the parameter node, calls the Logic, runs training in a child process."""

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._segmentBinding = None  # keeps the segment selector and the parameter node in sync
        self._measurementBinding = None  # PathFieldBindings: the parameter node wrapper shows empty paths as "."
        self._checkpointBinding = None
        self._referenceBinding = None
        self._cancelToken = None  # a deepimaging CancelToken while a reconstruction runs
        self._trainingDataBinding = None
        self._trainingOutputBinding = None
        self._pathBindings = ()
        self._shownVolume = None  # the MRI whose slice range the slice spin box shows
        self._trainingProcess = None  # a DeepImagingCommonLib.process.BackgroundProcess while training
        self._trainingOutputFolder = None  # where that process writes (the scene may close meanwhile)
        self._trainingTimer = None

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NIRSTRecon.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # The .ui connects the top-level qMRMLWidget's mrmlSceneChanged signal to each MRML widget.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = NIRSTReconLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # The parameter node wrapper has no connector for the segment selector: sync it here.
        self._segmentBinding = SegmentSelectorBinding(self.ui.segmentSelector)
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentSelectionChanged)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentSelectionChanged)
        # Path widgets are synced by hand too: the parameter node wrapper would show empty paths as ".".
        self._measurementBinding = PathFieldBinding(self.ui.measurementPathLineEdit, "measurementFile")
        self._checkpointBinding = PathFieldBinding(self.ui.checkpointPathLineEdit, "checkpointFile")
        self._referenceBinding = PathFieldBinding(self.ui.referencePathLineEdit, "referenceFile")
        self._trainingDataBinding = PathFieldBinding(self.ui.trainingDataPathLineEdit, "trainingDataDirectory")
        self._trainingOutputBinding = PathFieldBinding(self.ui.trainingOutputPathLineEdit, "trainingOutputDirectory")
        self._pathBindings = (self._measurementBinding, self._checkpointBinding, self._referenceBinding,
                              self._trainingDataBinding, self._trainingOutputBinding)
        for binding in self._pathBindings:
            binding.widget.connect("currentPathChanged(QString)", self.onPathChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.simulateButton.connect("clicked(bool)", self.onSimulateButton)
        self.ui.contrastButton.connect("clicked(bool)", self.onContrastButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.trainingProgressBar.hide()
        self.ui.reconstructionProgressBar.hide()
        self.ui.cancelButton.hide()

        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(300)
        self._trainingTimer.connect("timeout()", self._pollTraining)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._trainingProcess is not None:
            self._trainingProcess.cancel()
        if self._trainingTimer is not None:
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
        """Called just before the scene is closed."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed; preselect the MRI to save a few clicks."""
        self.setParameterNode(self.logic.getParameterNode())

        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[NIRSTReconParameterNode]) -> None:
        """Set and observe the parameter node, so the GUI follows it."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        self._shownVolume = None
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

    def _updateSliceControls(self) -> None:
        """Slice spin box: the MRI's slice range, the middle slice when a new MRI is chosen."""
        volumeNode = self._parameterNode.inputVolume
        imageData = volumeNode.GetImageData() if volumeNode else None
        slices = imageData.GetDimensions()[2] if imageData else 1
        newVolume = volumeNode is not self._shownVolume
        self._shownVolume = volumeNode  # set first: the lines below re-enter through Modified events
        self.ui.sliceIndexSpinBox.maximum = max(0, slices - 1)
        self.ui.sliceIndexSpinBox.enabled = slices > 1
        middle = slices // 2
        if newVolume and self._parameterNode.sliceIndex != middle:
            self._parameterNode.sliceIndex = middle

    def _checkCanApply(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            self.ui.applyButton.enabled = False
            return
        self._segmentBinding.nodeToGui(self._parameterNode)
        for binding in self._pathBindings:
            binding.nodeToGui(self._parameterNode)
        self._updateSliceControls()
        parameters = self._parameterNode
        missing = ([_("a measurement file")] if optionalPath(parameters.measurementFile) is None else []) + \
            ([_("an MRI volume")] if not parameters.inputVolume else [])
        self.ui.applyButton.enabled = not missing and self._cancelToken is None
        calibrating = parameters.calibrationMode != "none"
        self.ui.referencePathLineEdit.enabled = parameters.calibrationMode == "reference"
        for widget in (self.ui.mediumHbOSpinBox, self.ui.mediumHbSpinBox, self.ui.mediumWaterSpinBox):
            widget.enabled = calibrating
        self.ui.perOptodeCheckBox.enabled = parameters.calibrationMode == "background"
        self.ui.checkpointPathLineEdit.enabled = parameters.method == "znet"
        self.ui.applyButton.toolTip = (_("Select {missing}").format(missing=_(" and ").join(missing)) if missing
                                       else _("Reconstruct HbO, Hb, water, HbT and StO2 maps"))
        canContrast = bool(parameters.hbtVolume and parameters.segmentationNode and parameters.segmentId)
        self.ui.contrastButton.enabled = canContrast
        self.ui.contrastButton.toolTip = (_("HbT inclusion / background inside the segment") if canContrast
                                          else _("Select an HbT map and a segment"))
        if self._trainingProcess is None:
            canTrain = (optionalPath(parameters.trainingDataDirectory) is not None
                        and optionalPath(parameters.trainingOutputDirectory) is not None)
            self.ui.trainButton.enabled = canTrain
            self.ui.trainButton.toolTip = (_("Train in a background process") if canTrain
                                           else _("Select the training data and output folders"))

    def onApplyButton(self) -> None:
        """Reconstruct the maps from the measurement file and the MRI slice (DRI with progress and Cancel)."""
        from deepimaging.core.progress import CancelToken, Cancelled

        with slicer.util.tryWithErrorDisplay(_("Failed to reconstruct the NIRST maps."), waitCursor=True):
            from DeepImagingCommonLib.dependencies import ensureModuleDependencies

            torch = ensureModuleDependencies("NIRSTRecon", askConfirmation=True)
            parameters = self._parameterNode
            withSegment = bool(parameters.segmentationNode and parameters.segmentId)  # the contrast is optional
            options = self.logic.panelOptions(parameters)  # method, ring, disk centre, calibration
            self._cancelToken = CancelToken()
            self._showReconstructionProgress(True)
            try:
                result = self.logic.reconstruct(
                    parameters.measurementFile, parameters.inputVolume, sliceIndex=parameters.sliceIndex,
                    checkpoint=parameters.checkpointFile if parameters.method == "znet" else None,
                    device=parameters.device,
                    segmentationNode=parameters.segmentationNode if withSegment else None,
                    segmentId=parameters.segmentId if withSegment else None,
                    progress=self._onReconstructionProgress, cancel=self._cancelToken, **options)
            except Cancelled:
                self.ui.statusLabel.text = _("Reconstruction cancelled; no maps added.")
                return
            finally:
                self._cancelToken = None
                self._showReconstructionProgress(False)
            self._measurementBinding.remember()
            self._checkpointBinding.remember()  # empty (the shipped Z-Net) is not remembered
            self._referenceBinding.remember()
            hbtNode = result.volumes["HbT"]
            parameters.hbtVolume = hbtNode
            slicer.util.setSliceViewerLayers(background=parameters.inputVolume, foreground=hbtNode,
                                             foregroundOpacity=0.6, fit=True)
            self._jumpToSlice(hbtNode)
            model = {"dri": "DRI", "znet-paper": _("shipped Z-Net, paper training")}.get(
                parameters.method, optionalPath(parameters.checkpointFile) or _("shipped Z-Net"))
            self.ui.statusLabel.text = _("Maps of slice {index} added ({model}, PyTorch {version}).").format(
                index=result.sliceIndex, model=str(model), version=torch.__version__) + "\n" + "\n".join(result.notes)
            self._showContrast(result.hbtContrast)

    def onCancelButton(self) -> None:
        """Ask the running reconstruction to stop (DRI checks between iterations)."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()
            self.ui.cancelButton.enabled = False

    def _showReconstructionProgress(self, running) -> None:
        self.ui.reconstructionProgressBar.value = 0
        self.ui.reconstructionProgressBar.setVisible(running)
        self.ui.cancelButton.setVisible(running)
        self.ui.cancelButton.enabled = running
        self.ui.applyButton.enabled = not running
        if not running:
            self._checkCanApply()

    def _onReconstructionProgress(self, fraction, message) -> None:
        """Progress callback: update the bar and let Qt handle events (the Cancel button)."""
        self.ui.reconstructionProgressBar.value = int(round(100 * fraction))
        self.ui.reconstructionProgressBar.setFormat(f"{message} %p%" if message else "%p%")
        slicer.app.processEvents()

    @staticmethod
    def _jumpToSlice(mapNode) -> None:
        """Centre the slice views on a map, so a slice of a 3D MRI is shown where the map lies."""
        from DeepImagingCommonLib.nodes import ijkToRASArray

        columns, rows, _ = mapNode.GetImageData().GetDimensions()
        centre = ijkToRASArray(mapNode) @ [(columns - 1) / 2.0, (rows - 1) / 2.0, 0.0, 1.0]
        slicer.modules.markups.logic().JumpSlicesToLocation(centre[0], centre[1], centre[2], True)

    def onContrastButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the HbT contrast."), waitCursor=True):
            parameters = self._parameterNode
            self._showContrast(self.logic.hbtContrast(parameters.hbtVolume, parameters.segmentationNode,
                                                      parameters.segmentId))

    def _showContrast(self, contrast) -> None:
        self.ui.contrastValueLabel.text = (_("(select an inclusion segment)") if contrast is None else
                                           _("{value:.3f} (inclusion / background)").format(value=contrast))

    def onSimulateButton(self) -> None:
        """Simulate a phantom: MRI volume, measurement file and inclusion segment, ready to reconstruct."""
        with slicer.util.tryWithErrorDisplay(_("Failed to simulate a phantom."), waitCursor=True):
            from DeepImagingCommonLib.dependencies import ensureModuleDependencies

            ensureModuleDependencies("NIRSTRecon", askConfirmation=True)
            parameters = self._parameterNode
            phantom = self.logic.simulatePhantom(seed=parameters.phantomSeed, loadTruth=parameters.loadTruth)
            parameters.measurementFile = str(phantom.measurementFile)
            parameters.inputVolume = phantom.mriVolume
            parameters.segmentationNode = phantom.segmentationNode
            parameters.segmentId = phantom.segmentId
            slicer.util.setSliceViewerLayers(background=phantom.mriVolume, fit=True)
            self.ui.statusLabel.text = _("Phantom simulated; measurements in {path}. Press Reconstruct.").format(
                path=str(phantom.measurementFile))

    def onTrainButton(self) -> None:
        """Start training in a background process, or cancel the one that is running."""
        if self._trainingProcess is not None:
            self._trainingProcess.cancel()
            self.ui.trainButton.enabled = False
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            from DeepImagingCommonLib.dependencies import ensureModuleDependencies

            ensureModuleDependencies("NIRSTRecon", askConfirmation=True)
            parameters = self._parameterNode
            self._trainingProcess = self.logic.startTraining(
                parameters.trainingDataDirectory, parameters.trainingOutputDirectory,
                epochs=parameters.trainingEpochs, device=parameters.device,
                architecture=parameters.trainingArchitecture)
            self._trainingOutputFolder = parameters.trainingOutputDirectory
            self._trainingDataBinding.remember()
            self._trainingOutputBinding.remember()
            self.ui.trainingLogTextEdit.clear()
            self.ui.trainingProgressBar.value = 0
            self.ui.trainingProgressBar.show()
            self.ui.trainButton.text = _("Cancel training")
            self.ui.trainButton.enabled = True
            self._trainingTimer.start()

    def _pollTraining(self) -> None:
        """Timer slot on the GUI thread: show the child's output and progress, finish when it ends."""
        process = self._trainingProcess
        if process is None:
            self._trainingTimer.stop()
            return
        for line in process.poll():
            progress = trainingProgress(line)
            if progress is not None:
                self.ui.trainingProgressBar.value = int(round(100 * progress[0]))
                self.ui.trainingProgressBar.setFormat(f"{progress[1]} %p%" if progress[1] else "%p%")
            if line.strip() and (progress is None or progress[1] == line.strip()):  # no bar/PROGRESS lines
                self.ui.trainingLogTextEdit.appendPlainText(line)
        if process.running:
            return
        self._trainingTimer.stop()
        self._trainingProcess = None
        self.ui.trainButton.text = _("Train")
        self.ui.trainingProgressBar.hide()
        checkpoint = self.logic.trainedCheckpoint(self._trainingOutputFolder)
        if process.state.value == "succeeded" and checkpoint is not None:
            if self._parameterNode:  # None when the scene was closed during training
                self._parameterNode.checkpointFile = str(checkpoint)  # reconstruct with the new network next
            self.ui.trainingLogTextEdit.appendPlainText(_("Training finished: {path}").format(path=str(checkpoint)))
        else:
            self.ui.trainingLogTextEdit.appendPlainText(_("Training {state} (exit code {code}).").format(
                state=process.state.value, code=process.returncode))
        self._checkCanApply()


#
# NIRSTReconLogic
#


class NIRSTReconLogic(ScriptedLoadableModuleLogic, NIRSTReconLib.NIRSTReconLogic):
    """Adds the module's parameter node to the Qt-free Logic in NIRSTReconLib.

    All computation (and the checks of bad input) is in NIRSTReconLib/logic.py, which the
    headless tests use too.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        NIRSTReconLib.NIRSTReconLogic.__init__(self)

    def getParameterNode(self):
        return NIRSTReconParameterNode(super().getParameterNode())


#
# NIRSTReconTest
#


class NIRSTReconTest(ScriptedLoadableModuleTest):
    """Runs the module Logic on a simulated phantom with the shipped Z-Net."""

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_NIRSTReconPhantom()
        self.setUp()
        self.test_NIRSTReconBadInput()
        self.setUp()
        self.test_NIRSTReconDRIAndCalibration()

    def test_NIRSTReconPhantom(self):
        from NIRSTReconLib.selftest import checkPhantom
        checkPhantom(self, NIRSTReconLogic)

    def test_NIRSTReconBadInput(self):
        from NIRSTReconLib.selftest import checkBadInput
        checkBadInput(self, NIRSTReconLogic)

    def test_NIRSTReconDRIAndCalibration(self):
        from NIRSTReconLib.selftest import checkDRIAndCalibration
        checkDRIAndCalibration(self, NIRSTReconLogic)
