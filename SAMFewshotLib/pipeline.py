"""From painted slices to a full-volume label map: the one entry point for the CLI, the Slicer module and
the benchmarks. Each step lives in its own module; this file only orders them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .adaptation import AdaptationSettings, adapt_decoder, target_embeddings
from .adapted_model import AdaptedModel
from .embeddings import VolumeEmbeddings, slice_stack
from .errors import InputError
from .fewshot_decoder import FewShotMaskDecoder
from .intensity import IntensityWindow
from .models import DEFAULT_MODEL, SamModel, load_model, resolve_device
from .painted_slices import PaintedSlices, find_painted_slices, numpy_axis_for
from .spatial import keep_components_linked_to_painted
from .propagation import paste_painted, predict_probabilities, probabilities_to_labels
from .volume_io import Volume, check_volume, label_dtype

ProgressCallback = Callable[[str, int, int], None]
# "seed": the paper's per-slice prediction. "seed-linked": the same, keeping only the 3D regions connected to
# a painted voxel of the same label (see spatial.py).
METHODS = ("seed", "seed-linked")
DEFAULT_METHOD = "seed-linked"

_loaded_models: dict[tuple[str, str], SamModel] = {}


def get_model(spec: str = DEFAULT_MODEL, device: str | torch.device = "auto") -> SamModel:
    """Load a model once per process and device (the Slicer module and tests propagate many times)."""
    target = resolve_device(device) if not isinstance(device, torch.device) else device
    key = (spec or DEFAULT_MODEL, str(target))
    if key not in _loaded_models:
        _loaded_models[key] = load_model(spec or DEFAULT_MODEL, target)
    return _loaded_models[key]


@dataclass
class SegmentationResult:
    labels: np.ndarray  # (K, J, I) full-volume label map, painted slices exactly as painted
    painted: PaintedSlices
    adapted: AdaptedModel
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    encoded_slices: int = 0  # slices that went through the encoder (0 when all came from the cache)
    losses: list[float] = field(default_factory=list)
    seed_labels: np.ndarray | None = None  # the paper's per-slice prediction before any spatial post-processing


@dataclass
class Support:
    """The painted slices of one volume, ready for adaptation."""

    embeddings: VolumeEmbeddings
    indices: tuple[int, ...]
    label_slices: np.ndarray  # (N, rows, cols) painted labels


def segment_volume(
    image: Volume,
    labels: np.ndarray,
    *,
    model: str | SamModel = DEFAULT_MODEL,
    device: str = "auto",
    axis: str | int = "auto",
    cache_dir=None,
    seed: int = 0,
    method: str = "default",
    window: IntensityWindow | str | None = None,
    iterations: int | None = None,
    label_names: dict[int, str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> SegmentationResult:
    """Adapt the decoder to the painted slices of ``labels`` and segment every slice of ``image``.

    Args:
        image: the volume.
        labels: (K, J, I) integer label map in the image's geometry, non-zero on a few slices of one axis.
            A painted slice holds every label present on it (labels absent there are background).
        axis: "auto", an anatomical name, or a numpy axis.
        method: "seed" (the paper's per-slice prediction) or "default" (the best available method).
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    method = _resolve_method(method)
    check_volume(image)
    labels = _check_labels(labels, image)
    painted = find_painted_slices(labels, image.spacing, image.direction_matrix, axis)
    window = window if isinstance(window, IntensityWindow) else IntensityWindow.parse(window)
    sam = model if isinstance(model, SamModel) else get_model(model, device)
    timings["load"] = time.perf_counter() - started

    embeddings = VolumeEmbeddings(sam, image, painted.axis, window=window, cache_dir=cache_dir,
                                  progress=progress, cancel=cancel)
    label_stack = slice_stack(labels, painted.axis)
    support = Support(embeddings, painted.indices, label_stack[list(painted.indices)])
    settings = AdaptationSettings(iterations=iterations, seed=seed)
    decoder, targets, losses = adapt([support], painted.label_values, settings, progress=progress, cancel=cancel)
    timings["adapt"] = time.perf_counter() - started - timings["load"] - embeddings.encode_seconds

    unpainted = [i for i in range(embeddings.num_slices) if i not in set(painted.indices)]
    probabilities = predict_probabilities(decoder, targets, embeddings, unpainted, progress=progress, cancel=cancel)
    predicted = np.zeros(label_stack.shape, dtype=label_dtype(max(painted.label_values)))
    predicted[unpainted] = probabilities_to_labels(probabilities)
    raw_stack = paste_painted(predicted, label_stack, painted.indices)
    result_stack = raw_stack
    if method == "seed-linked":
        result_stack = paste_painted(keep_components_linked_to_painted(raw_stack, label_stack, painted.indices),
                                     label_stack, painted.indices)
    result = np.ascontiguousarray(np.moveaxis(result_stack, 0, painted.axis))
    timings["encode"] = embeddings.encode_seconds
    timings["propagate"] = time.perf_counter() - started - sum(timings.values())
    timings["total"] = time.perf_counter() - started

    names = {v: (label_names or {}).get(v, f"label {v}") for v in painted.label_values}
    adapted = AdaptedModel.from_decoder(sam, decoder, targets, names, painted.axis_name, window,
                                        {"method": method, "iterations": settings.iterations_for(len(painted.indices)),
                                         "seed": seed, "support_slices": len(painted.indices)})
    seed_labels = np.ascontiguousarray(np.moveaxis(raw_stack, 0, painted.axis))
    return SegmentationResult(result, painted, adapted, timings, embeddings.encoded_slices, losses, seed_labels)


def train_adapted_model(
    pairs: Sequence[tuple[Volume, np.ndarray]],
    *,
    model: str | SamModel = DEFAULT_MODEL,
    device: str = "auto",
    axis: str | int = "auto",
    cache_dir=None,
    seed: int = 0,
    window: IntensityWindow | str | None = None,
    iterations: int | None = None,
    label_names: dict[int, str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> AdaptedModel:
    """Adapt one decoder on the painted slices of one or more volumes (all painted on the same anatomical axis)."""
    if not pairs:
        raise InputError("give at least one image with its painted labels.")
    window = window if isinstance(window, IntensityWindow) else IntensityWindow.parse(window)
    sam = model if isinstance(model, SamModel) else get_model(model, device)
    supports, axis_names, values = [], set(), set()
    for image, labels in pairs:
        check_volume(image)
        labels = _check_labels(labels, image)
        painted = find_painted_slices(labels, image.spacing, image.direction_matrix, axis)
        axis_names.add(painted.axis_name)
        values.update(painted.label_values)
        embeddings = VolumeEmbeddings(sam, image, painted.axis, window=window, cache_dir=cache_dir,
                                      progress=progress, cancel=cancel)
        stack = slice_stack(labels, painted.axis)
        supports.append(Support(embeddings, painted.indices, stack[list(painted.indices)]))
    if len(axis_names) > 1:
        raise InputError(f"the volumes are painted on different axes ({', '.join(sorted(axis_names))}); paint all on one.")
    settings = AdaptationSettings(iterations=iterations, seed=seed)
    decoder, targets, _ = adapt(supports, tuple(sorted(values)), settings, progress=progress, cancel=cancel)
    count = sum(len(s.indices) for s in supports)
    names = {v: (label_names or {}).get(v, f"label {v}") for v in sorted(values)}
    return AdaptedModel.from_decoder(sam, decoder, targets, names, axis_names.pop(), window,
                                     {"method": "seed", "iterations": settings.iterations_for(count), "seed": seed,
                                      "support_slices": count, "volumes": len(supports)})


def apply_adapted_model(
    adapted: AdaptedModel,
    image: Volume,
    *,
    model: str | SamModel | None = None,
    device: str = "auto",
    axis: str | int | None = None,
    cache_dir=None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """Segment ``image`` with a saved adapted model; returns a (K, J, I) label map."""
    check_volume(image)
    if model is None:
        if adapted.model_kind != DEFAULT_MODEL:
            raise InputError(
                f"this adapted model was made from SAM {adapted.model_kind}; give its checkpoint with "
                f"--model {adapted.model_kind}:PATH."
            )
        model = DEFAULT_MODEL
    sam = model if isinstance(model, SamModel) else get_model(model, device)
    decoder = adapted.build_decoder(sam)
    if axis is None or axis == "auto":
        slice_axis = numpy_axis_for(adapted.axis_name, image.direction_matrix)
    elif isinstance(axis, str):
        slice_axis = numpy_axis_for(axis, image.direction_matrix)
    else:
        slice_axis = int(axis)
    embeddings = VolumeEmbeddings(sam, image, slice_axis, window=adapted.window, cache_dir=cache_dir,
                                  progress=progress, cancel=cancel)
    indices = list(range(embeddings.num_slices))
    probabilities = predict_probabilities(decoder, adapted.targets, embeddings, indices, progress=progress,
                                          cancel=cancel)
    stack = probabilities_to_labels(probabilities).astype(label_dtype(max(adapted.targets)))
    return np.ascontiguousarray(np.moveaxis(stack, 0, slice_axis))


def adapt(
    supports: Sequence[Support],
    label_values: Sequence[int],
    settings: AdaptationSettings,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> tuple[FewShotMaskDecoder, dict[int, torch.Tensor], list[float]]:
    """Encode the support slices, compute target embeddings per label and fine-tune the decoder."""
    sam = supports[0].embeddings.model
    all_embeddings, all_masks, all_fractions = [], {v: [] for v in label_values}, {v: [] for v in label_values}
    for support in supports:
        embeddings = support.embeddings.get(support.indices)
        transform = support.embeddings.transform
        output_grid = 4 * sam.embedding_grid  # SAM's mask decoder upsamples the embedding grid 4x
        for value in label_values:
            binary = torch.from_numpy((support.label_slices == value).astype(np.float32))
            all_masks[value].append((transform.mask_to_grid(binary, output_grid) > 0.5).float())
            all_fractions[value].append(transform.mask_to_grid(binary, sam.embedding_grid))
        all_embeddings.append(embeddings)
    support_embeddings = torch.cat(all_embeddings)
    masks = {v: torch.cat(all_masks[v]) for v in label_values}
    targets = {}
    for value in label_values:
        targets[value] = target_embeddings(support_embeddings, torch.cat(all_fractions[value]).to(support_embeddings.device))
        if targets[value].shape[0] == 0:
            raise InputError(f"label {value} is too small to be seen by the model on any painted slice; paint more of it.")
    decoder, losses = adapt_decoder(sam, support_embeddings, masks, targets, settings, progress=progress, cancel=cancel)
    return decoder, targets, losses


def _resolve_method(method: str) -> str:
    method = DEFAULT_METHOD if method in (None, "", "default") else method
    if method not in METHODS:
        raise InputError(f"unknown method '{method}'; choose one of: default, {', '.join(METHODS)}.")
    return method


def _check_labels(labels: np.ndarray, image: Volume) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != image.shape:
        raise InputError(
            f"the label map's size {tuple(reversed(labels.shape))} differs from the image's "
            f"{tuple(reversed(image.shape))}; paint the labels on this image."
        )
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.all(np.mod(labels, 1) == 0):
            raise InputError("the label map holds non-integer values; a label map holds integer labels.")
    if labels.size and labels.min() < 0:
        raise InputError("the label map holds negative values; labels must be 0 (background) or positive.")
    return labels.astype(label_dtype(int(labels.max()) if labels.size else 0), copy=False)
