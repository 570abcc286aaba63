"""Refining a roughly placed label map with the image's own intensities (``apply``'s atlas border)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dice
from scipy import ndimage

from SAMFewshotLib.label_refinement import refine_by_intensity
from SAMFewshotLib.volume_io import Volume


@pytest.mark.parametrize("misplaced", ["moved", "shrunk"])
def test_a_misplaced_border_goes_back_to_where_the_ct_shows_it(sample_image, sample_reference, misplaced):
    """What another patient's registration leaves: the organs moved 6 mm (2 voxels) along each axis, or 6 mm
    short of their border."""
    if misplaced == "moved":
        rough = np.roll(sample_reference, (0, 2, 2), (0, 1, 2))
    else:
        rough = sample_reference * ndimage.binary_erosion(sample_reference > 0, iterations=2)
    refined = refine_by_intensity(rough, sample_image)
    assert refined.dtype == rough.dtype
    for value in (1, 2):
        truth = sample_reference == value
        before, after = dice(rough == value, truth), dice(refined == value, truth)
        assert after >= before + 0.05, f"label {value}: {before:.3f} -> {after:.3f}"


def _ball_in_noise(radius: float, contrast: float) -> tuple[Volume, np.ndarray]:
    grid = np.indices((40, 40, 40)) - 19.5
    ball = (np.sqrt((grid**2).sum(0)) <= radius).astype(np.uint8)
    noise = np.random.default_rng(0).normal(0.0, 1.0, ball.shape)
    image = Volume(array=(noise + contrast * ball).astype(np.float32), spacing=(1.0, 1.0, 1.0),
                   origin=(0.0, 0.0, 0.0), direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image, ball


def test_a_structure_the_image_does_not_show_keeps_its_registered_mask():
    image, ball = _ball_in_noise(10.0, contrast=0.0)
    refined = refine_by_intensity(ball, image)
    assert dice(refined == 1, ball == 1) >= 0.95


def test_a_bright_structure_is_found_where_the_mask_misses_it():
    image, ball = _ball_in_noise(10.0, contrast=3.0)
    rough = np.roll(ball, 2, axis=0)  # a fifth of its radius off (the prior reaches about that far)
    refined = refine_by_intensity(rough, image)
    after, before = dice(refined == 1, ball == 1), dice(rough == 1, ball == 1)
    assert after >= 0.95 and after >= before + 0.1, f"{before:.3f} -> {after:.3f}"


def test_nothing_to_refine_is_left_as_it_is():
    image, ball = _ball_in_noise(10.0, contrast=3.0)
    empty = np.zeros_like(ball)
    assert not refine_by_intensity(empty, image).any()
    speck = np.zeros_like(ball)
    speck[20:23, 20:23, 20:23] = 4  # too few voxels for an intensity histogram
    np.testing.assert_array_equal(refine_by_intensity(speck, image), speck)
    beside = ball.copy()  # and a neighbour's refinement does not take it over
    beside[20:23, 20:23, 20:23] = 4
    assert (refine_by_intensity(beside, image)[20:23, 20:23, 20:23] == 4).all()
