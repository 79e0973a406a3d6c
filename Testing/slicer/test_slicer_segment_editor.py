"""The "Level set refine" effect's edit path, headless, on Slicer's own segment editor logic.

The effect's GUI part needs Slicer, but what its ``onApply`` does goes through
``vtkSlicerSegmentEditorLogic`` (qSlicerSegmentEditorAbstractEffect delegates to it), which
slicer-core ships.  These tests run the same sequence as ``SegmentEditorEffect.onApply``:
save undo state, aligned source image + selected segment labelmap -> refineOrientedLabelmap
-> modifier labelmap -> ModificationModeSet; then check masking and Undo.
"""

import numpy as np
import pytest

import slicer
from DeepImagingCommonLib import nodes
from LevelSetRefineLib import refineOrientedLabelmap


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, np.sum(a) + np.sum(b))


@pytest.fixture
def editor(headless_slicer, case_nodes):
    editor_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(slicer.mrmlScene)
    logic.SetMRMLApplicationLogic(headless_slicer.app_logic)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(case_nodes.segmentation)
    logic.SetSourceVolumeNode(case_nodes.volume)
    logic.SetCurrentSegmentID(case_nodes.segment_id)
    return logic, editor_node


def apply_effect(logic, segmentation_node, segment_id, **params):
    """SegmentEditorEffect.onApply, with the scripted effect's calls mapped to the logic."""
    assert logic.SaveStateForUndo()  # first, before anything changes
    assert logic.UpdateAlignedSourceVolume() and logic.UpdateSelectedSegmentLabelmap()
    refined = refineOrientedLabelmap(logic.GetAlignedSourceVolume(), logic.GetSelectedSegmentLabelmap(), **params)
    assert logic.ResetModifierLabelmapToDefault()
    modifier = logic.GetModifierLabelmap()
    modifier.DeepCopy(refined)
    logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, logic.ModificationModeSet, True, False)


def test_effect_refines_in_place_and_undo_restores(editor, case_nodes):
    logic, _ = editor
    apply_effect(logic, case_nodes.segmentation, case_nodes.segment_id)
    assert case_nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 1
    refined = nodes.segmentMask(case_nodes.segmentation, case_nodes.segment_id, case_nodes.volume)
    assert dice(refined, case_nodes.truth) > dice(case_nodes.rough, case_nodes.truth) + 0.2
    assert logic.CanUndo()
    logic.Undo()
    np.testing.assert_array_equal(
        nodes.segmentMask(case_nodes.segmentation, case_nodes.segment_id, case_nodes.volume), case_nodes.rough)


def test_effect_respects_editor_masking(editor, case_nodes):
    logic, editor_node = editor
    other = np.zeros_like(case_nodes.truth)
    other[:, :, 25:] = True  # a neighbour segment covering part of the ball
    other_id = nodes.writeMaskToSegment(other, case_nodes.segmentation, case_nodes.volume, name="Neighbour")
    assert np.logical_and(other, case_nodes.truth).any()
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    apply_effect(logic, case_nodes.segmentation, case_nodes.segment_id)
    refined = nodes.segmentMask(case_nodes.segmentation, case_nodes.segment_id, case_nodes.volume)
    assert not np.logical_and(refined, other).any()
    np.testing.assert_array_equal(nodes.segmentMask(case_nodes.segmentation, other_id, case_nodes.volume), other)
    outside = case_nodes.truth & ~other
    assert dice(refined, outside) > 0.9
