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

import numpy as np

from .geometry import Reorientation
from .jobs import Progress

STAGE_TEXT = {
    "loading": "loading the model",
    "encoding": "encoding slices",
    "adapting": "adapting the model",
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


@dataclass
class Outcome:
    request: Request
    segments: list[SegmentResult]
    seconds: float
    encoded_slices: int = 0

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
        result = segment_volume(
            image,
            reorientation.to_canonical(task.labels),
            model=options.model,
            device=options.device,
            axis=reorientation.axis_to_canonical(task.axis),
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
        results.append(SegmentResult(task.segment_id, task.name, task.color, mask, task.axis, task.indices,
                                     result.adapted))
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
