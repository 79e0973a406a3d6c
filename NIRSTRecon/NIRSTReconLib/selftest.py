"""The module self-test's checks (NIRSTReconTest), kept in the Lib so the module file stays small.

Each takes the running ``ScriptedLoadableModuleTest`` (for ``delayDisplay`` and its asserts) and
the module's Logic class.
"""

import logging
import tempfile

import numpy as np
import slicer

import NIRSTReconLib


def checkPhantom(test, logicClass):
    """Simulate a phantom, reconstruct it with the shipped Z-Net, check names, grids and HbT contrast."""
    from DeepImagingCommonLib import nodes
    from DeepImagingCommonLib.dependencies import ensureModuleDependencies

    test.delayDisplay("Simulating a phantom")
    ensureModuleDependencies("NIRSTRecon", askConfirmation=False)
    logic = logicClass()
    phantom = logic.simulatePhantom(seed=1, loadTruth=True, directory=tempfile.mkdtemp(prefix="NIRSTReconTest-"))
    test.delayDisplay("Reconstructing with the shipped Z-Net")
    result = logic.reconstruct(phantom.measurementFile, phantom.mriVolume, device="cpu",
                               segmentationNode=phantom.segmentationNode, segmentId=phantom.segmentId)
    names = [result.volumes[key].GetName() for key, _, _ in NIRSTReconLib.OUTPUT_MAPS]
    test.assertEqual(names, ["HbO (uM)", "Hb (uM)", "Water (%)", "HbT (uM)", "StO2 (%)"])
    for volumeNode in result.volumes.values():
        output = nodes.imageFromVolumeNode(volumeNode)
        test.assertTrue(output.same_grid(nodes.imageFromVolumeNode(phantom.mriVolume)))
        test.assertTrue(np.all(np.isfinite(output.array)))
    truthContrast = logic.hbtContrast(phantom.truthVolumes["HbT"], phantom.segmentationNode, phantom.segmentId)
    logging.info(f"HbT contrast: reconstructed {result.hbtContrast:.3f}, true {truthContrast:.3f}")
    test.assertGreater(truthContrast, 1.0)
    test.assertGreater(result.hbtContrast, 1.0)
    test.delayDisplay("Test passed")


def checkBadInput(test, logicClass):
    """Wrong measurement count and negative amplitudes give clear errors and add no volume."""
    from deepimaging.core.errors import InputError

    test.delayDisplay("Bad input gives clear errors and adds no volume")
    logic = logicClass()
    phantom = logic.simulatePhantom(seed=2, loadTruth=False, directory=tempfile.mkdtemp(prefix="NIRSTReconTest-"))
    before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with test.assertRaisesRegex(InputError, "2160"):
        logic.reconstruct(phantom.measurements[:100], phantom.mriVolume)
    negative = phantom.measurements.copy()
    negative[5] = -1.0
    with test.assertRaisesRegex(InputError, "positive"):
        logic.reconstruct(negative, phantom.mriVolume)
    test.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), before)
    test.delayDisplay("Test passed")


def checkDRIAndCalibration(test, logicClass):
    """DRI on x1000 data calibrated with a reference phantom recovers the inclusion."""
    from deepimaging.nirst.calibration import homogeneous_amplitudes

    test.delayDisplay("DRI on x1000 data calibrated with a reference phantom")
    logic = logicClass()
    phantom = logic.simulatePhantom(seed=4, loadTruth=False, directory=tempfile.mkdtemp(prefix="NIRSTReconTest-"))
    steps = []
    result = logic.reconstruct(phantom.measurements * 1000, phantom.mriVolume, method="dri",
                               calibration=logic.calibration("reference", homogeneous_amplitudes() * 1000),
                               driElementSize=4.0, driIterations=3, segmentationNode=phantom.segmentationNode,
                               segmentId=phantom.segmentId,
                               progress=lambda fraction, message: steps.append(fraction))
    test.assertEqual(steps[-1], 1.0)
    test.assertGreater(result.hbtContrast, 1.0)
    test.delayDisplay("Test passed")
