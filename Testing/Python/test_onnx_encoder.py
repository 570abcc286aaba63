"""The CPU encoder run by ONNX Runtime: same embeddings as PyTorch, or PyTorch with a warning."""

from __future__ import annotations

import logging

import pytest
import torch

from SAMFewshotLib.embeddings import VolumeEmbeddings
from SAMFewshotLib.onnx_encoder import TOLERANCE, load_onnx_encoder, onnx_runtime_available

pytestmark = pytest.mark.skipif(not onnx_runtime_available(), reason="onnxruntime is not installed")


def test_onnx_runtime_gives_pytorch_embeddings_on_a_real_slice(model, sample_image, cache_dir):
    model.prepare_cpu_encoder(cache_dir)
    assert model.cpu_encoder is not None, "ONNX Runtime should be used on the CPU when it is installed"
    embeddings = VolumeEmbeddings(model, sample_image, 0, cache_dir=cache_dir, use_disk_cache=False)
    model_input = model.to_model_input(embeddings.model_input([20]))
    with torch.inference_mode():
        expected = model.image_encoder(model_input)
    got = model.cpu_encoder(model_input)
    assert got.shape == expected.shape == (1, 256, 64, 64)
    assert float((got - expected).abs().max()) < TOLERANCE


def test_a_damaged_exported_encoder_falls_back_to_pytorch_and_is_removed(model, tmp_path, caplog):
    path = tmp_path / "onnx" / f"{model.identity.replace(':', '-')}-{model.image_size}.onnx"
    path.parent.mkdir()
    path.write_bytes(b"not an onnx file")
    with caplog.at_level(logging.WARNING):
        assert load_onnx_encoder(model.image_encoder, model.image_size, model.identity, tmp_path) is None
    assert "encoding with PyTorch" in caplog.text
    assert not path.exists()  # the next run exports it again


def test_engine_can_be_forced_to_pytorch(monkeypatch, tmp_path):
    from SAMFewshotLib.models import load_model

    monkeypatch.setenv("SAMFEWSHOT_ENGINE", "torch")
    fresh = load_model("lite-medsam", "cpu")
    fresh.prepare_cpu_encoder(tmp_path)
    assert fresh.cpu_encoder is None and not (tmp_path / "onnx").exists()
