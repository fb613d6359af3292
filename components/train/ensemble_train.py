"""Training an ensemble (``train.ensemble``): one Ray Train run per member, combined into one model.

Members are every (model, seed) pair of ``train.ensemble.models`` x ``seeds``; each is an ordinary
:func:`components.train.training.fit` (same data path, checkpoints, resume) with its own run name.
They run side by side when the Ray cluster holds several members' workers at once (``train.workers``
x ``train.cpus_per_worker`` CPUs, and the GPUs with ``use_gpu``), else one after the other; the log
says which. Each member keeps the configured worker count, so a member trains exactly as it would
alone (same global batch) whichever way they are scheduled.

The finished members are combined by :func:`components.model.ensemble.save_ensemble` into
``<out_dir>/model`` (one model folder, probabilities averaged); the combined model's validation loss
and accuracy are measured here, and evaluate refits the temperature on val after combining.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from components.core.config import TrainConfig
from components.core.jsonio import write_json
from components.data.datasets import InMemoryDataset, batch_collate
from components.data.manifest import DataPaths, read_manifest
from components.model.checkpoint import load_classifier
from components.model.ensemble import save_ensemble
from components.task import get_task
from components.train import ray_adapter
from components.train.engine import eval_sums
from components.train.ray_adapter import RayOptions
from components.train.recipe import TrainRecipe, build_recipe
from components.train.torch_recipe import split_dataset
from components.train.training import FitResult, TrainResult, fit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberPlan:
    """One member to train: its timm model, its seed and its name in logs and reports."""

    index: int
    model: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.model} seed {self.seed}"


def plan_members(cfg: TrainConfig, *, seed: int) -> list[MemberPlan]:
    """Every (model, seed) pair of ``cfg.ensemble`` (models outer): null lists mean ``cfg.model`` and ``seed``."""
    assert cfg.ensemble is not None
    models = cfg.ensemble.models or [cfg.model]
    seeds = cfg.ensemble.seeds or [seed]
    return [MemberPlan(i, m, s) for i, (m, s) in enumerate((m, s) for m in models for s in seeds)]


def side_by_side(members: int, *, workers: int, cpus_per_worker: int, gpu: bool) -> int:
    """How many members the cluster can train at once, each with ``workers`` workers (>= 1)."""
    have = ray_adapter.cluster_resources()
    slots = int(have.get("CPU", 0.0) // (workers * cpus_per_worker))
    if gpu:
        slots = min(slots, int(have.get("GPU", 0.0) // workers))
    return max(1, min(members, slots))


def member_config(cfg: TrainConfig, plan: MemberPlan) -> TrainConfig:
    """The member's own train config: one model, no ensemble."""
    return cfg.model_copy(update={"model": plan.model, "ensemble": None})


def combined_val_metrics(model_dir: Path, recipe: TrainRecipe) -> dict[str, float]:
    """Validation loss and accuracy of the combined model (the NLL of the averaged probabilities)."""
    model, spec = load_classifier(model_dir)
    ds = split_dataset(read_manifest(recipe.manifest), "val", recipe, spec.data_config, train=False)
    collate = batch_collate if isinstance(ds, InMemoryDataset) else None
    loader = DataLoader(ds, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=collate)
    with torch.inference_mode():
        sums = eval_sums(model, loader, get_task(recipe.task).eval_loss(), device=torch.device("cpu"))
    n = max(sums["count"], 1.0)
    return {"val_loss": sums["loss_sum"] / n, "val_accuracy": sums["correct"] / n}


def merged_history(histories: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per epoch: the first member's record, plus every member's ``member<i>_val_*``."""
    out = []
    for epoch, first in enumerate(histories[0]):
        record = dict(first)
        for i, h in enumerate(histories):
            if epoch < len(h):
                record.update(
                    {f"member{i}_{k}": h[epoch][k] for k in ("val_loss", "val_accuracy") if k in h[epoch]}
                )
        out.append(record)
    return out


def train_ensemble(
    cfg: TrainConfig,
    *,
    data: DataPaths,
    out_dir: Path,
    storage_path: Path,
    run_name: str,
    seed: int,
    weights_dir: Path,
    exclude_file: Path | None = None,
    show_progress: bool = True,
    ray_options: RayOptions | None = None,
) -> TrainResult:
    """Train every member (see the module docstring), write ``out_dir/members/<i>/model``, the combined
    ``out_dir/model`` (an ensemble folder), ``out_dir/members.json`` and ``history.json``."""
    plans = plan_members(cfg, seed=seed)
    recipes = [
        build_recipe(
            member_config(cfg, p), data, seed=p.seed, weights_dir=weights_dir, exclude_file=exclude_file
        )
        for p in plans
    ]  # config errors of any member surface here, before Ray starts
    options = ray_options or RayOptions()
    use_gpu = {"auto": None, "true": True, "false": False}[cfg.use_gpu]
    started = ray_adapter.init_ray(
        address=options.address, dashboard=options.dashboard, verbose=options.verbose
    )
    t0 = time.perf_counter()
    try:
        gpu = ray_adapter.cluster_has_gpus() if use_gpu is None else use_gpu
        at_once = side_by_side(len(plans), workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, gpu=gpu)
        logger.info(
            "ensemble of %d members (%s): %s", len(plans), ", ".join(p.label for p in plans),
            f"{at_once} side by side" if at_once > 1
            else "one after the other (the cluster holds one member's workers at a time)",
        )  # fmt: skip

        def one(i: int) -> FitResult:
            result = fit(
                recipes[i], workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, use_gpu=gpu,
                storage_path=cfg.storage_path or storage_path, run_name=f"{run_name}-m{i}",
                out_dir=out_dir / "members" / str(i) / "model", max_failures=cfg.max_failures,
                show_progress=show_progress and at_once == 1, worker_events=options.worker_events,
                verbose=options.verbose,
            )  # fmt: skip
            logger.info("member %d (%s) trained in %.1fs", i, plans[i].label, result.seconds)
            return result

        with ThreadPoolExecutor(max_workers=at_once) as pool:
            fits = list(pool.map(one, range(len(plans))))
    finally:
        if started:
            ray_adapter.shutdown_ray()
    seconds = time.perf_counter() - t0
    return _combine(plans, recipes, fits, out_dir=out_dir, seconds=seconds, side_by_side=at_once)


def _combine(
    plans: Sequence[MemberPlan],
    recipes: Sequence[TrainRecipe],
    fits: Sequence[FitResult],
    *,
    out_dir: Path,
    seconds: float,
    side_by_side: int,
) -> TrainResult:
    """The ensemble folder from the trained members, its val metrics and the run's records."""
    infos: list[dict[str, Any]] = []
    for plan, done in zip(plans, fits, strict=True):
        last: dict[str, Any] = done.history[-1] if done.history else {}
        info: dict[str, Any] = {"model": plan.model, "seed": plan.seed, "epochs": len(done.history)}
        infos.append(info | {k: last[k] for k in ("val_loss", "val_accuracy") if k in last})
    model_dir = save_ensemble(
        [f.model_dir for f in fits], out_dir / "model", labels=[p.label for p in plans], infos=infos
    )
    combined = combined_val_metrics(model_dir, recipes[0])
    write_json(out_dir / "members.json", {"members": infos, "combined": combined, "side_by_side": side_by_side,
                                          "seconds": seconds})  # fmt: skip
    history = merged_history([f.history for f in fits])
    write_json(out_dir / "history.json", history)
    best = max((i.get("val_accuracy", 0.0) for i in infos), default=0.0)
    logger.info("ensemble of %d: val_accuracy %.4f (best member %.4f), val_loss %.4f, in %.1fs",
                len(plans), combined["val_accuracy"], best, combined["val_loss"], seconds)  # fmt: skip
    final = {**(history[-1] if history else {}), **combined}
    return TrainResult(model_dir=model_dir, history=history, final=final, seconds=seconds,
                       ray_run=fits[0].run_path, recipe=recipes[0])  # fmt: skip
