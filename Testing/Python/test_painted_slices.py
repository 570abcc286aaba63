"""Finding the painted axis and slices, whatever the orientation and painting pattern."""

from __future__ import annotations

import numpy as np
import pytest

from SAMFewshotLib.errors import InputError
from SAMFewshotLib.painted_slices import anatomical_name, find_painted_slices, numpy_axis_for

LPS_IDENTITY = np.eye(3)
SPACING = (1.0, 1.0, 1.0)


def ball(shape=(40, 40, 40), radius=12, centre=None):
    grid = np.indices(shape)
    centre = np.array(centre if centre is not None else [s // 2 for s in shape]).reshape(3, 1, 1, 1)
    return (np.sum((grid - centre) ** 2, axis=0) <= radius**2).astype(np.uint8)


def paint(mask, axis, indices):
    painted = np.zeros_like(mask)
    index = [slice(None)] * 3
    for i in indices:
        index[axis] = i
        painted[tuple(index)] = mask[tuple(index)]
    return painted


def test_sample_painting_is_found(sample_painted, sample_image):
    found = find_painted_slices(sample_painted, sample_image.spacing, sample_image.direction_matrix)
    assert (found.axis, found.axis_name, found.indices, found.label_values) == (0, "axial", (10, 18, 27, 35, 43), (1, 2))
    assert "5 painted axial slices" in found.describe()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_spread_slices_are_found_on_every_axis(axis):
    found = find_painted_slices(paint(ball(), axis, [10, 15, 20, 25, 30]), SPACING, LPS_IDENTITY)
    assert found.axis == axis
    assert found.indices == (10, 15, 20, 25, 30)


def test_many_spread_slices_on_a_small_structure_are_found():
    # 10 of 25 slices painted on a small structure: fewer slices than the structure is wide is not required.
    mask = ball(radius=12)
    found = find_painted_slices(paint(mask, 1, range(9, 32, 2)), SPACING, LPS_IDENTITY)
    assert found.axis == 1


def test_adjacent_slices_are_found_by_count():
    found = find_painted_slices(paint(ball(), 2, [19, 20, 21]), SPACING, LPS_IDENTITY)
    assert found.axis == 2 and found.indices == (19, 20, 21)


def test_slices_painted_on_two_axes_are_refused():
    mask = ball()
    painted = paint(mask, 0, [12, 20, 28]) | paint(mask, 1, [15, 25])
    with pytest.raises(InputError, match="more than one axis"):
        find_painted_slices(painted, SPACING, LPS_IDENTITY)


def test_single_pixel_uses_the_largest_spacing_axis():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[4, 5, 6] = 1
    assert find_painted_slices(labels, (1.0, 1.0, 3.0), LPS_IDENTITY).axis == 0
    assert find_painted_slices(labels, (3.0, 1.0, 1.0), LPS_IDENTITY).axis == 2


def test_empty_labels_are_refused():
    with pytest.raises(InputError, match="empty"):
        find_painted_slices(np.zeros((5, 5, 5), np.uint8), SPACING, LPS_IDENTITY)


def test_explicit_axis_name_follows_the_direction_matrix():
    # A volume stored with K along A-P (coronal slices in numpy axis 0).
    direction = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], float)  # columns: I->x, J->z, K->y
    assert anatomical_name(direction, 0) == "coronal"
    assert anatomical_name(direction, 1) == "axial"
    assert numpy_axis_for("axial", direction) == 1
    labels = paint(ball(), 1, [10, 20, 30])
    assert find_painted_slices(labels, SPACING, direction, axis="axial").axis == 1
    with pytest.raises(InputError, match="unknown axis"):
        find_painted_slices(labels, SPACING, direction, axis="oblique")


def test_two_axes_with_a_split_structure_are_refused():
    # Two separate blobs leave a gap along axis 2 in every view: that gap must not pass for painted slices.
    mask = ball(radius=6, centre=(20, 20, 10)) | ball(radius=6, centre=(20, 20, 30))
    painted = paint(mask, 0, [16, 20, 24]) | paint(mask, 1, [18, 22])
    with pytest.raises(InputError, match="more than one axis"):
        find_painted_slices(painted, SPACING, LPS_IDENTITY)


def test_spread_slices_of_a_split_structure_are_found():
    mask = ball(radius=6, centre=(20, 20, 10)) | ball(radius=6, centre=(20, 20, 30))
    assert find_painted_slices(paint(mask, 0, [15, 18, 21, 24]), SPACING, LPS_IDENTITY).axis == 0


def test_slices_checked_empty_are_kept_apart_from_the_painted_ones():
    painted = paint(ball(), 0, [14, 20, 26])
    found = find_painted_slices(painted, SPACING, LPS_IDENTITY, empty_slices=[39, 5, 5])
    assert found.indices == (14, 20, 26) and found.empty == (5, 39)
    assert found.settled == (5, 14, 20, 26, 39)
    assert "checked empty: 5, 39" in found.describe()


@pytest.mark.parametrize(("empty", "message"), [
    ([40], "outside the volume: it has 40"),
    ([-1], "outside the volume"),
    ([20], "marked empty but holds painted labels"),
    (["3"], "not a slice index"),
])
def test_a_wrong_empty_slice_is_refused_with_what_to_do(empty, message):
    painted = paint(ball(), 0, [14, 20, 26])
    with pytest.raises(InputError, match=message):
        find_painted_slices(painted, SPACING, LPS_IDENTITY, empty_slices=empty)
