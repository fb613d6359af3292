"""One model's pass over one split of the manifest: logits, targets and per-image properties.

The evaluate stage predicts the test split (and val, to fit the temperature and, multi-label, the
decision thresholds) once and measures everything on these arrays; the champion is re-run on the same
test images the same way.
"""

from __future__ import annotations

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

    Returns the output and ``(model, spec)``. Images are decoded and transformed once; the kept
    ones are stored as uint8 (the sweep corrupts 8-bit images, like the files on disk).
    """
    from torch.utils.data import DataLoader

    from components.data.datasets import dataset_for_split
    from components.evaluate.robustness import prepare_for_inference
    from components.evaluate.slices import image_properties
    from components.model.checkpoint import load_classifier
    from components.model.models import create_image_transform, image_mode

    model, spec = load_classifier(model_dir)
    fast = prepare_for_inference(model)
    ds = dataset_for_split(
        read_manifest(DataPaths(params.project.data_dir).manifest),
        split,
        data_dir=params.project.data_dir,
        classes=spec.classes,
        transform=create_image_transform(spec.data_config, is_training=False),
        mode=image_mode(spec.in_chans),
        task=spec.task,
    )
    mean = torch.tensor(spec.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec.data_config["std"]).view(1, -1, 1, 1)
    keep_mask = np.zeros(len(ds), dtype=bool)
    if keep is not None:
        keep_mask[keep] = True
    logits, targets, props, kept = [], [], [], []
    start = 0
    with torch.inference_mode():
        for x, y in DataLoader(ds, batch_size=params.evaluate.batch_size, shuffle=False):
            logits.append(fast(x.contiguous(memory_format=torch.channels_last)).float().numpy())
            targets.append(y.numpy())
            x01 = (x * std + mean).clamp_(0, 1)
            props.append(image_properties(x01.numpy()))
            sel = torch.from_numpy(keep_mask[start : start + len(y)])
            if sel.any():
                kept.append(((x01[sel] * 255).round_().to(torch.uint8), y[sel]))
            start += len(y)
    out = SplitOutput(
        logits=np.concatenate(logits),
        targets=np.concatenate(targets).astype(spec.task.target_dtype),
        properties={k: np.concatenate([p[k] for p in props]) for k in props[0]},
        kept=torch.cat([k[0] for k in kept]) if kept else None,
        kept_targets=torch.cat([k[1] for k in kept]) if kept else None,
    )
    return out, (model, spec)


def has_split(params: Params, split: str) -> bool:
    return bool((read_manifest(DataPaths(params.project.data_dir).manifest)["split"] == split).any())
