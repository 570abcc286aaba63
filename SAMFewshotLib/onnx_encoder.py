"""The image encoder run by ONNX Runtime, for CPUs.

On a 2-core CPU, ONNX Runtime runs the LiteMedSAM encoder about twice as fast as eager PyTorch (see
docs/benchmarks.md), and the encoder is most of the time a first propagation takes. The encoder is exported
once per model identity into the cache directory and checked against PyTorch on a test image before it is
used; when ONNX Runtime is missing, the export fails or the check disagrees, PyTorch encodes instead and a
warning says why, so this is only ever a speed-up, never a different result.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# Largest difference allowed between ONNX Runtime's and PyTorch's embeddings of the same image (embeddings
# are of order 1 and are stored as float16, whose resolution near 1 is 1e-3).
TOLERANCE = 1e-3


class OnnxEncoder:
    """Callable (B, 3, S, S) float32 model input -> (B, 256, 64, 64) float32 embeddings, on the CPU."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = path
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, model_input: torch.Tensor) -> torch.Tensor:
        # exported with a fixed batch of one (the encoder's reshapes bake the batch size in); on a CPU
        # batching gains nothing anyway
        images = model_input.detach().to("cpu", torch.float32).numpy()
        out = [self.session.run(None, {self.input_name: images[i : i + 1]})[0] for i in range(images.shape[0])]
        return torch.from_numpy(np.concatenate(out))


def onnx_runtime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def load_onnx_encoder(image_encoder: torch.nn.Module, image_size: int, identity: str, cache_dir: Path) -> OnnxEncoder | None:
    """Export (once) and check the encoder; None, with a warning, when it can't be used."""
    if not onnx_runtime_available():
        log.info("onnxruntime is not installed; encoding with PyTorch.")
        return None
    path = Path(cache_dir) / "onnx" / f"{identity.replace(':', '-')}-{image_size}.onnx"
    try:
        if not path.exists():
            _export(image_encoder, image_size, path)
        encoder = OnnxEncoder(path)
        difference = _check(encoder, image_encoder, image_size)
    except Exception as error:  # any failure here only costs speed
        log.warning("could not run the encoder with ONNX Runtime (%s); encoding with PyTorch.", error)
        path.unlink(missing_ok=True)
        return None
    if difference > TOLERANCE:
        log.warning("ONNX Runtime's embeddings differ from PyTorch's by %.2g; encoding with PyTorch.", difference)
        path.unlink(missing_ok=True)
        return None
    return encoder


def _export(image_encoder: torch.nn.Module, image_size: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, image_size, image_size)
    # written under a temporary name and renamed, so a killed export never leaves a half file under the real name
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".onnx.part")
    os.close(handle)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(image_encoder, (example,), temporary, input_names=["image"], output_names=["embedding"],
                              opset_version=17, dynamo=False)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _check(encoder: OnnxEncoder, image_encoder: torch.nn.Module, image_size: int) -> float:
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(1, 3, image_size, image_size, generator=generator)
    with torch.inference_mode():
        expected = image_encoder(example).float()
    return float((encoder(example) - expected).abs().max())
