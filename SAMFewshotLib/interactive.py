"""One volume opened for clicking: its slice embeddings stay cached, so each prompt runs only SAM's decoder.

``InteractiveSession`` is what the ``samfewshot click`` command and the Slicer module's point/box controls
use: ask for a mask from prompts on a slice (plain SAM, zero-shot from clicks, or a prompt encoder learned
from painted slices), then add the accepted mask to the painted label map, where few-shot propagation
takes it as one more painted slice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .embeddings import ProgressCallback, VolumeEmbeddings, slice_stack
from .errors import InputError
from .intensity import IntensityWindow
from .models import DEFAULT_MODEL, SamModel
from .painted_slices import AXIS_NAMES, anatomical_name, default_slice_axis, numpy_axis_for
from .prompts import SlicePrompt, decode_prompt
from .volume_io import Volume, check_volume, label_dtype


@dataclass
class SliceMask:
    """A mask predicted on one slice."""

    index: int  # slice index along the session's axis
    mask: np.ndarray  # (rows, cols) bool
    probability: np.ndarray  # (rows, cols) float32 in [0, 1]


class InteractiveSession:
    """The slices of one volume along one axis, ready for prompts.

    Args:
        image: the volume.
        axis: "auto" (the axis of largest spacing, as for painted slices), "axial", "coronal", "sagittal"
            or a numpy axis.
        embeddings: the volume's ``VolumeEmbeddings`` when they already exist (then ``axis``, ``model``,
            ``window`` and ``cache_dir`` are theirs).
    """

    def __init__(
        self,
        image: Volume,
        *,
        axis: str | int = "auto",
        model: str | SamModel = DEFAULT_MODEL,
        device: str = "auto",
        cache_dir=None,
        window: IntensityWindow | str | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        embeddings: VolumeEmbeddings | None = None,
    ):
        from .pipeline import get_model

        self.image = image
        if embeddings is not None:  # an adaptation's, whose volume was checked already: share them
            self.axis, self.model, self.embeddings = embeddings.axis, embeddings.model, embeddings
            self.axis_name = anatomical_name(image.direction_matrix, self.axis)
            return
        check_volume(image)
        self.axis = resolve_axis(axis, image)
        self.axis_name = anatomical_name(image.direction_matrix, self.axis)
        window = window if isinstance(window, IntensityWindow) else IntensityWindow.parse(window)
        self.model = model if isinstance(model, SamModel) else get_model(model, device)
        self.embeddings = VolumeEmbeddings(self.model, image, self.axis, window=window, cache_dir=cache_dir,
                                           progress=progress, cancel=cancel)

    @property
    def num_slices(self) -> int:
        return self.embeddings.num_slices

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.embeddings.transform.slice_shape

    def slice_pixels(self, index: int) -> np.ndarray:
        """(rows, cols) raw voxel values of one slice."""
        return self.embeddings.slices[self.check_index(index)]

    def check_index(self, index: int) -> int:
        if not (isinstance(index, (int, np.integer)) and 0 <= index < self.num_slices):
            raise InputError(f"slice {index} does not exist: the volume has {self.num_slices} {self.axis_name} "
                             f"slices (0..{self.num_slices - 1}).")
        return int(index)

    @torch.inference_mode()
    def segment(
        self,
        index: int,
        prompt: SlicePrompt,
        *,
        prompt_encoder: nn.Module | None = None,
        mask_logits: torch.Tensor | None = None,
    ) -> SliceMask:
        """The mask SAM predicts on slice ``index`` from ``prompt`` (only the decoder runs once encoded)."""
        index = self.check_index(index)
        prompt.check(self.slice_shape)
        embedding = self.embeddings.get([index])
        logits = decode_prompt(self.model, embedding, prompt, self.embeddings.transform,
                               prompt_encoder=prompt_encoder, mask_logits=mask_logits)
        probability = torch.sigmoid(logits).cpu().numpy().astype(np.float32)
        return SliceMask(index, probability > 0.5, probability)

    def add_to_labels(self, masks: list[SliceMask], label: int, painted: np.ndarray | None = None) -> np.ndarray:
        """A (K, J, I) label map: ``painted`` (or an empty map) with ``masks`` written as ``label``.

        Only unlabelled voxels are written: what the user painted is never overwritten.
        """
        if not (isinstance(label, (int, np.integer)) and 1 <= label <= 255):
            raise InputError(f"label {label}: use a whole number from 1 to 255.")
        if painted is not None and painted.shape != self.image.shape:
            raise InputError(f"the label map is {painted.shape}, the image {self.image.shape}: they must match.")
        top = max(int(label), int(painted.max()) if painted is not None and painted.size else 0)
        out = np.zeros(self.image.shape, label_dtype(top)) if painted is None else painted.astype(label_dtype(top))
        stack = slice_stack(out, self.axis)  # a view: writing it writes ``out``
        for item in masks:
            view = stack[item.index]
            view[item.mask & (view == 0)] = label
        return out


def resolve_axis(axis: str | int, image: Volume) -> int:
    """'auto' (largest spacing), an anatomical name, or a numpy axis -> numpy axis."""
    if isinstance(axis, (int, np.integer)):
        if not 0 <= axis <= 2:
            raise InputError(f"axis {axis}: use 0, 1 or 2.")
        return int(axis)
    if axis in (None, "", "auto"):
        return default_slice_axis(image.spacing)
    if axis not in AXIS_NAMES:
        raise InputError(f"unknown axis '{axis}'; use auto, axial, coronal or sagittal.")
    return numpy_axis_for(axis, image.direction_matrix)
