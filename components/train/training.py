"""Training: turns the train config + the ingested data into a Ray Train run and a model folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.config import TrainConfig
from components.core.errors import ConfigError
from components.data.datasets import grey_dataset
from components.data.manifest import DataPaths, DatasetInfo, read_manifest, require_manifest
from components.model.models import shipped_weights_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    history: list[dict[str, Any]]
    final: dict[str, Any]
    seconds: float
    ray_run: str


def resolve_in_chans(cfg: TrainConfig, data: DataPaths) -> int:
    """1 for an all-grey dataset with no explicit ``train.in_chans``, else 3 (or the explicit value)."""
    if cfg.in_chans is not None:
        return cfg.in_chans
    return 1 if grey_dataset(read_manifest(data.manifest)) else 3


def resolve_pretrained_file(cfg: TrainConfig, *, weights_dir: Path) -> Path | None:
    """The local weights file for ``train.pretrained``: explicit, shipped in a package, or None (hub)."""
    if not cfg.pretrained:
        return None
    if cfg.pretrained_file is not None:
        if not cfg.pretrained_file.is_file():
            raise ConfigError(f"train.pretrained_file {cfg.pretrained_file} does not exist")
        return cfg.pretrained_file.resolve()
    shipped = shipped_weights_file(cfg.model, cache_dir=weights_dir)
    return shipped.resolve() if shipped else None


def check_task_options(cfg: TrainConfig, task: str) -> None:
    """Options that only one task supports get a clear ConfigError (the task comes from the data)."""
    if task == "multilabel":
        wrong = {
            "loss=logit_adjusted": cfg.loss == "logit_adjusted",
            "sampler=balanced": cfg.sampler == "balanced",
            "mixup/cutmix": cfg.mixup > 0 or cfg.cutmix > 0,
            "class_weights=effective": cfg.class_weights == "effective",
        }
        if bad := [k for k, v in wrong.items() if v]:
            raise ConfigError(
                f"the dataset is multi-label but train.{', train.'.join(bad)} is single-label only: use "
                "loss ce|focal|asymmetric, class_weights null|inverse|sqrt_inverse, sampler random"
            )
    elif cfg.loss == "asymmetric":
        raise ConfigError(
            "train.loss=asymmetric is for multi-label datasets: use ce, focal or logit_adjusted"
        )


def loop_config(
    cfg: TrainConfig, data: DataPaths, *, seed: int, weights_dir: Path, exclude_file: Path | None = None
) -> dict[str, Any]:
    """The plain dict each Ray worker receives (paths and numbers only, no tensors)."""
    require_manifest(data)
    info = DatasetInfo.load(data.dataset)
    check_task_options(cfg, info.task)
    pretrained_file = resolve_pretrained_file(cfg, weights_dir=weights_dir)
    return {
        "task": info.task,
        "manifest": str(data.manifest.resolve()),
        "data_dir": str(data.root.resolve()),
        "classes": list(info.classes),
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        "in_chans": resolve_in_chans(cfg, data),
        "input_size": cfg.input_size,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "eval_batch_size": max(cfg.batch_size, 256),
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "optimizer": cfg.optimizer,
        "warmup_epochs": cfg.warmup_epochs,
        "label_smoothing": cfg.label_smoothing,
        "hflip": cfg.hflip,
        "scale": list(cfg.scale),
        "random_erasing": cfg.random_erasing,
        "tta": cfg.tta,
        "loader_workers": cfg.loader_workers,
        "cache": cfg.cache,
        "cache_max_gb": cfg.cache_max_gb,
        "cache_dir": str((weights_dir.parent / "cache").resolve()),
        "deterministic": cfg.deterministic,
        "seed": seed,
        "pretrained_file": str(pretrained_file) if pretrained_file else None,
        "finetune": cfg.finetune,
        "amp": cfg.amp,
        "channels_last": cfg.channels_last,
        "compile": cfg.compile,
        "ema_decay": cfg.ema_decay,
        "mixup": cfg.mixup,
        "cutmix": cfg.cutmix,
        "early_stopping_patience": cfg.early_stopping_patience,
        "loss": cfg.loss,
        "focal_gamma": cfg.focal_gamma,
        "logit_adjust_tau": cfg.logit_adjust_tau,
        "asl_gamma_neg": cfg.asl_gamma_neg,
        "asl_gamma_pos": cfg.asl_gamma_pos,
        "asl_clip": cfg.asl_clip,
        "class_weights": cfg.class_weights,
        "sampler": cfg.sampler,
        "exclude_file": str(exclude_file.resolve()) if exclude_file else None,
    }


def train(
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
) -> TrainResult:
    """Train with Ray Train; writes ``out_dir/model/`` (safetensors + spec) and ``history.json``.

    ``weights_dir`` caches converted pretrained weights (shipped packages, see ``models``);
    ``exclude_file`` lists train images to leave out (the audit's suspected label errors).
    """
    from components.train import ray_train

    config = loop_config(cfg, data, seed=seed, weights_dir=weights_dir, exclude_file=exclude_file)
    use_gpu = {"auto": None, "true": True, "false": False}[cfg.use_gpu]
    started = ray_train.init_ray()
    try:
        fit = ray_train.fit(
            config,
            workers=cfg.workers,
            cpus_per_worker=cfg.cpus_per_worker,
            use_gpu=use_gpu,
            storage_path=storage_path,
            run_name=run_name,
            out_dir=out_dir / "model",
            max_failures=cfg.max_failures,
            show_progress=show_progress,
        )
    finally:
        if started:
            ray_train.shutdown_ray()
    (out_dir / "history.json").write_text(json.dumps(fit.history, indent=2) + "\n")
    final = dict(fit.history[-1]) if fit.history else {}
    logger.info("trained %s in %.1fs: %s", cfg.model, fit.seconds, final)
    return TrainResult(
        model_dir=fit.model_dir, history=fit.history, final=final, seconds=fit.seconds, ray_run=fit.run_path
    )
