"""Volume nodes <-> ``Volume`` (voxels plus LPS geometry), and the axis reordering shown to the model.

Slicer works in RAS; ITK, SimpleITK, the files and ``SAMFewshotLib`` in LPS: LPS = diag(-1, -1, 1) RAS.
A node's IJK-to-RAS matrix is local: a parent transform moves it in the world. ``volume_from_node`` returns
the world geometry (linear parent transforms applied), so that the painted axis gets the anatomical name the
user sees in the slice views.

``Reorientation`` permutes and flips the array axes (no resampling) so that they run as close as possible to
L, P, S. Every volume then reaches the model as a CT from a DICOM scanner does (axial slices with the
patient's right on the left, anterior up), whatever order its voxels are stored in: a volume stored flipped
or transposed gives exactly the same model input, hence the same result and the same embedding cache entry.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

log = logging.getLogger(__name__)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _volume_class():
    from SAMFewshotLib.volume_io import Volume  # imports SimpleITK: only when a volume is actually converted

    return Volume


def vtk_to_numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's own (pre-transform) IJK-to-RAS matrix, 4x4."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return vtk_to_numpy_matrix(matrix)


def parent_to_world(node) -> np.ndarray | None:
    """The 4x4 matrix from the node's local RAS to world RAS, or None if a parent transform is not linear."""
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(node.GetParentTransformNode(), None, matrix):
        return None
    return vtk_to_numpy_matrix(matrix)


def ijk_to_world(volume_node) -> np.ndarray:
    """IJK to world RAS including linear parent transforms; a non-linear one is left out (with a warning)."""
    to_world = parent_to_world(volume_node)
    if to_world is None:
        log.warning("%s is under a non-linear transform; its local geometry is used to name the slice axis.",
                    volume_node.GetName())
        to_world = np.eye(4)
    return to_world @ ijk_to_ras(volume_node)


def array_from_node(volume_node) -> np.ndarray:
    """A copy of the node's voxels, (K, J, I); refuses vector and empty volumes."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        from SAMFewshotLib.errors import InputError

        raise InputError(f"volume '{volume_node.GetName() if volume_node else None}' holds no voxels.")
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        from SAMFewshotLib.errors import InputError

        raise InputError(
            f"volume '{volume_node.GetName()}' has {scalars.GetNumberOfComponents()} components per voxel (colour "
            "or vector); convert it to a scalar volume first (Vector to Scalar Volume module)."
        )
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(k, j, i).copy()


def geometry_from_matrix(matrix: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, LPS origin, LPS direction row-major) of a 4x4 IJK-to-RAS matrix.

    The spacing is rounded to float32 precision (as NIfTI stores it): a rotated matrix gives 3.0000000000000004
    for 3 mm, and the library's embedding cache is keyed by the exact spacing.
    """
    linear = np.asarray(matrix, dtype=float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = LPS_FROM_RAS @ (linear / spacing)
    origin = LPS_FROM_RAS @ np.asarray(matrix, dtype=float)[:3, 3]
    return (tuple(float(np.float32(s)) for s in spacing), tuple(float(o) for o in origin),
            tuple(float(d) for d in direction.ravel()))


def matrix_from_geometry(spacing, origin, direction) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of an LPS geometry (the inverse of ``geometry_from_matrix``)."""
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_FROM_RAS @ np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
    matrix[:3, 3] = LPS_FROM_RAS @ np.asarray(origin, dtype=float)
    return matrix


def volume_from_node(volume_node, *, world: bool = True):
    """The node's voxels (a copy) and geometry as a ``Volume`` in LPS, like SimpleITK reading its file.

    With ``world`` (the default) linear parent transforms are applied to the geometry; the voxels are never
    resampled.
    """
    matrix = ijk_to_world(volume_node) if world else ijk_to_ras(volume_node)
    spacing, origin, direction = geometry_from_matrix(matrix)
    return _volume_class()(array_from_node(volume_node), spacing, origin, direction)


def node_from_volume(scene, volume, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding a copy of ``volume`` with its geometry (LPS converted to RAS)."""
    node = scene.AddNewNodeByClass(class_name, name)
    array = np.ascontiguousarray(volume.array)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                           array_type=numpy_support.get_vtk_array_type(array.dtype))
    image.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_vtk_matrix(matrix_from_geometry(volume.spacing, volume.origin, volume.direction)))
    node.CreateDefaultDisplayNodes()
    return node


@dataclass(frozen=True)
class Reorientation:
    """Axis permutation and flips that bring an array's axes closest to L, P, S, without resampling.

    ``order[c]`` is the ITK axis (0 = I, 1 = J, 2 = K) of the original array that becomes ITK axis ``c`` of
    the reoriented one, and ``flip[c]`` says whether it is reversed. Numpy axis ``n`` is ITK axis ``2 - n``.
    """

    order: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def for_direction(cls, direction) -> Reorientation:
        """The reordering whose axes follow +L, +P, +S best for a 3x3 LPS direction matrix (columns I, J, K)."""
        columns = np.asarray(direction, dtype=float).reshape(3, 3)
        best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(columns[c, p[c]]) for c in range(3)))
        return cls(tuple(int(a) for a in best), tuple(bool(columns[c, best[c]] < 0) for c in range(3)))

    @property
    def is_identity(self) -> bool:
        return self.order == (0, 1, 2) and not any(self.flip)

    def _transpose_axes(self) -> list[int]:
        return [2 - self.order[2 - n] for n in range(3)]

    def _flipped_numpy_axes(self) -> tuple[int, ...]:
        return tuple(2 - c for c in range(3) if self.flip[c])

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """(K, J, I) array in the original order -> a contiguous copy in the reoriented order."""
        out = np.transpose(array, self._transpose_axes())
        if self._flipped_numpy_axes():
            out = np.flip(out, self._flipped_numpy_axes())
        return np.ascontiguousarray(out)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """The inverse of ``to_canonical``."""
        out = np.flip(array, self._flipped_numpy_axes()) if self._flipped_numpy_axes() else array
        return np.ascontiguousarray(np.transpose(out, np.argsort(self._transpose_axes())))

    def axis_to_canonical(self, numpy_axis: int) -> int:
        return 2 - self.order.index(2 - numpy_axis)

    def axis_from_canonical(self, numpy_axis: int) -> int:
        return 2 - self.order[2 - numpy_axis]

    def volume_to_canonical(self, volume):
        """The same voxels and the same physical placement, with the axes reordered."""
        columns = np.asarray(volume.direction, dtype=float).reshape(3, 3)
        sizes = tuple(reversed(volume.array.shape))  # ITK order
        origin = np.asarray(volume.origin, dtype=float).copy()
        new_columns = np.zeros((3, 3))
        for c in range(3):
            source = self.order[c]
            sign = -1.0 if self.flip[c] else 1.0
            new_columns[:, c] = sign * columns[:, source]
            if self.flip[c]:
                origin += columns[:, source] * volume.spacing[source] * (sizes[source] - 1)
        spacing = tuple(float(volume.spacing[self.order[c]]) for c in range(3))
        return _volume_class()(self.to_canonical(volume.array), spacing, tuple(float(o) for o in origin),
                               tuple(float(d) for d in new_columns.ravel()))
