"""Tests for SAMFewshotLib.baselines: painting rule, slice axis, nearest-slice copy, Fill-between (ITK)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAMFewshotLib.baselines import (
    fill_between_slices,
    nearest_painted_slice,
    painted_slice_indices,
    slice_axis_for,
    spread_painted_slices,
)
from SAMFewshotLib.metrics import dice

DATA = Path(__file__).resolve().parents[1] / "Data"
PAINTED_LIVER_SLICES = [10, 18, 27, 35, 43]
# ITK's SWIG wrappers warn by the hundred while they load; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:builtin type swig:DeprecationWarning")


@pytest.fixture(scope="module")
def sample():
    reference = sitk.ReadImage(str(DATA / "sample_ct_reference.nii.gz"))
    painted = sitk.ReadImage(str(DATA / "sample_ct_painted.nii.gz"))
    return sitk.GetArrayFromImage(reference), sitk.GetArrayFromImage(painted), reference.GetSpacing()


def paint(mask: np.ndarray, slices, axis: int) -> np.ndarray:
    """Keep only the given slices of ``mask`` along ``axis``."""
    out = np.zeros_like(mask)
    index = [slice(None)] * 3
    for s in slices:
        index[axis] = s
        out[tuple(index)] = mask[tuple(index)]
    return out


# --- painting rule and slice axis -----------------------------------------------------------------------------


def test_spread_rule_matches_sample_painting(sample):
    reference, painted, spacing = sample
    axis = slice_axis_for(spacing)
    assert axis == 0  # 3 mm isotropic: tie goes to numpy axis 0
    assert spread_painted_slices(reference == 1, 5, axis) == PAINTED_LIVER_SLICES
    assert painted_slice_indices(painted, axis).tolist() == PAINTED_LIVER_SLICES


def test_spread_rule_formula():
    mask = np.zeros((40, 4, 4), np.uint8)
    occ = [3, 4, 5, 7, 8, 11, 12, 13, 20, 21, 30]  # n = 11, irregular
    mask[occ, 1, 1] = 1
    for k in (1, 3, 5, 10):
        expected = sorted({occ[int(np.floor((i + 0.5) * len(occ) / k))] for i in range(k)})
        assert spread_painted_slices(mask, k, 0) == expected
    # occ[1], occ[5], occ[9]: floor(1.83), floor(5.5), floor(9.17)
    assert spread_painted_slices(mask, 3, 0) == [4, 11, 21]
    assert spread_painted_slices(mask, 11, 0) == occ  # k = n: every slice
    assert spread_painted_slices(mask, 20, 0) == occ  # k > n: repeats removed
    # the rule runs along the axis asked for
    assert spread_painted_slices(np.moveaxis(mask, 0, 2), 3, 2) == [4, 11, 21]
    assert spread_painted_slices(np.zeros((3, 3, 3)), 5, 0) == []
    with pytest.raises(ValueError):
        spread_painted_slices(mask, 0, 0)


def test_slice_axis_for():
    assert slice_axis_for((0.7, 0.7, 5.0)) == 0  # ITK (I, J, K): thick K -> numpy axis 0
    assert slice_axis_for((5.0, 0.7, 0.7)) == 2  # thick I -> numpy axis 2
    assert slice_axis_for((1.0, 2.0, 1.0)) == 1
    assert slice_axis_for((3.0, 3.0, 3.0)) == 0  # tie -> numpy axis 0
    assert slice_axis_for((2.0, 2.0, 1.0)) == 1  # tie between numpy axes 1 and 2 -> the lower
    assert slice_axis_for((5.0, 0.7, 0.7), order="numpy") == 0
    assert slice_axis_for((0.7, 0.7, 5.0), order="numpy") == 2


# --- nearest painted slice ------------------------------------------------------------------------------------


def test_nearest_painted_slice_known_answer():
    labels = np.zeros((3, 12, 5), np.uint8)  # painted along numpy axis 1
    labels[:, 2, 0] = 1
    labels[:, 7, 1] = 2
    labels[:, 10, 2] = 1
    out = nearest_painted_slice(labels, axis=1)
    for s in (0, 1, 11):  # outside the painted range: nothing
        assert not out[:, s].any()
    for s in (2, 7, 10):  # painted: unchanged
        np.testing.assert_array_equal(out[:, s], labels[:, s])
    for s, source in ((3, 2), (4, 2), (5, 7), (6, 7), (8, 7), (9, 10)):
        np.testing.assert_array_equal(out[:, s], labels[:, source])
    # exactly half-way (slice 4.5 does not exist; make one): painted 0 and 4 -> slice 2 copies slice 0
    labels = np.zeros((5, 2, 2), np.uint8)
    labels[0, 0, 0] = 1
    labels[4, 1, 1] = 1
    out = nearest_painted_slice(labels, 0)
    np.testing.assert_array_equal(out[2], labels[0])
    np.testing.assert_array_equal(out[3], labels[4])


# --- fill between slices (ITK morphological contour interpolation) --------------------------------------------


def test_fill_between_real_liver(sample):
    """Slicer's Fill-between on the 5 painted liver slices of the sample CT: Dice > 0.8 between them."""
    reference, painted, _ = sample
    liver = (reference == 1).astype(np.uint8)
    painted_liver = paint(liver, spread_painted_slices(liver, 5, 0), 0)
    filled = fill_between_slices(painted, axis=0)
    filled_liver_only = fill_between_slices(painted_liver, axis=0)

    inside = [s for s in range(PAINTED_LIVER_SLICES[0] + 1, PAINTED_LIVER_SLICES[-1]) if s not in PAINTED_LIVER_SLICES]
    score = dice(filled_liver_only[inside] == 1, reference[inside] == 1)
    assert score > 0.8, score
    assert dice(filled[inside] == 1, reference[inside] == 1) > 0.8
    # painted slices unchanged, nothing outside the painted range
    np.testing.assert_array_equal(filled[PAINTED_LIVER_SLICES], painted[PAINTED_LIVER_SLICES])
    assert not filled[: PAINTED_LIVER_SLICES[0]].any() and not filled[PAINTED_LIVER_SLICES[-1] + 1 :].any()
    assert set(np.unique(filled)) == {0, 1, 2}
    # it beats copying the nearest painted slice on this organ
    nearest = nearest_painted_slice(painted_liver, 0)
    assert score > dice(nearest[inside] == 1, reference[inside] == 1)


def test_pairwise_fill_between_fills_gaps_the_whole_stack_leaves_empty(sample):
    """Two adjacent painted slices after a gap: ITK's filter on the whole stack leaves the gap before them
    empty (liver painted on 6, 12 and 13; spleen on 18 and 27 beside 10, 28); pair by pair, each gap is
    filled as it would be with only its two painted slices."""
    reference, _, _ = sample
    for slices, value, gap in (([6, 12, 13], 1, range(7, 12)), ([10, 18, 27, 28], 2, range(19, 27))):
        painted = paint(reference, slices, 0)
        whole = fill_between_slices(painted, 0, crop=True)
        assert not (whole[gap] == value).any()  # the filter's quirk this option is there for
        pairwise = fill_between_slices(painted, 0, crop=True, pairwise=True)
        alone = fill_between_slices(paint(reference == value, [gap.start - 1, gap.stop], 0).astype(np.uint8), 0)
        np.testing.assert_array_equal(pairwise[gap] == value, alone[gap] == 1)
        assert dice(pairwise[gap] == value, reference[gap] == value) > 0.7
        np.testing.assert_array_equal(pairwise[slices], painted[slices])


def test_fill_between_synthetic_along_last_axis():
    """Two equal squares on slices 4 and 12 of numpy axis 2: every slice between gets the same square."""
    labels = np.zeros((20, 20, 16), np.uint8)
    labels[5:11, 6:12, 4] = 3
    labels[5:11, 6:12, 12] = 3
    out = fill_between_slices(labels, axis=2)
    for s in range(4, 13):
        np.testing.assert_array_equal(out[:, :, s], labels[:, :, 4])
    assert not out[:, :, :4].any() and not out[:, :, 13:].any()
    assert out.dtype == labels.dtype
    # ITK's own default (distance-transform median) gives the same square here
    np.testing.assert_array_equal(fill_between_slices(labels, axis=2, use_distance_transform=True), out)
    # a single painted slice has nothing to interpolate between
    single = np.zeros((5, 5, 5), np.uint8)
    single[2, 1:3, 1:3] = 1
    np.testing.assert_array_equal(fill_between_slices(single, 0), single)
