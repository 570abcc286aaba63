"""Few-shot fine-tuning of the mask decoder from cached embeddings (seed paper, sections 3.2.1 and 4.4).

The encoder is frozen and its embeddings come from the cache, so each iteration costs only the decoder.
Because images are never re-encoded, augmentation acts on what the decoder sees: the embedding grid and
mask are flipped and crop-resized together, and embedding channels are jittered in scale and offset as a
stand-in for intensity scaling/shifting (an encoded image cannot be re-windowed without re-encoding).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .embeddings import check_cancel
from .fewshot_decoder import FewShotMaskDecoder
from .models import SamModel


@dataclass(frozen=True)
class AdaptationSettings:
    """Fine-tuning settings; defaults are the paper's (Adam 1e-4, betas 0.9/0.99, 50/80/100 iterations)."""

    iterations: int | None = None  # passes over the support slices; None: the paper's schedule for their number
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    batch_size: int = 1  # support slices per optimiser step
    augment: bool = True
    seed: int = 0
    window: int | None = 32  # train on windows of this many embedding cells (None: whole 64x64 grid)
    # optimiser steps when continuing from the decoder of a previous run on this volume: a fixed budget, so
    # that re-propagating after a correction stays quick however many slices are painted
    refine_steps: int = 30

    def iterations_for(self, support_slices: int) -> int:
        if self.iterations is not None:
            return int(self.iterations)
        return paper_iterations(support_slices)

    def refine_passes(self, support_slices: int) -> int:
        steps_per_pass = max(1, -(-support_slices // self.batch_size))
        return max(1, -(-self.refine_steps // steps_per_pass))


def paper_iterations(support_slices: int) -> int:
    """50, 80, 100 iterations for 5, 20, 50 labelled slices; linear between, flat outside."""
    return int(round(np.interp(support_slices, [5, 20, 50], [50, 80, 100])))


def target_embeddings(embeddings: torch.Tensor, mask_fractions: torch.Tensor) -> torch.Tensor:
    """Mean embedding inside each slice's mask on the embedding grid.

    Args:
        embeddings: (N, 256, 64, 64).
        mask_fractions: (N, 64, 64) fraction of each embedding cell covered by the label (the downsampled
            mask; fractions rather than a 0/1 threshold so that structures smaller than a cell still count).
    Returns:
        (M, 256) one target embedding per slice where the label is present (M <= N).
    """
    weights = mask_fractions.to(embeddings.dtype)
    present = weights.flatten(1).sum(1) > 0
    weights = weights[present]
    summed = torch.einsum("nchw,nhw->nc", embeddings[present], weights)
    return summed / weights.flatten(1).sum(1, keepdim=True)


def resemblance(embeddings: torch.Tensor, mask_fractions: torch.Tensor, prototype: torch.Tensor) -> float:
    """Cosine similarity of the mean embedding inside a mask to ``prototype`` (-1 for an empty mask).

    Args:
        embeddings: (1, 256, 64, 64) one slice's encoder embeddings.
        mask_fractions: (1, 64, 64) the mask on the embedding grid, as for ``target_embeddings``.
        prototype: (256,) e.g. the mean of a label's target embeddings.
    """
    pooled = target_embeddings(embeddings.float(), mask_fractions.to(embeddings.device))
    if pooled.shape[0] == 0:
        return -1.0
    return float(torch.nn.functional.cosine_similarity(pooled[0], prototype.float().to(pooled.device), dim=0))


def adapt_decoder(
    model: SamModel,
    support_embeddings: torch.Tensor,
    support_masks: dict[int, torch.Tensor],
    targets: dict[int, torch.Tensor],
    settings: AdaptationSettings = AdaptationSettings(),
    *,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: threading.Event | None = None,
    initial: FewShotMaskDecoder | None = None,
) -> tuple[FewShotMaskDecoder, list[float]]:
    """Fine-tune a few-shot decoder on the support slices.

    Args:
        support_embeddings: (N, 256, 64, 64) embeddings of the painted slices.
        support_masks: label -> (N, 256, 256) {0,1} masks on the decoder's output grid (model space).
        targets: label -> (M, 256) target embeddings used as prompts for that label.
        initial: a decoder already adapted to this structure on this volume (before the user corrected or
            added a slice): training continues from it for about ``settings.refine_steps`` steps, which is
            what makes re-propagation after a correction fast.
    Returns:
        The trained decoder (eval mode) and the loss per iteration.
    """
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    device = support_embeddings.device
    if initial is not None:
        decoder = copy.deepcopy(initial).to(device).train()
    else:
        decoder = FewShotMaskDecoder(model).to(device).train()
    optimiser = torch.optim.Adam(decoder.parameters(), lr=settings.learning_rate, betas=settings.betas)
    count = support_embeddings.shape[0]
    iterations = settings.iterations_for(count) if initial is None else settings.refine_passes(count)
    losses = []
    for iteration in range(iterations):
        order = torch.randperm(count, generator=generator)
        epoch_loss = 0.0
        for start in range(0, count, settings.batch_size):
            check_cancel(cancel)
            batch = order[start : start + settings.batch_size].to(device)
            optimiser.zero_grad(set_to_none=True)
            for label, masks in support_masks.items():
                embeddings, truth = support_embeddings[batch], masks[batch].to(device, torch.float32)
                if settings.augment:
                    embeddings, truth = augment(embeddings, truth, generator)
                positional = None
                if settings.window and settings.window < embeddings.shape[-1]:
                    embeddings, truth, positional = random_windows(embeddings, truth, decoder.dense_pe,
                                                                   settings.window, generator)
                loss = segmentation_loss(decoder(embeddings, targets[label].to(device), positional), truth)
                loss.backward()
                epoch_loss += float(loss.detach()) * len(batch)
            optimiser.step()
        losses.append(epoch_loss / (count * max(1, len(support_masks))))
        if progress:
            progress("adapting", iteration + 1, iterations)
    return decoder.eval(), losses


def random_windows(
    embeddings: torch.Tensor, masks: torch.Tensor, dense_pe: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop each sample to a window of ``size`` embedding cells, with its mask and positional encoding.

    The transformer's cost grows with the number of image tokens, so training on 32x32 windows of the
    64x64 grid is about four times cheaper per step. Half the windows are centred on a random foreground
    cell (the structure's boundary is where the loss is), half are anywhere (background far away).
    """
    grid, ratio = embeddings.shape[-1], masks.shape[-1] // embeddings.shape[-1]
    crops, mask_crops, positional = [], [], []
    for i in range(embeddings.shape[0]):
        foreground = torch.nonzero(masks[i, ::ratio, ::ratio] > 0)
        if len(foreground) and torch.rand(1, generator=generator) < 0.5:
            centre = foreground[int(torch.randint(0, len(foreground), (1,), generator=generator))]
            top, left = (int(c) - size // 2 for c in centre)
        else:
            top, left = (int(v) for v in torch.randint(0, grid - size + 1, (2,), generator=generator))
        top, left = min(max(top, 0), grid - size), min(max(left, 0), grid - size)
        crops.append(embeddings[i, :, top : top + size, left : left + size])
        mask_crops.append(masks[i, top * ratio : (top + size) * ratio, left * ratio : (left + size) * ratio])
        positional.append(dense_pe[0, :, top : top + size, left : left + size])
    return torch.stack(crops), torch.stack(mask_crops), torch.stack(positional)


def segmentation_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Pixel-wise foreground/background cross-entropy plus soft Dice (for small structures)."""
    cross_entropy = F.binary_cross_entropy_with_logits(logits, truth)
    probability = torch.sigmoid(logits)
    intersection = (probability * truth).flatten(1).sum(1)
    denominator = probability.flatten(1).sum(1) + truth.flatten(1).sum(1)
    dice = 1 - (2 * intersection + 1) / (denominator + 1)
    return cross_entropy + dice.mean()


def augment(
    embeddings: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, crop-resize and channel jitter of (B, C, 64, 64) embeddings with their (B, 256, 256) masks."""
    batch = embeddings.shape[0]
    out_embeddings, out_masks = [], []
    for i in range(batch):
        e, m = embeddings[i], masks[i]
        if torch.rand(1, generator=generator) < 0.5:
            e, m = e.flip(-1), m.flip(-1)
        if torch.rand(1, generator=generator) < 0.5:
            e, m = e.flip(-2), m.flip(-2)
        if torch.rand(1, generator=generator) < 0.5:
            e, m = _crop_resize(e, m, generator)
        scale = 1 + 0.05 * torch.randn(e.shape[0], 1, 1, generator=generator).to(e.device)
        shift = 0.02 * torch.randn(e.shape[0], 1, 1, generator=generator).to(e.device) * e.std()
        out_embeddings.append(e * scale + shift)
        out_masks.append(m)
    return torch.stack(out_embeddings), torch.stack(out_masks)


def _crop_resize(
    embedding: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    grid, mask_grid = embedding.shape[-1], mask.shape[-1]
    ratio = mask_grid // grid
    side = int(grid * (0.75 + 0.25 * float(torch.rand(1, generator=generator))))
    top = int(torch.randint(0, grid - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, grid - side + 1, (1,), generator=generator))
    e = embedding[:, top : top + side, left : left + side]
    m = mask[top * ratio : (top + side) * ratio, left * ratio : (left + side) * ratio]
    e = F.interpolate(e[None], size=(grid, grid), mode="bilinear", align_corners=False)[0]
    m = F.interpolate(m[None, None], size=(mask_grid, mask_grid), mode="bilinear", align_corners=False)[0, 0]
    return e, (m > 0.5).to(mask.dtype)
