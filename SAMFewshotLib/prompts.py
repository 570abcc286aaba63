"""Point and box prompts on one slice: plain SAM on a cached slice embedding (the seed paper's baseline).

The user clicks foreground/background points or drags a box on one slice; only SAM's prompt encoder and
mask decoder run (a few tenths of a second on a CPU), because the slice's image embedding comes from the
same ``VolumeEmbeddings`` cache the few-shot propagation uses. An accepted mask becomes a painted slice.

Coordinates are the slice's voxel column and row (``x``, ``y``) as numpy's ``slice_stack`` shows the slice:
for an axial slice of a SimpleITK volume, x is the image's i index and y its j index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .models import SamModel
from .slice_transform import SliceTransform


@dataclass(frozen=True)
class SlicePrompt:
    """Clicks and/or one box on one slice, in slice voxel coordinates.

    Attributes:
        points: (x, y) per click.
        point_labels: 1 for a foreground click, 0 for background, one per point.
        box: (x0, y0, x1, y1), the first and last column and row the box covers (inclusive), or None.
    """

    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None

    @classmethod
    def parse(cls, points: list[str] | None = None, box: str | None = None) -> SlicePrompt:
        """From the command line's 'x,y[,label]' points and 'x0,y0,x1,y1' box."""
        coords, labels = [], []
        for text in points or []:
            try:
                values = [float(v) for v in text.split(",")]
            except ValueError:
                values = []
            if len(values) not in (2, 3) or (len(values) == 3 and values[2] not in (0.0, 1.0)):
                raise InputError(f"point '{text}': use x,y for a foreground click or x,y,0 for a background one.")
            coords.append((values[0], values[1]))
            labels.append(int(values[2]) if len(values) == 3 else 1)
        parsed_box = None
        if box is not None:
            try:
                values = [float(v) for v in box.split(",")]
            except ValueError:
                values = []
            if len(values) != 4:
                raise InputError(f"box '{box}': use x0,y0,x1,y1 (first and last column and row of the box).")
            parsed_box = tuple(values)
        return cls(tuple(coords), tuple(labels), parsed_box)

    @property
    def positive_points(self) -> list[tuple[float, float]]:
        return [p for p, label in zip(self.points, self.point_labels) if label == 1]

    def check(self, slice_shape: tuple[int, int]) -> None:
        """Refuse prompts that cannot give a mask on a slice of this (rows, cols) shape."""
        rows, cols = slice_shape
        if len(self.points) != len(self.point_labels):
            raise InputError("give one label (1 foreground, 0 background) per point.")
        if not self.positive_points and self.box is None:
            raise InputError("give at least one foreground point (x,y) or a box: background points alone "
                             "do not say what to segment.")
        for x, y in self.points:
            if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= cols - 1 and 0 <= y <= rows - 1):
                raise InputError(f"point ({x:g}, {y:g}) is outside the slice (x 0..{cols - 1}, y 0..{rows - 1}).")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not all(np.isfinite(self.box)):
                raise InputError("the box has a coordinate that is not a number.")
            if not (x1 >= x0 and y1 >= y0):
                raise InputError(f"box {self.box}: give it as x0,y0,x1,y1 with x1 >= x0 and y1 >= y0.")
            if x1 < 0 or y1 < 0 or x0 > cols - 1 or y0 > rows - 1:
                raise InputError(f"box {self.box} lies outside the slice (x 0..{cols - 1}, y 0..{rows - 1}).")

    def to_model(self, transform: SliceTransform, device: torch.device):
        """(points, box) as SAM's prompt encoder takes them: model-input pixel coordinates.

        SAM's prompt encoder adds half a pixel itself, so a voxel centre maps to ``(x + 0.5) * scale - 0.5``
        and a box spans from the first voxel's edge to past the last voxel's edge.
        """
        rows, cols = transform.slice_shape
        resized_rows, resized_cols = transform.resized_shape
        scale = np.array([resized_cols / cols, resized_rows / rows], dtype=np.float32)
        points = None
        if self.points:
            coords = (np.asarray(self.points, dtype=np.float32) + 0.5) * scale - 0.5
            points = (torch.as_tensor(coords, device=device)[None],
                      torch.as_tensor(self.point_labels, dtype=torch.int64, device=device)[None])
        box = None
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            corners = np.array([[max(x0, 0), max(y0, 0)], [min(x1, cols - 1) + 1, min(y1, rows - 1) + 1]],
                               dtype=np.float32) * scale - 0.5
            box = torch.as_tensor(corners.reshape(1, 1, 4), device=device)
        return points, box


def decode_prompt(
    model: SamModel,
    embedding: torch.Tensor,
    prompt: SlicePrompt,
    transform: SliceTransform,
    *,
    prompt_encoder: nn.Module | None = None,
    mask_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """SAM's prompt encoder and mask decoder on one cached slice embedding.

    Args:
        embedding: (1, 256, 64, 64) the slice's image embedding.
        prompt_encoder: a learned prompt encoder (``prompt_learning.py``) instead of the model's own.
        mask_logits: (1, 1, 256, 256) a dense mask prompt on SAM's low-resolution grid, or None.
    Returns:
        (rows, cols) logits on the slice grid; > 0 is foreground.
    """
    encoder = prompt_encoder if prompt_encoder is not None else model.prompt_encoder
    points, box = prompt.to_model(transform, embedding.device)
    low_res = decode_low_res(model, encoder, embedding, points, box, mask_logits)
    return transform.model_to_slice(low_res[:, None].float())[0, 0]


def decode_low_res(model: SamModel, encoder: nn.Module, embeddings: torch.Tensor, points, boxes,
                   mask_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 256, 256) SAM's low-resolution logits for prompts already in model space (``to_model``).

    One point alone is ambiguous (a lobe or the whole organ); SAM then offers three masks and a predicted
    IoU for each: the best is kept, as SamPredictor's users do (prompt learning trains exactly this).
    """
    sparse, dense = encoder(points=points, boxes=boxes, masks=mask_logits)
    multimask = boxes is None and points is not None and points[0].shape[1] == 1
    masks, scores = model.mask_decoder(
        image_embeddings=embeddings,
        image_pe=encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )
    if not multimask:
        return masks[:, 0]
    best = torch.argmax(scores, dim=1)
    return masks[torch.arange(masks.shape[0], device=masks.device), best]
