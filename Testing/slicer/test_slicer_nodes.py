"""DeepImagingCommonLib.nodes on a real MRML scene: geometry survives every conversion."""

import numpy as np
import pytest
import vtk

import slicer
from DeepImagingCommonLib import nodes
from deepimaging.core.errors import InputError
from deepimaging.core.image import Image


def _image(direction, shape=(5, 6, 7)):
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return Image(array, spacing=(0.7, 0.9, 2.5), origin=(10.0, -20.0, 5.0), direction=direction)


@pytest.mark.parametrize("oblique_grid", [False, True])
def test_volume_node_round_trip_keeps_geometry(headless_slicer, oblique, oblique_grid):
    image = _image(oblique if oblique_grid else np.eye(3))
    volume = nodes.volumeNodeFromImage(image, "Round trip")
    back = nodes.imageFromVolumeNode(volume)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.spacing, image.spacing, atol=1e-9)
    np.testing.assert_allclose(back.origin, image.origin, atol=1e-9)
    np.testing.assert_allclose(back.direction, image.direction, atol=1e-9)
    # What Slicer sees is RAS: LPS origin (10, -20, 5) is RAS (-10, 20, 5).
    np.testing.assert_allclose(volume.GetOrigin(), (-10.0, 20.0, 5.0), atol=1e-9)
    np.testing.assert_allclose(volume.GetSpacing(), image.spacing, atol=1e-9)
    np.testing.assert_allclose(nodes.ijkToRASArray(volume), image.ijk_to_ras(), atol=1e-9)


def test_volume_voxel_maps_to_same_physical_point(headless_slicer, oblique):
    image = _image(oblique)
    volume = nodes.volumeNodeFromImage(image, "Point check")
    ijk = np.array([3.0, 2.0, 4.0, 1.0])
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    ras = np.array(matrix.MultiplyPoint(tuple(ijk)))[:3]
    lps = image.ijk_to_lps() @ ijk
    np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-9)


def test_unique_node_names(headless_slicer):
    image = _image(np.eye(3))
    first = nodes.volumeNodeFromImage(image, "Same")
    second = nodes.volumeNodeFromImage(image, "Same")
    assert first.GetName() == "Same"
    assert second.GetName() != "Same"


def test_vector_volume_is_rejected(headless_slicer):
    rgb = np.zeros((3, 4, 5, 3), np.uint8)
    volume = slicer.util.addVolumeFromArray(rgb, name="Colour", nodeClassName="vtkMRMLVectorVolumeNode")
    with pytest.raises(InputError, match="3 components"):
        nodes.imageFromVolumeNode(volume)
    with pytest.raises(InputError, match="no input volume"):
        nodes.imageFromVolumeNode(None)


def test_mask_segment_round_trip_and_replace(headless_slicer, oblique):
    volume = nodes.volumeNodeFromImage(_image(oblique, (8, 9, 10)), "Grid")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    mask = np.zeros((8, 9, 10), bool)
    mask[2:6, 3:7, 1:8] = True
    segment_id = nodes.writeMaskToSegment(mask, segmentation, volume, name="Box", color=(0.2, 0.6, 0.9))
    np.testing.assert_array_equal(nodes.segmentMask(segmentation, segment_id, volume), mask)
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "Box"
    np.testing.assert_allclose(segment.GetColor(), (0.2, 0.6, 0.9), atol=1e-6)

    again = nodes.writeMaskToSegment(mask, segmentation, volume, name="Box")
    assert segmentation.GetSegmentation().GetSegment(again).GetName() == "Box 2"

    smaller = np.zeros_like(mask)
    smaller[3:5, 4:6, 2:4] = True
    assert nodes.writeMaskToSegment(smaller, segmentation, volume, segmentId=segment_id) == segment_id
    np.testing.assert_array_equal(nodes.segmentMask(segmentation, segment_id, volume), smaller)
    np.testing.assert_array_equal(nodes.segmentMask(segmentation, again, volume), mask)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2


def _reference_geometry(segmentation):
    return segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())


def _reference_node(segmentation):
    return segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())


def _oversampled(image, factor=2):
    """The grid Slicer's "oversampling" makes: same box, ``factor`` times finer along each axis."""
    shape = tuple(n * factor for n in image.shape)
    corner = image.ijk_to_lps() @ np.array([(1.0 / factor - 1.0) / 2.0] * 3 + [1.0])  # first fine voxel centre
    return Image(np.zeros(shape, np.float32), spacing=tuple(s / factor for s in image.spacing),
                 origin=tuple(corner[:3]), direction=image.direction)


def _box(shape):
    mask = np.zeros(shape, bool)
    mask[2:6, 3:7, 1:8] = True
    mask[3, 1, 2] = True  # an odd voxel: any half-voxel shift or resampling error shows
    return mask


@pytest.mark.parametrize("grid", ["oversampled", "other volume"])
def test_write_mask_keeps_the_segmentation_reference_geometry(headless_slicer, oblique, grid):
    """The user's segmentation geometry (oversampled, or another volume's) survives writing a mask."""
    image = _image(oblique, (8, 9, 10))
    volume = nodes.volumeNodeFromImage(image, "Grid")
    if grid == "oversampled":
        geometry_volume = nodes.volumeNodeFromImage(_oversampled(image), "Fine grid")
    else:
        other = Image(np.zeros((6, 20, 16), np.float32), spacing=(0.5, 0.6, 3.0), origin=(0.0, -30.0, -2.0),
                      direction=np.eye(3))
        geometry_volume = nodes.volumeNodeFromImage(other, "Other volume")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(geometry_volume)
    # a segment the user drew on the segmentation's own grid
    drawn = np.zeros(tuple(reversed(geometry_volume.GetImageData().GetDimensions())), bool)
    drawn[1:4, 5:12, 4:10] = True
    drawn_id = nodes.writeMaskToSegment(drawn, segmentation, geometry_volume, name="Drawn")
    geometry = _reference_geometry(segmentation)
    assert geometry and nodes.referenceImageGeometry(segmentation) == geometry

    mask = _box(image.shape)
    segment_id = nodes.writeMaskToSegment(mask, segmentation, volume, name="Box")
    assert _reference_geometry(segmentation) == geometry
    assert _reference_node(segmentation) is geometry_volume
    np.testing.assert_array_equal(nodes.segmentMask(segmentation, segment_id, volume), mask)

    smaller = np.zeros_like(mask)
    smaller[3:5, 4:6, 2:4] = True
    assert nodes.writeMaskToSegment(smaller, segmentation, volume, segmentId=segment_id) == segment_id
    assert _reference_geometry(segmentation) == geometry
    np.testing.assert_array_equal(nodes.segmentMask(segmentation, segment_id, volume), smaller)
    # the user's segment is neither moved nor resampled by the writes on the other grid
    np.testing.assert_array_equal(nodes.segmentMask(segmentation, drawn_id, geometry_volume), drawn)


def test_write_mask_gives_a_new_segmentation_the_volume_geometry(headless_slicer, oblique):
    volume = nodes.volumeNodeFromImage(_image(oblique, (8, 9, 10)), "Grid")
    expected = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    expected.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert _reference_geometry(segmentation) == "" and nodes.referenceImageGeometry(segmentation) == ""
    mask = _box((8, 9, 10))
    segment_id = nodes.writeMaskToSegment(mask, segmentation, volume, name="Box")
    assert _reference_geometry(segmentation) == _reference_geometry(expected) != ""
    assert _reference_node(segmentation) is volume
    np.testing.assert_array_equal(nodes.segmentMask(segmentation, segment_id, volume), mask)
    # the first write fixed the geometry; a second volume on another grid does not change it
    other = nodes.volumeNodeFromImage(_image(np.eye(3), (5, 6, 7)), "Other grid")
    nodes.writeMaskToSegment(np.ones((5, 6, 7), bool), segmentation, other, name="Other")
    assert _reference_geometry(segmentation) == _reference_geometry(expected)


def test_segment_mask_leaves_no_temporary_nodes(headless_slicer, oblique):
    volume = nodes.volumeNodeFromImage(_image(oblique, (6, 7, 8)), "Grid")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mask = np.zeros((6, 7, 8), bool)
    mask[1:4, 2:5, 3:6] = True
    segment_id = nodes.writeMaskToSegment(mask, segmentation, volume, name="Box")
    before = slicer.mrmlScene.GetNumberOfNodes()
    for _ in range(3):
        np.testing.assert_array_equal(nodes.segmentMask(segmentation, segment_id, volume), mask)
    assert slicer.mrmlScene.GetNumberOfNodes() == before


def test_write_mask_rejects_wrong_shape_without_leaving_a_segment(headless_slicer):
    volume = nodes.volumeNodeFromImage(_image(np.eye(3)), "Grid")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(InputError, match="differs from volume shape"):
        nodes.writeMaskToSegment(np.ones((2, 2, 2), bool), segmentation, volume, name="Wrong")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_unknown_segment_id_names_the_existing_segments(headless_slicer):
    volume = nodes.volumeNodeFromImage(_image(np.eye(3)), "Grid")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    nodes.writeMaskToSegment(np.ones((5, 6, 7), bool), segmentation, volume, name="Liver")
    with pytest.raises(InputError, match="no segment with ID 'Missing'.*'Liver'"):
        nodes.segmentMask(segmentation, "Missing", volume)
    with pytest.raises(InputError, match="no segment of 'Seg' selected"):
        nodes.segmentMask(segmentation, "", volume)


def test_similar_color_keeps_hue_but_differs():
    import colorsys

    for color in [(0.9, 0.3, 0.2), (0.1, 0.2, 0.4), (0.5, 0.5, 0.5)]:
        similar = nodes.similarColor(color)
        assert max(abs(a - b) for a, b in zip(color, similar)) > 0.1
        if max(color) - min(color) > 0.05:
            assert colorsys.rgb_to_hsv(*similar)[0] == pytest.approx(colorsys.rgb_to_hsv(*color)[0], abs=1e-6)


def test_oriented_image_data_round_trip_with_offset_extent(headless_slicer, oblique, make_oriented):
    image = _image(oblique)
    oriented = make_oriented(image.array, image.ijk_to_ras(), (0, 0, 0))
    back = nodes.imageFromOrientedImageData(oriented)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.ijk_to_ras(), image.ijk_to_ras(), atol=1e-9)

    # Same world grid, but the data starts at voxel (2, 1, 3): the origin must move with it.
    shifted = make_oriented(image.array[3:, 1:, 2:].copy(), image.ijk_to_ras(), (2, 1, 3))
    part = nodes.imageFromOrientedImageData(shifted)
    expected_origin = (image.ijk_to_lps() @ np.array([2.0, 1.0, 3.0, 1.0]))[:3]
    np.testing.assert_allclose(part.origin, expected_origin, atol=1e-9)

    mask = part.array > part.array.mean()
    labelmap = nodes.orientedImageDataFromMask(mask, shifted)
    assert labelmap.GetExtent() == shifted.GetExtent()
    np.testing.assert_array_equal(nodes.imageFromOrientedImageData(labelmap).array > 0, mask)


def test_resample_oriented_labelmap_onto_reference_extent(headless_slicer, make_oriented):
    reference = make_oriented(np.zeros((6, 7, 8), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]), (0, 0, 0))
    small = np.ones((2, 3, 4), np.uint8)
    labelmap = make_oriented(small, np.diag([1.0, 1.0, 1.0, 1.0]), (1, 2, 3))  # a sub-extent, as the editor keeps it
    resampled = nodes.resampleOrientedImage(labelmap, reference)
    mask = nodes.imageFromOrientedImageData(resampled).array > 0
    expected = np.zeros((6, 7, 8), bool)
    expected[3:5, 2:5, 1:5] = True
    np.testing.assert_array_equal(mask, expected)
