"""Registration-guided fill between painted slices: it follows the image where contour interpolation cannot."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy import ndimage

from conftest import SAMPLE_CT, SAMPLE_REFERENCE, dice
from SAMFewshotLib.baselines import fill_between_slices, spread_painted_slices
from SAMFewshotLib.errors import Cancelled
from SAMFewshotLib import registered_fill
from SAMFewshotLib.registered_fill import (GapFillCache, NormalisedSlices, fill_between_by_registration,
                                             redraw_beyond_painted, refine_lost_gap)
from SAMFewshotLib.volume_io import read_label_map, read_volume

SLICES, SIZE = 21, 64


def disk(center_row: float, center_col: float, radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:SIZE, :SIZE]
    return (rows - center_row) ** 2 + (cols - center_col) ** 2 <= radius**2


def curving_vessel() -> tuple[np.ndarray, np.ndarray]:
    """A bright disk that swings 12 voxels sideways and back between slice 0 and slice 20: painted at both
    ends it sits in the same place, so a shape-only interpolation keeps it still. Its edge is blurred as a
    scanner's partial volume blurs it, and the image is noisy."""
    truth = np.zeros((SLICES, SIZE, SIZE), bool)
    for z in range(SLICES):
        truth[z] = disk(32, 26 + 12 * np.sin(np.pi * z / (SLICES - 1)), 6)
    return scanned(truth, 1.5, seed=0), truth


def scanned(truth: np.ndarray, blur: float, seed: int) -> np.ndarray:
    """The image a scanner would give of ``truth``: bright inside, each slice's edges blurred over ``blur``
    pixels (partial volume), plus noise."""
    image = ndimage.gaussian_filter(100.0 * truth.astype(np.float32), (0, blur, blur))
    return image + np.random.default_rng(seed).normal(0.0, 5.0, image.shape).astype(np.float32)


def fill_from_ends(image: np.ndarray, truth: np.ndarray):
    """Paint the first and last slice of ``truth`` and fill between them by registration and by contour
    interpolation: (Dice of each on the slices between, the gap's report)."""
    last = truth.shape[0] - 1
    labels = np.zeros(truth.shape, np.uint8)
    labels[[0, last]] = truth[[0, last]]
    interpolated = fill_between_slices(labels, 0)
    filled, reports = fill_between_by_registration(image, labels, [0, last], interpolated)
    middle = slice(1, last)
    return dice(filled[middle] == 1, truth[middle]), dice(interpolated[middle] == 1, truth[middle]), reports[0]


def test_follows_a_structure_that_curves_between_painted_slices():
    image, truth = curving_vessel()
    painted = [0, SLICES - 1]
    labels = np.zeros(truth.shape, np.uint8)
    labels[painted] = truth[painted]
    interpolated = fill_between_slices(labels, 0)
    calls = []
    filled, reports = fill_between_by_registration(image, labels, painted,
                                                   lambda: calls.append(1) or interpolated)

    middle = slice(1, SLICES - 1)
    registered = dice(filled[middle] == 1, truth[middle])
    contour = dice(interpolated[middle] == 1, truth[middle])
    assert registered >= 0.85, f"registration-guided fill Dice {registered:.3f}"
    assert contour <= 0.6, f"contour interpolation should miss the swing, Dice {contour:.3f}"
    # the ends are identical, so copying wins there, but the chains keep hold of the disk all the way
    assert [r.registered for r in reports] == [True]
    assert reports[0].reach >= 0.85
    np.testing.assert_array_equal(filled[painted], labels[painted])
    assert calls == [], "no gap fell back, so contour interpolation (slow to load) should not have run"


def test_the_two_chains_registered_side_by_side_are_what_each_gives_alone():
    """A gap's chains run in two threads at once: each must come out as if it had run alone."""
    image, truth = curving_vessel()
    last = SLICES - 1
    intensities = NormalisedSlices(image)
    grid = registered_fill._RegistrationGrid([truth[0], truth[last]])
    region = grid.region(intensities, 0, last)
    for coarse_first, composed in ((False, False),) + registered_fill.RETRIES:
        chains = registered_fill._chains(grid, region, truth[0], truth[last], coarse_first, composed)
        for start, stop, painted, carried in ((0, last, truth[0], chains.up), (last, 0, truth[last], chains.down)):
            alone = registered_fill.carry_along(region, start, stop,
                                                grid.shrink(registered_fill.signed_distance(painted[grid.window])),
                                                coarse_first=coarse_first, composed=composed)
            assert sorted(alone) == sorted(carried)
            for index in alone:
                np.testing.assert_array_equal(carried[index], alone[index])
        assert chains.reach >= 0.5  # they carried the vessel, not nothing


def test_a_part_that_appears_inside_the_gap_is_kept_near_where_it_is_painted():
    """Painted below with one disk and above with two (as a vertebra's body appears above a slice holding only
    its posterior elements): the second disk appears on slice 3 and grows to full size by slice 5."""
    slices = 9
    truth = np.zeros((slices, SIZE, SIZE), bool)
    for z in range(slices):
        truth[z] = disk(20, 32, 6)
        if z >= 3:
            truth[z] |= disk(44, 32, min(9, 3 * (z - 2)))
    image = scanned(truth, 1.5, seed=0)
    labels = np.zeros(truth.shape, np.uint8)
    labels[[0, slices - 1]] = truth[[0, slices - 1]]
    interpolated = fill_between_slices(labels, 0)
    filled, reports = fill_between_by_registration(image, labels, [0, slices - 1], interpolated)

    middle, part = slice(1, slices - 1), np.zeros(truth.shape, bool)
    part[:, SIZE // 2:] = True  # the half of each slice where the second disk lies
    appearing = dice((filled == 1)[middle] & part[middle], truth[middle] & part[middle])
    overall, contour = dice(filled[middle] == 1, truth[middle]), dice(interpolated[middle] == 1, truth[middle])
    assert reports[0].registered
    # unclipped, the chain from slice 0 (no second disk) cut it down to 0.59
    assert appearing >= 0.9, f"the appearing disk: Dice {appearing:.3f}"
    assert overall >= 0.95 and overall >= contour + 0.05, f"{overall:.3f} vs contour {contour:.3f}"


def test_a_large_crop_is_registered_on_a_coarser_grid_and_mapped_back_in_place():
    # a large organ on fine slices (its crop exceeds MAX_SIDE pixels) that shifts sideways and back
    size = 200
    rows, cols = np.mgrid[:size, :size]
    truth = np.zeros((SLICES, size, size), bool)
    for z in range(SLICES):
        truth[z] = (rows - 100) ** 2 + (cols - 95 - 8 * np.sin(np.pi * z / (SLICES - 1))) ** 2 <= 60**2
    registered, contour, report = fill_from_ends(scanned(truth, 2.0, seed=1), truth)
    print(f"registered {registered:.3f}, contour {contour:.3f}")
    assert report.registered
    assert registered >= 0.97 and registered >= contour + 0.02, f"{registered:.3f} vs contour {contour:.3f}"


def test_slices_with_coarse_pixels_are_registered_on_a_finer_grid():
    """The sample CT has 3 mm pixels: the spleen painted on 3 slices (the spread rule) is filled between them
    closer to the reference when the registration knows that and works on a grid twice as fine. Slices of 1 mm
    pixels keep their own grid, and a crop too large for ``MAX_SIDE`` is still shrunk."""
    image = read_volume(SAMPLE_CT)
    spleen = read_label_map(SAMPLE_REFERENCE, image).array == 2
    assert image.spacing == pytest.approx((3.0, 3.0, 3.0))
    painted = spread_painted_slices(spleen, 3, 0)
    labels = np.zeros(spleen.shape, np.uint8)
    labels[painted] = spleen[painted]
    between = [i for i in range(painted[0] + 1, painted[-1]) if i not in painted]
    interpolated = fill_between_slices(labels, 0)
    scores = {}
    for name, spacing in (("unknown", None), ("3 mm", (3.0, 3.0))):
        filled, _ = fill_between_by_registration(image.array, labels, painted, interpolated, pixel_spacing=spacing)
        scores[name] = dice(filled[between] == 1, spleen[between])
    print(scores)
    assert scores["3 mm"] >= 0.97 and scores["3 mm"] >= scores["unknown"] + 0.005, scores

    small, large = np.zeros((100, 100), bool), np.zeros((300, 300), bool)
    small[40:60, 40:60] = large[10:290, 10:290] = True
    grid = registered_fill._RegistrationGrid
    assert grid([small], (3.0, 3.0)).scale == 2.0
    assert grid([small], (1.0, 1.0)).scale == grid([small]).scale == 1.0
    assert grid([large], (3.0, 3.0)).scale == grid([large]).scale < 1.0


def test_a_thin_vessel_that_moves_further_than_its_width_per_slice_is_followed_coarse_to_fine(monkeypatch):
    """A vessel 7 voxels across that moves 6 voxels sideways from slice to slice (a thin vessel crossing thick
    slices obliquely), painted on the first and last of 7 slices. A demons step at full resolution sees too
    little overlap to follow it and the chains lose it (reach 0); registered again from a coarser grid first,
    where the step is 3 pixels, they keep hold of it."""
    slices = 7
    truth = np.zeros((slices, SIZE, SIZE), bool)
    for z in range(slices):
        truth[z] = disk(32, 14 + 6 * z, 3)
    image = scanned(truth, 1.0, seed=0)

    monkeypatch.setattr(registered_fill, "RETRY_BELOW", 0.0)  # full resolution only, as before 2026-12-05
    full_only, contour, full_report = fill_from_ends(image, truth)
    monkeypatch.undo()
    registered, _, report = fill_from_ends(image, truth)

    print(f"coarse-to-fine {registered:.3f} (reach {report.reach:.2f}), full resolution only {full_only:.3f} "
          f"(reach {full_report.reach:.2f}), contour {contour:.3f}")
    assert full_report.reach < 0.1 and report.reach >= 0.5, (full_report, report)
    assert registered >= 0.85 and registered >= full_only + 0.3, f"{registered:.3f} vs {full_only:.3f}"
    assert registered >= contour + 0.3


def test_a_thin_wall_that_drifts_over_a_long_gap_is_kept_by_composing_the_steps(monkeypatch):
    """A wall 3 voxels thick that drifts a quarter voxel sideways per slice over 31 slices, painted on the first
    and last. Each step of a chain resamples the last result, and over 30 linear resamplings the thin wall's
    signed distance blurs below zero: the chains arrive with almost nothing (reach below 0.2). Composing the
    steps' fields and warping the painted distance once keeps the wall to the far end."""
    slices, size = 31, 32
    rows, cols = np.mgrid[:size, :size]
    truth = np.stack([(np.abs(cols - (8 + 0.25 * z)) <= 1) & (rows > 4) & (rows < 28) for z in range(slices)])
    image = scanned(truth, 1.0, seed=0)

    monkeypatch.setattr(registered_fill, "RETRIES", ((True, False),))  # as before 2026-12-05 (mid-morning)
    resampled, contour, resampled_report = fill_from_ends(image, truth)
    monkeypatch.undo()
    composed, _, report = fill_from_ends(image, truth)

    print(f"composed {composed:.3f} (reach {report.reach:.2f}), resampled {resampled:.3f} "
          f"(reach {resampled_report.reach:.2f}), contour {contour:.3f}")
    assert resampled_report.reach < 0.2 and report.reach >= 0.8, (resampled_report, report)
    assert composed >= 0.95 and composed >= resampled + 0.05, f"{composed:.3f} vs {resampled:.3f}"
    assert composed >= contour + 0.5


def test_chains_that_lose_the_structure_on_the_way_still_fill_a_gap_between_unlike_masks(monkeypatch):
    """A disk that moves 16 voxels sideways between its painted slices and swings 24 further out and back on the
    way, faster than the demons follow: each chain loses it before the far painted slice (reach 0), and the
    painted masks do not overlap (copying one onto the other gives 0). Near its own painted slice each chain
    still follows the swing; contour interpolation, morphing one painted disk into the other, misses it. Until
    2026-12-04 such a gap fell back to contour interpolation. (Registered coarse to fine, the chains follow this
    disk, reach 0.83; full resolution only keeps the case of chains that lose the structure.)"""
    monkeypatch.setattr(registered_fill, "RETRY_BELOW", 0.0)
    slices = 9
    truth = np.zeros((slices, SIZE, SIZE), bool)
    for z in range(slices):
        along = z / (slices - 1)
        truth[z] = disk(32, 14 + 16 * along + 24 * np.sin(np.pi * along), 6)
    registered, contour, report = fill_from_ends(scanned(truth, 1.5, seed=0), truth)
    assert report.reach <= report.copy_dice < 0.5, report
    assert report.registered
    assert registered >= 0.5 and registered >= contour + 0.3, f"{registered:.3f} vs contour {contour:.3f}"


def test_a_gap_the_chains_lost_takes_its_border_from_the_intensities():
    """Where the chains lost hold of the structure, their masks can sit a few pixels off it. A bright disk painted
    on the first and last of 11 slices, and between them the disk 2 pixels to the side (as a drifting chain
    leaves it): the intensities inside and around the painted disks bring the border back."""
    truth = np.stack([disk(32, 30, 6) for _ in range(11)])
    image = scanned(truth, 1.0, seed=0)
    drifted = {z: np.roll(truth[z], 2, axis=1) for z in range(1, 10)}
    refined = refine_lost_gap(NormalisedSlices(image, (1.0, 1.0), 1.0), drifted, truth[0], truth[10], 0, 10)
    before = dice(np.stack([drifted[z] for z in range(1, 10)]), truth[1:10])
    after = dice(np.stack([refined[z] for z in range(1, 10)]), truth[1:10])
    assert sorted(refined) == list(range(1, 10))
    assert after >= 0.85 and after >= before + 0.07, f"{after:.3f} vs {before:.3f} as drifted"


def test_alike_painted_masks_are_interpolated_where_the_chains_lose_the_structure():
    """A straight tube in noise over 200 slices, painted at both ends: the 8 x 8 slices give the demons too
    little to hold on to over that many steps (reach 0), while the two painted masks are the same shape, so
    the gap keeps the contour interpolation and the tube is filled all the way."""
    rng = np.random.default_rng(7)
    image = rng.normal(0.0, 20.0, (200, 8, 8)).astype(np.float32)
    tube = np.zeros(image.shape, np.uint8)
    tube[:, 2:6, 2:6] = 1
    image[tube == 1] += 300.0
    labels = np.zeros_like(tube)
    labels[[0, -1]] = tube[[0, -1]]
    filled, reports = fill_between_by_registration(image, labels, [0, 199], lambda: fill_between_slices(labels, 0))
    assert reports[0].copy_dice == 1.0 and reports[0].reach <= 0.5, reports[0]
    assert not reports[0].registered
    assert dice(filled == 1, tube == 1) == 1.0


def test_falls_back_to_contour_interpolation_where_the_image_shows_nothing():
    # A blank image gives the registration nothing to follow: the chains carry each painted mask to the other
    # end unchanged, and the two painted masks differ, so the gap keeps the contour interpolation.
    labels = np.zeros((9, SIZE, SIZE), np.uint8)
    labels[0], labels[8] = disk(30, 24, 8), disk(34, 40, 5)
    interpolated = fill_between_slices(labels, 0)
    filled, reports = fill_between_by_registration(np.zeros(labels.shape, np.float32), labels, [0, 8],
                                                   lambda: interpolated)
    assert [r.registered for r in reports] == [False]
    np.testing.assert_array_equal(filled, interpolated)


def test_two_labels_keep_their_values_and_painted_slices_stay_as_painted():
    image, truth = curving_vessel()
    other = np.zeros_like(truth)
    other[:, 50:60, 8:20] = True  # a still box: label 2
    image += ndimage.gaussian_filter(50.0 * other.astype(np.float32), (0, 1.5, 1.5))
    painted = [0, 10, SLICES - 1]
    labels = np.zeros(truth.shape, np.uint8)
    labels[painted] = np.where(truth[painted], 1, np.where(other[painted], 2, 0))
    filled, reports = fill_between_by_registration(image, labels, painted, fill_between_slices(labels, 0))
    np.testing.assert_array_equal(filled[painted], labels[painted])
    assert sorted({r.label for r in reports}) == [1, 2] and len(reports) == 4
    unpainted = [i for i in range(SLICES) if i not in painted]
    assert dice(filled[unpainted] == 1, truth[unpainted]) >= 0.85
    assert dice(filled[unpainted] == 2, other[unpainted]) >= 0.9


def test_cancel_stops_before_the_next_gap():
    image, truth = curving_vessel()
    labels = np.zeros(truth.shape, np.uint8)
    labels[[0, 20]] = truth[[0, 20]]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        fill_between_by_registration(image, labels, [0, 20], fill_between_slices(labels, 0), cancel=cancel)


def test_walked_slices_are_redrawn_by_registration_from_the_painted_end():
    """Beyond the painted range a walk decided where the vessel goes but outlined it badly (too small, off
    centre, as SAM's box-prompted outline can be): registration from the painted mask redraws it there, only
    on the walked slices, and leaves another label alone."""
    image, truth = curving_vessel()
    painted, walked = [10], [11, 12, 13, 14, 15, 16]
    labels = np.zeros(truth.shape, np.uint8)
    labels[painted] = truth[painted]
    other = np.zeros(truth.shape[1:], bool)
    other[2:8, 2:8] = True  # a second label in the corner of every slice
    result = labels.copy()
    result[:, other] = 2
    for z in walked:
        row, col = ndimage.center_of_mass(truth[z])
        result[z][disk(row + 3, col - 3, 3)] = 1
    walk = dice(result[walked] == 1, truth[walked])

    redraw_beyond_painted(NormalisedSlices(image), result, labels, painted, 1, walked)

    redrawn = dice(result[walked] == 1, truth[walked])
    assert walk <= 0.5 and redrawn >= 0.85, f"walk's outline Dice {walk:.3f}, redrawn {redrawn:.3f}"
    np.testing.assert_array_equal(result[:, other], 2)
    elsewhere = [z for z in range(SLICES) if z not in walked + painted]
    assert not np.any(result[elsewhere] == 1)
    np.testing.assert_array_equal(result[painted][0][~other], labels[painted][0][~other])


def tapering_into_a_neighbour(areas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """A structure of ``areas[z]`` voxels on slice z (a disk), inside a neighbour of its own intensity: the image
    (the same bright square on every slice) shows no border for registration to follow."""
    truth = np.zeros((len(areas), SIZE, SIZE), bool)
    for z, area in enumerate(areas):
        if area > 0:
            truth[z] = disk(32, 32, np.sqrt(area / np.pi))
    square = np.zeros(truth.shape, bool)
    square[:, 4:60, 4:60] = True
    return ndimage.gaussian_filter(100.0 * square.astype(np.float32), (0, 1.5, 1.5)), truth


def test_beyond_the_painted_range_a_structure_goes_on_shrinking_as_it_shrank_between_its_outermost_painted_slices():
    """Where the image shows no border, registration carries the outermost painted mask on unchanged, as large
    as it was painted, past the structure's end (the left atrium's lower end in one MRI: 3000 voxels drawn on
    slices holding 1160 to none). Between its two outermost painted slices this structure shrank by 30 voxels
    a slice: on the walked slices it goes on shrinking at that rate, and the slices where that leaves nothing
    are emptied."""
    areas = [0.0, 0.0, 0.0] + [30.0 * z for z in range(1, 14)]  # 30, 60, ... voxels on slices 3, 4, ...
    image, truth = tapering_into_a_neighbour(areas)
    painted, walked = [9, 13], [8, 7, 6, 5, 4, 3, 2, 1]
    labels = np.zeros(truth.shape, np.uint8)
    labels[painted] = truth[painted]
    result = labels.copy()
    result[walked] = truth[9]  # what the walk wrote: the painted end's outline
    carried_unchanged = dice(result[walked] == 1, truth[walked])

    redraw_beyond_painted(NormalisedSlices(image), result, labels, painted, 1, walked)

    tapered = dice(result[walked] == 1, truth[walked])
    assert carried_unchanged < 0.75 and tapered > 0.9, f"unchanged {carried_unchanged:.3f}, tapered {tapered:.3f}"
    assert not np.any(result[1]), "the slices past where the taper ends must be emptied"
    assert np.sum(result[2]) < 0.05 * np.sum(truth[9])
    drawn = [int(np.sum(result[z] == 1)) for z in range(3, 10)]
    assert np.all(np.diff(drawn) >= 0) and drawn[0] < drawn[-1] / 4, f"areas on slices 3-9: {drawn}"


def test_beyond_the_painted_range_a_structure_that_widened_towards_its_end_is_not_shrunk():
    """A structure larger at its outermost painted slice than at the next one (the hip bone's wing) is drawn as
    registration carries it: the taper only ever takes away."""
    areas = [300.0 - 15.0 * z for z in range(16)]
    image, truth = tapering_into_a_neighbour(areas)
    painted, walked = [9, 13], [8, 7, 6]
    labels = np.zeros(truth.shape, np.uint8)
    labels[painted] = truth[painted]
    result = labels.copy()
    result[walked] = truth[9]

    redraw_beyond_painted(NormalisedSlices(image), result, labels, painted, 1, walked)

    for z in walked:
        assert abs(int(np.sum(result[z] == 1)) - int(truth[9].sum())) <= 0.1 * truth[9].sum()


def test_re_propagation_registers_only_the_gaps_a_correction_changed(monkeypatch):
    """The user paints one more slice in one gap and propagates again: the other gap comes from the cache,
    and the result is what a fill from scratch gives."""
    image, truth = curving_vessel()
    labels = np.zeros(truth.shape, np.uint8)
    labels[[0, 10, 20]] = truth[[0, 10, 20]]
    interpolated = fill_between_slices(labels, 0)
    registered = []
    original = registered_fill.fill_gap
    monkeypatch.setattr(registered_fill, "fill_gap", lambda *args: registered.append(args[3:5]) or original(*args))
    cache = GapFillCache(image)
    fill_between_by_registration(image, labels, [0, 10, 20], interpolated, cache=cache)
    assert registered == [(0, 10), (10, 20)]

    labels[15] = truth[15]  # one more slice painted
    registered.clear()
    again, _ = fill_between_by_registration(image, labels, [0, 10, 15, 20], interpolated, cache=cache)
    assert registered == [(10, 15), (15, 20)]
    fresh, _ = fill_between_by_registration(image, labels, [0, 10, 15, 20], interpolated)
    np.testing.assert_array_equal(again, fresh)
    assert dice(again[1:20] == 1, truth[1:20]) >= 0.85

    labels[10] = ndimage.binary_dilation(truth[10])  # a painted slice redrawn: both its gaps change
    registered.clear()
    fill_between_by_registration(image, labels, [0, 10, 15, 20], interpolated, cache=cache)
    assert registered == [(0, 10), (10, 15)]
    labels[10] = truth[10]  # and undone: only the latest fill's gaps were kept
    registered.clear()
    fill_between_by_registration(image, labels, [0, 10, 15, 20], interpolated, cache=cache)
    assert registered == [(0, 10), (10, 15)]
