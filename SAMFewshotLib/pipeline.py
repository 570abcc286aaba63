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

from .adaptation import AdaptationSettings, adapt_decoder, resemblance, target_embeddings
from .adapted_model import AdaptedModel
from .atlas import segment_with_atlases
from .confidence import SliceConfidence, label_confidence, suggest_slice
from .embeddings import VolumeEmbeddings, check_cancel, slice_stack
from .errors import InputError
from .fewshot_decoder import FewShotMaskDecoder
from .intensity import IntensityWindow
from .interactive import InteractiveSession
from .models import DEFAULT_MODEL, SamModel, load_model, resolve_device
from .painted_slices import PaintedSlices, find_painted_slices, numpy_axis_for, slice_spacing
from .spatial import WalkReport, keep_components_linked_to_painted, walk_beyond_painted
from .prompt_propagation import BEYOND_PAINTED, prompt_walk_beyond_painted, resemblance_threshold
from .propagation import paste_painted, predict_probabilities, probabilities_to_labels
from .registered_fill import GapFillCache, GapReport, fill_between_by_registration, redraw_beyond_painted
from .volume_io import Volume, check_volume, label_dtype

ProgressCallback = Callable[[str, int, int], None]
# "seed": the paper's per-slice prediction. "seed-linked": the same, keeping only the 3D regions connected to
# a painted voxel of the same label (see spatial.py).
# "register-box-walk" (the default): registration-guided fill inside the painted range; beyond it, SAM box-
# prompted from each slice's mask onto the next, kept while the outline looks like the painted structure.
# "register-walk": the same inside; beyond, the few-shot decoder's own prediction walks outward.
# "fill-walk": "register-walk" with Fill-between-slices (contour interpolation) inside the range.
METHODS = ("register-box-walk", "register-walk", "fill-walk", "seed", "seed-linked")
WALK_METHODS = ("register-box-walk", "register-walk", "fill-walk")
DEFAULT_METHOD = "register-box-walk"
# methods whose labels come from the image, SAM and the target embeddings alone; the adapted decoders give them
# only their confidence and the model to save, so a run that wants neither need not train them
WITHOUT_DECODERS = ("register-box-walk",)
APPLY_METHODS = ("auto", "atlas", "decoder")

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
    adapted: AdaptedModel | None  # None when the decoders were not adapted (``with_decoders=False``)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    encoded_slices: int = 0  # slices that went through the encoder (0 when all came from the cache)
    losses: list[float] = field(default_factory=list)
    seed_labels: np.ndarray | None = None  # the paper's per-slice prediction before any spatial post-processing
    confidence: list[SliceConfidence] | None = None  # per slice and label (default method, adapted decoders)
    suggested_slice: int | None = None  # the slice whose painting would help most (along painted.axis)
    adaptation: Adaptation | None = None  # pass as ``previous`` to re-propagate quickly after a correction


@dataclass
class Support:
    """The painted slices of one volume, ready for adaptation."""

    embeddings: VolumeEmbeddings
    indices: tuple[int, ...]
    label_slices: np.ndarray  # (N, rows, cols) painted labels


@dataclass
class Adaptation:
    """Decoders adapted to the painted slices of one volume, ready to propagate with any method (with
    ``decoders`` empty: only with those of ``WITHOUT_DECODERS``)."""

    model: SamModel
    painted: PaintedSlices
    embeddings: VolumeEmbeddings
    label_stack: np.ndarray  # (N, rows, cols) the user's labels, slices along axis 0
    decoders: dict[int, FewShotMaskDecoder]
    targets: dict[int, torch.Tensor]
    settings: AdaptationSettings
    window: IntensityWindow
    losses: list[float]
    timings: dict[str, float]
    # registration between painted slices on this volume, shared with the adaptations that re-propagate it
    fill_cache: GapFillCache | None = None

    def __post_init__(self):
        if self.fill_cache is None:
            embeddings = self.embeddings
            self.fill_cache = GapFillCache(embeddings.slices, embeddings.transform.pixel_spacing,
                                           slice_spacing(embeddings.volume.spacing, embeddings.axis))


def adapt_to_painted(
    image: Volume,
    labels: np.ndarray,
    *,
    model: str | SamModel = DEFAULT_MODEL,
    device: str = "auto",
    axis: str | int = "auto",
    cache_dir=None,
    seed: int = 0,
    window: IntensityWindow | str | None = None,
    iterations: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    previous: Adaptation | None = None,
    empty_slices: Sequence[int] = (),
    with_decoders: bool = True,
) -> Adaptation:
    """Find the painted slices, encode them, and fine-tune one decoder per label (see ``segment_volume``).

    ``previous``: the adaptation of an earlier run on the same volume (the user has since corrected or
    added slices). Its embeddings are reused and each label's decoder continues training from the previous
    one for a few steps instead of starting again from SAM's (``AdaptationSettings.refine_steps``).
    It is ignored when the volume, axis, model or intensity window differ.
    ``with_decoders=False``: compute the target embeddings only, and train no decoder (see ``segment_volume``).
    """
    started = time.perf_counter()
    check_volume(image)
    labels = _check_labels(labels, image)
    painted = find_painted_slices(labels, image.spacing, image.direction_matrix, axis, empty_slices)
    if len(painted.settled) == labels.shape[painted.axis]:
        raise InputError(
            f"every {painted.axis_name} slice ({len(painted.settled)}) is painted or checked empty: there is nothing "
            "left to propagate. Paint a few slices only, or use the label map as it is."
        )
    window = window if isinstance(window, IntensityWindow) else IntensityWindow.parse(window)
    sam = model if isinstance(model, SamModel) else get_model(model, device)
    loaded = time.perf_counter()
    embeddings = VolumeEmbeddings(sam, image, painted.axis, window=window, cache_dir=cache_dir,
                                  progress=progress, cancel=cancel)
    initial, fill_cache = None, None
    if previous is not None and previous.embeddings.key == embeddings.key:
        embeddings = previous.embeddings  # already holds the slices encoded so far
        embeddings.progress, embeddings.cancel = progress, cancel
        initial, fill_cache = previous.decoders or None, previous.fill_cache
    encoded_before = embeddings.encode_seconds  # a reused embeddings object has encoded before
    label_stack = slice_stack(labels, painted.axis)
    support = Support(embeddings, painted.indices, label_stack[list(painted.indices)])
    settings = AdaptationSettings(iterations=iterations, seed=seed)
    if initial is not None and _same_support(previous, painted, label_stack, settings):
        # only slices checked empty changed (they do not train): the decoders stay as they are, so marking a
        # slice empty re-propagates at once and changes nothing but what lies past that slice
        decoders, targets, losses = previous.decoders, previous.targets, previous.losses
    else:
        decoders, targets, losses = adapt([support], painted.label_values, settings, progress=progress,
                                          cancel=cancel, initial=initial, train=with_decoders)
    encode_seconds = embeddings.encode_seconds - encoded_before
    timings = {"load": loaded - started, "adapt": time.perf_counter() - loaded - encode_seconds,
               "encode": encode_seconds}
    return Adaptation(sam, painted, embeddings, label_stack, decoders, targets, settings, window, losses, timings,
                      fill_cache)


def propagate(
    adaptation: Adaptation,
    method: str = "default",
    *,
    label_names: dict[int, str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> SegmentationResult:
    """Segment the whole volume from an adaptation with one of ``METHODS``."""
    method = resolve_method(method)
    _check_decoders_for(method, bool(adaptation.decoders))
    started, encoded_before = time.perf_counter(), adaptation.embeddings.encode_seconds
    embeddings, painted, label_stack = adaptation.embeddings, adaptation.painted, adaptation.label_stack
    settled = painted.settled  # painted or checked empty: the result keeps them as the user left them
    embeddings.progress, embeddings.cancel = progress, cancel
    dtype = label_dtype(max(painted.label_values))
    seed_stack = None
    if method in ("seed", "seed-linked"):
        unpainted = sorted(set(range(embeddings.num_slices)) - set(settled))
        probabilities = predict_probabilities(adaptation.decoders, adaptation.targets, embeddings, unpainted,
                                              progress=progress, cancel=cancel)
        predicted = np.zeros(label_stack.shape, dtype=dtype)
        predicted[unpainted] = probabilities_to_labels(probabilities)
        seed_stack = result_stack = paste_painted(predicted, label_stack, settled)
        if method == "seed-linked":
            linked = keep_components_linked_to_painted(seed_stack, label_stack, painted.indices)
            result_stack = paste_painted(linked, label_stack, settled)
        confidence = None
    else:
        result_stack, walks, gaps = _fill_and_walk(adaptation, dtype, progress, cancel,
                                                   register=method != "fill-walk",
                                                   box_walk=method == "register-box-walk")
        # a walked slice's confidence weighs the adapted decoder's certainty on it
        confidence = [item for value in painted.label_values
                      for item in label_confidence(result_stack, label_stack, settled, value, walks[value],
                                                   [gap for gap in gaps if gap.label == value])
                      ] if adaptation.decoders else None

    def volume(stack: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(stack, 0, painted.axis))

    timings = dict(adaptation.timings)
    encoded_here = embeddings.encode_seconds - encoded_before
    timings["encode"] = adaptation.timings["encode"] + encoded_here
    timings["propagate"] = time.perf_counter() - started - encoded_here
    timings["total"] = sum(timings.values())
    names = {v: (label_names or {}).get(v, f"label {v}") for v in painted.label_values}
    adapted = AdaptedModel.from_decoders(
        adaptation.model, adaptation.decoders, adaptation.targets, names, painted.axis_name, adaptation.window,
        {"method": method, "iterations": adaptation.settings.iterations_for(len(painted.indices)),
         "seed": adaptation.settings.seed, "support_slices": len(painted.indices)},
    ) if adaptation.decoders else None
    return SegmentationResult(volume(result_stack), painted, adapted, timings, embeddings.encoded_slices,
                              adaptation.losses, None if seed_stack is None else volume(seed_stack),
                              confidence, suggest_slice(confidence) if confidence else None, adaptation)


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
    previous: Adaptation | None = None,
    empty_slices: Sequence[int] = (),
    with_decoders: bool = True,
) -> SegmentationResult:
    """Adapt the decoders to the painted slices of ``labels`` and segment the whole of ``image``.

    Args:
        image: the volume.
        labels: (K, J, I) integer label map in the image's geometry, non-zero on a few slices of one axis.
            A painted slice holds every label present on it (labels absent there are background).
        axis: "auto", an anatomical name, or a numpy axis.
        method: "default" (the best measured method), or one of ``METHODS``.
        previous: ``SegmentationResult.adaptation`` of an earlier run on this volume, to re-propagate
            quickly after the user corrected or added slices (see ``adapt_to_painted``).
        empty_slices: slices along the painted axis where the user checked that none of the labels is
            present. They stay empty, and no walk beyond the painted range goes past them: the way to say
            where a structure ends (a label map alone cannot, its unpainted slices are empty too). They do
            not train the decoders.
        with_decoders: adapt a decoder per label (the default). With False and a method of
            ``WITHOUT_DECODERS`` (the default method's labels come from the image, SAM and the target embeddings
            alone) none is trained: the same labels, without the fine-tuning's time, but no ``confidence``,
            ``suggested_slice`` or ``adapted`` model.
    """
    _check_decoders_for(resolve_method(method), with_decoders)  # before anything is encoded or trained
    adaptation = adapt_to_painted(image, labels, model=model, device=device, axis=axis, cache_dir=cache_dir,
                                  seed=seed, window=window, iterations=iterations, progress=progress, cancel=cancel,
                                  previous=previous, empty_slices=empty_slices, with_decoders=with_decoders)
    return propagate(adaptation, method, label_names=label_names, progress=progress, cancel=cancel)


def outline_resemblance(embeddings: VolumeEmbeddings, index: int, mask: np.ndarray, prototype: torch.Tensor
                        ) -> float:
    """How much a mask on one slice looks like a label's painted masks to the encoder: the cosine similarity
    of its mean embedding to ``prototype`` (the mean of the label's target embeddings). Encodes the slice if
    needed."""
    fractions = embeddings.transform.mask_to_grid(torch.from_numpy(np.asarray(mask, np.float32))[None],
                                                  embeddings.model.embedding_grid)
    return resemblance(embeddings.get([index]), fractions, prototype)


def _fill_and_walk(adaptation: Adaptation, dtype, progress, cancel, register: bool = True, box_walk: bool = True
                   ) -> tuple[np.ndarray, dict[int, WalkReport], list[GapReport]]:
    """Fill between painted slices, then walk beyond them.

    Between painted slices, the image itself says where the structure goes: registration carries the painted masks
    through the gap (``registered_fill``; with ``register=False``, or where registration loses the structure
    between alike painted masks or the image gives it nothing to follow, Slicer's Fill between slices). The
    decoder's per-slice prediction is worse there. Beyond the first and last painted slice neither predicts
    anything. There SAM, prompted with the box of the previous slice's mask, outlines the structure slice by slice
    while the outline still looks like the painted structure to the encoder
    (``prompt_propagation.prompt_walk_beyond_painted``; how much alike: ``resemblance_threshold``). The walk says
    how far the structure goes; registration from the outermost painted mask then redraws it on the walked slices
    (``registered_fill.redraw_beyond_painted``), which drew them better than SAM's outlines. With
    ``box_walk=False`` the decoder's own prediction walks instead (``spatial.walk_beyond_painted``): it stops
    early where the structure changes its look towards its ends (the aorta's).
    Only the slices the walk reaches are encoded. Slices the user checked empty stay empty, and walks stop there.
    """
    from .baselines import fill_between_slices

    painted, label_stack, embeddings = adaptation.painted, adaptation.label_stack, adaptation.embeddings
    settled = list(painted.settled)

    def interpolated() -> np.ndarray:
        # on each label's bounding box, as Slicer runs it: the same Dice on the development data (18
        # structures, k = 3/5/10) in a quarter of the time
        return fill_between_slices(label_stack, 0, crop=True, pairwise=True).astype(dtype)

    gaps, intensities = [], None
    if register:
        intensities = adaptation.fill_cache.intensities
        result, gaps = fill_between_by_registration(embeddings.slices, label_stack, settled, interpolated,
                                                    progress=progress, cancel=cancel, cache=adaptation.fill_cache)
        result = result.astype(dtype)
    else:
        result = interpolated()
    result[settled] = label_stack[settled]
    rows_mm, cols_mm = embeddings.transform.pixel_spacing
    slice_mm = slice_spacing(embeddings.volume.spacing, painted.axis)
    # beyond its painted range a structure tapers: let its boundary move at most one slice spacing per slice
    radius = int(np.ceil(slice_mm / min(rows_mm, cols_mm)))
    walked, walks = 0, {}
    session = InteractiveSession(embeddings.volume, embeddings=embeddings) if box_walk else None

    for value in painted.label_values:
        def probability(index: int, direction: int, value=value) -> np.ndarray | None:
            nonlocal walked
            check_cancel(cancel)
            embeddings.ensure_ahead(index, direction, BEYOND_PAINTED.prefetch)
            walked += 1
            if progress:
                progress("propagating", walked, embeddings.num_slices)
            if value not in adaptation.decoders:
                return None  # not adapted: the walk records no certainty (the labels do not use it)
            single = {value: adaptation.targets[value]}
            return predict_probabilities({value: adaptation.decoders[value]}, single, embeddings, [index])[value][0]

        if box_walk:
            prototype = adaptation.targets[value].mean(0)

            def looks_like(index: int, mask: np.ndarray, prototype=prototype) -> float:
                return outline_resemblance(embeddings, index, mask, prototype)

            def threshold(value=value, looks_like=looks_like) -> float:
                return resemblance_threshold(result, label_stack, painted.indices, value, looks_like)

            walks[value] = prompt_walk_beyond_painted(session, result, label_stack, settled, value,
                                                      probability, looks_like, min_resemblance=threshold,
                                                      seed=adaptation.settings.seed, cancel=cancel)
            if register:
                redraw_beyond_painted(intensities, result, label_stack, settled, value,
                                      walks[value].written)
        else:
            walks[value] = walk_beyond_painted(result, label_stack, settled, value, probability, radius)
    return result, walks, gaps


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
    atlases: bool = True,
) -> AdaptedModel:
    """Adapt one decoder on the painted slices of one or more volumes (all painted on the same anatomical axis).

    With ``atlases``, each volume is also kept with its full segmentation as an atlas (``atlas.py``), what
    ``apply_adapted_model`` registers onto a new volume: a label map painted on every slice of its extent is
    taken as it is; one painted on some slices is first segmented with the default method, using the decoders
    just trained.
    """
    if not pairs:
        raise InputError("give at least one image with its painted labels.")
    window = window if isinstance(window, IntensityWindow) else IntensityWindow.parse(window)
    sam = model if isinstance(model, SamModel) else get_model(model, device)
    supports, axis_names, values, volumes = [], set(), set(), []
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
        volumes.append((image, labels, painted, stack))
    if len(axis_names) > 1:
        raise InputError(f"the volumes are painted on different axes ({', '.join(sorted(axis_names))}); paint all on one.")
    settings = AdaptationSettings(iterations=iterations, seed=seed)
    decoders, targets, losses = adapt(supports, tuple(sorted(values)), settings, progress=progress, cancel=cancel)
    count = sum(len(s.indices) for s in supports)
    names = {v: (label_names or {}).get(v, f"label {v}") for v in sorted(values)}
    adapted = AdaptedModel.from_decoders(sam, decoders, targets, names, axis_names.pop(), window,
                                         {"method": "seed", "iterations": settings.iterations_for(count),
                                          "seed": seed, "support_slices": count, "volumes": len(supports)})
    for (image, labels, painted, stack), support in zip(volumes, supports) if atlases else ():
        check_cancel(cancel)
        if not _painted_throughout(stack, painted):
            # the default method with the decoders just trained (for one volume, exactly what segment gives)
            adaptation = Adaptation(sam, painted, support.embeddings, stack, decoders, targets, settings, window,
                                    losses, {"load": 0.0, "adapt": 0.0, "encode": 0.0})
            labels = propagate(adaptation, DEFAULT_METHOD, progress=progress, cancel=cancel).labels
        adapted.add_atlas(image, labels)
    return adapted


def _painted_throughout(stack: np.ndarray, painted: PaintedSlices) -> bool:
    """Whether every label is painted on each slice from its first painted slice to its last (a full map).
    ``stack``: the label map's slices along ``painted.axis``."""
    for value in painted.label_values:
        holds = np.flatnonzero((stack == value).reshape(stack.shape[0], -1).any(1))
        if len(holds) != holds[-1] - holds[0] + 1:
            return False
    return True


def applies_atlases(adapted: AdaptedModel, method: str = "auto") -> bool:
    """Whether ``apply_adapted_model`` with ``method`` registers the model's atlases (else: its decoder)."""
    if method not in APPLY_METHODS:
        raise InputError(f"unknown method {method!r}; use one of {', '.join(APPLY_METHODS)}.")
    return method == "atlas" or (method == "auto" and bool(adapted.atlases))


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
    method: str = "auto",
) -> np.ndarray:
    """Segment ``image`` with a saved adapted model; returns a (K, J, I) label map.

    ``method``: "atlas" registers the model's atlases onto ``image`` (``atlas.segment_with_atlases``);
    "decoder" runs the adapted decoder on every slice (the paper's cross-volume use); "auto": the atlases if
    the model holds any. Across patients the atlases did far better on the development MRI (mean Dice at
    k = 10: hippocampus 0.45 -> 0.83, left atrium 0.09 -> 0.82 with their borders refined; docs/benchmarks.md).
    """
    check_volume(image)
    if applies_atlases(adapted, method):
        return segment_with_atlases(adapted.atlases, image, seed=int(adapted.settings.get("seed", 0)),
                                    progress=progress, cancel=cancel)
    if model is None:
        if adapted.model_kind != DEFAULT_MODEL:
            raise InputError(
                f"this adapted model was made from SAM {adapted.model_kind}; give its checkpoint with "
                f"--model {adapted.model_kind}:PATH."
            )
        model = DEFAULT_MODEL
    sam = model if isinstance(model, SamModel) else get_model(model, device)
    decoders = adapted.build_decoders(sam)
    if axis is None or axis == "auto":
        slice_axis = numpy_axis_for(adapted.axis_name, image.direction_matrix)
    elif isinstance(axis, str):
        slice_axis = numpy_axis_for(axis, image.direction_matrix)
    else:
        slice_axis = int(axis)
    embeddings = VolumeEmbeddings(sam, image, slice_axis, window=adapted.window, cache_dir=cache_dir,
                                  progress=progress, cancel=cancel)
    indices = list(range(embeddings.num_slices))
    probabilities = predict_probabilities(decoders, adapted.targets, embeddings, indices, progress=progress,
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
    initial: dict[int, FewShotMaskDecoder] | None = None,
    train: bool = True,
) -> tuple[dict[int, FewShotMaskDecoder], dict[int, torch.Tensor], list[float]]:
    """Encode the support slices, compute target embeddings per label and fine-tune one decoder per label
    (with ``train=False``: none; the decoders come back empty).

    The paper shares one decoder between labels; with a few dozen steps a shared decoder learned to
    segment the largest label whatever its prompt (spleen Dice 0.00 next to the liver on the sample CT),
    so each label gets its own decoder, prompted by its own target embeddings.
    """
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
    decoders, losses = {}, []
    for value in label_values if train else ():
        def label_progress(stage: str, done: int, total: int, value=value) -> None:
            if progress:
                progress(f"{stage} label {value}", done, total)

        decoders[value], label_losses = adapt_decoder(sam, support_embeddings, {value: masks[value]}, targets, settings,
                                                      progress=label_progress, cancel=cancel,
                                                      initial=(initial or {}).get(value))
        losses.extend(label_losses)
    return decoders, targets, losses


def _same_support(previous: Adaptation, painted: PaintedSlices, label_stack: np.ndarray,
                  settings: AdaptationSettings) -> bool:
    """The same labelled slices with the same labels, trained with the same settings."""
    indices = list(painted.indices)
    return (previous.painted.indices == painted.indices and previous.painted.label_values == painted.label_values
            and previous.settings == settings and previous.label_stack.shape == label_stack.shape
            and np.array_equal(previous.label_stack[indices], label_stack[indices]))


def _check_decoders_for(method: str, with_decoders: bool) -> None:
    if not with_decoders and method not in WITHOUT_DECODERS:
        raise ValueError(f"method {method} predicts with the adapted decoders; it needs with_decoders=True.")


def resolve_method(method: str) -> str:
    """The name in ``METHODS`` that ``method`` stands for ("default" or empty: ``DEFAULT_METHOD``)."""
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
