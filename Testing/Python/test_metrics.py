"""Known-answer tests for SAMFewshotLib.metrics (Dice, IoU, HD95, ASSD in mm)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from SAMFewshotLib.metrics import assd, dice, evaluate, hd95, iou, remove_slices, surface_distances


def cube(shape, center, half) -> np.ndarray:
    """Solid axis-aligned cube of voxels with |index - center| <= half on every axis."""
    grid = np.indices(shape)
    return np.all([np.abs(grid[a] - center[a]) <= half for a in range(3)], axis=0)


def surface_points(mask: np.ndarray) -> np.ndarray:
    """Voxel indices of the mask's surface, by brute force: any 6-neighbour outside the mask or the array."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    has_background_neighbour = np.zeros_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            has_background_neighbour |= ~np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(inner & has_background_neighbour)


def brute_force_distances(pred, ref, spacing):
    a = surface_points(pred) * np.asarray(spacing)
    b = surface_points(ref) * np.asarray(spacing)
    d = cdist(a, b)
    return d.min(axis=1), d.min(axis=0)


# --- overlap -------------------------------------------------------------------------------------------------


def test_dice_iou_known_counts():
    ref = np.zeros((4, 5, 6), bool)
    pred = np.zeros_like(ref)
    ref[0, 0, :4] = True  # 4 voxels
    pred[0, 0, 2:6] = True  # 4 voxels, 2 shared
    assert dice(pred, ref) == pytest.approx(2 * 2 / 8)
    assert iou(pred, ref) == pytest.approx(2 / 6)
    assert dice(ref, ref) == 1.0 and iou(ref, ref) == 1.0
    # non-boolean inputs: any non-zero voxel is foreground
    assert dice(pred.astype(np.uint8) * 7, ref.astype(np.int16)) == pytest.approx(0.5)


def test_concentric_cubes_overlap():
    shape = (31, 31, 31)
    ref = cube(shape, (15, 15, 15), 10)  # 21^3
    pred = cube(shape, (15, 15, 15), 5)  # 11^3, inside ref
    assert dice(pred, ref) == pytest.approx(2 * 11**3 / (11**3 + 21**3))
    assert iou(pred, ref) == pytest.approx(11**3 / 21**3)


# --- surface distances ----------------------------------------------------------------------------------------


def test_concentric_cubes_isotropic_exact():
    """Inner cube half-size 5, outer 10, 2 mm voxels: every inner-surface voxel is 5 voxels from the outer one."""
    shape = (31, 31, 31)
    ref = cube(shape, (15, 15, 15), 10)
    pred = cube(shape, (15, 15, 15), 5)
    spacing = (2.0, 2.0, 2.0)
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    assert to_ref.size == 11**3 - 9**3 and to_pred.size == 21**3 - 19**3
    np.testing.assert_allclose(to_ref, 10.0)  # 5 voxels * 2 mm, for every inner surface voxel
    # outer surface voxel q: distance to the inner solid cube = |max(|q| - 5, 0)| * 2 mm
    q = surface_points(ref) - 15
    expected = 2.0 * np.linalg.norm(np.maximum(np.abs(q) - 5, 0), axis=1)
    np.testing.assert_allclose(np.sort(to_pred), np.sort(expected))
    pooled = np.concatenate([to_ref, to_pred])
    assert assd(pred, ref, spacing) == pytest.approx(pooled.mean())
    assert hd95(pred, ref, spacing) == pytest.approx(np.percentile(pooled, 95))
    # symmetric
    assert assd(ref, pred, spacing) == pytest.approx(assd(pred, ref, spacing))
    assert hd95(ref, pred, spacing) == pytest.approx(hd95(pred, ref, spacing))


def test_concentric_cubes_anisotropic_exact():
    """Anisotropic spacing (numpy order K, J, I): distances follow each axis's voxel size."""
    shape = (31, 31, 31)
    ref = cube(shape, (15, 15, 15), 10)
    pred = cube(shape, (15, 15, 15), 5)
    spacing = np.array([3.0, 1.0, 0.5])
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    # inner surface voxel p: nearest outer face along the axis with the smallest (10 - |p_a|) * s_a
    p = surface_points(pred) - 15
    expected_to_ref = np.min((10 - np.abs(p)) * spacing, axis=1)
    np.testing.assert_allclose(np.sort(to_ref), np.sort(expected_to_ref))
    q = surface_points(ref) - 15
    expected_to_pred = np.linalg.norm(np.maximum(np.abs(q) - 5, 0) * spacing, axis=1)
    np.testing.assert_allclose(np.sort(to_pred), np.sort(expected_to_pred))
    # the smallest inner->outer distance is 5 voxels along the 0.5 mm axis, the largest 5 * 3 mm
    assert to_ref.min() == pytest.approx(2.5)
    assert to_ref.max() == pytest.approx(5.0)  # (10-5)*1.0 beats 5*3.0 for a face voxel of the K axis
    pooled = np.concatenate([expected_to_ref, expected_to_pred])
    assert assd(pred, ref, spacing) == pytest.approx(pooled.mean())
    assert hd95(pred, ref, spacing) == pytest.approx(np.percentile(pooled, 95))


def test_shifted_cube_axis_order_matters():
    """A cube moved 2 slices along numpy axis 0 with 4 mm slices: the far faces are 8 mm apart."""
    shape = (20, 20, 20)
    ref = cube(shape, (8, 10, 10), 4)
    pred = cube(shape, (10, 10, 10), 4)
    to_ref, to_pred = surface_distances(pred, ref, (4.0, 1.0, 1.0))
    assert max(to_ref.max(), to_pred.max()) == pytest.approx(8.0)
    # same shift with the thick axis elsewhere: 2 voxels of 1 mm
    to_ref, to_pred = surface_distances(pred, ref, (1.0, 4.0, 4.0))
    assert max(to_ref.max(), to_pred.max()) == pytest.approx(2.0)


def test_matches_brute_force_on_random_shapes():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    for trial in range(3):
        shape = (12, 14, 10)
        pred = ndimage.binary_opening(rng.random(shape) > 0.45) | (rng.random(shape) > 0.97)
        ref = ndimage.binary_closing(rng.random(shape) > 0.5)
        pred[0] = True  # a face on the array border must count as surface
        spacing = (2.5, 0.8, 1.3)
        a, b = brute_force_distances(pred, ref, spacing)
        to_ref, to_pred = surface_distances(pred, ref, spacing)
        np.testing.assert_allclose(np.sort(to_ref), np.sort(a), atol=1e-9)
        np.testing.assert_allclose(np.sort(to_pred), np.sort(b), atol=1e-9)
        pooled = np.concatenate([a, b])
        assert assd(pred, ref, spacing) == pytest.approx(pooled.mean())
        assert hd95(pred, ref, spacing) == pytest.approx(np.percentile(pooled, 95))


def test_sphere_shells_assd_close_to_radius_difference():
    shape = (41, 41, 41)
    grid = np.indices(shape) - 20
    r = np.sqrt((grid**2).sum(axis=0))
    ref = r <= 15
    pred = r <= 10
    value = assd(pred, ref, (1.0, 1.0, 1.0))
    assert 4.0 < value < 6.0  # 5 mm apart, up to voxelisation
    assert 4.0 < hd95(pred, ref, (1.0, 1.0, 1.0)) < 6.5


def test_identical_masks_zero_distance():
    mask = cube((10, 10, 10), (5, 5, 5), 3)
    assert hd95(mask, mask, (1, 2, 3)) == 0.0
    assert assd(mask, mask, (1, 2, 3)) == 0.0


# --- empty masks ----------------------------------------------------------------------------------------------


def test_empty_conventions():
    empty = np.zeros((5, 5, 5), bool)
    full = cube((5, 5, 5), (2, 2, 2), 1)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert hd95(empty, empty, (1, 1, 1)) == 0.0 and assd(empty, empty, (1, 1, 1)) == 0.0
    for pred, ref in ((empty, full), (full, empty)):
        assert dice(pred, ref) == 0.0 and iou(pred, ref) == 0.0
        assert math.isinf(hd95(pred, ref, (1, 1, 1))) and math.isinf(assd(pred, ref, (1, 1, 1)))
        result = evaluate(pred, ref, (1, 1, 1))
        assert result["dice"] == 0.0 and math.isinf(result["hd95"]) and math.isinf(result["assd"])
    assert surface_distances(empty, full, (1, 1, 1)) is None


def test_bad_inputs():
    a = np.zeros((3, 3, 3), bool)
    with pytest.raises(ValueError):
        dice(a, np.zeros((3, 3, 4), bool))
    with pytest.raises(ValueError):
        hd95(a, a, (1, 1))
    with pytest.raises(ValueError):
        assd(a, a, (1, 0, 1))
    with pytest.raises(ValueError):
        dice(np.zeros((3, 3)), np.zeros((3, 3)))


# --- evaluate -------------------------------------------------------------------------------------------------


def test_evaluate_excludes_slices():
    ref = cube((12, 12, 12), (6, 6, 6), 4)
    pred = ref.copy()
    pred[3] = False  # wrong on slice 3 of axis 0 only
    pred[:, 9] = True  # and on slice 9 of axis 1
    full = evaluate(pred, ref, (2.0, 1.0, 1.0))
    assert full["dice"] < 1.0
    assert evaluate(pred, ref, (2.0, 1.0, 1.0), slice_axis=0, exclude_slices=[3])["dice"] < 1.0
    clean = evaluate(pred, ref, (2.0, 1.0, 1.0), slice_axis=1, exclude_slices=[9])
    assert clean["dice"] < 1.0  # slice 3 of axis 0 still wrong
    pred2 = ref.copy()
    pred2[3] = 1 - ref[3]
    result = evaluate(pred2, ref, (2.0, 1.0, 1.0), slice_axis=0, exclude_slices=(3,))
    assert result["dice"] == 1.0 and result["iou"] == 1.0 and result["hd95"] == 0.0 and result["assd"] == 0.0
    assert result["ref_voxels"] == ref.sum() - ref[3].sum()
    assert set(result) >= {"dice", "iou", "hd95", "assd"}
    # all four computed like the standalone functions on the reduced volume
    reduced_p, reduced_r = np.delete(pred, [3, 5], axis=0), np.delete(ref, [3, 5], axis=0)
    result = evaluate(pred, ref, (2.0, 1.0, 1.0), slice_axis=0, exclude_slices=[5, 3, 3])
    assert result["dice"] == pytest.approx(dice(reduced_p, reduced_r))
    assert result["iou"] == pytest.approx(iou(reduced_p, reduced_r))
    assert result["hd95"] == pytest.approx(hd95(reduced_p, reduced_r, (2.0, 1.0, 1.0)))
    assert result["assd"] == pytest.approx(assd(reduced_p, reduced_r, (2.0, 1.0, 1.0)))


def test_remove_slices_checks_range():
    a = np.zeros((4, 5, 6))
    assert remove_slices(a, 2, [0, 5]).shape == (4, 5, 4)
    assert remove_slices(a, None, [1]).shape == a.shape
    with pytest.raises(ValueError):
        remove_slices(a, 0, [4])


def test_speed_large_volume():
    """A large structure (40 x 300 x 260 voxels) in a 512 x 512 x 60 volume scores in a few seconds at most."""
    import time

    shape = (60, 512, 512)
    ref = np.zeros(shape, bool)
    ref[10:50, 100:400, 120:380] = True
    pred = np.roll(ref, 3, axis=2)
    start = time.perf_counter()
    result = evaluate(pred, ref, (2.5, 0.7, 0.7), slice_axis=0, exclude_slices=[20, 30, 40])
    assert time.perf_counter() - start < 8.0
    assert result["hd95"] == pytest.approx(2.1)  # 3 voxels * 0.7 mm shift
