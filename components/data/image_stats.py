"""Per-image properties computed once, at ingestion, from the decoded pixels.

:func:`sample_pixels` reduces one decoded PIL image to what validation and the audit need
(channels, bit depth, the grey pixels of a small image, a 32x32 grey thumbnail); after all images
are read, :func:`measure` computes mean brightness, RMS contrast and a blur score (variance of the
Laplacian) and :func:`phash_hex` the perceptual hashes, both batched (numpy's per-call overhead
would otherwise dominate on 28x28 images). The hash is bit-for-bit ``imagehash.phash`` of the
displayed grey image (tested against the library).

Modes: every PIL mode is measured on a grey version scaled to 0..255 — 16-bit (``I;16``, ``I``)
images are divided by 257 rather than clipped, palette and CMYK go through PIL's conversion, alpha
is ignored. EXIF-rotated images are measured as displayed (orientation applied), so a rotated
copy of a photo hashes like the upright one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

PHASH_SIZE = 8
"""Hash side: 8x8 = 64 bits."""
_PHASH_IMG = PHASH_SIZE * 4  # imagehash's highfreq_factor=4: hashes a 32x32 grey image
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I;16S"})

STAT_COLUMNS: tuple[str, ...] = (
    "decode_ok",
    "aspect",
    "channels",
    "bit_depth",
    "brightness",
    "contrast",
    "blur",
    "phash",
)
"""The manifest columns this module fills, in manifest order."""


_BATCH_MAX_PIXELS = 64 * 64
"""Images up to this size keep their grey pixels until :func:`measure` does them all at once
(numpy's per-call overhead dominates at 28x28); larger ones are measured right away."""


class PixelSample(NamedTuple):
    """What ingestion keeps of one decoded image until the batch measurements are done (a named tuple:
    an incremental ingest builds one per unchanged image).

    ``grey`` (H, W) uint8 is the displayed grey image, kept only for small images (else None and
    ``measured`` holds ``(brightness, contrast, blur)``); ``thumb`` (32, 32) uint8 is the grey image
    resized as ``imagehash.phash`` resizes it (None when ``phash`` is already known).
    """

    channels: int
    bit_depth: int
    thumb: np.ndarray | None
    grey: np.ndarray | None = None
    measured: tuple[float, float, float] | None = None
    phash: str | None = None
    """Known already (an incremental ingest's reused row; ``thumb`` is then None)."""


def bit_depth(mode: str) -> int:
    """Bits per channel of a PIL mode (``1`` -> 1, ``I;16`` -> 16, ``I``/``F`` -> 32, else 8)."""
    if mode == "1":
        return 1
    if mode in _SIXTEEN_BIT:
        return 16
    if mode in ("I", "F"):
        return 32
    return 8


def displayed(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: EXIF orientation applied (a no-op for most files)."""
    if "exif" not in im.info and im.format != "TIFF":  # no EXIF block: skip the (slow) parse
        return im
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return im
    return ImageOps.exif_transpose(im) if orientation not in (None, 1) else im


def model_input(im: Image.Image, mode: str) -> Image.Image:
    """An image file as every model sees it — in training, evaluation, the embedding store and serving:
    as displayed (EXIF orientation applied, like ingest's sizes and the audit's pixels), in ``mode``.
    A phone photo stored sideways with an orientation tag is learnt and served upright, the way its
    labeller saw it."""
    return displayed(im).convert(mode)


def grey_pixels(im: Image.Image) -> np.ndarray:
    """(H, W) float64 grey values on a 0..255 scale, whatever the mode (16-bit scaled, not clipped)."""
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if arr.ndim == 3:
            arr = arr.mean(axis=2)
        top = float(arr.max()) if arr.size else 0.0
        # 16-bit data (or 32-bit holding 16-bit values, as some PNG decoders give) -> /257
        return np.clip(arr / 257.0 if top > 255 else arr, 0, 255)
    grey = im if im.mode == "L" else im.convert("L")
    return np.asarray(grey, dtype=np.float64)


def sample_pixels(im: Image.Image) -> PixelSample:
    """Reduce one fully decoded image (``im.load()`` done) to a :class:`PixelSample`."""
    im = displayed(im)
    grey = np.rint(grey_pixels(im)).astype(np.uint8) if im.mode != "L" else np.asarray(im)
    grey_im = im if im.mode == "L" else Image.fromarray(grey, mode="L")
    thumb = np.asarray(grey_im.resize((_PHASH_IMG, _PHASH_IMG), Image.Resampling.LANCZOS))
    channels, depth = len(im.getbands()), bit_depth(im.mode)
    if grey.size <= _BATCH_MAX_PIXELS:
        return PixelSample(channels, depth, thumb, grey=grey)
    b, c, lap = grey_measures(grey[None])
    return PixelSample(channels, depth, thumb, measured=(float(b[0]), float(c[0]), float(lap[0])))


def grey_measures(greys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """greys: (N, H, W) uint8 -> brightness (N,), contrast (N,) on 0..1, blur (N,) (see module doc)."""
    x = greys.astype(np.float32)
    flat = x.reshape(len(x), -1)
    brightness = flat.mean(axis=1) / 255.0
    contrast = flat.std(axis=1) / 255.0
    if x.shape[1] < 3 or x.shape[2] < 3:
        return brightness, contrast, np.zeros(len(x), dtype=np.float32)
    lap = x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4.0 * x[:, 1:-1, 1:-1]
    return brightness, contrast, lap.reshape(len(x), -1).var(axis=1)


def measure(samples: Sequence[PixelSample]) -> np.ndarray:
    """(N, 3) float64: brightness, contrast, blur per sample; small images measured in batches of
    equal shape."""
    out = np.zeros((len(samples), 3), dtype=np.float64)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        if s.measured is not None:
            out[i] = s.measured
        elif s.grey is not None:
            by_shape.setdefault(s.grey.shape, []).append(i)
    for rows in by_shape.values():
        for start in range(0, len(rows), 8192):  # bounded float32 temporaries
            chunk = rows[start : start + 8192]
            stack = np.stack([samples[i].grey for i in chunk])  # type: ignore[misc]
            out[chunk] = np.stack(grey_measures(stack), axis=1)
    return out


def _dct_rows(side: int) -> np.ndarray:
    """(PHASH_SIZE, side) float64: the first rows of the unnormalised DCT-II that ``scipy.fft.dct``
    computes (``y[k] = 2 * sum_n x[n] * cos(pi * k * (2n + 1) / (2 * side))``)."""
    n, k = np.arange(side), np.arange(PHASH_SIZE)[:, None]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * side))


_PHASH_CHUNK = 2048
"""Thumbnails per matrix product: bounded float64 temporaries (16 MB)."""


def phash_bits(thumbs: np.ndarray) -> np.ndarray:
    """thumbs: (N, 32, 32) uint8 -> (N, 64) bool, ``imagehash.phash``'s bits (row-major 8x8).

    Only the 8x8 low-frequency corner of the 2-D DCT is kept, so it is two small matrix products per
    chunk (``D @ x @ D.T``) instead of the full transforms: 70k thumbnails in ~0.2 s instead of ~11 s
    with ``scipy.fft.dct`` on 2 cores. The products agree with the FFT to ~1e-10; a thumbnail with a
    coefficient that close to its median (flat or synthetic images, where rounding decides the bit)
    is hashed by the FFT path, so the bits stay those of the reference."""
    if len(thumbs) == 0:
        return np.zeros((0, PHASH_SIZE * PHASH_SIZE), dtype=bool)
    rows, cols = _dct_rows(thumbs.shape[-2]), _dct_rows(thumbs.shape[-1])
    out = np.empty((len(thumbs), PHASH_SIZE * PHASH_SIZE), dtype=bool)
    for start in range(0, len(thumbs), _PHASH_CHUNK):
        part = thumbs[start : start + _PHASH_CHUNK]
        coeffs = (rows @ part.astype(np.float64) @ cols.T).reshape(len(part), -1)
        median = np.median(coeffs, axis=1, keepdims=True)
        bits = coeffs > median
        scale = np.abs(coeffs).max(axis=1, keepdims=True) + 1.0
        near = (np.abs(coeffs - median) <= 1e-9 * scale).any(axis=1)
        if near.any():
            bits[near] = _phash_bits_fft(part[near])
        out[start : start + len(part)] = bits
    return out


def _phash_bits_fft(thumbs: np.ndarray) -> np.ndarray:
    """The reference: the full 2-D DCT by ``scipy.fft.dct`` (as ``imagehash.phash``), its 8x8 corner."""
    from scipy.fft import dct

    coeffs = dct(dct(thumbs.astype(np.float64), axis=1), axis=2)[:, :PHASH_SIZE, :PHASH_SIZE]
    flat = coeffs.reshape(len(thumbs), -1)
    return flat > np.median(flat, axis=1, keepdims=True)


def bits_to_uint64(bits: np.ndarray) -> np.ndarray:
    """(N, 64) bool -> (N,) uint64, first bit most significant (``str(ImageHash)`` order)."""
    packed = np.packbits(bits.astype(np.uint8), axis=1)  # (N, 8) bytes, big-endian bit order
    return packed.view(">u8").ravel().astype(np.uint64)


def hex_to_uint64(hashes: Sequence[str]) -> np.ndarray:
    """16-hex-digit hashes -> (N,) uint64 (empty or null entries become 0)."""
    return np.array([int(h, 16) if isinstance(h, str) and h else 0 for h in hashes], dtype=np.uint64)


def phash_hex(thumbs: Sequence[np.ndarray]) -> list[str]:
    """One 16-hex-digit perceptual hash per 32x32 thumbnail (same text as ``str(imagehash.phash(im))``)."""
    if not len(thumbs):
        return []
    values = bits_to_uint64(phash_bits(np.stack(list(thumbs))))
    return [f"{int(v):016x}" for v in values]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise Hamming distance of two uint64 arrays (same shape)."""
    x = np.bitwise_xor(a.astype(np.uint64), b.astype(np.uint64))
    return np.bitwise_count(x).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Near-duplicate search on 64-bit hashes: multi-index hashing (no all-pairs loop)


def _chunks(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of ``max_distance + 1`` contiguous bit chunks covering 64 bits."""
    m = max_distance + 1
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    out, shift = [], 64
    for w in widths:
        shift -= w
        out.append((shift, w))
    return out


def near_duplicate_pairs(hashes: np.ndarray, *, max_distance: int) -> np.ndarray:
    """Every pair of hashes within ``max_distance`` bits: (P, 3) int64 rows ``(i, j, distance)``,
    ``i < j``, sorted.

    Multi-index hashing: split the 64 bits into ``max_distance + 1`` chunks; by the pigeonhole
    principle two hashes within ``max_distance`` agree exactly on at least one chunk, so only pairs
    sharing a chunk value are compared. Cost grows with the bucket sizes, not with n²: on 70k
    Fashion-MNIST hashes with max_distance 4 it compares a small fraction of all pairs.
    hashes: (N,) uint64.
    """
    if not 0 <= max_distance < 64:
        raise ValueError(f"max_distance={max_distance}: must be in [0, 63]")
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    found: list[np.ndarray] = []
    for shift, width in _chunks(max_distance):
        keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
        for group in np.split(order, bounds):
            if len(group) < 2:
                continue
            a, b = np.triu_indices(len(group), k=1)
            i, j = group[a], group[b]
            d = hamming(hashes[i], hashes[j])
            close = d <= max_distance
            lo, hi = np.minimum(i[close], j[close]), np.maximum(i[close], j[close])
            found.append(np.stack([lo, hi, d[close]], axis=1).astype(np.int64))
    if not found:
        return np.zeros((0, 3), dtype=np.int64)
    pairs = np.concatenate(found)
    _, first = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    return pairs[first]  # np.unique sorts by (i, j), since i * n + j orders that way


def duplicate_sets(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Connected groups (size >= 2) of the pair graph over ``n`` items, largest first."""
    if len(pairs) == 0:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    order = np.argsort(comp, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(comp[order])) + 1)
    return sorted((g for g in groups if len(g) >= 2), key=lambda g: (-len(g), int(g[0])))
