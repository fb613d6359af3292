"""The per-worker loop that Ray Train runs on every worker: thin on purpose.

It builds the recipe's torch objects (:mod:`components.train.torch_recipe`), runs the plain
PyTorch steps (:mod:`components.train.engine`) and talks to Ray only through
:mod:`components.train.ray_adapter` (rank, prepared model and loaders, the latest checkpoint, one
report per epoch). Rank 0 writes the checkpoint and sends progress to the driver's display.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from components.task import get_task
from components.train import ray_adapter
from components.train.engine import (
    allreduce_sums,
    eval_sums,
    seed_everything,
    set_deterministic,
    train_one_epoch,
)
from components.train.imbalance import BalancedDistributedSampler
from components.train.progress import ProgressSender
from components.train.recipe import TrainRecipe
from components.train.torch_recipe import (
    build_loaders,
    build_model,
    build_optimizer,
    build_step_options,
    build_train_loss,
    epoch_metrics,
    restore_state,
    save_state,
    should_stop,
    train_targets,
)

LOOP_CONFIG_KEY = "run"
"""Ray Train hands the loop a dict: the :class:`WorkerRun` sits under this key."""


@dataclass(frozen=True)
class WorkerRun:
    """What every worker gets: the recipe, and how this run executes it (decided on the driver once
    Ray is up)."""

    recipe: TrainRecipe
    use_gpu: bool
    threads: int
    """torch threads per worker (``train.cpus_per_worker``)."""
    progress: Any
    """Rank 0's progress channel (``ProgressFile`` or a Ray queue)."""
    worker_events: Path | None
    """See ``ray_adapter.WORKER_EVENTS_ENV``."""
    verbose: bool
    """Not verbose: imgflow's own INFO lines stay off every worker's console."""

    def loop_config(self) -> dict[str, Any]:
        return {LOOP_CONFIG_KEY: self}


def note_worker_event(path: Path | None, rank: int, **fields: Any) -> None:
    if path:
        with open(path, "a") as f:  # one short line per write: appends from several workers interleave whole
            f.write(json.dumps({"rank": rank, "pid": os.getpid(), "time": time.time(), **fields}) + "\n")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the data-parallel training loop of ``config["run"]``."""
    run: WorkerRun = config[LOOP_CONFIG_KEY]
    recipe = run.recipe
    ray_adapter.configure_worker_logging(verbose=run.verbose)
    rank, world = ray_adapter.worker_rank_and_world()
    torch.set_num_threads(run.threads)
    set_deterministic(recipe.deterministic)
    model, spec = build_model(recipe)
    seed_everything(recipe.seed, rank)
    train_loader, val_loader = build_loaders(
        recipe, spec.data_config, world=world, rank=rank, pin_memory=run.use_gpu
    )
    balanced = isinstance(train_loader.sampler, BalancedDistributedSampler)
    train_loader = ray_adapter.prepare_loader(train_loader, add_dist_sampler=not balanced)
    val_loader = ray_adapter.prepare_loader(val_loader)
    device = ray_adapter.worker_device()
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray_adapter.prepare_model(model)
    if recipe.compile:
        model = cast(nn.Module, torch.compile(model))
    optimizer, scheduler = build_optimizer(model, recipe, len(train_loader))
    opts = build_step_options(recipe, model, device)
    start_epoch, history = 0, list[dict[str, Any]]()
    with ray_adapter.latest_checkpoint() as checkpoint:
        if checkpoint is not None:
            start_epoch, history = restore_state(
                checkpoint, model, optimizer, scheduler, opts.ema, steps_per_epoch=len(train_loader)
            )
    note_worker_event(run.worker_events, rank, phase="start", start_epoch=start_epoch)
    loss_fn = build_train_loss(recipe, opts, train_targets(train_loader.dataset))
    eval_loss = get_task(recipe.task).eval_loss()
    progress = ProgressSender(run.progress if rank == 0 else None)
    progress.send({"type": "start", "start_epoch": start_epoch})
    n_batches = len(train_loader)

    for epoch in range(start_epoch, recipe.epochs):
        sampler: Any = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # distributed or balanced: new draws each epoch
            sampler.set_epoch(epoch)

        def on_batch(i: int, loss: float, _epoch: int = epoch) -> None:
            if i == 1:
                note_worker_event(run.worker_events, rank, phase="mid_epoch", epoch=_epoch)
            progress.batch(_epoch, i, n_batches, loss)

        t0 = time.perf_counter()
        tr = train_one_epoch(
            model, train_loader, optimizer, loss_fn, device=device, scheduler=scheduler,
            start_step=epoch * n_batches, on_batch=on_batch, opts=opts,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        evaluated = opts.ema.module if opts.ema is not None else model
        va = eval_sums(evaluated, val_loader, eval_loss, device=device)
        tr = allreduce_sums({k: tr[k] for k in ("loss_sum", "correct", "count")}, device)
        va = allreduce_sums(va, device)
        metrics = epoch_metrics(epoch, tr, va, optimizer.param_groups[0]["lr"], seconds)
        history.append(metrics)
        stop = should_stop(history, recipe.early_stopping_patience)
        metrics["stopped_early"] = stop
        progress.send({"type": "epoch", **metrics})
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_state(Path(tmp), model, optimizer, scheduler, epoch, history, spec, opts.ema)
            ray_adapter.report(metrics, checkpoint_dir=Path(tmp) if rank == 0 else None)
        if stop:
            break
