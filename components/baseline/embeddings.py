"""On-disk cache of image embeddings, keyed by (encoder, image_id), so each image is encoded once.

The encoder key names the model *and* its weights (``ViT-B-32/laion2b_s34b_b79k``, or a model
name plus the sha256 of a local checkpoint), so features of different weights never mix. Any
stage that needs image features (the CLIP baselines, label quality: near-duplicates, outliers)
reads the same cache.

Layout under ``root`` (e.g. ``.imgflow/embeddings``)::

    <slug of the key>-<sha256(key)[:10]>/
        key.txt             the full encoder key
        part-00000.npz      ids: (n,) str image_ids; features: (n, D) float32, as the encoder gave them
        part-00001.npz      one part per :meth:`EmbeddingCache.put`; written to a temp file, then renamed

Features are stored unnormalised; callers normalise where their method needs it (:func:`normalize`).
:class:`MemoryCache` is the same interface without a disk.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; x: (N, D). CLIP features are compared by direction only."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cache_dir_for(root: Path, key: str) -> Path:
    """The folder holding one encoder's embeddings: readable slug plus a hash of the exact key."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:60]
    return Path(root) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class EmbeddingCache:
    """Image features of one encoder (``key``), by ``image_id``; loaded lazily, appended per batch."""

    def __init__(self, root: Path, key: str) -> None:
        self.key = key
        self.dir = cache_dir_for(root, key)
        self._index: dict[str, tuple[int, int]] | None = None  # image_id -> (part, row)
        self._parts: list[np.ndarray] = []

    def _load(self) -> dict[str, tuple[int, int]]:
        if self._index is None:
            self._index, self._parts = {}, []
            for path in sorted(self.dir.glob("part-*.npz")):
                with np.load(path, allow_pickle=False) as z:
                    ids, feats = z["ids"], z["features"]
                part = len(self._parts)
                self._parts.append(feats)
                self._index.update({str(i): (part, row) for row, i in enumerate(ids)})
            if self._index:
                logger.info("embedding cache %s: %d images", self.dir, len(self._index))
        return self._index

    def __len__(self) -> int:
        return len(self._load())

    @property
    def dim(self) -> int | None:
        """Feature width D, or None while the cache is empty."""
        self._load()
        return int(self._parts[0].shape[1]) if self._parts else None

    def missing(self, image_ids: Sequence[str]) -> list[str]:
        """The ids (in order, without repeats) that are not cached yet."""
        index = self._load()
        return list(dict.fromkeys(i for i in image_ids if i not in index))

    def get(self, image_ids: Sequence[str]) -> np.ndarray:
        """Features (N, D) float32 in ``image_ids`` order; every id must be cached (see :meth:`missing`)."""
        index = self._load()
        absent = [i for i in image_ids if i not in index]
        if absent:
            raise KeyError(f"{len(absent)} image ids are not in the embedding cache, e.g. {absent[0]}")
        if not image_ids:
            return np.zeros((0, self.dim or 0), np.float32)
        loc = np.array([index[i] for i in image_ids], dtype=np.int64)
        out = np.empty((len(image_ids), self._parts[0].shape[1]), np.float32)
        for part in np.unique(loc[:, 0]):  # one fancy-index per part, no per-image Python work
            rows = loc[:, 0] == part
            out[rows] = self._parts[part][loc[rows, 1]]
        return out

    def put(self, image_ids: Sequence[str], features: np.ndarray) -> None:
        """Append features (N, D) of ``image_ids`` as one new part (atomically: temp file, rename)."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(image_ids):
            raise ValueError(f"features must be (N, D) with N = {len(image_ids)} ids, got {features.shape}")
        if not len(image_ids):
            return
        dim = self.dim
        if dim is not None and features.shape[1] != dim:
            raise ValueError(f"cache {self.dir} holds {dim}-d features, got {features.shape[1]}-d")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "key.txt").write_text(self.key + "\n")
        part = len(self._parts)
        path = self.dir / f"part-{part:05d}.npz"
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, ids=np.asarray(image_ids, dtype=str), features=features)
        tmp.replace(path)
        index = self._load()
        self._parts.append(features)
        index.update({str(i): (part, row) for row, i in enumerate(image_ids)})


class MemoryCache(EmbeddingCache):
    """The cache interface without a disk (an encoder run with no cache folder)."""

    def __init__(self) -> None:
        self.key, self._index, self._parts = "memory", {}, []

    def put(self, image_ids: Sequence[str], features: np.ndarray) -> None:
        index = self._load()
        part = len(self._parts)
        self._parts.append(np.asarray(features, np.float32))
        index.update({str(i): (part, row) for row, i in enumerate(image_ids)})
