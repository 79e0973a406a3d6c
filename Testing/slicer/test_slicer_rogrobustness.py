"""ROGSegment's Robustness Logic on real MRML nodes: reference by segment names, attacks, and
the result nodes (adversarial volume, perturbation, attacked segmentation, table + plot chart)."""

import numpy as np
import pytest
import torch

import slicer
from DeepImagingCommonLib import nodes
from deepimaging.core.errors import InputError
from ROGSegmentLib import ROGRobustnessLogic, parseEps, referenceLabelImage
from rogcases import save_rog, tiny_plan


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_rog(tmp_path_factory.mktemp("rog") / "best.pt", tiny_plan())


@pytest.fixture
def reference(case_nodes):
    """A reference named as the model's labels: 'liver' (the ball) and an empty 'liver tumour'."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Reference")
    node.CreateDefaultDisplayNodes()
    nodes.writeMaskToSegment(case_nodes.truth, node, case_nodes.volume, name="Liver")
    node.GetSegmentation().AddEmptySegment("", "liver tumour")
    return node


def node_count():
    return slicer.mrmlScene.GetNumberOfNodes()


def test_eps_text_and_reference_by_names(case_nodes, reference):
    assert parseEps("8, 0;4") == [0.0, 4.0, 8.0]
    with pytest.raises(InputError, match="comma-separated"):
        parseEps("eight")
    image, labels = referenceLabelImage(reference, case_nodes.volume, {0: "background", 1: "liver", 2: "liver tumour"})
    assert labels.shape == image.shape and set(np.unique(labels.array)) == {0, 1}
    np.testing.assert_array_equal(labels.array == 1, case_nodes.truth)
    with pytest.raises(InputError, match="no segment named 'spleen'"):
        referenceLabelImage(reference, case_nodes.volume, {0: "background", 3: "spleen"})


def test_evaluate_adds_the_result_nodes(case_nodes, reference, checkpoint):
    progress = []
    outputs = ROGRobustnessLogic().evaluate(case_nodes.volume, reference, checkpoint, eps=[0, 8], attacks=["pgd", "apgd-ce"],
                                            iterations=2, device="cpu", progress=lambda f, m: progress.append(f))
    result = outputs.result
    assert result.eps == pytest.approx([0.0, 8 / 255]) and list(result.attacks) == ["pgd", "apgd-ce"]
    assert result.robust_dice[1] <= result.clean_dice + 1e-9 and progress[-1] == 1.0
    # what the network sees (intensities clipped to the plan's range) moves by at most 8/255 of
    # that range; voxels outside it are placed at the limit + perturbation, so that preprocessing
    # the adversarial volume gives the attacked input
    channel = tiny_plan().channels[0]
    low, high = channel.percentile_00_5, channel.percentile_99_5
    bound = 8 / 255 * (high - low)
    perturbation = slicer.util.arrayFromVolume(outputs.perturbationVolume)
    original = slicer.util.arrayFromVolume(case_nodes.volume)
    adversarial = slicer.util.arrayFromVolume(outputs.adversarialVolume)
    np.testing.assert_allclose(adversarial, original + perturbation, atol=1e-3)
    seen = np.abs(np.clip(adversarial, low, high) - np.clip(original, low, high))
    assert seen.max() <= bound * 1.001 and seen.max() > 0.5 * bound
    inside = (original > low) & (original < high)
    assert np.abs(perturbation[inside]).max() <= bound * 1.001
    # same geometry as the input; a named segmentation of the adversarial volume
    assert np.allclose(nodes.ijkToRASArray(outputs.adversarialVolume), nodes.ijkToRASArray(case_nodes.volume))
    segmentation = outputs.attackedSegmentation.GetSegmentation()
    assert [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()] == ["liver", "liver tumour"]
    # Dice vs eps: one row per eps, a column per attack, a plot series per column but eps
    table = outputs.tableNode.GetTable()
    assert table.GetNumberOfRows() == 2
    assert [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())] == [
        "eps (1/255 of range)", "clean", "pgd", "apgd-ce", "robust"]
    assert table.GetValue(1, 4).ToDouble() == pytest.approx(result.robust_dice[1])
    assert outputs.plotChartNode.GetNumberOfPlotSeriesNodes() == 4
    assert "adversarial (eps 8/255)" in outputs.adversarialVolume.GetName()


def test_bad_input_adds_no_node(case_nodes, reference, checkpoint):
    logic, before = ROGRobustnessLogic(), node_count()
    with pytest.raises(InputError, match="unknown attack"):
        logic.evaluate(case_nodes.volume, reference, checkpoint, attacks=["cw"])
    with pytest.raises(InputError, match="not among the evaluated eps"):
        logic.evaluate(case_nodes.volume, reference, checkpoint, eps=[0, 4], showEps=8)
    with pytest.raises(InputError, match="no reference segmentation"):
        logic.evaluate(case_nodes.volume, None, checkpoint, iterations=1)
    case_nodes.segmentation.GetSegmentation().GetSegment(case_nodes.segment_id).SetName("Ball")
    with pytest.raises(InputError, match="no segment named 'liver'"):
        logic.evaluate(case_nodes.volume, case_nodes.segmentation, checkpoint, iterations=1)
    assert node_count() == before


def test_self_test_inputs_work_headless(headless_slicer, tmp_path):
    """The module self-test (inside Slicer) builds its inputs with ROGSegmentLib.selftest: check them here."""
    from ROGSegmentLib import ROGSegmentLogic
    from ROGSegmentLib.selftest import blobVolume, randomCheckpoint

    volume, labels = blobVolume()
    assert set(np.unique(labels)) == {0, 1, 2}
    node = ROGSegmentLogic().segment(volume, randomCheckpoint(tmp_path), device="cpu")
    segmentation = node.GetSegmentation()
    assert [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()] == ["liver", "kidney"]
