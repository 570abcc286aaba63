"""How much a walked mask must look like the painted structure: learnt from the filled slices between the
painted ones, and the cosine similarity it is measured with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SAMFewshotLib.adaptation import resemblance, target_embeddings
from SAMFewshotLib.prompt_propagation import RESEMBLANCE_MARGIN, resemblance_threshold


def stacks(painted_slices, count=21):
    painted = np.zeros((count, 8, 8), np.uint8)
    painted[list(painted_slices), 2:6, 2:6] = 1
    result = painted.copy()
    result[painted_slices[0]:painted_slices[-1] + 1, 2:6, 2:6] = 1  # filled between the painted slices
    return painted, result


def looks(values: dict[int, float], asked=None):
    def resemblance_of(index: int, mask: np.ndarray) -> float:
        if asked is not None:
            asked.append(index)
        assert mask.dtype == bool and mask[2:6, 2:6].all() and mask.sum() == 16  # the filled mask of that slice
        return values[index]
    return resemblance_of


def test_the_threshold_is_the_median_of_the_gap_middles_less_the_margin():
    painted, result = stacks([2, 10, 18, 20])
    asked = []
    threshold = resemblance_threshold(result, painted, [2, 10, 18, 20], 1, looks({6: 0.9, 14: 0.7, 19: 0.8}, asked))
    assert asked == [6, 14, 19]
    assert threshold == pytest.approx(0.8 - RESEMBLANCE_MARGIN)


def test_only_the_longest_gaps_are_asked_and_no_gap_refuses_nothing():
    painted, result = stacks([0, 2, 4, 6, 8, 20])
    asked = []
    resemblance_threshold(result, painted, [0, 2, 4, 6, 8, 20], 1, looks({1: .9, 3: .9, 5: .9, 7: .9, 14: .5}, asked))
    assert len(asked) == 3 and 14 in asked
    painted, result = stacks([3, 4])
    assert resemblance_threshold(result, painted, [3, 4], 1, looks({})) == -1.0


def test_resemblance_is_high_inside_the_structure_and_low_outside():
    generator = torch.Generator().manual_seed(0)
    inside, outside = torch.randn(256, generator=generator), torch.randn(256, generator=generator)
    embeddings = outside[None, :, None, None].repeat(1, 1, 64, 64)
    embeddings[:, :, 10:20, 10:20] = inside[:, None, None]
    structure = torch.zeros(1, 64, 64)
    structure[:, 10:20, 10:20] = 1
    prototype = target_embeddings(embeddings, structure)[0]
    assert resemblance(embeddings, structure, prototype) == pytest.approx(1.0, abs=1e-5)
    beside = torch.zeros(1, 64, 64)
    beside[:, 30:40, 30:40] = 1
    assert resemblance(embeddings, beside, prototype) < 0.3
    assert resemblance(embeddings, torch.zeros(1, 64, 64), prototype) == -1.0
