import numpy as np

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *


#
# DeepImagingCommon
#


class DeepImagingCommon(ScriptedLoadableModule):
    """Hidden module: ships DeepImagingCommonLib (node conversion, torch check, background
    processes) and the `deepimaging` library for the visible SlicerDeepImaging modules.
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep Imaging Common")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Volumes", "Segmentations"]
        self.parent.contributors = ["SlicerDeepImaging developers"]
        self.parent.hidden = True
        self.parent.helpText = _("""
Shared helpers of the SlicerDeepImaging extension (not a user-facing module): conversion
between MRML nodes and the arrays with geometry that the `deepimaging` library uses,
installation of PyTorch through the PyTorch extension, and background processes for long jobs.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer's scripted-module templates and the PyTorch extension (PyTorchUtils).
""")


def confirmPackageInstallation(text, details):
    """Ask once before pip installs a module's packages (DeepImagingCommonLib.dependencies)."""
    return slicer.util.confirmOkCancelDisplay(text, windowTitle=_("SlicerDeepImaging"), detailedText=details)


#
# DeepImagingCommonTest
#


class DeepImagingCommonTest(ScriptedLoadableModuleTest):
    """Checks the node conversions inside Slicer (no torch needed)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_VolumeGeometryRoundTrip()
        self.setUp()
        self.test_SegmentRoundTrip()

    def _obliqueImage(self):
        from deepimaging.core.image import Image

        angle = np.deg2rad(30.0)
        direction = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                              [np.sin(angle), np.cos(angle), 0.0],
                              [0.0, 0.0, 1.0]])
        array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
        return Image(array, spacing=(0.7, 0.8, 2.5), origin=(10.0, -20.0, 5.0), direction=direction)

    def test_VolumeGeometryRoundTrip(self):
        from DeepImagingCommonLib import nodes

        self.delayDisplay("Volume node <-> Image keeps voxels and geometry")
        image = self._obliqueImage()
        volumeNode = nodes.volumeNodeFromImage(image, "DeepImagingCommonTest")
        back = nodes.imageFromVolumeNode(volumeNode)
        np.testing.assert_array_equal(back.array, image.array)
        np.testing.assert_allclose(back.spacing, image.spacing, atol=1e-6)
        np.testing.assert_allclose(back.origin, image.origin, atol=1e-6)
        np.testing.assert_allclose(back.direction, image.direction, atol=1e-6)
        self.delayDisplay("Test passed")

    def test_SegmentRoundTrip(self):
        from DeepImagingCommonLib import nodes

        self.delayDisplay("Mask -> segment -> mask")
        volumeNode = nodes.volumeNodeFromImage(self._obliqueImage(), "DeepImagingCommonTest")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        mask = np.zeros((4, 5, 6), bool)
        mask[1:3, 1:4, 2:5] = True
        segmentId = nodes.writeMaskToSegment(mask, segmentationNode, volumeNode, name="Box", color=(0.9, 0.2, 0.2))
        np.testing.assert_array_equal(nodes.segmentMask(segmentationNode, segmentId, volumeNode), mask)
        self.assertEqual(segmentationNode.GetSegmentation().GetSegment(segmentId).GetName(), "Box")
        self.delayDisplay("Test passed")
