"""Slice <-> model space: the mapping and its inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SAMFewshotLib.slice_transform import SliceTransform


@pytest.mark.parametrize(("shape", "spacing"), [((101, 122), (3.0, 3.0)), ((48, 122), (3.0, 0.8)), ((300, 90), (1.0, 1.0))])
def test_mask_round_trip_through_model_space(shape, spacing):
    transform = SliceTransform(shape, spacing, 256)
    rows, cols = np.indices(shape)
    mask = ((rows - shape[0] / 2) ** 2 / (shape[0] / 4) ** 2 + (cols - shape[1] / 2) ** 2 / (shape[1] / 4) ** 2) <= 1
    model = transform.mask_to_model(torch.from_numpy(mask[None].astype(np.float32)))
    assert model.shape == (1, 1, 256, 256)
    logits = model * 2 - 1  # > 0 inside
    back = transform.model_to_slice(logits)[0, 0].numpy() > 0
    overlap = 2 * np.logical_and(back, mask).sum() / (back.sum() + mask.sum())
    assert overlap > 0.97


def test_physical_aspect_is_kept_and_padding_is_bottom_right():
    transform = SliceTransform((48, 122), (1.5, 0.8), 256)
    rows, cols = transform.resized_shape
    assert cols == 256
    assert rows / cols == pytest.approx(48 * 1.5 / (122 * 0.8), rel=0.02)
    image = transform.image_to_model(torch.ones(1, 48, 122))
    assert image[0, 0, : rows - 1, : cols - 1].min() > 0.99
    assert image[0, 0, rows + 1 :].abs().max() == 0


def test_low_resolution_logits_map_back_to_the_slice_grid():
    transform = SliceTransform((512, 512), (0.7, 0.7), 1024)
    logits = torch.zeros(2, 3, 256, 256)
    assert transform.model_to_slice(logits).shape == (2, 3, 512, 512)
