"""The training recipe: every choice a training run makes, resolved once on the driver.

:func:`build_recipe` turns the ``train`` params and the ingested data into a :class:`TrainRecipe`
(absolute paths, class names, numbers; no tensors), which is pickled to every Ray Train worker.
Workers read its attributes; no field has a default, so a recipe built without one fails at once
instead of a worker quietly training with a value restated somewhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.config import TrainConfig
from components.core.errors import ConfigError
from components.data.datasets import grey_dataset
from components.data.manifest import DataPaths, DatasetInfo, read_manifest, require_manifest
from components.model.models import shipped_weights_file
from components.task import get_task

_PATH_FIELDS = (
    "manifest",
    "data_dir",
    "cache_dir",
    "pretrained_file",
    "exclude_file",
    "teacher_dir",
    "init_dir",
)
_TUPLE_FIELDS = ("classes", "scale")


@dataclass(frozen=True)
class TrainRecipe:
    """How one model is trained; see ``TrainConfig`` for what each ``train.*`` value means."""

    # --- the data
    task: str
    """``singlelabel`` | ``multilabel`` (from dataset.json): ask ``get_task(recipe.task)``."""
    manifest: Path
    data_dir: Path
    classes: tuple[str, ...]
    exclude_file: Path | None
    """Train images to leave out (the audit's suspected label errors); None: keep every image."""
    sampler: str
    loader_workers: int
    cache: str
    cache_max_gb: float
    cache_dir: Path
    """Where decoded splits are kept (``<state_dir>/cache``)."""
    # --- the model
    model: str
    pretrained: bool
    pretrained_file: Path | None
    """The local weights file (explicit or shipped); None with ``pretrained``: timm's hub."""
    in_chans: int
    """Resolved: 1 for an all-grey dataset unless ``train.in_chans`` says otherwise."""
    input_size: int | None
    finetune: str
    tta: str
    # --- the schedule
    epochs: int
    batch_size: int
    eval_batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    warmup_epochs: int
    early_stopping_patience: int | None
    # --- augmentation
    hflip: float
    hflip_schedule: str
    scale: tuple[float, float]
    random_erasing: float
    augment: str
    """``none`` | ``trivialaugment`` | ``augmix`` (components.train.augment)."""
    progressive_resize: float
    """The first epoch's training side as a share of the input side (1.0: off; ``engine.progressive_scale``)."""
    progressive_until: float
    mixup: float
    cutmix: float
    label_smoothing: float
    # --- the loss
    loss: str
    class_weights: str | None
    focal_gamma: float
    logit_adjust_tau: float
    soft_labels_beta: float
    """``loss: soft_labels``: the tree's soft targets (``data_dir/taxonomy.json``, components.train.hierarchy_loss)."""
    asl_gamma_neg: float
    asl_gamma_pos: float
    asl_clip: float
    # --- knowledge distillation (``imgflow distill``; all None for plain training)
    teacher_dir: Path | None
    """The teacher's model folder (safetensors + spec), read by every worker (``components.train.distill``)."""
    distill_temperature: float | None
    distill_alpha: float | None
    # --- self-supervised init (``train.init: ssl:<run>``; init_dir None for a fresh model)
    init_dir: Path | None
    """The pretrained backbone's folder (``components.train.ssl``), loaded into the model on every worker."""
    init_probe_epochs: int
    init_backbone_lr_scale: float
    # --- snapshot ensemble (``train.ensemble.snapshots``; None for one model)
    snapshots: int | None
    """K cycles of a cyclic cosine schedule, the weights kept at each cycle's end (``components.train.snapshots``)."""
    # --- speed and reproducibility
    amp: str
    channels_last: bool
    compile: bool
    ema_decay: float | None
    deterministic: bool
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (paths as strings, tuples as lists): MLflow params, ``recipe.json``."""
        out = dataclasses.asdict(self)
        for key in _PATH_FIELDS:
            out[key] = None if out[key] is None else str(out[key])
        for key in _TUPLE_FIELDS:
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainRecipe:
        """The inverse of :meth:`to_dict`; a missing or unknown key is a TypeError."""
        typed = dict(values)
        for key in _PATH_FIELDS:
            if typed.get(key) is not None:
                typed[key] = Path(typed[key])
        for key in _TUPLE_FIELDS:
            if key in typed:
                typed[key] = tuple(typed[key])
        return cls(**typed)


def _check_soft_labels(data: DataPaths, *, multilabel: bool) -> None:
    """``train.loss=soft_labels`` needs one class per image and the data version's label tree."""
    from components.task.taxonomy import TAXONOMY_FILE

    if multilabel:
        raise ConfigError("train.loss=soft_labels is for single-label data (one leaf of the tree per image)")
    if not (data.root / TAXONOMY_FILE).is_file():
        raise ConfigError(
            f"train.loss=soft_labels needs a label tree, and {data.root / TAXONOMY_FILE} does not exist: "
            "ingest nested class folders, a CSV 'path' column or set ingest.taxonomy (see docs/label-trees.md)"
        )


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


@dataclass(frozen=True)
class Distillation:
    """What ``imgflow distill`` adds to a training run: the teacher's model folder and the KD loss's
    temperature and soft-target weight (``distill.temperature``, ``distill.alpha``)."""

    teacher_dir: Path
    temperature: float
    alpha: float


def build_recipe(
    cfg: TrainConfig,
    data: DataPaths,
    *,
    seed: int,
    weights_dir: Path,
    exclude_file: Path | None = None,
    distill: Distillation | None = None,
    init_dir: Path | None = None,
) -> TrainRecipe:
    """The recipe for ``cfg`` on the ingested ``data``; options the data's task does not support are a
    ConfigError here, before Ray starts. ``weights_dir`` caches converted pretrained weights; decoded
    splits go beside it (``<weights_dir>/../cache``). ``init_dir``: a self-supervised backbone to start
    from (``train.init``, resolved by the caller)."""
    require_manifest(data)
    info = DatasetInfo.load(data.dataset)
    get_task(info.task).check_train_options(cfg)
    if cfg.loss == "soft_labels":
        _check_soft_labels(data, multilabel=get_task(info.task).activation != "softmax")
    return TrainRecipe(
        task=info.task, manifest=data.manifest.resolve(), data_dir=data.root.resolve(),
        classes=tuple(info.classes), exclude_file=exclude_file.resolve() if exclude_file else None,
        sampler=cfg.sampler, loader_workers=cfg.loader_workers, cache=cfg.cache, cache_max_gb=cfg.cache_max_gb,
        cache_dir=(weights_dir.parent / "cache").resolve(),
        model=cfg.model, pretrained=cfg.pretrained,
        pretrained_file=resolve_pretrained_file(cfg, weights_dir=weights_dir),
        in_chans=resolve_in_chans(cfg, data), input_size=cfg.input_size, finetune=cfg.finetune, tta=cfg.tta,
        epochs=cfg.epochs, batch_size=cfg.batch_size, eval_batch_size=max(cfg.batch_size, 256),
        optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs,
        early_stopping_patience=cfg.early_stopping_patience,
        hflip=cfg.hflip, hflip_schedule=cfg.hflip_schedule, scale=cfg.scale, random_erasing=cfg.random_erasing, augment=cfg.augment, mixup=cfg.mixup,
        cutmix=cfg.cutmix, label_smoothing=cfg.label_smoothing,
        loss=cfg.loss, class_weights=cfg.class_weights, focal_gamma=cfg.focal_gamma,
        logit_adjust_tau=cfg.logit_adjust_tau, soft_labels_beta=cfg.soft_labels_beta,
        asl_gamma_neg=cfg.asl_gamma_neg,
        asl_gamma_pos=cfg.asl_gamma_pos, asl_clip=cfg.asl_clip,
        teacher_dir=distill.teacher_dir.resolve() if distill else None,
        distill_temperature=distill.temperature if distill else None,
        distill_alpha=distill.alpha if distill else None,
        init_dir=init_dir.resolve() if init_dir else None, init_probe_epochs=cfg.init_probe_epochs,
        init_backbone_lr_scale=cfg.init_backbone_lr_scale,
        amp=cfg.amp, channels_last=cfg.channels_last, compile=cfg.compile, ema_decay=cfg.ema_decay,
        deterministic=cfg.deterministic, seed=seed,
        snapshots=cfg.ensemble.snapshots if cfg.ensemble is not None else None,
        progressive_resize=cfg.progressive_resize, progressive_until=cfg.progressive_until,
    )  # fmt: skip
