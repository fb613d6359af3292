"""The plain-PyTorch side of a :class:`~components.train.recipe.TrainRecipe`: the model, data
loaders, optimiser and LR schedule, training loss, step options (AMP, mixup, EMA), the epoch record
and the checkpoint files. No Ray here: the per-worker loop (:mod:`components.train.worker`) asks
for these, and single-process runs (tests, benchmarks) can too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.core.errors import ConfigError
from components.data.datasets import (
    InMemoryDataset,
    ManifestDataset,
    alternating_flips,
    batch_collate,
    cached_split_at,
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
from components.task import get_task
from components.train.augment import attach as attach_augment
from components.train.engine import StepOptions, progressive_scale, seed_everything, worker_init_fn
from components.train.imbalance import BalancedDistributedSampler, LossChoice, create_training_loss
from components.train.recipe import TrainRecipe

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
MODEL_SUBDIR = "model"
"""A checkpoint folder: ``STATE_FILE`` (model, optimiser, scheduler, EMA, epoch), ``HISTORY_FILE``
(the epochs so far) and ``MODEL_SUBDIR`` (the servable model: safetensors + spec)."""


# --------------------------------------------------------------------------- model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, nn.Module) else model


def build_model(recipe: TrainRecipe) -> tuple[nn.Module, ModelSpec]:
    """The model (seeded identically on every rank) and the spec saved beside its weights."""
    seed_everything(recipe.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model = create_classifier(
        recipe.model, len(recipe.classes), in_chans=recipe.in_chans,
        pretrained=recipe.pretrained, pretrained_file=recipe.pretrained_file,
    )  # fmt: skip
    if recipe.init_dir is not None:  # train.init: ssl:<run>: the pretrained backbone, a fresh head
        from components.train.ssl import load_backbone_into

        load_backbone_into(model, recipe.init_dir)
    set_finetune_mode(model, recipe.finetune)
    data_config = resolve_data_config(model, input_size=recipe.input_size)
    spec = ModelSpec(
        recipe.model, recipe.classes, recipe.in_chans, data_config, task=get_task(recipe.task), tta=recipe.tta
    )
    return model, spec


# --------------------------------------------------------------------------- data


def train_targets(ds: Dataset) -> np.ndarray:
    """Targets of an InMemoryDataset or ManifestDataset: class indices (N,), or (N, K) multi-hot."""
    return np.asarray(ds.targets)  # type: ignore[attr-defined]


def use_cache(rows: int, in_chans: int, side: int, *, cache: str, max_gb: float) -> bool:
    """Decode the split once (``train.cache``): ``auto`` when ``rows`` images of in_chans x side x
    side fit in ``max_gb``; ``memory`` insists (a ConfigError when they do not fit); ``off`` never."""
    if cache == "off":
        return False
    fits = decoded_size(rows, in_chans, side) <= max_gb * 2**30
    if cache == "memory" and not fits:
        raise ConfigError(
            f"train.cache=memory but {rows} decoded images of {in_chans}x{side}x{side} exceed "
            f"train.cache_max_gb={max_gb}: raise it or set train.cache=auto"
        )
    return fits


def split_dataset(
    manifest: Any, split: str, recipe: TrainRecipe, data_config: dict[str, Any], *, train: bool
) -> Dataset:
    """One split as a Dataset: decoded once (``InMemoryDataset``) when the cache allows, else per item."""
    rows = split_rows(manifest, split)
    paths = [recipe.data_dir / p for p in rows["path"]]
    targets = encode_targets(rows, recipe.classes, recipe.task)
    in_chans, side = data_config["input_size"][0], data_config["input_size"][-1]
    mode = image_mode(recipe.in_chans)
    if use_cache(len(paths), in_chans, side, cache=recipe.cache, max_gb=recipe.cache_max_gb):
        images = cached_split_at(
            paths,
            split=split,
            data_config=data_config,
            mode=mode,
            cache_dir=recipe.cache_dir,
            data_dir=recipe.data_dir,
        )
        return InMemoryDataset(
            images, targets, mean=data_config["mean"], std=data_config["std"], train=train,
            hflip=recipe.hflip, scale=recipe.scale, paths=paths, random_erasing=recipe.random_erasing,
            flip_base=epoch_flips(recipe, len(paths)) if train else None,
        )  # fmt: skip
    flips = epoch_flips(recipe, len(paths)) if train else None
    tf = create_image_transform(
        data_config, is_training=train, hflip=recipe.hflip if flips is None else 0.0, scale=recipe.scale,
        random_erasing=recipe.random_erasing,
    )  # fmt: skip
    return ManifestDataset(paths, targets, transform=tf, mode=mode, flip_base=flips)


def epoch_flips(recipe: TrainRecipe, n: int) -> torch.Tensor | None:
    """The ``flip_base`` of a training split of ``n`` images: ``alternating_flips`` under
    ``train.hflip_schedule: alternate`` (seeded by the recipe), None for random flips or no flips
    (``train.hflip`` 0: nothing is mirrored in any epoch)."""
    if recipe.hflip_schedule != "alternate" or recipe.hflip <= 0:
        return None
    return alternating_flips(n, recipe.hflip, recipe.seed)


def build_loaders(
    recipe: TrainRecipe,
    data_config: dict[str, Any],
    *,
    world: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders. ``train.sampler=balanced``: the train loader draws classes equally
    often, already sharded over ``world`` ranks (so Ray must not add its own sampler)."""
    manifest = read_manifest(recipe.manifest)
    if recipe.exclude_file is not None:
        excluded = read_exclusions(recipe.exclude_file)
        manifest = manifest[~((manifest["split"] == "train") & manifest["image_id"].isin(excluded))]
    train_ds = split_dataset(manifest, "train", recipe, data_config, train=True)
    train_ds = attach_augment(train_ds, recipe.augment, mean=data_config["mean"], std=data_config["std"])
    val_ds = split_dataset(manifest, "val", recipe, data_config, train=False)
    g = torch.Generator().manual_seed(recipe.seed)

    def loader(ds: Dataset, **kw: Any) -> DataLoader:
        collate = batch_collate if isinstance(ds, InMemoryDataset) else None
        return DataLoader(
            ds, num_workers=recipe.loader_workers, worker_init_fn=worker_init_fn,
            pin_memory=pin_memory, collate_fn=collate, **kw,
        )  # fmt: skip

    if recipe.sampler == "balanced":
        sampler = BalancedDistributedSampler(
            train_targets(train_ds), num_replicas=world, rank=rank, seed=recipe.seed
        )
        train_loader = loader(train_ds, batch_size=recipe.batch_size, sampler=sampler)
    else:
        train_loader = loader(train_ds, batch_size=recipe.batch_size, shuffle=True, generator=g)
    val_loader = loader(val_ds, batch_size=recipe.eval_batch_size, shuffle=False)
    return train_loader, val_loader


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Tell a training loader's sampler (distributed or balanced: new draws each epoch) and dataset
    (``train.hflip_schedule: alternate``) which epoch starts."""
    for part in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        set_epoch = getattr(part, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


# --------------------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, recipe: TrainRecipe, steps_per_epoch: int) -> tuple[Any, Any]:
    """timm's optimiser and a per-step cosine schedule (warm-up from lr/100, floor lr/100)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from components.train.ssl_init import LpFtSchedule, lpft_param_groups

    opt_kw: dict[str, Any] = {"momentum": 0.9} if recipe.optimizer == "sgd" else {}
    params: Any = model
    if recipe.init_dir is not None:  # LP-FT: the backbone in groups of its own (components.train.ssl_init)
        params = lpft_param_groups(model, weight_decay=recipe.weight_decay)
    optimizer = create_optimizer_v2(
        params, opt=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay, **opt_kw
    )
    total = max(1, recipe.epochs * steps_per_epoch)
    cycles = recipe.snapshots or 1  # a snapshot ensemble restarts the cosine K times (warm restarts)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total // cycles),
        cycle_limit=cycles,
        lr_min=recipe.lr * 1e-2,
        warmup_t=recipe.warmup_epochs * steps_per_epoch,
        warmup_lr_init=recipe.lr * 1e-2,
        t_in_epochs=False,
    )
    if recipe.init_dir is not None:
        return optimizer, LpFtSchedule(
            scheduler, optimizer, probe_steps=recipe.init_probe_epochs * steps_per_epoch,
            backbone_scale=recipe.init_backbone_lr_scale,
        )  # fmt: skip
    return optimizer, scheduler


def cpu_has_native_bf16() -> bool:
    """oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX): autocast then speeds training up."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` on ``device``. GPU: bf16 where supported (auto), fp16 otherwise. CPU: bf16
    autocast when the CPU has native bf16 (auto or bf16; ~1.9x faster steps of the small CNN on an
    AVX512-BF16 EPYC), else full precision."""
    if amp == "off":
        return None
    if device.type != "cuda":
        return torch.bfloat16 if amp in ("auto", "bf16") and cpu_has_native_bf16() else None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def build_step_options(recipe: TrainRecipe, model: nn.Module, device: torch.device) -> StepOptions:
    """Mixed precision, mixup/cutmix and the weight EMA of ``recipe`` (``model``: the prepared one)."""
    from timm.data import Mixup
    from timm.utils import ModelEmaV3

    amp = amp_dtype(recipe.amp, device)
    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
            label_smoothing=recipe.label_smoothing, num_classes=len(recipe.classes),
        )  # fmt: skip
    ema = ModelEmaV3(unwrap(model), decay=recipe.ema_decay) if recipe.ema_decay else None
    return StepOptions(
        amp_dtype=amp,
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        mixup=mixup,
        ema=ema,
        channels_last=recipe.channels_last,
    )


def build_train_loss(recipe: TrainRecipe, opts: StepOptions, targets: Any = ()) -> nn.Module:
    """The training loss of the recipe's task; ``targets`` (the train split's class indices, or its
    multi-hot matrix) give the class counts that class weights and logit adjustment need."""
    choice = LossChoice(
        kind=recipe.loss, class_weights=recipe.class_weights,  # type: ignore[arg-type]  # validated by TrainConfig
        focal_gamma=recipe.focal_gamma, logit_adjust_tau=recipe.logit_adjust_tau,
        asl=(recipe.asl_gamma_neg, recipe.asl_gamma_pos, recipe.asl_clip), label_smoothing=recipe.label_smoothing,
    )  # fmt: skip
    activation = get_task(recipe.task).activation
    if recipe.loss == "soft_labels":  # a label tree's soft targets (build_recipe checked the tree exists)
        from components.task.taxonomy import Taxonomy
        from components.train.hierarchy_loss import create_soft_label_loss

        tree = Taxonomy.load(recipe.data_dir / "taxonomy.json")
        return create_soft_label_loss(tree, beta=recipe.soft_labels_beta)
    return create_training_loss(activation, choice, targets, len(recipe.classes), soft=opts.mixup is not None)


# --------------------------------------------------------------------------- epochs and checkpoints


def input_scale(recipe: TrainRecipe, epoch: int) -> float:
    """The share of the input side epoch ``epoch`` trains at (progressive resizing; 1.0 when off)."""
    return progressive_scale(
        epoch, recipe.epochs, start=recipe.progressive_resize, until=recipe.progressive_until
    )


def epoch_metrics(
    epoch: int,
    tr: dict[str, float],
    va: dict[str, float],
    lr: float,
    seconds: float,
    input_scale: float = 1.0,
) -> dict[str, Any]:
    """One epoch's record (history.json, Ray's report, MLflow) from summed train/val counters;
    ``input_scale``: the share of the input side the epoch trained at (progressive resizing)."""
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
        "input_scale": input_scale,
    }


def should_stop(history: list[dict[str, Any]], patience: int | None) -> bool:
    """Early stopping: val_loss has not improved for ``patience`` epochs (same answer on every rank)."""
    if not patience or len(history) <= patience:
        return False
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    return len(history) - 1 - best >= patience


def save_state(out: Path, model: nn.Module, optimizer: Any, scheduler: Any, epoch: int, history: list[dict],
               spec: ModelSpec, ema: Any = None) -> None:  # fmt: skip
    """Write a checkpoint folder into ``out`` (see ``MODEL_SUBDIR``)."""
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
    state["scheduler"] = scheduler.state_dict()
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    torch.save(state, out / STATE_FILE)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    final = ema.module if ema is not None else unwrap(model)  # the EMA weights are the model when enabled
    save_classifier(final.state_dict(), spec, out / MODEL_SUBDIR)


def restore_state(
    checkpoint: Path,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    ema: Any = None,
    *,
    steps_per_epoch: int,
) -> tuple[int, list[dict]]:
    """Load a checkpoint folder written by :func:`save_state`: returns (next epoch, history so far).

    The LR schedule is not restored but rebuilt from this run's recipe and placed at the resumed
    step (timm schedulers are a function of the step), so ``--resume --set train.epochs=N`` with a
    larger N stretches the cosine over the new length instead of keeping the old one.
    """
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    history = json.loads((checkpoint / HISTORY_FILE).read_text())
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
    start = int(state["epoch"]) + 1
    scheduler.step_update(start * steps_per_epoch)
    return start, history


def read_history(checkpoint: Path) -> list[dict[str, Any]]:
    """The epochs recorded in a checkpoint folder."""
    return list(json.loads((checkpoint / HISTORY_FILE).read_text()))
