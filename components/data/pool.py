"""The unlabelled pool: images with no label, kept apart from the data version until someone labels them.

``ingest_pool(folder, data_dir=...)`` reads every file under ``folder`` (recursively, sorted),
content-hashes it (``image_id`` = sha256 of the bytes, exactly as ingest does), stores the usable ones
under ``<data dir>/pool/store/<sha[:2]>/<sha>.<ext>`` and writes ``pool/pool.parquet`` (one row per
distinct image) and ``pool/quarantine.csv`` (every file not kept, with the reason; the same columns as
ingest's quarantine list) together (:func:`components.core.jsonio.atomic_group`).

The pool lives in its own folder, not in ``store/``: the manifest's md5 (the data version) does not
change when the pool does, and a ``dvc repro`` that clears ingest's outputs leaves the pool alone.
Labels imported with ``imgflow label-import`` are kept in ``pool/labels.csv`` (``path,label,image_id``,
paths relative to the pool folder); ingest lists that file as a source beside ``ingest.source`` and
puts its images in the train split (:data:`IMPORTED_SPLIT`), so they join the data version through
the normal ingest path with their ids unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from components.core.errors import DataError
from components.core.jsonio import atomic_group, atomic_path, complete_commits, remove_stale_temps
from components.data.image_stats import phash_hex
from components.data.manifest import QUARANTINE_COLUMNS
from components.data.sources import Rejection, SourceItem, csv_items, examine_image

POOL_DIR = "pool"
POOL_FILE = "pool.parquet"
LABELS_FILE = "labels.csv"
"""Imported labels (``path,label,image_id``), read by ingest as an extra source."""
LABELS_COLUMNS: tuple[str, ...] = ("path", "label", "image_id")
IMPORTED_SPLIT = "imported"
"""The official split ingest gives imported items: they go to ``train`` and never shift the splits
of the images already in the data version."""
POOL_COLUMNS: tuple[str, ...] = ("image_id", "path", "source_path", "width", "height", "mode", "phash")
_JOURNAL = ".pool.commit.json"


def pool_root(data_dir: Path) -> Path:
    """``<data dir>/pool``."""
    return Path(data_dir) / POOL_DIR


def labels_file(data_dir: Path) -> Path:
    """``<data dir>/pool/labels.csv``: the labels imported so far (may not exist)."""
    return pool_root(data_dir) / LABELS_FILE


@dataclass(frozen=True)
class PoolSummary:
    """What one pool scan did. ``seen == kept + quarantined``."""

    folder: str
    seen: int
    kept: int
    quarantined: int
    reasons: dict[str, int]
    pool: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"unlabelled pool {folder} is not a folder: set ingest.unlabelled or --pool to one")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _store(root: Path, image_id: str, ext: str, data: bytes) -> str:
    """Store bytes content-addressed under ``root/store`` (tmp + rename); the path relative to ``root``."""
    rel = f"store/{image_id[:2]}/{image_id}.{ext}"
    dest = root / rel
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{image_id}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return rel


def ingest_pool(folder: Path, *, data_dir: Path, max_pixels: int = 89_478_485) -> PoolSummary:
    """Scan ``folder`` into the pool (see the module docstring); bad files are quarantined with a reason."""
    root = pool_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    complete_commits(root)
    remove_stale_temps(root)
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    thumbs = []
    seen_ids: dict[str, str] = {}
    files = _files(Path(folder))
    for file in files:
        shown = file.relative_to(folder).as_posix()
        outcome = _examine(file, max_pixels=max_pixels)
        if isinstance(outcome, Rejection):
            rejected.append(_quarantine_row(folder, shown, outcome.reason, ""))
            continue
        image_id, data, info, thumb = outcome
        if image_id in seen_ids:
            reason = f"duplicate: byte-identical to kept image {image_id} ({seen_ids[image_id]})"
            rejected.append(_quarantine_row(folder, shown, reason, image_id))
            continue
        seen_ids[image_id] = shown
        rel = _store(root, image_id, info.format or "bin", data)
        rows.append({"image_id": image_id, "path": rel, "source_path": shown, "width": info.width,
                     "height": info.height, "mode": info.mode})  # fmt: skip
        thumbs.append(thumb)
    for row, h in zip(rows, phash_hex(thumbs) if thumbs else [], strict=True):
        row["phash"] = h
    frame = pd.DataFrame(rows, columns=list(POOL_COLUMNS))
    _commit(root, frame, rejected)
    reasons: dict[str, int] = {}
    for r in rejected:
        key = r["reason"].split(":", 1)[0]
        reasons[key] = reasons.get(key, 0) + 1
    return PoolSummary(str(folder), len(files), len(rows), len(rejected), reasons, str(root / POOL_FILE))


def _examine(file: Path, *, max_pixels: int) -> tuple[str, bytes, Any, Any] | Rejection:
    try:
        data = file.read_bytes()
    except OSError as e:
        return Rejection("unreadable", f"unreadable: cannot read the file: {e}")
    examined = examine_image(data, max_pixels=max_pixels)
    if isinstance(examined, Rejection):
        return examined
    info, sample = examined
    return hashlib.sha256(data).hexdigest(), data, info, sample.thumb


def _quarantine_row(folder: Path, shown: str, reason: str, image_id: str) -> dict[str, str]:
    return {"source": f"pool:{folder}", "source_path": shown, "label": "", "reason": reason,
            "image_id": image_id}  # fmt: skip


def _commit(root: Path, frame: pd.DataFrame, rejected: list[dict[str, str]]) -> None:
    """pool.parquet and quarantine.csv replace the previous pair together."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(QUARANTINE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rejected)
    with atomic_group([root / POOL_FILE, root / "quarantine.csv"], journal=root / _JOURNAL) as temps:
        frame.to_parquet(temps[0], index=False)
        temps[1].write_text(buf.getvalue(), encoding="utf-8")


def read_pool(data_dir: Path) -> pd.DataFrame:
    """The pool's rows (``POOL_COLUMNS``); a DataError when no pool was scanned yet."""
    path = pool_root(data_dir) / POOL_FILE
    if not path.exists():
        raise DataError(
            f"no unlabelled pool in {pool_root(data_dir)}: run `imgflow label-next --pool <folder>`"
        )
    return pd.read_parquet(path)


def read_imported(data_dir: Path) -> pd.DataFrame:
    """The labels imported so far (``LABELS_COLUMNS``; empty when none)."""
    path = labels_file(data_dir)
    if not path.exists():
        return pd.DataFrame(columns=list(LABELS_COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def write_imported(data_dir: Path, frame: pd.DataFrame) -> None:
    """Replace ``pool/labels.csv`` atomically (rows sorted by image_id: same labels, same bytes)."""
    table = frame.reindex(columns=list(LABELS_COLUMNS)).sort_values("image_id", kind="stable")
    with atomic_path(labels_file(data_dir)) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


def imported_items(data_dir: Path) -> list[SourceItem]:
    """``pool/labels.csv`` as source items in the :data:`IMPORTED_SPLIT` (none when nothing was imported)."""
    path = labels_file(data_dir)
    if not path.exists():
        return []
    _, items = csv_items(path)
    return [replace(item, official_split=IMPORTED_SPLIT) for item in items]
