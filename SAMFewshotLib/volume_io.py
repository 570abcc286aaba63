"""Reading and writing volumes, with the checks SimpleITK does not do.

Arrays are in SimpleITK/numpy order ``(K, J, I)``; spacing, origin and direction are in ITK (LPS) order
``(I, J, K)``, exactly as ``SimpleITK.GetSpacing()`` etc. return them.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A 3D scalar image: voxels plus the geometry that places them in the patient (LPS)."""

    array: np.ndarray  # (K, J, I)
    spacing: tuple[float, float, float]  # mm, (I, J, K)
    origin: tuple[float, float, float]  # mm, LPS
    direction: tuple[float, ...]  # 3x3 row-major, columns are the I, J, K axis directions in LPS

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry carrying other voxels (e.g. a label map)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} != volume shape {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    def same_geometry(self, other: Volume, tolerance: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance)
            and np.allclose(self.origin, other.origin, rtol=tolerance, atol=1e-3)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def geometry_text(self) -> str:
        size = tuple(reversed(self.shape))
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        origin = ", ".join(f"{o:.2f}" for o in self.origin)
        return f"size {size}, spacing ({spacing}) mm, origin ({origin})"

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(tuple(float(s) for s in self.spacing))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(float(d) for d in self.direction))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(image.GetSpacing()),
            origin=tuple(image.GetOrigin()),
            direction=tuple(image.GetDirection()),
        )


def read_volume(path: str | os.PathLike, *, what: str = "image") -> Volume:
    """Read a 3D scalar volume from any file SimpleITK reads, or from a DICOM series folder.

    Raises InputError naming the file and the problem for missing, truncated or corrupt files, images that
    are not 3D scalar volumes, non-finite voxels and unusable spacing.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path}: no such file or folder.")
    try:
        if path.is_dir():
            image = _read_dicom_series(path, what)
        else:
            _check_file_complete(path, what)
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(
            f"{what} {path}: SimpleITK cannot read it ({_itk_reason(error)}). Is it a complete image file?"
        ) from None
    _check_image(image, path, what)
    volume = Volume.from_sitk(image)
    _check_finite(volume.array, f"{what} {path}")
    return volume


def _itk_reason(error: Exception) -> str:
    """The informative line of a SimpleITK exception: its last line, without ITK's object address. A final
    "Reason: No such file or directory" is a stale C errno (the file exists: it was checked), so it is dropped."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Reason:")] or lines
    return re.sub(r"^ITK ERROR: \w+\(0x[0-9a-fA-F]+\): ", "", lines[-1]) if lines else type(error).__name__


def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "No Series were found" would print beside our error
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    if not series:
        raise InputError(f"{what} {folder}: the folder holds no DICOM series. Give a volume file or a DICOM folder.")
    if len(series) > 1:
        raise InputError(
            f"{what} {folder}: the folder holds {len(series)} DICOM series; give a folder with exactly one."
        )
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def _check_file_complete(path: Path, what: str) -> None:
    """SimpleITK reads a truncated .nii.gz without complaint (the rest comes back as zeros) and turns NaN
    voxels into 0: read NIfTI data once with nibabel, which raises on short data and keeps NaN. Neither
    checks a gzip file's CRC (they stop reading before it): flipped bytes came back as wrong voxels, so a
    compressed file is read to its end once."""
    if path.stat().st_size == 0:
        raise InputError(f"{what} {path}: the file is empty.")
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 22):
                    pass
        except (EOFError, OSError, gzip.BadGzipFile) as error:
            raise InputError(
                f"{what} {path}: the compressed file is truncated or corrupt ({error}). Export or copy it again."
            ) from None
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        import nibabel

        try:
            data = np.asanyarray(nibabel.load(str(path)).dataobj)
        except Exception as error:  # nibabel raises several types for short or malformed files
            reason = " ".join(str(error).split())  # one line: the command line prints errors as one line
            raise InputError(f"{what} {path}: the NIfTI file is truncated or corrupt ({reason}).") from None
        _check_finite(data, f"{what} {path}")
    elif path.name.lower().endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        _check_compressed_voxels(path, what)


def _check_compressed_voxels(path: Path, what: str) -> None:
    """SimpleITK reads a NRRD (gzip encoding) or MetaImage (CompressedData) file whose compressed voxels are
    damaged without complaint and returns wrong voxels: decompress them once here, as gzip and zlib verify
    their checksums. Detached data in several files (NRRD "LIST", MetaImage "LIST") is left to SimpleITK."""
    with open(path, "rb") as stream:
        head = stream.read(1 << 20)
    if path.name.lower().endswith((".nrrd", ".nhdr")):
        end = head.find(b"\n\n")
        fields = dict(line.split(": ", 1) for line in head[: max(end, 0)].decode("latin-1").splitlines()
                      if ": " in line and not line.startswith("#"))
        if end < 0 or fields.get("encoding", "").strip() not in ("gzip", "gz"):
            return
        data_file, offset, kind = fields.get("data file", fields.get("datafile", "LOCAL")).strip(), end + 2, "gzip"
    else:
        match = re.search(rb"^ElementDataFile\s*=\s*(.*?)\r?\n", head, re.MULTILINE)
        flags = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", head[: match.start() if match else 0].decode("latin-1"),
                                re.MULTILINE))
        if match is None or flags.get("CompressedData", "").lower() != "true":
            return
        data_file, offset, kind = match.group(1).decode("latin-1").strip(), match.end(), "zlib"
    if data_file != "LOCAL":
        if " " in data_file or data_file.upper().startswith("LIST"):
            return
        path, offset = path.parent / data_file, 0
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            if kind == "gzip":
                with gzip.GzipFile(fileobj=stream) as unpacked:
                    while unpacked.read(1 << 22):
                        pass
            else:
                unpacker = zlib.decompressobj()
                while not unpacker.eof and (chunk := stream.read(1 << 16)):
                    unpacker.decompress(chunk)
                if not unpacker.eof:
                    raise EOFError("the compressed data ends early")
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(
            f"{what} {path}: the compressed voxel data is truncated or corrupt ({error}). Export or copy it again."
        ) from None


# Intensities are normalised in 32-bit floats: larger magnitudes overflow to infinity there (then NaN).
_LARGEST_VOXEL = 1e38


def _check_finite(array: np.ndarray, where: str) -> None:
    """Refuse NaN/infinite voxels, and float voxels too large for 32-bit arithmetic."""
    if np.issubdtype(array.dtype, np.floating) and array.size:
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(
                f"{where}: {bad} voxels are NaN or infinite. Replace them (e.g. with the background value) "
                "before segmenting."
            )
        peak = max(abs(float(array.min())), abs(float(array.max())))
        if peak > _LARGEST_VOXEL:
            raise InputError(
                f"{where}: voxel values reach {peak:.3g}, beyond what SAMFewshot computes with (32-bit floats, "
                "about 1e38); rescale the image."
            )


def _is_rotation(direction) -> bool:
    """Unit columns and |det| = 1 (to 1e-3): an orthonormal direction matrix."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    return bool(np.all(np.isfinite(matrix)) and np.allclose(np.linalg.norm(matrix, axis=0), 1, atol=1e-3)
                and abs(abs(np.linalg.det(matrix)) - 1) <= 1e-3)


def _check_image(image: sitk.Image, path: Path, what: str) -> None:
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        raise InputError(f"{what} {path}: is 4D with one time point; save it as a 3D volume.")
    if dimension != 3:
        raise InputError(
            f"{what} {path}: is {dimension}D with size {image.GetSize()}; SAMFewshot needs one 3D volume "
            "(for a time series, save the frame you want as its own file)."
        )
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{what} {path}: has complex voxels; save their magnitude as a scalar volume first.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} {path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); "
            "convert it to a scalar (grey-level) volume first."
        )
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{what} {path}: voxel spacing ({_numbers(spacing)}) is not positive; fix the file's header.")
    if not _is_rotation(image.GetDirection()):
        raise InputError(f"{what} {path}: its direction matrix is not a rotation; fix the file's header.")


def check_volume(volume: Volume, what: str = "image") -> None:
    """The checks of ``read_volume`` for a volume that came from memory (e.g. a Slicer node)."""
    if volume.array.ndim != 3:
        raise InputError(f"{what}: is {volume.array.ndim}D with shape {volume.array.shape}; SAMFewshot needs a 3D volume.")
    if min(volume.array.shape) < 1:
        raise InputError(f"{what}: is empty (shape {volume.array.shape}).")
    if np.iscomplexobj(volume.array) or not (np.issubdtype(volume.array.dtype, np.number) or volume.array.dtype == bool):
        raise InputError(f"{what}: voxel type {volume.array.dtype} is not a scalar number type.")
    spacing = np.asarray(volume.spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{what}: voxel spacing ({_numbers(spacing)}) is not positive; fix the image's geometry.")
    if not _is_rotation(volume.direction):  # as read_volume checks a file's header
        raise InputError(f"{what}: its direction matrix is not a rotation (sheared or scaled axes); fix the image's "
                         "geometry.")
    _check_finite(volume.array, what)


def _numbers(values) -> str:
    return ", ".join(f"{float(v):g}" for v in values)


def label_dtype(max_label: int) -> np.dtype:
    """The smallest unsigned integer type that holds every label value."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise InputError(f"label value {max_label} is too large; use label values below 2**32.")


def read_label_map(path: str | os.PathLike, image: Volume) -> Volume:
    """Read a label map that must share ``image``'s geometry; values become non-negative integers."""
    labels = read_volume(path, what="label map")
    if not labels.same_geometry(image):
        mine, theirs = labels.geometry_text(), image.geometry_text()
        if not np.allclose(labels.direction, image.direction, atol=1e-4):  # else both texts read the same
            mine += f", direction ({_numbers(labels.direction)})"
            theirs += f", direction ({_numbers(image.direction)})"
        raise InputError(
            f"label map {path}: its geometry ({mine}) differs from the image's "
            f"({theirs}). Paint the labels on this image, or resample them onto it first."
        )
    array = labels.array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise InputError(f"label map {path}: holds non-integer values; a label map holds integer labels.")
    if array.size and array.min() < 0:
        raise InputError(f"label map {path}: holds negative values ({array.min()}); labels must be 0 (background) or positive.")
    max_label = int(array.max()) if array.size else 0
    return labels.with_array(array.astype(label_dtype(max_label), copy=False))


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> Path:
    """Refuse an output that would overwrite an input or cannot be a file; make its folder.

    Checked before any work, so that a run never computes for minutes and then fails to write."""
    output = Path(output)
    for item in inputs:
        if output.resolve() == Path(item).resolve():
            raise InputError(f"output {output} is one of the inputs; choose another output path so nothing is lost.")
    if output.is_dir():
        raise InputError(f"output {output} is a folder; give a file name in it (e.g. {output / 'labels.nii.gz'}).")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"output {output}: cannot create its folder {output.parent} ({error.strerror or error})."
        ) from None
    return output


def write_label_map(labels: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write ``labels`` (K, J, I) with ``reference``'s exact geometry, atomically."""
    path = Path(path)
    max_label = int(labels.max()) if labels.size else 0
    volume = reference.with_array(np.ascontiguousarray(labels.astype(label_dtype(max_label), copy=False)))
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        sitk.WriteImage(volume.to_sitk(), str(temporary), useCompression=True)
        os.replace(temporary, path)
    except (RuntimeError, OSError) as error:  # e.g. a file name no image writer knows (.txt), a full disk
        reason = _itk_reason(error).replace(str(temporary), str(path))
        raise InputError(
            f"output {path}: cannot write it ({reason}); give a .nii.gz, .nrrd or .mha file name in a writable folder."
        ) from None
    finally:
        temporary.unlink(missing_ok=True)
    return path
