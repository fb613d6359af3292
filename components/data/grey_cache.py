"""The grey pixels ingest decoded, kept for the stages after it (issue 21: "ingest already has the pixels").

Ingest decodes every image to measure it; for small images (at most 64 x 64) it holds each one's
displayed grey pixels until the batch measurements. When every kept image is small, of one size and
8-bit (its grey is what PIL's ``convert("L")`` gives, the way :func:`model_input` reads it), ingest
saves them in ``<data dir>/grey_pixels.npz`` with their image ids. The audit's pixel features and a
grey model's decoded splits (training, evaluation, the embedding store) are then gathered from it
instead of decoding every file again: the same uint8 values (tested), 70k Fashion-MNIST images
decoded once instead of three times.

Like ``ingest_cache.parquet`` the file is an optimisation beside the data version, not part of it: a
reader takes only what it holds for the ids it asks for, at the size it needs, and decodes when the file
is missing, unreadable, of another layout or lacks an id. An incremental ingest carries the rows of
unchanged images over from the previous file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core.jsonio import atomic_path

log = logging.getLogger(__name__)

GREY_FILE = "grey_pixels.npz"
LAYOUT = 1
MAX_BYTES = 1 << 30
"""Not written above this many pixel bytes (1 GiB: 1.3M images of 28 x 28)."""
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
"""Modes whose grey image ingest computes as PIL's ``convert("L")`` does (16- and 32-bit ones are scaled)."""


@dataclass(frozen=True)
class GreyPixels:
    """(N, H, W) uint8 grey images and their image ids."""

    pixels: np.ndarray
    image_ids: np.ndarray
    """(N,) ``S64``: the hex sha256 of each image's bytes."""

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])

    def rows(self, image_ids: Sequence[str]) -> np.ndarray | None:
        """(len(image_ids), H, W) for these ids, or None when any of them is not held."""
        index = {bytes(k): i for i, k in enumerate(self.image_ids)}
        try:
            at = [index[i.encode()] for i in image_ids]
        except KeyError:
            return None
        return self.pixels[np.asarray(at, dtype=np.int64)]


def grey_file(data_dir: Path) -> Path:
    return Path(data_dir) / GREY_FILE


def load_grey_pixels(data_dir: Path) -> GreyPixels | None:
    """The saved grey pixels of ``data_dir``, or None (missing, unreadable, another layout)."""
    path = grey_file(data_dir)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["layout"]) != LAYOUT:
                return None
            pixels, ids = z["pixels"], z["image_ids"]
    except Exception as e:  # a cache: anything wrong with it means decoding instead
        log.info("ignoring %s: %s", path, e)
        return None
    if pixels.ndim != 3 or pixels.dtype != np.uint8 or len(ids) != len(pixels):
        return None
    return GreyPixels(pixels, ids)


def grey_rows(
    data_dir: Path | None, image_ids: Sequence[str], *, shape: tuple[int, int]
) -> np.ndarray | None:
    """(N, rows, cols) uint8 of ``image_ids`` from ``data_dir``'s saved grey pixels when they hold every
    one of them at exactly ``shape`` (rows, cols); else None (decode the files)."""
    held = load_grey_pixels(data_dir) if data_dir is not None and len(image_ids) else None
    if held is None or held.shape != tuple(shape):
        return None
    return held.rows(image_ids)


def save_grey_pixels(
    data_dir: Path,
    image_ids: Sequence[str],
    greys: Sequence[np.ndarray | None],
    modes: Sequence[str],
) -> bool:
    """Save the kept images' grey pixels (manifest order) when all are known, of one shape and 8-bit;
    a ``None`` (an image an incremental ingest did not decode) is taken from the previous file. Else
    remove a previous file, which would describe another data version. An ingest that decoded nothing
    new, of the images the file already holds, leaves it as it is. Returns whether the file holds them."""
    path = grey_file(data_dir)
    missing = [i for i, g in enumerate(greys) if g is None]
    previous = load_grey_pixels(data_dir) if missing else None
    carried = previous.rows([image_ids[i] for i in missing]) if previous is not None else None
    if (
        previous is not None
        and carried is not None
        and len(missing) == len(image_ids) == len(previous.pixels)
    ):
        return True  # nothing decoded anew and the file holds exactly these images (ids are unique): keep it
    shapes = {g.shape for g in greys if g is not None}
    if carried is not None and len(carried):
        shapes.add(carried.shape[1:])
    usable = (
        len(image_ids) > 0
        and (not missing or carried is not None)
        and len(shapes) == 1
        and set(modes) <= EIGHT_BIT_MODES
        and len(image_ids) * int(np.prod(next(iter(shapes)))) <= MAX_BYTES
    )
    if not usable:
        path.unlink(missing_ok=True)
        return False
    out = np.empty((len(image_ids), *next(iter(shapes))), dtype=np.uint8)
    for i, g in enumerate(greys):
        if g is not None:
            out[i] = g
    if missing:
        out[missing] = carried
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, layout=np.int64(LAYOUT), pixels=out, image_ids=np.asarray(image_ids, dtype="S64"))
    return True
