"""On-disk cache of slice embeddings: one safetensors file per slice, float16, checksummed, written atomically.

Layout: ``<root>/<volume key>/slice_<index>.safetensors``. The volume key hashes everything that changes an
embedding (voxels, slice axis, model identity, preprocessing), so a stale entry can never be found under a
current key. Each file carries the SHA-256 of its tensor bytes in its metadata: a truncated or corrupt file
(a run killed mid-write on a file system without atomic rename, a disk error) is detected, deleted and
recomputed. Files are written to a temporary name and renamed, so concurrent runs on the same volume never
read a half-written entry; both compute it and the last rename wins with identical content.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from platformdirs import user_cache_dir
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .errors import CacheError

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"


def default_cache_dir() -> Path:
    """``$SAMFEWSHOT_CACHE_DIR`` or the user's cache folder (e.g. ~/.cache/samfewshot)."""
    return Path(os.environ.get("SAMFEWSHOT_CACHE_DIR") or user_cache_dir("samfewshot", appauthor=False))


class EmbeddingCache:
    """Slice embeddings of one volume key on disk."""

    def __init__(self, root: str | os.PathLike | None, volume_key: str):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.directory = self.root / volume_key
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(
                f"cannot create the embedding cache folder {self.directory} ({error.strerror}); "
                "choose a writable one with --cache-dir."
            ) from None

    def path(self, index: int) -> Path:
        return self.directory / f"slice_{index:05d}.safetensors"

    def load(self, index: int) -> np.ndarray | None:
        """The cached float16 embedding (C, H, W) of slice ``index``, or None if absent or damaged."""
        path = self.path(index)
        if not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
            embedding = load_file(str(path))["embedding"]
            if metadata.get("format") != CACHE_FORMAT or metadata.get("sha256") != _digest(embedding):
                raise ValueError("checksum mismatch")
            return embedding
        except (SafetensorError, ValueError, KeyError, OSError) as error:
            log.warning("embedding cache entry %s is damaged (%s); recomputing it.", path, error)
            path.unlink(missing_ok=True)
            return None

    def store(self, index: int, embedding: np.ndarray) -> None:
        """Write one float16 embedding atomically (temporary file + rename)."""
        embedding = np.ascontiguousarray(embedding, dtype=np.float16)
        path = self.path(index)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{id(embedding):x}.tmp")
        try:
            save_file({"embedding": embedding}, str(temporary), metadata={"format": CACHE_FORMAT, "sha256": _digest(embedding)})
            os.replace(temporary, path)
        except OSError as error:
            log.warning("could not write embedding cache entry %s (%s); continuing without it.", path, error)
        finally:
            temporary.unlink(missing_ok=True)


def _digest(embedding: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(embedding).tobytes()).hexdigest()


def volume_key(array: np.ndarray, spacing, axis: int, model_identity: str, preprocessing: str) -> str:
    """A hex key for one volume's slice embeddings under one model and preprocessing."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(repr((array.shape, str(array.dtype), tuple(float(s) for s in spacing))).encode())
    digest.update(f"|axis={axis}|model={model_identity}|prep={preprocessing}|format={CACHE_FORMAT}".encode())
    return digest.hexdigest()[:40]
