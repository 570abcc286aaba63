"""Refine a roughly placed label map with the image's own intensities.

A label map registered from another patient (``atlas.py``) has the structure's shape and place but is a few
voxels off along its border, where the two anatomies differ. The target image itself says where the border
is: for each label, the intensities inside it and those in a ring around it give two histograms, and each
voxel near the border takes the label if

    prior x P(intensity | structure) > (1 - prior) x P(intensity | around it),

with the prior the label's mask smoothed over an eighth of the structure's radius: deep inside or far outside
the registered mask the prior decides, near its border the intensities do. Measured on the development MRI
with reference masks as atlases (one atlas per target, 2026-12-04): hippocampus 0.806 -> 0.828 mean Dice
over 4 pairs, left atrium 0.790 -> 0.823 over 2; three hippocampus atlases voting 0.841 -> 0.849.

Both scales are fractions of the structure's own size (the radius of a ball of its volume), not constants
per structure: smoothing over an eighth of it, the ring out to half of it (0.1-0.15 and 0.5-0.75 gave the same
within 0.005 on both datasets). A structure no brighter or darker than its surroundings keeps its registered
mask, rounded slightly where the smoothing meets sharp corners.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .volume_io import Volume

PRIOR_SMOOTHING = 1 / 8  # of the structure's radius
RING = 1 / 2  # of the structure's radius: how far out "around it" reaches
HISTOGRAM_BINS = 64
HISTOGRAM_SMOOTHING = 1.5  # bins
POSTERIOR_SMOOTHING = 0.5  # voxels: a single voxel's noise does not flip it
MIN_VOXELS = 64  # a structure with fewer voxels inside than this keeps its mask (too few for a histogram)


def refine_by_intensity(labels: np.ndarray, image: Volume) -> np.ndarray:
    """``labels`` (K, J, I, on ``image``'s grid) with each label's border moved to where ``image``'s intensities
    put it; a voxel claimed by two labels takes the more probable one."""
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        return labels
    spacing = np.asarray(image.spacing, float)[::-1]  # (K, J, I) order
    intensities = np.asarray(image.array, np.float32)
    best = np.full(labels.shape, 0.5, np.float32)  # a label needs a posterior above one half
    out = np.zeros_like(labels)
    for value in values:
        mask = labels == value
        found = _posterior(mask, intensities, spacing)
        if found is None:  # kept as registered, and not given up to a neighbour's refinement
            out[mask] = value
            best[mask] = 1.0
            continue
        box, posterior = found
        wins = posterior > best[box]
        out[box][wins] = value
        best[box][wins] = posterior[wins]
    return out


def _posterior(mask: np.ndarray, intensities: np.ndarray, spacing: np.ndarray):
    """(box, posterior of the label in the box), or None where the structure is too small to refine."""
    radius = (3.0 * mask.sum() * float(np.prod(spacing)) / (4.0 * np.pi)) ** (1.0 / 3.0)  # mm
    reach = np.ceil((RING + 3 * PRIOR_SMOOTHING) * radius / spacing).astype(int) + 2
    corners = np.argwhere(mask)
    box = tuple(slice(max(int(lo) - r, 0), min(int(hi) + r + 1, n))
                for lo, hi, r, n in zip(corners.min(0), corners.max(0), reach, mask.shape))
    inside, picture = mask[box], intensities[box]
    core = ndimage.binary_erosion(inside)  # the registered border itself is uncertain
    ring = ~inside & (ndimage.distance_transform_edt(~inside, sampling=spacing) <= RING * radius)
    if core.sum() < MIN_VOXELS or ring.sum() < MIN_VOXELS:
        return None
    sample = np.concatenate([picture[core], picture[ring]])
    low, high = np.percentile(sample, [1, 99])
    if not high > low:
        return None
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    bins = np.clip(np.searchsorted(edges, picture, side="right") - 1, 0, HISTOGRAM_BINS - 1)
    likelihood = [_density(picture[part], edges)[bins] for part in (core, ring)]
    prior = np.clip(ndimage.gaussian_filter(inside.astype(np.float32), PRIOR_SMOOTHING * radius / spacing),
                    1e-3, 1 - 1e-3)
    posterior = prior * likelihood[0] / (prior * likelihood[0] + (1 - prior) * likelihood[1])
    return box, ndimage.gaussian_filter(posterior.astype(np.float32), POSTERIOR_SMOOTHING)


def _density(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), edges)
    density = ndimage.gaussian_filter1d(counts / max(len(values), 1), HISTOGRAM_SMOOTHING)
    return density + 1e-3 / len(density)  # an intensity never seen on one side is unlikely, not impossible
