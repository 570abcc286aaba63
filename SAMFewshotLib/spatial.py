"""Spatial logic that uses what the user painted: predictions must connect to the painted structure.

The few-shot decoder judges each slice on its own, so it can fire on look-alike tissue far from the
structure (a blob on a slice the organ never reaches). A voxel the user painted is certain: predicted
regions must connect to painted voxels of the same label, either in 3D after the fact
(``keep_components_linked_to_painted``) or slice by slice while walking outward (``walk_beyond_painted``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


def keep_components_linked_to_painted(
    labels: np.ndarray, painted: np.ndarray, painted_indices: Sequence[int]
) -> np.ndarray:
    """Keep, per label, the 3D connected components (6-connectivity) that contain a painted voxel.

    Args:
        labels: (N, rows, cols) predicted label stack, slices along axis 0, painted slices already pasted in.
        painted: (N, rows, cols) the user's label stack (non-zero only on ``painted_indices``).
    """
    result = np.zeros_like(labels)
    painted_only = np.zeros_like(painted)
    painted_only[list(painted_indices)] = painted[list(painted_indices)]
    for value in np.unique(labels[labels != 0]):
        components, _ = ndimage.label(labels == value)
        linked = np.unique(components[(painted_only == value) & (components > 0)])
        result[np.isin(components, linked[linked > 0])] = value
    return result


@dataclass
class WalkStep:
    index: int  # slice written
    mean_probability: float  # decoder's mean foreground probability over the voxels written
    overlap: float  # Dice between this slice's mask and the previous slice's


@dataclass
class WalkReport:
    """What a walk did: the slices it wrote and why it stopped at each end (for confidence, see confidence.py)."""

    steps: list[WalkStep] = field(default_factory=list)
    # direction (-1, +1) -> (first slice not written, reason): "empty", "spread", "grew", "edge" or "painted"
    stops: dict[int, tuple[int, str]] = field(default_factory=dict)

    @property
    def written(self) -> list[int]:
        return [step.index for step in self.steps]


def walk_beyond_painted(
    result: np.ndarray,
    painted: np.ndarray,
    painted_indices: Sequence[int],
    value: int,
    probability: Callable[[int, int], np.ndarray],
    step_radius: int,
) -> WalkReport:
    """Extend label ``value`` slice by slice beyond its first and last painted slice.

    Each new slice keeps the voxels the decoder calls foreground that belong to a region touching the
    previous slice's mask and lie within ``step_radius`` voxels of it. The walk stops when nothing is left,
    when the touching region is more than twice what is kept (the decoder is outlining something larger
    than this structure can be there), when the cross-section grows by more than a quarter in one step,
    at the volume's edge, or at a painted slice (what the user painted there is final).

    Args:
        result: (N, rows, cols) label stack to write into (only background voxels are written).
        painted: (N, rows, cols) the user's labels; ``painted_indices`` the painted slices.
        probability: (slice index, direction) -> (rows, cols) foreground probability of ``value``;
            direction (+1/-1) lets the caller prefetch the next slices.
        step_radius: how far (voxels, in-plane) a boundary may move from one slice to the next.
    Returns:
        The slices written, with the decoder's certainty on each, and where and why each end stopped.
    """
    painted_set = set(int(i) for i in painted_indices)
    with_value = [i for i in sorted(painted_set) if np.any(painted[i] == value)]
    report = WalkReport()
    if not with_value:
        return report
    structure = ndimage.generate_binary_structure(2, 1)
    for start, direction in ((with_value[0], -1), (with_value[-1], +1)):
        previous = painted[start] == value
        index = start + direction
        reason = "edge"
        while 0 <= index < result.shape[0]:
            if index in painted_set:
                reason = "painted"
                break
            probabilities = probability(index, direction)
            foreground = probabilities > 0.5
            regions, _ = ndimage.label(foreground)
            touching = np.unique(regions[foreground & ndimage.binary_dilation(previous, structure)])
            attached = np.isin(regions, touching[touching > 0])
            current = attached & ndimage.binary_dilation(previous, structure, iterations=step_radius)
            # Stop where the decoder no longer outlines this structure: nothing attached, or the attached
            # region spreads far beyond where the structure can be (it has run into look-alike neighbours).
            # Beyond its painted range a structure tapers to its end: a cross-section that suddenly grows
            # has walked into a neighbour that touches it (femoral head into the hip bone).
            reason = ("empty" if not current.any() else "spread" if attached.sum() > 2 * current.sum()
                      else "grew" if current.sum() > 1.25 * previous.sum() else None)
            if reason:
                break
            result[index][current & (result[index] == 0)] = value
            overlap = 2 * float((current & previous).sum()) / float(current.sum() + previous.sum())
            report.steps.append(WalkStep(index, float(probabilities[current].mean()), overlap))
            previous = current
            index += direction
            reason = "edge"
        report.stops[direction] = (index, reason)
    return report
