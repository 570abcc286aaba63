"""Reading, checking and writing volumes: bad files get a clear error, outputs keep the exact geometry."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE_CT, SAMPLE_PAINTED
from SAMFewshotLib.errors import InputError
from SAMFewshotLib.volume_io import (
    Volume,
    check_output_path,
    read_label_map,
    read_volume,
    write_label_map,
)


def write(array, path, spacing=(1.0, 1.0, 1.0), **kwargs):
    image = sitk.GetImageFromArray(array, **kwargs)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_reads_the_sample_ct_with_its_geometry(sample_image):
    assert sample_image.shape == (48, 101, 122)
    assert sample_image.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert sample_image.direction_matrix[0, 0] == pytest.approx(-1.0)


def test_truncated_nifti_is_refused(tmp_path):
    data = SAMPLE_CT.read_bytes()
    broken = tmp_path / "truncated.nii.gz"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_volume(broken)


def test_truncated_uncompressed_nifti_is_refused(tmp_path):
    raw = gzip.decompress(SAMPLE_CT.read_bytes())
    broken = tmp_path / "truncated.nii"
    broken.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_volume(broken)


def test_nan_voxels_in_nifti_are_refused(tmp_path):
    # SimpleITK's NIfTI reader turns NaN into 0, so this only fails if we look at the stored values.
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    path = write(array, tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="NaN or infinite"):
        read_volume(path)


def test_infinite_voxels_in_nrrd_are_refused(tmp_path):
    array = np.zeros((4, 5, 6), np.float32)
    array[0, 0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        read_volume(write(array, tmp_path / "inf.nrrd"))


@pytest.mark.parametrize(
    ("array", "kwargs", "message"),
    [
        (np.zeros((5, 6), np.int16), {}, "is 2D"),
        (np.zeros((2, 3, 4, 5), np.int16), {"isVector": False}, "is 4D"),
        (np.zeros((3, 4, 5, 3), np.uint8), {"isVector": True}, "components per voxel"),
    ],
)
def test_images_that_are_not_3d_scalar_volumes_are_refused(tmp_path, array, kwargs, message):
    path = tmp_path / "bad.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array, **kwargs), str(path))
    with pytest.raises(InputError, match=message):
        read_volume(path)


def test_missing_and_garbage_files_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_volume(garbage)


def test_label_map_with_other_geometry_is_refused(tmp_path, sample_image):
    labels = sitk.ReadImage(str(SAMPLE_PAINTED))
    labels.SetOrigin((0.0, 0.0, 0.0))
    path = tmp_path / "moved.nii.gz"
    sitk.WriteImage(labels, str(path))
    with pytest.raises(InputError, match="geometry .* differs from the image"):
        read_label_map(path, sample_image)


def test_negative_and_fractional_labels_are_refused(tmp_path, sample_image):
    array = np.zeros(sample_image.shape, np.float32)
    array[5, 5, 5] = -1
    path = tmp_path / "negative.nii.gz"
    sitk.WriteImage(sample_image.with_array(array).to_sitk(), str(path))
    with pytest.raises(InputError, match="negative"):
        read_label_map(path, sample_image)
    array[5, 5, 5] = 0.5
    sitk.WriteImage(sample_image.with_array(array).to_sitk(), str(path))
    with pytest.raises(InputError, match="non-integer"):
        read_label_map(path, sample_image)


def test_written_label_map_keeps_geometry_and_picks_a_type_that_holds_the_labels(tmp_path, sample_image):
    labels = np.zeros(sample_image.shape, np.int64)
    labels[3, 4, 5] = 300
    path = write_label_map(labels, sample_image, tmp_path / "out.nii.gz")
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkUInt16
    assert back.GetSpacing() == pytest.approx(sample_image.spacing)
    assert back.GetOrigin() == pytest.approx(sample_image.origin)
    assert back.GetDirection() == pytest.approx(sample_image.direction)
    assert sitk.GetArrayFromImage(back)[3, 4, 5] == 300
    assert not list(tmp_path.glob(".*partial*"))


def test_output_that_would_overwrite_an_input_is_refused(tmp_path):
    image = tmp_path / "ct.nii.gz"
    shutil.copy(SAMPLE_CT, image)
    with pytest.raises(InputError, match="is one of the inputs"):
        check_output_path(tmp_path / "." / "ct.nii.gz", [image])
    assert check_output_path(tmp_path / "sub" / "out.nii.gz", [image]).parent.is_dir()


def test_dicom_series_folder_is_read(tmp_path, sample_image):
    folder = tmp_path / "dicom"
    folder.mkdir()
    small = sample_image.with_array(sample_image.array.copy())
    image = small.to_sitk()[:, :, :4]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        plane.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")  # series instance UID
        plane.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        plane.SetMetaData("0020|0013", str(k))
        plane.SetMetaData("0020|0037", "\\".join(str(v) for v in (-1, 0, 0, 0, -1, 0)))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)
    volume = read_volume(folder)
    assert volume.shape == (4, 101, 122)
    np.testing.assert_array_equal(volume.array, sample_image.array[:4])


def test_volume_round_trips_through_simpleitk(sample_image):
    again = Volume.from_sitk(sample_image.to_sitk())
    assert again.same_geometry(sample_image)
    np.testing.assert_array_equal(again.array, sample_image.array)
