"""SAM's mask decoder reformulated to take few-shot target embeddings as prompts (seed paper, section 3.2.1).

Instead of the prompt encoder's point/box tokens, the two-way transformer receives two output tokens
(foreground, background) followed by the target embeddings of one label: the mean image embedding inside
that label's painted mask on each support slice. The image side is unchanged: image embedding plus SAM's
"no mask" dense embedding, with SAM's positional encoding. The two output tokens go through two
hypernetwork MLPs and a dot product with the upscaled image embedding, giving a foreground and a background
mask: a one-versus-rest classification per label.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .models import SamModel

NUM_OUTPUT_TOKENS = 2  # foreground, background


class FewShotMaskDecoder(nn.Module):
    """Trainable copy of a SAM mask decoder that is prompted by target embeddings.

    Trainable: the two-way transformer, the output upscaling, two hypernetwork MLPs and the two output
    tokens (initialised from SAM's first two mask tokens). Frozen buffers: SAM's dense positional encoding
    and its "no mask" embedding.
    """

    def __init__(self, model: SamModel):
        super().__init__()
        decoder = model.mask_decoder
        self.transformer = copy.deepcopy(decoder.transformer)
        self.output_upscaling = copy.deepcopy(decoder.output_upscaling)
        self.output_hypernetworks_mlps = nn.ModuleList(
            copy.deepcopy(decoder.output_hypernetworks_mlps[i]) for i in range(NUM_OUTPUT_TOKENS)
        )
        self.output_tokens = nn.Parameter(decoder.mask_tokens.weight[:NUM_OUTPUT_TOKENS].detach().clone())
        self.register_buffer("dense_pe", model.dense_positional_encoding().detach().clone(), persistent=False)
        self.register_buffer("no_mask_embed", model.no_mask_embedding().detach().clone(), persistent=False)
        self.requires_grad_(True)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        target_embeddings: torch.Tensor,
        positional: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Foreground-minus-background logits.

        Args:
            image_embeddings: (B, 256, h, w), the whole 64x64 grid or a window of it.
            target_embeddings: (B, N, 256) or (N, 256) shared by the batch: one label's few-shot embeddings.
            positional: (B, 256, h, w) positional encoding of that window; None for the whole grid.
        Returns:
            (B, 4h, 4w) logits on the low-resolution mask grid (4x the embedding grid); > 0 is foreground.
        """
        batch, channels, height, width = image_embeddings.shape
        if target_embeddings.dim() == 2:
            target_embeddings = target_embeddings.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(batch, -1, -1), target_embeddings], dim=1)
        source = image_embeddings + self.no_mask_embed
        if positional is None:
            positional = self.dense_pe.expand(batch, -1, -1, -1)
        queries, keys = self.transformer(source, positional, tokens)
        output_tokens = queries[:, :NUM_OUTPUT_TOKENS]
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(batch, channels, height, width))
        hyper = torch.stack([mlp(output_tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, NUM_OUTPUT_TOKENS, h, w)
        return masks[:, 0] - masks[:, 1]
