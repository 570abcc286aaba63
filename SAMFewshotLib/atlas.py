"""Segment another patient by registering a segmented volume onto it (atlas segmentation).

The adapted decoder alone carries a structure badly from one patient to another: on the development MRI it
reached a mean Dice of 0.45 (hippocampus) and 0.09 (left atrium) at k = 10 (benchmarks/cross_volume.py). The
source volume's own segmentation, moved onto the target by registering the two images, keeps the structure's
shape and place: an affine registration (Mattes mutual information, so any two MRI or CT contrasts) followed
by a deformable one (symmetric-forces demons on the affinely aligned, histogram-matched images), and the
source labels warped by the result. With several source volumes each is registered and the warped labels
vote. On the same pairs one source gave 0.81 and 0.79, three hippocampus sources voting 0.84; with the fused
labels' borders then refined by the target's own intensities (``label_refinement.py``) 0.83, 0.82 and 0.85.

An atlas is the source image (intensities standardised, float16) with its label map on the same grid, shrunk
to at most ``MAX_VOXELS`` voxels so that a saved model stays small. Both volumes should show the same region
(the registration starts from their centres aligned).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .embeddings import check_cancel
from .errors import InputError
from .label_refinement import refine_by_intensity
from .volume_io import Volume, label_dtype

# an atlas larger than this is shrunk by whole factors per axis, the finer axes first
MAX_VOXELS = 16_000_000
# The registration runs on both images shrunk to at most this many voxels (a 512 x 512 x 300 CT of 0.7 x 0.7 x
# 1.5 mm voxels to 73 x 73 x 75, about 5 x 5 x 6 mm): the deformation of a whole structure is smooth on that
# scale, and a full-size displacement field would take gigabytes. The labels are warped onto the target's own grid.
REGISTRATION_VOXELS = 500_000
# Registration settings: common choices for whole-structure atlas registration; none is per structure.
HISTOGRAM_BINS = 32
SAMPLING = 0.5  # share of voxels the mutual information samples (seeded: the result is repeatable)
AFFINE_ITERATIONS = 300
# The demons settings were swept once on the development MRI (4 hippocampus crops, 12 ordered pairs; 2 left-atrium
# scans, 2 pairs; atlases from k = 10 painted slices), 2026-12-03. Mean Dice hippocampus / left atrium / 3
# hippocampus atlases voting: smoothing 1.5 voxels, 100 iterations (the first setting) 0.803 / 0.775 / 0.835;
# 1.0 voxel, 100 iterations 0.810 / 0.780 / 0.843; 1.0 voxel, 200 iterations 0.812 / 0.787 / 0.845 (kept: better on
# both datasets); 0.75 voxel 0.816 / 0.776 / 0.848; 2.0 voxels 0.787 / 0.765 / 0.822. Not better on both: diffeomorphic
# demons, a coarse-to-fine demons pyramid, registering at full resolution, and a second affine stage or the demons
# restricted to the atlas structure's surroundings (10 or 20 mm).
DEMONS_ITERATIONS = 200
DEMONS_SMOOTHING = 1.0  # voxels


@dataclass
class Atlas:
    """A segmented volume to register onto others."""

    image: np.ndarray  # (K, J, I) float16, intensities standardised (zero mean, unit deviation)
    labels: np.ndarray  # (K, J, I) the label map on the same grid
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_volume(cls, image: Volume, labels: np.ndarray) -> Atlas:
        """An atlas from an image and its full label map (same grid), shrunk to at most ``MAX_VOXELS``."""
        if labels.shape != image.shape:
            raise InputError(f"the label map ({labels.shape}) does not match the image ({image.shape}).")
        if not np.any(labels):
            raise InputError("the label map is empty: an atlas needs a segmented structure.")
        picture = _standardised(_image(np.asarray(image.array, np.float32), image))
        label_map = _image(np.asarray(labels).astype(label_dtype(int(np.max(labels)))), image)
        picture = _shrunk(picture, MAX_VOXELS)
        if picture.GetSize() != label_map.GetSize():
            label_map = sitk.Resample(label_map, picture, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        return cls(sitk.GetArrayFromImage(picture).astype(np.float16), sitk.GetArrayFromImage(label_map),
                   tuple(picture.GetSpacing()), tuple(picture.GetOrigin()), tuple(picture.GetDirection()))

    def segment(self, target: Volume, seed: int = 0) -> np.ndarray:
        """This atlas's labels warped onto ``target``'s grid (K, J, I)."""
        fixed = _standardised(_image(np.asarray(target.array, np.float32), target))
        moving = _image(self.image.astype(np.float32), self)
        transform = _register(_shrunk(fixed, REGISTRATION_VOXELS), _shrunk(moving, REGISTRATION_VOXELS), seed)
        warped = sitk.Resample(_image(self.labels, self), fixed, transform, sitk.sitkNearestNeighbor, 0)
        return sitk.GetArrayFromImage(warped)


def segment_with_atlases(atlases: Sequence[Atlas], target: Volume, *, seed: int = 0, refine: bool = True,
                         progress: Callable[[str, int, int], None] | None = None,
                         cancel: threading.Event | None = None) -> np.ndarray:
    """The atlases' labels warped onto ``target`` and fused: each voxel takes the label most atlases put there
    if at least half of them do, else background. With ``refine``, each label's border is then moved to where
    the target's own intensities put it (``label_refinement.py``)."""
    if not atlases:
        raise InputError("no atlas to register: this adapted model holds none; make it again with 'samfewshot train'.")
    values = sorted({int(v) for atlas in atlases for v in np.unique(atlas.labels) if v != 0})
    votes = np.zeros((len(values),) + target.shape, np.uint16)
    for done, atlas in enumerate(atlases):
        check_cancel(cancel)
        warped = atlas.segment(target, seed)
        for slot, value in enumerate(values):
            votes[slot] += warped == value
        if progress:
            progress("registering atlases", done + 1, len(atlases))
    out = np.zeros(target.shape, label_dtype(max(values)))
    best = votes.argmax(0)
    chosen = np.take_along_axis(votes, best[None], 0)[0]
    majority = (chosen > 0) & (chosen * 2 >= len(atlases))
    out[majority] = np.asarray(values)[best[majority]]
    if not refine:
        return out
    check_cancel(cancel)
    return refine_by_intensity(out, target)


def _image(array: np.ndarray, geometry: Volume | Atlas) -> sitk.Image:
    """``array`` (K, J, I) placed in the patient as ``geometry`` places its voxels."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in geometry.spacing))
    image.SetOrigin(tuple(float(o) for o in geometry.origin))
    image.SetDirection(tuple(float(d) for d in geometry.direction))
    return image


def _shrunk(image: sitk.Image, voxels: int) -> sitk.Image:
    """``image`` averaged over blocks of whole factors per axis so that it has at most ``voxels`` voxels; the
    finer axes are shrunk more (a CT of 0.7 x 0.7 x 5 mm voxels first in-plane)."""
    size, spacing = np.array(image.GetSize(), float), np.array(image.GetSpacing(), float)
    if size.prod() <= voxels:
        return image
    side = (np.prod(size * spacing) / voxels) ** (1.0 / 3.0)  # the voxel side, in mm, that would just fit
    factors = np.maximum(1, np.floor(side / spacing)).astype(int)
    while np.prod(np.ceil(size / factors)) > voxels:
        factors[int(np.argmin(spacing * factors))] += 1
    return sitk.BinShrink(image, [int(f) for f in factors])


def _standardised(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(sitk.Normalize(sitk.Cast(image, sitk.sitkFloat32)), sitk.sitkFloat32)


def _register(fixed: sitk.Image, moving: sitk.Image, seed: int) -> sitk.Transform:
    """Affine (mutual information, from the image centres aligned), then demons on the aligned images."""
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                              sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING, int(seed) % 2**31 + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, AFFINE_ITERATIONS)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetInitialTransform(start, inPlace=False)
    try:
        affine = method.Execute(fixed, moving)
    except RuntimeError as error:
        raise InputError("the atlas could not be registered onto this volume: the two images hardly overlap once "
                         "their centres are aligned. Give a volume that shows the same region as the one the "
                         f"model was trained on. ({' '.join(str(error).split())[-160:]})") from None
    aligned = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
    matched = sitk.HistogramMatching(aligned, fixed, 256, 7)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(DEMONS_ITERATIONS)
    demons.SetStandardDeviations(DEMONS_SMOOTHING)
    field = demons.Execute(fixed, matched)
    transform = sitk.CompositeTransform(3)
    transform.AddTransform(affine)
    transform.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
    return transform
