"""Fill between painted slices by following the image: each painted mask is carried slice by slice by 2D
deformable registration, from both ends of a gap, and the two are blended.

Contour interpolation (Slicer's Fill between slices) only sees the two painted shapes, so a structure that
bends, splits or changes shape between them is morphed along a straight path. The image between them shows
where the boundary really goes. Registering each slice onto the next (SimpleITK's symmetric-forces demons, on
intensities normalised over the volume) and warping the painted mask's signed distance along that chain
follows it; the chains from the painted slice below and above a gap are averaged with weights that favour the
nearer one. On the 12 development CT structures this lifts the Dice of the slices between painted ones from
0.86 to 0.91 at k = 5, and on the 13 other CT structures of that volume, never used to choose the settings,
from 0.79 to 0.85 (benchmarks/between_painted.py, docs/benchmarks.md).

The weights also favour the chain that reproduces the painted mask at the far end of the gap better (its
``reach``): a chain that drifted off the structure on the way counts less. Between painted slices that took
the 12 development CT structures and 6 MRI cases from 0.861 to 0.864 at k = 3 (0.912 at k = 5, unchanged), and
the 13 other CT structures from 0.769 to 0.774 (0.855 -> 0.856 at k = 5).

Where the two chains disagree, a part that one chain holds and the other lacks (a structure that appears,
splits or changes topology inside the gap) is kept near the slice that holds it: outside its mask a chain's
distance is clipped to ``OUTSIDE_CLIP`` before the blend, so the chain that lacks the part cannot outvote it
by how far away its own mask lies.

A demons step follows a boundary that moves a few pixels between slices, not a thin structure that moves
further than its own width from one slice to the next (a vessel crossing thick slices obliquely, a vertebra's
or the sacrum's thin processes; these gained most on the development data). Where
the chains reproduce the far painted masks poorly (mean Dice below ``RETRY_BELOW``), the gap is registered
again coarse to fine, each step first on slices shrunk by ``COARSE_SHRINK`` and then at full resolution from
there, and the chains that reach the far painted masks better are kept. Coarse to fine everywhere was better
on bones and winding structures but worse on the vena cava beside the aorta (0.903 -> 0.879 at k = 5), which
the single-resolution chains followed well; choosing by reach keeps the better of the two per gap. Such a gap
is also registered with each chain's steps composed (``RETRIES``): over a long gap, warping each slice's result
on to the next blurs a thin wall or loop away (the colon at k = 3). If the best chains still reach below
``RETRY_BELOW``, their border can be a pixel or more off: the gap's masks are then refined by the intensities
inside and around the structure in that gap (``refine_lost_gap``, ``label_refinement``).

Slices with coarse pixels (the 3 mm development CT) are registered on a grid up to twice as fine: a field
smoothed over one 3 mm pixel is too stiff for a boundary that bends within a pixel or two (see
``FINE_GRID_MM``). The pixel spacing comes with the slices (``NormalisedSlices``, ``GapFillCache``); where it
is not given, the slices' own grid is used.

Registration can also lose the structure on the way (thin, winding or repetitive ones: colon, pancreas; a
long tube on tiny slices). Each chain is run on to the painted slice at the other end of the gap, where the
truth is known, and some gaps are filled by contour interpolation instead (``GapReport``):

- where the two painted masks are alike (Dice >= ``TRUSTED_REACH``): if the chains reproduce the far painted
  mask at most half right, the alike painted shapes are the better guess, and contour interpolation keeps them;
- where the painted masks differ, contour interpolation has little to morph: registration fills the gap even
  if its chains drifted (a drifted chain counts less in the blend, by its reach), unless the image gave it
  nothing to follow (the chains carried each painted mask to the far end unchanged, see ``STILL``).

Until 2026-12-04 the second kind also fell back where the chains did no better than copying one painted mask
onto the other. With the reach weighting and the clipped blend above, registration did better than contour
interpolation in such gaps on the development data (pancreas, colon and vertebra levels at k = 3 / 5 / 10;
docs/benchmarks.md).

Beyond the painted range the same chain, run on from the outermost painted mask, draws the slices that
the walk beyond it reached (``redraw_beyond_painted``): the walk decides how far the structure
goes, the registration how it looks there, no larger than the painted slices' shrinking towards that end
allows.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from .errors import Cancelled
from .label_refinement import refine_by_intensity
from .volume_io import Volume

# Demons settings, in pixels of the slice; fixed on the development data, not per structure. A smoothing of
# 1.0 (was 1.5) lets the field follow boundaries that bend within a few pixels (sacrum, hip, vertebrae): Dice
# between painted slices at k = 3 / 5 went from 0.857 / 0.910 to 0.861 / 0.912 on the 12 development CT
# structures and 6 MRI cases, and from 0.754 / 0.849 to 0.769 / 0.855 on the 13 other CT structures
# (0.75 was better on the latter, worse on the former; 0.5 worse on both).
DEMONS_ITERATIONS = 50
DEMONS_SMOOTHING = 1.0
# the registration sees the bracketing masks' bounding box plus this many pixels around it, shrunk to at most
# MAX_SIDE pixels a side (a 512 x 512 CT's liver then costs what the development CT's 3 mm slices cost)
CROP_MARGIN = 10
MAX_SIDE = 128
# Slices with coarse pixels are registered on a finer grid: up to MAX_REFINE times as fine, so that its pixels
# are at most FINE_GRID_MM (within MAX_SIDE). On the 3 mm development CT, between painted slices at k = 3 / 5 / 10
# (benchmarks/between_painted.py, 2026-12-05), the 12 development CT structures went from 0.896 / 0.924 / 0.946
# to 0.905 / 0.929 / 0.948 and the 13 other CT structures from 0.818 / 0.889 / 0.918 to 0.831 / 0.895 / 0.926
# (vertebrae, sacrum, hip, iliopsoas and veins gained most). What helps is a field smoothed over 1.5 mm instead
# of 3: on the finer grid with the smoothing doubled to the same 3 mm the gain was gone, and smoothing over half
# a pixel on the 3 mm grid is hardly a Gaussian (worse, docs/benchmarks.md). Where pixels are 1 mm already,
# a finer grid gained nothing (the CT resampled to 1 x 1 x 6 mm, within 0.01) or lost (the 4 hippocampus MRI
# crops, k = 3 0.870 -> 0.862), so those grids stay as they are.
FINE_GRID_MM = 1.5
MAX_REFINE = 2.0
# a chain that reproduces the painted mask at the far end of its gap with more than this Dice has kept hold of
# the structure (more overlap than not); two painted masks with at least this Dice are alike
TRUSTED_REACH = 0.5
# A chain whose mask at the far end of its gap still has at least this Dice with the painted mask it started
# from has not moved it: the image gave the registration nothing to follow.
STILL = 0.95
# Before the chains are blended, a chain's distance outside its mask counts at most this many crop pixels:
# outside, a chain only says "not here", not "far from here". Unclipped, the chain from a painted slice that
# lacks a part (the vertebral body above the slice with only the posterior elements) cut that part, with its
# large negative distance, out of the slices where it had already appeared (a synthetic test: Dice of the part
# 0.59 -> 0.99). Between painted slices at k = 3 / 5 (benchmarks/between_painted.py's protocol, 2026-12-03):
# 12 development CT structures and 6 MRI cases 0.864 / 0.912 -> 0.886 / 0.916; the 13 other CT structures
# 0.774 / 0.856 -> 0.805 / 0.871. Over both groups and both k, clipping at 0.5 or 2, or clipping inside too (at
# 1, 2, 3 or 6), was no better (2 was better on the development structures at k = 5 alone); at 0 (the union of
# the two chains) worse.
OUTSIDE_CLIP = 1.0
# A gap whose chains reproduce the far painted masks with a mean Dice below RETRY_BELOW is registered again,
# each step first on the slices shrunk by COARSE_SHRINK (a displacement of several pixels between slices is
# a small one there) and then at full resolution from that start; the chains that reach the far painted masks
# better are kept. Between painted slices at k = 3 / 5 (benchmarks/between_painted.py, every structure of the
# data, 2026-12-05): development CT 0.890 / 0.923 -> 0.896 / 0.924, the 13 other CT structures 0.815 / 0.884 ->
# 0.818 / 0.889, MRI 0.879 / 0.905 -> 0.882 / 0.907. Retrying every gap gave the same to 0.001 for more time
# (6.0 against 4.8 s per structure and k, runs side by side); retrying below 0.5 a little less (MRI k = 5 0.905).
RETRY_BELOW = 0.7
COARSE_SHRINK = 2
# A long chain warps its last result on to the next slice at each step, and each linear resampling blurs the
# signed distance a little: over the 36 steps of a gap at k = 3 a thin wall or a narrow loop can fade away.
# Composing the steps' fields and warping the painted mask's distance once avoids that; on most gaps it made
# no difference or a slightly worse one (the blur also smooths), so it is one more retry for the gaps that
# registration loses, kept by reach like the coarse-to-fine one: (coarse_first, composed) in the order tried.
# Between painted slices (benchmarks/between_painted.py, every structure, 2026-12-05): the 13 other CT structures
# 0.831 / 0.895 / 0.926 -> 0.837 / 0.895 / 0.926 at k = 3 / 5 / 10 (colon k = 3 0.625 -> 0.700, pancreas 0.516 ->
# 0.525), the development CT 0.905 / 0.929 / 0.948 -> 0.906 / 0.929 / 0.947, MRI 0.882 / 0.907 / 0.929 -> 0.881 /
# 0.906 / 0.929 (vena cava k = 10 0.920 -> 0.913, sacrum k = 5 0.873 -> 0.868, hippocampus 322 k = 3 0.880 -> 0.876).
RETRIES = ((True, False), (False, True), (True, True))
MIN_COARSE_SIDE = 16  # a crop smaller than this (registration grid pixels) is not shrunk
_OUTSIDE = -1e3  # signed distance for "far outside" where a warp samples beyond the crop


@dataclass
class GapReport:
    """How one gap between two painted slices of a label was filled."""

    label: int
    below: int  # painted slice below the gap
    above: int  # painted slice above the gap
    reach: float  # mean Dice of the two chains' masks with the painted mask at the far end
    copy_dice: float  # Dice of the two painted masks with each other (what copying one onto the other gives)
    registered: bool  # True: filled by registration; False: by contour interpolation


class NormalisedSlices:
    """The slices' intensities scaled to 0..1 between the volume's 0.5th and 99.5th percentiles (any modality),
    computed for the part that is read: registration reads crops around the structure, and scaling a whole
    512 x 512 x 300 CT at once took 4 s and 300 MB. Index it as the (N, rows, cols) array it stands for.
    ``pixel_spacing``: (row, col) spacing of the slices in mm, if known (see ``FINE_GRID_MM``); ``slice_spacing``:
    the spacing between them in mm, if known (see ``refine_lost_gap``)."""

    def __init__(self, slices: np.ndarray, pixel_spacing: tuple[float, float] | None = None,
                 slice_spacing: float | None = None):
        self._slices = slices
        self.pixel_spacing, self.slice_spacing = pixel_spacing, slice_spacing
        self.low, self.high = np.percentile(np.asarray(slices, dtype=np.float32), [0.5, 99.5])

    def __getitem__(self, key) -> np.ndarray:
        values = np.asarray(self._slices[key], dtype=np.float32)
        return np.clip((values - self.low) / max(float(self.high - self.low), 1e-6), 0.0, 1.0).astype(np.float32)

    def original(self, key) -> np.ndarray:
        """The slices' own intensities (not scaled or clipped)."""
        return np.asarray(self._slices[key], dtype=np.float32)


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Positive inside, negative outside, in pixels."""
    if not mask.any():
        return np.full(mask.shape, _OUTSIDE, np.float32)
    return (ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)).astype(np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def carry_along(intensities: np.ndarray, start: int, stop: int, distance: np.ndarray, *, coarse_first: bool = False,
                composed: bool = False) -> dict[int, np.ndarray]:
    """Warp a signed distance map from slice ``start`` through every slice up to ``stop`` (inclusive).

    Args:
        intensities: (N, rows, cols) normalised slices.
        distance: (rows, cols) signed distance of the mask on slice ``start``.
        coarse_first: register each step on the slices shrunk by ``COARSE_SHRINK`` first, then at full
            resolution from there (see ``RETRY_BELOW``).
        composed: warp ``distance`` itself by the steps' fields composed, instead of warping each slice's
            result on to the next (see ``RETRIES``).
    Returns:
        slice index -> (rows, cols) the warped signed distance on that slice.
    """
    import SimpleITK as sitk

    step = 1 if stop > start else -1
    original = sitk.GetImageFromArray(distance.astype(np.float32))
    current = original
    total = None  # composed: the displacement from each point of the current slice to the start slice
    # one thread: on images this small, thread start-up costs more than it saves (3x faster on 2 cores)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(DEMONS_ITERATIONS)
    demons.SetStandardDeviations(DEMONS_SMOOTHING)
    demons.SetNumberOfThreads(1)
    warp = sitk.ResampleImageFilter()
    warp.SetInterpolator(sitk.sitkLinear)
    warp.SetDefaultPixelValue(_OUTSIDE)
    warp.SetNumberOfThreads(1)
    out = {}
    for index in range(start + step, stop + step, step):
        fixed = sitk.GetImageFromArray(intensities[index])
        moving = sitk.GetImageFromArray(intensities[index - step])
        if coarse_first:
            shrink = [COARSE_SHRINK] * 2
            coarse = demons.Execute(sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, 1.0), shrink),
                                    sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, 1.0), shrink))
            # the coarse field is in physical units (pixels of the full grid), so it carries over as it is
            field = demons.Execute(fixed, moving, sitk.Resample(coarse, fixed, sitk.Transform(), sitk.sitkLinear,
                                                                0.0, coarse.GetPixelID()))
        else:
            field = demons.Execute(fixed, moving)
        warp.SetReferenceImage(fixed)
        if composed:
            total = _composed(total, sitk.GetArrayFromImage(field), fixed)
            warp.SetTransform(sitk.DisplacementFieldTransform(_field_image(total)))
            current = warp.Execute(original)
        else:
            warp.SetTransform(sitk.DisplacementFieldTransform(field))
            current = warp.Execute(current)
        out[index] = sitk.GetArrayFromImage(current)
    return out


def _field_image(displacement: np.ndarray):
    """A (rows, cols, 2) displacement as a SimpleITK image of its own (a displacement field transform takes
    over the image it is given)."""
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.array(displacement, dtype=np.float64), isVector=True)


def _composed(total: np.ndarray | None, field: np.ndarray, reference) -> np.ndarray:
    """The displacement ``field`` (this slice -> the previous one) followed by ``total`` (the previous slice ->
    the start): field(x) + total(x + field(x)) on the grid of the SimpleITK image ``reference``, zero
    displacement beyond it."""
    import SimpleITK as sitk

    if total is None:
        return field
    carried = sitk.Resample(_field_image(total), reference, sitk.DisplacementFieldTransform(_field_image(field)),
                            sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return field + sitk.GetArrayFromImage(carried)


def _crop(masks: Sequence[np.ndarray]) -> tuple[slice, slice]:
    union = np.logical_or.reduce(masks)
    rows, cols = np.nonzero(union)
    shape = union.shape
    return (slice(max(int(rows.min()) - CROP_MARGIN, 0), min(int(rows.max()) + CROP_MARGIN + 1, shape[0])),
            slice(max(int(cols.min()) - CROP_MARGIN, 0), min(int(cols.max()) + CROP_MARGIN + 1, shape[1])))


class _RegistrationGrid:
    """A crop of the slices, shrunk to at most ``MAX_SIDE`` pixels a side for registration, or made finer where
    its pixels are coarse (``FINE_GRID_MM``). Distances stay in crop pixels on both grids, so that thresholding
    at 0 means the same everywhere."""

    def __init__(self, masks: Sequence[np.ndarray], pixel_spacing: tuple[float, float] | None = None):
        self.window = _crop(masks)
        self.crop_shape = masks[0][self.window].shape
        finer = 1.0 if pixel_spacing is None else min(MAX_REFINE, max(1.0, min(pixel_spacing) / FINE_GRID_MM))
        self.scale = min(finer, MAX_SIDE / max(self.crop_shape))
        self.small = tuple(max(int(round(n * self.scale)), 1) for n in self.crop_shape)

    def shrink(self, array: np.ndarray) -> np.ndarray:
        """(..., rows, cols) of the crop -> the registration's grid."""
        if self.scale == 1.0:
            return array
        return resize(array, array.shape[:-2] + self.small, order=1, preserve_range=True, anti_aliasing=True
                      ).astype(np.float32)

    def region(self, intensities: NormalisedSlices, first: int, last: int) -> np.ndarray:
        """Slices ``first`` to ``last`` (inclusive) of the crop, on the registration's grid."""
        return self.shrink(intensities[first:last + 1, self.window[0], self.window[1]])

    def on_crop(self, distance: np.ndarray) -> np.ndarray:
        """A signed distance on the registration's grid -> the mask on the crop."""
        if self.scale == 1.0:
            return distance > 0
        return resize(distance, self.crop_shape, order=1, preserve_range=True, anti_aliasing=False) > 0


class _Chains(NamedTuple):
    """The two chains of a gap: slice offset in the gap -> warped signed distance, up from the painted slice below
    and down from the one above; the reach of each (Dice with the painted mask at its far end); whether either
    moved its painted mask at all (see ``STILL``)."""

    up: dict[int, np.ndarray]
    down: dict[int, np.ndarray]
    reach_up: float
    reach_down: float
    moved: bool

    @property
    def reach(self) -> float:
        return 0.5 * (self.reach_up + self.reach_down)


def _chains(grid: _RegistrationGrid, region: np.ndarray, below_mask: np.ndarray, above_mask: np.ndarray,
            coarse_first: bool = False, composed: bool = False) -> _Chains:
    """The two chains of a gap whose first and last slice of ``region`` are the painted ones."""
    window, last = grid.window, region.shape[0] - 1
    # The two chains are independent, and SimpleITK lets go of Python's lock while it registers: the chain up
    # runs in a thread of its own while this one carries the chain down (each registration stays on one thread,
    # so the result is the same as one after the other).
    with ThreadPoolExecutor(max_workers=1) as pool:
        up = pool.submit(carry_along, region, 0, last, grid.shrink(signed_distance(below_mask[window])),
                         coarse_first=coarse_first, composed=composed)
        down = carry_along(region, last, 0, grid.shrink(signed_distance(above_mask[window])),
                           coarse_first=coarse_first, composed=composed)
        up = up.result()
    up_end, down_end = grid.on_crop(up[last]), grid.on_crop(down[0])
    moved = min(_dice(up_end, below_mask[window]), _dice(down_end, above_mask[window])) < STILL
    return _Chains(up, down, _dice(up_end, above_mask[window]), _dice(down_end, below_mask[window]), moved)


def fill_gap(intensities: NormalisedSlices, below_mask: np.ndarray, above_mask: np.ndarray, below: int, above: int
             ) -> tuple[dict[int, np.ndarray], float, bool]:
    """Masks on the slices strictly between ``below`` and ``above`` from the two registration chains.

    Returns:
        (slice index -> boolean mask, reach: mean Dice of each chain with the painted mask at its far end,
        moved: whether either chain moved its painted mask at all on the way, see ``STILL``).
    """
    grid = _RegistrationGrid([below_mask, above_mask], intensities.pixel_spacing)
    region = grid.region(intensities, below, above)
    chains = _chains(grid, region, below_mask, above_mask)
    if chains.reach < RETRY_BELOW and min(grid.small) >= MIN_COARSE_SIDE:
        for coarse_first, composed in RETRIES:
            retry = _chains(grid, region, below_mask, above_mask, coarse_first=coarse_first, composed=composed)
            if retry.reach > chains.reach:
                chains = retry
    masks = {}
    for index in range(below + 1, above):
        # nearer chain weighs more, and so does the chain that kept hold of the structure better over the gap
        along = (index - below) / (above - below)
        from_below, from_above = (1.0 - along) * max(chains.reach_up, 1e-3), along * max(chains.reach_down, 1e-3)
        weight = from_above / (from_below + from_above)
        mask = np.zeros(below_mask.shape, bool)
        up_distance = np.maximum(chains.up[index - below], -OUTSIDE_CLIP)
        down_distance = np.maximum(chains.down[index - below], -OUTSIDE_CLIP)
        mask[grid.window] = grid.on_crop((1.0 - weight) * up_distance + weight * down_distance)
        masks[index] = mask
    if chains.reach < RETRY_BELOW:
        masks = refine_lost_gap(intensities, masks, below_mask, above_mask, below, above)
    return masks, chains.reach, chains.moved


def refine_lost_gap(intensities: NormalisedSlices, masks: dict[int, np.ndarray], below_mask: np.ndarray,
                    above_mask: np.ndarray, below: int, above: int) -> dict[int, np.ndarray]:
    """``masks`` with their borders moved to where the gap's intensities put them (``label_refinement``).

    Used where the chains lost the structure (they reach the far painted masks with a mean Dice below
    ``RETRY_BELOW`` after any retries): there the registered border can be a pixel or more off, and the
    intensities inside and around the structure in this gap say better where it lies. Where the chains held
    it, the border is right to about a pixel and refining everywhere lost (spleen, left atrium). The painted
    masks at both ends take part (they are the surest "inside"), and are not changed.
    """
    rows_mm, cols_mm = intensities.pixel_spacing or (1.0, 1.0)
    slice_mm = intensities.slice_spacing or float(min(rows_mm, cols_mm))
    stack = np.stack([below_mask] + [masks[i] for i in range(below + 1, above)] + [above_mask]).astype(np.uint8)
    volume = Volume(intensities.original(slice(below, above + 1)), (float(cols_mm), float(rows_mm), float(slice_mm)),
                    (0.0, 0.0, 0.0), tuple(float(v) for v in np.eye(3).ravel()))
    refined = refine_by_intensity(stack, volume) == 1
    return {index: refined[index - below] for index in range(below + 1, above)}


class GapFillCache:
    """Registration results on one stack of slices, kept between propagations of the same volume.

    A clinician corrects or adds a slice and propagates again (the Slicer module passes the previous
    adaptation, ``pipeline.adapt_to_painted``'s ``previous``): that changes the gaps next to that slice only.
    This keeps the normalised intensities and each gap's fill, keyed by its painted slices and their masks,
    so the other gaps are not registered again. On a 512 x 512 x 300 CT with 5 painted liver slices and one
    added (benchmarks/speed.py's case), the propagation after adaptation took 6.1 s instead of 17.8 s, with the
    same labels. Only the gaps of the latest fill are kept (``forget_unused``).
    ``pixel_spacing``, ``slice_spacing``: as for ``NormalisedSlices``.
    """

    def __init__(self, slices: np.ndarray, pixel_spacing: tuple[float, float] | None = None,
                 slice_spacing: float | None = None):
        self._slices = slices
        self._pixel_spacing, self._slice_spacing = pixel_spacing, slice_spacing
        self._intensities = None
        self._gaps: dict[tuple, tuple[dict[int, np.ndarray], tuple[int, int], float, bool]] = {}
        self._used: set[tuple] = set()  # the gaps asked for since the last ``forget_unused``

    @property
    def intensities(self) -> NormalisedSlices:
        """The slices' ``NormalisedSlices``."""
        if self._intensities is None:
            self._intensities = NormalisedSlices(self._slices, self._pixel_spacing, self._slice_spacing)
        return self._intensities

    def fill_gap(self, below_mask: np.ndarray, above_mask: np.ndarray, below: int, above: int
                 ) -> tuple[dict[int, np.ndarray], float, bool]:
        """``fill_gap`` on these slices, from the cache where this gap was filled before."""
        key = (below, above, _digest(below_mask), _digest(above_mask))
        self._used.add(key)
        if key not in self._gaps:
            masks, reach, moved = fill_gap(self.intensities, below_mask, above_mask, below, above)
            # bits, not bytes: a large organ's gaps on 512 x 512 slices would otherwise hold tens of MB
            self._gaps[key] = ({i: np.packbits(m) for i, m in masks.items()}, below_mask.shape, reach, moved)
        packed, shape, reach, moved = self._gaps[key]
        count = int(np.prod(shape))
        masks = {i: np.unpackbits(bits, count=count).reshape(shape).astype(bool) for i, bits in packed.items()}
        return masks, reach, moved

    def forget_unused(self) -> None:
        """Keep only the gaps asked for since the last call (those of the latest fill)."""
        self._gaps = {key: value for key, value in self._gaps.items() if key in self._used}
        self._used = set()


def _digest(mask: np.ndarray) -> bytes:
    return hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).digest()


def fill_between_by_registration(
    slices: np.ndarray,
    labels: np.ndarray,
    painted_indices: Sequence[int],
    interpolated: np.ndarray | Callable[[], np.ndarray],
    *,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: threading.Event | None = None,
    cache: GapFillCache | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    slice_spacing: float | None = None,
) -> tuple[np.ndarray, list[GapReport]]:
    """Fill every label between its painted slices by registration, falling back to ``interpolated``.

    Args:
        slices: (N, rows, cols) image slices along the painted axis.
        labels: (N, rows, cols) the user's labels (non-zero only on painted slices).
        painted_indices: the painted slices.
        interpolated: (N, rows, cols) contour interpolation of ``labels`` (``baselines.fill_between_slices``),
            used for a gap the registration cannot fill (see the module docstring); or a function returning
            it, called only if some gap needs it (loading ITK's interpolator alone takes ~10 s).
        progress: called with ("registering", gaps done, gaps) after each gap; ``cancel`` is checked before each.
        cache: the previous propagation's registration results on these slices (``GapFillCache``): gaps
            whose painted masks are unchanged are taken from it, and it keeps this fill's gaps.
        pixel_spacing: (row, col) spacing of the slices in mm, used where no ``cache`` is given (a cache has
            its own); None: the slices' own grid, never refined (``FINE_GRID_MM``). ``slice_spacing``: the
            spacing between the slices in mm, likewise (None: taken as the pixels').
    Returns:
        The filled label stack (painted slices unchanged; where labels overlap, the smaller value wins, as in
        contour interpolation) and a report per gap.
    """
    cache = GapFillCache(slices, pixel_spacing, slice_spacing) if cache is None else cache
    painted = sorted(set(int(i) for i in painted_indices))
    result = np.zeros_like(labels)
    result[painted] = labels[painted]
    gaps = []
    for value in sorted(int(v) for v in np.unique(labels[painted]) if v != 0):
        with_value = [i for i in painted if np.any(labels[i] == value)]
        gaps += [(value, below, above) for below, above in zip(with_value[:-1], with_value[1:])
                 if any(i not in painted for i in range(below + 1, above))]
    reports, fallback = [], None
    for done, (value, below, above) in enumerate(gaps):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled; nothing was written.")
        below_mask, above_mask = labels[below] == value, labels[above] == value
        masks, reach, moved = cache.fill_gap(below_mask, above_mask, below, above)
        copy_dice = _dice(below_mask, above_mask)
        registered = reach > TRUSTED_REACH if copy_dice >= TRUSTED_REACH else moved
        reports.append(GapReport(value, below, above, reach, copy_dice, registered))
        if not registered and fallback is None:
            fallback = interpolated() if callable(interpolated) else interpolated
        for index in (i for i in range(below + 1, above) if i not in painted):
            mask = masks[index] if registered else fallback[index] == value
            result[index][mask & (result[index] == 0)] = value
        if progress:
            progress("registering", done + 1, len(gaps))
    cache.forget_unused()
    return result, reports


def redraw_beyond_painted(intensities: NormalisedSlices, result: np.ndarray, labels: np.ndarray,
                          painted_indices: Sequence[int], value: int, walked: Sequence[int]) -> None:
    """Redraw label ``value`` on the slices a walk beyond its painted range wrote (``walked``), in place: the
    outermost painted mask on that side carried slice by slice by registration, as between painted slices.

    The walk (SAM box-prompted from slice to slice, ``prompt_walk_beyond_painted``) still decides how far the
    structure goes; registration draws it there. At k = 5 on the development data this drew the walked slices
    better than SAM's outlines did (the hip bone's Dice 0.846 -> 0.879, the aorta's 0.839 -> 0.853; see
    docs/benchmarks.md). A slice where the carried mask vanishes keeps the walk's outline.

    Where the image shows no border (a structure running into a neighbour of its own intensity), the carried mask
    stays as large as the painted one up to where the walk stopped, past the structure's end. So where the
    structure shrank from its next painted slice to the outermost one, each drawn slice is eroded (``tapered``)
    to the area that shrinking, continued at the same rate per slice, leaves; slices where it leaves nothing are
    emptied. A structure that widened towards its end (the hip bone's wing) is not touched. On the 31 pairs of the
    development data this changed 20 of 93 pair/k rows (a left atrium at k = 5 0.905 -> 0.917, the small bowel
    0.788 -> 0.806, vertebra L1 at k = 3 0.898 -> 0.886; mean at k = 5 0.898 -> 0.899; docs/benchmarks.md).

    Args:
        intensities: ``NormalisedSlices`` of the slices.
        result: (N, rows, cols) the label stack the walk wrote into.
        labels: (N, rows, cols) the user's labels (non-zero only on painted slices); ``painted_indices`` the
            painted slices.
    """
    with_value = [i for i in sorted(set(int(i) for i in painted_indices)) if np.any(labels[i] == value)]
    if not with_value or not walked:
        return
    for start, side in ((with_value[0], sorted((i for i in walked if i < with_value[0]), reverse=True)),
                        (with_value[-1], sorted(i for i in walked if i > with_value[-1]))):
        if not side:
            continue
        start_mask = labels[start] == value
        # the crop holds the painted mask and every outline the walk drew, so the carried mask stays inside it
        grid = _RegistrationGrid([start_mask] + [result[i] == value for i in side], intensities.pixel_spacing)
        first, last = min(start, side[-1]), max(start, side[-1])
        carried = carry_along(grid.region(intensities, first, last), start - first, side[-1] - first,
                              grid.shrink(signed_distance(start_mask[grid.window])))
        neighbour = (with_value[1] if side[0] < start else with_value[-2]) if len(with_value) > 1 else None
        shrinking = 0.0 if neighbour is None else _shrink_per_slice(labels, value, start, neighbour)
        for index in side:
            drawn = np.zeros(start_mask.shape, bool)
            drawn[grid.window] = grid.on_crop(carried[index - first])
            here = result[index]
            if drawn.any():
                here[here == value] = 0
                here[drawn & (here == 0)] = value
            if shrinking > 0.0:
                mask = here == value
                kept = tapered(mask, start_mask.sum() - shrinking * abs(index - start), intensities.pixel_spacing)
                here[mask & ~kept] = 0


def _shrink_per_slice(labels: np.ndarray, value: int, end: int, neighbour: int) -> float:
    """Voxels a slice by which label ``value``'s painted cross-section shrinks from the painted slice
    ``neighbour`` towards the outermost one, ``end``; 0 where it does not shrink."""
    change = float(np.sum(labels[neighbour] == value)) - float(np.sum(labels[end] == value))
    return max(change, 0.0) / abs(end - neighbour)


def tapered(mask: np.ndarray, area: float, pixel_spacing: tuple[float, float] | None = None) -> np.ndarray:
    """``mask`` eroded ring by ring (by its distance map) while it still holds at least ``area`` voxels; empty
    where ``area`` is not positive."""
    if area <= 0:
        return np.zeros_like(mask)
    if area >= mask.sum():
        return mask
    depth = ndimage.distance_transform_edt(mask, sampling=pixel_spacing)
    return depth >= np.sort(depth[mask])[-int(np.ceil(area))]  # as deep as the area-th deepest voxel
