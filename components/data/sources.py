"""Data sources: list labelled raw images, and inspect image bytes.

A source spec is one of ``fashion-mnist``, ``imagefolder:<dir>``, ``csv:<file>`` or an image folder
in object storage, ``s3://bucket/prefix`` (any fsspec URL; ``imagefolder:s3://...`` says the same).
:func:`list_source` turns a spec into a :class:`SourceListing` (the classes the source declares
and one :class:`SourceItem` per raw image, in a stable order). Items read their bytes lazily, so
a large image folder is never held in memory at once. :func:`inspect_image` is the one place that
decides whether bytes are a usable image; every source goes through it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import logging
import operator
import os
import re
import struct
import threading
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from http.client import HTTPException
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from components.core.errors import ConfigError, DataError, DataUnavailableError
from components.data.image_stats import PixelSample, sample_pixels
from components.data.manifest import file_md5

logger = logging.getLogger(__name__)

SOURCE_FORMS = "'fashion-mnist', 'imagefolder:<dir>', 'csv:<file>' or 's3://bucket/prefix' (an image folder)"

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 of the official gz files (as in torchvision.datasets.FashionMNIST.resources).
FASHION_MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# official split -> (images file, labels file)
_FM_SPLITS: dict[str, tuple[str, str]] = {
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
DOWNLOAD_TIMEOUT_S = 60.0
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_HOW_TO_GET_FASHION_MNIST = (
    "To get the data: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs to "
    "/usr/share/datasets/fashion-mnist), or set ingest.fashion_mnist_dir to a folder holding the four "
    f"*-ubyte.gz files ({', '.join(FASHION_MNIST_FILES)}), or go online so they can be downloaded "
    f"from {FASHION_MNIST_URL}."
)


# --------------------------------------------------------------------------------------------
# Image inspection


class ImageInfo(NamedTuple):
    """A usable image: its decoded format (lower-case file extension), size and PIL mode (a named
    tuple: an incremental ingest builds one per unchanged image).

    ``width``/``height`` are as displayed, i.e. after the EXIF orientation tag (a JPEG stored
    sideways with orientation 6 reports the rotated size); the stored bytes are never changed.
    """

    format: str
    width: int
    height: int
    mode: str


@dataclass(frozen=True)
class Rejection:
    """Why bytes are not a usable image: a short ``key`` (for counts) and a human ``reason``."""

    key: str
    reason: str


_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size
    if "exif" not in im.info and im.format != "TIFF":  # no EXIF block: skip the (slow) parse
        return width, height
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        orientation = 1
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _size_rejection(width: int, height: int, *, max_pixels: int) -> Rejection | None:
    """Why an image of ``width`` x ``height`` cannot be kept (more than ``max_pixels``, or none), else None."""
    pixels = width * height
    if pixels > max_pixels:
        return Rejection(
            "too_many_pixels", f"too many pixels: {width}x{height} = {pixels} > max_pixels {max_pixels}"
        )
    if pixels == 0:
        return Rejection("undecodable", f"image has no pixels ({width}x{height})")
    return None


def _decode(data: bytes, *, max_pixels: int) -> tuple[ImageInfo, Image.Image] | Rejection:
    """Checks, in order: empty, identifiable by PIL, pixel count from the header (<= ``max_pixels``,
    before any pixel is decoded), full decode (``load()`` catches truncated/corrupt data)."""
    if not data:
        return Rejection("empty", "empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Rejection("undecodable", "not an image: PIL cannot identify the file format")
    except Image.DecompressionBombError as e:
        return Rejection("too_many_pixels", f"too many pixels: {e}")
    except Exception as e:  # malformed headers raise all sorts (SyntaxError, struct.error, ...)
        return Rejection("undecodable", f"cannot decode the image header: {type(e).__name__}: {e}")
    too_big_or_empty = _size_rejection(im.width, im.height, max_pixels=max_pixels)
    if too_big_or_empty is not None:
        return too_big_or_empty
    fmt = (im.format or "").lower()
    try:
        im.load()
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, ... on bad data
        return Rejection("truncated", f"truncated or corrupt image data: {type(e).__name__}: {e}")
    width, height = _oriented_size(im)
    return ImageInfo(format=fmt, width=width, height=height, mode=im.mode), im


def inspect_image(data: bytes, *, max_pixels: int) -> ImageInfo | Rejection:
    """Decide whether ``data`` is a usable image, decoding it fully.

    Checks, in order: empty, identifiable by PIL, pixel count from the header (<= ``max_pixels``,
    before any pixel is decoded), full decode (``load()`` catches truncated/corrupt data). PIL's
    own bomb guard still refuses images over ``2 * Image.MAX_IMAGE_PIXELS`` at open (reported as
    ``too_many_pixels`` too); it may warn (``DecompressionBombWarning``) above ``MAX_IMAGE_PIXELS``.
    """
    decoded = _decode(data, max_pixels=max_pixels)
    return decoded if isinstance(decoded, Rejection) else decoded[0]


def examine_image(data: bytes, *, max_pixels: int) -> tuple[ImageInfo, PixelSample] | Rejection:
    """:func:`inspect_image` plus the pixel sample the manifest's image properties come from.

    Every decodable mode is kept (CMYK, RGBA, palette, 16-bit, ...): the stored bytes are the
    original file, the mode is recorded, and validation's ``allowed_modes`` decides whether it may
    be trained on.
    """
    decoded = _decode(data, max_pixels=max_pixels)
    if isinstance(decoded, Rejection):
        return decoded
    info, im = decoded
    try:
        return info, sample_pixels(im)
    except Exception as e:  # an exotic mode PIL decodes but cannot convert to grey
        return Rejection("undecodable", f"cannot convert {info.mode} pixels to grey: {type(e).__name__}: {e}")


def examine_pixels(
    data: bytes, grey: np.ndarray, *, max_pixels: int
) -> tuple[ImageInfo, PixelSample] | Rejection:
    """:func:`examine_image` of ``data``, an 8-bit grey PNG the source encoded from ``grey`` (H, W) uint8,
    without decoding it: the PNG is lossless and carries no orientation, so its decode is ``grey`` in
    mode L (tested against :func:`examine_image` on real images). The empty and pixel-count checks
    still apply."""
    if not data:
        return Rejection("empty", "empty file (0 bytes)")
    height, width = grey.shape
    too_big_or_empty = _size_rejection(width, height, max_pixels=max_pixels)
    if too_big_or_empty is not None:
        return too_big_or_empty
    info = ImageInfo(format="png", width=int(width), height=int(height), mode="L")
    return info, sample_pixels(Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), mode="L"))


def _check_truncation_setting() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated images will not "
            "be detected and quarantined"
        )


# --------------------------------------------------------------------------------------------
# Items and listings


@dataclass(frozen=True, slots=True)  # slots: a listing builds one per file, a quarter cheaper
class SourceItem:
    """One raw labelled image as the source lists it.

    ``read()`` returns the original bytes (it raises ``FileNotFoundError``/``OSError`` for a file
    that is gone or unreadable). ``label`` is empty when the source gives none. ``official_split``
    is the split the source itself defines (Fashion-MNIST's train/test), else None.
    """

    source_path: str
    label: str
    labels: tuple[str, ...]
    read: Callable[[], bytes]
    official_split: str | None = None
    problem: Rejection | None = None
    """Set when the source already knows the item is unusable (no label, outside class folders)."""
    label_path: str = ""
    """The label as a path in a label tree (``footwear/Sneaker``; nested class folders, a CSV
    ``label_path`` column); empty for flat labels."""
    fingerprint: str = ""
    """A cheap identity of the bytes ``read()`` returns, known without reading them (a file's path,
    size, mtime and inode; Fashion-MNIST's IDX file identity and index): equal fingerprints mean equal
    bytes, so an incremental ingest reuses what it measured last time. Empty: always read."""
    pixels: Callable[[], np.ndarray] | None = None
    """The (H, W) uint8 grey pixels ``read()``'s bytes decode to (an 8-bit grey PNG, mode L), where the
    source has them already (Fashion-MNIST's IDX arrays): examination then measures them instead of
    decoding the bytes it just encoded (:func:`examine_pixels`). None: decode the bytes."""


@dataclass(frozen=True)
class SourceListing:
    """``classes``: the class names the source itself declares, in index order."""

    spec: str
    kind: str
    classes: tuple[str, ...]
    items: list[SourceItem]


def parse_source(spec: str) -> tuple[str, str]:
    """``"imagefolder:/x"`` -> ``("imagefolder", "/x")``; raises ConfigError for an unknown form."""
    if spec == "fashion-mnist":
        return "fashion-mnist", ""
    if is_object_uri(spec):
        return "imagefolder", spec.rstrip("/")
    kind, sep, arg = spec.partition(":")
    arg = arg.strip()
    if sep and kind == "csv" and is_object_uri(arg):
        raise ConfigError(
            f"data source {spec!r}: a CSV source must be a local file; for object storage give the image "
            "folder itself, e.g. ingest.source=s3://bucket/prefix (one sub-folder per class)"
        )
    if sep and kind == "imagefolder" and is_object_uri(arg):
        return kind, arg.rstrip("/")
    if sep and kind in ("imagefolder", "csv") and arg:
        return kind, str(Path(arg).expanduser())
    raise ConfigError(f"unknown data source {spec!r}: ingest.source must be {SOURCE_FORMS}")


def cap_per_class(items: Iterable[SourceItem], max_per_class: int | None) -> list[SourceItem]:
    """Keep the first ``max_per_class`` items per (official split, label), in listing order."""
    if max_per_class is None:
        return list(items)
    seen: Counter[tuple[str | None, str]] = Counter()
    kept = []
    for item in items:
        key = (item.official_split, item.label)
        if item.label and seen[key] >= max_per_class:
            continue
        seen[key] += 1
        kept.append(item)
    return kept


def list_source(
    spec: str,
    *,
    max_per_class: int | None = None,
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist"),
    download: bool = True,
    cache_dir: Path | None = None,
    allow_outside_root: bool = False,
    nested: bool = False,
) -> SourceListing:
    """List a source's items (capped per class by ``max_per_class``) and its declared classes.

    ``nested``: in an image folder the deepest folder holding a file is its class and the folders
    above it its ancestors (``footwear/Sneaker/x.png``: class Sneaker, label path footwear/Sneaker)."""
    kind, arg = parse_source(spec)
    _check_truncation_setting()
    if kind == "fashion-mnist":
        paths = fashion_mnist_paths(fashion_mnist_dir, download=download, cache_dir=cache_dir)
        classes, items = FASHION_MNIST_CLASSES, list(fashion_mnist_items(paths, max_per_class=max_per_class))
    elif kind == "imagefolder" and is_object_uri(arg):
        classes, items = object_folder_items(arg)
        items = cap_per_class(items, max_per_class)
    elif kind == "imagefolder" and nested:
        classes, items = nested_folder_items(Path(arg), allow_outside_root=allow_outside_root)
        items = cap_per_class(items, max_per_class)
    elif kind == "imagefolder":
        classes, items = imagefolder_items(Path(arg), allow_outside_root=allow_outside_root)
        items = cap_per_class(items, max_per_class)
    else:
        classes, items = csv_items(Path(arg), allow_outside_root=allow_outside_root)
        items = cap_per_class(items, max_per_class)
    return SourceListing(spec=spec, kind=kind, classes=classes, items=items)


def _file_reader(path: Path | str) -> Callable[[], bytes]:
    return functools.partial(_read_bytes, path)


def _read_bytes(path: Path | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def stat_fingerprint(path: Path) -> str:
    """``path|size|mtime_ns|inode`` of a file (what make and rsync trust); '' when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return _fingerprint(os.path.abspath(path), st)


def _fingerprint(absolute: str, st: os.stat_result) -> str:
    return f"{absolute}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _missing_reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        raise FileNotFoundError(str(path))

    return read


# --------------------------------------------------------------------------------------------
# imagefolder:<dir>


def _inside(path: Path, root_real: Path) -> bool:
    """Whether ``path``, symlinks and ``..`` resolved, lies under ``root_real`` (itself resolved)."""
    return Path(os.path.realpath(path)).is_relative_to(root_real)


def _outside_root(path: Path, root_real: Path, *, what: str) -> Rejection:
    target = os.path.realpath(path)
    return Rejection(
        "outside_root",
        f"{what} leads outside the source root {root_real} (to {target}): not read; "
        "move the file under the root, or set ingest.allow_outside_root=true to follow such links",
    )


def _walk_files(
    folder: Path, root_real: Path, *, allow_outside_root: bool
) -> Iterator[tuple[str, Rejection | None, os.stat_result | None]]:
    """Paths of the regular, non-hidden files under ``folder``, recursively, in sorted (stable) order, each with
    its ``stat`` (symlinks followed; None when it cannot be stat'ed or the file is rejected).

    Directory symlinks are followed once each (a link loop is not walked twice). A file or
    directory symlink that leads outside ``root_real`` is yielded with a problem (the directory
    itself, not walked) unless ``allow_outside_root``. ``os.scandir``: the directory listing gives
    each entry's type, and its stat is one call (an incremental ingest's listing is most of its work).
    """
    seen_dirs: set[str] = set()

    def walk(dirpath: str) -> Iterator[tuple[str, Rejection | None, os.stat_result | None]]:
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen_dirs:
            return
        seen_dirs.add(real_dir)
        try:
            with os.scandir(dirpath) as listing:
                entries = [e for e in listing if e.name[:1] != "."]
        except OSError:  # as os.walk: an unreadable directory is skipped
            return
        entries.sort(key=_entry_name)
        subdirs: list[os.DirEntry[str]] = []
        files: list[os.DirEntry[str]] = []
        for entry in entries:
            (subdirs if _is_dir(entry) else files).append(entry)
        keep = []
        for d in subdirs:
            sub = Path(d.path)
            if not allow_outside_root and not _inside(sub, root_real):
                yield d.path, _outside_root(sub, root_real, what="directory symlink"), None
            else:
                keep.append(d.path)
        for entry in files:
            # Only a symlink can lead elsewhere: ``real_dir`` itself was checked when it was entered.
            if not allow_outside_root and entry.is_symlink() and not _inside(Path(entry.path), root_real):
                yield entry.path, _outside_root(Path(entry.path), root_real, what="symlink"), None
                continue
            try:
                st: os.stat_result | None = entry.stat()
            except OSError:
                st = None
            yield entry.path, None, st
        for sub_path in keep:
            yield from walk(sub_path)

    yield from walk(str(folder))


_entry_name = operator.attrgetter("name")


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks, as os.walk(followlinks=True)
    except OSError:
        return False


def imagefolder_items(
    root: Path, *, allow_outside_root: bool = False
) -> tuple[tuple[str, ...], list[SourceItem]]:
    """One sub-folder per class; classes are the sorted sub-folder names.

    Every non-hidden file under a class folder is an item (a non-image is quarantined later, not
    silently skipped); a file directly in ``root``, or a symlink leading outside ``root``, is
    listed with a problem. ``source_path`` is the path relative to ``root``. An empty class
    folder still declares its class (validation then reports it as missing).
    """
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory: check ingest.source")
    root = Path(os.path.abspath(root))  # walked paths are then absolute: the fingerprints' form
    root_real = Path(os.path.realpath(root))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"image folder {root} has no class sub-folders: put each class's images in <dir>/<class name>/"
        )
    items: list[SourceItem] = []
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        problem = Rejection("no_label", "file is outside the class sub-folders, so it has no label")
        items.append(SourceItem(path.name, "", (), _file_reader(path), problem=problem))
    for class_dir in class_dirs:
        label = class_dir.name
        if not allow_outside_root and not _inside(class_dir, root_real):
            outside = _outside_root(class_dir, root_real, what="class folder symlink")
            items.append(SourceItem(label, label, (label,), _missing_reader(class_dir), problem=outside))
            continue
        prefix = len(str(root)) + 1  # walked paths start with root's text: cheaper than relative_to
        labels, sep = (label,), os.sep
        for walked, found, st in _walk_files(class_dir, root_real, allow_outside_root=allow_outside_root):
            rel = walked[prefix:] if sep == "/" else walked[prefix:].replace(sep, "/")
            stamp = _fingerprint(walked, st) if found is None and st is not None else ""
            items.append(
                SourceItem(rel, label, labels, _file_reader(walked), problem=found, fingerprint=stamp)
            )
    return tuple(d.name for d in class_dirs), items


def nested_folder_items(
    root: Path, *, allow_outside_root: bool = False
) -> tuple[tuple[str, ...], list[SourceItem]]:
    """Nested class folders (a label tree): each file's class is its own folder's name, its label
    path the folders from ``root`` down (``footwear/Sneaker``). Classes: the sorted leaf names (a leaf
    reached by two paths is then named by the tree's validation). Files as in :func:`imagefolder_items`."""
    _, flat = imagefolder_items(root, allow_outside_root=allow_outside_root)
    items: list[SourceItem] = []
    for item in flat:
        parent = Path(item.source_path).parent.as_posix()
        if item.problem is not None or parent in ("", "."):
            items.append(item)
            continue
        leaf = Path(parent).name
        items.append(replace(item, label=leaf, labels=(leaf,), label_path=parent))
    classes = sorted({item.label for item in items if item.problem is None and item.label_path})
    return tuple(classes), items


# --------------------------------------------------------------------------------------------
# s3://bucket/prefix (an image folder in object storage, any fsspec URL)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
OBJECT_STORE_TIMEOUTS: dict[str, Any] = {
    "connect_timeout": 10,
    "read_timeout": 60,
    "retries": {"max_attempts": 3, "mode": "standard"},
}
"""botocore settings for ``s3://`` sources unless fsspec's config says otherwise: botocore's own
defaults (60 s to connect, 5 legacy retries with back-off) make an unreachable endpoint look like a
hang of several minutes."""


def is_object_uri(arg: str) -> bool:
    """``s3://bucket/prefix`` and other fsspec URLs (``gs://``, ``memory://``, ...), not local paths."""
    return bool(_URI.match(arg))


def _object_filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem and root path of ``uri``. Endpoint and credentials come from where the
    filesystem's library looks (for S3: the standard ``AWS_*`` variables, ``~/.aws``, fsspec's config)."""
    import fsspec
    from fsspec.core import url_to_fs

    protocol = uri.split("://", 1)[0].lower()
    # A new instance per listing: fsspec's instance cache keys on the arguments only, so a long-lived
    # process would otherwise keep the endpoint and credentials of its first listing.
    options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        configured = fsspec.config.conf.get("s3", {}).get("config_kwargs", {})
        options["config_kwargs"] = {**OBJECT_STORE_TIMEOUTS, **configured}
    try:
        fs, root = url_to_fs(uri, **options)
    except (ImportError, ValueError) as e:  # unknown protocol, or its driver is not installed
        raise ConfigError(f"cannot open the data source {uri}: {e}") from e
    return fs, str(root).rstrip("/")


def _list_objects(fs: Any, root: str, uri: str) -> dict[str, dict[str, Any]]:
    """Every object and inferred folder under ``root`` (path -> info); a DataError saying why when
    the listing fails (missing bucket, access denied, unreachable endpoint)."""
    where = "check the bucket and prefix, the endpoint (AWS_ENDPOINT_URL) and the credentials"
    try:
        fs.invalidate_cache(root)  # fsspec caches listings per process: list what is there now
        found: dict[str, dict[str, Any]] = fs.find(root, withdirs=True, detail=True)
    except FileNotFoundError as e:
        raise DataError(f"object-store folder {uri} does not exist ({e}): {where}") from e
    except PermissionError as e:
        raise DataError(f"access denied listing {uri} ({e}): {where}") from e
    except Exception as e:  # botocore/aiohttp raise their own types (endpoint, credentials, timeouts)
        raise DataError(f"cannot list {uri}: {type(e).__name__}: {e}: {where}") from e
    if not found:
        raise DataError(f"object-store folder {uri} holds no objects: {where}")
    return found


def _object_reader(fs: Any, path: str) -> Callable[[], bytes]:
    """Reads one object; ``FileNotFoundError`` when it is gone, ``OSError`` for anything else (denied,
    unreachable), so ingest quarantines the item with the reason instead of stopping."""

    def read() -> bytes:
        try:
            return bytes(fs.cat_file(path))
        except OSError:
            raise
        except Exception as e:  # errors s3fs does not translate into OSError
            raise OSError(f"{type(e).__name__}: {e}") from e

    return read


def object_folder_items(uri: str) -> tuple[tuple[str, ...], list[SourceItem]]:
    """:func:`imagefolder_items` for a folder in object storage: one sub-folder (key prefix) per class.

    Objects are listed once, up front; each item reads its object when ingest examines it, so an
    object deleted or denied after the listing becomes a quarantine record (``not_found`` /
    ``unreadable``), not a failed run. Hidden names (``.x``) and folder markers are skipped.
    """
    fs, root = _object_filesystem(uri)
    classes: set[str] = set()
    items: list[SourceItem] = []
    for path, info in sorted(_list_objects(fs, root, uri).items()):
        rel = path.rstrip("/")[len(root) :].lstrip("/")
        parts = rel.split("/")
        if not rel or any(part.startswith(".") for part in parts):
            continue
        if info.get("type") == "directory" or path.endswith("/"):
            if len(parts) == 1:
                classes.add(parts[0])
            continue
        if len(parts) == 1:
            problem = Rejection("no_label", "object is outside the class sub-folders, so it has no label")
            items.append(SourceItem(rel, "", (), _object_reader(fs, path), problem=problem))
            continue
        classes.add(parts[0])
        items.append(SourceItem(rel, parts[0], (parts[0],), _object_reader(fs, path)))
    if not classes:
        raise DataError(
            f"object-store folder {uri} has no class sub-folders: put each class's images under "
            f"{uri}/<class name>/"
        )
    return tuple(sorted(classes)), items


# --------------------------------------------------------------------------------------------
# csv:<file>


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist: check ingest.source (csv:<file>)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in reader.fieldnames or []]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"CSV file {path} cannot be parsed ({e}): expected a UTF-8 CSV with a header") from e
    stripped = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]
    return header, stripped


def _row_labels(row: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """``label`` is primary; an optional ``labels`` column holds ``|``-separated labels."""
    many = tuple(x.strip() for x in row.get("labels", "").split("|") if x.strip())
    label = row.get("label", "") or (many[0] if many else "")
    if not many:
        many = (label,) if label else ()
    elif label not in many:
        many = (label, *many)
    return label, many


CSV_SPLITS: tuple[str, ...] = ("train", "val", "test")


def csv_items(path: Path, *, allow_outside_root: bool = False) -> tuple[tuple[str, ...], list[SourceItem]]:
    """Rows ``path,label`` (paths relative to the CSV's folder); classes: sorted distinct labels.

    Optional columns: ``label_path`` (the label as a path in a label tree, ``footwear/Sneaker``; its
    last part is the label), ``labels`` (``|``-separated label set, multi-label data) and ``split``
    (``train``/``val``/``test``: the dataset's own split, kept as is; empty: assigned by imgflow).

    The CSV's folder is the source root: a path that leads outside it (``..``, an absolute path
    elsewhere, a symlink) is listed with a problem unless ``allow_outside_root``.
    """
    header, rows = _read_csv_rows(path)
    if "path" not in header or not ({"label", "labels", "label_path"} & set(header)):
        raise DataError(
            f"CSV file {path} needs the columns 'path' and 'label' (found: {', '.join(header) or 'none'})"
        )
    base = path.parent
    root_real = Path(os.path.realpath(base))
    items: list[SourceItem] = []
    for n, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
        rel = row.get("path", "")
        label, labels = _row_labels(row)
        label_path = row.get("label_path", "").strip("/ ")
        if label_path and not label:  # the label path's last part is the class
            label = label_path.rsplit("/", 1)[-1].strip()
            labels = (label,)
        if not rel:
            empty_path = Rejection("missing_path", f"CSV line {n} has an empty path")
            items.append(SourceItem(f"<line {n}>", label, labels, _missing_reader(base), problem=empty_path))
            continue
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        problem = None if label else Rejection("missing_label", f"CSV line {n} has an empty label")
        split = row.get("split", "").lower() or None
        if split is not None and split not in CSV_SPLITS:
            problem = Rejection("bad_split", f"CSV line {n} has split {row['split']!r}: expected one of "
                                f"{', '.join(CSV_SPLITS)} or empty (assigned by imgflow)")  # fmt: skip
        if not allow_outside_root and not _inside(file, root_real):
            problem = _outside_root(file, root_real, what=f"CSV line {n} path {rel!r}")
        if label_path and label_path.rsplit("/", 1)[-1].strip() != label:
            problem = Rejection("bad_label_path", f"CSV line {n}: label_path {label_path!r} does not end "
                                f"in the label {label!r}")  # fmt: skip
        kept = SourceItem(rel, label, labels, _file_reader(file), official_split=split, problem=problem)
        stamp = stat_fingerprint(file) if problem is None else ""
        items.append(replace(kept, label_path=label_path, fingerprint=stamp))
    classes = tuple(sorted({lab for item in items if item.problem is None for lab in item.labels}))
    return classes, items


# --------------------------------------------------------------------------------------------
# fashion-mnist


def download_file(url: str, dest: Path, *, md5: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` (atomically), verifying its md5; DataUnavailableError if not."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, HTTPException, OSError, TimeoutError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise DataUnavailableError(
            f"Fashion-MNIST is not in the configured folder and downloading {url} failed ({e}). "
            + _HOW_TO_GET_FASHION_MNIST
        ) from e
    if h.hexdigest() != md5:
        tmp.unlink(missing_ok=True)
        raise DataUnavailableError(
            f"downloaded {url} has md5 {h.hexdigest()}, expected {md5} (corrupt or changed download). "
            + _HOW_TO_GET_FASHION_MNIST
        )
    tmp.replace(dest)
    return dest


def fashion_mnist_paths(
    folder: Path, *, download: bool = True, cache_dir: Path | None = None
) -> dict[str, Path]:
    """file name -> path of the four idx files: from ``folder``, else the cache, else downloaded.

    Downloaded (and cached) files are md5-checked against the official checksums; files in
    ``folder`` are not (distributions may re-compress them), only their structure is checked.
    """
    found: dict[str, Path] = {}
    for name, md5 in FASHION_MNIST_FILES.items():
        local = Path(folder) / name
        cached = cache_dir / name if cache_dir is not None else None
        if local.is_file():
            found[name] = local
        elif cached is not None and cached.is_file() and file_md5(cached) == md5:
            found[name] = cached
        elif download and cached is not None:
            logger.info("downloading %s%s to %s", FASHION_MNIST_URL, name, cached)
            found[name] = download_file(FASHION_MNIST_URL + name, cached, md5=md5)
        else:
            why = "download is off (ingest.download=false)" if not download else "no download folder given"
            raise DataUnavailableError(
                f"Fashion-MNIST file {local} not found and {why}. " + _HOW_TO_GET_FASHION_MNIST
            )
    return found


def read_idx(path: Path, *, expect_magic: int) -> np.ndarray:
    """Parse a gz idx file (big-endian header: magic, dims) into a uint8 array, shape (N, ...)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(
            f"{path} is not a readable gzip idx file ({e}): replace it with the official file"
        ) from e
    ndim = expect_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != expect_magic:
        raise DataError(
            f"{path} is not an idx file with magic {expect_magic} (got {int.from_bytes(raw[:4], 'big')}): "
            "replace it with the official Fashion-MNIST file"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(
            f"{path}: header says shape {shape} ({header + int(np.prod(shape))} bytes) but the file has "
            f"{len(raw)} bytes: the file is truncated or corrupt; replace it with the official file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(paths: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official split -> (images (N, 28, 28) uint8, labels (N,) uint8 in 0..9)."""
    out = {}
    for split, (img_name, lab_name) in _FM_SPLITS.items():
        labels = _fashion_mnist_labels(paths, lab_name)
        out[split] = (_LazyIdxImages(paths[img_name], count=len(labels), label_file=lab_name).array, labels)
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes (8-bit grey, mode L).

    Written directly (filter 0 on every row, zlib level 6, no metadata), so the bytes depend only
    on the pixels and zlib, not on the Pillow version; 5x faster than ``Image.save`` at 28x28.
    """
    height, width = pixels.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # a leading 0 per row: filter type None
    rows[:, 1:] = pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, greyscale, no interlace
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def _encode_idx_image(images: _LazyIdxImages, index: int) -> bytes:
    return encode_png(images[index])


class _LazyIdxImages:
    """An IDX image file decompressed on first use (once, thread-safe): a no-op ingest, whose items all
    come from the ingest cache, never reads the pixels (55 MB of gzip for Fashion-MNIST, ~0.3 s); the
    labels, which the listing needs, are read at once. The checks :func:`load_fashion_mnist` makes run
    at that first use: a corrupt or mismatched file is a DataError then."""

    def __init__(self, path: Path, *, count: int, label_file: str) -> None:
        self._path, self._count, self._label_file = path, count, label_file
        self._lock = threading.Lock()
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        """(N, H, W) uint8, read and checked against the label count on first access."""
        if self._array is None:
            with self._lock:
                if self._array is None:
                    images = read_idx(self._path, expect_magic=_IDX_IMAGES_MAGIC)
                    if len(images) != self._count:
                        raise DataError(f"{self._path.name} has {len(images)} images but {self._label_file} "
                                        f"has {self._count} labels")  # fmt: skip
                    self._array = images
        return self._array

    def __getitem__(self, index: int) -> np.ndarray:
        return self.array[index]


def _fashion_mnist_labels(paths: dict[str, Path], lab_name: str) -> np.ndarray:
    labels = read_idx(paths[lab_name], expect_magic=_IDX_LABELS_MAGIC)
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{lab_name} holds label {int(labels.max())}; Fashion-MNIST labels are 0..9")
    return labels


def fashion_mnist_items(paths: dict[str, Path], *, max_per_class: int | None = None) -> Iterator[SourceItem]:
    """The official test set first, then train (so a byte-identical pair keeps its test copy).

    70k items are listed on every run, a no-op's included: the class names and label tuples are looked up
    once per class, each item's reader is a partial over the split's images, and those are decompressed
    only when an item is read (:class:`_LazyIdxImages`)."""
    names = list(FASHION_MNIST_CLASSES)
    singles = [(name,) for name in names]
    for split, (img_name, lab_name) in _FM_SPLITS.items():
        labels = _fashion_mnist_labels(paths, lab_name)
        images = _LazyIdxImages(paths[img_name], count=len(labels), label_file=lab_name)
        stamp = stat_fingerprint(paths[img_name])  # the IDX image file, + the index below
        split_items = (
            SourceItem(
                source_path=f"idx:{split}:{i}",
                label=names[y],
                labels=singles[y],
                read=functools.partial(_encode_idx_image, images, i),
                official_split=split,
                fingerprint=f"{stamp}|{i}" if stamp else "",
                pixels=functools.partial(images.__getitem__, i),
            )
            for i, y in enumerate(labels.tolist())
        )
        yield from cap_per_class(split_items, max_per_class)
