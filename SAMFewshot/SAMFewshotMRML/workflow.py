"""The module's workflow on the scene: read the painting, preview the result, Apply with undo, or Cancel.

Rules the user can rely on:

- **Nothing changes until Apply.** A run works on copies; its result goes to a separate preview segmentation
  (opacity 0.6, the segments' own colours). A cancelled or failed run, or Cancel on the preview, leaves the
  user's segmentation as it was; a new preview replaces the previous one only once it is complete.
- **Painted slices are never overwritten.** Apply adds preview voxels only on slices (along the painted axis)
  that hold no voxel of the segment: the slices painted when the preview was computed, and any slice
  painted since, stay exactly as painted. Apply only adds voxels, so nothing the user painted is removed,
  and other segments are never changed (results may overlap them, as segments in Slicer may).
- **One undo step per Apply** (``vtkSegmentationHistory``), refused once the segmentation was edited after
  Apply, since restoring would throw those edits away.
- **Correct and re-propagate.** After Apply, the slices painted before plus every slice edited since are the
  support of the next run of that segment; before Apply, the painted slices are simply read again.
- **"Nothing here".** A slice the user checked and found without the segment (``mark_empty``, or a slice
  erased after Apply) stays empty in the next result, and propagation does not go past it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import slicer

from .geometry import geometry_from_matrix, ijk_to_world, volume_from_node
from . import empty_slices
from .jobs import Job
from .propagation import Options, Outcome, Request, SegmentResult, SegmentTask, run, safe_file_name
from .segments import (
    BINARY_LABELMAP,
    PaintedSegment,
    occupied_slices,
    painted_slices_of,
    read_segment_mask,
    segment_color,
    segment_ids,
    write_segment_mask,
)

log = logging.getLogger(__name__)

PREVIEW_ATTRIBUTE = "SAMFewshot.Preview"
PREVIEW_OPACITY = 0.6
ADAPTED_MODEL_SUFFIX = ".safetensors"


def _error(message: str):
    from SAMFewshotLib.errors import InputError

    return InputError(message)


@dataclass
class PreviewSegment:
    result: SegmentResult
    preview_segment_id: str


@dataclass
class Preview:
    node_id: str
    volume_node_id: str
    segmentation_node_id: str | None
    segments: list[PreviewSegment]


@dataclass
class AppliedRecord:
    """What one Apply left in a segment: used to tell the slices edited afterwards."""

    axis: int
    indices: tuple[int, ...]  # the slices that were painted (kept as painted) at Apply
    mask: np.ndarray  # the segment right after Apply, on the volume's grid
    volume_node_id: str


@dataclass
class UndoPoint:
    segmentation_node_id: str
    history: object  # slicer.vtkSegmentationHistory, holding the state before Apply
    stamp: tuple
    previous_records: dict = field(default_factory=dict)  # records replaced by this Apply (None: there was none)


def added_voxels(preview: np.ndarray, current: np.ndarray, axis: int | None,
                 painted: tuple[int, ...] = ()) -> np.ndarray:
    """The preview voxels Apply adds to a segment: none on painted slices, none already set.

    Args:
        preview: (K, J, I) 0/1 result.
        current: (K, J, I) 0/1 segment as it is now.
        axis: numpy axis of the painted slices, or None when unknown (then only set voxels are skipped).
        painted: slices painted when the preview was computed; slices holding voxels now are added to them.
    """
    added = (np.asarray(preview) != 0) & (np.asarray(current) == 0)
    if axis is None:
        return added
    locked = sorted({int(i) for i in painted} | {int(i) for i in occupied_slices(current, axis)})
    if locked:
        index = [slice(None)] * 3
        index[axis] = locked
        added[tuple(index)] = False
    return added


def _checked_volume(volume_node):
    """The node as a ``Volume``, checked first: a zero or sheared IJK-to-RAS matrix smears the painted masks
    over the grid when they are resampled onto it, so geometry and voxel problems are named before anything
    is read (they would otherwise show as "every slice is painted" or fail only on the worker thread)."""
    from SAMFewshotLib.volume_io import check_volume

    image = volume_from_node(volume_node)
    check_volume(image, f"volume '{volume_node.GetName()}'")
    return image


def remove_node(scene, node) -> None:
    """Remove a node with its display and storage nodes (the scene alone leaves them behind)."""
    helpers = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
    helpers.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.GetNodeByID(helper.GetID()) is helper:
            scene.RemoveNode(helper)


def _content_stamp(segmentation_node) -> tuple:
    """Changes whenever a segment is added, removed or its voxels are modified."""
    segmentation = segmentation_node.GetSegmentation()
    stamp = []
    for segment_id in segment_ids(segmentation_node):
        representation = segmentation.GetSegment(segment_id).GetRepresentation(BINARY_LABELMAP)
        stamp.append((segment_id, representation.GetMTime() if representation is not None else 0))
    return tuple(stamp)


class Workflow:
    """State of one module session in one scene: the preview, the last Apply's undo step, adapted models."""

    def __init__(self, scene):
        self.scene = scene
        self.preview: Preview | None = None
        self.undo_point: UndoPoint | None = None
        self.adapted_models: dict[str, object] = {}  # segment name -> AdaptedModel of the last propagation
        self.atlas_sources: dict[str, tuple] = {}  # segment name -> its (image, labels), added to it when saved
        self._applied: dict[tuple[str, str], AppliedRecord] = {}

    def reset(self) -> None:
        """Forget everything (the scene is closing: node IDs will be reused)."""
        self.preview = None
        self.undo_point = None
        self.adapted_models = {}
        self.atlas_sources = {}
        self._applied = {}

    # ---------------------------------------------------------------- reading the painting

    def painted_segments(self, volume_node, segmentation_node, axis: str = "auto") -> list[PaintedSegment]:
        """Every segment with its painted slices (or why it cannot be propagated), for the panel."""
        return [painted for painted, _ in self._supports(volume_node, segmentation_node, None, axis)]

    def _supports(self, volume_node, segmentation_node, wanted, axis):
        spacing, _, direction = geometry_from_matrix(ijk_to_world(volume_node))
        out = []
        for segment_id in segment_ids(segmentation_node):
            if wanted is not None and segment_id not in wanted:
                continue
            segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
            mask = read_segment_mask(segmentation_node, segment_id, volume_node)
            painted = PaintedSegment(segment_id, segment.GetName(), segment_color(segmentation_node, segment_id))
            labels = self._support_after_apply(segmentation_node, segment_id, volume_node, mask, painted)
            if labels is None:
                painted.axis, painted.axis_name, painted.indices, painted.problem = painted_slices_of(
                    mask, spacing, direction, axis)
                labels = mask
            if painted.axis is not None:
                marked = empty_slices.indices(segmentation_node, segment_id, volume_node, painted.axis,
                                              painted.axis_name)
                # a slice painted after it was marked holds the segment after all: the painting wins
                painted.empty = tuple(sorted((set(marked) | set(painted.empty)) - set(painted.indices)))
            out.append((painted, labels))
        return out

    def _support_after_apply(self, segmentation_node, segment_id, volume_node, mask, painted):
        """Support labels from the slices painted before Apply plus those edited since, or None."""
        record = self._applied.get((segmentation_node.GetID(), segment_id))
        if record is None or record.volume_node_id != volume_node.GetID() or record.mask.shape != mask.shape:
            return None
        kept = np.count_nonzero(record.mask & mask)
        if kept < 0.5 * max(1, np.count_nonzero(record.mask)):
            return None  # most of the applied result is gone (e.g. undone in the Segment Editor): read afresh
        changed = {int(i) for i in occupied_slices(record.mask != mask, record.axis)}
        # a slice erased after Apply: the user looked and found nothing there
        erased = {i for i in changed if not np.take(mask, i, axis=record.axis).any()}
        indices = tuple(sorted((set(record.indices) | changed) - erased))
        labels = np.zeros_like(mask)
        index = [slice(None)] * 3
        index[record.axis] = list(indices)
        labels[tuple(index)] = mask[tuple(index)]
        from SAMFewshotLib.painted_slices import anatomical_name

        _, _, direction = geometry_from_matrix(ijk_to_world(volume_node))
        painted.axis, painted.indices, painted.empty = record.axis, indices, tuple(sorted(erased))
        painted.axis_name = anatomical_name(np.asarray(direction).reshape(3, 3), record.axis)
        painted.edited_after_apply = bool(changed)
        if len(indices) == mask.shape[record.axis]:
            painted.problem = f"every {painted.axis_name} slice was edited; nothing is left to propagate"
        return labels

    # ---------------------------------------------------------------- running

    def prepare(self, volume_node, segmentation_node, selected_ids=None, options: Options | None = None) -> Request:
        """Copy what a propagation needs (main thread). Raises InputError when nothing can be propagated."""
        options = options or Options()
        if volume_node is None or volume_node.GetImageData() is None:
            raise _error("Choose the volume to segment.")
        if segmentation_node is None:
            raise _error("Choose the segmentation that holds the painted slices.")
        image = _checked_volume(volume_node)
        supports = self._supports(volume_node, segmentation_node, selected_ids, options.axis)
        ready = [(p, labels) for p, labels in supports if p.ready]
        if not ready:
            problems = "; ".join(p.describe() for p, _ in supports) or "the segmentation has no segments"
            raise _error(f"Nothing to propagate ({problems}). Paint a structure on a few slices first.")
        tasks = [SegmentTask(p.segment_id, p.name, p.color, p.axis, p.axis_name, p.indices,
                             np.ascontiguousarray(labels, dtype=np.uint8), p.empty) for p, labels in ready]
        return Request(volume_node.GetID(), segmentation_node.GetID(), image, options, tasks)

    def mark_empty(self, volume_node, segmentation_node, segment_id: str, axis: int, index: int) -> None:
        """Record that the segment is absent from slice ``index`` along numpy ``axis`` of the volume node (the
        user looked there: "Nothing here"); the next propagation keeps that slice empty and stops there.
        Raises InputError when the segment has voxels on that slice (erasing them says the same)."""
        if volume_node is None or segmentation_node is None:
            raise _error("Choose the volume and the segmentation first.")
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        if segment is None:
            raise _error("That segment was removed; propagate again.")
        mask = read_segment_mask(segmentation_node, segment_id, volume_node)
        if not 0 <= index < mask.shape[axis]:
            raise _error(f"Slice {index} is outside the volume (0 to {mask.shape[axis] - 1}).")
        if np.take(mask, index, axis=axis).any():
            raise _error(f"{segment.GetName()} has voxels on slice {index}: erase them in the Segment Editor "
                         "if it is not there, or leave the slice as it is.")
        from SAMFewshotLib.painted_slices import anatomical_name

        _, _, direction = geometry_from_matrix(ijk_to_world(volume_node))
        empty_slices.mark(segmentation_node, segment_id, volume_node, axis,
                          anatomical_name(np.asarray(direction).reshape(3, 3), axis), index)

    def clear_empty(self, segmentation_node, segment_ids_to_clear) -> int:
        """Forget the "Nothing here" slices of these segments; returns how many were forgotten."""
        if segmentation_node is None:
            return 0
        return sum(empty_slices.clear(segmentation_node, segment_id) for segment_id in segment_ids_to_clear
                   if segmentation_node.GetSegmentation().GetSegment(segment_id) is not None)

    def prepare_saved_models(self, volume_node, segmentation_node, paths, options: Options | None = None) -> Request:
        """Copy what applying saved adapted models needs (main thread)."""
        options = options or Options()
        if volume_node is None or volume_node.GetImageData() is None:
            raise _error("Choose the volume to segment.")
        paths = [str(p) for p in paths]
        if not paths:
            raise _error("Choose one or more adapted model files.")
        return Request(volume_node.GetID(), segmentation_node.GetID() if segmentation_node else None,
                       _checked_volume(volume_node), options, adapted_model_paths=paths)

    def start(self, request: Request) -> Job:
        """Run the request on a worker thread; poll the returned job from the main thread."""
        return Job(lambda report, cancel: run(request, report, cancel)).start()

    def run_now(self, request: Request, report=None, cancel=None) -> Outcome:
        """Run on the calling thread (scripts, tests)."""
        return run(request, report, cancel)

    # ---------------------------------------------------------------- preview

    def show_preview(self, outcome: Outcome):
        """Put the outcome into a new preview segmentation (main thread); replaces any previous preview."""
        request = outcome.request
        volume_node = self.scene.GetNodeByID(request.volume_node_id)
        if volume_node is None:
            raise _error("The volume was removed while the result was computed; nothing was changed.")
        if request.segmentation_node_id and self.scene.GetNodeByID(request.segmentation_node_id) is None:
            raise _error("The segmentation was removed while the result was computed; nothing was changed.")
        target = self.scene.GetNodeByID(request.segmentation_node_id) if request.segmentation_node_id else None
        base = target.GetName() if target is not None else volume_node.GetName()
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{base} preview (SAMFewshot)")
        try:
            node.SetAttribute(PREVIEW_ATTRIBUTE, "1")
            node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None:
                display.SetOpacity(PREVIEW_OPACITY)
                display.SetVisibility2DOutline(False)
            segments = []
            for result in outcome.segments:
                wanted_id = result.segment_id or ""
                if wanted_id and node.GetSegmentation().GetSegment(wanted_id) is not None:
                    wanted_id = ""
                color = result.color if result.color is not None else self._color_for(target, result.name)
                if color is not None:
                    preview_id = node.GetSegmentation().AddEmptySegment(wanted_id, result.name, list(color))
                else:
                    preview_id = node.GetSegmentation().AddEmptySegment(wanted_id, result.name)
                if not preview_id:
                    raise _error("Slicer could not create the preview segment (segmentation converters missing).")
                write_segment_mask(node, preview_id, result.mask, volume_node, "replace")
                segments.append(PreviewSegment(result, preview_id))
        except Exception:
            remove_node(self.scene, node)
            raise
        self._remove_preview_node()
        self.preview = Preview(node.GetID(), volume_node.GetID(), request.segmentation_node_id, segments)
        if request.kind == "propagation":
            self.adapted_models = {s.name: s.adapted for s in outcome.segments if s.adapted is not None}
            self.atlas_sources = {s.name: s.atlas_source for s in outcome.segments if s.atlas_source is not None}
        return node

    @staticmethod
    def _color_for(target, name):
        if target is None:
            return None
        segment_id = target.GetSegmentation().GetSegmentIdBySegmentName(name)
        return segment_color(target, segment_id) if segment_id else None

    @property
    def preview_node(self):
        return self.scene.GetNodeByID(self.preview.node_id) if self.preview else None

    def _remove_preview_node(self) -> None:
        node = self.preview_node
        if node is not None:
            remove_node(self.scene, node)
        self.preview = None

    def cancel_preview(self) -> None:
        """Drop the preview; the user's segmentation is untouched."""
        self._remove_preview_node()

    def apply(self) -> list[str]:
        """Add the preview to the user's segments (one undo step); returns the target segment IDs."""
        preview = self.preview
        if preview is None:
            raise _error("There is no preview to apply: click Propagate first.")
        volume_node = self.scene.GetNodeByID(preview.volume_node_id)
        preview_node = self.preview_node
        if volume_node is None or preview_node is None:
            self.preview = None
            raise _error("The volume or the preview was removed; click Propagate again.")
        if preview.segmentation_node_id:
            target = self.scene.GetNodeByID(preview.segmentation_node_id)
            if target is None:
                raise _error("The segmentation was removed after the preview was computed; "
                             "choose one and propagate again.")
        else:
            target = self._new_segmentation(volume_node)

        history = slicer.vtkSegmentationHistory()
        history.SetSegmentation(target.GetSegmentation())
        history.SaveState()
        previous_records = {}
        target_ids = []
        for entry in preview.segments:
            result = entry.result
            mask = read_segment_mask(preview_node, entry.preview_segment_id, volume_node)
            target_id = self._target_segment(target, result)
            current = read_segment_mask(target, target_id, volume_node)
            added = added_voxels(mask, current, result.axis, result.indices)
            write_segment_mask(target, target_id, added, volume_node, "add")
            key = (target.GetID(), target_id)
            previous_records[key] = self._applied.get(key)
            if result.axis is not None:
                locked = {int(i) for i in result.indices} | {int(i) for i in occupied_slices(current, result.axis)}
                self._applied[key] = AppliedRecord(result.axis, tuple(sorted(locked)),
                                                   (current | added).astype(np.uint8), volume_node.GetID())
            target_ids.append(target_id)
        self._remove_preview_node()
        self.undo_point = UndoPoint(target.GetID(), history, _content_stamp(target), previous_records)
        return target_ids

    def _new_segmentation(self, volume_node):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} segmentation")
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def _target_segment(target, result: SegmentResult) -> str:
        segmentation = target.GetSegmentation()
        if result.segment_id and segmentation.GetSegment(result.segment_id) is not None:
            return result.segment_id
        existing = segmentation.GetSegmentIdBySegmentName(result.name)
        if existing:
            return existing
        if result.color is not None:
            return segmentation.AddEmptySegment(result.segment_id or "", result.name, list(result.color))
        return segmentation.AddEmptySegment(result.segment_id or "", result.name)

    # ---------------------------------------------------------------- undo

    @property
    def can_undo(self) -> bool:
        point = self.undo_point
        if point is None:
            return False
        node = self.scene.GetNodeByID(point.segmentation_node_id)
        return node is not None and _content_stamp(node) == point.stamp

    def undo(self) -> None:
        """Restore the segmentation as it was before the last Apply."""
        point = self.undo_point
        if point is None:
            raise _error("There is nothing to undo.")
        node = self.scene.GetNodeByID(point.segmentation_node_id)
        if node is None:
            self.undo_point = None
            raise _error("The segmentation was removed; there is nothing to undo.")
        if _content_stamp(node) != point.stamp:
            raise _error("The segmentation was edited after Apply, and undoing would lose those edits; "
                         "use the Segment Editor's Undo instead.")
        point.history.RestorePreviousState()
        for key, record in point.previous_records.items():
            if record is None:
                self._applied.pop(key, None)
            else:
                self._applied[key] = record
        self.undo_point = None

    # ---------------------------------------------------------------- adapted models

    def save_adapted_models(self, folder) -> list[Path]:
        """Write one adapted model per propagated segment into ``folder`` as '<segment name>.safetensors'."""
        if not self.adapted_models:
            raise _error("Propagate first: there is no adapted model to save yet.")
        folder = Path(folder)
        written, used = [], set()
        for name, adapted in self.adapted_models.items():
            stem = safe_file_name(name)
            candidate, number = stem, 2
            while candidate.lower() in used:
                candidate, number = f"{stem} {number}", number + 1
            used.add(candidate.lower())
            if name in self.atlas_sources:  # once: a second save keeps the atlas the first added
                adapted.add_atlas(*self.atlas_sources.pop(name))
            written.append(adapted.save(folder / f"{candidate}{ADAPTED_MODEL_SUFFIX}"))
        return written
