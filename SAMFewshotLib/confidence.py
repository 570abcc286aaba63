"""Per-slice confidence of a propagated segmentation, and the slice worth painting next.

The walk methods fill between painted slices (by registration, or contour interpolation) and walk beyond them
(SAM box-prompted slice by slice and checked by the decoder, or the decoder alone), so what can go wrong
differs by where a slice lies:

- between two painted slices, contour interpolation is only as good as the structure is smooth there: the
  more the two bracketing painted shapes differ, and the farther the slice is from both, the less it can be
  trusted; where registration filled the gap, how well it carried each painted mask to the other painted
  slice (its reach) says how far it can be trusted over the gap;
- beyond the painted range, the walk is as good as the decoder is sure (its mean foreground probability
  over what was written) and as the shape is continuous (overlap with the previous slice). A decoder adapted
  from a few slices gives a structure it outlines well probabilities well under 1 (0.3 to 0.5 on a kidney
  walked at Dice 0.95), so the probability is taken as it is, not as a coin flip around 0.5. That ranks the
  walked slices among themselves; for how much of a walked slice is likely wrong (what the suggestion
  weighs), a probability of 0.5 or more counts as sure: with the raw probability, runs of correct walked
  slices outweighed gaps with more real error;
- at the end of a walk, the structure's extent is uncertain unless the walk stopped because it saw the
  structure end there; the structure may go on for a few slices, less likely the farther
  past the end, so the doubt fades over the slices beyond it;
- what is at stake on a walked slice is at least the cross-section next to it on the painted side: a walk
  that suddenly loses most of the structure is as wrong as the area it lost;
- a slice drawn wrong costs both the voxels it draws wrongly and those it misses (Dice counts both), a slice
  past an end only what it misses: the expected error of a slice is its uncertainty times the area drawn
  plus the area at stake. Counting the area at stake alone made an end that may go on outweigh a gap whose
  interpolated outlines were as doubtful (the vertebra of the development CT was suggested slices past its
  end while its middle was wrong).

On every slice, small cross-sections score lower: their Dice suffers most from a boundary one voxel off
(the area / (area + boundary) factor). None of this is fitted to data; benchmarks/suggest_slices.py measures
how well it ranks slices (Spearman correlation with slice Dice) and how many painted slices the suggestion
saves.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .registered_fill import GapReport
from .spatial import WalkReport

# confidence that the first slice beyond a walk's end is really empty, by why the walk stopped: high where
# the walk saw the structure end (nothing attached, or its intensity changed under most of the last mask),
# low where it stopped because something else got in (the mask spread, grew or jumped), between where the
# outline no longer looked like the painted structure (to the encoder) or left its intensity
END_CONFIDENCE = {"empty": 0.7, "no points": 0.7, "edge": 1.0, "painted": 1.0, "spread": 0.4, "grew": 0.4,
                  "jumped": 0.4, "unrecognised": 0.5, "intensity": 0.5}
# Past an uncertain end the structure may go on. How far is unknown; the scale at hand is the stretch the
# user painted: the chance that it goes on shrinks slice by slice so that the doubt reaches, on average,
# END_DOUBT_REACH of the painted span past the end, and is dropped below END_DOUBT_FLOOR. The confidence
# shown keeps that doubt over a whole painted span: a clinician who painted two slices has said nothing of how
# far the structure goes beyond them, and slices it may still cover must not look as sure as interpolated ones.
END_DOUBT_REACH = 1.0
END_DOUBT_FLOOR = 0.05
# What painting a slice past an uncertain end can fix counts only as far as the structure is likely to be
# there: a slice painted where it turns out to be absent adds nothing. So the expected error that drives the
# suggestion lets the doubt fade over a quarter of the painted span (with two slices painted at a structure's
# quartiles, half of what lies beyond each).
SUGGESTION_DOUBT_REACH = 0.25
# A walked slice whose decoder probability is at least 1 / WALK_SURE_FACTOR counts as right when weighing what
# painting it could fix (see the module docstring).
WALK_SURE_FACTOR = 2.0
# A structure rarely stops at a full cross-section: an end as large as the largest painted cross-section
# is doubtful whatever the decoder saw (it may just not recognise the structure there), up to this chance.
END_DOUBT_FULL = 0.9


@dataclass
class SliceConfidence:
    index: int  # slice index along the painted axis
    label: int
    confidence: float  # 0 (guess) .. 1 (certain)
    area: int  # voxels of the label on this slice in the result
    kind: str  # "painted", "interpolated", "walked", "end" (first slice past a walk) or "outside"
    expected_error: float  # (1 - certainty of the shape) x (the area drawn + the area at stake), in voxels: what
    # painting it could fix, drawn wrong or missed (past an uncertain end, only the doubt painting would likely settle)

    @property
    def uncertain_end(self) -> bool:
        return self.kind == "end" and self.confidence < 0.5


def boundary_factor(mask: np.ndarray) -> float:
    """area / (area + boundary voxels): near 1 for large cross-sections, lower for thin or small ones."""
    area = int(mask.sum())
    if area == 0:
        return 1.0
    boundary = int((mask & ~ndimage.binary_erosion(mask)).sum())
    return area / (area + boundary)


def dice_2d(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def aligned_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks after moving ``b``'s centroid onto ``a``'s (whole voxels): how much the shape differs."""
    if not a.any() or not b.any():
        return dice_2d(a, b)
    shift = np.round(np.subtract(ndimage.center_of_mass(a), ndimage.center_of_mass(b))).astype(int)
    moved = ndimage.shift(b.astype(np.uint8), shift, order=0, mode="constant").astype(bool)
    return dice_2d(a, moved)


def label_confidence(
    result: np.ndarray,
    painted: np.ndarray,
    painted_indices: Sequence[int],
    value: int,
    walk: WalkReport | None = None,
    gaps: Sequence[GapReport] = (),
) -> list[SliceConfidence]:
    """Confidence of every slice for one label.

    Args:
        result: (N, rows, cols) propagated label stack, slices along axis 0.
        painted: (N, rows, cols) the user's label stack; ``painted_indices`` the painted slices, and those
            checked empty (both are final: no doubt reaches past them).
        walk: what the decoder's walk beyond the painted range did (None: no walk, e.g. Fill-between alone).
        gaps: how registration filled the gaps between painted slices of this label (none: contour interpolation).
    """
    count = result.shape[0]
    painted_set = set(int(i) for i in painted_indices)
    with_value = [i for i in sorted(painted_set) if np.any(painted[i] == value)]
    steps = {step.index: step for step in (walk.steps if walk else [])}
    masks = result == value
    beyond_end = _doubt_beyond_ends(masks, walk, painted, with_value, value, painted_set)
    registered = {(gap.below, gap.above): gap.reach for gap in gaps if gap.registered}
    out = []
    for index in range(count):
        mask = masks[index]
        area = int(mask.sum())
        at_stake = area
        fixable = None  # walked, or past an uncertain end: the share of the area at stake painting would fix
        # ``certainty``: how sure the shape is; the boundary factor then lowers the confidence of small
        # cross-sections, but painting a slice cannot fix that, so the expected error uses certainty alone
        if index in painted_set:
            kind, certainty = "painted", 1.0
        elif with_value and with_value[0] < index < with_value[-1]:
            below = max(i for i in with_value if i < index)
            above = min(i for i in with_value if i > index)
            t = (index - below) / (above - below)
            if (below, above) in registered:
                change = 1.0 - registered[(below, above)]
            else:
                # contour interpolation follows a structure that moves, so only a change of shape is doubtful
                change = 1.0 - aligned_dice(painted[below] == value, painted[above] == value)
            kind, certainty = "interpolated", 1.0 - change * 2.0 * min(t, 1.0 - t)
        elif index in steps:
            step = steps[index]
            kind = "walked"
            probability = float(np.clip(step.mean_probability, 0.0, 1.0))
            certainty = probability * step.overlap
            fixable = 1.0 - min(1.0, WALK_SURE_FACTOR * probability) * step.overlap
            inward = index + (1 if index < with_value[0] else -1)
            at_stake = max(area, int(masks[inward].sum()))
        elif index in beyond_end:
            kind, doubt, fixable, at_stake = beyond_end[index]
            certainty = 1.0 - doubt
            at_stake = max(area, at_stake)
        else:
            kind, certainty = "outside", 1.0
        certainty = float(np.clip(certainty, 0.0, 1.0))
        confidence = certainty * (boundary_factor(mask) if kind != "painted" else 1.0)
        uncertainty = 1.0 - certainty if fixable is None else fixable
        # a slice drawn wrong costs its wrong voxels and its missed ones (Dice counts both): what painting it
        # could fix is the uncertain share of what is drawn plus of what is at stake
        out.append(SliceConfidence(index, int(value), confidence, area, kind, uncertainty * (area + at_stake)))
    return out


def _doubt_beyond_ends(masks: np.ndarray, walk: WalkReport | None, painted: np.ndarray,
                       painted_indices: Sequence[int], value: int, settled: set[int] = frozenset()
                       ) -> dict[int, tuple[str, float, float, int]]:
    """Slice -> (kind, chance the structure goes on there, the part of that chance painting the slice would
    likely fix (``SUGGESTION_DOUBT_REACH``), cross-section at stake) past each end of a walk.

    ``painted_indices``: the painted slices that hold ``value``, sorted. ``settled``: every slice the user
    painted or checked empty; the doubt stops there."""
    out: dict[int, tuple[str, float, float, int]] = {}
    if walk is None or not painted_indices:
        return out
    count = masks.shape[0]
    largest = max(int(np.count_nonzero(painted[i] == value)) for i in painted_indices)
    span = painted_indices[-1] - painted_indices[0] + 1
    decay, fixable_decay = (float(np.clip(1.0 - 1.0 / max(reach * span, 1.0), 0.5, 0.95))
                            for reach in (END_DOUBT_REACH, SUGGESTION_DOUBT_REACH))
    for direction, (index, reason) in walk.stops.items():
        doubt = 1.0 - END_CONFIDENCE.get(reason, 0.5)
        # the structure would go on with about the cross-section it had where the walk ended
        last = [i for i in (index - direction, index - 2 * direction) if 0 <= i < count]
        at_stake = max((int(masks[i].sum()) for i in last), default=0)
        if doubt > 0.0 and largest > 0:
            doubt = max(doubt, END_DOUBT_FULL * min(at_stake / largest, 1.0))
        kind, fixable = "end", doubt
        while 0 <= index < count and doubt >= END_DOUBT_FLOOR and index not in out and index not in settled:
            out[index] = (kind, doubt, fixable if fixable >= END_DOUBT_FLOOR else 0.0, at_stake)
            kind, doubt, fixable, index = "outside", doubt * decay, fixable * fixable_decay, index + direction
    return out


def suggest_slice(confidences: Sequence[SliceConfidence]) -> int | None:
    """The unpainted slice whose painting should remove the most expected error; None when nothing is at stake.

    Painting a slice fixes it and shortens the guesswork on both sides of it, up to the next painted slice.
    So the unpainted slices are grouped into runs between painted slices (and beyond the first and last),
    the run with the most expected error summed over its slices and labels is chosen, and within it the
    slice that splits that error in half (its weighted median). One gap is thus bisected where the shapes
    change most, and a walk beyond the painted range is checked halfway along, where the structure's end is
    least known, rather than always at its single worst slice.
    """
    totals: dict[int, float] = {}
    painted: set[int] = set()
    for item in confidences:
        if item.kind == "painted":
            painted.add(item.index)
        else:
            totals[item.index] = totals.get(item.index, 0.0) + item.expected_error
    runs: list[list[int]] = []
    for index in sorted(totals):
        if index in painted:
            continue
        if runs and index == runs[-1][-1] + 1 and not any(i in painted for i in range(runs[-1][-1] + 1, index)):
            runs[-1].append(index)
        else:
            runs.append([index])
    if not runs:
        return None
    best = max(runs, key=lambda run: (sum(totals[i] for i in run), -run[0]))
    weights = np.array([totals[i] for i in best])
    if weights.sum() <= 0:
        return None
    cumulative = np.cumsum(weights)
    return int(best[int(np.searchsorted(cumulative, cumulative[-1] / 2.0))])


def per_slice(confidences: Sequence[SliceConfidence]) -> dict[int, float]:
    """Slice index -> the lowest confidence of any label on it."""
    lowest: dict[int, float] = {}
    for item in confidences:
        lowest[item.index] = min(lowest.get(item.index, 1.0), item.confidence)
    return lowest


def write_report(path: str | Path, confidences: Sequence[SliceConfidence], axis_name: str,
                 suggestion: int | None, label_names: dict[int, str] | None = None) -> Path:
    """JSON (or CSV if the path ends in .csv) with a row per slice and label, and the suggested slice."""
    path = Path(path)
    rows = [dict(asdict(c), uncertain_end=c.uncertain_end,
                 name=(label_names or {}).get(c.label, f"label {c.label}")) for c in confidences]
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["index"])
            writer.writeheader()
            writer.writerows(rows)
        return path
    uncertain_ends = sorted({c.index for c in confidences if c.uncertain_end})
    payload = {
        "axis": axis_name,
        "suggested_slice": suggestion,
        "uncertain_ends": uncertain_ends,
        "slices": rows,
    }
    path.write_text(json.dumps(payload, indent=1))
    return path
