import os

import numpy as np

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *


class SegmentEditorLevelSetRefine(ScriptedLoadableModule):
    """Hidden module that registers the "Level set refine" Segment Editor effect."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegmentEditorLevelSetRefine")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "DeepImagingCommon"]
        self.parent.contributors = ["SlicerDeepImaging developers"]
        self.parent.hidden = True
        self.parent.helpText = _("This hidden module registers the 'Level set refine' segment editor effect.")
        self.parent.acknowledgementText = _("Built on 3D Slicer's scripted Segment Editor effect template.")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), self.__class__.__name__ + "Lib/SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


class SegmentEditorLevelSetRefineTest(ScriptedLoadableModuleTest):
    """Runs the effect through a Segment Editor widget on generated data, then undoes it."""

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_LevelSetRefineEffect()

    def test_LevelSetRefineEffect(self):
        """Refine a rough box inside a noisy ball in place; Dice must rise and Undo restore the box."""
        from DeepImagingCommonLib.dependencies import ensureModuleDependencies

        self.delayDisplay("Starting test_LevelSetRefineEffect")
        ensureModuleDependencies("LevelSetRefine", askConfirmation=False)

        rng = np.random.default_rng(1)
        shape = (32, 40, 40)
        z, y, x = np.indices(shape)
        truth = (x - 20) ** 2 + (y - 20) ** 2 + (z - 16) ** 2 < 11**2
        array = np.where(truth, 100.0, 20.0) + rng.normal(0.0, 20.0, shape)
        sourceVolumeNode = slicer.util.addVolumeFromArray(array.astype(np.float32), name="LevelSetRefineEffectTest")
        rough = np.zeros(shape, np.uint8)
        rough[12:20, 14:24, 16:26] = 1

        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(sourceVolumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "Ball")
        slicer.util.updateSegmentBinaryLabelmapFromArray(rough, segmentationNode, segmentId, sourceVolumeNode)

        self.delayDisplay("Create segment editor")
        segmentEditorWidget = slicer.qMRMLSegmentEditorWidget()
        segmentEditorWidget.show()
        segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        segmentEditorNode = slicer.vtkMRMLSegmentEditorNode()
        slicer.mrmlScene.AddNode(segmentEditorNode)
        segmentEditorWidget.setMRMLSegmentEditorNode(segmentEditorNode)
        segmentEditorWidget.setSegmentationNode(segmentationNode)
        segmentEditorWidget.setSourceVolumeNode(sourceVolumeNode)
        segmentEditorNode.SetSelectedSegmentID(segmentId)

        self.delayDisplay("Run the effect")
        segmentEditorWidget.setActiveEffectByName("Level set refine")
        effect = segmentEditorWidget.activeEffect()
        self.assertIsNotNone(effect)
        effect.setParameter("MaxIterations", 200)
        effect.self().onApply()

        def dice(a, b):
            return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())

        refined = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, sourceVolumeNode) > 0
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertGreater(dice(refined, truth), dice(rough > 0, truth) + 0.2)

        self.delayDisplay("Undo restores the rough segment")
        segmentEditorWidget.undo()
        restored = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, sourceVolumeNode) > 0
        np.testing.assert_array_equal(restored, rough > 0)

        segmentEditorWidget.setActiveEffect(None)
        self.delayDisplay("test_LevelSetRefineEffect passed")
