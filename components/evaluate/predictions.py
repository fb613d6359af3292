"""One model's pass over one split of the manifest: logits, targets and per-image properties.

The evaluate stage predicts the test split (and val, to fit the temperature and, multi-label, the
decision thresholds) once and measures everything on these arrays; the champion is re-run on the same
test images the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.core.config import Params
from components.data.manifest import DataPaths, read_manifest


@dataclass
class SplitOutput:
    """One model's pass over one split.

    logits: (N, K) float; targets: the task's targets, (N,) int class indices or (N, K) int8 0/1;
    properties: per-image ``brightness``/``contrast`` (N,); kept: the images picked for the
    corruption sweep, (M, C, H, W) uint8 at the model's input size (un-normalised), with their
    kept_targets (M,) or (M, K).
    """

    logits: np.ndarray
    targets: np.ndarray
    properties: dict[str, np.ndarray]
    kept: torch.Tensor | None = None
    kept_targets: torch.Tensor | None = None


def predict_split(
    params: Params, model_dir: Path, split: str, *, keep: np.ndarray | None = None
) -> tuple[SplitOutput, Any]:
    """Predict ``split`` with the model in ``model_dir``; keep the images at indices ``keep``.

    Returns the output and ``(model, spec)``. Images are decoded and transformed once (read from the
    project's decoded-split cache when no image needs resizing, so the pixels are the ones the
    transform would give: :func:`_split_batches`), and the model's batch-norm-folded copy runs whole
    batches side by side (:mod:`components.model.inference`). The kept images are stored as uint8 (the
    sweep corrupts 8-bit images, like the files on disk).
    """
    from components.data.datasets import as_target_tensor, encode_targets, split_rows
    from components.evaluate.slices import image_properties
    from components.model.checkpoint import load_classifier
    from components.model.inference import prepare_for_inference, side_by_side_iter, unit_batches

    model, spec = load_classifier(model_dir)
    fast = prepare_for_inference(model)
    rows = split_rows(read_manifest(DataPaths(params.project.data_dir).manifest), split)
    encoded = encode_targets(rows, spec.classes, spec.task)
    targets = np.asarray(encoded).astype(spec.task.target_dtype)
    mean = torch.tensor(spec.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec.data_config["std"]).view(1, -1, 1, 1)
    keep_mask = np.zeros(len(rows), dtype=bool)
    if keep is not None:
        keep_mask[keep] = True

    def unit(job: tuple[int, torch.Tensor]) -> tuple[np.ndarray, dict[str, np.ndarray], torch.Tensor | None]:
        start, x = job
        with torch.inference_mode():
            logits = fast(x.contiguous(memory_format=torch.channels_last)).float().numpy()
            x01 = (x * std + mean).clamp_(0, 1)
            sel = torch.from_numpy(keep_mask[start : start + len(x)])
            kept = (x01[sel] * 255).round_().to(torch.uint8) if sel.any() else None
        return logits, image_properties(x01.numpy()), kept

    batches = _split_batches(params, rows, spec, split=split, batch_size=params.evaluate.batch_size)
    parts = list(side_by_side_iter(unit, _numbered(unit_batches(batches))))
    kept = [k for _, _, k in parts if k is not None]
    sel = torch.from_numpy(keep_mask)
    out = SplitOutput(
        logits=np.concatenate([p[0] for p in parts]),
        targets=targets,
        properties={k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]},
        kept=torch.cat(kept) if kept else None,
        kept_targets=as_target_tensor(encoded)[sel] if kept else None,
    )
    return out, (model, spec)


def _numbered(pieces: Iterator[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of its first row, piece) for consecutive pieces of a split."""
    start = 0
    for x in pieces:
        yield start, x
        start += len(x)


def _split_batches(
    params: Params, rows: Any, spec: Any, *, split: str, batch_size: int
) -> Iterator[torch.Tensor]:
    """Normalised images (B, C, H, W) of the split's ``rows`` in order: from the decoded
    split cache (``train.cache``, shared with training and the embedding store) when every image is
    already at the model's side — the cached pixels are then exactly what the model's transform gives
    — else each file through the model's transform (resizing in uint8 would round what serving, which
    uses the transform, does not)."""
    from torch.utils.data import DataLoader

    from components.data.datasets import (
        ManifestDataset,
        cached_split_at,
        decoded_cache_dir,
        decoded_size,
        normalise,
    )
    from components.model.models import create_image_transform, image_mode

    data_dir, cfg = Path(params.project.data_dir), params.train
    files = [data_dir / p for p in rows["path"]]
    side = int(spec.data_config["input_size"][-1])
    sized = {"width", "height"} <= set(rows.columns)
    at_side = sized and bool(((rows["width"] == side) & (rows["height"] == side)).all())
    fits = decoded_size(len(files), spec.in_chans, side) <= cfg.cache_max_gb * 2**30
    mode = image_mode(spec.in_chans)
    if at_side and fits and cfg.cache != "off":
        images = cached_split_at(files, split=split, data_config=spec.data_config, mode=mode,
                                 cache_dir=decoded_cache_dir(params.project.state_dir), data_dir=data_dir)  # fmt: skip
        mean, std = spec.data_config["mean"], spec.data_config["std"]
        for start in range(0, len(files), batch_size):
            yield normalise(images[start : start + batch_size], mean=mean, std=std)
        return
    transform = create_image_transform(spec.data_config, is_training=False)
    ds = ManifestDataset(files, np.zeros(len(files), dtype=np.int64), transform=transform, mode=mode)
    yield from (x for x, _ in DataLoader(ds, batch_size=batch_size, shuffle=False))


def has_split(params: Params, split: str) -> bool:
    return bool((read_manifest(DataPaths(params.project.data_dir).manifest)["split"] == split).any())
