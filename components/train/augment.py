"""Photometric training augmentation (``train.augment``): TrivialAugment or AugMix over photometric ops.

Why: a model trained with crop + flip only collapses when the lighting changes (the robustness sweep's
contrast and brightness families). TrivialAugment (Muller & Hutter 2021: one op per image, uniform
magnitude over a wide range) and AugMix (Hendrycks et al. 2020: a convex mix of short op chains, mixed
again with the original) are the standard answers; both are applied here to whole batches of tensors,
every image with its own op and magnitude, because imgflow's in-memory loader augments batches (a
per-image PIL transform would cost more than the small CNN's training step).

Only photometric ops: geometry is the crop and flip's job. Grey-safe: the colour op (saturation) runs
on 3-channel images only; every other op treats each channel alike, so a 1-channel image stays one.
AugMix here is its image mixing without the Jensen-Shannon consistency loss (timm's ``augmix`` transform
without the split-batch loss).

Ops (x in [0, 1], magnitude m drawn per image from TrivialAugment-Wide's ranges): identity, brightness
(x * f), contrast (mean + f * (x - mean)), sharpness (blend with a 3x3 smoothing, as PIL), posterize
(2..8 bits), solarize (invert above a threshold), autocontrast (per-image min/max stretch), equalize
(per-image histogram equalisation by rank), colour (RGB only: blend with the grey image), with f in
[0.01, 1.99].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F

from components.core.errors import ConfigError

AUGMENTS = ("none", "trivialaugment", "augmix")
"""Values of ``train.augment``."""

_GREY_OPS = ("identity", "brightness", "contrast", "sharpness", "posterize", "solarize", "autocontrast",
             "equalize")  # fmt: skip
_COLOUR_OPS = ("colour",)
AUGMIX_WIDTH = 3
"""AugMix: op chains mixed per image."""
AUGMIX_MAX_DEPTH = 3
"""AugMix: ops per chain, 1..this."""


def ops_for(channels: int) -> tuple[str, ...]:
    """The ops drawn for images of ``channels`` channels (colour ops only for 3)."""
    return _GREY_OPS + (_COLOUR_OPS if channels == 3 else ())


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luminance (ITU-R 601, as PIL's ``L``) of (N, C, H, W)."""
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``other + f * (x - other)`` (f per image), clipped to [0, 1]."""
    return (other + f.view(-1, 1, 1, 1) * (x - other)).clamp(0, 1)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, the rest 1, / 13) per channel, the border kept as it is."""
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5.0
    k = (k / k.sum()).expand(c, 1, 3, 3)
    out = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    out[..., 0, :], out[..., -1, :], out[..., :, 0], out[..., :, -1] = (
        x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1],
    )  # fmt: skip
    return out


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel: each pixel's value becomes its rank's quantile."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    ranks = flat.argsort(-1).argsort(-1).to(x.dtype)
    return (ranks / max(h * w - 1, 1)).reshape(n, c, h, w)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 1e-6, (x - lo) / span.clamp(min=1e-6), x)


def apply_op(x: torch.Tensor, op: str, m: torch.Tensor) -> torch.Tensor:
    """``op`` on a batch ``x`` (N, C, H, W) in [0, 1] at magnitudes ``m`` (N,) in [0, 1]."""
    f = 0.01 + 1.98 * m  # enhance factors of TrivialAugment-Wide: [0.01, 1.99], 1 = unchanged
    if op == "identity":
        return x
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), f)
    if op == "contrast":
        return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), f)
    if op == "sharpness":
        return _blend(x, _smooth(x), f)
    if op == "colour":
        return _blend(x, _grey(x).expand_as(x), f)
    if op == "posterize":
        bits = (8 - torch.round(m * 6)).view(-1, 1, 1, 1)  # 2..8 bits kept
        step = torch.pow(2.0, 8 - bits)
        return torch.floor(x * 255 / step) * step / 255
    if op == "solarize":
        threshold = (1 - m).view(-1, 1, 1, 1)  # m = 0: nothing inverted
        return torch.where(x >= threshold, 1 - x, x)
    if op == "autocontrast":
        return _autocontrast(x)
    if op == "equalize":
        return _equalize(x)
    raise ValueError(f"unknown photometric op {op!r}")


def _per_image_ops(x: torch.Tensor, ops: Sequence[str], generator: torch.Generator | None) -> torch.Tensor:
    """Each image of ``x`` through one op of ``ops`` drawn uniformly, at a uniform magnitude."""
    n = x.shape[0]
    choice = torch.randint(len(ops), (n,), generator=generator)
    mags = torch.rand(n, generator=generator).to(x.dtype)
    out = x.clone()
    for i, op in enumerate(ops):
        idx = (choice == i).nonzero(as_tuple=True)[0]
        if len(idx) and op != "identity":
            out[idx] = apply_op(x[idx], op, mags[idx])
    return out


def trivial_augment(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """TrivialAugment-Wide's photometric ops: one op per image, uniform magnitude (x in [0, 1])."""
    return _per_image_ops(x, ops_for(x.shape[1]), generator)


def augmix(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """AugMix's mixing at its default alpha = 1 (x in [0, 1]): ``AUGMIX_WIDTH`` chains of
    1..``AUGMIX_MAX_DEPTH`` random ops, mixed with Dirichlet(1) weights, then mixed with the original
    by Beta(1, 1) (= uniform). Dirichlet(1) is drawn as normalised Exp(1) so that ``generator`` seeds it all."""
    n, ops = x.shape[0], ops_for(x.shape[1])
    expo = -torch.log(torch.rand(n, AUGMIX_WIDTH, generator=generator).clamp(min=1e-12))
    weights = (expo / expo.sum(1, keepdim=True)).to(x.dtype)
    keep = torch.rand(n, generator=generator).to(x.dtype).view(-1, 1, 1, 1)
    mixed = torch.zeros_like(x)
    for k in range(AUGMIX_WIDTH):
        chain = x
        depth = torch.randint(1, AUGMIX_MAX_DEPTH + 1, (n,), generator=generator)
        for d in range(AUGMIX_MAX_DEPTH):
            stepped = _per_image_ops(chain, ops, generator)
            chain = torch.where((depth > d).view(-1, 1, 1, 1), stepped, chain)
        mixed += weights[:, k].view(-1, 1, 1, 1) * chain
    return keep * x + (1 - keep) * mixed


def photometric(kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The batch function of ``train.augment`` (None for ``none``); a ConfigError for an unknown kind."""
    if kind not in AUGMENTS:
        raise ConfigError(f"train.augment must be one of {', '.join(AUGMENTS)}, not {kind!r}")
    return {"none": None, "trivialaugment": trivial_augment, "augmix": augmix}[kind]


class NormalisedPhotometric:
    """A photometric augmentation on normalised batches: un-normalise (``mean``/``std`` in 0..1 units,
    one per channel), augment in [0, 1], normalise again, then ``after`` (random erasing, which must
    see the augmented image). A single (C, H, W) image is treated as a batch of one."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        after: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.fn, self.after = fn, after
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        single = x.ndim == 3
        batch = x[None] if single else x
        c = batch.shape[1]
        mean, std = self.mean[:, :c], self.std[:, :c]
        pixels = (batch * std + mean).clamp(0, 1)
        out = (self.fn(pixels) - mean) / std
        if self.after is not None:
            out = self.after(out)
        return out[0] if single else out


def attach(dataset: Any, kind: str, *, mean: Sequence[float], std: Sequence[float]) -> Any:
    """``dataset`` (a training split) with ``train.augment`` ``kind`` applied after its crop and flip.

    An in-memory split augments each batch through its post-crop hook (``erase``, which then runs
    after the photometric op); a per-file split gets its transform wrapped. ``none`` changes nothing.
    """
    fn = photometric(kind)
    if fn is None:
        return dataset
    from components.data.datasets import InMemoryDataset, ManifestDataset

    if isinstance(dataset, InMemoryDataset):
        # the post-crop hook takes any batch -> batch callable; its annotation names only RandomErasing
        dataset.erase = cast(Any, NormalisedPhotometric(fn, mean=mean, std=std, after=dataset.erase))
    elif isinstance(dataset, ManifestDataset):
        inner = dataset.transform
        wrap = NormalisedPhotometric(fn, mean=mean, std=std)
        dataset.transform = lambda img: wrap(inner(img))
    else:
        raise ConfigError(f"train.augment={kind} is not supported for {type(dataset).__name__}")
    return dataset
