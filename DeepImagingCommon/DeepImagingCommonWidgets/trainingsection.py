"""The "Train" section of a module panel, shared by GLSSegment, ROGSegment and LevelSetRefine.

Each of those panels trains in a background :class:`~DeepImagingCommonLib.jobs.CommandJob`
from segmentations in the scene or a folder on disk, with a Train/Cancel button, a progress
bar, a status line and a log.  :class:`TrainingSectionMixin` is that wiring once; the module's
Widget mixes it in and supplies what differs:

* ``trainingModuleName``: the module whose packages the child needs; ``trainingLib``: its
  Lib package, whose ``pairsFromSegmentations`` turns checked segmentations into pairs;
* ``trainingOptions(parameters)``: keyword arguments of its Logic's ``startTraining``;
* ``onTrainingSucceeded(job)``: what to do with ``job.bestCheckpoint``; returns the status text;
* ``_setTraining(running)``: enable/disable its inputs (module-specific widgets);
* ``trainingFolderLabel``, ``trainingSegmentationsLabel``, ``trainingPairsLabel`` in the ui and
  ``describePairs`` in the Lib, for :meth:`TrainingSectionMixin._updateTrainingSource`;
* the ui names ``trainButton``, ``trainingLogTextEdit``, ``trainingProgressBar``,
  ``trainingStatusLabel``, ``trainingSegmentationsComboBox``, the parameters
  ``trainingSource``, ``trainingFolder``, ``outputFolder`` and the attributes
  ``_trainingJob``, ``_trainingTimer``, ``_trainingFolderBinding``, ``_outputFolderBinding``,
  ``logic`` and ``_parameterNode``.

It calls Slicer's GUI helpers (error dialogs, event processing), so it lives here, not in the
Qt-free DeepImagingCommonLib.
"""

from pathlib import Path

import slicer
from slicer.i18n import tr as _

TRAIN_FROM_FOLDER = "Folder on disk"
TRAIN_FROM_SCENE = "Segmentations in this scene"


class TrainingSectionMixin:
    """Train/Cancel, progress, log and the outcome message of a background training job."""

    trainingModuleName = ""
    trainingLib = None  # the module's Lib package (offers pairsFromSegmentations)

    def trainingOptions(self, parameters):
        """Keyword arguments of the module Logic's ``startTraining`` (abstract: each panel has its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define trainingOptions(parameters)")

    def onTrainingSucceeded(self, job):
        """Use ``job.bestCheckpoint`` and return the status text (abstract: each panel has its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define onTrainingSucceeded(job)")

    @staticmethod
    def _enable(button, missing, toolTip) -> None:
        """Enable ``button`` when nothing is ``missing``, else say in its tooltip what to select."""
        button.enabled = not missing
        button.toolTip = _("Select {missing}").format(missing=missing) if missing else toolTip

    def _missingTrainingInputs(self) -> str:
        from DeepImagingCommonLib.inputs import isPathSet

        parameters, missing = self._parameterNode, []
        if parameters.trainingSource == TRAIN_FROM_SCENE:
            if not self.ui.trainingSegmentationsComboBox.checkedNodes():
                missing.append(_("segmentations to train on"))
        elif not isPathSet(parameters.trainingFolder):
            missing.append(_("a training data folder"))
        if not isPathSet(parameters.outputFolder):
            missing.append(_("an output folder"))
        return _(" and ").join(missing)

    def _updateTrainingSource(self) -> None:
        """Show the scene-pair or the folder inputs, and describe the checked segmentations."""
        fromScene = self._parameterNode.trainingSource == TRAIN_FROM_SCENE
        for widget in (self.ui.trainingSegmentationsLabel, self.ui.trainingSegmentationsComboBox,
                       self.ui.trainingPairsLabel):
            widget.visible = fromScene
        self.ui.trainingFolderLabel.visible = self.ui.trainingFolderLineEdit.visible = not fromScene
        checked = self.ui.trainingSegmentationsComboBox.checkedNodes()
        self.ui.trainingPairsLabel.text = self.trainingLib.describePairs(checked)

    def onTrainButton(self) -> None:
        """Start training in the background, or cancel the running job."""
        if self._trainingJob is not None:
            self._trainingJob.cancel()
            self.ui.trainButton.enabled = False
            self.ui.trainingStatusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            from DeepImagingCommonLib.dependencies import ensureModuleDependencies

            # The training process uses Slicer's Python, its torch and the module's packages.
            ensureModuleDependencies(self.trainingModuleName, askConfirmation=True)
            parameters = self._parameterNode
            options = dict(self.trainingOptions(parameters), outputFolder=parameters.outputFolder,
                           progress=self._onExportProgress)
            self.ui.trainingLogTextEdit.clear()
            if parameters.trainingSource == TRAIN_FROM_SCENE:
                pairs = self.trainingLib.pairsFromSegmentations(self.ui.trainingSegmentationsComboBox.checkedNodes())
                self._trainingJob = self.logic.startTraining(pairs=pairs, **options)
            else:
                self._trainingJob = self.logic.startTraining(dataFolder=parameters.trainingFolder, **options)
                self._trainingFolderBinding.remember()
            self._outputFolderBinding.remember()
            self._setTraining(True)
            self._trainingTimer.start()

    def _onExportProgress(self, fraction: float, message: str) -> None:
        self.ui.trainingStatusLabel.text = message
        slicer.app.processEvents()

    def _onTrainingTimer(self) -> None:
        """Drain the job's output on the GUI thread and show its progress."""
        job = self._trainingJob
        if job is None:
            self._trainingTimer.stop()
            return
        for line in job.poll():
            self.ui.trainingLogTextEdit.appendPlainText(line)
        self.ui.trainingProgressBar.value = int(round(100 * job.status.fraction))
        self.ui.trainingStatusLabel.text = job.status.text()
        if not job.running:
            self._trainingTimer.stop()
            self._trainingJob = None
            self._setTraining(False)
            self._reportTraining(job)

    def _reportTraining(self, job) -> None:
        """Hand the best checkpoint to the panel, or say how the job ended."""
        from DeepImagingCommonLib.process import ProcessState

        if job.state == ProcessState.SUCCEEDED and job.bestCheckpoint is not None:
            self.ui.trainingStatusLabel.text = self.onTrainingSucceeded(job)
        elif job.state == ProcessState.CANCELLED:
            resumable = (Path(job.outputFolder) / "last.pt").is_file()
            self.ui.trainingStatusLabel.text = _("Training cancelled.") + (
                " " + _("Train again with the same output folder to resume from last.pt.") if resumable else "")
        else:
            self.ui.trainingStatusLabel.text = _("Training failed.")
            slicer.util.errorDisplay(_("Training failed: {error}").format(error=job.errorMessage()))
