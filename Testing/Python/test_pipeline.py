"""End-to-end: the real LiteMedSAM weights on the real sample CT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PAINTED_SLICES, dice
from SAMFewshotLib.adapted_model import AdaptedModel
from SAMFewshotLib.errors import Cancelled, CheckpointError, InputError
from SAMFewshotLib.pipeline import apply_adapted_model, segment_volume, train_adapted_model


def unpainted(array: np.ndarray) -> np.ndarray:
    keep = [i for i in range(array.shape[0]) if i not in PAINTED_SLICES]
    return array[keep]


def test_five_painted_liver_slices_segment_the_liver(sample_result, sample_reference):
    assert sample_result.painted.axis == 0
    assert sample_result.painted.axis_name == "axial"
    assert sample_result.painted.indices == PAINTED_SLICES
    liver = dice(unpainted(sample_result.labels) == 1, unpainted(sample_reference) == 1)
    assert liver >= 0.85, f"liver Dice on unpainted slices {liver:.3f}"
    spleen = dice(unpainted(sample_result.labels) == 2, unpainted(sample_reference) == 2)
    assert spleen >= 0.75, f"spleen Dice on unpainted slices {spleen:.3f}"


def outside_painted_range(count: int) -> list[int]:
    return [i for i in range(count) if not PAINTED_SLICES[0] <= i <= PAINTED_SLICES[-1]]


def test_default_fill_between_painted_slices_beats_contour_interpolation(sample_result, contour_result,
                                                                       sample_reference):
    between = [i for i in range(PAINTED_SLICES[0] + 1, PAINTED_SLICES[-1]) if i not in PAINTED_SLICES]
    for value, name in ((1, "liver"), (2, "spleen")):
        registered = dice(sample_result.labels[between] == value, sample_reference[between] == value)
        interpolated = dice(contour_result.labels[between] == value, sample_reference[between] == value)
        print(f"{name}: registration-guided {registered:.3f}, contour interpolation {interpolated:.3f}")
        assert registered >= interpolated + 0.01, f"{name}: {registered:.3f} vs {interpolated:.3f}"


def test_default_box_prompted_walk_beyond_the_painted_range_beats_the_decoder_walk(sample_result,
                                                                                   decoder_walk_result,
                                                                                   sample_reference):
    outside = outside_painted_range(sample_reference.shape[0])
    for value, name in ((1, "liver"), (2, "spleen")):
        boxed = dice(sample_result.labels[outside] == value, sample_reference[outside] == value)
        decoded = dice(decoder_walk_result.labels[outside] == value, sample_reference[outside] == value)
        print(f"{name} beyond the painted range: box-prompted walk {boxed:.3f}, decoder walk {decoded:.3f}")
        assert boxed >= decoded + 0.01, f"{name}: {boxed:.3f} vs {decoded:.3f}"
    # between the painted slices both fill the same way
    between = slice(PAINTED_SLICES[0], PAINTED_SLICES[-1] + 1)
    np.testing.assert_array_equal(sample_result.labels[between], decoder_walk_result.labels[between])
    # its walk gives per-slice confidence too (for --report and the module's list)
    walked = [c for c in sample_result.confidence if c.kind == "walked"]
    assert walked and all(0.0 <= c.confidence <= 1.0 for c in walked)


def test_decoder_walks_the_same_way_after_either_fill(decoder_walk_result, contour_result, sample_reference):
    outside = outside_painted_range(sample_reference.shape[0])
    np.testing.assert_array_equal(decoder_walk_result.labels[outside], contour_result.labels[outside])


def test_walk_beyond_the_painted_range_finds_liver_there(sample_result, sample_reference):
    # The liver starts at slice 6; the first painted slice is 10. Fill-between predicts nothing below 10.
    below = slice(0, PAINTED_SLICES[0])
    found = dice(sample_result.labels[below] == 1, sample_reference[below] == 1)
    assert found >= 0.5, f"liver Dice below the first painted slice {found:.3f}"


def test_the_walk_gate_passes_the_liver_and_refuses_bone(sample_adaptation, sample_result, sample_reference,
                                                         sample_image):
    """Beyond the painted range a walked outline is kept while it looks like the painted structure to the
    encoder. With the real weights: the liver's own cross-sections between the painted slices pass the
    threshold learnt from the filled masks, the vertebra's bone on the same slices does not."""
    from scipy import ndimage

    from SAMFewshotLib.pipeline import outline_resemblance
    from SAMFewshotLib.prompt_propagation import resemblance_threshold

    embeddings, prototype = sample_adaptation.embeddings, sample_adaptation.targets[1].mean(0)

    def looks_like(index, mask):
        return outline_resemblance(embeddings, index, mask, prototype)

    threshold = resemblance_threshold(sample_result.labels, sample_adaptation.label_stack, PAINTED_SLICES, 1,
                                      looks_like)
    middles = [(below + above) // 2 for below, above in zip(PAINTED_SLICES[:-1], PAINTED_SLICES[1:])]
    liver = [looks_like(i, sample_reference[i] == 1) for i in middles]  # the slices the threshold encoded
    bone = []
    for i in middles:
        regions, count = ndimage.label(sample_image.array[i] > 250)
        bone.append(looks_like(i, regions == 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))))
    print(f"threshold {threshold:.3f}, liver {np.round(liver, 3)}, bone {np.round(bone, 3)}")
    assert min(liver) >= threshold + 0.05
    assert np.mean(bone) <= threshold - 0.05


def test_seed_method_alone_segments_the_liver(sample_seed_result, sample_reference):
    liver = dice(unpainted(sample_seed_result.seed_labels) == 1, unpainted(sample_reference) == 1)
    assert liver >= 0.7, f"seed method liver Dice {liver:.3f}"
    linked = dice(unpainted(sample_seed_result.labels) == 1, unpainted(sample_reference) == 1)
    assert linked >= liver - 0.01


def test_linking_to_painted_regions_only_removes_voxels(sample_seed_result, sample_reference):
    result = sample_seed_result
    removed = (result.seed_labels != 0) & (result.labels == 0)
    assert not np.any((result.labels != 0) & (result.labels != result.seed_labels))
    # what was removed is mostly outside the reference structures
    assert removed.sum() == 0 or (sample_reference[removed] == 0).mean() > 0.5


def test_painted_slices_are_copied_unchanged(sample_result, sample_painted):
    for index in PAINTED_SLICES:
        np.testing.assert_array_equal(sample_result.labels[index], sample_painted[index])
    assert sample_result.labels.shape == sample_painted.shape
    assert sample_result.labels.dtype == np.uint8


def test_second_run_uses_the_cache_and_never_runs_the_encoder(sample_seed_result, sample_image, sample_painted,
                                                             model, cache_dir, monkeypatch):
    assert sample_seed_result.encoded_slices <= sample_image.shape[0]  # each slice encoded at most once

    def forbidden(*args, **kwargs):
        raise AssertionError("the encoder ran although every slice is cached")

    monkeypatch.setattr(model, "encode", forbidden)
    again = segment_volume(sample_image, sample_painted, model=model, cache_dir=cache_dir, seed=0, iterations=1,
                           method="seed")
    assert again.encoded_slices == 0


def test_saved_model_applied_to_the_volume_reproduces_the_prediction(sample_seed_result, sample_image, model,
                                                                      cache_dir, tmp_path):
    path = sample_seed_result.adapted.save(tmp_path / "liver.safetensors")
    loaded = AdaptedModel.load(path)
    assert loaded.label_names == {1: "label 1", 2: "label 2"}
    assert loaded.axis_name == "axial"
    applied = apply_adapted_model(loaded, sample_image, model=model, cache_dir=cache_dir)
    assert applied.shape == sample_image.shape
    # apply has no painted slices to link regions to, so it reproduces the per-slice (seed) prediction
    np.testing.assert_array_equal(unpainted(applied), unpainted(sample_seed_result.seed_labels))


def test_adapted_model_is_refused_on_another_base_model(sample_result, model):
    from dataclasses import replace

    other = replace(model, identity="vit_b:0123456789abcdef")
    with pytest.raises(CheckpointError, match="made from base model lite-medsam"):
        sample_result.adapted.build_decoders(other)


def test_training_is_deterministic_under_a_seed(sample_image, sample_painted, model, cache_dir):
    pairs = [(sample_image, sample_painted)]
    # the decoder alone: the atlas (a segmentation by the default method) is tested in test_atlas.py
    first = train_adapted_model(pairs, model=model, cache_dir=cache_dir, seed=3, iterations=2, atlases=False)
    second = train_adapted_model(pairs, model=model, cache_dir=cache_dir, seed=3, iterations=2, atlases=False)
    other = train_adapted_model(pairs, model=model, cache_dir=cache_dir, seed=4, iterations=2, atlases=False)
    assert sorted(first.decoder_states) == [1, 2]
    for label, state in first.decoder_states.items():
        for key, value in state.items():
            assert torch.equal(value, second.decoder_states[label][key]), key
    assert any(not torch.equal(v, other.decoder_states[1][k]) for k, v in first.decoder_states[1].items())


def test_cancel_stops_and_raises(sample_image, sample_painted, model, cache_dir):
    import threading

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        segment_volume(sample_image, sample_painted, model=model, cache_dir=cache_dir, iterations=1, cancel=cancel)


def test_a_method_that_predicts_with_the_decoders_refuses_to_run_without_them(sample_image, sample_painted, model,
                                                                              cache_dir):
    # refused before anything runs: without the check it would fail with a bare KeyError once the first slice
    # was encoded, far from the cause
    with pytest.raises(ValueError, match="predicts with the adapted decoders"):
        segment_volume(sample_image, sample_painted, model=model, cache_dir=cache_dir, method="seed",
                       with_decoders=False)


def test_label_map_of_another_size_is_refused(sample_image, model, cache_dir):
    labels = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(InputError, match="differs from the image"):
        segment_volume(sample_image, labels, model=model, cache_dir=cache_dir)


def test_empty_label_map_is_refused(sample_image, model, cache_dir):
    with pytest.raises(InputError, match="empty"):
        segment_volume(sample_image, np.zeros(sample_image.shape, np.uint8), model=model, cache_dir=cache_dir)


def test_repropagation_after_painting_one_more_slice_continues_from_the_previous_run(
        sample_result, sample_image, sample_painted, sample_reference, model, cache_dir):
    from SAMFewshotLib.adaptation import AdaptationSettings

    corrected = sample_painted.copy()
    extra = 31  # between the painted slices 27 and 35
    corrected[extra] = sample_reference[extra]
    previous = sample_result.adaptation
    encoded_before = previous.embeddings.encoded_slices
    result = segment_volume(sample_image, corrected, model=model, cache_dir=cache_dir, previous=previous)
    assert result.painted.indices == tuple(sorted(PAINTED_SLICES + (extra,)))
    assert result.adaptation.embeddings is previous.embeddings  # embeddings reused from memory
    assert result.adaptation.fill_cache is previous.fill_cache  # and the unchanged gaps' registration
    assert previous.embeddings.encoded_slices - encoded_before <= 1  # at most the newly painted slice
    passes = AdaptationSettings().refine_passes(len(result.painted.indices))
    assert passes < AdaptationSettings().iterations_for(len(result.painted.indices))
    assert len(result.losses) == 2 * passes  # liver and spleen each trained a few passes, not the full schedule
    np.testing.assert_array_equal(result.labels[extra], sample_reference[extra])
    painted = PAINTED_SLICES + (extra,)
    keep = [i for i in range(result.labels.shape[0]) if i not in painted]
    liver = dice(result.labels[keep] == 1, sample_reference[keep] == 1)
    assert liver >= 0.85, f"liver Dice after re-propagation {liver:.3f}"



def test_on_the_cpu_the_walks_read_no_slice_past_where_they_stop(sample_adaptation, model, cache_dir):
    """Beyond the painted range each walk step reads one slice. Encoding slices ahead of the walk pays only
    where they ride in the same encoder batch; on a CPU (batch 1) a slice past a walk's end is an encoder run
    (0.7-3 s on 2 cores) that nothing reads."""
    from dataclasses import replace

    from SAMFewshotLib.embeddings import VolumeEmbeddings
    from SAMFewshotLib.pipeline import propagate

    # the same slices, read from the disk cache into a memory of their own: what is in it is what was read
    fresh = VolumeEmbeddings(model, sample_adaptation.embeddings.volume, sample_adaptation.embeddings.axis,
                             window=sample_adaptation.window, cache_dir=cache_dir)
    assert fresh.batch_size == 1
    result = propagate(replace(sample_adaptation, embeddings=fresh), "default")
    drawn = set(np.flatnonzero(result.labels.reshape(result.labels.shape[0], -1).any(1)).tolist())
    beyond = sorted(i for i in fresh.memory if not PAINTED_SLICES[0] <= i <= PAINTED_SLICES[-1])
    assert beyond, "the walks read no slice beyond the painted range"
    # a slice the walk drew, or the one next to it where a walk found the structure no longer there
    unread = [i for i in beyond if not {i - 1, i, i + 1} & drawn]
    assert not unread, f"slices {unread} were encoded past the walks' ends (drawn: {sorted(drawn)})"


def test_a_slice_checked_empty_stops_the_walk_there_and_changes_nothing_before_it(
        sample_result, sample_image, sample_painted, sample_reference, model, cache_dir):
    # the liver goes on to slice 47 and the walk from slice 43 follows it; the user says "nothing here" on 45
    assert (sample_result.labels[44:48] == 1).any(axis=(1, 2)).all()
    previous = sample_result.adaptation
    result = segment_volume(sample_image, sample_painted, model=model, cache_dir=cache_dir, previous=previous,
                            empty_slices=[45])
    assert result.painted.indices == PAINTED_SLICES and result.painted.empty == (45,)
    assert result.adaptation.decoders is previous.decoders  # nothing new to learn from: no retraining
    assert not result.labels[45:].any()  # the checked slice stays empty and nothing is found past it
    np.testing.assert_array_equal(result.labels[:44], sample_result.labels[:44])
    # slice 44, walked, is redrawn by registration on a crop that no longer holds the slices past 45; on the
    # 3 mm CT that crop's grid is refined by a slightly different factor (FINE_GRID_MM), so a few voxels move
    assert dice(result.labels[44] == 1, sample_result.labels[44] == 1) >= 0.98
    by_slice = {(c.index, c.label): c for c in result.confidence}
    assert by_slice[(45, 1)].kind == "painted" and by_slice[(46, 1)].confidence == 1.0
    assert result.suggested_slice not in (45, 46, 47)


def test_cancel_while_adapting_stops_there_and_leaves_the_cache_complete(sample_image, sample_painted, model,
                                                                         cache_dir):
    import os
    import threading
    from pathlib import Path

    cancel, stages = threading.Event(), []

    def progress(stage: str, done: int, total: int) -> None:
        stages.append(stage)
        if stage.startswith("adapting") and done == 1:
            cancel.set()  # the user clicks Cancel during fine-tuning

    with pytest.raises(Cancelled):
        segment_volume(sample_image, sample_painted, model=model, cache_dir=cache_dir, iterations=3,
                       progress=progress, cancel=cancel)
    assert stages[-1].startswith("adapting") and not any(s == "propagating" for s in stages)
    leftovers = [p for p in Path(cache_dir).rglob(f"*.{os.getpid()}.*.tmp")]
    assert leftovers == []  # no half-written cache entry from this process
