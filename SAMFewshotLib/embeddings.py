"""The frozen image encoder over one volume: each slice is encoded once, then served from memory or disk.

``VolumeEmbeddings`` is the volume-level session object (like SAM's ``SamPredictor.set_image``): callers ask
for the embeddings of some slices and never see the cache. Slices are encoded lazily, in batches, only when
first asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .embedding_cache import EmbeddingCache, default_cache_dir, volume_key
from .errors import Cancelled, DeviceError
from .intensity import IntensityWindow
from .models import SamModel
from .painted_slices import pixel_spacing
from .slice_transform import SliceTransform
from .volume_io import Volume

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]


def slice_stack(array: np.ndarray, axis: int) -> np.ndarray:
    """View of a (K, J, I) array as (N, rows, cols) slices along numpy ``axis``."""
    return np.moveaxis(array, axis, 0)


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled; nothing was written.")


class VolumeEmbeddings:
    """Encoder embeddings of the slices of one volume along one axis.

    ``get(indices)`` returns float32 embeddings (B, 256, 64, 64) on the model's device. ``encoded_slices``
    counts slices that went through the encoder in this session (0 when everything came from the cache).
    """

    def __init__(
        self,
        model: SamModel,
        volume: Volume,
        axis: int,
        *,
        window: IntensityWindow | None = None,
        cache_dir=None,
        use_disk_cache: bool = True,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ):
        self.model = model
        self.volume = volume
        self.axis = axis
        self.window = window or IntensityWindow()
        self.limits = self.window.limits(volume.array)
        self.slices = slice_stack(volume.array, axis)
        self.transform = SliceTransform(self.slices.shape[1:], pixel_spacing(volume.spacing, axis), model.image_size)
        self.preprocessing = f"{self.window.key()}|limits={self.limits[0]:.6g},{self.limits[1]:.6g}|size={model.image_size}|aspect=physical"
        key = volume_key(volume.array, volume.spacing, axis, model.identity, self.preprocessing)
        self.key = key  # identifies what is encoded: voxels, axis, model and preprocessing
        self.cache = EmbeddingCache(cache_dir, key) if use_disk_cache else None
        # where the exported CPU encoder goes (onnx_encoder.py): beside the embeddings
        self.cache_root = self.cache.root if self.cache else Path(cache_dir or default_cache_dir())
        self.memory: dict[int, torch.Tensor] = {}
        # on a CPU batching gains nothing (measured: 2.6 s/slice at batch 1, 3.5 at batch 4 on 2 cores), and
        # one slice at a time lets a cancel take effect within a slice's time
        self.batch_size = batch_size or (1 if model.device.type == "cpu" else _gpu_batch_size(model))
        self.progress = progress
        self.cancel = cancel
        self.encoded_slices = 0
        self.encode_seconds = 0.0

    @property
    def num_slices(self) -> int:
        return self.slices.shape[0]

    def model_input(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, 1, S, S) normalised, resized and padded slices: exactly what the encoder sees."""
        raw = np.stack([self.slices[i] for i in indices])
        normalised = self.window.apply(raw, self.limits)
        return self.transform.image_to_model(torch.from_numpy(normalised))

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """Float32 embeddings (B, 256, 64, 64) on the model's device, encoding what is not cached yet."""
        self.ensure(indices)
        return torch.stack([self.memory[i] for i in indices]).to(self.model.device, torch.float32)

    def ensure(self, indices: Sequence[int]) -> None:
        """Make sure the given slices are encoded (memory, then disk, then the encoder in batches)."""
        missing = [i for i in dict.fromkeys(int(i) for i in indices) if i not in self.memory]
        to_encode = []
        for index in missing:
            cached = self.cache.load(index) if self.cache else None
            if cached is not None:
                self.memory[index] = torch.from_numpy(cached)
            else:
                to_encode.append(index)
        done, started = 0, time.perf_counter()
        if to_encode:
            self.model.prepare_cpu_encoder(self.cache_root)
        while done < len(to_encode):
            check_cancel(self.cancel)
            batch = to_encode[done : done + self.batch_size]
            embeddings = self._encode_with_fallback(batch)
            for index, embedding in zip(batch, embeddings):
                half = embedding.to("cpu", torch.float16)
                self.memory[index] = half
                if self.cache:
                    self.cache.store(index, half.numpy())
            done += len(batch)
            self.encoded_slices += len(batch)
            if self.progress:
                self.progress("encoding", done, len(to_encode))
        self.encode_seconds += time.perf_counter() - started

    def ensure_ahead(self, index: int, direction: int, count: int) -> None:
        """Make sure slice ``index`` is encoded, for a walk going ``direction`` (+1/-1) through the slices: where it
        is not, the next slices in that direction go with it, up to ``count`` and as many as one encoder batch
        holds. Ahead of a walk, which may stop at any slice, only what rides in the same batch is worth encoding:
        on a CPU (batch 1) nothing is, and encoding 4 ahead left 2 slices encoded and never read at each walk's
        end (0.7 s each with ONNX Runtime on 2 cores)."""
        if index in self.memory:
            return
        count = max(1, min(count, self.batch_size))
        self.ensure([i for i in range(index, index + direction * count, direction) if 0 <= i < self.num_slices]
                    if direction else [index])

    def _encode_with_fallback(self, batch: list[int]) -> torch.Tensor:
        """Encode; on GPU out-of-memory halve the batch, and at batch 1 move the model to the CPU."""
        while True:
            try:
                parts = [
                    self.model.encode(self.model_input(batch[i : i + self.batch_size]))
                    for i in range(0, len(batch), self.batch_size)
                ]
                return torch.cat(parts)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if self.batch_size > 1:
                    self.batch_size = max(1, self.batch_size // 2)
                    log.warning("GPU out of memory while encoding; retrying with batch size %d.", self.batch_size)
                    continue
                if self.model.device.type != "cpu":
                    log.warning("GPU out of memory even one slice at a time; continuing on the CPU (slower).")
                    self.model.to(torch.device("cpu"))
                    continue
                raise DeviceError("out of memory while encoding one slice on the CPU; close other programs.") from None


def _gpu_batch_size(model: SamModel) -> int:
    """A batch that fits in the free GPU memory, leaving room for the decoder (rough per-slice costs)."""
    try:
        free, _ = torch.cuda.mem_get_info(model.device)
    except RuntimeError:
        return 8
    per_slice = 60e6 if model.image_size <= 256 else 1.2e9
    return int(np.clip(free * 0.5 // per_slice, 1, 64))
