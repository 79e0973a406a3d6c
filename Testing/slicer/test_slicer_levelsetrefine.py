"""LevelSetRefine Logic on real MRML nodes: refinement, replace, .seg.nrrd output, bad input."""

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

import slicer
from DeepImagingCommonLib import nodes
from deepimaging.core.errors import InputError
from deepimaging.core.progress import CancelToken, Cancelled
from LevelSetRefineLib import LevelSetRefineLogic, refineOrientedLabelmap

REPO = Path(__file__).resolve().parents[2]


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def segment_names(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()]


def test_refine_adds_a_better_segment_and_keeps_the_original(case_nodes):
    progress = []
    logic = LevelSetRefineLogic()
    new_id = logic.refine(case_nodes.volume, case_nodes.segmentation, case_nodes.segment_id,
                          progress=lambda fraction, message: progress.append(fraction), device="cpu")
    assert new_id != case_nodes.segment_id
    assert segment_names(case_nodes.segmentation) == ["Ball", "Ball (refined)"]
    refined = nodes.segmentMask(case_nodes.segmentation, new_id, case_nodes.volume)
    original = nodes.segmentMask(case_nodes.segmentation, case_nodes.segment_id, case_nodes.volume)
    np.testing.assert_array_equal(original, case_nodes.rough)
    before, after = dice(case_nodes.rough, case_nodes.truth), dice(refined, case_nodes.truth)
    assert after > before + 0.2 and after > 0.85, (before, after)
    assert logic.lastResult.iterations > 0
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    color = case_nodes.segmentation.GetSegmentation().GetSegment(new_id).GetColor()
    assert color != pytest.approx((0.9, 0.3, 0.2))


def test_refine_replace_modifies_the_segment_in_place(case_nodes):
    logic = LevelSetRefineLogic()
    out_id = logic.refine(case_nodes.volume, case_nodes.segmentation, case_nodes.segment_id,
                          replace=True, max_iterations=150)
    assert out_id == case_nodes.segment_id
    assert segment_names(case_nodes.segmentation) == ["Ball"]
    refined = nodes.segmentMask(case_nodes.segmentation, out_id, case_nodes.volume)
    assert dice(refined, case_nodes.truth) > dice(case_nodes.rough, case_nodes.truth) + 0.2


def test_refined_segmentation_saved_as_seg_nrrd_reads_back_in_slicerio(case_nodes, tmp_path):
    import slicerio

    new_id = LevelSetRefineLogic().refine(case_nodes.volume, case_nodes.segmentation, case_nodes.segment_id)
    path = tmp_path / "refined.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    slicer.mrmlScene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(case_nodes.segmentation)

    data = slicerio.read_segmentation(str(path))
    by_name = {segment["name"]: segment for segment in data["segments"]}
    assert set(by_name) == {"Ball", "Ball (refined)"}
    # slicerio gives voxels (i, j, k) and an IJK-to-LPS matrix: compare with the volume's grid.
    ijk_to_lps = np.asarray(data["ijkToLPS"], float)
    np.testing.assert_allclose(ijk_to_lps, case_nodes.image.ijk_to_lps(), atol=1e-4)
    refined_file = np.transpose(slicerio.segment_mask(data, by_name["Ball (refined)"]["id"]), (2, 1, 0)) > 0
    rough_file = np.transpose(slicerio.segment_mask(data, by_name["Ball"]["id"]), (2, 1, 0)) > 0
    np.testing.assert_array_equal(rough_file, case_nodes.rough)
    np.testing.assert_array_equal(refined_file, nodes.segmentMask(case_nodes.segmentation, new_id, case_nodes.volume))


def _assert_refine_fails(case_nodes, match, segment_id=None, volume=None, **params):
    before = case_nodes.segmentation.GetSegmentation().GetNumberOfSegments()
    with pytest.raises(InputError, match=match):
        LevelSetRefineLogic().refine(volume or case_nodes.volume, case_nodes.segmentation,
                                     case_nodes.segment_id if segment_id is None else segment_id, **params)
    assert case_nodes.segmentation.GetSegmentation().GetNumberOfSegments() == before


def test_bad_input_gives_clear_errors_and_no_new_segment(case_nodes):
    empty_id = case_nodes.segmentation.GetSegmentation().AddEmptySegment("", "Empty")
    _assert_refine_fails(case_nodes, "segment 'Empty' is empty", segment_id=empty_id)
    _assert_refine_fails(case_nodes, "no segment with ID 'NoSuchSegment'.*'Ball'", segment_id="NoSuchSegment")
    _assert_refine_fails(case_nodes, "no segment of .* selected", segment_id="")
    _assert_refine_fails(case_nodes, "unknown level-set parameter.*smoothness", smoothness=2.0)

    nan_image = case_nodes.image.with_array(case_nodes.image.array.copy())
    nan_image.array[3, 4, 5] = np.nan
    nan_volume = nodes.volumeNodeFromImage(nan_image, "With NaN")
    _assert_refine_fails(case_nodes, "'With NaN' has 1 NaN or infinite", volume=nan_volume)

    vector = slicer.util.addVolumeFromArray(np.zeros(case_nodes.image.shape + (2,), np.float32),
                                            nodes.ijkToRASArray(case_nodes.volume), "Two components",
                                            "vtkMRMLVectorVolumeNode")
    _assert_refine_fails(case_nodes, "2 components per voxel", volume=vector)

    with pytest.raises(InputError, match="no segmentation selected"):
        LevelSetRefineLogic().refine(case_nodes.volume, None, case_nodes.segment_id)


def test_cancel_leaves_the_segmentation_unchanged(case_nodes):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        LevelSetRefineLogic().refine(case_nodes.volume, case_nodes.segmentation, case_nodes.segment_id, cancel=token)
    assert segment_names(case_nodes.segmentation) == ["Ball"]
    np.testing.assert_array_equal(
        nodes.segmentMask(case_nodes.segmentation, case_nodes.segment_id, case_nodes.volume), case_nodes.rough)


def test_effect_path_refines_an_oriented_labelmap(headless_slicer, synthetic_case, make_oriented):
    """What the Segment Editor effect runs: the source image and a labelmap kept on a sub-extent."""
    image = synthetic_case.image
    source = make_oriented(image.array, image.ijk_to_ras())
    zs, ys, xs = np.nonzero(synthetic_case.rough)
    box = synthetic_case.rough[zs.min():zs.max() + 1, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    labelmap = make_oriented(box.astype(np.uint8), image.ijk_to_ras(), (xs.min(), ys.min(), zs.min()))
    refined = refineOrientedLabelmap(source, labelmap)
    assert refined.GetExtent() == source.GetExtent()
    mask = nodes.imageFromOrientedImageData(refined).array > 0
    assert dice(mask, synthetic_case.truth) > dice(synthetic_case.rough, synthetic_case.truth) + 0.2
    with pytest.raises(InputError, match="empty"):
        refineOrientedLabelmap(source, slicer.vtkOrientedImageData())
    with pytest.raises(InputError, match="empty"):
        refineOrientedLabelmap(source, make_oriented(np.zeros_like(box, np.uint8), image.ijk_to_ras()))


def test_module_defaults_are_the_logic_defaults():
    """Panel, effect and console share one set of defaults: the library's refine_defaults().

    The panel keeps them as constants (the module loads before torch), so check they match;
    the .py files are parsed, not run.
    """
    from deepimaging.levelset import ChanVeseParams, refine_defaults
    from LevelSetRefineLib import DEFAULT_ITERATIONS, DEFAULT_MU, chanVeseParams

    library = refine_defaults()
    assert DEFAULT_MU == library.mu and DEFAULT_ITERATIONS == library.max_iterations
    assert chanVeseParams() == library and chanVeseParams(mu=0.3).mu == 0.3
    tree = ast.parse((REPO / "LevelSetRefine" / "LevelSetRefine.py").read_text())
    node_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LevelSetRefineParameterNode")
    defaults = {n.target.id: n.value for n in node_class.body if isinstance(n, ast.AnnAssign) and n.value is not None}
    assert ast.unparse(defaults["mu"]) == "LevelSetRefineLib.DEFAULT_MU"
    assert ast.unparse(defaults["maxIterations"]) == "LevelSetRefineLib.DEFAULT_ITERATIONS"
    assert ast.literal_eval(defaults["lambda1"]) == library.lambda1
    assert ast.literal_eval(defaults["lambda2"]) == library.lambda2

    effect = (REPO / "LevelSetRefine" / "SegmentEditorLevelSetRefineLib" / "SegmentEditorEffect.py").read_text()
    assert "setParameterDefault(MU_PARAMETER, DEFAULT_MU)" in effect
    assert "setParameterDefault(MAX_ITERATIONS_PARAMETER, DEFAULT_ITERATIONS)" in effect
    assert {f.name for f in dataclasses.fields(ChanVeseParams)} >= {"mu", "lambda1", "lambda2", "max_iterations"}


def test_module_libs_import_without_torch(run_without_torch):
    """Modules must load in Slicer before torch is installed (torch comes on first Apply)."""
    code = ("import sys\n"
            "import LevelSetRefineLib, DeepImagingCommonLib.nodes, DeepImagingCommonLib.dependencies\n"
            "import DeepImagingCommonLib.process\n"
            "assert DeepImagingCommonLib.dependencies.installedTorchVersion() is not None\n"
            "assert 'torch' not in sys.modules\n")
    result = run_without_torch("LevelSetRefine", code)
    assert result.returncode == 0, result.stderr


def test_refinement_needs_only_what_slicer_ships_plus_torch(run_without_torch):
    """Inside Slicer only numpy, scipy, SimpleITK, VTK (bundled) and torch (PyTorch extension) exist."""
    code = ("import sys\n"
            "BLOCKED = ('skimage', 'monai', 'slicerio', 'tqdm', 'matplotlib', 'sklearn', 'pandas', 'psutil')\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCKED:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r} (not shipped with Slicer)')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import numpy as np\n"
            "from deepimaging.core.image import Image\n"
            "from LevelSetRefineLib import refineImageMask\n"
            "z, y, x = np.indices((12, 24, 24))\n"
            "truth = (x - 12) ** 2 + (y - 12) ** 2 + (z - 6) ** 2 < 36\n"
            "image = Image(np.where(truth, 1.0, 0.0) + np.random.default_rng(0).normal(0, 0.2, truth.shape))\n"
            "rough = np.zeros_like(truth); rough[4:8, 9:15, 9:15] = True\n"
            "assert refineImageMask(image, rough, device='cpu').mask.any()\n")
    result = run_without_torch("LevelSetRefine", code, block_torch=False)
    assert result.returncode == 0, result.stderr

