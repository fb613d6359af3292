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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from components.model.checkpoint import ModelSpec
from components.task import get_task
from components.train import ray_adapter, snapshots
from components.train.distill import build_distiller
from components.train.engine import (
    StepOptions,
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
    input_scale,
    restore_state,
    save_state,
    set_loader_epoch,
    should_stop,
    train_targets,
    unwrap,
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


@dataclass
class _Training:
    """One worker's model, loaders, optimiser and losses, prepared for data-parallel training."""

    model: nn.Module
    spec: ModelSpec
    train_loader: Any
    val_loader: Any
    optimizer: Any
    scheduler: Any
    opts: StepOptions
    loss_fn: nn.Module
    eval_loss: nn.Module
    device: torch.device


def _prepare(recipe: TrainRecipe, *, rank: int, world: int, pin_memory: bool) -> _Training:
    """Build the recipe's torch objects and hand the model and loaders to Ray Train (device, DDP,
    sharding: a balanced sampler is sharded already)."""
    set_deterministic(recipe.deterministic)
    model, spec = build_model(recipe)
    seed_everything(recipe.seed, rank)
    train_loader, val_loader = build_loaders(
        recipe, spec.data_config, world=world, rank=rank, pin_memory=pin_memory
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
    loss_fn = build_train_loss(recipe, opts, train_targets(train_loader.dataset))
    if recipe.teacher_dir is not None:  # imgflow distill: the teacher's soft targets join the loss
        opts.distill = build_distiller(recipe, loss_fn, spec.data_config, device)
    eval_loss = get_task(recipe.task).eval_loss()
    return _Training(
        model, spec, train_loader, val_loader, optimizer, scheduler, opts, loss_fn, eval_loss, device
    )


def _train_epoch(
    t: _Training, epoch: int, on_batch: Callable[[int, float], None], *, scale: float = 1.0
) -> dict[str, Any]:
    """One epoch on this worker's shard (its batches at ``scale`` of their side: progressive
    resizing), evaluated on val at full size; the epoch record summed over all workers."""
    set_loader_epoch(t.train_loader, epoch)
    t0 = time.perf_counter()
    tr = train_one_epoch(
        t.model, t.train_loader, t.optimizer, t.loss_fn, device=t.device, scheduler=t.scheduler,
        start_step=epoch * len(t.train_loader), on_batch=on_batch, opts=t.opts,
        input_scale=scale,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    evaluated = t.opts.ema.module if t.opts.ema is not None else t.model
    va = eval_sums(evaluated, t.val_loader, t.eval_loss, device=t.device, amp_dtype=t.opts.amp_dtype,
                   channels_last=t.opts.channels_last)  # fmt: skip
    tr = allreduce_sums({k: tr[k] for k in ("loss_sum", "correct", "count")}, t.device)
    va = allreduce_sums(va, t.device)
    return epoch_metrics(epoch, tr, va, t.optimizer.param_groups[0]["lr"], seconds, input_scale=scale)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the data-parallel training loop of ``config["run"]``."""
    run: WorkerRun = config[LOOP_CONFIG_KEY]
    recipe = run.recipe
    ray_adapter.configure_worker_logging(verbose=run.verbose)
    rank, world = ray_adapter.worker_rank_and_world()
    torch.set_num_threads(run.threads)
    t = _prepare(recipe, rank=rank, world=world, pin_memory=run.use_gpu)
    start_epoch, history = 0, list[dict[str, Any]]()
    kept: dict[int, dict[str, torch.Tensor]] = {}  # snapshot ensemble: rank 0's weights at each cycle's end
    with ray_adapter.latest_checkpoint() as checkpoint:
        if checkpoint is not None:
            start_epoch, history = restore_state(
                checkpoint, t.model, t.optimizer, t.scheduler, t.opts.ema, steps_per_epoch=len(t.train_loader)
            )
            kept = snapshots.read_snapshots(checkpoint)
    note_worker_event(
        run.worker_events, rank, phase="start", start_epoch=start_epoch, device=str(t.device),
        amp=str(t.opts.amp_dtype),
    )  # fmt: skip
    progress = ProgressSender(run.progress if rank == 0 else None)
    progress.send({"type": "start", "start_epoch": start_epoch})
    n_batches = len(t.train_loader)

    for epoch in range(start_epoch, recipe.epochs):

        def on_batch(i: int, loss: float, _epoch: int = epoch) -> None:
            if i == 1:
                note_worker_event(run.worker_events, rank, phase="mid_epoch", epoch=_epoch)
            progress.batch(_epoch, i, n_batches, loss)

        metrics = _train_epoch(t, epoch, on_batch, scale=input_scale(recipe, epoch))
        history.append(metrics)
        stop = should_stop(history, recipe.early_stopping_patience)
        metrics["stopped_early"] = stop
        progress.send({"type": "epoch", **metrics})
        if rank == 0 and snapshots.is_snapshot_epoch(recipe, epoch):
            snapshots.keep_snapshot(
                kept, epoch, t.opts.ema.module if t.opts.ema is not None else unwrap(t.model)
            )
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_state(Path(tmp), t.model, t.optimizer, t.scheduler, epoch, history, t.spec, t.opts.ema)
                snapshots.write_snapshots(Path(tmp), kept, t.spec)
            ray_adapter.report(metrics, checkpoint_dir=Path(tmp) if rank == 0 else None)
        if stop:
            break
