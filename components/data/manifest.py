"""The manifest: one row per unique image, the dataset's single source of truth.

Columns (parquet, written by :func:`write_manifest`):

============  ===============  ===============================================================
image_id      string           sha256 of the stored file's bytes (content address)
path          string           stored file, relative to the data dir (``store/ab/<sha>.png``)
label         string           primary label (single-label tasks; first label otherwise)
labels        list<string>     the full label set (``[label]`` for single-label tasks)
width         int32            pixels
height        int32            pixels
mode          string           PIL mode after decoding (``L``, ``RGB``, ...)
bytes         int64            stored file size
split         string           ``train`` / ``val`` / ``test``
source        string           the source spec the row came from (``fashion-mnist``, ...)
source_path   string           where the image came from (file path, ``idx:train:123``)
decode_ok     bool             the file decoded fully (always true for ingested rows: the rest
                               are quarantined)
aspect        float64          width / height (as displayed, EXIF orientation applied)
channels      int32            bands of the PIL mode (1 grey, 3 RGB, 4 RGBA/CMYK, ...)
bit_depth     int32            bits per channel (8; 16 for ``I;16``; 1 for bilevel)
brightness    float64          mean grey value, 0..1
contrast      float64          standard deviation of the grey values (RMS contrast), 0..1
blur          float64          variance of the grey image's Laplacian (low: blurry or flat)
phash         string           64-bit perceptual hash, 16 hex digits (``imagehash.phash``)
============  ===============  ===============================================================

The columns from ``decode_ok`` on (:data:`IMAGE_PROPERTY_COLUMNS`) were appended later: a frame
without them is still written (as nulls) and older manifests still read.

The data version is the DVC-style md5 of the manifest file (see :func:`data_version`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.core.errors import DataError
from components.core.jsonio import write_json

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("label", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("bytes", pa.int64()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("source_path", pa.string()),
        # image properties, computed once at ingestion (appended: older readers ignore them)
        ("decode_ok", pa.bool_()),
        ("aspect", pa.float64()),
        ("channels", pa.int32()),
        ("bit_depth", pa.int32()),
        ("brightness", pa.float64()),
        ("contrast", pa.float64()),
        ("blur", pa.float64()),
        ("phash", pa.string()),
    ]
)
MANIFEST_COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)
IMAGE_PROPERTY_COLUMNS: tuple[str, ...] = MANIFEST_COLUMNS[MANIFEST_COLUMNS.index("decode_ok") :]
CORE_COLUMNS: tuple[str, ...] = MANIFEST_COLUMNS[: MANIFEST_COLUMNS.index("decode_ok")]
"""The columns every manifest has had since the first version."""
SPLITS: tuple[str, ...] = ("train", "val", "test")

QUARANTINE_COLUMNS: tuple[str, ...] = ("source", "source_path", "label", "reason", "image_id")


@dataclass(frozen=True)
class DataPaths:
    """Where ingestion writes, under one data directory."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.csv"

    @property
    def dataset(self) -> Path:
        """``dataset.json``: class names in index order, task, counts (small, human-readable)."""
        return self.root / "dataset.json"


@dataclass(frozen=True)
class DatasetInfo:
    """What training needs to know about the dataset besides the rows."""

    classes: tuple[str, ...]
    task: str = "singlelabel"
    source: str = ""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """split -> class -> number of images."""

    def save(self, path: Path) -> None:
        write_json(path, asdict(self), sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> DatasetInfo:
        raw: dict[str, Any] = json.loads(Path(path).read_text())
        raw["classes"] = tuple(raw["classes"])
        return cls(**raw)


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    """Write rows sorted by (split, image_id) so the same data gives byte-identical files.

    Image-property columns missing from ``df`` are written as nulls.
    """
    missing = [c for c in IMAGE_PROPERTY_COLUMNS if c not in df.columns]
    if missing:
        df = df.assign(**dict.fromkeys(missing))
    df = df.loc[:, list(MANIFEST_COLUMNS)].sort_values(["split", "image_id"], kind="stable")
    table = pa.Table.from_pandas(df.reset_index(drop=True), schema=MANIFEST_SCHEMA, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def read_manifest(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def require_manifest(paths: DataPaths) -> Path:
    """The manifest's path; a DataError saying to run ingest first when there is none yet."""
    if not paths.manifest.exists():
        raise DataError(f"no manifest at {paths.manifest}: run `imgflow ingest` first")
    return paths.manifest


def data_version(path: Path) -> str:
    """The manifest's md5: the hash DVC records in ``dvc.lock`` for it (a file output). With a label
    tree beside it (``taxonomy.json``) the md5 of both digests, so a changed tree is a new version."""
    version = file_md5(path)
    tree = path.parent / "taxonomy.json"
    if tree.is_file():
        version = hashlib.md5(f"{version}:{file_md5(tree)}".encode()).hexdigest()
    return version


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_exclusions(path: Path) -> set[str]:
    """image_ids listed in an exclusion CSV (column ``image_id``), e.g. the audit's ``excluded.csv``."""
    return set(pd.read_csv(path, usecols=["image_id"], dtype=str)["image_id"])
