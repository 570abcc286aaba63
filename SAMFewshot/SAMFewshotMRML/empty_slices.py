"""Slices the user checked and found without a segment ("Nothing here"), kept with the segment.

A label map cannot say that a structure is absent from a slice (an unpainted slice is empty too), yet that is
what tells the propagation where the structure ends. The marks are stored as a tag of the segment: for each
checked slice, its orientation (axial, coronal, sagittal) and the world (RAS) position of its centre. So they
are saved with the scene, stay with the segment, and still name the same place if the volume is moved under
a transform; a mark made on axial slices says nothing about coronal ones.
"""

from __future__ import annotations

import numpy as np
import vtk

from .guidance import slice_index_at, slice_position

TAG = "SAMFewshot.CheckedEmpty"


def _segment(segmentation_node, segment_id: str):
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise ValueError(f"the segmentation has no segment {segment_id!r}")
    return segment


def marks(segmentation_node, segment_id: str) -> list[tuple[str, np.ndarray]]:
    """(axis name, world RAS centre) of each slice checked empty for this segment, in the order marked."""
    value = vtk.reference("")
    if not _segment(segmentation_node, segment_id).GetTag(TAG, value):
        return []
    out = []
    for part in str(value).split(";"):
        name, _, point_text = part.partition(":")
        try:
            point = np.array([float(v) for v in point_text.split(",")])
        except ValueError:
            continue  # a tag edited by hand: ignore what cannot be read
        if point.shape == (3,) and np.all(np.isfinite(point)):
            out.append((name, point))
    return out


def _store(segmentation_node, segment_id: str, entries: list[tuple[str, np.ndarray]]) -> None:
    segment = _segment(segmentation_node, segment_id)
    if entries:
        segment.SetTag(TAG, ";".join(f"{name}:" + ",".join(f"{v:.4f}" for v in p) for name, p in entries))
    else:
        segment.RemoveTag(TAG)


def mark(segmentation_node, segment_id: str, volume_node, axis: int, axis_name: str, index: int) -> None:
    """Record slice ``index`` along numpy ``axis`` (``axis_name``) of the volume node's array as checked empty."""
    if index in indices(segmentation_node, segment_id, volume_node, axis, axis_name):
        return
    entries = marks(segmentation_node, segment_id)
    entries.append((axis_name, slice_position(volume_node, axis, index)))
    _store(segmentation_node, segment_id, entries)


def clear(segmentation_node, segment_id: str) -> int:
    """Forget every checked-empty slice of the segment; returns how many there were."""
    count = len(marks(segmentation_node, segment_id))
    _store(segmentation_node, segment_id, [])
    return count


def indices(segmentation_node, segment_id: str, volume_node, axis: int, axis_name: str) -> tuple[int, ...]:
    """The slices along numpy ``axis`` of the volume node's array checked empty on ``axis_name`` slices (those
    inside the volume)."""
    count = volume_node.GetImageData().GetDimensions()[2 - axis]
    found = {slice_index_at(volume_node, axis, p) for name, p in marks(segmentation_node, segment_id)
             if name == axis_name}
    return tuple(sorted(i for i in found if 0 <= i < count))
