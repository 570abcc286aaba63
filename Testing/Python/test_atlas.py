"""Atlas segmentation: a segmented volume registered onto another scan (``samfewshot apply``'s default)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_CT, SAMPLE_PAINTED, dice
from safetensors import safe_open
from safetensors.torch import save_file

from SAMFewshotLib.adapted_model import AdaptedModel
from SAMFewshotLib.atlas import Atlas, segment_with_atlases
from SAMFewshotLib.cli import main
from SAMFewshotLib.embeddings import slice_stack
from SAMFewshotLib.errors import CheckpointError, InputError
from SAMFewshotLib.painted_slices import find_painted_slices
from SAMFewshotLib.pipeline import _painted_throughout, apply_adapted_model
from SAMFewshotLib.volume_io import Volume, read_label_map


def _sitk(array: np.ndarray, geometry: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


@pytest.fixture(scope="module")
def another_patient(sample_image, sample_reference):
    """The sample CT as another scan: turned 8 degrees, 8 % larger, shifted by (6, -4, 3) mm, with another
    contrast and noise; and its reference moved the same way."""
    image = _sitk(sample_image.array.astype(np.float32), sample_image)
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    turn = np.deg2rad(8.0)
    move = sitk.AffineTransform(3)
    move.SetCenter(centre)
    move.SetMatrix((1.08 * np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0],
                                     [0, 0, 1]])).ravel().tolist())
    move.SetTranslation((6.0, -4.0, 3.0))
    moved = sitk.GetArrayFromImage(sitk.Resample(image, image, move, sitk.sitkLinear,
                                                 float(sample_image.array.min())))
    truth = sitk.GetArrayFromImage(sitk.Resample(_sitk(sample_reference, sample_image), image, move,
                                                 sitk.sitkNearestNeighbor, 0))
    noise = np.random.default_rng(0).normal(0.0, 10.0, moved.shape)
    return sample_image.with_array((0.8 * moved + 50.0 + noise).astype(np.float32)), truth


def test_the_atlas_follows_the_structures_onto_another_scan(sample_image, sample_reference, another_patient):
    target, truth = another_patient
    warped = segment_with_atlases([Atlas.from_volume(sample_image, sample_reference)], target)
    assert warped.shape == target.shape
    for value in (1, 2):
        registered = dice(warped == value, truth == value)
        copied = dice(sample_reference == value, truth == value)  # what the labels give without registration
        assert registered >= 0.9 and registered >= copied + 0.2, f"label {value}: {registered:.3f} vs {copied:.3f}"


def test_an_adapted_model_keeps_its_atlas_and_names_a_damaged_one(sample_result, sample_image, sample_reference,
                                                                  tmp_path):
    adapted = replace(sample_result.adapted, atlases=[])
    adapted.add_atlas(sample_image, sample_reference)
    path = adapted.save(tmp_path / "liver.safetensors")
    (atlas,) = AdaptedModel.load(path).atlases
    np.testing.assert_array_equal(atlas.labels, sample_reference)
    assert atlas.spacing == pytest.approx(sample_image.spacing) and atlas.origin == pytest.approx(sample_image.origin)
    assert abs(float(atlas.image.astype(np.float32).mean())) < 0.01  # stored standardised

    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["atlas.0.labels"] = tensors["atlas.0.labels"][:-1].contiguous()
    save_file(tensors, str(tmp_path / "damaged.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="atlas 0"):
        AdaptedModel.load(tmp_path / "damaged.safetensors")
    header = json.loads(metadata["samfewshot"])
    assert header["atlases"][0]["spacing"] == pytest.approx(list(sample_image.spacing))


def test_apply_asks_for_an_atlas_where_the_model_has_none(sample_result, sample_image):
    with pytest.raises(InputError, match="holds none"):
        apply_adapted_model(replace(sample_result.adapted, atlases=[]), sample_image, method="atlas")
    with pytest.raises(InputError, match="unknown method"):
        apply_adapted_model(sample_result.adapted, sample_image, method="nearest")


def test_an_atlas_is_refused_an_empty_or_mismatched_label_map(sample_image):
    with pytest.raises(InputError, match="empty"):
        Atlas.from_volume(sample_image, np.zeros(sample_image.shape, np.uint8))
    with pytest.raises(InputError, match="does not match"):
        Atlas.from_volume(sample_image, np.ones((2, 2, 2), np.uint8))


def test_a_full_label_map_is_taken_as_it_is_and_painted_slices_are_not(sample_image, sample_reference,
                                                                       sample_painted):
    def throughout(labels):
        painted = find_painted_slices(labels, sample_image.spacing, sample_image.direction_matrix, "axial")
        return _painted_throughout(slice_stack(labels, painted.axis), painted)

    assert throughout(sample_reference)
    assert not throughout(sample_painted)


def test_train_on_painted_slices_then_apply_to_another_scan(tmp_path, cache_dir, another_patient, sample_image,
                                                            capsys):
    """The user's flow: paint a few slices of one scan, train, segment the next scan with no painting."""
    target, truth = another_patient
    scan = tmp_path / "next.nii.gz"
    sitk.WriteImage(_sitk(target.array, target), str(scan))
    model, output = tmp_path / "liver.safetensors", tmp_path / "next_labels.nii.gz"
    assert main(["train", "--image", str(SAMPLE_CT), "--labels", str(SAMPLE_PAINTED), "-o", str(model),
                 "--cache-dir", str(cache_dir), "--iterations", "2", "--quiet"]) == 0
    assert main(["apply", str(model), str(scan), "-o", str(output), "--cache-dir", str(cache_dir), "--quiet"]) == 0
    assert "by registering its 1 atlas" in capsys.readouterr().out
    labels = read_label_map(output, target).array
    # the atlas is the sample CT segmented from its 5 painted slices (liver Dice about 0.95 there), moved
    assert dice(labels == 1, truth == 1) >= 0.85
    assert dice(labels == 2, truth == 2) >= 0.6
