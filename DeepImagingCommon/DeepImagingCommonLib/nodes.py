"""MRML nodes <-> ``deepimaging`` arrays with geometry: the one place modules convert.

Every module Logic reads a volume as a :class:`deepimaging.core.image.Image` and writes
masks back as segments through these functions, so the RAS/LPS flip, the (z, y, x) order
and the segmentation's reference geometry are handled once.  Qt-free: it needs only the
MRML classes, ``slicer.util`` and VTK, which ``slicer-core`` provides headless.
"""

import colorsys

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from deepimaging.core.errors import InputError
from deepimaging.core.image import Image


def imageFromVolumeNode(volumeNode):
    """Copy a scalar volume into an :class:`Image` (array (z, y, x), LPS geometry)."""
    if volumeNode is None:
        raise InputError("no input volume selected")
    name = volumeNode.GetName()
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{name}' is a {volumeNode.GetClassName()}, not a scalar volume")
    imageData = volumeNode.GetImageData()
    if imageData is None:
        raise InputError(f"volume '{name}' has no voxels (image data is empty)")
    components = imageData.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(
            f"volume '{name}' has {components} components per voxel (vector, colour or 4-D data); "
            "choose a scalar volume or extract one component first")
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    return Image.from_ijk_to_ras(array, ijkToRASArray(volumeNode))


def ijkToRASArray(volumeNode):
    """The volume's IJK-to-RAS matrix as a 4x4 numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volumeNodeFromImage(image, name, nodeClassName="vtkMRMLScalarVolumeNode"):
    """Add a new volume node holding ``image`` (voxels copied, geometry kept)."""
    array = image.array.astype(np.uint8) if image.array.dtype == bool else image.array
    return slicer.util.addVolumeFromArray(
        np.ascontiguousarray(array), image.ijk_to_ras(), uniqueNodeName(name), nodeClassName)


def placeLikeInput(outputNode, inputNode):
    """Give a new result node the input's parent transform and subject-hierarchy parent (its study).

    Voxel geometry is read from the input's own IJK-to-RAS matrix, so a result on the same
    grid must also sit under the same transform to overlay the input where it is displayed.
    """
    if outputNode is None or inputNode is None:
        return
    outputNode.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
    shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
    if shNode is None:
        return
    inputItem = shNode.GetItemByDataNode(inputNode)
    outputItem = shNode.GetItemByDataNode(outputNode)
    if inputItem and outputItem:
        shNode.SetItemParent(outputItem, shNode.GetItemParent(inputItem))


def uniqueNodeName(name):
    """``name`` if no node in the scene has it, else ``name_1``, ``name_2``, ..."""
    return slicer.mrmlScene.GenerateUniqueName(name)


def segmentName(segmentationNode, segmentId):
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    return segment.GetName() if segment is not None else segmentId


def requireSegment(segmentationNode, segmentId):
    """Raise :class:`InputError` unless ``segmentId`` names a segment of the node."""
    if segmentationNode is None:
        raise InputError("no segmentation selected")
    if not segmentId:
        raise InputError(f"no segment of '{segmentationNode.GetName()}' selected")
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetSegment(segmentId) is None:
        existing = ", ".join(
            f"'{segmentation.GetSegment(i).GetName()}' (ID {i})" for i in segmentation.GetSegmentIDs())
        raise InputError(
            f"segmentation '{segmentationNode.GetName()}' has no segment with ID '{segmentId}'; "
            f"its segments are: {existing or 'none'}")


def segmentMask(segmentationNode, segmentId, referenceVolumeNode):
    """A segment as a bool (z, y, x) mask on the reference volume's voxel grid."""
    requireSegment(segmentationNode, segmentId)
    if referenceVolumeNode is None:
        raise InputError("a reference volume is needed to sample the segment")
    # Like slicer.util.arrayFromSegmentBinaryLabelmap, but it also removes the temporary
    # node's display node (that helper leaves one behind in every scene without Slicer's GUI).
    segmentIds = vtk.vtkStringArray()
    segmentIds.InsertNextValue(segmentId)
    labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__temp__")
    try:
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmapNode, referenceVolumeNode):
            raise InputError(f"could not sample segment '{segmentId}' on the reference volume's grid")
        labelmap = slicer.util.arrayFromVolume(labelmapNode) > 0
    finally:
        displayNode = labelmapNode.GetDisplayNode()
        if displayNode is not None:
            colorNode = displayNode.GetColorNode()
            slicer.mrmlScene.RemoveNode(displayNode)
            if colorNode is not None and colorNode.GetSingletonTag() is None:
                slicer.mrmlScene.RemoveNode(colorNode)
        slicer.mrmlScene.RemoveNode(labelmapNode)
    return labelmap


def uniqueSegmentName(segmentation, name):
    """``name`` if no segment has it, else ``name 2``, ``name 3``, ..."""
    candidate, number = name, 1
    while segmentation.GetSegmentIdBySegmentName(candidate):
        number += 1
        candidate = f"{name} {number}"
    return candidate


def similarColor(color):
    """A colour close to ``color`` but distinguishable: same hue, brightness shifted."""
    hue, saturation, value = colorsys.rgb_to_hsv(*[min(1.0, max(0.0, float(c))) for c in color[:3]])
    value = value * 0.65 if value > 0.5 else min(1.0, value + 0.35)
    return colorsys.hsv_to_rgb(hue, saturation * 0.85, value)


def referenceImageGeometry(segmentationNode):
    """The segmentation's reference-geometry conversion parameter; ``""`` when it has none.

    The string encodes the grid (IJK-to-RAS matrix and extent) that the Segment Editor and
    the representation converters use for new labelmaps of this segmentation.
    """
    parameterName = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    return segmentationNode.GetSegmentation().GetConversionParameter(parameterName) or ""


def writeMaskToSegment(mask, segmentationNode, referenceVolumeNode, segmentId=None, name=None, color=None):
    """Write a bool (z, y, x) mask on the volume's grid into a segment; return its ID.

    With ``segmentId`` the segment is replaced; otherwise a new segment called ``name``
    (made unique) is added, and removed again if writing fails, so no half-made segment
    is left behind.

    The written labelmap takes the volume's grid (``updateSegmentBinaryLabelmapFromArray``
    is given the volume), so :func:`segmentMask` on the same volume reads back exactly the
    mask written, whatever the segmentation's geometry.  The segmentation's reference
    geometry is the user's choice (an oversampled grid for smooth surfaces, or the grid of
    the volume the segmentation was made on): it is set from the volume only when the
    segmentation has none yet, and kept otherwise.  A labelmap on another grid than the
    segmentation's other segments goes into a layer of its own; theirs are not resampled.
    """
    if segmentationNode is None:
        raise InputError("no segmentation to write into")
    if referenceVolumeNode is None or referenceVolumeNode.GetImageData() is None:
        raise InputError("a reference volume with voxels is needed to write the segment")
    shape = tuple(reversed(referenceVolumeNode.GetImageData().GetDimensions()))
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[np.newaxis]
    if mask.shape != shape:
        raise InputError(f"mask shape {mask.shape} differs from volume shape {shape} (z, y, x)")
    if not referenceImageGeometry(segmentationNode):
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    segmentation = segmentationNode.GetSegmentation()
    created = segmentId is None
    if created:
        newName = uniqueSegmentName(segmentation, name or "Segment")
        if color is None:
            segmentId = segmentation.AddEmptySegment("", newName)
        else:
            segmentId = segmentation.AddEmptySegment("", newName, [float(c) for c in color[:3]])
    else:
        requireSegment(segmentationNode, segmentId)
    try:
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            (mask > 0).astype(np.uint8), segmentationNode, segmentId, referenceVolumeNode)
    except Exception:
        if created:
            segmentation.RemoveSegment(segmentId)
        raise
    return segmentId


def imageFromOrientedImageData(orientedImageData):
    """An :class:`Image` of a ``vtkOrientedImageData`` (what Segment Editor effects get)."""
    if orientedImageData is None or orientedImageData.GetPointData().GetScalars() is None:
        raise InputError("the image has no voxels")
    components = orientedImageData.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(f"the image has {components} components per voxel; a scalar image is needed")
    extent = orientedImageData.GetExtent()
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    scalars = numpy_support.vtk_to_numpy(orientedImageData.GetPointData().GetScalars())
    array = np.array(scalars, copy=True).reshape(dims[2], dims[1], dims[0])
    matrix = vtk.vtkMatrix4x4()
    orientedImageData.GetImageToWorldMatrix(matrix)
    ijkToRAS = slicer.util.arrayFromVTKMatrix(matrix)
    # The matrix maps absolute extent indices; the array starts at the extent's first index.
    ijkToRAS[:3, 3] = ijkToRAS[:3, :3] @ np.array([extent[0], extent[2], extent[4]], float) + ijkToRAS[:3, 3]
    return Image.from_ijk_to_ras(array, ijkToRAS)


def orientedImageDataFromMask(mask, referenceOrientedImageData):
    """A uint8 ``vtkOrientedImageData`` (0/1) of ``mask`` on the reference's grid and extent."""
    extent = referenceOrientedImageData.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise InputError(f"mask shape {mask.shape} differs from the reference image shape {shape} (z, y, x)")
    output = slicer.vtkOrientedImageData()
    output.SetExtent(extent)
    matrix = vtk.vtkMatrix4x4()
    referenceOrientedImageData.GetImageToWorldMatrix(matrix)
    output.SetImageToWorldMatrix(matrix)
    output.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars())
    voxels[:] = (mask > 0).astype(np.uint8).ravel()
    output.Modified()
    return output


def resampleOrientedImage(orientedImageData, referenceOrientedImageData):
    """Nearest-neighbour resample of a labelmap onto the reference's grid and extent."""
    output = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            orientedImageData, referenceOrientedImageData, output):
        raise InputError("could not resample the labelmap onto the image grid")
    return output


def referenceVolume(segmentationNode):
    """The volume a segmentation was drawn on (its reference geometry), or None."""
    role = segmentationNode.GetReferenceImageGeometryReferenceRole()
    volumeNode = segmentationNode.GetNodeReference(role)
    return volumeNode if volumeNode is not None and volumeNode.IsA("vtkMRMLScalarVolumeNode") else None


def requireReferenceVolume(segmentationNode):
    """:func:`referenceVolume`, or an InputError saying how to link the segmentation to its volume."""
    volumeNode = referenceVolume(segmentationNode)
    if volumeNode is None:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' is not linked to a volume: select it in the "
                         "Segment Editor with its source volume (or set its reference geometry) first")
    return volumeNode


def removeNode(node):
    """Remove a node a Logic added (after a failure or cancel), with its display nodes."""
    if node is None or node.GetScene() is None:
        return
    displayNodes = [node.GetNthDisplayNode(index) for index in range(node.GetNumberOfDisplayNodes())]
    slicer.mrmlScene.RemoveNode(node)
    for displayNode in displayNodes:
        if displayNode is not None and displayNode.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(displayNode)
