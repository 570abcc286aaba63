"""Zero-shot segmentation of one slice from a few clicks (seed paper: "zero-shot sparse-prompt SAM").

Nothing is painted: the user clicks one or a few foreground (and optionally background) points on one
slice. The paper's two stages run on the slice embedding that the ``VolumeEmbeddings`` cache holds:

1. **Self-similarity -> coarse mask J.** The embedding's vectors are L2-normalised; the cosine similarity
   of the vector under each click with every cell of the 64x64 grid gives one map per click, and J is
   where the maps say "looks like the foreground clicks" (``self_similarity_score``).
2. **Test-time fine-tuning (optional, ``tune_encoder_steps`` > 0).** A copy of the image encoder is tuned
   on this one slice so that SAM's output matches J (BCE + soft Dice, Adam, lr 1e-5), then the slice is
   re-encoded with the tuned copy and decoded (``tuned_embedding``). The shared model is never touched.

Where and why this deviates from the paper (measured on one slice each of six structures of the dev CT,
liver, spleen, left kidney, aorta, bladder, left femur, with 1 or 3 deep clicks, 4 draws of 1 or 3 random
interior clicks, and 1 or 3 background clicks near the structure; and on 8 liver/spleen slices of the
sample CT; Dice of the final mask, LiteMedSAM):

- **Prompts at inference.** The paper decodes with the clicks (and, in its "SAM w/J" variant, J as a dense
  prompt). LiteMedSAM was distilled with box prompts only and all but ignores clicks (plain clicks: mean
  Dice 0.01 with one click, 0.24 with three). J is therefore turned into the prompt it understands: J is
  upsampled to the slice, only its connected components that hold a foreground click are kept (the map
  also lights up similar tissue elsewhere, e.g. the other kidney), and each kept component gives a box
  widened by ``BOX_MARGIN``; the components' logits are combined by their maximum. For LiteMedSAM the
  clicks are left out of these prompts (with them, one deep click: 0.65 instead of 0.76), for the official
  SAM models they go with the box (not measured here: no SAM checkpoint on the dev machine). J is not
  passed as a dense mask prompt as well: 0.65 instead of 0.76 with one click, 0.79 vs 0.81 with three.
- **Normalisation and several clicks.** The paper sums the positive maps, min-max normalises the sum and
  thresholds at 0.5. The minimum is one extreme cell (fat, bone or air), so on soft-tissue slices most of
  the abdomen passes (sample CT: J of a spleen click covering 5100 of the slice's 12300 voxels), and
  summing several clicks' maps flattens the peak so that J grows with more clicks (paper's J + box: 0.70
  with one deep click, 0.39 with three). Here each foreground click's map is normalised from its *median*
  (a slice is mostly not the clicked structure) to its maximum and thresholded at 0.5, and J is the
  *union* over the foreground clicks. Dev CT, paper's J -> this J (both through the box prompt): one deep
  click 0.70 -> 0.76, three 0.39 -> 0.81, one random click 0.51 -> 0.61, three random 0.30 -> 0.78;
  sample CT: 0.50 -> 0.81 (one), 0.35 -> 0.83 (three). With one click and the minimum instead of the
  median this is the paper's J. A structure covering more than half of the slice would be
  under-segmented by J (the median then lies inside it); the box margin and SAM's decoder make up for
  part of that.
- **Background clicks.** The paper's J with background clicks is ``M_pos > M_neg`` alone. Here a cell must
  pass the foreground test above *and* be closer to the foreground clicks than to the background ones,
  with the mean rather than the sum of each side's maps, so that unequal numbers of clicks compare like
  with like (1 deep + 1 background click: 0.63 -> 0.74; 3 random + 3 background: 0.64 -> 0.77).
- **Prompts during fine-tuning.** The paper tunes and predicts with null prompts. LiteMedSAM was never
  trained to give a mask without a box, so the encoder is tuned with the same prompts as at inference
  (the null-prompt variant was not measured). Measured only on a few slices (a step takes 7-60 s on the
  shared 2-core CPU), tuning did not help: it pulls SAM's output towards J, and here SAM's box output is
  already better than J. Dev CT, Dice after 0/5/10 steps: spleen, one deep click, 0.77/0.64/0.59 (J 0.61);
  liver, one deep click, 0.61/0.42/0.44 (J 0.42); left kidney, three clicks, 0.73/0.73/0.66 (J 0.66); with
  the paper's J as target, spleen, one click, 0.85, 0.80 after 10 steps, 0.80 after 30. So it is off by
  default: an option for GPU users, as in the paper (100 steps there).
- **Embedding.** J comes from the encoder's output embedding (256 channels, the one every SAM model
  caches) rather than the paper's 768-channel ViT features before the neck; LiteMedSAM has no such layer.
- **Clicks on the grid.** A click reads the grid cell it falls in after the slice is mapped to the model's
  input (aspect-preserving resize, bottom/right zero padding); only the cells covering the image count
  (the normalisation's statistics are taken there, padding is background). The clicked cells themselves
  are forced into (foreground) or out of (background) J: the user said so.
- **Resolution.** The score map is upsampled bilinearly to the slice's voxels before the threshold, which
  gives smoother boundaries than thresholding on the 64x64 grid and upsampling the mask.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .embeddings import ProgressCallback, check_cancel
from .errors import DeviceError, InputError
from .models import DEFAULT_MODEL, SamModel
from .prompts import SlicePrompt, decode_prompt
from .slice_transform import SliceTransform

# margin added on each side of the box around a coarse-mask component, as a fraction of its size (plus one
# voxel); J's boundary is only as precise as a grid cell (4 model pixels), so the box must not be tight
BOX_MARGIN = 0.1
# J is not also given as a dense mask prompt by default (measured: worse, see the module docstring)
DENSE_PROMPT = False
# logit magnitude of J as a dense mask prompt when it is used
DENSE_PROMPT_LOGIT = 4.0
# the low end of each click's similarity map for the min-max normalisation: "median" (measured better) or
# "min" (the paper's)
NORMALISE_FROM = "median"
# the paper's fine-tuning optimiser
TUNE_LEARNING_RATE = 1e-5


def grid_cell(transform: SliceTransform, point: tuple[float, float], grid: int) -> tuple[int, int]:
    """(row, col) of the embedding-grid cell under a slice point (x = column, y = row)."""
    rows, cols = transform.slice_shape
    resized_rows, resized_cols = transform.resized_shape
    cell = transform.image_size / grid
    x_model = (point[0] + 0.5) * resized_cols / cols
    y_model = (point[1] + 0.5) * resized_rows / rows
    return (int(min(grid - 1, max(0, y_model // cell))), int(min(grid - 1, max(0, x_model // cell))))


def valid_grid_shape(transform: SliceTransform, grid: int) -> tuple[int, int]:
    """(rows, cols) of the top-left part of the embedding grid that covers the image (the rest is padding)."""
    rows, cols = transform.resized_shape
    return (max(1, round(rows * grid / transform.image_size)), max(1, round(cols * grid / transform.image_size)))


def self_similarity_score(
    embedding: torch.Tensor,
    positive_cells: list[tuple[int, int]],
    negative_cells: list[tuple[int, int]],
    valid_shape: tuple[int, int],
) -> torch.Tensor:
    """The first stage as a signed score on the embedding grid: the coarse mask J is ``score > 0``.

    Each click's map is the cosine similarity of its cell's (L2-normalised) vector with every cell of the
    image part of the grid. A foreground click's map is normalised from its median (the typical cell of a
    slice, which mostly is not the clicked structure) to its maximum (the clicked cell itself) and compared
    with 0.5; J is the union over the foreground clicks. With background clicks a cell must also be closer
    to the foreground clicks than to the background ones (mean foreground map > mean background map).
    The paper normalises from the minimum and sums the maps; see the module docstring for why not here.

    Args:
        embedding: (1, C, G, G) or (C, G, G) image embedding.
        positive_cells, negative_cells: (row, col) grid cells of the foreground and background clicks.
        valid_shape: (rows, cols) of the grid's top-left part that is image; the rest scores -1.
    Returns:
        (G, G) float32, > 0 inside J; the clicked cells themselves are forced to +-0.5.
    """
    if not positive_cells:
        raise InputError("zero-shot segmentation needs at least one foreground click.")
    features = embedding.reshape(-1, *embedding.shape[-2:]).float()
    grid = features.shape[-1]
    rows, cols = valid_shape
    for r, c in list(positive_cells) + list(negative_cells):
        if not (0 <= r < rows and 0 <= c < cols):
            raise InputError(f"grid cell ({r}, {c}) is outside the image part of the embedding grid.")
    valid = F.normalize(features[:, :rows, :cols], dim=0)  # (C, rows, cols), a unit vector per cell

    def similarity(cells) -> torch.Tensor:  # (N, rows, cols), one cosine-similarity map per click
        vectors = torch.stack([valid[:, r, c] for r, c in cells])
        return torch.einsum("nc,chw->nhw", vectors, valid)

    positive = similarity(positive_cells)
    flat = positive.flatten(1)
    low = (flat.min(1).values if NORMALISE_FROM == "min" else flat.median(1).values)[:, None, None]
    high = flat.max(1).values[:, None, None]
    score = ((positive - low) / (high - low).clamp_min(1e-6) - 0.5).amax(0)
    if negative_cells:
        score = torch.minimum(score, positive.mean(0) - similarity(negative_cells).mean(0))
    full = torch.full((grid, grid), -1.0, dtype=torch.float32, device=score.device)
    full[:rows, :cols] = score
    for r, c in positive_cells:  # the user's own clicks decide their cells
        full[r, c] = full[r, c].clamp_min(0.5)
    for r, c in negative_cells:
        full[r, c] = full[r, c].clamp_max(-0.5)
    return full


def self_similarity_mask(
    embedding: torch.Tensor,
    positive_cells: list[tuple[int, int]],
    negative_cells: list[tuple[int, int]],
    valid_shape: tuple[int, int],
) -> torch.Tensor:
    """The paper's coarse mask J on the embedding grid: (G, G) bool, padding False."""
    return self_similarity_score(embedding, positive_cells, negative_cells, valid_shape) > 0


def coarse_slice_mask(
    embedding: torch.Tensor, prompt: SlicePrompt, transform: SliceTransform, *, keep_clicked: bool = True
) -> np.ndarray:
    """J on the slice's voxels: (rows, cols) bool.

    The grid score is upsampled bilinearly to the slice and thresholded at 0; with ``keep_clicked`` only the
    connected components holding a foreground click are kept.
    """
    grid = embedding.shape[-1]
    valid = valid_grid_shape(transform, grid)

    def cell_of(point):  # a click on the slice's last row or column may round onto the padding: keep it on the image
        row, col = grid_cell(transform, point, grid)
        return min(row, valid[0] - 1), min(col, valid[1] - 1)

    positives = [cell_of(p) for p in prompt.positive_points]
    negatives = [cell_of(p) for p, lab in zip(prompt.points, prompt.point_labels) if lab == 0]
    # a background click in the same cell as a foreground click cannot say anything about that cell
    negatives = [c for c in negatives if c not in positives]
    score = self_similarity_score(embedding, positives, negatives, valid)
    mask = transform.model_to_slice(score[None, None].cpu())[0, 0].numpy() > 0
    rows, cols = mask.shape
    for x, y in prompt.positive_points:  # a clicked voxel is foreground whatever the interpolation says
        mask[min(rows - 1, int(round(y))), min(cols - 1, int(round(x)))] = True
    if keep_clicked:
        mask = clicked_components(mask, prompt.positive_points)
    return mask


def clicked_components(mask: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    """The connected components (8-connected) of ``mask`` that contain one of ``points``."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    rows, cols = mask.shape
    keep = {int(labels[min(rows - 1, int(round(y))), min(cols - 1, int(round(x)))]) for x, y in points} - {0}
    return np.isin(labels, sorted(keep))


def clicks_with_box(model: SamModel) -> bool:
    """Whether to give the clicks along with the boxes: not to LiteMedSAM, which was distilled with boxes
    alone (measured on the dev CT: adding the clicks to the boxes lowered the mean Dice from 0.76 to 0.65 with
    one click, 0.81 to 0.76 with three); the official SAM models were trained with both."""
    return model.kind != DEFAULT_MODEL


def component_prompts(coarse: np.ndarray, prompt: SlicePrompt, margin: float = BOX_MARGIN,
                      with_clicks: bool = True) -> list[SlicePrompt]:
    """One prompt per connected component of ``coarse``: its box (widened by ``margin``), and the clicks.

    A box per component, because one box around two separate parts would take in everything between them.
    With ``with_clicks`` each component's prompt also carries the foreground clicks inside it and all the
    background clicks.
    """
    labels, _ = ndimage.label(coarse, structure=np.ones((3, 3), bool))
    rows, cols = coarse.shape
    prompts = []
    for label, (row_slice, col_slice) in enumerate(ndimage.find_objects(labels), start=1):
        y0, y1, x0, x1 = row_slice.start, row_slice.stop - 1, col_slice.start, col_slice.stop - 1
        pad_y, pad_x = 1 + margin * (y1 - y0 + 1), 1 + margin * (x1 - x0 + 1)
        box = (max(0.0, x0 - pad_x), max(0.0, y0 - pad_y), min(cols - 1.0, x1 + pad_x), min(rows - 1.0, y1 + pad_y))
        points, point_labels = [], []
        if with_clicks:
            for (x, y), lab in zip(prompt.points, prompt.point_labels):
                inside = labels[min(rows - 1, int(round(y))), min(cols - 1, int(round(x)))] == label
                if lab == 0 or inside:
                    points.append((float(x), float(y)))
                    point_labels.append(int(lab))
        prompts.append(SlicePrompt(tuple(points), tuple(point_labels), tuple(float(v) for v in box)))
    return prompts


def dense_prompt(coarse: np.ndarray, transform: SliceTransform, model: SamModel,
                 logit: float = DENSE_PROMPT_LOGIT) -> torch.Tensor:
    """J as SAM's dense mask prompt: (1, 1, 256, 256) logits, +``logit`` inside, -``logit`` outside."""
    size = tuple(model.prompt_encoder.mask_input_size)
    fraction = transform.mask_to_model(torch.from_numpy(coarse)[None].float())
    fraction = F.interpolate(fraction, size=size, mode="area")
    return ((fraction * 2 - 1) * logit).to(model.device)


def decode_components(model: SamModel, embedding: torch.Tensor, prompts: list[SlicePrompt],
                      transform: SliceTransform, mask_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, cols) logits: each component's prompt decoded, combined by the maximum."""
    logits = [decode_prompt(model, embedding, p, transform, mask_logits=mask_logits) for p in prompts]
    return torch.stack(logits).amax(0)


def zero_shot_segment(
    session,
    index: int,
    prompt: SlicePrompt,
    *,
    tune_encoder_steps: int = 0,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    dense: bool = DENSE_PROMPT,
):
    """The mask on slice ``index`` of an ``InteractiveSession`` from a few clicks, without painted examples.

    Args:
        prompt: foreground clicks (at least one) and optional background clicks; no box (a box already says
            what to segment: use plain prompts for it).
        tune_encoder_steps: 0 for the self-similarity stage alone (a fraction of a second once the slice is
            encoded); N > 0 fine-tunes a copy of the image encoder for N steps on this slice first (the
            paper uses 100; each step costs a forward and backward pass of the encoder: fine on a GPU,
            several seconds per step on a CPU).
        seed: seeds torch before fine-tuning.
        progress: ``progress("tuning encoder", done, total)`` during fine-tuning.
        cancel: set it to stop (raises ``Cancelled``), checked before each fine-tuning step.
        dense: also pass J as a dense mask prompt (off by default, see the module docstring).
    Returns:
        an ``interactive.SliceMask``.
    """
    from .interactive import SliceMask

    index = session.check_index(index)
    if not prompt.positive_points:
        raise InputError("zero-shot segmentation needs at least one foreground click (x,y) inside the "
                         "structure; background clicks alone do not say what to segment.")
    if prompt.box is not None:
        raise InputError("zero-shot segmentation works from clicks alone; a box already tells SAM what to "
                         "segment: drop the box, or segment without zero-shot.")
    prompt.check(session.slice_shape)
    if not (isinstance(tune_encoder_steps, (int, np.integer)) and tune_encoder_steps >= 0):
        raise InputError(f"tune_encoder_steps {tune_encoder_steps}: use a whole number of steps, 0 or more.")
    check_cancel(cancel)
    model: SamModel = session.model
    transform = session.embeddings.transform
    embedding = session.embeddings.get([index])
    with torch.inference_mode():
        coarse = coarse_slice_mask(embedding, prompt, transform)
    prompts = component_prompts(coarse, prompt, with_clicks=clicks_with_box(model))
    mask_logits = dense_prompt(coarse, transform, model) if dense else None
    if tune_encoder_steps > 0:
        embedding = tuned_embedding(model, session.embeddings.model_input([index]), coarse, prompts, transform,
                                    steps=int(tune_encoder_steps), seed=seed, mask_logits=mask_logits,
                                    progress=progress, cancel=cancel)
    with torch.inference_mode():
        logits = decode_components(model, embedding, prompts, transform, mask_logits)
    probability = torch.sigmoid(logits).cpu().numpy().astype(np.float32)
    return SliceMask(index, probability > 0.5, probability)


def tuned_embedding(
    model: SamModel,
    image: torch.Tensor,
    coarse: np.ndarray,
    prompts: list[SlicePrompt],
    transform: SliceTransform,
    *,
    steps: int,
    seed: int = 0,
    learning_rate: float = TUNE_LEARNING_RATE,
    mask_logits: torch.Tensor | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> torch.Tensor:
    """The paper's second stage: tune a copy of the image encoder so SAM's output matches J on this slice.

    The copy stays in eval mode (its BatchNorm statistics and dropout as in the frozen model: one image per
    step is no batch to estimate statistics from); the prompt encoder and mask decoder are the shared,
    frozen ones, used without modification. The loss is the paper's BCE + soft Dice between SAM's
    low-resolution output (the components' logits combined by their maximum) and J, on the part of the
    output grid that covers the image.

    Args:
        image: (1, 1, S, S) the slice as the encoder sees it (``VolumeEmbeddings.model_input``).
        coarse: (rows, cols) bool J on the slice, after keeping the clicked components.
    Returns:
        (1, 256, 64, 64) the slice's embedding from the tuned copy.
    """
    device = model.device
    torch.manual_seed(seed)
    try:
        encoder = copy.deepcopy(model.image_encoder).to(device).eval().requires_grad_(True)
        x = model.to_model_input(image.to(device, torch.float32))
        batches = [p.to_model(transform, device) for p in prompts]
        out_size = tuple(model.prompt_encoder.mask_input_size)  # the decoder's low-resolution output grid
        target = F.interpolate(transform.mask_to_model(torch.from_numpy(coarse)[None].float()), size=out_size,
                               mode="area")[0, 0].to(device)
        rows, cols = transform.resized_shape
        valid = (max(1, round(rows * out_size[0] / transform.image_size)),
                 max(1, round(cols * out_size[1] / transform.image_size)))
        target = target[: valid[0], : valid[1]]
        optimiser = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad], lr=learning_rate)
        with torch.enable_grad():
            for step in range(steps):
                check_cancel(cancel)
                embedding = encoder(x).float()
                logits = []
                for prompt, (points, box) in zip(prompts, batches):
                    sparse, dense = model.prompt_encoder(points=points, boxes=box, masks=mask_logits)
                    multimask = box is None and len(prompt.points) == 1
                    masks, scores = model.mask_decoder(
                        image_embeddings=embedding,
                        image_pe=model.prompt_encoder.get_dense_pe(),
                        sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense,
                        multimask_output=multimask,
                    )
                    best = int(torch.argmax(scores[0])) if multimask else 0
                    logits.append(masks[0, best])
                output = torch.stack(logits).amax(0)[: valid[0], : valid[1]]
                loss = segmentation_loss(output, target)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if progress:
                    progress("tuning encoder", step + 1, steps)
            check_cancel(cancel)
        with torch.inference_mode():
            return encoder(x).float()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise DeviceError("out of GPU memory while fine-tuning the image encoder (it needs several times the "
                          "memory of encoding); choose a smaller model, or run without encoder fine-tuning.") from None


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's BCE + soft Dice (with +1 smoothing) between logits and a {0,1} (or fractional) target."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    overlap = (prob * target).sum()
    dice = 1 - (2 * overlap + 1) / (2 * overlap + ((1 - prob) * target).sum() + (prob * (1 - target)).sum() + 1)
    return bce + dice
