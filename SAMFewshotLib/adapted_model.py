"""An adapted model: the fine-tuned decoders (one per label) plus their target embeddings, and the segmented
source volumes as atlases (``atlas.py``), in one safetensors file.

The file's metadata holds a JSON header (format version, the base model's identity, labels and names,
preprocessing, slice axis, training settings, each atlas's geometry) so that applying it to another volume
reproduces the preprocessing, and applying it on a different base model is refused. safetensors holds only tensors, so
loading an adapted model can never run code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .atlas import Atlas
from .errors import CheckpointError
from .fewshot_decoder import FewShotMaskDecoder
from .intensity import IntensityWindow
from .models import SamModel
from .volume_io import Volume

FORMAT = "samfewshot-adapted-model"
FORMAT_VERSION = 1


@dataclass
class AdaptedModel:
    """Everything needed to segment new volumes with an adapted decoder."""

    model_identity: str  # SamModel.identity of the base model
    decoder_states: dict[int, dict[str, torch.Tensor]]  # label -> that label's decoder weights
    targets: dict[int, torch.Tensor]  # label -> (M, 256) target embeddings
    label_names: dict[int, str]
    axis_name: str  # anatomical axis the decoder was adapted on
    window: IntensityWindow = field(default_factory=IntensityWindow)
    settings: dict = field(default_factory=dict)
    version: str = __version__
    atlases: list[Atlas] = field(default_factory=list)  # segmented source volumes (older files hold none)

    @property
    def model_kind(self) -> str:
        return self.model_identity.split(":")[0]

    @classmethod
    def from_decoders(cls, model: SamModel, decoders: dict[int, FewShotMaskDecoder], targets, label_names, axis_name,
                      window, settings) -> AdaptedModel:
        return cls(
            model_identity=model.identity,
            decoder_states={
                int(label): {k: v.detach().to("cpu", torch.float32).clone() for k, v in decoder.state_dict().items()}
                for label, decoder in decoders.items()
            },
            targets={int(k): v.detach().to("cpu", torch.float32).clone() for k, v in targets.items()},
            label_names={int(k): str(v) for k, v in label_names.items()},
            axis_name=axis_name,
            window=window,
            settings=dict(settings),
        )

    def build_decoders(self, model: SamModel) -> dict[int, FewShotMaskDecoder]:
        """The decoders on ``model``'s device; refuses a base model other than the one adapted from."""
        if model.identity != self.model_identity:
            raise CheckpointError(
                f"this adapted model was made from base model {self.model_identity}, not {model.identity}; "
                f"apply it with the same base model (--model {self.model_kind}{':PATH' if self.model_kind != 'lite-medsam' else ''})."
            )
        decoders = {}
        for label, state in self.decoder_states.items():
            # A damaged or hand-made file must fail here with its name, not minutes later inside the decoder.
            if self.targets[label].shape[-1] != model.embedding_dim:
                raise CheckpointError(
                    f"this adapted model's target embeddings for label {label} have {self.targets[label].shape[-1]} "
                    f"values, not {model.embedding_dim}; the file is damaged: make it again."
                )
            decoders[label] = FewShotMaskDecoder(model)
            try:
                decoders[label].load_state_dict(state, strict=True)
            except RuntimeError as error:
                reason = " ".join(str(error).split())[:200]
                raise CheckpointError(
                    f"this adapted model's decoder for label {label} does not fit the {model.kind} decoder ({reason}); "
                    "the file is damaged: make it again."
                ) from None
            decoders[label].to(model.device).eval()
        return decoders

    def add_atlas(self, image: Volume, labels: np.ndarray) -> None:
        """Keep ``image`` with its full label map (same grid) to segment other volumes by registration."""
        self.atlases.append(Atlas.from_volume(image, labels))

    def header(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "samfewshot_version": self.version,
            "model_identity": self.model_identity,
            "labels": {str(k): self.label_names.get(k, f"label {k}") for k in sorted(self.targets)},
            "axis": self.axis_name,
            "window": {"low": self.window.low, "high": self.window.high, "percentiles": list(self.window.percentiles)},
            "settings": self.settings,
            "atlases": [{"spacing": list(a.spacing), "origin": list(a.origin), "direction": list(a.direction)}
                        for a in self.atlases],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path`` (.safetensors recommended)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"decoder.{label}.{k}": v.contiguous() for label, state in self.decoder_states.items()
                   for k, v in state.items()}
        tensors.update({f"targets.{k}": v.contiguous() for k, v in self.targets.items()})
        for number, atlas in enumerate(self.atlases):
            tensors[f"atlas.{number}.image"] = torch.from_numpy(np.ascontiguousarray(atlas.image))
            labels = atlas.labels.astype(np.uint8 if atlas.labels.max() < 256 else np.int32)
            tensors[f"atlas.{number}.labels"] = torch.from_numpy(np.ascontiguousarray(labels))
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(temporary), metadata={"samfewshot": json.dumps(self.header())})
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> AdaptedModel:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"adapted model {path}: no such file.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            header = json.loads(metadata["samfewshot"])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError) as error:
            raise CheckpointError(
                f"adapted model {path}: not a SAMFewshot adapted model, or the file is truncated or corrupt ({error}). "
                "Make one with 'samfewshot train'."
            ) from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CheckpointError(f"adapted model {path}: not a SAMFewshot adapted model.")
        try:  # the header is checked field by field: a damaged one is named, never a traceback
            version = int(header.get("format_version", -1))
        except (TypeError, ValueError):
            raise CheckpointError(f"adapted model {path}: its header is damaged (format version "
                                  f"{header.get('format_version')!r}); make it again.") from None
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"adapted model {path}: format version {version} is newer than this SAMFewshot "
                f"reads ({FORMAT_VERSION}); update SAMFewshot."
            )
        try:
            window = header.get("window", {})
            model = cls(
                model_identity=_text(header["model_identity"]),
                decoder_states=_by_label(tensors, "decoder."),
                targets={int(k[len("targets."):]): v for k, v in tensors.items() if k.startswith("targets.")},
                label_names={int(k): str(v) for k, v in header.get("labels", {}).items()},
                axis_name=_text(header.get("axis", "axial")),
                window=IntensityWindow(_bound(window.get("low")), _bound(window.get("high")),
                                       tuple(float(p) for p in window.get("percentiles", (0.5, 99.5)))),
                settings=dict(header.get("settings", {})),
                version=str(header.get("samfewshot_version", "?")),
                atlases=[_atlas(tensors, number, geometry)
                         for number, geometry in enumerate(header.get("atlases", []))],
            )
            model._check_tensors()
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"adapted model {path}: its header or tensors are damaged ({error}); make it again "
                                  "with 'samfewshot train'.") from None
        return model

    def _check_tensors(self) -> None:
        """One decoder and finite (M, C) target embeddings per label, at least one label (ValueError if not)."""
        if not self.targets or sorted(self.targets) != sorted(self.decoder_states):
            raise ValueError(f"target embeddings for labels {sorted(self.targets)}, "
                             f"decoders for {sorted(self.decoder_states)}")
        for label, target in self.targets.items():
            if target.dim() != 2 or target.shape[0] == 0 or not torch.isfinite(target).all():
                raise ValueError(f"label {label}'s target embeddings (shape {tuple(target.shape)}) are not "
                                 "finite (M, C) vectors")
        low, high = self.window.low, self.window.high
        if (low is None) != (high is None) or (low is not None and not high > low) or len(self.window.percentiles) != 2:
            raise ValueError(f"intensity window {low}, {high}, {self.window.percentiles}")


def _atlas(tensors: dict[str, torch.Tensor], number: int, geometry: dict) -> Atlas:
    """Atlas ``number`` from the file (ValueError, KeyError or TypeError if damaged)."""
    image = tensors[f"atlas.{number}.image"].numpy()
    labels = tensors[f"atlas.{number}.labels"].numpy()
    spacing, origin = (tuple(float(v) for v in geometry[key]) for key in ("spacing", "origin"))
    direction = tuple(float(v) for v in geometry["direction"])
    if image.ndim != 3 or image.shape != labels.shape or not np.isfinite(image).all():
        raise ValueError(f"atlas {number}: image {image.shape} and labels {labels.shape} are not one finite volume")
    if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9 or not min(spacing) > 0:
        raise ValueError(f"atlas {number}: geometry {geometry}")
    return Atlas(image.astype(np.float16), labels, spacing, origin, direction)


def _text(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, found {value!r}")
    return value


def _bound(value) -> float | None:
    """An intensity window bound from the header: None or a finite number."""
    if value is None:
        return None
    number = float(value)
    if not np.isfinite(number):
        raise ValueError(f"intensity window bound {value!r}")
    return number


def _by_label(tensors: dict[str, torch.Tensor], prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    """{'decoder.1.transformer.x': t} -> {1: {'transformer.x': t}}."""
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            label, _, name = key[len(prefix):].partition(".")
            grouped.setdefault(int(label), {})[name] = value
    return grouped
