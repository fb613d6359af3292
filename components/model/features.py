"""Features of a trained classifier at a named layer, for every timm model the trainer supports.

Three layers, chosen by name and recorded by every consumer:

- ``pre_logits``: what the classifier head sees just before its last linear layer
  (``forward_features`` then ``forward_head(pre_logits=True)``): pooled, possibly projected or
  normalised by the head. It collapses onto the training classes, which suits scores about those
  classes (Mahalanobis OOD) more than questions about new data.
- ``pooled_last``: the spatially pooled output of the last conv stage / last block, before any head:
  the global average of a CNN's feature map, or for a ViT the mean of its patch tokens with the
  prefix tokens (class, distillation, registers: ``model.num_prefix_tokens``) left out. Measured on
  Fashion-MNIST (issue 24) such a layer keeps more of what tells unseen classes apart than the head.
  The default (the audit, drift and OOD consumers read it).
- ``prev_stage_3x3``: the output of the stage (or block) BEFORE the last, average-pooled to a 3x3
  grid and flattened (C*9 values): timm's ``forward_intermediates(indices=[-2])``, which returns every
  family's map as NCHW (a ViT's patch-token grid reshaped, prefix tokens left out); models without it
  that keep their stages in ``model.stages`` (imgflow's own CNNs) are read by a hook on
  ``stages[-2]``. The default of few-shot classes (:data:`FEWSHOT_LAYER`): the last stage
  specialises to the training classes as training goes on, the one before keeps where things are.
  Measured on Fashion-MNIST with five classes held out of training (docs/few-shot.md): 5-way 5-shot
  SimpleShot 76.4% vs 57.6% on ``pooled_last`` and 74.8% for raw-pixel prototypes.

Extraction is batched, under ``no_grad`` in eval mode, and returns numpy float32 (N, D).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal, cast

import numpy as np
import torch
from torch import nn

from components.core.errors import ConfigError
from components.core.progress import progress_bar

Layer = Literal["pre_logits", "pooled_last", "prev_stage_3x3"]
LAYERS: tuple[str, ...] = ("pre_logits", "pooled_last", "prev_stage_3x3")
DEFAULT_LAYER: Layer = "pooled_last"
FEWSHOT_LAYER: Layer = "prev_stage_3x3"
"""The layer few-shot prototypes are built on unless told otherwise (``imgflow classes add``,
``imgflow evaluate --few-shot``)."""
GRID = 3
"""Side of the spatial grid ``prev_stage_3x3`` average-pools its map to."""


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


def prev_stage_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> (B, C', H', W') the map of the stage before the last (see the module docstring).

    A ConfigError naming the model when it has neither ``forward_intermediates`` nor ``stages``."""
    return stage_maps(model, x, (-2,))[1][0]


def stage_maps(
    model: nn.Module, x: torch.Tensor, indices: Sequence[int]
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """x (B, C, H, W) -> (``forward_features`` output when it came from the same pass, else None; the
    maps of the stages at negative ``indices`` (-2: the stage before the last), in the order asked).

    Models with ``forward_intermediates`` (timm's) give the maps from it; models with a ``stages``
    Sequential (imgflow's small nets) from forward hooks on those stages during one ``forward_features``
    pass. Else, or with fewer stages than asked, a ConfigError naming the model."""
    wanted = sorted(set(indices))
    intermediates = getattr(model, "forward_intermediates", None)
    if callable(intermediates):
        maps = intermediates(x, indices=wanted, intermediates_only=True, output_fmt="NCHW", stop_early=True)
        by_index = dict(zip(wanted, maps, strict=True))  # timm returns them in forward order
        return None, [cast(torch.Tensor, by_index[i]) for i in indices]
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential) and indices and len(stages) >= -min(indices) >= 2:
        feats, seen = _hooked_outputs(model, [stages[i] for i in indices], x)
        return feats, seen
    raise ConfigError(
        f"{type(model).__name__} has no forward_intermediates and no stages {sorted(indices)} to read: the "
        "embedding layer prev_stage_3x3 and the label-efficiency probes' fixed last+prev / last3 need them; "
        "use pooled_last (probe_layers: last)"
    )


def readable_stages(model: nn.Module) -> int:
    """How many stages' maps :func:`stage_maps` can read from ``model``, the last included: timm's
    ``feature_info`` entries for a model with ``forward_intermediates``, the ``stages`` of imgflow's
    small nets, else 1 (``forward_features`` alone)."""
    if callable(getattr(model, "forward_intermediates", None)):
        return max(1, len(getattr(model, "feature_info", None) or ()))
    stages = getattr(model, "stages", None)
    return len(stages) if isinstance(stages, nn.Sequential) else 1


def _hooked_outputs(
    model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(``forward_features`` output, each of ``modules``' last output) of one pass of ``model`` over x."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [
        m.register_forward_hook(lambda _m, _i, out, into=into: into.append(out))
        for m, into in zip(modules, seen, strict=True)
    ]
    try:
        feats = cast(Callable[[torch.Tensor], torch.Tensor], model.forward_features)(x)
    finally:
        for handle in handles:
            handle.remove()
    return feats, [outputs[-1] for outputs in seen]


def grid_pool(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * GRID * GRID): the map average-pooled to a GRID x GRID grid (a map smaller
    than the grid is repeated, so every model gives the same width for a given channel count)."""
    return nn.functional.adaptive_avg_pool2d(fmap, GRID).flatten(1)


def layer_features(model: nn.Module, x: torch.Tensor, *, layer: Layer) -> torch.Tensor:
    """x: (B, C, H, W) preprocessed images -> (B, D) features at ``layer`` (gradients kept: the
    caller decides; :func:`extract_features` runs it under ``no_grad``)."""
    return features_at(base_model(model), x, (layer,))[layer]


def features_at(net: nn.Module, x: torch.Tensor, layers: Sequence[Layer]) -> dict[str, torch.Tensor]:
    """x -> {layer: (B, D)} of the plain timm model ``net`` (:func:`base_model`), the pooled layers
    sharing one ``forward_features``; ``prev_stage_3x3`` is read by its own (partial) pass."""
    got: dict[str, torch.Tensor] = {}
    pooled = [layer for layer in layers if layer != "prev_stage_3x3"]
    if pooled:
        feats = cast(Callable[[torch.Tensor], torch.Tensor], net.forward_features)(x)
        for layer in pooled:
            if layer == "pooled_last":
                got[layer] = pool_feature_map(net, feats)
            else:
                forward_head = cast(Callable[..., torch.Tensor], net.forward_head)
                got[layer] = forward_head(feats, pre_logits=True).flatten(1)
    if "prev_stage_3x3" in layers:
        got["prev_stage_3x3"] = grid_pool(prev_stage_map(net, x))
    return got


def logits_and_features(
    model: nn.Module, x: torch.Tensor, *, layer: Layer
) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (logits (B, K), features (B, D) at ``layer``) of the plain timm model under ``model``,
    in one pass where the layer allows it (a second, partial pass for ``forward_intermediates``)."""
    net = base_model(model)
    forward_head = cast(Callable[..., torch.Tensor], net.forward_head)
    if layer == "prev_stage_3x3":
        stages = getattr(net, "stages", None)
        if not callable(getattr(net, "forward_intermediates", None)) and isinstance(stages, nn.Sequential):
            feats, (fmap,) = _hooked_outputs(net, [stages[-2]], x)
            return forward_head(feats), grid_pool(fmap)
        return net(x), layer_features(net, x, layer=layer)
    feats = cast(Callable[[torch.Tensor], torch.Tensor], net.forward_features)(x)
    if layer == "pooled_last":
        return forward_head(feats), pool_feature_map(net, feats)
    return forward_head(feats), forward_head(feats, pre_logits=True).flatten(1)


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
    return extract_layers(model, images, layers=(layer,), batch_size=batch_size, device=device, total=total,
                          description=description)[layer]  # fmt: skip


def extract_layers(
    model: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    layers: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    total: int | None = None,
    description: str = "features",
) -> dict[str, np.ndarray]:
    """Features at each of ``layers`` of every image, from ONE pass over the images: {layer: (N, D)}.

    ``pre_logits`` and ``pooled_last`` share one ``forward_features`` per batch; ``prev_stage_3x3``
    is read by its own (partial) pass. The batches run in channels-last memory (oneDNN's fast path on
    CPU: ~1.6x per image for imgflow's residual net, one thread, measured); on the CPU through a
    batch-norm-folded copy of the model, whole batches side by side (~1.3x more on 2 cores:
    :mod:`components.model.inference`). ``model`` is left as it was. Values equal the plain
    contiguous-format ones to float rounding (~1e-5).
    """
    checked = tuple(dict.fromkeys(check_layer(layer) for layer in layers))
    if not checked:
        raise ConfigError("extract_layers: name at least one layer")
    net = base_model(model)
    dev = torch.device(device)
    n = len(images) if isinstance(images, torch.Tensor) else (total or 0)
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in checked}
    with progress_bar(n, description=description) as advance:
        for feats in _feature_batches(net, _batches(images, batch_size), checked, dev):
            for layer, rows in feats.items():
                out[layer].append(rows)
            advance(len(rows))
    if not out[checked[0]]:
        return {
            layer: np.zeros((0, _empty_width(net, images, layer, dev)), dtype=np.float32) for layer in checked
        }
    return {layer: np.concatenate(rows).astype(np.float32, copy=False) for layer, rows in out.items()}


def _feature_batches(
    net: nn.Module, batches: Iterable[torch.Tensor], layers: Sequence[Layer], dev: torch.device
) -> Iterator[dict[str, np.ndarray]]:
    """{layer: (B, D)} per batch, in order. On the CPU a batch-norm-folded channels-last copy runs the
    batches (side by side for the pooled layers: :mod:`components.model.inference`; ``net`` is left as
    it was); elsewhere
    ``net`` runs them one by one in channels-last memory (its train/eval mode and memory format
    restored after)."""

    def run(m: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
        batch = x.to(dev)
        if batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return {layer: f.float().cpu().numpy() for layer, f in features_at(m, batch, layers).items()}

    if dev.type == "cpu":
        from components.model.inference import prepare_for_inference, side_by_side_iter, unit_batches

        fast = prepare_for_inference(net).to(dev)
        if "prev_stage_3x3" in layers:
            # Read through a forward hook on the shared copy where a model has no forward_intermediates:
            # a hook sees every thread's calls, so these batches go one at a time.
            yield from (run(fast, x) for x in batches)
            return
        yield from side_by_side_iter(lambda x: run(fast, x), unit_batches(batches))
        return
    was_training = net.training
    net.eval().to(dev)
    try:
        # The layout change first, outside inference mode: weights converted inside it would become
        # inference tensors, which a later training step of the same model could not use.
        with _channels_last(net):
            yield from (run(net, x) for x in batches)
    finally:
        net.train(was_training)


@contextlib.contextmanager
def _channels_last(net: nn.Module) -> Iterator[None]:
    """The model's 4-D weights in channels-last memory for the duration, then back to contiguous
    (only when they were contiguous before: a model already in channels-last stays so)."""
    params = [p for p in net.parameters() if p.ndim == 4]
    if torch.is_inference_mode_enabled() or not params or not all(p.is_contiguous() for p in params):
        yield  # a caller's inference mode: converting would turn the weights into inference tensors
        return
    net.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        net.to(memory_format=torch.contiguous_format)


def _empty_width(
    net: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], layer: Layer, dev: torch.device
) -> int:
    """D for zero images: one blank image of the input's shape through the model (0 when the
    input is an empty iterable, whose shape is unknown)."""
    if not isinstance(images, torch.Tensor):
        return 0
    was_training = net.training
    try:
        with torch.no_grad():
            probe = torch.zeros((1, *images.shape[1:]), dtype=images.dtype, device=dev)
            return int(layer_features(net.eval(), probe, layer=layer).shape[1])
    finally:
        net.train(was_training)
