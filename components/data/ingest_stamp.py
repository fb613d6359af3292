"""The whole-ingest short-circuit: an unchanged source answers with the last ingest's summary.

The per-item cache (:mod:`components.data.ingest_cache`) spares reading unchanged images, but a no-op
ingest of Fashion-MNIST still lists 70,000 items, looks each up and rewrites the manifest (~2.4 s on 2
cores). Where a source's identity is a handful of files — Fashion-MNIST's four IDX files — that identity
decides everything the ingest would do. So after each ingest a *stamp* is written beside the manifest
(``ingest_stamp.json``): a key over

- the source spec, every ingest option (classes, split fractions, seed, caps, task, taxonomy) and the
  taxonomy file's identity when the tree is a file,
- the identity (path, size, mtime, inode) of the source's files and of the imported labels
  (``pool/labels.csv``, :mod:`components.data.pool`) and their images,
- the code that decides the result (the ingest modules' source files, as ``dvc.yaml`` lists them),

and the digests of what that ingest wrote (manifest, quarantine list, ``dataset.json``, label tree).
The next ingest with the same key, whose outputs still have those digests and whose manifest's images
are all still in the content store, returns the recorded summary without listing or reading anything.
Anything else (another key, an edited or checked-out manifest, a missing stored image, an unreadable
stamp) falls through to the ordinary ingest, which is always correct. Sources without such an identity
(image folders, CSV manifests: each file has to be stat'ed anyway) have no stamp.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core.jsonio import atomic_path
from components.data.manifest import DataPaths, file_digest

if TYPE_CHECKING:
    from components.data.ingest_cache import StoreListing
from components.task.taxonomy import TAXONOMY_FILE

log = logging.getLogger(__name__)

STAMP_FILE = "ingest_stamp.json"
LAYOUT = 1
"""Bumped when the stamp's meaning changes: a stamp of another layout is ignored."""
CODE_MODULES = (
    "components.data.ingest",
    "components.data.ingest_cache",
    "components.data.ingest_stamp",
    "components.data.sources",
    "components.data.manifest",
    "components.data.pool",
    "components.task.taxonomy",
    "components.task.splits",
)
"""The modules whose code decides an ingest's result (``dvc.yaml``'s ingest deps, and this one)."""


def stamp_key(options: dict[str, Any], identities: Sequence[str]) -> str | None:
    """sha256 over the options, the source files' identities (:func:`stat_fingerprint`) and the ingest
    code; None when an identity is empty (a file that cannot be stat'ed: no stamp, the ordinary ingest
    reports the problem)."""
    if not all(identities):
        return None
    h = hashlib.sha256()
    h.update(json.dumps({"layout": LAYOUT, "options": options, "files": list(identities)}, sort_keys=True,
                        default=str).encode())  # fmt: skip
    for name in CODE_MODULES:  # their files, whether imported yet or not
        spec = importlib.util.find_spec(name)
        source = spec.origin if spec is not None else None
        h.update(f"{name}:{file_digest(Path(source), 'sha256') if source else 'absent'}".encode())
    return h.hexdigest()


def _outputs(paths: DataPaths) -> dict[str, str | None]:
    """sha256 of each file the ingest writes (None when absent: the label tree of flat labels)."""
    files = {"manifest": paths.manifest, "quarantine": paths.quarantine, "dataset": paths.dataset,
             "taxonomy": paths.root / TAXONOMY_FILE}  # fmt: skip
    return {k: file_digest(f, "sha256") if f.is_file() else None for k, f in files.items()}


def _stored(paths: DataPaths, store: StoreListing | None) -> bool:
    """Whether every image the manifest names is in the content store (one listing per store folder)."""
    import pandas as pd

    from components.data.ingest_cache import StoreListing

    store = store or StoreListing(paths.root)
    return all(store.has(r) for r in pd.read_parquet(paths.manifest, columns=["path"])["path"].tolist())


def unchanged_summary(
    paths: DataPaths, key: str | None, store: StoreListing | None = None
) -> dict[str, Any] | None:
    """The summary the last ingest recorded, when its stamp's key is ``key`` and its outputs are intact;
    else None (ingest as usual). ``store``: the content store's listing, when the caller has one."""
    file = paths.root / STAMP_FILE
    if key is None or not file.is_file():
        return None
    try:
        stamp = json.loads(file.read_text())
        if stamp.get("layout") != LAYOUT or stamp.get("key") != key:
            return None
        if stamp.get("outputs") != _outputs(paths) or not _stored(paths, store):
            log.info("ingest stamp %s: the outputs changed since it was written; ingesting", file)
            return None
        return dict(stamp["summary"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # an optimisation only
        log.warning("ingest stamp %s ignored (%s)", file, e)
        return None


def save_stamp(paths: DataPaths, key: str | None, summary: dict[str, Any]) -> None:
    """Record ``key``, the outputs' digests and ``summary``; without a key, remove a stale stamp.
    A failure to write only costs the next ingest time."""
    file = paths.root / STAMP_FILE
    try:
        if key is None:
            file.unlink(missing_ok=True)
            return
        record = {"layout": LAYOUT, "key": key, "outputs": _outputs(paths), "summary": summary}
        with atomic_path(file) as tmp:
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    except OSError as e:
        log.warning("ingest stamp %s not written (%s): the next ingest lists the source", file, e)
