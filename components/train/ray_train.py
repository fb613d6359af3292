"""Ray adapter: every Ray call in imgflow lives here.

Training always goes through Ray Train's ``TorchTrainer`` — on this laptop a local Ray runtime
bound to 127.0.0.1, on a cluster the one ``RAY_ADDRESS`` names — so the same code path runs
everywhere. The per-worker loop is thin: it builds the model and loaders and calls the plain
PyTorch steps in :mod:`components.train.engine`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue as queue_mod
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.core.errors import ConfigError
from components.data.datasets import (
    InMemoryDataset,
    ManifestDataset,
    batch_collate,
    cache_key,
    cached_split_array,
    decoded_size,
    encode_targets,
    split_rows,
)
from components.data.manifest import read_exclusions, read_manifest
from components.model.checkpoint import ModelSpec, save_classifier
from components.model.models import (
    create_classifier,
    create_image_transform,
    image_mode,
    resolve_data_config,
    set_finetune_mode,
)
from components.train.engine import (
    StepOptions,
    eval_sums,
    seed_everything,
    set_deterministic,
    train_one_epoch,
    worker_init_fn,
)
from components.train.imbalance import (
    BalancedDistributedSampler,
    class_counts,
    create_loss,
    create_multilabel_loss,
)

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
MODEL_SUBDIR = "model"
RAY_DASHBOARD_ENV = "IMGFLOW_RAY_DASHBOARD"
"""Set to 1 to start Ray's dashboard (http://127.0.0.1:8265) with a local runtime. Off by default:
its ~12 processes take ~0.7 GiB and about a fifth of the CPU Ray's own processes use while training
(measured per process over 30 s of steady training on 2 cores), which training on a small machine
feels. A cluster named by ``RAY_ADDRESS`` keeps its own dashboard."""
WORKER_EVENTS_ENV = "IMGFLOW_WORKER_EVENTS"
"""When set (on the driver) to a file path, every worker appends one JSON line (rank, pid, phase,
epoch) when it starts and after its second batch of each epoch: how a test (or an operator) finds
a worker's PID mid-epoch and sees a restart from a checkpoint. The file must be on storage the
workers share with the driver (always true for the local runtime)."""
LEAN_RUNTIME_ENV = "IMGFLOW_RAY_LEAN"
"""Set by ``init_ray`` (and inherited by every Ray process it starts) when it starts a local
runtime without the dashboard: nothing can read Ray's state API there, so the parts of Ray Train
that only feed or poll it are left out, and progress travels through a file rather than a queue
actor (see ``_lean_trainer_class`` and ``_progress_channel``)."""


# --------------------------------------------------------------------------- runtime


def init_ray(*, address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a local runtime on 127.0.0.1.

    Returns True when this call started the runtime (the caller then owns its shutdown).
    """
    # Read by Ray at import time: a single-node runtime then binds loopback, never the machine's
    # external interface. Entry points set it too, before anything imports ray.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's default worker niceness is 15: training workers would yield the CPU to any other
    # process (the bench measured Ray at 0.78x a plain loop with it, on a quiet 2-core box).
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        os.environ.pop(LEAN_RUNTIME_ENV, None)  # a cluster runs Ray Train in full
        ray.init(address=address, log_to_driver=True)
        return True
    # A runtime this process starts is one node that nobody drains: Ray Train's preemption watcher
    # (one more actor process, ~200 MB, polling every 5 s) has nothing to watch. Clusters keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    dashboard = os.environ.get(RAY_DASHBOARD_ENV, "0") == "1"
    if dashboard:
        os.environ.pop(LEAN_RUNTIME_ENV, None)
    else:
        # No dashboard, no state API: the task-state events every Ray process reports each second
        # would have no reader (they cost ~11% of Ray's own CPU while training, measured).
        os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
        os.environ[LEAN_RUNTIME_ENV] = "1"
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",
        include_dashboard=dashboard,
        log_to_driver=True,
    )
    return True


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop(LEAN_RUNTIME_ENV, None)  # whatever this process connects to next is not lean


def cluster_has_gpus() -> bool:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) > 0


def _check_resources(workers: int, cpus_per_worker: int, use_gpu: bool) -> None:
    import ray

    have_cpu = float(ray.cluster_resources().get("CPU", 0))
    need_cpu = workers * cpus_per_worker
    if need_cpu > have_cpu:
        raise ConfigError(
            f"train.workers ({workers}) x train.cpus_per_worker ({cpus_per_worker}) = {need_cpu} CPUs, "
            f"but the Ray cluster has {have_cpu:g}: lower them or add nodes"
        )
    if use_gpu and float(ray.cluster_resources().get("GPU", 0)) < workers:
        raise ConfigError(f"train.use_gpu is on but the Ray cluster has fewer than {workers} GPUs")


# --------------------------------------------------------------------------- per-worker loop


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    return inner if isinstance(inner, nn.Module) else model


def _allreduce(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum scalar counters over all workers (no-op with one worker)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def train_targets(ds: Dataset) -> np.ndarray:
    """Targets of an InMemoryDataset or ManifestDataset: class indices (N,), or (N, K) multi-hot."""
    return np.asarray(ds.targets)  # type: ignore[attr-defined]


def _use_cache(config: dict[str, Any], rows: int, in_chans: int, side: int) -> bool:
    if config.get("cache", "off") == "off":
        return False
    fits = decoded_size(rows, in_chans, side) <= config.get("cache_max_gb", 4.0) * 2**30
    if config["cache"] == "memory" and not fits:
        raise ConfigError(
            f"train.cache=memory but {rows} decoded images of {in_chans}x{side}x{side} exceed "
            f"train.cache_max_gb={config['cache_max_gb']}: raise it or set train.cache=auto"
        )
    return fits


def _split_dataset(
    manifest: Any, split: str, config: dict[str, Any], data_config: dict[str, Any], *, train: bool
) -> Dataset:
    """One split as a Dataset: decoded once (``InMemoryDataset``) when the cache allows, else per item."""
    rows = split_rows(manifest, split)
    paths = [Path(config["data_dir"]) / p for p in rows["path"]]
    targets = encode_targets(rows, config["classes"], config.get("task", "singlelabel"))
    in_chans, side = data_config["input_size"][0], data_config["input_size"][-1]
    mode = image_mode(config["in_chans"])
    if _use_cache(config, len(paths), in_chans, side):
        geometry = {
            "mode": mode,
            "side": side,
            "crop_pct": float(data_config.get("crop_pct", 1.0)),
            "interpolation": str(data_config.get("interpolation", "bilinear")),
        }
        key = cache_key(paths, **geometry)
        images = cached_split_array(
            paths, cache_file=Path(config["cache_dir"]) / f"{split}-{key}.npy", **geometry
        )
        return InMemoryDataset(
            images, targets, mean=data_config["mean"], std=data_config["std"], train=train,
            hflip=config["hflip"], scale=tuple(config["scale"]), paths=paths,
            random_erasing=config.get("random_erasing", 0.0),
        )  # fmt: skip
    tf = create_image_transform(
        data_config,
        is_training=train,
        hflip=config["hflip"],
        scale=tuple(config["scale"]),
        random_erasing=config.get("random_erasing", 0.0),
    )
    return ManifestDataset(paths, targets, transform=tf, mode=mode)


def _build_loaders(
    config: dict[str, Any], data_config: dict[str, Any], *, world: int = 1, rank: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders. ``train.sampler=balanced``: the train loader draws classes equally
    often, already sharded over ``world`` ranks (so Ray must not add its own sampler)."""
    manifest = read_manifest(Path(config["manifest"]))
    if config.get("exclude_file"):
        excluded = read_exclusions(Path(config["exclude_file"]))
        manifest = manifest[~((manifest["split"] == "train") & manifest["image_id"].isin(excluded))]
    train_ds = _split_dataset(manifest, "train", config, data_config, train=True)
    val_ds = _split_dataset(manifest, "val", config, data_config, train=False)
    g = torch.Generator().manual_seed(config["seed"])

    def loader(ds: Dataset, **kw: Any) -> DataLoader:
        collate = batch_collate if isinstance(ds, InMemoryDataset) else None
        return DataLoader(
            ds, num_workers=config["loader_workers"], worker_init_fn=worker_init_fn,
            pin_memory=config["use_gpu"], collate_fn=collate, **kw,
        )  # fmt: skip

    if config.get("sampler", "random") == "balanced":
        sampler = BalancedDistributedSampler(
            train_targets(train_ds), num_replicas=world, rank=rank, seed=config["seed"]
        )
        train_loader = loader(train_ds, batch_size=config["batch_size"], sampler=sampler)
    else:
        train_loader = loader(train_ds, batch_size=config["batch_size"], shuffle=True, generator=g)
    val_loader = loader(val_ds, batch_size=config["eval_batch_size"], shuffle=False)
    return train_loader, val_loader


def _make_optimizer(model: nn.Module, config: dict[str, Any], steps_per_epoch: int) -> tuple[Any, Any]:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    opt_kw: dict[str, Any] = {"momentum": 0.9} if config["optimizer"] == "sgd" else {}
    optimizer = create_optimizer_v2(
        model, opt=config["optimizer"], lr=config["lr"], weight_decay=config["weight_decay"], **opt_kw
    )
    total = max(1, config["epochs"] * steps_per_epoch)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total,
        lr_min=config["lr"] * 1e-2,
        warmup_t=config["warmup_epochs"] * steps_per_epoch,
        warmup_lr_init=config["lr"] * 1e-2,
        t_in_epochs=False,
    )
    return optimizer, scheduler


def _save_state(out: Path, model: nn.Module, optimizer: Any, scheduler: Any, epoch: int, history: list[dict],
                spec: ModelSpec, ema: Any = None) -> None:  # fmt: skip
    state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
    state["scheduler"] = scheduler.state_dict()
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    torch.save(state, out / STATE_FILE)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    final = ema.module if ema is not None else _unwrap(model)  # the EMA weights are the model when enabled
    save_classifier(final.state_dict(), spec, out / MODEL_SUBDIR)


def _restore_state(
    model: nn.Module, optimizer: Any, scheduler: Any, ema: Any = None, *, steps_per_epoch: int
) -> tuple[int, list[dict]]:
    """Resume from Ray's latest checkpoint if there is one: returns (next epoch, history so far).

    The LR schedule is not restored but rebuilt from this run's config and placed at the resumed
    step (timm schedulers are a function of the step), so ``--resume --set train.epochs=N`` with a
    larger N stretches the cosine over the new length instead of keeping the old one.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        history = json.loads((Path(d) / HISTORY_FILE).read_text())
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
    start = int(state["epoch"]) + 1
    scheduler.step_update(start * steps_per_epoch)
    logger.info("resuming after epoch %d (the last checkpoint)", start)
    return start, history


def _note_worker_event(path: str | None, rank: int, **fields: Any) -> None:
    if path:
        with open(path, "a") as f:  # one short line per write: appends from several workers interleave whole
            f.write(json.dumps({"rank": rank, "pid": os.getpid(), "time": time.time(), **fields}) + "\n")


def _epoch_metrics(
    epoch: int, tr: dict[str, float], va: dict[str, float], lr: float, seconds: float
) -> dict[str, Any]:
    n_tr, n_va = max(tr["count"], 1.0), max(va["count"], 1.0)
    return {
        "epoch": epoch,
        "train_loss": tr["loss_sum"] / n_tr,
        "train_accuracy": tr["correct"] / n_tr,
        "val_loss": va["loss_sum"] / n_va,
        "val_accuracy": va["correct"] / n_va,
        "lr": lr,
        "epoch_seconds": seconds,
        "train_images_per_s": tr["count"] / max(seconds, 1e-9),
        "finished_at": time.time(),  # wall clock: full epoch cycles (eval, report, checkpoint) in between
    }


def _build_model(config: dict[str, Any]) -> tuple[nn.Module, ModelSpec]:
    """The model (seeded identically on every rank) and the spec saved beside its weights."""
    seed_everything(config["seed"])  # identical init on every rank (DDP also broadcasts rank 0's)
    pretrained_file = Path(config["pretrained_file"]) if config.get("pretrained_file") else None
    model = create_classifier(
        config["model"], len(config["classes"]), in_chans=config["in_chans"],
        pretrained=config["pretrained"], pretrained_file=pretrained_file,
    )  # fmt: skip
    set_finetune_mode(model, config["finetune"])
    data_config = resolve_data_config(model, input_size=config["input_size"])
    spec = ModelSpec(
        config["model"], tuple(config["classes"]), config["in_chans"], data_config,
        task=config.get("task", "singlelabel"), tta=config.get("tta", "none"),
    )  # fmt: skip
    return model, spec


def cpu_has_native_bf16() -> bool:
    """oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX): autocast then speeds training up."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _amp_dtype(config: dict[str, Any], device: torch.device) -> torch.dtype | None:
    """GPU: bf16 where supported (auto), fp16 otherwise. CPU: bf16 autocast when the CPU has native
    bf16 (auto or bf16; ~1.9x faster steps of the small CNN on an AVX512-BF16 EPYC), else full precision."""
    amp = config["amp"]
    if amp == "off":
        return None
    if device.type != "cuda":
        return torch.bfloat16 if amp in ("auto", "bf16") and cpu_has_native_bf16() else None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _step_options(config: dict[str, Any], model: nn.Module, device: torch.device) -> StepOptions:
    from timm.data import Mixup
    from timm.utils import ModelEmaV3

    amp = _amp_dtype(config, device)
    mixup = None
    if config["mixup"] > 0 or config["cutmix"] > 0:
        mixup = Mixup(
            mixup_alpha=config["mixup"], cutmix_alpha=config["cutmix"],
            label_smoothing=config["label_smoothing"], num_classes=len(config["classes"]),
        )  # fmt: skip
    ema = ModelEmaV3(_unwrap(model), decay=config["ema_decay"]) if config["ema_decay"] else None
    return StepOptions(
        amp_dtype=amp,
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        mixup=mixup,
        ema=ema,
        channels_last=config["channels_last"],
    )


def _loss_fn(config: dict[str, Any], opts: StepOptions, train_targets: Any = ()) -> nn.Module:
    """The training loss; ``train_targets`` (the train split's class indices, or its multi-hot
    matrix) give the class counts that class weights and logit adjustment need."""
    targets = np.asarray(train_targets)
    if config.get("task") == "multilabel":
        return create_multilabel_loss(
            config.get("loss", "ce"), targets.sum(axis=0).tolist() if targets.size else [0] * len(config["classes"]),
            len(targets), weight_scheme=config.get("class_weights"), focal_gamma=config.get("focal_gamma", 2.0),
            asl=(config.get("asl_gamma_neg", 4.0), config.get("asl_gamma_pos", 1.0), config.get("asl_clip", 0.05)),
            label_smoothing=config["label_smoothing"],
        )  # fmt: skip
    if opts.mixup is not None:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()  # mixup already smoothed the targets
    counts = class_counts(targets.astype(np.int64), len(config["classes"])).tolist()
    return create_loss(
        config.get("loss", "ce"), counts, weight_scheme=config.get("class_weights"),
        focal_gamma=config.get("focal_gamma", 2.0), tau=config.get("logit_adjust_tau", 1.0),
        label_smoothing=config["label_smoothing"],
    )  # fmt: skip


def _should_stop(history: list[dict[str, Any]], patience: int | None) -> bool:
    """Early stopping: val_loss has not improved for ``patience`` epochs (same answer on every rank)."""
    if not patience or len(history) <= patience:
        return False
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    return len(history) - 1 - best >= patience


class ProgressFile:
    """Progress events as JSON lines in a file, read back in order: the channel of a lean local
    runtime, whose workers write to the driver's disk. It offers what the driver and rank 0 use of
    ``ray.util.queue.Queue`` (``put_nowait``, ``get``, ``empty``) without the queue's actor process:
    every Ray actor's main thread wakes ~100 times a second to check for signals (measured), and on a
    small machine each wake-up takes a core from training.
    """

    def __init__(self, path: str | Path, poll_s: float = 0.2) -> None:
        self.path, self.poll_s = str(path), poll_s
        self._offset, self._pending = 0, deque[dict[str, Any]]()

    def put_nowait(self, event: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:  # one writer (rank 0), whole lines
                f.write(json.dumps(event) + "\n")
        except OSError as e:  # a progress display never stops training
            logger.warning("progress event not written to %s: %s", self.path, e)

    def _read_new(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next read
        self._offset += len(complete)
        self._pending.extend(json.loads(line) for line in complete.splitlines() if line.strip())

    def get(self, block: bool = True, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._read_new()
            if self._pending:
                return self._pending.popleft()
            if not block or (deadline is not None and time.monotonic() >= deadline):
                raise queue_mod.Empty
            time.sleep(self.poll_s)

    def empty(self) -> bool:
        self._read_new()
        return not self._pending


class _ProgressSender:
    """Rank 0's progress events for the driver's display, cheap enough to leave on.

    Batch events are throttled to at most one per ``interval_s``, plus each epoch's last batch: a
    Ray queue's ``put`` waits for the queue actor (a fire-and-forget call would not: but the queue
    is an async actor, which runs calls out of order), and one per 2% of an epoch cost ~10% of the
    steps on 2 busy cores. ``queue``: a ``ray.util.queue.Queue`` or a ``ProgressFile``; None (ranks
    > 0): a no-op.
    """

    def __init__(self, queue: Any, interval_s: float = 0.5) -> None:
        self._queue, self._interval, self._last = queue, interval_s, float("-inf")

    def send(self, event: dict[str, Any]) -> None:
        if self._queue is not None:
            self._queue.put_nowait(event)

    def batch(self, epoch: int, i: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if i != total - 1 and now - self._last < self._interval:
            return
        self._last = now
        self.send({"type": "batch", "epoch": epoch, "batch": i + 1, "total": total, "loss": loss})


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the data-parallel training loop."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    set_deterministic(config["deterministic"])
    model, spec = _build_model(config)
    seed_everything(config["seed"], rank)
    train_loader, val_loader = _build_loaders(config, spec.data_config, world=world, rank=rank)
    balanced = isinstance(train_loader.sampler, BalancedDistributedSampler)
    train_loader = ray.train.torch.prepare_data_loader(train_loader, add_dist_sampler=not balanced)
    val_loader = ray.train.torch.prepare_data_loader(val_loader)
    device = ray.train.torch.get_device()
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    if config["compile"]:
        model = cast(nn.Module, torch.compile(model))
    optimizer, scheduler = _make_optimizer(model, config, len(train_loader))
    opts = _step_options(config, model, device)
    start_epoch, history = _restore_state(
        model, optimizer, scheduler, opts.ema, steps_per_epoch=len(train_loader)
    )
    events_file = config.get("worker_events")
    _note_worker_event(events_file, rank, phase="start", start_epoch=start_epoch)
    loss_fn = _loss_fn(config, opts, train_targets(train_loader.dataset))
    eval_loss = nn.BCEWithLogitsLoss() if config.get("task") == "multilabel" else nn.CrossEntropyLoss()
    progress = _ProgressSender(config.get("progress_queue") if rank == 0 else None)
    n_batches = len(train_loader)

    for epoch in range(start_epoch, config["epochs"]):
        sampler: Any = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # distributed or balanced: new draws each epoch
            sampler.set_epoch(epoch)

        def on_batch(i: int, loss: float, _epoch: int = epoch) -> None:
            if i == 1:
                _note_worker_event(events_file, rank, phase="mid_epoch", epoch=_epoch)
            progress.batch(_epoch, i, n_batches, loss)

        t0 = time.perf_counter()
        tr = train_one_epoch(
            model, train_loader, optimizer, loss_fn, device=device, scheduler=scheduler,
            start_step=epoch * n_batches, on_batch=on_batch, opts=opts,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        evaluated = opts.ema.module if opts.ema is not None else model
        va = eval_sums(evaluated, val_loader, eval_loss, device=device)
        tr = _allreduce({k: tr[k] for k in ("loss_sum", "correct", "count")}, device)
        va = _allreduce(va, device)
        metrics = _epoch_metrics(epoch, tr, va, optimizer.param_groups[0]["lr"], seconds)
        history.append(metrics)
        stop = _should_stop(history, config["early_stopping_patience"])
        metrics["stopped_early"] = stop
        progress.send({"type": "epoch", **metrics})
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                _save_state(Path(tmp), model, optimizer, scheduler, epoch, history, spec, opts.ema)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break


# --------------------------------------------------------------------------- driver


@functools.cache
def _lean_trainer_class() -> type:
    """``TorchTrainer`` without the two helper actors a lean local runtime (``LEAN_RUNTIME_ENV``)
    cannot use, each one more process polling while training on a small machine.

    - The placement-group cleaner removes a crashed controller's placement group on a long-lived
      cluster. It asks the state API whether the controller lives, once a second; with no dashboard
      every ask fails and logs a warning to the console, and the runtime's shutdown (which imgflow
      always does) removes every placement group anyway.
    - The datasets callback starts a ``DatasetManager`` actor to shard Ray Datasets; imgflow's
      loaders read the manifest themselves and the trainer gets no datasets.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            unused: tuple[type, ...] = (PlacementGroupCleanerCallback,)
            if not self.datasets:
                unused += (DatasetsCallback,)
            defaults = super()._create_default_callbacks()  # type: ignore[misc]  # Train V2 (default)
            return [cb for cb in defaults if not isinstance(cb, unused)]

    return LeanTorchTrainer


def _trainer_class() -> type:
    from ray.train.torch import TorchTrainer

    return _lean_trainer_class() if os.environ.get(LEAN_RUNTIME_ENV) == "1" else TorchTrainer


@dataclass(frozen=True)
class FitResult:
    model_dir: Path
    history: list[dict[str, Any]]
    run_path: str
    seconds: float


def _render_progress(events: Any, done: threading.Event, epochs: int, show: bool) -> None:
    """Drain the workers' progress queue into a rich display until ``done`` is set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not show, transient=False) as bar:
        ep_task = bar.add_task("epochs", total=epochs)
        batch_task = bar.add_task("batches", total=None)
        while True:
            try:
                ev = events.get(block=True, timeout=1.0)
            except (queue_mod.Empty, Exception):
                if done.is_set() and events.empty():
                    return
                continue
            if ev["type"] == "batch":
                bar.update(batch_task, completed=ev["batch"], total=ev["total"],
                           description=f"epoch {ev['epoch'] + 1} loss {ev['loss']:.3f}")  # fmt: skip
            else:
                bar.update(ep_task, completed=ev["epoch"] + 1)
                bar.console.log(
                    f"epoch {ev['epoch'] + 1}/{epochs}: train_loss {ev['train_loss']:.4f} "
                    f"val_loss {ev['val_loss']:.4f} val_acc {ev['val_accuracy']:.4f} ({ev['epoch_seconds']:.1f}s)"
                )


def _progress_channel(stack: contextlib.ExitStack) -> Any:
    """Where rank 0 sends progress: a ``ProgressFile`` in a lean local runtime (its workers share this
    disk; removed when ``stack`` closes), else a Ray queue (workers may be on other machines)."""
    if os.environ.get(LEAN_RUNTIME_ENV) == "1":
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="imgflow-progress-"))
        return ProgressFile(Path(tmp) / "progress.jsonl")
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


def fit(
    loop_config: dict[str, Any],
    *,
    workers: int,
    cpus_per_worker: int,
    use_gpu: bool | None,
    storage_path: Path,
    run_name: str,
    out_dir: Path,
    max_failures: int = 0,
    show_progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> FitResult:
    """Run ``train_loop_per_worker`` on a TorchTrainer; copy the final model into ``out_dir``.

    ``use_gpu=None`` means auto: GPUs when the cluster has them. Re-running with the same
    ``run_name`` and ``storage_path`` resumes from the latest checkpoint. ``callbacks`` go to the
    run config (e.g. Ray Tune's report callback when a sweep trial runs this trainer).
    """
    import ray.train

    gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    _check_resources(workers, cpus_per_worker, gpu)
    with contextlib.ExitStack() as stack:
        events = _progress_channel(stack)
        config = dict(loop_config, use_gpu=gpu, threads=cpus_per_worker, progress_queue=events,
                      worker_events=os.environ.get(WORKER_EVENTS_ENV))  # fmt: skip
        trainer = _trainer_class()(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=str(storage_path.resolve()),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                callbacks=list(callbacks) or None,
            ),
        )
        done = threading.Event()
        renderer = threading.Thread(
            target=_render_progress, args=(events, done, loop_config["epochs"], show_progress), daemon=True
        )
        renderer.start()
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        finally:
            done.set()
            renderer.join(timeout=10)
        seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        history = json.loads((Path(d) / HISTORY_FILE).read_text())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(Path(d) / MODEL_SUBDIR, out_dir)
    return FitResult(model_dir=out_dir, history=history, run_path=str(result.path), seconds=seconds)
