"""Snapshot ensembles (``train.ensemble: {snapshots: K}``): K members from one training run.

The LR schedule restarts its cosine K times (``torch_recipe.build_optimizer``: equal cycles of
``epochs / K``); at the end of each cycle the weights sit in a different low-loss basin, and rank 0
keeps a copy. Every checkpoint carries the copies kept so far (``snapshots/<epoch>/``: safetensors +
spec), so a resumed run still has them. After the run the last cycle's model (the run's own final
model) and the earlier snapshots become one ensemble folder (:func:`combine_snapshots`). Cost: one
run, K model copies on disk; the price is K forward passes per prediction.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from components.model.checkpoint import ModelSpec, save_classifier
from components.model.ensemble import save_ensemble
from components.train.recipe import TrainRecipe

logger = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"


def is_snapshot_epoch(recipe: TrainRecipe, epoch: int) -> bool:
    """True at the end of every cycle but the last (the last cycle's weights are the run's final model)."""
    if not recipe.snapshots:
        return False
    cycle = recipe.epochs // recipe.snapshots
    return (epoch + 1) % cycle == 0 and epoch + 1 < recipe.epochs


def keep_snapshot(kept: dict[int, dict[str, torch.Tensor]], epoch: int, model: torch.nn.Module) -> None:
    """A CPU copy of ``model``'s weights (the EMA's when enabled: what the run would ship) as of ``epoch``."""
    kept[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def write_snapshots(checkpoint: Path, kept: dict[int, dict[str, torch.Tensor]], spec: ModelSpec) -> None:
    """Every kept snapshot into the checkpoint folder being written."""
    for epoch, state in kept.items():
        save_classifier(state, spec, checkpoint / SNAPSHOT_DIR / f"{epoch:04d}")


def read_snapshots(checkpoint: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The snapshots a checkpoint carries (resume), by epoch."""
    from safetensors.torch import load_file

    from components.model.checkpoint import WEIGHTS_FILE

    root = checkpoint / SNAPSHOT_DIR
    if not root.is_dir():
        return {}
    return {int(d.name): load_file(str(d / WEIGHTS_FILE)) for d in sorted(root.iterdir()) if d.is_dir()}


def copy_snapshots(checkpoint: Path, out_dir: Path) -> None:
    """The final checkpoint's snapshots next to the copied model (``out_dir``), if it has any."""
    if (checkpoint / SNAPSHOT_DIR).is_dir():
        target = out_dir.parent / SNAPSHOT_DIR
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(checkpoint / SNAPSHOT_DIR, target)


def combine_snapshots(out_dir: Path, history: list[dict[str, Any]]) -> Path:
    """``out_dir/snapshots/<epoch>/`` + the final ``out_dir/model`` -> one ensemble folder ``out_dir/model``
    (the final model moves to ``out_dir/snapshots/final``); returns it."""
    root = out_dir / SNAPSHOT_DIR
    epochs = (
        sorted(int(d.name) for d in root.iterdir() if d.is_dir() and d.name.isdigit())
        if root.is_dir()
        else []
    )
    final = root / "final"
    if final.exists():
        shutil.rmtree(final)
    root.mkdir(parents=True, exist_ok=True)
    shutil.move(str(out_dir / "model"), final)
    dirs = [root / f"{e:04d}" for e in epochs] + [final]
    by_epoch = {int(h["epoch"]): h for h in history}
    last = len(history) - 1
    infos = [
        {"epoch": e, **{k: by_epoch.get(e, {}).get(k) for k in ("val_loss", "val_accuracy")}}
        for e in [*epochs, last]
    ]
    labels = [f"snapshot {i + 1}/{len(dirs)} (epoch {e + 1})" for i, e in enumerate([*epochs, last])]
    logger.info("snapshot ensemble of %d: epochs %s", len(dirs), [e + 1 for e in [*epochs, last]])
    return save_ensemble(dirs, out_dir / "model", labels=labels, infos=infos)
