"""One forward pass per (data version, model, layer): embeddings cached on disk beside the data.

Every consumer of features (drift, OOD, the audit, few-shot classes) reads them from here, so a data
version is embedded once per model and layer, not once per consumer. Layout, under the data dir::

    embeddings/<data_version>/<model_hash>/<layer>.npy    (N, D) float32, rows in manifest order
    embeddings/<data_version>/<model_hash>/<layer>.json   ids, splits, layer, model name, shape

The entry of a data version outlives its manifest (it is no DVC output): after a re-ingest, the
previous version's embeddings under the champion are still there to compare against (drift).
Writes are atomic (the .npy through a temporary file and a rename, the sidecar through
``write_json``) and serialised by a file lock, so concurrent consumers compute an entry once and
never read half of one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from components.core.errors import DataError
from components.core.jsonio import write_json
from components.data.datasets import decoded_cache_dir, normalise
from components.data.image_stats import model_input
from components.data.manifest import DataPaths, data_version, read_manifest, require_manifest
from components.model.checkpoint import SPEC_FILE, WEIGHTS_FILE, ModelSpec, load_classifier
from components.model.features import DEFAULT_LAYER, check_layer, extract_features, extract_layers
from components.model.models import create_image_transform, image_mode

if TYPE_CHECKING:
    from components.core.config import Params

logger = logging.getLogger(__name__)

DECODED_MAX_GB = 4.0
"""The largest manifest :func:`embed_manifest` reads through the decoded-split cache by default (GiB of
uint8); :func:`embed_project` uses ``train.cache_max_gb``."""

STORE_DIR = "embeddings"


@dataclass(frozen=True)
class Embeddings:
    """The features of a data version's images under one model at one layer."""

    vectors: np.ndarray
    """(N, D) float32, one row per image, in the order of ``ids``."""
    ids: tuple[str, ...]
    """image_id (content hash) of each row."""
    splits: tuple[str, ...]
    """The split of each row (train / val / test)."""
    layer: str
    model_hash: str
    data_version: str

    def split(self, name: str) -> np.ndarray:
        """(n, D) rows of one split; a DataError when the data version has none."""
        mask = np.asarray(self.splits) == name
        if not mask.any():
            raise DataError(f"data version {self.data_version} has no {name!r} images to compare")
        return self.vectors[mask]

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), D) rows of the given image ids, in that order; a DataError naming a missing id."""
        index = {image_id: i for i, image_id in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise DataError(
                f"{len(missing)} image ids are not in data version {self.data_version}: {missing[:3]}"
            )
        return self.vectors[[index[i] for i in ids]]


def model_hash(model_dir: Path) -> str:
    """16 hex digits identifying a trained model's features: its weights file and the spec fields that
    change what a layer sees (timm name, input channels, preprocessing). The temperature, thresholds
    and test-time augmentation do not change the features and so do not change the hash."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    with open(model_dir / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    spec = json.loads((model_dir / SPEC_FILE).read_text())
    identity = {k: spec.get(k) for k in ("model", "in_chans", "data_config")}
    h.update(json.dumps(identity, sort_keys=True).encode())
    return h.hexdigest()[:16]


def entry_dir(data_dir: Path, data_version_: str, model_hash_: str) -> Path:
    """Where the embeddings of one (data version, model) pair live."""
    return Path(data_dir) / STORE_DIR / data_version_ / model_hash_


def load_cached(data_dir: Path, *, data_version_: str, model_hash_: str, layer: str) -> Embeddings | None:
    """The stored entry, or None when it was never computed (or is incomplete)."""
    base = entry_dir(data_dir, data_version_, model_hash_)
    vectors_file, sidecar = base / f"{check_layer(layer)}.npy", base / f"{layer}.json"
    if not (vectors_file.exists() and sidecar.exists()):
        return None
    meta = json.loads(sidecar.read_text())
    vectors = np.load(vectors_file, mmap_mode="r")
    if vectors.shape[0] != len(meta["ids"]):
        logger.warning("embedding store entry %s is inconsistent (%d rows, %d ids): recomputing",
                       base, vectors.shape[0], len(meta["ids"]))  # fmt: skip
        return None
    return Embeddings(
        vectors=vectors,
        ids=tuple(meta["ids"]),
        splits=tuple(meta["splits"]),
        layer=layer,
        model_hash=model_hash_,
        data_version=data_version_,
    )


def embed_manifest(
    data_dir: Path,
    model_dir: Path,
    *,
    layer: str = DEFAULT_LAYER,
    also: Sequence[str] = (),
    batch_size: int = 256,
    device: str = "cpu",
    decoded_cache: Path | None = None,
    decoded_max_gb: float = DECODED_MAX_GB,
) -> Embeddings:
    """The embeddings of every image of the data dir's current manifest under the model in
    ``model_dir`` at ``layer``: from the store, or computed once (one pass, progress bar) and stored.

    ``also``: more layers a later consumer will ask for (the evaluate stage's OOD layer and the drift
    reference the register stage warms): those missing from the store are computed in the same pass
    over the images and stored too, instead of a second pass later.

    ``decoded_cache``: the project's folder of decoded splits (``<state_dir>/cache``, what training
    memory-maps): the images are read from there, each split decoded once at the model's eval geometry
    (the files training wrote are reused), instead of decoding and transforming every file in Python —
    when the whole manifest decoded fits in ``decoded_max_gb``; the features equal the per-file
    path's to float rounding."""
    paths = DataPaths(Path(data_dir))
    version = data_version(require_manifest(paths))
    mhash = model_hash(model_dir)
    wanted = tuple(dict.fromkeys(check_layer(name) for name in (layer, *also)))
    cached = load_cached(data_dir, data_version_=version, model_hash_=mhash, layer=layer)
    if cached is not None and all(_stored(data_dir, version, mhash, name) for name in wanted):
        return cached
    from filelock import FileLock

    base = entry_dir(data_dir, version, mhash)
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / f"{layer}.lock")):
        # another process may have computed some of them while we waited
        missing = [name for name in wanted if not _stored(data_dir, version, mhash, name)]
        if missing:
            manifest = read_manifest(paths.manifest)
            model, spec = load_classifier(Path(model_dir))
            files = [paths.root / p for p in manifest["path"]]
            decoded = (
                _decoded(manifest, files, spec, decoded_cache, max_gb=decoded_max_gb, data_dir=Path(data_dir))
                if decoded_cache is not None
                else None
            )
            vectors = (
                embed_files_layers(model, spec, files, layers=missing, batch_size=batch_size, device=device)
                if decoded is None
                else embed_decoded_layers(model, spec, decoded, layers=missing, batch_size=batch_size,
                                          device=device)
            )  # fmt: skip
            for name, rows in vectors.items():
                _write_entry(base, name, rows, manifest, spec=spec, version=version, mhash=mhash)
                logger.info("embedded %d images of data version %s at %s (model %s)", len(rows), version,
                            name, mhash)  # fmt: skip
    stored = load_cached(data_dir, data_version_=version, model_hash_=mhash, layer=layer)
    assert stored is not None  # just written, or there before
    return stored


def embed_project(params: Params, model_dir: Path, *, layer: str, also: Sequence[str] = ()) -> Embeddings:
    """:func:`embed_manifest` of the project's current data version, in batches of
    ``evaluate.batch_size``, reading the images through the project's decoded-split cache as
    ``train.cache`` allows decoded copies: per file when it is ``off``, else when the whole manifest
    decoded fits in ``train.cache_max_gb``."""
    cfg = params.train
    return embed_manifest(
        params.project.data_dir, model_dir, layer=layer, also=also, batch_size=params.evaluate.batch_size,
        decoded_cache=None if cfg.cache == "off" else decoded_cache_dir(params.project.state_dir),
        decoded_max_gb=cfg.cache_max_gb,
    )  # fmt: skip


def _decoded(
    manifest: pd.DataFrame,
    files: Sequence[Path],
    spec: ModelSpec,
    cache_dir: Path,
    *,
    max_gb: float,
    data_dir: Path | None = None,
) -> np.ndarray | None:
    """(N, C, side, side) uint8 of every manifest row, in manifest order, at the model's eval geometry:
    each split through :func:`~components.data.datasets.cached_split_array` under the name training gives
    it (``<split>-<key>.npy``), so a split training decoded is not decoded again. None when the whole
    would exceed ``max_gb``."""
    from components.data.datasets import cached_split_at, decoded_size

    side = int(spec.data_config["input_size"][-1])
    if decoded_size(len(files), spec.in_chans, side) > max_gb * 2**30:
        return None
    out = np.empty((len(files), spec.in_chans, side, side), dtype=np.uint8)
    splits = manifest["split"].to_numpy()
    for split in dict.fromkeys(splits):
        rows = np.flatnonzero(splits == split)
        out[rows] = cached_split_at([files[int(i)] for i in rows], split=str(split), data_config=spec.data_config,
                                    mode=image_mode(spec.in_chans), cache_dir=cache_dir, data_dir=data_dir)  # fmt: skip
    return out


def embed_decoded_layers(
    model: nn.Module,
    spec: ModelSpec,
    images: np.ndarray,
    *,
    layers: Sequence[str],
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """{layer: (N, D)} features of decoded uint8 images (N, C, H, W) at the model's input size,
    normalised as the model's transform does (``/255``, then mean and std), from one pass."""
    mean, std = spec.data_config["mean"], spec.data_config["std"]

    def batches() -> Iterator[torch.Tensor]:
        for i in range(0, len(images), batch_size):
            yield normalise(images[i : i + batch_size], mean=mean, std=std)

    names = ", ".join(dict.fromkeys(layers))
    return extract_layers(
        model, batches(), layers=layers, batch_size=batch_size, device=device,
        total=len(images), description=f"embedding {len(images)} images ({names})",
    )  # fmt: skip


def _stored(data_dir: Path, version: str, mhash: str, layer: str) -> bool:
    """Whether the entry's two files are there (without reading them: a sidecar lists every image id;
    an inconsistent entry is caught, and recomputed, when it is read)."""
    base = entry_dir(data_dir, version, mhash)
    return (base / f"{layer}.npy").exists() and (base / f"{layer}.json").exists()


def _write_entry(
    base: Path,
    layer: str,
    vectors: np.ndarray,
    manifest: pd.DataFrame,
    *,
    spec: ModelSpec,
    version: str,
    mhash: str,
) -> None:
    """The .npy (temporary file + rename), then the sidecar (atomic): a reader needs both."""
    target = base / f"{layer}.npy"
    tmp = base / f".{layer}.{uuid.uuid4().hex[:12]}.tmp.npy"
    try:
        np.save(tmp, vectors.astype(np.float32, copy=False))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sidecar: dict[str, Any] = {
        "data_version": version,
        "model_hash": mhash,
        "model": spec.model,
        "layer": layer,
        "shape": list(vectors.shape),
        "ids": manifest["image_id"].astype(str).tolist(),
        "splits": manifest["split"].astype(str).tolist(),
    }
    write_json(base / f"{layer}.json", sidecar)


def embed_files(
    model: nn.Module,
    spec: ModelSpec,
    files: Sequence[Path],
    *,
    layer: str = DEFAULT_LAYER,
    batch_size: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """(N, D) features of image files, preprocessed as the model predicts (its spec's transform)."""
    found = embed_files_layers(model, spec, files, layers=(layer,), batch_size=batch_size, device=device)
    return found[layer]


def embed_files_layers(
    model: nn.Module,
    spec: ModelSpec,
    files: Sequence[Path],
    *,
    layers: Sequence[str],
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """{layer: (N, D)} features of image files from one pass (:func:`extract_layers`); the next batch
    is decoded on a second thread while the model runs on this one (PIL decodes outside the GIL)."""
    transform = create_image_transform(spec.data_config, is_training=False)
    mode = image_mode(spec.in_chans)

    def load(i: int) -> torch.Tensor:
        images = []
        for f in files[i : i + batch_size]:
            with Image.open(f) as img:
                images.append(transform(model_input(img, mode)))
        return torch.stack(images)

    def batches() -> Iterator[torch.Tensor]:
        with ThreadPoolExecutor(max_workers=1) as pool:
            starts = iter(range(0, len(files), batch_size))
            ahead = [pool.submit(load, i) for i in itertools.islice(starts, 2)]
            while ahead:
                batch = ahead.pop(0).result()
                ahead += [pool.submit(load, i) for i in itertools.islice(starts, 1)]
                yield batch

    names = ", ".join(dict.fromkeys(layers))
    return extract_layers(
        model, batches(), layers=layers, batch_size=batch_size, device=device,
        total=len(files), description=f"embedding {len(files)} images ({names})",
    )  # fmt: skip


def embed_tensors(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layer: str = DEFAULT_LAYER,
    batch_size: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """(N, D) features of already preprocessed images x: (N, C, H, W) (a production batch)."""
    return extract_features(model, x, layer=layer, batch_size=batch_size, device=device)
