"""Per-slice confidence and the suggested next slice: synthetic stacks for the rules, the sample CT for the
ranking a user relies on (weak slices really are the worse ones)."""

from __future__ import annotations

import json

import numpy as np
from scipy.stats import spearmanr

from conftest import PAINTED_SLICES, dice
from SAMFewshotLib.confidence import label_confidence, per_slice, suggest_slice, write_report
from SAMFewshotLib.registered_fill import GapReport
from SAMFewshotLib.spatial import WalkReport, WalkStep


def disc(radius: float, centre=(20, 20), shape=(40, 40)) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def stacks(painted_radii: dict[int, float], count: int = 21):
    painted = np.zeros((count, 40, 40), np.uint8)
    for index, radius in painted_radii.items():
        painted[index] = disc(radius)
    return painted


def test_interpolated_slices_are_least_sure_midway_where_the_painted_shapes_differ():
    painted = stacks({0: 10, 10: 10, 20: 4})  # steady from 0 to 10, shrinking fast from 10 to 20
    result = painted.copy()
    for index in range(1, 20):
        if index not in (10,):
            result[index] = disc(10 if index < 10 else 10 - 0.6 * (index - 10))
    confidence = {c.index: c for c in label_confidence(result, painted, [0, 10, 20], 1)}
    assert confidence[10].kind == "painted" and confidence[10].confidence == 1.0
    assert confidence[15].kind == "interpolated"
    assert confidence[15].confidence < confidence[12].confidence < confidence[11].confidence
    assert confidence[5].confidence > confidence[15].confidence  # same shapes at both ends: safe
    assert confidence[5].expected_error == 0.0
    assert 13 <= suggest_slice(list(confidence.values())) <= 16  # the middle of the changing gap


def test_walk_confidence_follows_the_decoder_and_an_end_that_grew_is_uncertain():
    painted = stacks({5: 8, 15: 8})
    result = painted.copy()
    for index in range(6, 15):
        result[index] = disc(8)
    result[16], result[17] = disc(7), disc(6)
    result[4], result[3] = disc(4), disc(2)  # tapering to its end below
    walk = WalkReport(steps=[WalkStep(16, 0.95, 0.9), WalkStep(17, 0.6, 0.9), WalkStep(4, 0.9, 0.6),
                             WalkStep(3, 0.9, 0.6)],
                      stops={-1: (2, "empty"), +1: (18, "grew")})
    confidence = {c.index: c for c in label_confidence(result, painted, [5, 15], 1, walk)}
    assert confidence[16].kind == confidence[17].kind == "walked"
    assert confidence[17].confidence < confidence[16].confidence  # the decoder was less sure there
    assert confidence[18].kind == "end" and confidence[18].uncertain_end
    # the decoder saw nothing more where the structure had tapered: a likely end
    assert confidence[2].kind == "end" and not confidence[2].uncertain_end
    # the doubt about where the structure ends fades slice by slice past the end
    assert confidence[2].confidence < confidence[1].confidence < confidence[0].confidence < 1.0
    assert confidence[18].confidence < confidence[19].confidence < confidence[20].confidence
    assert confidence[19].expected_error > confidence[1].expected_error > 0.0


def test_a_structure_seen_no_further_than_a_full_cross_section_has_uncertain_ends():
    painted = stacks({5: 8, 10: 8})
    result = painted.copy()
    for index in range(6, 10):
        result[index] = disc(8)
    walk = WalkReport(stops={-1: (4, "empty"), +1: (11, "empty")})  # the decoder did not recognise it
    confidence = {c.index: c for c in label_confidence(result, painted, [5, 10], 1, walk)}
    assert confidence[4].uncertain_end and confidence[11].uncertain_end
    assert suggest_slice(list(confidence.values())) not in range(5, 11)  # look past an end, not between


def test_a_walk_that_loses_the_structure_puts_the_lost_area_at_stake():
    painted = stacks({5: 8, 10: 8})
    result = painted.copy()
    for index in range(6, 10):
        result[index] = disc(8)
    result[11] = disc(3)  # the walk kept a small part of a cross-section that was as large as the painted one
    walk = WalkReport(steps=[WalkStep(11, 0.6, 0.3)], stops={-1: (4, "empty"), +1: (12, "spread")})
    confidence = {c.index: c for c in label_confidence(result, painted, [5, 10], 1, walk)}
    assert confidence[11].expected_error > 0.5 * disc(8).sum()
    assert 11 <= suggest_slice(list(confidence.values())) <= 14  # check where the walk went wrong


def test_a_doubtful_drawn_slice_counts_what_it_may_draw_wrong_and_what_it_may_miss():
    # a registered gap a little less doubtful than the end past it (reach 0.6; the end grew): a wrong outline
    # costs the voxels it draws and those it misses, an end that may go on only the missed ones, so the gap
    # holds the more error and is where painting helps (the vertebra of the development CT, 2026-12-04)
    painted = stacks({2: 8, 12: 8}, count=20)
    result = painted.copy()
    result[3:12] = disc(8)
    gaps = [GapReport(1, 2, 12, reach=0.6, copy_dice=1.0, registered=True)]
    walk = WalkReport(stops={-1: (1, "edge"), +1: (13, "grew")})
    confidence = {c.index: c for c in label_confidence(result, painted, [2, 12], 1, walk, gaps)}
    middle = confidence[7]
    assert middle.kind == "interpolated"
    assert np.isclose(middle.expected_error, 0.4 * 2 * disc(8).sum())  # (1 - reach) midway, drawn + missed
    assert confidence[13].kind == "end" and confidence[13].expected_error <= 0.9 * disc(8).sum()
    assert 5 <= suggest_slice(list(confidence.values())) <= 9


def test_interpolation_of_a_moving_structure_is_trusted_when_its_shape_holds():
    painted = np.zeros((11, 40, 40), np.uint8)
    painted[0], painted[10] = disc(6, centre=(12, 12)), disc(6, centre=(26, 26))  # moved, same shape
    result = painted.copy()
    for index in range(1, 10):
        result[index] = disc(6, centre=(12 + 1.4 * index, 12 + 1.4 * index))
    confidence = {c.index: c for c in label_confidence(result, painted, [0, 10], 1)}
    assert confidence[5].expected_error == 0.0  # nothing for painting to fix there


def test_a_registered_gap_is_as_sure_as_its_registration_reached_the_other_painted_slice():
    painted = np.zeros((21, 40, 40), np.uint8)
    painted[0] = painted[10] = painted[20] = disc(6)  # same shape everywhere: interpolation alone looks sure
    result = painted.copy()
    result[1:20] = disc(6)
    gaps = [GapReport(1, 0, 10, reach=0.95, copy_dice=1.0, registered=True),
            GapReport(1, 10, 20, reach=0.55, copy_dice=1.0, registered=True)]
    confidence = {c.index: c for c in label_confidence(result, painted, [0, 10, 20], 1, gaps=gaps)}
    assert confidence[15].confidence < confidence[5].confidence < 1.0
    assert confidence[15].confidence < confidence[12].confidence  # least sure midway
    assert suggest_slice(list(confidence.values())) == 15
    # a gap registration gave up on keeps the contour-interpolation rule
    fallback = [GapReport(1, 10, 20, reach=0.2, copy_dice=1.0, registered=False)]
    plain = {c.index: c for c in label_confidence(result, painted, [0, 10, 20], 1, gaps=fallback)}
    assert plain[15].expected_error == 0.0


def test_the_suggestion_bisects_the_run_with_the_most_expected_error():
    # a short gap where the shape changes a lot (2..6) and a long one where it changes less (6..30):
    # the long gap holds more error in all, so its weighted middle is the slice to paint
    painted = stacks({2: 10, 6: 5, 30: 9}, count=33)
    result = painted.copy()
    for index in range(3, 30):
        if index != 6:
            result[index] = disc(10 - 1.25 * (index - 2) if index < 6 else 5 + (index - 6) / 6)
    confidence = {c.index: c for c in label_confidence(result, painted, [2, 6, 30], 1)}
    assert confidence[4].confidence < confidence[18].confidence  # the worst single slice is in the short gap
    assert 14 <= suggest_slice(list(confidence.values())) <= 22


def test_a_long_unsure_walk_is_checked_halfway_along():
    painted = stacks({2: 8, 6: 8}, count=30)
    result = painted.copy()
    for index in range(3, 6):
        result[index] = disc(8)
    steps = []
    for index in range(7, 25):
        result[index] = disc(8 - (index - 7) / 4)
        steps.append(WalkStep(index, 0.7, 0.8))
    walk = WalkReport(steps=steps, stops={-1: (1, "empty"), +1: (25, "grew")})
    suggestion = suggest_slice(label_confidence(result, painted, [2, 6], 1, walk))
    assert 11 <= suggestion <= 18  # inside the walk, not at its first or last slice


def walk_ending_in_doubt():
    """Painted on slices 2 and 22 of 60; the walk above went one slice and stopped, at a full cross-section,
    because the mask spread: the structure may go on for many slices."""
    painted = stacks({2: 8, 22: 8}, count=60)
    result = painted.copy()
    for index in range(3, 22):
        result[index] = disc(8)
    result[23] = disc(8)
    walk = WalkReport(steps=[WalkStep(23, 0.4, 0.95)], stops={-1: (1, "empty"), +1: (24, "spread")})
    return painted, result, walk


def test_past_an_uncertain_end_the_doubt_lasts_but_the_suggestion_stays_near_the_end():
    # the slices past the end must not look as sure as the interpolated ones; but what is worth painting is
    # the slice just past the end, where the structure most likely still is
    painted, result, walk = walk_ending_in_doubt()
    confidence = {c.index: c for c in label_confidence(result, painted, [2, 22], 1, walk)}
    interpolated = confidence[12].confidence
    assert all(confidence[index].confidence < interpolated for index in range(24, 34))
    assert 24 <= suggest_slice(list(confidence.values())) <= 28
    # a decoder adapted from two slices gives a walked slice it outlines well a probability under 0.5: that
    # is not a guess
    assert confidence[23].kind == "walked" and confidence[23].confidence > confidence[24].confidence


def test_a_likely_end_gives_way_to_a_gap_where_the_shape_changes():
    # below, the structure tapered to nothing and the walk saw it end; above, one long gap where the shape
    # changes, up to the last slice of the volume: painting the gap's middle gains more than looking again past
    # a likely end
    painted = stacks({6: 3, 20: 10}, count=21)
    result = painted.copy()
    for index in range(7, 20):
        result[index] = disc(3 + 0.5 * (index - 6))
    result[5], result[4] = disc(2), disc(1)
    walk = WalkReport(steps=[WalkStep(5, 0.9, 0.8), WalkStep(4, 0.9, 0.6)], stops={-1: (3, "empty")})
    confidence = label_confidence(result, painted, [6, 20], 1, walk)
    assert 10 <= suggest_slice(confidence) <= 16


def test_report_lists_every_slice_and_the_suggestion(tmp_path):
    painted = stacks({0: 10, 20: 5})
    result = painted.copy()
    for index in range(1, 20):
        result[index] = disc(10 - index / 4)
    confidence = label_confidence(result, painted, [0, 20], 1)
    suggestion = suggest_slice(confidence)
    assert 8 <= suggestion <= 11  # midway, a little towards the larger cross-sections where more is at stake
    report = json.loads(write_report(tmp_path / "r.json", confidence, "axial", suggestion, {1: "liver"}).read_text())
    assert report["suggested_slice"] == suggestion and report["axis"] == "axial"
    assert len(report["slices"]) == 21 and report["slices"][0]["name"] == "liver"
    table = write_report(tmp_path / "r.csv", confidence, "axial", suggestion).read_text().splitlines()
    assert len(table) == 22 and table[0].startswith("index,label,confidence")


def test_low_confidence_slices_of_the_sample_are_the_worse_ones(sample_result, sample_reference):
    assert sample_result.confidence is not None
    lowest = per_slice(sample_result.confidence)
    assert set(lowest) == set(range(sample_result.labels.shape[0]))
    scored = []  # (confidence, Dice) per label and unpainted slice where the label is predicted or true
    for item in sample_result.confidence:
        reference = sample_reference[item.index] == item.label
        labels = sample_result.labels[item.index] == item.label
        if item.index in PAINTED_SLICES or not (reference.any() or labels.any()):
            continue
        scored.append((item.confidence, dice(labels, reference)))
    confidence, slice_dice = np.array(scored).T
    rho = spearmanr(confidence, slice_dice).statistic
    # 0.63 before the finer registration grid (2026-12-05), 0.45 with it: it lifted the weakest filled slices
    # (the spleen's slices 19-21, Dice 0.80 -> 0.85) and so narrowed the spread the ranking is measured on
    assert rho >= 0.4, f"Spearman correlation of confidence and slice Dice {rho:.2f}"
    suggestion = sample_result.suggested_slice
    assert suggestion is not None and suggestion not in PAINTED_SLICES
    # painting a slice settles the stretch between the painted slices around it: the suggestion must be in a
    # stretch holding at least three quarters of the most wrong voxels that any stretch holds, liver and spleen
    # together. Here three stretches of six do (36-42: 1143, 44-47: 914, 28-34: 888; the others 584, 112 and
    # 105; before the registration fill clipped its outside distances, the top two held 1130 and 992). A
    # suggestion in one of the three stretches the method gets more right (0-9, 11-17, 19-26) fails.
    wrong = (sample_result.labels != sample_reference).sum(axis=(1, 2))
    bounds = [-1, *PAINTED_SLICES, sample_result.labels.shape[0]]
    stretches = [range(a + 1, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1]
    most = max(wrong[list(stretch)].sum() for stretch in stretches)
    worst = [stretch for stretch in stretches if wrong[list(stretch)].sum() >= 0.75 * most]
    assert any(suggestion in stretch for stretch in worst), (
        f"slice {suggestion} suggested; most wrong voxels in {', '.join(f'{s.start}-{s.stop - 1}' for s in worst)}")


def test_a_slice_checked_empty_ends_the_doubt_and_the_suggestion_stays_before_it():
    # the same uncertain end, but the user checked slice 27 and found nothing there: the structure's end lies
    # between the walk's end and that slice, so no doubt goes past it
    painted, result, walk = walk_ending_in_doubt()
    confidence = {c.index: c for c in label_confidence(result, painted, [2, 22, 27], 1, walk)}
    assert confidence[27].kind == "painted" and confidence[27].confidence == 1.0
    assert confidence[24].kind == "end" and confidence[24].confidence < 0.5
    assert all(confidence[index].kind == "outside" and confidence[index].confidence == 1.0
               for index in range(28, 40))
    assert 24 <= suggest_slice(list(confidence.values())) <= 26
