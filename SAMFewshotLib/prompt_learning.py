"""SAM^assist prompt learning: teach SAM's prompt encoder what a click means for one structure.

Only the prompt encoder is trained (a deep copy: the process-wide model is never touched); the image
encoder and the mask decoder stay frozen, as in SAM^Med's SAM^assist. The training set is the slices the
user painted with the label. Every step samples new prompts from those slices, as a user would give them:

* points: ``n`` foreground and ``m`` background clicks, ``n`` drawn from [1, N_pt) and ``m`` from [0, N_pt)
  (half of the point steps are one foreground click alone, the way most users start); foreground clicks
  are drawn uniformly in the mask or near its centre (weighted by the distance transform), background
  clicks anywhere outside it or close around it;
* boxes: the mask's bounding box with each side jittered in [-d_in, d_out] (a fraction of the box's size);
* composite: a jittered box with a few clicks.

The loss is binary cross-entropy plus soft Dice between SAM's low-resolution logits (256 x 256 in model
space for both LiteMedSAM and SAM) and the painted mask resampled onto that grid. Slice embeddings come
from the session's cache, so a step costs only the prompt encoder and the mask decoder (forward and
backward through the frozen decoder: about 0.35 s per prompt on one CPU core).

LiteMedSAM was distilled with box prompts only and ignores a click with its own prompt encoder; learning
the point embeddings alone did not change that (Dice 0.00 after 40 steps on the sample CT's liver). So the
learned encoder also gives clicks a virtual box of learned extent (``LearnedPromptEncoder``). Measured on
the dev CT (2 painted slices, 16 steps, one click on 8 unpainted slices, centre click / random click):
liver 0.10 / 0.03 -> 0.56 / 0.37, spleen 0.00 / 0.02 -> 0.76 / 0.54, left kidney 0.06 / 0.00 -> 0.72 / 0.67,
aorta 0.00 / 0.00 -> 0.82 / 0.73, bladder 0.00 / 0.00 -> 0.55 / 0.34; a tight box stays about where it was
(liver 0.64 -> 0.77, the others within 0.03). Learning took 23 s on one core (63 s with two threads on
two cores shared with other jobs).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .adaptation import segmentation_loss
from .embeddings import check_cancel, slice_stack
from .errors import InputError
from .prompts import decode_low_res

ProgressCallback = Callable[[str, int, int], None]

LOW_RES = 256  # side of SAM's low-resolution mask output (4 x the 64 x 64 embedding grid)


@dataclass(frozen=True)
class PromptLearningSettings:
    """Prompt-learning settings (defaults measured on LiteMedSAM, see the module docstring).

    Attributes:
        steps: optimiser steps, each over up to ``batch_size`` painted slices with one sampled prompt each;
            the cost is fixed whatever the number of painted slices.
        learning_rate: Adam's step size for the prompt encoder's embeddings.
        offset_learning_rate: Adam's step size for the virtual box's corner offsets (model-input pixels).
        max_points: N_pt: a point prompt has [1, N_pt) foreground and [0, N_pt) background points.
        jitter_in, jitter_out: box jitter: each side moves inward by up to ``jitter_in`` or outward by up to
            ``jitter_out`` times the box's size along that side (the paper's [-d_in, d_out]).
        kinds: the share of steps with point, box and composite (box + points) prompts.
        single_click: the share of point steps with exactly one foreground click and nothing else, the
            way most users start (SAM then picks one of three masks by its predicted IoU).
        centre_fraction: the share of foreground clicks drawn near the structure's centre (weighted by the
            squared distance to its border) rather than uniformly in it.
        virtual_box: also learn a box of learned extent around the clicks (see ``LearnedPromptEncoder``);
            False is the paper's prompt encoder alone.
    """

    steps: int = 16
    learning_rate: float = 2e-2
    offset_learning_rate: float = 1.0
    batch_size: int = 2
    max_points: int = 6
    jitter_in: float = 0.1
    jitter_out: float = 0.1
    kinds: tuple[float, float, float] = (0.6, 0.2, 0.2)
    single_click: float = 0.5
    centre_fraction: float = 0.5
    virtual_box: bool = True


@dataclass
class PromptLearningReport:
    """What one prompt learning did (attached to the returned encoder as ``.learning_report``)."""

    label: int
    slices: list[int]
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def learn_prompt_encoder(
    session,
    examples: np.ndarray,
    label: int,
    *,
    settings: PromptLearningSettings = PromptLearningSettings(),
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> LearnedPromptEncoder:
    """A prompt encoder learned from the slices of ``examples`` painted with ``label``.

    Args:
        session: an ``InteractiveSession`` (its model, axis and cached slice embeddings are used).
        examples: (K, J, I) label map, the shape of the session's image, with a few slices painted along
            the session's axis. Only the slices that hold ``label`` are used.
        label: the label value to learn.
        seed: seeds torch and the prompt sampler: the same inputs give the same encoder.
        progress: called as progress("learning prompts", step, steps).
    Returns:
        A trained copy of the model's prompt encoder (eval mode, no gradients) for
        ``session.segment(..., prompt_encoder=...)``; ``.learning_report`` says what it was trained on.
    Raises:
        InputError: the label map does not match the image, or no slice holds ``label``.
        Cancelled: ``cancel`` was set.
    """
    started = time.perf_counter()
    stack = _painted_stack(session, examples, label)
    slices = [int(i) for i in np.nonzero(stack.reshape(stack.shape[0], -1).any(1))[0]]
    if not slices:
        raise InputError(f"no {session.axis_name} slice of the example label map holds label {label}: paint the "
                         f"structure on a few slices (2 to 5 are enough) before learning prompts from them.")
    masks = [np.ascontiguousarray(stack[i]) for i in slices]
    model, transform = session.model, session.embeddings.transform
    embeddings = session.embeddings.get(slices)  # (N, 256, 64, 64): encoded once, then from the cache
    truth = _low_res_targets(transform, masks, model.device)

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sampler = PromptSampler(masks, settings, rng)
    offsets = mean_box_offsets(masks, transform) if settings.virtual_box else None
    # a deep copy: the model (and its prompt encoder) is shared by the whole process and stays as it is
    encoder = LearnedPromptEncoder(copy.deepcopy(model.prompt_encoder), offsets).to(model.device).train()
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)
    # the dense mask-prompt branch is never used by these prompts: it stays as SAM had it
    learned = [p for name, p in encoder.base.named_parameters() if not name.startswith("mask_downscaling")]
    groups = [{"params": learned}]
    if settings.virtual_box:
        groups.append({"params": [encoder.box_offsets], "lr": settings.offset_learning_rate})
    optimiser = torch.optim.Adam(groups, lr=settings.learning_rate)
    losses = []
    for step in range(settings.steps):
        check_cancel(cancel)
        batch = rng.permutation(len(slices))[: settings.batch_size]
        prompts = sampler.sample(batch)
        optimiser.zero_grad(set_to_none=True)
        logits = decode_batch(model, encoder, embeddings[batch], prompts, transform)
        loss = segmentation_loss(logits, truth[batch])
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress:
            progress("learning prompts", step + 1, settings.steps)
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    encoder.learning_report = PromptLearningReport(int(label), slices, settings.steps,
                                                   time.perf_counter() - started, losses)
    return encoder


class LearnedPromptEncoder(nn.Module):
    """A learned copy of SAM's prompt encoder that also gives clicks a virtual box of learned extent.

    LiteMedSAM's mask decoder was distilled with box prompts only. A click alone tells it nothing about
    the structure's extent, and learning the point embeddings alone (the paper's SAM^assist) left one click
    at Dice 0.00 on the sample CT's liver (measured). So when a prompt has foreground clicks and no box,
    this encoder adds a box around the clicks' centroid, with corner offsets learned from the painted
    slices (initialised to the painted masks' mean box relative to their centroid) and widened to hold
    every foreground click. A box the user gives is used as given. The virtual box has one learned size,
    so it fits cross-sections of about the painted size best and over-segments much smaller ones.

    Interface as SAM's ``PromptEncoder``: ``forward(points, boxes, masks)`` and ``get_dense_pe()``.
    """

    def __init__(self, base: nn.Module, box_offsets: torch.Tensor | None):
        super().__init__()
        self.base = base
        self.virtual_box = box_offsets is not None
        # (2, 2): (dx, dy) from the clicks' centroid to the top-left and to the bottom-right corner
        self.box_offsets = nn.Parameter((box_offsets if box_offsets is not None else torch.zeros(2, 2)).clone())
        self.learning_report: PromptLearningReport | None = None

    def get_dense_pe(self) -> torch.Tensor:
        return self.base.get_dense_pe()

    def forward(self, points, boxes, masks):
        if self.virtual_box and boxes is None and points is not None:
            boxes = self.click_box(*points)
        return self.base(points=points, boxes=boxes, masks=masks)

    def click_box(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, 4) virtual boxes in model-input pixels around each prompt's foreground clicks."""
        positive = (labels == 1).to(coords.dtype)[..., None]  # (B, n, 1)
        if bool((positive.sum(1) == 0).any()):
            return None
        centre = (coords * positive).sum(1) / positive.sum(1)  # (B, 2)
        away = 1e6 * (1 - positive)  # background clicks do not widen the box
        low = torch.minimum(centre + self.box_offsets[0], (coords + away).min(1).values - 0.5)
        high = torch.maximum(centre + self.box_offsets[1], (coords - away).max(1).values + 0.5)
        rows, cols = self.base.input_image_size
        limit = torch.tensor([cols - 0.5, rows - 0.5], dtype=coords.dtype, device=coords.device)
        low = torch.minimum(low.clamp(min=-0.5), limit)
        high = torch.minimum(high.clamp(min=-0.5), limit)
        return torch.cat([low, high], 1)[:, None, :]


def mean_box_offsets(masks: list[np.ndarray], transform) -> torch.Tensor:
    """(2, 2) mean offsets, in model-input pixels, from each mask's centroid to its box's two corners.

    Coordinates as ``SlicePrompt.to_model`` maps them: a click at the centroid and the box's outer edges.
    """
    rows, cols = transform.slice_shape
    resized_rows, resized_cols = transform.resized_shape
    scale = np.array([resized_cols / cols, resized_rows / rows])
    offsets = []
    for mask in masks:
        r, c = np.nonzero(mask)
        centre = (np.array([c.mean(), r.mean()]) + 0.5) * scale - 0.5
        low = np.array([c.min(), r.min()]) * scale - 0.5
        high = (np.array([c.max(), r.max()]) + 1) * scale - 0.5
        offsets.append([low - centre, high - centre])
    return torch.as_tensor(np.mean(offsets, 0), dtype=torch.float32)


def _painted_stack(session, examples: np.ndarray, label: int) -> np.ndarray:
    """(N, rows, cols) bool: where ``examples`` holds ``label``, as slices along the session's axis."""
    examples = np.asarray(examples)
    if examples.shape != tuple(session.image.shape):
        raise InputError(f"the example label map is {examples.shape}, the image {tuple(session.image.shape)}: "
                         f"they must match.")
    if not (isinstance(label, (int, np.integer)) and 1 <= label <= 255):
        raise InputError(f"label {label}: use a whole number from 1 to 255.")
    return slice_stack(examples == label, session.axis)


def _low_res_targets(transform, masks: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """(N, 256, 256) fraction of each cell of SAM's low-resolution output grid covered by the mask."""
    model_space = transform.mask_to_model(torch.from_numpy(np.stack(masks)).float())  # (N, 1, S, S)
    if model_space.shape[-1] != LOW_RES:
        model_space = F.adaptive_avg_pool2d(model_space, LOW_RES)
    return model_space[:, 0].to(device)


@dataclass
class BatchPrompts:
    """Prompts for a batch of slices, all of one structure (same number of points and same box use)."""

    points: np.ndarray | None  # (B, n, 2) slice voxel (x, y)
    labels: np.ndarray | None  # (B, n) 1/0
    boxes: np.ndarray | None  # (B, 4) x0, y0, x1, y1 (inclusive voxel bounds)


class PromptSampler:
    """Random prompts on painted masks, the way SAM^assist trains them (see the module docstring)."""

    def __init__(self, masks: list[np.ndarray], settings: PromptLearningSettings, rng: np.random.Generator):
        self.settings = settings
        self.rng = rng
        self.foreground = [np.argwhere(m) for m in masks]  # (row, col) per voxel
        self.centre_weights = []
        self.near_background, self.background, self.bounds = [], [], []
        for mask in masks:
            distance = ndimage.distance_transform_edt(mask)[mask]
            weights = distance**2
            self.centre_weights.append(weights / weights.sum())
            rows, cols = np.nonzero(mask)
            r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
            self.bounds.append((c0, r0, c1, r1))
            margin_r, margin_c = max(2, (r1 - r0 + 1) // 2), max(2, (c1 - c0 + 1) // 2)
            near = np.zeros_like(mask)
            near[max(0, r0 - margin_r) : r1 + margin_r + 1, max(0, c0 - margin_c) : c1 + margin_c + 1] = True
            near &= ~mask
            self.near_background.append(np.argwhere(near))
            self.background.append(np.argwhere(~mask))

    def sample(self, batch: np.ndarray) -> BatchPrompts:
        s, rng = self.settings, self.rng
        kind = rng.choice(3, p=np.asarray(s.kinds) / np.sum(s.kinds))  # 0 points, 1 box, 2 composite
        use_box = kind in (1, 2)
        if kind == 0 and rng.random() < s.single_click:
            positives, negatives = 1, 0
        elif kind == 1:
            positives, negatives = 0, 0
        else:
            positives, negatives = int(rng.integers(1, s.max_points)), int(rng.integers(0, s.max_points))
        if any(len(self.background[i]) == 0 for i in batch):  # a mask that fills its slice
            negatives = 0
        points, labels, boxes = [], [], []
        for i in batch:
            chosen = [self._foreground_point(i) for _ in range(positives)]
            chosen += [self._background_point(i) for _ in range(negatives)]
            points.append(chosen)
            labels.append([1] * positives + [0] * negatives)
            if use_box:
                boxes.append(self._jittered_box(i))
        has_points = positives + negatives > 0
        return BatchPrompts(
            np.asarray(points, np.float32) if has_points else None,
            np.asarray(labels, np.int64) if has_points else None,
            np.asarray(boxes, np.float32) if use_box else None,
        )

    def _foreground_point(self, i: int) -> tuple[float, float]:
        voxels = self.foreground[i]
        if self.rng.random() < self.settings.centre_fraction:
            row, col = voxels[self.rng.choice(len(voxels), p=self.centre_weights[i])]
        else:
            row, col = voxels[self.rng.integers(len(voxels))]
        return float(col), float(row)

    def _background_point(self, i: int) -> tuple[float, float]:
        near, anywhere = self.near_background[i], self.background[i]
        voxels = near if len(near) and self.rng.random() < 0.5 else anywhere
        row, col = voxels[self.rng.integers(len(voxels))]
        return float(col), float(row)

    def _jittered_box(self, i: int) -> tuple[float, float, float, float]:
        c0, r0, c1, r1 = self.bounds[i]
        width, height = c1 - c0 + 1, r1 - r0 + 1
        s = self.settings
        # a positive offset moves a side outward: [-d_in, d_out] times the box's size on that axis
        d = self.rng.uniform(-s.jitter_in, s.jitter_out, size=4) * np.array([width, height, width, height])
        x0, y0, x1, y1 = c0 - d[0], r0 - d[1], c1 + d[2], r1 + d[3]
        if x1 < x0:
            x0 = x1 = (x0 + x1) / 2
        if y1 < y0:
            y0 = y1 = (y0 + y1) / 2
        return float(x0), float(y0), float(x1), float(y1)


def prompts_to_model(prompts: BatchPrompts, transform, device: torch.device):
    """Batch prompts in model-input pixel coordinates, mapped exactly as ``SlicePrompt.to_model`` maps them."""
    rows, cols = transform.slice_shape
    resized_rows, resized_cols = transform.resized_shape
    scale = np.array([resized_cols / cols, resized_rows / rows], dtype=np.float32)
    points = None
    if prompts.points is not None:
        coords = (prompts.points + 0.5) * scale - 0.5
        points = (torch.as_tensor(coords, device=device), torch.as_tensor(prompts.labels, device=device))
    boxes = None
    if prompts.boxes is not None:
        b = prompts.boxes
        low = np.stack([np.maximum(b[:, 0], 0), np.maximum(b[:, 1], 0)], 1)
        high = np.stack([np.minimum(b[:, 2], cols - 1) + 1, np.minimum(b[:, 3], rows - 1) + 1], 1)
        corners = np.concatenate([low, high], 1).reshape(-1, 2, 2) * scale - 0.5
        boxes = torch.as_tensor(corners.reshape(-1, 1, 4).astype(np.float32), device=device)
    return points, boxes


def decode_batch(model, encoder: nn.Module, embeddings: torch.Tensor, prompts: BatchPrompts, transform) -> torch.Tensor:
    """(B, 256, 256) low-resolution logits, chosen as ``prompts.decode_prompt`` chooses them.

    One click alone makes SAM offer three masks: like ``decode_prompt``, the one with the best predicted
    IoU is used, so the loss trains exactly what the user will get.
    """
    points, boxes = prompts_to_model(prompts, transform, embeddings.device)
    return decode_low_res(model, encoder, embeddings, points, boxes)
