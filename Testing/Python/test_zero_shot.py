"""Zero-shot segmentation from a few clicks (zero_shot.py), with the real LiteMedSAM weights on the sample CT.

The sample CT's axial embeddings are in the shared test cache, so everything but the encoder fine-tuning
test only runs SAM's decoder. Clicks are placed the way a user would: at the deepest point of the
reference structure on the slice, and further deep points for more clicks.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import dice
from scipy import ndimage

from SAMFewshotLib.errors import Cancelled, InputError
from SAMFewshotLib.interactive import InteractiveSession
from SAMFewshotLib.prompts import SlicePrompt
from SAMFewshotLib.zero_shot import self_similarity_mask, zero_shot_segment

LIVER, SPLEEN = 1, 2
# (label, axial slice): two slices per organ, one near its largest extent and one further up
CASES = [(LIVER, 25), (LIVER, 40), (SPLEEN, 30), (SPLEEN, 40)]


@pytest.fixture(scope="module")
def session(sample_image, model, cache_dir):
    return InteractiveSession(sample_image, axis=0, model=model, cache_dir=cache_dir)


def deep_clicks(mask: np.ndarray, count: int) -> list[tuple[float, float]]:
    """(x, y) clicks: the deepest voxel of ``mask``, then deep voxels as far as possible from the others."""
    depth = ndimage.distance_transform_edt(mask)
    picked = [np.unravel_index(np.argmax(depth), depth.shape)]
    deep = np.argwhere(depth >= max(1.0, 0.5 * depth.max()))
    while len(picked) < count:
        distance = np.min([np.hypot(*(deep - np.asarray(p)).T) for p in picked], axis=0)
        picked.append(tuple(deep[np.argmax(distance)]))
    return [(float(col), float(row)) for row, col in picked]


def foreground(points) -> SlicePrompt:
    return SlicePrompt(tuple(points), (1,) * len(points))


def encoder_checksum(model) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.image_encoder.parameters()))


def test_self_similarity_mask_on_a_synthetic_embedding():
    """J: the cells whose vectors point like a clicked one; background clicks cut; padding never counts."""
    e0, e1, e2 = torch.eye(4)[:3]
    embedding = e0[:, None, None].repeat(1, 8, 8)[None]  # A (and the padding: rows and columns 6, 7)
    embedding[0, :, 2:3, 0:4] = (e0 + 0.3 * e1)[:, None, None]  # B: close to A
    embedding[0, :, 0:3, 4:6] = e1[:, None, None]  # C
    embedding[0, :, 3:6, 0:6] = e2[:, None, None]  # D: the background, most of the image
    region = {name: torch.zeros(8, 8, dtype=torch.bool) for name in "ABC"}
    region["A"][0:2, 0:4] = region["B"][2:3, 0:4] = region["C"][0:3, 4:6] = True
    valid = (6, 6)
    assert torch.equal(self_similarity_mask(embedding, [(1, 4)], [], valid), region["C"])
    # B is close to A: a click in A takes it in ...
    assert torch.equal(self_similarity_mask(embedding, [(0, 0)], [], valid), region["A"] | region["B"])
    # ... unless a background click in B says otherwise
    assert torch.equal(self_similarity_mask(embedding, [(0, 0)], [(2, 1)], valid), region["A"])
    # several foreground clicks: what looks like any one of them
    assert torch.equal(self_similarity_mask(embedding, [(0, 0), (1, 5)], [], valid),
                       region["A"] | region["B"] | region["C"])


def test_zero_shot_beats_plain_clicks(session, sample_reference):
    """LiteMedSAM all but ignores clicks; the self-similarity box makes 1 or 3 clicks give a usable mask."""
    plain, zero = {}, {}
    for label, index in CASES:
        reference = sample_reference[index] == label
        for count in (1, 3):
            prompt = foreground(deep_clicks(reference, count))
            plain[label, index, count] = dice(session.segment(index, prompt).mask, reference)
            result = zero_shot_segment(session, index, prompt)
            assert result.index == index and result.mask.shape == reference.shape
            assert result.mask.dtype == bool and result.probability.dtype == np.float32
            zero[label, index, count] = dice(result.mask, reference)
    summary = {key: (round(plain[key], 2), round(zero[key], 2)) for key in zero}
    assert np.mean(list(zero.values())) > np.mean(list(plain.values())) + 0.4, summary
    assert np.mean(list(zero.values())) > 0.7, summary
    assert min(zero.values()) > 0.45, summary
    for key in zero:  # the clicked structure always ends up (largely) in the mask
        assert zero[key] > plain[key], summary


def test_background_click_keeps_the_mask_off_it(session, sample_reference):
    """A background click on the neighbouring organ: the mask stays on the clicked organ and off the other."""
    index = 40
    spleen, liver = sample_reference[index] == SPLEEN, sample_reference[index] == LIVER
    (pos,) = deep_clicks(spleen, 1)
    (neg,) = deep_clicks(liver, 1)
    prompt = SlicePrompt((pos, neg), (1, 0))
    result = zero_shot_segment(session, index, prompt)
    assert not result.mask[int(neg[1]), int(neg[0])]
    assert result.mask[int(pos[1]), int(pos[0])]
    assert dice(result.mask, spleen) > 0.6
    assert (result.mask & liver).sum() < 0.05 * liver.sum()


def test_encoder_fine_tuning_leaves_the_shared_model_alone(session, sample_reference):
    """Two steps of test-time tuning give a valid mask, report progress, and change no shared weight."""
    index = 40
    reference = sample_reference[index] == SPLEEN
    prompt = foreground(deep_clicks(reference, 1))
    before = encoder_checksum(session.model)
    cached_before = session.embeddings.get([index]).clone()
    seen = []
    result = zero_shot_segment(session, index, prompt, tune_encoder_steps=2, seed=0,
                               progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen == [("tuning encoder", 1, 2), ("tuning encoder", 2, 2)]
    assert encoder_checksum(session.model) == before
    assert not any(p.requires_grad for p in session.model.image_encoder.parameters())
    assert torch.equal(session.embeddings.get([index]), cached_before)  # the cache still holds the frozen encoding
    assert result.mask.shape == reference.shape and result.mask.dtype == bool
    assert np.all((result.probability >= 0) & (result.probability <= 1))
    # two steps at the paper's learning rate barely move the encoder: the mask stays on the spleen
    assert dice(result.mask, reference) > 0.6

    # a cancel that arrives once tuning has begun stops it before the next step
    with pytest.raises(Cancelled):
        zero_shot_segment(session, index, prompt, tune_encoder_steps=50, cancel=CancelAfter(checks=1))
    assert encoder_checksum(session.model) == before


class CancelAfter(threading.Event):
    """An event that reads as set from its (checks + 1)-th look on: a cancel arriving while work is under way."""

    def __init__(self, checks: int):
        super().__init__()
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_refuses_prompts_that_are_not_clicks_on_the_structure(session):
    background_only = SlicePrompt(((60.0, 50.0),), (0,))
    with pytest.raises(InputError, match="foreground click"):
        zero_shot_segment(session, 30, background_only)
    with pytest.raises(InputError, match="foreground click"):
        zero_shot_segment(session, 30, SlicePrompt(box=(10.0, 10.0, 40.0, 40.0)))
    with pytest.raises(InputError, match="box"):
        zero_shot_segment(session, 30, SlicePrompt(((60.0, 50.0),), (1,), box=(10.0, 10.0, 90.0, 90.0)))
    with pytest.raises(InputError, match="outside the slice"):
        zero_shot_segment(session, 30, SlicePrompt(((500.0, 50.0),), (1,)))
    with pytest.raises(InputError, match="does not exist"):
        zero_shot_segment(session, 999, SlicePrompt(((60.0, 50.0),), (1,)))
    with pytest.raises(InputError, match="tune_encoder_steps"):
        zero_shot_segment(session, 30, SlicePrompt(((60.0, 50.0),), (1,)), tune_encoder_steps=-1)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        zero_shot_segment(session, 30, SlicePrompt(((60.0, 50.0),), (1,)), cancel=cancel)
