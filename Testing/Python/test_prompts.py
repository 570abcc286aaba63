"""Point and box prompts on one slice (plain SAM on cached embeddings) and the ``samfewshot click`` command."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PAINTED_SLICES, SAMPLE_CT, SAMPLE_PAINTED, dice
from SAMFewshotLib.cli import main
from SAMFewshotLib.errors import InputError
from SAMFewshotLib.prompts import SlicePrompt
from SAMFewshotLib.slice_transform import SliceTransform

SPLEEN, LIVER = 2, 1
CLICK_SLICE = 27  # painted in the sample, so its embedding is cached by the propagation tests too


@pytest.fixture(scope="module")
def session(sample_image, model, cache_dir):
    from SAMFewshotLib.interactive import InteractiveSession

    return InteractiveSession(sample_image, model=model, cache_dir=cache_dir)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())


def test_parse_points_and_box():
    prompt = SlicePrompt.parse(["10,20", "30.5,40,0"], "1,2,30,40")
    assert prompt.points == ((10, 20), (30.5, 40)) and prompt.point_labels == (1, 0)
    assert prompt.box == (1, 2, 30, 40) and prompt.positive_points == [(10, 20)]
    for points, box in ((["10"], None), (["1,2,3"], None), (["a,b"], None), ([], "1,2,3")):
        with pytest.raises(InputError):
            SlicePrompt.parse(points, box)


@pytest.mark.parametrize("prompt, message", [
    (SlicePrompt(((5, 5),), (0,)), "foreground point"),
    (SlicePrompt(((200, 5),), (1,)), "outside the slice"),
    (SlicePrompt(box=(30, 30, 10, 40)), "x1 >= x0"),
    (SlicePrompt(box=(300, 300, 400, 400)), "outside the slice"),
])
def test_prompts_that_cannot_give_a_mask_are_refused(prompt, message):
    with pytest.raises(InputError, match=message):
        prompt.check((101, 122))


def test_a_box_over_the_whole_slice_covers_the_whole_resized_image():
    # a 101 x 122 slice of 3 x 3 mm voxels fills 212 x 256 model pixels; SAM adds the half pixel itself
    transform = SliceTransform((101, 122), (3.0, 3.0), 256)
    points, box = SlicePrompt(((0, 0), (121, 100)), (1, 1), (0, 0, 121, 100)).to_model(transform, torch.device("cpu"))
    rows, cols = transform.resized_shape
    np.testing.assert_allclose(box[0, 0].numpy() + 0.5, [0, 0, cols, rows], atol=1e-4)
    np.testing.assert_allclose(points[0][0, 0].numpy() + 0.5, [0.5 * cols / 122, 0.5 * rows / 101], atol=1e-4)
    np.testing.assert_allclose(points[0][0, 1].numpy() + 0.5, [121.5 * cols / 122, 100.5 * rows / 101], atol=1e-4)


@pytest.mark.parametrize("label, index, floor", [(SPLEEN, 25, 0.85), (SPLEEN, CLICK_SLICE, 0.85), (LIVER, 37, 0.8)])
def test_a_box_around_an_organ_segments_it(session, sample_reference, label, index, floor):
    truth = sample_reference[index] == label
    result = session.segment(index, SlicePrompt(box=bounding_box(truth)))
    assert result.mask.shape == truth.shape and result.index == index
    assert dice(result.mask, truth) >= floor


def test_an_accepted_mask_never_overwrites_painted_voxels(session, sample_painted, sample_reference):
    truth = sample_reference[CLICK_SLICE] == SPLEEN
    result = session.segment(CLICK_SLICE, SlicePrompt(box=bounding_box(truth)))
    labels = session.add_to_labels([result], 3, sample_painted)
    painted = sample_painted[CLICK_SLICE] > 0
    np.testing.assert_array_equal(labels[CLICK_SLICE][painted], sample_painted[CLICK_SLICE][painted])
    assert (labels[CLICK_SLICE] == 3).sum() == (result.mask & ~painted).sum() > 0
    others = [i for i in range(labels.shape[0]) if i != CLICK_SLICE]
    np.testing.assert_array_equal(labels[others], sample_painted[others])
    with pytest.raises(InputError):
        session.add_to_labels([result], 0, sample_painted)


def test_click_command_adds_the_slice_to_the_painted_labels(tmp_path, cache_dir, capsys, sample_painted,
                                                            sample_reference):
    truth = sample_reference[25] == SPLEEN
    x0, y0, x1, y1 = bounding_box(truth)
    output = tmp_path / "painted_plus_one.nii.gz"
    code = main(["click", str(SAMPLE_CT), "--slice", "25", "--box", f"{x0},{y0},{x1},{y1}", "--label", "2",
                 "--add-to", str(SAMPLE_PAINTED), "-o", str(output), "--cache-dir", str(cache_dir), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "axial slice 25 as label 2" in out
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert dice(written[25] == SPLEEN, truth) >= 0.85
    np.testing.assert_array_equal(written[list(PAINTED_SLICES)], sample_painted[list(PAINTED_SLICES)])
    assert not written[[i for i in range(48) if i not in PAINTED_SLICES and i != 25]].any()


@pytest.mark.parametrize("args, message", [
    (["--slice", "48", "--box", "1,1,5,5"], "slice 48 does not exist"),
    (["--slice", "5"], "foreground point"),
    (["--slice", "5", "--point", "10,10", "--tune-encoder", "5"], "--tune-encoder goes with --zero-shot"),
    (["--slice", "5", "--point", "10,10", "--label", "0"], "--label 0"),
])
def test_click_command_refuses_bad_prompts_clearly(tmp_path, cache_dir, capsys, args, message):
    code = main(["click", str(SAMPLE_CT), *args, "-o", str(tmp_path / "x.nii.gz"), "--cache-dir", str(cache_dir),
                 "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.nii.gz").exists()
