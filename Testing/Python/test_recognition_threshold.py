"""How sure the decoder must be of a walked mask: the fixed threshold, lowered for a structure that the decoder
barely recognises even on the filled slices between the painted ones."""

from __future__ import annotations

import numpy as np

from SAMFewshotLib.prompt_propagation import MIN_RECOGNISED, RECOGNISED_SHARE, recognition_threshold


def stacks(painted_slices, count=21):
    painted = np.zeros((count, 8, 8), np.uint8)
    painted[list(painted_slices), 2:6, 2:6] = 1
    result = painted.copy()
    result[painted_slices[0]:painted_slices[-1] + 1, 2:6, 2:6] = 1  # filled between the painted slices
    return painted, result


def decoder(inside: float, outside: float = 0.0, asked=None):
    def probability(index: int, direction: int) -> np.ndarray:
        if asked is not None:
            asked.append((index, direction))
        out = np.full((8, 8), outside, np.float32)
        out[2:6, 2:6] = inside
        return out
    return probability


def test_a_structure_the_decoder_recognises_keeps_the_fixed_threshold():
    painted, result = stacks([2, 10, 18])
    assert recognition_threshold(result, painted, [2, 10, 18], 1, decoder(0.9)) == MIN_RECOGNISED


def test_a_structure_the_decoder_barely_recognises_between_painted_slices_lowers_it():
    painted, result = stacks([2, 10, 18])
    asked = []
    threshold = recognition_threshold(result, painted, [2, 10, 18], 1, decoder(0.04, asked=asked))
    assert threshold == RECOGNISED_SHARE * np.float32(0.04) < MIN_RECOGNISED
    assert asked == [(6, 0), (14, 0)]  # the middle of each gap, no slices ahead encoded


def test_only_the_longest_gaps_are_asked_and_no_gap_keeps_the_fixed_threshold():
    painted, result = stacks([0, 2, 4, 6, 8, 20])
    asked = []
    recognition_threshold(result, painted, [0, 2, 4, 6, 8, 20], 1, decoder(0.04, asked=asked))
    assert len(asked) == 3 and (14, 0) in asked
    painted, result = stacks([3, 4])
    assert recognition_threshold(result, painted, [3, 4], 1, decoder(0.01)) == MIN_RECOGNISED
