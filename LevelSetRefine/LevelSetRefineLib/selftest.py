"""The module self-test's checks (LevelSetRefineTest), kept in the Lib so the module file stays small.

Each takes the running ``ScriptedLoadableModuleTest`` (for ``delayDisplay`` and its asserts) and
the module's Logic class.  They run the same Logic the headless tests cover.
"""

import logging
import tempfile

import numpy as np

import slicer


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def makeCase():
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


def checkImprovesDice(test, logicClass):
    """Classic refinement of the rough box: a new segment "Ball (refined)" much closer to the ball."""
    from DeepImagingCommonLib.dependencies import ensureModuleDependencies

    test.delayDisplay("Starting the test")
    ensureModuleDependencies("LevelSetRefine", askConfirmation=False)
    volumeNode, segmentationNode, segmentId, truth, rough = makeCase()
    logic = logicClass()
    outputId = logic.refine(volumeNode, segmentationNode, segmentId)
    test.assertNotEqual(outputId, segmentId)
    test.assertEqual(segmentationNode.GetSegmentation().GetSegment(outputId).GetName(), "Ball (refined)")
    refined = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, outputId, volumeNode) > 0
    original = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0
    np.testing.assert_array_equal(original, rough)
    before, after = dice(rough, truth), dice(refined, truth)
    logging.info(f"Dice before {before:.3f}, after {after:.3f}")
    test.assertGreater(after, before + 0.2)
    test.assertGreater(after, 0.85)
    test.delayDisplay("Test passed")


def checkBadInput(test, logicClass):
    """Bad input gives clear errors and adds no segment."""
    from deepimaging.core.errors import InputError

    test.delayDisplay("Bad input gives clear errors and adds no segment")
    volumeNode, segmentationNode, segmentId, truth, rough = makeCase()
    emptyId = segmentationNode.GetSegmentation().AddEmptySegment("", "Empty")
    logic = logicClass()
    with test.assertRaisesRegex(InputError, "empty"):
        logic.refine(volumeNode, segmentationNode, emptyId)
    with test.assertRaisesRegex(InputError, "no segment with ID"):
        logic.refine(volumeNode, segmentationNode, "NoSuchSegment")
    with test.assertRaisesRegex(InputError, "no model selected"):
        logic.refine(volumeNode, segmentationNode, segmentId, method="learned", checkpoint="")
    test.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 2)
    test.delayDisplay("Test passed")


def checkLearnedAndBox(test, logicClass):
    """Train a tiny 2D refiner (seconds), refine a single slice with it and segment in a markups ROI box."""
    from DeepImagingCommonLib import nodes
    from DeepImagingCommonLib.dependencies import ensureModuleDependencies
    from deepimaging.core.imageio import read_image
    from deepimaging.levelset.deep import train_refiner, write_synthetic_refine_dataset

    test.delayDisplay("Training a tiny learned refiner on generated slices")
    ensureModuleDependencies("LevelSetRefine", askConfirmation=False)
    folder = tempfile.mkdtemp(prefix="LevelSetRefineTest-")
    data = write_synthetic_refine_dataset(f"{folder}/data", n=8, dim=2, seed=0)
    checkpoint = train_refiner(data, f"{folder}/run", dim=2, epochs=4, device="cpu", steps_per_epoch=6, batch_size=4,
                               val_items=4, grid=32, widths=(8, 16), features=8)
    test.delayDisplay("Refining and segmenting in a box with it")
    names = sorted(p.name for p in (data / "images").iterdir())
    image = read_image(data / "images" / names[0])
    truth = read_image(data / "masks" / names[0]).array > 0
    coarse = read_image(data / "coarse" / names[0]).array > 0
    volumeNode = nodes.volumeNodeFromImage(image, "LevelSetRefineTestSlice")
    segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentId = nodes.writeMaskToSegment(coarse, segmentationNode, volumeNode, name="Object")
    logic = logicClass()
    outputId = logic.refine(volumeNode, segmentationNode, segmentId, method="learned", checkpoint=checkpoint,
                            device="cpu")
    test.assertGreater(dice(nodes.segmentMask(segmentationNode, outputId, volumeNode), truth), 0.8)
    zs, ys, xs = np.nonzero(truth)
    ijkToRAS = nodes.ijkToRASArray(volumeNode)
    corners = np.array([[xs.min() - 0.5, ys.min() - 0.5, 0, 1], [xs.max() + 0.5, ys.max() + 0.5, 0, 1]]) @ ijkToRAS.T
    roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Object box")
    roiNode.SetCenter(*corners[:, :3].mean(axis=0))
    roiNode.SetSize(*np.abs(corners[1, :3] - corners[0, :3]))
    boxId = logic.segmentInBox(volumeNode, roiNode, checkpoint, device="cpu")
    test.assertTrue(nodes.segmentMask(logic.lastSegmentationNode, boxId, volumeNode).any())
    test.delayDisplay("Test passed")
