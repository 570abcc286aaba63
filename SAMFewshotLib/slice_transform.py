"""Mapping between a 2D slice's voxel grid and the model's square input, written once.

SAM resizes the longest side to its input size and pads the bottom and right (``ResizeLongestSide``).
We do the same in physical space, so that a slice with non-square pixels (a coronal slice of a volume with
thick axial slices) reaches the model with its true aspect ratio. The inverse maps the decoder's
low-resolution logits back onto the slice's voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SliceTransform:
    """Geometry of one slice shape in one model's input space.

    Attributes:
        slice_shape: (rows, cols) of the slice in voxels.
        pixel_spacing: (row spacing, col spacing) in mm.
        image_size: the model's square input side (256 for LiteMedSAM, 1024 for SAM).
    """

    slice_shape: tuple[int, int]
    pixel_spacing: tuple[float, float]
    image_size: int

    @property
    def resized_shape(self) -> tuple[int, int]:
        """(rows, cols) the slice occupies in model space before padding."""
        rows, cols = self.slice_shape
        height, width = rows * self.pixel_spacing[0], cols * self.pixel_spacing[1]
        scale = self.image_size / max(height, width)
        return (
            int(np.clip(round(height * scale), 1, self.image_size)),
            int(np.clip(round(width * scale), 1, self.image_size)),
        )

    def image_to_model(self, slices: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) float -> (B, 1, S, S): resized with the physical aspect, zero-padded."""
        resized = F.interpolate(
            slices[:, None].float(), size=self.resized_shape, mode="bilinear", align_corners=False, antialias=True
        )
        return self._pad(resized)

    def mask_to_model(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) {0,1} -> (B, 1, S, S) fraction of each model pixel covered by the mask."""
        resized = F.interpolate(
            masks[:, None].float(), size=self.resized_shape, mode="bilinear", align_corners=False, antialias=True
        )
        return self._pad(resized.clamp(0, 1))

    def model_to_slice(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, s, s) logits on any square model-space grid -> (B, C, rows, cols) on the slice grid."""
        grid = logits.shape[-1]
        rows, cols = self.resized_shape
        valid = (max(1, round(rows * grid / self.image_size)), max(1, round(cols * grid / self.image_size)))
        cropped = logits[..., : valid[0], : valid[1]]
        return F.interpolate(cropped, size=self.slice_shape, mode="bilinear", align_corners=False)

    def mask_to_grid(self, masks: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, rows, cols) {0,1} -> (B, grid, grid) area fraction per cell of a model-space grid (e.g. 64)."""
        model = self.mask_to_model(masks)
        return F.adaptive_avg_pool2d(model, grid)[:, 0]

    def _pad(self, resized: torch.Tensor) -> torch.Tensor:
        rows, cols = resized.shape[-2:]
        return F.pad(resized, (0, self.image_size - cols, 0, self.image_size - rows))
