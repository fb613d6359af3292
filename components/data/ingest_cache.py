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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.core.jsonio import atomic_path

log = logging.getLogger(__name__)

CACHE_FILE = "ingest_cache.parquet"
LAYOUT = 2
"""Bumped when the columns, their meaning or the file's form change: a cache of another layout is
ignored (2: written by pyarrow, the layout in the schema's metadata, not pandas' attrs)."""
_LAYOUT_KEY = b"imgflow.ingest_cache.layout"
COLUMNS = ("fingerprint", "image_id", "path", "format", "width", "height", "mode", "bytes", "channels",
           "bit_depth", "brightness", "contrast", "blur", "phash")  # fmt: skip


class CachedImage(NamedTuple):
    """What the bytes of one item determined last time (a named tuple: one is built per cached image on
    every ingest, and a tuple costs a fifth of a frozen dataclass)."""

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

    def __init__(self, data_dir: Path, listed: Mapping[str, Iterable[str]] | None = None) -> None:
        self._root = str(data_dir)  # plain strings: pathlib costs more per call than the lookup
        self._listed: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in (listed or {}).items()}
        """folder (data-dir-relative) -> its file names; ``listed`` gives folders already listed."""

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

    def __init__(
        self, data_dir: Path, rows: dict[str, CachedImage] | None = None, store: StoreListing | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self._rows = rows or {}
        self._store = store or StoreListing(data_dir)

    @classmethod
    def load(cls, data_dir: Path, store: StoreListing | None = None) -> IngestCache:
        """The cache beside the manifest; empty when there is none or it cannot be used. ``store``: the
        listing of the content store to check stored copies in (one of its own when not given)."""
        path = Path(data_dir) / CACHE_FILE
        if not path.exists():
            return cls(data_dir, store=store)
        try:
            table = pq.read_table(path)  # pyarrow, not pandas: a third of the time for the column lists
            layout = (table.schema.metadata or {}).get(_LAYOUT_KEY, b"none").decode()
            if layout != str(LAYOUT) or tuple(table.column_names) != COLUMNS:
                raise ValueError(f"layout {layout} / columns {table.column_names}")
        except (OSError, ValueError) as e:  # an optimisation only: a full ingest is always correct
            log.warning("ingest cache %s ignored (%s): every image is read", path, e)
            return cls(data_dir, store=store)
        columns = table.to_pydict()  # column lists: far cheaper than rows
        rows = map(CachedImage._make, zip(*(columns[c] for c in COLUMNS[1:]), strict=True))
        return cls(data_dir, dict(zip(columns["fingerprint"], rows, strict=True)), store)

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
    frame = frame.loc[frame["fingerprint"] != "", list(COLUMNS)]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({_LAYOUT_KEY: str(LAYOUT).encode()})
    path = Path(data_dir) / CACHE_FILE
    try:
        with atomic_path(path) as tmp:  # no dictionaries or statistics: ids and paths are unique
            pq.write_table(table, tmp, use_dictionary=False, write_statistics=False)
    except OSError as e:
        log.warning("ingest cache not written (%s): the next ingest reads every image", e)
