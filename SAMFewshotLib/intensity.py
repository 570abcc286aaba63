"""Intensity normalisation to [0, 1] that works for CT and MRI without the user choosing.

Default: the volume's robust 0.5-99.5 percentile range (what the seed paper uses for MRI; it also holds
for CT, where it spans air to dense bone). A fixed window (e.g. a CT soft-tissue window in HU) can be given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

NAMED_WINDOWS = {
    "ct-soft-tissue": (-160.0, 240.0),  # abdominal vessels and organs (the paper's AMOS setting)
    "ct-bone": (-500.0, 1300.0),  # the paper's femur/tibia/vertebrae setting
}


@dataclass(frozen=True)
class IntensityWindow:
    """Either robust percentiles of the volume (``low``/``high`` None) or a fixed [low, high] window."""

    low: float | None = None
    high: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)

    @classmethod
    def parse(cls, text: str | None) -> IntensityWindow:
        """'auto', a named window ('ct-soft-tissue', 'ct-bone') or 'LOW,HIGH'."""
        if text in (None, "", "auto"):
            return cls()
        if text in NAMED_WINDOWS:
            return cls(*NAMED_WINDOWS[text])
        try:
            low, high = (float(v) for v in text.split(","))
        except ValueError:
            raise InputError(
                f"window '{text}': use auto, {', '.join(NAMED_WINDOWS)} or LOW,HIGH (e.g. -160,240)."
            ) from None
        if not (np.isfinite(low) and np.isfinite(high)):
            raise InputError(f"window '{text}': LOW and HIGH must be finite numbers (e.g. -160,240).")
        if not high > low:
            raise InputError(f"window '{text}': HIGH must be above LOW.")
        return cls(low, high)

    def key(self) -> str:
        """A short string that identifies these settings (part of the embedding cache key)."""
        if self.low is None:
            return f"percentiles-{self.percentiles[0]:g}-{self.percentiles[1]:g}"
        return f"window-{self.low:g}-{self.high:g}"

    def limits(self, volume: np.ndarray) -> tuple[float, float]:
        if self.low is not None:
            return float(self.low), float(self.high)
        sample = volume if volume.size <= 4_000_000 else volume.ravel()[:: volume.size // 4_000_000 + 1]
        low, high = np.percentile(sample, self.percentiles)
        if not high > low:
            low, high = float(volume.min()), float(volume.max())
        if not high > low:
            raise InputError(
                f"the image is constant (every voxel is {low:g}); there is nothing to segment. Check you loaded "
                "the right volume."
            )
        return float(low), float(high)

    def apply(self, volume: np.ndarray, limits: tuple[float, float] | None = None) -> np.ndarray:
        """float32 copy of ``volume`` scaled to [0, 1] and clipped."""
        low, high = limits if limits is not None else self.limits(volume)
        out = (volume.astype(np.float32) - np.float32(low)) / np.float32(high - low)
        return np.clip(out, 0.0, 1.0, out=out)
