"""Shared fixtures: the sample CT, the real LiteMedSAM model, and one propagation reused by many tests.

The encoder is the expensive part (about 1-2 s per slice on 2 CPU cores), so the sample volume is encoded
once per test session into a session cache folder and every test reads from it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "Testing" / "Data"
sys.path.insert(0, str(REPO))

from SAMFewshotLib.volume_io import read_label_map, read_volume  # noqa: E402

SAMPLE_CT = DATA / "sample_ct.nii.gz"
SAMPLE_PAINTED = DATA / "sample_ct_painted.nii.gz"
SAMPLE_REFERENCE = DATA / "sample_ct_reference.nii.gz"
PAINTED_SLICES = (10, 18, 27, 35, 43)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    prediction, reference = prediction.astype(bool), reference.astype(bool)
    total = prediction.sum() + reference.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(prediction, reference).sum() / total)


# One embedding cache for every test file: entries are keyed by content and checksummed, so reusing the
# folder across sessions is safe and saves encoding the sample again.
TEST_CACHE_DIR = Path(os.environ.get("SAMFEWSHOT_TEST_CACHE") or Path(tempfile.gettempdir()) / "samfewshot-test-cache")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return TEST_CACHE_DIR


@pytest.fixture(scope="session")
def sample_image():
    return read_volume(SAMPLE_CT)


@pytest.fixture(scope="session")
def sample_painted(sample_image):
    return read_label_map(SAMPLE_PAINTED, sample_image).array


@pytest.fixture(scope="session")
def sample_reference(sample_image):
    return read_label_map(SAMPLE_REFERENCE, sample_image).array


@pytest.fixture(scope="session")
def model():
    from SAMFewshotLib.pipeline import get_model

    return get_model("lite-medsam", "cpu")


@pytest.fixture(scope="session")
def sample_adaptation(sample_image, sample_painted, model, cache_dir):
    """Decoders adapted to liver and spleen painted on 5 axial slices of the sample CT."""
    from SAMFewshotLib.pipeline import adapt_to_painted

    return adapt_to_painted(sample_image, sample_painted, model=model, cache_dir=cache_dir, seed=0)


@pytest.fixture(scope="session")
def sample_result(sample_adaptation):
    """The default method's result on the sample CT."""
    from SAMFewshotLib.pipeline import propagate

    return propagate(sample_adaptation, "default")


@pytest.fixture(scope="session")
def contour_result(sample_adaptation):
    """fill-walk: Fill-between inside the painted range, the decoder walking beyond it."""
    from SAMFewshotLib.pipeline import propagate

    return propagate(sample_adaptation, "fill-walk")


@pytest.fixture(scope="session")
def decoder_walk_result(sample_adaptation):
    """register-walk: the default's registration inside the painted range, the decoder walking beyond it."""
    from SAMFewshotLib.pipeline import propagate

    return propagate(sample_adaptation, "register-walk")


@pytest.fixture(scope="session")
def sample_seed_result(sample_adaptation):
    """The seed paper's per-slice prediction (and its 3D-linked variant) from the same adaptation."""
    from SAMFewshotLib.pipeline import propagate

    return propagate(sample_adaptation, "seed-linked")
