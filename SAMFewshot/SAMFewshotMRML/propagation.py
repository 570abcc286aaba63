"""What the worker thread gets and returns: plain copies, never MRML nodes.

The main thread builds a ``Request`` (voxels, world geometry, painted labels per segment, options); ``run``
executes it on the worker thread with ``SAMFewshotLib`` and returns an ``Outcome`` of masks on the volume
node's voxel grid. The main thread then writes the outcome into the scene (``workflow``).

Segments are propagated one at a time, each as a binary label map (its own painted slices as support): in
Slicer segments are painted independently, so a slice painted for one segment says nothing about another,
and one library call per segment never mistakes an unpainted segment for background. The embeddings are
computed once per volume and axis and then come from the library's cache, so each further segment costs
only the adaptation and the decoder passes.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .geometry import Reorientation
from .jobs import Progress

STAGE_TEXT = {
    "loading": "loading the model",
    "encoding": "encoding slices",
    "adapting": "adapting the model",
    "registering": "following the image between painted slices",
    "propagating": "propagating",
}


@dataclass(frozen=True)
class Options:
    """How to propagate. ``model`` is a library model spec: "lite-medsam" or "vit_b:/path/to/sam_vit_b.pth"."""

    model: str = "lite-medsam"
    device: str = "auto"  # "auto", "cpu" or "cuda"
    axis: str = "auto"  # "auto", "axial", "coronal" or "sagittal"
    cache_dir: str | None = None  # None: the library's default embedding cache
    seed: int = 0
    iterations: int | None = None  # None: the library's schedule for the number of painted slices


@dataclass
class SegmentTask:
    """One segment to propagate: its painted labels (0/1, volume node's array order) and where they are."""

    segment_id: str
    name: str
    color: tuple[float, float, float]
    axis: int  # numpy axis of the volume node's array
    axis_name: str
    indices: tuple[int, ...]
    labels: np.ndarray  # (K, J, I) uint8, non-zero only on ``indices``
    empty: tuple[int, ...] = ()  # slices checked and found without the segment, along ``axis``


@dataclass
class Request:
    """Everything the worker needs, copied on the main thread."""

    volume_node_id: str
    segmentation_node_id: str | None
    image: object  # SAMFewshotLib.volume_io.Volume, the node's voxels and world LPS geometry
    options: Options
    tasks: list[SegmentTask] = field(default_factory=list)
    adapted_model_paths: list[str] = field(default_factory=list)  # for applying saved adapted models

    @property
    def kind(self) -> str:
        return "saved models" if self.adapted_model_paths else "propagation"


class SliceNote(NamedTuple):
    """How far one slice of a result can be trusted (``SAMFewshotLib.confidence``), on the node's array."""

    index: int  # slice index along ``SliceAdvice.axis`` of the volume node's array
    confidence: float  # 0 (a guess) .. 1 (certain); the lowest of the slice's labels
    kind: str  # "painted", "interpolated", "walked", "end" (first slice past the model's walk) or "outside"
    uncertain_end: bool  # the structure may go on (or stop earlier) here: check where it ends
    expected_error: float = 0.0  # voxels that painting this slice could fix (what the suggestion weighs)


@dataclass
class SliceAdvice:
    """Per-slice confidence of one propagated segment and the slice worth painting next.

    Indices are the volume node's own (numpy array order, storage flips undone by the mapping from the
    canonical order the model saw), along ``axis``, the numpy axis of the painted slices.
    """

    segment_id: str | None
    axis: int  # numpy axis of the volume node's array
    axis_name: str  # "axial", "coronal" or "sagittal"
    slices: list[SliceNote] = field(default_factory=list)  # one per slice, in index order
    suggested: int | None = None  # the unpainted slice whose painting should help most (None: nothing at stake)

    def note(self, index: int) -> SliceNote | None:
        return next((n for n in self.slices if n.index == index), None)

    @property
    def uncertain_ends(self) -> list[int]:
        return [n.index for n in self.slices if n.uncertain_end]

    @property
    def at_stake(self) -> float:
        """Expected error summed over the unpainted slices: ranks the segments' suggestions."""
        return float(sum(n.expected_error for n in self.slices if n.kind != "painted"))


def node_slice_indices(reorientation: Reorientation, canonical_axis: int, shape) -> np.ndarray:
    """For each slice along numpy ``canonical_axis`` of the canonical array, its index on the node's array.

    ``shape``: the node's array shape. Computed by reorienting an index ramp with ``to_canonical`` itself, so
    it cannot disagree with how the voxels were reordered (a flipped storage order reverses the indices).
    """
    axis = reorientation.axis_from_canonical(canonical_axis)
    ramp_shape = [1, 1, 1]
    ramp_shape[axis] = int(shape[axis])
    ramp = np.arange(int(shape[axis])).reshape(ramp_shape)
    return reorientation.to_canonical(ramp).ravel()


def slice_advice(result, reorientation: Reorientation, shape, segment_id: str | None,
                 axis_name: str = "") -> SliceAdvice | None:
    """The library result's ``confidence`` and ``suggested_slice`` on the volume node's array (None if the
    method computed none). ``shape``: the node's array shape."""
    confidences = getattr(result, "confidence", None)
    if not confidences:
        return None
    canonical_axis = int(result.painted.axis)
    to_node = node_slice_indices(reorientation, canonical_axis, shape)
    lowest: dict[int, SliceNote] = {}
    for item in confidences:  # one label per call here; several would keep each slice's least confident
        index = int(to_node[int(item.index)])
        note = SliceNote(index, float(item.confidence), str(item.kind), bool(item.uncertain_end),
                         float(item.expected_error))
        previous = lowest.get(index)
        if previous is None:
            lowest[index] = note
        else:
            worst = note if note.confidence < previous.confidence else previous
            lowest[index] = worst._replace(uncertain_end=note.uncertain_end or previous.uncertain_end,
                                           expected_error=note.expected_error + previous.expected_error)
    suggested = getattr(result, "suggested_slice", None)
    return SliceAdvice(segment_id, reorientation.axis_from_canonical(canonical_axis),
                       axis_name or str(getattr(result.painted, "axis_name", "")),
                       [lowest[i] for i in sorted(lowest)], None if suggested is None else int(to_node[int(suggested)]))


@dataclass
class SegmentResult:
    """One result segment, on the volume node's voxel grid."""

    segment_id: str | None  # the user's segment it belongs to; None: a new segment, matched by name
    name: str
    color: tuple[float, float, float] | None
    mask: np.ndarray  # (K, J, I) uint8 0/1
    axis: int | None  # numpy axis of the slices that stay as painted (None: unknown)
    indices: tuple[int, ...] = ()  # slices painted when the result was computed
    adapted: object | None = None  # SAMFewshotLib.adapted_model.AdaptedModel
    advice: SliceAdvice | None = None  # per-slice confidence and the slice to paint next (propagation only)
    # (image, label map) as the library saw them: the atlas of ``adapted``, made only if it is saved (building
    # one standardises the whole volume, about 1.4 s for a 512 x 512 x 300 CT: too much for every propagation)
    atlas_source: tuple | None = None


@dataclass
class Outcome:
    request: Request
    segments: list[SegmentResult]
    seconds: float
    encoded_slices: int = 0

    @property
    def advice(self) -> list[SliceAdvice]:
        """The advice of every segment that has one (propagations; not saved models)."""
        return [s.advice for s in self.segments if s.advice is not None]

    def summary(self) -> str:
        names = ", ".join(s.name for s in self.segments)
        encoded = f", {self.encoded_slices} slices encoded" if self.encoded_slices else ", embeddings from the cache"
        return f"{names}: done in {self.seconds:.0f} s{encoded}."


def progress_text(stage: str, done: int, total: int, prefix: str = "") -> str:
    words = STAGE_TEXT.get(stage.split(" ")[0], stage)  # "adapting label 1" -> "adapting the model"
    counted = f" {done}/{total}" if total else ""
    return f"{prefix}{words}{counted}"


def run(request: Request, report: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None) -> Outcome:
    """Execute a request (worker thread): one library call per segment, or per saved adapted model."""
    started = time.perf_counter()
    reorientation = Reorientation.for_direction(request.image.direction)
    image = reorientation.volume_to_canonical(request.image)
    if request.adapted_model_paths:
        segments, encoded = _apply_saved(request, image, reorientation, report, cancel)
    else:
        segments, encoded = _propagate(request, image, reorientation, report, cancel)
    return Outcome(request, segments, time.perf_counter() - started, encoded)


def _reporter(report, prefix: str):
    if report is None:
        return None

    def progress(stage: str, done: int, total: int) -> None:
        report(Progress(progress_text(stage, done, total, prefix), int(done), int(total)))

    return progress


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        from SAMFewshotLib.errors import Cancelled

        raise Cancelled("cancelled; nothing was written.")


# The last adaptation per (volume node, segment): after the user corrects a slice and propagates again, the
# library reuses its embeddings and continues from its decoders (a few seconds instead of a full fine-tuning).
# Only the most recent volume is kept, so memory does not grow with every volume opened.
_previous: dict[tuple[str, str], object] = {}


def _remember(volume_node_id: str, segment_id: str, adaptation) -> None:
    for key in [k for k in _previous if k[0] != volume_node_id]:
        del _previous[key]
    _previous[(volume_node_id, segment_id)] = adaptation


def _propagate(request, image, reorientation, report, cancel):
    from SAMFewshotLib.pipeline import segment_volume

    options = request.options
    results, encoded = [], 0
    for number, task in enumerate(request.tasks, start=1):
        _check_cancel(cancel)
        prefix = f"{task.name} ({number} of {len(request.tasks)}): " if len(request.tasks) > 1 else f"{task.name}: "
        canonical_axis = reorientation.axis_to_canonical(task.axis)
        to_node = node_slice_indices(reorientation, canonical_axis, task.labels.shape)
        result = segment_volume(
            image,
            reorientation.to_canonical(task.labels),
            model=options.model,
            device=options.device,
            axis=canonical_axis,
            empty_slices=[int(np.flatnonzero(to_node == i)[0]) for i in task.empty],
            cache_dir=options.cache_dir,
            seed=options.seed,
            iterations=options.iterations,
            label_names={1: task.name},
            progress=_reporter(report, prefix),
            cancel=cancel,
            previous=_previous.get((request.volume_node_id, task.segment_id)),
        )
        _remember(request.volume_node_id, task.segment_id, result.adaptation)
        encoded += int(getattr(result, "encoded_slices", 0))
        mask = reorientation.from_canonical(np.asarray(result.labels) == 1).astype(np.uint8)
        advice = slice_advice(result, reorientation, task.labels.shape, task.segment_id, task.axis_name)
        results.append(SegmentResult(task.segment_id, task.name, task.color, mask, task.axis, task.indices,
                                     result.adapted, advice, (image, np.asarray(result.labels))))
    _check_cancel(cancel)
    return results, encoded


def _apply_saved(request, image, reorientation, report, cancel):
    from SAMFewshotLib.adapted_model import AdaptedModel
    from SAMFewshotLib.errors import InputError
    from SAMFewshotLib.painted_slices import numpy_axis_for
    from SAMFewshotLib.pipeline import apply_adapted_model

    options = request.options
    results = []
    for number, name_or_path in enumerate(request.adapted_model_paths, start=1):
        _check_cancel(cancel)
        path = Path(name_or_path)
        adapted = AdaptedModel.load(path)
        model = None
        if adapted.model_kind != "lite-medsam":
            if not options.model.startswith(f"{adapted.model_kind}:"):
                raise InputError(
                    f"{path.name} was adapted from SAM {adapted.model_kind}: choose that model and its checkpoint "
                    "file in the Model section, then try again."
                )
            model = options.model
        prefix = f"{path.stem} ({number} of {len(request.adapted_model_paths)}): "
        labels = apply_adapted_model(adapted, image, model=model, device=options.device, cache_dir=options.cache_dir,
                                     progress=_reporter(report, prefix), cancel=cancel)
        labels = reorientation.from_canonical(np.asarray(labels))
        axis = numpy_axis_for(adapted.axis_name, request.image.direction_matrix)
        for value in sorted(adapted.targets):
            name = adapted.label_names.get(value, "")
            if not name or re.fullmatch(r"label \d+", name):
                name = path.stem if len(adapted.targets) == 1 else f"{path.stem} {value}"
            results.append(SegmentResult(None, name, None, (labels == value).astype(np.uint8), axis, (), adapted))
    _check_cancel(cancel)
    return results, 0


def safe_file_name(name: str) -> str:
    """A segment name made safe as a file name on every platform."""
    cleaned = re.sub(r"[^A-Za-z0-9 ._()+-]+", "_", name).strip(" .")
    return cleaned or "segment"
