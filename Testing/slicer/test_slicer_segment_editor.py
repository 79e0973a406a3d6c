"""The "Level set refine" effect's Apply, headless, on Slicer's own segment editor logic.

The effect's GUI part needs Slicer, but its ``onApply`` only confirms visibility, shows the
wait cursor and calls ``LevelSetRefineLib.applyRefinementEffect`` with the scripted effect.
qSlicerSegmentEditorAbstractEffect delegates what that function calls to
``vtkSlicerSegmentEditorLogic``, which slicer-core ships; :class:`EffectOnLogic` maps the
scripted effect's methods onto it (and counts the undo states saved), so these tests run the
very function Slicer runs: dependency step -> validation and refinement -> undo state ->
modifier labelmap -> ModificationModeSet; then they check masking, Undo and every failure path
(reported, segment unchanged, no undo state left behind).
"""

import logging
import types

import numpy as np
import pytest

import slicer
from DeepImagingCommonLib import nodes
from DeepImagingCommonLib.dependencies import DependencyError
from deepimaging.core.errors import InputError
from LevelSetRefineLib import (CHECKPOINT_PARAMETER, DEFAULT_ITERATIONS, DEFAULT_MU, MAX_ITERATIONS_PARAMETER,
                               METHOD_PARAMETER, MU_PARAMETER, applyRefinementEffect, describeEffectError,
                               effectParameters, isOutOfMemoryError)
from LevelSetRefineLib import effect as effect_module


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, np.sum(a) + np.sum(b))


class EffectOnLogic:
    """The scripted effect's methods that ``applyRefinementEffect`` uses, on the editor logic."""

    def __init__(self, logic):
        self.logic = logic
        self.undoStatesSaved = 0
        self.parameters = {METHOD_PARAMETER: "classic", CHECKPOINT_PARAMETER: "", MU_PARAMETER: DEFAULT_MU,
                           MAX_ITERATIONS_PARAMETER: DEFAULT_ITERATIONS}

    def sourceVolumeImageData(self):
        self.logic.UpdateAlignedSourceVolume()
        return self.logic.GetAlignedSourceVolume()

    def selectedSegmentLabelmap(self):
        self.logic.UpdateSelectedSegmentLabelmap()
        return self.logic.GetSelectedSegmentLabelmap()

    def saveStateForUndo(self):
        self.undoStatesSaved += 1
        assert self.logic.SaveStateForUndo()

    def defaultModifierLabelmap(self):
        assert self.logic.ResetModifierLabelmapToDefault()
        return self.logic.GetModifierLabelmap()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode):
        segmentationNode = self.logic.GetSegmentationNode()
        segmentId = self.logic.GetCurrentSegmentID()
        # qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap: masking applies (not bypassed).
        self.logic.ModifySegmentByLabelmap(segmentationNode, segmentId, labelmap, mode, True, False)

    def parameter(self, name):
        return str(self.parameters.get(name, ""))  # as the editor node: "" for a parameter never set

    def doubleParameter(self, name):
        return float(self.parameters[name])

    def integerParameter(self, name):
        return int(self.parameters[name])


class Reporter:
    """Stands in for ``slicer.util.errorDisplay``."""

    def __init__(self):
        self.messages = []

    def __call__(self, message):
        self.messages.append(message)


def no_dependencies_needed():
    return None


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
    assert not logic.CanUndo()
    return logic, editor_node


def apply_effect(logic, ensureDependencies=no_dependencies_needed, busy=None, **parameters):
    """What SegmentEditorEffect.onApply runs after confirmCurrentSegmentVisible."""
    effect, reporter = EffectOnLogic(logic), Reporter()
    effect.parameters.update(parameters)
    changed = applyRefinementEffect(effect, ensureDependencies, reporter, logic.ModificationModeSet, busy=busy)
    return changed, effect, reporter


def assert_unchanged_without_undo(logic, effect, case_nodes):
    np.testing.assert_array_equal(
        nodes.segmentMask(case_nodes.segmentation, case_nodes.segment_id, case_nodes.volume), case_nodes.rough)
    assert effect.undoStatesSaved == 0
    assert not logic.CanUndo()


def test_effect_refines_in_place_and_undo_restores(editor, case_nodes):
    logic, _ = editor
    changed, effect, reporter = apply_effect(logic)
    assert changed and reporter.messages == []
    assert effect.undoStatesSaved == 1
    assert case_nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 1
    refined = nodes.segmentMask(case_nodes.segmentation, case_nodes.segment_id, case_nodes.volume)
    assert dice(refined, case_nodes.truth) > dice(case_nodes.rough, case_nodes.truth) + 0.2
    assert logic.CanUndo()
    logic.Undo()
    np.testing.assert_array_equal(
        nodes.segmentMask(case_nodes.segmentation, case_nodes.segment_id, case_nodes.volume), case_nodes.rough)
    assert not logic.CanUndo()  # exactly one undo state


def test_effect_respects_editor_masking(editor, case_nodes):
    logic, editor_node = editor
    other = np.zeros_like(case_nodes.truth)
    other[:, :, 25:] = True  # a neighbour segment covering part of the ball
    other_id = nodes.writeMaskToSegment(other, case_nodes.segmentation, case_nodes.volume, name="Neighbour")
    assert np.logical_and(other, case_nodes.truth).any()
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    changed, _, reporter = apply_effect(logic)
    assert changed and reporter.messages == []
    refined = nodes.segmentMask(case_nodes.segmentation, case_nodes.segment_id, case_nodes.volume)
    assert not np.logical_and(refined, other).any()
    np.testing.assert_array_equal(nodes.segmentMask(case_nodes.segmentation, other_id, case_nodes.volume), other)
    outside = case_nodes.truth & ~other
    assert dice(refined, outside) > 0.9


def test_declined_dependencies_are_reported_without_an_undo_state(editor, case_nodes):
    logic, _ = editor
    calls = []

    def declined():
        calls.append("dependencies")
        raise DependencyError("PyTorch is required; its installation was declined")

    entered = []
    changed, effect, reporter = apply_effect(logic, declined, busy=lambda: _Recorder(entered))
    assert calls == ["dependencies"] and not changed
    assert_unchanged_without_undo(logic, effect, case_nodes)
    assert len(reporter.messages) == 1 and "installation was declined" in reporter.messages[0]
    assert reporter.messages[0] == "Level set refine: PyTorch is required; its installation was declined"
    assert entered == []  # no wait cursor while the user is being asked


@pytest.mark.parametrize("bad", ["empty segment", "NaN voxel"])
def test_bad_input_is_reported_without_an_undo_state(editor, case_nodes, bad):
    logic, _ = editor
    if bad == "empty segment":
        empty_id = case_nodes.segmentation.GetSegmentation().AddEmptySegment("", "Empty")
        logic.SetCurrentSegmentID(empty_id)
    else:
        array = slicer.util.arrayFromVolume(case_nodes.volume)
        array[3, 4, 5] = np.nan
        slicer.util.arrayFromVolumeModified(case_nodes.volume)
    changed, effect, reporter = apply_effect(logic)
    assert not changed
    assert len(reporter.messages) == 1
    assert reporter.messages[0].startswith("Level set refine: ")
    assert ("empty" if bad == "empty segment" else "finite") in reporter.messages[0].lower()
    assert_unchanged_without_undo(logic, effect, case_nodes)
    if bad == "empty segment":
        assert not nodes.segmentMask(case_nodes.segmentation, empty_id, case_nodes.volume).any()


def test_out_of_memory_is_reported_without_an_undo_state(editor, case_nodes, monkeypatch):
    logic, _ = editor

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)")

    monkeypatch.setattr(effect_module, "refineOrientedLabelmap", out_of_memory)
    entered = []
    changed, effect, reporter = apply_effect(logic, busy=lambda: _Recorder(entered))  # must not raise
    assert not changed
    assert entered == ["enter", "exit"]  # the wait cursor is restored before the message shows
    assert len(reporter.messages) == 1
    message = reporter.messages[0]
    assert "out of memory" in message and "CPU" in message and "smaller region" in message
    assert_unchanged_without_undo(logic, effect, case_nodes)


def test_unexpected_error_names_its_type_and_logs_the_traceback(editor, case_nodes, monkeypatch, caplog):
    logic, _ = editor

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(effect_module, "refineOrientedLabelmap", broken)
    with caplog.at_level(logging.ERROR):
        changed, effect, reporter = apply_effect(logic)
    assert not changed
    assert reporter.messages == ["Level set refine failed: ValueError: operands could not be broadcast together"]
    assert any(record.exc_info and record.exc_info[0] is ValueError for record in caplog.records)
    assert_unchanged_without_undo(logic, effect, case_nodes)


def test_a_failing_write_is_reported_after_the_undo_state(editor, case_nodes):
    """The write comes after the undo state; if it fails, the message still reaches the user."""
    logic, _ = editor
    effect, reporter = EffectOnLogic(logic), Reporter()

    def failing_write(labelmap, mode):
        raise RuntimeError("segmentation node was removed")

    effect.modifySelectedSegmentByLabelmap = failing_write
    assert not applyRefinementEffect(effect, no_dependencies_needed, reporter, logic.ModificationModeSet)
    assert effect.undoStatesSaved == 1
    assert reporter.messages == ["Level set refine failed: RuntimeError: segmentation node was removed"]


class _Recorder:
    """A ``busy`` context manager that records when it is entered and left."""

    def __init__(self, events):
        self.events = events

    def __enter__(self):
        self.events.append("enter")

    def __exit__(self, *exc):
        self.events.append("exit")
        return False


def test_error_messages_by_kind():
    assert describeEffectError(InputError("the selected segment is empty")) == \
        "Level set refine: the selected segment is empty"
    assert describeEffectError(DependencyError("monai>=1.3 is missing")) == "Level set refine: monai>=1.3 is missing"
    for error in (MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
                  type("OutOfMemoryError", (RuntimeError,), {})("CUDA error")):
        assert isOutOfMemoryError(error)
        assert "ran out of memory" in describeEffectError(error)
    assert not isOutOfMemoryError(RuntimeError("CUDA error: device-side assert triggered"))
    assert not isOutOfMemoryError(DependencyError("torch is missing"))
    missing = describeEffectError(ModuleNotFoundError("No module named 'torch'"))
    assert "could not be imported" in missing and "No module named 'torch'" in missing
    assert describeEffectError(KeyError("Mu")) == "Level set refine failed: KeyError: 'Mu'"


# -- the learned method ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learned_case(tmp_path_factory):
    """A tiny 2D learned refiner (seconds on one CPU thread) and an unseen single-slice case."""
    from deepimaging.core.imageio import read_image
    from deepimaging.levelset.deep import train_refiner, write_synthetic_refine_dataset

    root = tmp_path_factory.mktemp("effect-refiner")
    data = write_synthetic_refine_dataset(root / "data", n=8, dim=2, seed=0)
    checkpoint = train_refiner(data, root / "run", dim=2, epochs=4, device="cpu", steps_per_epoch=6, batch_size=4,
                               val_items=4, grid=32, widths=(8, 16), features=8)
    test = write_synthetic_refine_dataset(root / "test", n=2, dim=2, seed=500)
    name = sorted((test / "images").iterdir())[1].name
    image = read_image(test / "images" / name)
    truth = read_image(test / "masks" / name).array > 0
    coarse = read_image(test / "coarse" / name).array > 0
    return checkpoint, image, truth, coarse


@pytest.fixture
def slice_editor(headless_slicer, learned_case):
    """The editor logic on a single-slice volume whose segment "Object" is a rough outline."""
    _, image, truth, coarse = learned_case
    volume = nodes.volumeNodeFromImage(image, "Slice")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Slice segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segment_id = nodes.writeMaskToSegment(coarse, segmentation, volume, name="Object")
    editor_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(slicer.mrmlScene)
    logic.SetMRMLApplicationLogic(headless_slicer.app_logic)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation)
    logic.SetSourceVolumeNode(volume)
    logic.SetCurrentSegmentID(segment_id)
    assert not logic.CanUndo()
    return logic, types.SimpleNamespace(volume=volume, segmentation=segmentation, segment_id=segment_id,
                                        truth=truth, rough=coarse)


def test_learned_effect_refines_in_place_and_undo_restores(slice_editor, learned_case):
    logic, case = slice_editor
    checkpoint = str(learned_case[0])
    changed, effect, reporter = apply_effect(logic, Method="learned", Checkpoint=checkpoint)
    assert changed and reporter.messages == []
    assert effect.undoStatesSaved == 1
    assert case.segmentation.GetSegmentation().GetNumberOfSegments() == 1
    refined = nodes.segmentMask(case.segmentation, case.segment_id, case.volume)
    assert dice(refined, case.truth) > dice(case.rough, case.truth) + 0.1 and dice(refined, case.truth) > 0.8
    logic.Undo()
    np.testing.assert_array_equal(nodes.segmentMask(case.segmentation, case.segment_id, case.volume), case.rough)
    assert not logic.CanUndo()  # exactly one undo state


def test_effect_parameters_by_method(tmp_path):
    effect = EffectOnLogic(None)
    assert effectParameters(effect) == {"method": "classic", "mu": DEFAULT_MU, "max_iterations": DEFAULT_ITERATIONS}
    del effect.parameters[METHOD_PARAMETER]  # an editor node saved before the method existed
    assert effectParameters(effect)["method"] == "classic"
    effect.parameters.update({METHOD_PARAMETER: "learned", CHECKPOINT_PARAMETER: str(tmp_path / "best.pt")})
    assert effectParameters(effect) == {"method": "learned", "checkpoint": str(tmp_path / "best.pt")}


@pytest.mark.parametrize("bad", ["no checkpoint", "missing file", "truncated file", "3D image"])
def test_a_bad_checkpoint_is_reported_without_an_undo_state(request, learned_case, tmp_path, bad):
    checkpoint = learned_case[0]
    if bad == "3D image":  # the 2D refiner on the 3D ball of the classic tests
        logic, _ = request.getfixturevalue("editor")
        case = request.getfixturevalue("case_nodes")
    else:
        logic, case = request.getfixturevalue("slice_editor")
    path = {"no checkpoint": "", "missing file": str(tmp_path / "none.pt"), "3D image": str(checkpoint)}.get(bad)
    if bad == "truncated file":
        path = tmp_path / "truncated.pt"
        path.write_bytes(checkpoint.read_bytes()[:300])
    changed, effect, reporter = apply_effect(logic, Method="learned", Checkpoint=str(path))
    assert not changed and len(reporter.messages) == 1
    expected = {"no checkpoint": "no model selected", "missing file": "checkpoint not found",
                "truncated file": "truncated.pt", "3D image": "this model is 2D but the image is a 3D volume"}[bad]
    assert reporter.messages[0].startswith("Level set refine: ") and expected in reporter.messages[0], \
        reporter.messages
    assert_unchanged_without_undo(logic, effect, case)
