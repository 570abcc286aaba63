"""The on-disk embedding cache: atomic, checksummed, keyed by everything that changes an embedding."""

from __future__ import annotations

import numpy as np

from SAMFewshotLib.embedding_cache import EmbeddingCache, volume_key


def test_round_trip_is_float16_and_leaves_no_temporary_files(tmp_path):
    cache = EmbeddingCache(tmp_path, "key")
    embedding = np.random.default_rng(0).standard_normal((256, 64, 64)).astype(np.float32)
    cache.store(7, embedding)
    loaded = cache.load(7)
    assert loaded.dtype == np.float16
    np.testing.assert_allclose(loaded, embedding, atol=2e-3, rtol=2e-3)
    assert [p.name for p in cache.directory.iterdir()] == ["slice_00007.safetensors"]
    assert cache.path(7).stat().st_size < embedding.nbytes / 2 + 4096


def test_corrupt_or_truncated_entries_are_detected_and_removed(tmp_path):
    cache = EmbeddingCache(tmp_path, "key")
    cache.store(1, np.ones((4, 8, 8), np.float16))
    cache.store(2, np.ones((4, 8, 8), np.float16))
    data = bytearray(cache.path(1).read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the tensor: the checksum no longer matches
    cache.path(1).write_bytes(bytes(data))
    cache.path(2).write_bytes(cache.path(2).read_bytes()[:50])
    assert cache.load(1) is None and not cache.path(1).exists()
    assert cache.load(2) is None and not cache.path(2).exists()
    assert cache.load(3) is None


def test_key_depends_on_voxels_axis_model_and_preprocessing():
    array = np.zeros((3, 4, 5), np.int16)
    base = volume_key(array, (1, 1, 1), 0, "lite-medsam:abc", "auto")
    changed = array.copy()
    changed[0, 0, 0] = 1
    assert volume_key(array, (1, 1, 1), 0, "lite-medsam:abc", "auto") == base
    assert volume_key(changed, (1, 1, 1), 0, "lite-medsam:abc", "auto") != base
    assert volume_key(array, (1, 1, 2), 0, "lite-medsam:abc", "auto") != base
    assert volume_key(array, (1, 1, 1), 1, "lite-medsam:abc", "auto") != base
    assert volume_key(array, (1, 1, 1), 0, "vit_b:abc", "auto") != base
    assert volume_key(array, (1, 1, 1), 0, "lite-medsam:abc", "window-0-1") != base
