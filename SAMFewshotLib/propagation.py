"""Prediction over the volume: run the adapted decoders slice by slice and assemble a label map."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .embeddings import VolumeEmbeddings, check_cancel
from .fewshot_decoder import FewShotMaskDecoder


@torch.inference_mode()
def predict_probabilities(
    decoders: dict[int, FewShotMaskDecoder],
    targets: dict[int, torch.Tensor],
    embeddings: VolumeEmbeddings,
    indices: Sequence[int],
    *,
    batch_size: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict[int, np.ndarray]:
    """Foreground probability per label on the given slices.

    Returns:
        label -> (len(indices), rows, cols) float32 probabilities on the slice voxel grid.
    """
    device = embeddings.model.device
    rows, cols = embeddings.transform.slice_shape
    out = {label: np.zeros((len(indices), rows, cols), np.float32) for label in targets}
    for start in range(0, len(indices), batch_size):
        check_cancel(cancel)
        batch = list(indices[start : start + batch_size])
        image_embeddings = embeddings.get(batch)
        for label, target in targets.items():
            logits = decoders[label].to(device).eval()(image_embeddings, target.to(device))
            on_slice = embeddings.transform.model_to_slice(logits[:, None])[:, 0]
            out[label][start : start + len(batch)] = torch.sigmoid(on_slice).float().cpu().numpy()
        if progress:
            progress("propagating", min(start + batch_size, len(indices)), len(indices))
    return out


def probabilities_to_labels(probabilities: dict[int, np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """Each voxel takes the label of highest probability, if that probability exceeds ``threshold``."""
    labels = sorted(probabilities)
    stacked = np.stack([probabilities[label] for label in labels])
    best = stacked.argmax(0)
    values = np.asarray(labels)[best]
    return np.where(stacked.max(0) > threshold, values, 0)


def paste_painted(prediction: np.ndarray, painted: np.ndarray, painted_indices: Sequence[int]) -> np.ndarray:
    """The prediction with the user's painted slices put back exactly as painted (slices along axis 0)."""
    result = prediction.copy()
    result[list(painted_indices)] = painted[list(painted_indices)]
    return result
