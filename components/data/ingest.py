"""Versioned ingestion: source -> content-addressed store + manifest + quarantine.

``ingest`` reads every item a source lists, keeps each usable, correctly labelled image exactly
once (byte-identical copies collapse to one row, so one image can never sit in two splits), stores
its original bytes under ``store/<sha[:2]>/<sha256>.<ext>``, assigns stratified splits and writes
``manifest.parquet``, ``quarantine.csv`` (every item not kept, with the reason) and
``dataset.json`` under the data directory. Same inputs and options give a byte-identical manifest,
hence the same :func:`components.data.manifest.data_version`.

Crash consistency: stored images appear only by rename, and the manifest, the quarantine list and
``dataset.json`` replace the previous three together (:func:`components.core.jsonio.atomic_group`),
so a ``kill -9`` at any point leaves the previous data version whole (or completes the new one on
the next run); the next run also deletes the temporary files a killed run left behind.
"""

from __future__ import annotations

import csv
import functools
import gc
import hashlib
import io
import logging
import os
import threading
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec, TypeVar

import pandas as pd
from PIL import Image

from components.core.errors import ConfigError, DataError
from components.core.jsonio import atomic_group, atomic_path, complete_commits, remove_stale_temps
from components.data.grey_cache import save_grey_pixels
from components.data.image_stats import PixelSample, measure, phash_hex
from components.data.ingest_cache import CachedImage, IngestCache, StoreListing, save_cache
from components.data.manifest import (
    QUARANTINE_COLUMNS,
    SPLITS,
    DataPaths,
    DatasetInfo,
    data_version,
    write_manifest,
)
from components.data.ingest_stamp import save_stamp, stamp_key, unchanged_summary
from components.data.pool import IMPORTED_SPLIT, imported_items, labels_file
from components.data.sources import (
    ImageInfo,
    Rejection,
    SourceItem,
    SourceListing,
    examine_image,
    examine_pixels,
    fashion_mnist_paths,
    list_source,
    parse_source,
    stat_fingerprint,
)
from components.task import detect_task, get_task
from components.task.taxonomy import TAXONOMY_FILE, Taxonomy

logger = logging.getLogger(__name__)

_CHUNK = 512  # items per thread-pool batch (and per progress-bar step)
# Threads, not processes: zlib, PIL's decoders and file I/O release the GIL, and most of the time
# on a fresh store is spent creating files. 4 beat 2 even on 2 cores (measured: 33 s vs 55 s for
# Fashion-MNIST); more add little because the Python parts still hold the GIL.
_WORKERS = 4


@dataclass(frozen=True)
class IngestSummary:
    """What one ingestion did. ``seen == ingested + quarantined`` always."""

    source: str
    seen: int
    ingested: int
    quarantined: int
    reasons: dict[str, int]
    """short reason key (``undecodable``, ``duplicate``, ``unknown_label``, ...) -> count."""
    classes: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    """split -> class -> number of images (every split and class present, zeros included)."""
    data_version: str
    manifest: str
    quarantine: str
    empty_classes: tuple[str, ...] = ()
    """Declared classes with no ingested image (e.g. an empty class folder): validation fails them."""
    task: str = "singlelabel"
    """``singlelabel`` or ``multilabel`` (declared by ingest.task, or detected from the label sets)."""
    task_detected: bool = False
    """True when ingest.task was ``auto`` and the task was read off the data."""
    images: dict[str, int] | None = None
    """split -> number of images (differs from the sum of ``counts`` for multi-label data)."""
    reused: int = 0
    """Items taken from the previous ingest's cache without reading them (incremental ingest)."""
    unchanged: bool = False
    """The source, the options and the outputs were as the last ingest left them: its summary, with
    nothing listed, read or written (:mod:`components.data.ingest_stamp`)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = list(self.classes)
        out["empty_classes"] = list(self.empty_classes)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IngestSummary:
        """The inverse of :meth:`to_dict`."""
        raw = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**{**raw, "classes": tuple(raw["classes"]), "empty_classes": tuple(raw["empty_classes"])})


class _Candidate(NamedTuple):
    """A usable image with a known label, before deduplication and split assignment (a named tuple:
    an incremental ingest builds one per unchanged image, and a tuple costs a fifth of a frozen
    dataclass)."""

    image_id: str
    path: str
    label: str
    labels: tuple[str, ...]
    info: ImageInfo
    size: int
    source_path: str
    official_split: str | None
    sample: PixelSample
    fingerprint: str = ""


@dataclass(frozen=True)
class _Rejected:
    """An item that goes to the quarantine, with a short key and a human reason."""

    source_path: str
    label: str
    key: str
    reason: str
    image_id: str = ""


class _Quarantine:
    """Rows for ``quarantine.csv`` plus counts per reason key."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.rows: list[dict[str, str]] = []
        self.reasons: Counter[str] = Counter()

    def add(self, r: _Rejected) -> None:
        row = {"source": self.source, "source_path": r.source_path, "label": r.label}
        self.rows.append({**row, "reason": r.reason, "image_id": r.image_id})
        self.reasons[r.key] += 1


# --------------------------------------------------------------------------------------------
# Store


class ContentStore:
    """``<data dir>/store/<sha[:2]>/<sha256>.<ext>``; an existing file is never rewritten.

    ``listing``: the store's folders as listed when the ingest began (under the project lock, so nothing
    else adds or deletes files meanwhile): whether a copy exists is a set lookup instead of one ``stat``
    per image (a tenth of a fresh 70k ingest's worker time on a sandboxed file system). None: ``stat``."""

    def __init__(self, paths: DataPaths, listing: StoreListing | None = None) -> None:
        # plain strings: pathlib costs more per call than hashing a 28x28 PNG
        self._root = str(paths.root)
        self._prefix = paths.store.relative_to(paths.root).as_posix()
        self._dirs: set[str] = set()
        self._listing = listing

    def put(self, image_id: str, ext: str, data: bytes) -> str:
        """Store ``data`` (atomically: tmp + rename); returns its path relative to the data dir."""
        folder = f"{self._prefix}/{image_id[:2]}"
        rel = f"{folder}/{image_id}.{ext}"
        if folder not in self._dirs:
            os.makedirs(os.path.join(self._root, folder), exist_ok=True)
            self._dirs.add(folder)
        dest = os.path.join(self._root, rel)
        # a copy written earlier in this ingest (a repeated image) is absent from the listing: written
        # again, the same bytes under the same name
        exists = self._listing.has(rel) if self._listing is not None else os.path.exists(dest)
        if not exists:
            # unique per process and thread: two writers of the same new file never share a tmp
            tmp = os.path.join(self._root, folder, f".{image_id}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        return rel


# --------------------------------------------------------------------------------------------
# Pass 1: read, hash, label check, decode, store


def _read(item: SourceItem) -> bytes | _Rejected:
    try:
        return item.read()
    except FileNotFoundError:
        return _Rejected(item.source_path, item.label, "not_found", "file not found")
    except OSError as e:
        return _Rejected(item.source_path, item.label, "unreadable", f"cannot read the file: {e}")


def _unknown_label(item: SourceItem, declared: frozenset[str] | None, image_id: str) -> _Rejected | None:
    unknown = [lab for lab in item.labels if declared is not None and lab not in declared]
    if not unknown:
        return None
    reason = f"unknown label {unknown[0]!r}: not in the declared classes (ingest.classes)"
    same = [c for c in declared or () if c.casefold() == unknown[0].casefold()]
    if same:
        reason += f"; it differs only by case from the declared class {same[0]!r}"
    return _Rejected(item.source_path, item.label, "unknown_label", reason, image_id)


def _from_cache(item: SourceItem, hit: CachedImage) -> _Candidate:
    """The candidate an unchanged item gave last time, without reading it."""
    info = ImageInfo(hit.format, hit.width, hit.height, hit.mode)
    measured = (hit.brightness, hit.contrast, hit.blur)
    sample = PixelSample(hit.channels, hit.bit_depth, None, measured=measured, phash=hit.phash)
    return _Candidate(hit.image_id, hit.path, item.label, item.labels, info, hit.bytes, item.source_path,
                      item.official_split, sample, item.fingerprint)  # fmt: skip


def _examine(
    item: SourceItem, *, declared: frozenset[str] | None, max_pixels: int, store: ContentStore
) -> _Candidate | _Rejected:
    """One item -> a stored candidate, or why it is quarantined. Thread-safe."""
    if item.problem is not None:
        return _Rejected(item.source_path, item.label, item.problem.key, item.problem.reason)
    data = _read(item)
    if isinstance(data, _Rejected):
        return data
    image_id = hashlib.sha256(data).hexdigest()
    rejected = _unknown_label(item, declared, image_id)
    if rejected is not None:
        return rejected
    examined = (
        examine_image(data, max_pixels=max_pixels)
        if item.pixels is None
        else examine_pixels(data, item.pixels(), max_pixels=max_pixels)
    )
    if isinstance(examined, Rejection):
        return _Rejected(item.source_path, item.label, examined.key, examined.reason, image_id)
    info, sample = examined
    path = store.put(image_id, info.format or "bin", data)
    return _Candidate(
        image_id,
        path,
        item.label,
        item.labels,
        info,
        len(data),
        item.source_path,
        item.official_split,
        sample,
        item.fingerprint,
    )


@contextmanager
def _progress_bar(total: int, *, enabled: bool, description: str) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; a rich progress bar when enabled, else a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _examine_all(
    listing: SourceListing,
    *,
    declared: frozenset[str] | None,
    max_pixels: int,
    store: ContentStore,
    quarantine: _Quarantine,
    progress: bool,
    workers: int,
    cache: IngestCache | None = None,
) -> list[_Candidate]:
    """Examine every item (decoding, hashing and writing overlap in ``workers`` threads: zlib,
    PIL decoders and file I/O release the GIL); results are collected in listing order. An item whose
    fingerprint the ``cache`` holds (and whose stored copy exists) is not read: its bytes are what they
    were, so its measurements are taken from the cache, here in the calling thread."""
    candidates = []
    items = listing.items
    known: set[tuple[str, ...]] = set()  # label sets that passed the declared-classes check

    def examine(item: SourceItem) -> _Candidate | _Rejected:
        return _examine(item, declared=declared, max_pixels=max_pixels, store=store)

    def cached(item: SourceItem) -> CachedImage | None:
        return cache.get(item.fingerprint) if cache is not None and item.problem is None else None

    with (
        warnings.catch_warnings(),  # set here, in the calling thread: catch_warnings is not thread-safe
        _progress_bar(len(items), enabled=progress, description=f"ingest {listing.spec}") as advance,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        # a bomb is quarantined as too_many_pixels; PIL's warning about it is noise here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            hits = [cached(item) for item in chunk]
            fresh = pool.map(examine, [item for item, hit in zip(chunk, hits, strict=True) if hit is None])
            for item, hit in zip(chunk, hits, strict=True):
                if hit is None:
                    outcome = next(fresh)
                elif item.labels in known:  # a label set already checked: no per-item scan
                    outcome = _from_cache(item, hit)
                else:
                    outcome = _unknown_label(item, declared, hit.image_id) or _from_cache(item, hit)
                    if not isinstance(outcome, _Rejected):
                        known.add(item.labels)
                if isinstance(outcome, _Rejected):
                    quarantine.add(outcome)
                else:
                    candidates.append(outcome)
            advance(min(_CHUNK, len(items) - start))
            if not gc.isenabled():  # paused by ingest (_cyclic_gc_paused): the young generations only
                gc.collect(1)
    return candidates


# --------------------------------------------------------------------------------------------
# Pass 2: byte-identical copies


def deduplicate(candidates: Sequence[_Candidate], quarantine: _Quarantine) -> list[_Candidate]:
    """Keep one candidate per image_id (the first listed); quarantine the rest.

    Copies with the same labels are ``duplicate``s of the kept one; copies whose labels disagree
    are all quarantined as ``conflicting_labels`` (we cannot tell which label is right).
    """
    if len({c.image_id for c in candidates}) == len(candidates):
        return list(candidates)  # no two alike (the usual case): nothing to group
    groups: dict[str, list[_Candidate]] = defaultdict(list)
    for cand in candidates:
        groups[cand.image_id].append(cand)
    kept = []
    for image_id, group in groups.items():
        if len({frozenset(c.labels) for c in group}) > 1:
            where = "; ".join(f"{c.source_path} ({'|'.join(c.labels)})" for c in group)
            reason = f"conflicting labels: byte-identical copies are labelled differently: {where}"
            for c in group:
                quarantine.add(_Rejected(c.source_path, c.label, "conflicting_labels", reason, image_id))
            continue
        first = group[0]
        kept.append(first)
        for c in group[1:]:
            reason = f"duplicate: byte-identical to kept image {image_id} ({first.source_path})"
            quarantine.add(_Rejected(c.source_path, c.label, "duplicate", reason, image_id))
    return kept


# --------------------------------------------------------------------------------------------
# Splits, tables, files


def _splits_for(
    kept: Sequence[_Candidate], *, val_fraction: float, test_fraction: float, seed: int, task: str
) -> list[str]:
    """Official ``val``/``test`` splits (Fashion-MNIST's test set, a CSV's ``split`` column) are kept as
    they are; the other rows are assigned the splits the source does not define, stratified the task's
    way (:meth:`components.task.Task.assign_splits`: per class, or per label by iterative
    stratification)."""
    official = {c.official_split for c in kept}
    # imported labels (``imgflow label-import``) go to train and never shift the other images' splits
    out = ["train" if c.official_split in (None, IMPORTED_SPLIT) else c.official_split for c in kept]
    rest = [i for i, c in enumerate(kept) if c.official_split not in ("val", "test", IMPORTED_SPLIT)]
    fractions = {
        "val_fraction": 0.0 if "val" in official else val_fraction,
        "test_fraction": 0.0 if "test" in official else test_fraction,
    }
    ids = [kept[i].image_id for i in rest]
    assigned = get_task(task).assign_splits(ids, [kept[i].labels for i in rest], seed=seed, **fractions)
    for i, split in zip(rest, assigned, strict=True):
        out[i] = split
    return out


def resolve_task(
    task: str, candidates: Sequence[_Candidate], quarantine: _Quarantine
) -> tuple[str, list[_Candidate]]:
    """``auto``: multi-label when any image has several labels. A declared ``singlelabel`` task
    quarantines images with several labels (``multiple_labels``) rather than dropping labels."""
    resolved = detect_task([c.labels for c in candidates]) if task == "auto" else get_task(task)
    kept = []
    for c in candidates:
        if not resolved.accepts(c.labels):
            reason = (f"multiple labels ({'|'.join(c.labels)}) in a single-label task: set ingest.task: "
                      "multilabel (or auto) to keep label sets")  # fmt: skip
            quarantine.add(_Rejected(c.source_path, c.label, "multiple_labels", reason, c.image_id))
        else:
            kept.append(c)
    return resolved.name, kept


def _manifest_frame(kept: Sequence[_Candidate], splits: Sequence[str], source: str) -> pd.DataFrame:
    samples = [c.sample for c in kept]
    measured = measure(samples)  # (N, 3): brightness, contrast, blur
    fresh = iter(phash_hex([s.thumb for s in samples if s.phash is None and s.thumb is not None]))
    hashes = [s.phash if s.phash is not None else next(fresh) for s in samples]
    return pd.DataFrame(
        {
            "image_id": [c.image_id for c in kept],
            "path": [c.path for c in kept],
            "label": [c.label for c in kept],
            "labels": [list(c.labels) for c in kept],
            "width": [c.info.width for c in kept],
            "height": [c.info.height for c in kept],
            "mode": [c.info.mode for c in kept],
            "bytes": [c.size for c in kept],
            "split": list(splits),
            "source": [source] * len(kept),
            "source_path": [c.source_path for c in kept],
            "decode_ok": [True] * len(kept),  # undecodable files are quarantined, never in the manifest
            "aspect": [c.info.width / c.info.height for c in kept],
            "channels": [s.channels for s in samples],
            "bit_depth": [s.bit_depth for s in samples],
            "brightness": measured[:, 0],
            "contrast": measured[:, 1],
            "blur": measured[:, 2],
            "phash": hashes,
        }
    )


def _counts(
    kept: Sequence[_Candidate], splits: Sequence[str], classes: Sequence[str]
) -> dict[str, dict[str, int]]:
    """split -> class -> images carrying that label (a multi-label image counts once per label)."""
    tally = Counter((split, lab) for split, c in zip(splits, kept, strict=True) for lab in c.labels)
    return {split: {cls: tally[(split, cls)] for cls in classes} for split in SPLITS}


def write_quarantine(rows: Sequence[dict[str, str]], path: Path) -> None:
    """``quarantine.csv`` with the header :data:`QUARANTINE_COLUMNS`, even when empty (atomic)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(QUARANTINE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


COMMIT_JOURNAL = ".ingest.commit.json"


def _commit(paths: DataPaths, manifest: pd.DataFrame, quarantine_rows: Sequence[dict[str, str]],
            info: DatasetInfo, tree: Taxonomy | None = None) -> None:  # fmt: skip
    """Replace the manifest, the quarantine list and dataset.json (and the label tree) as one: a
    reader never pairs a new manifest with an old quarantine list or class list (``ingested +
    quarantined = seen`` holds for whatever it reads)."""
    targets = [paths.manifest, paths.quarantine, paths.dataset]
    tree_file = paths.root / TAXONOMY_FILE
    with atomic_group(targets + ([tree_file] if tree else []), journal=paths.root / COMMIT_JOURNAL) as temps:
        write_manifest(manifest, temps[0])
        write_quarantine(quarantine_rows, temps[1])
        info.save(temps[2])
        if tree is not None:
            tree.save(temps[3])
    if tree is None:
        tree_file.unlink(missing_ok=True)  # flat labels now: a previous version's tree no longer applies


def _recover(paths: DataPaths) -> StoreListing:
    """Finish a commit a killed ingest left half done; delete the temporary files of dead writers.
    Returns the content store's listing, read while looking for them (each store folder is listed
    once per ingest: 256 listings were a tenth of an incremental ingest's time)."""
    complete_commits(paths.root)
    removed = remove_stale_temps(paths.root)
    listed: dict[str, list[str]] = {}
    if paths.store.is_dir():
        prefix = paths.store.relative_to(paths.root).as_posix()
        with os.scandir(paths.store) as folders:
            for folder in folders:
                if not folder.is_dir():
                    continue
                names = os.listdir(folder.path)
                if any(name.startswith(".") for name in names):  # a temporary file (its name is hidden)
                    removed += remove_stale_temps(Path(folder.path))
                listed[f"{prefix}/{folder.name}"] = names  # a temporary name is never an image's name
    if removed:
        logger.info("removed %d temporary files left by an interrupted ingest", removed)
    return StoreListing(paths.root, listed)


def _check_label_case(class_names: Sequence[str], *, declared: bool) -> None:
    """Two classes whose names differ only by case are almost always one class typed twice."""
    by_fold: dict[str, list[str]] = defaultdict(list)
    for name in class_names:
        by_fold[name.casefold()].append(name)
    clashes = [names for names in by_fold.values() if len(names) > 1]
    if not clashes:
        return
    shown = "; ".join(" vs ".join(repr(n) for n in names) for names in clashes)
    if declared:
        raise ConfigError(f"ingest.classes has names that differ only by case ({shown}): keep one spelling")
    raise DataError(
        f"labels that differ only by case ({shown}): rename the folders / CSV labels to one spelling, or "
        "declare the classes (ingest.classes) so the other spelling is quarantined as unknown_label"
    )


def _check_options(
    *, val_fraction: float, test_fraction: float, max_per_class: int | None, max_pixels: int
) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"split.val_fraction={val_fraction} and split.test_fraction={test_fraction}: each must be in "
            "[0, 1) and their sum < 1 (something must be left to train on)"
        )
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError(f"ingest.max_per_class={max_per_class}: must be >= 1, or null for no limit")
    if max_pixels < 1:
        raise ConfigError(f"ingest.max_pixels={max_pixels}: must be >= 1")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _cyclic_gc_paused(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with Python's cyclic garbage collector paused (reference counting still frees what
    it drops). Ingest keeps a few objects per listed item until the manifest is written, and every
    gen-2 collection walked all of them again: pauses of up to 80 ms, 10-15% of an incremental ingest
    of 10k small files (measured). Ingest itself makes next to no cyclic garbage (~100 objects for a
    5k-image ingest); what a source's client may make while reading (an object store's HTTP stack) is
    freed by a collection of the young generations after each chunk of items (:func:`_examine_all`),
    which does not walk the long-lived records again. The collector is enabled again at the end."""

    @functools.wraps(fn)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


@_cyclic_gc_paused
def ingest(
    source: str,
    *,
    data_dir: Path,
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 42,
    max_per_class: int | None = None,
    max_pixels: int = 89_478_485,
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist"),
    download: bool = True,
    progress: bool = False,
    allow_outside_root: bool = False,
    task: str = "auto",
    taxonomy: str = "none",
    incremental: bool = True,
) -> IngestSummary:
    """Ingest ``source`` into ``data_dir``; see the module docstring for what is written.

    ``classes`` declares the class set (in index order); items with another label are
    quarantined as ``unknown_label``. Without it the classes are the source's own (Fashion-MNIST's
    10 names, the sorted sub-folder names, or the sorted CSV labels). ``max_per_class`` keeps the
    first N listed items per class and official split (quick runs). Raises ConfigError for a bad
    spec or option, DataError when the source cannot be read or yields no usable image (the
    quarantine is written first, so the reasons can be read).

    ``taxonomy`` (a label tree, saved as ``taxonomy.json`` and part of the data version): ``none``,
    ``paths`` (nested class folders or a CSV ``label_path`` column), ``fashion-mnist`` (the built-in
    tree) or a ``taxonomy.yaml`` of ``leaf: parent`` lines. A bad tree is a ConfigError naming the node,
    raised before anything is written.

    ``incremental``: items whose fingerprint (path, size, mtime, inode; the IDX file and index) the
    previous ingest into ``data_dir`` saw are not read again (:mod:`components.data.ingest_cache`);
    the manifest is the same as a full ingest's.
    """
    _check_options(
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_per_class=max_per_class,
        max_pixels=max_pixels,
    )
    if classes is not None and len(set(classes)) != len(classes):
        raise ConfigError(f"ingest.classes lists a class twice: {list(classes)}")
    if classes is not None:
        _check_label_case(classes, declared=True)
    paths = DataPaths(Path(data_dir))
    stored = _recover(paths)
    imported = imported_items(paths.root)  # labels given to pool images (imgflow label-import)
    options = dict(source=source, classes=classes, val_fraction=val_fraction, test_fraction=test_fraction,
                   seed=seed, max_per_class=max_per_class, max_pixels=max_pixels, task=task, taxonomy=taxonomy,
                   allow_outside_root=allow_outside_root, data_dir=str(paths.root.resolve()))  # fmt: skip
    key = _stamp_key(options, paths, imported, fashion_mnist_dir, download) if incremental else None
    recorded = unchanged_summary(paths, key, stored)
    if recorded is not None:
        summary = replace(IngestSummary.from_dict(recorded), reused=recorded["ingested"], unchanged=True)
        _log_summary(summary)
        return summary
    listing = list_source(
        source,
        max_per_class=max_per_class,
        fashion_mnist_dir=Path(fashion_mnist_dir),
        download=download,
        cache_dir=paths.root / ".downloads",
        allow_outside_root=allow_outside_root,
        nested=taxonomy == "paths",
    )
    if imported:
        listing = replace(listing, items=[*listing.items, *imported])
    class_names = tuple(classes) if classes is not None else listing.classes
    if classes is None:
        _check_label_case(class_names, declared=False)
    tree = build_taxonomy(taxonomy, listing, class_names)
    declared = frozenset(classes) if classes is not None else None
    quarantine = _Quarantine(source)
    store = ContentStore(paths, stored)
    cache = IngestCache.load(paths.root, stored) if incremental else None
    candidates = _examine_all(
        listing,
        declared=declared,
        max_pixels=max_pixels,
        store=store,
        quarantine=quarantine,
        progress=progress,
        workers=_WORKERS,
        cache=cache,
    )
    resolved_task, candidates = resolve_task(task, candidates, quarantine)
    kept = deduplicate(candidates, quarantine)
    if not kept:
        write_quarantine(quarantine.rows, paths.quarantine)  # the reasons, beside the previous manifest
        raise DataError(
            f"no usable image in {source}: all {len(listing.items)} items were quarantined "
            f"({dict(quarantine.reasons) or 'the source lists no files'}); see {paths.quarantine}"
        )
    splits = _splits_for(
        kept, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, task=resolved_task
    )
    counts = _counts(kept, splits, class_names)
    info = DatasetInfo(classes=class_names, task=resolved_task, source=source, counts=counts)
    frame = _manifest_frame(kept, splits, source)
    _commit(paths, frame, quarantine.rows, info, tree)
    save_grey_pixels(paths.root, [c.image_id for c in kept], [c.sample.grey for c in kept],
                     [c.info.mode for c in kept])  # fmt: skip
    save_cache(paths.root, [c.fingerprint for c in kept], frame, [c.info.format or "bin" for c in kept])
    summary = IngestSummary(
        source=source,
        seen=len(listing.items),
        ingested=len(kept),
        quarantined=len(quarantine.rows),
        reasons=dict(sorted(quarantine.reasons.items())),
        classes=class_names,
        counts=counts,
        data_version=data_version(paths.manifest),
        manifest=str(paths.manifest),
        quarantine=str(paths.quarantine),
        empty_classes=tuple(c for c in class_names if not any(counts[split][c] for split in SPLITS)),
        task=resolved_task,
        task_detected=task == "auto",
        images={split: splits.count(split) for split in SPLITS},
        reused=sum(1 for c in kept if c.sample.thumb is None),
    )
    save_stamp(paths, key, summary.to_dict())
    _log_summary(summary)
    return summary


def _stamp_key(options: dict[str, Any], paths: DataPaths, imported: Sequence[SourceItem],
               fashion_mnist_dir: Path, download: bool) -> str | None:  # fmt: skip
    """The whole-ingest stamp's key (:mod:`components.data.ingest_stamp`): for Fashion-MNIST, whose
    identity is its four IDX files; None (no short-circuit) for every other source."""
    if parse_source(options["source"])[0] != "fashion-mnist":
        return None
    files = fashion_mnist_paths(
        Path(fashion_mnist_dir), download=download, cache_dir=paths.root / ".downloads"
    )
    identities = [stat_fingerprint(f) for _, f in sorted(files.items())]
    labels = labels_file(paths.root)
    if labels.exists():
        identities += [stat_fingerprint(labels), *(item.fingerprint for item in imported)]
    tree = Path(str(options["taxonomy"])).expanduser()
    if options["taxonomy"] not in ("none", "", "paths", "fashion-mnist") and tree.is_file():
        identities.append(stat_fingerprint(tree))
    return stamp_key(options, identities)


def build_taxonomy(spec: str, listing: SourceListing, classes: Sequence[str]) -> Taxonomy | None:
    """The label tree ``ingest.taxonomy`` asks for over ``classes`` (validated), or None for ``none``."""
    if spec in ("none", ""):
        return None
    if spec == "paths":
        found = [i.label_path for i in listing.items if i.problem is None and i.label_path]
        if not found:
            raise ConfigError(
                f"ingest.taxonomy=paths but {listing.spec} gives no label paths: use nested class folders "
                "(imagefolder:<dir> with <dir>/<parent>/<class>/...) or a CSV 'label_path' column"
            )
        return Taxonomy.from_paths(found, classes)
    if spec == "fashion-mnist":
        return Taxonomy.fashion_mnist(classes)
    file = Path(spec).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"ingest.taxonomy={spec!r}: not none, paths or fashion-mnist, and no such taxonomy.yaml file"
        )
    return Taxonomy.from_yaml(file, classes)


def _log_summary(s: IngestSummary) -> None:
    if s.empty_classes:
        logger.warning("classes with no ingested image: %s", ", ".join(s.empty_classes))
    per_split = ", ".join(f"{split} {(s.images or {}).get(split, 0)}" for split in SPLITS)
    logger.info(
        "ingested %d of %d items from %s (%s task%s; %s; %d quarantined%s); data version %s%s",
        s.ingested,
        s.seen,
        s.source,
        s.task,
        " detected from the label sets" if s.task_detected else "",
        per_split,
        s.quarantined,
        f": {s.reasons}" if s.reasons else "",
        s.data_version,
        " (source, options and outputs as the last ingest left them: nothing listed or read)"
        if s.unchanged
        else "",
    )
