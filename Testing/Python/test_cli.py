"""The samfewshot command line: the contract other tools are built against."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PAINTED_SLICES, REPO, SAMPLE_CT, SAMPLE_PAINTED
from SAMFewshotLib.adapted_model import AdaptedModel
from SAMFewshotLib.cli import main


def run(*args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_writes_a_label_map_in_the_image_geometry(tmp_path, cache_dir, capsys, sample_painted):
    output = tmp_path / "out" / "labels.nii.gz"
    model = tmp_path / "adapted.safetensors"
    report = tmp_path / "report.json"
    code, out, err = run("segment", SAMPLE_CT, SAMPLE_PAINTED, "-o", output, "--cache-dir", cache_dir,
                         "--device", "cpu", "--iterations", "1", "--save-model", model, "--report", report,
                         "--empty-slices", "47", "--quiet", capsys=capsys)
    assert code == 0, err
    assert "5 painted axial slices" in out and "10, 18, 27, 35, 43" in out and "checked empty: 47" in out
    written = json.loads(report.read_text())
    assert written["axis"] == "axial"
    assert written["suggested_slice"] not in PAINTED_SLICES and f"paint slice {written['suggested_slice']} next" in out
    assert {row["index"] for row in written["slices"]} == set(range(48))
    assert all(row["confidence"] == 1.0 for row in written["slices"] if row["index"] in PAINTED_SLICES)
    assert err == ""  # --quiet: no progress
    image, labels = sitk.ReadImage(str(SAMPLE_CT)), sitk.ReadImage(str(output))
    assert labels.GetSize() == image.GetSize()
    assert labels.GetOrigin() == pytest.approx(image.GetOrigin())
    assert labels.GetDirection() == pytest.approx(image.GetDirection())
    assert labels.GetPixelID() == sitk.sitkUInt8
    array = sitk.GetArrayFromImage(labels)
    for index in PAINTED_SLICES:
        np.testing.assert_array_equal(array[index], sample_painted[index])
    assert array[46].any() and not array[47].any()  # the liver goes on to 47, but the user checked it empty

    applied = tmp_path / "applied.nii.gz"
    code, out, err = run("apply", model, SAMPLE_CT, "-o", applied, "--cache-dir", cache_dir, "--quiet",
                         capsys=capsys)
    assert code == 0, err
    assert sitk.ReadImage(str(applied)).GetSize() == image.GetSize()


def test_segment_without_report_or_model_does_not_fine_tune_and_gives_the_same_labels(tmp_path, cache_dir, capsys,
                                                                                       sample_result):
    # the default method's labels do not use the adapted decoders (--report's confidence and --save-model do)
    output = tmp_path / "labels.nii.gz"
    code, out, err = run("segment", SAMPLE_CT, SAMPLE_PAINTED, "-o", output, "--cache-dir", cache_dir, "--device",
                         "cpu", capsys=capsys)
    assert code == 0, err
    assert "registering" in err and "adapting" not in err  # progress shown, none of it fine-tuning
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(output))), sample_result.labels)


def test_train_on_several_volumes(tmp_path, cache_dir, capsys):
    model = tmp_path / "m.safetensors"
    code, out, err = run("train", "--image", SAMPLE_CT, "--labels", SAMPLE_PAINTED, "--image", SAMPLE_CT,
                         "--labels", SAMPLE_PAINTED, "-o", model, "--cache-dir", cache_dir, "--iterations", "1",
                         "--no-atlas", "--quiet", capsys=capsys)
    assert code == 0, err
    assert "10 painted axial slices of 2 volume(s)" in out
    assert AdaptedModel.load(model).atlases == []
    assert model.stat().st_size > 1_000_000


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("other_geometry", "differs from the image"),
        ("empty", "label map is empty"),
        ("two_axes", "more than one axis"),
        ("flat_image", "2D"),
        ("constant_image", "constant"),
        ("nan_image", "NaN"),
        ("bad_checkpoint", "not a readable PyTorch weights file"),
        ("overwrite", "is one of the inputs"),
        ("empty_slice_painted", "marked empty but holds painted labels"),
        ("empty_slice_text", "give slice indices as whole numbers"),
    ],
)
def test_bad_input_fails_with_one_clear_line(tmp_path, cache_dir, capsys, make, message, sample_image):
    image, labels, model = SAMPLE_CT, SAMPLE_PAINTED, "lite-medsam"
    output = tmp_path / "out.nii.gz"
    painted = sitk.ReadImage(str(SAMPLE_PAINTED))
    if make == "other_geometry":
        painted.SetSpacing((1.0, 1.0, 1.0))
        labels = tmp_path / "l.nii.gz"
        sitk.WriteImage(painted, str(labels))
    elif make == "empty":
        labels = tmp_path / "l.nii.gz"
        sitk.WriteImage(painted * 0, str(labels))
    elif make == "two_axes":
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(conftest_reference())))
        both = np.zeros_like(array)
        both[[10, 20, 30]] = array[[10, 20, 30]]
        both[:, [50, 60]] = array[:, [50, 60]]
        labels = tmp_path / "l.nii.gz"
        written = sitk.GetImageFromArray(both)
        written.CopyInformation(painted)
        sitk.WriteImage(written, str(labels))
    elif make == "flat_image":
        image = tmp_path / "flat.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.int16)), str(image))
    elif make in ("constant_image", "nan_image"):
        array = np.zeros(sample_image.shape, np.float32)
        if make == "nan_image":
            array[0, 0, 0] = np.nan
        image = tmp_path / "i.nii.gz"
        sitk.WriteImage(sample_image.with_array(array).to_sitk(), str(image))
    elif make == "bad_checkpoint":
        checkpoint = tmp_path / "sam_model.pth"
        checkpoint.write_bytes(b"\x00" * 1000)
        model = f"vit_b:{checkpoint}"
    elif make == "overwrite":
        labels = tmp_path / "l.nii.gz"
        shutil.copy(SAMPLE_PAINTED, labels)
        output = labels
    extra = []
    if make == "empty_slice_painted":
        extra = ["--empty-slices", "46", "--empty-slices", "2,10"]
    elif make == "empty_slice_text":
        extra = ["--empty-slices", "last"]
    before = labels.read_bytes() if hasattr(labels, "read_bytes") else None
    code, out, err = run("segment", image, labels, "-o", output, "--model", model, "--cache-dir", cache_dir,
                         "--iterations", "1", "--quiet", *extra, capsys=capsys)
    assert code == 1
    assert err.startswith("samfewshot: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    if make == "overwrite":
        assert labels.read_bytes() == before


def conftest_reference():
    from conftest import SAMPLE_REFERENCE

    return SAMPLE_REFERENCE


def test_console_script_runs_as_a_module():
    completed = subprocess.run([sys.executable, "-m", "SAMFewshotLib.cli", "--help"], cwd=REPO, capture_output=True,
                               text=True, check=False)
    assert completed.returncode == 0
    for command in ("segment", "train", "apply"):
        assert command in completed.stdout


def test_report_needs_the_default_method(tmp_path, capsys):
    code, out, err = run("segment", SAMPLE_CT, SAMPLE_PAINTED, "-o", tmp_path / "out.nii.gz", "--method", "seed",
                         "--report", tmp_path / "report.json", capsys=capsys)
    assert code == 1
    assert err.strip().startswith("samfewshot: error: --report needs the default method")
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "report.json").exists()
