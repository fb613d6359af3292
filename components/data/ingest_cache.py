"""What the last ingest measured per source item, so the next one reads only what is new or changed.

Ingest decodes, hashes and measures every image; on a data version that grew by 1% that is 99% wasted
work, and a scheduled no-op run re-ingested 70,000 unchanged Fashion-MNIST images. After each ingest the
rows of the kept images are saved with their items' fingerprints (:attr:`SourceItem.fingerprint`: path,
size, mtime and inode of a file; the IDX file's identity and the index for Fashion-MNIST) in
``<data dir>/ingest_cache.parquet``. The next ingest takes an item whose fingerprint is in the cache,
and whose stored copy is still in the content store, from the cache without reading it. Labels, splits,
deduplication and the quarantine are decided afresh every time: the cache holds only what the bytes
determine. The cache is an optimisation: missing, unreadable or of another layout, it is ignored (a full
ingest), and ``ingest.incremental: false`` ignores it too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.core.jsonio import atomic_path

log = logging.getLogger(__name__)

CACHE_FILE = "ingest_cache.parquet"
LAYOUT = 1
"""Bumped when the columns or their meaning change: a cache of another layout is ignored."""
COLUMNS = ("fingerprint", "image_id", "path", "format", "width", "height", "mode", "bytes", "channels",
           "bit_depth", "brightness", "contrast", "blur", "phash")  # fmt: skip


@dataclass(frozen=True)
class CachedImage:
    """What the bytes of one item determined last time."""

    image_id: str
    path: str
    format: str
    width: int
    height: int
    mode: str
    bytes: int
    channels: int
    bit_depth: int
    brightness: float
    contrast: float
    blur: float
    phash: str


class StoreListing:
    """Which stored copies exist under ``data_dir``: each store folder is listed once, on first use (one
    listing per folder instead of one stat per image: 70k stats were a tenth of a no-op ingest). The
    project lock keeps anyone else from deleting store files meanwhile."""

    def __init__(self, data_dir: Path) -> None:
        self._root = str(data_dir)  # plain strings: pathlib costs more per call than the lookup
        self._listed: dict[str, frozenset[str]] = {}

    def has(self, rel: str) -> bool:
        """Whether the stored copy ``rel`` (a data-dir-relative path) exists (thread-safe)."""
        folder, _, name = rel.rpartition("/")
        names = self._listed.get(folder)
        if names is None:  # two threads may list the same folder once each: same answer
            try:
                names = frozenset(os.listdir(os.path.join(self._root, folder)))
            except OSError:
                names = frozenset()
            self._listed[folder] = names
        return name in names


class IngestCache:
    """fingerprint -> :class:`CachedImage` of the previous ingest into ``data_dir``."""

    def __init__(self, data_dir: Path, rows: dict[str, CachedImage] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._rows = rows or {}
        self._store = StoreListing(data_dir)

    @classmethod
    def load(cls, data_dir: Path) -> IngestCache:
        """The cache beside the manifest; empty when there is none or it cannot be used."""
        path = Path(data_dir) / CACHE_FILE
        if not path.exists():
            return cls(data_dir)
        try:
            frame = pd.read_parquet(path)
            if int(frame.attrs.get("layout", 0)) != LAYOUT or tuple(frame.columns) != COLUMNS:
                raise ValueError(f"layout {frame.attrs.get('layout')} / columns {list(frame.columns)}")
        except (OSError, ValueError) as e:  # an optimisation only: a full ingest is always correct
            log.warning("ingest cache %s ignored (%s): every image is read", path, e)
            return cls(data_dir)
        columns = [frame[c].tolist() for c in COLUMNS]  # column lists: far cheaper than to_dict("records")
        return cls(data_dir, {row[0]: CachedImage(*row[1:]) for row in zip(*columns, strict=True)})

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, fingerprint: str) -> CachedImage | None:
        """The cached row of ``fingerprint`` when its stored copy still exists (thread-safe)."""
        if not fingerprint:
            return None
        row = self._rows.get(fingerprint)
        if row is None or not self._store.has(row.path):
            return None
        return row


def save_cache(
    data_dir: Path, fingerprints: Sequence[str], manifest: pd.DataFrame, formats: Sequence[str]
) -> None:
    """Write the cache for the rows of ``manifest`` (same order as ``fingerprints`` and ``formats``);
    rows without a fingerprint are left out. Atomic; a failure to write only costs the next ingest time."""
    frame = manifest.assign(fingerprint=list(fingerprints), format=list(formats))
    frame = frame.loc[frame["fingerprint"] != "", list(COLUMNS)].reset_index(drop=True)
    frame.attrs["layout"] = LAYOUT
    path = Path(data_dir) / CACHE_FILE
    try:
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
    except OSError as e:
        log.warning("ingest cache not written (%s): the next ingest reads every image", e)
