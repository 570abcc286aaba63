"""SAM^auto prompt propagation (SAM^Med, Algorithm 1): walk an accepted mask from slice to slice.

From a mask on one slice, each step to the adjacent slice:

1. samples ``n`` points inside the current mask (off its border where it has an inside) and keeps those
   whose intensity on the next slice differs from this slice's by less than
   ``lambda x stddev(intensity inside the current mask)``: the paper's dynamic threshold. The paper stops
   when no point survives; here the walk stops when fewer than ``min_kept`` of them survive ("no points"):
   inside a structure about 80-90 % of the points pass with lambda = 2, past its end mostly none or half
   (measured on the dev CT's liver, spleen, kidney, aorta, bladder, colon, femur and gluteus);
2. prompts the next slice with the current mask's bounding box, widened a little (the documented variant):
   LiteMedSAM was distilled with boxes only, ignores clicks with its own prompt encoder, and clicks added
   beside the box made it worse with both encoders; with a learned prompt encoder the box goes through
   its learned box embedding. ``box=False`` is the paper's prompt: the kept points as clicks alone (they
   need a learned encoder and still did worse, see ``PropagationSettings``);
3. keeps the predicted voxels within ``intensity_range`` standard deviations of the structure's mean
   intensity on the start slice (holes filled), and of those the regions that hold a kept point or touch
   the current mask.

Each side stops at the volume's edge, when the mask is empty, or when the new mask does not look like a
continuation of the structure. The paper notes that its rule alone over-segments (the walk runs on into
neighbouring tissue of similar intensity); the guards here, each measured on the dev CT, are: Dice with
the current mask below ``min_overlap`` ("jumped"), area above ``max_growth`` times the current one's
("grew": SAM outlined a neighbour as well), and fewer than ``min_typical`` of the new mask's voxels
of an intensity typical of the structure on the start slice ("intensity": past the liver's tip the walk
followed a small darker blob for nine slices without it; what is typical: ``IntensityStats``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from torch import nn

from .embeddings import check_cancel
from .errors import InputError
from .interactive import SliceMask
from .prompts import SlicePrompt
from .spatial import WalkReport, WalkStep

ProgressCallback = Callable[[str, int, int], None]
# Beyond the painted range a step is kept only where its mask still looks like the painted structure to the
# image encoder: the cosine similarity of the mask's mean embedding to the painted masks' mean embedding (the
# target embeddings) may fall at most RESEMBLANCE_MARGIN below what the filled masks between the painted slices
# get (median over the middle slices of the at most RECOGNITION_GAPS longest gaps; ``resemblance_threshold``).
# Until 2026-12-03 the gate was the adapted decoder's mean probability, which is noise on small structures
# (aorta: 0.0-0.6 from one correct slice to the next) and stopped their walks at the first step.
RESEMBLANCE_MARGIN = 0.15
RECOGNITION_GAPS = 3


@dataclass(frozen=True)
class PropagationSettings:
    """Prompt-propagation settings (see the module docstring for what each step does).

    Attributes:
        points: n, the points sampled inside the current mask at each step.
        intensity_tolerance: lambda: a point is kept where the next slice's intensity differs from this
            slice's by less than lambda times the intensity's standard deviation inside the current mask.
        min_kept: stop when fewer than this share of the sampled points is kept (the paper: any point).
        max_prompt_points: at most this many kept points become clicks (prompt learning trains 1 to 5).
        box: prompt with the current mask's bounding box (True) or with the kept points alone (False, the
            paper's Algorithm 1); None: the box.
        clicks_with_box: add the kept points as clicks beside the box (the paper's composite prompt).
        box_margin: the box is widened by this fraction of its size on each side (at least one voxel): a
            cross-section may grow from one slice to the next.
        intensity_range: keep predicted voxels within this many standard deviations of the structure's
            mean intensity on the start slice; None: keep all.
        min_typical: stop when fewer than this share of the new mask has an intensity typical of the structure
            on the start slice (within one standard deviation of that mean, or within the middle 68 % of its
            intensities: ``IntensityStats``); None: never.
        min_overlap: stop where Dice(new mask, current mask) falls below this.
        max_growth: stop where the new mask's area exceeds this many times the current one's.
        prefetch: slices encoded at once in the walk's direction, where the encoder takes them in one batch (not
            on a CPU: ``VolumeEmbeddings.ensure_ahead``).
    """

    points: int = 20
    intensity_tolerance: float = 2.0
    min_kept: float = 0.5
    max_prompt_points: int = 5
    box: bool | None = None
    clicks_with_box: bool = False
    box_margin: float = 0.05
    intensity_range: float | None = 3.0
    min_typical: float | None = 0.3
    min_overlap: float = 0.5
    max_growth: float = 1.5
    prefetch: int = 4


# beyond the painted range: a mask of which fewer than half the voxels have an intensity typical of the
# painted slice's mask (``IntensityStats``) ends the walk (0.3 for interactive walks). Measured with the resemblance
# gate on the 18 development structures and 13 other CT structures at k = 3 and 5 (docs/benchmarks.md).
BEYOND_PAINTED = PropagationSettings(min_typical=0.5)


class IntensityStats(NamedTuple):
    """A structure's intensities on the slice a walk starts from, and which intensities are typical of it.

    A voxel is typical where it lies within one standard deviation of the mean (how ``min_typical`` was first
    measured) or within the middle 68 % of the start mask's intensities (between their 16th and 84th
    percentiles). For a structure of one tissue the two ranges nearly coincide. A structure of two tissues has
    few voxels near its mean: the air-filled colon's painted mask, air and wall, held 32 % of its own voxels
    within one standard deviation, so the walk beyond it stopped at its first step however right the next mask
    was; the percentiles hold 68 % of it by definition.
    """

    mean: float
    spread: float  # standard deviation
    low: float
    high: float

    @classmethod
    def of(cls, pixels: np.ndarray) -> IntensityStats:
        pixels = np.asarray(pixels, dtype=np.float64)
        low, high = np.percentile(pixels, TYPICAL_PERCENTILES)
        return cls(float(pixels.mean()), float(pixels.std()), float(low), float(high))

    def typical_share(self, pixels: np.ndarray) -> float:
        pixels = np.asarray(pixels, dtype=np.float64)
        near_mean = np.abs(pixels - self.mean) <= self.spread
        return float(np.mean(near_mean | ((pixels >= self.low) & (pixels <= self.high))))


# the middle 68 % of a structure's intensities: as many as lie within one standard deviation of the mean of a
# normal distribution
TYPICAL_PERCENTILES = (15.87, 84.13)


@dataclass
class PromptWalk:
    """What a propagation did: the masks, in slice order, and why each side stopped."""

    masks: list[SliceMask] = field(default_factory=list)
    # direction (-1, +1) -> (first slice not kept, reason): "no points", "empty", "intensity", "jumped",
    # "grew" or "edge"
    stops: dict[int, tuple[int, str]] = field(default_factory=dict)


def walk_prompts(
    session,
    start_mask: SliceMask,
    *,
    prompt_encoder: nn.Module | None = None,
    settings: PropagationSettings = PropagationSettings(),
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> PromptWalk:
    """Walk from an accepted mask to both sides: the start mask and every slice reached, in slice order, and
    why each side stopped.

    Args:
        session: an ``InteractiveSession``.
        start_mask: an accepted mask on one slice (from ``session.segment`` or painted).
        prompt_encoder: a prompt encoder from ``learn_prompt_encoder`` for this structure, or None for the
            model's own.
        seed: seeds the point sampling: the same inputs give the same walk.
        progress: called as progress("propagating", slices visited, slices in the volume).
    Raises:
        InputError: the start mask is empty or does not fit the session's slices.
        Cancelled: ``cancel`` was set.
    """
    start = session.check_index(start_mask.index)
    mask = np.asarray(start_mask.mask, dtype=bool)
    if mask.shape != tuple(session.slice_shape):
        raise InputError(f"the start mask is {mask.shape}, the slices {tuple(session.slice_shape)}: they must match.")
    if not mask.any():
        raise InputError(f"the start mask on slice {start} is empty: there is nothing to propagate.")
    rng = np.random.default_rng(seed)
    use_box = True if settings.box is None else settings.box
    stats = IntensityStats.of(session.slice_pixels(start)[mask])  # the structure's intensity on the start slice
    walk = PromptWalk()
    found = {start: start_mask}
    visited = 0
    for direction in (-1, +1):
        current, current_index = mask, start
        index = start + direction
        reason = "edge"
        while 0 <= index < session.num_slices:
            check_cancel(cancel)
            session.embeddings.ensure_ahead(index, direction, settings.prefetch)
            step = _step(session, current, current_index, index, rng, settings, use_box, prompt_encoder, stats)
            visited += 1
            if progress:
                progress("propagating", visited, session.num_slices - 1)
            if isinstance(step, str):
                reason = step
                break
            found[index] = step
            current, current_index = step.mask, index
            index += direction
            reason = "edge"
        walk.stops[direction] = (index, reason)
    walk.masks = [found[i] for i in sorted(found)]
    return walk


def _step(session, current: np.ndarray, current_index: int, index: int, rng: np.random.Generator,
          settings: PropagationSettings, use_box: bool, prompt_encoder: nn.Module | None,
          stats: IntensityStats) -> SliceMask | str:
    """The mask on slice ``index`` from the current mask on the adjacent slice, or why the walk stops."""
    here = session.slice_pixels(current_index).astype(np.float64)
    there = session.slice_pixels(index).astype(np.float64)
    sampled, points = propagated_points(current, here, there, rng, settings.points, settings.intensity_tolerance)
    if len(points) == 0 or len(points) < settings.min_kept * sampled:
        return "no points"
    points = points[: settings.max_prompt_points]
    clicks = tuple((float(col), float(row)) for row, col in points)
    # measured: clicks beside the box made LiteMedSAM's walk worse, with its own and a learned prompt encoder
    if use_box and not settings.clicks_with_box:
        clicks = ()
    box = widened_box(current, settings.box_margin) if use_box else None
    result = session.segment(index, SlicePrompt(clicks, (1,) * len(clicks), box), prompt_encoder=prompt_encoder)
    new = result.mask
    uniform = stats.spread == 0  # a structure of one intensity: the intensity rules below cannot apply
    if settings.intensity_range is not None and not uniform:
        reach = settings.intensity_range * stats.spread
        new = ndimage.binary_fill_holes(new & (np.abs(there - stats.mean) <= reach))
    new = _linked_regions(new, current, points)
    if not new.any():
        return "empty"
    typical = stats.typical_share(there[new])
    if settings.min_typical is not None and not uniform and typical < settings.min_typical:
        return "intensity"
    overlap = 2.0 * float((new & current).sum()) / float(new.sum() + current.sum())
    if overlap < settings.min_overlap:
        return "jumped"
    if new.sum() > settings.max_growth * current.sum():
        return "grew"
    return SliceMask(index, new, np.where(new, result.probability, 0).astype(np.float32))


def propagated_points(mask: np.ndarray, here: np.ndarray, there: np.ndarray, rng: np.random.Generator,
                      count: int, tolerance: float) -> tuple[int, np.ndarray]:
    """Algorithm 1's points: how many were sampled in ``mask``, and the (k, 2) (row, col) of those kept.

    Points are drawn uniformly from the mask's inside (its voxels not on its border, or the whole mask
    when it has no inside) and kept where |there - here| < tolerance x stddev(here in mask).
    """
    inside = ndimage.binary_erosion(mask, iterations=1)
    candidates = np.argwhere(inside if inside.any() else mask)
    chosen = candidates[rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)]
    spread = float(here[mask].std())
    difference = np.abs(there[chosen[:, 0], chosen[:, 1]] - here[chosen[:, 0], chosen[:, 1]])
    # a uniform structure (std 0) keeps only points whose intensity did not change at all
    keep = difference < tolerance * spread if spread > 0 else difference == 0
    return len(chosen), chosen[keep]


def widened_box(mask: np.ndarray, margin: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) the mask's bounding box widened by ``margin`` of its size (>= 1 voxel) per side."""
    rows, cols = np.nonzero(mask)
    pad_c = max(1.0, margin * (cols.max() - cols.min() + 1))
    pad_r = max(1.0, margin * (rows.max() - rows.min() + 1))
    height, width = mask.shape
    return (max(0.0, cols.min() - pad_c), max(0.0, rows.min() - pad_r),
            min(width - 1.0, cols.max() + pad_c), min(height - 1.0, rows.max() + pad_r))


def _linked_regions(predicted: np.ndarray, current: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The predicted regions that hold a prompt point or touch the current mask (the structure goes on)."""
    regions, count = ndimage.label(predicted)
    if count == 0:
        return predicted
    linked = set(np.unique(regions[points[:, 0], points[:, 1]]).tolist())
    linked |= set(np.unique(regions[current]).tolist())
    linked.discard(0)
    return np.isin(regions, sorted(linked))


def resemblance_threshold(result: np.ndarray, painted: np.ndarray, painted_indices: Sequence[int], value: int,
                          resemblance: Callable[[int, np.ndarray], float]) -> float:
    """How much a walked mask of label ``value`` must resemble the painted structure (see ``RESEMBLANCE_MARGIN``).

    The filled masks between the painted slices (by registration, Dice about 0.9) show how much the structure's
    cross-sections resemble the painted ones away from them: the threshold is the median resemblance of the
    middle slices of the (at most ``RECOGNITION_GAPS``) longest gaps, less ``RESEMBLANCE_MARGIN``. Each middle
    slice costs one more encoded slice. With no gap to learn from, -1: no mask is refused for its look.

    Args:
        result: (N, rows, cols) label stack already filled between the painted slices.
        resemblance: (slice index, mask) -> cosine similarity of the mask's mean embedding to the painted one.
    """
    with_value = [i for i in sorted(set(int(i) for i in painted_indices)) if np.any(painted[i] == value)]
    gaps = sorted(((above - below, below, above) for below, above in zip(with_value[:-1], with_value[1:])
                   if above - below > 1), reverse=True)[:RECOGNITION_GAPS]
    middles = sorted((below + above) // 2 for _, below, above in gaps)
    seen = [resemblance(m, result[m] == value) for m in middles if np.any(result[m] == value)]
    if not seen:
        return -1.0
    return float(np.median(seen)) - RESEMBLANCE_MARGIN


def prompt_walk_beyond_painted(
    session,
    result: np.ndarray,
    painted: np.ndarray,
    painted_indices: Sequence[int],
    value: int,
    probability: Callable[[int, int], np.ndarray | None],
    resemblance: Callable[[int, np.ndarray], float],
    *,
    settings: PropagationSettings = BEYOND_PAINTED,
    min_resemblance: float | Callable[[], float] = -1.0,
    seed: int = 0,
    cancel: threading.Event | None = None,
) -> WalkReport:
    """Extend label ``value`` beyond its first and last painted slice by this walk, each step checked against
    the painted structure's look.

    From the outermost painted mask on each side, each step box-prompts the next slice (``walk_prompts``'s
    step, with its guards, stricter on intensity: ``BEYOND_PAINTED``); the new mask is kept if its mean
    embedding resembles the painted masks' at least ``min_resemblance`` (SAM outlines whatever lies in the box:
    unchecked, the walk ran on past the femur's end into the hip bone). A painted slice stops the walk: what
    the user painted there is final. ``min_resemblance`` may be a function returning the threshold
    (``resemblance_threshold``, which encodes slices): it is called once, at the first step.

    Args:
        session: an ``InteractiveSession`` on the volume's slices (its ``embeddings`` those the decoder uses).
        result: (N, rows, cols) label stack to write into (only background voxels are written).
        painted: (N, rows, cols) the user's labels; ``painted_indices`` the painted slices.
        probability: (slice index, direction) -> (rows, cols) the adapted decoder's foreground probability of
            ``value``; its mean over each written mask goes into the report (confidence.py uses it). It may
            return None (no decoder adapted): the report then holds NaN there.
        resemblance: (slice index, mask) -> cosine similarity of the mask's mean embedding to the painted one.
    Returns:
        The slices written, with the decoder's mean probability on each, and where and why each side stopped:
        one of ``walk_prompts``'s reasons, "painted", or "unrecognised" (the mask no longer looks like the
        painted structure).
    """
    painted_set = set(int(i) for i in painted_indices)
    with_value = [i for i in sorted(painted_set) if np.any(painted[i] == value)]
    report = WalkReport()
    if not with_value:
        return report
    for start, direction in ((with_value[0], -1), (with_value[-1], +1)):
        rng = np.random.default_rng(seed)
        current, current_index = painted[start] == value, start
        stats = IntensityStats.of(session.slice_pixels(start)[current])
        index, reason = start + direction, "edge"
        while 0 <= index < session.num_slices:
            check_cancel(cancel)
            if index in painted_set:
                reason = "painted"
                break
            session.embeddings.ensure_ahead(index, direction, settings.prefetch)
            step = _step(session, current, current_index, index, rng, settings, True, None, stats)
            if isinstance(step, str):
                reason = step
                break
            if callable(min_resemblance):
                min_resemblance = min_resemblance()
            if resemblance(index, step.mask) < min_resemblance:
                reason = "unrecognised"
                break
            result[index][step.mask & (result[index] == 0)] = value
            decoded = probability(index, direction)
            recognised = float("nan") if decoded is None else float(decoded[step.mask].mean())
            overlap = 2.0 * float((step.mask & current).sum()) / float(step.mask.sum() + current.sum())
            report.steps.append(WalkStep(index, recognised, overlap))
            current, current_index = step.mask, index
            index += direction
            reason = "edge"
        report.stops[direction] = (index, reason)
    return report
