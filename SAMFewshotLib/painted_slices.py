"""Which slices the user painted, along which axis, and with which labels.

Axes here are numpy axes of the ``(K, J, I)`` array (0 = K). Anatomical names come from the volume's
direction matrix: the ITK axis whose direction is closest to L-R is sagittal, to P-A coronal, to I-S axial.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

AXIS_NAMES = ("sagittal", "coronal", "axial")  # indexed by the dominant LPS component (x, y, z)
MAX_LABELS = 255  # different label values in one painting (one decoder each, about a minute each on a CPU)


@dataclass(frozen=True)
class PaintedSlices:
    """The support set read off a sparse label map."""

    axis: int  # numpy axis of the slices
    axis_name: str  # "axial", "coronal" or "sagittal" (from the direction matrix)
    indices: tuple[int, ...]  # sorted slice indices along ``axis`` that hold any label
    label_values: tuple[int, ...]  # sorted non-zero label values found
    # slices the user checked and found without any of the labels ("nothing here"): final like painted ones
    empty: tuple[int, ...] = ()

    @property
    def settled(self) -> tuple[int, ...]:
        """Every slice the user decided: painted or checked empty, sorted."""
        return tuple(sorted(set(self.indices) | set(self.empty)))

    def describe(self) -> str:
        slices = ", ".join(str(i) for i in self.indices)
        labels = ", ".join(str(v) for v in self.label_values)
        text = f"{len(self.indices)} painted {self.axis_name} slices (array axis {self.axis}): {slices}; labels {labels}"
        if self.empty:
            text += f"; checked empty: {', '.join(str(i) for i in self.empty)}"
        return text


def anatomical_name(direction: np.ndarray, numpy_axis: int) -> str:
    """Anatomical name of the slices taken along ``numpy_axis`` (3x3 ITK direction matrix)."""
    column = np.asarray(direction, dtype=float).reshape(3, 3)[:, 2 - numpy_axis]
    return AXIS_NAMES[int(np.argmax(np.abs(column)))]


def numpy_axis_for(name: str, direction: np.ndarray) -> int:
    """The numpy axis whose slices are ``name`` ("axial", "coronal", "sagittal") for this direction matrix."""
    if name not in AXIS_NAMES:
        raise InputError(f"unknown axis '{name}'; use auto, axial, coronal or sagittal.")
    for axis in range(3):
        if anatomical_name(direction, axis) == name:
            return axis
    raise InputError(f"this volume is so oblique that no array axis is clearly {name}; choose another axis.")


def pixel_spacing(spacing_ijk: Sequence[float], axis: int) -> tuple[float, float]:
    """(row, col) spacing in mm of slices along numpy ``axis``; ``spacing_ijk`` is ITK order (I, J, K)."""
    by_numpy_axis = tuple(float(s) for s in spacing_ijk)[::-1]
    rows, cols = (a for a in range(3) if a != axis)
    return by_numpy_axis[rows], by_numpy_axis[cols]


def slice_spacing(spacing_ijk: Sequence[float], axis: int) -> float:
    """Spacing in mm between slices along numpy ``axis``; ``spacing_ijk`` is ITK order (I, J, K)."""
    return tuple(float(s) for s in spacing_ijk)[::-1][axis]


def default_slice_axis(spacing: tuple[float, float, float]) -> int:
    """The axis of largest voxel spacing; ties go to numpy axis 0 (the last ITK axis)."""
    spacing_by_numpy_axis = np.asarray(spacing, dtype=float)[::-1]
    return int(np.flatnonzero(spacing_by_numpy_axis >= spacing_by_numpy_axis.max() * (1 - 1e-6))[0])


def find_painted_slices(
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    direction: np.ndarray,
    axis: str | int = "auto",
    empty_slices: Sequence[int] = (),
) -> PaintedSlices:
    """Find the painted axis and slices of a sparse label map.

    With ``axis="auto"`` the painted axis is the one along which the labelled planes leave gaps (the
    slices between painted ones are empty), or failing that the one with clearly fewest labelled planes.
    ``empty_slices``: indices along that axis where the user checked that none of the labels is present; a
    label map cannot say so itself (an unpainted slice is empty too).
    Raises InputError when nothing is painted, the painting is not along a single axis, or an empty slice
    is outside the volume or holds labels.
    """
    if labels.ndim != 3:
        raise InputError(f"the label map is {labels.ndim}D; it must be a 3D volume like the image.")
    occupied = [np.flatnonzero(np.any(labels != 0, axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    if occupied[0].size == 0:
        raise InputError("the label map is empty: paint the structure on a few slices (non-zero labels) first.")
    values = np.unique(labels[labels != 0])
    if values.size > MAX_LABELS:  # e.g. the image given as its own label map: hours of fine-tuning otherwise
        raise InputError(
            f"the label map holds {values.size} different labels; one decoder is fine-tuned per label, so at most "
            f"{MAX_LABELS} are taken at a time. Is it an image rather than a painted label map?"
        )
    if isinstance(axis, str) and axis != "auto":
        chosen = numpy_axis_for(axis, direction)
    elif isinstance(axis, (int, np.integer)):  # numpy integers too: they are not ``int``, and were ignored
        chosen = int(axis)
        if not 0 <= chosen < 3:
            raise InputError(f"axis {axis} does not exist; give a numpy axis 0, 1 or 2, or auto, axial, coronal, "
                             "sagittal.")
    else:
        chosen = _detect_axis(occupied, spacing)
    indices = tuple(int(i) for i in occupied[chosen])
    name = anatomical_name(direction, chosen)
    return PaintedSlices(
        axis=chosen,
        axis_name=name,
        indices=indices,
        label_values=tuple(int(v) for v in values),
        empty=_checked_empty(empty_slices, indices, labels.shape[chosen], name),
    )


def _checked_empty(empty_slices: Sequence[int], painted: tuple[int, ...], count: int, axis_name: str
                   ) -> tuple[int, ...]:
    out = set()
    for index in empty_slices:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise InputError(f"empty slice {index!r} is not a slice index; give whole numbers from 0 to {count - 1}.")
        if not 0 <= int(index) < count:
            raise InputError(f"empty slice {index} is outside the volume: it has {count} {axis_name} slices "
                             f"(0 to {count - 1}).")
        if int(index) in painted:
            raise InputError(f"{axis_name} slice {index} is marked empty but holds painted labels; erase them there "
                             "or do not mark it empty.")
        out.add(int(index))
    return tuple(sorted(out))


def _detect_axis(occupied: list[np.ndarray], spacing: tuple[float, float, float]) -> int:
    counts = np.array([o.size for o in occupied])
    spans = np.array([o[-1] - o[0] + 1 for o in occupied])
    fill = counts / spans
    with_gaps = np.flatnonzero(fill < 1)
    if with_gaps.size:
        # Spread painting leaves empty slices between painted ones; a structure split in two (left and right
        # kidney) can leave a gap along another axis too, but a smaller one, and across far more planes.
        best = int(with_gaps[np.argmin(fill[with_gaps])])
        if counts[best] == counts.min():
            return best
    smallest = counts.min()
    candidates = np.flatnonzero(counts == smallest)
    if smallest == 1 or (len(candidates) == 1 and 2 * smallest <= np.sort(counts)[1]):
        if len(candidates) == 1:
            return int(candidates[0])
        preferred = default_slice_axis(spacing)
        return preferred if preferred in candidates else int(candidates[0])
    raise InputError(
        f"cannot tell which axis the slices were painted on (labelled planes per axis: {counts.tolist()}); "
        "the labels look painted on more than one axis, or on many adjacent slices. Paint on one axis only, "
        "or give the axis (--axis axial|coronal|sagittal)."
    )
