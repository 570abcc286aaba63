"""Guide the review: which slices of a result to check first, and which slice to paint next.

After a propagation each ``SegmentResult`` carries a ``SliceAdvice`` (per-slice confidence from
``SAMFewshotLib.confidence``, mapped to the volume node's own slice indices). This module turns it into what
the panel shows and where the slice views go:

- ``review_items``: the least confident slices, lowest first (painted slices, and slices outside the
  structure, are left out), each with a short text: "Liver: slice 23 (axial): 0.41, interpolated";
- ``suggestion``: the slice whose painting should help most (of the segment with most at stake);
- ``uncertain_ends_text``: the slices where a structure may go on, or stop earlier, than the result says;
- ``slice_position``: the world RAS point to jump the slice views to (the centre of the structure on that
  slice, for a volume under any parent transform), and ``slice_index_at`` for the way back.

Qt-free: the widget only fills a list and calls ``JumpSlicesToLocation`` with the position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import vtk

import slicer

from .geometry import ijk_to_ras
from .propagation import SegmentResult, SliceAdvice, SliceNote

LIST_PER_SEGMENT = 5  # least confident slices listed per segment
SKIPPED_KINDS = ("painted", "outside")  # nothing to check there: painted by the user, or away from the structure
KIND_TEXT = {
    "interpolated": "interpolated",
    "walked": "beyond the painted slices",
    "end": "end of the structure",
}


@dataclass(frozen=True)
class ReviewItem:
    """One slice to check (or to paint), ready for the list and for jumping there."""

    segment_id: str | None
    segment_name: str
    axis: int  # numpy axis of the volume node's array
    axis_name: str
    index: int  # slice index along ``axis``
    confidence: float
    kind: str
    uncertain_end: bool

    @property
    def text(self) -> str:
        where = slice_text(self.index, self.axis_name, self.confidence, self.kind, self.uncertain_end)
        return f"{self.segment_name}: {where}"


def slice_text(index: int, axis_name: str, confidence: float, kind: str, uncertain_end: bool = False) -> str:
    """"slice 23 (axial): 0.41, interpolated"; an uncertain end says so instead of its kind."""
    what = "uncertain end" if uncertain_end else KIND_TEXT.get(kind, kind)
    where = f"slice {index} ({axis_name})" if axis_name else f"slice {index}"
    return f"{where}: {confidence:.2f}, {what}"


def least_confident(advice: SliceAdvice, count: int | None = None,
                    painted: Sequence[int] = ()) -> list[SliceNote]:
    """The slices to check, lowest confidence first (ties: lower index first); painted and outside slices
    (and the extra ``painted`` indices) are left out. ``count``: at most that many (None: all)."""
    skip = {int(i) for i in painted}
    notes = [n for n in advice.slices if n.kind not in SKIPPED_KINDS and n.index not in skip]
    notes.sort(key=lambda n: (n.confidence, n.index))
    return notes if count is None else notes[:count]


def _item(segment: SegmentResult, note: SliceNote) -> ReviewItem:
    advice = segment.advice
    return ReviewItem(segment.segment_id, segment.name, advice.axis, advice.axis_name, int(note.index),
                      float(note.confidence), note.kind, bool(note.uncertain_end))


def _advised(segments: Sequence[SegmentResult]) -> list[SegmentResult]:
    return [s for s in segments if getattr(s, "advice", None) is not None]


def review_items(segments: Sequence[SegmentResult], per_segment: int | None = LIST_PER_SEGMENT) -> list[ReviewItem]:
    """The ``per_segment`` least confident slices of each segment, all sorted by confidence, lowest first."""
    items = [_item(s, note) for s in _advised(segments)
             for note in least_confident(s.advice, per_segment, s.indices)]
    items.sort(key=lambda item: (item.confidence, item.segment_name, item.index))
    return items


def suggestion(segments: Sequence[SegmentResult]) -> ReviewItem | None:
    """The slice to paint next: the suggestion of the segment with the most expected error at stake."""
    candidates = [s for s in _advised(segments) if s.advice.suggested is not None
                  and s.advice.suggested not in set(s.indices)]
    if not candidates:
        return None
    segment = max(candidates, key=lambda s: s.advice.at_stake)  # first one on ties
    advice = segment.advice
    note = advice.note(advice.suggested) or SliceNote(advice.suggested, 1.0, "outside", False)
    return _item(segment, note)


def suggestion_text(item: ReviewItem | None) -> str:
    """The text of the "go to the suggested slice" button."""
    if item is None:
        return "Go to suggested slice"
    return f"Go to suggested slice: {item.index} ({item.axis_name}, {item.segment_name})"


def uncertain_ends_text(segments: Sequence[SegmentResult]) -> str:
    """"Uncertain ends: Liver at axial slice 47. Check whether the structure stops there." ("" if none)."""
    parts = []
    for segment in _advised(segments):
        ends = segment.advice.uncertain_ends
        if ends:
            numbers = ", ".join(str(i) for i in ends)
            plural = "s" if len(ends) > 1 else ""
            parts.append(f"{segment.name} at {segment.advice.axis_name} slice{plural} {numbers}")
    if not parts:
        return ""
    return "Uncertain ends: " + "; ".join(parts) + ". Check whether the structure stops there."


# ---------------------------------------------------------------------------------------------- positions


def slice_center_ijk(shape, axis: int, index: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Continuous (i, j, k) of the point to show on slice ``index`` along numpy ``axis`` of a (K, J, I) grid.

    The centre of the mask's voxels on that slice; on a slice without any, the in-plane centre of the mask
    on the nearest slice that has some (where the structure ends, the view shows where it was); without a
    mask, the slice's centre.
    """
    shape = tuple(int(n) for n in shape)
    if not 0 <= int(index) < shape[axis]:
        raise IndexError(f"slice {index} is outside the volume (0..{shape[axis] - 1})")
    kji = np.array([(n - 1) / 2.0 for n in shape])
    kji[axis] = float(index)
    if mask is not None and np.shape(mask) == shape:
        mask = np.asarray(mask) != 0
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if occupied.size:
            nearest = int(occupied[np.argmin(np.abs(occupied - int(index)))])
            points = np.argwhere(np.take(mask, nearest, axis=axis))  # (n, 2): the two other numpy axes
            in_plane = [a for a in range(3) if a != axis]
            kji[in_plane] = points.mean(axis=0)
    return kji[::-1].copy()


def _parent_transform(volume_node, to_world: bool):
    """The general transform local RAS -> world (or back), or None without a parent transform."""
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return None
    transform = vtk.vtkGeneralTransform()
    if to_world:
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, transform)
    else:
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, transform)
    return transform


def ijk_to_world_point(volume_node, ijk) -> np.ndarray:
    """Continuous (i, j, k) of the node -> world RAS, through any parent transform (linear or not)."""
    local = (ijk_to_ras(volume_node) @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]
    transform = _parent_transform(volume_node, to_world=True)
    return np.asarray(transform.TransformPoint([float(v) for v in local])) if transform is not None else local


def world_to_ijk_point(volume_node, ras) -> np.ndarray:
    """World RAS -> continuous (i, j, k) of the node (the inverse of ``ijk_to_world_point``)."""
    position = [float(v) for v in ras]
    transform = _parent_transform(volume_node, to_world=False)
    if transform is not None:
        position = list(transform.TransformPoint(position))
    return (np.linalg.inv(ijk_to_ras(volume_node)) @ np.r_[position, 1.0])[:3]


def _array_shape(volume_node) -> tuple[int, int, int]:
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise ValueError("the volume holds no voxels")
    i, j, k = image.GetDimensions()
    return (k, j, i)


def slice_position(volume_node, axis: int, index: int, mask: np.ndarray | None = None) -> np.ndarray:
    """World RAS (r, a, s) to jump the slice views to for slice ``index`` along numpy ``axis`` of the node's
    array: on that slice, at the centre of ``mask`` (K, J, I) there or nearby (see ``slice_center_ijk``)."""
    return ijk_to_world_point(volume_node, slice_center_ijk(_array_shape(volume_node), axis, index, mask))


def slice_index_at(volume_node, axis: int, ras) -> int:
    """The slice along numpy ``axis`` of the node's array that holds world RAS point ``ras``."""
    ijk = world_to_ijk_point(volume_node, ras)
    return int(np.floor(ijk[2 - axis] + 0.5))


# ---------------------------------------------------------------------------------------------- the panel's state


@dataclass
class Review:
    """What the Review area shows after a propagation: the volume it is on and the advised segments."""

    volume_node_id: str
    segments: list[SegmentResult]

    @classmethod
    def from_outcome(cls, outcome) -> Review | None:
        """None when the outcome has no advice (saved models, or a method without confidence)."""
        segments = _advised(outcome.segments)
        return cls(outcome.request.volume_node_id, segments) if segments else None

    def items(self, per_segment: int | None = LIST_PER_SEGMENT) -> list[ReviewItem]:
        return review_items(self.segments, per_segment)

    def suggestion(self) -> ReviewItem | None:
        return suggestion(self.segments)

    def uncertain_ends_text(self) -> str:
        return uncertain_ends_text(self.segments)

    def volume_node(self, scene):
        return scene.GetNodeByID(self.volume_node_id) if scene is not None else None

    def position(self, scene, item: ReviewItem) -> np.ndarray:
        """World RAS of ``item``'s slice (centre of its segment's result there). Raises ValueError when the
        volume was removed."""
        volume_node = self.volume_node(scene)
        if volume_node is None or volume_node.GetImageData() is None:
            raise ValueError("The volume of this result was removed; propagate again.")
        segment = next((s for s in self.segments if s.segment_id == item.segment_id and s.name == item.segment_name),
                       None)
        mask = segment.mask if segment is not None else None
        return slice_position(volume_node, item.axis, item.index, mask)
