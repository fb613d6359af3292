"""Features of a trained classifier at a named layer, for every timm model the trainer supports.

Two layers, chosen by name and recorded by every consumer:

- ``pre_logits``: what the classifier head sees just before its last linear layer
  (``forward_features`` then ``forward_head(pre_logits=True)``): pooled, possibly projected or
  normalised by the head. It collapses onto the training classes, which suits scores about those
  classes (Mahalanobis OOD) more than questions about new data.
- ``pooled_last``: the spatially pooled output of the last conv stage / last block, before any head:
  the global average of a CNN's feature map, or for a ViT the mean of its patch tokens with the
  prefix tokens (class, distillation, registers: ``model.num_prefix_tokens``) left out. Measured on
  Fashion-MNIST (issue 24) such a layer keeps more of what tells unseen classes apart than the head.

Extraction is batched, under ``no_grad`` in eval mode, and returns numpy float32 (N, D).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal, cast

import numpy as np
import torch
from torch import nn

from components.core.errors import ConfigError
from components.core.progress import progress_bar

Layer = Literal["pre_logits", "pooled_last"]
LAYERS: tuple[str, ...] = ("pre_logits", "pooled_last")
DEFAULT_LAYER: Layer = "pooled_last"


def check_layer(layer: str) -> Layer:
    """``layer`` if it is a known layer name, else a ConfigError listing the names."""
    if layer not in LAYERS:
        raise ConfigError(f"unknown feature layer {layer!r}: use one of {', '.join(LAYERS)}")
    return cast(Layer, layer)


def base_model(model: nn.Module) -> nn.Module:
    """The timm model under imgflow's wrappers (``FlipTTA`` keeps it as ``.model``): features are
    read from the plain model, one view of each image."""
    while not hasattr(model, "forward_features") and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # type: ignore[assignment]
    if not hasattr(model, "forward_features"):
        raise ConfigError(
            f"{type(model).__name__} is not a timm model (no forward_features): no named layers"
        )
    return model


def pool_feature_map(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """``forward_features`` output -> (B, D): the spatial mean of a map, the mean of patch tokens.

    feats: (B, C, H, W) for CNNs, (B, H, W, C) for models whose ``output_fmt`` is NHWC (Swin),
    (B, N, D) for token models (ViT, DeiT, Mixer), whose first ``num_prefix_tokens`` are skipped.
    """
    if feats.ndim == 4:
        nhwc = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
        return feats.mean(dim=(1, 2) if nhwc else (2, 3))
    if feats.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        return feats[:, prefix:].mean(dim=1)
    if feats.ndim == 2:
        return feats
    raise ConfigError(f"{type(model).__name__}: cannot pool features of shape {tuple(feats.shape)}")


def layer_features(model: nn.Module, x: torch.Tensor, *, layer: Layer) -> torch.Tensor:
    """x: (B, C, H, W) preprocessed images -> (B, D) features at ``layer`` (gradients kept: the
    caller decides; :func:`extract_features` runs it under ``no_grad``)."""
    model = base_model(model)
    forward_features = cast(Callable[[torch.Tensor], torch.Tensor], model.forward_features)
    feats = forward_features(x)
    if layer == "pooled_last":
        return pool_feature_map(model, feats)
    forward_head = cast(Callable[..., torch.Tensor], model.forward_head)
    return forward_head(feats, pre_logits=True).flatten(1)


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
        return
    for batch in images:
        # A DataLoader over (image, target) pairs yields [x, y]; take the images.
        yield batch[0] if isinstance(batch, list | tuple) else batch


def extract_features(
    model: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    layer: str = DEFAULT_LAYER,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    total: int | None = None,
    description: str = "features",
) -> np.ndarray:
    """Features at ``layer`` of every image: (N, D) float32.

    images: a preprocessed (N, C, H, W) tensor (cut into ``batch_size`` batches), or an iterable of
    such batches (or of ``(x, y)`` pairs, as a DataLoader yields). ``total``: the number of images,
    for the progress bar when ``images`` is an iterable (a tensor knows its own).
    The model is put in eval mode (batch norm and dropout as at inference) and restored after.
    """
    checked = check_layer(layer)
    net = base_model(model)
    dev = torch.device(device)
    was_training = net.training
    net.eval().to(dev)
    n = len(images) if isinstance(images, torch.Tensor) else (total or 0)
    out: list[np.ndarray] = []
    try:
        with torch.no_grad(), progress_bar(n, description=description) as advance:
            for x in _batches(images, batch_size):
                feats = layer_features(net, x.to(dev), layer=checked)
                out.append(feats.float().cpu().numpy())
                advance(len(x))
        if not out:
            return np.zeros((0, _empty_width(net, images, checked, dev)), dtype=np.float32)
    finally:
        net.train(was_training)
    return np.concatenate(out).astype(np.float32, copy=False)


def _empty_width(
    net: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], layer: Layer, dev: torch.device
) -> int:
    """D for zero images: one blank image of the input's shape through the model (0 when the
    input is an empty iterable, whose shape is unknown)."""
    if not isinstance(images, torch.Tensor):
        return 0
    with torch.no_grad():
        probe = torch.zeros((1, *images.shape[1:]), dtype=images.dtype, device=dev)
        return int(layer_features(net, probe, layer=layer).shape[1])
