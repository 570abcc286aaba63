"""Segment masks on a volume's voxel grid, and the slices the user painted in each segment.

Masks are numpy arrays (K, J, I) of 0/1 on the voxel grid of a reference volume node. The segmentation and
the volume may sit under different linear transforms: masks are moved between them with the matrix from the
volume's frame to the segmentation's, so that they land on the right voxels. Segments that share a labelmap
layer are told apart by their label value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .geometry import ijk_to_ras, numpy_to_vtk_matrix, vtk_to_numpy_matrix

Logic = slicer.vtkSlicerSegmentationsModuleLogic
BINARY_LABELMAP = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()

MODES = {"replace": Logic.MODE_REPLACE, "add": Logic.MODE_MERGE_MAX}


def _input_error(message: str):
    from SAMFewshotLib.errors import InputError

    return InputError(message)


def volume_to_segmentation_matrix(volume_node, segmentation_node) -> np.ndarray:
    """4x4 matrix from the volume's IJK to the segmentation's local RAS (both parent transforms included)."""
    between = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), between
    ):
        raise _input_error(
            f"'{segmentation_node.GetName()}' and '{volume_node.GetName()}' are related by a non-linear transform; "
            "put both under the same transform, or harden it (Data module: right-click, Harden transform)."
        )
    return vtk_to_numpy_matrix(between) @ ijk_to_ras(volume_node)


def _oriented_image(mask: np.ndarray, image_to_world: np.ndarray) -> slicer.vtkOrientedImageData:
    """vtkOrientedImageData of a (K, J, I) mask on the grid ``image_to_world`` describes."""
    k, j, i = mask.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    image.SetImageToWorldMatrix(numpy_to_vtk_matrix(image_to_world))
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


def _ensure_binary_labelmap(segmentation_node, make_source: bool = False) -> None:
    """Convert segments stored as surfaces to labelmaps; for writing, make the labelmap the source (as the
    Segment Editor does when you paint)."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSourceRepresentationName() != BINARY_LABELMAP:
        if not segmentation_node.CreateBinaryLabelmapRepresentation():
            raise _input_error(f"'{segmentation_node.GetName()}' cannot be converted to a binary labelmap.")
        if make_source:
            segmentation.SetSourceRepresentationName(BINARY_LABELMAP)


def read_segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a 0/1 uint8 array (K, J, I) on the volume's voxel grid (nearest neighbour)."""
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise _input_error(f"'{segmentation_node.GetName()}' has no segment '{segment_id}'.")
    dims = volume_node.GetImageData().GetDimensions()
    if segmentation.GetSourceRepresentationName() != BINARY_LABELMAP and not segment.GetRepresentation(BINARY_LABELMAP):
        _ensure_binary_labelmap(segmentation_node)
    source = slicer.vtkOrientedImageData()
    Logic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, source, False)
    if source.GetPointData().GetScalars() is None or source.IsEmpty():
        return np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint8)
    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(dims)
    reference.SetImageToWorldMatrix(numpy_to_vtk_matrix(volume_to_segmentation_matrix(volume_node, segmentation_node)))
    resampled = slicer.vtkOrientedImageData()
    resample = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage
    if not resample(source, reference, resampled):
        raise _input_error(f"segment '{segment.GetName()}' could not be resampled onto '{volume_node.GetName()}'.")
    i, j, k = resampled.GetDimensions()
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(k, j, i)
    return (values == segment.GetLabelValue()).astype(np.uint8)


def write_segment_mask(segmentation_node, segment_id: str, mask: np.ndarray, volume_node,
                       mode: str = "replace") -> None:
    """Write a (K, J, I) 0/1 mask on the volume's grid into a segment.

    ``mode="replace"`` makes the segment exactly ``mask``; ``mode="add"`` adds its voxels and removes none.
    Other segments are never changed (an overlap moves a segment to its own layer, as in Slicer). Either
    way the segment is written on the volume's grid.
    """
    mask = np.asarray(mask) != 0
    matrix = volume_to_segmentation_matrix(volume_node, segmentation_node)
    if mode == "add":
        if not mask.any():
            return
        # Slicer's merge mode writes the mask's raw value (1) into a shared labelmap layer, where 1 is the
        # first segment's label: the voxels would land in another segment. Union first, then replace.
        mask = mask | (read_segment_mask(segmentation_node, segment_id, volume_node) != 0)
        mode = "replace"
    _ensure_binary_labelmap(segmentation_node, make_source=True)
    image = _oriented_image(mask, matrix)
    if not Logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, MODES[mode]):
        raise _input_error(f"could not write segment '{segment_id}' of '{segmentation_node.GetName()}'.")


def segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def occupied_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Indices along numpy ``axis`` of the slices holding any voxel of ``mask``."""
    return np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))


@dataclass
class PaintedSegment:
    """One segment and the slices painted in it, indices along a numpy axis of the volume node's array."""

    segment_id: str
    name: str
    color: tuple[float, float, float]
    axis: int | None = None
    axis_name: str = ""
    indices: tuple[int, ...] = ()
    problem: str = ""  # why the segment cannot be propagated; empty when it can
    edited_after_apply: bool = False
    empty: tuple[int, ...] = ()  # slices checked and found without the segment ("Nothing here"), same axis

    @property
    def ready(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        """One line for the panel, e.g. 'Liver: 5 axial slices: 12, 30, 41, 55, 70'."""
        if self.problem:
            return f"{self.name}: {self.problem}"
        count = len(self.indices)
        slices = ", ".join(str(i) for i in self.indices)
        text = f"{self.name}: {count} {self.axis_name} slice{'s' if count != 1 else ''}: {slices}"
        if self.edited_after_apply:
            text += " (painted slices and slices edited after Apply)"
        if self.empty:
            text += f"; nothing on {', '.join(str(i) for i in self.empty)}"
        return text


def painted_slices_of(mask: np.ndarray, spacing, direction, axis="auto"):
    """(axis, axis name, indices, problem) of a painted mask; ``problem`` is a short text, empty when usable.

    ``spacing`` (I, J, K) and the 3x3 LPS ``direction`` are the world geometry that names the axis; ``axis`` is
    "auto", an anatomical name or a numpy axis. An empty mask, or one not painted on separate slices of one
    axis, gives ``(None, "", (), problem)``.
    """
    from SAMFewshotLib.errors import InputError
    from SAMFewshotLib.painted_slices import find_painted_slices

    if not mask.any():
        return None, "", (), "not painted yet"
    try:
        painted = find_painted_slices(mask, spacing, np.asarray(direction, dtype=float).reshape(3, 3), axis)
    except InputError:
        return None, "", (), ("painted on more than one axis or on most slices; paint a few slices in one view, "
                              "or choose the slice axis")
    if len(painted.indices) == mask.shape[painted.axis]:
        return None, "", (), f"every {painted.axis_name} slice is painted; nothing is left to propagate"
    return painted.axis, painted.axis_name, painted.indices, ""


def segment_color(segmentation_node, segment_id: str) -> tuple[float, float, float]:
    return tuple(float(c) for c in segmentation_node.GetSegmentation().GetSegment(segment_id).GetColor())
